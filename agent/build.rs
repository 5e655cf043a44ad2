//! Builds the kernel programs (agent-ebpf) for bpfel-unknown-none and leaves the object in
//! OUT_DIR, where src/bpf/load.rs embeds it.
//!
//! The kernel crate needs `-Z build-std=core`; on a stable toolchain that takes RUSTC_BOOTSTRAP,
//! which is set here, for the nested build only, so `cargo build` works with no environment.
//! bpf-linker must be on PATH: `cargo xtask build` installs it on a fresh machine.
//!
//! The nested cargo runs quietly and its output is shown only when it fails. (aya-build, which
//! this replaces, forwarded every line as a `cargo:warning`, and cargo replays those on every
//! later build, even a no-op one: ~47 "warning: loupe@…" lines of stale progress each time.)
//! Cargo's own progress bar shows the build script while it runs. The kernel crate's compiler
//! warnings are caught by `cargo xtask lint` (clippy -D warnings on bpfel-unknown-none).

use std::{
    env,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "agent-ebpf";
/// The kernel crate's binary: the object load.rs includes.
const OBJECT: &str = "loupe";

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    // agent-ebpf is a build-dependency, so a change to its library or agent-common rebuilds
    // this; its binary's sources are watched here.
    println!("cargo:rerun-if-changed={root}");
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("bpf-linker not found on PATH: run `cargo xtask build`, which installs it");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() != Ok("little") {
        bail!("the kernel programs are built for little-endian hosts only ({TARGET})");
    }
    // The programs read syscall registers: they are built for the host's architecture.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_string()
    } else {
        arch
    };
    // Kept apart from OUT_DIR's artifacts; the same directory aya-build used, so caches carry over.
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "stable", "cargo", "build", "--quiet"])
        .args([
            "--package",
            PACKAGE,
            "--bins",
            "--release",
            "--target",
            TARGET,
        ])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                format!("--cfg=bpf_target_arch=\"{arch}\""),
                "-Cdebuginfo=2".into(),
                "-Clink-arg=--btf".into(),
            ]
            .join("\x1f"),
        )
        // The outer build's compiler settings are not for this target.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}: is rustup on PATH?"))?;
    if !out.status.success() {
        bail!(
            "building the kernel programs failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built = target_dir.join(TARGET).join("release").join(OBJECT);
    std::fs::copy(&built, out_dir.join(OBJECT))
        .with_context(|| format!("copying {} to OUT_DIR", built.display()))?;
    Ok(())
}
