//! Keeping `--pid`/`--exe` selections true as processes come and go: a child process of a
//! selected process is selected (task:task_newtask, in the parent), a process that execs a
//! selected executable name is selected (sched:sched_process_exec, which also reports the
//! exec's command line: helpers/exec.rs), and a descendant that exits
//! leaves the set (sched:sched_process_exit), so that its pid, once reused, is not traced.

use agent_common::config::{FILTER_PID, PID_DESCENDANT};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    helpers::{
        exec::emit_exec,
        filter::{pid_selected, pid_slot, process_selected},
        record::field,
    },
    maps::{EXE_FILTER, LOUPE_CONFIG, WOKEN},
};

/// task_newtask record (tracefs format file, unchanged since 4.x): `pid_t pid` at 8,
/// `clone_flags` at 32.
const NEWTASK_PID: usize = 8;
const NEWTASK_CLONE_FLAGS: usize = 32;
const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    if cfg.filter & FILTER_PID == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !pid_selected(parent) {
        return 0;
    }
    // A new thread belongs to its process, already selected.
    if field::<u64>(&ctx, NEWTASK_CLONE_FLAGS) & CLONE_THREAD != 0 {
        return 0;
    }
    let child = field::<i32>(&ctx, NEWTASK_PID) as u32;
    if let Some(slot) = pid_slot(child) {
        // SAFETY: a pointer into a map entry; a byte store touches no other pid's byte.
        unsafe { *slot = PID_DESCENDANT };
    }
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    // A new program: its first connection wakes the reader again (helpers/event.rs).
    let _ = WOKEN.remove((pid_tgid >> 32) as u32);
    if cfg.filter & FILTER_PID != 0 {
        // After exec the task's name is the new executable's (first 15 bytes).
        if let Ok(comm) = bpf_get_current_comm() {
            let tgid = (pid_tgid >> 32) as u32;
            // SAFETY: map lookup of a plain key.
            if unsafe { EXE_FILTER.get(comm) }.is_some()
                && let Some(slot) = pid_slot(tgid)
            {
                // SAFETY: as in task_newtask.
                unsafe { *slot = PID_DESCENDANT };
            }
        }
    }
    if process_selected(&cfg, pid_tgid) {
        emit_exec(&ctx, pid_tgid);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Only the process's last word counts: its main thread's exit.
    if tgid != tid {
        return 0;
    }
    // Its pid, once reused, names a new process (helpers/event.rs).
    let _ = WOKEN.remove(tgid);
    let cfg = LOUPE_CONFIG.load();
    if cfg.filter & FILTER_PID == 0 {
        return 0;
    }
    // The pids the user gave stay: they name what to trace, not a lineage.
    if let Some(slot) = pid_slot(tgid) {
        // SAFETY: as in task_newtask.
        unsafe {
            if *slot == PID_DESCENDANT {
                *slot = 0;
            }
        }
    }
    0
}
