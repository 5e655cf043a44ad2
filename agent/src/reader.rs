//! Drains the kernel ring buffer on a thread of its own, decodes each record and hands them to
//! the pipeline in batches (`event_queue`, bounded in events). Nothing is dropped silently:
//! decode failures and a full queue are counted.
//!
//! The kernel programs never wake the reader (a wakeup per record was the largest cost of the
//! send path, agent-ebpf/src/helpers/emit.rs): the reader drains every 10 ms, and at once when a
//! program does ask for a wakeup (a connection's first event).
//!
//! Why not a tokio task: the ring is the one stage whose lateness loses data (a full ring drops
//! in the kernel), and on the runtime's two workers a drain could wait behind a long poll of the
//! pipeline or the exporter: a 64 KiB ring filled during such a wait after a flood. A thread
//! that only drains is never behind anything but the scheduler.

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
};
use aya::maps::{MapData, RingBuf};

/// Longest a record waits in the ring.
const DRAIN_INTERVAL_MS: i32 = 10;

/// The running reader: `stop` drains what the kernel wrote so far, then ends the thread.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl Reader {
    pub fn spawn(
        ring: RingBuf<MapData>,
        tx: EventSender,
        stats: Arc<Userspace>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("loupe-ring".into())
            .spawn(move || run(ring, &tx, &stats, &flag))
            .map_err(|e| anyhow::anyhow!("starting the ring-buffer reader thread: {e}"))?;
        Ok(Self { stop, thread })
    }

    /// Drains what the kernel wrote before the call (it still belongs to the run) and waits for
    /// the thread, at most one poll interval.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| anyhow::anyhow!("waiting for the ring-buffer reader: {e}"))?
            .map_err(|_| anyhow::anyhow!("the ring-buffer reader panicked"))?
    }
}

fn run(
    mut ring: RingBuf<MapData>,
    tx: &EventSender,
    stats: &Userspace,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let wakeups = Wakeups::new(ring.as_fd().as_raw_fd())?;
    let mut arena = PayloadArena::default();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        // What the pipeline left of the previous drains: it keeps up if that is near nothing.
        let waiting = tx.waiting();
        stats
            .events_waiting
            .store(waiting as u64, Ordering::Relaxed);
        crate::scheduling::ADAPTIVE.observe(waiting, crate::clock::monotonic_ns());
        drain(&mut ring, tx, stats, &mut arena);
        if stopping {
            return Ok(());
        }
        wakeups.wait(DRAIN_INTERVAL_MS)?;
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

    /// Returns on a wakeup or after `timeout_ms`.
    fn wait(&self, timeout_ms: i32) -> anyhow::Result<()> {
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: one writable event slot.
        let n =
            unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ready.as_mut_ptr(), 1, timeout_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                anyhow::bail!("waiting on the ring buffer: {err}");
            }
        }
        Ok(())
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &EventSender,
    stats: &Userspace,
    arena: &mut PayloadArena,
) {
    let mut batch = Vec::new();
    let hand_over = |batch: Vec<_>| {
        let dropped = tx.send(batch);
        if dropped > 0 {
            Userspace::add(&stats.channel_full, dropped as u64);
        }
    };
    while let Some(item) = ring.next() {
        Userspace::add(&stats.events_read, 1);
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
}
