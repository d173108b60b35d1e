use ndarray::Array2;

use super::*;
use crate::baselines::linear::LinearBanditRouter;
use crate::baselines::tests::task_embeddings;
use crate::data::{ModelPrice, Split};

/// A tiny data set: 4 tasks, 3 models. Model 0 is cheap and good on task 0 only, model 1 is
/// mid-priced and good on tasks 0–2, model 2 is expensive and good everywhere.
fn tiny_dataset(cost_source: CostSource) -> (RoutingDataset, Array2<f32>, Array2<f32>) {
    let make = |n: usize, seed: u64| {
        let (embeddings, tasks) = task_embeddings(n, 4, 12, seed);
        let quality = Array2::from_shape_fn((n, 3), |(i, a)| match (a, tasks[i]) {
            (0, 0) | (1, 0..=2) | (2, _) => 0.9,
            _ => 0.1,
        });
        let cost = Array2::from_shape_fn((n, 3), |(i, a)| {
            [0.0001f32, 0.001, 0.01][a] * (1.0 + (i % 3) as f32 * 0.1)
        });
        let split = Split {
            prompts: (0..n).map(|i| format!("prompt {seed}-{i}")).collect(),
            tasks: tasks.iter().map(|t| format!("t{t}")).collect(),
            quality,
            cost,
        };
        (split, embeddings)
    };
    let (train, train_embeddings) = make(160, 1);
    let (test, test_embeddings) = make(80, 2);
    let models: Vec<String> = ["small", "medium", "large"]
        .iter()
        .map(|m| m.to_string())
        .collect();
    let dataset = RoutingDataset {
        name: "tiny".to_string(),
        prices: models
            .iter()
            .map(|model| ModelPrice {
                model: model.clone(),
                input_usd_per_million_tokens: 1.0,
                output_usd_per_million_tokens: 1.0,
            })
            .collect(),
        models,
        cost_source,
        train,
        test,
    };
    (dataset, train_embeddings, test_embeddings)
}

fn tiny_config() -> EvalConfig {
    EvalConfig {
        bandit_interactions: 600,
        bandit_batch_size: 8,
        mlp: MlpConfig {
            epochs: 20,
            ..MlpConfig::default()
        },
        knn_k: 5,
        held_out_tasks: Some(vec!["t3".to_string()]),
        ..EvalConfig::default()
    }
}

/// A stand-in BaRP trainer: LinUCB under another id, trained only through the environment.
struct Renamed(LinearBanditRouter);

impl Router for Renamed {
    fn id(&self) -> String {
        "barp".to_string()
    }

    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        self.0.route(embeddings, w_quality)
    }
}

fn stand_in_barp(
    env: &mut ReplayEnvironment<'_>,
    reward: Reward,
    seed: u64,
) -> Result<Box<dyn Router>, TrainerError> {
    let config = LinearBanditConfig {
        interactions: 600,
        batch_size: 8,
        ridge_lambda: 1.0,
        seed,
    };
    let router = train_linear_bandit(env, reward, Exploration::Ucb { alpha: 0.5 }, &config)?;
    Ok(Box::new(Renamed(router)))
}

fn tiny_report(cost_source: CostSource) -> EvalReport {
    let (dataset, train, test) = tiny_dataset(cost_source);
    let mut trainer = stand_in_barp;
    evaluate(
        &dataset,
        train.view(),
        test.view(),
        &tiny_config(),
        Some(&mut trainer),
    )
    .unwrap()
}

#[test]
fn rows_cover_every_router_and_point() {
    let report = tiny_report(CostSource::Recorded);
    let routers = report.router_ids();
    let expected = [
        "barp",
        "mlp-full-info",
        "knn-full-info",
        "linucb",
        "epsilon-greedy",
        "thompson",
        "random",
        "oracle",
        "single:small",
        "single:medium",
        "single:large",
    ];
    assert_eq!(routers, expected);
    assert_eq!(report.rows.len(), expected.len() * W_GRID.len() * 2);
    assert_eq!(report.splits[0].test_prompts, 80);
    assert_eq!(report.splits[1].held_out_tasks, vec!["t3"]);
    assert_eq!(report.splits[1].test_tasks, vec!["t3"]);
    assert!(!report.splits[1].train_tasks.contains(&"t3".to_string()));
}

#[test]
fn bandit_learners_pull_once_per_interaction() {
    let report = tiny_report(CostSource::Recorded);
    for split in &report.splits {
        for id in ["barp", "linucb", "epsilon-greedy", "thompson"] {
            assert_eq!(
                split.bandit_pulls.get(id),
                Some(&600),
                "{id} on {}",
                split.name
            );
        }
    }
}

#[test]
fn oracle_bounds_every_router() {
    let report = tiny_report(CostSource::Recorded);
    for row in &report.rows {
        let oracle = report
            .rows_of("oracle", &row.split)
            .into_iter()
            .find(|o| o.w_quality == row.w_quality)
            .unwrap();
        assert!(
            oracle.mean_reward >= row.mean_reward,
            "{} on {} at w={}: {} above oracle {}",
            row.router,
            row.split,
            row.w_quality,
            row.mean_reward,
            oracle.mean_reward
        );
    }
}

#[test]
fn shares_sum_to_one() {
    let report = tiny_report(CostSource::Recorded);
    for row in &report.rows {
        let total: f64 = row.shares.values().sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "{} at w={}: shares sum to {total}",
            row.router,
            row.w_quality
        );
        assert_eq!(row.shares.len(), 3);
    }
}

#[test]
fn learners_beat_random_in_distribution() {
    let report = tiny_report(CostSource::Recorded);
    let reward = |id: &str, w: f32| {
        report
            .rows_of(id, "id")
            .into_iter()
            .find(|row| row.w_quality == w)
            .unwrap()
            .mean_reward
    };
    for id in [
        "mlp-full-info",
        "knn-full-info",
        "linucb",
        "thompson",
        "epsilon-greedy",
        "barp",
    ] {
        for w in [0.2f32, 0.5, 0.8] {
            assert!(reward(id, w) > reward("random", w) + 0.05, "{id} at w={w}");
            assert!(reward("oracle", w) - reward(id, w) < 0.05, "{id} at w={w}");
        }
    }
}

#[test]
fn json_is_byte_identical_across_runs() {
    let first = tiny_report(CostSource::Recorded).to_json();
    let second = tiny_report(CostSource::Recorded).to_json();
    assert_eq!(first, second);
    let parsed: serde_json::Value = serde_json::from_str(&first).unwrap();
    let row = &parsed["rows"][0];
    let mut keys: Vec<&str> = row
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "mean_cost",
            "mean_quality",
            "mean_reward",
            "router",
            "shares",
            "split",
            "w_quality"
        ]
    );
}

#[test]
fn outputs_mark_estimated_costs() {
    let report = tiny_report(CostSource::Estimated {
        method: "bytes / 4 tokens".to_string(),
    });
    let dir = tempfile::tempdir().unwrap();
    let written = write_outputs(&report, dir.path()).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "eval.json",
            "report.md",
            "quality_cost_id.svg",
            "quality_cost_ood.svg"
        ]
    );

    let json = std::fs::read_to_string(dir.path().join("eval.json")).unwrap();
    assert!(json.contains("\"costs_are_estimates\": true"), "{json}");
    assert!(json.contains("\"kind\": \"estimated\""), "{json}");

    let markdown = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(
        markdown.contains("ESTIMATED USD per call: bytes / 4 tokens"),
        "{markdown}"
    );
    assert!(markdown.contains("cost USD/call (ESTIMATED)"), "{markdown}");
    assert!(
        markdown.contains("## Summary against targets"),
        "{markdown}"
    );
    assert!(markdown.contains("of 11 sweep points"), "{markdown}");
    assert!(
        markdown.contains("| ood | 120 | 20 | 0 | t3 |"),
        "{markdown}"
    );

    let text = render_text(&report);
    assert!(text.contains("USD/call (EST.)"), "{text}");
    assert!(text.contains("held-out tasks: t3"), "{text}");
    assert!(
        text.lines().all(|line| line.chars().count() <= 100),
        "{text}"
    );

    let svg = std::fs::read_to_string(dir.path().join("quality_cost_id.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("ESTIMATED"));
    assert_eq!(
        svg.matches("<polyline").count(),
        7,
        "one line per sweep router except random"
    );
    assert!(svg.contains(">random</text>"), "random is in the legend");
    assert!(svg.contains(">large</text>"));
}

#[test]
fn failed_output_keeps_previous_report() {
    let report = tiny_report(CostSource::Estimated {
        method: "bytes / 4 tokens".to_string(),
    });
    let dir = tempfile::tempdir().unwrap();
    let previous = ["eval.json", "quality_cost_id.svg", "quality_cost_ood.svg"];
    for name in previous {
        std::fs::write(dir.path().join(name), format!("previous {name}")).unwrap();
    }
    // A folder at report.md makes its rename fail after eval.json is already replaced.
    std::fs::create_dir(dir.path().join("report.md")).unwrap();
    std::fs::write(dir.path().join("report.md").join("notes.txt"), "kept").unwrap();

    let error = write_outputs(&report, dir.path()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("report.md"), "{message}");
    assert!(
        message.contains("previous files are unchanged"),
        "{message}"
    );
    for name in previous {
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(text, format!("previous {name}"), "{name} was changed");
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "eval.json",
            "quality_cost_id.svg",
            "quality_cost_ood.svg",
            "report.md"
        ],
        "a temporary file was left"
    );
}

#[test]
fn summary_compares_with_targets() {
    let report = tiny_report(CostSource::Recorded);
    let summaries = summarise_against_targets(&report, "barp");
    assert_eq!(summaries.len(), 2);
    let id = &summaries[0];
    assert_eq!(id.best_single_model, "large");
    assert!((id.best_single_quality - 0.9).abs() < 1e-6);
    assert_eq!(id.points, 11);
    assert!(id.points_beating_full_info <= 11);
    let (_, cost, fraction) = id
        .cheapest_match
        .expect("barp matches the best model at w = 1");
    assert!((fraction - cost / id.best_single_cost).abs() < 1e-12);
    assert!(summarise_against_targets(&report, "absent").is_empty());
}

#[test]
fn report_states_barp_settings_when_given() {
    let mut report = tiny_report(CostSource::Recorded);
    assert!(!render_markdown(&report).contains("| barp | REINFORCE"));
    report.barp = Some(crate::policy::TrainConfig {
        interactions_per_prompt: Some(200),
        ..Default::default()
    });
    let markdown = render_markdown(&report);
    let line = markdown
        .lines()
        .find(|line| line.starts_with("| barp | REINFORCE"))
        .expect("a barp row in the hyper-parameter table");
    for part in [
        "200 draws per training prompt (⌈prompts · 200 / 64⌉ steps)",
        "Adam lr 0.001 with cosine decay to 0.0001",
        "weight decay 0.1",
        "entropy bonus 0.05 → 0.005",
        "w_q ~ Beta(0.5, 0.5)",
        "(w_q, w_c, ℓ(w)) → 16 tanh, hidden 128 ReLU |",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    let json = report.to_json();
    let back: EvalReport = serde_json::from_str(&json).expect("JSON reads back");
    assert_eq!(back, report);
}

#[test]
fn runs_without_barp() {
    let (dataset, train, test) = tiny_dataset(CostSource::Recorded);
    let report = evaluate(&dataset, train.view(), test.view(), &tiny_config(), None).unwrap();
    assert!(report.rows_of("barp", "id").is_empty());
    assert!(render_markdown(&report).contains("barp was not evaluated"));
    assert!(render_text(&report).contains("barp: not evaluated"));
}

#[test]
fn embedding_count_mismatch_is_rejected() {
    let (dataset, train, test) = tiny_dataset(CostSource::Recorded);
    let short = train.slice(ndarray::s![..10, ..]);
    let error = evaluate(&dataset, short, test.view(), &tiny_config(), None).unwrap_err();
    assert!(matches!(error, EvalError::EmbeddingCount { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("10 train embeddings for 160 prompts"),
        "{error}"
    );
}

#[test]
fn held_out_task_absent_from_test_is_rejected() {
    let (dataset, train, test) = tiny_dataset(CostSource::Recorded);
    let config = EvalConfig {
        held_out_tasks: Some(vec!["t9".to_string()]),
        ..tiny_config()
    };
    let error = evaluate(&dataset, train.view(), test.view(), &config, None).unwrap_err();
    assert!(
        error.to_string().contains("ood split: no test prompts"),
        "{error}"
    );
}

#[test]
fn holding_out_every_task_is_rejected() {
    let (dataset, _, _) = tiny_dataset(CostSource::Recorded);
    let config = EvalConfig {
        held_out_tasks: Some(["t0", "t1", "t2", "t3"].map(String::from).to_vec()),
        ..tiny_config()
    };
    let error = check_splits(&dataset, &config).unwrap_err();
    assert!(matches!(error, EvalError::EmptySplit { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("ood split: no training prompts remain outside the held-out tasks"),
        "{message}"
    );
    assert!(message.contains("(t0, t1, t2, t3)"), "{message}");
    assert!(check_splits(&dataset, &tiny_config()).is_ok());
}

#[test]
fn unknown_dataset_needs_held_out_tasks() {
    let (dataset, train, test) = tiny_dataset(CostSource::Recorded);
    let config = EvalConfig {
        held_out_tasks: None,
        ..tiny_config()
    };
    let error = evaluate(&dataset, train.view(), test.view(), &config, None).unwrap_err();
    assert!(matches!(error, EvalError::NoHeldOutTasks { .. }), "{error}");
}

#[test]
fn held_out_families_match_prefixes() {
    let held_out = vec!["bbh".to_string(), "mbpp".to_string()];
    assert!(is_held_out("bbh/snarks", &held_out));
    assert!(is_held_out("mbpp", &held_out));
    assert!(!is_held_out("bbhx", &held_out));
    assert!(!is_held_out("mmlu", &held_out));
}

#[test]
fn known_datasets_hold_out_existing_test_tasks() {
    for name in crate::data::DATASET_NAMES {
        let dataset = crate::data::load(name).unwrap();
        let held_out: Vec<String> = held_out_tasks(name)
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect();
        for family in &held_out {
            let in_test = dataset
                .test
                .tasks
                .iter()
                .filter(|t| is_held_out(t, std::slice::from_ref(family)))
                .count();
            assert!(
                in_test > 0,
                "{name}: held-out family {family} has no test prompts"
            );
        }
    }
}
