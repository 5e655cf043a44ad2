//! TLS plaintext into the connection streams. The uprobes (programs/tls.rs) record each library
//! call per thread; the socket syscall the call makes, seen by the sock tracepoints, names its
//! socket. Writes go out with that first send (no return probe); reads at the call's return.

use agent_common::{
    config::LoupeConfig,
    conn::{ConnState, STATUS_CAPTURED, STATUS_IGNORED},
    counters,
    event::{DIR_RECV, DIR_SEND, FLAG_TLS, FLAG_TRUNCATED, MAX_PAYLOAD},
    protocol::PROTO_TLS,
    syscall::SYS_NONE,
    tls::{LIB_GO, ProcessKey, TLS_IDLE, TLS_RECV, TLS_SEND, TlsCall, TlsSocket},
};

use crate::{
    helpers::{
        context::request_context,
        count::count,
        event::{Transfer, first_of_process, send_data},
        payload::read_into,
        regs::syscall_goroutine,
    },
    maps::{CONNS, GO_HANDSHAKES, GO_READS, SCRATCH, TLS_CALLS, TLS_LAST_RECV, TLS_SOCKETS},
};

/// The connection's plaintext is seen from now on: its stream restarts at offset 0 with the
/// plaintext, and its ciphertext is no longer sent. A connection user space ignored as
/// ciphertext gets a new chance as plaintext.
#[inline(always)]
pub fn hook(conn: &mut ConnState) {
    if conn.flags & FLAG_TLS == 0 {
        conn.flags |= FLAG_TLS;
        conn.status = STATUS_CAPTURED;
        conn.protocol = PROTO_TLS;
        conn.seq = [0, 0];
    }
}

/// The live connection a session was tied to, if it still exists.
#[inline(always)]
pub fn session_socket(key: &ProcessKey) -> Option<(u64, *mut ConnState)> {
    // SAFETY: map lookup of a plain key; the value is copied out.
    let sock: TlsSocket = *unsafe { TLS_SOCKETS.get(key) }?;
    live(sock)
}

#[inline(always)]
fn live(sock: TlsSocket) -> Option<(u64, *mut ConnState)> {
    let conn = CONNS.get_ptr_mut(sock.sk)?;
    // SAFETY: pointer from a successful lookup, valid for this program run.
    if unsafe { (*conn).generation } != sock.generation {
        return None;
    }
    Some((sock.sk, conn))
}

#[inline(always)]
fn bind(key: &ProcessKey, sk: u64, generation: u64) {
    let _ = TLS_SOCKETS.insert(key, TlsSocket { sk, generation }, 0);
}

/// Called by the sock tracepoints for every transfer: whether it happened inside a TLS call of
/// this thread (its bytes are that call's ciphertext, and the plaintext was sent instead).
#[inline(always)]
pub fn inside_tls_call(
    cfg: &LoupeConfig,
    pid_tgid: u64,
    sk: u64,
    conn: &mut ConnState,
    direction: u8,
) -> bool {
    let Some(call) = TLS_CALLS.get_ptr_mut(pid_tgid) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup; only this thread writes its entry.
    let call: &mut TlsCall = unsafe { &mut *call };
    let wanted = if direction == DIR_SEND {
        TLS_SEND
    } else {
        TLS_RECV
    };
    // Inside a read, a send is the handshake or a key update of the same session: it names the
    // socket too (a read's record is cleared at its return, so it is never stale). A write's
    // record may outlive its call (Node.js sends after SSL_write returns): only a send counts.
    let other_way = call.state == TLS_RECV && direction == DIR_SEND;
    if call.state != wanted && !other_way {
        return false;
    }
    // Another goroutine's syscall on the thread the Go call started on.
    if call.lib == LIB_GO && syscall_goroutine() != call.goroutine {
        return false;
    }
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: call.session,
    };
    if let Some((known, _)) = session_socket(&key) {
        if known != sk {
            // Not this call's socket: a write recorded by a call that never sent (it would
            // block, or the library buffers), now outlived by the thread's next send.
            if call.state == TLS_SEND {
                call.state = TLS_IDLE;
            }
            return false;
        }
    } else {
        bind(&key, sk, conn.generation);
    }
    if other_way {
        // Ciphertext: dropped by the caller once the connection is hooked.
        return false;
    }
    if call.state == TLS_SEND {
        call.state = TLS_IDLE;
        emit_plaintext(cfg, pid_tgid, sk, conn, DIR_SEND, call.buf, call.len);
    } else {
        call.sk = sk;
        call.generation = conn.generation;
        hook(conn);
    }
    true
}

/// A receive on a TLS connection not yet hooked, made by `goroutine` (the syscall's r14): if
/// that goroutine is inside a Go `crypto/tls` Read, its session is this socket's. The thread's
/// own record (`inside_tls_call`) misses it when the goroutine parked on the netpoller inside
/// Read and resumed on another thread, as a keep-alive connection's server goroutine does while
/// it waits for the next request; its reads then went unbound until one happened to stay on its
/// thread. Other processes have no GO_READS entries, whatever their r14 holds. The same for a
/// handshake (GO_HANDSHAKES): a server's handshake reads the client's first records into the
/// connection's buffer, and the Reads they serve make no syscall that could name the socket.
#[inline(always)]
pub fn bind_goroutine_read(pid_tgid: u64, goroutine: u64, sk: u64, conn: &mut ConnState) -> bool {
    if goroutine == 0 {
        return false;
    }
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: goroutine,
    };
    // SAFETY: map lookups of a plain key; the values are copied out.
    let session = match unsafe { GO_READS.get(key) } {
        Some(call) => call.session,
        None => match unsafe { GO_HANDSHAKES.get(key) } {
            Some(&session) => {
                let _ = GO_HANDSHAKES.remove(key);
                session
            }
            None => return false,
        },
    };
    let session = ProcessKey {
        tgid: pid_tgid >> 32,
        id: session,
    };
    bind(&session, sk, conn.generation);
    hook(conn);
    true
}

/// A receive on a TLS connection: where the thread's next read served from a buffer came from.
#[inline(always)]
pub fn note_tls_recv(pid_tgid: u64, sk: u64, generation: u64) {
    let sock = TlsSocket { sk, generation };
    match TLS_LAST_RECV.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; only this thread writes its entry.
        Some(last) => unsafe {
            if *last != sock {
                *last = sock
            }
        },
        None => {
            let _ = TLS_LAST_RECV.insert(pid_tgid, sock, 0);
        }
    }
}

/// A read returned `n` plaintext bytes at `buf`. Its socket: the one its own syscall reached,
/// else its session's, else (`last_recv`, not for goroutines) the thread's last TLS socket.
#[inline(always)]
pub fn finish_read(
    cfg: &LoupeConfig,
    pid_tgid: u64,
    session: u64,
    own: TlsSocket,
    last_recv: bool,
    buf: u64,
    n: u64,
) {
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: session,
    };
    let found = if own.sk != 0 { live(own) } else { None };
    let found = match found {
        Some(f) => Some(f),
        None => match session_socket(&key) {
            Some(f) => Some(f),
            None if last_recv => {
                // SAFETY: map lookup of a plain key; the value is copied out.
                match unsafe { TLS_LAST_RECV.get(pid_tgid) } {
                    Some(last) => {
                        let last = *last;
                        let f = live(last);
                        if f.is_some() {
                            bind(&key, last.sk, last.generation);
                        }
                        f
                    }
                    None => None,
                }
            }
            None => None,
        },
    };
    let Some((sk, conn)) = found else {
        count(counters::TLS_UNBOUND);
        return;
    };
    // SAFETY: pointer from a successful lookup, valid for this program run.
    let conn = unsafe { &mut *conn };
    emit_plaintext(cfg, pid_tgid, sk, conn, DIR_RECV, buf, n);
}

/// Sends `len` plaintext bytes at user address `src` as the connection's next bytes.
#[inline(always)]
pub fn emit_plaintext(
    cfg: &LoupeConfig,
    pid_tgid: u64,
    sk: u64,
    conn: &mut ConnState,
    direction: u8,
    src: u64,
    len: u64,
) {
    hook(conn);
    // User space found no parser for the plaintext either.
    if conn.status == STATUS_IGNORED {
        return;
    }
    let bytes = if len > u32::MAX as u64 {
        u32::MAX
    } else {
        len as u32
    };
    let first = conn.seq[0] == 0 && conn.seq[1] == 0;
    let idx = if direction == DIR_SEND { 0 } else { 1 };
    let seq = conn.seq[idx];
    conn.seq[idx] = seq + bytes as u64;

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        count(counters::SCRATCH_MISSING);
        return;
    };
    let cap = if cfg.capture_bytes as usize > MAX_PAYLOAD {
        MAX_PAYLOAD as u32
    } else {
        cfg.capture_bytes
    };
    let want = if bytes < cap { bytes } else { cap };
    // SAFETY: per-CPU scratch; the programs are not re-entered on one CPU.
    let payload = unsafe { core::ptr::addr_of_mut!((*scratch).payload) }.cast::<u8>();
    let captured = if read_into(payload, 0, want as u64, src).is_ok() {
        want
    } else {
        count(counters::READ_USER_FAILED);
        0
    };
    let mut flags = conn.flags;
    if captured < bytes {
        flags |= FLAG_TRUNCATED;
        count(counters::PAYLOAD_TRUNCATED);
    }
    let (ctx_source, ctx) = if cfg.tcp_context != 0 {
        request_context(conn, direction, pid_tgid as u32)
    } else {
        (
            agent_common::context::CTX_NONE,
            agent_common::context::TcpContext::default(),
        )
    };
    let transfer = Transfer {
        direction,
        seq,
        bytes,
        captured,
        flags,
        syscall: SYS_NONE,
        wake: first && first_of_process((pid_tgid >> 32) as u32),
        comm: first || cfg.comm_every_event != 0,
        // In a uprobe, the registers saved at the probe's trap: the caller's goroutine for Go.
        goroutine: syscall_goroutine(),
    };
    send_data(scratch, pid_tgid, sk, conn, &transfer, ctx_source, ctx);
    count(counters::TLS_PLAINTEXT);
}
