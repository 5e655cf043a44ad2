//! Handing records to the ring buffer; a full ring is counted, never silent.
//!
//! Records do not wake the reader: waking it per record cost about 2 µs in sock_send_length
//! (measured with kernel.bpf_stats_enabled) plus an eventfd read in the agent per record. The
//! agent drains on a 10 ms timer instead; an 8 MiB ring drained every 10 ms absorbs 800 MB/s.
//! The one exception is a process's first connection's first event (every connection's on the
//! syscall path; see `emit_data`).
//! (A wakeup only above a fill threshold, via bpf_ringbuf_query, made this toolchain emit BTF
//! line info the kernel rejects: "Invalid line_info ... prev_offset".)

use agent_common::{
    counters,
    event::{DATA_EVENT_SIZE, MAX_PAYLOAD},
};

use crate::{
    helpers::{bounds::clamp, count::count},
    maps::{EVENTS, Scratch},
};

const BPF_RB_NO_WAKEUP: u64 = 1 << 0;

/// Sends the scratch event and its first `captured` payload bytes. `wake` (the first event of a
/// process's first connection, `event::send_data`) wakes the reader at once: the agent reads
/// /proc for a new process, and a short-lived client (curl) may be gone 10 ms later.
#[inline(always)]
pub fn emit_data(scratch: *const Scratch, captured: u32, wake: bool) {
    // NO_WAKEUP (1) or FORCE_WAKEUP (2), computed without a branch (see the module doc).
    let flags = BPF_RB_NO_WAKEUP << (wake as u64);
    let len = DATA_EVENT_SIZE as u64 + clamp(captured as u64, MAX_PAYLOAD as u64);
    // SAFETY: the event is followed in memory by the payload array; len stays inside Scratch.
    let record = unsafe { core::slice::from_raw_parts(scratch.cast::<u8>(), len as usize) };
    if EVENTS.output::<[u8]>(record, flags).is_err() {
        count(counters::RINGBUF_FULL);
    } else {
        count(counters::EVENTS_EMITTED);
    }
}

/// Sends a fixed-size record.
#[inline(always)]
pub fn emit<T>(record: &T) {
    if EVENTS.output::<T>(record, BPF_RB_NO_WAKEUP).is_err() {
        count(counters::RINGBUF_FULL);
    } else {
        count(counters::EVENTS_EMITTED);
    }
}
