//! Chooses BaRP's training hyper-parameters on validation splits carved out of a data set's
//! training split, so that the test split plays no part in the choice.
//!
//! `cargo run --release -p llmroute-policy --example tune_barp -- llmrouter-9llm`
//!
//! Two validation splits: `id-val`, a random 15 % of the training prompts, and `ood-val`, the
//! training prompts of tasks that the evaluation's test split does not contain (so they are
//! never test tasks), held out of training entirely. For each candidate it trains on the rest
//! (bandit feedback only) and prints quality at w_quality = 1 and the mean reward over the
//! sweep w_quality ∈ {0, 0.1, …, 1}.

use indicatif::ProgressBar;
use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::baselines::Router;
use llmroute_policy::data::{self, Split};
use llmroute_policy::embedding_cache::embed_cached;
use llmroute_policy::encoder::Encoder;
use llmroute_policy::eval::W_GRID;
use llmroute_policy::policy::{BarpRouter, TrainConfig, train};
use llmroute_policy::reward::{Reward, calibrate_tau};
use llmroute_policy::runtime::init_onnx_runtime;
use ndarray::{Array2, Axis};
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
    let id_split = (order[..cut].to_vec(), order[cut..].to_vec());

    let test_tasks = dataset.test.task_names();
    let train_only = |task: &str| !test_tasks.iter().any(|t| t == task);
    let ood_split = (
        dataset.train.indices_where(|task| !train_only(task)),
        dataset.train.indices_where(train_only),
    );

    let base = TrainConfig::default();
    let candidates = [
        ("default", base.clone()),
        (
            "weight decay 0.1",
            TrainConfig {
                weight_decay: 0.1,
                ..base.clone()
            },
        ),
        (
            "weight decay 0.3",
            TrainConfig {
                weight_decay: 0.3,
                ..base.clone()
            },
        ),
        (
            "weight decay 1",
            TrainConfig {
                weight_decay: 1.0,
                ..base.clone()
            },
        ),
        (
            "weight decay 0.3, seed 8",
            TrainConfig {
                weight_decay: 0.3,
                seed: 8,
                ..base.clone()
            },
        ),
        (
            "weight decay 0.1, seed 8",
            TrainConfig {
                weight_decay: 0.1,
                seed: 8,
                ..base.clone()
            },
        ),
    ];
    println!(
        "{:<24} {:>14} {:>16} {:>14} {:>16}",
        "configuration", "id-val q(w=1)", "id-val reward", "ood-val q(w=1)", "ood-val reward"
    );
    for (label, config) in candidates {
        let mut cells = Vec::new();
        for (fit_rows, validation_rows) in [&id_split, &ood_split] {
            let (quality, reward_mean) = score(
                &dataset.train,
                &embeddings,
                fit_rows,
                validation_rows,
                reward,
                &config,
            );
            cells.push(quality);
            cells.push(reward_mean);
        }
        println!(
            "{label:<24} {:>14.4} {:>16.4} {:>14.4} {:>16.4}",
            cells[0], cells[1], cells[2], cells[3]
        );
    }
    Ok(())
}

/// Trains on `fit_rows` and returns (quality at w = 1, mean reward over the sweep) on
/// `validation_rows`.
fn score(
    split: &Split,
    embeddings: &Array2<f32>,
    fit_rows: &[usize],
    validation_rows: &[usize],
    reward: Reward,
    config: &TrainConfig,
) -> (f64, f64) {
    let fit = split.subset(fit_rows);
    let validation = split.subset(validation_rows);
    let fit_embeddings = embeddings.select(Axis(0), fit_rows);
    let validation_embeddings = embeddings.select(Axis(0), validation_rows);
    let mut environment =
        ReplayEnvironment::new(fit_embeddings.view(), fit.quality.view(), fit.cost.view());
    let (network, _) = train(
        &mut environment,
        reward,
        config,
        None,
        &ProgressBar::hidden(),
    );
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
    (quality_at_one, reward_sum / W_GRID.len() as f64)
}
