//! Go's net/http client hands each request to a writer goroutine of the connection: the
//! caller's goroutine blocks in `(*persistConn).roundTrip` while `writeLoop` calls
//! `(*Request).write`, whose socket writes then carry the writer's goroutine, not the caller's.
//! Two uprobes tie them, by the `*Request` both see, and tell the agent (HandoffEvent), which
//! counts the writer's next writes as the caller's. Register ABI (Go 1.17+), as in tls.rs.

use agent_common::{
    event::{EVENT_VERSION, EventHeader, HANDOFF_EVENT_SIZE, HandoffEvent, KIND_HANDOFF},
    tls::ProcessKey,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};

use crate::{
    helpers::{emit::emit, filter::process_selected},
    maps::{GO_ROUND_TRIPS, LOUPE_CONFIG},
};

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn regs(ctx: &ProbeContext) -> (u64, u64, u64) {
    // SAFETY: the context's registers are valid for this program run.
    let r = unsafe { &*ctx.regs };
    (r.rax, r.rbx, r.r14)
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
fn regs(ctx: &ProbeContext) -> (u64, u64, u64) {
    // SAFETY: the context's registers are valid for this program run.
    let r = unsafe { &*ctx.regs };
    (r.regs[0], r.regs[1], r.regs[28])
}

/// `func (pc *persistConn) roundTrip(req *transportRequest)`: `transportRequest` embeds
/// `*Request` as its first field (unchanged since Go 1.0).
#[uprobe]
pub fn go_http_round_trip(ctx: ProbeContext) -> u32 {
    let cfg = LOUPE_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_selected(&cfg, pid_tgid) {
        return 0;
    }
    let (_pc, treq, goroutine) = regs(&ctx);
    // SAFETY: fault-tolerant user read.
    let Ok(request) = (unsafe { bpf_probe_read_user(treq as *const u64) }) else {
        return 0;
    };
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: request,
    };
    let _ = GO_ROUND_TRIPS.insert(key, goroutine, 0);
    0
}

/// `func (r *Request) write(w io.Writer, ...)`, on the connection's writer goroutine.
#[uprobe]
pub fn go_http_request_write(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (request, _, writer) = regs(&ctx);
    let key = ProcessKey {
        tgid: pid_tgid >> 32,
        id: request,
    };
    // SAFETY: map lookup of a plain key; the value is copied out before the delete.
    let Some(caller) = (unsafe { GO_ROUND_TRIPS.get(key) }).copied() else {
        return 0;
    };
    let _ = GO_ROUND_TRIPS.remove(key);
    emit(&HandoffEvent {
        header: EventHeader {
            kind: KIND_HANDOFF,
            version: EVENT_VERSION,
            len: HANDOFF_EVENT_SIZE as u32,
            // SAFETY: helper without arguments.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            pid_tgid,
        },
        from: writer,
        to: caller,
    });
    0
}
