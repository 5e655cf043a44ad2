//! One direction of a connection's byte stream, rebuilt from events that each carry their
//! stream offset. Bytes the agent never saw (lost events, capture cap, sendfile) stay in the
//! stream as counted gaps, so a parser downstream can skip a body it could not see instead of
//! splicing unrelated bytes together.

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
    /// Captured bytes of one event beyond the per-stream cap, passed on as a gap.
    pub overflow_bytes: u64,
    pub stale_events: u64,
}

/// Where one direction's stream stands. It holds no bytes: every event's segments go to the
/// consumer as it arrives (the consumer keeps what a message split across events needs).
/// Queued here and drained after every event, each segment was moved twice more, a tenth of
/// the pipeline's own work per event.
#[derive(Debug)]
pub struct Stream {
    /// Offset just past the last byte pushed; None before the first event.
    next_seq: Option<u64>,
    cap: usize,
    pub stats: StreamStats,
}

impl Stream {
    /// `cap`: most captured bytes one event may hand on; the rest of them become a gap.
    pub fn new(cap: usize) -> Self {
        Self {
            next_seq: None,
            cap,
            stats: StreamStats::default(),
        }
    }

    /// Takes the `bytes` bytes moved at stream offset `seq`, of which `payload` is the captured
    /// prefix, and appends to `out` what they make available: a gap for bytes lost before
    /// them, their data, a gap for what was moved but not captured.
    pub fn push(&mut self, seq: u64, bytes: u32, payload: Bytes, out: &mut Segments) -> Pushed {
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
            push_gap(out, lost);
        }
        let uncaptured = bytes - payload.len() as u64;
        if payload.len() > self.cap {
            self.stats.overflow_bytes += payload.len() as u64;
            push_gap(out, payload.len() as u64);
        } else if !payload.is_empty() {
            out.push(Segment::Data(payload));
        }
        if uncaptured > 0 {
            self.stats.uncaptured_bytes += uncaptured;
            push_gap(out, uncaptured);
        }
        self.next_seq = Some(seq + bytes);
        Pushed::Appended { lost }
    }

    /// Offset just past the last byte seen.
    pub fn end(&self) -> Option<u64> {
        self.next_seq
    }
}

/// A gap after `out`'s last segment, merged into it when that is a gap too.
fn push_gap(out: &mut Segments, n: u64) {
    if let Some(Segment::Gap(last)) = out.last_mut() {
        *last += n;
    } else {
        out.push(Segment::Gap(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// A stream and everything its pushes made available, as one consumer reads it (a gap
    /// ending one push and one starting the next are one run of skipped bytes).
    struct Fed {
        stream: Stream,
        seen: Vec<Segment>,
    }

    impl Fed {
        fn new(cap: usize) -> Self {
            Self {
                stream: Stream::new(cap),
                seen: Vec::new(),
            }
        }

        fn push(&mut self, seq: u64, bytes: u32, payload: Bytes) -> Pushed {
            let mut out = Segments::new();
            let pushed = self.stream.push(seq, bytes, payload, &mut out);
            for seg in out {
                match (self.seen.last_mut(), seg) {
                    (Some(Segment::Gap(last)), Segment::Gap(n)) => *last += n,
                    (_, seg) => self.seen.push(seg),
                }
            }
            pushed
        }
    }

    #[test]
    fn in_order_events_concatenate() {
        let mut s = Fed::new(1024);
        assert_eq!(s.push(0, 4, b("GET ")), Pushed::Appended { lost: 0 });
        assert_eq!(s.push(4, 2, b("/ ")), Pushed::Appended { lost: 0 });
        assert_eq!(
            s.seen,
            vec![Segment::Data(b("GET ")), Segment::Data(b("/ "))]
        );
        assert_eq!(s.stream.end(), Some(6));
    }

    #[test]
    fn a_stream_joined_midway_starts_where_it_is_joined() {
        let mut s = Fed::new(1024);
        assert_eq!(s.push(5000, 3, b("abc")), Pushed::Appended { lost: 0 });
        assert_eq!(s.stream.end(), Some(5003));
    }

    #[test]
    fn lost_events_become_gaps() {
        let mut s = Fed::new(1024);
        s.push(0, 3, b("abc"));
        assert_eq!(s.push(10, 2, b("de")), Pushed::Appended { lost: 7 });
        assert_eq!(
            s.seen,
            vec![
                Segment::Data(b("abc")),
                Segment::Gap(7),
                Segment::Data(b("de"))
            ]
        );
        assert_eq!(s.stream.stats.lost_bytes, 7);
    }

    #[test]
    fn truncated_and_payloadless_events_keep_their_length_as_gaps() {
        let mut s = Fed::new(1024);
        s.push(0, 10, b("head"));
        s.push(10, 100, Bytes::new());
        s.push(110, 1, b("z"));
        assert_eq!(
            s.seen,
            vec![
                Segment::Data(b("head")),
                Segment::Gap(106),
                Segment::Data(b("z"))
            ]
        );
        assert_eq!(s.stream.stats.uncaptured_bytes, 106);
    }

    #[test]
    fn a_lost_run_and_an_uncaptured_event_are_one_gap() {
        let mut s = Fed::new(1024);
        s.push(0, 1, b("a"));
        let mut out = Segments::new();
        s.stream.push(5, 10, b("bc"), &mut out);
        assert_eq!(
            out.to_vec(),
            vec![Segment::Gap(4), Segment::Data(b("bc")), Segment::Gap(8)]
        );
        out.clear();
        s.stream.push(20, 3, Bytes::new(), &mut out);
        assert_eq!(out.to_vec(), vec![Segment::Gap(8)]);
    }

    #[test]
    fn reordered_or_duplicate_events_are_counted_and_ignored() {
        let mut s = Fed::new(1024);
        s.push(0, 4, b("abcd"));
        assert_eq!(s.push(2, 2, b("cd")), Pushed::Stale);
        assert_eq!(s.stream.stats.stale_events, 1);
        assert_eq!(s.seen, vec![Segment::Data(b("abcd"))]);
    }

    #[test]
    fn a_payload_over_the_cap_is_a_counted_gap() {
        let mut s = Fed::new(8);
        s.push(0, 5, b("aaaaa"));
        s.push(5, 10, b("bbbbbbbbbb"));
        s.push(15, 5, b("ccccc"));
        assert_eq!(s.stream.stats.overflow_bytes, 10);
        assert_eq!(
            s.seen,
            vec![
                Segment::Data(b("aaaaa")),
                Segment::Gap(10),
                Segment::Data(b("ccccc"))
            ]
        );
        let total: u64 = s.seen.iter().map(Segment::len).sum();
        assert_eq!(total, 20);
    }
}
