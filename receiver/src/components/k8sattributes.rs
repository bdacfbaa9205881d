//! The `k8sattributes` processor: names both ends of every link by what they are in the
//! cluster (pod, workload, namespace, node; a ClusterIP by its backing workload), and
//! leaves each link to one node: a link this node saw only from the server's socket is
//! dropped when the client is a pod or node of the cluster, whose own node reports it.
//!
//! The index is rebuilt from the watch stores once per batch; nothing here waits on the
//! API server. Without a cluster the watches retry in the background and links keep
//! their addresses.
use std::{net::IpAddr, path::PathBuf};

use anyhow::Result;
use config::ComponentSection;
use ipnet::IpNet;
use k8sattrs::{Index, Watchers, attributes_of, rdns::ReverseDns, watch::ClientSource};
use serde::Deserialize;

use crate::{
    component::{BuildContext, Processor, key_error},
    model::{EndIdentity, EndRef, FastMap, IntervalActivity, LinkBatch, LinkKey, LinkStats, Peer},
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
const POD_LEVEL: &[&str] = &["k8s.pod.name", "k8s.pod.uid", "k8s.pod.ip", "k8s.node.name"];

/// Merges address-level links into workload-level links with continuous cumulative
/// series: each member link adds what it did since its previous state, so members
/// coming and going (pods replaced) never reset or double the merged counters. A named
/// end becomes a `Peer::Workload` (its identity without pod-level attributes); an
/// unnamed end keeps its address.
#[derive(Default)]
struct WorkloadMerger {
    /// Each member link's state at the previous batch.
    members: FastMap<LinkKey, LinkStats>,
    /// The merged links, keyed by workload (an index into `workloads`) or address.
    merged: FastMap<LinkKey, LinkStats>,
    /// The identities `Peer::Workload` indexes, and their index.
    workloads: Vec<EndIdentity>,
    workload_ids: FastMap<EndIdentity, u32>,
}

impl WorkloadMerger {
    fn peer(&mut self, identity: Option<&EndIdentity>, addr: Peer) -> Peer {
        let Some(identity) = identity else {
            return addr;
        };
        let workload = EndIdentity {
            service_name: identity.service_name.clone(),
            attributes: identity
                .attributes
                .iter()
                .filter(|(k, _)| !POD_LEVEL.contains(&k.as_str()))
                .cloned()
                .collect(),
        };
        if let Some(id) = self.workload_ids.get(&workload) {
            return Peer::Workload(*id);
        }
        let id = self.workloads.len() as u32;
        self.workloads.push(workload.clone());
        self.workload_ids.insert(workload, id);
        Peer::Workload(id)
    }

    fn merge(&mut self, batch: &mut LinkBatch) {
        let mut active: FastMap<LinkKey, u64> = FastMap::default();
        let mut intervals: FastMap<LinkKey, IntervalActivity> = FastMap::default();
        let mut members = FastMap::with_capacity_and_hasher(batch.links.len(), Default::default());
        for (key, stats) in std::mem::take(&mut batch.links) {
            let client = self.peer(batch.client_identity(&key), key.client);
            let server = self.peer(batch.server_identity(&key), key.server);
            let merged_key = LinkKey {
                client,
                server,
                // A workload client is one end whatever cgroup its replicas ran in.
                client_cgroup: if matches!(client, Peer::Workload(_)) {
                    0
                } else {
                    key.client_cgroup
                },
                ..key
            };
            self.merged
                .entry(merged_key)
                .or_insert_with(|| LinkStats::new(stats.start_time))
                .add_since(&stats, self.members.get(&key));
            *active.entry(merged_key).or_default() += stats.active;
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
        self.forget_unused_workloads();
        // Address ends keep what processors found out about them; workload ends are
        // named by the batch's `workloads`.
        batch.workloads = self.workloads.clone();
        for (key, stats) in &mut self.merged {
            stats.active = active.get(key).copied().unwrap_or(0);
            stats.interval = intervals.remove(key).unwrap_or_default();
            batch.links.push((*key, stats.clone()));
        }
        batch.links.sort_by_key(|(key, _)| *key);
    }

    /// Workloads no merged link names any more are dropped (and the rest renumbered),
    /// so the table follows the live links.
    fn forget_unused_workloads(&mut self) {
        let used = |peer: Peer| match peer {
            Peer::Workload(n) => Some(n),
            Peer::Address(_) => None,
        };
        let mut live: Vec<bool> = vec![false; self.workloads.len()];
        for key in self.merged.keys() {
            for n in [used(key.client), used(key.server)].into_iter().flatten() {
                live[n as usize] = true;
            }
        }
        if live.iter().all(|l| *l) {
            return;
        }
        let mut renumber = vec![0u32; self.workloads.len()];
        let mut kept = Vec::new();
        for (n, identity) in std::mem::take(&mut self.workloads).into_iter().enumerate() {
            if live[n] {
                renumber[n] = kept.len() as u32;
                kept.push(identity);
            }
        }
        let map = |peer: Peer| match peer {
            Peer::Workload(n) => Peer::Workload(renumber[n as usize]),
            other => other,
        };
        self.merged = std::mem::take(&mut self.merged)
            .into_iter()
            .map(|(key, stats)| {
                (
                    LinkKey {
                        client: map(key.client),
                        server: map(key.server),
                        ..key
                    },
                    stats,
                )
            })
            .collect();
        self.workload_ids = kept
            .iter()
            .enumerate()
            .map(|(n, identity)| (identity.clone(), n as u32))
            .collect();
        self.workloads = kept;
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
        let named = attributes_of(resolved, self.cluster, self.index.topology_of(resolved));
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
            .or_else(|| self.identity(key.client.address()?, None))
    }

    fn identity(&self, addr: IpAddr, port: Option<u16>) -> Option<EndIdentity> {
        if let Some(resolved) = self.index.resolve(addr, port) {
            let mut identity = self.named(&resolved);
            // One pod at its own address: the address is the pod's, which a collector's
            // k8sattributes processor associates by (the connection's peer is ridley).
            if let k8sattrs::Resolved::Pod(pod) = &resolved {
                if !pod.host_network {
                    identity
                        .attributes
                        .push(("k8s.pod.ip".to_owned(), addr.to_string()));
                }
            }
            return Some(identity);
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
            !(stats.reported_by_server
                && key
                    .client
                    .address()
                    .is_some_and(|client| index.is_cluster_member(client)))
        });
        let mut ends = Vec::new();
        for (key, _) in &batch.links {
            if let (Some(at), Some(client)) =
                (EndRef::client(key), self.client_identity(batch, key))
            {
                ends.push((at, client));
            }
            let server = key
                .server
                .address()
                .and_then(|addr| self.identity(addr, Some(key.server_port)));
            if let (Some(at), Some(server)) = (EndRef::server(key), server) {
                ends.push((at, server));
            }
            if let Some((addr, port)) = key.dialed {
                if let Some(service) = index.service_at(addr, port) {
                    batch
                        .dialed_services
                        .insert((addr, port), service.to_owned());
                }
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

    fn pod(name: &str, ip: &str) -> Arc<k8sattrs::PodRecord> {
        Arc::new(
            Pod {
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
            }
            .into(),
        )
    }

    fn link(client: &str, server: &str, by_server: bool) -> (LinkKey, LinkStats) {
        let mut stats = LinkStats::new(SystemTime::UNIX_EPOCH);
        stats.reported_by_server = by_server;
        (
            LinkKey::between(client.parse().unwrap(), server.parse().unwrap(), 80, 0),
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
        // Both ends are workloads in the key itself: no address stands for them.
        assert!(matches!(
            (key.client, key.server),
            (Peer::Workload(_), Peer::Workload(_))
        ));
        assert!(
            !crate::encode::link_attributes(key)
                .iter()
                .any(|kv| kv.key.ends_with(".address")),
        );
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

        // Every member gone: the merged link ends too, and so does the workload table.
        let mut batch = replicas_batch(vec![]);
        merger.merge(&mut batch);
        assert!(batch.links.is_empty());
        assert!(batch.workloads.is_empty());
    }
}
