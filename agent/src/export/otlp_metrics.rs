//! The RED metrics and the agent's own counters (`metrics::Metrics::samples`, the same ones
//! `--metrics-addr` serves) as OTLP metrics, to the same endpoint and protocol as the spans.
//! Standard variables apply: OTEL_METRIC_EXPORT_INTERVAL (default 60 s),
//! OTEL_EXPORTER_OTLP_METRICS_* over OTEL_EXPORTER_OTLP_*, OTEL_METRICS_EXPORTER=none turns
//! them off.
//!
//! Temporality is cumulative (the specification's default): an export that fails loses nothing
//! but resolution, the next one carries the totals. Encoded with opentelemetry-proto's generated
//! messages: a few thousand series a minute, not the hot path.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram as OtlpHistogram, HistogramDataPoint, Metric,
        NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message as _;

use super::{
    otlp::Transport,
    otlp_grpc::Body,
    otlp_settings::{OtlpConfig, Signal},
};
use crate::{
    metrics::Metrics,
    red::{
        SharedStore,
        store::{EDGE_BOUNDS, EDGE_METRICS, EdgeValue, Histogram, LabelValue, Store},
    },
};

const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// The OTLP name of a Prometheus-style metric: `loupe_spans_built_total` -> `loupe.spans_built`.
pub fn otlp_name(prometheus: &str) -> String {
    let base = prometheus.strip_suffix("_total").unwrap_or(prometheus);
    match base.strip_prefix("loupe_") {
        Some(rest) => format!("loupe.{rest}"),
        None => base.to_string(),
    }
}

/// OTEL_METRIC_EXPORT_INTERVAL (ms) as `value` gives it.
fn interval(value: Option<&str>) -> anyhow::Result<Duration> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(DEFAULT_INTERVAL),
        Some(v) => match v.parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => anyhow::bail!(
                "OTEL_METRIC_EXPORT_INTERVAL={v:?}: give a whole number of milliseconds above 0"
            ),
        },
    }
}

/// Exports every interval until shut down, then once more.
pub struct MetricsExport {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// What one export reads.
struct Sources {
    metrics: Arc<Metrics>,
    red: Option<SharedStore>,
    resource: Resource,
    start_ns: u64,
}

impl MetricsExport {
    /// None when OTEL_METRICS_EXPORTER=none. Must run inside the tokio runtime.
    pub fn start(
        cfg: &OtlpConfig,
        metrics: Arc<Metrics>,
        host_name: &str,
    ) -> anyhow::Result<Option<Self>> {
        let disabled = std::env::var("OTEL_METRICS_EXPORTER")
            .is_ok_and(|v| v.split(',').any(|e| e.trim() == "none"));
        if disabled {
            return Ok(None);
        }
        let every = interval(std::env::var("OTEL_METRIC_EXPORT_INTERVAL").ok().as_deref())?;
        let transport = Transport::new(cfg, Signal::Metrics).context(
            "configuring the OTLP metrics export: check OTEL_EXPORTER_OTLP_* or set OTEL_METRICS_EXPORTER=none",
        )?;
        let sources = Sources {
            red: metrics.red.clone(),
            metrics,
            resource: agent_resource(host_name),
            start_ns: crate::clock::unix_ns(),
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut failing = false;
            loop {
                let last = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = &mut stopped => true,
                };
                let body = sources.encode(crate::clock::unix_ns());
                let result = transport.send(body).await;
                if result.is_err()
                    && let Some(e) = &sources.metrics.export
                {
                    e.metrics_export_failed.fetch_add(1, Ordering::Relaxed);
                }
                match result {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("OTLP metrics export recovered");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(
                            "OTLP metrics export failed: {e}; the next export carries the totals (cumulative)"
                        );
                    }
                    Err(e) => tracing::debug!("OTLP metrics export failed: {e}"),
                }
                if last {
                    return;
                }
            }
        });
        Ok(Some(Self { stop, task }))
    }

    /// Exports the final values (at most 2 s: shutdown stays within its 5 s).
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .is_err()
        {
            tracing::debug!("the final OTLP metrics export did not finish in 2 s");
        }
    }
}

/// The resource of the agent's own metrics and of the RED metrics it computes (each series of
/// those names its service in a `service.name` attribute).
fn agent_resource(host_name: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", "loupe".into()),
            kv("service.version", env!("CARGO_PKG_VERSION").into()),
            kv("host.name", host_name.into()),
        ],
        ..Default::default()
    }
}

fn kv(key: &str, value: LabelValue) -> KeyValue {
    let value = match value {
        LabelValue::Str(s) => any_value::Value::StringValue(s.to_string()),
        LabelValue::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn scope(name: &str, metrics: Vec<Metric>) -> ScopeMetrics {
    ScopeMetrics {
        scope: Some(InstrumentationScope {
            name: name.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        metrics,
        ..Default::default()
    }
}

const CUMULATIVE: i32 = AggregationTemporality::Cumulative as i32;

fn metric(name: &str, description: &str, unit: &str, data: Data) -> Metric {
    Metric {
        name: name.to_string(),
        description: description.to_string(),
        unit: unit.to_string(),
        data: Some(data),
        ..Default::default()
    }
}

fn histogram_point(
    labels: &[(&'static str, LabelValue)],
    bounds: &[f64],
    h: &Histogram,
    start_ns: u64,
    now_ns: u64,
) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes: labels.iter().map(|(k, v)| kv(k, v.clone())).collect(),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        count: h.count,
        sum: Some(h.sum),
        bucket_counts: h.counts.to_vec(),
        explicit_bounds: bounds.to_vec(),
        min: (h.count > 0).then_some(h.min),
        max: (h.count > 0).then_some(h.max),
        ..Default::default()
    }
}

fn counter_point(
    labels: &[(&'static str, LabelValue)],
    value: u64,
    start_ns: u64,
    now_ns: u64,
) -> NumberDataPoint {
    NumberDataPoint {
        attributes: labels.iter().map(|(k, v)| kv(k, v.clone())).collect(),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        value: Some(number_data_point::Value::AsInt(value as i64)),
        ..Default::default()
    }
}

fn histogram_data(points: Vec<HistogramDataPoint>) -> Data {
    Data::Histogram(OtlpHistogram {
        data_points: points,
        aggregation_temporality: CUMULATIVE,
    })
}

fn sum_data(points: Vec<NumberDataPoint>) -> Data {
    Data::Sum(Sum {
        data_points: points,
        aggregation_temporality: CUMULATIVE,
        is_monotonic: true,
    })
}

/// Every RED series, idle ones forgotten first.
fn red_metrics(store: &mut Store, now_ns: u64) -> Vec<Metric> {
    crate::red::prometheus::expire_idle(store);
    let mut out = Vec::new();
    for m in &store.metrics {
        let points: Vec<_> = m
            .table
            .iter()
            .map(|s| histogram_point(&s.labels, m.bounds, &s.data, s.start_ns, now_ns))
            .collect();
        if !points.is_empty() {
            out.push(metric(m.name, m.description, "s", histogram_data(points)));
        }
    }
    let edges: Vec<_> = store.edges.iter().collect();
    if edges.is_empty() {
        return out;
    }
    for m in &EDGE_METRICS {
        let data = match m.value {
            EdgeValue::Counter(value) => sum_data(
                edges
                    .iter()
                    .map(|s| counter_point(&s.labels, value(&s.data), s.start_ns, now_ns))
                    .collect(),
            ),
            EdgeValue::Histogram(which) => {
                // A server duration exists only where the server is traced on this node.
                let points: Vec<_> = edges
                    .iter()
                    .filter(|s| which(&s.data).count > 0)
                    .map(|s| {
                        histogram_point(&s.labels, EDGE_BOUNDS, which(&s.data), s.start_ns, now_ns)
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                histogram_data(points)
            }
        };
        let unit = match m.value {
            EdgeValue::Counter(_) => "",
            EdgeValue::Histogram(_) => "s",
        };
        out.push(metric(m.name, m.description, unit, data));
    }
    out
}

/// The agent's own counters and gauges, one metric per name.
fn own_metrics(metrics: &Metrics, start_ns: u64, now_ns: u64) -> Vec<Metric> {
    let mut by_name: Vec<Metric> = Vec::new();
    for s in metrics.samples() {
        let name = otlp_name(s.name);
        let labels: Vec<(&'static str, LabelValue)> = s
            .labels
            .iter()
            .map(|(k, v)| (*k, LabelValue::Str((*v).into())))
            .collect();
        // A gauge has no start.
        let start = if s.gauge { 0 } else { start_ns };
        let point = counter_point(&labels, s.value, start, now_ns);
        match by_name.iter_mut().find(|m| m.name == name) {
            Some(m) => match &mut m.data {
                Some(Data::Sum(sum)) => sum.data_points.push(point),
                Some(Data::Gauge(g)) => g.data_points.push(point),
                _ => {}
            },
            None => {
                let data = if s.gauge {
                    Data::Gauge(Gauge {
                        data_points: vec![point],
                    })
                } else {
                    sum_data(vec![point])
                };
                by_name.push(metric(&name, s.help, "", data));
            }
        }
    }
    by_name
}

impl Sources {
    fn encode(&self, now_ns: u64) -> Body {
        let mut scopes = vec![scope(
            "loupe",
            own_metrics(&self.metrics, self.start_ns, now_ns),
        )];
        if let Some(red) = &self.red
            && let Ok(mut store) = red.lock()
        {
            scopes.push(scope("loupe.red", red_metrics(&mut store, now_ns)));
        }
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: scopes,
                ..Default::default()
            }],
        };
        let mut buf = Body::buffer(request.encoded_len());
        request
            .encode(&mut buf)
            .expect("a Vec grows to hold any message");
        Body::finish(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_become_dotted_otlp_names() {
        assert_eq!(otlp_name("loupe_spans_built_total"), "loupe.spans_built");
        assert_eq!(otlp_name("loupe_k8s_pods"), "loupe.k8s_pods");
    }

    #[test]
    fn red_series_are_cumulative_histograms_and_edge_sums() {
        use crate::{
            red::{Peer, Red},
            trace::span::{SpanKind, SpanRecord, Value},
        };
        let mut red = Red::new(crate::process::ProcessCache::shared(Vec::new(), true), 100);
        let now = crate::clock::unix_ns();
        let span = |kind, ms: u64| SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            name: "GET".into(),
            kind,
            start_unix_ns: now - ms * 1_000_000,
            end_unix_ns: now,
            attributes: vec![
                ("http.request.method", Value::Static("GET")),
                ("http.response.status_code", Value::Int(200)),
            ],
            error: None,
            status: None,
            // Above any pid_max: named by its command.
            pid: 4_194_305,
            comm: "shop".into(),
        };
        red.record(&span(SpanKind::Server, 3));
        red.record(&span(SpanKind::Server, 30));
        red.edge(
            &span(SpanKind::Client, 3),
            Peer::Address("10.0.0.9:80".into()),
        );
        let store = red.store();
        let metrics = red_metrics(&mut store.lock().unwrap(), now + 1);
        let by_name = |n: &str| metrics.iter().find(|m| m.name == n);
        let Some(Data::Histogram(h)) =
            by_name("http.server.request.duration").and_then(|m| m.data.clone())
        else {
            panic!("no server histogram: {metrics:?}")
        };
        assert_eq!(h.aggregation_temporality, CUMULATIVE);
        let p = &h.data_points[0];
        assert_eq!((p.count, p.bucket_counts.len()), (2, 15));
        assert_eq!((p.bucket_counts[0], p.bucket_counts[3]), (1, 1));
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (now, now + 1));
        assert_eq!(p.attributes[0].key, "service.name");
        let Some(Data::Sum(s)) =
            by_name("traces_service_graph_request_total").and_then(|m| m.data.clone())
        else {
            panic!("no edge counter: {metrics:?}")
        };
        assert!(s.is_monotonic);
        assert_eq!(
            s.data_points[0].value,
            Some(number_data_point::Value::AsInt(1))
        );
        // An untraced server has no server-side duration.
        assert!(by_name("traces_service_graph_request_server_seconds").is_none());
        assert!(by_name("traces_service_graph_request_client_seconds").is_some());
    }

    #[tokio::test]
    async fn a_failed_export_is_counted() {
        let mut metrics = Metrics::new(None);
        let stats = Arc::new(crate::export::ExportStats::default());
        metrics.export = Some(stats.clone());
        // Nothing listens on port 1: the final export at shutdown fails at once.
        let cfg = OtlpConfig {
            protocol: super::super::otlp_settings::Protocol::Grpc,
            endpoint: Some("http://127.0.0.1:1".into()),
        };
        let export = MetricsExport::start(&cfg, Arc::new(metrics), "node-1")
            .unwrap()
            .expect("OTEL_METRICS_EXPORTER is not set in tests");
        export.shutdown().await;
        assert_eq!(stats.metrics_export_failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_interval_is_in_milliseconds() {
        assert_eq!(interval(None).unwrap(), DEFAULT_INTERVAL);
        assert_eq!(interval(Some("1500")).unwrap(), Duration::from_millis(1500));
        assert!(interval(Some("1s")).is_err());
        assert!(interval(Some("0")).is_err());
    }
}
