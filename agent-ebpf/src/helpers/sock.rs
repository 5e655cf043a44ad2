//! Reading a `struct sock` with offsets the agent took from BTF, and creating connection entries.

use agent_common::{
    config::{FILTER_NETNS, FILTER_PORT, LoupeConfig},
    conn::{AF_INET, AF_INET6, ConnState, ConnTuple, STATUS_IGNORED, STATUS_UNCLASSIFIED},
    counters,
    event::FLAG_EXCLUDED,
};
use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel};

use crate::{
    helpers::{
        copy::{copy_words, zero_words},
        count::count,
    },
    maps::{CONNS, NETNS_FILTER, PORT_FILTER},
};

#[inline(always)]
fn read<T>(base: u64, offset: u16) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel tolerates any address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(|_| ())
}

/// The 4-tuple of a socket, or Err for a socket that is not IPv4/IPv6.
#[inline(always)]
pub fn read_tuple(cfg: &LoupeConfig, sk: u64) -> Result<ConnTuple, ()> {
    let off = &cfg.offsets;
    let family: u16 = read(sk, off.skc_family)?;
    let sport: u16 = read(sk, off.skc_num)?;
    let dport: u16 = read(sk, off.skc_dport)?;
    let mut tuple = ConnTuple {
        family,
        sport,
        dport: u16::from_be(dport),
        ..ConnTuple::default()
    };
    if family == AF_INET {
        let s: [u8; 4] = read(sk, off.skc_rcv_saddr)?;
        let d: [u8; 4] = read(sk, off.skc_daddr)?;
        tuple.saddr[..4].copy_from_slice(&s);
        tuple.daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        tuple.saddr = read(sk, off.skc_v6_rcv_saddr)?;
        tuple.daddr = read(sk, off.skc_v6_daddr)?;
    } else {
        return Err(());
    }
    Ok(tuple)
}

/// True when network-namespace selection is on and the socket lives outside it.
#[inline(always)]
fn netns_excluded(cfg: &LoupeConfig, sk: u64) -> bool {
    if cfg.filter & FILTER_NETNS == 0 {
        return false;
    }
    let Ok(net) = read::<u64>(sk, cfg.offsets.skc_net) else {
        count(counters::READ_KERNEL_FAILED);
        return true;
    };
    let Ok(inum) = read::<u32>(net, cfg.offsets.net_ns_inum) else {
        count(counters::READ_KERNEL_FAILED);
        return true;
    };
    // SAFETY: map lookup of a plain key.
    unsafe { NETNS_FILTER.get(inum) }.is_none()
}

/// `--port`: neither end of the connection uses a selected port.
#[inline(always)]
fn port_excluded(cfg: &LoupeConfig, tuple: &ConnTuple) -> bool {
    if cfg.filter & FILTER_PORT == 0 {
        return false;
    }
    // SAFETY: map lookups of plain keys.
    unsafe { PORT_FILTER.get(tuple.sport).is_none() && PORT_FILTER.get(tuple.dport).is_none() }
}

/// Starts tracking a socket; `flags` and `role` say how it was found.
#[inline(always)]
pub fn track(
    cfg: &LoupeConfig,
    sk: u64,
    tuple: ConnTuple,
    role: u8,
    flags: u8,
) -> Option<*mut ConnState> {
    let (status, flags) = if netns_excluded(cfg, sk) || port_excluded(cfg, &tuple) {
        count(counters::CONNS_IGNORED);
        (STATUS_IGNORED, flags | FLAG_EXCLUDED)
    } else {
        (STATUS_UNCLASSIFIED, flags)
    };
    let mut slot = core::mem::MaybeUninit::<ConnState>::uninit();
    zero_words(slot.as_mut_ptr());
    // SAFETY: zeroed above; all-zero is a valid ConnState.
    let state = unsafe { slot.assume_init_mut() };
    // SAFETY: helper without arguments.
    state.generation = unsafe { bpf_ktime_get_ns() };
    copy_words(&mut state.tuple, &tuple);
    state.role = role;
    state.status = status;
    state.flags = flags;
    if CONNS.insert(sk, state, 0).is_err() {
        count(counters::CONN_MAP_FULL);
        return None;
    }
    CONNS.get_ptr_mut(sk)
}
