//! Latency of the sidecar injection webhook under a burst of pod creations, against a real
//! Kubernetes API server.
//!
//! Creates the CRDs, a namespace, a Secret and a ready `LLMRoute` `chat`, and starts the
//! operator in this process, on a Tokio runtime and API client of its own, with its webhook (a
//! managed certificate for 127.0.0.1, a `MutatingWebhookConfiguration` whose namespace selector
//! matches only the bench namespace, `failurePolicy: Ignore`, `timeoutSeconds: 3`). Probe pods,
//! created until one comes back injected, check that injection works before anything is
//! measured. Then it creates N annotated pods at once, at most C requests in flight, or with
//! `--deployment` applies one Deployment of N replicas whose pods kube-controller-manager
//! creates at its own pace, as a scale-up in a cluster does, or with `--pause-seconds S` creates
//! them one at a time with a pause of S s before each, as sporadic traffic does, and reports:
//!
//! - the webhook's own handling time, from the operator's histogram
//!   `llmroute_operator_webhook_duration_seconds`. Its p50 and p99 come from bucket deltas, so
//!   they are bucket upper bounds, and its mean is exact, from `_sum` and `_count`;
//! - the API server's view, from its histogram
//!   `apiserver_admission_webhook_admission_duration_seconds` for this webhook (bucket deltas
//!   again; the API server's buckets are 5, 25, 100 ms and wider);
//! - with `--apiserver-spans FILE`, the API server's own trace span of each webhook call,
//!   exact: `scripts/bench-webhook --trace` makes kube-apiserver send its traces to a receiver
//!   on 127.0.0.1 that writes the spans to FILE;
//! - the client-side time of each create (exact), the burst's wall time and pods per second;
//! - optionally, the same burst in a second namespace that the webhook does not select, as a
//!   baseline of create latency without the webhook;
//! - correctness: every pod listed, with exactly one `llmroute-sidecar` container and the
//!   injection label.
//!
//! It prints a Markdown table, then stops the operator and deletes the webhook configuration and
//! the namespaces. It needs `LLMROUTE_TEST_KUBECONFIG` from `scripts/k8s-testenv`;
//! `scripts/bench-webhook` builds it in release and runs it.
//!
//! NOTE: the operator's histogram observes `Webhook::review` only (decoding the review,
//! deciding and encoding the response). TLS, HTTP parsing and the wait for a Tokio worker are
//! not in it, but the API server's histogram contains them and the round trip on 127.0.0.1.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use llmroute_api::crd::LlmRoute;
use llmroute_operator::leader::LeaderElection;
use llmroute_operator::webhook::certs::Lifetimes;
use llmroute_operator::webhook::inject::{INJECTION_LABEL, InjectionSettings, SIDECAR_NAME};
use llmroute_operator::webhook::{WEBHOOK_NAME, WebhookConfigSpec, WebhookTarget};
use llmroute_operator::{
    CertificateSource, Listeners, OperatorConfig, SidecarMode, WebhookOptions,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const USAGE: &str = "usage: webhook_bench [--pods N] [--concurrency C | --deployment | \
--pause-seconds S] [--no-baseline] [--operator-log FILE] [--apiserver-spans FILE] [--ready-timeout-seconds S]";
/// SHA-256 of empty input, as the encoder digest, because the webhook never loads the encoder.
const ENCODER_DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const ROUTE: &str = "chat";
const FIELD_MANAGER: &str = "llmroute-webhook-bench";
/// Name and `app` label of the Deployment of `--deployment`.
const DEPLOYMENT: &str = "bench";
/// The p99 the webhook must meet, in seconds.
const TARGET_P99_SECONDS: f64 = 0.010;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug)]
struct Options {
    pods: usize,
    concurrency: usize,
    /// Pods come from one Deployment of `pods` replicas rather than from direct creates.
    deployment: bool,
    /// Creates one pod at a time with this pause between creates, as sporadic traffic does.
    pause: Option<Duration>,
    baseline: bool,
    operator_log: Option<PathBuf>,
    /// Spans written by `scripts/bench-webhook.d/otlp-sink` from kube-apiserver's traces.
    apiserver_spans: Option<PathBuf>,
    ready_timeout: Duration,
}

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        pods: 1000,
        concurrency: 64,
        deployment: false,
        pause: None,
        baseline: true,
        operator_log: None,
        apiserver_spans: None,
        ready_timeout: Duration::from_secs(60),
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("missing value of {name}; {USAGE}"))
        };
        match arg.as_str() {
            "--pods" => options.pods = parse_count("--pods", &value("--pods")?)?,
            "--concurrency" => {
                options.concurrency = parse_count("--concurrency", &value("--concurrency")?)?;
            }
            "--no-baseline" => options.baseline = false,
            "--deployment" => options.deployment = true,
            "--pause-seconds" => {
                let text = value("--pause-seconds")?;
                let seconds = parse_count("--pause-seconds", &text)?;
                options.pause = Some(Duration::from_secs(seconds as u64));
            }
            "--operator-log" => {
                options.operator_log = Some(PathBuf::from(value("--operator-log")?));
            }
            "--apiserver-spans" => {
                options.apiserver_spans = Some(PathBuf::from(value("--apiserver-spans")?));
            }
            "--ready-timeout-seconds" => {
                let text = value("--ready-timeout-seconds")?;
                let seconds = parse_count("--ready-timeout-seconds", &text)?;
                options.ready_timeout = Duration::from_secs(seconds as u64);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    let flag_given = |name: &str| std::env::args().any(|arg| arg == name);
    if options.pause.is_some() && (options.deployment || flag_given("--concurrency")) {
        return Err(format!(
            "--pause-seconds creates one pod at a time, so drop --deployment and --concurrency; \
             {USAGE}"
        ));
    }
    if options.pause.is_some() {
        options.concurrency = 1;
        options.baseline = false;
    }
    if options.deployment && flag_given("--concurrency") {
        return Err(format!(
            "--concurrency sets direct creates; with --deployment the controller manager \
             creates the pods, so drop one of them; {USAGE}"
        ));
    }
    Ok(options)
}

fn parse_count(name: &str, text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(format!(
            "invalid {name} {text:?}; expected a positive integer"
        )),
    }
}

/// Sends the operator's log to `path` (or to stderr), at `info` for llmroute as the `llmroute`
/// binary does; `RUST_LOG` overrides the filter.
fn init_logging(path: Option<&PathBuf>) -> BenchResult<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,llmroute_operator=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match path {
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|error| format!("failed to create {}: {error}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .init();
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

async fn client() -> BenchResult<Client> {
    let path = std::env::var("LLMROUTE_TEST_KUBECONFIG").map_err(|_| {
        "LLMROUTE_TEST_KUBECONFIG is not set: run `scripts/k8s-testenv start DIR` and \
         `source DIR/env`, or scripts/bench-webhook"
    })?;
    let kubeconfig = Kubeconfig::read_from(&path)
        .map_err(|error| format!("failed to read the kubeconfig {path}: {error}"))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Calls `check` every 100 ms until it returns a value, for at most `timeout`.
async fn eventually<T, F, Fut>(description: &str, timeout: Duration, mut check: F) -> BenchResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {description}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- Prometheus text format ---------------------------------------------------------------

/// One scrape: the value of each series, by metric name and then by its label set.
#[derive(Debug, Default)]
struct Scrape(HashMap<String, Vec<Series>>);

/// The labels and the value of one series.
type Series = (BTreeMap<String, String>, f64);

impl Scrape {
    /// Parses the text exposition format. Comment lines and lines it cannot read are ignored.
    fn parse(text: &str) -> Self {
        let mut series: HashMap<String, Vec<Series>> = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match (line.find('{'), line.rfind('}')) {
                (Some(open), Some(close)) if open < close => (
                    &line[..open],
                    parse_labels(&line[open + 1..close]),
                    &line[close + 1..],
                ),
                _ => match line.split_once(' ') {
                    Some((name, rest)) => (name, BTreeMap::new(), rest),
                    None => continue,
                },
            };
            let Some(value) = rest.split_whitespace().next().and_then(parse_value) else {
                continue;
            };
            series
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Self(series)
    }

    /// Sum of the series of `name` whose labels pass `select`.
    fn sum(&self, name: &str, select: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(labels, _)| select(labels))
            .map(|(_, value)| value)
            .sum()
    }

    /// Cumulative bucket counts of the histogram `name`, summed over the series that pass
    /// `select`, by upper bound (`+Inf` included).
    fn buckets(
        &self,
        name: &str,
        select: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Vec<(f64, f64)> {
        let mut by_bound: Vec<(f64, f64)> = Vec::new();
        for (labels, value) in self.0.get(&format!("{name}_bucket")).into_iter().flatten() {
            if !select(labels) {
                continue;
            }
            let Some(bound) = labels.get("le").map(String::as_str).and_then(parse_value) else {
                continue;
            };
            match by_bound.iter_mut().find(|(b, _)| *b == bound) {
                Some(entry) => entry.1 += value,
                None => by_bound.push((bound, *value)),
            }
        }
        by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
        by_bound
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Parses `key="value",…` with the format's escapes (`\\`, `\"`, `\n`).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if key.is_empty() || chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                other => value.push(other),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// Observations of one histogram between two scrapes.
#[derive(Debug, Clone, Default)]
struct HistogramDelta {
    count: f64,
    sum: f64,
    /// Cumulative counts by upper bound, in seconds, `+Inf` last.
    buckets: Vec<(f64, f64)>,
}

impl HistogramDelta {
    fn between(
        before: &Scrape,
        after: &Scrape,
        name: &str,
        select: impl Fn(&BTreeMap<String, String>) -> bool + Copy,
    ) -> Self {
        let earlier = before.buckets(name, select);
        let buckets = after
            .buckets(name, select)
            .into_iter()
            .map(|(bound, count)| {
                let old = earlier
                    .iter()
                    .find(|(b, _)| *b == bound)
                    .map_or(0.0, |(_, c)| *c);
                (bound, count - old)
            })
            .collect();
        Self {
            count: after.sum(&format!("{name}_count"), select)
                - before.sum(&format!("{name}_count"), select),
            sum: after.sum(&format!("{name}_sum"), select)
                - before.sum(&format!("{name}_sum"), select),
            buckets,
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// Returns the bucket that contains the `q` quantile (nearest rank): its lower and upper
    /// bound, in seconds. `None` without observations.
    fn quantile_bucket(&self, q: f64) -> Option<(f64, f64)> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = (q * self.count).ceil().max(1.0);
        let mut lower = 0.0;
        for &(bound, cumulative) in &self.buckets {
            if cumulative >= rank {
                return Some((lower, bound));
            }
            lower = bound;
        }
        None
    }
}

fn format_bucket(bucket: Option<(f64, f64)>) -> String {
    match bucket {
        None => "no observations".into(),
        Some((lower, upper)) if upper.is_infinite() => {
            format!("> {} (above the last bucket)", format_ms(lower))
        }
        Some((lower, upper)) => format!(
            "≤ {} (bucket {}–{})",
            format_ms(upper),
            format_ms(lower),
            format_ms(upper)
        ),
    }
}

fn format_ms(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.3} ms")
    }
}

/// Returns whether the `TARGET_P99_SECONDS` target is met, from the bucket that contains p99.
fn verdict(bucket: Option<(f64, f64)>) -> &'static str {
    match bucket {
        Some((_, upper)) if upper <= TARGET_P99_SECONDS => "met",
        Some((lower, _)) if lower >= TARGET_P99_SECONDS => "missed",
        Some(_) => "not decided by these buckets",
        None => "not measured",
    }
}

// --- the operator and its cluster objects -------------------------------------------------

/// The operator running in this process and the objects it needs.
struct Setup {
    client: Client,
    namespace: String,
    configuration: String,
    ops_address: String,
    stop: Option<oneshot::Sender<()>>,
    /// The thread that runs the operator's own Tokio runtime.
    thread: Option<std::thread::JoinHandle<()>>,
    data: tempfile::TempDir,
}

impl Setup {
    /// Creates the CRDs, the namespace, the Secret and the route, and starts the operator.
    async fn start(client: Client, namespace: String, options: &Options) -> BenchResult<Self> {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in llmroute_api::crd::definitions() {
            crds.patch(
                &crd.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await?;
        }
        create_namespace(&client, &namespace).await?;
        let mut setup = Self {
            client: client.clone(),
            configuration: format!("llmroute-injector-{namespace}"),
            namespace,
            ops_address: String::new(),
            stop: None,
            thread: None,
            data: tempfile::tempdir()?,
        };
        setup.create_route(options.ready_timeout).await?;
        setup.start_operator(options.ready_timeout).await?;
        Ok(setup)
    }

    async fn create_route(&self, timeout: Duration) -> BenchResult<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret: Secret = serde_json::from_value(
            json!({"metadata": {"name": "keys"}, "stringData": {"large": "sk-bench"}}),
        )?;
        secrets.create(&PostParams::default(), &secret).await?;
        let route = json!({
            "apiVersion": "llmroute.dev/v1alpha1",
            "kind": "LLMRoute",
            "metadata": {"name": ROUTE},
            "spec": {
                "models": [
                    {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "s",
                     "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
                    {"name": "large", "endpoint": "http://127.0.0.1:9/v1", "model": "l",
                     "apiKeySecretRef": {"name": "keys", "key": "large"},
                     "pricing": {"inputUsdPerMillionTokens": 2.5, "outputUsdPerMillionTokens": 10}}
                ],
                "defaultPreference": {"quality": 0.7},
                "fallback": "small"
            }
        });
        let routes: Api<LlmRoute> = Api::namespaced(self.client.clone(), &self.namespace);
        // A CRD applied a moment ago may not serve its resource yet.
        eventually("the LLMRoute CRD to accept a route", timeout, || async {
            routes
                .patch(
                    ROUTE,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Apply(&route),
                )
                .await
                .ok()
        })
        .await?;
        Ok(())
    }

    async fn start_operator(&mut self, timeout: Duration) -> BenchResult<()> {
        // Bound here, so that their addresses are known at once; the operator's runtime
        // registers them with its own reactor.
        let bind = || -> std::io::Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let control = bind()?;
        let ops = bind()?;
        let webhook = bind()?;
        let webhook_url = format!("https://127.0.0.1:{}/inject", webhook.local_addr()?.port());
        self.ops_address = ops.local_addr()?.to_string();
        let labels = BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            self.namespace.clone(),
        )]);
        let config = OperatorConfig {
            control_address: control.local_addr()?,
            ops_address: ops.local_addr()?,
            data_dir: self.data.path().to_path_buf(),
            election: LeaderElection::new(&self.namespace, "llmroute-operator", "webhook-bench"),
            encoder_digest: ENCODER_DIGEST.into(),
            embedding_dim: 384,
            watch_namespace: Some(self.namespace.clone()),
            webhook: Some(WebhookOptions {
                address: webhook.local_addr()?,
                injection: InjectionSettings {
                    image: "llmroute:bench".into(),
                    control_url: "http://127.0.0.1:8090".into(),
                    ..InjectionSettings::default()
                },
                sidecar_mode: SidecarMode::Auto,
                // The defaults of `llmroute operator`: Ignore, 3 s.
                configuration: WebhookConfigSpec {
                    name: self.configuration.clone(),
                    namespace_labels: Some(labels),
                    target: WebhookTarget::Url(webhook_url),
                    failure_policy: "Ignore".into(),
                    timeout_seconds: 3,
                    excluded_namespaces: vec!["kube-system".into()],
                },
                certificate: CertificateSource::Managed {
                    secret: "llmroute-webhook-tls".into(),
                    hosts: vec!["127.0.0.1".into()],
                    lifetimes: Lifetimes::default(),
                },
            }),
            learning_interval: None,
            shutdown_drain: std::time::Duration::ZERO,
            replication_interval: llmroute_operator::replication::DEFAULT_PULL_INTERVAL,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        // The operator runs on a Tokio runtime and API client of its own, so its connections
        // do not wait in the load client's task queue. The two runtimes share the cores
        // through the kernel's scheduler, as two processes would.
        let thread = std::thread::Builder::new()
            .name("operator".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .thread_name("operator-worker")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        eprintln!("error: failed to start the operator's Tokio runtime: {error}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = async {
                        let client = client().await?;
                        let listeners = Listeners {
                            control: TcpListener::from_std(control)?,
                            ops: TcpListener::from_std(ops)?,
                            webhook: Some(TcpListener::from_std(webhook)?),
                        };
                        let shutdown = async {
                            let _ = stopped.await;
                        };
                        llmroute_operator::run_with_listeners(client, config, listeners, shutdown)
                            .await?;
                        BenchResult::Ok(())
                    };
                    if let Err(error) = started.await {
                        eprintln!("error: the operator failed: {error}");
                    }
                });
            })?;
        self.thread = Some(thread);
        self.stop = Some(stop);

        let configurations: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let name = self.configuration.clone();
        eventually(
            "the webhook configuration with a CA bundle",
            timeout,
            || async {
                let configuration = configurations.get_opt(&name).await.ok()??;
                let webhook = configuration.webhooks?.into_iter().next()?;
                webhook.client_config.ca_bundle.map(|_| ())
            },
        )
        .await?;
        let routes: Api<LlmRoute> = Api::namespaced(self.client.clone(), &self.namespace);
        eventually("route chat Ready", timeout, || async {
            let route = routes.get(ROUTE).await.ok()?;
            route
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Serving")
                .then_some(())
        })
        .await?;
        Ok(())
    }

    /// Creates probe pods until one is injected (the webhook serves and has the route), then
    /// deletes them. Not measured.
    async fn probe(&self, timeout: Duration) -> BenchResult<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut attempt = 0;
        eventually("an injected probe pod", timeout, || {
            attempt += 1;
            let pods = pods.clone();
            async move {
                let name = format!("probe-{attempt}");
                let created = pods
                    .create(&PostParams::default(), &annotated_pod(&name))
                    .await
                    .ok()?;
                let _ = pods.delete(&name, &DeleteParams::default()).await;
                (sidecar_count(&created) == 1).then_some(())
            }
        })
        .await
    }

    async fn scrape_operator(&self) -> BenchResult<Scrape> {
        let text = http_get(&self.ops_address, "/metrics").await?;
        Ok(Scrape::parse(&text))
    }

    /// Stops the operator, then deletes the webhook configuration and the namespace.
    async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            match tokio::time::timeout(Duration::from_secs(20), joined).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(_))) => eprintln!("error: the operator's thread panicked"),
                Ok(Err(error)) => eprintln!("error: failed to wait for the operator: {error}"),
                Err(_) => eprintln!("error: the operator did not stop within 20 s"),
            }
        }
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        if let Err(error) = configurations
            .delete(&self.configuration, &DeleteParams::default())
            .await
        {
            eprintln!(
                "error: failed to delete the webhook configuration {}: {error}",
                self.configuration
            );
        }
        delete_namespace(&self.client, &self.namespace).await;
    }
}

async fn create_namespace(client: &Client, name: &str) -> BenchResult<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    namespaces.create(&PostParams::default(), &object).await?;
    Ok(())
}

async fn delete_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Err(error) = namespaces.delete(name, &DeleteParams::default()).await {
        eprintln!("error: failed to delete the namespace {name}: {error}");
    }
}

/// Sends a GET of `path` to the plain HTTP server at `address` (127.0.0.1) and returns the body.
async fn http_get(address: &str, path: &str) -> BenchResult<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("invalid HTTP response from {address}{path}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(format!("GET {address}{path} returned {status}").into());
    }
    Ok(body.to_string())
}

async fn scrape_apiserver(client: &Client) -> BenchResult<Scrape> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    Ok(Scrape::parse(&client.request_text(request).await?))
}

fn annotated_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"llmroute.dev/route": ROUTE}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .expect("a valid pod")
}

fn sidecar_count(pod: &Pod) -> usize {
    let Some(spec) = pod.spec.as_ref() else {
        return 0;
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name == SIDECAR_NAME)
        .count()
}

// --- the burst ----------------------------------------------------------------------------

/// Client-side figures of one burst.
#[derive(Debug)]
struct Burst {
    /// Pods created.
    created: usize,
    /// Time of each successful create, sorted. Empty when the controller manager created the
    /// pods.
    latencies: Vec<Duration>,
    errors: Vec<String>,
    wall: Duration,
}

/// Nearest-rank percentile `q` of `sorted`, or zero when it is empty.
fn nearest_rank(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Burst {
    fn percentile(&self, q: f64) -> Duration {
        nearest_rank(&self.latencies, q)
    }

    fn pods_per_second(&self) -> f64 {
        self.created as f64 / self.wall.as_secs_f64()
    }

    fn summary(&self) -> String {
        if self.latencies.is_empty() {
            return "– (no client creates)".into();
        }
        format!(
            "{} / {} / {}",
            format_ms(self.percentile(0.50).as_secs_f64()),
            format_ms(self.percentile(0.99).as_secs_f64()),
            format_ms(
                self.latencies
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64()
            )
        )
    }
}

/// Creates pods `bench-00000`… in `namespace`, all issued at once with at most `concurrency`
/// in flight, or with `pause` before each create after the first, and times each create.
async fn burst(
    client: &Client,
    namespace: &str,
    pods: usize,
    concurrency: usize,
    pause: Option<Duration>,
) -> Burst {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    let results: Vec<Result<Duration, String>> = futures::stream::iter(0..pods)
        .map(|index| {
            let api = api.clone();
            async move {
                if let Some(pause) = pause.filter(|_| index > 0) {
                    tokio::time::sleep(pause).await;
                }
                let name = pod_name(index);
                let pod = annotated_pod(&name);
                let sent = Instant::now();
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => Ok(sent.elapsed()),
                    Err(error) => Err(format!("{name}: {error}")),
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut latencies = Vec::with_capacity(pods);
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(latency) => latencies.push(latency),
            Err(error) => errors.push(error),
        }
    }
    latencies.sort();
    Burst {
        created: latencies.len(),
        latencies,
        errors,
        wall,
    }
}

/// Applies a Deployment of `pods` replicas with the annotated pod template and waits until
/// `pods` of its pods exist. kube-controller-manager's ReplicaSet controller creates them, in
/// batches and at the request rate its client allows.
async fn deployment_burst(
    client: &Client,
    namespace: &str,
    pods: usize,
    timeout: Duration,
) -> BenchResult<Burst> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": DEPLOYMENT},
        "spec": {
            "replicas": pods,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "template": {
                "metadata": {
                    "labels": {"app": DEPLOYMENT},
                    "annotations": {"llmroute.dev/route": ROUTE}
                },
                "spec": {"containers": [{"name": "app", "image": "app:1"}]}
            }
        }
    }))?;
    let started = Instant::now();
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = ListParams::default().labels(&format!("app={DEPLOYMENT}"));
    let created = eventually(
        &format!("{pods} pods of the Deployment {DEPLOYMENT}"),
        timeout,
        || async {
            let listed = api.list_metadata(&selector).await.ok()?.items.len();
            (listed >= pods).then_some(listed)
        },
    )
    .await?;
    Ok(Burst {
        created,
        latencies: Vec::new(),
        errors: Vec::new(),
        wall: started.elapsed(),
    })
}

fn pod_name(index: usize) -> String {
    format!("bench-{index:05}")
}

/// Result of listing the namespace's pods after the burst.
#[derive(Debug, Default)]
struct Check {
    listed: usize,
    missing: usize,
    /// Listed pods without the sidecar or without `llmroute.dev/injection: injected`.
    not_injected: usize,
    /// Listed pods with more than one sidecar container.
    injected_twice: usize,
    /// Sidecars that are init containers with `restartPolicy: Always`.
    native: usize,
    examples: Vec<String>,
}

async fn check_pods(client: &Client, namespace: &str, pods: usize) -> BenchResult<Check> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let listed = api.list(&ListParams::default()).await?.items;
    let by_name: HashMap<String, &Pod> = listed
        .iter()
        .filter(|pod| pod.name_any().starts_with("bench-"))
        .map(|pod| (pod.name_any(), pod))
        .collect();
    let mut check = Check {
        listed: by_name.len(),
        ..Check::default()
    };
    for index in 0..pods {
        let name = pod_name(index);
        let Some(pod) = by_name.get(&name) else {
            check.missing += 1;
            if check.examples.len() < 5 {
                check.examples.push(format!("{name}: not listed"));
            }
            continue;
        };
        check.inspect(&name, pod);
    }
    Ok(check)
}

/// Checks the pods of the Deployment of `--deployment`: `pods` of them, each injected once.
async fn check_deployment_pods(
    client: &Client,
    namespace: &str,
    pods: usize,
) -> BenchResult<Check> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = ListParams::default().labels(&format!("app={DEPLOYMENT}"));
    let listed = api.list(&selector).await?.items;
    let mut check = Check {
        listed: listed.len(),
        missing: pods.saturating_sub(listed.len()),
        ..Check::default()
    };
    for pod in &listed {
        check.inspect(&pod.name_any(), pod);
    }
    Ok(check)
}

impl Check {
    /// Adds `pod` to the counts of pods not injected, injected twice and with native sidecars
    /// that it belongs to.
    fn inspect(&mut self, name: &str, pod: &Pod) {
        let sidecars = sidecar_count(pod);
        let label = pod.labels().get(INJECTION_LABEL).map(String::as_str);
        if sidecars == 0 || label != Some("injected") {
            self.not_injected += 1;
            if self.examples.len() < 5 {
                self.examples
                    .push(format!("{name}: {sidecars} sidecars, label {label:?}"));
            }
        }
        if sidecars > 1 {
            self.injected_twice += 1;
            if self.examples.len() < 5 {
                self.examples.push(format!("{name}: {sidecars} sidecars"));
            }
        }
        let native = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.init_containers.as_ref())
            .is_some_and(|init| {
                init.iter().any(|c| {
                    c.name == SIDECAR_NAME && c.restart_policy.as_deref() == Some("Always")
                })
            });
        if native {
            self.native += 1;
        }
    }
}

// --- the API server's trace spans ------------------------------------------------------------

/// Exact durations of kube-apiserver's spans "Call mutating webhook" of this webhook for pod
/// creates, read from the file that `scripts/bench-webhook.d/otlp-sink` writes. The span starts
/// in `callAttrMutatingHook` (k8s.io/apiserver v0.37.2) after the review objects are built, and
/// ends when the patch is applied. The API server's histogram also counts the building of the
/// review objects, which the span leaves out.
#[derive(Debug, Default)]
struct Spans {
    /// Span start to end, sorted.
    total: Vec<Duration>,
    /// Span start to its event "Request completed" (the review encoded and sent over HTTPS,
    /// the webhook's response received and decoded), sorted.
    round_trip: Vec<Duration>,
}

impl Spans {
    /// Reads the spans of this webhook for CREATE that started at or after `since`.
    fn read(path: &Path, since: SystemTime) -> BenchResult<Self> {
        let since = since.duration_since(UNIX_EPOCH)?.as_nanos();
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read the span file {}: {error}", path.display()))?;
        let mut spans = Spans::default();
        for (number, line) in text.split_inclusive('\n').enumerate() {
            // The receiver may be writing a batch during this read, so a last line without its
            // newline is incomplete. The next read gets it whole.
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            let fields: Vec<&str> = line.split('\t').collect();
            let [start, end, completed, webhook, operation] = fields[..] else {
                return Err(format!(
                    "{}:{}: expected 5 tab-separated fields, found {:?}",
                    path.display(),
                    number + 1,
                    line
                )
                .into());
            };
            if webhook != WEBHOOK_NAME || operation != "CREATE" {
                continue;
            }
            let nanos = |field: &str| {
                field.parse::<u128>().map_err(|_| {
                    format!(
                        "{}:{}: {field:?} is not a time in nanoseconds",
                        path.display(),
                        number + 1
                    )
                })
            };
            let (start, end, completed) = (nanos(start)?, nanos(end)?, nanos(completed)?);
            if start < since {
                continue;
            }
            let between = |from: u128, to: u128| {
                Duration::from_nanos(u64::try_from(to.saturating_sub(from)).unwrap_or(u64::MAX))
            };
            spans.total.push(between(start, end));
            if completed != 0 {
                spans.round_trip.push(between(start, completed));
            }
        }
        spans.total.sort();
        spans.round_trip.sort();
        Ok(spans)
    }

    /// Waits until the file contains `expected` spans since `since`, or 20 s have passed: the API
    /// server's exporter sends a batch every 5 s, or sooner when 512 spans are queued.
    async fn wait_for(path: &Path, since: SystemTime, expected: usize) -> BenchResult<Self> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = Spans::read(path, since)?;
            if spans.total.len() >= expected || Instant::now() >= deadline {
                if spans.total.len() < expected {
                    eprintln!(
                        "warning: {} of {expected} webhook spans arrived in {}; the API \
                         server's exporter may have dropped the rest",
                        spans.total.len(),
                        path.display()
                    );
                }
                return Ok(spans);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn summary(sorted: &[Duration]) -> String {
        if sorted.is_empty() {
            return "–".into();
        }
        let mean = sorted.iter().sum::<Duration>().as_secs_f64() / sorted.len() as f64;
        format!(
            "{} / {} / {} / {}",
            format_ms(mean),
            format_ms(nearest_rank(sorted, 0.50).as_secs_f64()),
            format_ms(nearest_rank(sorted, 0.99).as_secs_f64()),
            format_ms(sorted.last().copied().unwrap_or_default().as_secs_f64())
        )
    }
}

// --- the report ---------------------------------------------------------------------------

struct Report {
    command: String,
    machine: String,
    server_version: String,
    options_pods: usize,
    concurrency: usize,
    deployment: bool,
    pause: Option<Duration>,
    load_before: String,
    load_after: String,
    baseline: Option<Burst>,
    burst: Burst,
    operator: HistogramDelta,
    outcomes: BTreeMap<String, f64>,
    connections: BTreeMap<String, f64>,
    handshakes: HistogramDelta,
    apiserver: HistogramDelta,
    apiserver_calls: BTreeMap<String, f64>,
    fail_open: f64,
    spans: Option<Spans>,
    check: Check,
}

impl Report {
    fn print(&self) {
        let burst = &self.burst;
        let operator_p99 = self.operator.quantile_bucket(0.99);
        let apiserver_p99 = self.apiserver.quantile_bucket(0.99);
        let mut rows: Vec<(String, String)> = vec![
            (
                "pods created (errors)".into(),
                format!("{} ({})", burst.created, burst.errors.len()),
            ),
            (
                "requests in flight (max)".into(),
                if self.deployment {
                    format!(
                        "set by kube-controller-manager (one Deployment of {} replicas)",
                        self.options_pods
                    )
                } else if let Some(pause) = self.pause {
                    format!(
                        "1, with a pause of {} s before each create",
                        pause.as_secs()
                    )
                } else {
                    self.concurrency.to_string()
                },
            ),
            (
                "burst wall time".into(),
                format!("{:.2} s", burst.wall.as_secs_f64()),
            ),
            (
                "pods per second".into(),
                format!("{:.0}", burst.pods_per_second()),
            ),
            (
                "client create latency p50 / p99 / max (exact)".into(),
                burst.summary(),
            ),
        ];
        if let Some(baseline) = &self.baseline {
            rows.push((
                "baseline without the webhook: create latency p50 / p99 / max, pods/s".into(),
                format!(
                    "{}, {:.0} pods/s ({} errors)",
                    baseline.summary(),
                    baseline.pods_per_second(),
                    baseline.errors.len()
                ),
            ));
        }
        rows.extend([
            (
                "webhook handling time, operator histogram: reviews".into(),
                format!("{:.0}", self.operator.count),
            ),
            (
                "webhook handling time: mean (exact, `_sum`/`_count`)".into(),
                self.operator.mean().map_or("–".into(), format_ms),
            ),
            (
                "webhook handling time: p50 (bucket upper bound)".into(),
                format_bucket(self.operator.quantile_bucket(0.50)),
            ),
            (
                "webhook handling time: p99 (bucket upper bound)".into(),
                format_bucket(operator_p99),
            ),
            (
                "webhook reviews by outcome".into(),
                format_counts(&self.outcomes),
            ),
            (
                "webhook's TCP connections by TLS handshake result".into(),
                format_counts(&self.connections),
            ),
            (
                "webhook's TLS handshake time: mean (exact)".into(),
                self.handshakes.mean().map_or("–".into(), format_ms),
            ),
            (
                format!("API server's webhook admission duration ({WEBHOOK_NAME}): calls"),
                format!("{:.0}", self.apiserver.count),
            ),
            (
                "API server's view: mean (exact, `_sum`/`_count`)".into(),
                self.apiserver.mean().map_or("–".into(), format_ms),
            ),
            (
                "API server's view: p50 (bucket upper bound)".into(),
                format_bucket(self.apiserver.quantile_bucket(0.50)),
            ),
            (
                "API server's view: p99 (bucket upper bound)".into(),
                format_bucket(apiserver_p99),
            ),
        ]);
        if let Some(spans) = &self.spans {
            let p99 = nearest_rank(&spans.total, 0.99).as_secs_f64();
            rows.extend([
                (
                    "API server's span of each call (tracing): spans".into(),
                    spans.total.len().to_string(),
                ),
                (
                    "API server's span: mean / p50 / p99 / max (exact)".into(),
                    Spans::summary(&spans.total),
                ),
                (
                    "API server's span up to \"Request completed\": mean / p50 / p99 / max (exact)"
                        .into(),
                    Spans::summary(&spans.round_trip),
                ),
                (
                    format!(
                        "target p99 ≤ {} (API server's span, exact)",
                        format_ms(TARGET_P99_SECONDS)
                    ),
                    if spans.total.is_empty() {
                        "no spans"
                    } else if p99 <= TARGET_P99_SECONDS {
                        "met"
                    } else {
                        "missed"
                    }
                    .into(),
                ),
            ]);
        }
        rows.extend([
            (
                "API server's webhook requests by code".into(),
                format_counts(&self.apiserver_calls),
            ),
            (
                "API server's fail-open count (webhook errors ignored)".into(),
                format!("{:.0}", self.fail_open),
            ),
            (
                "pods listed / expected".into(),
                format!("{} / {}", self.check.listed, self.options_pods),
            ),
            (
                "pods lost (missing / not injected)".into(),
                format!(
                    "{} ({} / {})",
                    self.check.missing + self.check.not_injected,
                    self.check.missing,
                    self.check.not_injected
                ),
            ),
            (
                "pods injected more than once".into(),
                self.check.injected_twice.to_string(),
            ),
            (
                "native sidecars (init container, restartPolicy Always)".into(),
                self.check.native.to_string(),
            ),
            (
                format!(
                    "target p99 ≤ {} (webhook handling time)",
                    format_ms(TARGET_P99_SECONDS)
                ),
                verdict(operator_p99).into(),
            ),
            (
                format!(
                    "target p99 ≤ {} (API server's view)",
                    format_ms(TARGET_P99_SECONDS)
                ),
                verdict(apiserver_p99).into(),
            ),
            ("Kubernetes API server".into(), self.server_version.clone()),
            ("machine".into(), self.machine.clone()),
            (
                "load average (1, 5, 15 min) before / after".into(),
                format!("{} / {}", self.load_before, self.load_after),
            ),
            ("command".into(), format!("`{}`", self.command)),
        ]);
        println!("| figure | value |");
        println!("|---|---|");
        for (name, value) in rows {
            println!("| {name} | {value} |");
        }
        for error in burst.errors.iter().take(5) {
            println!("\ncreate failed: {error}");
        }
        for example in &self.check.examples {
            println!("\nwrong pod: {example}");
        }
    }

    fn passed(&self) -> bool {
        self.burst.errors.is_empty()
            && self.check.missing == 0
            && self.check.not_injected == 0
            && self.check.injected_twice == 0
    }
}

fn format_counts(counts: &BTreeMap<String, f64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(key, count)| format!("{key} {count:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deltas of the counter `name` between two scrapes, by the value of `label`, for the series
/// that pass `select`. Zero deltas are left out.
fn counter_deltas(
    before: &Scrape,
    after: &Scrape,
    name: &str,
    label: &str,
    select: impl Fn(&BTreeMap<String, String>) -> bool + Copy,
) -> BTreeMap<String, f64> {
    let mut deltas = BTreeMap::new();
    for (labels, _) in after.0.get(name).into_iter().flatten() {
        if !select(labels) {
            continue;
        }
        let Some(key) = labels.get(label) else {
            continue;
        };
        let with_key = |l: &BTreeMap<String, String>| select(l) && l.get(label) == Some(key);
        let delta = after.sum(name, with_key) - before.sum(name, with_key);
        if delta != 0.0 {
            deltas.insert(key.clone(), delta);
        }
    }
    deltas
}

fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown memory".to_string(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        );
    format!("{cores} cores ({model}), {memory}")
}

/// Reads the 1, 5 and 15 minute load averages from `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

// --- main ---------------------------------------------------------------------------------

async fn measure(setup: &Setup, load: &Client, options: &Options) -> BenchResult<Report> {
    setup.probe(options.ready_timeout).await?;
    let load_before = load_average();

    let baseline = if options.baseline && !options.deployment {
        let namespace = format!("{}-baseline", setup.namespace);
        create_namespace(load, &namespace).await?;
        eprintln!(
            "baseline: creating {} pods in {namespace}, which the webhook does not select",
            options.pods
        );
        let baseline = burst(load, &namespace, options.pods, options.concurrency, None).await;
        delete_namespace(load, &namespace).await;
        // The namespace controller deletes the pods, and waiting keeps that work out of the burst.
        let namespaces: Api<Namespace> = Api::all(load.clone());
        eventually(
            "the baseline namespace to be deleted",
            Duration::from_secs(300),
            || async { matches!(namespaces.get_opt(&namespace).await, Ok(None)).then_some(()) },
        )
        .await?;
        Some(baseline)
    } else {
        None
    };

    let operator_before = setup.scrape_operator().await?;
    let apiserver_before = scrape_apiserver(load).await?;
    let burst_started = SystemTime::now();
    let burst = if options.deployment {
        eprintln!(
            "burst: applying a Deployment of {} replicas in {}",
            options.pods, setup.namespace
        );
        // The controller manager's client is rate limited (20 requests/s by default), so a
        // generous bound: 2 s per pod.
        let timeout = Duration::from_secs(2 * options.pods as u64);
        deployment_burst(load, &setup.namespace, options.pods, timeout).await?
    } else {
        eprintln!(
            "burst: creating {} pods in {}, at most {} in flight",
            options.pods, setup.namespace, options.concurrency
        );
        burst(
            load,
            &setup.namespace,
            options.pods,
            options.concurrency,
            options.pause,
        )
        .await
    };
    let operator_after = setup.scrape_operator().await?;
    let apiserver_after = scrape_apiserver(load).await?;
    let load_after = load_average();

    let everything = |_: &BTreeMap<String, String>| true;
    let this_webhook = |labels: &BTreeMap<String, String>| {
        labels.get("name").map(String::as_str) == Some(WEBHOOK_NAME)
    };
    let check = if options.deployment {
        check_deployment_pods(load, &setup.namespace, options.pods).await?
    } else {
        check_pods(load, &setup.namespace, options.pods).await?
    };
    let apiserver = HistogramDelta::between(
        &apiserver_before,
        &apiserver_after,
        "apiserver_admission_webhook_admission_duration_seconds",
        this_webhook,
    );
    let spans = match &options.apiserver_spans {
        Some(path) => {
            let expected = apiserver.count.round() as usize;
            Some(Spans::wait_for(path, burst_started, expected).await?)
        }
        None => None,
    };
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine_description(),
        server_version: load.apiserver_version().await?.git_version,
        options_pods: options.pods,
        concurrency: options.concurrency,
        deployment: options.deployment,
        pause: options.pause,
        load_before,
        load_after,
        baseline,
        burst,
        operator: HistogramDelta::between(
            &operator_before,
            &operator_after,
            "llmroute_operator_webhook_duration_seconds",
            everything,
        ),
        outcomes: counter_deltas(
            &operator_before,
            &operator_after,
            "llmroute_operator_webhook_reviews_total",
            "outcome",
            everything,
        ),
        connections: counter_deltas(
            &operator_before,
            &operator_after,
            "llmroute_operator_webhook_connections_total",
            "result",
            everything,
        ),
        handshakes: HistogramDelta::between(
            &operator_before,
            &operator_after,
            "llmroute_operator_webhook_tls_handshake_seconds",
            everything,
        ),
        apiserver,
        apiserver_calls: counter_deltas(
            &apiserver_before,
            &apiserver_after,
            "apiserver_admission_webhook_request_total",
            "code",
            this_webhook,
        ),
        fail_open: apiserver_after.sum("apiserver_admission_webhook_fail_open_count", this_webhook)
            - apiserver_before.sum("apiserver_admission_webhook_fail_open_count", this_webhook),
        spans,
        check,
    })
}

async fn run(options: Options) -> BenchResult<bool> {
    init_logging(options.operator_log.as_ref())?;
    // Set-up and the load have their own clients, and the operator makes a third on its own
    // runtime, so that none waits for another's connections.
    let setup_client = client().await?;
    let load = client().await?;
    let namespace = format!("webhook-bench-{}", std::process::id());
    eprintln!("starting the operator with its webhook for namespace {namespace}");
    let setup = Setup::start(setup_client, namespace.clone(), &options).await;
    let setup = match setup {
        Ok(setup) => setup,
        Err(error) => {
            delete_namespace(&load, &namespace).await;
            return Err(error);
        }
    };
    let report = measure(&setup, &load, &options).await;
    eprintln!("stopping the operator and deleting the namespace {namespace}");
    setup.finish().await;
    let report = report?;
    report.print();
    Ok(report.passed())
}

fn main() -> std::process::ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the Tokio runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: pods were lost or injected more than once; see the table");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
