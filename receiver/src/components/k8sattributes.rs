//! The `k8sattributes` processor: names both ends of every link by what they are in the
//! cluster (pod, workload, namespace, node; a ClusterIP by its backing workload), and
//! leaves each link to one node: a link this node saw only from the server's socket is
//! dropped when the client is a pod or node of the cluster, whose own node reports it.
//!
//! The index is rebuilt from the watch stores once per batch; nothing here waits on the
//! API server. Without a cluster the watches retry in the background and links keep
//! their addresses.
use std::{collections::HashMap, net::IpAddr, path::PathBuf};

use anyhow::Result;
use config::ComponentSection;
use ipnet::IpNet;
use k8sattrs::{Index, Watchers, attributes_of, rdns::ReverseDns, watch::ClientSource};
use serde::Deserialize;

use crate::{
    component::{BuildContext, Processor, key_error},
    model::{EndIdentity, EndRef, IntervalActivity, LinkBatch, LinkKey, LinkStats},
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
    /// Name addresses outside the cluster (and outside `external_names`) by reverse DNS.
    pub reverse_dns: ReverseDnsConfig,
    /// Keep one link per pod address. By default links between the same two workloads
    /// on the same port merge (replicas are one edge) and pod-level attributes go.
    pub keep_pod_detail: bool,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ReverseDnsConfig {
    pub enabled: bool,
    /// Answers kept at most (names and misses alike).
    pub max_entries: usize,
    /// How long an answer is kept.
    #[serde(with = "humantime_serde")]
    pub ttl: std::time::Duration,
}

impl Default for ReverseDnsConfig {
    fn default() -> Self {
        ReverseDnsConfig {
            enabled: false,
            max_entries: 4096,
            ttl: std::time::Duration::from_secs(300),
        }
    }
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Processor>> {
    let config: K8sAttributesConfig = cx.parse_section(section)?;
    let mut external: Vec<(IpNet, String)> = config
        .external_names
        .iter()
        .map(|e| {
            let net: IpNet = e.cidr.parse().map_err(|err| {
                key_error(
                    "external_names",
                    format!("{:?} is not a CIDR: {err}", e.cidr),
                )
            })?;
            Ok((net, e.name.clone()))
        })
        .collect::<Result<_>>()?;
    external.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
    if let Some(path) = &config.kubeconfig {
        if !path.exists() {
            return Err(key_error(
                "kubeconfig",
                format!("{} does not exist", path.display()),
            ));
        }
    }
    Ok(Box::new(K8sAttributes {
        source: ClientSource {
            kubeconfig: config.kubeconfig,
        },
        reverse_dns_config: config.reverse_dns,
        watchers: None,
        cluster: config.cluster_name,
        external,
        last_errors: 0,
        merger: (!config.keep_pod_detail).then(WorkloadMerger::default),
        reverse_dns: None,
        last: None,
        shared: cx.pipelines > 1,
        telemetry: cx.telemetry.clone(),
    }))
}

struct K8sAttributes {
    /// Where the API server is, for `start`.
    source: ClientSource,
    reverse_dns_config: ReverseDnsConfig,
    watchers: Option<Watchers>,
    cluster: Option<String>,
    external: Vec<(IpNet, String)>,
    last_errors: u64,
    merger: Option<WorkloadMerger>,
    reverse_dns: Option<ReverseDns>,
    /// The last batch processed, by collection time (see `process`).
    last: Option<(std::time::SystemTime, LinkBatch)>,
    /// Listed by several pipelines: keep `last` for the others.
    shared: bool,
    /// Where watch errors are recorded (`ridley.k8s.watch.errors`).
    telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
}

/// Attributes that name one pod, dropped when replicas merge into their workload.
const POD_LEVEL: &[&str] = &["k8s.pod.name", "k8s.pod.uid", "k8s.node.name"];

/// One end of a merged link: a workload (or Service, node, named range), else an address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum MergedEnd {
    Named(EndIdentity),
    /// Unnamed: the address, and the client's cgroup where the address is shared.
    Address(IpAddr, u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MergedKey {
    client: MergedEnd,
    server: MergedEnd,
    server_port: u16,
    ipv6: bool,
}

struct MergedLink {
    /// A member's key: where the merged link sits in the batch. Its addresses stand for
    /// several pods and are not exported.
    representative: LinkKey,
    stats: LinkStats,
}

/// Merges address-level links into workload-level links with continuous cumulative
/// series: each member link adds what it did since its previous state, so members
/// coming and going (pods replaced) never reset or double the merged counters.
#[derive(Default)]
struct WorkloadMerger {
    members: HashMap<LinkKey, LinkStats>,
    merged: HashMap<MergedKey, MergedLink>,
}

fn merged_end(identity: Option<&EndIdentity>, addr: IpAddr, cgroup: u64) -> MergedEnd {
    match identity {
        Some(identity) => MergedEnd::Named(EndIdentity {
            service_name: identity.service_name.clone(),
            attributes: identity
                .attributes
                .iter()
                .filter(|(k, _)| !POD_LEVEL.contains(&k.as_str()))
                .cloned()
                .collect(),
        }),
        None => MergedEnd::Address(addr, cgroup),
    }
}

impl WorkloadMerger {
    fn merge(&mut self, batch: &mut LinkBatch) {
        let mut active: HashMap<MergedKey, u64> = HashMap::new();
        let mut intervals: HashMap<MergedKey, IntervalActivity> = HashMap::new();
        let mut members = HashMap::with_capacity(batch.links.len());
        for (key, stats) in std::mem::take(&mut batch.links) {
            let merged_key = MergedKey {
                client: merged_end(batch.client_identity(&key), key.client, key.client_cgroup),
                server: merged_end(batch.server_identity(&key), key.server, 0),
                server_port: key.server_port,
                ipv6: key.network_type() == "ipv6",
            };
            let merged = self
                .merged
                .entry(merged_key.clone())
                .or_insert_with(|| MergedLink {
                    representative: key,
                    stats: LinkStats::new(stats.start_time),
                });
            merged.stats.add_since(&stats, self.members.get(&key));
            *active.entry(merged_key.clone()).or_default() += stats.active;
            let interval = intervals.entry(merged_key).or_default();
            interval.attempts += stats.interval.attempts;
            interval
                .samples
                .extend(stats.interval.samples.iter().cloned());
            interval.carried_traffic |= stats.interval.carried_traffic;
            interval.last_rtt = interval.last_rtt.max(stats.interval.last_rtt);
            members.insert(key, stats);
        }
        self.members = members;
        // A merged link whose members all expired (idle) ends with them.
        self.merged.retain(|key, _| active.contains_key(key));
        batch.ends.clear();
        for (key, merged) in &mut self.merged {
            merged.stats.active = active.get(key).copied().unwrap_or(0);
            merged.stats.interval = intervals.remove(key).unwrap_or_default();
            let rep = merged.representative;
            if let MergedEnd::Named(identity) = &key.client {
                batch.ends.insert(EndRef::client(&rep), identity.clone());
            }
            if let MergedEnd::Named(identity) = &key.server {
                batch.ends.insert(EndRef::server(&rep), identity.clone());
            }
            batch.links.push((rep, merged.stats.clone()));
        }
        batch.links.sort_by_key(|(key, _)| *key);
        batch.merged_by_workload = true;
    }
}

/// How ends are named: the cluster's index, then the configured external ranges.
struct Naming<'a> {
    index: &'a Index,
    cluster: Option<&'a str>,
    external: &'a [(IpNet, String)],
    reverse_dns: Option<&'a ReverseDns>,
}

impl Naming<'_> {
    fn named(&self, resolved: &k8sattrs::Resolved) -> EndIdentity {
        let named = attributes_of(resolved, self.cluster);
        EndIdentity {
            service_name: named.service_name,
            attributes: named.attributes,
        }
    }

    /// A client in the host's network namespace: its cgroup names its pod, if any.
    fn client_identity(&self, batch: &LinkBatch, key: &LinkKey) -> Option<EndIdentity> {
        batch
            .cgroups
            .get(&key.client_cgroup)
            .and_then(|path| self.index.resolve_cgroup(path))
            .map(|resolved| self.named(&resolved))
            .or_else(|| self.identity(key.client, None))
    }

    fn identity(&self, addr: IpAddr, port: Option<u16>) -> Option<EndIdentity> {
        if let Some(resolved) = self.index.resolve(addr, port) {
            return Some(self.named(&resolved));
        }
        let name = self
            .external
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map(|(_, name)| name.clone())
            .or_else(|| {
                let dns = self.reverse_dns.filter(|_| !addr.is_loopback())?;
                dns.name(addr)
            })?;
        Some(EndIdentity {
            service_name: name,
            attributes: Vec::new(),
        })
    }

    /// Drops the links another node reports, names the ends of the rest.
    fn enrich(&self, batch: &mut LinkBatch) {
        let index = self.index;
        batch.links.retain(|(key, stats)| {
            !(stats.reported_by_server && index.is_cluster_member(key.client))
        });
        let mut ends = Vec::new();
        for (key, _) in &batch.links {
            if let Some(client) = self.client_identity(batch, key) {
                ends.push((EndRef::client(key), client));
            }
            if let Some(server) = self.identity(key.server, Some(key.server_port)) {
                ends.push((EndRef::server(key), server));
            }
        }
        batch.ends.extend(ends);
    }
}

impl Processor for K8sAttributes {
    /// Starts the one set of watches (and the resolver) this instance serves every
    /// pipeline from.
    fn start(&mut self) -> Result<()> {
        self.watchers = Some(Watchers::start(self.source.clone()));
        let dns = &self.reverse_dns_config;
        self.reverse_dns = dns
            .enabled
            .then(|| ReverseDns::start(dns.max_entries, dns.ttl));
        Ok(())
    }

    fn process(&mut self, batch: LinkBatch) -> LinkBatch {
        // One instance serves every pipeline that lists it: when there are several, the
        // second pipeline's copy of a batch gets the first one's result instead of a
        // second index build (one processed batch is kept; none with one pipeline).
        if let Some((time, done)) = &self.last {
            if *time == batch.time {
                return done.clone();
            }
        }
        let time = batch.time;
        let done = self.enrich(batch);
        if self.shared {
            self.last = Some((time, done.clone()));
        }
        done
    }
}

impl K8sAttributes {
    fn enrich(&mut self, mut batch: LinkBatch) -> LinkBatch {
        let Some(watchers) = &self.watchers else {
            return batch;
        };
        let index = Index::build(&watchers.snapshot());
        let errors = watchers.health.errors();
        if errors != self.last_errors {
            self.last_errors = errors;
            tracing::debug!(errors, failing = ?watchers.health.failing(), "Kubernetes watch errors");
        }
        Naming {
            index: &index,
            cluster: self.cluster.as_deref(),
            external: &self.external,
            reverse_dns: self.reverse_dns.as_ref(),
        }
        .enrich(&mut batch);
        if let Some(merger) = self.merger.as_mut() {
            merger.merge(&mut batch);
        }
        self.telemetry.record_kubernetes_watch_errors(errors);
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
                client_cgroup: 0,
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
            reverse_dns: None,
        };
        let mut batch = LinkBatch::new(SystemTime::UNIX_EPOCH);
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

    fn stats(opened: u64, bytes: u64, active: u64) -> LinkStats {
        let mut s = LinkStats::new(SystemTime::UNIX_EPOCH);
        s.opened = opened;
        s.bytes_transmit = bytes;
        s.active = active;
        s
    }

    fn named(batch: &mut LinkBatch, addr: &str, port: Option<u16>, name: &str, pod: &str) {
        batch.ends.insert(
            EndRef {
                addr: addr.parse().unwrap(),
                port,
                cgroup: 0,
            },
            EndIdentity {
                service_name: name.into(),
                attributes: vec![
                    ("k8s.deployment.name".into(), name.into()),
                    ("k8s.pod.name".into(), pod.into()),
                ],
            },
        );
    }

    fn replicas_batch(links: Vec<(&str, LinkStats)>) -> LinkBatch {
        let mut batch = LinkBatch::new(SystemTime::UNIX_EPOCH);
        for (client, s) in links {
            let (key, _) = link(client, "10.1.0.6", false);
            batch.links.push((key, s));
        }
        named(&mut batch, "10.1.0.5", None, "web", "web-a");
        named(&mut batch, "10.1.0.7", None, "web", "web-b");
        named(&mut batch, "10.1.0.6", Some(80), "api", "api-a");
        batch
    }

    #[test]
    fn replicas_merge_into_one_continuous_workload_link() {
        let mut merger = WorkloadMerger::default();
        let mut batch = replicas_batch(vec![
            ("10.1.0.5", stats(2, 100, 1)),
            ("10.1.0.7", stats(3, 50, 0)),
        ]);
        merger.merge(&mut batch);
        assert_eq!(batch.links.len(), 1);
        let (key, s) = &batch.links[0];
        assert_eq!((s.opened, s.bytes_transmit, s.active), (5, 150, 1));
        assert!(batch.merged_by_workload);
        let (client, server) = batch.end_names(key);
        assert_eq!(
            (client.service_name.as_str(), server.service_name.as_str()),
            ("web", "api")
        );
        assert_eq!(
            client.attributes,
            vec![("k8s.deployment.name".to_string(), "web".to_string())]
        );

        // Replica b's link expired (pod gone); a keeps going: no reset, no double count.
        let mut batch = replicas_batch(vec![("10.1.0.5", stats(4, 130, 0))]);
        merger.merge(&mut batch);
        let (_, s) = &batch.links[0];
        assert_eq!((s.opened, s.bytes_transmit, s.active), (7, 180, 0));

        // Every member gone: the merged link ends too.
        let mut batch = replicas_batch(vec![]);
        merger.merge(&mut batch);
        assert!(batch.links.is_empty());
    }
}
