//! Export failures in the words an operator acts on: the URL actually used, the protocol as they
//! wrote it, and the cause (name resolution, refused connection, TLS, HTTP status, timeout) with
//! a hint when the likely mistake is the protocol (http/protobuf sent to a gRPC port or back).

use super::otlp_settings::Protocol;

/// Every message in an error's source chain, each once (libraries often repeat their cause).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// One line naming the cause of a failed attempt at `url`.
pub fn explain(protocol: Protocol, url: &str, detail: &str) -> String {
    // reqwest repeats the URL the line already starts with.
    let detail = match detail.strip_prefix("error sending request for url (") {
        Some(rest) => rest.split_once("): ").map_or(detail, |(_, cause)| cause),
        None => detail,
    };
    let d = detail.to_ascii_lowercase();
    let cause = if d.contains("dns error")
        || d.contains("failed to lookup address")
        || d.contains("name or service not known")
        || d.contains("name resolution")
    {
        format!("cannot resolve the host name ({detail})")
    } else if d.contains("connection refused") {
        "connection refused: nothing listens there (is the collector running, and on this port?)"
            .to_string()
    } else if url.starts_with("https://")
        && (d.contains("corrupt message") || d.contains("invalidcontenttype"))
    {
        format!(
            "TLS failed: the endpoint does not answer in TLS; if it is plain, use http:// ({detail})"
        )
    } else if d.contains("certificate")
        || d.contains("tls")
        || d.contains("ssl")
        || d.contains("handshake")
    {
        format!("TLS failed ({detail})")
    } else if d.contains("timed out") || d.contains("timeout") || d.contains("deadline") {
        format!("no answer within the timeout (OTEL_EXPORTER_OTLP_TIMEOUT) ({detail})")
    } else {
        detail.to_string()
    };
    let mismatch = match protocol {
        // An HTTP/1.1 request to an HTTP/2-only (gRPC) server: it answers with an HTTP/2 frame
        // or hangs up.
        Protocol::HttpProtobuf => {
            d.contains("connection closed before message completed")
                || d.contains("invalid http version")
                || d.contains("http2")
                || d.contains("invalid status line")
                || d.contains("received unexpected message from connection")
        }
        // An HTTP/2 preface to an HTTP/1.1 server: it answers with a status line, which is not
        // a frame.
        Protocol::Grpc => {
            d.contains("h2 protocol error")
                || d.contains("frame with invalid size")
                || d.contains("http/1")
                || d.contains("protocol error")
                || d.contains("broken pipe")
                || d.contains("connection reset")
        }
    };
    let hint = match (mismatch, protocol) {
        (true, Protocol::HttpProtobuf) => {
            "; this looks like a gRPC port: use --otlp-protocol grpc (OTLP/gRPC is usually on 4317, OTLP/HTTP on 4318)"
        }
        (true, Protocol::Grpc) => {
            "; this looks like an HTTP/1 port: use --otlp-protocol http/protobuf (OTLP/HTTP is usually on 4318, OTLP/gRPC on 4317)"
        }
        _ => "",
    };
    format!("{url} ({}): {cause}{hint}", protocol.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_named_with_the_url_and_protocol() {
        let e = explain(
            Protocol::HttpProtobuf,
            "http://nope.invalid:4318/v1/traces",
            "error sending request: client error (Connect): dns error: failed to lookup address information: Name or service not known",
        );
        assert!(
            e.starts_with(
                "http://nope.invalid:4318/v1/traces (http/protobuf): cannot resolve the host name"
            ),
            "{e}"
        );
        let e = explain(
            Protocol::Grpc,
            "http://127.0.0.1:9",
            "tcp connect error: Connection refused (os error 111)",
        );
        assert!(e.contains("(grpc): connection refused"), "{e}");
        let e = explain(
            Protocol::HttpProtobuf,
            "http://127.0.0.1:4317/v1/traces",
            "error sending request: client error (SendRequest): connection closed before message completed",
        );
        assert!(
            e.ends_with(
                "use --otlp-protocol grpc (OTLP/gRPC is usually on 4317, OTLP/HTTP on 4318)"
            ),
            "{e}"
        );
        let e = explain(
            Protocol::Grpc,
            "http://127.0.0.1:4318",
            "h2 protocol error: http2 error",
        );
        assert!(e.contains("use --otlp-protocol http/protobuf"), "{e}");
        let e = explain(
            Protocol::Grpc,
            "https://127.0.0.1:4317",
            "gRPC status Unavailable: received corrupt message of type InvalidContentType",
        );
        assert!(
            e.contains("(grpc): TLS failed: the endpoint does not answer in TLS"),
            "{e}"
        );
        let e = explain(
            Protocol::HttpProtobuf,
            "https://c/v1/traces",
            "client error (Connect): invalid peer certificate: UnknownIssuer",
        );
        assert!(
            e.contains("(http/protobuf): TLS failed (client error"),
            "{e}"
        );
        let e = explain(
            Protocol::HttpProtobuf,
            "http://c/v1/traces",
            "HTTP 503 Service Unavailable",
        );
        assert_eq!(
            e,
            "http://c/v1/traces (http/protobuf): HTTP 503 Service Unavailable"
        );
    }

    #[test]
    fn a_chain_lists_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(chain(&io), "Connection refused");
    }
}
