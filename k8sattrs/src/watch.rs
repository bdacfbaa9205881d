//! kube-rs reflectors for the objects that name an address: Pods, ReplicaSets and Jobs
//! (metadata only, for the owner chain), Services, EndpointSlices and Nodes.
//!
//! The stores hold what the index reads and nothing else: each object is turned into
//! its compact form ([`crate::record`]) as it arrives, before the reflector stores it.
//!
//! Watches, not snapshots: each reflector lists once and then follows changes, relisting
//! on its own after a `410 Gone` or a dropped stream. Errors never reach the data path:
//! the stores keep their last state, the watcher retries with backoff, and the failure
//! is logged once per change of state and counted ([`WatchHealth`]).
//!
//! Bounded against a broken or hostile API server: retries back off exponentially with
//! jitter up to [`MAX_RETRY_DELAY`] and only start again from the beginning once a watch
//! has been healthy for [`HEALTHY_FOR`]; every response body is cut off at
//! [`MAX_RESPONSE_BYTES`] (lists are paged, so a real page is far smaller); error texts
//! are shortened before they are logged.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    api::PartialObjectMeta,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Lookup, Store},
        watcher,
    },
};

use crate::{
    index::{Owners, Snapshot},
    record::{self, Interner, OwnerRecord, PodRecord},
};

/// First retry delay of a failing watch or client.
const MIN_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Retry delay cap.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// A watch counts as recovered (its backoff starts again from the beginning) only after
/// being healthy this long.
pub const HEALTHY_FOR: Duration = Duration::from_secs(120);
/// Bytes of one API response at most (a list page, or one watch connection's stream):
/// a response that does not end cannot take the daemon's memory with it.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Objects per list page.
const LIST_PAGE_SIZE: u32 = 100;
/// Characters of an error kept in a log line.
const MAX_LOGGED_ERROR: usize = 300;

/// Exponential backoff (kube's, with jitter) whose reset is ignored until the watch has
/// been healthy for [`HEALTHY_FOR`]. kube resets a stream's backoff on every item, and a
/// relist that will fail still yields one (its `Init` event) first: with a plain reset a
/// broken API server would be asked again every second, forever.
struct WatchBackoff {
    inner: watcher::ExponentialBackoff,
    last_failure: Option<std::time::Instant>,
}

impl WatchBackoff {
    fn new() -> Self {
        WatchBackoff {
            inner: backon::ExponentialBuilder::new()
                .with_min_delay(MIN_RETRY_DELAY)
                .with_max_delay(MAX_RETRY_DELAY)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .into(),
            last_failure: None,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.last_failure = Some(std::time::Instant::now());
        self.inner.next()
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        if self
            .last_failure
            .is_none_or(|failed| failed.elapsed() >= HEALTHY_FOR)
        {
            self.inner.reset();
        }
    }
}

/// An error's text, cut to a length fit for a log line (an API server can answer with
/// a body of any size, and some errors quote it).
fn short(error: &dyn std::fmt::Display) -> String {
    let mut text = error.to_string();
    if text.len() > MAX_LOGGED_ERROR {
        let cut = (0..=MAX_LOGGED_ERROR)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

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
                "watch failing, serving the last known state and retrying with backoff: {}",
                short(error)
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
    pods: Store<PodRecord>,
    replicasets: Store<OwnerRecord<ReplicaSet>>,
    jobs: Store<OwnerRecord<Job>>,
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
        let limit_bodies = tower::util::MapResponseLayer::new(
            |response: http::Response<Box<kube::client::DynBody>>| {
                response.map(|body| {
                    Box::new(http_body_util::Limited::new(body, MAX_RESPONSE_BYTES))
                        as Box<kube::client::DynBody>
                })
            },
        );
        Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&limit_bodies)
            .build())
    }
}

/// The same event, with its object in compact form.
fn compact_event<K, R>(
    event: watcher::Event<K>,
    compact: &mut impl FnMut(K) -> R,
) -> watcher::Event<R> {
    match event {
        watcher::Event::Apply(object) => watcher::Event::Apply(compact(object)),
        watcher::Event::Delete(object) => watcher::Event::Delete(compact(object)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(compact(object)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Keeps `writer`'s store in step with the API server: list, then watch, relisting
/// when the watch expires (410 Gone) and retrying any failure with backoff. Each object
/// is stored as `compact` makes it. Runs until the process stops.
async fn reflect<K, R>(
    resource: &'static str,
    api: Api<K>,
    mut compact: impl FnMut(K) -> R + Send + 'static,
    writer: reflector::store::Writer<R>,
    health: Arc<WatchHealth>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    R: Lookup + Clone + Send + Sync + 'static,
    R::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let stream = watcher(api, watcher::Config::default().page_size(LIST_PAGE_SIZE))
        .backoff(WatchBackoff::new())
        .map_ok(move |event| compact_event(event, &mut compact));
    // `reflector` rather than `.reflect`: the stored type is not the watched one.
    let stream = reflector::reflector(writer, stream);
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            // `Init` starts a relist that may yet fail: only a completed list or a
            // delivered change shows that the watch works again.
            Ok(watcher::Event::Init) => {}
            Ok(_) => health.ok(resource),
            Err(e) => health.error(resource, &e),
        }
    }
}

/// Pods in compact form, their repeated strings shared.
fn compact_pods() -> impl FnMut(Pod) -> PodRecord + Send + 'static {
    let mut strings = Interner::default();
    move |pod| PodRecord::new(pod, &mut strings)
}

/// Owners (ReplicaSets, Jobs) in compact form, their repeated strings shared.
fn compact_owners<K>() -> impl FnMut(PartialObjectMeta<K>) -> OwnerRecord<K> + Send + 'static {
    let mut strings = Interner::default();
    move |owner| OwnerRecord::new(owner, &mut strings)
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
        let ready = watchers.clone();
        tokio::spawn(async move {
            // Logged once: from here on every address the cluster knows is resolvable.
            let synced = futures::future::join_all([
                ready.pods.wait_until_ready().boxed(),
                ready.replicasets.wait_until_ready().boxed(),
                ready.jobs.wait_until_ready().boxed(),
                ready.services.wait_until_ready().boxed(),
                ready.endpoint_slices.wait_until_ready().boxed(),
                ready.nodes.wait_until_ready().boxed(),
            ])
            .await;
            if synced.iter().all(Result::is_ok) {
                tracing::info!(
                    pods = ready.pods.state().len(),
                    services = ready.services.state().len(),
                    nodes = ready.nodes.state().len(),
                    "Kubernetes metadata synced"
                );
            }
        });
        tokio::spawn(async move {
            let mut delays = WatchBackoff::new();
            let client = loop {
                match source.client().await {
                    Ok(client) => break client,
                    Err(e) => {
                        let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                        if health.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(
                                "Kubernetes client: {}; retrying with backoff",
                                short(&format!("{e:#}"))
                            );
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            };
            tokio::spawn(reflect(
                "pods",
                Api::all(client.clone()),
                compact_pods(),
                pods_w,
                health.clone(),
            ));
            tokio::spawn(reflect(
                "replicasets",
                Api::all(client.clone()),
                compact_owners::<ReplicaSet>(),
                replicasets_w,
                health.clone(),
            ));
            tokio::spawn(reflect(
                "jobs",
                Api::all(client.clone()),
                compact_owners::<Job>(),
                jobs_w,
                health.clone(),
            ));
            tokio::spawn(reflect(
                "services",
                Api::all(client.clone()),
                record::strip_service,
                services_w,
                health.clone(),
            ));
            tokio::spawn(reflect(
                "endpointslices",
                Api::all(client.clone()),
                record::strip_endpoint_slice,
                slices_w,
                health.clone(),
            ));
            tokio::spawn(reflect(
                "nodes",
                Api::all(client),
                record::strip_node,
                nodes_w,
                health,
            ));
        });
        watchers
    }

    /// The stores' current contents.
    pub fn snapshot(&self) -> Snapshot {
        let mut owners = Owners::default();
        for rs in self.replicasets.state() {
            owners.add_record(&rs);
        }
        for job in self.jobs.state() {
            owners.add_record(&job);
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

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    use super::*;
    use crate::{index::SERVICE_NAME_ANNOTATION, record::Addresses};

    fn pod(name: &str, ip: &str, rv: &str) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv,
                         "managedFields": [{"manager": "kubectl"}],
                         "annotations": {"big": "x".repeat(100), SERVICE_NAME_ANNOTATION: "named"}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "main", "image": "img", "env": [{"name": "A", "value": "b"}]}]},
            "status": {"podIP": ip, "phase": "Running"}
        })
    }

    fn respond(body: serde_json::Value) -> Response<Body> {
        Response::builder()
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    async fn next_request(
        handle: &mut MockApi,
    ) -> (
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .expect("the reflector asked nothing")
            .expect("mock closed")
    }

    type MockApi = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// The pods reflector of the daemon, talking to a mock API server.
    fn reflect_pods_from_mock() -> (MockApi, Store<PodRecord>, Arc<WatchHealth>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (store, writer) = reflector::store::<PodRecord>();
        let health = Arc::new(WatchHealth::default());
        tokio::spawn(reflect(
            "pods",
            Api::all(client),
            compact_pods(),
            writer,
            health.clone(),
        ));
        (handle, store, health)
    }

    /// A watch that expires (410 Gone) is relisted; the store then holds the new list,
    /// the failure is counted, and pods are kept in compact form.
    #[tokio::test]
    async fn expired_watch_relists_and_is_counted() {
        let (mut handle, store, health) = reflect_pods_from_mock();

        let (list, send) = next_request(&mut handle).await;
        assert!(
            !list.uri().query().unwrap_or("").contains("watch=true"),
            "{}",
            list.uri()
        );
        send.send_response(respond(json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
            "items": [pod("a", "10.1.0.1", "9"), pod("b", "10.1.0.2", "10")]
        })));

        let (watch, send) = next_request(&mut handle).await;
        assert!(
            watch.uri().query().unwrap().contains("watch=true"),
            "{}",
            watch.uri()
        );
        send.send_response(respond(json!({
            "type": "ERROR",
            "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                       "reason": "Expired", "message": "too old resource version"}
        })));

        // Relist: "a" was deleted while the watch was gone.
        let (relist, send) = next_request(&mut handle).await;
        assert!(
            !relist.uri().query().unwrap_or("").contains("watch=true"),
            "{}",
            relist.uri()
        );
        send.send_response(respond(json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "20"},
            "items": [pod("b", "10.1.0.2", "10")]
        })));
        let (_rewatch, _keep_open) = next_request(&mut handle).await;

        let names: Vec<String> = store.state().iter().map(|p| p.name().into()).collect();
        assert_eq!(names, vec!["b".to_string()]);
        assert_eq!(health.errors(), 1);
        assert!(health.failing().is_empty(), "recovered after the relist");
        let kept = &store.state()[0];
        assert_eq!(kept.namespace(), "shop");
        assert_eq!(kept.declared_service_name.as_deref(), Some("named"));
        assert_eq!(
            kept.addresses,
            Addresses::Pod(Box::new(["10.1.0.2".parse().unwrap()]))
        );
    }

    /// An API server that answers with errors leaves the last state in place and is
    /// retried.
    #[tokio::test]
    async fn server_errors_keep_the_last_state_and_retry() {
        let (mut handle, store, health) = reflect_pods_from_mock();

        let (_, send) = next_request(&mut handle).await;
        send.send_response(respond(json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
            "items": [pod("a", "10.1.0.1", "10")]
        })));
        let (_, send) = next_request(&mut handle).await;
        send.send_error(std::io::Error::other("connection reset"));
        let (_, send) = next_request(&mut handle).await;
        send.send_response(
            Response::builder()
                .status(500)
                .body(Body::from(
                    br#"{"kind":"Status","code":500,"message":"etcd down"}"#.to_vec(),
                ))
                .unwrap(),
        );
        // Retried again after both failures, and the store still has "a".
        let (_, _hold) = next_request(&mut handle).await;
        assert_eq!(store.state().len(), 1);
        assert!(health.errors() >= 2, "{}", health.errors());
        assert_eq!(health.failing(), vec!["pods"]);
    }
}
