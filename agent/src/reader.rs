//! Drains the kernel ring buffer on a thread of its own, decodes each record and hands them to
//! the pipeline in batches (`event_queue`, bounded in events). Nothing is dropped silently:
//! decode failures and a full queue are counted.
//!
//! The kernel programs never wake the reader (a wakeup per record was the largest cost of the
//! send path, agent-ebpf/src/helpers/emit.rs): the reader looks every 10 ms, and at once when a
//! program does ask for a wakeup (a process's first connection; on the syscall capture path,
//! every connection's first event). Under light traffic it lets the records gather for up to
//! 40 ms (`HOLD_MS`) before a drain: each drain wakes the pipeline, whose first events after a
//! pause in another process's shadow run with cold caches, and that, not the events, was most
//! of the agent's CPU at a few thousand requests a second.
//!
//! Why not a tokio task: the ring is the one stage whose lateness loses data (a full ring drops
//! in the kernel), and on the runtime's two workers a drain could wait behind a long poll of the
//! pipeline or the exporter: a 64 KiB ring filled during such a wait after a flood. A thread
//! that only drains is never behind anything but the scheduler. With `--cpu-scheduling
//! adaptive` (the default) it runs at SCHED_IDLE while the agent keeps up, and a watchdog thread
//! (`watch`) raises it when the ring fills (scheduling.rs says why).

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use crate::{
    decode::{PayloadArena, decode_with},
    event_queue::{BATCH, EventSender},
    pipeline::Userspace,
    scheduling::ADAPTIVE,
};
use aya::maps::{MapData, RingBuf};

/// Longest a record waits in the ring while few arrive.
const DRAIN_INTERVAL_MS: i32 = 10;
/// The wait while many arrive. Each drain is a burst of pipeline work, and on the 2-core bench
/// machine the traced server's tail latency follows the burst's length even with the agent at
/// SCHED_IDLE: nginx at 60k req/s, every process traced, p99 1.18 ms with 10 ms drains, 0.70-0.77
/// with 2 ms, 0.64-0.67 with 1 ms (0.29 without the agent); agent CPU +6.5% at 2 ms, +15% at 1 ms
/// (a wakeup of the reader and the pipeline per drain).
const BUSY_DRAIN_INTERVAL_MS: i32 = 2;
/// Events a 10 ms wait would gather beyond which the wait is shortened: about half a
/// millisecond of pipeline work.
const BURST_EVENTS: u64 = 512;
/// Under light traffic, the longest records are held in the ring before a drain. gRPC unary
/// calls at a fixed 1 600/s (grpcio and h2load, both traced): agent 29-30 user and 6-9 system
/// ticks per 10 s with a drain every 10 ms, 17 and 3 with one every 40 ms.
const HOLD_MS: u64 = 40;
/// Bytes waiting in the ring at which a held drain goes at once: about BURST_EVENTS records
/// of a few hundred bytes, so a drain stays a short burst; at most an eighth of the ring, so a
/// flood after a quiet spell finds it no fuller than a 10 ms wait did.
const HOLD_BYTES: usize = 128 << 10;

/// The running reader: `stop` drains what the kernel wrote so far, then ends the thread.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
    watchdog: Option<JoinHandle<()>>,
}

impl Reader {
    pub fn spawn(
        ring: RingBuf<MapData>,
        tx: EventSender,
        stats: Arc<Userspace>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let fd = ring.as_fd().as_raw_fd();
        let ring_bytes = ring_size(fd);
        // One mapping of the ring's positions, for the reader's holds and the watchdog's looks.
        let fill = Fill::new(fd, ring_bytes).map(Arc::new);
        if fill.is_none() {
            tracing::debug!("the ring's fill level cannot be read: it is drained every 10 ms");
        }
        // The reader may run idle only while something that is never starved watches the ring.
        let watchdog = match &fill {
            Some(fill) if ADAPTIVE.enabled() => {
                let (fill, flag) = (fill.clone(), stop.clone());
                Some(
                    std::thread::Builder::new()
                        .name("loupe-ring-watch".into())
                        .spawn(move || watch(&fill, ring_bytes, &flag))
                        .map_err(|e| {
                            anyhow::anyhow!("starting the ring-buffer watchdog thread: {e}")
                        })?,
                )
            }
            _ => None,
        };
        let watched = watchdog.is_some();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("loupe-ring".into())
            .spawn(move || {
                // Leaves the adaptive group however the thread ends, so a reused tid is never
                // re-prioritised.
                struct Member;
                impl Drop for Member {
                    fn drop(&mut self) {
                        ADAPTIVE.leave();
                    }
                }
                let _member = watched.then(|| {
                    ADAPTIVE.join_batch();
                    Member
                });
                if !watched {
                    ADAPTIVE.batch();
                }
                run(ring, ring_bytes, fill.as_deref(), &tx, &stats, &flag)
            })
            .map_err(|e| {
                // The watchdog, if it started, ends with the reader it would have watched.
                stop.store(true, Ordering::Release);
                anyhow::anyhow!("starting the ring-buffer reader thread: {e}")
            })?;
        Ok(Self {
            stop,
            thread,
            watchdog,
        })
    }

    /// Drains what the kernel wrote before the call (it still belongs to the run) and waits for
    /// the thread, at most one poll interval.
    pub async fn stop(self) -> anyhow::Result<()> {
        // The last drain and what follows it must not wait at idle priority on a busy host;
        // the watchdog stops looking now.
        ADAPTIVE.pressure();
        self.stop.store(true, Ordering::Release);
        let (thread, watchdog) = (self.thread, self.watchdog);
        tokio::task::spawn_blocking(move || {
            if let Some(w) = watchdog {
                let _ = w.join();
            }
            thread.join()
        })
        .await
        .map_err(|e| anyhow::anyhow!("waiting for the ring-buffer reader: {e}"))?
        .map_err(|_| anyhow::anyhow!("the ring-buffer reader panicked"))?
    }
}

/// The share of the ring waiting at which the watchdog raises the agent's threads: well above
/// what an idle reader leaves while the agent keeps up (nginx at half its saturation, every
/// process traced: up to a quarter of the default ring, ~30 ms of records, when both cores were
/// busy for that long), and one look's worth of records (`poll_interval_ms`, ~1/7 of the
/// ring's time at saturation) short of full even then.
const RAISE_AT_RING_FRACTION: usize = 2;

/// The ring's watchdog: SCHED_BATCH (never starved, never preempting), one look per poll
/// interval at how much of the ring waits; half raises the reader and the pipeline
/// (`ADAPTIVE.pressure`) and keeps them raised for a calm second more.
fn watch(fill: &Fill, ring_bytes: usize, stop: &AtomicBool) {
    ADAPTIVE.batch();
    let every = std::time::Duration::from_millis(poll_interval_ms(ring_bytes) as u64);
    let raise_at = ring_bytes / RAISE_AT_RING_FRACTION;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(every);
        if fill.waiting() >= raise_at {
            ADAPTIVE.pressure();
        }
    }
}

fn run(
    mut ring: RingBuf<MapData>,
    ring_bytes: usize,
    fill: Option<&Fill>,
    tx: &EventSender,
    stats: &Userspace,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let wakeups = Wakeups::new(ring.as_fd().as_raw_fd())?;
    let poll_ms = poll_interval_ms(ring_bytes);
    let mut arena = PayloadArena::default();
    let mut previous_ns = crate::clock::monotonic_ns();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        // What the pipeline left of the previous drains: it keeps up if that is near nothing.
        let waiting = tx.waiting();
        stats
            .events_waiting
            .store(waiting as u64, Ordering::Relaxed);
        ADAPTIVE.observe(waiting, crate::clock::monotonic_ns());
        let drained = drain(&mut ring, tx, stats, &mut arena);
        if stopping {
            return Ok(());
        }
        let now_ns = crate::clock::monotonic_ns();
        let wait_ms = next_wait_ms(drained, now_ns.saturating_sub(previous_ns));
        previous_ns = now_ns;
        let mut woken = wakeups.wait(wait_ms.min(poll_ms))?;
        Userspace::add(&stats.ring_wakeups, u64::from(woken));
        // Light traffic: the records gather while they are few and young.
        if let Some(fill) = fill
            && wait_ms == DRAIN_INTERVAL_MS
        {
            while !woken
                && !stop.load(Ordering::Acquire)
                && keep_holding(
                    fill.waiting(),
                    fill.hold_bytes,
                    crate::clock::monotonic_ns().saturating_sub(now_ns),
                    poll_ms,
                )
            {
                woken = wakeups.wait(poll_ms)?;
                Userspace::add(&stats.ring_wakeups, u64::from(woken));
            }
        }
    }
}

/// Whether a held drain waits one more interval of `step_ms`: fewer than `hold_bytes` wait in
/// the ring and another interval keeps the oldest record within `HOLD_MS` (`held_ns` since the
/// last drain).
fn keep_holding(waiting: usize, hold_bytes: usize, held_ns: u64, step_ms: i32) -> bool {
    waiting < hold_bytes && held_ns + step_ms as u64 * 1_000_000 <= HOLD_MS * 1_000_000
}

/// How often the reader looks at a ring of `ring_bytes`: every 10 ms for the default 8 MiB,
/// proportionally more often for a smaller one (down to every millisecond), so that a ring of any
/// size holds the same time's worth of records. The kernel wakes the reader only for a
/// process's first connection, and a burst of new connections into a 64 KiB ring (a test's
/// `--ring-buffer-bytes`) overflowed between 10 ms looks.
fn poll_interval_ms(ring_bytes: usize) -> i32 {
    let scaled = ring_bytes as u64 * DRAIN_INTERVAL_MS as u64 / (8 << 20);
    scaled.clamp(1, DRAIN_INTERVAL_MS as u64) as i32
}

/// The ring's size from its fdinfo (`max_entries`), or the default 8 MiB.
fn ring_size(ring: std::os::fd::RawFd) -> usize {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{ring}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("max_entries:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
        })
        .unwrap_or(8 << 20)
}

/// The ring's two position pages, mapped read-only beside aya's own mapping: how many bytes
/// the kernel has written that the reader has not consumed, without draining anything.
struct Fill {
    map: *mut libc::c_void,
    page: usize,
    hold_bytes: usize,
}

// SAFETY: a read-only mapping, read with atomic loads only, unmapped once on drop.
unsafe impl Send for Fill {}
// SAFETY: as above: shared by the reader and the watchdog, which only load from it.
unsafe impl Sync for Fill {}

impl Fill {
    fn new(ring: std::os::fd::RawFd, ring_bytes: usize) -> Option<Self> {
        // SAFETY: plain sysconf.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        // The consumer position is the first word of page 0, the producer's of page 1; the
        // kernel allows any read-only mapping of a ring buffer map.
        // SAFETY: a new shared read-only mapping of the ring's fd; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                ring,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            map,
            page,
            hold_bytes: HOLD_BYTES.min(ring_bytes / 8),
        })
    }

    /// Bytes written and not yet consumed (records reserved and not yet committed included).
    fn waiting(&self) -> usize {
        // SAFETY: both words lie in the mapping, page-aligned; the kernel and aya update them
        // atomically.
        let (consumer, producer) = unsafe {
            (
                &*self.map.cast::<std::sync::atomic::AtomicUsize>(),
                &*self
                    .map
                    .cast::<u8>()
                    .add(self.page)
                    .cast::<std::sync::atomic::AtomicUsize>(),
            )
        };
        let producer = producer.load(Ordering::Acquire);
        producer.saturating_sub(consumer.load(Ordering::Acquire))
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.map, 2 * self.page) };
    }
}

/// The kernel's wakeups of the ring, edge-triggered. A level-triggered poll of a ring buffer
/// returns at once whenever a record is waiting, which under load turns the 10 ms drain into a
/// busy loop of small batches, each waking the pipeline (measured: 2 650 polls/s at 45k req/s);
/// an edge is raised only when a program asks for a wakeup.
struct Wakeups {
    epoll: std::os::fd::OwnedFd,
}

impl Wakeups {
    fn new(ring: std::os::fd::RawFd) -> anyhow::Result<Self> {
        // SAFETY: plain syscalls; the returned fd is owned from here on.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            anyhow::bail!(
                "creating an epoll instance for the ring buffer: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: `epoll` is a fresh fd that nothing else owns.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(epoll) };
        let mut interest = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: both fds are open; the ring outlives the epoll instance (same thread, dropped
        // after it).
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, ring, &mut interest) }
            < 0
        {
            anyhow::bail!(
                "watching the ring buffer: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { epoll })
    }

    /// Returns on a wakeup (true) or after `timeout_ms` (false).
    fn wait(&self, timeout_ms: i32) -> anyhow::Result<bool> {
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: one writable event slot.
        let n =
            unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ready.as_mut_ptr(), 1, timeout_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                anyhow::bail!("waiting on the ring buffer: {err}");
            }
            // A signal: drain, as after a wakeup.
            return Ok(true);
        }
        Ok(n > 0)
    }
}

/// The wait before the next drain, from what the last one found (`drained` records gathered in
/// `elapsed_ns`): short when a full interval would gather a long burst.
fn next_wait_ms(drained: u64, elapsed_ns: u64) -> i32 {
    const MS: u128 = 1_000_000;
    // At least a millisecond: a drain the kernel's wakeup started right after the last one
    // says nothing about the rate.
    let elapsed = u128::from(elapsed_ns).max(MS);
    if u128::from(drained) * DRAIN_INTERVAL_MS as u128 * MS > u128::from(BURST_EVENTS) * elapsed {
        BUSY_DRAIN_INTERVAL_MS
    } else {
        DRAIN_INTERVAL_MS
    }
}

/// Hands every record in the ring to the pipeline; returns how many there were.
fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &EventSender,
    stats: &Userspace,
    arena: &mut PayloadArena,
) -> u64 {
    let mut drained = 0;
    let mut batch = Vec::new();
    let hand_over = |batch: Vec<_>| {
        let dropped = tx.send(batch);
        if dropped > 0 {
            Userspace::add(&stats.channel_full, dropped as u64);
        }
    };
    while let Some(item) = ring.next() {
        drained += 1;
        match decode_with(&item, arena) {
            Ok(event) => {
                if batch.capacity() == 0 {
                    batch = tx.batch();
                }
                batch.push(event);
                if batch.len() == BATCH {
                    hand_over(std::mem::take(&mut batch));
                }
            }
            Err(err) => {
                Userspace::add(&stats.decode_errors, 1);
                tracing::trace!("dropping undecodable record: {err}");
            }
        }
    }
    if !batch.is_empty() {
        // A wakeup's drain is often one event: a queue of such batches at full size would be
        // 3 GiB (65 536 x 256 events' room), so a short one travels in an allocation its size.
        if batch.len() < BATCH / 4 {
            let mut short = Vec::with_capacity(batch.len());
            short.append(&mut batch);
            hand_over(short);
            tx.recycle(batch);
        } else {
            hand_over(batch);
        }
    }
    Userspace::add(&stats.events_read, drained);
    drained
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_held_drain_goes_once_enough_bytes_wait_or_the_oldest_would_be_too_old() {
        const MS: u64 = 1_000_000;
        // Few bytes, young: one more interval.
        assert!(keep_holding(0, HOLD_BYTES, 0, 10));
        assert!(keep_holding(HOLD_BYTES - 1, HOLD_BYTES, 29 * MS, 10));
        // Enough bytes: now.
        assert!(!keep_holding(HOLD_BYTES, HOLD_BYTES, 0, 10));
        // Another 10 ms would pass HOLD_MS: now.
        assert!(keep_holding(1, HOLD_BYTES, (HOLD_MS - 10) * MS, 10));
        assert!(!keep_holding(1, HOLD_BYTES, (HOLD_MS - 10) * MS + 1, 10));
        // Looking every millisecond, it holds until the last one.
        assert!(keep_holding(1, HOLD_BYTES, (HOLD_MS - 1) * MS, 1));
        assert!(!keep_holding(1, HOLD_BYTES, (HOLD_MS - 1) * MS + 1, 1));
    }

    #[test]
    fn a_smaller_ring_is_looked_at_more_often() {
        assert_eq!(poll_interval_ms(8 << 20), 10);
        assert_eq!(poll_interval_ms(64 << 20), 10);
        assert_eq!(poll_interval_ms(4 << 20), 5);
        assert_eq!(poll_interval_ms(1 << 20), 1);
        assert_eq!(poll_interval_ms(64 << 10), 1);
    }

    #[test]
    fn the_wait_shortens_only_when_a_full_interval_would_gather_a_long_burst() {
        // Idle or light: the full interval.
        assert_eq!(next_wait_ms(0, 10 * MS), DRAIN_INTERVAL_MS);
        assert_eq!(next_wait_ms(400, 10 * MS), DRAIN_INTERVAL_MS);
        // 160k events/s (nginx at 40k req/s, both ends traced): short, and still short once
        // seen over the short wait, so the reader does not swing between the two.
        assert_eq!(next_wait_ms(1_600, 10 * MS), BUSY_DRAIN_INTERVAL_MS);
        assert_eq!(next_wait_ms(320, 2 * MS), BUSY_DRAIN_INTERVAL_MS);
        // 40k events/s, seen over a short wait: back to the full interval.
        assert_eq!(next_wait_ms(80, 2 * MS), DRAIN_INTERVAL_MS);
        // A kernel wakeup right after a drain (a process's first connection) is not a rate.
        assert_eq!(next_wait_ms(1, 0), DRAIN_INTERVAL_MS);
        assert_eq!(next_wait_ms(40, 50_000), DRAIN_INTERVAL_MS);
        assert_eq!(next_wait_ms(u64::MAX, u64::MAX), BUSY_DRAIN_INTERVAL_MS);
    }
}
