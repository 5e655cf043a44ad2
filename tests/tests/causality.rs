//! Privileged scenario: uninstrumented services on one node, no trace header anywhere.
//!
//!   client -> nginx (event loop, reverse proxy, upstream keep-alive)
//!          -> svc-a (Python, thread per request)
//!               -> svc-b (Python, thread per request, each call in a new thread) -> leaf
//!               -> svc-node (Node.js, event loop)     -> leaf
//!
//! Every request path carries a ground-truth id, so the test knows the true tree and measures
//! the correct-parent rate of each hop, at concurrency 1 and 16.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use loupe_tests::{
    Agent, Server, TestCgroup, free_port, otlp::ReceivedSpan, otlp::Receiver, privileged, tests_dir,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn python_service(cg: &TestCgroup, name: &str, port: u16, downstreams: &[String]) -> Server {
    let script = tests_dir().join("apps/chain_service.py");
    let mut args = vec![script.to_str().unwrap().to_string(), port.to_string()];
    args.extend(downstreams.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = cg.command("python3", &refs);
    cmd.env("OTEL_SERVICE_NAME", name);
    Server::start(cmd, addr(port))
}

struct Topology {
    _servers: Vec<Server>,
    front: SocketAddr,
    _nginx_dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn topology(cg: &TestCgroup) -> Topology {
    let (leaf, b, node, a, front) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut servers = vec![python_service(cg, "leaf", leaf, &[])];
    servers.push(python_service(
        cg,
        "svc-b",
        b,
        &[
            "--spawn".to_string(),
            format!("http://127.0.0.1:{leaf}=leaf"),
        ],
    ));
    let js = tests_dir().join("apps/chain_node.js");
    let mut cmd = cg.command(
        "node",
        &[
            js.to_str().unwrap(),
            &node.to_string(),
            &format!("http://127.0.0.1:{leaf}"),
        ],
    );
    cmd.env("OTEL_SERVICE_NAME", "svc-node");
    servers.push(Server::start(cmd, addr(node)));
    servers.push(python_service(
        cg,
        "svc-a",
        a,
        &[
            format!("http://127.0.0.1:{b}=b"),
            format!("http://127.0.0.1:{node}=n"),
        ],
    ));
    let dir = std::env::temp_dir().join(format!("loupe-chain-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\ndaemon off;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream svc_a {{ server 127.0.0.1:{a}; keepalive 16; }}\n\
           server {{\n    listen 127.0.0.1:{front};\n    location / {{\n      proxy_pass http://svc_a;\n\
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
        _nginx_dir: TempDir(dir),
    }
}

/// `concurrency` client threads, each sending `per_thread` requests /a/<id> over keep-alive.
fn drive(cg: &TestCgroup, front: SocketAddr, concurrency: usize, per_thread: usize, first_id: u64) {
    let script = format!(
        "import http.client, threading\n\
         def worker(k):\n\
         \x20   c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=30)\n\
         \x20   for j in range({n}):\n\
         \x20       c.request('GET', '/a/%d' % ({first} + k * {n} + j))\n\
         \x20       r = c.getresponse(); r.read(); assert r.status == 200, r.status\n\
         ts = [threading.Thread(target=worker, args=(k,)) for k in range({conc})]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n",
        port = front.port(),
        n = per_thread,
        first = first_id,
        conc = concurrency
    );
    let mut cmd = cg.command("python3", &["-c", &script]);
    cmd.env("OTEL_SERVICE_NAME", "client");
    let out = cmd.output().expect("run the client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (service, kind, first path segment, id) of a span.
fn key(s: &ReceivedSpan) -> Option<(String, i32, String, u64)> {
    let path = s.attr("url.path")?;
    let mut segs = path.trim_matches('/').split('/');
    let prefix = segs.next()?.to_string();
    let id = segs.next()?.parse().ok()?;
    Some((s.service().to_string(), s.kind, prefix, id))
}

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
    fn rate(&self) -> f64 {
        self.correct as f64 / self.total().max(1) as f64
    }
}

/// (hop name, kind of linking, child (service, kind, prefix), parent (service, kind, prefix))
type Hop = (
    &'static str,
    &'static str,
    (&'static str, i32, &'static str),
    (&'static str, i32, &'static str),
);

const HOPS: [Hop; 11] = [
    (
        "client -> nginx",
        "peer",
        ("nginx", SERVER, "a"),
        ("client", CLIENT, "a"),
    ),
    (
        "nginx in -> out",
        "proxy",
        ("nginx", CLIENT, "a"),
        ("nginx", SERVER, "a"),
    ),
    (
        "nginx -> svc-a",
        "peer",
        ("svc-a", SERVER, "a"),
        ("nginx", CLIENT, "a"),
    ),
    (
        "svc-a in -> b",
        "thread",
        ("svc-a", CLIENT, "b"),
        ("svc-a", SERVER, "a"),
    ),
    (
        "svc-a in -> n",
        "thread",
        ("svc-a", CLIENT, "n"),
        ("svc-a", SERVER, "a"),
    ),
    (
        "svc-a -> svc-b",
        "peer",
        ("svc-b", SERVER, "b"),
        ("svc-a", CLIENT, "b"),
    ),
    (
        "svc-b in -> leaf",
        "new thread",
        ("svc-b", CLIENT, "leaf"),
        ("svc-b", SERVER, "b"),
    ),
    (
        "svc-a -> svc-node",
        "peer",
        ("svc-node", SERVER, "n"),
        ("svc-a", CLIENT, "n"),
    ),
    (
        "svc-node in -> leaf",
        "event-loop",
        ("svc-node", CLIENT, "leaf"),
        ("svc-node", SERVER, "n"),
    ),
    (
        "svc-b -> leaf",
        "peer",
        ("leaf", SERVER, "leaf"),
        ("svc-b", CLIENT, "leaf"),
    ),
    (
        "svc-node -> leaf",
        "peer",
        ("leaf", SERVER, "leaf"),
        ("svc-node", CLIENT, "leaf"),
    ),
];

/// Spans per (service, kind, first path segment), with an example of each: what a count
/// mismatch is made of.
fn census(spans: &[ReceivedSpan]) -> String {
    let mut by: std::collections::BTreeMap<(String, i32, String), (usize, String)> =
        std::collections::BTreeMap::new();
    for s in spans {
        let path = s.attr("url.path").unwrap_or("-");
        let first = path
            .trim_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let e = by
            .entry((s.service().to_string(), s.kind, first))
            .or_insert_with(|| {
                (
                    0,
                    format!("{} {path} pid={:?}", s.name, s.resource.get("process.pid")),
                )
            });
        e.0 += 1;
    }
    by.iter()
        .map(|((svc, kind, first), (n, example))| {
            format!("  {n:>5} {svc} kind={kind} /{first}  e.g. {example}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Correct-parent tallies per hop for requests with ids in `ids`.
fn evaluate(
    spans: &[ReceivedSpan],
    ids: std::ops::Range<u64>,
) -> Vec<(&'static str, &'static str, Tally)> {
    let mut index: HashMap<(String, i32, String, u64), Vec<&ReceivedSpan>> = HashMap::new();
    for s in spans {
        if let Some(k) = key(s) {
            index.entry(k).or_default().push(s);
        }
    }
    let get = |(svc, kind, prefix): (&str, i32, &str), id: u64| -> Vec<&ReceivedSpan> {
        index
            .get(&(svc.to_string(), kind, prefix.to_string(), id))
            .cloned()
            .unwrap_or_default()
    };
    HOPS.iter()
        .map(|&(name, how, child, parent)| {
            let mut t = Tally::default();
            for id in ids.clone() {
                let parents = get(parent, id);
                let Some(expected) = parents.first() else {
                    t.missing += 1;
                    continue;
                };
                // The leaf has two SERVER spans per id, one per caller: take the one whose
                // parent is this hop's caller, if any; otherwise judge the first unclaimed.
                let children = get(child, id);
                let chosen = children
                    .iter()
                    .find(|c| c.parent_span_id == expected.span_id)
                    .or_else(|| {
                        children.iter().find(|c| {
                            child.0 != "leaf"
                                || !get(("svc-b", CLIENT, "leaf"), id)
                                    .iter()
                                    .chain(get(("svc-node", CLIENT, "leaf"), id).iter())
                                    .any(|p| p.span_id == c.parent_span_id)
                        })
                    });
                match chosen {
                    None => t.missing += 1,
                    Some(c)
                        if c.parent_span_id == expected.span_id
                            && c.trace_id == expected.trace_id =>
                    {
                        t.correct += 1
                    }
                    Some(c) => {
                        // Enough to diagnose a miss from the test log alone.
                        let who = |x: &ReceivedSpan| {
                            format!("{} {} {} span={} parent={} trace={}", x.service(), x.kind, x.name, x.span_id, x.parent_span_id, x.trace_id)
                        };
                        let actual = spans.iter().find(|p| p.span_id == c.parent_span_id).map(&who);
                        eprintln!(
                            "hop {name} id {id}: child [{}] expected parent [{}] actual parent [{}] ({} candidates)",
                            who(c),
                            who(expected),
                            actual.unwrap_or_else(|| "none".into()),
                            children.len()
                        );
                        if c.parent_span_id.is_empty() {
                            t.orphan += 1
                        } else {
                            t.wrong += 1
                        }
                    }
                }
            }
            (name, how, t)
        })
        .collect()
}

fn report(label: &str, rows: &[(&'static str, &'static str, Tally)]) {
    eprintln!(
        "\n{label}\n{:<22} {:<11} {:>8} {:>6} {:>6} {:>7} {:>8}",
        "hop", "linking", "correct", "wrong", "orphan", "missing", "rate"
    );
    for (name, how, t) in rows {
        eprintln!(
            "{name:<22} {how:<11} {:>8} {:>6} {:>6} {:>7} {:>7.1}%",
            t.correct,
            t.wrong,
            t.orphan,
            t.missing,
            100.0 * t.rate()
        );
    }
}

fn assert_rates(rows: &[(&'static str, &'static str, Tally)], min: f64, label: &str) {
    for (name, how, t) in rows {
        if *how == "event-loop" {
            continue; // reported, not asserted (see the issue)
        }
        assert!(
            t.rate() >= min,
            "{label}: hop {name} ({how}) correct-parent rate {:.1}% < {:.0}%: {t:?}",
            100.0 * t.rate(),
            100.0 * min
        );
    }
}

#[test]
fn uninstrumented_chains_come_out_as_whole_traces() {
    scenario(false, false);
}

/// The same on a node that was already running: the services have served requests, and nginx's
/// upstream pool and Node.js's agent hold keep-alive connections, before the agent starts.
#[test]
fn uninstrumented_chains_come_out_whole_on_a_node_already_running() {
    scenario(false, true);
}

/// The same with the kernel picking ids per request (`--tcp-context`): on one node the agent's
/// own linking and the kernel's ids must agree.
#[test]
fn uninstrumented_chains_come_out_whole_with_tcp_context_on() {
    scenario(true, false);
}

/// The scenarios share two cores: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scenario(tcp_context: bool, warm_before_agent: bool) {
    if !privileged() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::new(match (tcp_context, warm_before_agent) {
        (true, _) => "chain-tc",
        (false, true) => "chain-warm",
        (false, false) => "chain",
    });
    let topo = topology(&cg);
    if warm_before_agent {
        // Ids outside every evaluated range; 16 threads so that nginx's pool fills.
        drive(&cg, topo.front, 16, 3, 900_000);
    }
    let receiver = Receiver::start();
    let ep = format!("http://{}", receiver.grpc);
    // Read only when spans are missing: what the agent counted says where they went.
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--cgroup",
        &cg.dir,
        "--otlp-endpoint",
        &ep,
        "--otlp-protocol",
        "grpc",
        "--metrics-addr",
        &metrics,
    ];
    if tcp_context {
        args.push("--tcp-context");
    }
    let agent = Agent::spawn(&args, &[]);

    // Enough requests that one miss is below the 1% / 5% the bounds allow.
    const SERIAL: (usize, usize, u64) = (1, 200, 100_000);
    const PARALLEL: (usize, usize, u64) = (16, 20, 200_000);
    drive(&cg, topo.front, SERIAL.0, SERIAL.1, SERIAL.2);
    drive(&cg, topo.front, PARALLEL.0, PARALLEL.1, PARALLEL.2);
    // The mixed case: an OpenTelemetry-SDK-instrumented client calls the same chain (one warm-up
    // request without context, then one inside its CLIENT span).
    let sdk_client = tests_dir().join("apps/sdk_client.py");
    let mut cmd = cg.command(
        &loupe_tests::venv_bin("python"),
        &[
            sdk_client.to_str().unwrap(),
            &format!("http://{}/a/300000", topo.front),
        ],
    );
    cmd.env("OTEL_SERVICE_NAME", "sdk-client");
    let out = cmd.output().expect("run the SDK client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: serde_json::Value = serde_json::from_slice(&out.stdout).expect("SDK client JSON");
    let sdk_trace = sdk["trace_id"].as_str().unwrap().to_string();
    let sdk_span = sdk["span_id"].as_str().unwrap().to_string();
    let sdk_pid = sdk["pid"].as_u64().unwrap().to_string();

    let expected = 12 * (SERIAL.0 * SERIAL.1 + PARALLEL.0 * PARALLEL.1 + 2);
    receiver.wait_for(Duration::from_secs(30), |s| s.len() >= expected);
    let counted = if receiver.spans().len() == expected {
        String::new()
    } else {
        // A diagnosis, not a check: an agent that died must still leave the census and its log.
        std::panic::catch_unwind(|| loupe_tests::scrape(&metrics))
            .unwrap_or_else(|_| "(the metrics endpoint did not answer)".into())
            .lines()
            .filter(|l| l.starts_with("loupe_") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();

    let serial = evaluate(&spans, SERIAL.2..SERIAL.2 + (SERIAL.0 * SERIAL.1) as u64);
    let parallel = evaluate(
        &spans,
        PARALLEL.2..PARALLEL.2 + (PARALLEL.0 * PARALLEL.1) as u64,
    );
    let mode = match (tcp_context, warm_before_agent) {
        (true, _) => ", --tcp-context",
        (false, true) => ", connections opened before the agent",
        (false, false) => "",
    };
    report(&format!("concurrency 1{mode}"), &serial);
    report(&format!("concurrency 16{mode}"), &parallel);
    if let Some(line) = log.lines().rev().find(|l| l.contains("events=")) {
        eprintln!("{line}");
    }
    assert_eq!(
        spans.len(),
        expected,
        "12 spans per request, no more, no less; what arrived:\n{}\nthe agent's counts:\n{counted}\n{log}",
        census(&spans)
    );
    assert_rates(&serial, 0.99, "concurrency 1");
    assert_rates(&parallel, 0.95, "concurrency 16");

    // Whole traces: every span of a request in its client's trace.
    let serial_n = (SERIAL.0 * SERIAL.1) as u64;
    let whole = (SERIAL.2..SERIAL.2 + serial_n)
        .filter(|&id| {
            let traces: std::collections::HashSet<&str> = spans
                .iter()
                .filter(|s| key(s).is_some_and(|k| k.3 == id))
                .map(|s| s.trace_id.as_str())
                .collect();
            traces.len() == 1
        })
        .count();
    eprintln!("whole traces at concurrency 1: {whole}/{serial_n}");

    // Mixed: the agent's 12 spans of the instrumented request are in the SDK's trace, and with
    // the SDK's span they form one tree (unique ids, every parent known).
    let mixed: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == sdk_trace).collect();
    assert_eq!(mixed.len(), 12, "{mixed:#?}");
    let mut ids: Vec<&str> = mixed.iter().map(|s| s.span_id.as_str()).collect();
    ids.push(&sdk_span);
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no span id exported twice");
    for s in &mixed {
        assert!(
            unique.contains(s.parent_span_id.as_str()),
            "parent of {} {} unknown: {s:?}",
            s.service(),
            s.name
        );
    }
    // Under the SDK's CLIENT span: the agent's CLIENT span of that process and nginx's SERVER
    // span (it joins the carried context, as it would across nodes); the rest hangs below nginx.
    // The client is named by its pid: it exits right after its request, and when the agent is
    // behind by more than that it cannot read the process's name any more.
    let mut roots: Vec<String> = mixed
        .iter()
        .filter(|s| s.parent_span_id == sdk_span)
        .map(|s| {
            let who = if s.resource.get("process.pid") == Some(&sdk_pid) {
                "sdk-client"
            } else {
                s.service()
            };
            format!(
                "{who} {}",
                if s.kind == SERVER { "SERVER" } else { "CLIENT" }
            )
        })
        .collect();
    roots.sort();
    assert_eq!(roots, ["nginx SERVER", "sdk-client CLIENT"], "{mixed:#?}");
}
