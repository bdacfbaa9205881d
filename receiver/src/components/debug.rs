//! The `debug` exporter: a readable live link table on stdout, like the collector's
//! debug exporter. For people, not parsers: use `file` for machine-readable output.
use std::{fmt::Write as _, io::Write as _};

use anyhow::{Context, Result};
use async_trait::async_trait;
use config::{ComponentSection, Signal};
use serde::Deserialize;

use crate::{
    component::{BuildContext, Exporter},
    model::{Data, FailureReason, LinkBatch, Peer, Transport},
    telemetry::TelemetrySnapshot,
};

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verbosity {
    /// One summary line per batch.
    Basic,
    /// The summary and a table of every link.
    #[default]
    Normal,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    pub verbosity: Verbosity,
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    let config: DebugConfig = cx.parse_section(section)?;
    Ok(Box::new(DebugExporter {
        config,
        stdout_closed: false,
    }))
}

struct DebugExporter {
    config: DebugConfig,
    /// Whoever read stdout went away: said once, then nothing more is written.
    stdout_closed: bool,
}

/// One line per link with the span pairs the traces pipeline emits for it.
pub fn render_traces(batch: &LinkBatch) -> String {
    let mut out = String::new();
    let pairs: usize = batch
        .links
        .iter()
        .map(|(_, s)| {
            s.interval
                .samples
                .len()
                .max(usize::from(s.interval.carried_traffic))
        })
        .sum();
    let _ = writeln!(
        out,
        "{}  span pairs: {}",
        humantime::format_rfc3339_seconds(batch.time),
        pairs
    );
    for (key, s) in &batch.links {
        if s.interval.attempts > 0 || s.interval.carried_traffic {
            let _ = writeln!(
                out,
                "  {key}  attempts {}  sampled {}  traffic {}",
                s.interval.attempts,
                s.interval.samples.len(),
                s.interval.carried_traffic
            );
        }
    }
    out
}

/// ridley's own telemetry: losses by reason (the total first), then each exporter.
fn render_telemetry(snapshot: &TelemetrySnapshot) -> String {
    let mut out = String::new();
    let entries = snapshot.losses.entries();
    let lost: u64 = entries.iter().map(|(_, n)| n).sum();
    let _ = write!(out, "losses: {lost}");
    for (reason, n) in entries.iter().filter(|(_, n)| *n > 0) {
        let _ = write!(out, "  {reason} {n}");
    }
    out.push('\n');
    for e in &snapshot.exporters {
        let _ = writeln!(
            out,
            "exporter {} ({}): sent {}  failed {}  queued {}  dropped spans {}  dropped metric requests {}",
            e.exporter,
            e.signal,
            e.sent,
            e.failed,
            e.queue_len,
            e.dropped_spans,
            e.dropped_metric_requests
        );
    }
    out
}

fn millis(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.3}", s * 1000.0))
}

/// Renders a batch as text: a summary line, then (normal verbosity) one row per link.
pub fn render(batch: &LinkBatch, verbosity: Verbosity) -> String {
    let mut out = String::new();
    let open: u64 = batch.links.iter().map(|(_, s)| s.active).sum();
    let failed: u64 = batch.links.iter().map(|(_, s)| s.failed_total()).sum();
    let _ = writeln!(
        out,
        "{}  links: {}  open connections: {}  failed connections: {}",
        humantime::format_rfc3339_seconds(batch.time),
        batch.links.len(),
        open,
        failed,
    );
    if verbosity == Verbosity::Basic || batch.links.is_empty() {
        return out;
    }
    let header = [
        "CLIENT",
        "SERVER",
        "PORT",
        "OPENED",
        "ACTIVE",
        "REFUSED",
        "RESET",
        "TIMEOUT",
        "BYTES C>S",
        "BYTES S>C",
        "RETRANS",
        "CONNECT ms",
        "RTT ms",
    ];
    let rows: Vec<[String; 13]> = batch
        .links
        .iter()
        .map(|(key, s)| {
            // An address end by its address, a workload end by its name.
            let (client, server) = batch.end_names(key);
            let shown = |peer: Peer, name: String| peer.address().map_or(name, |a| a.to_string());
            [
                shown(key.client, client.service_name),
                shown(key.server, server.service_name),
                // UDP links say so; their connection columns stay 0.
                match key.transport {
                    Transport::Tcp => key.server_port.to_string(),
                    Transport::Udp => format!("{}/udp", key.server_port),
                },
                s.opened.to_string(),
                s.active.to_string(),
                s.failed(FailureReason::Refused).to_string(),
                s.failed(FailureReason::Reset).to_string(),
                s.failed(FailureReason::Timeout).to_string(),
                s.bytes_transmit.to_string(),
                s.bytes_receive.to_string(),
                s.retransmits.to_string(),
                millis(s.connect_duration.mean()),
                millis(s.rtt.mean()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        for (i, cell) in cells.enumerate() {
            // Addresses left-aligned, numbers right-aligned.
            if i < 2 {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            } else {
                let _ = write!(out, "{cell:>w$}  ", w = widths[i]);
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[async_trait]
impl Exporter for DebugExporter {
    async fn export(&mut self, signal: Signal, data: Data<'_>) -> Result<()> {
        let text = match (signal, data) {
            (Signal::Metrics, Data::Links(encoded)) => {
                render(&encoded.batch, self.config.verbosity)
            }
            (Signal::Metrics, Data::Telemetry(snapshot)) => render_telemetry(snapshot),
            (Signal::Traces, Data::Links(encoded)) => render_traces(&encoded.batch),
            (Signal::Traces, Data::Telemetry(_)) => return Ok(()),
        };
        if self.stdout_closed {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        let written = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.write_all(b"\n"))
            .and_then(|()| stdout.flush());
        match written {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.stdout_closed = true;
                tracing::warn!("stdout is closed: the debug exporter stops writing");
                Ok(())
            }
            other => other.context("writing to stdout"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::LinkStats;

    #[test]
    fn renders_one_row_per_link() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut stats = LinkStats::new(t);
        stats.opened = 2;
        stats.active = 1;
        stats.bytes_transmit = 1234;
        stats.bytes_receive = 99;
        stats.add_failure(FailureReason::Reset);
        let batch = crate::model::one_link_batch(t, stats);
        let text = render(&batch, Verbosity::Normal);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "2023-11-14T22:13:20Z  links: 1  open connections: 1  failed connections: 1"
        );
        assert!(
            lines[1].starts_with("CLIENT    SERVER    PORT  OPENED"),
            "{}",
            lines[1]
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "10.0.0.1", "10.0.0.2", "80", "2", "1", "0", "1", "0", "1234", "99", "0", "-", "-"
            ]
        );
        assert_eq!(render(&batch, Verbosity::Basic).lines().count(), 1);
    }
}
