//! Privileged scenario: whole traces through five runtimes on a node that was already running.
//!
//!   client -> nginx (proxy, upstream keep-alive)
//!          -> svc-go (Go net/http; pooled client)
//!          -> svc-java (JDK HttpServer on one pre-started pool, handing the call to another:
//!                       an ExecutorService; HttpURLConnection keep-alive)
//!          -> svc-asyncio (aiohttp; one ClientSession)
//!          -> svc-node (Node.js event loop; keep-alive agent)
//!          -> leaf (Python, thread per request)
//!
//! Each service calls downstream with an id *derived* from the incoming one (a hash), so the
//! agent can match nothing between a request and the calls it makes, while the test knows the
//! true tree. Services and their pools are warmed up before the agent starts. Per hop: correct,
//! orphan, wrong, at concurrency 1 and 16.
//!
//! And the hook the Java hop needs (`sched:sched_waking`, which runs on every wakeup of the
//! host) is attached only while a JVM runs.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use loupe_tests::{
    Agent, Server, TestCgroup, free_port, otlp::ReceivedSpan, otlp::Receiver, privileged,
    tests_dir, venv_bin,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn derive(id: u64) -> u64 {
    (id * 7919 + 13) % 1_000_003
}

/// The id a request carries `depth` hops below the client.
fn id_at(id: u64, depth: u32) -> u64 {
    (0..depth).fold(id, |i, _| derive(i))
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn named(mut cmd: Command, name: &str) -> Command {
    cmd.env("OTEL_SERVICE_NAME", name);
    cmd
}

struct Topology {
    _servers: Vec<Server>,
    front: SocketAddr,
    dir: PathBuf,
    go_bin: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.go_bin);
    }
}

fn topology(cg: &TestCgroup) -> Topology {
    let apps = tests_dir().join("apps");
    let app = |f: &str| apps.join(f).display().to_string();
    let [leaf, node, py, java, go, front] = [(); 6].map(|_| free_port());
    let base = |p: u16| format!("http://127.0.0.1:{p}");
    let mut servers = Vec::new();
    let cmd = cg.command("python3", &[&app("chain_service.py"), &leaf.to_string()]);
    servers.push(Server::start(named(cmd, "leaf"), addr(leaf)));
    let cmd = cg.command(
        "node",
        &[
            &app("chain_node.js"),
            &node.to_string(),
            &base(leaf),
            "--derive",
        ],
    );
    servers.push(Server::start(named(cmd, "svc-node"), addr(node)));
    let cmd = cg.command(
        &venv_bin("python"),
        &[&app("chain_asyncio.py"), &py.to_string(), &base(node), "n"],
    );
    servers.push(Server::start(named(cmd, "svc-asyncio"), addr(py)));
    let cmd = cg.command(
        "java",
        &[&app("ChainJava.java"), &java.to_string(), &base(py), "p"],
    );
    servers.push(Server::start(named(cmd, "svc-java"), addr(java)));
    let go_bin = loupe_tests::build_go("chain_go");
    let cmd = cg.command(
        go_bin.to_str().unwrap(),
        &[&go.to_string(), &base(java), "j"],
    );
    servers.push(Server::start(named(cmd, "svc-go"), addr(go)));
    let dir = std::env::temp_dir().join(format!("loupe-runtimes-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\ndaemon off;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream go {{ server 127.0.0.1:{go}; keepalive 16; }}\n\
           server {{\n    listen 127.0.0.1:{front};\n    location / {{\n      proxy_pass http://go;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let cmd = cg.command(
        "nginx",
        &[
            "-p",
            dir.to_str().unwrap(),
            "-c",
            dir.join("nginx.conf").to_str().unwrap(),
        ],
    );
    servers.push(Server::start(cmd, addr(front)));
    Topology {
        _servers: servers,
        front: addr(front),
        dir,
        go_bin,
    }
}

/// `concurrency` client threads, each sending `per_thread` requests /g/<id> over keep-alive.
fn drive(cg: &TestCgroup, front: SocketAddr, concurrency: usize, per_thread: usize, first_id: u64) {
    let script = format!(
        "import http.client, threading\n\
         def worker(k):\n\
         \x20   c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=30)\n\
         \x20   for j in range({n}):\n\
         \x20       c.request('GET', '/g/%d' % ({first} + k * {n} + j))\n\
         \x20       r = c.getresponse(); body = r.read(); assert r.status == 200, (r.status, body)\n\
         ts = [threading.Thread(target=worker, args=(k,)) for k in range({conc})]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n",
        port = front.port(),
        n = per_thread,
        first = first_id,
        conc = concurrency
    );
    let out = named(cg.command("python3", &["-c", &script]), "client")
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (service, kind, path prefix, depth below the client: the id is `id_at(root, depth)`).
type End = (&'static str, i32, &'static str, u32);

/// (hop, how it links, child, parent, asserted at concurrency 16)
type Hop = (&'static str, &'static str, End, End, bool);

const HOPS: [Hop; 11] = [
    (
        "client -> nginx",
        "peer",
        ("nginx", SERVER, "g", 0),
        ("client", CLIENT, "g", 0),
        true,
    ),
    (
        "nginx in -> out",
        "proxy",
        ("nginx", CLIENT, "g", 0),
        ("nginx", SERVER, "g", 0),
        true,
    ),
    (
        "nginx -> go",
        "peer",
        ("svc-go", SERVER, "g", 0),
        ("nginx", CLIENT, "g", 0),
        true,
    ),
    (
        "go in -> out",
        "goroutine",
        ("svc-go", CLIENT, "j", 1),
        ("svc-go", SERVER, "g", 0),
        true,
    ),
    (
        "go -> java",
        "peer",
        ("svc-java", SERVER, "j", 1),
        ("svc-go", CLIENT, "j", 1),
        true,
    ),
    (
        "java in -> out",
        "handback",
        ("svc-java", CLIENT, "p", 2),
        ("svc-java", SERVER, "j", 1),
        true,
    ),
    (
        "java -> asyncio",
        "peer",
        ("svc-asyncio", SERVER, "p", 2),
        ("svc-java", CLIENT, "p", 2),
        true,
    ),
    (
        "asyncio in -> out",
        "event loop",
        ("svc-asyncio", CLIENT, "n", 3),
        ("svc-asyncio", SERVER, "p", 2),
        false,
    ),
    (
        "asyncio -> node",
        "peer",
        ("svc-node", SERVER, "n", 3),
        ("svc-asyncio", CLIENT, "n", 3),
        true,
    ),
    (
        "node in -> out",
        "event loop",
        ("svc-node", CLIENT, "leaf", 4),
        ("svc-node", SERVER, "n", 3),
        false,
    ),
    (
        "node -> leaf",
        "peer",
        ("leaf", SERVER, "leaf", 4),
        ("svc-node", CLIENT, "leaf", 4),
        true,
    ),
];

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    correct: u64,
    wrong: u64,
    orphan: u64,
    missing: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.correct + self.wrong + self.orphan + self.missing
    }
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.total().max(1) as f64
    }
}

fn key(s: &ReceivedSpan) -> Option<(String, i32, String, u64)> {
    let path = s.attr("url.path")?;
    let mut segs = path.trim_matches('/').split('/');
    let prefix = segs.next()?.to_string();
    let id = segs.next()?.parse().ok()?;
    Some((s.service().to_string(), s.kind, prefix, id))
}

fn evaluate(spans: &[ReceivedSpan], roots: std::ops::Range<u64>) -> Vec<(Hop, Tally)> {
    let mut index: HashMap<(String, i32, String, u64), Vec<&ReceivedSpan>> = HashMap::new();
    for s in spans {
        if let Some(k) = key(s) {
            index.entry(k).or_default().push(s);
        }
    }
    let get = |(svc, kind, prefix, depth): End, root: u64| -> Vec<&ReceivedSpan> {
        index
            .get(&(
                svc.to_string(),
                kind,
                prefix.to_string(),
                id_at(root, depth),
            ))
            .cloned()
            .unwrap_or_default()
    };
    HOPS.iter()
        .map(|&hop| {
            let (_, _, child, parent, _) = hop;
            let mut t = Tally::default();
            for root in roots.clone() {
                let (parents, children) = (get(parent, root), get(child, root));
                match (parents.first(), children.first()) {
                    (Some(p), Some(c))
                        if c.parent_span_id == p.span_id && c.trace_id == p.trace_id =>
                    {
                        t.correct += 1
                    }
                    (Some(_), Some(c)) if c.parent_span_id.is_empty() => t.orphan += 1,
                    (Some(_), Some(_)) => t.wrong += 1,
                    _ => t.missing += 1,
                }
            }
            (hop, t)
        })
        .collect()
}

fn report(label: &str, rows: &[(Hop, Tally)]) -> String {
    let mut out = format!(
        "\n{label}\n{:<20} {:<11} {:>8} {:>6} {:>6} {:>7} {:>8}\n",
        "hop", "linking", "correct", "wrong", "orphan", "missing", "rate"
    );
    for ((name, how, ..), t) in rows {
        out.push_str(&format!(
            "{name:<20} {how:<11} {:>8} {:>6} {:>6} {:>7} {:>7.1}%\n",
            t.correct,
            t.wrong,
            t.orphan,
            t.missing,
            100.0 * t.rate(t.correct)
        ));
    }
    out
}

#[test]
fn whole_traces_through_go_java_asyncio_and_node_on_a_node_already_running() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("runtimes");
    let topo = topology(&cg);
    // Warm every service and pool (nginx's upstream, Go's, the JDK's keep-alive cache,
    // aiohttp's, Node's) before the agent starts; ids outside the evaluated ranges.
    drive(&cg, topo.front, 16, 3, 900_000);
    let receiver = Receiver::start();
    let ep = format!("http://{}", receiver.grpc);
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--otlp-endpoint",
            &ep,
            "--otlp-protocol",
            "grpc",
        ],
        &[],
    );
    const SERIAL: (usize, usize, u64) = (1, 200, 100_000);
    const PARALLEL: (usize, usize, u64) = (16, 20, 200_000);
    drive(&cg, topo.front, SERIAL.0, SERIAL.1, SERIAL.2);
    drive(&cg, topo.front, PARALLEL.0, PARALLEL.1, PARALLEL.2);
    let expected = 12 * (SERIAL.0 * SERIAL.1 + PARALLEL.0 * PARALLEL.1);
    receiver.wait_for(Duration::from_secs(30), |s| s.len() >= expected);
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let serial = evaluate(&spans, SERIAL.2..SERIAL.2 + (SERIAL.0 * SERIAL.1) as u64);
    let parallel = evaluate(
        &spans,
        PARALLEL.2..PARALLEL.2 + (PARALLEL.0 * PARALLEL.1) as u64,
    );
    let text = format!(
        "{}{}",
        report("concurrency 1", &serial),
        report("concurrency 16", &parallel)
    );
    eprintln!("{text}");
    if let Some(line) = log.lines().rev().find(|l| l.contains("events=")) {
        eprintln!("{line}");
    }
    assert!(
        log.contains("net/http client handoff probed"),
        "the Go service's handoff probes\n{log}"
    );
    for ((name, how, _, _, at_16), t) in &serial {
        assert!(
            t.rate(t.correct) >= 0.99,
            "concurrency 1: hop {name} ({how}) below 99%\n{text}"
        );
        let _ = at_16;
    }
    for ((name, how, _, _, at_16), t) in &parallel {
        assert!(
            t.rate(t.wrong) <= 0.01,
            "concurrency 16: hop {name} ({how}) has wrong parents\n{text}"
        );
        if *at_16 {
            assert!(
                t.rate(t.correct) >= 0.95,
                "concurrency 16: hop {name} ({how}) below 95%\n{text}"
            );
        }
    }
    for (_, t) in &serial {
        assert!(
            t.rate(t.wrong) <= 0.01,
            "concurrency 1: wrong parents\n{text}"
        );
    }
}

/// The processes of the host that have a JVM mapped (as the agent's process watcher finds them).
fn jvms() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .is_ok_and(|maps| maps.contains("/libjvm.so"))
        })
        .collect()
}

/// How many raw tracepoint links of the kernel are on `sched_waking` (bpftool, which
/// tests/setup.sh installs).
fn pool_wakeup_links() -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool (tests/setup.sh installs it)");
    assert!(out.status.success(), "bpftool link show failed");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    links.as_array().map_or(0, |l| {
        l.iter().filter(|l| l["tp_name"] == "sched_waking").count()
    })
}

fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_pool_wakeup_hook_is_attached_only_while_a_jvm_runs() {
    if !privileged() {
        return;
    }
    let me = std::process::id().to_string();
    let agent = Agent::start(&["--pid", &me]);
    // Another JVM on the host (not one of the tests': they run one at a time) keeps the hook
    // attached, rightly; what needs none to be running is then not asked.
    let alone = jvms().is_empty();
    if alone {
        assert_eq!(pool_wakeup_links(), 0, "attached without a JVM on the host");
    } else {
        eprintln!("another JVM runs on this host: the hook's absence without one is not checked");
    }
    let dir = std::env::temp_dir().join(format!("loupe-jvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("Idle.java");
    std::fs::write(
        &source,
        "public class Idle { public static void main(String[] a) throws Exception { Thread.sleep(120000); } }\n",
    )
    .unwrap();
    let mut java = Command::new("java").arg(&source).spawn().expect("java");
    let slow = u64::from(loupe_tests::slowdown());
    wait_until("not attached while a JVM runs", 30 * slow, || {
        pool_wakeup_links() == 1
    });
    let _ = java.kill();
    let _ = java.wait();
    if alone && jvms().is_empty() {
        wait_until("still attached after the JVM exited", 15 * slow, || {
            pool_wakeup_links() == 0
        });
    }
    let (_, log) = agent.stop_raw();
    assert!(!log.contains("sched_waking could not be"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
