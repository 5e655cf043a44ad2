//! Privileged: day-two behaviour an operator relies on — the metrics endpoint is bound at start
//! (a busy address is an error, `:PORT` means every interface), and logs carry no colour codes
//! when they go to a pipe or file.

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
            "--pid",
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
