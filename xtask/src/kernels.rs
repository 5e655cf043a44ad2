//! `cargo xtask kernels`: the agent and its capture tests on real distribution kernels. Debian's
//! kernel packages (bullseye 5.10, bookworm 6.1, bookworm-backports 6.12) are fetched with apt
//! into target/kernels (kept for the next run), each boots under qemu (KVM when /dev/kvm works)
//! with this machine's own root file system shared read-only over 9p, runs
//! xtask/kernels/guest.sh, and the results come back as LOUPE-* lines on the serial console.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{output, run, step};

/// A kernel series, the Debian suite that ships it, and what it stands for.
struct Series {
    version: &'static str,
    suite: &'static str,
    note: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        version: "5.10",
        suite: "bullseye",
        note: "Debian 11; before bpf_task_pt_regs (5.15)",
    },
    Series {
        version: "6.1",
        suite: "bookworm",
        note: "Debian 12, Amazon Linux 2023's series",
    },
    Series {
        version: "6.12",
        suite: "bookworm-backports",
        note: "has the sock tracepoints (6.3+)",
    },
];

const SOURCES: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
deb http://deb.debian.org/debian bullseye main
deb http://deb.debian.org/debian-security bullseye-security main
";

const GUEST: &str = include_str!("../kernels/guest.sh");
/// How much slower than the host the tests' deadlines assume a TCG guest runs.
const TCG_SLOWDOWN: u32 = 4;
/// Per kernel: boot, the smoke scenario and two test binaries.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

pub fn kernels(root: &Path, only: Option<&str>) -> anyhow::Result<()> {
    let dir = root.join("target").join("kernels");
    std::fs::create_dir_all(dir.join("debs"))?;
    ensure_tools(&dir)?;
    step("installing the servers and clients the tests drive (tests/setup.sh)");
    run(Command::new("bash").arg(root.join("tests").join("setup.sh")))?;
    let binaries = build_binaries(root)?;
    let guest = dir.join("guest.sh");
    std::fs::write(&guest, GUEST)?;

    let mut rows = Vec::new();
    for series in SERIES
        .iter()
        .filter(|s| only.is_none_or(|o| s.version == o))
    {
        step(&format!("Linux {} ({})", series.version, series.suite));
        let row = match prepare(&dir, series)
            .and_then(|k| boot(&dir, &k, &guest, &binaries).map(|log| (k, log)))
        {
            Ok((kernel, log)) => Row::from_log(series, &kernel.release, &log),
            Err(err) => Row::failed(series, format!("{err:#}")),
        };
        rows.push(row);
    }
    print_table(&rows);
    let failed: usize = rows.iter().map(|r| r.failures.len()).sum();
    if failed > 0 || rows.iter().any(|r| r.passed == 0) {
        bail!("{failed} failures (logs in {})", dir.display());
    }
    Ok(())
}

fn apt(dir: &Path) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(apt_options(dir));
    cmd
}

fn apt_options(dir: &Path) -> Vec<String> {
    let apt = dir.join("apt");
    vec![
        "-q".into(),
        format!(
            "-o=Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "-o=Dir::Etc::SourceParts=/dev/null".into(),
        format!("-o=Dir::State::Lists={}", apt.join("lists").display()),
        // Downloads land in a root-owned directory: no _apt sandbox for them.
        "-o=APT::Sandbox::User=root".into(),
    ]
}

/// qemu, kmod (module dependencies), busybox (the initramfs), xz (6.12's modules); and the
/// package lists of the suites above, in their own apt state so the machine's stays untouched.
fn ensure_tools(dir: &Path) -> anyhow::Result<()> {
    let apt_dir = dir.join("apt");
    std::fs::create_dir_all(apt_dir.join("lists").join("partial"))?;
    std::fs::write(apt_dir.join("sources.list"), SOURCES)?;
    let fresh = std::fs::metadata(apt_dir.join("updated"))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(86_400));
    if !fresh {
        step("apt: package lists of bullseye, bookworm and bookworm-backports");
        run(apt(dir).arg("update"))?;
        std::fs::write(apt_dir.join("updated"), "")?;
    }
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("modprobe", "kmod"),
        ("busybox", "busybox-static"),
        ("xz", "xz-utils"),
    ]
    .into_iter()
    .filter(|(bin, _)| !on_path(bin))
    .map(|(_, pkg)| pkg)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {}", missing.join(" ")));
    let plain = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !plain.success() {
        // A machine whose qemu-utils came from backports needs qemu-system from there too.
        run(apt(dir)
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "-t",
                "bookworm-backports",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

struct Binaries {
    loupe: PathBuf,
    capture: PathBuf,
    syscall_path: PathBuf,
}

/// The debug agent and the two test binaries the guest runs.
fn build_binaries(root: &Path) -> anyhow::Result<Binaries> {
    step("building the agent and the capture tests");
    run(Command::new("cargo").args(["build", "--package", "loupe"]))?;
    let json = output(Command::new("cargo").args([
        "test",
        "--package",
        "loupe-tests",
        "--test",
        "capture",
        "--test",
        "syscall_path",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut tests = BTreeMap::new();
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            tests.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let get = |name: &str| {
        tests
            .get(name)
            .cloned()
            .with_context(|| format!("cargo built no test binary {name}"))
    };
    Ok(Binaries {
        loupe: root.join("target").join("debug").join("loupe"),
        capture: get("capture")?,
        syscall_path: get("syscall_path")?,
    })
}

struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// The newest package of the series that the mirror serves, unpacked, with an initramfs that
/// loads the 9p modules.
fn prepare(dir: &Path, series: &Series) -> anyhow::Result<Kernel> {
    let debs = dir.join("debs");
    let deb = match cached_deb(&debs, series.version)? {
        Some(deb) => deb,
        None => download(dir, series)?,
    };
    let release = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("linux-image-"))
        .and_then(|n| n.split("-unsigned_").next())
        .context("unexpected package file name")?
        .to_string();
    let tree = dir.join("trees").join(&release);
    if !tree.join("boot").exists() {
        std::fs::create_dir_all(&tree)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    }
    let initrd = dir.join(format!("initrd-{release}.cpio.gz"));
    if !initrd.exists() {
        build_initrd(&tree, &release, &initrd)?;
    }
    Ok(Kernel {
        vmlinuz: tree.join("boot").join(format!("vmlinuz-{release}")),
        release,
        initrd,
    })
}

fn cached_deb(debs: &Path, version: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("linux-image-{version}.");
    Ok(std::fs::read_dir(debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        }))
}

/// Tries the series' packages newest first: an index can name a version the mirror no longer
/// has.
fn download(dir: &Path, series: &Series) -> anyhow::Result<PathBuf> {
    let pattern = format!(
        "^linux-image-{}[.-].*-amd64-unsigned$",
        series.version.replace('.', "\\.")
    );
    let found = output(Command::new("apt-cache").args(apt_options(dir)).args([
        "search",
        "--names-only",
        &pattern,
    ]))?;
    let mut names: Vec<String> = found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        // Not the cloud, realtime or backported-to-an-older-suite builds.
        .filter(|n| !n.contains("cloud") && !n.contains("-rt-") && !n.contains("deb11"))
        .map(str::to_string)
        .collect();
    names.sort_by_key(|n| version_key(n));
    let debs = dir.join("debs");
    for name in names.iter().rev() {
        let ok = apt(dir)
            .args(["download", name])
            .current_dir(&debs)
            .stdout(Stdio::null())
            .status()?
            .success();
        if ok && let Some(deb) = cached_deb(&debs, series.version)? {
            return Ok(deb);
        }
    }
    bail!(
        "no linux-image-{}-*-amd64-unsigned package could be downloaded from {}",
        series.version,
        series.suite
    )
}

/// Numeric parts of a package name, for ordering versions (6.12.117 after 6.12.95).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// busybox, the 9p modules in load order (decompressed: busybox's insmod takes plain .ko), and
/// an /init that mounts the host's root over 9p and runs the guest script in it.
fn build_initrd(tree: &Path, release: &str, out: &Path) -> anyhow::Result<()> {
    run(Command::new("depmod").arg("-b").arg(tree).arg(release))?;
    let mut modules: Vec<PathBuf> = Vec::new();
    for module in ["virtio_pci", "9pnet_virtio", "9p"] {
        let deps = output(Command::new("modprobe").arg("-d").arg(tree).args([
            "-S",
            release,
            "--show-depends",
            module,
        ]))?;
        for line in deps.lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.trim());
                if !modules.contains(&path) {
                    modules.push(path);
                }
            }
        }
    }
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    let busybox = std::fs::read(which("busybox")?)?;
    files.push(("bin/busybox".into(), busybox, 0o755));
    let mut order = String::new();
    for (i, module) in modules.iter().enumerate() {
        let bytes = if module.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz").arg("-dc").arg(module).output()?;
            if !out.status.success() {
                bail!("xz -d {}", module.display());
            }
            out.stdout
        } else {
            std::fs::read(module)?
        };
        let name = format!("{i:02}.ko");
        order.push_str(&name);
        order.push('\n');
        files.push((format!("modules/{name}"), bytes, 0o644));
    }
    files.push(("modules/order".into(), order.into_bytes(), 0o644));
    files.push(("init".into(), INIT.as_bytes().to_vec(), 0o755));
    let cpio = newc(&files);
    let mut gz = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .spawn()?;
    gz.stdin.take().context("gzip stdin")?.write_all(&cpio)?;
    if !gz.wait()?.success() {
        bail!("gzip failed");
    }
    Ok(())
}

fn which(bin: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|f| f.is_file())
        })
        .with_context(|| format!("{bin} not found on PATH"))
}

/// The initramfs's /init (busybox sh). The guest script and binaries are named on the kernel
/// command line (`loupe.*=`), so one initramfs per kernel serves every run.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
echo LOUPE-INIT
/bin/busybox grep -q loupe.probe /proc/cmdline && /bin/busybox poweroff -f
for m in $(/bin/busybox cat /modules/order); do /bin/busybox insmod /modules/$m; done
arg() { /bin/busybox sed -n "s/.*loupe\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
script=$(arg script); bin=$(arg bin); capture=$(arg capture); syscall_path=$(arg syscall_path)
if /bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot; then
    /bin/busybox mount --move /proc /newroot/proc
    /bin/busybox mount --move /sys /newroot/sys
    /bin/busybox mount --move /dev /newroot/dev
    /bin/busybox chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LOUPE_BIN=$bin CAPTURE_TEST=$capture SYSCALL_PATH_TEST=$syscall_path /bin/bash $script
else
    echo "LOUPE-ERROR the host root could not be mounted over 9p"
fi
/bin/busybox sync
/bin/busybox poweroff -f
"#;

/// A cpio archive in the "newc" format the kernel unpacks as an initramfs.
fn newc(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, mode: u32, data: &[u8], ino: u32| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    let mut ino = 1;
    let mut dirs: Vec<String> = Vec::new();
    for (name, _, _) in files {
        if let Some((parent, _)) = name.rsplit_once('/')
            && !dirs.iter().any(|d| d == parent)
        {
            dirs.push(parent.to_string());
        }
    }
    for d in &dirs {
        entry(d, 0o040755, &[], ino);
        ino += 1;
    }
    for (name, data, perm) in files {
        entry(name, 0o100000 | perm, data, ino);
        ino += 1;
    }
    entry("TRAILER!!!", 0, &[], 0);
    out
}

/// Whether KVM boots this kernel: /dev/kvm can exist and still hang a guest (nested
/// virtualisation on some hosts stops before the kernel's first line). A guest that reaches its
/// /init within 30 s says yes.
fn kvm_works(dir: &Path, k: &Kernel) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let log = dir.join("kvm-probe.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = qemu(
        true,
        k,
        &log,
        "console=ttyS0 panic=-1 loglevel=1 loupe.probe=1",
    );
    let _ = wait_for(&mut cmd, Duration::from_secs(30));
    std::fs::read_to_string(&log).is_ok_and(|l| l.contains("LOUPE-INIT"))
}

fn qemu(kvm: bool, k: &Kernel, log: &Path, cmdline: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm {
        // The host's model minus the one MSR nested KVM refuses on some hosts.
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "max"]);
    }
    cmd.args(["-m", "4G", "-smp", "2", "-nographic", "-no-reboot"])
        .args(["-serial", &format!("file:{}", log.display())])
        .args(["-monitor", "none", "-display", "none"])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&k.initrd)
        .args(["-append", cmdline])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs qemu until it powers off or `limit` passes (then it is killed: Ok(false)).
fn wait_for(cmd: &mut Command, limit: Duration) -> anyhow::Result<bool> {
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("qemu exited with {status}: {err}");
            }
            return Ok(true);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Boots the kernel and returns its console output.
fn boot(dir: &Path, k: &Kernel, guest: &Path, b: &Binaries) -> anyhow::Result<String> {
    let kvm = kvm_works(dir, k);
    if !kvm {
        step(
            "KVM unusable here (no /dev/kvm, or the guest hangs under it): emulating with TCG, several times slower",
        );
    }
    let log_path = dir.join(format!("{}.log", k.release));
    // Emulation runs the verifier several times slower (the syscall path's ~3.5 s of program
    // loads on this machine take ~30 s under TCG): the tests' startup deadline scales with it.
    let slowdown = if kvm { 1 } else { TCG_SLOWDOWN };
    let cmdline = format!(
        "console=ttyS0 panic=-1 loglevel=4 loupe.slowdown={slowdown} loupe.script={} loupe.bin={} loupe.capture={} loupe.syscall_path={}",
        guest.display(),
        b.loupe.display(),
        b.capture.display(),
        b.syscall_path.display()
    );
    let mut cmd = qemu(kvm, k, &log_path, &cmdline);
    let started = Instant::now();
    wait_for(&mut cmd, VM_TIMEOUT)?;
    println!(
        "  {} in {:.0} s; console log: {}",
        if kvm { "KVM" } else { "TCG" },
        started.elapsed().as_secs_f64(),
        log_path.display()
    );
    Ok(String::from_utf8_lossy(&std::fs::read(&log_path)?).into_owned())
}

struct Row {
    series: &'static str,
    note: &'static str,
    release: String,
    path: String,
    passed: usize,
    failures: Vec<String>,
    degraded: Vec<String>,
}

impl Row {
    fn failed(series: &Series, why: String) -> Row {
        Row {
            series: series.version,
            note: series.note,
            release: "-".into(),
            path: "-".into(),
            passed: 0,
            failures: vec![why],
            degraded: Vec::new(),
        }
    }

    fn from_log(series: &Series, release: &str, log: &str) -> Row {
        let mut row = Row {
            series: series.version,
            note: series.note,
            release: release.to_string(),
            path: "none (the agent did not start)".into(),
            passed: 0,
            failures: Vec::new(),
            degraded: Vec::new(),
        };
        let mut done = false;
        for line in log.lines().map(|l| l.trim_end_matches('\r')) {
            if let Some(k) = line.strip_prefix("LOUPE-KERNEL ") {
                row.release = k.to_string();
            } else if let Some(p) = line.strip_prefix("LOUPE-PATH capture: ") {
                row.path = p.to_string();
            } else if let Some(d) = line.strip_prefix("LOUPE-DEGRADED degraded: ") {
                row.degraded.push(d.to_string());
            } else if let Some(t) = line.strip_prefix("LOUPE-TEST ") {
                if t.ends_with(" ok") {
                    row.passed += 1;
                } else {
                    row.failures.push(t.trim_end_matches(" FAILED").to_string());
                }
            } else if let Some(e) = line.strip_prefix("LOUPE-ERROR ") {
                row.failures.push(e.to_string());
            } else if line == "LOUPE-DONE" {
                done = true;
            }
        }
        if !done {
            row.failures
                .push("the guest did not finish (timeout or crash; see the console log)".into());
        }
        row
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| kernel | release | capture path used | tests passed | failures |");
    println!("|---|---|---|---|---|");
    for r in rows {
        let path = r.path.split(" (").next().unwrap_or(&r.path);
        println!(
            "| {} ({}) | {} | {} | {} | {} |",
            r.series,
            r.note,
            r.release,
            path,
            r.passed,
            if r.failures.is_empty() {
                "none".to_string()
            } else {
                r.failures.join("; ")
            }
        );
    }
    for r in rows.iter().filter(|r| !r.degraded.is_empty()) {
        println!();
        println!("degraded on {}:", r.release);
        for d in &r.degraded {
            println!("  - {d}");
        }
    }
}
