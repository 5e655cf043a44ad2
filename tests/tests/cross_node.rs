//! Two nodes on one machine: two network namespaces joined by a veth pair, one agent restricted
//! to each. A client and a threaded service in namespace A call a leaf service in namespace B;
//! nothing carries a header. With `--tcp-context` on both agents the TCP option carries the trace
//! across and the leaf's SERVER span joins the caller's trace; with it off on B, B ignores the
//! option A sends and the leaf starts traces of its own.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use loupe_tests::{Agent, free_port, metric, privileged, tests_dir};
use serde_json::Value;

const REQUESTS: usize = 20;

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2 is installed");
    assert!(st.success(), "ip {args:?} failed");
}

/// Two namespaces, `a` at 10.231.N.1 and `b` at 10.231.N.2, joined by a veth pair; removed on drop.
struct TwoNodes {
    a: String,
    b: String,
    b_addr: String,
}

impl TwoNodes {
    fn new(tag: &str) -> TwoNodes {
        let id = std::process::id() % 10_000;
        let (a, b) = (format!("lp{tag}a{id}"), format!("lp{tag}b{id}"));
        // Distinct per test: the tests of this file run in parallel.
        let subnet = if tag == "on" { 100 } else { 200 } + id % 50;
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let nodes = TwoNodes {
            a: a.clone(),
            b: b.clone(),
            b_addr: format!("10.231.{subnet}.2"),
        };
        let (va, vb) = (format!("v{tag}a{id}"), format!("v{tag}b{id}"));
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        for (ns, dev, addr) in [
            (&a, &va, format!("10.231.{subnet}.1/24")),
            (&b, &vb, format!("10.231.{subnet}.2/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        nodes
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A process in a namespace; killed on drop.
struct InNs(std::process::Child);

impl InNs {
    fn spawn(ns: &str, env: &[(&str, &str)], args: &[&str]) -> InNs {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ip netns exec");
        InNs(child)
    }
}

impl Drop for InNs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(ns: &str, addr: &str, port: u16) {
    let script = format!(
        "import socket,time\nfor _ in range(300):\n  try:\n    socket.create_connection(('{addr}',{port}),1).close(); break\n  except OSError: time.sleep(0.1)\nelse: raise SystemExit('not up')"
    );
    let st = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .status()
        .expect("python3");
    assert!(st.success(), "{addr}:{port} in {ns} not up");
}

fn chain_service() -> String {
    tests_dir()
        .join("apps/chain_service.py")
        .display()
        .to_string()
}

struct Run {
    /// Spans each agent wrote.
    a: Vec<Value>,
    b: Vec<Value>,
    /// Agent A's metrics before it stopped.
    a_metrics: String,
}

fn agent_on(ns: &str, tcp_context: bool, output: &Path, metrics: &str) -> Agent {
    let out = output.display().to_string();
    let mut args = vec![
        "run",
        "--netns",
        ns,
        "--output",
        &out,
        "--metrics-addr",
        metrics,
    ];
    if tcp_context {
        args.push("--tcp-context");
    }
    Agent::spawn(&args, &[])
}

fn read_spans(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON span"))
        .collect()
}

/// Client -> svc-a (namespace A) -> leaf (namespace B), `REQUESTS` times, ids in the paths.
fn drive(tag: &str, b_context: bool) -> Run {
    let nodes = TwoNodes::new(tag);
    let dir = std::env::temp_dir().join(format!("loupe-xnode-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out_a, out_b): (PathBuf, PathBuf) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let _ = std::fs::remove_file(&out_a);
    let _ = std::fs::remove_file(&out_b);
    let metrics_a = format!("127.0.0.1:{}", free_port());
    let metrics_b = format!("127.0.0.1:{}", free_port());
    let agent_a = agent_on(&nodes.a, true, &out_a, &metrics_a);
    let agent_b = agent_on(&nodes.b, b_context, &out_b, &metrics_b);

    let (leaf_port, svc_port) = (18_500 + std::process::id() as u16 % 500, 19_100);
    let leaf_port_s = leaf_port.to_string();
    let _leaf = InNs::spawn(
        &nodes.b,
        &[("BIND", &nodes.b_addr)],
        &["python3", &chain_service(), &leaf_port_s],
    );
    let downstream = format!("http://{}:{leaf_port}=leaf", nodes.b_addr);
    let svc_port_s = svc_port.to_string();
    let _svc = InNs::spawn(
        &nodes.a,
        &[],
        &["python3", &chain_service(), &svc_port_s, &downstream],
    );
    wait_for_port(&nodes.b, &nodes.b_addr, leaf_port);
    wait_for_port(&nodes.a, "127.0.0.1", svc_port);

    let client = format!(
        "import urllib.request\nfor i in range({REQUESTS}):\n  \
         urllib.request.urlopen(f'http://127.0.0.1:{svc_port}/front/{{1000+i}}', timeout=10).read()"
    );
    let st = Command::new("ip")
        .args(["netns", "exec", &nodes.a, "python3", "-c", &client])
        .status()
        .expect("python3");
    assert!(st.success(), "the client failed");

    // Let both agents see every span complete before reading A's counters and stopping.
    let deadline = Instant::now() + Duration::from_secs(15);
    let want_a = 3 * REQUESTS;
    let complete_lines = |p: &Path| {
        std::fs::read(p)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    };
    while Instant::now() < deadline && complete_lines(&out_a) < want_a {
        std::thread::sleep(Duration::from_millis(200));
    }
    let a_metrics = loupe_tests::scrape(&metrics_a);
    let _ = agent_a.stop_raw();
    let _ = agent_b.stop_raw();
    let run = Run {
        a: read_spans(&out_a),
        b: read_spans(&out_b),
        a_metrics,
    };
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// Request id (last path segment) -> span, for spans of `kind` whose path starts with `prefix`.
fn by_id<'a>(spans: &'a [Value], kind: &str, prefix: &str) -> HashMap<String, &'a Value> {
    spans
        .iter()
        .filter(|s| s["kind"] == kind)
        .filter_map(|s| {
            let attrs = &s["attributes"];
            let url = attrs["url.path"]
                .as_str()
                .or_else(|| attrs["url.full"].as_str())?;
            let path = url.split("://").last()?;
            let path = &path[path.find('/')?..];
            path.strip_prefix(prefix)
                .map(|id| (id.trim_matches('/').to_string(), s))
        })
        .collect()
}

/// Request id -> span, per hop.
type ById<'a> = HashMap<String, &'a Value>;

/// The client's calls, svc-a's SERVER spans, svc-a's calls to the leaf, the leaf's SERVER spans.
fn ids(run: &Run) -> (ById<'_>, ById<'_>, ById<'_>, ById<'_>) {
    (
        by_id(&run.a, "client", "/front/"),
        by_id(&run.a, "server", "/front/"),
        by_id(&run.a, "client", "/leaf/"),
        by_id(&run.b, "server", "/leaf/"),
    )
}

#[test]
fn the_tcp_option_carries_a_trace_across_nodes() {
    if !privileged() {
        return;
    }
    let run = drive("on", true);
    let (client, front, call, leaf) = ids(&run);
    for (what, m) in [
        ("client", &client),
        ("svc-a server", &front),
        ("svc-a call", &call),
        ("leaf", &leaf),
    ] {
        assert_eq!(
            m.len(),
            REQUESTS,
            "{what} spans: {}\nA: {:?}\nB: {:?}",
            m.len(),
            run.a,
            run.b
        );
    }
    let mut whole = 0;
    for i in 0..REQUESTS {
        let id = (1000 + i).to_string();
        let (c, f, k, l) = (client[&id], front[&id], call[&id], leaf[&id]);
        let trace = &c["trace_id"];
        assert!(
            c["parent_span_id"].is_null(),
            "the client starts the trace: {c}"
        );
        assert_eq!(
            f["parent_span_id"], c["span_id"],
            "svc-a's SERVER under the client: {f}"
        );
        assert_eq!(
            k["parent_span_id"], f["span_id"],
            "svc-a's call under its SERVER span: {k}"
        );
        assert_eq!(
            l["parent_span_id"], k["span_id"],
            "the leaf on the other node under svc-a's CLIENT span: {l}\ncall: {k}"
        );
        if [f, k, l].iter().all(|s| &s["trace_id"] == trace) {
            whole += 1;
        }
    }
    assert_eq!(whole, REQUESTS, "whole traces across the two nodes");
    let written = metric(
        &run.a_metrics,
        "loupe_kernel_events_total{reason=\"option_written\"",
    )
    .unwrap_or(0);
    assert!(written >= REQUESTS as u64, "options written: {written}");
}

#[test]
fn an_agent_without_the_option_ignores_what_a_peer_sends() {
    if !privileged() {
        return;
    }
    let run = drive("off", false);
    let (_, _, call, leaf) = ids(&run);
    assert_eq!(call.len(), REQUESTS, "svc-a calls: {:?}", run.a);
    assert_eq!(leaf.len(), REQUESTS, "leaf spans: {:?}", run.b);
    // A did put its context on the wire...
    let written = metric(
        &run.a_metrics,
        "loupe_kernel_events_total{reason=\"option_written\"",
    )
    .unwrap_or(0);
    assert!(
        written >= REQUESTS as u64,
        "options A wrote: {written}\n{}",
        run.a_metrics
    );
    // ...and B, not opted in, started a trace of its own for every request.
    for (id, l) in &leaf {
        assert!(
            l["parent_span_id"].is_null(),
            "leaf {id} took a parent: {l}"
        );
        assert_ne!(
            l["trace_id"], call[id]["trace_id"],
            "leaf {id} joined the caller's trace"
        );
    }
}
