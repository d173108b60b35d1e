//! Shared state of one command: the cache folder, the assets in it, and loading of the encoder
//! and data set embeddings that several commands need.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llmroute_policy::assets::{self, Assets};
use llmroute_policy::data::RoutingDataset;
use llmroute_policy::embedding_cache::embed_cached;
use llmroute_policy::encoder::Encoder;
use llmroute_policy::runtime::init_onnx_runtime;
use ndarray::Array2;
use ort::environment::Environment;

pub struct Workspace {
    pub cache: PathBuf,
}

/// Embeddings of both splits of a data set, from one encoder.
pub struct DatasetEmbeddings {
    pub train: Array2<f32>,
    pub test: Array2<f32>,
}

impl Workspace {
    /// Uses `cache`, the --cache folder, or else the default cache folder
    /// ([`assets::default_cache_dir`]).
    pub fn new(cache: Option<PathBuf>) -> Result<Self> {
        let cache = match cache {
            Some(cache) => cache,
            None => {
                warn_relative_cache_variables();
                assets::default_cache_dir()?
            }
        };
        Ok(Self { cache })
    }

    /// Returns the assets, running the (idempotent) set-up first when any is missing, so that
    /// a first `llmroute eval` works without a separate `llmroute setup`.
    pub fn assets(&self) -> Result<Assets> {
        match Assets::locate(&self.cache) {
            Ok(assets) => Ok(assets),
            Err(missing) => {
                tracing::info!(reason = %missing, cache = %self.cache.display(), "running set-up");
                assets::setup(&self.cache).with_context(|| match &missing {
                    assets::AssetError::Missing { path } => format!(
                        "{} is missing, and the set-up that would restore it failed",
                        path.display()
                    ),
                    other => format!("{other}, and the set-up that would restore it failed"),
                })
            }
        }
    }

    pub fn onnx_runtime(&self) -> Result<Environment> {
        let assets = self.assets()?;
        Ok(init_onnx_runtime(&assets.onnx_runtime)?)
    }

    /// Loads the encoder with `threads` intra-op threads.
    pub fn encoder(&self, threads: usize) -> Result<Encoder> {
        let assets = self.assets()?;
        init_onnx_runtime(&assets.onnx_runtime)?;
        Encoder::load(&assets, threads).context("failed to load the prompt encoder")
    }

    /// Loads the encoder for bulk embedding, with one intra-op thread per core.
    pub fn bulk_encoder(&self) -> Result<Encoder> {
        self.encoder(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Embeds one split of `dataset`, reading and filling the embedding cache.
    pub fn embed_split(
        &self,
        encoder: &mut Encoder,
        dataset: &RoutingDataset,
        split_name: &str,
        prompts: &[String],
    ) -> Result<Array2<f32>> {
        let cache_dir = self.cache.join("embeddings");
        let progress = progress_bar(
            prompts.len() as u64,
            &format!("embedding {} {split_name}", dataset.name),
        );
        let label = format!("{}-{split_name}", dataset.name);
        let embeddings = embed_cached(encoder, &cache_dir, &label, prompts, &progress)?;
        progress.finish_and_clear();
        Ok(embeddings)
    }

    /// Embeds both splits of `dataset`.
    pub fn embed_dataset(&self, dataset: &RoutingDataset) -> Result<DatasetEmbeddings> {
        let mut encoder = self.bulk_encoder()?;
        let train = self.embed_split(&mut encoder, dataset, "train", &dataset.train.prompts)?;
        let test = self.embed_split(&mut encoder, dataset, "test", &dataset.test.prompts)?;
        Ok(DatasetEmbeddings { train, test })
    }
}

/// Logs a warning for each cache variable that [`assets::default_cache_dir`] skips because
/// its value is a relative path, up to the first variable that it uses. An empty value counts
/// as unset, as in the XDG base directory specification.
fn warn_relative_cache_variables() {
    for name in [assets::CACHE_ENV, "XDG_CACHE_HOME"] {
        let Some(value) = std::env::var_os(name).filter(|value| !value.is_empty()) else {
            continue;
        };
        let path = Path::new(&value);
        if path.is_absolute() {
            return;
        }
        tracing::warn!(
            variable = name,
            value = %path.display(),
            "ignoring a relative cache folder; set an absolute path or pass --cache"
        );
    }
}

/// Loads a data set by name, keeping at most `max_prompts` prompts per split, evenly spaced so
/// that every task stays represented. `None` keeps every prompt.
pub fn load_dataset(name: &str, max_prompts: Option<usize>) -> Result<RoutingDataset> {
    let mut dataset = llmroute_policy::data::load(name)?;
    if let Some(max) = max_prompts {
        anyhow::ensure!(
            max >= 1,
            "invalid --max-prompts 0: keep at least one prompt per split"
        );
        dataset.train = dataset
            .train
            .subset(&evenly_spaced(dataset.train.len(), max));
        dataset.test = dataset.test.subset(&evenly_spaced(dataset.test.len(), max));
    }
    Ok(dataset)
}

/// `min(count, max)` indices of `0..count`, evenly spaced.
fn evenly_spaced(count: usize, max: usize) -> Vec<usize> {
    let keep = count.min(max);
    (0..keep).map(|i| i * count / keep).collect()
}

/// Creates a progress bar on stderr. indicatif draws nothing when stderr is not a terminal.
pub fn progress_bar(length: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{msg:>32} [{bar:30}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}
