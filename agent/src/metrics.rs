//! Self-telemetry: every drop the agent knows of, kernel and userspace, by stage and reason.
//! Rendered as Prometheus text on `--metrics-addr` and as a one-line summary in the log.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::counters::{self, NUM_COUNTERS};

use crate::{
    bpf::load::KernelCounters, export::ExportStats, pipeline::Userspace, trace::sink::TraceStats,
};

/// One time series: a metric name (Prometheus style), its labels and current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub gauge: bool,
    pub labels: Vec<(&'static str, &'static str)>,
    pub value: u64,
}

pub struct Metrics {
    pub user: Arc<Userspace>,
    kernel: Option<KernelCounters>,
    pub export: Option<Arc<ExportStats>>,
    pub traces: Option<Arc<TraceStats>>,
    pub links: Option<Arc<crate::trace::causality::LinkStats>>,
    pub tls: Option<Arc<crate::tls::TlsStats>>,
    /// Whether spans go to an OTLP endpoint (the summary says "exported", else "written").
    pub exporting: bool,
    /// RED metrics and the service graph (`red`), appended to the Prometheus text.
    pub red: Option<crate::red::SharedStore>,
    pub sampling: Option<Arc<crate::trace::sampling::SamplingStats>>,
    /// The pod store and watch counters, when Kubernetes metadata is on.
    pub k8s: Option<(
        crate::k8s::pods::SharedPods,
        Arc<crate::k8s::watch::WatchStats>,
    )>,
}

impl Metrics {
    pub fn new(kernel: Option<KernelCounters>) -> Self {
        Self {
            user: Arc::new(Userspace::default()),
            kernel,
            export: None,
            traces: None,
            links: None,
            tls: None,
            exporting: false,
            red: None,
            sampling: None,
            k8s: None,
        }
    }

    pub fn kernel(&self) -> [u64; NUM_COUNTERS as usize] {
        self.kernel.as_ref().map(|k| k.read()).unwrap_or_default()
    }

    /// Every metric, once: the Prometheus text and the OTLP metrics are both made from this.
    pub fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        for (i, value) in self.kernel().iter().enumerate() {
            let kind = if counters::is_drop(i as u32) {
                "drop"
            } else {
                "volume"
            };
            out.push(Sample {
                name: "loupe_kernel_events_total",
                help: "Kernel-side event counters by reason (drops and volume).",
                gauge: false,
                labels: vec![("reason", counters::NAMES[i]), ("kind", kind)],
                value: *value,
            });
        }
        let u = &self.user;
        let t = *u.table.lock().unwrap_or_else(|e| e.into_inner());
        let rows: [(&'static str, &'static str, u64); 15] = [
            (
                "loupe_events_read_total",
                "Records read from the ring buffer.",
                u.events_read.load(Ordering::Relaxed),
            ),
            (
                "loupe_ring_wakeups_total",
                "Times the kernel woke the ring reader (a process's first connection, every connection's on the syscall capture path; otherwise it drains on a timer).",
                u.ring_wakeups.load(Ordering::Relaxed),
            ),
            (
                "loupe_decode_errors_total",
                "Records that failed to decode (dropped).",
                u.decode_errors.load(Ordering::Relaxed),
            ),
            (
                "loupe_channel_full_total",
                "Events dropped because the pipeline was behind.",
                u.channel_full.load(Ordering::Relaxed),
            ),
            (
                "loupe_cpu_scheduling_raised_total",
                "Switches of the pipeline's threads to normal priority because events waited for it or spans for export (--cpu-scheduling adaptive).",
                crate::scheduling::ADAPTIVE.raised.load(Ordering::Relaxed),
            ),
            (
                "loupe_cpu_scheduling_lowered_total",
                "Switches of the pipeline's threads back to SCHED_IDLE after a second of keeping up.",
                crate::scheduling::ADAPTIVE.lowered.load(Ordering::Relaxed),
            ),
            (
                "loupe_cpu_scheduling_failed_total",
                "Priority changes of the agent's threads the kernel refused (the thread keeps its priority).",
                crate::scheduling::ADAPTIVE.failed.load(Ordering::Relaxed),
            ),
            (
                "loupe_conn_table_full_total",
                "Events dropped because the connection table was full.",
                t.rejected_full,
            ),
            (
                "loupe_conns_evicted_idle_total",
                "Connections evicted after the idle timeout.",
                t.evicted_idle,
            ),
            (
                "loupe_conns_evicted_full_total",
                "Connections evicted, least recently seen first, to make room in a full table.",
                t.evicted_full,
            ),
            (
                "loupe_conns_opened_total",
                "Connections entered in the table.",
                t.opened,
            ),
            (
                "loupe_stream_lost_bytes_total",
                "Stream bytes never seen (events lost upstream).",
                t.streams.lost_bytes,
            ),
            (
                "loupe_stream_uncaptured_bytes_total",
                "Stream bytes moved beyond the capture cap or without a user buffer.",
                t.streams.uncaptured_bytes,
            ),
            (
                "loupe_stream_overflow_bytes_total",
                "Captured bytes dropped at the per-stream buffer cap.",
                t.streams.overflow_bytes,
            ),
            (
                "loupe_stream_stale_events_total",
                "Events whose bytes were already in the stream.",
                t.streams.stale_events,
            ),
        ];
        let counter = |(name, help, value): (&'static str, &'static str, u64)| Sample {
            name,
            help,
            gauge: false,
            labels: Vec::new(),
            value,
        };
        out.extend(rows.into_iter().chain(self.span_rows()).map(counter));
        out.push(Sample {
            name: "loupe_cpu_scheduling_idle",
            help: "1 while the pipeline's threads run at SCHED_IDLE (--cpu-scheduling adaptive).",
            gauge: true,
            labels: Vec::new(),
            value: u64::from(crate::scheduling::ADAPTIVE.is_idle()),
        });
        out.push(Sample {
            name: "loupe_events_waiting",
            help: "Events read from the ring buffer and not yet handled by the pipeline (channel_full drops start at 65536).",
            gauge: true,
            labels: Vec::new(),
            value: self.user.events_waiting.load(Ordering::Relaxed),
        });
        if let Some(e) = &self.export {
            out.push(Sample {
                name: "loupe_export_queue_spans",
                help: "Spans waiting for export (export_queue_full drops start at --export-queue).",
                gauge: true,
                labels: Vec::new(),
                value: e.queued.load(Ordering::Relaxed),
            });
        }
        if let Some(t) = &self.traces {
            out.extend(l7_samples(t));
        }
        if let Some(tls) = &self.tls {
            out.extend(tls_samples(tls));
        }
        if let Some((pods, watch)) = &self.k8s {
            out.push(Sample {
                name: "loupe_k8s_pods",
                help: "Pods on this node the agent knows of.",
                gauge: true,
                labels: Vec::new(),
                value: pods.read().map(|p| p.live_pods() as u64).unwrap_or(0),
            });
            out.extend(
                [
                    (
                        "loupe_k8s_watch_events_total",
                        "Pod list/watch events applied.",
                        watch.events.load(Ordering::Relaxed),
                    ),
                    (
                        "loupe_k8s_watch_errors_total",
                        "Pod list/watch errors (the watcher retries with backoff).",
                        watch.errors.load(Ordering::Relaxed),
                    ),
                ]
                .map(counter),
            );
        }
        out
    }
}

fn tls_samples(tls: &crate::tls::TlsStats) -> Vec<Sample> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut out = Vec::new();
    for (library, c) in [("openssl", &tls.openssl_files), ("go", &tls.go_files)] {
        out.push(Sample {
            name: "loupe_tls_probed_files",
            help: "TLS library files (libssl, executables) with uprobes on, by library.",
            gauge: true,
            labels: vec![("library", library)],
            value: get(c),
        });
    }
    for (i, library) in crate::tls::UNHOOKED_LIBRARIES.iter().enumerate() {
        out.push(Sample {
            name: "loupe_tls_unhooked_total",
            help: "Encrypted connections whose plaintext was never seen, by the TLS library their process uses.",
            gauge: false,
            labels: vec![("library", library)],
            value: get(&tls.unhooked[i]),
        });
    }
    for (name, help, c) in [
        (
            "loupe_tls_hooked_connections_total",
            "Encrypted connections traced from their plaintext.",
            &tls.hooked_connections,
        ),
        (
            "loupe_tls_missed_records_total",
            "Encrypted application records seen before a connection's plaintext (sent before the probes were on).",
            &tls.missed_records,
        ),
        (
            "loupe_tls_attach_failed_total",
            "TLS library files that could not be probed.",
            &tls.attach_failed,
        ),
        (
            "loupe_tls_go_unsupported_total",
            "Go programs built before Go 1.17 (no register ABI): counted, not traced.",
            &tls.go_unsupported,
        ),
    ] {
        out.push(Sample {
            name,
            help,
            gauge: false,
            labels: Vec::new(),
            value: get(c),
        });
    }
    out
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut described = std::collections::HashSet::new();
        for s in self.samples() {
            if described.insert(s.name) {
                let kind = if s.gauge { "gauge" } else { "counter" };
                let _ = writeln!(
                    out,
                    "# HELP {} {}\n# TYPE {} {kind}",
                    s.name, s.help, s.name
                );
            }
            if s.labels.is_empty() {
                let _ = writeln!(out, "{} {}", s.name, s.value);
            } else {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect();
                let _ = writeln!(out, "{}{{{}}} {}", s.name, labels.join(","), s.value);
            }
        }
        if let Some(red) = &self.red {
            out.push_str(&crate::red::prometheus::render(red));
        }
        out
    }

    fn span_rows(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut rows = Vec::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        if let Some(t) = &self.traces {
            rows.extend([
                (
                    "loupe_http_exchanges_total",
                    "Request/response exchanges paired.",
                    get(&t.exchanges),
                ),
                (
                    "loupe_http_malformed_total",
                    "Stretches of HTTP streams that did not parse (skipped).",
                    get(&t.malformed),
                ),
                (
                    "loupe_http_pending_overflow_total",
                    "Requests dropped because 1024 were already waiting for responses on one connection.",
                    get(&t.pending_overflow),
                ),
                (
                    "loupe_http_orphan_responses_total",
                    "Responses with no request to pair with.",
                    get(&t.orphan_responses),
                ),
                (
                    "loupe_http_timeouts_total",
                    "Requests whose response never came.",
                    get(&t.timeouts),
                ),
                (
                    "loupe_http_unknown_role_total",
                    "Connections not traced because their side was unknown.",
                    get(&t.unknown_role),
                ),
                (
                    "loupe_other_agent_connections_total",
                    "Connections of another Loupe agent on this host, not traced.",
                    get(&t.other_agents),
                ),
                (
                    "loupe_link_held_overflow_total",
                    "Spans waiting for a pool thread's handback sent as they were: too many held (50 000).",
                    get(&t.held_overflow),
                ),
            ]);
        }
        if let Some(sm) = &self.sampling {
            rows.extend([
                (
                    "loupe_sampling_traces_kept_total",
                    "Traces sampling kept on this node (measured either way: RED metrics count everything).",
                    get(&sm.traces_kept),
                ),
                (
                    "loupe_sampling_traces_dropped_total",
                    "Traces sampling dropped on this node.",
                    get(&sm.traces_dropped),
                ),
                (
                    "loupe_sampling_spans_kept_total",
                    "Spans sampling let through to export.",
                    get(&sm.spans_kept),
                ),
                (
                    "loupe_sampling_spans_dropped_total",
                    "Spans sampling dropped (by decision, not loss).",
                    get(&sm.spans_dropped),
                ),
                (
                    "loupe_sampling_kept_for_error_total",
                    "Traces the sampler would drop, kept because a span here is an error (keep_errors).",
                    get(&sm.kept_for_error),
                ),
                (
                    "loupe_sampling_kept_for_latency_total",
                    "Traces the sampler would drop, kept because the local root was slow (keep_slower_than).",
                    get(&sm.kept_for_latency),
                ),
                (
                    "loupe_sampling_decided_early_total",
                    "Traces decided before their local root finished (too many spans waiting, or 30 s).",
                    get(&sm.decided_early),
                ),
            ]);
        }
        if let Some(l) = &self.links {
            rows.extend([
                (
                    "loupe_link_context_total",
                    "Spans parented by context carried in headers.",
                    get(&l.by_context),
                ),
                (
                    "loupe_link_peer_total",
                    "SERVER spans parented by their caller's CLIENT span on this node.",
                    get(&l.by_peer),
                ),
                (
                    "loupe_link_peer_late_total",
                    "...of which the caller's event arrived after the callee's.",
                    get(&l.by_peer_late),
                ),
                (
                    "loupe_link_thread_total",
                    "CLIENT spans parented by the request their thread handles.",
                    get(&l.by_thread),
                ),
                (
                    "loupe_link_thread_creator_total",
                    "CLIENT spans parented through the thread that created theirs.",
                    get(&l.by_thread_creator),
                ),
                (
                    "loupe_link_sole_request_total",
                    "CLIENT spans from a thread handling nothing, parented by the only request their process was handling.",
                    get(&l.by_sole_request),
                ),
                (
                    "loupe_link_handback_total",
                    "CLIENT spans of a pool thread (JVM) parented by the request whose thread it woke right after the call: the task's result handed back.",
                    get(&l.by_handback),
                ),
                (
                    "loupe_link_target_total",
                    "CLIENT spans parented by request-target match on an event loop.",
                    get(&l.by_target),
                ),
                (
                    "loupe_link_ambiguous_total",
                    "CLIENT spans left without parent: several candidates, none clearly theirs.",
                    get(&l.ambiguous),
                ),
                (
                    "loupe_link_unlinked_clients_total",
                    "CLIENT spans made while their thread handled no request.",
                    get(&l.unlinked_clients),
                ),
                (
                    "loupe_link_roots_total",
                    "SERVER spans that start a trace.",
                    get(&l.roots),
                ),
                (
                    "loupe_link_tcp_option_total",
                    "SERVER spans parented by the context a peer's TCP option carried.",
                    get(&l.by_tcp_option),
                ),
                (
                    "loupe_link_tcp_context_mismatch_total",
                    "CLIENT spans whose trace differs from the one their TCP option carried (their remote callee starts its own trace).",
                    get(&l.tcp_context_mismatch),
                ),
                (
                    "loupe_link_peers_evicted_total",
                    "CLIENT calls forgotten early to make room for newer ones (100 000 waiting for a callee on this node): such a callee starting later would miss its parent.",
                    get(&l.peers_evicted),
                ),
                (
                    "loupe_link_callers_unawaited_total",
                    "SERVER requests that could not wait for a late caller (100 000 waiting, or as many connections remembered): such a caller on this node seen later would miss its callee.",
                    get(&l.callers_unawaited),
                ),
            ]);
        }
        if let Some(e) = &self.export {
            rows.extend([
                (
                    "loupe_spans_built_total",
                    "Spans built.",
                    get(&e.spans_built),
                ),
                (
                    "loupe_spans_exported_total",
                    "Spans handed to every output.",
                    get(&e.spans_exported),
                ),
                (
                    "loupe_export_queue_full_total",
                    "Spans dropped because the export queue was full.",
                    get(&e.queue_full),
                ),
                (
                    "loupe_export_failed_total",
                    "Spans the OTLP endpoint did not accept.",
                    get(&e.export_failed),
                ),
                (
                    "loupe_metrics_export_failed_total",
                    "OTLP metrics exports that failed (cumulative: the next one carries the totals).",
                    get(&e.metrics_export_failed),
                ),
                (
                    "loupe_console_traces_printed_total",
                    "Traces the terminal view printed.",
                    get(&e.console.traces_printed),
                ),
                (
                    "loupe_console_traces_not_shown_total",
                    "Complete traces the terminal view left out to stay readable (--console-rate); other outputs got them.",
                    get(&e.console.traces_not_shown),
                ),
            ]);
        }
        rows
    }

    /// One line for the log: volume and every non-zero drop.
    /// The periodic log line: volumes, then every drop counter that moved.
    pub fn summary(&self) -> String {
        self.summary_line(false)
    }

    /// The last log line: spans still in the export queue when it stopped are counted as drops
    /// too, so the line never says `drops=none` after losing any.
    pub fn summary_at_exit(&self) -> String {
        self.summary_line(true)
    }

    /// Seconds OTLP exports have been failing, when that is longer than the retry window (the
    /// point from which spans are lost): what /readyz reports.
    pub fn export_failing_for(&self) -> Option<u64> {
        let e = self.export.as_deref()?;
        let since = e.failing_since_ms.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let for_ms = crate::clock::monotonic_ms().saturating_sub(since);
        (for_ms > e.retry_window_ms.load(Ordering::Relaxed)).then_some(for_ms / 1000)
    }

    fn summary_line(&self, at_exit: bool) -> String {
        let kernel = self.kernel();
        let u = &self.user;
        let mut line = format!(
            "events={} conns={}",
            kernel[counters::EVENTS_EMITTED as usize],
            u.table.lock().map(|t| t.opened).unwrap_or_default()
        );
        // Not a loss (no known protocol, or left out by --port/--netns), but the first thing to
        // look at when connections that should be traced are not.
        let ignored = kernel[counters::CONNS_IGNORED as usize];
        if ignored > 0 {
            let _ = write!(line, " conns_ignored={ignored}");
        }
        let mut drops = Vec::new();
        for (i, v) in kernel.iter().enumerate() {
            if counters::is_drop(i as u32) && *v > 0 {
                drops.push(format!("kernel.{}={v}", counters::NAMES[i]));
            }
        }
        let export = self.export.as_deref();
        let get = |c: Option<&AtomicU64>| c.map(|c| c.load(Ordering::Relaxed)).unwrap_or(0);
        let mut unfinished = 0;
        if let Some(e) = export {
            let built = e.spans_built.load(Ordering::Relaxed);
            let delivered = e.spans_exported.load(Ordering::Relaxed);
            // Without OTLP, "exported" would claim a backend that does not exist.
            let verb = if self.exporting {
                "exported"
            } else {
                "written"
            };
            let _ = write!(line, " spans={built} {verb}={delivered}");
            let printed = e.console.traces_printed.load(Ordering::Relaxed);
            let hidden = e.console.traces_not_shown.load(Ordering::Relaxed);
            if printed + hidden > 0 {
                let _ = write!(line, " traces_printed={printed} traces_not_shown={hidden}");
            }
            if at_exit {
                unfinished = built.saturating_sub(
                    delivered
                        + e.queue_full.load(Ordering::Relaxed)
                        + e.export_failed.load(Ordering::Relaxed),
                );
            }
        }
        for (name, v) in [
            ("decode_errors", u.decode_errors.load(Ordering::Relaxed)),
            ("channel_full", u.channel_full.load(Ordering::Relaxed)),
            ("export_queue_full", get(export.map(|e| &e.queue_full))),
            ("export_failed", get(export.map(|e| &e.export_failed))),
            ("export_unfinished_at_exit", unfinished),
        ] {
            if v > 0 {
                drops.push(format!("user.{name}={v}"));
            }
        }
        if drops.is_empty() {
            line.push_str(" drops=none");
        } else {
            let _ = write!(line, " drops: {}", drops.join(" "));
        }
        line
    }
}

/// Serves `render()` over plain HTTP/1.1. Deliberately minimal (one GET, Connection: close):
/// it runs inside the agent, whose own traffic the kernel programs skip.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    loop {
        let (mut sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let mut seen = 0;
            // Read until the end of the request head (or the buffer is full: answer anyway).
            while seen < buf.len() {
                match sock.read(&mut buf[seen..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen += n,
                }
                if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let (status, content_type, body) = respond(&metrics, &buf[..seen]);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// What each path answers: the metrics on /metrics only, plain-text health, 404 otherwise.
fn respond(metrics: &Metrics, request: &[u8]) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line = request
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "GET" {
        return ("405 Method Not Allowed", TEXT, "only GET\n".into());
    }
    match target.split('?').next().unwrap_or("") {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        // The server starts once the programs are attached: answering is being alive.
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" => match metrics.export_failing_for() {
            Some(for_s) => (
                "503 Service Unavailable",
                TEXT,
                format!(
                    "not ready: OTLP exports have been failing for {for_s} s (longer than --export-retry); spans are being dropped\n"
                ),
            ),
            None => ("200 OK", TEXT, "ok\n".into()),
        },
        _ => (
            "404 Not Found",
            TEXT,
            "not found: the agent serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

/// Per-protocol rows (`{protocol="redis"}`): detection, pairing and losses of each registered
/// protocol, from the one list in `protocol::REGISTRY`.
fn l7_samples(t: &TraceStats) -> Vec<Sample> {
    use crate::protocol::{REGISTRY, name};
    let l = &t.l7;
    let d = &t.detect;
    type Row = (
        &'static str,
        &'static str,
        for<'a> fn(
            &'a crate::trace::sink::L7Stats,
            &'a crate::protocol::detect::DetectStats,
        ) -> &'a [AtomicU64],
    );
    let rows: [Row; 12] = [
        (
            "loupe_l7_detected_total",
            "Connections user-space detection gave to this protocol.",
            |_, d| &d.detected,
        ),
        (
            "loupe_l7_rejected_total",
            "Connections this protocol's detector said no to.",
            |_, d| &d.rejected,
        ),
        (
            "loupe_l7_undecided_total",
            "Connections this protocol's detector could not decide on before detection gave up.",
            |_, d| &d.undecided,
        ),
        (
            "loupe_l7_exchanges_total",
            "Requests paired with their answers (both sides of a connection).",
            |l, _| &l.exchanges,
        ),
        (
            "loupe_l7_spans_total",
            "Exchanges that became spans (database servers' own side only with server_spans).",
            |l, _| &l.spans,
        ),
        (
            "loupe_l7_malformed_total",
            "Stretches of streams that did not parse (skipped until the framing resynchronised).",
            |l, _| &l.malformed,
        ),
        (
            "loupe_l7_orphan_responses_total",
            "Answers with no request to pair with.",
            |l, _| &l.orphans,
        ),
        (
            "loupe_l7_timeouts_total",
            "Requests whose answer never came.",
            |l, _| &l.timeouts,
        ),
        (
            "loupe_l7_pending_overflow_total",
            "Requests dropped because 1024 were already waiting on one connection.",
            |l, _| &l.overflow,
        ),
        (
            "loupe_l7_unsolicited_total",
            "Messages that answer no request (pub/sub, pushes, notices): counted, never paired.",
            |l, _| &l.unsolicited,
        ),
        (
            "loupe_l7_not_executed_total",
            "Statements a server skipped after an earlier error in their pipeline (no span).",
            |l, _| &l.not_executed,
        ),
        (
            "loupe_l7_unknown_fields_total",
            "Header fields that referenced connection state from before the agent attached (HTTP/2 HPACK entries): left out of spans, never guessed.",
            |l, _| &l.unknown_fields,
        ),
    ];
    let mut out = Vec::new();
    for (metric, help, get) in rows {
        for r in REGISTRY {
            out.push(Sample {
                name: metric,
                help,
                gauge: false,
                labels: vec![("protocol", name(r.id))],
                value: get(l, d)
                    .get(r.id as usize)
                    .map_or(0, |c| c.load(Ordering::Relaxed)),
            });
        }
    }
    out.push(Sample {
        name: "loupe_l7_ignored_connections_total",
        help: "Connections no parser wanted after all (the kernel was told to stop capturing them).",
        gauge: false,
        labels: Vec::new(),
        value: d.ignored.load(Ordering::Relaxed),
    });
    for (name, help, c) in [
        (
            "loupe_l7_verdicts_written_total",
            "Ignored verdicts the kernel took (no parser wanted the connection, the OTLP export path, another agent's, an unhooked TLS connection): it costs one lookup per syscall from then on.",
            &d.verdicts_written,
        ),
        (
            "loupe_l7_verdicts_failed_total",
            "Ignored verdicts the kernel could not take (connection gone or socket reused); its events are dropped in user space.",
            &d.verdicts_failed,
        ),
    ] {
        out.push(Sample {
            name,
            help,
            gauge: false,
            labels: Vec::new(),
            value: c.load(Ordering::Relaxed),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportStats;

    #[test]
    fn the_queue_gauges_say_what_waits() {
        let mut m = Metrics::new(None);
        let e = Arc::new(ExportStats::default());
        m.export = Some(e.clone());
        m.user.events_waiting.store(4096, Ordering::Relaxed);
        e.queued.store(12, Ordering::Relaxed);
        let samples = m.samples();
        let gauge = |name: &str| {
            samples
                .iter()
                .find(|s| s.name == name)
                .map(|s| (s.gauge, s.value))
        };
        assert_eq!(gauge("loupe_events_waiting"), Some((true, 4096)));
        assert_eq!(gauge("loupe_export_queue_spans"), Some((true, 12)));
    }

    #[test]
    fn paths_answer_what_they_name_and_nothing_else() {
        let mut m = Metrics::new(None);
        let e = Arc::new(ExportStats::default());
        e.retry_window_ms.store(1000, Ordering::Relaxed);
        m.export = Some(e.clone());
        let get = |m: &Metrics, path: &str| {
            respond(
                m,
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            )
        };
        let (status, ct, body) = get(&m, "/metrics");
        assert_eq!(status, "200 OK");
        assert!(ct.contains("version=0.0.4") && body.contains("loupe_spans_built_total"));
        assert_eq!(get(&m, "/metrics?x=1").0, "200 OK");
        assert_eq!(
            get(&m, "/healthz"),
            ("200 OK", "text/plain; charset=utf-8", "ok\n".into())
        );
        assert_eq!(get(&m, "/readyz").0, "200 OK");
        for other in ["/", "/favicon.ico", "/metricsx", "/healthz/x"] {
            assert_eq!(get(&m, other).0, "404 Not Found", "{other}");
        }
        assert_eq!(
            respond(&m, b"POST /metrics HTTP/1.1\r\n\r\n").0,
            "405 Method Not Allowed"
        );

        // Failing, but within the retry window: still ready (nothing lost yet).
        e.failing_since_ms
            .store(crate::clock::monotonic_ms(), Ordering::Relaxed);
        assert_eq!(get(&m, "/readyz").0, "200 OK");
        // Failing for longer than the window: spans are being dropped.
        e.failing_since_ms
            .store(crate::clock::monotonic_ms() - 5_000, Ordering::Relaxed);
        let (status, _, body) = get(&m, "/readyz");
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.starts_with("not ready: OTLP exports have been failing for 5 s"),
            "{body}"
        );
        assert_eq!(get(&m, "/healthz").0, "200 OK", "alive all the same");
    }
}
