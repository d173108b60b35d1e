//! The upstream client: HTTP/1.1 with keep-alive pooling for `http://` and `https://` model
//! endpoints, and the root certificates that TLS server certificates are verified against.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// The client that sends requests to the models' endpoints.
pub(crate) type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Root certificates for `https://` upstream endpoints.
///
/// Server certificates are verified against the platform's root store. When `SSL_CERT_FILE`
/// (a PEM file) or `SSL_CERT_DIR` (folders) is set, those replace the platform store, as
/// rustls-native-certs 0.8 reads them. The CA certificates of [`UpstreamTls::with_ca_file`]
/// are trusted in addition, for endpoints with certificates from a private CA.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    /// The extra CA file and its certificates, checked to be valid trust anchors.
    extra: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
}

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read the upstream CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid upstream CA file {path}: {source}; it must contain PEM `CERTIFICATE` blocks")]
    Pem {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error(
        "the upstream CA file {path} contains no PEM `CERTIFICATE` block; add the CA certificate that signed the upstream's certificate"
    )]
    NoCertificate { path: String },
    #[error(
        "certificate {index} of the upstream CA file {path} is not a valid CA certificate: {source}"
    )]
    Invalid {
        path: String,
        index: usize,
        source: rustls::Error,
    },
}

impl UpstreamTls {
    /// Reads the PEM file at `path` and trusts its CA certificates in addition to the platform
    /// roots. Fails when the file cannot be read, is not PEM, has no certificate or has one
    /// that is not a valid trust anchor.
    pub fn with_ca_file(path: &Path) -> Result<Self, TlsError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
            path: display.clone(),
            source,
        })?;
        let certificates = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                path: display.clone(),
                source,
            })?;
        if certificates.is_empty() {
            return Err(TlsError::NoCertificate { path: display });
        }
        let mut store = RootCertStore::empty();
        for (index, certificate) in certificates.iter().enumerate() {
            store
                .add(certificate.clone())
                .map_err(|source| TlsError::Invalid {
                    path: display.clone(),
                    index: index + 1,
                    source,
                })?;
        }
        Ok(Self {
            extra: Some((path.to_path_buf(), certificates)),
        })
    }

    /// Builds the rustls client configuration: the platform (or `SSL_CERT_FILE`) roots plus
    /// the extra CA certificates. Roots that fail to load are logged and skipped, so that the
    /// sidecar still serves `http://` upstreams and `https://` ones whose roots did load.
    fn client_config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(error = %error, "failed to load some system root certificates");
        }
        let (system, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "skipped system root certificates that are not valid trust anchors"
            );
        }
        let mut extra = 0;
        if let Some((path, certificates)) = &self.extra {
            extra = certificates.len();
            for certificate in certificates {
                roots
                    .add(certificate.clone())
                    .expect("checked by UpstreamTls::with_ca_file");
            }
            tracing::info!(ca_file = %path.display(), certificates = extra, "trusting the upstream CA file");
        }
        if roots.is_empty() {
            tracing::warn!(
                "no root certificate loaded: every https:// upstream will fail certificate verification; install the system CA bundle, set SSL_CERT_FILE, or configure an upstream CA file"
            );
        } else {
            tracing::debug!(
                system,
                extra,
                "loaded root certificates for https:// upstreams"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// Builds the pooled HTTP/1.1 client for `http://` and `https://` upstreams.
    pub(crate) fn client(&self) -> UpstreamClient {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.client_config())
            .https_or_http()
            .enable_http1()
            .build();
        Client::builder(TokioExecutor::new()).build(connector)
    }
}

/// Returns the rustls error inside a client error's source chain, such as a rejected server
/// certificate. `std::io::Error` hides the error it wraps from `source()`, so this looks inside
/// it with `get_ref()`.
pub(crate) fn rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        let wrapped = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if let Some(found) = wrapped.and_then(|inner| rustls_error(inner)) {
            return Some(found);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file() {
        let folder = tempfile::tempdir().unwrap();
        let missing = folder.path().join("missing.pem");
        let error = UpstreamTls::with_ca_file(&missing).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error}");
        assert!(error.to_string().contains("missing.pem"), "{error}");

        let empty = folder.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = UpstreamTls::with_ca_file(&empty).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");

        let garbage = folder.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = UpstreamTls::with_ca_file(&garbage).unwrap_err();
        assert!(
            matches!(error, TlsError::Invalid { index: 1, .. }),
            "{error}"
        );
    }
}
