//! RED metrics and the service graph, from every finished exchange of every protocol, before
//! any sampling: the OpenTelemetry semantic-convention duration histograms
//! (`http.server.request.duration`, `http.client.request.duration`,
//! `db.client.operation.duration`, `rpc.server.call.duration`, `rpc.client.call.duration`) with
//! `service.name` on every series, and the edges between services under the names Tempo and the
//! Collector's servicegraph connector use (`traces_service_graph_request_total`, ...).
//!
//! Aggregation is our own (`store.rs`): cumulative series, read by the Prometheus text on
//! `--metrics-addr` and `loupe top` (`prometheus.rs`) and pushed by the OTLP metrics export
//! (`export::otlp_metrics`). Every metric has a series limit (`--metrics-series`); beyond it new
//! series fold into one `otel.metric.overflow=true` series, as the OpenTelemetry SDKs do.

pub mod prometheus;
pub mod store;
mod tally;

use foldhash::{HashMap, HashMapExt};
use std::{
    hash::{BuildHasher, Hasher},
    sync::{Arc, Mutex},
};

use crate::trace::span::{SpanKind, SpanRecord, Value, same_text};
use store::{LabelValue, Labels, Store};

/// The conventions' advised bucket boundaries (seconds): HTTP and RPC durations.
pub const HTTP_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Database client operations.
pub const DB_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// Series per metric by default (the OpenTelemetry SDKs' default is 2000).
pub const DEFAULT_SERIES_LIMIT: usize = 2000;

/// How long a process's service name is reused before it is looked up again (Kubernetes
/// metadata may name a pod's process later than its first connection).
/// Judged against the spans' own end times: a clock read per span was 1.6% of the agent's CPU.
const NAME_TTL_NS: u64 = 10_000_000_000;

/// What the Prometheus side, `loupe top` and the OTLP export read.
pub type SharedStore = Arc<Mutex<Store>>;

/// The duration histograms, in `Store::metrics` order.
const HTTP_SERVER: usize = 0;
const HTTP_CLIENT: usize = 1;
const DB_CLIENT: usize = 2;
const RPC_SERVER: usize = 3;
const RPC_CLIENT: usize = 4;

fn metrics() -> Vec<store::Metric> {
    vec![
        Store::metric(
            "http.server.request.duration",
            "Duration of HTTP server requests.",
            &HTTP_BUCKETS,
        ),
        Store::metric(
            "http.client.request.duration",
            "Duration of HTTP client requests.",
            &HTTP_BUCKETS,
        ),
        Store::metric(
            "db.client.operation.duration",
            "Duration of database client operations.",
            &DB_BUCKETS,
        ),
        Store::metric(
            "rpc.server.call.duration",
            "Duration of RPC calls served.",
            &HTTP_BUCKETS,
        ),
        Store::metric(
            "rpc.client.call.duration",
            "Duration of RPC calls made.",
            &HTTP_BUCKETS,
        ),
    ]
}

/// The bucket boundaries of a histogram (as `metrics` gives them).
fn bounds(which: usize) -> &'static [f64] {
    if which == DB_CLIENT {
        &DB_BUCKETS
    } else {
        &HTTP_BUCKETS
    }
}

/// The label keys of each histogram after `service.name`, in `Store::metrics` order.
const RPC_KEYS: [&str; 6] = [
    "rpc.system.name",
    "rpc.method",
    "rpc.response.status_code",
    "error.type",
    "server.address",
    "server.port",
];
const HTTP_SERVER_KEYS: [&str; 6] = [
    "http.request.method",
    "http.response.status_code",
    "http.route",
    "url.scheme",
    "network.protocol.version",
    "error.type",
];
const HTTP_CLIENT_KEYS: [&str; 7] = [
    "http.request.method",
    "http.response.status_code",
    "server.address",
    "server.port",
    "url.scheme",
    "network.protocol.version",
    "error.type",
];
const DB_KEYS: [&str; 8] = [
    "db.system.name",
    "db.operation.name",
    "db.collection.name",
    "db.namespace",
    "db.response.status_code",
    "error.type",
    "server.address",
    "server.port",
];

/// The most label keys a histogram takes after `service.name` (the database one's).
const MAX_KEYS: usize = 8;

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
    store: SharedStore,
    hasher: foldhash::fast::RandomState,
    /// Service name per pid, with the span time it was looked up at.
    names: HashMap<u32, (Arc<str>, u64)>,
    processes: crate::process::SharedProcesses,
    /// Edges whose server side had not finished when the client's did: SERVER span -> the
    /// edge's hash and labels.
    awaiting_server: HashMap<[u8; 8], (u64, Labels)>,
    /// Duration measurements and edges not yet in `store`.
    tallies: tally::Tallies<tally::Key, store::Histogram>,
    edge_tallies: tally::Tallies<[u64; 3], store::Edge>,
}

impl Red {
    pub fn new(processes: crate::process::SharedProcesses, series_limit: usize) -> Self {
        Self {
            store: Arc::new(Mutex::new(Store::new(metrics(), series_limit))),
            hasher: Default::default(),
            names: HashMap::new(),
            processes,
            awaiting_server: HashMap::new(),
            tallies: tally::Tallies::new(),
            edge_tallies: tally::Tallies::new(),
        }
    }

    /// The store, with every measurement so far in it.
    pub fn store(&mut self) -> SharedStore {
        self.hand_over();
        self.store.clone()
    }

    /// Puts the measurements gathered since the last hand-over into the store, where its
    /// readers see them: after each batch of events.
    pub fn hand_over(&mut self) {
        if self.tallies.is_empty() && self.edge_tallies.is_empty() {
            return;
        }
        if let Ok(mut store) = self.store.lock() {
            self.tallies
                .hand_over(|t| tally::merge_histogram(&mut store, t));
            self.edge_tallies
                .hand_over(|t| tally::merge_edge(&mut store, t));
        }
    }

    /// The service name of a process, looked up at most every NAME_TTL_NS of span time
    /// (`now_ns`: the end of the span being counted).
    pub fn service(&mut self, pid: u32, comm: &str, now_ns: u64) -> Arc<str> {
        if let Some((name, at)) = self.names.get(&pid)
            && now_ns.saturating_sub(*at) < NAME_TTL_NS
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
        self.names.insert(pid, (name.clone(), now_ns));
        name
    }

    /// One finished exchange: its duration histogram.
    pub fn record(&mut self, span: &SpanRecord) {
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let server = span.kind == SpanKind::Server;
        let (which, keys): (usize, &[&'static str]) = if span.attr("rpc.system.name").is_some() {
            if server {
                (RPC_SERVER, &RPC_KEYS[..4])
            } else {
                (RPC_CLIENT, &RPC_KEYS)
            }
        } else if span.attr("http.request.method").is_some() {
            if server {
                (HTTP_SERVER, &HTTP_SERVER_KEYS)
            } else {
                (HTTP_CLIENT, &HTTP_CLIENT_KEYS)
            }
        } else if span.attr("db.system.name").is_some() && !server {
            (DB_CLIENT, &DB_KEYS)
        } else {
            return;
        };
        let service = self.service(span.pid, &span.comm, span.end_unix_ns);
        debug_assert!(keys.len() <= MAX_KEYS, "raise MAX_KEYS");
        // Each key looked up once, for the hash and the comparison alike.
        let mut values: [Option<&Value>; MAX_KEYS] = [None; MAX_KEYS];
        for (slot, key) in values.iter_mut().zip(keys) {
            *slot = span.attr(key);
        }
        let values = &values[..keys.len().min(MAX_KEYS)];
        let hash = || {
            let mut h = self.hasher.build_hasher();
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
            h.finish()
        };
        let present = || {
            keys.iter()
                .zip(values)
                .filter_map(|(k, v)| Some((*k, (*v)?)))
        };
        let same = |labels: &[(&'static str, LabelValue)]| {
            let mut want = present();
            labels.first().is_some_and(|(_, v)| same_str(v, &service))
                && labels[1..].iter().all(|(k, v)| {
                    want.next()
                        .is_some_and(|(wk, wv)| same_text(k, wk) && same_value(v, wv))
                })
                && want.next().is_none()
        };
        let labels = || {
            let mut l = Vec::with_capacity(keys.len() + 1);
            l.push(("service.name", LabelValue::Str(service.clone())));
            l.extend(present().map(|(k, v)| (k, label_value(v))));
            l.into_boxed_slice()
        };
        let bounds = bounds(which);
        if let Some(key) = tally::Key::of(which, &service, values)
            && let Some(t) = self.tallies.at(key, span.end_unix_ns, || {
                (which, hash(), labels(), store::Histogram::new(bounds))
            })
        {
            t.delta.record(bounds, seconds);
            return;
        }
        if let Ok(mut store) = self.store.lock() {
            store.record(which, hash(), same, labels, seconds, span.end_unix_ns);
        }
    }

    /// An edge of the service graph: a CLIENT span and who served it.
    pub fn edge(&mut self, client: &SpanRecord, server: Peer) {
        let now_ns = client.end_unix_ns;
        let client_service = self.service(client.pid, &client.comm, now_ns);
        let database = client.attr("db.system.name").is_some();
        let (server_name, connection_type, server_side): (Arc<str>, &'static str, _) = match server
        {
            Peer::Process(pid, span, seconds) => {
                (self.service(pid, "", now_ns), "", Some((span, seconds)))
            }
            Peer::Address(a) => (
                a.into(),
                if database { "database" } else { "virtual_node" },
                None,
            ),
        };
        let hash = || {
            let mut h = self.hasher.build_hasher();
            h.write(client_service.as_bytes());
            h.write_u8(0xff);
            h.write(server_name.as_bytes());
            h.write_u8(0xff);
            h.write(connection_type.as_bytes());
            h.finish()
        };
        let want = [
            client_service.as_ref(),
            server_name.as_ref(),
            connection_type,
        ];
        let same = |l: &[(&'static str, LabelValue)]| {
            l.len() == 3 && l.iter().zip(want).all(|((_, v), w)| same_str(v, w))
        };
        let labels = || -> Labels {
            Box::new([
                ("client", LabelValue::Str(client_service.clone())),
                ("server", LabelValue::Str(server_name.clone())),
                ("connection_type", LabelValue::Str(connection_type.into())),
            ])
        };
        let seconds = client.end_unix_ns.saturating_sub(client.start_unix_ns) as f64 / 1e9;
        // Tallied when the server is a process here: its name is the cached service name, the
        // same text span after span (an address is a text of the span's own).
        if server_side.is_some()
            && let Some(key) = tally::edge_key(&client_service, &server_name, connection_type)
            && let Some(t) = self
                .edge_tallies
                .at(key, now_ns, || (0, hash(), labels(), store::Edge::new()))
        {
            t.delta.requests += 1;
            t.delta.failed += u64::from(client.error.is_some());
            t.delta.client.record(store::EDGE_BOUNDS, seconds);
            match server_side {
                Some((_, Some(s))) => t.delta.server.record(store::EDGE_BOUNDS, s),
                Some((span, None)) => {
                    let waiting = (t.hash, t.labels.clone());
                    self.await_server(span, waiting);
                }
                None => {}
            }
            return;
        }
        let hash = hash();
        let Ok(mut store) = self.store.lock() else {
            return;
        };
        let edge = store.edge(hash, same, labels, client.end_unix_ns);
        edge.requests += 1;
        edge.failed += u64::from(client.error.is_some());
        edge.client.record(store::EDGE_BOUNDS, seconds);
        match server_side {
            Some((_, Some(s))) => edge.server.record(store::EDGE_BOUNDS, s),
            Some((span, None)) => {
                drop(store);
                self.await_server(span, (hash, labels()));
            }
            None => {}
        }
    }

    /// The edge `waiting` (its hash and labels) waits for SERVER span `span` to finish.
    fn await_server(&mut self, span: [u8; 8], waiting: (u64, Labels)) {
        if self.awaiting_server.len() >= 100_000 {
            self.awaiting_server.clear();
        }
        self.awaiting_server.insert(span, waiting);
    }

    /// A SERVER span finished; true when its caller's edge was waiting for its duration.
    pub fn server_done(&mut self, span_id: [u8; 8], seconds: f64) -> bool {
        let Some((hash, labels)) = self.awaiting_server.remove(&span_id) else {
            return false;
        };
        if let Ok(mut store) = self.store.lock() {
            let now = crate::clock::unix_ns();
            let edge = store.edge(hash, |l| *l == *labels, || labels.clone(), now);
            edge.server.record(store::EDGE_BOUNDS, seconds);
        }
        true
    }
}

fn same_str(v: &LabelValue, s: &str) -> bool {
    // A label's text is mostly the very text the span carries (a shared text, the cached
    // service name): the same pointer and length settle it before any byte is compared, and
    // a constant's copy (a method, a scheme) is compared in words.
    matches!(v, LabelValue::Str(x) if same_text(x, s))
}

fn same_value(v: &LabelValue, w: &Value) -> bool {
    match (v, w) {
        (LabelValue::Int(a), Value::Int(b)) => a == b,
        (_, Value::Int(_)) => false,
        (v, w) => same_str(v, w.as_str().unwrap_or_default()),
    }
}

fn label_value(v: &Value) -> LabelValue {
    match v {
        Value::Int(i) => LabelValue::Int(*i),
        Value::Shared(s) => LabelValue::Str(s.clone()),
        other => LabelValue::Str(other.as_str().unwrap_or_default().into()),
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
            name: format!("GET {route}").into(),
            kind,
            // Now: idle series are expired against the wall clock when rendered.
            start_unix_ns: crate::clock::unix_ns() - ms * 1_000_000,
            end_unix_ns: crate::clock::unix_ns(),
            attributes: vec![
                ("http.request.method", Value::Static("GET")),
                ("http.response.status_code", Value::Int(status)),
                ("http.route", Value::Str(route.to_string())),
                ("server.address", Value::Static("catalog.local")),
            ],
            error: (status >= 500).then(|| status.to_string()),
            status: Some(status.to_string().into()),
            pid,
            comm: comm.into(),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str, labels: &[&str]) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn tallied_and_direct_measurements_land_in_one_series() {
        let mut r = red(DEFAULT_SERIES_LIMIT);
        let route: Arc<str> = "/items/{id}".into();
        for i in 0..9 {
            let mut s = span(SpanKind::Server, CATALOG, 3, 200, &route);
            if i % 3 != 0 {
                // As the span builder makes it: the route a text many spans share.
                s.attributes[2].1 = Value::Shared(route.clone());
            }
            r.record(&s);
        }
        // Two texts of one content at two addresses: two tallies, one series.
        let mut s = span(SpanKind::Server, CATALOG, 3, 200, "/items/{id}");
        s.attributes[2].1 = Value::Shared("/items/{id}".into());
        r.record(&s);
        let text = prometheus::render(&r.store());
        let ok = ["http_route=\"/items/{id}\"", "le=\"0.005\""];
        let bucket = "http_server_request_duration_seconds_bucket";
        assert_eq!(line(&text, bucket, &ok), Some("10"), "{text}");
        assert_eq!(
            text.matches("http_server_request_duration_seconds_count")
                .count(),
            1
        );
    }

    #[test]
    fn each_histogram_tallies_with_its_own_buckets() {
        for (which, m) in metrics().iter().enumerate() {
            assert_eq!(bounds(which), m.bounds, "{}", m.name);
        }
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
        let text = prometheus::render(&r.store());
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
        let text = prometheus::render(&r.store());
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
        let text = prometheus::render(&r.store());
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
        let ago = |route: &str, seconds: u64| {
            let mut s = span(SpanKind::Server, CATALOG, 1, 200, route);
            s.start_unix_ns -= seconds * 1_000_000_000;
            s.end_unix_ns -= seconds * 1_000_000_000;
            s
        };
        let idle = prometheus::IDLE.as_secs();
        r.record(&ago("/old", idle + 60));
        r.record(&ago("/new", idle + 120));
        r.record(&ago("/new", idle - 60));
        let text = prometheus::render(&r.store());
        let count = "http_server_request_duration_seconds_count";
        assert_eq!(line(&text, count, &["/old"]), None, "{text}");
        assert_eq!(line(&text, count, &["/new"]), Some("2"), "{text}");
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
        let text = prometheus::render(&r.store());
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
