//! Breaks BaRP's test quality down by task at one preference, next to fixed-model rules.
//!
//! `cargo run --release -p llmroute-policy --example per_task -- NAME [--w W] [--seeds N]
//! [--ood]`
//!
//! Trains BaRP on the data set's whole training split with the settings of `llmroute train`
//! (bandit feedback only, seeds 7, 8, …), routes the test split at `w_quality = W` (default 1)
//! and prints, for each test task, the mean quality of the routers below. With `--ood` it
//! uses `llmroute eval`'s `ood` split instead, which trains without the held-out tasks and
//! tests on their test prompts only.
//!
//! For each test task:
//! - BaRP, mean over the seeds, with the model it calls most often for that task;
//! - the model with the best mean quality on that task's training prompts (a rule that is
//!   given the task, which no router of the evaluation is);
//! - the model with the best mean quality on that task's test prompts (a bound for any rule
//!   that picks one model per task);
//! - the per-prompt oracle.
//!
//! It shows where BaRP's quality at w_quality = 1 is lost: in tasks whose best model it misses,
//! or within tasks.

use std::collections::BTreeMap;

mod common;

use common::{Embedder, EvalSplit, eval_splits, training_reward};
use indicatif::ProgressBar;
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::baselines::Router;
use llmroute_policy::data::{self, Split};
use llmroute_policy::policy::train::DEFAULT_INTERACTIONS_PER_PROMPT;
use llmroute_policy::policy::{BarpRouter, TrainConfig, train};
use ndarray::Axis;

/// Groups a split's prompt indices by task name.
fn rows_by_task(split: &Split) -> BTreeMap<String, Vec<usize>> {
    let mut tasks: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (row, task) in split.tasks.iter().enumerate() {
        tasks.entry(task.clone()).or_default().push(row);
    }
    tasks
}

/// Returns the mean quality of `model` over `rows` of `split`.
fn mean_quality(split: &Split, rows: &[usize], model: usize) -> f64 {
    let total: f64 = rows
        .iter()
        .map(|&row| f64::from(split.quality[[row, model]]))
        .sum();
    total / rows.len().max(1) as f64
}

/// Returns the model with the highest mean quality over `rows`, the first one on ties.
fn best_model(split: &Split, rows: &[usize]) -> usize {
    let mut best = 0;
    for model in 1..split.num_models() {
        if mean_quality(split, rows, model) > mean_quality(split, rows, best) {
            best = model;
        }
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut name = "llmrouter-9llm".to_string();
    let mut w_quality = 1.0f32;
    let mut seeds = 3u64;
    let mut ood = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--w" => {
                let value = args.next().ok_or("--w needs a weight in [0, 1]")?;
                w_quality = value
                    .parse()
                    .ok()
                    .filter(|w: &f32| (0.0..=1.0).contains(w))
                    .ok_or_else(|| {
                        format!("invalid --w value {value:?}; use a number in [0, 1]")
                    })?;
            }
            "--seeds" => {
                let value = args.next().ok_or("--seeds needs a number")?;
                seeds =
                    value.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        format!("invalid --seeds value {value:?}; use a count ≥ 1")
                    })?;
            }
            "--ood" => ood = true,
            _ => name = arg,
        }
    }

    let dataset = data::load(&name)?;
    let mut embedder = Embedder::load()?;
    let train_embeddings = embedder.embed(&dataset, "train", &dataset.train)?;
    let test_embeddings = embedder.embed(&dataset, "test", &dataset.test)?;
    let reward = training_reward(&dataset)?;
    let [id_split, ood_split] = eval_splits(&dataset)?;
    let EvalSplit {
        train_rows,
        test_rows,
        held_out,
        ..
    } = if ood { ood_split } else { id_split };
    let train_split = dataset.train.subset(&train_rows);
    let test_split = dataset.test.subset(&test_rows);
    let train_embeddings = train_embeddings.select(Axis(0), &train_rows);
    let test_embeddings = test_embeddings.select(Axis(0), &test_rows);

    let mut choices: Vec<Vec<usize>> = Vec::new();
    for seed in 7..7 + seeds {
        let config = TrainConfig {
            seed,
            interactions_per_prompt: Some(DEFAULT_INTERACTIONS_PER_PROMPT),
            ..TrainConfig::default()
        };
        let mut environment = ReplayEnvironment::new(
            train_embeddings.view(),
            train_split.quality.view(),
            train_split.cost.view(),
        );
        let (network, _) = train(
            &mut environment,
            reward,
            &config,
            None,
            &ProgressBar::hidden(),
        );
        choices.push(BarpRouter { network }.route(test_embeddings.view(), w_quality));
    }

    let test = &test_split;
    let train_tasks = rows_by_task(&train_split);
    let barp_quality = |rows: &[usize]| -> f64 {
        let per_seed = choices.iter().map(|chosen| {
            rows.iter()
                .map(|&row| f64::from(test.quality[[row, chosen[row]]]))
                .sum::<f64>()
                / rows.len() as f64
        });
        per_seed.sum::<f64>() / choices.len() as f64
    };
    // BaRP's most chosen model on `rows` over all seeds, with its share of those calls.
    let barp_top = |rows: &[usize]| -> (usize, f64) {
        let mut counts = vec![0usize; dataset.models.len()];
        for chosen in &choices {
            for &row in rows {
                counts[chosen[row]] += 1;
            }
        }
        let top = (0..counts.len()).max_by_key(|&m| counts[m]).unwrap_or(0);
        (
            top,
            counts[top] as f64 / (rows.len() * choices.len()) as f64,
        )
    };
    let oracle_quality = |rows: &[usize]| -> f64 {
        let best = rows
            .iter()
            .map(|&row| test.quality.row(row).iter().fold(0.0f32, |m, &q| m.max(q)));
        best.map(f64::from).sum::<f64>() / rows.len() as f64
    };

    println!(
        "{name}, {}, w_quality = {w_quality}, BaRP mean over seeds 7..{}",
        if ood {
            format!("ood split (held out: {})", held_out.join(", "))
        } else {
            "test split".to_string()
        },
        7 + seeds - 1
    );
    println!(
        "{:<22} {:>7} {:>7} {:>38} {:>38} {:>38} {:>7}",
        "task",
        "prompts",
        "barp",
        "barp's most chosen model (share)",
        "best on train (its test quality)",
        "best on test",
        "oracle"
    );
    let (mut by_train_total, mut by_test_total) = (0.0f64, 0.0f64);
    for (task, rows) in rows_by_task(test) {
        let by_train = train_tasks
            .get(&task)
            .map(|train_rows| best_model(&train_split, train_rows));
        let by_test = best_model(test, &rows);
        let by_train_text = match by_train {
            Some(model) => {
                let quality = mean_quality(test, &rows, model);
                by_train_total += quality * rows.len() as f64;
                format!("{} {quality:.3}", dataset.models[model])
            }
            None => "(task not in train)".to_string(),
        };
        let by_test_quality = mean_quality(test, &rows, by_test);
        by_test_total += by_test_quality * rows.len() as f64;
        let (top, share) = barp_top(&rows);
        println!(
            "{:<22} {:>7} {:>7.3} {:>38} {:>38} {:>38} {:>7.3}",
            task,
            rows.len(),
            barp_quality(&rows),
            format!("{} ({:.0} %)", dataset.models[top], share * 100.0),
            by_train_text,
            format!("{} {by_test_quality:.3}", dataset.models[by_test]),
            oracle_quality(&rows),
        );
    }
    let all: Vec<usize> = (0..test.len()).collect();
    println!(
        "{:<22} {:>7} {:>7.3} {:>38} {:>38.3} {:>38.3} {:>7.3}",
        "all",
        test.len(),
        barp_quality(&all),
        "",
        by_train_total / test.len() as f64,
        by_test_total / test.len() as f64,
        oracle_quality(&all),
    );
    Ok(())
}
