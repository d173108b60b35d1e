//! `llmroute sidecar`: the routing proxy on 127.0.0.1, configured from local files or from the
//! control API.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llmroute_api::PolicyRef;
use llmroute_policy::encoder::Encoder;
use llmroute_policy::policy::OnnxPolicy;
use llmroute_sidecar::{
    ControlClient, EventSink, Limits, RouteState, ShutdownSwitch, Sidecar, SidecarOptions,
    TokenFile, follow, read_config, serve, serve_admin, serve_not_ready,
};

use crate::args::parse_count;
use crate::workspace::Workspace;

/// Maximum --encoder-threads. ONNX Runtime starts every intra-op thread when it loads the
/// encoder, before the sidecar serves a request, so with a count of a million the memory grew
/// without limit and the sidecar never served. Threads beyond the core count do not speed up a decision, and 256 leaves room for
/// large servers.
const MAX_ENCODER_THREADS: usize = 256;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "control"])))]
pub struct SidecarArgs {
    /// Sidecar configuration of the route (JSON, the control API's format).
    #[arg(long, value_name = "FILE", conflicts_with = "control")]
    pub config: Option<PathBuf>,
    /// Base URL of the control API (for example http://127.0.0.1:8070); the configuration and
    /// policies come from there and follow its changes, and events go there.
    #[arg(long, value_name = "URL", requires = "route")]
    pub control: Option<String>,
    /// Route to serve, with --control.
    #[arg(long, requires = "control")]
    pub route: Option<String>,
    /// Policy file (policy.onnx from `llmroute train`). Repeatable: the configuration's stable
    /// and canary policies are looked up among these files by sha256. When the configuration
    /// names no stable policy, the first file becomes the stable policy.
    #[arg(long = "policy", value_name = "FILE", conflicts_with = "control")]
    pub policies: Vec<PathBuf>,
    /// TCP port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 8090)]
    pub port: u16,
    /// Also serve GET /healthz, /readyz and /metrics, and nothing else, on this address. In a
    /// pod the injection webhook sets every address of the pod ([::]:9099, IPv4 and IPv6, or
    /// 0.0.0.0:9099 on a host without IPv6), so that the kubelet can probe the sidecar and
    /// Prometheus can scrape it. The proxy stays on 127.0.0.1 [default: no admin listener, and
    /// the proxy's port serves the same paths].
    #[arg(long, value_name = "ADDRESS:PORT")]
    pub admin_address: Option<SocketAddr>,
    /// Seconds between SIGTERM and the listener closing, during which /readyz responds 503 and
    /// the proxy keeps serving. The injection webhook sets 5 for a sidecar that runs as a
    /// regular container, which gets SIGTERM together with the app.
    #[arg(long, default_value_t = 0)]
    pub drain_seconds: u64,
    /// Serve POST /shutdown on the proxy's port, which stops the sidecar as SIGTERM does, but
    /// without the drain, and exits with status 0. The last step of a Job's app calls it, so
    /// that a pod whose sidecar runs as a regular container completes. The injection webhook
    /// sets it for such pods of a Job (annotation llmroute.dev/sidecar-shutdown-endpoint).
    #[arg(long)]
    pub shutdown_endpoint: bool,
    /// Appends completed events to this JSON Lines file [default: the control API with
    /// --control, else events are counted as dropped].
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Seconds a finished request waits for feedback before its event is sent without quality.
    #[arg(long, default_value_t = 600)]
    pub feedback_ttl_seconds: u64,
    /// Maximum finished requests waiting for feedback, about 2.2 KiB of memory each. When the
    /// buffer is full, the oldest is sent without quality.
    #[arg(long, default_value_t = SidecarOptions::default().feedback_capacity)]
    pub feedback_capacity: usize,
    /// Intra-op threads of the prompt encoder, from 1 to 256. Decisions run one at a time on
    /// the one encoder, so more threads shorten each decision and raise the routed
    /// throughput, with CPU time taken from the proxy path.
    #[arg(long, default_value_t = 1, value_parser = parse_count, allow_negative_numbers = true)]
    pub encoder_threads: usize,
    /// Maximum request body, in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// PEM file of extra CA certificates trusted for https:// model endpoints, on top of the
    /// system roots (or SSL_CERT_FILE / SSL_CERT_DIR when set).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// File holding a bearer token for the control API, sent as `Authorization: Bearer` on
    /// every control API request and read again when the file changes (the kubelet rotates
    /// projected service-account tokens). Used with --control only. The injection webhook sets
    /// the environment variable.
    #[arg(long, env = "LLMROUTE_CONTROL_TOKEN_FILE", value_name = "FILE")]
    pub control_token_file: Option<PathBuf>,
    /// Identity sent with event batches, for example the pod name.
    #[arg(long, env = "HOSTNAME", default_value = "sidecar")]
    pub sidecar_id: String,
}

/// Loads the route state from --config and --policy files.
fn state_from_files(
    workspace: &Workspace,
    args: &SidecarArgs,
    path: &Path,
) -> Result<(RouteState, Option<Encoder>)> {
    let mut config = read_config(path)?;
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
        Some(_) => Some(workspace.encoder(args.encoder_threads)?),
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
    .with_context(|| format!("failed to load the route of {}", path.display()))?;
    Ok((state, encoder))
}

pub fn run(workspace: &Workspace, args: &SidecarArgs) -> Result<()> {
    if args.feedback_ttl_seconds == 0 {
        bail!("invalid --feedback-ttl-seconds 0: use at least 1");
    }
    if args.feedback_capacity == 0 {
        bail!("invalid --feedback-capacity 0: use at least 1");
    }
    if args.encoder_threads == 0 {
        bail!("invalid --encoder-threads 0: use at least 1");
    }
    if args.encoder_threads > MAX_ENCODER_THREADS {
        bail!(
            "invalid --encoder-threads {}: use at most {MAX_ENCODER_THREADS}",
            args.encoder_threads
        );
    }
    let options = SidecarOptions {
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            ..Limits::default()
        },
        feedback_ttl: Duration::from_secs(args.feedback_ttl_seconds),
        feedback_capacity: args.feedback_capacity,
        sidecar_id: args.sidecar_id.clone(),
        upstream_tls: match &args.upstream_ca_file {
            Some(path) => llmroute_sidecar::UpstreamTls::with_ca_file(path)
                .with_context(|| format!("invalid --upstream-ca-file {}", path.display()))?,
            None => llmroute_sidecar::UpstreamTls::default(),
        },
        shutdown: args.shutdown_endpoint.then(ShutdownSwitch::new),
        ..SidecarOptions::default()
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let admin = match args.admin_address {
            Some(address) => Some(Admin::start(address).await.with_context(|| {
                format!("failed to bind {address}; pick another --admin-address")
            })?),
            None => None,
        };
        let served = serve_route(workspace, args, options, admin.as_ref()).await;
        if let Some(admin) = admin {
            admin.stop().await;
        }
        served
    })
}

/// The admin listener's task, and how to tell it about the sidecar and stop it.
struct Admin {
    publish: tokio::sync::watch::Sender<Option<std::sync::Arc<Sidecar>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(address: SocketAddr) -> std::io::Result<Self> {
        let listener = llmroute_api::listen::bind(address)?;
        println!(
            "admin endpoints listening on http://{}",
            listener.local_addr()?
        );
        let (publish, target) = tokio::sync::watch::channel(None);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_admin(listener, target, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            publish,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "the admin listener failed"),
            Err(error) => tracing::warn!(error = %error, "the admin listener's task failed"),
        }
    }
}

/// Loads the route, serves it on 127.0.0.1 until a shutdown signal, and passes the sidecar to
/// `admin` once it has a configuration.
async fn serve_route(
    workspace: &Workspace,
    args: &SidecarArgs,
    options: SidecarOptions,
    admin: Option<&Admin>,
) -> Result<()> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to bind {address}; pick another --port"))?;
    let bound = listener.local_addr()?;
    let switch = options.shutdown.clone();
    // Completes on SIGINT, SIGTERM or POST /shutdown, and returns true for a signal.
    let stop_requested = || {
        let switch = switch.clone();
        async move {
            let requested = async {
                match &switch {
                    Some(switch) => switch.requested().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = crate::shutdown::signal() => true,
                () = requested => false,
            }
        }
    };

    let file_sink = args.events.clone().map(EventSink::File);
    let (state, encoder, environment, control) = match (&args.config, &args.control) {
        (Some(path), _) => {
            let (state, encoder) = state_from_files(workspace, args, path)?;
            (state, encoder, None, None)
        }
        (None, Some(base)) => {
            let route = args.route.as_deref().expect("clap requires --route");
            let environment = workspace.onnx_runtime()?;
            let encoder = workspace.encoder(args.encoder_threads)?;
            let mut client = ControlClient::new(base, route);
            if let Some(path) = &args.control_token_file {
                tracing::info!(path = %path.display(), "sending the control API token from a file");
                client = client.with_token_file(TokenFile::new(path));
            }
            tracing::info!(route, control = %base, "waiting for the first route configuration");
            // Until the first configuration arrives, /healthz responds 200, /readyz 503 and
            // every other request gets a 503 error.
            let (ready, became_ready) = tokio::sync::oneshot::channel::<()>();
            let wait_for_state = async {
                let state = client
                    .first_state(Some(&environment), encoder.digest(), async {
                        stop_requested().await;
                    })
                    .await;
                let _ = ready.send(());
                state
            };
            let not_ready = serve_not_ready(&listener, route, switch.as_ref(), async {
                let _ = became_ready.await;
            });
            let (first, ()) = tokio::join!(wait_for_state, not_ready);
            let Some(state) = first else {
                return Ok(());
            };
            (state, Some(encoder), Some(environment), Some(client))
        }
        (None, None) => bail!("pass --config FILE, or --control URL with --route NAME"),
    };

    let sink = match (file_sink, &control) {
        (Some(sink), _) => sink,
        (None, Some(client)) => EventSink::Control(client.clone()),
        (None, None) => EventSink::Discard,
    };
    let options = SidecarOptions { sink, ..options };
    let released = crate::memory::release_freed_heap();
    tracing::info!(
        released_mib = released / (1 << 20),
        "returned the heap freed while loading to the kernel"
    );

    let (sidecar, events) = Sidecar::new(state, encoder, options);
    if let Some(admin) = admin {
        admin.publish.send_replace(Some(sidecar.clone()));
    }
    println!(
        "sidecar of route {} listening on http://{bound}/v1",
        sidecar.state().config.route
    );

    let (stop_follow, follow_stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = control.map(|client| {
        tokio::spawn(follow(sidecar.clone(), client, environment, async {
            let _ = follow_stopped.await;
        }))
    });

    let drain = Duration::from_secs(args.drain_seconds);
    let draining = sidecar.clone();
    let shutdown = async move {
        let signalled = stop_requested().await;
        if !signalled {
            // The app requested the stop, so it makes no more calls and there is nothing to drain.
            draining.start_draining();
        } else if !drain.is_zero() {
            draining.start_draining();
            tracing::info!(
                drain_seconds = drain.as_secs(),
                "shutdown requested; /readyz responds 503 while the proxy keeps serving"
            );
            tokio::time::sleep(drain).await;
        }
    };
    serve(listener, sidecar, events, shutdown).await?;
    let _ = stop_follow.send(());
    if let Some(follower) = follower {
        follower
            .await
            .context("the configuration follower failed")?;
    }
    Ok(())
}
