//! The `otlphttp` exporter: OTLP over HTTP with protobuf bodies (opentelemetry-proto
//! messages encoded by prost), with the collector's keys. Queueing and retries:
//! `otlp_exporter`.
use std::{io::Write, sync::Arc};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use config::{ComponentSection, Signal};
use reqwest::{
    StatusCode,
    header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue},
};

use super::otlp_exporter::{Compression, OtlpConfig, OtlpExporter, Payload, SendError, Transport};
use crate::component::{BuildContext, Exporter};

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    let mut config: OtlpConfig = cx.parse_section(section)?;
    config.fill_from_env(
        crate::otel_env::otlp_defaults(&crate::otel_env::process),
        true,
    );
    let transport = HttpTransport::new(&config)?;
    Ok(Box::new(OtlpExporter::new(
        cx,
        &config,
        Arc::new(transport),
    )))
}

struct HttpTransport {
    client: reqwest::Client,
    metrics_url: String,
    traces_url: String,
    /// Each signal's headers (`headers` and the signal's own).
    metrics_headers: HeaderMap,
    traces_headers: HeaderMap,
    compression: Compression,
}

fn signal_url(base: &str, explicit: &Option<String>, path: &str) -> Result<String> {
    let url = match explicit {
        Some(url) => url.clone(),
        None => format!("{}/{path}", base.trim_end_matches('/')),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{url:?}: an otlphttp endpoint is a URL (http:// or https://)");
    }
    Ok(url)
}

impl HttpTransport {
    fn new(config: &OtlpConfig) -> Result<Self> {
        config.validate()?;
        let header_map = |signal: Signal| -> Result<HeaderMap> {
            let mut headers = HeaderMap::new();
            for (key, value) in &config.headers_for(signal) {
                headers.insert(
                    HeaderName::from_bytes(key.as_bytes())
                        .with_context(|| format!("headers: invalid name {key:?}"))?,
                    HeaderValue::from_str(value)
                        .with_context(|| format!("headers.{key}: invalid value"))?,
                );
            }
            Ok(headers)
        };
        let metrics_headers = header_map(Signal::Metrics)?;
        let traces_headers = header_map(Signal::Traces)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .default_headers(headers)
            .use_rustls_tls();
        // ridley's own TLS setup (system roots, ca_file, client certificate): the same
        // rules as the gRPC exporter.
        builder = builder.use_preconfigured_tls(super::tls::client_config(
            &config.tls,
            &[b"h2", b"http/1.1"],
        )?);
        Ok(HttpTransport {
            client: builder.build().context("building the HTTP client")?,
            metrics_url: signal_url(&config.endpoint, &config.metrics_endpoint, "v1/metrics")?,
            traces_url: signal_url(&config.endpoint, &config.traces_endpoint, "v1/traces")?,
            metrics_headers,
            traces_headers,
            compression: config.compression,
        })
    }
}

/// The body as sent, and its `Content-Encoding`.
/// Uncompressed, the queued body itself is sent (shared, not copied).
fn compress(
    compression: Compression,
    body: &Bytes,
) -> std::io::Result<(Bytes, Option<&'static str>)> {
    match compression {
        Compression::None => Ok((body.clone(), None)),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(body)?;
            Ok((encoder.finish()?.into(), Some("gzip")))
        }
        // Level 1: the fast end, as the collector's default for zstd.
        Compression::Zstd => Ok((zstd::bulk::compress(body, 1)?.into(), Some("zstd"))),
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn send(&self, payload: &Payload) -> Result<(), SendError> {
        let (url, headers) = match payload {
            Payload::Metrics { .. } => (&self.metrics_url, &self.metrics_headers),
            Payload::Traces { .. } => (&self.traces_url, &self.traces_headers),
        };
        let mut request = self.client.post(url.as_str()).headers(headers.clone());
        let (body, encoding) =
            compress(self.compression, payload.body()).map_err(|e| SendError {
                retryable: false,
                throttle: None,
                message: format!("compressing the request: {e}"),
            })?;
        if let Some(encoding) = encoding {
            request = request.header(CONTENT_ENCODING, encoding);
        }
        let response = request.body(body).send().await.map_err(|e| SendError {
            retryable: true,
            throttle: None,
            // reqwest's Display hides the cause (connection refused, certificate
            // rejected): keep the whole chain.
            message: format!("{url}: {}", super::otlp_exporter::error_chain(&e)),
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // The OTLP spec's retryable HTTP statuses.
        let retryable = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        );
        let throttle = retry_after(response.headers(), std::time::SystemTime::now());
        Err(SendError {
            retryable,
            throttle,
            message: format!("{url}: HTTP {status}"),
        })
    }
}

/// The server's `Retry-After`: seconds, or an HTTP date (RFC 9110). Capped at an hour:
/// a bogus value must not silence an exporter for good.
fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<std::time::Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => std::time::Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(wait.min(super::otlp_exporter::MAX_THROTTLE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let with = |value: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(with("60"), Some(std::time::Duration::from_secs(60)));
        let later = httpdate::fmt_http_date(now + std::time::Duration::from_secs(120));
        assert_eq!(with(&later), Some(std::time::Duration::from_secs(120)));
        assert_eq!(with("999999"), Some(std::time::Duration::from_secs(3600)));
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after(&reqwest::header::HeaderMap::new(), now), None);
    }

    #[test]
    fn bodies_are_compressed_as_their_encoding_header_says() {
        use std::io::Read;
        let body: Bytes = (0..10_000u32)
            .flat_map(|n| (n % 97).to_le_bytes())
            .collect::<Vec<u8>>()
            .into();
        let (zstd_body, encoding) = compress(Compression::Zstd, &body).unwrap();
        assert_eq!(encoding, Some("zstd"));
        assert!(zstd_body.len() < body.len() / 4);
        assert_eq!(
            zstd::bulk::decompress(&zstd_body, body.len()).unwrap(),
            body
        );
        let (gzip_body, encoding) = compress(Compression::Gzip, &body).unwrap();
        assert_eq!(encoding, Some("gzip"));
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&gzip_body[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, body);
        assert_eq!(compress(Compression::None, &body).unwrap(), (body, None));
    }
}
