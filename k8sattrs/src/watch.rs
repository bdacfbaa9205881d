//! kube-rs reflectors for the objects that name an address: Pods, ReplicaSets and Jobs
//! (metadata only, for the owner chain), Services, EndpointSlices and Nodes.
//!
//! Watches, not snapshots: each reflector lists once and then follows changes, relisting
//! on its own after a `410 Gone` or a dropped stream. Errors never reach the data path:
//! the stores keep their last state, the watcher retries with backoff, and the failure
//! is logged and counted ([`WatchHealth`]).
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{Container, Node, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    api::PartialObjectMeta,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};

use crate::index::{Owners, SERVICE_NAME_ANNOTATION, Snapshot};

/// Watch failures, for logs and self-telemetry.
#[derive(Debug, Default)]
pub struct WatchHealth {
    errors: AtomicU64,
    failing: Mutex<BTreeSet<&'static str>>,
}

impl WatchHealth {
    /// Watch errors since start (each retried).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Resources whose watch is failing right now.
    pub fn failing(&self) -> Vec<&'static str> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    fn error(&self, resource: &'static str, error: &watcher::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.insert(resource) {
            tracing::warn!(
                resource,
                "watch failing, serving the last known state and retrying: {error}"
            );
        }
    }

    fn ok(&self, resource: &'static str) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.remove(resource) {
            tracing::info!(resource, "watch recovered");
        }
    }
}

/// Read handles on every reflector store.
#[derive(Clone)]
pub struct Watchers {
    pods: Store<Pod>,
    replicasets: Store<PartialObjectMeta<ReplicaSet>>,
    jobs: Store<PartialObjectMeta<Job>>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pub health: Arc<WatchHealth>,
}

/// Where the API server is: a kubeconfig file, or inferred (in-cluster service
/// account, then `$KUBECONFIG` / `~/.kube/config`).
#[derive(Clone, Debug, Default)]
pub struct ClientSource {
    pub kubeconfig: Option<PathBuf>,
}

impl ClientSource {
    async fn client(&self) -> anyhow::Result<Client> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
            }
            None => Config::infer().await?,
        };
        Ok(Client::try_from(config)?)
    }
}

/// Drops what the index never reads, so that a pod costs a few hundred bytes.
fn strip_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k == SERVICE_NAME_ANNOTATION);
    }
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == "app.kubernetes.io/instance" || k == "app.kubernetes.io/name");
    }
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .filter(|c| c.ports.is_some())
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            ..Default::default()
        });
    }
}

async fn drive<S, T>(resource: &'static str, stream: S, health: Arc<WatchHealth>)
where
    S: Stream<Item = Result<T, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => health.ok(resource),
            Err(e) => health.error(resource, &e),
        }
    }
}

impl Watchers {
    /// Starts every watch in the background and returns at once: until the stores are
    /// filled, addresses stay unresolved. A client that cannot be built (no cluster
    /// reachable) is retried with backoff, like a failing watch.
    pub fn start(source: ClientSource) -> Watchers {
        let (pods, pods_w) = reflector::store();
        let (replicasets, replicasets_w) = reflector::store();
        let (jobs, jobs_w) = reflector::store();
        let (services, services_w) = reflector::store();
        let (endpoint_slices, slices_w) = reflector::store();
        let (nodes, nodes_w) = reflector::store();
        let health = Arc::new(WatchHealth::default());
        let watchers = Watchers {
            pods,
            replicasets,
            jobs,
            services,
            endpoint_slices,
            nodes,
            health: health.clone(),
        };
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            let client = loop {
                match source.client().await {
                    Ok(client) => break client,
                    Err(e) => {
                        health.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("Kubernetes client: {e:#}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(60));
                    }
                }
            };
            let config = watcher::Config::default;
            tokio::spawn(drive(
                "pods",
                watcher(Api::<Pod>::all(client.clone()), config())
                    .default_backoff()
                    .modify(strip_pod)
                    .reflect(pods_w),
                health.clone(),
            ));
            tokio::spawn(drive(
                "replicasets",
                watcher(
                    Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
                    config(),
                )
                .default_backoff()
                .modify(|m| m.metadata.managed_fields = None)
                .reflect(replicasets_w),
                health.clone(),
            ));
            tokio::spawn(drive(
                "jobs",
                watcher(Api::<PartialObjectMeta<Job>>::all(client.clone()), config())
                    .default_backoff()
                    .modify(|m| m.metadata.managed_fields = None)
                    .reflect(jobs_w),
                health.clone(),
            ));
            tokio::spawn(drive(
                "services",
                watcher(Api::<Service>::all(client.clone()), config())
                    .default_backoff()
                    .reflect(services_w),
                health.clone(),
            ));
            tokio::spawn(drive(
                "endpointslices",
                watcher(Api::<EndpointSlice>::all(client.clone()), config())
                    .default_backoff()
                    .reflect(slices_w),
                health.clone(),
            ));
            tokio::spawn(drive(
                "nodes",
                watcher(Api::<Node>::all(client), config())
                    .default_backoff()
                    .reflect(nodes_w),
                health,
            ));
        });
        watchers
    }

    /// The stores' current contents.
    pub fn snapshot(&self) -> Snapshot {
        let mut owners = Owners::default();
        for rs in self.replicasets.state() {
            owners.add(&rs.metadata);
        }
        for job in self.jobs.state() {
            owners.add(&job.metadata);
        }
        Snapshot {
            pods: self.pods.state(),
            owners,
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            nodes: self.nodes.state(),
        }
    }
}
