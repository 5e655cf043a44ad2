//! HTTP/1.0 and 1.1 message framing over a reassembled stream (`conn::Segment`s).
//!
//! Heads are parsed with httparse. Bodies are skipped by count, not copied, so a body the capture
//! cap truncated (a gap in the stream) is skipped just the same. When framing is lost (a gap
//! inside a head or a chunk-size line, garbage), the reader resynchronises on the next thing that
//! looks like a message start, and says so.

use std::{borrow::Cow, mem::MaybeUninit};

use bytes::{Buf as _, Bytes, BytesMut};

use crate::{conn::Segment, protocol::text};

/// Heads larger than this are not HTTP we can parse (or an attack): counted as malformed.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 96;

/// Where a text of a head (its request target, a method no RFC defines, a kept header's
/// value) lies in the head's bytes (`Headers`): two offsets instead of a copy of the text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct At {
    from: u32,
    to: u32,
}

/// A request's method: the ones RFC 9110 and 5789 define by their index in `KNOWN_METHODS`
/// (a byte: with it a head is 112 bytes, and a parsed head with its framing fits in the 128
/// bytes a move copies inline instead of calling memcpy), any other where it lies in the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Known(u8),
    Other(At),
}

/// A head's first line. Its texts lie in the head's bytes: read them with `Head::method` and
/// `Head::target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: Method,
        target: At,
    },
    /// The reason phrase is not kept: nothing reads it.
    Response {
        status: u16,
    },
}

/// The methods RFC 9110 and 5789 define (spans name any other `_OTHER`).
pub const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A method as a `StartLine` keeps it: the standard ones as constants.
pub fn method_name(m: &str) -> Cow<'static, str> {
    match KNOWN_METHODS.iter().find(|k| **k == m) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(m.to_string()),
    }
}

/// `m` as a `Method` if RFC 9110 or 5789 defines it.
fn known(m: &str) -> Option<Method> {
    KNOWN_METHODS
        .iter()
        .position(|k| *k == m)
        .map(|i| Method::Known(i as u8))
}

/// A message head: 112 bytes that travel by value from the parser through the exchange to
/// the span (each text an offset into the head's bytes, each kept header's name an index), so
/// a request costs no allocation of its own and its moves are short.
#[derive(Clone)]
pub struct Head {
    pub start: StartLine,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Only the headers something reads (`KEPT`), under their lowercase names; values as bytes
    /// (they need not be UTF-8). Everything else, credentials included, is never stored. The
    /// start line's texts lie in the same bytes.
    pub headers: Headers,
    /// The head was cut by a gap: headers after the cut are missing.
    pub truncated: bool,
}

impl Head {
    /// A request head from its texts (tests', and a parsed head's should httparse not give them
    /// as slices of the head): the texts copied together into one buffer. Headers whose names
    /// are not in `NAMES` are not kept.
    pub fn request<'a, H>(method: &str, target: &str, headers: H) -> Self
    where
        H: IntoIterator<Item = (&'static str, &'a [u8])>,
        H::IntoIter: Clone,
    {
        Self::request_kept(
            method,
            target,
            headers
                .into_iter()
                .filter_map(|(name, value)| Some((name_position(name)?, value))),
        )
    }

    /// A request head from fields whose names are indices in `NAMES` (HTTP/2's decoded
    /// fields): the texts copied together into one buffer of their exact size (one
    /// allocation, which `Bytes` takes over as it is).
    pub fn request_kept<'a>(
        method: &str,
        target: &str,
        headers: impl Iterator<Item = (u8, &'a [u8])> + Clone,
    ) -> Self {
        let size =
            target.len() + method.len() + headers.clone().map(|(_, v)| v.len()).sum::<usize>();
        let mut text = Vec::with_capacity(size);
        let target = push_text(&mut text, target.as_bytes());
        let method = match known(method) {
            Some(k) => k,
            None => Method::Other(push_text(&mut text, method.as_bytes())),
        };
        let mut kept = smallvec::SmallVec::new();
        for (name, value) in headers {
            kept.push((name, push_text(&mut text, value)));
        }
        Self {
            start: StartLine::Request { method, target },
            minor_version: 1,
            headers: Headers {
                text: text.into(),
                kept,
            },
            truncated: false,
        }
    }

    /// A request head over a copy of `text` (HTTP/2's kept fields as the session gathered
    /// them), each part located by its offsets there: one allocation and one copy, and no
    /// text converted. `None` when the method is missing or the method or target is not
    /// UTF-8: `request_kept` then makes them readable.
    pub fn request_in(
        text: &[u8],
        method: Option<(u32, u32)>,
        target: Option<(u32, u32)>,
        headers: impl Iterator<Item = (u8, (u32, u32))>,
    ) -> Option<Self> {
        let part = |(from, to): (u32, u32)| text.get(from as usize..to as usize);
        let method_at = method?;
        let method_text = text::utf8(part(method_at)?)?;
        let target = match target {
            Some(t) => {
                text::utf8(part(t)?)?;
                At { from: t.0, to: t.1 }
            }
            None => At::default(),
        };
        let method = known(method_text).unwrap_or(Method::Other(At {
            from: method_at.0,
            to: method_at.1,
        }));
        let mut kept = smallvec::SmallVec::new();
        for (name, (from, to)) in headers {
            part((from, to))?;
            kept.push((name, At { from, to }));
        }
        Some(Self {
            start: StartLine::Request { method, target },
            minor_version: 1,
            headers: Headers {
                text: Bytes::copy_from_slice(text),
                kept,
            },
            truncated: false,
        })
    }

    /// A response head from decoded fields, as `request`.
    pub fn response<'a>(
        status: u16,
        headers: impl IntoIterator<Item = (&'static str, &'a [u8])>,
    ) -> Self {
        Self {
            start: StartLine::Response { status },
            minor_version: 1,
            headers: Headers::copied(headers),
            truncated: false,
        }
    }

    /// `name` in lowercase, as `KEPT` spells it (kept headers are stored under those names).
    /// Found by the name's index, so each kept header is one byte compared, not a name (a
    /// memcmp call each, ~1% of the pipeline). Inlined, so that a constant name's index is
    /// found at compile time (a call per lookup was 1.6% of a gRPC call's instructions).
    #[inline(always)]
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let index = name_position(name)?;
        self.headers
            .kept
            .iter()
            .find(|(n, _)| *n == index)
            .map(|&(_, at)| self.headers.at(at))
    }

    #[inline(always)]
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(text::utf8).map(text::trim)
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        let Some(index) = name_position(name) else {
            return false;
        };
        self.headers
            .kept
            .iter()
            .filter(|(n, _)| *n == index)
            .filter_map(|&(_, at)| text::utf8(self.headers.at(at)))
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status, .. } => Some(status),
            StartLine::Request { .. } => None,
        }
    }

    /// A request's method as sent.
    pub fn method(&self) -> Option<&str> {
        match self.start {
            StartLine::Request {
                method: Method::Known(m),
                ..
            } => KNOWN_METHODS.get(m as usize).copied(),
            StartLine::Request {
                method: Method::Other(at),
                ..
            } => Some(self.headers.str_at(at)),
            StartLine::Response { .. } => None,
        }
    }

    /// A request's method if RFC 9110 or 5789 defines it.
    pub fn known_method(&self) -> Option<&'static str> {
        match self.start {
            StartLine::Request {
                method: Method::Known(m),
                ..
            } => KNOWN_METHODS.get(m as usize).copied(),
            _ => None,
        }
    }

    /// A request's method as `method_name` keeps it (the reader asks it of the request a
    /// response answers).
    pub fn method_name(&self) -> Option<Cow<'static, str>> {
        match self.known_method() {
            Some(m) => Some(Cow::Borrowed(m)),
            None => self.method().map(|m| Cow::Owned(m.to_string())),
        }
    }

    /// A request's target as sent ("" for a response).
    pub fn target(&self) -> &str {
        match self.start {
            StartLine::Request { target, .. } => self.headers.str_at(target),
            StartLine::Response { .. } => "",
        }
    }

    /// Whether the peer will close after this message.
    pub fn closes(&self) -> bool {
        if self.minor_version == 0 {
            !self.has_token("connection", "keep-alive")
        } else {
            self.has_token("connection", "close")
        }
    }
}

/// Heads are equal when what they say is: the same texts, wherever they lie.
impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.status() == other.status()
            && self.method() == other.method()
            && self.target() == other.target()
            && self.minor_version == other.minor_version
            && self.headers == other.headers
            && self.truncated == other.truncated
    }
}

impl Eq for Head {}

/// The start line's texts and the kept headers, never the rest of the head's bytes.
impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Head");
        match self.status() {
            Some(status) => d.field("status", &status),
            None => d
                .field("method", &self.method().unwrap_or_default())
                .field("target", &self.target()),
        };
        d.field("minor_version", &self.minor_version)
            .field("headers", &self.headers)
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// Appends `bytes` to a head's text being built: where they now lie.
fn push_text(text: &mut Vec<u8>, bytes: &[u8]) -> At {
    let from = text.len() as u32;
    text.extend_from_slice(bytes);
    At {
        from,
        to: text.len() as u32,
    }
}

/// How the body after a head is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

// A head travels by value (its kept headers inline): boxing it would be the allocation
// the inline headers save.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadParse {
    Incomplete,
    Invalid(&'static str),
    /// The head and its length in bytes.
    Parsed(Head, usize),
}

/// A head's bytes and its kept headers: each name's index in `NAMES` and where its value lies.
/// A parsed head's texts lie in the payload it was parsed from, so the head holds one reference
/// to it instead of a copy, or a count, per text (each count is an atomic add in the pipeline
/// and a subtract wherever the head is dropped, on a counter the ring reader's thread touches
/// too). A request carries two to four kept headers (host, user agent, trace context), a
/// response one or two (framing): they live inline.
#[derive(Clone, Default)]
pub struct Headers {
    text: Bytes,
    kept: smallvec::SmallVec<[(u8, At); 4]>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Headers whose values are copied together into one buffer (a response head not parsed
    /// from a payload). Names not in `NAMES` are not kept.
    fn copied<'a>(values: impl IntoIterator<Item = (&'static str, &'a [u8])>) -> Self {
        let mut text = Vec::new();
        let mut kept = smallvec::SmallVec::new();
        for (name, value) in values {
            if let Some(index) = name_position(name) {
                kept.push((index, push_text(&mut text, value)));
            }
        }
        Self {
            text: text.into(),
            kept,
        }
    }

    /// Each kept header's name and value, in the order they came.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &[u8])> {
        self.kept
            .iter()
            .map(|&(name, at)| (NAMES[name as usize], self.at(at)))
    }

    fn at(&self, at: At) -> &[u8] {
        &self.text[at.from as usize..at.to as usize]
    }

    /// A start line's text (UTF-8 by construction: httparse's `str`s, or copied from `str`s),
    /// read a few times per request.
    fn str_at(&self, at: At) -> &str {
        text::utf8(self.at(at)).unwrap_or_default()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

/// Only the kept headers, never the rest of the buffer they lie in (credentials included).
impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, v)| (n, String::from_utf8_lossy(v))))
            .finish()
    }
}

/// The headers the agent reads: framing, span attributes, trace context. Keeping only these
/// saves two allocations per header of every message, and keeps secrets out of memory.
pub const KEPT: [&str; 15] = [
    "host",
    "user-agent",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-forwarded-for",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "uber-trace-id",
];

/// The headers only HTTP/2 heads keep (gRPC's).
pub const KEPT_H2: [&str; 3] = ["content-type", "grpc-status", "grpc-message"];

/// Every name a head may keep: `KEPT`, then `KEPT_H2`. A kept header stores its name as an
/// index here: one byte instead of a 16-byte `&str` per header, 48 bytes of every head.
pub const NAMES: [&str; KEPT.len() + KEPT_H2.len()] = {
    let mut names = [""; KEPT.len() + KEPT_H2.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = if i < KEPT.len() {
            KEPT[i]
        } else {
            KEPT_H2[i - KEPT.len()]
        };
        i += 1;
    }
    names
};

/// `host`'s index in `NAMES` (HTTP/2 keeps `:authority` under it).
pub const HOST: u8 = name_index("host");

/// `name`'s index in `NAMES`, at compile time.
pub(crate) const fn name_index(name: &str) -> u8 {
    let mut i = 0;
    while i < NAMES.len() {
        if same_text(NAMES[i], name) {
            return i as u8;
        }
        i += 1;
    }
    panic!("not a kept header name")
}

/// `a == b`, at compile time (`str`'s `==` is not `const`).
pub(crate) const fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut j = 0;
    while j < a.len() && a[j] == b[j] {
        j += 1;
    }
    j == a.len()
}

/// `name`'s index in `NAMES`: through `kept_index`, which compares it with one name at most.
#[inline(always)]
fn name_position(name: &str) -> Option<u8> {
    kept_index(name.as_bytes()).or_else(|| {
        KEPT_H2
            .iter()
            .position(|k| *k == name)
            .map(|i| (KEPT.len() + i) as u8)
    })
}

/// The `KEPT` name `name` is, in any case.
#[cfg(test)]
pub(crate) fn kept_name(name: &[u8]) -> Option<&'static str> {
    kept_index(name).map(|i| NAMES[i as usize])
}

/// The index in `NAMES` of the `KEPT` name `name` is, in any case. `name` is compared with
/// one kept name at most: the one of its length, or where a length has several, the one whose
/// letter at a position where they all differ it has (`b | 0x20` maps exactly a letter's two
/// cases, and nothing else, onto the lowercase letter). Comparing with every kept name of the
/// length was ~55 instructions per header, 3.5% of the criterion HTTP/1 case.
#[inline]
pub(crate) fn kept_index(name: &[u8]) -> Option<u8> {
    let lower = |at: usize| name[at] | 0x20;
    let candidate = match name.len() {
        2 => const { name_index("b3") },
        4 => const { name_index("host") },
        10 => match lower(0) {
            b'u' => const { name_index("user-agent") },
            b'c' => const { name_index("connection") },
            b't' => const { name_index("tracestate") },
            b'x' => const { name_index("x-b3-flags") },
            _ => return None,
        },
        11 => match lower(0) {
            b't' => const { name_index("traceparent") },
            b'x' => const { name_index("x-b3-spanid") },
            _ => return None,
        },
        12 => match lower(5) {
            b't' => const { name_index("x-b3-traceid") },
            b's' => const { name_index("x-b3-sampled") },
            _ => return None,
        },
        13 => const { name_index("uber-trace-id") },
        14 => const { name_index("content-length") },
        15 => const { name_index("x-forwarded-for") },
        17 => match lower(0) {
            b't' => const { name_index("transfer-encoding") },
            b'x' => const { name_index("x-b3-parentspanid") },
            _ => return None,
        },
        _ => return None,
    };
    same_name(name, NAMES[candidate as usize].as_bytes()).then_some(candidate)
}

/// Whether `name` is `kept` (a `KEPT` name, of the same length) in any case, eight bytes at a
/// time: a byte-wise case-insensitive comparison was ~4% of the pipeline with nginx's headers
/// (Content-Length, Connection), compared in full. Exact: `kept` is lowercase letters, digits
/// and `-`, and only its letters (the bytes with bit 0x40 set) take `name`'s byte with bit
/// 0x20 forced on, which maps exactly the two cases of that letter onto it.
fn same_name(name: &[u8], kept: &[u8]) -> bool {
    const LETTERS: u64 = 0x4040_4040_4040_4040;
    let same = |n: u64, k: u64| n | ((k & LETTERS) >> 1) == k;
    let word = |b: &[u8], at: usize| {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes from `at`"))
    };
    let len = kept.len();
    if name.len() != len {
        return false;
    }
    if len < 8 {
        return name
            .iter()
            .zip(kept)
            .all(|(n, k)| same(u64::from(*n), u64::from(*k)));
    }
    // Whole words, then the last eight bytes (overlapping the word before).
    (0..len / 8).all(|i| same(word(name, 8 * i), word(kept, 8 * i)))
        && (len.is_multiple_of(8) || same(word(name, len - 8), word(kept, len - 8)))
}

/// A start line as httparse read it.
#[derive(Clone, Copy)]
enum ParsedStart<'a> {
    Request { method: &'a str, target: &'a str },
    Response { status: u16 },
}

/// The head of `len` bytes at the start of `source` that httparse read as `start`, `minor` and
/// `raw`. Its texts stay where they lie: one reference to the head's bytes instead of a copy,
/// or a count, per text.
fn parsed_head(
    start: ParsedStart<'_>,
    minor_version: u8,
    raw: &[httparse::Header<'_>],
    source: &Bytes,
    len: usize,
) -> Head {
    let bytes = &source[..len];
    let kept = raw
        .iter()
        .filter_map(|h| Some((kept_index(h.name.as_bytes())?, h.value)));
    let located = (|| {
        let start = match start {
            ParsedStart::Request { method, target } => StartLine::Request {
                method: match known(method) {
                    Some(k) => k,
                    None => Method::Other(locate(bytes, method.as_bytes())?),
                },
                target: locate(bytes, target.as_bytes())?,
            },
            ParsedStart::Response { status } => StartLine::Response { status },
        };
        let mut headers = Headers::new();
        for (name, value) in kept.clone() {
            headers.kept.push((name, locate(bytes, value)?));
        }
        if !(headers.kept.is_empty() && matches!(start, StartLine::Response { .. })) {
            headers.text = source.slice(..len);
        }
        Some(Head {
            start,
            minor_version,
            headers,
            truncated: false,
        })
    })();
    // httparse's texts are slices of the head; should one not be, copy them all.
    located.unwrap_or_else(|| {
        let named = kept.map(|(name, value)| (NAMES[name as usize], value));
        let mut head = match start {
            ParsedStart::Request { method, target } => Head::request(method, target, named),
            ParsedStart::Response { status } => Head::response(status, named),
        };
        head.minor_version = minor_version;
        head
    })
}

/// Where `part` lies in `head`. An empty text may point anywhere: it lies at 0.
fn locate(head: &[u8], part: &[u8]) -> Option<At> {
    if part.is_empty() {
        return Some(At::default());
    }
    let from = (part.as_ptr() as usize).checked_sub(head.as_ptr() as usize)?;
    let to = from + part.len();
    (to <= head.len()).then_some(At {
        from: from as u32,
        to: to as u32,
    })
}

/// Parses a request head at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> HeadParse {
    request_head(&Bytes::copy_from_slice(buf))
}

/// Parses a request head at the start of `source`; the head's texts stay in it.
fn request_head(source: &Bytes) -> HeadParse {
    // Uninitialised: an initialised array is a 3 KiB memset per head, a fifth of its cost.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(source, &mut headers) {
        Ok(httparse::Status::Complete(len)) => HeadParse::Parsed(
            parsed_head(
                ParsedStart::Request {
                    method: req.method.unwrap_or_default(),
                    target: req.path.unwrap_or_default(),
                },
                req.version.unwrap_or(1),
                req.headers,
                source,
                len,
            ),
            len,
        ),
        Ok(httparse::Status::Partial) if source.len() > MAX_HEAD => {
            HeadParse::Invalid("head too large")
        }
        Ok(httparse::Status::Partial) => HeadParse::Incomplete,
        Err(_) => HeadParse::Invalid("malformed request head"),
    }
}

/// Parses a response head at the start of `buf`.
pub fn parse_response(buf: &[u8]) -> HeadParse {
    response_head(&Bytes::copy_from_slice(buf))
}

fn response_head(source: &Bytes) -> HeadParse {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        source,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => HeadParse::Parsed(
            parsed_head(
                ParsedStart::Response {
                    status: resp.code.unwrap_or_default(),
                },
                resp.version.unwrap_or(1),
                resp.headers,
                source,
                len,
            ),
            len,
        ),
        Ok(httparse::Status::Partial) if source.len() > MAX_HEAD => {
            HeadParse::Invalid("head too large")
        }
        Ok(httparse::Status::Partial) => HeadParse::Incomplete,
        Err(_) => HeadParse::Invalid("malformed response head"),
    }
}

/// Body framing of a message with this head. `request_method` is the method of the request a
/// response answers (a response to HEAD has no body whatever its headers say).
pub fn framing(head: &Head, request_method: Option<&str>) -> Framing {
    if let Some(status) = head.status() {
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Framing::None;
        }
        if request_method.is_some_and(|m| m.eq_ignore_ascii_case("HEAD")) {
            return Framing::None;
        }
        if request_method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"))
            && (200..300).contains(&status)
        {
            return Framing::UntilClose;
        }
    }
    if head.has_token("transfer-encoding", "chunked") {
        return Framing::Chunked;
    }
    if let Some(len) = head.header("content-length").and_then(decimal) {
        return if len == 0 {
            Framing::None
        } else {
            Framing::Length(len)
        };
    }
    if head.is_request() {
        Framing::None
    } else {
        Framing::UntilClose
    }
}

/// A header value as a decimal number (`Content-Length`): digits between optional ASCII
/// whitespace (RFC 9110's OWS is spaces and tabs), read as `str::parse` reads them (a leading
/// `+` allowed, overflow refused), without validating the value as UTF-8 first (once per
/// response).
fn decimal(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    let digits = value.strip_prefix(b"+").unwrap_or(value);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
    })
}

/// Whether `data` starts like an HTTP/1 message of this direction: used to resynchronise.
fn looks_like_start(data: &[u8], requests: bool) -> bool {
    if requests {
        const METHODS: [&[u8]; 9] = [
            b"GET ",
            b"POST ",
            b"PUT ",
            b"HEAD ",
            b"DELETE ",
            b"PATCH ",
            b"OPTIONS ",
            b"CONNECT ",
            b"TRACE ",
        ];
        METHODS
            .iter()
            .any(|m| data.starts_with(m) || m.starts_with(data))
    } else {
        data.starts_with(b"HTTP/1.") || b"HTTP/1.".starts_with(data)
    }
}

/// Authoritative detection (see protocol::REGISTRY): a request line's method, or a status line
/// (a connection joined mid-stream whose next bytes are an answer).
pub fn detect(data: &[u8], requests: bool) -> super::Detect {
    let n = data.len().min(8);
    if data.len() < 8 && looks_like_start(&data[..n], requests) {
        // A prefix of a method or of `HTTP/1.`: one more segment tells.
        let complete = if requests {
            data.contains(&b' ')
        } else {
            data.len() >= 7
        };
        if !complete {
            return super::Detect::NeedMore;
        }
    }
    if looks_like_start(data, requests) {
        super::Detect::Yes(100)
    } else {
        super::Detect::No
    }
}

/// What the reader found, in stream order.
// A head travels by value (its kept headers inline): boxing it would be the allocation
// the inline headers save.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message head; its body (if any) follows.
    Head { head: Head, framing: Framing },
    /// The current message ended: `complete` is false when framing was lost and the end is a
    /// guess (or the connection closed before it).
    End { complete: bool },
    /// Bytes that are not HTTP where a message should start: skipped until something that
    /// looks like a message start.
    Malformed { reason: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data.
    Data(u64),
    /// The CRLF after chunk data: bytes left to skip.
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty line.
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    Chunked(Chunk),
    UntilClose,
    /// Framing lost: wait for a message start.
    Resync,
}

/// Reads one direction of an HTTP/1 connection. Holds at most one head's worth of bytes.
#[derive(Debug)]
pub struct MessageReader {
    requests: bool,
    state: State,
    buf: BytesMut,
}

impl MessageReader {
    pub fn requests() -> Self {
        Self {
            requests: true,
            state: State::Head,
            buf: BytesMut::new(),
        }
    }

    pub fn responses() -> Self {
        Self {
            requests: false,
            state: State::Head,
            buf: BytesMut::new(),
        }
    }

    /// A reader for a stream joined mid-way: it waits for a message start.
    pub fn resyncing(requests: bool) -> Self {
        Self {
            requests,
            state: State::Resync,
            buf: BytesMut::new(),
        }
    }

    pub fn in_message(&self) -> bool {
        !matches!(self.state, State::Head | State::Resync) || !self.buf.is_empty()
    }

    /// Feeds one segment. For responses, `request_method` is asked, for each response head, the
    /// method of the request it answers (HEAD and CONNECT change the framing).
    pub fn feed(
        &mut self,
        seg: Segment,
        request_method: &mut dyn FnMut(&Head) -> Option<Cow<'static, str>>,
        out: &mut Vec<Item>,
    ) {
        match seg {
            Segment::Gap(n) => self.gap(n, out),
            Segment::Data(data) => self.data(data, request_method, out),
        }
    }

    /// The connection closed: ends a message that runs until close, abandons any other.
    pub fn close(&mut self, out: &mut Vec<Item>) {
        match self.state {
            State::UntilClose => out.push(Item::End { complete: true }),
            State::Body(_) | State::Chunked(_) => out.push(Item::End { complete: false }),
            State::Head | State::Resync => {}
        }
        self.state = State::Head;
        self.buf.clear();
    }

    fn gap(&mut self, n: u64, out: &mut Vec<Item>) {
        match self.state {
            State::Head if self.buf.is_empty() => self.state = State::Resync,
            State::Head => {
                // The head was cut (capture cap or lost event): keep what we have of it.
                let partial = std::mem::take(&mut self.buf);
                if let Some(head) = salvage_head(&partial, self.requests) {
                    out.push(Item::Head {
                        head,
                        framing: Framing::None,
                    });
                    out.push(Item::End { complete: false });
                } else {
                    out.push(Item::Malformed {
                        reason: "head cut by a capture gap",
                    });
                }
                self.state = State::Resync;
            }
            State::Body(remaining) => {
                if n < remaining {
                    self.state = State::Body(remaining - n);
                } else {
                    out.push(Item::End { complete: true });
                    // Bytes past the body: the start of the next message was in the gap.
                    self.state = if n == remaining {
                        State::Head
                    } else {
                        State::Resync
                    };
                }
            }
            State::Chunked(Chunk::Data(remaining)) if n < remaining => {
                self.state = State::Chunked(Chunk::Data(remaining - n));
            }
            State::Chunked(Chunk::Data(remaining)) if n == remaining => {
                self.state = State::Chunked(Chunk::DataEnd(2));
            }
            State::Chunked(_) => {
                // A chunk-size line is gone: where the body ends is unknowable.
                out.push(Item::End { complete: false });
                self.state = State::Resync;
            }
            State::UntilClose | State::Resync => {}
        }
    }

    fn data(
        &mut self,
        mut data: Bytes,
        request_method: &mut dyn FnMut(&Head) -> Option<Cow<'static, str>>,
        out: &mut Vec<Item>,
    ) {
        // Bounded by the bytes fed: every iteration consumes at least one byte or returns.
        while !data.is_empty() {
            match self.state {
                State::Resync => {
                    let Some(at) =
                        (0..data.len()).find(|&i| looks_like_start(&data[i..], self.requests))
                    else {
                        return;
                    };
                    data.advance(at);
                    self.state = State::Head;
                }
                State::Head => {
                    let (parsed, from_buf) = if self.buf.is_empty() {
                        (self.parse_head(&data), false)
                    } else {
                        self.buf.extend_from_slice(&data);
                        let whole = Bytes::copy_from_slice(&self.buf);
                        (self.parse_head(&whole), true)
                    };
                    match parsed {
                        HeadParse::Incomplete => {
                            if !from_buf {
                                self.buf.extend_from_slice(&data);
                            }
                            return;
                        }
                        HeadParse::Invalid(reason) => {
                            out.push(Item::Malformed { reason });
                            self.buf.clear();
                            self.state = State::Resync;
                            // Skip at least the first byte so resync looks further on.
                            data.advance(1);
                        }
                        HeadParse::Parsed(head, len) => {
                            let method = if self.requests {
                                None
                            } else {
                                request_method(&head)
                            };
                            let framing = framing(&head, method.as_deref());
                            if from_buf {
                                // `len` counts from the start of buf, whose tail is `data`.
                                let consumed_from_data = len - (self.buf.len() - data.len());
                                data.advance(consumed_from_data);
                                self.buf.clear();
                            } else {
                                data.advance(len);
                            }
                            out.push(Item::Head { head, framing });
                            self.state = match framing {
                                Framing::None => {
                                    out.push(Item::End { complete: true });
                                    State::Head
                                }
                                Framing::Length(n) => State::Body(n),
                                Framing::Chunked => State::Chunked(Chunk::Size),
                                Framing::UntilClose => State::UntilClose,
                            };
                        }
                    }
                }
                State::Body(remaining) => {
                    let take = remaining.min(data.len() as u64);
                    data.advance(take as usize);
                    if take == remaining {
                        out.push(Item::End { complete: true });
                        self.state = State::Head;
                    } else {
                        self.state = State::Body(remaining - take);
                    }
                }
                State::UntilClose => return,
                State::Chunked(chunk) => self.chunked(chunk, &mut data, out),
            }
        }
    }

    fn chunked(&mut self, chunk: Chunk, data: &mut Bytes, out: &mut Vec<Item>) {
        match chunk {
            Chunk::Size | Chunk::Trailer => {
                // Lines are short; gather one in buf.
                let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                    self.buf.extend_from_slice(data);
                    data.clear();
                    if self.buf.len() > 1024 {
                        out.push(Item::Malformed {
                            reason: "chunk line too long",
                        });
                        out.push(Item::End { complete: false });
                        self.buf.clear();
                        self.state = State::Resync;
                    }
                    return;
                };
                self.buf.extend_from_slice(&data[..nl]);
                data.advance(nl + 1);
                let line = std::mem::take(&mut self.buf);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if chunk == Chunk::Trailer {
                    if line.is_empty() {
                        out.push(Item::End { complete: true });
                        self.state = State::Head;
                    }
                    return;
                }
                let size_hex = line.split(|&b| b == b';').next().unwrap_or_default();
                match std::str::from_utf8(size_hex)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                {
                    Some(0) => self.state = State::Chunked(Chunk::Trailer),
                    Some(n) => self.state = State::Chunked(Chunk::Data(n)),
                    None => {
                        out.push(Item::Malformed {
                            reason: "bad chunk size",
                        });
                        out.push(Item::End { complete: false });
                        self.state = State::Resync;
                    }
                }
            }
            Chunk::Data(remaining) => {
                let take = remaining.min(data.len() as u64);
                data.advance(take as usize);
                self.state = State::Chunked(if take == remaining {
                    Chunk::DataEnd(2)
                } else {
                    Chunk::Data(remaining - take)
                });
            }
            Chunk::DataEnd(left) => {
                // Tolerate a bare LF: skip CR if present, then expect LF.
                let b = data[0];
                data.advance(1);
                self.state = State::Chunked(match (left, b) {
                    (2, b'\r') => Chunk::DataEnd(1),
                    (_, b'\n') => Chunk::Size,
                    _ => {
                        out.push(Item::Malformed {
                            reason: "missing CRLF after chunk",
                        });
                        out.push(Item::End { complete: false });
                        self.state = State::Resync;
                        return;
                    }
                });
            }
        }
    }

    fn parse_head(&self, buf: &Bytes) -> HeadParse {
        if self.requests {
            request_head(buf)
        } else {
            response_head(buf)
        }
    }
}

/// A head cut short: parse the complete lines we have, marked truncated.
fn salvage_head(partial: &[u8], requests: bool) -> Option<Head> {
    let last_nl = partial.iter().rposition(|&b| b == b'\n')?;
    let mut whole = partial[..=last_nl].to_vec();
    whole.extend_from_slice(b"\r\n");
    let parsed = if requests {
        parse_request(&whole)
    } else {
        parse_response(&whole)
    };
    match parsed {
        HeadParse::Parsed(mut head, _) => {
            head.truncated = true;
            Some(head)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
