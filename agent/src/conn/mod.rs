//! The connection table: every connection the kernel reports, its identity and where each
//! direction's stream stands. Bounded in connections and in bytes per event; closed
//! connections leave when their consumer is done, idle ones are evicted; every eviction is
//! counted.

pub mod stream;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use std::{net::SocketAddr, sync::Arc};

use crate::decode::{CloseEvent, ConnKey, DataEvent, Direction, Role};
pub use stream::{Pushed, Segment, Segments, Stream, StreamStats};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Captured bytes one event may hand on; more become a gap.
    pub max_event_bytes: usize,
    /// A connection with no event for this long is evicted.
    pub idle_timeout_ns: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 65_536,
            max_event_bytes: 256 * 1024,
            idle_timeout_ns: 300 * 1_000_000_000,
        }
    }
}

/// What the table knows about a connection besides its bytes.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub key: ConnKey,
    pub pid: u32,
    pub comm: Arc<str>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
    pub protocol: u8,
    /// First seen mid-stream: opened before the agent was looking.
    pub midstream: bool,
    /// The stream is TLS plaintext (the key is `ConnKey::plaintext`).
    pub tls: bool,
}

#[derive(Debug)]
pub struct Connection {
    pub info: ConnInfo,
    pub streams: [Stream; 2],
    pub last_seen_ns: u64,
    pub closed: bool,
}

impl Connection {
    pub fn stream_mut(&mut self, dir: Direction) -> &mut Stream {
        &mut self.streams[dir.index()]
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableStats {
    pub opened: u64,
    pub closed: u64,
    pub evicted_idle: u64,
    /// Connections evicted, least recently seen first, to make room for new ones (closes the
    /// kernel could not report, e.g. under a ring-buffer flood, would otherwise fill the table).
    pub evicted_full: u64,
    /// Events dropped because the table was at `max_connections`.
    pub rejected_full: u64,
    /// Summed over the streams of connections that have left the table.
    pub streams: StreamStats,
}

/// Resolves the role of a connection the kernel saw only mid-stream.
pub trait RoleResolver {
    fn resolve(&mut self, pid: u32, local: SocketAddr, remote: SocketAddr) -> Role;
    /// The process's comm, for a connection whose first event (the one that carries it) the
    /// agent never saw: dropped, or the connection was evicted here and came back.
    fn comm(&mut self, _pid: u32) -> Option<String> {
        None
    }
}

/// For tests and when /proc is not wanted.
pub struct NoResolver;

impl RoleResolver for NoResolver {
    fn resolve(&mut self, _: u32, _: SocketAddr, _: SocketAddr) -> Role {
        Role::Unknown
    }
}

pub struct ConnTable {
    conns: HashMap<ConnKey, Connection>,
    limits: Limits,
    stats: TableStats,
}

impl ConnTable {
    pub fn new(limits: Limits) -> Self {
        Self {
            conns: HashMap::new(),
            limits,
            stats: TableStats::default(),
        }
    }

    /// `ingest_payload` for a whole event, with the segments it made available.
    #[cfg(test)]
    pub fn ingest(
        &mut self,
        mut ev: DataEvent,
        resolver: &mut dyn RoleResolver,
    ) -> Option<(&mut Connection, Pushed, Segments)> {
        let payload = std::mem::take(&mut ev.payload);
        let mut out = Segments::new();
        let (conn, pushed) = self.ingest_payload(&ev, payload, resolver, &mut out)?;
        Some((conn, pushed, out))
    }

    /// Adds a data event, its payload apart, to its connection's stream; `out` gets the
    /// segments it made available. Returns None when the table is full. The pipeline hands the
    /// event on to the sink after this, and a copy of it per event (some 200 bytes) was the
    /// price of owning it here.
    pub fn ingest_payload(
        &mut self,
        ev: &DataEvent,
        payload: Bytes,
        resolver: &mut dyn RoleResolver,
        out: &mut Segments,
    ) -> Option<(&mut Connection, Pushed)> {
        let full = self.conns.len() >= self.limits.max_connections;
        let cap = self.limits.max_event_bytes;
        let conn = match self.conns.entry(ev.conn) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                if full {
                    self.stats.rejected_full += 1;
                    return None;
                }
                self.stats.opened += 1;
                let role = match ev.role {
                    Role::Unknown => resolver.resolve(ev.pid, ev.local, ev.remote),
                    known => known,
                };
                let comm = match ev.comm.as_str() {
                    "" => resolver.comm(ev.pid).unwrap_or_default().into(),
                    comm => comm.into(),
                };
                e.insert(Connection {
                    info: ConnInfo {
                        key: ev.conn,
                        pid: ev.pid,
                        comm,
                        local: ev.local,
                        remote: ev.remote,
                        role,
                        protocol: ev.protocol,
                        midstream: ev.midstream,
                        tls: ev.tls,
                    },
                    streams: [Stream::new(cap), Stream::new(cap)],
                    last_seen_ns: ev.ts_ns,
                    closed: false,
                })
            }
        };
        conn.last_seen_ns = conn.last_seen_ns.max(ev.ts_ns);
        let pushed = conn.streams[ev.direction.index()].push(ev.seq, ev.bytes, payload, out);
        Some((conn, pushed))
    }

    /// At `max_connections`, evicts the least recently seen eighth of the table (at least one):
    /// a new connection always finds room, and the cost of the scan is shared by the many
    /// connections that then fit. Returns the evicted, for the consumer to finish.
    pub fn make_room(&mut self, for_key: &ConnKey) -> Vec<Connection> {
        if self.conns.len() < self.limits.max_connections || self.conns.contains_key(for_key) {
            return Vec::new();
        }
        let mut by_age: Vec<(u64, ConnKey)> = self
            .conns
            .iter()
            .map(|(k, c)| (c.last_seen_ns, *k))
            .collect();
        let n = (by_age.len() / 8).max(1);
        by_age.select_nth_unstable(n - 1);
        let mut out = Vec::with_capacity(n);
        for (_, key) in by_age.into_iter().take(n) {
            if let Some(conn) = self.conns.remove(&key) {
                self.stats.evicted_full += 1;
                self.account(&conn);
                out.push(conn);
            }
        }
        out
    }

    /// Marks a connection closed; returns it if the table knew it.
    pub fn close(&mut self, ev: &CloseEvent) -> Option<&mut Connection> {
        let conn = self.conns.get_mut(&ev.conn)?;
        conn.closed = true;
        conn.last_seen_ns = conn.last_seen_ns.max(ev.ts_ns);
        Some(conn)
    }

    /// Removes a connection (closed and consumed).
    pub fn remove(&mut self, key: &ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(key)?;
        if conn.closed {
            self.stats.closed += 1;
        }
        self.account(&conn);
        Some(conn)
    }

    /// Evicts connections idle since before `now_ns - idle_timeout`; returns them so a consumer
    /// can finish what they hold.
    pub fn evict_idle(&mut self, now_ns: u64) -> Vec<Connection> {
        let deadline = now_ns.saturating_sub(self.limits.idle_timeout_ns);
        let idle: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_seen_ns < deadline)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(idle.len());
        for key in idle {
            if let Some(conn) = self.conns.remove(&key) {
                self.stats.evicted_idle += 1;
                self.account(&conn);
                out.push(conn);
            }
        }
        out
    }

    fn account(&mut self, conn: &Connection) {
        for s in &conn.streams {
            let t = &mut self.stats.streams;
            t.lost_bytes += s.stats.lost_bytes;
            t.uncaptured_bytes += s.stats.uncaptured_bytes;
            t.overflow_bytes += s.stats.overflow_bytes;
            t.stale_events += s.stats.stale_events;
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    pub fn keys(&self) -> Vec<ConnKey> {
        self.conns.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ev(sk: u64, dir: Direction, seq: u64, data: &str, ts: u64) -> DataEvent {
        DataEvent {
            ts_ns: ts,
            pid: 1,
            tid: 1,
            comm: crate::decode::tests::comm("t"),
            conn: ConnKey { sk, generation: 1 },
            local: "127.0.0.1:80".parse().unwrap(),
            remote: "127.0.0.1:5000".parse().unwrap(),
            direction: dir,
            role: Role::Unknown,
            protocol: 0,
            syscall: 1,
            seq,
            bytes: data.len() as u32,
            payload: Bytes::copy_from_slice(data.as_bytes()),
            truncated: false,
            no_payload: false,
            midstream: true,
            tls: false,
            goroutine: 0,
            context: None,
        }
    }

    struct AlwaysServer;
    impl RoleResolver for AlwaysServer {
        fn resolve(&mut self, _: u32, _: SocketAddr, _: SocketAddr) -> Role {
            Role::Server
        }
    }

    struct NamedProcess;
    impl RoleResolver for NamedProcess {
        fn resolve(&mut self, _: u32, _: SocketAddr, _: SocketAddr) -> Role {
            Role::Server
        }
        fn comm(&mut self, _: u32) -> Option<String> {
            Some("from-proc".into())
        }
    }

    #[test]
    fn a_connection_first_seen_without_its_comm_asks_the_resolver() {
        let mut t = ConnTable::new(Limits::default());
        // The kernel names the thread on a connection's first event only: a later one arrives
        // with zeros when the first was lost.
        let mut later = ev(1, Direction::Recv, 100, "GET / HTTP/1.1\r\n", 1);
        later.comm = crate::decode::tests::comm("");
        let (conn, _, _) = t.ingest(later, &mut NamedProcess).unwrap();
        assert_eq!(&*conn.info.comm, "from-proc");
        // A first event names it itself, and the resolver is not asked.
        let (conn, _, _) = t
            .ingest(ev(2, Direction::Recv, 0, "GET", 2), &mut NamedProcess)
            .unwrap();
        assert_eq!(&*conn.info.comm, "t");
    }

    #[test]
    fn directions_are_reassembled_separately() {
        let mut t = ConnTable::new(Limits::default());
        let seen = |t: &mut ConnTable, e: DataEvent| t.ingest(e, &mut NoResolver).unwrap().2;
        let recv_1 = seen(&mut t, ev(1, Direction::Recv, 0, "GET / HTTP/1.1\r\n", 1));
        let send = seen(&mut t, ev(1, Direction::Send, 0, "HTTP/1.1 200", 2));
        let recv_2 = seen(&mut t, ev(1, Direction::Recv, 16, "\r\n", 3));
        assert_eq!(
            [recv_1.to_vec(), recv_2.to_vec()].concat(),
            vec![
                Segment::Data(Bytes::from_static(b"GET / HTTP/1.1\r\n")),
                Segment::Data(Bytes::from_static(b"\r\n"))
            ]
        );
        assert_eq!(
            send.to_vec(),
            vec![Segment::Data(Bytes::from_static(b"HTTP/1.1 200"))]
        );
        let conn = t
            .conns
            .get(&ConnKey {
                sk: 1,
                generation: 1,
            })
            .unwrap();
        assert_eq!(conn.streams[Direction::Recv.index()].end(), Some(18));
        assert_eq!(conn.streams[Direction::Send.index()].end(), Some(12));
    }

    #[test]
    fn unknown_roles_are_resolved_once() {
        let mut t = ConnTable::new(Limits::default());
        let (conn, _, _) = t
            .ingest(ev(1, Direction::Recv, 0, "x", 1), &mut AlwaysServer)
            .unwrap();
        assert_eq!(conn.info.role, Role::Server);
    }

    #[test]
    fn the_table_is_bounded_and_counts_rejections() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let mut t = ConnTable::new(limits);
        for sk in 0..5 {
            t.ingest(ev(sk, Direction::Send, 0, "x", 1), &mut NoResolver);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.stats().rejected_full, 3);
        // Existing connections still take data.
        assert!(
            t.ingest(ev(0, Direction::Send, 1, "y", 2), &mut NoResolver)
                .is_some()
        );
    }

    #[test]
    fn idle_connections_are_evicted_and_closed_ones_removed() {
        let limits = Limits {
            idle_timeout_ns: 100,
            ..Limits::default()
        };
        let mut t = ConnTable::new(limits);
        t.ingest(ev(1, Direction::Send, 0, "x", 10), &mut NoResolver);
        t.ingest(ev(2, Direction::Send, 0, "x", 500), &mut NoResolver);
        let evicted = t.evict_idle(550);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].info.key.sk, 1);
        assert_eq!(t.stats().evicted_idle, 1);

        let close = CloseEvent {
            ts_ns: 600,
            conn: ConnKey {
                sk: 2,
                generation: 1,
            },
            local: "127.0.0.1:80".parse().unwrap(),
            remote: "127.0.0.1:5000".parse().unwrap(),
            role: Role::Server,
            totals: [1, 0],
        };
        assert!(t.close(&close).is_some());
        assert!(t.remove(&close.conn).is_some());
        assert!(t.is_empty());
        assert_eq!(t.stats().closed, 1);
    }

    #[test]
    fn a_reused_socket_pointer_is_a_new_connection() {
        let mut t = ConnTable::new(Limits::default());
        t.ingest(ev(1, Direction::Send, 0, "a", 1), &mut NoResolver);
        let mut again = ev(1, Direction::Send, 0, "b", 2);
        again.conn.generation = 2;
        let (_, pushed, _) = t.ingest(again, &mut NoResolver).unwrap();
        assert_eq!(pushed, Pushed::Appended { lost: 0 });
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_table_makes_room_by_evicting_the_least_recently_seen() {
        let limits = Limits {
            max_connections: 16,
            ..Limits::default()
        };
        let mut t = ConnTable::new(limits);
        for sk in 0..16 {
            t.ingest(ev(sk, Direction::Send, 0, "x", 100 + sk), &mut NoResolver);
        }
        let key = ConnKey {
            sk: 99,
            generation: 1,
        };
        let evicted = t.make_room(&key);
        // An eighth, the oldest: sk 0 and 1.
        let mut gone: Vec<u64> = evicted.iter().map(|c| c.info.key.sk).collect();
        gone.sort();
        assert_eq!(gone, [0, 1]);
        assert_eq!(t.stats().evicted_full, 2);
        assert!(
            t.ingest(ev(99, Direction::Send, 0, "y", 200), &mut NoResolver)
                .is_some()
        );
        // Room is made only when needed, and never for a connection already in the table.
        assert!(t.make_room(&key).is_empty());
    }
}
