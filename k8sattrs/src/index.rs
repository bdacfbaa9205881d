//! The lookup from an address (and port) to what it is in the cluster, rebuilt from
//! the watched objects once per collection interval. Pure: no API calls here.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{ResourceExt, api::ObjectMeta};

use crate::record::{self, Addresses, Interner, OwnerRecord, PodRecord, Uid};

/// The annotation OpenTelemetry's Kubernetes conventions read first for `service.name`.
pub const SERVICE_NAME_ANNOTATION: &str = "resource.opentelemetry.io/service.name";
pub(crate) const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub(crate) const NAME_LABEL: &str = "app.kubernetes.io/name";
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A workload kind, named as OpenTelemetry's `k8s.<kind>.name` attributes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    pub(crate) fn from_kind(kind: &str) -> Option<Self> {
        Some(match kind {
            "Deployment" => WorkloadKind::Deployment,
            "ReplicaSet" => WorkloadKind::ReplicaSet,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "Job" => WorkloadKind::Job,
            "CronJob" => WorkloadKind::CronJob,
            _ => return None,
        })
    }

    /// The attribute key: `k8s.deployment.name`, ...
    pub fn attribute(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::ReplicaSet => "k8s.replicaset.name",
            WorkloadKind::StatefulSet => "k8s.statefulset.name",
            WorkloadKind::DaemonSet => "k8s.daemonset.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
        }
    }
}

/// A workload; its name is shared by every replica's record and every index entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: Arc<str>,
}

/// A pod as the index resolves it: its record, and what its owner chain makes of it.
///
/// The record is shared with the reflector store rather than copied, so that an index
/// entry costs tens of bytes, not the pod's strings again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pod: Arc<PodRecord>,
    pub workload: Option<Workload>,
    /// Derived as OpenTelemetry's Kubernetes conventions say: annotation
    /// `resource.opentelemetry.io/service.name`, then label `app.kubernetes.io/instance`,
    /// then `app.kubernetes.io/name`, then the workload's name, then the pod's.
    pub service_name: Arc<str>,
    pub host_network: bool,
    /// Being deleted: still resolvable, since connections outlive pods briefly.
    pub deleting: bool,
}

impl PodInfo {
    pub fn namespace(&self) -> &str {
        self.pod.namespace()
    }

    pub fn name(&self) -> &str {
        self.pod.name()
    }

    pub fn uid(&self) -> &Uid {
        self.pod.uid()
    }

    /// The node the pod is scheduled on.
    pub fn node(&self) -> Option<&str> {
        self.pod.node()
    }
}

/// What an address turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Pod(Arc<PodInfo>),
    /// A Service's ClusterIP whose endpoints all belong to one workload: the workload.
    Workload {
        namespace: String,
        workload: Workload,
        service_name: String,
        via_service: String,
    },
    /// A Service's ClusterIP with no single backing workload.
    Service {
        namespace: String,
        name: String,
    },
    /// A node's address, with no pod of its own listening on the port.
    Node {
        name: String,
    },
}

/// Owners of ReplicaSets and Jobs (for the Deployment and CronJob above them).
#[derive(Default)]
pub struct Owners {
    /// (namespace, ReplicaSet or Job name) -> its controller workload.
    by_name: HashMap<(Arc<str>, Arc<str>), Workload>,
}

impl Owners {
    /// Records an intermediate owner (ReplicaSet, Job) from its metadata.
    pub fn add(&mut self, meta: &ObjectMeta) {
        let strings = &mut Interner::default();
        if let (Some(ns), Some(name), Some(owner)) = (
            &meta.namespace,
            &meta.name,
            record::controller(meta, strings),
        ) {
            self.by_name
                .insert((ns.as_str().into(), name.as_str().into()), owner);
        }
    }

    /// Records an intermediate owner (ReplicaSet, Job) from its reflector record.
    pub fn add_record<K>(&mut self, owner: &OwnerRecord<K>) {
        if let Some(controller) = &owner.controller {
            self.by_name.insert(
                (owner.namespace.clone(), owner.name.clone()),
                controller.clone(),
            );
        }
    }
}

/// The pod's top-level workload: ReplicaSet -> Deployment, Job -> CronJob.
fn workload_of(pod: &PodRecord, owners: &Owners) -> Option<Workload> {
    let direct = pod.controller.as_ref()?;
    match direct.kind {
        WorkloadKind::ReplicaSet | WorkloadKind::Job => Some(
            owners
                .by_name
                .get(&(pod.namespace.clone(), direct.name.clone()))
                .unwrap_or(direct)
                .clone(),
        ),
        _ => Some(direct.clone()),
    }
}

fn ips(list: impl IntoIterator<Item = Option<String>>) -> impl Iterator<Item = IpAddr> {
    list.into_iter().flatten().filter_map(|ip| ip.parse().ok())
}

/// Everything the index is built from: the reflector stores' current contents.
#[derive(Default)]
pub struct Snapshot {
    pub pods: Vec<Arc<PodRecord>>,
    pub owners: Owners,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
}

#[derive(Default)]
pub struct Index {
    pods_by_ip: HashMap<IpAddr, Arc<PodInfo>>,
    /// By UUID: the UIDs a cgroup path can name.
    pods_by_uid: HashMap<[u8; 16], Arc<PodInfo>>,
    /// hostNetwork pods share their node's address: told apart by the ports they declare.
    host_pods_by_port: HashMap<(IpAddr, u16), Arc<PodInfo>>,
    nodes_by_ip: HashMap<IpAddr, String>,
    /// Nodes with a zone or region label, by name.
    topology_by_node: HashMap<String, Topology>,
    services_by_ip: HashMap<IpAddr, Resolved>,
    /// Services by TCP node port: one port opens the Service on every node's addresses.
    services_by_node_port: HashMap<u16, String>,
}

/// Where a node is: its `topology.kubernetes.io/zone` and `/region` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    pub zone: Option<String>,
    pub region: Option<String>,
}

impl Index {
    pub fn build(snapshot: &Snapshot) -> Index {
        let mut index = Index::default();
        for node in &snapshot.nodes {
            let name = node.name_any();
            let label = |key: &str| {
                let labels = node.metadata.labels.as_ref()?;
                labels.get(key).filter(|v| !v.is_empty()).cloned()
            };
            let topology = Topology {
                zone: label(record::ZONE_LABEL),
                region: label(record::REGION_LABEL),
            };
            if topology != Topology::default() {
                index.topology_by_node.insert(name.clone(), topology);
            }
            let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
            for addr in addresses.into_iter().flatten() {
                if let Ok(ip) = addr.address.parse() {
                    index.nodes_by_ip.insert(ip, name.clone());
                }
            }
        }
        for pod in &snapshot.pods {
            let Some(info) = pod_info(pod, &snapshot.owners) else {
                continue;
            };
            let info = Arc::new(info);
            if let Uid::Uuid(uid) = pod.uid {
                index.pods_by_uid.insert(uid, info.clone());
            }
            match &pod.addresses {
                Addresses::Host(host) => {
                    if let Some(ip) = host.ip {
                        for &port in host.ports.iter() {
                            index.host_pods_by_port.insert((ip, port), info.clone());
                        }
                    }
                }
                Addresses::Pod(ips) => {
                    for &ip in ips.iter() {
                        // An address reused by a new pod while the old one terminates
                        // belongs to the new one.
                        let keep_existing = index
                            .pods_by_ip
                            .get(&ip)
                            .is_some_and(|existing| !existing.deleting && info.deleting);
                        if !keep_existing {
                            index.pods_by_ip.insert(ip, info.clone());
                        }
                    }
                }
            }
        }
        index.index_services(snapshot);
        index
    }
    fn index_services(&mut self, snapshot: &Snapshot) {
        // (namespace, service) -> workloads behind its endpoints.
        let mut backends: HashMap<(String, String), BTreeSet<Workload>> = HashMap::new();
        let mut service_names: HashMap<(String, String), Arc<str>> = HashMap::new();
        let mut unresolved: BTreeSet<(String, String)> = BTreeSet::new();
        for slice in &snapshot.endpoint_slices {
            let namespace = slice.namespace().unwrap_or_default();
            let Some(service) = slice.labels().get(SERVICE_NAME_LABEL).cloned() else {
                continue;
            };
            let key = (namespace, service);
            for endpoint in &slice.endpoints {
                for ip in ips(endpoint.addresses.iter().map(|a| Some(a.clone()))) {
                    match self
                        .pods_by_ip
                        .get(&ip)
                        .and_then(|p| p.workload.clone().map(|w| (p, w)))
                    {
                        Some((pod, workload)) => {
                            service_names.insert(key.clone(), pod.service_name.clone());
                            backends.entry(key.clone()).or_default().insert(workload);
                        }
                        None => {
                            unresolved.insert(key.clone());
                        }
                    }
                }
            }
        }
        for service in &snapshot.services {
            let namespace = service.namespace().unwrap_or_default();
            let name = service.name_any();
            let Some(spec) = &service.spec else { continue };
            let cluster_ips = spec
                .cluster_ips
                .iter()
                .flatten()
                .cloned()
                .map(Some)
                .chain(std::iter::once(spec.cluster_ip.clone()));
            let key = (namespace.clone(), name.clone());
            let single = backends
                .get(&key)
                .filter(|set| set.len() == 1 && !unresolved.contains(&key))
                .and_then(|set| set.iter().next().cloned());
            let resolved = match single {
                Some(workload) => Resolved::Workload {
                    namespace: namespace.clone(),
                    service_name: service_names
                        .get(&key)
                        .unwrap_or(&workload.name)
                        .to_string(),
                    workload,
                    via_service: name.clone(),
                },
                None => Resolved::Service {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
            };
            for ip in ips(cluster_ips) {
                self.services_by_ip.insert(ip, resolved.clone());
            }
            let tcp_node_ports = spec.ports.iter().flatten().filter(|p| {
                p.protocol
                    .as_deref()
                    .is_none_or(|protocol| protocol == "TCP")
            });
            for port in tcp_node_ports {
                if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                    self.services_by_node_port.insert(node_port, name.clone());
                }
            }
        }
    }

    /// The name of the Service a client dialled at `addr`:`port`: the Service whose
    /// ClusterIP `addr` is, or, at a node's address, the Service with that node port.
    pub fn service_at(&self, addr: IpAddr, port: u16) -> Option<&str> {
        match self.services_by_ip.get(&addr) {
            Some(Resolved::Workload { via_service, .. }) => Some(via_service),
            Some(Resolved::Service { name, .. }) => Some(name),
            Some(_) => None,
            None if self.nodes_by_ip.contains_key(&addr) => {
                self.services_by_node_port.get(&port).map(String::as_str)
            }
            None => None,
        }
    }

    /// What `addr` is; `port` is the server port when `addr` is a server end (it tells
    /// hostNetwork pods on one node apart).
    pub fn resolve(&self, addr: IpAddr, port: Option<u16>) -> Option<Resolved> {
        if let Some(pod) = self.pods_by_ip.get(&addr) {
            return Some(Resolved::Pod(pod.clone()));
        }
        if let Some(service) = self.services_by_ip.get(&addr) {
            return Some(service.clone());
        }
        if let Some(port) = port {
            if let Some(pod) = self.host_pods_by_port.get(&(addr, port)) {
                return Some(Resolved::Pod(pod.clone()));
            }
        }
        self.nodes_by_ip
            .get(&addr)
            .map(|name| Resolved::Node { name: name.clone() })
    }

    /// The zone and region of the node an end runs on (a pod's node, or the node
    /// itself); none for a Service or a workload behind one (its pods may be anywhere).
    pub fn topology_of(&self, resolved: &Resolved) -> Option<&Topology> {
        let node = match resolved {
            Resolved::Pod(pod) => pod.node()?,
            Resolved::Node { name } => name,
            Resolved::Workload { .. } | Resolved::Service { .. } => return None,
        };
        self.topology_by_node.get(node)
    }

    /// The pod whose UID appears in a cgroup path (`.../pod<uid>/...`, or the systemd
    /// driver's `...-pod<uid with _>.slice/...`): how a client in the host's network
    /// namespace is told apart from its node.
    pub fn resolve_cgroup(&self, path: &str) -> Option<Resolved> {
        let Uid::Uuid(uid) = Uid::new(&pod_uid_in_cgroup(path)?) else {
            return None;
        };
        self.pods_by_uid
            .get(&uid)
            .map(|pod| Resolved::Pod(pod.clone()))
    }

    /// A pod (not on the host network) or a node of the cluster: an address whose node
    /// runs ridley and reports the connections it opens.
    pub fn is_cluster_member(&self, addr: IpAddr) -> bool {
        self.pods_by_ip.contains_key(&addr) || self.nodes_by_ip.contains_key(&addr)
    }

    pub fn pods(&self) -> usize {
        self.pods_by_ip.len() + self.host_pods_by_port.len()
    }
}

/// The pod UID in a kubelet cgroup path, in its canonical dashed form.
pub fn pod_uid_in_cgroup(path: &str) -> Option<String> {
    let mut rest = path;
    while let Some(at) = rest.find("pod") {
        let candidate = &rest[at + 3..];
        if candidate.len() >= 36 {
            let uid = &candidate[..36];
            let shaped = uid.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-' || c == '_',
                _ => c.is_ascii_hexdigit(),
            });
            if shaped {
                return Some(uid.replace('_', "-"));
            }
        }
        rest = &rest[at + 3..];
    }
    None
}

fn pod_info(pod: &Arc<PodRecord>, owners: &Owners) -> Option<PodInfo> {
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return None;
    }
    let workload = workload_of(pod, owners);
    let service_name = match (&pod.declared_service_name, &workload) {
        (Some(declared), _) => declared.clone(),
        (None, Some(workload)) => workload.name.clone(),
        // The one string of the index not shared with a record: pods with neither a
        // declared name nor a workload are few.
        (None, None) => pod.name().into(),
    };
    Some(PodInfo {
        pod: pod.clone(),
        workload,
        service_name,
        host_network: pod.host_network(),
        deleting: pod.deleting,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                Container, ContainerPort, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus,
                ServicePort, ServiceSpec,
            },
            discovery::v1::Endpoint,
        },
        apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    };

    use super::*;

    fn meta(namespace: &str, name: &str, owner: Option<(&str, &str)>) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            owner_references: owner.map(|(kind, name)| {
                vec![OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller: Some(true),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }
    }

    fn pod(name: &str, ip: &str, owner: Option<(&str, &str)>) -> Pod {
        Pod {
            metadata: meta("shop", name, owner),
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                host_ip: Some("192.0.2.10".into()),
                ..Default::default()
            }),
        }
    }

    fn snapshot(pods: Vec<Pod>) -> Snapshot {
        let mut owners = Owners::default();
        owners.add(&meta(
            "shop",
            "checkout-7d9f",
            Some(("Deployment", "checkout")),
        ));
        owners.add(&meta("shop", "report-28000", Some(("CronJob", "report"))));
        Snapshot {
            pods: pods
                .into_iter()
                .map(|p| Arc::new(PodRecord::from(p)))
                .collect(),
            owners,
            nodes: vec![Arc::new(Node {
                metadata: meta("", "node-1", None),
                status: Some(NodeStatus {
                    addresses: Some(vec![NodeAddress {
                        address: "192.0.2.10".into(),
                        type_: "InternalIP".into(),
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            })],
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod_of(r: Option<Resolved>) -> Arc<PodInfo> {
        match r {
            Some(Resolved::Pod(p)) => p,
            other => panic!("expected a pod, got {other:?}"),
        }
    }

    #[test]
    fn owner_chain_and_service_name() {
        let index = Index::build(&snapshot(vec![
            pod(
                "checkout-7d9f-abcde",
                "10.1.0.5",
                Some(("ReplicaSet", "checkout-7d9f")),
            ),
            pod(
                "report-28000-xyz",
                "10.1.0.6",
                Some(("Job", "report-28000")),
            ),
            pod("db-0", "10.1.0.7", Some(("StatefulSet", "db"))),
            pod("lonely", "10.1.0.8", None),
        ]));
        let checkout = pod_of(index.resolve(ip("10.1.0.5"), None));
        assert_eq!(
            checkout.workload,
            Some(Workload {
                kind: WorkloadKind::Deployment,
                name: "checkout".into()
            })
        );
        assert_eq!(&*checkout.service_name, "checkout");
        assert_eq!(checkout.node(), Some("node-1"));
        assert_eq!(
            (
                checkout.namespace(),
                checkout.name(),
                &*checkout.uid().to_string()
            ),
            ("shop", "checkout-7d9f-abcde", "uid-checkout-7d9f-abcde")
        );
        let report = pod_of(index.resolve(ip("10.1.0.6"), None));
        assert_eq!(
            report.workload.as_ref().unwrap().kind,
            WorkloadKind::CronJob
        );
        assert_eq!(
            &*pod_of(index.resolve(ip("10.1.0.7"), None)).service_name,
            "db"
        );
        assert_eq!(
            &*pod_of(index.resolve(ip("10.1.0.8"), None)).service_name,
            "lonely"
        );
        assert_eq!(
            index.resolve(ip("192.0.2.10"), Some(22)),
            Some(Resolved::Node {
                name: "node-1".into()
            })
        );
        assert_eq!(index.resolve(ip("203.0.113.1"), None), None);
        assert!(index.is_cluster_member(ip("10.1.0.5")));
        assert!(!index.is_cluster_member(ip("203.0.113.1")));
    }

    #[test]
    fn pods_are_found_from_their_cgroup_path() {
        let uid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        assert_eq!(
            pod_uid_in_cgroup(&format!("/kubepods/besteffort/pod{uid}/abc123")).as_deref(),
            Some(uid)
        );
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_in_cgroup(&systemd).as_deref(), Some(uid));
        assert_eq!(pod_uid_in_cgroup("/system.slice/sshd.service"), None);

        let mut agent = pod("agent-x", "192.0.2.10", Some(("DaemonSet", "agent")));
        agent.metadata.uid = Some(uid.into());
        agent.spec.as_mut().unwrap().host_network = Some(true);
        let index = Index::build(&snapshot(vec![agent]));
        assert_eq!(
            &*pod_of(index.resolve_cgroup(&systemd)).service_name,
            "agent"
        );
        assert_eq!(
            index.resolve_cgroup("/kubepods/besteffort/pod0a1b2c3d-0000-4a6b-8c7d-9e0f1a2b3c4d/x"),
            None
        );
    }

    #[test]
    fn service_name_prefers_annotation_then_labels_then_workload() {
        let mut p = pod("web-1", "10.1.0.5", Some(("StatefulSet", "web")));
        let name_of = |p: &Pod| {
            let index = Index::build(&snapshot(vec![p.clone()]));
            pod_of(index.resolve(ip("10.1.0.5"), None))
                .service_name
                .to_string()
        };
        assert_eq!(name_of(&p), "web");
        p.metadata.labels = Some(BTreeMap::from([(NAME_LABEL.into(), "by-name".into())]));
        assert_eq!(name_of(&p), "by-name");
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(INSTANCE_LABEL.into(), "by-instance".into());
        assert_eq!(name_of(&p), "by-instance");
        p.metadata.annotations = Some(BTreeMap::from([(
            SERVICE_NAME_ANNOTATION.into(),
            "annotated".into(),
        )]));
        assert_eq!(name_of(&p), "annotated");
    }

    #[test]
    fn pods_without_a_name_or_namespace_are_skipped() {
        let mut unnamed = pod("x", "10.1.0.5", None);
        unnamed.metadata.name = None;
        let mut nowhere = pod("y", "10.1.0.6", None);
        nowhere.metadata.namespace = None;
        let index = Index::build(&snapshot(vec![unnamed, nowhere]));
        assert_eq!(index.pods(), 0);
    }

    #[test]
    fn host_network_pods_are_told_apart_by_port() {
        let mut agent = pod("agent-x", "192.0.2.10", Some(("DaemonSet", "agent")));
        let spec = agent.spec.as_mut().unwrap();
        spec.host_network = Some(true);
        spec.containers = vec![Container {
            name: "agent".into(),
            ports: Some(vec![ContainerPort {
                container_port: 9100,
                ..Default::default()
            }]),
            ..Default::default()
        }];
        let index = Index::build(&snapshot(vec![agent]));
        assert_eq!(
            &*pod_of(index.resolve(ip("192.0.2.10"), Some(9100))).service_name,
            "agent"
        );
        assert_eq!(
            index.resolve(ip("192.0.2.10"), Some(22)),
            Some(Resolved::Node {
                name: "node-1".into()
            })
        );
    }

    /// A pod's end carries its node's zone and region, a node's end its own; a node
    /// without the labels adds nothing, and the labels survive the record stripping.
    #[test]
    fn ends_are_placed_in_their_nodes_zone_and_region() {
        let mut snap = snapshot(vec![
            pod(
                "checkout-7d9f-x1",
                "10.0.0.5",
                Some(("ReplicaSet", "checkout-7d9f")),
            ),
            {
                let mut other = pod("cart-1", "10.0.0.6", None);
                other.spec.as_mut().unwrap().node_name = Some("node-2".into());
                other
            },
        ]);
        let labelled = Node {
            metadata: ObjectMeta {
                labels: Some(
                    [
                        (record::ZONE_LABEL.to_owned(), "eu-west-1a".to_owned()),
                        (record::REGION_LABEL.to_owned(), "eu-west-1".to_owned()),
                        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ]
                    .into(),
                ),
                ..snap.nodes[0].metadata.clone()
            },
            ..(*snap.nodes[0]).clone()
        };
        let stripped = record::strip_node(labelled);
        assert_eq!(stripped.metadata.labels.as_ref().map(|l| l.len()), Some(2));
        snap.nodes = vec![Arc::new(stripped)];
        let index = Index::build(&snap);
        let placed = Topology {
            zone: Some("eu-west-1a".into()),
            region: Some("eu-west-1".into()),
        };
        let resolved = index.resolve(ip("10.0.0.5"), None).unwrap();
        assert_eq!(index.topology_of(&resolved), Some(&placed));
        let named = crate::attributes_of(&resolved, None, index.topology_of(&resolved));
        let cloud: Vec<_> = named
            .attributes
            .iter()
            .filter(|(k, _)| k.starts_with("cloud."))
            .collect();
        assert_eq!(
            cloud,
            [
                &(
                    "cloud.availability_zone".to_owned(),
                    "eu-west-1a".to_owned()
                ),
                &("cloud.region".to_owned(), "eu-west-1".to_owned())
            ]
        );
        let node = index.resolve(ip("192.0.2.10"), Some(22)).unwrap();
        assert_eq!(index.topology_of(&node), Some(&placed));
        // node-2 has no Node object, so no labels.
        let elsewhere = index.resolve(ip("10.0.0.6"), None).unwrap();
        assert_eq!(index.topology_of(&elsewhere), None);
    }

    #[test]
    fn a_new_pod_wins_an_address_from_a_terminating_one() {
        let mut old = pod("old", "10.1.0.9", None);
        old.metadata.deletion_timestamp = Some(Time(Default::default()));
        let new = pod("new", "10.1.0.9", None);
        for pods in [vec![old.clone(), new.clone()], vec![new, old.clone()]] {
            let index = Index::build(&snapshot(pods));
            assert_eq!(pod_of(index.resolve(ip("10.1.0.9"), None)).name(), "new");
        }
        // Alone, a terminating pod still resolves: its connections outlive it briefly.
        let index = Index::build(&snapshot(vec![old]));
        assert!(pod_of(index.resolve(ip("10.1.0.9"), None)).deleting);
    }

    fn service(name: &str, cluster_ip: &str) -> Arc<Service> {
        Arc::new(Service {
            metadata: meta("shop", name, None),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn slice(service: &str, addresses: &[&str]) -> Arc<EndpointSlice> {
        let mut m = meta("shop", &format!("{service}-abc"), None);
        m.labels = Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.into(),
            service.into(),
        )]));
        Arc::new(EndpointSlice {
            metadata: m,
            address_type: "IPv4".into(),
            endpoints: addresses
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.to_string()],
                    ..Default::default()
                })
                .collect(),
            ports: None,
        })
    }

    #[test]
    fn a_node_port_dialled_at_a_node_address_names_its_service() {
        let mut snap = snapshot(vec![]);
        let node_port = |node_port, protocol: Option<&str>| ServicePort {
            port: 80,
            node_port: Some(node_port),
            protocol: protocol.map(str::to_owned),
            ..Default::default()
        };
        let mut front = (*service("front", "10.96.0.30")).clone();
        if let Some(spec) = front.spec.as_mut() {
            spec.ports = Some(vec![node_port(30080, None), node_port(30053, Some("UDP"))]);
        }
        snap.services = vec![Arc::new(front), service("checkout", "10.96.0.10")];
        let index = Index::build(&snap);
        // At the node's address (192.0.2.10), by node port; TCP only.
        assert_eq!(index.service_at(ip("192.0.2.10"), 30080), Some("front"));
        assert_eq!(index.service_at(ip("192.0.2.10"), 30053), None);
        assert_eq!(index.service_at(ip("192.0.2.10"), 30081), None);
        // Not at an address that is no node's.
        assert_eq!(index.service_at(ip("192.0.2.11"), 30080), None);
        // A ClusterIP names its Service whatever the port.
        assert_eq!(index.service_at(ip("10.96.0.30"), 80), Some("front"));
        assert_eq!(index.service_at(ip("10.96.0.10"), 8080), Some("checkout"));
    }

    #[test]
    fn cluster_ip_resolves_to_its_single_backing_workload_else_the_service() {
        let mut snap = snapshot(vec![
            pod(
                "checkout-7d9f-a",
                "10.1.0.5",
                Some(("ReplicaSet", "checkout-7d9f")),
            ),
            pod(
                "checkout-7d9f-b",
                "10.1.0.15",
                Some(("ReplicaSet", "checkout-7d9f")),
            ),
            pod("db-0", "10.1.0.7", Some(("StatefulSet", "db"))),
        ]);
        snap.services = vec![
            service("checkout", "10.96.0.10"),
            service("mixed", "10.96.0.11"),
        ];
        snap.endpoint_slices = vec![
            slice("checkout", &["10.1.0.5", "10.1.0.15"]),
            slice("mixed", &["10.1.0.5", "10.1.0.7"]),
        ];
        let index = Index::build(&snap);
        assert_eq!(
            index.resolve(ip("10.96.0.10"), Some(80)),
            Some(Resolved::Workload {
                namespace: "shop".into(),
                workload: Workload {
                    kind: WorkloadKind::Deployment,
                    name: "checkout".into()
                },
                service_name: "checkout".into(),
                via_service: "checkout".into(),
            })
        );
        assert_eq!(
            index.resolve(ip("10.96.0.11"), Some(80)),
            Some(Resolved::Service {
                namespace: "shop".into(),
                name: "mixed".into()
            })
        );
    }
}
