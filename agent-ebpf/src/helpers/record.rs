//! Reading fields of a tracepoint's record.

use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

/// The field of type `T` at `offset` of the record, loaded directly: the verifier allows aligned
/// loads from a tracepoint context, and a direct load costs one instruction where
/// `TracePointContext::read_at` (bpf_probe_read_kernel) costs a helper call. Every offset passed
/// here is a multiple of its field's size (tracefs format files).
#[inline(always)]
pub fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: inside the record, aligned; the verifier checks both.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}
