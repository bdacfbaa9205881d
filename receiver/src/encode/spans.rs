//! Service-graph spans: each sampled connection attempt of a link becomes a CLIENT span
//! and a SERVER span in a trace of their own, the SERVER span the child of the CLIENT
//! span, each under the resource of its end. This is the shape Tempo's
//! metrics-generator, the collector's `servicegraph` connector and Jaeger turn into a
//! dependency graph. Built with opentelemetry-proto's generated types.
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

use crate::{
    encode::{kv, kv_str, link_attributes, unix_nanos},
    model::{ConnectionSample, EndIdentity, LinkBatch, LinkKey},
};

/// Attribute carrying the sampling ratio of a pair: Tempo's `span_multiplier_key`
/// counts a span as 1/ratio requests, keeping request counts true under sampling.
pub const SAMPLING_RATIO_KEY: &str = "ridley.sampling.ratio";
/// `connection` for a sampled connection attempt, `traffic` for the pair that keeps a
/// link carrying data over existing connections on the map.
pub const PAIR_KEY: &str = "ridley.pair";

/// Random trace and span ids, from the process's one random source (fastrand, seeded
/// from the OS): unique, not secret.
#[derive(Default)]
pub struct IdGenerator(fastrand::Rng);

impl IdGenerator {
    /// The sequence of ids `seed` starts: every exporter of one batch draws the same ids
    /// for the same pairs, so two backends receive the same traces.
    pub fn from_seed(seed: u64) -> Self {
        IdGenerator(fastrand::Rng::with_seed(seed))
    }

    /// A non-zero id (zero means "no id" in OTLP).
    fn next(&mut self) -> u64 {
        self.0.u64(1..)
    }

    fn trace_id(&mut self) -> Vec<u8> {
        let mut id = self.next().to_be_bytes().to_vec();
        id.extend_from_slice(&self.next().to_be_bytes());
        id
    }

    fn span_id(&mut self) -> Vec<u8> {
        self.next().to_be_bytes().to_vec()
    }
}

/// One CLIENT/SERVER pair before it is placed under its resources.
struct Pair {
    client: Span,
    server: Span,
}

fn end_resource(identity: &EndIdentity) -> Resource {
    let mut attributes = vec![kv_str("service.name", identity.service_name.clone())];
    attributes.extend(
        identity
            .attributes
            .iter()
            .map(|(k, v)| kv_str(k, v.clone())),
    );
    Resource {
        attributes,
        dropped_attributes_count: 0,
        entity_refs: vec![],
    }
}

#[allow(clippy::too_many_arguments)]
fn pair(
    ids: &mut IdGenerator,
    key: &LinkKey,
    server_name: &str,
    start: SystemTime,
    duration: Duration,
    error: Option<&str>,
    ratio: f64,
    pair_kind: &str,
) -> Pair {
    let trace_id = ids.trace_id();
    let client_span_id = ids.span_id();
    let mut attributes = link_attributes(key);
    attributes.push(kv(SAMPLING_RATIO_KEY, any_value::Value::DoubleValue(ratio)));
    attributes.push(kv_str(PAIR_KEY, pair_kind));
    let status = match error {
        Some(reason) => {
            attributes.push(kv_str("error.type", reason));
            Some(Status {
                message: format!("connection {reason}"),
                code: StatusCode::Error as i32,
            })
        }
        None => None,
    };
    let span =
        |name: &str, kind: SpanKind, span_id: Vec<u8>, parent: Vec<u8>, attrs: Vec<KeyValue>| {
            Span {
                trace_id: trace_id.clone(),
                span_id,
                trace_state: String::new(),
                parent_span_id: parent,
                flags: 0,
                name: name.to_owned(),
                kind: kind as i32,
                start_time_unix_nano: unix_nanos(start),
                end_time_unix_nano: unix_nanos(start + duration),
                attributes: attrs,
                dropped_attributes_count: 0,
                events: vec![],
                dropped_events_count: 0,
                links: vec![],
                dropped_links_count: 0,
                status: status.clone(),
            }
        };
    let mut client_attributes = attributes.clone();
    // Tempo and the servicegraph connector read `peer.service` for an unpaired client
    // span (virtual node); `service.peer.name` is its newer name.
    client_attributes.push(kv_str("peer.service", server_name));
    client_attributes.push(kv_str("service.peer.name", server_name));
    Pair {
        client: span(
            "connect",
            SpanKind::Client,
            client_span_id.clone(),
            Vec::new(),
            client_attributes,
        ),
        server: span(
            "accept",
            SpanKind::Server,
            ids.span_id(),
            client_span_id,
            attributes,
        ),
    }
}

/// Span pairs for one batch: the sampled connection attempts of every link, and one
/// `traffic` pair for a link that moved data without a new connection. Pairs are never
/// split across requests; at most `max_pairs_per_request` pairs per request. Built one
/// request at a time as the iterator is advanced: an exporter holds one, never the
/// whole batch.
pub fn trace_parts<'a>(
    batch: &'a LinkBatch,
    mut ids: IdGenerator,
    max_pairs_per_request: usize,
) -> impl Iterator<Item = (ExportTraceServiceRequest, usize)> + 'a {
    // The overflow series has no ends to name: it is counted in metrics only.
    let mut pairs = batch
        .links
        .iter()
        .filter(|(key, _)| !key.is_overflow())
        .flat_map(move |(key, stats)| link_pairs(batch, key, stats, &mut ids));
    std::iter::from_fn(move || {
        let chunk: Vec<_> = pairs.by_ref().take(max_pairs_per_request.max(1)).collect();
        (!chunk.is_empty()).then(|| (request(&chunk), chunk.len()))
    })
}

/// [`trace_parts`], all of them.
#[cfg(test)]
pub fn trace_requests(
    batch: &LinkBatch,
    max_pairs_per_request: usize,
) -> Vec<(ExportTraceServiceRequest, usize)> {
    trace_parts(batch, IdGenerator::default(), max_pairs_per_request).collect()
}

/// The pairs of one link in one interval.
fn link_pairs(
    batch: &LinkBatch,
    key: &LinkKey,
    stats: &crate::model::LinkStats,
    ids: &mut IdGenerator,
) -> Vec<(EndIdentity, EndIdentity, Pair)> {
    let interval = &stats.interval;
    let mut pairs = Vec::new();
    if !interval.samples.is_empty() {
        let (client, server) = batch.end_names(key);
        let ratio = interval.samples.len() as f64 / interval.attempts.max(1) as f64;
        for ConnectionSample {
            start,
            duration,
            failure,
        } in &interval.samples
        {
            let error = failure.map(|f| f.as_str());
            let p = pair(
                ids,
                key,
                &server.service_name,
                *start,
                *duration,
                error,
                ratio,
                "connection",
            );
            pairs.push((client.clone(), server.clone(), p));
        }
    } else if let (true, Some(rtt)) = (interval.carried_traffic, interval.last_rtt) {
        // A real measurement for a pair without a handshake: the link's latest RTT.
        let (client, server) = batch.end_names(key);
        let start = batch.time.checked_sub(rtt).unwrap_or(batch.time);
        let p = pair(
            ids,
            key,
            &server.service_name,
            start,
            rtt,
            None,
            1.0,
            "traffic",
        );
        pairs.push((client, server, p));
    }
    pairs
}

fn request(pairs: &[(EndIdentity, EndIdentity, Pair)]) -> ExportTraceServiceRequest {
    // Group spans by their end's whole identity: two services of the same name in two
    // namespaces are two resources, each with its own attributes.
    let mut index: std::collections::HashMap<&EndIdentity, usize> = Default::default();
    let mut by_resource: Vec<(&EndIdentity, Vec<Span>)> = Vec::new();
    for (client, server, p) in pairs {
        for (identity, span) in [(client, &p.client), (server, &p.server)] {
            let slot = *index.entry(identity).or_insert_with(|| {
                by_resource.push((identity, Vec::new()));
                by_resource.len() - 1
            });
            by_resource[slot].1.push(span.clone());
        }
    }
    ExportTraceServiceRequest {
        resource_spans: by_resource
            .into_iter()
            .map(|(identity, spans)| ResourceSpans {
                resource: Some(end_resource(identity)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(super::scope()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FailureReason, LinkStats};

    fn batch() -> LinkBatch {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut stats = LinkStats::new(t);
        stats.interval.attempts = 4;
        stats.interval.samples = vec![
            ConnectionSample {
                start: t,
                duration: Duration::from_micros(120),
                failure: None,
            },
            ConnectionSample {
                start: t,
                duration: Duration::from_millis(3),
                failure: Some(FailureReason::Refused),
            },
        ];
        let mut quiet = LinkStats::new(t);
        quiet.interval.carried_traffic = true;
        quiet.interval.last_rtt = Some(Duration::from_micros(50));
        let mut batch = LinkBatch::new(t + Duration::from_secs(10));
        let key = |port| {
            LinkKey::between(
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                port,
                0,
            )
        };
        batch.links = vec![(key(80), stats), (key(5432), quiet)];
        batch
    }

    #[test]
    fn pairs_are_client_parent_of_server_under_their_own_resources() {
        let requests = trace_requests(&batch(), 100);
        assert_eq!(requests.len(), 1);
        let (request, pairs) = &requests[0];
        assert_eq!(*pairs, 3);
        let by_service: std::collections::BTreeMap<String, Vec<Span>> = request
            .resource_spans
            .iter()
            .map(|rs| {
                let name = match &rs.resource.as_ref().unwrap().attributes[0]
                    .value
                    .as_ref()
                    .unwrap()
                    .value
                {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("{other:?}"),
                };
                (name, rs.scope_spans[0].spans.clone())
            })
            .collect();
        let clients = &by_service["10.0.0.1"];
        let servers = &by_service["10.0.0.2"];
        assert_eq!(clients.len(), 3);
        assert_eq!(servers.len(), 3);
        for (c, s) in clients.iter().zip(servers) {
            assert_eq!(c.kind, SpanKind::Client as i32);
            assert_eq!(s.kind, SpanKind::Server as i32);
            assert_eq!(c.trace_id, s.trace_id);
            assert_eq!(s.parent_span_id, c.span_id);
            assert!(c.parent_span_id.is_empty());
            assert_eq!(c.trace_id.len(), 16);
            assert!(c.attributes.contains(&kv_str("peer.service", "10.0.0.2")));
        }
        // Sampled: 2 of 4 attempts -> ratio 0.5; the refused one is an error.
        assert!(
            clients[0]
                .attributes
                .contains(&kv(SAMPLING_RATIO_KEY, any_value::Value::DoubleValue(0.5)))
        );
        assert_eq!(
            clients[0].end_time_unix_nano - clients[0].start_time_unix_nano,
            120_000
        );
        assert_eq!(
            clients[1].status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert_eq!(
            servers[1].status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        // The quiet link's traffic pair lasts its RTT.
        assert!(clients[2].attributes.contains(&kv_str(PAIR_KEY, "traffic")));
        assert_eq!(
            clients[2].end_time_unix_nano - clients[2].start_time_unix_nano,
            50_000
        );
    }

    /// Exporters of one batch each build its span requests: from one seed, the same ids.
    #[test]
    fn one_seed_gives_every_exporter_the_same_traces() {
        let build =
            |seed| trace_parts(&batch(), IdGenerator::from_seed(seed), 100).collect::<Vec<_>>();
        assert_eq!(build(7), build(7));
        assert_ne!(build(7), build(8));
    }

    #[test]
    fn pairs_are_never_split_across_requests() {
        let requests = trace_requests(&batch(), 2);
        assert_eq!(
            requests.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            vec![2, 1]
        );
        for (request, pairs) in &requests {
            let spans: usize = request
                .resource_spans
                .iter()
                .map(|rs| rs.scope_spans[0].spans.len())
                .sum();
            assert_eq!(spans, 2 * pairs);
        }
    }
}

#[cfg(test)]
mod resource_tests {
    use super::*;
    use crate::model::{EndRef, LinkStats};

    #[test]
    fn same_named_services_in_two_namespaces_are_two_resources() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut batch = LinkBatch::new(t + Duration::from_secs(10));
        let key = |client: &str| {
            LinkKey::between(client.parse().unwrap(), "10.0.0.9".parse().unwrap(), 80, 0)
        };
        for client in ["10.0.0.1", "10.0.0.2"] {
            let mut stats = LinkStats::new(t);
            stats.interval.attempts = 1;
            stats.interval.samples = vec![ConnectionSample {
                start: t,
                duration: Duration::from_micros(100),
                failure: None,
            }];
            batch.links.push((key(client), stats));
        }
        let api = |ns: &str| EndIdentity {
            service_name: "api".into(),
            attributes: vec![("service.namespace".into(), ns.into())],
        };
        batch.ends.insert(
            EndRef::client(&key("10.0.0.1")).expect("an address end"),
            api("blue"),
        );
        batch.ends.insert(
            EndRef::client(&key("10.0.0.2")).expect("an address end"),
            api("green"),
        );
        let requests = trace_requests(&batch, 100);
        let namespaces: Vec<(String, String, usize)> = requests[0]
            .0
            .resource_spans
            .iter()
            .map(|rs| {
                let attr = |k: &str| {
                    rs.resource
                        .as_ref()
                        .and_then(|r| r.attributes.iter().find(|a| a.key == k))
                        .and_then(|a| a.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default()
                };
                (
                    attr("service.name"),
                    attr("service.namespace"),
                    rs.scope_spans[0].spans.len(),
                )
            })
            .collect();
        assert_eq!(
            namespaces,
            vec![
                ("api".into(), "blue".into(), 1),
                ("10.0.0.9".into(), "".into(), 2),
                ("api".into(), "green".into(), 1),
            ]
        );
    }
}
