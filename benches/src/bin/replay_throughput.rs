//! The replay throughput run: how fast the segment dataflow replays a large event file,
//! and how much state it keeps.
//!
//! Isolates the dataflow: inputs are read and parsed first (timed separately), then the
//! dataflow runs to `--until`. State is counted from the state structures themselves at
//! the instant the dataflow has caught up with `--until` (bytes per user, in-window
//! entries and their bytes, timers); the resident set before the dataflow, at catch-up
//! and at its peak is printed beside it.
//!
//! Run via `benches/replay_throughput.sh` (generates 1M events for 100k users and runs
//! this twice to separate per-user state from per-in-window-event state), or by hand:
//! `cargo run --release -p herald-benches --bin replay-throughput -- --segments benches/segments20.sql --events DIR/events.jsonl --until 2026-04-01T00:00:00Z --workers 2`

/// The same allocator as the `herald` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use herald_benches::{read_inputs, reset_peak_rss, rss, Inputs, ReplayArgs};
use herald_engine::check::load_segments;
use herald_engine::driver::{run_dataflow, DataflowInput};
use herald_operators::time::parse_rfc3339_ms;

/// Replay throughput and state size.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    replay: ReplayArgs,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse().replay;
    let until = parse_rfc3339_ms(&args.until).map_err(anyhow::Error::msg)?;
    let (_, plan) = load_segments(&args.segments).context("loading segments")?;
    let read_started = Instant::now();
    let Inputs { events, snapshots } = read_inputs(&plan, &args.events, &args.profiles)?;
    let read_time = read_started.elapsed();
    let mut users: BTreeSet<&str> = events.iter().map(|e| e.user.as_str()).collect();
    for (_, rows) in &snapshots {
        users.extend(rows.keys().map(String::as_str));
    }
    let n_users = users.len() as u64;
    let first = events.iter().map(|e| e.timestamp).min().unwrap_or(until);
    let n_events = events.len() as u64;
    let n_segments = plan.segments.len();

    let (rss_before, _) = rss().unwrap_or((0, 0));
    reset_peak_rss();
    let at_catch_up = Arc::new(Mutex::new(0u64));
    let hook_slot = Arc::clone(&at_catch_up);
    let started = Instant::now();
    let out = run_dataflow(
        DataflowInput {
            plan,
            events,
            snapshots,
            lists: Default::default(),
            until,
            lists_at: first,
            workers: args.workers,
            journeys: None,
            keep_journey_output: true,
            inspect: None,
            on_caught_up: Some(Arc::new(move || {
                if let (Some((now, _)), Ok(mut slot)) = (rss(), hook_slot.lock()) {
                    *slot = now;
                }
            })),
        },
        None,
    )?;
    let elapsed = started.elapsed();
    let (_, peak) = rss().unwrap_or((0, 0));
    let caught_up = *at_catch_up
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let state = caught_up.saturating_sub(rss_before);

    println!("segments            {n_segments}");
    println!("events applied      {}", out.applied);
    println!("users               {n_users}");
    println!("changes             {}", out.changes.len());
    println!("workers             {}", args.workers);
    println!(
        "read+parse          {:.2} s ({:.0} events/s)",
        read_time.as_secs_f64(),
        n_events as f64 / read_time.as_secs_f64()
    );
    println!("dataflow            {:.2} s", elapsed.as_secs_f64());
    println!(
        "throughput          {:.0} events/s",
        out.applied as f64 / elapsed.as_secs_f64()
    );
    println!("rss before dataflow {:.1} MiB", mib(rss_before));
    println!("rss at --until      {:.1} MiB", mib(caught_up));
    println!("peak rss (dataflow) {:.1} MiB", mib(peak));
    let st = &out.state;
    println!(
        "state (rss)         {:.1} MiB = {:.0} bytes/user (rss at --until - rss before)",
        mib(state),
        state as f64 / n_users.max(1) as f64
    );
    println!(
        "state (counted)     {:.1} MiB: {:.0} bytes/user, {} in-window entries at {:.1} bytes each, timers {:.1} MiB",
        mib(st.per_user + st.window_bytes + st.timers),
        st.per_user as f64 / st.users.max(1) as f64,
        st.in_window,
        st.window_bytes as f64 / st.in_window.max(1) as f64,
        mib(st.timers)
    );
    for (name, bytes) in herald_operators::state::StateBytes::PARTS
        .iter()
        .zip(st.by_part)
    {
        println!(
            "  {name:<38} {:>6.1} bytes/user",
            bytes as f64 / st.users.max(1) as f64
        );
    }
    println!(
        "evaluations         {} ({:.2} per event)",
        out.counters.evaluations,
        out.counters.evaluations as f64 / out.applied.max(1) as f64
    );
    println!(
        "METRICS state_bytes={state} users={n_users} state_users={} per_user_bytes={} in_window={} window_bytes={} timer_bytes={} events={n_events} seconds={:.3}",
        st.users,
        st.per_user,
        st.in_window,
        st.window_bytes,
        st.timers,
        elapsed.as_secs_f64()
    );
    Ok(())
}
