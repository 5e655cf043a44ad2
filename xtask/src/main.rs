//! `cargo xtask build|run|test|lint|bench`: the only place that installs things or asks for root.
//!
//! A fresh machine has nothing but the stock stable toolchain. The kernel crate needs the
//! rust-src component (for `-Z build-std=core`) and bpf-linker, which is built here against
//! rustc's own libLLVM so that no separate LLVM install is needed.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod instructions;
mod kernels;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, then build the kernel programs and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release), then run the agent as root with ARGS.
    Run {
        /// The debug build instead (faster to build, several times slower to run).
        #[arg(long)]
        debug: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the release binary, strip its debug info and install it as PREFIX/bin/loupe.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Every test: unit tests, then the privileged end-to-end tests (as root).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Boots Debian's 5.10, 6.1 and 6.12 kernels under qemu (fetched with apt, kept in
    /// target/kernels) on this machine's userland, runs the agent and the capture tests in each
    /// and prints what passed where. Root; slow (minutes per kernel), so not part of `test`.
    Kernels {
        /// Only this series (5.10, 6.1 or 6.12).
        only: Option<String>,
    },
    /// rustfmt --check and clippy -D warnings, as CI runs them (the fuzz targets are
    /// type-checked too).
    Lint,
    /// Runs every cargo-fuzz target (fuzz/) for SECONDS each, installing cargo-fuzz if needed.
    /// Works on the stable toolchain (RUSTC_BOOTSTRAP, no sanitizer).
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        target: Option<String>,
    },
    /// Records the protocol parsers' byte fixtures from the real servers (tests/src/bin/record.rs):
    /// agent/src/protocol/*/testdata/*.bin. Needs root (the servers run in a test cgroup).
    Record {
        /// Only scenarios whose name contains this (e.g. pg-, redis-pubsub).
        scenario: Option<String>,
    },
    /// What Loupe costs a traced service: the same load with and without the agent, alternating
    /// rounds (nginx over loopback, a Python service), printed as a table.
    Bench {
        /// Rounds per side and workload.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per round.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Concurrent connections of the load generator.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Extra agent flag for every round with the agent (repeat), e.g.
        /// --agent-arg=--cpu-scheduling=idle
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Only these workloads (repeat or comma-separate): nginx, nginx-tls, python, postgres,
        /// redis, grpc. Default: all, then the criterion benchmarks.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Another build of the agent (an earlier commit's) whose columns every table adds,
        /// in the same alternating rounds.
        #[arg(long, value_name = "AGENT")]
        baseline: Option<PathBuf>,
    },
    /// Instructions per event through the tracing sink (the criterion pipeline cases under
    /// valgrind's callgrind): steady where timings drift. OTHER: pipeline benchmark executables
    /// of other builds (copied from target/release/deps/pipeline-*) to print beside.
    Instructions {
        /// Runs per case and build (hash tables are seeded at random per run): the median
        /// over their calls of the feed function is printed.
        #[arg(long, default_value_t = 2)]
        runs: usize,
        other: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    prepend_cargo_bin_to_path();
    match cli.command {
        Task::Build { release } => {
            ensure_toolchain()?;
            build(release)
        }
        Task::Run { debug, args } => {
            let release = !debug;
            ensure_toolchain()?;
            build(release)?;
            let bin = root.join("target").join(profile_dir(release)).join("loupe");
            run_as_root(&bin, &args)
        }
        Task::Install { prefix } => {
            ensure_toolchain()?;
            build(true)?;
            install(&root, &prefix)
        }
        Task::Test { filter } => {
            ensure_toolchain()?;
            test(&root, filter.as_deref())
        }
        Task::Kernels { only } => {
            ensure_toolchain()?;
            build(false)?;
            kernels::kernels(&root, only.as_deref())
        }
        Task::Lint => {
            ensure_toolchain()?;
            lint()
        }
        Task::Record { scenario } => {
            step("installing the servers and clients (tests/setup.sh)");
            run(Command::new("bash").arg(root.join("tests").join("setup.sh")))?;
            step("recording fixtures through a proxy in front of each real server");
            let mut cmd = Command::new("cargo");
            cmd.args([
                "run",
                "--quiet",
                "--package",
                "loupe-tests",
                "--bin",
                "record",
                "--",
            ]);
            if let Some(s) = scenario {
                cmd.arg(s);
            }
            run(&mut cmd)
        }
        Task::Fuzz { seconds, target } => {
            ensure_toolchain()?;
            fuzz(seconds, target.as_deref())
        }
        Task::Instructions { runs, other } => {
            // The benchmark links the agent, whose build embeds the kernel programs.
            ensure_toolchain()?;
            instructions::instructions(&root, runs, &other)
        }
        Task::Bench {
            rounds,
            seconds,
            connections,
            agent_args,
            only,
            baseline,
        } => {
            ensure_toolchain()?;
            if !is_root() {
                bail!("the benchmark loads the agent: run it as root");
            }
            bench::bench(
                &root,
                &bench::Options {
                    rounds,
                    seconds,
                    connections,
                    agent_args,
                    only,
                    baseline,
                },
            )
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

fn profile_dir(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// `cargo install` puts bpf-linker in $CARGO_HOME/bin, which a non-login shell may not have.
fn prepend_cargo_bin_to_path() {
    let bin = cargo_home().join("bin");
    let mut paths: Vec<PathBuf> =
        env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
    if !paths.contains(&bin) {
        paths.insert(0, bin);
        let joined = env::join_paths(paths).expect("PATH entries are valid");
        // SAFETY: single-threaded at this point; children inherit it.
        unsafe { env::set_var("PATH", joined) };
    }
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_toolchain() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("installing the rust-src component (the kernel crate builds core from source)");
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    install_bpf_linker()
}

/// Builds bpf-linker against the libLLVM that ships inside the rustc toolchain: LLVM_PREFIX
/// points at a folder whose lib/libLLVM.so links to it, and an rpath lets the linker find it at
/// run time.
fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    let libdir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: reinstall the toolchain with rustup",
                libdir.display()
            )
        })?;
    let verbose = output(Command::new("rustc").arg("-vV"))?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV does not report an LLVM version")?
        .to_string();

    let prefix = workspace_root()
        .join("target")
        .join("xtask")
        .join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib").join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;

    step(&format!(
        "installing bpf-linker (features llvm-{major}) against rustc's {}; this takes a minute, once",
        libllvm.display()
    ));
    let mut rustflags = OsString::from("-C link-arg=-Wl,-rpath,");
    rustflags.push(&libdir);
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env("RUSTFLAGS", rustflags))?;
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    step(&format!(
        "building the kernel programs and the agent ({})",
        profile_dir(release)
    ));
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--package", "loupe"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Copies the release binary to PREFIX/bin (through a temporary name, so a running agent keeps
/// its file), without debug info (symbols stay, for readable backtraces).
fn install(root: &Path, prefix: &Path) -> anyhow::Result<()> {
    let bin_dir = prefix.join("bin");
    let dest = bin_dir.join("loupe");
    step(&format!("installing {}", dest.display()));
    std::fs::create_dir_all(&bin_dir).with_context(|| {
        format!(
            "creating {} (run as root for /usr/local)",
            bin_dir.display()
        )
    })?;
    let tmp = bin_dir.join(".loupe.new");
    std::fs::copy(root.join("target/release/loupe"), &tmp)
        .with_context(|| format!("writing {} (run as root for /usr/local)", tmp.display()))?;
    if Command::new("strip")
        .arg("--strip-debug")
        .arg(&tmp)
        .status()
        .is_err()
    {
        eprintln!("xtask: strip not found; installed with debug info");
    }
    std::fs::rename(&tmp, &dest)?;
    let on_path = env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d == bin_dir));
    eprintln!(
        "xtask: installed {}{}",
        dest.display(),
        if on_path {
            String::new()
        } else {
            format!(" ({} is not on your PATH)", bin_dir.display())
        }
    );
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0")
}

fn run_as_root(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut cmd = if is_root() {
        Command::new(bin)
    } else {
        step("the agent needs root: running it through sudo");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    };
    run(cmd.args(args))
}

fn test(root: &Path, filter: Option<&str>) -> anyhow::Result<()> {
    build(false)?;
    step("unit tests");
    let mut unit = Command::new("cargo");
    unit.args([
        "test",
        "--package",
        "loupe",
        "--package",
        "agent-common",
        "--package",
        "xtask",
    ]);
    if let Some(f) = filter {
        unit.arg(f);
    }
    run(&mut unit)?;

    step("installing the servers and clients the end-to-end tests drive (tests/setup.sh)");
    run(Command::new("bash").arg(root.join("tests").join("setup.sh")))?;

    step("privileged end-to-end tests (real kernel programs, real sockets, one at a time)");
    let bin = root.join("target").join("debug").join("loupe");
    let mut e2e = if is_root() {
        Command::new("cargo")
    } else {
        step("they need root: running them through sudo");
        let mut c = Command::new("sudo");
        c.args(["-E", "cargo"]);
        c
    };
    e2e.args(["test", "--package", "loupe-tests", "--"]);
    if let Some(f) = filter {
        e2e.arg(f);
    }
    e2e.args(["--test-threads=1"]).env("LOUPE_BIN", bin);
    run(&mut e2e)
}

fn lint() -> anyhow::Result<()> {
    step("rustfmt --check");
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    step("clippy -D warnings (userspace)");
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo check (fuzz targets, their own workspace)");
    run(Command::new("cargo").args(["check", "--quiet", "--manifest-path", "fuzz/Cargo.toml"]))?;
    // The kernel crate only builds for the BPF target (no_std, its own panic handler).
    step("clippy -D warnings (kernel programs, bpfel-unknown-none)");
    run(Command::new("cargo")
        .args([
            "clippy",
            "--package",
            "agent-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1")
        // What agent/build.rs passes when it builds them (helpers/regs.rs depends on it).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        ))
}

const FUZZ_TARGETS: [&str; 5] = [
    "decode_record",
    "http1_connection",
    "http1_reader",
    "l7_connection",
    "reassembly",
];

fn fuzz(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        step("installing cargo-fuzz (once)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_none_or(|o| o == **t))
    {
        step(&format!("fuzzing {target} for {seconds} s"));
        run(Command::new("cargo")
            .args(["fuzz", "run", target, "--sanitizer", "none", "--"])
            .arg(format!("-max_total_time={seconds}"))
            .env("RUSTC_BOOTSTRAP", "1"))?;
    }
    Ok(())
}
