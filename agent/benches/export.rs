//! What turning spans into an OTLP request costs per span, on one core: a batch of 2 048 HTTP
//! spans from four processes (the exporter's batch size) encoded into one
//! ExportTraceServiceRequest (`cargo xtask bench` runs it too).

use std::time::Duration;

/// The agent's allocator (main.rs): the costs measured here are the ones it pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loupe::{
    export::otlp_proto::{encode_request, resource},
    process::ProcessInfo,
    trace::span::{SpanKind, SpanRecord, Value},
};

const BATCH: usize = 2048;

fn span(i: usize) -> SpanRecord {
    let mut trace_id = [0u8; 16];
    trace_id[8..].copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
    SpanRecord {
        trace_id,
        span_id: (i as u64).to_be_bytes(),
        parent_span_id: (i % 2 == 1).then_some([7; 8]),
        parent_is_remote: i % 2 == 1,
        trace_state: String::new(),
        name: "GET /users/{id}".into(),
        kind: if i.is_multiple_of(2) {
            SpanKind::Client
        } else {
            SpanKind::Server
        },
        start_unix_ns: 1_764_000_000_000_000_000 + i as u64 * 1_000,
        end_unix_ns: 1_764_000_000_000_000_000 + i as u64 * 1_000 + 250_000,
        attributes: vec![
            ("http.request.method", Value::Static("GET")),
            ("url.path", Value::Str(format!("/users/{i}"))),
            ("http.route", Value::Static("/users/{id}")),
            ("http.response.status_code", Value::Int(200)),
            ("network.protocol.version", Value::Static("1.1")),
            ("server.address", Value::Static("10.0.3.17")),
            ("server.port", Value::Int(8080)),
            ("client.address", Value::Static("10.0.3.21")),
            ("client.port", Value::Int(40_000 + (i % 20_000) as i64)),
        ],
        error: None,
        status: Some("200".into()),
        pid: 100 + (i % 4) as u32,
        comm: "users".into(),
    }
}

fn bench(c: &mut Criterion) {
    let spans: Vec<SpanRecord> = (0..BATCH).map(span).collect();
    let groups: Vec<_> = (0..4u32)
        .map(|p| {
            let process = ProcessInfo {
                pid: 100 + p,
                service_name: "users".into(),
                executable_name: "users".into(),
                command_line: "/usr/bin/users --port 8080".into(),
                ..ProcessInfo::default()
            };
            let mine: Vec<&SpanRecord> = spans.iter().filter(|s| s.pid == 100 + p).collect();
            (resource(&process, "node-1"), mine)
        })
        .collect();
    let size = encode_request(&groups, 0).len();
    let mut g = c.benchmark_group("export");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("otlp_encode", |b| {
        b.iter(|| encode_request(&groups, size + 4096))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
