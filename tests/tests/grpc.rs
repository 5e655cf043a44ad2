//! Privileged: gRPC and HTTP/2 between real peers — a grpcio server (thread pool) and client
//! over one multiplexed channel, opened before the agent started or after it; the handler
//! calls an HTTP/1 service from its pool thread.

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use loupe_tests::{
    Agent, Server, TestCgroup, free_port,
    otlp::{ReceivedSpan, Receiver},
    privileged, tests_dir, venv_bin,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

struct Services {
    _leaf: Server,
    grpc: Server,
}

fn services(cg: &TestCgroup) -> Services {
    let apps = tests_dir().join("apps");
    let leaf_port = free_port();
    let leaf = Server::start(
        cg.command(
            "python3",
            &[
                apps.join("chain_service.py").to_str().unwrap(),
                &leaf_port.to_string(),
            ],
        ),
        addr(leaf_port),
    );
    let port = free_port();
    let grpc = Server::start(
        cg.command(
            &venv_bin("python"),
            &[
                apps.join("grpc_service.py").to_str().unwrap(),
                &port.to_string(),
                &format!("http://127.0.0.1:{leaf_port}"),
            ],
        ),
        addr(port),
    );
    Services { _leaf: leaf, grpc }
}

/// Which client makes the calls.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// grpcio, its channel up (and used) before the agent starts; calls on it.
    PythonJoined,
    /// grpcio, calls on a second channel opened after the agent started.
    PythonFresh,
    /// @grpc/grpc-js (Node.js), its channel opened after the agent started.
    Node,
}

/// What a run left: spans, the agent's log and metrics, the client's and the server's pids.
struct Run {
    spans: Vec<ReceivedSpan>,
    log: String,
    metrics: String,
    client: u32,
    server: u32,
}

/// Runs the client against the services.
fn run(which: Client) -> Run {
    let cg = TestCgroup::new(match which {
        Client::PythonJoined => "grpc-joined",
        Client::PythonFresh => "grpc-fresh",
        Client::Node => "grpc-node",
    });
    let s = services(&cg);
    let target = s.grpc.addr.to_string();
    let python = tests_dir().join("apps/grpc_client.py");
    let node = tests_dir().join("apps/grpc_client.js");
    let mut cmd = match which {
        Client::Node => {
            let mut c = cg.command("node", &[node.to_str().unwrap(), target.as_str()]);
            c.env("NODE_PATH", tests_dir().join(".node/node_modules"));
            c
        }
        _ => {
            let mut args = vec![python.to_str().unwrap(), target.as_str()];
            if which == Client::PythonFresh {
                args.push("--fresh");
            }
            cg.command(&venv_bin("python"), &args)
        }
    };
    let mut client = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let receiver = Receiver::start();
    let ep = format!("http://{}", receiver.grpc);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::spawn(
        &[
            "--cgroup",
            &cg.dir,
            "--otlp-endpoint",
            &ep,
            "--otlp-protocol",
            "grpc",
            "--metrics-addr",
            &metrics_addr,
        ],
        &[],
    );
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done", "the client's calls failed");
    let client_pid = client.id();
    let server_pid = s.grpc.child.id();
    // 3 calls x 2 sides, and the handler's HTTP call with its leaf's SERVER span.
    receiver.wait_for(Duration::from_secs(20), |spans| spans.len() >= 8);
    let metrics = loupe_tests::scrape(&metrics_addr);
    let (_, log) = agent.stop_raw();
    writeln!(stdin).unwrap();
    let _ = client.wait();
    Run {
        spans: receiver.spans(),
        log,
        metrics,
        client: client_pid,
        server: server_pid,
    }
}

/// HTTP/2 header fields the agent could not decode (HPACK entries from before it attached).
fn unknown_fields(metrics: &str) -> u64 {
    loupe_tests::metric(metrics, "loupe_l7_unknown_fields_total{protocol=\"http2\"}")
        .unwrap_or_else(|| panic!("no unknown-fields counter:\n{metrics}"))
}

/// The first call carried traceparent in its metadata: both sides join that trace as children
/// of the carried span (as for HTTP/1: the carried context wins). The others: each server span
/// is the child of its client span, paired by stream id.
fn assert_linked(cl: &[&ReceivedSpan], sv: &[&ReceivedSpan]) {
    for s in [cl[0], sv[0]] {
        assert_eq!(
            (s.trace_id.as_str(), s.parent_span_id.as_str()),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
        );
    }
    for (c, s) in cl.iter().zip(sv).skip(1) {
        assert_eq!(
            (s.trace_id.as_str(), s.parent_span_id.as_str()),
            (c.trace_id.as_str(), c.span_id.as_str()),
            "paired by stream id"
        );
    }
}

/// One line per span, for failure messages.
fn dump(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "pid {} kind {} {} status {:?} error {:?} span {} parent {}",
                pid(s),
                s.kind,
                s.name,
                s.attr("rpc.response.status_code"),
                s.attr("error.type"),
                s.span_id,
                s.parent_span_id
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn pid(s: &ReceivedSpan) -> u32 {
    s.resource["process.pid"].parse().unwrap()
}

#[test]
fn grpc_calls_on_a_fresh_channel_are_exact_and_linked() {
    if !privileged() {
        return;
    }
    let Run {
        spans,
        log,
        metrics,
        client,
        server,
    } = run(Client::PythonFresh);
    let log = format!("{log}\n{}", dump(&spans));
    let calls = |p: u32, kind: i32| -> Vec<&ReceivedSpan> {
        let mut v: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| pid(s) == p && s.kind == kind && s.attr("rpc.system.name") == Some("grpc"))
            .collect();
        v.sort_by_key(|s| s.start_unix_ns);
        v
    };
    let (cl, sv) = (calls(client, CLIENT), calls(server, SERVER));
    let names = |v: &[&ReceivedSpan]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let want = [
        "shop.v1.Orders/Get",
        "shop.v1.Orders/Watch",
        "shop.v1.Orders/Get",
    ];
    assert_eq!(names(&cl), want, "{log}");
    assert_eq!(names(&sv), want, "{log}");
    let codes = |v: &[&ReceivedSpan]| {
        v.iter()
            .map(|s| {
                s.attr("rpc.response.status_code")
                    .unwrap_or("-")
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(codes(&cl), ["OK", "OK", "NOT_FOUND"], "{log}");
    assert_eq!(codes(&sv), ["OK", "OK", "NOT_FOUND"], "{log}");
    // NOT_FOUND is the caller's error, not the server's.
    assert_eq!(cl[2].status_code, 2);
    assert_ne!(sv[2].status_code, 2);
    for s in cl.iter().chain(&sv) {
        assert_eq!(s.attr("network.protocol.version"), Some("2"));
        assert_eq!(s.attr("rpc.method"), Some(s.name.as_str()));
    }
    assert_linked(&cl, &sv);
    // The handler's HTTP call, made from a pool thread, inside the Get it served.
    let http = spans
        .iter()
        .find(|s| pid(s) == server && s.kind == CLIENT && s.name.starts_with("GET /stock"))
        .unwrap_or_else(|| panic!("no HTTP call from the handler\n{log}"));
    assert_eq!(http.parent_span_id, sv[0].span_id, "{log}");
    assert_eq!(
        unknown_fields(&metrics),
        0,
        "a connection seen from its start"
    );
    // RED: the RPC call durations count each call once, by method and status code.
    let count = |metric: &str, labels: &[&str]| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    for metric in [
        "rpc_server_call_duration_seconds_count",
        "rpc_client_call_duration_seconds_count",
    ] {
        let get = "rpc_method=\"shop.v1.Orders/Get\"";
        assert_eq!(
            count(metric, &[get, "rpc_response_status_code=\"OK\""]),
            1,
            "{metric}\n{metrics}"
        );
        assert_eq!(
            count(metric, &[get, "rpc_response_status_code=\"NOT_FOUND\""]),
            1
        );
        assert_eq!(count(metric, &["rpc_method=\"shop.v1.Orders/Watch\""]), 1);
        assert_eq!(count(metric, &["rpc_system_name=\"grpc\""]), 3);
    }
}

#[test]
fn grpc_calls_on_a_channel_opened_before_the_agent_pair_and_say_nothing_wrong() {
    if !privileged() {
        return;
    }
    let Run {
        spans,
        log,
        metrics,
        client,
        server,
    } = run(Client::PythonJoined);
    let log = format!("{log}\n{}", dump(&spans));
    let side = |p: u32, kind: i32| -> Vec<&ReceivedSpan> {
        let mut v: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                pid(s) == p && s.kind == kind && s.attr("network.protocol.version") == Some("2")
            })
            .collect();
        v.sort_by_key(|s| s.start_unix_ns);
        v
    };
    let (cl, sv) = (side(client, CLIENT), side(server, SERVER));
    assert_eq!(
        (cl.len(), sv.len()),
        (3, 3),
        "one span per call on each side\n{log}"
    );
    assert_linked(&cl, &sv);
    // The handler's HTTP call, made from a pool thread, inside the Get it served.
    let http = spans
        .iter()
        .find(|s| pid(s) == server && s.kind == CLIENT && s.name.starts_with("GET /stock"))
        .unwrap_or_else(|| panic!("no HTTP call from the handler\n{log}"));
    assert_eq!(http.parent_span_id, sv[0].span_id, "{log}");
    let want = [
        "shop.v1.Orders/Get",
        "shop.v1.Orders/Watch",
        "shop.v1.Orders/Get",
    ];
    for (s, w) in cl.iter().chain(&sv).zip(want.iter().chain(&want)) {
        // A name learned after attach is right; one the agent could not learn is not made up.
        if s.attr("rpc.system.name") == Some("grpc") {
            assert!(s.name == *w || s.name == "grpc", "{} vs {w}", s.name);
        }
    }
    // What was indexed before attach (content-type at least) is unknown, and counted.
    assert!(unknown_fields(&metrics) > 0, "{log}");
}

#[test]
fn a_node_grpc_js_client_is_traced_exactly() {
    if !privileged() {
        return;
    }
    let Run {
        spans,
        log,
        client,
        server,
        ..
    } = run(Client::Node);
    let log = format!("{log}\n{}", dump(&spans));
    let calls = |p: u32, kind: i32| -> Vec<(String, String)> {
        let mut v: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| pid(s) == p && s.kind == kind && s.attr("rpc.system.name") == Some("grpc"))
            .collect();
        v.sort_by_key(|s| s.start_unix_ns);
        v.iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.attr("rpc.response.status_code")
                        .unwrap_or("-")
                        .to_string(),
                )
            })
            .collect()
    };
    let want: Vec<(String, String)> = [
        ("shop.v1.Orders/Get", "OK"),
        ("shop.v1.Orders/Watch", "OK"),
        ("shop.v1.Orders/Get", "NOT_FOUND"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(calls(client, CLIENT), want, "{log}");
    assert_eq!(calls(server, SERVER), want, "{log}");
}

#[test]
fn plain_http2_between_curl_and_nginx_is_http_with_version_2() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("h2c");
    let dir = loupe_tests::databases::TempDir::new("h2c");
    let port = free_port();
    let d = dir.0.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\ndaemon off;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port} http2;\n\
             location /users/ {{ return 200 'ok'; }}\n    location / {{ return 404; }}\n  }}\n}}\n"
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let _nginx = Server::start(
        cg.command(
            "nginx",
            &["-p", &d.to_string(), "-c", conf_path.to_str().unwrap()],
        ),
        addr(port),
    );
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
    // Prior knowledge: h2c without an upgrade. (curl 7.88 fails a second URL reusing the
    // connection against nginx 1.22, so one request per connection.)
    let base = format!("http://127.0.0.1:{port}");
    for path in ["/users/7", "/missing"] {
        cg.run(
            "curl",
            &[
                "-s",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                &format!("{base}{path}"),
            ],
        );
    }
    receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 4);
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let log = format!("{log}\n{}", dump(&spans));
    let mut got: Vec<(i32, String, Option<String>, Option<String>)> = spans
        .iter()
        .map(|s| {
            (
                s.kind,
                s.name.clone(),
                s.attr("http.response.status_code").map(str::to_string),
                s.attr("network.protocol.version").map(str::to_string),
            )
        })
        .collect();
    got.sort();
    let v2 = Some("2".to_string());
    assert_eq!(
        got,
        vec![
            (
                SERVER,
                "GET /missing".into(),
                Some("404".into()),
                v2.clone()
            ),
            (
                SERVER,
                "GET /users/{id}".into(),
                Some("200".into()),
                v2.clone()
            ),
            (
                CLIENT,
                "GET /missing".into(),
                Some("404".into()),
                v2.clone()
            ),
            (CLIENT, "GET /users/{id}".into(), Some("200".into()), v2),
        ],
        "{log}"
    );
    // Each nginx span is the child of curl's span for the same stream.
    for s in spans.iter().filter(|s| s.kind == SERVER) {
        let c = spans
            .iter()
            .find(|c| c.kind == CLIENT && c.name == s.name)
            .unwrap();
        assert_eq!(
            (&s.trace_id, &s.parent_span_id),
            (&c.trace_id, &c.span_id),
            "{log}"
        );
    }
}

/// The handler runs on a pool thread that was not created for the request: its outgoing call is
/// linked to the SERVER span only when the process is handling that one request. Measured at
/// concurrency 1 (every call linked) and 8 (linked only when unambiguous; never to a request
/// that was not in flight).
#[test]
fn handler_calls_from_the_pool_link_at_concurrency_1_and_are_never_guessed_at_8() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("grpc-load");
    let s = services(&cg);
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
    let load = tests_dir().join("apps/grpc_load.py");
    let target = s.grpc.addr.to_string();
    let n = 40;
    for (prefix, c) in [("one", "1"), ("eight", "8")] {
        let out = cg.run(
            &venv_bin("python"),
            &[load.to_str().unwrap(), &target, prefix, &n.to_string(), c],
        );
        assert!(out.contains("done"), "{out}");
    }
    // Per call: client and server Get spans, and the handler's leaf call with the leaf's span.
    receiver.wait_for(Duration::from_secs(30), |spans| spans.len() >= 2 * n * 4);
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let server = s.grpc.child.id();
    let gets: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|x| pid(x) == server && x.kind == SERVER && x.name == "shop.v1.Orders/Get")
        .collect();
    let mut report = String::new();
    for prefix in ["one", "eight"] {
        let calls: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|x| {
                pid(x) == server
                    && x.kind == CLIENT
                    && x.attr("url.path")
                        .is_some_and(|p| p.starts_with(&format!("/stock/{prefix}")))
            })
            .collect();
        assert_eq!(calls.len(), n, "{log}\n{}", dump(&spans));
        let (mut linked, mut wrong) = (0, 0);
        for call in &calls {
            let Some(parent) = gets.iter().find(|g| g.span_id == call.parent_span_id) else {
                assert!(
                    call.parent_span_id.is_empty(),
                    "a parent that is no Get span"
                );
                continue;
            };
            // The parent must have been in flight around the call.
            if parent.start_unix_ns <= call.start_unix_ns && call.end_unix_ns <= parent.end_unix_ns
            {
                linked += 1;
            } else {
                wrong += 1;
            }
        }
        report.push_str(&format!(
            "{prefix}: {linked}/{n} handler calls linked, {} orphans, {wrong} wrong\n",
            n - linked - wrong
        ));
        assert_eq!(wrong, 0, "{report}");
        if prefix == "one" {
            assert_eq!(linked, n, "{report}");
        }
    }
    eprintln!("gRPC handler links by concurrency:\n{report}");
}
