//! Routing: which destinations an event goes to, chosen by its `event_type`. Ordered
//! rules, the first whose pattern matches wins; a pattern is an event type with `*`
//! standing for any run of characters (`order.*`, `*.created`, `*`). Without rules,
//! every event goes to `rabbitmq`. With rules, an event no rule matches is never
//! silently dropped: the `unrouted` policy dead-letters it or skips it, and counts it.

use crate::store::ClaimFilter;
use serde::{Deserialize, Serialize};

/// The destination every event goes to when no rules are configured.
pub const DEFAULT_DESTINATION: &str = "rabbitmq";

/// What happens to an event no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unrouted {
    /// DEAD_LETTER, with the reason: visible and redrivable once a rule exists.
    #[default]
    DeadLetter,
    /// PUBLISHED with no destination (`delivered_to` stays empty).
    Skip,
}

/// Where one event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    To(&'a [String]),
    Unrouted(Unrouted),
}

/// An `event_type` pattern: literal text with `*` wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<String>,
}

impl Pattern {
    /// The same pattern as SQL `LIKE` text (default escape `\\`).
    pub fn to_like(&self) -> String {
        self.parts
            .iter()
            .map(|part| {
                part.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            })
            .collect::<Vec<_>>()
            .join("%")
    }

    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err(
                "an empty pattern matches nothing; use \"*\" to match every event type".into(),
            );
        }
        Ok(Pattern {
            parts: text.split('*').map(str::to_string).collect(),
        })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        let (first, rest) = self.parts.split_first().expect("split yields one part");
        let Some(mut remaining) = event_type.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty(); // no '*': exact match
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(at) => remaining = &remaining[at + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

/// The compiled routing table.
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    rules: Vec<(Vec<Pattern>, Vec<String>)>,
    unrouted: Unrouted,
    everything: Vec<String>,
}

impl Router {
    /// `rules`: (event type patterns, destinations), in order.
    pub fn new(rules: &[(Vec<String>, Vec<String>)], unrouted: Unrouted) -> Result<Router, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (index, (patterns, destinations)) in rules.iter().enumerate() {
            if patterns.is_empty() {
                return Err(format!("rule {} has no event_types", index + 1));
            }
            if destinations.is_empty() {
                return Err(format!("rule {} has no destinations", index + 1));
            }
            let patterns = patterns
                .iter()
                .map(|p| Pattern::parse(p).map_err(|e| format!("rule {}: {e}", index + 1)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut destinations = destinations.clone();
            destinations.sort();
            destinations.dedup();
            compiled.push((patterns, destinations));
        }
        Ok(Router {
            rules: compiled,
            unrouted,
            everything: vec![DEFAULT_DESTINATION.to_string()],
        })
    }

    /// The destinations of an event of this type.
    pub fn route(&self, event_type: &str) -> Route<'_> {
        if self.rules.is_empty() {
            return Route::To(&self.everything);
        }
        self.rules
            .iter()
            .find(|(patterns, _)| patterns.iter().any(|p| p.matches(event_type)))
            .map_or(Route::Unrouted(self.unrouted), |(_, d)| Route::To(d))
    }

    /// The claim filter that leaves out events still needing a destination in `avoid`
    /// and, with `want`, takes only events that still need that one: the rules as SQL
    /// (each pattern with its rule's destinations, in order, and a last catch-all with
    /// none for unrouted events). Without `avoid` and `want` it is [`ClaimFilter::ALL`].
    pub fn claim_filter(&self, avoid: &[String], want: Option<&str>) -> ClaimFilter {
        if avoid.is_empty() && want.is_none() {
            return ClaimFilter::ALL;
        }
        let mut rules: Vec<(String, &[String])> = if self.rules.is_empty() {
            vec![("%".to_string(), &self.everything)]
        } else {
            self.rules
                .iter()
                .flat_map(|(patterns, destinations)| {
                    patterns
                        .iter()
                        .map(|p| (p.to_like(), destinations.as_slice()))
                })
                .collect()
        };
        if want.is_none() {
            // Past the last rule that needs an avoided destination, nothing is left out.
            let needed = rules
                .iter()
                .rposition(|(_, d)| d.iter().any(|name| avoid.contains(name)));
            match needed {
                Some(last) => rules.truncate(last + 1),
                None => return ClaimFilter::ALL,
            }
        }
        let (mut patterns, mut routes): (Vec<String>, Vec<String>) =
            rules.into_iter().map(|(p, d)| (p, d.join(","))).unzip();
        patterns.push("%".into());
        routes.push(String::new());
        ClaimFilter {
            patterns,
            routes,
            avoid: avoid.to_vec(),
            want: want.map(str::to_string),
        }
    }

    /// Every destination some rule names (or `rabbitmq` without rules).
    pub fn destinations(&self) -> Vec<String> {
        if self.rules.is_empty() {
            return self.everything.clone();
        }
        let mut all: Vec<String> = self.rules.iter().flat_map(|(_, d)| d.clone()).collect();
        all.sort();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_globs() {
        let cases = [
            ("*", "order.created", true),
            ("*", "", true),
            ("order.*", "order.created", true),
            ("order.*", "order.item.added", true),
            ("order.*", "order.", true),
            ("order.*", "order", false),
            ("order.*", "orders.created", false),
            ("order.created", "order.created", true),
            ("order.created", "order.created.v2", false),
            ("*.created", "order.created", true),
            ("*.created", "order.updated", false),
            ("order.*.v2", "order.created.v2", true),
            ("order.*.v2", "order.created.v3", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("*x*", "abxcd", true),
        ];
        for (pattern, event_type, expected) in cases {
            assert_eq!(
                Pattern::parse(pattern).unwrap().matches(event_type),
                expected,
                "{pattern} vs {event_type}"
            );
        }
        assert!(Pattern::parse("").is_err());
    }

    fn rule(patterns: &[&str], destinations: &[&str]) -> (Vec<String>, Vec<String>) {
        (
            patterns.iter().map(|s| s.to_string()).collect(),
            destinations.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn without_rules_everything_goes_to_rabbitmq() {
        let router = Router::new(&[], Unrouted::DeadLetter).unwrap();
        assert_eq!(
            router.route("anything"),
            Route::To(&["rabbitmq".to_string()])
        );
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let router = Router::new(
            &[
                rule(&["order.refunded"], &["webhook:billing"]),
                rule(&["order.*"], &["rabbitmq", "webhook:crm", "rabbitmq"]),
            ],
            Unrouted::DeadLetter,
        )
        .unwrap();
        assert_eq!(
            router.route("order.refunded"),
            Route::To(&["webhook:billing".to_string()])
        );
        assert_eq!(
            router.route("order.created"),
            Route::To(&["rabbitmq".to_string(), "webhook:crm".to_string()])
        );
        assert_eq!(
            router.route("user.created"),
            Route::Unrouted(Unrouted::DeadLetter)
        );
        assert_eq!(
            router.destinations(),
            vec!["rabbitmq", "webhook:billing", "webhook:crm"]
        );
    }

    #[test]
    fn the_unrouted_policy_is_reported() {
        let router = Router::new(&[rule(&["a"], &["rabbitmq"])], Unrouted::Skip).unwrap();
        assert_eq!(router.route("b"), Route::Unrouted(Unrouted::Skip));
    }

    #[test]
    fn rules_without_patterns_or_destinations_are_refused() {
        assert!(Router::new(&[rule(&[], &["rabbitmq"])], Unrouted::Skip).is_err());
        assert!(Router::new(&[rule(&["a"], &[])], Unrouted::Skip).is_err());
    }

    mod properties {
        use super::super::Pattern;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn a_star_stands_for_any_text(a in "[a-z.]{0,8}", x in "[a-z.]{0,8}", b in "[a-z.]{0,8}") {
                let pattern = Pattern::parse(&format!("{a}*{b}")).unwrap();
                let event_type = format!("{a}{x}{b}");
                prop_assert!(pattern.matches(&event_type));
            }

            #[test]
            fn without_a_star_only_the_exact_type_matches(p in "[a-z.]{1,10}", t in "[a-z.]{0,10}") {
                let pattern = Pattern::parse(&p).unwrap();
                prop_assert_eq!(pattern.matches(&t), p == t);
            }

            #[test]
            fn a_lone_star_matches_everything(t in ".{0,20}") {
                prop_assert!(Pattern::parse("*").unwrap().matches(&t));
            }

            #[test]
            fn matching_never_panics(p in ".{1,12}", t in ".{0,20}") {
                let _ = Pattern::parse(&p).unwrap().matches(&t);
            }
        }
    }
}
