//! The component registry: type name -> constructor, per role. Adding a component is
//! one module and one line in a table below.
mod debug;
mod ebpf;
mod file;
mod health_check;
mod http_listener;
mod k8sattributes;
mod otlp;
mod otlp_exporter;
mod otlphttp;
mod prometheus;
mod servicegraph;
mod tls;

use anyhow::Result;
use config::{ComponentSection, Signal};

use crate::component::{BuildContext, Exporter, Extension, Processor, Receiver, config_keys};

type Factory<T> = fn(&BuildContext, ComponentSection) -> Result<T>;

const METRICS: &[Signal] = &[Signal::Metrics];
const ALL_SIGNALS: &[Signal] = &[Signal::Metrics, Signal::Traces];

/// The top-level keys of a component's config struct.
type Keys = fn() -> &'static [&'static str];

/// (type, signals it can serve, constructor, config keys)
type Entry<T> = (&'static str, &'static [Signal], Factory<T>, Keys);

const EXTENSIONS: &[Entry<Box<dyn Extension>>] = &[(
    "health_check",
    ALL_SIGNALS,
    health_check::build,
    config_keys::<health_check::HealthCheckConfig>,
)];

const RECEIVERS: &[Entry<Box<dyn Receiver>>] = &[(
    "ebpf",
    ALL_SIGNALS,
    ebpf::build,
    config_keys::<ebpf::EbpfConfig>,
)];

const PROCESSORS: &[Entry<Box<dyn Processor>>] = &[
    (
        "k8sattributes",
        ALL_SIGNALS,
        k8sattributes::build,
        config_keys::<k8sattributes::K8sAttributesConfig>,
    ),
    (
        "servicegraph",
        METRICS,
        servicegraph::build,
        config_keys::<servicegraph::ServiceGraphConfig>,
    ),
];

const EXPORTERS: &[Entry<Box<dyn Exporter>>] = &[
    (
        "debug",
        ALL_SIGNALS,
        debug::build,
        config_keys::<debug::DebugConfig>,
    ),
    (
        "file",
        ALL_SIGNALS,
        file::build,
        config_keys::<file::FileConfig>,
    ),
    (
        "otlp",
        ALL_SIGNALS,
        otlp::build,
        config_keys::<otlp_exporter::OtlpConfig>,
    ),
    (
        "otlphttp",
        ALL_SIGNALS,
        otlphttp::build,
        config_keys::<otlp_exporter::OtlpConfig>,
    ),
    // The collector's current names for the same two exporters.
    (
        "otlp_grpc",
        ALL_SIGNALS,
        otlp::build,
        config_keys::<otlp_exporter::OtlpConfig>,
    ),
    (
        "otlp_http",
        ALL_SIGNALS,
        otlphttp::build,
        config_keys::<otlp_exporter::OtlpConfig>,
    ),
    (
        "prometheus",
        METRICS,
        prometheus::build,
        config_keys::<prometheus::PrometheusConfig>,
    ),
];

/// Builds a component of `cx.role` from its table; every error is placed at the
/// component's section (or the key a [`InvalidKey`](crate::component::InvalidKey) names).
fn build<T>(table: &[Entry<T>], cx: &BuildContext, section: ComponentSection) -> Result<T> {
    let role = cx.role;
    let Some((_, signals, factory, _)) = table.iter().find(|(kind, _, _, _)| *kind == cx.id.kind())
    else {
        let known: Vec<&str> = table.iter().map(|(kind, _, _, _)| *kind).collect();
        return Err(cx.locate(anyhow::anyhow!(
            "unknown {role} type {:?} (available: {})",
            cx.id.kind(),
            if known.is_empty() {
                "none yet".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    if let Some(unsupported) = cx.signals.iter().find(|s| !signals.contains(s)) {
        let supported: Vec<String> = signals.iter().map(|s| s.to_string()).collect();
        return Err(cx.locate(anyhow::anyhow!(
            "cannot be used in a {unsupported} pipeline (it supports {})",
            supported.join(", ")
        )));
    }
    factory(cx, section).map_err(|e| cx.locate(e))
}

/// One row of `ridley components`.
pub struct Description {
    pub role: &'static str,
    pub kind: &'static str,
    pub signals: &'static [Signal],
    /// The component's top-level config keys.
    pub keys: Vec<String>,
}

/// Every registered component with the keys its config accepts, from its config
/// struct's `Deserialize` implementation (see `config_keys`).
pub fn describe() -> Vec<Description> {
    fn rows<T>(role: &'static str, table: &[Entry<T>], out: &mut Vec<Description>) {
        out.extend(table.iter().map(|(kind, signals, _, keys)| Description {
            role,
            kind,
            signals,
            keys: keys().iter().map(|k| k.to_string()).collect(),
        }));
    }
    let mut out = Vec::new();
    rows("extension", EXTENSIONS, &mut out);
    rows("receiver", RECEIVERS, &mut out);
    rows("processor", PROCESSORS, &mut out);
    rows("exporter", EXPORTERS, &mut out);
    out
}

/// A component's `endpoint` (`ip:port`), checked when the component is built; the
/// error names the key.
fn endpoint(cx: &BuildContext, endpoint: &str) -> Result<Endpoint> {
    let key = cx.path(Some("endpoint")).join(".");
    let addr = parse_endpoint(endpoint).map_err(|e| {
        crate::component::key_error("endpoint", format!("{endpoint:?} is not ip:port: {e}"))
    })?;
    Ok(Endpoint { key, addr })
}

/// Where a component listens, and the key that said so.
struct Endpoint {
    key: String,
    addr: std::net::SocketAddr,
}

impl Endpoint {
    /// Binds it: called when the component starts, so that a port in use stops the
    /// daemon before capture starts, naming the key.
    fn bind(&self) -> Result<tokio::net::TcpListener> {
        use anyhow::Context;
        let listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("{}: listening on {}", self.key, self.addr))?;
        listener.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }
}

/// `ip:port`, `[ipv6]:port`, or a bare IPv6 address before the last colon, which is
/// what `${env:POD_IP}:port` gives on an IPv6 cluster.
fn parse_endpoint(endpoint: &str) -> Result<std::net::SocketAddr> {
    if let Ok(addr) = endpoint.parse() {
        return Ok(addr);
    }
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("no port"))?;
    let ip: std::net::IpAddr = host.parse()?;
    Ok(std::net::SocketAddr::new(ip, port.parse()?))
}

pub fn build_extension(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Extension>> {
    build(EXTENSIONS, cx, section)
}

pub fn build_receiver(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Receiver>> {
    build(RECEIVERS, cx, section)
}

pub fn build_processor(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Processor>> {
    build(PROCESSORS, cx, section)
}

/// The signals an exporter type serves (none for an unknown type).
pub fn exporter_signals(kind: &str) -> &'static [Signal] {
    EXPORTERS
        .iter()
        .find(|(k, _, _, _)| *k == kind)
        .map_or(&[], |(_, signals, _, _)| *signals)
}

pub fn build_exporter(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    build(EXPORTERS, cx, section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_bare_ipv6_addresses_parse() {
        let parse = |s: &str| parse_endpoint(s).map(|a| a.to_string()).ok();
        assert_eq!(parse("10.1.2.3:13133").as_deref(), Some("10.1.2.3:13133"));
        assert_eq!(parse("[fd00::1]:13133").as_deref(), Some("[fd00::1]:13133"));
        assert_eq!(parse("fd00::1:13133").as_deref(), Some("[fd00::1]:13133"));
        assert_eq!(parse("localhost:13133"), None);
        assert_eq!(parse("10.1.2.3"), None);
    }

    #[test]
    fn components_describe_their_keys() {
        let all = describe();
        let keys = |kind: &str| {
            all.iter()
                .find(|d| d.kind == kind)
                .map(|d| d.keys.join(","))
                .unwrap_or_default()
        };
        assert_eq!(
            keys("ebpf"),
            "collection_interval,idle_timeout,max_connections,ring_buffer_size,span_pairs_per_link,max_links,group_public_clients,keep_client_ranges,udp_links,max_udp_flows,allow_partial_capture,conntrack,socket_state"
        );
        assert_eq!(keys("file"), "path");
        assert_eq!(keys("health_check"), "endpoint,path");
        assert!(keys("otlp").starts_with("endpoint,metrics_endpoint,traces_endpoint,tls,headers"));
        assert_eq!(keys("servicegraph"), "max_edges,edge_expiration");
        assert_eq!(all.len(), 11);
    }
}
