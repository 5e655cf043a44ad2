//! From a file descriptor of the current task to its `struct sock *`, for the syscall capture
//! path (kernels before 6.3 have no sock tracepoint that hands it over): task → files → fdtable
//! → file → socket → sk, with offsets the agent read from BTF. Each step is a fault-tolerant
//! read; the fd table is read without RCU, which is safe here because the task is inside its own
//! syscall on that fd: the file cannot be released under it.

use agent_common::{config::LoupeConfig, counters};
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};

use crate::helpers::count::count;

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

#[inline(always)]
fn read<T>(base: u64, offset: u16) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel tolerates any address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(|_| ())
}

/// The socket behind `fd`, or None for a file, pipe or anything else that is not a socket (and
/// for an unreadable step, which is counted).
#[inline(always)]
pub fn socket_of(cfg: &LoupeConfig, fd: u32) -> Option<u64> {
    match walk(cfg, fd) {
        Ok(sk) => sk,
        Err(()) => {
            count(counters::READ_KERNEL_FAILED);
            None
        }
    }
}

#[inline(always)]
fn walk(cfg: &LoupeConfig, fd: u32) -> Result<Option<u64>, ()> {
    let off = &cfg.offsets;
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, off.task_files)?;
    let fdt: u64 = read(files, off.files_fdt)?;
    let max_fds: u32 = read(fdt, off.fdt_max_fds)?;
    if fd >= max_fds {
        return Ok(None);
    }
    let fds: u64 = read(fdt, off.fdt_fd)?;
    let file: u64 = read(fds + fd as u64 * 8, 0)?;
    if file == 0 {
        return Ok(None);
    }
    let inode: u64 = read(file, off.file_inode)?;
    let mode: u16 = read(inode, off.inode_mode)?;
    if mode & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    let socket: u64 = read(file, off.file_private_data)?;
    let sk: u64 = read(socket, off.socket_sk)?;
    Ok((sk != 0).then_some(sk))
}

/// Whether a socket is TCP (an `AF_UNIX` or UDP socket is not captured).
#[inline(always)]
pub fn is_tcp(cfg: &LoupeConfig, sk: u64) -> bool {
    read::<u16>(sk, cfg.offsets.sk_protocol).is_ok_and(|p| p == agent_common::conn::IPPROTO_TCP)
}
