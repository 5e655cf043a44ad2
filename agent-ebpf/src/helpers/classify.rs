//! Decides on a connection's first payload whether any parser may want it, so that traffic
//! nobody parses costs one map lookup per syscall from then on. The rows come from
//! `agent_common::protocol::PREFILTER`, the same list user space detects from; user space has
//! the last word and writes an `ignored` verdict back (agent/src/protocol/verdict.rs).

use agent_common::protocol::{PREFILTER, PROTO_UNKNOWN, PrefilterRow, proto_bit};

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

/// `agent_common::protocol::prefilter`, unrolled: each row's mask and value become immediates.
/// As a loop, LLVM lays the body out before its header, so the body falls through into the
/// header; verifiers before ~6.4 reject that edge ("back-edge from insn ...") on any kernel, as
/// Debian 6.1 showed.
#[inline(always)]
fn prefilter(head: u64, len: u32, wanted: u32) -> u8 {
    macro_rules! rows {
        ($($i:literal)*) => {
            $({
                const R: PrefilterRow = PREFILTER[$i];
                if len >= R.min_len as u32
                    && head & R.mask == R.value
                    && (wanted == 0 || wanted & proto_bit(R.protocol) != 0)
                {
                    return R.protocol;
                }
            })*
        };
    }
    const _: () = assert!(PREFILTER.len() == 40, "list every row below");
    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19
          20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39);
    PROTO_UNKNOWN
}
