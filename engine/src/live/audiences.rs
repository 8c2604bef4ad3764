//! The warehouse audience thread (`CREATE SEGMENT … FROM WAREHOUSE '…' REFRESH EVERY …`).
//!
//! Owns [`spawn`]: one thread on process 0 runs each audience's query at start and then
//! every `REFRESH EVERY`, on `warehouse.postgres`, and hands the member set to worker 0,
//! which feeds its difference from the last good set (who entered, who left) as facts at
//! the instant it arrives. A failing query is logged and counted
//! (`herald_errors_total{sink="warehouse_audience"}`) and sends nothing, so the segment
//! keeps its last good membership; it is retried at the next refresh. Queries run one
//! at a time, in the order they fall due.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald_operators::plan::SegmentKind;

use super::metrics::SegmentLabel;
use super::{now_ms, AudienceMsg, Live};
use crate::EngineError;

/// One audience and when its query falls due next.
struct Due {
    segment: usize,
    name: String,
    query: String,
    every: Duration,
    next: Instant,
}

/// Starts the thread if the plan has warehouse audiences (the caller has checked that the
/// config names a warehouse).
pub fn spawn(
    live: Arc<Live>,
    to_worker: Sender<AudienceMsg>,
) -> Result<Option<JoinHandle<()>>, EngineError> {
    let start = Instant::now();
    let mut due: Vec<Due> = live
        .plan
        .segments
        .iter()
        .enumerate()
        .filter_map(|(segment, s)| match &s.kind {
            SegmentKind::Warehouse {
                query, refresh_ms, ..
            } => Some(Due {
                segment,
                name: s.name.clone(),
                query: query.clone(),
                every: Duration::from_millis((*refresh_ms).max(1) as u64),
                next: start,
            }),
            _ => None,
        })
        .collect();
    if due.is_empty() {
        return Ok(None);
    }
    // Every audience has a series from the start, so an alert on its age also fires
    // for one whose query never succeeded.
    for a in &due {
        live.metrics
            .audience_refreshed
            .get_or_create(&SegmentLabel {
                segment: a.name.clone(),
            })
            .set(0);
    }
    let url = live.config.warehouse_url(None).unwrap_or_default();
    std::thread::Builder::new()
        .name("herald-audiences".into())
        .spawn(move || {
            while !live.stopping() {
                let now = Instant::now();
                if let Some(a) = due
                    .iter_mut()
                    .filter(|a| a.next <= now)
                    .min_by_key(|a| a.next)
                {
                    a.next = now + a.every;
                    refresh(&live, &url, a, &to_worker);
                    continue;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map(Some)
        .map_err(|e| EngineError::Dataflow(format!("cannot start the audience thread: {e}")))
}

fn refresh(live: &Live, url: &str, a: &Due, to_worker: &Sender<AudienceMsg>) {
    let started = Instant::now();
    match herald_connectors::audience::run_audience(url, &a.name, &a.query) {
        Ok(audience) => {
            tracing::info!(
                segment = %a.name,
                members = audience.members.len(),
                skipped = audience.skipped,
                ms = started.elapsed().as_millis() as u64,
                "warehouse audience refreshed"
            );
            live.metrics
                .audience_refreshed
                .get_or_create(&SegmentLabel {
                    segment: a.name.clone(),
                })
                .set((now_ms() / 1000) as i64);
            let _ = to_worker.send(AudienceMsg {
                segment: a.segment,
                members: audience.members,
            });
        }
        Err(e) => {
            live.metrics.error("warehouse_audience");
            tracing::error!(
                "warehouse audience '{}': {e}; keeping its last good membership, retrying in {} s",
                a.name,
                a.every.as_secs()
            );
        }
    }
}
