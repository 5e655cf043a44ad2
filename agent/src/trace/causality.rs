//! Who is whose parent, decided when a request starts, for services that carry no trace ids.
//!
//! Rules, first that applies:
//! 1. The request carries context (W3C, B3, Jaeger): the carried span is the parent, unless the
//!    local parent found by rule 2 or 3 received the very same span id (an uninstrumented proxy
//!    or service forwarded the header unchanged): that local parent is the more precise one.
//! 2. SERVER side, both ends on this node: the caller's CLIENT exchange on the mirrored
//!    connection with the same request ordinal is the parent (HTTP/1 answers in order).
//! 3. CLIENT side: the SERVER exchange this thread is handling is the parent (thread-per-request
//!    servers). When the thread handles several at once (event loops: nginx, Node.js, asyncio),
//!    the one whose request target the outgoing request repeats, or shares an id-like path
//!    segment with, if exactly one does (proxies forward the path; services forward ids). A thread
//!    handling nothing follows its creator (up to 5 creations back): a request handed to a new
//!    thread keeps its parent, provided the request was in flight when the thread was created.
//! 4. Otherwise no parent: a new trace. A wrong parent is worse than none; both are counted.
//!
//! With `--tcp-context` the kernel picks each request's ids before its first segment leaves
//! (decode::KernelContext): a CLIENT span takes the kernel's span id (the one the TCP option
//! carries to the next node), a new trace takes the kernel's trace id (the one the kernel carries
//! on for the thread's calls), and a SERVER request with neither header context nor a local
//! caller is the child of the span named in the peer's option (rule 1b). A CLIENT span whose
//! trace differs from the kernel's (event loops, work handed to new threads) is counted: its
//! remote callee will start a trace of its own.
//!
//! Rule 2 races on loopback: the callee can read (and its event reach the agent) before the
//! caller's send tracepoint fires, which is after sendmsg returns. A SERVER start that finds no
//! peer waits briefly as an orphan; when the caller's CLIENT start arrives it adopts it, and the
//! server span is re-parented before export (`adopted`). The same race skews the pair's times
//! (by microseconds, unless the later side was preempted before its tracepoint); the caller's
//! span is made to enclose its callee's (`TraceSink::pair_times`).

use foldhash::{HashMap, HashMapExt, HashSet};
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    conn::ConnInfo,
    decode::{ContextSource, KernelContext},
    protocol::http1::Head,
    trace::{
        context::{Carried, extract},
        exchange::{Identity, RequestStart},
        orphans::{Claim, Finished, Orphans, Pair, Started, Wait},
        route::is_id_like,
        span::IdSource,
    },
};

/// CLIENT exchanges wait this long for their callee's SERVER side to show up on this node.
const PEER_WAIT_NS: u64 = 30_000_000_000;
/// Bound on CLIENT exchanges waiting for a local callee (most callees are remote). When full,
/// the oldest waiting is forgotten for the newest: a node calling remote APIs at 57k/s keeps
/// each ~1.7 s (callees read far sooner), and a local call is never refused for want of room.
const MAX_PEERS: usize = 100_000;
/// A SERVER exchange still "in flight" after this long is forgotten (its end was missed).
const IN_FLIGHT_MAX_NS: u64 = 600_000_000_000;
/// Creations followed back from a thread to the request its ancestor handles.
const MAX_THREAD_HOPS: usize = 5;
/// Threads remembered with their creator (pruned by age).
const MAX_THREADS: usize = 100_000;
const THREAD_MAX_AGE_NS: u64 = 600_000_000_000;
/// How long a SERVER start without a peer waits for its caller's CLIENT start to show up.
const ORPHAN_WAIT_NS: u64 = 1_000_000_000;
/// The same wait counted in event time (the newest orphan's start), applied as orphans come: a
/// caller's event trails its callee's by the kernel's ordering skew (tens of microseconds on
/// loopback, see JOINED_LATE_NS), whatever the agent's own lag. With only the server traced
/// (`--pid`) no caller ever comes, and the tick's one-second sweep let the map hold up to
/// MAX_PEERS of them: 31 MiB of the agent's 94 at 57k req/s.
const ORPHAN_EVENT_WAIT_NS: u64 = 250_000_000;
/// How long after its response a pool thread's unparented CLIENT exchange waits for the wake
/// that hands its result to the requesting thread (FutureTask wakes its waiter right away).
const HANDBACK_WAIT_NS: u64 = 50_000_000;
/// A pool thread's CLIENT exchange without a response is given up after this long.
const HANDBACK_MAX_NS: u64 = 30_000_000_000;

#[derive(Debug, Default)]
pub struct LinkStats {
    pub by_context: AtomicU64,
    pub by_peer: AtomicU64,
    /// SERVER exchanges whose caller's event arrived just after theirs (loopback race).
    pub by_peer_late: AtomicU64,
    pub by_thread: AtomicU64,
    pub by_target: AtomicU64,
    /// CLIENT spans parented through the thread that created theirs.
    pub by_thread_creator: AtomicU64,
    /// CLIENT spans from a thread handling nothing, parented by the only request their process
    /// was handling (work handed to a pool thread: gRPC servers, executors).
    pub by_sole_request: AtomicU64,
    /// CLIENT spans of a pool thread (JVM) parented by the request whose thread the pool
    /// thread woke right after the exchange: the task's result handed back to its submitter.
    pub by_handback: AtomicU64,
    /// CLIENT exchanges whose thread handled several requests, none clearly theirs.
    pub ambiguous: AtomicU64,
    /// CLIENT exchanges made while their thread handled no request.
    pub unlinked_clients: AtomicU64,
    /// SERVER exchanges that start a trace.
    pub roots: AtomicU64,
    /// SERVER exchanges parented by the context a peer's TCP option carried.
    pub by_tcp_option: AtomicU64,
    /// CLIENT exchanges whose trace is not the one the kernel put in their TCP option.
    pub tcp_context_mismatch: AtomicU64,
    /// CLIENT exchanges forgotten before PEER_WAIT_NS to make room for newer ones (MAX_PEERS
    /// waiting: a callee of theirs on this node starting later would miss its parent).
    pub peers_evicted: AtomicU64,
    /// SERVER exchanges that could not wait for a late caller (`orphans`' bounds: 100 000
    /// waiting, or as many connections remembered): a caller of theirs on this node seen later
    /// would miss them.
    pub callers_unawaited: AtomicU64,
}

#[derive(Debug, Clone)]
struct InFlight {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    carried: Option<[u8; 8]>,
    target: String,
    started_ns: u64,
}

/// An unparented CLIENT exchange of a pool thread, waiting to see which request's thread it
/// hands its result to. Its spans (and its callees') are held until then (`provisional`).
#[derive(Debug, Clone, Copy)]
struct Handback {
    span_id: [u8; 8],
    trace_id: [u8; 16],
    started_ns: u64,
    ended_ns: Option<u64>,
}

/// Who served a CLIENT span on this node (its times, the service graph).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Callee {
    pub pid: u32,
    pub server_span: [u8; 8],
    /// When the server side's request started (the kernel's clock, as `RequestStart::ts_ns`).
    pub server_start_ns: u64,
    /// The server side's span, once it finished.
    pub server_done: Option<ServerDone>,
}

/// A finished SERVER span, as its caller's span and edge need it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerDone {
    pub seconds: f64,
    pub end_unix_ns: u64,
}

/// A SERVER span's CLIENT span on this node: still running, or ended (its end) before the
/// server span did.
#[derive(Debug, Clone, Copy)]
enum Caller {
    Running([u8; 8]),
    Ended(u64),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Orphan {
    pid: u32,
    span_id: [u8; 8],
    trace_id: [u8; 16],
    started_ns: u64,
    /// Counted as a root (not parented by a TCP option) until adopted.
    root: bool,
    /// Parented by carried context already: a late caller only names the service-graph edge.
    graph_only: bool,
}

impl Started for Orphan {
    fn started_ns(&self) -> u64 {
        self.started_ns
    }
}

/// What causality needs of a request, whatever its protocol: never a protocol's own types.
#[derive(Debug, Clone)]
pub struct RequestView<'a> {
    /// The request target (HTTP path and query), for event-loop affinity; "" when none.
    pub target: &'a str,
    /// Context the request carries (headers, metadata).
    pub carried: Option<Carried>,
    /// A local callee may pair with this CLIENT request by ordinal (HTTP). Database calls pair
    /// only when database SERVER spans are on: otherwise nobody would ever claim them.
    pub pairs_with_peer: bool,
    /// The ordinal is the same on both ends even when joined mid-stream (HTTP/2 stream ids),
    /// unlike a count of requests seen since attach (HTTP/1).
    pub ordinals_absolute: bool,
}

impl<'a> RequestView<'a> {
    pub fn http(head: &'a Head) -> Self {
        Self {
            target: target(head),
            carried: extract(head),
            pairs_with_peer: true,
            ordinals_absolute: false,
        }
    }
}

/// One request on one connection, named from the client side: (client local, client remote,
/// request ordinal).
/// (one end, the other end, request ordinal on the connection). Hashed from a compact form:
/// the derived hash of two `SocketAddr`s (variant, address, port, and for IPv6 flow and scope)
/// made the map inserts a thirtieth of the tracing sink's instructions per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestKey(SocketAddr, SocketAddr, u64);

impl std::hash::Hash for RequestKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(addr_bits(&self.0));
        h.write_u64(addr_bits(&self.1));
        h.write_u64(self.2);
    }
}

/// An address folded into 64 bits for hashing (equality still compares the whole address).
pub(super) fn addr_bits(a: &SocketAddr) -> u64 {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => u64::from(v4.to_bits()),
        std::net::IpAddr::V6(v6) => {
            let b = v6.to_bits();
            (b as u64) ^ ((b >> 64) as u64).rotate_left(17)
        }
    };
    ip.rotate_left(16) ^ u64::from(a.port())
}

/// The ordinal slot of a connection joined mid-stream, where each side may have seen a different
/// number of requests: only its latest CLIENT request waits there, and the callee takes it if it
/// started no later (requests on one HTTP/1 connection follow each other, so the caller's latest
/// request is the one the callee is reading).
const JOINED: u64 = u64::MAX;

/// How far apart a caller's and a callee's starts of one request on a joined connection may be
/// when the callee's event reached the agent first (measured: tens of microseconds on loopback).
const JOINED_LATE_NS: u64 = 1_000_000;

pub struct Linker {
    ids: Box<dyn IdSource + Send>,
    /// (pid, tid) -> SERVER exchanges that thread is handling.
    /// Almost always one: inline, not an allocation per request.
    in_flight: HashMap<(u32, u32), smallvec::SmallVec<[InFlight; 1]>>,
    /// (client local, client remote, ordinal) -> the CLIENT exchange's identity and start.
    peers: HashMap<RequestKey, (Identity, u64)>,
    /// Peers in the order they came (key, start): expiry by event time and eviction of the
    /// oldest when full. Entries already taken are skipped when they reach the front.
    peer_order: VecDeque<(RequestKey, u64)>,
    /// SERVER starts that found no peer, by connection and ordinal (`trace::orphans`).
    orphans: Orphans<Orphan>,
    /// A trace started by an orphan that was then adopted -> the trace it joined, and when.
    /// Descendants that started under the orphan's own trace follow it at finalize.
    aliases: HashMap<[u8; 16], ([u8; 16], u64)>,
    /// (pid, thread) -> (the thread that created it, when).
    creators: HashMap<(u32, u32), (u32, u64)>,
    /// Span id -> (trace id, parent span id, parent is remote) adopted after the span started.
    adopted: HashMap<[u8; 8], ([u8; 16], [u8; 8], bool)>,
    /// Processes of a pool runtime (they report futex wakes): (pid, pool thread) -> the
    /// unparented CLIENT exchange that thread made last.
    pools: HashSet<u32>,
    handbacks: HashMap<(u32, u32), Handback>,
    /// Traces started by a waiting handback: their spans are held until it is settled.
    provisional: HashSet<[u8; 16]>,
    /// Provisional traces settled since the sink last asked (`take_settled`).
    settled: Vec<[u8; 16]>,
    /// CLIENT span -> the local SERVER span that answered it; SERVER span -> its CLIENT span.
    callees: HashMap<[u8; 8], Callee>,
    callers: HashMap<[u8; 8], Caller>,
    /// Finished SERVER spans no caller has claimed yet.
    finished_orphans: Finished<ServerDone>,
    /// Trace id -> the `sampled` flag it arrived with (parent-based sampling).
    carried_flags: HashMap<[u8; 16], bool>,
    pub stats: std::sync::Arc<LinkStats>,
}

fn target(head: &Head) -> &str {
    head.target()
}

fn path(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

/// 2: same path; 1: shares an id-like path segment; 0: unrelated.
fn affinity(incoming: &str, outgoing: &str) -> u8 {
    let (inc, out) = (path(incoming), path(outgoing));
    if inc == out {
        return 2;
    }
    let ids: Vec<&str> = inc.split('/').filter(|s| is_id_like(s)).collect();
    if out.split('/').any(|s| ids.contains(&s)) {
        1
    } else {
        0
    }
}

/// The linker's counters: its thread alone writes them (`crate::counter`).
fn bump(c: &AtomicU64) {
    crate::counter::add(c, 1);
}

impl Linker {
    pub fn new(ids: Box<dyn IdSource + Send>) -> Self {
        Self {
            ids,
            in_flight: HashMap::new(),
            peers: HashMap::new(),
            peer_order: VecDeque::new(),
            orphans: Orphans::new(),
            aliases: HashMap::new(),
            creators: HashMap::new(),
            adopted: HashMap::new(),
            pools: Default::default(),
            handbacks: HashMap::new(),
            provisional: Default::default(),
            settled: Vec::new(),
            callees: HashMap::new(),
            callers: HashMap::new(),
            finished_orphans: Finished::new(ORPHAN_EVENT_WAIT_NS, MAX_PEERS),
            carried_flags: HashMap::new(),
            stats: std::sync::Arc::new(LinkStats::default()),
        }
    }

    fn carried(&mut self, c: Option<Carried>) -> Option<Identity> {
        let c = c?;
        if self.carried_flags.len() >= MAX_PEERS {
            self.carried_flags.clear();
        }
        self.carried_flags.insert(c.trace_id, c.sampled);
        Some(Identity {
            trace_id: c.trace_id,
            span_id: self.ids.span_id(),
            parent_span_id: Some(c.span_id),
            parent_is_remote: true,
            trace_state: c.trace_state,
            carried: Some(c.span_id),
            local_parent: false,
            awaits_caller: false,
            carried_sampled: Some(c.sampled),
        })
    }

    /// A new trace: under the kernel's trace id when it picked one (its thread's later calls
    /// carry that id to other nodes).
    fn root(&mut self, kernel: Option<KernelContext>) -> Identity {
        Identity {
            trace_id: match kernel {
                Some(k) => k.trace_id,
                None => self.ids.trace_id(),
            },
            span_id: self.ids.span_id(),
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            carried: None,
            local_parent: false,
            awaits_caller: false,
            carried_sampled: None,
        }
    }

    /// A child of `parent`, a span of this node unless it came in a TCP option (`local`).
    fn child_of(
        &mut self,
        trace_id: [u8; 16],
        parent: [u8; 8],
        remote: bool,
        carried: Option<[u8; 8]>,
        local: bool,
    ) -> Identity {
        Identity {
            trace_id,
            span_id: self.ids.span_id(),
            parent_span_id: Some(parent),
            parent_is_remote: remote,
            trace_state: String::new(),
            carried,
            local_parent: local,
            awaits_caller: false,
            carried_sampled: None,
        }
    }

    /// The `sampled` flag a trace arrived with on this node, if it carried context.
    pub fn carried_flag(&self, trace_id: &[u8; 16]) -> Option<bool> {
        self.carried_flags.get(trace_id).copied()
    }

    /// An HTTP/1 request arrived on the server side of `conn`.
    pub fn server_start(
        &mut self,
        conn: &ConnInfo,
        head: &Head,
        st: RequestStart,
        kernel: Option<KernelContext>,
    ) -> Identity {
        self.server_request(conn, RequestView::http(head), st, kernel)
    }

    /// A request arrived on the server side of `conn`.
    pub fn server_request(
        &mut self,
        conn: &ConnInfo,
        view: RequestView<'_>,
        st: RequestStart,
        kernel: Option<KernelContext>,
    ) -> Identity {
        let joined = conn.midstream && !view.ordinals_absolute;
        let peer = if joined {
            let key = RequestKey(conn.remote, conn.local, JOINED);
            match self.peers.get(&key) {
                Some((_, started)) if *started <= st.ts_ns => self.peers.remove(&key),
                _ => None,
            }
        } else {
            self.peers
                .remove(&RequestKey(conn.remote, conn.local, st.ordinal))
        };
        let carried = self.carried(view.carried);
        let caller_span = peer.as_ref().map(|(caller, _)| caller.span_id);
        let identity = match (carried, peer) {
            // The caller forwarded the context it received (a proxy: its CLIENT span hangs off a
            // local parent), so it is the closer parent. When the caller's CLIENT span hangs off
            // the carried span itself, the caller is instrumented and put its own span in the
            // header: that span is the parent, as across nodes.
            (Some(c), Some((caller, _)))
                if caller.carried == c.carried && caller.parent_span_id != c.carried =>
            {
                bump(&self.stats.by_peer);
                self.child_of(caller.trace_id, caller.span_id, true, c.carried, true)
            }
            (Some(mut c), peer) => {
                bump(&self.stats.by_context);
                if peer.is_none() {
                    // The caller's event may still come: it names the edge, not the parent.
                    c.awaits_caller = self.await_caller(conn, st, joined, &c, false, true);
                }
                c
            }
            (None, Some((caller, _))) => {
                bump(&self.stats.by_peer);
                self.child_of(caller.trace_id, caller.span_id, true, None, true)
            }
            (None, None) => {
                let option = kernel.filter(|k| k.source == ContextSource::Option);
                let mut identity = match option {
                    Some(o) => {
                        bump(&self.stats.by_tcp_option);
                        self.child_of(o.trace_id, o.span_id, true, None, false)
                    }
                    None => {
                        bump(&self.stats.roots);
                        self.root(kernel)
                    }
                };
                // A local caller's event may still come: it is the more precise parent. On a
                // joined connection only the latest callee request waits (see client_request).
                identity.awaits_caller =
                    self.await_caller(conn, st, joined, &identity, option.is_none(), false);
                identity
            }
        };
        if let Some(caller) = caller_span {
            self.paired(caller, conn.pid, identity.span_id, st.ts_ns);
        }
        self.in_flight
            .entry((conn.pid, st.tid))
            .or_default()
            .push(InFlight {
                trace_id: identity.trace_id,
                span_id: identity.span_id,
                carried: identity.carried,
                target: view.target.to_string(),
                started_ns: st.ts_ns,
            });
        identity
    }

    /// The server-side exchange `span_id`, started on `tid` of `pid`, is over.
    pub fn server_end(&mut self, pid: u32, tid: u32, span_id: [u8; 8]) {
        if let Some(list) = self.in_flight.get_mut(&(pid, tid)) {
            // Nothing reads the list's order. One thread may hold many: a gRPC server reads
            // every connection's streams on its poller thread (160 at h2load's 16 x 10), and
            // a `retain` over them per end was a tenth of the pipeline.
            if let Some(at) = list.iter().position(|f| f.span_id == span_id) {
                list.swap_remove(at);
            }
            if list.is_empty() {
                self.in_flight.remove(&(pid, tid));
            }
        }
    }

    /// An HTTP/1 request left from the client side of `conn`.
    pub fn client_start(
        &mut self,
        conn: &ConnInfo,
        head: &Head,
        st: RequestStart,
        kernel: Option<KernelContext>,
    ) -> Identity {
        self.client_request(conn, RequestView::http(head), st, kernel)
    }

    /// A request left from the client side of `conn`.
    pub fn client_request(
        &mut self,
        conn: &ConnInfo,
        view: RequestView<'_>,
        st: RequestStart,
        kernel: Option<KernelContext>,
    ) -> Identity {
        let carried = self.carried(view.carried);
        let has_header = carried.is_some();
        let local = self.parent_on_thread(conn.pid, st.tid, view.target);
        let kernel = kernel.filter(|k| k.source == ContextSource::Kernel);
        let mut identity = match (carried, local) {
            // The header was forwarded unchanged from the request this thread is handling.
            (Some(c), Some(p)) if p.carried == c.carried => {
                self.child_of(p.trace_id, p.span_id, false, c.carried, true)
            }
            (Some(c), _) => {
                bump(&self.stats.by_context);
                c
            }
            (None, Some(p)) => self.child_of(p.trace_id, p.span_id, false, None, true),
            (None, None) => self.root(kernel),
        };
        // A pool thread's call made for nobody it handles: which request's thread it wakes
        // when done will tell (see `woke`). Its earlier call, if still waiting, is settled.
        if self.pools.contains(&conn.pid) {
            let previous = if identity.parent_span_id.is_none()
                && !has_header
                && !self.in_flight.contains_key(&(conn.pid, st.tid))
                && self.handbacks.len() < MAX_PEERS
            {
                self.provisional.insert(identity.trace_id);
                self.handbacks.insert(
                    (conn.pid, st.tid),
                    Handback {
                        span_id: identity.span_id,
                        trace_id: identity.trace_id,
                        started_ns: st.ts_ns,
                        ended_ns: None,
                    },
                )
            } else {
                self.handbacks.remove(&(conn.pid, st.tid))
            };
            if let Some(h) = previous {
                self.settle(h.trace_id);
            }
        }
        if let Some(k) = kernel {
            identity.span_id = k.span_id;
            // Header context travels with the request and wins on the other side anyway.
            if !has_header && identity.trace_id != k.trace_id {
                bump(&self.stats.tcp_context_mismatch);
            }
        }
        if !view.pairs_with_peer {
            return identity;
        }
        if conn.midstream && !view.ordinals_absolute {
            // The callee's event came first (on loopback the receiver can read before the
            // sender's tracepoint fires): its latest request is this one if the two started
            // within JOINED_LATE_NS of each other. An earlier request of the callee's is a full
            // round trip older than this one.
            let late = |o: &Orphan| o.started_ns.abs_diff(st.ts_ns) <= JOINED_LATE_NS;
            let pair = Pair(conn.local, conn.remote);
            match self.orphans.claim(&pair, JOINED, st.ts_ns, late) {
                Claim::Taken(orphan) => {
                    self.adopt(orphan, identity.trace_id, identity.span_id, st.ts_ns)
                }
                Claim::Wait => {
                    let key = RequestKey(conn.local, conn.remote, JOINED);
                    self.await_callee(key, &identity, st.ts_ns);
                }
                Claim::CalleeAbsent => {}
            }
            return identity;
        }
        let pair = Pair(conn.local, conn.remote);
        match self.orphans.claim(&pair, st.ordinal, st.ts_ns, |_| true) {
            Claim::Taken(orphan) => {
                self.adopt(orphan, identity.trace_id, identity.span_id, st.ts_ns)
            }
            Claim::Wait => {
                let key = RequestKey(conn.local, conn.remote, st.ordinal);
                self.await_callee(key, &identity, st.ts_ns);
            }
            Claim::CalleeAbsent => {}
        }
        identity
    }

    /// A CLIENT exchange waits for its callee's SERVER start on this node. Those that waited
    /// PEER_WAIT_NS in event time are forgotten as new ones come; when MAX_PEERS wait, the
    /// oldest makes room (counted). Either way its connection learns that a request waited in
    /// vain (`trace::orphans`: after a run of them its requests stop waiting).
    fn await_callee(&mut self, key: RequestKey, identity: &Identity, ts_ns: u64) {
        let live = |peers: &HashMap<RequestKey, (Identity, u64)>, k: &RequestKey, s: u64| {
            peers.get(k).is_some_and(|&(_, t)| t == s)
        };
        while let Some(&(k, started)) = self.peer_order.front() {
            let expired = ts_ns.saturating_sub(started) >= PEER_WAIT_NS;
            let is_live = live(&self.peers, &k, started);
            if is_live && !expired && self.peers.len() < MAX_PEERS {
                break;
            }
            self.peer_order.pop_front();
            if is_live {
                self.peers.remove(&k);
                self.orphans.uncalled(Pair(k.0, k.1), started);
                if !expired {
                    bump(&self.stats.peers_evicted);
                }
            }
        }
        // Taken entries behind a long-waiting one are only dropped when they reach the front:
        // compact before the queue outgrows its map by more than the bound.
        if self.peer_order.len() >= 2 * MAX_PEERS {
            let peers = &self.peers;
            self.peer_order.retain(|(k, s)| live(peers, k, *s));
        }
        self.peer_order.push_back((key, ts_ns));
        // A joined connection's requests share one key: the one replaced waited in vain.
        if let Some((_, replaced)) = self.peers.insert(key, (identity.clone(), ts_ns)) {
            self.orphans.uncalled(Pair(key.0, key.1), replaced);
        }
    }

    /// A SERVER request with no local caller yet: one may still show up (its event can reach
    /// the agent after the callee's). Whether it waits (not when its connection's client side
    /// showed no request for a while, nor when too many wait: `trace::orphans`).
    fn await_caller(
        &mut self,
        conn: &ConnInfo,
        st: RequestStart,
        joined: bool,
        identity: &Identity,
        root: bool,
        graph_only: bool,
    ) -> bool {
        let ordinal = if joined { JOINED } else { st.ordinal };
        let wait = self.orphans.wait(
            Pair(conn.remote, conn.local),
            ordinal,
            Orphan {
                pid: conn.pid,
                span_id: identity.span_id,
                trace_id: identity.trace_id,
                started_ns: st.ts_ns,
                root,
                graph_only,
            },
            ORPHAN_EVENT_WAIT_NS,
        );
        match wait {
            Wait::Waits => true,
            Wait::CallerAbsent => false,
            Wait::Full => {
                bump(&self.stats.callers_unawaited);
                false
            }
        }
    }

    /// The callee `server_span` started a trace of its own before its caller showed up: move it
    /// (and what it is still handling) under the caller.
    fn adopt(&mut self, orphan: Orphan, trace_id: [u8; 16], parent: [u8; 8], now_ns: u64) {
        let (server_span, own_trace) = (orphan.span_id, orphan.trace_id);
        self.paired(parent, orphan.pid, server_span, orphan.started_ns);
        if orphan.graph_only {
            return;
        }
        bump(&self.stats.by_peer_late);
        if orphan.root {
            self.stats.roots.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.stats.by_tcp_option.fetch_sub(1, Ordering::Relaxed);
        }
        self.move_trace(own_trace, trace_id, now_ns);
        self.adopted.insert(server_span, (trace_id, parent, true));
    }

    /// Everything still running under `own_trace` moves to `trace_id`; what finishes later
    /// follows through the alias.
    fn move_trace(&mut self, own_trace: [u8; 16], trace_id: [u8; 16], now_ns: u64) {
        for list in self.in_flight.values_mut() {
            for f in list.iter_mut().filter(|f| f.trace_id == own_trace) {
                f.trace_id = trace_id;
            }
        }
        for (identity, _) in self
            .peers
            .values_mut()
            .filter(|(i, _)| i.trace_id == own_trace)
        {
            identity.trace_id = trace_id;
        }
        for h in self.handbacks.values_mut() {
            if h.trace_id == own_trace {
                h.trace_id = trace_id;
            }
        }
        if own_trace != trace_id && self.aliases.len() < MAX_PEERS {
            self.aliases.insert(own_trace, (trace_id, now_ns));
        }
    }

    fn paired(
        &mut self,
        client_span: [u8; 8],
        pid: u32,
        server_span: [u8; 8],
        server_start_ns: u64,
    ) {
        if self.callees.len() >= MAX_PEERS || self.callers.len() >= MAX_PEERS {
            // CLIENT spans that never finished (evicted connections) must not pile up, nor
            // SERVER spans that never finished after their caller did.
            self.callees.clear();
            self.callers.clear();
        }
        let finished = self.finished_orphans.take(&server_span);
        self.callees.insert(
            client_span,
            Callee {
                pid,
                server_span,
                server_start_ns,
                server_done: finished,
            },
        );
        if finished.is_none() {
            self.callers
                .insert(server_span, Caller::Running(client_span));
        }
    }

    /// A SERVER span finished. If its caller's span on this node ended first, this one ends no
    /// later: on loopback the caller can read the response (and its event reach the agent)
    /// before the callee's send tracepoint fires, which is after sendmsg returns, so the
    /// callee's measured end is late. Otherwise what the caller's span needs of it is kept;
    /// one without a caller yet (`orphan`: a local root) may still be adopted by a caller whose
    /// event comes late, so it is kept until then, counted from `ended_ns` (event time: reading
    /// the clock for every such span was 1.2% of the pipeline benchmark).
    pub fn server_finished(
        &mut self,
        span: &mut crate::trace::span::SpanRecord,
        orphan: bool,
        ended_ns: u64,
    ) {
        let caller = self.callers.remove(&span.span_id);
        if let Some(Caller::Ended(client_end)) = caller {
            span.end_unix_ns = span.end_unix_ns.min(client_end).max(span.start_unix_ns);
            return;
        }
        let done = ServerDone {
            seconds: span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9,
            end_unix_ns: span.end_unix_ns,
        };
        match caller {
            Some(Caller::Running(client)) => {
                if let Some(c) = self.callees.get_mut(&client) {
                    c.server_done = Some(done);
                }
            }
            _ if orphan => self.finished_orphans.insert(span.span_id, done, ended_ns),
            _ => {}
        }
    }

    /// Who answered this CLIENT span on this node, if anyone (asked once, when it ended at
    /// `end_unix_ns`).
    pub fn take_callee(&mut self, client_span: [u8; 8], end_unix_ns: u64) -> Option<Callee> {
        let c = self.callees.remove(&client_span)?;
        if c.server_done.is_none() {
            self.callers
                .insert(c.server_span, Caller::Ended(end_unix_ns));
        }
        Some(c)
    }

    /// The CLIENT exchange `span_id` made on `tid` of `pid` has its response.
    pub fn client_end(&mut self, pid: u32, tid: u32, span_id: [u8; 8], now_ns: u64) {
        if let Some(h) = self.handbacks.get_mut(&(pid, tid))
            && h.span_id == span_id
        {
            h.ended_ns = Some(now_ns);
        }
    }

    /// Thread `waker` of a pool runtime's process `pid` woke `wakee` through a futex. The first
    /// such wake of a request-handling thread after a pool thread's unparented CLIENT exchange
    /// ended is the task's result handed to the thread that waits for it (an executor's
    /// `Future.get`): that thread's request is the exchange's parent. A wake of a thread handling
    /// nothing (another pool thread: the queue's signal) is passed over; one handling several
    /// requests settles nothing (no guess).
    pub fn woke(&mut self, pid: u32, waker: u32, wakee: u32, ts_ns: u64) {
        if self.pools.insert(pid) {
            tracing::debug!(pid, "process reports futex wakes: pool handbacks followed");
        }
        let Some(h) = self.handbacks.get(&(pid, waker)).copied() else {
            return;
        };
        let Some(ended) = h.ended_ns.filter(|&e| e <= ts_ns) else {
            return;
        };
        let Some(list) = self.in_flight.get(&(pid, wakee)).filter(|l| !l.is_empty()) else {
            return;
        };
        self.handbacks.remove(&(pid, waker));
        let before: Vec<&InFlight> = list
            .iter()
            .filter(|f| f.started_ns <= h.started_ns)
            .collect();
        if let [r] = before.as_slice()
            && ts_ns - ended <= HANDBACK_WAIT_NS
        {
            let (trace_id, parent) = (r.trace_id, r.span_id);
            bump(&self.stats.by_handback);
            self.stats.unlinked_clients.fetch_sub(1, Ordering::Relaxed);
            self.move_trace(h.trace_id, trace_id, ts_ns);
            self.adopted.insert(h.span_id, (trace_id, parent, false));
        }
        self.settle(h.trace_id);
    }

    /// Gives every waiting handback up (the agent is stopping).
    pub fn settle_all(&mut self) {
        self.handbacks.clear();
        self.settled.extend(self.provisional.drain());
    }

    fn settle(&mut self, trace_id: [u8; 16]) {
        if self.provisional.remove(&trace_id) {
            self.settled.push(trace_id);
        }
    }

    /// Whether spans of this trace wait for a handback to be settled.
    pub fn is_provisional(&self, trace_id: &[u8; 16]) -> bool {
        !self.provisional.is_empty() && self.provisional.contains(trace_id)
    }

    /// Provisional traces settled since the last call: their held spans may go (through
    /// `finalize_span`).
    pub fn take_settled(&mut self) -> Vec<[u8; 16]> {
        std::mem::take(&mut self.settled)
    }

    /// Applies a late adoption to a finished exchange's identity.
    pub fn finalize(&mut self, identity: &mut Identity) {
        let adopted = self.finalize_ids(
            &mut identity.trace_id,
            identity.span_id,
            &mut identity.parent_span_id,
            &mut identity.parent_is_remote,
        );
        identity.local_parent |= adopted;
    }

    /// `finalize` for a span already built (held while its trace was provisional); whether it
    /// was adopted by a local parent.
    pub fn finalize_span(&mut self, span: &mut crate::trace::span::SpanRecord) -> bool {
        self.finalize_ids(
            &mut span.trace_id,
            span.span_id,
            &mut span.parent_span_id,
            &mut span.parent_is_remote,
        )
    }

    fn finalize_ids(
        &mut self,
        trace: &mut [u8; 16],
        span_id: [u8; 8],
        parent_span: &mut Option<[u8; 8]>,
        remote: &mut bool,
    ) -> bool {
        let adopted = self.adopted.remove(&span_id);
        if let Some((trace_id, parent, is_remote)) = adopted {
            *trace = trace_id;
            *parent_span = Some(parent);
            *remote = is_remote;
        }
        // A descendant that started before its ancestor was adopted (chains are short; bounded).
        for _ in 0..8 {
            match self.aliases.get(trace) {
                Some((to, _)) if to != trace => *trace = *to,
                _ => break,
            }
        }
        adopted.is_some()
    }

    /// Thread `parent_tid` of `pid` created `child_tid` at `ts_ns`.
    pub fn thread_created(&mut self, pid: u32, parent_tid: u32, child_tid: u32, ts_ns: u64) {
        if parent_tid != child_tid && self.creators.len() < MAX_THREADS {
            self.creators.insert((pid, child_tid), (parent_tid, ts_ns));
        }
    }

    /// The request a thread's creator (or its creator's creator...) was handling when it created
    /// the thread: one candidate only, or none.
    fn via_creator(&self, pid: u32, tid: u32) -> Option<InFlight> {
        let mut tid = tid;
        for _ in 0..MAX_THREAD_HOPS {
            let &(creator, created_ns) = self.creators.get(&(pid, tid))?;
            if let Some(list) = self.in_flight.get(&(pid, creator)) {
                let before: Vec<&InFlight> =
                    list.iter().filter(|f| f.started_ns <= created_ns).collect();
                return match before.as_slice() {
                    [one] => Some((*one).clone()),
                    _ => None,
                };
            }
            tid = creator;
        }
        None
    }

    fn parent_on_thread(&mut self, pid: u32, tid: u32, outgoing: &str) -> Option<InFlight> {
        let Some(list) = self.in_flight.get(&(pid, tid)).filter(|l| !l.is_empty()) else {
            if let Some(p) = self.via_creator(pid, tid) {
                bump(&self.stats.by_thread_creator);
                return Some(p);
            }
            // A pool thread: the request was read by another thread (a gRPC server's poller,
            // an executor's acceptor). Only when the process handles exactly one request is
            // it clearly the one; with several, none is chosen.
            let mut handled = self
                .in_flight
                .iter()
                .filter(|((p, _), _)| *p == pid)
                .flat_map(|(_, l)| l.iter());
            if let (Some(only), None) = (handled.next(), handled.next()) {
                let only = only.clone();
                bump(&self.stats.by_sole_request);
                return Some(only);
            }
            bump(&self.stats.unlinked_clients);
            return None;
        };
        if let [only] = list.as_slice() {
            bump(&self.stats.by_thread);
            return Some(only.clone());
        }
        let best = list
            .iter()
            .map(|f| affinity(&f.target, outgoing))
            .max()
            .unwrap_or(0);
        let mut matching = list
            .iter()
            .filter(|f| best > 0 && affinity(&f.target, outgoing) == best);
        match (matching.next(), matching.next()) {
            (Some(one), None) => {
                bump(&self.stats.by_target);
                Some(one.clone())
            }
            _ => {
                bump(&self.stats.ambiguous);
                None
            }
        }
    }

    /// Forgets CLIENT exchanges whose callee never showed up and stale in-flight entries.
    pub fn expire(&mut self, now_ns: u64) {
        self.peers
            .retain(|_, (_, ts)| now_ns.saturating_sub(*ts) < PEER_WAIT_NS);
        let peers = &self.peers;
        self.peer_order
            .retain(|(k, s)| peers.get(k).is_some_and(|&(_, t)| t == *s));
        self.orphans.expire(now_ns, ORPHAN_WAIT_NS);
        self.aliases
            .retain(|_, (_, ts)| now_ns.saturating_sub(*ts) < IN_FLIGHT_MAX_NS);
        self.finished_orphans.age(now_ns);
        self.creators
            .retain(|_, (_, ts)| now_ns.saturating_sub(*ts) < THREAD_MAX_AGE_NS);
        // An adoption whose exchange never finished (evicted) must not pile up.
        if self.adopted.len() > MAX_PEERS {
            self.adopted.clear();
        }
        let expired: Vec<(u32, u32)> = self
            .handbacks
            .iter()
            .filter(|(_, h)| match h.ended_ns {
                Some(e) => now_ns.saturating_sub(e) > HANDBACK_WAIT_NS,
                None => now_ns.saturating_sub(h.started_ns) > HANDBACK_MAX_NS,
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(h) = self.handbacks.remove(&key) {
                self.settle(h.trace_id);
            }
        }
        self.in_flight.retain(|_, list| {
            list.retain(|f| now_ns.saturating_sub(f.started_ns) < IN_FLIGHT_MAX_NS);
            !list.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decode::{ConnKey, Role},
        protocol::http1::{HeadParse, parse_request},
    };

    struct Seq(u8);
    impl IdSource for Seq {
        fn trace_id(&mut self) -> [u8; 16] {
            self.0 += 1;
            [self.0; 16]
        }
        fn span_id(&mut self) -> [u8; 8] {
            self.0 += 1;
            [self.0; 8]
        }
    }

    fn head(raw: &str) -> Head {
        match parse_request(raw.as_bytes()) {
            HeadParse::Parsed(h, _) => h,
            other => panic!("{other:?}"),
        }
    }

    fn conn(pid: u32, local: &str, remote: &str, role: Role) -> ConnInfo {
        ConnInfo {
            key: ConnKey {
                sk: 1,
                generation: 1,
            },
            pid,
            comm: "x".into(),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            role,
            protocol: 1,
            midstream: false,
            tls: false,
        }
    }

    fn st(tid: u32, ordinal: u64) -> RequestStart {
        RequestStart {
            tid,
            ts_ns: 1,
            ordinal,
        }
    }

    #[test]
    fn a_chain_on_one_node_is_one_trace() {
        let mut l = Linker::new(Box::new(Seq(0)));
        // proxy (pid 1) accepts /chain/7 on thread 10, calls service (pid 2) on the same thread.
        let front = conn(1, "127.0.0.1:80", "127.0.0.1:50000", Role::Server);
        let s1 = l.server_start(
            &front,
            &head("GET /chain/7 HTTP/1.1\r\n\r\n"),
            st(10, 0),
            None,
        );
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let c1 = l.client_start(&up, &head("GET /chain/7 HTTP/1.1\r\n\r\n"), st(10, 0), None);
        assert_eq!(
            (c1.trace_id, c1.parent_span_id),
            (s1.trace_id, Some(s1.span_id))
        );
        // the service sees the mirrored connection.
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let s2 = l.server_start(
            &svc,
            &head("GET /chain/7 HTTP/1.1\r\n\r\n"),
            st(20, 0),
            None,
        );
        assert_eq!(
            (s2.trace_id, s2.parent_span_id),
            (s1.trace_id, Some(c1.span_id))
        );
        assert!(s2.parent_is_remote);
        assert_eq!(l.stats.by_thread.load(Ordering::Relaxed), 1);
        assert_eq!(l.stats.by_peer.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn ordinals_pair_requests_on_a_keep_alive_connection() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let a = l.client_start(&up, &head("GET /a HTTP/1.1\r\n\r\n"), st(1, 0), None);
        let b = l.client_start(&up, &head("GET /b HTTP/1.1\r\n\r\n"), st(1, 1), None);
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let sb = l.server_start(&svc, &head("GET /b HTTP/1.1\r\n\r\n"), st(2, 1), None);
        let sa = l.server_start(&svc, &head("GET /a HTTP/1.1\r\n\r\n"), st(2, 0), None);
        assert_eq!(sa.parent_span_id, Some(a.span_id));
        assert_eq!(sb.parent_span_id, Some(b.span_id));
    }

    #[test]
    fn a_connection_joined_mid_stream_pairs_the_callers_latest_request() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let at = |tid, ordinal, ts_ns| RequestStart {
            tid,
            ts_ns,
            ordinal,
        };
        let mut up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let mut svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        up.midstream = true;
        svc.midstream = true;
        // The caller's side saw one request more than the callee's (its ordinals are ahead).
        let _lost = l.client_start(&up, &head("GET /a HTTP/1.1\r\n\r\n"), at(1, 0, 10), None);
        let b = l.client_start(&up, &head("GET /b HTTP/1.1\r\n\r\n"), at(1, 1, 20), None);
        let sb = l.server_start(&svc, &head("GET /b HTTP/1.1\r\n\r\n"), at(2, 0, 21), None);
        assert_eq!(sb.parent_span_id, Some(b.span_id));
        // A request the caller was never seen making is not given the previous one's span.
        let sc = l.server_start(&svc, &head("GET /c HTTP/1.1\r\n\r\n"), at(2, 1, 30), None);
        assert_eq!(sc.parent_span_id, None);
        // Nor is one the callee started before the caller's request (another connection's).
        let _d = l.client_start(&up, &head("GET /d HTTP/1.1\r\n\r\n"), at(1, 2, 50), None);
        let se = l.server_start(&svc, &head("GET /e HTTP/1.1\r\n\r\n"), at(2, 2, 40), None);
        assert_eq!(se.parent_span_id, None);
    }

    #[test]
    fn a_joined_callee_whose_event_came_first_is_adopted_by_its_caller() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let at = |tid, ordinal, ts_ns| RequestStart {
            tid,
            ts_ns,
            ordinal,
        };
        let mut up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let mut svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        up.midstream = true;
        svc.midstream = true;
        // The callee's event first, 20 µs before the caller's start.
        let s = l.server_start(
            &svc,
            &head("GET /a HTTP/1.1\r\n\r\n"),
            at(2, 0, 1_000_000),
            None,
        );
        assert_eq!(s.parent_span_id, None);
        let c = l.client_start(
            &up,
            &head("GET /a HTTP/1.1\r\n\r\n"),
            at(1, 5, 1_020_000),
            None,
        );
        let mut adopted = s.clone();
        l.finalize(&mut adopted);
        assert_eq!(adopted.parent_span_id, Some(c.span_id));
        assert_eq!(adopted.trace_id, c.trace_id);
        // A callee request a round trip older than the caller's is not taken.
        let _old = l.server_start(
            &svc,
            &head("GET /b HTTP/1.1\r\n\r\n"),
            at(2, 1, 2_000_000),
            None,
        );
        let later = l.client_start(
            &up,
            &head("GET /c HTTP/1.1\r\n\r\n"),
            at(1, 6, 9_000_000),
            None,
        );
        assert!(
            l.peers
                .contains_key(&RequestKey(up.local, up.remote, JOINED))
        );
        let _ = later;
    }

    #[test]
    fn event_loops_link_by_target_or_not_at_all() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let front = conn(1, "127.0.0.1:80", "127.0.0.1:50000", Role::Server);
        let s7 = l.server_start(
            &front,
            &head("GET /chain/7 HTTP/1.1\r\n\r\n"),
            st(10, 0),
            None,
        );
        let s8 = l.server_start(
            &front,
            &head("GET /chain/8 HTTP/1.1\r\n\r\n"),
            st(10, 1),
            None,
        );
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        // Proxy: same path.
        let c8 = l.client_start(&up, &head("GET /chain/8 HTTP/1.1\r\n\r\n"), st(10, 0), None);
        assert_eq!(c8.parent_span_id, Some(s8.span_id));
        // Service forwarding the id in another path.
        let c7 = l.client_start(&up, &head("GET /leaf/7 HTTP/1.1\r\n\r\n"), st(10, 1), None);
        assert_eq!(c7.parent_span_id, Some(s7.span_id));
        // Nothing in common: no parent rather than a guess.
        let c = l.client_start(&up, &head("GET /health HTTP/1.1\r\n\r\n"), st(10, 2), None);
        assert_eq!(c.parent_span_id, None);
        assert_eq!(l.stats.ambiguous.load(Ordering::Relaxed), 1);
        // After the server exchange ends, its thread no longer parents anything.
        l.server_end(1, 10, s7.span_id);
        l.server_end(1, 10, s8.span_id);
        let c = l.client_start(&up, &head("GET /chain/8 HTTP/1.1\r\n\r\n"), st(10, 3), None);
        assert_eq!(c.parent_span_id, None);
        assert_eq!(l.stats.unlinked_clients.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn carried_context_wins_and_never_reuses_the_carried_id() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let h = head(
            "GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
        );
        for id in [
            l.server_start(
                &conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server),
                &h,
                st(1, 0),
                None,
            ),
            l.client_start(
                &conn(3, "127.0.0.1:5", "127.0.0.1:80", Role::Client),
                &h,
                st(1, 0),
                None,
            ),
        ] {
            assert_eq!(id.trace_id[..2], [0x4b, 0xf9]);
            assert_eq!(
                id.parent_span_id,
                Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
            );
            assert_ne!(Some(id.span_id), id.parent_span_id);
        }
    }

    #[test]
    fn a_late_caller_with_carried_context_still_names_the_edge() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let h = head(
            "GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
        );
        // The callee's event first, parented by the header; then its caller's.
        let server = l.server_start(
            &conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server),
            &h,
            st(1, 0),
            None,
        );
        let mut span = finished_span(server.span_id, 1_000_000, 3_000_000);
        l.server_finished(&mut span, true, 5);
        let client = l.client_start(
            &conn(3, "127.0.0.1:5", "127.0.0.1:80", Role::Client),
            &h,
            st(7, 0),
            None,
        );
        let callee = l
            .take_callee(client.span_id, 4_000_000)
            .expect("the edge's server");
        assert_eq!(
            (callee.pid, callee.server_span, callee.server_start_ns),
            (1, server.span_id, 1)
        );
        assert_eq!(
            callee.server_done,
            Some(ServerDone {
                seconds: 0.002,
                end_unix_ns: 3_000_000
            })
        );
        // The callee keeps the header's parent.
        let mut fin = server.clone();
        l.finalize(&mut fin);
        assert_eq!(fin.parent_span_id, server.parent_span_id);
        assert_eq!(l.stats.by_peer_late.load(Ordering::Relaxed), 0);
    }

    fn finished_span(
        span_id: [u8; 8],
        start_unix_ns: u64,
        end_unix_ns: u64,
    ) -> crate::trace::span::SpanRecord {
        crate::trace::span::SpanRecord {
            trace_id: [1; 16],
            span_id,
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            name: "GET".into(),
            kind: crate::trace::span::SpanKind::Server,
            start_unix_ns,
            end_unix_ns,
            attributes: Vec::new(),
            error: None,
            status: None,
            pid: 1,
            comm: "svc".into(),
        }
    }

    #[test]
    fn a_callee_ends_no_later_than_a_caller_that_ended_first() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let h = head("GET /a HTTP/1.1\r\n\r\n");
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let c = l.client_start(&up, &h, st(10, 0), None);
        let s = l.server_start(&svc, &h, st(20, 0), None);
        // The caller read the response before the callee's send returned.
        let callee = l.take_callee(c.span_id, 500).expect("paired");
        assert_eq!((callee.server_start_ns, callee.server_done), (1, None));
        let mut span = finished_span(s.span_id, 100, 520);
        l.server_finished(&mut span, false, 0);
        assert_eq!(span.end_unix_ns, 500);
        // Once: a span id is not seen again.
        let mut again = finished_span(s.span_id, 100, 520);
        l.server_finished(&mut again, false, 0);
        assert_eq!(again.end_unix_ns, 520);
        // The normal order keeps both as measured.
        let c = l.client_start(&up, &h, st(10, 1), None);
        let s = l.server_start(&svc, &h, st(20, 1), None);
        let mut span = finished_span(s.span_id, 600, 700);
        l.server_finished(&mut span, false, 0);
        assert_eq!(span.end_unix_ns, 700);
        let callee = l.take_callee(c.span_id, 800).expect("paired");
        assert_eq!(callee.server_done.map(|d| d.end_unix_ns), Some(700));
        assert!(l.callers.is_empty() && l.callees.is_empty());
    }

    #[test]
    fn a_callee_seen_before_its_caller_is_adopted() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let mut s = l.server_start(&svc, &head("GET /x/1 HTTP/1.1\r\n\r\n"), st(20, 0), None);
        assert_eq!(s.parent_span_id, None);
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let c = l.client_start(&up, &head("GET /x/1 HTTP/1.1\r\n\r\n"), st(10, 0), None);
        // What the callee does next is in the caller's trace...
        let down = conn(2, "127.0.0.1:50002", "127.0.0.1:9000", Role::Client);
        let d = l.client_start(&down, &head("GET /y/1 HTTP/1.1\r\n\r\n"), st(20, 0), None);
        assert_eq!(
            (d.trace_id, d.parent_span_id),
            (c.trace_id, Some(s.span_id))
        );
        // ... and so is the callee's own span, once finished.
        l.finalize(&mut s);
        assert_eq!(
            (s.trace_id, s.parent_span_id),
            (c.trace_id, Some(c.span_id))
        );
        assert_eq!(l.stats.by_peer_late.load(Ordering::Relaxed), 1);
        assert_eq!(l.stats.roots.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn callees_without_a_caller_are_forgotten_by_event_time_then_stop_waiting() {
        // A server traced without its clients (`--pid`): no caller ever claims these.
        let mut l = Linker::new(Box::new(crate::trace::span::RandomIds));
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let at = |ts_ns: u64, ordinal: u64| RequestStart {
            tid: 20,
            ts_ns,
            ordinal,
        };
        let req = head("GET /x/1 HTTP/1.1\r\n\r\n");
        let served: Vec<_> = (0..1000)
            .map(|i| l.server_start(&svc, &req, at(i * 1_000_000, i), None))
            .collect();
        // A second of requests, a millisecond apart: at most the last 250 ms wait, without a
        // tick; once requests have waited in vain for a while, the connection's requests stop
        // waiting.
        assert_eq!(l.orphans.entries(), 250);
        assert_eq!(l.orphans.waiting(), 250);
        assert!(served[..250].iter().all(|s| s.awaits_caller));
        assert!(served[500..].iter().all(|s| !s.awaits_caller));
        // A caller shows up: its own callee did not wait for it...
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        l.client_start(&up, &req, at(999_000_000, 999), None);
        assert_eq!(l.stats.by_peer_late.load(Ordering::Relaxed), 0);
        // ... but from now on a callee whose caller's event comes late is matched to it.
        let s = l.server_start(&svc, &req, at(1_000_000_000, 1000), None);
        assert!(s.awaits_caller);
        let c = l.client_start(&up, &req, at(1_000_000_010, 1000), None);
        assert_eq!(l.stats.by_peer_late.load(Ordering::Relaxed), 1);
        let mut s = s;
        l.finalize(&mut s);
        assert_eq!(s.parent_span_id, Some(c.span_id));
        // The requests that waited in vain are gone with it; the tick's sweep drops the taken.
        assert_eq!(l.orphans.entries(), 1);
        l.expire(1_000_000_011);
        assert_eq!(l.orphans.entries(), 0);
    }

    #[test]
    fn calls_to_a_service_not_traced_here_stop_waiting_until_its_side_shows() {
        // A client traced without its server (on another node, or left out by `--pid`).
        let mut l = Linker::new(Box::new(crate::trace::span::RandomIds));
        let up = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let req = head("GET /x/1 HTTP/1.1\r\n\r\n");
        let at = |ts_ns: u64, ordinal: u64| RequestStart {
            tid: 10,
            ts_ns,
            ordinal,
        };
        // Calls a wait apart: each one's wait has ended in vain when the next is made.
        for i in 0..20 {
            l.client_start(&up, &req, at(1 + i * PEER_WAIT_NS, i), None);
        }
        // Then a burst: none of it waits (only the last call that did still does: a wait ends
        // by event time as later calls wait, and none does).
        for i in 20..120 {
            l.client_start(&up, &req, at(20 * PEER_WAIT_NS + i, i), None);
        }
        assert_eq!((l.peers.len(), l.peer_order.len()), (1, 1));
        // The server side shows a request (its caller's event not seen: it waits as an orphan),
        // and from then on the connection's calls wait for their callee again.
        let t = 41 * PEER_WAIT_NS;
        l.server_start(&svc, &req, at(t, 40), None);
        let call = l.client_start(&up, &req, at(t + 1_000, 41), None);
        assert_eq!(l.peers.len(), 1, "the new call waits, the old wait is over");
        let served = l.server_start(&svc, &req, at(t + 2_000, 41), None);
        assert_eq!(served.parent_span_id, Some(call.span_id));
    }

    #[test]
    fn calls_to_remote_services_do_not_crowd_out_a_local_callee() {
        // A client calling remote APIs (no callee on this node) fills the wait; its later call
        // to a local service must still find its callee.
        let mut l = Linker::new(Box::new(crate::trace::span::RandomIds));
        let req = head("GET /api/1 HTTP/1.1\r\n\r\n");
        let at = |ts_ns: u64| RequestStart {
            tid: 10,
            ts_ns,
            ordinal: 0,
        };
        let calls = MAX_PEERS as u64 + 10;
        for i in 0..calls {
            let remote = format!("10.{}.{}.{}:443", i >> 16, (i >> 8) & 255, i & 255);
            let c = conn(1, "10.9.9.9:40000", &remote, Role::Client);
            l.client_start(&c, &req, at(i * 1_000), None);
        }
        assert_eq!(l.peers.len(), MAX_PEERS);
        assert_eq!(l.stats.peers_evicted.load(Ordering::Relaxed), 10);
        let ts = calls * 1_000;
        let local = conn(1, "127.0.0.1:50001", "127.0.0.1:8000", Role::Client);
        let call = l.client_start(&local, &req, at(ts), None);
        let svc = conn(2, "127.0.0.1:8000", "127.0.0.1:50001", Role::Server);
        let served = l.server_start(&svc, &req, at(ts + 20_000), None);
        assert_eq!(served.parent_span_id, Some(call.span_id));
        // Waiting calls are forgotten by event time as new ones come, without a tick.
        let later = conn(1, "10.9.9.9:40001", "10.200.0.1:443", Role::Client);
        l.client_start(&later, &req, at(ts + PEER_WAIT_NS), None);
        assert_eq!(l.peers.len(), 1);
        assert!(l.peer_order.len() <= 2);
    }

    #[test]
    fn served_requests_past_the_orphan_bounds_are_counted() {
        // A server whose callers are all remote: every request waits for a local caller, one
        // connection each, until the orphans' bounds; the requests refused there are counted.
        let mut l = Linker::new(Box::new(crate::trace::span::RandomIds));
        let req = head("GET /api/1 HTTP/1.1\r\n\r\n");
        let at = |ts_ns: u64| RequestStart {
            tid: 10,
            ts_ns,
            ordinal: 0,
        };
        // One request per connection: whichever of the orphans' bounds comes first.
        let bound = crate::trace::orphans::MAX_QUEUES.min(crate::trace::orphans::MAX_ENTRIES);
        let served = bound as u64 + 10;
        for i in 0..served {
            let remote = format!("10.{}.{}.{}:40000", i >> 16, (i >> 8) & 255, i & 255);
            let c = conn(2, "10.9.9.9:8000", &remote, Role::Server);
            l.server_start(&c, &req, at(i * 1_000), None);
        }
        assert_eq!(l.stats.callers_unawaited.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_forwarded_header_does_not_flatten_the_tree() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let tp = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n";
        let h = head(&format!("GET /a/1 HTTP/1.1\r\n{tp}\r\n"));
        // A proxy receives the SDK client's request and forwards the header verbatim.
        let s1 = l.server_start(
            &conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server),
            &h,
            st(1, 0),
            None,
        );
        let c1 = l.client_start(
            &conn(1, "127.0.0.1:6", "127.0.0.1:81", Role::Client),
            &h,
            st(1, 0),
            None,
        );
        assert_eq!(
            c1.parent_span_id,
            Some(s1.span_id),
            "proxy CLIENT under proxy SERVER"
        );
        let s2 = l.server_start(
            &conn(2, "127.0.0.1:81", "127.0.0.1:6", Role::Server),
            &h,
            st(2, 0),
            None,
        );
        assert_eq!(
            s2.parent_span_id,
            Some(c1.span_id),
            "callee under the proxy's CLIENT"
        );
        assert!(
            [s1.trace_id, c1.trace_id, s2.trace_id]
                .iter()
                .all(|t| t[..2] == [0x4b, 0xf9])
        );
        // An instrumented service puts its own span in the header: that span is the parent.
        let own = head(
            "GET /b/1 HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01\r\n\r\n",
        );
        let c2 = l.client_start(
            &conn(2, "127.0.0.1:7", "127.0.0.1:82", Role::Client),
            &own,
            st(2, 0),
            None,
        );
        assert_eq!(c2.parent_span_id, Some([0x11; 8]));
    }

    #[test]
    fn work_handed_to_a_new_thread_keeps_its_parent() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let front = conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server);
        let s = l.server_start(
            &front,
            &head("GET /a/1 HTTP/1.1\r\n\r\n"),
            RequestStart {
                tid: 10,
                ts_ns: 100,
                ordinal: 0,
            },
            None,
        );
        // Thread 10 creates 11, which creates 12; 12 makes the call.
        l.thread_created(1, 10, 11, 150);
        l.thread_created(1, 11, 12, 160);
        let up = conn(1, "127.0.0.1:6", "127.0.0.1:81", Role::Client);
        let c = l.client_start(&up, &head("GET /b/1 HTTP/1.1\r\n\r\n"), st(12, 0), None);
        assert_eq!(
            (c.trace_id, c.parent_span_id),
            (s.trace_id, Some(s.span_id))
        );
        assert_eq!(l.stats.by_thread_creator.load(Ordering::Relaxed), 1);
        // A thread created before the request arrived (a pool) is not followed as a creation;
        // while the process handles only this request, the pool thread's call is its child
        // (work handed over: gRPC servers, executors), counted apart.
        l.thread_created(1, 10, 13, 50);
        let c = l.client_start(&up, &head("GET /b/1 HTTP/1.1\r\n\r\n"), st(13, 1), None);
        assert_eq!(c.parent_span_id, Some(s.span_id));
        assert_eq!(l.stats.by_thread_creator.load(Ordering::Relaxed), 1);
        assert_eq!(l.stats.by_sole_request.load(Ordering::Relaxed), 1);
        // With a second request in flight, the pool thread's call could be either's: none.
        l.server_start(
            &conn(1, "127.0.0.1:80", "127.0.0.1:7", Role::Server),
            &head("GET /a/2 HTTP/1.1\r\n\r\n"),
            RequestStart {
                tid: 20,
                ts_ns: 170,
                ordinal: 0,
            },
            None,
        );
        let c = l.client_start(&up, &head("GET /b/3 HTTP/1.1\r\n\r\n"), st(13, 2), None);
        assert_eq!(c.parent_span_id, None);
        assert_eq!(l.stats.by_sole_request.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_pool_threads_call_is_parented_by_the_thread_it_hands_its_result_to() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let at = |tid, ts_ns| RequestStart {
            tid,
            ts_ns,
            ordinal: 0,
        };
        // The process reports futex wakes: a pool runtime.
        l.woke(1, 50, 51, 10);
        // Two requests in flight, on request threads 10 and 20.
        let a = l.server_start(
            &conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server),
            &head("GET /a/1 HTTP/1.1\r\n\r\n"),
            at(10, 100),
            None,
        );
        let b = l.server_start(
            &conn(1, "127.0.0.1:80", "127.0.0.1:6", Role::Server),
            &head("GET /a/2 HTTP/1.1\r\n\r\n"),
            at(20, 110),
            None,
        );
        // Pool threads 30 and 31 make one call each: no parent yet, their traces provisional.
        let up = |port| {
            conn(
                1,
                &format!("127.0.0.1:{port}"),
                "127.0.0.1:81",
                Role::Client,
            )
        };
        let c30 = l.client_start(
            &up(7),
            &head("GET /x/9 HTTP/1.1\r\n\r\n"),
            at(30, 120),
            None,
        );
        let c31 = l.client_start(
            &up(8),
            &head("GET /x/8 HTTP/1.1\r\n\r\n"),
            at(31, 125),
            None,
        );
        assert_eq!((c30.parent_span_id, c31.parent_span_id), (None, None));
        assert!(l.is_provisional(&c30.trace_id) && l.is_provisional(&c31.trace_id));
        // A callee of c30 on this node is in c30's trace meanwhile.
        let callee = l.server_start(
            &conn(2, "127.0.0.1:81", "127.0.0.1:7", Role::Server),
            &head("GET /x/9 HTTP/1.1\r\n\r\n"),
            at(40, 121),
            None,
        );
        assert_eq!(callee.trace_id, c30.trace_id);
        // Wakes during the call, and of a thread handling nothing, decide nothing.
        l.woke(1, 30, 20, 130);
        l.client_end(1, 30, c30.span_id, 140);
        l.woke(1, 30, 32, 141);
        assert!(l.take_settled().is_empty());
        // Thread 30's result goes to thread 20 (request b), thread 31's to thread 10 (a): the
        // order of the submissions does not matter, the handback does.
        l.woke(1, 30, 20, 142);
        l.client_end(1, 31, c31.span_id, 150);
        l.woke(1, 31, 10, 151);
        let settled = l.take_settled();
        assert_eq!(settled, vec![c30.trace_id, c31.trace_id]);
        let fin = |l: &mut Linker, id: &Identity| {
            let mut id = id.clone();
            l.finalize(&mut id);
            (id.trace_id, id.parent_span_id, id.parent_is_remote)
        };
        assert_eq!(fin(&mut l, &c30), (b.trace_id, Some(b.span_id), false));
        assert_eq!(fin(&mut l, &c31), (a.trace_id, Some(a.span_id), false));
        // The callee follows its caller into the request's trace.
        assert_eq!(fin(&mut l, &callee).0, b.trace_id);
        assert_eq!(l.stats.by_handback.load(Ordering::Relaxed), 2);

        // A handback too late, or to a thread handling several requests, settles with no parent.
        let c = l.client_start(
            &up(9),
            &head("GET /x/7 HTTP/1.1\r\n\r\n"),
            at(30, 200),
            None,
        );
        l.client_end(1, 30, c.span_id, 210);
        l.woke(1, 30, 20, 210 + HANDBACK_WAIT_NS + 1);
        assert_eq!(l.take_settled(), vec![c.trace_id]);
        assert_eq!(fin(&mut l, &c).1, None);
        // A call whose handback never comes is let go by expiry.
        let c = l.client_start(
            &up(9),
            &head("GET /x/6 HTTP/1.1\r\n\r\n"),
            at(30, 300),
            None,
        );
        l.client_end(1, 30, c.span_id, 310);
        l.expire(310 + HANDBACK_WAIT_NS + 1);
        assert_eq!(l.take_settled(), vec![c.trace_id]);
        assert_eq!(l.stats.by_handback.load(Ordering::Relaxed), 2);
        // Processes that report no wakes keep nothing provisional.
        let other = l.client_start(
            &conn(3, "127.0.0.1:9", "127.0.0.1:81", Role::Client),
            &head("GET /y HTTP/1.1\r\n\r\n"),
            at(60, 400),
            None,
        );
        assert!(!l.is_provisional(&other.trace_id));
    }

    #[test]
    fn waiting_state_expires() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let up = conn(1, "127.0.0.1:50001", "192.0.2.1:80", Role::Client);
        l.client_start(&up, &head("GET / HTTP/1.1\r\n\r\n"), st(1, 0), None);
        l.server_start(
            &conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server),
            &head("GET / HTTP/1.1\r\n\r\n"),
            st(1, 0),
            None,
        );
        l.expire(IN_FLIGHT_MAX_NS + 10);
        assert!(l.peers.is_empty() && l.in_flight.is_empty() && l.orphans.entries() == 0);
    }

    fn kernel(source: ContextSource, trace: u8, span: u8) -> Option<KernelContext> {
        Some(KernelContext {
            source,
            trace_id: [trace; 16],
            span_id: [span; 8],
        })
    }

    #[test]
    fn a_client_span_takes_the_ids_its_tcp_option_carries() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let up = conn(1, "10.0.0.1:40000", "10.0.0.2:80", Role::Client);
        let root = l.client_start(
            &up,
            &head("GET /a HTTP/1.1\r\n\r\n"),
            st(1, 0),
            kernel(ContextSource::Kernel, 7, 8),
        );
        assert_eq!((root.trace_id, root.span_id), ([7; 16], [8; 8]));
        assert_eq!(root.parent_span_id, None);
        assert_eq!(l.stats.tcp_context_mismatch.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_server_span_is_the_child_of_the_span_a_peer_option_names() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let svc = conn(2, "10.0.0.2:80", "10.0.0.1:40000", Role::Server);
        let s = l.server_start(
            &svc,
            &head("GET /a HTTP/1.1\r\n\r\n"),
            st(5, 0),
            kernel(ContextSource::Option, 7, 8),
        );
        assert_eq!(s.trace_id, [7; 16]);
        assert_eq!(s.parent_span_id, Some([8; 8]));
        assert!(s.parent_is_remote);
        assert_eq!(l.stats.by_tcp_option.load(Ordering::Relaxed), 1);
        assert_eq!(l.stats.roots.load(Ordering::Relaxed), 0);

        // Its own call carries its trace on (the kernel picked the same trace for the thread).
        let down = conn(2, "10.0.0.2:41000", "10.0.0.3:80", Role::Client);
        let c = l.client_start(
            &down,
            &head("GET /b HTTP/1.1\r\n\r\n"),
            st(5, 0),
            kernel(ContextSource::Kernel, 7, 9),
        );
        assert_eq!((c.trace_id, c.span_id), ([7; 16], [9; 8]));
        assert_eq!(c.parent_span_id, Some(s.span_id));
    }

    #[test]
    fn header_context_wins_over_a_tcp_option() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let svc = conn(2, "10.0.0.2:80", "10.0.0.1:40000", Role::Server);
        let s = l.server_start(
            &svc,
            &head(
                "GET /a HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
            ),
            st(5, 0),
            kernel(ContextSource::Option, 7, 8),
        );
        assert_eq!(
            s.parent_span_id,
            Some([0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31])
        );
        assert_eq!(l.stats.by_tcp_option.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_new_trace_on_the_server_side_takes_the_kernels_trace_id() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let svc = conn(2, "10.0.0.2:80", "10.0.0.1:40000", Role::Server);
        let s = l.server_start(
            &svc,
            &head("GET /a HTTP/1.1\r\n\r\n"),
            st(5, 0),
            kernel(ContextSource::Kernel, 3, 0),
        );
        assert_eq!(s.trace_id, [3; 16]);
        assert_eq!(s.parent_span_id, None);
    }

    #[test]
    fn a_client_span_in_another_trace_than_its_option_is_counted() {
        let mut l = Linker::new(Box::new(Seq(0)));
        let front = conn(1, "127.0.0.1:80", "127.0.0.1:5", Role::Server);
        l.server_start(&front, &head("GET /a/1 HTTP/1.1\r\n\r\n"), st(10, 0), None);
        let up = conn(1, "10.0.0.1:40000", "10.0.0.2:80", Role::Client);
        // The kernel did not know the thread's trace (e.g. userspace linked it by target).
        let c = l.client_start(
            &up,
            &head("GET /a/1 HTTP/1.1\r\n\r\n"),
            st(10, 0),
            kernel(ContextSource::Kernel, 9, 9),
        );
        assert_ne!(c.trace_id, [9; 16]);
        assert_eq!(c.span_id, [9; 8]);
        assert_eq!(l.stats.tcp_context_mismatch.load(Ordering::Relaxed), 1);
    }
}
