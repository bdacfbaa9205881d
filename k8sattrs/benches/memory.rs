//! Memory of Kubernetes enrichment for N pods, and what naming one link end costs per
//! interval with and without zones (prints figures; asserts nothing).
//!
//! Feeds N realistic pods (env, resources, conditions, managed fields: what an API
//! server sends) and their ReplicaSets through the same compact records, string sharing
//! and kube-rs reflector stores the daemon uses, then builds the index, counting every
//! byte allocated. Run: `cargo bench -p k8sattrs --bench memory [-- PODS]` (10,000 pods
//! by default; the target is 500 B per pod in the stores and 60 MiB for 100,000 pods).
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Node, Pod},
};
use k8sattrs::{
    Index, PodRecord, Snapshot,
    index::Owners,
    record::{Interner, OwnerRecord},
};
use kube::{
    api::PartialObjectMeta,
    runtime::{reflector, watcher::Event},
};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn pod(i: usize, deployments: usize) -> Pod {
    let d = i % deployments;
    let env: Vec<_> = (0..10)
        .map(|k| serde_json::json!({"name": format!("VAR_{k}"), "value": "x".repeat(40)}))
        .collect();
    let conditions: Vec<_> = ["Ready", "Initialized", "PodScheduled", "ContainersReady"]
        .iter()
        .map(|t| serde_json::json!({"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("app{d}-7d9f8c6b5-{i:05}"), "namespace": format!("ns{}", d % 50),
            "uid": format!("6f1c2d3e-0000-4000-8000-{i:012}"), "resourceVersion": i.to_string(),
            "labels": {"app.kubernetes.io/name": format!("app{d}"), "pod-template-hash": "7d9f8c6b5", "team": "shop"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z", "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app{d}-7d9f8c6b5"),
                                 "uid": format!("rs-{d}"), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}}]
        },
        "spec": {"nodeName": format!("node-{}", i % 100), "serviceAccountName": "default", "containers": [{
            "name": "main", "image": format!("registry.example/app{d}:1.2.3"),
            "env": env,
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}}]},
        "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                   "hostIP": format!("192.0.2.{}", i % 100),
                   "conditions": conditions}
    }))
    .expect("a valid pod")
}

fn replicaset(d: usize) -> PartialObjectMeta<ReplicaSet> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": format!("app{d}-7d9f8c6b5"), "namespace": format!("ns{}", d % 50),
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": format!("app{d}"),
                                          "uid": format!("dep-{d}"), "controller": true}]}
    }))
    .expect("valid metadata")
}

fn node(n: usize) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{n}"), "labels": {
            "topology.kubernetes.io/zone": format!("zone-{}", n % 3),
            "topology.kubernetes.io/region": "region-1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{n}")}]}
    }))
    .expect("a valid node")
}

/// Mean time to resolve an address and build its end's attributes, as `k8sattributes`
/// does for every link end each interval, with the node's zone or without.
fn naming_cost(index: &Index, pods: usize, zones: bool) -> f64 {
    let addrs: Vec<std::net::IpAddr> = (0..pods.min(20_000))
        .map(|i| {
            format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
                .parse()
                .expect("an address")
        })
        .collect();
    let mut attributes = 0usize;
    let started = std::time::Instant::now();
    for _ in 0..5 {
        for addr in &addrs {
            let resolved = index.resolve(*addr, None).expect("a pod address");
            let topology = if zones {
                index.topology_of(&resolved)
            } else {
                None
            };
            attributes += k8sattrs::attributes_of(&resolved, Some("cluster"), topology)
                .attributes
                .len();
        }
    }
    std::hint::black_box(attributes);
    started.elapsed().as_nanos() as f64 / (5 * addrs.len()) as f64
}

fn main() {
    let pods: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let deployments = (pods / 10).max(1);

    let before = live();
    // The interners live as long as their watches: counted with the stores.
    let (mut pod_strings, mut rs_strings) = (Interner::default(), Interner::default());
    let (pod_store, mut pod_writer) = reflector::store::<PodRecord>();
    let (rs_store, mut rs_writer) = reflector::store::<OwnerRecord<ReplicaSet>>();
    for i in 0..pods {
        let record = PodRecord::new(pod(i, deployments), &mut pod_strings);
        pod_writer.apply_watcher_event(&Event::Apply(record));
    }
    for d in 0..deployments {
        let record = OwnerRecord::new(replicaset(d), &mut rs_strings);
        rs_writer.apply_watcher_event(&Event::Apply(record));
    }
    let stores = live() - before;

    let before_index = live();
    let mut owners = Owners::default();
    for rs in rs_store.state() {
        owners.add_record(&rs);
    }
    let snapshot = Snapshot {
        pods: pod_store.state(),
        owners,
        nodes: (0..100).map(|n| std::sync::Arc::new(node(n))).collect(),
        ..Default::default()
    };
    let index = Index::build(&snapshot);
    let with_index = live() - before_index;
    assert_eq!(index.pods(), pods);

    let mib = |b: isize| b as f64 / (1 << 20) as f64;
    println!("k8sattrs memory for {pods} pods, {deployments} Deployments (allocated bytes)");
    println!(
        "  reflector stores (pod records, ReplicaSet records)     {:7.1} MiB  {:5} B/pod",
        mib(stores),
        stores / pods as isize
    );
    println!(
        "  index built per interval (with its snapshot)           {:7.1} MiB  {:5} B/pod",
        mib(with_index),
        with_index / pods as isize
    );
    println!(
        "  total                                                  {:7.1} MiB",
        mib(stores + with_index)
    );
    let (plain, zoned) = (
        naming_cost(&index, pods, false),
        naming_cost(&index, pods, true),
    );
    println!(
        "  naming one link end (resolve + attributes), per interval  {plain:.0} ns; with its zone and region {zoned:.0} ns"
    );
    println!(
        "  (inline sizes: PodRecord {} B, where k8s-openapi's Pod is {} B; {} shared strings)",
        std::mem::size_of::<PodRecord>(),
        std::mem::size_of::<Pod>(),
        pod_strings.len() + rs_strings.len()
    );
}
