//! Loupe's kernel programs: syscall and socket tracepoints only (no kprobes, no fentry: the
//! kernels Loupe targets have neither). See docs/ARCHITECTURE.md for the data path.
#![no_std]
#![no_main]
// Inline asm is how the programs hide a value from LLVM so a bounds check the verifier needs
// survives optimisation (helpers/bounds.rs). The crate is built with RUSTC_BOOTSTRAP by agent/build.rs.
#![feature(asm_experimental_arch)]

mod helpers;
mod maps;
mod programs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction (no indexing, no unwrap); the verifier rejects a program whose
    // panic path is reachable anyway, because this loop is unbounded.
    loop {}
}

// bpf_probe_read_user and the ring buffer helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
