//! Command line: clap flags, each with an environment fallback.

use std::{net::SocketAddr, os::unix::fs::MetadataExt as _, path::PathBuf};

use agent_common::event::{DEFAULT_CAPTURE_BYTES, MAX_PAYLOAD};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "loupe",
    version,
    about = "Distributed traces of uninstrumented services, from eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one line per captured send/receive (process, 4-tuple, direction, bytes, payload).
    Capture(CaptureArgs),
}

#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Only capture these processes (repeat or comma-separate).
    #[arg(long = "pid", env = "LOUPE_PIDS", value_delimiter = ',', global = true)]
    pub pids: Vec<u32>,
    /// Only capture processes in these cgroup v2 directories (e.g. /sys/fs/cgroup/unified/system.slice/nginx.service).
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
    /// Serve Prometheus metrics (drop counters included) on this address, e.g. 127.0.0.1:9464. Off by default.
    #[arg(long, env = "LOUPE_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds between summary lines (events, drops) in the log; 0 turns them off.
    #[arg(
        long,
        env = "LOUPE_SUMMARY_INTERVAL",
        default_value_t = 60,
        global = true
    )]
    pub summary_interval: u64,
}

#[derive(Debug, Args, Clone, Default)]
pub struct CaptureArgs {
    /// JSON lines (payload in base64) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Capture every TCP connection, not only those a protocol parser wants.
    #[arg(long)]
    pub all_protocols: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--capture-bytes must be between 1 and {MAX_PAYLOAD}, got {0}")]
    CaptureBytes(u32),
    #[error("--ring-buffer-bytes must be a power of two of at least 4096, got {0}")]
    RingBuffer(u32),
    #[error("--max-connections must be at least 1")]
    MaxConnections,
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
        Ok(())
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
