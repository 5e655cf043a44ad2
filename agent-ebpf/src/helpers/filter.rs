//! Which processes the programs look at. First thing in every program.

use agent_common::config::{FILTER_CGROUP, FILTER_PID, LoupeConfig};
use aya_ebpf::helpers::generated::bpf_get_current_cgroup_id;

use crate::maps::{CGROUP_FILTER, PID_FILTER};

/// False for the agent itself and for processes outside the pid / cgroup selection.
#[inline(always)]
pub fn process_selected(cfg: &LoupeConfig, pid_tgid: u64) -> bool {
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.agent_tgid {
        return false;
    }
    if cfg.filter & FILTER_PID != 0 && !pid_selected(tgid) {
        return false;
    }
    if cfg.filter & FILTER_CGROUP != 0 {
        // SAFETY: helper without arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: map lookup of a plain key.
        if unsafe { CGROUP_FILTER.get(cgroup) }.is_none() {
            return false;
        }
    }
    true
}

/// Where `tgid`'s selection byte lives in `PID_FILTER` (None past the map's end: a pid the
/// kernel cannot hand out, or no pid selection, whose map has one entry).
#[inline(always)]
pub fn pid_slot(tgid: u32) -> Option<*mut u8> {
    let group = PID_FILTER.get_ptr_mut(tgid >> 3)?;
    // SAFETY: the offset is below 8, the entry's size.
    Some(unsafe { group.cast::<u8>().add((tgid & 7) as usize) })
}

/// Whether `tgid` is in the pid selection.
#[inline(always)]
pub fn pid_selected(tgid: u32) -> bool {
    // SAFETY: a pointer into a map entry from `pid_slot`.
    pid_slot(tgid).is_some_and(|slot| unsafe { *slot } != 0)
}
