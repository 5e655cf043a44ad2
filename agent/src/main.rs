use std::{process::ExitCode, sync::Arc, time::Duration};

use agent_common::conn::{PROTO_HTTP1, PROTO_HTTP2, proto_bit};
use anyhow::Context as _;
use clap::Parser as _;
use loupe::{
    bpf::load::{LoadOptions, Probe},
    capture::{CapturePrinter, Format},
    cli::{CaptureArgs, Cli, Command, CommonArgs},
    conn::Limits,
    metrics::Metrics,
    pipeline, procfs, reader,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("loupe: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loupe: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Until span export lands, the default view is the capture view.
    let capture = match cli.command {
        Some(Command::Capture(args)) => args,
        None => CaptureArgs::default(),
    };
    capture_command(&cli.common, &capture).await
}

async fn capture_command(common: &CommonArgs, args: &CaptureArgs) -> anyhow::Result<()> {
    common.validate()?;
    let opts = LoadOptions {
        capture_bytes: common.capture_bytes,
        protocols: if args.all_protocols {
            0
        } else {
            proto_bit(PROTO_HTTP1) | proto_bit(PROTO_HTTP2)
        },
        pids: common.pids.clone(),
        cgroups: common.cgroup_ids()?,
        netns: common.netns_inodes()?,
        ring_buffer_bytes: common.ring_buffer_bytes,
        max_connections: common.max_connections,
    };
    let mut probe = Probe::load(&opts)?;
    for line in &probe.degraded {
        tracing::warn!("degraded: {line}");
    }
    let ring = probe.take_events()?;
    let metrics = Arc::new(Metrics::new(Some(probe.take_counters()?)));

    let (stop_tx, stop_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel(65_536);
    let reader = tokio::spawn(reader::run(ring, tx, metrics.user.clone(), stop_rx));
    if let Some(addr) = common.metrics_addr {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(err) = loupe::metrics::serve(addr, m).await {
                tracing::error!("{err:#}");
            }
        });
    }
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
    let consumer = tokio::spawn(async move {
        let mut sink = CapturePrinter::new(std::io::BufWriter::new(std::io::stdout()), format);
        pipeline::run(rx, limits, procfs::ProcRoles, &mut sink, stats).await;
    });

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    tracing::info!("stopping: draining the ring buffer");
    let _ = stop_tx.send(true);
    reader.await.context("reader task")??;
    consumer.await.context("pipeline task")?;
    tracing::info!("{}", metrics.summary());
    drop(probe);
    Ok(())
}
