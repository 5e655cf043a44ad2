//! Builds the kernel programs (agent-ebpf) for bpfel-unknown-none and leaves the object in
//! OUT_DIR, where src/bpf/load.rs embeds it.
//!
//! The kernel crate needs `-Z build-std=core`; on a stable toolchain that takes RUSTC_BOOTSTRAP,
//! which is set here, for the nested build only, so `cargo build` works with no environment.
//! bpf-linker must be on PATH: `cargo xtask build` installs it on a fresh machine.

use std::process::Command;

fn main() -> anyhow::Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "cargo:warning=bpf-linker not found on PATH: run `cargo xtask build`, which installs it"
        );
    }
    // SAFETY: build scripts are single-threaded; the variable is read by the child cargo.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("stable"))
}
