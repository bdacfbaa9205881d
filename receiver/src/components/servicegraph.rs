//! The `servicegraph` processor: turns the links of a metrics pipeline into the edges of
//! a service graph (a pair of `service.name`s, with their `service.namespace`s), the
//! series Tempo's metrics-generator and the collector's servicegraph connector write
//! (`traces_service_graph_*`), so that Grafana's service map needs only a
//! Prometheus-compatible store.
//!
//! An edge sums every link between its two services. Its series are cumulative and
//! continuous: what a link adds is counted since its previous state, so an edge does not
//! go backwards when one of its links expires or a pod is replaced. List it after
//! `k8sattributes`, which names the ends; without names an edge joins two addresses.
use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use config::ComponentSection;
use serde::Deserialize;

use crate::{
    component::{BuildContext, Processor, key_error},
    model::{
        EndIdentity, FailureReason, FastMap, LinkBatch, LinkKey, LinkStats, ServiceGraphEdge,
        Transport,
    },
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceGraphConfig {
    /// Edges kept at most. Beyond it, new edges are counted in one overflow edge
    /// (`otel.metric.overflow = true`), so memory and series stay bounded.
    pub max_edges: usize,
    /// An edge none of whose links was seen for this long is forgotten (its series end).
    #[serde(with = "humantime_serde")]
    pub edge_expiration: Duration,
}

impl Default for ServiceGraphConfig {
    fn default() -> Self {
        ServiceGraphConfig {
            max_edges: 10_000,
            edge_expiration: Duration::from_secs(600),
        }
    }
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Processor>> {
    let config: ServiceGraphConfig = cx.parse_section(section)?;
    if config.max_edges == 0 || config.max_edges > 1_000_000 {
        return Err(key_error(
            "max_edges",
            format!("must be from 1 to 1000000, got {}", config.max_edges),
        ));
    }
    if config.edge_expiration < Duration::from_secs(1)
        || config.edge_expiration > Duration::from_secs(7 * 24 * 3600)
    {
        return Err(key_error(
            "edge_expiration",
            format!(
                "must be from 1s to 7d, got {}",
                humantime::format_duration(config.edge_expiration)
            ),
        ));
    }
    Ok(Box::new(ServiceGraph {
        config,
        edges: BTreeMap::new(),
        previous: FastMap::default(),
        last: None,
    }))
}

/// Client namespace, client name, server namespace, server name.
type EdgeKey = (String, String, String, String);

/// The key of the overflow edge: no real service has an empty name.
fn overflow_key() -> EdgeKey {
    Default::default()
}

struct Edge {
    start: SystemTime,
    requests: u64,
    failed: u64,
    durations: crate::model::Histogram,
    last_seen: SystemTime,
}

struct ServiceGraph {
    config: ServiceGraphConfig,
    edges: BTreeMap<EdgeKey, Edge>,
    /// Each link's cumulative state at the previous batch, to add only what is new.
    previous: FastMap<LinkKey, LinkStats>,
    /// The last batch processed (one instance may serve several pipelines).
    last: Option<(SystemTime, Vec<ServiceGraphEdge>)>,
}

fn namespace(end: &EndIdentity) -> String {
    end.attributes
        .iter()
        .find(|(k, _)| k == "service.namespace")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

impl ServiceGraph {
    fn update(&mut self, batch: &LinkBatch) {
        let mut seen = FastMap::with_capacity_and_hasher(batch.links.len(), Default::default());
        // An edge's requests are connection attempts: UDP links have none (their
        // datagrams are in the link metrics).
        let edges_of = |key: &LinkKey| !key.is_overflow() && key.transport == Transport::Tcp;
        for (key, stats) in batch.links.iter().filter(|(key, _)| edges_of(key)) {
            let (client, server) = batch.end_names(key);
            let mut edge_key = (
                namespace(&client),
                client.service_name,
                namespace(&server),
                server.service_name,
            );
            if !self.edges.contains_key(&edge_key) && self.edges.len() >= self.config.max_edges {
                edge_key = overflow_key();
            }
            let edge = self.edges.entry(edge_key).or_insert_with(|| Edge {
                start: stats.start_time,
                requests: 0,
                failed: 0,
                durations: Default::default(),
                last_seen: batch.time,
            });
            // What the link did since the last batch: its whole life when new (or when
            // its series restarted).
            let mut added = LinkStats::new(stats.start_time);
            added.add_since(stats, self.previous.get(key));
            edge.requests += added.opened
                + added.failed(FailureReason::Refused)
                + added.failed(FailureReason::Timeout);
            edge.failed += added.failed_total();
            edge.durations.merge(&added.connect_duration);
            edge.last_seen = batch.time;
            seen.insert(*key, stats.cumulative());
        }
        self.previous = seen;
        let expiration = self.config.edge_expiration;
        self.edges.retain(|_, edge| {
            batch
                .time
                .duration_since(edge.last_seen)
                .is_ok_and(|idle| idle < expiration)
                || batch.time < edge.last_seen
        });
    }

    fn edges(&self) -> Vec<ServiceGraphEdge> {
        self.edges
            .iter()
            .map(
                |((client_ns, client, server_ns, server), edge)| ServiceGraphEdge {
                    client: client.clone(),
                    client_namespace: client_ns.clone(),
                    server: server.clone(),
                    server_namespace: server_ns.clone(),
                    overflow: client.is_empty() && server.is_empty(),
                    start: edge.start,
                    requests: edge.requests,
                    failed: edge.failed,
                    durations: edge.durations.clone(),
                },
            )
            .collect()
    }
}

impl Processor for ServiceGraph {
    fn process(&mut self, mut batch: LinkBatch) -> LinkBatch {
        // A second pipeline's copy of the same batch must not count it twice.
        if let Some((time, edges)) = &self.last {
            if *time == batch.time {
                batch.service_graph = edges.clone();
                return batch;
            }
        }
        self.update(&batch);
        batch.service_graph = self.edges();
        self.last = Some((batch.time, batch.service_graph.clone()));
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndRef, one_link_batch};

    fn processor(max_edges: usize) -> ServiceGraph {
        ServiceGraph {
            config: ServiceGraphConfig {
                max_edges,
                ..Default::default()
            },
            edges: BTreeMap::new(),
            previous: FastMap::default(),
            last: None,
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
    }

    fn named(batch: &mut LinkBatch, client: &str, server: &str) {
        let key = batch.links[0].0;
        let identity = |name: &str| EndIdentity {
            service_name: name.into(),
            attributes: vec![("service.namespace".into(), "shop".into())],
        };
        batch.ends.insert(
            EndRef::client(&key).expect("an address end"),
            identity(client),
        );
        batch.ends.insert(
            EndRef::server(&key).expect("an address end"),
            identity(server),
        );
    }

    #[test]
    fn an_edge_keeps_counting_when_its_link_expires_and_another_replaces_it() {
        let mut graph = processor(100);
        let mut stats = LinkStats::new(at(0));
        stats.opened = 3;
        stats.add_failure(FailureReason::Refused);
        let mut first = one_link_batch(at(10), stats.clone());
        named(&mut first, "web", "db");
        let edges = graph.process(first).service_graph;
        assert_eq!((edges[0].requests, edges[0].failed), (4, 1));
        assert_eq!(
            (edges[0].client_namespace.as_str(), edges[0].server.as_str()),
            ("shop", "db")
        );

        // The same link two connections later: only the new ones are added.
        stats.opened = 5;
        let mut second = one_link_batch(at(20), stats);
        named(&mut second, "web", "db");
        assert_eq!(graph.process(second).service_graph[0].requests, 6);

        // The link expired; a new pod (a new link, a new series) talks on the same edge.
        let mut replaced = LinkStats::new(at(25));
        replaced.opened = 2;
        let mut third = one_link_batch(at(30), replaced);
        third.links[0].0.client =
            crate::model::Peer::Address("10.0.0.9".parse().expect("an address"));
        named(&mut third, "web", "db");
        let edges = graph.process(third).service_graph;
        assert_eq!(edges.len(), 1);
        assert_eq!((edges[0].requests, edges[0].start), (8, at(0)));
    }

    #[test]
    fn the_same_batch_in_two_pipelines_counts_once() {
        let mut graph = processor(100);
        let mut stats = LinkStats::new(at(0));
        stats.opened = 3;
        let batch = one_link_batch(at(10), stats);
        graph.process(batch.clone());
        assert_eq!(graph.process(batch).service_graph[0].requests, 3);
    }

    #[test]
    fn edges_beyond_the_limit_go_to_the_overflow_edge() {
        let mut graph = processor(1);
        let mut stats = LinkStats::new(at(0));
        stats.opened = 1;
        let mut first = one_link_batch(at(10), stats.clone());
        named(&mut first, "web", "db");
        graph.process(first);
        stats.opened = 7;
        let mut second = one_link_batch(at(20), stats);
        second.links[0].0.server_port = 81;
        named(&mut second, "web", "cache");
        let edges = graph.process(second).service_graph;
        let overflow: Vec<_> = edges.iter().filter(|e| e.overflow).collect();
        assert_eq!(edges.len(), 2);
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].requests, 7);
    }

    #[test]
    fn an_edge_not_seen_for_the_expiration_is_forgotten() {
        let mut graph = processor(100);
        let mut stats = LinkStats::new(at(0));
        stats.opened = 1;
        graph.process(one_link_batch(at(10), stats));
        let empty = LinkBatch::new(at(10 + 599));
        assert_eq!(graph.process(empty).service_graph.len(), 1);
        let later = LinkBatch::new(at(10 + 600));
        assert!(graph.process(later).service_graph.is_empty());
    }
}
