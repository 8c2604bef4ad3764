//! `herald run`: the segment dataflow as a long-running service on the wall clock.
//!
//! Owns [`run`]. Threads and what crosses between them:
//!
//! ```text
//! HTTP (tokio/axum) --events by user hash--> timely workers <-- Kafka partitions (one
//!   |  embedded mode             ^  (snapshots, audiences:      consumer per worker,
//!   |  Kafka mode: produce to    |   worker 0)                  one consumer group)
//!   |  the events topic          snapshot watcher thread, warehouse audience thread
//!   v
//! query API <-- LiveState <-- sink thread <-- changes, dead letters, watermarks
//!                               |--> segment_changes.jsonl, dead_letters.jsonl
//!                               |--> Kafka changelog topic, dead-letter topic
//!                               '--> outbox --> delivery engine (tokio) --> providers
//!                                                 '--> feedback events --> workers / events topic
//! ```
//!
//! Time: every worker advances its inputs to the wall clock (ms since the epoch) at
//! least every `engine.tick_ms`, so temporal lapses fire on time with no new events.
//! Events are fed at the current instant; their own timestamps still decide windows.
//!
//! Delivery: a watermark `f` (the output frontier: every change at an instant before
//! `f` has been emitted by every worker) follows the changes into the sink channel; the
//! sink flushes its files and waits for Kafka's acks, then publishes `durable = f`.
//! Workers commit a Kafka offset only once the instant its event was fed at is below
//! `durable`: at-least-once, with identifier + `messageId` dedup on entry making redeliveries
//! harmless.
//!
//! Shutdown (SIGINT/SIGTERM): the HTTP server stops taking requests and finishes those in
//! flight; workers stop polling, drain what was accepted, run the clock to an agreed
//! instant, wait for the sink to hand everything over, commit, and exit.

pub mod audiences;
mod dead_letters;
mod define_api;
pub mod definitions;
pub mod durable;
mod engagement;
pub mod export;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod notify;
mod rebuild;
mod serve;
pub mod sink;
pub mod snapshots;
pub mod state;
mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_operators::event::{Event, Limits};
use herald_operators::plan::{Plan, SegmentKind, SnapshotRows};

use crate::config::Config;
use crate::EngineError;
use metrics::Metrics;
use sink::SinkMsg;
use state::LiveState;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A profile snapshot on its way to worker 0.
pub struct SnapshotMsg {
    /// Where it was read from.
    pub location: String,
    /// Its instant (the object's last-modified time, capped at now).
    pub at: i64,
    /// Its rows (shared with the query API's state).
    pub rows: Arc<SnapshotRows>,
}

/// A warehouse audience's members, as its query last returned them, on their way to
/// worker 0.
pub struct AudienceMsg {
    /// The segment's index in the plan.
    pub segment: usize,
    /// Its members.
    pub members: BTreeSet<String>,
}

/// What every thread of the service shares.
pub struct Live {
    /// The configuration, paths resolved.
    pub config: Config,
    /// The compiled segment set (with journeys: their hidden condition segments after
    /// the first `plan.visible`).
    pub plan: Plan,
    /// The journeys, if any.
    pub journeys: Option<herald_operators::journey::JourneySet>,
    /// Static list members by segment index.
    pub lists: BTreeMap<usize, BTreeSet<String>>,
    /// Members and traits for the query API.
    pub state: RwLock<LiveState>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Message parsing limits.
    pub limits: Limits,
    /// The listeners' connection timeouts.
    pub timeouts: crate::config::Timeouts,
    /// 0 while running; the instant the dataflow stops at once shutdown begins.
    pub stop_at: AtomicU64,
    /// Every change at an instant below this has been handed to the sinks.
    pub durable: AtomicU64,
    /// The output frontier last seen by a worker.
    pub frontier: AtomicU64,
    /// Set when the sink (or the dataflow) has failed: nothing more will become durable.
    pub sink_failed: std::sync::atomic::AtomicBool,
    /// Set when a worker (of this process, or in a cluster of any) has failed.
    pub worker_failed: std::sync::atomic::AtomicBool,
    /// The sink's channel.
    pub sink: Sender<SinkMsg>,
    /// Embedded mode: one channel per local worker, chosen by user hash (through the
    /// ingest log's writer when state is durable).
    pub ingest: Vec<Sender<durable::Fed>>,
    /// Events accepted and not yet taken by a worker (bounded by [`INGEST_QUEUE`] per
    /// worker: beyond it ingest answers 503).
    pub queued: std::sync::atomic::AtomicUsize,
    /// The ingest log's writer, when state is durable (embedded mode).
    pub log: Option<Sender<durable::LogReq>>,
    /// Every event stamped below this has been handed to its worker (`u64::MAX` without
    /// a log): workers' clocks never pass it.
    pub log_watermark: Arc<AtomicU64>,
    /// Every event stamped below this is on disk in the ingest log (`u64::MAX` without
    /// a log): the sink releases nothing derived at or after it, so no output ever holds
    /// what a crash could make the log forget (and a restart derive differently).
    pub log_synced: Arc<AtomicU64>,
    /// In a durable cluster: the least `log_synced` of every process, as last heard
    /// (changes are emitted where their user lives, which need not be where the event
    /// was logged).
    pub cluster_synced: AtomicU64,
    /// The sink has released every change before this instant (and handed the
    /// checkpointer its parts of the checkpoints before it).
    pub released: AtomicU64,
    /// The checkpointer's channel, when state is durable.
    pub checkpointer: Option<Sender<durable::CkMsg>>,
    /// The instant of the checkpoint taken at shutdown, once worker 0 has asked for it
    /// (0: not yet): the workers stop once the frontier passes it.
    pub final_checkpoint: AtomicU64,
    /// Set by the checkpointer when the next checkpoint should be a full one.
    pub checkpoint_full_next: std::sync::atomic::AtomicBool,
    /// The instant of the latest complete checkpoint (0: none this run).
    pub checkpointed: AtomicU64,
    /// Kafka mode: the positions of the latest complete checkpoint, until the reader
    /// commits them to the consumer group.
    pub checkpointed_positions: Mutex<Option<durable::Positions>>,
    /// Kafka mode: the positions after each logged batch (see [`durable`]).
    pub kafka_history: durable::PositionsHistory,
    /// Local workers that have built their dataflow (and restored their state).
    pub workers_ready: std::sync::atomic::AtomicUsize,
    /// The notifications layer, when `[notify]` is configured (set once at start).
    pub notify: std::sync::OnceLock<notify::Notify>,
    /// The exporter's channel, when `[export]` is configured.
    pub export: Option<Sender<export::ExportMsg>>,
    /// The segment set in force, changed through the API ([`definitions`]).
    pub defs: RwLock<definitions::Catalog>,
    /// The catalog's revision, moved by every change to it (readers that cache names and
    /// versions compare it).
    pub defs_version: AtomicU64,
    /// Held while a definitions change is applied: one at a time.
    pub defs_change: tokio::sync::Mutex<()>,
    /// Where the definitions changed through the API are kept (state is durable).
    pub defs_store: Option<durable::Store>,
    /// Per local worker, its query channel (explain, preview).
    pub(crate) queries: Vec<Sender<worker::Query>>,
    /// Worker 0's channel for definitions changes.
    pub(crate) defines: Sender<worker::DefineReq>,
}

/// Events waiting for one worker (embedded mode) before HTTP ingest answers 503: bounds
/// memory under overload, and the SDKs retry (redeliveries are deduplicated).
pub const INGEST_QUEUE: usize = 100_000;

/// Why an event could not be handed to a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestError {
    /// The worker's queue is full: retry later.
    Overloaded,
    /// The workers are gone (shutting down).
    Stopped,
}

/// Told once accepted events are durable in the ingest log (or why they are not).
pub type Durable = tokio::sync::oneshot::Receiver<Result<(), String>>;

impl Live {
    /// Hands an event to the local worker that owns its user (embedded mode), through
    /// the ingest log when state is durable (without waiting for it to be synced).
    pub fn ingest(&self, ev: Event) -> Result<(), IngestError> {
        self.ingest_all(vec![ev], false).map(|_| ())
    }

    /// Hands events on (embedded mode). With the ingest log and `wait`, returns what
    /// says when they are synced: the caller answers only then.
    pub fn ingest_all(
        &self,
        events: Vec<Event>,
        wait: bool,
    ) -> Result<Option<Durable>, IngestError> {
        let n = events.len();
        let limit = INGEST_QUEUE * self.ingest.len();
        if self.queued.fetch_add(n, Ordering::AcqRel) + n > limit && n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(IngestError::Overloaded);
        }
        if let Some(log) = &self.log {
            let (done, rx) = if wait {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let positions = durable::Positions::new();
            return match log.send(durable::LogReq::Append {
                events,
                done,
                positions,
            }) {
                Ok(()) => Ok(rx),
                Err(_) => {
                    self.queued.fetch_sub(n, Ordering::AcqRel);
                    Err(IngestError::Stopped)
                }
            };
        }
        let w = self.ingest.len() as u64;
        for ev in events {
            let i = (herald_operators::dataflow::user_hash(&ev.user) % w) as usize;
            if self.ingest[i].send(durable::Fed { at: 0, ev }).is_err() {
                return Err(IngestError::Stopped);
            }
        }
        Ok(None)
    }

    /// Sends a message to the sink thread (dropped only if the sink is gone).
    pub fn to_sink(&self, msg: SinkMsg) {
        let _ = self.sink.send(msg);
    }

    /// A thread the service needs failed: nothing more becomes durable, and the service
    /// stops at the next tick.
    pub fn fail(&self, what: &str, e: &impl std::fmt::Display) {
        tracing::error!("{what}: {e}; stopping");
        self.sink_failed.store(true, Ordering::Release);
        let stop = now_ms() + self.config.engine.tick_ms;
        let _ = self
            .stop_at
            .compare_exchange(0, stop, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.stop_at.load(Ordering::Acquire) != 0
    }

    /// Every event stamped below this is on disk in the ingest log of every process
    /// (`u64::MAX` without a log): what the sink may release.
    pub fn synced_everywhere(&self) -> u64 {
        let local = self.log_synced.load(Ordering::Acquire);
        match (&self.config.cluster, &self.log) {
            (Some(_), Some(_)) => local.min(self.cluster_synced.load(Ordering::Acquire)),
            _ => local,
        }
    }
}

/// Binds the `[http]` or `[admin]` listener (`table`), with its TLS and limits; and its
/// URL.
async fn listen(live: &Arc<Live>, table: &str) -> Result<(serve::Listener, String), EngineError> {
    let cfg = &live.config;
    let (addr, cert, key) = match table {
        "http" => (&cfg.http.listen, &cfg.http.tls_cert, &cfg.http.tls_key),
        _ => (&cfg.admin.listen, &cfg.admin.tls_cert, &cfg.admin.tls_key),
    };
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some(serve::Reloading::load(table, c, k)?),
        _ => None,
    };
    let socket = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        EngineError::Usage(format!(
            "config: `{table}.listen`: cannot listen on {addr}: {e}"
        ))
    })?;
    let local = socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(t) = &tls {
        // Certificate rotation: the files are checked every second.
        let t = Arc::clone(t);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                t.refresh();
            }
        });
    }
    let metrics_live = Arc::clone(live);
    let listener_name: &'static str = if table == "http" { "ingest" } else { "admin" };
    let listener = serve::Listener {
        socket,
        tls,
        max_connections: cfg.http.max_connections,
        max_per_ip: cfg.http.max_connections_per_ip,
        timeouts: live.timeouts,
        on_dropped: Arc::new(move |why: &'static str| {
            metrics_live.metrics.connection_dropped(listener_name, why);
        }),
    };
    Ok((listener, format!("{scheme}://{local}")))
}

/// What the service did, for the exit summary.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// The address the HTTP API listened on.
    pub http_addr: String,
}

/// Runs the service until `shutdown` resolves, then stops gracefully. `on_ready` gets
/// the URLs of the ingest and admin listeners once everything listens.
pub fn run<F>(
    config: Config,
    shutdown: F,
    on_ready: impl FnOnce(&str, &str) + Send + 'static,
) -> Result<RunSummary, EngineError>
where
    F: Future<Output = ()> + Send + 'static,
{
    // Each definition file is read once: what runs is what a checkpoint records.
    let segments_text = crate::check::read_text(&config.engine.segments, "segment")?;
    let (file, mut plan) =
        crate::check::segments_from_text(&config.engine.segments, &segments_text)?;
    let journeys_text = match &config.engine.journeys {
        Some(path) => crate::check::read_text(path, "journey")?,
        None => String::new(),
    };
    let mut journeys = match &config.engine.journeys {
        Some(path) => {
            let set = crate::check::journeys_from_text(path, &journeys_text, &file)?;
            plan = set.plan.clone();
            Some(set)
        }
        None => None,
    };
    // Templates and channels are checked against the journeys before anything starts.
    let templates = match (&config.notify, &journeys, &config.engine.journeys) {
        (Some(n), Some(set), Some(path)) => {
            let t = crate::check::load_templates(&n.templates)?;
            crate::check::check_sends(path, set, &t, Some(&n.channels()))?;
            let tracking = n
                .tracking()
                .map_err(|(k, m)| EngineError::Usage(format!("config: `{k}`: {m}")))?;
            if let (None, Some(name)) = (&tracking, t.reading_links().first()) {
                return Err(EngineError::Usage(format!(
                    "{}: template '{name}' reads message.click_url or message.open_url, \
                     which need [notify] tracking_url and tracking_secret",
                    n.templates
                )));
            }
            Some(t.with_tracking(tracking))
        }
        _ => None,
    };
    if let Some(seg) = plan
        .segments
        .iter()
        .find(|s| matches!(s.kind, SegmentKind::Warehouse { .. }))
    {
        if config.warehouse_url(None).is_none() {
            return Err(EngineError::Usage(format!(
                "segment '{}' is FROM WAREHOUSE, and the config names no warehouse to run \
                 its query on: add a [warehouse] section with postgres = \"postgres://…\"",
                seg.name
            )));
        }
    }
    // The segment set in force: the file, with the changes through the API kept in
    // `checkpoint.dir` applied over it (see `definitions`).
    let journey_defs = match &journeys {
        Some(set) => Some((
            herald_operators::journey::parse_journeys(&journeys_text).map_err(|err| {
                EngineError::Journeys {
                    path: config.engine.journeys.clone().unwrap_or_default(),
                    err,
                }
            })?,
            set.clone(),
            journeys_text.as_str(),
        )),
        None => None,
    };
    let mut catalog = definitions::Catalog::new(file, plan.clone(), journey_defs);
    let defs_store = (config.durable() && config.processes().1 == 1)
        .then(|| durable::Store::new(&config.checkpoint.dir));
    if let Some(store) = &defs_store {
        let kept = store
            .read_definitions()
            .map_err(|e| EngineError::Usage(format!("config: `checkpoint.dir`: {e}")))?;
        let warnings = catalog.replay(&kept, None);
        for w in &warnings {
            tracing::warn!("{w}");
        }
        if !warnings.is_empty() {
            store
                .write_definitions(&catalog.changes)
                .map_err(EngineError::Unavailable)?;
        }
        if !catalog.changes.is_empty() {
            tracing::info!(
                "{} segment definition change(s) through the API applied over {}",
                catalog.changes.len(),
                config.engine.segments
            );
            plan = (*catalog.plan).clone();
        }
    }
    let lists = crate::replay::load_lists(&config.engine.segments, &plan)?;
    let local_workers = config.engine.workers;
    let (sink_tx, sink_rx) = std::sync::mpsc::channel::<SinkMsg>();
    let (export_tx, export_rx) = std::sync::mpsc::channel::<export::ExportMsg>();
    let export_tx = config.export.is_some().then_some(export_tx);
    let mut ingest_rx: Vec<Option<Receiver<durable::Fed>>> = Vec::new();
    let mut ingest_tx = Vec::new();
    for _ in 0..local_workers {
        let (tx, rx) = std::sync::mpsc::channel();
        ingest_tx.push(tx);
        ingest_rx.push(Some(rx));
    }
    let mut query_rx: Vec<Option<Receiver<worker::Query>>> = Vec::new();
    let mut query_tx = Vec::new();
    for _ in 0..local_workers {
        let (tx, rx) = std::sync::mpsc::channel();
        query_tx.push(tx);
        query_rx.push(Some(rx));
    }
    let (define_tx, define_rx) = std::sync::mpsc::channel::<worker::DefineReq>();
    let recovery = if config.durable() {
        let texts = (segments_text, journeys_text);
        Some(recover(
            &config,
            &plan,
            texts,
            &catalog.changes,
            journeys.as_ref(),
            &ingest_tx,
        )?)
    } else {
        if config.cluster.is_some() && config.checkpoint.dir_given.is_none() {
            tracing::warn!(
                "state is not kept across restarts: a cluster keeps it only in a \
                 `checkpoint.dir` that every process shares (set one in [checkpoint])"
            );
        }
        None
    };
    // Every change is in force from the state's start at the latest (one kept after the
    // checkpoint takes effect again there).
    catalog.in_force_from(match recovery.as_ref().map_or(0, |r| r.start_at) {
        0 => now_ms(),
        at => at,
    });
    // Journey versions through the API: the set in force runs (every version, the
    // earlier ones for the instances that entered under them), each from its instant.
    if let (Some(set), true) = (catalog.journey_set(), journeys.is_some()) {
        journeys = Some((**set).clone());
        // Versions through the API: their sends need templates and channels, as the
        // file's did above.
        let versions = catalog
            .changes
            .iter()
            .any(|c| c.kind == durable::ChangeKind::Journey);
        if let (Some(n), Some(t), true) = (&config.notify, &templates, versions) {
            crate::check::check_sends(
                "the journeys changed through the API",
                set,
                t,
                Some(&n.channels()),
            )?;
        }
    }
    let limits = Limits {
        max_message_bytes: config.engine.max_message_bytes,
    };
    let segments = plan.visible;
    let timeouts = config.timeouts()?;
    let live = Arc::new(Live {
        config,
        plan,
        journeys,
        lists,
        state: RwLock::new(LiveState::new(segments)),
        metrics: Metrics::default(),
        limits,
        timeouts,
        stop_at: AtomicU64::new(0),
        durable: AtomicU64::new(0),
        frontier: AtomicU64::new(0),
        sink_failed: std::sync::atomic::AtomicBool::new(false),
        worker_failed: std::sync::atomic::AtomicBool::new(false),
        sink: sink_tx,
        queued: std::sync::atomic::AtomicUsize::new(recovery.as_ref().map_or(0, |r| r.replayed)),
        ingest: ingest_tx,
        log: recovery.as_ref().map(|r| r.log_tx.clone()),
        log_watermark: Arc::new(AtomicU64::new(
            recovery.as_ref().map_or(u64::MAX, |r| r.log_watermark),
        )),
        log_synced: Arc::new(AtomicU64::new(
            recovery.as_ref().map_or(u64::MAX, |r| r.log_watermark),
        )),
        checkpointer: recovery.as_ref().map(|r| r.ck_tx.clone()),
        cluster_synced: AtomicU64::new(0),
        released: AtomicU64::new(0),
        final_checkpoint: AtomicU64::new(0),
        workers_ready: std::sync::atomic::AtomicUsize::new(0),
        // State carried over to a changed segment file: the next checkpoint must be full
        // (the chain's earlier parts are in the old file's slots).
        checkpoint_full_next: std::sync::atomic::AtomicBool::new(
            recovery.as_ref().is_some_and(|r| r.carried_over),
        ),
        checkpointed: AtomicU64::new(0),
        checkpointed_positions: Mutex::new(None),
        kafka_history: Arc::new(Mutex::new(
            recovery
                .as_ref()
                .filter(|r| !r.positions.is_empty())
                .map(|r| (0, r.positions.clone()))
                .into_iter()
                .collect(),
        )),
        notify: std::sync::OnceLock::new(),
        export: export_tx,
        defs_version: AtomicU64::new(catalog.version),
        defs: RwLock::new(catalog),
        defs_change: tokio::sync::Mutex::new(()),
        defs_store,
        queries: query_tx,
        defines: define_tx,
    });
    let mut recovery = recovery;
    if let Some(r) = &mut recovery {
        if let Ok(mut st) = live.state.write() {
            st.track_writes();
            st.restore_traits(std::mem::take(&mut r.traits));
        }
    }
    for seg in &live.plan.segments[..live.plan.visible] {
        live.metrics
            .segment_size
            .get_or_create(&metrics::SegmentLabel {
                segment: seg.name.clone(),
            })
            .set(0);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("herald-io")
        .build()
        .map_err(|e| EngineError::Dataflow(format!("cannot start the I/O runtime: {e}")))?;

    // Kafka topics and the sink come first: a broker that is down is an error here,
    // named, rather than a hang later.
    if let Some(k) = &live.config.kafka {
        // The notify Kafka channel's topic too, when it lives on the same brokers.
        let extra: Vec<&str> = live
            .config
            .notify
            .as_ref()
            .and_then(|n| n.kafka.as_ref())
            .filter(|c| c.brokers.is_none())
            .map(|c| c.topic.as_str())
            .into_iter()
            .collect();
        runtime.block_on(kafka::ensure_output_topics(k, &extra))?;
    }
    if let Some(t) = templates {
        if let Some(n) = notify::start(&live, t, runtime.handle())? {
            let _ = live.notify.set(n);
        }
    }
    let exporter = match export::Exporter::open(&live)? {
        Some(x) => {
            let export_live = Arc::clone(&live);
            Some(
                std::thread::Builder::new()
                    .name("herald-export".into())
                    .spawn(move || {
                        let result = x.run(export_rx, &export_live);
                        if let Err(e) = &result {
                            export_live.fail("export", e);
                        }
                        result
                    })
                    .map_err(|e| {
                        EngineError::Dataflow(format!("cannot start the export thread: {e}"))
                    })?,
            )
        }
        None => None,
    };
    let sink = sink::Sink::open(
        &live,
        recovery.as_ref().and_then(|r| r.sink_resume.as_ref()),
    )?;
    let sink_live = Arc::clone(&live);
    let sink_thread = std::thread::Builder::new()
        .name("herald-sink".into())
        .spawn(move || {
            let result = sink.run(sink_rx, &sink_live);
            if let Err(e) = &result {
                sink_live.fail("sink", e);
            }
            result
        })
        .map_err(|e| EngineError::Dataflow(format!("cannot start the sink thread: {e}")))?;

    // Snapshots go to worker 0 of process 0 only.
    let process = live.config.cluster.as_ref().map_or(0, |c| c.process);
    let (snap_tx, snap_rx) = std::sync::mpsc::channel::<SnapshotMsg>();
    let watcher = match (&live.config.snapshots, process) {
        (Some(_), 0) => Some(snapshots::spawn_watcher(Arc::clone(&live), snap_tx)?),
        _ => None,
    };
    let profile_sync = match process {
        0 => snapshots::spawn_profile_sync(Arc::clone(&live))?,
        _ => None,
    };
    let (audience_tx, audience_rx) = std::sync::mpsc::channel::<AudienceMsg>();

    let (listener, http_addr) = runtime.block_on(listen(&live, "http"))?;
    let (admin_listener, admin_addr) = runtime.block_on(listen(&live, "admin"))?;

    // Durable state: the ingest log's writer and the checkpointer.
    let mut log_thread = None;
    let mut ck_thread = None;
    let mut io = worker::WorkerIo {
        events: ingest_rx,
        queries: query_rx,
        defines: Some(define_rx),
        snapshots: Some(snap_rx),
        audiences: Some(audience_rx),
        restored: (0..local_workers).map(|_| None).collect(),
        driver: None,
        start_at: 0,
        chain: Vec::new(),
        probe: None,
    };
    let recovery_at = recovery.as_ref().map_or(0, |r| r.start_at);
    let reader_from = recovery
        .as_ref()
        .filter(|_| live.config.kafka.is_some())
        .map(|r| r.positions.clone());
    if let Some(r) = recovery {
        let workers: Vec<Sender<durable::Fed>> = live.ingest.clone();
        let synced = Arc::clone(&live.log_synced);
        let synced_ck = Arc::clone(&synced);
        let shared = durable::LogShared {
            watermark: Arc::clone(&live.log_watermark),
            synced,
            history: Arc::clone(&live.kafka_history),
            positions: r.positions.clone(),
            on_error: {
                let weak = Arc::downgrade(&live);
                Box::new(move |e: &str, dropped: usize, from_kafka: bool| {
                    if let Some(l) = weak.upgrade() {
                        l.queued.fetch_sub(dropped, Ordering::AcqRel);
                        l.metrics.error("ingest_log");
                        if from_kafka {
                            l.fail("ingest log (Kafka events it could not keep)", &e);
                        }
                    }
                })
            },
        };
        let tick = std::time::Duration::from_millis(live.config.engine.tick_ms.max(1));
        let log = r.log;
        let log_rx = r.log_rx;
        log_thread = Some(
            std::thread::Builder::new()
                .name("herald-ingest-log".into())
                .spawn(move || durable::run_log_writer(log, log_rx, workers, shared, tick))
                .map_err(|e| EngineError::Dataflow(format!("cannot start the log writer: {e}")))?,
        );
        let ck_live = Arc::clone(&live);
        let (store, ck_rx, template) = (r.store, r.ck_rx, r.template);
        let log_tx = r.log_tx;
        ck_thread = Some(
            std::thread::Builder::new()
                .name("herald-checkpoint".into())
                .spawn(move || {
                    let result = durable::run_checkpointer(
                        store,
                        ck_rx,
                        template,
                        Some(log_tx),
                        synced_ck,
                        &ck_live,
                    );
                    if let Err(e) = &result {
                        ck_live.fail("checkpoint", e);
                    }
                    result
                })
                .map_err(|e| {
                    EngineError::Dataflow(format!("cannot start the checkpointer: {e}"))
                })?,
        );
        io.restored = r.restored;
        io.driver = r.driver;
        io.start_at = r.start_at;
        io.chain = r.chain;
        io.probe = r.probe;
    }
    // The workers.
    let io: Arc<Mutex<worker::WorkerIo>> = Arc::new(Mutex::new(io));
    let worker_live = Arc::clone(&live);
    let timely_config = live.config.timely();
    let guards = timely::execute(timely_config, move |w| {
        worker::run_worker(w, Arc::clone(&worker_live), &io)
    })
    .map_err(|e| EngineError::Dataflow(format!("cannot start timely workers: {e}")))?;

    // Serve only once every worker holds its (restored) state, so the first answers are
    // right; a worker that fails first stops the service.
    let waited = std::time::Instant::now();
    while live.workers_ready.load(Ordering::Acquire) < local_workers && !live.stopping() {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    if recovery_at > 0 {
        tracing::info!(
            "state restored in {:.0} ms",
            waited.elapsed().as_secs_f64() * 1e3
        );
    }
    // Durable Kafka mode: one reader feeds the workers through the ingest log.
    let reader_finish = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = match (reader_from, &live.log) {
        (Some(from), Some(log)) => {
            let (reader_live, log, finish) =
                (Arc::clone(&live), log.clone(), Arc::clone(&reader_finish));
            Some(
                std::thread::Builder::new()
                    .name("herald-kafka".into())
                    .spawn(move || {
                        let result = kafka::run_reader(Arc::clone(&reader_live), from, log, finish);
                        if let Err(e) = &result {
                            reader_live.fail("Kafka reader", e);
                        }
                        result
                    })
                    .map_err(|e| {
                        EngineError::Dataflow(format!("cannot start the Kafka reader: {e}"))
                    })?,
            )
        }
        _ => None,
    };
    // The HTTP server, and shutdown: stop taking requests first, then stop the workers.
    let (ingest_app, admin_app) = http::routers(Arc::clone(&live))?;
    // Warehouse audiences start once nothing else can fail to start (their queries run
    // on a warehouse that others use).
    let audiences = match process {
        0 => audiences::spawn(Arc::clone(&live), audience_tx)?,
        _ => None,
    };
    let stop_live = Arc::clone(&live);
    let (workers_done_tx, workers_done_rx) = tokio::sync::oneshot::channel::<()>();
    let served = runtime.spawn(async move {
        let stop_live2 = Arc::clone(&stop_live);
        let graceful = async move {
            tokio::select! {
                _ = shutdown => {},
                _ = workers_done_rx => {},
            }
            tracing::info!("shutting down: no new HTTP requests");
        };
        // Both listeners stop together: one signal, watched by both loops.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let drain = Duration::from_secs(30);
        let ingest = serve::serve(listener, ingest_app, stopped(stop_rx.clone()), drain);
        let admin = serve::serve(admin_listener, admin_app, stopped(stop_rx), drain);
        let signal = async move {
            graceful.await;
            let _ = stop_tx.send(true);
        };
        tokio::join!(ingest, admin, signal);
        // Every accepted request has been handed on: stop the workers at an instant
        // they all reach (unless a failure already chose one).
        let tick = stop_live2.config.engine.tick_ms;
        let _ = stop_live2.stop_at.compare_exchange(
            0,
            now_ms() + tick,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    });
    on_ready(&http_addr, &admin_addr);

    let mut failure = None;
    for r in guards.join() {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(format!("a worker panicked: {e}"))),
        }
    }
    if failure.is_none() && live.worker_failed.load(Ordering::Acquire) {
        failure = Some("a worker of another process of the cluster failed (see its log)".into());
    }
    // Workers are gone (normally after shutdown; on failure, stop serving too, and let
    // nothing wait for a checkpoint that cannot complete now).
    if failure.is_some() {
        live.sink_failed.store(true, Ordering::Release);
    }
    let _ = workers_done_tx.send(());
    if let Err(e) = runtime.block_on(served) {
        tracing::warn!("HTTP server: {e}");
    }
    live.to_sink(SinkMsg::Stop);
    if let Ok(Err(e)) = sink_thread.join() {
        failure = failure.or(Some(e.to_string()));
    }
    // The sink wrote the final checkpoint's part: the checkpointer commits it.
    if let (Some(t), Some(tx)) = (ck_thread, &live.checkpointer) {
        let _ = tx.send(durable::CkMsg::Stop);
        match t.join() {
            Ok(Ok(n)) => tracing::info!("{n} checkpoints taken"),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("the checkpointer panicked".into())),
        }
    }
    // The final checkpoint's positions go to the consumer group.
    if let Some(r) = reader {
        reader_finish.store(true, Ordering::Release);
        match r.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("the Kafka reader panicked".into())),
        }
    }
    // After the sink: it hands the exporter its last records.
    if let Some(x) = exporter {
        if let Some(tx) = &live.export {
            let _ = tx.send(export::ExportMsg::Stop);
        }
        if let Ok(Err(e)) = x.join() {
            failure = failure.or(Some(e.to_string()));
        }
    }
    if let Some(w) = watcher {
        let _ = w.join();
    }
    if let Some(p) = profile_sync {
        let _ = p.join();
    }
    if let Some(a) = audiences {
        // A query under way is not waited for: its result would have nowhere to go.
        let waited = std::time::Instant::now();
        while !a.is_finished() && waited.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if a.is_finished() {
            let _ = a.join();
        }
    }
    if let Some(n) = live.notify.get() {
        // Attempts under way finish (or time out); queued messages stay in the outbox.
        runtime.block_on(n.delivery.stop(std::time::Duration::from_secs(10)));
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    // Last: feedback events from the deliveries above still reach the log.
    if let (Some(t), Some(tx)) = (log_thread, &live.log) {
        let _ = tx.send(durable::LogReq::Stop);
        let _ = t.join();
    }
    match failure {
        Some(e) => Err(EngineError::Dataflow(e)),
        None => Ok(RunSummary { http_addr }),
    }
}

/// What a durable start brings: the opened log, the checkpoint's state, the threads'
/// channels.
struct Recovery {
    log: durable::IngestLog,
    log_tx: Sender<durable::LogReq>,
    log_rx: Receiver<durable::LogReq>,
    log_watermark: u64,
    /// Logged events queued again for the workers.
    replayed: usize,
    store: durable::Store,
    ck_tx: Sender<durable::CkMsg>,
    ck_rx: Receiver<durable::CkMsg>,
    template: durable::Manifest,
    restored: Vec<Option<durable::WorkerParts>>,
    driver: Option<worker::RestoredDriver>,
    traits: Vec<(bool, state::TraitsPart)>,
    start_at: u64,
    chain: Vec<u64>,
    /// Kafka mode: where each partition resumes.
    positions: durable::Positions,
    /// Kafka output after a restart: where the sink looks for what landed already.
    sink_resume: Option<sink::Resume>,
    /// In a cluster: the store and, on process 0, the probe's nonce it wrote (the others
    /// check they see it).
    probe: Option<(durable::Store, u64, u64)>,
    /// The checkpoint was taken with another segment file and is carried over to this one.
    carried_over: bool,
}

/// Reads the latest complete checkpoint and the ingest log, cuts the output files back
/// to the checkpoint, and queues the logged events after it for the workers.
fn recover(
    config: &Config,
    plan: &Plan,
    (segments_text, journeys_text): (String, String),
    changes: &[durable::DefChange],
    journey_set: Option<&herald_operators::journey::JourneySet>,
    workers: &[Sender<durable::Fed>],
) -> Result<Recovery, EngineError> {
    let journeys = journey_set.is_some();
    let dir = &config.checkpoint.dir;
    // A local directory that cannot be used is the config's fault; object storage that
    // does not answer is an outage.
    let remote = dir.contains("://");
    let fail = |e: String| match remote {
        false => EngineError::Usage(format!("config: `checkpoint.dir`: {e}")),
        true => EngineError::Unavailable(format!("`checkpoint.dir` = {dir}: {e}")),
    };
    let definitions = durable::definitions_hash_with(&segments_text, &journeys_text, changes);
    let store = durable::Store::new(&config.checkpoint.dir);
    let manifest = store.latest().map_err(fail)?;
    let n = config.engine.workers;
    let (process, processes) = config.processes();
    let mut remap = None;
    // Per local worker: the rebuilt history, and the chain's last part it was checked
    // against (handed to the worker, which would otherwise read it again).
    let mut backfills: Vec<(
        herald_operators::state::Backfill,
        herald_operators::dataflow::SegmentPart,
    )> = Vec::new();
    let mut journey_remap: JourneyCarry = (None, Vec::new());
    if let Some(m) = &manifest {
        let why = if m.workers != n {
            Some(format!(
                "it was taken with {} workers and engine.workers is {n}",
                m.workers
            ))
        } else if m.processes != processes {
            Some(format!(
                "it was taken by {} processes and this cluster has {processes}",
                m.processes
            ))
        } else if m.journeys_text != journeys_text
            && m.journeys
            && changes
                .iter()
                .chain(&m.segment_changes)
                .any(|c| c.kind == durable::ChangeKind::Journey)
        {
            Some(
                "the journey file changed since it was taken, and journeys were also changed \
                 through the API: the two cannot be carried over together. Either restore the \
                 journey file it was taken with, or stop Herald, put the API's versions in the \
                 journey file and remove the journey entries (\"kind\": \"journey\") from \
                 checkpoints/DEFINITIONS.json"
                    .to_string(),
            )
        } else if m.definitions != definitions || m.journeys != journeys {
            match carry_over(m, plan, (&journeys_text, journey_set)).and_then(|(r, j)| {
                if r.missing().is_empty() {
                    return Ok((r, j));
                }
                let built = rebuild::new_history(config, plan, &r, m.at)?;
                // Each worker's rebuild must have applied as many events as its state had:
                // checked before anything (the archive's cut) is changed.
                let last = *m.chain.last().unwrap_or(&m.at);
                for (w, b) in built.into_iter().enumerate() {
                    let g = process * n + w;
                    let part: herald_operators::dataflow::SegmentPart =
                        store.read_part(last, &format!("w{g}.segments"))?;
                    rebuild::check_whole(&part, &b, g, m.at)?;
                    backfills.push((b, part));
                }
                Ok((r, j))
            }) {
                Ok((r, j)) => {
                    let journeys_said = match &j.0 {
                        Some(j) => format!(
                            "; journeys changed: {}; removed: {}; new: {} (instances in \
                             progress of a changed or removed journey exit at {})",
                            names(&j.changed),
                            names(&j.removed),
                            names(&j.added),
                            m.at
                        ),
                        None => String::new(),
                    };
                    tracing::info!(
                        "the definitions changed since the checkpoint at {}: its state is \
                         carried over (segments kept: {}; new: {}; dropped: {}; aggregates \
                         and traits rebuilt from the archive: {}{journeys_said}); every \
                         user is evaluated again at {}",
                        m.at,
                        r.kept.len(),
                        names(&r.added),
                        names(&r.dropped),
                        r.missing().len(),
                        m.at
                    );
                    remap = Some(Arc::new(r));
                    journey_remap = j;
                    None
                }
                Err(why) => Some(why),
            }
        } else {
            None
        };
        if let Some(why) = why {
            return Err(EngineError::Usage(format!(
                "config: `checkpoint.dir`: the checkpoint in {dir} cannot be used: {why}. \
                 Start with the definitions and worker count it was taken with, or move the \
                 directory away to start from empty state (then replay the events archive \
                 to rebuild it)"
            )));
        }
        // Torn checkpoints a crash left: process 0 removes them (a cluster's processes
        // share the directory; none writes before they have all started).
        if process == 0 {
            store.remove_after(m.at);
        }
    }
    // A cluster's process 0 leaves a probe that every process must find at start: the
    // check that they share the directory.
    // And every process must run the same definitions.
    let defs = xxhash_rust::xxh3::xxh3_64(definitions.as_bytes()) | 1;
    let probe = match (process, processes) {
        (_, 1) => None,
        (0, _) => {
            let nonce = rand_nonce();
            store.write_probe(nonce).map_err(fail)?;
            Some((store.clone(), nonce, defs))
        }
        _ => Some((store.clone(), 0, defs)),
    };
    let from = manifest.as_ref().map_or(0, |m| m.at);
    let (log, logged) = durable::IngestLog::open(
        &durable::log_dir(std::path::Path::new(&config.checkpoint.log_dir), process),
        from,
    )
    .map_err(|e| EngineError::Usage(format!("config: `checkpoint.log_dir`: {e}")))?;
    let durable::Logged {
        records,
        last,
        positions: logged_positions,
    } = logged;
    let mut positions = durable::Positions::new();
    let mut restored: Vec<Option<durable::WorkerParts>> = (0..n).map(|_| None).collect();
    let mut driver = None;
    let mut traits = Vec::new();
    let mut chain = Vec::new();
    let mut sink_resume = None;
    let start_at = match &manifest {
        Some(m) => {
            let started = std::time::Instant::now();
            // Each worker reads its own parts, in parallel, on its thread.
            let mut backfills = std::mem::take(&mut backfills).into_iter();
            for slot in restored.iter_mut() {
                let (backfill, last_part) = backfills.next().unzip();
                *slot = Some(durable::WorkerParts {
                    store: store.clone(),
                    at: m.at,
                    chain: m.chain.clone(),
                    // A checkpoint taken without journeys has no journey parts.
                    journeys: journeys && m.journeys,
                    remap: remap.clone(),
                    backfill,
                    last_part,
                    journey_remap: journey_remap.0.clone(),
                    journey_seed: journey_remap.1.clone(),
                });
            }
            let mut snapshot = None;
            let mut last_driver = durable::DriverPart::default();
            let mut files = Default::default();
            let mut topics = Default::default();
            for &t in &m.chain {
                let mut d: durable::DriverPart = store
                    .read_part(t, &durable::process_part("driver", process))
                    .map_err(fail)?;
                if let Some(s) = d.snapshot.take() {
                    snapshot = s;
                }
                last_driver = d;
                let s: durable::SinkPart = store
                    .read_part(t, &durable::process_part("sink", process))
                    .map_err(fail)?;
                traits.push((s.full, s.traits));
                files = s.files;
                topics = s.topics;
            }
            positions = std::mem::take(&mut last_driver.kafka);
            driver = Some(worker::RestoredDriver {
                snapshot: snapshot.map(|(at, rows)| (at, Arc::new(rows))),
                new_traits: remap
                    .as_deref()
                    .map(|r| r.new_trait_slots())
                    .unwrap_or_default(),
                audiences: by_new_segment(last_driver.audiences, remap.as_deref()),
                lists: by_new_segment(last_driver.lists, remap.as_deref()),
            });
            if !config.output.dir.is_empty() {
                sink::cut_to_checkpoint(&config.output.dir, &files)?;
            }
            cut_archive(config, m.at, &records)?;
            chain = m.chain.clone();
            sink_resume = Some(topics);
            tracing::info!(
                "restored the checkpoint at {} ({} parts in its chain, {:.0} ms); {} logged events after it",
                m.at,
                m.chain.len(),
                started.elapsed().as_secs_f64() * 1e3,
                records.len()
            );
            m.at
        }
        None if !records.is_empty() => {
            // A crash before the first checkpoint: everything is derived again from the
            // log, so what it derived before is cut.
            if !config.output.dir.is_empty() {
                sink::cut_to_checkpoint(&config.output.dir, &Default::default())?;
            }
            cut_archive(config, records[0].at, &records)?;
            tracing::info!(
                "no checkpoint yet; {} logged events fed again",
                records.len()
            );
            sink_resume = Some(Default::default());
            records[0].at
        }
        None => 0,
    };
    // The batches logged after the checkpoint are fed again from the log: each partition
    // resumes after the last of them.
    positions.extend(logged_positions);
    let replayed = records.len();
    for f in records {
        let w = (herald_operators::dataflow::user_hash(&f.ev.user) % n as u64) as usize;
        let _ = workers[w].send(f);
    }
    let (log_tx, log_rx) = std::sync::mpsc::channel();
    let (ck_tx, ck_rx) = std::sync::mpsc::channel();
    Ok(Recovery {
        log,
        log_tx,
        log_rx,
        log_watermark: (last + 1).max(start_at),
        replayed,
        store,
        ck_tx,
        ck_rx,
        template: durable::Manifest {
            format: durable::FORMAT,
            at: 0,
            chain: Vec::new(),
            workers: n,
            processes,
            journeys,
            definitions,
            segments_text,
            journeys_text,
            segment_changes: changes.to_vec(),
        },
        restored,
        driver,
        traits,
        start_at,
        chain,
        positions,
        sink_resume,
        probe,
        carried_over: remap.is_some(),
    })
}

/// Cuts this process's `[export]` Parquet files back to a checkpoint at `at`: a restart
/// derives again what followed it (`records`, the log's events from `at` on, are fed
/// again), so the copies an earlier run wrote go (`tables::cut_to_checkpoint`; the
/// PostgreSQL load is keyed by each row's identity already).
fn cut_archive(
    config: &Config,
    at: herald_operators::time::Time,
    records: &[durable::Fed],
) -> Result<(), EngineError> {
    use herald_connectors::tables;
    let Some(prefix) = config.export.as_ref().and_then(|x| x.parquet.as_ref()) else {
        return Ok(());
    };
    let writer = format!("part-p{}-", config.processes().0);
    let refed: std::collections::HashSet<String> =
        records.iter().map(|f| f.ev.message_id.clone()).collect();
    // Delivery-outcome rows are partitioned by the outcome's own instant: read from the
    // earliest among the outcome events fed again.
    let refed_from = records
        .iter()
        .filter(|f| tables::outcome_row(&f.ev).is_some())
        .map(|f| f.ev.timestamp)
        .min()
        .unwrap_or(at as i64);
    let removed = tables::cut_to_checkpoint(prefix, &writer, at as i64, &refed, refed_from)
        .map_err(|e| {
            EngineError::Unavailable(format!(
                "`export.parquet`: cutting the tables back to the checkpoint: {e}"
            ))
        })?;
    for (table, n) in removed.into_iter().filter(|(_, n)| *n > 0) {
        tracing::info!(
            "export: {n} rows of {table} removed, from the checkpoint at {at} on (derived \
             again)"
        );
    }
    Ok(())
}

/// How a checkpoint's journeys map to a changed journey file's (None: the file did not
/// change), and the kept segments the journeys now read and did not before.
type JourneyCarry = (
    Option<Arc<herald_operators::journey::machine::JourneyRemap>>,
    Vec<u16>,
);

/// Whether a checkpoint taken with other definitions can be carried over to `plan` and
/// the journey file `journeys_text` (see [`herald_operators::plan::Remap`] and
/// [`herald_operators::journey::machine::JourneyRemap`]); else why not.
fn carry_over(
    m: &durable::Manifest,
    plan: &Plan,
    (journeys_text, new_set): (&str, Option<&herald_operators::journey::JourneySet>),
) -> Result<(herald_operators::plan::Remap, JourneyCarry), String> {
    use herald_operators::journey::{compile_journeys, machine::JourneyRemap, parse_journeys};
    if m.segments_text.is_empty() {
        return Err(
            "the segment or journey file changed since it was taken (by a Herald \
                    that did not keep the files' text with it)"
                .into(),
        );
    }
    if m.journeys && journeys_text.is_empty() {
        return Err(
            "it holds journey state and this config runs no journeys (to end every \
             journey, keep `engine.journeys` and remove the journeys from its file one by \
             one: their instances then exit at the restart)"
                .into(),
        );
    }
    let old = herald_operators::lang::parse::parse_segments(&m.segments_text)
        .map_err(|e| format!("the segment file it was taken with does not parse: {e}"))?;
    let (old_plan, defs) = if !m.journeys {
        (Plan::compile(&old), None)
    } else {
        let defs = parse_journeys(&m.journeys_text)
            .map_err(|e| format!("the journey file it was taken with does not parse: {e}"))?;
        let set = compile_journeys(&old, &defs).map_err(|e| {
            format!(
                "the journey file it was taken with does not compile against its segment file: {e}"
            )
        })?;
        let read = set.segments_read();
        (set.plan.clone(), Some((defs, read, set)))
    };
    // A changed journey file: journeys matched by name.
    let journeys = match &defs {
        Some((old_defs, _, old_set)) if m.journeys_text != journeys_text => {
            let new_defs = parse_journeys(journeys_text)
                .map_err(|e| format!("the journey file does not parse: {e}"))?;
            Some(Arc::new(JourneyRemap::new(old_defs, old_set, &new_defs)))
        }
        _ => None,
    };
    let old_read = defs.as_ref().map(|(_, read, _)| read.clone());
    let defs = defs.map(|(d, _, set)| (d, set, m.journeys_text.as_str()));
    // The changes through the API that were in force at the checkpoint, over its file.
    let mut at_checkpoint = definitions::Catalog::new(old, old_plan, defs);
    if let Some(w) = at_checkpoint
        .replay(&m.segment_changes, None)
        .into_iter()
        .next()
    {
        return Err(format!(
            "the definitions it was taken with cannot be rebuilt: {w}"
        ));
    }
    let old = (*at_checkpoint.plan).clone();
    let remap = plan.remap_from(&old);
    // Kept segments the journeys now read and did not: their members are carried over,
    // so no change at the restart tells the journeys of them.
    let seed = match new_set {
        Some(set) => {
            let mut before = vec![false; plan.segments.len()];
            let mut kept = vec![false; plan.segments.len()];
            for (o, n) in remap.segments.iter().enumerate() {
                if let Some(n) = n {
                    kept[*n] = true;
                    before[*n] |= old_read.as_ref().is_some_and(|r| r.get(o) == Some(&true));
                }
            }
            set.segments_read()
                .iter()
                .enumerate()
                .filter(|(s, read)| **read && kept[*s] && !before[*s])
                .map(|(s, _)| s as u16)
                .collect()
        }
        None => Vec::new(),
    };
    Ok((remap, (journeys, seed)))
}

/// Per-segment state of a driver part (list and audience members), re-keyed to a changed
/// segment file's indices; a segment whose source changed starts empty (the new source's
/// members are fed as new).
fn by_new_segment<T>(
    map: BTreeMap<usize, T>,
    remap: Option<&herald_operators::plan::Remap>,
) -> BTreeMap<usize, T> {
    match remap {
        None => map,
        Some(r) => map
            .into_iter()
            .filter_map(|(seg, v)| Some((r.lists.get(seg).copied().flatten()?, v)))
            .collect(),
    }
}

fn names(list: &[String]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// A number unlikely to repeat across starts (time and process id mixed).
fn rand_nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    xxhash_rust::xxh3::xxh3_64(
        &[t.to_le_bytes(), (std::process::id() as u64).to_le_bytes()].concat(),
    ) | 1
}
