//! The `prometheus` exporter: serves the metrics pipeline's latest state on
//! `http://<endpoint>/metrics` in the Prometheus text format, for users who scrape
//! (as they did Caretta or Hubble). Names follow the OpenTelemetry-to-Prometheus
//! mapping: `.` becomes `_`, the unit is appended (`By` -> `bytes`, `s` -> `seconds`)
//! unless the name already ends with it, monotonic sums end in `_total`; resource
//! attributes go to `target_info`.
use std::{
    fmt::Write as _,
    sync::{Arc, RwLock},
};

use anyhow::Result;
use async_trait::async_trait;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::header,
    response::IntoResponse,
    routing::get,
};
use config::ComponentSection;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{metric::Data, number_data_point::Value},
    resource::v1::Resource,
};
use serde::Deserialize;

use crate::{
    component::{BuildContext, Exporter},
    encode,
    encode::metrics::{LINK_METRICS, LinkValues},
    model::{Data as PipelineData, LATENCY_BOUNDS_S},
    telemetry::Telemetry,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    /// Address to serve `/metrics` on.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
}

/// Loopback by default, as the collector's components: exposing metrics on every
/// interface is a choice (the DaemonSet binds the pod IP from the downward API).
fn default_endpoint() -> String {
    "127.0.0.1:9464".to_owned()
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    let config: PrometheusConfig = cx.parse_section(section)?;
    Ok(Box::new(PrometheusExporter {
        id: cx.id.to_string(),
        endpoint: super::endpoint(cx, &config.endpoint)?,
        page: Arc::new(RwLock::new(Page::default())),
        telemetry: cx.telemetry.clone(),
        resource: encode::resource(),
        stop: tokio_util::sync::CancellationToken::new(),
    }))
}

/// The page in two parts, each replaced when it changes and shared (not copied) by
/// every scrape: the links and ridley's own telemetry.
#[derive(Default)]
struct Page {
    links: Option<Arc<LinkPage>>,
    telemetry: Bytes,
}

/// Links rendered per piece of the response: a piece is at most about 400 KiB of text
/// (a histogram family with many attributes), the most a scrape holds at once; with
/// the listener's 64 connections, at most about 25 MiB for every scrape together.
const LINKS_PER_PIECE: usize = 64;

/// The links of the newest batch as the page shows them. Text is produced while the
/// response is sent, family by family and piece by piece, straight from the link table:
/// a page of 16,000 links (about 200 MiB of text) is never held whole.
struct LinkPage {
    batch: Arc<crate::model::LinkBatch>,
    /// Each link's attributes as labels, `k="v",` each: built once per batch, not per
    /// line.
    labels: Vec<Box<str>>,
    /// The scope's labels, which end every line's label set (the same for every link).
    scope: String,
    /// Which link families have at least one point (a metric with no points is left
    /// out, as from every other exporter).
    present: [bool; LINK_METRICS.len()],
    /// `target_info`, from ridley's resource.
    head: Bytes,
    /// The service-graph series (bounded by the `servicegraph` processor's edge limit).
    tail: Bytes,
}

impl LinkPage {
    fn new(batch: Arc<crate::model::LinkBatch>, resource: &Resource) -> Self {
        let labels = batch
            .links
            .iter()
            .map(|(key, _)| {
                label_body(&encode::link_point_attributes(&batch, key), "").into_boxed_str()
            })
            .collect();
        let present = LINK_METRICS.each_ref().map(|m| {
            let mut links = batch.links.iter().filter(|(key, _)| m.applies_to(key));
            match m.values {
                LinkValues::Split { points, .. } => {
                    links.any(|(_, s)| points(s).iter().any(Option::is_some))
                }
                _ => links.next().is_some(),
            }
        });
        let tail = encode::metrics::service_graph_request(&batch, resource)
            .map(|request| render_all(&[&request], false))
            .unwrap_or_default();
        LinkPage {
            labels,
            scope: scope_labels(Some(&encode::scope())),
            present,
            head: Bytes::from(target_info(resource)),
            tail: Bytes::from(tail),
            batch,
        }
    }

    /// The whole page, as pieces rendered one at a time while they are sent.
    fn pieces(self: Arc<Self>) -> impl Iterator<Item = Bytes> + Send + 'static {
        let pieces_per_family = self.batch.links.len().div_ceil(LINKS_PER_PIECE);
        let present = self.present;
        let page = self.clone();
        let body = (0..LINK_METRICS.len())
            .filter(move |f| present[*f])
            .flat_map(move |f| (0..pieces_per_family).map(move |piece| (f, piece)))
            .map(move |(f, piece)| Bytes::from(page.render(f, piece)));
        std::iter::once(self.head.clone())
            .chain(body)
            .chain(std::iter::once(self.tail.clone()))
    }

    /// One piece of family `f`: its header with the first piece, then the lines of
    /// links `piece * LINKS_PER_PIECE ..`.
    fn render(&self, f: usize, piece: usize) -> String {
        let m = &LINK_METRICS[f];
        let from = piece * LINKS_PER_PIECE;
        let to = (from + LINKS_PER_PIECE).min(self.batch.links.len());
        let mut out = String::new();
        let (name, kind) = match m.values {
            LinkValues::Histogram(_) => (metric_name(m.name, m.unit, false), "histogram"),
            _ if m.monotonic => (metric_name(m.name, m.unit, true), "counter"),
            _ => (metric_name(m.name, m.unit, false), "gauge"),
        };
        if piece == 0 {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", m.description);
        }
        let scope = &self.scope;
        let links = self.batch.links[from..to]
            .iter()
            .zip(&self.labels[from..to]);
        for ((key, stats), attributes) in links {
            if !m.applies_to(key) {
                continue;
            }
            match m.values {
                LinkValues::Number(value) => {
                    let _ = writeln!(out, "{name}{{{attributes}{scope}}} {}", value(stats));
                }
                LinkValues::Split { key, points } => {
                    // The extra attribute goes after the link's, before the scope's.
                    let key = sanitize(key);
                    for (label, value) in points(stats).into_iter().flatten() {
                        let _ = writeln!(
                            out,
                            "{name}{{{attributes}{key}=\"{label}\",{scope}}} {value}"
                        );
                    }
                }
                LinkValues::Histogram(histogram_of) => {
                    let h = histogram_of(stats);
                    let mut cumulative = 0;
                    for (i, count) in h.bucket_counts.iter().enumerate() {
                        cumulative += count;
                        let le = LATENCY_BOUNDS_S.get(i).copied().unwrap_or(f64::INFINITY);
                        let _ = writeln!(
                            out,
                            "{name}_bucket{{{attributes}{scope},le=\"{}\"}} {cumulative}",
                            number(le)
                        );
                    }
                    let labels = format_args!("{attributes}{scope}");
                    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", number(h.sum));
                    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
                }
            }
        }
        out
    }
}

async fn serve(State(page): State<Arc<RwLock<Page>>>) -> impl IntoResponse {
    let (links, telemetry) = {
        let page = page.read().unwrap_or_else(|e| e.into_inner());
        (page.links.clone(), page.telemetry.clone())
    };
    let pieces = links
        .into_iter()
        .flat_map(LinkPage::pieces)
        .chain(std::iter::once(telemetry))
        .filter(|piece| !piece.is_empty())
        .map(Ok::<_, std::convert::Infallible>);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from_stream(futures::stream::iter(pieces)),
    )
}

struct PrometheusExporter {
    id: String,
    endpoint: super::Endpoint,
    page: Arc<RwLock<Page>>,
    telemetry: Arc<Telemetry>,
    resource: Resource,
    /// Stops the endpoint at shutdown.
    stop: tokio_util::sync::CancellationToken,
}

#[async_trait]
impl Exporter for PrometheusExporter {
    async fn start(&mut self) -> Result<()> {
        let listener = self.endpoint.bind()?;
        let app = Router::new()
            .route("/metrics", get(serve))
            .with_state(self.page.clone());
        let (id, stop) = (self.id.clone(), self.stop.clone());
        let refused = self.telemetry.listener_refusals_of("prometheus");
        tokio::spawn(async move {
            if let Err(e) =
                super::http_listener::serve("prometheus", listener, app, stop, refused).await
            {
                tracing::error!(exporter = %id, "metrics endpoint stopped: {e:#}");
            }
        });
        tracing::info!(
            exporter = %self.id,
            "serving Prometheus metrics on http://{}/metrics",
            self.endpoint.addr
        );
        Ok(())
    }

    async fn shutdown(&mut self, _deadline: tokio::time::Instant) -> Result<u64> {
        self.stop.cancel();
        Ok(0)
    }

    async fn export(&mut self, _signal: config::Signal, data: PipelineData<'_>) -> Result<()> {
        // The page shows the newest links and the newest telemetry side by side; each
        // part is replaced when it changes, and the old one is freed once no scrape
        // still sends it.
        match data {
            PipelineData::Links(encoded) => {
                let links = Arc::new(LinkPage::new(encoded.batch.clone(), &self.resource));
                self.page.write().unwrap_or_else(|e| e.into_inner()).links = Some(links);
            }
            PipelineData::Telemetry(snapshot) => {
                let request = encode::metrics::telemetry_request(snapshot, &self.resource);
                let text = Bytes::from(render_all(&[&request], false));
                self.page
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .telemetry = text;
            }
        }
        Ok(())
    }
}

fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The OpenTelemetry-to-Prometheus metric name.
pub fn metric_name(name: &str, unit: &str, monotonic_sum: bool) -> String {
    let mut out = sanitize(name);
    let unit_suffix = match unit {
        "By" => Some("bytes"),
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        _ => None, // `{connection}`-style annotations and `1` add nothing
    };
    if let Some(suffix) = unit_suffix {
        if !out.ends_with(suffix) && !out.contains(&format!("_{suffix}_")) {
            out.push('_');
            out.push_str(suffix);
        }
    }
    if monotonic_sum && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

fn label_value(value: &Option<AnyValue>) -> String {
    let raw = match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    };
    raw.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `k="v",...` of a point's attributes followed by the scope's labels, built once per
/// point (histogram bucket lines only append `le`).
fn label_body(attributes: &[KeyValue], scope: &str) -> String {
    let mut body = String::new();
    for kv in attributes {
        let _ = write!(
            body,
            "{}=\"{}\",",
            sanitize(&kv.key),
            label_value(&kv.value)
        );
    }
    body.push_str(scope);
    body
}

/// `{body}`, or nothing for an empty body.
fn braced(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!("{{{body}}}")
    }
}

/// The instrumentation scope as the OpenTelemetry-Prometheus compatibility spec puts it
/// on every series: `otel_scope_name`, `otel_scope_version`.
fn scope_labels(
    scope: Option<&opentelemetry_proto::tonic::common::v1::InstrumentationScope>,
) -> String {
    match scope {
        Some(scope) if !scope.name.is_empty() => format!(
            "otel_scope_name=\"{}\",otel_scope_version=\"{}\"",
            scope.name, scope.version
        ),
        _ => String::new(),
    }
}

fn number(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        value.to_string()
    }
}

/// `target_info`: the resource's attributes as labels.
fn target_info(resource: &Resource) -> String {
    let body = label_body(&resource.attributes, "");
    format!(
        "# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info{} 1\n",
        braced(body.trim_end_matches(','))
    )
}

/// The text exposition of OTLP requests (telemetry, the service graph, tests).
/// The requests on one page: `target_info` once when `with_target_info` (every request
/// carries ridley's one resource), then every metric of each.
pub fn render_all(requests: &[&ExportMetricsServiceRequest], with_target_info: bool) -> String {
    let mut out = String::new();
    let mut with_info = !with_target_info;
    for rm in requests.iter().flat_map(|r| &r.resource_metrics) {
        if let (Some(resource), false) = (&rm.resource, with_info) {
            with_info = true;
            out.push_str(&target_info(resource));
        }
        for (scope, metric) in rm.scope_metrics.iter().flat_map(|sm| {
            let scope = scope_labels(sm.scope.as_ref());
            sm.metrics.iter().map(move |m| (scope.clone(), m))
        }) {
            match &metric.data {
                Some(Data::Sum(sum)) => {
                    let name = metric_name(&metric.name, &metric.unit, sum.is_monotonic);
                    let kind = if sum.is_monotonic { "counter" } else { "gauge" };
                    let _ = writeln!(
                        out,
                        "# HELP {name} {}\n# TYPE {name} {kind}",
                        metric.description
                    );
                    for p in &sum.data_points {
                        let value = match p.value {
                            Some(Value::AsInt(i)) => i as f64,
                            Some(Value::AsDouble(d)) => d,
                            None => continue,
                        };
                        let body = label_body(&p.attributes, &scope);
                        let _ = writeln!(
                            out,
                            "{name}{} {}",
                            braced(body.trim_end_matches(',')),
                            number(value)
                        );
                    }
                }
                Some(Data::Histogram(histogram)) => {
                    let name = metric_name(&metric.name, &metric.unit, false);
                    let _ = writeln!(
                        out,
                        "# HELP {name} {}\n# TYPE {name} histogram",
                        metric.description
                    );
                    for p in &histogram.data_points {
                        let body = label_body(&p.attributes, &scope);
                        let sep = if body.is_empty() || body.ends_with(',') {
                            ""
                        } else {
                            ","
                        };
                        let mut cumulative = 0;
                        for (i, count) in p.bucket_counts.iter().enumerate() {
                            cumulative += count;
                            let le = p.explicit_bounds.get(i).copied().unwrap_or(f64::INFINITY);
                            let _ = writeln!(
                                out,
                                "{name}_bucket{{{body}{sep}le=\"{}\"}} {cumulative}",
                                number(le)
                            );
                        }
                        let l = braced(body.trim_end_matches(','));
                        let _ = writeln!(out, "{name}_sum{l} {}", number(p.sum.unwrap_or(0.0)));
                        let _ = writeln!(out, "{name}_count{l} {}", p.count);
                    }
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::LinkStats;

    #[test]
    fn names_follow_the_otel_to_prometheus_mapping() {
        assert_eq!(
            metric_name("ridley.link.bytes", "By", true),
            "ridley_link_bytes_total"
        );
        assert_eq!(
            metric_name("ridley.link.rtt", "s", false),
            "ridley_link_rtt_seconds"
        );
        assert_eq!(
            metric_name("ridley.link.connections.active", "{connection}", false),
            "ridley_link_connections_active"
        );
        assert_eq!(
            metric_name("traces_service_graph_request_total", "", true),
            "traces_service_graph_request_total"
        );
        assert_eq!(
            metric_name("traces_service_graph_request_client_seconds", "s", false),
            "traces_service_graph_request_client_seconds"
        );
    }

    /// The page as a scrape receives it.
    fn page(batch: crate::model::LinkBatch) -> String {
        let page = Arc::new(LinkPage::new(Arc::new(batch), &encode::resource()));
        let pieces: Vec<Bytes> = page.pieces().collect();
        String::from_utf8(pieces.concat()).unwrap()
    }

    #[test]
    fn renders_counters_and_histograms() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut stats = LinkStats::new(t);
        stats.bytes_transmit = 42;
        stats.connect_duration.record(Duration::from_micros(70));
        let text = page(crate::model::one_link_batch(t, stats));
        let link = "client_address=\"10.0.0.1\",server_address=\"10.0.0.2\",server_port=\"80\",network_transport=\"tcp\",network_type=\"ipv4\"";
        assert!(
            text.contains("# TYPE ridley_link_bytes_total counter"),
            "{text}"
        );
        let scope = format!(
            "otel_scope_name=\"ridley\",otel_scope_version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        );
        for line in [
            format!(
                "ridley_link_bytes_total{{{link},ridley_link_direction=\"client_to_server\",{scope}}} 42"
            ),
            format!(
                "ridley_link_connect_duration_seconds_bucket{{{link},{scope},le=\"0.00005\"}} 0"
            ),
            format!(
                "ridley_link_connect_duration_seconds_bucket{{{link},{scope},le=\"0.0001\"}} 1"
            ),
            format!("ridley_link_connect_duration_seconds_bucket{{{link},{scope},le=\"+Inf\"}} 1"),
            format!("ridley_link_connect_duration_seconds_count{{{link},{scope}}} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(text.contains("target_info{service_name=\"ridley\""));
        assert!(
            !text.contains("ridley_link_connections_failed"),
            "a family without points is left out"
        );
    }

    /// The page rendered straight from the link table, piece by piece, is exactly the
    /// generic rendering of the batch's OTLP request: the two encodings cannot drift.
    #[test]
    fn the_streamed_page_is_the_otlp_request_rendered() {
        use crate::model::{FailureReason, LinkBatch, LinkKey, ServiceGraphEdge};
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut batch = LinkBatch::new(t + Duration::from_secs(10));
        let links = 2 * LINKS_PER_PIECE + 3;
        batch.links = (0..links)
            .map(|i| {
                let mut stats = LinkStats::new(t);
                stats.bytes_transmit = i as u64;
                stats.bytes_receive = 2 * i as u64;
                stats.opened = 1;
                if i % 7 == 0 {
                    stats.add_failure(FailureReason::Refused);
                }
                if i % 11 == 0 {
                    stats.add_failure(FailureReason::Timeout);
                }
                stats.rtt.record(Duration::from_micros(30 * i as u64));
                let (client, server) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
                let key = if i == links - 1 {
                    LinkKey::OVERFLOW
                } else if i % 5 == 1 {
                    stats.datagrams_transmit = 3;
                    stats.datagrams_receive = 4;
                    LinkKey::udp(client, server, 1000 + i as u16, 0)
                } else {
                    let cgroup = if i % 2 == 0 { 77 } else { 0 };
                    LinkKey::between(client, server, 1000 + i as u16, cgroup)
                };
                (key, stats)
            })
            .collect();
        batch
            .cgroups
            .insert(77, "/system.slice/a \"b\".service".into());
        batch.service_graph = vec![ServiceGraphEdge {
            client: "a".into(),
            client_namespace: "x".into(),
            server: "b".into(),
            server_namespace: "y".into(),
            overflow: false,
            start: t,
            requests: 5,
            failed: 1,
            durations: Default::default(),
        }];
        let expected = render_all(
            &[&encode::metrics::metrics_request(
                &batch,
                &encode::resource(),
            )],
            true,
        );
        let streamed = page(batch);
        assert!(streamed.contains("ridley_link_connections_failed_total{"));
        assert!(streamed.contains("traces_service_graph_request_total{"));
        assert!(streamed.contains("ridley_link_datagrams_total{"));
        assert!(streamed.contains("network_transport=\"udp\""));
        assert_eq!(streamed.lines().count(), expected.lines().count());
        for (n, (got, want)) in streamed.lines().zip(expected.lines()).enumerate() {
            assert_eq!(got, want, "line {n}");
        }
    }
}
