//! The llmroute operator: the Kubernetes face of the control plane.
//!
//! - A controller for `LLMRoute` (run by the leader only) that checks routes, publishes their
//!   first policy as an `LLMPolicy` with a ConfigMap, and writes status conditions and Events.
//! - The control API of `llmroute-control`, served by every replica from the cluster's routes
//!   and policy ConfigMaps, with sidecar events in a local store.
//! - The learning loop (run by the leader only): trains candidates from the stored events,
//!   gates them off-policy and rolls them out as canaries, recorded as `LLMPolicy` objects,
//!   route status fields and Events.
//! - `/metrics`, `/healthz`, `/readyz`; leader election on a Lease; graceful shutdown.

#![forbid(unsafe_code)]

pub mod conditions;
pub mod install;
pub mod leader;
pub mod learning;
pub mod metrics;
pub mod names;
pub mod ops;
pub mod reconcile;
pub mod replication;
pub mod serving;
pub mod tokenreview;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use llmroute_api::crd::{LlmPolicy, LlmRoute};
use llmroute_control::store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::leader::LeaderElection;
use crate::metrics::Metrics;
use crate::names::{MANAGED_BY, MANAGED_BY_VALUE};
use crate::reconcile::Context;
use crate::serving::ClusterBackend;
use crate::webhook::certs::{CertResolver, certified_key, ensure_secret};

/// Smallest API server minor version (1.x) at which `--sidecar-mode auto` injects native
/// sidecars: 1.29, when they became default, plus the kubelet's allowed lag of three versions.
pub const MIN_AUTO_NATIVE_MINOR: u32 = 32;

/// Settings of one operator process.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Address of the control API that sidecars call.
    pub control_address: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub ops_address: SocketAddr,
    /// Folder of the event store.
    pub data_dir: PathBuf,
    /// Leader election settings.
    pub election: LeaderElection,
    /// Digest of the sidecars' prompt encoder.
    pub encoder_digest: String,
    /// Embedding dimension of that encoder.
    pub embedding_dim: usize,
    /// Watch routes in this namespace only; every namespace when `None`.
    pub watch_namespace: Option<String>,
    /// The sidecar injection webhook; off when `None`.
    pub webhook: Option<WebhookOptions>,
    /// Period of the learning loop's passes (training on each route's schedule, off-policy
    /// gate, canary analysis); the loop is off when `None`.
    pub learning_interval: Option<std::time::Duration>,
    /// Time between the shutdown signal and the servers closing, during which `/readyz`
    /// responds 503 and every server keeps serving, so that Services and the API server's
    /// webhook client stop sending requests to this replica first.
    pub shutdown_drain: std::time::Duration,
    /// Time between two pulls of the leader's events by a follower
    /// ([`replication::DEFAULT_PULL_INTERVAL`] in a cluster).
    pub replication_interval: std::time::Duration,
}

/// Default of [`OperatorConfig::shutdown_drain`]. Endpoint changes reach kube-proxy and the
/// API server within a few seconds, and the pod's 30 s grace period leaves room for the rest of
/// the shutdown.
pub const DEFAULT_SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Settings of the injection webhook.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Address of the webhook's TLS server.
    pub address: SocketAddr,
    /// What to inject. `native_sidecars` is overridden by `sidecar_mode`.
    pub injection: webhook::inject::InjectionSettings,
    /// `auto` (native sidecars on API servers from 1.32, see [`MIN_AUTO_NATIVE_MINOR`]),
    /// `native` or `classic`.
    pub sidecar_mode: SidecarMode,
    /// The `MutatingWebhookConfiguration` the leader applies.
    pub configuration: webhook::WebhookConfigSpec,
    /// Where the serving certificate comes from.
    pub certificate: CertificateSource,
}

/// How the injected sidecar runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    Auto,
    Native,
    Classic,
}

/// Where the webhook's serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertificateSource {
    /// The operator's own CA, kept in this Secret of the lease namespace, for these host names
    /// or IP addresses; the leader writes the CA into the webhook configuration.
    Managed {
        secret: String,
        hosts: Vec<String>,
        lifetimes: webhook::certs::Lifetimes,
    },
    /// `tls.crt` and `tls.key` in a folder that another tool keeps current (cert-manager).
    /// The webhook configuration's `caBundle` is left to that tool (its CA injector).
    Files { folder: PathBuf },
}

impl OperatorConfig {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.watch_namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        }
    }
}

/// Settings of the control API's event ingestion.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Audience that sidecar tokens must carry; the injection webhook projects tokens for it.
    pub token_audience: String,
    /// How long and how many TokenReview results are cached.
    pub token_cache: llmroute_control::auth::CacheSettings,
    /// Event retention per route.
    pub retention: llmroute_control::server::RetentionSettings,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            token_audience: webhook::inject::InjectionSettings::default().token_audience,
            token_cache: llmroute_control::auth::CacheSettings::default(),
            retention: llmroute_control::server::RetentionSettings::default(),
        }
    }
}

/// Failures that stop the operator from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to open the event store: {0}")]
    Store(#[from] llmroute_control::store::StoreError),
    #[error("failed to listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "failed to reach the Kubernetes API server: {0}; check KUBECONFIG or the in-cluster service account"
    )]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Replication(#[from] replication::TokenError),
}

/// Runs the operator until `shutdown` completes.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    run_with_ingest(client, config, IngestSettings::default(), shutdown).await
}

/// [`run`] with event ingestion settings.
pub async fn run_with_ingest(
    client: Client,
    config: OperatorConfig,
    ingest: IngestSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let control_listener =
        llmroute_api::listen::bind(config.control_address).map_err(|source| {
            StartError::Listen {
                address: config.control_address,
                source,
            }
        })?;
    let ops_listener =
        llmroute_api::listen::bind(config.ops_address).map_err(|source| StartError::Listen {
            address: config.ops_address,
            source,
        })?;
    let webhook_listener = match &config.webhook {
        Some(options) => Some(
            llmroute_api::listen::bind(options.address).map_err(|source| StartError::Listen {
                address: options.address,
                source,
            })?,
        ),
        None => None,
    };
    serve_listeners(
        client,
        config,
        Listeners {
            control: control_listener,
            ops: ops_listener,
            webhook: webhook_listener,
        },
        ingest,
        shutdown,
    )
    .await
}

/// The listeners of one operator, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub control: TcpListener,
    pub ops: TcpListener,
    /// Required when the configuration enables the webhook.
    pub webhook: Option<TcpListener>,
}

/// [`run`] on listeners bound by the caller (tests bind port 0).
pub async fn run_with_listeners(
    client: Client,
    config: OperatorConfig,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    serve_listeners(
        client,
        config,
        listeners,
        IngestSettings::default(),
        shutdown,
    )
    .await
}

/// [`run_with_ingest`] on listeners bound by the caller.
pub async fn serve_listeners(
    client: Client,
    config: OperatorConfig,
    listeners: Listeners,
    ingest: IngestSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let Listeners {
        control: control_listener,
        ops: ops_listener,
        webhook: webhook_listener,
    } = listeners;
    let version = client.apiserver_version().await?;
    tracing::info!(
        server_version = %version.git_version,
        identity = %config.election.identity,
        namespace = config.watch_namespace.as_deref().unwrap_or("(all)"),
        "operator starting"
    );
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(&config.data_dir)?;
    let backend = Arc::new(ClusterBackend::new(store, metrics.clone()));
    let (view_tx, view_rx) = watch::channel(leader::LeaderView::Unknown);
    // With forwarding, only the leader stores events, and the followers copy them.
    let mut replication_token = None;
    if let Some(address) = &config.election.control_address {
        tracing::info!(control_address = %address, "event batches go to the leader; this replica publishes its control address while it leads");
        backend.forward_events_to_leader(view_rx.clone());
        let name = replication::secret_name(&config.election.lease_name);
        replication_token =
            Some(replication::ensure_token(&client, &config.election.namespace, &name).await?);
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut receiver = stop_rx.clone();
        async move {
            let _ = receiver.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(backend.clone().watch_routes(config.api(&client)));
    tasks.spawn(backend.clone().watch_policies(config.api(&client)));
    let authenticator = llmroute_control::auth::CachedAuthenticator::new(
        tokenreview::TokenReviewAuthenticator::new(client.clone(), &ingest.token_audience),
        ingest.token_cache,
    );
    let control_options = llmroute_control::server::ServerOptions {
        authenticator: Some(Arc::new(authenticator)),
        embedding_dim: config.embedding_dim,
        replication: match &replication_token {
            Some(token) => Some(Arc::new(
                llmroute_control::auth::StaticTokenAuthenticator::new(token).map_err(
                    |message| replication::TokenError::Invalid {
                        namespace: config.election.namespace.clone(),
                        name: replication::secret_name(&config.election.lease_name),
                        message,
                    },
                )?,
            )),
            None => None,
        },
        ..Default::default()
    };
    if let Some(token) = &replication_token {
        tasks.spawn(replication::follow_leader(
            backend.clone(),
            view_rx.clone(),
            llmroute_control::replication::Puller::new(token),
            config.replication_interval,
            metrics.clone(),
            stopped(),
        ));
    }
    let control = tokio::spawn(llmroute_control::server::serve_with(
        control_listener,
        backend.clone(),
        control_options,
        stopped(),
    ));
    tasks.spawn(llmroute_control::server::run_retention(
        backend.clone(),
        ingest.retention,
        stopped(),
    ));
    let serves_webhook = config.webhook.is_some() && webhook_listener.is_some();
    let resolver = serves_webhook.then(|| Arc::new(webhook::certs::CertResolver::default()));
    let readiness = Arc::new(ops::Readiness::new(backend.clone(), resolver.clone()));
    let drain = config.shutdown_drain;
    let draining = readiness.clone();
    let shutdown = async move {
        shutdown.await;
        draining.start_draining();
        tracing::info!(
            drain_seconds = drain.as_secs_f64(),
            "shutdown requested; /readyz responds 503 while the servers keep serving"
        );
        tokio::time::sleep(drain).await;
    };
    let ops = tokio::spawn(ops::serve(
        ops_listener,
        metrics.clone(),
        readiness,
        stopped(),
    ));

    let (leader_tx, mut leader_rx) = watch::channel(false);
    // The election stops before the servers, so that a leader releases the Lease while its
    // control API still serves the followers' last pull.
    let (election_stop_tx, mut election_stop_rx) = watch::channel(false);
    let election = tokio::spawn(config.election.clone().run(
        client.clone(),
        leader_tx,
        view_tx,
        async move {
            let _ = election_stop_rx.wait_for(|stop| *stop).await;
        },
    ));
    let mut led = false;

    let mut webhook_server = None;
    if let (Some(options), Some(listener), Some(resolver)) =
        (config.webhook.clone(), webhook_listener, resolver)
    {
        let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap_or(0);
        let mut injection = options.injection.clone();
        injection.native_sidecars = match options.sidecar_mode {
            SidecarMode::Native => true,
            SidecarMode::Classic => false,
            // Native sidecars are on by default from 1.29, but the kubelet runs them, and the
            // version skew policy lets kubelets lag the API server by three minor versions. A
            // kubelet older than 1.29 runs a native sidecar as an ordinary init container that
            // never exits, so the pod never starts. From a 1.32 server on, every supported
            // kubelet is 1.29 or newer.
            SidecarMode::Auto => version.major == "1" && minor >= MIN_AUTO_NATIVE_MINOR,
        };
        tracing::info!(
            native_sidecars = injection.native_sidecars,
            server_minor = minor,
            "injection webhook enabled"
        );
        tasks.spawn(keep_certificate(
            client.clone(),
            options.clone(),
            config.election.namespace.clone(),
            resolver.clone(),
            leader_rx.clone(),
        ));
        let handler = Arc::new(webhook::Webhook {
            settings: injection,
            backend: backend.clone(),
            metrics: metrics.clone(),
        });
        webhook_server = Some(tokio::spawn(webhook::serve(
            listener,
            resolver,
            handler,
            stopped(),
        )));
    }

    let reporter = Reporter {
        controller: "llmroute-operator".into(),
        instance: Some(config.election.identity.clone()),
    };
    let learning = match config.learning_interval {
        Some(period) => Some((
            Arc::new(learning::ClusterLearning::new(
                client.clone(),
                backend.clone(),
                Recorder::new(
                    client.clone(),
                    Reporter {
                        controller: "llmroute-learning".into(),
                        instance: Some(config.election.identity.clone()),
                    },
                ),
            )?),
            period,
        )),
        None => None,
    };
    let cleanup_backend = backend.clone();
    let context = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        config.encoder_digest.clone(),
        config.embedding_dim,
        metrics.clone(),
        Box::new(move |key| cleanup_backend.forget_route(key)),
    ));

    tokio::pin!(shutdown);
    loop {
        // Followers wait for the leadership or the shutdown.
        tokio::select! {
            changed = leader_rx.wait_for(|leader| *leader) => {
                if changed.is_err() {
                    break;
                }
            }
            () = &mut shutdown => break,
        }
        metrics.leader.set(1);
        tracing::info!("starting the LLMRoute controller");
        let (pods_stop, pods_stopped) = watch::channel(false);
        let pod_watch = config.webhook.as_ref().map(|_| {
            tokio::spawn(webhook::watch_decided_pods(
                config.api(&client),
                client.clone(),
                Recorder::new(
                    client.clone(),
                    Reporter {
                        controller: "llmroute-injector".into(),
                        instance: Some(config.election.identity.clone()),
                    },
                ),
                pods_stopped,
            ))
        });
        let (learning_stop, learning_stopped) = watch::channel(false);
        let learning_task = learning.as_ref().map(|(learning, period)| {
            let mut stopped = learning_stopped.clone();
            tokio::spawn(learning.clone().run(*period, async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }))
        });
        let owned = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE}"));
        let mut lost = leader_rx.clone();
        let controller =
            Controller::new(config.api::<LlmRoute>(&client), watcher::Config::default())
                .owns(config.api::<LlmPolicy>(&client), owned.clone())
                .owns(config.api::<ConfigMap>(&client), owned)
                .graceful_shutdown_on(async move {
                    let _ = lost.wait_for(|leader| !*leader).await;
                })
                .run(
                    reconcile::reconcile,
                    reconcile::error_policy,
                    context.clone(),
                )
                .for_each(|result| async move {
                    if let Err(error) = result {
                        tracing::debug!(error = %error, "controller event");
                    }
                });
        tokio::pin!(controller);
        let shutting_down = tokio::select! {
            () = &mut controller => false,
            () = &mut shutdown => true,
        };
        metrics.leader.set(0);
        learning_stop.send_replace(true);
        if let Some(task) = learning_task {
            let _ = task.await;
        }
        pods_stop.send_replace(true);
        if let Some(task) = pod_watch {
            let _ = task.await;
        }
        led = true;
        if shutting_down {
            // Let reconciles in flight finish, then give up the Lease.
            election_stop_tx.send_replace(true);
            controller.await;
            tracing::info!("LLMRoute controller stopped");
            break;
        }
        tracing::warn!(
            "LLMRoute controller stopped after losing the leadership; waiting to lead again"
        );
    }
    election_stop_tx.send_replace(true);
    let _ = election.await;
    if led && replication_token.is_some() {
        // The follower that takes the Lease pulls once more from this replica as soon as it
        // leads, within one renewal period.
        let handover = config.election.renew_every * 2 + std::time::Duration::from_secs(1);
        tracing::info!(
            handover_ms = handover.as_millis() as u64,
            "released the Lease; the control API serves the new leader's last pull of this replica's events before it stops"
        );
        tokio::time::sleep(handover).await;
    }
    stop_tx.send_replace(true);
    let mut servers = vec![("control API", control), ("operations endpoints", ops)];
    if let Some(handle) = webhook_server {
        servers.push(("injection webhook", handle));
    }
    for (name, handle) in servers {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(server = name, error = %error, "server failed"),
            Err(error) => tracing::error!(server = name, error = %error, "server task failed"),
        }
    }
    tasks.abort_all();
    tracing::info!("operator stopped");
    Ok(())
}

/// Keeps the webhook's serving certificate loaded and, on the leader, current: creates or
/// renews the Secret and writes the CA into the webhook configuration. Checks every 5 s.
async fn keep_certificate(
    client: Client,
    options: WebhookOptions,
    namespace: String,
    resolver: Arc<CertResolver>,
    leader: watch::Receiver<bool>,
) {
    let mut loaded: Option<String> = None;
    // The CA bundle of the last configuration applied; `None` until one is.
    let mut configured: Option<Option<String>> = None;
    // Until a certificate is loaded the replica is not ready, so it looks again every second.
    let period = |resolver: &CertResolver| if resolver.is_loaded() { 5 } else { 1 };
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(std::time::Duration::from_secs(period(&resolver))).await;
        }
        first = false;
        let is_leader = *leader.borrow();
        let (cert, key, ca) = match &options.certificate {
            CertificateSource::Managed {
                secret,
                hosts,
                lifetimes,
            } => {
                match ensure_secret(&client, &namespace, secret, hosts, lifetimes, is_leader).await
                {
                    Ok(Some((set, _))) => (set.cert_pem, set.key_pem, Some(set.ca_pem)),
                    Ok(None) => {
                        tracing::info!(secret = %secret, "waiting for the leader to create the webhook certificate");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(secret = %secret, error = %error, retry_seconds = period(&resolver), "failed to read or renew the webhook certificate; retrying");
                        continue;
                    }
                }
            }
            CertificateSource::Files { folder } => {
                let read = |name: &str| std::fs::read_to_string(folder.join(name));
                match (read("tls.crt"), read("tls.key")) {
                    (Ok(cert), Ok(key)) => (cert, key, None),
                    (Err(error), _) | (_, Err(error)) => {
                        tracing::warn!(folder = %folder.display(), error = %error, retry_seconds = period(&resolver), "failed to read the webhook certificate files; retrying");
                        continue;
                    }
                }
            }
        };
        if loaded.as_deref() != Some(cert.as_str()) {
            match certified_key(&cert, &key) {
                Ok(certified) => {
                    resolver.set(certified);
                    tracing::info!("loaded the webhook's serving certificate");
                    loaded = Some(cert);
                }
                Err(error) => {
                    tracing::error!(error = %error, "invalid webhook certificate; keeping the previous one");
                }
            }
        }
        if is_leader && configured.as_ref() != Some(&ca) {
            let configuration = webhook::configuration(&options.configuration, ca.as_deref());
            match webhook::apply_configuration(&client, &configuration).await {
                Ok(()) => {
                    tracing::info!(
                        name = %options.configuration.name,
                        "applied the webhook configuration"
                    );
                    configured = Some(ca);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "failed to apply the webhook configuration; retrying in 5 s");
                }
            }
        } else if !is_leader {
            configured = None;
        }
    }
}
