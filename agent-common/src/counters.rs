//! Indices of the kernel's per-CPU counters (`maps::COUNTERS`). Drops and their reasons: nothing
//! the programs fail to do goes uncounted. Indices are explicit and never reused.

/// A ring buffer reservation failed: the reader is behind. The event is lost.
pub const RINGBUF_FULL: u32 = 0;
/// The per-thread syscall argument map was full: that syscall's payload is lost.
pub const ARGS_MAP_FULL: u32 = 1;
/// The connection map was full: the socket's I/O is lost until an entry frees.
pub const CONN_MAP_FULL: u32 = 2;
/// bpf_probe_read_user failed on an iovec or payload: the event carries no payload.
pub const READ_USER_FAILED: u32 = 3;
/// bpf_probe_read_kernel failed on a socket field: the socket is skipped.
pub const READ_KERNEL_FAILED: u32 = 4;
/// Bytes moved with no user buffer in sight (sendfile, splice, io_uring): count-only event.
pub const NO_SYSCALL_ARGS: u32 = 5;
/// More iovecs than the programs walk (`MAX_IOV`): payload truncated there.
pub const IOV_LIMIT: u32 = 6;
/// The scratch buffer could not be reached (should never happen).
pub const SCRATCH_MISSING: u32 = 7;
/// Not drops: volume, for the metrics view.
pub const EVENTS_EMITTED: u32 = 8;
pub const CONNS_IGNORED: u32 = 9;
pub const PAYLOAD_TRUNCATED: u32 = 10;
/// `--tcp-context`: options written on outgoing request segments, and read from incoming ones.
pub const OPTION_WRITTEN: u32 = 11;
pub const OPTION_READ: u32 = 12;
/// No room left in the segment's option space (e.g. SACK blocks): that segment goes without.
pub const OPTION_NO_SPACE: u32 = 13;

/// A TLS read returned plaintext but no socket could be tied to its session: the bytes are lost.
pub const TLS_UNBOUND: u32 = 14;
/// Not a drop: plaintext events from TLS uprobes.
pub const TLS_PLAINTEXT: u32 = 15;
/// Not a drop: reads of bytes still queued on a socket whose connection a reset had already
/// closed (a client that gave up with requests in flight). The connection's end was reported at
/// the reset, no reply can follow, and tracking the socket again would revive it as a new
/// connection that never closes.
pub const AFTER_CLOSE: u32 = 16;

pub const NUM_COUNTERS: u32 = 17;

/// Names for display, indexed by counter.
pub const NAMES: [&str; NUM_COUNTERS as usize] = [
    "ringbuf_full",
    "args_map_full",
    "conn_map_full",
    "read_user_failed",
    "read_kernel_failed",
    "no_syscall_args",
    "iov_limit",
    "scratch_missing",
    "events_emitted",
    "conns_ignored",
    "payload_truncated",
    "option_written",
    "option_read",
    "option_no_space",
    "tls_unbound",
    "tls_plaintext",
    "after_close",
];

/// Which counters are losses (as opposed to volume).
pub const fn is_drop(counter: u32) -> bool {
    counter < EVENTS_EMITTED || counter == OPTION_NO_SPACE || counter == TLS_UNBOUND
}
