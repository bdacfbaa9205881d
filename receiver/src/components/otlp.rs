//! The `otlp` exporter: OTLP over gRPC (tonic, with opentelemetry-proto's generated
//! service clients), with the collector's keys. Queueing and retries: `otlp_exporter`.
use std::{str::FromStr, sync::Arc};

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::{BufMut, Bytes};
use config::{ComponentSection, Signal};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceResponse, trace::v1::ExportTraceServiceResponse,
};
use tonic::{
    Code,
    client::Grpc,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, Endpoint},
};

use super::otlp_exporter::{Compression, OtlpConfig, OtlpExporter, Payload, SendError, Transport};
use crate::component::{BuildContext, Exporter};

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Exporter>> {
    let mut config: OtlpConfig = cx.parse_section(section)?;
    config.fill_from_env(
        crate::otel_env::otlp_defaults(&crate::otel_env::process),
        false,
    );
    let transport = GrpcTransport::new(&config)?;
    Ok(Box::new(OtlpExporter::new(
        cx,
        &config,
        Arc::new(transport),
    )))
}

/// The OTLP services' one method each (opentelemetry-proto's service definitions).
const METRICS_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
const TRACES_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

struct GrpcTransport {
    client: Grpc<Channel>,
    metrics_headers: MetadataMap,
    traces_headers: MetadataMap,
}

/// The gRPC codec for requests the queue holds already encoded: the body is written as
/// it is (no decode and re-encode, no copy of a decoded request per attempt); the
/// response is an OTLP export response, decoded with prost.
struct PreEncoded<Response>(std::marker::PhantomData<Response>);

impl<Response> Default for PreEncoded<Response> {
    fn default() -> Self {
        PreEncoded(std::marker::PhantomData)
    }
}

impl<Response: prost::Message + Default + Send + 'static> Codec for PreEncoded<Response> {
    type Encode = Bytes;
    type Decode = Response;
    type Encoder = BodyEncoder;
    type Decoder = ResponseDecoder<Response>;

    fn encoder(&mut self) -> Self::Encoder {
        BodyEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder(std::marker::PhantomData)
    }
}

struct BodyEncoder;

impl Encoder for BodyEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, body: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(body);
        Ok(())
    }
}

struct ResponseDecoder<Response>(std::marker::PhantomData<Response>);

impl<Response: prost::Message + Default> Decoder for ResponseDecoder<Response> {
    type Item = Response;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Response>, tonic::Status> {
        Response::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the response: {e}")))
    }
}

/// `host:port` gets a scheme from `tls.insecure`, as the collector does.
fn endpoint_uri(config: &OtlpConfig) -> String {
    let endpoint = config.endpoint.trim();
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else if config.tls.insecure {
        format!("http://{endpoint}")
    } else {
        format!("https://{endpoint}")
    }
}

impl GrpcTransport {
    fn new(config: &OtlpConfig) -> Result<Self> {
        config.validate()?;
        if config.metrics_endpoint.is_some() || config.traces_endpoint.is_some() {
            return Err(crate::component::key_error(
                "metrics_endpoint",
                "metrics_endpoint and traces_endpoint are otlphttp keys; use endpoint",
            ));
        }
        let uri = endpoint_uri(config);
        let endpoint = Endpoint::from_str(&uri)
            .with_context(|| format!("endpoint {uri:?} is not a valid URI"))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
        // Connects on first use and reconnects by itself: a collector that is down at
        // startup is a retry, not an error. TLS is ridley's own (see `tls.rs`).
        let channel = if uri.starts_with("https://") {
            let tls = super::tls::client_config(&config.tls, &[b"h2"])?;
            endpoint.connect_with_connector_lazy(tls_connector(tls))
        } else {
            endpoint.connect_lazy()
        };
        let metadata = |signal: Signal| -> Result<MetadataMap> {
            let mut headers = MetadataMap::new();
            for (key, value) in &config.headers_for(signal) {
                let name = MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                    .with_context(|| format!("headers: invalid name {key:?}"))?;
                let value = MetadataValue::try_from(value.as_str())
                    .with_context(|| format!("headers.{key}: invalid value"))?;
                headers.insert(name, value);
            }
            Ok(headers)
        };
        let mut client = Grpc::new(channel);
        let encoding = match config.compression {
            Compression::Gzip => Some(CompressionEncoding::Gzip),
            Compression::Zstd => Some(CompressionEncoding::Zstd),
            Compression::None => None,
        };
        if let Some(encoding) = encoding {
            client = client.send_compressed(encoding);
        }
        Ok(GrpcTransport {
            client,
            metrics_headers: metadata(Signal::Metrics)?,
            traces_headers: metadata(Signal::Traces)?,
        })
    }

    /// One unary export call of `signal` with an encoded request.
    async fn export<Response: prost::Message + Default + Send + 'static>(
        &self,
        signal: Signal,
        body: Bytes,
    ) -> Result<Response, tonic::Status> {
        let (path, headers) = match signal {
            Signal::Metrics => (METRICS_EXPORT, &self.metrics_headers),
            Signal::Traces => (TRACES_EXPORT, &self.traces_headers),
        };
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = headers.clone();
        let mut client = self.client.clone();
        client.ready().await.map_err(|e| {
            tonic::Status::unavailable(format!(
                "connecting: {}",
                super::otlp_exporter::error_chain(&e)
            ))
        })?;
        let response = client
            .unary(
                request,
                http::uri::PathAndQuery::from_static(path),
                PreEncoded::<Response>::default(),
            )
            .await?;
        Ok(response.into_inner())
    }
}

/// Connects TCP, then TLS with `config`, to the endpoint's host and port.
fn tls_connector(
    config: rustls::ClientConfig,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = anyhow::Error,
    Future = impl Send,
> + Send
+ Clone
+ 'static {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| anyhow::anyhow!("{uri}: no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .with_context(|| format!("connecting to {host}:{port}"))?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .with_context(|| format!("{host:?} is not a server name"))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with {host}:{port}"))?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// The OTLP spec's retryable gRPC codes; `RESOURCE_EXHAUSTED` only with a
/// `RetryInfo` (the server can recover), whose delay is then honoured.
fn send_error(status: tonic::Status) -> SendError {
    use tonic_types::StatusExt;
    let throttle = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .map(|delay| delay.min(super::otlp_exporter::MAX_THROTTLE));
    let retryable = match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => true,
        Code::ResourceExhausted => throttle.is_some(),
        _ => false,
    };
    // tonic's message alone hides a transport error's cause.
    let mut message = format!("{:?}: {}", status.code(), status.message());
    if let Some(cause) = std::error::Error::source(&status) {
        message.push_str(": ");
        message.push_str(&super::otlp_exporter::error_chain(cause));
    }
    SendError {
        retryable,
        throttle,
        message,
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    async fn send(&self, payload: &Payload) -> Result<(), SendError> {
        match payload {
            Payload::Metrics { body, .. } => {
                let response: ExportMetricsServiceResponse = self
                    .export(Signal::Metrics, body.clone())
                    .await
                    .map_err(send_error)?;
                if let Some(partial) = response.partial_success {
                    if partial.rejected_data_points > 0 {
                        tracing::warn!(
                            rejected = partial.rejected_data_points,
                            "collector rejected data points: {}",
                            partial.error_message
                        );
                    }
                }
            }
            Payload::Traces { body, .. } => {
                let response: ExportTraceServiceResponse = self
                    .export(Signal::Traces, body.clone())
                    .await
                    .map_err(send_error)?;
                if let Some(partial) = response.partial_success {
                    if partial.rejected_spans > 0 {
                        tracing::warn!(
                            rejected = partial.rejected_spans,
                            "collector rejected spans: {}",
                            partial.error_message
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn retry_info_is_honoured_and_makes_resource_exhausted_retryable() {
        let throttled = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(42))),
        );
        let e = send_error(throttled);
        assert!(e.retryable);
        assert_eq!(e.throttle, Some(std::time::Duration::from_secs(42)));

        let exhausted = send_error(tonic::Status::new(Code::ResourceExhausted, "too big"));
        assert!(
            !exhausted.retryable,
            "without RetryInfo the server cannot recover"
        );
        assert_eq!(exhausted.throttle, None);

        let unavailable = send_error(tonic::Status::new(Code::Unavailable, "down"));
        assert!(unavailable.retryable);
        assert_eq!(unavailable.message, "Unavailable: down");
    }
}
