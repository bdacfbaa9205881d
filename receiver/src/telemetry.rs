//! ridley's own health, recorded in one registry: receivers' losses, exporters'
//! requests, queues and drops, listeners' refusals, Kubernetes watch errors. Components
//! write here (per interval or per request, never per kernel event); the service reads
//! a [`TelemetrySnapshot`] once per interval and sends it through the metrics pipelines
//! as data of its own, beside the links.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use crate::model::Losses;

/// Counters of one exporter instance (one per pipeline signal).
#[derive(Debug, Default)]
pub struct ExporterStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub queue_len: AtomicU64,
    /// Encoded bytes waiting in the queue.
    pub queue_bytes: AtomicU64,
    pub dropped_spans: AtomicU64,
    pub dropped_metric_requests: AtomicU64,
    /// Requests of either signal dropped (queue full, out of retries, shutdown).
    pub dropped_requests_total: AtomicU64,
    /// The last send attempt failed.
    pub failing: std::sync::atomic::AtomicBool,
}

impl ExporterStats {
    pub fn dropped_requests(&self) -> u64 {
        self.dropped_requests_total.load(Ordering::Relaxed)
    }
}

/// A snapshot of one exporter's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExporterSnapshot {
    pub exporter: String,
    pub signal: String,
    pub sent: u64,
    pub failed: u64,
    pub queue_len: u64,
    pub queue_bytes: u64,
    pub dropped_spans: u64,
    pub dropped_metric_requests: u64,
    pub failing: bool,
}

/// Everything the registry holds at one moment: what the metrics pipelines carry as
/// `Data::Telemetry` and `encode::metrics::telemetry_request` turns into
/// `ridley.receiver.*`, `ridley.exporter.*`, `ridley.listener.*` and `ridley.k8s.*`.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetrySnapshot {
    pub time: SystemTime,
    /// The start of every cumulative series here: the process start.
    pub start: SystemTime,
    /// Losses of every receiver, summed.
    pub losses: Losses,
    pub exporters: Vec<ExporterSnapshot>,
    pub listener_refusals: Vec<(&'static str, u64)>,
    /// Kubernetes watch errors since start, when a Kubernetes watch set exists.
    pub kubernetes_watch_errors: Option<u64>,
}

#[derive(Debug)]
pub struct Telemetry {
    start: SystemTime,
    /// The cumulative losses each receiver last reported, by receiver id.
    losses: Mutex<BTreeMap<String, Losses>>,
    /// Errors of the process's Kubernetes watch set, once one is running.
    kubernetes_watch_errors: Mutex<Option<u64>>,
    exporters: Mutex<BTreeMap<(String, String), Arc<ExporterStats>>>,
    receivers_expected: AtomicU64,
    receivers_ready: AtomicU64,
    /// Why the capture sees less than the whole node, by cause (privileges, namespaces).
    capture_problems: Mutex<BTreeMap<&'static str, String>>,
    /// A partial capture still counts as ready (`allow_partial_capture`).
    partial_capture_accepted: std::sync::atomic::AtomicBool,
    /// Connections each HTTP listener closed at accept (its connection limit reached).
    listener_refusals: Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            start: SystemTime::now(),
            losses: Mutex::default(),
            kubernetes_watch_errors: Mutex::default(),
            exporters: Mutex::default(),
            receivers_expected: AtomicU64::default(),
            receivers_ready: AtomicU64::default(),
            capture_problems: Mutex::default(),
            partial_capture_accepted: Default::default(),
            listener_refusals: Mutex::default(),
        }
    }
}

impl Telemetry {
    /// Replaces receiver `id`'s cumulative losses (called once per interval).
    pub fn record_losses(&self, id: &str, losses: Losses) {
        let mut all = self.losses.lock().unwrap_or_else(|e| e.into_inner());
        all.insert(id.to_owned(), losses);
    }

    /// Replaces the count of Kubernetes watch errors since start.
    pub fn record_kubernetes_watch_errors(&self, errors: u64) {
        *self
            .kubernetes_watch_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(errors);
    }

    /// What the registry holds now, stamped `time`.
    pub fn snapshot_at(&self, time: SystemTime) -> TelemetrySnapshot {
        let losses = self
            .losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .fold(Losses::default(), |sum, l| sum.plus(l));
        let kubernetes_watch_errors = self
            .kubernetes_watch_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .copied();
        TelemetrySnapshot {
            time,
            start: self.start,
            losses,
            exporters: self.snapshot(),
            listener_refusals: self.listener_refusals(),
            kubernetes_watch_errors,
        }
    }

    /// Records (or, with `None`, clears) a reason the capture is partial.
    pub fn set_capture_problem(&self, cause: &'static str, problem: Option<String>) {
        let mut problems = self
            .capture_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(p) => problems.insert(cause, p),
            None => problems.remove(cause),
        };
    }

    /// Every current reason the capture is partial.
    pub fn capture_problems(&self) -> Vec<String> {
        let problems = self
            .capture_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        problems.values().cloned().collect()
    }

    /// The refusal counter of listener `name`, created on first use.
    pub fn listener_refusals_of(&self, name: &'static str) -> Arc<AtomicU64> {
        let mut listeners = self
            .listener_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        listeners.entry(name).or_default().clone()
    }

    /// (listener, connections refused) for every listener.
    pub fn listener_refusals(&self) -> Vec<(&'static str, u64)> {
        let listeners = self
            .listener_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        listeners
            .iter()
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn accept_partial_capture(&self, accepted: bool) {
        self.partial_capture_accepted
            .store(accepted, Ordering::Relaxed);
    }

    pub fn partial_capture_accepted(&self) -> bool {
        self.partial_capture_accepted.load(Ordering::Relaxed)
    }

    pub fn expect_receivers(&self, count: u64) {
        self.receivers_expected.store(count, Ordering::Relaxed);
    }

    /// A receiver has started capturing (for ridley's eBPF receiver: programs attached).
    pub fn receiver_ready(&self) {
        self.receivers_ready.fetch_add(1, Ordering::Relaxed);
    }

    /// (receivers ready, receivers expected)
    pub fn receivers(&self) -> (u64, u64) {
        (
            self.receivers_ready.load(Ordering::Relaxed),
            self.receivers_expected.load(Ordering::Relaxed),
        )
    }

    /// The counters of exporter `id` for `signal`, created on first use.
    pub fn exporter(&self, id: &str, signal: &str) -> Arc<ExporterStats> {
        let mut exporters = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        exporters
            .entry((id.to_owned(), signal.to_owned()))
            .or_default()
            .clone()
    }

    pub fn snapshot(&self) -> Vec<ExporterSnapshot> {
        let exporters = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        exporters
            .iter()
            .map(|((exporter, signal), s)| ExporterSnapshot {
                exporter: exporter.clone(),
                signal: signal.clone(),
                sent: s.sent.load(Ordering::Relaxed),
                failed: s.failed.load(Ordering::Relaxed),
                queue_len: s.queue_len.load(Ordering::Relaxed),
                queue_bytes: s.queue_bytes.load(Ordering::Relaxed),
                dropped_spans: s.dropped_spans.load(Ordering::Relaxed),
                dropped_metric_requests: s.dropped_metric_requests.load(Ordering::Relaxed),
                failing: s.failing.load(Ordering::Relaxed),
            })
            .collect()
    }
}
