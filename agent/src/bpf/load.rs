//! Loading the embedded kernel object, attaching it, and the handles the rest of the agent uses.

use std::path::Path;

use agent_common::{
    config::{
        FEATURE_TASK_PT_REGS, FILTER_CGROUP, FILTER_NETNS, FILTER_PID, FILTER_PORT, LoupeConfig,
        PID_DESCENDANT, PID_SELECTED,
    },
    counters::NUM_COUNTERS,
    maps,
};
use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, RawTracePoint, SockOps, TracePoint, raw_trace_point::RawTracePointLinkId,
    },
};

use super::{btf::Btf, tracefs};

/// The kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loupe"));

/// What the agent needs to be told by its configuration to load the programs.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub capture_bytes: u32,
    /// `conn::proto_bit`s of the protocols parsers want; 0 captures every TCP connection.
    pub protocols: u32,
    /// Processes selected by `--pid`/`--exe` (None: every process).
    pub processes: Option<crate::selection::Selection>,
    /// `--port`: connections with one end on these ports.
    pub ports: Vec<u16>,
    /// cgroup v2 ids (the inode of the cgroup directory).
    pub cgroups: Vec<u64>,
    /// network namespace inodes.
    pub netns: Vec<u32>,
    pub ring_buffer_bytes: u32,
    pub max_connections: u32,
    /// `--tcp-context`: the ExID of the TCP option that carries trace context across nodes.
    pub tcp_context: Option<u16>,
    /// Load the TLS uprobe programs (attached per library file by `crate::tls`).
    pub tls: bool,
    /// Every data event carries its thread's comm (`loupe capture`); otherwise a connection's
    /// first only.
    pub comm_every_event: bool,
    pub capture_path: CapturePath,
}

/// How sockets' bytes reach the programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CapturePath {
    /// The sock tracepoints where the kernel has them (6.3+), else the syscall tracepoints.
    #[default]
    Auto,
    /// `sock:sock_send_length` / `sock_recv_length`: one program per transfer, inside the
    /// syscall, with the socket at hand.
    Sock,
    /// `syscalls:sys_enter_*` / `sys_exit_*` of the socket syscall families, the fd resolved
    /// to its socket in the program (Linux 5.8+).
    Syscalls,
}

struct Hook {
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    /// Without a required hook capture is wrong, not just partial: the agent refuses to start.
    required: bool,
    /// What the user loses when an optional hook is missing.
    loss: &'static str,
    /// Attached as a raw tracepoint: the program gets the tracepoint's arguments, and the
    /// kernel builds no trace record for it.
    raw: bool,
    /// Loaded at start (a verifier rejection shows then) and attached later, only while a
    /// process needs it (`PoolWakeups`).
    on_demand: bool,
}

const fn hook(
    program: &'static str,
    category: &'static str,
    required: bool,
    loss: &'static str,
) -> Hook {
    Hook {
        program,
        category,
        tracepoint: program,
        required,
        loss,
        raw: false,
        on_demand: false,
    }
}

/// A program attached as a raw tracepoint of its own name.
const fn raw_hook(program: &'static str, category: &'static str, required: bool) -> Hook {
    Hook {
        raw: true,
        ..hook(program, category, required, "")
    }
}

/// A program attached to a tracepoint of another name (one program serves several).
const fn hook_at(
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    required: bool,
    loss: &'static str,
) -> Hook {
    Hook {
        program,
        category,
        tracepoint,
        required,
        loss,
        raw: false,
        on_demand: false,
    }
}

/// The sock capture path. Every other socket syscall's buffer is read from the registers saved
/// at syscall entry (agent-ebpf helpers/regs.rs): no sys_enter/sys_exit pair per syscall.
const SOCK_PATH: &[Hook] = &[
    raw_hook("sock_send_length", "sock", true),
    raw_hook("sock_recv_length", "sock", true),
    hook(
        "sys_enter_recvmmsg",
        "syscalls",
        false,
        "payloads of recvmmsg()",
    ),
    hook(
        "sys_exit_recvmmsg",
        "syscalls",
        false,
        "payloads of recvmmsg()",
    ),
    hook(
        "sys_enter_sendmmsg",
        "syscalls",
        false,
        "payloads of sendmmsg()",
    ),
    hook(
        "sys_exit_sendmmsg",
        "syscalls",
        false,
        "payloads of sendmmsg()",
    ),
];

/// The syscall capture path: each family's own enter program, one exit program per direction
/// and argument shape.
const SYSCALL_PATH: &[Hook] = &[
    hook("sys_enter_read", "syscalls", true, ""),
    hook_at("exit_recv_buf", "syscalls", "sys_exit_read", true, ""),
    hook("sys_enter_write", "syscalls", true, ""),
    hook_at("exit_send_buf", "syscalls", "sys_exit_write", true, ""),
    hook("sys_enter_readv", "syscalls", true, ""),
    hook_at("exit_recv_iov", "syscalls", "sys_exit_readv", true, ""),
    hook("sys_enter_writev", "syscalls", true, ""),
    hook_at("exit_send_iov", "syscalls", "sys_exit_writev", true, ""),
    hook("sys_enter_recvfrom", "syscalls", true, ""),
    hook_at("exit_recv_buf", "syscalls", "sys_exit_recvfrom", true, ""),
    hook("sys_enter_sendto", "syscalls", true, ""),
    hook_at("exit_send_buf", "syscalls", "sys_exit_sendto", true, ""),
    hook("sys_enter_recvmsg", "syscalls", true, ""),
    hook_at("exit_recv_msg", "syscalls", "sys_exit_recvmsg", true, ""),
    hook("sys_enter_sendmsg", "syscalls", true, ""),
    hook_at("exit_send_msg", "syscalls", "sys_exit_sendmsg", true, ""),
    hook(
        "sys_enter_sendfile64",
        "syscalls",
        false,
        "stream offsets after sendfile() (a response sent from a file loses its connection's later messages)",
    ),
    hook_at(
        "exit_send_file",
        "syscalls",
        "sys_exit_sendfile64",
        false,
        "stream offsets after sendfile() (a response sent from a file loses its connection's later messages)",
    ),
    hook(
        "sys_enter_recvmmsg",
        "syscalls",
        false,
        "byte counts of recvmmsg()",
    ),
    hook_at(
        "exit_recv_mmsg",
        "syscalls",
        "sys_exit_recvmmsg",
        false,
        "byte counts of recvmmsg()",
    ),
    hook(
        "sys_enter_sendmmsg",
        "syscalls",
        false,
        "byte counts of sendmmsg()",
    ),
    hook_at(
        "exit_send_mmsg",
        "syscalls",
        "sys_exit_sendmmsg",
        false,
        "byte counts of sendmmsg()",
    ),
];

/// Both paths.
const COMMON: &[Hook] = &[
    hook(
        "inet_sock_set_state",
        "sock",
        false,
        "roles come from /proc for every connection; closes are found by idle eviction",
    ),
    hook(
        "sched_process_fork",
        "sched",
        false,
        "following requests handed to new threads",
    ),
    Hook {
        raw: true,
        on_demand: true,
        ..hook(
            "sched_waking",
            "sched",
            false,
            "following calls a Java thread pool makes for a request another thread handles",
        )
    },
    hook(
        "task_newtask",
        "task",
        false,
        "selecting new child processes of --pid/--exe processes",
    ),
    hook(
        "sched_process_exec",
        "sched",
        false,
        "selecting processes started later with an --exe name; naming a short-lived process (one gone before its first event is read shows its 15-byte name only)",
    ),
    hook(
        "sched_process_exit",
        "sched",
        false,
        "forgetting exited descendants of --pid/--exe processes (a reused pid may be traced), and exited processes' first connections (a reused pid's first events may wait for the next drain)",
    ),
];

/// A verifier rejection carries the whole verifier log: a `degraded:` line keeps its first line
/// (the log level `debug` shows the rest).
fn first_line(message: &str) -> &str {
    let line = message.lines().next().unwrap_or(message);
    match line.char_indices().nth(300) {
        Some((at, _)) => &line[..at],
        None => line,
    }
}

/// Which capture path to use on this kernel, and how to say so in the log.
fn choose_path(requested: CapturePath, tracefs: &Path) -> (CapturePath, String) {
    let has_sock = tracefs::has_tracepoint(tracefs, "sock", "sock_send_length")
        && tracefs::has_tracepoint(tracefs, "sock", "sock_recv_length");
    match requested {
        CapturePath::Sock => (CapturePath::Sock, "sock tracepoints (--capture-path sock)".into()),
        CapturePath::Syscalls => (
            CapturePath::Syscalls,
            "syscall tracepoints (--capture-path syscalls)".into(),
        ),
        CapturePath::Auto if has_sock => (CapturePath::Sock, "sock tracepoints".into()),
        CapturePath::Auto => (
            CapturePath::Syscalls,
            "syscall tracepoints (this kernel has no sock:sock_send_length, Linux 6.3+; each read/write of a traced process runs a program at entry and exit)".into(),
        ),
    }
}

/// How many agents have their programs loaded in this kernel, this one included: each loads one
/// `sock_send_length` or one `exit_send_buf`, by its capture path (names are cut to 15 bytes by
/// the kernel). Seen across containers and pid namespaces, unlike /proc.
pub fn agents_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            matches!(
                p.name_as_str(),
                Some("sock_send_lengt" | "sock_send_length" | "exit_send_buf")
            )
        })
        .count()
}

/// The uprobe programs of `crate::tls`, loaded at start so that a verifier rejection shows then.
pub const TLS_PROGRAMS: &[(&str, bool)] = &[
    ("ssl_write", false),
    ("ssl_read", false),
    ("ssl_read_ex", false),
    ("ssl_read_ret", true),
    ("go_tls_write", false),
    ("go_tls_read", false),
    ("go_tls_read_ret", false),
    ("go_tls_handshake", false),
    ("go_http_round_trip", false),
    ("go_http_request_write", false),
];

/// The loaded programs. Dropping it detaches everything (the TLS watcher holds a clone of the
/// handle and stops with it).
pub struct Probe {
    ebpf: std::sync::Arc<std::sync::Mutex<Ebpf>>,
    /// Whether the TLS programs loaded.
    pub tls_ready: bool,
    /// What is missing, in words for the log.
    pub degraded: Vec<String>,
    pub attached: usize,
    /// Whether `sched_waking` loaded, to be attached while a JVM runs (`PoolWakeups`).
    pub pool_wakeups: bool,
    /// The capture path in use, in words for the log.
    pub capture: String,
}

impl Probe {
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        let mut degraded = check_privileges(opts.tcp_context.is_some())?;
        let tracefs = tracefs::ensure_mounted()?;
        let btf_path = Path::new("/sys/kernel/btf/vmlinux");
        let btf_bytes = std::fs::read(btf_path).with_context(|| {
            format!(
                "cannot read {}: Loupe needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                btf_path.display()
            )
        })?;
        let btf = Btf::parse(&btf_bytes).context("parsing the kernel's BTF")?;
        let mut offsets = btf
            .kernel_offsets()
            .context("reading socket field offsets from the kernel's BTF")?;
        let (path, capture) = choose_path(opts.capture_path, &tracefs);
        if path == CapturePath::Syscalls {
            btf.add_fd_offsets(&mut offsets)
                .context("reading the fd-to-socket offsets of the syscall capture path from the kernel's BTF")?;
        }
        let mut features = 0;
        if btf.has_name("BPF_FUNC_task_pt_regs") && btf.has_name("BPF_FUNC_get_current_task_btf") {
            features |= FEATURE_TASK_PT_REGS;
        } else {
            degraded.push(
                "bpf_task_pt_regs unavailable (Linux 5.15+): no goroutine of a Go program's syscalls (Go TLS plaintext and Go's handoffs between goroutines are not followed), no exec records (a short-lived process shows its 15-byte name only), no Java pool handback"
                    .into(),
            );
        }
        drop(btf);

        let mut filter = 0;
        if opts.processes.is_some() {
            filter |= FILTER_PID;
        }
        if !opts.ports.is_empty() {
            filter |= FILTER_PORT;
        }
        if !opts.cgroups.is_empty() {
            filter |= FILTER_CGROUP;
        }
        if !opts.netns.is_empty() {
            filter |= FILTER_NETNS;
        }
        let config = LoupeConfig {
            agent_tgid: std::process::id(),
            capture_bytes: opts.capture_bytes,
            filter,
            protocols: opts.protocols,
            offsets,
            tcp_context: opts.tcp_context.is_some() as u8,
            comm_every_event: opts.comm_every_event as u8,
            _pad: 0,
            option_exid: opts.tcp_context.unwrap_or(0),
            features,
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(maps::CONFIG, &config, true);
        if opts.ring_buffer_bytes > 0 {
            loader.map_max_entries(maps::EVENTS, opts.ring_buffer_bytes);
        }
        if opts.max_connections > 0 {
            loader.map_max_entries(maps::CONNS, opts.max_connections);
        }
        if opts.processes.is_some() {
            loader.map_max_entries(maps::PID_FILTER, PID_FILTER_ENTRIES);
        }
        let mut ebpf = loader.load(OBJECT).context(
            "loading the kernel programs failed: Loupe needs root (or CAP_BPF + CAP_PERFMON) and Linux 5.8+ with BTF (README, Requirements)",
        )?;
        // Before anything is attached: the kernel's own updates of the pid selection (a selected
        // process's new child) then never meet a write of the same entry from here, and no
        // program runs with a selection half filled.
        fill_filters(&mut ebpf, opts)?;

        let mut attached = 0;
        let mut pool_wakeups = false;
        let path_hooks = match path {
            CapturePath::Syscalls => SYSCALL_PATH,
            _ => SOCK_PATH,
        };
        for hook in path_hooks.iter().chain(COMMON) {
            match attach(&mut ebpf, &tracefs, hook) {
                Ok(()) if hook.on_demand => pool_wakeups = true,
                Ok(()) => attached += 1,
                Err(err) if hook.required => {
                    return Err(err.context(format!(
                        "required tracepoint {}:{} could not be attached{}",
                        hook.category,
                        hook.tracepoint,
                        if opts.capture_path == CapturePath::Sock {
                            " (--capture-path sock needs Linux 6.3+; auto picks what the kernel has)"
                        } else {
                            ""
                        }
                    )));
                }
                Err(err) => {
                    let full = format!("{err:#}");
                    tracing::debug!("{}:{}: {full}", hook.category, hook.tracepoint);
                    degraded.push(format!(
                        "{}:{} unavailable ({}): no {}",
                        hook.category,
                        hook.tracepoint,
                        first_line(&full),
                        hook.loss
                    ));
                }
            }
        }

        if opts.tcp_context.is_some() {
            match attach_tcp_context(&mut ebpf) {
                Ok(n) => attached += n,
                Err(err) => {
                    let full = format!("{err:#}");
                    tracing::debug!("--tcp-context: {full}");
                    degraded.push(format!(
                        "--tcp-context unavailable ({}): no trace context carried to or read from other nodes",
                        first_line(&full)
                    ));
                }
            }
        }

        let mut tls_ready = false;
        if opts.tls {
            match load_tls(&mut ebpf) {
                Ok(()) => tls_ready = true,
                Err(err) => {
                    let full = format!("{err:#}");
                    tracing::debug!("TLS uprobes: {full}");
                    degraded.push(format!(
                        "TLS uprobes unavailable ({}): encrypted connections are counted, not traced",
                        first_line(&full)
                    ));
                }
            }
        }
        Ok(Self {
            ebpf: std::sync::Arc::new(std::sync::Mutex::new(ebpf)),
            tls_ready,
            degraded,
            attached,
            pool_wakeups,
            capture,
        })
    }

    /// The shared handle, for the TLS watcher's attachments.
    pub fn handle(&self) -> std::sync::Arc<std::sync::Mutex<Ebpf>> {
        self.ebpf.clone()
    }

    fn take(&mut self, name: &str, what: &str) -> anyhow::Result<aya::maps::Map> {
        let mut ebpf = self
            .ebpf
            .lock()
            .map_err(|_| anyhow::anyhow!("the kernel object's lock is poisoned"))?;
        ebpf.take_map(name)
            .with_context(|| format!("the {what} was already taken"))
    }

    /// The ring buffer of events; can be taken once.
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self.take(maps::EVENTS, "events ring buffer")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel's connection map, where user space writes its "ignored" verdicts; can be
    /// taken once.
    pub fn take_conns(
        &mut self,
    ) -> anyhow::Result<HashMap<MapData, u64, agent_common::conn::ConnState>> {
        let map = self.take(maps::CONNS, "connection map")?;
        Ok(HashMap::try_from(map)?)
    }

    /// A handle on the kernel's per-CPU counters; can be taken once.
    pub fn take_counters(&mut self) -> anyhow::Result<KernelCounters> {
        let map = self.take(maps::COUNTERS, "counters map")?;
        Ok(KernelCounters {
            map: PerCpuArray::try_from(map)?,
        })
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("kernel object has no map {name}"))
}

/// Every pid a 64-bit kernel can hand out (PID_MAX_LIMIT: /proc/sys/kernel/pid_max may be raised
/// to it while the agent runs), one byte each, eight to an entry: 4 MiB, only with a pid
/// selection.
const PID_FILTER_ENTRIES: u32 = (4 << 20) / 8;

/// The `PID_FILTER` entries that hold `pids`: eight pids' bytes to an entry (the kernel side's
/// `filter::pid_slot`). A pid past the map's end cannot exist and is left out.
fn pid_filter_entries(
    roots: &[u32],
    descendants: &[u32],
) -> std::collections::BTreeMap<u32, [u8; 8]> {
    let mut entries = std::collections::BTreeMap::new();
    // Descendants first: a pid both named and found below another is the user's.
    let marked = descendants
        .iter()
        .map(|&pid| (pid, PID_DESCENDANT))
        .chain(roots.iter().map(|&pid| (pid, PID_SELECTED)));
    for (pid, mark) in marked {
        if pid / 8 < PID_FILTER_ENTRIES {
            entries.entry(pid / 8).or_insert([0u8; 8])[(pid % 8) as usize] = mark;
        }
    }
    entries
}

fn fill_filters(ebpf: &mut Ebpf, opts: &LoadOptions) -> anyhow::Result<()> {
    if let Some(sel) = &opts.processes {
        let mut pids: Array<_, [u8; 8]> = Array::try_from(map_mut(ebpf, maps::PID_FILTER)?)?;
        for (index, bytes) in pid_filter_entries(&sel.roots, &sel.descendants) {
            pids.set(index, bytes, 0)?;
        }
        let mut names: HashMap<_, [u8; 16], u8> =
            HashMap::try_from(map_mut(ebpf, maps::EXE_FILTER)?)?;
        for name in &sel.exec_names {
            names.insert(name, 1, 0)?;
        }
    }
    let mut ports: HashMap<_, u16, u8> = HashMap::try_from(map_mut(ebpf, maps::PORT_FILTER)?)?;
    for port in &opts.ports {
        ports.insert(port, 1, 0)?;
    }
    let mut cgroups: HashMap<_, u64, u8> = HashMap::try_from(map_mut(ebpf, maps::CGROUP_FILTER)?)?;
    for id in &opts.cgroups {
        cgroups.insert(id, 1, 0)?;
    }
    let mut netns: HashMap<_, u32, u8> = HashMap::try_from(map_mut(ebpf, maps::NETNS_FILTER)?)?;
    for ino in &opts.netns {
        netns.insert(ino, 1, 0)?;
    }
    Ok(())
}

fn load_tls(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (name, _) in TLS_PROGRAMS {
        let program: &mut aya::programs::UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("kernel object has no program {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the verifier rejected {name}"))?;
    }
    Ok(())
}

/// The kernel-side counters (`agent_common::counters`), summed over CPUs.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    pub fn read(&self) -> [u64; NUM_COUNTERS as usize] {
        let mut out = [0; NUM_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.map.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

fn attach(ebpf: &mut Ebpf, tracefs: &Path, hook: &Hook) -> anyhow::Result<()> {
    if !tracefs::has_tracepoint(tracefs, hook.category, hook.tracepoint) {
        bail!("this kernel has no such tracepoint");
    }
    if hook.raw {
        let program: &mut RawTracePoint = ebpf
            .program_mut(hook.program)
            .with_context(|| format!("kernel object has no program {}", hook.program))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the verifier rejected {}", hook.program))?;
        if !hook.on_demand {
            program.attach(hook.tracepoint)?;
        }
        return Ok(());
    }
    let program: &mut TracePoint = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("kernel object has no program {}", hook.program))?
        .try_into()?;
    // One program may serve several tracepoints: loaded once.
    if program.fd().is_err() {
        program
            .load()
            .with_context(|| format!("the verifier rejected {}", hook.program))?;
    }
    program.attach(hook.category, hook.tracepoint)?;
    Ok(())
}

/// `sched_waking`, attached only while a JVM runs on the node. It fires on every wakeup of the
/// host (a Python gRPC server's GIL handoffs make a dozen per call) and has work only for the
/// futex wakes of JVM processes (`POOL_PIDS`): on a node without one, not attaching it spares
/// every wakeup the tracepoint's call into the program. The process watcher, which fills
/// `POOL_PIDS`, attaches it when the first JVM appears and detaches it when the last one is gone.
pub struct PoolWakeups {
    /// The program loaded (its tracepoint exists and the verifier took it).
    available: bool,
    link: Option<RawTracePointLinkId>,
}

impl PoolWakeups {
    pub fn new(available: bool) -> Self {
        Self {
            available,
            link: None,
        }
    }

    /// Attached while `needed`, detached otherwise. A failure is logged once and the program
    /// left alone from then on (JVM pool handback is then unavailable, as on a kernel without
    /// the tracepoint).
    pub fn follow(&mut self, ebpf: &mut Ebpf, needed: bool) {
        if !self.available || needed == self.link.is_some() {
            return;
        }
        let program: Result<&mut RawTracePoint, _> = match ebpf.program_mut("sched_waking") {
            Some(p) => p.try_into(),
            None => return,
        };
        let result = program.map_err(anyhow::Error::from).and_then(|p| {
            match self.link.take() {
                Some(link) => p.detach(link)?,
                None => self.link = Some(p.attach("sched_waking")?),
            }
            Ok(())
        });
        match result {
            Ok(()) => tracing::debug!(
                "sched:sched_waking {} (JVM thread pools)",
                if needed { "attached" } else { "detached" }
            ),
            Err(err) => {
                self.available = false;
                tracing::warn!(
                    "sched:sched_waking could not be {}: {err:#}; calls a Java thread pool makes for a request another thread handles start traces of their own",
                    if needed { "attached" } else { "detached" }
                );
            }
        }
    }
}

/// The raw tracepoint that picks a request's ids before its first segment leaves, and the
/// sock_ops program that writes and reads the option, attached to the cgroup v2 root so that it
/// sees every socket of the node.
fn attach_tcp_context(ebpf: &mut Ebpf) -> anyhow::Result<usize> {
    let root = cgroup2_root().context("no cgroup v2 hierarchy is mounted (sock_ops needs one)")?;
    let cgroup = std::fs::File::open(&root)
        .with_context(|| format!("cannot open the cgroup v2 root {}", root.display()))?;
    let program: &mut SockOps = ebpf
        .program_mut("tcp_context_option")
        .context("kernel object has no program tcp_context_option")?
        .try_into()?;
    program
        .load()
        .context("the verifier rejected tcp_context_option")?;
    // A bpf_link (what aya uses on 5.7+) always coexists with other programs on the cgroup;
    // the link API refuses the legacy ALLOW_MULTI flag.
    program
        .attach(&cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("attaching sock_ops to {}", root.display()))?;
    let program: &mut RawTracePoint = ebpf
        .program_mut("tcp_sendmsg_locked")
        .context("kernel object has no program tcp_sendmsg_locked")?
        .try_into()?;
    program
        .load()
        .context("the verifier rejected tcp_sendmsg_locked")?;
    program
        .attach("tcp_sendmsg_locked")
        .context("raw tracepoint tcp_sendmsg_locked (Linux 6.13+)")?;
    Ok(2)
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// hybrid systems.
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| std::path::PathBuf::from(f[1]))
    })
}

/// A capability the agent uses, and what for.
struct Need {
    bit: u32,
    name: &'static str,
    why: &'static str,
    /// Without it the agent cannot work at all (else it runs degraded).
    required: bool,
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn needs(tcp_context: bool) -> Vec<Need> {
    let mut needs = vec![
        Need {
            bit: CAP_BPF,
            name: "CAP_BPF",
            why: "load the kernel programs and create their maps",
            required: true,
        },
        Need {
            bit: CAP_PERFMON,
            name: "CAP_PERFMON",
            why: "attach tracepoint programs that read socket and user memory",
            required: true,
        },
        Need {
            bit: CAP_DAC_READ_SEARCH,
            name: "CAP_DAC_READ_SEARCH",
            why: "read tracepoint ids under /sys/kernel/tracing (root-only) and /proc of other users",
            required: true,
        },
        Need {
            bit: CAP_SYS_PTRACE,
            name: "CAP_SYS_PTRACE",
            why: "read other processes' executables and environments (service names) and their TLS libraries (uprobes)",
            required: false,
        },
    ];
    if tcp_context {
        needs.push(Need {
            bit: CAP_NET_ADMIN,
            name: "CAP_NET_ADMIN",
            why: "attach the sock_ops program of --tcp-context to the cgroup",
            required: false,
        });
    }
    needs
}

/// Names every missing capability and what it is for; fails if a required one is missing.
/// Warnings (what runs degraded) are returned for the log.
fn check_privileges(tcp_context: bool) -> anyhow::Result<Vec<String>> {
    let effective = effective_capabilities();
    let has = |bit: u32| effective & (1 << bit) != 0;
    let mut missing = Vec::new();
    let mut degraded = Vec::new();
    for need in needs(tcp_context) {
        // Before 5.8 (no CAP_BPF / CAP_PERFMON) CAP_SYS_ADMIN covered both.
        let covered =
            has(need.bit) || (matches!(need.bit, CAP_BPF | CAP_PERFMON) && has(CAP_SYS_ADMIN));
        if covered {
            continue;
        }
        if need.required {
            missing.push(format!("{} (to {})", need.name, need.why));
        } else {
            degraded.push(format!("{} missing: cannot {}", need.name, need.why));
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}. Run as root, or grant them: `capsh --addamb=...`, `setcap`, or securityContext.capabilities.add in Kubernetes (README, \"Privileges\")",
            missing.join(", ")
        );
    }
    Ok(degraded)
}

/// The effective capability set, from /proc/self/status.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_filter_entries_pack_eight_pids_to_an_entry_and_the_users_pids_win() {
        let entries = pid_filter_entries(&[1, 9, 17], &[2, 9, 15, 4 << 20]);
        assert_eq!(
            entries.into_iter().collect::<Vec<_>>(),
            vec![
                // pids 0..8: 1 named, 2 a descendant
                (0, [0, PID_SELECTED, PID_DESCENDANT, 0, 0, 0, 0, 0]),
                // pids 8..16: 9 both named and a descendant, 15 a descendant
                (1, [0, PID_SELECTED, 0, 0, 0, 0, 0, PID_DESCENDANT]),
                (2, [0, PID_SELECTED, 0, 0, 0, 0, 0, 0]),
                // 4 << 20 is past PID_MAX_LIMIT: no entry
            ]
        );
    }
}
