//! Privileged end-to-end: the capture path of kernels without the sock tracepoints (before
//! 6.3), forced on this kernel with `--capture-path syscalls`, so that CI keeps it green. The
//! byte-exact capture of every syscall family on this path is in capture.rs; `cargo xtask
//! kernels` runs these on real 5.10, 6.1 and 6.12 kernels, where the agent picks it itself.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
    time::Duration,
};

use loupe_tests::{Agent, TestCgroup, otlp::Receiver, privileged, venv_bin};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// The path the tests ask for: `syscalls`, or what `cargo xtask kernels` sets (`auto` on a
/// kernel that has no other, to prove the agent chooses it).
fn capture_path() -> String {
    std::env::var("LOUPE_TEST_CAPTURE_PATH").unwrap_or_else(|_| "syscalls".into())
}

fn assert_path(agent: &Agent) {
    let log = agent.log();
    assert!(log.contains("capture: syscall tracepoints"), "{log}");
}

/// A response body sent with sendfile() moves the connection's stream without passing through
/// user memory: the path must still count its bytes, or the next response on the keep-alive
/// connection is read as the rest of this body. The connection is opened (and used) before the
/// agent starts, as a client pool's would be.
#[test]
fn sendfile_responses_on_a_connection_opened_before_the_agent() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("syscall-path");
    let tmp = std::env::temp_dir().join(format!("loupe-syscall-path-{}", std::process::id()));
    let body: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::create_dir_all(tmp.join("www/static")).unwrap();
    std::fs::write(tmp.join("www/static/big.bin"), &body).unwrap();
    let server = loupe_tests::nginx_static(&cg, &tmp);
    let script = format!(
        "import http.client, sys\n\
         c = http.client.HTTPConnection('{host}', {port})\n\
         c.request('GET', '/users/0'); r = c.getresponse(); r.read()\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         for p in ['/static/big.bin', '/users/1', '/static/big.bin', '/users/2']:\n\
         \x20   c.request('GET', p); r = c.getresponse(); n = len(r.read())\n\
         \x20   print(p, r.status, n, flush=True)\n",
        host = server.addr.ip(),
        port = server.addr.port()
    );
    let mut client = cg
        .command(&venv_bin("python"), &["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python client");
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let receiver = Receiver::start();
    let ep = format!("http://{}", receiver.grpc);
    let path = capture_path();
    let agent = Agent::spawn(
        &[
            "run",
            "--cgroup",
            &cg.dir,
            "--capture-path",
            &path,
            "--otlp-endpoint",
            &ep,
            "--otlp-protocol",
            "grpc",
        ],
        &[],
    );
    assert_path(&agent);
    client.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut replies = Vec::new();
    for l in out.lines() {
        replies.push(l.unwrap());
    }
    assert!(client.wait().unwrap().success());
    assert_eq!(
        replies,
        [
            "/static/big.bin 200 20000",
            "/users/1 200 11",
            "/static/big.bin 200 20000",
            "/users/2 200 11"
        ]
    );
    receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 8);
    // Anything beyond the eight would be a wrong span: give it time to arrive.
    std::thread::sleep(Duration::from_millis(500));
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let _ = std::fs::remove_dir_all(&tmp);

    for kind in [SERVER, CLIENT] {
        let mut seen: Vec<_> = spans
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| {
                (
                    s.start_unix_ns,
                    s.attr("url.path").unwrap_or("").to_string(),
                    s.attr("http.response.status_code")
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect();
        seen.sort();
        let seen: Vec<_> = seen.into_iter().map(|(_, p, c)| (p, c)).collect();
        let want: Vec<_> = ["/static/big.bin", "/users/1", "/static/big.bin", "/users/2"]
            .iter()
            .map(|p| (p.to_string(), "200".to_string()))
            .collect();
        assert_eq!(seen, want, "kind {kind}: {spans:#?}\n{log}");
    }
}

/// The README's first command on such a kernel: traces on the terminal, no backend. curl calls
/// Python's http.server, which was running before the agent.
#[test]
fn spans_print_on_the_terminal() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("syscall-path-console");
    let server = loupe_tests::python_http_server(&cg);
    let path = capture_path();
    let agent = Agent::spawn(&["--cgroup", &cg.dir, "--capture-path", &path], &[]);
    assert_path(&agent);
    cg.run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{}/users/7", server.addr),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, log) = agent.stop_raw();
    let text = stdout.join("\n");
    let client = stdout
        .iter()
        .position(|l| l.contains("curl [") && l.contains("CLIENT GET /users/{id}"));
    let server = stdout
        .iter()
        .position(|l| l.contains("SERVER GET /users/{id}") && l.contains("404"));
    let (Some(c), Some(s)) = (client, server) else {
        panic!("{text}\n{log}")
    };
    assert_eq!(s, c + 1, "the server span under curl's:\n{text}");
}
