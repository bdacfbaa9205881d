//! The client TLS both OTLP exporters use (rustls with ring): the system's roots plus
//! `tls.ca_file`, an optional client certificate, and one rule the collector has that
//! plain rustls does not: a certificate given in `ca_file` that the server presents as
//! its own (a self-signed server certificate, marked as a CA as `openssl req -x509`
//! makes them) is trusted for the names it carries. rustls otherwise rejects it as a
//! CA used as an end entity.
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use super::otlp_exporter::{OtlpConfig, TlsConfig};

/// The rustls configuration for `tls`, offering `alpn` protocols.
pub fn client_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
    if tls.insecure_skip_verify {
        tracing::warn!("tls.insecure_skip_verify: the collector's certificate is not checked");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!("system CA certificates: {error}");
    }
    roots.add_parsable_certificates(native.certs);
    let mut pinned = Vec::new();
    if let Some(pem) = OtlpConfig::read_tls_file(&tls.ca_file, "ca_file")? {
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.context("tls.ca_file: not a PEM certificate")?;
            roots
                .add(cert.clone())
                .context("tls.ca_file: not a usable CA certificate")?;
            pinned.push(cert);
        }
        if pinned.is_empty() {
            return Err(anyhow!("tls.ca_file: no certificate in it"));
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("tls: building the certificate verifier")?;
    let server_name = tls
        .server_name_override
        .as_deref()
        .map(|name| {
            ServerName::try_from(name.to_owned())
                .with_context(|| format!("tls.server_name_override: {name:?} is not a server name"))
        })
        .transpose()?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls: protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaFileVerifier {
            webpki,
            pinned,
            skip_verify: tls.insecure_skip_verify,
            server_name,
        }));
    let mut config = match (
        OtlpConfig::read_tls_file(&tls.cert_file, "cert_file")?,
        OtlpConfig::read_tls_file(&tls.key_file, "key_file")?,
    ) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .context("tls.cert_file: not PEM certificates")?;
            let key = PrivateKeyDer::from_pem_slice(&key).context("tls.key_file: not a PEM key")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("tls.cert_file/key_file: not a usable pair")?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The system's and `ca_file`'s roots as rustls checks them, and the `ca_file`
/// certificates themselves accepted as the server's own (see the module comment).
#[derive(Debug)]
struct CaFileVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
    /// `tls.insecure_skip_verify`: any certificate goes (signatures still checked).
    skip_verify: bool,
    /// `tls.server_name_override`: the name checked instead of the endpoint's host.
    server_name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for CaFileVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.skip_verify {
            return Ok(ServerCertVerified::assertion());
        }
        let server_name = self.server_name.as_ref().unwrap_or(server_name);
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if verified.is_ok()
            || !self
                .pinned
                .iter()
                .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return verified;
        }
        // The very certificate the user gave: it still has to name the server.
        webpki::EndEntityCert::try_from(end_entity)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(server_name))
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(e)),
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
