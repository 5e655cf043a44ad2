//! An OTLP trace and metrics receiver for the tests, on loopback, over gRPC and HTTP/protobuf. Messages are
//! the official opentelemetry-proto definitions (the `opentelemetry-proto` crate generates them
//! from the .proto files); every request's raw bytes are kept too, for the secrets scan.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message as _;

#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub resource: HashMap<String, String>,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// 2 = SERVER, 3 = CLIENT (opentelemetry.proto.trace.v1.Span.SpanKind)
    pub kind: i32,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: HashMap<String, String>,
    /// 0 unset, 1 ok, 2 error
    pub status_code: i32,
    /// "grpc" or "http"
    pub transport: &'static str,
}

impl ReceivedSpan {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attributes.get(k).map(String::as_str)
    }
    pub fn service(&self) -> &str {
        self.resource
            .get("service.name")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// One integer data point of a Sum or Gauge.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    pub resource: HashMap<String, String>,
    pub metric: String,
    pub attributes: HashMap<String, String>,
    pub value: i64,
    /// Sum (counter) or gauge.
    pub monotonic: bool,
}

/// One histogram data point (cumulative, as the agent exports them).
#[derive(Debug, Clone)]
pub struct ReceivedHistogram {
    pub metric: String,
    pub unit: String,
    pub attributes: HashMap<String, String>,
    pub count: u64,
    pub sum: f64,
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<ReceivedSpan>>,
    points: Mutex<Vec<ReceivedPoint>>,
    histograms: Mutex<Vec<ReceivedHistogram>>,
    raw: Mutex<Vec<u8>>,
    /// Count only (floods): keep no spans and no bytes...
    count_only: bool,
    /// ... but the spans whose `url.path` starts with this.
    keep_path_prefix: Option<&'static str>,
    counted: std::sync::atomic::AtomicU64,
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn map(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Store {
    fn add(&self, req: &ExportTraceServiceRequest, raw: &[u8], transport: &'static str) {
        if self.count_only {
            let n: usize = req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.counted
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            if self.keep_path_prefix.is_none() {
                return;
            }
        } else {
            self.raw.lock().unwrap().extend_from_slice(raw);
        }
        let kept = |s: &opentelemetry_proto::tonic::trace::v1::Span| match self.keep_path_prefix {
            None => true,
            Some(prefix) => s
                .attributes
                .iter()
                .any(|kv| kv.key == "url.path" && value(&kv.value).starts_with(prefix)),
        };
        let mut spans = self.spans.lock().unwrap();
        for rs in &req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| map(&r.attributes))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in ss.spans.iter().filter(|s| kept(s)) {
                    spans.push(ReceivedSpan {
                        resource: resource.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: s.kind,
                        start_unix_ns: s.start_time_unix_nano,
                        end_unix_ns: s.end_time_unix_nano,
                        attributes: map(&s.attributes),
                        status_code: s.status.as_ref().map(|st| st.code).unwrap_or(0),
                        transport,
                    });
                }
            }
        }
    }
}

impl Store {
    fn add_metrics(&self, req: &ExportMetricsServiceRequest) {
        use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
        let mut points = self.points.lock().unwrap();
        for rm in &req.resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .map(|r| map(&r.attributes))
                .unwrap_or_default();
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let (dps, monotonic) = match &m.data {
                    Some(Data::Sum(s)) => (&s.data_points, s.is_monotonic),
                    Some(Data::Gauge(g)) => (&g.data_points, false),
                    Some(Data::Histogram(h)) => {
                        let mut hs = self.histograms.lock().unwrap();
                        for dp in &h.data_points {
                            hs.push(ReceivedHistogram {
                                metric: m.name.clone(),
                                unit: m.unit.clone(),
                                attributes: map(&dp.attributes),
                                count: dp.count,
                                sum: dp.sum.unwrap_or_default(),
                                bounds: dp.explicit_bounds.clone(),
                                bucket_counts: dp.bucket_counts.clone(),
                            });
                        }
                        continue;
                    }
                    _ => continue,
                };
                for dp in dps {
                    let value = match dp.value {
                        Some(number_data_point::Value::AsInt(i)) => i,
                        Some(number_data_point::Value::AsDouble(d)) => d as i64,
                        None => continue,
                    };
                    points.push(ReceivedPoint {
                        resource: resource.clone(),
                        metric: m.name.clone(),
                        attributes: map(&dp.attributes),
                        value,
                        monotonic,
                    });
                }
            }
        }
    }
}

struct Grpc(Arc<Store>);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.add_metrics(&request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        self.0.add(&req, &req.encode_to_vec(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export(
    store: Arc<Store>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await?.to_bytes();
    if path == "/v1/metrics" {
        return Ok(match ExportMetricsServiceRequest::decode(body.as_ref()) {
            Ok(msg) => {
                store.add_metrics(&msg);
                let out = ExportMetricsServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec();
                Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::from(out)))
                    .unwrap()
            }
            Err(_) => Response::builder()
                .status(400)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        });
    }
    if path != "/v1/traces" {
        return Ok(Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(msg) => {
            store.add(&msg, &body, "http");
            let out = ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec();
            Ok(Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::from(out)))
                .unwrap())
        }
        Err(_) => Ok(Response::builder()
            .status(400)
            .body(Full::new(Bytes::new()))
            .unwrap()),
    }
}

/// A receiver listening on two loopback ports until dropped.
pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    store: Arc<Store>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start() -> Receiver {
        Self::start_with(Store::default(), None)
    }

    /// A receiver whose gRPC side listens on `grpc` (e.g. an endpoint that was down until now).
    pub fn start_at(grpc: SocketAddr) -> Receiver {
        Self::start_with(Store::default(), Some(grpc))
    }

    /// A receiver that only counts spans (for floods: memory stays flat).
    pub fn start_counting() -> Receiver {
        Self::start_with(
            Store {
                count_only: true,
                ..Store::default()
            },
            None,
        )
    }

    /// A counting receiver that keeps the spans whose `url.path` starts with `prefix` (one
    /// phase of a flood test, told apart by its paths).
    pub fn start_counting_keeping(prefix: &'static str) -> Receiver {
        Self::start_with(
            Store {
                count_only: true,
                keep_path_prefix: Some(prefix),
                ..Store::default()
            },
            None,
        )
    }

    /// Spans received so far by a counting receiver.
    pub fn counted(&self) -> u64 {
        self.store
            .counted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn start_with(store: Store, grpc_at: Option<SocketAddr>) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(store);
        let (grpc, http) = rt.block_on(async {
            let grpc_addr = grpc_at.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
            let grpc_listener = tokio::net::TcpListener::bind(grpc_addr).await.unwrap();
            let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            (grpc_listener, http_listener)
        });
        let grpc_addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let s = store.clone();
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Grpc(s.clone())))
                .add_service(MetricsServiceServer::new(Grpc(s)))
                .serve_with_incoming(incoming)
                .await;
        });
        let s = store.clone();
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = http.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| http_export(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Receiver {
            grpc: grpc_addr,
            http: http_addr,
            store,
            _rt: rt,
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store.spans.lock().unwrap().clone()
    }

    /// Every metric data point received so far.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.store.points.lock().unwrap().clone()
    }

    /// Every histogram data point received so far (each export repeats the cumulative ones).
    pub fn histograms(&self) -> Vec<ReceivedHistogram> {
        self.store.histograms.lock().unwrap().clone()
    }

    /// Every byte of every export request received.
    pub fn raw(&self) -> Vec<u8> {
        self.store.raw.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the received spans, or `timeout` passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if pred(&spans) || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
