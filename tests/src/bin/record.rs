//! `cargo xtask record`: records parser fixtures from the real servers. Each scenario of
//! tests/apps/record_clients.py runs an everyday client library through a proxy in front of a
//! real PostgreSQL, MariaDB or Redis; every connection's bytes, in the order and chunks they
//! were read, are written to `agent/src/protocol/<protocol>/testdata/<scenario>[-<n>].bin`.
//! `grpc-h2load` records the bench's gRPC workload (h2load's unary calls to the grpcio server of
//! tests/apps/grpc_service.py) for the criterion pipeline benchmark; it needs h2load
//! (`nghttp2-client`, which `cargo xtask bench` installs).
//!
//! File format (read by agent/src/protocol/fixture.rs): records of one byte direction (`C`
//! client to server, `S` server to client), a little-endian u32 length, the bytes.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use loupe_tests::{
    TestCgroup,
    databases::{self, mariadb_sql, psql},
    tests_dir, venv_bin,
};

type Records = Arc<Mutex<Vec<(u8, Vec<u8>)>>>;

struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Records>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn relay(mut from: TcpStream, mut to: TcpStream, dir: u8, records: Records) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                records.lock().unwrap().push((dir, buf[..n].to_vec()));
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Records>>> = Arc::default();
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            let mut relays = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                        let records: Records = Arc::default();
                        conns2.lock().unwrap().push(records.clone());
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let r2 = records.clone();
                        relays.push(std::thread::spawn(move || {
                            relay(client, server, b'C', records)
                        }));
                        relays.push(std::thread::spawn(move || relay(s2, c2, b'S', r2)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for r in relays {
                let _ = r.join();
            }
        });
        Proxy {
            port,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Vec<(u8, Vec<u8>)>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let conns = self.conns.lock().unwrap();
        conns.iter().map(|r| r.lock().unwrap().clone()).collect()
    }
}

fn write_fixture(path: &Path, records: &[(u8, Vec<u8>)]) {
    let mut out = Vec::new();
    for (dir, bytes) in records {
        out.push(*dir);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, out).unwrap();
    eprintln!("record: {} ({} records)", path.display(), records.len());
}

fn main() {
    let only = std::env::args().nth(1);
    let root: PathBuf = tests_dir().parent().unwrap().join("agent/src/protocol");
    let cg = TestCgroup::new("record");
    let pg = databases::postgres(&cg);
    let my = databases::mariadb(&cg);
    let redis = databases::redis(&cg);
    psql(&pg, "postgres", "CREATE DATABASE shop").unwrap();
    psql(
        &pg,
        "shop",
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text); \
         INSERT INTO items SELECT g, 'item' || g, g, 'n' FROM generate_series(1, 200) g",
    )
    .unwrap();
    mariadb_sql(
        &my,
        "CREATE DATABASE shop; CREATE TABLE shop.items (id int PRIMARY KEY, name text, qty int, \
         note text); INSERT INTO shop.items VALUES (1, 'a', 1, 'n'), (2, 'b', 2, 'n')",
    )
    .unwrap();
    let web_dir = databases::TempDir::new("record-nginx");
    let web = loupe_tests::nginx(&cg, &web_dir.0);
    let scenarios = [
        ("http1", "http1-keepalive", web.addr.port()),
        ("postgres", "pg-simple", pg.port()),
        ("postgres", "pg-extended", pg.port()),
        ("mysql", "mysql-text", my.port()),
        ("mysql", "mysql-prepared", my.port()),
        ("redis", "redis-resp2", redis.port()),
        ("redis", "redis-pubsub", redis.port()),
        ("redis", "redis-resp3", redis.port()),
    ];
    let script = tests_dir().join("apps/record_clients.py");
    for (proto, name, port) in scenarios {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let proxy = Proxy::start(port);
        let status = std::process::Command::new(venv_bin("python"))
            .arg(&script)
            .arg(name)
            .arg(proxy.port.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "scenario {name} failed");
        std::thread::sleep(Duration::from_millis(300));
        let conns = proxy.finish();
        let dir = root.join(proto).join("testdata");
        for (i, records) in conns.iter().enumerate() {
            let file = if conns.len() == 1 {
                format!("{name}.bin")
            } else {
                format!("{name}-{i}.bin")
            };
            write_fixture(&dir.join(file), records);
        }
    }
    if only.as_deref().is_none_or(|o| "grpc-h2load".contains(o)) {
        record_grpc(&cg, &root);
    }
}

/// One h2load connection of ten concurrent unary calls at a time to the grpcio server, as the
/// bench loads it: h2load's own header encoding (a Huffman `:path` it does not index) and the
/// server's (its trailers), which hand-written blocks would not have.
fn record_grpc(cg: &TestCgroup, root: &Path) {
    if std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("record: grpc-h2load needs h2load (apt-get install nghttp2-client); skipped");
        return;
    }
    let port = loupe_tests::free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let cmd = cg.command(
        &venv_bin("python"),
        &[
            tests_dir().join("apps/grpc_service.py").to_str().unwrap(),
            &port.to_string(),
            "http://127.0.0.1:9",
        ],
    );
    let _server = loupe_tests::Server::start(cmd, addr);
    let dir = databases::TempDir::new("record-grpc");
    let body = dir.0.join("ping.grpc");
    std::fs::write(&body, b"\0\0\0\0\x04ping").unwrap();
    let proxy = Proxy::start(port);
    let out = std::process::Command::new("h2load")
        .args(["-n", "200", "-c", "1", "-m", "10"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body)
        .arg(format!(
            "http://127.0.0.1:{}/shop.v1.Orders/Ping",
            proxy.port
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("200 succeeded"),
        "h2load's calls did not all succeed: {text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let conns = proxy.finish();
    assert_eq!(conns.len(), 1, "one h2load connection");
    write_fixture(&root.join("http2/testdata/grpc-h2load.bin"), &conns[0]);
}
