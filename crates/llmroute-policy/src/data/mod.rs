//! Routing data sets: recorded per-model quality and cost for every prompt.
//!
//! Every data set loads into one shape, [`RoutingDataset`]: a fixed model order (the action
//! order of every router) and a train and a test [`Split`]. Each split has one quality score
//! in [0, 1] and one cost in USD per (prompt, model) pair. Known data sets ([`DATASET_NAMES`]):
//!
//! - `llmrouter-9llm`: 9 open LLMs on 14 tasks (LLMRouter, ulab-uiuc, MIT licence). Costs are
//!   estimated from prices and token-count estimates; see [`llmrouter`].
//! - `paretobandit-k3`, `paretobandit-k4`: 3 or 4 commercial LLMs, LLM-as-judge quality and
//!   recorded USD costs (ParetoBandit, Apache-2.0). Train on `val`, test on `test`.
//!
//! The gzipped source files sit in `data/` at the workspace root and are embedded in the
//! binary with `include_bytes!`, so [`load`] works from any directory. [`load_from_dir`] reads
//! the same file names from a folder instead.

pub mod llmrouter;
pub mod paretobandit;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use ndarray::{Array2, Axis};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Names accepted by [`load`] and [`load_from_dir`].
pub const DATASET_NAMES: [&str; 3] = ["llmrouter-9llm", "paretobandit-k3", "paretobandit-k4"];

/// Failure to load a routing data set. Every variant names the file involved.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("unknown data set `{name}`; known data sets: {}", DATASET_NAMES.join(", "))]
    UnknownDataset { name: String },
    #[error("cannot read data file {path}: {source}; check that it exists and is readable")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot decompress data file {file}: {source}; the gzip stream is truncated, corrupt or \
         not UTF-8, so replace it with an intact copy"
    )]
    Decompress {
        file: String,
        source: std::io::Error,
    },
    #[error("invalid data in {file}, line {line}: {message}")]
    Invalid {
        file: String,
        line: usize,
        message: String,
    },
    #[error("invalid data in {file}: {message}")]
    InvalidFile { file: String, message: String },
}

/// Origin of the per-call costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CostSource {
    /// USD actually charged for each recorded call.
    Recorded,
    /// USD estimated from prices and token-count estimates, by `method`.
    Estimated { method: String },
}

impl CostSource {
    /// Returns true when the costs are estimates rather than recorded charges.
    pub fn is_estimate(&self) -> bool {
        matches!(self, CostSource::Estimated { .. })
    }
}

impl fmt::Display for CostSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CostSource::Recorded => write!(f, "recorded USD per call"),
            CostSource::Estimated { method } => write!(f, "ESTIMATED USD per call: {method}"),
        }
    }
}

/// List price of one model, in USD per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPrice {
    pub model: String,
    pub input_usd_per_million_tokens: f64,
    pub output_usd_per_million_tokens: f64,
}

/// Prompts with every model's recorded outcome. Row `i` of `quality` and `cost` belongs to
/// `prompts[i]`; column `k` belongs to model `k` of [`RoutingDataset::models`].
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub prompts: Vec<String>,
    /// Task (benchmark) of each prompt.
    pub tasks: Vec<String>,
    /// Quality score in [0, 1], `[prompts × models]`.
    pub quality: Array2<f32>,
    /// Cost in USD per call, `[prompts × models]`.
    pub cost: Array2<f32>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn num_models(&self) -> usize {
        self.quality.ncols()
    }

    /// Copies the rows at `indices`, in that order. Panics on an index out of range, which is
    /// a caller bug rather than bad input.
    pub fn subset(&self, indices: &[usize]) -> Split {
        Split {
            prompts: indices.iter().map(|&i| self.prompts[i].clone()).collect(),
            tasks: indices.iter().map(|&i| self.tasks[i].clone()).collect(),
            quality: self.quality.select(Axis(0), indices),
            cost: self.cost.select(Axis(0), indices),
        }
    }

    /// Distinct task names, sorted.
    pub fn task_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tasks.clone();
        names.sort();
        names.dedup();
        names
    }

    /// Indices of the rows whose task satisfies `keep`.
    pub fn indices_where(&self, mut keep: impl FnMut(&str) -> bool) -> Vec<usize> {
        (0..self.len()).filter(|&i| keep(&self.tasks[i])).collect()
    }

    /// Mean quality of every model over this split, in model order.
    pub fn mean_quality(&self) -> Vec<f64> {
        column_means(&self.quality)
    }

    /// Mean cost in USD per call of every model over this split, in model order.
    pub fn mean_cost(&self) -> Vec<f64> {
        column_means(&self.cost)
    }
}

fn column_means(values: &Array2<f32>) -> Vec<f64> {
    let rows = values.nrows().max(1) as f64;
    values
        .columns()
        .into_iter()
        .map(|column| column.iter().map(|&v| f64::from(v)).sum::<f64>() / rows)
        .collect()
}

/// One routing data set: models in action order, both splits and the models' list prices.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingDataset {
    pub name: String,
    /// Model names in action order: column `k` of every quality and cost matrix.
    pub models: Vec<String>,
    pub cost_source: CostSource,
    pub train: Split,
    pub test: Split,
    /// List prices, in the order of `models`.
    pub prices: Vec<ModelPrice>,
}

/// Loads a data set by name from the copies embedded in the binary.
pub fn load(name: &str) -> Result<RoutingDataset, DataError> {
    load_from(name, &FileSource::Embedded)
}

/// Loads a data set by name from gzipped files in `dir`, with the same file names as the
/// embedded copies (for example `dcrouter_train.json.gz`).
pub fn load_from_dir(name: &str, dir: &Path) -> Result<RoutingDataset, DataError> {
    load_from(name, &FileSource::Dir(dir.to_path_buf()))
}

fn load_from(name: &str, source: &FileSource) -> Result<RoutingDataset, DataError> {
    let dataset = match name {
        "llmrouter-9llm" => llmrouter::load(source)?,
        "paretobandit-k3" => paretobandit::load(source, paretobandit::Pool::K3)?,
        "paretobandit-k4" => paretobandit::load(source, paretobandit::Pool::K4)?,
        _ => {
            return Err(DataError::UnknownDataset {
                name: name.to_string(),
            });
        }
    };
    tracing::debug!(
        dataset = name,
        train = dataset.train.len(),
        test = dataset.test.len(),
        models = dataset.models.len(),
        "loaded routing data set"
    );
    Ok(dataset)
}

/// Location of a data set's gzipped source files.
#[derive(Debug, Clone)]
pub(crate) enum FileSource {
    /// The copies compiled into the binary.
    Embedded,
    /// A folder holding files with the same names.
    Dir(PathBuf),
}

impl FileSource {
    /// Reads and decompresses `file_name` (without the `.gz` suffix) to a string.
    /// `embedded` is the compiled-in copy for [`FileSource::Embedded`].
    pub(crate) fn read(
        &self,
        file_name: &str,
        embedded: &'static [u8],
    ) -> Result<String, DataError> {
        let gz_name = format!("{file_name}.gz");
        let (label, bytes): (String, std::borrow::Cow<'static, [u8]>) = match self {
            FileSource::Embedded => (format!("embedded {gz_name}"), embedded.into()),
            FileSource::Dir(dir) => {
                let path = dir.join(&gz_name);
                let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
                    path: path.clone(),
                    source,
                })?;
                (path.display().to_string(), bytes.into())
            }
        };
        let mut text = String::new();
        GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .map_err(|source| DataError::Decompress {
                file: label,
                source,
            })?;
        Ok(text)
    }
}

/// Splits JSON Lines text into `(line number from 1, line)` pairs, skipping blank lines.
/// Splits on '\n' only: prompts may contain U+2028 LINE SEPARATOR, which `str::lines` keeps
/// but some JSON Lines readers treat as a line break.
pub(crate) fn json_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(index, line)| (index + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !line.trim().is_empty())
}

/// Quality score, rejected at parse time unless finite and in [0, 1], so that serde_json
/// reports the line and column of a bad value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Score(pub f32);

impl<'de> Deserialize<'de> for Score {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if !(0.0..=1.0).contains(&value) {
            return Err(de::Error::custom(format!(
                "quality score {value} is outside [0, 1]"
            )));
        }
        Ok(Score(value as f32))
    }
}

/// Cost in USD per call, rejected at parse time unless finite and non-negative.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cost(pub f32);

impl<'de> Deserialize<'de> for Cost {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if !(value.is_finite() && value >= 0.0) {
            return Err(de::Error::custom(format!(
                "cost {value} USD is negative or not finite"
            )));
        }
        Ok(Cost(value as f32))
    }
}

/// Converts a serde_json error on a whole file into [`DataError::Invalid`] with its line.
pub(crate) fn json_error(file: &str, error: serde_json::Error) -> DataError {
    DataError::Invalid {
        file: file.to_string(),
        line: error.line(),
        message: error.to_string(),
    }
}

/// Builds one split from per-row outcomes, rejecting an empty split.
pub(crate) fn build_split(
    file: &str,
    prompts: Vec<String>,
    tasks: Vec<String>,
    quality: Vec<f32>,
    cost: Vec<f32>,
    num_models: usize,
) -> Result<Split, DataError> {
    if prompts.is_empty() {
        return Err(DataError::InvalidFile {
            file: file.to_string(),
            message: "no prompts; the split must hold at least one row".to_string(),
        });
    }
    let rows = prompts.len();
    let shape_error = |error: ndarray::ShapeError| DataError::InvalidFile {
        file: file.to_string(),
        message: format!(
            "outcome matrix does not match {rows} prompts × {num_models} models: {error}"
        ),
    };
    Ok(Split {
        prompts,
        tasks,
        quality: Array2::from_shape_vec((rows, num_models), quality).map_err(shape_error)?,
        cost: Array2::from_shape_vec((rows, num_models), cost).map_err(shape_error)?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Writes `text` gzipped to `dir/name.gz`.
    pub(crate) fn write_gz(dir: &Path, name: &str, text: &[u8]) {
        let file = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        encoder.write_all(text).unwrap();
        encoder.finish().unwrap();
    }

    #[test]
    fn unknown_name_lists_known_sets() {
        let error = load("no-such-set").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("no-such-set"), "{message}");
        for name in DATASET_NAMES {
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn json_lines_split_on_newline_only() {
        let text = "{\"a\": \"x\u{2028}y\"}\r\n\n{\"b\": 1}\n";
        let lines: Vec<(usize, &str)> = json_lines(text).collect();
        assert_eq!(
            lines,
            vec![(1, "{\"a\": \"x\u{2028}y\"}"), (3, "{\"b\": 1}")]
        );
    }

    #[test]
    fn split_subset_keeps_row_order() {
        let split = build_split(
            "test",
            vec!["a".into(), "b".into(), "c".into()],
            vec!["t1".into(), "t2".into(), "t1".into()],
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            2,
        )
        .unwrap();
        let subset = split.subset(&[2, 0]);
        assert_eq!(subset.prompts, vec!["c", "a"]);
        assert_eq!(subset.quality.row(0).to_vec(), vec![0.5, 0.6]);
        assert_eq!(subset.cost.row(1).to_vec(), vec![1.0, 2.0]);
        assert_eq!(split.task_names(), vec!["t1", "t2"]);
        assert_eq!(split.indices_where(|t| t == "t1"), vec![0, 2]);
    }

    #[test]
    fn empty_split_is_rejected() {
        let error = build_split("empty.jsonl", vec![], vec![], vec![], vec![], 3).unwrap_err();
        assert!(error.to_string().contains("empty.jsonl"), "{error}");
    }
}
