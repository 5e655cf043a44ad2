//! Drains the kernel ring buffer on a thread of its own, decodes each record and hands it to the
//! pipeline through a bounded channel. Nothing is dropped silently: decode failures and a full
//! channel are counted.
//!
//! The kernel programs never wake the reader (a wakeup per record was the largest cost of the
//! send path, agent-ebpf/src/helpers/emit.rs): the reader polls the ring's fd with a 10 ms
//! timeout, so a kernel that does signal readiness (a connection's first event) is served at once.
//!
//! Why not a tokio task: the ring is the one stage whose lateness loses data (a full ring drops
//! in the kernel), and on the runtime's two workers a drain could wait behind a long poll of the
//! pipeline or the exporter: a 64 KiB ring filled during such a wait after a flood. A thread
//! that only drains is never behind anything but the scheduler.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;

use crate::{
    decode::{Event, decode},
    pipeline::Userspace,
};

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
        tx: mpsc::Sender<Event>,
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
    tx: &mpsc::Sender<Event>,
    stats: &Userspace,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let fd = ring.as_fd().as_raw_fd();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        drain(&mut ring, tx, stats);
        if stopping {
            return Ok(());
        }
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the ring owns the fd for the whole loop.
        let n = unsafe { libc::poll(&mut pollfd, 1, DRAIN_INTERVAL_MS) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(anyhow::anyhow!("polling the ring buffer: {err}"));
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Event>, stats: &Userspace) {
    while let Some(item) = ring.next() {
        Userspace::add(&stats.events_read, 1);
        match decode(&item) {
            Ok(event) => {
                if tx.try_send(event).is_err() {
                    Userspace::add(&stats.channel_full, 1);
                }
            }
            Err(err) => {
                Userspace::add(&stats.decode_errors, 1);
                tracing::trace!("dropping undecodable record: {err}");
            }
        }
    }
}
