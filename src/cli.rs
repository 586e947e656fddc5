//! The command line: `outboxd run`, `outboxd migrate`, `outboxd status`. Exit codes:
//! 0 done, 1 a runtime failure (database unreachable...), 2 bad usage or configuration.

use crate::config::{Config, ConfigError};
use crate::dead_letters::{self, DeadLetterError, ListRequest};
use crate::service::Outboxd;
use crate::store::{Store, connect_once, migrate, partitions};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Delivers events committed to a PostgreSQL outbox table to RabbitMQ, at least once."
)]
pub struct Cli {
    /// Config file (TOML). Default: ./outboxd.toml if it exists.
    #[arg(long, global = true, env = "OUTBOXD_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL; overrides DATABASE_URL, OUTBOXD_DATABASE_URL and the file.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OUTBOXD_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay events until SIGTERM/SIGINT.
    Run {
        /// Apply pending migrations first.
        #[arg(long)]
        migrate: bool,
    },
    /// Create or upgrade the outbox schema (idempotent; safe to run concurrently),
    /// and create the daily partitions ahead.
    Migrate {
        /// Print the SQL that would run, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Events per status, the oldest pending event's age, dead letters.
    Status,
    /// List, inspect and redrive dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// See it work: migrate, start outboxd, bind a throw-away queue to the exchange,
    /// commit a few events and print how long each took to arrive.
    Demo {
        /// How many events to commit.
        #[arg(long, default_value_t = 10)]
        events: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters, newest first (a page at a time).
    List {
        /// Only this event type (`*` matches any run of characters: `order.*`).
        #[arg(long)]
        event_type: Option<String>,
        /// Only events created at or after this time (RFC 3339, e.g. 2026-11-24T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only events created before this time.
        #[arg(long)]
        until: Option<String>,
        /// The next page: ids below this one (printed at the end of a full page).
        #[arg(long)]
        before_id: Option<i64>,
        /// Dead letters per page (default 50, at most 1000).
        #[arg(long)]
        limit: Option<i64>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One event in full, with its redrive history.
    Show {
        id: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters again (attempts reset, same tracking_id, only to destinations
    /// that never acknowledged them). Recorded with the reason and who asked.
    Redrive {
        /// A dead letter's id; repeat for several.
        #[arg(long = "id", required = true)]
        ids: Vec<i64>,
        /// What was fixed, so that the event can pass now (required).
        #[arg(long)]
        reason: String,
        /// Who asks (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure {
            code: 2,
            message: error.to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            code: 1,
            message: format!("{error:#}"),
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = init_logging(cli.log_format);
    let code = match tokio::runtime::Runtime::new() {
        Ok(runtime) => match runtime.block_on(execute(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                say(&format!("outboxd: error: {}", failure.message));
                ExitCode::from(failure.code)
            }
        },
        Err(error) => {
            say(&format!(
                "outboxd: error: cannot start the async runtime: {error}"
            ));
            ExitCode::from(1)
        }
    };
    // Flush what the log writer still holds (it gives up after a second); a standard
    // error nobody reads can change nothing about how the process ends.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(logging)));
    code
}

/// One line on standard error, whatever state standard error is in.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Logs go through a writer thread of their own with a bounded buffer that drops lines
/// when full: a standard error that is a closed pipe, or a full one nobody reads (a log
/// shipper that died), never blocks delivery or shutdown. The guard flushes at exit.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,lapin=error,amq_protocol=warn,tokio_postgres=warn")
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let path = match &cli.config {
        Some(path) => Some(path.clone()),
        None => {
            let default = PathBuf::from("outboxd.toml");
            default.exists().then_some(default)
        }
    };
    let (mut config, warnings) = Config::load(path.as_deref(), std::env::vars())?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    if let Some(url) = &cli.database_url {
        config.database.url = url.clone();
        config.validate()?;
    }
    Ok(config)
}

async fn execute(cli: Cli) -> Result<(), Failure> {
    let config = load_config(&cli)?;
    match cli.command {
        Command::Migrate { dry_run } => migrate_command(&config, dry_run).await,
        Command::Run { migrate } => {
            if migrate {
                migrate_command(&config, false).await?;
            }
            run_command(config).await
        }
        Command::Status => status_command(&config).await,
        Command::DeadLetters(command) => dead_letters_command(&config, command).await,
        Command::Demo { events } => demo_command(config, events).await,
    }
}

async fn migrate_command(config: &Config, dry_run: bool) -> Result<(), Failure> {
    let mut client = connect_once(
        &config.database.url,
        config.database.connect_timeout,
        "outboxd-migrate",
    )
    .await
    .map_err(anyhow::Error::from)?;
    if dry_run {
        let pending = migrate::pending(&client)
            .await
            .map_err(anyhow::Error::from)?;
        if pending.is_empty() {
            println!("-- outboxd: the schema is up to date; nothing would run");
        }
        for migration in pending {
            println!(
                "-- migration {:04}_{}\n{}",
                migration.version, migration.name, migration.sql
            );
        }
        return Ok(());
    }
    let applied = migrate::run(&mut client)
        .await
        .map_err(anyhow::Error::from)?;
    if applied.is_empty() {
        tracing::info!("schema up to date");
    }
    let report = partitions::ensure(&mut client, config.partitions.days_ahead)
        .await
        .map_err(anyhow::Error::from)?;
    tracing::info!(
        migrations_applied = applied.len(),
        partitions_created = report.created.len(),
        default_partition_rows = report.default_rows,
        "migrate done"
    );
    Ok(())
}

async fn run_command(config: Config) -> Result<(), Failure> {
    let service = Outboxd::start(config).await.map_err(anyhow::Error::from)?;
    tracing::info!("outboxd running");
    let token = service.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: draining");
        token.cancel();
    });
    service.wait().await;
    tracing::info!("outboxd stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn status_command(config: &Config) -> Result<(), Failure> {
    let store = Store::connect(&config.database)
        .await
        .map_err(anyhow::Error::from)?;
    let rows = store.status().await.map_err(anyhow::Error::from)?;
    println!("{:<12} {:>12} {:>14}", "status", "events", "oldest");
    for row in &rows {
        let oldest = row
            .oldest_age_seconds
            .map(format_age)
            .unwrap_or_else(|| "-".into());
        println!("{:<12} {:>12} {:>14}", row.status, row.events, oldest);
    }
    let dead = rows
        .iter()
        .find(|r| r.status == "DEAD_LETTER")
        .map_or(0, |r| r.events);
    if dead > 0 {
        println!("\n{dead} dead letter(s): outboxd dead-letters list");
    }
    let default_rows = store
        .default_partition_rows()
        .await
        .map_err(anyhow::Error::from)?;
    if default_rows > 0 {
        println!(
            "\nwarning: {default_rows} row(s) in outbox_default (a daily partition was missing); run `outboxd migrate`"
        );
    }
    Ok(())
}

impl From<DeadLetterError> for Failure {
    fn from(error: DeadLetterError) -> Self {
        let code = match error {
            DeadLetterError::BadRequest(_) => 2,
            DeadLetterError::NotFound(_) | DeadLetterError::Store(_) => 1,
        };
        Failure {
            code,
            message: error.to_string(),
        }
    }
}

async fn dead_letters_command(config: &Config, command: DeadLettersCommand) -> Result<(), Failure> {
    let store = Store::connect(&config.database)
        .await
        .map_err(anyhow::Error::from)?;
    match command {
        DeadLettersCommand::List {
            event_type,
            since,
            until,
            before_id,
            limit,
            json,
        } => {
            let page = dead_letters::list(
                &store,
                &ListRequest {
                    event_type,
                    since,
                    until,
                    before_id,
                    limit,
                },
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&page).unwrap_or_default()
                );
                return Ok(());
            }
            if page.items.is_empty() {
                println!("no dead letters");
                return Ok(());
            }
            println!(
                "{:>10}  {:<24}  {:<28}  {:>8}  last error",
                "id", "created", "event type", "attempts"
            );
            for item in &page.items {
                let created = humantime::format_rfc3339_seconds(item.created_at).to_string();
                let mut error = item
                    .last_error
                    .clone()
                    .unwrap_or_default()
                    .replace('\n', " ");
                if error.chars().count() > 100 {
                    error = error.chars().take(99).collect::<String>() + "…";
                }
                println!(
                    "{:>10}  {:<24}  {:<28}  {:>8}  {}",
                    item.id, created, item.event_type, item.attempts, error
                );
            }
            if let Some(next) = page.next_before_id {
                println!("\nmore: outboxd dead-letters list --before-id {next}");
            }
        }
        DeadLettersCommand::Show { id, json } => {
            let event = dead_letters::show(&store, id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&event).unwrap_or_default()
                );
                return Ok(());
            }
            let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
            println!("id            {}", event.id);
            println!("tracking_id   {}", event.tracking_id);
            println!("status        {}", event.status);
            println!("event_type    {}", event.event_type);
            println!(
                "aggregate     {} {}",
                event.aggregate_type, event.aggregate_id
            );
            println!("created_at    {}", time(event.created_at));
            println!("attempts      {}", event.attempts);
            println!("delivered_to  {}", event.delivered_to.join(", "));
            println!(
                "last_error    {}",
                event.last_error.as_deref().unwrap_or("-")
            );
            println!("payload       {}", event.payload);
            println!("metadata      {}", event.metadata);
            for redrive in &event.redrives {
                println!(
                    "redriven      {} by {}: {} (had {} attempts; {})",
                    time(redrive.at),
                    redrive.by,
                    redrive.reason,
                    redrive.attempts,
                    redrive.last_error.as_deref().unwrap_or("-")
                );
            }
        }
        DeadLettersCommand::Redrive { ids, reason, by } => {
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "cli".into());
            let done = dead_letters::redrive(&store, &ids, &reason, &by).await?;
            println!("redriven: {:?}", done.redriven);
            if !done.not_dead_letters.is_empty() {
                println!("not dead letters (left alone): {:?}", done.not_dead_letters);
            }
        }
    }
    Ok(())
}

async fn demo_command(mut config: Config, events: usize) -> Result<(), Failure> {
    use crate::sink::rabbitmq::demo_queue::DemoQueue;
    use std::time::Instant;
    migrate_command(&config, false).await?;
    // The demo delivers to RabbitMQ whatever the routes say.
    config.routing = Default::default();
    let mut queue = DemoQueue::bind(&config.rabbitmq)
        .await
        .map_err(|e| Failure::from(anyhow::anyhow!(e)))?;
    let exchange = config.rabbitmq.exchange.clone();
    let service = Outboxd::start(config.clone())
        .await
        .map_err(anyhow::Error::from)?;
    while service.metrics().listener_connected.get() != 1 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let producer = connect_once(
        &config.database.url,
        config.database.connect_timeout,
        "outboxd-demo",
    )
    .await
    .map_err(anyhow::Error::from)?;
    println!("committing {events} event(s); a queue bound to exchange {exchange:?} receives them:");
    for n in 1..=events {
        let event = crate::NewEvent::new(
            "demo",
            n.to_string(),
            "demo.created",
            serde_json::json!({ "n": n }),
        );
        let tracking_id = crate::enqueue(&producer, &event)
            .await
            .map_err(|e| anyhow::anyhow!("INSERT INTO outbox failed: {e}"))?
            .to_string();
        let committed = Instant::now();
        let arrived = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while let Some(id) = queue.next().await {
                if id == tracking_id {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !arrived {
            service.stop().await;
            return Err(Failure::from(anyhow::anyhow!(
                "event {tracking_id} did not arrive within 10 s; see the log above"
            )));
        }
        println!(
            "  event {n:>3}  {tracking_id}  commit to consumer: {:.2} ms",
            committed.elapsed().as_secs_f64() * 1000.0
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    service.stop().await;
    queue.close().await;
    println!(
        "done: every event was delivered, confirmed and marked PUBLISHED (see `outboxd status`)"
    );
    Ok(())
}

fn format_age(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.1}s")
    } else if seconds < 7200.0 {
        format!("{:.1}m", seconds / 60.0)
    } else {
        format!("{:.1}h", seconds / 3600.0)
    }
}
