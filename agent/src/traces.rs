//! The span-producing sink: per connection an HTTP/1 session pairs requests with responses;
//! each exchange becomes a span of the process that handled it, handed to the export queue.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::conn::PROTO_HTTP1;
use tokio::sync::mpsc;

use crate::{
    clock::{self, WallClock},
    conn::{ConnInfo, Segment},
    decode::{CloseEvent, ConnKey, DataEvent, Direction, Role},
    export::{ExportStats, offer},
    pipeline::Sink,
    trace::{
        causality::Linker,
        exchange::{Exchange, Session},
        span::{RandomIds, Redaction, SpanKind, SpanRecord, build},
    },
};

#[derive(Debug, Default)]
pub struct TraceStats {
    pub exchanges: AtomicU64,
    /// Requests dropped because too many were waiting on one connection.
    pub pending_overflow: AtomicU64,
    pub malformed: AtomicU64,
    pub orphan_responses: AtomicU64,
    /// Exchanges given up for lack of a response.
    pub timeouts: AtomicU64,
    /// Connections whose side (client/server) could not be told: not traced.
    pub unknown_role: AtomicU64,
}

pub struct TraceSink {
    sessions: HashMap<ConnKey, (Session, ConnInfo)>,
    /// `--tcp-context`: the kernel span id a client connection's last request took. Requests
    /// pipelined before any answer share the kernel's ids; only the first may use them.
    kernel_spans: HashMap<ConnKey, [u8; 8]>,
    clock: WallClock,
    redaction: Redaction,
    pub linker: Linker,
    out: mpsc::Sender<SpanRecord>,
    export_stats: Arc<ExportStats>,
    pub stats: Arc<TraceStats>,
    response_timeout_ns: u64,
    processes: crate::process::SharedProcesses,
    /// The OTLP endpoint's addresses: exports to a collector on this node are HTTP requests too,
    /// and tracing them would export a span per export, forever.
    exclude: Vec<std::net::SocketAddr>,
    excluded: std::collections::HashSet<ConnKey>,
}

/// Whether a connection is the agent's own export path (seen from the collector's side).
pub fn is_excluded(exclude: &[std::net::SocketAddr], conn: &ConnInfo) -> bool {
    exclude.iter().any(|a| {
        let matches = |s: std::net::SocketAddr| {
            s.port() == a.port() && (s.ip() == a.ip() || a.ip().is_unspecified())
        };
        matches(conn.local) || matches(conn.remote)
    })
}

impl TraceSink {
    /// Excludes connections to or from these addresses (the OTLP endpoint).
    pub fn exclude(&mut self, addrs: Vec<std::net::SocketAddr>) {
        self.exclude = addrs;
    }

    pub fn new(
        out: mpsc::Sender<SpanRecord>,
        export_stats: Arc<ExportStats>,
        redaction: Redaction,
        response_timeout_ns: u64,
        processes: crate::process::SharedProcesses,
    ) -> Self {
        Self {
            sessions: HashMap::new(),
            kernel_spans: HashMap::new(),
            clock: WallClock::new(),
            redaction,
            linker: Linker::new(Box::new(RandomIds)),
            out,
            export_stats,
            stats: Arc::new(TraceStats::default()),
            response_timeout_ns,
            processes,
            exclude: Vec::new(),
            excluded: std::collections::HashSet::new(),
        }
    }

    fn emit(&mut self, done: Vec<Exchange>, conn: &ConnInfo) {
        let kind = match conn.role {
            Role::Server => SpanKind::Server,
            _ => SpanKind::Client,
        };
        for mut ex in done {
            self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
            self.linker.finalize(&mut ex.identity);
            if kind == SpanKind::Server {
                self.linker
                    .server_end(conn.pid, ex.started.tid, ex.identity.span_id);
            }
            let span = build(&ex, conn, kind, &self.clock, &self.redaction);
            offer(&self.out, &self.export_stats, span);
        }
    }

    fn account(
        &self,
        before: crate::trace::exchange::SessionStats,
        after: crate::trace::exchange::SessionStats,
    ) {
        self.stats
            .malformed
            .fetch_add(after.malformed - before.malformed, Ordering::Relaxed);
        self.stats
            .pending_overflow
            .fetch_add(after.overflow - before.overflow, Ordering::Relaxed);
        self.stats.orphan_responses.fetch_add(
            after.orphan_responses - before.orphan_responses,
            Ordering::Relaxed,
        );
    }
}

impl Sink for TraceSink {
    fn data(&mut self, conn: &ConnInfo, ev: &DataEvent, dir: Direction, segments: Vec<Segment>) {
        if conn.protocol != PROTO_HTTP1 || self.excluded.contains(&conn.key) {
            return;
        }
        if !self.exclude.is_empty()
            && !self.sessions.contains_key(&conn.key)
            && is_excluded(&self.exclude, conn)
        {
            self.excluded.insert(conn.key);
            return;
        }
        // Requests arrive on the server side and leave from the client side.
        let requests_dir = match conn.role {
            Role::Server => Direction::Recv,
            Role::Client => Direction::Send,
            Role::Unknown => {
                if !self.sessions.contains_key(&conn.key) {
                    self.stats.unknown_role.fetch_add(1, Ordering::Relaxed);
                    self.sessions
                        .insert(conn.key, (Session::new(true), conn.clone()));
                }
                return;
            }
        };
        if !self.sessions.contains_key(&conn.key) {
            // Look the process up now: a short-lived client may be gone by export time.
            if let Ok(mut p) = self.processes.lock() {
                p.get(conn.pid, &conn.comm);
            }
        }
        let Self {
            sessions,
            linker,
            kernel_spans,
            ..
        } = self;
        let (session, _) = sessions
            .entry(conn.key)
            .or_insert_with(|| (Session::new(conn.midstream), conn.clone()));
        let before = session.stats;
        let done = if dir == requests_dir {
            let server = conn.role == Role::Server;
            let kernel = ev.context;
            let mut assign = |head: &crate::protocol::http1::Head, st| {
                if server {
                    linker.server_start(conn, head, st, kernel)
                } else {
                    let fresh = kernel.filter(|k| kernel_spans.get(&conn.key) != Some(&k.span_id));
                    if let Some(k) = fresh {
                        kernel_spans.insert(conn.key, k.span_id);
                    }
                    linker.client_start(conn, head, st, fresh)
                }
            };
            session.on_requests(ev.ts_ns, ev.tid, &mut assign, segments);
            Vec::new()
        } else {
            session.on_responses(ev.ts_ns, segments)
        };
        let after = session.stats;
        self.account(before, after);
        if !done.is_empty() {
            self.emit(done, conn);
        }
    }

    fn closed(&mut self, conn: &ConnInfo, ev: Option<&CloseEvent>) {
        self.excluded.remove(&conn.key);
        self.kernel_spans.remove(&conn.key);
        let Some((mut session, info)) = self.sessions.remove(&conn.key) else {
            return;
        };
        if info.role == Role::Unknown {
            return;
        }
        let ts = ev.map(|e| e.ts_ns).unwrap_or_else(clock::monotonic_ns);
        let done = session.close(ts);
        self.emit(done, &info);
    }

    fn fork(&mut self, ev: &crate::decode::ForkEvent) {
        self.linker
            .thread_created(ev.pid, ev.parent_tid, ev.child_tid, ev.ts_ns);
    }

    fn tick(&mut self, now_ns: u64) {
        self.linker.expire(now_ns);
        let timeout = self.response_timeout_ns;
        let mut expired = Vec::new();
        for (session, info) in self.sessions.values_mut() {
            let done = session.expire(now_ns, timeout);
            if !done.is_empty() {
                expired.push((done, info.clone()));
            }
        }
        for (done, info) in expired {
            self.stats
                .timeouts
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            self.emit(done, &info);
        }
    }

    fn flush(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_path_is_excluded_from_both_sides() {
        let conn = |local: &str, remote: &str| ConnInfo {
            key: ConnKey {
                sk: 1,
                generation: 1,
            },
            pid: 1,
            comm: "c".into(),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            role: Role::Server,
            protocol: PROTO_HTTP1,
            midstream: false,
        };
        let ex = vec!["127.0.0.1:4318".parse().unwrap()];
        assert!(is_excluded(&ex, &conn("127.0.0.1:4318", "127.0.0.1:50000")));
        assert!(is_excluded(&ex, &conn("127.0.0.1:50000", "127.0.0.1:4318")));
        assert!(!is_excluded(
            &ex,
            &conn("127.0.0.1:8080", "127.0.0.1:50000")
        ));
        let any = vec!["0.0.0.0:4318".parse().unwrap()];
        assert!(is_excluded(&any, &conn("10.0.0.5:4318", "10.0.0.9:50000")));
    }
}
