//! `outboxd partitions status|maintain`: what retention will do with each daily
//! partition, and one maintenance pass now (DEFAULT emptied, expired partitions dropped
//! or detached), under the same lease the running instances take.

use super::{Failure, who_asks};
use crate::config::Config;
use crate::store::Store;
use crate::store::retention::{PartitionState, Verdict};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum PartitionsCommand {
    /// Each partition, oldest first: its days, size, rows (estimated) and what
    /// retention does with it (keep, expire at the next pass, or wait, and why).
    Status {
        /// JSON output: {"retention_seconds", "on_expiry", "default_partition_rows",
        /// "partitions": [{"name", "from", "to", "bytes", "rows_estimate", "expired",
        /// "unfinished", "dead_letters", "blocking", "verdict", "reason"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Run one maintenance pass now, as a running instance does every
    /// `partitions.check_interval`: move rows out of the DEFAULT partition, then drop
    /// (or detach) every expired partition whose rows are all finished.
    Maintain,
}

pub async fn command(config: &Config, command: PartitionsCommand) -> Result<(), Failure> {
    let store = Store::connect(&config.database)
        .await
        .map_err(anyhow::Error::from)?;
    let p = &config.partitions;
    match command {
        PartitionsCommand::Status { json } => {
            let states = store
                .partitions(p.retention)
                .await
                .map_err(anyhow::Error::from)?;
            let default_rows = store
                .default_partition_rows()
                .await
                .map_err(anyhow::Error::from)?;
            if json {
                let partitions: Vec<serde_json::Value> = states.iter().map(as_json).collect();
                let value = serde_json::json!({
                    "retention_seconds": p.retention.as_secs(),
                    "on_expiry": p.on_expiry,
                    "default_partition_rows": default_rows,
                    "partitions": partitions,
                });
                println!("{value:#}");
                return Ok(());
            }
            println!(
                "retention {} ({} when expired); {} row(s) in outbox_default",
                crate::duration_text::format(p.retention),
                match p.on_expiry {
                    crate::config::OnExpiry::Drop => "dropped",
                    crate::config::OnExpiry::Detach => "detached",
                },
                default_rows
            );
            println!(
                "{:<20} {:<10} {:>10} {:>12}  retention",
                "partition", "day", "size", "rows (est.)"
            );
            for state in &states {
                let (verdict, reason) = verdict(state);
                let day = humantime::format_rfc3339(state.from).to_string();
                println!(
                    "{:<20} {:<10} {:>10} {:>12}  {verdict}{}",
                    state.name,
                    &day[..10.min(day.len())],
                    bytes(state.bytes),
                    state.rows_estimate,
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                );
            }
        }
        PartitionsCommand::Maintain => {
            let holder = format!("cli:{}", who_asks());
            let report = store
                .maintain_partitions(p.retention, p.on_expiry, &holder)
                .await
                .map_err(anyhow::Error::from)?;
            if let Some(owner) = report.lease_held_by {
                return Err(Failure {
                    code: 1,
                    message: format!(
                        "{owner} is maintaining the partitions now (it holds the lease in outbox_leases); nothing was done: try again when it is finished"
                    ),
                });
            }
            for day in &report.default.moved {
                println!(
                    "{}: {} row(s) moved out of outbox_default ({} copied in batches, {} in the locked step of {:.1} ms)",
                    day.partition,
                    day.copied + day.moved_locked,
                    day.copied,
                    day.moved_locked,
                    day.locked_ms
                );
            }
            for (name, why) in &report.default.skipped {
                println!("{name}: rows left in outbox_default: {why}");
            }
            for name in &report.expired {
                println!("{name}: {}", p.on_expiry.verb());
            }
            for (name, why) in &report.waiting {
                println!("{name}: expired, waits: {why}");
            }
            for (name, why) in &report.failed {
                println!(
                    "{name}: expired, not {} this time: {why}",
                    p.on_expiry.verb()
                );
            }
            if report.expired.is_empty()
                && report.waiting.is_empty()
                && report.failed.is_empty()
                && report.default.moved.is_empty()
                && report.default.skipped.is_empty()
            {
                println!("nothing to do: no partition has expired, outbox_default is empty");
            }
            if !report.failed.is_empty() || !report.default.skipped.is_empty() {
                return Err(Failure {
                    code: 1,
                    message: "some partitions could not be maintained (see above)".into(),
                });
            }
        }
    }
    Ok(())
}

fn verdict(state: &PartitionState) -> (&'static str, Option<String>) {
    match state.verdict() {
        Verdict::Keep => ("keep", None),
        Verdict::Expire => ("expire at the next pass", None),
        Verdict::Wait(why) => ("expired, waits", Some(why)),
    }
}

fn as_json(state: &PartitionState) -> serde_json::Value {
    let mut value = serde_json::to_value(state).unwrap_or_default();
    let (verdict, reason) = match state.verdict() {
        Verdict::Keep => ("keep", None),
        Verdict::Expire => ("expire", None),
        Verdict::Wait(why) => ("wait", Some(why)),
    };
    value["verdict"] = verdict.into();
    value["reason"] = reason.into();
    value
}

/// `1.2 MB`, `834 kB`, `512 B`.
fn bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}
