//! What the kernel programs cannot tell, read from /proc: the role of a connection that was open
//! before the agent started (no connect/accept was seen), from the listening sockets of the
//! process's network namespace.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use crate::{conn::RoleResolver, decode::Role};

const TCP_LISTEN: u8 = 0x0a;

/// Listening sockets in the text of /proc/PID/net/tcp or tcp6.
pub fn parse_listeners(text: &str) -> HashSet<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = u8::from_str_radix(cols.nth(1)?, 16).ok()?;
            (state == TCP_LISTEN).then(|| parse_addr(local)).flatten()
        })
        .collect()
}

/// "0100007F:1F90" or the 32-hex-digit IPv6 form; each 32-bit word is in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let v = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(v.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(o);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether `local` is served by one of `listeners` (exact address or a wildcard bind).
pub fn is_server_side(listeners: &HashSet<SocketAddr>, local: SocketAddr) -> bool {
    listeners
        .iter()
        .any(|l| l.port() == local.port() && (l.ip() == local.ip() || l.ip().is_unspecified()))
}

/// The role of the socket `local` <-> `remote`: a listener on the local port makes it the server
/// side, one on the remote end (same namespace) the client side. Without either (the listener
/// has closed), the side on an ephemeral port is the client, if only one is.
pub fn role_of(
    listeners: &HashSet<SocketAddr>,
    ephemeral: (u16, u16),
    local: SocketAddr,
    remote: SocketAddr,
) -> Role {
    if is_server_side(listeners, local) {
        return Role::Server;
    }
    if is_server_side(listeners, remote) {
        return Role::Client;
    }
    let in_range = |p: u16| (ephemeral.0..=ephemeral.1).contains(&p);
    match (in_range(local.port()), in_range(remote.port())) {
        (true, false) => Role::Client,
        (false, true) => Role::Server,
        _ => Role::Unknown,
    }
}

/// "32768\t60999" from /proc/sys/net/ipv4/ip_local_port_range.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// How long one read of a network namespace's listening sockets answers for it. Reading them
/// is a walk of the host's whole TCP hash table (/proc/PID/net/tcp and tcp6 are filtered views
/// of it: ~3 ms per file on a 24 GiB host with a dozen sockets, more with many), on the
/// pipeline's thread. A read per connection cost 6-7 ms per connection met mid-stream: seconds
/// for an agent starting on a node with thousands of pooled connections. Listeners outlive the
/// connections they accept, so a second-old view still names the server side of any connection
/// it could; one opened since falls to the ephemeral-port rule at worst.
const LISTENERS_FRESH: Duration = Duration::from_secs(1);

/// What one read of a namespace gave.
struct Namespace {
    read_at: Instant,
    listeners: HashSet<SocketAddr>,
    ephemeral: (u16, u16),
}

/// Resolves roles from /proc/PID/net/tcp{,6}: only connections seen mid-stream (open before the
/// agent started, or evicted) need it. The listeners are kept per network namespace for
/// `LISTENERS_FRESH`. A process already gone (a short-lived client whose pooled connection
/// predates the agent) is resolved against the listeners of the agent's own network namespace:
/// right for every process on the host network, and when two ephemeral ports meet, as on
/// loopback, nothing else can tell the client from the server. Also names the process of a
/// connection whose first event (the one that carries the comm) was not seen.
pub struct ProcRoles {
    namespaces: HashMap<u64, Namespace>,
    fresh: Duration,
    /// Namespaces read so far (a view of the cost, for tests).
    reads: u64,
}

impl Default for ProcRoles {
    fn default() -> Self {
        Self {
            namespaces: HashMap::new(),
            fresh: LISTENERS_FRESH,
            reads: 0,
        }
    }
}

/// The network namespace's inode (/proc/PID/ns/net), which names it host-wide.
fn netns(proc_dir: &str) -> Option<u64> {
    std::fs::metadata(format!("{proc_dir}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Where a view of a namespace that has no name is kept: read again on every lookup.
const UNNAMED: u64 = u64::MAX;

impl ProcRoles {
    /// The key of an up-to-date view of the listeners and ephemeral range of the namespace
    /// `proc_dir` (/proc/PID or /proc/self) lives in: the kept one while fresh, else read anew.
    /// None when the process is gone (its /proc/PID/net cannot be read).
    fn view(&mut self, proc_dir: &str, now: Instant) -> Option<u64> {
        let fresh = self.fresh;
        let stale = move |n: &Namespace| now.saturating_duration_since(n.read_at) >= fresh;
        let named = netns(proc_dir);
        if let Some(key) = named
            && self.namespaces.get(&key).is_some_and(|n| !stale(n))
        {
            return Some(key);
        }
        let mut listeners = HashSet::new();
        let mut read = false;
        for file in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(format!("{proc_dir}/net/{file}")) {
                listeners.extend(parse_listeners(&text));
                read = true;
            }
        }
        if !read {
            return None;
        }
        self.reads += 1;
        let ephemeral = std::fs::read_to_string(format!(
            "{proc_dir}/root/proc/sys/net/ipv4/ip_local_port_range"
        ))
        .or_else(|_| std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range"))
        .ok()
        .and_then(|t| parse_port_range(&t))
        .unwrap_or(DEFAULT_EPHEMERAL);
        // Namespaces come and go with pods: stale views go when a view is added.
        self.namespaces.retain(|_, n| !stale(n));
        let key = named.unwrap_or(UNNAMED);
        self.namespaces.insert(
            key,
            Namespace {
                read_at: now,
                listeners,
                ephemeral,
            },
        );
        Some(key)
    }
}

/// Linux's default ip_local_port_range.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

impl RoleResolver for ProcRoles {
    fn comm(&mut self, pid: u32) -> Option<String> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        Some(comm.trim_end_matches('\n').to_owned())
    }

    fn resolve(&mut self, pid: u32, local: SocketAddr, remote: SocketAddr) -> Role {
        let now = Instant::now();
        let key = self
            .view(&format!("/proc/{pid}"), now)
            .or_else(|| self.view("/proc/self", now));
        match key.and_then(|k| self.namespaces.get(&k)) {
            Some(ns) => role_of(&ns.listeners, ns.ephemeral, local, remote),
            None => role_of(&HashSet::new(), DEFAULT_EPHEMERAL, local, remote),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
";

    /// A process gone before its connection's first event: the agent's own namespace's
    /// listeners still tell the two ends apart, even when both ports are ephemeral.
    #[test]
    fn a_vanished_process_is_resolved_against_this_namespace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client: SocketAddr = "127.0.0.1:54112".parse().unwrap();
        // Above any pid_max: no /proc entry.
        let gone = 4_194_304 + 7;
        assert_eq!(
            ProcRoles::default().resolve(gone, server, client),
            Role::Server
        );
        assert_eq!(
            ProcRoles::default().resolve(gone, client, server),
            Role::Client
        );
    }

    /// Connections met mid-stream come in bursts (an agent starting on a node of pooled
    /// connections, a client resetting many at once): one read of the namespace serves them.
    #[test]
    fn a_namespace_is_read_once_while_its_view_is_fresh() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client: SocketAddr = "127.0.0.1:54113".parse().unwrap();
        let me = std::process::id();
        let mut roles = ProcRoles::default();
        for _ in 0..50 {
            assert_eq!(roles.resolve(me, server, client), Role::Server);
            assert_eq!(roles.resolve(me, client, server), Role::Client);
        }
        assert_eq!(roles.reads, 1);
    }

    /// A listener opened after the view was read is seen once the view is stale.
    #[test]
    fn a_stale_view_is_read_again() {
        let me = std::process::id();
        let mut roles = ProcRoles {
            fresh: Duration::ZERO,
            ..ProcRoles::default()
        };
        let peer: SocketAddr = "127.0.0.1:54114".parse().unwrap();
        // Both ports ephemeral and no listener yet: nothing tells the ends apart.
        let later = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = later.local_addr().unwrap();
        drop(later);
        assert_eq!(roles.resolve(me, local, peer), Role::Unknown);
        let listener = std::net::TcpListener::bind(local).unwrap();
        assert_eq!(roles.resolve(me, local, peer), Role::Server);
        assert_eq!(roles.reads, 2);
        // Only the newest view of a namespace is kept.
        assert_eq!(roles.namespaces.len(), 1);
        drop(listener);
    }

    #[test]
    fn finds_listeners_in_both_families() {
        let mut l = parse_listeners(TCP);
        assert_eq!(l.len(), 2);
        assert!(l.contains(&"127.0.0.1:8080".parse().unwrap()));
        assert!(l.contains(&"0.0.0.0:80".parse().unwrap()));
        l.extend(parse_listeners(TCP6));
        assert!(l.contains(&"[::1]:8081".parse().unwrap()));
    }

    #[test]
    fn server_side_means_a_listener_on_the_local_port() {
        let l = parse_listeners(TCP);
        assert!(is_server_side(&l, "127.0.0.1:8080".parse().unwrap()));
        assert!(is_server_side(&l, "10.1.2.3:80".parse().unwrap()));
        assert!(!is_server_side(&l, "127.0.0.1:50000".parse().unwrap()));
    }

    #[test]
    fn roles_from_listeners_then_from_ephemeral_ports() {
        let l = parse_listeners(TCP);
        let eph = (32768, 60999);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            role_of(&l, eph, a("127.0.0.1:8080"), a("127.0.0.1:50000")),
            Role::Server
        );
        assert_eq!(
            role_of(&l, eph, a("127.0.0.1:50000"), a("127.0.0.1:8080")),
            Role::Client
        );
        let none = HashSet::new();
        assert_eq!(
            role_of(&none, eph, a("10.0.0.1:40000"), a("10.0.0.2:5432")),
            Role::Client
        );
        assert_eq!(
            role_of(&none, eph, a("10.0.0.1:5432"), a("10.0.0.2:40000")),
            Role::Server
        );
        assert_eq!(
            role_of(&none, eph, a("10.0.0.1:40000"), a("10.0.0.2:40001")),
            Role::Unknown
        );
    }

    #[test]
    fn parses_the_ephemeral_port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("bad"), None);
        assert_eq!(parse_port_range("9 1"), None);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_listeners("header\nnot a line\n 0: zz:zz 0 0A\n").is_empty());
    }
}
