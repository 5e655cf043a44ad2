//! What RED metrics, the service graph and sampling cost per span, on one core: the work the
//! trace sink adds to every finished exchange (`cargo xtask bench` runs it too).
//!
//! - `red_record`: one HTTP server span into its duration histogram (the series lookup by a
//!   hash of the span's values and the bucket update), plus the process's cached service name.
//! - `red_edge`: one CLIENT span into its service-graph edge (four metrics, one series).
//! - `sampling_wait`: one two-span trace through a sampler that must wait for the local root
//!   (parent-based 10% ratio with keep_errors): both spans held, then decided.

use std::time::Duration;

/// The agent's allocator (main.rs): the costs measured here are the ones it pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loupe::{
    process::ProcessCache,
    red::{DEFAULT_SERIES_LIMIT, Peer, Red},
    trace::{
        sampling::{Head, HeadSampler, Root, Sampler, SamplingConfig},
        span::{SpanKind, SpanRecord, Value},
    },
};

/// Above any pid_max: named by its command, never read from /proc.
const PID: u32 = 4_194_304 + 3;

fn span(kind: SpanKind, trace: u64, route: usize) -> SpanRecord {
    let mut trace_id = [0u8; 16];
    trace_id[8..].copy_from_slice(&trace.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
    SpanRecord {
        trace_id,
        span_id: [3; 8],
        parent_span_id: None,
        parent_is_remote: false,
        trace_state: String::new(),
        name: "GET /users/{id}".into(),
        kind,
        start_unix_ns: 0,
        end_unix_ns: 3_000_000,
        attributes: vec![
            ("http.request.method", Value::Static("GET")),
            ("http.response.status_code", Value::Int(200)),
            (
                "http.route",
                Value::Shared(format!("/users/{{id}}/{route}").into()),
            ),
            ("url.scheme", Value::Static("http")),
            ("network.protocol.version", Value::Static("1.1")),
            ("server.address", Value::Static("catalog")),
            ("server.port", Value::Int(8080)),
        ],
        error: None,
        status: Some("200".into()),
        pid: PID,
        comm: "catalog".into(),
    }
}

/// Spans per hand-over: a batch of events makes about half as many spans.
const HAND_OVER: usize = loupe::event_queue::BATCH / 2;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("red_and_sampling");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    let mut red = Red::new(ProcessCache::shared(Vec::new(), true), DEFAULT_SERIES_LIMIT);
    // Twenty routes, as a service has: the series exist after the first round.
    let servers: Vec<SpanRecord> = (0..20).map(|r| span(SpanKind::Server, 1, r)).collect();
    let clients: Vec<SpanRecord> = (0..20).map(|r| span(SpanKind::Client, 1, r)).collect();
    let mut i = 0;
    g.bench_function("red_record", |b| {
        b.iter(|| {
            i += 1;
            red.record(&servers[i % 20]);
            // Into the store once per batch of events, as the pipeline hands them over.
            if i.is_multiple_of(HAND_OVER) {
                red.hand_over();
            }
        })
    });
    g.bench_function("red_edge", |b| {
        b.iter(|| {
            i += 1;
            red.edge(&clients[i % 20], Peer::Process(PID, [4; 8], Some(0.003)));
        })
    });
    let mut sampler = Sampler::new(
        HeadSampler {
            head: Head::Ratio(0.1),
            parent_based: true,
        },
        SamplingConfig {
            keep_errors: true,
            ..Default::default()
        },
    );
    let mut trace = 0u64;
    g.throughput(Throughput::Elements(2));
    g.bench_function("sampling_wait", |b| {
        b.iter(|| {
            trace += 1;
            let kept = sampler.offer(span(SpanKind::Server, trace, 0), None).len();
            let root = Root {
                service: "frontend",
                carried_sampled: None,
            };
            kept + sampler
                .offer(span(SpanKind::Client, trace, 0), Some(root))
                .len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
