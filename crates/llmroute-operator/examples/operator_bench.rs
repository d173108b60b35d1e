//! Benchmark of `llmroute operator` against a real Kubernetes API server.
//!
//! Usage: `operator_bench LLMROUTE_BINARY [--routes N] [--changes M] [--ready-timeout-seconds S]
//! [--operator-log PATH] [--server-pid NAME=PID]...`, with `LLMROUTE_TEST_KUBECONFIG` naming
//! the cluster's kubeconfig. `scripts/k8s-testenv start DIR` writes one, and
//! `scripts/bench-operator` runs all of it.
//!
//! It applies the CRDs, creates a fresh namespace and starts `LLMROUTE_BINARY operator` as a
//! child process on free ports of 127.0.0.1, scoped to that namespace. Then it measures:
//!
//! - (a) N routes created at once (every create request in flight together) until each has
//!   `Ready=True` for its current generation, found by listing the routes every 100 ms, with
//!   the operator's RSS and CPU time from `/proc/PID/status` and `/proc/PID/stat`;
//! - (b) M route changes, one at a time. A sidecar-style long-poll of the control API waits
//!   on the route's current configuration version, and then the route's `defaultPreference`
//!   is patched. The figure is the time from sending the patch to the long-poll's response
//!   with the new configuration.
//!
//! It also reports the CPU time of each `--server-pid` process (the API server and etcd, when
//! they run on the same machine) and the API server's wait for a fresh watch cache on LISTs of
//! LLMPolicies (`apiserver_watch_cache_read_wait_seconds`). It prints every figure as a
//! Markdown table, deletes the routes, stops the operator with SIGTERM and deletes the
//! namespace. The operator's log goes to `--operator-log` (default: a temporary file, deleted
//! at the end), and its WARN and ERROR lines are repeated after the table.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use llmroute_api::SidecarConfig;
use llmroute_api::crd::{ConditionStatus, LlmRoute};
use serde_json::json;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Any 64-hex digest: the benchmark's routes use the pricing prior, which records the digest
/// without reading an encoder.
const ENCODER_DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Interval of the readiness list in (a), so also the resolution of the per-route times.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// `waitSeconds` of each long-poll in (b).
const LONG_POLL_SECONDS: u64 = 30;
/// Maximum time for the operator to be ready and to lead, and for the CRDs to be established.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum time for the operator to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Maximum duration of one GET that does not long-poll.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time for the deleted routes to be gone (the operator's finalizer cleans up first).
const DELETE_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum duration of all the changes of (b).
const CHANGES_TIMEOUT: Duration = Duration::from_secs(600);
/// Targets of the benchmark.
const READY_TARGET: Duration = Duration::from_secs(30);
const PROPAGATION_P99_TARGET: Duration = Duration::from_secs(2);

const USAGE: &str = "usage: operator_bench LLMROUTE_BINARY [--routes N (default 100)] \
[--changes M (default 100)] [--ready-timeout-seconds S (default 120)] [--operator-log PATH] \
[--server-pid NAME=PID (repeatable; CPU time of a server process, such as kube-apiserver)]; \
LLMROUTE_TEST_KUBECONFIG must name the cluster's kubeconfig";

#[derive(Debug)]
struct Options {
    binary: PathBuf,
    kubeconfig: PathBuf,
    routes: usize,
    changes: usize,
    ready_timeout: Duration,
    operator_log: Option<PathBuf>,
    /// Server processes whose CPU time is reported, by name.
    servers: Vec<(String, u32)>,
}

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut binary = None;
    let mut routes = 100;
    let mut changes = 100;
    let mut ready_timeout = Duration::from_secs(120);
    let mut operator_log = None;
    let mut servers = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("missing value of {name}; {USAGE}"))
        };
        match arg.as_str() {
            "--routes" => routes = parse_count("--routes", &value("--routes")?)?,
            "--changes" => changes = parse_count("--changes", &value("--changes")?)?,
            "--ready-timeout-seconds" => {
                let text = value("--ready-timeout-seconds")?;
                let seconds = parse_count("--ready-timeout-seconds", &text)?;
                ready_timeout = Duration::from_secs(seconds as u64);
            }
            "--operator-log" => operator_log = Some(PathBuf::from(value("--operator-log")?)),
            "--server-pid" => servers.push(parse_server_pid(&value("--server-pid")?)?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other if other.starts_with('-') => {
                return Err(format!("unknown option {other:?}; {USAGE}"));
            }
            other => {
                if binary.replace(PathBuf::from(other)).is_some() {
                    return Err(format!("unexpected argument {other:?}; {USAGE}"));
                }
            }
        }
    }

    let binary = binary.ok_or_else(|| format!("missing LLMROUTE_BINARY; {USAGE}"))?;
    if !binary.is_file() {
        return Err(format!(
            "{} is not a file; build it with `cargo build --release -p llmroute`",
            binary.display()
        ));
    }
    let kubeconfig = std::env::var_os("LLMROUTE_TEST_KUBECONFIG").ok_or_else(|| {
        "LLMROUTE_TEST_KUBECONFIG is not set: run `scripts/k8s-testenv start DIR` and `source DIR/env`"
            .to_string()
    })?;
    Ok(Options {
        binary,
        kubeconfig: PathBuf::from(kubeconfig),
        routes,
        changes,
        ready_timeout,
        operator_log,
        servers,
    })
}

fn parse_server_pid(text: &str) -> Result<(String, u32), String> {
    let invalid =
        || format!("invalid --server-pid {text:?}: expected NAME=PID, such as kube-apiserver=1234");
    let (name, pid) = text.split_once('=').ok_or_else(invalid)?;
    let pid = pid.parse().map_err(|_| invalid())?;
    if name.is_empty() || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!("{}; no process {pid} is running", invalid()));
    }
    Ok((name.to_string(), pid))
}

fn parse_count(name: &str, text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(value) if value > 0 => Ok(value),
        _ => Err(format!(
            "invalid {name} {text:?}: expected a positive whole number"
        )),
    }
}

// --- the machine and the operator process ----------------------------------------------------

/// Resident memory and CPU time of a process, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
struct ProcessSample {
    rss_kib: u64,
    /// Peak resident set size so far (`VmHWM`).
    peak_rss_kib: u64,
    /// User plus system CPU time.
    cpu_seconds: f64,
}

fn sample_process(pid: u32, clock_ticks: f64) -> BenchResult<ProcessSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field_kib = |name: &str| -> BenchResult<u64> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .ok_or_else(|| format!("/proc/{pid}/status has no {name} line"))?;
        let value = line.split_whitespace().nth(1).unwrap_or_default();
        Ok(value.parse()?)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces. The
    // first is field 3 (state), so utime (field 14) and stime (field 15) are at 11 and 12.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("invalid /proc/{pid}/stat: {stat:?}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> BenchResult<f64> {
        let value = fields
            .get(index)
            .ok_or_else(|| format!("/proc/{pid}/stat has fewer than {} fields", index + 3))?;
        Ok(value.parse::<u64>()? as f64)
    };
    Ok(ProcessSample {
        rss_kib: field_kib("VmRSS:")?,
        peak_rss_kib: field_kib("VmHWM:")?,
        cpu_seconds: (ticks(11)? + ticks(12)?) / clock_ticks,
    })
}

/// CPU seconds of each server process, in the order of `--server-pid`.
fn sample_servers(options: &Options, clock_ticks: f64) -> BenchResult<Vec<f64>> {
    options
        .servers
        .iter()
        .map(|(_, pid)| Ok(sample_process(*pid, clock_ticks)?.cpu_seconds))
        .collect()
}

/// Clock ticks per second of `/proc/PID/stat` times, from `getconf CLK_TCK`.
fn clock_ticks_per_second() -> BenchResult<f64> {
    let output = Command::new("getconf").arg("CLK_TCK").output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .map_err(|_| format!("`getconf CLK_TCK` printed {text:?} instead of a number").into())
}

fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(
            || "unknown memory".to_string(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        );
    format!("{cores} cores ({model}), {memory_gib}")
}

/// Reads the 1, 5 and 15 minute load averages from `/proc/loadavg`, where `uptime` reads them.
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

fn free_port() -> BenchResult<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `llmroute operator` running as a child process; dropping it stops the process.
struct OperatorProcess {
    child: Child,
    control_url: String,
    ops_url: String,
    log: PathBuf,
}

impl OperatorProcess {
    fn spawn(options: &Options, namespace: &str, data_dir: &Path, log: &Path) -> BenchResult<Self> {
        let control = format!("127.0.0.1:{}", free_port()?);
        let ops = format!("127.0.0.1:{}", free_port()?);
        let log_file = File::create(log)?;
        let child = Command::new(&options.binary)
            .arg("operator")
            .args(["--control-listen", &control, "--ops-listen", &ops])
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--lease-namespace",
                namespace,
                "--watch-namespace",
                namespace,
            ])
            .args(["--encoder-digest", ENCODER_DIGEST, "--identity", "bench"])
            .env("KUBECONFIG", &options.kubeconfig)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("failed to start {}: {e}", options.binary.display()))?;
        Ok(Self {
            child,
            control_url: format!("http://{control}"),
            ops_url: format!("http://{ops}"),
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited, naming its log.
    fn check_running(&mut self) -> BenchResult<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(format!(
                "the operator exited with {status}; see its log {}",
                self.log.display()
            )
            .into()),
        }
    }

    /// Sends SIGTERM with the `kill` command (the standard library sends no other signal than
    /// SIGKILL) and waits up to [`STOP_TIMEOUT`], then sends SIGKILL.
    fn stop(&mut self) -> BenchResult<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !sent.success() {
            return Err(format!("`kill -TERM {pid}` failed with {sent}").into());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        self.child.wait()?;
        Err(format!(
            "the operator (pid {pid}) did not stop within {} s of SIGTERM and was killed",
            STOP_TIMEOUT.as_secs()
        )
        .into())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// --- HTTP and Kubernetes helpers -------------------------------------------------------------

type Http = HttpClient<HttpConnector, Empty<Bytes>>;

/// Sends a GET with a time limit and returns the status and the body.
async fn http_get(http: &Http, url: &str, limit: Duration) -> BenchResult<(u16, Bytes)> {
    let request = async {
        let response = http.get(url.parse()?).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        BenchResult::Ok((status, body))
    };
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| format!("GET {url} timed out after {} s", limit.as_secs()))?
}

/// Calls `check` every 100 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> BenchResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {} s waiting for {what}", limit.as_secs()).into());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn kube_client(kubeconfig: &Path) -> BenchResult<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).map_err(|e| {
        format!(
            "failed to read the kubeconfig {}: {e}",
            kubeconfig.display()
        )
    })?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(30));
    Ok(Client::try_from(config)?)
}

/// Applies the CRDs with server-side apply and waits until they are established.
async fn install_crds(client: &Client) -> BenchResult<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in llmroute_api::crd::definitions() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("llmroute-operator-bench").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        names.push(name);
    }
    for name in names {
        wait_for(
            &format!("CRD {name} to be established"),
            STARTUP_TIMEOUT,
            || async {
                let crd = api.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await?;
    }
    Ok(())
}

fn route_name(index: usize) -> String {
    format!("bench-{index:04}")
}

/// Builds a route with two models on an unreachable endpoint, which the operator never calls.
fn route_manifest(name: &str) -> BenchResult<LlmRoute> {
    let manifest = json!({
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": name},
        "spec": {
            "models": [
                {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "small-1",
                 "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
                {"name": "large", "endpoint": "http://127.0.0.1:9/v1", "model": "large-1",
                 "pricing": {"inputUsdPerMillionTokens": 2.5, "outputUsdPerMillionTokens": 10}}
            ],
            "defaultPreference": {"quality": 0.7, "cost": 0.3},
            "fallback": "small",
        },
    });
    Ok(serde_json::from_value(manifest)?)
}

/// Returns whether the route's `Ready` condition is `True` for its current generation.
fn is_ready(route: &LlmRoute) -> bool {
    let Some(status) = &route.status else {
        return false;
    };
    status.observed_generation.is_some()
        && status.observed_generation == route.metadata.generation
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
}

/// Reads the value of the sample whose name and labels are exactly `name` from a Prometheus
/// text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Reconcile counters of the operator's `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct ReconcileTotals {
    ok: f64,
    errors: f64,
    seconds: f64,
}

async fn reconcile_totals(http: &Http, ops_url: &str) -> BenchResult<ReconcileTotals> {
    let (status, body) = http_get(http, &format!("{ops_url}/metrics"), REQUEST_TIMEOUT).await?;
    if status != 200 {
        return Err(format!("GET {ops_url}/metrics returned {status}").into());
    }
    let text = String::from_utf8_lossy(&body);
    Ok(ReconcileTotals {
        ok: metric(&text, "llmroute_operator_reconciles_total{result=\"ok\"}").unwrap_or(0.0),
        errors: metric(
            &text,
            "llmroute_operator_reconciles_total{result=\"error\"}",
        )
        .unwrap_or(0.0),
        seconds: metric(&text, "llmroute_operator_reconcile_duration_seconds_sum").unwrap_or(0.0),
    })
}

/// Total seconds and count of the API server's waits for a fresh watch cache before a LIST of
/// LLMPolicies, or `None` when the server exports no such histogram. The operator lists a
/// route's LLMPolicies in every reconcile, and the benchmark itself lists only LLMRoutes.
///
/// Kubernetes v1.37.2, the release of `scripts/k8s-testenv`, serves a LIST without a
/// resourceVersion from the watch cache once it has caught up with etcd, and this histogram
/// times that wait.
async fn watch_cache_wait(client: &Client) -> BenchResult<Option<(f64, f64)>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    // The histogram has no LLMPolicy series before the first such LIST, which counts as zero.
    if !text.contains("# TYPE apiserver_watch_cache_read_wait_seconds histogram") {
        return Ok(None);
    }
    let mut total = (0.0, 0.0);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_watch_cache_read_wait_seconds_") else {
            continue;
        };
        if !rest.contains("group=\"llmroute.dev\",resource=\"llmpolicies\"") {
            continue;
        }
        let value: f64 = match line.rsplit_once(' ').map(|(_, value)| value.parse()) {
            Some(Ok(value)) => value,
            _ => continue,
        };
        if rest.starts_with("sum{") {
            total.0 += value;
        } else if rest.starts_with("count{") {
            total.1 += value;
        }
    }
    Ok(Some(total))
}

/// Resource use of one phase: CPU seconds of the server processes and the API server's watch
/// cache waits, each as the difference between the phase's end and start.
#[derive(Debug, Default, Clone)]
struct ServerUse {
    cpu_seconds: Vec<f64>,
    watch_cache_wait: Option<(f64, f64)>,
}

struct ServerSample {
    cpu_seconds: Vec<f64>,
    watch_cache_wait: Option<(f64, f64)>,
}

async fn sample_server_use(
    client: &Client,
    options: &Options,
    clock_ticks: f64,
) -> BenchResult<ServerSample> {
    Ok(ServerSample {
        cpu_seconds: sample_servers(options, clock_ticks)?,
        watch_cache_wait: watch_cache_wait(client).await?,
    })
}

fn server_use(before: &ServerSample, after: &ServerSample) -> ServerUse {
    let cpu_seconds = before
        .cpu_seconds
        .iter()
        .zip(&after.cpu_seconds)
        .map(|(start, end)| end - start)
        .collect();
    let watch_cache_wait = match (before.watch_cache_wait, after.watch_cache_wait) {
        (Some((sum0, count0)), Some((sum1, count1))) => Some((sum1 - sum0, count1 - count0)),
        _ => None,
    };
    ServerUse {
        cpu_seconds,
        watch_cache_wait,
    }
}

/// Nearest-rank percentile of ascending `sorted`, which must not be empty.
fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let rank = (fraction * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn seconds(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

// --- the measurements ------------------------------------------------------------------------

/// Figures of (a): creating routes at once until every one is ready.
struct CreateFigures {
    created: usize,
    create_errors: Vec<String>,
    all_created_after: Duration,
    /// Time from the first create to each route's first list that shows it ready, ascending.
    ready_after: Vec<Duration>,
    /// Time until every route was ready, when all were within the timeout.
    all_ready_after: Option<Duration>,
    before: ProcessSample,
    after: ProcessSample,
    reconciles: (ReconcileTotals, ReconcileTotals),
}

async fn measure_creation(
    routes: &Api<LlmRoute>,
    operator: &mut OperatorProcess,
    http: &Http,
    options: &Options,
    clock_ticks: f64,
) -> BenchResult<CreateFigures> {
    let manifests: Vec<LlmRoute> = (0..options.routes)
        .map(|index| route_manifest(&route_name(index)))
        .collect::<BenchResult<_>>()?;
    let reconciles_before = reconcile_totals(http, &operator.ops_url).await?;
    let before = sample_process(operator.pid(), clock_ticks)?;

    // Every create request is in flight before the first response is awaited.
    let params = PostParams::default();
    let started = Instant::now();
    let creates = manifests.iter().map(|route| routes.create(&params, route));
    let results = join_all(creates).await;
    let all_created_after = started.elapsed();
    let create_errors: Vec<String> = results
        .iter()
        .filter_map(|result| result.as_ref().err().map(ToString::to_string))
        .collect();
    let created = results.len() - create_errors.len();

    let mut ready_after = Vec::new();
    let mut ready_names = std::collections::HashSet::new();
    let deadline = started + options.ready_timeout;
    while ready_names.len() < created && Instant::now() < deadline {
        operator.check_running()?;
        let listed = routes.list(&ListParams::default()).await?;
        let elapsed = started.elapsed();
        for route in listed.items.iter().filter(|route| is_ready(route)) {
            if ready_names.insert(route.name_any()) {
                ready_after.push(elapsed);
            }
        }
        if ready_names.len() < created {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    let all_ready_after = (created == options.routes && ready_names.len() == created)
        .then(|| ready_after.last().copied())
        .flatten();
    let after = sample_process(operator.pid(), clock_ticks)?;
    let reconciles_after = reconcile_totals(http, &operator.ops_url).await?;
    ready_after.sort();
    Ok(CreateFigures {
        created,
        create_errors,
        all_created_after,
        ready_after,
        all_ready_after,
        before,
        after,
        reconciles: (reconciles_before, reconciles_after),
    })
}

/// Figures of (b): route changes until a long-polling sidecar has them.
struct ChangeFigures {
    /// Time from sending the patch to the long-poll's response, ascending.
    propagation: Vec<Duration>,
    /// Duration of the patch requests themselves, ascending.
    patch_requests: Vec<Duration>,
    failures: Vec<String>,
    before: ProcessSample,
    after: ProcessSample,
}

/// Returns the version of the configuration the control API serves for `key`.
async fn served_version(http: &Http, control_url: &str, key: &str) -> BenchResult<u64> {
    let url = format!("{control_url}/v1/routes/{key}/config?version=0&waitSeconds=5");
    let (status, body) = http_get(http, &url, REQUEST_TIMEOUT).await?;
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        return Err(format!("GET {url} returned {status}: {text}").into());
    }
    Ok(serde_json::from_slice::<SidecarConfig>(&body)?.version)
}

/// Changes route `name` to `quality` while a long-poll waits on its current configuration,
/// and returns the propagation time and the patch request's duration.
async fn change_once(
    routes: &Api<LlmRoute>,
    http: &Http,
    control_url: &str,
    key: &str,
    name: &str,
    quality: f64,
) -> BenchResult<(Duration, Duration)> {
    let version = served_version(http, control_url, key).await?;
    let url = format!(
        "{control_url}/v1/routes/{key}/config?version={version}&waitSeconds={LONG_POLL_SECONDS}"
    );
    let poll = {
        let http = http.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let limit = Duration::from_secs(LONG_POLL_SECONDS + 10);
            let response = http_get(&http, &url, limit).await;
            (response, Instant::now())
        })
    };
    // Lets the long-poll reach the server first, as a sidecar's would. The clock starts at
    // the patch, so this pause is not measured.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let patch = json!({"spec": {"defaultPreference": {"quality": quality, "cost": 1.0 - quality}}});
    let sent = Instant::now();
    routes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let patch_request = sent.elapsed();

    let (response, answered) = poll.await?;
    let (status, body) = response?;
    if status != 200 {
        return Err(
            format!("the long-poll {url} returned {status} instead of a new version").into(),
        );
    }
    let config: SidecarConfig = serde_json::from_slice(&body)?;
    if config.version <= version || (config.default_preference.quality - quality).abs() > 1e-9 {
        return Err(format!(
            "the long-poll {url} returned version {} with quality {} instead of quality {quality}",
            config.version, config.default_preference.quality
        )
        .into());
    }
    let Some(propagation) = answered.checked_duration_since(sent) else {
        return Err(format!("the long-poll {url} returned before the patch was sent").into());
    };
    Ok((propagation, patch_request))
}

async fn measure_changes(
    routes: &Api<LlmRoute>,
    names: &[String],
    operator: &mut OperatorProcess,
    http: &Http,
    options: &Options,
    clock_ticks: f64,
) -> BenchResult<ChangeFigures> {
    let namespace = routes.namespace().unwrap_or_default();
    let before = sample_process(operator.pid(), clock_ticks)?;
    let mut propagation = Vec::new();
    let mut patch_requests = Vec::new();
    let mut failures = Vec::new();
    // Every route starts at quality 0.7, and each change flips the route to the other value.
    let mut qualities = vec![0.7; names.len()];
    let deadline = Instant::now() + CHANGES_TIMEOUT;
    for change in 0..options.changes {
        if Instant::now() >= deadline {
            failures.push(format!(
                "stopped after {change} changes: (b) took more than {} s",
                CHANGES_TIMEOUT.as_secs()
            ));
            break;
        }
        operator.check_running()?;
        let index = change % names.len();
        let quality = if qualities[index] > 0.5 { 0.3 } else { 0.7 };
        let key = format!("{namespace}/{}", names[index]);
        let url = &operator.control_url;
        match change_once(routes, http, url, &key, &names[index], quality).await {
            Ok((elapsed, patch_request)) => {
                qualities[index] = quality;
                propagation.push(elapsed);
                patch_requests.push(patch_request);
            }
            Err(error) => failures.push(format!("change {change} of {key}: {error}")),
        }
    }
    let after = sample_process(operator.pid(), clock_ticks)?;
    propagation.sort();
    patch_requests.sort();
    Ok(ChangeFigures {
        propagation,
        patch_requests,
        failures,
        before,
        after,
    })
}

// --- the report ------------------------------------------------------------------------------

struct Report {
    command: String,
    machine: String,
    load_before: String,
    load_after: String,
    server_version: String,
    started_to_ready: Duration,
    started_to_leader: Duration,
    idle: ProcessSample,
    creation: CreateFigures,
    creation_servers: ServerUse,
    changes: Option<ChangeFigures>,
    changes_servers: Option<ServerUse>,
    deletion: Option<Duration>,
    final_sample: ProcessSample,
}

fn render(report: &Report, options: &Options) -> String {
    let mut table = String::new();
    let mut row = |figure: &str, value: String| {
        let _ = writeln!(table, "| {figure} | {value} |");
    };
    row("command", format!("`{}`", report.command));
    row("machine", report.machine.clone());
    row(
        "load average (1, 5, 15 min) before / after",
        format!("{} / {}", report.load_before, report.load_after),
    );
    row("Kubernetes API server", report.server_version.clone());
    row(
        "operator start to /readyz 200; to leader",
        format!(
            "{} s; {} s",
            seconds(report.started_to_ready),
            seconds(report.started_to_leader)
        ),
    );
    row(
        "operator RSS when leading, before (a)",
        format!("{} MiB", mib(report.idle.rss_kib)),
    );

    let creation = &report.creation;
    row(
        "(a) routes created at once (failed creates)",
        format!("{} ({})", options.routes, options.routes - creation.created),
    );
    row(
        "(a) all create requests answered after",
        format!("{} s", seconds(creation.all_created_after)),
    );
    let all_ready = match creation.all_ready_after {
        Some(after) => format!(
            "{} s: target {} s {}",
            seconds(after),
            READY_TARGET.as_secs(),
            verdict(after <= READY_TARGET)
        ),
        None => format!(
            "not reached: {} of {} ready after {} s: target {} s MISSED",
            creation.ready_after.len(),
            options.routes,
            options.ready_timeout.as_secs(),
            READY_TARGET.as_secs()
        ),
    };
    row(
        "(a) first create to every route Ready=True for its generation",
        all_ready,
    );
    if !creation.ready_after.is_empty() {
        let sorted = &creation.ready_after;
        row(
            "(a) per-route time to Ready p50 / p90 / p99 / max (100 ms list interval)",
            format!(
                "{} / {} / {} / {} s",
                seconds(percentile(sorted, 0.5)),
                seconds(percentile(sorted, 0.9)),
                seconds(percentile(sorted, 0.99)),
                seconds(sorted[sorted.len() - 1])
            ),
        );
    }
    let (before, after) = creation.reconciles;
    let reconciles = (after.ok + after.errors) - (before.ok + before.errors);
    let mean_ms = if reconciles > 0.0 {
        (after.seconds - before.seconds) / reconciles * 1e3
    } else {
        f64::NAN
    };
    row(
        "(a) reconciles (failed); mean reconcile duration",
        format!(
            "{reconciles:.0} ({:.0}); {mean_ms:.1} ms",
            after.errors - before.errors
        ),
    );
    let phase = creation
        .all_ready_after
        .unwrap_or(options.ready_timeout)
        .as_secs_f64();
    let cpu = creation.after.cpu_seconds - creation.before.cpu_seconds;
    row(
        "(a) operator CPU time (user + system); share of one core over the phase",
        format!("{cpu:.2} s; {:.0} %", cpu / phase * 100.0),
    );
    row(
        "(a) operator RSS before / after; peak (VmHWM)",
        format!(
            "{} / {} MiB; {} MiB",
            mib(creation.before.rss_kib),
            mib(creation.after.rss_kib),
            mib(creation.after.peak_rss_kib)
        ),
    );
    render_server_use("(a)", &report.creation_servers, options, &mut row);

    match &report.changes {
        Some(changes) if !changes.propagation.is_empty() => {
            let sorted = &changes.propagation;
            let p99 = percentile(sorted, 0.99);
            row(
                "(b) changes measured (failed)",
                format!("{} ({})", sorted.len(), changes.failures.len()),
            );
            row(
                "(b) patch sent to long-poll answered p50 / p90 / p99 / max",
                format!(
                    "{} / {} / {} / {} s",
                    seconds(percentile(sorted, 0.5)),
                    seconds(percentile(sorted, 0.9)),
                    seconds(p99),
                    seconds(sorted[sorted.len() - 1])
                ),
            );
            let target_met = p99 <= PROPAGATION_P99_TARGET && changes.failures.is_empty();
            row(
                "(b) target p99 ≤ 2 s with no failed change",
                verdict(target_met).to_string(),
            );
            let patches = &changes.patch_requests;
            row(
                "(b) patch request alone p50 / p99 / max",
                format!(
                    "{} / {} / {} s",
                    seconds(percentile(patches, 0.5)),
                    seconds(percentile(patches, 0.99)),
                    seconds(patches[patches.len() - 1])
                ),
            );
            row(
                "(b) operator CPU time (user + system)",
                format!(
                    "{:.2} s",
                    changes.after.cpu_seconds - changes.before.cpu_seconds
                ),
            );
            if let Some(servers) = &report.changes_servers {
                render_server_use("(b)", servers, options, &mut row);
            }
        }
        Some(changes) => row(
            "(b) route changes",
            format!(
                "none succeeded ({} failed): target MISSED",
                changes.failures.len()
            ),
        ),
        None => row(
            "(b) route changes",
            "not run: no route became ready in (a)".into(),
        ),
    }
    if let Some(deletion) = report.deletion {
        row(
            "routes deleted at once until all gone (finalizer cleanup)",
            format!("{} s", seconds(deletion)),
        );
    }
    row(
        "operator RSS at the end; peak (VmHWM); CPU time since start",
        format!(
            "{} MiB; {} MiB; {:.2} s",
            mib(report.final_sample.rss_kib),
            mib(report.final_sample.peak_rss_kib),
            report.final_sample.cpu_seconds
        ),
    );
    format!("| figure | value |\n|---|---|\n{table}")
}

fn render_server_use(
    phase: &str,
    servers: &ServerUse,
    options: &Options,
    row: &mut impl FnMut(&str, String),
) {
    for ((name, _), cpu) in options.servers.iter().zip(&servers.cpu_seconds) {
        row(
            &format!("{phase} {name} CPU time (user + system)"),
            format!("{cpu:.2} s"),
        );
    }
    if let Some((sum, count)) = servers.watch_cache_wait {
        let mean_ms = if count > 0.0 { sum / count * 1e3 } else { 0.0 };
        row(
            &format!("{phase} LLMPolicy LISTs waiting for the API server's watch cache; mean wait"),
            format!("{count:.0}; {mean_ms:.1} ms"),
        );
    }
}

/// Returns the WARN and ERROR lines of the operator's log, at most `limit` of them, and the
/// total number of such lines.
fn log_problems(log: &Path, limit: usize) -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let problems: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect();
    let shown = problems
        .iter()
        .take(limit)
        .map(ToString::to_string)
        .collect();
    (shown, problems.len())
}

// --- the run ---------------------------------------------------------------------------------

/// Waits for the operator to lead, runs both measurements and deletes the routes. The caller
/// stops the operator and deletes the namespace.
async fn run_measurements(
    client: &Client,
    namespace: &str,
    operator: &mut OperatorProcess,
    options: &Options,
    load_before: String,
) -> BenchResult<Report> {
    let clock_ticks = clock_ticks_per_second()?;
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let ops_url = operator.ops_url.clone();
    wait_for("the operator's /readyz", STARTUP_TIMEOUT, || async {
        let (status, _) = http_get(&http, &format!("{ops_url}/readyz"), REQUEST_TIMEOUT)
            .await
            .ok()?;
        (status == 200).then_some(())
    })
    .await?;
    let started_to_ready = started.elapsed();
    wait_for("the operator to lead", STARTUP_TIMEOUT, || async {
        let (_, body) = http_get(&http, &format!("{ops_url}/metrics"), REQUEST_TIMEOUT)
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&body).to_string();
        (metric(&text, "llmroute_operator_leader") == Some(1.0)).then_some(())
    })
    .await?;
    let started_to_leader = started.elapsed();
    operator.check_running()?;
    let idle = sample_process(operator.pid(), clock_ticks)?;
    eprintln!(
        "operator ready after {} s and leading after {} s; creating {} routes",
        seconds(started_to_ready),
        seconds(started_to_leader),
        options.routes
    );

    let routes: Api<LlmRoute> = Api::namespaced(client.clone(), namespace);
    let servers_before = sample_server_use(client, options, clock_ticks).await?;
    let creation = measure_creation(&routes, operator, &http, options, clock_ticks).await?;
    let servers_after = sample_server_use(client, options, clock_ticks).await?;
    let creation_servers = server_use(&servers_before, &servers_after);
    for error in creation.create_errors.iter().take(5) {
        eprintln!("failed to create a route: {error}");
    }
    eprintln!(
        "(a) {} of {} routes ready; measuring {} changes",
        creation.ready_after.len(),
        options.routes,
        options.changes
    );

    let ready: Vec<String> = routes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|route| is_ready(route))
        .map(ResourceExt::name_any)
        .collect();
    let (changes, changes_servers) = if ready.is_empty() {
        (None, None)
    } else {
        let servers_before = sample_server_use(client, options, clock_ticks).await?;
        let figures =
            measure_changes(&routes, &ready, operator, &http, options, clock_ticks).await?;
        let servers_after = sample_server_use(client, options, clock_ticks).await?;
        for failure in figures.failures.iter().take(5) {
            eprintln!("a route change failed: {failure}");
        }
        (
            Some(figures),
            Some(server_use(&servers_before, &servers_after)),
        )
    };

    let deletion = delete_routes(&routes).await;
    let final_sample = sample_process(operator.pid(), clock_ticks)?;
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine_description(),
        load_before,
        load_after: load_average(),
        server_version: client.apiserver_version().await?.git_version,
        started_to_ready,
        started_to_leader,
        idle,
        creation,
        creation_servers,
        changes,
        changes_servers,
        deletion,
        final_sample,
    })
}

/// Deletes every route of the namespace while the operator runs, so that its finalizer lets
/// them go, and returns the time until they are gone.
async fn delete_routes(routes: &Api<LlmRoute>) -> Option<Duration> {
    let started = Instant::now();
    if let Err(error) = routes
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
    {
        eprintln!("failed to delete the routes: {error}");
        return None;
    }
    let gone = wait_for("the deleted routes to be gone", DELETE_TIMEOUT, || async {
        let listed = routes.list(&ListParams::default()).await.ok()?;
        listed.items.is_empty().then_some(())
    })
    .await;
    match gone {
        Ok(()) => Some(started.elapsed()),
        Err(error) => {
            eprintln!("{error}; the namespace deletion waits for the routes' finalizer");
            None
        }
    }
}

async fn run(options: Options) -> BenchResult<()> {
    let load_before = load_average();
    let client = kube_client(&options.kubeconfig).await?;
    install_crds(&client).await?;

    let namespace_name = format!("operator-bench-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": namespace_name}}))?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .map_err(|e| format!("failed to create the namespace {namespace_name}: {e}"))?;

    let work = tempfile::tempdir()?;
    let log = options
        .operator_log
        .clone()
        .unwrap_or_else(|| work.path().join("operator.log"));
    let data_dir = work.path().join("data");
    let outcome = match OperatorProcess::spawn(&options, &namespace_name, &data_dir, &log) {
        Ok(mut operator) => {
            eprintln!(
                "started the operator (pid {}), log {}",
                operator.pid(),
                log.display()
            );
            let report = run_measurements(
                &client,
                &namespace_name,
                &mut operator,
                &options,
                load_before,
            )
            .await;
            match operator.stop() {
                Ok(status) => eprintln!("the operator stopped: {status}"),
                Err(error) => eprintln!("{error}"),
            }
            report
        }
        Err(error) => Err(error),
    };
    if let Err(error) = namespaces
        .delete(&namespace_name, &DeleteParams::default())
        .await
    {
        eprintln!("failed to delete the namespace {namespace_name}: {error}");
    }
    let report = outcome?;

    println!("{}", render(&report, &options));
    let (problems, total) = log_problems(&log, 20);
    if total == 0 {
        println!("The operator logged no WARN or ERROR line.");
    } else {
        println!(
            "The operator logged {total} WARN or ERROR lines; the first {}:\n",
            problems.len()
        );
        println!("```");
        for line in problems {
            println!("{line}");
        }
        println!("```");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("failed to start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
