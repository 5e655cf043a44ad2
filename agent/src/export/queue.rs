//! The export queue between the pipeline and the exporter, bounded in spans.
//!
//! The pipeline gathers the spans it makes while it works through a batch of events and hands
//! them over together when the batch is done (`SpanOut::send`): one channel operation and at
//! most one wakeup of the exporter per batch. A channel of single spans cost four atomic
//! operations on lines the exporter's thread was reading (semaphore, slot, tail, waker) and a
//! move of every span into and out of the channel's blocks, per span.
//!
//! The bound stays a number of spans, counted across batches: spans handed over and not yet
//! taken by the exporter plus those gathered since. A span offered beyond it is dropped and
//! counted, as before.
//!
//! When OTLP is the only output, a span is encoded as it is offered and only its bytes cross
//! (`otlp_proto::EncodedSpans`); the console and JSON lines read records, so with either of
//! them the records cross.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{ExportStats, otlp_proto::EncodedSpans};
use crate::trace::span::SpanRecord;

/// What crosses the queue: span records for the outputs that read them (the console, JSON
/// lines), or, when OTLP is the only output, each span already in its wire form (see
/// `EncodedSpans`).
#[derive(Debug)]
pub enum Spans {
    Records(Vec<SpanRecord>),
    Encoded(EncodedSpans),
}

impl Spans {
    pub fn len(&self) -> usize {
        match self {
            Spans::Records(r) => r.len(),
            Spans::Encoded(e) => e.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty one of the same form, with room for as many spans.
    fn like(&self) -> Self {
        match self {
            Spans::Records(r) => Spans::Records(Vec::with_capacity(r.capacity())),
            Spans::Encoded(e) => Spans::Encoded(EncodedSpans::with_capacity_of(e)),
        }
    }
}

/// A queue of `capacity` spans that carries records: the pipeline's end and the exporter's.
pub fn span_queue(capacity: usize) -> (SpanOut, SpanIn) {
    queue(capacity, Spans::Records(Vec::new()))
}

/// A queue of `capacity` spans that encodes each span as it is offered (OTLP the only output).
pub fn encoding_span_queue(capacity: usize) -> (SpanOut, SpanIn) {
    // Room for a hand-over from the start, for the first process with spans: grown span by
    // span, the buffer was copied a dozen times over before reaching its size (each later
    // hand-over starts with the room each process had in the one before). Pages are touched
    // only as spans are written.
    let spans = HAND_OVER_AT + crate::event_queue::BATCH;
    let room = EncodedSpans::with_room(spans * ROOM_PER_SPAN);
    queue(capacity, Spans::Encoded(room))
}

/// Bytes of the first hand-over's room per span: an HTTP span with its attributes encodes to
/// some 400 bytes, and a span reserves its widest encoding before it is written.
const ROOM_PER_SPAN: usize = 1024;

fn queue(capacity: usize, pending: Spans) -> (SpanOut, SpanIn) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        SpanOut {
            tx,
            queued: queued.clone(),
            capacity,
            pending,
            // The first spans go at once.
            sent_at: Instant::now()
                .checked_sub(HAND_OVER_AFTER)
                .unwrap_or_else(Instant::now),
        },
        SpanIn { rx, queued },
    )
}

pub struct SpanOut {
    tx: mpsc::UnboundedSender<Spans>,
    /// Spans handed over and not yet taken by the exporter.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    /// Spans made since the last `send`.
    pending: Spans,
    sent_at: Instant,
}

/// Spans gathered before `send_due` hands them over, unless the last hand-over is older than
/// `HAND_OVER_AFTER`. Each hand-over wakes the exporter, and a wakeup per batch of events (about
/// 600/s at 40k req/s, both ends traced) kept both runtime workers switching in and out ~730
/// times a second each for a few spans at a time; the exporter sends 2048 at once anyway.
const HAND_OVER_AT: usize = 1024;
const HAND_OVER_AFTER: Duration = Duration::from_millis(50);

impl SpanOut {
    /// Queues a span for the next `send`; counts it as dropped when the queue is full.
    pub fn offer(&mut self, stats: &ExportStats, span: SpanRecord) {
        // Only the pipeline's thread builds spans (`crate::counter`).
        crate::counter::add(&stats.spans_built, 1);
        let queued = self.queued.load(Ordering::Relaxed) + self.pending.len();
        stats.queued.store(queued as u64, Ordering::Relaxed);
        if self.capacity.saturating_sub(queued) < self.capacity / 4 {
            crate::scheduling::ADAPTIVE.pressure();
        }
        if queued >= self.capacity {
            stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match &mut self.pending {
            Spans::Records(r) => r.push(span),
            // The record is freed here, on the thread that built it.
            Spans::Encoded(e) => {
                e.push(&span);
                span.recycle();
            }
        }
    }

    /// `send` when enough spans are gathered or the last hand-over is a while ago: a light load
    /// still hands its spans over at once, a heavy one in fewer, larger hand-overs.
    pub fn send_due(&mut self, stats: &ExportStats) {
        if self.pending.is_empty() {
            return;
        }
        if self.pending.len() >= HAND_OVER_AT || self.sent_at.elapsed() >= HAND_OVER_AFTER {
            self.send(stats);
        }
    }

    /// Hands the spans made since the last call to the exporter. A stopped exporter loses
    /// them, counted as a full queue.
    pub fn send(&mut self, stats: &ExportStats) {
        if self.pending.is_empty() {
            return;
        }
        self.sent_at = Instant::now();
        // The next batch of spans starts with room for as many as this one had.
        let next = self.pending.like();
        let spans = std::mem::replace(&mut self.pending, next);
        let n = spans.len();
        self.queued.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(spans).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            stats.queue_full.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Spans made and not yet sent.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

pub struct SpanIn {
    rx: mpsc::UnboundedReceiver<Spans>,
    queued: Arc<AtomicUsize>,
}

impl SpanIn {
    /// The next spans handed over; `None` once the pipeline's end is gone and all are taken.
    pub async fn recv(&mut self) -> Option<Spans> {
        let spans = self.rx.recv().await?;
        self.queued.fetch_sub(spans.len(), Ordering::Relaxed);
        Some(spans)
    }

    /// Spans handed over and not taken yet.
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything handed over so far, without waiting: for tests and benchmarks.
    pub fn take_ready_spans(&mut self) -> Vec<Spans> {
        let mut all = Vec::new();
        while let Ok(spans) = self.rx.try_recv() {
            self.queued.fetch_sub(spans.len(), Ordering::Relaxed);
            all.push(spans);
        }
        all
    }

    /// The records handed over so far, without waiting (a queue of records: tests, benchmarks).
    pub fn take_ready(&mut self) -> Vec<SpanRecord> {
        let mut all = Vec::new();
        for spans in self.take_ready_spans() {
            match spans {
                Spans::Records(r) => all.extend(r),
                Spans::Encoded(_) => panic!("take_ready on an encoding queue"),
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::{SpanKind, SpanRecord};

    fn span(n: u8) -> SpanRecord {
        SpanRecord {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_ns: 0,
            end_unix_ns: 0,
            attributes: Vec::new(),
            error: None,
            status: None,
            pid: 1,
            comm: "c".into(),
        }
    }

    #[test]
    fn spans_go_over_together_when_sent_and_the_bound_counts_both_ends() {
        let stats = ExportStats::default();
        let (mut out, mut inn) = span_queue(4);
        out.offer(&stats, span(1));
        out.offer(&stats, span(2));
        assert!(
            inn.take_ready().is_empty(),
            "nothing before the batch is sent"
        );
        out.send(&stats);
        assert_eq!(inn.len(), 2);
        out.offer(&stats, span(3));
        out.offer(&stats, span(4));
        // Two handed over and two pending fill the queue: the fifth is dropped and counted.
        out.offer(&stats, span(5));
        assert_eq!(stats.queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(stats.spans_built.load(Ordering::Relaxed), 5);
        out.send(&stats);
        let got: Vec<u8> = inn.take_ready().iter().map(|s| s.span_id[0]).collect();
        assert_eq!(got, [1, 2, 3, 4], "in order");
        assert_eq!(inn.len(), 0);
        // Taken spans make room again.
        out.offer(&stats, span(6));
        assert_eq!(out.pending(), 1);
        assert_eq!(stats.queue_full.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_encoding_queue_hands_over_each_span_encoded_with_the_same_bound() {
        let stats = ExportStats::default();
        let (mut out, mut inn) = encoding_span_queue(3);
        for n in 1..=4 {
            out.offer(&stats, span(n));
        }
        assert_eq!(stats.queue_full.load(Ordering::Relaxed), 1);
        out.send(&stats);
        assert_eq!(inn.len(), 3);
        let mut got = inn.take_ready_spans();
        assert_eq!(got.len(), 1, "one hand-over per batch");
        let Spans::Encoded(e) = got.remove(0) else {
            panic!("records from an encoding queue");
        };
        assert_eq!(e.len(), 3);
        let mut one = super::super::otlp_proto::EncodedSpans::default();
        for n in 1..=3 {
            one.push(&span(n));
        }
        assert!(e.into_runs().eq(one.into_runs()), "the spans kept, encoded");
        assert_eq!(inn.len(), 0);
    }

    #[test]
    fn spans_are_handed_over_at_once_after_a_pause_and_otherwise_gathered() {
        let stats = ExportStats::default();
        let (mut out, mut inn) = span_queue(4 * HAND_OVER_AT);
        out.offer(&stats, span(1));
        out.send_due(&stats);
        assert_eq!(
            inn.take_ready_spans().len(),
            1,
            "the first spans go at once"
        );
        out.offer(&stats, span(2));
        out.send_due(&stats);
        assert_eq!(
            out.pending(),
            1,
            "gathered: the last hand-over was just now"
        );
        for n in 3..=HAND_OVER_AT {
            out.offer(&stats, span(n as u8));
        }
        out.send_due(&stats);
        assert_eq!(out.pending(), HAND_OVER_AT - 1);
        out.offer(&stats, span(0));
        out.send_due(&stats);
        assert_eq!(out.pending(), 0, "enough gathered");
        out.offer(&stats, span(7));
        std::thread::sleep(HAND_OVER_AFTER);
        out.send_due(&stats);
        assert_eq!(out.pending(), 0, "a while after the last hand-over");
        assert_eq!(inn.len(), HAND_OVER_AT + 1);
    }

    #[test]
    fn spans_sent_to_a_stopped_exporter_are_counted_lost() {
        let stats = ExportStats::default();
        let (mut out, inn) = span_queue(8);
        drop(inn);
        out.offer(&stats, span(1));
        out.offer(&stats, span(2));
        out.send(&stats);
        assert_eq!(stats.queue_full.load(Ordering::Relaxed), 2);
        assert_eq!(out.pending(), 0);
    }
}
