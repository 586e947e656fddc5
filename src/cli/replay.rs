//! `outboxd replay --destination NAME [filters] --reason TEXT [--rate N] [--dry-run]`,
//! `outboxd replay status [--id N]`, `outboxd replay cancel --id N`. The replay is stored;
//! the running instances send it (see src/replay.rs).

use super::{Failure, who_asks};
use crate::config::Config;
use crate::replay::{self, ReplayRequest, Started};
use crate::store::Store;
use crate::store::replays::Replay;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReplayArgs {
    #[command(subcommand)]
    pub action: Option<ReplayAction>,
    #[command(flatten)]
    pub start: StartArgs,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The one destination to send to: `rabbitmq` or `webhook:NAME`. Only events it
    /// acknowledged are sent, and to no other destination.
    #[arg(long)]
    pub destination: Option<String>,
    /// From this event id or time (RFC 3339, e.g. 2026-12-01T00:00:00Z), inclusive.
    #[arg(long)]
    pub from: Option<String>,
    /// To this event id (inclusive) or time (exclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// Only this event type (`*` matches any run of characters: `order.*`).
    #[arg(long)]
    pub event_type: Option<String>,
    /// Only this aggregate: TYPE, or TYPE:ID.
    #[arg(long)]
    pub aggregate: Option<String>,
    /// Why (required): what the consumer lost. Kept with the replay.
    #[arg(long)]
    pub reason: Option<String>,
    /// Events a second, at most (default 100).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Count what would be sent; store nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who asks (default: $USER, else $LOGNAME, else cli@HOST).
    #[arg(long)]
    pub by: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReplayAction {
    /// The newest replays (or one), with their progress.
    Status {
        #[arg(long)]
        id: Option<i64>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running replay (its instance stops after the batch in flight).
    Cancel {
        #[arg(long)]
        id: i64,
        /// Who asks (default: $USER, else $LOGNAME, else cli@HOST).
        #[arg(long)]
        by: Option<String>,
    },
}

pub async fn command(config: &Config, args: ReplayArgs) -> Result<(), Failure> {
    let store = Store::connect(&config.database)
        .await
        .map_err(anyhow::Error::from)?;
    match args.action {
        Some(ReplayAction::Status { id, json }) => {
            let replays = replay::status(&store, id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&replays).unwrap_or_default()
                );
            } else if replays.is_empty() {
                println!("no replays");
            } else {
                for r in &replays {
                    print_replay(r);
                }
            }
        }
        Some(ReplayAction::Cancel { id, by }) => {
            let by = by.unwrap_or_else(who_asks);
            let r = replay::cancel(&store, id, &by).await?;
            println!(
                "replay {} cancelled after {} of {} sent",
                r.id, r.sent, r.matched
            );
        }
        None => {
            let a = args.start;
            let Some(destination) = a.destination else {
                return Err(Failure {
                    code: 2,
                    message: "name the destination to send to: --destination rabbitmq or --destination webhook:NAME (or: outboxd replay status | cancel --id N)".into(),
                });
            };
            let destinations = crate::sink::defined(&config.destinations());
            let request = ReplayRequest {
                destination,
                from: a.from,
                to: a.to,
                event_type: a.event_type,
                aggregate: a.aggregate,
                reason: a.reason.unwrap_or_default(),
                rate: a.rate,
                dry_run: a.dry_run,
                by: Some(a.by.unwrap_or_else(who_asks)),
            };
            let started = replay::start(&store, &destinations, &request).await?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&started).unwrap_or_default()
                );
                return Ok(());
            }
            match started {
                Started::DryRun {
                    destination,
                    filter,
                    count,
                } => println!(
                    "dry run: {} event(s) would be sent again to {destination} ({filter}; ids {}..{}); nothing was stored",
                    count.events,
                    count.first_id.map_or("-".into(), |i| i.to_string()),
                    count.last_id.map_or("-".into(), |i| i.to_string()),
                ),
                Started::Stored {
                    id,
                    destination,
                    filter,
                    matched,
                    rate,
                } => println!(
                    "replay {id} stored: {matched} event(s) to {destination} ({filter}) at up to {rate}/s; a running instance starts it within http.gauge_refresh_interval ({}). Follow it: outboxd replay status --id {id}",
                    crate::duration_text::format(config.http.gauge_refresh_interval)
                ),
            }
        }
    }
    Ok(())
}

fn print_replay(r: &Replay) {
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    println!(
        "replay {}  {}  to {}  {} of {} sent, {} rejected, cursor {}",
        r.id, r.status, r.destination, r.sent, r.matched, r.rejected, r.cursor
    );
    println!("  filter   {}", r.filter.describe());
    println!(
        "  asked    {} by {}: {} (up to {}/s)",
        time(r.requested_at),
        r.requested_by,
        r.reason,
        r.rate
    );
    if let Some(holder) = &r.holder {
        println!("  running  on {holder}");
    }
    if let Some(at) = r.finished_at {
        match &r.cancelled_by {
            Some(by) => println!("  ended    {} (cancelled by {by})", time(at)),
            None => println!("  ended    {}", time(at)),
        }
    }
}
