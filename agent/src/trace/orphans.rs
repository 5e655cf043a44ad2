//! SERVER requests still waiting for a caller whose event may come late, kept by connection.
//!
//! One map entry per request (its connection's two ends and ordinal) meant, with only the
//! server traced, a table of the last quarter second's requests (10 000 at 40k req/s, ~2 MB
//! with its expiry queue) in which every request inserted one entry and expired another: two
//! cache misses a request (a build waiting 25 ms instead of 250 used 16% less user CPU in that
//! setup). By connection, a request is appended to its connection's queue and expires from the
//! front of the same queue: the map has one entry per connection and the queues are read in
//! order (−11% agent user CPU at 40k req/s, the 250 ms wait kept).
//!
//! A connection whose client end is not traced on this node (a client on another node, or a
//! process left out by `--pid`) never has a caller: every one of its requests would wait in
//! vain. After `ABSENT_AFTER` of its requests in a row waited their full time with no request
//! from its client side in between, its requests stop waiting; the next request seen from its
//! client side makes them wait again (−18% pipeline CPU with only nginx selected at 40k req/s).
//! The same by the other side: a connection whose server end is not traced here (a service on
//! another node, or not selected) never has a callee, and its CLIENT requests stop waiting for
//! one (`causality::Linker::await_callee`, 30 s each) once `ABSENT_AFTER` in a row waited in
//! vain, until its server side shows a request (−33% pipeline CPU with only the load generator
//! traced at 40k req/s).

use std::{collections::VecDeque, net::SocketAddr};

use foldhash::{HashMap, HashMapExt};

/// A connection named from its client side: (client end, server end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pair(pub SocketAddr, pub SocketAddr);

impl std::hash::Hash for Pair {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(super::causality::addr_bits(&self.0));
        h.write_u64(super::causality::addr_bits(&self.1));
    }
}

/// What the waiting needs of an entry: when its request started.
pub(super) trait Started {
    fn started_ns(&self) -> u64;
}

/// The start time is the value's own: a taken entry is only ever dropped, whatever its age
/// (a copy of it here made the entry 56 bytes instead of 48).
struct Entry<T> {
    ordinal: u64,
    /// None once a caller took it: left in place, dropped when it reaches the queue's front.
    value: Option<T>,
}

impl<T: Started> Entry<T> {
    /// Still waiting, and started less than `max_age_ns` before `now_ns`.
    fn waiting(&self, now_ns: u64, max_age_ns: u64) -> bool {
        self.value
            .as_ref()
            .is_some_and(|v| now_ns.saturating_sub(v.started_ns()) < max_age_ns)
    }
}

/// One connection's waiting requests, oldest first, and what its two sides showed lately.
struct Queue<T> {
    entries: VecDeque<Entry<T>>,
    /// SERVER requests in a row that waited their full time untaken, of those that started
    /// after the client side last showed a request (at `client_seen_ns`).
    unclaimed: u32,
    client_seen_ns: u64,
    /// CLIENT requests in a row whose wait for a callee ended untaken, of those that started
    /// after the server side last showed a request (at `server_seen_ns`).
    uncalled: u32,
    server_seen_ns: u64,
    /// Used since the last sweep (a request refused or not waiting, a client's wait ended): a
    /// queue without entries is kept while its connection is alive.
    in_use: bool,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            unclaimed: 0,
            client_seen_ns: 0,
            uncalled: 0,
            server_seen_ns: 0,
            in_use: false,
        }
    }
}

impl<T> Queue<T> {
    fn caller_absent(&self) -> bool {
        self.unclaimed >= ABSENT_AFTER
    }

    fn callee_absent(&self) -> bool {
        self.uncalled >= ABSENT_AFTER
    }
}

/// Whether a SERVER request waits for a late caller.
#[derive(Debug, PartialEq)]
pub(super) enum Wait {
    Waits,
    /// No caller came for the connection's latest requests: by design, not counted.
    CallerAbsent,
    /// MAX_ENTRIES wait, or MAX_QUEUES connections are remembered: a late caller would miss
    /// it (counted by the linker).
    Full,
}

/// What a CLIENT request finds on its connection.
#[derive(Debug, PartialEq)]
pub(super) enum Claim<T> {
    /// Its callee, whose SERVER start came first.
    Taken(T),
    /// Nothing yet: it waits for its callee.
    Wait,
    /// Nothing, and no callee came for the connection's latest requests: it does not wait.
    CalleeAbsent,
}

pub(super) struct Orphans<T> {
    by_pair: HashMap<Pair, Queue<T>>,
    /// Entries in all queues, taken ones included (the bound counts memory, not waiters).
    entries: usize,
    /// Inserts since every queue was last expired by event time.
    since_sweep: usize,
}

/// Inserts between two event-time sweeps of every queue, at least (at most one entry visited
/// per insert: the sweep waits for as many inserts as there are entries). A queue expires its
/// front as its own requests come; one whose connection said nothing more (short-lived
/// connections: one request each) would otherwise wait for the agent's per-second sweep of
/// entries over a second old.
const SWEEP_EVERY: usize = 4096;

/// Requests of one connection in a row that waited in vain before its requests stop waiting
/// (by either side). A traced peer shows a request on its side of the connection for each of
/// the other's, so a run this long means it is not traced; a loss or a reordering is a
/// handful.
const ABSENT_AFTER: u32 = 16;
/// Connections remembered at most (those with waiting requests or a side found absent).
pub(super) const MAX_QUEUES: usize = 100_000;
/// Requests waiting at most, in all queues.
pub(super) const MAX_ENTRIES: usize = 100_000;

impl<T: Started> Orphans<T> {
    pub fn new() -> Self {
        Self {
            by_pair: HashMap::new(),
            entries: 0,
            since_sweep: 0,
        }
    }

    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// SERVER request `ordinal` of `pair` waits for its caller, unless no caller came for its
    /// connection's latest requests (see the module doc) or the bounds are reached. Its
    /// connection's entries that started `wait_ns` or more before it are forgotten first. A
    /// lower ordinal than the newest waiting one is a new connection between the same two
    /// ends: the old one's entries go.
    pub fn wait(&mut self, pair: Pair, ordinal: u64, value: T, wait_ns: u64) -> Wait {
        let started_ns = value.started_ns();
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY.max(self.entries) {
            self.since_sweep = 0;
            self.expire(started_ns, wait_ns);
        }
        if self.by_pair.len() >= MAX_QUEUES && !self.by_pair.contains_key(&pair) {
            return Wait::Full;
        }
        let queue = self.by_pair.entry(pair).or_default();
        // The server side is traced: the connection's CLIENT requests wait (again).
        queue.uncalled = 0;
        queue.server_seen_ns = queue.server_seen_ns.max(started_ns);
        let before = queue.entries.len();
        if queue.entries.back().is_some_and(|e| e.ordinal > ordinal) {
            queue.entries.clear();
            queue.unclaimed = 0;
        }
        let refused = if queue.caller_absent() {
            Some(Wait::CallerAbsent)
        } else if self.entries >= MAX_ENTRIES {
            Some(Wait::Full)
        } else {
            None
        };
        if let Some(refused) = refused {
            queue.in_use = true;
            self.entries = self.entries + queue.entries.len() - before;
            return refused;
        }
        while let Some(front) = queue.entries.front() {
            if front.waiting(started_ns, wait_ns) {
                break;
            }
            // One that started before the client side's last request cannot say the client
            // side is not traced.
            let in_vain = front
                .value
                .as_ref()
                .is_some_and(|v| v.started_ns() > queue.client_seen_ns);
            queue.unclaimed = queue.unclaimed.saturating_add(u32::from(in_vain));
            queue.entries.pop_front();
        }
        queue.entries.push_back(Entry {
            ordinal,
            value: Some(value),
        });
        self.entries = self.entries + queue.entries.len() - before;
        Wait::Waits
    }

    /// What CLIENT request `ordinal` of `pair`, made at `now_ns`, finds: the newest waiting
    /// SERVER request `ordinal` if `pick` accepts it (taken), or whether to wait for one.
    pub fn claim(
        &mut self,
        pair: &Pair,
        ordinal: u64,
        now_ns: u64,
        pick: impl FnOnce(&T) -> bool,
    ) -> Claim<T> {
        let Some(queue) = self.by_pair.get_mut(pair) else {
            return Claim::Wait;
        };
        // The client side is traced: the connection's SERVER requests wait (again).
        queue.unclaimed = 0;
        queue.client_seen_ns = queue.client_seen_ns.max(now_ns);
        // Ordinals grow along a queue (see `insert`): the newest with this one is the last
        // entry not above it.
        let at = queue
            .entries
            .partition_point(|e| e.ordinal <= ordinal)
            .checked_sub(1);
        if let Some(entry) = at.map(|at| &mut queue.entries[at])
            && entry.ordinal == ordinal
            && entry.value.as_ref().is_some_and(pick)
            && let Some(value) = entry.value.take()
        {
            return Claim::Taken(value);
        }
        if queue.callee_absent() {
            queue.in_use = true;
            return Claim::CalleeAbsent;
        }
        Claim::Wait
    }

    /// A CLIENT request of `pair` that started at `started_ns` waited for its callee in vain.
    pub fn uncalled(&mut self, pair: Pair, started_ns: u64) {
        if self.by_pair.len() >= MAX_QUEUES && !self.by_pair.contains_key(&pair) {
            return;
        }
        let queue = self.by_pair.entry(pair).or_default();
        // One that started before the server side's last request cannot say the server side
        // is not traced.
        if started_ns > queue.server_seen_ns {
            queue.uncalled = queue.uncalled.saturating_add(1);
        }
        queue.in_use = true;
    }

    /// Forgets entries that started `max_age_ns` or more before `now_ns`, and empty queues but
    /// those used since the last sweep (forgetting a side found absent would have the
    /// connection's next requests wait in vain again).
    pub fn expire(&mut self, now_ns: u64, max_age_ns: u64) {
        let mut entries = 0;
        self.by_pair.retain(|_, queue| {
            queue.entries.retain(|e| e.waiting(now_ns, max_age_ns));
            entries += queue.entries.len();
            let in_use = std::mem::take(&mut queue.in_use);
            !queue.entries.is_empty() || in_use
        });
        self.entries = entries;
    }

    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.by_pair
            .values()
            .flat_map(|q| q.entries.iter())
            .filter(|e| e.value.is_some())
            .count()
    }
}

/// What finished orphans leave for a caller that adopts one late (its span's times, its edge of
/// the service graph). Two generations of `wait_ns` each: an entry is kept at least that long,
/// the older generation is dropped whole when the newer one is that old, so a finished orphan
/// costs one insert and no expiry lookup (an expiry queue read back each entry, a cache miss per
/// request at 10 000 entries).
pub(super) struct Finished<V> {
    current: HashMap<[u8; 8], V>,
    previous: HashMap<[u8; 8], V>,
    /// When `current` started: event time as spans finish, the agent's clock on the tick (the
    /// same monotonic clock; events trail it by the agent's lag).
    since_ns: u64,
    wait_ns: u64,
    /// Entries per generation at most; a full one starts the next early.
    max: usize,
}

impl<V> Finished<V> {
    pub fn new(wait_ns: u64, max: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            since_ns: 0,
            wait_ns,
            max,
        }
    }

    pub fn insert(&mut self, span_id: [u8; 8], value: V, now_ns: u64) {
        self.age(now_ns);
        if self.current.len() >= self.max {
            self.turn(now_ns);
        }
        self.current.insert(span_id, value);
    }

    pub fn take(&mut self, span_id: &[u8; 8]) -> Option<V> {
        self.current
            .remove(span_id)
            .or_else(|| self.previous.remove(span_id))
    }

    /// Drops what is past its wait: called as spans finish and on the tick.
    pub fn age(&mut self, now_ns: u64) {
        let age = now_ns.saturating_sub(self.since_ns);
        if age >= 2 * self.wait_ns {
            self.current.clear();
            self.previous.clear();
            self.since_ns = now_ns;
        } else if age >= self.wait_ns {
            self.turn(now_ns);
        }
    }

    fn turn(&mut self, now_ns: u64) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        self.since_ns = now_ns;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct W(u64, u32);
    impl Started for W {
        fn started_ns(&self) -> u64 {
            self.0
        }
    }

    fn pair(client_port: u16) -> Pair {
        Pair(
            format!("10.0.0.1:{client_port}").parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        )
    }

    const WAIT: u64 = 250;

    impl<T: Started> Orphans<T> {
        /// `wait`, for whether it waits.
        fn insert(&mut self, pair: Pair, ordinal: u64, value: T, wait_ns: u64) -> bool {
            self.wait(pair, ordinal, value, wait_ns) == Wait::Waits
        }

        /// `claim`, for what it took.
        fn take_if(
            &mut self,
            pair: &Pair,
            ordinal: u64,
            now_ns: u64,
            pick: impl FnOnce(&T) -> bool,
        ) -> Option<T> {
            match self.claim(pair, ordinal, now_ns, pick) {
                Claim::Taken(v) => Some(v),
                Claim::Wait | Claim::CalleeAbsent => None,
            }
        }
    }

    #[test]
    fn a_late_caller_takes_its_own_request_once() {
        let mut o = Orphans::new();
        for n in 0..5 {
            o.insert(pair(1), n, W(10 + n, n as u32), WAIT);
        }
        o.insert(pair(2), 3, W(12, 99), WAIT);
        assert_eq!(o.take_if(&pair(1), 3, 0, |_| true), Some(W(13, 3)));
        assert_eq!(o.take_if(&pair(1), 3, 0, |_| true), None, "taken once");
        assert_eq!(
            o.take_if(&pair(2), 3, 0, |_| true),
            Some(W(12, 99)),
            "by connection"
        );
        assert_eq!(o.take_if(&pair(1), 7, 0, |_| true), None, "never waited");
        assert_eq!(o.take_if(&pair(3), 0, 0, |_| true), None);
        assert_eq!(
            o.take_if(&pair(1), 4, 0, |w| w.0 > 100),
            None,
            "refused is left"
        );
        assert_eq!(o.take_if(&pair(1), 4, 0, |_| true), Some(W(14, 4)));
        assert_eq!(o.waiting(), 3);
    }

    #[test]
    fn a_repeated_ordinal_is_its_newest_request() {
        // Joined mid-stream, every request has the same ordinal: the newest one is the match.
        let mut o = Orphans::new();
        o.insert(pair(1), u64::MAX, W(10, 1), WAIT);
        o.insert(pair(1), u64::MAX, W(20, 2), WAIT);
        assert_eq!(o.take_if(&pair(1), u64::MAX, 0, |_| true), Some(W(20, 2)));
        assert_eq!(
            o.take_if(&pair(1), u64::MAX, 0, |_| true),
            None,
            "the older is not offered"
        );
    }

    #[test]
    fn waiting_ends_by_event_time_per_connection_and_by_age_for_all() {
        let mut o = Orphans::new();
        o.insert(pair(1), 0, W(0, 0), WAIT);
        o.insert(pair(1), 1, W(100, 1), WAIT);
        o.insert(pair(2), 0, W(100, 9), WAIT);
        // A request a wait later forgets its own connection's first one only.
        o.insert(pair(1), 2, W(WAIT, 2), WAIT);
        assert_eq!(o.take_if(&pair(1), 0, 0, |_| true), None);
        assert_eq!(o.entries(), 3);
        // The sweep: everything as old as the age, and empty queues.
        o.expire(100 + 1_000, 1_000);
        assert_eq!(o.entries(), 1);
        assert_eq!(o.take_if(&pair(1), 2, 0, |_| true), Some(W(WAIT, 2)));
        o.expire(0, 1_000);
        assert_eq!(
            (o.entries(), o.by_pair.len()),
            (0, 0),
            "taken entries go at the sweep"
        );
    }

    #[test]
    fn a_connection_that_said_nothing_more_is_swept_by_event_time() {
        let mut o = Orphans::new();
        o.insert(pair(1), 0, W(0, 1), WAIT);
        for n in 0..SWEEP_EVERY as u64 {
            o.insert(pair(2), n, W(WAIT + n, 2), WAIT);
        }
        assert_eq!(o.take_if(&pair(1), 0, 0, |_| true), None);
        assert!(o.entries() <= SWEEP_EVERY);
        assert!(!o.by_pair.contains_key(&pair(1)), "its queue is gone");
    }

    #[test]
    fn a_new_connection_between_the_same_ends_starts_over() {
        let mut o = Orphans::new();
        for n in 5..8 {
            o.insert(pair(1), n, W(n, n as u32), WAIT);
        }
        o.insert(pair(1), 0, W(9, 100), WAIT);
        assert_eq!(o.entries(), 1);
        assert_eq!(o.take_if(&pair(1), 6, 0, |_| true), None);
        assert_eq!(o.take_if(&pair(1), 0, 0, |_| true), Some(W(9, 100)));
    }

    /// Requests of `pair` a wait apart from `from` on, each finding the one before it waited in
    /// vain, until one is refused; how many waited.
    fn until_caller_absent(o: &mut Orphans<W>, pair: Pair, from: u64) -> u64 {
        let mut n = from;
        while o.insert(pair, n, W((n + 1) * WAIT, n as u32), WAIT) {
            n += 1;
            assert!(n < from + 100, "never stops waiting");
        }
        n - from
    }

    #[test]
    fn a_connection_whose_client_side_shows_nothing_stops_waiting_until_it_does() {
        let mut o = Orphans::new();
        // The first request waits in vain only once the next one comes a wait later.
        assert_eq!(
            until_caller_absent(&mut o, pair(1), 0),
            u64::from(ABSENT_AFTER) + 1
        );
        assert!(!o.insert(pair(1), 50, W(50 * WAIT, 50), WAIT), "stays so");
        assert!(o.insert(pair(2), 0, W(50 * WAIT, 1), WAIT), "by connection");
        // The client side shows a request (none of the waiting ones is its callee)...
        assert_eq!(o.take_if(&pair(1), 51, 51 * WAIT, |_| true), None);
        // ... and its connection's requests wait again, to be taken by a late caller.
        assert!(o.insert(pair(1), 52, W(52 * WAIT, 52), WAIT));
        assert_eq!(
            o.take_if(&pair(1), 52, 52 * WAIT, |_| true),
            Some(W(52 * WAIT, 52))
        );
        // Requests that started before that contact do not count as waiting in vain: a
        // client side seen once needs as many again to be taken for untraced.
        assert_eq!(
            until_caller_absent(&mut o, pair(1), 53),
            u64::from(ABSENT_AFTER) + 1
        );
    }

    #[test]
    fn requests_still_within_their_wait_do_not_count_as_waiting_in_vain() {
        let mut o = Orphans::new();
        // Many requests within one wait: none has waited its time yet, whatever their number.
        for n in 0..1000 {
            assert!(o.insert(pair(1), n, W(1 + n * WAIT / 1000, n as u32), WAIT));
        }
    }

    #[test]
    fn a_side_found_absent_is_remembered_while_in_use_and_forgotten_when_silent() {
        let mut o = Orphans::new();
        let n = until_caller_absent(&mut o, pair(1), 0);
        // The sweep forgets every entry; the connection, refusing requests, keeps its state.
        o.expire(1_000 * WAIT, WAIT);
        assert_eq!(o.entries(), 0);
        assert!(!o.insert(pair(1), n + 1, W(1_000 * WAIT, 0), WAIT));
        // Silent through a whole sweep interval: forgotten, its requests wait again.
        o.expire(1_001 * WAIT, WAIT);
        o.expire(1_002 * WAIT, WAIT);
        assert!(o.by_pair.is_empty());
        assert!(o.insert(pair(1), n + 2, W(1_003 * WAIT, 0), WAIT));
    }

    #[test]
    fn a_connection_whose_server_side_shows_nothing_stops_waiting_for_callees_until_it_does() {
        let mut o: Orphans<W> = Orphans::new();
        // CLIENT requests a wait apart, each one's wait ending untaken.
        for n in 0..u64::from(ABSENT_AFTER) {
            assert_eq!(o.claim(&pair(1), n, (n + 1) * WAIT, |_| true), Claim::Wait);
            o.uncalled(pair(1), (n + 1) * WAIT);
        }
        assert_eq!(
            o.claim(&pair(1), 99, 99 * WAIT, |_| true),
            Claim::CalleeAbsent
        );
        assert_eq!(
            o.claim(&pair(2), 0, 99 * WAIT, |_| true),
            Claim::Wait,
            "by connection"
        );
        // The sweep keeps the connection while it is in use.
        o.expire(100 * WAIT, WAIT);
        assert_eq!(
            o.claim(&pair(1), 100, 100 * WAIT, |_| true),
            Claim::CalleeAbsent
        );
        // Its server side shows a request (which waits for its caller)...
        assert!(o.insert(pair(1), 101, W(101 * WAIT, 101), WAIT));
        // ... and its CLIENT requests wait again, the late one taking it.
        assert_eq!(
            o.claim(&pair(1), 101, 101 * WAIT + 1, |_| true),
            Claim::Taken(W(101 * WAIT, 101))
        );
        assert_eq!(o.claim(&pair(1), 102, 102 * WAIT, |_| true), Claim::Wait);
        // Waits that started before the server side's request do not count as in vain.
        for n in 0..u64::from(ABSENT_AFTER) {
            o.uncalled(pair(1), n);
        }
        assert_eq!(o.claim(&pair(1), 103, 103 * WAIT, |_| true), Claim::Wait);
    }

    #[test]
    fn the_connections_remembered_are_bounded() {
        let mut o: Orphans<W> = Orphans::new();
        let server: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut full = 0;
        for i in 0..MAX_QUEUES as u32 + 10 {
            let [_, a, b, c] = i.to_be_bytes();
            let client = SocketAddr::from(([10, a, b, c], 1));
            o.uncalled(Pair(client, server), 1);
            match o.wait(Pair(server, client), 0, W(1, 0), WAIT) {
                Wait::Waits => {}
                Wait::Full => {
                    assert!(o.by_pair.len() >= MAX_QUEUES);
                    full += 1;
                }
                Wait::CallerAbsent => panic!("no request waited in vain"),
            }
        }
        assert_eq!(o.by_pair.len(), MAX_QUEUES);
        // Two queues per client (one per side): about the second half found the map full.
        assert!(full > MAX_QUEUES / 4, "{full} refused");
    }

    #[test]
    fn the_requests_waiting_are_bounded() {
        let mut o: Orphans<W> = Orphans::new();
        // One connection, requests within one wait: none expires, so they pile up to the bound.
        for n in 0..MAX_ENTRIES as u64 {
            assert_eq!(o.wait(pair(1), n, W(1, n as u32), u64::MAX), Wait::Waits);
        }
        assert_eq!(o.wait(pair(1), 1 << 40, W(1, 0), u64::MAX), Wait::Full);
        assert_eq!(o.entries(), MAX_ENTRIES);
    }

    #[test]
    fn finished_durations_are_kept_a_wait_and_dropped_within_two() {
        let mut f = Finished::new(100, 3);
        f.insert([1; 8], 0.5, 0);
        f.insert([2; 8], 0.25, 50);
        assert_eq!(f.take(&[1; 8]), Some(0.5));
        assert_eq!(f.take(&[1; 8]), None, "taken once");
        // A wait later the first generation is the older one: still there.
        f.insert([3; 8], 1.0, 120);
        assert_eq!(f.len(), 2);
        // Two waits after it started, the old generation goes whole.
        f.age(220);
        assert_eq!(f.take(&[2; 8]), None);
        assert_eq!(f.take(&[3; 8]), Some(1.0));
        // A long quiet drops everything.
        f.insert([4; 8], 1.0, 230);
        f.age(10_000);
        assert_eq!(f.len(), 0);
        // Bounded: a full generation starts the next one early.
        for i in 0..7u8 {
            f.insert([i; 8], 1.0, 10_001);
        }
        assert!(f.len() <= 6);
        assert_eq!(f.take(&[6; 8]), Some(1.0), "the newest is kept");
    }
}
