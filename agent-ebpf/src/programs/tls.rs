//! Uprobes on TLS libraries: OpenSSL's SSL_write/_ex, SSL_read/_ex (libssl, or an executable
//! that links it statically and exports the symbols, as node does), and Go's
//! crypto/tls.(*Conn).Write/Read. Entries record the call; the sock tracepoints tie it to its
//! socket (helpers/tls.rs). The only return probes are on reads, where the data is known only
//! then: a uretprobe for OpenSSL, plain uprobes on each RET instruction for Go (a uretprobe
//! rewrites the return address on a stack the Go runtime may move).

use agent_common::tls::{LIB_GO, LIB_OPENSSL, ProcessKey, TLS_IDLE, TLS_RECV, TLS_SEND, TlsCall};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    helpers::{
        count::count,
        filter::process_selected,
        tls::{emit_plaintext, finish_read, session_socket},
    },
    maps::{GO_HANDSHAKES, GO_READS, LOUPE_CONFIG, TLS_CALLS},
};

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// Records the thread's call, in place when the thread has an entry (no lock).
#[inline(always)]
fn record(pid_tgid: u64, call: TlsCall) {
    match TLS_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; only this thread writes its entry.
        Some(entry) => unsafe { *entry = call },
        None => {
            if TLS_CALLS.insert(pid_tgid, call, 0).is_err() {
                count(agent_common::counters::ARGS_MAP_FULL);
            }
        }
    }
}

#[inline(always)]
fn openssl_enter(ctx: &ProbeContext, state: u8, readbytes: bool) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    record(
        pid_tgid,
        TlsCall {
            session: arg(ctx, 0),
            buf: arg(ctx, 1),
            len: arg(ctx, 2),
            readbytes: if readbytes { arg(ctx, 3) } else { 0 },
            state,
            lib: LIB_OPENSSL,
            ..TlsCall::default()
        },
    );
    0
}

/// SSL_write(ssl, buf, num) and SSL_write_ex(ssl, buf, num, &written).
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    openssl_enter(&ctx, TLS_SEND, false)
}

/// SSL_read(ssl, buf, num).
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    openssl_enter(&ctx, TLS_RECV, false)
}

/// SSL_read_ex(ssl, buf, num, &readbytes).
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    openssl_enter(&ctx, TLS_RECV, true)
}

/// Return of SSL_read (bytes read, or <= 0), and of SSL_read_ex or the function both wrap
/// (elf::inner_site; > 0 and *readbytes, or <= 0).
#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = TLS_CALLS.get_ptr_mut(pid_tgid) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup; only this thread writes its entry.
    let call = unsafe { &mut *call };
    if call.state != TLS_RECV {
        return 0;
    }
    call.state = TLS_IDLE;
    let ret: i64 = ctx.ret::<i32>() as i64;
    let n = if call.readbytes != 0 {
        if ret <= 0 {
            return 0;
        }
        // SAFETY: fault-tolerant user read.
        unsafe { bpf_probe_read_user(call.readbytes as *const u64) }.unwrap_or(0)
    } else if ret > 0 {
        ret as u64
    } else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    let own = agent_common::tls::TlsSocket {
        sk: call.sk,
        generation: call.generation,
    };
    let (session, buf) = (call.session, call.buf);
    let cfg = LOUPE_CONFIG.load();
    finish_read(&cfg, pid_tgid, session, own, true, buf, n);
    0
}

/// Go's register ABI (1.17+): receiver and the slice's pointer and length in the first three
/// integer registers, results from the first, the goroutine in a fixed register.
#[cfg(bpf_target_arch = "x86_64")]
mod go_abi {
    use aya_ebpf::bindings::pt_regs;
    #[inline(always)]
    pub fn args(r: &pt_regs) -> (u64, u64, u64, u64) {
        (r.rax, r.rbx, r.rcx, r.r14)
    }
    #[inline(always)]
    pub fn result(r: &pt_regs) -> (u64, u64) {
        (r.rax, r.r14)
    }
}

#[cfg(bpf_target_arch = "aarch64")]
mod go_abi {
    use aya_ebpf::bindings::user_pt_regs as pt_regs;
    #[inline(always)]
    pub fn args(r: &pt_regs) -> (u64, u64, u64, u64) {
        (r.regs[0], r.regs[1], r.regs[2], r.regs[28])
    }
    #[inline(always)]
    pub fn result(r: &pt_regs) -> (u64, u64) {
        (r.regs[0], r.regs[28])
    }
}

/// crypto/tls.(*Conn).Write(b []byte): a session already tied to its socket is sent at once
/// (Go's Write returns only once all is written, or on error); otherwise its first send names
/// the socket, as for OpenSSL.
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    // SAFETY: the context's registers are valid for this program run.
    let (session, buf, len, goroutine) = go_abi::args(unsafe { &*ctx.regs });
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: session,
    };
    if let Some((sk, conn)) = session_socket(&key) {
        // SAFETY: pointer from a successful lookup, valid for this program run.
        let conn = unsafe { &mut *conn };
        emit_plaintext(
            &cfg,
            pid_tgid,
            sk,
            conn,
            agent_common::event::DIR_SEND,
            buf,
            len,
        );
        return 0;
    }
    record(
        pid_tgid,
        TlsCall {
            session,
            buf,
            len,
            goroutine,
            state: TLS_SEND,
            lib: LIB_GO,
            ..TlsCall::default()
        },
    );
    0
}

/// crypto/tls.(*Conn).handshakeContext: the handshake's own reads and writes name the socket.
/// Go's HTTP server shakes hands before its first Read, and may read the client's first records
/// into the connection's buffer while doing so: that Read then makes no syscall.
#[uprobe]
pub fn go_tls_handshake(ctx: ProbeContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    // SAFETY: the context's registers are valid for this program run.
    let (session, _, _, goroutine) = go_abi::args(unsafe { &*ctx.regs });
    // A read record without a buffer: it binds the session, and a read's return never finds it
    // (those look in GO_READS).
    record(
        pid_tgid,
        TlsCall {
            session,
            goroutine,
            state: TLS_RECV,
            lib: LIB_GO,
            ..TlsCall::default()
        },
    );
    // By goroutine too: the handshake's receives may come on another thread.
    if goroutine != 0
        && GO_HANDSHAKES
            .insert(
                ProcessKey {
                    tgid: pid_tgid >> 32,
                    id: goroutine,
                },
                session,
                0,
            )
            .is_err()
    {
        count(agent_common::counters::ARGS_MAP_FULL);
    }
    0
}

/// crypto/tls.(*Conn).Read(b []byte): recorded per goroutine for its return, and per thread
/// for the syscall that names the socket.
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    // SAFETY: the context's registers are valid for this program run.
    let (session, buf, len, goroutine) = go_abi::args(unsafe { &*ctx.regs });
    let call = TlsCall {
        session,
        buf,
        len,
        goroutine,
        state: TLS_RECV,
        lib: LIB_GO,
        ..TlsCall::default()
    };
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: goroutine,
    };
    if GO_READS.insert(key, call, 0).is_err() {
        count(agent_common::counters::ARGS_MAP_FULL);
    }
    // Its handshake is over (a Read that shakes hands first records it again).
    let _ = GO_HANDSHAKES.remove(key);
    record(pid_tgid, call);
    0
}

/// Each RET of crypto/tls.(*Conn).Read: n in the first result register.
#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the context's registers are valid for this program run.
    let (n, goroutine) = go_abi::result(unsafe { &*ctx.regs });
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: goroutine,
    };
    // SAFETY: map lookup of a plain key; the value is copied out before the delete.
    let Some(call) = (unsafe { GO_READS.get(key) }).copied() else {
        return 0;
    };
    let _ = GO_READS.remove(key);
    if let Some(entry) = TLS_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; only this thread writes its entry.
        let entry = unsafe { &mut *entry };
        if entry.goroutine == goroutine && entry.state == TLS_RECV {
            entry.state = TLS_IDLE;
        }
    }
    let n = n as i64;
    if n <= 0 {
        return 0;
    }
    let cfg = LOUPE_CONFIG.load();
    finish_read(
        &cfg,
        pid_tgid,
        call.session,
        agent_common::tls::TlsSocket::default(),
        false,
        call.buf,
        n as u64,
    );
    0
}
