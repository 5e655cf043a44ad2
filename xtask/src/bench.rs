//! `cargo xtask bench`: what Loupe costs a traced service, measured with and without the agent in
//! the same run, alternating rounds. Prints a table; asserts nothing.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{run, step};

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub connections: usize,
    pub agent_args: Vec<String>,
    /// Workload names to run; empty runs all and the criterion benchmarks.
    pub only: Vec<String>,
    /// Another build of the agent whose columns every table adds, in the same alternating
    /// rounds: two builds compared on the host as it is at that moment, not on two days.
    pub baseline: Option<PathBuf>,
}

impl Options {
    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == workload)
    }
}

struct Workload {
    name: &'static str,
    url: String,
    /// The server's processes (parent and workers), for `--pid`.
    pids: Vec<u32>,
    /// Whether the load generator's side can have spans when traced: oha's TLS is rustls,
    /// linked into it, so over HTTPS its side is ciphertext only.
    client_spans: bool,
    _server: Guard,
}

/// A process and its children: nginx and gunicorn serve from worker processes.
fn process_tree(pid: u32) -> Vec<u32> {
    // The workers fork right after the listener opens.
    std::thread::sleep(Duration::from_millis(500));
    let mut pids = vec![pid];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    pids.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok()),
    );
    pids
}

/// Kills a child process (and waits for it) when dropped.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc_kill(self.0.id() as i32, 15) };
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[derive(Debug, Default, Clone, Copy)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    requests: u64,
    /// The host's CPU busy during the load, in % of all its cores (fixed-rate runs): half of
    /// the saturation rate can keep the host far busier than half, and the tail at a fixed
    /// rate grows with how busy it is, whoever takes the CPU.
    host_busy_pct: f64,
}

/// (busy, total) jiffies of all CPUs so far, from /proc/stat (idle and iowait are not busy).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// `load`, with the host's CPU busy while it ran.
fn busy_during(load: impl FnOnce() -> anyhow::Result<Load>) -> anyhow::Result<Load> {
    let (b0, t0) = cpu_jiffies();
    let mut l = load()?;
    let (b1, t1) = cpu_jiffies();
    l.host_busy_pct = 100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
    Ok(l)
}

#[derive(Debug, Default, Clone)]
struct AgentCost {
    cpu_seconds: f64,
    /// User-space and kernel CPU of the agent's own threads (the kernel programs run in the
    /// traced processes' time and are `kernel_ns`).
    user_seconds: f64,
    sys_seconds: f64,
    rss_mib: f64,
    /// The programs' run time over the round; 0 unless it timed them (`Timing`).
    kernel_ns: u64,
    events: u64,
    drops: u64,
    spans_exported: u64,
    /// Non-zero drop counters by name, over the round.
    drop_reasons: Vec<(String, u64)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn ensure_tools(root: &Path) -> anyhow::Result<()> {
    if Command::new("oha").arg("--version").output().is_err() {
        step("installing the load generator oha from crates.io (once)");
        run(Command::new("cargo").args(["install", "oha", "--version", "^1.16", "--locked"]))?;
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        step("installing bpftool (kernel program run times)");
        apt_install("bpftool")?;
    }
    if Command::new("h2load").arg("--version").output().is_err() {
        step("installing h2load (nghttp2-client: the gRPC load generator)");
        apt_install("nghttp2-client")?;
    }
    run(Command::new("bash").arg(root.join("tests/setup.sh")))
}

/// The package index a fresh or long-running machine has may name versions the mirror no longer
/// holds (a 404 on install): it is refreshed first, as tests/setup.sh does.
pub(crate) fn apt_install(package: &str) -> anyhow::Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get").args(["install", "-y", "-qq", package]))
}

/// nginx answering a fixed body; over TLS (a self-signed certificate made here) when `tls`.
fn nginx(dir: &Path, tls: bool) -> anyhow::Result<Workload> {
    let port = free_port();
    std::fs::create_dir_all(dir.join("logs"))?;
    let listen = if tls {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()))?;
        format!(
            "127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {}",
            cert.display(),
            key.display()
        )
    } else {
        format!("127.0.0.1:{port}")
    };
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\ndaemon off;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n  server {{\n    listen {listen};\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("nginx")
        .args([
            "-p",
            dir.to_str().unwrap(),
            "-c",
            dir.join("nginx.conf").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    wait_port(port)?;
    let (name, scheme) = if tls {
        ("nginx over TLS (uprobes on libssl), tiny response", "https")
    } else {
        ("nginx, tiny response", "http")
    };
    Ok(Workload {
        name,
        url: format!("{scheme}://127.0.0.1:{port}/"),
        pids: process_tree(child.id()),
        client_spans: !tls,
        _server: Guard(child),
    })
}

fn python(root: &Path) -> anyhow::Result<Workload> {
    let port = free_port();
    let apps = root.join("tests/apps");
    let child = Command::new(root.join("tests/.venv/bin/gunicorn"))
        .args([
            "--chdir",
            apps.to_str().unwrap(),
            "-b",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "-k",
            "gthread",
            "-w",
            "1",
            "--threads",
            "8",
            "flask_app:app",
        ])
        .current_dir(&apps)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting gunicorn")?;
    wait_port(port)?;
    Ok(Workload {
        name: "Python, ~ms of work",
        url: format!("http://127.0.0.1:{port}/work/7"),
        pids: process_tree(child.id()),
        client_spans: true,
        _server: Guard(child),
    })
}

/// Runs oha; `rate` None saturates with `connections`, Some(q) holds q requests/s.
fn oha(url: &str, seconds: u64, connections: usize, rate: Option<f64>) -> anyhow::Result<Load> {
    let mut cmd = Command::new("oha");
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-z",
        &format!("{seconds}s"),
    ])
    .args(["-c", &connections.to_string()]);
    if url.starts_with("https:") {
        // The benchmark's own self-signed certificate.
        cmd.arg("--insecure");
    }
    if let Some(q) = rate {
        cmd.args(["-q", &format!("{q:.0}")]);
    }
    let out = cmd.arg(url).output().context("running oha")?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let ok: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|c| c.as_u64()).sum())
        .unwrap_or(0);
    Ok(Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: pct("p50"),
        p99_ms: pct("p99"),
        p999_ms: pct("p99.9"),
        requests: ok,
        ..Load::default()
    })
}

struct Agent {
    child: Child,
    metrics_port: u16,
}

/// `pids`: the processes to trace; empty traces every process.
fn start_agent(bin: &Path, otlp: &str, pids: &[u32], extra: &[String]) -> anyhow::Result<Agent> {
    let metrics_port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(extra);
    if !pids.is_empty() {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        cmd.args(["--pid", &list.join(",")]);
    }
    let mut child = cmd
        .args([
            "--otlp-endpoint",
            otlp,
            "--otlp-protocol",
            "grpc",
            "--summary-interval",
            "0",
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting loupe")?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("ready:") => break,
            Some(Ok(_)) => {}
            _ => bail!("loupe exited before it was ready"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    wait_port(metrics_port)?;
    Ok(Agent {
        child,
        metrics_port,
    })
}

/// (user, system) CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are 11 and 12 after the state field.
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Total run time of Loupe's kernel programs so far (kernel.bpf_stats_enabled must be on). By
/// program name: bpftool here does not report owning pids; only one agent runs at a time.
fn kernel_ns() -> u64 {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
    else {
        return 0;
    };
    let Ok(progs) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return 0;
    };
    // The TLS uprobes (ssl_*, go_tls_*), Go's handoff probes (go_http_*) and the futex-wake
    // program (sched_waking, which runs on every wakeup of the host) count too.
    let ours = |n: &str| {
        n.starts_with("sys_enter_")
            || n.starts_with("sys_exit_")
            // The syscall capture path's exit programs (exit_recv_buf, ...).
            || n.starts_with("exit_")
            || n.starts_with("sock_")
            || n.starts_with("ssl_")
            || n.starts_with("go_tls_")
            || n.starts_with("go_http_")
            || n == "inet_sock_set_state"
            || n == "sched_process_fork"
            || n == "sched_waking"
            || n == "task_newtask"
            || n == "sched_process_exec"
            || n == "sched_process_exit"
    };
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(ours))
        .filter_map(|p| p["run_time_ns"].as_u64())
        .sum()
}

fn scrape(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    out
}

fn metric_sum(text: &str, prefix: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Whether a round times the kernel programs (`kernel.bpf_stats_enabled` on for its length).
/// The statistics cost every program run on the host two clock reads and a per-CPU update,
/// paid by the traced services: with them on, every process traced, nginx's saturation
/// throughput was ~2% lower (9 alternating pairs). So throughput and latency are measured with
/// them off, and the programs' time in rounds of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Timing {
    Off,
    KernelPrograms,
}

/// Turns the kernel's BPF run-time statistics on or off.
fn bpf_stats(on: bool) {
    let _ = Command::new("sysctl")
        .args(["-qw", &format!("kernel.bpf_stats_enabled={}", on as u8)])
        .status();
}

/// The statistics on until dropped.
struct StatsOn;

impl StatsOn {
    fn new() -> Self {
        bpf_stats(true);
        Self
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        bpf_stats(false);
    }
}

/// One loaded round with the agent attached: the load and what the agent cost meanwhile.
fn with_agent(
    bin: &Path,
    otlp: &str,
    pids: &[u32],
    extra: &[String],
    timing: Timing,
    load: impl FnOnce() -> anyhow::Result<Load>,
) -> anyhow::Result<(Load, AgentCost)> {
    let mut agent = start_agent(bin, otlp, pids, extra)?;
    let pid = agent.child.id();
    let timed = timing == Timing::KernelPrograms;
    // Off again when the round ends, however it ends.
    let _stats = timed.then(StatsOn::new);
    let before = (cpu_seconds(pid), kernel_ns(), scrape(agent.metrics_port));
    let l = load()?;
    // Let the last events drain and export (reader every 10 ms, export every second).
    std::thread::sleep(Duration::from_millis(1500));
    let after = (cpu_seconds(pid), kernel_ns(), scrape(agent.metrics_port));
    drop(_stats);
    let volume = |t: &str| metric_sum(t, "loupe_kernel_events_total", "reason=\"events_emitted\"");
    let drops = |t: &str| {
        metric_sum(t, "loupe_kernel_events_total", "kind=\"drop\"")
            + metric_sum(t, "loupe_channel_full_total", "")
            + metric_sum(t, "loupe_export_queue_full_total", "")
            + metric_sum(t, "loupe_export_failed_total", "")
            + metric_sum(t, "loupe_decode_errors_total", "")
    };
    let cost = AgentCost {
        cpu_seconds: (after.0.0 + after.0.1) - (before.0.0 + before.0.1),
        user_seconds: after.0.0 - before.0.0,
        sys_seconds: after.0.1 - before.0.1,
        rss_mib: rss_mib(pid),
        kernel_ns: if timed {
            after.1.saturating_sub(before.1)
        } else {
            0
        },
        events: volume(&after.2).saturating_sub(volume(&before.2)),
        drops: drops(&after.2).saturating_sub(drops(&before.2)),
        spans_exported: metric_sum(&after.2, "loupe_spans_exported_total", "")
            .saturating_sub(metric_sum(&before.2, "loupe_spans_exported_total", "")),
        drop_reasons: drop_reasons(&before.2, &after.2),
    };
    // SAFETY: signalling our own child.
    unsafe { libc_kill(pid as i32, 2) };
    let _ = agent.child.wait();
    Ok((l, cost))
}

/// Every drop-like counter line that grew between two scrapes.
fn drop_reasons(before: &str, after: &str) -> Vec<(String, u64)> {
    let is_drop = |l: &str| {
        l.contains("kind=\"drop\"")
            || [
                "loupe_channel_full",
                "loupe_export_queue_full",
                "loupe_export_failed",
                "loupe_decode_errors",
                "loupe_conn_table_full",
            ]
            .iter()
            .any(|p| l.starts_with(p))
    };
    let parse = |t: &str| -> Vec<(String, u64)> {
        t.lines()
            .filter(|l| !l.starts_with('#') && is_drop(l))
            .filter_map(|l| {
                let (name, v) = l.rsplit_once(' ')?;
                Some((name.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let b = parse(before);
    parse(after)
        .into_iter()
        .filter_map(|(n, v)| {
            let old = b
                .iter()
                .find(|(m, _)| *m == n)
                .map(|(_, x)| *x)
                .unwrap_or(0);
            (v > old).then(|| (n, v - old))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A server the client-and-server workloads drive (databases, gRPC), and the command that
/// loads it.
struct DbWorkload {
    name: &'static str,
    _server: Guard,
    /// (seconds, connections, a rate to hold or None to saturate).
    load: Box<dyn Fn(u64, usize, Option<f64>) -> anyhow::Result<Load>>,
    /// Whether the load generator can hold a rate (redis-benchmark cannot).
    holds_rate: bool,
}

/// p50, p99 and p99.9 (ms) of latencies in microseconds.
fn percentiles_ms(mut us: Vec<f64>) -> (f64, f64, f64) {
    if us.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    us.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)] / 1000.0;
    (at(0.50), at(0.99), at(0.999))
}

/// The latencies (us) in column `column` of every file in `dir` whose name starts with
/// `prefix`, read and removed.
fn logged_latencies(dir: &Path, prefix: &str, column: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(e.path()) {
            out.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().nth(column)?.parse::<f64>().ok()),
            );
        }
        let _ = std::fs::remove_file(e.path());
    }
    out
}

fn runuser_postgres(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args))
}

/// PostgreSQL 15 loaded by pgbench's read-only script with prepared statements (extended
/// protocol: Bind/Execute of a named statement per query).
fn postgres(dir: &Path) -> anyhow::Result<DbWorkload> {
    const BIN: &str = "/usr/lib/postgresql/15/bin";
    std::fs::create_dir_all(dir)?;
    run(Command::new("chown").arg("postgres").arg(dir))?;
    let data = dir.join("data");
    runuser_postgres(&[
        &format!("{BIN}/initdb"),
        "-D",
        data.to_str().unwrap(),
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
    ])?;
    let port = free_port();
    let server = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/postgres"), "-D"])
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting postgres")?;
    let guard = Guard(server);
    wait_port(port)?;
    let p = port.to_string();
    for _ in 0..50 {
        let ok = Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-U",
                "postgres",
                "-i",
                "-s",
                "2",
                "-q",
            ])
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = dir.join("pgbench-logs");
    std::fs::create_dir_all(&logs)?;
    Ok(DbWorkload {
        name: "PostgreSQL 15, pgbench -S -M prepared (select by key)",
        _server: guard,
        holds_rate: true,
        load: Box::new(move |seconds, connections, rate| {
            let mut cmd = Command::new("pgbench");
            if let Some(r) = rate {
                // Every transaction's latency (us, the third column) logged, for percentiles.
                cmd.args(["-R", &format!("{r:.0}"), "-l", "--log-prefix"])
                    .arg(logs.join("tx"));
            }
            let out = cmd
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &p,
                    "-U",
                    "postgres",
                    "-S",
                    "-M",
                    "prepared",
                ])
                .args([
                    "-T",
                    &seconds.to_string(),
                    "-c",
                    &connections.to_string(),
                    "-j",
                    "2",
                ])
                .arg("postgres")
                .output()
                .context("running pgbench")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            };
            let tps = field("tps = ").context("pgbench printed no tps")?;
            let requests =
                field("number of transactions actually processed: ").unwrap_or(0.0) as u64;
            if rate.is_some() {
                let (p50_ms, p99_ms, p999_ms) = percentiles_ms(logged_latencies(&logs, "tx", 2));
                return Ok(Load {
                    rps: tps,
                    p50_ms,
                    p99_ms,
                    p999_ms,
                    requests,
                    ..Load::default()
                });
            }
            Ok(Load {
                rps: tps,
                p50_ms: field("latency average = ").unwrap_or(f64::NAN),
                requests,
                ..Load::default()
            })
        }),
    })
}

/// Redis 7 loaded by redis-benchmark's GET and SET.
fn redis() -> anyhow::Result<DbWorkload> {
    let port = free_port();
    let server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let guard = Guard(server);
    wait_port(port)?;
    let p = port.to_string();
    // redis-benchmark runs a count, not a time: the warm-up (the first call) measures the rate
    // that sizes the measured rounds, so no probe runs while the agent is measured.
    let rate = std::cell::Cell::new(0.0f64);
    Ok(DbWorkload {
        name: "Redis 7, redis-benchmark -t get,set (no pipelining)",
        _server: guard,
        holds_rate: false,
        load: Box::new(move |seconds, connections, _| {
            if rate.get() == 0.0 {
                let probe = redis_benchmark(&p, 50_000, connections)?;
                rate.set(probe.rps);
                return Ok(probe);
            }
            let n = (rate.get() * seconds as f64 / 2.0).max(10_000.0) as u64;
            redis_benchmark(&p, n, connections)
        }),
    })
}

fn redis_benchmark(port: &str, n: u64, connections: usize) -> anyhow::Result<Load> {
    let start = Instant::now();
    let out = Command::new("redis-benchmark")
        .args(["-p", port, "-t", "get,set", "-q", "--csv"])
        .args(["-n", &n.to_string(), "-c", &connections.to_string()])
        .output()
        .context("running redis-benchmark")?;
    if !out.status.success() {
        bail!("redis-benchmark failed");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    // "SET","123456.79","0.1",... per test; both tests ran n requests each.
    let p50: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(3)?.trim_matches('"').parse().ok())
        .collect();
    Ok(Load {
        rps: 2.0 * n as f64 / elapsed,
        p50_ms: p50.iter().copied().fold(0.0, f64::max),
        requests: 2 * n,
        ..Load::default()
    })
}

/// A grpcio server (thread pool, tests/apps/grpc_service.py) loaded by h2load with unary calls
/// to shop.v1.Orders/Ping over multiplexed HTTP/2 connections: gRPC without a gRPC client
/// library to install (no Go module proxy for ghz here).
fn grpc(root: &Path, dir: &Path) -> anyhow::Result<DbWorkload> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.to_path_buf();
    let port = free_port();
    let apps = root.join("tests/apps");
    let server = Command::new(root.join("tests/.venv/bin/python"))
        .arg(apps.join("grpc_service.py"))
        .args([port.to_string().as_str(), "http://127.0.0.1:9"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the gRPC service")?;
    let guard = Guard(server);
    wait_port(port)?;
    // One gRPC message: flag 0, length 4, "ping".
    let body = dir.join("ping.grpc");
    std::fs::write(&body, b"\0\0\0\0\x04ping")?;
    let url = format!("http://127.0.0.1:{port}/shop.v1.Orders/Ping");
    Ok(DbWorkload {
        name: "gRPC (grpcio, thread pool), h2load unary calls, 10 streams per connection",
        _server: guard,
        holds_rate: true,
        load: Box::new(move |seconds, connections, rate| {
            let log = dir.join("h2load.log");
            let mut cmd = Command::new("h2load");
            if let Some(r) = rate {
                // --rps is per client. The log's third column: microseconds to the response end.
                let per_client = (r / connections.max(1) as f64).max(1.0);
                cmd.arg(format!("--rps={per_client:.0}"))
                    .arg(format!("--log-file={}", log.display()));
            }
            let out = cmd
                .args([
                    "-D",
                    &seconds.to_string(),
                    "-c",
                    &connections.to_string(),
                    "-m",
                    "10",
                ])
                .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
                .arg("-d")
                .arg(&body)
                .arg(&url)
                .output()
                .context("running h2load")?;
            let text = String::from_utf8_lossy(&out.stdout);
            // "finished in 6.00s, 5123.45 req/s, ..." and "requests: N total, N started, N done,
            // N succeeded, ..."
            let rps = text
                .lines()
                .find_map(|l| l.strip_prefix("finished in "))
                .and_then(|l| {
                    l.split(", ")
                        .nth(1)?
                        .strip_suffix(" req/s")?
                        .parse::<f64>()
                        .ok()
                })
                .with_context(|| format!("h2load printed no rate: {text}"))?;
            let succeeded = text
                .lines()
                .find_map(|l| l.strip_prefix("requests: "))
                .and_then(|l| l.split(", ").find_map(|f| f.strip_suffix(" succeeded")))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if rate.is_some() {
                let (p50_ms, p99_ms, p999_ms) =
                    percentiles_ms(logged_latencies(&dir, "h2load.log", 2));
                return Ok(Load {
                    rps,
                    p50_ms,
                    p99_ms,
                    p999_ms,
                    requests: succeeded,
                    ..Load::default()
                });
            }
            Ok(Load {
                rps,
                requests: succeeded,
                ..Load::default()
            })
        }),
    })
}

/// Database workloads: client and server on this node, every process traced (the client's
/// calls are the CLIENT spans; the server side feeds metrics only).
fn db_report(bin: &Path, otlp: &str, w: &DbWorkload, opts: &Options) -> anyhow::Result<String> {
    // Every process traced (client and server: two sides per operation); with `--baseline`, the
    // other build in the same alternating rounds.
    let mut setups: Vec<(&str, &Path)> = vec![("with", bin)];
    if let Some(base) = &opts.baseline {
        setups.push(("baseline", base));
    }
    let setups = &setups;
    step(&format!("{}: warm-up", w.name));
    (w.load)(2, opts.connections, None)?;
    let with = |rate: Option<f64>, timing: Timing| {
        move |i: usize| {
            with_agent(setups[i].1, otlp, &[], &opts.agent_args, timing, || {
                busy_during(|| (w.load)(opts.seconds, opts.connections, rate))
            })
        }
    };
    let (off, costs) = alternate(
        &format!("{}: saturation", w.name),
        opts,
        setups.len(),
        false,
        || (w.load)(opts.seconds, opts.connections, None),
        with(None, Timing::Off),
    )?;
    step(&format!("{}: kernel-program time", w.name));
    let timed: Vec<(Load, AgentCost)> = (0..setups.len())
        .map(with(None, Timing::KernelPrograms))
        .collect::<anyhow::Result<_>>()?;
    let off = median(off.iter().map(|l| l.rps).collect());
    let mut t = Table::new(
        w.name,
        std::iter::once("without".to_string())
            .chain(setups.iter().map(|s| s.0.to_string()))
            .collect(),
    );
    let per = |f: &dyn Fn(&Load, &AgentCost) -> f64, digits: usize| -> Vec<String> {
        std::iter::once(String::new())
            .chain(costs.iter().map(|c| {
                format!(
                    "{:.digits$}",
                    median(c.iter().map(|(l, a)| f(l, a)).collect())
                )
            }))
            .collect()
    };
    let rps = |c: &Vec<(Load, AgentCost)>| median(c.iter().map(|(l, _)| l.rps).collect());
    t.row(
        "operations per second at saturation",
        std::iter::once(format!("{off:.0}"))
            .chain(costs.iter().map(|c| format!("{:.0}", rps(c))))
            .collect(),
        "",
    );
    t.row(
        "  ratio",
        std::iter::once(String::new())
            .chain(costs.iter().map(|c| format!("{:.3}", rps(c) / off)))
            .collect(),
        ">= 0.80",
    );
    // Memory, spans and drops count every round the agent ran, the timed one included.
    let accounted: PerSetup = costs
        .iter()
        .zip(&timed)
        .map(|(c, t)| c.iter().cloned().chain([t.clone()]).collect())
        .collect();
    let mut rate_drops = vec![0; setups.len()];
    if w.holds_rate {
        let rate = (off * 0.5).max(50.0);
        let (lat_off, fixed) = alternate(
            &format!("{}: fixed rate {rate:.0}/s", w.name),
            opts,
            setups.len(),
            true,
            || busy_during(|| (w.load)(opts.seconds, opts.connections, Some(rate))),
            with(Some(rate), Timing::Off),
        )?;
        let lat_on: Vec<Vec<Load>> = fixed
            .iter()
            .map(|c| c.iter().map(|(l, _)| *l).collect())
            .collect();
        latency_rows(&mut t, rate, "ops/s", &lat_off, &lat_on);
        rate_drops = fixed
            .iter()
            .map(|c| c.iter().map(|(_, a)| a.drops).sum())
            .collect();
    } else {
        t.row(
            "latency at a fixed rate",
            std::iter::once("(the load generator cannot hold one)".to_string()).collect(),
            "",
        );
    }
    t.row(
        "agent CPU (millicores per 1k ops/s, median)",
        per(
            &|l, a| (a.cpu_seconds / opts.seconds as f64 * 1000.0) / (l.rps / 1000.0).max(1e-9),
            1,
        ),
        "",
    );
    t.row(
        "agent CPU (millicores, median)",
        per(&|_, a| a.cpu_seconds / opts.seconds as f64 * 1000.0, 1),
        "",
    );
    t.row(
        "agent user-space CPU per traced side (us, median)",
        per(
            &|l, a| a.user_seconds * 1e6 / (2 * l.requests.max(1)) as f64,
            2,
        ),
        "<= 1.5",
    );
    t.row(
        "agent kernel CPU per traced side (us, median)",
        per(
            &|l, a| a.sys_seconds * 1e6 / (2 * l.requests.max(1)) as f64,
            2,
        ),
        "",
    );
    kernel_program_rows(&mut t, &timed, "operation", "own round");
    rss_row(&mut t, &accounted);
    t.row(
        "spans exported / operations",
        std::iter::once(String::new())
            .chain(accounted.iter().map(|c| {
                let spans: u64 = c.iter().map(|(_, a)| a.spans_exported).sum();
                let ops: u64 = c.iter().map(|(l, _)| l.requests).sum();
                format!("{spans}/{ops}")
            }))
            .collect(),
        "",
    );
    if w.holds_rate {
        fixed_rate_drops_row(
            &mut t,
            "drops at the fixed rate (sum over rounds)",
            &rate_drops,
        );
    }
    drops_row(&mut t, &accounted);
    let mut out = t.render();
    out.push_str(&drop_reason_lines(setups.iter().map(|s| s.0), &accounted));
    Ok(out)
}

/// One HTTP workload: saturation and a fixed rate (half of saturation without the agent), without
/// the agent and in each setup, as columns of one table.
fn http_report(bin: &Path, otlp: &str, w: &Workload, opts: &Options) -> anyhow::Result<String> {
    // (column, --pid selection, traced sides per request: the sides that can have spans, agent)
    let mut setups: Vec<(&str, &[u32], u64, &Path)> = vec![
        ("server selected", &w.pids, 1, bin),
        ("all traced", &[], 1 + w.client_spans as u64, bin),
    ];
    if let Some(base) = &opts.baseline {
        setups.insert(1, ("selected, baseline", &w.pids, 1, base));
        setups.push(("all, baseline", &[], 1 + w.client_spans as u64, base));
    }
    let setups = &setups;
    step(&format!("{}: warm-up", w.name));
    oha(&w.url, 2, opts.connections, None)?;
    let with = |rate: Option<f64>, timing: Timing| {
        move |i: usize| {
            with_agent(
                setups[i].3,
                otlp,
                setups[i].1,
                &opts.agent_args,
                timing,
                || busy_during(|| oha(&w.url, opts.seconds, opts.connections, rate)),
            )
        }
    };
    let (sat_off, saturated) = alternate(
        &format!("{}: saturation", w.name),
        opts,
        setups.len(),
        false,
        || oha(&w.url, opts.seconds, opts.connections, None),
        with(None, Timing::Off),
    )?;
    let sat_on: Vec<Vec<f64>> = saturated
        .iter()
        .map(|c| c.iter().map(|(l, _)| l.rps).collect())
        .collect();
    let off_rps = median(sat_off.iter().map(|l| l.rps).collect());
    let rate = (off_rps * 0.5).max(50.0);
    let (lat_off, fixed) = alternate(
        &format!("{}: fixed rate {rate:.0}/s", w.name),
        opts,
        setups.len(),
        true,
        || busy_during(|| oha(&w.url, opts.seconds, opts.connections, Some(rate))),
        with(Some(rate), Timing::Off),
    )?;
    // The kernel programs' time: one round per setup at the fixed rate, on its own.
    step(&format!("{}: kernel-program time at {rate:.0}/s", w.name));
    let timed: Vec<(Load, AgentCost)> = (0..setups.len())
        .map(with(Some(rate), Timing::KernelPrograms))
        .collect::<anyhow::Result<_>>()?;
    let lat_on: Vec<Vec<Load>> = fixed
        .iter()
        .map(|c| c.iter().map(|(l, _)| *l).collect())
        .collect();
    // The timed round runs at the same rate: its drops count here too.
    let rate_drops: Vec<u64> = fixed
        .iter()
        .zip(&timed)
        .map(|(c, t)| c.iter().map(|(_, a)| a.drops).sum::<u64>() + t.1.drops)
        .collect();
    // Agent costs over both phases.
    let costs: PerSetup = saturated
        .into_iter()
        .zip(fixed)
        .map(|(mut s, f)| {
            s.extend(f);
            s
        })
        .collect();
    // Memory, spans and drops count every round the agent ran, the timed one included; CPU
    // comes from the untimed rounds only.
    let accounted: PerSetup = costs
        .iter()
        .zip(&timed)
        .map(|(c, t)| {
            c.iter()
                .cloned()
                .chain(std::iter::once(t.clone()))
                .collect()
        })
        .collect();
    let mut t = Table::new(
        w.name,
        std::iter::once("without".to_string())
            .chain(setups.iter().map(|s| s.0.to_string()))
            .collect(),
    );
    let per = |f: &dyn Fn(&Load, &AgentCost, u64) -> f64| -> Vec<String> {
        std::iter::once(String::new())
            .chain(setups.iter().zip(&costs).map(|(s, c)| {
                format!(
                    "{:.2}",
                    median(c.iter().map(|(l, a)| f(l, a, s.2)).collect())
                )
            }))
            .collect()
    };
    t.row(
        "throughput at saturation (req/s)",
        std::iter::once(format!("{off_rps:.0}"))
            .chain(sat_on.iter().map(|v| format!("{:.0}", median(v.clone()))))
            .collect(),
        "",
    );
    t.row(
        "  ratio",
        std::iter::once(String::new())
            .chain(
                sat_on
                    .iter()
                    .map(|v| format!("{:.3}", median(v.clone()) / off_rps)),
            )
            .collect(),
        ">= 0.90 selected, >= 0.80 all",
    );
    latency_rows(&mut t, rate, "req/s", &lat_off, &lat_on);
    t.row(
        "agent user-space CPU per traced side (us)",
        per(&|l, a, sides| a.user_seconds * 1e6 / (sides * l.requests.max(1)) as f64),
        "<= 1.5",
    );
    t.row(
        "agent kernel CPU per traced side (us)",
        per(&|l, a, sides| a.sys_seconds * 1e6 / (sides * l.requests.max(1)) as f64),
        "",
    );
    t.row(
        "agent CPU (millicores per 1k req/s)",
        per(&|l, a, _| (a.cpu_seconds / opts.seconds as f64 * 1000.0) / (l.rps / 1000.0).max(1e-9)),
        "",
    );
    kernel_program_rows(
        &mut t,
        &timed,
        "request",
        &format!("own round at {rate:.0}/s"),
    );
    t.row(
        "events per second",
        per(&|_, a, _| a.events as f64 / opts.seconds as f64),
        "",
    );
    rss_row(&mut t, &accounted);
    t.row(
        "spans exported / requests x sides",
        std::iter::once(String::new())
            .chain(setups.iter().zip(&accounted).map(|(s, c)| {
                let spans: u64 = c.iter().map(|(_, a)| a.spans_exported).sum();
                let requests: u64 = c.iter().map(|(l, _)| l.requests).sum();
                format!("{spans}/{}", requests * s.2)
            }))
            .collect(),
        "",
    );
    fixed_rate_drops_row(
        &mut t,
        &format!("drops at the fixed rate ({rate:.0}/s)"),
        &rate_drops,
    );
    drops_row(&mut t, &accounted);
    let mut out = t.render();
    if !w.client_spans {
        out.push_str(
            "(the load generator's side has no spans: oha's TLS is rustls, linked into it, so \
             only its ciphertext is seen; \"all traced\" counts one side per request)\n",
        );
    }
    out.push_str(&drop_reason_lines(setups.iter().map(|s| s.0), &accounted));
    Ok(out)
}

/// The host's CPU busy and p50 / p99 / p99.9 at the fixed `rate` (in `unit`), without the agent
/// and in each column.
fn latency_rows(t: &mut Table, rate: f64, unit: &str, off: &[Load], on: &[Vec<Load>]) {
    let lat = |v: &[Load], f: fn(&Load) -> f64| median(v.iter().map(f).collect());
    t.row(
        &format!("host CPU busy at {rate:.0} {unit} (% of all cores)"),
        std::iter::once(format!("{:.1}", lat(off, |l| l.host_busy_pct)))
            .chain(
                on.iter()
                    .map(|v| format!("{:.1}", lat(v, |l| l.host_busy_pct))),
            )
            .collect(),
        "",
    );
    for (label, f, target) in [
        ("p50", (|l: &Load| l.p50_ms) as fn(&Load) -> f64, ""),
        ("p99", |l: &Load| l.p99_ms, "<= +5%"),
        ("p99.9", |l: &Load| l.p999_ms, ""),
    ] {
        let base = lat(off, f);
        t.row(
            &format!("{label} latency at {rate:.0} {unit} (ms)"),
            std::iter::once(format!("{base:.3}"))
                .chain(on.iter().map(|v| {
                    let x = lat(v, f);
                    format!("{x:.3} {:+.0}%", 100.0 * (x / base - 1.0))
                }))
                .collect(),
            target,
        );
    }
}

/// Kernel-program time per operation (`op`: what the table calls one) and per event, from each
/// column's round of its own with the programs timed (`round` says at what rate).
fn kernel_program_rows(t: &mut Table, timed: &[(Load, AgentCost)], op: &str, round: &str) {
    let own_round = |f: &dyn Fn(&Load, &AgentCost) -> f64| -> Vec<String> {
        std::iter::once(String::new())
            .chain(timed.iter().map(|(l, a)| format!("{:.0}", f(l, a))))
            .collect()
    };
    t.row(
        &format!("kernel-program time per {op} (ns, {round})"),
        own_round(&|l, a| a.kernel_ns as f64 / l.requests.max(1) as f64),
        "",
    );
    t.row(
        &format!("kernel-program time per event (ns, {round})"),
        own_round(&|_, a| a.kernel_ns as f64 / a.events.max(1) as f64),
        "<= 400",
    );
}

/// Each column's largest RSS over every round its agent ran.
fn rss_row(t: &mut Table, accounted: &PerSetup) {
    t.row(
        "agent RSS (MiB, max)",
        std::iter::once(String::new())
            .chain(accounted.iter().map(|c| {
                format!(
                    "{:.1}",
                    c.iter().map(|(_, a)| a.rss_mib).fold(0.0, f64::max)
                )
            }))
            .collect(),
        "<= 64",
    );
}

/// Each column's drops at the fixed rate (the target is none below capacity).
fn fixed_rate_drops_row(t: &mut Table, label: &str, drops: &[u64]) {
    t.row(
        label,
        std::iter::once(String::new())
            .chain(drops.iter().map(u64::to_string))
            .collect(),
        "0",
    );
}

/// Each column's drops, every counter, summed over every round its agent ran.
fn drops_row(t: &mut Table, accounted: &PerSetup) {
    t.row(
        "drops, every counter (sum over rounds)",
        std::iter::once(String::new())
            .chain(
                accounted
                    .iter()
                    .map(|c| c.iter().map(|(_, a)| a.drops).sum::<u64>().to_string()),
            )
            .collect(),
        "",
    );
}

/// A line per column: its drop counters by name, summed over its rounds.
fn drop_reason_lines<'a>(names: impl Iterator<Item = &'a str>, accounted: &PerSetup) -> String {
    let mut out = String::new();
    for (name, c) in names.zip(accounted) {
        let mut reasons: Vec<(String, u64)> = Vec::new();
        for (_, a) in c {
            for (n, v) in &a.drop_reasons {
                match reasons.iter_mut().find(|(m, _)| m == n) {
                    Some((_, t)) => *t += v,
                    None => reasons.push((n.clone(), *v)),
                }
            }
        }
        let reasons = if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!("drops by reason, {name}: {reasons}\n"));
    }
    out
}

/// Per setup, each round's load and what the agent cost meanwhile.
type PerSetup = Vec<Vec<(Load, AgentCost)>>;

/// The rounds of one phase: the load without the agent and with it in each setup, the order
/// reversed every other round so that drift (thermal, caches) favours no column. Returns the
/// loads without the agent and, per setup, each round's load and agent cost.
fn alternate(
    label: &str,
    opts: &Options,
    setups: usize,
    reverse_first: bool,
    mut without: impl FnMut() -> anyhow::Result<Load>,
    mut with: impl FnMut(usize) -> anyhow::Result<(Load, AgentCost)>,
) -> anyhow::Result<(Vec<Load>, PerSetup)> {
    let mut off = Vec::new();
    let mut on: PerSetup = vec![Vec::new(); setups];
    for round in 0..opts.rounds {
        step(&format!("{label}, round {} of {}", round + 1, opts.rounds));
        let mut order: Vec<Option<usize>> =
            std::iter::once(None).chain((0..setups).map(Some)).collect();
        if (round % 2 == 1) != reverse_first {
            order.reverse();
        }
        for which in order {
            match which {
                Some(i) => on[i].push(with(i)?),
                None => off.push(without()?),
            }
        }
    }
    Ok((off, on))
}

/// A printed table: a label column, value columns, a target column.
struct Table {
    title: String,
    columns: Vec<String>,
    rows: Vec<(String, Vec<String>, String)>,
}

impl Table {
    fn new(title: &str, columns: Vec<String>) -> Self {
        Self {
            title: title.to_string(),
            columns,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, label: &str, values: Vec<String>, target: &str) {
        self.rows
            .push((label.to_string(), values, target.to_string()));
    }

    fn render(&self) -> String {
        let label_w = self
            .rows
            .iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(0)
            .max(10);
        let mut widths: Vec<usize> = self.columns.iter().map(String::len).collect();
        for (_, values, _) in &self.rows {
            for (w, v) in widths.iter_mut().zip(values) {
                *w = (*w).max(v.chars().count());
            }
        }
        let mut out = format!("\n{}\n{:<label_w$}", self.title, "");
        for (c, w) in self.columns.iter().zip(&widths) {
            out.push_str(&format!("  {c:>w$}"));
        }
        out.push_str("  target\n");
        for (label, values, target) in &self.rows {
            out.push_str(&format!("{label:<label_w$}"));
            for (v, w) in values.iter().zip(&widths) {
                out.push_str(&format!("  {v:>w$}"));
            }
            out.push_str(&format!("  {target}\n"));
        }
        out
    }
}

pub fn bench(root: &Path, opts: &Options) -> anyhow::Result<()> {
    ensure_tools(root)?;
    step("building the agent (release) and the OTLP sink");
    run(Command::new("cargo").args(["build", "--release", "--package", "loupe"]))?;
    run(Command::new("cargo").args([
        "build",
        "--release",
        "--package",
        "loupe-tests",
        "--bin",
        "otlp-sink",
    ]))?;
    // Another build of the agent (an earlier commit's) to compare on this host as it is now.
    let bin = std::env::var_os("LOUPE_BENCH_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/loupe"));
    let mut sink = Command::new(root.join("target/release/otlp-sink"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the OTLP sink")?;
    let mut sink_out = BufReader::new(sink.stdout.take().context("sink stdout")?).lines();
    let endpoints = sink_out.next().context("sink endpoints")??;
    let otlp = endpoints
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .context("sink grpc endpoint")?
        .to_string();
    let _sink = Guard(sink);

    // On only in the rounds that time the kernel programs (`Timing`).
    bpf_stats(false);
    let dir: PathBuf = root.join("target/bench");
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = String::new();
    // Each workload's server runs only for its own report.
    type Start<'a, W> = (&'a str, Box<dyn Fn() -> anyhow::Result<W> + 'a>);
    let http: [Start<Workload>; 3] = [
        ("nginx", Box::new(|| nginx(&dir.join("nginx"), false))),
        (
            "nginx-tls",
            Box::new(|| nginx(&dir.join("nginx-tls"), true)),
        ),
        ("python", Box::new(|| python(root))),
    ];
    for (name, start) in &http {
        if opts.runs(name) {
            report.push_str(&http_report(&bin, &otlp, &start()?, opts)?);
        }
    }
    // Database and gRPC workloads: client and server both traced.
    let db: [Start<DbWorkload>; 3] = [
        ("postgres", Box::new(|| postgres(&dir.join("postgres")))),
        ("redis", Box::new(redis)),
        ("grpc", Box::new(|| grpc(root, &dir.join("grpc")))),
    ];
    for (name, start) in &db {
        if opts.runs(name) {
            report.push_str(&db_report(&bin, &otlp, &start()?, opts)?);
        }
    }
    println!(
        "\nLoupe overhead: {} rounds x {} s per side, {} connections; both ends on loopback, every request traced and exported over OTLP/gRPC (to a sink that does not decode); agent: {}{}; agent flags: {}; HTTP workloads in two setups: the server's processes selected (--pid, as on a node whose clients are elsewhere: one traced side per request) and every process traced (the default: the load generator too, two sides); the kernel programs timed (kernel.bpf_stats_enabled) in one round of their own per column, everything else measured without that timing's cost; targets are #19's{report}",
        opts.rounds,
        opts.seconds,
        opts.connections,
        bin.display(),
        opts.baseline
            .as_ref()
            .map(|b| format!(" (columns \"baseline\": {})", b.display()))
            .unwrap_or_default(),
        if opts.agent_args.is_empty() {
            "defaults".to_string()
        } else {
            opts.agent_args.join(" ")
        },
    );
    if !opts.only.is_empty() {
        return Ok(());
    }
    // The userspace path alone, on one core: decode -> reassembly -> parse -> span.
    step("userspace microbenchmark (criterion): events per second on one core");
    run(Command::new("cargo").args([
        "bench",
        "--package",
        "loupe",
        "--bench",
        "pipeline",
        "--",
        "--noplot",
    ]))?;
    step("what RED metrics, the service graph and sampling cost per span (criterion, one core)");
    run(Command::new("cargo").args([
        "bench",
        "--package",
        "loupe",
        "--bench",
        "red",
        "--",
        "--noplot",
    ]))?;
    step("what encoding spans into an OTLP request costs per span (criterion, one core)");
    run(Command::new("cargo").args([
        "bench",
        "--package",
        "loupe",
        "--bench",
        "export",
        "--",
        "--noplot",
    ]))?;
    Ok(())
}
