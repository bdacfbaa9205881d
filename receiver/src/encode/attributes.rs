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
    let dialed = key.dialed.into_iter().flat_map(|(addr, port)| {
        [
            kv_str(DIALED_ADDRESS_ATTRIBUTE, addr.to_string()),
            kv(
                "ridley.link.dialed.port",
                any_value::Value::IntValue(i64::from(port)),
            ),
        ]
    });
    client
        .into_iter()
        .chain(server)
        .chain([
            kv(
                "server.port",
                any_value::Value::IntValue(i64::from(key.server_port)),
            ),
            kv_str("network.transport", key.transport.as_str()),
            kv_str("network.type", key.network_type()),
        ])
        .chain(dialed)
        .collect()
}

/// The address a translated link's client dialled (a Service's ClusterIP), when the
/// server is the backend conntrack named.
pub const DIALED_ADDRESS_ATTRIBUTE: &str = "ridley.link.dialed.address";

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
    let ends = [
        ("client", batch.client_identity(key)),
        ("server", batch.server_identity(key)),
    ];
    for (prefix, identity) in ends {
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
    // The Service a translated link's client dialled: its backend is the server end.
    let dialed_service = key
        .dialed
        .and_then(|dialed| batch.dialed_services.get(&dialed));
    let server_names_service = ends[1].1.is_some_and(|identity| {
        identity
            .attributes
            .iter()
            .any(|(k, _)| k == "k8s.service.name")
    });
    if let (Some(service), false) = (dialed_service, server_names_service) {
        attributes.push(kv_str("server.k8s.service.name", service.clone()));
    }
    // Both zones known: whether the link crosses zones, the bytes a cloud bill charges
    // for. A function of the two ends, so it adds no series.
    fn zone(identity: Option<&crate::model::EndIdentity>) -> Option<&str> {
        identity?
            .attributes
            .iter()
            .find(|(k, _)| k == ZONE_ATTRIBUTE)
            .map(|(_, v)| v.as_str())
    }
    if let (Some(client), Some(server)) = (zone(ends[0].1), zone(ends[1].1)) {
        attributes.push(kv(
            CROSS_ZONE_ATTRIBUTE,
            any_value::Value::BoolValue(client != server),
        ));
    }
    attributes
}

/// The semantic-convention zone of an end (a resource attribute of its identity).
pub const ZONE_ATTRIBUTE: &str = "cloud.availability_zone";
/// On a link whose two ends' zones are known: `true` when they differ.
pub const CROSS_ZONE_ATTRIBUTE: &str = "ridley.link.cross_zone";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndIdentity, EndRef};

    fn zoned(zone: Option<&str>) -> EndIdentity {
        EndIdentity {
            service_name: "svc".into(),
            attributes: zone
                .map(|z| vec![(ZONE_ATTRIBUTE.to_owned(), z.to_owned())])
                .unwrap_or_default(),
        }
    }

    /// `ridley.link.cross_zone` is on a link exactly when both ends' zones are known.
    #[test]
    fn a_link_is_marked_cross_zone_only_when_both_zones_are_known() {
        let key = LinkKey::between(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            80,
            0,
        );
        let cross_zone = |client: Option<&str>, server: Option<&str>| {
            let mut batch = LinkBatch::new(SystemTime::UNIX_EPOCH);
            batch
                .ends
                .insert(EndRef::client(&key).unwrap(), zoned(client));
            batch
                .ends
                .insert(EndRef::server(&key).unwrap(), zoned(server));
            link_point_attributes(&batch, &key)
                .into_iter()
                .find(|kv| kv.key == CROSS_ZONE_ATTRIBUTE)
                .and_then(|kv| kv.value?.value)
        };
        let yes = Some(any_value::Value::BoolValue(true));
        let no = Some(any_value::Value::BoolValue(false));
        assert_eq!(cross_zone(Some("a"), Some("b")), yes);
        assert_eq!(cross_zone(Some("a"), Some("a")), no);
        assert_eq!(cross_zone(Some("a"), None), None);
        assert_eq!(cross_zone(None, None), None);
    }
}
