//! Copying the user buffer of the syscall in flight into the scratch payload.

use agent_common::{
    counters,
    event::{FLAG_NO_PAYLOAD, MAX_PAYLOAD},
    syscall::{
        ActiveCall, MMSGHDR_LEN_OFFSET, MMSGHDR_SIZE, MSGHDR_IOV_OFFSET, MSGHDR_IOVLEN_OFFSET,
        SHAPE_BUF, SHAPE_IOV, SHAPE_MMSG, SHAPE_MSG, SYS_NONE,
    },
};
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_probe_read_user,
        generated::{bpf_loop, bpf_probe_read_user as read_user_raw},
    },
};

use crate::{
    helpers::{
        bounds::{clamp, opaque},
        count::count,
    },
    maps::ACTIVE_CALLS,
};

/// iovecs walked per message by the unrolled loops; the sock path goes on with `bpf_loop`
/// (`copy_iov_looped`), the syscall path's programs stop there (the rest is counted). gRPC's C
/// core writes a new connection's first frames in one sendmsg of 24-28 slices; 16 lost the
/// first request's headers and with them the HPACK table. With `--tcp-context` the programs are
/// larger and the verifier's budget allows 20 (read from the frozen config: the verifier sees
/// one constant bound per configuration). 64 exceeds the budget either way.
const MAX_IOV: u64 = 32;
const MAX_IOV_TCP_CONTEXT: u64 = 20;
const MASK: u64 = MAX_PAYLOAD as u64 - 1;

pub struct Copied {
    pub captured: u32,
    pub flags: u8,
    pub syscall: u8,
}

/// Copies up to `want` bytes of the current thread's in-flight syscall buffer into `dst`
/// (2 * MAX_PAYLOAD bytes). The call is `current` (read from the saved registers,
/// `regs::current_call_and_goroutine`); sendmmsg/recvmmsg, whose messages each fire a sock
/// tracepoint, come from their enter program's record, advancing to the next message on each
/// call.
#[inline(always)]
pub fn copy_from_call(
    current: Option<ActiveCall>,
    pid_tgid: u64,
    dst: *mut u8,
    want: u64,
) -> Copied {
    if let Some(call) = current {
        return copied(copy_call(&call, dst, want), call.syscall);
    }
    let call = match ACTIVE_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup, valid for this program run.
        Some(call) if unsafe { (*call).syscall } != SYS_NONE => call,
        _ => {
            count(counters::NO_SYSCALL_ARGS);
            return Copied {
                captured: 0,
                flags: FLAG_NO_PAYLOAD,
                syscall: SYS_NONE,
            };
        }
    };
    // SAFETY: as above.
    let call: &mut ActiveCall = unsafe { &mut *call };
    let syscall = call.syscall;
    let result = if call.shape == SHAPE_MMSG {
        let index = call.msg_index as u64;
        call.msg_index += 1;
        if index >= call.len {
            Err(())
        } else {
            copy_msg(dst, call.ptr + index * MMSGHDR_SIZE, want)
        }
    } else {
        Err(())
    };
    copied(result, syscall)
}

/// The syscall capture path: the call its sys_enter program saved, of `shape` (a constant in
/// each exit program, so each holds one copy loop), `ret` its return value. sendfile carries no
/// payload (its bytes come from a file); sendmmsg/recvmmsg become one event with their messages
/// in order.
#[inline(always)]
pub fn copy_saved(call: &ActiveCall, shape: u8, ret: u64, dst: *mut u8, want: u64) -> Copied {
    let result = match shape {
        SHAPE_BUF => read_into(dst, 0, want, call.ptr).map(|()| want),
        SHAPE_IOV => copy_iov(dst, call.ptr, call.len, want),
        SHAPE_MSG => copy_msg(dst, call.ptr, want),
        SHAPE_MMSG => copy_mmsg(dst, call.ptr, ret, want),
        _ => {
            return Copied {
                captured: 0,
                flags: FLAG_NO_PAYLOAD,
                syscall: call.syscall,
            };
        }
    };
    copied(result, call.syscall)
}

/// Messages of one sendmmsg/recvmmsg whose lengths are summed on the syscall path, and how many
/// of them have their bytes copied.
const MAX_MMSG: u64 = 64;
const MAX_MMSG_COPIED: u64 = 8;

/// Bytes the kernel moved for the first `n` messages of a sendmmsg/recvmmsg (their `msg_len`).
#[inline(always)]
pub fn mmsg_bytes(msgvec: u64, n: u64) -> u32 {
    let mut total: u32 = 0;
    let mut i: u64 = 0;
    while i < MAX_MMSG && i < n {
        let at = msgvec + i * MMSGHDR_SIZE + MMSGHDR_LEN_OFFSET;
        // SAFETY: fault-tolerant user read.
        let len: u32 = unsafe { bpf_probe_read_user(at as *const u32) }.unwrap_or(0);
        total = total.saturating_add(len);
        i += 1;
    }
    total
}

/// The bytes of the first `n` messages, in order, each message's `msg_len` from its first
/// iovec (sendmmsg/recvmmsg callers use one buffer per message; a loop over every iovec of
/// every message is more than the verifier will walk). Stops at the first message it cannot
/// copy whole, so what was copied is one contiguous prefix of the stream (the event is then
/// marked truncated).
#[inline(always)]
fn copy_mmsg(dst: *mut u8, msgvec: u64, n: u64, want: u64) -> Result<u64, ()> {
    let mut off: u64 = 0;
    let mut m: u64 = 0;
    while m < MAX_MMSG_COPIED {
        if m >= n || off >= want {
            return Ok(off);
        }
        let hdr = msgvec + m * MMSGHDR_SIZE;
        // SAFETY: user reads through the fault-tolerant helper.
        let len: u32 = unsafe { bpf_probe_read_user((hdr + MMSGHDR_LEN_OFFSET) as *const u32) }
            .map_err(|_| ())?;
        let iov: u64 = unsafe { bpf_probe_read_user((hdr + MSGHDR_IOV_OFFSET) as *const u64) }
            .map_err(|_| ())?;
        // SAFETY: as above; struct iovec is {base, len}.
        let vec: [u64; 2] =
            unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }.map_err(|_| ())?;
        let room = want - off;
        let take = if (len as u64) < room {
            len as u64
        } else {
            room
        };
        if take > vec[1] {
            count(counters::IOV_LIMIT);
            return Ok(off);
        }
        read_into(dst, off, take, vec[0])?;
        off += take;
        m += 1;
    }
    if m < n && off < want {
        count(counters::IOV_LIMIT);
    }
    Ok(off)
}

#[inline(always)]
fn copy_call(call: &ActiveCall, dst: *mut u8, want: u64) -> Result<u64, ()> {
    match call.shape {
        SHAPE_BUF => read_into(dst, 0, want, call.ptr).map(|()| want),
        SHAPE_IOV => copy_iov_pairs(dst, call.ptr, call.len, want),
        SHAPE_MSG => copy_msg_pairs(dst, call.ptr, want),
        _ => Err(()),
    }
}

#[inline(always)]
fn copied(result: Result<u64, ()>, syscall: u8) -> Copied {
    match result {
        Ok(n) => Copied {
            captured: n as u32,
            flags: 0,
            syscall,
        },
        Err(()) => {
            count(counters::READ_USER_FAILED);
            Copied {
                captured: 0,
                flags: FLAG_NO_PAYLOAD,
                syscall,
            }
        }
    }
}

#[inline(always)]
fn copy_msg(dst: *mut u8, msg: u64, want: u64) -> Result<u64, ()> {
    // SAFETY: user reads through the fault-tolerant helper.
    let iov: u64 =
        unsafe { bpf_probe_read_user((msg + MSGHDR_IOV_OFFSET) as *const u64) }.map_err(|_| ())?;
    let iovlen: u64 = unsafe { bpf_probe_read_user((msg + MSGHDR_IOVLEN_OFFSET) as *const u64) }
        .map_err(|_| ())?;
    copy_iov(dst, iov, iovlen, want)
}

/// `copy_msg` with the message's iovec pointer and count in one read (they are adjacent in
/// `struct msghdr`). The sock path only: see `copy_iov_pairs`.
#[inline(always)]
fn copy_msg_pairs(dst: *mut u8, msg: u64, want: u64) -> Result<u64, ()> {
    const _: () = assert!(MSGHDR_IOVLEN_OFFSET == MSGHDR_IOV_OFFSET + 8);
    // SAFETY: user read through the fault-tolerant helper.
    let [iov, iovlen]: [u64; 2] =
        unsafe { bpf_probe_read_user((msg + MSGHDR_IOV_OFFSET) as *const [u64; 2]) }
            .map_err(|_| ())?;
    copy_iov_pairs(dst, iov, iovlen, want)
}

/// `copy_iov` reading the iovecs two at a time: every helper call is costly (nginx's writev of
/// a head and a body took four reads, now three). The sock path only: the syscall path's exit
/// programs are at the verifier's budget with the one-at-a-time loop, and kernels that use it
/// verify more slowly.
#[inline(always)]
fn copy_iov_pairs(dst: *mut u8, iov: u64, iovcnt: u64, want: u64) -> Result<u64, ()> {
    let mut off: u64 = 0;
    let mut i: u64 = 0;
    let max = if crate::maps::LOUPE_CONFIG.load().tcp_context != 0 {
        MAX_IOV_TCP_CONTEXT
    } else {
        MAX_IOV
    };
    while i < max {
        if i >= iovcnt || off >= want {
            return Ok(off);
        }
        let at = iov + i * 16;
        // SAFETY: user reads through the fault-tolerant helper; struct iovec is {base, len}.
        // The pair is read only when both exist: past the array's end may be unmapped.
        let vecs: [u64; 4] = if i + 1 < iovcnt {
            unsafe { bpf_probe_read_user(at as *const [u64; 4]) }.map_err(|_| ())?
        } else {
            let [base, len]: [u64; 2] =
                unsafe { bpf_probe_read_user(at as *const [u64; 2]) }.map_err(|_| ())?;
            [base, len, 0, 0]
        };
        let first = take(vecs[1], want - off);
        if first > 0 {
            read_into(dst, off, first, vecs[0])?;
            off += first;
        }
        let second = take(vecs[3], want - off);
        if second > 0 {
            read_into(dst, off, second, vecs[2])?;
            off += second;
        }
        i += 2;
    }
    if i < iovcnt && off < want {
        return copy_iov_looped(dst, iov, i, iovcnt, want, off);
    }
    Ok(off)
}

/// A vector's iovecs from index `from` on: walked by `bpf_loop` (Linux 5.17+; this is the sock
/// path, 6.3+), whose callback the verifier checks once rather than once per iteration, so the
/// walk may go to the kernel's own limit on a vector (UIO_MAXIOV). Only vectors longer than
/// the unrolled loop's reach it: gRPC's C core writes a new connection's first frames in one
/// sendmsg of 24-28 slices, and a busy channel batches more.
#[inline(always)]
fn copy_iov_looped(
    dst: *mut u8,
    iov: u64,
    from: u64,
    iovcnt: u64,
    want: u64,
    off: u64,
) -> Result<u64, ()> {
    let mut walk = IovWalk {
        dst,
        iov,
        from,
        iovcnt,
        want,
        off,
        failed: 0,
    };
    // SAFETY: the helper calls `copy_one_iov` with `walk`, on this stack, for each index.
    unsafe {
        bpf_loop(
            (UIO_MAXIOV - from) as u32,
            copy_one_iov as *mut c_void,
            core::ptr::addr_of_mut!(walk).cast(),
            0,
        )
    };
    if walk.failed != 0 {
        return Err(());
    }
    // The kernel refuses longer vectors, so this never counts; the exit is counted all the same.
    if iovcnt > UIO_MAXIOV && walk.off < want {
        count(counters::IOV_LIMIT);
    }
    Ok(walk.off)
}

/// What `copy_one_iov` walks and where it is (on the caller's stack).
#[repr(C)]
struct IovWalk {
    dst: *mut u8,
    iov: u64,
    from: u64,
    iovcnt: u64,
    want: u64,
    off: u64,
    failed: u64,
}

/// The kernel's limit on iovecs per call.
const UIO_MAXIOV: u64 = 1024;

/// `bpf_loop`'s callback: copies iovec `from + i`; 1 stops the loop (the vector or `want` is
/// exhausted, or a read failed).
#[inline(never)]
extern "C" fn copy_one_iov(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `IovWalk` copy_iov_looped passed, alive on its stack for the loop.
    let walk = unsafe { &mut *ctx.cast::<IovWalk>() };
    let at = walk.from + i;
    if at >= walk.iovcnt || walk.off >= walk.want {
        return 1;
    }
    // SAFETY: user read through the fault-tolerant helper; struct iovec is {base, len}.
    let Ok([base, len]) = (unsafe { bpf_probe_read_user((walk.iov + at * 16) as *const [u64; 2]) })
    else {
        walk.failed = 1;
        return 1;
    };
    let n = take(len, walk.want - walk.off);
    if n > 0 {
        if read_into(walk.dst, walk.off, n, base).is_err() {
            walk.failed = 1;
            return 1;
        }
        walk.off += n;
    }
    0
}

/// The bytes of an iovec of `len` that fit in `room`.
#[inline(always)]
fn take(len: u64, room: u64) -> u64 {
    if len < room { len } else { room }
}

/// Copies iovecs in order until `want` bytes; returns how many were copied.
#[inline(always)]
fn copy_iov(dst: *mut u8, iov: u64, iovcnt: u64, want: u64) -> Result<u64, ()> {
    let mut off: u64 = 0;
    let mut i: u64 = 0;
    let max = if crate::maps::LOUPE_CONFIG.load().tcp_context != 0 {
        MAX_IOV_TCP_CONTEXT
    } else {
        MAX_IOV
    };
    while i < max {
        if i >= iovcnt || off >= want {
            return Ok(off);
        }
        // SAFETY: user read through the fault-tolerant helper; struct iovec is {base, len}.
        let vec: [u64; 2] =
            unsafe { bpf_probe_read_user((iov + i * 16) as *const [u64; 2]) }.map_err(|_| ())?;
        let remaining = want - off;
        let n = if vec[1] < remaining {
            vec[1]
        } else {
            remaining
        };
        if n > 0 {
            read_into(dst, off, n, vec[0])?;
            off += n;
        }
        i += 1;
    }
    if i < iovcnt && off < want {
        count(counters::IOV_LIMIT);
    }
    Ok(off)
}

/// Reads `len` user bytes at `src` into `dst[off..]`, with off < MAX_PAYLOAD and len <= MAX_PAYLOAD
/// made visible to the verifier.
#[inline(always)]
pub fn read_into(dst: *mut u8, off: u64, len: u64, src: u64) -> Result<(), ()> {
    let off = opaque(off) & MASK;
    let len = clamp(len, MAX_PAYLOAD as u64);
    if len == 0 {
        return Ok(());
    }
    // SAFETY: dst has 2 * MAX_PAYLOAD bytes, off < MAX_PAYLOAD and len <= MAX_PAYLOAD; the helper
    // tolerates any user address.
    let ret = unsafe { read_user_raw(dst.add(off as usize).cast(), len as u32, src as *const _) };
    if ret < 0 { Err(()) } else { Ok(()) }
}
