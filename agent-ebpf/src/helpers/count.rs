use crate::maps::COUNTERS;

/// Bumps one of the `agent_common::counters` on this CPU.
#[inline(always)]
pub fn count(counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot; a tracepoint program is not re-entered on one CPU.
        unsafe { *slot += 1 };
    }
}
