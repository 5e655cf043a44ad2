//! sys_enter_{send,recv}mmsg save the message vector of the call; sys_exit_* mark it spent. The
//! bytes themselves are read by the sock tracepoints, which fire inside the syscall once the
//! kernel knows the socket and the byte count.

use agent_common::syscall::*;
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use crate::{
    helpers::{count::count, filter::process_selected, record::field},
    maps::{ACTIVE_CALLS, LOUPE_CONFIG},
};

/// Offsets of syscall arguments in a sys_enter_* record.
pub const ARG0: usize = 16;
pub const ARG1: usize = 24;
pub const ARG2: usize = 32;
pub const ARG3: usize = 40;
/// No such argument.
pub const NONE: usize = 0;

#[inline(always)]
fn arg(ctx: &TracePointContext, offset: usize) -> u64 {
    field::<u64>(ctx, offset)
}

/// `ptr_arg` is the buffer/iovec/msghdr argument, `len_arg` its count and `flags_arg` the recv
/// flags (NONE when the syscall has no such argument). Argument 0 is the fd in every family.
#[inline(always)]
pub fn on_enter(
    ctx: &TracePointContext,
    syscall: u8,
    shape: u8,
    ptr_arg: usize,
    len_arg: usize,
    flags_arg: usize,
) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    let call = ActiveCall {
        ptr: if ptr_arg == NONE {
            0
        } else {
            arg(ctx, ptr_arg)
        },
        len: if len_arg == NONE {
            0
        } else {
            arg(ctx, len_arg)
        },
        syscall,
        shape,
        _pad: [0; 2],
        msg_index: 0,
        fd: arg(ctx, ARG0) as u32,
        flags: if flags_arg == NONE {
            0
        } else {
            arg(ctx, flags_arg) as u32
        },
    };
    // A thread's entry stays in the map between its syscalls and is rewritten in place: a
    // lookup takes no lock, where an insert and a delete per syscall took the LRU's locks
    // (sys_enter went from 358 to 100 ns, measured with kernel.bpf_stats_enabled).
    match ACTIVE_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; only this thread writes its entry.
        Some(entry) => unsafe { *entry = call },
        None => {
            if ACTIVE_CALLS.insert(pid_tgid, call, 0).is_err() {
                count(agent_common::counters::ARGS_MAP_FULL);
            }
        }
    }
    0
}

#[inline(always)]
fn on_exit() -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Marks the entry spent, so that a socket event outside any hooked syscall (sendfile,
    // splice) never reads a stale buffer. Cheaper than filtering first: one lock-free lookup.
    if let Some(entry) = ACTIVE_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: as in on_enter.
        unsafe { (*entry).syscall = SYS_NONE };
    }
    0
}

macro_rules! enter {
    ($name:ident, $sys:expr, $shape:expr, $ptr:expr, $len:expr, $flags:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            on_enter(&ctx, $sys, $shape, $ptr, $len, $flags)
        }
    };
}
pub(crate) use enter;

macro_rules! exit {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(_ctx: TracePointContext) -> u32 {
            on_exit()
        }
    };
}

// recvmmsg(fd, msgvec, vlen, ...), sendmmsg(fd, msgvec, vlen, flags): one sock tracepoint per
// message, so the position in the vector must live across them. Every other socket syscall is
// read from the saved registers (helpers/regs.rs) and needs no program here.
// The syscall capture path (programs/syscall_capture.rs) uses these two as well.
enter!(
    sys_enter_recvmmsg,
    SYS_RECVMMSG,
    SHAPE_MMSG,
    ARG1,
    ARG2,
    ARG3
);
enter!(
    sys_enter_sendmmsg,
    SYS_SENDMMSG,
    SHAPE_MMSG,
    ARG1,
    ARG2,
    NONE
);

exit!(sys_exit_recvmmsg);
exit!(sys_exit_sendmmsg);
