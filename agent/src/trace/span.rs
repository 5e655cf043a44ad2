//! One span per HTTP exchange, with OpenTelemetry's stable HTTP semantic conventions.
//!
//! Identity (trace id, span id, parent) is decided when the request starts, by
//! `trace::causality` (carried context, same-node peer, same thread); this module fills in the
//! rest.

use std::{borrow::Cow, cell::RefCell, net::SocketAddr, sync::Arc};

use crate::{
    clock::WallClock,
    conn::ConnInfo,
    protocol::{http1::Head, text},
    trace::{
        exchange::{Exchange, Outcome},
        shared_text::{self, Recent},
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanKind {
    Server,
    Client,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    Str(String),
    /// A constant: no allocation per span.
    Static(&'static str),
    /// Text many spans repeat (`trace::shared_text`): a reference count per span.
    Shared(Arc<str>),
    Int(i64),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Static(s) => Some(s),
            Value::Shared(s) => Some(s),
            Value::Int(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// The parent came from another process (context carried in the request).
    pub parent_is_remote: bool,
    pub trace_state: String,
    /// Shared: a service's spans repeat a few names (`trace::shared_text`).
    pub name: Arc<str>,
    pub kind: SpanKind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// Some(description) when the span's status is ERROR.
    pub error: Option<String>,
    /// The answer in a word for people (HTTP status code, SQLSTATE, `OK`): what the console
    /// prints, so no output reads protocol meaning back out of attribute strings.
    pub status: Option<Cow<'static, str>>,
    /// The process that handled it: the resource.
    pub pid: u32,
    /// Its command name, in case the process is gone before its resource is read.
    pub comm: Arc<str>,
}

/// Emptied attribute lists kept for the next spans on this thread: a span's list (~16 entries,
/// 640 bytes) was an allocation and a free per span. Spans are built and encoded on the
/// pipeline's thread, so the list comes back where it is taken.
const SPARE_ATTRIBUTES: usize = 64;

thread_local! {
    static ATTRIBUTES: std::cell::RefCell<Vec<Vec<(&'static str, Value)>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Room a new attribute list starts with: an HTTP span's attributes. A database span needs
/// fewer, and takes the same size so that its list is kept for reuse too.
const ATTRIBUTE_ROOM: usize = 16;

/// An empty attribute list: a spare one when there is.
pub fn attribute_list() -> Vec<(&'static str, Value)> {
    ATTRIBUTES
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(ATTRIBUTE_ROOM))
}

impl SpanRecord {
    /// Drops the span, keeping its attribute list for the next span built on this thread.
    pub fn recycle(mut self) {
        let mut list = std::mem::take(&mut self.attributes);
        list.clear();
        drop(self);
        ATTRIBUTES.with_borrow_mut(|spare| {
            // A list grown far past the usual (many HTTP/2 fields) is freed, not kept.
            if spare.len() < SPARE_ATTRIBUTES
                && (ATTRIBUTE_ROOM..=4 * ATTRIBUTE_ROOM).contains(&list.capacity())
            {
                spare.push(list);
            }
        });
    }

    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| same_text(k, key))
            .map(|(_, v)| v)
    }
}

/// Whether two attribute keys (or label texts) are equal. The RED metrics look up six to eight
/// keys per span and compare a series' labels with them, and the plain comparison called
/// memcmp for every key of the same length on the way (24 calls per HTTP span, 4% of the
/// tracing sink). Keys are literals, which the release build merges, so the key sought is
/// mostly the very same bytes; two different keys mostly differ in their first eight bytes
/// (`http.req`/`http.res`, `server.a`/`server.p`); texts of up to 16 bytes (a method, a
/// scheme, a status) are compared in two words.
#[inline(always)]
pub fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    if std::ptr::eq(a.as_ptr(), b.as_ptr()) {
        return true;
    }
    match (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        (Some(x), Some(y)) if x != y => false,
        // Eight to sixteen bytes: the last eight (overlapping the first) settle it.
        (Some(_), Some(_)) if a.len() <= 16 => a.last_chunk::<8>() == b.last_chunk::<8>(),
        (Some(_), Some(_)) => a == b,
        _ => a.iter().zip(b).all(|(x, y)| x == y),
    }
}

/// What may leave the node.
#[derive(Debug, Clone)]
pub struct Redaction {
    /// Replace every query-string value with `REDACTED` (keys stay: they are low-risk and useful).
    pub query_values: bool,
}

impl Default for Redaction {
    fn default() -> Self {
        Self { query_values: true }
    }
}

pub fn redact_query(query: &str, redaction: &Redaction) -> String {
    if redaction.query_values {
        crate::redact::query(query)
    } else {
        query.to_string()
    }
}

pub trait IdSource {
    fn trace_id(&mut self) -> [u8; 16];
    fn span_id(&mut self) -> [u8; 8];
}

/// Random ids from a per-thread Xoshiro256++ generator seeded from the thread-local CSPRNG. Ids
/// need to be random and uniform (sampling reads the trace id as a number), not secret: the
/// CSPRNG itself (ChaCha12) cost a twentieth of the tracing sink's instructions per request.
/// The OpenTelemetry SDKs use fast generators the same way.
pub struct RandomIds;

thread_local! {
    static IDS: std::cell::RefCell<rand::rngs::SmallRng> =
        std::cell::RefCell::new(rand::SeedableRng::from_rng(&mut rand::rng()));
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::RngCore as _;
    let mut id = [0u8; N];
    loop {
        IDS.with(|r| r.borrow_mut().fill_bytes(&mut id));
        if id != [0; N] {
            return id;
        }
    }
}

impl IdSource for RandomIds {
    fn trace_id(&mut self) -> [u8; 16] {
        random_bytes()
    }
    fn span_id(&mut self) -> [u8; 8] {
        random_bytes()
    }
}

/// A `Host` (`:authority`) value's host and port: `[v6]:port`, `name:port`, `name`.
fn host_and_port(raw: &[u8]) -> Option<(&str, Option<u16>)> {
    let host = text::trim(text::utf8(raw)?);
    if host.is_empty() {
        return None;
    }
    if let Some(rest) = host.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        return Some((addr, tail.strip_prefix(':').and_then(|p| p.parse().ok())));
    }
    match host.bytes().rposition(|b| b == b':') {
        Some(i) => match host[i + 1..].parse::<u16>() {
            Ok(port) => Some((&host[..i], Some(port))),
            Err(_) => Some((host, None)),
        },
        None => Some((host, None)),
    }
}

thread_local! {
    /// The last `Host` value and the shared host and port it gave.
    static HOSTS: RefCell<Recent<(Arc<str>, Option<u16>)>> = const { RefCell::new(Recent::new()) };
    /// The last `User-Agent` value and its shared text.
    static AGENTS: RefCell<Recent<Arc<str>>> = const { RefCell::new(Recent::new()) };
}

/// The request's host (shared) and port, if it names one.
fn shared_host(req: &Head) -> Option<(Arc<str>, Option<u16>)> {
    let raw = req.header("host")?;
    HOSTS.with_borrow_mut(|hosts| {
        hosts.get(raw, |raw| {
            host_and_port(raw).map(|(h, p)| (shared_text::text(h), p))
        })
    })
}

/// An HTTP status code as text: the common ones without an allocation.
pub fn status_text(code: u16) -> Cow<'static, str> {
    const COMMON: [(u16, &str); 16] = [
        (200, "200"),
        (201, "201"),
        (202, "202"),
        (204, "204"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (409, "409"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
    ];
    match COMMON.iter().find(|(c, _)| *c == code) {
        Some((_, text)) => Cow::Borrowed(text),
        None => Cow::Owned(code.to_string()),
    }
}

/// The address as text. IPv4 (nearly every span) without the formatting machinery, which was
/// ~6% of the agent's CPU in a profile of the nginx bench.
pub fn ip_str(addr: SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push((b'0' + octet / 100) as char);
                }
                if octet >= 10 {
                    out.push((b'0' + octet / 10 % 10) as char);
                }
                out.push((b'0' + octet % 10) as char);
            }
            out
        }
        ip => ip.to_string(),
    }
}

/// `scheme://host:port/path?query`, an IPv6 host in brackets. Written piece by piece: through
/// `format!` this one attribute was a sixth of a client span's cost.
fn url_full(scheme: &str, host: &str, port: u16, path: &str, query: Option<&str>) -> String {
    let mut digits = itoa::Buffer::new();
    let port = digits.format(port);
    let ipv6 = host.contains(':');
    let query_len = query.map_or(0, |q| q.len() + 1);
    let mut url = String::with_capacity(
        scheme.len() + 3 + host.len() + 2 + 1 + port.len() + path.len() + query_len,
    );
    url.push_str(scheme);
    url.push_str("://");
    if ipv6 {
        url.push('[');
    }
    url.push_str(host);
    if ipv6 {
        url.push(']');
    }
    url.push(':');
    url.push_str(port);
    url.push_str(path);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// Builds the span of `ex`, handled by the process of `conn` on the `kind` side.
pub fn build(
    ex: &Exchange,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
    redaction: &Redaction,
) -> SpanRecord {
    http(ex, conn, kind, clock, redaction, false)
}

/// Builds the span of `ex`, an HTTP/2 stream that is not a gRPC call.
pub fn build_h2(
    ex: &Exchange,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
    redaction: &Redaction,
) -> SpanRecord {
    http(ex, conn, kind, clock, redaction, true)
}

/// The span of a gRPC call `ex` named `name`, with where the call went and came from; none
/// of HTTP's method, URL, route and status attributes (the path is the method, and the HTTP
/// status is 200 for failed calls too): the caller adds the RPC's, the error and the status.
pub fn rpc_base(
    ex: &Exchange,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
    name: Arc<str>,
) -> SpanRecord {
    let req = &ex.request;
    let mut a = attribute_list();
    a.push(("network.protocol.version", Value::Static("2")));
    let peer_ip = shared_text::ip(conn.remote.ip());
    let (addr, port) = server_address(req, conn, kind, &peer_ip);
    a.push(("server.address", Value::Shared(addr)));
    a.push(("server.port", Value::Int(port.into())));
    if kind == SpanKind::Server {
        a.push(("client.address", client_address(req, &peer_ip)));
    }
    peer_and_agent(&mut a, req, conn, peer_ip);
    record(ex, conn, kind, clock, name, a, None, None)
}

/// `server.address` and `server.port`: the request's `Host` (`:authority`) if it has one,
/// else the server's end of the connection.
#[inline]
fn server_address(
    req: &Head,
    conn: &ConnInfo,
    kind: SpanKind,
    peer_ip: &Arc<str>,
) -> (Arc<str>, u16) {
    let server = match kind {
        SpanKind::Server => conn.local,
        SpanKind::Client => conn.remote,
    };
    match shared_host(req) {
        Some((h, p)) => (h, p.unwrap_or(server.port())),
        None if kind == SpanKind::Server => (shared_text::ip(server.ip()), server.port()),
        None => (peer_ip.clone(), server.port()),
    }
}

/// `s` up to its first `stop` byte. A byte scan: `str` patterns set up a searcher per call.
fn until(s: &str, stop: u8) -> &str {
    &s[..s.bytes().position(|b| b == stop).unwrap_or(s.len())]
}

/// `client.address`: the first `X-Forwarded-For` address, else the connection's peer.
#[inline]
fn client_address(req: &Head, peer_ip: &Arc<str>) -> Value {
    req.header_str("x-forwarded-for")
        .map(|v| text::trim(until(v, b',')))
        .filter(|v| !v.is_empty())
        .map_or_else(
            || Value::Shared(peer_ip.clone()),
            |v| Value::Str(v.to_string()),
        )
}

/// The peer's address and port, and the client's `User-Agent`.
#[inline]
fn peer_and_agent(
    a: &mut Vec<(&'static str, Value)>,
    req: &Head,
    conn: &ConnInfo,
    peer_ip: Arc<str>,
) {
    a.push(("network.peer.address", Value::Shared(peer_ip)));
    a.push(("network.peer.port", Value::Int(conn.remote.port().into())));
    let agent = req
        .header("user-agent")
        .and_then(|raw| AGENTS.with_borrow_mut(|agents| agents.get(raw, shared_text::header_text)));
    if let Some(ua) = agent {
        a.push(("user_agent.original", Value::Shared(ua)));
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn record(
    ex: &Exchange,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
    name: Arc<str>,
    attributes: Vec<(&'static str, Value)>,
    error: Option<String>,
    status: Option<Cow<'static, str>>,
) -> SpanRecord {
    let id = &ex.identity;
    SpanRecord {
        trace_id: id.trace_id,
        span_id: id.span_id,
        parent_span_id: id.parent_span_id,
        parent_is_remote: id.parent_is_remote,
        trace_state: id.trace_state.clone(),
        name,
        kind,
        start_unix_ns: clock.to_unix_ns(ex.start_ns),
        end_unix_ns: clock.to_unix_ns(ex.end_ns.max(ex.start_ns)),
        attributes,
        error,
        status,
        pid: conn.pid,
        comm: conn.comm.clone(),
    }
}

fn http(
    ex: &Exchange,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
    redaction: &Redaction,
    h2: bool,
) -> SpanRecord {
    let req = &ex.request;
    let method = req.method().unwrap_or("_OTHER");
    let target = req.target();
    let (path, query) = match target.bytes().position(|b| b == b'?') {
        Some(i) => (&target[..i], Some(until(&target[i + 1..], b'#'))),
        None => (until(target, b'#'), None),
    };
    let known = req.known_method();
    let (route, name) = shared_text::route_and_name(known.unwrap_or("HTTP"), target);

    let mut a = attribute_list();
    let s = |v: &str| Value::Str(v.to_string());
    match known {
        Some(m) => a.push(("http.request.method", Value::Static(m))),
        None => {
            a.push(("http.request.method", Value::Static("_OTHER")));
            a.push(("http.request.method_original", s(method)));
        }
    }
    // A path without ids is its own route: the route's shared text serves for both.
    let url_path = if *route == *path {
        Value::Shared(route.clone())
    } else {
        s(path)
    };
    a.push(("url.path", url_path));
    if let Some(q) = query {
        a.push(("url.query", Value::Str(redact_query(q, redaction))));
    }
    let scheme = if conn.tls { "https" } else { "http" };
    a.push(("url.scheme", Value::Static(scheme)));
    // No `network.protocol.name`: the conventions ask for it only when it is not `http` (as
    // the OpenTelemetry instrumentations do); it was some 35 of a span's ~450 bytes on the wire.
    let version = match (h2, req.minor_version) {
        (true, _) => "2",
        (false, 0) => "1.0",
        (false, _) => "1.1",
    };
    a.push(("network.protocol.version", Value::Static(version)));
    let peer_ip = shared_text::ip(conn.remote.ip());
    let (addr, port) = server_address(req, conn, kind, &peer_ip);
    match kind {
        SpanKind::Server => {
            a.push(("http.route", Value::Shared(route.clone())));
            a.push(("server.address", Value::Shared(addr)));
            a.push(("server.port", Value::Int(port.into())));
            a.push(("client.address", client_address(req, &peer_ip)));
        }
        SpanKind::Client => {
            a.push(("url.template", Value::Shared(route.clone())));
            // The query as `url.query` has it: redacting it again cost an allocation and a
            // scan.
            let query = a
                .iter()
                .find(|(k, _)| same_text(k, "url.query"))
                .and_then(|(_, v)| v.as_str());
            let full = url_full(scheme, &addr, port, path, query);
            a.push(("url.full", Value::Str(full)));
            a.push(("server.address", Value::Shared(addr)));
            a.push(("server.port", Value::Int(port.into())));
        }
    }
    peer_and_agent(&mut a, req, conn, peer_ip);
    let status = ex.response.as_ref().and_then(Head::status);
    if let Some(code) = status {
        a.push(("http.response.status_code", Value::Int(code.into())));
    }
    let error = match (ex.outcome, status) {
        (Outcome::Timeout, _) => Some("timeout".to_string()),
        (Outcome::Closed, None) => Some("connection_closed".to_string()),
        (Outcome::Closed | Outcome::Incomplete, Some(_)) => Some("response_incomplete".to_string()),
        (Outcome::Complete, Some(code))
            if code >= 500 || (kind == SpanKind::Client && code >= 400) =>
        {
            Some(code.to_string())
        }
        _ => None,
    };
    if let Some(e) = &error {
        a.push(("error.type", Value::Str(e.clone())));
    }

    let status = status.map(status_text);
    record(ex, conn, kind, clock, name, a, error, status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decode::{ConnKey, Role},
        protocol::http1::{HeadParse, parse_request, parse_response},
    };

    fn req(raw: &str) -> Head {
        match parse_request(raw.as_bytes()) {
            HeadParse::Parsed(h, _) => h,
            other => panic!("{other:?}"),
        }
    }
    fn resp(raw: &str) -> Head {
        match parse_response(raw.as_bytes()) {
            HeadParse::Parsed(h, _) => h,
            other => panic!("{other:?}"),
        }
    }
    fn conn() -> ConnInfo {
        ConnInfo {
            key: ConnKey {
                sk: 1,
                generation: 1,
            },
            pid: 77,
            comm: "srv".into(),
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:50000".parse().unwrap(),
            role: Role::Server,
            protocol: 1,
            midstream: false,
            tls: false,
        }
    }
    fn exchange(request: &str, response: Option<&str>, outcome: Outcome) -> Exchange {
        Exchange {
            identity: crate::trace::exchange::Identity {
                trace_id: [1; 16],
                span_id: [2; 8],
                parent_span_id: None,
                parent_is_remote: false,
                trace_state: String::new(),
                carried: None,
                local_parent: false,
                awaits_caller: false,
                carried_sampled: None,
            },
            started: crate::trace::exchange::RequestStart {
                tid: 1,
                ts_ns: 100,
                ordinal: 0,
            },
            request: req(request),
            response: response.map(resp),
            start_ns: 100,
            end_ns: 300,
            outcome,
        }
    }
    #[test]
    fn an_encoded_span_leaves_its_attribute_list_for_the_next_span_http_or_database() {
        let ex = exchange(
            "GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
            Some("HTTP/1.1 200 OK\r\n\r\n"),
            Outcome::Complete,
        );
        let span = || {
            build(
                &ex,
                &conn(),
                SpanKind::Server,
                &WallClock::default(),
                &Redaction::default(),
            )
        };
        ATTRIBUTES.with_borrow_mut(Vec::clear);
        let http = span();
        let list = http.attributes.as_ptr();
        http.recycle();
        let again = attribute_list();
        assert_eq!(again.as_ptr(), list, "the HTTP span's list");
        // A database span's list, made new (nothing spare) and holding a dozen attributes.
        ATTRIBUTES.with_borrow_mut(Vec::clear);
        let mut fresh = attribute_list();
        fresh.extend((0..12).map(|_| ("db.system.name", Value::Static("postgresql"))));
        let list = fresh.as_ptr();
        SpanRecord {
            attributes: fresh,
            ..span()
        }
        .recycle();
        let kept = attribute_list();
        assert_eq!(kept.as_ptr(), list, "the database span's list");
        assert!(kept.is_empty());
    }

    #[test]
    fn keys_compare_by_content_wherever_they_lie() {
        let keys = [
            "b3",
            "error.type",
            "url.scheme",
            "http.route",
            "server.address",
            "server.port",
            "http.request.method",
            "http.response.status_code",
            "http.request.methoD",
            "xttp.request.method",
            "GET",
            "PUT",
            "",
            "1.1",
            "sixteen bytes!!!",
            "sixteen bytes!!?",
            "?ixteen bytes!!!",
            "nine byte",
            "nine bytf",
        ];
        for a in keys {
            for b in keys {
                // Copies: the same text at another address.
                let (a2, b2) = (a.to_string(), b.to_string());
                assert_eq!(super::same_text(a, b), a == b, "{a} {b}");
                assert_eq!(super::same_text(&a2, &b2), a == b, "{a} {b} (copies)");
                assert_eq!(super::same_text(a, &b2), a == b, "{a} {b} (one copy)");
            }
        }
    }

    fn str_attr(s: &SpanRecord, k: &str) -> String {
        match s.attr(k) {
            Some(Value::Int(i)) => i.to_string(),
            Some(v) => v.as_str().unwrap_or_default().to_string(),
            None => String::new(),
        }
    }

    #[test]
    fn server_span_attributes_follow_the_conventions() {
        let ex = exchange(
            "GET /users/42?token=s3cret&x=1 HTTP/1.1\r\nHost: api.local:8080\r\nUser-Agent: curl/8\r\nAuthorization: Bearer abc\r\n\r\n",
            Some("HTTP/1.1 200 OK\r\n\r\n"),
            Outcome::Complete,
        );
        let s = build(
            &ex,
            &conn(),
            SpanKind::Server,
            &WallClock::new(),
            &Redaction::default(),
        );
        assert_eq!(&*s.name, "GET /users/{id}");
        assert_eq!(str_attr(&s, "http.request.method"), "GET");
        assert_eq!(str_attr(&s, "url.path"), "/users/42");
        assert_eq!(str_attr(&s, "url.query"), "token=REDACTED&x=REDACTED");
        assert_eq!(str_attr(&s, "http.route"), "/users/{id}");
        assert_eq!(str_attr(&s, "server.address"), "api.local");
        assert_eq!(str_attr(&s, "server.port"), "8080");
        assert_eq!(str_attr(&s, "client.address"), "127.0.0.1");
        assert_eq!(str_attr(&s, "network.peer.port"), "50000");
        assert_eq!(str_attr(&s, "network.protocol.version"), "1.1");
        assert!(
            s.attr("network.protocol.name").is_none(),
            "only when not http"
        );
        assert_eq!(str_attr(&s, "user_agent.original"), "curl/8");
        assert_eq!(str_attr(&s, "http.response.status_code"), "200");
        assert_eq!(s.error, None);
        assert!(s.parent_span_id.is_none());
        let everything = format!("{s:?}");
        assert!(
            !everything.contains("s3cret") && !everything.contains("Bearer"),
            "{everything}"
        );
    }

    #[test]
    fn errors_by_side_and_outcome() {
        let c = conn();
        let clock = WallClock::new();
        let r = Redaction::default();
        let e404 = exchange(
            "GET / HTTP/1.1\r\n\r\n",
            Some("HTTP/1.1 404 Not Found\r\n\r\n"),
            Outcome::Complete,
        );
        assert_eq!(build(&e404, &c, SpanKind::Server, &clock, &r).error, None);
        assert_eq!(
            build(&e404, &c, SpanKind::Client, &clock, &r)
                .error
                .as_deref(),
            Some("404")
        );
        let e503 = exchange(
            "GET / HTTP/1.1\r\n\r\n",
            Some("HTTP/1.1 503 Busy\r\n\r\n"),
            Outcome::Complete,
        );
        assert_eq!(
            build(&e503, &c, SpanKind::Server, &clock, &r)
                .error
                .as_deref(),
            Some("503")
        );
        let timeout = exchange("GET / HTTP/1.1\r\n\r\n", None, Outcome::Timeout);
        assert_eq!(
            build(&timeout, &c, SpanKind::Server, &clock, &r)
                .error
                .as_deref(),
            Some("timeout")
        );
        let closed = exchange(
            "GET / HTTP/1.1\r\n\r\n",
            Some("HTTP/1.1 200 OK\r\n\r\n"),
            Outcome::Closed,
        );
        assert_eq!(
            build(&closed, &c, SpanKind::Server, &clock, &r)
                .error
                .as_deref(),
            Some("response_incomplete")
        );
    }

    #[test]
    fn addresses_print_as_the_standard_library_prints_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.9",
            "127.0.0.1",
            "192.168.100.255",
            "8.80.108.1",
            "::1",
            "fe80::1",
        ] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 1);
            assert_eq!(ip_str(addr), addr.ip().to_string());
        }
    }

    #[test]
    fn client_spans_carry_the_full_url_redacted() {
        let ex = exchange(
            "GET /a/1?key=v HTTP/1.1\r\nHost: up.svc:9000\r\n\r\n",
            Some("HTTP/1.1 200 OK\r\n\r\n"),
            Outcome::Complete,
        );
        let s = build(
            &ex,
            &conn(),
            SpanKind::Client,
            &WallClock::new(),
            &Redaction::default(),
        );
        assert_eq!(
            str_attr(&s, "url.full"),
            "http://up.svc:9000/a/1?key=REDACTED"
        );
        assert_eq!(str_attr(&s, "server.port"), "9000");
        assert_eq!(&*s.name, "GET /a/{id}");
    }

    #[test]
    fn a_full_url_brackets_an_ipv6_host_and_keeps_an_empty_query() {
        assert_eq!(
            url_full("https", "fe80::1", 8443, "/x", None),
            "https://[fe80::1]:8443/x"
        );
        assert_eq!(
            url_full("http", "10.0.0.1", 80, "/", Some("")),
            "http://10.0.0.1:80/?"
        );
    }
}
