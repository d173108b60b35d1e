//! `llmroute eval`: trains BaRP and every baseline router on a data set under the same bandit
//! feedback, sweeps the preference, prints the tables and writes the report, plot and JSON.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::baselines::Router;
use llmroute_policy::data::RoutingDataset;
use llmroute_policy::eval::{self, EvalConfig, EvalError, TrainerError};
use llmroute_policy::output::{prepare_folder, replace_files};
use llmroute_policy::policy::{BarpRouter, TrainConfig, train};
use llmroute_policy::reward::Reward;

use super::train::{HyperArgs, resolve_steps};
use crate::workspace::{Workspace, load_dataset, progress_bar};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Data set: llmrouter-9llm, paretobandit-k3, paretobandit-k4.
    #[arg(long, default_value = "llmrouter-9llm")]
    pub dataset: String,
    /// Folder for eval.json, the Markdown report and the quality-vs-cost plots, created if
    /// missing.
    #[arg(long, default_value = "llmroute-eval")]
    pub out: PathBuf,
    /// Also write every row (router, split, w_quality, means, shares) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub hyper: HyperArgs,
}

pub fn run(workspace: &Workspace, args: &EvalArgs) -> Result<()> {
    let barp_config = args.hyper.config()?;
    let dataset = load_dataset(&args.dataset, args.hyper.max_prompts)?;
    // BaRP trains on the training rows of one split at a time, never more than all of them.
    resolve_steps(&barp_config, dataset.train.len())?;
    // Every bandit learner gets the same number of observed outcomes as BaRP on each split
    // (`eval::evaluate` reads BaRP's pull count).
    let config = EvalConfig {
        seed: args.hyper.seed,
        ..EvalConfig::default()
    };
    check_splits(&dataset, &config, args.hyper.max_prompts)?;
    // Checked before the embedding and training, which take minutes on the full data sets.
    let json = args.json.as_deref().map(json_target).transpose()?;
    prepare_folder(&args.out).with_context(|| format!("invalid --out {}", args.out.display()))?;
    if let (Some(path), Some((folder, _))) = (&args.json, json) {
        prepare_folder(folder).with_context(|| format!("invalid --json {}", path.display()))?;
    }

    let embeddings = workspace.embed_dataset(&dataset)?;
    let mut barp = |environment: &mut ReplayEnvironment<'_>, reward: Reward, seed: u64| {
        let run_config = TrainConfig {
            seed,
            ..barp_config.clone()
        }
        .for_prompts(environment.num_prompts());
        let progress = progress_bar(run_config.steps as u64, "training BaRP");
        let (network, summary) = train(environment, reward, &run_config, None, &progress);
        progress.finish_and_clear();
        tracing::info!(
            interactions = summary.interactions,
            final_mean_reward = summary.final_mean_reward,
            "trained BaRP"
        );
        Ok::<Box<dyn Router>, TrainerError>(Box::new(BarpRouter { network }))
    };

    let mut report = eval::evaluate(
        &dataset,
        embeddings.train.view(),
        embeddings.test.view(),
        &config,
        Some(&mut barp),
    )?;
    report.barp = Some(barp_config.clone());

    println!("{}", eval::render_text(&report));
    let written = eval::write_outputs(&report, &args.out)?;
    for path in written {
        println!("wrote {}", path.display());
    }
    if let Some((folder, name)) = json {
        let written = replace_files(folder, &[(name, report.to_json().as_bytes())])?;
        for path in written {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Fails when a split of `dataset` has no training or test prompts, with the fix for
/// --max-prompts when that flag left too few prompts.
fn check_splits(
    dataset: &RoutingDataset,
    config: &EvalConfig,
    max_prompts: Option<usize>,
) -> Result<()> {
    match (eval::check_splits(dataset, config), max_prompts) {
        (Err(EvalError::EmptySplit { split, problem, .. }), Some(max)) => bail!(
            "invalid --max-prompts {max}: in the {split} split of {}, {problem}. Use a larger \
             --max-prompts, or leave it out to keep every prompt",
            dataset.name
        ),
        (result, _) => Ok(result?),
    }
}

/// Splits --json into its folder and file name, failing when the path is a folder.
fn json_target(path: &Path) -> Result<(&Path, &OsStr)> {
    let Some(name) = path.file_name() else {
        bail!("invalid --json {}: pass the path of a file", path.display());
    };
    if path.is_dir() {
        bail!(
            "invalid --json {}: the path is a folder. Pass the path of a file",
            path.display()
        );
    }
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    Ok((folder, name))
}
