//! Offline evaluation of BaRP and every baseline router on a routing data set.
//!
//! Two evaluation splits:
//! - `id`: train on the data set's own train split, test on its test split;
//! - `ood`: held-out tasks ([`held_out_tasks`]) are removed from training entirely, and the
//!   test set is the test-split rows of those tasks only.
//!
//! Every router is trained on the split's training rows, then routes the test prompts at each
//! quality weight of [`W_GRID`] (`w_quality ∈ {0, 0.1, …, 1}`, `w_cost = 1 − w_quality`). Each
//! [`EvalRow`] reports, over the test prompts, mean quality, mean cost in USD per call, mean
//! reward `w_q · q − w_c · min(c / τ, 1)` and each model's share of calls. τ is one value per
//! data set: the 95th percentile (nearest rank) of every per-call cost of the train split, all
//! models included, and is used for both splits and every router.
//!
//! All randomness comes from [`EvalConfig::seed`], so equal inputs give byte-identical JSON.

mod plot;
mod report;

use std::collections::BTreeMap;

use ndarray::{ArrayView2, Axis};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use plot::render_svg;
pub use report::{
    TargetSummary, render_markdown, render_text, summarise_against_targets, write_outputs,
};

use crate::bandit::ReplayEnvironment;
use crate::baselines::knn::KnnRouter;
use crate::baselines::linear::{Exploration, LinearBanditConfig, train_linear_bandit};
use crate::baselines::mlp::{MlpConfig, train_mlp};
use crate::baselines::{BaselineError, OracleRouter, RandomRouter, Router, SingleModelRouter};
use crate::data::{CostSource, RoutingDataset, Split};
use crate::reward::{DEFAULT_TAU_PERCENTILE, Reward, calibrate_tau};

/// Quality weights of the sweep: 0, 0.1, …, 1.
pub const W_GRID: [f32; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Held-out tasks of the `ood` split for a known data set. A task is held out when it equals
/// an entry or starts with an entry followed by `/` (so `bbh` holds out every `bbh/…` task).
/// One task per answer format for `llmrouter-9llm` (multiple choice, code, generation); three
/// benchmark families of different kinds for the ParetoBandit sets.
pub fn held_out_tasks(dataset: &str) -> Option<&'static [&'static str]> {
    match dataset {
        "llmrouter-9llm" => Some(&["gpqa", "human_eval", "commongen"]),
        "paretobandit-k3" | "paretobandit-k4" => Some(&["bbh", "hellaswag", "mbpp"]),
        _ => None,
    }
}

/// Returns whether `task` belongs to one of the `held_out` families.
pub fn is_held_out(task: &str, held_out: &[String]) -> bool {
    held_out.iter().any(|family| {
        task == family
            || task
                .strip_prefix(family.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Hyper-parameters and seeds of one evaluation. Defaults were set before looking at any test
/// result and are printed in every report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Seed from which every router's seed is derived.
    pub seed: u64,
    /// Bandit interactions of each linear bandit learner on a split when BaRP is not trained.
    /// When it is, each learner gets exactly as many as BaRP observed on that split.
    pub bandit_interactions: usize,
    /// Interactions that share one posterior in the linear bandit learners.
    pub bandit_batch_size: usize,
    /// Ridge penalty λ of the linear bandit learners.
    pub ridge_lambda: f64,
    /// LinUCB exploration bonus α.
    pub linucb_alpha: f64,
    /// Thompson posterior scale v.
    pub thompson_scale: f64,
    /// ε of ε-greedy.
    pub epsilon: f64,
    /// Neighbours of the kNN router.
    pub knn_k: usize,
    /// MLP hyper-parameters; its seed is replaced by one derived from `seed`.
    pub mlp: MlpConfig,
    /// Percentile of training costs that sets τ.
    pub tau_percentile: f64,
    /// Held-out tasks of the `ood` split; `None` uses [`held_out_tasks`] for the data set.
    pub held_out_tasks: Option<Vec<String>>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            bandit_interactions: 20_000,
            bandit_batch_size: 32,
            ridge_lambda: 1.0,
            linucb_alpha: 0.5,
            thompson_scale: 0.5,
            epsilon: 0.1,
            knn_k: crate::baselines::knn::DEFAULT_K,
            mlp: MlpConfig::default(),
            tau_percentile: DEFAULT_TAU_PERCENTILE,
            held_out_tasks: None,
        }
    }
}

/// One router at one sweep point on one split. Field names are the JSON keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub router: String,
    /// `"id"` or `"ood"`.
    pub split: String,
    pub w_quality: f32,
    pub mean_quality: f64,
    /// Mean USD per call (an estimate when the data set's costs are estimated).
    pub mean_cost: f64,
    pub mean_reward: f64,
    /// Share of calls per model name; sums to 1.
    pub shares: BTreeMap<String, f64>,
}

/// Sizes and tasks of one evaluation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// `"id"` or `"ood"`.
    pub name: String,
    pub train_prompts: usize,
    pub test_prompts: usize,
    pub train_tasks: Vec<String>,
    pub test_tasks: Vec<String>,
    /// Held-out task families (empty for `id`).
    pub held_out_tasks: Vec<String>,
    /// Test prompts whose trimmed text also occurs in the training prompts.
    pub test_prompts_seen_in_training: usize,
    /// Outcomes revealed to each bandit-feedback learner during training.
    pub bandit_pulls: BTreeMap<String, u64>,
}

/// Everything an evaluation produced: the metadata a report needs and all rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub dataset: String,
    pub models: Vec<String>,
    pub cost_source: CostSource,
    /// True when every cost below is an estimate, not a recorded charge.
    pub costs_are_estimates: bool,
    /// Cost scale τ in USD per call.
    pub tau_usd: f32,
    pub config: EvalConfig,
    /// BaRP's training settings, when the caller trained BaRP and passed them in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barp: Option<crate::policy::TrainConfig>,
    pub splits: Vec<SplitInfo>,
    pub rows: Vec<EvalRow>,
}

impl EvalReport {
    /// Rows of one router on one split, in sweep order.
    pub fn rows_of(&self, router: &str, split: &str) -> Vec<&EvalRow> {
        self.rows
            .iter()
            .filter(|row| row.router == router && row.split == split)
            .collect()
    }

    /// Router ids in the order they were evaluated.
    pub fn router_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for row in &self.rows {
            if !ids.contains(&row.router) {
                ids.push(row.router.clone());
            }
        }
        ids
    }

    /// Serialises the report as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut json =
            serde_json::to_string_pretty(self).expect("report contains only JSON-safe values");
        json.push('\n');
        json
    }
}

/// Error type a BaRP trainer may return.
pub type TrainerError = Box<dyn std::error::Error + Send + Sync>;

/// Trains BaRP from bandit feedback on one training split: receives the environment over the
/// split's prompts, the data set's reward and a seed derived from [`EvalConfig::seed`].
pub type BarpTrainer<'t> = dyn FnMut(&mut ReplayEnvironment<'_>, Reward, u64) -> Result<Box<dyn Router>, TrainerError>
    + 't;

/// Failure of an evaluation.
#[derive(Debug, Error)]
pub enum EvalError {
    #[error(
        "data set `{dataset}`: {embeddings} {split} embeddings for {prompts} prompts; embed \
         exactly the {split} prompts, in order"
    )]
    EmbeddingCount {
        dataset: String,
        split: &'static str,
        embeddings: usize,
        prompts: usize,
    },
    #[error("train embeddings have {train} dimensions but test embeddings {test}; use one encoder")]
    EmbeddingDimension { train: usize, test: usize },
    #[error(
        "data set `{dataset}`: no positive training cost to calibrate τ from; check the cost column"
    )]
    NoCostScale { dataset: String },
    #[error(
        "data set `{dataset}` has no held-out task list for the ood split; set \
         EvalConfig::held_out_tasks"
    )]
    NoHeldOutTasks { dataset: String },
    #[error("data set `{dataset}`, {split} split: {problem}. {advice}")]
    EmptySplit {
        dataset: String,
        split: &'static str,
        /// Description of the missing rows, for example "no test prompts of the held-out tasks
        /// (t3)".
        problem: String,
        advice: &'static str,
    },
    #[error("{split} split: {source}")]
    Baseline {
        split: &'static str,
        source: BaselineError,
    },
    #[error("{split} split: training `barp` failed: {source}")]
    Barp {
        split: &'static str,
        source: TrainerError,
    },
    #[error("{split} split: `{router}` pulled {pulls} outcomes, expected {expected}")]
    PullCount {
        split: &'static str,
        router: String,
        pulls: u64,
        expected: u64,
    },
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

/// Trains every router on both splits and scores it at every sweep point.
///
/// `train_embeddings` and `test_embeddings` are `[prompts × dim]` embeddings of the data set's
/// train and test prompts, in order. Without `barp` the report has no `barp` rows.
pub fn evaluate(
    dataset: &RoutingDataset,
    train_embeddings: ArrayView2<f32>,
    test_embeddings: ArrayView2<f32>,
    config: &EvalConfig,
    mut barp: Option<&mut BarpTrainer<'_>>,
) -> Result<EvalReport, EvalError> {
    check_embeddings(dataset, train_embeddings, test_embeddings)?;
    let tau = calibrate_tau(dataset.train.cost.iter().copied(), config.tau_percentile).ok_or_else(
        || EvalError::NoCostScale {
            dataset: dataset.name.clone(),
        },
    )?;
    let reward = Reward::new(tau);

    let mut splits = Vec::new();
    let mut rows = Vec::new();
    for plan in plan_splits(dataset, config)? {
        let SplitPlan {
            name: split,
            train_rows,
            test_rows,
            held_out,
        } = plan;
        let split_data = SplitData {
            name: split,
            train: dataset.train.subset(&train_rows),
            test: dataset.test.subset(&test_rows),
            train_embeddings: train_embeddings.select(Axis(0), &train_rows),
            test_embeddings: test_embeddings.select(Axis(0), &test_rows),
        };
        tracing::info!(
            dataset = %dataset.name,
            split,
            train = train_rows.len(),
            test = test_rows.len(),
            "evaluating split"
        );
        let (routers, bandit_pulls) =
            train_routers(dataset, &split_data, reward, config, barp.as_deref_mut())?;
        for router in &routers {
            for &w in &W_GRID {
                rows.push(score(router.as_ref(), &split_data, dataset, reward, w));
            }
        }
        splits.push(split_info(&split_data, held_out, bandit_pulls));
    }
    Ok(EvalReport {
        dataset: dataset.name.clone(),
        models: dataset.models.clone(),
        cost_source: dataset.cost_source.clone(),
        costs_are_estimates: dataset.cost_source.is_estimate(),
        tau_usd: tau,
        config: config.clone(),
        barp: None,
        splits,
        rows,
    })
}

/// Checks, before any embedding or training, that both evaluation splits of `dataset` have
/// training and test prompts under `config`'s held-out tasks.
pub fn check_splits(dataset: &RoutingDataset, config: &EvalConfig) -> Result<(), EvalError> {
    plan_splits(dataset, config).map(|_| ())
}

/// The rows of the data set's train and test splits that one evaluation split uses.
struct SplitPlan {
    name: &'static str,
    train_rows: Vec<usize>,
    test_rows: Vec<usize>,
    /// Held-out task families, empty for the `id` split.
    held_out: Vec<String>,
}

/// Selects the rows of the `id` and `ood` splits and fails when a split has no training or no
/// test prompts.
fn plan_splits(dataset: &RoutingDataset, config: &EvalConfig) -> Result<[SplitPlan; 2], EvalError> {
    let held_out: Vec<String> = match &config.held_out_tasks {
        Some(tasks) => tasks.clone(),
        None => held_out_tasks(&dataset.name)
            .ok_or_else(|| EvalError::NoHeldOutTasks {
                dataset: dataset.name.clone(),
            })?
            .iter()
            .map(|task| task.to_string())
            .collect(),
    };
    let plans = [
        SplitPlan {
            name: "id",
            train_rows: (0..dataset.train.len()).collect(),
            test_rows: (0..dataset.test.len()).collect(),
            held_out: Vec::new(),
        },
        SplitPlan {
            name: "ood",
            train_rows: dataset
                .train
                .indices_where(|task| !is_held_out(task, &held_out)),
            test_rows: dataset
                .test
                .indices_where(|task| is_held_out(task, &held_out)),
            held_out,
        },
    ];
    for plan in &plans {
        let empty = |problem: String, advice: &'static str| EvalError::EmptySplit {
            dataset: dataset.name.clone(),
            split: plan.name,
            problem,
            advice,
        };
        let held_out = plan.held_out.join(", ");
        if plan.train_rows.is_empty() {
            let problem = if plan.held_out.is_empty() {
                "no training prompts".to_string()
            } else {
                format!("no training prompts remain outside the held-out tasks ({held_out})")
            };
            return Err(empty(problem, "Keep more prompts, or hold out fewer tasks"));
        }
        if plan.test_rows.is_empty() {
            let problem = if plan.held_out.is_empty() {
                "no test prompts".to_string()
            } else {
                format!("no test prompts of the held-out tasks ({held_out})")
            };
            return Err(empty(
                problem,
                "Keep more prompts, or hold out tasks that occur in the test split",
            ));
        }
    }
    Ok(plans)
}

/// The rows and embeddings of one evaluation split.
struct SplitData {
    name: &'static str,
    train: Split,
    test: Split,
    train_embeddings: ndarray::Array2<f32>,
    test_embeddings: ndarray::Array2<f32>,
}

fn check_embeddings(
    dataset: &RoutingDataset,
    train: ArrayView2<f32>,
    test: ArrayView2<f32>,
) -> Result<(), EvalError> {
    for (split, embeddings, prompts) in [
        ("train", train, dataset.train.len()),
        ("test", test, dataset.test.len()),
    ] {
        if embeddings.nrows() != prompts {
            return Err(EvalError::EmbeddingCount {
                dataset: dataset.name.clone(),
                split,
                embeddings: embeddings.nrows(),
                prompts,
            });
        }
    }
    if train.ncols() != test.ncols() {
        return Err(EvalError::EmbeddingDimension {
            train: train.ncols(),
            test: test.ncols(),
        });
    }
    Ok(())
}

/// Derives a per-router, per-split seed from the evaluation seed (FNV-1a of the label, so the
/// value is the same on every platform and Rust version). Labels are `ROUTER/SPLIT`, for
/// example `barp/id` or `mlp-full-info/ood`.
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in label.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^ seed
}

/// Trained routers of one split, in report order, and the pull count of each
/// bandit-feedback learner.
type TrainedRouters = (Vec<Box<dyn Router>>, BTreeMap<String, u64>);

/// Trains every router of one split, in report order, and returns the pull count of each
/// bandit-feedback learner.
fn train_routers(
    dataset: &RoutingDataset,
    data: &SplitData,
    reward: Reward,
    config: &EvalConfig,
    barp: Option<&mut BarpTrainer<'_>>,
) -> Result<TrainedRouters, EvalError> {
    let split = data.name;
    let baseline_error = |source| EvalError::Baseline { split, source };
    let mut routers: Vec<Box<dyn Router>> = Vec::new();
    let mut pulls = BTreeMap::new();
    let environment = || {
        ReplayEnvironment::new(
            data.train_embeddings.view(),
            data.train.quality.view(),
            data.train.cost.view(),
        )
    };

    if let Some(trainer) = barp {
        let mut env = environment();
        let router = trainer(
            &mut env,
            reward,
            derive_seed(config.seed, &format!("barp/{split}")),
        )
        .map_err(|source| EvalError::Barp { split, source })?;
        pulls.insert("barp".to_string(), env.pulls());
        routers.push(router);
    }

    let mlp_config = MlpConfig {
        seed: derive_seed(config.seed, &format!("mlp-full-info/{split}")),
        ..config.mlp
    };
    let train_view = data.train_embeddings.view();
    routers.push(Box::new(
        train_mlp(
            train_view,
            data.train.quality.view(),
            data.train.cost.view(),
            reward,
            &mlp_config,
        )
        .map_err(baseline_error)?,
    ));
    routers.push(Box::new(
        KnnRouter::new(
            train_view,
            data.train.quality.view(),
            data.train.cost.view(),
            reward,
            config.knn_k,
        )
        .map_err(baseline_error)?,
    ));

    // Every bandit-feedback learner gets as many outcomes as BaRP observed on this split.
    let bandit_interactions = pulls
        .get("barp")
        .map_or(config.bandit_interactions, |&barp_pulls| {
            barp_pulls as usize
        });
    for exploration in [
        Exploration::Ucb {
            alpha: config.linucb_alpha,
        },
        Exploration::EpsilonGreedy {
            epsilon: config.epsilon,
        },
        Exploration::Thompson {
            scale: config.thompson_scale,
        },
    ] {
        let id = exploration.router_id();
        let bandit_config = LinearBanditConfig {
            interactions: bandit_interactions,
            batch_size: config.bandit_batch_size,
            ridge_lambda: config.ridge_lambda,
            seed: derive_seed(config.seed, &format!("{id}/{split}")),
        };
        let mut env = environment();
        let router = train_linear_bandit(&mut env, reward, exploration, &bandit_config)
            .map_err(baseline_error)?;
        // Each interaction reveals exactly one outcome: check it rather than trust it.
        if env.pulls() != bandit_interactions as u64 {
            return Err(EvalError::PullCount {
                split,
                router: id.to_string(),
                pulls: env.pulls(),
                expected: bandit_interactions as u64,
            });
        }
        pulls.insert(id.to_string(), env.pulls());
        routers.push(Box::new(router));
    }

    routers.push(Box::new(RandomRouter {
        num_models: dataset.models.len(),
        seed: derive_seed(config.seed, &format!("random/{split}")),
    }));
    routers.push(Box::new(OracleRouter::new(
        data.test.quality.clone(),
        data.test.cost.clone(),
        reward,
    )));
    for (index, model) in dataset.models.iter().enumerate() {
        routers.push(Box::new(SingleModelRouter {
            model: model.clone(),
            index,
        }));
    }
    Ok((routers, pulls))
}

/// Routes the split's test prompts with `router` at `w_quality` and averages the outcomes.
fn score(
    router: &dyn Router,
    data: &SplitData,
    dataset: &RoutingDataset,
    reward: Reward,
    w_quality: f32,
) -> EvalRow {
    let choices = router.route(data.test_embeddings.view(), w_quality);
    let n = choices.len().max(1) as f64;
    let mut quality = 0.0;
    let mut cost = 0.0;
    let mut total_reward = 0.0;
    let mut counts = vec![0usize; dataset.models.len()];
    for (prompt, &model) in choices.iter().enumerate() {
        let q = data.test.quality[[prompt, model]];
        let c = data.test.cost[[prompt, model]];
        quality += f64::from(q);
        cost += f64::from(c);
        total_reward += f64::from(reward.reward(w_quality, q, c));
        counts[model] += 1;
    }
    EvalRow {
        router: router.id(),
        split: data.name.to_string(),
        w_quality,
        mean_quality: quality / n,
        mean_cost: cost / n,
        mean_reward: total_reward / n,
        shares: dataset
            .models
            .iter()
            .zip(&counts)
            .map(|(model, &count)| (model.clone(), count as f64 / n))
            .collect(),
    }
}

fn split_info(
    data: &SplitData,
    held_out: Vec<String>,
    bandit_pulls: BTreeMap<String, u64>,
) -> SplitInfo {
    let seen: std::collections::HashSet<&str> =
        data.train.prompts.iter().map(|p| p.trim()).collect();
    SplitInfo {
        name: data.name.to_string(),
        train_prompts: data.train.len(),
        test_prompts: data.test.len(),
        train_tasks: data.train.task_names(),
        test_tasks: data.test.task_names(),
        held_out_tasks: held_out,
        test_prompts_seen_in_training: data
            .test
            .prompts
            .iter()
            .filter(|p| seen.contains(p.trim()))
            .count(),
        bandit_pulls,
    }
}

#[cfg(test)]
pub(crate) mod tests;
