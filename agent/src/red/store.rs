//! Where RED measurements are aggregated: cumulative histograms and service-graph edges, one
//! series per label set, read by the Prometheus text, `loupe top` and the OTLP metrics export.
//!
//! Our own rather than the OpenTelemetry SDK's: the SDK hashed every measurement's attribute
//! set with SipHash under a lock and updated a tracker per instrument, 17% of the agent's CPU
//! at saturation. Here a measurement is one foldhash of the values it is labelled with (computed
//! by the caller from borrowed span attributes, no `String` built), a comparison in full on a
//! hit, and a bucket increment; label sets are built only for a new series.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

/// A label's value: a string shared between the series that carry it, or an integer.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelValue {
    Str(Arc<str>),
    Int(i64),
}

impl std::fmt::Display for LabelValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelValue::Str(s) => f.write_str(s),
            LabelValue::Int(i) => write!(f, "{i}"),
        }
    }
}

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        LabelValue::Str(s.into())
    }
}

pub type Labels = Box<[(&'static str, LabelValue)]>;

/// The label set every metric's overflow series carries, as the OpenTelemetry SDKs name it.
pub const OVERFLOW: (&str, &str) = ("otel.metric.overflow", "true");

/// Per-bucket counts (not cumulative; the last one is +Inf), sum, count, min and max.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub counts: Box<[u64]>,
    pub sum: f64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
}

impl Histogram {
    pub(super) fn new(bounds: &[f64]) -> Self {
        Self {
            counts: vec![0; bounds.len() + 1].into(),
            sum: 0.0,
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    pub fn record(&mut self, bounds: &[f64], v: f64) {
        // Upper bounds are inclusive, as in OpenTelemetry and Prometheus.
        let i = bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds what `other` (of the same buckets) counted.
    pub fn merge(&mut self, other: &Histogram) {
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.sum += other.sum;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Back to no measurement.
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.sum = 0.0;
        self.count = 0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
    }
}

/// The overflow series of a table, made on first use.
fn overflow_series<T>(
    overflow: &mut Option<Series<T>>,
    data: impl FnOnce() -> T,
    now_ns: u64,
) -> &mut Series<T> {
    overflow.get_or_insert_with(|| {
        Series::new(
            Box::new([(OVERFLOW.0, LabelValue::Str(OVERFLOW.1.into()))]),
            data(),
            now_ns,
        )
    })
}

/// One service-graph edge: the four metrics Tempo's and the Collector's servicegraph name.
#[derive(Debug, Clone)]
pub struct Edge {
    pub requests: u64,
    pub failed: u64,
    pub client: Histogram,
    pub server: Histogram,
}

impl Edge {
    pub(super) fn new() -> Self {
        Self {
            requests: 0,
            failed: 0,
            client: Histogram::new(EDGE_BOUNDS),
            server: Histogram::new(EDGE_BOUNDS),
        }
    }

    /// Adds what `other` counted.
    pub fn merge(&mut self, other: &Edge) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.client.merge(&other.client);
        self.server.merge(&other.server);
    }

    /// Back to nothing counted.
    pub fn clear(&mut self) {
        self.requests = 0;
        self.failed = 0;
        self.client.clear();
        self.server.clear();
    }
}

pub struct Series<T> {
    pub labels: Labels,
    pub data: T,
    /// Wall-clock ns of the first measurement (OTLP's start time of a cumulative series).
    pub start_ns: u64,
    /// Wall-clock ns of the latest measurement.
    pub updated_ns: u64,
}

impl<T> Series<T> {
    fn new(labels: Labels, data: T, now_ns: u64) -> Self {
        Self {
            labels,
            data,
            start_ns: now_ns,
            updated_ns: now_ns,
        }
    }
}

/// The series of one metric (or of the edges): by the caller's hash of their label values,
/// a short list per hash for collisions, at most `limit` of them plus the overflow series.
pub struct Table<T> {
    by_hash: HashMap<u64, Vec<Series<T>>>,
    len: usize,
    overflow: Option<Series<T>>,
}

impl<T> Table<T> {
    fn new() -> Self {
        Self {
            by_hash: HashMap::new(),
            len: 0,
            overflow: None,
        }
    }

    /// The series with these labels (`same` compares a candidate's in full), created by
    /// `labels` and `data` when new (starting at `start_ns`), or the overflow series when
    /// `limit` series exist; measured until `now_ns`.
    #[allow(clippy::too_many_arguments)]
    pub fn series(
        &mut self,
        hash: u64,
        same: impl Fn(&[(&'static str, LabelValue)]) -> bool,
        labels: impl FnOnce() -> Labels,
        data: impl FnOnce() -> T,
        limit: usize,
        start_ns: u64,
        now_ns: u64,
    ) -> &mut T {
        use std::collections::hash_map::Entry;
        // One probe of the table per measurement (a lookup, then another to borrow the series
        // found, was two).
        let full = self.len >= limit;
        let series = match self.by_hash.entry(hash) {
            Entry::Occupied(chain) => {
                let chain = chain.into_mut();
                match chain.iter().position(|s| same(&s.labels)) {
                    Some(i) => &mut chain[i],
                    None if full => overflow_series(&mut self.overflow, data, start_ns),
                    None => {
                        self.len += 1;
                        chain.push(Series::new(labels(), data(), start_ns));
                        chain.last_mut().expect("just pushed")
                    }
                }
            }
            Entry::Vacant(_) if full => overflow_series(&mut self.overflow, data, start_ns),
            Entry::Vacant(slot) => {
                self.len += 1;
                &mut slot.insert(vec![Series::new(labels(), data(), start_ns)])[0]
            }
        };
        series.updated_ns = series.updated_ns.max(now_ns);
        &mut series.data
    }

    /// Every series, the overflow one last.
    pub fn iter(&self) -> impl Iterator<Item = &Series<T>> {
        self.by_hash.values().flatten().chain(self.overflow.iter())
    }

    /// Forgets the series not measured since `before_ns`; how many.
    fn expire(&mut self, before_ns: u64) -> u64 {
        let mut expired = 0;
        self.by_hash.retain(|_, chain| {
            chain.retain(|s| {
                let keep = s.updated_ns >= before_ns;
                expired += u64::from(!keep);
                keep
            });
            !chain.is_empty()
        });
        self.len -= expired as usize;
        if self
            .overflow
            .as_ref()
            .is_some_and(|s| s.updated_ns < before_ns)
        {
            self.overflow = None;
            expired += 1;
        }
        expired
    }
}

/// A duration histogram as the semantic conventions define it.
pub struct Metric {
    pub name: &'static str,
    pub description: &'static str,
    pub bounds: &'static [f64],
    pub table: Table<Histogram>,
}

/// Every RED series.
pub struct Store {
    pub metrics: Vec<Metric>,
    pub edges: Table<Edge>,
    /// Series per metric before the overflow series takes the rest.
    pub limit: usize,
    /// Series forgotten after IDLE without a measurement.
    pub expired: u64,
}

impl Store {
    pub fn new(metrics: Vec<Metric>, limit: usize) -> Self {
        Self {
            metrics,
            edges: Table::new(),
            limit: limit.max(1),
            expired: 0,
        }
    }

    pub fn metric(name: &'static str, description: &'static str, bounds: &'static [f64]) -> Metric {
        Metric {
            name,
            description,
            bounds,
            table: Table::new(),
        }
    }

    /// Records `seconds` in the series of metric `which` (see `Table::series`).
    pub fn record(
        &mut self,
        which: usize,
        hash: u64,
        same: impl Fn(&[(&'static str, LabelValue)]) -> bool,
        labels: impl FnOnce() -> Labels,
        seconds: f64,
        now_ns: u64,
    ) {
        let bounds = self.metrics[which].bounds;
        self.histogram(which, hash, same, labels, now_ns, now_ns)
            .record(bounds, seconds);
    }

    /// The histogram of metric `which` with these labels, measured from `start_ns` (when new)
    /// to `now_ns` (see `Table::series`).
    pub fn histogram(
        &mut self,
        which: usize,
        hash: u64,
        same: impl Fn(&[(&'static str, LabelValue)]) -> bool,
        labels: impl FnOnce() -> Labels,
        start_ns: u64,
        now_ns: u64,
    ) -> &mut Histogram {
        let m = &mut self.metrics[which];
        let bounds = m.bounds;
        m.table.series(
            hash,
            same,
            labels,
            || Histogram::new(bounds),
            self.limit,
            start_ns,
            now_ns,
        )
    }

    /// The edge with these labels.
    pub fn edge(
        &mut self,
        hash: u64,
        same: impl Fn(&[(&'static str, LabelValue)]) -> bool,
        labels: impl FnOnce() -> Labels,
        now_ns: u64,
    ) -> &mut Edge {
        self.edge_between(hash, same, labels, now_ns, now_ns)
    }

    /// The edge with these labels, measured from `start_ns` (when new) to `now_ns`.
    pub fn edge_between(
        &mut self,
        hash: u64,
        same: impl Fn(&[(&'static str, LabelValue)]) -> bool,
        labels: impl FnOnce() -> Labels,
        start_ns: u64,
        now_ns: u64,
    ) -> &mut Edge {
        self.edges
            .series(hash, same, labels, Edge::new, self.limit, start_ns, now_ns)
    }

    /// Forgets every series idle since `before_ns`.
    pub fn expire(&mut self, before_ns: u64) {
        let mut n = self.edges.expire(before_ns);
        for m in &mut self.metrics {
            n += m.table.expire(before_ns);
        }
        self.expired += n;
    }
}

/// The service graph's durations use the HTTP buckets.
pub const EDGE_BOUNDS: &[f64] = &super::HTTP_BUCKETS;

/// How one of the service graph's metrics reads an edge.
pub enum EdgeValue {
    Counter(fn(&Edge) -> u64),
    Histogram(fn(&Edge) -> &Histogram),
}

pub struct EdgeMetric {
    pub name: &'static str,
    pub description: &'static str,
    pub value: EdgeValue,
}

/// The metrics of every edge, under the names Tempo and the Collector's servicegraph use.
pub const EDGE_METRICS: [EdgeMetric; 4] = [
    EdgeMetric {
        name: "traces_service_graph_request_total",
        description: "Requests between two services (an edge of the service graph).",
        value: EdgeValue::Counter(|e| e.requests),
    },
    EdgeMetric {
        name: "traces_service_graph_request_failed_total",
        description: "Failed requests between two services.",
        value: EdgeValue::Counter(|e| e.failed),
    },
    EdgeMetric {
        name: "traces_service_graph_request_server_seconds",
        description: "Duration of requests between two services, seen by the server.",
        value: EdgeValue::Histogram(|e| &e.server),
    },
    EdgeMetric {
        name: "traces_service_graph_request_client_seconds",
        description: "Duration of requests between two services, seen by the client.",
        value: EdgeValue::Histogram(|e| &e.client),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: &str) -> Labels {
        Box::new([("k", LabelValue::Str(v.into()))])
    }

    #[test]
    fn bucket_bounds_are_inclusive_and_the_last_bucket_is_infinite() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 2.0, 9.0] {
            h.record(&[1.0, 2.0], v);
        }
        assert_eq!(&*h.counts, &[2, 2, 1]);
        assert_eq!((h.count, h.sum, h.min, h.max), (5, 14.0, 0.5, 9.0));
    }

    #[test]
    fn colliding_hashes_keep_their_series_apart_and_idle_ones_expire() {
        let mut s = Store::new(vec![Store::metric("m", "", &[1.0])], 10);
        // The same hash for two label sets: compared in full, two series.
        for (v, at) in [("a", 10), ("b", 20), ("a", 30)] {
            let same = |l: &[(&'static str, LabelValue)]| l == &*labels(v);
            s.record(0, 7, same, || labels(v), 0.5, at);
        }
        let series: Vec<_> = s.metrics[0].table.iter().collect();
        assert_eq!(series.len(), 2);
        let a = series.iter().find(|x| *x.labels == *labels("a")).unwrap();
        assert_eq!((a.data.count, a.start_ns, a.updated_ns), (2, 10, 30));
        s.expire(25);
        assert_eq!(s.expired, 1);
        assert_eq!(s.metrics[0].table.iter().count(), 1);
        // The freed place can be taken by a new series.
        s.record(0, 8, |_| false, || labels("c"), 0.5, 40);
        assert_eq!(s.metrics[0].table.len, 2);
    }
}
