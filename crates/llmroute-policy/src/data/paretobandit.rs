//! `paretobandit-k3` and `paretobandit-k4`: LLM-as-judge quality and recorded USD cost of 3 or
//! 4 commercial LLMs, from ParetoBandit (GitHub `ParetoBandit/ParetoBandit`, commit
//! `72ccbefe5cb858c95e00368e2b68de3c2b28a2ee`, Apache-2.0).
//!
//! Files: `{val,test}.jsonl` (K=3) and `{val,test}_k4.jsonl` (K=4), JSON Lines of
//! `{prompt, source, arms: {model_id: {reward, cost}}}`, and `models_k{3,4}.json` with the pool
//! in action order and list prices. Quality is the judge's score in [0, 1] (DeepSeek-R1,
//! rubric: reasoning 40 %, instruction following 30 %, communication 30 %). Cost is the USD
//! charged for the call. llmroute trains on `val` and tests on `test`, because the upstream
//! train split is not part of the copy. The task of a prompt is its `source` benchmark, for
//! example `mmlu` or `bbh/snarks`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Cost, CostSource, DataError, FileSource, ModelPrice, RoutingDataset, Score, Split};

const VAL_K3: &[u8] = include_bytes!("../../../../data/paretobandit-k3k4/val.jsonl.gz");
const TEST_K3: &[u8] = include_bytes!("../../../../data/paretobandit-k3k4/test.jsonl.gz");
const VAL_K4: &[u8] = include_bytes!("../../../../data/paretobandit-k3k4/val_k4.jsonl.gz");
const TEST_K4: &[u8] = include_bytes!("../../../../data/paretobandit-k3k4/test_k4.jsonl.gz");
const MODELS_K3: &[u8] = include_bytes!("../../../../data/paretobandit-k3k4/models_k3.json.gz");
const MODELS_K4: &[u8] = include_bytes!("../../../../data/paretobandit-k3k4/models_k4.json.gz");

/// Model pool of the ParetoBandit data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// llama-3.1-8b-instruct, mistral-large-2512, gemini-2.5-pro.
    K3,
    /// The K=3 pool plus gemini-2.5-flash.
    K4,
}

impl Pool {
    /// `(data set name, models file, train file, test file)` with embedded copies.
    fn files(self) -> (&'static str, [(&'static str, &'static [u8]); 3]) {
        match self {
            Pool::K3 => (
                "paretobandit-k3",
                [
                    ("models_k3.json", MODELS_K3),
                    ("val.jsonl", VAL_K3),
                    ("test.jsonl", TEST_K3),
                ],
            ),
            Pool::K4 => (
                "paretobandit-k4",
                [
                    ("models_k4.json", MODELS_K4),
                    ("val_k4.jsonl", VAL_K4),
                    ("test_k4.jsonl", TEST_K4),
                ],
            ),
        }
    }
}

#[derive(Deserialize)]
struct ModelsFile {
    models: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    model_id: String,
    input_cost_per_m: f64,
    output_cost_per_m: f64,
}

#[derive(Deserialize)]
struct Line {
    prompt: String,
    source: String,
    arms: BTreeMap<String, Arm>,
}

#[derive(Deserialize)]
struct Arm {
    reward: Score,
    cost: Cost,
}

pub(crate) fn load(source: &FileSource, pool: Pool) -> Result<RoutingDataset, DataError> {
    let (
        name,
        [
            (models_file, models_bytes),
            (train_file, train_bytes),
            (test_file, test_bytes),
        ],
    ) = pool.files();
    let prices = read_models(source, models_file, models_bytes)?;
    let models: Vec<String> = prices.iter().map(|price| price.model.clone()).collect();
    let train = read_split(source, train_file, train_bytes, &models)?;
    let test = read_split(source, test_file, test_bytes, &models)?;
    Ok(RoutingDataset {
        name: name.to_string(),
        models,
        cost_source: CostSource::Recorded,
        train,
        test,
        prices,
    })
}

fn read_models(
    source: &FileSource,
    file: &str,
    embedded: &'static [u8],
) -> Result<Vec<ModelPrice>, DataError> {
    let text = source.read(file, embedded)?;
    let parsed: ModelsFile =
        serde_json::from_str(&text).map_err(|error| super::json_error(file, error))?;
    if parsed.models.is_empty() {
        return Err(DataError::InvalidFile {
            file: file.to_string(),
            message: "`models` is empty; list at least one model".to_string(),
        });
    }
    let mut prices = Vec::with_capacity(parsed.models.len());
    for entry in parsed.models {
        let valid = |price: f64| price.is_finite() && price >= 0.0;
        if !valid(entry.input_cost_per_m) || !valid(entry.output_cost_per_m) {
            return Err(DataError::InvalidFile {
                file: file.to_string(),
                message: format!(
                    "model `{}` has price {} / {} USD per million tokens; prices must be finite \
                     and non-negative",
                    entry.model_id, entry.input_cost_per_m, entry.output_cost_per_m
                ),
            });
        }
        if prices
            .iter()
            .any(|price: &ModelPrice| price.model == entry.model_id)
        {
            return Err(DataError::InvalidFile {
                file: file.to_string(),
                message: format!("model `{}` is listed twice", entry.model_id),
            });
        }
        prices.push(ModelPrice {
            model: entry.model_id,
            input_usd_per_million_tokens: entry.input_cost_per_m,
            output_usd_per_million_tokens: entry.output_cost_per_m,
        });
    }
    Ok(prices)
}

fn read_split(
    source: &FileSource,
    file: &str,
    embedded: &'static [u8],
    models: &[String],
) -> Result<Split, DataError> {
    let text = source.read(file, embedded)?;
    let mut prompts = Vec::new();
    let mut tasks = Vec::new();
    let mut quality = Vec::new();
    let mut cost = Vec::new();
    for (line_number, json) in super::json_lines(&text) {
        let invalid = |message: String| DataError::Invalid {
            file: file.to_string(),
            line: line_number,
            message,
        };
        let line: Line = serde_json::from_str(json).map_err(|error| invalid(error.to_string()))?;
        if line.arms.len() != models.len() {
            let found: Vec<&String> = line.arms.keys().collect();
            return Err(invalid(format!(
                "outcomes for {found:?}, expected exactly the models {models:?}"
            )));
        }
        for model in models {
            let arm = line.arms.get(model).ok_or_else(|| {
                invalid(format!(
                    "no outcome for model `{model}`; every row needs every model"
                ))
            })?;
            quality.push(arm.reward.0);
            cost.push(arm.cost.0);
        }
        prompts.push(line.prompt);
        tasks.push(line.source);
    }
    super::build_split(file, prompts, tasks, quality, cost, models.len())
}

#[cfg(test)]
mod tests {
    use super::super::tests::write_gz;
    use super::super::{load, load_from_dir};
    use super::*;

    #[test]
    fn embedded_counts_match_source() {
        let k3 = load("paretobandit-k3").unwrap();
        assert_eq!(k3.train.len(), 1785);
        assert_eq!(k3.test.len(), 1824);
        assert_eq!(k3.models.len(), 3);
        let k4 = load("paretobandit-k4").unwrap();
        assert_eq!(k4.train.len(), 1766);
        assert_eq!(k4.test.len(), 1793);
        assert_eq!(k4.models.len(), 4);
        assert_eq!(k4.cost_source, CostSource::Recorded);
        assert_eq!(k4.models[2], "google/gemini-2.5-flash");
    }

    #[test]
    fn embedded_k4_means_match_source() {
        let k4 = load("paretobandit-k4").unwrap();
        let quality = k4.train.mean_quality();
        let cost = k4.train.mean_cost();
        // Means over val_k4, in the order of models_k4.json.
        let expected = [
            (0.790, 0.000029),
            (0.926, 0.00049),
            (0.929, 0.00090),
            (0.936, 0.0150),
        ];
        for (k, (q, c)) in expected.into_iter().enumerate() {
            assert!(
                (quality[k] - q).abs() < 0.001,
                "model {k}: quality {}",
                quality[k]
            );
            assert!(
                (cost[k] - c).abs() / c < 0.02,
                "model {k}: cost {}",
                cost[k]
            );
        }
    }

    #[test]
    fn line_separator_stays_inside_prompt() {
        let k3 = load("paretobandit-k3").unwrap();
        // One val.jsonl prompt contains two U+2028; splitting on them would break the row.
        let with_separator = k3
            .train
            .prompts
            .iter()
            .filter(|p| p.contains('\u{2028}'))
            .count();
        let separators: usize = k3
            .train
            .prompts
            .iter()
            .map(|p| p.matches('\u{2028}').count())
            .sum();
        assert_eq!(with_separator, 1);
        assert_eq!(separators, 2);
        assert_eq!(k3.train.len(), 1785);
    }

    fn folder_with(file: &str, contents: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in Pool::K3.files().1 {
            std::fs::write(dir.path().join(format!("{name}.gz")), bytes).unwrap();
        }
        write_gz(dir.path(), file, contents);
        dir
    }

    #[test]
    fn negative_cost_names_line() {
        let good = r#"{"prompt": "p", "source": "mmlu", "arms": {"meta-llama/llama-3.1-8b-instruct": {"reward": 1, "cost": 0.1}, "mistralai/mistral-large-2512": {"reward": 1, "cost": 0.1}, "google/gemini-2.5-pro": {"reward": 1, "cost": 0.1}}}"#;
        let bad = good.replacen("0.1", "-0.1", 1);
        let dir = folder_with("test.jsonl", format!("{good}\n{bad}\n").as_bytes());
        let error = load_from_dir("paretobandit-k3", dir.path()).unwrap_err();
        match &error {
            DataError::Invalid {
                file,
                line,
                message,
            } => {
                assert_eq!(file, "test.jsonl");
                assert_eq!(*line, 2);
                assert!(message.contains("negative or not finite"), "{message}");
            }
            other => panic!("expected DataError::Invalid, got {other}"),
        }
    }

    #[test]
    fn missing_arm_names_line() {
        let line = r#"{"prompt": "p", "source": "mmlu", "arms": {"meta-llama/llama-3.1-8b-instruct": {"reward": 1, "cost": 0.1}, "mistralai/mistral-large-2512": {"reward": 1, "cost": 0.1}, "google/gemini-2.5-flash": {"reward": 1, "cost": 0.1}}}"#;
        let dir = folder_with("val.jsonl", line.as_bytes());
        let message = load_from_dir("paretobandit-k3", dir.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("val.jsonl, line 1"), "{message}");
        assert!(message.contains("google/gemini-2.5-pro"), "{message}");
    }

    #[test]
    fn truncated_line_names_line() {
        let dir = folder_with("test.jsonl", b"{\"prompt\": \"p\", \"source\"");
        let message = load_from_dir("paretobandit-k3", dir.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("test.jsonl, line 1"), "{message}");
    }

    #[test]
    fn empty_split_is_rejected() {
        let dir = folder_with("val.jsonl", b"\n\n");
        let message = load_from_dir("paretobandit-k3", dir.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("val.jsonl"), "{message}");
        assert!(message.contains("no prompts"), "{message}");
    }

    #[test]
    fn corrupt_gzip_is_rejected() {
        let dir = folder_with("val.jsonl", b"x");
        std::fs::write(dir.path().join("val.jsonl.gz"), b"not gzip at all").unwrap();
        let error = load_from_dir("paretobandit-k3", dir.path()).unwrap_err();
        assert!(matches!(error, DataError::Decompress { .. }), "{error}");
    }
}
