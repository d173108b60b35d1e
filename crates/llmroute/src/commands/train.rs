//! `llmroute train`: trains a BaRP policy on a data set's training split from bandit feedback
//! and writes `policy.onnx` with `policy.json` beside it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::output::{prepare_folder, replace_files};
use llmroute_policy::policy::metadata::POLICY_FORMAT;
use llmroute_policy::policy::train::DEFAULT_INTERACTIONS_PER_PROMPT;
use llmroute_policy::policy::{
    PolicyManifest, PolicyMetadata, TrainConfig, TrainingRecord, to_onnx_bytes, train,
};
use llmroute_policy::reward::{DEFAULT_TAU_PERCENTILE, Reward, calibrate_tau};
use sha2::{Digest, Sha256};

use crate::args::{parse_count, parse_u64};
use crate::workspace::{Workspace, load_dataset, progress_bar};

/// Maximum --batch-size. Memory grows with the batch: its embeddings alone take 1.5 KiB per
/// interaction (384 f32 values), so 65,536 interactions take 96 MiB.
pub const MAX_BATCH_SIZE: usize = 65_536;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Data set to train on (its training split): llmrouter-9llm, paretobandit-k3,
    /// paretobandit-k4.
    #[arg(long, default_value = "llmrouter-9llm")]
    pub dataset: String,
    /// Folder to write policy.onnx and policy.json into, created if missing.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Version label written into the policy; must not be empty.
    #[arg(long, default_value = "v1")]
    pub version: String,
    #[command(flatten)]
    pub hyper: HyperArgs,
}

/// Training hyper-parameters shared by `train` and `eval`. The integer flags accept negative
/// numbers only so that the parser can reject them by name.
#[derive(Debug, Clone, clap::Args)]
pub struct HyperArgs {
    /// Seed of every random choice of training.
    #[arg(
        long,
        default_value_t = TrainConfig::default().seed,
        value_parser = parse_u64,
        allow_negative_numbers = true
    )]
    pub seed: u64,
    /// Gradient steps of REINFORCE [default: from --interactions-per-prompt].
    #[arg(
        long,
        conflicts_with = "interactions_per_prompt",
        value_parser = parse_count,
        allow_negative_numbers = true
    )]
    pub steps: Option<usize>,
    /// Sets the gradient steps from the training set's size: each training prompt is drawn
    /// this many times on average.
    #[arg(
        long,
        default_value_t = DEFAULT_INTERACTIONS_PER_PROMPT,
        value_parser = parse_count,
        allow_negative_numbers = true
    )]
    pub interactions_per_prompt: usize,
    /// Bandit interactions per gradient step, from 1 to 65536.
    #[arg(
        long,
        default_value_t = TrainConfig::default().batch_size,
        value_parser = parse_count,
        allow_negative_numbers = true
    )]
    pub batch_size: usize,
    /// Cost scale τ in USD per call, a positive number [default: the 95th percentile of
    /// training costs].
    #[arg(long, allow_negative_numbers = true)]
    pub tau: Option<f32>,
    /// Keep at most this many prompts per split, evenly spaced (for quick runs and tests).
    #[arg(long, value_parser = parse_count, allow_negative_numbers = true)]
    pub max_prompts: Option<usize>,
}

impl HyperArgs {
    /// Validates the flags and returns the training configuration. With
    /// --interactions-per-prompt the step count is set later, by [`resolve_steps`].
    pub fn config(&self) -> Result<TrainConfig> {
        if self.batch_size == 0 {
            bail!("invalid --batch-size 0: use at least 1");
        }
        if self.batch_size > MAX_BATCH_SIZE {
            bail!(
                "invalid --batch-size {}: use at most {MAX_BATCH_SIZE}",
                self.batch_size
            );
        }
        let defaults = TrainConfig::default();
        let (steps, interactions_per_prompt) = match self.steps {
            Some(0) => bail!("invalid --steps 0: use at least 1"),
            Some(steps) if steps.checked_mul(self.batch_size).is_none() => bail!(
                "invalid --steps {steps}: {steps} steps of {} interactions exceed the maximum \
                 interaction count {}; use fewer steps",
                self.batch_size,
                usize::MAX
            ),
            Some(steps) => (steps, None),
            None if self.interactions_per_prompt == 0 => {
                bail!("invalid --interactions-per-prompt 0: use at least 1")
            }
            None => (defaults.steps, Some(self.interactions_per_prompt)),
        };
        Ok(TrainConfig {
            seed: self.seed,
            steps,
            interactions_per_prompt,
            batch_size: self.batch_size,
            ..defaults
        })
    }

    /// Returns the reward of this run: a pinned τ, or τ calibrated from every training cost.
    pub fn reward(&self, costs: impl IntoIterator<Item = f32>) -> Result<Reward> {
        let tau = match self.tau {
            Some(tau) if tau > 0.0 && tau.is_finite() => tau,
            Some(tau) => {
                bail!("invalid --tau {tau}: the cost scale must be a positive number of USD")
            }
            None => calibrate_tau(costs, DEFAULT_TAU_PERCENTILE).context(
                "cannot calibrate the cost scale τ: every training cost is zero; pass --tau USD",
            )?,
        };
        Ok(Reward::new(tau))
    }
}

/// Returns `config` with its steps set for `prompts` training prompts
/// ([`TrainConfig::for_prompts`]), failing when the run's interaction count overflows.
pub fn resolve_steps(config: &TrainConfig, prompts: usize) -> Result<TrainConfig> {
    if let Some(per_prompt) = config.interactions_per_prompt {
        let batch = config.batch_size.max(1);
        let fits = prompts
            .checked_mul(per_prompt)
            .and_then(|draws| draws.div_ceil(batch).checked_mul(batch))
            .is_some();
        if !fits {
            bail!(
                "invalid --interactions-per-prompt {per_prompt}: {prompts} training prompts \
                 drawn {per_prompt} times each exceed the maximum interaction count {}; use a \
                 smaller value",
                usize::MAX
            );
        }
    }
    Ok(config.for_prompts(prompts))
}

/// Fails when `version` cannot label a policy.
fn check_version(version: &str) -> Result<()> {
    if version.trim().is_empty() {
        bail!("invalid --version {version:?}: pass a non-empty label such as v2");
    }
    Ok(())
}

pub fn run(workspace: &Workspace, args: &TrainArgs) -> Result<()> {
    check_version(&args.version)?;
    let config = args.hyper.config()?;
    let dataset = load_dataset(&args.dataset, args.hyper.max_prompts)?;
    let config = resolve_steps(&config, dataset.train.len())?;
    let reward = args.hyper.reward(dataset.train.cost.iter().copied())?;
    // Checked before the embedding and training, which take minutes on the full data sets.
    prepare_folder(&args.out).with_context(|| format!("invalid --out {}", args.out.display()))?;

    let mut encoder = workspace.bulk_encoder()?;
    let embeddings =
        workspace.embed_split(&mut encoder, &dataset, "train", &dataset.train.prompts)?;

    let started = Instant::now();
    let mut bandit = ReplayEnvironment::new(
        embeddings.view(),
        dataset.train.quality.view(),
        dataset.train.cost.view(),
    );
    let progress = progress_bar(config.steps as u64, "training BaRP");
    let (network, summary) = train(&mut bandit, reward, &config, None, &progress);
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let metadata = PolicyMetadata {
        format: POLICY_FORMAT.to_string(),
        version: args.version.clone(),
        models: dataset.models.clone(),
        encoder: encoder.digest().to_string(),
        embedding_dim: network.shape.embedding_dim,
        cost_scale_usd: reward.tau,
    };
    let record = TrainingRecord::new(
        &dataset.name,
        "train",
        dataset.train.len(),
        &config,
        &summary,
        seconds,
    );
    let (onnx_path, manifest_path) = write_policy(&args.out, &network, metadata, record)?;

    println!(
        "trained {} on {} ({} prompts, {} bandit interactions, τ = ${:.3e}) in {seconds:.1} s",
        args.version,
        dataset.name,
        dataset.train.len(),
        summary.interactions,
        reward.tau
    );
    println!(
        "mean reward over the last tenth of training: {:.4}",
        summary.final_mean_reward
    );
    println!(
        "wrote {} and {}",
        onnx_path.display(),
        manifest_path.display()
    );
    Ok(())
}

/// Writes `policy.onnx` and `policy.json` into `out`, replacing any previous pair together
/// ([`replace_files`]): on an error `out` keeps its previous pair and no temporary file.
pub fn write_policy(
    out: &Path,
    network: &llmroute_policy::policy::PolicyNetwork,
    metadata: PolicyMetadata,
    record: TrainingRecord,
) -> Result<(PathBuf, PathBuf)> {
    let bytes = to_onnx_bytes(network, &metadata);
    let manifest = PolicyManifest {
        metadata,
        sha256: hex::encode(Sha256::digest(&bytes)),
        file: "policy.onnx".to_string(),
        training: Some(record),
    };
    let manifest_text = serde_json::to_string_pretty(&manifest)?;
    // policy.json goes last: a reader that finds a new manifest also finds its ONNX file.
    let written = replace_files(
        out,
        &[
            ("policy.onnx", &bytes),
            ("policy.json", manifest_text.as_bytes()),
        ],
    )?;
    let [onnx_path, manifest_path] =
        <[PathBuf; 2]>::try_from(written).expect("replace_files returns one path per file");
    Ok((onnx_path, manifest_path))
}
