//! Privileged: what runs inside TLS, from uprobes on the real libraries — nginx (libssl) with
//! curl (libssl) and Python requests on a keep-alive connection opened before the agent, a
//! Node.js HTTPS server and client (OpenSSL linked into node), a Go HTTPS server and client
//! (crypto/tls, HTTP/2 through ALPN) built here with Debian's Go, and the JDK's own TLS, which
//! no uprobe can hold: counted, not crashed on. Every process runs before the agent starts.

use std::{
    io::{BufRead as _, Write as _},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use loupe_tests::{
    Agent, TestCgroup, free_port,
    otlp::{ReceivedSpan, Receiver},
    privileged, tests_dir, venv_bin,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const SECRET: &str = "PLANTED-SECRET-7f3a";
const CARRIED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CARRIED_PARENT: &str = "00f067aa0ba902b7";

/// A client that says "ready" once its first request is done, makes the test's requests on a
/// line from stdin, says "done", and exits on the next line.
struct Stepped {
    child: Child,
    stdin: ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Stepped {
    fn start(mut cmd: Command) -> Stepped {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the client did not start");
        Stepped { child, stdin, out }
    }

    fn step(&mut self) {
        writeln!(self.stdin).unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done", "the client's requests failed");
    }

    fn finish(mut self) {
        let _ = writeln!(self.stdin);
        let _ = self.child.wait();
    }
}

struct Traced {
    agent: Agent,
    receiver: Receiver,
    metrics_addr: String,
}

fn trace(cg: &TestCgroup) -> Traced {
    let receiver = Receiver::start();
    let ep = format!("http://{}", receiver.grpc);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
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
        ],
        &[],
    );
    Traced {
        agent,
        receiver,
        metrics_addr,
    }
}

fn pid(s: &ReceivedSpan) -> u32 {
    s.resource["process.pid"].parse().unwrap()
}

fn dump(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "pid {} kind {} {} {:?} scheme {:?} v{:?} trace {} span {} parent {}",
                pid(s),
                s.kind,
                s.name,
                s.attr("url.path"),
                s.attr("url.scheme"),
                s.attr("network.protocol.version"),
                s.trace_id,
                s.span_id,
                s.parent_span_id
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spans of one process and kind for /users/N, in request order.
fn users(spans: &[ReceivedSpan], p: u32, kind: i32) -> Vec<&ReceivedSpan> {
    let mut v: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            pid(s) == p
                && s.kind == kind
                && s.attr("url.path").is_some_and(|u| u.starts_with("/users/"))
        })
        .collect();
    v.sort_by_key(|s| s.start_unix_ns);
    v
}

/// Requests /users/1..3 made by `client` and served by `server`: one span per request on each
/// side, HTTPS, the second joined to the carried context on both sides, the others' server
/// spans children of their client spans.
fn assert_exact_and_linked(spans: &[ReceivedSpan], client: u32, server: u32, log: &str) {
    let log = format!("{log}\n{}", dump(spans));
    let want = ["/users/1", "/users/2", "/users/3"];
    let (cl, sv) = (users(spans, client, CLIENT), users(spans, server, SERVER));
    let sv: Vec<&ReceivedSpan> = sv
        .into_iter()
        .filter(|s| want.contains(&s.attr("url.path").unwrap()))
        .collect();
    let paths = |v: &[&ReceivedSpan]| {
        v.iter()
            .map(|s| s.attr("url.path").unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&cl), want, "client spans\n{log}");
    assert_eq!(paths(&sv), want, "server spans\n{log}");
    for s in cl.iter().chain(&sv) {
        assert_eq!(s.attr("url.scheme"), Some("https"), "{log}");
        assert_eq!(s.attr("http.response.status_code"), Some("200"), "{log}");
    }
    for s in [cl[1], sv[1]] {
        assert_eq!(
            (s.trace_id.as_str(), s.parent_span_id.as_str()),
            (CARRIED_TRACE, CARRIED_PARENT),
            "traceparent inside TLS\n{log}"
        );
    }
    for i in [0, 2] {
        assert_eq!(
            (sv[i].trace_id.as_str(), sv[i].parent_span_id.as_str()),
            (cl[i].trace_id.as_str(), cl[i].span_id.as_str()),
            "server span {i} is the child of its client span\n{log}"
        );
    }
}

fn assert_no_secret(receiver: &Receiver, log: &str) {
    let raw = receiver.raw();
    assert!(
        !loupe_tests::contains(&raw, SECRET.as_bytes()),
        "the planted secret left the node\n{log}"
    );
    assert!(!log.contains(SECRET), "the planted secret is in the log");
}

fn metric(metrics: &str, name: &str) -> u64 {
    loupe_tests::metric(metrics, name).unwrap_or_else(|| panic!("no {name}:\n{metrics}"))
}

#[test]
fn nginx_over_tls_with_curl_python_on_a_keep_alive_connection_and_java() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("tls-nginx");
    let dir = std::env::temp_dir().join(format!("loupe-tls-nginx-{}", std::process::id()));
    let nginx = loupe_tests::nginx_tls(&cg, &dir);
    let url = format!("https://{}", nginx.addr);
    // Its connection is open, and has carried a request, before the agent starts.
    let mut python = Stepped::start(cg.command(
        &venv_bin("python"),
        &[
            tests_dir().join("apps/tls_client.py").to_str().unwrap(),
            &url,
        ],
    ));
    let t = trace(&cg);
    python.step();
    let python_pid = python.child.id();
    let curl = cg.command(
        "curl",
        &[
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {SECRET}"),
            &format!("{url}/users/9?token={SECRET}"),
        ],
    );
    let out = run(curl);
    assert_eq!(out, "200");
    let java = run(cg.command(
        "java",
        &[
            tests_dir().join("apps/TlsJava.java").to_str().unwrap(),
            &url,
        ],
    ));
    assert_eq!(java.lines().collect::<Vec<_>>(), ["200", "200", "200"]);
    // Python's 3 x 2, curl's 2, nginx's 3 for Java.
    t.receiver
        .wait_for(Duration::from_secs(20), |s| s.len() >= 11);
    // The Java connection is declared unhooked once its records pass without plaintext.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut metrics = loupe_tests::scrape(&t.metrics_addr);
    while metric(&metrics, "loupe_tls_unhooked_total{library=\"java\"}") == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        metrics = loupe_tests::scrape(&t.metrics_addr);
    }
    let (_, log) = t.agent.stop_raw();
    python.finish();
    let spans = t.receiver.spans();
    let nginx_pid = spans
        .iter()
        .find(|s| s.kind == SERVER && s.service() == "nginx")
        .map(pid)
        .unwrap_or_else(|| panic!("no nginx span\n{log}\n{}", dump(&spans)));
    assert_exact_and_linked(&spans, python_pid, nginx_pid, &log);
    // curl: a fresh connection, both sides, linked; its query value redacted.
    let c9 = spans
        .iter()
        .find(|s| s.kind == CLIENT && s.attr("url.path") == Some("/users/9"))
        .unwrap_or_else(|| panic!("no curl span\n{log}\n{}", dump(&spans)));
    let s9 = spans
        .iter()
        .find(|s| s.kind == SERVER && s.attr("url.path") == Some("/users/9"))
        .unwrap_or_else(|| panic!("no nginx span for curl\n{log}\n{}", dump(&spans)));
    assert_eq!(c9.service(), "curl");
    assert_eq!(s9.parent_span_id, c9.span_id, "{log}\n{}", dump(&spans));
    assert_eq!(c9.attr("url.scheme"), Some("https"));
    // The JDK's client is not hooked; nginx's side of its connection is.
    let java_served = spans
        .iter()
        .filter(|s| s.kind == SERVER && pid(s) == nginx_pid)
        .count();
    assert_eq!(java_served, 3 + 1 + 3, "{log}\n{}", dump(&spans));
    assert!(
        metric(&metrics, "loupe_tls_unhooked_total{library=\"java\"}") >= 1,
        "{metrics}"
    );
    assert!(metric(&metrics, "loupe_tls_probed_files{library=\"openssl\"}") >= 1);
    assert!(metric(&metrics, "loupe_tls_hooked_connections_total") >= 4);
    assert_no_secret(&t.receiver, &log);
}

fn run(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_node_https_server_and_client_in_one_process() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("tls-node");
    let dir = std::env::temp_dir().join(format!("loupe-tls-node-{}", std::process::id()));
    let (cert, key) = loupe_tests::self_signed(&dir);
    let port = free_port().to_string();
    let mut node = Stepped::start(cg.command(
        "node",
        &[
            tests_dir().join("apps/tls_node.js").to_str().unwrap(),
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            &port,
        ],
    ));
    let t = trace(&cg);
    node.step();
    let node_pid = node.child.id();
    t.receiver
        .wait_for(Duration::from_secs(20), |s| s.len() >= 6);
    let metrics = loupe_tests::scrape(&t.metrics_addr);
    let (_, log) = t.agent.stop_raw();
    node.finish();
    let spans = t.receiver.spans();
    assert!(
        log.contains("TLS: OpenSSL probed in /usr/bin/node"),
        "{log}"
    );
    assert_exact_and_linked(&spans, node_pid, node_pid, &log);
    assert_eq!(
        metric(
            &metrics,
            "loupe_kernel_events_total{reason=\"tls_unbound\",kind=\"drop\"}"
        ),
        0,
        "{log}"
    );
    assert_no_secret(&t.receiver, &log);
}

#[test]
fn a_go_https_server_and_client_over_http2() {
    if !privileged() {
        return;
    }
    let bin = loupe_tests::build_go("tls_go");
    let cg = TestCgroup::new("tls-go");
    let dir = std::env::temp_dir().join(format!("loupe-tls-goc-{}", std::process::id()));
    let (cert, key) = loupe_tests::self_signed(&dir);
    let port = free_port().to_string();
    let mut go = Stepped::start(cg.command(
        bin.to_str().unwrap(),
        &[cert.to_str().unwrap(), key.to_str().unwrap(), &port],
    ));
    let t = trace(&cg);
    go.step();
    let go_pid = go.child.id();
    t.receiver
        .wait_for(Duration::from_secs(20), |s| s.len() >= 6);
    let metrics = loupe_tests::scrape(&t.metrics_addr);
    let (_, log) = t.agent.stop_raw();
    go.finish();
    let spans = t.receiver.spans();
    let version = std::process::Command::new("go")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let go_version = version.split_whitespace().nth(2).unwrap_or("go?");
    assert!(
        log.contains(&format!("TLS: Go {go_version} crypto/tls probed in")),
        "{log}"
    );
    assert_exact_and_linked(&spans, go_pid, go_pid, &log);
    for s in users(&spans, go_pid, CLIENT) {
        assert_eq!(s.attr("network.protocol.version"), Some("2"), "ALPN h2");
    }
    assert_eq!(
        metric(&metrics, "loupe_tls_probed_files{library=\"go\"}"),
        1
    );
    // Go's server shakes hands before its first Read and may buffer the first requests then:
    // the handshake must have tied the session to its socket.
    assert_eq!(
        metric(
            &metrics,
            "loupe_kernel_events_total{reason=\"tls_unbound\",kind=\"drop\"}"
        ),
        0,
        "{log}"
    );
    assert_no_secret(&t.receiver, &log);
    let _ = std::fs::remove_file(bin);
}

/// A Go program started after the agent is found and probed, and its HTTPS requests are traced
/// once the probes are on.
#[test]
fn a_go_program_started_after_the_agent_is_probed() {
    if !privileged() {
        return;
    }
    let bin = loupe_tests::build_go("tls_go");
    let cg = TestCgroup::new("tls-go-late");
    let dir = std::env::temp_dir().join(format!("loupe-tls-gol-{}", std::process::id()));
    let (cert, key) = loupe_tests::self_signed(&dir);
    let t = trace(&cg);
    let port = free_port().to_string();
    let mut go = Stepped::start(cg.command(
        bin.to_str().unwrap(),
        &[cert.to_str().unwrap(), key.to_str().unwrap(), &port],
    ));
    let go_pid = go.child.id();
    // Probing takes tens of milliseconds (the ELF is examined, then each probe attached); the
    // program's warm-up request may come before. Its next requests must not.
    let probed = format!("crypto/tls probed in {} (pid {go_pid}", bin.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !t.agent.log().contains(&probed) {
        assert!(
            std::time::Instant::now() < deadline,
            "not probed within 10 s\n{}",
            t.agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    go.step();
    t.receiver
        .wait_for(Duration::from_secs(20), |s| s.len() >= 6);
    let (_, log) = t.agent.stop_raw();
    go.finish();
    assert_exact_and_linked(&t.receiver.spans(), go_pid, go_pid, &log);
    let _ = std::fs::remove_file(bin);
}

/// Uprobes live as long as the agent's perf event descriptors, and hold its TLS programs: once
/// the programs are gone after kill -9, no probe is left on any library.
#[test]
fn no_probe_is_left_after_kill_9() {
    if !privileged() {
        return;
    }
    let uprobes = || {
        let out = Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .expect("bpftool");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("name ssl_read_ret") || l.contains("name go_tls_read_r"))
            .count()
    };
    // A process with libssl mapped, so that there is a file to probe.
    let mut holder = Command::new("python3")
        .args(["-c", "import ssl, sys; sys.stdin.read()"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = uprobes();
    let agent = Agent::spawn(&["--port", "1"], &[]);
    let during = uprobes();
    assert!(
        during > before,
        "the agent's uprobes are visible while it runs"
    );
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    drop(agent);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(uprobes(), before);
    drop(holder.stdin.take());
    let _ = holder.wait();
}
