//! Redis (RESP2 and RESP3): commands and their replies, paired in order (pipelines included).
//!
//! The reader walks RESP values as a stream: it buffers only header lines and the first bytes of
//! a command's leading bulk strings, and skips every other bulk body without holding it, so a
//! multi-megabyte value costs nothing and is never stored. Crates such as redis-protocol decode
//! whole frames from a buffer, which would mean holding the values this agent must never keep;
//! framing, resync and detection stay here (as the project's rule for wire formats says).
//!
//! Replies that answer nothing are `Unsolicited`: RESP3 pushes (`>`, client-side caching
//! invalidations) and, on a subscribed connection, `message`/`pmessage`/`smessage` arrays.

use std::{collections::VecDeque, sync::Arc};

use bytes::{Buf, BytesMut};

use crate::conn::Segment;

use super::{
    Detect,
    db::{DbRequest, DbResponse, Message},
};

#[cfg(test)]
mod tests;

/// Longest header line (`*3`, `$5`, `-ERR ...`) buffered; beyond, the stream is not RESP.
const MAX_LINE: usize = 64 * 1024;
/// Nesting depth followed; deeper values are treated as malformed.
const MAX_DEPTH: usize = 32;
/// Bytes kept of a leading bulk string (command names, keys): longer ones are cut.
const KEEP_BULK: usize = 128;
/// Commands remembered per connection for their expected reply counts.
const MAX_EXPECTED: usize = 4096;

/// One complete top-level RESP value, as much of it as a span needs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Value {
    /// The type byte: `*`, `+`, `-`, `>` ...
    pub kind: u8,
    /// Error replies: the first word (`ERR`, `WRONGTYPE`, `MOVED`).
    pub error_prefix: Option<String>,
    /// Top-level aggregates: the element count.
    pub len: i64,
    /// The first two elements, when they are bulk/simple strings (cut to `KEEP_BULK`).
    pub leading: Vec<Vec<u8>>,
    /// An inline command (`PING\r\n`): its words' first two.
    pub inline: bool,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    remaining: i64,
    /// An attribute map (`|`): when it ends, the value it annotates still follows.
    attribute: bool,
}

/// A streaming RESP value reader for one direction.
#[derive(Debug)]
pub struct Reader {
    requests: bool,
    line: BytesMut,
    /// Bulk body bytes (plus CRLF) still to pass.
    bulk_left: u64,
    /// The bulk being passed is kept (a leading element).
    keep: Option<Vec<u8>>,
    stack: Vec<Frame>,
    current: Value,
    started: bool,
    /// Waiting for a value start after a gap or a bad byte (or joined mid-stream).
    resync: bool,
}

impl Reader {
    pub fn new(requests: bool, midstream: bool) -> Self {
        Self {
            requests,
            line: BytesMut::new(),
            bulk_left: 0,
            keep: None,
            stack: Vec::new(),
            current: Value::default(),
            started: false,
            resync: midstream,
        }
    }

    pub fn in_value(&self) -> bool {
        self.started || !self.line.is_empty()
    }

    pub fn buffered(&self) -> usize {
        self.line.len() + self.keep.as_ref().map_or(0, Vec::len)
    }

    fn reset(&mut self) {
        self.line.clear();
        self.bulk_left = 0;
        self.keep = None;
        self.stack.clear();
        self.current = Value::default();
        self.started = false;
    }

    /// Feeds one segment; complete values go to `out`, `malformed` counts skipped stretches.
    pub fn feed(&mut self, seg: Segment, out: &mut Vec<Value>, malformed: &mut u64) {
        let mut data = match seg {
            Segment::Data(b) => b,
            Segment::Gap(_) => {
                if self.in_value() {
                    *malformed += 1;
                }
                self.reset();
                self.resync = true;
                return;
            }
        };
        if self.resync {
            // A value starts at a segment start (clients and servers write whole replies or
            // commands per call): take this segment only if it looks like one.
            if self.in_value() || !looks_like_value_start(&data, self.requests) {
                return;
            }
            self.resync = false;
        }
        while !data.is_empty() {
            if self.bulk_left > 0 {
                let n = (self.bulk_left as usize).min(data.len());
                if let Some(k) = &mut self.keep {
                    let room = KEEP_BULK.saturating_sub(k.len());
                    // The trailing CRLF is not part of the value.
                    let body = n.min((self.bulk_left as usize).saturating_sub(2));
                    k.extend_from_slice(&data[..body.min(room)]);
                }
                data.advance(n);
                self.bulk_left -= n as u64;
                if self.bulk_left == 0 {
                    let kept = self.keep.take();
                    if let Some(k) = kept {
                        self.current.leading.push(k);
                    }
                    self.element_done(out);
                }
                continue;
            }
            // A header line.
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                if self.line.len() + data.len() > MAX_LINE {
                    *malformed += 1;
                    self.reset();
                    self.resync = true;
                    return;
                }
                self.line.extend_from_slice(&data);
                return;
            };
            let line = if self.line.is_empty() {
                data.split_to(nl + 1)
            } else {
                self.line.extend_from_slice(&data.split_to(nl + 1));
                std::mem::take(&mut self.line).freeze()
            };
            let line = line
                .strip_suffix(b"\r\n")
                .unwrap_or(&line[..line.len() - 1]);
            if self.on_line(line, out).is_err() {
                *malformed += 1;
                self.reset();
                self.resync = true;
                return;
            }
        }
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<Value>) -> Result<(), ()> {
        let Some((&kind, rest)) = line.split_first() else {
            // An empty line between inline commands.
            return if self.started { Err(()) } else { Ok(()) };
        };
        let top = !self.started;
        if top {
            self.started = true;
            self.current = Value {
                kind,
                ..Value::default()
            };
        }
        let depth1 = self.stack.len() == 1 && !self.stack[0].attribute;
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                if kind == b'-' && top {
                    let word = rest.split(|&b| b == b' ').next().unwrap_or(rest);
                    self.current.error_prefix =
                        Some(String::from_utf8_lossy(&word[..word.len().min(32)]).into_owned());
                }
                if kind == b'+' && depth1 && self.current.leading.len() < 2 {
                    self.current
                        .leading
                        .push(rest[..rest.len().min(KEEP_BULK)].to_vec());
                }
                self.element_done(out);
            }
            b'$' | b'=' | b'!' => {
                let n = number(rest)?;
                if n < 0 {
                    self.element_done(out);
                } else {
                    if kind == b'!' && top {
                        self.current.error_prefix = Some("ERR".into());
                    }
                    self.keep = (depth1 && self.current.leading.len() < 2).then(Vec::new);
                    self.bulk_left = n as u64 + 2;
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = number(rest)?;
                let n = if matches!(kind, b'%' | b'|') {
                    n.checked_mul(2).ok_or(())?
                } else {
                    n
                };
                if top {
                    self.current.len = n;
                }
                if n <= 0 {
                    if kind == b'|' {
                        return Ok(());
                    }
                    self.element_done(out);
                } else {
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(());
                    }
                    if top && kind == b'|' {
                        // An attribute before the real reply: the reply's type is what follows.
                        self.started = false;
                    }
                    self.stack.push(Frame {
                        remaining: n,
                        attribute: kind == b'|',
                    });
                }
            }
            _ if top && self.requests && kind.is_ascii_alphabetic() => {
                // Inline command: words separated by spaces (redis-cli without a server, telnet).
                self.current.inline = true;
                self.current.len = line.split(|&b| b == b' ').count() as i64;
                for w in line.split(|&b| b == b' ').filter(|w| !w.is_empty()).take(2) {
                    self.current
                        .leading
                        .push(w[..w.len().min(KEEP_BULK)].to_vec());
                }
                self.element_done(out);
            }
            _ => return Err(()),
        }
        Ok(())
    }

    fn element_done(&mut self, out: &mut Vec<Value>) {
        loop {
            let Some(f) = self.stack.last_mut() else {
                // A top-level value is complete.
                out.push(std::mem::take(&mut self.current));
                self.started = false;
                return;
            };
            f.remaining -= 1;
            if f.remaining > 0 {
                return;
            }
            let attribute = f.attribute;
            self.stack.pop();
            if attribute {
                // The annotated value is still to come; it is the element, not the attribute.
                if self.stack.is_empty() {
                    self.started = false;
                }
                return;
            }
        }
    }
}

fn number(s: &[u8]) -> Result<i64, ()> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(())
}

/// Whether `data` can start a RESP value of this direction.
fn looks_like_value_start(data: &[u8], requests: bool) -> bool {
    match data.first() {
        Some(b'*') => data
            .get(1)
            .is_some_and(|b| b.is_ascii_digit() || *b == b'-'),
        Some(b'+' | b'-' | b':' | b'$' | b'_' | b',' | b'#' | b'%' | b'~' | b'>' | b'|' | b'=') => {
            !requests
        }
        _ => false,
    }
}

/// Authoritative detection from the first bytes of one direction.
pub fn detect(data: &[u8], requests: bool) -> Detect {
    if data.len() < 3 {
        return Detect::NeedMore;
    }
    // A first line of at least one type byte: an empty one is not RESP.
    let line_end = match data.windows(2).position(|w| w == b"\r\n") {
        Some(0) => return Detect::No,
        other => other,
    };
    if requests {
        // `*<n>\r\n$<len>\r\n<command>`: every client library sends arrays of bulk strings.
        if data[0] != b'*' {
            return Detect::No;
        }
        let Some(end) = line_end else {
            return if data.len() < 16 && data[1..].iter().all(u8::is_ascii_digit) {
                Detect::NeedMore
            } else {
                Detect::No
            };
        };
        match number(&data[1..end]) {
            Ok(n) if (1..=1_000_000).contains(&n) => {}
            _ => return Detect::No,
        }
        return match data.get(end + 2) {
            Some(b'$') => Detect::Yes(90),
            Some(_) => Detect::No,
            None => Detect::NeedMore,
        };
    }
    // A reply (a connection joined mid-stream, or the server side sees requests first anyway).
    let Some(end) = line_end else {
        return if data.len() < 64 {
            Detect::NeedMore
        } else {
            Detect::No
        };
    };
    let rest = &data[1..end];
    let printable = rest.iter().all(|b| (0x20..0x7f).contains(b));
    match data[0] {
        b'+' | b'-' if printable => Detect::Yes(40),
        b':' | b'$' | b'*' | b'%' | b'~' | b'>' if number(rest).is_ok() => Detect::Yes(40),
        _ => Detect::No,
    }
}

/// What the reply side must know of each request: how many replies answer it.
#[derive(Debug, Clone, Copy)]
struct Expect {
    replies: u32,
}

/// One Redis connection.
#[derive(Debug)]
pub struct Parser {
    requests: Reader,
    responses: Reader,
    expected: VecDeque<Expect>,
    /// SUBSCRIBE/PSUBSCRIBE/SSUBSCRIBE seen: `message` arrays are pushes, not replies.
    subscribed: bool,
    /// Whether `db.query.text` may name the key.
    keys: bool,
    /// `SELECT n`.
    namespace: Option<Arc<str>>,
    values: Vec<Value>,
    malformed: u64,
}

impl Parser {
    pub fn new(midstream: bool, keys: bool) -> Self {
        Self {
            requests: Reader::new(true, midstream),
            responses: Reader::new(false, midstream),
            expected: VecDeque::new(),
            subscribed: false,
            keys,
            namespace: None,
            values: Vec::new(),
            malformed: 0,
        }
    }

    pub fn mid_request(&self) -> bool {
        self.requests.in_value()
    }

    pub fn buffered(&self) -> usize {
        self.requests.buffered() + self.responses.buffered()
    }

    fn flush_malformed(&mut self, out: &mut Vec<Message>) {
        for _ in 0..std::mem::take(&mut self.malformed) {
            out.push(Message::Malformed);
        }
    }

    pub fn requests(&mut self, seg: Segment, out: &mut Vec<Message>) {
        let mut values = std::mem::take(&mut self.values);
        self.requests.feed(seg, &mut values, &mut self.malformed);
        self.flush_malformed(out);
        for v in values.drain(..) {
            let Some(cmd) = v.leading.first() else {
                out.push(Message::Malformed);
                continue;
            };
            let command = String::from_utf8_lossy(cmd).to_ascii_uppercase();
            let replies = match command.as_str() {
                "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" => {
                    self.subscribed = true;
                    (v.len - 1).max(1) as u32
                }
                "UNSUBSCRIBE" | "PUNSUBSCRIBE" | "SUNSUBSCRIBE" => (v.len - 1).max(1) as u32,
                _ => 1,
            };
            if command == "SELECT"
                && let Some(db) = v.leading.get(1)
                && db.iter().all(u8::is_ascii_digit)
            {
                self.namespace = Some(Arc::from(String::from_utf8_lossy(db).as_ref()));
            }
            if self.expected.len() >= MAX_EXPECTED {
                self.expected.pop_front();
            }
            self.expected.push_back(Expect { replies });
            let text = if self.keys {
                let mut t = command.clone();
                let keyed = first_arg_is_key(&command);
                if let Some(key) = v.leading.get(1).filter(|_| first_arg_is_key(&command)) {
                    t.push(' ');
                    t.push_str(&String::from_utf8_lossy(key));
                }
                if keyed {
                    for _ in 2..v.len.max(0) {
                        t.push_str(" ?");
                    }
                }
                Some(Arc::from(t))
            } else {
                None
            };
            out.push(Message::Request(DbRequest {
                operation: Some(Arc::from(command)),
                text,
                namespace: self.namespace.clone(),
                ..DbRequest::default()
            }));
        }
        self.values = values;
    }

    pub fn responses(&mut self, seg: Segment, out: &mut Vec<Message>) {
        let mut values = std::mem::take(&mut self.values);
        self.responses.feed(seg, &mut values, &mut self.malformed);
        self.flush_malformed(out);
        for v in values.drain(..) {
            if v.kind == b'>' || (self.subscribed && v.kind == b'*' && is_pubsub_message(&v)) {
                out.push(Message::Unsolicited);
                continue;
            }
            let Some(front) = self.expected.front_mut() else {
                // Joined mid-stream, or the request was lost: the session counts an orphan.
                out.push(Message::Response(DbResponse::default()));
                continue;
            };
            front.replies = front.replies.saturating_sub(1);
            if front.replies > 0 {
                continue;
            }
            self.expected.pop_front();
            out.push(Message::Response(DbResponse {
                error_code: v.error_prefix.map(Arc::from),
                not_executed: false,
            }));
        }
        self.values = values;
    }
}

/// Commands whose first argument is not a key but a secret, a script or a setting: with
/// `redis_keys` on, their arguments stay out of `db.query.text` all the same.
fn first_arg_is_key(command: &str) -> bool {
    !matches!(
        command,
        "AUTH"
            | "HELLO"
            | "ACL"
            | "CONFIG"
            | "CLIENT"
            | "EVAL"
            | "EVAL_RO"
            | "EVALSHA"
            | "EVALSHA_RO"
            | "FCALL"
            | "FCALL_RO"
            | "SCRIPT"
            | "FUNCTION"
            | "MIGRATE"
            | "MODULE"
            | "DEBUG"
            | "SELECT"
            | "PUBLISH"
            | "SPUBLISH"
    )
}

fn is_pubsub_message(v: &Value) -> bool {
    v.leading.first().is_some_and(|first| {
        first.eq_ignore_ascii_case(b"message")
            || first.eq_ignore_ascii_case(b"pmessage")
            || first.eq_ignore_ascii_case(b"smessage")
    })
}
