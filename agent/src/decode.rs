//! Ring buffer records -> typed events. Pure and bounds-checked: the bytes come from the kernel,
//! but a version skew or a bug there must yield an error to count, never a panic or garbage.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{
    conn::{AF_INET, AF_INET6, ConnTuple, ROLE_CLIENT, ROLE_SERVER},
    context::{CTX_KERNEL, CTX_LOCAL, CTX_OPTION},
    event::{
        self as wire, CLOSE_EVENT_SIZE, DATA_EVENT_SIZE, DIR_RECV, DIR_SEND, EVENT_VERSION,
        EXEC_ARGV_MAX, EXEC_ENV_MAX, EXEC_EVENT_SIZE, EXEC_FILENAME_MAX, FLAG_MIDSTREAM,
        FLAG_NO_PAYLOAD, FLAG_TLS, FLAG_TRUNCATED, FORK_EVENT_SIZE, HANDOFF_EVENT_SIZE, KIND_CLOSE,
        KIND_DATA, KIND_EXEC, KIND_FORK, KIND_HANDOFF, KIND_WAKE, MAX_PAYLOAD, WAKE_EVENT_SIZE,
    },
};
use bytes::{Bytes, BytesMut};
use zerocopy::FromBytes as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than its {need}-byte header")]
    Short { need: usize, got: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("event version {0} is not the agent's {EVENT_VERSION}")]
    Version(u16),
    #[error("record says {claimed} bytes but holds {got}")]
    Length { claimed: usize, got: usize },
    #[error(
        "payload of {captured} bytes exceeds the {bytes} the syscall moved or the {MAX_PAYLOAD}-byte cap"
    )]
    Payload { captured: usize, bytes: usize },
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown direction {0}")]
    Direction(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Send,
    Recv,
}

impl Direction {
    pub fn index(self) -> usize {
        match self {
            Direction::Send => 0,
            Direction::Recv => 1,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Recv => "recv",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Server,
    Unknown,
}

impl Role {
    fn from_wire(v: u8) -> Self {
        match v {
            ROLE_CLIENT => Role::Client,
            ROLE_SERVER => Role::Server,
            _ => Role::Unknown,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "unknown",
        }
    }
}

/// One connection, as the kernel names it: the socket pointer and the time it was first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub sk: u64,
    pub generation: u64,
}

impl ConnKey {
    /// Marks the key of a connection's TLS plaintext: generations are monotonic nanoseconds,
    /// far below this bit. The plaintext is a stream of its own, parsed from its own start;
    /// the ciphertext before it (the handshake) stays under the plain key.
    pub const PLAINTEXT: u64 = 1 << 63;

    pub fn plaintext(self) -> ConnKey {
        ConnKey {
            sk: self.sk,
            generation: self.generation | Self::PLAINTEXT,
        }
    }

    pub fn ciphertext(self) -> ConnKey {
        ConnKey {
            sk: self.sk,
            generation: self.generation & !Self::PLAINTEXT,
        }
    }

    pub fn is_plaintext(self) -> bool {
        self.generation & Self::PLAINTEXT != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataEvent {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    pub conn: ConnKey,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
    pub role: Role,
    pub protocol: u8,
    pub syscall: u8,
    /// Stream offset of the first byte moved.
    pub seq: u64,
    /// Bytes moved; `payload.len()` may be smaller (capture cap, or no user buffer).
    pub bytes: u32,
    pub payload: Bytes,
    pub truncated: bool,
    pub no_payload: bool,
    pub midstream: bool,
    /// TLS plaintext from the library probes (`conn` is then the plaintext key).
    pub tls: bool,
    /// Go's goroutine register at the syscall (`agent_common::event::DataEvent::goroutine`);
    /// meaningless for other programs.
    pub goroutine: u64,
    /// `--tcp-context`: the ids the kernel put this event's request under.
    pub context: Option<KernelContext>,
}

impl DataEvent {
    /// An event with nothing in it but its connection: for fuzzing and tests that drive a sink.
    pub fn for_tests(conn: ConnKey) -> Self {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("literal");
        Self {
            ts_ns: 0,
            pid: 1,
            tid: 1,
            comm: Comm::new([0; 16], 0),
            conn,
            local: addr,
            remote: addr,
            direction: Direction::Send,
            role: Role::Unknown,
            protocol: 0,
            syscall: 0,
            seq: 0,
            bytes: 0,
            payload: Bytes::new(),
            truncated: false,
            no_payload: false,
            midstream: false,
            tls: false,
            goroutine: 0,
            context: None,
        }
    }
}

/// A task's comm (at most 15 bytes), kept inline: an event carries one, and a heap string per
/// event was measurable at 100k+ events/s.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; 16],
    len: u8,
}

impl Comm {
    fn new(bytes: [u8; 16], len: usize) -> Self {
        let len = len.min(16);
        // Keep whole UTF-8 characters only (comm is cut at 15 bytes, possibly mid-character).
        // Mostly ASCII, which is checked a word at a time (validating UTF-8 was 1% of the
        // pipeline: one comm per event).
        let valid = if bytes[..len].is_ascii() {
            len
        } else {
            match std::str::from_utf8(&bytes[..len]) {
                Ok(_) => len,
                Err(e) => e.valid_up_to(),
            }
        };
        Self {
            bytes,
            len: valid as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSource {
    /// Picked by the kernel (client: the CLIENT span's ids; server: a trace id to start with).
    Kernel,
    /// Read from the peer's TCP option (trace id and the peer's CLIENT span id).
    Option,
    /// The caller is a local process (its CLIENT span's ids).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelContext {
    pub source: ContextSource,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

impl KernelContext {
    fn from_wire(source: u8, trace_id: [u8; 16], span_id: [u8; 8]) -> Option<Self> {
        let source = match source {
            CTX_KERNEL => ContextSource::Kernel,
            CTX_OPTION => ContextSource::Option,
            CTX_LOCAL => ContextSource::Local,
            _ => return None,
        };
        // An all-zero trace id is invalid in W3C terms: treat as absent.
        (trace_id != [0; 16]).then_some(Self {
            source,
            trace_id,
            span_id,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseEvent {
    pub ts_ns: u64,
    pub conn: ConnKey,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
    /// Stream lengths at close, indexed by `Direction::index`.
    pub totals: [u64; 2],
}

/// Thread `parent_tid` of process `pid` created the task `child_tid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkEvent {
    pub ts_ns: u64,
    pub pid: u32,
    pub parent_tid: u32,
    pub child_tid: u32,
}

/// In Go program `pid`, the writer goroutine `from` now writes a request for goroutine `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffEvent {
    pub pid: u32,
    pub from: u64,
    pub to: u64,
}

/// Process `pid` now runs a new program (agent_common::event::ExecEvent): what /proc would say
/// of it, for when it is gone before the agent looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecEvent {
    pub ts_ns: u64,
    pub pid: u32,
    /// The path it was executed by.
    pub filename: String,
    /// At most `argc` arguments; the last may be cut short.
    pub argv: Vec<String>,
    /// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, when set.
    pub environ: Vec<(String, String)>,
}

/// In process `pid`, thread `waker` woke thread `wakee` through a futex (pool runtimes only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeEvent {
    pub ts_ns: u64,
    pub pid: u32,
    pub waker: u32,
    pub wakee: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Data(DataEvent),
    Close(CloseEvent),
    Fork(ForkEvent),
    Handoff(HandoffEvent),
    Exec(ExecEvent),
    Wake(WakeEvent),
}

/// A little cursor over native-endian fields; every read is checked.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers check the record length against the fixed struct size first, so this cannot
        // run past the end; fall back to zeros rather than panic if that ever changes.
        let out = self
            .buf
            .get(self.pos..self.pos + N)
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; N]);
        self.pos += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_ne_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
    fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

struct Header {
    kind: u16,
    len: usize,
    ts_ns: u64,
    pid_tgid: u64,
}

fn header(f: &mut Fields<'_>) -> Result<Header, DecodeError> {
    let got = f.buf.len();
    if got < 24 {
        return Err(DecodeError::Short { need: 24, got });
    }
    let kind = f.u16();
    let version = f.u16();
    if version != EVENT_VERSION {
        return Err(DecodeError::Version(version));
    }
    let len = f.u32() as usize;
    Ok(Header {
        kind,
        len,
        ts_ns: f.u64(),
        pid_tgid: f.u64(),
    })
}

/// `ConnTuple` -> (local, remote), from the record's fields.
fn tuple(f: &mut Fields<'_>) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let bytes: [u8; size_of::<ConnTuple>()] = f.take();
    // Sizes checked at compile time.
    let tuple: ConnTuple = zerocopy::transmute!(bytes);
    addresses(&tuple)
}

/// `ConnTuple` -> (local, remote).
fn addresses(t: &ConnTuple) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let family = t.family;
    let ip = |a: [u8; 16]| -> Result<IpAddr, DecodeError> {
        match family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
            AF_INET6 => {
                let v6 = Ipv6Addr::from(a);
                // Dual-stack sockets talking to IPv4 peers: show the IPv4 address.
                Ok(v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)))
            }
            other => Err(DecodeError::Family(other)),
        }
    };
    Ok((
        SocketAddr::new(ip(t.saddr)?, t.sport),
        SocketAddr::new(ip(t.daddr)?, t.dport),
    ))
}

/// The fields after the header of an exec record (its fixed length is checked by the caller).
fn exec(f: &mut Fields<'_>, ts_ns: u64, pid: u32) -> ExecEvent {
    let filename_len = f.u16() as usize;
    let argv_len = f.u16() as usize;
    let name_len = f.u16() as usize;
    let attrs_len = f.u16() as usize;
    let argc = f.u32() as usize;
    f.skip(4);
    let area = |f: &mut Fields<'_>, size: usize, len: usize| -> Vec<u8> {
        let bytes = f
            .buf
            .get(f.pos..f.pos + len.min(size))
            .unwrap_or_default()
            .to_vec();
        f.skip(size);
        bytes
    };
    let filename = area(f, EXEC_FILENAME_MAX, filename_len);
    let argv = area(f, EXEC_ARGV_MAX, argv_len);
    let name = area(f, EXEC_ENV_MAX, name_len);
    let attrs = area(f, EXEC_ENV_MAX, attrs_len);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    // Each argument ends in a NUL: the piece after the last one is not an argument.
    let argv: Vec<String> = argv.split(|&b| b == 0).take(argc).map(text).collect();
    let environ = [name, attrs]
        .iter()
        .filter_map(|var| {
            let (k, v) = text(var)
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))?;
            matches!(k.as_str(), "OTEL_SERVICE_NAME" | "OTEL_RESOURCE_ATTRIBUTES").then_some((k, v))
        })
        .collect();
    ExecEvent {
        ts_ns,
        pid,
        filename: text(&filename),
        argv,
        environ,
    }
}

/// Where decoded payloads are copied: small ones share 4 KiB blocks, so one allocation (and one
/// free, on the pipeline thread) serves dozens of events instead of one each, and sharing a
/// payload later (a kept header's `Bytes::slice_ref`) needs no allocation either. A payload kept
/// past its event (a request's header values until its span is exported, events held while a
/// protocol is detected) keeps its block alive: at most 4 KiB, the size of one full payload.
#[derive(Default)]
pub struct PayloadArena {
    block: BytesMut,
}

impl PayloadArena {
    const BLOCK: usize = 4096;

    pub fn copy(&mut self, src: &[u8]) -> Bytes {
        if src.is_empty() {
            return Bytes::new();
        }
        if src.len() > Self::BLOCK / 2 {
            return Bytes::copy_from_slice(src);
        }
        if self.block.capacity() - self.block.len() < src.len() {
            self.block = BytesMut::with_capacity(Self::BLOCK);
        }
        self.block.extend_from_slice(src);
        self.block.split().freeze()
    }
}

/// `decode_with` a fresh arena: for tests, fuzzing and one-off records.
pub fn decode(buf: &[u8]) -> Result<Event, DecodeError> {
    decode_with(buf, &mut PayloadArena::default())
}

pub fn decode_with(buf: &[u8], arena: &mut PayloadArena) -> Result<Event, DecodeError> {
    let mut f = Fields { buf, pos: 0 };
    let h = header(&mut f)?;
    let (need, kind) = match h.kind {
        KIND_DATA => (DATA_EVENT_SIZE, KIND_DATA),
        KIND_CLOSE => (CLOSE_EVENT_SIZE, KIND_CLOSE),
        KIND_FORK => (FORK_EVENT_SIZE, KIND_FORK),
        KIND_HANDOFF => (HANDOFF_EVENT_SIZE, KIND_HANDOFF),
        KIND_EXEC => (EXEC_EVENT_SIZE, KIND_EXEC),
        KIND_WAKE => (WAKE_EVENT_SIZE, KIND_WAKE),
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if buf.len() < need {
        return Err(DecodeError::Short {
            need,
            got: buf.len(),
        });
    }
    // The ring may pad records; the header's length is the truth, and must fit.
    if h.len < need || h.len > buf.len() {
        return Err(DecodeError::Length {
            claimed: h.len,
            got: buf.len(),
        });
    }
    let pid = (h.pid_tgid >> 32) as u32;
    let tid = h.pid_tgid as u32;
    if kind == KIND_HANDOFF {
        return Ok(Event::Handoff(HandoffEvent {
            pid,
            from: f.u64(),
            to: f.u64(),
        }));
    }
    if kind == KIND_WAKE {
        return Ok(Event::Wake(WakeEvent {
            ts_ns: h.ts_ns,
            pid,
            waker: tid,
            wakee: f.u32(),
        }));
    }
    if kind == KIND_EXEC {
        return Ok(Event::Exec(exec(&mut f, h.ts_ns, pid)));
    }
    if kind == KIND_FORK {
        return Ok(Event::Fork(ForkEvent {
            ts_ns: h.ts_ns,
            pid,
            parent_tid: tid,
            child_tid: f.u32(),
        }));
    }
    if kind == KIND_DATA {
        return data(buf, &h, arena);
    }
    // What is left is a close record.
    let conn = ConnKey {
        sk: f.u64(),
        generation: f.u64(),
    };
    let (local, remote) = tuple(&mut f)?;
    Ok(Event::Close(CloseEvent {
        ts_ns: h.ts_ns,
        conn,
        local,
        remote,
        totals: [f.u64(), f.u64()],
        role: Role::from_wire(f.u8()),
    }))
}

/// A data record, read as the struct the programs wrote: one load of its 152 bytes instead of
/// some thirty field reads, each checked against the record's end (half of decoding a record).
/// The caller checked that the record holds the struct.
fn data(buf: &[u8], h: &Header, arena: &mut PayloadArena) -> Result<Event, DecodeError> {
    // A copy (the ring does not promise the struct's alignment to the slice); `FromBytes` is
    // checked at compile time to accept any bytes.
    let Ok((e, _)) = wire::DataEvent::read_from_prefix(buf) else {
        return Err(DecodeError::Short {
            need: DATA_EVENT_SIZE,
            got: buf.len(),
        });
    };
    let (local, remote) = addresses(&e.tuple)?;
    let direction = match e.direction {
        DIR_SEND => Direction::Send,
        DIR_RECV => Direction::Recv,
        other => return Err(DecodeError::Direction(other)),
    };
    let (bytes, captured) = (e.bytes, e.captured as usize);
    if captured > bytes as usize || captured > MAX_PAYLOAD || DATA_EVENT_SIZE + captured != h.len {
        return Err(DecodeError::Payload {
            captured,
            bytes: bytes as usize,
        });
    }
    let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
    let conn = ConnKey {
        sk: e.sk,
        generation: e.conn_gen,
    };
    let flags = e.flags;
    Ok(Event::Data(DataEvent {
        ts_ns: h.ts_ns,
        pid: (h.pid_tgid >> 32) as u32,
        tid: h.pid_tgid as u32,
        comm: Comm::new(e.comm, comm_len),
        conn: if flags & FLAG_TLS != 0 {
            conn.plaintext()
        } else {
            conn
        },
        local,
        remote,
        direction,
        role: Role::from_wire(e.role),
        protocol: e.protocol,
        syscall: e.syscall,
        seq: e.seq,
        bytes,
        payload: arena.copy(&buf[DATA_EVENT_SIZE..DATA_EVENT_SIZE + captured]),
        truncated: flags & FLAG_TRUNCATED != 0,
        no_payload: flags & FLAG_NO_PAYLOAD != 0,
        midstream: flags & FLAG_MIDSTREAM != 0,
        tls: flags & FLAG_TLS != 0,
        goroutine: e.goroutine,
        context: KernelContext::from_wire(e.ctx_source, e.ctx.trace_id, e.ctx.span_id),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agent_common::{conn::ConnTuple, event as wire};

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: test-only view of a repr(C) plain-data struct.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    pub(crate) fn comm(s: &str) -> Comm {
        let mut bytes = [0u8; 16];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Comm::new(bytes, s.len())
    }

    #[test]
    fn small_payloads_share_a_block_and_large_ones_do_not() {
        let mut arena = PayloadArena::default();
        let a = arena.copy(b"GET / HTTP/1.1\r\n");
        let b = arena.copy(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(&a[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(&b[..], b"HTTP/1.1 200 OK\r\n");
        // Side by side in one block: one allocation for both.
        assert_eq!(b.as_ptr(), a[a.len()..].as_ptr());
        // More than half a block gets its own allocation, and leaves the block as it was.
        let big = arena.copy(&[7u8; PayloadArena::BLOCK / 2 + 1]);
        assert!(big.iter().all(|&x| x == 7));
        let c = arena.copy(b"x");
        assert_eq!(c.as_ptr(), b[b.len()..].as_ptr());
        // A payload that does not fit what is left starts a new block, whole.
        let mut filled = a.len() + b.len() + c.len();
        while filled + 2000 <= PayloadArena::BLOCK {
            let _ = arena.copy(&[1u8; 2000]);
            filled += 2000;
        }
        let d = arena.copy(&[9u8; 2000]);
        assert_eq!(&d[..], &[9u8; 2000][..]);
        assert!(arena.copy(b"").is_empty());
        // The earlier payloads are intact after their block was left behind.
        assert_eq!(&a[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn a_comm_cut_mid_character_keeps_whole_characters() {
        let mut bytes = [0u8; 16];
        bytes[..15].copy_from_slice("abcdefghijklmn\u{e9}".as_bytes().get(..15).unwrap());
        assert_eq!(Comm::new(bytes, 15).as_str(), "abcdefghijklmn");
    }

    /// A data record as the kernel writes it.
    pub(crate) fn data_record(seq: u64, bytes: u32, payload: &[u8], dir: u8, flags: u8) -> Vec<u8> {
        let mut tuple = ConnTuple {
            family: AF_INET,
            sport: 8080,
            dport: 40000,
            ..Default::default()
        };
        tuple.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tuple.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"server");
        let ev = wire::DataEvent {
            header: wire::EventHeader {
                kind: KIND_DATA,
                version: EVENT_VERSION,
                len: (DATA_EVENT_SIZE + payload.len()) as u32,
                ts_ns: 1_000,
                pid_tgid: (42 << 32) | 43,
            },
            sk: 0xffff_8880_0000_1000,
            conn_gen: 7,
            tuple,
            seq,
            bytes,
            captured: payload.len() as u32,
            comm,
            direction: dir,
            role: ROLE_SERVER,
            protocol: 1,
            syscall: 2,
            flags,
            ctx_source: 0,
            _pad: [0; 2],
            ctx: Default::default(),
            goroutine: 0x00c0_0000_61a0,
        };
        let mut out = as_bytes(&ev).to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_handoff_record() {
        let ev = wire::HandoffEvent {
            header: wire::EventHeader {
                kind: KIND_HANDOFF,
                version: EVENT_VERSION,
                len: HANDOFF_EVENT_SIZE as u32,
                ts_ns: 5,
                pid_tgid: (42 << 32) | 44,
            },
            from: 0x00c0_0000_0100,
            to: 0x00c0_0000_0900,
        };
        assert_eq!(
            decode(as_bytes(&ev)).unwrap(),
            Event::Handoff(HandoffEvent {
                pid: 42,
                from: 0x00c0_0000_0100,
                to: 0x00c0_0000_0900
            })
        );
    }

    #[test]
    fn decodes_a_data_record() {
        let rec = data_record(10, 5, b"hello", DIR_RECV, FLAG_MIDSTREAM);
        let Event::Data(ev) = decode(&rec).unwrap() else {
            panic!("not data")
        };
        assert_eq!((ev.pid, ev.tid), (42, 43));
        assert_eq!(ev.goroutine, 0x00c0_0000_61a0);
        assert_eq!(ev.comm.as_str(), "server");
        assert_eq!(ev.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(ev.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!(ev.direction, Direction::Recv);
        assert_eq!(ev.role, Role::Server);
        assert_eq!((ev.seq, ev.bytes), (10, 5));
        assert_eq!(&ev.payload[..], b"hello");
        assert!(ev.midstream && !ev.truncated && !ev.no_payload);
    }

    #[test]
    fn decodes_ipv6_and_unmaps_ipv4_mapped_addresses() {
        let mut rec = data_record(0, 1, b"x", DIR_SEND, 0);
        let mut tuple = ConnTuple {
            family: AF_INET6,
            sport: 1,
            dport: 2,
            ..Default::default()
        };
        tuple.saddr = Ipv6Addr::LOCALHOST.octets();
        tuple.daddr = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
        rec[40..80].copy_from_slice(as_bytes(&tuple));
        let Event::Data(ev) = decode(&rec).unwrap() else {
            panic!("not data")
        };
        assert_eq!(ev.local, "[::1]:1".parse().unwrap());
        assert_eq!(ev.remote, "10.0.0.1:2".parse().unwrap());
    }

    #[test]
    fn decodes_a_close_record() {
        let ev = wire::CloseEvent {
            header: wire::EventHeader {
                kind: KIND_CLOSE,
                version: EVENT_VERSION,
                len: CLOSE_EVENT_SIZE as u32,
                ts_ns: 5,
                pid_tgid: 0,
            },
            sk: 1,
            conn_gen: 2,
            tuple: ConnTuple {
                family: AF_INET,
                ..Default::default()
            },
            seq: [100, 200],
            role: ROLE_CLIENT,
            _pad: [0; 7],
        };
        let Event::Close(c) = decode(as_bytes(&ev)).unwrap() else {
            panic!("not close")
        };
        assert_eq!(
            c.conn,
            ConnKey {
                sk: 1,
                generation: 2
            }
        );
        assert_eq!(c.totals, [100, 200]);
        assert_eq!(c.role, Role::Client);
    }

    #[test]
    fn decodes_a_fork_record() {
        let ev = wire::ForkEvent {
            header: wire::EventHeader {
                kind: KIND_FORK,
                version: EVENT_VERSION,
                len: FORK_EVENT_SIZE as u32,
                ts_ns: 9,
                pid_tgid: (42 << 32) | 43,
            },
            child_tid: 44,
            _pad: 0,
        };
        let rec = as_bytes(&ev);
        assert_eq!(
            decode(rec),
            Ok(Event::Fork(ForkEvent {
                ts_ns: 9,
                pid: 42,
                parent_tid: 43,
                child_tid: 44
            }))
        );
        for len in 0..rec.len() {
            assert!(decode(&rec[..len]).is_err());
        }
    }

    #[test]
    fn decodes_a_wake_record() {
        let ev = wire::WakeEvent {
            header: wire::EventHeader {
                kind: KIND_WAKE,
                version: EVENT_VERSION,
                len: WAKE_EVENT_SIZE as u32,
                ts_ns: 9,
                pid_tgid: (42 << 32) | 43,
            },
            wakee: 44,
            _pad: 0,
        };
        let rec = as_bytes(&ev);
        assert_eq!(
            decode(rec),
            Ok(Event::Wake(WakeEvent {
                ts_ns: 9,
                pid: 42,
                waker: 43,
                wakee: 44
            }))
        );
        for len in 0..rec.len() {
            assert!(decode(&rec[..len]).is_err());
        }
    }

    #[test]
    fn decodes_an_exec_record() {
        let mut ev = wire::ExecEvent {
            header: wire::EventHeader {
                kind: KIND_EXEC,
                version: EVENT_VERSION,
                len: EXEC_EVENT_SIZE as u32,
                ts_ns: 9,
                pid_tgid: (42 << 32) | 42,
            },
            filename_len: 13,
            argv_len: 0,
            service_name_len: 0,
            resource_attributes_len: 0,
            argc: 3,
            _pad: 0,
            filename: [0xff; EXEC_FILENAME_MAX],
            argv: [0xff; EXEC_ARGV_MAX],
            service_name: [0; EXEC_ENV_MAX],
            resource_attributes: [0; EXEC_ENV_MAX],
        };
        ev.filename[..13].copy_from_slice(b"/usr/bin/curl");
        // The argument area as the kernel lays it out: each string NUL-terminated.
        let args = b"curl\0-s\0\0";
        ev.argv[..args.len()].copy_from_slice(args);
        ev.argv_len = args.len() as u16;
        let name = b"OTEL_SERVICE_NAME=probe";
        ev.service_name[..name.len()].copy_from_slice(name);
        ev.service_name_len = name.len() as u16;
        // Anything else in a slot is not taken for a naming variable.
        let other = b"OTEL_RESOURCE_ATTRIBUTESX=a=b";
        ev.resource_attributes[..other.len()].copy_from_slice(other);
        ev.resource_attributes_len = other.len() as u16;
        let rec = as_bytes(&ev).to_vec();
        for len in 0..rec.len() {
            assert!(decode(&rec[..len]).is_err());
        }
        assert_eq!(
            decode(&rec),
            Ok(Event::Exec(ExecEvent {
                ts_ns: 9,
                pid: 42,
                filename: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "-s".into(), "".into()],
                environ: vec![("OTEL_SERVICE_NAME".into(), "probe".into())],
            }))
        );
        // An argument area cut at its cap keeps the part it has.
        ev.argc = 5;
        ev.argv_len = 7;
        let Ok(Event::Exec(cut)) = decode(as_bytes(&ev)) else {
            panic!("exec record")
        };
        assert_eq!(cut.argv, ["curl", "-s"]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let rec = data_record(0, 5, b"hello", DIR_SEND, 0);
        for len in 0..rec.len() {
            assert!(
                decode(&rec[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn malformed_records_are_rejected() {
        let mut unknown = data_record(0, 1, b"x", DIR_SEND, 0);
        unknown[0] = 99;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));

        let mut version = data_record(0, 1, b"x", DIR_SEND, 0);
        version[2] = 9;
        assert_eq!(decode(&version), Err(DecodeError::Version(9)));

        // More captured than moved.
        let over = data_record(0, 1, b"xyz", DIR_SEND, 0);
        assert!(matches!(decode(&over), Err(DecodeError::Payload { .. })));

        let mut dir = data_record(0, 1, b"x", 7, 0);
        dir[112] = 7;
        assert_eq!(decode(&dir), Err(DecodeError::Direction(7)));

        let mut family = data_record(0, 1, b"x", DIR_SEND, 0);
        family[76] = 1;
        family[77] = 0;
        assert_eq!(decode(&family), Err(DecodeError::Family(1)));

        // Header length larger than the record.
        let mut len = data_record(0, 1, b"x", DIR_SEND, 0);
        len[4..8].copy_from_slice(&500u32.to_ne_bytes());
        assert!(matches!(decode(&len), Err(DecodeError::Length { .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap deterministic generator: enough to walk many header/length combinations.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let base = data_record(0, 4, b"abcd", DIR_SEND, 0);
        for _ in 0..20_000 {
            let mut rec = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % rec.len();
                rec[i] = (x >> 32) as u8;
            }
            let _ = decode(&rec);
        }
    }
}
