//! Journeys at scale: many users inside a journey with pending timers.
//!
//! `--users N` users each send one `Enrolled` event within the first hour; the journey
//! waits a day, sends, then waits up to a day for `Purchased`. Three replays of the same
//! input, each in its own process so RSS is clean (the script runs them):
//!
//! * `--phase segments --until +2h`: the segment dataflow alone (baseline memory);
//! * `--phase waiting --until +2h`: everyone is inside, waiting on a timer: memory per
//!   instance is (RSS − baseline) / N;
//! * `--phase fired --until +1d2h`: every wait timer has fired and sent: the extra time
//!   over `waiting` is the cost of firing N timers (each also emits its rows and message
//!   and arms the next timer).
//!
//! Journey outputs are counted, not kept, so memory is the journeys' own state. Run
//! through `benches/journey_scale.sh`.

/// The same allocator as the `herald` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::time::Instant;

use clap::Parser;
use herald_benches::rss;
use herald_engine::driver::{project_events, run_dataflow, DataflowInput};
use herald_operators::event::{Event, EventType};
use herald_operators::journey::{compile_journeys, parse_journeys};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use serde_json::Map;

#[derive(Parser, Debug)]
#[command(about = "Journey state and timer throughput at scale")]
struct Args {
    /// Users (one instance each).
    #[arg(long, default_value_t = 1_000_000)]
    users: usize,
    /// segments, waiting or fired.
    #[arg(long)]
    phase: String,
    /// Timely workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

const T0: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z
const HOUR: i64 = 3_600_000;
const SEGMENTS: &str =
    "CREATE SEGMENT enrolled AS count(*) FILTER (WHERE event = 'Enrolled') >= 1;";
const JOURNEYS: &str = "journey: course\nentry: { event: Enrolled }\nsteps:\n  - wait: 1 day\n  - send: { channel: webhook, template: day1 }\n  - wait_until: { event: Purchased, timeout: 1 day }\n  - send: { channel: webhook, template: offer }\n";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = parse_segments(SEGMENTS)?;
    let events: Vec<Event> = (0..args.users)
        .map(|i| Event {
            user: format!("user-{i:07}"),
            kind: EventType::Track,
            event: Some("Enrolled".into()),
            message_id: format!("m{i}"),
            timestamp: T0 + (i as i64 * HOUR) / args.users as i64,
            properties: Map::new(),
            context: Map::new(),
            traits: Map::new(),
        })
        .collect();
    let (plan, journeys, until) = match args.phase.as_str() {
        "segments" => (Plan::compile(&file), None, T0 + 2 * HOUR),
        "waiting" | "fired" => {
            let set = compile_journeys(&file, &parse_journeys(JOURNEYS)?)?;
            let until = if args.phase == "waiting" {
                T0 + 2 * HOUR
            } else {
                T0 + 26 * HOUR
            };
            (set.plan.clone(), Some(set), until)
        }
        other => anyhow::bail!("unknown phase {other}: segments, waiting or fired"),
    };
    let rss_at = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let hook_rss = std::sync::Arc::clone(&rss_at);
    let started = Instant::now();
    let events = project_events(&plan, journeys.as_ref(), events);
    let out = run_dataflow(
        DataflowInput {
            plan,
            events,
            snapshots: vec![],
            lists: Default::default(),
            until,
            lists_at: T0,
            workers: args.workers,
            journeys,
            keep_journey_output: false,
            inspect: None,
            on_caught_up: Some(std::sync::Arc::new(move || {
                if let (Some((now, _)), Ok(mut r)) = (rss(), hook_rss.lock()) {
                    *r = now;
                }
            })),
        },
        None,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let rss = *rss_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let jb = out.journey_bytes;
    println!(
        "phase={} users={} workers={} seconds={secs:.2} rss_bytes={rss} journey_events={} messages={} \
         journey_users={} instances={} timers={} journey_state_bytes={} timer_bytes={}",
        args.phase,
        args.users,
        args.workers,
        out.journey_counts.0,
        out.journey_counts.1,
        jb.users,
        jb.instances,
        jb.timers,
        jb.state,
        jb.timer_bytes
    );
    Ok(())
}
