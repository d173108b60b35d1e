//! `llmroute bench`: measures the policy decision through ONNX Runtime, the encoder and BaRP
//! training, and prints one table. Timings are wall-clock on the machine that runs it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::data;
use llmroute_policy::encoder::EMBEDDING_DIM;
use llmroute_policy::policy::metadata::POLICY_FORMAT;
use llmroute_policy::policy::train::DEFAULT_INTERACTIONS_PER_PROMPT;
use llmroute_policy::policy::{
    NetworkShape, OnnxPolicy, PolicyMetadata, PolicyNetwork, TrainConfig, to_onnx_bytes, train,
};
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::args::parse_count;
use crate::workspace::Workspace;

/// Maximum --decisions and --encodes. Each run keeps its duration (16 bytes) until the table
/// is printed, so 10,000,000 runs take 160 MB.
const MAX_RUNS: usize = 10_000_000;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Policy decisions to time, from 1 to 10000000.
    #[arg(
        long,
        default_value_t = 20_000,
        value_parser = parse_count,
        allow_negative_numbers = true
    )]
    pub decisions: usize,
    /// Encoder runs to time, from 1 to 10000000.
    #[arg(long, default_value_t = 200, value_parser = parse_count, allow_negative_numbers = true)]
    pub encodes: usize,
    /// Data set whose training split is used for the training benchmark: llmrouter-9llm,
    /// paretobandit-k3, paretobandit-k4. Checked even with --skip-training.
    #[arg(long, default_value = "llmrouter-9llm")]
    pub dataset: String,
    /// Skip the training benchmark.
    #[arg(long)]
    pub skip_training: bool,
}

/// A prompt of exactly 54 word pieces with [CLS] and [SEP] for the all-MiniLM-L6-v2 tokenizer
/// (checked at run time).
const PROMPT_54_TOKENS: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many \
clips in May. How many clips did Natalia sell altogether in April and May? Explain each step of \
your reasoning briefly before giving the final number in plain words, please.";

struct Row {
    name: String,
    runs: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

/// Fails on flag values that would make the benchmark fail or panic after it started.
fn check_args(args: &BenchArgs) -> Result<()> {
    for (flag, runs) in [("--decisions", args.decisions), ("--encodes", args.encodes)] {
        if runs == 0 {
            bail!("invalid {flag} 0: use at least 1");
        }
        if runs > MAX_RUNS {
            bail!("invalid {flag} {runs}: use at most {MAX_RUNS}");
        }
    }
    if !data::DATASET_NAMES.contains(&args.dataset.as_str()) {
        bail!(
            "invalid --dataset {}: unknown data set. Known data sets: {}",
            args.dataset,
            data::DATASET_NAMES.join(", ")
        );
    }
    Ok(())
}

pub fn run(workspace: &Workspace, args: &BenchArgs) -> Result<()> {
    check_args(args)?;
    let mut rows = Vec::new();
    rows.extend(bench_policy(workspace, args.decisions)?);
    rows.push(bench_encoder(workspace, args.encodes)?);
    if !args.skip_training {
        rows.push(bench_training(workspace, &args.dataset)?);
    }

    let width = rows
        .iter()
        .map(|row| row.name.chars().count())
        .max()
        .unwrap_or(9);
    println!(
        "{:<width$} {:>7} {:>11} {:>11} {:>11}",
        "benchmark", "runs", "p50", "p99", "mean"
    );
    for row in &rows {
        println!(
            "{:<width$} {:>7} {:>11} {:>11} {:>11}",
            row.name,
            row.runs,
            format_duration(row.p50),
            format_duration(row.p99),
            format_duration(row.mean)
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "machine: {cores} cores visible; {}",
        cpu_model().unwrap_or_else(|| "CPU model unknown".to_string())
    );
    Ok(())
}

fn bench_policy(workspace: &Workspace, decisions: usize) -> Result<Vec<Row>> {
    let environment = workspace.onnx_runtime()?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let defaults = TrainConfig::default();
    let models = 9;
    let network = PolicyNetwork::new(
        NetworkShape {
            embedding_dim: EMBEDDING_DIM,
            preference_dim: defaults.preference_dim,
            hidden_dim: defaults.hidden_dim,
            num_models: models,
        },
        &mut rng,
    );
    let metadata = PolicyMetadata {
        format: POLICY_FORMAT.to_string(),
        version: "bench".to_string(),
        models: (0..models).map(|k| format!("model-{k}")).collect(),
        encoder: "bench".to_string(),
        embedding_dim: EMBEDDING_DIM,
        cost_scale_usd: 0.001,
    };
    let mut policy = OnnxPolicy::from_bytes(
        &to_onnx_bytes(&network, &metadata),
        &environment,
        "bench policy",
    )?;
    let embedding: Vec<f32> = (0..EMBEDDING_DIM)
        .map(|i| ((i as f32) * 0.37).sin() / 14.0)
        .collect();

    let onnx = time_runs(decisions, |i| {
        let probabilities = policy
            .probabilities(&embedding, (i % 11) as f32 / 10.0)
            .expect("policy runs");
        std::hint::black_box(probabilities);
    });
    let view = Array2::from_shape_vec((1, EMBEDDING_DIM), embedding.clone())?;
    let rust = time_runs(decisions, |i| {
        let probabilities = network.probabilities(view.view(), &[(i % 11) as f32 / 10.0]);
        std::hint::black_box(probabilities);
    });
    Ok(vec![
        row("policy decision, ONNX Runtime, batch 1, 9 models", onnx),
        row(
            "policy decision, Rust forward pass, batch 1, 9 models",
            rust,
        ),
    ])
}

fn bench_encoder(workspace: &Workspace, runs: usize) -> Result<Row> {
    let mut encoder = workspace.encoder(1)?;
    let tokens = encoder.tokenize(PROMPT_54_TOKENS)?.len();
    // Warm-up runs let ONNX Runtime allocate its buffers before timing.
    for _ in 0..5 {
        encoder.embed(PROMPT_54_TOKENS)?;
    }
    let durations = time_runs(runs, |_| {
        std::hint::black_box(encoder.embed(PROMPT_54_TOKENS).expect("encoder runs"));
    });
    Ok(row(
        &format!("encoder, {tokens}-token prompt, 1 intra-op thread"),
        durations,
    ))
}

fn bench_training(workspace: &Workspace, dataset_name: &str) -> Result<Row> {
    let dataset = data::load(dataset_name)?;
    let mut encoder = workspace.bulk_encoder()?;
    let embeddings =
        workspace.embed_split(&mut encoder, &dataset, "train", &dataset.train.prompts)?;
    let reward = llmroute_policy::reward::Reward::new(
        llmroute_policy::reward::calibrate_tau(dataset.train.cost.iter().copied(), 0.95)
            .context("training costs are all zero")?,
    );
    // The run of `llmroute train`: its step count follows the number of training prompts.
    let config = TrainConfig {
        interactions_per_prompt: Some(DEFAULT_INTERACTIONS_PER_PROMPT),
        ..TrainConfig::default()
    };
    let started = Instant::now();
    let mut bandit = ReplayEnvironment::new(
        embeddings.view(),
        dataset.train.quality.view(),
        dataset.train.cost.view(),
    );
    let (_, summary) = train(&mut bandit, reward, &config, None, &ProgressBar::hidden());
    let elapsed = started.elapsed();
    Ok(Row {
        name: format!(
            "BaRP training, {dataset_name}, {} interactions, cached embeddings",
            summary.interactions
        ),
        runs: 1,
        p50: elapsed,
        p99: elapsed,
        mean: elapsed,
    })
}

fn time_runs(runs: usize, mut body: impl FnMut(usize)) -> Vec<Duration> {
    (0..runs)
        .map(|i| {
            let started = Instant::now();
            body(i);
            started.elapsed()
        })
        .collect()
}

fn row(name: &str, mut durations: Vec<Duration>) -> Row {
    durations.sort();
    let runs = durations.len();
    let percentile = |p: f64| durations[((p * runs as f64).ceil() as usize).clamp(1, runs) - 1];
    let total: Duration = durations.iter().sum();
    Row {
        name: name.to_string(),
        runs,
        p50: percentile(0.50),
        p99: percentile(0.99),
        mean: total / runs as u32,
    }
}

fn format_duration(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.1} µs")
    } else if micros < 1_000_000.0 {
        format!("{:.2} ms", micros / 1e3)
    } else {
        format!("{:.2} s", micros / 1e6)
    }
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split(':').nth(1))
        .map(|name| name.trim().to_string())
}
