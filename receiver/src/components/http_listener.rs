//! Serving an HTTP endpoint (health_check, prometheus) with bounds a hostile or broken
//! client cannot push past: at most [`MAX_CONNECTIONS`] at once (more are closed at
//! accept), request headers within [`HEADER_READ_TIMEOUT`], and no connection older
//! than [`MAX_CONNECTION_AGE`]. Probes and scrapes are one short request each.
use std::{sync::Arc, time::Duration};

use anyhow::Result;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

/// Connections served at once per endpoint; each costs a file descriptor and a task.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection, idle or not, is closed after this long.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until `shutdown`; connections closed at accept are
/// counted in `refused` (`ridley.listener.refused`). Accept errors (out of descriptors, a
/// reset before accept) are logged once per kind of error and never end the server.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    refused: Arc<std::sync::atomic::AtomicU64>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_error: Option<std::io::ErrorKind> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if last_error != Some(e.kind()) {
                    tracing::warn!(endpoint = name, "accepting a connection failed: {e}");
                    last_error = Some(e.kind());
                }
                // Out of descriptors: give the others a moment to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let before = refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if before == 0 {
                tracing::warn!(
                    endpoint = name,
                    limit = MAX_CONNECTIONS,
                    "connection limit reached: new connections are closed at once"
                );
            }
            drop(stream);
            continue;
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {},
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {},
                _ = shutdown.cancelled() => {},
            }
        });
    }
}
