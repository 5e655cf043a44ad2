//! tracefs must be mounted for tracepoints to be attached by name.

use std::path::{Path, PathBuf};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs root, mounting it at /sys/kernel/tracing when no tracefs is mounted.
pub fn ensure_mounted() -> anyhow::Result<PathBuf> {
    for root in CANDIDATES {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    let target = CANDIDATES[0];
    tracing::info!("tracefs is not mounted; mounting it at {target}");
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", target])
        .status();
    match status {
        Ok(s) if s.success() && Path::new(target).join("events").is_dir() => {
            Ok(PathBuf::from(target))
        }
        _ => anyhow::bail!(
            "tracefs is not mounted and mounting it at {target} failed: run `mount -t tracefs nodev {target}` as root \
             (in a container, mount the host's /sys/kernel/tracing)"
        ),
    }
}

/// Whether the tracepoint `category:name` exists on this kernel.
pub fn has_tracepoint(root: &Path, category: &str, name: &str) -> bool {
    root.join("events").join(category).join(name).is_dir()
}
