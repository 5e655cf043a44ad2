//! Decides on a connection's first payload whether any parser wants it, so that traffic nobody
//! parses costs one map lookup per syscall from then on.

use agent_common::conn::{PROTO_HTTP1, PROTO_HTTP2, PROTO_UNKNOWN};

/// Little-endian u32 of 4 ASCII bytes, as a load from the payload yields it.
const fn tag(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

/// Protocol of a stream starting with `head` (its first 4 bytes, little-endian), or
/// `PROTO_UNKNOWN`. Requests (either side sees them first on a fresh connection) and, for
/// connections joined mid-stream, HTTP/1 responses.
#[inline(always)]
pub fn classify(head: u32) -> u8 {
    const HTTP1: [u32; 10] = [
        tag(b"GET "),
        tag(b"POST"),
        tag(b"PUT "),
        tag(b"HEAD"),
        tag(b"DELE"),
        tag(b"PATC"),
        tag(b"OPTI"),
        tag(b"CONN"),
        tag(b"TRAC"),
        tag(b"HTTP"),
    ];
    if head == tag(b"PRI ") {
        return PROTO_HTTP2;
    }
    let mut i = 0;
    while i < HTTP1.len() {
        if HTTP1[i] == head {
            return PROTO_HTTP1;
        }
        i += 1;
    }
    PROTO_UNKNOWN
}
