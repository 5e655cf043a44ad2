//! PostgreSQL (frontend/backend protocol 3.x): a span per simple Query and per extended-protocol
//! Execute, pipelined or not.
//!
//! Statement texts come from Parse and are remembered per connection (statement -> text, portal
//! -> statement), sanitized as they arrive, so later Bind/Execute spans carry them. Bind's
//! parameter values are never read. Answers pair in order: CommandComplete / EmptyQuery /
//! PortalSuspended / ErrorResponse answer an Execute; ReadyForQuery answers a simple Query and
//! closes a Sync, and Executes the server skipped after an error in that pipeline answer
//! `not_executed` (no span: they never ran). Backend messages are read by hand: only the tag,
//! the error's SQLSTATE and nothing of the rows is needed, and a row-data crate would make us
//! buffer rows we must skip.

use foldhash::{HashMap, HashMapExt};
use std::{collections::VecDeque, sync::Arc};

use crate::conn::Segment;

use super::{
    Detect,
    db::{DbRequest, DbResponse, Message, push_bounded},
    framing::{Duplex, Frame, Framer, Layout, cstr},
    sql::{self, Flavor},
};

#[cfg(test)]
mod tests;

/// Longest message kept whole from the client (statement texts): longer ones are cut (and the
/// text marked truncated).
const KEEP_REQUEST: usize = 64 * 1024;
/// Server messages: enough for an ErrorResponse's fields; rows are passed over.
const KEEP_RESPONSE: usize = 1024;
/// Statements and portals remembered per connection (drivers close or reuse them).
const MAX_STATEMENTS: usize = 1024;
const MAX_EXPECTED: usize = 4096;
/// Messages no longer than this are plausible (1 GiB is the server's own limit).
const MAX_LEN: usize = 1 << 30;

const FRONTEND_TAGS: &[u8] = b"QPBEDSCHXFdcf";
const BACKEND_TAGS: &[u8] = b"RSKZTDCEN123ntsIAGHWdcV";

fn body_len(h: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    (4..=MAX_LEN).contains(&len).then(|| len - 4)
}

fn plausible_frontend(d: &[u8]) -> bool {
    d.len() >= 5 && FRONTEND_TAGS.contains(&d[0]) && body_len(&d[..5]).is_some()
}

fn plausible_backend(d: &[u8]) -> bool {
    d.len() >= 5 && BACKEND_TAGS.contains(&d[0]) && body_len(&d[..5]).is_some()
}

const FRONTEND: Layout = Layout {
    header: 5,
    body_len,
    plausible: plausible_frontend,
};
const BACKEND: Layout = Layout {
    header: 5,
    body_len,
    plausible: plausible_backend,
};

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A simple Query: answered at ReadyForQuery.
    Query,
    Execute,
    Sync,
}

/// A remembered prepared statement.
type Stmt = Arc<sql::Statement>;

#[derive(Debug)]
pub struct Parser {
    wire: Duplex,
    expected: VecDeque<Expect>,
    statements: HashMap<Vec<u8>, Stmt>,
    portals: HashMap<Vec<u8>, Vec<u8>>,
    /// The error a simple Query met (answered at ReadyForQuery).
    query_error: Option<Arc<str>>,
    namespace: Option<Arc<str>>,
    /// SSLRequest/GSSENCRequest sent: the next server byte is a bare 'S' or 'N'.
    awaiting_encryption_answer: bool,
    /// The server agreed to TLS: what follows is ciphertext.
    encrypted: bool,
}

impl Parser {
    pub fn new(midstream: bool) -> Self {
        let mut requests = Framer::new(FRONTEND, KEEP_REQUEST, midstream);
        if !midstream {
            // A connection seen from its start opens with an untagged StartupMessage or
            // SSLRequest.
            requests.expect_untagged(4);
        }
        Self {
            wire: Duplex::new(requests, Framer::new(BACKEND, KEEP_RESPONSE, midstream)),
            expected: VecDeque::new(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            query_error: None,
            namespace: None,
            awaiting_encryption_answer: false,
            encrypted: false,
        }
    }

    pub fn mid_request(&self) -> bool {
        self.wire.mid_request()
    }

    pub fn buffered(&self) -> usize {
        self.wire.buffered()
    }

    fn expect(&mut self, e: Expect) {
        push_bounded(&mut self.expected, e, MAX_EXPECTED);
    }

    pub fn requests(&mut self, seg: Segment, cache: &mut sql::Cache, out: &mut Vec<Message>) {
        if self.encrypted {
            return;
        }
        let mut frames = self.wire.frames(true, seg, out);
        for f in frames.drain(..) {
            self.on_request(&f, cache, out);
        }
        self.wire.recycle(frames);
    }

    fn on_request(&mut self, f: &Frame, cache: &mut sql::Cache, out: &mut Vec<Message>) {
        let body = &f.body[..];
        match f.header[0] {
            0 => self.on_untagged(body),
            b'Q' => {
                let (text, _) = cstr(body);
                let st = statement(cache, text, f.cut);
                self.expect(Expect::Query);
                out.push(Message::Request(self.request(Some(&st))));
            }
            b'P' => {
                let (name, rest) = cstr(body);
                let (text, _) = cstr(rest);
                let st = statement(cache, text, f.cut);
                if self.statements.len() >= MAX_STATEMENTS && !self.statements.contains_key(name) {
                    self.statements.clear();
                }
                self.statements.insert(name.to_vec(), st);
            }
            b'B' => {
                let (portal, rest) = cstr(body);
                let (stmt, _) = cstr(rest);
                if self.portals.len() >= MAX_STATEMENTS && !self.portals.contains_key(portal) {
                    self.portals.clear();
                }
                self.portals.insert(portal.to_vec(), stmt.to_vec());
            }
            b'E' => {
                let (portal, _) = cstr(body);
                let st = self
                    .portals
                    .get(portal)
                    .and_then(|s| self.statements.get(s))
                    .cloned();
                self.expect(Expect::Execute);
                let mut req = self.request(st.as_deref());
                if st.is_none() {
                    req.operation = Some(Arc::from("EXECUTE"));
                    req.text_unknown = true;
                }
                out.push(Message::Request(req));
            }
            b'S' => self.expect(Expect::Sync),
            b'C' => {
                let (name, _) = cstr(body.get(1..).unwrap_or_default());
                match body.first() {
                    Some(b'S') => {
                        self.statements.remove(name);
                    }
                    Some(b'P') => {
                        self.portals.remove(name);
                    }
                    _ => {}
                }
            }
            // Describe, Flush, Terminate, FunctionCall, COPY data: nothing a span needs.
            _ => {}
        }
    }

    fn on_untagged(&mut self, body: &[u8]) {
        let Some(code) = body
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        else {
            return;
        };
        match code {
            SSL_REQUEST | GSSENC_REQUEST => {
                self.awaiting_encryption_answer = true;
                // If refused, the StartupMessage follows, untagged too.
                self.wire.requests.expect_untagged(4);
            }
            CANCEL_REQUEST => {}
            _ if code >> 16 == 3 => {
                // StartupMessage: key\0value\0 pairs. The database, else the user's name.
                let mut rest = &body[4..];
                let (mut user, mut database) = (None, None);
                while !rest.is_empty() {
                    let (k, r) = cstr(rest);
                    let (v, r) = cstr(r);
                    rest = r;
                    if k.is_empty() {
                        break;
                    }
                    match k {
                        b"database" => database = Some(v),
                        b"user" => user = Some(v),
                        _ => {}
                    }
                }
                self.namespace = database
                    .or(user)
                    .filter(|v| !v.is_empty())
                    .map(|v| Arc::from(String::from_utf8_lossy(v).as_ref()));
            }
            _ => {}
        }
    }

    fn request(&self, st: Option<&sql::Statement>) -> DbRequest {
        DbRequest::of(st, self.namespace.clone())
    }

    pub fn responses(&mut self, seg: Segment, out: &mut Vec<Message>) {
        if self.encrypted {
            return;
        }
        let seg = match seg {
            Segment::Data(mut b) if self.awaiting_encryption_answer && !b.is_empty() => {
                // The answer to SSLRequest is one bare byte: 'S' (TLS follows) or 'N'. If that
                // byte was lost in a gap, a plausible backend message says it was 'N'.
                self.awaiting_encryption_answer = false;
                match b[0] {
                    b'N' => {
                        let _ = b.split_to(1);
                        if b.is_empty() {
                            return;
                        }
                    }
                    _ if plausible_backend(&b) => {}
                    _ => {
                        self.encrypted = true;
                        return;
                    }
                }
                Segment::Data(b)
            }
            s => s,
        };
        let mut frames = self.wire.frames(false, seg, out);
        for f in frames.drain(..) {
            self.on_response(&f, out);
        }
        self.wire.recycle(frames);
    }

    fn on_response(&mut self, f: &Frame, out: &mut Vec<Message>) {
        match f.header[0] {
            b'C' | b'I' | b's' if self.expected.front() == Some(&Expect::Execute) => {
                self.expected.pop_front();
                out.push(Message::Response(DbResponse::default()));
            }
            b'E' => {
                let code = sqlstate(&f.body);
                match self.expected.front() {
                    Some(Expect::Execute) => {
                        self.expected.pop_front();
                        out.push(Message::Response(DbResponse {
                            error_code: code,
                            not_executed: false,
                        }));
                    }
                    Some(Expect::Query) => self.query_error = code,
                    // An error in Parse/Bind of a pipeline without Execute, or at startup.
                    _ => {}
                }
            }
            b'Z' => {
                while let Some(e) = self.expected.pop_front() {
                    match e {
                        Expect::Query => {
                            out.push(Message::Response(DbResponse {
                                error_code: self.query_error.take(),
                                not_executed: false,
                            }));
                            break;
                        }
                        Expect::Execute => out.push(Message::Response(DbResponse {
                            error_code: None,
                            not_executed: true,
                        })),
                        Expect::Sync => break,
                    }
                }
            }
            b'A' | b'N' => out.push(Message::Unsolicited),
            _ => {}
        }
    }
}

fn statement(cache: &mut sql::Cache, text: &[u8], cut: bool) -> Stmt {
    let text = String::from_utf8_lossy(text);
    cache.statement(Flavor::Postgres, &text, cut)
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> Option<Arc<str>> {
    let mut rest = body;
    while let Some((&field, r)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let (value, r) = cstr(r);
        if field == b'C' && value.len() == 5 && value.iter().all(u8::is_ascii_alphanumeric) {
            return Some(Arc::from(String::from_utf8_lossy(value).as_ref()));
        }
        rest = r;
    }
    None
}

/// Authoritative detection from the first bytes of one direction.
pub fn detect(data: &[u8], requests: bool) -> Detect {
    if data.len() < 5 {
        return Detect::NeedMore;
    }
    if requests && data.len() >= 8 && data[0] == 0 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let code = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
        return match code {
            SSL_REQUEST | GSSENC_REQUEST if len == 8 => Detect::Yes(100),
            _ if code >> 16 == 3 && (9..=10_000).contains(&len) => Detect::Yes(100),
            _ => Detect::No,
        };
    }
    // Tagged messages: every one must be well formed; at least one must be distinctive.
    let tags = if requests {
        FRONTEND_TAGS
    } else {
        BACKEND_TAGS
    };
    let mut at = 0;
    let mut seen = 0;
    let mut distinctive = false;
    while at < data.len() && seen < 16 {
        let Some(h) = data.get(at..at + 5) else {
            return Detect::NeedMore;
        };
        if !tags.contains(&h[0]) {
            return Detect::No;
        }
        let Some(len) = body_len(h).filter(|l| *l < 16 << 20) else {
            return Detect::No;
        };
        let body = data
            .get(at + 5..(at + 5 + len).min(data.len()))
            .unwrap_or(&[]);
        distinctive |= match (requests, h[0]) {
            // A query text: printable, NUL-terminated.
            (true, b'Q') => {
                len > 1
                    && body.len() == len
                    && body[len - 1] == 0
                    && body[..len - 1].iter().all(|b| *b >= 0x09)
            }
            (true, b'P' | b'B' | b'E') => true,
            // ReadyForQuery: always 5 bytes, status I/T/E.
            (false, b'Z') => len == 1 && matches!(body.first(), Some(b'I' | b'T' | b'E')),
            (false, b'T' | b'C' | b'1' | b'2') => true,
            _ => false,
        };
        at += 5 + len;
        seen += 1;
    }
    if at > data.len() {
        // The last message continues in the next segment.
        return if distinctive {
            Detect::Yes(60)
        } else {
            Detect::NeedMore
        };
    }
    if distinctive {
        Detect::Yes(if requests { 80 } else { 60 })
    } else {
        Detect::NeedMore
    }
}
