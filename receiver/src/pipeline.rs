//! The collector's shape: receivers produce [`LinkBatch`]es, processors transform them,
//! exporters send them out. One trait per role; components are built from the registry
//! (`components.rs`) by their type name and wired by `service.pipelines`.
use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use config::{ComponentId, ComponentSection, Config, Signal};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{components, model::LinkBatch, telemetry::Telemetry};

/// Batches waiting between a receiver and a pipeline. Small: a batch is a full
/// cumulative state, so a slow exporter skips to the newest rather than queueing.
const PIPELINE_QUEUE: usize = 4;

/// How long the exporters of a pipeline may take to flush at shutdown, together: well
/// under Kubernetes' default 30 s grace period.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a receiver sends its batches: every pipeline that lists it.
#[derive(Clone)]
pub struct BatchSender {
    pipelines: Vec<(String, mpsc::Sender<Arc<LinkBatch>>)>,
}

impl BatchSender {
    /// Hands the batch to each pipeline without waiting. A pipeline whose queue is full
    /// skips this batch (the next carries the same cumulative values), and it is logged.
    pub fn send(&self, batch: LinkBatch) {
        let batch = Arc::new(batch);
        for (name, tx) in &self.pipelines {
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(batch.clone()) {
                tracing::warn!(pipeline = %name, "pipeline busy: batch skipped");
            }
        }
    }

    /// Hands the last batch to each pipeline, waiting for room: on shutdown the final
    /// state must reach the exporters.
    pub async fn send_final(&self, batch: LinkBatch) {
        let batch = Arc::new(batch);
        for (_, tx) in &self.pipelines {
            // An error means the pipeline already stopped; nothing is left to deliver to.
            let _ = tx.send(batch.clone()).await;
        }
    }
}

#[async_trait]
pub trait Receiver: Send {
    /// Runs until `shutdown` is cancelled, then sends a final batch and returns.
    /// `ready` is signalled once data capture has started.
    async fn run(
        self: Box<Self>,
        out: BatchSender,
        ready: tokio::sync::oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> Result<()>;
}

pub trait Processor: Send {
    fn process(&mut self, batch: LinkBatch) -> LinkBatch;
}

/// Sends batches out as one signal. An exporter listed in a metrics and a traces
/// pipeline is built once per pipeline, each instance serving one signal.
#[async_trait]
pub trait Exporter: Send {
    async fn export(&mut self, batch: &LinkBatch) -> Result<()>;
    /// Flushes what is buffered, giving up at `deadline`; called once, after the last
    /// batch. Returns how many requests were dropped on the way out.
    async fn shutdown(&mut self, deadline: tokio::time::Instant) -> Result<u64> {
        let _ = deadline;
        Ok(0)
    }
}

/// Runs beside the pipelines (health checks). Started before the receivers, stopped
/// at shutdown.
#[async_trait]
pub trait Extension: Send {
    async fn run(
        self: Box<Self>,
        telemetry: Arc<Telemetry>,
        shutdown: CancellationToken,
    ) -> Result<()>;
}

/// What a component factory gets besides its own config section.
#[derive(Clone)]
pub struct BuildContext {
    pub id: ComponentId,
    /// The signal of the pipeline the component is built for.
    pub signal: Signal,
    pub telemetry: Arc<Telemetry>,
    /// Only check the configuration (`ridley validate`): no ports, no connections.
    pub validate_only: bool,
}

/// Parses a component's own section with its config struct (which should
/// `deny_unknown_fields`), naming the component in the error.
pub fn parse_section<T: DeserializeOwned>(
    role: &str,
    id: &ComponentId,
    section: ComponentSection,
) -> Result<T> {
    serde_path_to_error::deserialize(section).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let hint = config::document::suggestion(&message).unwrap_or_default();
        let at = if path == "." {
            format!("{role}.{id}")
        } else {
            format!("{role}.{id}.{path}")
        };
        anyhow!("{at}: {message}{hint}")
    })
}

struct PipelineRun {
    name: String,
    self_metrics: bool,
    processors: Vec<Box<dyn Processor>>,
    exporters: Vec<(ComponentId, Box<dyn Exporter>)>,
    input: mpsc::Receiver<Arc<LinkBatch>>,
}

impl PipelineRun {
    async fn run(mut self) -> Result<()> {
        while let Some(batch) = self.input.recv().await {
            let mut batch = Arc::unwrap_or_clone(batch);
            batch.self_metrics = self.self_metrics;
            for processor in &mut self.processors {
                batch = processor.process(batch);
            }
            for (id, exporter) in &mut self.exporters {
                // One exporter failing must not starve the others; the next batch is
                // cumulative, so nothing is lost once it recovers.
                if let Err(e) = exporter.export(&batch).await {
                    tracing::error!(pipeline = %self.name, exporter = %id, "export failed: {e:#}");
                }
            }
        }
        // Every exporter flushes at once, under one deadline: a dead backend costs the
        // shutdown at most SHUTDOWN_TIMEOUT, however many exporters there are.
        let started = tokio::time::Instant::now();
        let deadline = started + SHUTDOWN_TIMEOUT;
        let flushes = self.exporters.iter_mut().map(|(id, exporter)| async move {
            let result = exporter.shutdown(deadline).await;
            (id.clone(), result)
        });
        let mut dropped = 0;
        for (id, result) in futures::future::join_all(flushes).await {
            match result {
                Ok(n) => dropped += n,
                Err(e) => {
                    tracing::error!(pipeline = %self.name, exporter = %id, "flush failed: {e:#}")
                }
            }
        }
        tracing::info!(
            pipeline = %self.name,
            exporters = self.exporters.len(),
            dropped_requests = dropped,
            took = ?started.elapsed(),
            "pipeline flushed"
        );
        Ok(())
    }
}

/// Built components, ready to run.
pub struct Service {
    extensions: Vec<(ComponentId, Box<dyn Extension>)>,
    receivers: Vec<(ComponentId, Box<dyn Receiver>, BatchSender)>,
    pipelines: Vec<PipelineRun>,
    telemetry: Arc<Telemetry>,
}

impl Service {
    /// Builds every component. With `validate_only`, components check their config and
    /// start nothing (no listening port, no API watch, no eBPF).
    pub fn build(config: &Config, telemetry: Arc<Telemetry>, validate_only: bool) -> Result<Self> {
        let mut senders: BTreeMap<ComponentId, Vec<(String, mpsc::Sender<_>)>> = BTreeMap::new();
        let mut pipelines = Vec::new();
        let context = |id: &ComponentId, signal: Signal| BuildContext {
            id: id.clone(),
            signal,
            telemetry: telemetry.clone(),
            validate_only,
        };
        for (pipeline_id, pipeline) in &config.service.pipelines {
            let signal = pipeline_id.signal;
            let (tx, rx) = mpsc::channel(PIPELINE_QUEUE);
            for receiver in &pipeline.receivers {
                senders
                    .entry(receiver.clone())
                    .or_default()
                    .push((pipeline_id.to_string(), tx.clone()));
            }
            let processors = pipeline
                .processors
                .iter()
                .map(|id| {
                    components::build_processor(
                        &context(id, signal),
                        section(&config.processors, id)?,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let exporters = pipeline
                .exporters
                .iter()
                .map(|id| {
                    let exporter = components::build_exporter(
                        &context(id, signal),
                        section(&config.exporters, id)?,
                    )
                    .with_context(|| format!("in pipeline {pipeline_id}"))?;
                    Ok((id.clone(), exporter))
                })
                .collect::<Result<Vec<_>>>()?;
            pipelines.push(PipelineRun {
                name: pipeline_id.to_string(),
                self_metrics: config.service.telemetry.metrics.level == config::MetricsLevel::Basic,
                processors,
                exporters,
                input: rx,
            });
        }
        let receivers = senders
            .into_iter()
            .map(|(id, pipelines)| {
                // Receivers emit one batch for every signal of the pipelines they feed.
                let receiver = components::build_receiver(
                    &context(&id, Signal::Metrics),
                    section(&config.receivers, &id)?,
                )?;
                Ok((id, receiver, BatchSender { pipelines }))
            })
            .collect::<Result<Vec<_>>>()?;
        let extensions = config
            .service
            .extensions
            .iter()
            .map(|id| {
                let extension = components::build_extension(
                    &context(id, Signal::Metrics),
                    section(&config.extensions, id)?,
                )?;
                Ok((id.clone(), extension))
            })
            .collect::<Result<Vec<_>>>()?;
        telemetry.expect_receivers(receivers.len() as u64);
        Ok(Service {
            extensions,
            receivers,
            pipelines,
            telemetry,
        })
    }

    /// Counts of what was built: (pipelines, receivers).
    pub fn summary(&self) -> (usize, usize) {
        (self.pipelines.len(), self.receivers.len())
    }

    /// Runs every component until `shutdown`; then receivers send their last batch,
    /// pipelines drain and exporters flush. Returns the first error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut tasks = JoinSet::new();
        for (id, extension) in self.extensions {
            let telemetry = self.telemetry.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                extension
                    .run(telemetry, shutdown)
                    .await
                    .with_context(|| format!("extensions.{id}"))
            });
        }
        for pipeline in self.pipelines {
            tasks.spawn(pipeline.run());
        }
        let mut readiness = Vec::new();
        for (id, receiver, out) in self.receivers {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            readiness.push((id.clone(), ready_rx));
            let shutdown = shutdown.clone();
            let stop_all = shutdown.clone();
            tasks.spawn(async move {
                let result = receiver
                    .run(out, ready_tx, shutdown)
                    .await
                    .with_context(|| format!("receivers.{id}"));
                // A receiver that stops takes the daemon down with it, loudly.
                stop_all.cancel();
                result
            });
        }
        let telemetry = self.telemetry.clone();
        let ready = async {
            for (id, rx) in readiness {
                if rx.await.is_ok() {
                    telemetry.receiver_ready();
                    tracing::info!(receiver = %id, "receiver ready");
                }
            }
            tracing::info!("ridley is running");
        };
        tokio::select! {
            _ = ready => {},
            _ = shutdown.cancelled() => {},
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.map_err(|e| anyhow!("component task panicked: {e}"))?;
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn section(
    sections: &BTreeMap<ComponentId, ComponentSection>,
    id: &ComponentId,
) -> Result<ComponentSection> {
    sections
        .get(id)
        .cloned()
        .ok_or_else(|| anyhow!("component {id} is not defined"))
}
