//! Set-up shared by the examples that train BaRP on a data set: ONNX Runtime and the encoder
//! from `llmroute setup`'s cache, embeddings through the on-disk embedding cache, the data
//! set's reward, `llmroute eval`'s splits and summary statistics over seeds.

use std::path::PathBuf;

use indicatif::ProgressBar;
use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::data::{RoutingDataset, Split};
use llmroute_policy::embedding_cache::embed_cached;
use llmroute_policy::encoder::Encoder;
use llmroute_policy::eval::{held_out_tasks, is_held_out};
use llmroute_policy::reward::{DEFAULT_TAU_PERCENTILE, Reward, calibrate_tau};
use llmroute_policy::runtime::init_onnx_runtime;
use ndarray::Array2;

/// The encoder of `llmroute setup`, with the folder of its embedding cache.
pub struct Embedder {
    encoder: Encoder,
    cache_dir: PathBuf,
}

impl Embedder {
    /// Loads ONNX Runtime and the encoder (two intra-op threads) from the default cache.
    pub fn load() -> Result<Self, Box<dyn std::error::Error>> {
        let cache = default_cache_dir()?;
        let assets = Assets::locate(&cache)?;
        init_onnx_runtime(&assets.onnx_runtime)?;
        Ok(Self {
            encoder: Encoder::load(&assets, 2)?,
            cache_dir: cache.join("embeddings"),
        })
    }

    /// Embeds `split` of `dataset`, named `suffix` (`train` or `test`) in the cache, so a
    /// second run reads the embeddings back instead of encoding again.
    pub fn embed(
        &mut self,
        dataset: &RoutingDataset,
        suffix: &str,
        split: &Split,
    ) -> Result<Array2<f32>, Box<dyn std::error::Error>> {
        let label = format!("{}-{suffix}", dataset.name);
        let embeddings = embed_cached(
            &mut self.encoder,
            &self.cache_dir,
            &label,
            &split.prompts,
            &ProgressBar::hidden(),
        )?;
        Ok(embeddings)
    }
}

/// Returns the reward with τ calibrated as `llmroute eval` does: the 95th percentile of every
/// per-call cost of the training split.
pub fn training_reward(dataset: &RoutingDataset) -> Result<Reward, Box<dyn std::error::Error>> {
    let costs = dataset.train.cost.iter().copied();
    let tau = calibrate_tau(costs, DEFAULT_TAU_PERCENTILE).ok_or_else(|| {
        format!(
            "{}: cannot calibrate τ, because the 95th percentile of the training costs is \
                 not positive",
            dataset.name
        )
    })?;
    Ok(Reward::new(tau))
}

/// The rows of one of `llmroute eval`'s splits of a data set.
#[allow(dead_code, reason = "tune_barp builds its own validation splits")]
pub struct EvalSplit {
    /// `"id"` or `"ood"`.
    pub name: &'static str,
    pub train_rows: Vec<usize>,
    pub test_rows: Vec<usize>,
    /// Held-out tasks, empty for the `id` split.
    pub held_out: Vec<String>,
}

/// Returns the `id` split (every training and test prompt) and the `ood` split (training
/// without the held-out tasks, testing on their test prompts) of `dataset`, as `llmroute eval`
/// builds them.
#[allow(dead_code, reason = "tune_barp builds its own validation splits")]
pub fn eval_splits(dataset: &RoutingDataset) -> Result<[EvalSplit; 2], Box<dyn std::error::Error>> {
    let held_out: Vec<String> = held_out_tasks(&dataset.name)
        .ok_or_else(|| format!("{} has no held-out tasks for the ood split", dataset.name))?
        .iter()
        .map(|task| task.to_string())
        .collect();
    Ok([
        EvalSplit {
            name: "id",
            train_rows: (0..dataset.train.len()).collect(),
            test_rows: (0..dataset.test.len()).collect(),
            held_out: Vec::new(),
        },
        EvalSplit {
            name: "ood",
            train_rows: dataset
                .train
                .indices_where(|task| !is_held_out(task, &held_out)),
            test_rows: dataset
                .test
                .indices_where(|task| is_held_out(task, &held_out)),
            held_out,
        },
    ])
}

/// Returns the mean and the sample standard deviation of `values` (0 for fewer than two).
#[allow(dead_code, reason = "per_task reports means only")]
pub fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}
