//! Assembling a DataEvent in the per-CPU scratch and handing it to the ring: one place for the
//! socket tracepoints and the TLS probes.

use agent_common::{
    conn::ConnState,
    context::TcpContext,
    event::{DATA_EVENT_SIZE, EVENT_VERSION, EventHeader, KIND_DATA},
};
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::{
    helpers::{
        copy::{copy_words, zero_words},
        emit::emit_data,
    },
    maps::{Scratch, WOKEN},
};

/// What moved, beside the connection it moved on.
pub struct Transfer {
    pub direction: u8,
    /// Offset in this direction's stream of the first byte.
    pub seq: u64,
    pub bytes: u32,
    /// Payload bytes already in the scratch buffer.
    pub captured: u32,
    pub flags: u8,
    pub syscall: u8,
    /// Wake the reader at once: the first event of a process's first connection
    /// (`first_of_process`).
    pub wake: bool,
    /// Name the thread (`DataEvent::comm`): the connection's first event, or every event with
    /// `config::LoupeConfig::comm_every_event`; the agent keeps the comm per connection, and the
    /// helper was ~7% of the sock tracepoints' time.
    pub comm: bool,
    /// Go's goroutine register (see `DataEvent::goroutine`).
    pub goroutine: u64,
}

#[inline(always)]
pub fn send_data(
    scratch: *mut Scratch,
    pid_tgid: u64,
    sk: u64,
    conn: &ConnState,
    t: &Transfer,
    ctx_source: u8,
    ctx: TcpContext,
) {
    // SAFETY: per-CPU scratch; the programs are not re-entered on one CPU.
    let event = unsafe { &mut (*scratch).event };
    event.header = EventHeader {
        kind: KIND_DATA,
        version: EVENT_VERSION,
        len: DATA_EVENT_SIZE as u32 + t.captured,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
    };
    event.sk = sk;
    event.conn_gen = conn.generation;
    copy_words(&mut event.tuple, &conn.tuple);
    event.seq = t.seq;
    event.bytes = t.bytes;
    event.captured = t.captured;
    if t.comm {
        // Written in place: through bpf_get_current_comm()'s returned array the BPF backend adds
        // a byte-at-a-time memset and copy.
        // SAFETY: the helper writes at most 16 bytes into the 16-byte field.
        unsafe {
            aya_ebpf::helpers::generated::bpf_get_current_comm(
                core::ptr::addr_of_mut!(event.comm).cast(),
                16,
            )
        };
    } else {
        zero_words(core::ptr::addr_of_mut!(event.comm).cast::<[u64; 2]>());
    }
    event.direction = t.direction;
    event.role = conn.role;
    event.protocol = conn.protocol;
    event.syscall = t.syscall;
    event.flags = t.flags;
    event.ctx_source = ctx_source;
    event.ctx = ctx;
    event.goroutine = t.goroutine;
    emit_data(scratch, t.captured, t.wake);
}

/// Whether the process has not woken the reader yet. The wakeup is there so the agent reads a
/// new process's /proc before a short-lived client (curl) is gone; a process that opens a
/// connection per request (no keep-alive) woke the reader, and the pipeline after it, per
/// request: nginx and oha at 5k req/s without keep-alive, 3.5k wakeups a second of each, the
/// agent at 20 us per request against 4.7 with keep-alive. Called for a connection's first
/// event only; not on the syscall path, whose exit programs it took over the verifier's budget
/// (there every connection's first event still wakes the reader).
#[inline(always)]
pub fn first_of_process(tgid: u32) -> bool {
    // SAFETY: map lookup of a plain key.
    if unsafe { WOKEN.get(tgid) }.is_some() {
        return false;
    }
    let _ = WOKEN.insert(tgid, 1, 0);
    true
}
