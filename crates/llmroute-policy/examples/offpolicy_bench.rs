//! Times off-policy training and evaluation on 100 000 synthetic logged events with
//! 384-dimensional embeddings and 9 models: `train_off_policy` with the default configuration,
//! starting from a pricing prior, then `compare_policies` of the result against that prior.
//! Prints a table, the training summary, the estimates and the machine's load.
//!
//! `cargo run --release -p llmroute-policy --example offpolicy_bench [events] [steps]`
//!
//! `steps` replaces the default number of gradient steps, to see how training time and the
//! estimated reward grow with it.

use std::process::ExitCode;
use std::time::Instant;

use llmroute_api::config::Exploration;
use llmroute_policy::offpolicy::{
    EvaluationConfig, Explored, LoggedEvent, OffPolicyConfig, compare_policies, train_off_policy,
};
use llmroute_policy::policy::prior::{PricedModel, pricing_prior};
use llmroute_policy::reward::Reward;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const DEFAULT_EVENTS: usize = 100_000;
const EMBEDDING_DIM: usize = 384;
const NUM_MODELS: usize = 9;
/// Prompt topics: each has its own embedding direction and its own best models.
const TOPICS: usize = 24;
/// Share of logged decisions drawn uniformly; the rest go to the cheapest model, like a
/// pricing prior served with exploration.
const UNIFORM_SHARE: f32 = 0.5;
/// Cost scale τ in USD.
const TAU: f32 = 0.01;

fn main() -> ExitCode {
    let events = match positive_argument(1, "event count") {
        Ok(events) => events.unwrap_or(DEFAULT_EVENTS),
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = OffPolicyConfig::default();
    match positive_argument(2, "step count") {
        Ok(steps) => config.steps = steps.unwrap_or(config.steps),
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    }
    match run(events, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command-line argument at `position` as a positive integer, `None` when absent.
fn positive_argument(position: usize, name: &str) -> Result<Option<usize>, String> {
    match std::env::args().nth(position) {
        None => Ok(None),
        Some(value) => match value.parse::<usize>() {
            Ok(number) if number > 0 => Ok(Some(number)),
            _ => Err(format!("invalid {name} {value:?}; pass a positive integer")),
        },
    }
}

fn run(count: usize, config: &OffPolicyConfig) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "machine: {} logical cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!("load average before: {}", load_average());

    let started = Instant::now();
    let events = synthetic_events(count, &mut ChaCha8Rng::seed_from_u64(1));
    println!(
        "generated {count} events in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let models: Vec<PricedModel> = (0..NUM_MODELS)
        .map(|k| PricedModel {
            name: format!("model-{k}"),
            input_usd_per_million_tokens: model_cost(k) as f64 * 1e5,
            output_usd_per_million_tokens: model_cost(k) as f64 * 1e5,
        })
        .collect();
    let (prior, _) = pricing_prior(&models, "v0", "synthetic", EMBEDDING_DIM, TAU as f64);
    let reward = Reward::new(TAU);

    let started = Instant::now();
    let (trained, summary) = train_off_policy(&prior, &events, reward, config)?;
    let training_seconds = started.elapsed().as_secs_f64();
    println!("load average after training: {}", load_average());

    let stable = Explored {
        policy: &prior,
        exploration: Exploration::Sample,
    };
    let started = Instant::now();
    let comparison = compare_policies(
        &trained,
        &stable,
        &events,
        reward,
        &EvaluationConfig::default(),
    )?;
    let evaluation_seconds = started.elapsed().as_secs_f64();
    println!("load average after evaluation: {}", load_average());

    println!();
    println!(
        "{:<40} {:>8} {:>6} {:>9} {:>10}",
        "benchmark", "events", "steps", "seconds", "events/s"
    );
    println!(
        "{:<40} {:>8} {:>6} {:>9.2} {:>10.0}",
        format!("train_off_policy ({} rows)", summary.interactions),
        count,
        summary.steps,
        training_seconds,
        count as f64 / training_seconds
    );
    println!(
        "{:<40} {:>8} {:>6} {:>9.2} {:>10.0}",
        format!(
            "compare_policies ({} preferences)",
            comparison.preferences.len()
        ),
        count,
        "-",
        evaluation_seconds,
        count as f64 / evaluation_seconds
    );

    println!();
    println!(
        "training: {} rows at {:.0} rows/s, mean importance weight {:.3}, clipped {:.4}, final objective {:.4}, continued from initial: {}",
        summary.interactions,
        summary.interactions as f64 / training_seconds,
        summary.mean_importance_weight,
        summary.clipped_fraction,
        summary.final_objective,
        summary.continued_from_initial
    );
    println!(
        "evaluation at w_quality {:?}, candidate effective sample size {:.0}",
        comparison.preferences, comparison.candidate_effective_sample_size
    );
    for (name, estimates) in [
        ("candidate", comparison.candidate),
        ("stable (prior, sampled)", comparison.stable),
        ("candidate - stable", comparison.difference),
    ] {
        println!(
            "{name:<24} IPS {:+.4} ± {:.4}   SNIPS {:+.4} ± {:.4}   DR {:+.4} ± {:.4}",
            estimates.ips.mean,
            estimates.ips.std_error,
            estimates.snips.mean,
            estimates.snips.std_error,
            estimates.dr.mean,
            estimates.dr.std_error
        );
    }
    Ok(())
}

/// Cost of one call to model `k` in USD: from 0.0002 (model 0) to 0.012 (model 8).
fn model_cost(k: usize) -> f32 {
    0.0002 * 1.67f32.powi(k as i32)
}

/// Events logged by a policy that calls the cheapest model with probability
/// `1 − UNIFORM_SHARE + UNIFORM_SHARE / K` and any other with `UNIFORM_SHARE / K`. A topic's mean
/// quality per model is drawn once. The dearer models are better on average, and each topic has
/// a cheap model that does well on it.
fn synthetic_events(count: usize, rng: &mut ChaCha8Rng) -> Vec<LoggedEvent> {
    let unit = Normal::new(0.0f32, 1.0).expect("valid normal");
    let noise = Normal::new(0.0f32, 0.6 / (EMBEDDING_DIM as f32).sqrt()).expect("valid normal");
    let centres: Vec<Vec<f32>> = (0..TOPICS)
        .map(|_| normalised((0..EMBEDDING_DIM).map(|_| unit.sample(rng)).collect()))
        .collect();
    let mean_quality: Vec<[f32; NUM_MODELS]> = (0..TOPICS)
        .map(|_| {
            let specialist = rng.random_range(0..NUM_MODELS / 2);
            std::array::from_fn(|k| {
                let base = 0.35 + 0.5 * k as f32 / (NUM_MODELS - 1) as f32;
                let quality = if k == specialist {
                    0.9
                } else {
                    base + rng.random_range(-0.15..0.15)
                };
                quality.clamp(0.0, 1.0)
            })
        })
        .collect();

    (0..count)
        .map(|_| {
            let topic = rng.random_range(0..TOPICS);
            let embedding = normalised(
                centres[topic]
                    .iter()
                    .map(|&c| c + noise.sample(rng))
                    .collect(),
            );
            let uniform = UNIFORM_SHARE / NUM_MODELS as f32;
            let action = if rng.random::<f32>() < UNIFORM_SHARE {
                rng.random_range(0..NUM_MODELS)
            } else {
                0
            };
            let propensity = if action == 0 {
                1.0 - UNIFORM_SHARE + uniform
            } else {
                uniform
            };
            let quality =
                (mean_quality[topic][action] + rng.random_range(-0.1..0.1)).clamp(0.0, 1.0);
            let cost_usd = model_cost(action) * rng.random_range(0.5..1.5);
            LoggedEvent {
                embedding,
                w_quality: rng.random(),
                action,
                propensity,
                quality,
                cost_usd,
            }
        })
        .collect()
}

fn normalised(mut values: Vec<f32>) -> Vec<f32> {
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    values.iter_mut().for_each(|v| *v /= norm);
    values
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|error| format!("unavailable ({error})"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU model".to_string())
}
