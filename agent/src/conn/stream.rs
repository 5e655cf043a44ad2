//! One direction of a connection's byte stream, rebuilt from events that each carry their
//! stream offset. Bytes the agent never saw (lost events, capture cap, sendfile) stay in the
//! stream as counted gaps, so a parser downstream can skip a body it could not see instead of
//! splicing unrelated bytes together.

use std::collections::VecDeque;

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Data(Bytes),
    /// Bytes that passed on the socket but were not captured.
    Gap(u64),
}

impl Segment {
    pub fn len(&self) -> u64 {
        match self {
            Segment::Data(b) => b.len() as u64,
            Segment::Gap(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one event made available: almost always one segment (a gap and data at most), so it
/// travels inline instead of in an allocation per event.
pub type Segments = smallvec::SmallVec<[Segment; 2]>;

/// What pushing one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Appended; `lost` bytes before it were never seen (events lost upstream).
    Appended { lost: u64 },
    /// The event's bytes are already in the stream (reordered or duplicate): ignored.
    Stale,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes between events that never arrived.
    pub lost_bytes: u64,
    /// Bytes moved but not captured (capture cap or no user buffer).
    pub uncaptured_bytes: u64,
    /// Captured bytes dropped because nobody consumed them before the buffer cap.
    pub overflow_bytes: u64,
    pub stale_events: u64,
}

#[derive(Debug)]
pub struct Stream {
    /// Offset just past the last byte pushed; None before the first event.
    next_seq: Option<u64>,
    segments: VecDeque<Segment>,
    buffered: usize,
    cap: usize,
    pub stats: StreamStats,
}

impl Stream {
    /// `cap`: most captured bytes held before the oldest are turned into gaps.
    pub fn new(cap: usize) -> Self {
        Self {
            next_seq: None,
            segments: VecDeque::new(),
            buffered: 0,
            cap,
            stats: StreamStats::default(),
        }
    }

    /// Adds the `bytes` bytes moved at stream offset `seq`, of which `payload` is the captured
    /// prefix.
    pub fn push(&mut self, seq: u64, bytes: u32, payload: Bytes) -> Pushed {
        let bytes = u64::from(bytes).max(payload.len() as u64);
        let mut lost = 0;
        if let Some(next) = self.next_seq {
            if seq < next {
                self.stats.stale_events += 1;
                return Pushed::Stale;
            }
            lost = seq - next;
        }
        if lost > 0 {
            self.stats.lost_bytes += lost;
            self.push_gap(lost);
        }
        let uncaptured = bytes - payload.len() as u64;
        if !payload.is_empty() {
            self.buffered += payload.len();
            self.segments.push_back(Segment::Data(payload));
        }
        if uncaptured > 0 {
            self.stats.uncaptured_bytes += uncaptured;
            self.push_gap(uncaptured);
        }
        self.next_seq = Some(seq + bytes);
        self.enforce_cap();
        Pushed::Appended { lost }
    }

    fn push_gap(&mut self, n: u64) {
        if let Some(Segment::Gap(last)) = self.segments.back_mut() {
            *last += n;
        } else {
            self.segments.push_back(Segment::Gap(n));
        }
    }

    /// Turns the oldest captured bytes into a gap until the buffer fits its cap.
    fn enforce_cap(&mut self) {
        while self.buffered > self.cap {
            // Everything before the first data segment is one gap (kept merged below).
            let Some(first_data) = self
                .segments
                .iter()
                .position(|s| matches!(s, Segment::Data(_)))
            else {
                return;
            };
            let mut gap = 0;
            for _ in 0..=first_data {
                if let Some(seg) = self.segments.pop_front() {
                    if let Segment::Data(b) = &seg {
                        self.buffered -= b.len();
                        self.stats.overflow_bytes += b.len() as u64;
                    }
                    gap += seg.len();
                }
            }
            if let Some(Segment::Gap(n)) = self.segments.front() {
                gap += *n;
                self.segments.pop_front();
            }
            self.segments.push_front(Segment::Gap(gap));
        }
    }

    /// Takes every buffered segment, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = Segment> + '_ {
        self.buffered = 0;
        self.segments.drain(..)
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Offset just past the last byte seen.
    pub fn end(&self) -> Option<u64> {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn drained(s: &mut Stream) -> Vec<Segment> {
        s.drain().collect()
    }

    #[test]
    fn in_order_events_concatenate() {
        let mut s = Stream::new(1024);
        assert_eq!(s.push(0, 4, b("GET ")), Pushed::Appended { lost: 0 });
        assert_eq!(s.push(4, 2, b("/ ")), Pushed::Appended { lost: 0 });
        assert_eq!(
            drained(&mut s),
            vec![Segment::Data(b("GET ")), Segment::Data(b("/ "))]
        );
        assert_eq!(s.end(), Some(6));
        assert_eq!(s.buffered_bytes(), 0);
    }

    #[test]
    fn a_stream_joined_midway_starts_where_it_is_joined() {
        let mut s = Stream::new(1024);
        assert_eq!(s.push(5000, 3, b("abc")), Pushed::Appended { lost: 0 });
        assert_eq!(s.end(), Some(5003));
    }

    #[test]
    fn lost_events_become_gaps() {
        let mut s = Stream::new(1024);
        s.push(0, 3, b("abc"));
        assert_eq!(s.push(10, 2, b("de")), Pushed::Appended { lost: 7 });
        assert_eq!(
            drained(&mut s),
            vec![
                Segment::Data(b("abc")),
                Segment::Gap(7),
                Segment::Data(b("de"))
            ]
        );
        assert_eq!(s.stats.lost_bytes, 7);
    }

    #[test]
    fn truncated_and_payloadless_events_keep_their_length_as_gaps() {
        let mut s = Stream::new(1024);
        s.push(0, 10, b("head"));
        s.push(10, 100, Bytes::new());
        s.push(110, 1, b("z"));
        assert_eq!(
            drained(&mut s),
            vec![
                Segment::Data(b("head")),
                Segment::Gap(106),
                Segment::Data(b("z"))
            ]
        );
        assert_eq!(s.stats.uncaptured_bytes, 106);
    }

    #[test]
    fn reordered_or_duplicate_events_are_counted_and_ignored() {
        let mut s = Stream::new(1024);
        s.push(0, 4, b("abcd"));
        assert_eq!(s.push(2, 2, b("cd")), Pushed::Stale);
        assert_eq!(s.stats.stale_events, 1);
        assert_eq!(drained(&mut s), vec![Segment::Data(b("abcd"))]);
    }

    #[test]
    fn memory_is_bounded_and_overflow_is_counted() {
        let mut s = Stream::new(8);
        s.push(0, 5, b("aaaaa"));
        s.push(5, 5, b("bbbbb"));
        s.push(10, 5, b("ccccc"));
        assert!(s.buffered_bytes() <= 8);
        assert_eq!(s.stats.overflow_bytes, 10);
        assert_eq!(
            drained(&mut s),
            vec![Segment::Gap(10), Segment::Data(b("ccccc"))]
        );
    }

    #[test]
    fn a_payload_larger_than_the_cap_still_terminates() {
        let mut s = Stream::new(2);
        s.push(0, 3, b("abc"));
        s.push(3, 3, b("def"));
        assert!(s.buffered_bytes() <= 2);
        let total: u64 = s.drain().map(|seg| seg.len()).sum();
        assert_eq!(total, 6);
    }
}
