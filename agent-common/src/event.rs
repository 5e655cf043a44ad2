//! Records written to the ring buffer. Every record starts with an [`EventHeader`]; the kind ids
//! are explicit and never reused, so an old agent reading a newer kernel object can skip what it
//! does not know.

use crate::conn::ConnTuple;

/// Bumped whenever a record's layout changes.
pub const EVENT_VERSION: u16 = 3;

pub const KIND_DATA: u16 = 1;
pub const KIND_CLOSE: u16 = 2;
pub const KIND_FORK: u16 = 3;
pub const KIND_HANDOFF: u16 = 4;
pub const KIND_EXEC: u16 = 5;
pub const KIND_WAKE: u16 = 6;

/// Largest payload prefix one event can carry. The runtime cap (`LoupeConfig::capture_bytes`) is
/// at most this. A power of two: the kernel side bounds offsets by masking with `MAX_PAYLOAD - 1`.
pub const MAX_PAYLOAD: usize = 8192;
/// Default runtime cap: enough for the request line and headers of nearly all HTTP traffic.
pub const DEFAULT_CAPTURE_BYTES: u32 = 4096;

pub const DIR_SEND: u8 = 0;
pub const DIR_RECV: u8 = 1;

/// `DataEvent::flags`
pub const FLAG_TRUNCATED: u8 = 1 << 0;
/// The bytes moved without a user buffer the programs could see (sendfile, splice, io_uring) or
/// the copy failed: only the byte count is known.
pub const FLAG_NO_PAYLOAD: u8 = 1 << 1;
/// The connection existed before the agent saw its first I/O (opened before the agent started,
/// or its state was evicted): the stream starts mid-way and the role came from /proc.
pub const FLAG_MIDSTREAM: u8 = 1 << 2;
/// The payload is TLS plaintext from the library's uprobes (agent_common::tls), not the
/// socket's bytes; set on the connection once its plaintext is seen, after which its
/// ciphertext is no longer sent.
pub const FLAG_TLS: u8 = 1 << 3;
/// On `ConnState` only (such a connection sends no event): `--port` or the network-namespace
/// selection leaves the connection out. Unlike a connection no parser wanted, it does not get a
/// new chance when its TLS plaintext shows up.
pub const FLAG_EXCLUDED: u8 = 1 << 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(zerocopy::FromBytes))]
pub struct EventHeader {
    pub kind: u16,
    pub version: u16,
    /// Length of the whole record, header and payload included.
    pub len: u32,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// tgid << 32 | tid, as `bpf_get_current_pid_tgid` gives it.
    pub pid_tgid: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);

/// One send or receive on a TCP socket, followed by `captured` payload bytes. The agent reads a
/// record's bytes as this struct (`FromBytes`: every field accepts any bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "user", derive(zerocopy::FromBytes))]
pub struct DataEvent {
    pub header: EventHeader,
    /// The kernel's `struct sock *`; with `conn_gen` it names one connection (the pointer alone is
    /// reused once the socket is freed).
    pub sk: u64,
    pub conn_gen: u64,
    pub tuple: ConnTuple,
    /// Offset in this direction's byte stream of the first byte this event moved.
    pub seq: u64,
    /// Bytes the syscall (or one message of a sendmmsg/recvmmsg) moved.
    pub bytes: u32,
    /// Payload bytes that follow this struct in the record: min(bytes, capture cap).
    pub captured: u32,
    /// The thread's comm on a connection's first event (on every event with
    /// `config::LoupeConfig::comm_every_event`); zeros otherwise.
    pub comm: [u8; 16],
    pub direction: u8,
    /// `conn::ROLE_*`
    pub role: u8,
    /// `conn::PROTO_*` as the kernel classified the connection.
    pub protocol: u8,
    /// `syscall::SYS_*`: which syscall family moved the bytes.
    pub syscall: u8,
    pub flags: u8,
    /// `context::CTX_*`: what `ctx` holds (`--tcp-context` only).
    pub ctx_source: u8,
    pub _pad: [u8; 2],
    pub ctx: crate::context::TcpContext,
    /// The user register where Go keeps the running goroutine (`g`: r14 on amd64, x28 on
    /// arm64), as saved at the syscall or probe. Meaningful for Go programs only: the agent
    /// uses it in place of the thread id for them (goroutines move between threads).
    pub goroutine: u64,
}
pub const DATA_EVENT_SIZE: usize = core::mem::size_of::<DataEvent>();
// The programs zero `comm` as two 8-byte words.
const _: () = assert!(core::mem::offset_of!(DataEvent, comm).is_multiple_of(8));
const _: () = assert!(DATA_EVENT_SIZE == 152);

/// The connection reached TCP_CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseEvent {
    pub header: EventHeader,
    pub sk: u64,
    pub conn_gen: u64,
    pub tuple: ConnTuple,
    /// Bytes seen in each direction (`DIR_SEND`, `DIR_RECV`) over the connection's life.
    pub seq: [u64; 2],
    pub role: u8,
    pub _pad: [u8; 7],
}
pub const CLOSE_EVENT_SIZE: usize = core::mem::size_of::<CloseEvent>();
const _: () = assert!(CLOSE_EVENT_SIZE == 104);

/// A selected process created a thread or process: the creating thread is in the header's
/// pid_tgid. Lets the agent follow work handed to a new thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForkEvent {
    pub header: EventHeader,
    /// Thread id of the new task (its own pid when it is a new process).
    pub child_tid: u32,
    pub _pad: u32,
}
pub const FORK_EVENT_SIZE: usize = core::mem::size_of::<ForkEvent>();
const _: () = assert!(FORK_EVENT_SIZE == 32);

/// A Go program handed an HTTP request from the goroutine that made it (`to`, in
/// `net/http.(*persistConn).roundTrip`) to the connection's writer goroutine (`from`, in
/// `net/http.(*Request).write`): the writer's next socket writes are the caller's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HandoffEvent {
    pub header: EventHeader,
    pub from: u64,
    pub to: u64,
}
pub const HANDOFF_EVENT_SIZE: usize = core::mem::size_of::<HandoffEvent>();
const _: () = assert!(HANDOFF_EVENT_SIZE == 40);

/// How much of an exec the kernel hands over (`ExecEvent`).
pub const EXEC_FILENAME_MAX: usize = 256;
pub const EXEC_ARGV_MAX: usize = 1024;
/// Each of the two `OTEL_*` variables a process can name itself with.
pub const EXEC_ENV_MAX: usize = 256;

/// A selected process finished an exec: its new program, command line and the `OTEL_*`
/// variables that name a service, read from its fresh stack while it cannot have exited yet.
/// The agent reads /proc for a process's resource; a client that runs for a millisecond (curl)
/// is gone before its first event reaches user space, and this is what names it then.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Valid bytes of each area below.
    pub filename_len: u16,
    /// The argument strings, NUL-separated (cut at EXEC_ARGV_MAX).
    pub argv_len: u16,
    pub service_name_len: u16,
    pub resource_attributes_len: u16,
    pub argc: u32,
    pub _pad: u32,
    /// The path the program was executed by (the tracepoint's `filename`).
    pub filename: [u8; EXEC_FILENAME_MAX],
    pub argv: [u8; EXEC_ARGV_MAX],
    /// `OTEL_SERVICE_NAME=...` and `OTEL_RESOURCE_ATTRIBUTES=...` as found in the environment.
    pub service_name: [u8; EXEC_ENV_MAX],
    pub resource_attributes: [u8; EXEC_ENV_MAX],
}
pub const EXEC_EVENT_SIZE: usize = core::mem::size_of::<ExecEvent>();
const _: () = assert!(EXEC_EVENT_SIZE == 40 + 256 + 1024 + 512);

/// A thread of a thread-pool runtime (agent_common::config: the JVM) woke another thread of its
/// process through a futex (a lock handed over, a condition signalled, a future completed): the
/// waker is in the header's pid_tgid. Lets the agent find which request's thread a pool thread
/// was working for when the pool thread completes its task (FutureTask wakes its waiter).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WakeEvent {
    pub header: EventHeader,
    /// Thread id of the woken task.
    pub wakee: u32,
    pub _pad: u32,
}
pub const WAKE_EVENT_SIZE: usize = core::mem::size_of::<WakeEvent>();
const _: () = assert!(WAKE_EVENT_SIZE == 32);
