//! Length-prefixed message framing over a captured stream (PostgreSQL, MySQL): bodies are kept
//! up to a cap and the rest is passed over without buffering, capture gaps inside a body only
//! cut that message, and a gap across a header makes the framer wait for a segment that starts
//! with a plausible header (clients and servers write whole messages per call).

use bytes::Bytes;

use crate::conn::Segment;

use super::db::Message;

/// How a protocol reads its headers.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Header bytes (PostgreSQL tagged: 5, MySQL: 4).
    pub header: usize,
    /// Body length from a complete header; None when the header is impossible.
    pub body_len: fn(&[u8]) -> Option<usize>,
    /// Whether a segment may start with a message (resynchronisation).
    pub plausible: fn(&[u8]) -> bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: [u8; 8],
    /// The kept part of the body (all of it unless `cut`).
    pub body: Vec<u8>,
    pub len: usize,
    /// Part of the body was not kept (over the cap) or not captured (a gap).
    pub cut: bool,
}

#[derive(Debug)]
pub struct Framer {
    layout: Layout,
    /// Body bytes kept per message.
    keep: usize,
    head: [u8; 8],
    head_have: usize,
    /// Header length of the next message when it differs (PostgreSQL's untagged startup).
    next_header: Option<usize>,
    current_header: usize,
    body: Vec<u8>,
    body_left: usize,
    in_body: bool,
    cut: bool,
    len: usize,
    pub resync: bool,
}

impl Framer {
    pub fn new(layout: Layout, keep: usize, midstream: bool) -> Self {
        Self {
            layout,
            keep,
            head: [0; 8],
            head_have: 0,
            next_header: None,
            current_header: layout.header,
            body: Vec::new(),
            body_left: 0,
            in_body: false,
            cut: false,
            len: 0,
            resync: midstream,
        }
    }

    /// The next message has a `header`-byte header read by `body_len` of the shifted header
    /// (PostgreSQL's StartupMessage has no tag byte).
    pub fn expect_untagged(&mut self, header: usize) {
        self.next_header = Some(header);
    }

    pub fn in_message(&self) -> bool {
        self.head_have > 0 || self.in_body
    }

    pub fn buffered(&self) -> usize {
        self.body.capacity()
    }

    fn reset(&mut self) {
        self.head_have = 0;
        self.in_body = false;
        self.body = Vec::new();
        self.body_left = 0;
        self.cut = false;
    }

    /// `malformed` counts stretches skipped to resynchronise.
    pub fn feed(&mut self, seg: Segment, out: &mut Vec<Frame>, malformed: &mut u64) {
        let data: Bytes = match seg {
            Segment::Gap(n) => {
                if self.in_body && !self.resync && (n as usize) <= self.body_left {
                    self.body_left -= n as usize;
                    self.cut = true;
                    if self.body_left == 0 {
                        self.finish(out);
                    }
                } else {
                    if self.in_message() {
                        *malformed += 1;
                    }
                    self.reset();
                    self.next_header = None;
                    self.resync = true;
                }
                return;
            }
            Segment::Data(b) => b,
        };
        if self.resync {
            if !(self.layout.plausible)(&data) {
                return;
            }
            self.resync = false;
            self.reset();
        }
        let mut data = &data[..];
        while !data.is_empty() {
            if !self.in_body {
                if self.head_have == 0 {
                    self.current_header = self.next_header.take().unwrap_or(self.layout.header);
                }
                let need = self.current_header - self.head_have;
                let n = need.min(data.len());
                self.head[self.head_have..self.head_have + n].copy_from_slice(&data[..n]);
                self.head_have += n;
                data = &data[n..];
                if self.head_have < self.current_header {
                    return;
                }
                let header = &self.head[..self.current_header];
                let len = if self.current_header == self.layout.header {
                    (self.layout.body_len)(header)
                } else {
                    // Untagged: the same length field without the tag in front.
                    let mut shifted = [0u8; 8];
                    shifted[1..1 + self.current_header].copy_from_slice(header);
                    (self.layout.body_len)(&shifted[..self.layout.header])
                };
                let Some(len) = len else {
                    *malformed += 1;
                    self.reset();
                    self.resync = true;
                    return;
                };
                self.in_body = true;
                self.len = len;
                self.body_left = len;
                self.body = Vec::with_capacity(len.min(self.keep));
                if len == 0 {
                    self.finish(out);
                }
                continue;
            }
            let n = self.body_left.min(data.len());
            let room = self.keep.saturating_sub(self.body.len());
            if room < n {
                self.cut = true;
            }
            self.body.extend_from_slice(&data[..n.min(room)]);
            self.body_left -= n;
            data = &data[n..];
            if self.body_left == 0 {
                self.finish(out);
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<Frame>) {
        let mut header = [0u8; 8];
        if self.current_header != self.layout.header {
            // Untagged: report it with a zero tag so callers can tell.
            header[1..1 + self.current_header].copy_from_slice(&self.head[..self.current_header]);
        } else {
            header[..self.current_header].copy_from_slice(&self.head[..self.current_header]);
        }
        out.push(Frame {
            header,
            body: std::mem::take(&mut self.body),
            len: self.len,
            cut: self.cut,
        });
        self.head_have = 0;
        self.in_body = false;
        self.cut = false;
    }
}

/// Both directions of a length-prefixed connection, and the scratch space their frames pass
/// through.
#[derive(Debug)]
pub struct Duplex {
    pub requests: Framer,
    pub responses: Framer,
    scratch: Vec<Frame>,
}

impl Duplex {
    pub fn new(requests: Framer, responses: Framer) -> Self {
        Self {
            requests,
            responses,
            scratch: Vec::new(),
        }
    }

    /// The frames `seg` completes in one direction; stretches skipped to resynchronise become
    /// `Message::Malformed`. Hand the vector back with `recycle`.
    pub fn frames(&mut self, requests: bool, seg: Segment, out: &mut Vec<Message>) -> Vec<Frame> {
        let mut frames = std::mem::take(&mut self.scratch);
        let mut malformed = 0;
        let framer = if requests {
            &mut self.requests
        } else {
            &mut self.responses
        };
        framer.feed(seg, &mut frames, &mut malformed);
        out.extend((0..malformed).map(|_| Message::Malformed));
        frames
    }

    pub fn recycle(&mut self, mut frames: Vec<Frame>) {
        frames.clear();
        self.scratch = frames;
    }

    /// A request's bytes are buffered but not complete.
    pub fn mid_request(&self) -> bool {
        self.requests.in_message()
    }

    pub fn buffered(&self) -> usize {
        self.requests.buffered() + self.responses.buffered()
    }
}

/// The text up to the first NUL (or the end), and what follows it.
pub fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}
