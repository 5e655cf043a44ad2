//! Privileged: day-two behaviour an operator relies on — the metrics endpoint is bound at start
//! (a busy address is an error, `:PORT` means every interface), logs carry no colour codes
//! when they go to a pipe or file, the terminal view stays readable under a flood, and signals
//! and a closed stdout stop the agent the way an operator expects.

use std::time::{Duration, Instant};

use loupe_tests::{Agent, TestCgroup, free_port, loupe_bin, metric, nginx, privileged, scrape};

#[test]
fn a_busy_metrics_address_stops_the_agent_with_the_reason() {
    if !privileged() {
        return;
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(loupe_bin())
        .args([
            "--metrics-addr",
            &addr,
            "--otlp-endpoint",
            "http://127.0.0.1:9",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running on a busy port"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log =
        String::from_utf8_lossy(&loupe_tests::read_all(child.stderr.take().unwrap())).into_owned();
    assert!(!status.success());
    assert!(
        log.contains("cannot listen on --metrics-addr") && !log.contains("ready:"),
        "{log}"
    );
}

#[test]
fn metrics_on_every_interface_and_plain_logs_through_a_pipe() {
    if !privileged() {
        return;
    }
    let port = free_port();
    let agent = Agent::spawn(
        &[
            "--metrics-addr",
            &format!(":{port}"),
            "--otlp-endpoint",
            "http://127.0.0.1:9",
            // Nothing to trace: no connection uses port 1.
            "--port",
            "1",
        ],
        &[],
    );
    let text = scrape(&format!("127.0.0.1:{port}"));
    assert!(metric(&text, "loupe_events_read_total").is_some(), "{text}");
    let (_, log) = agent.stop_raw();
    assert!(log.contains("ready:"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a piped log:\n{log:?}"
    );
}

/// A keep-alive client, connected before the agent starts, that sends `n` GETs when told to (one
/// of them to a path nginx answers 404) as fast as nginx answers.
const FLOOD_CLIENT: &str = r#"
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
c.request("GET", "/users/warmup"); c.getresponse().read()
print("connected", flush=True)
sys.stdin.readline()
n = int(sys.argv[3])
for i in range(n):
    c.request("GET", "/nothing-here" if i == n // 2 else f"/users/{i}")
    c.getresponse().read()
print("done", flush=True)
"#;

#[test]
fn a_flood_prints_a_bounded_view_errors_first_while_the_output_gets_every_span() {
    if !privileged() {
        return;
    }
    use std::io::{BufRead as _, Write as _};
    let cg = TestCgroup::new("flood");
    let dir = loupe_tests::databases::TempDir::new("flood");
    let server = nginx(&cg, dir.0.as_path());
    let mut client = cg
        .command(
            "python3",
            &[
                "-c",
                FLOOD_CLIENT,
                &server.addr.ip().to_string(),
                &server.addr.port().to_string(),
                "3000",
            ],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    let out = dir.0.as_path().join("spans.jsonl");
    let started = Instant::now();
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--console-rate",
            "5",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    let _ = client.wait();
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, log) = agent.stop_raw();
    let seconds = started.elapsed().as_secs() + 1;
    let text = stdout.join("\n");
    let jsonl = std::fs::read_to_string(&out).unwrap();

    // Every span reached --output: 3000 CLIENT spans of the client, 3000 SERVER spans of nginx.
    let spans: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(spans.len(), 6000, "{log}");
    // The terminal: at most 5 traces a second, the one error among them, and the rest counted.
    let printed = stdout.iter().filter(|l| l.starts_with("trace ")).count() as u64;
    assert!(
        printed > 0 && printed <= 5 * seconds,
        "{printed} traces in {seconds} s:\n{text}"
    );
    assert!(
        stdout
            .iter()
            .any(|l| l.contains("GET") && l.contains("ERROR 404")),
        "the failed request was not chosen:\n{text}"
    );
    let note = stdout
        .iter()
        .find(|l| l.starts_with("… ") && l.contains("traces not shown"))
        .unwrap_or_else(|| panic!("no 'not shown' line:\n{text}"));
    let hidden: u64 = note[4..].split(' ').next().unwrap().parse().unwrap();
    // Each complete trace was either printed or counted (a SERVER span on the connection opened
    // before the agent is a trace of its own: its caller cannot be paired by request order).
    let traces: std::collections::HashSet<&str> = spans
        .iter()
        .map(|s| s["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(printed + hidden, traces.len() as u64, "{note}");
    assert!(note.contains("--output gets every span"), "{note}");
    assert!(
        log.contains(&format!(
            "traces_printed={printed} traces_not_shown={hidden}"
        )) && log.contains("drops=none"),
        "{log}"
    );
}

/// Requests to `server` from curl in `cg`, every 100 ms, until `stop` is set.
fn keep_requesting(
    cg: &TestCgroup,
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let cg = TestCgroup::at(&cg.dir);
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            cg.run("curl", &["-s", "-o", "/dev/null", &url]);
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn a_closed_stdout_stops_the_agent_cleanly() {
    if !privileged() {
        return;
    }
    use std::io::BufRead as _;
    let cg = TestCgroup::new("epipe");
    let dir = loupe_tests::databases::TempDir::new("epipe");
    let server = nginx(&cg, dir.0.as_path());
    // `loupe | head -n 1`: the reader takes one line and goes away.
    let mut child = std::process::Command::new(loupe_bin())
        .args(["--cgroup", &cg.dir, "--console-rate", "0"])
        .env("LOUPE_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            log2.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = keep_requesting(&cg, format!("http://{}/users/1", server.addr), stop.clone());
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("trace "), "{first}");
    drop(out);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the agent kept running with nobody reading:\n{}",
                log.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.contains("standard output was closed: stopping") && log.contains("drops"),
        "stopped, and through the normal shutdown (summary line):\n{log}"
    );
}

#[test]
fn sighup_stops_like_sigterm() {
    if !privileged() {
        return;
    }
    let agent = Agent::spawn(&["--port", "1"], &[]);
    let (_, log) = agent.stop_with(libc::SIGHUP);
    assert!(
        log.contains("SIGHUP: stopping") && log.contains("drops=none"),
        "{log}"
    );
}

#[test]
fn a_second_signal_while_draining_exits_at_once() {
    if !privileged() {
        return;
    }
    use std::io::BufRead as _;
    // An OTLP endpoint that accepts connections and never answers: the export of the one span
    // hangs, so the first SIGINT leaves the agent draining.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", blackhole.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in blackhole.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let cg = TestCgroup::new("second-signal");
    let dir = loupe_tests::databases::TempDir::new("second-signal");
    let server = nginx(&cg, dir.0.as_path());
    let mut child = std::process::Command::new(loupe_bin())
        .args(["--cgroup", &cg.dir, "--otlp-endpoint", &endpoint])
        .env("LOUPE_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("ready:") {
        assert!(err.read_line(&mut log).unwrap() > 0, "{log}");
    }
    cg.run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{}/users/1", server.addr),
        ],
    );
    // The span is batched within a second, and its export then hangs.
    std::thread::sleep(Duration::from_millis(2000));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still draining after the first signal"
    );
    // SAFETY: as above. Exit code 130 only comes from the forced path, not from a finished drain.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let rest = String::from_utf8_lossy(&loupe_tests::read_all(err)).into_owned();
    log.push_str(&rest);
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        log.contains("SIGINT while stopping: exiting without flushing"),
        "{log}"
    );
    drop(held);
}

#[test]
fn metrics_only_on_metrics_and_readyz_reports_failing_exports() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("readyz");
    let dir = loupe_tests::databases::TempDir::new("readyz");
    let server = nginx(&cg, dir.0.as_path());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--metrics-addr",
            &addr,
            "--otlp-endpoint",
            &closed,
            "--export-retry",
            "1",
        ],
        &[],
    );
    let root = loupe_tests::get(&addr, "/");
    assert!(root.starts_with("HTTP/1.1 404"), "{root}");
    let health = loupe_tests::get(&addr, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("text/plain; charset=utf-8"),
        "{health}"
    );
    assert!(loupe_tests::get(&addr, "/readyz").starts_with("HTTP/1.1 200"));
    // A span to export, to an endpoint that refuses: after the 1 s retry window, not ready.
    let url = format!("http://{}/users/1", server.addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        cg.run("curl", &["-s", "-o", "/dev/null", &url]);
        let r = loupe_tests::get(&addr, "/readyz");
        if r.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        ready.starts_with("HTTP/1.1 503")
            && ready.contains("not ready: OTLP exports have been failing"),
        "{ready}\n{}",
        agent.log()
    );
    let _ = agent.stop_raw();
}

#[test]
fn a_second_agent_warns_and_never_traces_the_first_ones_exports() {
    if !privileged() {
        return;
    }
    use std::io::BufRead as _;
    let traced = TestCgroup::new("agent-a-traces");
    let dir = loupe_tests::databases::TempDir::new("two-agents");
    let web = nginx(&traced, dir.0.as_path());
    let receiver = loupe_tests::otlp::Receiver::start();
    // Agent A, in a cgroup of its own, exports nginx's spans over HTTP/1 (what B could parse).
    let agents = TestCgroup::new("agent-a");
    let mut a = agents
        .command(
            loupe_bin().to_str().unwrap(),
            &[
                "--cgroup",
                &traced.dir,
                "--otlp-endpoint",
                &format!("http://{}", receiver.http),
                "--otlp-protocol",
                "http/protobuf",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut a_err = std::io::BufReader::new(a.stderr.take().unwrap());
    let mut a_log = String::new();
    while !a_log.contains("ready:") {
        assert!(a_err.read_line(&mut a_log).unwrap() > 0, "{a_log}");
    }
    // Agent B traces A's cgroup: A's exports are all there is to see.
    let out = dir.0.join("b.jsonl");
    let port = free_port();
    let b = Agent::spawn(
        &[
            "--cgroup",
            &agents.dir,
            "--output",
            out.to_str().unwrap(),
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    for i in 0..3 {
        traced.run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                &format!("http://{}/users/{i}", web.addr),
            ],
        );
    }
    receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 6);
    let text = scrape(&format!("127.0.0.1:{port}"));
    let (_, b_log) = b.stop_raw();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    let _ = a.wait();
    assert!(receiver.spans().len() >= 6, "A exported");
    assert!(
        b_log.contains("1 other Loupe agent is running on this host"),
        "{b_log}"
    );
    let b_spans = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(b_spans.is_empty(), "B traced A's exports:\n{b_spans}");
    assert!(
        metric(&text, "loupe_other_agent_connections_total").unwrap_or(0) >= 1,
        "B saw A's export connection and left it alone:\n{text}"
    );
}

/// A collector on the node (a Collector DaemonSet, the bench's sink) reads every byte the agent
/// exports. Traced like any process, its side of the export connection would be captured in
/// full and dropped in user space (21k truncated payloads per 5 s at 40k requests/s): the agent
/// tells the kernel to stop capturing it, and the kernel then skips its reads.
#[test]
fn a_collector_on_the_node_is_not_captured_reading_the_exports() {
    if !privileged() {
        return;
    }
    use std::io::BufRead as _;
    let web_cg = TestCgroup::new("web-beside-a-collector");
    let collector_cg = TestCgroup::new("collector");
    let dir = loupe_tests::databases::TempDir::new("collector-on-node");
    let web = nginx(&web_cg, dir.0.as_path());
    let mut collector = collector_cg
        .command(env!("CARGO_BIN_EXE_otlp-sink"), &[])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(collector.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let endpoint = first
        .trim()
        .strip_prefix("grpc=")
        .unwrap_or_else(|| panic!("the sink printed {first:?}"))
        .to_string();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &web_cg.dir,
            "--cgroup",
            &collector_cg.dir,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--metrics-addr",
            &metrics,
        ],
        &[],
    );
    let requests = |round: usize| {
        for i in 0..10 {
            web_cg.run(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    &format!("http://{}/orders/{round}/{i}", web.addr),
                ],
            );
        }
    };
    let truncated = "loupe_kernel_events_total{reason=\"payload_truncated\",kind=\"volume\"}";
    // Until the first exports reached the collector and its side was handed to the kernel.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut before = String::new();
    for round in 0.. {
        requests(round);
        std::thread::sleep(Duration::from_millis(500));
        before = scrape(&metrics);
        let exported = metric(&before, "loupe_spans_exported_total").unwrap_or(0);
        let verdicts = metric(&before, "loupe_l7_verdicts_written_total").unwrap_or(0);
        if (exported >= 20 && verdicts >= 1) || Instant::now() > deadline {
            break;
        }
    }
    // Then more exports (one a second, each over 4 KiB: a captured read of one is truncated).
    for round in 100..104 {
        requests(round);
        std::thread::sleep(Duration::from_millis(1200));
    }
    let after = scrape(&metrics);
    let (_, log) = agent.stop_raw();
    let _ = collector.kill();
    let _ = collector.wait();
    assert!(
        metric(&before, "loupe_l7_verdicts_written_total").unwrap_or(0) >= 1,
        "the collector's side of the export connection was handed to the kernel:\n{before}\n{log}"
    );
    let exported = |t: &str| metric(t, "loupe_spans_exported_total").unwrap_or(0);
    assert!(
        exported(&after) >= exported(&before) + 60,
        "the collector took the later exports:\n{after}"
    );
    assert!(metric(&before, truncated).is_some(), "{before}");
    assert_eq!(
        metric(&after, truncated),
        metric(&before, truncated),
        "the kernel captured none of the collector's later reads:\n{after}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    if !privileged() {
        return;
    }
    let agent = Agent::spawn(&["--port", "1", "--log-format", "json"], &[]);
    let (_, log) = agent.stop_raw();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("ready:")) && !log.contains('\u{1b}'),
        "{log}"
    );
}
