//! TLS plaintext from uprobes on the TLS library's read/write calls. A call is tied to its
//! socket through the socket syscall the same thread (Go: the same goroutine) makes inside it,
//! which the sock tracepoints already see: no library struct offsets are read.

/// `TlsCall::state`
pub const TLS_IDLE: u8 = 0;
/// Inside a write: the plaintext goes out with the call's first socket send.
pub const TLS_SEND: u8 = 1;
/// Inside a read: the plaintext is known when the call returns.
pub const TLS_RECV: u8 = 2;

/// `TlsCall::lib`
pub const LIB_OPENSSL: u8 = 1;
pub const LIB_GO: u8 = 2;

/// A TLS read or write in flight, per thread (`TLS_CALLS`) and, for Go reads, per goroutine
/// (`GO_READS`: a goroutine may park inside the read and resume on another thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsCall {
    /// The session: OpenSSL's `SSL *`, Go's `*tls.Conn`.
    pub session: u64,
    pub buf: u64,
    pub len: u64,
    /// `SSL_read_ex`'s `size_t *readbytes`; 0 for the calls that return the count.
    pub readbytes: u64,
    /// Go: the calling goroutine (`g`, register r14 on amd64).
    pub goroutine: u64,
    /// The socket the call's own syscall reached (reads), with its generation.
    pub sk: u64,
    pub generation: u64,
    pub state: u8,
    pub lib: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<TlsCall>() == 64);

/// One connection as the kernel names it: `TLS_SOCKETS` values (session -> socket) and the
/// per-thread last TLS socket received on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsSocket {
    pub sk: u64,
    pub generation: u64,
}

/// `TLS_SOCKETS` / `GO_READS` key: a session pointer or goroutine, within one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub tgid: u64,
    pub id: u64,
}
