//! The one global the agent fills in before loading the programs.

/// `LoupeConfig::filter` bits: which selection maps the programs consult.
pub const FILTER_PID: u32 = 1 << 0;
pub const FILTER_CGROUP: u32 = 1 << 1;
pub const FILTER_NETNS: u32 = 1 << 2;
pub const FILTER_PORT: u32 = 1 << 3;

/// `PID_FILTER` values: a pid the user named (`--pid`, or matched by `--exe` at start), or a
/// descendant found since (removed again when it exits).
pub const PID_SELECTED: u8 = 1;
pub const PID_DESCENDANT: u8 = 2;

/// How many undecidable payload events a connection first seen mid-stream gets before the
/// classifier gives up on it (a connection seen from its start is decided on its first payload).
pub const MIDSTREAM_CLASSIFY_ATTEMPTS: u8 = 8;

/// Field offsets in kernel structs, read from the running kernel's BTF by the agent (aya has no
/// CO-RE relocations for Rust programs). u16 is enough: these fields sit near the struct starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// struct sock_common
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    pub skc_family: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    pub skc_net: u16,
    /// struct net -> ns (struct ns_common) -> inum, summed.
    pub net_ns_inum: u16,
    /// The syscall capture path's walk from a file descriptor to its socket (see
    /// `agent-ebpf` helpers/fd.rs): task_struct.files, files_struct.fdt, fdtable.max_fds and
    /// .fd, file.f_inode and .private_data, inode.i_mode, socket.sk.
    /// Zero on kernels where the agent uses the sock tracepoints and BTF lacks one of them.
    pub task_files: u16,
    pub files_fdt: u16,
    pub fdt_max_fds: u16,
    pub fdt_fd: u16,
    pub file_inode: u16,
    pub file_private_data: u16,
    pub inode_mode: u16,
    pub socket_sk: u16,
    /// sock.sk_protocol: a socket first met on I/O is captured only if it is TCP (both paths).
    pub sk_protocol: u16,
    /// task_struct.pid: the thread a sched_waking raw tracepoint wakes (its one argument is
    /// the woken task).
    pub task_pid: u16,
    /// sock_common.skc_state: the sock path leaves alone I/O on a socket whose connection has
    /// already closed (its end was reported; see `counters::AFTER_CLOSE`).
    pub skc_state: u16,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoupeConfig {
    /// The agent's own tgid: never captured.
    pub agent_tgid: u32,
    /// Payload bytes copied per event, at most `event::MAX_PAYLOAD`.
    pub capture_bytes: u32,
    /// `FILTER_*` bits.
    pub filter: u32,
    /// `conn::proto_bit` of each protocol a parser wants; 0 captures every TCP connection
    /// (the `capture --all-protocols` debugging view).
    pub protocols: u32,
    pub offsets: KernelOffsets,
    /// Non-zero: pick ids per request in the kernel and carry them in a TCP option
    /// (`--tcp-context`).
    pub tcp_context: u8,
    /// Non-zero: every data event carries its thread's comm (`loupe capture` prints it per
    /// event). Otherwise only a connection's first event does: the agent keeps the comm per
    /// connection, and the helper was ~7% of the sock tracepoints' time.
    pub comm_every_event: u8,
    pub _pad: u16,
    /// RFC 6994 ExID of the option.
    pub option_exid: u16,
    /// `FEATURE_*` bits: helpers this kernel has. The programs branch on them; the branch not
    /// taken is dead code to the verifier (the config is a frozen read-only map), so a helper an
    /// older kernel lacks is never seen by it.
    pub features: u16,
}
const _: () = assert!(core::mem::size_of::<LoupeConfig>() == 64);

/// `bpf_task_pt_regs` and `bpf_get_current_task_btf` (Linux 5.15): the user registers saved at
/// syscall entry (Go's goroutine register, the user stack at exec, the syscall number in
/// `sched_waking`).
pub const FEATURE_TASK_PT_REGS: u16 = 1 << 0;
