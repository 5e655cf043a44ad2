//! Privileged: what `--pid`, `--exe` and `--port` select, against real processes — a master's
//! workers forked before and after the agent started, a server started after it by name, and one
//! port among a cgroup's servers, one of them speaking TLS.

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    process::Stdio,
    time::Duration,
};

use loupe_tests::{
    Agent, Server, TestCgroup, databases::TempDir, free_port, nginx, nginx_tls, privileged,
    tests_dir, wait_for_port,
};

fn spans(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (kind, service, url.path) of each span, sorted.
fn summary(spans: &[serde_json::Value]) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = spans
        .iter()
        .map(|s| {
            (
                s["kind"].as_str().unwrap_or("").to_string(),
                s["resource"]["service.name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                s["attributes"]["url.path"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn curl(url: &str) {
    let ok = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", url])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{url}");
}

#[test]
fn pid_selects_a_masters_workers_forked_before_and_after_the_agent() {
    if !privileged() {
        return;
    }
    let (p1, p2) = (free_port(), free_port());
    let mut master = std::process::Command::new("python3")
        .arg(tests_dir().join("apps/forking_master.py"))
        .args([p1.to_string(), p2.to_string()])
        .current_dir(tests_dir().join("apps"))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(master.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    let first: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    wait_for_port(first);
    // An unrelated server the selection must leave out.
    let other_port = free_port();
    let other = Server::start(
        {
            let mut c = std::process::Command::new("python3");
            c.args([
                "-m",
                "http.server",
                &other_port.to_string(),
                "--bind",
                "127.0.0.1",
            ]);
            c
        },
        format!("127.0.0.1:{other_port}").parse().unwrap(),
    );

    let dir = TempDir::new("select-pid");
    let out = dir.0.join("spans.jsonl");
    let master_pid = master.id().to_string();
    let agent = Agent::spawn(
        &["--pid", &master_pid, "--output", out.to_str().unwrap()],
        &[],
    );
    let mut stdin = master.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    said.read_line(&mut line).unwrap();
    let second: SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    wait_for_port(second);

    curl(&format!("http://{first}/before"));
    curl(&format!("http://{second}/after"));
    curl(&format!("http://{}/other", other.addr));
    std::thread::sleep(Duration::from_millis(500));
    let (_, log) = agent.stop_raw();
    // The workers outlive their master: end the whole group.
    // SAFETY: signalling the process group this test created.
    unsafe { libc::kill(-(master.id() as i32), libc::SIGTERM) };
    let _ = master.wait();
    let got = summary(&spans(&out));
    assert_eq!(
        got,
        vec![
            ("server".into(), "forking_master".into(), "/after".into()),
            ("server".into(), "forking_master".into(), "/before".into()),
        ],
        "only the master's workers, both of them:\n{log}"
    );
    assert!(
        log.contains("selected 1 processes and 1 descendants"),
        "{log}"
    );
}

#[test]
fn exe_selects_a_server_started_after_the_agent_and_port_narrows_a_cgroup() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("select-port");
    let py_port = free_port();
    let python = Server::start(
        cg.command(
            "python3",
            &[
                "-m",
                "http.server",
                &py_port.to_string(),
                "--bind",
                "127.0.0.1",
            ],
        ),
        format!("127.0.0.1:{py_port}").parse().unwrap(),
    );
    let dir = TempDir::new("select-exe");

    // --exe nginx: nginx is not running yet; it starts (execs) after the agent.
    let out = dir.0.join("exe.jsonl");
    let agent = Agent::spawn(&["--exe", "nginx", "--output", out.to_str().unwrap()], &[]);
    let web = nginx(&cg, &dir.0.join("nginx"));
    curl(&format!("http://{}/users/1", web.addr));
    curl(&format!("http://{}/py", python.addr));
    std::thread::sleep(Duration::from_millis(500));
    let (_, log) = agent.stop_raw();
    assert_eq!(
        summary(&spans(&out)),
        vec![("server".into(), "nginx".into(), "/users/1".into())],
        "{log}"
    );

    // --cgroup with --port: of the cgroup's three servers, only nginx's port; curl (outside the
    // cgroup) is not selected either. The HTTPS nginx's plaintext comes from uprobes on its
    // libssl, which are not per port: its connection stays left out all the same.
    let https = nginx_tls(&cg, &dir.0.join("nginx-tls"));
    let out = dir.0.join("port.jsonl");
    let nginx_port = web.addr.port().to_string();
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--port",
            &nginx_port,
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    curl(&format!("https://{}/tls", https.addr));
    curl(&format!("http://{}/users/2", web.addr));
    curl(&format!("http://{}/py", python.addr));
    std::thread::sleep(Duration::from_millis(500));
    let (_, log) = agent.stop_raw();
    assert_eq!(
        summary(&spans(&out)),
        vec![("server".into(), "nginx".into(), "/users/2".into())],
        "{log}"
    );
}
