//! The routing key of a message: literal text and `{event_type}`, `{aggregate_type}`,
//! `{aggregate_id}` placeholders, checked when the config is read.

use crate::event::Event;

/// A routing key template: literal text and `{event_type}`, `{aggregate_type}`,
/// `{aggregate_id}` placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingKeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    EventType,
    AggregateType,
    AggregateId,
}

impl RoutingKeyTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "event_type" => Part::EventType,
                "aggregate_type" => Part::AggregateType,
                "aggregate_id" => Part::AggregateId,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}}; use {{event_type}}, {{aggregate_type}} or {{aggregate_id}}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    pub fn render(&self, event: &Event) -> String {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => key.push_str(text),
                Part::EventType => key.push_str(&event.event_type),
                Part::AggregateType => key.push_str(&event.aggregate_type),
                Part::AggregateId => key.push_str(&event.aggregate_id),
            }
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn event(event_type: &str) -> Event {
        Event {
            id: 1,
            created_at: SystemTime::now(),
            tracking_id: uuid::Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: event_type.into(),
            payload: "{}".into(),
            metadata: serde_json::json!({}),
            attempts: 1,
            max_attempts: None,
            delivered_to: vec![],
            replay_id: None,
        }
    }

    #[test]
    fn routing_key_templates_render_fields() {
        let e = event("order.created");
        let cases = [
            ("{event_type}", "order.created"),
            ("events.{aggregate_type}.{aggregate_id}", "events.order.42"),
            ("fixed", "fixed"),
            ("", ""),
        ];
        for (template, expected) in cases {
            assert_eq!(
                RoutingKeyTemplate::parse(template).unwrap().render(&e),
                expected
            );
        }
        assert!(RoutingKeyTemplate::parse("{payload}").is_err());
        assert!(RoutingKeyTemplate::parse("{event_type").is_err());
    }
}
