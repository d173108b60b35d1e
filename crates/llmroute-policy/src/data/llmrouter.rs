//! `llmrouter-9llm`: per-query scores of 9 open LLMs on 14 tasks, from LLMRouter
//! (GitHub `ulab-uiuc/LLMRouter`, commit `4e7a796942ce26e9d5f2b93191c7c2585c99c2e3`, MIT).
//!
//! Files: `dcrouter_{train,test}.json` (JSON arrays of `{question, scores: {model: score}}`),
//! `query_{train,test}.jsonl` (the task of each question) and `llm_prices.json` (USD per
//! million input and output tokens). Train 5,608 prompts, test 500 prompts (10 tasks × 50).
//! Each dcrouter question gets its task from the query file of the same split whose `query`
//! equals it after trimming whitespace. Six questions appear twice in `query_train.jsonl`,
//! first under `mmlu` and later under `openbook_qa` or `arc_challenge`: the later row wins, so
//! they count under the benchmark whose answer format they have.
//!
//! NOTE: 119 questions of the train split also appear in the test split (upstream overlap).
//!
//! The data records no token counts, so per-call cost is an estimate ([`estimate_cost`]):
//!
//! `cost = (input_tokens · input_price + output_tokens · output_price) / 1e6` USD, with
//! `input_tokens = ceil(UTF-8 bytes of the prompt / 4)` and `output_tokens` from
//! [`OUTPUT_TOKENS_BY_TASK`].

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{CostSource, DataError, FileSource, ModelPrice, RoutingDataset, Score, Split};

const TRAIN: &[u8] = include_bytes!("../../../../data/llmrouter-9llm/dcrouter_train.json.gz");
const TEST: &[u8] = include_bytes!("../../../../data/llmrouter-9llm/dcrouter_test.json.gz");
const QUERY_TRAIN: &[u8] = include_bytes!("../../../../data/llmrouter-9llm/query_train.jsonl.gz");
const QUERY_TEST: &[u8] = include_bytes!("../../../../data/llmrouter-9llm/query_test.jsonl.gz");
const PRICES: &[u8] = include_bytes!("../../../../data/llmrouter-9llm/llm_prices.json.gz");

/// UTF-8 bytes per input token: the common rule of thumb of about 4 characters of English per
/// token for BPE tokenisers.
pub const BYTES_PER_TOKEN: usize = 4;

/// Estimated output tokens per task, chosen from each task's answer format: `(task, tokens,
/// answer format)`. The same for every model, because the data set records no per-model
/// answer lengths. These are judgement calls, not measurements.
pub const OUTPUT_TOKENS_BY_TASK: [(&str, u32, &str); 14] = [
    (
        "mmlu",
        32,
        "multiple-choice letter with a short justification",
    ),
    (
        "gpqa",
        32,
        "multiple-choice letter with a short justification",
    ),
    (
        "commonsense_qa",
        32,
        "multiple-choice letter with a short justification",
    ),
    (
        "openbook_qa",
        32,
        "multiple-choice letter with a short justification",
    ),
    (
        "arc_challenge",
        32,
        "multiple-choice letter with a short justification",
    ),
    ("natural_qa", 32, "short factual answer"),
    ("trivia_qa", 32, "short factual answer"),
    ("commongen", 48, "one generated sentence"),
    (
        "agentverse-logicgrid",
        256,
        "step-by-step deduction, then a choice",
    ),
    ("gsm8k", 256, "step-by-step arithmetic, then a number"),
    (
        "agentverse-mgsm",
        256,
        "step-by-step arithmetic, then a number",
    ),
    ("mbpp", 256, "one Python function"),
    ("human_eval", 256, "one Python function"),
    ("math", 512, "competition-math derivation, then an answer"),
];

/// Estimated input tokens of a prompt: `ceil(UTF-8 bytes / 4)`.
pub fn estimate_input_tokens(prompt: &str) -> u32 {
    prompt.len().div_ceil(BYTES_PER_TOKEN) as u32
}

/// Estimated output tokens for `task`, or `None` for a task missing from
/// [`OUTPUT_TOKENS_BY_TASK`].
pub fn estimate_output_tokens(task: &str) -> Option<u32> {
    OUTPUT_TOKENS_BY_TASK
        .iter()
        .find(|(name, _, _)| *name == task)
        .map(|(_, tokens, _)| *tokens)
}

/// Estimated USD of one call:
/// `(input_tokens · input_price + output_tokens · output_price) / 1e6`, prices in USD per
/// million tokens.
pub fn estimate_cost(input_tokens: u32, output_tokens: u32, price: &ModelPrice) -> f64 {
    (f64::from(input_tokens) * price.input_usd_per_million_tokens
        + f64::from(output_tokens) * price.output_usd_per_million_tokens)
        / 1e6
}

/// Describes the cost estimate in words, for [`CostSource::Estimated`] and every report.
pub fn estimate_method() -> String {
    let mut per_task = String::new();
    for (task, tokens, _) in OUTPUT_TOKENS_BY_TASK {
        if !per_task.is_empty() {
            per_task.push_str(", ");
        }
        per_task.push_str(&format!("{task} {tokens}"));
    }
    format!(
        "no token counts are recorded; cost = (input_tokens × input_price + output_tokens × \
         output_price) / 1e6 USD with list prices from llm_prices.json; input_tokens = \
         ceil(UTF-8 bytes of the prompt / {BYTES_PER_TOKEN}); output_tokens is a per-task \
         estimate from the answer format, the same for every model: {per_task}"
    )
}

#[derive(Deserialize)]
struct DcrouterRow {
    question: String,
    scores: BTreeMap<String, Score>,
}

#[derive(Deserialize)]
struct QueryRow {
    task_name: String,
    query: String,
}

#[derive(Deserialize)]
struct PriceEntry {
    input_price: f64,
    output_price: f64,
}

pub(crate) fn load(source: &FileSource) -> Result<RoutingDataset, DataError> {
    let price_table = read_prices(source)?;
    let train_rows = read_dcrouter(source, "dcrouter_train.json", TRAIN)?;
    let test_rows = read_dcrouter(source, "dcrouter_test.json", TEST)?;

    // Model order: alphabetical, from the first train row. Every other row must match it.
    let models: Vec<String> = match train_rows.first() {
        Some(row) => row.scores.keys().cloned().collect(),
        None => {
            return Err(DataError::InvalidFile {
                file: "dcrouter_train.json".to_string(),
                message: "no rows; the train split must hold at least one prompt".to_string(),
            });
        }
    };
    let mut prices = Vec::with_capacity(models.len());
    for model in &models {
        let entry = price_table
            .get(model)
            .ok_or_else(|| DataError::InvalidFile {
                file: "llm_prices.json".to_string(),
                message: format!(
                    "no price for model `{model}`; add its input_price and output_price"
                ),
            })?;
        prices.push(ModelPrice {
            model: model.clone(),
            input_usd_per_million_tokens: entry.input_price,
            output_usd_per_million_tokens: entry.output_price,
        });
    }

    let train_tasks = read_tasks(source, "query_train.jsonl", QUERY_TRAIN)?;
    let test_tasks = read_tasks(source, "query_test.jsonl", QUERY_TEST)?;
    let train = build(
        "dcrouter_train.json",
        "query_train.jsonl",
        train_rows,
        &train_tasks,
        &models,
        &prices,
    )?;
    let test = build(
        "dcrouter_test.json",
        "query_test.jsonl",
        test_rows,
        &test_tasks,
        &models,
        &prices,
    )?;
    Ok(RoutingDataset {
        name: "llmrouter-9llm".to_string(),
        models,
        cost_source: CostSource::Estimated {
            method: estimate_method(),
        },
        train,
        test,
        prices,
    })
}

fn read_prices(source: &FileSource) -> Result<HashMap<String, PriceEntry>, DataError> {
    let file = "llm_prices.json";
    let text = source.read(file, PRICES)?;
    let table: HashMap<String, PriceEntry> =
        serde_json::from_str(&text).map_err(|error| super::json_error(file, error))?;
    for (model, entry) in &table {
        let valid = |price: f64| price.is_finite() && price >= 0.0;
        if !valid(entry.input_price) || !valid(entry.output_price) {
            return Err(DataError::InvalidFile {
                file: file.to_string(),
                message: format!(
                    "model `{model}` has price {} / {} USD per million tokens; prices must be \
                     finite and non-negative",
                    entry.input_price, entry.output_price
                ),
            });
        }
    }
    Ok(table)
}

fn read_dcrouter(
    source: &FileSource,
    file: &str,
    embedded: &'static [u8],
) -> Result<Vec<DcrouterRow>, DataError> {
    let text = source.read(file, embedded)?;
    serde_json::from_str(&text).map_err(|error| super::json_error(file, error))
}

/// Maps each trimmed query text to its task; a text listed twice keeps the later task.
fn read_tasks(
    source: &FileSource,
    file: &str,
    embedded: &'static [u8],
) -> Result<HashMap<String, String>, DataError> {
    let text = source.read(file, embedded)?;
    let mut tasks = HashMap::new();
    let mut relabelled = 0usize;
    for (line, json) in super::json_lines(&text) {
        let row: QueryRow = serde_json::from_str(json).map_err(|error| DataError::Invalid {
            file: file.to_string(),
            line,
            message: error.to_string(),
        })?;
        if let Some(previous) = tasks.insert(row.query.trim().to_string(), row.task_name.clone())
            && previous != row.task_name
        {
            relabelled += 1;
        }
    }
    if relabelled > 0 {
        tracing::debug!(
            file,
            relabelled,
            "query texts listed under two tasks keep the later task"
        );
    }
    Ok(tasks)
}

fn build(
    file: &str,
    query_file: &str,
    rows: Vec<DcrouterRow>,
    tasks_by_query: &HashMap<String, String>,
    models: &[String],
    prices: &[ModelPrice],
) -> Result<Split, DataError> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut tasks = Vec::with_capacity(rows.len());
    let mut quality = Vec::with_capacity(rows.len() * models.len());
    let mut cost = Vec::with_capacity(rows.len() * models.len());
    for (index, row) in rows.into_iter().enumerate() {
        let describe = || {
            let start: String = row.question.chars().take(60).collect();
            format!("element {index} (question {start:?})")
        };
        if row.scores.len() != models.len() || !row.scores.keys().eq(models.iter()) {
            let found: Vec<&String> = row.scores.keys().collect();
            return Err(DataError::InvalidFile {
                file: file.to_string(),
                message: format!(
                    "{} has scores for {found:?}, expected exactly the models {models:?}",
                    describe()
                ),
            });
        }
        let task =
            tasks_by_query
                .get(row.question.trim())
                .ok_or_else(|| DataError::InvalidFile {
                    file: file.to_string(),
                    message: format!(
                        "{}: no query with this text in {query_file}, so its task is unknown",
                        describe()
                    ),
                })?;
        let output_tokens = estimate_output_tokens(task).ok_or_else(|| DataError::InvalidFile {
            file: file.to_string(),
            message: format!(
                "{}: task `{task}` has no output-token estimate; add it to \
                 OUTPUT_TOKENS_BY_TASK",
                describe()
            ),
        })?;
        let input_tokens = estimate_input_tokens(&row.question);
        for (score, price) in row.scores.values().zip(prices) {
            quality.push(score.0);
            cost.push(estimate_cost(input_tokens, output_tokens, price) as f32);
        }
        tasks.push(task.clone());
        prompts.push(row.question);
    }
    super::build_split(file, prompts, tasks, quality, cost, models.len())
}

#[cfg(test)]
mod tests {
    use super::super::tests::write_gz;
    use super::super::{DataError, load, load_from_dir};
    use super::*;

    #[test]
    fn embedded_counts_match_source() {
        let dataset = load("llmrouter-9llm").unwrap();
        assert_eq!(dataset.train.len(), 5608);
        assert_eq!(dataset.test.len(), 500);
        assert_eq!(dataset.models.len(), 9);
        assert_eq!(dataset.prices.len(), 9);
        let mut all_tasks = dataset.train.task_names();
        all_tasks.extend(dataset.test.task_names());
        all_tasks.sort();
        all_tasks.dedup();
        assert_eq!(all_tasks.len(), 14);
        assert_eq!(dataset.test.task_names().len(), 10);
        for task in dataset.test.task_names() {
            assert_eq!(
                dataset.test.tasks.iter().filter(|t| **t == task).count(),
                50
            );
        }
        assert!(dataset.cost_source.is_estimate());
    }

    #[test]
    fn embedded_train_means_match_source() {
        let dataset = load("llmrouter-9llm").unwrap();
        let means = dataset.train.mean_quality();
        let index = |name: &str| dataset.models.iter().position(|m| m == name).unwrap();
        assert!((means[index("llama3-chatqa-1.5-8b")] - 0.175).abs() < 0.001);
        assert!((means[index("llama-3.1-nemotron-51b-instruct")] - 0.621).abs() < 0.001);
    }

    #[test]
    fn cost_estimate_follows_formula() {
        let price = ModelPrice {
            model: "m".into(),
            input_usd_per_million_tokens: 0.2,
            output_usd_per_million_tokens: 0.9,
        };
        assert_eq!(estimate_input_tokens("abcde"), 2);
        assert_eq!(estimate_input_tokens("é"), 1);
        assert_eq!(estimate_output_tokens("math"), Some(512));
        assert_eq!(estimate_output_tokens("unknown"), None);
        let expected = (2.0 * 0.2 + 512.0 * 0.9) / 1e6;
        assert!((estimate_cost(2, 512, &price) - expected).abs() < 1e-15);

        let dataset = load("llmrouter-9llm").unwrap();
        let row = 0;
        let prompt = &dataset.train.prompts[row];
        let task = &dataset.train.tasks[row];
        for (k, price) in dataset.prices.iter().enumerate() {
            let estimate = estimate_cost(
                estimate_input_tokens(prompt),
                estimate_output_tokens(task).unwrap(),
                price,
            ) as f32;
            assert_eq!(dataset.train.cost[[row, k]], estimate);
        }
    }

    /// Copies the embedded files to a temporary folder, replacing `file` with `contents`.
    fn folder_with(file: &str, contents: Option<&[u8]>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let files: [(&str, &[u8]); 5] = [
            ("dcrouter_train.json", TRAIN),
            ("dcrouter_test.json", TEST),
            ("query_train.jsonl", QUERY_TRAIN),
            ("query_test.jsonl", QUERY_TEST),
            ("llm_prices.json", PRICES),
        ];
        for (name, bytes) in files {
            if name == file {
                if let Some(contents) = contents {
                    write_gz(dir.path(), name, contents);
                }
            } else {
                std::fs::write(dir.path().join(format!("{name}.gz")), bytes).unwrap();
            }
        }
        dir
    }

    #[test]
    fn folder_copy_loads_like_embedded() {
        let dir = folder_with("", None);
        let from_dir = load_from_dir("llmrouter-9llm", dir.path()).unwrap();
        assert_eq!(from_dir, load("llmrouter-9llm").unwrap());
    }

    #[test]
    fn missing_file_is_named() {
        let dir = folder_with("llm_prices.json", None);
        let error = load_from_dir("llmrouter-9llm", dir.path()).unwrap_err();
        assert!(matches!(error, DataError::Io { .. }), "{error}");
        assert!(error.to_string().contains("llm_prices.json.gz"), "{error}");
    }

    #[test]
    fn score_out_of_range_names_line() {
        let text = b"[\n {\"question\": \"q\",\n  \"scores\": {\"a\": 1.5}}\n]";
        let dir = folder_with("dcrouter_test.json", Some(text));
        let error = load_from_dir("llmrouter-9llm", dir.path()).unwrap_err();
        match &error {
            DataError::Invalid {
                file,
                line,
                message,
            } => {
                assert_eq!(file, "dcrouter_test.json");
                assert_eq!(*line, 3);
                assert!(message.contains("outside [0, 1]"), "{message}");
            }
            other => panic!("expected DataError::Invalid, got {other}"),
        }
    }

    #[test]
    fn missing_model_score_is_rejected() {
        let text = br#"[{"question": "What is 2+2?", "scores": {"gemma-2-9b-it": 1.0}}]"#;
        let dir = folder_with("dcrouter_test.json", Some(text));
        let error = load_from_dir("llmrouter-9llm", dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("dcrouter_test.json"), "{message}");
        assert!(message.contains("expected exactly the models"), "{message}");
    }

    #[test]
    fn unmatched_question_is_rejected() {
        let scores: Vec<String> = load("llmrouter-9llm")
            .unwrap()
            .models
            .iter()
            .map(|m| format!("\"{m}\": 0.5"))
            .collect();
        let text = format!(
            "[{{\"question\": \"not in any query file\", \"scores\": {{{}}}}}]",
            scores.join(", ")
        );
        let dir = folder_with("dcrouter_test.json", Some(text.as_bytes()));
        let message = load_from_dir("llmrouter-9llm", dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("no query with this text in query_test.jsonl"),
            "{message}"
        );
    }

    #[test]
    fn empty_test_split_is_rejected() {
        let dir = folder_with("dcrouter_test.json", Some(b"[]"));
        let message = load_from_dir("llmrouter-9llm", dir.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("dcrouter_test.json"), "{message}");
        assert!(message.contains("no prompts"), "{message}");
    }

    #[test]
    fn truncated_gzip_is_rejected() {
        let dir = folder_with("", None);
        let path = dir.path().join("dcrouter_train.json.gz");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let error = load_from_dir("llmrouter-9llm", dir.path()).unwrap_err();
        assert!(matches!(error, DataError::Decompress { .. }), "{error}");
        assert!(
            error.to_string().contains("dcrouter_train.json.gz"),
            "{error}"
        );
    }

    #[test]
    fn corrupt_query_line_is_named() {
        let text = b"{\"task_name\": \"mmlu\", \"query\": \"q\"}\nnot json\n";
        let dir = folder_with("query_test.jsonl", Some(text));
        let error = load_from_dir("llmrouter-9llm", dir.path()).unwrap_err();
        match &error {
            DataError::Invalid { file, line, .. } => {
                assert_eq!(file, "query_test.jsonl");
                assert_eq!(*line, 2);
            }
            other => panic!("expected DataError::Invalid, got {other}"),
        }
    }
}
