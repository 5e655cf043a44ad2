//! `cargo xtask instructions`: the tracing sink's cost per event counted in instructions
//! (valgrind's callgrind) instead of timed. On a shared VM the criterion figures of one build
//! moved by ±15% within minutes, more than most changes. An instruction count is steadier: the
//! figure is the median over every call of the benchmark's feed function but the first (which
//! fills the agent's tables), over a few runs. Whole runs differed by up to 1.6%, as a run's
//! calls were a different mix of warm and growing buffers; calls differ by less (hash seeds),
//! so two builds compare closely. It is not time (a cache miss counts as one instruction): the
//! live benchmark stays the judge of what a change is worth.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{output, step};

/// The criterion cases of agent/benches/pipeline.rs counted, all through the tracing sink.
const CASES: [&str; 4] = ["http1", "http1_otlp_red", "redis", "grpc_otlp_red"];

/// The bench's function that feeds records to the sink: only what runs inside it is counted.
const FEED: &str = "pipeline::through_sink";
/// Called once per record: the count of events.
const PER_EVENT: &str = "loupe::decode::decode_with";

pub fn instructions(root: &Path, runs: usize, others: &[PathBuf]) -> anyhow::Result<()> {
    let runs = runs.max(1);
    if Command::new("valgrind").arg("--version").output().is_err() {
        step("installing valgrind (callgrind counts the instructions)");
        crate::bench::apt_install("valgrind")?;
    }
    step("building the pipeline benchmark");
    let built = output(Command::new("cargo").args([
        "bench",
        "--package",
        "loupe",
        "--bench",
        "pipeline",
        "--no-run",
        "--message-format=json",
    ]))?;
    let this = built
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "pipeline")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("the pipeline benchmark's executable is not in cargo's output")?;
    let mut exes = vec![this];
    exes.extend(others.iter().cloned());
    let dir = root.join("target/instructions");
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for case in CASES {
        let mut row = Vec::new();
        for (i, exe) in exes.iter().enumerate() {
            step(&format!("{case}: {} ({runs} runs)", exe.display()));
            let mut counts = Vec::new();
            for _ in 0..runs {
                counts.extend(per_event(exe, case, &dir.join(format!("{case}.{i}.out")))?);
            }
            counts.sort_by(f64::total_cmp);
            row.push(counts[counts.len() / 2]);
        }
        rows.push((case, row));
    }
    println!(
        "\nInstructions per event through the tracing sink (callgrind; decode included; median \
         over the calls of {runs} runs)"
    );
    for (i, exe) in exes.iter().enumerate() {
        println!("  [{i}] {}", exe.display());
    }
    for (case, row) in rows {
        let cells: Vec<String> = row
            .iter()
            .map(|v| match row.first() {
                Some(first) if v != first => {
                    format!("{v:>8.0} ({:+.1}%)", 100.0 * (v / first - 1.0))
                }
                _ => format!("{v:>8.0}"),
            })
            .collect();
        println!("  {case:<16} {}", cells.join("  "));
    }
    Ok(())
}

/// Instructions inside `FEED` per call of `PER_EVENT`, for one criterion case: one figure per
/// call of `FEED` (callgrind dumps a part after each), the first left out (it fills the
/// agent's tables; the criterion routine runs `FEED` over and over).
fn per_event(exe: &Path, case: &str, out: &Path) -> anyhow::Result<Vec<f64>> {
    let dir = out.parent().context("output in a directory")?;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("output name")?;
    let parts = |dir: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let mut parts: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e
                    .file_name()
                    .to_str()?
                    .strip_prefix(name)?
                    .strip_prefix('.')?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        parts.sort();
        Ok(parts.into_iter().map(|(_, p)| p).collect())
    };
    for stale in parts(dir)? {
        std::fs::remove_file(stale)?;
    }
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(format!("--toggle-collect={FEED}"))
        .arg(format!("--dump-after={FEED}"))
        .arg(exe)
        .args(["--bench", "--profile-time", "2"])
        .arg(format!("sink/{case}$"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running valgrind")?;
    if !status.success() {
        bail!("valgrind on {} failed ({status})", exe.display());
    }
    let mut figures = Vec::new();
    for part in parts(dir)?.iter().skip(1) {
        let (total, events) = count(&std::fs::read_to_string(part)?);
        if events == 0 {
            bail!(
                "no call of {PER_EVENT} in {}: was the benchmark built with debug symbols?",
                part.display()
            );
        }
        figures.push(total as f64 / events as f64);
    }
    if figures.is_empty() {
        bail!(
            "{FEED} ran fewer than twice under valgrind ({})",
            out.display()
        );
    }
    Ok(figures)
}

/// From a callgrind output: the instructions collected (`summary:`) and the calls of
/// `PER_EVENT` (each `calls=` line after a `cfn=` naming it; names are given once, by id).
fn count(text: &str) -> (u64, u64) {
    let mut total = 0;
    let mut calls = 0;
    let mut ids = std::collections::HashMap::new();
    let mut callee_is_target = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("summary:") {
            total = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            callee_is_target = name_of(rest, &mut ids);
        } else if let Some(rest) = line.strip_prefix("fn=") {
            name_of(rest, &mut ids);
        } else if let Some(n) = line.strip_prefix("calls=")
            && callee_is_target
        {
            calls += n
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            callee_is_target = false;
        }
    }
    (total, calls)
}

/// Whether a `fn=`/`cfn=` value, `(id) name` or `(id)` once the name was given, is `PER_EVENT`.
fn name_of(value: &str, ids: &mut std::collections::HashMap<String, bool>) -> bool {
    let (id, name) = value.split_once(' ').unwrap_or((value, ""));
    if name.is_empty() {
        return ids.get(id).copied().unwrap_or(false);
    }
    let is = name == PER_EVENT;
    ids.insert(id.to_string(), is);
    is
}
