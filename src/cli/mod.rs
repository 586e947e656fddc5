//! The command line: `outboxd run`, `outboxd migrate`, `outboxd status`. Exit codes:
//! 0 done, 1 a runtime failure (database unreachable...), 2 bad usage or configuration.

mod replay;
mod retention;

use crate::config::{Config, ConfigError};
use crate::dead_letters::{self, ListRequest, RequestError};
use crate::service::Outboxd;
use crate::store::{Store, connect_once, migrate, partitions};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

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
    Status {
        /// JSON output: {"statuses": [{"status", "events", "oldest_age_seconds"}],
        /// "dead_letters", "default_partition_rows"}.
        #[arg(long)]
        json: bool,
    },
    /// Asks the instance on this host whether it is ready (`/readyz`): exit 0 if it
    /// is, 1 if not or unreachable. For container HEALTHCHECKs and Kubernetes probes.
    Health {
        /// Ask `/healthz` (the process is alive) instead of `/readyz`.
        #[arg(long)]
        live: bool,
        /// The address to ask (default: `http.listen`; 0.0.0.0 and [::] mean this
        /// host's loopback), e.g. 127.0.0.1:9187.
        #[arg(long)]
        addr: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = crate::duration_text::parse)]
        timeout: std::time::Duration,
    },
    /// List, inspect and redrive dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Look events up without SQL: one by its tracking_id, an aggregate's history.
    #[command(subcommand)]
    Events(EventsCommand),
    /// The ordering rule the database keeps (every instance must claim by it).
    #[command(subcommand)]
    Ordering(OrderingCommand),
    /// Daily partitions: what retention will do with each, and a maintenance pass now.
    #[command(subcommand)]
    Partitions(retention::PartitionsCommand),
    /// Send already published events again to one destination (a stored job the
    /// running instances execute), or `replay status` / `replay cancel`.
    Replay(replay::ReplayArgs),
    /// Check the configuration, or show it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the Prometheus alert rules (docs/alerts.yml) with each alert's runbook_url
    /// pointing at your copy of the operations guide.
    AlertRules {
        /// Where docs/ is served, e.g. https://wiki.example.com/outboxd/docs: every
        /// runbook_url becomes BASE/operations.md#ALERT.
        #[arg(long)]
        runbook_base: String,
    },
    /// See it work: migrate, start outboxd, bind a throw-away queue to the exchange,
    /// commit a few events and print how long each took to arrive.
    Demo {
        /// How many events to commit.
        #[arg(long, default_value_t = 10)]
        events: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load the file, the environment and the flags, check every value, and exit: 0
    /// valid, 2 not (the message names the key, the value and the fix). Connects to
    /// nothing, so it fits CI and deploy pipelines.
    Check,
    /// Print the effective configuration as TOML, secrets hidden, each value followed
    /// by where it came from (flag, environment, file or default).
    Show,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// One event in full (any status), with its redrive history.
    Show {
        /// Its tracking_id (the UUID consumers see as message_id or webhook-id) or
        /// its id.
        event: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One aggregate's events, newest first (a page at a time).
    List {
        /// TYPE:ID, as the events were written: `order:42` is aggregate_type "order",
        /// aggregate_id "42" (the id may contain colons, the type may not).
        #[arg(long)]
        aggregate: String,
        /// The next page: ids below this one (printed at the end of a full page).
        #[arg(long)]
        before_id: Option<i64>,
        /// Events per page (default 50, at most 1000).
        #[arg(long)]
        limit: Option<i64>,
        /// JSON output.
        #[arg(long)]
        json: bool,
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
    /// that never acknowledged them). Recorded with the reason and who asked. Name them
    /// by id, or by a filter (every undiscarded dead letter it matches, at --rate a
    /// second; two redrives of one filter move each dead letter once).
    Redrive {
        /// A dead letter's id; repeat for several.
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// Filter: from this id or time (RFC 3339), inclusive.
        #[arg(long, conflicts_with = "ids")]
        from: Option<String>,
        /// Filter: to this id (inclusive) or time (exclusive).
        #[arg(long, conflicts_with = "ids")]
        to: Option<String>,
        /// Filter: this event type (`*` matches any run of characters).
        #[arg(long, conflicts_with = "ids")]
        event_type: Option<String>,
        /// Filter: TYPE or TYPE:ID.
        #[arg(long, conflicts_with = "ids")]
        aggregate: Option<String>,
        /// With a filter: count the dead letters it names, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// With a filter: dead letters a second, at most.
        #[arg(long, default_value_t = crate::replay::DEFAULT_RATE)]
        rate: u32,
        /// What was fixed, so that the event can pass now (required).
        #[arg(long, default_value = "")]
        reason: String,
        /// Who asks (default: $USER, else $LOGNAME, else cli@HOST).
        #[arg(long)]
        by: Option<String>,
    },
    /// Give up on dead letters: never delivered, no longer counted as dead letters, and
    /// (with ordering) no longer holding back the later events of their aggregate,
    /// which go on at once. Kept in the table and recorded with the reason and who
    /// asked; a discarded event can still be redriven.
    Discard {
        /// A dead letter's id; repeat for several.
        #[arg(long = "id", required = true)]
        ids: Vec<i64>,
        /// Why it is given up on (required).
        #[arg(long)]
        reason: String,
        /// Who asks (default: $USER, else $LOGNAME, else cli@HOST).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrderingCommand {
    /// Print the rule the database keeps, and this configuration's.
    Show,
    /// Make this configuration's ordering (relay.ordering, relay.ordering_dead_letters,
    /// each route's ordering) the database's. Stop every instance first: refused while
    /// events are being delivered. Held events are released for the new rule.
    Adopt,
}

/// A failure with the exit code it maps to.
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
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
    let cli_format = cli.log_format;
    let logging = init_logging(cli.log_format);
    let code = match tokio::runtime::Runtime::new() {
        Ok(runtime) => match runtime.block_on(execute(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                match cli_format {
                    // One JSON line like every other, for log pipelines.
                    LogFormat::Json => tracing::error!(
                        exit_code = failure.code,
                        "outboxd: error: {}",
                        failure.message
                    ),
                    LogFormat::Text => say(&format!("outboxd: error: {}", failure.message)),
                }
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
        // lapin's own lines about a broker blip ("Exponential backoff attempts
        // exhausted") are summarised by outboxd's circuit: one WARN per opening, with
        // the next probe. RUST_LOG=lapin=debug shows them again.
        tracing_subscriber::EnvFilter::new("info,lapin=off,amq_protocol=warn,tokio_postgres=warn")
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
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            // A panic is a JSON line too (its message and where it happened).
            std::panic::set_hook(Box::new(|info| {
                tracing::error!(panic = %info, "panic");
            }));
        }
    }
    guard
}

/// The config file: `--config` (or `OUTBOXD_CONFIG`), else `./outboxd.toml` if it exists.
fn config_path(cli: &Cli) -> Option<PathBuf> {
    match &cli.config {
        Some(path) => Some(path.clone()),
        None => {
            let default = PathBuf::from("outboxd.toml");
            default.exists().then_some(default)
        }
    }
}

fn load_layers(cli: &Cli) -> Result<crate::config::Layers, Failure> {
    let mut layers = Config::load_layers(config_path(cli).as_deref(), std::env::vars())?;
    for warning in &layers.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(url) = &cli.database_url {
        layers.config.database.url = url.clone();
        layers.config.validate().map_err(|error| match error {
            // The value came from the flag: say so, not [database] or DATABASE_URL.
            ConfigError::Invalid {
                key,
                value,
                problem,
                ..
            } if key == "database.url" => ConfigError::Invalid {
                key: "--database-url".into(),
                value,
                problem: problem.replace(" (DATABASE_URL is honoured too)", ""),
                fix: "pass --database-url as postgres://USER:PASSWORD@HOST:5432/DATABASE".into(),
            },
            other => other,
        })?;
    }
    Ok(layers)
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    Ok(load_layers(cli)?.config)
}

fn config_command(cli: &Cli, command: &ConfigCommand) -> Result<(), Failure> {
    let layers = load_layers(cli)?;
    let file = config_path(cli).map(|p| p.display().to_string());
    match command {
        ConfigCommand::Check => {
            let destinations = layers
                .config
                .router()
                .map(|r| r.destinations().join(", "))
                .unwrap_or_default();
            println!(
                "configuration ok ({}): delivers to {destinations}",
                file.as_deref()
                    .map_or("no file, defaults and environment".into(), |f| {
                        format!("file {f}, then environment")
                    })
            );
        }
        ConfigCommand::Show => {
            let flags: &[(&str, &'static str)] = if cli.database_url.is_some() {
                &[("database.url", "--database-url")]
            } else {
                &[]
            };
            print!(
                "{}",
                crate::config_show::render(&layers, file.as_deref(), flags)
            );
        }
    }
    Ok(())
}

async fn execute(cli: Cli) -> Result<(), Failure> {
    if let Command::Config(command) = &cli.command {
        return config_command(&cli, command);
    }
    if let Command::AlertRules { runbook_base } = &cli.command {
        print!("{}", alert_rules(runbook_base)?);
        return Ok(());
    }
    let config = load_config(&cli)?;
    match cli.command {
        Command::Migrate { dry_run } => migrate_command(&config, dry_run).await,
        Command::Run { migrate } => run_command(config, migrate).await,
        Command::Status { json } => status_command(&config, json).await,
        Command::Health {
            live,
            addr,
            timeout,
        } => health_command(&config, live, addr, timeout).await,
        Command::DeadLetters(command) => dead_letters_command(&config, command).await,
        Command::Events(command) => events_command(&config, command).await,
        Command::Ordering(command) => ordering_command(&config, command).await,
        Command::Partitions(command) => retention::command(&config, command).await,
        Command::Replay(args) => replay::command(&config, args).await,
        Command::Demo { events } => demo_command(config, events).await,
        Command::Config(_) | Command::AlertRules { .. } => {
            unreachable!("answered before the config is loaded")
        }
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

async fn run_command(config: Config, migrate: bool) -> Result<(), Failure> {
    // Listened for before anything starts: a SIGTERM while migrating, connecting or
    // creating partitions (an orchestrator stopping a slow start) ends the process
    // cleanly, exit 0, instead of killing it with the signal's default action.
    let signalled = CancellationToken::new();
    let stop = signalled.clone();
    let signals = wait_for_signal();
    answer_hangups();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("signal received: draining");
        stop.cancel();
    });
    let starting = async {
        if migrate {
            migrate_command(&config, false).await?;
        }
        Outboxd::start(config)
            .await
            .map_err(|e| Failure::from(anyhow::Error::from(e)))
    };
    let service = tokio::select! {
        started = starting => started?,
        _ = signalled.cancelled() => {
            tracing::info!("stopped while starting: nothing was claimed");
            return Ok(());
        }
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "outboxd running");
    let token = service.shutdown_token();
    tokio::spawn(async move {
        signalled.cancelled().await;
        token.cancel();
    });
    service.wait().await;
    tracing::info!("outboxd stopped");
    Ok(())
}

/// SIGHUP reloads nothing (the configuration is read once, at start): it is answered
/// with a log line that says so, instead of the default of ending the process.
fn answer_hangups() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hangups) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP received: nothing is reloaded, the configuration is read at start only; restart outboxd to apply a change (SIGTERM drains, so a rolling restart loses nothing)"
                    );
                }
            });
        }
    }
}

/// SIGTERM or SIGINT, listened for from the moment this is called (the future it returns
/// only waits).
fn wait_for_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, interrupt) {
                (Some(mut term), Some(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The base the shipped alert rules' runbook URLs carry, replaced by `alert-rules`.
const SHIPPED_RUNBOOK_BASE: &str = "https://outboxd.example/docs";

/// docs/alerts.yml with every runbook_url under `base`.
fn alert_rules(base: &str) -> Result<String, Failure> {
    let base = base.trim().trim_end_matches('/');
    if !(base.starts_with("https://") || base.starts_with("http://"))
        || base.contains(char::is_whitespace)
    {
        return Err(Failure {
            code: 2,
            message: format!(
                "--runbook-base {base:?} is not an absolute http(s) URL: give where docs/ is served, e.g. https://wiki.example.com/outboxd/docs"
            ),
        });
    }
    Ok(include_str!("../../docs/alerts.yml").replace(SHIPPED_RUNBOOK_BASE, base))
}

/// Where to ask: `addr`, or the address `http.listen` binds, with an unspecified IP
/// (`0.0.0.0`, `[::]`) taken as this host's loopback.
fn health_address(config: &Config, addr: Option<String>) -> Result<std::net::SocketAddr, Failure> {
    let usage = |message: String| Failure { code: 2, message };
    let text = match addr {
        Some(addr) => addr,
        None if config.http.listen.is_empty() => {
            return Err(usage(
                "the HTTP endpoint is off (http.listen is empty): set http.listen (OUTBOXD_HTTP_LISTEN) for the instance to answer health checks".into(),
            ));
        }
        None => config.http.listen.clone(),
    };
    let mut address: std::net::SocketAddr = text.parse().map_err(|_| {
        usage(format!(
            "{text:?} is not an address to ask; give --addr as IP:PORT, e.g. 127.0.0.1:9187"
        ))
    })?;
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(address)
}

async fn health_command(
    config: &Config,
    live: bool,
    addr: Option<String>,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    let address = health_address(config, addr)?;
    let path = if live { "/healthz" } else { "/readyz" };
    let url = format!("http://{address}{path}");
    let not_ready = |message: String| Failure { code: 1, message };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| not_ready(format!("cannot make an HTTP client: {e}")))?;
    let response = client.get(&url).send().await.map_err(|e| {
        not_ready(format!(
            "no answer from {url} within {}: {} (is outboxd running here, with http.listen {address}?)",
            crate::duration_text::format(timeout),
            e.without_url()
        ))
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{}", body.trim());
        Ok(())
    } else {
        Err(not_ready(format!(
            "{url} answered {}: {}",
            status.as_u16(),
            body.trim()
        )))
    }
}

async fn status_command(config: &Config, json: bool) -> Result<(), Failure> {
    let store = Store::connect(&config.database)
        .await
        .map_err(anyhow::Error::from)?;
    let rows = store.status().await.map_err(anyhow::Error::from)?;
    let dead = rows
        .iter()
        .find(|r| r.status == "DEAD_LETTER")
        .map_or(0, |r| r.events);
    let default_rows = store
        .default_partition_rows()
        .await
        .map_err(anyhow::Error::from)?;
    if json {
        let statuses: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "status": r.status,
                    "events": r.events,
                    "oldest_age_seconds": r.oldest_age_seconds,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "statuses": statuses,
                "dead_letters": dead,
                "default_partition_rows": default_rows,
            })
        );
        return Ok(());
    }
    println!("{:<12} {:>12} {:>14}", "status", "events", "oldest");
    for row in &rows {
        let oldest = row
            .oldest_age_seconds
            .map(format_age)
            .unwrap_or_else(|| "-".into());
        println!("{:<12} {:>12} {:>14}", row.status, row.events, oldest);
    }
    if dead > 0 {
        println!("\n{dead} dead letter(s): outboxd dead-letters list");
    }
    if default_rows > 0 {
        println!(
            "\nwarning: {default_rows} row(s) in outbox_default (a daily partition was missing); run `outboxd migrate`"
        );
    }
    Ok(())
}

impl From<RequestError> for Failure {
    fn from(error: RequestError) -> Self {
        let code = match error {
            RequestError::BadRequest(_) => 2,
            RequestError::NoEvent(_) | RequestError::Store(_) => 1,
        };
        Failure {
            code,
            message: error.to_string(),
        }
    }
}

/// Who runs this command, for the redrive record: `$USER`, else `$LOGNAME`, else
/// `cli@HOST` (containers often have neither).
pub(crate) fn who_asks() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .map(|name| name.trim().to_string())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| format!("cli@{}", crate::host_name()))
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
            let request = ListRequest {
                event_type,
                since,
                until,
                before_id,
                limit,
            };
            let page = dead_letters::list(&store, &request).await?;
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
                let error = one_line(item.last_error.as_deref().unwrap_or(""), 100);
                println!(
                    "{:>10}  {:<24}  {:<28}  {:>8}  {}",
                    item.id, created, item.event_type, item.attempts, error
                );
            }
            if let Some(next) = page.next_before_id {
                // The same filters, the next page.
                let mut command = String::from("outboxd dead-letters list");
                let quoted = shell_quoted;
                if let Some(t) = &request.event_type {
                    command.push_str(&format!(" --event-type {}", quoted(t)));
                }
                if let Some(t) = &request.since {
                    command.push_str(&format!(" --since {}", quoted(t)));
                }
                if let Some(t) = &request.until {
                    command.push_str(&format!(" --until {}", quoted(t)));
                }
                if let Some(n) = request.limit {
                    command.push_str(&format!(" --limit {n}"));
                }
                println!("\nmore: {command} --before-id {next}");
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
            print_event(&event);
        }
        DeadLettersCommand::Redrive {
            ids,
            from,
            to,
            event_type,
            aggregate,
            dry_run,
            rate,
            reason,
            by,
        } => {
            let by = by.unwrap_or_else(who_asks);
            let filtered =
                from.is_some() || to.is_some() || event_type.is_some() || aggregate.is_some();
            if ids.is_empty() && !filtered {
                return Err(Failure {
                    code: 2,
                    message: "name the dead letters: --id ID (repeat for several), or a filter: --from, --to (id or time), --event-type, --aggregate".into(),
                });
            }
            if filtered {
                let filter = crate::replay::parse_filter(
                    from.as_deref(),
                    to.as_deref(),
                    event_type.as_deref(),
                    aggregate.as_deref(),
                )?;
                let done =
                    dead_letters::redrive_matching(&store, &filter, &reason, &by, rate, dry_run)
                        .await?;
                if dry_run {
                    println!(
                        "dry run: {} dead letter(s) match ({}); nothing was sent",
                        done.redriven, done.filter
                    );
                } else {
                    println!(
                        "redriven: {} dead letter(s) ({})",
                        done.redriven, done.filter
                    );
                }
                return Ok(());
            }
            if dry_run {
                return Err(Failure {
                    code: 2,
                    message: "--dry-run counts what a filter names; with --id, list them instead: outboxd dead-letters show ID".into(),
                });
            }
            let done = dead_letters::redrive(&store, &ids, &reason, &by).await?;
            println!("redriven: {:?}", done.redriven);
            if !done.not_dead_letters.is_empty() {
                println!("not dead letters (left alone): {:?}", done.not_dead_letters);
            }
        }
        DeadLettersCommand::Discard { ids, reason, by } => {
            let by = by.unwrap_or_else(who_asks);
            let store = store
                .with_recorded_order()
                .await
                .map_err(anyhow::Error::from)?;
            let done = dead_letters::discard(&store, &ids, &reason, &by).await?;
            println!("discarded: {:?}", done.discarded);
            if !done.released.is_empty() {
                println!(
                    "released (the next events of their aggregates): {:?}",
                    done.released
                );
            }
            if !done.not_dead_letters.is_empty() {
                println!(
                    "not dead letters, or discarded already (left alone): {:?}",
                    done.not_dead_letters
                );
            }
        }
    }
    Ok(())
}

async fn ordering_command(config: &Config, command: OrderingCommand) -> Result<(), Failure> {
    use crate::ordering::OrderRule;
    let order = config.order_rule().map_err(|message| Failure {
        code: 2,
        message: format!("invalid routing: {message}"),
    })?;
    let store = Store::connect(&config.database)
        .await
        .map_err(anyhow::Error::from)?;
    let recorded = store
        .recorded_order_setting()
        .await
        .map_err(anyhow::Error::from)?;
    let configured = order.describe();
    match command {
        OrderingCommand::Show => {
            match &recorded {
                Some(value) => println!("database:      {}", OrderRule::describe_setting(value)),
                None => println!(
                    "database:      nothing recorded yet (the first instance to start records its rule)"
                ),
            }
            println!("configuration: {configured}");
            if recorded.as_deref().is_some_and(|v| v != order.setting()) {
                println!("they differ: an instance with this configuration would refuse to start");
            }
        }
        OrderingCommand::Adopt => {
            if recorded.as_deref() == Some(order.setting().as_str()) {
                println!("the database already keeps {configured}");
                return Ok(());
            }
            store
                .set_order(&order, &who_asks())
                .await
                .map_err(anyhow::Error::from)?;
            println!("the database now keeps {configured}; held events were released");
        }
    }
    Ok(())
}

/// One event in full, as `dead-letters show` and `events show` print it.
fn print_event(event: &crate::store::operations::EventDetail) {
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    println!("id            {}", event.id);
    println!("tracking_id   {}", event.tracking_id);
    println!("status        {}", event.status);
    println!("event_type    {}", event.event_type);
    println!(
        "aggregate     {}:{}",
        event.aggregate_type, event.aggregate_id
    );
    println!("created_at    {}", time(event.created_at));
    println!("attempts      {}", event.attempts);
    if event.status == "PENDING" {
        println!("next_attempt  {}", time(event.next_attempt_at));
    }
    if event.status == "HELD" {
        println!("held          behind an earlier event of its aggregate (ordering)");
    }
    if let Some(at) = event.processed_at {
        println!("processed_at  {}", time(at));
    }
    println!("delivered_to  {}", event.delivered_to.join(", "));
    println!(
        "last_error    {}",
        event.last_error.as_deref().unwrap_or("-")
    );
    println!("payload       {}", event.payload);
    println!("metadata      {}", event.metadata);
    for redrive in &event.redrives {
        println!(
            "{:<13} {} by {}: {} (had {} attempts; {})",
            if redrive.action == "discard" {
                "discarded"
            } else {
                "redriven"
            },
            time(redrive.at),
            redrive.by,
            redrive.reason,
            redrive.attempts,
            redrive.last_error.as_deref().unwrap_or("-")
        );
    }
    println!("story");
    for step in &event.story {
        println!("  {}  {:<15} {}", time(step.at), step.step, step.detail);
    }
}

/// `'text'` for a shell, quotes inside kept.
fn shell_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn one_line(text: &str, width: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() > width {
        text.chars().take(width - 1).collect::<String>() + "…"
    } else {
        text
    }
}

async fn events_command(config: &Config, command: EventsCommand) -> Result<(), Failure> {
    // The argument is checked before connecting: a typo is exit 2 wherever the database is.
    let store = || async {
        Store::connect(&config.database)
            .await
            .map_err(|e| Failure::from(anyhow::Error::from(e)))
    };
    match command {
        EventsCommand::Show { event, json } => {
            let key = crate::events::EventKey::parse(&event)?;
            let event = crate::events::show(&store().await?, key).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&event).unwrap_or_default()
                );
            } else {
                print_event(&event);
            }
        }
        EventsCommand::List {
            aggregate,
            before_id,
            limit,
            json,
        } => {
            let request = crate::events::ListRequest {
                aggregate: crate::events::Aggregate::parse(&aggregate)?,
                before_id,
                limit,
            };
            let page = crate::events::list(&store().await?, &request).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&page).unwrap_or_default()
                );
                return Ok(());
            }
            if page.items.is_empty() {
                println!("no events of {aggregate}");
                return Ok(());
            }
            println!(
                "{:>10}  {:<24}  {:<11}  {:<28}  {:>8}  last error",
                "id", "created", "status", "event type", "attempts"
            );
            for item in &page.items {
                let created = humantime::format_rfc3339_seconds(item.created_at).to_string();
                let error = one_line(item.last_error.as_deref().unwrap_or(""), 80);
                println!(
                    "{:>10}  {:<24}  {:<11}  {:<28}  {:>8}  {}",
                    item.id, created, item.status, item.event_type, item.attempts, error
                );
            }
            if let Some(next) = page.next_before_id {
                let mut command = format!(
                    "outboxd events list --aggregate {}",
                    shell_quoted(&aggregate)
                );
                if let Some(n) = request.limit {
                    command.push_str(&format!(" --limit {n}"));
                }
                println!("\nmore: {command} --before-id {next}");
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
