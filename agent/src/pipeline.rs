//! The consumer side: events -> connection table -> a sink that gets each connection's new
//! stream segments. Also owns periodic idle eviction.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    clock,
    conn::{ConnInfo, ConnTable, Connection, Limits, RoleResolver, Segments, TableStats},
    decode::{CloseEvent, DataEvent, Direction, Event},
    event_queue::EventReceiver,
    goroutines::Goroutines,
};

/// Counters written by the userspace stages.
#[derive(Debug, Default)]
pub struct Userspace {
    pub events_read: AtomicU64,
    /// Drains the kernel asked for (a process's first connection), beside the timed ones.
    pub ring_wakeups: AtomicU64,
    pub decode_errors: AtomicU64,
    pub channel_full: AtomicU64,
    /// Events read and not yet handled by the pipeline, as the reader last saw (a gauge).
    pub events_waiting: AtomicU64,
    pub table: Mutex<TableStats>,
}

impl Userspace {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Where reassembled streams go.
pub trait Sink {
    /// A data event was added to `conn`'s stream in `dir`; `segments` is what it made available
    /// (a leading gap if bytes were lost before it).
    fn data(&mut self, conn: &ConnInfo, ev: &DataEvent, dir: Direction, segments: Segments);
    fn closed(&mut self, conn: &ConnInfo, ev: Option<&CloseEvent>);
    /// Thread `ev.parent_tid` created `ev.child_tid`.
    fn fork(&mut self, _ev: &crate::decode::ForkEvent) {}
    /// A selected process ran a new program.
    fn exec(&mut self, _ev: crate::decode::ExecEvent) {}
    /// A thread of a pool runtime woke another.
    fn wake(&mut self, _ev: &crate::decode::WakeEvent) {}
    /// Called about once a second with the monotonic time: for timeouts.
    fn tick(&mut self, _now_ns: u64) {}
    /// A batch of events is handled: what it made may go on (spans travel per batch).
    fn batch_done(&mut self) {}
    /// Called on every tick, and once events pause (`QUIET` after the last batch): nothing
    /// made so far waits any longer.
    fn flush(&mut self) {}
    /// The run is over: nothing is held back any more.
    fn drain(&mut self) {}
}

/// Events stopped coming this long ago: what the sink holds back for larger hand-overs
/// (`Sink::batch_done`) goes on now instead of at the next tick, up to a second later.
const QUIET: Duration = Duration::from_millis(50);

pub async fn run<S: Sink>(
    mut rx: EventReceiver,
    limits: Limits,
    mut resolver: impl RoleResolver,
    sink: &mut S,
    stats: Arc<Userspace>,
    go: crate::tls::watch::GoPids,
) {
    let mut goroutines = Goroutines::new(go);
    let mut table = ConnTable::new(limits);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    // When what the last batches made goes on if no batch comes first.
    let mut quiet_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(mut batch) = batch else { break };
                for event in batch.events.drain(..) {
                    handle(&mut table, &mut goroutines, event, &mut resolver, sink);
                }
                sink.batch_done();
                quiet_at = Some(tokio::time::Instant::now() + QUIET);
            }
            _ = tokio::time::sleep_until(quiet_at.unwrap_or_else(tokio::time::Instant::now)),
                if quiet_at.is_some() => {
                quiet_at = None;
                sink.flush();
            }
            _ = tick.tick() => {
                let now = clock::monotonic_ns();
                sink.tick(now);
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    for conn in table.evict_idle(now) {
                        finish(conn, None, sink);
                    }
                }
                sink.flush();
            }
        }
        if let Ok(mut t) = stats.table.lock() {
            *t = table.stats();
        }
    }
    sink.drain();
    sink.flush();
}

fn handle<S: Sink>(
    table: &mut ConnTable,
    goroutines: &mut Goroutines,
    event: Event,
    resolver: &mut dyn RoleResolver,
    sink: &mut S,
) {
    match event {
        Event::Data(mut ev) => {
            goroutines.rekey(&mut ev);
            let dir = ev.direction;
            // The sink sees the payload through the stream.
            let payload = std::mem::take(&mut ev.payload);
            for evicted in table.make_room(&ev.conn) {
                finish(evicted, None, sink);
            }
            let mut segments = Segments::new();
            if let Some((conn, _)) = table.ingest_payload(&ev, payload, resolver, &mut segments) {
                sink.data(&conn.info, &ev, dir, segments);
            }
        }
        Event::Fork(fork) => sink.fork(&fork),
        Event::Exec(exec) => sink.exec(exec),
        Event::Wake(wake) => sink.wake(&wake),
        Event::Handoff(h) => goroutines.handoff(&h),
        Event::Close(close) => {
            // A TLS connection's plaintext is a connection of its own beside the ciphertext.
            for key in [close.conn, close.conn.plaintext()] {
                let mut close = close.clone();
                close.conn = key;
                if table.close(&close).is_some()
                    && let Some(conn) = table.remove(&close.conn)
                {
                    finish(conn, Some(&close), sink);
                }
            }
        }
    }
}

fn finish<S: Sink>(conn: Connection, close: Option<&CloseEvent>, sink: &mut S) {
    sink.closed(&conn.info, close);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ForkEvent;

    #[derive(Default)]
    struct Counts {
        batches: usize,
        flushes: usize,
    }

    #[derive(Clone, Default)]
    struct Counting(Arc<Mutex<Counts>>);

    impl Sink for Counting {
        fn data(&mut self, _: &ConnInfo, _: &DataEvent, _: Direction, _: Segments) {}
        fn closed(&mut self, _: &ConnInfo, _: Option<&CloseEvent>) {}
        fn batch_done(&mut self) {
            self.0.lock().unwrap().batches += 1;
        }
        fn flush(&mut self) {
            self.0.lock().unwrap().flushes += 1;
        }
    }

    #[tokio::test]
    async fn what_a_batch_made_goes_on_soon_after_events_pause_not_at_the_next_tick() {
        let (tx, rx) = crate::event_queue::channel(16);
        let sink = Counting::default();
        let counts = sink.0.clone();
        let started = std::time::Instant::now();
        let run = tokio::spawn(async move {
            let mut sink = sink;
            run(
                rx,
                Limits::default(),
                crate::conn::NoResolver,
                &mut sink,
                Arc::new(Userspace::default()),
                Default::default(),
            )
            .await
        });
        // The interval's first tick is at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = counts.lock().unwrap().flushes;
        assert!(first >= 1, "the first tick");
        let fork = Event::Fork(ForkEvent {
            ts_ns: 1,
            pid: 1,
            parent_tid: 1,
            child_tid: 2,
        });
        assert_eq!(tx.send(vec![fork]), 0);
        // The next tick is ~900 ms away; the pause is noticed after QUIET (50 ms).
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if counts.lock().unwrap().flushes > first {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "nothing flushed once events paused: it waits for the tick"
            );
        }
        assert_eq!(counts.lock().unwrap().batches, 1);
        drop(tx);
        run.await.unwrap();
    }
}
