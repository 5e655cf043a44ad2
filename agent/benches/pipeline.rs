//! The userspace path one event takes, without the kernel or the exporter: decode a ring-buffer
//! record -> connection table and reassembly -> HTTP/1 parsing and pairing -> span building.
//! Reported as events per second on one core (`cargo xtask bench` runs it too). The `sink`
//! cases take the daemon's own path instead: the tracing sink, with user-space protocol
//! detection, dispatch and causality, for HTTP/1, for Redis and for gRPC unary calls; `sink/http1_otlp_red` adds
//! what `loupe run` does with every span by default besides (OTLP encoding, RED metrics).

use agent_common::{
    conn::{AF_INET, ConnTuple, ROLE_SERVER},
    event::{
        DATA_EVENT_SIZE, DIR_RECV, DIR_SEND, DataEvent, EVENT_VERSION, EventHeader, KIND_DATA,
    },
};
use std::sync::Arc;

/// The agent's allocator (main.rs): the costs measured here are the ones it pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loupe::{
    clock::WallClock,
    conn::{ConnTable, Limits, NoResolver},
    decode::{Direction, Event, PayloadArena, decode_with},
    export::ExportStats,
    pipeline::Sink,
    process::ProcessCache,
    protocol::{db::DbOptions, http1::Head},
    trace::{
        causality::Linker,
        exchange::Session,
        sink::TraceSink,
        span::{self, RandomIds, Redaction, SpanKind},
    },
};

const CONNS: u64 = 64;
const EXCHANGES: u64 = 16;

fn record(sk: u64, dir: u8, seq: u64, payload: &[u8], ts: u64) -> Vec<u8> {
    record_as(sk, dir, seq, payload, ts, 1)
}

fn record_as(sk: u64, dir: u8, seq: u64, payload: &[u8], ts: u64, protocol: u8) -> Vec<u8> {
    let mut tuple = ConnTuple {
        family: AF_INET,
        sport: 8080,
        dport: 40000 + sk as u16,
        ..Default::default()
    };
    tuple.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    tuple.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let mut comm = [0u8; 16];
    comm[..5].copy_from_slice(b"nginx");
    let ev = DataEvent {
        header: EventHeader {
            kind: KIND_DATA,
            version: EVENT_VERSION,
            len: (DATA_EVENT_SIZE + payload.len()) as u32,
            ts_ns: ts,
            pid_tgid: (4242 << 32) | 4242,
        },
        sk: 0xffff_8880_0000_0000 + sk * 4096,
        conn_gen: 1,
        tuple,
        seq,
        bytes: payload.len() as u32,
        captured: payload.len() as u32,
        comm,
        direction: dir,
        role: ROLE_SERVER,
        protocol,
        syscall: 1,
        ..Default::default()
    };
    // SAFETY: DataEvent is repr(C) plain data of exactly DATA_EVENT_SIZE bytes.
    let head = unsafe {
        std::slice::from_raw_parts((&ev as *const DataEvent).cast::<u8>(), DATA_EVENT_SIZE)
    };
    let mut out = head.to_vec();
    out.extend_from_slice(payload);
    out
}

/// Keep-alive connections, each with request/response exchanges as nginx sees them.
fn records() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut ts = 1_000;
    for x in 0..EXCHANGES {
        for sk in 0..CONNS {
            let req = format!(
                "GET /api/v1/users/{x}/orders?limit=10&token=abc HTTP/1.1\r\nHost: shop.example.com\r\n\
                 User-Agent: oha/1.4\r\nAccept: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
            );
            let resp = "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n\
                        Content-Length: 11\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}";
            let (rq, rs) = (req.len() as u64, resp.len() as u64);
            out.push(record(sk, DIR_RECV, x * rq, req.as_bytes(), ts));
            out.push(record(sk, DIR_SEND, x * rs, resp.as_bytes(), ts + 50_000));
            ts += 1_000;
        }
    }
    out
}

/// Redis GETs on keep-alive connections, as the server sees them.
fn redis_records() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut ts = 1_000;
    for x in 0..EXCHANGES {
        for sk in 0..CONNS {
            let req = format!("*2\r\n$3\r\nGET\r\n$11\r\nuser:{x:06}\r\n");
            let resp = "$11\r\n{\"ok\":true}\r\n";
            let (rq, rs) = (req.len() as u64, resp.len() as u64);
            out.push(record_as(sk, DIR_RECV, x * rq, req.as_bytes(), ts, 5));
            out.push(record_as(
                sk,
                DIR_SEND,
                x * rs,
                resp.as_bytes(),
                ts + 50_000,
                5,
            ));
            ts += 1_000;
        }
    }
    out
}

/// An HPACK integer with an N-bit prefix, the first byte's high bits set to `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, prefix: u8, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.push(value as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &str) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// A header field for the dynamic table: `name` a static index, or 0 and the name spelled out.
fn hpack_insert(out: &mut Vec<u8>, name: usize, spelled: &str, value: &str) {
    hpack_int(out, 0x40, 6, name);
    if name == 0 {
        hpack_str(out, spelled);
    }
    hpack_str(out, value);
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// gRPC unary calls on HTTP/2 connections as a grpcio server sees them under h2load: the first
/// call's headers go into the dynamic tables, every later one is indexed (as real encoders do);
/// a call is three events: the request (HEADERS + DATA), the response head and message, the
/// trailers (grpcio writes those two separately).
fn grpc_records() -> Vec<Vec<u8>> {
    const HEADERS: u8 = 1;
    const DATA: u8 = 0;
    const SETTINGS: u8 = 4;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    let mut out = Vec::new();
    let mut seq = vec![[0u64; 2]; CONNS as usize];
    let mut ts = 1_000;
    let mut push = |out: &mut Vec<Vec<u8>>, sk: u64, dir: u8, bytes: Vec<u8>, ts: u64| {
        let side = &mut seq[sk as usize][usize::from(dir == DIR_SEND)];
        out.push(record_as(sk, dir, *side, &bytes, ts, 2));
        *side += bytes.len() as u64;
    };
    for sk in 0..CONNS {
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        h2_frame(&mut hello, SETTINGS, 0, 0, &[]);
        push(&mut out, sk, DIR_RECV, hello, ts);
        let mut settings = Vec::new();
        h2_frame(&mut settings, SETTINGS, 0, 0, &[]);
        h2_frame(&mut settings, SETTINGS, 1, 0, &[]);
        push(&mut out, sk, DIR_SEND, settings, ts);
    }
    for x in 0..EXCHANGES {
        for sk in 0..CONNS {
            let stream = 2 * x as u32 + 1;
            let mut block = Vec::new();
            if x == 0 {
                block.extend_from_slice(&[0x83, 0x86]);
                hpack_insert(&mut block, 4, "", "/shop.v1.Orders/Ping");
                hpack_insert(&mut block, 1, "", "127.0.0.1:18090");
                hpack_insert(&mut block, 0, "te", "trailers");
                hpack_insert(&mut block, 31, "", "application/grpc");
                hpack_insert(&mut block, 58, "", "h2load nghttp2/1.52.0");
            } else {
                block.extend_from_slice(&[0x83, 0x86, 0x80 | 66, 0x80 | 65, 0x80 | 64]);
                block.extend_from_slice(&[0x80 | 63, 0x80 | 62]);
            }
            let mut request = Vec::new();
            h2_frame(&mut request, HEADERS, END_HEADERS, stream, &block);
            h2_frame(&mut request, DATA, END_STREAM, stream, b"\0\0\0\0\x04ping");
            push(&mut out, sk, DIR_RECV, request, ts);

            let mut head = Vec::new();
            let mut trailers = Vec::new();
            if x == 0 {
                head.push(0x88);
                hpack_insert(&mut head, 31, "", "application/grpc");
                hpack_insert(
                    &mut head,
                    0,
                    "grpc-accept-encoding",
                    "identity,deflate,gzip",
                );
                hpack_insert(&mut trailers, 0, "grpc-status", "0");
            } else {
                head.extend_from_slice(&[0x88, 0x80 | 64, 0x80 | 63]);
                trailers.push(0x80 | 62);
            }
            let mut response = Vec::new();
            h2_frame(&mut response, HEADERS, END_HEADERS, stream, &head);
            h2_frame(&mut response, DATA, 0, stream, b"\0\0\0\0\x04pong");
            push(&mut out, sk, DIR_SEND, response, ts + 40_000);
            let mut end = Vec::new();
            h2_frame(
                &mut end,
                HEADERS,
                END_HEADERS | END_STREAM,
                stream,
                &trailers,
            );
            push(&mut out, sk, DIR_SEND, end, ts + 50_000);
            ts += 1_000;
        }
    }
    out
}

/// What the sink's spans go to.
#[derive(Clone, Copy)]
enum Outputs {
    /// Span records, as the console takes them.
    Records,
    /// `loupe run`'s default with an OTLP endpoint: spans encoded where they are built, and
    /// RED metrics and the service graph counted.
    OtlpAndRed,
}

/// The records through decode, the connection table and the tracing sink, as `loupe run` does.
fn through_sink(input: &[Vec<u8>], server_spans: bool, outputs: Outputs) -> usize {
    let (tx, mut rx) = match outputs {
        Outputs::Records => loupe::export::queue::span_queue(input.len()),
        Outputs::OtlpAndRed => loupe::export::queue::encoding_span_queue(input.len()),
    };
    let processes = ProcessCache::shared(Vec::new(), true);
    let mut sink = TraceSink::new(
        tx,
        Arc::new(ExportStats::default()),
        Redaction::default(),
        30_000_000_000,
        processes.clone(),
    );
    if let Outputs::OtlpAndRed = outputs {
        sink.red(loupe::red::Red::new(processes, 10_000));
        // The endpoint's own connections are left alone, as `loupe run` sets up.
        sink.exclude(vec!["127.0.0.1:4317".parse().unwrap()]);
    }
    sink.databases(DbOptions {
        server_spans,
        ..DbOptions::default()
    });
    let mut table = ConnTable::new(Limits::default());
    let mut arena = PayloadArena::default();
    for (i, raw) in input.iter().enumerate() {
        // Spans go on per batch of events, as the reader hands them to the pipeline.
        if i % loupe::event_queue::BATCH == 0 {
            sink.batch_done();
        }
        let Ok(Event::Data(mut ev)) = decode_with(raw, &mut arena) else {
            panic!("bad record")
        };
        let dir = ev.direction;
        let payload = std::mem::take(&mut ev.payload);
        let mut segments = loupe::conn::Segments::new();
        let Some((conn, _)) = table.ingest_payload(&ev, payload, &mut NoResolver, &mut segments)
        else {
            continue;
        };
        sink.data(&conn.info, &ev, dir, segments);
    }
    sink.flush();
    rx.take_ready_spans().iter().map(|s| s.len()).sum()
}

fn sink(c: &mut Criterion) {
    let http = records();
    let redis = redis_records();
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(http.len() as u64));
    group.bench_function("http1", |b| {
        b.iter(|| std::hint::black_box(through_sink(&http, false, Outputs::Records)))
    });
    group.bench_function("http1_otlp_red", |b| {
        b.iter(|| std::hint::black_box(through_sink(&http, false, Outputs::OtlpAndRed)))
    });
    group.throughput(Throughput::Elements(redis.len() as u64));
    // Server side with spans on, so the work matches the HTTP case (a span per exchange).
    group.bench_function("redis", |b| {
        b.iter(|| std::hint::black_box(through_sink(&redis, true, Outputs::Records)))
    });
    let grpc = grpc_records();
    group.throughput(Throughput::Elements(grpc.len() as u64));
    group.bench_function("grpc_otlp_red", |b| {
        b.iter(|| {
            let spans = through_sink(&grpc, false, Outputs::OtlpAndRed);
            assert_eq!(spans, (CONNS * EXCHANGES) as usize, "a span per call");
            std::hint::black_box(spans)
        })
    });
    group.finish();
}

fn pipeline(c: &mut Criterion) {
    let input = records();
    let clock = WallClock::new();
    let redaction = Redaction::default();
    let mut group = c.benchmark_group("userspace");
    group.throughput(Throughput::Elements(input.len() as u64));
    group.bench_function("decode+reassemble+parse+span", |b| {
        b.iter(|| {
            let mut table = ConnTable::new(Limits::default());
            let mut sessions: std::collections::HashMap<u64, Session> = Default::default();
            let mut linker = Linker::new(Box::new(RandomIds));
            let mut spans = 0usize;
            let mut arena = PayloadArena::default();
            for raw in &input {
                let Ok(Event::Data(mut ev)) = decode_with(raw, &mut arena) else {
                    panic!("bad record")
                };
                let dir = ev.direction;
                let (ts, tid) = (ev.ts_ns, ev.tid);
                let payload = std::mem::take(&mut ev.payload);
                let mut segments = loupe::conn::Segments::new();
                let Some((conn, _)) =
                    table.ingest_payload(&ev, payload, &mut NoResolver, &mut segments)
                else {
                    continue;
                };
                let info = conn.info.clone();
                let session = sessions
                    .entry(info.key.sk)
                    .or_insert_with(|| Session::new(false));
                if dir == Direction::Recv {
                    let mut assign = |head: &Head, st| linker.server_start(&info, head, st, None);
                    session.on_requests(ts, tid, &mut assign, segments);
                } else {
                    for ex in session.on_responses(ts, segments) {
                        let s = span::build(&ex, &info, SpanKind::Server, &clock, &redaction);
                        spans += s.attributes.len();
                    }
                }
            }
            std::hint::black_box(spans)
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline, sink);
criterion_main!(benches);
