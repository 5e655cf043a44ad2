//! Privileged end-to-end: an uninstrumented Flask service (a thread per request) calls
//! PostgreSQL (psycopg2, simple protocol; psycopg 3, extended protocol with prepared statements),
//! MariaDB (PyMySQL) and Redis (redis-py, pipelined) through connection pools opened and used
//! before the agent starts; psql, the mariadb client and redis-cli call the same servers on fresh
//! connections. Every call must be one CLIENT span of the calling process, parented by the
//! request's SERVER span, with the database conventions' attributes, errors marked, and no
//! literal, value or key of the traffic in any byte exported.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use loupe_tests::{
    Agent, Server, TestCgroup,
    databases::{self, Database, mariadb_sql, psql},
    free_port,
    otlp::{ReceivedSpan, Receiver},
    privileged, tests_dir, venv_bin,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const ERROR: i32 = 2;
const ORDERS: usize = 100;
const FAILS: usize = 10;
/// Per /order request: two PostgreSQL, one MariaDB, SET, GET and a two-command pipeline
/// (redis-py sends INCR as INCRBY).
const DB_CALLS_PER_ORDER: usize = 7;

fn schema(pg: &Database, my: &Database) {
    psql(pg, "postgres", "CREATE DATABASE shop").unwrap();
    psql(
        pg,
        "shop",
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text); \
         INSERT INTO items SELECT g, 'item' || g, g, 'n' FROM generate_series(1, 200) g",
    )
    .unwrap();
    mariadb_sql(
        my,
        "CREATE DATABASE shop; CREATE TABLE shop.items (id int PRIMARY KEY, name text, qty int, \
         note text); INSERT INTO shop.items VALUES (1, 'a', 1, 'n'), (2, 'b', 2, 'n')",
    )
    .unwrap();
}

fn service(cg: &TestCgroup, pg: &Database, my: &Database, redis: &Database) -> Server {
    let port = free_port();
    let script = tests_dir().join("apps/db_service.py");
    let cmd = cg.command(
        &venv_bin("python"),
        &[
            script.to_str().unwrap(),
            &port.to_string(),
            &pg.port().to_string(),
            &my.port().to_string(),
            &redis.port().to_string(),
        ],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    Server::start(cmd, addr)
}

fn drive(cg: &TestCgroup, base: &str, paths: &[String]) {
    let script = tests_dir().join("apps/drive.py");
    let mut child = cg
        .command(&venv_bin("python"), &[script.to_str().unwrap(), base])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(paths.join("\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "the driver failed");
}

fn pid_of(s: &ReceivedSpan) -> u32 {
    s.resource
        .get("process.pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

#[test]
fn database_calls_are_client_spans_inside_the_request_trace() {
    if !privileged() {
        return;
    }
    assert!(
        databases::installed(),
        "PostgreSQL 15, MariaDB and Redis must be installed: run tests/setup.sh"
    );
    let cg = TestCgroup::new("db");
    let pg = databases::postgres(&cg);
    let my = databases::mariadb(&cg);
    let redis = databases::redis(&cg);
    schema(&pg, &my);
    // The service opens its pools and uses every connection before the agent starts.
    let svc = service(&cg, &pg, &my, &redis);
    let svc_pid = svc.child.id();

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

    let base = format!("http://{}", svc.addr);
    let mut paths: Vec<String> = (1..=ORDERS).map(|i| format!("/order/{i}")).collect();
    paths.extend((1..=FAILS).map(|i| format!("/fail/{i}")));
    drive(&cg, &base, &paths);
    // Clients that are not Python, on fresh connections (their startup and greeting are seen).
    cg.run(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "shop",
            "-qAt",
            "-c",
            "SELECT name FROM items WHERE id = 7 AND note <> 'psql-secret'",
        ],
    );
    cg.run(
        "mariadb",
        &[
            "-h",
            "127.0.0.1",
            "-P",
            &my.port().to_string(),
            "-u",
            "root",
            "shop",
            "-e",
            "SELECT name FROM items WHERE note <> 'cli-secret'",
        ],
    );
    cg.run(
        "redis-cli",
        &[
            "-p",
            &redis.port().to_string(),
            "SET",
            "cli:tok-key",
            "redis-secret-cli",
        ],
    );

    let expected = ORDERS * (1 + DB_CALLS_PER_ORDER);
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .any(|s| s.name == "SET" && s.service() == "redis-cli")
            && s.iter().filter(|s| pid_of(s) == svc_pid).count() >= expected
    });
    let (_, log) = agent.stop_raw();

    // Nothing secret in any byte exported.
    let raw = receiver.raw();
    for secret in [
        "sekrit",
        "redis-secret",
        "tok-",
        "psql-secret",
        "cli-secret",
    ] {
        assert!(
            !loupe_tests::contains(&raw, secret.as_bytes()),
            "{secret:?} was exported"
        );
    }

    let svc_spans: Vec<&ReceivedSpan> = spans.iter().filter(|s| pid_of(s) == svc_pid).collect();
    let servers: HashMap<&str, &ReceivedSpan> = svc_spans
        .iter()
        .filter(|s| s.kind == SERVER)
        .map(|s| (s.span_id.as_str(), *s))
        .collect();
    let db_calls: Vec<&&ReceivedSpan> = svc_spans
        .iter()
        .filter(|s| s.attr("db.system.name").is_some())
        .collect();
    assert!(
        db_calls.iter().all(|s| s.kind == CLIENT),
        "database calls are CLIENT spans"
    );
    let parented = db_calls
        .iter()
        .filter(|s| {
            servers
                .get(s.parent_span_id.as_str())
                .is_some_and(|p| p.trace_id == s.trace_id)
        })
        .count();
    let want = ORDERS * DB_CALLS_PER_ORDER + FAILS * 4;
    eprintln!(
        "database CLIENT spans: {} (want {want}), parented by their request: {parented}",
        db_calls.len()
    );
    assert!(
        db_calls.len() >= want * 99 / 100,
        "missing database spans: {} of {want}\n{log}",
        db_calls.len()
    );
    assert!(
        parented * 100 >= db_calls.len() * 99,
        "only {parented} of {} database spans have their request's SERVER span as parent",
        db_calls.len()
    );

    // Each /order request: its SERVER span's children, by what they are.
    let mut complete = 0;
    for server in servers.values().filter(|s| s.name == "GET /order/{id}") {
        let kids: Vec<&&&ReceivedSpan> = db_calls
            .iter()
            .filter(|c| c.parent_span_id == server.span_id)
            .collect();
        let count = |system: &str, op: &str| {
            kids.iter()
                .filter(|c| {
                    c.attr("db.system.name")
                        .is_some_and(|s| s == system || (system == "mysql" && s == "mariadb"))
                        && c.attr("db.operation.name") == Some(op)
                })
                .count()
        };
        if complete == 0 && std::env::var_os("LOUPE_TEST_DEBUG").is_some() {
            for k in &kids {
                eprintln!("{} {} {:?}", server.name, k.name, k.attributes);
            }
        }
        if count("postgresql", "SELECT") == 2
            && count("mysql", "SELECT") == 1
            && ["SET", "GET", "INCRBY", "EXPIRE"]
                .iter()
                .all(|op| count("redis", op) == 1)
        {
            complete += 1;
        }
    }
    assert!(
        complete * 100 >= ORDERS * 99,
        "only {complete} of {ORDERS} requests have all their database calls as children"
    );

    // Attributes: sanitized text (client-side interpolation and server-side $n), names.
    let texts: Vec<&str> = db_calls
        .iter()
        .filter_map(|s| s.attr("db.query.text"))
        .collect();
    assert!(texts.contains(&"SELECT name, qty FROM items WHERE id = ? AND note <> ?"));
    assert!(texts.contains(&"SELECT qty FROM items WHERE id = $1 AND note <> $2"));
    assert!(texts.contains(&"SELECT name FROM items WHERE id = ? AND note <> ?"));
    let pg_select = db_calls
        .iter()
        .find(|s| s.attr("db.system.name") == Some("postgresql"))
        .unwrap();
    assert_eq!(pg_select.name, "SELECT items");
    assert_eq!(pg_select.attr("db.collection.name"), Some("items"));
    assert_eq!(pg_select.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(
        pg_select.attr("server.port"),
        Some(pg.port().to_string().as_str())
    );
    let redis_get = db_calls.iter().find(|s| s.name == "GET").unwrap();
    assert_eq!(redis_get.attr("db.system.name"), Some("redis"));
    assert_eq!(redis_get.attr("db.query.text"), None, "no Redis arguments");

    // Errors: SQLSTATE, MariaDB error number, Redis error prefix.
    let error_with = |code: &str| {
        db_calls.iter().any(|s| {
            s.status_code == ERROR
                && s.attr("db.response.status_code") == Some(code)
                && s.attr("error.type") == Some(code)
        })
    };
    assert!(error_with("42P01"), "PostgreSQL undefined_table");
    assert!(error_with("1146"), "MariaDB ER_NO_SUCH_TABLE");
    assert!(error_with("WRONGTYPE"), "Redis WRONGTYPE");

    // Fresh connections from other clients: startup and greeting seen.
    let by = |service: &str| {
        spans
            .iter()
            .find(|s| s.service() == service && s.attr("db.system.name").is_some())
            .unwrap_or_else(|| panic!("no span from {service}"))
    };
    let psql_span = by("psql");
    assert_eq!(psql_span.kind, CLIENT);
    assert_eq!(psql_span.attr("db.namespace"), Some("shop"));
    assert_eq!(
        psql_span.attr("db.query.text"),
        Some("SELECT name FROM items WHERE id = ? AND note <> ?")
    );
    let cli = spans
        .iter()
        .find(|s| s.attr("db.query.text") == Some("SELECT name FROM items WHERE note <> ?"))
        .expect("a span from the mariadb client");
    assert_eq!(cli.attr("db.system.name"), Some("mariadb"));
    assert_eq!(cli.attr("db.namespace"), Some("shop"));
    assert_eq!(by("redis-cli").name, "SET");

    // The databases' own side makes no span by default.
    assert!(
        spans
            .iter()
            .all(|s| !(s.kind == SERVER && s.attr("db.system.name").is_some())),
        "database SERVER spans are off by default"
    );
}
