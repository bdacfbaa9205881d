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

use anyhow::{Result, bail};
use config::{ComponentSection, Signal};

use crate::component::{BuildContext, Exporter, Extension, Processor, Receiver};

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

/// The keys a config struct accepts, read from its `Deserialize` implementation: serde
/// hands a struct's field names to `deserialize_struct`, and this deserializer does
/// nothing but keep them. The list cannot drift from the code.
fn config_keys<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct KeyProbe<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for KeyProbe<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("keys read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The error is the point: the probe stops as soon as it has the field names.
    let _ = T::deserialize(KeyProbe(&mut fields));
    fields
}

fn build<T>(
    role: &str,
    table: &[Entry<T>],
    cx: &BuildContext,
    section: ComponentSection,
) -> Result<T> {
    let id = &cx.id;
    match table.iter().find(|(kind, _, _, _)| *kind == id.kind()) {
        Some((_, signals, factory, _)) => {
            if let Some(unsupported) = cx.signals.iter().find(|s| !signals.contains(s)) {
                bail!(
                    "{role}.{id}: cannot be used in a {unsupported} pipeline (it supports {})",
                    signals
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            factory(cx, section)
        }
        None => {
            let known: Vec<&str> = table.iter().map(|(kind, _, _, _)| *kind).collect();
            bail!(
                "{role}.{id}: unknown {role} type {:?} (available: {})",
                id.kind(),
                if known.is_empty() {
                    "none yet".to_owned()
                } else {
                    known.join(", ")
                }
            )
        }
    }
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
fn endpoint(cx: &BuildContext, role: &str, endpoint: &str) -> Result<Endpoint> {
    use anyhow::Context;
    let key = format!("{role}.{}.endpoint", cx.id);
    let addr =
        parse_endpoint(endpoint).with_context(|| format!("{key}: {endpoint:?} is not ip:port"))?;
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
    build("extensions", EXTENSIONS, cx, section)
}

pub fn build_receiver(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Receiver>> {
    build("receivers", RECEIVERS, cx, section)
}

pub fn build_processor(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Processor>> {
    build("processors", PROCESSORS, cx, section)
}

/// The signals an exporter type serves (none for an unknown type).
pub fn exporter_signals(kind: &str) -> &'static [Signal] {
    EXPORTERS
        .iter()
        .find(|(k, _, _, _)| *k == kind)
        .map_or(&[], |(_, signals, _, _)| *signals)
}

pub fn build_exporter(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    build("exporters", EXPORTERS, cx, section)
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
            "collection_interval,idle_timeout,max_connections,ring_buffer_size,span_pairs_per_link,max_links,group_public_clients,keep_client_ranges,allow_partial_capture"
        );
        assert_eq!(keys("file"), "path");
        assert_eq!(keys("health_check"), "endpoint,path");
        assert!(keys("otlp").starts_with("endpoint,metrics_endpoint,traces_endpoint,tls,headers"));
        assert_eq!(keys("servicegraph"), "max_edges,edge_expiration");
        assert_eq!(all.len(), 11);
    }
}
