//! The syscall the current thread is inside, read from the user registers the kernel saved at
//! syscall entry (bpf_task_pt_regs). The sock tracepoints use it to find the user buffer
//! without a sys_enter/sys_exit pair per syscall: those two programs, and the syscall
//! tracepoints' own record building, cost more than the payload copy itself.

use agent_common::config::FEATURE_TASK_PT_REGS;
use agent_common::syscall::{
    ActiveCall, SHAPE_BUF, SHAPE_IOV, SHAPE_MSG, SYS_READ, SYS_READV, SYS_RECVFROM, SYS_RECVMSG,
    SYS_SENDMSG, SYS_SENDTO, SYS_WRITE, SYS_WRITEV,
};
use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs};

use crate::maps::LOUPE_CONFIG;

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!("Loupe's kernel programs know the syscall registers of x86_64 and arm64 only");

/// Syscall numbers and where `struct pt_regs` keeps the number and the first three arguments.
#[cfg(bpf_target_arch = "x86_64")]
mod abi {
    pub const NR_READ: u64 = 0;
    pub const NR_WRITE: u64 = 1;
    pub const NR_READV: u64 = 19;
    pub const NR_WRITEV: u64 = 20;
    pub const NR_SENDTO: u64 = 44;
    pub const NR_RECVFROM: u64 = 45;
    pub const NR_SENDMSG: u64 = 46;
    pub const NR_RECVMSG: u64 = 47;
    pub const NR_FUTEX: u64 = 202;
    /// Byte offsets in `struct pt_regs`: si, dx, orig_ax.
    pub const ARG1: u64 = 104;
    pub const ARG2: u64 = 96;
    pub const NR: u64 = 120;
    /// r14
    pub const GOROUTINE: u64 = 8;
    /// sp
    pub const SP: u64 = 152;
}

/// arm64 (the generic syscall table); not exercised by the tests on this project's machines.
#[cfg(bpf_target_arch = "aarch64")]
mod abi {
    pub const NR_READ: u64 = 63;
    pub const NR_WRITE: u64 = 64;
    pub const NR_READV: u64 = 65;
    pub const NR_WRITEV: u64 = 66;
    pub const NR_SENDTO: u64 = 206;
    pub const NR_RECVFROM: u64 = 207;
    pub const NR_SENDMSG: u64 = 211;
    pub const NR_RECVMSG: u64 = 212;
    pub const NR_FUTEX: u64 = 98;
    /// Byte offsets in `struct user_pt_regs`: regs[1], regs[2]; syscallno (s32).
    pub const ARG1: u64 = 8;
    pub const ARG2: u64 = 16;
    pub const SYSCALLNO: u64 = 280;
    /// regs[28]
    pub const GOROUTINE: u64 = 224;
    /// sp, after regs[0..31]
    pub const SP: u64 = 248;
}

/// The user registers the current task saved at syscall entry, or 0 where the kernel has no
/// `bpf_task_pt_regs` (before 5.15). The config is frozen: on such a kernel the verifier sees a
/// constant false branch and never looks at the helper calls behind it.
#[inline(always)]
fn user_regs() -> u64 {
    if LOUPE_CONFIG.load().features & FEATURE_TASK_PT_REGS == 0 {
        return 0;
    }
    // SAFETY: helpers without preconditions; the reads of the result tolerate any address.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
}

/// One 8-byte field of the saved registers. `regs` is the trusted BTF pointer
/// `bpf_task_pt_regs` returned, so this is a plain load the verifier checks against the type
/// (and the JIT guards against a fault): a `bpf_probe_read_kernel` call instead cost the sock
/// tracepoints about 8% of their time.
#[inline(always)]
fn load(regs: u64, offset: u64) -> u64 {
    // SAFETY: offset is a u64 field of struct pt_regs (abi above); the verifier rejects any other.
    unsafe { ((regs + offset) as *const u64).read_volatile() }
}

/// The in-flight call of the current thread when it is one of the single-buffer socket
/// syscalls (read, write, readv, writev, recvfrom, sendto, recvmsg, sendmsg); None for anything
/// else (sendmmsg/recvmmsg, which their own enter programs record, sendfile, splice, io_uring,
/// kernel threads). With it, Go's goroutine register (`syscall_goroutine`), from the same read
/// of the saved registers: the sock tracepoints need both for every event, and two lookups of
/// the registers and two reads were a measurable part of their time.
#[inline(always)]
pub fn current_call_and_goroutine() -> (Option<ActiveCall>, u64) {
    let regs = user_regs();
    if regs == 0 {
        return (None, 0);
    }
    let (nr, ptr, len, goroutine) = read_with_goroutine(regs);
    (call_of(nr, ptr, len), goroutine)
}

#[inline(always)]
fn call_of(nr: u64, ptr: u64, len: u64) -> Option<ActiveCall> {
    let (syscall, shape) = match nr {
        abi::NR_READ => (SYS_READ, SHAPE_BUF),
        abi::NR_WRITE => (SYS_WRITE, SHAPE_BUF),
        abi::NR_READV => (SYS_READV, SHAPE_IOV),
        abi::NR_WRITEV => (SYS_WRITEV, SHAPE_IOV),
        abi::NR_RECVFROM => (SYS_RECVFROM, SHAPE_BUF),
        abi::NR_SENDTO => (SYS_SENDTO, SHAPE_BUF),
        abi::NR_RECVMSG => (SYS_RECVMSG, SHAPE_MSG),
        abi::NR_SENDMSG => (SYS_SENDMSG, SHAPE_MSG),
        _ => return None,
    };
    Some(ActiveCall {
        ptr,
        len: if shape == SHAPE_MSG { 0 } else { len },
        syscall,
        shape,
        _pad: [0; 2],
        msg_index: 0,
        fd: 0,
        flags: 0,
    })
}

/// (syscall number, argument 1, argument 2, goroutine register).
#[inline(always)]
fn read_with_goroutine(regs: u64) -> (u64, u64, u64, u64) {
    let (nr, a1, a2) = read(regs);
    (nr, a1, a2, load(regs, abi::GOROUTINE))
}

/// (syscall number, argument 1, argument 2).
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn read(regs: u64) -> (u64, u64, u64) {
    (
        load(regs, abi::NR),
        load(regs, abi::ARG1),
        load(regs, abi::ARG2),
    )
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
fn read(regs: u64) -> (u64, u64, u64) {
    // SAFETY: syscallno is an s32 field of the trusted pt_regs pointer (see `load`).
    let nr = unsafe { ((regs + abi::SYSCALLNO) as *const i32).read_volatile() } as u64;
    (nr, load(regs, abi::ARG1), load(regs, abi::ARG2))
}

/// The goroutine (`g`) running the current syscall, from the user registers saved at entry: Go
/// keeps it in r14 (amd64) / x28 (arm64) across its own code and its raw syscall stubs. Compared
/// with the goroutine a Go TLS call was made on, so that another goroutine's syscall on the same
/// thread is never taken for it.
#[inline(always)]
pub fn syscall_goroutine() -> u64 {
    let regs = user_regs();
    if regs == 0 {
        return 0;
    }
    load(regs, abi::GOROUTINE)
}

/// The user stack pointer the current task returns to. Right after an exec it points at the
/// new program's `argc`, followed by the `argv` and `envp` pointer arrays (the ELF process
/// entry ABI of both architectures).
#[inline(always)]
pub fn user_stack_pointer() -> u64 {
    let regs = user_regs();
    if regs == 0 {
        return 0;
    }
    load(regs, abi::SP)
}

/// Whether the current task is inside a futex syscall (a lock or condition handing over to
/// another thread), as opposed to waking a task from an interrupt or another syscall.
#[inline(always)]
pub fn in_futex() -> bool {
    let regs = user_regs();
    regs != 0 && read(regs).0 == abi::NR_FUTEX
}
