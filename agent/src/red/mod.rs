//! RED metrics and the service graph, from every finished exchange of every protocol, before
//! any sampling: the OpenTelemetry semantic-convention duration histograms
//! (`http.server.request.duration`, `http.client.request.duration`,
//! `db.client.operation.duration`, `rpc.server.call.duration`, `rpc.client.call.duration`) with
//! `service.name` on every series, and the edges between services under the names Tempo and the
//! Collector's servicegraph connector use (`traces_service_graph_request_total`, ...).
//!
//! Aggregation is the OpenTelemetry metrics SDK's: one meter provider with a manual reader
//! (scraped for `--metrics-addr` and `loupe top`, see `prometheus.rs`) and, when an OTLP endpoint
//! is configured, a periodic OTLP reader. Every instrument has a series limit (`--metrics-series`
//! per metric); beyond it the SDK folds new series into one `otel.metric.overflow=true` series.

pub mod prometheus;

use foldhash::{HashMap, HashMapExt};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, MeterProvider as _},
};
use opentelemetry_sdk::metrics::{Instrument, ManualReader, SdkMeterProvider, Stream};

use crate::trace::span::{SpanKind, SpanRecord, Value};

/// The conventions' advised bucket boundaries (seconds): HTTP and RPC durations.
pub const HTTP_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Database client operations.
pub const DB_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// Series per metric by default (the SDK's own default is 2000).
pub const DEFAULT_SERIES_LIMIT: usize = 2000;

/// How long a process's service name is reused before it is looked up again (Kubernetes
/// metadata may name a pod's process later than its first connection).
const NAME_TTL: Duration = Duration::from_secs(10);

/// What the Prometheus side and `loupe top` read: the cumulative store over the manual
/// reader's deltas (`prometheus::Store`).
pub type SharedReader = Arc<std::sync::Mutex<prometheus::Store>>;

/// The manual reader as the provider holds it (the SDK takes readers by value).
#[derive(Debug, Clone)]
struct Scraped(Arc<ManualReader>);

impl opentelemetry_sdk::metrics::reader::MetricReader for Scraped {
    fn register_pipeline(&self, pipeline: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(
        &self,
        rm: &mut opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(
        &self,
        kind: opentelemetry_sdk::metrics::InstrumentKind,
    ) -> opentelemetry_sdk::metrics::Temporality {
        self.0.temporality(kind)
    }
}

struct Instruments {
    http_server: Histogram<f64>,
    http_client: Histogram<f64>,
    db_client: Histogram<f64>,
    rpc_server: Histogram<f64>,
    rpc_client: Histogram<f64>,
    graph_requests: Counter<u64>,
    graph_failed: Counter<u64>,
    graph_server_seconds: Histogram<f64>,
    graph_client_seconds: Histogram<f64>,
}

/// The process that handled a span, as the service graph names it.
pub enum Peer {
    /// A traced process on this node: its SERVER span, and that span's duration when it has
    /// finished (on loopback the caller may see the response before the callee's send is
    /// reported).
    Process(u32, [u8; 8], Option<f64>),
    /// Not traced here: its address (or host name when the request named one).
    Address(String),
}

pub struct Red {
    provider: SdkMeterProvider,
    reader: SharedReader,
    instruments: Instruments,
    names: HashMap<u32, (Arc<str>, Instant)>,
    processes: crate::process::SharedProcesses,
    /// Edges whose server side had not finished when the client's did: SERVER span -> labels.
    awaiting_server: HashMap<[u8; 8], Arc<[KeyValue]>>,
    /// Attribute sets already built, by a hash of their values: building a span's `KeyValue`s
    /// (a `String` each) cost more than the SDK's own series lookup.
    attribute_sets: AttributeSets,
}

/// Built attribute sets by the hash of what they were built from. A hash collision costs a
/// rebuild (the entry is compared in full before it is used), never a wrong series.
#[derive(Default)]
struct AttributeSets {
    state: foldhash::fast::RandomState,
    sets: HashMap<u64, Arc<[KeyValue]>>,
}

/// Distinct attribute sets kept; past it the cache starts over (series beyond the SDK's limit
/// are folded by the SDK anyway).
const MAX_ATTRIBUTE_SETS: usize = 16_384;

/// The most attribute keys an instrument takes (the database histogram's).
const MAX_KEYS: usize = 8;

impl AttributeSets {
    /// The set `[service.name, keys present in span...]` of instrument `which`.
    fn span(
        &mut self,
        which: u8,
        service: &str,
        keys: &[&'static str],
        span: &SpanRecord,
    ) -> Arc<[KeyValue]> {
        use std::hash::{BuildHasher, Hasher};
        debug_assert!(keys.len() <= MAX_KEYS, "raise MAX_KEYS");
        // Each key looked up once, for the hash and the comparison alike.
        let mut values: [Option<&Value>; MAX_KEYS] = [None; MAX_KEYS];
        for (slot, key) in values.iter_mut().zip(keys) {
            *slot = span.attr(key);
        }
        let values = &values[..keys.len().min(MAX_KEYS)];
        let mut h = self.state.build_hasher();
        h.write_u8(which);
        h.write(service.as_bytes());
        for v in values {
            match v {
                None => h.write_u8(0),
                Some(Value::Int(i)) => {
                    h.write_u8(1);
                    h.write_i64(*i);
                }
                Some(v) => {
                    h.write_u8(2);
                    h.write(v.as_str().unwrap_or_default().as_bytes());
                    h.write_u8(0xff);
                }
            }
        }
        let hash = h.finish();
        let present = || {
            keys.iter()
                .zip(values)
                .filter_map(|(k, v)| Some((*k, (*v)?)))
        };
        if let Some(set) = self.sets.get(&hash) {
            let mut want = present();
            let same = set.first().is_some_and(|kv| same_str(&kv.value, service))
                && set[1..].iter().all(|kv| {
                    want.next()
                        .is_some_and(|(k, v)| kv.key.as_str() == k && same_value(&kv.value, v))
                })
                && want.next().is_none();
            if same {
                return set.clone();
            }
        }
        let mut attrs = Vec::with_capacity(keys.len() + 1);
        attrs.push(KeyValue::new("service.name", service.to_string()));
        attrs.extend(present().map(|(k, v)| KeyValue::new(k, value(v))));
        self.insert(hash, attrs.into())
    }

    /// A service-graph edge's `[client, server, connection_type]`.
    fn edge(
        &mut self,
        client: &str,
        server: &str,
        connection_type: &'static str,
    ) -> Arc<[KeyValue]> {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.state.build_hasher();
        h.write_u8(0xe0);
        h.write(client.as_bytes());
        h.write_u8(0xff);
        h.write(server.as_bytes());
        h.write_u8(0xff);
        h.write(connection_type.as_bytes());
        let hash = h.finish();
        if let Some(set) = self.sets.get(&hash)
            && set.len() == 3
            && set[0].key.as_str() == "client"
            && same_str(&set[0].value, client)
            && same_str(&set[1].value, server)
            && same_str(&set[2].value, connection_type)
        {
            return set.clone();
        }
        let attrs: Arc<[KeyValue]> = Arc::new([
            KeyValue::new("client", client.to_string()),
            KeyValue::new("server", server.to_string()),
            KeyValue::new("connection_type", connection_type),
        ]);
        self.insert(hash, attrs)
    }

    fn insert(&mut self, hash: u64, set: Arc<[KeyValue]>) -> Arc<[KeyValue]> {
        if self.sets.len() >= MAX_ATTRIBUTE_SETS {
            self.sets.clear();
        }
        self.sets.insert(hash, set.clone());
        set
    }
}

fn same_str(v: &opentelemetry::Value, s: &str) -> bool {
    matches!(v, opentelemetry::Value::String(x) if x.as_str() == s)
}

fn same_value(v: &opentelemetry::Value, w: &Value) -> bool {
    match (v, w) {
        (opentelemetry::Value::I64(a), Value::Int(b)) => a == b,
        (_, Value::Int(_)) => false,
        (v, w) => same_str(v, w.as_str().unwrap_or_default()),
    }
}

impl Red {
    /// `otlp`: the periodic OTLP reader, when metrics go to an endpoint.
    pub fn new(
        processes: crate::process::SharedProcesses,
        series_limit: usize,
        host_name: &str,
        otlp: Option<
            opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader<
                opentelemetry_otlp::MetricExporter,
            >,
        >,
    ) -> Self {
        // Deltas: the store adds them up and can forget idle series, which the SDK's cumulative
        // state never does.
        let manual = Arc::new(
            ManualReader::builder()
                .with_temporality(opentelemetry_sdk::metrics::Temporality::Delta)
                .build(),
        );
        let limit = series_limit.max(1);
        let reader: SharedReader = Arc::new(std::sync::Mutex::new(prometheus::Store::new(
            manual.clone(),
            limit,
        )));
        let mut builder = SdkMeterProvider::builder()
            .with_reader(Scraped(manual))
            .with_view(move |_: &Instrument| {
                Stream::builder()
                    .with_cardinality_limit(limit + 1)
                    .build()
                    .ok()
            })
            .with_resource(crate::export::otlp_metrics::agent_resource(host_name));
        if let Some(r) = otlp {
            builder = builder.with_reader(r);
        }
        let provider = builder.build();
        let meter = provider.meter("loupe.red");
        let histogram = |name: &'static str, help: &'static str, buckets: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(help)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        let instruments = Instruments {
            http_server: histogram(
                "http.server.request.duration",
                "Duration of HTTP server requests.",
                &HTTP_BUCKETS,
            ),
            http_client: histogram(
                "http.client.request.duration",
                "Duration of HTTP client requests.",
                &HTTP_BUCKETS,
            ),
            db_client: histogram(
                "db.client.operation.duration",
                "Duration of database client operations.",
                &DB_BUCKETS,
            ),
            rpc_server: histogram(
                "rpc.server.call.duration",
                "Duration of RPC calls served.",
                &HTTP_BUCKETS,
            ),
            rpc_client: histogram(
                "rpc.client.call.duration",
                "Duration of RPC calls made.",
                &HTTP_BUCKETS,
            ),
            graph_requests: meter
                .u64_counter("traces_service_graph_request_total")
                .with_description("Requests between two services (an edge of the service graph).")
                .build(),
            graph_failed: meter
                .u64_counter("traces_service_graph_request_failed_total")
                .with_description("Failed requests between two services.")
                .build(),
            graph_server_seconds: histogram(
                "traces_service_graph_request_server_seconds",
                "Duration of requests between two services, seen by the server.",
                &HTTP_BUCKETS,
            ),
            graph_client_seconds: histogram(
                "traces_service_graph_request_client_seconds",
                "Duration of requests between two services, seen by the client.",
                &HTTP_BUCKETS,
            ),
        };
        Self {
            provider,
            reader,
            instruments,
            names: HashMap::new(),
            processes,
            awaiting_server: HashMap::new(),
            attribute_sets: AttributeSets::default(),
        }
    }

    pub fn reader(&self) -> SharedReader {
        self.reader.clone()
    }

    /// The service name of a process, looked up at most every NAME_TTL.
    pub fn service(&mut self, pid: u32, comm: &str) -> Arc<str> {
        if let Some((name, at)) = self.names.get(&pid)
            && at.elapsed() < NAME_TTL
        {
            return name.clone();
        }
        let name: Arc<str> = match self.processes.lock() {
            Ok(mut p) => p.resolve(pid, comm).service_name.into(),
            Err(_) => comm.into(),
        };
        if self.names.len() > 100_000 {
            self.names.clear();
        }
        self.names.insert(pid, (name.clone(), Instant::now()));
        name
    }

    /// One finished exchange: its duration histogram.
    pub fn record(&mut self, span: &SpanRecord) {
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let service = self.service(span.pid, &span.comm);
        let server = span.kind == SpanKind::Server;
        // `which` tells instruments apart in the attribute-set cache: RPC server and client
        // share their first keys.
        let (instrument, keys, which): (&Histogram<f64>, &[&'static str], u8) =
            if span.attr("rpc.system.name").is_some() {
                let keys: &[&str] = &[
                    "rpc.system.name",
                    "rpc.method",
                    "rpc.response.status_code",
                    "error.type",
                    "server.address",
                    "server.port",
                ];
                if server {
                    (&self.instruments.rpc_server, &keys[..4], 0)
                } else {
                    (&self.instruments.rpc_client, keys, 1)
                }
            } else if span.attr("http.request.method").is_some() {
                if server {
                    (
                        &self.instruments.http_server,
                        &[
                            "http.request.method",
                            "http.response.status_code",
                            "http.route",
                            "url.scheme",
                            "network.protocol.version",
                            "error.type",
                        ],
                        2,
                    )
                } else {
                    (
                        &self.instruments.http_client,
                        &[
                            "http.request.method",
                            "http.response.status_code",
                            "server.address",
                            "server.port",
                            "url.scheme",
                            "network.protocol.version",
                            "error.type",
                        ],
                        3,
                    )
                }
            } else if span.attr("db.system.name").is_some() && !server {
                (
                    &self.instruments.db_client,
                    &[
                        "db.system.name",
                        "db.operation.name",
                        "db.collection.name",
                        "db.namespace",
                        "db.response.status_code",
                        "error.type",
                        "server.address",
                        "server.port",
                    ],
                    4,
                )
            } else {
                return;
            };
        let attrs = self.attribute_sets.span(which, &service, keys, span);
        instrument.record(seconds, &attrs);
    }

    /// An edge of the service graph: a CLIENT span and who served it.
    pub fn edge(&mut self, client: &SpanRecord, server: Peer) {
        let client_service = self.service(client.pid, &client.comm);
        let database = client.attr("db.system.name").is_some();
        let (server_name, connection_type, server_side): (Arc<str>, &'static str, _) = match server
        {
            Peer::Process(pid, span, seconds) => (self.service(pid, ""), "", Some((span, seconds))),
            Peer::Address(a) => (
                a.into(),
                if database { "database" } else { "virtual_node" },
                None,
            ),
        };
        let attrs = self
            .attribute_sets
            .edge(&client_service, &server_name, connection_type);
        let i = &self.instruments;
        i.graph_requests.add(1, &attrs);
        if client.error.is_some() {
            i.graph_failed.add(1, &attrs);
        }
        let seconds = client.end_unix_ns.saturating_sub(client.start_unix_ns) as f64 / 1e9;
        i.graph_client_seconds.record(seconds, &attrs);
        match server_side {
            Some((_, Some(s))) => i.graph_server_seconds.record(s, &attrs),
            Some((span, None)) => {
                if self.awaiting_server.len() >= 100_000 {
                    self.awaiting_server.clear();
                }
                self.awaiting_server.insert(span, attrs);
            }
            None => {}
        }
    }

    /// A SERVER span finished; true when its caller's edge was waiting for its duration.
    pub fn server_done(&mut self, span_id: [u8; 8], seconds: f64) -> bool {
        match self.awaiting_server.remove(&span_id) {
            Some(attrs) => {
                self.instruments
                    .graph_server_seconds
                    .record(seconds, &attrs);
                true
            }
            None => false,
        }
    }

    /// The provider, to export what is left at exit (`export::otlp_metrics::shutdown`).
    pub fn provider(&self) -> SdkMeterProvider {
        self.provider.clone()
    }
}

fn value(v: &Value) -> opentelemetry::Value {
    match v {
        Value::Int(i) => (*i).into(),
        other => other.as_str().unwrap_or_default().to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Above any pid_max: the service name is the command name given.
    const FRONTEND: u32 = 4_194_304 + 1;
    const CATALOG: u32 = 4_194_304 + 2;

    fn red(limit: usize) -> Red {
        Red::new(
            crate::process::ProcessCache::shared(Vec::new(), true),
            limit,
            "node-1",
            None,
        )
    }

    fn span(kind: SpanKind, pid: u32, ms: u64, status: i64, route: &str) -> SpanRecord {
        let comm = if pid == FRONTEND {
            "frontend"
        } else {
            "catalog"
        };
        SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            name: format!("GET {route}"),
            kind,
            start_unix_ns: 1_000_000_000,
            end_unix_ns: 1_000_000_000 + ms * 1_000_000,
            attributes: vec![
                ("http.request.method", Value::Static("GET")),
                ("http.response.status_code", Value::Int(status)),
                ("http.route", Value::Str(route.to_string())),
                ("server.address", Value::Static("catalog.local")),
            ],
            error: (status >= 500).then(|| status.to_string()),
            status: Some(status.to_string()),
            pid,
            comm: comm.to_string(),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str, labels: &[&str]) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn counts_equal_the_requests_and_land_in_their_buckets() {
        let mut r = red(DEFAULT_SERIES_LIMIT);
        for _ in 0..7 {
            r.record(&span(SpanKind::Server, CATALOG, 3, 200, "/items/{id}"));
        }
        for _ in 0..2 {
            r.record(&span(SpanKind::Server, CATALOG, 20, 500, "/items/{id}"));
        }
        r.record(&span(SpanKind::Server, CATALOG, 600, 200, "/slow"));
        let text = prometheus::render(&r.reader());
        let ok = [
            "service_name=\"catalog\"",
            "http_response_status_code=\"200\"",
            "http_route=\"/items/{id}\"",
        ];
        let count = "http_server_request_duration_seconds_count";
        assert_eq!(line(&text, count, &ok), Some("7"), "{text}");
        let failed = ["http_response_status_code=\"500\""];
        assert_eq!(line(&text, count, &failed), Some("2"), "{text}");
        let bucket = "http_server_request_duration_seconds_bucket";
        let at = |labels: &[&str], le: &str| {
            let mut l = labels.to_vec();
            let le = format!("le=\"{le}\"");
            l.push(&le);
            line(&text, bucket, &l).map(str::to_string)
        };
        assert_eq!(at(&ok, "0.005").as_deref(), Some("7"));
        assert_eq!(at(&failed, "0.01").as_deref(), Some("0"));
        assert_eq!(at(&failed, "0.025").as_deref(), Some("2"));
        let slow = ["http_route=\"/slow\""];
        assert_eq!(at(&slow, "0.5").as_deref(), Some("0"));
        assert_eq!(at(&slow, "0.75").as_deref(), Some("1"));
        assert_eq!(at(&slow, "+Inf").as_deref(), Some("1"));
    }

    #[test]
    fn series_beyond_the_limit_fold_into_the_overflow_series() {
        let mut r = red(3);
        for i in 0..10 {
            r.record(&span(SpanKind::Server, CATALOG, 1, 200, &format!("/r{i}")));
        }
        let text = prometheus::render(&r.reader());
        let count = "http_server_request_duration_seconds_count";
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with(count)).collect();
        // Three series as recorded, then one more for everything beyond.
        assert_eq!(series.len(), 4, "{text}");
        let overflow = line(&text, count, &["otel_metric_overflow=\"true\""]);
        assert_eq!(overflow, Some("7"), "{text}");
    }

    #[test]
    fn database_calls_have_their_own_histogram_and_buckets() {
        let mut r = red(DEFAULT_SERIES_LIMIT);
        let mut db = span(SpanKind::Client, FRONTEND, 2, 0, "");
        db.attributes = vec![
            ("db.system.name", Value::Static("postgresql")),
            ("db.operation.name", Value::Static("SELECT")),
            ("db.collection.name", Value::Str("items".into())),
            (
                "db.query.text",
                Value::Str("SELECT * FROM items WHERE id = $1".into()),
            ),
        ];
        db.error = None;
        r.record(&db);
        // The database's own side feeds nothing (unless it is a CLIENT).
        let mut own = db.clone();
        own.kind = SpanKind::Server;
        r.record(&own);
        let text = prometheus::render(&r.reader());
        let count = "db_client_operation_duration_seconds_count";
        let labels = [
            "db_system_name=\"postgresql\"",
            "db_operation_name=\"SELECT\"",
            "db_collection_name=\"items\"",
            "service_name=\"frontend\"",
        ];
        assert_eq!(line(&text, count, &labels), Some("1"), "{text}");
        // Never the query text: it is not an attribute of the metric.
        assert!(!text.contains("db_query_text"), "{text}");
        let bucket = "db_client_operation_duration_seconds_bucket";
        assert_eq!(line(&text, bucket, &["le=\"0.001\""]), Some("0"));
        assert_eq!(line(&text, bucket, &["le=\"0.005\""]), Some("1"));
    }

    #[test]
    fn idle_series_expire_and_busy_ones_accumulate() {
        let mut r = red(DEFAULT_SERIES_LIMIT);
        r.record(&span(SpanKind::Server, CATALOG, 1, 200, "/old"));
        let store = r.reader();
        let start = Instant::now();
        store.lock().unwrap().update(start);
        let later = start + prometheus::IDLE - Duration::from_secs(1);
        r.record(&span(SpanKind::Server, CATALOG, 1, 200, "/new"));
        r.record(&span(SpanKind::Server, CATALOG, 1, 200, "/new"));
        store.lock().unwrap().update(later);
        // Past the idle time of /old only.
        let mut s = store.lock().unwrap();
        s.update(start + prometheus::IDLE + Duration::from_secs(1));
        let text = s.text();
        let count = "http_server_request_duration_seconds_count";
        assert_eq!(line(&text, count, &["/old"]), None, "{text}");
        assert_eq!(line(&text, count, &["/new"]), Some("2"), "{text}");
        assert_eq!(s.expired, 1);
        assert!(text.contains("loupe_red_series_expired_total 1"), "{text}");
    }

    #[test]
    fn edges_name_both_services_or_the_untraced_peer() {
        let mut r = red(DEFAULT_SERIES_LIMIT);
        // The callee's own span named it first (it finishes before its caller's).
        r.record(&span(SpanKind::Server, CATALOG, 4, 200, "/items/{id}"));
        for status in [200, 200, 503] {
            let c = span(SpanKind::Client, FRONTEND, 5, status, "/items/1");
            r.edge(&c, Peer::Process(CATALOG, [9; 8], Some(0.004)));
        }
        // The server's side finishing after its caller's still counts once.
        let c = span(SpanKind::Client, FRONTEND, 5, 200, "/items/2");
        r.edge(&c, Peer::Process(CATALOG, [8; 8], None));
        assert!(r.server_done([8; 8], 0.004));
        assert!(!r.server_done([8; 8], 0.004));
        let c = span(SpanKind::Client, FRONTEND, 5, 200, "/x");
        r.edge(&c, Peer::Address("payments.example:443".into()));
        let text = prometheus::render(&r.reader());
        let edge = [
            "client=\"frontend\"",
            "server=\"catalog\"",
            "connection_type=\"\"",
        ];
        assert_eq!(
            line(&text, "traces_service_graph_request_total", &edge),
            Some("4"),
            "{text}"
        );
        assert_eq!(
            line(&text, "traces_service_graph_request_failed_total", &edge),
            Some("1")
        );
        assert_eq!(
            line(
                &text,
                "traces_service_graph_request_server_seconds_count",
                &edge
            ),
            Some("4")
        );
        let virt = [
            "server=\"payments.example:443\"",
            "connection_type=\"virtual_node\"",
        ];
        assert_eq!(
            line(&text, "traces_service_graph_request_total", &virt),
            Some("1")
        );
        assert_eq!(
            line(
                &text,
                "traces_service_graph_request_server_seconds_count",
                &virt
            ),
            None
        );
    }
}
