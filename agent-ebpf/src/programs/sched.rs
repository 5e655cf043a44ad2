//! sched:sched_process_fork: thread (and process) creation by selected processes, so the agent
//! can follow a request handed to a newly created thread.

use agent_common::event::{EVENT_VERSION, EventHeader, FORK_EVENT_SIZE, ForkEvent, KIND_FORK};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    helpers::{emit::emit, filter::process_selected},
    maps::LOUPE_CONFIG,
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
