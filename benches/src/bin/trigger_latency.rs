//! Trigger latency of a live Herald: from the instant an event is produced (into Kafka, or
//! sent over HTTP) to the instant its segment change is read from the changelog topic.
//!
//! For each path and rate it starts `herald run` (Kafka mode) on fresh topics, produces
//! events at a fixed rate for `--seconds`, and records every enter change's latency in an
//! HDR histogram (after a warm-up). The segment is a 1-second click window and each user
//! clicks every 2 seconds, so every event causes exactly one enter (and, a second later,
//! one lapse), and state stays bounded. The `broker` path measures one Kafka hop alone
//! (produce -> consume, same client settings) to show where the milliseconds go.
//!
//! Run through `benches/trigger_latency.sh`, which starts the broker and builds release
//! binaries. Prints a Markdown table for docs/benchmarks.md.

/// The same allocator as the `herald` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Parser, Debug)]
#[command(about = "Event-to-segment-change latency of a live Herald")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    /// The `herald` binary (release build).
    #[arg(long)]
    herald: PathBuf,
    /// Rates to run, events per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    rates: Vec<u64>,
    /// Paths to measure: broker (one Kafka hop), kafka, http (through the events topic),
    /// embedded (HTTP straight into the dataflow, changes read from the file sink),
    /// journey (embedded; each click enters a journey whose first step sends: latency to
    /// the message action in `messages.jsonl`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "broker,kafka,http,embedded"
    )]
    paths: Vec<String>,
    /// Seconds of load per run (after the warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Warm-up seconds (measured but not recorded).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Herald's timely workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `fetch.wait.max.ms` for Herald's consumer and the measuring consumer.
    #[arg(long, default_value_t = 1)]
    fetch_wait_max_ms: u64,
    /// Herald's `engine.tick_ms`.
    #[arg(long, default_value_t = 1)]
    tick_ms: u64,
    /// `linger.ms` of the load generator's producer and Herald's `kafka.linger_ms`:
    /// batching trades a little latency for fewer requests.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Partitions of the events topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Run Herald without durable state (`checkpoint.dir = ""`: no ingest log, no
    /// checkpoints), to measure what they cost.
    #[arg(long)]
    no_durable: bool,
    /// `checkpoint.every` of Herald (durable runs).
    #[arg(long, default_value = "5 seconds")]
    checkpoint_every: String,
}

/// The `journey` path: every click enters (re-entry always) and sends at once.
const JOURNEYS: &str = "journey: clicked\nentry: { event: Clicked }\nreentry: always\nsteps:\n  - send: { channel: webhook, template: t }\n";

const SEGMENTS: &str = "CREATE SEGMENT clicked_last_second AS\n    count(*) FILTER (WHERE event = 'Clicked' AND timestamp > now() - INTERVAL '1 second') >= 1;\n";

/// One run's results.
struct Outcome {
    path: String,
    rate: u64,
    sent_per_s: f64,
    received_per_s: f64,
    hist: Histogram<u64>,
    /// Produced -> the instant Herald fed it (the change's `time`).
    hist_in: Option<Histogram<u64>>,
    /// Fed -> read from the changelog.
    hist_out: Option<Histogram<u64>>,
    lost: u64,
    herald_delay_ms: Option<(f64, f64, f64)>,
}

fn micros_since(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

/// Microseconds since the Unix epoch (Herald's change times are on this clock).
fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() % 100_000_000)
    )
}

fn create_topic(brokers: &str, name: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let r = futures::executor::block_on(admin.create_topics(
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
        &opts,
    ))?;
    r[0].as_ref()
        .map_err(|(t, e)| anyhow!("create topic {t}: {e}"))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut outcomes = Vec::new();
    for path in &args.paths {
        for &rate in &args.rates {
            eprintln!("== {path} at {rate} events/s for {} s", args.seconds);
            let o = match path.as_str() {
                "broker" => run_broker(&args, rate)?,
                "kafka" | "http" | "embedded" | "journey" => run_herald(&args, path, rate)?,
                other => {
                    bail!("unknown path {other}: use broker, kafka, http, embedded or journey")
                }
            };
            eprintln!(
                "   p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                o.hist.value_at_quantile(0.5) as f64 / 1e3,
                o.hist.value_at_quantile(0.99) as f64 / 1e3,
                o.hist.max() as f64 / 1e3
            );
            outcomes.push(o);
        }
    }
    println!(
        "\n| path | target events/s | sent/s | changes/s | p50 ms | p99 ms | p99.9 ms | max ms | over 100 ms | missing | in: produced -> fed, p50/p99 ms | out: fed -> read, p50/p99 ms | Herald: fed -> sink, mean / p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        let over = o
            .hist
            .iter_recorded()
            .filter(|v| v.value_iterated_to() > 100_000)
            .map(|v| v.count_at_value())
            .sum::<u64>();
        let split = |h: &Option<Histogram<u64>>| {
            h.as_ref().map_or("-".to_string(), |h| {
                format!(
                    "{:.1} / {:.1}",
                    h.value_at_quantile(0.5) as f64 / 1e3,
                    h.value_at_quantile(0.99) as f64 / 1e3
                )
            })
        };
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            o.path,
            o.rate,
            o.sent_per_s,
            o.received_per_s,
            o.hist.value_at_quantile(0.5) as f64 / 1e3,
            o.hist.value_at_quantile(0.99) as f64 / 1e3,
            o.hist.value_at_quantile(0.999) as f64 / 1e3,
            o.hist.max() as f64 / 1e3,
            over,
            o.lost,
            split(&o.hist_in),
            split(&o.hist_out),
            o.herald_delay_ms
                .map_or("-".to_string(), |(m, p50, p99)| format!(
                    "{m:.1} / ≤{p50} / ≤{p99}"
                ))
        );
    }
    Ok(())
}

/// Paces `total` sends at `rate`/s: calls `send(i)` at start + i/rate.
fn paced(rate: u64, total: u64, mut send: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    for i in 0..total {
        let due = Duration::from_nanos(i * 1_000_000_000 / rate);
        loop {
            let now = start.elapsed();
            if now >= due {
                break;
            }
            let left = due - now;
            if left > Duration::from_micros(200) {
                std::thread::sleep(left - Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
        }
        send(i);
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn measuring_consumer(
    brokers: &str,
    topic: &str,
    partitions: i32,
    fetch_wait: u64,
) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", unique()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", fetch_wait.to_string())
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

fn producer(brokers: &str, linger_ms: u64) -> Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// Queues a record, waiting while the producer's queue is full.
fn send_queued(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &str,
) {
    let mut rec = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, back)) => {
                rec = back;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// One Kafka hop alone: produce, consume, compare.
fn run_broker(args: &Args, rate: u64) -> Result<Outcome> {
    let topic = format!("bench-hop-{}", unique());
    create_topic(&args.brokers, &topic, args.partitions)?;
    let consumer = measuring_consumer(
        &args.brokers,
        &topic,
        args.partitions,
        args.fetch_wait_max_ms,
    )?;
    let t0 = Instant::now();
    let total = rate * (args.seconds + args.warmup);
    let warm = rate * args.warmup;
    let done = Arc::new(AtomicBool::new(false));
    let done2 = Arc::clone(&done);
    let reader = std::thread::spawn(move || {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        let mut got = 0u64;
        let first = Instant::now();
        let mut idle_since: Option<Instant> = None;
        loop {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    idle_since = None;
                    let text = std::str::from_utf8(m.payload().unwrap_or(&[])).unwrap_or("");
                    let mut parts = text.split(' ');
                    let (Some(i), Some(sent)) = (parts.next(), parts.next()) else {
                        continue;
                    };
                    let (i, sent): (u64, u64) = (i.parse().unwrap_or(0), sent.parse().unwrap_or(0));
                    got += 1;
                    if i >= warm {
                        let _ = hist.record(micros_since(t0).saturating_sub(sent).max(1));
                    }
                }
                _ if done2.load(Ordering::Acquire) => {
                    let idle = idle_since.get_or_insert_with(Instant::now);
                    if got >= total || idle.elapsed() > Duration::from_secs(5) {
                        break;
                    }
                }
                _ => {}
            }
        }
        (hist, got, first.elapsed())
    });
    let p = producer(&args.brokers, args.linger_ms)?;
    let keys: Vec<String> = (0..1024).map(|k| format!("k{k}")).collect();
    let sent_rate = paced(rate, total, |i| {
        let payload = format!("{i} {}", micros_since(t0));
        let key = &keys[(i % 1024) as usize];
        send_queued(&p, &topic, key, &payload);
    });
    p.flush(Duration::from_secs(30))?;
    done.store(true, Ordering::Release);
    let (hist, got, elapsed) = reader.join().map_err(|_| anyhow!("reader panicked"))?;
    Ok(Outcome {
        path: "broker (one hop)".into(),
        rate,
        sent_per_s: sent_rate,
        received_per_s: got as f64 / elapsed.as_secs_f64(),
        hist,
        lost: total.saturating_sub(got),
        hist_in: None,
        hist_out: None,
        herald_delay_ms: None,
    })
}

struct HeraldProc {
    child: Child,
    base: String,
    /// The admin listener (`/metrics`).
    admin: String,
}

fn start_herald(args: &Args, dir: &std::path::Path, config: &str) -> Result<HeraldProc> {
    std::fs::write(dir.join("segments.sql"), SEGMENTS)?;
    std::fs::write(dir.join("journeys.yaml"), JOURNEYS)?;
    // The admin listener (for /metrics) on a free port, with the bench's read key.
    let config =
        format!("{config}\n[admin]\nlisten = \"127.0.0.1:0\"\nread_keys = [\"{READ_KEY}\"]\n");
    std::fs::write(dir.join("herald.toml"), config)?;
    let mut child = Command::new(&args.herald)
        .args(["run", "--config"])
        .arg(dir.join("herald.toml"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("herald.stderr"))?)
        .spawn()
        .context("starting herald")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let (base, admin) = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(rest) = l.strip_prefix("herald: listening on ") {
                    let base = rest.split_whitespace().next().unwrap_or("").to_string();
                    let admin = rest.split_once("admin on ").map_or("", |(_, a)| a);
                    break (base, admin.trim_end_matches(')').to_string());
                }
            }
            _ => bail!(
                "herald did not start: {}",
                std::fs::read_to_string(dir.join("herald.stderr")).unwrap_or_default()
            ),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(HeraldProc { child, base, admin })
}

/// The read key the bench gives Herald's admin listener.
const READ_KEY: &str = "bench-read";

fn stop_herald(mut h: HeraldProc) -> Result<()> {
    Command::new("kill")
        .args(["-TERM", &h.child.id().to_string()])
        .status()?;
    let status = h.child.wait()?;
    if !status.success() {
        bail!("herald exited with {status}");
    }
    Ok(())
}

/// Herald's own change-delay histogram from /metrics: mean, and the upper bounds of
/// the buckets holding p50 and p99.
fn herald_delay(admin: &str) -> Option<(f64, f64, f64)> {
    let text = reqwest::blocking::Client::new()
        .get(format!("{admin}/metrics"))
        .bearer_auth(READ_KEY)
        .send()
        .ok()?
        .text()
        .ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let (sum, count) = (
        value("herald_change_delay_ms_sum")?,
        value("herald_change_delay_ms_count")?,
    );
    if count == 0.0 {
        return None;
    }
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("herald_change_delay_ms_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once('"')?;
            let n = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((le.parse::<f64>().unwrap_or(f64::INFINITY), n))
        })
        .collect();
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= p * count)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    Some((sum / count, q(0.5), q(0.99)))
}

/// Events through Herald: produced to Kafka or sent over HTTP, changes read back.
fn run_herald(args: &Args, path: &str, rate: u64) -> Result<Outcome> {
    let id = unique();
    let (events, changes) = (format!("bench-events-{id}"), format!("bench-changes-{id}"));
    let journey = path == "journey";
    let embedded = path == "embedded" || journey;
    if !embedded {
        create_topic(&args.brokers, &events, args.partitions)?;
    }
    let dir = tempfile::tempdir()?;
    let mut config = format!(
        "[engine]\nsegments = \"segments.sql\"\nworkers = {}\ntick_ms = {}\n\
         [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"bench\"]\nmax_batch_bytes = 4000000\n",
        args.workers, args.tick_ms
    );
    if journey {
        config = config.replace("[http]", "journeys = \"journeys.yaml\"\n[http]");
    }
    if args.no_durable {
        config.push_str("[checkpoint]\ndir = \"\"\n");
    } else {
        config.push_str(&format!(
            "[checkpoint]\nevery = \"{}\"\n",
            args.checkpoint_every
        ));
    }
    if embedded {
        config.push_str("[output]\ndir = \"out\"\n");
    } else {
        config.push_str(&format!(
            "[output]\ndir = \"\"\n\
             [kafka]\nbrokers = \"{}\"\ngroup_id = \"bench-{id}\"\nevents_topics = [\"{events}\"]\n\
             changes_topic = \"{changes}\"\ndead_letter_topic = \"bench-dead-{id}\"\nfetch_wait_max_ms = {}\n\
             linger_ms = {}\n",
            args.brokers, args.fetch_wait_max_ms, args.linger_ms
        ));
    }
    let herald = start_herald(args, dir.path(), &config)?;
    let source = if embedded {
        ChangeSource::File(BufReader::new(std::fs::File::open(dir.path().join(
            if journey {
                "out/messages.jsonl"
            } else {
                "out/segment_changes.jsonl"
            },
        ))?))
    } else {
        ChangeSource::Kafka(measuring_consumer(
            &args.brokers,
            &changes,
            herald_engine::live::kafka::OUTPUT_PARTITIONS,
            args.fetch_wait_max_ms,
        )?)
    };

    // Each user slot clicks every 2 s; the window is 1 s, so each click is one enter.
    let pool = (rate * 2).max(1);
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..pool).map(|_| AtomicU64::new(0)).collect());
    let total = rate * (args.seconds + args.warmup);
    let warm_us = epoch_us() + args.warmup * 1_000_000;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let sent_at = Arc::clone(&sent_at);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut source = source;
            let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut hist, mut hist_in, mut hist_out) = (new_hist(), new_hist(), new_hist());
            let mut enters = 0u64;
            let mut idle_since: Option<Instant> = None;
            let first = Instant::now();
            loop {
                match source.next() {
                    Some(line) => {
                        idle_since = None;
                        let now = epoch_us();
                        let Ok(c) = serde_json::from_slice::<serde_json::Value>(&line) else {
                            continue;
                        };
                        if !journey && c["diff"] != 1 {
                            continue;
                        }
                        enters += 1;
                        let slot: u64 = c["user_id"]
                            .as_str()
                            .and_then(|u| u.strip_prefix('u'))
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let sent = sent_at[(slot % pool) as usize].load(Ordering::Acquire);
                        if sent >= warm_us {
                            let _ = hist.record(now.saturating_sub(sent).max(1));
                            let fed = c["time"]
                                .as_str()
                                .and_then(|t| herald_operators::time::parse_rfc3339_ms(t).ok())
                                .map_or(0, |ms| ms as u64 * 1000);
                            // Herald's instants are ms: the split is good to about 1 ms.
                            let _ = hist_in.record(fed.saturating_sub(sent).max(1));
                            let _ = hist_out.record(now.saturating_sub(fed).max(1));
                        }
                    }
                    _ if done.load(Ordering::Acquire) => {
                        let idle = idle_since.get_or_insert_with(Instant::now);
                        if enters >= total || idle.elapsed() > Duration::from_secs(5) {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            (hist, hist_in, hist_out, enters, first.elapsed())
        })
    };

    let sent_rate = if path == "kafka" {
        let p = producer(&args.brokers, args.linger_ms)?;
        let r = paced(rate, total, |i| {
            let slot = i % pool;
            let user = format!("u{slot}");
            let payload = format!(
                r#"{{"type":"track","userId":"{user}","event":"Clicked","messageId":"m{i}"}}"#
            );
            sent_at[slot as usize].store(epoch_us(), Ordering::Release);
            send_queued(&p, &events, &user, &payload);
        });
        p.flush(Duration::from_secs(30))?;
        r
    } else {
        send_http(&herald.base, rate, total, pool, &sent_at)?
    };
    done.store(true, Ordering::Release);
    let (hist, hist_in, hist_out, enters, elapsed) =
        reader.join().map_err(|_| anyhow!("reader panicked"))?;
    let delay = herald_delay(&herald.admin);
    stop_herald(herald)?;
    Ok(Outcome {
        path: match path {
            "kafka" => "Kafka -> Herald -> Kafka".into(),
            "http" => "HTTP -> Kafka -> Herald -> Kafka".into(),
            "journey" => "HTTP -> Herald journey (embedded) -> message action in file".into(),
            _ => "HTTP -> Herald (embedded) -> file".into(),
        },
        rate,
        sent_per_s: sent_rate,
        received_per_s: enters as f64 / elapsed.as_secs_f64(),
        hist,
        hist_in: Some(hist_in),
        hist_out: Some(hist_out),
        lost: total.saturating_sub(enters),
        herald_delay_ms: delay,
    })
}

/// Where the measuring thread reads changes: the changelog topic, or (embedded mode)
/// `segment_changes.jsonl`, tailed.
enum ChangeSource {
    Kafka(BaseConsumer),
    File(BufReader<std::fs::File>),
}

impl ChangeSource {
    /// The next change line, or None after ~50 ms without one.
    fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            ChangeSource::Kafka(c) => match c.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => Some(m.payload().unwrap_or(&[]).to_vec()),
                _ => None,
            },
            ChangeSource::File(f) => {
                let started = Instant::now();
                let mut line = Vec::new();
                while started.elapsed() < Duration::from_millis(50) {
                    // A partial line (the sink mid-write) is kept and completed.
                    match f.read_until(b'\n', &mut line) {
                        Ok(_) if line.ends_with(b"\n") => return Some(line),
                        _ => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
                None
            }
        }
    }
}

/// HTTP: one batch request per millisecond (rate/1000 events each, at least 1), spread
/// over 16 sender threads (a request waits for the broker's ack in Kafka mode), as SDKs batch.
fn send_http(
    base: &str,
    rate: u64,
    total: u64,
    pool: u64,
    sent_at: &Arc<Vec<AtomicU64>>,
) -> Result<f64> {
    let per_batch = (rate / 1000).max(1);
    let batches = total / per_batch;
    let batch_rate = rate / per_batch;
    let threads = 16u64;
    let started = Instant::now();
    let mut handles = Vec::new();
    let errors = Arc::new(AtomicU64::new(0));
    for th in 0..threads {
        let sent_at = Arc::clone(sent_at);
        let base = base.to_string();
        let errors = Arc::clone(&errors);
        handles.push(std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let mut body = Vec::with_capacity(4096);
            paced(batch_rate, batches, |b| {
                if b % threads != th {
                    return;
                }
                body.clear();
                body.extend_from_slice(br#"{"batch":["#);
                let now = epoch_us();
                for k in 0..per_batch {
                    let i = b * per_batch + k;
                    let slot = i % pool;
                    if k > 0 {
                        body.push(b',');
                    }
                    let _ = write!(body, r#"{{"type":"track","userId":"u{slot}","event":"Clicked","messageId":"m{i}"}}"#);
                    sent_at[slot as usize].store(now, Ordering::Release);
                }
                body.extend_from_slice(b"]}");
                let ok = client
                    .post(format!("{base}/v1/batch"))
                    .basic_auth("bench", Some(""))
                    .body(body.clone())
                    .send()
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            });
        }));
    }
    for h in handles {
        h.join().map_err(|_| anyhow!("sender panicked"))?;
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        eprintln!("   {e} HTTP requests failed");
    }
    Ok((batches * per_batch) as f64 / started.elapsed().as_secs_f64())
}
