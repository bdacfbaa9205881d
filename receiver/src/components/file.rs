//! The `file` exporter: one OTLP/JSON export request per line (`resourceMetrics` or
//! `resourceSpans`), the encoding of the OpenTelemetry Collector's file exporter.
use std::path::PathBuf;

use anyhow::{Context, Result};
use async_trait::async_trait;
use config::{ComponentSection, Signal};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{
    component::{BuildContext, Exporter},
    encode,
    model::Data,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// File to append to; created if missing.
    pub path: PathBuf,
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    let config: FileConfig = cx.parse_section(section)?;
    Ok(Box::new(FileExporter {
        path: config.path,
        file: None,
        resource: encode::resource(),
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

    /// Appends one line, in one write: a reader never sees half a request.
    async fn append(&mut self, line: &[u8]) -> Result<()> {
        let path = self.path.display().to_string();
        let file = self.file().await?;
        file.write_all(line)
            .await
            .with_context(|| format!("writing {path}"))
    }
}

/// Appends one request as a line of OTLP/JSON. Unset optional fields (`min`, `status`)
/// are left out rather than written as `null`, which OTLP/JSON readers reject.
///
/// Serialized straight to bytes and filtered in one pass: building a `serde_json::Value`
/// tree first cost about 170 KiB of memory per link at the peak.
fn write_line(out: &mut Vec<u8>, request: &impl serde::Serialize) -> Result<()> {
    let json = serde_json::to_vec(request).context("encoding OTLP/JSON")?;
    strip_null_fields(&json, out);
    out.push(b'\n');
    Ok(())
}

/// Copies compact JSON (as serde_json writes it: no whitespace) from `json` to `out`,
/// leaving out every object member whose value is `null`.
fn strip_null_fields(json: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    // Where the current member started in `out` (its comma included), while a key is
    // being read or its value is about to start.
    let mut member_start: Option<usize> = None;
    while i < json.len() {
        let byte = json[i];
        match byte {
            b'"' => {
                // A whole string, escapes included.
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(json.len());
                let is_key = json.get(i) == Some(&b':');
                if is_key && json[i + 1..].starts_with(b"null") {
                    let after = i + 1 + 4;
                    if matches!(json.get(after), Some(b',') | Some(b'}')) {
                        // Drop `"key":null`; with the comma before it, or else the one after.
                        match member_start.take() {
                            Some(at) if out.get(at) == Some(&b',') => {
                                out.truncate(at);
                                i = after;
                            }
                            _ => {
                                i = if json.get(after) == Some(&b',') {
                                    after + 1
                                } else {
                                    after
                                }
                            }
                        }
                        continue;
                    }
                }
                out.extend_from_slice(&json[start..i]);
                member_start = None;
                continue;
            }
            b',' | b'{' => member_start = Some(out.len()),
            _ => member_start = None,
        }
        out.push(byte);
        i += 1;
    }
}

#[async_trait]
impl Exporter for FileExporter {
    async fn export(&mut self, signal: Signal, data: Data<'_>) -> Result<()> {
        // Part by part (one request per line): the line being written is all that is
        // held, however many links the batch has.
        let mut line = Vec::new();
        match (signal, data) {
            (Signal::Metrics, Data::Links(encoded)) => {
                let resource = self.resource.clone();
                for request in encoded.metric_parts(&resource) {
                    line.clear();
                    write_line(&mut line, &request)?;
                    drop(request);
                    self.append(&line).await?;
                }
            }
            (Signal::Metrics, Data::Telemetry(snapshot)) => {
                let request = encode::metrics::telemetry_request(snapshot, &self.resource);
                write_line(&mut line, &request)?;
                self.append(&line).await?;
            }
            (Signal::Traces, Data::Links(encoded)) => {
                for (request, _) in encoded.trace_parts() {
                    line.clear();
                    write_line(&mut line, &request)?;
                    drop(request);
                    self.append(&line).await?;
                }
            }
            (Signal::Traces, Data::Telemetry(_)) => {}
        }
        if let Some(file) = self.file.as_mut() {
            file.flush()
                .await
                .with_context(|| format!("writing {}", self.path.display()))?;
        }
        Ok(())
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
    fn null_members_go_and_everything_else_stays() {
        let strip = |json: &str| {
            let mut out = Vec::new();
            strip_null_fields(json.as_bytes(), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(strip(r#"{"a":null}"#), "{}");
        assert_eq!(strip(r#"{"a":null,"b":1}"#), r#"{"b":1}"#);
        assert_eq!(strip(r#"{"b":1,"a":null}"#), r#"{"b":1}"#);
        assert_eq!(
            strip(r#"{"b":1,"a":null,"c":[null,{"d":null}]}"#),
            r#"{"b":1,"c":[null,{}]}"#
        );
        assert_eq!(
            strip(r#"{"s":"x\":null,\"y","n":null,"t":"null"}"#),
            r#"{"s":"x\":null,\"y","t":"null"}"#
        );
        assert_eq!(
            strip(r#"{"a":{"b":null},"c":nullx}"#),
            r#"{"a":{},"c":nullx}"#
        );
    }

    #[test]
    fn nulls_are_left_out() {
        let value = serde_json::json!({"a": null, "b": [{"min": null, "max": 1.5}], "c": "x"});
        let mut out = Vec::new();
        write_line(&mut out, &value).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line, serde_json::json!({"b": [{"max": 1.5}], "c": "x"}));
        assert_eq!(out.last(), Some(&b'\n'));
    }
}
