//! The RED metrics in the Prometheus text format, translated as the OpenTelemetry
//! specification's Prometheus compatibility rules have it: dots become underscores, a unit of
//! seconds becomes a `_seconds` suffix, counters end in `_total`, histograms are cumulative
//! `_bucket{le=...}` series with `_sum` and `_count`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use opentelemetry_sdk::metrics::{
    ManualReader,
    data::{AggregatedMetrics, MetricData, ResourceMetrics},
    reader::MetricReader as _,
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

/// Series not updated for this long are forgotten (a route or peer gone for good must not
/// hold memory, nor show forever).
pub const IDLE: Duration = Duration::from_secs(15 * 60);

/// One series: a histogram's buckets (per bucket, not cumulative) or a counter.
#[derive(Debug, Clone)]
enum Acc {
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
    Counter(u64),
}

#[derive(Debug)]
struct Series {
    acc: Acc,
    updated: Instant,
}

#[derive(Debug, Default)]
struct Family {
    description: String,
    unit: String,
    series: BTreeMap<Vec<(String, String)>, Series>,
}

/// The cumulative view the Prometheus text and `loupe top` read. The manual reader hands over
/// deltas (the SDK forgets a delta series once collected); they are added here, where a series
/// idle for IDLE expires and each metric keeps at most `limit` series plus the overflow one.
pub struct Store {
    reader: Arc<ManualReader>,
    limit: usize,
    families: BTreeMap<String, Family>,
    pub expired: u64,
}

const OVERFLOW: (&str, &str) = ("otel.metric.overflow", "true");

impl Store {
    pub fn new(reader: Arc<ManualReader>, limit: usize) -> Self {
        Self {
            reader,
            limit,
            families: BTreeMap::new(),
            expired: 0,
        }
    }

    /// Takes what was recorded since the last call, and forgets idle series.
    pub fn update(&mut self, now: Instant) {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.reader.collect(&mut rm) {
            tracing::debug!("collecting RED metrics: {e}");
        }
        for scope in rm.scope_metrics() {
            for m in scope.metrics() {
                match m.data() {
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            let delta = Acc::Histogram {
                                bounds: p.bounds().collect(),
                                counts: p.bucket_counts().collect(),
                                sum: p.sum(),
                                count: p.count(),
                            };
                            self.add(m, p.attributes(), delta, now);
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            self.add(m, p.attributes(), Acc::Counter(p.value()), now);
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut expired = 0;
        for f in self.families.values_mut() {
            f.series.retain(|_, s| {
                let keep = now.duration_since(s.updated) < IDLE;
                expired += u64::from(!keep);
                keep
            });
        }
        self.expired += expired;
    }

    fn add<'a>(
        &mut self,
        m: &opentelemetry_sdk::metrics::data::Metric,
        attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>,
        delta: Acc,
        now: Instant,
    ) {
        let mut labels: Vec<(String, String)> = attrs
            .map(|kv| (kv.key.as_str().to_string(), kv.value.to_string()))
            .collect();
        labels.sort();
        let limit = self.limit;
        let family = self
            .families
            .entry(m.name().to_string())
            .or_insert_with(|| Family {
                description: m.description().to_string(),
                unit: m.unit().to_string(),
                series: BTreeMap::new(),
            });
        let overflow = vec![(OVERFLOW.0.to_string(), OVERFLOW.1.to_string())];
        let regular = family.series.len() - usize::from(family.series.contains_key(&overflow));
        if labels != overflow && !family.series.contains_key(&labels) && regular >= limit {
            labels = overflow;
        }
        match family.series.get_mut(&labels) {
            Some(s) => {
                s.updated = now;
                match (&mut s.acc, delta) {
                    (
                        Acc::Histogram {
                            counts, sum, count, ..
                        },
                        Acc::Histogram {
                            counts: dc,
                            sum: ds,
                            count: dn,
                            ..
                        },
                    ) => {
                        for (c, d) in counts.iter_mut().zip(dc) {
                            *c += d;
                        }
                        *sum += ds;
                        *count += dn;
                    }
                    (Acc::Counter(c), Acc::Counter(d)) => *c += d,
                    _ => {}
                }
            }
            None => {
                family.series.insert(
                    labels,
                    Series {
                        acc: delta,
                        updated: now,
                    },
                );
            }
        }
    }

    /// Every series as Prometheus text (after `update`).
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let Some(first) = f.series.values().next() else {
                continue;
            };
            let counter = matches!(first.acc, Acc::Counter(_));
            let prom = metric_name(name, &f.unit, counter);
            let _ = writeln!(out, "# HELP {prom} {}", f.description);
            let _ = writeln!(
                out,
                "# TYPE {prom} {}",
                if counter { "counter" } else { "histogram" }
            );
            for (labels, s) in &f.series {
                let l: Vec<(String, String)> = labels
                    .iter()
                    .map(|(k, v)| (sanitize(k), escape(v)))
                    .collect();
                match &s.acc {
                    Acc::Counter(v) => {
                        let _ = writeln!(out, "{prom}{} {v}", render_labels(&l, None));
                    }
                    Acc::Histogram {
                        bounds,
                        counts,
                        sum,
                        count,
                    } => {
                        let mut cumulative = 0;
                        for (i, c) in counts.iter().enumerate() {
                            cumulative += c;
                            let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                            let _ = writeln!(
                                out,
                                "{prom}_bucket{} {cumulative}",
                                render_labels(&l, Some(("le", &le)))
                            );
                        }
                        let _ = writeln!(out, "{prom}_sum{} {sum}", render_labels(&l, None));
                        let _ = writeln!(out, "{prom}_count{} {count}", render_labels(&l, None));
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
            self.expired
        );
        out
    }
}

/// Every RED series as Prometheus text, brought up to date.
pub fn render(store: &super::SharedReader) -> String {
    match store.lock() {
        Ok(mut s) => {
            s.update(Instant::now());
            s.text()
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
