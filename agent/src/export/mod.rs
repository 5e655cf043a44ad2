//! The export stage: spans go through one bounded queue the agent owns (a full queue is counted,
//! never silent), are batched, resolved to their process's resource, and handed to every
//! configured output: the console tree view, a JSON lines file, OTLP.

pub mod console;
pub mod jsonl;
pub mod otlp;
pub mod otlp_errors;
pub mod otlp_grpc;
pub mod otlp_metrics;
pub mod otlp_proto;
pub mod otlp_settings;
mod otlp_span;
pub mod queue;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    process::{ProcessInfo, SharedProcesses},
    trace::span::SpanRecord,
};

#[derive(Debug, Default)]
pub struct ExportStats {
    pub spans_built: AtomicU64,
    pub spans_exported: AtomicU64,
    /// Dropped because the export queue was full.
    pub queue_full: AtomicU64,
    /// Spans in the export queue, as last seen by the pipeline or the exporter (a gauge).
    pub queued: AtomicU64,
    /// Spans in batches the OTLP endpoint did not accept.
    pub export_failed: AtomicU64,
    /// OTLP metrics exports that failed (cumulative: the next one carries the totals).
    pub metrics_export_failed: AtomicU64,
    /// Monotonic ms of the first failed attempt since the last success (0: exports succeed).
    pub failing_since_ms: AtomicU64,
    /// `--export-retry` in ms: failing longer than this loses spans.
    pub retry_window_ms: AtomicU64,
    /// What the terminal view printed and left out (a view's choice, not a loss).
    pub console: Arc<console::ConsoleStats>,
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub otlp: Option<otlp::OtlpConfig>,
    pub console: bool,
    /// Traces the terminal shows per second at most (0: all).
    pub console_rate: u32,
    pub jsonl: Option<PathBuf>,
    /// Add to an existing --output file instead of refusing it.
    pub append: bool,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub queue_capacity: usize,
    pub host_name: String,
    /// How long one batch is retried while the OTLP endpoint fails.
    pub retry_for: Duration,
}

/// At shutdown a failing endpoint gets this long, so that SIGTERM ends within 5 s.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(2);

/// A span and the process that made it.
pub struct Resolved<'a> {
    pub span: &'a SpanRecord,
    pub process: &'a ProcessInfo,
}

/// Handle to the export task.
pub struct Exporter {
    /// The pipeline's end of the export queue; the task ends once it is dropped.
    pub out: queue::SpanOut,
    pub task: tokio::task::JoinHandle<()>,
}

impl Exporter {
    pub fn spawn(
        cfg: ExportConfig,
        processes: SharedProcesses,
        stats: Arc<ExportStats>,
    ) -> anyhow::Result<Self> {
        // With OTLP the only output nothing reads a record after the pipeline: spans cross the
        // queue encoded.
        let (out, rx) = if cfg.otlp.is_some() && !cfg.console && cfg.jsonl.is_none() {
            queue::encoding_span_queue(cfg.queue_capacity)
        } else {
            queue::span_queue(cfg.queue_capacity)
        };
        stats
            .retry_window_ms
            .store(cfg.retry_for.as_millis() as u64, Ordering::Relaxed);
        let otlp = cfg
            .otlp
            .as_ref()
            .map(|o| otlp::OtlpOut::new(o, &cfg.host_name))
            .transpose()?;
        let jsonl = cfg
            .jsonl
            .as_ref()
            .map(|p| jsonl::JsonLines::create(p, &cfg.host_name, cfg.append))
            .transpose()?;
        let elsewhere = match (&cfg.otlp, &cfg.jsonl) {
            (Some(_), Some(_)) => "OTLP and --output",
            (Some(_), None) => "OTLP",
            (None, Some(_)) => "--output",
            (None, None) => "--output FILE or OTLP",
        };
        let names = processes.clone();
        let console = cfg.console.then(|| {
            console::ConsoleTree::new(
                crate::stdout::Stdout::new(),
                cfg.console_rate,
                elsewhere,
                Box::new(move |pid, comm| match names.lock() {
                    Ok(mut p) => p.resolve(pid, comm).service_name,
                    Err(_) => comm.to_string(),
                }),
                stats.console.clone(),
            )
        });
        let task = tokio::spawn(run(
            rx,
            cfg,
            processes,
            stats,
            Outputs {
                otlp,
                jsonl,
                console,
            },
        ));
        Ok(Self { out, task })
    }
}

struct Outputs {
    otlp: Option<otlp::OtlpOut>,
    jsonl: Option<jsonl::JsonLines>,
    console: Option<console::ConsoleTree<crate::stdout::Stdout>>,
}

/// The spans of the batch being gathered, in the queue's form (one of the two stays empty).
struct Batch {
    records: Vec<SpanRecord>,
    encoded: otlp_proto::EncodedBatch,
}

impl Batch {
    fn len(&self) -> usize {
        self.records.len() + self.encoded.len()
    }
}

async fn run(
    mut rx: queue::SpanIn,
    cfg: ExportConfig,
    processes: SharedProcesses,
    stats: Arc<ExportStats>,
    mut out: Outputs,
) {
    let mut batch = Batch {
        records: Vec::with_capacity(cfg.batch_size),
        encoded: otlp_proto::EncodedBatch::default(),
    };
    let mut tick = tokio::time::interval(cfg.flush_interval);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            // The spans of one pipeline batch per wakeup. `None` only once the pipeline's end
            // is gone and everything it sent is taken.
            spans = rx.recv() => {
                let Some(spans) = spans else {
                    break;
                };
                stats.queued.store(rx.len() as u64, Ordering::Relaxed);
                match spans {
                    queue::Spans::Records(spans) => {
                        let mut spans = spans.into_iter();
                        loop {
                            let room = cfg.batch_size.saturating_sub(batch.len()).max(1);
                            batch.records.extend(spans.by_ref().take(room));
                            if batch.len() < cfg.batch_size {
                                break;
                            }
                            flush(&mut batch, &processes, &stats, &mut out, cfg.retry_for).await;
                        }
                    }
                    queue::Spans::Encoded(spans) => {
                        for mut run in spans.into_runs() {
                            while !run.is_empty() {
                                let room = cfg.batch_size.saturating_sub(batch.len()).max(1);
                                batch.encoded.push(run.split_to(room));
                                if batch.len() >= cfg.batch_size {
                                    flush(&mut batch, &processes, &stats, &mut out, cfg.retry_for)
                                        .await;
                                }
                            }
                        }
                    }
                }
            },
            _ = tick.tick() => {
                flush(&mut batch, &processes, &stats, &mut out, cfg.retry_for).await;
                if let Some(c) = out.console.as_mut() {
                    c.tick(Instant::now());
                }
                ticks += 1;
                if ticks.is_multiple_of(60)
                    && let Ok(mut p) = processes.lock()
                {
                    p.prune();
                }
            }
        }
    }
    flush(&mut batch, &processes, &stats, &mut out, SHUTDOWN_RETRY).await;
    if let Some(c) = out.console.as_mut() {
        c.finish();
    }
    if let Some(o) = out.otlp.as_mut() {
        o.shutdown().await;
    }
}

async fn flush(
    batch: &mut Batch,
    processes: &SharedProcesses,
    stats: &Arc<ExportStats>,
    out: &mut Outputs,
    retry_for: Duration,
) {
    if !batch.encoded.is_empty() {
        // Only OTLP makes an encoding queue.
        match out.otlp.as_mut() {
            Some(o) => {
                o.export_encoded(&batch.encoded, processes, retry_for, stats)
                    .await
            }
            None => {
                stats
                    .spans_exported
                    .fetch_add(batch.encoded.len() as u64, Ordering::Relaxed);
            }
        }
        batch.encoded.clear();
    }
    if batch.records.is_empty() {
        return;
    }
    // The next batch starts at the size this one reached (growing it again moved every span).
    let room = batch.records.capacity();
    let spans = std::mem::replace(&mut batch.records, Vec::with_capacity(room));
    if let Some(c) = out.console.as_mut() {
        let now = Instant::now();
        for span in &spans {
            c.add(span, now);
        }
    }
    // Per-span process lookups only for the output that writes every span with its process.
    if let Some(j) = out.jsonl.as_mut() {
        for span in &spans {
            let process = lookup(processes, span);
            j.write(&Resolved {
                span,
                process: &process,
            });
        }
    }
    if let Some(j) = out.jsonl.as_mut() {
        j.flush();
    }
    match out.otlp.as_mut() {
        Some(o) => o.export(spans, processes, retry_for, stats).await,
        None => {
            stats
                .spans_exported
                .fetch_add(spans.len() as u64, Ordering::Relaxed);
        }
    }
}

/// The process of a span (a placeholder built from the span if the cache lock is poisoned).
pub fn lookup(processes: &SharedProcesses, span: &SpanRecord) -> ProcessInfo {
    lookup_pid(processes, span.pid, &span.comm)
}

/// The process `pid`, named `comm` by the kernel.
pub fn lookup_pid(processes: &SharedProcesses, pid: u32, comm: &str) -> ProcessInfo {
    match processes.lock() {
        Ok(mut p) => p.resolve(pid, comm),
        Err(_) => ProcessInfo {
            pid,
            service_name: comm.to_string(),
            executable_name: comm.to_string(),
            ..ProcessInfo::default()
        },
    }
}

/// Lowercase hex of an id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The machine's host name, for `host.name`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}
