//! Every map and global of the kernel side. Sizes here are defaults; the loader resizes EVENTS and
//! CONNS from the configuration.

use agent_common::{
    config::LoupeConfig,
    conn::{ConnState, ConnTuple},
    context::TcpContext,
    counters::NUM_COUNTERS,
    event::{DataEvent, ExecEvent, MAX_PAYLOAD},
    syscall::ActiveCall,
    tls::{ProcessKey, TlsCall, TlsSocket},
};
use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

/// Filled in by the agent at load time (offsets from BTF, own pid, capture cap, filters).
#[unsafe(no_mangle)]
pub static LOUPE_CONFIG: Global<LoupeConfig> = Global::new(LoupeConfig {
    agent_tgid: 0,
    capture_bytes: 0,
    filter: 0,
    protocols: 0,
    offsets: agent_common::config::KernelOffsets {
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        skc_net: 0,
        net_ns_inum: 0,
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_inode: 0,
        file_private_data: 0,
        inode_mode: 0,
        socket_sk: 0,
        sk_protocol: 0,
        task_pid: 0,
        skc_state: 0,
    },
    tcp_context: 0,
    comm_every_event: 0,
    _pad: 0,
    option_exid: 0,
    features: 0,
});

/// DataEvent and CloseEvent records -> the agent's reader. One ring for all CPUs so that events
/// of one connection keep their order.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// struct sock * -> ConnState. Written by the lifecycle and I/O programs, deleted on TCP_CLOSE.
/// LRU: a socket closed while the agent was not looking must not leak an entry.
#[map]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// tgid -> 1 for a process whose first connection has woken the reader (`event::send_data`):
/// later connections of the process do not. Cleared at the process's exec and exit, so a reused
/// pid or a new program wakes it again; LRU, so a full map costs an extra wakeup, nothing else.
#[map]
pub static WOKEN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// pid_tgid -> the sendmmsg/recvmmsg call in flight on that thread (every other socket syscall
/// is read from the saved registers, helpers/regs.rs). Written at sys_enter, read by the sock
/// tracepoints inside the syscall, marked spent at sys_exit. An entry stays while its thread is
/// active (rewritten in place, no lock); LRU evicts those of threads gone.
#[map]
pub static ACTIVE_CALLS: LruHashMap<u64, ActiveCall> = LruHashMap::with_max_entries(16384, 0);

/// counters::* -> count, per CPU; the agent sums the CPUs.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Selected processes, cgroups (v2 id) and network namespaces (inode): consulted only when the
/// matching `config::FILTER_*` bit is set.
///
/// Processes: one byte per tgid (`config::PID_SELECTED`, `PID_DESCENDANT`, or 0), eight to an
/// entry (`filter::pid_slot`); the loader sizes it to every pid the kernel can hand out when a
/// pid selection is given. An array lookup is inlined by the verifier: the hash lookup it
/// replaced, made by every socket event of every process on the node, was ~10% of the sock
/// tracepoints' time with a server selected. Bytes, not bits: a byte store needs no atomic
/// instruction (the kernels from 5.8 have only atomic add), and neighbours never collide.
#[map]
pub static PID_FILTER: Array<[u8; 8]> = Array::with_max_entries(1, 0);
#[map]
pub static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);
#[map]
pub static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(256, 0);
/// Selected ports (host order): a connection is captured when either end's port is one.
#[map]
pub static PORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(256, 0);
/// tgid -> 1 for processes of a thread-pool runtime (the JVM), whose futex wakes the agent
/// follows (programs/sched.rs). Filled by the agent's process watcher.
#[map]
pub static POOL_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
/// How many entries POOL_PIDS has, kept by the agent beside it: sched_waking runs on every
/// wakeup of the host, and on a node without a JVM this one inlined array read ends it
/// before a hash lookup.
#[map]
pub static POOL_COUNT: Array<u32> = Array::with_max_entries(1, 0);
/// Executable names (as the task's comm: NUL-padded, first 15 bytes) whose new processes are
/// selected when they exec.
#[map]
pub static EXE_FILTER: HashMap<[u8; 16], u8> = HashMap::with_max_entries(64, 0);

/// Where an event is assembled before it is copied to the ring: ring reservations must have a
/// constant size, and payloads do not. Twice MAX_PAYLOAD so that "offset < MAX, length <= MAX"
/// is provably inside the buffer for the verifier (it bounds each register, not their sum).
#[repr(C)]
pub struct Scratch {
    pub event: DataEvent,
    pub payload: [u8; 2 * MAX_PAYLOAD],
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Where an exec record is assembled (helpers/exec.rs): too big for the stack.
#[map]
pub static EXEC_SCRATCH: PerCpuArray<ExecEvent> = PerCpuArray::with_max_entries(1, 0);

/// `--tcp-context`: client tuple -> ids of the request in flight on it. Written when a request
/// starts (tcp_sendmsg_locked, before any segment leaves), read by the sock_ops program that
/// writes the option and by a local server's receive. LRU: bounded whatever the agent misses.
#[map]
pub static OUT_CTX: LruHashMap<ConnTuple, TcpContext> = LruHashMap::with_max_entries(16384, 0);

/// `--tcp-context`: server tuple -> the context the peer's last option carried.
#[map]
pub static PEER_CTX: LruHashMap<ConnTuple, TcpContext> = LruHashMap::with_max_entries(16384, 0);

/// `--tcp-context`: thread id -> trace id of the request the thread is serving, so that the calls
/// it makes carry that trace. Set when a server connection receives a request, cleared when the
/// thread answers one.
#[map]
pub static THREAD_TRACE: LruHashMap<u32, [u8; 16]> = LruHashMap::with_max_entries(16384, 0);

/// pid_tgid -> the TLS read or write the thread is inside (uprobes, agent_common::tls). Read by
/// the sock tracepoints to tie the call to its socket. Rewritten in place like ACTIVE_CALLS.
#[map]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// (tgid, goroutine) -> a Go TLS read in flight: the goroutine may resume on another thread.
#[map]
pub static GO_READS: LruHashMap<ProcessKey, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// (tgid, goroutine) -> the session of a Go handshake not yet tied to its socket: the handshake
/// parks while it waits for the peer and may resume on another thread, so its per-thread record
/// misses its receives. Taken by the goroutine's first receive on a TLS socket not yet hooked.
#[map]
pub static GO_HANDSHAKES: LruHashMap<ProcessKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// (tgid, TLS session) -> its socket, learnt from the first syscall inside one of its calls.
/// LRU: sessions freed while the agent was not looking must not leak.
#[map]
pub static TLS_SOCKETS: LruHashMap<ProcessKey, TlsSocket> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid -> the TLS socket the thread last received on: where a read answered from the
/// library's buffer (or a memory BIO, as in Node.js) came from.
#[map]
pub static TLS_LAST_RECV: LruHashMap<u64, TlsSocket> = LruHashMap::with_max_entries(16384, 0);

/// (tgid, *http.Request) -> the goroutine that called `(*persistConn).roundTrip` with it, until
/// the connection's writer goroutine writes it (programs/go_http.rs).
#[map]
pub static GO_ROUND_TRIPS: LruHashMap<ProcessKey, u64> = LruHashMap::with_max_entries(16384, 0);
