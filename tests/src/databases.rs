//! Real database servers for the end-to-end tests, each in its own temporary directory on a free
//! loopback port, started inside the test's cgroup (Debian's PostgreSQL 15, MariaDB and Redis 7,
//! installed by tests/setup.sh).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Server, TestCgroup, free_port};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("loupe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Database {
    pub server: Server,
    pub dir: TempDir,
}

impl Database {
    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }
}

/// PostgreSQL 15 (trust authentication; it refuses to run as root, so as `postgres`).
pub fn postgres(cg: &TestCgroup) -> Database {
    let dir = TempDir::new("pg");
    run(Command::new("chown").arg("postgres").arg(&dir.0));
    let data = dir.0.join("data");
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args([
            &format!("{PG_BIN}/initdb"),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]));
    let port = free_port();
    let cmd = cg.command(
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            &format!("{PG_BIN}/postgres"),
            "-D",
            data.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-k",
            dir.0.to_str().unwrap(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
    );
    let server = Server::start(cmd, addr(port));
    let db = Database { server, dir };
    wait_for(|| psql(&db, "postgres", "SELECT 1").is_ok());
    db
}

fn wait_for(mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the database did not answer");
}

/// Runs SQL through `psql` (outside any test cgroup).
pub fn psql(db: &Database, dbname: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &db.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", dbname, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// MariaDB without grant tables (any user, no password): the tests exercise the protocol, not
/// accounts.
pub fn mariadb(cg: &TestCgroup) -> Database {
    let dir = TempDir::new("mariadb");
    let data = dir.0.join("data");
    run(Command::new("mariadb-install-db").args([
        "--no-defaults",
        &format!("--datadir={}", data.display()),
        "--user=root",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
    ]));
    let port = free_port();
    let cmd = cg.command(
        "mariadbd",
        &[
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            &format!("--port={port}"),
            "--bind-address=127.0.0.1",
            &format!("--socket={}", dir.0.join("sock").display()),
            "--skip-grant-tables",
            "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=0",
        ],
    );
    let server = Server::start(cmd, addr(port));
    let db = Database { server, dir };
    wait_for(|| mariadb_sql(&db, "SELECT 1").is_ok());
    db
}

/// Runs SQL through the `mariadb` client (outside any test cgroup).
pub fn mariadb_sql(db: &Database, sql: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &db.port().to_string(),
            "-u",
            "root",
        ])
        .args(["-N", "-B", "-e", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Redis 7, no persistence.
pub fn redis(cg: &TestCgroup) -> Database {
    let dir = TempDir::new("redis");
    let port = free_port();
    let cmd = cg.command(
        "redis-server",
        &[
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.0.to_str().unwrap(),
        ],
    );
    let server = Server::start(cmd, addr(port));
    Database { server, dir }
}

/// Whether the servers the database tests need are installed.
pub fn installed() -> bool {
    Path::new(&format!("{PG_BIN}/postgres")).exists()
        && Path::new("/usr/sbin/mariadbd").exists()
        && Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok()
}
