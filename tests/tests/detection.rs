//! Privileged: user-space detection has the last word. A connection the kernel's prefilter lets
//! through (its first bytes start like a RESP array) but that no parser wants is told apart in
//! user space, counted, and the verdict written back to the kernel: its later traffic costs no
//! event. A real protocol on an unusual port is detected from its bytes.

use std::time::Duration;

use loupe_tests::{Agent, TestCgroup, free_port, metric, privileged, scrape};

/// A server that echoes lines, and a client that sends `messages` lines starting with '*' (the
/// prefilter's RESP row) that are not RESP, one round trip each, over one connection. `between`
/// runs after the first exchange, while the client waits.
fn lookalike_traffic(cg: &TestCgroup, port: u16, messages: usize, between: impl FnOnce()) {
    use std::io::{BufRead as _, Write as _};
    let script = format!(
        r#"
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", {port})); srv.listen(1)
def serve():
    c, _ = srv.accept()
    f = c.makefile("rb")
    for line in f:
        c.sendall(b"ok " + line)
threading.Thread(target=serve, daemon=True).start()
c = socket.create_connection(("127.0.0.1", {port}))
f = c.makefile("rb")
for i in range({messages}):
    c.sendall(b"*star-protocol hello %d\n" % i)
    f.readline()
    if i == 0:
        print("first", flush=True)
        sys.stdin.readline()
"#
    );
    let mut child = cg
        .command("python3", &["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "first");
    between();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_lookalike_connection_is_rejected_in_user_space_and_silenced_in_the_kernel() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("detect");
    let maddr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--metrics-addr",
            &maddr,
            "--otlp-endpoint",
            "http://127.0.0.1:9",
            "--otlp-protocol",
            "grpc",
        ],
        &[],
    );
    let emitted =
        |t: &str| metric(t, "loupe_kernel_events_total{reason=\"events_emitted\"").unwrap_or(0);
    let before = scrape(&maddr);
    const MESSAGES: usize = 200;
    let mut first = String::new();
    lookalike_traffic(&cg, free_port(), MESSAGES, || {
        // The verdict lands while the client waits after its first exchange.
        std::thread::sleep(Duration::from_millis(500));
        first = scrape(&maddr);
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(&maddr);
    drop(agent);

    assert_eq!(
        metric(&after, "loupe_l7_ignored_connections_total"),
        Some(2),
        "both sides of the connection rejected:\n{after}"
    );
    assert!(metric(&after, "loupe_l7_rejected_total{protocol=\"redis\"}").unwrap_or(0) >= 2);
    assert_eq!(
        metric(&after, "loupe_l7_detected_total{protocol=\"redis\"}"),
        Some(0)
    );
    // After the first exchange each side sends and receives MESSAGES - 1 lines: 4 events each
    // if nothing were silenced. (The first phase also holds the fork records of the
    // interpreter's start-up, ~40 here.)
    eprintln!(
        "events: first exchange {}, the rest {}",
        emitted(&first) - emitted(&before),
        emitted(&after) - emitted(&first)
    );
    let events = emitted(&after) - emitted(&first);
    if std::env::var_os("LOUPE_TEST_DEBUG").is_some() {
        for l in first.lines().filter(|l| !l.starts_with('#')) {
            let name = l.rsplit_once(' ').map(|(n, _)| n).unwrap_or(l);
            let old = before.lines().find(|b| b.starts_with(name)).unwrap_or("");
            if old != l {
                eprintln!("{old} -> {l}");
            }
        }
    }
    assert!(
        events <= 8,
        "{events} events after the verdict should have silenced the connection"
    );
}
