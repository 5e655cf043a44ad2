//! The RED metrics in the Prometheus text format, translated as the OpenTelemetry
//! specification's Prometheus compatibility rules have it: dots become underscores, a unit of
//! seconds becomes a `_seconds` suffix, counters end in `_total`, histograms are cumulative
//! `_bucket{le=...}` series with `_sum` and `_count`.

use std::{fmt::Write as _, time::Duration};

use super::{
    SharedStore,
    store::{EDGE_BOUNDS, EDGE_METRICS, EdgeValue, Histogram, LabelValue, Store},
};

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

/// `{k="v",...}` by label name, or nothing.
fn render_labels(labels: &[(&'static str, LabelValue)]) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", sanitize(k), escape(&v.to_string())))
        .collect();
    // By name, as Prometheus itself prints them.
    parts.sort();
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Series not updated for this long are forgotten (a route or peer gone for good must not
/// hold memory, nor show forever).
pub const IDLE: Duration = Duration::from_secs(15 * 60);

fn header(out: &mut String, prom: &str, help: &str, counter: bool) {
    let _ = writeln!(out, "# HELP {prom} {help}");
    let kind = if counter { "counter" } else { "histogram" };
    let _ = writeln!(out, "# TYPE {prom} {kind}");
}

fn histogram(out: &mut String, prom: &str, labels: &str, bounds: &[f64], h: &Histogram) {
    let mut cumulative = 0;
    for (i, c) in h.counts.iter().enumerate() {
        cumulative += c;
        let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
        // `labels` is `{...}` or empty: the bucket's `le` goes inside.
        let with_le = match labels.strip_suffix('}') {
            Some(l) => format!("{l},le=\"{le}\"}}"),
            None => format!("{{le=\"{le}\"}}"),
        };
        let _ = writeln!(out, "{prom}_bucket{with_le} {cumulative}");
    }
    let _ = writeln!(out, "{prom}_sum{labels} {}", h.sum);
    let _ = writeln!(out, "{prom}_count{labels} {}", h.count);
}

/// Every series as Prometheus text, each metric's series in the order of their labels.
pub fn text(store: &Store) -> String {
    let mut out = String::new();
    let mut metrics: Vec<_> = store.metrics.iter().collect();
    metrics.sort_by_key(|m| m.name);
    for m in metrics {
        let mut series: Vec<_> = m
            .table
            .iter()
            .map(|s| (render_labels(&s.labels), &s.data))
            .collect();
        if series.is_empty() {
            continue;
        }
        series.sort_by(|a, b| a.0.cmp(&b.0));
        let prom = metric_name(m.name, "s", false);
        header(&mut out, &prom, m.description, false);
        for (labels, h) in series {
            histogram(&mut out, &prom, &labels, m.bounds, h);
        }
    }
    let mut edges: Vec<_> = store
        .edges
        .iter()
        .map(|s| (render_labels(&s.labels), &s.data))
        .collect();
    edges.sort_by(|a, b| a.0.cmp(&b.0));
    if !edges.is_empty() {
        for m in &EDGE_METRICS {
            match m.value {
                EdgeValue::Counter(value) => {
                    header(&mut out, m.name, m.description, true);
                    for (labels, e) in &edges {
                        let _ = writeln!(out, "{}{labels} {}", m.name, value(e));
                    }
                }
                EdgeValue::Histogram(which) => {
                    header(&mut out, m.name, m.description, false);
                    // A server duration exists only where the server is traced on this node.
                    for (labels, e) in edges.iter().filter(|(_, e)| which(e).count > 0) {
                        histogram(&mut out, m.name, labels, EDGE_BOUNDS, which(e));
                    }
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP loupe_red_series_expired_total RED and service-graph series forgotten after {} min without a request.
# TYPE loupe_red_series_expired_total counter
loupe_red_series_expired_total {}",
        IDLE.as_secs() / 60,
        store.expired
    );
    out
}

/// Forgets the series idle for IDLE.
pub fn expire_idle(store: &mut Store) {
    let now = crate::clock::unix_ns();
    store.expire(now.saturating_sub(IDLE.as_nanos() as u64));
}

/// Every RED series as Prometheus text, idle ones forgotten first.
pub fn render(store: &SharedStore) -> String {
    match store.lock() {
        Ok(mut s) => {
            expire_idle(&mut s);
            text(&s)
        }
        Err(_) => String::new(),
    }
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
