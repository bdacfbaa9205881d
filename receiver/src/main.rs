//! ridley: an eBPF receiver that turns the kernel's view of TCP connections into
//! links (client -> server : port) with exact counters, and exports them through a
//! collector-style pipeline.
//!
//! This crate owns the daemon: loading and attaching the kernel programs (`capture`),
//! link accounting (`aggregate`), the real ends of translated connections (`nat`, with
//! conntrack lookups in `capture::conntrack`), the pipeline and its components, and the
//! OTLP edge.
//! It must not define kernel-boundary types (they live in `receiver-ebpf`) nor parse
//! the config document's structure (that is the `config` crate's).
mod aggregate;
mod capture;
mod component;
mod components;
mod encode;
mod model;
mod nat;
mod otel_env;
mod service;
mod telemetry;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ridley",
    version,
    about = "See who talks to whom: TCP links from eBPF, exported as OpenTelemetry metrics and service-graph spans",
    long_about = "ridley watches TCP connections in the kernel (eBPF: tp_btf/inet_sock_set_state and iter/tcp), \
                  turns them into links (client -> server:port) with exact bytes, connections, failures and \
                  latencies, names both ends from Kubernetes, and exports them through a collector-style \
                  pipeline (OTLP gRPC/HTTP, Prometheus, file, debug)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Pipeline config (YAML). Repeat to merge several files in order (later keys win).
    /// Without it, the embedded default: capture and print a live link table.
    #[arg(long, value_name = "FILE")]
    config: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT or SIGTERM, then flush and exit. Needs root (or
    /// CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) and a kernel with BTF.
    Run(ConfigArgs),
    /// Check a configuration without loading eBPF or opening anything: exit 0, or print
    /// every error with its file, line and column.
    Validate(ConfigArgs),
    /// Print the effective configuration: files merged and `${...}` references expanded,
    /// secrets shown as `[REDACTED]`.
    Config {
        #[command(flatten)]
        args: ConfigArgs,
        /// Print the merged configuration as YAML (the only action today).
        #[arg(long)]
        print: bool,
        /// Print secrets in full: the values under `headers` and of keys such as
        /// `password`, `api_key`, `bearer_token` or `client_secret`.
        #[arg(long)]
        no_redact: bool,
    },
    /// List the component types (extensions, receivers, processors, exporters), the
    /// signals they serve and their config keys.
    Components,
}

/// Logs go to stderr so that the debug exporter's table owns stdout. `RIDLEY_LOG`
/// (an env-filter) wins over `service.telemetry.logs.level`.
fn init_logs(level: &str, encoding: config::LogEncoding) {
    // kube's watcher logs some failures at every retry; ridley logs each watch's changes
    // of state itself, once. Below debug, keep kube to its errors.
    let default = if matches!(level, "debug" | "trace") {
        level.to_owned()
    } else {
        format!("{level},kube_runtime=error,kube_client=error,kube_client::client::builder=off")
    };
    let filter = EnvFilter::try_from_env("RIDLEY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match encoding {
        config::LogEncoding::Json => logs.json().init(),
        // Colour only for a person at a terminal (and never with NO_COLOR set): a log
        // collector must not get escape codes.
        config::LogEncoding::Console => {
            use std::io::IsTerminal;
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init()
        }
    }
}

/// Keeps the heap's resident size close to what is in use. glibc's defaults fit a
/// daemon badly: once a large block (an export part, a page piece) is freed, the size
/// above which blocks come from mmap rises to that block's, so the next parts come
/// from the heap and their pages stay resident after they are freed; and every thread
/// may get an arena of its own. A fixed threshold (128 KiB, glibc's initial value)
/// keeps large blocks in mmap, returned to the system when freed, and one arena for
/// every thread keeps freed blocks in one place for the next allocation, whichever
/// thread makes it. Measured with 16,000 links and the `otlp` exporter: 97 -> 47 MiB
/// RSS (two arenas then). One arena, and freed pages handed back before each full walk
/// (`capture::release_freed_memory`), took the soak's anonymous memory at minute 3
/// from 4.3-4.6 to 3.8 MiB.
fn bound_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any thread
    // exists. A parameter it rejects (returns 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    bound_heap();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args.config, false),
        Command::Validate(args) => run(&args.config, true),
        Command::Config {
            args, no_redact, ..
        } => Config::load(&args.config)
            .map(|loaded| {
                let yaml = if no_redact {
                    loaded.effective_yaml_unredacted()
                } else {
                    loaded.effective_yaml()
                };
                print!("{yaml}");
            })
            .map_err(anyhow::Error::from),
        Command::Components => {
            for d in components::describe() {
                let signals: Vec<String> = d.signals.iter().map(|s| s.to_string()).collect();
                let serves = if d.role == "extension" {
                    String::new()
                } else {
                    format!("[{}]", signals.join(", "))
                };
                println!("{:<10} {:<14} {serves}", d.role, d.kind);
                println!("{:<10} {:<14} keys: {}", "", "", d.keys.join(", "));
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config and builds the pipeline; then runs it, or (validate) stops there.
fn run(paths: &[PathBuf], validate_only: bool) -> Result<()> {
    let loaded = Config::load(paths)?;
    let logs = &loaded.config.service.telemetry.logs;
    init_logs(logs.level.as_str(), logs.encoding);
    for warning in &loaded.warnings {
        tracing::warn!("{}: {warning}", loaded.origin());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Built inside the runtime: network exporters set up their clients here.
        let telemetry = std::sync::Arc::new(telemetry::Telemetry::default());
        let service = service::Service::build(&loaded.config, telemetry)
            .map_err(|e| locate_error(&loaded, e))?;
        if validate_only {
            let (pipelines, receivers, _, _) = service.summary();
            println!(
                "{}: valid ({pipelines} pipelines, {receivers} receivers)",
                loaded.origin()
            );
            return Ok(());
        }
        let (pipelines, receivers, processors, exporters) = service.summary();
        tracing::info!(
            config = %loaded.origin(),
            pipelines,
            receivers,
            processors,
            exporters,
            "starting (one instance per component id)"
        );
        raise_open_file_limit();
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
        let result = service.run(shutdown).await;
        signals.abort();
        result
    })?;
    if !validate_only {
        tracing::info!("stopped");
    }
    Ok(())
}

/// Component errors name their key path (`exporters.otlp.timeout: ...`): point at where
/// that key was written.
fn locate_error(loaded: &config::Loaded, error: anyhow::Error) -> anyhow::Error {
    let location = error
        .chain()
        .find_map(|layer| layer.downcast_ref::<component::InvalidSetting>())
        .and_then(|mistake| loaded.locate(&mistake.path.join(".")));
    match location {
        Some(location) => error.context(location),
        None => error,
    }
}

/// Each walked namespace, listener connection and exporter holds file descriptors; the
/// common soft limit of 1024 is easy to reach on a busy node. Raise it to the hard limit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let soft = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            tracing::info!(from = soft, to = limit.rlim_max, "open file limit raised");
        } else {
            tracing::warn!(
                limit = soft,
                "could not raise the open file limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // SIGHUP's default would kill the daemon without its final flush. There is no live
    // reload (the kernel programs and watches would restart anyway): flush and exit, and
    // let the supervisor start it again with the new config.
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: flushing and stopping"),
        _ = int.recv() => tracing::info!("SIGINT: flushing and stopping"),
        _ = hup.recv() => tracing::info!("SIGHUP: flushing and stopping (restart to reload)"),
    }
    shutdown.cancel();
    Ok(())
}
