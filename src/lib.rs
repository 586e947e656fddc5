//! outboxd: delivers events committed to a PostgreSQL `outbox` table to RabbitMQ, at
//! least once, within milliseconds, and never loses one.
//!
//! Producers call [`enqueue`] / [`enqueue_many`] inside their own transaction (or INSERT
//! into `outbox` from any language); an outboxd instance ([`Outboxd`]) does the rest.

pub mod cli;
pub mod config;
pub mod config_show;
pub mod dead_letters;
pub mod duration_text;
pub mod event;
pub mod events;
pub mod health;
pub mod high_load;
pub mod http;
pub mod listener;
pub mod maintenance;
pub mod membership;
pub mod metrics;
pub mod notification;
pub mod ordering;
pub mod producer;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod routing;
pub mod secret;
pub mod service;
pub mod sink;
pub mod store;
pub mod validate;

pub use config::Config;
pub use event::{Event, Outcome};
pub use producer::{NewEvent, enqueue, enqueue_many};
pub use service::Outboxd;

/// This host's name (`HOSTNAME`, else the kernel's): in the RabbitMQ connection's name
/// (`outboxd@HOST`) and the default `by` of a redrive from the CLI (`cli@HOST`).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}
