//! Harness for the privileged end-to-end tests: start the real `loupe` binary, drive real
//! sockets, stop the agent (it drains the ring buffer on SIGINT) and inspect what it printed.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde::Deserialize;

pub mod databases;
pub mod otlp;
pub mod sockets;

/// Whether this test may run. Without root (or without the kernel features) it is skipped
/// locally but fails under CI=true: CI must never pass by skipping the tests that matter.
pub fn privileged() -> bool {
    // SAFETY: plain syscall without arguments.
    let root = unsafe { libc::geteuid() } == 0;
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    if root && btf {
        return true;
    }
    let why = if root {
        "the kernel has no BTF"
    } else {
        "not running as root"
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged test cannot run under CI: {why}");
    }
    eprintln!("skipping privileged test: {why} (run `cargo xtask test`)");
    false
}

/// How many times slower than a real machine this one runs (`LOUPE_TEST_SLOWDOWN`, set by
/// `cargo xtask kernels` for an emulated guest): startup deadlines scale with it.
pub fn slowdown() -> u32 {
    std::env::var("LOUPE_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

pub fn loupe_bin() -> PathBuf {
    std::env::var_os("LOUPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/loupe"
            ))
        })
}

#[derive(Debug, Clone, Deserialize)]
pub struct DataLine {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub conn: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: String,
    pub protocol: String,
    pub direction: String,
    pub syscall: String,
    pub seq: u64,
    pub bytes: u32,
    pub captured: usize,
    pub truncated: bool,
    pub no_payload: bool,
    pub midstream: bool,
    pub lost_before: u64,
    pub payload_b64: String,
}

impl DataLine {
    pub fn payload(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload_b64)
            .expect("valid base64")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CloseLine {
    pub conn: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub totals: Option<[u64; 2]>,
}

/// Everything one agent run printed.
#[derive(Debug, Default)]
pub struct Captured {
    pub data: Vec<DataLine>,
    pub closes: Vec<CloseLine>,
    pub stderr: String,
}

impl Captured {
    /// Events of the socket whose local end is `local` and peer is `remote`.
    pub fn of(&self, local: SocketAddr, remote: SocketAddr) -> Vec<&DataLine> {
        self.data
            .iter()
            .filter(|d| d.local == local && d.remote == remote)
            .collect()
    }

    /// The reassembled stream one socket sent or received, checked for continuity: each event
    /// must start where the previous one ended, and no bytes may be missing inside it.
    pub fn stream(&self, local: SocketAddr, remote: SocketAddr, direction: &str) -> Vec<u8> {
        let mut events: Vec<&DataLine> = self
            .of(local, remote)
            .into_iter()
            .filter(|d| d.direction == direction)
            .collect();
        events.sort_by_key(|d| d.seq);
        let mut out = Vec::new();
        let mut next: Option<u64> = None;
        for ev in events {
            if let Some(n) = next {
                assert_eq!(
                    ev.seq, n,
                    "{direction} stream of {local}<->{remote} has a hole before seq {}",
                    ev.seq
                );
            }
            assert_eq!(ev.lost_before, 0, "bytes lost before seq {}", ev.seq);
            assert!(
                !ev.truncated && !ev.no_payload,
                "event at seq {} not fully captured: {ev:?}",
                ev.seq
            );
            out.extend(ev.payload());
            next = Some(ev.seq + ev.bytes as u64);
        }
        out
    }

    pub fn any_payload_contains(&self, needle: &[u8]) -> bool {
        self.data.iter().any(|d| contains(&d.payload(), needle))
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A running `loupe capture --json`.
pub struct Agent {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr_log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Agent {
    /// Starts `loupe capture --json ARGS` and waits until it reports it is attached.
    pub fn start(args: &[&str]) -> Agent {
        let mut all = vec!["capture", "--json"];
        all.extend_from_slice(args);
        Agent::spawn(&all, &[])
    }

    /// Starts `loupe ARGS` with extra environment and waits until it reports it is attached.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::spawn_via(&[], &loupe_bin(), args, env)
    }

    /// Starts `WRAPPER... BIN ARGS` (e.g. capsh dropping privileges, which then execs the agent)
    /// and waits until the agent reports it is attached.
    pub fn spawn_via(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(args)
            .envs(env.iter().copied())
            .env("LOUPE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run `cargo xtask build`)",
                    bin.display()
                )
            });

        let (out_tx, out_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if out_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.contains("ready:") {
                    let _ = ready_tx.send(());
                }
                log2.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let ready_within = Duration::from_secs(30) * slowdown();
        let deadline = Instant::now() + ready_within;
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "loupe exited before it was ready ({status}):\n{}",
                    log.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "loupe not ready after {} s:\n{}",
                ready_within.as_secs(),
                log.lock().unwrap()
            );
        }
        Agent {
            child,
            stdout: out_rx,
            stderr_log: log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        self.stderr_log.lock().unwrap().clone()
    }

    /// SIGINT, wait for the agent to drain and exit, and parse what `capture --json` printed.
    pub fn stop(self) -> Captured {
        let (stdout, stderr) = self.stop_raw();
        let mut captured = Captured {
            stderr,
            ..Default::default()
        };
        for line in stdout {
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON line {line}: {e}"));
            match v["type"].as_str() {
                Some("data") => captured
                    .data
                    .push(serde_json::from_value(v).expect("data line")),
                Some("close") => captured
                    .closes
                    .push(serde_json::from_value(v).expect("close line")),
                other => panic!("unknown line type {other:?}: {line}"),
            }
        }
        captured
    }

    /// SIGINT, wait for the agent to flush and exit; its stdout lines and its log.
    pub fn stop_raw(self) -> (Vec<String>, String) {
        self.stop_with(libc::SIGINT)
    }

    /// Sends `signal`, waits for the agent to flush and exit; its stdout lines and its log.
    pub fn stop_with(mut self, signal: i32) -> (Vec<String>, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("loupe did not stop within 20 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the reader threads see EOF.
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr_log.lock().unwrap().clone();
        assert!(status.success(), "loupe exited with {status}:\n{stderr}");
        (self.stdout.try_iter().collect(), stderr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's Prometheus text from its `--metrics-addr`.
pub fn scrape(addr: &str) -> String {
    get(addr, "/metrics")
}

/// The whole answer (status line, headers, body) to `GET path` on the agent's metrics address.
pub fn get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// Counts of the agent's Prometheus text by metric line prefix.
pub fn metric(text: &str, line_prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs `python3 -c SCRIPT` to completion and returns its stdout (for traffic from another pid).
pub fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3 is installed");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads everything from a reader; small helper for HTTP-ish exchanges.
pub fn read_all(mut r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// Payload bytes that exercise every byte value, deterministic per seed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Groups events by connection id, for debugging output.
pub fn by_conn(c: &Captured) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in &c.data {
        *m.entry(d.conn.clone()).or_insert(0) += 1;
    }
    m
}

/// A cgroup v2 directory for the processes a test traces: the agent selects it with --cgroup, so
/// nothing else on the machine (the test's own OTLP receiver included) shows up.
pub struct TestCgroup {
    pub dir: String,
    /// Parent directories this cgroup created, innermost first (removed after it).
    parents: Vec<String>,
}

fn cgroup2_root() -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| f[1].to_string())
        })
        .expect("a cgroup2 hierarchy is mounted")
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let dir = format!("{}/loupe-{name}-{}", cgroup2_root(), std::process::id());
        std::fs::create_dir_all(&dir).expect("create the test cgroup");
        TestCgroup {
            dir,
            parents: Vec::new(),
        }
    }

    /// A cgroup at `path` below the cgroup v2 root (e.g. the path a container runtime would
    /// give a container); the directories it creates go with it.
    pub fn at(path: &str) -> TestCgroup {
        let root = cgroup2_root();
        let mut created = Vec::new();
        let mut dir = root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            dir = format!("{dir}/{part}");
            if std::fs::create_dir(&dir).is_ok() {
                created.push(dir.clone());
            }
        }
        assert!(
            std::path::Path::new(&dir).is_dir(),
            "cannot create cgroup {dir}"
        );
        created.pop();
        created.reverse();
        TestCgroup {
            dir,
            parents: created,
        }
    }

    /// `program args...`, started inside this cgroup.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.dir
            ))
            .arg("sh")
            .arg(program)
            .args(args);
        c
    }

    /// Runs `program args...` in this cgroup to completion; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(format!("{}/cgroup.procs", self.dir)) {
            for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: signalling processes this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for parent in &self.parents {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A server process the test started; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

/// Waits until `addr` accepts connections (30 s at most).
pub fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Server {
    /// Starts `cmd` and waits until `addr` accepts connections.
    pub fn start(mut cmd: Command, addr: SocketAddr) -> Server {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
        let mut server = Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = server.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("server exited ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "server on {addr} not up after 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; SIGTERM lets gunicorn and nginx stop their workers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tests/ (for apps/ and .venv/).
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn venv_bin(name: &str) -> String {
    let p = tests_dir().join(".venv/bin").join(name);
    assert!(
        p.exists(),
        "{} missing: run tests/setup.sh (cargo xtask test does)",
        p.display()
    );
    p.display().to_string()
}

/// nginx with its own prefix and configuration, answering fixed bodies.
pub fn nginx(cg: &TestCgroup, dir: &std::path::Path) -> Server {
    nginx_with(cg, dir, None, false)
}

/// A self-signed certificate and key for 127.0.0.1 / localhost, made with the openssl CLI.
pub fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// nginx answering HTTPS with a certificate made by `self_signed`.
pub fn nginx_tls(cg: &TestCgroup, dir: &std::path::Path) -> Server {
    let (cert, key) = self_signed(dir);
    nginx_with(cg, dir, Some((cert, key)), false)
}

/// nginx that also serves the files under `dir/www` with sendfile() (the caller writes them).
pub fn nginx_static(cg: &TestCgroup, dir: &std::path::Path) -> Server {
    nginx_with(cg, dir, None, true)
}

/// Python's http.server inside `cg`, serving tests/apps.
pub fn python_http_server(cg: &TestCgroup) -> Server {
    python_http_server_with_env(cg, &[])
}

/// The same, with environment variables (a service declaring its own resource).
pub fn python_http_server_with_env(cg: &TestCgroup, env: &[(&str, &str)]) -> Server {
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
    cmd.current_dir(tests_dir().join("apps"))
        .envs(env.iter().copied());
    Server::start(cmd, addr)
}

fn nginx_with(
    cg: &TestCgroup,
    dir: &std::path::Path,
    tls: Option<(PathBuf, PathBuf)>,
    static_files: bool,
) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let listen = match &tls {
        Some((cert, key)) => format!(
            "{addr} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {}",
            cert.display(),
            key.display()
        ),
        None => addr.to_string(),
    };
    let files = if static_files {
        format!(
            "sendfile on;\n    root {}/www;\n    location /static/ {{ }}",
            dir.display()
        )
    } else {
        String::new()
    };
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\ndaemon off;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen {listen};\n    {files}\n    location /users/ {{ return 200 '{{\"ok\":true}}'; }}\n\
             location / {{ return 404; }}\n  }}\n}}\n",
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

/// Builds the Go program in tests/apps/APP with the machine's Go (stdlib only, offline), into
/// a file of the temp dir named `loupe-APP-PID`; the caller removes it.
pub fn build_go(app: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("loupe-{app}-{}", std::process::id()));
    let cache = std::env::temp_dir().join("loupe-go-cache");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(tests_dir().join("apps").join(app))
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .status()
        .expect("go (Debian's golang-go; tests/setup.sh installs it)");
    assert!(status.success(), "go build of tests/apps/{app} failed");
    out
}

/// The test Flask app (tests/apps/flask_app.py) under gunicorn with `workers` workers, in `cg`,
/// named `service` (OTEL_SERVICE_NAME) when given.
pub fn gunicorn(cg: &TestCgroup, workers: u32, service: Option<&str>) -> Server {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let apps = tests_dir().join("apps");
    let (bind, workers) = (addr.to_string(), workers.to_string());
    let mut cmd = cg.command(
        &venv_bin("gunicorn"),
        &[
            "--chdir",
            apps.to_str().unwrap(),
            "-b",
            &bind,
            "-w",
            &workers,
            "flask_app:app",
        ],
    );
    cmd.current_dir(&apps);
    if let Some(name) = service {
        cmd.env("OTEL_SERVICE_NAME", name);
    }
    Server::start(cmd, addr)
}
