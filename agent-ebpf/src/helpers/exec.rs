//! The exec record (`agent_common::event::ExecEvent`): a selected process's new program, command
//! line and naming `OTEL_*` variables, read at `sched_process_exec` from the fresh user stack
//! (argc, argv[], NULL, envp[]): the task is still inside execve, so nothing can have gone yet,
//! and no kernel struct offsets are needed. Runs once per exec, never per I/O.

use agent_common::{
    counters,
    event::{
        EVENT_VERSION, EXEC_ARGV_MAX, EXEC_ENV_MAX, EXEC_EVENT_SIZE, EXEC_FILENAME_MAX,
        EventHeader, KIND_EXEC,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_probe_read_kernel_str, bpf_probe_read_user_str},
    },
    programs::TracePointContext,
};

use crate::{
    helpers::{bounds::clamp, count::count, emit::emit, record::field, regs::user_stack_pointer},
    maps::EXEC_SCRATCH,
};

/// sched_process_exec record: `__data_loc char[] filename` at 8 (offset in the low 16 bits).
const FILENAME_LOC: usize = 8;
/// Environment entries looked at for the two naming variables (most environments are shorter;
/// a service's own variables are usually set last, by its unit or container spec, so a longer
/// one may miss them and the process is then named from /proc or its command line).
const ENV_SCANNED: u64 = 128;

const SERVICE_NAME: u64 = u64::from_ne_bytes(*b"OTEL_SER");
const RESOURCE_ATTRIBUTES: u64 = u64::from_ne_bytes(*b"OTEL_RES");

#[inline(always)]
fn user_word(addr: u64) -> u64 {
    // SAFETY: fault-tolerant user read.
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

/// Copies the NUL-terminated user string at `src` into `dst` (`cap` bytes); its length without
/// the NUL, 0 on failure.
#[inline(always)]
fn user_str(dst: *mut u8, cap: u32, src: u64) -> u16 {
    // SAFETY: dst has cap bytes; the helper stops there and tolerates any src.
    let n = unsafe { bpf_probe_read_user_str(dst.cast(), cap, src as *const _) };
    if n > 1 { (n - 1) as u16 } else { 0 }
}

pub fn emit_exec(ctx: &TracePointContext, pid_tgid: u64) {
    let Some(rec) = EXEC_SCRATCH.get_ptr_mut(0) else {
        count(counters::SCRATCH_MISSING);
        return;
    };
    // SAFETY: this CPU's scratch value, valid for the program's run.
    let rec = unsafe { &mut *rec };
    rec.header = EventHeader {
        kind: KIND_EXEC,
        version: EVENT_VERSION,
        len: EXEC_EVENT_SIZE as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
    };
    rec.argv_len = 0;
    rec.service_name_len = 0;
    rec.resource_attributes_len = 0;
    rec.argc = 0;

    let loc: u32 = field(ctx, FILENAME_LOC);
    // SAFETY: the string lies inside the tracepoint record; the helper bounds the copy.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            rec.filename.as_mut_ptr().cast(),
            EXEC_FILENAME_MAX as u32,
            ctx.as_ptr()
                .cast::<u8>()
                .add((loc & 0xffff) as usize)
                .cast(),
        )
    };
    rec.filename_len = if n > 1 { (n - 1) as u16 } else { 0 };

    let sp = user_stack_pointer();
    if sp != 0 {
        let argc = clamp(user_word(sp), 0xffff);
        rec.argc = argc as u32;
        let argv0 = user_word(sp + 8);
        let envp = sp + 8 * (argc + 2);
        let env0 = user_word(envp);
        if argv0 != 0 {
            // The argument strings are contiguous and end where the environment's begin.
            if env0 > argv0 {
                let len = clamp(env0 - argv0, EXEC_ARGV_MAX as u64);
                // SAFETY: len <= the buffer; the helper tolerates any src.
                let r = unsafe {
                    aya_ebpf::helpers::generated::bpf_probe_read_user(
                        rec.argv.as_mut_ptr().cast(),
                        len as u32,
                        argv0 as *const _,
                    )
                };
                rec.argv_len = if r == 0 { len as u16 } else { 0 };
            } else {
                rec.argv_len = user_str(rec.argv.as_mut_ptr(), EXEC_ARGV_MAX as u32, argv0);
            }
        }
        let mut i = 0;
        while i < ENV_SCANNED {
            let var = user_word(envp + 8 * i);
            if var == 0 {
                break;
            }
            let head = user_word(var);
            if head == SERVICE_NAME && rec.service_name_len == 0 {
                rec.service_name_len =
                    user_str(rec.service_name.as_mut_ptr(), EXEC_ENV_MAX as u32, var);
            } else if head == RESOURCE_ATTRIBUTES && rec.resource_attributes_len == 0 {
                rec.resource_attributes_len = user_str(
                    rec.resource_attributes.as_mut_ptr(),
                    EXEC_ENV_MAX as u32,
                    var,
                );
            }
            i += 1;
        }
    }
    emit(rec);
}
