//! Entry points for bad input, shared by the cargo-fuzz targets (`fuzz/`, nightly) and the
//! property tests (`tests` below, stable, in CI): whatever the bytes, these must not panic, and
//! what they keep must stay bounded.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::{
    clock::WallClock,
    conn::{ConnInfo, Pushed, Segment, Segments, stream::Stream},
    decode::{ConnKey, Role, decode},
    protocol::http1::{Head, MessageReader},
    trace::{
        causality::Linker,
        exchange::Session,
        span::{self, Redaction, SpanKind},
    },
};

/// Any bytes as one ring-buffer record.
pub fn decode_record(data: &[u8]) {
    let _ = decode(data);
}

/// Reads `data` as a script of segments: each step takes a control byte (bit 0: which
/// direction, bit 1: a gap instead of data, bits 2..: length), then that many bytes.
fn steps(data: &[u8]) -> impl Iterator<Item = (bool, Segment)> + '_ {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (&ctl, tail) = rest.split_first()?;
        let len = ((ctl >> 2) as usize + 1).min(tail.len().max(1));
        let requests = ctl & 1 == 0;
        if ctl & 2 != 0 {
            rest = tail;
            return Some((requests, Segment::Gap(len as u64 * 37)));
        }
        let (chunk, next) = tail.split_at(len.min(tail.len()));
        rest = next;
        Some((requests, Segment::Data(Bytes::copy_from_slice(chunk))))
    })
}

fn conn(role: Role, midstream: bool) -> ConnInfo {
    let a: SocketAddr = "127.0.0.1:8080".parse().expect("literal");
    let b: SocketAddr = "127.0.0.1:40000".parse().expect("literal");
    ConnInfo {
        key: ConnKey {
            sk: 1,
            generation: 1,
        },
        pid: 1,
        comm: "fuzz".into(),
        local: a,
        remote: b,
        role,
        protocol: 1,
        midstream,
        tls: false,
    }
}

/// Any bytes as both directions of an HTTP/1 connection, through pairing, identity assignment
/// and span building (attributes, templated route, redacted query, carried context).
pub fn http1_connection(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let midstream = mode & 1 != 0;
    let role = if mode & 2 != 0 {
        Role::Client
    } else {
        Role::Server
    };
    let info = conn(role, midstream);
    let mut session = Session::new(midstream);
    let mut linker = Linker::new(Box::new(crate::trace::span::RandomIds));
    let clock = WallClock::new();
    let redaction = Redaction::default();
    let mut done = Vec::new();
    for (ts, (requests, seg)) in (1u64..).zip(steps(data)) {
        if requests {
            let mut assign = |head: &Head, st| match role {
                Role::Client => linker.client_start(&info, head, st, None),
                _ => linker.server_start(&info, head, st, None),
            };
            session.on_requests(ts, 7, &mut assign, vec![seg]);
        } else {
            done.extend(session.on_responses(ts, vec![seg]));
        }
        // Bounded whatever the input: requests waiting for answers are capped.
        assert!(session.waiting() <= crate::trace::exchange::MAX_WAITING);
    }
    done.extend(session.expire(u64::MAX, 1));
    done.extend(session.close(u64::MAX));
    let kind = if role == Role::Client {
        SpanKind::Client
    } else {
        SpanKind::Server
    };
    for ex in &done {
        let _ = span::build(ex, &info, kind, &clock, &redaction);
    }
}

/// Any bytes as both directions of one connection through the tracing sink: user-space
/// detection over every registered protocol, the chosen protocol's parser and pairing,
/// causality and span building (database spans included: server spans on).
pub fn l7_connection(data: &[u8]) {
    use crate::{
        decode::{DataEvent, Direction},
        pipeline::Sink,
        protocol::db::DbOptions,
        trace::sink::TraceSink,
    };
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let role = if mode & 2 != 0 {
        Role::Client
    } else {
        Role::Server
    };
    let mut info = conn(role, mode & 1 != 0);
    // The kernel's hint, any value: user space must not trust it.
    info.protocol = mode >> 2;
    let (tx, mut rx) = crate::export::queue::span_queue(1024);
    let mut sink = TraceSink::new(
        tx,
        std::sync::Arc::new(crate::export::ExportStats::default()),
        Redaction::default(),
        1_000,
        crate::process::ProcessCache::shared(Vec::new(), true),
    );
    sink.databases(DbOptions {
        server_spans: true,
        ..DbOptions::default()
    });
    let requests_dir = if role == Role::Server {
        Direction::Recv
    } else {
        Direction::Send
    };
    for (ts, (requests, seg)) in (1u64..).zip(steps(data)) {
        let dir = match (requests, requests_dir) {
            (true, d) => d,
            (false, Direction::Recv) => Direction::Send,
            (false, Direction::Send) => Direction::Recv,
        };
        let ev = DataEvent {
            ts_ns: ts,
            tid: 7,
            direction: dir,
            ..DataEvent::for_tests(info.key)
        };
        sink.data(&info, &ev, dir, smallvec::smallvec![seg]);
        sink.batch_done();
        rx.take_ready();
    }
    sink.tick(u64::MAX);
    sink.closed(&info, None);
    sink.flush();
    rx.take_ready();
}

/// Any bytes as one direction of a stream, fed to the message reader directly (both the request
/// and the response reader, from the start and mid-stream).
pub fn http1_reader(data: &[u8]) {
    for mut reader in [
        MessageReader::requests(),
        MessageReader::responses(),
        MessageReader::resyncing(true),
        MessageReader::resyncing(false),
    ] {
        let mut out = Vec::new();
        for (_, seg) in steps(data) {
            reader.feed(seg, &mut |_| Some("GET".into()), &mut out);
            out.clear();
        }
        reader.close(&mut out);
    }
}

/// Any (seq, length, payload) events into stream reassembly: never panics, hands on at most
/// its cap of data per event, and accounts for every byte an event moved.
pub fn reassembly(data: &[u8]) {
    const CAP: usize = 4;
    let mut stream = Stream::new(CAP);
    for chunk in data.chunks(11) {
        if chunk.len() < 6 {
            break;
        }
        let seq = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as u64;
        let bytes = u16::from_le_bytes([chunk[4], chunk[5]]) as u32;
        let payload = Bytes::copy_from_slice(&chunk[6..]);
        let moved = u64::from(bytes).max(payload.len() as u64);
        let before = stream.end();
        let mut out = Segments::new();
        if let Pushed::Appended { lost } = stream.push(seq, bytes, payload, &mut out) {
            let data: usize = out
                .iter()
                .map(|s| match s {
                    Segment::Data(b) => b.len(),
                    Segment::Gap(_) => 0,
                })
                .sum();
            assert!(data <= CAP);
            assert_eq!(out.iter().map(Segment::len).sum::<u64>(), lost + moved);
            assert!(before.is_none_or(|b| b + lost == seq));
        } else {
            assert!(out.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte strings that look like HTTP/1 more often than random bytes would.
    fn http_like() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(b"GET /a/1?token=s3cr3t HTTP/1.1\r\n".to_vec()),
            Just(b"POST /x HTTP/1.1\r\n".to_vec()),
            Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
            Just(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
            Just(b"Content-Length: 5\r\n".to_vec()),
            Just(b"Content-Length: 99999999999999999999\r\n".to_vec()),
            Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
            Just(
                b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
                    .to_vec()
            ),
            Just(b"traceparent: 00-zz-\xff\r\n".to_vec()),
            Just(b"b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n".to_vec()),
            Just(b"uber-trace-id: 1:2:0:1\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
            Just(b"ffffffffffffffff\r\n".to_vec()),
            prop::collection::vec(any::<u8>(), 0..16),
        ];
        prop::collection::vec(token, 0..24).prop_map(|parts| parts.concat())
    }

    /// A script for `steps`: control bytes interleaved with HTTP-like chunks.
    fn script() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec((any::<u8>(), http_like()), 0..12).prop_map(|steps| {
            let mut out = vec![0u8];
            for (ctl, chunk) in steps {
                out.push(ctl);
                out.extend(chunk);
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_record_decodes_or_errs(data in prop::collection::vec(any::<u8>(), 0..400)) {
            decode_record(&data);
        }

        #[test]
        fn any_connection_bytes_pair_and_build_without_panic(data in script()) {
            http1_connection(&data);
        }

        #[test]
        fn random_connection_bytes_too(data in prop::collection::vec(any::<u8>(), 0..600)) {
            http1_connection(&data);
        }

        #[test]
        fn any_connection_bytes_through_detection_and_every_protocol(data in script()) {
            l7_connection(&data);
        }

        #[test]
        fn any_stream_feeds_the_reader(data in script()) {
            http1_reader(&data);
        }

        #[test]
        fn any_event_sequence_reassembles_within_the_cap(
            data in prop::collection::vec(any::<u8>(), 0..800)
        ) {
            reassembly(&data);
        }

        /// Splitting a well-formed exchange anywhere changes nothing: same requests, same
        /// outcomes.
        #[test]
        fn segmentation_does_not_change_what_is_parsed(cut_a in 1usize..60, cut_b in 1usize..60) {
            let req = b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
            let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n";
            let whole = run(&[req.as_slice()], &[resp.as_slice()]);
            let (a1, a2) = req.split_at(cut_a.min(req.len() - 1));
            let (b1, b2) = resp.split_at(cut_b.min(resp.len() - 1));
            let split = run(&[a1, a2], &[b1, b2]);
            prop_assert_eq!(whole, split);
        }

        /// Whatever the query, every value that leaves is the mask, and nothing is lost or
        /// invented: same number of parameters.
        #[test]
        fn query_values_are_always_redacted(q in "[A-Za-z0-9%+._~=&;-]{0,64}") {
            let out = crate::redact::query(&q);
            prop_assert_eq!(out.split(['&', ';']).count(), q.split(['&', ';']).count());
            for pair in out.split(['&', ';']) {
                if let Some((_, v)) = pair.split_once('=') {
                    prop_assert_eq!(v, crate::redact::MASK, "{} -> {}", q, out);
                }
            }
        }
    }

    fn run(requests: &[&[u8]], responses: &[&[u8]]) -> Vec<(String, Option<u16>)> {
        let info = conn(Role::Server, false);
        let mut session = Session::new(false);
        let mut linker = Linker::new(Box::new(crate::trace::span::RandomIds));
        let mut assign = |head: &Head, st| linker.server_start(&info, head, st, None);
        for r in requests {
            session.on_requests(
                1,
                1,
                &mut assign,
                vec![Segment::Data(Bytes::copy_from_slice(r))],
            );
        }
        let mut done = Vec::new();
        for r in responses {
            done.extend(session.on_responses(2, vec![Segment::Data(Bytes::copy_from_slice(r))]));
        }
        done.iter()
            .map(|e| {
                (
                    e.request.method().unwrap_or("").to_string(),
                    e.response.as_ref().and_then(|r| r.status()),
                )
            })
            .collect()
    }
}
