//! Privileged end-to-end: real HTTP servers and clients, the real agent, a real OTLP receiver.

use std::time::Duration;

use loupe_tests::{
    Agent, Server, TestCgroup, otlp::ReceivedSpan, otlp::Receiver, privileged, tests_dir, venv_bin,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn endpoint(r: &Receiver, protocol: &str) -> String {
    match protocol {
        "grpc" => format!("http://{}", r.grpc),
        _ => format!("http://{}", r.http),
    }
}

/// `loupe run` tracing only the test's cgroup, exporting to the receiver.
fn agent(cg: &TestCgroup, r: &Receiver, protocol: &str, extra: &[&str]) -> Agent {
    let ep = endpoint(r, protocol);
    let mut args = vec![
        "run",
        "--cgroup",
        &cg.dir,
        "--otlp-endpoint",
        &ep,
        "--otlp-protocol",
        protocol,
    ];
    args.extend_from_slice(extra);
    Agent::spawn(&args, &[])
}

fn gunicorn(cg: &TestCgroup) -> Server {
    loupe_tests::gunicorn(cg, 2, None)
}

fn http_server(cg: &TestCgroup) -> Server {
    loupe_tests::python_http_server(cg)
}

fn by_kind(spans: &[ReceivedSpan], kind: i32) -> Vec<&ReceivedSpan> {
    spans.iter().filter(|s| s.kind == kind).collect()
}

fn assert_resource(s: &ReceivedSpan) {
    for key in [
        "service.name",
        "process.pid",
        "process.executable.name",
        "process.command_line",
        "host.name",
        "telemetry.sdk.name",
    ] {
        assert!(
            s.resource.get(key).is_some_and(|v| !v.is_empty()),
            "resource lacks {key}: {s:?}"
        );
    }
}

#[test]
fn gunicorn_and_curl_spans_over_otlp_grpc() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("grpc");
    let server = gunicorn(&cg);
    let receiver = Receiver::start();
    let agent = agent(&cg, &receiver, "grpc", &[]);
    let base = format!("http://{}", server.addr);
    // Two requests on one keep-alive connection, then a POST and a 503.
    cg.run(
        "curl",
        &[
            "-sf",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            &format!("{base}/users/1"),
            &format!("{base}/users/2"),
        ],
    );
    cg.run(
        "curl",
        &[
            "-sf",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "-d",
            "name=x",
            &format!("{base}/items"),
        ],
    );
    cg.run("curl", &["-s", "-o", "/dev/null", &format!("{base}/fail")]);
    receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 8);
    // Stopping flushes: any span beyond the expected ones would arrive by then.
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();

    let servers = by_kind(&spans, SERVER);
    let clients = by_kind(&spans, CLIENT);
    assert_eq!(
        servers.len(),
        4,
        "one SERVER span per request: {servers:#?}\n{log}"
    );
    assert_eq!(
        clients.len(),
        4,
        "one CLIENT span per curl request: {clients:#?}"
    );
    assert!(spans.iter().all(|s| s.transport == "grpc"));

    let find = |list: &[&ReceivedSpan], path: &str| -> ReceivedSpan {
        list.iter()
            .find(|s| s.attr("url.path") == Some(path))
            .cloned()
            .cloned()
            .unwrap_or_else(|| panic!("no span for {path}"))
    };
    let s = find(&servers, "/users/1");
    assert_eq!(s.name, "GET /users/{id}");
    assert_eq!(s.service(), "gunicorn");
    assert_eq!(s.attr("http.request.method"), Some("GET"));
    assert_eq!(s.attr("http.route"), Some("/users/{id}"));
    assert_eq!(s.attr("http.response.status_code"), Some("200"));
    assert_eq!(s.attr("url.scheme"), Some("http"));
    assert_eq!(
        s.attr("server.port"),
        Some(server.addr.port().to_string().as_str())
    );
    assert_eq!(s.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(s.attr("client.address"), Some("127.0.0.1"));
    assert_eq!(s.attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(s.attr("network.protocol.version"), Some("1.1"));
    assert!(
        s.attr("user_agent.original")
            .is_some_and(|ua| ua.starts_with("curl/"))
    );
    assert_eq!(s.status_code, 0);
    assert_resource(&s);
    assert!(s.end_unix_ns > s.start_unix_ns);

    let post = find(&servers, "/items");
    assert_eq!(post.attr("http.request.method"), Some("POST"));
    assert_eq!(post.attr("http.response.status_code"), Some("201"));

    let fail = find(&servers, "/fail");
    assert_eq!(fail.attr("http.response.status_code"), Some("503"));
    assert_eq!(fail.status_code, 2, "5xx is an error on the server");
    assert_eq!(fail.attr("error.type"), Some("503"));

    let c = find(&clients, "/users/2");
    assert_eq!(c.service(), "curl");
    assert_eq!(c.name, "GET /users/{id}");
    assert_eq!(
        c.attr("server.port"),
        Some(server.addr.port().to_string().as_str())
    );
    assert_eq!(c.attr("url.full"), Some(format!("{base}/users/2").as_str()));
    assert_eq!(
        c.attr("network.peer.port"),
        Some(server.addr.port().to_string().as_str())
    );
    assert_resource(&c);
    let cfail = find(&clients, "/fail");
    assert_eq!(cfail.status_code, 2, "5xx is an error on the client too");

    // The client's span encloses the server's for the same request (same clock), though each
    // side is timed when its own syscall returns and on loopback either can return second.
    let sfail = &fail;
    assert_eq!(sfail.parent_span_id, cfail.span_id, "paired on this node");
    assert!(
        cfail.start_unix_ns <= sfail.start_unix_ns && sfail.end_unix_ns <= cfail.end_unix_ns,
        "client {}..{}, server {}..{}",
        cfail.start_unix_ns,
        cfail.end_unix_ns,
        sfail.start_unix_ns,
        sfail.end_unix_ns
    );
}

#[test]
fn nginx_and_python_requests_spans_over_otlp_http() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("http");
    let tmp = std::env::temp_dir().join(format!("loupe-nginx-{}", std::process::id()));
    let server = loupe_tests::nginx(&cg, &tmp);
    let receiver = Receiver::start();
    // Configured the standard way, by environment, and without the `run` subcommand.
    let ep = endpoint(&receiver, "http/protobuf");
    let agent = Agent::spawn(
        &["--cgroup", &cg.dir],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &ep),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ],
    );
    let script = format!(
        "import requests\ns = requests.Session()\nfor i in range(5):\n    r = s.get('http://{}/users/%d' % i)\n    assert r.status_code == 200\n",
        server.addr
    );
    cg.run(&venv_bin("python"), &["-c", &script]);
    let spans = receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 10);
    agent.stop_raw();
    let _ = std::fs::remove_dir_all(&tmp);

    let servers = by_kind(&spans, SERVER);
    let clients = by_kind(&spans, CLIENT);
    assert_eq!(servers.len(), 5, "{servers:#?}");
    assert_eq!(clients.len(), 5, "{clients:#?}");
    assert!(spans.iter().all(|s| s.transport == "http"));
    assert!(
        servers
            .iter()
            .all(|s| s.service() == "nginx" && s.name == "GET /users/{id}")
    );
    assert!(clients.iter().all(|s| {
        s.attr("user_agent.original")
            .is_some_and(|u| u.starts_with("python-requests"))
    }));
    let mut paths: Vec<&str> = servers.iter().filter_map(|s| s.attr("url.path")).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["/users/0", "/users/1", "/users/2", "/users/3", "/users/4"]
    );
}

#[test]
fn an_sdk_instrumented_client_context_is_joined() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("sdk");
    let server = http_server(&cg);
    let receiver = Receiver::start();
    let agent = agent(&cg, &receiver, "grpc", &[]);
    let client = tests_dir().join("apps/sdk_client.py");
    let out = cg.run(
        &venv_bin("python"),
        &[
            client.to_str().unwrap(),
            &format!("http://{}/sdk_client.py", server.addr),
        ],
    );
    let sdk: serde_json::Value = serde_json::from_str(out.trim()).expect("sdk client JSON");
    let trace_id = sdk["trace_id"].as_str().unwrap().to_string();
    let sdk_span = sdk["span_id"].as_str().unwrap().to_string();
    let spans = receiver.wait_for(Duration::from_secs(15), |s| {
        s.iter().filter(|x| x.trace_id == trace_id).count() >= 2
    });
    agent.stop_raw();

    let joined: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    assert_eq!(
        joined.len(),
        2,
        "the agent's SERVER and CLIENT spans of the instrumented request: {spans:#?}"
    );
    let server_span = joined
        .iter()
        .find(|s| s.kind == SERVER)
        .expect("server span");
    let client_span = joined
        .iter()
        .find(|s| s.kind == CLIENT)
        .expect("client span");
    // The callee's SERVER span is the SDK span's child.
    assert_eq!(server_span.parent_span_id, sdk_span);
    // The agent's CLIENT span sits under the SDK span too: one tree, no id exported twice.
    assert_eq!(client_span.parent_span_id, sdk_span);
    let mut ids: Vec<&str> = joined.iter().map(|s| s.span_id.as_str()).collect();
    ids.push(&sdk_span);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "span ids are unique");

    // Wall-clock agreement with the SDK's own span for the same request.
    let sdk_start = sdk["start_unix_ns"].as_u64().unwrap() as i64;
    let sdk_end = sdk["end_unix_ns"].as_u64().unwrap() as i64;
    let start_diff = client_span.start_unix_ns as i64 - sdk_start;
    let end_diff = sdk_end - client_span.end_unix_ns as i64;
    eprintln!("agent CLIENT span vs SDK span: start +{start_diff} ns, end -{end_diff} ns");
    assert!(
        (0..=1_000_000).contains(&start_diff),
        "start differs by {start_diff} ns"
    );
    assert!(
        (0..=1_000_000).contains(&end_diff),
        "end differs by {end_diff} ns"
    );
}

#[test]
fn secrets_in_headers_and_queries_never_leave_the_node() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("secrets");
    let server = http_server(&cg);
    let receiver = Receiver::start();
    let out_file = std::env::temp_dir().join(format!("loupe-spans-{}.jsonl", std::process::id()));
    let out_path = out_file.to_str().unwrap().to_string();
    let agent = agent(
        &cg,
        &receiver,
        "http/protobuf",
        &["--output", &out_path, "--console"],
    );
    let secrets = [
        "SECRET-AUTH-1",
        "SECRET-COOKIE-2",
        "SECRET-KEY-3",
        "SECRET-PROXY-4",
        "SECRET-QUERY-5",
        "SECRET-QUERY-6",
        "SECRET-TOKEN-7",
        "SECRET-QUERY-8",
        "SECRET-QUERY-9",
        "SECRET-USERINFO-10",
        "SECRET-CSRF-11",
        "SECRET-AMZ-12",
    ];
    // Every query form: `&` and `;` separators, a bare flag, a bare token; credentials in the
    // URL's userinfo (curl sends them as Basic auth, and they sit in its command line).
    let url = format!(
        "http://user:SECRET-USERINFO-10@{}/missing?token=SECRET-QUERY-5&user=SECRET-QUERY-6&flag;session_id=SECRET-QUERY-8&SECRET-QUERY-9",
        server.addr
    );
    cg.run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-H",
            "Authorization: Bearer SECRET-AUTH-1",
            "-H",
            "Cookie: session=SECRET-COOKIE-2",
            "-H",
            "X-Api-Key: SECRET-KEY-3",
            "-H",
            "Proxy-Authorization: Basic SECRET-PROXY-4",
            "-H",
            "X-Auth-Token: SECRET-TOKEN-7",
            "-H",
            "X-CSRF-Token: SECRET-CSRF-11",
            "-H",
            "X-Amz-Security-Token: SECRET-AMZ-12",
            &url,
        ],
    );
    let spans = receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 2);
    let (stdout, log) = agent.stop_raw();
    let jsonl = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _ = std::fs::remove_file(&out_file);

    // Not vacuous: the request was traced, everywhere.
    assert_eq!(spans.len(), 2, "{spans:#?}\n{log}");
    assert!(
        spans.iter().all(|s| s.attr("url.query")
            == Some("token=REDACTED&user=REDACTED&flag;session_id=REDACTED&REDACTED")),
        "{spans:#?}"
    );
    assert_eq!(jsonl.lines().count(), 2, "{jsonl}");
    let console = stdout.join("\n");
    assert!(console.contains("GET /missing"), "{console}");

    let raw = String::from_utf8_lossy(&receiver.raw()).into_owned();
    for secret in secrets {
        if let Some(at) = raw.find(secret) {
            let from = raw[..at]
                .char_indices()
                .rev()
                .nth(300)
                .map(|(i, _)| i)
                .unwrap_or(0);
            panic!(
                "{secret} reached the OTLP endpoint: ...{}...",
                &raw[from..(at + 100).min(raw.len())]
            );
        }
        assert!(!jsonl.contains(secret), "{secret} written to --output");
        assert!(!console.contains(secret), "{secret} printed on the console");
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[test]
fn without_a_backend_traces_print_as_trees() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("console");
    let server = http_server(&cg);
    let agent = Agent::spawn(&["--cgroup", &cg.dir], &[]);
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
    let traces = stdout.iter().filter(|l| l.starts_with("trace ")).count();
    // curl and the server are both on this node: one trace, the SERVER span under curl's CLIENT span.
    assert_eq!(traces, 1, "{text}\n{log}");
    let client = stdout
        .iter()
        .position(|l| l.contains("curl [") && l.contains("CLIENT GET /users/{id}"));
    let server = stdout
        .iter()
        .position(|l| l.contains("SERVER GET /users/{id}") && l.contains("404"));
    let (Some(c), Some(s)) = (client, server) else {
        panic!("{text}")
    };
    assert_eq!(s, c + 1, "{text}");
    assert!(
        stdout[c].starts_with("└─ ") && stdout[s].starts_with("   └─ "),
        "indented as a child:\n{text}"
    );
    assert!(stdout[c].contains("ERROR 404"), "{text}");
}

#[test]
fn service_name_rules_match_what_they_say_and_processes_declare_their_resource() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("naming");
    // The server declares its resource itself, as an SDK-configured deployment would.
    let server = loupe_tests::python_http_server_with_env(
        &cg,
        &[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=staging,service.version=2.1%2B7,db.password=hunter2",
        )],
    );
    let dir = loupe_tests::databases::TempDir::new("naming");
    let config = dir.0.join("loupe.yaml");
    // `match: orders` must not rename curl fetching /orders/77; the regex rule names the server.
    std::fs::write(
        &config,
        "service_names:\n  - match: orders\n    name: wrong\n  - command_line: 'http\\.server \\d+'\n    name: static-files\n",
    )
    .unwrap();
    let receiver = Receiver::start();
    let agent = agent(
        &cg,
        &receiver,
        "grpc",
        &["--config", config.to_str().unwrap()],
    );
    cg.run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{}/orders/77", server.addr),
        ],
    );
    receiver.wait_for(Duration::from_secs(15), |s| s.len() >= 2);
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let client = by_kind(&spans, CLIENT);
    let server_spans = by_kind(&spans, SERVER);
    assert_eq!(
        (client.len(), server_spans.len()),
        (1, 1),
        "{spans:#?}\n{log}"
    );
    assert_eq!(client[0].service(), "curl");
    let s = server_spans[0];
    assert_eq!(s.service(), "static-files");
    assert_eq!(
        s.resource
            .get("deployment.environment.name")
            .map(String::as_str),
        Some("staging")
    );
    assert_eq!(
        s.resource.get("service.version").map(String::as_str),
        Some("2.1+7")
    );
    assert_eq!(
        s.resource.get("db.password").map(String::as_str),
        Some("REDACTED")
    );
    drop(server);
}

/// A client that runs for a millisecond is gone before its first event reaches user space: it is
/// named from its exec (read in the kernel while it cannot have exited), not from /proc. Many
/// in a row, because each one is a race the agent used to lose now and then.
#[test]
fn short_lived_clients_are_named_from_their_exec() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("shortlived");
    let server = http_server(&cg);
    let receiver = Receiver::start();
    let agent = agent(&cg, &receiver, "grpc", &[]);
    const CLIENTS: usize = 60;
    for i in 0..CLIENTS {
        let url = format!("http://{}/missing-{i}", server.addr);
        let out = cg
            .command("curl", &["-s", "-o", "/dev/null", &url])
            .env("OTEL_SERVICE_NAME", format!("batch-{}", i % 3))
            .env("OTEL_RESOURCE_ATTRIBUTES", format!("job.index={i}"))
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    receiver.wait_for(Duration::from_secs(20), |s| {
        by_kind(s, CLIENT).len() >= CLIENTS
    });
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans();
    let clients = by_kind(&spans, CLIENT);
    assert_eq!(clients.len(), CLIENTS, "{log}");
    let mut wrong = Vec::new();
    for s in &clients {
        let i: usize = s
            .attr("url.path")
            .and_then(|p| p.strip_prefix("/missing-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("path: {s:?}"));
        let want_cmd = format!("curl -s -o /dev/null http://{}/missing-{i}", server.addr);
        let got = (
            s.service().to_string(),
            s.resource.get("process.command_line").cloned(),
            s.resource.get("process.executable.name").cloned(),
            s.resource.get("job.index").cloned(),
        );
        let want = (
            format!("batch-{}", i % 3),
            Some(want_cmd),
            Some("curl".to_string()),
            Some(i.to_string()),
        );
        if got != want {
            wrong.push(format!("{got:?} != {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {CLIENTS}: {wrong:#?}", wrong.len());
    drop(server);
}
