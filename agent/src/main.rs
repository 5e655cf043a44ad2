use std::{process::ExitCode, sync::Arc, time::Duration};

use agent_common::{
    conn::{PROTO_HTTP1, PROTO_HTTP2, proto_bit},
    protocol::PROTO_TLS,
};
use anyhow::Context as _;
use clap::Parser as _;
use loupe::scheduling::ADAPTIVE;
use loupe::{
    bpf::load::{LoadOptions, Probe},
    capture::{CapturePrinter, Format},
    cli::{CaptureArgs, Cli, Command, CommonArgs, RunArgs, console_wanted, otlp_config},
    config::FileConfig,
    conn::Limits,
    export::{ExportConfig, ExportStats, Exporter, host_name, otlp_metrics::MetricsExport},
    metrics::Metrics,
    pipeline,
    process::ProcessCache,
    procfs, reader,
    trace::sink::TraceSink,
    trace::span::Redaction,
};
use tokio::signal::unix::{SignalKind, signal};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc v3 header libmimalloc-sys 0.1.49 builds; the crate
/// does not export it. The assertion fails the build if the option list changes shape.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const _: () = assert!(libmimalloc_sys::_mi_option_last == 47);

/// mimalloc returns freed pages to the OS 10 ms after they empty, and the pipeline's steady churn
/// of short-lived allocations then page-faults them back in: ~20% of the agent's CPU at 10k req/s.
/// One second keeps the working set resident (+4 MiB RSS). MIMALLOC_PURGE_DELAY still wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: option get/set have no preconditions; 10 is the documented default, checked so
    // that a renumbered option list is left alone.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 10 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        }
    }
}

/// No transparent huge pages for the agent's own memory. mimalloc's arena is one aligned
/// region, and with 2 MiB pages a few live objects keep whole huge pages resident: at 40k req/s,
/// both ends traced, the heap's resident size was 29-38 MiB with them and 18 MiB without, for the
/// same CPU (3 alternating rounds). mimalloc is built without its own `madvise(MADV_HUGEPAGE)`
/// (the `no_thp` feature); this covers hosts whose THP setting is `always`. Only pages faulted
/// from now on are affected, so it runs before anything else allocates much.
fn no_huge_pages() {
    // Logging is not set up yet, and a failure (seccomp) only leaves the host's THP setting on.
    // SAFETY: plain prctl on this process with integer arguments.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// SCHED_IDLE for this thread, before any other exists: every thread the agent starts inherits
/// it. A woken thread of any normal task then preempts the agent at once, instead of waiting up
/// to a scheduler slice (on the 2-core bench machine, p99 at 27k req/s went from ~1.8 ms to
/// ~0.7 ms against 0.42 ms without the agent).
fn sched_idle() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::warn!(
            "--cpu-scheduling idle: sched_setscheduler failed ({}); running with normal scheduling",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    tune_allocator();
    // One TLS implementation for every client (OTLP over https, the Kubernetes API): ring, with
    // the system's trust store. Fails only if one was installed already, which is then used.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // Colour only for a person at a terminal: files and `kubectl logs` get plain text, and
    // NO_COLOR (no-color.org) is honoured.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    let json_logs = cli.common.log_format == loupe::cli::LogFormat::Json;
    // `loupe top` owns the terminal: its log lines are shown at the bottom of the view.
    let tail = loupe::top::LogTail::default();
    match (&cli.command, cli.common.log_format) {
        (Some(Command::Top(_)), _) => logs.with_writer(tail.clone()).with_ansi(false).init(),
        (_, loupe::cli::LogFormat::Json) => logs
            .with_writer(std::io::stderr)
            .json()
            .with_ansi(false)
            .init(),
        (_, loupe::cli::LogFormat::Text) => {
            logs.with_writer(std::io::stderr).with_ansi(colour).init()
        }
    }
    match cli.common.cpu_scheduling {
        loupe::cli::CpuScheduling::Idle => sched_idle(),
        loupe::cli::CpuScheduling::Adaptive => {
            ADAPTIVE.enable();
            ADAPTIVE.join();
        }
        loupe::cli::CpuScheduling::Normal => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| ADAPTIVE.join())
        .on_thread_stop(|| ADAPTIVE.leave())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("loupe: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Capture(args)) => capture_command(&cli.common, &args).await,
            Some(Command::Run(args)) => run_command(&cli.common, &args, None).await,
            Some(Command::Top(args)) => match args.from.clone() {
                Some(addr) => {
                    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let refresh = Duration::from_secs(args.refresh.max(1));
                    tokio::task::spawn_blocking(move || {
                        loupe::top::run(loupe::top::Source::Remote(addr), tail, refresh, stop)
                    })
                    .await
                    .context("the view")?
                }
                None => {
                    let view = (tail, Duration::from_secs(args.refresh.max(1)));
                    run_command(&cli.common, &args.run, Some(view)).await
                }
            },
            None => run_command(&cli.common, &cli.run, None).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if json_logs {
                tracing::error!("{err:#}");
            } else {
                eprintln!("loupe: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The kernel side and the reader, running; what every command starts with.
struct Capture {
    probe: Probe,
    tls: Arc<loupe::tls::TlsStats>,
    /// Go programs (filled by the TLS watcher): their events are keyed by goroutine.
    go_pids: loupe::tls::watch::GoPids,
    /// Keeps the TLS probes on new library files; stops when dropped.
    _tls_watch: Option<loupe::tls::watch::TlsWatch>,
    events: loupe::event_queue::EventReceiver,
    metrics: Metrics,
    reader: reader::Reader,
}

/// `per_event_comm`: each data event names its thread (what `capture` prints), not only the
/// first of a connection.
fn start_capture(
    common: &CommonArgs,
    protocols: u32,
    per_event_comm: bool,
) -> anyhow::Result<Capture> {
    common.validate()?;
    let opts = LoadOptions {
        capture_bytes: common.capture_bytes,
        protocols,
        processes: common.process_selection(),
        ports: common.ports.clone(),
        cgroups: common.cgroup_ids()?,
        netns: common.netns_inodes()?,
        ring_buffer_bytes: common.ring_buffer_bytes,
        max_connections: common.max_connections,
        tcp_context: common.tcp_context.then_some(common.tcp_option_exid),
        tls: !common.no_tls && protocols != 0,
        capture_path: common.capture_path,
        comm_every_event: per_event_comm,
    };
    let mut probe = Probe::load(&opts)?;
    // Loading parsed the kernel's BTF (~30 MiB of short-lived allocations). mimalloc keeps freed
    // pages for reuse by the thread that freed them, and this thread allocates little from now
    // on: hand them back, or they stay in the agent's RSS for good (73 -> 40 MiB idle).
    // SAFETY: no preconditions; only returns free memory to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) };
    tracing::info!("capture: {}", probe.capture);
    for line in &probe.degraded {
        tracing::warn!("degraded: {line}");
    }
    if let Some(why) = ADAPTIVE.refusal() {
        tracing::warn!(
            "--cpu-scheduling adaptive (the default): {why}; running with normal scheduling"
        );
    }
    let agents = loupe::bpf::load::agents_loaded();
    if agents > 1 {
        let others = agents - 1;
        tracing::warn!(
            "{others} other Loupe agent{} running on this host (their programs are loaded): processes both select are traced twice, so their spans are exported twice; run one agent per host. This one does not trace the others' own connections (their exports).",
            if others == 1 { " is" } else { "s are" }
        );
    }
    let ring = probe.take_events()?;
    let mut metrics = Metrics::new(Some(probe.take_counters()?));
    let tls = Arc::new(loupe::tls::TlsStats::default());
    let go_pids = loupe::tls::watch::GoPids::default();
    let tls_watch = Some(loupe::tls::watch::start(
        probe.handle(),
        tls.clone(),
        go_pids.clone(),
        probe.tls_ready,
        probe.pool_wakeups,
    ));
    metrics.tls = Some(tls.clone());
    let (tx, events) = loupe::event_queue::channel(loupe::event_queue::CAPACITY);
    let reader = reader::Reader::spawn(ring, tx, metrics.user.clone())?;
    Ok(Capture {
        probe,
        tls,
        go_pids,
        _tls_watch: tls_watch,
        events,
        metrics,
        reader,
    })
}

/// Binds the metrics endpoint before anything else reports ready: an address in use is a
/// configuration error, not a log line.
fn spawn_observability(common: &CommonArgs, metrics: &Arc<Metrics>) -> anyhow::Result<()> {
    if let Some(addr) = common.metrics_addr {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on --metrics-addr {addr}: {e}; pick a free address or leave the flag out"
            )
        })?;
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(err) = loupe::metrics::serve(listener, m).await {
                tracing::error!("{err:#}");
            }
        });
    }
    let m = metrics.clone();
    tokio::spawn(async move {
        let mut watch = loupe::drop_warnings::DropWatch::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for line in watch.check(&m, std::time::Instant::now()) {
                tracing::warn!("{line}");
            }
        }
    });
    if common.summary_interval > 0 {
        let m = metrics.clone();
        let every = Duration::from_secs(common.summary_interval);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                tracing::info!("{}", m.summary());
            }
        });
    }
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP, handled from before "ready:" is logged: a signal sent as soon as
/// the agent says it is ready must stop it cleanly (drain, flush), not kill it by the default
/// action. SIGHUP (a closed terminal or SSH session) stops it the same way: there is no reload,
/// since what is attached depends on flags that a reload could not change consistently. A
/// second signal while draining exits at once.
struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }

    async fn wait(mut self) {
        let first = self.next().await;
        tracing::info!(
            "{first}: stopping (draining the ring buffer and flushing spans; signal again to exit at once)"
        );
        tokio::spawn(async move {
            let second = self.next().await;
            eprintln!("loupe: {second} while stopping: exiting without flushing");
            std::process::exit(130);
        });
    }
}

/// The pipeline (`work`) on a thread of its own, with a single-threaded runtime for its queue
/// and its ticks. As a task of the two-worker runtime it was woken onto whichever worker was
/// free, so its state (connection table, linker, RED series) moved between the cores with it,
/// and it shared each worker with the exporter's tasks. Resolves when the work is done (an
/// error if it panicked).
fn spawn_pipeline(
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("starting the pipeline's runtime")?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("loupe-pipeline".into())
        .spawn(move || {
            // Leaves the adaptive group however the thread ends (a panic included), so a reused
            // tid is never re-prioritised.
            struct Member;
            impl Drop for Member {
                fn drop(&mut self) {
                    ADAPTIVE.leave();
                }
            }
            ADAPTIVE.join();
            let _member = Member;
            runtime.block_on(work);
            let _ = done.send(());
        })
        .context("starting the pipeline thread")?;
    Ok(finished)
}

async fn capture_command(common: &CommonArgs, args: &CaptureArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::install()?;
    let protocols = if args.all_protocols {
        0
    } else {
        proto_bit(PROTO_HTTP1) | proto_bit(PROTO_HTTP2) | proto_bit(PROTO_TLS)
    };
    let Capture {
        probe,
        tls: _,
        go_pids,
        _tls_watch,
        events,
        metrics,
        reader,
    } = start_capture(common, protocols, true)?;
    let metrics = Arc::new(metrics);
    spawn_observability(common, &metrics)?;
    tracing::info!(
        "ready: {} programs attached, capturing {}",
        probe.attached,
        if args.all_protocols {
            "every TCP connection"
        } else {
            "HTTP connections"
        }
    );
    let limits = Limits {
        max_connections: common.max_connections as usize,
        ..Limits::default()
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Text
    };
    let stats = metrics.user.clone();
    let show_secrets = args.show_secrets;
    let consumer = spawn_pipeline(async move {
        let mut sink = CapturePrinter::new(
            std::io::BufWriter::new(loupe::stdout::Stdout::new()),
            format,
            !show_secrets,
        );
        pipeline::run(
            events,
            limits,
            procfs::ProcRoles::default(),
            &mut sink,
            stats,
            go_pids,
        )
        .await;
    })?;
    shutdown.wait().await;
    reader.stop().await?;
    consumer
        .await
        .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?;
    tracing::info!("{}", metrics.summary());
    drop(probe);
    Ok(())
}

/// `top`: draw the live view (with its log tail and refresh period) instead of printing trees.
async fn run_command(
    common: &CommonArgs,
    args: &RunArgs,
    top: Option<(loupe::top::LogTail, Duration)>,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::install()?;
    let file = FileConfig::load(args.config.as_deref())?;
    let otlp = otlp_config(args)?;
    let console = top.is_none() && console_wanted(args, otlp.is_some());
    let export_cfg = ExportConfig {
        otlp: otlp.clone(),
        console,
        console_rate: args.console_rate,
        jsonl: args.output.clone(),
        append: args.append,
        // Large enough that ~100k spans/s need only ~50 sequential export calls per second.
        batch_size: 2048.min(args.export_queue as usize),
        flush_interval: Duration::from_secs(1),
        queue_capacity: args.export_queue as usize,
        host_name: host_name(),
        retry_for: Duration::from_secs(args.export_retry),
    };
    let export_stats = Arc::new(ExportStats::default());
    // Exporter first: a bad endpoint or output path fails before anything is attached.
    let processes = ProcessCache::shared(file.service_names.clone(), file.redaction.command_line);
    let k8s = loupe::k8s::start(args.kubernetes, args.node_name.clone())?;
    if let (Some((pods, _)), Ok(mut p)) = (&k8s, processes.lock()) {
        p.with_pods(pods.clone());
    }
    let Exporter {
        out: spans_out,
        task: export_task,
    } = Exporter::spawn(export_cfg, processes.clone(), export_stats.clone())?;

    let Capture {
        mut probe,
        tls,
        go_pids,
        _tls_watch,
        events,
        mut metrics,
        reader,
        // Only what a parser turns into spans: HTTP/2 (gRPC) would be copied and then ignored.
    } = start_capture(common, loupe::protocol::wanted_mask(), false)?;
    let redaction = Redaction {
        query_values: file.redaction.query_values,
    };
    let mut sink = TraceSink::new(
        spans_out,
        export_stats.clone(),
        redaction,
        args.response_timeout * 1_000_000_000,
        processes.clone(),
    );
    let sink_processes = processes;
    if let Some(o) = &otlp {
        sink.exclude(loupe::export::otlp::endpoint_addrs(o));
    }
    sink.databases(file.databases.options());
    sink.verdicts(Box::new(loupe::protocol::verdict::KernelVerdicts::new(
        probe.take_conns()?,
    )));
    // RED metrics and the service graph: scraped on --metrics-addr, pushed with the spans.
    let mut red = loupe::red::Red::new(sink_processes.clone(), args.metrics_series as usize);
    let head = loupe::trace::sampling::HeadSampler::from_env(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    )?;
    sink.sampler = loupe::trace::sampling::Sampler::new(head, file.sampling.clone());
    metrics.sampling = Some(sink.sampler.stats.clone());
    let red_store = red.store();
    metrics.red = Some(red.store());
    sink.red(red);
    metrics.export = Some(export_stats);
    metrics.exporting = otlp.is_some();
    sink.tls = tls;
    metrics.traces = Some(sink.stats.clone());
    metrics.links = Some(sink.linker.stats.clone());
    metrics.k8s = k8s;
    let metrics = Arc::new(metrics);
    spawn_observability(common, &metrics)?;
    let metrics_export = match &otlp {
        Some(o) => MetricsExport::start(o, metrics.clone(), &host_name())?,
        None => None,
    };
    let destination = match &otlp {
        Some(o) => format!(
            "OTLP {} {}",
            o.protocol.name(),
            loupe::export::otlp_settings::settings(o)?.url
        ),
        None => "the terminal".to_string(),
    };
    tracing::info!(
        "ready: {} programs attached, tracing HTTP/1, HTTP/2 and gRPC, PostgreSQL, MySQL and Redis{} to {destination}",
        probe.attached,
        if probe.tls_ready {
            ", cleartext and inside TLS (OpenSSL, Go)"
        } else {
            ", cleartext only"
        }
    );

    let limits = Limits {
        max_connections: common.max_connections as usize,
        ..Limits::default()
    };
    let stats = metrics.user.clone();
    let consumer = spawn_pipeline(async move {
        pipeline::run(
            events,
            limits,
            procfs::ProcRoles::default(),
            &mut sink,
            stats,
            go_pids,
        )
        .await;
        // Dropping the sink closes the export queue: the exporter flushes and ends.
        drop(sink);
    })?;
    match top {
        None => shutdown.wait().await,
        Some((tail, refresh)) => {
            let stop_view = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop_view.clone();
            let mut view = tokio::task::spawn_blocking(move || {
                loupe::top::run(loupe::top::Source::Local(red_store), tail, refresh, flag)
            });
            tokio::select! {
                _ = shutdown.wait() => {
                    stop_view.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = view.await;
                }
                done = &mut view => done.context("the view")??,
            }
        }
    }
    reader.stop().await?;
    consumer
        .await
        .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?;
    if tokio::time::timeout(Duration::from_secs(5), export_task)
        .await
        .is_err()
    {
        tracing::warn!("export did not finish within 5 s of shutdown; pending spans were dropped");
    }
    if let Some(m) = metrics_export {
        m.shutdown().await;
    }
    tracing::info!("{}", metrics.summary_at_exit());
    drop(probe);
    Ok(())
}
