//! Trains the learning loop's first candidate on real recorded outcomes and scores it with the
//! data set's full information. A route starts with the pricing prior and the route's
//! exploration. This example logs `events` decisions of that prior on training prompts with
//! preferences w_q ~ U[0, 1], as sidecars would: the chosen model's recorded quality and cost,
//! nothing else. It then trains candidates as the learning loop does (`train_off_policy` from
//! the prior on the oldest 70 %, the other 30 % held out for the gate) with several step
//! counts. Each candidate's greedy decisions are scored on the test split at w_q ∈ {0, 0.1, …,
//! 1}, where every model's outcome is known. Printed per step count: the true mean reward over
//! the sweep, the quality at w_q = 1, the gate's doubly robust estimate of the difference to
//! the prior, and the training time.
//!
//! `cargo run --release -p llmroute-policy --example offpolicy_real -- NAME [--events N]
//! [--exploration sample|epsilon] [--steps 250,500,...] [--seed S]`

mod common;

use std::process::ExitCode;
use std::time::Instant;

use llmroute_api::config::Exploration;
use llmroute_policy::offpolicy::{
    ActionProbabilities, EvaluationConfig, Explored, LoggedEvent, OffPolicyConfig,
    compare_policies, train_off_policy,
};
use llmroute_policy::policy::PolicyNetwork;
use llmroute_policy::policy::prior::{PricedModel, pricing_prior};
use llmroute_policy::reward::Reward;
use ndarray::{Array2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Share of the logged events held out for the gate, as `holdoutFraction` defaults to.
const HOLDOUT_FRACTION: f64 = 0.3;
/// ε of the `epsilon` exploration, as the route examples of docs/learning.md set it.
const EPSILON: f64 = 0.1;

struct Options {
    dataset: String,
    events: usize,
    exploration: Exploration,
    steps: Vec<usize>,
    seed: u64,
}

fn main() -> ExitCode {
    match parse_options().and_then(|options| run(&options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_options() -> Result<Options, Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let dataset = arguments
        .next()
        .ok_or("missing data set name; pass llmrouter-9llm, paretobandit-k3 or paretobandit-k4")?;
    let mut options = Options {
        dataset,
        events: 10_000,
        exploration: Exploration::EpsilonGreedy { epsilon: EPSILON },
        steps: vec![250, 500, 1_000, 1_500, 3_000, 6_000],
        seed: 7,
    };
    while let Some(flag) = arguments.next() {
        let value = arguments
            .next()
            .ok_or_else(|| format!("missing value after {flag}"))?;
        match flag.as_str() {
            "--events" => {
                options.events = value
                    .parse()
                    .ok()
                    .filter(|events| *events >= 20)
                    .ok_or_else(|| format!("invalid --events {value:?}; pass 20 or more"))?;
            }
            "--exploration" => {
                options.exploration = match value.as_str() {
                    "sample" => Exploration::Sample,
                    "epsilon" => Exploration::EpsilonGreedy { epsilon: EPSILON },
                    _ => {
                        return Err(format!(
                            "invalid --exploration {value:?}; pass sample or epsilon"
                        )
                        .into());
                    }
                };
            }
            "--steps" => {
                options.steps = value
                    .split(',')
                    .map(|steps| steps.parse::<usize>().ok().filter(|steps| *steps > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        format!("invalid --steps {value:?}; pass positive counts such as 500,1500")
                    })?;
            }
            "--seed" => {
                options.seed = value
                    .parse()
                    .map_err(|_| format!("invalid --seed {value:?}; pass a whole number"))?;
            }
            _ => {
                return Err(format!(
                    "unknown option {flag}; use --events, --exploration, --steps or --seed"
                )
                .into());
            }
        }
    }
    Ok(options)
}

fn run(options: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let dataset = llmroute_policy::data::load(&options.dataset)?;
    let mut embedder = common::Embedder::load()?;
    let train_embeddings = embedder.embed(&dataset, "train", &dataset.train)?;
    let test_embeddings = embedder.embed(&dataset, "test", &dataset.test)?;
    let reward = common::training_reward(&dataset)?;
    let models: Vec<PricedModel> = dataset
        .prices
        .iter()
        .map(|price| PricedModel {
            name: price.model.clone(),
            input_usd_per_million_tokens: price.input_usd_per_million_tokens,
            output_usd_per_million_tokens: price.output_usd_per_million_tokens,
        })
        .collect();
    let (prior, _) = pricing_prior(
        &models,
        "prior",
        "example",
        train_embeddings.ncols(),
        f64::from(reward.tau),
    );

    // Bandit feedback: the prior's draws on random training prompts, the drawn model's outcome.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let explored = Explored {
        policy: &prior,
        exploration: options.exploration,
    };
    let mut logged = Vec::with_capacity(options.events);
    for _ in 0..options.events {
        let row = rng.random_range(0..dataset.train.len());
        let w_quality: f32 = rng.random();
        let embedding = train_embeddings.row(row);
        let probabilities =
            explored.action_probabilities(embedding.insert_axis(Axis(0)), &[w_quality]);
        let action = draw(probabilities.row(0).as_slice().expect("a row"), &mut rng);
        logged.push(LoggedEvent {
            embedding: embedding.to_vec(),
            w_quality,
            action,
            propensity: probabilities[[0, action]],
            quality: dataset.train.quality[[row, action]],
            cost_usd: dataset.train.cost[[row, action]],
        });
    }
    let holdout =
        ((logged.len() as f64 * HOLDOUT_FRACTION).ceil() as usize).clamp(1, logged.len() - 1);
    let (train_part, held_out) = logged.split_at(logged.len() - holdout);

    println!(
        "data set {}, {} logged events ({} for training, {} held out), exploration {:?}, seed {}",
        dataset.name,
        logged.len(),
        train_part.len(),
        held_out.len(),
        options.exploration,
        options.seed
    );
    println!(
        "machine: {} logical cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (prior_reward, prior_quality) = score(&prior, &test_embeddings, &dataset.test, reward);
    println!(
        "\n{:>8} {:>12} {:>12} {:>24} {:>10}",
        "steps", "test reward", "quality@1", "gate DR difference", "train s"
    );
    println!(
        "{:>8} {:>12.4} {:>12.4} {:>24} {:>10}",
        "prior", prior_reward, prior_quality, "", ""
    );
    for &steps in &options.steps {
        let config = OffPolicyConfig {
            seed: options.seed,
            steps,
            ..OffPolicyConfig::default()
        };
        let started = Instant::now();
        let (candidate, _) = train_off_policy(&prior, train_part, reward, &config)?;
        let seconds = started.elapsed().as_secs_f64();
        let gate = compare_policies(
            &Explored {
                policy: &candidate,
                exploration: options.exploration,
            },
            &explored,
            held_out,
            reward,
            &EvaluationConfig::default(),
        )?;
        let (test_reward, quality) = score(&candidate, &test_embeddings, &dataset.test, reward);
        println!(
            "{:>8} {:>12.4} {:>12.4} {:>24} {:>10.1}",
            steps,
            test_reward,
            quality,
            format!(
                "{:+.4} [{:+.4}, {:+.4}]",
                gate.difference.dr.mean, gate.difference.dr.ci_low, gate.difference.dr.ci_high
            ),
            seconds
        );
    }
    Ok(())
}

/// Draws an index from `probabilities`.
fn draw(probabilities: &[f32], rng: &mut ChaCha8Rng) -> usize {
    let mut left: f32 = rng.random();
    for (index, p) in probabilities.iter().enumerate() {
        if left < *p {
            return index;
        }
        left -= p;
    }
    probabilities.len() - 1
}

/// Returns the mean reward of `policy`'s greedy decisions on `split` over w_q ∈ {0, 0.1, …, 1},
/// and the mean quality of those decisions at w_q = 1.
fn score(
    policy: &PolicyNetwork,
    embeddings: &Array2<f32>,
    split: &llmroute_policy::data::Split,
    reward: Reward,
) -> (f64, f64) {
    let greedy = Explored {
        policy,
        exploration: Exploration::Greedy,
    };
    let mut total = 0.0;
    let mut quality_at_one = 0.0;
    for step in 0..=10 {
        let w_quality = step as f32 / 10.0;
        let weights = vec![w_quality; split.len()];
        let probabilities = greedy.action_probabilities(embeddings.view(), &weights);
        let mut sum = 0.0;
        let mut quality = 0.0;
        for (row, probabilities) in probabilities.rows().into_iter().enumerate() {
            let action = probabilities
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(index, _)| index);
            let (q, c) = (split.quality[[row, action]], split.cost[[row, action]]);
            sum += f64::from(reward.reward(w_quality, q, c));
            quality += f64::from(q);
        }
        total += sum / split.len() as f64;
        if step == 10 {
            quality_at_one = quality / split.len() as f64;
        }
    }
    (total / 11.0, quality_at_one)
}
