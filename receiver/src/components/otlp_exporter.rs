//! What the `otlp` (gRPC) and `otlphttp` exporters share: the collector's exporter
//! keys, a bounded sending queue, retries with exponential backoff, and the exporter
//! itself; each transport only knows how to send one request.
//!
//! Nothing is lost silently and memory stays bounded while a collector is away:
//! cumulative metric requests supersede each other (the queue keeps only the newest
//! batch, which carries every count), delta metric requests and span requests wait in
//! the queue (bounded in requests and in bytes), and what does not fit or runs out of
//! retries is dropped and counted. No request is larger than `max_request_size`: a
//! batch too large for one is split, so that one oversized request cannot block the
//! rest. Retries follow the collector's exporterhelper: exponential backoff with
//! randomization, a limit on the time spent per request, and the server's throttling
//! (HTTP `Retry-After`, gRPC `RetryInfo`) honoured.
use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use config::Signal;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    metrics::v1::{Metric, metric},
    resource::v1::Resource,
};
use prost::Message as _;
use serde::Deserialize;
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    component::{BuildContext, Exporter, key_error},
    encode,
    encode::temporality::DeltaConverter,
    model::Data,
    telemetry::ExporterStats,
};

/// What a request may carry besides its points (resource, scope, metric headers).
const REQUEST_ENVELOPE_BYTES: usize = 16 * 1024;

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
    /// Accept any server certificate (encrypted, not authenticated): for tests only.
    pub insecure_skip_verify: bool,
    /// The name the server's certificate must carry, instead of the endpoint's host.
    pub server_name_override: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    /// Smaller and cheaper than gzip on batched OTLP (the collector's receivers accept it).
    Zstd,
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
    /// Each interval is this many times the previous one.
    pub multiplier: f32,
    /// Each wait is drawn from `interval * (1 +- randomization_factor)`, so that the
    /// agents of a cluster do not retry in step.
    pub randomization_factor: f32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        // The collector's defaults.
        RetryConfig {
            enabled: true,
            initial_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
            multiplier: 1.5,
            randomization_factor: 0.5,
        }
    }
}

/// Bounds that keep every accepted retry setting runnable and polite.
const MIN_RETRY_INTERVAL: Duration = Duration::from_millis(10);
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(3600);

impl RetryConfig {
    fn validate(&self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let in_range = |d: Duration| (MIN_RETRY_INTERVAL..=MAX_RETRY_INTERVAL).contains(&d);
        if !in_range(self.initial_interval) || !in_range(self.max_interval) {
            return Err(key_error(
                "retry_on_failure",
                format!(
                    "initial_interval and max_interval must be from 10ms to 1h, got {} and {}",
                    humantime::format_duration(self.initial_interval),
                    humantime::format_duration(self.max_interval)
                ),
            ));
        }
        if self.max_interval < self.initial_interval {
            return Err(key_error(
                "retry_on_failure.max_interval",
                "must be at least initial_interval",
            ));
        }
        if self.max_elapsed_time > Duration::from_secs(24 * 3600) {
            return Err(key_error(
                "retry_on_failure.max_elapsed_time",
                "must be at most 24h (0: no limit)",
            ));
        }
        if !(1.0..=10.0).contains(&self.multiplier) {
            return Err(key_error(
                "retry_on_failure.multiplier",
                format!("must be from 1 to 10, got {}", self.multiplier),
            ));
        }
        if !(0.0..=1.0).contains(&self.randomization_factor) {
            return Err(key_error(
                "retry_on_failure.randomization_factor",
                format!("must be from 0 to 1, got {}", self.randomization_factor),
            ));
        }
        Ok(())
    }

    /// The exponential sequence of waits (before randomization), without end.
    fn backoff(&self) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::new()
            .with_min_delay(self.initial_interval)
            .with_max_delay(self.max_interval)
            .with_factor(self.multiplier)
            .without_max_times()
            .build()
    }

    fn randomize(&self, wait: Duration) -> Duration {
        let spread = 2.0 * fastrand::f64() - 1.0;
        wait.mul_f64((1.0 + f64::from(self.randomization_factor) * spread).max(0.0))
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Without a queue, a request that cannot be sent right away is dropped (counted).
    pub enabled: bool,
    /// Requests held at most.
    pub queue_size: usize,
    /// Bytes (encoded requests) held at most, whatever their number: the bound that
    /// matters for memory. A number or a size such as `16MiB`.
    #[serde(deserialize_with = "config::byte_size")]
    pub max_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            queue_size: 1000,
            max_bytes: 16 << 20,
        }
    }
}

/// The collector's OTLP exporter keys.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// gRPC: `host:port` or a URL; HTTP: the base URL (`/v1/metrics`, `/v1/traces` are
    /// appended). Unset: `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default)]
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
    /// Added to `headers` on metrics / traces requests: from the per-signal environment
    /// variables only (the YAML has one `headers`, as the collector's).
    #[serde(skip)]
    pub metrics_headers: BTreeMap<String, String>,
    #[serde(skip)]
    pub traces_headers: BTreeMap<String, String>,
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
    /// Encoded size of one request at most; larger batches are split. Below the 4 MiB
    /// a collector's OTLP receiver accepts by default.
    #[serde(
        default = "default_max_request_size",
        deserialize_with = "config::byte_size"
    )]
    pub max_request_size: u64,
}

fn default_max_request_size() -> u64 {
    3 << 20
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl OtlpConfig {
    /// Fills what the YAML left unset from the OpenTelemetry environment variables
    /// (`otel_env`); `http`: the per-signal URLs apply too.
    pub fn fill_from_env(&mut self, defaults: crate::otel_env::OtlpDefaults, http: bool) {
        if self.endpoint.trim().is_empty() {
            self.endpoint = defaults.endpoint.unwrap_or_default();
        }
        if http {
            self.metrics_endpoint = self.metrics_endpoint.take().or(defaults.metrics_endpoint);
            self.traces_endpoint = self.traces_endpoint.take().or(defaults.traces_endpoint);
        }
        if self.headers.is_empty() {
            self.headers = defaults.headers;
            self.metrics_headers = defaults.metrics_headers;
            self.traces_headers = defaults.traces_headers;
        }
    }

    /// The headers of one signal's requests: `headers`, then the signal's own over them.
    pub fn headers_for(&self, signal: config::Signal) -> BTreeMap<String, String> {
        let own = match signal {
            config::Signal::Metrics => &self.metrics_headers,
            config::Signal::Traces => &self.traces_headers,
        };
        let mut headers = self.headers.clone();
        headers.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        headers
    }

    pub fn validate(&self) -> Result<()> {
        let per_signal = self.metrics_endpoint.is_some() && self.traces_endpoint.is_some();
        if self.endpoint.trim().is_empty() && !per_signal {
            return Err(key_error(
                "endpoint",
                "not set, here or in OTEL_EXPORTER_OTLP_ENDPOINT",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(key_error(
                "tls.cert_file",
                "tls.cert_file and tls.key_file go together",
            ));
        }
        if self.sending_queue.enabled && self.sending_queue.queue_size == 0 {
            return Err(key_error("sending_queue.queue_size", "must be positive"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err(key_error("timeout", "must be from 1ns to 1h"));
        }
        if self.sending_queue.enabled && self.sending_queue.max_bytes < self.max_request_size {
            return Err(key_error(
                "sending_queue.max_bytes",
                "must be at least max_request_size",
            ));
        }
        if !(64 * 1024..=64 << 20).contains(&self.max_request_size) {
            return Err(key_error(
                "max_request_size",
                format!("must be from 64KiB to 64MiB, got {}", self.max_request_size),
            ));
        }
        self.retry_on_failure.validate()
    }

    /// A PEM file of `tls`: a regular file of at most 1 MiB (the config's rule for
    /// referenced files), so a FIFO or a device given by mistake cannot hang or fill us.
    pub fn read_tls_file(path: &Option<PathBuf>, what: &str) -> Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                config::limits::read_regular_file(
                    p,
                    config::limits::MAX_REFERENCED_FILE_SIZE,
                    "a referenced file",
                )
                .map(String::into_bytes)
                .with_context(|| format!("tls.{what}: reading {}", p.display()))
            })
            .transpose()
    }
}

/// The longest wait a server's throttling (HTTP `Retry-After`, gRPC `RetryInfo`) may
/// impose: a bogus value must not silence an exporter for good.
pub const MAX_THROTTLE: Duration = Duration::from_secs(3600);

/// An error and its causes, `: `-separated: transport errors (connection refused, a
/// rejected certificate) hide their cause in `Display`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The two kinds of cumulative metric requests: a newer one supersedes older ones of
/// its own kind only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricStream {
    Links,
    Telemetry,
}

/// One request, as queued: encoded (protobuf), about a third of its decoded size, so
/// that `sending_queue.max_bytes` bounds what the queue really holds.
#[derive(Clone, Debug)]
pub enum Payload {
    Metrics {
        body: Bytes,
        stream: MetricStream,
        /// Which batch it came from: a cumulative batch supersedes every part of the
        /// batches of its stream before it.
        batch: u64,
    },
    Traces {
        body: Bytes,
        pairs: usize,
    },
}

impl Payload {
    fn spans(&self) -> u64 {
        match self {
            Payload::Metrics { .. } => 0,
            Payload::Traces { pairs, .. } => 2 * *pairs as u64,
        }
    }

    fn is_metrics(&self) -> bool {
        matches!(self, Payload::Metrics { .. })
    }

    /// The encoded request, as sent.
    pub fn body(&self) -> &Bytes {
        match self {
            Payload::Metrics { body, .. } | Payload::Traces { body, .. } => body,
        }
    }

    fn encoded_len(&self) -> usize {
        self.body().len()
    }
}

#[derive(Debug)]
pub struct SendError {
    /// Worth trying again (unavailable, throttled, timed out), as the OTLP spec says.
    pub retryable: bool,
    /// The server asked to wait this long before the next attempt (HTTP `Retry-After`,
    /// gRPC `RetryInfo`).
    pub throttle: Option<Duration>,
    pub message: String,
}

/// Splits a metrics request into requests of at most `max_bytes` encoded, by data
/// point, each carrying the same resource and scope and the headers of the metrics
/// it has points of. One point is never split (a point is far below any limit).
pub fn split_metrics_request(
    request: ExportMetricsServiceRequest,
    max_bytes: usize,
) -> Vec<ExportMetricsServiceRequest> {
    use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
    use prost::Message;
    if request.encoded_len() <= max_bytes {
        return vec![request];
    }
    let budget = max_bytes.saturating_sub(REQUEST_ENVELOPE_BYTES).max(1);
    let mut out = Vec::new();
    for rm in request.resource_metrics {
        for sm in rm.scope_metrics {
            let mut chunks: Vec<Vec<Metric>> = vec![Vec::new()];
            let mut used = 0;
            for piece in sm.metrics.into_iter().flat_map(one_point_pieces) {
                let size = piece.encoded_len();
                if used + size > budget && used > 0 {
                    chunks.push(Vec::new());
                    used = 0;
                }
                used += size;
                let chunk = chunks.last_mut().expect("never empty");
                let left = match chunk.last_mut() {
                    Some(last) if last.name == piece.name => absorb(last, piece),
                    _ => Some(piece),
                };
                chunk.extend(left);
            }
            out.extend(chunks.into_iter().filter(|c| !c.is_empty()).map(|metrics| {
                ExportMetricsServiceRequest {
                    resource_metrics: vec![ResourceMetrics {
                        resource: rm.resource.clone(),
                        scope_metrics: vec![ScopeMetrics {
                            scope: sm.scope.clone(),
                            metrics,
                            schema_url: sm.schema_url.clone(),
                        }],
                        schema_url: rm.schema_url.clone(),
                    }],
                }
            }));
        }
    }
    out
}

/// A metric as one metric per data point (same name, description, unit, kind).
fn one_point_pieces(mut metric: Metric) -> Vec<Metric> {
    let piece = |header: &Metric, data: metric::Data| Metric {
        data: Some(data),
        ..header.clone()
    };
    match metric.data.take() {
        Some(metric::Data::Sum(mut sum)) => std::mem::take(&mut sum.data_points)
            .into_iter()
            .map(|p| {
                let mut one = sum.clone();
                one.data_points = vec![p];
                piece(&metric, metric::Data::Sum(one))
            })
            .collect(),
        Some(metric::Data::Histogram(mut histogram)) => std::mem::take(&mut histogram.data_points)
            .into_iter()
            .map(|p| {
                let mut one = histogram.clone();
                one.data_points = vec![p];
                piece(&metric, metric::Data::Histogram(one))
            })
            .collect(),
        // Kinds ridley does not emit travel whole.
        other => vec![Metric {
            data: other,
            ..metric
        }],
    }
}

/// Moves the points of `piece` into `into` when both are of the same kind; otherwise
/// gives the piece back.
fn absorb(into: &mut Metric, piece: Metric) -> Option<Metric> {
    match (into.data.as_mut(), piece.data) {
        (Some(metric::Data::Sum(a)), Some(metric::Data::Sum(b))) => {
            a.data_points.extend(b.data_points);
            None
        }
        (Some(metric::Data::Histogram(a)), Some(metric::Data::Histogram(b))) => {
            a.data_points.extend(b.data_points);
            None
        }
        (_, data) => Some(Metric { data, ..piece }),
    }
}

/// Sends one request over one protocol.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn send(&self, payload: &Payload) -> Result<(), SendError>;
}

#[derive(Default)]
struct Queued {
    items: VecDeque<(Payload, usize)>,
    bytes: usize,
}

struct Queue {
    queued: Mutex<Queued>,
    /// Wakes the sender: a request was queued, or shutdown began.
    notify: Notify,
    /// Wakes an exporter waiting to queue the next part of a batch: one was sent.
    room: Notify,
    closing: std::sync::atomic::AtomicBool,
    /// Requests held at most.
    capacity: usize,
    /// Encoded bytes held at most.
    max_bytes: usize,
    /// Metric requests are cumulative: a newer batch supersedes any queued one.
    coalesce_metrics: bool,
    stats: Arc<ExporterStats>,
}

impl Queue {
    /// An empty queue of at most `capacity` requests and `max_bytes` encoded bytes;
    /// `coalesce_metrics`: metric requests are cumulative (a newer batch supersedes).
    fn new(
        capacity: usize,
        max_bytes: usize,
        coalesce_metrics: bool,
        stats: Arc<ExporterStats>,
    ) -> Self {
        Queue {
            queued: Mutex::new(Queued::default()),
            notify: Notify::new(),
            room: Notify::new(),
            closing: Default::default(),
            capacity,
            max_bytes,
            coalesce_metrics,
            stats,
        }
    }

    /// Queues one part of a batch. When the queue is full of parts it would have to
    /// drop to make room (the beginning of this very batch, say) and the sender is
    /// getting requests through, waits up to `wait` for it to send some: a large batch
    /// goes out whole through a queue smaller than itself. A failing or closing lane
    /// does not wait: the queue's drop rules apply at once.
    async fn push_part(&self, payload: Payload, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if !self.is_full_for(&payload)
                || self.stats.failing.load(Ordering::Relaxed)
                || self.is_closing()
            {
                break;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                break;
            }
        }
        self.push(payload);
    }

    /// Whether queuing `payload` would drop something (what it supersedes aside).
    fn is_full_for(&self, payload: &Payload) -> bool {
        let q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let superseded = |p: &Payload| match (self.coalesce_metrics, payload, p) {
            (
                true,
                Payload::Metrics { batch, stream, .. },
                Payload::Metrics {
                    batch: b,
                    stream: s,
                    ..
                },
            ) => s == stream && b != batch,
            _ => false,
        };
        let (len, bytes) = q
            .items
            .iter()
            .filter(|(p, _)| !superseded(p))
            .fold((0, 0), |(n, b), (_, size)| (n + 1, b + size));
        len >= self.capacity || bytes + payload.encoded_len() > self.max_bytes
    }

    fn push(&self, payload: Payload) {
        let size = payload.encoded_len();
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        if let (true, Payload::Metrics { batch, stream, .. }) = (self.coalesce_metrics, &payload) {
            let (batch, stream) = (*batch, *stream);
            let before = q.items.len();
            q.items.retain(|(p, _)| {
                !matches!(p, Payload::Metrics { batch: b, stream: s, .. }
                    if *s == stream && *b != batch)
            });
            if q.items.len() != before {
                q.bytes = q.items.iter().map(|(_, size)| size).sum();
            }
        }
        while q.items.len() >= self.capacity || q.bytes + size > self.max_bytes {
            if !payload.is_metrics() {
                count_drop(&self.stats, &payload);
                self.publish(&q);
                return;
            }
            // Newer data is worth more: the oldest metric request goes, or the oldest
            // request of any kind when no metric request is queued.
            let victim = q
                .items
                .iter()
                .position(|(p, _)| p.is_metrics())
                .unwrap_or(0);
            let Some((victim, victim_size)) = q.items.remove(victim) else {
                break;
            };
            q.bytes -= victim_size;
            count_drop(&self.stats, &victim);
        }
        q.items.push_back((payload, size));
        q.bytes += size;
        self.publish(&q);
        drop(q);
        self.notify.notify_one();
    }

    fn publish(&self, q: &Queued) {
        self.stats
            .queue_len
            .store(q.items.len() as u64, Ordering::Relaxed);
        self.stats
            .queue_bytes
            .store(q.bytes as u64, Ordering::Relaxed);
    }

    fn pop(&self) -> Option<Payload> {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let (item, size) = q.items.pop_front()?;
        q.bytes -= size;
        self.publish(&q);
        drop(q);
        self.room.notify_waiters();
        Some(item)
    }

    /// A metrics request of a later batch is queued: this one carries nothing more.
    fn is_superseded(&self, payload: &Payload) -> bool {
        let Payload::Metrics { batch, stream, .. } = payload else {
            return false;
        };
        if !self.coalesce_metrics {
            return false;
        }
        let q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        q.items.iter().any(|(p, _)| {
            matches!(p, Payload::Metrics { batch: b, stream: s, .. }
                    if s == stream && b > batch)
        })
    }

    fn drop_all(&self) -> u64 {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = q.items.len() as u64;
        for (payload, _) in q.items.drain(..) {
            count_drop(&self.stats, &payload);
        }
        q.bytes = 0;
        self.publish(&q);
        dropped
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

/// Sends queued requests one at a time. The backoff belongs to the sender, not to a
/// request: after a failure, nothing is sent before the wait is over, whichever
/// request comes next (a newer cumulative batch included), so a dead or throttling
/// collector sees at most one attempt per wait. A success resets it.
async fn run_sender(
    queue: Arc<Queue>,
    transport: Arc<dyn Transport>,
    retry: RetryConfig,
    id: String,
) {
    let stats = queue.stats.clone();
    let mut failing = false;
    let mut backoff = retry.backoff();
    let mut not_before = tokio::time::Instant::now();
    'requests: loop {
        let Some(payload) = queue.pop() else {
            if queue.is_closing() {
                return;
            }
            queue.notify.notified().await;
            continue;
        };
        let started = Instant::now();
        loop {
            // Sleep out the wait, waking early only for shutdown.
            while tokio::time::Instant::now() < not_before {
                tokio::select! {
                    _ = tokio::time::sleep_until(not_before) => {}
                    _ = queue.notify.notified() => {}
                }
                if queue.is_closing() {
                    count_drop(&stats, &payload);
                    continue 'requests;
                }
            }
            if queue.is_superseded(&payload) {
                continue 'requests;
            }
            match transport.send(&payload).await {
                Ok(()) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    stats.failing.store(false, Ordering::Relaxed);
                    if failing {
                        tracing::info!(exporter = %id, "export recovered");
                        failing = false;
                    }
                    backoff = retry.backoff();
                    continue 'requests;
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    stats.failing.store(true, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(exporter = %id, retryable = e.retryable, "export failed: {}", e.message);
                        failing = true;
                    }
                    let base = backoff.next().unwrap_or(retry.max_interval);
                    let wait = retry.randomize(base).max(e.throttle.unwrap_or_default());
                    not_before = tokio::time::Instant::now() + wait;
                    let out_of_time = !retry.max_elapsed_time.is_zero()
                        && started.elapsed() + wait > retry.max_elapsed_time;
                    if !e.retryable || !retry.enabled || out_of_time || queue.is_closing() {
                        drop_payload(&stats, &payload, &id, &e.message, !queue.is_closing());
                        continue 'requests;
                    }
                }
            }
        }
    }
}

fn count_drop(stats: &ExporterStats, payload: &Payload) {
    stats.dropped_requests_total.fetch_add(1, Ordering::Relaxed);
    match payload {
        Payload::Traces { .. } => {
            stats
                .dropped_spans
                .fetch_add(payload.spans(), Ordering::Relaxed);
        }
        Payload::Metrics { .. } => {
            stats
                .dropped_metric_requests
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a dropped request; logs it unless shutting down (shutdown logs one summary).
fn drop_payload(stats: &ExporterStats, payload: &Payload, id: &str, why: &str, log: bool) {
    count_drop(stats, payload);
    if log {
        tracing::warn!(exporter = %id, "request dropped: {why}");
    }
}

/// One signal's way out: its own bounded queue and sender task (and its own health),
/// over the exporter's one transport.
struct Lane {
    queue: Arc<Queue>,
    sender: Option<JoinHandle<()>>,
}

impl Lane {
    async fn shutdown(&mut self, deadline: tokio::time::Instant) -> u64 {
        let Some(sender) = self.sender.take() else {
            return 0;
        };
        let stats = &self.queue.stats;
        let dropped_before = stats.dropped_requests();
        // Let the queue drain until shortly before the deadline, then stop retrying and
        // drop what is left: the in-flight request gets the rest of the time.
        let stop_at = deadline - (deadline - tokio::time::Instant::now()) / 4;
        while stats.queue_len.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < stop_at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.queue.closing.store(true, Ordering::Relaxed);
        self.queue.notify.notify_waiters();
        if tokio::time::timeout_at(deadline, sender).await.is_err() {
            // The in-flight request outlived the deadline: it is abandoned with the task.
            stats.dropped_requests_total.fetch_add(1, Ordering::Relaxed);
        }
        self.queue.drop_all();
        stats.dropped_requests() - dropped_before
    }
}

/// The exporter both OTLP protocols use; its `Transport` does the sending. One instance
/// serves every pipeline that lists it, a lane per signal.
pub struct OtlpExporter {
    id: String,
    resource: Resource,
    /// Delta temporality: one converter per stream (each forgets the series its last
    /// request did not carry).
    delta: Option<std::collections::HashMap<MetricStream, DeltaConverter>>,
    lanes: std::collections::BTreeMap<Signal, Lane>,
    transport: Arc<dyn Transport>,
    retry: RetryConfig,
    max_request_size: usize,
    /// How long queuing one part of a batch may wait for the sender (see
    /// [`Queue::push_part`]).
    part_wait: Duration,
    /// Batches exported so far: the generation of cumulative metric requests.
    batches: u64,
}

impl OtlpExporter {
    pub fn new(cx: &BuildContext, config: &OtlpConfig, transport: Arc<dyn Transport>) -> Self {
        let delta = config.temporality == Temporality::Delta;
        let lane = |signal: Signal| Lane {
            queue: Arc::new(Queue::new(
                if config.sending_queue.enabled {
                    config.sending_queue.queue_size
                } else {
                    1
                },
                if config.sending_queue.enabled {
                    config.sending_queue.max_bytes as usize
                } else {
                    config.max_request_size as usize
                },
                signal == Signal::Metrics && !delta,
                cx.telemetry
                    .exporter(&cx.id.to_string(), &signal.to_string()),
            )),
            sender: None,
        };
        OtlpExporter {
            id: cx.id.to_string(),
            resource: encode::resource(),
            delta: delta.then(Default::default),
            lanes: cx.signals.iter().map(|s| (*s, lane(*s))).collect(),
            transport,
            retry: config.retry_on_failure.clone(),
            max_request_size: config.max_request_size as usize,
            part_wait: config.timeout,
            batches: 0,
        }
    }
}

#[async_trait]
impl Exporter for OtlpExporter {
    async fn export(&mut self, signal: Signal, data: Data<'_>) -> Result<()> {
        let lane = self
            .lanes
            .get_mut(&signal)
            .ok_or_else(|| anyhow::anyhow!("not built for {signal} pipelines"))?;
        if lane.sender.is_none() {
            // Started on first use: components are built before the runtime runs.
            lane.sender = Some(tokio::spawn(run_sender(
                lane.queue.clone(),
                self.transport.clone(),
                self.retry.clone(),
                format!("{}/{signal}", self.id),
            )));
        }
        let queue = lane.queue.clone();
        let resource = self.resource.clone();
        let (stream, parts): (MetricStream, Box<dyn Iterator<Item = _> + Send + '_>) =
            match (signal, data) {
                (Signal::Metrics, Data::Links(encoded)) => (
                    MetricStream::Links,
                    Box::new(encoded.metric_parts(&resource)),
                ),
                (Signal::Metrics, Data::Telemetry(snapshot)) => (
                    MetricStream::Telemetry,
                    Box::new(std::iter::once(encode::metrics::telemetry_request(
                        snapshot, &resource,
                    ))),
                ),
                (Signal::Traces, Data::Links(encoded)) => {
                    for (request, pairs) in encoded.trace_parts() {
                        let body = Bytes::from(request.encode_to_vec());
                        drop(request);
                        queue
                            .push_part(Payload::Traces { body, pairs }, self.part_wait)
                            .await;
                    }
                    return Ok(());
                }
                (Signal::Traces, Data::Telemetry(_)) => return Ok(()),
            };
        self.batches += 1;
        let batch = self.batches;
        // Deltas are this exporter's own, converted part by part as they are built.
        let mut deltas = self
            .delta
            .as_mut()
            .map(|d| d.entry(stream).or_default().batch());
        for mut part in parts {
            if let Some(deltas) = deltas.as_mut() {
                deltas.convert(&mut part);
            }
            for request in split_metrics_request(part, self.max_request_size) {
                let body = Bytes::from(request.encode_to_vec());
                drop(request);
                let payload = Payload::Metrics {
                    body,
                    stream,
                    batch,
                };
                queue.push_part(payload, self.part_wait).await;
            }
        }
        if let Some(deltas) = deltas {
            deltas.finish();
        }
        Ok(())
    }

    async fn shutdown(&mut self, deadline: tokio::time::Instant) -> Result<u64> {
        let flushes = self.lanes.values_mut().map(|lane| lane.shutdown(deadline));
        Ok(futures::future::join_all(flushes).await.into_iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize, coalesce_metrics: bool) -> Queue {
        Queue::new(capacity, usize::MAX, coalesce_metrics, Arc::default())
    }

    static BATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// A metrics request of a new batch.
    fn metrics() -> Payload {
        Payload::Metrics {
            body: Bytes::new(),
            stream: MetricStream::Links,
            batch: BATCH.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    fn traces(pairs: usize) -> Payload {
        Payload::Traces {
            body: Bytes::new(),
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

#[cfg(test)]
mod bounds_tests {
    use super::*;
    use crate::model::{LinkBatch, LinkKey, LinkStats};
    use prost::Message;
    use std::sync::atomic::AtomicUsize;

    /// A batch of `n` links with distinct server ports, as a port scan makes.
    fn scan_batch(n: u16) -> LinkBatch {
        let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut batch = LinkBatch::new(t);
        batch.links = (1..=n)
            .map(|port| {
                let mut stats = LinkStats::new(t);
                stats.opened = u64::from(port);
                (
                    LinkKey::between(
                        "10.0.0.1".parse().unwrap(),
                        "10.0.0.2".parse().unwrap(),
                        port,
                        0,
                    ),
                    stats,
                )
            })
            .collect();
        batch
    }

    fn points(request: &ExportMetricsServiceRequest, name: &str) -> Vec<i64> {
        use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
        request.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .flat_map(|m| match &m.data {
                Some(metric::Data::Sum(s)) => s
                    .data_points
                    .iter()
                    .map(|p| match p.value {
                        Some(Value::AsInt(v)) => v,
                        _ => 0,
                    })
                    .collect(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn a_large_batch_is_split_into_requests_below_the_limit_losing_nothing() {
        let request = encode::metrics::metrics_request(&scan_batch(3000), &encode::resource());
        let whole = request.encoded_len();
        assert!(
            whole > 4 << 20,
            "a 3,000-port scan is {whole} bytes in one request"
        );
        let parts = split_metrics_request(request.clone(), 1 << 20);
        assert!(parts.len() >= 5, "{} parts", parts.len());
        for part in &parts {
            assert!(part.encoded_len() <= 1 << 20, "{}", part.encoded_len());
        }
        let opened: Vec<i64> = parts
            .iter()
            .flat_map(|p| points(p, "ridley.link.connections.opened"))
            .collect();
        assert_eq!(opened, (1..=3000).collect::<Vec<i64>>());
        let all = |r: &ExportMetricsServiceRequest| {
            r.resource_metrics[0].scope_metrics[0]
                .metrics
                .iter()
                .map(|m| match &m.data {
                    Some(metric::Data::Sum(s)) => s.data_points.len(),
                    Some(metric::Data::Histogram(h)) => h.data_points.len(),
                    _ => 0,
                })
                .sum::<usize>()
        };
        assert_eq!(parts.iter().map(all).sum::<usize>(), all(&request));
        // Small requests pass unchanged.
        let small = encode::metrics::metrics_request(&scan_batch(3), &encode::resource());
        assert_eq!(split_metrics_request(small.clone(), 1 << 20), vec![small]);
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let q = Queue::new(1000, 100_000, false, Arc::default());
        let request = encode::metrics::metrics_request(&scan_batch(30), &encode::resource());
        let size = request.encoded_len();
        for batch in 0..100 {
            q.push(Payload::Metrics {
                body: Bytes::from(request.encode_to_vec()),
                stream: MetricStream::Links,
                batch,
            });
        }
        let held = q.stats.queue_len.load(Ordering::Relaxed) as usize;
        assert_eq!(held, 100_000 / size);
        assert_eq!(
            q.stats.queue_bytes.load(Ordering::Relaxed) as usize,
            held * size
        );
        assert_eq!(
            q.stats.dropped_metric_requests.load(Ordering::Relaxed) as usize,
            100 - held
        );
    }

    struct Failing {
        attempts: AtomicUsize,
        throttle: Option<Duration>,
    }

    #[async_trait]
    impl Transport for Failing {
        async fn send(&self, _: &Payload) -> Result<(), SendError> {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            Err(SendError {
                retryable: true,
                throttle: self.throttle,
                message: "unavailable".into(),
            })
        }
    }

    /// Attempts a dead (or throttling) backend receives in `window`, while a new
    /// cumulative batch arrives every second.
    async fn attempts_against(throttle: Option<Duration>, window: Duration) -> usize {
        let transport = Arc::new(Failing {
            attempts: AtomicUsize::new(0),
            throttle,
        });
        let queue = Arc::new(Queue::new(10, usize::MAX, true, Arc::default()));
        let retry = RetryConfig {
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            randomization_factor: 0.0,
            ..RetryConfig::default()
        };
        let sender = tokio::spawn(run_sender(
            queue.clone(),
            transport.clone(),
            retry,
            "otlp".into(),
        ));
        let started = tokio::time::Instant::now();
        let mut batch = 0;
        while started.elapsed() < window {
            batch += 1;
            queue.push(Payload::Metrics {
                body: Bytes::new(),
                stream: MetricStream::Links,
                batch,
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sender.abort();
        transport.attempts.load(Ordering::Relaxed)
    }

    /// A collector that takes `delay` per request and accepts it.
    struct Slow {
        delay: Duration,
        received: AtomicUsize,
    }

    #[async_trait]
    impl Transport for Slow {
        async fn send(&self, _: &Payload) -> Result<(), SendError> {
            tokio::time::sleep(self.delay).await;
            self.received.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Queues `parts` parts of one cumulative batch of 1 KiB each through a queue that
    /// holds 3 of them; returns (received by the collector, dropped).
    async fn batch_through_a_small_queue(
        transport: Arc<dyn Transport>,
        parts: usize,
    ) -> (u64, u64) {
        let queue = Arc::new(Queue::new(1000, 3 * 1024, true, Arc::default()));
        let retry = RetryConfig {
            initial_interval: Duration::from_secs(1),
            randomization_factor: 0.0,
            ..RetryConfig::default()
        };
        let sender = tokio::spawn(run_sender(queue.clone(), transport, retry, "otlp".into()));
        for _ in 0..parts {
            let part = Payload::Metrics {
                body: Bytes::from(vec![0u8; 1024]),
                stream: MetricStream::Links,
                batch: 1,
            };
            queue.push_part(part, Duration::from_secs(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        sender.abort();
        let stats = &queue.stats;
        (
            stats.sent.load(Ordering::Relaxed),
            stats.dropped_metric_requests.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_the_queue_goes_out_whole_while_the_collector_takes_it() {
        let slow = Arc::new(Slow {
            delay: Duration::from_millis(100),
            received: AtomicUsize::new(0),
        });
        let (sent, dropped) = batch_through_a_small_queue(slow.clone(), 20).await;
        assert_eq!((sent, dropped), (20, 0));
        assert_eq!(slow.received.load(Ordering::Relaxed), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_collector_does_not_hold_the_pipeline() {
        let dead = Arc::new(Failing {
            attempts: AtomicUsize::new(0),
            throttle: None,
        });
        let started = tokio::time::Instant::now();
        let (sent, dropped) = batch_through_a_small_queue(dead, 20).await;
        // The first attempt fails while the queue fills; from then on parts do not wait:
        // the oldest go, counted, and the three newest are held.
        assert_eq!(sent, 0);
        assert_eq!(dropped, 20 - 3 - 1, "one is in the sender's hands");
        assert!(started.elapsed() < Duration::from_secs(5 + 60 + 1));
    }

    #[tokio::test(start_paused = true)]
    async fn newer_batches_do_not_skip_the_backoff() {
        // Waits 1, 1.5, 2.25, 3.4, 5.1, 7.6, 11.4, 17.1 s: 9 attempts in 60 s (one per
        // new batch would be 60).
        assert_eq!(attempts_against(None, Duration::from_secs(60)).await, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn server_throttling_is_honoured() {
        // Retry-After: 60 s: one attempt a minute.
        let attempts = attempts_against(Some(Duration::from_secs(60)), Duration::from_secs(300));
        assert_eq!(attempts.await, 5);
    }

    #[test]
    fn environment_variables_fill_only_what_the_yaml_left_unset() {
        let defaults = || crate::otel_env::OtlpDefaults {
            endpoint: Some("http://from-env:4318".into()),
            metrics_endpoint: Some("http://from-env:4318/custom/metrics".into()),
            traces_endpoint: None,
            headers: [("x-tenant".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        };
        let parse = |yaml: &str| -> OtlpConfig { serde_norway::from_str(yaml).unwrap() };

        let mut unset = parse("tls: {insecure: true}");
        unset.fill_from_env(defaults(), true);
        assert_eq!(unset.endpoint, "http://from-env:4318");
        assert_eq!(
            unset.metrics_endpoint.as_deref(),
            Some("http://from-env:4318/custom/metrics")
        );
        assert_eq!(unset.headers.get("x-tenant").map(String::as_str), Some("a"));
        assert!(unset.validate().is_ok());

        let mut set = parse("endpoint: collector:4317\nheaders: {x-tenant: b}");
        set.fill_from_env(defaults(), false);
        assert_eq!(set.endpoint, "collector:4317");
        assert_eq!(set.metrics_endpoint, None, "gRPC has one endpoint");
        assert_eq!(set.headers.get("x-tenant").map(String::as_str), Some("b"));

        // Per-signal variables add to the generic ones; a key both name takes the signal's.
        let mut signals = parse("tls: {insecure: true}");
        signals.fill_from_env(
            crate::otel_env::OtlpDefaults {
                endpoint: Some("http://from-env:4318".into()),
                headers: [
                    ("x-tenant".into(), "a".into()),
                    ("x-env".into(), "prod".into()),
                ]
                .into(),
                metrics_headers: [("x-tenant".into(), "metrics-team".into())].into(),
                ..Default::default()
            },
            true,
        );
        let metrics = signals.headers_for(Signal::Metrics);
        let traces = signals.headers_for(Signal::Traces);
        assert_eq!(
            metrics.into_iter().collect::<Vec<_>>(),
            [
                ("x-env".into(), "prod".into()),
                ("x-tenant".into(), "metrics-team".into())
            ]
        );
        assert_eq!(
            traces.into_iter().collect::<Vec<_>>(),
            [
                ("x-env".into(), "prod".into()),
                ("x-tenant".into(), "a".into())
            ]
        );

        let mut nothing = parse("{}");
        nothing.fill_from_env(Default::default(), false);
        assert_eq!(
            nothing.validate().err().map(|e| e.to_string()).as_deref(),
            Some("endpoint: not set, here or in OTEL_EXPORTER_OTLP_ENDPOINT")
        );
    }

    #[test]
    fn retry_settings_that_could_not_run_are_rejected() {
        let bad = |f: &dyn Fn(&mut RetryConfig)| {
            let mut retry = RetryConfig::default();
            f(&mut retry);
            retry.validate().err().map(|e| e.to_string())
        };
        assert_eq!(
            bad(&|r| r.initial_interval = Duration::ZERO).as_deref(),
            Some(
                "retry_on_failure: initial_interval and max_interval must be from 10ms to 1h, got 0s and 30s"
            )
        );
        assert!(
            bad(&|r| r.initial_interval = Duration::from_secs(10_000_000_000_000_000_000))
                .is_some()
        );
        assert_eq!(
            bad(&|r| r.multiplier = 0.5).as_deref(),
            Some("retry_on_failure.multiplier: must be from 1 to 10, got 0.5")
        );
        assert_eq!(
            bad(&|r| r.randomization_factor = 2.0).as_deref(),
            Some("retry_on_failure.randomization_factor: must be from 0 to 1, got 2")
        );
        assert_eq!(bad(&|_| {}), None);
    }
}
