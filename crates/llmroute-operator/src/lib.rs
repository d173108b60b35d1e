//! The llmroute operator: the Kubernetes face of the control plane.
//!
//! - A controller for `LLMRoute` (run by the leader only) that checks routes, publishes their
//!   first policy as an `LLMPolicy` with a ConfigMap, and writes status conditions and Events.
//! - The control API of `llmroute-control`, served by every replica from the cluster's routes
//!   and policy ConfigMaps, with sidecar events in a local store.
//! - `/metrics`, `/healthz`, `/readyz`; leader election on a Lease; graceful shutdown.

#![forbid(unsafe_code)]

pub mod conditions;
pub mod install;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod ops;
pub mod reconcile;
pub mod serving;

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
}

/// Runs the operator until `shutdown` completes.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let control_listener = TcpListener::bind(config.control_address)
        .await
        .map_err(|source| StartError::Listen {
            address: config.control_address,
            source,
        })?;
    let ops_listener = TcpListener::bind(config.ops_address)
        .await
        .map_err(|source| StartError::Listen {
            address: config.ops_address,
            source,
        })?;
    run_with_listeners(client, config, control_listener, ops_listener, shutdown).await
}

/// [`run`] on listeners bound by the caller (tests bind port 0).
pub async fn run_with_listeners(
    client: Client,
    config: OperatorConfig,
    control_listener: TcpListener,
    ops_listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
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
    let control = tokio::spawn(llmroute_control::serve(
        control_listener,
        backend.clone(),
        stopped(),
    ));
    let ops = tokio::spawn(ops::serve(
        ops_listener,
        metrics.clone(),
        backend.clone(),
        stopped(),
    ));

    let (leader_tx, mut leader_rx) = watch::channel(false);
    let election = tokio::spawn(
        config
            .election
            .clone()
            .run(client.clone(), leader_tx, stopped()),
    );

    let reporter = Reporter {
        controller: "llmroute-operator".into(),
        instance: Some(config.election.identity.clone()),
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
        let owned = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE}"));
        let mut lost = leader_rx.clone();
        let controller = Controller::new(
            Api::<LlmRoute>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(Api::<LlmPolicy>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned)
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
        if shutting_down {
            // Let reconciles in flight finish, then give up the Lease.
            stop_tx.send_replace(true);
            controller.await;
            tracing::info!("LLMRoute controller stopped");
            break;
        }
        tracing::warn!(
            "LLMRoute controller stopped after losing the leadership; waiting to lead again"
        );
    }
    stop_tx.send_replace(true);
    let _ = election.await;
    for (name, handle) in [("control API", control), ("operations endpoints", ops)] {
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
