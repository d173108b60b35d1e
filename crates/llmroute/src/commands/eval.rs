//! `llmroute eval`: trains BaRP and every baseline router on a data set under the same bandit
//! feedback, sweeps the preference, prints the tables and writes the report, plot and JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::baselines::Router;
use llmroute_policy::eval::{self, EvalConfig, TrainerError};
use llmroute_policy::policy::{BarpRouter, TrainConfig, train};
use llmroute_policy::reward::Reward;

use super::train::HyperArgs;
use crate::workspace::{Workspace, load_dataset, progress_bar};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Data set: llmrouter-9llm, paretobandit-k3, paretobandit-k4.
    #[arg(long, default_value = "llmrouter-9llm")]
    pub dataset: String,
    /// Folder for the Markdown report and the quality-vs-cost plots.
    #[arg(long, default_value = "llmroute-eval")]
    pub out: PathBuf,
    /// Also write every row (router, split, w_quality, means, shares) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub hyper: HyperArgs,
}

pub fn run(workspace: &Workspace, args: &EvalArgs) -> Result<()> {
    let dataset = load_dataset(&args.dataset, args.hyper.max_prompts)?;
    let barp_config = args.hyper.config()?;
    let embeddings = workspace.embed_dataset(&dataset)?;

    // Every bandit learner gets the same number of observed outcomes as BaRP on each split
    // (`eval::evaluate` reads BaRP's pull count).
    let config = EvalConfig {
        seed: args.hyper.seed,
        ..EvalConfig::default()
    };
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
    if let Some(json_path) = &args.json {
        std::fs::write(json_path, report.to_json())
            .with_context(|| format!("failed to write {}", json_path.display()))?;
        println!("wrote {}", json_path.display());
    }
    Ok(())
}
