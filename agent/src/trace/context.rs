//! Trace context carried in request headers: W3C `traceparent`/`tracestate`, B3 (single `b3`
//! header and the `X-B3-*` set) and Jaeger `uber-trace-id`. Malformed values are ignored (the
//! request then starts a new trace), never trusted partially.

use crate::protocol::http1::Head;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub trace_id: [u8; 16],
    /// The caller's span: parent of the span the agent builds for this request.
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub trace_state: String,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A non-zero id of N bytes from up to 2N hex digits, left-padded (B3 and Jaeger allow 64-bit
/// trace ids and unpadded ids).
fn padded_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.is_empty() || s.len() > N * 2 {
        return None;
    }
    let padded = format!("{s:0>width$}", width = N * 2);
    hex_bytes::<N>(&padded).filter(|id| id.iter().any(|&b| b != 0))
}

fn trace_id(s: &str) -> Option<[u8; 16]> {
    padded_id(s)
}

fn span_id(s: &str) -> Option<[u8; 8]> {
    padded_id(s)
}

/// `00-<32 hex>-<16 hex>-<2 hex>`; future versions may append fields.
pub fn parse_traceparent(v: &str) -> Option<Carried> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" {
        return None;
    }
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    Some(Carried {
        trace_id: trace_id(trace)?,
        span_id: span_id(span)?,
        sampled: u8::from_str_radix(flags, 16).ok()? & 1 == 1,
        trace_state: String::new(),
    })
}

/// `{trace}-{span}[-{sampled}[-{parent}]]`; a lone `0`/`1`/`d` carries no ids.
pub fn parse_b3_single(v: &str) -> Option<Carried> {
    let mut parts = v.trim().split('-');
    let trace = trace_id(parts.next()?)?;
    let span = span_id(parts.next()?)?;
    let sampled = !matches!(parts.next(), Some("0"));
    Some(Carried {
        trace_id: trace,
        span_id: span,
        sampled,
        trace_state: String::new(),
    })
}

/// `{trace}:{span}:{parent}:{flags}` (hex; `%3A` when URL-encoded).
pub fn parse_uber(v: &str) -> Option<Carried> {
    let v = v.trim().replace("%3A", ":").replace("%3a", ":");
    let parts: Vec<&str> = v.split(':').collect();
    let [trace, span, _parent, flags] = parts.as_slice() else {
        return None;
    };
    Some(Carried {
        trace_id: trace_id(trace)?,
        span_id: span_id(span)?,
        sampled: u8::from_str_radix(flags, 16)
            .ok()
            .is_some_and(|f| f & 1 == 1),
        trace_state: String::new(),
    })
}

/// The context a request carries, W3C first.
pub fn extract(head: &Head) -> Option<Carried> {
    // Most requests to a service nobody instrumented carry none: one pass over the kept headers
    // then replaces the five lookups below (each a pass).
    let carries = head.headers.iter().any(|(name, _)| {
        matches!(
            name,
            "traceparent" | "b3" | "x-b3-traceid" | "x-b3-spanid" | "uber-trace-id"
        )
    });
    if !carries {
        return None;
    }
    if let Some(mut c) = head.header_str("traceparent").and_then(parse_traceparent) {
        c.trace_state = head
            .header_str("tracestate")
            .unwrap_or_default()
            .to_string();
        return Some(c);
    }
    if let Some(c) = head.header_str("b3").and_then(parse_b3_single) {
        return Some(c);
    }
    if let (Some(t), Some(s)) = (
        head.header_str("x-b3-traceid"),
        head.header_str("x-b3-spanid"),
    ) {
        return Some(Carried {
            trace_id: trace_id(t)?,
            span_id: span_id(s)?,
            sampled: head.header_str("x-b3-sampled") != Some("0"),
            trace_state: String::new(),
        });
    }
    head.header_str("uber-trace-id").and_then(parse_uber)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http1::{HeadParse, parse_request};

    fn head(extra: &str) -> Head {
        let raw = format!("GET / HTTP/1.1\r\n{extra}\r\n");
        match parse_request(raw.as_bytes()) {
            HeadParse::Parsed(h, _) => h,
            other => panic!("{other:?}"),
        }
    }

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";

    fn ids(c: &Carried) -> (String, String) {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        (hex(&c.trace_id), hex(&c.span_id))
    }

    #[test]
    fn w3c_traceparent_and_tracestate() {
        let c = extract(&head(&format!(
            "traceparent: 00-{T}-{S}-01\r\ntracestate: k=v\r\n"
        )))
        .unwrap();
        assert_eq!(ids(&c), (T.into(), S.into()));
        assert!(c.sampled);
        assert_eq!(c.trace_state, "k=v");
    }

    #[test]
    fn b3_single_and_multi_and_jaeger() {
        let c = extract(&head(&format!("b3: {T}-{S}-1\r\n"))).unwrap();
        assert_eq!(ids(&c), (T.into(), S.into()));
        let c = extract(&head(&format!(
            "X-B3-TraceId: a3ce929d0e0e4736\r\nX-B3-SpanId: {S}\r\nX-B3-Sampled: 0\r\n"
        )))
        .unwrap();
        assert_eq!(ids(&c).0, "0000000000000000a3ce929d0e0e4736");
        assert!(!c.sampled);
        let c = extract(&head(&format!("uber-trace-id: {T}%3A{S}%3A0%3A1\r\n"))).unwrap();
        assert_eq!(ids(&c), (T.into(), S.into()));
    }

    #[test]
    fn malformed_or_zero_ids_are_ignored() {
        for bad in [
            format!("traceparent: 00-{T}-{S}"),
            format!("traceparent: ff-{T}-{S}-01"),
            format!("traceparent: 00-{}-{S}-01", "0".repeat(32)),
            format!("traceparent: 00-{T}-{}-01", "0".repeat(16)),
            format!("traceparent: 00-{T}zz-{S}-01"),
            format!("traceparent: 00-{T}-{S}-01-extra"),
            "b3: 1".to_string(),
            "uber-trace-id: nope".to_string(),
        ] {
            assert_eq!(extract(&head(&format!("{bad}\r\n"))), None, "{bad}");
        }
    }
}
