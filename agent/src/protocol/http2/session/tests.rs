//! Against Python's `h2` (tests/apps/h2_fixtures.py): gRPC unary, server streaming, a
//! trailers-only error, a cancelled call and a plain GET, interleaved on one connection.

use super::*;
use crate::trace::exchange::Identity;

fn writes() -> Vec<(usize, Vec<u8>)> {
    crate::protocol::fixture::named("http2", "grpc.bin")
        .into_iter()
        .map(|(client, bytes)| (if client { REQUESTS } else { RESPONSES }, bytes))
        .collect()
}

/// (stream, method, path, status, grpc status, request messages, response messages, outcome)
type Row = (
    u32,
    String,
    String,
    Option<u16>,
    Option<u32>,
    u64,
    u64,
    Outcome,
);

fn rows(done: &[H2Exchange]) -> Vec<Row> {
    let mut r: Vec<Row> = done
        .iter()
        .map(|x| {
            let request = &x.exchange.request;
            let (method, path) = (
                request.method().unwrap_or_default().to_string(),
                request.target().to_string(),
            );
            let g = x.grpc.clone().unwrap_or_default();
            (
                x.stream_id,
                method,
                path,
                x.exchange.response.as_ref().and_then(Head::status),
                g.status,
                g.requests,
                g.responses,
                x.exchange.outcome,
            )
        })
        .collect();
    r.sort_by_key(|r| r.0);
    r
}

fn feed(s: &mut Session, writes: &[(usize, Vec<u8>)], split: usize) -> Vec<H2Exchange> {
    let mut done = Vec::new();
    let mut assign = |_: &Head, _: RequestStart| Identity::unexported();
    for (i, (dir, bytes)) in writes.iter().enumerate() {
        // Each write arrives in pieces of `split` bytes, as reads may cut it anywhere.
        for piece in bytes.chunks(split.max(1)) {
            let seg = vec![Segment::Data(Bytes::copy_from_slice(piece))];
            done.extend(s.on_bytes(*dir, i as u64 * 10, 1, seg, &mut assign));
        }
    }
    done
}

fn expected() -> Vec<Row> {
    let s = String::from;
    vec![
        (
            1,
            s("POST"),
            s("/shop.v1.Orders/Get"),
            Some(200),
            Some(0),
            1,
            1,
            Outcome::Complete,
        ),
        (
            3,
            s("POST"),
            s("/shop.v1.Orders/Watch"),
            Some(200),
            Some(0),
            1,
            3,
            Outcome::Complete,
        ),
        (
            5,
            s("POST"),
            s("/shop.v1.Orders/Get"),
            Some(200),
            Some(5),
            1,
            0,
            Outcome::Complete,
        ),
        (
            7,
            s("GET"),
            s("/static/app.js?v=3"),
            Some(404),
            None,
            0,
            0,
            Outcome::Complete,
        ),
        (
            9,
            s("POST"),
            s("/shop.v1.Orders/Slow"),
            None,
            None,
            0,
            0,
            Outcome::Closed,
        ),
    ]
}

#[test]
fn a_connection_seen_from_its_start_pairs_every_stream() {
    for split in [1, 2, 7, 9, 64, 10_000] {
        let mut s = Session::new(false);
        let done = feed(&mut s, &writes(), split);
        assert_eq!(rows(&done), expected(), "split {split}");
        assert_eq!(s.open_streams(), 0);
        assert_eq!(s.stats.resets, 1);
        assert_eq!(
            s.stats.hpack_errors + s.stats.resyncs + s.stats.unknown_fields,
            0
        );
    }
    // What spans read, and nothing else: the credential was decoded and dropped.
    let done = feed(&mut Session::new(false), &writes(), 10_000);
    let first = &done
        .iter()
        .find(|x| x.stream_id == 1)
        .unwrap()
        .exchange
        .request;
    assert_eq!(first.header_str("host"), Some("orders:50051"));
    assert_eq!(
        first.header_str("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(first.header("authorization"), None);
    let error = done.iter().find(|x| x.stream_id == 5).unwrap();
    assert_eq!(
        error.grpc.as_ref().unwrap().message.as_deref(),
        Some("order not found")
    );
}

#[test]
fn joined_mid_stream_it_resyncs_and_decodes_nothing_wrong() {
    let all = writes();
    for skip in 1..all.len() {
        for cut in [0, 3, 11] {
            let mut rest = all[skip..].to_vec();
            // The first write is seen from `cut` bytes in (a read that began mid-frame).
            let first = &mut rest[0].1;
            first.drain(..cut.min(first.len()));
            let mut s = Session::new(true);
            let done = feed(&mut s, &rest, 10_000);
            for row in rows(&done) {
                let want = expected().into_iter().find(|e| e.0 == row.0).unwrap();
                // A stream whose request was seen is right in what it says; unknown header
                // values are missing, never wrong.
                if !row.2.is_empty() {
                    assert_eq!(row.2, want.2, "skip {skip} cut {cut}");
                }
                if row.3.is_some() {
                    assert_eq!(row.3, want.3, "skip {skip} cut {cut}");
                }
                if row.4.is_some() {
                    assert_eq!(row.4, want.4, "skip {skip} cut {cut}");
                }
            }
        }
    }
}

#[test]
fn gaps_inside_bodies_cost_nothing_and_gaps_in_frames_resync() {
    let all = writes();
    let mut s = Session::new(false);
    let mut assign = |_: &Head, _: RequestStart| Identity::unexported();
    let mut done = Vec::new();
    for (i, (dir, bytes)) in all.iter().enumerate() {
        let segs = vec![Segment::Data(Bytes::copy_from_slice(bytes))];
        done.extend(s.on_bytes(*dir, i as u64, 1, segs, &mut assign));
    }
    assert_eq!(done.len(), 5);
    // Garbage then a gap: the reader looks for the next frame instead of misreading.
    let mut s = Session::new(false);
    let junk = vec![
        Segment::Data(Bytes::from_static(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        )),
        Segment::Gap(100),
    ];
    assert!(s.on_bytes(REQUESTS, 0, 1, junk, &mut assign).is_empty());
    assert!(s.stats.resyncs >= 1);
    // Random bytes: never a panic, never unbounded state.
    let mut x: u32 = 7;
    for _ in 0..300 {
        let mut s = Session::new(x & 1 == 0);
        for _ in 0..20 {
            let block: Vec<u8> = (0..97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let dir = (x & 1) as usize;
            let _ = s.on_bytes(
                dir,
                0,
                1,
                vec![Segment::Data(Bytes::from(block))],
                &mut assign,
            );
        }
        assert!(s.open_streams() <= MAX_STREAMS);
    }
}

/// The bench's gRPC workload as recorded (`cargo xtask record grpc-h2load`): h2load's ten
/// concurrent unary calls at a time to the grpcio server, 200 in all, with h2load's unindexed
/// Huffman `:path` in every request and grpcio's spelled-out `grpc-message` in every trailer.
#[test]
fn h2loads_calls_to_grpcio_pair_every_stream() {
    let writes: Vec<(usize, Vec<u8>)> = crate::protocol::fixture::named("http2", "grpc-h2load.bin")
        .into_iter()
        .map(|(client, bytes)| (if client { REQUESTS } else { RESPONSES }, bytes))
        .collect();
    for split in [7, 10_000] {
        let mut s = Session::new(false);
        let done = feed(&mut s, &writes, split);
        let rows = rows(&done);
        assert_eq!(rows.len(), 200, "split {split}");
        for (i, row) in rows.iter().enumerate() {
            let want: Row = (
                2 * i as u32 + 1,
                "POST".into(),
                "/shop.v1.Orders/Ping".into(),
                Some(200),
                Some(0),
                1,
                1,
                Outcome::Complete,
            );
            assert_eq!(row, &want, "split {split}");
        }
        assert_eq!(s.open_streams(), 0);
        assert_eq!(
            s.stats.hpack_errors + s.stats.resyncs + s.stats.unknown_fields,
            0
        );
    }
}

/// A HEADERS frame ending its block and stream, its fields literals without indexing.
fn headers_frame(stream: u32, fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    }
    let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[0x01, 0x05]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend(block);
    frame
}

#[test]
fn request_heads_read_their_texts_where_they_lie_and_mend_what_is_not_utf8() {
    let mut requests = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let request = |stream, method: Option<&'static [u8]>, path: &'static [u8]| {
        let mut fields: Vec<(&str, &[u8])> = Vec::new();
        if let Some(m) = method {
            fields.push((":method", m));
        }
        fields.extend([
            (":scheme", &b"http"[..]),
            (":path", path),
            ("authorization", b"Bearer secret"),
            (":authority", b"shop.example:8443"),
            ("user-agent", b"grpc-go/1.60"),
        ]);
        headers_frame(stream, &fields)
    };
    requests.extend(request(1, Some(b"GET"), b"/orders?id=7"));
    requests.extend(request(3, Some(b"PURGE"), b"/caf\xe9"));
    requests.extend(request(5, None, b"/x"));
    let mut responses = Vec::new();
    for stream in [1, 3, 5] {
        responses.extend(headers_frame(stream, &[(":status", b"200")]));
    }
    let writes = [(REQUESTS, requests), (RESPONSES, responses)];
    let mut done = feed(&mut Session::new(false), &writes, 1 << 16);
    done.sort_by_key(|x| x.stream_id);
    let heads: Vec<_> = done
        .iter()
        .map(|x| {
            let r = &x.exchange.request;
            (
                r.method().unwrap_or_default().to_string(),
                r.target().to_string(),
                r.header_str("host").map(String::from),
                r.header_str("user-agent").map(String::from),
                r.header("authorization").is_some(),
            )
        })
        .collect();
    let host = Some("shop.example:8443".to_string());
    let agent = Some("grpc-go/1.60".to_string());
    assert_eq!(
        heads,
        [
            (
                "GET".into(),
                "/orders?id=7".into(),
                host.clone(),
                agent.clone(),
                false
            ),
            (
                "PURGE".into(),
                "/caf\u{fffd}".into(),
                host.clone(),
                agent.clone(),
                false
            ),
            ("_OTHER".into(), "/x".into(), host, agent, false),
        ]
    );
}
