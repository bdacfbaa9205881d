//! Attributes shared by every signal: key-value helpers and the link attributes each
//! `ridley.link.*` point and service-graph span carries. Names here are the contract
//! documented in the README's metric table: add, never rename.
use std::time::SystemTime;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

use crate::model::{LinkBatch, LinkKey};

const SCOPE_NAME: &str = "ridley";

/// The one instrumentation scope of everything ridley exports.
pub fn scope() -> opentelemetry_proto::tonic::common::v1::InstrumentationScope {
    opentelemetry_proto::tonic::common::v1::InstrumentationScope {
        name: SCOPE_NAME.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        attributes: vec![],
        dropped_attributes_count: 0,
    }
}

pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        key_strindex: 0,
    }
}

pub fn kv_str(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The link attributes every `ridley.link.*` point and span carries: an end's address
/// where the end is an address (a workload end is named by its identity instead).
pub fn link_attributes(key: &LinkKey) -> Vec<KeyValue> {
    if key.is_overflow() {
        return vec![kv(
            "otel.metric.overflow",
            any_value::Value::BoolValue(true),
        )];
    }
    let client = if key.client_is_grouped() {
        Some(kv_str(
            "ridley.client.group",
            crate::model::GROUPED_CLIENT_NAME,
        ))
    } else {
        key.client
            .address()
            .map(|addr| kv_str("client.address", addr.to_string()))
    };
    let server = key
        .server
        .address()
        .map(|addr| kv_str("server.address", addr.to_string()));
    client
        .into_iter()
        .chain(server)
        .chain([
            kv(
                "server.port",
                any_value::Value::IntValue(i64::from(key.server_port)),
            ),
            kv_str("network.transport", "tcp"),
            kv_str("network.type", key.network_type()),
        ])
        .collect()
}

/// Link attributes plus what processors know of each end, prefixed `client.` and
/// `server.` (`client.service.name`, `server.k8s.deployment.name`, ...).
pub fn link_point_attributes(batch: &LinkBatch, key: &LinkKey) -> Vec<KeyValue> {
    let mut attributes = link_attributes(key);
    if key.is_overflow() {
        return attributes;
    }
    if key.client_cgroup != 0 {
        let path = batch.cgroups.get(&key.client_cgroup).cloned();
        attributes.push(kv_str(
            "ridley.client.cgroup",
            path.unwrap_or_else(|| key.client_cgroup.to_string()),
        ));
    }
    for (prefix, identity) in [
        ("client", batch.client_identity(key)),
        ("server", batch.server_identity(key)),
    ] {
        if let Some(identity) = identity {
            attributes.push(kv_str(
                &format!("{prefix}.service.name"),
                identity.service_name.clone(),
            ));
            for (k, v) in &identity.attributes {
                attributes.push(kv_str(&format!("{prefix}.{k}"), v.clone()));
            }
        }
    }
    attributes
}
