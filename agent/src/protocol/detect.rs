//! Which protocol a connection speaks, decided in user space from its first bytes (the kernel's
//! prefilter only said "maybe"). Scored and ordered over `REGISTRY`, counted per protocol:
//! detected (chosen), rejected (said no), undecided (still unsure when detection gave up).
//! Server-first protocols (MySQL's greeting) and connections joined mid-stream work because
//! each direction is offered separately and a detector knows which direction it is looking at.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Detect, PROTO_COUNT, REGISTRY};

/// Bytes of one direction looked at before detection gives up.
pub const MAX_DETECT_BYTES: usize = 2048;
/// Payload events looked at before detection gives up.
pub const MAX_DETECT_EVENTS: u8 = 8;

#[derive(Debug, Default)]
pub struct DetectStats {
    pub detected: [AtomicU64; PROTO_COUNT],
    pub rejected: [AtomicU64; PROTO_COUNT],
    pub undecided: [AtomicU64; PROTO_COUNT],
    /// Connections no parser wanted (the verdict written back to the kernel).
    pub ignored: AtomicU64,
    /// Ignored verdicts written to the kernel (for these, for the export path's connections,
    /// another agent's and unhooked TLS ones): taken, or not (the connection gone, reused).
    pub verdicts_written: AtomicU64,
    pub verdicts_failed: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Protocol(u8),
    /// No registered protocol: stop capturing it.
    Ignore,
    Pending,
}

/// One connection's detection in progress.
#[derive(Debug, Default)]
pub struct Detection {
    /// First bytes per direction (requests, responses).
    first: [Vec<u8>; 2],
    events: u8,
}

impl Detection {
    /// Offers the next bytes of one direction. `hint` is the kernel prefilter's guess: it
    /// breaks ties.
    pub fn offer(&mut self, data: &[u8], requests: bool, hint: u8, stats: &DetectStats) -> Verdict {
        self.offer_at(data, requests, hint, false, stats)
    }

    /// As `offer`, for a connection joined mid-stream when `midstream`: bytes that start nothing
    /// known may be the inside of a message (a body, a row), so they are dropped and the next
    /// payloads get their chance, up to `MAX_DETECT_EVENTS`, before the connection is given up.
    pub fn offer_at(
        &mut self,
        data: &[u8],
        requests: bool,
        hint: u8,
        midstream: bool,
        stats: &DetectStats,
    ) -> Verdict {
        self.events = self.events.saturating_add(1);
        let buf = &mut self.first[usize::from(!requests)];
        let room = MAX_DETECT_BYTES.saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
        let buf = &self.first[usize::from(!requests)];
        let mut best: Option<(u8, u16)> = None;
        let mut unsure = false;
        let answers: Vec<(u8, Detect)> = REGISTRY
            .iter()
            .map(|r| (r.id, (r.detect)(buf, requests)))
            .collect();
        for &(id, d) in &answers {
            match d {
                Detect::Yes(score) => {
                    let score = u16::from(score) * 2 + u16::from(id == hint);
                    if best.is_none_or(|(_, s)| score > s) {
                        best = Some((id, score));
                    }
                }
                Detect::NeedMore => unsure = true,
                Detect::No => {}
            }
        }
        let give_up = self.events >= MAX_DETECT_EVENTS || buf.len() >= MAX_DETECT_BYTES;
        if best.is_none() && unsure && !give_up {
            return Verdict::Pending;
        }
        if best.is_none() && midstream && !give_up {
            self.first[usize::from(!requests)].clear();
            return Verdict::Pending;
        }
        for &(id, d) in &answers {
            let counter = match (d, best) {
                (Detect::Yes(_), Some((b, _))) if b == id => &stats.detected,
                (Detect::NeedMore, None) => &stats.undecided,
                (Detect::NeedMore, Some(_)) => continue,
                _ => &stats.rejected,
            };
            counter[id as usize].fetch_add(1, Ordering::Relaxed);
        }
        match best {
            Some((id, _)) => Verdict::Protocol(id),
            None => {
                stats.ignored.fetch_add(1, Ordering::Relaxed);
                Verdict::Ignore
            }
        }
    }

    /// A gap: bytes were lost, what was collected no longer starts anything.
    pub fn gap(&mut self, requests: bool) {
        self.first[usize::from(!requests)].clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    fn decide(chunks: &[(&[u8], bool)]) -> Verdict {
        let stats = DetectStats::default();
        let mut d = Detection::default();
        let mut v = Verdict::Pending;
        for (c, req) in chunks {
            v = d.offer(c, *req, PROTO_UNKNOWN, &stats);
            if v != Verdict::Pending {
                break;
            }
        }
        v
    }

    #[test]
    fn each_protocol_is_told_from_its_first_bytes() {
        assert_eq!(
            decide(&[(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true)]),
            Verdict::Protocol(PROTO_HTTP1)
        );
        assert_eq!(
            decide(&[(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", true)]),
            Verdict::Protocol(PROTO_REDIS)
        );
        assert_eq!(
            decide(&[(b"\0\0\0\x08\x04\xd2\x16\x2f", true)]),
            Verdict::Protocol(PROTO_POSTGRES)
        );
        assert_eq!(
            decide(&[(b"Q\0\0\0\x0eSELECT 1;\0", true)]),
            Verdict::Protocol(PROTO_POSTGRES)
        );
        let greeting = b"\x56\0\0\0\x0a10.11.6-MariaDB-0+deb12u1\0\x08\0\0\0abcdefgh\0\xfe\xf7\x2d\x02\0\xff\x81\x15\0\0\0\0\0\0\x1d\0\0\0ijklmnopqrst\0mysql_native_password\0";
        // Server first: the client's first bytes are an answer.
        assert_eq!(decide(&[(greeting, false)]), Verdict::Protocol(PROTO_MYSQL));
        assert_eq!(
            decide(&[(b"\x09\0\0\0\x03SELECT 1", true)]),
            Verdict::Protocol(PROTO_MYSQL)
        );
    }

    #[test]
    fn other_traffic_is_ignored_and_counted() {
        let stats = DetectStats::default();
        let mut d = Detection::default();
        assert_eq!(
            d.offer(b"SSH-2.0-OpenSSH_9.2\r\n", true, PROTO_UNKNOWN, &stats),
            Verdict::Ignore
        );
        assert_eq!(stats.ignored.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.rejected[PROTO_REDIS as usize].load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn joined_mid_stream_the_inside_of_a_message_is_skipped() {
        let stats = DetectStats::default();
        let mut d = Detection::default();
        // The tail of a response body, then the next request on the keep-alive connection.
        assert_eq!(
            d.offer_at(
                b"xyz, the rest of a body\r\n",
                false,
                PROTO_UNKNOWN,
                true,
                &stats
            ),
            Verdict::Pending
        );
        assert_eq!(
            d.offer_at(
                b"GET /next HTTP/1.1\r\n\r\n",
                true,
                PROTO_UNKNOWN,
                true,
                &stats
            ),
            Verdict::Protocol(PROTO_HTTP1)
        );
        // From its start, the same bytes are decided at once.
        let mut d = Detection::default();
        assert_eq!(
            d.offer_at(
                b"xyz, the rest of a body\r\n",
                false,
                PROTO_UNKNOWN,
                false,
                &stats
            ),
            Verdict::Ignore
        );
    }

    #[test]
    fn a_split_first_message_waits_for_more_then_gives_up() {
        assert_eq!(
            decide(&[(b"*", true), (b"2\r\n$3\r\nGET\r\n", true)]),
            Verdict::Protocol(PROTO_REDIS)
        );
        let stats = DetectStats::default();
        let mut d = Detection::default();
        let mut v = Verdict::Pending;
        for _ in 0..MAX_DETECT_EVENTS {
            v = d.offer(b"", true, PROTO_UNKNOWN, &stats);
        }
        assert_eq!(v, Verdict::Ignore);
        assert!(stats.undecided[PROTO_REDIS as usize].load(Ordering::Relaxed) > 0);
    }
}
