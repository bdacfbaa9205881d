//! The service: builds one instance per component id from `config.service.pipelines`,
//! shared by every pipeline that lists it (a receiver feeds all its pipelines, a
//! processor in two pipelines keeps one state and one set of Kubernetes watches, an
//! exporter in a metrics and a traces pipeline is one exporter told the signal of each
//! batch), starts them, runs the pipelines and shuts everything down in order.
use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Context, Result, anyhow};
use config::{ComponentId, ComponentSection, Config, Signal};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    component::{
        BatchSender, BuildContext, Exporter, Extension, InvalidSetting, Processor, Receiver, Role,
    },
    components,
    encode::Encoded,
    model::{Data, LinkBatch},
    telemetry::Telemetry,
};

/// Batches waiting between a receiver and a pipeline. Small: a batch is a full
/// cumulative state, so a slow exporter skips to the newest rather than queueing.
const PIPELINE_QUEUE: usize = 4;

/// Accepted values of `service.shutdown_timeout`.
const SHUTDOWN_TIMEOUT_RANGE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(300);

type SharedProcessor = Arc<std::sync::Mutex<Box<dyn Processor>>>;
type SharedExporter = Arc<tokio::sync::Mutex<Box<dyn Exporter>>>;

struct PipelineRun {
    name: String,
    signal: Signal,
    /// Where ridley's own telemetry comes from, in a metrics pipeline with
    /// `service.telemetry.metrics.level: basic`; sent after each batch of links.
    self_telemetry: Option<Arc<Telemetry>>,
    processors: Vec<SharedProcessor>,
    exporters: Vec<(ComponentId, SharedExporter)>,
    input: mpsc::Receiver<Arc<LinkBatch>>,
}

impl PipelineRun {
    async fn run(mut self) -> Result<()> {
        while let Some(batch) = self.input.recv().await {
            let mut batch = Arc::unwrap_or_clone(batch);
            for processor in &self.processors {
                let mut processor = processor.lock().unwrap_or_else(|e| e.into_inner());
                batch = processor.process(batch);
            }
            let time = batch.time;
            self.export(Data::Links(&Encoded::new(Arc::new(batch))))
                .await;
            if let Some(telemetry) = &self.self_telemetry {
                let snapshot = telemetry.snapshot_at(time);
                self.export(Data::Telemetry(&snapshot)).await;
            }
        }
        Ok(())
    }

    async fn export(&self, data: Data<'_>) {
        for (id, exporter) in &self.exporters {
            // One exporter failing must not starve the others; the next batch is
            // cumulative, so nothing is lost once it recovers.
            let result = exporter.lock().await.export(self.signal, data).await;
            if let Err(e) = result {
                tracing::error!(pipeline = %self.name, exporter = %id, "export failed: {e:#}");
            }
        }
    }
}

/// Built components, ready to run.
pub struct Service {
    extensions: Vec<(ComponentId, Box<dyn Extension>)>,
    receivers: Vec<(ComponentId, Box<dyn Receiver>, BatchSender)>,
    pipelines: Vec<PipelineRun>,
    exporters: Vec<(ComponentId, SharedExporter)>,
    processor_instances: Vec<(ComponentId, SharedProcessor)>,
    shutdown_timeout: std::time::Duration,
    telemetry: Arc<Telemetry>,
}

/// The signals of the pipelines that list each component id, per role, and for
/// exporters the pipeline that listed it first for each signal (errors name it).
#[derive(Default)]
struct Uses {
    receivers: BTreeMap<ComponentId, Vec<Signal>>,
    processors: BTreeMap<ComponentId, Vec<Signal>>,
    exporters: BTreeMap<ComponentId, Vec<Signal>>,
    exporter_pipelines: BTreeMap<(ComponentId, Signal), String>,
}

impl Uses {
    fn of(config: &Config) -> Self {
        let mut uses = Uses::default();
        for (pipeline_id, pipeline) in &config.service.pipelines {
            let signal = pipeline_id.signal;
            for (ids, table) in [
                (&pipeline.receivers, &mut uses.receivers),
                (&pipeline.processors, &mut uses.processors),
                (&pipeline.exporters, &mut uses.exporters),
            ] {
                for id in ids {
                    let signals = table.entry(id.clone()).or_default();
                    if !signals.contains(&signal) {
                        signals.push(signal);
                    }
                }
            }
            for id in &pipeline.exporters {
                uses.exporter_pipelines
                    .entry((id.clone(), signal))
                    .or_insert_with(|| pipeline_id.to_string());
            }
        }
        uses
    }

    /// Where an exporter error is reported: the pipeline of a signal the exporter
    /// cannot serve, else the first pipeline that lists it.
    fn exporter_pipeline(&self, id: &ComponentId, supported: &[Signal]) -> String {
        let signals = self
            .exporters
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let signal = signals
            .iter()
            .find(|s| !supported.contains(s))
            .or(signals.first());
        signal
            .and_then(|s| self.exporter_pipelines.get(&(id.clone(), *s)))
            .cloned()
            .unwrap_or_default()
    }
}

impl Service {
    /// Builds every component once: configuration parsed and validated, nothing opened
    /// (no listening port, no API watch, no eBPF): `ridley validate` stops here.
    pub fn build(config: &Config, telemetry: Arc<Telemetry>) -> Result<Self> {
        let shutdown_timeout = config.service.shutdown_timeout;
        if !SHUTDOWN_TIMEOUT_RANGE.contains(&shutdown_timeout) {
            return Err(InvalidSetting {
                path: vec!["service".into(), "shutdown_timeout".into()],
                message: format!(
                    "must be from 100ms to 5m, got {}",
                    humantime::format_duration(shutdown_timeout)
                ),
            }
            .into());
        }
        let uses = Uses::of(config);
        let listed_by = |id: &ComponentId| {
            config
                .service
                .pipelines
                .values()
                .filter(|p| {
                    p.receivers.contains(id)
                        || p.processors.contains(id)
                        || p.exporters.contains(id)
                })
                .count()
        };
        let context = |role: Role, id: &ComponentId, signals: &[Signal]| BuildContext {
            role,
            id: id.clone(),
            signals: signals.to_vec(),
            pipelines: listed_by(id),
            telemetry: telemetry.clone(),
        };
        let processors: BTreeMap<ComponentId, SharedProcessor> = uses
            .processors
            .iter()
            .map(|(id, signals)| {
                let processor = components::build_processor(
                    &context(Role::Processor, id, signals),
                    section(&config.processors, id)?,
                )?;
                Ok((id.clone(), Arc::new(std::sync::Mutex::new(processor))))
            })
            .collect::<Result<_>>()?;
        let exporters: BTreeMap<ComponentId, SharedExporter> = uses
            .exporters
            .iter()
            .map(|(id, signals)| {
                let exporter = components::build_exporter(
                    &context(Role::Exporter, id, signals),
                    section(&config.exporters, id)?,
                )
                .with_context(|| {
                    let supported = components::exporter_signals(id.kind());
                    format!("in pipeline {}", uses.exporter_pipeline(id, supported))
                })?;
                Ok((id.clone(), Arc::new(tokio::sync::Mutex::new(exporter))))
            })
            .collect::<Result<_>>()?;

        let mut senders: BTreeMap<ComponentId, Vec<(String, mpsc::Sender<_>)>> = BTreeMap::new();
        let mut pipelines = Vec::new();
        for (pipeline_id, pipeline) in &config.service.pipelines {
            let (tx, rx) = mpsc::channel(PIPELINE_QUEUE);
            for receiver in &pipeline.receivers {
                senders
                    .entry(receiver.clone())
                    .or_default()
                    .push((pipeline_id.to_string(), tx.clone()));
            }
            let shared = |id: &ComponentId| -> Result<_> {
                Ok((
                    id.clone(),
                    exporters
                        .get(id)
                        .cloned()
                        .ok_or_else(|| anyhow!("component {id} is not defined"))?,
                ))
            };
            pipelines.push(PipelineRun {
                name: pipeline_id.to_string(),
                signal: pipeline_id.signal,
                self_telemetry: (pipeline_id.signal == Signal::Metrics
                    && config.service.telemetry.metrics.level == config::MetricsLevel::Basic)
                    .then(|| telemetry.clone()),
                processors: pipeline
                    .processors
                    .iter()
                    .filter_map(|id| processors.get(id).cloned())
                    .collect(),
                exporters: pipeline
                    .exporters
                    .iter()
                    .map(shared)
                    .collect::<Result<_>>()?,
                input: rx,
            });
        }
        let receivers = senders
            .into_iter()
            .map(|(id, pipelines)| {
                let signals = uses.receivers.get(&id).cloned().unwrap_or_default();
                let receiver = components::build_receiver(
                    &context(Role::Receiver, &id, &signals),
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
                    &context(Role::Extension, id, &[]),
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
            processor_instances: processors.into_iter().collect(),
            exporters: exporters.into_iter().collect(),
            shutdown_timeout,
            telemetry,
        })
    }

    /// Counts of what was built: (pipelines, receivers, processors, exporters).
    pub fn summary(&self) -> (usize, usize, usize, usize) {
        (
            self.pipelines.len(),
            self.receivers.len(),
            self.processor_instances.len(),
            self.exporters.len(),
        )
    }

    /// Runs every component until `shutdown`; then receivers send their last batch,
    /// pipelines drain and exporters flush. Returns the first error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        self.start().await?;
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
        let mut pipelines = JoinSet::new();
        for pipeline in self.pipelines {
            pipelines.spawn(pipeline.run());
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
        // Receivers end after their final batch; then the pipelines drain; then every
        // exporter flushes once.
        for joined in [tasks.join_all().await, pipelines.join_all().await] {
            for result in joined {
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
            }
        }
        flush_exporters(&self.exporters, self.shutdown_timeout).await;
        first_error.map_or(Ok(()), Err)
    }
}

impl Service {
    /// Starts every component once, extensions first: a port in use or a bad kubeconfig
    /// stops the daemon before capture starts.
    async fn start(&mut self) -> Result<()> {
        for (id, extension) in &mut self.extensions {
            extension
                .start()
                .await
                .with_context(|| format!("starting extensions.{id}"))?;
        }
        for (id, processor) in &self.processor_instances {
            processor
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .start()
                .with_context(|| format!("starting processors.{id}"))?;
        }
        for (id, exporter) in &self.exporters {
            exporter
                .lock()
                .await
                .start()
                .await
                .with_context(|| format!("starting exporters.{id}"))?;
        }
        Ok(())
    }
}

/// Every exporter flushes at once, under one deadline: a dead backend costs the
/// shutdown at most `timeout` (`service.shutdown_timeout`), however many exporters
/// there are. One line sums it up.
async fn flush_exporters(
    exporters: &[(ComponentId, SharedExporter)],
    timeout: std::time::Duration,
) {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let flushes = exporters.iter().map(|(id, exporter)| async move {
        let result = exporter.lock().await.shutdown(deadline).await;
        (id, result)
    });
    let mut dropped = 0;
    for (id, result) in futures::future::join_all(flushes).await {
        match result {
            Ok(n) => dropped += n,
            Err(e) => tracing::error!(exporter = %id, "flush failed: {e:#}"),
        }
    }
    tracing::info!(
        exporters = exporters.len(),
        dropped_requests = dropped,
        took = ?started.elapsed(),
        "exporters flushed"
    );
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
