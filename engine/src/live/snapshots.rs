//! The snapshot watcher: lists the configured object-store prefix every `refresh` and
//! hands the newest complete profile snapshot to worker 0, which applies it as a diff.
//!
//! What counts as a snapshot under the prefix (documented in `docs/operations.md`):
//! a `*.parquet` object directly under it, or a "directory" holding a `_SUCCESS` marker
//! (how warehouse unloads and Spark jobs mark a multi-file result complete; the marker is
//! written last, so a half-written unload is never read). The newest is the greatest
//! name, so names should sort by time (`2026-11-22T10-00-00Z.parquet`). Its instant, for
//! identify precedence, is the object's (or the marker's) last-modified time.
//!
//! A snapshot that fails to read is logged and counted (`herald_errors_total{sink=
//! "snapshots"}`); the last good one stays applied and the next listing retries.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald_connectors::snapshot::read_snapshot;
use herald_connectors::store::list_with_times;

use super::{now_ms, Live, SnapshotMsg};
use crate::EngineError;

/// The newest complete snapshot under `prefix`: `(name, location, last-modified ms)`.
pub fn newest_snapshot(prefix: &str) -> Result<Option<(String, String, i64)>, EngineError> {
    let base = prefix.trim_end_matches('/');
    let mut best: Option<(String, String, i64)> = None;
    for (entry, modified) in list_with_times(prefix)? {
        let Some(rel) = entry.strip_prefix(base).map(|r| r.trim_start_matches('/')) else {
            continue;
        };
        let candidate = match rel.split('/').collect::<Vec<_>>().as_slice() {
            [file]
                if file.to_ascii_lowercase().ends_with(".parquet")
                    && !file.starts_with('.')
                    && !file.starts_with('_') =>
            {
                Some((file.to_string(), entry.clone()))
            }
            [dir, "_SUCCESS"] => Some((dir.to_string(), format!("{base}/{dir}/"))),
            _ => None,
        };
        if let Some((name, location)) = candidate {
            if best.as_ref().is_none_or(|(b, _, _)| name > *b) {
                best = Some((name, location, modified));
            }
        }
    }
    Ok(best)
}

/// Starts the watcher thread.
pub fn spawn_watcher(
    live: Arc<Live>,
    to_worker: Sender<SnapshotMsg>,
) -> Result<JoinHandle<()>, EngineError> {
    let refresh = Duration::from_millis(live.config.snapshot_refresh_ms()?);
    let prefix = live
        .config
        .snapshots
        .as_ref()
        .map(|s| s.prefix.clone())
        .unwrap_or_default();
    std::thread::Builder::new()
        .name("herald-snapshots".into())
        .spawn(move || {
            let mut applied: Option<String> = None;
            loop {
                if let Err(e) = check_once(&live, &prefix, &mut applied, &to_worker) {
                    live.metrics.error("snapshots");
                    tracing::error!("snapshots under {prefix}: {e}; keeping the last one applied");
                }
                let slept = Instant::now();
                while slept.elapsed() < refresh {
                    if live.stop_at.load(Ordering::Acquire) != 0 {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50).min(refresh));
                }
            }
        })
        .map_err(|e| EngineError::Dataflow(format!("cannot start the snapshot watcher: {e}")))
}

fn check_once(
    live: &Live,
    prefix: &str,
    applied: &mut Option<String>,
    to_worker: &Sender<SnapshotMsg>,
) -> Result<(), EngineError> {
    let Some((name, location, modified)) = newest_snapshot(prefix)? else {
        return Ok(());
    };
    if applied.as_deref() == Some(name.as_str()) {
        return Ok(());
    }
    let snapshot = read_snapshot(&location)?;
    let at = modified.min(now_ms() as i64);
    let rows = Arc::new(snapshot.rows);
    if let Ok(mut state) = live.state.write() {
        state.set_snapshot(at, Arc::clone(&rows));
    }
    tracing::info!(
        "snapshot {location}: {} profiles, handing to worker 0",
        rows.len()
    );
    let _ = to_worker.send(SnapshotMsg { location, at, rows });
    *applied = Some(name);
    Ok(())
}

/// Starts the profile sync thread (`[profile_sync]`): runs the warehouse query at once
/// and then every `every`, writing each result as a snapshot under the prefix, where the
/// watcher picks it up. A failing run is logged and counted
/// (`herald_errors_total{sink="profile_sync"}`) and writes nothing, so the last good
/// snapshot stays applied.
pub fn spawn_profile_sync(live: Arc<Live>) -> Result<Option<JoinHandle<()>>, EngineError> {
    let (Some(sync), Some(snap)) = (&live.config.profile_sync, &live.config.snapshots) else {
        return Ok(None);
    };
    let (url, query, prefix) = (
        live.config
            .warehouse_url(sync.postgres.as_deref())
            .unwrap_or_default(),
        sync.query.clone(),
        snap.prefix.clone(),
    );
    let every = Duration::from_millis(live.config.profile_sync_every_ms()?);
    std::thread::Builder::new()
        .name("herald-profile-sync".into())
        .spawn(move || loop {
            let started = Instant::now();
            match herald_connectors::profile_sync::sync_profiles(
                &url,
                &query,
                &prefix,
                now_ms() as i64,
            ) {
                Ok(s) => tracing::info!(
                    location = %s.location,
                    users = s.users,
                    skipped = s.skipped,
                    "profile sync wrote a snapshot"
                ),
                Err(e) => {
                    live.metrics.error("profile_sync");
                    tracing::error!("profile sync: {e}; the last snapshot stays applied");
                }
            }
            while started.elapsed() < every {
                if live.stop_at.load(Ordering::Acquire) != 0 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map(Some)
        .map_err(|e| EngineError::Dataflow(format!("cannot start the profile sync: {e}")))
}
