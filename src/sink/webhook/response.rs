//! What an endpoint's answer means for the event: 2xx acknowledges; 408, 425, 429
//! (honouring `Retry-After`) and 5xx retry; a redirect (never followed) and every other
//! 4xx are permanent.

use crate::event::{Fault, Outcome};
use std::time::{Duration, SystemTime};

/// `Retry-After` as a delay from `now`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What an HTTP response means for the event.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    location: Option<&str>,
    body_excerpt: &str,
    now: SystemTime,
) -> Outcome {
    let said = if body_excerpt.is_empty() {
        String::new()
    } else {
        format!(": {body_excerpt}")
    };
    match status {
        200..=299 => Outcome::Delivered,
        300..=399 => Outcome::Rejected {
            reason: format!(
                "HTTP {status} redirect to {} not followed; set the webhook url to the final address",
                location.map_or_else(|| "(no Location)".into(), super::config::shown)
            ),
        },
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            reason: format!("HTTP {status}{said}"),
            not_before: retry_after.and_then(|v| parse_retry_after(v, now)),
            fault: Fault::Destination,
        },
        400..=499 => Outcome::Rejected {
            reason: format!("HTTP {status}{said}"),
        },
        _ => Outcome::destination_failed(format!("unexpected HTTP status {status}{said}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn responses_are_classified() {
        let now = SystemTime::now();
        let retry = |s: u16| matches!(classify(s, None, None, "", now), Outcome::Retry { .. });
        let rejected =
            |s: u16| matches!(classify(s, None, None, "", now), Outcome::Rejected { .. });
        for status in [200, 201, 204, 299] {
            assert_eq!(classify(status, None, None, "", now), Outcome::Delivered);
        }
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(retry(status), "{status} retries");
        }
        for status in [
            300, 301, 302, 307, 308, 400, 401, 403, 404, 409, 410, 413, 422,
        ] {
            assert!(rejected(status), "{status} is permanent");
        }
        match classify(429, Some("7"), None, "slow down", now) {
            Outcome::Retry {
                not_before,
                reason,
                fault,
            } => {
                assert_eq!(fault, Fault::Destination);
                assert_eq!(not_before, Some(Duration::from_secs(7)));
                assert_eq!(reason, "HTTP 429: slow down");
            }
            other => panic!("{other:?}"),
        }
        match classify(301, None, Some("https://elsewhere/"), "", now) {
            Outcome::Rejected { reason } => {
                assert!(reason.contains("https://elsewhere/") && reason.contains("not followed"))
            }
            other => panic!("{other:?}"),
        }
        // Where a redirect points may carry a token: only scheme, host and port are kept.
        let secret = "https://u:pw@hooks.example:8443/services/T0/B0/XOXB?token=TOPSECRET";
        match classify(302, None, Some(secret), "", now) {
            Outcome::Rejected { reason } => {
                assert!(reason.contains("https://hooks.example:8443/…"), "{reason}");
                for hidden in ["XOXB", "TOPSECRET", "pw", "services"] {
                    assert!(!reason.contains(hidden), "{hidden} shown: {reason}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    mod properties {
        use super::super::parse_retry_after;
        use proptest::prelude::*;
        use std::time::{Duration, SystemTime, UNIX_EPOCH};

        proptest! {
            #[test]
            fn retry_after_seconds_parse(seconds in 0u64..10_000_000) {
                let now = SystemTime::now();
                prop_assert_eq!(parse_retry_after(&seconds.to_string(), now), Some(Duration::from_secs(seconds)));
            }

            #[test]
            fn retry_after_dates_parse_to_the_delay(now_s in 1_000_000_000u64..2_000_000_000, ahead in 0u64..1_000_000) {
                let now = UNIX_EPOCH + Duration::from_secs(now_s);
                let date = httpdate::fmt_http_date(now + Duration::from_secs(ahead));
                prop_assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(ahead)));
            }

            #[test]
            fn any_retry_after_parses_or_is_ignored_without_panicking(value in ".{0,40}") {
                let _ = parse_retry_after(&value, SystemTime::now());
            }
        }
    }
}
