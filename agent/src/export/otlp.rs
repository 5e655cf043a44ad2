//! OTLP over gRPC or HTTP/protobuf with opentelemetry-otlp. The exporter reads the standard
//! `OTEL_EXPORTER_OTLP_*` variables itself (endpoint, traces endpoint, headers, timeout,
//! compression); flags override endpoint and protocol. One exporter serves every process: the
//! resource is set per batch, so each process's spans carry its own resource.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context as _;
use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind as OtelKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};

use crate::{
    process::ProcessInfo,
    trace::span::{SpanKind, SpanRecord, Value},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "grpc" => Some(Protocol::Grpc),
            "http/protobuf" => Some(Protocol::HttpProtobuf),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub protocol: Protocol,
    /// Base endpoint from `--otlp-endpoint` (as OTEL_EXPORTER_OTLP_ENDPOINT); None leaves the
    /// standard variables to the exporter.
    pub endpoint: Option<String>,
}

pub struct OtlpOut {
    exporter: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
    host_name: String,
    errors_logged: u64,
    /// Since when exports fail (for the recovery log line).
    failing_since: Option<std::time::Instant>,
}

/// Exponential backoff between attempts at one batch: 250 ms doubling up to 5 s.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl OtlpOut {
    pub fn new(cfg: &OtlpConfig, host_name: &str) -> anyhow::Result<Self> {
        let exporter = match cfg.protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(e) = &cfg.endpoint {
                    // The flag is a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT.
                    b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
                }
                b.build()
            }
        }
        .context("configuring the OTLP exporter: check OTEL_EXPORTER_OTLP_* and --otlp-endpoint")?;
        Ok(Self {
            exporter,
            scope: InstrumentationScope::builder("loupe")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            host_name: host_name.to_string(),
            errors_logged: 0,
            failing_since: None,
        })
    }

    /// Exports `spans` grouped by process, retrying a failed group with exponential backoff
    /// for up to `retry_for`; returns how many spans were given up on. While this retries, the
    /// export queue in front of it fills and counts what it cannot take: memory stays bounded.
    pub async fn export(
        &mut self,
        spans: Vec<SpanRecord>,
        processes: &crate::process::SharedProcesses,
        retry_for: Duration,
    ) -> u64 {
        let mut by_pid: BTreeMap<u32, Vec<SpanRecord>> = BTreeMap::new();
        for s in spans {
            by_pid.entry(s.pid).or_default().push(s);
        }
        let mut failed = 0;
        for spans in by_pid.into_values() {
            let Some(first) = spans.first() else { continue };
            let process = super::lookup(processes, first);
            self.exporter
                .set_resource(&resource(&process, &self.host_name));
            let n = spans.len() as u64;
            let data: Vec<SpanData> = spans.into_iter().map(|s| self.span_data(s)).collect();
            if !self.export_with_retry(data, n, retry_for).await {
                failed += n;
            }
        }
        failed
    }

    /// Every failure is retried: the exporter reports transport errors, timeouts and rejected
    /// requests alike, and an outage is what matters here. A batch the endpoint keeps rejecting
    /// costs at most `retry_for` before it is dropped and counted.
    async fn export_with_retry(
        &mut self,
        data: Vec<SpanData>,
        n: u64,
        retry_for: Duration,
    ) -> bool {
        let give_up = tokio::time::Instant::now() + retry_for;
        let mut delay = BACKOFF_START;
        loop {
            match self.exporter.export(data.clone()).await {
                Ok(()) => {
                    if let Some(since) = self.failing_since.take() {
                        tracing::info!(
                            "OTLP export recovered after {:.1} s",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    return true;
                }
                Err(err) => {
                    self.failing_since
                        .get_or_insert_with(std::time::Instant::now);
                    let retry = tokio::time::Instant::now() + delay <= give_up;
                    // One line per failure burst, not per attempt: the counters have the rest.
                    if self.errors_logged.is_power_of_two() {
                        if retry {
                            tracing::warn!(
                                "OTLP export failed: {err}; retrying with backoff (spans arriving meanwhile are dropped and counted when the queue is full)"
                            );
                        } else {
                            tracing::warn!("OTLP export failed: {err}; {n} spans dropped");
                        }
                    }
                    self.errors_logged += 1;
                    if !retry {
                        return false;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn span_data(&self, s: SpanRecord) -> SpanData {
        let time = |ns: u64| UNIX_EPOCH + Duration::from_nanos(ns);
        let trace_state = s.trace_state.parse::<TraceState>().unwrap_or_default();
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(s.trace_id),
                SpanId::from_bytes(s.span_id),
                TraceFlags::SAMPLED,
                false,
                trace_state,
            ),
            parent_span_id: s
                .parent_span_id
                .map(SpanId::from_bytes)
                .unwrap_or(SpanId::INVALID),
            parent_span_is_remote: s.parent_is_remote,
            span_kind: match s.kind {
                SpanKind::Server => OtelKind::Server,
                SpanKind::Client => OtelKind::Client,
            },
            name: Cow::Owned(s.name),
            start_time: time(s.start_unix_ns),
            end_time: time(s.end_unix_ns),
            attributes: s
                .attributes
                .into_iter()
                .map(|(k, v)| match v {
                    Value::Str(v) => KeyValue::new(k, v),
                    Value::Int(i) => KeyValue::new(k, i),
                })
                .collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match s.error {
                Some(e) => Status::error(e),
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        }
    }

    pub fn shutdown(&mut self) {
        let _ = self.exporter.shutdown();
    }
}

/// The OpenTelemetry resource of a traced process.
pub fn resource(p: &ProcessInfo, host_name: &str) -> Resource {
    Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", p.service_name.clone()),
            KeyValue::new("process.pid", i64::from(p.pid)),
            KeyValue::new("process.executable.name", p.executable_name.clone()),
            KeyValue::new("process.command_line", p.command_line.clone()),
            KeyValue::new("host.name", host_name.to_string()),
            KeyValue::new("telemetry.sdk.name", "loupe"),
            KeyValue::new("telemetry.sdk.language", "rust"),
            KeyValue::new("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ])
        .with_attributes(
            p.attributes
                .iter()
                .map(|(k, v)| KeyValue::new(*k, v.clone())),
        )
        .build()
}

/// The socket addresses the OTLP endpoint resolves to (flag, else the standard variables, else
/// the default for the protocol), so the pipeline can leave that traffic alone.
pub fn endpoint_addrs(cfg: &OtlpConfig) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let url = cfg
        .endpoint
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or_else(|| match cfg.protocol {
            Protocol::Grpc => "http://localhost:4317".into(),
            Protocol::HttpProtobuf => "http://localhost:4318".into(),
        });
    let Some(rest) = url.split("://").nth(1) else {
        return Vec::new();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = if url.starts_with("https") { 443 } else { 80 };
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    with_port
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default()
}
