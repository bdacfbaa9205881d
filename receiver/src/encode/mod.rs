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

pub use attributes::{SCOPE_NAME, kv, kv_str, link_attributes, link_point_attributes, unix_nanos};
pub use resource::resource;
