//! Chooses BaRP's training hyper-parameters on a validation split carved out of a data set's
//! training split, so that the test split plays no part in the choice.
//!
//! `cargo run --release -p llmroute-policy --example tune_barp -- llmrouter-9llm`
//!
//! For each candidate configuration it trains on 85 % of the training prompts (bandit feedback
//! only) and prints the validation quality at w_quality = 1 and the mean reward over the sweep
//! w_quality ∈ {0, 0.1, …, 1}.

use indicatif::ProgressBar;
use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::baselines::Router;
use llmroute_policy::data;
use llmroute_policy::embedding_cache::embed_cached;
use llmroute_policy::encoder::Encoder;
use llmroute_policy::eval::W_GRID;
use llmroute_policy::policy::{BarpRouter, TrainConfig, train};
use llmroute_policy::reward::{Reward, calibrate_tau};
use llmroute_policy::runtime::init_onnx_runtime;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "llmrouter-9llm".to_string());
    let dataset = data::load(&name)?;
    let cache = default_cache_dir()?;
    let assets = Assets::locate(&cache)?;
    init_onnx_runtime(&assets.onnx_runtime)?;
    let mut encoder = Encoder::load(&assets, 2)?;
    let embeddings = embed_cached(
        &mut encoder,
        &cache.join("embeddings"),
        &format!("{name}-train"),
        &dataset.train.prompts,
        &ProgressBar::hidden(),
    )?;
    let reward =
        Reward::new(calibrate_tau(dataset.train.cost.iter().copied(), 0.95).ok_or("no cost")?);

    let mut order: Vec<usize> = (0..dataset.train.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(99));
    let cut = order.len() * 85 / 100;
    let (fit_rows, validation_rows) = order.split_at(cut);
    let fit = dataset.train.subset(fit_rows);
    let validation = dataset.train.subset(validation_rows);
    let fit_embeddings = embeddings.select(ndarray::Axis(0), fit_rows);
    let validation_embeddings = embeddings.select(ndarray::Axis(0), validation_rows);

    let base = TrainConfig::default();
    let mut candidates: Vec<(String, TrainConfig)> = Vec::new();
    for seed in [7, 8, 9] {
        for (label, steps, batch_size) in [
            ("3000 x 64", 3000, 64),
            ("10000 x 64", 10_000, 64),
            ("2500 x 256", 2500, 256),
        ] {
            let config = TrainConfig {
                seed,
                steps,
                batch_size,
                ..base.clone()
            };
            candidates.push((format!("{label}, seed {seed}"), config));
        }
    }
    println!(
        "{:<36} {:>10} {:>12} {:>8}",
        "configuration", "q at w=1", "mean reward", "seconds"
    );
    for (label, config) in candidates {
        let started = std::time::Instant::now();
        let mut environment =
            ReplayEnvironment::new(fit_embeddings.view(), fit.quality.view(), fit.cost.view());
        let (network, _) = train(
            &mut environment,
            reward,
            &config,
            None,
            &ProgressBar::hidden(),
        );
        let seconds = started.elapsed().as_secs_f64();
        let router = BarpRouter { network };
        let mut reward_sum = 0.0;
        let mut quality_at_one = 0.0;
        for &w in &W_GRID {
            let choices = router.route(validation_embeddings.view(), w);
            let mut total = 0.0;
            let mut quality = 0.0;
            for (i, &k) in choices.iter().enumerate() {
                let (q, c) = (validation.quality[[i, k]], validation.cost[[i, k]]);
                total += reward.reward(w, q, c) as f64;
                quality += q as f64;
            }
            reward_sum += total / choices.len() as f64;
            if w == 1.0 {
                quality_at_one = quality / choices.len() as f64;
            }
        }
        println!(
            "{label:<36} {quality_at_one:>10.4} {:>12.4} {seconds:>8.1}",
            reward_sum / W_GRID.len() as f64
        );
    }
    Ok(())
}
