//! What the live definitions API costs on a large state: a preview (one pass over every
//! user) and an explain (one user brought to an instant and run on to its next change).
//!
//! Replays the events to `--until` as `replay-throughput` does, then, on every worker's
//! state at that instant (the same `SegmentState` `herald run` holds), times
//! `SegmentState::preview` of `--candidate` and `SegmentState::user_at` for a sample of
//! users. `docs/benchmarks.md` has the figures.
//!
//! `cargo run --release -p herald-benches --bin definitions -- --segments benches/segments20.sql --events DIR/events.jsonl --profiles DIR/profiles.parquet@2026-03-16T00:00:00Z --until 2026-03-31T00:00:00Z`

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use herald_benches::{read_inputs, Inputs, ReplayArgs};
use herald_engine::check::load_segments;
use herald_engine::driver::{run_dataflow, DataflowInput};
use herald_operators::lang::parse::parse_statement_into;
use herald_operators::plan::{Plan, SegmentKind};
use herald_operators::time::{parse_rfc3339_ms, to_time};
use herald_operators::why::Preview;

/// Cost of preview and explain.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    replay: ReplayArgs,
    /// The statement previewed (a replacement or a new segment).
    #[arg(
        long,
        default_value = "CREATE SEGMENT repeat_buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 3"
    )]
    candidate: String,
    /// Users explained (the first this many ids of the events, in file order).
    #[arg(long, default_value_t = 2000)]
    explains: usize,
}

/// Per worker: users, preview seconds, its counts, explains, explain seconds.
type Timing = (u64, f64, Preview, usize, f64);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let r = &args.replay;
    let until = parse_rfc3339_ms(&r.until).map_err(anyhow::Error::msg)?;
    let (file, plan) = load_segments(&r.segments).context("loading segments")?;
    let (changed, index) = parse_statement_into(&args.candidate, &file)
        .map_err(|e| anyhow::anyhow!("--candidate: {e}"))?;
    let over = Plan::compile_over(&changed, changed.segments.len(), &[], &plan)
        .map_err(|m| anyhow::anyhow!("--candidate: {}", m.join("; ")))?
        .0;
    let SegmentKind::Expr(expr) = over.segments[index].kind.clone() else {
        anyhow::bail!("--candidate must be a condition");
    };
    let current = plan.segment_index(&over.segments[index].name);
    let Inputs { events, snapshots } = read_inputs(&plan, &r.events, &r.profiles)?;
    let mut sample: Vec<String> = Vec::new();
    for e in &events {
        if sample.len() == args.explains {
            break;
        }
        if !sample.contains(&e.user) {
            sample.push(e.user.clone());
        }
    }
    let first = events.iter().map(|e| e.timestamp).min().unwrap_or(until);
    let timings: Arc<Mutex<Vec<Timing>>> = Arc::default();
    let slot = Arc::clone(&timings);
    let t = to_time(until);
    let explain_segment = current.unwrap_or(0);
    run_dataflow(
        DataflowInput {
            plan,
            events,
            snapshots,
            lists: Default::default(),
            until,
            lists_at: first,
            workers: r.workers,
            journeys: None,
            keep_journey_output: false,
            inspect: Some(Arc::new(move |st| {
                let users = st.bytes().users;
                let started = Instant::now();
                let p = st.preview(&expr, current, t, 10);
                let preview = started.elapsed().as_secs_f64();
                // Each worker explains its share of the sample (a user unknown to a
                // worker is an empty one there, which is cheaper: only known ones count).
                let started = Instant::now();
                let mut known = 0;
                for u in &sample {
                    let x = st.user_at(u, explain_segment, t, 10_000);
                    known += usize::from(x.known);
                }
                let explain = started.elapsed().as_secs_f64();
                if let Ok(mut s) = slot.lock() {
                    s.push((users, preview, p, known, explain));
                }
            })),
            on_caught_up: None,
        },
        None,
    )?;
    let timings = timings.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut total = Preview::default();
    let (mut users, mut slowest, mut known, mut explain) = (0, 0.0f64, 0, 0.0);
    for (u, p, counts, k, e) in timings.iter() {
        users += u;
        slowest = slowest.max(*p);
        total.add(counts.clone(), 10);
        known += k;
        explain += e;
        println!(
            "worker: {u} users, preview {:.1} ms ({:.2} µs/user), {k} explains of its users in {:.1} ms",
            p * 1e3,
            p * 1e6 / (*u).max(1) as f64,
            e * 1e3
        );
    }
    println!(
        "preview of '{}': size {}, entering {}, leaving {}; {users} users; slowest worker {:.1} ms",
        args.candidate,
        total.size,
        total.entering,
        total.leaving,
        slowest * 1e3
    );
    println!(
        "explain: {known} users, {:.1} µs each (mean, including the calls on workers that do not hold the user)",
        explain * 1e6 / known.max(1) as f64
    );
    Ok(())
}
