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

/// The bench's gRPC workload as recorded from the real peers (`cargo xtask record grpc-h2load`:
/// h2load's unary calls, ten at a time on one connection, to the grpcio server of
/// tests/apps/grpc_service.py, 200 in all), as the server's side sees it: each recorded read
/// one event, replayed on `GRPC_CONNS` connections in turn. Real encoders' bytes, not
/// hand-made blocks: h2load sends `:path` as an unindexed Huffman literal in every request, and
/// grpcio spells out `grpc-message` in every trailer.
fn grpc_records() -> Vec<Vec<u8>> {
    let raw = include_bytes!("../src/protocol/http2/testdata/grpc-h2load.bin");
    let mut reads = Vec::new();
    let mut at = 0;
    while at + 5 <= raw.len() {
        let len = u32::from_le_bytes(raw[at + 1..at + 5].try_into().unwrap()) as usize;
        let dir = if raw[at] == b'C' { DIR_RECV } else { DIR_SEND };
        reads.push((dir, &raw[at + 5..at + 5 + len]));
        at += 5 + len;
    }
    let mut out = Vec::new();
    let mut seq = vec![[0u64; 2]; GRPC_CONNS as usize];
    let mut ts = 1_000;
    for (dir, bytes) in reads {
        for sk in 0..GRPC_CONNS {
            let side = &mut seq[sk as usize][usize::from(dir == DIR_SEND)];
            out.push(record_as(sk, dir, *side, bytes, ts, 2));
            *side += bytes.len() as u64;
            ts += 1_000;
        }
    }
    out
}

/// Connections of the gRPC case (h2load's in the bench) and calls recorded on each.
const GRPC_CONNS: u64 = 16;
const GRPC_CALLS: u64 = 200;

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
            assert_eq!(spans, (GRPC_CONNS * GRPC_CALLS) as usize, "a span per call");
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
