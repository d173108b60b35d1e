//! Set-up shared by the examples that train BaRP on a data set: ONNX Runtime and the encoder
//! from `llmroute setup`'s cache, embeddings through the on-disk embedding cache, and the
//! data set's reward.

use std::path::PathBuf;

use indicatif::ProgressBar;
use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::data::{RoutingDataset, Split};
use llmroute_policy::embedding_cache::embed_cached;
use llmroute_policy::encoder::Encoder;
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
