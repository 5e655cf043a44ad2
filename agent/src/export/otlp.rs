//! OTLP trace export over gRPC or HTTP/protobuf. Spans become opentelemetry-proto messages,
//! encoded once per batch (`otlp_proto`); the encoded bytes go out on a tonic channel
//! (`otlp_grpc`, without a copy) or reqwest, with up
//! to `MAX_IN_FLIGHT` batches on the wire at once and each one retried with backoff. Settings
//! follow the standard `OTEL_EXPORTER_OTLP_[TRACES_]*` variables (`otlp_settings`); flags
//! override endpoint and protocol.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceResponse, trace::v1::ExportTraceServiceResponse,
};
use tokio::sync::Semaphore;

use super::{
    ExportStats,
    otlp_errors::{chain, explain},
    otlp_grpc::{self, Body},
    otlp_proto,
    otlp_settings::{Settings, Signal, settings, settings_for},
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::trace::span::SpanRecord;

// The configuration types live with the settings that read them (no import circle).
pub use super::otlp_settings::{OtlpConfig, Protocol};

/// Batches on the wire at once: enough to hide a collector's round trip at saturation, few
/// enough that an outage holds at most this many batches in memory beside the queue.
const MAX_IN_FLIGHT: usize = 4;

/// Exponential backoff between attempts at one batch: 250 ms doubling up to 5 s.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn grpc_path(signal: Signal) -> &'static str {
    match signal {
        Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    }
}

pub struct OtlpOut {
    transport: Arc<Transport>,
    host_name: String,
    in_flight: Arc<Semaphore>,
    failures: Arc<FailureLog>,
    /// Encoded bytes per span in the last batch: sizes the next request's buffer.
    bytes_per_span: usize,
}

/// Where encoded requests of one signal go: a tonic channel or reqwest, with the signal's settings.
pub(super) struct Transport {
    signal: Signal,
    wire: Wire,
}

enum Wire {
    Grpc {
        unary: otlp_grpc::Unary,
        url: String,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
        gzip: bool,
    },
}

/// One log line per failure burst, not per attempt: the counters have the rest.
#[derive(Default)]
struct FailureLog {
    logged: AtomicU64,
    since: Mutex<Option<Instant>>,
}

impl FailureLog {
    fn failed(&self, err: &str, retrying: bool, n: u64) {
        if let Ok(mut since) = self.since.lock() {
            since.get_or_insert_with(Instant::now);
        }
        if self
            .logged
            .fetch_add(1, Ordering::Relaxed)
            .is_power_of_two()
        {
            if retrying {
                tracing::warn!(
                    "OTLP export failed: {err}; retrying with backoff (spans arriving meanwhile are dropped and counted when the queue is full)"
                );
            } else {
                tracing::warn!("OTLP export failed: {err}; {n} spans dropped");
            }
        }
    }

    fn succeeded(&self) {
        if let Some(since) = self.since.lock().ok().and_then(|mut s| s.take()) {
            tracing::info!(
                "OTLP export recovered after {:.1} s",
                since.elapsed().as_secs_f64()
            );
        }
    }
}

impl OtlpOut {
    /// Must run inside the tokio runtime (the gRPC channel spawns its worker there).
    pub fn new(cfg: &OtlpConfig, host_name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            transport: Arc::new(Transport::new(cfg, Signal::Traces)?),
            host_name: host_name.to_string(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            failures: Arc::default(),
            bytes_per_span: 512,
        })
    }

    /// Encodes `spans` (grouped by process) into one request and starts sending it, retried with
    /// exponential backoff for up to `retry_for`. Waits only while `MAX_IN_FLIGHT` requests are
    /// already out: the export queue in front then fills and counts what it cannot take, so
    /// memory stays bounded during an outage. The outcome lands in `stats`.
    pub async fn export(
        &mut self,
        spans: Vec<SpanRecord>,
        processes: &crate::process::SharedProcesses,
        retry_for: Duration,
        stats: &Arc<ExportStats>,
    ) {
        let n = spans.len() as u64;
        // Grouped by reference: moving each span into its group's vector cost a copy of every
        // span, and more as the vectors grew.
        let mut by_pid: BTreeMap<u32, Vec<&SpanRecord>> = BTreeMap::new();
        for s in &spans {
            by_pid.entry(s.pid).or_default().push(s);
        }
        let groups: Vec<(Resource, Vec<&SpanRecord>)> = by_pid
            .into_values()
            .map(|group| {
                let process = super::lookup_pid(processes, group[0].pid, &group[0].comm);
                (otlp_proto::resource(&process, &self.host_name), group)
            })
            .collect();
        // An eighth over the last batch's average, so a batch like it fits in one allocation.
        let hint = spans.len() * self.bytes_per_span * 9 / 8 + 4096;
        let body = otlp_proto::encode_request(&groups, hint);
        self.bytes_per_span = body.len() / spans.len().max(1);
        drop(groups);
        drop(spans);
        self.dispatch(body, n, retry_for, stats).await;
    }

    /// `export` for spans the pipeline encoded (`EncodedBatch`), grouped by process there.
    pub async fn export_encoded(
        &mut self,
        spans: &otlp_proto::EncodedBatch,
        processes: &crate::process::SharedProcesses,
        retry_for: Duration,
        stats: &Arc<ExportStats>,
    ) {
        let resources: Vec<Resource> = spans
            .processes()
            .map(|(pid, comm)| {
                otlp_proto::resource(&super::lookup_pid(processes, pid, comm), &self.host_name)
            })
            .collect();
        let body = otlp_proto::encode_batch_request(spans, &resources);
        drop(resources);
        self.dispatch(body, spans.len() as u64, retry_for, stats)
            .await;
    }

    /// Starts sending an encoded request of `n` spans.
    async fn dispatch(
        &mut self,
        body: Body,
        n: u64,
        retry_for: Duration,
        stats: &Arc<ExportStats>,
    ) {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let transport = self.transport.clone();
        let failures = self.failures.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let failed = send_with_retry(&transport, &failures, body, n, retry_for, &stats).await;
            stats.export_failed.fetch_add(failed, Ordering::Relaxed);
            stats
                .spans_exported
                .fetch_add(n - failed, Ordering::Relaxed);
            drop(permit);
        });
    }

    /// Waits for the requests still on the wire (each bounded by its own retry budget).
    pub async fn shutdown(&mut self) {
        let _ = self.in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
    }
}

/// Returns how many of the `n` spans were given up on: all of them after `retry_for` of
/// failures, or those the endpoint rejected (a partial success is not retried, per the spec).
async fn send_with_retry(
    transport: &Transport,
    failures: &FailureLog,
    body: Body,
    n: u64,
    retry_for: Duration,
    stats: &ExportStats,
) -> u64 {
    let give_up = tokio::time::Instant::now() + retry_for;
    let mut delay = BACKOFF_START;
    loop {
        match transport.send(body.clone()).await {
            Ok(rejected) => {
                failures.succeeded();
                stats.failing_since_ms.store(0, Ordering::Relaxed);
                if rejected > 0 {
                    tracing::debug!("the OTLP endpoint rejected {rejected} spans");
                }
                return rejected.min(n);
            }
            Err(err) => {
                let _ = stats.failing_since_ms.compare_exchange(
                    0,
                    crate::clock::monotonic_ms(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                let retry = tokio::time::Instant::now() + delay <= give_up;
                failures.failed(&err, retry, n);
                if !retry {
                    return n;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// A signal's export response: how many items the endpoint rejected.
trait Response: prost::Message + Default + Send + 'static {
    fn rejected(&self) -> u64;
}

impl Response for ExportTraceServiceResponse {
    fn rejected(&self) -> u64 {
        self.partial_success
            .as_ref()
            .map(|p| p.rejected_spans.max(0) as u64)
            .unwrap_or(0)
    }
}

impl Response for ExportMetricsServiceResponse {
    fn rejected(&self) -> u64 {
        self.partial_success
            .as_ref()
            .map(|p| p.rejected_data_points.max(0) as u64)
            .unwrap_or(0)
    }
}

impl Transport {
    /// Must run inside the tokio runtime (the gRPC channel spawns its worker there).
    pub(super) fn new(cfg: &OtlpConfig, signal: Signal) -> anyhow::Result<Self> {
        let s = settings_for(cfg, signal)?;
        let wire = match cfg.protocol {
            Protocol::Grpc => grpc(&s)?,
            Protocol::HttpProtobuf => http(&s)?,
        };
        Ok(Self { signal, wire })
    }

    /// One attempt; Ok(items the endpoint rejected).
    pub(super) async fn send(&self, body: Body) -> Result<u64, String> {
        match self.signal {
            Signal::Traces => self.send_as::<ExportTraceServiceResponse>(body).await,
            Signal::Metrics => self.send_as::<ExportMetricsServiceResponse>(body).await,
        }
    }

    async fn send_as<R: Response>(&self, body: Body) -> Result<u64, String> {
        match &self.wire {
            Wire::Grpc { unary, url } => {
                let response = unary
                    .call(grpc_path(self.signal), &body)
                    .await
                    .map_err(|s| explain(Protocol::Grpc, url, &status_detail(&s)))?;
                R::decode(response).map(|r| r.rejected()).map_err(|e| {
                    explain(
                        Protocol::Grpc,
                        url,
                        &format!("undecodable export response: {e}"),
                    )
                })
            }
            Wire::Http {
                client,
                url,
                headers,
                gzip,
            } => {
                let mut request = client
                    .post(url)
                    .headers(headers.clone())
                    .header("content-type", "application/x-protobuf");
                request = if *gzip {
                    request
                        .header("content-encoding", "gzip")
                        .body(body.gzipped().map_err(|e| format!("gzip: {e}"))?)
                } else {
                    request.body(reqwest::Body::wrap(body.message()))
                };
                let failed = |detail: String| explain(Protocol::HttpProtobuf, url, &detail);
                let response = request.send().await.map_err(|e| failed(chain(&e)))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(failed(format!("HTTP {status}")));
                }
                let bytes = response.bytes().await.map_err(|e| failed(chain(&e)))?;
                Ok(R::decode(bytes).map(|r| r.rejected()).unwrap_or(0))
            }
        }
    }
}

/// A failed call's status and its causes, each once.
fn status_detail(s: &tonic::Status) -> String {
    let detail = match std::error::Error::source(s).map(chain) {
        // A transport error's status repeats its first cause.
        Some(src) if src.starts_with(s.message()) => src,
        Some(src) => format!("{}: {src}", s.message()),
        None => s.message().to_string(),
    };
    format!("gRPC status {:?}: {detail}", s.code())
}

fn grpc(s: &Settings) -> anyhow::Result<Wire> {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(s.url.clone()).with_context(|| {
            format!(
                "OTLP endpoint {}: give a URL such as http://collector:4317",
                s.url
            )
        })?;
    if s.url.starts_with("https://") {
        // The system's trust store, like curl and the OpenTelemetry SDKs.
        endpoint = endpoint
            .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
            .context("configuring TLS for the OTLP endpoint")?;
    }
    let channel = endpoint
        .connect_timeout(s.timeout)
        .timeout(s.timeout)
        .connect_lazy();
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &s.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes());
        match (key, v.parse()) {
            (Ok(key), Ok(value)) => {
                metadata.insert(key, value);
            }
            _ => tracing::warn!("OTLP header {k:?} is not a valid gRPC metadata entry; not sent"),
        }
    }
    Ok(Wire::Grpc {
        unary: otlp_grpc::Unary::new(channel, metadata.into_headers(), s.timeout, s.gzip),
        url: s.url.clone(),
    })
}

fn http(s: &Settings) -> anyhow::Result<Wire> {
    let client = reqwest::Client::builder()
        .timeout(s.timeout)
        .build()
        .context("building the OTLP HTTP client")?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &s.headers {
        match (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            reqwest::header::HeaderValue::from_str(v),
        ) {
            (Ok(name), Ok(value)) => {
                headers.insert(name, value);
            }
            _ => tracing::warn!("OTLP header {k:?} is not a valid HTTP header; not sent"),
        }
    }
    Ok(Wire::Http {
        client,
        url: s.url.clone(),
        headers,
        gzip: s.gzip,
    })
}

/// The socket addresses the OTLP endpoint resolves to, so the pipeline can leave that traffic
/// alone.
pub fn endpoint_addrs(cfg: &OtlpConfig) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let Ok(s) = settings(cfg) else {
        return Vec::new();
    };
    let url = s.url;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_calls_detail_names_its_code_and_each_cause_once() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let s = tonic::Status::from_error(Box::new(refused));
        assert_eq!(
            status_detail(&s),
            format!("gRPC status {:?}: refused", s.code())
        );
        let s = tonic::Status::unavailable("overloaded");
        assert_eq!(status_detail(&s), "gRPC status Unavailable: overloaded");
    }
}
