//! Privileged: day-two behaviour an operator relies on — the metrics endpoint is bound at start
//! (a busy address is an error, `:PORT` means every interface), and logs carry no colour codes
//! when they go to a pipe or file.

use std::time::{Duration, Instant};

use loupe_tests::{Agent, free_port, loupe_bin, metric, privileged, scrape};

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
