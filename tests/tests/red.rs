//! Privileged end-to-end: RED metrics, the service graph and sampling, on a real Flask service
//! (`catalog`) called by a real Python client (`frontend`), both uninstrumented.
//!
//! The client sends known numbers of OK, failing and slow requests, plus some carrying a
//! `traceparent` with `sampled` set and unset, while the agent samples 10% (parent based) and
//! keeps errors and slow traces. The metrics must count everything exactly; the spans must be
//! exactly the kept traces, each whole.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use loupe_tests::{Agent, TestCgroup, free_port, otlp::Receiver, privileged, scrape};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

const OK: usize = 300;
const FAILING: usize = 20;
const SLOW: usize = 4;
const SAMPLED: usize = 30;
const UNSAMPLED: usize = 30;
const TOTAL: usize = OK + FAILING + SLOW + SAMPLED + UNSAMPLED;

/// The frontend: one keep-alive connection; each request is a trace of its own. Ids in the
/// paths tell the test which kind of request a span belongs to.
fn frontend(cg: &TestCgroup, server: SocketAddr) {
    let script = format!(
        "import http.client, os\n\
         c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=30)\n\
         def get(path, headers={{}}):\n\
         \x20   c.request('GET', path, headers=headers); r = c.getresponse(); r.read(); return r.status\n\
         for i in range({ok}): assert get('/users/%d' % i) == 200\n\
         for i in range({failing}): assert get('/fail') == 503\n\
         for i in range({slow}): assert get('/slow/%d' % i) == 200\n\
         for flag, n, base in (('01', {sampled}, 100000), ('00', {unsampled}, 200000)):\n\
         \x20   for i in range(n):\n\
         \x20       tp = '00-%s-%s-%s' % (os.urandom(16).hex(), os.urandom(8).hex(), flag)\n\
         \x20       assert get('/users/%d' % (base + i), {{'traceparent': tp}}) == 200\n",
        port = server.port(),
        ok = OK,
        failing = FAILING,
        slow = SLOW,
        sampled = SAMPLED,
        unsampled = UNSAMPLED,
    );
    let out = cg
        .command("python3", &["-c", &script])
        .env("OTEL_SERVICE_NAME", "frontend")
        .output()
        .expect("run the frontend");
    assert!(
        out.status.success(),
        "frontend failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sum of the values of the lines starting with `prefix` and carrying every label in `labels`.
fn sum(text: &str, prefix: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug, PartialEq)]
enum Kind {
    Ok,
    Failing,
    Slow,
    Sampled,
    Unsampled,
}

fn kind_of(path: &str) -> Option<Kind> {
    if path == "/fail" {
        return Some(Kind::Failing);
    }
    if path.starts_with("/slow/") {
        return Some(Kind::Slow);
    }
    let id: u64 = path.strip_prefix("/users/")?.parse().ok()?;
    Some(match id {
        200_000.. => Kind::Unsampled,
        100_000.. => Kind::Sampled,
        _ => Kind::Ok,
    })
}

#[test]
fn red_metrics_the_service_graph_and_sampling_on_a_real_service() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("red");
    let server = loupe_tests::gunicorn(&cg, 4, Some("catalog"));
    let receiver = Receiver::start();
    let ep = format!("http://{}", receiver.grpc);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let dir = loupe_tests::databases::TempDir::new("red");
    let config = dir.0.join("loupe.yaml");
    std::fs::write(
        &config,
        "sampling:\n  keep_errors: true\n  keep_slower_than: 500ms\n",
    )
    .unwrap();
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--otlp-endpoint",
            &ep,
            "--otlp-protocol",
            "grpc",
            "--metrics-addr",
            &metrics_addr,
            "--config",
            config.to_str().unwrap(),
        ],
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ],
    );
    frontend(&cg, server.addr);

    // RED metrics on /metrics: every request, exactly, before sampling.
    let server_count = "http_server_request_duration_seconds_count";
    let catalog = "service_name=\"catalog\"";
    let client_count = "http_client_request_duration_seconds_count";
    let frontend = "service_name=\"frontend\"";
    // Both sides' spans finish a little apart: wait until each has counted every request.
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(&metrics_addr);
        if sum(&text, server_count, &[catalog]) as usize >= TOTAL
            && sum(&text, client_count, &[frontend]) as usize >= TOTAL
            && sum(&text, "traces_service_graph_request_total", &[]) as usize >= TOTAL
            && sum(
                &text,
                "traces_service_graph_request_server_seconds_count",
                &[],
            ) as usize
                >= TOTAL
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ok = "http_response_status_code=\"200\"";
    let failed = "http_response_status_code=\"503\"";
    assert_eq!(
        sum(&text, server_count, &[catalog, ok]) as usize,
        OK + SLOW + SAMPLED + UNSAMPLED,
        "{text}"
    );
    assert_eq!(
        sum(&text, server_count, &[catalog, failed]) as usize,
        FAILING
    );
    assert_eq!(sum(&text, client_count, &[frontend]) as usize, TOTAL);
    // The slow requests are above 0.5 s and below 0.75 s; nothing else is.
    let bucket = "http_server_request_duration_seconds_bucket";
    let le = |v: &str| format!("le=\"{v}\"");
    let (le_05, le_075) = (le("0.5"), le("0.75"));
    let all = sum(&text, bucket, &[catalog, &le("+Inf")]) as usize;
    let under_05 = sum(&text, bucket, &[catalog, &le_05]) as usize;
    let under_075 = sum(&text, bucket, &[catalog, &le_075]) as usize;
    assert_eq!((all - under_05, all - under_075), (SLOW, 0), "{text}");
    assert!(text.contains("http_route=\"/users/{id}\""), "{text}");
    // The edge frontend -> catalog, with its failures.
    let edge = [
        "client=\"frontend\"",
        "server=\"catalog\"",
        "connection_type=\"\"",
    ];
    assert_eq!(
        sum(&text, "traces_service_graph_request_total", &edge) as usize,
        TOTAL,
        "{text}"
    );
    assert_eq!(
        sum(&text, "traces_service_graph_request_failed_total", &edge) as usize,
        FAILING
    );
    assert_eq!(
        sum(
            &text,
            "traces_service_graph_request_server_seconds_count",
            &edge
        ) as usize,
        TOTAL
    );

    // The same over OTLP metrics (cumulative: the latest export carries the totals).
    let otlp_total = |metric: &str, service: &str| -> u64 {
        let hs = receiver.histograms();
        let mut latest: HashMap<String, u64> = HashMap::new();
        for h in hs.iter().filter(|h| {
            h.metric == metric
                && h.attributes.get("service.name").map(String::as_str) == Some(service)
        }) {
            let mut key: Vec<_> = h.attributes.iter().collect();
            key.sort();
            latest.insert(format!("{key:?}"), h.count);
        }
        latest.values().sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while otlp_total("http.server.request.duration", "catalog") < TOTAL as u64
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        otlp_total("http.server.request.duration", "catalog"),
        TOTAL as u64
    );
    assert_eq!(
        otlp_total("http.client.request.duration", "frontend"),
        TOTAL as u64
    );
    let h = receiver
        .histograms()
        .into_iter()
        .find(|h| h.metric == "http.server.request.duration")
        .unwrap();
    assert_eq!(h.unit, "s");
    assert_eq!(
        h.bounds,
        [
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
        ]
    );

    // Sampling: which traces left the node, each whole.
    std::thread::sleep(Duration::from_secs(3));
    let text = scrape(&metrics_addr);
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let mut traces: HashMap<&str, Vec<&loupe_tests::otlp::ReceivedSpan>> = HashMap::new();
    for s in &spans {
        traces.entry(&s.trace_id).or_default().push(s);
    }
    let mut kept: HashMap<String, usize> = HashMap::new();
    for (trace, ss) in &traces {
        let client: Vec<_> = ss.iter().filter(|s| s.kind == CLIENT).collect();
        let server: Vec<_> = ss.iter().filter(|s| s.kind == SERVER).collect();
        assert!(
            client.len() == 1 && server.len() == 1,
            "trace {trace} is not whole: {ss:#?}"
        );
        assert_eq!(client[0].service(), "frontend");
        assert_eq!(server[0].service(), "catalog");
        let path = client[0].attr("url.path").unwrap_or_default();
        let kind = kind_of(path).unwrap_or_else(|| panic!("path {path}"));
        // A request that carried a traceparent names its sender's span: both sides hang off it.
        let parent = if kind == Kind::Sampled {
            &client[0].parent_span_id
        } else {
            &client[0].span_id
        };
        assert_eq!(&server[0].parent_span_id, parent, "{ss:#?}");
        *kept.entry(format!("{kind:?}")).or_default() += 1;
    }
    let n = |k: Kind| kept.get(&format!("{k:?}")).copied().unwrap_or(0);
    assert_eq!(
        n(Kind::Failing),
        FAILING,
        "every error trace is kept: {kept:?}"
    );
    assert_eq!(n(Kind::Slow), SLOW, "every slow trace is kept: {kept:?}");
    assert_eq!(n(Kind::Sampled), SAMPLED, "sampled=1 honoured: {kept:?}");
    assert_eq!(n(Kind::Unsampled), 0, "sampled=0 honoured: {kept:?}");
    // Binomial(300, 0.1): mean 30, sd 5.2; four of them either way.
    let ratio_kept = n(Kind::Ok);
    assert!(
        (9..=51).contains(&ratio_kept),
        "{ratio_kept} of {OK} kept at 10%: {kept:?}"
    );
    // What sampling dropped is counted, span for span.
    let dropped_traces = (TOTAL - traces.len()) as f64;
    assert_eq!(
        sum(&text, "loupe_sampling_spans_dropped_total", &[]),
        2.0 * dropped_traces,
        "{text}"
    );
    assert_eq!(
        sum(&text, "loupe_sampling_traces_kept_total", &[]),
        traces.len() as f64
    );
    assert_eq!(
        sum(&text, "loupe_sampling_kept_for_error_total", &[])
            + sum(&text, "loupe_sampling_kept_for_latency_total", &[]),
        (FAILING + SLOW) as f64 - (spans_kept_by_ratio_among_errors(&traces)) as f64,
        "{text}"
    );
    assert!(log.contains("drops=none"), "{log}");
    drop(server);
}

/// Error and slow traces the 10% ratio kept on its own (not counted as kept for a tail rule).
fn spans_kept_by_ratio_among_errors(
    traces: &HashMap<&str, Vec<&loupe_tests::otlp::ReceivedSpan>>,
) -> usize {
    traces
        .iter()
        .filter(|(trace, ss)| {
            let path = ss[0].attr("url.path").unwrap_or_default();
            matches!(kind_of(path), Some(Kind::Failing | Kind::Slow)) && ratio_keeps(trace)
        })
        .count()
}

/// The agent's ratio decision, recomputed: the last 56 bits of the trace id against
/// (1 - 0.1) * 2^56.
fn ratio_keeps(trace_hex: &str) -> bool {
    let r = u64::from_str_radix(&trace_hex[18..32], 16).unwrap();
    r >= ((1.0 - 0.1) * (1u64 << 56) as f64) as u64
}
