//! Kubernetes metadata for ridley: (planned) watches, the IP/port -> pod -> owner index and
//! attribute naming for link ends. It must not touch the kernel capture or the exporters.
//!
//! Enrichment is not implemented yet; the crate reserves its place in the workspace.
