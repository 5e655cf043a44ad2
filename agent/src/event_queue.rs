//! The ring reader's hand-off to the pipeline: decoded events in batches, bounded in events.
//!
//! One channel operation per event (and the pipeline's wakeup, select and bookkeeping around
//! each) was a fixed cost on every record; a drain of the ring hands its events over in batches
//! of up to `BATCH` instead, so the pipeline starts on the first batch while the reader decodes
//! the rest. The bound stays a number of events (`CAPACITY`), counted across batches: a batch
//! that does not fit whole is cut, and what did not fit is the caller's to count as dropped.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

use crate::decode::Event;

/// Events queued and not yet handled before a drain drops: ~1 s of a saturated 2-core node.
pub const CAPACITY: usize = 65_536;
/// Events per hand-off: large enough that the per-batch cost is noise, small enough that the
/// pipeline is not idle while the reader decodes a long drain.
pub const BATCH: usize = 256;

/// Emptied batches kept for the reader to fill again: a batch grown anew each time was five
/// allocations in as many size classes, which the allocator kept around per thread.
const SPARE: usize = 16;

struct Shared {
    capacity: usize,
    /// Events sent and not yet handled (a batch counts until the pipeline has handled it).
    queued: AtomicUsize,
    spare: Mutex<Vec<Vec<Event>>>,
}

pub struct EventSender {
    tx: mpsc::UnboundedSender<Vec<Event>>,
    shared: Arc<Shared>,
}

pub struct EventReceiver {
    rx: mpsc::UnboundedReceiver<Vec<Event>>,
    shared: Arc<Shared>,
}

/// Events handed to the pipeline; they stop counting against the bound when this is dropped.
pub struct Batch {
    pub events: Vec<Event>,
    count: usize,
    shared: Arc<Shared>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.shared.queued.fetch_sub(self.count, Ordering::Relaxed);
        self.shared.keep(std::mem::take(&mut self.events));
    }
}

impl Shared {
    /// Keeps a full-size batch for reuse (what is left in it is dropped).
    fn keep(&self, mut events: Vec<Event>) {
        if events.capacity() != BATCH {
            return;
        }
        events.clear();
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE {
            spare.push(events);
        }
    }
}

pub fn channel(capacity: usize) -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        capacity,
        queued: AtomicUsize::new(0),
        spare: Mutex::new(Vec::new()),
    });
    (
        EventSender {
            tx,
            shared: shared.clone(),
        },
        EventReceiver { rx, shared },
    )
}

impl EventSender {
    /// An empty batch to fill: one the pipeline is done with, else a new one.
    pub fn batch(&self) -> Vec<Event> {
        let spare = self
            .shared
            .spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        spare.unwrap_or_else(|| Vec::with_capacity(BATCH))
    }

    /// Queues what fits of `batch` and returns how many events did not (dropped). There is one
    /// sender, so the room it sees can only grow before it adds to the count.
    pub fn send(&self, mut batch: Vec<Event>) -> usize {
        let offered = batch.len();
        let room = self
            .shared
            .capacity
            .saturating_sub(self.shared.queued.load(Ordering::Relaxed));
        batch.truncate(room);
        let kept = batch.len();
        if kept == 0 {
            return offered;
        }
        self.shared.queued.fetch_add(kept, Ordering::Relaxed);
        if self.tx.send(batch).is_err() {
            // The pipeline is gone (shutting down): nothing will handle them.
            self.shared.queued.fetch_sub(kept, Ordering::Relaxed);
            return offered;
        }
        offered - kept
    }

    /// A batch from `batch` that was not sent.
    pub fn recycle(&self, events: Vec<Event>) {
        self.shared.keep(events);
    }

    /// Events sent and not yet handled.
    pub fn waiting(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

impl EventReceiver {
    /// The next batch; `None` once the reader is gone and everything it sent was received.
    pub async fn recv(&mut self) -> Option<Batch> {
        let events = self.rx.recv().await?;
        Some(Batch {
            count: events.len(),
            events,
            shared: self.shared.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ForkEvent;

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                Event::Fork(ForkEvent {
                    ts_ns: i as u64,
                    pid: 1,
                    parent_tid: 1,
                    child_tid: 2,
                })
            })
            .collect()
    }

    #[tokio::test]
    async fn bounded_in_events_until_the_pipeline_has_handled_them() {
        let (tx, mut rx) = channel(10);
        assert_eq!(tx.send(events(6)), 0);
        assert_eq!(tx.send(events(6)), 2, "4 of 6 fit");
        assert_eq!(tx.send(events(1)), 1, "full");
        assert_eq!(tx.waiting(), 10);
        let first = rx.recv().await.unwrap();
        assert_eq!(first.events.len(), 6);
        assert_eq!(tx.waiting(), 10, "received is not handled yet");
        drop(first);
        assert_eq!(tx.waiting(), 4);
        assert_eq!(tx.send(events(3)), 0);
        let second = rx.recv().await.unwrap();
        assert_eq!(
            second.events.len(),
            4,
            "the cut batch keeps its first events"
        );
        drop(second);
        drop(rx.recv().await.unwrap());
        assert_eq!(tx.waiting(), 0);
        drop(rx);
        assert_eq!(tx.send(events(2)), 2, "no pipeline: dropped");
        assert_eq!(tx.waiting(), 0);
    }

    #[tokio::test]
    async fn handled_full_size_batches_are_filled_again() {
        let (tx, mut rx) = channel(CAPACITY);
        let mut batch = tx.batch();
        assert_eq!(batch.capacity(), BATCH);
        batch.extend(events(3));
        let address = batch.as_ptr();
        assert_eq!(tx.send(batch), 0);
        drop(rx.recv().await.unwrap());
        let again = tx.batch();
        assert!(again.is_empty(), "a reused batch starts empty");
        assert_eq!(again.as_ptr(), address, "the handled batch comes back");
        tx.recycle(events(2));
        assert_eq!(tx.batch().capacity(), BATCH, "odd sizes are not kept");
    }
}
