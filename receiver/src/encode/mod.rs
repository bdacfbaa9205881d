//! Encoding: links -> OpenTelemetry data, with the official generated types of
//! opentelemetry-proto. Everything an exporter sends is built here, never in the
//! exporters: `metrics` (the `ridley.link.*` series, self-telemetry, the service-graph
//! series), `spans` (service-graph span pairs), `temporality` (cumulative -> delta),
//! `attributes` (shared by both signals) and `resource` (the reporting node).
pub mod attributes;
pub mod metrics;
pub mod resource;
pub mod spans;
pub mod temporality;

pub use attributes::{kv, kv_str, link_attributes, link_point_attributes, scope, unix_nanos};
pub use resource::resource;

use std::sync::{Arc, OnceLock};

use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest,
};

use crate::model::LinkBatch;

/// Span pairs per trace request (about 2.7 KB each: well below any receiver's limit).
pub const PAIRS_PER_REQUEST: usize = 512;

/// One batch and its encodings, each built at most once however many exporters need
/// it: the pipeline hands every exporter the same `Encoded`, and the first that asks
/// for the metrics request (or the span pairs) builds it for all.
pub struct Encoded<'a> {
    pub batch: &'a LinkBatch,
    metrics: OnceLock<Arc<ExportMetricsServiceRequest>>,
    traces: OnceLock<Vec<(Arc<ExportTraceServiceRequest>, usize)>>,
}

impl<'a> Encoded<'a> {
    pub fn new(batch: &'a LinkBatch) -> Self {
        Encoded {
            batch,
            metrics: OnceLock::new(),
            traces: OnceLock::new(),
        }
    }

    /// The batch as one cumulative metrics request, shared (an exporter that queues it
    /// holds a reference, not a copy).
    pub fn metrics(&self) -> &Arc<ExportMetricsServiceRequest> {
        self.metrics
            .get_or_init(|| Arc::new(metrics::metrics_request(self.batch, &resource())))
    }

    /// The batch's span pairs, in requests of at most [`PAIRS_PER_REQUEST`] pairs, each
    /// with its number of pairs.
    pub fn traces(&self) -> &[(Arc<ExportTraceServiceRequest>, usize)] {
        self.traces.get_or_init(|| {
            spans::trace_requests(
                self.batch,
                &mut spans::IdGenerator::default(),
                PAIRS_PER_REQUEST,
            )
            .into_iter()
            .map(|(request, pairs)| (Arc::new(request), pairs))
            .collect()
        })
    }
}
