//! Kubernetes metadata for ridley's link ends: watches of the objects that name an
//! address (kube-rs reflectors, holding compact records of only what the index reads),
//! the address -> pod / workload / Service / node index, and the OpenTelemetry
//! attribute naming of an end.
//!
//! This crate owns everything that talks to the API server. It must not touch the kernel
//! capture, the link accounting or the exporters: the receiver's `k8sattributes`
//! processor asks it to resolve addresses once per interval and does the rest.
pub mod attributes;
pub mod index;
pub mod rdns;
pub mod record;
pub mod watch;

pub use attributes::{EndAttributes, attributes_of};
pub use index::{Index, PodInfo, Resolved, Snapshot, Topology};
pub use record::PodRecord;
pub use watch::{WatchHealth, Watchers};
