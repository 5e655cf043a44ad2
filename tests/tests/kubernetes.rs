//! Pod metadata without a cluster: a local HTTP server replays Kubernetes API responses (a pod
//! list, then a watch that adds a pod and deletes another), the agent is pointed at it through a
//! kubeconfig, and two servers run in cgroups named the way container runtimes name them. Their
//! spans must carry their pods' attributes within seconds, including the pod that only appears
//! through the watch. Outside Kubernetes (`auto` without KUBERNETES_SERVICE_HOST) the agent must
//! not call the API at all.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use loupe_tests::{Agent, Server, TestCgroup, free_port, metric, privileged, tests_dir};
use serde_json::{Value, json};

const CHECKOUT_ID: &str = "4f1c0b1b9a1d4c2e8f0a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e";
const CHECKOUT_UID: &str = "9b3f7a52-3c1e-4d8a-9f6b-2e7d1c0a5b43";
const ORDERS_ID: &str = "b7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180";
const ORDERS_UID: &str = "3d2c1b0a-9f8e-4d7c-8b6a-5f4e3d2c1b0a";

fn fixture(name: &str) -> Value {
    let path = tests_dir().join(format!("fixtures/k8s/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Answers GET /api/v1/pods (a list) and GET /api/v1/pods?watch=... (a chunked event stream:
/// ADDED orders-db after `add_after`, DELETED checkout after `delete_after`; later watches get
/// nothing and are held open). Records every request line.
struct ReplayApi {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ReplayApi {
    fn start(add_after: Duration, delete_after: Duration) -> ReplayApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let first_watch = Arc::new(AtomicBool::new(true));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let log = log.clone();
                let first_watch = first_watch.clone();
                std::thread::spawn(move || {
                    serve(stream, &log, &first_watch, add_after, delete_after)
                });
            }
        });
        ReplayApi { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    log: &Mutex<Vec<String>>,
    first_watch: &AtomicBool,
    add_after: Duration,
    delete_after: Duration,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request = line.trim().to_string();
        // Skip the headers (GETs carry no body).
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        log.lock().unwrap().push(request.clone());
        let target = request.split(' ').nth(1).unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != "/api/v1/pods" {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
            let _ = write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        if !query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            let list = json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "48300"},
                "items": [fixture("pod-checkout")],
            })
            .to_string();
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{list}",
                list.len()
            );
            continue;
        }
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let _ = out.flush();
        let chunk = |out: &mut TcpStream, event: Value| {
            let line = format!("{event}\n");
            let _ = write!(out, "{:x}\r\n{line}\r\n", line.len());
            let _ = out.flush();
        };
        if first_watch.swap(false, Ordering::SeqCst) {
            std::thread::sleep(add_after);
            chunk(
                &mut out,
                json!({"type": "ADDED", "object": fixture("pod-orders-db")}),
            );
            std::thread::sleep(delete_after.saturating_sub(add_after));
            chunk(
                &mut out,
                json!({"type": "DELETED", "object": fixture("pod-checkout")}),
            );
        }
        // Hold the watch open, as the API server does until its timeout.
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
}

fn kubeconfig(dir: &Path, api: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: replay\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: replay\n  context:\n    cluster: replay\n    user: replay\n\
             current-context: replay\nusers:\n- name: replay\n  user: {{}}\n"
        ),
    )
    .unwrap();
    path
}

/// A python http.server inside `cg`.
fn http_server(cg: &TestCgroup) -> Server {
    loupe_tests::python_http_server(cg)
}

fn get(addr: std::net::SocketAddr) {
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
        let _ = s.read_to_end(&mut Vec::new());
    }
}

fn spans(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| l.ends_with('}'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Pod and container cgroups the way containerd names them: systemd driver for checkout,
/// cgroupfs driver for orders-db.
fn containers() -> (TestCgroup, TestCgroup) {
    let tag = std::process::id();
    let checkout = TestCgroup::at(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CHECKOUT_ID}.scope",
        CHECKOUT_UID.replace('-', "_")
    ));
    let orders = TestCgroup::at(&format!(
        "loupe-kubepods-{tag}/besteffort/pod{ORDERS_UID}/{ORDERS_ID}"
    ));
    (checkout, orders)
}

#[test]
fn spans_carry_the_metadata_of_their_pod() {
    if !privileged() {
        return;
    }
    let api = ReplayApi::start(Duration::from_secs(2), Duration::from_secs(4));
    let dir = std::env::temp_dir().join(format!("loupe-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = kubeconfig(&dir, &api.addr);
    let out = dir.join("spans.jsonl");
    let (checkout_cg, orders_cg) = containers();
    let checkout = http_server(&checkout_cg);
    let orders = http_server(&orders_cg);

    let metrics = format!("127.0.0.1:{}", free_port());
    let out_s = out.display().to_string();
    let agent = Agent::spawn(
        &[
            "run",
            "--cgroup",
            &checkout_cg.dir,
            "--cgroup",
            &orders_cg.dir,
            "--output",
            &out_s,
            "--metrics-addr",
            &metrics,
        ],
        &[
            ("LOUPE_KUBERNETES", "on"),
            ("KUBECONFIG", config.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    );
    let started = Instant::now();

    // Requests throughout: orders-db is unknown until the watch adds it (2 s in).
    let pod_of = |s: &Value| s["resource"]["k8s.pod.name"].as_str().map(str::to_string);
    let mut orders_named_after = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        get(checkout.addr);
        get(orders.addr);
        std::thread::sleep(Duration::from_millis(250));
        let all = spans(&out);
        if orders_named_after.is_none()
            && all
                .iter()
                .any(|s| pod_of(s).as_deref() == Some("orders-db-0"))
        {
            orders_named_after = Some(started.elapsed());
        }
        let checkout_named = all
            .iter()
            .any(|s| pod_of(s).as_deref() == Some("checkout-7d4b9c8f6d-x2kq9"));
        if checkout_named && orders_named_after.is_some() {
            break;
        }
    }
    // The DELETED event (4 s in) leaves one live pod.
    let mut live = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        live = metric(&loupe_tests::scrape(&metrics), "loupe_k8s_pods ");
        if live == Some(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = agent.stop_raw();
    let all = spans(&out);
    let _ = std::fs::remove_dir_all(&dir);

    let resource_of = |pod: &str| {
        all.iter()
            .find(|s| pod_of(s).as_deref() == Some(pod))
            .map(|s| s["resource"].clone())
            .unwrap_or_else(|| panic!("no span of pod {pod}: {all:#?}"))
    };
    let r = resource_of("checkout-7d4b9c8f6d-x2kq9");
    assert_eq!(r["k8s.namespace.name"], "shop");
    assert_eq!(r["k8s.pod.uid"], CHECKOUT_UID);
    assert_eq!(r["k8s.node.name"], "node-a");
    assert_eq!(r["k8s.deployment.name"], "checkout");
    assert_eq!(r["k8s.container.name"], "app");
    assert_eq!(r["container.id"], CHECKOUT_ID);
    assert_eq!(
        r["service.name"], "checkout-api",
        "the container's OTEL_SERVICE_NAME"
    );

    let r = resource_of("orders-db-0");
    assert_eq!(r["k8s.statefulset.name"], "orders-db");
    assert_eq!(r["k8s.container.name"], "server");
    assert_eq!(r["container.id"], ORDERS_ID);
    assert_eq!(r["service.name"], "orders-db", "the owner's name");
    let after = orders_named_after.expect("orders-db named");
    eprintln!("orders-db spans named {after:?} after the agent started (the watch adds it at 2 s)");
    assert!(after < Duration::from_secs(12), "{after:?}");

    assert_eq!(live, Some(1), "the deleted pod no longer counts");
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "only this node's pods are listed and watched: {requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("watch=true")),
        "{requests:#?}"
    );
}

#[test]
fn outside_kubernetes_the_api_is_never_called() {
    if !privileged() {
        return;
    }
    let api = ReplayApi::start(Duration::ZERO, Duration::ZERO);
    let dir = std::env::temp_dir().join(format!("loupe-nok8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = kubeconfig(&dir, &api.addr);
    let out = dir.join("spans.jsonl");
    let cg = TestCgroup::new("nok8s");
    let server = http_server(&cg);
    let out_s = out.display().to_string();
    // A kubeconfig is present, but the agent is not in a pod: auto stays off.
    let agent = Agent::spawn(
        &["run", "--cgroup", &cg.dir, "--output", &out_s],
        &[
            ("KUBECONFIG", config.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && spans(&out).is_empty() {
        get(server.addr);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = agent.stop_raw();
    let all = spans(&out);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!all.is_empty(), "spans flow without Kubernetes");
    assert!(
        all.iter().all(|s| s["resource"]["k8s.pod.name"].is_null()),
        "{all:#?}"
    );
    assert_eq!(all[0]["resource"]["service.name"], "http.server");
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}
