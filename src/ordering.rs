//! Per-aggregate ordering (`relay.ordering = "per_aggregate"`): at most one event of an
//! aggregate `(aggregate_type, aggregate_id)` is in flight at a time, across every
//! instance, and each destination receives an aggregate's events in `id` order. Other
//! aggregates go on in parallel: a failing or slow event holds back only its own.
//!
//! The claim statements enforce it, whoever runs them: a candidate is claimed only when
//! no earlier event of its aggregate is unfinished (PENDING, PROCESSING, or a dead
//! letter that is neither discarded nor skipped); otherwise the claim *holds* it
//! (PENDING with `next_attempt_at = 'infinity'`, out of every due index, so claims stay
//! O(batch) however long an aggregate's queue). The outcome of the event before it
//! releases it (`unhold_aggregates.sql`), and the claim re-reads its holds once it
//! has committed and claims those that are free (`claim_held.sql`), so a release that
//! raced the hold is never lost.
//!
//! Ordering is a database-wide setting: every instance runs the same claim rule, so the
//! rule lives in `outbox_settings` and an instance configured otherwise refuses to
//! start (see [`OrderRule::setting`]).

use crate::routing::Pattern;
use serde::{Deserialize, Serialize};

/// Whether an event waits for the earlier events of its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// No promise about order: events are claimed as they come (the fastest).
    #[default]
    None,
    /// One event of an aggregate in flight at a time, delivered in id order.
    PerAggregate,
}

/// What a dead letter does to the later events of its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    /// They wait until it is redriven (and delivered) or discarded.
    #[default]
    Block,
    /// They go on; the dead letter is logged and counted as skipped.
    Skip,
}

/// The claim rule: which events are ordered (the first routing rule whose pattern
/// matches decides, else the default) and whether a dead letter holds its aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderRule {
    pub ordered_by_default: bool,
    /// LIKE patterns of the routing rules, in rule order, when a rule overrides the
    /// default (empty otherwise: every event follows the default).
    pub patterns: Vec<String>,
    /// Whether the events each pattern matches are ordered.
    pub ordered: Vec<bool>,
    pub dead_letters_block: bool,
    /// The same patterns as written in the configuration.
    event_types: Vec<String>,
    /// The same patterns, parsed, for [`OrderRule::is_ordered`].
    matchers: Vec<Pattern>,
}

impl OrderRule {
    /// `default` for every event, except those whose first matching rule says
    /// otherwise: `rules` are (event_type patterns, that rule's own `ordering`).
    pub fn new(
        default: Ordering,
        on_dead_letter: OnDeadLetter,
        rules: &[(Vec<String>, Option<Ordering>)],
    ) -> Result<OrderRule, String> {
        let mut rule = OrderRule {
            ordered_by_default: default == Ordering::PerAggregate,
            dead_letters_block: on_dead_letter == OnDeadLetter::Block,
            ..OrderRule::default()
        };
        if rules
            .iter()
            .any(|(_, ordering)| ordering.is_some_and(|o| o != default))
        {
            for (patterns, ordering) in rules {
                let ordered = ordering.unwrap_or(default) == Ordering::PerAggregate;
                for pattern in patterns {
                    let parsed = Pattern::parse(pattern)?;
                    rule.patterns.push(parsed.to_like());
                    rule.matchers.push(parsed);
                    rule.event_types.push(pattern.clone());
                    rule.ordered.push(ordered);
                }
            }
        }
        Ok(rule)
    }

    /// Whether any event is ordered (when none is, claims skip the check altogether).
    pub fn any(&self) -> bool {
        self.ordered_by_default || self.ordered.iter().any(|o| *o)
    }

    /// Whether events of `event_type` are ordered (the claim statements decide the
    /// same way, in SQL).
    pub fn is_ordered(&self, event_type: &str) -> bool {
        for (pattern, ordered) in self.matchers.iter().zip(&self.ordered) {
            if pattern.matches(event_type) {
                return *ordered;
            }
        }
        self.ordered_by_default
    }

    /// The rule as stored in `outbox_settings` (name `ordering`): every instance of a
    /// database must store the same text.
    pub fn setting(&self) -> String {
        serde_json::json!({
            "ordered_by_default": self.ordered_by_default,
            "dead_letters_block": self.dead_letters_block,
            "rules": self
                .event_types
                .iter()
                .zip(&self.ordered)
                .map(|(pattern, ordered)| serde_json::json!({"event_type": pattern, "ordered": ordered}))
                .collect::<Vec<_>>(),
        })
        .to_string()
    }

    /// The rule a stored setting describes (`None`: not a setting this outboxd wrote).
    pub fn from_setting(setting: &str) -> Option<OrderRule> {
        let value: serde_json::Value = serde_json::from_str(setting).ok()?;
        let mut rule = OrderRule {
            ordered_by_default: value["ordered_by_default"].as_bool()?,
            dead_letters_block: value["dead_letters_block"].as_bool()?,
            ..OrderRule::default()
        };
        for item in value["rules"].as_array()? {
            let pattern = item["event_type"].as_str()?;
            let parsed = Pattern::parse(pattern).ok()?;
            rule.patterns.push(parsed.to_like());
            rule.matchers.push(parsed);
            rule.event_types.push(pattern.to_string());
            rule.ordered.push(item["ordered"].as_bool()?);
        }
        Some(rule)
    }

    /// A stored setting in words, for error messages (as stored when it is not one
    /// this outboxd reads).
    pub fn describe_setting(setting: &str) -> String {
        OrderRule::from_setting(setting).map_or_else(|| setting.to_string(), |rule| rule.describe())
    }

    /// The rule in words: the configuration keys that give it.
    pub fn describe(&self) -> String {
        let name = |ordered: bool| if ordered { "per_aggregate" } else { "none" };
        let mut text = format!("ordering = \"{}\"", name(self.ordered_by_default));
        if self.any() {
            text.push_str(&format!(
                ", ordering_dead_letters = \"{}\"",
                if self.dead_letters_block {
                    "block"
                } else {
                    "skip"
                }
            ));
        }
        if !self.event_types.is_empty() {
            let routes: Vec<String> = self
                .event_types
                .iter()
                .zip(&self.ordered)
                .map(|(pattern, ordered)| format!("{pattern} {}", name(*ordered)))
                .collect();
            text.push_str(&format!(" with route orderings [{}]", routes.join(", ")));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&str, Option<Ordering>)]) -> Vec<(Vec<String>, Option<Ordering>)> {
        list.iter()
            .map(|(p, o)| (vec![p.to_string()], *o))
            .collect()
    }

    #[test]
    fn without_overrides_every_event_follows_the_default() {
        let rule = OrderRule::new(
            Ordering::PerAggregate,
            OnDeadLetter::Block,
            &rules(&[("order.*", None), ("*", Some(Ordering::PerAggregate))]),
        )
        .unwrap();
        assert!(rule.patterns.is_empty());
        assert!(rule.any());
        assert!(rule.is_ordered("anything"));
        let none = OrderRule::new(Ordering::None, OnDeadLetter::Skip, &[]).unwrap();
        assert!(!none.any());
        assert!(!none.is_ordered("order.created"));
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rule = OrderRule::new(
            Ordering::PerAggregate,
            OnDeadLetter::Block,
            &rules(&[
                ("audit.*", Some(Ordering::None)),
                ("audit_log", None),
                ("*", None),
            ]),
        )
        .unwrap();
        assert!(!rule.is_ordered("audit.read"));
        assert!(rule.is_ordered("audit_log"));
        assert!(
            rule.is_ordered("auditXlog"),
            "a literal _ in a pattern is escaped"
        );
        assert!(rule.is_ordered("order.created"));
        let only_some = OrderRule::new(
            Ordering::None,
            OnDeadLetter::Block,
            &rules(&[("order.*", Some(Ordering::PerAggregate))]),
        )
        .unwrap();
        assert!(only_some.any());
        assert!(only_some.is_ordered("order.paid"));
        assert!(!only_some.is_ordered("user.created"));
    }

    #[test]
    fn the_setting_tells_rules_apart_and_reads_back_in_words() {
        let a = OrderRule::new(Ordering::PerAggregate, OnDeadLetter::Block, &[]).unwrap();
        let b = OrderRule::new(Ordering::PerAggregate, OnDeadLetter::Skip, &[]).unwrap();
        let c = OrderRule::new(Ordering::None, OnDeadLetter::Block, &[]).unwrap();
        assert_ne!(a.setting(), b.setting());
        assert_ne!(a.setting(), c.setting());
        assert_eq!(
            OrderRule::describe_setting(&b.setting()),
            "ordering = \"per_aggregate\", ordering_dead_letters = \"skip\""
        );
        assert_eq!(
            OrderRule::describe_setting(&c.setting()),
            "ordering = \"none\""
        );
        let d = OrderRule::new(
            Ordering::None,
            OnDeadLetter::Skip,
            &rules(&[("order.*", Some(Ordering::PerAggregate)), ("*", None)]),
        )
        .unwrap();
        assert_eq!(
            OrderRule::describe_setting(&d.setting()),
            "ordering = \"none\", ordering_dead_letters = \"skip\" with route orderings [order.* per_aggregate, * none]"
        );
        for rule in [a, b, c, d] {
            assert_eq!(OrderRule::from_setting(&rule.setting()), Some(rule));
        }
        assert_eq!(OrderRule::from_setting("{}"), None);
    }
}
