//! One event as an AMQP message, checked against what the broker can carry before
//! anything is sent. A field the broker would refuse costs only its own event, as a
//! clear `Rejected` (a dead letter naming the field): an AMQP short string (routing key,
//! `type`, a header name) holds at most 255 bytes; the message's properties must fit in
//! one frame (`frame_max`, negotiated at connect), or the broker closes the whole
//! connection; `CC` and `BCC` are RabbitMQ's own headers (sender-selected distribution,
//! arrays of routing keys) and close the channel when they hold anything else; the
//! payload must stay within `rabbitmq.max_payload_bytes`. No conversion of event data
//! here can panic: short strings are built with `ShortString::try_new` only.

use crate::event::Event;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::UNIX_EPOCH;

/// The longest AMQP short string, in bytes.
pub const SHORT_STRING_MAX: usize = 255;

/// Header names the broker reads itself.
pub const RESERVED_HEADERS: [&str; 2] = ["CC", "BCC"];

/// Bytes of a content frame that are not properties: the frame's own header and end
/// (8), and the content header's class, weight, body size and property flags (14).
const FRAME_OVERHEAD: usize = 8 + 14;

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub routing_key: ShortString,
    pub properties: BasicProperties,
}

/// A field of `event` as a short string, or why it cannot be one.
fn short(field: &str, value: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|_| {
        format!(
            "{field} is {} bytes long; AMQP allows at most {SHORT_STRING_MAX}",
            value.len()
        )
    })
}

/// Builds `event`'s message for `routing_key` (the rendered template), within
/// `frame_max` bytes of properties and `max_payload_bytes` of payload.
pub fn build(
    event: &Event,
    routing_key: &str,
    frame_max: usize,
    max_payload_bytes: usize,
) -> Result<Message, String> {
    if event.payload.len() > max_payload_bytes {
        // RabbitMQ would close the channel over it, failing the whole batch.
        return Err(format!(
            "payload of {} bytes is larger than rabbitmq.max_payload_bytes ({max_payload_bytes}); the broker would refuse it",
            event.payload.len()
        ));
    }
    let kind = short("event_type", &event.event_type)?;
    let routing_key = short(
        "the routing key (rabbitmq.routing_key, rendered)",
        routing_key,
    )?;
    // Bytes of the encoded properties, counted as they are added.
    let mut size = (1 + 36) + (1 + kind.as_str().len()) + (1 + 16) + 1 + 8 + (1 + 7) + 4;
    let mut headers = FieldTable::default();
    let mut add = |name: ShortString, value: AMQPValue, value_size: usize| {
        size += 1 + name.as_str().len() + 1 + value_size;
        headers.insert(name, value);
    };
    if let serde_json::Value::Object(map) = &event.metadata {
        for (key, value) in map {
            if RESERVED_HEADERS.contains(&key.as_str()) {
                return Err(format!(
                    "metadata key {key:?} is a header RabbitMQ reads itself (sender-selected distribution) and would close the channel over; rename it"
                ));
            }
            let name = short(&format!("metadata key {:?}…", prefix(key)), key)?;
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let length = text.len();
            add(
                name,
                AMQPValue::LongString(LongString::from(text)),
                4 + length,
            );
        }
    }
    for (name, value) in [
        ("aggregate_type", &event.aggregate_type),
        ("aggregate_id", &event.aggregate_id),
    ] {
        add(
            ShortString::try_new(name).expect("a literal under 255 bytes"),
            AMQPValue::LongString(LongString::from(value.as_str())),
            4 + value.len(),
        );
    }
    add(
        ShortString::try_new("outbox_attempt").expect("a literal under 255 bytes"),
        AMQPValue::LongInt(event.attempts),
        4,
    );
    // The event's position: within an aggregate written through `enqueue`, a later
    // event has a larger one, so a consumer can drop what it already applied.
    add(
        ShortString::try_new("outbox_id").expect("a literal under 255 bytes"),
        AMQPValue::LongLongInt(event.id),
        8,
    );
    if let Some(replay) = event.replay_id {
        add(
            ShortString::try_new(crate::event::REPLAY_HEADER).expect("a literal under 255 bytes"),
            AMQPValue::LongLongInt(replay),
            8,
        );
    }
    if size + FRAME_OVERHEAD > frame_max {
        return Err(format!(
            "its headers (metadata, aggregate_type, aggregate_id) take {size} bytes; with the frame's own {FRAME_OVERHEAD} they do not fit in one AMQP frame of {frame_max} bytes (the broker's frame_max), and the broker would close the connection; keep metadata small"
        ));
    }
    let timestamp = event
        .created_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let properties = BasicProperties::default()
        .with_message_id(short("tracking_id", &event.tracking_id.to_string())?)
        .with_type(kind)
        .with_content_type(short("content type", "application/json")?)
        .with_delivery_mode(2)
        .with_timestamp(timestamp)
        .with_app_id(short("app id", "outboxd")?)
        .with_headers(headers);
    Ok(Message {
        routing_key,
        properties,
    })
}

/// The first characters of a long name, for an error message.
fn prefix(text: &str) -> &str {
    let mut end = text.len().min(32);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    const FRAME: usize = 131_072;

    fn event() -> Event {
        Event {
            id: 1,
            created_at: SystemTime::now(),
            tracking_id: uuid::Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "order.created".into(),
            payload: "{}".into(),
            metadata: serde_json::json!({ "traceparent": "00-abc-def-01" }),
            attempts: 1,
            max_attempts: None,
            delivered_to: vec![],
            replay_id: None,
        }
    }

    #[test]
    fn an_ordinary_event_becomes_a_message() {
        let message = build(&event(), "order.created", FRAME, 1024).unwrap();
        assert_eq!(message.routing_key.as_str(), "order.created");
        let headers = message.properties.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("outbox_id"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(
            headers.get("aggregate_id"),
            Some(&AMQPValue::LongString(LongString::from("42")))
        );
        assert_eq!(
            message.properties.kind().as_ref().map(|k| k.as_str()),
            Some("order.created")
        );
    }

    #[test]
    fn every_field_the_broker_cannot_carry_is_refused_by_name() {
        let long = "x".repeat(256);
        let mut e = event();
        e.event_type = long.clone();
        assert!(
            build(&e, "k", FRAME, 1024)
                .unwrap_err()
                .contains("event_type")
        );
        assert!(
            build(&event(), &long, FRAME, 1024)
                .unwrap_err()
                .contains("routing key")
        );
        let mut e = event();
        e.metadata = serde_json::json!({ long.clone(): "v" });
        assert!(
            build(&e, "k", FRAME, 1024)
                .unwrap_err()
                .contains("metadata key")
        );
        let mut e = event();
        e.metadata = serde_json::json!({ "big": "y".repeat(300_000) });
        assert!(
            build(&e, "k", FRAME, 1024)
                .unwrap_err()
                .contains("frame_max")
        );
        for reserved in RESERVED_HEADERS {
            let mut e = event();
            e.metadata = serde_json::json!({ reserved: "a.b" });
            assert!(build(&e, "k", FRAME, 1024).unwrap_err().contains(reserved));
        }
        let mut e = event();
        e.payload = format!("\"{}\"", "z".repeat(2000));
        assert!(
            build(&e, "k", FRAME, 1024)
                .unwrap_err()
                .contains("max_payload_bytes")
        );
        // 255 bytes is allowed: the limit, not one below it.
        let mut e = event();
        e.event_type = "x".repeat(255);
        assert!(build(&e, &"k".repeat(255), FRAME, 1024).is_ok());
    }

    #[test]
    fn multibyte_names_are_cut_on_a_character_boundary() {
        let mut e = event();
        e.metadata = serde_json::json!({ "é".repeat(200): "v" });
        assert!(
            build(&e, "k", FRAME, 1024)
                .unwrap_err()
                .contains("metadata key")
        );
    }
}
