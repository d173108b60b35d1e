//! `llmroute quickstart`: the whole learning loop on one machine, without a cluster or API
//! keys. It starts `replay-llm` on a bundled data set and a sidecar as child processes, runs
//! the standalone control plane with its learning loop in this process, replays the data set's
//! training prompts with mixed preferences through the sidecar (the path an application's
//! calls take), posts the recorded quality as feedback, and shows reward, quality and cost per
//! policy version while versions are trained, gated, canaried and promoted. It ends with a
//! summary table, the rollout timeline and a plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmroute_api::crd::{ExplorationMode, PolicyPhase};
use llmroute_api::rollout::{CanaryStep, RolloutSpec, TrainingSpec};
use llmroute_control::route::{ExplorationSpec, LlmRoute};
use llmroute_control::{ControlPlane, LearningLoop, Store, serve};
use llmroute_policy::assets::Assets;
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::data::{RoutingDataset, Split};
use llmroute_policy::encoder::digest_of_files;
use llmroute_policy::policy::{
    PolicyNetwork, TrainConfig, argmax, from_onnx, read_metadata, train,
};
use llmroute_policy::reward::{DEFAULT_TAU_PERCENTILE, Reward, calibrate_tau};
use ndarray::{Array2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::workspace::Workspace;

#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {
    /// Data set whose recorded outcomes serve the calls: paretobandit-k3, paretobandit-k4 or
    /// llmrouter-9llm.
    #[arg(long, default_value = "paretobandit-k3")]
    pub dataset: String,
    /// Folder for the route file, the state folder, logs, the summary and the plot. Its
    /// `state` and `routes` subfolders are recreated at every run.
    #[arg(long, default_value = "llmroute-quickstart")]
    pub out: PathBuf,
    /// Requests to send in all.
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Seed of the prompt order and the preferences.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

const ROUTE: &str = "replay";

/// A child process that is ended (by its process id) when dropped.
struct ChildProcess {
    name: &'static str,
    child: Child,
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM lets the child stop its server gracefully; kill after a grace period.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            tracing::warn!(
                process = self.name,
                "did not stop within 5 s of SIGTERM; killing it"
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `llmroute ARGS` with stderr into `log`, and returns it once a stdout line contains
/// `marker`, with that line. The rest of stdout goes to the log too.
fn spawn(
    name: &'static str,
    args: &[String],
    log: &Path,
    marker: &str,
) -> Result<(ChildProcess, String)> {
    let exe = std::env::current_exe().context("failed to find the llmroute binary")?;
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("failed to create the log {}", log.display()))?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file.try_clone()?);
    end_with_parent(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to start llmroute {name}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut process = ChildProcess { name, child };
    let mut lines = BufReader::new(stdout).lines();
    let found = loop {
        match lines.next() {
            Some(Ok(line)) => {
                let mut log = &log_file;
                let _ = writeln!(log, "{line}");
                if line.contains(marker) {
                    break line;
                }
            }
            _ => {
                let status = process.child.wait().ok();
                bail!(
                    "llmroute {name} stopped before it was ready (status {status:?}); see {}",
                    log.display()
                );
            }
        }
    };
    std::thread::spawn(move || {
        let mut log = log_file;
        for line in lines.map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
        }
    });
    Ok((process, found))
}

/// Makes the child receive SIGTERM when the quickstart process ends, however it ends.
///
/// [`ChildProcess`]'s drop stops the children on a normal exit or an error, but a SIGTERM or
/// SIGKILL sent to the quickstart's process id skips it, and the servers would keep their
/// ports. Linux's `PR_SET_PDEATHSIG` fires when the thread that spawned the child exits, which
/// is the main thread here, so it fires when the process does.
fn end_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec (prctl, getppid), no
    // allocation and no lock.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have ended before prctl took effect. ESRCH ("no such process")
            // is built without allocating, which is not allowed between fork and exec.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Extracts `http://ADDRESS` from a line.
fn address_in(line: &str) -> Result<SocketAddr> {
    let start = line
        .find("http://")
        .with_context(|| format!("no address in {line:?}"))?;
    let rest = &line[start + 7..];
    let end = rest.find(['/', ' ', ',']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .with_context(|| format!("no address in {line:?}"))
}

/// The quickstart's route: the replay server's pool with exploration, a training schedule and
/// canary steps sized so that a run of a few thousand requests includes a full rollout.
fn quickstart_route(mut route: LlmRoute) -> LlmRoute {
    route.spec.exploration = Some(ExplorationSpec {
        mode: ExplorationMode::EpsilonGreedy,
        epsilon: Some(0.2),
    });
    route.spec.training = Some(TrainingSpec {
        interval_seconds: Some(10),
        min_new_events: Some(600),
        steps: Some(800),
        ..TrainingSpec::default()
    });
    route.spec.rollout = Some(RolloutSpec {
        steps: Some(vec![
            CanaryStep {
                weight: 0.2,
                min_events: 150,
            },
            CanaryStep {
                weight: 0.5,
                min_events: 250,
            },
        ]),
        ..RolloutSpec::default()
    });
    route
}

/// Client-side figures of one policy version.
#[derive(Debug, Default, Clone)]
struct VersionStats {
    requests: u64,
    quality: f64,
    cost: f64,
    reward: f64,
}

#[derive(Debug, Default)]
struct Stats {
    by_version: BTreeMap<String, VersionStats>,
    /// (request index, version, reward) of every successful request, for the plot.
    rewards: Vec<(usize, String, f64)>,
    errors: u64,
    last_error: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Sends one routed request and its feedback; returns (version, quality, cost).
async fn one_request(
    client: &HttpClient,
    sidecar: SocketAddr,
    prompt: &str,
    w_quality: f64,
) -> Result<(String, f64, f64)> {
    let body = serde_json::json!({
        "model": ROUTE,
        "messages": [{"role": "user", "content": prompt}],
    });
    let request = http::Request::post(format!("http://{sidecar}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-llmroute-preference", format!("quality={w_quality}"))
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = client.request(request).await?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let decision = header("x-llmroute-decision-id");
    let version = header("x-llmroute-policy-version").unwrap_or_else(|| "fallback".into());
    let quality = header(llmroute_replay::QUALITY_HEADER);
    let cost = header("x-llmroute-cost-usd");
    let text = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "the sidecar responded with {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    let quality: f64 = quality
        .context("the response has no recorded quality header")?
        .parse()?;
    let cost: f64 = cost.context("the response has no cost header")?.parse()?;
    if let Some(decision) = decision {
        let feedback = serde_json::json!({"decision_id": decision, "score": quality});
        let request = http::Request::post(format!("http://{sidecar}/v1/feedback"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(feedback.to_string())))?;
        let response = client.request(request).await?;
        let status = response.status();
        let text = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "the sidecar rejected the feedback with {status}: {}",
                String::from_utf8_lossy(&text)
            );
        }
    }
    Ok((version, quality, cost))
}

fn phase_name(phase: PolicyPhase) -> &'static str {
    match phase {
        PolicyPhase::Candidate => "Candidate",
        PolicyPhase::Canary => "Canary",
        PolicyPhase::Stable => "Stable",
        PolicyPhase::Retired => "Retired",
        PolicyPhase::Rejected => "Rejected",
    }
}

/// Formats the table of policy versions: phase from the control plane, figures from the
/// client.
fn table(store: &Store, stats: &Stats) -> String {
    let records = store.policy_records(ROUTE).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<9} {:<13} {:>8} {:>8} {:>11} {:>8} {:>16}",
        "version", "phase", "origin", "requests", "quality", "cost/req $", "reward", "gate DR diff"
    );
    let mut versions: Vec<String> = records.iter().map(|r| r.version.clone()).collect();
    for version in stats.by_version.keys() {
        if !versions.contains(version) {
            versions.push(version.clone());
        }
    }
    for version in versions {
        let record = records.iter().find(|r| r.version == version);
        let figures = stats.by_version.get(&version).cloned().unwrap_or_default();
        let n = figures.requests.max(1) as f64;
        let (quality, cost, reward) = if figures.requests > 0 {
            (
                format!("{:.3}", figures.quality / n),
                format!("{:.2e}", figures.cost / n),
                format!("{:.3}", figures.reward / n),
            )
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        let gate = record
            .and_then(|r| r.off_policy.as_ref())
            .map(|g| g.difference_dr.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<8} {:<9} {:<13} {:>8} {:>8} {:>11} {:>8} {:>16}",
            version,
            record.map(|r| phase_name(r.phase)).unwrap_or("-"),
            record
                .map(|r| format!("{:?}", r.origin))
                .unwrap_or_else(|| "-".into()),
            figures.requests,
            quality,
            cost,
            reward,
            gate
        );
    }
    out
}

/// An SVG of the mean reward per window of requests, one line per policy version.
fn plot(stats: &Stats, total: usize, path: &Path) -> Result<()> {
    const WIDTH: f64 = 760.0;
    const HEIGHT: f64 = 360.0;
    const MARGIN: f64 = 50.0;
    let window = (total / 25).max(20);
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut buckets: BTreeMap<(&str, usize), (f64, u64)> = BTreeMap::new();
    for (index, version, reward) in &stats.rewards {
        let entry = buckets
            .entry((version.as_str(), index / window))
            .or_default();
        entry.0 += reward;
        entry.1 += 1;
    }
    for ((version, bucket), (sum, n)) in buckets {
        if n >= 5 {
            series
                .entry(version)
                .or_default()
                .push(((bucket as f64 + 0.5) * window as f64, sum / n as f64));
        }
    }
    let values: Vec<f64> = series.values().flatten().map(|p| p.1).collect();
    let (low, high) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(*v), h.max(*v))
        });
    let (low, high) = if low.is_finite() && high > low {
        (low - 0.02, high + 0.02)
    } else {
        (-0.5, 1.0)
    };
    let x = |v: f64| MARGIN + v / total.max(1) as f64 * (WIDTH - 2.0 * MARGIN);
    let y = |v: f64| HEIGHT - MARGIN - (v - low) / (high - low) * (HEIGHT - 2.0 * MARGIN);
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{MARGIN}" y="20">Mean reward per {window} requests, by the policy version that decided them</text>
<line x1="{MARGIN}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{b}" stroke="black"/>
<text x="{r}" y="{lb}" text-anchor="end">request</text>
<text x="5" y="{t}">{high:.2}</text>
<text x="5" y="{b}">{low:.2}</text>
"#,
        b = HEIGHT - MARGIN,
        r = WIDTH - MARGIN,
        lb = HEIGHT - MARGIN + 30.0,
        t = MARGIN + 4.0,
    );
    for (i, (version, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{color}">{version}</text>"#,
            WIDTH - MARGIN + 5.0,
            MARGIN + 15.0 * i as f64
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).with_context(|| format!("failed to write {}", path.display()))
}

pub fn run(workspace: &Workspace, args: &QuickstartArgs) -> Result<()> {
    if args.requests == 0 {
        bail!("invalid --requests 0: send at least 1 request");
    }
    if args.concurrency == 0 {
        bail!("invalid --concurrency 0: use at least 1 worker");
    }
    let dataset = crate::workspace::load_dataset(&args.dataset, None)?;
    if Assets::locate(&workspace.cache).is_err() {
        // The set-up logs go to the log file, so this line prints what the wait is for.
        println!(
            "first run: downloading ONNX Runtime and the encoder weights into {} and building the encoder; this takes a minute or two",
            workspace.cache.display()
        );
    }
    let assets = workspace.assets()?;
    let encoder = digest_of_files(&assets.encoder, &assets.tokenizer)
        .context("failed to read the encoder files")?;
    // τ for the rewards shown: the 95th percentile of recorded costs, as the trainer
    // calibrates it from observed costs.
    let tau = calibrate_tau(dataset.train.cost.iter().copied(), DEFAULT_TAU_PERCENTILE)
        .context("the data set records no positive cost")? as f64;

    let out = &args.out;
    for folder in ["state", "routes"] {
        let path = out.join(folder);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("failed to clear {}", path.display()))?;
        }
    }
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)
        .and_then(|()| std::fs::create_dir_all(out.join("routes")))
        .with_context(|| format!("failed to create {}", out.display()))?;

    println!(
        "llmroute quickstart: {} ({} models, {} training prompts), {} requests, logs in {}",
        dataset.name,
        dataset.models.len(),
        dataset.train.len(),
        args.requests,
        logs.display()
    );
    let generated = out.join("replay-route.yaml");
    let (_replay, _) = spawn(
        "replay-llm",
        &[
            "replay-llm".into(),
            "--dataset".into(),
            dataset.name.clone(),
            "--port".into(),
            "0".into(),
            "--route".into(),
            ROUTE.into(),
            "--route-file".into(),
            generated.display().to_string(),
        ],
        &logs.join("replay-llm.log"),
        "wrote the LLMRoute file",
    )?;
    let text = std::fs::read_to_string(&generated)?;
    let route = LlmRoute::from_yaml(&text, &generated)?;
    let route = quickstart_route(route);
    let route_file = out.join("routes").join("replay.yaml");
    std::fs::write(&route_file, serde_yaml_ng::to_string(&route)?)?;
    println!("  replay-llm started; route file {}", route_file.display());

    let store = Arc::new(Store::open(&out.join("state"))?);
    let (plane, report) = ControlPlane::new(&out.join("routes"), store.clone());
    if let Some(error) = report.errors.first() {
        bail!("the quickstart's route is invalid: {error}");
    }
    let learning = Arc::new(LearningLoop::new(plane.clone(), Some(encoder)));
    learning.tick();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let (control_address, stop) = runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut server_stop = stopped.clone();
        tokio::spawn(serve(listener, plane.clone(), async move {
            let _ = server_stop.wait_for(|s| *s).await;
        }));
        let mut loop_stop = stopped;
        tokio::spawn(learning.clone().run(Duration::from_secs(2), async move {
            let _ = loop_stop.wait_for(|s| *s).await;
        }));
        anyhow::Ok((address, stop))
    })?;
    println!("  control plane on http://{control_address} with its learning loop");

    let (sidecar_child, line) = spawn(
        "sidecar",
        &[
            "sidecar".into(),
            "--control".into(),
            format!("http://{control_address}"),
            "--route".into(),
            ROUTE.into(),
            "--port".into(),
            "0".into(),
        ],
        &logs.join("sidecar.log"),
        "listening on http://",
    )?;
    let sidecar = address_in(&line)?;
    println!("  sidecar on http://{sidecar}/v1\n");

    let stats = Arc::new(Mutex::new(Stats::default()));
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..dataset.train.len()).collect();
    order.shuffle(&mut rng);
    let plan: Vec<(String, f64)> = (0..args.requests)
        .map(|i| {
            let prompt = dataset.train.prompts[order[i % order.len()]].clone();
            let w_quality = f64::from(rng.random_range(0..=10u8)) / 10.0;
            (prompt, w_quality)
        })
        .collect();
    let result = runtime.block_on(drive(args, plan, sidecar, tau, stats.clone(), &store));
    // Stop the sidecar before the control plane: on SIGTERM it sends the events it still holds,
    // which a stopped control plane would refuse.
    drop(sidecar_child);
    let _ = stop.send(true);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result?;

    let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
    let seconds = started.elapsed().as_secs_f64();
    let table_text = table(&store, &stats);
    let timeline = store.timeline(ROUTE, 1000)?;
    let mut summary = format!(
        "# llmroute quickstart\n\n{} requests to route `{ROUTE}` over {} ({} models) in {seconds:.0} s, {} errors. Rewards use τ = ${tau:.3e} (95th percentile of recorded costs) at each request's own preference, `w_quality` drawn from 0, 0.1, …, 1.\n\n```\n{table_text}```\n\n## Timeline\n\n",
        args.requests,
        dataset.name,
        dataset.models.len(),
        stats.errors
    );
    for entry in &timeline {
        let _ = writeln!(summary, "- {}: {}", entry.reason, entry.message);
    }
    let plot_path = out.join("reward.svg");
    plot(&stats, args.requests, &plot_path)?;
    let _ = writeln!(summary, "\n![mean reward per version](reward.svg)");
    let summary_path = out.join("summary.md");
    std::fs::write(&summary_path, &summary)?;
    println!("\n{table_text}");
    println!("timeline:");
    for entry in &timeline {
        println!("  {}: {}", entry.reason, entry.message);
    }
    println!(
        "\n{} requests in {seconds:.0} s, {} errors{}",
        args.requests,
        stats.errors,
        stats
            .last_error
            .as_ref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    );
    println!(
        "wrote {} and {}",
        summary_path.display(),
        plot_path.display()
    );
    match offline_comparison(workspace, &dataset, &store, &order, args.seed, tau) {
        Ok(Some(text)) => {
            println!("\n{text}");
            summary.push_str(&format!(
                "\n## Against offline training\n\n```\n{text}```\n"
            ));
            std::fs::write(&summary_path, &summary)?;
        }
        Ok(None) => println!(
            "\nno trained policy was promoted, so there is nothing to compare with offline training"
        ),
        Err(error) => println!("\nthe comparison with offline training failed: {error:#}"),
    }
    println!(
        "\nnext: `llmroute policies --route {ROUTE} --state {}` lists the versions and rollout \
         decisions; `llmroute eval --dataset {}` compares BaRP with other routers",
        out.join("state").display(),
        dataset.name
    );
    Ok(())
}

/// Mean reward, quality and cost of greedy decisions by `network` on the test prompts,
/// averaged over the preference sweep `w_quality ∈ {0, 0.1, …, 1}`. `columns[k]` is the data
/// set's column of the network's action `k`.
fn sweep(
    network: &PolicyNetwork,
    embeddings: &Array2<f32>,
    split: &Split,
    columns: &[usize],
    tau: f64,
) -> (f64, f64, f64) {
    let n = split.len();
    let (mut reward, mut quality, mut cost) = (0.0, 0.0, 0.0);
    for step in 0..=10 {
        let w = step as f32 / 10.0;
        let probabilities = network.probabilities(embeddings.view(), &vec![w; n]);
        for (row, probabilities) in probabilities.rows().into_iter().enumerate() {
            let column = columns[argmax(probabilities.as_slice().unwrap_or(&[]))];
            let (q, c) = (
                f64::from(split.quality[[row, column]]),
                f64::from(split.cost[[row, column]]),
            );
            // r = w_q · q − w_c · min(c / τ, 1)
            reward += f64::from(w) * q - (1.0 - f64::from(w)) * (c / tau).min(1.0);
            quality += q;
            cost += c;
        }
    }
    let count = (11 * n) as f64;
    (reward / count, quality / count, cost / count)
}

/// Compares the promoted policy with a policy trained offline, with full simulation, on as
/// many training prompts as the promoted policy had training events, at most the whole training
/// split: the offline trainer may call any model on those prompts as often as it likes. Both
/// are measured on the test split.
fn offline_comparison(
    workspace: &Workspace,
    dataset: &RoutingDataset,
    store: &Store,
    order: &[usize],
    seed: u64,
    tau: f64,
) -> Result<Option<String>> {
    let records = store.policy_records(ROUTE)?;
    let Some(promoted) = records
        .iter()
        .rev()
        .find(|r| r.phase == PolicyPhase::Stable && r.training.is_some())
    else {
        return Ok(None);
    };
    let events = promoted
        .training
        .as_ref()
        .map_or(0, |t| t.training_events as usize);
    // A prompt may come back in several events, so the events can outnumber the prompts.
    let prompts = events.clamp(1, order.len());
    let bytes = std::fs::read(store.policy_path(&promoted.sha256))?;
    let model = llmroute_policy::onnx::decode(&bytes)?;
    let metadata = read_metadata(&model)?;
    let network = from_onnx(&model)?;
    let columns: Vec<usize> = metadata
        .models
        .iter()
        .map(|m| {
            dataset.models.iter().position(|d| d == m).with_context(|| {
                format!("the promoted policy routes to {m:?}, not in the data set")
            })
        })
        .collect::<Result<_>>()?;
    let embeddings = workspace.embed_dataset(dataset)?;

    let rows: Vec<usize> = order[..prompts].to_vec();
    let pick = |matrix: &Array2<f32>| matrix.select(Axis(0), &rows);
    let (train_embeddings, train_quality, train_cost) = (
        pick(&embeddings.train),
        pick(&dataset.train.quality),
        pick(&dataset.train.cost),
    );
    let mut environment = ReplayEnvironment::new(
        train_embeddings.view(),
        train_quality.view(),
        train_cost.view(),
    );
    let config = TrainConfig {
        seed,
        ..TrainConfig::default()
    };
    let progress = crate::workspace::progress_bar(config.steps as u64, "training offline");
    let started = Instant::now();
    let (offline, _) = train(
        &mut environment,
        Reward::new(tau as f32),
        &config,
        None,
        &progress,
    );
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let identity: Vec<usize> = (0..dataset.models.len()).collect();
    let online = sweep(&network, &embeddings.test, &dataset.test, &columns, tau);
    let full = sweep(&offline, &embeddings.test, &dataset.test, &identity, tau);
    let mut text = format!(
        "On the {} test prompts, greedy, mean over w_quality = 0, 0.1, …, 1:\n{:<44} {:>8} {:>8} {:>11}\n",
        dataset.test.len(),
        "policy",
        "reward",
        "quality",
        "cost/req $"
    );
    let _ = writeln!(
        text,
        "{:<44} {:>8.4} {:>8.4} {:>11.2e}",
        format!("{} (bandit feedback, {events} events)", promoted.version),
        online.0,
        online.1,
        online.2
    );
    let _ = writeln!(
        text,
        "{:<44} {:>8.4} {:>8.4} {:>11.2e}",
        if prompts < events {
            format!("offline, full simulation on all {prompts} prompts")
        } else {
            format!("offline, full simulation on {prompts} prompts")
        },
        full.0,
        full.1,
        full.2
    );
    let ratio = if full.0.abs() > 1e-12 {
        online.0 / full.0
    } else {
        f64::NAN
    };
    let _ = writeln!(
        text,
        "{} reaches {:.1} % of the offline policy's mean reward (offline training: {} steps of {}, {seconds:.0} s)",
        promoted.version,
        ratio * 100.0,
        config.steps,
        config.batch_size
    );
    Ok(Some(text))
}

/// Sends the planned requests (prompt, `w_quality`) with `concurrency` workers and redraws the
/// table while they run.
async fn drive(
    args: &QuickstartArgs,
    plan: Vec<(String, f64)>,
    sidecar: SocketAddr,
    tau: f64,
    stats: Arc<Mutex<Stats>>,
    store: &Store,
) -> Result<()> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Wait until the sidecar is ready (it has a configuration and a policy).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request =
            http::Request::get(format!("http://{sidecar}/readyz")).body(Full::new(Bytes::new()))?;
        if let Ok(response) = client.request(request).await
            && response.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the sidecar was not ready within 60 s; see its log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let plan = Arc::new(plan);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, plan, next, done, stats) = (
            client.clone(),
            plan.clone(),
            next.clone(),
            done.clone(),
            stats.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((prompt, w_quality)) = plan.get(index) else {
                    break;
                };
                let result = one_request(&client, sidecar, prompt, *w_quality).await;
                let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok((version, quality, cost)) => {
                        // r = w_q · q − w_c · min(c / τ, 1)
                        let reward =
                            w_quality * quality - (1.0 - w_quality) * (cost / tau).min(1.0);
                        let entry = stats.by_version.entry(version.clone()).or_default();
                        entry.requests += 1;
                        entry.quality += quality;
                        entry.cost += cost;
                        entry.reward += reward;
                        stats.rewards.push((index, version, reward));
                    }
                    Err(error) => {
                        stats.errors += 1;
                        stats.last_error = Some(format!("{error:#}"));
                    }
                }
                drop(stats);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let interactive = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut shown_lines = 0usize;
    let mut shown_timeline = 0usize;
    let mut last_plain = Instant::now();
    loop {
        let finished = workers.iter().all(|w| w.is_finished());
        let count = done.load(Ordering::Relaxed);
        let rate = count as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let timeline = store.timeline(ROUTE, 1000).unwrap_or_default();
        if interactive {
            let mut screen = format!("{count}/{} requests, {rate:.0} per second\n", args.requests);
            {
                let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
                screen.push_str(&table(store, &stats));
            }
            for entry in timeline.iter().rev().take(4).rev() {
                let mut message = format!("{}: {}", entry.reason, entry.message);
                message.truncate(150);
                let _ = writeln!(screen, "  {message}");
            }
            // Move up over the last frame and clear it, then draw this one.
            let mut stdout = std::io::stdout().lock();
            if shown_lines > 0 {
                let _ = write!(stdout, "\x1b[{shown_lines}A\x1b[J");
            }
            let _ = write!(stdout, "{screen}");
            let _ = stdout.flush();
            shown_lines = screen.lines().count();
        } else {
            for entry in timeline.iter().skip(shown_timeline) {
                println!("{}: {}", entry.reason, entry.message);
            }
            if last_plain.elapsed() > Duration::from_secs(15) || finished {
                println!("{count}/{} requests, {rate:.0} per second", args.requests);
                last_plain = Instant::now();
            }
        }
        shown_timeline = timeline.len();
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for worker in workers {
        worker.await.context("a request worker failed")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_ends_with_its_spawner() {
        use std::os::unix::process::ExitStatusExt;
        // PR_SET_PDEATHSIG fires when the spawning thread exits, so a short-lived thread
        // takes the place of the quickstart process.
        let mut child = std::thread::spawn(|| {
            let mut command = Command::new("sleep");
            command.arg("30");
            end_with_parent(&mut command);
            command.spawn().expect("sleep starts")
        })
        .join()
        .expect("the spawning thread ends");
        let mut status = None;
        for _ in 0..100 {
            status = child.try_wait().expect("child status");
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let Some(status) = status else {
            child.kill().expect("kill the child");
            child.wait().expect("reap the child");
            panic!("the child outlived its spawning thread by 5 s");
        };
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }

    #[test]
    fn address_in_reads_listening_lines() {
        let line = "sidecar of route replay listening on http://127.0.0.1:4100/v1";
        assert_eq!(address_in(line).unwrap(), "127.0.0.1:4100".parse().unwrap());
        let line = "control API listening on http://127.0.0.1:8070, routes: replay";
        assert_eq!(address_in(line).unwrap(), "127.0.0.1:8070".parse().unwrap());
        assert!(address_in("no address here").is_err());
    }

    #[test]
    fn quickstart_route_passes_the_spec_checks() {
        let yaml = r#"apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata:
  name: replay
spec:
  models:
    - name: a
      endpoint: http://127.0.0.1:9/m/a/v1
      model: a
      pricing: {inputUsdPerMillionTokens: 1, outputUsdPerMillionTokens: 2}
  defaultPreference: {quality: 0.5, cost: 0.5}
  fallback: a
"#;
        let route = LlmRoute::from_yaml(yaml, Path::new("replay.yaml")).unwrap();
        let route = quickstart_route(route);
        assert_eq!(route.spec.check(), vec![]);
        let settings = RolloutSpec::settings(route.spec.rollout.as_ref());
        assert_eq!(settings.steps.len(), 2);
    }
}
