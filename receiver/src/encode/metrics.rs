//! The OTLP edge: [`LinkBatch`] -> `ExportMetricsServiceRequest`, with the official
//! generated types of opentelemetry-proto. Metric names, units and attributes here are
//! the contract documented in the README's metric table: add, never rename.
use std::time::SystemTime;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::KeyValue,
    metrics::v1::{
        AggregationTemporality, Histogram as OtlpHistogram, HistogramDataPoint, Metric,
        NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
};

use super::{kv_str, link_point_attributes, unix_nanos};
use crate::{
    model::{FailureReason, Histogram, LATENCY_BOUNDS_S, LinkBatch, LinkKey, LinkStats, Transport},
    telemetry::{ExporterSnapshot, TelemetrySnapshot},
};

/// Points stamped with one collection time.
struct PointBuilder {
    time: SystemTime,
}

impl PointBuilder {
    fn number(&self, start: SystemTime, attributes: Vec<KeyValue>, value: u64) -> NumberDataPoint {
        NumberDataPoint {
            attributes,
            start_time_unix_nano: unix_nanos(start),
            time_unix_nano: unix_nanos(self.time),
            exemplars: vec![],
            flags: 0,
            value: Some(number_data_point::Value::AsInt(
                i64::try_from(value).unwrap_or(i64::MAX),
            )),
        }
    }

    fn histogram(
        &self,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        h: &Histogram,
    ) -> HistogramDataPoint {
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: unix_nanos(start),
            time_unix_nano: unix_nanos(self.time),
            count: h.count,
            sum: Some(h.sum),
            bucket_counts: h.bucket_counts.to_vec(),
            explicit_bounds: LATENCY_BOUNDS_S.to_vec(),
            exemplars: vec![],
            flags: 0,
            min: (h.count > 0).then_some(h.min),
            max: (h.count > 0).then_some(h.max),
        }
    }
}

fn sum(
    name: &str,
    description: &str,
    unit: &str,
    monotonic: bool,
    points: Vec<NumberDataPoint>,
) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: unit.to_owned(),
        metadata: vec![],
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: monotonic,
        })),
    }
}

fn histogram(name: &str, description: &str, points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: "s".to_owned(),
        metadata: vec![],
        data: Some(metric::Data::Histogram(OtlpHistogram {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
    }
}

/// The points of a split link metric: (the extra attribute's value, the value).
pub type SplitPoints = [Option<(&'static str, u64)>; 3];

/// How a link metric's points come from a link's statistics.
pub enum LinkValues {
    /// One point per link.
    Number(fn(&LinkStats) -> u64),
    /// One point per value of an extra attribute `key` (direction, failure reason);
    /// `None` entries make no point.
    Split {
        key: &'static str,
        points: fn(&LinkStats) -> SplitPoints,
    },
    Histogram(fn(&LinkStats) -> &Histogram),
}

/// One `ridley.link.*` metric: what every exporter's encoding of links is built from
/// (OTLP here, the Prometheus text page straight from the link table).
pub struct LinkMetric {
    pub name: &'static str,
    pub description: &'static str,
    pub unit: &'static str,
    /// Sums: monotonic (a counter) or not (a gauge). Histograms: unused.
    pub monotonic: bool,
    pub values: LinkValues,
    /// The links it has points for: of one transport (and the overflow series, which
    /// counts both), or every link.
    pub only: Option<Transport>,
}

impl LinkMetric {
    /// Whether `key` has points of this metric.
    pub fn applies_to(&self, key: &LinkKey) -> bool {
        self.only
            .is_none_or(|transport| key.transport == transport || key.is_overflow())
    }
}

fn bytes_by_direction(s: &LinkStats) -> SplitPoints {
    [
        Some(("client_to_server", s.bytes_transmit)),
        Some(("server_to_client", s.bytes_receive)),
        None,
    ]
}

fn datagrams_by_direction(s: &LinkStats) -> SplitPoints {
    [
        Some(("client_to_server", s.datagrams_transmit)),
        Some(("server_to_client", s.datagrams_receive)),
        None,
    ]
}

/// A reason appears once it has happened at least once on the link.
fn failures_by_reason(s: &LinkStats) -> SplitPoints {
    FailureReason::ALL.map(|reason| {
        let count = s.failed(reason);
        (count > 0).then_some((reason.as_str(), count))
    })
}

/// The link metrics, in the order they are exported.
pub const LINK_METRICS: [LinkMetric; 8] = [
    LinkMetric {
        name: "ridley.link.bytes",
        description: "Payload bytes carried by the link, by direction (transmit: client to server).",
        unit: "By",
        monotonic: true,
        values: LinkValues::Split {
            key: "ridley.link.direction",
            points: bytes_by_direction,
        },
        only: None,
    },
    LinkMetric {
        name: "ridley.link.connections.opened",
        description: "Connections that completed the TCP handshake.",
        unit: "{connection}",
        monotonic: true,
        values: LinkValues::Number(|s| s.opened),
        only: Some(Transport::Tcp),
    },
    LinkMetric {
        name: "ridley.link.connections.failed",
        description: "Connections that failed: refused, reset or timed out.",
        unit: "{connection}",
        monotonic: true,
        values: LinkValues::Split {
            key: "error.type",
            points: failures_by_reason,
        },
        only: Some(Transport::Tcp),
    },
    LinkMetric {
        name: "ridley.link.connections.active",
        description: "Connections open at collection time.",
        unit: "{connection}",
        monotonic: false,
        values: LinkValues::Number(|s| s.active),
        only: Some(Transport::Tcp),
    },
    LinkMetric {
        name: "ridley.link.connect.duration",
        description: "TCP handshake duration, measured by the reporting end.",
        unit: "s",
        monotonic: false,
        values: LinkValues::Histogram(|s| &s.connect_duration),
        only: Some(Transport::Tcp),
    },
    LinkMetric {
        name: "ridley.link.rtt",
        description: "Smoothed RTT of the link's connections, sampled once per connection per interval and at close.",
        unit: "s",
        monotonic: false,
        values: LinkValues::Histogram(|s| &s.rtt),
        only: Some(Transport::Tcp),
    },
    LinkMetric {
        name: "ridley.link.retransmits",
        description: "TCP segments retransmitted by the reporting end.",
        unit: "{segment}",
        monotonic: true,
        values: LinkValues::Number(|s| s.retransmits),
        only: Some(Transport::Tcp),
    },
    LinkMetric {
        name: "ridley.link.datagrams",
        description: "UDP datagrams carried by the link, by direction (transmit: client to server).",
        unit: "{datagram}",
        monotonic: true,
        values: LinkValues::Split {
            key: "ridley.link.direction",
            points: datagrams_by_direction,
        },
        only: Some(Transport::Udp),
    },
];

/// Links per metrics request part: about 0.6-1.5 MiB encoded (depending on how many
/// attributes enrichment adds) and 3x that decoded, the most any exporter holds
/// decoded at once.
pub const LINKS_PER_PART: usize = 256;

/// The batch as cumulative metrics requests of at most `links_per_part` links each,
/// built one at a time as the iterator is advanced: an exporter holds one part, never
/// the whole batch. The service-graph series go with the last part. A batch without
/// links is one request without metrics: a reader of the file exporter sees that the
/// links are gone.
pub fn metrics_parts<'a>(
    batch: &'a LinkBatch,
    resource: &'a Resource,
    links_per_part: usize,
) -> impl Iterator<Item = ExportMetricsServiceRequest> + 'a {
    let p = PointBuilder { time: batch.time };
    let chunks: Vec<&'a [(crate::model::LinkKey, LinkStats)]> = if batch.links.is_empty() {
        vec![&[]]
    } else {
        batch.links.chunks(links_per_part.max(1)).collect()
    };
    let last = chunks.len().saturating_sub(1);
    chunks.into_iter().enumerate().map(move |(i, links)| {
        let mut metrics = link_metrics(batch, links, &p);
        if i == last && !batch.service_graph.is_empty() {
            metrics.extend(service_graph_metrics(batch, &p));
        }
        request(resource, metrics)
    })
}

/// The whole batch as one request.
#[cfg(test)]
pub fn metrics_request(batch: &LinkBatch, resource: &Resource) -> ExportMetricsServiceRequest {
    metrics_parts(batch, resource, usize::MAX)
        .next()
        .expect("a batch is at least one part")
}

/// The service-graph series alone (no edges: none), for an exporter that renders the
/// links itself.
pub fn service_graph_request(
    batch: &LinkBatch,
    resource: &Resource,
) -> Option<ExportMetricsServiceRequest> {
    (!batch.service_graph.is_empty()).then(|| {
        let p = PointBuilder { time: batch.time };
        request(resource, service_graph_metrics(batch, &p))
    })
}

/// The `ridley.link.*` metrics of `links`, one point per link (and per direction or
/// failure reason) per metric; each link's attributes are worked out once and copied
/// to its points.
fn link_metrics(
    batch: &LinkBatch,
    links: &[(crate::model::LinkKey, LinkStats)],
    p: &PointBuilder,
) -> Vec<Metric> {
    let attributes: Vec<Vec<KeyValue>> = links
        .iter()
        .map(|(key, _)| link_point_attributes(batch, key))
        .collect();
    LINK_METRICS
        .iter()
        .map(|m| {
            let each = links
                .iter()
                .zip(&attributes)
                .filter(|((key, _), _)| m.applies_to(key));
            match m.values {
                LinkValues::Number(value) => sum(
                    m.name,
                    m.description,
                    m.unit,
                    m.monotonic,
                    each.map(|((_, s), a)| p.number(s.start_time, a.clone(), value(s)))
                        .collect(),
                ),
                LinkValues::Split { key, points } => {
                    let mut out = Vec::with_capacity(links.len() * 2);
                    for ((_, s), a) in each {
                        for (label, value) in points(s).into_iter().flatten() {
                            let mut with = Vec::with_capacity(a.len() + 1);
                            with.extend_from_slice(a);
                            with.push(kv_str(key, label));
                            out.push(p.number(s.start_time, with, value));
                        }
                    }
                    sum(m.name, m.description, m.unit, m.monotonic, out)
                }
                LinkValues::Histogram(histogram_of) => histogram(
                    m.name,
                    m.description,
                    each.map(|((_, s), a)| p.histogram(s.start_time, a.clone(), histogram_of(s)))
                        .collect(),
                ),
            }
        })
        .collect()
}

/// ridley's own telemetry as one request of its own (`Data::Telemetry`).
pub fn telemetry_request(
    snapshot: &TelemetrySnapshot,
    resource: &Resource,
) -> ExportMetricsServiceRequest {
    let p = PointBuilder {
        time: snapshot.time,
    };
    request(resource, self_metrics(snapshot, &p))
}

/// One request of ridley's resource and scope; metrics with no points (no links yet)
/// are left out, as the collector does.
fn request(resource: &Resource, mut metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    metrics.retain(|m| match &m.data {
        Some(metric::Data::Sum(s)) => !s.data_points.is_empty(),
        Some(metric::Data::Histogram(h)) => !h.data_points.is_empty(),
        _ => true,
    });
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(super::scope()),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// ridley's own health: kernel-side losses, exporter outcomes, Kubernetes watch errors.
fn self_metrics(snapshot: &TelemetrySnapshot, p: &PointBuilder) -> Vec<Metric> {
    let start = snapshot.start;
    let mut metrics = Vec::new();
    metrics.push(sum(
        "ridley.receiver.losses",
        "Kernel records or connections the receiver could not account for, by reason.",
        "{event}",
        true,
        snapshot
            .losses
            .entries()
            .into_iter()
            .map(|(reason, count)| p.number(start, vec![kv_str("reason", reason)], count))
            .collect(),
    ));
    metrics.extend(exporter_metrics(&snapshot.exporters, start, p));
    metrics.push(sum(
        "ridley.listener.refused",
        "Connections closed at accept because the listener's connection limit was reached.",
        "{connection}",
        true,
        snapshot
            .listener_refusals
            .iter()
            .map(|(listener, n)| p.number(start, vec![kv_str("listener", *listener)], *n))
            .collect(),
    ));
    if let Some(errors) = snapshot.kubernetes_watch_errors {
        metrics.push(sum(
            "ridley.k8s.watch.errors",
            "Kubernetes watch and client errors (each retried with backoff; the last known state keeps serving).",
            "{error}",
            true,
            vec![p.number(start, vec![], errors)],
        ));
    }
    metrics
}

/// The series Tempo's metrics-generator writes, from the edges the `servicegraph`
/// processor keeps: an edge is a pair of service names, a request is a connection
/// attempt, durations are handshakes.
fn service_graph_metrics(batch: &LinkBatch, p: &PointBuilder) -> Vec<Metric> {
    let labels = |edge: &crate::model::ServiceGraphEdge| {
        let mut labels = vec![
            kv_str("client", edge.client.as_str()),
            kv_str("server", edge.server.as_str()),
            kv_str("connection_type", ""),
            kv_str("client_service_namespace", edge.client_namespace.as_str()),
            kv_str("server_service_namespace", edge.server_namespace.as_str()),
        ];
        if edge.overflow {
            labels.push(super::kv(
                "otel.metric.overflow",
                opentelemetry_proto::tonic::common::v1::any_value::Value::BoolValue(true),
            ));
        }
        labels
    };
    let edges = &batch.service_graph;
    let mut total = Vec::new();
    let mut failed = Vec::new();
    let mut client_seconds = Vec::new();
    let mut server_seconds = Vec::new();
    for edge in edges {
        total.push(p.number(edge.start, labels(edge), edge.requests));
        failed.push(p.number(edge.start, labels(edge), edge.failed));
        client_seconds.push(p.histogram(edge.start, labels(edge), &edge.durations));
        server_seconds.push(p.histogram(edge.start, labels(edge), &edge.durations));
    }
    vec![
        sum(
            "traces_service_graph_request_total",
            "Connection attempts between two services.",
            "",
            true,
            total,
        ),
        sum(
            "traces_service_graph_request_failed_total",
            "Connection attempts between two services that failed (refused, reset, timeout).",
            "",
            true,
            failed,
        ),
        histogram(
            "traces_service_graph_request_client_seconds",
            "Handshake durations between two services.",
            client_seconds,
        ),
        histogram(
            "traces_service_graph_request_server_seconds",
            "Handshake durations between two services.",
            server_seconds,
        ),
    ]
}

/// ridley's own exporter health: requests sent and failed, queue length, drops.
fn exporter_metrics(
    exporters: &[ExporterSnapshot],
    start: SystemTime,
    p: &PointBuilder,
) -> Vec<Metric> {
    let attrs = |e: &ExporterSnapshot| {
        vec![
            kv_str("exporter", e.exporter.clone()),
            kv_str("signal", e.signal.clone()),
        ]
    };
    let with = |e: &ExporterSnapshot, key: &str, value: &str| {
        let mut a = attrs(e);
        a.push(kv_str(key, value));
        a
    };
    let mut requests = Vec::new();
    let mut queue = Vec::new();
    let mut queue_bytes = Vec::new();
    let mut dropped = Vec::new();
    for e in exporters {
        queue_bytes.push(p.number(start, attrs(e), e.queue_bytes));
        requests.push(p.number(start, with(e, "outcome", "success"), e.sent));
        requests.push(p.number(start, with(e, "outcome", "failure"), e.failed));
        queue.push(p.number(start, attrs(e), e.queue_len));
        dropped.push(p.number(start, with(e, "item", "span"), e.dropped_spans));
        dropped.push(p.number(
            start,
            with(e, "item", "metric_request"),
            e.dropped_metric_requests,
        ));
    }
    vec![
        sum(
            "ridley.exporter.requests",
            "Export requests by outcome (a failure is an attempt that was not retried or ran out of retries).",
            "{request}",
            true,
            requests,
        ),
        sum(
            "ridley.exporter.queue.size",
            "Requests waiting in the exporter's sending queue.",
            "{request}",
            false,
            queue,
        ),
        sum(
            "ridley.exporter.queue.bytes",
            "Encoded bytes waiting in the exporter's sending queue (bounded by sending_queue.max_bytes).",
            "By",
            false,
            queue_bytes,
        ),
        sum(
            "ridley.exporter.dropped",
            "Spans and metric requests dropped: queue full or retries exhausted.",
            "{item}",
            true,
            dropped,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{encode::resource, model::LinkKey};
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};

    fn batch() -> LinkBatch {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut stats = LinkStats::new(start);
        stats.bytes_transmit = 1000;
        stats.bytes_receive = 20;
        stats.opened = 3;
        stats.add_failure(FailureReason::Refused);
        stats.connect_duration.record(Duration::from_micros(80));
        let mut batch = LinkBatch::new(start + Duration::from_secs(10));
        batch.links = vec![(
            LinkKey::between(
                "10.0.0.1".parse().unwrap(),
                "fd00::2".parse().unwrap(),
                443,
                0,
            ),
            stats,
        )];
        batch
    }

    #[test]
    fn links_and_telemetry_are_requests_of_their_own() {
        let names = |request: &ExportMetricsServiceRequest| -> Vec<String> {
            request.resource_metrics[0].scope_metrics[0]
                .metrics
                .iter()
                .map(|m| m.name.clone())
                .collect()
        };
        let links = names(&metrics_request(&batch(), &resource()));
        assert!(links.contains(&"ridley.link.bytes".to_string()));
        assert!(
            !links.iter().any(|n| !n.starts_with("ridley.link.")),
            "{links:?}"
        );

        let telemetry = crate::telemetry::Telemetry::default();
        telemetry.record_losses(
            "ebpf",
            crate::model::Losses {
                ringbuf_full: 3,
                ..Default::default()
            },
        );
        telemetry.record_losses(
            "ebpf/2",
            crate::model::Losses {
                ringbuf_full: 4,
                close_lost: 1,
                ..Default::default()
            },
        );
        let request = telemetry_request(&telemetry.snapshot_at(SystemTime::now()), &resource());
        assert!(
            !names(&request)
                .iter()
                .any(|n| n.starts_with("ridley.link."))
        );
        let losses = &request.resource_metrics[0].scope_metrics[0].metrics[0];
        assert_eq!(losses.name, "ridley.receiver.losses");
        let Some(metric::Data::Sum(sum)) = &losses.data else {
            panic!("a sum")
        };
        let by_reason: Vec<(String, i64)> = sum
            .data_points
            .iter()
            .filter_map(|p| match (&p.attributes[0].value, p.value) {
                (
                    Some(AnyValue {
                        value: Some(any_value::Value::StringValue(reason)),
                    }),
                    Some(number_data_point::Value::AsInt(n)),
                ) if n > 0 => Some((reason.clone(), n)),
                _ => None,
            })
            .collect();
        // Receivers' losses are summed reason by reason.
        assert_eq!(
            by_reason,
            vec![("ringbuf_full".into(), 7), ("close_lost".into(), 1)]
        );
    }

    /// The file exporter's encoding is the collector's OTLP/JSON: camelCase keys,
    /// 64-bit integers as strings, enums as numbers.
    #[test]
    fn json_encoding_matches_otlp_json() {
        let request = metrics_request(&batch(), &resource());
        let json: serde_json::Value = serde_json::to_value(&request).unwrap();
        let metrics = &json["resourceMetrics"][0]["scopeMetrics"][0]["metrics"];
        let bytes = &metrics[0];
        assert_eq!(bytes["name"], "ridley.link.bytes");
        assert_eq!(bytes["unit"], "By");
        assert_eq!(bytes["sum"]["isMonotonic"], true);
        assert_eq!(bytes["sum"]["aggregationTemporality"], 2);
        let point = &bytes["sum"]["dataPoints"][0];
        assert_eq!(point["asInt"], "1000");
        assert_eq!(point["timeUnixNano"], "1700000010000000000");
        assert_eq!(point["startTimeUnixNano"], "1700000000000000000");
        let attrs = point["attributes"].as_array().unwrap();
        assert!(
            attrs
                .contains(&serde_json::json!({"key": "server.port", "value": {"intValue": "443"}}))
        );
        assert!(attrs.contains(
            &serde_json::json!({"key": "network.type", "value": {"stringValue": "ipv6"}})
        ));
        assert!(attrs.contains(&serde_json::json!({"key": "ridley.link.direction", "value": {"stringValue": "client_to_server"}})));

        let failed = &metrics[2];
        assert_eq!(failed["name"], "ridley.link.connections.failed");
        assert_eq!(failed["sum"]["dataPoints"].as_array().unwrap().len(), 1);
        let hist = &metrics[4]["histogram"]["dataPoints"][0];
        assert_eq!(hist["count"], "1");
        assert_eq!(hist["bucketCounts"][1], "1");
    }
}

#[cfg(test)]
mod service_graph_tests {
    use super::*;
    use crate::encode::resource;
    use crate::model::ServiceGraphEdge;
    use opentelemetry_proto::tonic::common::v1::any_value;

    #[test]
    fn edges_carry_the_namespace_of_each_end() {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut batch = LinkBatch::new(t);
        batch.service_graph = vec![ServiceGraphEdge {
            client: "web".into(),
            client_namespace: "shop".into(),
            server: "db".into(),
            server_namespace: "data".into(),
            overflow: false,
            start: t,
            requests: 4,
            failed: 0,
            durations: Histogram::default(),
        }];
        let request = metrics_request(&batch, &resource());
        let metric = request.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == "traces_service_graph_request_total")
            .expect("the series is there");
        let Some(metric::Data::Sum(sum)) = &metric.data else {
            panic!("a sum")
        };
        let labels: Vec<(String, String)> = sum.data_points[0]
            .attributes
            .iter()
            .map(
                |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(v)) => (kv.key.clone(), v.clone()),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        let expected: Vec<(String, String)> = [
            ("client", "web"),
            ("server", "db"),
            ("connection_type", ""),
            ("client_service_namespace", "shop"),
            ("server_service_namespace", "data"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(labels, expected);
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsInt(4))
        );
    }
}
