//! TLS plaintext: finding the TLS libraries processes use and putting the kernel's uprobes on
//! them (agent-ebpf programs/tls.rs), for processes running when the agent starts and those
//! that start later. A probe goes on the library *file*, once, for every process that maps it:
//! a new curl using the system libssl is traced from its first call, with nothing to attach.
//! New files (a Go program, node, a wheel's bundled libssl) are found by watching /proc.
//!
//! The plaintext then feeds the connection's stream like socket bytes, so every protocol parser
//! works over TLS unchanged (trace/sink.rs keys it apart from the ciphertext).

pub mod discover;
pub mod elf;
pub mod watch;

use std::sync::atomic::{AtomicU64, Ordering};

/// `loupe_tls_*` metrics.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Library files with probes attached, by kind.
    pub openssl_files: AtomicU64,
    pub go_files: AtomicU64,
    /// Files that looked like a TLS library but could not be probed (logged once each).
    pub attach_failed: AtomicU64,
    /// Go programs built before the register ABI (Go 1.17): not probed.
    pub go_unsupported: AtomicU64,
    /// Connections whose plaintext was seen.
    pub hooked_connections: AtomicU64,
    /// Encrypted application records seen on a connection before its plaintext: what was
    /// missed before the probes were on (a program started just now, or a connection idle in a
    /// library call since before the agent).
    pub missed_records: AtomicU64,
    /// Encrypted connections never seen in plaintext, by library (`UNHOOKED_LIBRARIES`).
    pub unhooked: [AtomicU64; UNHOOKED_LIBRARIES.len()],
}

/// The `library` label of `loupe_tls_unhooked_total` (discover::library_of).
pub const UNHOOKED_LIBRARIES: [&str; 6] = ["openssl", "go", "java", "gnutls", "nss", "unknown"];

impl TlsStats {
    pub fn count_unhooked(&self, library: &str) {
        let i = UNHOOKED_LIBRARIES
            .iter()
            .position(|l| *l == library)
            .unwrap_or(UNHOOKED_LIBRARIES.len() - 1);
        self.unhooked[i].fetch_add(1, Ordering::Relaxed);
    }
}
