//! In-band trace context (`--tcp-context`): the ids the kernel picks for a request so that a TCP
//! header option can carry them to the next node before the agent has parsed a byte. See
//! docs/ARCHITECTURE.md, "Across nodes".

/// RFC 6994 shared experimental option kind.
pub const TCPOPT_EXP: u8 = 254;
/// kind, length, 2-byte ExID, 16-byte trace id, 8-byte span id. 28 bytes is what the 40-byte
/// option space leaves beside timestamps (10 + 2 bytes of padding).
pub const OPTION_LEN: u8 = 28;
/// ExID Loupe uses unless configured otherwise ("Lp"); not IANA-registered.
pub const DEFAULT_EXID: u16 = 0x4c70;

/// Aligned to 8 for the same reason as `conn::ConnTuple`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(zerocopy::FromBytes))]
pub struct TcpContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<TcpContext>() == 24);

/// `DataEvent::ctx_source`: where the event's `ctx` came from.
pub const CTX_NONE: u8 = 0;
/// Chosen by the kernel for this request. Client side: the CLIENT span's trace and span ids, the
/// ones the option carries. Server side: a trace id for the request should it start a trace
/// (span id zero).
pub const CTX_KERNEL: u8 = 1;
/// Server side: read from the peer's TCP option: its trace id and its CLIENT span id.
pub const CTX_OPTION: u8 = 2;
/// Server side: the caller is a local process; its CLIENT span's ids.
pub const CTX_LOCAL: u8 = 3;
