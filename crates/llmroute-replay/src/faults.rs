//! Injected latency and errors per model, drawn from one seeded random generator.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Model key that applies a setting to every model without its own.
pub const ALL_MODELS: &str = "*";

/// Injected behaviour of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Fault {
    /// Delay before the response headers.
    pub latency: Duration,
    /// Share of requests, in `[0, 1]`, that get HTTP 503 instead of the recording.
    pub error_rate: f64,
}

/// An invalid `MODEL=VALUE` setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultError {
    #[error(
        "invalid setting {input:?}: {reason}; expected MODEL=VALUE, with MODEL `*` for every model"
    )]
    Invalid { input: String, reason: String },
    #[error("unknown model {model:?} in {input:?}; models of the data set: {known}")]
    UnknownModel {
        input: String,
        model: String,
        known: String,
    },
}

/// Settings of one model key; an unset field falls back to the `*` key.
#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    latency: Option<Duration>,
    error_rate: Option<f64>,
}

/// Faults of every model and the seeded generator that draws injected errors.
#[derive(Debug)]
pub struct Faults {
    by_model: HashMap<String, Settings>,
    rng: Mutex<ChaCha8Rng>,
}

impl Faults {
    /// Builds faults from `MODEL=MILLISECONDS` latency and `MODEL=RATE` error settings;
    /// `models` are the valid model names. A model's own setting wins over `*`.
    pub fn parse(
        latencies_ms: &[String],
        error_rates: &[String],
        models: &[String],
        seed: u64,
    ) -> Result<Self, FaultError> {
        let mut by_model: HashMap<String, Settings> = HashMap::new();
        for input in latencies_ms {
            let (model, value) = split_setting(input, models)?;
            let milliseconds: u64 = value.parse().map_err(|_| FaultError::Invalid {
                input: input.clone(),
                reason: format!("{value:?} is not a whole number of milliseconds"),
            })?;
            by_model.entry(model).or_default().latency = Some(Duration::from_millis(milliseconds));
        }
        for input in error_rates {
            let (model, value) = split_setting(input, models)?;
            let rate: f64 = value
                .parse()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| FaultError::Invalid {
                    input: input.clone(),
                    reason: format!("{value:?} is not a rate in [0, 1]"),
                })?;
            by_model.entry(model).or_default().error_rate = Some(rate);
        }
        Ok(Self {
            by_model,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        })
    }

    /// Returns no faults at all.
    pub fn none() -> Self {
        Self {
            by_model: HashMap::new(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
        }
    }

    /// Looks up the fault of `model`: each of its own settings, else the `*` setting, else
    /// none.
    pub fn of(&self, model: &str) -> Fault {
        let own = self.by_model.get(model).copied().unwrap_or_default();
        let all = self.by_model.get(ALL_MODELS).copied().unwrap_or_default();
        Fault {
            latency: own.latency.or(all.latency).unwrap_or_default(),
            error_rate: own.error_rate.or(all.error_rate).unwrap_or_default(),
        }
    }

    /// Draws whether this request of `model` gets an injected error.
    pub fn draw_error(&self, model: &str) -> bool {
        let rate = self.of(model).error_rate;
        if rate <= 0.0 {
            return false;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.random_bool(rate)
    }
}

fn split_setting(input: &str, models: &[String]) -> Result<(String, String), FaultError> {
    let (model, value) = input.rsplit_once('=').ok_or_else(|| FaultError::Invalid {
        input: input.to_string(),
        reason: "no `=`".to_string(),
    })?;
    if model != ALL_MODELS && !models.iter().any(|m| m == model) {
        return Err(FaultError::UnknownModel {
            input: input.to_string(),
            model: model.to_string(),
            known: models.join(", "),
        });
    }
    Ok((model.to_string(), value.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> Vec<String> {
        vec!["a".to_string(), "b/c".to_string()]
    }

    #[test]
    fn model_setting_wins_over_star() {
        let faults = Faults::parse(
            &["*=5".into(), "b/c=20".into()],
            &["a=0.25".into()],
            &models(),
            1,
        )
        .unwrap();
        assert_eq!(faults.of("a").latency, Duration::from_millis(5));
        assert_eq!(faults.of("b/c").latency, Duration::from_millis(20));
        assert_eq!(faults.of("a").error_rate, 0.25);
        assert_eq!(faults.of("b/c").error_rate, 0.0);
    }

    #[test]
    fn error_draws_follow_rate_and_seed() {
        let draw = |seed| {
            let faults = Faults::parse(&[], &["a=0.3".into()], &models(), seed).unwrap();
            (0..1000)
                .map(|_| faults.draw_error("a"))
                .collect::<Vec<_>>()
        };
        let first = draw(7);
        assert_eq!(first, draw(7));
        let errors = first.iter().filter(|&&e| e).count();
        assert!(
            (200..400).contains(&errors),
            "{errors} errors of 1000 at rate 0.3"
        );
        let faults = Faults::parse(&[], &["a=0.3".into()], &models(), 7).unwrap();
        assert!(!(0..100).any(|_| faults.draw_error("b/c")));
    }

    #[test]
    fn invalid_settings_name_value() {
        let cases = [
            (vec!["a".to_string()], vec![], "no `=`"),
            (vec!["a=fast".to_string()], vec![], "\"fast\""),
            (vec![], vec!["a=1.5".to_string()], "\"1.5\""),
            (vec!["z=1".to_string()], vec![], "unknown model \"z\""),
        ];
        for (latencies, rates, expected) in cases {
            let message = Faults::parse(&latencies, &rates, &models(), 0)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message}");
        }
    }
}
