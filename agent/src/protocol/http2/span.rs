//! Spans of HTTP/2 streams. gRPC calls (content-type application/grpc) follow the RPC semantic
//! conventions of semconv v1.45 (RPC stable): name `package.Service/Method`, `rpc.system.name`
//! = grpc, fully qualified `rpc.method`, `rpc.response.status_code` as the code's name, status
//! ERROR by the convention's rules for each side. Plain HTTP/2 requests are HTTP spans, as
//! HTTP/1's, with `network.protocol.version` = 2.

use std::{borrow::Cow, sync::Arc};

use super::session::{Grpc, H2Exchange};
use crate::{
    clock::WallClock,
    conn::ConnInfo,
    trace::{
        exchange::Outcome,
        span::{self, Redaction, SpanKind, SpanRecord, Value},
    },
};

/// gRPC status codes by number (grpc/doc/statuscodes.md).
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Codes that are errors on the server side: the server's own failures, not the caller's.
const SERVER_ERRORS: [u32; 6] = [2, 4, 12, 13, 14, 15];

pub fn code_name(code: u32) -> Option<&'static str> {
    CODES.get(code as usize).copied()
}

pub fn build(
    x: &H2Exchange,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
    redaction: &Redaction,
) -> SpanRecord {
    match &x.grpc {
        Some(g) => grpc(x, g, conn, kind, clock),
        None => span::build_h2(&x.exchange, conn, kind, clock, redaction),
    }
}

/// A gRPC call's span: RPC attributes where an HTTP span has its method, URL, route and
/// status.
fn grpc(
    x: &H2Exchange,
    g: &Grpc,
    conn: &ConnInfo,
    kind: SpanKind,
    clock: &WallClock,
) -> SpanRecord {
    let path = x.exchange.request.target();
    // `/package.Service/Method`; anything else is not a method name a span may carry.
    // Shared: a service serves a few methods, and the name and the RED labels repeat it.
    let method = path
        .strip_prefix('/')
        .filter(|m| is_method(m))
        .map(crate::trace::shared_text::text);
    let name = method.clone().unwrap_or_else(|| GRPC.with(Arc::clone));
    let mut s = span::rpc_base(&x.exchange, conn, kind, clock, name);
    s.attributes
        .push(("rpc.system.name", Value::Static("grpc")));
    match method {
        Some(m) => s.attributes.push(("rpc.method", Value::Shared(m))),
        None => s.attributes.push(("rpc.method", Value::Static("_OTHER"))),
    }
    let code = g.status;
    if let Some(name) = code.and_then(code_name) {
        s.attributes
            .push(("rpc.response.status_code", Value::Static(name)));
    }
    let error = match (x.exchange.outcome, code) {
        (_, Some(0)) => None,
        (_, Some(c)) if kind == SpanKind::Client || SERVER_ERRORS.contains(&c) => {
            Some(code_name(c).map_or_else(|| c.to_string(), str::to_string))
        }
        (_, Some(_)) => None,
        (Outcome::Timeout, None) => Some("timeout".to_string()),
        // Reset, refused or closed before any status: the call did not finish.
        (_, None) => Some("CANCELLED".to_string()),
    };
    if let Some(e) = &error {
        s.attributes.push(("error.type", Value::Str(e.clone())));
    }
    s.error = error;
    s.status = code.map(|c| code_name(c).map_or_else(|| c.to_string().into(), Cow::Borrowed));
    s
}

/// `Service/Method`: exactly one `/` and no query. One pass over the bytes: splitting and
/// searching by `char` set up a searcher per call (2% of a call's instructions).
fn is_method(m: &str) -> bool {
    let (mut slashes, mut query) = (0u32, false);
    for b in m.bytes() {
        slashes += u32::from(b == b'/');
        query |= b == b'?';
    }
    slashes == 1 && !query
}

thread_local! {
    /// The name of a call whose path is not a method's.
    static GRPC: Arc<str> = Arc::from("grpc");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conn::ConnInfo,
        decode::{ConnKey, Role},
        protocol::http1::Head,
        trace::exchange::{Exchange, Identity, RequestStart},
    };

    fn exchange(path: &str, status: Option<u32>, outcome: Outcome) -> H2Exchange {
        H2Exchange {
            exchange: Exchange {
                identity: Identity::unexported(),
                started: RequestStart {
                    tid: 1,
                    ts_ns: 0,
                    ordinal: 1,
                },
                request: Head::request(
                    "POST",
                    path,
                    [
                        ("host", &b"orders:50051"[..]),
                        ("content-type", &b"application/grpc"[..]),
                    ],
                ),
                response: Some(Head::response(200, [])),
                start_ns: 0,
                end_ns: 1000,
                outcome,
            },
            grpc: Some(Grpc {
                status,
                ..Grpc::default()
            }),
            stream_id: 1,
        }
    }

    fn conn() -> ConnInfo {
        ConnInfo {
            key: ConnKey {
                sk: 1,
                generation: 1,
            },
            pid: 1,
            comm: "c".into(),
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:50051".parse().unwrap(),
            role: Role::Client,
            protocol: 2,
            midstream: false,
            tls: false,
        }
    }

    fn attr<'a>(s: &'a SpanRecord, k: &str) -> Option<&'a str> {
        s.attributes
            .iter()
            .find(|(n, _)| *n == k)
            .and_then(|(_, v)| v.as_str())
    }

    #[test]
    fn grpc_calls_follow_the_rpc_conventions() {
        let clock = WallClock::new();
        let r = Redaction::default();
        let ok = build(
            &exchange("/shop.v1.Orders/Get", Some(0), Outcome::Complete),
            &conn(),
            SpanKind::Client,
            &clock,
            &r,
        );
        assert_eq!(&*ok.name, "shop.v1.Orders/Get");
        assert_eq!(attr(&ok, "rpc.system.name"), Some("grpc"));
        assert_eq!(attr(&ok, "rpc.method"), Some("shop.v1.Orders/Get"));
        assert_eq!(attr(&ok, "rpc.response.status_code"), Some("OK"));
        assert_eq!(attr(&ok, "network.protocol.version"), Some("2"));
        assert_eq!(attr(&ok, "server.address"), Some("orders"));
        assert_eq!(attr(&ok, "url.path"), None);
        assert_eq!(ok.error, None);
        // Where the call went and came from, as an HTTP span has it; nothing of HTTP's method,
        // URL, route or status.
        let keys = |s: &SpanRecord| s.attributes.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        let mut want = vec![
            "network.protocol.version",
            "server.address",
            "server.port",
            "network.peer.address",
            "network.peer.port",
            "rpc.system.name",
            "rpc.method",
            "rpc.response.status_code",
        ];
        assert_eq!(keys(&ok), want);
        let x = exchange("/shop.v1.Orders/Get", Some(0), Outcome::Complete);
        want.insert(3, "client.address");
        assert_eq!(
            keys(&build(&x, &conn(), SpanKind::Server, &clock, &r)),
            want
        );

        // NOT_FOUND is the caller's error, not the server's.
        let x = exchange("/shop.v1.Orders/Get", Some(5), Outcome::Complete);
        let client = build(&x, &conn(), SpanKind::Client, &clock, &r);
        assert_eq!(client.error.as_deref(), Some("NOT_FOUND"));
        assert_eq!(attr(&client, "error.type"), Some("NOT_FOUND"));
        let server = build(&x, &conn(), SpanKind::Server, &clock, &r);
        assert_eq!(server.error, None);
        assert_eq!(server.status.as_deref(), Some("NOT_FOUND"));
        // INTERNAL is an error on both sides.
        let x = exchange("/shop.v1.Orders/Get", Some(13), Outcome::Complete);
        let server = build(&x, &conn(), SpanKind::Server, &clock, &r);
        assert_eq!(server.error.as_deref(), Some("INTERNAL"));
        // No status at all: cancelled (reset) or timed out.
        let x = exchange("/shop.v1.Orders/Slow", None, Outcome::Closed);
        assert_eq!(
            build(&x, &conn(), SpanKind::Client, &clock, &r)
                .error
                .as_deref(),
            Some("CANCELLED")
        );
        // A path that is no method name.
        let x = exchange("/not-grpc", Some(0), Outcome::Complete);
        let s = build(&x, &conn(), SpanKind::Client, &clock, &r);
        assert_eq!(attr(&s, "rpc.method"), Some("_OTHER"));
        assert_eq!(&*s.name, "grpc");
    }
}
