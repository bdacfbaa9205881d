//! The `k8sattributes` processor: names both ends of every link by what they are in the
//! cluster (pod, workload, namespace, node; a ClusterIP by its backing workload), and
//! leaves each link to one node: a link this node saw only from the server's socket is
//! dropped when the client is a pod or node of the cluster, whose own node reports it.
//!
//! The index is rebuilt from the watch stores once per batch; nothing here waits on the
//! API server. Without a cluster the watches retry in the background and links keep
//! their addresses.
use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, Result};
use config::ComponentSection;
use ipnet::IpNet;
use k8sattrs::{Index, Watchers, attributes_of, watch::ClientSource};
use serde::Deserialize;

use crate::{
    model::{EndIdentity, LinkBatch},
    pipeline::{BuildContext, Processor, parse_section},
};

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ExternalName {
    /// An address range outside the cluster, e.g. `10.20.0.0/16`.
    pub cidr: String,
    /// The `service.name` its addresses get.
    pub name: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct K8sAttributesConfig {
    /// `k8s.cluster.name` on every resolved end.
    pub cluster_name: Option<String>,
    /// A kubeconfig file; without it, in-cluster config, then `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Names for addresses outside the cluster, most specific range first.
    pub external_names: Vec<ExternalName>,
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Processor>> {
    let config: K8sAttributesConfig = parse_section("processors", &cx.id, section)?;
    let mut external: Vec<(IpNet, String)> = config
        .external_names
        .iter()
        .map(|e| {
            let net: IpNet = e.cidr.parse().with_context(|| {
                format!(
                    "processors.{}.external_names: {:?} is not a CIDR",
                    cx.id, e.cidr
                )
            })?;
            Ok((net, e.name.clone()))
        })
        .collect::<Result<_>>()?;
    external.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
    let watchers = Watchers::start(ClientSource {
        kubeconfig: config.kubeconfig,
    });
    Ok(Box::new(K8sAttributes {
        watchers,
        cluster: config.cluster_name,
        external,
        last_errors: 0,
    }))
}

struct K8sAttributes {
    watchers: Watchers,
    cluster: Option<String>,
    external: Vec<(IpNet, String)>,
    last_errors: u64,
}

/// How ends are named: the cluster's index, then the configured external ranges.
struct Naming<'a> {
    index: &'a Index,
    cluster: Option<&'a str>,
    external: &'a [(IpNet, String)],
}

impl Naming<'_> {
    fn identity(&self, addr: IpAddr, port: Option<u16>) -> Option<EndIdentity> {
        if let Some(resolved) = self.index.resolve(addr, port) {
            let named = attributes_of(&resolved, self.cluster);
            return Some(EndIdentity {
                service_name: named.service_name,
                attributes: named.attributes,
            });
        }
        self.external
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map(|(_, name)| EndIdentity {
                service_name: name.clone(),
                attributes: Vec::new(),
            })
    }

    /// Drops the links another node reports, names the ends of the rest.
    fn enrich(&self, batch: &mut LinkBatch) {
        let index = self.index;
        batch.links.retain(|(key, stats)| {
            !(stats.reported_by_server && index.is_cluster_member(key.client))
        });
        for (key, _) in &batch.links {
            if let Some(client) = self.identity(key.client, None) {
                batch.ends.insert((key.client, None), client);
            }
            if let Some(server) = self.identity(key.server, Some(key.server_port)) {
                batch
                    .ends
                    .insert((key.server, Some(key.server_port)), server);
            }
        }
    }
}

impl Processor for K8sAttributes {
    fn process(&mut self, mut batch: LinkBatch) -> LinkBatch {
        let index = Index::build(&self.watchers.snapshot());
        let errors = self.watchers.health.errors();
        if errors != self.last_errors {
            self.last_errors = errors;
            tracing::debug!(errors, failing = ?self.watchers.health.failing(), "Kubernetes watch errors");
        }
        Naming {
            index: &index,
            cluster: self.cluster.as_deref(),
            external: &self.external,
        }
        .enrich(&mut batch);
        batch.kubernetes_watch_errors = Some(errors);
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
    use k8sattrs::Snapshot;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::model::{LinkKey, LinkStats};

    fn pod(name: &str, ip: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
        })
    }

    fn link(client: &str, server: &str, by_server: bool) -> (LinkKey, LinkStats) {
        let mut stats = LinkStats::new(SystemTime::UNIX_EPOCH);
        stats.reported_by_server = by_server;
        (
            LinkKey {
                client: client.parse().unwrap(),
                server: server.parse().unwrap(),
                server_port: 80,
            },
            stats,
        )
    }

    #[test]
    fn names_ends_and_leaves_links_to_the_clients_node() {
        let index = Index::build(&Snapshot {
            pods: vec![pod("web", "10.1.0.5"), pod("api", "10.1.0.6")],
            ..Default::default()
        });
        let external = vec![("203.0.113.0/24".parse().unwrap(), "partner".to_owned())];
        let naming = Naming {
            index: &index,
            cluster: Some("prod"),
            external: &external,
        };
        let mut batch = LinkBatch::new(SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH);
        batch.links = vec![
            // Seen from the server only, client is a pod: its own node reports it.
            link("10.1.0.5", "10.1.0.6", true),
            // Seen from the client's socket: reported here.
            link("10.1.0.6", "10.1.0.5", false),
            // From outside the cluster: only the server's node can report it.
            link("203.0.113.9", "10.1.0.6", true),
        ];
        naming.enrich(&mut batch);
        assert_eq!(batch.links.len(), 2);
        let (api_to_web, _) = &batch.links[0];
        let (client, server) = batch.end_names(api_to_web);
        assert_eq!(
            (client.service_name.as_str(), server.service_name.as_str()),
            ("api", "web")
        );
        assert!(
            client
                .attributes
                .contains(&("k8s.cluster.name".into(), "prod".into()))
        );
        assert!(
            client
                .attributes
                .contains(&("k8s.pod.name".into(), "api".into()))
        );
        assert!(
            server
                .attributes
                .contains(&("k8s.namespace.name".into(), "shop".into()))
        );
        let (outside, _) = &batch.links[1];
        assert_eq!(batch.end_names(outside).0.service_name, "partner");
        assert_eq!(batch.end_names(outside).1.service_name, "api");
    }
}
