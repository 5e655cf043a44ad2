//! Pairs HTTP/1 requests with responses on one connection, first-in first-out (HTTP/1 has no
//! ids; pipelined responses come back in request order). Pure: timestamps come in with the
//! segments.

use std::collections::VecDeque;

use crate::{
    conn::Segment,
    protocol::http1::{Head, Item, MessageReader},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response was seen.
    Complete,
    /// No response within the timeout.
    Timeout,
    /// The connection closed before the response (or its end) came.
    Closed,
    /// Framing was lost mid-response (capture gap over a chunk line): the end is a guess.
    Incomplete,
}

/// Who a span is, decided when its request starts (a callee's SERVER span completes before its
/// caller's CLIENT span, so identities cannot wait for completion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// The parent came from another process (carried context or a peer's CLIENT span).
    pub parent_is_remote: bool,
    pub trace_state: String,
    /// The span id the request carried in its headers, if any.
    pub carried: Option<[u8; 8]>,
    /// The parent is a span of this node (a local caller, the request its thread handles):
    /// otherwise this span is a local root of its trace, where sampling decides.
    pub local_parent: bool,
    /// A SERVER span waiting for a local caller whose event may come late
    /// (`trace::orphans`): what it leaves when it finishes is kept for that caller.
    pub awaits_caller: bool,
    /// The `sampled` flag the request carried with its context, if any.
    pub carried_sampled: Option<bool>,
}

impl Identity {
    /// For exchanges that feed metrics but never become spans (a database's own side).
    pub fn unexported() -> Self {
        Self {
            trace_id: [0; 16],
            span_id: [0; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            carried: None,
            local_parent: false,
            awaits_caller: false,
            carried_sampled: None,
        }
    }
}

/// Where a request started: what identity assignment needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestStart {
    /// Thread that read (server side) or wrote (client side) the request's first bytes.
    pub tid: u32,
    pub ts_ns: u64,
    /// 0 for the first request on the connection.
    pub ordinal: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub identity: Identity,
    pub started: RequestStart,
    pub request: Head,
    pub response: Option<Head>,
    /// Monotonic ns of the first request byte seen and of the last response byte seen (or when
    /// the exchange was given up).
    pub start_ns: u64,
    pub end_ns: u64,
    pub outcome: Outcome,
}

/// A request waiting for (the end of) its response. Its response head, once read, waits in
/// `Session::answered` instead: most of a request's wait is before it, and a slot for it here
/// made every request ~200 bytes larger to write and move.
#[derive(Debug)]
struct Pending {
    identity: Identity,
    started: RequestStart,
    request: Head,
    start_ns: u64,
}

/// Requests one connection may have waiting for responses (HTTP/1 pipelining depth): beyond,
/// the oldest is dropped and counted, so a peer that never answers cannot grow memory.
pub const MAX_WAITING: usize = 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// Requests dropped because `MAX_WAITING` were already waiting.
    pub overflow: u64,
    pub malformed: u64,
    /// Responses with no request to answer (e.g. a connection joined mid-exchange).
    pub orphan_responses: u64,
}

/// One HTTP/1 connection seen from one process.
#[derive(Debug)]
pub struct Session {
    requests: MessageReader,
    responses: MessageReader,
    pending: VecDeque<Pending>,
    /// Response heads read whose response has not ended, in order: the n-th answers the n-th
    /// request in `pending` (responses come in request order), so never more than `pending`.
    answered: VecDeque<Head>,
    /// Start of the request message currently being read.
    request_start_ns: u64,
    /// The response being read is an interim one (1xx): its end completes nothing.
    interim: bool,
    /// Requests seen on this connection so far.
    requests_seen: u64,
    /// The readers' output, kept between calls: a fresh Vec per event was an allocation each.
    items: Vec<Item>,
    pub stats: SessionStats,
}

impl Session {
    /// `midstream`: joined after the connection started; both readers wait for a message start.
    pub fn new(midstream: bool) -> Self {
        let (requests, responses) = if midstream {
            (
                MessageReader::resyncing(true),
                MessageReader::resyncing(false),
            )
        } else {
            (MessageReader::requests(), MessageReader::responses())
        };
        Self {
            requests,
            responses,
            pending: VecDeque::new(),
            answered: VecDeque::new(),
            request_start_ns: 0,
            interim: false,
            requests_seen: 0,
            items: Vec::new(),
            stats: SessionStats::default(),
        }
    }

    /// Bytes of the request direction, moved at `ts_ns` by thread `tid`. `assign` gives each new
    /// request its identity as soon as its head is parsed.
    pub fn on_requests(
        &mut self,
        ts_ns: u64,
        tid: u32,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
        segments: impl IntoIterator<Item = Segment>,
    ) {
        let mut items = std::mem::take(&mut self.items);
        for seg in segments {
            if !self.requests.in_message() {
                self.request_start_ns = ts_ns;
            }
            self.requests.feed(seg, &mut |_: &Head| None, &mut items);
            for item in items.drain(..) {
                match item {
                    Item::Head { head, .. } => {
                        let started = RequestStart {
                            tid,
                            ts_ns: self.request_start_ns,
                            ordinal: self.requests_seen,
                        };
                        self.requests_seen += 1;
                        let identity = assign(&head, started);
                        if self.pending.len() >= MAX_WAITING {
                            self.pending.pop_front();
                            // Its response head, if read, goes with it: read heads answer
                            // the oldest requests.
                            self.answered.pop_front();
                            self.stats.overflow += 1;
                        }
                        self.pending.push_back(Pending {
                            identity,
                            started,
                            request: head,
                            start_ns: self.request_start_ns,
                        })
                    }
                    // A pipelined request that follows in the same read starts now.
                    Item::End { .. } => self.request_start_ns = ts_ns,
                    Item::Malformed { .. } => self.stats.malformed += 1,
                }
            }
        }
        self.items = items;
    }

    /// Bytes of the response direction, moved at `ts_ns`. Returns the exchanges they completed.
    pub fn on_responses(
        &mut self,
        ts_ns: u64,
        segments: impl IntoIterator<Item = Segment>,
    ) -> Vec<Exchange> {
        let mut done = Vec::new();
        self.on_responses_into(ts_ns, segments, &mut done);
        done
    }

    /// `on_responses` into `done` (a buffer the caller reuses).
    pub fn on_responses_into(
        &mut self,
        ts_ns: u64,
        segments: impl IntoIterator<Item = Segment>,
        done: &mut Vec<Exchange>,
    ) {
        let mut items = std::mem::take(&mut self.items);
        for seg in segments {
            // One segment can hold several pipelined responses: the n-th final response head in
            // it answers the n-th request still waiting.
            let pending = &self.pending;
            let mut index = self.answered.len();
            let mut method = |head: &Head| {
                let this = index;
                if !head.status().is_some_and(|s| (100..200).contains(&s)) {
                    index += 1;
                }
                pending.get(this).and_then(|p| p.request.method_name())
            };
            self.responses.feed(seg, &mut method, &mut items);
            for item in items.drain(..) {
                self.on_response_item(item, ts_ns, done);
            }
        }
        self.items = items;
    }

    fn on_response_item(&mut self, item: Item, ts_ns: u64, done: &mut Vec<Exchange>) {
        match item {
            Item::Head { head, .. } => {
                if head.status().is_some_and(|s| (100..200).contains(&s)) {
                    self.interim = true;
                    return;
                }
                if self.answered.len() < self.pending.len() {
                    self.answered.push_back(head);
                } else {
                    self.stats.orphan_responses += 1;
                }
            }
            Item::End { complete } => {
                if std::mem::take(&mut self.interim) {
                    return;
                }
                if let Some(response) = self.answered.pop_front()
                    && let Some(p) = self.pending.pop_front()
                {
                    done.push(Exchange {
                        identity: p.identity,
                        started: p.started,
                        request: p.request,
                        response: Some(response),
                        start_ns: p.start_ns,
                        end_ns: ts_ns,
                        outcome: if complete {
                            Outcome::Complete
                        } else {
                            Outcome::Incomplete
                        },
                    });
                }
            }
            Item::Malformed { .. } => self.stats.malformed += 1,
        }
    }

    /// Gives up on requests waiting longer than `timeout_ns` for their response.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> Vec<Exchange> {
        let mut out = Vec::new();
        while self.answered.is_empty()
            && self
                .pending
                .front()
                .is_some_and(|p| now_ns.saturating_sub(p.start_ns) > timeout_ns)
        {
            let p = self.pending.pop_front().expect("checked");
            out.push(Exchange {
                identity: p.identity,
                started: p.started,
                request: p.request,
                response: None,
                start_ns: p.start_ns,
                end_ns: now_ns,
                outcome: Outcome::Timeout,
            });
        }
        out
    }

    /// The connection closed at `ts_ns`: a response delimited by the close completes, every
    /// other waiting request ends as closed.
    pub fn close(&mut self, ts_ns: u64) -> Vec<Exchange> {
        let mut done = Vec::new();
        let mut items = Vec::new();
        self.responses.close(&mut items);
        for item in items {
            self.on_response_item(item, ts_ns, &mut done);
        }
        let mut answered = std::mem::take(&mut self.answered).into_iter();
        for p in self.pending.drain(..) {
            done.push(Exchange {
                identity: p.identity,
                started: p.started,
                request: p.request,
                response: answered.next(),
                start_ns: p.start_ns,
                end_ns: ts_ns,
                outcome: Outcome::Closed,
            });
        }
        done
    }

    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn assign_fn(_: &Head, _: RequestStart) -> Identity {
        Identity {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            carried: None,
            local_parent: false,
            awaits_caller: false,
            carried_sampled: None,
        }
    }

    fn d(s: &str) -> Vec<Segment> {
        vec![Segment::Data(Bytes::copy_from_slice(s.as_bytes()))]
    }

    fn statuses(ex: &[Exchange]) -> Vec<(String, Option<u16>, Outcome, u64, u64)> {
        ex.iter()
            .map(|e| {
                let target = e.request.target().to_string();
                (
                    target,
                    e.response.as_ref().and_then(|r| r.status()),
                    e.outcome,
                    e.start_ns,
                    e.end_ns,
                )
            })
            .collect()
    }

    #[test]
    fn keep_alive_requests_pair_in_order_with_their_times() {
        let mut s = Session::new(false);
        s.on_requests(10, 1, &mut assign_fn, d("GET /a HTTP/1.1\r\n\r\n"));
        let ex = s.on_responses(20, d("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        s.on_requests(30, 1, &mut assign_fn, d("GET /b HTTP/1.1\r\n\r\n"));
        let ex2 = s.on_responses(45, d("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"));
        assert_eq!(
            statuses(&ex),
            [("/a".into(), Some(200), Outcome::Complete, 10, 20)]
        );
        assert_eq!(
            statuses(&ex2),
            [("/b".into(), Some(404), Outcome::Complete, 30, 45)]
        );
    }

    #[test]
    fn pipelined_requests_get_their_own_responses() {
        let mut s = Session::new(false);
        s.on_requests(
            10,
            1,
            &mut assign_fn,
            d("GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n"),
        );
        let ex = s.on_responses(
            20,
            d("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx\
               HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
               HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
        );
        let got: Vec<_> = statuses(&ex)
            .into_iter()
            .map(|(t, s, o, _, _)| (t, s, o))
            .collect();
        assert_eq!(
            got,
            [
                ("/1".into(), Some(200), Outcome::Complete),
                ("/2".into(), Some(200), Outcome::Complete),
                ("/3".into(), Some(201), Outcome::Complete)
            ]
        );
    }

    #[test]
    fn a_response_spanning_reads_ends_at_its_last_byte() {
        let mut s = Session::new(false);
        s.on_requests(
            5,
            1,
            &mut assign_fn,
            d("POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
        );
        assert!(
            s.on_responses(7, d("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc"))
                .is_empty()
        );
        let ex = s.on_responses(9, d("def"));
        assert_eq!(
            statuses(&ex),
            [("/x".into(), Some(200), Outcome::Complete, 5, 9)]
        );
    }

    #[test]
    fn continue_then_final_response_is_one_exchange() {
        let mut s = Session::new(false);
        s.on_requests(
            1,
            1,
            &mut assign_fn,
            d("POST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"),
        );
        assert!(
            s.on_responses(2, d("HTTP/1.1 100 Continue\r\n\r\n"))
                .is_empty()
        );
        s.on_requests(3, 1, &mut assign_fn, d("ok"));
        let ex = s.on_responses(4, d("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert_eq!(
            statuses(&ex),
            [("/up".into(), Some(200), Outcome::Complete, 1, 4)]
        );
    }

    #[test]
    fn a_response_that_never_comes_times_out() {
        let mut s = Session::new(false);
        s.on_requests(1_000, 1, &mut assign_fn, d("GET /slow HTTP/1.1\r\n\r\n"));
        assert!(s.expire(1_500, 1_000).is_empty());
        let ex = s.expire(3_000, 1_000);
        assert_eq!(
            statuses(&ex),
            [("/slow".into(), None, Outcome::Timeout, 1_000, 3_000)]
        );
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_close_mid_response_ends_the_exchange_as_closed() {
        let mut s = Session::new(false);
        s.on_requests(1, 1, &mut assign_fn, d("GET /x HTTP/1.1\r\n\r\n"));
        s.on_responses(2, d("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"));
        let ex = s.close(3);
        assert_eq!(
            statuses(&ex),
            [("/x".into(), Some(200), Outcome::Incomplete, 1, 3)]
        );
    }

    #[test]
    fn a_response_until_close_completes_on_close() {
        let mut s = Session::new(false);
        s.on_requests(1, 1, &mut assign_fn, d("GET /x HTTP/1.0\r\n\r\n"));
        s.on_responses(2, d("HTTP/1.0 200 OK\r\n\r\nbody"));
        let ex = s.close(3);
        assert_eq!(
            statuses(&ex),
            [("/x".into(), Some(200), Outcome::Complete, 1, 3)]
        );
    }

    #[test]
    fn malformed_and_orphan_traffic_is_counted() {
        let mut s = Session::new(false);
        assert!(
            s.on_responses(1, d("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
                .is_empty()
        );
        s.on_requests(2, 1, &mut assign_fn, d("\x00\x01\x02garbage\r\n\r\n"));
        assert_eq!(
            s.stats,
            SessionStats {
                malformed: 1,
                orphan_responses: 1,
                overflow: 0,
            }
        );
    }

    #[test]
    fn a_peer_that_never_answers_cannot_queue_without_bound() {
        let mut s = Session::new(false);
        let many = "GET /x HTTP/1.1\r\n\r\n".repeat(MAX_WAITING + 10);
        s.on_requests(1, 1, &mut assign_fn, d(&many));
        assert_eq!(s.waiting(), MAX_WAITING);
        assert_eq!(s.stats.overflow, 10);
    }

    #[test]
    fn an_overflowed_request_takes_its_read_response_head_with_it() {
        let mut s = Session::new(false);
        s.on_requests(1, 1, &mut assign_fn, d("GET /first HTTP/1.1\r\n\r\n"));
        // Its response head is read; the body is still to come.
        s.on_responses(2, d("HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nab"));
        let many = "GET /next HTTP/1.1\r\n\r\n".repeat(MAX_WAITING);
        s.on_requests(3, 1, &mut assign_fn, d(&many));
        assert_eq!(s.stats.overflow, 1, "/first was dropped");
        // The end of /first's response completes nothing it could be paired with wrongly.
        assert!(s.on_responses(4, d("cd")).is_empty());
        let ex = s.on_responses(5, d("HTTP/1.1 204 No Content\r\n\r\n"));
        assert_eq!(
            statuses(&ex),
            [("/next".into(), Some(204), Outcome::Complete, 3, 5)]
        );
        assert_eq!(s.waiting(), MAX_WAITING - 1);
    }
}
