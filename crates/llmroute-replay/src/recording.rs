//! The recorded outcomes replay-llm answers from, looked up by prompt text.

use std::collections::HashMap;

use llmroute_policy::data::{ModelPrice, RoutingDataset, Split, llmrouter::estimate_input_tokens};

/// Splits of the data set that replay-llm serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitChoice {
    Train,
    Test,
    /// Both splits; a prompt in both gets its training-split record.
    All,
}

impl std::str::FromStr for SplitChoice {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "train" => Ok(SplitChoice::Train),
            "test" => Ok(SplitChoice::Test),
            "all" => Ok(SplitChoice::All),
            _ => Err(format!(
                "invalid split {value:?}: expected train, test or all"
            )),
        }
    }
}

/// Recorded quality and cost of every model for one prompt, in the data set's model order.
#[derive(Debug, Clone)]
struct PromptRecord {
    quality: Vec<f32>,
    cost: Vec<f32>,
}

/// A data set indexed by prompt text (leading and trailing whitespace ignored).
#[derive(Debug)]
pub struct Recording {
    dataset: String,
    models: Vec<String>,
    prices: Vec<ModelPrice>,
    by_prompt: HashMap<String, PromptRecord>,
}

/// One model's recorded outcome for one prompt, as replay-llm returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedAnswer {
    pub model: String,
    /// Recorded quality score in `[0, 1]`.
    pub quality: f32,
    /// Recorded cost of the call in USD.
    pub cost_usd: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Response text. The data sets record no response texts, so it names the model and figures.
    pub content: String,
}

/// A lookup that finds no recorded outcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LookupError {
    #[error("model {model:?} is not in data set {dataset}; its models are: {known}")]
    UnknownModel {
        model: String,
        dataset: String,
        known: String,
    },
    #[error(
        "the prompt ({bytes} bytes) is not recorded in data set {dataset}; replay-llm only answers the data set's prompts, sent verbatim as the last user message or as `prompt`"
    )]
    UnknownPrompt { bytes: usize, dataset: String },
}

impl Recording {
    /// Indexes the chosen splits of `dataset` by prompt.
    pub fn new(dataset: &RoutingDataset, splits: SplitChoice) -> Self {
        let mut by_prompt = HashMap::new();
        let chosen: Vec<&Split> = match splits {
            SplitChoice::Train => vec![&dataset.train],
            SplitChoice::Test => vec![&dataset.test],
            SplitChoice::All => vec![&dataset.train, &dataset.test],
        };
        for split in chosen {
            for (row, prompt) in split.prompts.iter().enumerate() {
                by_prompt
                    .entry(prompt.trim().to_string())
                    .or_insert_with(|| PromptRecord {
                        quality: split.quality.row(row).to_vec(),
                        cost: split.cost.row(row).to_vec(),
                    });
            }
        }
        Self {
            dataset: dataset.name.clone(),
            models: dataset.models.clone(),
            prices: dataset.prices.clone(),
            by_prompt,
        }
    }

    /// Name of the data set.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// Model names in the data set's order.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// List prices, in the order of [`Recording::models`].
    pub fn prices(&self) -> &[ModelPrice] {
        &self.prices
    }

    /// Number of distinct prompts answered.
    pub fn len(&self) -> usize {
        self.by_prompt.len()
    }

    /// Tests whether no prompt is recorded.
    pub fn is_empty(&self) -> bool {
        self.by_prompt.is_empty()
    }

    /// Looks up `model`'s recorded outcome for `prompt`.
    pub fn answer(&self, model: &str, prompt: &str) -> Result<RecordedAnswer, LookupError> {
        let index = self.models.iter().position(|m| m == model).ok_or_else(|| {
            LookupError::UnknownModel {
                model: model.to_string(),
                dataset: self.dataset.clone(),
                known: self.models.join(", "),
            }
        })?;
        let record =
            self.by_prompt
                .get(prompt.trim())
                .ok_or_else(|| LookupError::UnknownPrompt {
                    bytes: prompt.len(),
                    dataset: self.dataset.clone(),
                })?;
        let quality = record.quality[index];
        let cost_usd = f64::from(record.cost[index]);
        let (prompt_tokens, completion_tokens) =
            usage_for_cost(prompt.trim(), cost_usd, &self.prices[index]);
        let content = format!(
            "Recorded outcome of {model} in {}: quality {quality:.3}, cost {cost_usd:.8} USD.",
            self.dataset
        );
        Ok(RecordedAnswer {
            model: model.to_string(),
            quality,
            cost_usd,
            prompt_tokens,
            completion_tokens,
            content,
        })
    }
}

/// Derives token counts whose price matches a recorded cost: the prompt gets the estimate
/// `ceil(UTF-8 bytes / 4)` (the one the `llmrouter-9llm` costs were computed with), and the
/// rest of the cost becomes output tokens, rounded. When the estimated prompt alone would cost
/// more than the recording, every token is an input token instead.
///
/// The price of the returned usage is within one token's price of `cost_usd`.
pub fn usage_for_cost(prompt: &str, cost_usd: f64, price: &ModelPrice) -> (u64, u64) {
    let micro_usd = cost_usd.max(0.0) * 1e6;
    let input_price = price.input_usd_per_million_tokens;
    let output_price = price.output_usd_per_million_tokens;
    let prompt_tokens = u64::from(estimate_input_tokens(prompt));
    let remaining = micro_usd - prompt_tokens as f64 * input_price;
    if remaining >= 0.0 && output_price > 0.0 {
        return (prompt_tokens, (remaining / output_price).round() as u64);
    }
    if input_price > 0.0 {
        return ((micro_usd / input_price).round() as u64, 0);
    }
    // Both prices are zero (or only the output price is, and the prompt costs too much), so
    // any usage matches the cost equally well.
    (prompt_tokens, 0)
}

#[cfg(test)]
mod tests {
    use llmroute_policy::data::{DATASET_NAMES, load};

    use super::*;

    fn cost_of(usage: (u64, u64), price: &ModelPrice) -> f64 {
        (usage.0 as f64 * price.input_usd_per_million_tokens
            + usage.1 as f64 * price.output_usd_per_million_tokens)
            / 1e6
    }

    #[test]
    fn usage_matches_every_recorded_cost() {
        for name in DATASET_NAMES {
            let dataset = load(name).unwrap();
            for split in [&dataset.train, &dataset.test] {
                for (row, prompt) in split.prompts.iter().enumerate() {
                    for (k, price) in dataset.prices.iter().enumerate() {
                        let recorded = f64::from(split.cost[[row, k]]);
                        let usage = usage_for_cost(prompt.trim(), recorded, price);
                        let one_token = price
                            .input_usd_per_million_tokens
                            .max(price.output_usd_per_million_tokens)
                            / 1e6;
                        let difference = (cost_of(usage, price) - recorded).abs();
                        assert!(
                            difference <= one_token * 0.5 + recorded * 1e-6,
                            "{name} row {row} model {}: usage {usage:?} costs {} but {recorded} was recorded",
                            price.model,
                            cost_of(usage, price)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn expensive_prompt_becomes_input_tokens() {
        let price = ModelPrice {
            model: "m".to_string(),
            input_usd_per_million_tokens: 1.0,
            output_usd_per_million_tokens: 2.0,
        };
        // 400 bytes estimate 100 input tokens = 1e-4 USD, more than the recorded 5e-5.
        let usage = usage_for_cost(&"x".repeat(400), 5e-5, &price);
        assert_eq!(usage, (50, 0));
    }

    #[test]
    fn answer_returns_recorded_row() {
        let dataset = load("paretobandit-k3").unwrap();
        let recording = Recording::new(&dataset, SplitChoice::Test);
        let prompt = &dataset.test.prompts[3];
        let model = &dataset.models[1];
        let answer = recording.answer(model, &format!("  {prompt}\n")).unwrap();
        assert_eq!(answer.quality, dataset.test.quality[[3, 1]]);
        assert_eq!(answer.cost_usd, f64::from(dataset.test.cost[[3, 1]]));
        assert!(answer.content.contains(model.as_str()));
    }

    #[test]
    fn lookup_errors_name_the_problem() {
        let dataset = load("paretobandit-k3").unwrap();
        let recording = Recording::new(&dataset, SplitChoice::All);
        let unknown_model = recording.answer("gpt-x", "hello").unwrap_err();
        assert!(unknown_model.to_string().contains("\"gpt-x\""));
        let unknown_prompt = recording
            .answer(&dataset.models[0], "not a recorded prompt")
            .unwrap_err();
        assert!(
            unknown_prompt.to_string().contains("not recorded"),
            "{unknown_prompt}"
        );
        assert!(!unknown_prompt.to_string().contains("not a recorded prompt"));
    }
}
