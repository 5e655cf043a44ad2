//! The agent's own counters (`metrics::Metrics::samples`, the same ones `--metrics-addr` serves)
//! as OTLP metrics, to the same endpoint and protocol as the spans. Standard variables apply:
//! OTEL_METRIC_EXPORT_INTERVAL (default 60 s), OTEL_METRICS_EXPORTER=none turns them off.

use std::sync::Arc;

use anyhow::Context as _;
use opentelemetry::{KeyValue, metrics::MeterProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    metrics::{SdkMeterProvider, periodic_reader_with_async_runtime::PeriodicReader},
    runtime,
};

use super::otlp_settings::{OtlpConfig, Protocol};
use crate::metrics::Metrics;

/// The OTLP name of a Prometheus-style metric: `loupe_spans_built_total` -> `loupe.spans_built`.
pub fn otlp_name(prometheus: &str) -> String {
    let base = prometheus.strip_suffix("_total").unwrap_or(prometheus);
    match base.strip_prefix("loupe_") {
        Some(rest) => format!("loupe.{rest}"),
        None => base.to_string(),
    }
}

/// The OTLP metrics exporter for `cfg`; None when OTEL_METRICS_EXPORTER=none.
pub fn exporter(cfg: &OtlpConfig) -> anyhow::Result<Option<opentelemetry_otlp::MetricExporter>> {
    let disabled = std::env::var("OTEL_METRICS_EXPORTER")
        .is_ok_and(|v| v.split(',').any(|e| e.trim() == "none"));
    if disabled {
        return Ok(None);
    }
    let exporter = match cfg.protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(format!("{}/v1/metrics", e.trim_end_matches('/')));
                }
                b.build()
            }
    }
    .context("configuring the OTLP metrics exporter: check OTEL_EXPORTER_OTLP_* or set OTEL_METRICS_EXPORTER=none")?;
    Ok(Some(exporter))
}

/// The periodic reader that exports to OTLP every OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
pub fn periodic(
    exporter: opentelemetry_otlp::MetricExporter,
) -> PeriodicReader<opentelemetry_otlp::MetricExporter> {
    PeriodicReader::builder(exporter, runtime::Tokio).build()
}

/// The resource of the agent's own metrics and of the RED metrics it computes (each series of
/// those names its service in `service.name` attributes).
pub fn agent_resource(host_name: &str) -> Resource {
    Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", "loupe"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("host.name", host_name.to_string()),
        ])
        .build()
}

/// Keeps the meter provider (and so the periodic export) alive; flushes on shutdown.
pub struct MetricsExport {
    provider: SdkMeterProvider,
}

impl MetricsExport {
    pub fn start(
        cfg: &OtlpConfig,
        metrics: Arc<Metrics>,
        host_name: &str,
    ) -> anyhow::Result<Option<Self>> {
        let Some(exporter) = exporter(cfg)? else {
            return Ok(None);
        };
        let reader = periodic(exporter);
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(agent_resource(host_name))
            .build();
        let meter = provider.meter("loupe");
        let mut seen = std::collections::HashSet::new();
        for sample in metrics.samples() {
            if !seen.insert(sample.name) {
                continue;
            }
            let (name, m) = (sample.name, metrics.clone());
            // Observed at each collection: one read of every counter per metric.
            let observe = move |o: &dyn opentelemetry::metrics::AsyncInstrument<u64>| {
                for s in m.samples().into_iter().filter(|s| s.name == name) {
                    let attrs: Vec<KeyValue> = s
                        .labels
                        .iter()
                        .map(|(k, v)| KeyValue::new(*k, *v))
                        .collect();
                    o.observe(s.value, &attrs);
                }
            };
            if sample.gauge {
                meter
                    .u64_observable_gauge(otlp_name(name))
                    .with_description(sample.help)
                    .with_callback(move |o| observe(o))
                    .build();
            } else {
                meter
                    .u64_observable_counter(otlp_name(name))
                    .with_description(sample.help)
                    .with_callback(move |o| observe(o))
                    .build();
            }
        }
        Ok(Some(Self { provider }))
    }

    /// Exports the final values (at most 2 s: shutdown stays within its 5 s).
    pub async fn shutdown(self) {
        shutdown(self.provider).await;
    }
}

/// Exports a provider's final values, at most 2 s.
pub async fn shutdown(provider: SdkMeterProvider) {
    let done = tokio::task::spawn_blocking(move || provider.shutdown());
    match tokio::time::timeout(std::time::Duration::from_secs(2), done).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::debug!("OTLP metrics shutdown: {e}"),
        _ => tracing::debug!("OTLP metrics shutdown did not finish in 2 s"),
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
}
