//! The webhook's serving certificate: made by the operator with its own CA, kept in a Secret,
//! rotated before it expires; or read from files that another tool (cert-manager) manages.
//!
//! The Secret holds `ca.crt`, `ca.key`, `tls.crt`, `tls.key` and, in annotations, when the
//! CA and the serving certificate expire (so no X.509 parser is needed). Every replica loads
//! it; only the leader writes it. The TLS server reads the current certificate on every
//! handshake, so a rotation needs no restart.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

/// Common name of the operator's CA.
const CA_NAME: &str = "llmroute-webhook-ca";
const CA_NOT_AFTER: &str = "llmroute.dev/ca-not-after";
const CERT_NOT_AFTER: &str = "llmroute.dev/cert-not-after";

/// Lifetimes of what the operator makes.
#[derive(Debug, Clone)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
    /// A certificate this close to its end is replaced.
    pub renew_before: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ca: Duration::from_secs(10 * 365 * 86_400),
            serving: Duration::from_secs(365 * 86_400),
            renew_before: Duration::from_secs(30 * 86_400),
        }
    }
}

/// A CA and a serving certificate, in PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSet {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_not_after: Timestamp,
    pub cert_not_after: Timestamp,
}

/// Errors of certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("failed to generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate or key: {0}")]
    Invalid(String),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn ca_params(not_after: Timestamp) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = to_offset(not_after);
    Ok(params)
}

fn to_offset(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .expect("a timestamp within X.509's range")
}

/// Makes a new CA and a serving certificate for `hosts` (DNS names or IP addresses).
pub fn generate(hosts: &[String], lifetimes: &Lifetimes) -> Result<CertificateSet, CertError> {
    let now = Timestamp::now();
    let ca_not_after = now + SignedDuration::try_from(lifetimes.ca).expect("a short duration");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params(ca_not_after)?.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let mut set = CertificateSet {
        ca_pem: ca_cert.pem(),
        ca_key_pem,
        cert_pem: String::new(),
        key_pem: String::new(),
        ca_not_after,
        cert_not_after: now,
    };
    renew_serving(&mut set, hosts, lifetimes)?;
    Ok(set)
}

/// Replaces the serving certificate, signed by the same CA.
pub fn renew_serving(
    set: &mut CertificateSet,
    hosts: &[String],
    lifetimes: &Lifetimes,
) -> Result<(), CertError> {
    let now = Timestamp::now();
    let ca_key =
        KeyPair::from_pem(&set.ca_key_pem).map_err(|e| CertError::Invalid(e.to_string()))?;
    let issuer = Issuer::new(ca_params(set.ca_not_after)?, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = hosts
        .iter()
        .map(|host| match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => host
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(CertError::Generate),
        })
        .collect::<Result<_, _>>()?;
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        hosts.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = name;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let not_after = (now + SignedDuration::try_from(lifetimes.serving).expect("a short duration"))
        .min(set.ca_not_after);
    params.not_after = to_offset(not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    set.cert_pem = cert.pem();
    set.key_pem = key.serialize_pem();
    set.cert_not_after = not_after;
    Ok(())
}

/// What a set needs: nothing, a new serving certificate, or a new CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    None,
    Serving,
    All,
}

/// Decides whether `set` must be renewed at `now`.
pub fn renewal(set: &CertificateSet, lifetimes: &Lifetimes, now: Timestamp) -> Renewal {
    let soon = now + SignedDuration::try_from(lifetimes.renew_before).expect("a short duration");
    if set.ca_not_after <= soon {
        Renewal::All
    } else if set.cert_not_after <= soon {
        Renewal::Serving
    } else {
        Renewal::None
    }
}

/// A `CertifiedKey` for rustls from PEM.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Invalid(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Invalid("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Invalid(format!("key PEM: {e}")))?;
    let signing = any_supported_type(&key).map_err(|e| CertError::Invalid(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The certificate the TLS server presents, replaceable at run time.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertResolver {
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    pub fn is_loaded(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let ByteString(bytes) = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.clone()).ok()
}

/// Reads a set from the operator's Secret.
pub fn from_secret(secret: &Secret) -> Option<CertificateSet> {
    let annotations = secret.metadata.annotations.as_ref()?;
    Some(CertificateSet {
        ca_pem: text(secret, "ca.crt")?,
        ca_key_pem: text(secret, "ca.key")?,
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
        ca_not_after: annotations.get(CA_NOT_AFTER)?.parse().ok()?,
        cert_not_after: annotations.get(CERT_NOT_AFTER)?.parse().ok()?,
    })
}

/// The Secret holding `set`.
pub fn to_secret(name: &str, namespace: &str, set: &CertificateSet) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {crate::names::MANAGED_BY: crate::names::MANAGED_BY_VALUE},
            "annotations": {
                CA_NOT_AFTER: set.ca_not_after.to_string(),
                CERT_NOT_AFTER: set.cert_not_after.to_string(),
            },
        },
        "stringData": {
            "ca.crt": set.ca_pem,
            "ca.key": set.ca_key_pem,
            "tls.crt": set.cert_pem,
            "tls.key": set.key_pem,
        },
    }))
    .expect("a Secret")
}

/// Reads, and as leader creates or renews, the certificate Secret. Returns the set to serve,
/// and whether this call wrote a new one.
pub async fn ensure_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    hosts: &[String],
    lifetimes: &Lifetimes,
    leader: bool,
) -> Result<Option<(CertificateSet, bool)>, CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = api.get_opt(name).await?;
    let current = existing.as_ref().and_then(from_secret);
    let needed = current.as_ref().map_or(Renewal::All, |set| {
        renewal(set, lifetimes, Timestamp::now())
    });
    if needed == Renewal::None || !leader {
        return Ok(current.map(|set| (set, false)));
    }
    let set = match (needed, current) {
        (Renewal::Serving, Some(mut set)) => {
            renew_serving(&mut set, hosts, lifetimes)?;
            set
        }
        _ => generate(hosts, lifetimes)?,
    };
    let mut secret = to_secret(name, namespace, &set);
    match existing {
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version;
            api.replace(name, &PostParams::default(), &secret).await?;
        }
        None => {
            api.create(&PostParams::default(), &secret).await?;
        }
    }
    tracing::info!(secret = %name, namespace, renewal = ?needed, not_after = %set.cert_not_after, "wrote the webhook's serving certificate");
    Ok(Some((set, true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_set_loads_and_renews_with_the_same_ca() {
        let lifetimes = Lifetimes::default();
        let hosts = vec![
            "llmroute-operator.llmroute-system.svc".to_string(),
            "127.0.0.1".into(),
        ];
        let mut set = generate(&hosts, &lifetimes).unwrap();
        certified_key(&set.cert_pem, &set.key_pem).unwrap();
        assert_eq!(renewal(&set, &lifetimes, Timestamp::now()), Renewal::None);
        let later = set.cert_not_after - SignedDuration::from_hours(24);
        assert_eq!(renewal(&set, &lifetimes, later), Renewal::Serving);
        let much_later = set.ca_not_after;
        assert_eq!(renewal(&set, &lifetimes, much_later), Renewal::All);

        let ca = set.ca_pem.clone();
        let old = set.cert_pem.clone();
        renew_serving(&mut set, &hosts, &lifetimes).unwrap();
        assert_eq!(set.ca_pem, ca);
        assert_ne!(set.cert_pem, old);
        let secret = to_secret("tls", "ns", &set);
        // The API server turns stringData into data; do the same here.
        let mut stored = secret.clone();
        stored.data = Some(
            secret
                .string_data
                .clone()
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        );
        assert_eq!(from_secret(&stored), Some(set));
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let error = certified_key("not a certificate", "nor a key").unwrap_err();
        assert!(error.to_string().contains("certificate"), "{error}");
    }
}
