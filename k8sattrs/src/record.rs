//! The compact forms the reflector stores hold: of each watched object, only what the
//! index reads.
//!
//! A k8s-openapi `Pod` is 2.2 KB before any of its strings, and a cluster can have
//! 100,000 of them: pods are kept as [`PodRecord`]s (a couple of hundred bytes), the
//! owners of the owner chain as [`OwnerRecord`]s, and the strings that many records
//! repeat (namespaces, node names, owners, app names) are shared through an
//! [`Interner`]. Services, EndpointSlices and Nodes are few and keep their types, only
//! stripped ([`strip_service`], ...).
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    fmt,
    marker::PhantomData,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, NodeStatus, Pod, Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};
use kube::{
    Resource,
    api::{ObjectMeta, PartialObjectMeta},
    runtime::reflector::Lookup,
};

use crate::index::{
    INSTANCE_LABEL, NAME_LABEL, SERVICE_NAME_ANNOTATION, SERVICE_NAME_LABEL, Workload, WorkloadKind,
};

/// The interner looks for strings no record holds only once it holds this many.
const MIN_PRUNE_AT: usize = 1024;

/// One shared copy of each string that records repeat.
///
/// Strings no record holds any more (a deleted namespace, the ReplicaSet of an old
/// rollout) are dropped whenever the set has doubled since the last look, so it stays
/// within about twice what the stores use, whatever the API server sends.
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    prune_at: usize,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        if self.strings.len() >= self.prune_at.max(MIN_PRUNE_AT) {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.prune_at = self.strings.len() * 2;
            self.strings.shrink_to(self.prune_at.max(MIN_PRUNE_AT));
        }
        let shared: Arc<str> = Arc::from(s);
        self.strings.insert(shared.clone());
        shared
    }

    /// Strings held.
    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }
}

/// A pod's UID. The API server makes lowercase UUIDs: those are kept as their 16 bytes,
/// inline (as text they would cost 36 more on the heap); anything else is kept as sent.
/// Displays as it was sent.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Uid {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl Uid {
    pub fn new(text: &str) -> Uid {
        match uuid_bytes(text) {
            Some(bytes) => Uid::Uuid(bytes),
            None => Uid::Other(text.into()),
        }
    }
}

/// The bytes of a UUID in its canonical form (lowercase 8-4-4-4-12): only that form
/// displays back as it was written.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    if text.len() != 36 || [8, 13, 18, 23].iter().any(|&i| text[i] != b'-') {
        return None;
    }
    let mut digits = text.iter().filter(|&&c| c != b'-').map(|&c| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    });
    let mut bytes = [0u8; 16];
    for byte in &mut bytes {
        *byte = digits.next()?? << 4 | digits.next()??;
    }
    Some(bytes)
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uid::Uuid(bytes) => {
                for (i, byte) in bytes.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
            Uid::Other(text) => f.write_str(text),
        }
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// Where a pod is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Addresses {
    /// At its own addresses (`status.podIPs` and `status.podIP`, each once).
    Pod(Box<[IpAddr]>),
    /// On its node's network, where only the ports it declares tell it apart. Boxed:
    /// few pods are, and inline it would make every record 16 bytes larger.
    Host(Box<HostPorts>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPorts {
    /// `status.hostIP`.
    pub(crate) ip: Option<IpAddr>,
    /// The containers' `containerPort`s, sorted, each once.
    pub(crate) ports: Box<[u16]>,
}

/// What the index reads of a pod, and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// Empty when the API server sent none (the index then skips the pod).
    pub(crate) namespace: Arc<str>,
    /// Empty when the API server sent none (the index then skips the pod).
    pub(crate) name: Box<str>,
    pub(crate) uid: Uid,
    pub(crate) node: Option<Arc<str>>,
    /// The controller owner, when it is a workload kind.
    pub(crate) controller: Option<Workload>,
    /// The `service.name` the pod declares (annotation, then labels).
    pub(crate) declared_service_name: Option<Arc<str>>,
    pub(crate) addresses: Addresses,
    /// `metadata.deletionTimestamp` is set.
    pub(crate) deleting: bool,
}

impl PodRecord {
    /// The record of `pod`, with its repeated strings shared through `strings`.
    pub fn new(pod: Pod, strings: &mut Interner) -> PodRecord {
        let Pod {
            metadata,
            spec,
            status,
        } = pod;
        let status = status.unwrap_or_default();
        let spec = spec.unwrap_or_default();
        let addresses = if spec.host_network == Some(true) {
            let mut ports: Vec<u16> = spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect();
            ports.sort_unstable();
            ports.dedup();
            Addresses::Host(Box::new(HostPorts {
                ip: status.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
                ports: ports.into(),
            }))
        } else {
            let mut ips: Vec<IpAddr> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(status.pod_ip.as_deref())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            ips.sort_unstable();
            ips.dedup();
            Addresses::Pod(ips.into())
        };
        PodRecord {
            namespace: strings.intern(metadata.namespace.as_deref().unwrap_or_default()),
            controller: controller(&metadata, strings),
            declared_service_name: declared_service_name(&metadata).map(|n| strings.intern(n)),
            deleting: metadata.deletion_timestamp.is_some(),
            name: metadata.name.unwrap_or_default().into(),
            uid: Uid::new(metadata.uid.as_deref().unwrap_or_default()),
            node: spec.node_name.as_deref().map(|n| strings.intern(n)),
            addresses,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uid(&self) -> &Uid {
        &self.uid
    }

    /// The node the pod is scheduled on.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    pub fn host_network(&self) -> bool {
        matches!(self.addresses, Addresses::Host(_))
    }
}

/// Without sharing strings with other records (for tests and one-off conversions).
impl From<Pod> for PodRecord {
    fn from(pod: Pod) -> PodRecord {
        PodRecord::new(pod, &mut Interner::default())
    }
}

/// `Lookup` for a compact record of the kube resource `$resource`: kind, group, version
/// and plural are the resource's; the key is the record's namespace and name. No
/// resource version or UID: the watcher tracks versions itself and the store never reads
/// either, while a copy of each in every key would cost about 50 bytes an object.
macro_rules! lookup_as {
    ($resource:ty, $($record:tt)+) => {
        $($record)+ {
            type DynamicType = ();

            fn kind(dyntype: &()) -> Cow<'_, str> {
                <$resource as Resource>::kind(dyntype)
            }

            fn group(dyntype: &()) -> Cow<'_, str> {
                <$resource as Resource>::group(dyntype)
            }

            fn version(dyntype: &()) -> Cow<'_, str> {
                <$resource as Resource>::version(dyntype)
            }

            fn plural(dyntype: &()) -> Cow<'_, str> {
                <$resource as Resource>::plural(dyntype)
            }

            fn name(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(&self.name))
            }

            fn namespace(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(&self.namespace))
            }

            fn resource_version(&self) -> Option<Cow<'_, str>> {
                None
            }

            fn uid(&self) -> Option<Cow<'_, str>> {
                None
            }
        }
    };
}

lookup_as!(Pod, impl Lookup for PodRecord);

/// An intermediate owner of the owner chain (a ReplicaSet or a Job, `K`): its name and
/// its controller.
pub struct OwnerRecord<K> {
    pub(crate) namespace: Arc<str>,
    pub(crate) name: Arc<str>,
    pub(crate) controller: Option<Workload>,
    kind: PhantomData<fn() -> K>,
}

impl<K> OwnerRecord<K> {
    pub fn new(object: PartialObjectMeta<K>, strings: &mut Interner) -> OwnerRecord<K> {
        let meta = object.metadata;
        OwnerRecord {
            namespace: strings.intern(meta.namespace.as_deref().unwrap_or_default()),
            controller: controller(&meta, strings),
            name: meta.name.unwrap_or_default().into(),
            kind: PhantomData,
        }
    }
}

// By hand: derived impls would require `K` itself to be `Clone`, `PartialEq`, ...
impl<K> Clone for OwnerRecord<K> {
    fn clone(&self) -> Self {
        OwnerRecord {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            controller: self.controller.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> PartialEq for OwnerRecord<K> {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.name, &self.controller)
            == (&other.namespace, &other.name, &other.controller)
    }
}

impl<K> fmt::Debug for OwnerRecord<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnerRecord")
            .field("namespace", &&*self.namespace)
            .field("name", &&*self.name)
            .field("controller", &self.controller)
            .finish()
    }
}

lookup_as!(K, impl<K: Resource<DynamicType = ()>> Lookup for OwnerRecord<K>);

/// The object's controller, when it is a workload kind.
pub(crate) fn controller(meta: &ObjectMeta, strings: &mut Interner) -> Option<Workload> {
    let owner = meta
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    Some(Workload {
        kind: WorkloadKind::from_kind(&owner.kind)?,
        name: strings.intern(&owner.name),
    })
}

/// The `service.name` a pod declares, in the order OpenTelemetry's Kubernetes
/// conventions read: annotation `resource.opentelemetry.io/service.name`, then label
/// `app.kubernetes.io/instance`, then `app.kubernetes.io/name`.
fn declared_service_name(meta: &ObjectMeta) -> Option<&str> {
    let annotation = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_NAME_ANNOTATION));
    let label = |key| meta.labels.as_ref().and_then(|l| l.get(key));
    annotation
        .or_else(|| label(INSTANCE_LABEL))
        .or_else(|| label(NAME_LABEL))
        .map(String::as_str)
}

/// Only the name of an object, for what the index reads of Services, EndpointSlices
/// and Nodes.
fn bare_meta(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        ..Default::default()
    }
}

/// A Service's name, cluster IPs and node ports (status, annotations and managed fields
/// can be kilobytes).
pub fn strip_service(service: Service) -> Service {
    let spec = service.spec.map(|spec| {
        let node_ports: Vec<ServicePort> = spec
            .ports
            .into_iter()
            .flatten()
            .filter(|p| p.node_port.is_some())
            .map(|p| ServicePort {
                port: p.port,
                node_port: p.node_port,
                protocol: p.protocol,
                ..Default::default()
            })
            .collect();
        ServiceSpec {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            ports: (!node_ports.is_empty()).then_some(node_ports),
            ..Default::default()
        }
    });
    Service {
        metadata: bare_meta(service.metadata),
        spec,
        status: None,
    }
}

/// An EndpointSlice's Service and endpoint addresses.
pub fn strip_endpoint_slice(slice: EndpointSlice) -> EndpointSlice {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned();
    let mut metadata = bare_meta(slice.metadata);
    metadata.labels = service.map(|s| BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), s)]));
    EndpointSlice {
        metadata,
        address_type: slice.address_type,
        endpoints: slice
            .endpoints
            .into_iter()
            .map(|e| Endpoint {
                addresses: e.addresses,
                ..Default::default()
            })
            .collect(),
        ports: None,
    }
}

/// The node labels that place a node: its zone and region.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// A Node's name, addresses and zone and region labels (its status also lists every
/// image it holds; its other labels are not read).
pub fn strip_node(node: Node) -> Node {
    let labels: Option<std::collections::BTreeMap<String, String>> =
        node.metadata.labels.clone().and_then(|labels| {
            let kept: std::collections::BTreeMap<_, _> = labels
                .into_iter()
                .filter(|(key, _)| key == ZONE_LABEL || key == REGION_LABEL)
                .collect();
            (!kept.is_empty()).then_some(kept)
        });
    Node {
        metadata: ObjectMeta {
            labels,
            ..bare_meta(node.metadata)
        },
        spec: None,
        status: node.status.map(|status| NodeStatus {
            addresses: status.addresses,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a valid pod")
    }

    /// A hostNetwork pod keeps its host address and the ports its containers declare,
    /// and of its metadata only what names it; everything else is dropped.
    #[test]
    fn a_host_network_pod_keeps_its_ports_and_declared_name() {
        let record = PodRecord::from(pod(json!({
            "metadata": {
                "name": "agent-x", "namespace": "monitoring", "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"app.kubernetes.io/name": "by-label", "team": "infra"},
                "annotations": {SERVICE_NAME_ANNOTATION: "node-agent", "big": "x".repeat(1000)},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "n"},
                    {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "d",
                     "controller": true}],
                "managedFields": [{"manager": "kubelet"}]
            },
            "spec": {"nodeName": "node-1", "hostNetwork": true, "containers": [
                {"name": "agent", "image": "img", "ports": [
                    {"containerPort": 9100}, {"containerPort": 9101, "hostPort": 9101},
                    {"containerPort": 70000}]},
                {"name": "sidecar", "image": "img", "env": [{"name": "A", "value": "b"}]},
                {"name": "exporter", "image": "img", "ports": [{"containerPort": 9100}]}]},
            "status": {"phase": "Running", "hostIP": "192.0.2.10", "podIP": "192.0.2.10",
                       "podIPs": [{"ip": "192.0.2.10"}]}
        })));
        assert_eq!(
            record,
            PodRecord {
                namespace: "monitoring".into(),
                name: "agent-x".into(),
                uid: Uid::Other("u-1".into()),
                node: Some("node-1".into()),
                controller: Some(Workload {
                    kind: WorkloadKind::DaemonSet,
                    name: "agent".into()
                }),
                declared_service_name: Some("node-agent".into()),
                addresses: Addresses::Host(Box::new(HostPorts {
                    ip: Some("192.0.2.10".parse().unwrap()),
                    // 70000 is no port.
                    ports: vec![9100, 9101].into(),
                })),
                deleting: false,
            }
        );
        assert!(record.host_network());
    }

    /// A pod on its own network keeps each of its addresses once and no ports; labels
    /// name it when no annotation does.
    #[test]
    fn a_pod_keeps_its_addresses_and_no_ports() {
        let record = PodRecord::from(pod(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-2",
                         "deletionTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {"app.kubernetes.io/name": "by-name",
                                    "app.kubernetes.io/instance": "by-instance"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "web-7d9f", "uid": "r", "controller": true}]},
            "spec": {"containers": [{"name": "main", "ports": [{"containerPort": 8080}]}]},
            "status": {"podIP": "10.1.0.5", "hostIP": "192.0.2.10",
                       "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}, {"ip": "not an ip"}]}
        })));
        assert_eq!(
            record,
            PodRecord {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: Uid::Other("u-2".into()),
                node: None,
                controller: Some(Workload {
                    kind: WorkloadKind::ReplicaSet,
                    name: "web-7d9f".into()
                }),
                declared_service_name: Some("by-instance".into()),
                addresses: Addresses::Pod(
                    vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()].into()
                ),
                deleting: true,
            }
        );
    }

    /// What the API server may leave out does not panic: the record is empty, and the
    /// index skips it.
    #[test]
    fn an_empty_pod_gives_an_empty_record() {
        let record = PodRecord::from(Pod::default());
        assert_eq!(record.name(), "");
        assert_eq!(record.namespace(), "");
        assert_eq!(record.addresses, Addresses::Pod(Box::new([])));
        assert_eq!(Lookup::name(&record).as_deref(), Some(""));
    }

    #[test]
    fn uuids_are_kept_as_bytes_and_display_as_sent() {
        let uid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        let parsed = Uid::new(uid);
        assert_eq!(
            parsed,
            Uid::Uuid([
                0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x4a, 0x6b, 0x8c, 0x7d, 0x9e, 0x0f, 0x1a, 0x2b,
                0x3c, 0x4d
            ])
        );
        assert_eq!(parsed.to_string(), uid);
        for other in [
            uid.to_uppercase(),
            uid.replace('-', "_"),
            uid.replace('-', ""),
            format!("{uid}0"),
            "uid-web".into(),
            "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3cé".into(),
            "".into(),
        ] {
            assert_eq!(Uid::new(&other), Uid::Other(other.as_str().into()));
            assert_eq!(Uid::new(&other).to_string(), other);
        }
    }

    #[test]
    fn records_share_repeated_strings() {
        let mut strings = Interner::default();
        let replica = |i: usize| {
            pod(json!({
                "metadata": {"name": format!("web-{i}"), "namespace": "shop",
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": "web-7d9f", "uid": "r", "controller": true}]},
                "spec": {"nodeName": "node-1", "containers": []}
            }))
        };
        let a = PodRecord::new(replica(1), &mut strings);
        let b = PodRecord::new(replica(2), &mut strings);
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(
            a.node.as_ref().unwrap(),
            b.node.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            &a.controller.as_ref().unwrap().name,
            &b.controller.as_ref().unwrap().name
        ));
        assert_eq!(strings.len(), 3);
    }

    /// Strings no record holds any more are dropped once the set has grown enough.
    #[test]
    fn unused_strings_are_pruned() {
        let mut strings = Interner::default();
        let kept = strings.intern("kept");
        for i in 0..10 * MIN_PRUNE_AT {
            strings.intern(&format!("gone-{i}"));
        }
        assert!(strings.len() <= MIN_PRUNE_AT + 1, "{}", strings.len());
        assert!(Arc::ptr_eq(&kept, &strings.intern("kept")));
    }

    #[test]
    fn owners_keep_their_controller() {
        let rs: PartialObjectMeta<k8s_openapi::api::apps::v1::ReplicaSet> =
            serde_json::from_value(json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": "web-7d9f", "namespace": "shop", "labels": {"a": "b"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                  "name": "web", "uid": "d", "controller": true}]}
            }))
            .unwrap();
        let record = OwnerRecord::new(rs, &mut Interner::default());
        assert_eq!(&*record.name, "web-7d9f");
        assert_eq!(&*record.namespace, "shop");
        assert_eq!(
            record.controller,
            Some(Workload {
                kind: WorkloadKind::Deployment,
                name: "web".into()
            })
        );
    }

    #[test]
    fn services_slices_and_nodes_keep_what_the_index_reads() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"a": "x".repeat(100)}},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"port": 80}], "selector": {"app": "web"}},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        let service = strip_service(service);
        assert_eq!(service.metadata.annotations, None);
        let spec = service.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.cluster_ips.unwrap(), vec!["10.96.0.10".to_string()]);
        assert_eq!((spec.ports, spec.selector), (None, None));

        let node_port: Service = serde_json::from_value(json!({
            "metadata": {"name": "front", "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.30",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "nodePort": 30080, "protocol": "TCP"},
                               {"port": 9090}]}
        }))
        .unwrap();
        let spec = strip_service(node_port).spec.unwrap();
        assert_eq!(
            spec.ports,
            Some(vec![ServicePort {
                port: 80,
                node_port: Some(30080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }])
        );
        assert_eq!(spec.type_, None);

        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "web", "other": "x"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"], "nodeName": "node-1",
                           "conditions": {"ready": true}}],
            "ports": [{"port": 8080}]
        }))
        .unwrap();
        let slice = strip_endpoint_slice(slice);
        assert_eq!(
            slice.metadata.labels,
            Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), "web".into())]))
        );
        assert_eq!(
            slice.endpoints,
            vec![Endpoint {
                addresses: vec!["10.1.0.5".into()],
                ..Default::default()
            }]
        );
        assert_eq!(slice.ports, None);

        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-1", "labels": {"a": "b"}},
            "spec": {"podCIDR": "10.1.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}],
                       "images": [{"names": ["img"], "sizeBytes": 1}]}
        }))
        .unwrap();
        let node = strip_node(node);
        assert_eq!(node.metadata.name.as_deref(), Some("node-1"));
        assert_eq!(node.metadata.labels, None);
        assert_eq!(node.spec, None);
        let status = node.status.unwrap();
        assert_eq!(status.addresses.unwrap().len(), 1);
        assert_eq!(status.images, None);

        let zoned: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-2", "labels": {
                "a": "b", ZONE_LABEL: "eu-1a", REGION_LABEL: "eu-1"}},
        }))
        .unwrap();
        assert_eq!(
            strip_node(zoned).metadata.labels,
            Some(BTreeMap::from([
                (REGION_LABEL.into(), "eu-1".into()),
                (ZONE_LABEL.into(), "eu-1a".into())
            ]))
        );
    }
}
