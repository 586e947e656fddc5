//! The outcome policy: how one event's attempt ends, from what each of its destinations
//! reported. Pure (the jitter is passed in) and table-tested.

use crate::config::RetryConfig;
use crate::event::{Event, Outcome};
use crate::retry::{backoff_delay, next_attempt_delay};
use std::time::Duration;

/// How one event's attempt ends, from the outcomes of its destinations.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Complete {
        acked: Vec<String>,
    },
    Retry {
        delay: Duration,
        reason: String,
        give_back_attempt: bool,
        acked: Vec<String>,
    },
    Bury {
        reason: String,
        acked: Vec<String>,
    },
}

/// Combines the outcomes of every destination an event was sent to in this attempt.
/// PUBLISHED only when every destination acknowledged (invariant 2); a permanent failure
/// buries at once; a failure retries until `max_attempts`; a destination that was not
/// tried (Deferred) gives the attempt back (invariant 4). Pure: `jitter` is passed in.
pub fn decide(
    event: &Event,
    outcomes: &[(&str, &Outcome)],
    retry: &RetryConfig,
    jitter: f64,
) -> Decision {
    let acked: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Delivered))
        .map(|(d, _)| d.to_string())
        .collect();
    let rejected: Vec<String> = outcomes
        .iter()
        .filter_map(|(d, o)| match o {
            Outcome::Rejected { reason } => Some(format!("{d}: {reason}")),
            _ => None,
        })
        .collect();
    if !rejected.is_empty() {
        return Decision::Bury {
            reason: format!("rejected: {}", rejected.join("; ")),
            acked,
        };
    }
    let mut retry_reasons = Vec::new();
    let mut not_before: Option<Duration> = None;
    for (destination, outcome) in outcomes {
        if let Outcome::Retry {
            reason,
            not_before: nb,
            ..
        } = outcome
        {
            retry_reasons.push(format!("{destination}: {reason}"));
            not_before = not_before.max(*nb);
        }
    }
    if !retry_reasons.is_empty() {
        let max_attempts = event.max_attempts.unwrap_or(retry.max_attempts);
        let reason = retry_reasons.join("; ");
        if event.attempts >= max_attempts {
            return Decision::Bury {
                reason: format!(
                    "gave up after {} attempts; last error: {reason}",
                    event.attempts
                ),
                acked,
            };
        }
        let backoff = backoff_delay(event.attempts, retry.base_delay, retry.max_delay, jitter);
        return Decision::Retry {
            delay: next_attempt_delay(backoff, not_before, retry.max_delay),
            reason: format!("attempt {} failed: {reason}", event.attempts),
            give_back_attempt: false,
            acked,
        };
    }
    let mut deferred = Vec::new();
    let mut wait = Duration::ZERO;
    for (destination, outcome) in outcomes {
        if let Outcome::Deferred { reason, not_before } = outcome {
            deferred.push(format!("{destination}: {reason}"));
            wait = wait.max(*not_before);
        }
    }
    if !deferred.is_empty() {
        return Decision::Retry {
            delay: wait.max(retry.base_delay).min(retry.max_delay),
            reason: format!(
                "deferred (destination unavailable, no attempt charged): {}",
                deferred.join("; ")
            ),
            give_back_attempt: true,
            acked,
        };
    }
    Decision::Complete { acked }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Fault;
    use std::time::SystemTime;
    use uuid::Uuid;

    fn event(attempts: i32, max_attempts: Option<i32>) -> Event {
        Event {
            id: 1,
            created_at: SystemTime::now(),
            tracking_id: Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: "1".into(),
            event_type: "order.created".into(),
            payload: "{}".into(),
            metadata: serde_json::Value::Null,
            attempts,
            max_attempts,
            delivered_to: vec![],
            replay_id: None,
        }
    }

    fn retry_later(reason: &str) -> Outcome {
        Outcome::destination_failed(reason)
    }

    #[test]
    fn every_ack_completes() {
        let d = decide(
            &event(1, None),
            &[("rabbitmq", &Outcome::Delivered)],
            &RetryConfig::default(),
            0.5,
        );
        assert_eq!(
            d,
            Decision::Complete {
                acked: vec!["rabbitmq".into()]
            }
        );
    }

    #[test]
    fn a_failure_retries_with_backoff_and_keeps_other_acks() {
        let ok = Outcome::Delivered;
        let fail = retry_later("nack");
        let d = decide(
            &event(3, None),
            &[("a", &ok), ("b", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        match d {
            Decision::Retry {
                delay,
                give_back_attempt,
                acked,
                reason,
            } => {
                assert_eq!(delay, Duration::from_secs(2));
                assert!(!give_back_attempt);
                assert_eq!(acked, vec!["a".to_string()]);
                assert!(reason.contains("b: nack"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_attempts_buries_with_the_last_error() {
        let fail = retry_later("returned as unroutable");
        let d = decide(
            &event(10, None),
            &[("rabbitmq", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        match d {
            Decision::Bury { reason, .. } => assert!(
                reason.contains("gave up after 10 attempts") && reason.contains("unroutable")
            ),
            other => panic!("{other:?}"),
        }
        // The row's own max_attempts wins over the configured one.
        let d = decide(
            &event(2, Some(2)),
            &[("rabbitmq", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        assert!(matches!(d, Decision::Bury { .. }));
    }

    #[test]
    fn a_permanent_failure_buries_at_once() {
        let rejected = Outcome::Rejected {
            reason: "400 Bad Request".into(),
        };
        let d = decide(
            &event(1, None),
            &[("w", &rejected)],
            &RetryConfig::default(),
            0.0,
        );
        assert!(matches!(d, Decision::Bury { reason, .. } if reason.contains("400")));
    }

    #[test]
    fn deferred_gives_the_attempt_back_even_at_the_limit() {
        let deferred = Outcome::Deferred {
            reason: "unreachable".into(),
            not_before: Duration::from_secs(3),
        };
        let d = decide(
            &event(10, None),
            &[("rabbitmq", &deferred)],
            &RetryConfig::default(),
            0.0,
        );
        match d {
            Decision::Retry {
                delay,
                give_back_attempt,
                ..
            } => {
                assert!(give_back_attempt);
                assert_eq!(delay, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_destinations_not_before_is_honoured() {
        let fail = Outcome::Retry {
            reason: "429".into(),
            not_before: Some(Duration::from_secs(20)),
            fault: Fault::Destination,
        };
        let d = decide(
            &event(1, None),
            &[("w", &fail)],
            &RetryConfig::default(),
            0.0,
        );
        assert!(matches!(d, Decision::Retry { delay, .. } if delay == Duration::from_secs(20)));
    }
}
