//! The capture path for kernels without sock:sock_{send,recv}_length (before 6.3): each socket
//! syscall family's sys_enter saves its arguments (programs/syscalls.rs), and one sys_exit
//! program, attached to every family, resolves the fd to its socket (helpers/fd.rs) and hands
//! the call and the byte count to the same code as the sock tracepoints (programs/sock.rs
//! `capture`). Everything after the ring buffer is the same on both paths.

use agent_common::{
    conn::ConnState,
    event::{DIR_RECV, DIR_SEND},
    syscall::*,
};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use crate::{
    helpers::{
        fd::{is_tcp, socket_of},
        payload::mmsg_bytes,
        record::field,
    },
    maps::{ACTIVE_CALLS, CONNS, LOUPE_CONFIG},
    programs::{
        sock::{capture, track_midstream},
        syscalls::{ARG1, ARG2, ARG3, NONE, enter, on_enter},
    },
};

/// `long ret` in a sys_exit_* record.
const RET: usize = 16;
const MSG_PEEK: u32 = 2;

enter!(sys_enter_read, SYS_READ, SHAPE_BUF, ARG1, ARG2, NONE);
enter!(sys_enter_write, SYS_WRITE, SHAPE_BUF, ARG1, ARG2, NONE);
enter!(sys_enter_readv, SYS_READV, SHAPE_IOV, ARG1, ARG2, NONE);
enter!(sys_enter_writev, SYS_WRITEV, SHAPE_IOV, ARG1, ARG2, NONE);
enter!(
    sys_enter_recvfrom,
    SYS_RECVFROM,
    SHAPE_BUF,
    ARG1,
    ARG2,
    ARG3
);
enter!(sys_enter_sendto, SYS_SENDTO, SHAPE_BUF, ARG1, ARG2, NONE);
enter!(sys_enter_recvmsg, SYS_RECVMSG, SHAPE_MSG, ARG1, NONE, ARG2);
enter!(sys_enter_sendmsg, SYS_SENDMSG, SHAPE_MSG, ARG1, NONE, NONE);
enter!(
    sys_enter_sendfile64,
    SYS_SENDFILE,
    SHAPE_NONE,
    NONE,
    NONE,
    NONE
);

// One exit program per direction and argument shape, attached to the sys_exit tracepoints of
// the families of that kind: a program that knew every shape and both directions would hold
// every copy loop on every branch, and the verifier gives up on the product of their paths.
// (Names stay within the kernel's 15 bytes.)

macro_rules! exit {
    ($name:ident, $direction:expr, $shape:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let _ = on_exit(&ctx, $direction, $shape);
            0
        }
    };
}

exit!(exit_recv_buf, DIR_RECV, SHAPE_BUF); // read, recvfrom
exit!(exit_send_buf, DIR_SEND, SHAPE_BUF); // write, sendto
exit!(exit_recv_iov, DIR_RECV, SHAPE_IOV); // readv
exit!(exit_send_iov, DIR_SEND, SHAPE_IOV); // writev
exit!(exit_recv_msg, DIR_RECV, SHAPE_MSG); // recvmsg
exit!(exit_send_msg, DIR_SEND, SHAPE_MSG); // sendmsg
exit!(exit_recv_mmsg, DIR_RECV, SHAPE_MMSG); // recvmmsg
exit!(exit_send_mmsg, DIR_SEND, SHAPE_MMSG); // sendmmsg
exit!(exit_send_file, DIR_SEND, SHAPE_NONE); // sendfile

#[inline(always)]
fn on_exit(ctx: &TracePointContext, direction: u8, shape: u8) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only selected processes have an entry (their sys_enter filtered).
    let Some(entry) = ACTIVE_CALLS.get_ptr_mut(pid_tgid) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; only this thread writes its entry.
    let call: ActiveCall = unsafe { *entry };
    // A stale entry of another shape (its exit was missed) is not this call's.
    if call.syscall == SYS_NONE || call.shape != shape {
        return Ok(());
    }
    // SAFETY: as above.
    unsafe { (*entry).syscall = SYS_NONE };
    let ret: i64 = field(ctx, RET);
    if ret <= 0 {
        return Ok(());
    }
    // A peek is read again by the real recv: capturing both would duplicate the bytes.
    if direction == DIR_RECV && call.flags & MSG_PEEK != 0 {
        return Ok(());
    }
    let cfg = LOUPE_CONFIG.load();
    let Some(sk) = socket_of(&cfg, call.fd) else {
        return Ok(());
    };
    let conn: *mut ConnState = match CONNS.get_ptr_mut(sk) {
        Some(conn) => conn,
        // Unix and UDP sockets are never tracked; a TCP one seen first here was opened before
        // the agent started (or its entry was evicted).
        None if is_tcp(&cfg, sk) => track_midstream(&cfg, sk)?,
        None => return Ok(()),
    };
    let (bytes, ret) = if shape == SHAPE_MMSG {
        // The sum goes through the thread's map entry and is read back: to the verifier a map
        // value is any number, so the loop's many exits (each knowing a different range of
        // `ret`) meet in one state before the rest of the program instead of each walking it.
        // SAFETY: as above; volatile, so the compiler cannot forward the stored values.
        unsafe {
            (*entry).msg_index = mmsg_bytes(call.ptr, ret as u64);
            (*entry).len = ret as u64;
            (
                core::ptr::read_volatile(&(*entry).msg_index),
                core::ptr::read_volatile(&(*entry).len),
            )
        }
    } else if ret > u32::MAX as i64 {
        (u32::MAX, ret as u64)
    } else {
        (ret as u32, ret as u64)
    };
    capture(
        &cfg,
        pid_tgid,
        sk,
        conn,
        direction,
        bytes,
        Some((&call, ret, shape)),
    )
}
