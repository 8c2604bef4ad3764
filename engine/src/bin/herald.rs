//! The `herald` command line: a thin layer over `herald-engine`.

/// `println!` that stops quietly when stdout is closed (`herald check … | head`) instead
/// of panicking; the exit status still reports the command's own outcome.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` with the same behaviour as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// jemalloc (tikv-jemallocator, as TiKV and Materialize use) instead of glibc's
/// allocator: the dataflow allocates and frees many small records across threads, where
/// glibc spent a fifth of a replay zeroing pages it had just returned to the kernel; and
/// unlike mimalloc it keeps the live service's tail latency low (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_engine::replay::{replay, ReplayArgs, ReplaySummary};
use herald_engine::EngineError;

/// Herald: live customer segments as an incremental dataflow.
#[derive(Parser, Debug)]
#[command(name = "herald", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay events and profile snapshots from files in event time; write every
    /// segment membership change.
    Replay {
        /// The segment file.
        #[arg(long, value_name = "FILE")]
        segments: String,
        /// Event JSONL files (local paths, file:// or s3:// URLs), read in order; or an
        /// events archive written by `[export]`: a `.parquet` file, a directory, or a
        /// prefix ending in `/` (such as s3://bucket/herald/events/).
        #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
        events: Vec<String>,
        /// A profile snapshot (Parquet) and the instant it applies at: PATH@RFC3339.
        /// Repeat for several snapshots.
        #[arg(long, value_name = "PATH@RFC3339")]
        profiles: Vec<String>,
        /// Run the clock up to this instant, so lapses after the last event are emitted.
        #[arg(long, value_name = "RFC3339")]
        until: String,
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: String,
        /// Timely worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Also load the changes into a PostgreSQL-protocol warehouse (PostgreSQL,
        /// Redshift): postgres://user@host:port/db. Idempotent: loading the same changes
        /// again adds nothing.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// The table `--postgres` loads into (created if missing).
        #[arg(long, value_name = "TABLE", default_value = "segment_changes")]
        postgres_table: String,
        /// A journey file (YAML): also run these journeys and write
        /// journey_events.{jsonl,parquet} and messages.{jsonl,parquet}.
        #[arg(long, value_name = "FILE")]
        journeys: Option<String>,
    },
    /// Run Herald as a service: events from Kafka and HTTP, segments on the wall clock,
    /// changes to files and Kafka, the query API. Stops gracefully on SIGINT/SIGTERM.
    Run {
        /// The configuration file (see docs/operations.md).
        #[arg(long, value_name = "FILE", default_value = "herald.toml")]
        config: String,
    },
    /// Validate a segment file and print each segment's plan, showing what is shared.
    Check {
        /// The segment file.
        file: String,
        /// Also validate this journey file against the segments.
        #[arg(long, value_name = "FILE")]
        journeys: Option<String>,
        /// Also validate this templates directory (and the journeys' sends against it).
        #[arg(long, value_name = "DIR")]
        templates: Option<String>,
    },
    /// Runs a warehouse query (PostgreSQL protocol: PostgreSQL, Redshift) and writes its
    /// result as a profile snapshot under a prefix, atomically. One row per user: a
    /// `user_id` column and one column per trait.
    SyncProfiles {
        /// The warehouse, postgres://user@host:port/db.
        #[arg(long, value_name = "URL")]
        postgres: String,
        /// The query.
        #[arg(long, value_name = "SQL", conflicts_with = "query_file")]
        query: Option<String>,
        /// A file holding the query.
        #[arg(long, value_name = "FILE")]
        query_file: Option<String>,
        /// Where snapshots go (a directory, file:// or s3:// prefix): `[snapshots] prefix`.
        #[arg(long, value_name = "PREFIX")]
        to: String,
    },
    /// Why a user was or was not in a segment at an instant, from the events (the same
    /// answer as the live `GET /v1/users/{id}/explain`), as JSON.
    Explain {
        /// The segment file.
        #[arg(long, value_name = "FILE")]
        segments: String,
        /// Event files or an events archive, as `herald replay` reads them.
        #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
        events: Vec<String>,
        /// A profile snapshot and the instant it applies at: PATH@RFC3339 (repeatable).
        #[arg(long, value_name = "PATH@RFC3339")]
        profiles: Vec<String>,
        /// The user id.
        #[arg(long, value_name = "ID")]
        user: String,
        /// The segment.
        #[arg(long, value_name = "NAME")]
        segment: String,
        /// The instant.
        #[arg(long, value_name = "RFC3339")]
        at: String,
    },
    /// Message templates.
    Template {
        #[command(subcommand)]
        what: TemplateCommand,
    },
    /// Reports over a replay's or the service's output directory.
    Report {
        #[command(subcommand)]
        what: ReportCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TemplateCommand {
    /// Renders a template for one user: traits from a running Herald (--server)
    /// and/or --traits, the triggering event from --event.
    Render {
        /// Template name (its file is NAME.liquid).
        name: String,
        /// User id.
        #[arg(long)]
        user: String,
        /// The templates directory.
        #[arg(long, value_name = "DIR", default_value = "templates")]
        templates: String,
        /// A running Herald's admin listener to read the user's traits from, e.g.
        /// http://127.0.0.1:8081.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// A read key of that Herald (default: the HERALD_KEY environment variable).
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Traits as a JSON object (applied over the server's).
        #[arg(long, value_name = "JSON")]
        traits: Option<String>,
        /// The triggering event as a JSON object.
        #[arg(long, value_name = "JSON")]
        event: Option<String>,
        /// Journey name seen as `journey.name`.
        #[arg(long)]
        journey: Option<String>,
        /// Channel seen as `message.channel` (default email).
        #[arg(long)]
        channel: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ReportCommand {
    /// Per journey and variant: entered, sent, suppressed (by reason), converted,
    /// conversion rate, and a two-proportion test against the `control` variant.
    Journeys {
        /// The directory holding journey_events.jsonl.
        dir: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(feature = "postgres")]
fn sync_profiles(
    url: &str,
    query: Option<String>,
    query_file: Option<String>,
    to: &str,
) -> Result<(), EngineError> {
    let sql = match (query, query_file) {
        (Some(q), _) => q,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| EngineError::Usage(format!("--query-file {f}: {e}")))?,
        (None, None) => {
            return Err(EngineError::Usage(
                "give the query with --query or --query-file".into(),
            ))
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let s = herald_connectors::profile_sync::sync_profiles(url, &sql, to, now)?;
    outln!(
        "wrote {} profiles ({} traits: {}) to {}{}",
        s.users,
        s.traits.len(),
        s.traits.join(", "),
        s.location,
        if s.skipped > 0 {
            format!("; skipped {} rows without a user_id", s.skipped)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn print_summary(s: &ReplaySummary, out: &str) {
    let secs = s.dataflow_time.as_secs_f64().max(1e-9);
    let total = (s.read_time + s.dataflow_time + s.write_time)
        .as_secs_f64()
        .max(1e-9);
    outln!(
        "replayed {} events ({} lines, {} rejected, {} duplicates) -> {} changes in {}",
        s.applied,
        s.lines,
        s.rejected.values().sum::<u64>(),
        s.duplicates,
        s.changes,
        out
    );
    outln!(
        "throughput: {:.0} events/s in the dataflow ({:.2} s), {:.0} events/s end to end ({:.2} s: read {:.2} s, write {:.2} s)",
        s.applied as f64 / secs,
        secs,
        s.applied as f64 / total,
        total,
        s.read_time.as_secs_f64(),
        s.write_time.as_secs_f64()
    );
    if !s.rejected.is_empty() {
        let reasons: Vec<String> = s.rejected.iter().map(|(r, n)| format!("{r}={n}")).collect();
        outln!("dead letters by reason: {}", reasons.join(", "));
    }
    if s.type_mismatches > 0 {
        outln!(
            "type mismatches: {} comparisons of values of different types evaluated as NULL",
            s.type_mismatches
        );
    }
    if let Some((rows, msgs)) = s.journey_rows {
        outln!("journeys: {rows} journey events, {msgs} message actions");
    }
    if let Some((sent, inserted)) = s.postgres {
        outln!(
            "postgres: {sent} changes sent, {inserted} new ({} already there)",
            sent - inserted
        );
    }
    outln!("segment sizes at --until:");
    let width = s.sizes.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, size) in &s.sizes {
        outln!("  {name:<width$}  {size}");
    }
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
}

#[cfg(feature = "live")]
/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
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

#[cfg(feature = "live")]
fn run(config: &str) -> Result<(), EngineError> {
    let config = herald_engine::config::Config::load(config)?;
    let mode = if config.kafka.is_some() {
        "kafka"
    } else {
        "embedded"
    };
    let workers = config.engine.workers;
    herald_engine::live::run(config, shutdown_signal(), move |ingest, admin| {
        use std::io::Write;
        outln!("herald: listening on {ingest} ({mode} mode, {workers} workers; admin on {admin})");
        let _ = std::io::stdout().flush();
    })
    .map(|_| {
        outln!("herald: stopped");
    })
}

/// The error for a command this build left out.
#[cfg(not(all(feature = "live", feature = "postgres")))]
fn without(command: &str, feature: &str) -> EngineError {
    EngineError::Usage(format!(
        "{command}: this herald was built without it (cargo feature `{feature}`); \
         build herald-engine with its default features"
    ))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: Result<(), EngineError> = match cli.command {
        Command::Replay {
            segments,
            events,
            profiles,
            until,
            out,
            workers,
            postgres,
            postgres_table,
            journeys,
        } => {
            let args = ReplayArgs {
                segments,
                events,
                profiles,
                until,
                out: out.clone(),
                workers,
                progress: std::io::stderr().is_terminal(),
                postgres,
                postgres_table,
                journeys,
            };
            replay(&args).map(|s| print_summary(&s, &out))
        }
        #[cfg(feature = "live")]
        Command::Run { config } => run(&config),
        #[cfg(not(feature = "live"))]
        Command::Run { .. } => Err(without("herald run", "live")),
        Command::Explain {
            segments,
            events,
            profiles,
            user,
            segment,
            at,
        } => herald_engine::explain::explain(&herald_engine::explain::ExplainArgs {
            segments,
            events,
            profiles,
            user,
            segment,
            at,
        })
        .map(|x| {
            outln!(
                "{}",
                serde_json::to_string_pretty(&x).unwrap_or_else(|e| e.to_string())
            )
        }),
        Command::Check {
            file,
            journeys,
            templates,
        } => herald_engine::check::check_all(&file, journeys.as_deref(), templates.as_deref())
            .map(|report| out!("{report}")),
        Command::SyncProfiles {
            postgres,
            query,
            query_file,
            to,
        } => {
            #[cfg(feature = "postgres")]
            let done = sync_profiles(&postgres, query, query_file, &to);
            #[cfg(not(feature = "postgres"))]
            let done = {
                let _ = (postgres, query, query_file, to);
                Err(without("herald sync-profiles", "postgres"))
            };
            done
        }
        #[cfg(not(feature = "live"))]
        Command::Template { .. } => Err(without("herald template", "live")),
        #[cfg(feature = "live")]
        Command::Template {
            what:
                TemplateCommand::Render {
                    name,
                    user,
                    templates,
                    server,
                    key,
                    traits,
                    event,
                    journey,
                    channel,
                },
        } => herald_engine::preview::render_preview(&herald_engine::preview::PreviewArgs {
            templates,
            name,
            user,
            server,
            key,
            traits,
            event,
            journey,
            channel,
        })
        .map(|text| out!("{text}")),
        Command::Report {
            what: ReportCommand::Journeys { dir, json },
        } => herald_engine::report::journeys(&dir).map(|r| {
            if json {
                outln!("{}", r.to_json());
            } else {
                out!("{}", r.to_table());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                EngineError::Usage(_)
                | EngineError::Segments { .. }
                | EngineError::Journeys { .. } => ExitCode::from(2),
                EngineError::Io(io) if matches!(io.fault(), herald_connectors::Fault::Input) => {
                    ExitCode::from(2)
                }
                // sysexits.h EX_UNAVAILABLE: a service is down, the input is fine.
                EngineError::Unavailable(_) => ExitCode::from(69),
                EngineError::Io(io) if matches!(io.fault(), herald_connectors::Fault::External) => {
                    ExitCode::from(69)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}
