//! ridley's pipeline configuration, shaped like the OpenTelemetry Collector's:
//! `receivers`, `processors`, `exporters` keyed by component id (`type` or `type/name`),
//! and `service.pipelines` wiring them per signal.
//!
//! This crate owns the YAML document: parsing, component ids, pipeline wiring and
//! cross-reference checks. It must not know any component's own keys: each component
//! parses its section (kept here as an untyped YAML value) with its own config struct.
pub mod document;
pub mod limits;

use std::{collections::BTreeMap, fmt, path::PathBuf, str::FromStr};

pub use document::Source;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

/// The YAML value of one component's section, parsed later by that component.
pub type ComponentSection = serde_norway::Value;

/// The embedded default configuration (`ridley run` without `--config`).
pub const DEFAULT_CONFIG: &str = include_str!("../default.yaml");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// `location` is `file:line:column: ` when the offending key could be found.
    #[error("{location}{message}")]
    Invalid { location: String, message: String },
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
pub struct ServiceSection {
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// Extensions to start, by id (defined under `extensions`).
    #[serde(default)]
    pub extensions: Vec<ComponentId>,
    #[serde(default)]
    pub pipelines: BTreeMap<PipelineId, Pipeline>,
    /// How long exporters may take, together, to flush at shutdown (100ms to 5m).
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: std::time::Duration,
}

/// Well under Kubernetes' default 30 s grace period.
fn default_shutdown_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// ridley's own telemetry, as the collector's `service.telemetry`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    #[serde(default)]
    pub logs: LogsTelemetry,
    #[serde(default)]
    pub metrics: MetricsTelemetry,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LogsTelemetry {
    /// `error`, `warn`, `info`, `debug` or `trace`; the `RIDLEY_LOG` variable wins.
    #[serde(default = "default_log_level")]
    pub level: LogLevel,
    /// `console` (plain text, coloured only on a terminal) or `json` (one object per
    /// line, for log pipelines), as the collector's key.
    #[serde(default)]
    pub encoding: LogEncoding,
}

impl Default for LogsTelemetry {
    fn default() -> Self {
        LogsTelemetry {
            level: default_log_level(),
            encoding: LogEncoding::default(),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogEncoding {
    #[default]
    Console,
    Json,
}

fn default_log_level() -> LogLevel {
    LogLevel::Info
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsTelemetry {
    /// `basic` (default): ridley's own metrics (`ridley.exporter.*`,
    /// `ridley.receiver.losses`, `ridley.k8s.watch.errors`) go out with the link
    /// metrics; `none`: they do not.
    #[serde(default = "default_metrics_level")]
    pub level: MetricsLevel,
}

impl Default for MetricsTelemetry {
    fn default() -> Self {
        MetricsTelemetry {
            level: default_metrics_level(),
        }
    }
}

fn default_metrics_level() -> MetricsLevel {
    MetricsLevel::Basic
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricsLevel {
    None,
    Basic,
}

/// A byte size: a number of bytes, or a string with a unit (`256KiB`, `64MiB`, `1GB`).
pub fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (expected e.g. 4096, 256KiB, 64MiB)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "{text:?}: unknown size unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// The whole document.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, deserialize_with = "sections")]
    pub extensions: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default, deserialize_with = "sections")]
    pub receivers: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default, deserialize_with = "sections")]
    pub processors: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default, deserialize_with = "sections")]
    pub exporters: BTreeMap<ComponentId, ComponentSection>,
    #[serde(default)]
    pub service: ServiceSection,
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
    /// The files (or the embedded default) it came from, in merge order.
    pub sources: Vec<Source>,
    /// The merged document after `${...}` expansion.
    pub effective: serde_norway::Value,
    pub warnings: Vec<String>,
}

impl Loaded {
    /// Names the sources: `a.yaml, b.yaml`.
    pub fn origin(&self) -> String {
        self.sources
            .iter()
            .map(|s| s.origin.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `file:line:column` where `path` (`exporters.otlp.endpoint`) was last written.
    pub fn locate(&self, path: &str) -> Option<String> {
        locate_in(&self.sources, path)
    }

    /// The effective configuration as YAML (what `ridley config --print` shows), with
    /// secrets (header values, passwords, tokens, keys) shown as `[REDACTED]`.
    pub fn effective_yaml(&self) -> String {
        serde_norway::to_string(&document::redact(&self.effective)).unwrap_or_default()
    }

    /// The effective configuration as YAML, secrets included (`--no-redact`).
    pub fn effective_yaml_unredacted(&self) -> String {
        serde_norway::to_string(&self.effective).unwrap_or_default()
    }
}

fn locate_in(sources: &[Source], path: &str) -> Option<String> {
    let keys: Vec<&str> = path.split('.').filter(|k| !k.is_empty()).collect();
    if keys.is_empty() {
        return None;
    }
    // Later files override earlier ones: the last file that writes the key wins.
    sources
        .iter()
        .rev()
        .filter_map(|s| {
            document::locate(&s.text, &keys).map(|(depth, line, col)| (depth, s, line, col))
        })
        .max_by_key(|(depth, ..)| *depth)
        .map(|(_, s, line, col)| format!("{}:{line}:{col}", s.origin))
}

/// Size and nesting, checked before the YAML parser sees the text: its time grows with
/// the square of the nesting depth.
fn check_bounds(source: &Source) -> Result<(), ConfigError> {
    if source.text.len() as u64 > limits::MAX_CONFIG_FILE_SIZE {
        return Err(ConfigError::Invalid {
            location: format!("{}: ", source.origin),
            message: format!(
                "larger than the {} limit for a config file",
                limits::show_size(limits::MAX_CONFIG_FILE_SIZE)
            ),
        });
    }
    limits::nesting_depth(&source.text, limits::MAX_NESTING_DEPTH).map_err(|(line, column)| {
        ConfigError::Invalid {
            location: format!("{}:{line}:{column}: ", source.origin),
            message: format!(
                "YAML nested more than {} levels deep (the limit for a config file)",
                limits::MAX_NESTING_DEPTH
            ),
        }
    })?;
    Ok(())
}

fn invalid(sources: &[Source], path: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        location: locate_in(sources, path)
            .map(|l| format!("{l}: "))
            .unwrap_or_default(),
        message,
    }
}

impl Config {
    /// Parses and cross-checks one YAML document. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Loaded, ConfigError> {
        Config::from_sources(vec![Source {
            origin: origin.to_owned(),
            text: text.to_owned(),
        }])
    }

    /// Loads and merges `paths` in order, or the embedded default when there are none.
    /// Each must be a regular file of at most [`limits::MAX_CONFIG_FILE_SIZE`].
    pub fn load(paths: &[PathBuf]) -> Result<Loaded, ConfigError> {
        if paths.is_empty() {
            return Config::parse(DEFAULT_CONFIG, "embedded default config");
        }
        let sources = paths
            .iter()
            .map(|path| {
                let text =
                    limits::read_regular_file(path, limits::MAX_CONFIG_FILE_SIZE, "a config file")
                        .map_err(|error| ConfigError::Read {
                            path: path.display().to_string(),
                            error,
                        })?;
                Ok(Source {
                    origin: path.display().to_string(),
                    text,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Config::from_sources(sources)
    }

    fn from_sources(sources: Vec<Source>) -> Result<Loaded, ConfigError> {
        let mut merged = document::empty();
        let mut budget = limits::MAX_EXPANDED_SIZE;
        for source in &sources {
            check_bounds(source)?;
            let mut value: serde_norway::Value =
                serde_norway::from_str(&source.text).map_err(|e| {
                    let location = e
                        .location()
                        .map(|l| format!("{}:{}:{}: ", source.origin, l.line(), l.column()))
                        .unwrap_or_else(|| format!("{}: ", source.origin));
                    // The location is the prefix; serde_norway also appends it.
                    let message = e.to_string();
                    let message = message
                        .rsplit_once(" at line ")
                        .map_or(message.as_str(), |(m, _)| m)
                        .to_owned();
                    ConfigError::Invalid {
                        location,
                        message: format!("not valid YAML: {message}"),
                    }
                })?;
            if value.is_null() {
                value = document::empty();
            }
            document::expand(&mut value, &mut Vec::new(), &mut budget).map_err(
                |(path, message)| {
                    invalid(
                        std::slice::from_ref(source),
                        &path,
                        format!("{path}: {message}"),
                    )
                },
            )?;
            document::merge(&mut merged, value);
        }
        let config: Config = serde_path_to_error::deserialize(merged.clone()).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            let hint = document::suggestion(&message).unwrap_or_default();
            let shown = if path == "." {
                String::new()
            } else {
                format!("{path}: ")
            };
            invalid(&sources, &path, format!("{shown}{message}{hint}"))
        })?;
        let warnings = config.check().map_err(|message| {
            let path = message.split(':').next().unwrap_or_default().to_owned();
            invalid(&sources, &path, message)
        })?;
        Ok(Loaded {
            config,
            sources,
            effective: merged,
            warnings,
        })
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
        for id in &self.service.extensions {
            if !self.extensions.contains_key(id) {
                return Err(format!(
                    "service.extensions: {id:?} is not defined under `extensions`",
                    id = id.to_string()
                ));
            }
            used.insert(("extensions", id.clone()));
        }
        let mut warnings = Vec::new();
        for (role, defined) in [
            ("extensions", &self.extensions),
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
        let loaded = Config::load(&[]).expect("embedded default parses");
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
            "test.yaml:3:1: service.pipelines.metrics.exporters: \"file\" is not defined under `exporters`"
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
            err.starts_with("test.yaml:1:1: recievers: unknown field `recievers`"),
            "{err}"
        );
        assert!(err.ends_with("(did you mean `receivers`?)"), "{err}");
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256KiB"), Ok(262_144));
        assert_eq!(parse_size("64MiB"), Ok(67_108_864));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(
            parse_size("3 parsecs"),
            Err(
                "\"3 parsecs\": unknown size unit \"parsecs\" (B, KiB, MiB, GiB, KB, MB, GB)"
                    .into()
            )
        );
    }

    #[test]
    fn telemetry_defaults_and_levels() {
        let loaded = Config::load(&[]).unwrap();
        assert_eq!(loaded.config.service.telemetry.logs.level, LogLevel::Info);
        assert_eq!(
            loaded.config.service.telemetry.metrics.level,
            MetricsLevel::Basic
        );
        let loaded = Config::parse(
            "receivers: {ebpf: }\nexporters: {debug: }\nservice:\n  telemetry: {logs: {level: debug}, metrics: {level: none}}\n  pipelines: {metrics: {receivers: [ebpf], exporters: [debug]}}\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(loaded.config.service.telemetry.logs.level, LogLevel::Debug);
        assert_eq!(
            loaded.config.service.telemetry.metrics.level,
            MetricsLevel::None
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

    fn scratch(name: &str, contents: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("ridley-config-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    const BASE: &str = "receivers: {ebpf: }\nexporters: {debug: }\nservice: {pipelines: {metrics: {receivers: [ebpf], exporters: [debug]}}}\n";

    #[test]
    fn oversized_config_is_refused_before_parsing() {
        let limit = limits::MAX_CONFIG_FILE_SIZE as usize;
        let mut text = BASE.to_owned();
        text.push_str(&"#".repeat(limit - text.len()));
        let exact = scratch("exact.yaml", text.as_bytes());
        assert!(Config::load(std::slice::from_ref(&exact)).is_ok());
        text.push('\n');
        let big = scratch("big.yaml", text.as_bytes());
        assert_eq!(
            Config::load(std::slice::from_ref(&big))
                .unwrap_err()
                .to_string(),
            format!(
                "reading {}: larger than the 4 MiB limit for a config file",
                big.display()
            )
        );
        assert_eq!(
            Config::parse(&text, "big.yaml").unwrap_err().to_string(),
            "big.yaml: larger than the 4 MiB limit for a config file"
        );
        std::fs::remove_file(exact).unwrap();
        std::fs::remove_file(big).unwrap();
    }

    #[test]
    fn config_must_be_a_regular_file() {
        assert_eq!(
            Config::load(&[PathBuf::from("/dev/zero")])
                .unwrap_err()
                .to_string(),
            "reading /dev/zero: not a regular file (it is a character device)"
        );
        let dir = std::env::temp_dir();
        assert_eq!(
            Config::load(std::slice::from_ref(&dir))
                .unwrap_err()
                .to_string(),
            format!(
                "reading {}: not a regular file (it is a directory)",
                dir.display()
            )
        );
    }

    #[test]
    fn deep_nesting_is_refused_quickly_with_file_and_line() {
        let block: String = (0..200)
            .map(|i| format!("{}a:\n", "  ".repeat(i)))
            .collect();
        assert_eq!(
            Config::parse(&block, "deep.yaml").unwrap_err().to_string(),
            "deep.yaml:65:129: YAML nested more than 64 levels deep (the limit for a config file)"
        );
        // 600 KB of nested flow mappings: minutes in the YAML parser, refused at once.
        let flow = format!("receivers: {}", "{a: ".repeat(150_000));
        let started = std::time::Instant::now();
        assert_eq!(
            Config::parse(&flow, "flow.yaml").unwrap_err().to_string(),
            "flow.yaml:1:264: YAML nested more than 64 levels deep (the limit for a config file)"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let path = scratch("deep.yaml", flow.as_bytes());
        assert_eq!(
            Config::load(std::slice::from_ref(&path))
                .unwrap_err()
                .to_string(),
            format!(
                "{}:1:264: YAML nested more than 64 levels deep (the limit for a config file)",
                path.display()
            )
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn print_redacts_secrets_unless_asked() {
        let loaded = Config::parse(
            &format!(
                "{BASE}extensions:\n  bearer: {{token: abc, key_file: /k}}\nprocessors:\n  k8sattributes: {{keep_pod_detail: true}}\n"
            ),
            "t.yaml",
        )
        .unwrap();
        let printed = loaded.effective_yaml();
        assert!(
            printed.contains("  bearer:\n    token: '[REDACTED]'\n    key_file: /k\n"),
            "{printed}"
        );
        assert!(printed.contains("    keep_pod_detail: true\n"), "{printed}");
        assert!(!printed.contains("abc"), "{printed}");
        let full = loaded.effective_yaml_unredacted();
        assert!(
            full.contains("  bearer:\n    token: abc\n    key_file: /k\n"),
            "{full}"
        );
    }
}
