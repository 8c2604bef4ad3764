//! One timely worker of `herald run`: feeds events (HTTP channel and/or its Kafka
//! partitions), snapshots (worker 0) and the wall clock into the segment dataflow, reports
//! the output frontier to the sink, and commits Kafka offsets once their changes are
//! durable. See the module docs of [`crate::live`] for the protocol.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_operators::dataflow::{
    build_segments_live, CheckpointReq, Ctl, Definitions, Durability, JourneyDefinitions,
    SegmentInputs, StateHandle,
};
use herald_operators::eval::CExpr;
use herald_operators::event::Event;
use herald_operators::journey::compile::archived_write;
use herald_operators::journey::machine::JourneyStatus;
use herald_operators::journey::operator::JourneyHandle;
use herald_operators::journey::JOut;
use herald_operators::plan::SnapshotRows;
use herald_operators::state::StateCounters;
use herald_operators::time::Time;
use herald_operators::value::Value;
use herald_operators::why::{Explanation, Preview};
use rdkafka::consumer::{BaseConsumer, CommitMode};
use rdkafka::message::Message;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Inspect, Probe};

use super::durable::{CkMsg, DriverPart, Fed, PartsTo, CHAIN_MAX};
use super::export::ExportMsg;
use super::kafka::{self, KafkaContext};
use super::sink::SinkMsg;
use super::{now_ms, AudienceMsg, Live, SnapshotMsg};
use crate::driver::{feed_list_changes, feed_lists, AudienceFeeder, SnapshotFeeder};

/// Most messages taken from one source per loop turn, so the clock keeps moving.
const MAX_PER_TURN: usize = 8192;

/// Offsets are committed at most this often (and once more at shutdown). Commits cost the
/// broker (measured: committing every 100 ms tripled tansu's fetch latency under load),
/// and what a crash makes redeliver is deduplicated anyway.
const COMMIT_INTERVAL: Duration = Duration::from_millis(1000);

/// How long a stopping worker waits for the frontier to reach its stop instant before
/// taking a stalled frontier (other processes stopped earlier) as final.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long a stopping worker with durable state waits for a frontier that does not move
/// before it gives up on the final checkpoint.
const DURABLE_STOP_STALL: Duration = Duration::from_secs(20);

/// How long shutdown waits for the sink to hand the last changes over.
const SHUTDOWN_SINK_WAIT: Duration = Duration::from_secs(30);

/// A question about the live state, answered by the worker that holds it between two
/// steps of its dataflow (the state is never shared across threads).
pub(crate) enum Query {
    /// Why `user` is or is not in `segment` at `at` (None: as of now).
    Explain {
        user: String,
        segment: String,
        at: Option<Time>,
        reply: tokio::sync::oneshot::Sender<Result<Explanation, QueryError>>,
    },
    /// Where `user` stands in every journey.
    Journeys {
        user: String,
        reply: tokio::sync::oneshot::Sender<Vec<JourneyStatus>>,
    },
    /// A candidate condition's membership on this worker, against segment `current`.
    Preview {
        expr: CExpr,
        current: Option<usize>,
        samples: usize,
        reply: tokio::sync::oneshot::Sender<(Preview, Time)>,
    },
}

/// Why a query has no answer.
#[derive(Debug)]
pub(crate) enum QueryError {
    /// No such (declared) segment.
    NoSegment(String),
    /// The instant is before what the state holds.
    Past(String),
}

/// Which part of a user's history the explanation runs forward through by time alone.
const EXPLAIN_STEPS: usize = 10_000;

/// A definitions change for worker 0 to feed at its current instant.
pub(crate) struct DefineReq {
    /// What to feed.
    pub feed: Feed,
    /// The change's position in the catalog's changes (its instant is recorded there).
    pub change: usize,
    /// Told the instant it takes effect at.
    pub reply: tokio::sync::oneshot::Sender<Time>,
}

/// What a [`DefineReq`] feeds.
pub(crate) enum Feed {
    /// Switch to this definitions version.
    Define(u64),
    /// Pause (true) or resume journey `j`.
    Pause(u16, bool),
}

/// Channels the workers take theirs from, by local index.
pub(crate) struct WorkerIo {
    pub events: Vec<Option<Receiver<Fed>>>,
    /// Per local worker, its queries.
    pub queries: Vec<Option<Receiver<Query>>>,
    /// Worker 0's definitions changes.
    pub defines: Option<Receiver<DefineReq>>,
    pub snapshots: Option<Receiver<SnapshotMsg>>,
    pub audiences: Option<Receiver<AudienceMsg>>,
    /// Per local worker, the checkpoint parts to start from.
    pub restored: Vec<Option<super::durable::WorkerParts>>,
    /// Worker 0's feeders as the checkpoint left them.
    pub driver: Option<RestoredDriver>,
    /// The instant the dataflow starts at (0: now).
    pub start_at: Time,
    /// The restored checkpoint's chain (empty: none).
    pub chain: Vec<Time>,
    /// A durable cluster: the store and process 0's probe nonce (see [`ClusterDurable::agree`]).
    pub probe: Option<(super::durable::Store, u64, u64)>,
}

/// What worker 0 feeds from, as a checkpoint left it.
pub(crate) struct RestoredDriver {
    pub snapshot: Option<(i64, Arc<SnapshotRows>)>,
    /// Trait slots a changed segment file reads and the state lacks: their cells of the
    /// last snapshot are fed at the restart.
    pub new_traits: Vec<u32>,
    pub audiences: BTreeMap<usize, BTreeSet<String>>,
    pub lists: BTreeMap<usize, BTreeSet<String>>,
}

/// Offsets to commit once the instant they were fed at is durable.
type Pending = VecDeque<(Time, BTreeMap<(String, i32), i64>)>;

/// What each process of a cluster tells the others, through a small broadcast dataflow
/// fed by each process's local worker 0 (outside a cluster, [`Live`] itself says it):
///
/// * how far its sink is durable, so that a worker commits an offset only once the
///   changes its event caused are handed over wherever they were emitted (state is
///   partitioned by user across processes, so they may be emitted by another process's
///   sink);
/// * with durable state, how far its ingest log is synced (a sink releases nothing
///   derived from an event some process could still lose), that it is stopping (a stop
///   signal to one process stops the cluster), and, from process 0, the instant of the
///   final checkpoint every process stops after.
type Report = (usize, u8, Time);
const DURABLE: u8 = 0;
const SYNCED: u8 = 1;
const STOPPING: u8 = 2;
const FINAL: u8 = 3;
/// At start (see [`ClusterDurable::agree`]): the restored checkpoint's instant + 1 (1:
/// none), and process 0's probe nonce.
const RESTORED: u8 = 4;
const PROBE: u8 = 5;
/// A worker of the process failed: no checkpoint can complete, every process stops at
/// once (a timely cluster ends only when all its processes do).
const FAILED: u8 = 6;
/// At start: a hash of the process's definition files (they must be the same).
const DEFS: u8 = 7;
const KINDS: usize = 8;

/// How long a durable cluster's processes wait at start to hear from each other.
const AGREE_WAIT: Duration = Duration::from_secs(60);

/// How long a process looks for process 0's probe (a network file system may show a
/// rewritten file late).
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// The input of the report dataflow.
type ReportInput =
    timely::dataflow::InputHandle<Time, timely::container::CapacityContainerBuilder<Vec<Report>>>;

struct ClusterDurable {
    input: Option<ReportInput>,
    /// Per process, the latest of each report.
    seen: Rc<RefCell<Vec<[Time; KINDS]>>>,
    process: usize,
    reported: [Time; KINDS],
}

impl ClusterDurable {
    fn new(worker: &mut timely::worker::Worker, live: &Live) -> ClusterDurable {
        let Some(cluster) = &live.config.cluster else {
            return ClusterDurable {
                input: None,
                seen: Rc::default(),
                process: 0,
                reported: [0; KINDS],
            };
        };
        let seen: Rc<RefCell<Vec<[Time; KINDS]>>> =
            Rc::new(RefCell::new(vec![[0; KINDS]; cluster.addresses.len()]));
        let sink = Rc::clone(&seen);
        let input = worker.dataflow::<Time, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<Report>>();
            stream.broadcast().inspect(move |(p, kind, d): &Report| {
                if let Some(x) = sink
                    .borrow_mut()
                    .get_mut(*p)
                    .and_then(|r| r.get_mut(*kind as usize))
                {
                    *x = (*x).max(*d);
                }
            });
            input
        });
        ClusterDurable {
            input: Some(input),
            seen,
            process: cluster.process,
            reported: [0; KINDS],
        }
    }

    /// Every worker: tells the others once when a worker of this process has failed
    /// (local worker 0 may be the one that failed).
    fn report_failure(&mut self, live: &Live) {
        let Some(input) = &mut self.input else { return };
        if self.reported[FAILED as usize] == 0 && live.worker_failed.load(Ordering::Acquire) {
            self.reported[FAILED as usize] = 1;
            input.send((self.process, FAILED, 1));
            input.flush();
        }
    }

    /// Local worker 0: tells every worker how far this process is, and takes up what the
    /// others said.
    fn report(&mut self, live: &Live, now: Time) {
        let Some(input) = &mut self.input else { return };
        let durable_state = live.log.is_some();
        let mine = [
            live.durable.load(Ordering::Acquire),
            if durable_state {
                live.log_synced.load(Ordering::Acquire)
            } else {
                0
            },
            if durable_state {
                live.stop_at.load(Ordering::Acquire)
            } else {
                0
            },
            if durable_state && self.process == 0 {
                live.final_checkpoint.load(Ordering::Acquire)
            } else {
                0
            },
        ];
        for (kind, (&d, r)) in mine.iter().zip(self.reported.iter_mut()).enumerate() {
            if d > *r {
                *r = d;
                input.send((self.process, kind as u8, d));
            }
        }
        if *input.time() < now {
            input.advance_to(now);
        }
        let seen = self.seen.borrow();
        if seen.iter().any(|r| r[FAILED as usize] != 0)
            && !live.worker_failed.load(Ordering::Acquire)
        {
            tracing::error!("a worker of another process of the cluster failed: stopping");
            live.worker_failed.store(true, Ordering::Release);
            let _ = live
                .stop_at
                .compare_exchange(0, now_ms(), Ordering::AcqRel, Ordering::Acquire);
        }
        if !durable_state {
            return;
        }
        let synced = seen.iter().map(|r| r[SYNCED as usize]).min().unwrap_or(0);
        live.cluster_synced.fetch_max(synced, Ordering::AcqRel);
        if seen.iter().any(|r| r[STOPPING as usize] != 0) && !live.stopping() {
            tracing::info!("another process of the cluster is stopping: stopping too");
            let stop = now_ms() + live.config.engine.tick_ms;
            let _ = live
                .stop_at
                .compare_exchange(0, stop, Ordering::AcqRel, Ordering::Acquire);
        }
        let f = seen.first().map_or(0, |r| r[FINAL as usize]);
        if self.process != 0 && f != 0 {
            let _ =
                live.final_checkpoint
                    .compare_exchange(0, f, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// A durable cluster at start, on every worker: every process must have restored the
    /// same checkpoint (each picks the latest complete one on its own, and one that
    /// raced a commit could pick another), and every process must see process 0's probe
    /// in the checkpoint directory (else they do not share it, and no checkpoint could
    /// ever complete). Either failing stops the start with the reason.
    fn agree(
        &mut self,
        worker: &mut timely::worker::Worker,
        local: usize,
        restored: Option<Time>,
        probe: Option<&(super::durable::Store, u64, u64)>,
    ) -> Result<(), String> {
        let result = self.agree_inner(worker, local, restored, probe);
        if result.is_err() {
            // The others stop at once rather than wait for this process.
            if let Some(input) = &mut self.input {
                input.send((self.process, FAILED, 1));
                input.flush();
            }
            let until = Instant::now() + STOP_GRACE / 4;
            while Instant::now() < until {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
        }
        result
    }

    fn agree_inner(
        &mut self,
        worker: &mut timely::worker::Worker,
        local: usize,
        restored: Option<Time>,
        probe: Option<&(super::durable::Store, u64, u64)>,
    ) -> Result<(), String> {
        let (Some(input), Some((store, nonce, defs))) = (&mut self.input, probe) else {
            return Ok(());
        };
        if local == 0 {
            input.send((self.process, RESTORED, restored.map_or(1, |t| t + 1)));
            input.send((self.process, DEFS, *defs));
            if self.process == 0 {
                input.send((0, PROBE, *nonce));
            }
            input.flush();
        }
        let started = Instant::now();
        let heard = |seen: &Vec<[Time; KINDS]>| {
            seen.iter()
                .all(|r| r[RESTORED as usize] != 0 && r[DEFS as usize] != 0)
                && seen.first().is_some_and(|r| r[PROBE as usize] != 0)
        };
        while !heard(&self.seen.borrow()) {
            if started.elapsed() > AGREE_WAIT {
                return Err(format!(
                    "the other processes of the cluster did not report their checkpoint \
                     within {AGREE_WAIT:?}"
                ));
            }
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        let seen = self.seen.borrow();
        let at: Vec<Time> = seen.iter().map(|r| r[RESTORED as usize] - 1).collect();
        if at.iter().any(|&t| t != at[0]) {
            return Err(format!(
                "the processes restored different checkpoints (by process, 0 for none: \
                 {at:?}), which happens when one started while another was still committing \
                 one: stop every process, then start them all again"
            ));
        }
        if seen
            .iter()
            .any(|r| r[DEFS as usize] != seen[0][DEFS as usize])
        {
            return Err(
                "the processes of the cluster run different segment or journey files: \
                        every process must run the same ones"
                    .into(),
            );
        }
        if self.process > 0 && local == 0 {
            let want = seen[0][PROBE as usize];
            let looking = Instant::now();
            loop {
                let (found, location) = store.read_probe();
                let found = found?;
                if found == Some(want) {
                    break;
                }
                if looking.elapsed() > PROBE_WAIT {
                    return Err(format!(
                        "`checkpoint.dir` is not shared with process 0: the probe it wrote at \
                         {location} is not visible from this process ({found:?}, expected \
                         {want}); in a cluster every process must use one location (an s3:// \
                         prefix or a network file system), or \"\" to run without durable state"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Changes at instants below this are durable in every process.
    fn committable(&self, live: &Live) -> Time {
        match &self.input {
            None => live.durable.load(Ordering::Acquire),
            Some(_) => self
                .seen
                .borrow()
                .iter()
                .map(|r| r[DURABLE as usize])
                .min()
                .unwrap_or(0),
        }
    }
}

/// Runs one worker until shutdown. An error stops the whole service.
pub(crate) fn run_worker(
    worker: &mut timely::worker::Worker,
    live: Arc<Live>,
    io: &Mutex<WorkerIo>,
) -> Result<(), String> {
    let result = run(worker, &live, io);
    if let Err(e) = &result {
        // Drop rather than drain: draining would emit every pending lapse at once.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
        tracing::error!("worker {}: {e}", worker.index());
        live.worker_failed.store(true, Ordering::Release);
        let _ = live
            .stop_at
            .compare_exchange(0, now_ms(), Ordering::AcqRel, Ordering::Acquire);
    }
    result
}

fn run(
    worker: &mut timely::worker::Worker,
    live: &Arc<Live>,
    io: &Mutex<WorkerIo>,
) -> Result<(), String> {
    let index = worker.index();
    let local_workers = live.config.engine.workers;
    let local = index % local_workers;
    let (
        events_rx,
        snapshots_rx,
        audiences_rx,
        restored,
        driver,
        start_at,
        mut chain,
        cluster_probe,
        queries_rx,
        defines_rx,
    ) = {
        let mut io = io
            .lock()
            .map_err(|_| "worker channels poisoned".to_string())?;
        let queries = io.queries.get_mut(local).and_then(Option::take);
        let defines = if index == 0 { io.defines.take() } else { None };
        let ev = io.events.get_mut(local).and_then(Option::take);
        let restored = io.restored.get_mut(local).and_then(Option::take);
        let (start_at, chain, probe) = (io.start_at, io.chain.clone(), io.probe.clone());
        if index == 0 {
            (
                ev,
                io.snapshots.take(),
                io.audiences.take(),
                restored,
                io.driver.take(),
                start_at,
                chain,
                probe,
                queries,
                defines,
            )
        } else {
            (
                ev, None, None, restored, None, start_at, chain, probe, queries, defines,
            )
        }
    };
    // This worker's parts, read here so that the workers read theirs in parallel.
    let (restored, writes) = match restored {
        Some(p) => {
            let (r, w) = p.read(index).map_err(|e| format!("restoring: {e}"))?;
            (Some(r), w)
        }
        None => (None, Vec::new()),
    };
    let was_restored = restored.is_some();
    let (process, _) = live.config.processes();
    let durability = live.checkpointer.as_ref().map(|tx| Durability {
        parts: Rc::new(PartsTo {
            worker: index,
            tx: tx.clone(),
            on_part: (local == 0 && process > 0).then(|| process_parts(live, tx.clone())),
        }),
        restored,
        journeys_paused: live
            .defs
            .read()
            .map(|d| d.paused_journeys())
            .unwrap_or_default(),
    });
    let checkpoint_every = live
        .config
        .checkpoint_every_ms()
        .map_err(|e| e.to_string())?;
    let tick = Duration::from_millis(live.config.engine.tick_ms);

    let plan = Rc::new(live.plan.clone());
    let dedup_horizon_ms = live.config.dedup_horizon_ms().map_err(|e| e.to_string())?;
    let probe = ProbeHandle::new();
    let sink = live.sink.clone();
    let mut state = None;
    let mut journey_state: Option<JourneyHandle> = None;
    let mut inputs: SegmentInputs = worker.dataflow::<Time, _, _>(|scope| {
        let journeys = live.journeys.clone().map(Rc::new);
        // A definitions change's plan, by version, from the catalog (kept until every
        // worker has switched to it).
        let defs_live = Arc::clone(live);
        let definitions: Definitions = Rc::new(move |v| {
            let plan = defs_live.defs.read().ok()?.plan_of(v)?;
            Some((*plan).clone())
        });
        let defs_live = Arc::clone(live);
        let journey_definitions: JourneyDefinitions = Rc::new(move |v| {
            let set = defs_live.defs.read().ok()?.journeys_of(v)?;
            Some(Rc::new((*set).clone()))
        });
        let (inputs, outputs) = build_segments_live(
            scope,
            plan.clone(),
            dedup_horizon_ms,
            journeys,
            durability,
            Some(definitions),
            Some(journey_definitions),
        );
        if let Some(j) = outputs.journeys {
            let sink = live.sink.clone();
            let export = live.export.clone();
            j.inspect_core(move |x| {
                let Ok((t, data)) = x else { return };
                let t = *t.expect_singleton();
                for o in data.iter() {
                    match o {
                        // A trait write is an event the state applies at `at`: the archive
                        // keeps it, for rebuilds.
                        JOut::Write(ev, at) => {
                            if let Some(x) = &export {
                                let _ = x.send(ExportMsg::Event(
                                    Box::new(archived_write(ev)),
                                    *at as i64,
                                ));
                            }
                        }
                        _ => {
                            let _ = sink.send(SinkMsg::Journey(t, o.clone()));
                        }
                    }
                }
            })
            .probe_with(&probe);
        }
        state = Some(outputs.state);
        journey_state = outputs.journey_state;
        let changes = outputs.changes;
        changes
            .inspect(move |((seg, user), t, r)| {
                let _ = sink.send(SinkMsg::Change {
                    segment: *seg,
                    user: user.clone(),
                    time: *t,
                    diff: *r as i64,
                });
            })
            .probe_with(&probe);
        inputs
    });

    let mut durable = ClusterDurable::new(worker, live);
    durable.agree(worker, local, chain.last().copied(), cluster_probe.as_ref())?;
    let mut cur: Time = if start_at > 0 { start_at } else { now_ms() };
    inputs.advance_to(cur);
    let mut snapshots = SnapshotFeeder::default();
    let mut audiences = AudienceFeeder::default();
    if index == 0 {
        match driver {
            None => {
                inputs.set_snapshot_clock(None, i64::MIN);
                feed_lists(&plan, &mut inputs, &live.lists);
            }
            Some(d) => {
                // A list file edited between runs: its difference, now.
                let n = feed_list_changes(&plan, &mut inputs, &d.lists, &live.lists);
                if n > 0 {
                    tracing::info!("{n} list memberships changed since the checkpoint");
                }
                snapshots = SnapshotFeeder::restored(d.snapshot);
                let n = snapshots.feed_new_traits(&plan, &mut inputs, &d.new_traits);
                if n > 0 {
                    tracing::info!("{n} snapshot cells of new traits fed from the last snapshot");
                }
                audiences = AudienceFeeder::restored(d.audiences);
            }
        }
    }
    // The journeys' trait writes that were on their way into the state at the checkpoint
    // (the archive's copies, at this instant, were cut with what followed it).
    for ev in writes {
        if let Some(x) = &live.export {
            let _ = x.send(ExportMsg::Event(Box::new(archived_write(&ev)), cur as i64));
        }
        let keep = live.journeys.as_ref().is_some_and(|j| j.wants(&ev));
        inputs.events.update(live.plan.project(ev, keep), 1);
    }
    inputs.flush();
    if was_restored {
        // The query API's memberships, from the restored state.
        if let Some(st) = &state {
            let mut pairs = Vec::new();
            st.for_each_member(live.plan.visible, &mut |user, seg| {
                pairs.push((user.to_string(), seg));
            });
            let built = super::state::RestoredMembers::build(live.plan.visible, pairs);
            if let Ok(mut ls) = live.state.write() {
                ls.add_restored(built);
            }
        }
    }
    live.workers_ready.fetch_add(1, Ordering::AcqRel);
    // Worker 0 asks for checkpoints; what changed in the snapshot since the last one.
    // The first at once: from then on a crash never finds the state directory without a
    // checkpoint (whose sink part bounds what a restart reads back from the topics).
    let mut next_checkpoint = if chain.is_empty() {
        cur
    } else {
        cur + checkpoint_every
    };
    let mut snapshot_changed = chain.is_empty();
    let mut final_requested = false;
    let mut fed_at_cur = false;
    // The instant of the last checkpoint asked for (0: none this run).
    let mut requested: Time = 0;

    // With durable state the Kafka reader feeds the workers through the ingest log.
    let consumer: Option<BaseConsumer<KafkaContext>> = match (&live.config.kafka, &live.log) {
        (Some(k), None) => Some(kafka::consumer(k, Arc::clone(live)).map_err(|e| e.to_string())?),
        _ => None,
    };
    let mut pending: Pending = VecDeque::new();
    let mut last_frontier: Time = 0;
    let mut last_error_log = Instant::now() - Duration::from_secs(60);
    let mut identify: Vec<TraitWrites> = Vec::new();
    let mut stop_seen: Option<Instant> = None;
    let mut last_commit = Instant::now();
    let mut stalled_at: (Time, Instant) = (0, Instant::now());
    let mut counted = StateCounters::default();

    loop {
        let stop_at = live.stop_at.load(Ordering::Acquire);
        let stopping = stop_at != 0;

        // Read before taking events: every event stamped below it is in the channel.
        let log_watermark = live.log_watermark.load(Ordering::Acquire);
        // Whether every event in the channel was taken this turn.
        let mut drained = true;
        let durable_stop = live.checkpointer.is_some();
        // Events from HTTP (embedded mode): always drained, so nothing accepted is lost.
        if let Some(rx) = &events_rx {
            let most = if stopping { usize::MAX } else { MAX_PER_TURN };
            drained = false;
            let mut taken = 0;
            for _ in 0..most {
                match rx.try_recv() {
                    Ok(Fed { at, ev }) => {
                        taken += 1;
                        // After the final checkpoint: fed again from the log at the next
                        // start. Worker 0 takes its instant at or after `stop_at` and
                        // feeds nothing from `stop_at` on; the others feed everything
                        // until they know it (what they feed at or after it is after the
                        // checkpoint either way).
                        let after_final = match live.final_checkpoint.load(Ordering::Acquire) {
                            0 => index == 0 && at >= stop_at,
                            f => at >= f,
                        };
                        if stopping && durable_stop && after_final {
                            continue;
                        }
                        if at > cur {
                            cur = at;
                            inputs.advance_to(cur);
                        }
                        fed_at_cur = true;
                        // The archive's `received_at` is the log stamp (0: no log), the
                        // instant the dataflow applies it at: a rebuild from the archive
                        // needs it.
                        let received = if at > 0 { at as i64 } else { now_ms() as i64 };
                        feed(live, &mut inputs, ev, &mut identify, received)
                    }
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {
                        drained = true;
                        break;
                    }
                }
            }
            live.queued.fetch_sub(taken, Ordering::AcqRel);
        }
        // Events from this worker's Kafka partitions.
        if let (Some(c), false) = (&consumer, stopping) {
            let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
            for _ in 0..MAX_PER_TURN {
                match c.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(m)) => {
                        let topic = m.topic().to_string();
                        let (partition, offset) = (m.partition(), m.offset());
                        let payload = m.payload().unwrap_or(&[]);
                        let received = m.timestamp().to_millis().unwrap_or(cur as i64);
                        accept_kafka(
                            live,
                            &mut inputs,
                            &mut identify,
                            payload,
                            received,
                            (&topic, partition, offset),
                        );
                        offsets.insert((topic, partition), offset + 1);
                    }
                    Some(Err(e)) => {
                        live.metrics.error("kafka_consumer");
                        if last_error_log.elapsed() > Duration::from_secs(5) {
                            tracing::warn!("worker {index}: Kafka consumer: {e} (retrying)");
                            last_error_log = Instant::now();
                        }
                        break;
                    }
                }
            }
            if !offsets.is_empty() {
                pending.push_back((cur, offsets));
            }
        }
        record_traits(live, &mut identify);
        // Snapshots (worker 0).
        if let Some(rx) = &snapshots_rx {
            while let Ok(snap) = rx.try_recv() {
                let profiles = snap.rows.len();
                let n = snapshots.apply(&plan, &mut inputs, snap.at, snap.rows);
                snapshot_changed = true;
                live.metrics.snapshots_applied.inc();
                tracing::info!(
                    "applied snapshot {} ({profiles} profiles, {n} fact updates)",
                    snap.location
                );
            }
        }
        // Warehouse audience results (worker 0).
        if let Some(rx) = &audiences_rx {
            while let Ok(msg) = rx.try_recv() {
                let (entered, left) = audiences.apply(&plan, &mut inputs, msg.segment, msg.members);
                tracing::info!(
                    "applied warehouse audience '{}' ({entered} entered, {left} left)",
                    plan.segments[msg.segment].name
                );
            }
        }
        // Definitions changes (worker 0): in force from the current instant on; the
        // checkpointer hears of them before any part of a later checkpoint.
        if let (Some(rx), false) = (&defines_rx, stopping) {
            while let Ok(d) = rx.try_recv() {
                // In the catalog before any change of the new version can reach the sink
                // (it labels each change with the version in force at its instant).
                let changes = match live.defs.write() {
                    Ok(mut defs) => {
                        defs.set_effective_of(d.change, cur);
                        defs.changes.clone()
                    }
                    Err(_) => return Err("the definitions catalog is poisoned".into()),
                };
                live.defs_version.fetch_add(1, Ordering::AcqRel);
                if let Some(tx) = &live.checkpointer {
                    let _ = tx.send(CkMsg::Definitions(cur, changes));
                }
                inputs.ctl.update(
                    match d.feed {
                        Feed::Define(v) => Ctl::Define(v),
                        Feed::Pause(journey, paused) => Ctl::Pause { journey, paused },
                    },
                    1,
                );
                fed_at_cur = true;
                let _ = d.reply.send(cur);
            }
        }
        // The clock: never past the log watermark read above, nor (stopping) past the
        // stop instant, or with durable state the final checkpoint's instant + 1.
        let now = now_ms().min(log_watermark);
        // With the log, events still in the channel are stamped below the watermark read
        // above: the clock must not pass them before they are fed (next turn).
        let now = if durable_stop && !drained { cur } else { now };
        let final_ck = live.final_checkpoint.load(Ordering::Acquire);
        let target = match (stopping, durable_stop) {
            (false, _) => now,
            (true, false) => now.min(stop_at),
            // Not past an event still on its way (stamped before the final checkpoint,
            // it belongs in it): `now` holds the log watermark read before the drain.
            (true, true) if final_ck != 0 => (final_ck + 1).min(now),
            (true, true) if index == 0 && cur >= stop_at => cur + 1,
            (true, true) if index == 0 => now.min(stop_at),
            // Until worker 0 has chosen the final checkpoint's instant.
            (true, true) => now,
        };
        let mut advanced = false;
        if target > cur {
            cur = target;
            inputs.advance_to(cur);
            advanced = true;
            fed_at_cur = false;
        }
        // Checkpoints (worker 0): at an instant nothing has been fed at yet.
        if index == 0 && durable_stop && advanced && !fed_at_cur && !final_requested {
            let last = stopping && cur >= stop_at;
            // The next one only once the one before is complete (with `[export]`, that
            // waits for the archive).
            let previous_done = live.checkpointed.load(Ordering::Acquire) >= requested;
            if (cur >= next_checkpoint && previous_done) || last {
                let full = chain.is_empty()
                    || chain.len() >= CHAIN_MAX
                    || live.checkpoint_full_next.swap(false, Ordering::AcqRel);
                let since = chain.last().copied().unwrap_or(0);
                inputs.request_checkpoint(CheckpointReq { full, since });
                if full {
                    chain.clear();
                }
                chain.push(cur);
                live.to_sink(SinkMsg::Checkpoint(cur, full));
                let snapshot = (full || snapshot_changed)
                    .then(|| snapshots.prev().map(|(at, rows)| (*at, (**rows).clone())));
                snapshot_changed = false;
                if let Some(tx) = &live.checkpointer {
                    let part = DriverPart {
                        snapshot,
                        audiences: audiences.prev().clone(),
                        lists: live.lists.clone(),
                        kafka: positions_before(live, cur),
                    };
                    let _ = tx.send(CkMsg::Driver(cur, chain.clone(), Box::new(part)));
                }
                next_checkpoint = cur + checkpoint_every;
                requested = cur;
                if last {
                    final_requested = true;
                    live.final_checkpoint.store(cur, Ordering::Release);
                }
            }
        }
        inputs.flush();
        worker.step_or_park(Some(tick));
        report_counters(live, state.as_ref(), &mut counted);
        if let (Some(rx), Some(st)) = (&queries_rx, &state) {
            while let Ok(q) = rx.try_recv() {
                answer(q, st, journey_state.as_ref(), cur);
            }
        }

        // Progress: local worker 0 tells its process's sink how far the output is done.
        let frontier = probe.with_frontier(|f| f.iter().min().copied().unwrap_or(Time::MAX));
        if frontier > last_frontier {
            last_frontier = frontier;
            if local == 0 {
                live.frontier.store(frontier, Ordering::Release);
                live.metrics
                    .frontier_delay_ms
                    .set(now_ms().saturating_sub(frontier) as i64);
                live.to_sink(SinkMsg::Watermark(frontier));
            }
        }
        if local == 0 {
            durable.report(live, cur);
        }
        durable.report_failure(live);
        if let (Some(c), true) = (&consumer, last_commit.elapsed() >= COMMIT_INTERVAL) {
            last_commit = Instant::now();
            commit_durable(
                c,
                &mut pending,
                live,
                durable.committable(live),
                CommitMode::Async,
            );
        }
        if stopping {
            let seen = *stop_seen.get_or_insert_with(Instant::now);
            if durable_stop {
                let f = live.final_checkpoint.load(Ordering::Acquire);
                if f != 0 && frontier > f {
                    break;
                }
                if live.worker_failed.load(Ordering::Acquire) {
                    tracing::warn!("worker {index}: a worker failed: no final checkpoint");
                    break;
                }
                // A frontier that no longer moves (a worker somewhere failed and dropped
                // its dataflow): the final checkpoint cannot complete; the next start
                // resumes from the last complete one.
                if frontier > stalled_at.0 {
                    stalled_at = (frontier, Instant::now());
                } else if stalled_at.1.elapsed() > DURABLE_STOP_STALL {
                    tracing::warn!(
                        "worker {index}: the frontier stayed at {frontier} for \
                         {DURABLE_STOP_STALL:?} while stopping: no final checkpoint"
                    );
                    break;
                }
                continue;
            }
            if frontier >= stop_at {
                break;
            }
            // In a cluster, other processes may have stopped their clocks at an earlier
            // instant: once the frontier stalls, the stop instant is where it stalled.
            if frontier > stalled_at.0 {
                stalled_at = (frontier, Instant::now());
            } else if live.config.cluster.is_some()
                && cur >= stop_at
                && seen.elapsed() > STOP_GRACE
                && stalled_at.1.elapsed() > STOP_GRACE / 4
            {
                tracing::info!(
                    "worker {index}: the frontier stopped at {frontier}, before this process's stop instant {stop_at}"
                );
                break;
            }
        }
    }

    // Shutdown: wait until the sink has handed over everything up to where the frontier
    // stopped.
    let stop_at = live.stop_at.load(Ordering::Acquire).min(last_frontier);
    // A durable cluster: until this process's sink has passed the final checkpoint (its
    // release waits for every process's log, which this loop keeps hearing about).
    let final_ck = live.final_checkpoint.load(Ordering::Acquire);
    let durable_stop = live.checkpointer.is_some();
    let released_past = |live: &Live| {
        live.config.cluster.is_none()
            || !durable_stop
            || final_ck == 0
            || live.released.load(Ordering::Acquire) > final_ck
    };
    if local == 0 {
        live.to_sink(SinkMsg::Watermark(last_frontier));
    }
    let started = Instant::now();
    // In a cluster, also until every process's sink has confirmed what this worker fed
    // (their reports arrive through the broadcast dataflow, so keep stepping it).
    let needed = pending.back().map_or(0, |(t, _)| t + 1);
    let mut done_at: Option<Instant> = None;
    loop {
        let local_done = live.durable.load(Ordering::Acquire) >= stop_at && released_past(live);
        let cluster_done = durable.committable(live) >= needed;
        if local_done {
            let since = done_at.get_or_insert_with(Instant::now).elapsed();
            // Keep reporting a little longer, so the other processes see this one's
            // final durable frontier before it goes.
            if cluster_done && (live.config.cluster.is_none() || since > STOP_GRACE / 4) {
                break;
            }
            // Events fed after the instant the whole cluster stopped at are never
            // processed; their offsets stay uncommitted and are consumed again later.
            if !cluster_done && since > STOP_GRACE {
                tracing::info!(
                    "worker {index}: some events were fed after the cluster's stop instant; \
                     their offsets stay uncommitted"
                );
                break;
            }
        }
        if local == 0 {
            durable.report(live, cur);
        }
        durable.report_failure(live);
        // A failed worker: keep stepping only long enough for the report to go out.
        if live.worker_failed.load(Ordering::Acquire) && started.elapsed() > STOP_GRACE / 4 {
            break;
        }
        if live.sink_failed.load(Ordering::Acquire) {
            tracing::warn!(
                "worker {index}: the sink failed; offsets not confirmed stay uncommitted"
            );
            break;
        }
        if started.elapsed() > SHUTDOWN_SINK_WAIT {
            tracing::warn!(
                "worker {index}: sinks did not confirm within {SHUTDOWN_SINK_WAIT:?}; \
                 offsets left uncommitted will be redelivered"
            );
            break;
        }
        worker.step_or_park(Some(tick));
        report_counters(live, state.as_ref(), &mut counted);
    }
    if let Some(c) = &consumer {
        commit_durable(
            c,
            &mut pending,
            live,
            durable.committable(live),
            CommitMode::Sync,
        );
        if !pending.is_empty() {
            tracing::warn!(
                "worker {index}: {} batches of offsets not committed (their changes were not confirmed)",
                pending.len()
            );
        }
    }
    // Future instants are not asked for: drop the dataflow rather than drain it (draining
    // would emit every pending lapse at once).
    for id in worker.installed_dataflows() {
        worker.drop_dataflow(id);
    }
    Ok(())
}

/// Local worker 0 of a cluster's process other than 0: at each of its segment parts, asks
/// the sink for its part and sends the checkpointer this process's driver part (its Kafka
/// positions; process 0's driver part holds what only process 0 feeds).
fn process_parts(live: &Arc<Live>, tx: std::sync::mpsc::Sender<CkMsg>) -> Box<dyn Fn(Time, bool)> {
    let live = Arc::clone(live);
    Box::new(move |at, full| {
        live.to_sink(SinkMsg::Checkpoint(at, full));
        let part = DriverPart {
            kafka: positions_before(&live, at),
            ..Default::default()
        };
        let _ = tx.send(CkMsg::Driver(at, Vec::new(), Box::new(part)));
    })
}

/// Kafka mode: the positions after every batch logged before `at` (the history's older
/// entries are dropped; the one returned stays for the next checkpoint).
fn positions_before(live: &Live, at: Time) -> super::durable::Positions {
    let Ok(mut h) = live.kafka_history.lock() else {
        return Default::default();
    };
    while h.len() >= 2 && h[1].0 < at {
        h.pop_front();
    }
    match h.front() {
        Some((t, p)) if *t < at => p.clone(),
        // No Kafka (the history starts with the positions the run resumed from).
        _ => Default::default(),
    }
}

/// An identify's trait writes, kept for the query API: `(user, timestamp, writes)`.
type TraitWrites = (String, i64, Vec<(String, Value)>);

/// Feeds an accepted event (received at `received`, ms) to the dataflow at the inputs'
/// current instant, and to the events archive when `[export]` is on.
fn feed(
    live: &Live,
    inputs: &mut SegmentInputs,
    ev: Event,
    identify: &mut Vec<TraitWrites>,
    received: i64,
) {
    if let Some(x) = &live.export {
        let _ = x.send(ExportMsg::Event(Box::new(ev.clone()), received));
    }
    let writes = ev.trait_writes();
    if !writes.is_empty() {
        identify.push((ev.user.clone(), ev.timestamp, writes));
    }
    let keep = live.journeys.as_ref().is_some_and(|j| j.wants(&ev));
    inputs.events.update(live.plan.project(ev, keep), 1);
}

/// Records identify traits for the query API, one lock per loop turn.
fn record_traits(live: &Live, identify: &mut Vec<TraitWrites>) {
    if identify.is_empty() {
        return;
    }
    if let Ok(mut state) = live.state.write() {
        for (user, ts, writes) in identify.drain(..) {
            for (name, v) in writes {
                state.write_trait(&user, &name, v.to_json(), ts);
            }
        }
    }
    identify.clear();
}

/// Parses one Kafka message; feeds its events, dead-letters its rejections.
fn accept_kafka(
    live: &Live,
    inputs: &mut SegmentInputs,
    identify: &mut Vec<TraitWrites>,
    payload: &[u8],
    received: i64,
    at: (&str, i32, i64),
) {
    for ev in kafka::parse_record(live, payload, received, at) {
        feed(live, inputs, ev, identify, received);
    }
}

/// Commits the offsets of every batch fed at an instant below the durable frontier.
fn commit_durable(
    consumer: &BaseConsumer<KafkaContext>,
    pending: &mut Pending,
    live: &Live,
    durable: Time,
    mode: CommitMode,
) {
    let mut merged: BTreeMap<(String, i32), i64> = BTreeMap::new();
    while pending.front().is_some_and(|(t, _)| *t < durable) {
        if let Some((_, offsets)) = pending.pop_front() {
            for (k, o) in offsets {
                let e = merged.entry(k).or_insert(o);
                *e = (*e).max(o);
            }
        }
    }
    if !merged.is_empty() {
        kafka::commit_offsets(consumer, &merged, mode, live);
    }
}

/// Answers a query from this worker's state. Every instant before `cur` may have been
/// processed, none at or after it: the state is brought to `cur - 1` or later.
fn answer(q: Query, st: &StateHandle, journeys: Option<&JourneyHandle>, cur: Time) {
    let now = cur.saturating_sub(1);
    match q {
        Query::Explain {
            user,
            segment,
            at,
            reply,
        } => {
            let plan = st.plan();
            let result = match plan.segments[..plan.visible]
                .iter()
                .position(|s| s.name == segment)
            {
                None => Err(QueryError::NoSegment(segment)),
                Some(_) if at.is_some_and(|a| a < now) => Err(QueryError::Past(format!(
                    "the live state holds each user as of now ({}), not its history: an \
                     earlier instant is answered offline from the events by `herald explain`",
                    herald_operators::time::format_rfc3339_ms(now as i64)
                ))),
                Some(i) => {
                    let at = at.unwrap_or(now);
                    let u = st.user_at(&user, i, at, EXPLAIN_STEPS);
                    Ok(herald_operators::why::explain(&plan, i, &u, at))
                }
            };
            let _ = reply.send(result);
        }
        Query::Journeys { user, reply } => {
            let _ = reply.send(journeys.map(|j| j.status(&user)).unwrap_or_default());
        }
        Query::Preview {
            expr,
            current,
            samples,
            reply,
        } => {
            let _ = reply.send((st.preview(&expr, current, now, samples), now));
        }
    }
}

/// Adds what this worker's segment state counted since the last call to the process's
/// metrics: duplicates dropped (`herald_duplicates_total`) and comparisons of mismatched
/// types (`herald_type_mismatches_total`).
fn report_counters(live: &Live, state: Option<&StateHandle>, seen: &mut StateCounters) {
    if let Some(st) = state {
        let now = st.counters();
        let m = &live.metrics;
        m.duplicates
            .inc_by(now.duplicates.saturating_sub(seen.duplicates));
        m.type_mismatches
            .inc_by(now.type_mismatches.saturating_sub(seen.type_mismatches));
        *seen = now;
    }
}
