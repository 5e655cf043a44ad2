//! The span-producing sink: per connection, user-space detection decides the protocol (and
//! writes an "ignored" verdict back to the kernel when none fits), then that protocol's session
//! pairs requests with answers; each exchange becomes a span of the process that handled it,
//! handed to the export queue. This is the one fan-out point after each exchange.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::{
    clock::{self, WallClock},
    conn::{ConnInfo, Segment, Segments},
    decode::{CloseEvent, ConnKey, DataEvent, Direction, KernelContext, Role},
    export::{ExportStats, queue::SpanOut},
    pipeline::Sink,
    protocol::{
        PROTO_COUNT, PROTO_HTTP1, PROTO_HTTP2, PROTO_TLS_ID as PROTO_TLS, db,
        detect::{DetectStats, Detection, Verdict},
        http2::{self, session::Session as Http2Session},
        sql,
        verdict::{NoVerdicts, Verdicts},
    },
    trace::{
        causality::{Callee, Linker, RequestView},
        exchange::{Exchange, Identity, RequestStart, Session},
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
    /// Connections of another Loupe agent on this host (its exports, its scrapes): not traced.
    pub other_agents: AtomicU64,
    /// Spans of a provisional trace sent without waiting: the hold was full.
    pub held_overflow: AtomicU64,
    /// Per protocol id (`loupe_l7_*{protocol=...}`); HTTP/1 also feeds the fields above.
    pub l7: L7Stats,
    pub detect: DetectStats,
}

#[derive(Debug, Default)]
pub struct L7Stats {
    pub exchanges: [AtomicU64; PROTO_COUNT],
    pub spans: [AtomicU64; PROTO_COUNT],
    pub malformed: [AtomicU64; PROTO_COUNT],
    pub orphans: [AtomicU64; PROTO_COUNT],
    pub timeouts: [AtomicU64; PROTO_COUNT],
    pub overflow: [AtomicU64; PROTO_COUNT],
    /// Pushes, pub/sub messages, notices: never paired.
    pub unsolicited: [AtomicU64; PROTO_COUNT],
    /// Statements a server skipped after an earlier error in their pipeline (no span).
    pub not_executed: [AtomicU64; PROTO_COUNT],
    /// Header fields that referenced state from before the agent attached (HPACK entries).
    pub unknown_fields: [AtomicU64; PROTO_COUNT],
}

/// Per-exchange counts: the sink's thread alone writes them (`crate::counter`).
fn add(c: &[AtomicU64; PROTO_COUNT], proto: u8, n: u64) {
    if n > 0
        && let Some(c) = c.get(proto as usize)
    {
        crate::counter::add(c, n);
    }
}

/// Payload events held while a connection's protocol is being decided (replayed after).
const MAX_HELD: usize = 8;

struct Held {
    ev: DataEvent,
    dir: Direction,
    segments: Segments,
}

enum Proto {
    Detecting(Detection, Vec<Held>),
    Http1(Session),
    // Boxed: a database session (parser buffers, statement maps) is larger than the rest, and
    // most connections are HTTP.
    Db(Box<db::Session>, u8),
    /// Boxed: two HPACK tables and the open streams.
    Http2(Box<Http2Session>),
    /// TLS ciphertext, waiting for its plaintext (a connection of its own, `ConnKey::plaintext`).
    Tls(crate::protocol::tls::TlsWatch),
    /// No parser wants it (or its side is unknown).
    Ignored,
}

struct Tracked {
    proto: Proto,
    info: ConnInfo,
}

pub struct TraceSink {
    conns: HashMap<ConnKey, Tracked>,
    /// `--tcp-context`: the kernel span id a client connection's last request took. Requests
    /// pipelined before any answer share the kernel's ids; only the first may use them.
    kernel_spans: HashMap<ConnKey, [u8; 8]>,
    clock: WallClock,
    redaction: Redaction,
    db: db::DbOptions,
    sql: sql::Cache,
    verdicts: Box<dyn Verdicts>,
    pub linker: Linker,
    out: SpanOut,
    export_stats: Arc<ExportStats>,
    pub stats: Arc<TraceStats>,
    response_timeout_ns: u64,
    processes: crate::process::SharedProcesses,
    /// The OTLP endpoint's addresses: exports to a collector on this node are HTTP requests too,
    /// and tracing them would export a span per export, forever.
    exclude: Vec<std::net::SocketAddr>,
    excluded: HashSet<ConnKey>,
    pub tls: Arc<crate::tls::TlsStats>,
    /// Spans of provisional traces (a pool thread's call whose parent its handback will tell),
    /// held until the linker settles them; at most MAX_HELD_SPANS.
    held: HashMap<[u8; 16], Vec<(SpanRecord, bool)>>,
    held_count: usize,
    /// RED metrics and the service graph, fed every span before any sampling.
    red: Option<crate::red::Red>,
    /// The HTTP/1 exchanges a response completed, reused between events.
    done_http: Vec<Exchange>,
    /// The HTTP/2 streams an event completed, reused the same way.
    done_h2: Vec<http2::session::H2Exchange>,
    /// What is exported of what was measured.
    pub sampler: crate::trace::sampling::Sampler,
    /// pid -> the TLS library it uses (`tls_library`).
    tls_libraries: HashMap<u32, &'static str>,
}

/// Spans held for provisional traces at most; beyond, they go out as they are (counted).
const MAX_HELD_SPANS: usize = 50_000;

/// An untraced server as the service graph names it: the host the request named (or the peer's
/// address) and the port.
fn peer_name(span: &SpanRecord) -> String {
    let text = |k: &str| {
        span.attr(k).map(|v| match v {
            crate::trace::span::Value::Int(i) => i.to_string(),
            other => other.as_str().unwrap_or_default().to_string(),
        })
    };
    let host = text("server.address").or_else(|| text("network.peer.address"));
    let port = text("server.port").or_else(|| text("network.peer.port"));
    match (host, port) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h,
        _ => "unknown".to_string(),
    }
}

/// Whether a connection is the agent's own export path (seen from the collector's side).
/// Tells the kernel to stop capturing `key` (it keeps one lookup per syscall for it), counted
/// as taken or not: every way a connection is let go goes through here.
fn silence(verdicts: &mut dyn Verdicts, detect: &DetectStats, key: ConnKey) {
    let counter = if verdicts.ignore(key) {
        &detect.verdicts_written
    } else {
        &detect.verdicts_failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the connection table says about a connection whose event was not parsed at once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    New,
    Detecting,
    Tls,
    /// Until the kernel takes the verdict, or for a side that cannot be told.
    Ignored,
}

pub fn is_excluded(exclude: &[std::net::SocketAddr], conn: &ConnInfo) -> bool {
    exclude.iter().any(|a| {
        let matches = |s: std::net::SocketAddr| {
            s.port() == a.port() && (s.ip() == a.ip() || a.ip().is_unspecified())
        };
        matches(conn.local) || matches(conn.remote)
    })
}

/// The agent's executable name: processes running it are other agents (this one's own events
/// never leave the kernel).
pub const AGENT_EXE: &str = "loupe";

impl TraceSink {
    /// Excludes connections to or from these addresses (the OTLP endpoint).
    pub fn exclude(&mut self, addrs: Vec<std::net::SocketAddr>) {
        self.exclude = addrs;
    }

    /// Where "no parser wants this connection" is written (the kernel's connection map).
    pub fn verdicts(&mut self, v: Box<dyn Verdicts>) {
        self.verdicts = v;
    }

    pub fn databases(&mut self, opts: db::DbOptions) {
        self.sql = sql::Cache::new(opts.max_query_text);
        self.db = opts;
    }

    pub fn new(
        out: SpanOut,
        export_stats: Arc<ExportStats>,
        redaction: Redaction,
        response_timeout_ns: u64,
        processes: crate::process::SharedProcesses,
    ) -> Self {
        let db = db::DbOptions::default();
        Self {
            conns: HashMap::new(),
            kernel_spans: HashMap::new(),
            clock: WallClock::new(),
            redaction,
            sql: sql::Cache::new(db.max_query_text),
            db,
            verdicts: Box::new(NoVerdicts),
            linker: Linker::new(Box::new(RandomIds)),
            out,
            export_stats,
            stats: Arc::new(TraceStats::default()),
            response_timeout_ns,
            processes,
            exclude: Vec::new(),
            excluded: HashSet::new(),
            tls: Arc::new(crate::tls::TlsStats::default()),
            held: HashMap::new(),
            held_count: 0,
            red: None,
            done_http: Vec::new(),
            done_h2: Vec::new(),
            tls_libraries: HashMap::new(),
            sampler: crate::trace::sampling::Sampler::new(
                crate::trace::sampling::HeadSampler {
                    head: crate::trace::sampling::Head::AlwaysOn,
                    parent_based: false,
                },
                Default::default(),
            ),
        }
    }

    pub fn red(&mut self, red: crate::red::Red) {
        self.red = Some(red);
    }

    /// RED metrics and the service graph count every span; `callee`: who answered a CLIENT
    /// span on this node.
    fn measure(&mut self, span: &SpanRecord, callee: Option<Callee>) {
        let Some(red) = self.red.as_mut() else {
            return;
        };
        red.record(span);
        match span.kind {
            SpanKind::Server => {
                let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
                red.server_done(span.span_id, seconds);
            }
            SpanKind::Client => {
                let peer = match callee {
                    Some(c) => crate::red::Peer::Process(
                        c.pid,
                        c.server_span,
                        c.server_done.map(|d| d.seconds),
                    ),
                    None => crate::red::Peer::Address(peer_name(span)),
                };
                red.edge(span, peer);
            }
        }
    }

    /// Both sides of a call on this node are timed by one clock, each when its own syscall
    /// returns: on loopback the callee can read the request before the caller's send returns
    /// (and the caller read the response before the callee's does). A caller's span is made
    /// to enclose its callee's, as the bytes did: the earlier start, the later end.
    fn pair_times(&mut self, span: &mut SpanRecord, orphan: bool) -> Option<Callee> {
        match span.kind {
            SpanKind::Server => {
                let ended_ns = self.clock.to_monotonic_ns(span.end_unix_ns);
                self.linker.server_finished(span, orphan, ended_ns);
                None
            }
            SpanKind::Client => {
                let callee = self.linker.take_callee(span.span_id, span.end_unix_ns)?;
                let server_start = self.clock.to_unix_ns(callee.server_start_ns);
                span.start_unix_ns = span.start_unix_ns.min(server_start);
                if let Some(done) = callee.server_done {
                    span.end_unix_ns = span.end_unix_ns.max(done.end_unix_ns);
                }
                Some(callee)
            }
        }
    }

    /// Measured, then to sampling, or held while its trace is provisional, for an exchange
    /// of `identity` (finalized).
    fn send(&mut self, mut span: SpanRecord, identity: &Identity) {
        let local_root = !identity.local_parent;
        // A local root still waiting for a late caller (not adopted by one yet).
        let callee = self.pair_times(&mut span, local_root && identity.awaits_caller);
        self.measure(&span, callee);
        if self.linker.is_provisional(&span.trace_id) {
            if self.held_count < MAX_HELD_SPANS {
                self.held_count += 1;
                self.held
                    .entry(span.trace_id)
                    .or_default()
                    .push((span, local_root));
                return;
            }
            self.stats.held_overflow.fetch_add(1, Ordering::Relaxed);
        }
        self.sample(span, local_root);
    }

    /// Sampling decides what is exported.
    fn sample(&mut self, span: SpanRecord, local_root: bool) {
        let carried = self.linker.carried_flag(&span.trace_id);
        if let Some(keep) = self.sampler.without_waiting(carried) {
            self.sampler.count_one(keep);
            if keep {
                self.out.offer(&self.export_stats, span);
            }
            return;
        }
        let service = match (local_root, self.red.as_mut()) {
            (true, Some(red)) => red.service(span.pid, &span.comm, span.end_unix_ns),
            _ => span.comm.clone(),
        };
        let root = local_root.then_some(crate::trace::sampling::Root {
            service: &service,
            carried_sampled: carried,
        });
        for span in self.sampler.offer(span, root) {
            self.out.offer(&self.export_stats, span);
        }
    }

    /// Lets the held spans of settled traces go, with the ids the settlement gave them.
    fn release_settled(&mut self) {
        for trace in self.linker.take_settled() {
            for (mut span, local_root) in self.held.remove(&trace).unwrap_or_default() {
                self.held_count -= 1;
                let adopted = self.linker.finalize_span(&mut span);
                self.sample(span, local_root && !adopted);
            }
        }
    }

    fn sampled_out(&mut self, spans: Vec<SpanRecord>) {
        for span in spans {
            self.out.offer(&self.export_stats, span);
        }
    }

    /// A CLIENT exchange is over: the linker may be waiting for its handback.
    fn client_ended(
        &mut self,
        conn: &ConnInfo,
        started: &RequestStart,
        identity: &Identity,
        end_ns: u64,
    ) {
        self.linker
            .client_end(conn.pid, started.tid, identity.span_id, end_ns);
    }

    /// Whether `conn` (not tracked) is left alone: the OTLP endpoint's traffic, decided once
    /// per connection and told to the kernel.
    fn left_alone(&mut self, conn: &ConnInfo) -> bool {
        if self.excluded.contains(&conn.key) {
            return true;
        }
        if self.exclude.is_empty() || !is_excluded(&self.exclude, conn) {
            return false;
        }
        self.excluded.insert(conn.key);
        // A collector on this node receives every span Loupe sends: without the verdict the
        // kernel copied all of those bytes for this pipeline to drop.
        silence(self.verdicts.as_mut(), &self.stats.detect, conn.key);
        true
    }

    /// The first plaintext of a TLS connection: its ciphertext side has nothing more to say.
    fn tls_hooked(&mut self, conn: &ConnInfo) {
        self.tls.hooked_connections.fetch_add(1, Ordering::Relaxed);
        // The ciphertext key may also have been taken for its cleartext prologue (PostgreSQL's
        // SSLRequest): either way its bytes from here are the plaintext key's.
        if let Some(t) = self.conns.get_mut(&conn.key.ciphertext()) {
            if let Proto::Tls(w) = &t.proto {
                self.tls
                    .missed_records
                    .fetch_add(w.application_records as u64, Ordering::Relaxed);
            }
            t.proto = Proto::Ignored;
        }
    }

    /// The TLS library of a process, read once per process (its maps can be large: a JVM's).
    fn tls_library(&mut self, pid: u32) -> &'static str {
        if self.tls_libraries.len() > 10_000 {
            self.tls_libraries.clear();
        }
        self.tls_libraries
            .entry(pid)
            .or_insert_with(|| crate::tls::discover::library_of(pid))
    }

    /// Ciphertext of a connection not (yet) seen in plaintext.
    fn tls_watch(&mut self, conn: &ConnInfo, segments: &[Segment]) {
        let Some(t) = self.conns.get_mut(&conn.key) else {
            return;
        };
        let Proto::Tls(w) = &mut t.proto else {
            return;
        };
        w.offer(segments);
        if w.unhooked() {
            let library = w
                .library
                .unwrap_or_else(|| crate::tls::discover::library_of(conn.pid));
            self.tls.count_unhooked(library);
            tracing::debug!(
                "TLS connection of pid {} ({}) to {} (server name {:?}) is not hooked: {library}",
                conn.pid,
                conn.comm,
                conn.remote,
                w.server_name
            );
            t.proto = Proto::Ignored;
            silence(self.verdicts.as_mut(), &self.stats.detect, conn.key);
        }
    }

    fn kind(conn: &ConnInfo) -> SpanKind {
        match conn.role {
            Role::Server => SpanKind::Server,
            _ => SpanKind::Client,
        }
    }

    fn emit(&mut self, done: &mut Vec<Exchange>, conn: &ConnInfo) {
        let kind = Self::kind(conn);
        add(&self.stats.l7.exchanges, PROTO_HTTP1, done.len() as u64);
        add(&self.stats.l7.spans, PROTO_HTTP1, done.len() as u64);
        // By reference, cleared after: moving each ~500-byte exchange out was a copy apiece.
        for ex in done.iter_mut() {
            crate::counter::add(&self.stats.exchanges, 1);
            self.linker.finalize(&mut ex.identity);
            if kind == SpanKind::Server {
                self.linker
                    .server_end(conn.pid, ex.started.tid, ex.identity.span_id);
            } else {
                self.client_ended(conn, &ex.started, &ex.identity, ex.end_ns);
            }
            let span = build(ex, conn, kind, &self.clock, &self.redaction);
            self.send(span, &ex.identity);
        }
        done.clear();
    }

    fn emit_db(
        &mut self,
        done: Vec<db::DbExchange>,
        conn: &ConnInfo,
        proto: u8,
        system: &'static str,
    ) {
        let kind = Self::kind(conn);
        add(&self.stats.l7.exchanges, proto, done.len() as u64);
        // The database's own side feeds metrics only, unless asked for (`databases:
        // server_spans`): the conventions make database calls CLIENT spans.
        if kind == SpanKind::Server && !self.db.server_spans {
            return;
        }
        add(&self.stats.l7.spans, proto, done.len() as u64);
        for mut ex in done {
            self.linker.finalize(&mut ex.identity);
            if kind == SpanKind::Server {
                self.linker
                    .server_end(conn.pid, ex.started.tid, ex.identity.span_id);
            } else {
                self.client_ended(conn, &ex.started, &ex.identity, ex.end_ns);
            }
            let span = db::build(&ex, conn, kind, system, &self.clock);
            self.send(span, &ex.identity);
        }
    }

    fn account(
        &self,
        before: crate::trace::exchange::SessionStats,
        after: crate::trace::exchange::SessionStats,
    ) {
        let p = PROTO_HTTP1;
        let (m, o, r) = (
            after.malformed - before.malformed,
            after.overflow - before.overflow,
            after.orphan_responses - before.orphan_responses,
        );
        if m + o + r == 0 {
            return;
        }
        crate::counter::add(&self.stats.malformed, m);
        crate::counter::add(&self.stats.pending_overflow, o);
        crate::counter::add(&self.stats.orphan_responses, r);
        add(&self.stats.l7.malformed, p, m);
        add(&self.stats.l7.overflow, p, o);
        add(&self.stats.l7.orphans, p, r);
    }

    fn account_db(&self, proto: u8, before: db::DbSessionStats, after: db::DbSessionStats) {
        let l = &self.stats.l7;
        add(&l.malformed, proto, after.malformed - before.malformed);
        add(&l.overflow, proto, after.overflow - before.overflow);
        add(
            &l.orphans,
            proto,
            after.orphan_responses - before.orphan_responses,
        );
        add(
            &l.unsolicited,
            proto,
            after.unsolicited - before.unsolicited,
        );
        add(
            &l.not_executed,
            proto,
            after.not_executed - before.not_executed,
        );
    }

    /// Decides the protocol of a connection still being detected. Returns the events to replay
    /// into its new session, or None while undecided (the event is held) or ignored.
    fn detect(
        &mut self,
        conn: &ConnInfo,
        ev: &DataEvent,
        dir: Direction,
        segments: Segments,
        requests_dir: Direction,
    ) -> Option<Vec<Held>> {
        let tracked = self.conns.get_mut(&conn.key)?;
        let Proto::Detecting(detection, held) = &mut tracked.proto else {
            return None;
        };
        let requests = dir == requests_dir;
        let mut verdict = Verdict::Pending;
        for seg in &segments {
            match seg {
                Segment::Gap(_) => detection.gap(requests),
                Segment::Data(b) => {
                    verdict = detection.offer_at(
                        b,
                        requests,
                        conn.protocol,
                        conn.midstream,
                        &self.stats.detect,
                    );
                    if verdict != Verdict::Pending {
                        break;
                    }
                }
            }
        }
        // The pipeline hands the sink events without their payload (it is in `segments`).
        held.push(Held {
            ev: ev.clone(),
            dir,
            segments,
        });
        if verdict == Verdict::Pending && held.len() >= MAX_HELD {
            verdict = Verdict::Ignore;
            self.stats.detect.ignored.fetch_add(1, Ordering::Relaxed);
        }
        match verdict {
            Verdict::Pending => None,
            Verdict::Ignore => {
                tracked.proto = Proto::Ignored;
                silence(self.verdicts.as_mut(), &self.stats.detect, conn.key);
                None
            }
            Verdict::Protocol(p) => {
                let held = std::mem::take(held);
                tracked.proto = if p == PROTO_HTTP1 {
                    Proto::Http1(Session::new(conn.midstream))
                } else if p == PROTO_HTTP2 {
                    Proto::Http2(Box::new(Http2Session::new(conn.midstream)))
                } else {
                    match db::Parser::new(p, conn.midstream, &self.db) {
                        Some(parser) => Proto::Db(Box::new(db::Session::new(parser)), p),
                        None => Proto::Ignored,
                    }
                };
                Some(held)
            }
        }
    }

    fn assign_identity(
        linker: &mut Linker,
        kernel_spans: &mut HashMap<ConnKey, [u8; 8]>,
        conn: &ConnInfo,
        view: RequestView<'_>,
        st: crate::trace::exchange::RequestStart,
        kernel: Option<KernelContext>,
    ) -> Identity {
        if conn.role == Role::Server {
            linker.server_request(conn, view, st, kernel)
        } else {
            let fresh = kernel.filter(|k| kernel_spans.get(&conn.key) != Some(&k.span_id));
            if let Some(k) = fresh {
                kernel_spans.insert(conn.key, k.span_id);
            }
            linker.client_request(conn, view, st, fresh)
        }
    }

    /// An event of a connection whose side cannot be told: the connection is left alone.
    fn unknown_role(&mut self, conn: &ConnInfo) {
        if self.conns.contains_key(&conn.key) || self.left_alone(conn) {
            return;
        }
        self.stats.unknown_role.fetch_add(1, Ordering::Relaxed);
        self.conns.insert(
            conn.key,
            Tracked {
                proto: Proto::Ignored,
                info: conn.clone(),
            },
        );
    }

    /// Parses the event if its connection is being parsed; otherwise gives its segments back,
    /// with what the table says of the connection.
    fn parse(
        &mut self,
        conn: &ConnInfo,
        ev: &DataEvent,
        dir: Direction,
        segments: Segments,
        requests_dir: Direction,
    ) -> Result<(), (Segments, Seen)> {
        let Self {
            conns,
            linker,
            kernel_spans,
            sql,
            db: db_opts,
            ..
        } = self;
        let Some(tracked) = conns.get_mut(&conn.key) else {
            return Err((segments, Seen::New));
        };
        let kernel = ev.context;
        match &mut tracked.proto {
            Proto::Http1(session) => {
                let before = session.stats;
                // Reused: a Vec per response was an allocation each.
                let mut done = std::mem::take(&mut self.done_http);
                if dir == requests_dir {
                    let mut assign = |head: &crate::protocol::http1::Head, st| {
                        Self::assign_identity(
                            linker,
                            kernel_spans,
                            conn,
                            RequestView::http(head),
                            st,
                            kernel,
                        )
                    };
                    session.on_requests(ev.ts_ns, ev.tid, &mut assign, segments);
                } else {
                    session.on_responses_into(ev.ts_ns, segments, &mut done);
                }
                let after = session.stats;
                self.account(before, after);
                if !done.is_empty() {
                    self.emit(&mut done, conn);
                }
                self.done_http = done;
            }
            Proto::Db(session, proto) => {
                let proto = *proto;
                let before = session.stats;
                let server_spans = db_opts.server_spans;
                let done = if dir == requests_dir {
                    let mut assign = |_req: &db::DbRequest, st| {
                        if conn.role == Role::Server && !server_spans {
                            // Metrics only: no identity is ever exported.
                            return Identity::unexported();
                        }
                        let view = RequestView {
                            target: "",
                            carried: None,
                            pairs_with_peer: server_spans,
                            ordinals_absolute: false,
                        };
                        Self::assign_identity(linker, kernel_spans, conn, view, st, kernel)
                    };
                    session.on_requests(ev.ts_ns, ev.tid, sql, &mut assign, segments);
                    Vec::new()
                } else {
                    session.on_responses(ev.ts_ns, segments)
                };
                let after = session.stats;
                let system = session.parser.system();
                self.account_db(proto, before, after);
                if !done.is_empty() {
                    self.emit_db(done, conn, proto, system);
                }
            }
            Proto::Http2(session) => {
                let before = session.stats;
                let side = if dir == requests_dir {
                    http2::session::REQUESTS
                } else {
                    http2::session::RESPONSES
                };
                let mut assign = |head: &crate::protocol::http1::Head, st| {
                    let view = RequestView {
                        ordinals_absolute: true,
                        ..RequestView::http(head)
                    };
                    Self::assign_identity(linker, kernel_spans, conn, view, st, kernel)
                };
                let mut done = std::mem::take(&mut self.done_h2);
                session.read_into(side, ev.ts_ns, ev.tid, segments, &mut assign, &mut done);
                let after = session.stats;
                self.account_h2(before, after);
                if !done.is_empty() {
                    self.emit_h2(&mut done, conn);
                }
                self.done_h2 = done;
            }
            Proto::Detecting(..) => return Err((segments, Seen::Detecting)),
            Proto::Tls(_) => return Err((segments, Seen::Tls)),
            Proto::Ignored => return Err((segments, Seen::Ignored)),
        }
        Ok(())
    }

    fn account_h2(
        &self,
        before: http2::session::SessionStats,
        after: http2::session::SessionStats,
    ) {
        let l = &self.stats.l7;
        add(
            &l.malformed,
            PROTO_HTTP2,
            (after.hpack_errors + after.resyncs) - (before.hpack_errors + before.resyncs),
        );
        add(
            &l.orphans,
            PROTO_HTTP2,
            after.orphan_responses - before.orphan_responses,
        );
        add(&l.overflow, PROTO_HTTP2, after.overflow - before.overflow);
        add(
            &l.unsolicited,
            PROTO_HTTP2,
            after.push_promises - before.push_promises,
        );
        add(
            &l.unknown_fields,
            PROTO_HTTP2,
            after.unknown_fields - before.unknown_fields,
        );
    }

    fn emit_h2(&mut self, done: &mut Vec<http2::session::H2Exchange>, conn: &ConnInfo) {
        let kind = Self::kind(conn);
        add(&self.stats.l7.exchanges, PROTO_HTTP2, done.len() as u64);
        add(&self.stats.l7.spans, PROTO_HTTP2, done.len() as u64);
        for mut x in done.drain(..) {
            self.linker.finalize(&mut x.exchange.identity);
            if kind == SpanKind::Server {
                self.linker.server_end(
                    conn.pid,
                    x.exchange.started.tid,
                    x.exchange.identity.span_id,
                );
            } else {
                self.client_ended(
                    conn,
                    &x.exchange.started,
                    &x.exchange.identity,
                    x.exchange.end_ns,
                );
            }
            let span = http2::span::build(&x, conn, kind, &self.clock, &self.redaction);
            self.send(span, &x.exchange.identity);
        }
    }
}

impl Sink for TraceSink {
    fn data(&mut self, conn: &ConnInfo, ev: &DataEvent, dir: Direction, segments: Segments) {
        // Requests arrive on the server side and leave from the client side.
        let requests_dir = match conn.role {
            Role::Server => Direction::Recv,
            Role::Client => Direction::Send,
            Role::Unknown => {
                self.unknown_role(conn);
                return;
            }
        };
        // One lookup for what most events are (this runs for every event of every traced
        // connection): those of a connection being parsed.
        let Err((segments, seen)) = self.parse(conn, ev, dir, segments, requests_dir) else {
            return;
        };
        match seen {
            Seen::Ignored => return,
            Seen::Tls => {
                self.tls_watch(conn, &segments);
                return;
            }
            Seen::Detecting => {}
            Seen::New => {
                // The exclusions are looked at only for a connection not tracked yet, which
                // an excluded one never is.
                if self.left_alone(conn) {
                    return;
                }
                // Look the process up now: a short-lived client may be gone by export time.
                let other_agent = self
                    .processes
                    .lock()
                    .is_ok_and(|mut p| p.get(conn.pid, &conn.comm).executable_name == AGENT_EXE);
                // Another agent's exports would become spans that it then exports, and so on.
                let proto = if other_agent {
                    self.stats.other_agents.fetch_add(1, Ordering::Relaxed);
                    silence(self.verdicts.as_mut(), &self.stats.detect, conn.key);
                    Proto::Ignored
                } else if !conn.tls && conn.protocol == PROTO_TLS {
                    Proto::Tls(crate::protocol::tls::TlsWatch {
                        library: Some(self.tls_library(conn.pid)),
                        ..Default::default()
                    })
                } else {
                    if conn.tls {
                        self.tls_hooked(conn);
                    }
                    Proto::Detecting(Detection::default(), Vec::new())
                };
                let watch = matches!(proto, Proto::Tls(_));
                self.conns.insert(
                    conn.key,
                    Tracked {
                        proto,
                        info: conn.clone(),
                    },
                );
                if other_agent {
                    return;
                }
                if watch {
                    self.tls_watch(conn, &segments);
                    return;
                }
            }
        }
        if let Some(replay) = self.detect(conn, ev, dir, segments, requests_dir) {
            for h in replay {
                // A protocol without a parser here (`Proto::Ignored`): its replay is dropped.
                let _ = self.parse(conn, &h.ev, h.dir, h.segments, requests_dir);
            }
        }
    }

    fn closed(&mut self, conn: &ConnInfo, ev: Option<&CloseEvent>) {
        self.excluded.remove(&conn.key);
        self.kernel_spans.remove(&conn.key);
        let Some(tracked) = self.conns.remove(&conn.key) else {
            return;
        };
        let info = tracked.info;
        if info.role == Role::Unknown {
            return;
        }
        let ts = ev.map(|e| e.ts_ns).unwrap_or_else(clock::monotonic_ns);
        match tracked.proto {
            Proto::Http1(mut session) => {
                let mut done = session.close(ts);
                self.emit(&mut done, &info);
            }
            Proto::Db(mut session, proto) => {
                let done = session.close(ts);
                let system = session.parser.system();
                self.emit_db(done, &info, proto, system);
            }
            Proto::Http2(mut session) => {
                let mut done = session.close(ts);
                self.emit_h2(&mut done, &info);
            }
            Proto::Detecting(..) | Proto::Tls(_) | Proto::Ignored => {}
        }
    }

    fn wake(&mut self, ev: &crate::decode::WakeEvent) {
        self.linker.woke(ev.pid, ev.waker, ev.wakee, ev.ts_ns);
        self.release_settled();
    }

    fn exec(&mut self, ev: crate::decode::ExecEvent) {
        if let Ok(mut p) = self.processes.lock() {
            p.exec(ev);
        }
    }

    fn fork(&mut self, ev: &crate::decode::ForkEvent) {
        self.linker
            .thread_created(ev.pid, ev.parent_tid, ev.child_tid, ev.ts_ns);
    }

    fn tick(&mut self, now_ns: u64) {
        self.linker.expire(now_ns);
        self.release_settled();
        let late = self.sampler.expire();
        self.sampled_out(late);
        let timeout = self.response_timeout_ns;
        let mut expired = Vec::new();
        let mut expired_db = Vec::new();
        let mut expired_h2 = Vec::new();
        for t in self.conns.values_mut() {
            match &mut t.proto {
                Proto::Http1(session) => {
                    let done = session.expire(now_ns, timeout);
                    if !done.is_empty() {
                        expired.push((done, t.info.clone()));
                    }
                }
                Proto::Db(session, proto) => {
                    let done = session.expire(now_ns, timeout);
                    if !done.is_empty() {
                        expired_db.push((done, t.info.clone(), *proto, session.parser.system()));
                    }
                }
                Proto::Http2(session) => {
                    let done = session.expire(now_ns, timeout);
                    if !done.is_empty() {
                        expired_h2.push((done, t.info.clone()));
                    }
                }
                Proto::Detecting(..) | Proto::Tls(_) | Proto::Ignored => {}
            }
        }
        for (mut done, info) in expired_h2 {
            add(&self.stats.l7.timeouts, PROTO_HTTP2, done.len() as u64);
            self.emit_h2(&mut done, &info);
        }
        for (mut done, info) in expired {
            self.stats
                .timeouts
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            add(&self.stats.l7.timeouts, PROTO_HTTP1, done.len() as u64);
            self.emit(&mut done, &info);
        }
        for (done, info, proto, system) in expired_db {
            add(&self.stats.l7.timeouts, proto, done.len() as u64);
            self.emit_db(done, &info, proto, system);
        }
    }

    fn batch_done(&mut self) {
        self.out.send_due(&self.export_stats);
        if let Some(red) = self.red.as_mut() {
            red.hand_over();
        }
    }

    fn flush(&mut self) {
        self.out.send(&self.export_stats);
        if let Some(red) = self.red.as_mut() {
            red.hand_over();
        }
    }

    fn drain(&mut self) {
        self.linker.settle_all();
        self.release_settled();
        let rest = self.sampler.drain();
        self.sampled_out(rest);
    }
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
            protocol: crate::protocol::PROTO_HTTP1,
            midstream: false,
            tls: false,
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

    /// Verdicts the sink wrote, shared with the test.
    struct Recorded(Arc<std::sync::Mutex<Vec<ConnKey>>>);

    impl Verdicts for Recorded {
        fn ignore(&mut self, key: ConnKey) -> bool {
            self.0.lock().unwrap().push(key);
            true
        }
    }

    #[test]
    fn the_kernel_stops_capturing_a_connection_of_the_export_path() {
        let (mut sink, mut rx) = sink();
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        sink.verdicts(Box::new(Recorded(written.clone())));
        sink.exclude(vec!["127.0.0.1:4318".parse().unwrap()]);
        // The collector's side of the agent's export connection: without the exclusion, a
        // request and its response, a span.
        let conn = ConnInfo {
            local: "127.0.0.1:4318".parse().unwrap(),
            comm: "collector".into(),
            protocol: crate::protocol::PROTO_HTTP1,
            ..redis_conn(Role::Server)
        };
        let post = b"POST /v1/traces HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        push(&mut sink, &conn, Direction::Recv, 10, post);
        push(
            &mut sink,
            &conn,
            Direction::Send,
            20,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        push(&mut sink, &conn, Direction::Recv, 30, post);
        sink.batch_done();
        assert_eq!(*written.lock().unwrap(), vec![conn.key], "one verdict");
        assert_eq!(
            sink.stats.detect.verdicts_written.load(Ordering::Relaxed),
            1
        );
        assert!(rx.take_ready().is_empty(), "nothing traced");
    }

    fn redis_conn(role: Role) -> ConnInfo {
        ConnInfo {
            key: ConnKey {
                sk: 9,
                generation: 1,
            },
            pid: 1,
            comm: "redis".into(),
            local: "127.0.0.1:6379".parse().unwrap(),
            remote: "127.0.0.1:50000".parse().unwrap(),
            role,
            protocol: crate::protocol::PROTO_REDIS,
            midstream: false,
            tls: false,
        }
    }

    /// One GET on `role`'s side; the spans the sink made.
    fn one_get(role: Role, server_spans: bool) -> (Vec<SpanRecord>, Arc<TraceStats>) {
        let (tx, mut rx) = crate::export::queue::span_queue(16);
        let mut sink = TraceSink::new(
            tx,
            Arc::new(ExportStats::default()),
            Redaction::default(),
            1_000_000_000,
            crate::process::ProcessCache::shared(Vec::new(), true),
        );
        sink.databases(db::DbOptions {
            server_spans,
            ..db::DbOptions::default()
        });
        let conn = redis_conn(role);
        let (req_dir, resp_dir) = match role {
            Role::Server => (Direction::Recv, Direction::Send),
            _ => (Direction::Send, Direction::Recv),
        };
        let seg =
            |b: &'static [u8]| smallvec::smallvec![Segment::Data(bytes::Bytes::from_static(b))];
        let ev = |ts, direction| DataEvent {
            ts_ns: ts,
            direction,
            ..DataEvent::for_tests(conn.key)
        };
        sink.data(
            &conn,
            &ev(10, req_dir),
            req_dir,
            seg(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        );
        sink.data(&conn, &ev(20, resp_dir), resp_dir, seg(b"$1\r\nv\r\n"));
        sink.batch_done();
        let mut spans = Vec::new();
        for s in rx.take_ready() {
            spans.push(s);
        }
        (spans, sink.stats.clone())
    }

    #[test]
    fn database_calls_are_client_spans_and_the_servers_side_is_metrics_only() {
        let (spans, stats) = one_get(Role::Client, false);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].kind, SpanKind::Client);
        assert_eq!(&*spans[0].name, "GET");
        let redis = crate::protocol::PROTO_REDIS as usize;
        assert_eq!(stats.detect.detected[redis].load(Ordering::Relaxed), 1);

        let (spans, stats) = one_get(Role::Server, false);
        assert!(spans.is_empty(), "no SERVER span by default");
        assert_eq!(
            stats.l7.exchanges[redis].load(Ordering::Relaxed),
            1,
            "still counted"
        );
        assert_eq!(stats.l7.spans[redis].load(Ordering::Relaxed), 0);

        let (spans, _) = one_get(Role::Server, true);
        assert_eq!(spans.len(), 1, "databases: server_spans: true");
        assert_eq!(spans[0].kind, SpanKind::Server);
    }

    fn sink() -> (TraceSink, crate::export::queue::SpanIn) {
        let (tx, rx) = crate::export::queue::span_queue(16);
        let sink = TraceSink::new(
            tx,
            Arc::new(ExportStats::default()),
            Redaction::default(),
            1_000_000_000,
            crate::process::ProcessCache::shared(Vec::new(), true),
        );
        (sink, rx)
    }

    fn tls_conn(plaintext: bool) -> ConnInfo {
        let key = ConnKey {
            sk: 7,
            generation: 5,
        };
        ConnInfo {
            key: if plaintext { key.plaintext() } else { key },
            // No such process: its library is "unknown".
            pid: u32::MAX - 1,
            comm: "client".into(),
            local: "127.0.0.1:50000".parse().unwrap(),
            remote: "127.0.0.1:443".parse().unwrap(),
            role: Role::Client,
            protocol: agent_common::protocol::PROTO_TLS,
            midstream: false,
            tls: plaintext,
        }
    }

    fn push(sink: &mut TraceSink, conn: &ConnInfo, dir: Direction, ts: u64, b: &'static [u8]) {
        let ev = DataEvent {
            ts_ns: ts,
            direction: dir,
            tls: conn.tls,
            ..DataEvent::for_tests(conn.key)
        };
        sink.data(
            conn,
            &ev,
            dir,
            smallvec::smallvec![Segment::Data(bytes::Bytes::from_static(b))],
        );
    }

    fn http_conn(sk: u64, pid: u32, local: &str, remote: &str, role: Role) -> ConnInfo {
        ConnInfo {
            key: ConnKey { sk, generation: 1 },
            pid,
            comm: "svc".into(),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            role,
            protocol: crate::protocol::PROTO_HTTP1,
            midstream: false,
            tls: false,
        }
    }

    /// One request between two traced processes on this node, each side's events at the given
    /// times (request sent, request read, response sent, response read).
    fn loopback_call(times: [u64; 4]) -> (SpanRecord, SpanRecord) {
        let (mut sink, mut rx) = sink();
        let client = http_conn(1, 10, "127.0.0.1:50000", "127.0.0.1:8080", Role::Client);
        let server = http_conn(2, 20, "127.0.0.1:8080", "127.0.0.1:50000", Role::Server);
        let request: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let response: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut events = [
            (times[0], &client, Direction::Send, request),
            (times[1], &server, Direction::Recv, request),
            (times[2], &server, Direction::Send, response),
            (times[3], &client, Direction::Recv, response),
        ];
        // The agent reads events in the order the kernel queued them: by their times.
        events.sort_by_key(|e| e.0);
        for (ts, conn, dir, bytes) in events {
            push(&mut sink, conn, dir, ts, bytes);
        }
        sink.batch_done();
        let spans = rx.take_ready();
        let pick = |kind| spans.iter().find(|s| s.kind == kind).cloned().unwrap();
        assert_eq!(spans.len(), 2);
        (pick(SpanKind::Client), pick(SpanKind::Server))
    }

    #[test]
    fn a_callers_span_encloses_its_callees_on_one_node() {
        // Times relative to the client's start (each sink has its own wall-clock offset).
        let times = |c: &SpanRecord, s: &SpanRecord| {
            let at = |t: u64| t - c.start_unix_ns;
            [at(c.end_unix_ns), at(s.start_unix_ns), at(s.end_unix_ns)]
        };
        // As measured when the events come in the order of the bytes.
        let (c, s) = loopback_call([1_000, 2_000, 8_000, 9_000]);
        assert_eq!(s.parent_span_id, Some(c.span_id));
        assert_eq!(times(&c, &s), [8_000, 1_000, 7_000]);
        // Loopback: the callee read the request before the caller's send returned, and the
        // caller read the response before the callee's did.
        let (c, s) = loopback_call([2_500, 2_000, 9_500, 9_000]);
        assert_eq!(s.parent_span_id, Some(c.span_id), "adopted");
        assert_eq!(times(&c, &s), [7_000, 0, 7_000]);
    }

    #[test]
    fn tls_plaintext_is_parsed_as_its_protocol_and_the_ciphertext_dropped() {
        let (mut sink, mut rx) = sink();
        let (cipher, plain) = (tls_conn(false), tls_conn(true));
        push(
            &mut sink,
            &cipher,
            Direction::Send,
            1,
            b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
        );
        push(
            &mut sink,
            &plain,
            Direction::Send,
            2,
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        push(
            &mut sink,
            &plain,
            Direction::Recv,
            3,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        sink.batch_done();
        let mut spans = rx.take_ready();
        assert_eq!(spans.len(), 1, "one span, from the plaintext");
        let span = spans.remove(0);
        let scheme = span
            .attributes
            .iter()
            .find(|(k, _)| *k == "url.scheme")
            .and_then(|(_, v)| v.as_str());
        assert_eq!(scheme, Some("https"));
        assert_eq!(sink.tls.hooked_connections.load(Ordering::Relaxed), 1);
        // Late ciphertext of the same connection is neither parsed nor counted as unhooked.
        for ts in 4..8 {
            push(
                &mut sink,
                &cipher,
                Direction::Recv,
                ts,
                b"\x17\x03\x03\x00\x10",
            );
        }
        sink.batch_done();
        assert!(rx.take_ready().is_empty());
        let unhooked: u64 = sink
            .tls
            .unhooked
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        assert_eq!(unhooked, 0);
    }

    #[test]
    fn tls_never_seen_in_plaintext_is_counted_unhooked_once() {
        let (mut sink, _rx) = sink();
        let cipher = tls_conn(false);
        for ts in 1..6 {
            push(
                &mut sink,
                &cipher,
                Direction::Send,
                ts,
                b"\x17\x03\x03\x00\x10",
            );
        }
        let unknown = crate::tls::UNHOOKED_LIBRARIES.len() - 1;
        assert_eq!(sink.tls.unhooked[unknown].load(Ordering::Relaxed), 1);
        assert_eq!(sink.tls.hooked_connections.load(Ordering::Relaxed), 0);
    }
}
