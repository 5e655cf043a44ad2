//! Decides on a connection's first payload whether any parser may want it, so that traffic
//! nobody parses costs one map lookup per syscall from then on. The rows come from
//! `agent_common::protocol::PREFILTER`, the same list user space detects from; user space has
//! the last word and writes an `ignored` verdict back (agent/src/protocol/verdict.rs).

use agent_common::protocol::prefilter;

/// The protocol hint for a stream starting with `captured` bytes at `payload` among `wanted`
/// (`proto_bit`s, 0 = all), or `PROTO_UNKNOWN`.
#[inline(always)]
pub fn classify(payload: *const u8, captured: u32, wanted: u32) -> u8 {
    // SAFETY: the payload buffer is MAX_PAYLOAD (>= 8) bytes of per-CPU scratch; bytes past
    // `captured` are stale from an earlier event and masked off below.
    let raw = unsafe { core::ptr::read_unaligned(payload.cast::<u64>()) };
    let head = if captured >= 8 {
        raw
    } else {
        raw & ((1u64 << (captured * 8)) - 1)
    };
    prefilter(head, captured, wanted)
}
