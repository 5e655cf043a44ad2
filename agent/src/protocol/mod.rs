//! The application protocols: one folder (or file) each, behind one registry.
//!
//! Per protocol: a detector (authoritative; the kernel only prefilters with rows from
//! `agent_common::protocol`) and a pure parser (bytes in, requests and answers out; no I/O, no
//! clocks, no globals). Adding a protocol = its folder, a row in `REGISTRY` and in
//! `agent_common::protocol` (id, name, prefilter rows), and a `Conn` arm in trace/sink.rs if it
//! is not a database protocol. See docs/adding-a-protocol.md.

pub mod db;
pub mod detect;
pub mod framing;
pub mod http1;
pub mod http2;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sql;
pub mod text;
pub mod tls;
pub mod verdict;

#[cfg(test)]
mod conformance;
#[cfg(test)]
pub mod fixture;

pub use agent_common::protocol::{
    PROTO_COUNT, PROTO_HTTP1, PROTO_HTTP2, PROTO_MYSQL, PROTO_NAMES, PROTO_POSTGRES, PROTO_REDIS,
    PROTO_TLS as PROTO_TLS_ID, PROTO_UNKNOWN, proto_bit,
};

/// A detector's answer about the first bytes of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// This protocol, with a confidence (higher wins among several yes).
    Yes(u8),
    No,
    /// Too few bytes to tell.
    NeedMore,
}

/// One registered protocol.
pub struct Registered {
    pub id: u8,
    /// `data` is the first bytes seen in one direction; `requests` says whether that direction
    /// carries requests (client to server).
    pub detect: fn(data: &[u8], requests: bool) -> Detect,
}

/// THE list: every protocol the tracing sink parses, in detection order (ties go to the
/// earlier one).
pub const REGISTRY: &[Registered] = &[
    Registered {
        id: PROTO_HTTP1,
        detect: http1::detect,
    },
    Registered {
        id: PROTO_POSTGRES,
        detect: postgres::detect,
    },
    Registered {
        id: PROTO_HTTP2,
        detect: http2::detect,
    },
    Registered {
        id: PROTO_MYSQL,
        detect: mysql::detect,
    },
    Registered {
        id: PROTO_REDIS,
        detect: redis::detect,
    },
];

/// The kernel prefilter mask for every registered protocol.
pub fn wanted_mask() -> u32 {
    // TLS too: its connections are watched until their plaintext shows (or counted unhooked).
    REGISTRY
        .iter()
        .fold(proto_bit(agent_common::protocol::PROTO_TLS), |m, r| {
            m | proto_bit(r.id)
        })
}

pub fn name(id: u8) -> &'static str {
    PROTO_NAMES.get(id as usize).copied().unwrap_or("unknown")
}
