//! `llmroute standalone`: the control plane without Kubernetes. Routes come from `LLMRoute`
//! YAML files in a folder (watched for changes); policies and events live in a state folder.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llmroute_control::auth::{Authenticator, StaticTokenAuthenticator};
use llmroute_control::server::{
    RetentionSettings, ServerOptions, StoreSizeLimit, run_retention, serve_with,
};
use llmroute_control::store::Synchronous;
use llmroute_control::{ControlPlane, LearningLoop, Store};
use llmroute_policy::encoder::{EMBEDDING_DIM, digest_of_files};
use llmroute_policy::policy::OnnxPolicy;

use crate::workspace::Workspace;

#[derive(Debug, clap::Args)]
pub struct StandaloneArgs {
    /// Folder of LLMRoute YAML files (*.yaml, *.yml), reloaded when a file changes.
    #[arg(long, value_name = "DIR")]
    pub routes: PathBuf,
    /// State folder for policy artifacts and the event database (created when missing).
    #[arg(long, value_name = "DIR", default_value = "llmroute-state")]
    pub state: PathBuf,
    /// TCP port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 8070)]
    pub port: u16,
    /// Publishes a policy file (policy.onnx from `llmroute train`) for a route before serving,
    /// as ROUTE=FILE; its version label comes from the file. Repeatable.
    #[arg(long = "publish", value_name = "ROUTE=FILE")]
    pub publish: Vec<String>,
    /// Seconds between checks of the route folder for changes.
    #[arg(long, default_value_t = 1)]
    pub watch_interval_seconds: u64,
    /// File holding a bearer token (at least 16 bytes; surrounding whitespace is ignored) that
    /// POST /v1/events requires in `Authorization: Bearer <token>`, compared in constant
    /// time. Sidecars send it with --control-token-file. Without this option every local
    /// process on 127.0.0.1 may send events.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
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
    /// SQLite `synchronous` setting of the event database. With `full`, every commit is
    /// synced to disk, so an acknowledged event survives an operating system crash or power
    /// loss. With `normal`, it survives only a crash of this process.
    #[arg(long, default_value_t = Synchronous::Full, value_name = "full|normal")]
    pub sqlite_synchronous: Synchronous,
    /// Seconds between two passes of the learning loop, which publishes the pricing prior for
    /// routes without a policy, trains and gates candidates and runs canaries (0 turns it
    /// off).
    #[arg(long, default_value_t = 2)]
    pub learning_interval_seconds: u64,
}

impl StandaloneArgs {
    /// Event retention from the flags.
    fn retention(&self) -> Result<RetentionSettings> {
        if self.retention_interval_seconds == 0 {
            bail!("invalid --retention-interval-seconds 0: use at least 1");
        }
        let max_age = (self.event_max_age_days > 0)
            .then(|| Duration::from_secs(self.event_max_age_days.saturating_mul(24 * 3600)));
        let max_events = (self.event_max_per_route > 0).then_some(self.event_max_per_route);
        Ok(RetentionSettings {
            max_age,
            max_events,
            interval: Duration::from_secs(self.retention_interval_seconds),
            max_store: self.event_max_store_size,
            ..RetentionSettings::default()
        })
    }
}

pub fn run(workspace: &Workspace, args: &StandaloneArgs) -> Result<()> {
    if !args.routes.is_dir() {
        bail!(
            "the route folder {} does not exist; create it and put LLMRoute YAML files in it",
            args.routes.display()
        );
    }
    if args.watch_interval_seconds == 0 {
        bail!("invalid --watch-interval-seconds 0: use at least 1");
    }
    let retention = args.retention()?;
    let authenticator: Option<Arc<dyn Authenticator>> = match &args.token_file {
        Some(path) => Some(Arc::new(
            StaticTokenAuthenticator::from_file(path)
                .map_err(|message| anyhow::anyhow!("invalid --token-file: {message}"))?,
        )),
        None => None,
    };
    let store = Arc::new(Store::open_with(&args.state, args.sqlite_synchronous)?);
    let (plane, report) = ControlPlane::new(&args.routes, store);
    for error in &report.errors {
        eprintln!("warning: {error}");
    }
    for item in &args.publish {
        publish(workspace, &plane, item)?;
    }
    let learning = (args.learning_interval_seconds > 0).then(|| {
        // The pricing prior records the encoder's digest; without the encoder files, routes
        // without a policy stay on their fallback model until one is published.
        let encoder = match workspace.assets().and_then(|assets| {
            digest_of_files(&assets.encoder, &assets.tokenizer)
                .context("failed to read the encoder files")
        }) {
            Ok(digest) => Some(digest),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "no encoder digest, so routes without a policy get no pricing prior; run `llmroute setup`");
                None
            }
        };
        Arc::new(LearningLoop::new(plane.clone(), encoder))
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("failed to bind {address}; pick another --port"))?;
        let bound = listener.local_addr()?;
        println!(
            "control API listening on http://{bound}, routes: {}",
            plane.route_names().join(", ")
        );
        let (stop_watch, watch_stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(plane.clone().watch_folder(
            Duration::from_secs(args.watch_interval_seconds),
            async {
                let _ = watch_stopped.await;
            },
        ));
        let (stop_retention, retention_stopped) = tokio::sync::oneshot::channel::<()>();
        let retainer = tokio::spawn(run_retention(plane.clone(), retention, async {
            let _ = retention_stopped.await;
        }));
        let (stop_learning, learning_stopped) = tokio::sync::oneshot::channel::<()>();
        let learner = learning.map(|learning| {
            tokio::spawn(
                learning.run(Duration::from_secs(args.learning_interval_seconds), async {
                    let _ = learning_stopped.await;
                }),
            )
        });
        let options = ServerOptions {
            authenticator,
            embedding_dim: EMBEDDING_DIM,
            ..ServerOptions::default()
        };
        serve_with(listener, plane, options, crate::shutdown::signal()).await?;
        let _ = stop_watch.send(());
        let _ = stop_retention.send(());
        let _ = stop_learning.send(());
        if let Some(learner) = learner {
            learner.await.context("the learning loop failed")?;
        }
        watcher.await.context("the route folder watcher failed")?;
        retainer.await.context("the event retention task failed")?;
        Ok(())
    })
}

/// Checks a ROUTE=FILE policy against the route and publishes it.
fn publish(workspace: &Workspace, plane: &ControlPlane, item: &str) -> Result<()> {
    let Some((route, file)) = item.split_once('=') else {
        bail!("invalid --publish {item:?}: expected ROUTE=FILE");
    };
    let Some(receiver) = plane.subscribe(route) else {
        bail!(
            "invalid --publish {item:?}: route {route:?} is not defined; routes: {}",
            plane.route_names().join(", ")
        );
    };
    let bytes =
        std::fs::read(file).with_context(|| format!("failed to read the policy file {file}"))?;
    let environment = workspace.onnx_runtime()?;
    let policy = OnnxPolicy::from_bytes(&bytes, &environment, file)?;
    let config = receiver.borrow().clone();
    if let Some(model) = policy
        .metadata()
        .models
        .iter()
        .find(|m| config.model(m).is_none())
    {
        bail!(
            "policy {file} routes to model {model:?}, which route {route:?} does not list; train it on the route's models"
        );
    }
    let version = policy.metadata().version.clone();
    let reference = plane.publish_policy(route, &version, &bytes)?;
    println!(
        "published policy {version} (sha256 {}) for route {route}",
        reference.sha256
    );
    Ok(())
}
