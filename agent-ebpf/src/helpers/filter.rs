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
    // SAFETY: map lookups of plain keys.
    if cfg.filter & FILTER_PID != 0 && unsafe { PID_FILTER.get(tgid) }.is_none() {
        return false;
    }
    if cfg.filter & FILTER_CGROUP != 0 {
        // SAFETY: helper without arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if unsafe { CGROUP_FILTER.get(cgroup) }.is_none() {
            return false;
        }
    }
    true
}
