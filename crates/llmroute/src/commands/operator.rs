//! `llmroute operator`: the Kubernetes operator. Reconciles LLMRoutes, publishes their
//! policies, serves the control API to sidecars and the operations endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llmroute_operator::OperatorConfig;
use llmroute_operator::leader::LeaderElection;
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
    /// Watch routes in this namespace only [default: every namespace].
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Digest of the sidecars' prompt encoder [default: computed from the encoder files that
    /// `llmroute setup` installs].
    #[arg(long)]
    pub encoder_digest: Option<String>,
}

pub fn run(workspace: &Workspace, args: &OperatorArgs) -> Result<()> {
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
    let config = OperatorConfig {
        control_address: args.control_listen,
        ops_address: args.ops_listen,
        data_dir: args.data_dir.clone(),
        election: LeaderElection::new(&args.lease_namespace, &args.lease_name, &identity),
        encoder_digest,
        embedding_dim: EMBEDDING_DIM,
        watch_namespace: args.watch_namespace.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default().await.context(
            "failed to configure the Kubernetes client: set KUBECONFIG or run in a pod with a service account",
        )?;
        llmroute_operator::run(client, config, crate::shutdown::signal()).await?;
        Ok(())
    })
}
