//! What the `otlp` (gRPC) and `otlphttp` exporters share: the collector's exporter
//! keys, a bounded sending queue, retries with exponential backoff, and the exporter
//! itself; each transport only knows how to send one request.
//!
//! Nothing is lost silently and memory stays bounded while a collector is away:
//! cumulative metric requests supersede each other (the queue keeps only the newest,
//! which carries every count), delta metric requests and span requests wait in the
//! bounded queue, and what does not fit or runs out of retries is dropped and counted.
use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use config::Signal;
use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    resource::v1::Resource,
};
use serde::Deserialize;
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    model::LinkBatch,
    otlp,
    pipeline::{BuildContext, Exporter},
    spans::{self, IdGenerator},
    telemetry::{ExporterStats, Telemetry},
    temporality::DeltaConverter,
};

/// Span pairs per trace export request.
const PAIRS_PER_REQUEST: usize = 512;
/// How long shutdown waits for the queue to drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Plain text (no TLS). gRPC endpoints without a scheme then use `http://`.
    pub insecure: bool,
    /// CA certificate (PEM) to verify the server with, in addition to system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Temporality {
    #[default]
    Cumulative,
    Delta,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Give up on a request after this long (0: never).
    #[serde(with = "humantime_serde")]
    pub max_elapsed_time: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        // The collector's defaults.
        RetryConfig {
            enabled: true,
            initial_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Without a queue, a request that cannot be sent right away is dropped (counted).
    pub enabled: bool,
    /// Requests held at most.
    pub queue_size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            queue_size: 1000,
        }
    }
}

/// The collector's OTLP exporter keys.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// gRPC: `host:port` or a URL; HTTP: the base URL (`/v1/metrics`, `/v1/traces` are appended).
    pub endpoint: String,
    /// HTTP only: full URL for metrics, overriding `endpoint`.
    #[serde(default)]
    pub metrics_endpoint: Option<String>,
    /// HTTP only: full URL for traces, overriding `endpoint`.
    #[serde(default)]
    pub traces_endpoint: Option<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub retry_on_failure: RetryConfig,
    #[serde(default)]
    pub sending_queue: QueueConfig,
    /// Metric temporality sent: `cumulative` (default) or `delta`.
    #[serde(default)]
    pub temporality: Temporality,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl OtlpConfig {
    pub fn validate(&self) -> Result<()> {
        if self.endpoint.trim().is_empty() {
            bail!("endpoint must not be empty");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            bail!("tls.cert_file and tls.key_file go together");
        }
        if self.sending_queue.enabled && self.sending_queue.queue_size == 0 {
            bail!("sending_queue.queue_size must be positive");
        }
        if self.timeout.is_zero() {
            bail!("timeout must be positive");
        }
        Ok(())
    }

    pub fn read_tls_file(path: &Option<PathBuf>, what: &str) -> Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).with_context(|| format!("tls.{what}: reading {}", p.display()))
            })
            .transpose()
    }
}

/// One request, as queued.
#[derive(Clone, Debug)]
pub enum Payload {
    Metrics(ExportMetricsServiceRequest),
    Traces {
        request: ExportTraceServiceRequest,
        pairs: usize,
    },
}

impl Payload {
    fn spans(&self) -> u64 {
        match self {
            Payload::Metrics(_) => 0,
            Payload::Traces { pairs, .. } => 2 * *pairs as u64,
        }
    }
}

#[derive(Debug)]
pub struct SendError {
    /// Worth trying again (unavailable, throttled, timed out), as the OTLP spec says.
    pub retryable: bool,
    pub message: String,
}

/// Sends one request over one protocol.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn send(&self, payload: &Payload) -> Result<(), SendError>;
}

struct Queue {
    items: Mutex<VecDeque<Payload>>,
    notify: Notify,
    closing: std::sync::atomic::AtomicBool,
    capacity: usize,
    /// Metric requests are cumulative: a newer one supersedes any queued one.
    coalesce_metrics: bool,
    stats: Arc<ExporterStats>,
}

impl Queue {
    fn push(&self, payload: Payload) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if self.coalesce_metrics && matches!(payload, Payload::Metrics(_)) {
            items.retain(|p| !matches!(p, Payload::Metrics(_)));
        }
        if items.len() >= self.capacity {
            match payload {
                Payload::Traces { .. } => {
                    count_drop(&self.stats, &payload);
                    return;
                }
                Payload::Metrics(_) => {
                    // Newer data is worth more: the oldest metric request goes, or the
                    // oldest request of any kind when no metric request is queued.
                    let victim = items
                        .iter()
                        .position(|p| matches!(p, Payload::Metrics(_)))
                        .unwrap_or(0);
                    if let Some(victim) = items.remove(victim) {
                        count_drop(&self.stats, &victim);
                    }
                }
            }
        }
        items.push_back(payload);
        self.stats
            .queue_len
            .store(items.len() as u64, Ordering::Relaxed);
        drop(items);
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Payload> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let item = items.pop_front();
        self.stats
            .queue_len
            .store(items.len() as u64, Ordering::Relaxed);
        item
    }

    fn has_newer_metrics(&self) -> bool {
        let items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.iter().any(|p| matches!(p, Payload::Metrics(_)))
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

async fn run_sender(
    queue: Arc<Queue>,
    transport: Arc<dyn Transport>,
    retry: RetryConfig,
    id: String,
) {
    let stats = queue.stats.clone();
    let mut failing = false;
    loop {
        let Some(payload) = queue.pop() else {
            if queue.is_closing() {
                return;
            }
            queue.notify.notified().await;
            continue;
        };
        let started = Instant::now();
        let mut backoff = retry.initial_interval;
        loop {
            match transport.send(&payload).await {
                Ok(()) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    stats.failing.store(false, Ordering::Relaxed);
                    if failing {
                        tracing::info!(exporter = %id, "export recovered");
                        failing = false;
                    }
                    break;
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    stats.failing.store(true, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(exporter = %id, retryable = e.retryable, "export failed: {}", e.message);
                        failing = true;
                    }
                    let out_of_time = !retry.max_elapsed_time.is_zero()
                        && started.elapsed() + backoff > retry.max_elapsed_time;
                    if !e.retryable || !retry.enabled || out_of_time || queue.is_closing() {
                        drop_payload(&stats, &payload, &id, &e.message);
                        break;
                    }
                    let superseded = || {
                        matches!(payload, Payload::Metrics(_))
                            && queue.coalesce_metrics
                            && queue.has_newer_metrics()
                    };
                    // Sleep out the backoff, waking early only for shutdown or for a newer
                    // cumulative request (which carries everything this one did).
                    let wake_at = tokio::time::Instant::now() + backoff;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(wake_at) => break,
                            _ = queue.notify.notified() => {}
                        }
                        if queue.is_closing() || superseded() {
                            break;
                        }
                    }
                    if superseded() {
                        break;
                    }
                    backoff = (backoff * 2).min(retry.max_interval);
                }
            }
        }
    }
}

fn count_drop(stats: &ExporterStats, payload: &Payload) {
    match payload {
        Payload::Traces { .. } => {
            stats
                .dropped_spans
                .fetch_add(payload.spans(), Ordering::Relaxed);
        }
        Payload::Metrics(_) => {
            stats
                .dropped_metric_requests
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn drop_payload(stats: &ExporterStats, payload: &Payload, id: &str, why: &str) {
    count_drop(stats, payload);
    tracing::warn!(exporter = %id, "request dropped: {why}");
}

/// The exporter both OTLP protocols use; its `Transport` does the sending.
pub struct OtlpExporter {
    id: String,
    signal: Signal,
    resource: Resource,
    telemetry: Arc<Telemetry>,
    ids: IdGenerator,
    delta: Option<DeltaConverter>,
    queue: Arc<Queue>,
    transport: Arc<dyn Transport>,
    retry: RetryConfig,
    sender: Option<JoinHandle<()>>,
}

impl OtlpExporter {
    pub fn new(cx: &BuildContext, config: &OtlpConfig, transport: Arc<dyn Transport>) -> Self {
        let stats = cx
            .telemetry
            .exporter(&cx.id.to_string(), &cx.signal.to_string());
        let delta = config.temporality == Temporality::Delta;
        OtlpExporter {
            id: cx.id.to_string(),
            signal: cx.signal,
            resource: otlp::resource(),
            telemetry: cx.telemetry.clone(),
            ids: IdGenerator::default(),
            delta: delta.then(DeltaConverter::default),
            queue: Arc::new(Queue {
                items: Mutex::new(VecDeque::new()),
                notify: Notify::new(),
                closing: Default::default(),
                capacity: if config.sending_queue.enabled {
                    config.sending_queue.queue_size
                } else {
                    1
                },
                coalesce_metrics: !delta,
                stats,
            }),
            transport,
            retry: config.retry_on_failure.clone(),
            sender: None,
        }
    }
}

#[async_trait]
impl Exporter for OtlpExporter {
    async fn export(&mut self, batch: &LinkBatch) -> Result<()> {
        if self.sender.is_none() {
            // Started on first use: components are built before the runtime runs.
            self.sender = Some(tokio::spawn(run_sender(
                self.queue.clone(),
                self.transport.clone(),
                self.retry.clone(),
                self.id.clone(),
            )));
        }
        match self.signal {
            Signal::Metrics => {
                let mut request =
                    otlp::metrics_request(batch, &self.resource, &self.telemetry.snapshot());
                if let Some(delta) = self.delta.as_mut() {
                    delta.convert(&mut request);
                }
                self.queue.push(Payload::Metrics(request));
            }
            Signal::Traces => {
                for (request, pairs) in
                    spans::trace_requests(batch, &mut self.ids, PAIRS_PER_REQUEST)
                {
                    self.queue.push(Payload::Traces { request, pairs });
                }
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<()> {
        let Some(sender) = self.sender.take() else {
            return Ok(());
        };
        // Let the queue drain for a while, then stop retrying and drop what is left.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.queue.stats.queue_len.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.queue.closing.store(true, Ordering::Relaxed);
        self.queue.notify.notify_one();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, sender).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize, coalesce_metrics: bool) -> Queue {
        Queue {
            items: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closing: Default::default(),
            capacity,
            coalesce_metrics,
            stats: Arc::default(),
        }
    }

    fn metrics() -> Payload {
        Payload::Metrics(ExportMetricsServiceRequest::default())
    }

    fn traces(pairs: usize) -> Payload {
        Payload::Traces {
            request: ExportTraceServiceRequest::default(),
            pairs,
        }
    }

    #[test]
    fn cumulative_metric_requests_supersede_each_other() {
        let q = queue(3, true);
        for _ in 0..10 {
            q.push(metrics());
        }
        assert_eq!(q.stats.queue_len.load(Ordering::Relaxed), 1);
        assert_eq!(q.stats.dropped_metric_requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn spans_beyond_the_queue_are_dropped_and_counted() {
        let q = queue(2, true);
        q.push(traces(5));
        q.push(traces(5));
        q.push(traces(7));
        assert_eq!(q.stats.queue_len.load(Ordering::Relaxed), 2);
        assert_eq!(q.stats.dropped_spans.load(Ordering::Relaxed), 14);
        // A metrics request still gets in, in place of the oldest span request.
        q.push(metrics());
        assert_eq!(q.stats.queue_len.load(Ordering::Relaxed), 2);
        assert_eq!(q.stats.dropped_spans.load(Ordering::Relaxed), 24);
        assert_eq!(q.stats.dropped_metric_requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn delta_metric_requests_drop_the_oldest_when_full() {
        let q = queue(2, false);
        for _ in 0..5 {
            q.push(metrics());
        }
        assert_eq!(q.stats.queue_len.load(Ordering::Relaxed), 2);
        assert_eq!(q.stats.dropped_metric_requests.load(Ordering::Relaxed), 3);
    }
}
