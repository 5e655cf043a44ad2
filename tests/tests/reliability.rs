//! Losing nothing silently: an OTLP endpoint down for a while costs a bounded queue, counted
//! drops and no memory growth, and export resumes by itself; every span built is exported or
//! counted as dropped, exactly. SIGTERM flushes what is pending.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use loupe_tests::{
    Agent, Server, TestCgroup, free_port, metric, otlp::Receiver, privileged, tests_dir,
};

/// A keep-alive HTTP/1.1 service (the chain leaf) inside `cg`.
fn service(cg: &TestCgroup) -> Server {
    let port = free_port();
    let app = tests_dir().join("apps/chain_service.py");
    let cmd = cg.command("python3", &[app.to_str().unwrap(), &port.to_string()]);
    Server::start(cmd, format!("127.0.0.1:{port}").parse().unwrap())
}

/// `n` requests on one keep-alive connection from a client inside `cg`: 2 spans each (the
/// client's and the service's).
fn drive(cg: &TestCgroup, to: SocketAddr, n: usize, first_id: usize) {
    let script = format!(
        "import http.client\nc=http.client.HTTPConnection('{}',{})\n\
         for i in range({first_id},{first_id}+{n}):\n  c.request('GET',f'/r/{{i}}'); c.getresponse().read()\n",
        to.ip(),
        to.port()
    );
    cg.run("python3", &["-c", &script]);
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `name=value` from the agent's final summary line.
fn summary_field(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("events="))
        .unwrap_or_else(|| panic!("no summary line in:\n{log}"));
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn an_otlp_outage_is_bounded_counted_and_recovers() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("outage");
    let svc = service(&cg);
    // The endpoint is down: nothing listens on this port yet.
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent = Agent::spawn(
        &[
            "run",
            "--cgroup",
            &cg.dir,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--export-queue",
            "300",
            "--export-retry",
            "600",
            "--metrics-addr",
            &metrics,
        ],
        &[],
    );

    drive(&cg, svc.addr, 1000, 0);
    std::thread::sleep(Duration::from_secs(2));
    let rss_before = rss_kib(agent.pid());
    drive(&cg, svc.addr, 2000, 1000);
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib(agent.pid());
    let during = scrape(&metrics);
    let queue_full = metric(&during, "loupe_export_queue_full_total ").unwrap();
    assert!(
        queue_full > 0,
        "spans beyond the queue are counted while the endpoint is down\n{during}"
    );
    assert_eq!(metric(&during, "loupe_spans_exported_total "), Some(0));
    eprintln!(
        "during the outage: RSS {rss_before} KiB -> {rss_after} KiB over 4000 more spans, queue_full={queue_full}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory grows with the outage: {rss_before} KiB -> {rss_after} KiB"
    );

    // The endpoint comes back: the held batch goes out on the next retry, then new spans flow.
    let receiver = Receiver::start_at(format!("127.0.0.1:{port}").parse().unwrap());
    let resumed = Instant::now();
    receiver.wait_for(Duration::from_secs(15), |s| !s.is_empty());
    let resumed_after = resumed.elapsed();
    drive(&cg, svc.addr, 200, 3000);
    let total_requests = 3200u64;
    let before_stop = receiver.wait_for(Duration::from_secs(15), |s| {
        s.iter().filter(|s| s.name.starts_with("GET /r/")).count() >= 400
    });
    let (_, log) = agent.stop_raw();
    let received = receiver.spans().len() as u64;
    eprintln!(
        "export resumed {resumed_after:?} after the endpoint came back; {received} spans received"
    );
    assert!(before_stop.len() >= 400, "export resumed by itself");

    let built = summary_field(&log, "spans");
    let exported = summary_field(&log, "exported");
    let queue_full = summary_field(&log, "user.export_queue_full");
    let failed = summary_field(&log, "user.export_failed");
    eprintln!("built={built} exported={exported} queue_full={queue_full} failed={failed}");
    assert_eq!(
        built,
        2 * total_requests,
        "every request made two spans\n{log}"
    );
    assert_eq!(
        exported + queue_full + failed,
        built,
        "every span is exported or counted as dropped\n{log}"
    );
    assert_eq!(
        received, exported,
        "what the agent counts as exported arrived"
    );
}

#[test]
fn sigterm_flushes_pending_spans_within_five_seconds() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("sigterm");
    let svc = service(&cg);
    let receiver = Receiver::start();
    let endpoint = format!("http://{}", receiver.grpc);
    let agent = Agent::spawn(
        &[
            "run",
            "--cgroup",
            &cg.dir,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
        ],
        &[],
    );
    drive(&cg, svc.addr, 50, 0);
    // Right away: the spans are still in the batch (flushed every second) or the queue.
    let t = Instant::now();
    let _ = agent.stop_with(libc::SIGTERM);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    assert_eq!(
        receiver.spans().len(),
        100,
        "every pending span was flushed"
    );
}

#[test]
fn drop_counters_are_exported_as_otlp_metrics() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("otlp-metrics");
    let svc = service(&cg);
    let receiver = Receiver::start();
    let endpoint = format!("http://{}", receiver.grpc);
    let agent = Agent::spawn(
        &[
            "run",
            "--cgroup",
            &cg.dir,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
        ],
        &[("OTEL_METRIC_EXPORT_INTERVAL", "500")],
    );
    drive(&cg, svc.addr, 20, 0);
    let built = |points: &[loupe_tests::otlp::ReceivedPoint]| {
        points
            .iter()
            .filter(|p| p.metric == "loupe.spans_built")
            .map(|p| p.value)
            .max()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && built(&receiver.points()) < 40 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = agent.stop_raw();
    let points = receiver.points();
    assert_eq!(built(&points), 40, "spans built, as a counter");
    let p = points
        .iter()
        .find(|p| p.metric == "loupe.spans_built")
        .unwrap();
    assert!(p.monotonic, "a counter is a monotonic sum");
    assert_eq!(
        p.resource.get("service.name").map(String::as_str),
        Some("loupe")
    );
    // Every drop reason is there, with its stage labels, zero or not.
    for reason in ["ringbuf_full", "conn_map_full", "option_no_space"] {
        assert!(
            points.iter().any(|p| p.metric == "loupe.kernel_events"
                && p.attributes.get("reason").map(String::as_str) == Some(reason)
                && p.attributes.get("kind").map(String::as_str) == Some("drop")),
            "kernel drop reason {reason} missing"
        );
    }
    for metric in [
        "loupe.channel_full",
        "loupe.export_queue_full",
        "loupe.export_failed",
        "loupe.decode_errors",
    ] {
        assert!(
            points.iter().any(|p| p.metric == metric),
            "{metric} missing"
        );
    }
}
