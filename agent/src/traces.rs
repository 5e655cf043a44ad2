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
        exchange::{Exchange, Session},
        span::{IdSource, RandomIds, Redaction, SpanKind, SpanRecord, build},
    },
};

#[derive(Debug, Default)]
pub struct TraceStats {
    pub exchanges: AtomicU64,
    pub malformed: AtomicU64,
    pub orphan_responses: AtomicU64,
    /// Exchanges given up for lack of a response.
    pub timeouts: AtomicU64,
    /// Connections whose side (client/server) could not be told: not traced.
    pub unknown_role: AtomicU64,
}

pub struct TraceSink {
    sessions: HashMap<ConnKey, (Session, ConnInfo)>,
    clock: WallClock,
    redaction: Redaction,
    ids: Box<dyn IdSource + Send>,
    out: mpsc::Sender<SpanRecord>,
    export_stats: Arc<ExportStats>,
    pub stats: Arc<TraceStats>,
    response_timeout_ns: u64,
    processes: crate::process::SharedProcesses,
}

impl TraceSink {
    pub fn new(
        out: mpsc::Sender<SpanRecord>,
        export_stats: Arc<ExportStats>,
        redaction: Redaction,
        response_timeout_ns: u64,
        processes: crate::process::SharedProcesses,
    ) -> Self {
        Self {
            sessions: HashMap::new(),
            clock: WallClock::new(),
            redaction,
            ids: Box::new(RandomIds),
            out,
            export_stats,
            stats: Arc::new(TraceStats::default()),
            response_timeout_ns,
            processes,
        }
    }

    fn emit(&mut self, done: Vec<Exchange>, conn: &ConnInfo) {
        let kind = match conn.role {
            Role::Server => SpanKind::Server,
            _ => SpanKind::Client,
        };
        for ex in done {
            self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
            let span = build(
                &ex,
                conn,
                kind,
                &self.clock,
                &self.redaction,
                self.ids.as_mut(),
            );
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
        self.stats.orphan_responses.fetch_add(
            after.orphan_responses - before.orphan_responses,
            Ordering::Relaxed,
        );
    }
}

impl Sink for TraceSink {
    fn data(&mut self, conn: &ConnInfo, ev: &DataEvent, dir: Direction, segments: Vec<Segment>) {
        if conn.protocol != PROTO_HTTP1 {
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
        let (session, _) = self
            .sessions
            .entry(conn.key)
            .or_insert_with(|| (Session::new(conn.midstream), conn.clone()));
        let before = session.stats;
        let done = if dir == requests_dir {
            session.on_requests(ev.ts_ns, segments);
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

    fn tick(&mut self, now_ns: u64) {
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
