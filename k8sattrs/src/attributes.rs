//! The OpenTelemetry names of a resolved end: `service.name`, `service.namespace`,
//! `k8s.*` resource attributes.
use crate::index::{Resolved, Topology};

/// `service.name` plus resource attributes, in a stable order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndAttributes {
    pub service_name: String,
    pub attributes: Vec<(String, String)>,
}

/// Attributes of a resolved end. `cluster` is `k8s.cluster.name` when configured;
/// `topology` the zone and region of the end's node (`cloud.availability_zone`,
/// `cloud.region`), when known.
pub fn attributes_of(
    resolved: &Resolved,
    cluster: Option<&str>,
    topology: Option<&Topology>,
) -> EndAttributes {
    let mut attributes: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| attributes.push((k.to_owned(), v.to_owned()));
    if let Some(cluster) = cluster {
        put("k8s.cluster.name", cluster);
    }
    let service_name = match resolved {
        Resolved::Pod(pod) => {
            put("service.namespace", pod.namespace());
            put("k8s.namespace.name", pod.namespace());
            put("k8s.pod.name", pod.name());
            put("k8s.pod.uid", &pod.uid().to_string());
            if let Some(node) = pod.node() {
                put("k8s.node.name", node);
            }
            if let Some(workload) = &pod.workload {
                put(workload.kind.attribute(), &workload.name);
            }
            pod.service_name.to_string()
        }
        Resolved::Workload {
            namespace,
            workload,
            service_name,
            via_service,
        } => {
            put("service.namespace", namespace);
            put("k8s.namespace.name", namespace);
            put(workload.kind.attribute(), &workload.name);
            put("k8s.service.name", via_service);
            service_name.clone()
        }
        Resolved::Service { namespace, name } => {
            put("service.namespace", namespace);
            put("k8s.namespace.name", namespace);
            put("k8s.service.name", name);
            name.clone()
        }
        Resolved::Node { name } => {
            put("k8s.node.name", name);
            name.clone()
        }
    };
    if let Some(topology) = topology {
        if let Some(zone) = &topology.zone {
            attributes.push(("cloud.availability_zone".to_owned(), zone.clone()));
        }
        if let Some(region) = &topology.region {
            attributes.push(("cloud.region".to_owned(), region.clone()));
        }
    }
    EndAttributes {
        service_name,
        attributes,
    }
}
