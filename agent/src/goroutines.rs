//! Go programs run requests on goroutines, which move between OS threads while many share one:
//! a thread id says nothing about which request an event belongs to. For processes the TLS
//! watcher found to be Go programs, events are keyed by goroutine instead (the kernel reads Go's
//! `g` register at each syscall), and net/http's client handoff (the connection's writer
//! goroutine writes on behalf of the caller, reported by a uprobe pair) maps the writer back to
//! the caller. Causality's thread rules then work per goroutine unchanged.

use foldhash::{HashMap, HashMapExt};

use crate::{
    decode::{DataEvent, HandoffEvent},
    tls::watch::GoPids,
};

/// Writer goroutines remembered at most (a program with more connections than this loses the
/// oldest handoffs, which only costs links).
const MAX_WRITERS: usize = 65_536;

pub struct Goroutines {
    shared: GoPids,
    version: u64,
    go: std::collections::HashSet<u32>,
    /// (pid, writer goroutine) -> the goroutine it writes for.
    writers: HashMap<(u32, u64), u64>,
}

/// A thread-id-shaped key for a goroutine: the top bit set, which no Linux thread id has
/// (pid_max is at most 2^22).
pub fn goroutine_tid(g: u64) -> u32 {
    0x8000_0000 | ((g >> 4) as u32 & 0x7fff_ffff)
}

impl Goroutines {
    pub fn new(shared: GoPids) -> Self {
        Self {
            shared,
            version: u64::MAX,
            go: std::collections::HashSet::new(),
            writers: HashMap::new(),
        }
    }

    pub fn handoff(&mut self, ev: &HandoffEvent) {
        if self.writers.len() >= MAX_WRITERS {
            self.writers.clear();
        }
        self.writers.insert((ev.pid, ev.from), ev.to);
    }

    /// Replaces the event's thread id by its goroutine's, for Go programs.
    pub fn rekey(&mut self, ev: &mut DataEvent) {
        let v = self
            .shared
            .version
            .load(std::sync::atomic::Ordering::Relaxed);
        if v != self.version {
            self.version = v;
            self.go = self.shared.snapshot();
            self.writers.retain(|(pid, _), _| self.go.contains(pid));
        }
        if ev.goroutine == 0 || !self.go.contains(&ev.pid) {
            return;
        }
        let g = self
            .writers
            .get(&(ev.pid, ev.goroutine))
            .copied()
            .unwrap_or(ev.goroutine);
        ev.tid = goroutine_tid(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goroutine_keys_never_look_like_thread_ids() {
        for g in [
            0x0000_00c0_0000_61a0,
            0x0000_00c0_0010_2400,
            0x0000_0040_0000_0000,
        ] {
            assert!(goroutine_tid(g) > 1 << 22);
        }
        assert_ne!(
            goroutine_tid(0x0000_00c0_0000_61a0),
            goroutine_tid(0x0000_00c0_0000_62a0)
        );
    }

    #[test]
    fn only_go_programs_are_rekeyed_and_writers_map_to_their_callers() {
        let shared = GoPids::default();
        shared.insert_for_tests(7);
        let mut g = Goroutines::new(shared);
        let mut ev = DataEvent::for_tests(crate::decode::ConnKey {
            sk: 1,
            generation: 1,
        });
        ev.pid = 8;
        ev.tid = 80;
        ev.goroutine = 0x0000_00c0_0000_0100;
        g.rekey(&mut ev);
        assert_eq!(ev.tid, 80, "not a Go program");
        ev.pid = 7;
        g.rekey(&mut ev);
        assert_eq!(ev.tid, goroutine_tid(0x0000_00c0_0000_0100));
        g.handoff(&HandoffEvent {
            pid: 7,
            from: 0x0000_00c0_0000_0100,
            to: 0x0000_00c0_0000_0900,
        });
        g.rekey(&mut ev);
        assert_eq!(ev.tid, goroutine_tid(0x0000_00c0_0000_0900));
    }
}
