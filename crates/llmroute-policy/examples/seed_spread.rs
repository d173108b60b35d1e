//! Measures how much `llmroute eval`'s comparison of BaRP with the full-information routers
//! depends on the seed.
//!
//! `cargo run --release -p llmroute-policy --example seed_spread -- NAME [--seeds N] [--budget USD]`
//!
//! For evaluation seeds 7, 8, … it trains BaRP and mlp-full-info on both splits of `llmroute
//! eval`, with the seeds `llmroute eval --seed S` derives for them, so the rows of seed 7, its
//! default, equal the `barp` and `mlp-full-info` rows of `docs/results/NAME/eval.json`.
//! knn-full-info has no seed and is trained once per split. The linear bandit learners are left
//! out, because they take most of an evaluation's time and no target compares BaRP with them.
//!
//! Per split and sweep point it prints the margin `m = R̄_barp − max(R̄_mlp, R̄_knn)`, where `R̄`
//! is a router's mean reward per call over the test prompts. It gives the mean, standard
//! deviation, minimum and maximum of `m` over the seeds and the number of seeds at which BaRP
//! beats both. For the first seed it also gives the standard error of `m` over the test
//! prompts: the standard deviation of the per-prompt differences `d_i = r_barp,i − r_best,i`
//! divided by `√n`, with `best` the full-information router of the higher mean.
//!
//! Then it prints, per seed, the sweep points won and the figures of the quality targets in
//! `docs/benchmarks.md`. Those are BaRP's quality at `w_q = 1` and its best quality at no more
//! than half the best single model's mean cost. With `--budget` they include its best quality
//! at no more than that many USD per call.

mod common;

use common::{Embedder, EvalSplit, eval_splits, mean_and_std, training_reward};
use indicatif::ProgressBar;
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::baselines::Router;
use llmroute_policy::baselines::knn::{DEFAULT_K, KnnRouter};
use llmroute_policy::baselines::mlp::{MlpConfig, train_mlp};
use llmroute_policy::data::{self, Split};
use llmroute_policy::eval::{W_GRID, derive_seed};
use llmroute_policy::policy::train::DEFAULT_INTERACTIONS_PER_PROMPT;
use llmroute_policy::policy::{BarpRouter, TrainConfig, train};
use llmroute_policy::reward::Reward;
use ndarray::{Array2, Axis};

/// Test outcomes of one router at every sweep point: per-prompt rewards, mean quality and
/// mean cost in USD per call.
struct Scores {
    rewards: Vec<Vec<f64>>,
    quality: Vec<f64>,
    cost: Vec<f64>,
}

impl Scores {
    fn of(router: &dyn Router, embeddings: &Array2<f32>, test: &Split, reward: Reward) -> Self {
        let n = test.len().max(1) as f64;
        let mut scores = Scores {
            rewards: Vec::new(),
            quality: Vec::new(),
            cost: Vec::new(),
        };
        for &w in &W_GRID {
            let choices = router.route(embeddings.view(), w);
            let (mut quality, mut cost) = (0.0, 0.0);
            let mut rewards = Vec::with_capacity(choices.len());
            for (prompt, &model) in choices.iter().enumerate() {
                let q = test.quality[[prompt, model]];
                let c = test.cost[[prompt, model]];
                quality += f64::from(q);
                cost += f64::from(c);
                rewards.push(f64::from(reward.reward(w, q, c)));
            }
            scores.rewards.push(rewards);
            scores.quality.push(quality / n);
            scores.cost.push(cost / n);
        }
        scores
    }

    /// Returns the mean reward per call at sweep point `point`.
    fn mean_reward(&self, point: usize) -> f64 {
        let rewards = &self.rewards[point];
        rewards.iter().sum::<f64>() / rewards.len().max(1) as f64
    }

    /// Returns the highest mean quality over the sweep points whose mean cost is at most
    /// `budget`, or `None` when no point is that cheap.
    fn best_quality_within(&self, budget: f64) -> Option<f64> {
        self.quality
            .iter()
            .zip(&self.cost)
            .filter(|&(_, &cost)| cost <= budget)
            .map(|(&quality, _)| quality)
            .reduce(f64::max)
    }
}

fn parse_args() -> Result<(String, u64, Option<f64>), String> {
    let mut name = "llmrouter-9llm".to_string();
    let mut seeds = 5u64;
    let mut budget = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seeds" => {
                let value = args.next().ok_or("--seeds needs a number")?;
                seeds = value
                    .parse()
                    .ok()
                    .filter(|&n| (1..=100).contains(&n))
                    .ok_or_else(|| format!("invalid --seeds value {value:?}; use 1 to 100"))?;
            }
            "--budget" => {
                let value = args.next().ok_or("--budget needs USD per call")?;
                budget = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|b: &f64| b.is_finite() && *b > 0.0)
                        .ok_or_else(|| {
                            format!("invalid --budget value {value:?}; use a positive USD amount")
                        })?,
                );
            }
            flag if flag.starts_with("--") => {
                return Err(format!(
                    "unknown option {flag}; use NAME, --seeds N or --budget USD"
                ));
            }
            _ => name = arg,
        }
    }
    Ok((name, seeds, budget))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (name, seeds, budget) = parse_args()?;
    let dataset = data::load(&name)?;
    let mut embedder = Embedder::load()?;
    let train_embeddings = embedder.embed(&dataset, "train", &dataset.train)?;
    let test_embeddings = embedder.embed(&dataset, "test", &dataset.test)?;
    let reward = training_reward(&dataset)?;
    let eval_seeds: Vec<u64> = (7..7 + seeds).collect();

    println!(
        "{name}: evaluation seeds {:?}, BaRP with {DEFAULT_INTERACTIONS_PER_PROMPT} draws per \
         training prompt, knn-full-info k = {DEFAULT_K}",
        eval_seeds
    );
    for EvalSplit {
        name: split,
        train_rows,
        test_rows,
        held_out,
    } in eval_splits(&dataset)?
    {
        let train_split = dataset.train.subset(&train_rows);
        let test_split = dataset.test.subset(&test_rows);
        let fit = train_embeddings.select(Axis(0), &train_rows);
        let test = test_embeddings.select(Axis(0), &test_rows);

        let knn = KnnRouter::new(
            fit.view(),
            train_split.quality.view(),
            train_split.cost.view(),
            reward,
            DEFAULT_K,
        )?;
        let knn = Scores::of(&knn, &test, &test_split, reward);
        let mut barp = Vec::new();
        let mut mlp = Vec::new();
        for &seed in &eval_seeds {
            let config = TrainConfig {
                seed: derive_seed(seed, &format!("barp/{split}")),
                interactions_per_prompt: Some(DEFAULT_INTERACTIONS_PER_PROMPT),
                ..TrainConfig::default()
            }
            .for_prompts(train_split.len());
            let mut environment = ReplayEnvironment::new(
                fit.view(),
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
            barp.push(Scores::of(
                &BarpRouter { network },
                &test,
                &test_split,
                reward,
            ));
            let mlp_config = MlpConfig {
                seed: derive_seed(seed, &format!("mlp-full-info/{split}")),
                ..MlpConfig::default()
            };
            let router = train_mlp(
                fit.view(),
                train_split.quality.view(),
                train_split.cost.view(),
                reward,
                &mlp_config,
            )?;
            mlp.push(Scores::of(&router, &test, &test_split, reward));
        }

        println!(
            "\n{split} split: {} training and {} test prompts{}",
            train_split.len(),
            test_split.len(),
            if split == "ood" {
                format!(", held out: {}", held_out.join(", "))
            } else {
                String::new()
            }
        );
        println!(
            "{:>5} {:>10} {:>8} {:>10} {:>10} {:>6} {:>14}",
            "w_q", "margin", "sd", "min", "max", "won", "SE (seed 7)"
        );
        let mut wins = vec![0usize; eval_seeds.len()];
        for (point, &w) in W_GRID.iter().enumerate() {
            let mut margins = Vec::new();
            for (s, (barp, mlp)) in barp.iter().zip(&mlp).enumerate() {
                let best = mlp.mean_reward(point).max(knn.mean_reward(point));
                let margin = barp.mean_reward(point) - best;
                if margin > 0.0 {
                    wins[s] += 1;
                }
                margins.push(margin);
            }
            let (mean, sd) = mean_and_std(&margins);
            let min = margins.iter().copied().fold(f64::INFINITY, f64::min);
            let max = margins.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let won = margins.iter().filter(|&&m| m > 0.0).count();
            let best = if mlp[0].mean_reward(point) >= knn.mean_reward(point) {
                &mlp[0]
            } else {
                &knn
            };
            let differences: Vec<f64> = barp[0].rewards[point]
                .iter()
                .zip(&best.rewards[point])
                .map(|(b, r)| b - r)
                .collect();
            let (_, sd_prompt) = mean_and_std(&differences);
            let standard_error = sd_prompt / (differences.len() as f64).sqrt();
            println!(
                "{w:>5.1} {mean:>+10.4} {sd:>8.4} {min:>+10.4} {max:>+10.4} {:>6} {standard_error:>14.4}",
                format!("{won}/{}", eval_seeds.len())
            );
        }

        let mean_costs = test_split.mean_cost();
        let mean_qualities = test_split.mean_quality();
        let best_single = (0..mean_qualities.len())
            .max_by(|&a, &b| mean_qualities[a].total_cmp(&mean_qualities[b]))
            .unwrap_or(0);
        let half_cost = mean_costs[best_single] / 2.0;
        println!(
            "best single model {}: quality {:.4} at {:.3e} USD per call",
            dataset.models[best_single], mean_qualities[best_single], mean_costs[best_single]
        );
        println!(
            "{:>6} {:>5} {:>12} {:>16} {:>20}",
            "seed",
            "wins",
            "q(w_q = 1)",
            "q, ≤ half cost",
            match budget {
                Some(budget) => format!("q, ≤ {budget:.3e} USD"),
                None => String::new(),
            }
        );
        let last = W_GRID.len() - 1;
        let show = |quality: Option<f64>| quality.map_or("none".to_string(), |q| format!("{q:.4}"));
        for (s, seed) in eval_seeds.iter().enumerate() {
            println!(
                "{seed:>6} {:>5} {:>12.4} {:>16} {:>20}",
                wins[s],
                barp[s].quality[last],
                show(barp[s].best_quality_within(half_cost)),
                budget.map_or(String::new(), |b| show(barp[s].best_quality_within(b)))
            );
        }
        let (wins_mean, wins_sd) =
            mean_and_std(&wins.iter().map(|&w| w as f64).collect::<Vec<_>>());
        let (q1_mean, q1_sd) =
            mean_and_std(&barp.iter().map(|b| b.quality[last]).collect::<Vec<_>>());
        println!(
            "  mean {wins_mean:>5.1} {q1_mean:>12.4}   (sd {wins_sd:.1} wins, {q1_sd:.4} quality)"
        );
    }
    Ok(())
}
