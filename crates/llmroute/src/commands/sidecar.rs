//! `llmroute sidecar`: the routing proxy on 127.0.0.1, configured from local files.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llmroute_api::PolicyRef;
use llmroute_policy::policy::OnnxPolicy;
use llmroute_sidecar::{
    EventSink, Limits, RouteState, Sidecar, SidecarOptions, read_config, serve,
};

use crate::workspace::Workspace;

#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// Sidecar configuration of the route (JSON, the control API's format).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Policy file (policy.onnx from `llmroute train`). Repeatable: the configuration's stable
    /// and canary policies are looked up among these files by sha256. When the configuration
    /// names no stable policy, the first file becomes the stable policy.
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,
    /// TCP port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 8090)]
    pub port: u16,
    /// Appends completed events to this JSON Lines file [default: events are counted as
    /// dropped].
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Seconds a finished request waits for feedback before its event is sent without quality.
    #[arg(long, default_value_t = 600)]
    pub feedback_ttl_seconds: u64,
    /// Maximum request body, in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Identity sent with event batches, for example the pod name.
    #[arg(long, env = "HOSTNAME", default_value = "sidecar")]
    pub sidecar_id: String,
}

pub fn run(workspace: &Workspace, args: &SidecarArgs) -> Result<()> {
    let mut config = read_config(&args.config)?;
    let mut artifacts: HashMap<String, Vec<u8>> = HashMap::new();
    let environment =
        if args.policies.is_empty() && config.stable.is_none() && config.canary.is_none() {
            None
        } else {
            Some(workspace.onnx_runtime()?)
        };
    for path in &args.policies {
        let bytes = std::fs::read(path)
            .with_context(|| format!("failed to read the policy file {}", path.display()))?;
        let environment = environment
            .as_ref()
            .expect("loaded when policies are given");
        let policy = OnnxPolicy::from_bytes(&bytes, environment, &path.display().to_string())?;
        if config.stable.is_none() {
            tracing::info!(policy = %path.display(), policy_version = %policy.metadata().version, "serving the policy file as the stable policy");
            config.stable = Some(PolicyRef {
                version: policy.metadata().version.clone(),
                sha256: policy.sha256().to_string(),
            });
        }
        artifacts.insert(policy.sha256().to_string(), bytes);
    }
    let encoder = match &environment {
        Some(_) => Some(workspace.encoder(1)?),
        None => {
            tracing::warn!(route = %config.route, fallback = %config.fallback, "no policy is configured; routed requests go to the fallback model");
            None
        }
    };
    let digest = encoder
        .as_ref()
        .map(|e| e.digest().to_string())
        .unwrap_or_default();
    let state = RouteState::build(
        config,
        &|sha256| artifacts.get(sha256).cloned(),
        environment.as_ref(),
        &digest,
        None,
    )
    .with_context(|| format!("failed to load the route of {}", args.config.display()))?;

    if args.feedback_ttl_seconds == 0 {
        bail!("invalid --feedback-ttl-seconds 0: use at least 1");
    }
    let options = SidecarOptions {
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            ..Limits::default()
        },
        feedback_ttl: Duration::from_secs(args.feedback_ttl_seconds),
        sidecar_id: args.sidecar_id.clone(),
        sink: match &args.events {
            Some(path) => EventSink::File(path.clone()),
            None => EventSink::Discard,
        },
        ..SidecarOptions::default()
    };

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
        let (sidecar, events) = Sidecar::new(state, encoder, options);
        println!(
            "sidecar of route {} listening on http://{bound}/v1",
            sidecar.state().config.route
        );
        serve(listener, sidecar, events, crate::shutdown::signal()).await?;
        Ok(())
    })
}
