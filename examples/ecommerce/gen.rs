//! `ecommerce-gen`: writes the e-commerce example data set.
//!
//! ```text
//! ecommerce-gen --users 10000 --events 1000000 --seed 42 \
//!     --start 2026-03-01T00:00:00Z --days 30 --out data/ecommerce
//! ```
//!
//! Writes `events.jsonl`, `profiles.parquet`, `beta.csv` and a copy of `segments.sql`
//! into `--out` (see `herald_examples` for what they hold), then prints what it wrote and
//! the matching `herald replay` command line. Bad arguments and I/O problems are errors
//! with a message, never a panic.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use herald_examples::{generate, Config};

/// Generates the e-commerce example: events, a profile snapshot and a beta list.
#[derive(Parser, Debug)]
#[command(name = "ecommerce-gen", version, about)]
struct Args {
    /// Number of users.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Number of distinct valid events (bad lines and redeliveries come on top).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Random seed: the same arguments always give the same files.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Start of the event window (RFC 3339).
    #[arg(long, default_value = "2026-03-01T00:00:00Z")]
    start: String,
    /// Length of the event window in days.
    #[arg(long, default_value_t = 30.0)]
    days: f64,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

fn run(args: Args) -> anyhow::Result<()> {
    let start_ms = chrono::DateTime::parse_from_rfc3339(args.start.trim())
        .map(|t| t.timestamp_millis())
        .with_context(|| format!("--start '{}' is not an RFC 3339 instant", args.start))?;
    let cfg = Config {
        users: args.users,
        events: args.events,
        seed: args.seed,
        start_ms,
        days: args.days,
        out: args.out,
    };
    let began = Instant::now();
    let s = generate(&cfg)?;
    let fmt = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| ms.to_string())
    };
    println!(
        "wrote {} lines to {} ({} events, {} redelivered, {} malformed) in {:.2?}",
        s.lines,
        s.events_path.display(),
        s.events,
        s.duplicates,
        s.malformed,
        began.elapsed()
    );
    println!(
        "wrote {} profiles to {} (snapshot taken at {})",
        s.profile_rows,
        s.profiles_path.display(),
        fmt(s.snapshot_at)
    );
    println!("wrote {} ids to {}", s.beta_ids, s.beta_path.display());
    println!("wrote {}", s.segments_path.display());
    println!(
        "replay with:\n  herald replay --segments {} --events {} --profiles {}@{} --until {} --out <DIR>",
        s.segments_path.display(),
        s.events_path.display(),
        s.profiles_path.display(),
        fmt(s.snapshot_at),
        fmt(s.end_ms)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ecommerce-gen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
