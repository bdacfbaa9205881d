//! The `file` exporter: one OTLP/JSON export request per line (`resourceMetrics` or
//! `resourceSpans`), the encoding of the OpenTelemetry Collector's file exporter.
use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use async_trait::async_trait;
use config::{ComponentSection, Signal};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{
    model::LinkBatch,
    otlp,
    pipeline::{BuildContext, Exporter, parse_section},
    spans::{self, IdGenerator},
    telemetry::Telemetry,
};

/// Span pairs per line, so that a line stays a reasonable size.
const PAIRS_PER_LINE: usize = 512;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// File to append to; created if missing.
    pub path: PathBuf,
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    let config: FileConfig = parse_section("exporters", &cx.id, section)?;
    Ok(Box::new(FileExporter {
        path: config.path,
        file: None,
        resource: otlp::resource(),
        signal: cx.signal,
        ids: IdGenerator::default(),
        telemetry: cx.telemetry.clone(),
    }))
}

struct FileExporter {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    resource: Resource,
    signal: Signal,
    ids: IdGenerator,
    telemetry: Arc<Telemetry>,
}

impl FileExporter {
    async fn file(&mut self) -> Result<&mut tokio::fs::File> {
        if self.file.is_none() {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await
                .with_context(|| format!("opening {}", self.path.display()))?;
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    fn lines(&mut self, batch: &LinkBatch) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match self.signal {
            Signal::Metrics => {
                let request =
                    otlp::metrics_request(batch, &self.resource, &self.telemetry.snapshot());
                write_line(&mut out, &request)?;
            }
            Signal::Traces => {
                for (request, _) in spans::trace_requests(batch, &mut self.ids, PAIRS_PER_LINE) {
                    write_line(&mut out, &request)?;
                }
            }
        }
        Ok(out)
    }
}

/// Appends one request as a line of OTLP/JSON. Unset optional fields (`min`, `status`)
/// are left out rather than written as `null`, which OTLP/JSON readers reject.
fn write_line(out: &mut Vec<u8>, request: &impl serde::Serialize) -> Result<()> {
    let mut value = serde_json::to_value(request).context("encoding OTLP/JSON")?;
    strip_nulls(&mut value);
    serde_json::to_writer(&mut *out, &value).context("encoding OTLP/JSON")?;
    out.push(b'\n');
    Ok(())
}

fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[async_trait]
impl Exporter for FileExporter {
    async fn export(&mut self, batch: &LinkBatch) -> Result<()> {
        let lines = self.lines(batch)?;
        if lines.is_empty() {
            return Ok(());
        }
        let path = self.path.display().to_string();
        let file = self.file().await?;
        // One write per batch: a reader never sees half a request.
        file.write_all(&lines)
            .await
            .with_context(|| format!("writing {path}"))?;
        file.flush()
            .await
            .with_context(|| format!("writing {path}"))
    }

    async fn shutdown(&mut self, _deadline: tokio::time::Instant) -> Result<u64> {
        if let Some(file) = self.file.as_mut() {
            file.sync_all()
                .await
                .with_context(|| format!("syncing {}", self.path.display()))?;
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_are_left_out() {
        let mut value = serde_json::json!({"a": null, "b": [{"min": null, "max": 1.5}], "c": "x"});
        strip_nulls(&mut value);
        assert_eq!(value, serde_json::json!({"b": [{"max": 1.5}], "c": "x"}));
    }
}
