//! The `file` exporter: one OTLP/JSON `ExportMetricsServiceRequest` per line, the
//! encoding of the OpenTelemetry Collector's file exporter.
use std::path::PathBuf;

use anyhow::{Context, Result};
use async_trait::async_trait;
use config::{ComponentId, ComponentSection};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{
    model::LinkBatch,
    otlp,
    pipeline::{MetricsExporter, parse_section},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// File to append to; created if missing.
    pub path: PathBuf,
}

pub fn build(id: &ComponentId, section: ComponentSection) -> Result<Box<dyn MetricsExporter>> {
    let config: FileConfig = parse_section("exporters", id, section)?;
    Ok(Box::new(FileExporter {
        path: config.path,
        file: None,
        resource: otlp::resource(),
    }))
}

struct FileExporter {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    resource: Resource,
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
}

#[async_trait]
impl MetricsExporter for FileExporter {
    async fn export(&mut self, batch: &LinkBatch) -> Result<()> {
        let request = otlp::metrics_request(batch, &self.resource);
        let mut line = serde_json::to_vec(&request).context("encoding OTLP/JSON")?;
        line.push(b'\n');
        let path = self.path.display().to_string();
        let file = self.file().await?;
        // One write per line: a reader never sees half a request.
        file.write_all(&line)
            .await
            .with_context(|| format!("writing {path}"))?;
        file.flush()
            .await
            .with_context(|| format!("writing {path}"))
    }

    async fn shutdown(&mut self) -> Result<()> {
        if let Some(file) = self.file.as_mut() {
            file.sync_all()
                .await
                .with_context(|| format!("syncing {}", self.path.display()))?;
        }
        Ok(())
    }
}
