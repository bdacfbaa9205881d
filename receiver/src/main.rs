//! ridley: an eBPF receiver that turns the kernel's view of TCP connections into
//! links (client -> server : port) with exact counters, and exports them through a
//! collector-style pipeline.
//!
//! This crate owns the daemon: loading and attaching the kernel programs (`capture`),
//! link accounting (`aggregate`), the pipeline and its components, and the OTLP edge.
//! It must not define kernel-boundary types (they live in `receiver-ebpf`) nor parse
//! the config document's structure (that is the `config` crate's).
mod aggregate;
mod capture;
mod components;
mod model;
mod otlp;
mod pipeline;
mod spans;
mod telemetry;
mod temporality;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ridley",
    version,
    about = "See who talks to whom: TCP links from eBPF, exported as OpenTelemetry metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT or SIGTERM, then flush and exit.
    Run {
        /// Pipeline config (YAML). Without it, the embedded default: capture and print a
        /// live link table.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr so that the debug exporter's table owns stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("RIDLEY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { config } => run(config),
    }
}

fn run(path: Option<PathBuf>) -> Result<()> {
    let loaded = Config::load(path.as_deref())?;
    for warning in &loaded.warnings {
        tracing::warn!("{}: {warning}", loaded.origin);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Built inside the runtime: network exporters set up their clients here.
        let telemetry = std::sync::Arc::new(telemetry::Telemetry::default());
        let service = pipeline::Service::build(&loaded.config, telemetry)
            .with_context(|| format!("building the pipeline from {}", loaded.origin))?;
        tracing::info!(config = %loaded.origin, "starting");
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
        let result = service.run(shutdown).await;
        signals.abort();
        result
    })?;
    tracing::info!("stopped");
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: flushing and stopping"),
        _ = int.recv() => tracing::info!("SIGINT: flushing and stopping"),
    }
    shutdown.cancel();
    Ok(())
}
