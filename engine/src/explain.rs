//! `herald explain`: why a user was or was not in a segment at an instant, answered
//! offline from files ("why was X in Y at T").
//!
//! Runs the same dataflow as `herald replay` over the user's events (and the profile
//! snapshots and lists) up to the instant, then explains the user's state there with
//! [`herald_operators::why`], the explanation the live API gives. Other users' events
//! are left out: a user's memberships depend on their own events only.

use std::sync::{Arc, Mutex};

use herald_connectors::events::{read_projected, DEFAULT_DEDUP_HORIZON_MS};
use herald_operators::event::Limits;
use herald_operators::time::{parse_rfc3339_ms, to_time};
use herald_operators::why::{explain as explain_user, Explanation};

use crate::check::load_segments;
use crate::driver::{run_dataflow, DataflowInput};
use crate::replay::{load_lists, parse_profile_arg};
use crate::EngineError;

/// How many wake-ups past the instant the next change is looked for.
const STEPS: usize = 10_000;

/// What to explain.
#[derive(Clone, Debug)]
pub struct ExplainArgs {
    /// The segment file.
    pub segments: String,
    /// Event files, as `herald replay` reads them.
    pub events: Vec<String>,
    /// Profile snapshots, `PATH@RFC3339`.
    pub profiles: Vec<String>,
    /// The user id.
    pub user: String,
    /// The segment.
    pub segment: String,
    /// The instant (RFC 3339).
    pub at: String,
}

/// The explanation, computed from the files.
pub fn explain(a: &ExplainArgs) -> Result<Explanation, EngineError> {
    let at = parse_rfc3339_ms(&a.at).map_err(|e| EngineError::Usage(format!("--at: {e}")))?;
    if at < 0 {
        return Err(EngineError::Usage(format!(
            "--at {} is before 1970-01-01T00:00:00Z, where dataflow time starts",
            a.at
        )));
    }
    let (_, plan) = load_segments(&a.segments)?;
    let Some(segment) = plan.segment_index(&a.segment) else {
        let names: Vec<&str> = plan.segments.iter().map(|s| s.name.as_str()).collect();
        return Err(EngineError::Usage(format!(
            "--segment: {} defines no segment '{}' (it defines: {})",
            a.segments,
            a.segment,
            names.join(", ")
        )));
    };
    let profiles = a
        .profiles
        .iter()
        .map(|p| parse_profile_arg(p))
        .collect::<Result<Vec<_>, _>>()?;
    let lists = load_lists(&a.segments, &plan)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batch = read_projected(
        &a.events,
        Limits::default(),
        DEFAULT_DEDUP_HORIZON_MS,
        threads,
        &plan,
        &|_| false,
    )?;
    let events: Vec<_> = batch
        .events
        .into_iter()
        .map(|(e, _)| e)
        .filter(|e| e.user == a.user)
        .collect();
    let mut snapshots = Vec::with_capacity(profiles.len());
    for (path, at) in &profiles {
        let snap = herald_connectors::snapshot::read_snapshot(path)?;
        snapshots.push((*at, Arc::new(snap.rows)));
    }
    let first = events
        .iter()
        .map(|e| e.timestamp)
        .chain(snapshots.iter().map(|(t, _)| *t))
        .min()
        .unwrap_or(at);
    let found: Arc<Mutex<Option<Explanation>>> = Arc::default();
    let slot = Arc::clone(&found);
    let (user, t) = (a.user.clone(), to_time(at));
    run_dataflow(
        DataflowInput {
            plan,
            events,
            snapshots,
            lists,
            until: at,
            lists_at: first,
            workers: 1,
            journeys: None,
            keep_journey_output: false,
            inspect: Some(Arc::new(move |st| {
                let u = st.user_at(&user, segment, t, STEPS);
                if let Ok(mut s) = slot.lock() {
                    *s = Some(explain_user(&st.plan(), segment, &u, t));
                }
            })),
            on_caught_up: None,
        },
        None,
    )?;
    let x = found.lock().ok().and_then(|mut s| s.take());
    x.ok_or_else(|| EngineError::Dataflow("the dataflow ended without its state".into()))
}
