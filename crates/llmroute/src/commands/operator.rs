//! `llmroute operator`: the Kubernetes operator. Reconciles LLMRoutes, publishes their
//! policies, serves the control API to sidecars and the operations endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llmroute_control::server::{RetentionSettings, StoreSizeLimit};
use llmroute_operator::leader::LeaderElection;
use llmroute_operator::webhook::inject::InjectionSettings;
use llmroute_operator::webhook::{WebhookConfigSpec, WebhookTarget};
use llmroute_operator::{
    CertificateSource, IngestSettings, OperatorConfig, SidecarMode, WebhookOptions,
};
use llmroute_policy::encoder::{EMBEDDING_DIM, digest_of_files};

use crate::workspace::Workspace;

#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Address of the control API that sidecars call.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub control_listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub ops_listen: SocketAddr,
    /// Folder of the event store (created when missing).
    #[arg(long, default_value = "llmroute-operator-state")]
    pub data_dir: PathBuf,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "llmroute-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "llmroute-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease [default: the host name and process id].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Host name or IP address at which the other replicas reach this replica's control API
    /// (on the port of --control-listen), such as the pod IP. When set, a replica that does not
    /// lead forwards the event batches it receives to the leader, so that the leader trains on
    /// every event. Unset, each replica stores what it receives.
    #[arg(long, value_parser = parse_advertise_host)]
    pub advertise_host: Option<String>,
    /// Watch routes in this namespace only [default: every namespace].
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Address of the sidecar injection webhook's TLS server [default: no webhook].
    #[arg(long)]
    pub webhook_listen: Option<SocketAddr>,
    /// Service through which the API server reaches the webhook and pods reach the control API.
    #[arg(long, default_value = "llmroute-operator")]
    pub service: String,
    /// Port of the webhook on that Service.
    #[arg(long, default_value_t = 443)]
    pub webhook_service_port: u16,
    /// URL the API server calls instead of the Service (an operator outside the cluster).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// `Ignore` (pods are created without the sidecar when the webhook is down) or `Fail`.
    #[arg(long, default_value = "Ignore", value_parser = ["Ignore", "Fail"])]
    pub webhook_failure_policy: String,
    /// Seconds the API server waits for the webhook.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=30))]
    pub webhook_timeout_seconds: i32,
    /// Folder with tls.crt and tls.key from another tool (cert-manager); the operator's own CA
    /// otherwise.
    #[arg(long)]
    pub webhook_cert_dir: Option<PathBuf>,
    /// Secret (in the lease namespace) holding the operator's CA and serving certificate.
    #[arg(long, default_value = "llmroute-webhook-tls")]
    pub webhook_cert_secret: String,
    /// Host names or IP addresses of the serving certificate [default: the Service's names].
    #[arg(long, value_delimiter = ',')]
    pub webhook_hosts: Vec<String>,
    /// Namespaces never sent to the webhook, besides the lease namespace.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub excluded_namespaces: Vec<String>,
    /// Image of the injected sidecar.
    #[arg(long, default_value = concat!("llmroute:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,
    /// Secret that the kubelet needs to pull the sidecar's image, added to each injected pod's
    /// imagePullSecrets (repeatable, or comma-separated). It must exist in every namespace
    /// whose pods are injected.
    #[arg(
        long = "sidecar-image-pull-secret",
        value_name = "SECRET",
        value_delimiter = ','
    )]
    pub sidecar_image_pull_secrets: Vec<String>,
    /// Port of the injected sidecar on the pod's loopback.
    #[arg(long, default_value_t = 8099)]
    pub sidecar_port: u16,
    /// Port of the injected sidecar's admin listener (/healthz, /readyz, /metrics) on the
    /// pod's IP, which its probes use and Prometheus can scrape; 0 injects neither the listener
    /// nor probes.
    #[arg(long, default_value_t = llmroute_operator::webhook::DEFAULT_ADMIN_PORT)]
    pub sidecar_admin_port: u16,
    /// `auto` (native sidecars on API servers from 1.32, whose kubelets are all 1.29 or later),
    /// `native` or `classic`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "native", "classic"])]
    pub sidecar_mode: String,
    /// CPU request of the injected sidecar.
    #[arg(long, default_value = "100m")]
    pub sidecar_cpu: String,
    /// Memory request of the injected sidecar.
    #[arg(long, default_value = "256Mi")]
    pub sidecar_memory: String,
    /// Control API URL as pods reach it [default: http://SERVICE.NAMESPACE.svc:PORT].
    #[arg(long)]
    pub control_url: Option<String>,
    /// Digest of the sidecars' prompt encoder [default: computed from the encoder files that
    /// `llmroute setup` installs].
    #[arg(long)]
    pub encoder_digest: Option<String>,
    /// Deletes events received more than this many days ago (0 keeps events of any age).
    #[arg(long, default_value_t = 30)]
    pub event_max_age_days: u64,
    /// Keeps at most this many of the newest events per route (0 sets no limit).
    #[arg(long, default_value_t = 1_000_000)]
    pub event_max_per_route: u64,
    /// Limit of the event store's size: `auto`, `0` (no limit) or a size such as 800Mi or 2Gi.
    /// `auto` is 80 % of the file system that contains the store, less the policy files and
    /// the write-ahead log, read at each check. Every 10 s, over the limit, the oldest events
    /// of the routes with the most events are deleted.
    #[arg(long, default_value = "auto", value_name = "SIZE", value_parser = StoreSizeLimit::parse)]
    pub event_max_store_size: StoreSizeLimit,
    /// Seconds between two runs of the event retention.
    #[arg(long, default_value_t = 600)]
    pub retention_interval_seconds: u64,
    /// Seconds between two passes of the learning loop (each route trains on its own
    /// `spec.training.intervalSeconds`; a pass also analyses running canaries). 0 turns the
    /// learning loop off.
    #[arg(long, default_value_t = 10)]
    pub learning_interval_seconds: u64,
    /// Seconds between SIGTERM and the servers closing, during which /readyz responds 503 while
    /// the control API and the webhook keep serving, so that Services and the API server stop
    /// sending requests first. Keep it well below the pod's termination grace period (30 s).
    #[arg(long, default_value_t = llmroute_operator::DEFAULT_SHUTDOWN_DRAIN.as_secs())]
    pub shutdown_drain_seconds: u64,
}

impl OperatorArgs {
    /// Event ingestion settings from the flags.
    fn ingest(&self) -> Result<IngestSettings> {
        if self.retention_interval_seconds == 0 {
            bail!("invalid --retention-interval-seconds 0: use at least 1");
        }
        let retention = RetentionSettings {
            max_age: (self.event_max_age_days > 0)
                .then(|| Duration::from_secs(self.event_max_age_days.saturating_mul(24 * 3600))),
            max_events: (self.event_max_per_route > 0).then_some(self.event_max_per_route),
            interval: Duration::from_secs(self.retention_interval_seconds),
            max_store: self.event_max_store_size,
            ..RetentionSettings::default()
        };
        Ok(IngestSettings {
            retention,
            ..IngestSettings::default()
        })
    }
}

impl OperatorArgs {
    /// Checks the ports the injected sidecar listens on: one container cannot bind one port
    /// twice, and the app calls the proxy on a fixed port.
    fn check_sidecar_ports(&self) -> Result<()> {
        if self.sidecar_port == 0 {
            bail!(
                "invalid --sidecar-port 0: apps call the sidecar on a fixed port; use one such as 8099"
            );
        }
        if let Some(name) = self
            .sidecar_image_pull_secrets
            .iter()
            .find(|name| !llmroute_api::crd::is_dns_subdomain(name))
        {
            bail!(
                "invalid --sidecar-image-pull-secret {name:?}: use the name of a Secret, such as registry-credentials"
            );
        }
        if self.sidecar_admin_port == self.sidecar_port {
            bail!(
                "invalid --sidecar-admin-port {}: it equals --sidecar-port; use another port, such as {}, or 0 for no admin listener",
                self.sidecar_admin_port,
                llmroute_operator::webhook::DEFAULT_ADMIN_PORT
            );
        }
        Ok(())
    }
}

pub fn run(workspace: &Workspace, args: &OperatorArgs) -> Result<()> {
    let ingest = args.ingest()?;
    args.check_sidecar_ports()?;
    let encoder_digest = match &args.encoder_digest {
        Some(digest) => {
            if !llmroute_api::config::is_sha256_hex(digest) {
                bail!("invalid --encoder-digest {digest:?}: expected 64 lowercase hex digits");
            }
            digest.clone()
        }
        None => {
            let assets = workspace.assets()?;
            digest_of_files(&assets.encoder, &assets.tokenizer).with_context(|| {
                format!(
                    "failed to read the encoder files {} and {}",
                    assets.encoder.display(),
                    assets.tokenizer.display()
                )
            })?
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "llmroute".into());
        format!("{host}-{}", std::process::id())
    });
    let webhook = args
        .webhook_listen
        .map(|address| webhook_options(args, address));
    let config = OperatorConfig {
        control_address: args.control_listen,
        ops_address: args.ops_listen,
        data_dir: args.data_dir.clone(),
        election: LeaderElection {
            control_address: args
                .advertise_host
                .as_deref()
                .map(|host| advertised_address(host, args.control_listen.port())),
            ..LeaderElection::new(&args.lease_namespace, &args.lease_name, &identity)
        },
        encoder_digest,
        embedding_dim: EMBEDDING_DIM,
        watch_namespace: args.watch_namespace.clone(),
        webhook,
        learning_interval: (args.learning_interval_seconds > 0)
            .then(|| Duration::from_secs(args.learning_interval_seconds)),
        shutdown_drain: Duration::from_secs(args.shutdown_drain_seconds),
        replication_interval: llmroute_operator::replication::DEFAULT_PULL_INTERVAL,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default().await.context(
            "failed to configure the Kubernetes client: set KUBECONFIG or run in a pod with a service account",
        )?;
        llmroute_operator::run_with_ingest(client, config, ingest, crate::shutdown::signal())
            .await?;
        Ok(())
    })
}

/// Checks `--advertise-host`: an IP address or a DNS name, without a port.
fn parse_advertise_host(value: &str) -> Result<String, String> {
    let host = value.trim();
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_string());
    }
    let is_dns_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if is_dns_name {
        Ok(host.to_ascii_lowercase())
    } else {
        Err(format!(
            "invalid host {value:?}: give an IP address or a DNS name without a port, such as $(POD_IP) in a pod"
        ))
    }
}

/// Formats `host:port` of the control API for other replicas, with an IPv6 address in
/// brackets.
fn advertised_address(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

fn webhook_options(args: &OperatorArgs, address: SocketAddr) -> WebhookOptions {
    let namespace = &args.lease_namespace;
    let service_host = format!("{}.{namespace}.svc", args.service);
    let target = match &args.webhook_url {
        Some(url) => WebhookTarget::Url(url.clone()),
        None => WebhookTarget::Service {
            name: args.service.clone(),
            namespace: namespace.clone(),
            port: args.webhook_service_port,
        },
    };
    let hosts = if args.webhook_hosts.is_empty() {
        vec![
            service_host.clone(),
            format!("{service_host}.cluster.local"),
        ]
    } else {
        args.webhook_hosts.clone()
    };
    let certificate = match &args.webhook_cert_dir {
        Some(folder) => CertificateSource::Files {
            folder: folder.clone(),
        },
        None => CertificateSource::Managed {
            secret: args.webhook_cert_secret.clone(),
            hosts,
            lifetimes: Default::default(),
        },
    };
    let mut excluded = args.excluded_namespaces.clone();
    excluded.push(namespace.clone());
    let control_port = args.control_listen.port();
    WebhookOptions {
        address,
        injection: InjectionSettings {
            image: args.sidecar_image.clone(),
            control_url: args
                .control_url
                .clone()
                .unwrap_or_else(|| format!("http://{service_host}:{control_port}")),
            port: args.sidecar_port,
            admin_port: (args.sidecar_admin_port != 0).then_some(args.sidecar_admin_port),
            image_pull_secrets: args.sidecar_image_pull_secrets.clone(),
            cpu_request: args.sidecar_cpu.clone(),
            memory_request: args.sidecar_memory.clone(),
            ..InjectionSettings::default()
        },
        sidecar_mode: match args.sidecar_mode.as_str() {
            "native" => SidecarMode::Native,
            "classic" => SidecarMode::Classic,
            _ => SidecarMode::Auto,
        },
        configuration: WebhookConfigSpec {
            name: llmroute_operator::webhook::CONFIGURATION_NAME.into(),
            namespace_labels: None,
            target,
            failure_policy: args.webhook_failure_policy.clone(),
            timeout_seconds: args.webhook_timeout_seconds,
            excluded_namespaces: excluded,
        },
        certificate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_host_accepts_addresses_and_names() {
        assert_eq!(parse_advertise_host("10.1.2.3").unwrap(), "10.1.2.3");
        assert_eq!(parse_advertise_host("fd00::5").unwrap(), "fd00::5");
        assert_eq!(
            parse_advertise_host("Operator-0.llmroute.svc").unwrap(),
            "operator-0.llmroute.svc"
        );
    }

    #[test]
    fn advertise_host_rejects_ports_and_junk() {
        for value in ["10.1.2.3:8070", "", "-bad.example", "a..b", "http://x"] {
            let error = parse_advertise_host(value).expect_err(value);
            assert!(error.contains(&format!("{value:?}")), "{error}");
            assert!(error.contains("without a port"), "{error}");
        }
    }

    #[test]
    fn advertised_address_brackets_ipv6() {
        assert_eq!(advertised_address("10.1.2.3", 8070), "10.1.2.3:8070");
        assert_eq!(advertised_address("fd00::5", 8070), "[fd00::5]:8070");
        assert_eq!(advertised_address("op-0.svc", 80), "op-0.svc:80");
    }
}
