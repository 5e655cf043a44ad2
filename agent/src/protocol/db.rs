//! What the database protocols (PostgreSQL, MySQL, Redis) have in common: the request and answer
//! a span needs, first-in first-out pairing per connection, and the span itself with the
//! database semantic conventions (semconv v1.37+: `db.system.name`, `db.namespace`,
//! `db.operation.name`, `db.collection.name`, `db.query.text`, `db.response.status_code`).
//!
//! Every parser here answers each request it emits with exactly one `Response`, in order (a
//! statement skipped after an error in the same pipeline answers `not_executed`), so pairing is
//! a queue. Pushes and notices are `Unsolicited`: counted, never paired.

use std::{borrow::Cow, collections::VecDeque, sync::Arc};

use crate::{
    clock::WallClock,
    conn::{ConnInfo, Segment},
    trace::{
        exchange::{Identity, Outcome, RequestStart},
        shared_text,
        span::{SpanKind, SpanRecord, Value, ip_str},
    },
};

use super::{mysql, postgres, redis, sql};

/// What a request keeps: an allowlist. Never bound values, never Redis arguments (the key only
/// behind a switch), SQL only sanitized.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbRequest {
    /// `db.operation.name`: `SELECT`, `EXECUTE`, `GET`.
    pub operation: Option<Arc<str>>,
    pub collection: Option<Arc<str>>,
    pub text: Option<Arc<str>>,
    pub text_truncated: bool,
    /// A prepared statement whose text the agent never saw (prepared before it started).
    pub text_unknown: bool,
    /// Commands in a Redis pipeline/transaction batch are separate requests; this is the
    /// statement count of a multi-statement simple query (PostgreSQL).
    pub namespace: Option<Arc<str>>,
}

impl DbRequest {
    /// A SQL request for a sanitized statement (None: its text was never seen).
    pub fn of(st: Option<&sql::Statement>, namespace: Option<Arc<str>>) -> Self {
        Self {
            operation: st.and_then(|s| s.operation.clone()),
            collection: st.and_then(|s| s.collection.clone()),
            text: st.and_then(|s| s.text.clone()),
            text_truncated: st.is_some_and(|s| s.truncated),
            text_unknown: false,
            namespace,
        }
    }
}

/// Appends to a per-connection queue of what answers must come, dropping the oldest beyond
/// `cap` (a peer that never answers cannot grow it).
pub fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if queue.len() >= cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbResponse {
    /// SQLSTATE (PostgreSQL), error number (MySQL), error prefix (Redis `ERR`, `WRONGTYPE`).
    pub error_code: Option<Arc<str>>,
    /// The request was never run: an earlier statement in its pipeline failed.
    pub not_executed: bool,
}

#[derive(Debug)]
pub enum Message {
    Request(DbRequest),
    Response(DbResponse),
    /// Pub/sub messages, invalidations, notices, async notifications.
    Unsolicited,
    /// A stretch of the stream that did not parse: skipped until the framing resynchronises.
    Malformed,
}

/// Settings from the configuration file (`databases:`).
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// Cap on `db.query.text`, in bytes.
    pub max_query_text: usize,
    /// Export the Redis key in `db.query.text` (`GET key`); never the values.
    pub redis_keys: bool,
    /// SERVER spans on the database's side too (default: metrics only).
    pub server_spans: bool,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_query_text: 2048,
            redis_keys: false,
            server_spans: false,
        }
    }
}

/// One database connection's parser: an enum keeps dynamic dispatch off the hot path.
#[derive(Debug)]
pub enum Parser {
    Postgres(postgres::Parser),
    Mysql(mysql::Parser),
    Redis(redis::Parser),
}

impl Parser {
    pub fn new(protocol: u8, midstream: bool, opts: &DbOptions) -> Option<Self> {
        use agent_common::protocol::*;
        Some(match protocol {
            PROTO_POSTGRES => Parser::Postgres(postgres::Parser::new(midstream)),
            PROTO_MYSQL => Parser::Mysql(mysql::Parser::new(midstream)),
            PROTO_REDIS => Parser::Redis(redis::Parser::new(midstream, opts.redis_keys)),
            _ => return None,
        })
    }

    pub fn system(&self) -> &'static str {
        match self {
            Parser::Postgres(_) => "postgresql",
            Parser::Mysql(p) => p.system(),
            Parser::Redis(_) => "redis",
        }
    }

    pub fn requests(&mut self, seg: Segment, sql: &mut sql::Cache, out: &mut Vec<Message>) {
        match self {
            Parser::Postgres(p) => p.requests(seg, sql, out),
            Parser::Mysql(p) => p.requests(seg, sql, out),
            Parser::Redis(p) => p.requests(seg, out),
        }
    }

    pub fn responses(&mut self, seg: Segment, out: &mut Vec<Message>) {
        match self {
            Parser::Postgres(p) => p.responses(seg, out),
            Parser::Mysql(p) => p.responses(seg, out),
            Parser::Redis(p) => p.responses(seg, out),
        }
    }

    /// A request's bytes are buffered but not complete: the next segment continues it.
    pub fn mid_request(&self) -> bool {
        match self {
            Parser::Postgres(p) => p.mid_request(),
            Parser::Mysql(p) => p.mid_request(),
            Parser::Redis(p) => p.mid_request(),
        }
    }

    /// Bytes held between calls (bounded by each parser).
    pub fn buffered(&self) -> usize {
        match self {
            Parser::Postgres(p) => p.buffered(),
            Parser::Mysql(p) => p.buffered(),
            Parser::Redis(p) => p.buffered(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DbExchange {
    pub identity: Identity,
    pub started: RequestStart,
    pub request: DbRequest,
    pub response: Option<DbResponse>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub outcome: Outcome,
}

struct Pending {
    identity: Identity,
    started: RequestStart,
    request: DbRequest,
    start_ns: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DbSessionStats {
    pub overflow: u64,
    pub malformed: u64,
    pub orphan_responses: u64,
    pub unsolicited: u64,
    /// Requests never run because an earlier one in the same pipeline failed (no span).
    pub not_executed: u64,
}

/// Requests one connection may have waiting (Redis pipelines run deep): beyond, the oldest is
/// dropped and counted.
pub const MAX_WAITING: usize = 1024;

/// One database connection seen from one process: parser plus FIFO pairing.
pub struct Session {
    pub parser: Parser,
    pending: VecDeque<Pending>,
    requests_seen: u64,
    request_start_ns: u64,
    pub stats: DbSessionStats,
    scratch: Vec<Message>,
}

impl Session {
    pub fn new(parser: Parser) -> Self {
        Self {
            parser,
            pending: VecDeque::new(),
            requests_seen: 0,
            request_start_ns: 0,
            stats: DbSessionStats::default(),
            scratch: Vec::new(),
        }
    }

    pub fn on_requests(
        &mut self,
        ts_ns: u64,
        tid: u32,
        sql: &mut sql::Cache,
        assign: &mut dyn FnMut(&DbRequest, RequestStart) -> Identity,
        segments: impl IntoIterator<Item = Segment>,
    ) {
        let mut out = std::mem::take(&mut self.scratch);
        for seg in segments {
            if !self.parser.mid_request() {
                self.request_start_ns = ts_ns;
            }
            self.parser.requests(seg, sql, &mut out);
            for m in out.drain(..) {
                match m {
                    Message::Request(request) => {
                        let started = RequestStart {
                            tid,
                            ts_ns: self.request_start_ns,
                            ordinal: self.requests_seen,
                        };
                        self.requests_seen += 1;
                        let identity = assign(&request, started);
                        if self.pending.len() >= MAX_WAITING {
                            self.pending.pop_front();
                            self.stats.overflow += 1;
                        }
                        self.pending.push_back(Pending {
                            identity,
                            started,
                            request,
                            start_ns: self.request_start_ns,
                        });
                        // A pipelined request in the same segment starts with it.
                        self.request_start_ns = ts_ns;
                    }
                    Message::Malformed => self.stats.malformed += 1,
                    Message::Unsolicited => self.stats.unsolicited += 1,
                    Message::Response(_) => {}
                }
            }
        }
        self.scratch = out;
    }

    pub fn on_responses(
        &mut self,
        ts_ns: u64,
        segments: impl IntoIterator<Item = Segment>,
    ) -> Vec<DbExchange> {
        let mut done = Vec::new();
        let mut out = std::mem::take(&mut self.scratch);
        for seg in segments {
            self.parser.responses(seg, &mut out);
            for m in out.drain(..) {
                match m {
                    Message::Response(r) => match self.pending.pop_front() {
                        Some(_) if r.not_executed => self.stats.not_executed += 1,
                        Some(p) => done.push(DbExchange {
                            identity: p.identity,
                            started: p.started,
                            request: p.request,
                            response: Some(r),
                            start_ns: p.start_ns,
                            end_ns: ts_ns,
                            outcome: Outcome::Complete,
                        }),
                        None => self.stats.orphan_responses += 1,
                    },
                    Message::Unsolicited => self.stats.unsolicited += 1,
                    Message::Malformed => self.stats.malformed += 1,
                    Message::Request(_) => {}
                }
            }
        }
        self.scratch = out;
        done
    }

    fn give_up(p: Pending, end_ns: u64, outcome: Outcome) -> DbExchange {
        DbExchange {
            identity: p.identity,
            started: p.started,
            request: p.request,
            response: None,
            start_ns: p.start_ns,
            end_ns,
            outcome,
        }
    }

    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> Vec<DbExchange> {
        let mut out = Vec::new();
        while self
            .pending
            .front()
            .is_some_and(|p| now_ns.saturating_sub(p.start_ns) > timeout_ns)
        {
            let p = self.pending.pop_front().expect("checked");
            out.push(Self::give_up(p, now_ns, Outcome::Timeout));
        }
        out
    }

    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    pub fn close(&mut self, ts_ns: u64) -> Vec<DbExchange> {
        self.pending
            .drain(..)
            .map(|p| Self::give_up(p, ts_ns, Outcome::Closed))
            .collect()
    }
}

/// The span of a database exchange, on the `kind` side of `conn`.
pub fn build(
    ex: &DbExchange,
    conn: &ConnInfo,
    kind: SpanKind,
    system: &'static str,
    clock: &WallClock,
) -> SpanRecord {
    let r = &ex.request;
    let mut a = crate::trace::span::attribute_list();
    a.push(("db.system.name", Value::Static(system)));
    if let Some(ns) = &r.namespace {
        a.push(("db.namespace", Value::Str(ns.to_string())));
    }
    if let Some(op) = &r.operation {
        a.push(("db.operation.name", Value::Str(op.to_string())));
    }
    if let Some(c) = &r.collection {
        a.push(("db.collection.name", Value::Str(c.to_string())));
    }
    if let Some(t) = &r.text {
        a.push(("db.query.text", Value::Str(t.to_string())));
    }
    if r.text_truncated {
        a.push(("loupe.db.query.truncated", Value::Static("true")));
    }
    if r.text_unknown {
        // Said on the span: the statement was prepared before the agent was looking.
        a.push((
            "loupe.db.query.unknown",
            Value::Static("prepared_before_capture"),
        ));
    }
    let (server, peer) = match kind {
        SpanKind::Client => (conn.remote, conn.remote),
        SpanKind::Server => (conn.local, conn.remote),
    };
    a.push(("server.address", Value::Str(ip_str(server))));
    a.push(("server.port", Value::Int(server.port().into())));
    a.push((
        "network.peer.address",
        Value::Shared(crate::trace::shared_text::ip(peer.ip())),
    ));
    a.push(("network.peer.port", Value::Int(peer.port().into())));
    let code = ex.response.as_ref().and_then(|r| r.error_code.clone());
    if let Some(c) = &code {
        a.push(("db.response.status_code", Value::Str(c.to_string())));
    }
    let error = match (ex.outcome, &code) {
        (Outcome::Timeout, _) => Some("timeout".to_string()),
        (Outcome::Closed, _) => Some("connection_closed".to_string()),
        (Outcome::Incomplete, _) => Some("response_incomplete".to_string()),
        (Outcome::Complete, Some(c)) => Some(c.to_string()),
        (Outcome::Complete, None) => None,
    };
    if let Some(e) = &error {
        a.push(("error.type", Value::Str(e.clone())));
    }
    // Low cardinality: `SELECT items`, `GET`, else the system.
    let name = match (&r.operation, &r.collection) {
        (Some(op), Some(c)) => shared_text::joined(&[op, " ", c]),
        (Some(op), None) => shared_text::text(op),
        _ => shared_text::text(system),
    };
    let id = &ex.identity;
    SpanRecord {
        trace_id: id.trace_id,
        span_id: id.span_id,
        parent_span_id: id.parent_span_id,
        parent_is_remote: id.parent_is_remote,
        trace_state: id.trace_state.clone(),
        name,
        kind,
        start_unix_ns: clock.to_unix_ns(ex.start_ns),
        end_unix_ns: clock.to_unix_ns(ex.end_ns.max(ex.start_ns)),
        attributes: a,
        status: Some(code.map_or(Cow::Borrowed("OK"), |c| Cow::Owned(c.to_string()))),
        error,
        pid: conn.pid,
        comm: conn.comm.clone(),
    }
}
