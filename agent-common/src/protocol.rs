//! The protocols Loupe knows: explicit, never-reused ids (also the `protocol` label of metrics),
//! and the kernel prefilter rows generated from this one list.
//!
//! The prefilter is deliberately loose: it only decides whether a connection's first payload
//! *could* be one of the wanted protocols, so that traffic nobody parses costs one map lookup
//! per syscall. User space decides authoritatively (agent/src/protocol/detect.rs) and writes an
//! `ignored` verdict back when no parser wants the connection after all.

pub const PROTO_UNKNOWN: u8 = 0;
pub const PROTO_HTTP1: u8 = 1;
pub const PROTO_HTTP2: u8 = 2;
pub const PROTO_POSTGRES: u8 = 3;
pub const PROTO_MYSQL: u8 = 4;
pub const PROTO_REDIS: u8 = 5;
/// TLS records: no parser of their own; the connection waits for its plaintext (uprobes) or is
/// counted as unhooked (agent/src/tls).
pub const PROTO_TLS: u8 = 6;

/// Ids are below this (they index per-protocol counters and `proto_bit`).
pub const PROTO_COUNT: usize = 7;

/// Metric label / attribute value of each id (`PROTO_NAMES[id]`).
pub const PROTO_NAMES: [&str; PROTO_COUNT] = [
    "unknown",
    "http1",
    "http2",
    "postgresql",
    "mysql",
    "redis",
    "tls",
];

// Every id has a bit in the u32 `LoupeConfig::protocols` mask.
const _: () = assert!(PROTO_COUNT <= 32);

/// Bit in `LoupeConfig::protocols` for a `PROTO_*` value.
pub const fn proto_bit(proto: u8) -> u32 {
    1 << proto
}

/// One prefilter signature over a stream's first 8 bytes, loaded little-endian (bytes past the
/// captured length read as zero): `(head & mask) == value` and at least `min_len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefilterRow {
    pub protocol: u8,
    pub min_len: u8,
    pub mask: u64,
    pub value: u64,
}

/// Pattern byte that matches anything.
const ANY: i16 = -1;

/// A row from up to 8 pattern bytes (`ANY` for "don't care").
const fn row(protocol: u8, min_len: u8, pattern: &[i16]) -> PrefilterRow {
    let mut mask = 0u64;
    let mut value = 0u64;
    let mut i = 0;
    while i < pattern.len() && i < 8 {
        if pattern[i] >= 0 {
            mask |= 0xff << (i * 8);
            value |= ((pattern[i] as u64) & 0xff) << (i * 8);
        }
        i += 1;
    }
    PrefilterRow {
        protocol,
        min_len,
        mask,
        value,
    }
}

const fn ascii4(protocol: u8, s: &[u8; 4]) -> PrefilterRow {
    row(
        protocol,
        4,
        &[s[0] as i16, s[1] as i16, s[2] as i16, s[3] as i16],
    )
}

const fn c(b: u8) -> i16 {
    b as i16
}

/// Every signature, in the order the kernel tries them. Requests come first: either side of a
/// fresh connection sees the client's first message (MySQL: the server's greeting). Response
/// rows are for connections joined mid-stream, whose next payload may be an answer.
pub const PREFILTER: [PrefilterRow; 40] = [
    // HTTP/1 request methods, and a response status line (joined mid-stream).
    ascii4(PROTO_HTTP1, b"GET "),
    ascii4(PROTO_HTTP1, b"POST"),
    ascii4(PROTO_HTTP1, b"PUT "),
    ascii4(PROTO_HTTP1, b"HEAD"),
    ascii4(PROTO_HTTP1, b"DELE"),
    ascii4(PROTO_HTTP1, b"PATC"),
    ascii4(PROTO_HTTP1, b"OPTI"),
    ascii4(PROTO_HTTP1, b"CONN"),
    ascii4(PROTO_HTTP1, b"TRAC"),
    ascii4(PROTO_HTTP1, b"HTTP"),
    // The HTTP/2 client preface.
    ascii4(PROTO_HTTP2, b"PRI "),
    // PostgreSQL StartupMessage (protocol 3.x), SSLRequest and GSSENCRequest: length, then code.
    row(PROTO_POSTGRES, 8, &[0, ANY, ANY, ANY, 0, 3, ANY, ANY]),
    row(PROTO_POSTGRES, 8, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]),
    row(PROTO_POSTGRES, 8, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]),
    // PostgreSQL frontend messages on a pooled connection: tag, then a length below 64 KiB.
    row(PROTO_POSTGRES, 5, &[c(b'Q'), 0, 0]),
    row(PROTO_POSTGRES, 5, &[c(b'P'), 0, 0]),
    row(PROTO_POSTGRES, 5, &[c(b'B'), 0, 0]),
    // ... and backend answers: ReadyForQuery (always 5 long), RowDescription, CommandComplete.
    row(PROTO_POSTGRES, 5, &[c(b'Z'), 0, 0, 0, 5]),
    row(PROTO_POSTGRES, 5, &[c(b'T'), 0, 0]),
    row(PROTO_POSTGRES, 5, &[c(b'C'), 0, 0, 0]),
    // MySQL: the server's greeting (sequence 0, protocol 10), then client commands at sequence 0
    // with a payload below 64 KiB: COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_PING.
    row(PROTO_MYSQL, 5, &[ANY, ANY, 0, 0, 0x0a]),
    row(PROTO_MYSQL, 5, &[ANY, ANY, 0, 0, 0x03]),
    row(PROTO_MYSQL, 5, &[ANY, ANY, 0, 0, 0x16]),
    row(PROTO_MYSQL, 5, &[ANY, ANY, 0, 0, 0x17]),
    row(PROTO_MYSQL, 5, &[0x01, 0, 0, 0, 0x0e]),
    // Redis: a RESP array (every command a client library sends), then replies.
    row(PROTO_REDIS, 4, &[c(b'*')]),
    row(PROTO_REDIS, 3, &[c(b'+')]),
    row(PROTO_REDIS, 3, &[c(b'-')]),
    row(PROTO_REDIS, 3, &[c(b':')]),
    row(PROTO_REDIS, 4, &[c(b'$')]),
    row(PROTO_REDIS, 4, &[c(b'%')]),
    // HTTP/2 frames of a connection joined mid-stream (length below 64 KiB, stream id below
    // 2^24): SETTINGS, HEADERS, DATA, WINDOW_UPDATE, PING, RST_STREAM, GOAWAY. Loose on purpose;
    // user space checks several frames in a row before it believes them.
    row(PROTO_HTTP2, 8, &[0, 0, ANY, 4, ANY, 0, 0, 0]),
    row(PROTO_HTTP2, 8, &[0, ANY, ANY, 1, ANY, 0]),
    row(PROTO_HTTP2, 8, &[0, ANY, ANY, 0, ANY, 0]),
    row(PROTO_HTTP2, 8, &[0, 0, 4, 8, 0]),
    row(PROTO_HTTP2, 8, &[0, 0, 8, 6, ANY, 0, 0, 0]),
    row(PROTO_HTTP2, 8, &[0, 0, 4, 3, 0, 0]),
    row(PROTO_HTTP2, 8, &[0, 0, ANY, 7, 0, 0, 0, 0]),
    // TLS: a handshake record (ClientHello on a fresh connection), and application data of one
    // joined mid-stream (TLS 1.2 and 1.3 both write 0x0303 there).
    row(PROTO_TLS, 6, &[0x16, 0x03, ANY, ANY, ANY, 0x01]),
    row(PROTO_TLS, 5, &[0x17, 0x03, 0x03]),
];

/// The protocol of the first matching row among `wanted` (a `proto_bit` mask; 0 means all), or
/// `PROTO_UNKNOWN`. `head` is the first 8 bytes little-endian, zero past `len`.
#[inline(always)]
pub fn prefilter(head: u64, len: u32, wanted: u32) -> u8 {
    let mut i = 0;
    while i < PREFILTER.len() {
        let r = PREFILTER[i];
        if len >= r.min_len as u32
            && head & r.mask == r.value
            && (wanted == 0 || wanted & proto_bit(r.protocol) != 0)
        {
            return r.protocol;
        }
        i += 1;
    }
    PROTO_UNKNOWN
}

/// `head` as the kernel computes it: the first `len` (at most 8) bytes, little-endian.
pub fn head_of(bytes: &[u8]) -> (u64, u32) {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    (u64::from_le_bytes(b), n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf(bytes: &[u8]) -> u8 {
        let (h, n) = head_of(bytes);
        prefilter(h, n, 0)
    }

    #[test]
    fn first_messages_of_each_protocol_pass() {
        assert_eq!(pf(b"GET / HTTP/1.1\r\n"), PROTO_HTTP1);
        assert_eq!(pf(b"HTTP/1.1 200 OK\r\n"), PROTO_HTTP1);
        assert_eq!(pf(b"PRI * HTTP/2.0\r\n"), PROTO_HTTP2);
        // Joined mid-stream: a HEADERS frame, a DATA frame, a WINDOW_UPDATE.
        assert_eq!(pf(b"\0\0\x2a\x01\x04\0\0\0\x03"), PROTO_HTTP2);
        assert_eq!(pf(b"\0\0\x0d\x00\x01\0\0\0\x03"), PROTO_HTTP2);
        assert_eq!(pf(b"\0\0\x04\x08\0\0\0\0\0"), PROTO_HTTP2);
        assert_eq!(pf(b"\0\0\0\x54\0\x03\0\0user\0postgres\0"), PROTO_POSTGRES);
        assert_eq!(pf(b"\0\0\0\x08\x04\xd2\x16\x2f"), PROTO_POSTGRES);
        assert_eq!(pf(b"Q\0\0\0\x0eSELECT 1\0"), PROTO_POSTGRES);
        assert_eq!(pf(b"Z\0\0\0\x05I"), PROTO_POSTGRES);
        assert_eq!(pf(b"\x5b\0\0\0\x0a10.11.6-MariaDB\0"), PROTO_MYSQL);
        assert_eq!(pf(b"\x09\0\0\0\x03SELECT 1"), PROTO_MYSQL);
        assert_eq!(pf(b"*1\r\n$4\r\nPING\r\n"), PROTO_REDIS);
        assert_eq!(pf(b"+OK\r\n"), PROTO_REDIS);
        assert_eq!(pf(b"\x16\x03\x01\x02\x00\x01\x00\x01"), PROTO_TLS); // ClientHello
        assert_eq!(pf(b"\x17\x03\x03\x00\x2a\x11"), PROTO_TLS);
    }

    #[test]
    fn other_traffic_does_not() {
        assert_eq!(pf(b"SSH-2.0-OpenSSH_9.2"), PROTO_UNKNOWN);
        assert_eq!(pf(b"get key\r\n"), PROTO_UNKNOWN); // memcached
        assert_eq!(pf(b"QU"), PROTO_UNKNOWN); // too short
    }

    #[test]
    fn only_wanted_protocols_match() {
        let (h, n) = head_of(b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(prefilter(h, n, proto_bit(PROTO_HTTP1)), PROTO_UNKNOWN);
        assert_eq!(prefilter(h, n, proto_bit(PROTO_REDIS)), PROTO_REDIS);
    }

    #[test]
    fn every_id_has_a_name_and_fits_the_mask() {
        assert_eq!(PROTO_NAMES.len(), PROTO_COUNT);
        for r in PREFILTER {
            assert!((r.protocol as usize) < PROTO_COUNT && r.protocol != PROTO_UNKNOWN);
            assert!(r.min_len <= 8);
        }
    }
}
