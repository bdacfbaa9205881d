//! What a component is: one trait per role (receivers produce [`LinkBatch`]es,
//! processors transform them, exporters send them out, extensions run beside), and what
//! a factory gets to build one ([`BuildContext`]). Component modules implement these;
//! the pipelines that wire them live in `service`, which this module never imports.
use std::sync::Arc;

use anyhow::{Result, anyhow};
use async_trait::async_trait;
use config::{ComponentId, ComponentSection, Signal};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    model::{Data, LinkBatch},
    telemetry::Telemetry,
};

/// Where a receiver sends its batches: every pipeline that lists it.
#[derive(Clone)]
pub struct BatchSender {
    pub(crate) pipelines: Vec<(String, mpsc::Sender<Arc<LinkBatch>>)>,
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
    /// Starts what the processor needs in the background (watches, resolvers); called
    /// once, inside the runtime, before the first batch. Building has no side effects.
    fn start(&mut self) -> Result<()> {
        Ok(())
    }
    fn process(&mut self, batch: LinkBatch) -> LinkBatch;
}

/// Sends batches out. One instance serves every pipeline that lists it: `signal` says
/// which one a batch comes from.
#[async_trait]
pub trait Exporter: Send {
    /// Opens what the exporter serves or holds (a listening port); called once before
    /// the first batch. Building has no side effects.
    async fn start(&mut self) -> Result<()> {
        Ok(())
    }
    /// Sends `data` of a `signal` pipeline: links, or (metrics pipelines only) ridley's
    /// own telemetry.
    async fn export(&mut self, signal: Signal, data: Data<'_>) -> Result<()>;
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
    /// Opens what the extension serves (a listening port), so that a port in use stops
    /// the daemon before capture starts. Building has no side effects.
    async fn start(&mut self) -> Result<()> {
        Ok(())
    }
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
    /// The signals of the pipelines that list the component.
    pub signals: Vec<Signal>,
    /// How many pipelines list it (one instance serves them all).
    pub pipelines: usize,
    pub telemetry: Arc<Telemetry>,
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
