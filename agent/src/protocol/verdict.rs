//! Writing user space's detection verdict back to the kernel: a connection no parser wants is
//! marked ignored in the kernel's connection map, so from then on each of its syscalls costs one
//! map lookup and no copy, event or wakeup.

use agent_common::conn::{ConnState, STATUS_IGNORED};
use aya::maps::{HashMap, MapData};

use crate::decode::ConnKey;

pub trait Verdicts: Send {
    /// Whether the kernel took the verdict (the connection may be gone, or its socket reused).
    fn ignore(&mut self, key: ConnKey) -> bool;
}

/// Tests and the capture view: nothing to write.
pub struct NoVerdicts;

impl Verdicts for NoVerdicts {
    fn ignore(&mut self, _key: ConnKey) -> bool {
        false
    }
}

/// The kernel's CONNS map.
pub struct KernelVerdicts {
    conns: HashMap<MapData, u64, ConnState>,
}

impl KernelVerdicts {
    pub fn new(conns: HashMap<MapData, u64, ConnState>) -> Self {
        Self { conns }
    }
}

impl Verdicts for KernelVerdicts {
    fn ignore(&mut self, key: ConnKey) -> bool {
        // The generation tells a reused `struct sock *` apart: never silence its successor.
        // A race with the kernel's in-place sequence update only loses offsets of a connection
        // that is not captured any more.
        match self.conns.get(&key.sk, 0) {
            Ok(mut state) if state.generation == key.generation => {
                state.status = STATUS_IGNORED;
                self.conns.insert(key.sk, state, 2 /* BPF_EXIST */).is_ok()
            }
            _ => false,
        }
    }
}
