//! Handing records to the ring buffer; a full ring is counted, never silent.

use agent_common::{
    counters,
    event::{DATA_EVENT_SIZE, MAX_PAYLOAD},
};

use crate::{
    helpers::{bounds::clamp, count::count},
    maps::{EVENTS, Scratch},
};

/// Sends the scratch event and its first `captured` payload bytes.
#[inline(always)]
pub fn emit_data(scratch: *const Scratch, captured: u32) {
    let len = DATA_EVENT_SIZE as u64 + clamp(captured as u64, MAX_PAYLOAD as u64);
    // SAFETY: the event is followed in memory by the payload array; len stays inside Scratch.
    let record = unsafe { core::slice::from_raw_parts(scratch.cast::<u8>(), len as usize) };
    if EVENTS.output::<[u8]>(record, 0).is_err() {
        count(counters::RINGBUF_FULL);
    } else {
        count(counters::EVENTS_EMITTED);
    }
}

/// Sends a fixed-size record.
#[inline(always)]
pub fn emit<T>(record: &T) {
    if EVENTS.output::<T>(record, 0).is_err() {
        count(counters::RINGBUF_FULL);
    } else {
        count(counters::EVENTS_EMITTED);
    }
}
