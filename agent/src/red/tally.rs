//! Measurements gathered on the pipeline's thread between hand-overs, one tally per label set,
//! and merged into the shared store once per hand-over (`Sink::batch_done`, every few
//! milliseconds under load).
//!
//! Recorded straight into the store, each measurement hashed its label texts byte by byte,
//! took the store's lock, probed its table and compared the series' labels in full: about half
//! of RED's cost, 4-5% of the agent's CPU at saturation. A tally is found by the addresses of
//! the texts the span's label values are (constants, shared route and service names) and their
//! integers: words, compared as words. The store's readers (Prometheus, `loupe top`, the OTLP
//! metrics export) see a measurement one hand-over later.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use super::store::{Edge, Histogram, Labels, Store};
use crate::trace::span::Value;

/// Words of a key: the metric, the service name, then one per label value.
const WORDS: usize = 2 + super::MAX_KEYS;

/// A text as one word: its address (below 2^48: user space on x86-64 and arm64) with its
/// length (below 2^15) in the bits above; bit 63 clear. An integer from 0 to 2^62 has bit 63
/// set and bit 62 clear; an absent value has both. None for anything else (the caller
/// records into the store directly).
fn text_word(text: &str) -> Option<u64> {
    let (at, len) = (text.as_ptr() as u64, text.len() as u64);
    (at < 1 << 48 && len < 1 << 15).then_some(at | len << 48)
}
const INT: u64 = 1 << 63;
const ABSENT: u64 = 1 << 63 | 1 << 62;

fn value_word(value: Option<&Value>) -> Option<u64> {
    match value {
        None => Some(ABSENT),
        Some(Value::Int(n)) => (0..1 << 62).contains(n).then_some(INT | *n as u64),
        Some(Value::Static(s)) => text_word(s),
        Some(Value::Shared(s)) => text_word(s),
        // A text of the span's own (an error's description): its address says nothing once
        // it is freed.
        Some(Value::Str(_)) => None,
    }
}

/// A label set by identity: the address and length of each text, an integer's value, a word
/// each (80 bytes to hash and compare per measurement; two words per value were 144).
///
/// Two keys equal only when their label sets are equal: a text's address names its content
/// while the text lives, and the tally made for a key holds its label set, which holds every
/// shared text of the key (a constant lives for ever). Two keys of one label set (the same
/// text at two addresses) are two tallies merged into the same series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u64; WORDS]);

impl Key {
    /// None when a value has no identity to key by (see `value_word`).
    pub fn of(which: usize, service: &Arc<str>, values: &[Option<&Value>]) -> Option<Key> {
        let mut words = [0; WORDS];
        words[0] = which as u64;
        words[1] = text_word(service)?;
        for (slot, value) in words[2..].iter_mut().zip(values) {
            *slot = value_word(*value)?;
        }
        Some(Key(words))
    }
}

/// An edge of the service graph by identity: its client's and server's service names and its
/// connection type, a word each as in `Key`.
pub fn edge_key(
    client: &Arc<str>,
    server: &Arc<str>,
    connection_type: &'static str,
) -> Option<[u64; 3]> {
    Some([
        text_word(client)?,
        text_word(server)?,
        text_word(connection_type)?,
    ])
}

/// What a tally gathers: a histogram's measurements, an edge's requests.
pub trait Delta {
    fn is_empty(&self) -> bool;
    fn clear(&mut self);
}

impl Delta for Histogram {
    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn clear(&mut self) {
        Histogram::clear(self)
    }
}

impl Delta for Edge {
    fn is_empty(&self) -> bool {
        self.requests == 0 && self.server.count == 0
    }

    fn clear(&mut self) {
        Edge::clear(self)
    }
}

/// What one label set measured since the last hand-over.
pub struct Tally<D> {
    /// The metric (`Store::metrics` order).
    pub which: usize,
    /// The store's hash of the label values (by content), computed once.
    pub hash: u64,
    pub labels: Labels,
    pub delta: D,
    /// Span end times: of the first measurement since the hand-over (a new series starts
    /// there) and the latest.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Hand-overs in a row without a measurement.
    idle: u8,
}

/// Hand-overs a tally may stay idle before it is let go.
const IDLE_HAND_OVERS: u8 = 16;

/// Tallies kept at most: beyond, all are merged and let go (a burst of new label sets).
const MAX_TALLIES: usize = 4096;

pub struct Tallies<K, D> {
    by_key: HashMap<K, Tally<D>>,
    /// Tallies with measurements since the last hand-over.
    measured: usize,
}

impl<K: std::hash::Hash + Eq, D: Delta> Tallies<K, D> {
    pub fn new() -> Self {
        Self {
            by_key: HashMap::new(),
            measured: 0,
        }
    }

    /// Whether no measurement waits for a hand-over.
    pub fn is_empty(&self) -> bool {
        self.measured == 0
    }

    /// The tally of label set `key`, for a measurement at `now_ns`; `made` gives the metric,
    /// the store's hash, the label set and an empty delta when the key has none yet. None
    /// when `MAX_TALLIES` are kept: the caller measures into the store itself.
    pub fn at(
        &mut self,
        key: K,
        now_ns: u64,
        made: impl FnOnce() -> (usize, u64, Labels, D),
    ) -> Option<&mut Tally<D>> {
        use std::collections::hash_map::Entry;
        let full = self.by_key.len() >= MAX_TALLIES;
        let tally = match self.by_key.entry(key) {
            Entry::Occupied(t) => t.into_mut(),
            Entry::Vacant(_) if full => return None,
            Entry::Vacant(slot) => {
                let (which, hash, labels, delta) = made();
                slot.insert(Tally {
                    which,
                    hash,
                    labels,
                    delta,
                    first_ns: now_ns,
                    last_ns: now_ns,
                    idle: 0,
                })
            }
        };
        if tally.delta.is_empty() {
            self.measured += 1;
            tally.first_ns = now_ns;
            tally.last_ns = now_ns;
        }
        tally.last_ns = tally.last_ns.max(now_ns);
        Some(tally)
    }

    /// Hands each tally with measurements to `merge` (into the store), then empties it; lets
    /// go of the tallies idle too long, or of all when there are `MAX_TALLIES`.
    pub fn hand_over(&mut self, mut merge: impl FnMut(&Tally<D>)) {
        for t in self.by_key.values_mut() {
            if t.delta.is_empty() {
                t.idle = t.idle.saturating_add(1);
                continue;
            }
            t.idle = 0;
            merge(t);
            t.delta.clear();
        }
        self.measured = 0;
        if self.by_key.len() >= MAX_TALLIES {
            self.by_key.clear();
        } else {
            self.by_key.retain(|_, t| t.idle < IDLE_HAND_OVERS);
        }
    }
}

/// Merges a duration tally into its series.
pub fn merge_histogram(store: &mut Store, t: &Tally<Histogram>) {
    let labels = &t.labels;
    store
        .histogram(
            t.which,
            t.hash,
            |l| *l == **labels,
            || labels.clone(),
            t.first_ns,
            t.last_ns,
        )
        .merge(&t.delta);
}

/// Merges an edge tally into its edge.
pub fn merge_edge(store: &mut Store, t: &Tally<Edge>) {
    let labels = &t.labels;
    store
        .edge_between(
            t.hash,
            |l| *l == **labels,
            || labels.clone(),
            t.first_ns,
            t.last_ns,
        )
        .merge(&t.delta);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::red::store::LabelValue;

    fn store() -> Store {
        Store::new(vec![Store::metric("m", "", &crate::red::HTTP_BUCKETS)], 100)
    }

    fn labels(route: &str) -> Labels {
        Box::new([("http.route", LabelValue::Str(route.into()))])
    }

    #[test]
    fn keys_tell_label_sets_apart_by_every_value() {
        let service: Arc<str> = "svc".into();
        let other_service: Arc<str> = "svc".into();
        let route = Value::Shared("/a".into());
        let same_text_elsewhere = Value::Shared("/a".into());
        let get = Value::Static("GET");
        let key = |s: &Arc<str>, v: &[Option<&Value>]| Key::of(0, s, v);
        let base = key(&service, &[Some(&get), Some(&route), None]);
        assert!(base.is_some());
        assert_eq!(base, key(&service, &[Some(&get), Some(&route), None]));
        // Another text, even of the same content, is another key (merged into one series).
        assert_ne!(base, key(&other_service, &[Some(&get), Some(&route), None]));
        assert_ne!(
            base,
            key(&service, &[Some(&get), Some(&same_text_elsewhere), None])
        );
        // Absent is not an integer, nor a text; the metric is part of the key.
        assert_ne!(
            base,
            key(&service, &[Some(&get), Some(&route), Some(&Value::Int(0))])
        );
        assert_ne!(
            key(&service, &[Some(&Value::Int(200))]),
            key(&service, &[Some(&Value::Int(201))])
        );
        assert_ne!(
            base,
            Key::of(1, &service, &[Some(&get), Some(&route), None])
        );
        // A span's own text has no identity to key by, nor an integer out of the key's range.
        assert_eq!(key(&service, &[Some(&Value::Str("500".into()))]), None);
        assert_eq!(key(&service, &[Some(&Value::Int(-1))]), None);
        assert!(key(&service, &[Some(&Value::Int((1 << 62) - 1))]).is_some());
        // A text's length is part of its word: a prefix at the same address is another key.
        let long: &'static str = "GETX";
        assert_ne!(
            key(&service, &[Some(&Value::Static(long))]),
            key(&service, &[Some(&Value::Static(&long[..3]))])
        );
    }

    /// One duration measurement, as `Red::record` makes it.
    fn add(
        tallies: &mut Tallies<Key, Histogram>,
        key: Key,
        seconds: f64,
        at: u64,
        made: impl FnOnce() -> (u64, Labels),
    ) {
        let bounds = &crate::red::HTTP_BUCKETS;
        let t = tallies
            .at(key, at, || {
                let (hash, labels) = made();
                (0, hash, labels, Histogram::new(bounds))
            })
            .expect("room");
        t.delta.record(bounds, seconds);
    }

    #[test]
    fn a_hand_over_merges_counts_bounds_and_times_into_the_series() {
        let mut tallies = Tallies::new();
        let mut s = store();
        let service: Arc<str> = "svc".into();
        let route = Value::Shared("/a".into());
        let key = Key::of(0, &service, &[Some(&route)]).unwrap();
        let mut made = 0;
        for (seconds, at) in [(0.003, 50), (0.02, 40), (7.0, 60)] {
            add(&mut tallies, key, seconds, at, || {
                made += 1;
                (9, labels("/a"))
            });
        }
        assert_eq!(made, 1, "labels are made once per tally");
        assert!(!tallies.is_empty());
        assert_eq!(
            s.metrics[0].table.iter().count(),
            0,
            "nothing before the hand-over"
        );
        tallies.hand_over(|t| merge_histogram(&mut s, t));
        assert!(tallies.is_empty());
        add(&mut tallies, key, 0.004, 70, || unreachable!("kept"));
        tallies.hand_over(|t| merge_histogram(&mut s, t));
        let series: Vec<_> = s.metrics[0].table.iter().collect();
        assert_eq!(series.len(), 1);
        let h = &series[0].data;
        assert_eq!(h.count, 4);
        assert_eq!((h.counts[0], h.counts[2], h.counts[12]), (2, 1, 1));
        assert_eq!((h.min, h.max), (0.003, 7.0));
        assert!((h.sum - 7.027).abs() < 1e-12);
        // Started at the first measurement, updated at the latest.
        assert_eq!((series[0].start_ns, series[0].updated_ns), (50, 70));
    }

    #[test]
    fn an_edge_tally_adds_requests_failures_and_both_durations() {
        let mut tallies: Tallies<[u64; 3], Edge> = Tallies::new();
        let mut s = store();
        let (client, server): (Arc<str>, Arc<str>) = ("front".into(), "back".into());
        let key = edge_key(&client, &server, "").unwrap();
        assert_ne!(Some(key), edge_key(&server, &client, ""));
        assert_ne!(Some(key), edge_key(&client, &server, "database"));
        let bounds = crate::red::store::EDGE_BOUNDS;
        for (at, failed) in [(5, false), (6, true)] {
            let t = tallies
                .at(key, at, || {
                    let edge = Edge {
                        requests: 0,
                        failed: 0,
                        client: Histogram::new(bounds),
                        server: Histogram::new(bounds),
                    };
                    (0, 3, labels("e"), edge)
                })
                .unwrap();
            t.delta.requests += 1;
            t.delta.failed += u64::from(failed);
            t.delta.client.record(bounds, 0.02);
            t.delta.server.record(bounds, 0.01);
        }
        tallies.hand_over(|t| merge_edge(&mut s, t));
        assert!(tallies.is_empty());
        let edges: Vec<_> = s.edges.iter().collect();
        assert_eq!(edges.len(), 1);
        let e = &edges[0].data;
        assert_eq!(
            (e.requests, e.failed, e.client.count, e.server.count),
            (2, 1, 2, 2)
        );
        assert_eq!((edges[0].start_ns, edges[0].updated_ns), (5, 6));
    }

    #[test]
    fn idle_tallies_are_let_go() {
        let mut tallies = Tallies::new();
        let mut s = store();
        let service: Arc<str> = "svc".into();
        let key = Key::of(0, &service, &[]).unwrap();
        add(&mut tallies, key, 0.1, 1, || (1, labels("/")));
        for _ in 0..=IDLE_HAND_OVERS {
            tallies.hand_over(|t| merge_histogram(&mut s, t));
        }
        assert!(tallies.by_key.is_empty());
        assert_eq!(
            s.metrics[0].table.iter().next().map(|x| x.data.count),
            Some(1)
        );
    }
}
