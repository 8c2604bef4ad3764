//! `herald replay`: the segment engine over files, in event time.
//!
//! Owns [`ReplayArgs`] (what the user typed) -> [`replay`] -> [`ReplaySummary`]: read the
//! segment file, events (JSONL, local or object store), profile snapshots (Parquet) and
//! static lists (CSV); run the dataflow up to `--until`; write
//! `OUT/segment_changes.jsonl`, `OUT/segment_changes.parquet` and `OUT/dead_letters.jsonl`;
//! with `--journeys`, also `OUT/journey_events.{jsonl,parquet}` and `OUT/messages.{jsonl,parquet}`.
//! The output depends only on the input, never on the worker count or the run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_connectors::events::{read_projected, DEFAULT_DEDUP_HORIZON_MS};
use herald_connectors::journey_sink::{
    write_journey_rows_jsonl, write_journey_rows_parquet, write_messages_jsonl,
    write_messages_parquet,
};
use herald_connectors::sink::{
    write_changes_jsonl, write_changes_parquet, write_dead_letters_jsonl,
};
use herald_operators::event::Limits;
use herald_operators::plan::{Plan, SegmentKind};
use herald_operators::time::parse_rfc3339_ms;
use indicatif::ProgressBar;

use crate::check::{load_journeys, load_segments};
use crate::driver::{run_dataflow, DataflowInput};
use crate::EngineError;

/// The replay command's arguments, as typed.
#[derive(Clone, Debug)]
pub struct ReplayArgs {
    /// Segment file (path or URL).
    pub segments: String,
    /// Event JSONL files (paths or URLs), read in this order.
    pub events: Vec<String>,
    /// Profile snapshots, each `PATH@RFC3339`.
    pub profiles: Vec<String>,
    /// Run the clock up to this instant (RFC 3339).
    pub until: String,
    /// Output directory (path or URL).
    pub out: String,
    /// Timely worker threads.
    pub workers: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// Also load the changes into this PostgreSQL (or Redshift) URL, idempotently.
    pub postgres: Option<String>,
    /// The table for `postgres`.
    pub postgres_table: String,
    /// Journey file: also run these journeys.
    pub journeys: Option<String>,
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct ReplaySummary {
    /// Members per segment at `until`, in file order.
    pub sizes: Vec<(String, i64)>,
    /// Input lines read.
    pub lines: u64,
    /// Events accepted (after dedup).
    pub accepted: u64,
    /// Events applied (accepted, at or before `until`).
    pub applied: u64,
    /// Accepted events after `until`, not applied.
    pub after_until: u64,
    /// Rejected messages by reason (all in the dead-letter file).
    pub rejected: BTreeMap<String, u64>,
    /// Duplicates ignored.
    pub duplicates: u64,
    /// Comparisons of values of different types, evaluated as NULL (counted per evaluation).
    pub type_mismatches: u64,
    /// Changes written.
    pub changes: u64,
    /// Journey events and message actions written (with `--journeys`).
    pub journey_rows: Option<(u64, u64)>,
    /// Time spent reading and parsing inputs.
    pub read_time: Duration,
    /// Time spent in the dataflow.
    pub dataflow_time: Duration,
    /// Time spent writing outputs.
    pub write_time: Duration,
    /// Changes loaded into PostgreSQL: (sent, newly inserted), when asked for.
    pub postgres: Option<(u64, u64)>,
    /// Warnings for the user (e.g. warehouse segments that replay does not run).
    pub warnings: Vec<String>,
}

/// Parses `PATH@RFC3339` (the last `@` separates: URLs may contain `@`).
pub fn parse_profile_arg(arg: &str) -> Result<(String, i64), EngineError> {
    let (path, at) = arg.rsplit_once('@').ok_or_else(|| {
        EngineError::Usage(format!(
            "--profiles '{arg}' must be PATH@RFC3339, e.g. profiles.parquet@2026-03-01T00:00:00Z"
        ))
    })?;
    let at =
        parse_rfc3339_ms(at).map_err(|e| EngineError::Usage(format!("--profiles '{arg}': {e}")))?;
    Ok((path.to_string(), at))
}

/// Resolves a list URL written in a segment file: a relative local path is relative to
/// the segment file's directory.
fn resolve_relative(segments: &str, url: &str) -> String {
    if url.contains("://") || Path::new(url).is_absolute() || segments.contains("://") {
        return url.to_string();
    }
    match Path::new(segments).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(url).to_string_lossy().into_owned(),
        _ => url.to_string(),
    }
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// Reads the members of every `FROM CSV` segment (paths relative to the segment file).
pub fn load_lists(
    segments_path: &str,
    plan: &Plan,
) -> Result<BTreeMap<usize, BTreeSet<String>>, EngineError> {
    let mut lists = BTreeMap::new();
    for (i, seg) in plan.segments.iter().enumerate() {
        if let SegmentKind::List { url, .. } = &seg.kind {
            let url = resolve_relative(segments_path, url);
            lists.insert(i, herald_connectors::csvlist::read_user_list(&url)?);
        }
    }
    Ok(lists)
}

/// Runs a replay; see the module docs.
pub fn replay(args: &ReplayArgs) -> Result<ReplaySummary, EngineError> {
    let until =
        parse_rfc3339_ms(&args.until).map_err(|e| EngineError::Usage(format!("--until: {e}")))?;
    if until < 0 {
        // Dataflow time starts at the Unix epoch; earlier changes could not be told apart.
        return Err(EngineError::Usage(format!(
            "--until {} is before 1970-01-01T00:00:00Z, where dataflow time starts",
            args.until
        )));
    }
    let profiles = args
        .profiles
        .iter()
        .map(|p| parse_profile_arg(p))
        .collect::<Result<Vec<_>, _>>()?;
    if args.workers == 0 {
        return Err(EngineError::Usage("--workers must be at least 1".into()));
    }
    #[cfg(not(feature = "postgres"))]
    if let Some(url) = &args.postgres {
        // Refused before any work, not after the outputs are written.
        return Err(EngineError::Usage(format!(
            "--postgres {url}: this herald was built without PostgreSQL support (cargo \
             feature `postgres`)"
        )));
    }
    let mut summary = ReplaySummary::default();
    let started = Instant::now();
    let (file, mut plan) = load_segments(&args.segments)?;
    let journeys = match &args.journeys {
        Some(path) => {
            let set = load_journeys(path, &file)?;
            plan = set.plan.clone();
            Some(set)
        }
        None => None,
    };

    let lists = load_lists(&args.segments, &plan)?;
    for seg in &plan.segments {
        if let SegmentKind::Warehouse { .. } = seg.kind {
            summary.warnings.push(format!(
                "segment '{}' is FROM WAREHOUSE: replay does not run warehouse queries \
                 (herald run does), so it has no members here",
                seg.name
            ));
        }
    }

    let threads = args
        .workers
        .max(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let keep_whole = |name: Option<&str>| journeys.as_ref().is_some_and(|j| j.wants_name(name));
    let batch = read_projected(
        &args.events,
        Limits::default(),
        DEFAULT_DEDUP_HORIZON_MS,
        threads,
        &plan,
        &keep_whole,
    )?;
    let mut snapshots = Vec::with_capacity(profiles.len());
    for (path, at) in &profiles {
        let snap = herald_connectors::snapshot::read_snapshot(path)?;
        snapshots.push((*at, Arc::new(snap.rows)));
    }
    summary.lines = batch.lines;
    summary.accepted = batch.events.len() as u64;
    summary.rejected = batch.rejected_by_reason.clone();
    summary.duplicates = batch.duplicates;
    summary.read_time = started.elapsed();

    let first_instant = batch
        .events
        .iter()
        .map(|(e, _)| e.timestamp)
        .chain(snapshots.iter().map(|(at, _)| *at))
        .min()
        .unwrap_or(until);
    let events: Vec<_> = batch.events.into_iter().map(|(e, _)| e).collect();
    let progress = if args.progress {
        let bar = ProgressBar::new(events.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} replaying [{bar:40}] {human_pos}/{human_len} events (eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let dataflow_started = Instant::now();
    let names: Vec<String> = plan.segments[..plan.visible]
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let with_journeys = journeys.is_some();
    let output = run_dataflow(
        DataflowInput {
            plan,
            events,
            snapshots,
            lists,
            until,
            lists_at: first_instant,
            workers: args.workers,
            journeys,
            keep_journey_output: true,
            inspect: None,
            on_caught_up: None,
        },
        progress,
    )?;
    summary.dataflow_time = dataflow_started.elapsed();
    summary.applied = output.applied;
    summary.type_mismatches = output.counters.type_mismatches;
    summary.after_until = output.after_until;
    summary.changes = output.changes.len() as u64;
    if output.after_until > 0 {
        summary.warnings.push(format!(
            "{} event(s) are later than --until and were not applied",
            output.after_until
        ));
    }

    let mut sizes: BTreeMap<&str, i64> = names.iter().map(|n| (n.as_str(), 0)).collect();
    for c in &output.changes {
        if let Some(s) = sizes.get_mut(c.segment.as_str()) {
            *s += c.diff;
        }
    }
    summary.sizes = names
        .iter()
        .map(|n| (n.clone(), sizes.get(n.as_str()).copied().unwrap_or(0)))
        .collect();

    let write_started = Instant::now();
    let rows = output.changes;
    write_changes_jsonl(&join(&args.out, "segment_changes.jsonl"), &rows)?;
    write_changes_parquet(&join(&args.out, "segment_changes.parquet"), &rows)?;
    write_dead_letters_jsonl(&join(&args.out, "dead_letters.jsonl"), &batch.dead_letters)?;
    if with_journeys {
        write_journey_rows_jsonl(
            &join(&args.out, "journey_events.jsonl"),
            &output.journey_rows,
        )?;
        write_journey_rows_parquet(
            &join(&args.out, "journey_events.parquet"),
            &output.journey_rows,
        )?;
        write_messages_jsonl(&join(&args.out, "messages.jsonl"), &output.messages)?;
        write_messages_parquet(&join(&args.out, "messages.parquet"), &output.messages)?;
        summary.journey_rows = Some((
            output.journey_rows.len() as u64,
            output.messages.len() as u64,
        ));
    }
    if let Some(url) = &args.postgres {
        #[cfg(feature = "postgres")]
        {
            let loaded =
                herald_connectors::postgres::load_changes(url, &args.postgres_table, &rows)?;
            summary.postgres = Some((loaded.sent, loaded.inserted));
        }
        #[cfg(not(feature = "postgres"))]
        let _ = url; // refused at the start
    }
    summary.write_time = write_started.elapsed();
    Ok(summary)
}
