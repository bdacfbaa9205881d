//! What a component is: one trait per role (receivers produce [`LinkBatch`]es,
//! processors transform them, exporters send them out, extensions run beside), and what
//! a factory gets to build one ([`BuildContext`]). Component modules implement these;
//! the pipelines that wire them live in `service`, which this module never imports.
use std::sync::Arc;

use anyhow::Result;
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

/// The four roles of the collector's shape, as the config document names their sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Receiver,
    Processor,
    Exporter,
    Extension,
}

impl Role {
    /// The top-level section of the config document (`receivers`, ...).
    pub fn section(self) -> &'static str {
        match self {
            Role::Receiver => "receivers",
            Role::Processor => "processors",
            Role::Exporter => "exporters",
            Role::Extension => "extensions",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.section())
    }
}

/// A mistake at one place of the config document: its key path (`exporters`, `otlp`,
/// `retry_on_failure`, `multiplier`) and what is wrong. `ridley validate` and `run`
/// find the file, line and column from the path itself.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.join("."))]
pub struct InvalidSetting {
    pub path: Vec<String>,
    pub message: String,
}

/// A mistake in one key of a component's own section, relative to it
/// (`retry_on_failure.multiplier`): what config structs' `validate` return. The
/// registry turns it into a [`InvalidSetting`] naming the component.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidKey {
    pub key: String,
    pub message: String,
}

/// An error for `key` (dotted, relative to the component's section).
pub fn key_error(key: impl Into<String>, message: impl Into<String>) -> anyhow::Error {
    InvalidKey {
        key: key.into(),
        message: message.into(),
    }
    .into()
}

/// What a component factory gets besides its own config section.
#[derive(Clone)]
pub struct BuildContext {
    pub role: Role,
    pub id: ComponentId,
    /// The signals of the pipelines that list the component.
    pub signals: Vec<Signal>,
    /// How many pipelines list it (one instance serves them all).
    pub pipelines: usize,
    pub telemetry: Arc<Telemetry>,
}

impl BuildContext {
    /// The path of the component's section, and of `key` (dotted) inside it.
    pub fn path(&self, key: Option<&str>) -> Vec<String> {
        let mut path = vec![self.role.section().to_owned(), self.id.to_string()];
        path.extend(
            key.into_iter()
                .flat_map(|k| k.split('.'))
                .map(str::to_owned),
        );
        path
    }

    /// Places a factory's error in the document: a [`InvalidKey`] at its key, a
    /// [`InvalidSetting`] as it is, anything else at the component.
    pub fn locate(&self, error: anyhow::Error) -> anyhow::Error {
        if error.downcast_ref::<InvalidSetting>().is_some() {
            return error;
        }
        let (key, message) = match error.downcast::<InvalidKey>() {
            Ok(InvalidKey { key, message }) => (Some(key), message),
            Err(other) => (None, format!("{other:#}")),
        };
        InvalidSetting {
            path: self.path(key.as_deref()),
            message,
        }
        .into()
    }

    /// Parses the component's own section with its config struct (which should
    /// `deny_unknown_fields`). A key the struct does not have is found from the
    /// struct's own field list; other mistakes carry serde's path to them.
    pub fn parse_section<T: DeserializeOwned>(&self, section: ComponentSection) -> Result<T> {
        let keys = config_keys::<T>();
        if let ComponentSection::Mapping(map) = &section {
            for key in map.keys() {
                let Some(key) = key.as_str() else { continue };
                if !keys.is_empty() && !keys.contains(&key) {
                    let expected: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
                    let hint = config::document::closest(key, keys.iter().copied())
                        .map(|best| format!(" (did you mean `{best}`?)"))
                        .unwrap_or_default();
                    return Err(InvalidSetting {
                        path: self.path(Some(key)),
                        message: format!(
                            "unknown field `{key}`, expected one of {}{hint}",
                            expected.join(", ")
                        ),
                    }
                    .into());
                }
            }
        }
        serde_path_to_error::deserialize(section).map_err(|e| {
            let path: Vec<String> = e
                .path()
                .iter()
                .map(|segment| segment.to_string())
                .filter(|segment| !segment.is_empty() && segment != ".")
                .collect();
            let message = e.into_inner().to_string();
            let hint = config::document::suggestion(&message).unwrap_or_default();
            let key = (!path.is_empty()).then(|| path.join("."));
            InvalidSetting {
                path: self.path(key.as_deref()),
                message: format!("{message}{hint}"),
            }
            .into()
        })
    }
}

/// The keys a config struct accepts, read from its `Deserialize` implementation: serde
/// hands a struct's field names to `deserialize_struct`, and this deserializer does
/// nothing but keep them. The list cannot drift from the code.
pub fn config_keys<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct KeyProbe<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for KeyProbe<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("keys read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The error is the point: the probe stops as soon as it has the field names.
    let _ = T::deserialize(KeyProbe(&mut fields));
    fields
}
