//! The preference `w = (quality, cost)` of one request: two non-negative weights that sum to 1.

use serde::{Deserialize, Serialize};

/// Largest allowed distance of `quality + cost` from 1, so that values typed with two or three
/// decimals (`quality=0.33,cost=0.67`) are accepted.
const SUM_TOLERANCE: f64 = 1e-3;

/// The text format of a preference, quoted in every parse error.
pub const PREFERENCE_FORMAT: &str = "`quality=Q`, `cost=C` or `quality=Q,cost=C` with Q and C in [0, 1] summing to 1, for example `quality=0.8`";

/// A preference on the 1-simplex: `quality + cost = 1`, both in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Preference {
    /// Weight of the quality score in the reward.
    pub quality: f64,
    /// Weight of the normalised cost in the reward.
    pub cost: f64,
}

/// A preference that is not on the simplex or not in the documented text format.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreferenceError {
    #[error("invalid preference {input:?}: {reason}; expected {PREFERENCE_FORMAT}")]
    Invalid { input: String, reason: String },
}

impl Preference {
    /// Builds a preference from its quality weight; the cost weight is `1 - quality`.
    pub fn from_quality(quality: f64) -> Result<Self, PreferenceError> {
        Self::new(Some(quality), None, &format!("quality={quality}"))
    }

    /// Parses the header format: `quality=0.8`, `cost=0.2` or `quality=0.8,cost=0.2`
    /// (case-insensitive keys, optional spaces around `=` and `,`).
    pub fn parse(input: &str) -> Result<Self, PreferenceError> {
        let invalid = |reason: String| PreferenceError::Invalid {
            input: input.to_string(),
            reason,
        };
        let mut quality = None;
        let mut cost = None;
        for part in input.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| invalid(format!("{:?} has no `=`", part.trim())))?;
            let key = key.trim().to_ascii_lowercase();
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| invalid(format!("{:?} is not a number", value.trim())))?;
            let slot = match key.as_str() {
                "quality" => &mut quality,
                "cost" => &mut cost,
                _ => return Err(invalid(format!("unknown key {key:?}"))),
            };
            if slot.replace(value).is_some() {
                return Err(invalid(format!("{key:?} is given twice")));
            }
        }
        Self::new(quality, cost, input)
    }

    fn new(quality: Option<f64>, cost: Option<f64>, input: &str) -> Result<Self, PreferenceError> {
        let invalid = |reason: String| PreferenceError::Invalid {
            input: input.to_string(),
            reason,
        };
        for value in [quality, cost].into_iter().flatten() {
            if !(0.0..=1.0).contains(&value) {
                return Err(invalid(format!("{value} is outside [0, 1]")));
            }
        }
        let (quality, cost) = match (quality, cost) {
            (Some(q), Some(c)) => {
                if ((q + c) - 1.0).abs() > SUM_TOLERANCE {
                    return Err(invalid(format!("quality + cost = {} instead of 1", q + c)));
                }
                (q, 1.0 - q)
            }
            (Some(q), None) => (q, 1.0 - q),
            // The cost is stored as `1 - quality` in every form, so that the text form of
            // `Display` parses back to the same two numbers.
            (None, Some(c)) => (1.0 - c, 1.0 - (1.0 - c)),
            (None, None) => return Err(invalid("neither quality nor cost is given".to_string())),
        };
        Ok(Self { quality, cost })
    }
}

impl std::fmt::Display for Preference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "quality={},cost={}", self.quality, self.cost)
    }
}

/// The JSON form `{"quality": 0.8, "cost": 0.2}`, either key optional, checked like
/// [`Preference::parse`].
impl<'de> Deserialize<'de> for Preference {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            quality: Option<f64>,
            cost: Option<f64>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let input = match (raw.quality, raw.cost) {
            (Some(q), Some(c)) => format!("quality={q},cost={c}"),
            (Some(q), None) => format!("quality={q}"),
            (None, Some(c)) => format!("cost={c}"),
            (None, None) => "{}".to_string(),
        };
        Preference::new(raw.quality, raw.cost, &input).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_documented_forms() {
        let cases = [
            ("quality=0.8", 0.8),
            ("cost=0.25", 0.75),
            ("quality=0.3,cost=0.7", 0.3),
            (" Quality = 1 , cost = 0 ", 1.0),
            ("quality=0", 0.0),
        ];
        for (input, quality) in cases {
            let preference = Preference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert!((preference.quality - quality).abs() < 1e-12, "{input}");
            assert!(
                (preference.quality + preference.cost - 1.0).abs() < 1e-12,
                "{input}"
            );
        }
    }

    #[test]
    fn parse_rejects_invalid_forms() {
        let cases = [
            ("", "has no `=`"),
            ("0.8", "has no `=`"),
            ("quality=high", "not a number"),
            ("quality=NaN", "outside [0, 1]"),
            ("quality=1.5", "outside [0, 1]"),
            ("cost=-0.1", "outside [0, 1]"),
            ("quality=0.5,cost=0.6", "instead of 1"),
            ("speed=1", "unknown key"),
            ("quality=0.5,quality=0.5", "given twice"),
        ];
        for (input, reason) in cases {
            let message = Preference::parse(input).unwrap_err().to_string();
            assert!(message.contains(reason), "{input:?}: {message}");
            assert!(message.contains("quality=0.8"), "{input:?}: {message}");
        }
    }

    #[test]
    fn text_form_parses_back_exactly() {
        for input in [
            "cost=0.05",
            "cost=0.3",
            "quality=0.1",
            "quality=0.7,cost=0.3",
        ] {
            let preference = Preference::parse(input).unwrap();
            let again = Preference::parse(&preference.to_string()).unwrap();
            assert_eq!(again, preference, "{input}");
        }
    }

    #[test]
    fn json_form_is_checked() {
        let preference: Preference = serde_json::from_str(r#"{"quality": 0.6}"#).unwrap();
        assert!((preference.cost - 0.4).abs() < 1e-12);
        let error = serde_json::from_str::<Preference>(r#"{"quality": 2}"#).unwrap_err();
        assert!(error.to_string().contains("outside [0, 1]"), "{error}");
        let error = serde_json::from_str::<Preference>(r#"{}"#).unwrap_err();
        assert!(error.to_string().contains("neither"), "{error}");
    }
}
