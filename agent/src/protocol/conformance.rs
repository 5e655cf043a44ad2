//! The suite every registered protocol passes, automatically: iterate `REGISTRY`, replay each of
//! the protocol's recorded fixtures split at every point, cut at every prefix, with a gap in
//! either direction, and feed it random bytes. No panic, the same result whatever the split,
//! bounded state, losses counted. A protocol registered without a harness arm below fails here.

use bytes::Bytes;
use proptest::prelude::*;

use super::{
    PROTO_HTTP1, PROTO_HTTP2, PROTO_MYSQL, PROTO_POSTGRES, PROTO_REDIS, REGISTRY, db, fixture,
    http2, sql,
};
use crate::{
    conn::Segment,
    protocol::http1::Head,
    trace::exchange::{self, Identity, RequestStart},
};

/// A protocol session driven the way the sink drives it.
trait Harness {
    fn feed(&mut self, client: bool, seg: Segment, ts: u64);
    /// Closes the connection; every exchange paired, described for comparison.
    fn finish(self: Box<Self>, ts: u64) -> Vec<String>;
    /// Bytes and requests held between calls.
    fn held(&self) -> (usize, usize);
    /// Stretches counted as malformed, orphan answers, unsolicited messages.
    fn counted(&self) -> u64;
}

struct Http1(exchange::Session, Vec<String>);

impl Harness for Http1 {
    fn feed(&mut self, client: bool, seg: Segment, ts: u64) {
        if client {
            self.0.on_requests(
                ts,
                1,
                &mut |_: &Head, _: RequestStart| Identity::unexported(),
                vec![seg],
            );
        } else {
            for e in self.0.on_responses(ts, vec![seg]) {
                self.1.push(describe_http(&e));
            }
        }
    }
    fn finish(mut self: Box<Self>, ts: u64) -> Vec<String> {
        for e in self.0.close(ts) {
            self.1.push(describe_http(&e));
        }
        self.1
    }
    fn held(&self) -> (usize, usize) {
        (0, self.0.waiting())
    }
    fn counted(&self) -> u64 {
        self.0.stats.malformed + self.0.stats.orphan_responses
    }
}

fn describe_http(e: &exchange::Exchange) -> String {
    format!(
        "{:?} {:?} {:?} {:?}",
        e.request.method(),
        e.request.target(),
        e.response.as_ref().and_then(Head::status),
        e.outcome
    )
}

struct Http2(http2::session::Session, Vec<String>);

impl Http2 {
    fn describe(&mut self, done: Vec<http2::session::H2Exchange>) {
        for x in done {
            let grpc = x.grpc.map(|g| (g.status, g.requests, g.responses));
            self.1.push(format!(
                "{} {} {grpc:?}",
                x.stream_id,
                describe_http(&x.exchange)
            ));
        }
    }
}

impl Harness for Http2 {
    fn feed(&mut self, client: bool, seg: Segment, ts: u64) {
        use http2::session::{REQUESTS, RESPONSES};
        let dir = if client { REQUESTS } else { RESPONSES };
        let done = self
            .0
            .on_bytes(dir, ts, 1, vec![seg], &mut |_: &Head, _: RequestStart| {
                Identity::unexported()
            });
        self.describe(done);
    }
    fn finish(mut self: Box<Self>, ts: u64) -> Vec<String> {
        let done = self.0.close(ts);
        self.describe(done);
        self.1
    }
    fn held(&self) -> (usize, usize) {
        (self.0.buffered(), self.0.open_streams())
    }
    fn counted(&self) -> u64 {
        let s = self.0.stats;
        s.hpack_errors + s.resyncs + s.orphan_responses + s.unknown_fields
    }
}

struct Db(db::Session, sql::Cache, Vec<String>);

impl Harness for Db {
    fn feed(&mut self, client: bool, seg: Segment, ts: u64) {
        if client {
            self.0.on_requests(
                ts,
                1,
                &mut self.1,
                &mut |_, _| Identity::unexported(),
                vec![seg],
            );
        } else {
            for e in self.0.on_responses(ts, vec![seg]) {
                self.2.push(format!("{:?}", fixture::seen(&e)));
            }
        }
    }
    fn finish(mut self: Box<Self>, ts: u64) -> Vec<String> {
        for e in self.0.close(ts) {
            self.2.push(format!("{:?}", fixture::seen(&e)));
        }
        self.2
    }
    fn held(&self) -> (usize, usize) {
        (self.0.parser.buffered(), self.0.waiting())
    }
    fn counted(&self) -> u64 {
        let s = self.0.stats;
        s.malformed + s.orphan_responses + s.unsolicited
    }
}

fn harness(id: u8, midstream: bool) -> Box<dyn Harness> {
    match id {
        PROTO_HTTP1 => Box::new(Http1(exchange::Session::new(midstream), Vec::new())),
        PROTO_HTTP2 => Box::new(Http2(http2::session::Session::new(midstream), Vec::new())),
        PROTO_POSTGRES | PROTO_MYSQL | PROTO_REDIS => {
            let parser = db::Parser::new(id, midstream, &db::DbOptions::default()).unwrap();
            Box::new(Db(
                db::Session::new(parser),
                sql::Cache::new(2048),
                Vec::new(),
            ))
        }
        _ => panic!(
            "protocol {} is registered but has no conformance harness: add it to conformance.rs",
            super::name(id)
        ),
    }
}

fn folder(id: u8) -> &'static str {
    match id {
        PROTO_HTTP1 => "http1",
        PROTO_HTTP2 => "http2",
        PROTO_POSTGRES => "postgres",
        PROTO_MYSQL => "mysql",
        PROTO_REDIS => "redis",
        _ => super::name(id),
    }
}

/// Bytes a session may hold between calls: the largest message prefix kept (64 KiB request
/// bodies) plus a header line, with room.
const HELD_BYTES_MAX: usize = 256 * 1024;

fn run(id: u8, midstream: bool, records: &[(bool, Segment)]) -> (Vec<String>, u64) {
    let mut h = harness(id, midstream);
    for (i, (client, seg)) in records.iter().enumerate() {
        h.feed(*client, seg.clone(), i as u64 + 1);
        let (bytes, waiting) = h.held();
        assert!(bytes <= HELD_BYTES_MAX, "{bytes} bytes held");
        assert!(waiting <= db::MAX_WAITING, "{waiting} requests waiting");
    }
    let counted = h.counted();
    (h.finish(records.len() as u64 + 1), counted)
}

fn data(b: &[u8]) -> Segment {
    Segment::Data(Bytes::copy_from_slice(b))
}

/// Split offsets tried in a record of `len` bytes: all for short ones, 48 spread for long ones.
fn split_points(len: usize) -> Vec<usize> {
    if len <= 96 {
        (1..len).collect()
    } else {
        let mut v: Vec<usize> = (1..48).map(|i| i * len / 48).collect();
        v.extend([1, 2, 3, 4, 5, len - 1]);
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn fixtures(id: u8) -> Vec<(String, Vec<fixture::Record>)> {
    fixture::all(folder(id))
        .into_iter()
        .map(|p| (p.display().to_string(), fixture::load(&p)))
        .collect()
}

#[test]
fn every_registered_protocol_has_recorded_fixtures() {
    for r in REGISTRY {
        assert!(
            !fixtures(r.id).is_empty(),
            "{}: no fixtures (cargo xtask record)",
            super::name(r.id)
        );
    }
}

#[test]
fn results_do_not_depend_on_where_reads_split() {
    for r in REGISTRY {
        for (name, records) in fixtures(r.id) {
            let whole = fixture::as_segments(&records);
            let (base, _) = run(r.id, false, &whole);
            assert!(!base.is_empty(), "{name}: nothing paired");
            for (i, (client, bytes)) in records.iter().enumerate() {
                for k in split_points(bytes.len()) {
                    let mut split = whole[..i].to_vec();
                    split.push((*client, data(&bytes[..k])));
                    split.push((*client, data(&bytes[k..])));
                    split.extend_from_slice(&whole[i + 1..]);
                    let (got, _) = run(r.id, false, &split);
                    // Timestamps follow segments, so compare what was paired, not when.
                    assert_eq!(got, base, "{name}: record {i} split at {k}");
                }
            }
        }
    }
}

#[test]
fn every_prefix_closes_cleanly() {
    for r in REGISTRY {
        for (name, records) in fixtures(r.id) {
            let whole = fixture::as_segments(&records);
            let (base, _) = run(r.id, false, &whole);
            for n in 0..=records.len() {
                let mut prefix = whole[..n].to_vec();
                if let Some((client, bytes)) = records.get(n) {
                    prefix.push((*client, data(&bytes[..bytes.len() / 2])));
                }
                let (got, _) = run(r.id, false, &prefix);
                assert!(got.len() <= base.len() + 1, "{name}: prefix {n}");
            }
        }
    }
}

#[test]
fn a_gap_in_either_direction_is_survived_and_counted() {
    for r in REGISTRY {
        for (name, records) in fixtures(r.id) {
            let whole = fixture::as_segments(&records);
            let (base, _) = run(r.id, false, &whole);
            let complete = |v: &[String]| {
                v.iter()
                    .filter(|s| !s.contains("complete: false") && !s.contains("Closed"))
                    .count()
            };
            for i in 0..records.len() {
                let mut gapped = whole.clone();
                gapped[i].1 = Segment::Gap(records[i].1.len() as u64);
                let (got, _) = run(r.id, false, &gapped);
                assert!(
                    got.len() <= base.len() + 1,
                    "{name}: gap at {i} made {} exchanges of {}",
                    got.len(),
                    base.len()
                );
                // A loss early on must not lose the rest of the connection: what follows resyncs.
                if i < records.len() / 4 && complete(&base) >= 6 {
                    assert!(
                        complete(&got) * 3 >= complete(&base),
                        "{name}: after a gap at {i} only {} of {} exchanges completed",
                        complete(&got),
                        complete(&base)
                    );
                }
            }
        }
    }
}

#[test]
fn joined_mid_stream_at_any_record_stays_bounded_and_resyncs() {
    for r in REGISTRY {
        for (name, records) in fixtures(r.id) {
            let whole = fixture::as_segments(&records);
            let (base, _) = run(r.id, false, &whole);
            // `run` checks the held bytes and waiting requests after every record.
            for start in 0..records.len() {
                run(r.id, true, &whole[start..]);
            }
            // Joined before anything was said, a parser that resyncs on message starts still
            // pairs most of the connection (what it cannot know: a startup or greeting).
            let (joined, _) = run(r.id, true, &whole);
            assert!(
                joined.len() * 2 >= base.len(),
                "{name}: joined at the start, only {} of {} exchanges",
                joined.len(),
                base.len()
            );
        }
    }
}

fn random_records() -> impl Strategy<Value = Vec<(bool, Vec<u8>)>> {
    let chunk = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        // Bytes that look like each protocol's framing, to get past the first checks.
        proptest::collection::vec(
            prop_oneof![
                Just(b'*'),
                Just(b'$'),
                Just(b'\r'),
                Just(b'\n'),
                Just(b'Q'),
                Just(b'Z'),
                Just(0u8),
                Just(0xfeu8),
                Just(0xffu8),
                Just(b'3'),
                any::<u8>()
            ],
            0..300
        ),
    ];
    proptest::collection::vec((any::<bool>(), chunk), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_detector_takes_any_bytes(records in random_records()) {
        for r in REGISTRY {
            for (requests, bytes) in &records {
                let _ = (r.detect)(bytes, *requests);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_or_grow_state(records in random_records(), midstream in any::<bool>(), gap_at in 0usize..40) {
        for r in REGISTRY {
            let mut segs: Vec<(bool, Segment)> = records.iter().map(|(c, b)| (*c, data(b))).collect();
            if gap_at < segs.len() {
                segs[gap_at].1 = Segment::Gap(1 + gap_at as u64 * 7);
            }
            run(r.id, midstream, &segs);
        }
    }
}
