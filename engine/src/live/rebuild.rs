//! Rebuilding, at start, the history of aggregates and traits that a changed segment file
//! reads and the checkpoint does not hold, from the events archive of `[export]` (a new
//! trait's snapshot cells come from the last snapshot, which the checkpoint holds whole:
//! worker 0 feeds them at the restart).
//!
//! Owns [`new_history`] and [`check_whole`]. The checkpoint at `F` holds the state after
//! every event stamped before `F`; the archive holds every one of those events (a
//! checkpoint is complete only once the archive has caught up with it), each with its
//! stamp as `received_at`. So the events of the archive received before `F`, applied to
//! the new aggregates and traits alone in stamp order at their stamps, with the live
//! state's deduplication, give each user's cells of them exactly as a state built with
//! the new file from the start would hold them at `F`
//! ([`herald_operators::state::Backfiller`]). Before anything is changed, each worker's
//! rebuild is checked to hold as many events as its state had applied before `F`
//! ([`check_whole`]): an archive that misses some is refused, never read as the whole
//! history.

use std::rc::Rc;
use std::time::Instant;

use herald_connectors::tables;
use herald_connectors::ConnectorError;
use herald_operators::dataflow::user_hash;
use herald_operators::dataflow::SegmentPart;
use herald_operators::plan::{Plan, Remap};
use herald_operators::project::Projected;
use herald_operators::state::{Backfill, Backfiller};
use herald_operators::time::Time;

use crate::config::Config;

/// Whether the rebuild `b` of global worker `w` holds the whole history its restored
/// state `part` (the last of its chain, taken at `at`) was built from: as many events.
pub fn check_whole(part: &SegmentPart, b: &Backfill, w: usize, at: Time) -> Result<(), String> {
    let applied = part.events_applied();
    if b.events == applied {
        return Ok(());
    }
    Err(format!(
        "the events archive is not the whole history of the state: worker {w} had applied \
         {applied} events before the checkpoint at {at}, and the archive holds {} of its \
         users'. Causes: `[export]` turned on after the state began, archive files removed, \
         an archive written by a Herald before 2026-12-04 (its `received_at` is not the \
         instant an event was applied, and journeys' `update_trait` writes are not in it), \
         or a changed `engine.dedup_horizon`. Start with the segment file the checkpoint was \
         taken with, or move the state directory away and replay the archive to rebuild",
        b.events
    ))
}

/// The events archive's location under `[export] parquet`, if the config writes one.
pub fn archive_location(config: &Config) -> Option<String> {
    let prefix = config.export.as_ref()?.parquet.as_ref()?;
    Some(format!(
        "{}/{}/",
        prefix.trim_end_matches('/'),
        tables::EVENTS.name
    ))
}

/// The history of `remap`'s new aggregates and traits for each of this process's workers
/// (by local index), from the archive's events received before `at`; or why it cannot be
/// rebuilt.
/// The journeys' `update_trait` writes are in the archive too (marked, see
/// [`herald_operators::journey::compile::JOURNEY_WRITE_KEY`]), at the instant the state
/// applied them.
pub fn new_history(
    config: &Config,
    plan: &Plan,
    remap: &Remap,
    at: Time,
) -> Result<Vec<Backfill>, String> {
    let named = || remap.missing().join("; ");
    let Some(location) = archive_location(config) else {
        return Err(format!(
            "the segment file changed since it was taken, and the new one reads what the \
             state does not hold: {}. Herald rebuilds new aggregates and traits from the \
             events archive, and this config writes none (`[export] parquet`)",
            named()
        ));
    };
    let dedup_horizon_ms = config.dedup_horizon_ms().map_err(|e| e.to_string())?;
    let (process, processes) = config.processes();
    let local = config.engine.workers;
    let peers = (local * processes) as u64;
    let started = Instant::now();
    tracing::info!(
        "rebuilding {} from the events archive {location} (events received before {at})",
        named()
    );
    // Only what the plan reads is kept of each event, and only this process's users'.
    let mut events: Vec<(Time, u32, Projected)> = Vec::new();
    let mut rows = 0u64;
    let read = tables::for_each_archived_event(&location, &mut |ev, received| {
        rows += 1;
        if rows.is_multiple_of(1_000_000) {
            tracing::info!("rebuilding: {rows} archived events read");
        }
        let received = received.max(0) as Time;
        if received >= at {
            return;
        }
        let global = user_hash(&ev.user) % peers;
        if global / local as u64 != process as u64 {
            return;
        }
        let w = (global % local as u64) as u32;
        events.push((received, w, plan.project(ev, false)));
    });
    match read {
        Ok(()) | Err(ConnectorError::NotFound { .. }) => {}
        Err(e) => return Err(format!("reading the events archive to rebuild: {e}")),
    }
    // In stamp order; a user's events of one stamp keep the archive's order, which is
    // the order they were fed in.
    events.sort_by_key(|(t, _, _)| *t);
    let plan = Rc::new(plan.clone());
    let slots = remap.rebuilt_slots();
    let mut builders: Vec<Backfiller> = (0..local)
        .map(|_| Backfiller::new(plan.clone(), &slots, dedup_horizon_ms))
        .collect();
    let total = events.len();
    for (i, (t, w, ev)) in events.into_iter().enumerate() {
        builders[w as usize].apply(&ev, t);
        if (i + 1) % 1_000_000 == 0 {
            tracing::info!("rebuilding: {} of {total} events applied", i + 1);
        }
    }
    let built: Vec<Backfill> = builders.into_iter().map(Backfiller::finish).collect();
    tracing::info!(
        "rebuilt {} from {total} archived events before {at} ({rows} read; {} users; {:.0} ms)",
        named(),
        built.iter().map(Backfill::users).sum::<usize>(),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(built)
}
