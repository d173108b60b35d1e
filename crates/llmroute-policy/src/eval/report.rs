//! Rendering of an [`EvalReport`]: terminal tables, the Markdown report and the output folder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{EvalError, EvalReport, EvalRow};
use crate::output::replace_files;
use crate::policy::TrainConfig;

/// Sweep points shown in the terminal tables.
const TEXT_POINTS: [f32; 3] = [0.0, 0.5, 1.0];

/// Maximum width of a router or model name in terminal tables, so rows fit in 100 columns.
const NAME_WIDTH: usize = 40;

/// Comparison of one router with the targets on one split, from
/// [`summarise_against_targets`].
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSummary {
    pub split: String,
    pub router: String,
    /// Mean quality of the router at `w_quality = 1`.
    pub quality_at_w1: f64,
    /// Single model with the highest mean test quality (ties to the cheaper one).
    pub best_single_model: String,
    pub best_single_quality: f64,
    /// Mean USD per call of the best single model.
    pub best_single_cost: f64,
    pub oracle_quality_at_w1: Option<f64>,
    /// Sweep points where the router's mean reward is strictly above both `mlp-full-info` and
    /// `knn-full-info`.
    pub points_beating_full_info: usize,
    /// Sweep points compared.
    pub points: usize,
    /// The lowest-cost sweep point whose quality is at least the best single model's:
    /// `(w_quality, mean cost, cost / best single model's cost)`.
    pub cheapest_match: Option<(f32, f64, f64)>,
}

/// Compares `router` with the best single model, the oracle and both full-information routers
/// on every split. Returns nothing for a split where `router` has no rows.
pub fn summarise_against_targets(report: &EvalReport, router: &str) -> Vec<TargetSummary> {
    let mut summaries = Vec::new();
    for split in &report.splits {
        let split = split.name.as_str();
        let rows = report.rows_of(router, split);
        let Some(at_w1) = rows.iter().find(|row| row.w_quality == 1.0) else {
            continue;
        };
        let Some(best_single) = best_single_model(report, split) else {
            continue;
        };
        let oracle_quality_at_w1 = report
            .rows_of("oracle", split)
            .into_iter()
            .find(|row| row.w_quality == 1.0)
            .map(|row| row.mean_quality);
        let reward_at = |id: &str, w: f32| {
            report
                .rows_of(id, split)
                .into_iter()
                .find(|row| row.w_quality == w)
                .map(|row| row.mean_reward)
        };
        let points_beating_full_info = rows
            .iter()
            .filter(|row| {
                let beats = |id: &str| {
                    reward_at(id, row.w_quality).is_some_and(|other| row.mean_reward > other)
                };
                beats("mlp-full-info") && beats("knn-full-info")
            })
            .count();
        let cheapest_match = rows
            .iter()
            .filter(|row| row.mean_quality >= best_single.mean_quality)
            .min_by(|a, b| a.mean_cost.total_cmp(&b.mean_cost))
            .map(|row| {
                let fraction = if best_single.mean_cost > 0.0 {
                    row.mean_cost / best_single.mean_cost
                } else {
                    f64::NAN
                };
                (row.w_quality, row.mean_cost, fraction)
            });
        summaries.push(TargetSummary {
            split: split.to_string(),
            router: router.to_string(),
            quality_at_w1: at_w1.mean_quality,
            best_single_model: best_single.router.trim_start_matches("single:").to_string(),
            best_single_quality: best_single.mean_quality,
            best_single_cost: best_single.mean_cost,
            oracle_quality_at_w1,
            points_beating_full_info,
            points: rows.len(),
            cheapest_match,
        });
    }
    summaries
}

fn best_single_model<'r>(report: &'r EvalReport, split: &str) -> Option<&'r EvalRow> {
    report
        .rows
        .iter()
        .filter(|row| {
            row.split == split && row.router.starts_with("single:") && row.w_quality == 1.0
        })
        .max_by(|a, b| {
            a.mean_quality
                .total_cmp(&b.mean_quality)
                .then(b.mean_cost.total_cmp(&a.mean_cost))
        })
}

fn truncate(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        name.to_string()
    } else {
        let kept: String = name.chars().take(width - 1).collect();
        format!("{kept}…")
    }
}

/// Cost label with the estimate marker when the data set's costs are estimates.
fn cost_heading(report: &EvalReport) -> &'static str {
    if report.costs_are_estimates {
        "USD/call (EST.)"
    } else {
        "USD/call"
    }
}

/// Formats the most-used model of a row (without its provider prefix) and its share as
/// `name 53%`.
fn top_share(row: &EvalRow, width: usize) -> String {
    let top = row
        .shares
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)));
    match top {
        // The provider prefix (`google/`, `meta-llama/`) repeats across rows, so drop it here.
        Some((model, share)) => {
            let short = model.rsplit('/').next().unwrap_or(model);
            format!("{} {:>3.0}%", truncate(short, width), share * 100.0)
        }
        None => String::new(),
    }
}

/// Renders the terminal tables: per split, every router at `w_quality ∈ {0, 0.5, 1}`, then the
/// full sweep of `barp` when it was evaluated. Lines stay within 100 columns.
pub fn render_text(report: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "data set {}: {} models, τ = {:.6} USD",
        report.dataset,
        report.models.len(),
        report.tau_usd
    );
    if report.costs_are_estimates {
        let _ = writeln!(
            out,
            "costs are ESTIMATES (no recorded token counts); see the report for the method"
        );
    }
    for split in &report.splits {
        let _ = writeln!(
            out,
            "\nsplit {}: {} train prompts, {} test prompts",
            split.name, split.train_prompts, split.test_prompts
        );
        if !split.held_out_tasks.is_empty() {
            let _ = writeln!(out, "held-out tasks: {}", split.held_out_tasks.join(", "));
        }
        for &w in &TEXT_POINTS {
            let _ = writeln!(out, "\n  w_quality = {w:.1}");
            let _ = writeln!(
                out,
                "  {:<NAME_WIDTH$} {:>7} {:>15} {:>7}  most-used model",
                "router",
                "quality",
                cost_heading(report),
                "reward"
            );
            for row in report
                .rows
                .iter()
                .filter(|row| row.split == split.name && row.w_quality == w)
            {
                let _ = writeln!(
                    out,
                    "  {:<NAME_WIDTH$} {:>7.3} {:>15.7} {:>7.3}  {}",
                    truncate(&row.router, NAME_WIDTH),
                    row.mean_quality,
                    row.mean_cost,
                    row.mean_reward,
                    top_share(row, 20)
                );
            }
        }
        let barp = report.rows_of("barp", &split.name);
        if barp.is_empty() {
            let _ = writeln!(out, "\n  barp: not evaluated");
            continue;
        }
        let _ = writeln!(out, "\n  barp, full sweep");
        let _ = writeln!(
            out,
            "  {:>4} {:>7} {:>15} {:>7}  most-used model",
            "w_q",
            "quality",
            cost_heading(report),
            "reward"
        );
        for row in barp {
            let _ = writeln!(
                out,
                "  {:>4.1} {:>7.3} {:>15.7} {:>7.3}  {}",
                row.w_quality,
                row.mean_quality,
                row.mean_cost,
                row.mean_reward,
                top_share(row, 40)
            );
        }
    }
    out
}

/// Renders the Markdown report: setup, summary against targets for `barp`, full tables and
/// links to the SVG plots written by [`write_outputs`].
pub fn render_markdown(report: &EvalReport) -> String {
    let mut out = String::new();
    let estimated = if report.costs_are_estimates {
        " (ESTIMATED)"
    } else {
        ""
    };
    let _ = writeln!(out, "# Routing evaluation: {}\n", report.dataset);
    let _ = writeln!(out, "## Setup\n");
    let _ = writeln!(
        out,
        "- Data set: `{}`, {} models.",
        report.dataset,
        report.models.len()
    );
    let _ = writeln!(out, "- Cost source: {}.", report.cost_source);
    if report.costs_are_estimates {
        let _ = writeln!(
            out,
            "- **Every cost in this report is an estimate**, not a recorded charge: quality is \
             measured, cost is a proxy."
        );
    }
    let _ = writeln!(
        out,
        "- τ = {:.6} USD per call: the {:.0}th percentile (nearest rank) of every per-call cost of \
         the train split, all models; one τ for both splits.",
        report.tau_usd,
        report.config.tau_percentile * 100.0
    );
    let _ = writeln!(
        out,
        "- Reward: `r = w_q · q − (1 − w_q) · min(c / τ, 1)`, swept over w_q ∈ {{0, 0.1, …, 1}}."
    );
    let _ = writeln!(
        out,
        "- Seed: {} (every router's seed is derived from it).\n",
        report.config.seed
    );

    let _ = writeln!(
        out,
        "| split | train prompts | test prompts | test prompts also in train | held-out tasks |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for split in &report.splits {
        let held_out = if split.held_out_tasks.is_empty() {
            "none".to_string()
        } else {
            split.held_out_tasks.join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            split.name,
            split.train_prompts,
            split.test_prompts,
            split.test_prompts_seen_in_training,
            held_out
        );
    }
    for split in &report.splits {
        let _ = writeln!(
            out,
            "\n{} test tasks: {}.",
            split.name,
            split.test_tasks.join(", ")
        );
        let pulls: Vec<String> = split
            .bandit_pulls
            .iter()
            .map(|(id, n)| format!("{id} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "{} bandit-feedback outcomes revealed: {}.",
            split.name,
            pulls.join(", ")
        );
    }

    write_hyperparameters(&mut out, report);
    write_summary(&mut out, report);

    for split in &report.splits {
        let _ = writeln!(out, "\n## Results: {} split\n", split.name);
        let _ = writeln!(
            out,
            "| router | w_q | quality | cost USD/call{estimated} | reward | shares of calls |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for row in report.rows.iter().filter(|row| row.split == split.name) {
            let shares: Vec<String> = row
                .shares
                .iter()
                .filter(|(_, share)| **share > 0.0)
                .map(|(model, share)| format!("{model} {:.1}%", share * 100.0))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.4} | {:.7} | {:.4} | {} |",
                row.router,
                row.w_quality,
                row.mean_quality,
                row.mean_cost,
                row.mean_reward,
                shares.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "\n![quality vs cost, {0} split](quality_cost_{0}.svg)",
            split.name
        );
    }
    out
}

fn write_hyperparameters(out: &mut String, report: &EvalReport) {
    let config = &report.config;
    let _ = writeln!(out, "\n## Hyper-parameters\n");
    let _ = writeln!(
        out,
        "The baselines' settings were set before any test result was seen. BaRP's were compared \
         on validation splits carved out of the training split (`examples/tune_barp.rs`) and kept \
         only where they raised the mean validation reward over the sweep; earlier test results \
         were known when choosing what to compare. None was tuned on test data.\n"
    );
    let _ = writeln!(out, "| router | setting |");
    let _ = writeln!(out, "|---|---|");
    if let Some(barp) = &report.barp {
        let _ = writeln!(out, "| barp | {} |", describe_barp(barp));
    }
    let barp_trained = report
        .splits
        .iter()
        .any(|split| split.bandit_pulls.contains_key("barp"));
    let budget = if barp_trained {
        "as many interactions as BaRP on each split".to_string()
    } else {
        format!("{} interactions", config.bandit_interactions)
    };
    let bandit = format!(
        "{budget} (one revealed outcome each, counts above), prompt uniform, w_q ~ U[0, 1], \
         context [embedding; 1], ridge λ = {}, posterior updated every {} interactions",
        config.ridge_lambda, config.bandit_batch_size
    );
    let _ = writeln!(out, "| linucb | {bandit}, α = {} |", config.linucb_alpha);
    let _ = writeln!(
        out,
        "| thompson | {bandit}, posterior scale v = {} |",
        config.thompson_scale
    );
    let _ = writeln!(out, "| epsilon-greedy | {bandit}, ε = {} |", config.epsilon);
    let mlp = &config.mlp;
    let _ = writeln!(
        out,
        "| mlp-full-info | embedding → {} ReLU → 2K outputs, MSE, Adam lr {}, batch {}, {} epochs |",
        mlp.hidden, mlp.learning_rate, mlp.batch_size, mlp.epochs
    );
    let _ = writeln!(
        out,
        "| knn-full-info | k = {}, cosine similarity |",
        config.knn_k
    );
    let _ = writeln!(out, "| random | uniform over the models, seeded |");
    let _ = writeln!(
        out,
        "| oracle | per prompt argmax of the actual reward, ties to the cheaper model |"
    );
}

/// Describes BaRP's training settings in one row of the hyper-parameter table.
fn describe_barp(config: &TrainConfig) -> String {
    let length = match config.interactions_per_prompt {
        Some(per_prompt) => format!(
            "{per_prompt} draws per training prompt (⌈prompts · {per_prompt} / {}⌉ steps)",
            config.batch_size
        ),
        None => format!("{} steps", config.steps),
    };
    let learning_rate = match config.learning_rate_end {
        Some(end) => format!(
            "Adam lr {} with cosine decay to {end}",
            config.learning_rate
        ),
        None => format!("Adam lr {}", config.learning_rate),
    };
    format!(
        "REINFORCE with a learned value baseline, {length}, batch {}, {learning_rate}, \
         weight decay {}, entropy bonus {} → {}, w_q ~ Beta({a}, {a}), preference encoder \
         (w_q, w_c, ℓ(w)) → {} tanh, hidden {} ReLU{}",
        config.batch_size,
        config.weight_decay,
        config.entropy_start,
        config.entropy_end,
        config.preference_dim,
        config.hidden_dim,
        if config.normalize_advantages {
            ", advantages normalised per batch"
        } else {
            ""
        },
        a = config.preference_concentration,
    )
}

fn write_summary(out: &mut String, report: &EvalReport) {
    let _ = writeln!(out, "\n## Summary against targets\n");
    let summaries = summarise_against_targets(report, "barp");
    if summaries.is_empty() {
        let _ = writeln!(
            out,
            "barp was not evaluated, so there is nothing to compare."
        );
        return;
    }
    for summary in summaries {
        let _ = writeln!(out, "**{} split**\n", summary.split);
        let oracle = summary
            .oracle_quality_at_w1
            .map_or_else(|| "n/a".to_string(), |q| format!("{q:.4}"));
        let _ = writeln!(
            out,
            "- Quality at w_q = 1: barp {:.4}, best single model ({}) {:.4}, oracle {}.",
            summary.quality_at_w1, summary.best_single_model, summary.best_single_quality, oracle
        );
        let _ = writeln!(
            out,
            "- barp's reward beats both full-information routers at {} of {} sweep points.",
            summary.points_beating_full_info, summary.points
        );
        let estimate = if report.costs_are_estimates {
            " (estimated)"
        } else {
            ""
        };
        match summary.cheapest_match {
            Some((w, cost, fraction)) => {
                let _ = writeln!(
                    out,
                    "- Cheapest sweep point with quality ≥ the best single model's: w_q = {w:.1}, \
                     {cost:.7} USD per call{estimate}, {:.1}% of that model's {:.7} USD.\n",
                    fraction * 100.0,
                    summary.best_single_cost
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "- No sweep point reaches the best single model's quality.\n"
                );
            }
        }
    }
}

/// Writes `eval.json`, `report.md` and one `quality_cost_<split>.svg` per split into `dir`,
/// creating it if needed, and returns the written paths.
///
/// The files replace the previous outputs together ([`replace_files`]): on an error the
/// folder keeps its previous outputs and no temporary file.
pub fn write_outputs(report: &EvalReport, dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let mut files = vec![
        ("eval.json".to_string(), report.to_json()),
        ("report.md".to_string(), render_markdown(report)),
    ];
    for split in &report.splits {
        files.push((
            format!("quality_cost_{}.svg", split.name),
            super::render_svg(report, &split.name),
        ));
    }
    let contents: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(name, text)| (name.as_str(), text.as_bytes()))
        .collect();
    let written = replace_files(dir, &contents)?;
    tracing::info!(dir = %dir.display(), files = written.len(), "wrote evaluation outputs");
    Ok(written)
}
