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

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    resource::v1::Resource,
};

use crate::model::LinkBatch;

/// Span pairs per trace request (about 2.7 KB each: well below any receiver's limit).
pub const PAIRS_PER_REQUEST: usize = 512;

/// One batch as every exporter of a pipeline gets it. Encodings are built part by part
/// as an exporter asks for them, so that no exporter ever holds a whole batch decoded:
/// memory follows the part size, not the number of links (each exporter that needs a
/// part builds it: CPU is traded for a bound on memory). The batch itself is shared:
/// an exporter that serves it later (the Prometheus page) keeps a reference.
pub struct Encoded {
    pub batch: Arc<LinkBatch>,
    /// Where this batch's trace and span ids start (random per batch).
    id_seed: u64,
}

impl Encoded {
    pub fn new(batch: Arc<LinkBatch>) -> Self {
        Encoded {
            batch,
            id_seed: fastrand::u64(..),
        }
    }

    /// The batch as cumulative metrics requests of at most
    /// [`metrics::LINKS_PER_PART`] links each, built one at a time.
    pub fn metric_parts<'a>(
        &'a self,
        resource: &'a Resource,
    ) -> impl Iterator<Item = ExportMetricsServiceRequest> + 'a {
        metrics::metrics_parts(&self.batch, resource, metrics::LINKS_PER_PART)
    }

    /// The batch's span pairs, in requests of at most [`PAIRS_PER_REQUEST`] pairs, each
    /// with its number of pairs, built one at a time; the same ids for every exporter.
    pub fn trace_parts(&self) -> impl Iterator<Item = (ExportTraceServiceRequest, usize)> + '_ {
        spans::trace_parts(
            &self.batch,
            spans::IdGenerator::from_seed(self.id_seed),
            PAIRS_PER_REQUEST,
        )
    }
}
