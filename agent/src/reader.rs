//! Drains the kernel ring buffer on tokio, decodes each record and hands it to the pipeline
//! through a bounded channel. Nothing is dropped silently: decode failures and a full channel
//! are counted.
//!
//! The kernel programs never wake the reader (a wakeup per record was the largest cost of the
//! send path, agent-ebpf/src/helpers/emit.rs): a 10 ms timer drains the ring. The fd stays
//! registered so that a kernel that does signal readiness is served at once.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc, sync::watch};

use crate::{
    decode::{Event, decode},
    pipeline::Userspace,
};

/// Longest a record waits in the ring.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

pub async fn run(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<Event>,
    stats: Arc<Userspace>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, so the fd stays open for
    // exactly as long as it is registered.
    let mut poll = tokio::time::interval(DRAIN_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &tx, &stats);
                guard.clear_ready();
            }
            _ = poll.tick() => drain(fd.get_mut(), &tx, &stats),
            _ = stop.changed() => {
                // What the kernel wrote before we were told to stop still belongs to the run.
                drain(fd.get_mut(), &tx, &stats);
                return Ok(());
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
