//! Per-connection state the kernel keeps, keyed by `struct sock *`.

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

pub const ROLE_UNKNOWN: u8 = 0;
/// This side called connect().
pub const ROLE_CLIENT: u8 = 1;
/// This side was accepted from a listening socket.
pub const ROLE_SERVER: u8 = 2;

pub use crate::protocol::{PROTO_HTTP1, PROTO_HTTP2, PROTO_UNKNOWN, proto_bit};

/// `ConnState::status`
pub const STATUS_UNCLASSIFIED: u8 = 0;
pub const STATUS_CAPTURED: u8 = 1;
/// No parser wants this connection, or it is filtered out: its I/O costs one map lookup.
pub const STATUS_IGNORED: u8 = 2;

/// Addresses in network byte order; IPv4 uses the first 4 bytes of each array. Ports in host order.
/// Aligned to 8 so that the kernel programs copy it with five 8-byte moves: at alignment 2 the
/// BPF backend calls a byte-at-a-time memmove instead.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(zerocopy::FromBytes))]
pub struct ConnTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ConnTuple>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    /// Monotonic ns when the kernel first saw the socket: tells apart reuses of one `struct sock *`.
    pub generation: u64,
    pub tuple: ConnTuple,
    /// Next stream offset per direction (`DIR_SEND`, `DIR_RECV`).
    pub seq: [u64; 2],
    pub role: u8,
    pub protocol: u8,
    pub status: u8,
    /// Payload events seen that the classifier could not decide on.
    pub attempts: u8,
    /// `event::FLAG_MIDSTREAM` when first seen on I/O rather than on connect/accept.
    pub flags: u8,
    /// `context::CTX_*` of `ctx`.
    pub ctx_source: u8,
    pub _pad: [u8; 2],
    /// The current request's ids (`--tcp-context`).
    pub ctx: crate::context::TcpContext,
    /// The opposite direction's stream offset when `ctx` was picked: a request is new once the
    /// other side has spoken since.
    pub ctx_mark: u64,
}
const _: () = assert!(core::mem::size_of::<ConnState>() == 104);

impl ConnTuple {
    /// The same connection named from the other end.
    pub fn mirrored(&self) -> ConnTuple {
        ConnTuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            family: self.family,
            _pad: 0,
        }
    }
}
