//! Counters only the pipeline's thread writes (the tracing sink, its linker and sampler, the span
//! queue's producer side). Every exchange bumps several; a locked add (`fetch_add`) is a full
//! barrier that waits for the store buffer to drain, and the pipeline's stores are many (heads
//! and spans are moved and built by value). One writer needs no read-modify-write: a relaxed
//! load and store keep the count exact, and readers (the metrics endpoint) see it grow.
//!
//! A counter another thread also writes must keep `fetch_add`: two writers would lose counts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds `n` to a counter the calling thread alone writes.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_counts_exactly() {
        let c = AtomicU64::new(0);
        for _ in 0..1000 {
            add(&c, 3);
        }
        assert_eq!(c.load(Ordering::Relaxed), 3000);
    }
}
