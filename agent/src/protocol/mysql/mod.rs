//! MySQL and MariaDB (client/server protocol 4.1+): a span per COM_QUERY and COM_STMT_EXECUTE.
//!
//! The server's greeting names the system (`mariadb` when its version says so) and, with the
//! client's HandshakeResponse, whether result sets end with an EOF packet or an OK packet
//! (CLIENT_DEPRECATE_EOF). COM_STMT_PREPARE texts are sanitized and remembered by the statement
//! id the server answers with, so COM_STMT_EXECUTE spans carry them; the bound values that follow
//! the id are never read. Result sets are walked packet by packet (columns, rows, the final
//! EOF/OK and its "more results" flag) without keeping rows. Packets are read by hand rather than
//! with mysql_common: the few fields needed are fixed offsets, and that crate brings its own
//! crypto and value decoding, which an agent that must not decode values does not want.

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

const KEEP_REQUEST: usize = 64 * 1024;
const KEEP_RESPONSE: usize = 512;
const MAX_STATEMENTS: usize = 1024;
const MAX_EXPECTED: usize = 4096;

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;

const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
const CLIENT_SSL: u32 = 1 << 11;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_PLUGIN_AUTH_LENENC: u32 = 1 << 21;
const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;

fn body_len(h: &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize)
}

fn plausible_command(d: &[u8]) -> bool {
    d.len() >= 5
        && d[3] == 0
        && matches!(
            d[4],
            COM_QUERY | COM_STMT_PREPARE | COM_STMT_EXECUTE | COM_STMT_CLOSE | COM_QUIT | 0x0e
        )
}

fn plausible_reply(d: &[u8]) -> bool {
    d.len() >= 5 && d[3] >= 1 && matches!(d[4], 0x00 | 0xff | 0x01..=0x40)
}

const REQUESTS: Layout = Layout {
    header: 4,
    body_len,
    plausible: plausible_command,
};
const REPLIES: Layout = Layout {
    header: 4,
    body_len,
    plausible: plausible_reply,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// COM_QUERY / COM_STMT_EXECUTE: a span.
    Result,
    /// COM_STMT_PREPARE of this text: its answer names the statement id.
    Prepare(Arc<sql::Statement>),
    /// PING, INIT_DB, RESET...: one packet, no span.
    Simple,
}

/// Where the reader is inside the answer to the front request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The answer's first packet.
    Start,
    /// Column definitions still to pass, then (classic) an EOF.
    Columns(u64),
    ColumnsEof,
    Rows,
    /// A prepare's parameter and column definitions still to pass.
    PrepareDefs(u64),
}

#[derive(Debug)]
pub struct Parser {
    wire: Duplex,
    expected: VecDeque<Expect>,
    state: State,
    statements: HashMap<u32, Arc<sql::Statement>>,
    /// Whether a result set ends in an OK packet instead of EOF (negotiated; assumed not when the
    /// handshake was missed, until a result set shows otherwise).
    deprecate_eof: bool,
    mariadb: bool,
    namespace: Option<Arc<str>>,
    /// The greeting was seen and the authentication exchange is not over.
    handshake: bool,
    encrypted: bool,
    /// The error of the result being read (a multi-result answer keeps the first).
    error: Option<Arc<str>>,
}

impl Parser {
    pub fn new(midstream: bool) -> Self {
        Self {
            wire: Duplex::new(
                Framer::new(REQUESTS, KEEP_REQUEST, midstream),
                Framer::new(REPLIES, KEEP_RESPONSE, midstream),
            ),
            expected: VecDeque::new(),
            state: State::Start,
            statements: HashMap::new(),
            deprecate_eof: false,
            mariadb: false,
            namespace: None,
            handshake: false,
            encrypted: false,
            error: None,
        }
    }

    pub fn system(&self) -> &'static str {
        if self.mariadb { "mariadb" } else { "mysql" }
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
        let seq = f.header[3];
        if seq != 0 {
            if seq == 1 && self.handshake {
                self.on_handshake_response(&f.body);
            }
            // Authentication continuations and the parts of a 16 MiB+ command.
            return;
        }
        let Some((&command, body)) = f.body.split_first() else {
            return;
        };
        // A new command: whatever the server was answering is over.
        self.handshake = false;
        match command {
            COM_QUERY => {
                let st = cache.statement(Flavor::Mysql, &String::from_utf8_lossy(body), f.cut);
                self.expect(Expect::Result);
                out.push(Message::Request(self.request(Some(&st))));
            }
            COM_STMT_PREPARE => {
                let st = cache.statement(Flavor::Mysql, &String::from_utf8_lossy(body), f.cut);
                self.expect(Expect::Prepare(st));
            }
            COM_STMT_EXECUTE => {
                let id = body
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                let st = id.and_then(|id| self.statements.get(&id)).cloned();
                self.expect(Expect::Result);
                let mut req = self.request(st.as_deref());
                if st.is_none() {
                    req.operation = Some(Arc::from("EXECUTE"));
                    req.text_unknown = true;
                }
                out.push(Message::Request(req));
            }
            COM_STMT_CLOSE => {
                if let Some(b) = body.get(..4) {
                    self.statements
                        .remove(&u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            COM_QUIT | COM_STMT_SEND_LONG_DATA => {}
            COM_INIT_DB => {
                self.namespace = Some(Arc::from(String::from_utf8_lossy(body).as_ref()));
                self.expect(Expect::Simple);
            }
            _ => self.expect(Expect::Simple),
        }
    }

    /// HandshakeResponse41: capabilities, then the user, the auth data and the database.
    fn on_handshake_response(&mut self, body: &[u8]) {
        let Some(caps) = body
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return;
        };
        self.deprecate_eof = caps & CLIENT_DEPRECATE_EOF != 0;
        if caps & CLIENT_SSL != 0 && body.len() <= 32 {
            // An SSLRequest: the real response comes inside TLS.
            self.encrypted = true;
            return;
        }
        let Some(rest) = body.get(32..) else { return };
        let (_user, rest) = cstr(rest);
        let rest = if caps & CLIENT_PLUGIN_AUTH_LENENC != 0 {
            lenenc(rest).and_then(|(n, r)| r.get(n as usize..))
        } else if caps & CLIENT_SECURE_CONNECTION != 0 {
            rest.split_first().and_then(|(&n, r)| r.get(n as usize..))
        } else {
            Some(cstr(rest).1)
        };
        if caps & CLIENT_CONNECT_WITH_DB != 0
            && let Some(rest) = rest
        {
            let (db, _) = cstr(rest);
            if !db.is_empty() {
                self.namespace = Some(Arc::from(String::from_utf8_lossy(db).as_ref()));
            }
        }
    }

    fn request(&self, st: Option<&sql::Statement>) -> DbRequest {
        DbRequest::of(st, self.namespace.clone())
    }

    pub fn responses(&mut self, seg: Segment, out: &mut Vec<Message>) {
        if self.encrypted {
            return;
        }
        let mut frames = self.wire.frames(false, seg, out);
        for f in frames.drain(..) {
            self.on_reply(&f, out);
        }
        self.wire.recycle(frames);
    }

    fn finish(&mut self, out: &mut Vec<Message>) {
        self.state = State::Start;
        if let Some(e) = self.expected.pop_front()
            && e == Expect::Result
        {
            out.push(Message::Response(DbResponse {
                error_code: self.error.take(),
                not_executed: false,
            }));
        }
        self.error = None;
    }

    fn on_reply(&mut self, f: &Frame, out: &mut Vec<Message>) {
        let b = &f.body[..];
        let first = b.first().copied();
        let Some(front) = self.expected.front().cloned() else {
            // The greeting, authentication answers, or a reply to a request the agent missed.
            if f.header[3] == 0 && first == Some(0x0a) {
                let (version, _) = cstr(&b[1..]);
                self.mariadb = String::from_utf8_lossy(version).contains("MariaDB");
                self.handshake = true;
            }
            return;
        };
        let eof = |len: usize| first == Some(0xfe) && len < 9;
        match (self.state, &front) {
            (State::Start, _) if first == Some(0xff) => {
                self.error = err_code(b);
                self.finish(out);
            }
            (State::Start, Expect::Prepare(st)) => {
                if first == Some(0x00) && b.len() >= 9 {
                    let id = u32::from_le_bytes([b[1], b[2], b[3], b[4]]);
                    let columns = u16::from_le_bytes([b[5], b[6]]) as u64;
                    let params = u16::from_le_bytes([b[7], b[8]]) as u64;
                    if self.statements.len() >= MAX_STATEMENTS {
                        self.statements.clear();
                    }
                    self.statements.insert(id, st.clone());
                    let eofs = if self.deprecate_eof {
                        0
                    } else {
                        u64::from(columns > 0) + u64::from(params > 0)
                    };
                    let defs = columns + params + eofs;
                    if defs > 0 {
                        self.state = State::PrepareDefs(defs);
                        return;
                    }
                }
                self.finish(out);
            }
            (State::Start, Expect::Simple) => self.finish(out),
            (State::Start, Expect::Result) => match first {
                Some(0x00) | Some(0xfe) => {
                    if ok_status(b).is_some_and(|s| s & SERVER_MORE_RESULTS_EXISTS != 0) {
                        return;
                    }
                    self.finish(out);
                }
                // LOCAL INFILE: the client sends the file, then the server's OK ends it.
                Some(0xfb) => {}
                _ => match lenenc(b) {
                    Some((n, _)) if n > 0 => self.state = State::Columns(n),
                    _ => self.finish(out),
                },
            },
            (State::Columns(n), _) => {
                self.state = match (n > 1, self.deprecate_eof) {
                    (true, _) => State::Columns(n - 1),
                    (false, true) => State::Rows,
                    (false, false) => State::ColumnsEof,
                };
            }
            (State::ColumnsEof, _) => {
                if !eof(f.len) {
                    // No EOF after the columns: the client asked for CLIENT_DEPRECATE_EOF (seen
                    // on a connection joined after its handshake). This packet is a row.
                    self.deprecate_eof = true;
                }
                self.state = State::Rows;
                if first == Some(0xff) {
                    self.error = err_code(b);
                    self.finish(out);
                }
            }
            (State::Rows, _) => {
                let end = if self.deprecate_eof {
                    first == Some(0xfe) && f.len < 0xff_ffff
                } else {
                    eof(f.len)
                };
                if first == Some(0xff) {
                    self.error = err_code(b);
                    self.finish(out);
                } else if end {
                    let status = if self.deprecate_eof {
                        ok_status(b)
                    } else {
                        b.get(3..5).map(|s| u16::from_le_bytes([s[0], s[1]]))
                    };
                    if status.is_some_and(|s| s & SERVER_MORE_RESULTS_EXISTS != 0) {
                        self.state = State::Start;
                    } else {
                        self.finish(out);
                    }
                }
            }
            (State::PrepareDefs(n), _) => {
                if n > 1 {
                    self.state = State::PrepareDefs(n - 1);
                } else {
                    self.finish(out);
                }
            }
        }
    }
}

/// A length-encoded integer and what follows it.
fn lenenc(b: &[u8]) -> Option<(u64, &[u8])> {
    let (&first, rest) = b.split_first()?;
    let (n, used) = match first {
        0..=0xfa => (first as u64, 0),
        0xfc => (
            u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as u64,
            2,
        ),
        0xfd => (
            u32::from_le_bytes([*rest.first()?, *rest.get(1)?, *rest.get(2)?, 0]) as u64,
            3,
        ),
        0xfe => {
            let r = rest.get(..8)?;
            (u64::from_le_bytes(r.try_into().ok()?), 8)
        }
        _ => return None,
    };
    Some((n, rest.get(used..)?))
}

/// Status flags of an OK packet (header 0x00 or 0xfe).
fn ok_status(b: &[u8]) -> Option<u16> {
    let (_, r) = lenenc(b.get(1..)?)?;
    let (_, r) = lenenc(r)?;
    r.get(..2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

/// The error number of an ERR packet.
fn err_code(b: &[u8]) -> Option<Arc<str>> {
    let c = b.get(1..3)?;
    Some(Arc::from(u16::from_le_bytes([c[0], c[1]]).to_string()))
}

/// Authoritative detection from the first bytes of one direction.
pub fn detect(data: &[u8], requests: bool) -> Detect {
    if data.len() < 5 {
        return Detect::NeedMore;
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
    let seq = data[3];
    let body = &data[4..data.len().min(4 + len)];
    if !requests {
        // The server's greeting: protocol 10, a printable version, NUL.
        if seq != 0 || data[4] != 0x0a || len < 20 {
            return Detect::No;
        }
        return match body[1..].iter().position(|&b| b == 0) {
            Some(n) if n > 0 && body[1..1 + n].iter().all(|b| (0x20..0x7f).contains(b)) => {
                Detect::Yes(100)
            }
            Some(_) => Detect::No,
            None if body.len() < len => Detect::NeedMore,
            None => Detect::No,
        };
    }
    if seq != 0 || len == 0 || len > 16 << 20 {
        return Detect::No;
    }
    match data[4] {
        COM_QUERY | COM_STMT_PREPARE => {
            let text = &body[1..];
            let start = text.iter().find(|b| !b.is_ascii_whitespace());
            match start {
                Some(b) if b.is_ascii_alphabetic() || *b == b'(' || *b == b'/' => {
                    if text.iter().all(|b| *b >= 0x09) {
                        Detect::Yes(80)
                    } else {
                        Detect::No
                    }
                }
                None if body.len() < len => Detect::NeedMore,
                _ => Detect::No,
            }
        }
        COM_STMT_EXECUTE if len >= 10 => Detect::Yes(30),
        0x0e if len == 1 => Detect::Yes(30),
        _ => Detect::No,
    }
}
