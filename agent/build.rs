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
        // The outer build's compiler settings are not for this target; the workspace's release
        // LTO is the agent's (bpf-linker links the programs' bitcode itself). Without it the
        // programs, their relocations and maps come out byte for byte as before the agent
        // took LTO: what the verifier on every supported kernel has seen.
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
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
    let mut object =
        std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // Silently: cargo replays a build script's warnings on every later build.
    dedupe_line_info(&mut object).context("rewriting .BTF.ext line info")?;
    let object = strip_dwarf(&object).context("removing the DWARF sections")?;
    std::fs::write(out_dir.join(OBJECT), object).context("writing the object to OUT_DIR")?;
    Ok(())
}

/// The object without its DWARF (`.debug_*` and their relocations): three quarters of its
/// 2.3 MB, embedded in the agent and read whole when the programs load, so resident for the
/// agent's life. The loader and the kernel read BTF (`.BTF`, `.BTF.ext`: types, CO-RE
/// relocations, line info), which stays; DWARF only served bpf-linker to produce it.
fn strip_dwarf(elf: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut builder = object::build::elf::Builder::read(elf)?;
    for section in builder.sections.iter_mut() {
        let name = section.name.as_slice();
        if name.starts_with(b".debug_") || name.starts_with(b".rel.debug_") {
            section.delete = true;
        }
    }
    builder.delete_orphans();
    // bpf-linker names sections in the symbol string table; the writer wants their own.
    let names = builder.sections.add();
    names.name = b".shstrtab".to_vec().into();
    names.sh_type = object::elf::SHT_STRTAB;
    names.sh_addralign = 1;
    names.data = object::build::elf::SectionData::SectionString;
    let mut out = Vec::with_capacity(elf.len() / 3);
    builder.write(&mut out)?;
    Ok(out)
}

/// Kernels before ~6.13 reject a program whose BTF line records do not have strictly
/// increasing instruction offsets ("Invalid line_info[N].insn_off"), and LLVM emits two records
/// for one instruction after an empty inline asm block (helpers/bounds.rs `opaque`): Debian's
/// 6.12 refused `sock_recv_length` for one such pair. Keeps the last record of each offset,
/// compacting every section's records in place and shrinking the line-info length in the
/// .BTF.ext header (the other parts are found by their own offsets). Returns how many it dropped.
fn dedupe_line_info(elf: &mut [u8]) -> anyhow::Result<usize> {
    let u16_at = |d: &[u8], o: usize| -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(
            d.get(o..o + 2).context("truncated")?.try_into()?,
        ))
    };
    let u32_at = |d: &[u8], o: usize| -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(
            d.get(o..o + 4).context("truncated")?.try_into()?,
        ))
    };
    let u64_at = |d: &[u8], o: usize| -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(
            d.get(o..o + 8).context("truncated")?.try_into()?,
        ))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        bail!("not a 64-bit ELF object");
    }
    let shoff = u64_at(elf, 0x28)? as usize;
    let shentsize = u16_at(elf, 0x3a)? as usize;
    let shnum = u16_at(elf, 0x3c)? as usize;
    let shstrndx = u16_at(elf, 0x3e)? as usize;
    let section = |i: usize| -> anyhow::Result<(u32, usize, usize)> {
        let o = shoff + i * shentsize;
        Ok((
            u32_at(elf, o)?,
            u64_at(elf, o + 0x18)? as usize,
            u64_at(elf, o + 0x20)? as usize,
        ))
    };
    let (_, strtab, _) = section(shstrndx)?;
    let mut ext = None;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let start = strtab + name as usize;
        let end = elf[start..].iter().position(|&b| b == 0).map(|n| start + n);
        if end.is_some_and(|e| &elf[start..e] == b".BTF.ext") {
            ext = Some((off, size));
        }
    }
    let Some((base, _)) = ext else {
        return Ok(0);
    };
    let hdr_len = u32_at(elf, base + 4)? as usize;
    let li_off = u32_at(elf, base + 16)? as usize;
    let li_len = u32_at(elf, base + 20)? as usize;
    let start = base + hdr_len + li_off;
    let end = start + li_len;
    if li_len < 4 {
        return Ok(0);
    }
    let rec = u32_at(elf, start)? as usize;
    let (mut read, mut write, mut dropped) = (start + 4, start + 4, 0);
    while read < end {
        let sec_name = u32_at(elf, read)?;
        let num = u32_at(elf, read + 4)? as usize;
        let records = read + 8;
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(num);
        for i in 0..num {
            let r = elf
                .get(records + i * rec..records + (i + 1) * rec)
                .context("truncated line record")?
                .to_vec();
            let insn = u32_at(&r, 0)?;
            if let Some(last) = kept.last()
                && u32_at(last, 0)? >= insn
            {
                kept.pop();
                dropped += 1;
            }
            kept.push(r);
        }
        read = records + num * rec;
        elf[write..write + 4].copy_from_slice(&sec_name.to_le_bytes());
        elf[write + 4..write + 8].copy_from_slice(&(kept.len() as u32).to_le_bytes());
        write += 8;
        for r in kept {
            elf[write..write + rec].copy_from_slice(&r);
            write += rec;
        }
    }
    elf[write..end].fill(0);
    let new_len = (write - start) as u32;
    elf[base + 20..base + 24].copy_from_slice(&new_len.to_le_bytes());
    Ok(dropped)
}
