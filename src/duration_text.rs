//! Durations as text in the config file and the environment: `"250ms"`, `"30s"`, `"5m"`,
//! `"1h"`, `"1d"`. A bare number is refused (seconds or milliseconds? the reader cannot
//! tell), so is an unknown unit.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| {
            format!("{text:?} has no unit: write it like \"500ms\", \"30s\", \"5m\", \"1h\"")
        })?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: write it like \"500ms\", \"30s\", \"5m\", \"1h\"")
    })?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86400.0,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?}: use ms, s, m, h or d"
            ));
        }
    };
    if !seconds.is_finite() || seconds > 10.0 * 365.0 * 86400.0 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A duration for people to read, rounded: `850ms`, `4.9s`, `42s`, `3m05s`.
pub fn rounded(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 60_000 {
        format!("{}s", (ms + 500) / 1000)
    } else {
        let s = (ms + 500) / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A duration as config text (`500ms`, `30s`, `5m`, `1h`), exactly.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(86_400_000) && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_durations_read_well() {
        for (ms, text) in [
            (0, "0ms"),
            (850, "850ms"),
            (4_894, "4.9s"),
            (9_960, "10.0s"),
            (42_400, "42s"),
            (185_300, "3m05s"),
        ] {
            assert_eq!(rounded(Duration::from_millis(ms)), text);
        }
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse("30").is_err());
        assert!(parse("").is_err());
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(300)), "5m");
        assert_eq!(format(Duration::from_secs(30)), "30s");
        assert_eq!(format(Duration::from_secs(7 * 86400)), "7d");
        assert_eq!(format(Duration::from_secs(36 * 3600)), "36h");
    }

    mod properties {
        use super::super::{format, parse};
        use proptest::prelude::*;
        use std::time::Duration;

        proptest! {
            #[test]
            fn durations_round_trip(ms in 1u64..100_000_000) {
                let d = Duration::from_millis(ms);
                prop_assert_eq!(parse(&format(d)).unwrap(), d);
            }

            #[test]
            fn any_duration_text_parses_or_is_refused_without_panicking(text in ".{0,16}") {
                let _ = parse(&text);
            }
        }
    }
}
