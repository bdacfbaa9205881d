//! The `health_check` extension, as the collector's: an HTTP endpoint for Kubernetes
//! probes. `path` (default `/`) answers 200 when every receiver is capturing (eBPF
//! programs attached) and no exporter's last send failed, else 503, with the details
//! as JSON; `/livez` answers 200 while the process serves at all.
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use config::ComponentSection;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{
    component::{BuildContext, Extension},
    telemetry::Telemetry,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub endpoint: String,
    pub path: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            // Loopback by default, as the collector's; the DaemonSet binds the pod IP.
            endpoint: "127.0.0.1:13133".to_owned(),
            path: "/".to_owned(),
        }
    }
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Extension>> {
    let config: HealthCheckConfig = cx.parse_section(section)?;
    if !config.path.starts_with('/') || config.path == "/livez" {
        return Err(crate::component::key_error(
            "path",
            "must start with / and not be /livez",
        ));
    }
    Ok(Box::new(HealthCheck {
        endpoint: super::endpoint(cx, &config.endpoint)?,
        listener: None,
        path: config.path,
    }))
}

struct HealthCheck {
    endpoint: super::Endpoint,
    listener: Option<tokio::net::TcpListener>,
    path: String,
}

async fn readiness(
    State(telemetry): State<Arc<Telemetry>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let (ready, expected) = telemetry.receivers();
    let exporters: serde_json::Map<String, serde_json::Value> = telemetry
        .snapshot()
        .into_iter()
        .map(|e| {
            let state = if e.failing { "failing" } else { "ok" };
            (format!("{}/{}", e.exporter, e.signal), state.into())
        })
        .collect();
    let capturing = ready == expected;
    let problems = telemetry.capture_problems();
    let complete = problems.is_empty() || telemetry.partial_capture_accepted();
    let healthy = capturing && complete && exporters.values().all(|v| v == "ok");
    let receivers = match (capturing, problems.is_empty()) {
        (false, _) => "starting",
        (true, true) => "capturing",
        (true, false) => "partial",
    };
    let body = serde_json::json!({
        "status": if healthy { "ready" } else { "not ready" },
        "receivers": receivers,
        "capture_problems": problems,
        "exporters": exporters,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

#[async_trait]
impl Extension for HealthCheck {
    async fn start(&mut self) -> Result<()> {
        self.listener = Some(self.endpoint.bind()?);
        Ok(())
    }

    async fn run(
        self: Box<Self>,
        telemetry: Arc<Telemetry>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let Some(listener) = self.listener else {
            return Ok(());
        };
        let local = listener.local_addr()?;
        let refused = telemetry.listener_refusals_of("health_check");
        let app = Router::new()
            .route(&self.path, get(readiness))
            .route("/livez", get(|| async { "alive" }))
            .with_state(telemetry);
        tracing::info!("health check on http://{local}{}", self.path);
        super::http_listener::serve("health_check", listener, app, shutdown, refused)
            .await
            .context("serving the health check")
    }
}
