//! The NOTIFY payload on channel `outbox_events`: the ids of one INSERT statement as
//! ranges (`"17-5016"`, `"17,19-21"`), optionally followed by the statement's
//! `created_at` bounds in epoch seconds (`"17-5016@1764583200-1764583201"`, so the claim
//! reads only the partitions they fall in), or empty for "sweep: too many ids to list";
//! `"drain"` and `"notify"` announce a switch of high-load mode; `"members"` asks every
//! instance to read the live instances again (one joined or left).
//! Anyone may NOTIFY this channel, so a payload is parsed defensively: a malformed one is
//! reported and answered with a sweep, never a crash.

/// What a notification asks the relay to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notified {
    /// Claim these ids, created within these bounds if known.
    Ids(Vec<i64>, Option<Created>),
    /// Claim every due PENDING event (the ids did not fit in a payload).
    Sweep,
    /// An instance entered or renewed high-load (drain) mode: producers stop notifying,
    /// so claim back to back.
    Drain,
    /// An instance left drain mode: leave it too, race-free.
    Notify,
    /// An instance joined or left: read the members again, to divide the ids anew.
    Members,
}

/// When the events of a notification were created: whole epoch seconds, `since`
/// floored and `until` rounded up, so every row lies within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    pub since: i64,
    pub until: i64,
}

impl Created {
    /// Bounds covering both.
    pub fn merge(self, other: Created) -> Created {
        Created {
            since: self.since.min(other.since),
            until: self.until.max(other.until),
        }
    }
}

/// A payload listing more ids than this is answered with a sweep instead.
pub const MAX_IDS_PER_NOTIFICATION: u64 = 100_000;

/// Parses a payload. `Err` carries a description of what is wrong with it.
pub fn parse_payload(payload: &str) -> Result<Notified, String> {
    let payload = payload.trim();
    match payload {
        "" => return Ok(Notified::Sweep),
        "drain" => return Ok(Notified::Drain),
        "notify" => return Ok(Notified::Notify),
        "members" => return Ok(Notified::Members),
        _ => {}
    }
    let (ranges, created) = match payload.split_once('@') {
        Some((ranges, bounds)) => (ranges, Some(parse_bounds(bounds, payload)?)),
        None => (payload, None),
    };
    let mut ids = Vec::new();
    let mut total: u64 = 0;
    for part in ranges.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (parse_id(lo, payload)?, parse_id(hi, payload)?),
            None => {
                let id = parse_id(part, payload)?;
                (id, id)
            }
        };
        if hi < lo {
            return Err(format!(
                "range {part:?} runs backwards in payload {payload:?}"
            ));
        }
        total += (hi - lo) as u64 + 1;
        if total > MAX_IDS_PER_NOTIFICATION {
            return Ok(Notified::Sweep);
        }
        ids.extend(lo..=hi);
    }
    Ok(Notified::Ids(ids, created))
}

fn parse_bounds(bounds: &str, payload: &str) -> Result<Created, String> {
    let wrong = || format!("{bounds:?} is not since-until in epoch seconds in payload {payload:?}");
    let (since, until) = bounds.split_once('-').ok_or_else(wrong)?;
    let since = since.trim().parse::<i64>().map_err(|_| wrong())?;
    let until = until.trim().parse::<i64>().map_err(|_| wrong())?;
    if until < since {
        return Err(wrong());
    }
    Ok(Created { since, until })
}

fn parse_id(text: &str, payload: &str) -> Result<i64, String> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id >= 0)
        .ok_or_else(|| format!("{text:?} is not an event id in payload {payload:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_into_ids() {
        assert_eq!(parse_payload("members"), Ok(Notified::Members));
        let cases: &[(&str, Notified)] = &[
            ("", Notified::Sweep),
            ("7", Notified::Ids(vec![7], None)),
            ("1-3", Notified::Ids(vec![1, 2, 3], None)),
            ("17,19-21", Notified::Ids(vec![17, 19, 20, 21], None)),
            ("5,5", Notified::Ids(vec![5, 5], None)),
            (
                "17,19-20@1764583200-1764583201",
                Notified::Ids(
                    vec![17, 19, 20],
                    Some(Created {
                        since: 1764583200,
                        until: 1764583201,
                    }),
                ),
            ),
            ("0-100000000", Notified::Sweep),
            ("drain", Notified::Drain),
            (" notify ", Notified::Notify),
        ];
        for (payload, expected) in cases {
            assert_eq!(&parse_payload(payload).unwrap(), expected, "{payload:?}");
        }
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        for payload in [
            "abc",
            "1-",
            "-1",
            "3-1",
            "1,,2",
            "9223372036854775808",
            "1;2",
            "{\"id\":1}",
            "1@",
            "1@5",
            "1@6-5",
            "1@a-b",
            "@1-2",
        ] {
            assert!(
                parse_payload(payload).is_err(),
                "{payload:?} should be refused"
            );
        }
    }

    mod properties {
        use super::super::{Notified, parse_payload};
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        /// The trigger's encoding: consecutive ids as "lo-hi", others alone, joined by ','.
        fn encode(ids: &BTreeSet<i64>) -> String {
            let mut parts = Vec::new();
            let mut iter = ids.iter().copied().peekable();
            while let Some(lo) = iter.next() {
                let mut hi = lo;
                while iter.peek() == Some(&(hi + 1)) {
                    hi = iter.next().unwrap();
                }
                parts.push(if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                });
            }
            parts.join(",")
        }

        proptest! {
            #[test]
            fn the_triggers_ranges_parse_back_to_the_same_ids(ids in prop::collection::btree_set(0i64..5_000, 1..300)) {
                let parsed = parse_payload(&encode(&ids)).unwrap();
                prop_assert_eq!(parsed, Notified::Ids(ids.into_iter().collect(), None));
            }

            #[test]
            fn any_payload_parses_or_is_refused_without_panicking(payload in ".{0,64}") {
                let _ = parse_payload(&payload);
            }
        }
    }
}
