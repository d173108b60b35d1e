//! Value parsers shared by the subcommands' flags.
//!
//! A flag that uses one of these parsers also sets `allow_negative_numbers`, so that clap
//! passes a value such as `-5` to the parser. Without it clap reads `-5` as an unknown flag
//! and its error names neither the flag nor the values it takes.

/// Parses a non-negative integer that fits in `usize`.
pub fn parse_count(text: &str) -> Result<usize, String> {
    let value = parse_u64(text)?;
    usize::try_from(value)
        .map_err(|_| format!("expected a non-negative integer of at most {}", usize::MAX))
}

/// Parses a non-negative integer that fits in `u64`.
pub fn parse_u64(text: &str) -> Result<u64, String> {
    text.parse::<u64>().map_err(|error| match error.kind() {
        std::num::IntErrorKind::PosOverflow => {
            format!("expected a non-negative integer of at most {}", u64::MAX)
        }
        _ => "expected a non-negative integer".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_parses_non_negative_integers() {
        assert_eq!(parse_count("0"), Ok(0));
        assert_eq!(parse_count("64"), Ok(64));
        assert_eq!(parse_u64("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn count_rejects_negative_and_text() {
        for text in ["-5", "-0x1", "1.5", "abc", ""] {
            assert_eq!(
                parse_count(text),
                Err("expected a non-negative integer".to_string()),
                "{text:?}"
            );
        }
    }

    #[test]
    fn count_rejects_overflow_with_maximum() {
        let error = parse_u64("18446744073709551616").unwrap_err();
        assert_eq!(
            error,
            "expected a non-negative integer of at most 18446744073709551615"
        );
    }
}
