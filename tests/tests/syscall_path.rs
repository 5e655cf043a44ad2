//! Privileged end-to-end: the capture path of kernels without the sock tracepoints (before
//! 6.3), forced on this kernel with `--capture-path syscalls`, so that CI keeps it green. The
//! byte-exact capture of every syscall family on this path is in capture.rs; `cargo xtask
//! kernels` runs these on real 5.10, 6.1 and 6.12 kernels, where the agent picks it itself.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use loupe_tests::{
    Agent, Server, TestCgroup, free_port, otlp::Receiver, privileged, tests_dir, venv_bin,
};

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

/// nginx serving a static file with sendfile() and a fixed body from memory.
fn nginx_with_files(cg: &TestCgroup, dir: &std::path::Path, body: &[u8]) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::create_dir_all(dir.join("www/static")).unwrap();
    std::fs::write(dir.join("www/static/big.bin"), body).unwrap();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\ndaemon off;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen {addr};\n    root {d}/www;\n\
             location /users/ {{ return 200 '{{\"ok\":true}}'; }}\n  }}\n}}\n",
        d = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let cmd = cg.command(
        "nginx",
        &[
            "-p",
            dir.to_str().unwrap(),
            "-c",
            conf_path.to_str().unwrap(),
        ],
    );
    Server::start(cmd, addr)
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
    let server = nginx_with_files(&cg, &tmp, &body);
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
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = cg.command(
        "python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    );
    cmd.current_dir(tests_dir().join("apps"));
    let server = Server::start(cmd, addr);
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
