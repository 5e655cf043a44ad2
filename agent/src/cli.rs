//! Command line: clap flags, each with an environment fallback.

use std::{net::SocketAddr, os::unix::fs::MetadataExt as _, path::PathBuf};

use agent_common::event::{DEFAULT_CAPTURE_BYTES, MAX_PAYLOAD};
use clap::{Args, Parser, Subcommand};

use crate::bpf::load::CapturePath;

#[derive(Debug, Parser)]
#[command(
    name = "loupe",
    version,
    about = "Distributed traces of uninstrumented services, from eBPF"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// `loupe` alone is `loupe run`: its flags work without the subcommand.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace every HTTP service on this host (the default): trees on the terminal, or OTLP
    /// when an endpoint is configured.
    Run(RunArgs),
    /// Print one line per captured send/receive (process, 4-tuple, direction, bytes, payload).
    Capture(CaptureArgs),
    /// A live view of this node's services: request rate, error share, p50/p99 and the edges
    /// between them (traces as `run` does; spans still go to OTLP or --output when configured).
    Top(TopArgs),
}

#[derive(Debug, Args, Clone, Default)]
pub struct TopArgs {
    /// Read a running agent's metrics (its --metrics-addr, e.g. 127.0.0.1:9464) instead of
    /// tracing: no second set of kernel programs.
    #[arg(long)]
    pub from: Option<String>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1)]
    pub refresh: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// OTLP base endpoint (like OTEL_EXPORTER_OTLP_ENDPOINT), e.g. http://collector:4318. Setting
    /// it, or any OTEL_EXPORTER_OTLP_*ENDPOINT variable, turns OTLP export on.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    /// OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf).
    #[arg(long)]
    pub otlp_protocol: Option<String>,
    /// Also write every span as a JSON line to this file (an existing non-empty file is refused
    /// unless --append).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Add to an existing --output file.
    #[arg(long, requires = "output")]
    pub append: bool,
    /// Print trace trees on the terminal even when exporting over OTLP.
    #[arg(long)]
    pub console: bool,
    /// Trace trees printed per second at most, errors first, then the slowest; a line every 10 s
    /// counts the rest (which --output and OTLP still get). 0 prints every trace.
    #[arg(long, env = "LOUPE_CONSOLE_RATE", default_value_t = 10)]
    pub console_rate: u32,
    /// YAML configuration file (service names, redaction).
    #[arg(long, env = "LOUPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seconds a request waits for its response before its span ends with error.type=timeout.
    #[arg(long, env = "LOUPE_RESPONSE_TIMEOUT", default_value_t = 30)]
    pub response_timeout: u64,
    /// Spans waiting for export at most; beyond, new spans are dropped and counted (memory stays
    /// bounded while the OTLP endpoint is slow or down: about 1 KiB per span).
    #[arg(long, env = "LOUPE_EXPORT_QUEUE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub export_queue: u32,
    /// Seconds one batch is retried (exponential backoff, 0.25 s doubling to 5 s) while the OTLP
    /// endpoint fails, before it is dropped and counted.
    #[arg(long, env = "LOUPE_EXPORT_RETRY", default_value_t = 30)]
    pub export_retry: u64,
    /// Pod metadata on spans: auto (on when running in a pod), on (in-cluster config or
    /// KUBECONFIG), off (no API calls).
    #[arg(long, env = "LOUPE_KUBERNETES", value_enum, default_value_t = crate::k8s::Mode::Auto)]
    pub kubernetes: crate::k8s::Mode,
    /// This node's name (downward API: fieldRef spec.nodeName); only its pods are watched.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Series each RED and service-graph metric keeps at most; new series beyond fold into one
    /// with otel.metric.overflow=true (memory stays bounded whatever the routes and peers).
    #[arg(long, env = "LOUPE_METRICS_SERIES", default_value_t = crate::red::DEFAULT_SERIES_LIMIT as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub metrics_series: u32,
}

#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Only capture these processes and their descendants, present and future (repeat or
    /// comma-separate). With --exe: either selects.
    #[arg(long = "pid", env = "LOUPE_PIDS", value_delimiter = ',', global = true)]
    pub pids: Vec<u32>,
    /// Only capture processes whose executable (or task name) matches, e.g. nginx or 'python3*',
    /// and their descendants. An exact name also selects processes started later; a glob,
    /// those running at start.
    #[arg(long = "exe", env = "LOUPE_EXES", value_delimiter = ',', global = true)]
    pub exes: Vec<String>,
    /// Only capture connections with this port at either end (a server's listening port, or
    /// the port a client connects to).
    #[arg(
        long = "port",
        env = "LOUPE_PORTS",
        value_delimiter = ',',
        global = true
    )]
    pub ports: Vec<u16>,
    /// Only capture processes in these cgroup v2 directories, e.g.
    /// /sys/fs/cgroup/system.slice/nginx.service (see /proc/PID/cgroup for a process's).
    #[arg(
        long = "cgroup",
        env = "LOUPE_CGROUPS",
        value_delimiter = ',',
        global = true
    )]
    pub cgroups: Vec<PathBuf>,
    /// Only capture sockets in these network namespaces: a path (/proc/PID/ns/net, /run/netns/NAME) or a name under /run/netns.
    #[arg(
        long = "netns",
        env = "LOUPE_NETNS",
        value_delimiter = ',',
        global = true
    )]
    pub netns: Vec<String>,
    /// Payload bytes copied per send/receive (1..=8192).
    #[arg(long, env = "LOUPE_CAPTURE_BYTES", default_value_t = DEFAULT_CAPTURE_BYTES, global = true)]
    pub capture_bytes: u32,
    /// Kernel ring buffer size in bytes (a power of two, at least one page).
    #[arg(long, env = "LOUPE_RING_BUFFER_BYTES", default_value_t = 8 << 20, global = true)]
    pub ring_buffer_bytes: u32,
    /// Connections tracked at once, in the kernel and in the agent.
    #[arg(
        long,
        env = "LOUPE_MAX_CONNECTIONS",
        default_value_t = 65_536,
        global = true
    )]
    pub max_connections: u32,
    /// Serve Prometheus metrics (drop counters included) on this address: 127.0.0.1:9464,
    /// localhost:9464, or :9464 for every interface. Off by default; an address in use is an
    /// error at start.
    #[arg(long, env = "LOUPE_METRICS_ADDR", global = true, value_parser = parse_listen_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds between summary lines (events, drops) in the log; 0 turns them off.
    #[arg(
        long,
        env = "LOUPE_SUMMARY_INTERVAL",
        default_value_t = 60,
        global = true
    )]
    pub summary_interval: u64,
    /// Carry trace context to other nodes in a TCP header option (RFC 6994 experimental option)
    /// on request segments, and read it from peers. Off: options peers send are ignored.
    #[arg(long, env = "LOUPE_TCP_CONTEXT", global = true)]
    pub tcp_context: bool,
    /// Do not put uprobes on TLS libraries (OpenSSL, Go crypto/tls): encrypted connections are
    /// then counted by library (loupe_tls_unhooked_total) but not traced.
    #[arg(long, env = "LOUPE_NO_TLS", global = true)]
    pub no_tls: bool,
    /// How sockets' bytes are captured: auto (the sock tracepoints where the kernel has them,
    /// Linux 6.3+, else the syscall tracepoints), sock, or syscalls (works from Linux 5.8; costs
    /// a program at entry and exit of every read/write of a traced process).
    #[arg(long, env = "LOUPE_CAPTURE_PATH", value_enum, default_value_t = CapturePath::Auto, global = true)]
    pub capture_path: CapturePath,
    /// The agent's CPU scheduling: adaptive (the threads that parse and export run at
    /// SCHED_IDLE while they keep up, normal while events wait, the ring reader with them (at
    /// SCHED_BATCH when raised) and raised by a watchdog when half the ring waits;
    /// needs CAP_SYS_NICE, else normal); normal; or idle (always SCHED_IDLE: on a saturated
    /// node the agent falls behind and its drops are counted).
    #[arg(long, env = "LOUPE_CPU_SCHEDULING", value_enum, default_value_t = CpuScheduling::Adaptive, global = true)]
    pub cpu_scheduling: CpuScheduling,
    /// Log format on stderr: text, or json (one object per line, for log pipelines).
    #[arg(long, env = "LOUPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// RFC 6994 ExID of that option (all agents of a cluster must agree), e.g. 0x4c70.
    #[arg(long, env = "LOUPE_TCP_OPTION_EXID", default_value = "0x4c70", value_parser = parse_exid, global = true)]
    pub tcp_option_exid: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuScheduling {
    Normal,
    Idle,
    Adaptive,
}

/// `HOST:PORT`, with a name resolved now (`localhost:9464`), or `:PORT` for every interface.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: expected HOST:PORT or :PORT"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e}; expected HOST:PORT or :PORT"))?
        .min_by_key(|a| a.is_ipv6())
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn parse_exid(s: &str) -> Result<u16, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not a 16-bit ExID: give e.g. 0x4c70"))
}

#[derive(Debug, Args, Clone, Default)]
pub struct CaptureArgs {
    /// JSON lines (payload in base64) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Capture every TCP connection, not only those a protocol parser wants.
    #[arg(long)]
    pub all_protocols: bool,
    /// Print secret-bearing header values (Authorization, Cookie, *token*, …) and query values
    /// as captured; by default they are masked as in spans.
    #[arg(long)]
    pub show_secrets: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--capture-bytes must be between 1 and {MAX_PAYLOAD}, got {0}")]
    CaptureBytes(u32),
    #[error("--ring-buffer-bytes must be a power of two of at least 4096, got {0}")]
    RingBuffer(u32),
    #[error("--max-connections must be at least 1")]
    MaxConnections,
    #[error("unsupported OTLP protocol {0:?}: use grpc or http/protobuf")]
    Protocol(String),
    #[error("invalid OTLP endpoint {0:?}: give a URL such as http://localhost:4318")]
    Endpoint(String),
    #[error("OTEL_TRACES_EXPORTER={0:?}: use otlp, console or none (a comma list combines them)")]
    Exporter(String),
    #[error("--pid {0}: no such process; give the pid of a running process")]
    Pid(u32),
    #[error("cannot use {path} as a {what}: {err}; give an existing path")]
    Path {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
}

impl CommonArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.capture_bytes == 0 || self.capture_bytes as usize > MAX_PAYLOAD {
            return Err(ConfigError::CaptureBytes(self.capture_bytes));
        }
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < 4096 {
            return Err(ConfigError::RingBuffer(self.ring_buffer_bytes));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::MaxConnections);
        }
        // A mistyped pid would trace nothing, silently.
        if let Some(&pid) = self
            .pids
            .iter()
            .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            return Err(ConfigError::Pid(pid));
        }
        Ok(())
    }

    /// `--pid` and `--exe`, resolved over the processes running now (None: no process filter).
    pub fn process_selection(&self) -> Option<crate::selection::Selection> {
        if self.pids.is_empty() && self.exes.is_empty() {
            return None;
        }
        let sel = crate::selection::select(&self.pids, &self.exes, &crate::selection::processes());
        if sel.roots.is_empty() && sel.exec_names.is_empty() {
            tracing::warn!(
                "--exe {}: no running process matches, and a glob does not select later ones: nothing will be traced",
                self.exes.join(",")
            );
        }
        tracing::info!(
            "selected {} processes and {} descendants{}",
            sel.roots.len(),
            sel.descendants.len(),
            if sel.exec_names.is_empty() {
                String::new()
            } else {
                format!(
                    ", and any that starts {}",
                    self.exes
                        .iter()
                        .filter(|e| !e.contains(['*', '?', '[']))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" or ")
                )
            }
        );
        Some(sel)
    }

    /// cgroup v2 ids: the inode of each directory.
    pub fn cgroup_ids(&self) -> Result<Vec<u64>, ConfigError> {
        self.cgroups
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .map(|m| m.ino())
                    .map_err(|err| ConfigError::Path {
                        what: "cgroup directory",
                        path: p.display().to_string(),
                        err,
                    })
            })
            .collect()
    }

    /// Network namespace inodes.
    pub fn netns_inodes(&self) -> Result<Vec<u32>, ConfigError> {
        self.netns
            .iter()
            .map(|n| {
                let path = if n.contains('/') {
                    PathBuf::from(n)
                } else {
                    PathBuf::from("/run/netns").join(n)
                };
                std::fs::metadata(&path)
                    .map(|m| m.ino() as u32)
                    .map_err(|err| ConfigError::Path {
                        what: "network namespace",
                        path: path.display().to_string(),
                        err,
                    })
            })
            .collect()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Where spans go, from flags and the standard OpenTelemetry variables
/// (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL).
pub fn otlp_config(args: &RunArgs) -> Result<Option<crate::export::otlp::OtlpConfig>, ConfigError> {
    use crate::export::otlp::{OtlpConfig, Protocol};
    let exporters: Vec<String> = env_nonempty("OTEL_TRACES_EXPORTER")
        .map(|v| {
            v.split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    if let Some(bad) = exporters
        .iter()
        .find(|e| !matches!(e.as_str(), "otlp" | "console" | "none"))
    {
        return Err(ConfigError::Exporter(bad.clone()));
    }
    let endpoint_env = env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if let Some(p) = &args.otlp_protocol
        && Protocol::parse(p).is_none()
    {
        return Err(ConfigError::Protocol(p.clone()));
    }
    // The flags ask for OTLP outright; otherwise OTEL_TRACES_EXPORTER decides when set (per the
    // specification: `console` only prints, `none` exports nothing), else an endpoint does.
    let wanted = args.otlp_endpoint.is_some()
        || args.otlp_protocol.is_some()
        || if exporters.is_empty() {
            endpoint_env.is_some()
        } else {
            exporters.iter().any(|e| e == "otlp")
        };
    if !wanted {
        return Ok(None);
    }
    for endpoint in args.otlp_endpoint.iter().chain(endpoint_env.iter()) {
        let ok = (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            && endpoint
                .split("://")
                .nth(1)
                .is_some_and(|rest| !rest.is_empty());
        if !ok {
            return Err(ConfigError::Endpoint(endpoint.clone()));
        }
    }
    let protocol = args
        .otlp_protocol
        .clone()
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".to_string());
    let protocol = Protocol::parse(&protocol).ok_or(ConfigError::Protocol(protocol))?;
    Ok(Some(OtlpConfig {
        protocol,
        endpoint: args.otlp_endpoint.clone(),
    }))
}

/// Whether trace trees go to the terminal.
pub fn console_wanted(args: &RunArgs, otlp: bool) -> bool {
    let listed = |name: &str| {
        env_nonempty("OTEL_TRACES_EXPORTER")
            .is_some_and(|v| v.split(',').any(|e| e.trim().eq_ignore_ascii_case(name)))
    };
    // `none` alone: nothing printed either (metrics and --output still work).
    args.console || listed("console") || (!otlp && !listed("none"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_as_people_write_them() {
        let a = |s: &str| parse_listen_addr(s).map(|a| a.to_string());
        assert_eq!(a(":9464").as_deref(), Ok("0.0.0.0:9464"));
        assert_eq!(a("localhost:9464").as_deref(), Ok("127.0.0.1:9464"));
        assert_eq!(a("127.0.0.1:9464").as_deref(), Ok("127.0.0.1:9464"));
        assert_eq!(a("[::1]:9464").as_deref(), Ok("[::1]:9464"));
        assert!(a("9464").is_err());
        assert!(a(":x").is_err());
    }
}
