//! The RED metrics in the Prometheus text format, translated as the OpenTelemetry
//! specification's Prometheus compatibility rules have it: dots become underscores, a unit of
//! seconds becomes a `_seconds` suffix, counters end in `_total`, histograms are cumulative
//! `_bucket{le=...}` series with `_sum` and `_count`.

use std::fmt::Write as _;

use opentelemetry_sdk::metrics::{
    data::{AggregatedMetrics, MetricData, ResourceMetrics},
    reader::MetricReader as _,
};

use super::SharedReader;

/// `http.server.request.duration` (s) -> `http_server_request_duration_seconds`.
pub fn metric_name(name: &str, unit: &str, counter: bool) -> String {
    let mut out = sanitize(name);
    if unit == "s" && !out.ends_with("_seconds") {
        out.push_str("_seconds");
    }
    if counter && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels<'a>(attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = attrs
        .map(|kv| (sanitize(kv.key.as_str()), escape(&kv.value.to_string())))
        .collect();
    out.sort();
    out
}

fn render_labels(labels: &[(String, String)], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// What the reader holds now, collected once.
pub fn collect(reader: &SharedReader) -> ResourceMetrics {
    let mut rm = ResourceMetrics::default();
    if let Err(e) = reader.collect(&mut rm) {
        tracing::debug!("collecting RED metrics: {e}");
    }
    rm
}

/// Every RED series as Prometheus text.
pub fn render(reader: &SharedReader) -> String {
    let rm = collect(reader);
    let mut out = String::new();
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            match m.data() {
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    let name = metric_name(m.name(), m.unit(), false);
                    let _ = writeln!(out, "# HELP {name} {}", m.description());
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    for p in h.data_points() {
                        let l = labels(p.attributes());
                        let mut cumulative = 0;
                        let bounds: Vec<f64> = p.bounds().collect();
                        for (i, count) in p.bucket_counts().enumerate() {
                            cumulative += count;
                            let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {cumulative}",
                                render_labels(&l, Some(("le", &le)))
                            );
                        }
                        let _ = writeln!(out, "{name}_sum{} {}", render_labels(&l, None), p.sum());
                        let _ =
                            writeln!(out, "{name}_count{} {}", render_labels(&l, None), p.count());
                    }
                }
                AggregatedMetrics::U64(MetricData::Sum(s)) => {
                    let name = metric_name(m.name(), m.unit(), true);
                    let _ = writeln!(out, "# HELP {name} {}", m.description());
                    let _ = writeln!(out, "# TYPE {name} counter");
                    for p in s.data_points() {
                        let l = labels(p.attributes());
                        let _ = writeln!(out, "{name}{} {}", render_labels(&l, None), p.value());
                    }
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_translation() {
        assert_eq!(
            metric_name("http.server.request.duration", "s", false),
            "http_server_request_duration_seconds"
        );
        assert_eq!(
            metric_name("traces_service_graph_request_server_seconds", "s", false),
            "traces_service_graph_request_server_seconds"
        );
        assert_eq!(
            metric_name("traces_service_graph_request_total", "", true),
            "traces_service_graph_request_total"
        );
        assert_eq!(sanitize("otel.metric.overflow"), "otel_metric_overflow");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
