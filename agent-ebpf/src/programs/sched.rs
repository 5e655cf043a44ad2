//! sched:sched_process_fork: thread (and process) creation by selected processes, so the agent
//! can follow a request handed to a newly created thread; sched:sched_waking: futex wakes
//! between the threads of a pool runtime, so it can follow work handed to a pool thread.

use agent_common::event::{
    EVENT_VERSION, EventHeader, FORK_EVENT_SIZE, ForkEvent, KIND_FORK, KIND_WAKE, WAKE_EVENT_SIZE,
    WakeEvent,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

use crate::{
    helpers::{emit::emit, filter::process_selected, regs::in_futex},
    maps::{LOUPE_CONFIG, POOL_COUNT, POOL_PIDS},
};

/// Offset of child_pid in the sched_process_fork record (tracefs format file).
const CHILD_PID: usize = 20;

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    let child_tid: i32 = crate::helpers::record::field(&ctx, CHILD_PID);
    let event = ForkEvent {
        header: EventHeader {
            kind: KIND_FORK,
            version: EVENT_VERSION,
            len: FORK_EVENT_SIZE as u32,
            // SAFETY: helper without arguments.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            pid_tgid,
        },
        child_tid: child_tid as u32,
        _pad: 0,
    };
    emit(&event);
    0
}

/// Fires on every wakeup of the host, in the waker's context: the cheapest tests first (any
/// process of a pool runtime on the node, then this one of them), then only a wake from inside
/// a futex syscall is sent (a wake from an interrupt has a random current task, seldom one
/// inside futex). Attached as a raw tracepoint: its one argument is the woken `struct
/// task_struct *`, and the kernel builds no trace record (the record's command-name copy and
/// the perf glue were most of a run that ends at the first test).
#[raw_tracepoint(tracepoint = "sched_waking")]
pub fn sched_waking(ctx: RawTracePointContext) -> i32 {
    if POOL_COUNT.get(0).is_none_or(|n| *n == 0) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: map lookup of a plain key.
    if unsafe { POOL_PIDS.get((pid_tgid >> 32) as u32) }.is_none() {
        return 0;
    }
    if !in_futex() {
        return 0;
    }
    let cfg = LOUPE_CONFIG.load();
    let task: u64 = ctx.arg(0);
    // SAFETY: fault-tolerant kernel read at an offset taken from BTF.
    let Ok(wakee) =
        (unsafe { bpf_probe_read_kernel((task + cfg.offsets.task_pid as u64) as *const i32) })
    else {
        return 0;
    };
    let wakee = wakee as u32;
    if wakee == pid_tgid as u32 {
        return 0;
    }
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    let event = WakeEvent {
        header: EventHeader {
            kind: KIND_WAKE,
            version: EVENT_VERSION,
            len: WAKE_EVENT_SIZE as u32,
            // SAFETY: helper without arguments.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            pid_tgid,
        },
        wakee,
        _pad: 0,
    };
    emit(&event);
    0
}
