//! sock:sock_send_length / sock:sock_recv_length: the heart of capture. They fire inside the
//! syscall, after the transfer, with the `struct sock *` and the byte count, which ties the
//! saved syscall arguments to a connection. sock:inet_sock_set_state gives the lifecycle.

use agent_common::{
    config::{LoupeConfig, MIDSTREAM_CLASSIFY_ATTEMPTS},
    conn::{
        AF_INET, AF_INET6, ConnState, ConnTuple, IPPROTO_TCP, PROTO_UNKNOWN, ROLE_CLIENT,
        ROLE_SERVER, ROLE_UNKNOWN, STATUS_CAPTURED, STATUS_IGNORED, STATUS_UNCLASSIFIED,
    },
    context::{CTX_NONE, TcpContext},
    counters,
    event::{
        CLOSE_EVENT_SIZE, CloseEvent, DIR_RECV, DIR_SEND, EVENT_VERSION, EventHeader,
        FLAG_EXCLUDED, FLAG_MIDSTREAM, FLAG_TLS, FLAG_TRUNCATED, KIND_CLOSE, MAX_PAYLOAD,
    },
    protocol::{PROTO_HTTP1, PROTO_HTTP2, PROTO_REDIS, PROTO_TLS},
    syscall::ActiveCall,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

use crate::{
    helpers::{
        classify::classify,
        context::{forget, request_context},
        copy::{copy_words, zero_words},
        count::count,
        emit::emit,
        event::{Transfer, first_of_process, send_data},
        fd::is_tcp,
        filter::process_selected,
        payload::{copy_from_call, copy_saved},
        regs::{current_call_and_goroutine, syscall_goroutine},
        sock::{read_tuple, track},
        tls::{bind_goroutine_read, inside_tls_call, note_tls_recv},
    },
    maps::{CONNS, LOUPE_CONFIG, SCRATCH},
};

const MSG_PEEK: i32 = 2;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;

/// Field offsets of the inet_sock_set_state record.
mod state_tp {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
}

#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> Result<T, ()> {
    Ok(crate::helpers::record::field(ctx, offset))
}

// sock_send_length / sock_recv_length are attached as raw tracepoints: TP_PROTO(struct sock
// *sk, int ret, int flags) arrives as three words, and the kernel neither builds the trace
// record (which reads the socket's family and protocol for every socket of the host) nor runs
// the perf-event glue around the program. A socket already in CONNS is TCP (only TCP sockets
// are entered), so only an unknown one has its family and protocol read, here.
mod len_args {
    pub const SK: usize = 0;
    pub const RET: usize = 1;
    pub const FLAGS: usize = 2;
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
    let _ = on_sock_io(&ctx, DIR_SEND);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    let _ = on_sock_io(&ctx, DIR_RECV);
    0
}

#[inline(always)]
fn on_sock_io(ctx: &RawTracePointContext, direction: u8) -> Result<(), ()> {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return Ok(());
    }
    let ret = ctx.arg::<u64>(len_args::RET) as i32;
    if ret <= 0 {
        return Ok(());
    }
    // A peek is read again by the real recv: capturing both would duplicate the bytes.
    if direction == DIR_RECV && ctx.arg::<u64>(len_args::FLAGS) as i32 & MSG_PEEK != 0 {
        return Ok(());
    }
    let sk: u64 = ctx.arg(len_args::SK);

    let conn = match CONNS.get_ptr_mut(sk) {
        Some(conn) => conn,
        // UDP, unix and other sockets end here, on their protocol.
        None if !is_tcp(&cfg, sk) => return Ok(()),
        None if closed(&cfg, sk) => {
            count(counters::AFTER_CLOSE);
            return Ok(());
        }
        None => track_midstream(&cfg, sk)?,
    };
    capture(&cfg, pid_tgid, sk, conn, direction, ret as u32, None)
}

/// Whether an unknown socket's connection has already closed: a read of bytes that were still
/// queued when a reset closed it (its entry went with the close). Tracked again, it would come
/// back as a connection joined mid-stream that never closes, and the agent would look its role
/// up in /proc (a walk of the host's whole TCP table, some 3 ms per file). The sock path only:
/// the syscall path's exit programs are at the verifier's budget.
#[inline(always)]
fn closed(cfg: &LoupeConfig, sk: u64) -> bool {
    // SAFETY: fault-tolerant kernel read at an offset taken from BTF.
    let state = unsafe { bpf_probe_read_kernel((sk + cfg.offsets.skc_state as u64) as *const u8) };
    state.is_ok_and(|s| s as i32 == TCP_CLOSE)
}

/// Everything after the socket and the byte count are known, shared by the sock tracepoints
/// and the syscall capture path (programs/syscall_capture.rs). `saved` is the call recorded at
/// sys_enter on the syscall path, with the syscall's return value and the shape its program
/// handles (a constant there); the sock path reads the call
/// from the saved registers instead.
#[inline(always)]
pub fn capture(
    cfg: &LoupeConfig,
    pid_tgid: u64,
    sk: u64,
    conn: *mut ConnState,
    direction: u8,
    bytes: u32,
    saved: Option<(&ActiveCall, u64, u8)>,
) -> Result<(), ()> {
    // SAFETY: pointer from a successful lookup/insert, valid for this program run.
    let conn: &mut ConnState = unsafe { &mut *conn };
    // Left out by the selection: before the TLS lookup, whose hook would capture its plaintext.
    if conn.flags & FLAG_EXCLUDED != 0 {
        return Ok(());
    }
    // TLS: a syscall inside a hooked library call carries that call's ciphertext; the plaintext
    // goes out instead (helpers/tls.rs). A connection whose plaintext is seen sends no more
    // ciphertext at all.
    // The syscall path (older kernels) keeps the lookup: one more branch before its copy loop
    // took its readv program over the verifier's instruction limit.
    let skip_tls_lookup = saved.is_none() && plaintext_for_good(conn);
    if !skip_tls_lookup && inside_tls_call(cfg, pid_tgid, sk, conn, direction) {
        return Ok(());
    }
    if conn.flags & FLAG_TLS != 0 {
        if direction == DIR_RECV {
            note_tls_recv(pid_tgid, sk, conn.generation);
        }
        return Ok(());
    }
    if conn.status == STATUS_IGNORED {
        return Ok(());
    }
    let first = conn.seq[0] == 0 && conn.seq[1] == 0;
    let seq = if direction == DIR_SEND {
        conn.seq[0]
    } else {
        conn.seq[1]
    };
    // Advanced even if the event is dropped below: the agent then sees the gap instead of
    // silently splicing two unrelated parts of the stream.
    if direction == DIR_SEND {
        conn.seq[0] = seq + bytes as u64;
    } else {
        conn.seq[1] = seq + bytes as u64;
    }

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        count(counters::SCRATCH_MISSING);
        return Err(());
    };
    let cap = if cfg.capture_bytes as usize > MAX_PAYLOAD {
        MAX_PAYLOAD as u32
    } else {
        cfg.capture_bytes
    };
    let want = if bytes < cap { bytes } else { cap };
    // SAFETY: per-CPU scratch; the programs are not re-entered on one CPU.
    let payload = unsafe { core::ptr::addr_of_mut!((*scratch).payload) }.cast::<u8>();
    // The syscall path reads the goroutine only once the event is sure to go out: a value kept
    // alive across classification made its programs' verification several times slower.
    let (copied, goroutine) = match saved {
        Some((call, ret, shape)) => (copy_saved(call, shape, ret, payload, want as u64), None),
        None => {
            let (current, goroutine) = current_call_and_goroutine();
            (
                copy_from_call(current, pid_tgid, payload, want as u64),
                Some(goroutine),
            )
        }
    };

    if conn.status == STATUS_UNCLASSIFIED && !decide(cfg, conn, payload, copied.captured) {
        if cfg.tcp_context != 0 && conn.status == STATUS_IGNORED {
            forget(&conn.tuple);
        }
        return Ok(());
    }
    if conn.protocol == PROTO_TLS && direction == DIR_RECV {
        // Where a TLS read served without a syscall (Node's memory BIO) got its bytes from.
        note_tls_recv(pid_tgid, sk, conn.generation);
        // The ciphertext of a Go read that changed threads: its plaintext comes at its return.
        // The sock path only (`goroutine` is a constant `None` in each syscall-exit program, so
        // the branch is gone from them: it made their load slower than the kernel matrix allows
        // under TCG).
        if let Some(g) = goroutine
            && bind_goroutine_read(pid_tgid, g, sk, conn)
        {
            return Ok(());
        }
    }
    let (ctx_source, ctx) = if cfg.tcp_context != 0 {
        request_context(conn, direction, pid_tgid as u32)
    } else {
        (CTX_NONE, TcpContext::default())
    };

    let mut flags = copied.flags | conn.flags;
    if copied.captured < bytes {
        flags |= FLAG_TRUNCATED;
        count(counters::PAYLOAD_TRUNCATED);
    }
    let transfer = Transfer {
        direction,
        seq,
        bytes,
        captured: copied.captured,
        flags,
        syscall: copied.syscall,
        // Per connection on the syscall path: the per-process check took its exit programs over
        // the verifier's budget (`saved` is a constant in each of them, so the check is gone).
        wake: first && (saved.is_some() || first_of_process((pid_tgid >> 32) as u32)),
        // A constant on the syscall path, for the same reason as the TLS lookup above.
        comm: saved.is_some() || first || cfg.comm_every_event != 0,
        goroutine: goroutine.unwrap_or_else(syscall_goroutine),
    };
    send_data(scratch, pid_tgid, sk, conn, &transfer, ctx_source, ctx);
    Ok(())
}

/// A connection already seen speaking a protocol that never turns into TLS mid-stream (TLS for
/// HTTP and Redis starts with the connection; PostgreSQL and MySQL upgrade in place, so they are
/// not in this list): its transfers skip the thread's TLS-call lookup, a hash-map miss that was
/// ~4% of each sock tracepoint's time.
#[inline(always)]
fn plaintext_for_good(conn: &ConnState) -> bool {
    conn.status == STATUS_CAPTURED
        && matches!(conn.protocol, PROTO_HTTP1 | PROTO_HTTP2 | PROTO_REDIS)
}

/// Classifies on the first payload. Returns whether this event should be emitted.
#[inline(always)]
fn decide(cfg: &LoupeConfig, conn: &mut ConnState, payload: *const u8, captured: u32) -> bool {
    let proto = classify(payload, captured, cfg.protocols);
    if cfg.protocols == 0 {
        // Capture-everything mode: keep the label if there is one.
        conn.protocol = proto;
        conn.status = STATUS_CAPTURED;
        return true;
    }
    if proto != PROTO_UNKNOWN {
        conn.protocol = proto;
        conn.status = STATUS_CAPTURED;
        return true;
    }
    // A connection joined mid-stream may be inside a body: give it a few more payloads to show a
    // message start. One seen from its start is decided now.
    conn.attempts = conn.attempts.saturating_add(1);
    let midstream = conn.flags & FLAG_MIDSTREAM != 0;
    if !midstream || conn.attempts >= MIDSTREAM_CLASSIFY_ATTEMPTS {
        conn.status = STATUS_IGNORED;
        count(counters::CONNS_IGNORED);
    }
    false
}

/// First I/O on a socket the lifecycle tracepoint never showed us (opened before the agent
/// started, or its entry was evicted): the tuple comes from the socket itself, the role from
/// /proc in userspace.
#[inline(always)]
pub fn track_midstream(cfg: &LoupeConfig, sk: u64) -> Result<*mut ConnState, ()> {
    let Ok(tuple) = read_tuple(cfg, sk) else {
        count(counters::READ_KERNEL_FAILED);
        return Err(());
    };
    track(cfg, sk, tuple, ROLE_UNKNOWN, FLAG_MIDSTREAM).ok_or(())
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = on_set_state(&ctx);
    0
}

#[inline(always)]
fn on_set_state(ctx: &TracePointContext) -> Result<(), ()> {
    if field::<u16>(ctx, state_tp::PROTOCOL)? != IPPROTO_TCP {
        return Ok(());
    }
    let old: i32 = field(ctx, state_tp::OLDSTATE)?;
    let new: i32 = field(ctx, state_tp::NEWSTATE)?;
    let sk: u64 = field(ctx, state_tp::SKADDR)?;
    let role = match (old, new) {
        // connect(): runs in the connecting thread.
        (TCP_CLOSE, TCP_SYN_SENT) => ROLE_CLIENT,
        // The child socket of a listener, created in softirq when the handshake's ACK arrives.
        (TCP_LISTEN, TCP_SYN_RECV) => ROLE_SERVER,
        // connect() picks the source port after entering SYN_SENT, and before 6.2 or so a
        // listener's child reports SYN_RECV before its ports and peer address are copied from
        // the request (the tuple is then the listener's): take the final tuple here.
        (TCP_SYN_SENT | TCP_SYN_RECV, TCP_ESTABLISHED) => {
            if let Some(conn) = CONNS.get_ptr_mut(sk) {
                let tuple = state_tuple(ctx)?;
                // SAFETY: pointer from a successful lookup, valid for this program run.
                unsafe { (*conn).tuple = tuple };
            }
            return Ok(());
        }
        (_, TCP_CLOSE) => return on_close(sk),
        _ => return Ok(()),
    };
    let cfg = LOUPE_CONFIG.load();
    if role == ROLE_CLIENT && !process_selected(&cfg, bpf_get_current_pid_tgid()) {
        return Ok(());
    }
    let tuple = state_tuple(ctx)?;
    track(&cfg, sk, tuple, role, 0);
    Ok(())
}

#[inline(always)]
fn state_tuple(ctx: &TracePointContext) -> Result<ConnTuple, ()> {
    let family: u16 = field(ctx, state_tp::FAMILY)?;
    let mut tuple = ConnTuple {
        family,
        sport: field(ctx, state_tp::SPORT)?,
        dport: field(ctx, state_tp::DPORT)?,
        ..ConnTuple::default()
    };
    if family == AF_INET {
        let s: u32 = field(ctx, state_tp::SADDR)?;
        let d: u32 = field(ctx, state_tp::DADDR)?;
        tuple.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        tuple.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    } else if family == AF_INET6 {
        tuple.saddr = v6(ctx, state_tp::SADDR_V6)?;
        tuple.daddr = v6(ctx, state_tp::DADDR_V6)?;
    } else {
        return Err(());
    }
    Ok(tuple)
}

/// A 16-byte address field as two aligned 8-byte loads (the context allows no wider ones).
#[inline(always)]
fn v6(ctx: &TracePointContext, offset: usize) -> Result<[u8; 16], ()> {
    let hi: u64 = field(ctx, offset)?;
    let lo: u64 = field(ctx, offset + 8)?;
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&hi.to_ne_bytes());
    a[8..].copy_from_slice(&lo.to_ne_bytes());
    Ok(a)
}

#[inline(always)]
fn on_close(sk: u64) -> Result<(), ()> {
    let Some(conn) = CONNS.get_ptr(sk) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; read before the delete below.
    let conn = unsafe { &*conn };
    let mut slot = core::mem::MaybeUninit::<CloseEvent>::uninit();
    zero_words(slot.as_mut_ptr());
    // SAFETY: zeroed above; all-zero is a valid CloseEvent.
    let event = unsafe { slot.assume_init_mut() };
    event.header = EventHeader {
        kind: KIND_CLOSE,
        version: EVENT_VERSION,
        len: CLOSE_EVENT_SIZE as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid: bpf_get_current_pid_tgid(),
    };
    event.sk = sk;
    event.conn_gen = conn.generation;
    copy_words(&mut event.tuple, &conn.tuple);
    event.seq = conn.seq;
    event.role = conn.role;
    let (ctx_source, status) = (conn.ctx_source, conn.status);
    let _ = CONNS.remove(sk);
    if ctx_source != CTX_NONE {
        forget(&event.tuple);
    }
    if status != STATUS_CAPTURED {
        return Ok(());
    }
    emit(&*event);
    Ok(())
}
