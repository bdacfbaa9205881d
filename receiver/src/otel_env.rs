//! The OpenTelemetry environment variables users set everywhere, read as an SDK reads
//! them: they fill what the YAML leaves unset, and the YAML's values win.
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT`: an `otlp` / `otlphttp` exporter without `endpoint`.
//! - `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: an
//!   `otlphttp` exporter without `metrics_endpoint` / `traces_endpoint` (full URLs).
//! - `OTEL_EXPORTER_OTLP_HEADERS`: an exporter without `headers` (`k=v,k2=v2`,
//!   values percent-decoded); `OTEL_EXPORTER_OTLP_METRICS_HEADERS` and
//!   `OTEL_EXPORTER_OTLP_TRACES_HEADERS` add to them for their signal, a key they both
//!   name taking the signal's value (the specification: signal-specific wins).
//! - `OTEL_RESOURCE_ATTRIBUTES` (`k=v,...`) and `OTEL_SERVICE_NAME`: ridley's own
//!   resource, over what ridley detects (the node), `OTEL_SERVICE_NAME` last.
//!
//! `OTEL_EXPORTER_OTLP_PROTOCOL` is not read: the exporter's type (`otlp` is gRPC,
//! `otlphttp` is HTTP/protobuf) says it.
use std::collections::BTreeMap;

/// Where variables come from: the process environment, or a table in tests.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, empty values counting as unset (as the specification says).
pub fn process(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `k=v,k2=v2` as the specification's W3C-baggage-like list: keys trimmed, values
/// percent-decoded; entries without `=` are skipped.
pub fn parse_list(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|entry| {
            let (key, value) = entry.split_once('=')?;
            let key = key.trim();
            if key.is_empty() {
                return None;
            }
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8_lossy()
                .into_owned();
            Some((key.to_owned(), value))
        })
        .collect()
}

/// What an OTLP exporter takes from the environment for the keys its YAML left unset.
#[derive(Debug, Default, PartialEq)]
pub struct OtlpDefaults {
    pub endpoint: Option<String>,
    pub metrics_endpoint: Option<String>,
    pub traces_endpoint: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub metrics_headers: BTreeMap<String, String>,
    pub traces_headers: BTreeMap<String, String>,
}

pub fn otlp_defaults(env: Lookup) -> OtlpDefaults {
    OtlpDefaults {
        endpoint: env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        metrics_endpoint: env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        traces_endpoint: env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        headers: headers(env, "OTEL_EXPORTER_OTLP_HEADERS"),
        metrics_headers: headers(env, "OTEL_EXPORTER_OTLP_METRICS_HEADERS"),
        traces_headers: headers(env, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
    }
}

fn headers(env: Lookup, name: &str) -> BTreeMap<String, String> {
    env(name)
        .map(|h| parse_list(&h).into_iter().collect())
        .unwrap_or_default()
}

/// The attributes the environment puts on ridley's own resource, in the order they
/// apply (later ones win).
pub fn resource_attributes(env: Lookup) -> Vec<(String, String)> {
    let mut attributes = env("OTEL_RESOURCE_ATTRIBUTES")
        .map(|list| parse_list(&list))
        .unwrap_or_default();
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        attributes.push(("service.name".to_owned(), name));
    }
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn lists_are_split_trimmed_and_percent_decoded() {
        assert_eq!(
            parse_list("api-key=abc%3D%3D, x-tenant = team a ,broken,=nokey"),
            vec![
                ("api-key".to_owned(), "abc==".to_owned()),
                ("x-tenant".to_owned(), "team a".to_owned()),
            ]
        );
    }

    #[test]
    fn the_service_name_variable_wins_over_the_attribute_list() {
        let env = table(&[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-list,deployment.environment.name=prod",
            ),
            ("OTEL_SERVICE_NAME", "ridley-prod"),
        ]);
        let attributes = resource_attributes(&env);
        let last_name = attributes
            .iter()
            .rev()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.as_str());
        assert_eq!(last_name, Some("ridley-prod"));
        assert!(attributes.contains(&("deployment.environment.name".into(), "prod".into())));
    }

    #[test]
    fn exporter_defaults_come_from_the_specification_names() {
        let env = table(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-scope-orgid=traces"),
        ]);
        let defaults = otlp_defaults(&env);
        assert!(defaults.metrics_headers.is_empty());
        assert_eq!(
            defaults
                .traces_headers
                .get("x-scope-orgid")
                .map(String::as_str),
            Some("traces")
        );
        assert_eq!(defaults.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(defaults.metrics_endpoint, None);
        assert_eq!(
            defaults.headers.get("authorization").map(String::as_str),
            Some("Bearer t")
        );
    }
}
