//! ridley's pipeline configuration, shaped like the OpenTelemetry Collector's:
//! `receivers`, `processors`, `exporters` keyed by component id (`type` or `type/name`),
//! and `service.pipelines` wiring them per signal.
//!
//! This crate owns the YAML document: parsing, component ids, pipeline wiring and
//! cross-reference checks. It must not know any component's own keys: each component
//! parses its section (kept here as an untyped YAML value) with its own config struct.
use std::{collections::BTreeMap, fmt, path::Path, str::FromStr};

use serde::{Deserialize, Deserializer};
use thiserror::Error;

/// The YAML value of one component's section, parsed later by that component.
pub type ComponentSection = serde_norway::Value;

/// The embedded default configuration (`ridley run` without `--config`).
pub const DEFAULT_CONFIG: &str = include_str!("../default.yaml");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: serde_norway::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// A component id: `type` or `type/name`, as in the collector (`otlp`, `otlp/tempo`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComponentId {
    kind: String,
    name: Option<String>,
}

impl ComponentId {
    /// The component type, which selects the implementation in the registry.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

impl FromStr for ComponentId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = match s.split_once('/') {
            Some((kind, name)) => (kind, Some(name)),
            None => (s, None),
        };
        let valid_kind = !kind.is_empty()
            && kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_kind {
            return Err(format!(
                "invalid component id {s:?}: the type must be lowercase letters, digits or '_'"
            ));
        }
        if let Some(name) = name {
            if name.is_empty() || name.contains('/') {
                return Err(format!(
                    "invalid component id {s:?}: expected `type` or `type/name`"
                ));
            }
        }
        Ok(ComponentId {
            kind: kind.to_owned(),
            name: name.map(str::to_owned),
        })
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{}/{}", self.kind, name),
            None => f.write_str(&self.kind),
        }
    }
}

impl<'de> Deserialize<'de> for ComponentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The signal a pipeline carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    Metrics,
    Traces,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
        })
    }
}

/// A pipeline id: `metrics`, `metrics/name`, `traces`, `traces/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PipelineId {
    pub signal: Signal,
    pub name: Option<String>,
}

impl fmt::Display for PipelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{}/{}", self.signal, name),
            None => write!(f, "{}", self.signal),
        }
    }
}

impl<'de> Deserialize<'de> for PipelineId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (signal, name) = match s.split_once('/') {
            Some((signal, name)) => (signal, Some(name.to_owned())),
            None => (s.as_str(), None),
        };
        let signal = match signal {
            "metrics" => Signal::Metrics,
            "traces" => Signal::Traces,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown pipeline signal {other:?}: expected `metrics` or `traces`"
                )));
            }
        };
        Ok(PipelineId { signal, name })
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    #[serde(default)]
    pub receivers: Vec<ComponentId>,
    #[serde(default)]
    pub processors: Vec<ComponentId>,
    #[serde(default)]
    pub exporters: Vec<ComponentId>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(default)]
    pub pipelines: BTreeMap<PipelineId, Pipeline>,
}

/// The whole document.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, deserialize_with = "sections")]
    pub receivers: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default, deserialize_with = "sections")]
    pub processors: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default, deserialize_with = "sections")]
    pub exporters: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default)]
    pub service: Service,
}

/// `exporters: {debug: }` is an empty section, as in the collector: treat null as `{}`.
fn sections<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<ComponentId, ComponentSection>, D::Error> {
    let raw = Option::<BTreeMap<ComponentId, ComponentSection>>::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(id, section)| {
            let section = match section {
                serde_norway::Value::Null => {
                    serde_norway::Value::Mapping(serde_norway::Mapping::new())
                }
                other => other,
            };
            (id, section)
        })
        .collect())
}

/// A loaded, cross-checked configuration plus the warnings worth logging.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub origin: String,
    pub warnings: Vec<String>,
}

impl Config {
    /// Parses and cross-checks one YAML document. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Loaded, ConfigError> {
        let config: Config = serde_norway::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        let warnings = config.check().map_err(|message| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        })?;
        Ok(Loaded {
            config,
            origin: origin.to_owned(),
            warnings,
        })
    }

    /// Loads `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        match path {
            None => Config::parse(DEFAULT_CONFIG, "embedded default config"),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Config::parse(&text, &path.display().to_string())
            }
        }
    }

    /// Cross-references: a pipeline must name defined components and have at least one
    /// receiver and one exporter. Components defined but unused are warnings.
    fn check(&self) -> Result<Vec<String>, String> {
        if self.service.pipelines.is_empty() {
            return Err("service.pipelines: at least one pipeline is required".into());
        }
        let mut used = std::collections::BTreeSet::new();
        for (pipeline_id, pipeline) in &self.service.pipelines {
            for (role, ids, defined) in [
                ("receivers", &pipeline.receivers, &self.receivers),
                ("processors", &pipeline.processors, &self.processors),
                ("exporters", &pipeline.exporters, &self.exporters),
            ] {
                let mut seen = std::collections::BTreeSet::new();
                for id in ids {
                    if !defined.contains_key(id) {
                        return Err(format!(
                            "service.pipelines.{pipeline_id}.{role}: {id:?} is not defined under `{role}`",
                            id = id.to_string()
                        ));
                    }
                    if !seen.insert(id) {
                        return Err(format!(
                            "service.pipelines.{pipeline_id}.{role}: {id} is listed twice"
                        ));
                    }
                    used.insert((role, id.clone()));
                }
            }
            if pipeline.receivers.is_empty() {
                return Err(format!(
                    "service.pipelines.{pipeline_id}.receivers: at least one receiver is required"
                ));
            }
            if pipeline.exporters.is_empty() {
                return Err(format!(
                    "service.pipelines.{pipeline_id}.exporters: at least one exporter is required"
                ));
            }
        }
        let mut warnings = Vec::new();
        for (role, defined) in [
            ("receivers", &self.receivers),
            ("processors", &self.processors),
            ("exporters", &self.exporters),
        ] {
            for id in defined.keys() {
                if !used.contains(&(role, id.clone())) {
                    warnings.push(format!("{role}.{id} is defined but used in no pipeline"));
                }
            }
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_wires_ebpf_to_debug() {
        let loaded = Config::load(None).expect("embedded default parses");
        let metrics = &loaded.config.service.pipelines[&PipelineId {
            signal: Signal::Metrics,
            name: None,
        }];
        assert_eq!(metrics.receivers, vec!["ebpf".parse().unwrap()]);
        assert_eq!(metrics.exporters, vec!["debug".parse().unwrap()]);
        assert!(loaded.warnings.is_empty());
        // `debug:` with no value is an empty section, not null.
        assert!(loaded.config.exporters[&"debug".parse().unwrap()].is_mapping());
    }

    #[test]
    fn component_ids_follow_the_collector() {
        let id: ComponentId = "file/links".parse().unwrap();
        assert_eq!(id.kind(), "file");
        assert_eq!(id.to_string(), "file/links");
        assert!("File".parse::<ComponentId>().is_err());
        assert!("file/".parse::<ComponentId>().is_err());
        assert!("a/b/c".parse::<ComponentId>().is_err());
    }

    #[test]
    fn undefined_component_in_pipeline_is_an_error() {
        let err = Config::parse(
            "receivers: {ebpf: }\nexporters: {debug: }\nservice: {pipelines: {metrics: {receivers: [ebpf], exporters: [file]}}}",
            "test.yaml",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "test.yaml: service.pipelines.metrics.exporters: \"file\" is not defined under `exporters`"
        );
    }

    #[test]
    fn unused_component_is_a_warning() {
        let loaded = Config::parse(
            "receivers: {ebpf: }\nexporters: {debug: , file: {path: x}}\nservice: {pipelines: {metrics: {receivers: [ebpf], exporters: [debug]}}}",
            "test.yaml",
        )
        .unwrap();
        assert_eq!(
            loaded.warnings,
            vec!["exporters.file is defined but used in no pipeline".to_string()]
        );
    }

    #[test]
    fn unknown_top_level_key_is_rejected() {
        let err = Config::parse("recievers: {}\n", "test.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.yaml: unknown field `recievers`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_signal_is_rejected() {
        let err = Config::parse(
            "service: {pipelines: {logs: {receivers: [ebpf]}}}\n",
            "test.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown pipeline signal \"logs\""), "{err}");
    }
}
