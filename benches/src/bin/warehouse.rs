//! The warehouse run of docs/benchmarks.md: profile snapshots in, warehouse tables out.
//!
//! **Snapshots.** Writes a snapshot of `--profiles` profiles with ten traits (strings,
//! numbers, booleans, a timestamp) as one Parquet file, and a second one in which
//! `--changed-pct` of the rows differ in one trait. Each is then taken through the
//! `herald run` path, timed step by step, on a live segment dataflow with five segments
//! over the traits (`--workers` timely workers, worker 0 feeding as in the service):
//!
//! * `read`: `read_snapshot` (Parquet decode, typing, one map per user);
//! * `state`: the snapshot handed to the query API's state (`LiveState::set_snapshot`);
//! * `diff`: `SnapshotFeeder::apply` (the rows compared with the last snapshot's, user
//!   by user, and the facts of changed rows diffed and fed to the dataflow);
//! * `dataflow`: until the output frontier passes the snapshot's instant (every
//!   membership change it causes has been emitted).
//!
//! Their sum is the time from a file landing to its diff applied, not counting the
//! watcher's listing interval (`snapshots.refresh`), which adds up to one interval.
//!
//! **Sinks.** Turns `--sink-rows` events and as many segment changes into warehouse table
//! rows and writes them in batches of `--batch` (the exporter's `max_rows_per_file`) as
//! date/hour-partitioned Parquet to a local directory, to `--s3` when given, and loads
//! them into PostgreSQL (`--postgres`, a fresh schema dropped afterwards), once fresh
//! and once again (a replay: every row a duplicate). Prints rows/s for each.
//!
//! Run through `benches/warehouse.sh`.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use herald_benches::rss;
use herald_connectors::sink::SegmentChange;
use herald_connectors::snapshot::{read_snapshot, write_snapshot};
use herald_connectors::tables::{self, Row, Table};
use herald_engine::driver::SnapshotFeeder;
use herald_engine::live::state::LiveState;
use herald_operators::dataflow::build_segments;
use herald_operators::event::{Event, EventType};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::{Plan, SnapshotRows};
use herald_operators::time::Time;
use herald_operators::value::{Type, Value};
use serde_json::{json, Map};
use timely::dataflow::operators::probe::Handle as ProbeHandle;

#[derive(Parser, Debug)]
#[command(about = "Profile snapshot apply time and warehouse sink throughput")]
struct Args {
    /// Profiles in the snapshot.
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
    /// Percentage of rows that differ in the second snapshot.
    #[arg(long, default_value_t = 1.0)]
    changed_pct: f64,
    /// Timely workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Events (and as many segment changes) written by the sink run; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    sink_rows: usize,
    /// Rows per written batch (the exporter's `max_rows_per_file`).
    #[arg(long, default_value_t = 100_000)]
    batch: usize,
    /// An S3 prefix to write the tables under too (`s3://bucket/prefix`).
    #[arg(long)]
    s3: Option<String>,
    /// A PostgreSQL URL to load the tables into.
    #[arg(long)]
    postgres: Option<String>,
}

const T0: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z
const SEGMENTS: &str = "\
CREATE SEGMENT pro AS plan IN ('pro', 'enterprise');
CREATE SEGMENT high_value AS lifetime_value >= 900;
CREATE SEGMENT young_in AS country = 'IN' AND age < 30;
CREATE SEGMENT engaged AS newsletter = true AND score > 0.5;
CREATE SEGMENT new_staff AS is_employee = true AND signup_at > '2026-01-01T00:00:00Z';
";
const PLANS: [&str; 4] = ["free", "pro", "team", "enterprise"];
const COUNTRIES: [&str; 8] = ["IN", "US", "DE", "BR", "FR", "JP", "GB", "NG"];

/// A deterministic pseudo-random number for (row, column).
fn rnd(i: usize, col: u64) -> u64 {
    xorshift(
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ col.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn profiles(n: usize) -> (SnapshotRows, Vec<(String, Type)>) {
    let schema: Vec<(String, Type)> = [
        ("plan", Type::Str),
        ("country", Type::Str),
        ("city", Type::Str),
        ("lifetime_value", Type::Num),
        ("orders", Type::Num),
        ("age", Type::Num),
        ("score", Type::Num),
        ("signup_at", Type::Ts),
        ("is_employee", Type::Bool),
        ("newsletter", Type::Bool),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    let rows = (0..n)
        .map(|i| {
            let r = |c| rnd(i, c);
            let cells: BTreeMap<String, Value> = [
                ("plan", Value::Str(PLANS[(r(1) % 4) as usize].into())),
                ("country", Value::Str(COUNTRIES[(r(2) % 8) as usize].into())),
                ("city", Value::Str(format!("city-{}", r(3) % 500))),
                ("lifetime_value", Value::num((r(4) % 1000) as f64)),
                ("orders", Value::num((r(5) % 50) as f64)),
                ("age", Value::num((18 + r(6) % 60) as f64)),
                ("score", Value::num((r(7) % 1000) as f64 / 1000.0)),
                (
                    "signup_at",
                    Value::Ts(T0 - (r(8) % 730) as i64 * 86_400_000),
                ),
                ("is_employee", Value::Bool(r(9) % 50 == 0)),
                ("newsletter", Value::Bool(r(10) % 2 == 0)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            (format!("user-{i:07}"), cells)
        })
        .collect();
    (rows, schema)
}

/// The same rows with `pct` % of them changed in `lifetime_value` (crossing the
/// `high_value` line either way).
fn changed(rows: &SnapshotRows, pct: f64) -> (SnapshotRows, usize) {
    let every = (100.0 / pct).round().max(1.0) as usize;
    let mut out = rows.clone();
    let mut n = 0;
    for (i, cells) in out.values_mut().enumerate() {
        if i % every == 0 {
            if let Some(Value::Num(v)) = cells.get("lifetime_value") {
                let next = if v.0 >= 900.0 {
                    v.0 - 500.0
                } else {
                    v.0 + 500.0
                };
                cells.insert("lifetime_value".into(), Value::num(next.min(999.0)));
                n += 1;
            }
        }
    }
    (out, n)
}

/// One snapshot's figures.
#[derive(Debug, Default, Clone)]
struct Applied {
    read: Duration,
    state: Duration,
    diff: Duration,
    dataflow: Duration,
    fed: usize,
    changes: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn snapshots(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let t = Instant::now();
    let (v1, schema) = profiles(args.profiles);
    let (v2, n_changed) = changed(&v1, args.changed_pct);
    let files = [dir.join("v1.parquet"), dir.join("v2.parquet")];
    for (rows, f) in [&v1, &v2].into_iter().zip(&files) {
        write_snapshot(f.to_str().context("path")?, rows, &schema)?;
    }
    drop((v1, v2));
    println!(
        "snapshot: {} profiles x {} traits, {:.1} MB Parquet; second snapshot: {n_changed} rows changed ({}%); generated in {:.1} s",
        args.profiles,
        schema.len(),
        std::fs::metadata(&files[0])?.len() as f64 / 1e6,
        args.changed_pct,
        t.elapsed().as_secs_f64()
    );
    let plan = Plan::compile(&parse_segments(SEGMENTS)?);
    let locations: Vec<String> = files
        .iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    let results: Arc<Mutex<Vec<Applied>>> = Arc::default();
    let out = Arc::clone(&results);
    let changes = Arc::new(AtomicU64::new(0));
    let rss_after: Arc<Mutex<Vec<u64>>> = Arc::default();
    let rss_out = Arc::clone(&rss_after);
    timely::execute(timely::Config::process(args.workers), move |worker| {
        let index = worker.index();
        let probe = ProbeHandle::new();
        let plan = Rc::new(plan.clone());
        let seen = Arc::clone(&changes);
        let mut inputs = worker.dataflow::<Time, _, _>(|scope| {
            let (inputs, outputs) = build_segments(scope, plan.clone(), -1, None);
            outputs
                .changes
                .inspect(move |_| {
                    seen.fetch_add(1, Ordering::Relaxed);
                })
                .probe_with(&probe);
            inputs
        });
        let mut cur: Time = 1;
        inputs.advance_to(cur);
        if index == 0 {
            inputs.set_snapshot_clock(None, i64::MIN);
        }
        let mut feeder = SnapshotFeeder::default();
        let mut state = LiveState::new(plan.visible);
        for (k, location) in locations.iter().enumerate() {
            let mut a = Applied::default();
            if index == 0 {
                let started = Instant::now();
                let snap = read_snapshot(location).expect("the snapshot just written reads");
                a.read = started.elapsed();
                let at = T0 + k as i64 * 3_600_000;
                let rows = Arc::new(snap.rows);
                let started = Instant::now();
                state.set_snapshot(at, Arc::clone(&rows));
                a.state = started.elapsed();
                let started = Instant::now();
                a.fed = feeder.apply(&plan, &mut inputs, at, rows);
                a.diff = started.elapsed();
            }
            let before = changes.load(Ordering::Relaxed);
            let started = Instant::now();
            cur += 1;
            inputs.advance_to(cur);
            inputs.flush();
            while probe.less_than(&cur) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            a.dataflow = started.elapsed();
            a.changes = changes.load(Ordering::Relaxed) - before;
            if index == 0 {
                out.lock().expect("results").push(a);
                rss_out
                    .lock()
                    .expect("rss")
                    .push(rss().map_or(0, |(now, _)| now));
            }
        }
    })
    .map_err(|e| anyhow::anyhow!("timely: {e}"))?;
    let results = results.lock().expect("results").clone();
    let rss_after = rss_after.lock().expect("rss").clone();
    for (k, a) in results.iter().enumerate() {
        let what = if k == 0 {
            "first snapshot (every profile new)".to_string()
        } else {
            format!("second snapshot ({}% of rows changed)", args.changed_pct)
        };
        let total = a.read + a.state + a.diff + a.dataflow;
        println!(
            "{what}: landing -> applied {:.0} ms = read {:.0} + state {:.0} + diff {:.0} ({} fact updates) + dataflow {:.0} ({} membership changes); RSS {:.0} MiB",
            ms(total),
            ms(a.read),
            ms(a.state),
            ms(a.diff),
            a.fed,
            ms(a.dataflow),
            a.changes,
            rss_after.get(k).copied().unwrap_or(0) as f64 / 1_048_576.0
        );
    }
    Ok(())
}

fn sink_rows(n: usize) -> (Vec<Row>, Vec<Row>) {
    let events = (0..n)
        .map(|i| {
            let mut properties = Map::new();
            properties.insert("revenue".into(), json!((i % 200) as f64));
            properties.insert("sku".into(), json!(format!("sku-{}", i % 5000)));
            let ev = Event {
                user: format!("user-{:07}", i % 200_000),
                kind: EventType::Track,
                event: Some(
                    if i % 3 == 0 {
                        "Order Completed"
                    } else {
                        "Product Viewed"
                    }
                    .into(),
                ),
                message_id: format!("m-{i}"),
                timestamp: T0 + (i as i64 * 3_600_000) / n.max(1) as i64,
                properties,
                context: Map::new(),
                traits: Map::new(),
            };
            tables::event_row(&ev, ev.timestamp + 50)
        })
        .collect();
    let changes = (0..n)
        .map(|i| {
            tables::change_row(
                &SegmentChange {
                    segment: ["pro", "high_value", "engaged"][i % 3].into(),
                    user_id: format!("user-{:07}", i / 3),
                    diff: if i % 7 == 0 { -1 } else { 1 },
                    time: T0 + (i as i64 * 3_600_000) / n.max(1) as i64,
                },
                1,
            )
        })
        .collect();
    (events, changes)
}

/// Writes `rows` in batches with `write`; returns rows/s.
fn batches(
    rows: &[Row],
    batch: usize,
    mut write: impl FnMut(usize, &[Row]) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for (k, chunk) in rows.chunks(batch.max(1)).enumerate() {
        write(k, chunk)?;
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

fn sinks(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let (events, changes) = sink_rows(args.sink_rows);
    println!(
        "sink rows: {} events, {} segment changes, built in {:.1} s; batches of {}",
        events.len(),
        changes.len(),
        started.elapsed().as_secs_f64(),
        args.batch
    );
    let run = format!("{}", std::process::id());
    let tables: [(&Table, &[Row]); 2] = [
        (&tables::EVENTS, &events),
        (&tables::SEGMENT_CHANGES, &changes),
    ];
    let local = dir.join("tables");
    let local = local.to_string_lossy().into_owned();
    let mut prefixes = vec![("parquet, local disk", local)];
    if let Some(s3) = &args.s3 {
        prefixes.push((
            "parquet, S3 (s3s-fs on 127.0.0.1)",
            format!("{}/{run}", s3.trim_end_matches('/')),
        ));
    }
    for (what, prefix) in &prefixes {
        for (table, rows) in tables {
            let rate = batches(rows, args.batch, |k, chunk| {
                tables::write_partitioned(prefix, table, chunk, &format!("bench-{k:05}"))?;
                Ok(())
            })?;
            println!("{what}: {}: {rate:.0} rows/s", table.name);
        }
    }
    if let Some(url) = &args.postgres {
        let schema = format!("herald_bench_{run}");
        tables::create_postgres_tables(url, &schema)?;
        for (table, rows) in tables {
            for pass in ["fresh", "replayed (every row a duplicate)"] {
                let rate = batches(rows, args.batch, |_, chunk| {
                    tables::load_postgres(url, &schema, table, chunk)?;
                    Ok(())
                })?;
                println!("postgres, {pass}: {}: {rate:.0} rows/s", table.name);
            }
        }
        drop_schema(url, &schema)?;
    }
    Ok(())
}

fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (url, schema) = (url.to_string(), schema.to_string());
    rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await?;
        anyhow::Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    snapshots(&args, dir.path())?;
    if args.sink_rows > 0 {
        sinks(&args, dir.path())?;
    }
    Ok(())
}
