//! The thread that keeps the TLS probes on every library in use: a scan of every process at
//! start, then new processes within `NEW_PROCESS_POLL` (each looked at again after
//! `SECOND_LOOK`, for libraries loaded after start: Python imports `ssl` when first needed),
//! and a full rescan every `FULL_RESCAN`. Each file is examined once; the probes stay until the
//! agent exits, when closing their perf events removes them (also after kill -9).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};

use crate::bpf::load::PoolWakeups;

use super::{
    TlsStats,
    discover::{self, Candidate, FileId},
    elf::{self, Target},
};

const NEW_PROCESS_POLL: Duration = Duration::from_millis(200);
const SECOND_LOOK: Duration = Duration::from_secs(2);
const FULL_RESCAN: Duration = Duration::from_secs(10);

/// Stops the thread when dropped.
pub struct TlsWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for TlsWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Scans every process once before returning (so that "ready" means the probes of running
/// processes are on), then watches in the background. `go` learns which processes are Go
/// programs (their events are keyed by goroutine).
/// `probes`: the uprobe programs are loaded (TLS on and accepted by the verifier); without
/// them the watcher still finds Go programs and JVMs. `pool_wakeups`: `sched_waking` loaded,
/// to be attached while a JVM runs.
pub fn start(
    ebpf: Arc<Mutex<Ebpf>>,
    stats: Arc<TlsStats>,
    go: GoPids,
    probes: bool,
    pool_wakeups: bool,
) -> TlsWatch {
    let mut attacher = Attacher {
        ebpf,
        stats,
        examined: HashMap::new(),
        go_files: std::collections::HashSet::new(),
        go,
        jvms: std::collections::HashSet::new(),
        pool_wakeups: PoolWakeups::new(pool_wakeups),
        probes,
        own_pid: std::process::id(),
    };
    let mut seen: HashMap<u32, (Instant, bool)> = HashMap::new();
    let now = Instant::now();
    for pid in discover::pids() {
        attacher.scan(pid);
        seen.insert(pid, (now, true));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("loupe-tls".into())
        .spawn(move || {
            crate::scheduling::ADAPTIVE.batch();
            let mut last_full = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(NEW_PROCESS_POLL);
                let now = Instant::now();
                let full = now.duration_since(last_full) >= FULL_RESCAN;
                if full {
                    last_full = now;
                }
                let pids = discover::pids();
                let mut alive = HashMap::with_capacity(pids.len());
                for pid in pids {
                    let entry = match seen.get(&pid) {
                        None => {
                            attacher.scan(pid);
                            (now, false)
                        }
                        Some(&(first, looked_again)) => {
                            if full || (!looked_again && now.duration_since(first) >= SECOND_LOOK) {
                                attacher.scan(pid);
                                (first, true)
                            } else {
                                (first, looked_again)
                            }
                        }
                    };
                    alive.insert(pid, entry);
                }
                attacher.go.retain(|pid| alive.contains_key(pid));
                attacher.forget_jvms(|pid| alive.contains_key(pid));
                seen = alive;
            }
        })
        .expect("spawning a thread");
    TlsWatch {
        stop,
        thread: Some(thread),
    }
}

/// The processes that run a Go program: found by the watcher, read by the pipeline.
#[derive(Clone, Default)]
pub struct GoPids {
    pids: Arc<std::sync::RwLock<std::collections::HashSet<u32>>>,
    /// Bumped on every change, so that readers copy the set only then.
    pub version: Arc<std::sync::atomic::AtomicU64>,
}

impl GoPids {
    fn insert(&self, pid: u32) {
        if let Ok(mut p) = self.pids.write()
            && p.insert(pid)
        {
            self.version.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn retain(&self, keep: impl Fn(&u32) -> bool) {
        if let Ok(mut p) = self.pids.write() {
            let before = p.len();
            p.retain(keep);
            if p.len() != before {
                self.version.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[cfg(test)]
    pub fn insert_for_tests(&self, pid: u32) {
        self.insert(pid);
    }

    pub fn snapshot(&self) -> std::collections::HashSet<u32> {
        self.pids.read().map(|p| p.clone()).unwrap_or_default()
    }
}

struct Attacher {
    ebpf: Arc<Mutex<Ebpf>>,
    stats: Arc<TlsStats>,
    /// Every file looked at, probed or not: each is examined once.
    examined: HashMap<FileId, ()>,
    /// Executables that are Go programs (register ABI).
    go_files: std::collections::HashSet<FileId>,
    go: GoPids,
    /// Processes running a JVM, as put in the kernel's POOL_PIDS.
    jvms: std::collections::HashSet<u32>,
    /// The program that reports their futex wakes, attached while there is one.
    pool_wakeups: PoolWakeups,
    probes: bool,
    own_pid: u32,
}

impl Attacher {
    fn scan(&mut self, pid: u32) {
        if pid == self.own_pid {
            return;
        }
        let found = discover::candidates(pid);
        for c in &found.candidates {
            if self.examined.insert(c.id, ()).is_none() {
                self.examine(pid, c);
            }
            if self.go_files.contains(&c.id) {
                self.go.insert(pid);
            }
        }
        if found.jvm && !self.jvms.contains(&pid) {
            self.pool_pid(pid, true);
        }
    }

    /// Marks (or unmarks) a process whose futex wakes the kernel reports (programs/sched.rs).
    fn pool_pid(&mut self, pid: u32, on: bool) {
        let ebpf = Arc::clone(&self.ebpf);
        let Ok(mut ebpf) = ebpf.lock() else { return };
        let Some(map) = ebpf.map_mut("POOL_PIDS") else {
            return;
        };
        let Ok(mut map) = aya::maps::HashMap::<_, u32, u8>::try_from(map) else {
            return;
        };
        if on {
            if map.insert(pid, 1, 0).is_ok() {
                self.jvms.insert(pid);
            }
        } else {
            let _ = map.remove(&pid);
            self.jvms.remove(&pid);
        }
        // Written after the map changed: the kernel tests this count before the map.
        if let Some(map) = ebpf.map_mut("POOL_COUNT")
            && let Ok(mut count) = aya::maps::Array::<_, u32>::try_from(map)
        {
            let _ = count.set(0, self.jvms.len() as u32, 0);
        }
        self.pool_wakeups.follow(&mut ebpf, !self.jvms.is_empty());
    }

    fn forget_jvms(&mut self, alive: impl Fn(&u32) -> bool) {
        let gone: Vec<u32> = self.jvms.iter().copied().filter(|p| !alive(p)).collect();
        for pid in gone {
            self.pool_pid(pid, false);
        }
    }

    fn examine(&mut self, pid: u32, c: &Candidate) {
        // Held open while probing and probed through /proc/self/fd: the process (and with it
        // /proc/PID/exe or /proc/PID/root) may be gone a millisecond after its exec.
        let Ok(file) = std::fs::File::open(&c.open_path) else {
            return;
        };
        let target = match elf::examine_file(&file) {
            Ok(t) => t,
            // Not an ELF file (a script's interpreter is the exe).
            Err(_) => return,
        };
        let path = std::path::PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ));
        let path = path.as_path();
        if !self.probes {
            if let Target::Go(_) = target {
                self.go_files.insert(c.id);
            }
            return;
        }
        let result = match &target {
            Target::None => return,
            Target::GoUnsupported(version) => {
                self.stats.go_unsupported.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "{} (pid {pid}) is built with {version}; Loupe reads Go 1.18+ programs (register ABI, inline build info): its TLS is counted, not traced, and its requests are followed by thread, not goroutine",
                    c.shown_path
                );
                return;
            }
            Target::OpenSsl(o) => self.attach_openssl(path, o).map(|()| {
                self.stats.openssl_files.fetch_add(1, Ordering::Relaxed);
                let sites = match (o.read_inner, o.write_inner) {
                    (Some(_), Some(_)) => "the functions SSL_read/_write wrap",
                    (None, None) => "SSL_read/_write",
                    _ => "SSL_read/_write or the functions they wrap",
                };
                tracing::info!(
                    "TLS: OpenSSL probed in {} (pid {pid}) at {sites}",
                    c.shown_path
                );
            }),
            Target::Go(g) => {
                self.go_files.insert(c.id);
                self.attach_go(path, g).map(|()| {
                    if let Some(tls) = &g.tls {
                        self.stats.go_files.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            "TLS: Go {} crypto/tls probed in {} (pid {pid}, {} return points)",
                            g.version,
                            c.shown_path,
                            tls.read_returns.len()
                        );
                    }
                    if g.http.is_some() {
                        tracing::info!(
                            "Go {} net/http client handoff probed in {} (pid {pid})",
                            g.version,
                            c.shown_path
                        );
                    }
                })
            }
        };
        if let Err(err) = result {
            self.stats.attach_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "TLS: cannot probe {} (pid {pid}): {err:#}; its encrypted connections are counted, not traced",
                c.shown_path
            );
        }
    }

    fn attach_openssl(&self, path: &Path, o: &elf::OpenSsl) -> anyhow::Result<()> {
        let (Some(write), Some(read)) = (o.write, o.read) else {
            anyhow::bail!("SSL_write or SSL_read is missing");
        };
        let mut points = Vec::new();
        // The function both wrappers call, where a probe costs one trap instead of two
        // (elf::inner_site); it has SSL_read_ex's and SSL_write_ex's arguments.
        match o.write_inner {
            Some(inner) => points.push(("ssl_write", inner)),
            None => {
                points.push(("ssl_write", write));
                points.extend(o.write_ex.map(|w| ("ssl_write", w)));
            }
        }
        match o.read_inner {
            Some(inner) => points.extend([("ssl_read_ex", inner), ("ssl_read_ret", inner)]),
            None => {
                points.extend([("ssl_read", read), ("ssl_read_ret", read)]);
                if let Some(r) = o.read_ex {
                    points.extend([("ssl_read_ex", r), ("ssl_read_ret", r)]);
                }
            }
        }
        self.attach_all(path, &points)
    }

    fn attach_go(&self, path: &Path, g: &elf::GoProgram) -> anyhow::Result<()> {
        let mut points = Vec::new();
        if let Some(tls) = &g.tls {
            points.extend([("go_tls_write", tls.write), ("go_tls_read", tls.read)]);
            if let Some(h) = tls.handshake {
                points.push(("go_tls_handshake", h));
            }
            points.extend(tls.read_returns.iter().map(|&r| ("go_tls_read_ret", r)));
        }
        if let Some(http) = &g.http {
            points.extend([
                ("go_http_round_trip", http.round_trip),
                ("go_http_request_write", http.request_write),
            ]);
        }
        self.attach_all(path, &points)
    }

    /// All or nothing: a file probed in part would deliver, say, writes without reads.
    fn attach_all(&self, path: &Path, points: &[(&str, u64)]) -> anyhow::Result<()> {
        let mut ebpf = self.lock()?;
        let mut done = Vec::with_capacity(points.len());
        for &(program, offset) in points {
            match attach(&mut ebpf, program, path, offset) {
                Ok(link) => done.push((program, link)),
                Err(err) => {
                    for (program, link) in done {
                        if let Some(Ok(p)) = ebpf.program_mut(program).map(<&mut UProbe>::try_from)
                        {
                            let _ = p.detach(link);
                        }
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Ebpf>> {
        self.ebpf
            .lock()
            .map_err(|_| anyhow::anyhow!("the kernel object's lock is poisoned"))
    }
}

fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    path: &Path,
    offset: u64,
) -> anyhow::Result<aya::programs::uprobe::UProbeLinkId> {
    let p: &mut UProbe = ebpf
        .program_mut(program)
        .with_context(|| format!("kernel object has no program {program}"))?
        .try_into()?;
    p.attach(offset, path, UProbeScope::AllProcesses)
        .with_context(|| format!("{program} at {offset:#x}"))
}
