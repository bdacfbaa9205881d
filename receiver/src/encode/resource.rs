//! The resource of everything ridley exports: the reporting node, worked out once.
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::attributes::kv_str;

/// The resource of everything ridley exports about itself and its links: the
/// reporting node, never the container ridley runs in, with what the OpenTelemetry
/// environment variables add or override. Worked out once per process.
pub fn resource() -> Resource {
    static RESOURCE: std::sync::OnceLock<Resource> = std::sync::OnceLock::new();
    RESOURCE
        .get_or_init(|| {
            let node = node_name();
            let host = node.clone().unwrap_or_else(host_name);
            let mut attributes = vec![
                kv_str("service.name", "ridley"),
                kv_str("service.version", env!("CARGO_PKG_VERSION")),
                kv_str("host.name", host.clone()),
                // One agent per node: the node names the instance, so that series from
                // different nodes never collide in a remote-write store.
                kv_str("service.instance.id", host),
            ];
            if let Some(node) = node {
                attributes.push(kv_str("k8s.node.name", node));
            }
            // OTEL_RESOURCE_ATTRIBUTES, then OTEL_SERVICE_NAME, over what was detected.
            for (key, value) in crate::otel_env::resource_attributes(&crate::otel_env::process) {
                attributes.retain(|kv| kv.key != key);
                attributes.push(kv_str(&key, value));
            }
            Resource {
                attributes,
                dropped_attributes_count: 0,
                entity_refs: vec![],
            }
        })
        .clone()
}

/// The Kubernetes node, from the downward API (`spec.nodeName` as `K8S_NODE_NAME`).
fn node_name() -> Option<String> {
    std::env::var("K8S_NODE_NAME")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// The host's name: read in the host's UTS namespace (through PID 1, visible with the
/// host PID namespace) so that a container's own hostname never stands for the node;
/// our own namespace's name where the host's cannot be entered.
fn host_name() -> String {
    let read = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
    };
    let in_host_uts = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let host = std::fs::File::open("/proc/1/ns/uts").ok()?;
        // SAFETY: setns on a valid namespace fd; it moves only this short-lived thread.
        if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWUTS) } != 0 {
            return None;
        }
        read()
    })
    .join()
    .ok()
    .flatten();
    in_host_uts
        .or_else(read)
        .unwrap_or_else(|| "unknown".to_owned())
}
