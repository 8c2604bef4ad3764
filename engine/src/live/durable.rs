//! Durable state of `herald run` (embedded and Kafka mode, one process or a cluster): the
//! ingest log and checkpoints.
//!
//! Owns [`IngestLog`] (its writer thread stamps, appends and fsyncs accepted events
//! before HTTP ingest answers 200, then hands them to the workers), [`Store`] (the
//! checkpoint directory) and the checkpointer thread that assembles a checkpoint from
//! its parts and commits it.
//!
//! The protocol, in one place:
//!
//! * **Stamps.** The log writer gives every batch one instant `s` (wall clock, never
//!   below the last), writes it with the events, fsyncs, and only then sends the events
//!   to their workers and publishes the log watermark `W = s + 1`. A worker feeds each
//!   event at its stamp, and never moves its clock past the watermark it read before
//!   taking events from its channel. So an event's dataflow instant is its stamp, and a
//!   restart can feed it again at exactly that instant.
//! * **Checkpoints.** Worker 0 asks for one at an instant `F` through the dataflow's
//!   control input. Each operator writes its part holding the state after every instant
//!   before `F` (`herald_operators::dataflow`); worker 0 writes the driver's part (the
//!   snapshot, audience and list state it feeds from); the sink writes its part once the
//!   output frontier passes `F`: the lengths of its files holding exactly the changes
//!   and journey output before `F`, and the query API's identify traits. When every part
//!   is on disk (each fsynced), the checkpointer writes `MANIFEST` (written whole, then
//!   renamed into place): only then is the checkpoint complete. A part is either the whole
//!   state or the users changed since the previous checkpoint; the manifest lists the
//!   chain of checkpoints to read, from the last full one.
//! * **Restart.** The latest complete checkpoint is read; output files are cut back to its
//!   lengths; the workers start at `F` with the restored state; every logged event
//!   stamped at or after `F` is fed again at its stamp (and the journeys' trait writes a
//!   part carried, at `F`). The dataflow is deterministic, so everything after `F` is
//!   derived again exactly as before, and written once. Log files wholly before `F`, and
//!   checkpoints before its chain, are removed.
//!
//! * **Kafka mode.** One reader thread consumes every partition of the events topics (by
//!   assignment, not a consumer group) and appends what it parsed through the same log,
//!   with the partitions' next offsets after the batch (a positions record, same stamp).
//!   The driver's part holds the positions of every batch stamped before `F`; a restart
//!   resumes each partition at the checkpoint's position, moved on by the positions records
//!   logged after `F` (their events are fed again from the log, not from the broker). The
//!   group's committed offsets follow the latest complete checkpoint, for lag monitoring
//!   and for a start without the state directory.
//! * **The archive.** With `[export]`, a checkpoint is complete only once the archive holds
//!   every record before it (the exporter's `durable`), and the next one is asked for only
//!   then: a restart derives again only what the archive has not got, so the archive loses
//!   nothing; checkpoints then come at most every `export.flush_every`.
//!
//! * **A cluster.** The processes share the checkpoint directory. Each writes its workers'
//!   parts (by global worker index), its own driver and sink parts (`driver.p<N>`,
//!   `sink.p<N>`; local worker 0 of a process other than 0 asks for them when its segment
//!   part is taken) and then `p<N>.written`; process 0 commits the manifest once every
//!   process has, and alone removes old checkpoints. Each process has its own log
//!   (`ingest.p<N>`), cut only behind a committed checkpoint. Sinks release only what
//!   every process's log has synced (the processes report it to each other, see
//!   `worker.rs`).
//!
//! Files: `<dir>/ingest/<first stamp>.log` (records: length, CRC-32, bincode of
//! `(stamp, event)`; a positions record sets the top bit of its length and holds
//! `(stamp, positions)`; a torn tail is cut at open) and `<dir>/checkpoints/<F>/` (parts:
//! magic, format, CRC-32, bincode; and `MANIFEST`, JSON).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_operators::dataflow::{JourneysPart, PartSink, Restored, SegmentPart};
use herald_operators::event::Event;
use herald_operators::plan::SnapshotRows;
use herald_operators::time::Time;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The checkpoint format. A checkpoint of another format is refused, never misread.
/// 2: the driver's part holds Kafka positions.
/// 3: journey parts hold compact instances (packed triggers, exact-size lists).
/// 4: segment parts hold one membership word per user (the rest beside it) and the
///    compact `avg` and same-value trait cells; journey parts hold shorter packed
///    triggers and no trait list for users without one.
pub const FORMAT: u32 = 4;

/// The top bit of a log record's length marks a positions record.
const POSITIONS_RECORD: u32 = 1 << 31;

/// Kafka positions: per `(topic, partition)`, the offset of the next message to read.
pub type Positions = BTreeMap<(String, i32), i64>;

/// The positions after each logged Kafka batch, by stamp, oldest first: worker 0 takes a
/// checkpoint's from here.
pub type PositionsHistory = Arc<Mutex<VecDeque<(Time, Positions)>>>;

/// Magic bytes at the start of every part file.
const MAGIC: &[u8; 8] = b"HRLDPART";

/// A log file is closed and a new one begun past this size.
const LOG_FILE_BYTES: u64 = 64 << 20;

/// Most events one group commit takes.
const GROUP_MAX: usize = 64 * 1024;

/// A checkpoint is full (not a delta) at least every this many checkpoints.
pub const CHAIN_MAX: usize = 16;

/// An event on its way to a worker, with the instant it is to be fed at (0: at the
/// worker's clock, when there is no log).
pub struct Fed {
    /// The log stamp.
    pub at: Time,
    /// The event.
    pub ev: Event,
}

/// A request to the log writer.
pub enum LogReq {
    /// Appends events; `done` hears once they are durable and with their workers.
    Append {
        /// The events, in order.
        events: Vec<Event>,
        /// Told the outcome, if anyone waits.
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
        /// Kafka mode: the partitions' next offsets once these events are read.
        positions: Positions,
    },
    /// Removes log files holding only events stamped before this instant.
    Truncate(Time),
    /// Ends the writer (after what came before).
    Stop,
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// The ingest log's files; see the module docs.
pub struct IngestLog {
    dir: PathBuf,
    /// `(first stamp, path)`, in order; the last is the one appended to.
    files: Vec<(Time, PathBuf)>,
    current: Option<File>,
    current_bytes: u64,
    buf: Vec<u8>,
}

impl IngestLog {
    /// Opens the log under `dir` (creating it), cuts a torn tail, and returns it with
    /// what it holds at or after `from`.
    pub fn open(dir: &Path, from: Time) -> Result<(IngestLog, Logged), String> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let mut files: Vec<(Time, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
            let path = entry.map_err(|e| io("cannot list", dir, e))?.path();
            let stamp = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<Time>().ok());
            if let Some(s) = stamp {
                files.push((s, path));
            }
        }
        files.sort();
        let mut out = Vec::new();
        let mut positions = Positions::new();
        let mut last = 0;
        let n = files.len();
        for (i, (_, path)) in files.iter().enumerate() {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| io("cannot read", path, e))?;
            let mut pos = 0usize;
            while let Some((stamp, record, next)) = decode(&bytes, pos) {
                last = last.max(stamp);
                match record {
                    Record::Event(ev) if stamp >= from => out.push(Fed { at: stamp, ev }),
                    Record::Positions(p) if stamp >= from => positions.extend(p),
                    _ => {}
                }
                pos = next;
            }
            if pos < bytes.len() {
                if i + 1 < n {
                    return Err(format!(
                        "the ingest log {} is damaged at byte {pos} (not at its end); \
                         move the state directory away to start without it",
                        path.display()
                    ));
                }
                // A write a crash cut short: it was never acknowledged (and nothing
                // derived from it left Herald). Its whole records before the tear are
                // kept: the tear cannot tell which group they belong to. A Kafka batch cut
                // before its positions record is thus fed from the log and read from the
                // broker again; the second copy is dropped by dedup (a message without a
                // `messageId` gets one hashed from its bytes).
                tracing::warn!(
                    file = %path.display(),
                    bytes = bytes.len() - pos,
                    "cut a torn tail from the ingest log"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| io("cannot open", path, e))?;
                f.set_len(pos as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io("cannot cut", path, e))?;
            }
        }
        Ok((
            IngestLog {
                dir: dir.to_path_buf(),
                files,
                current: None,
                current_bytes: 0,
                buf: Vec::new(),
            },
            Logged {
                records: out,
                last,
                positions,
            },
        ))
    }

    /// Appends a batch stamped `at`, then its Kafka positions if any (written, not yet
    /// synced: see [`IngestLog::sync`]).
    fn append(&mut self, at: Time, events: &[Event], positions: &Positions) -> Result<(), String> {
        if self.current.is_none() || self.current_bytes > LOG_FILE_BYTES {
            let path = self.dir.join(format!("{at:020}.log"));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io("cannot create", &path, e))?;
            // The new file's name must survive a crash too.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("cannot sync", &self.dir, e))?;
            self.current_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
            self.current = Some(f);
            if self.files.last().is_none_or(|(_, p)| *p != path) {
                self.files.push((at, path));
            }
        }
        self.buf.clear();
        for ev in events {
            encode(at, ev, &mut self.buf)?;
        }
        if !positions.is_empty() {
            encode_positions(at, positions, &mut self.buf)?;
        }
        let (Some(f), Some((_, path))) = (&mut self.current, self.files.last()) else {
            return Err("no ingest log file is open".into());
        };
        f.write_all(&self.buf)
            .map_err(|e| io("cannot write", path, e))?;
        self.current_bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Makes what was appended durable.
    fn sync(&mut self) -> Result<(), String> {
        match (&self.current, self.files.last()) {
            (Some(f), Some((_, path))) => f.sync_data().map_err(|e| io("cannot sync", path, e)),
            _ => Ok(()),
        }
    }

    /// Removes the files whose every record is stamped before `at`, and starts a new
    /// file at the next append so the current one can go next time.
    fn truncate(&mut self, at: Time) {
        while self.files.len() >= 2 && self.files[1].0 <= at {
            let (_, path) = self.files.remove(0);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        if self.current_bytes > 0 && self.files.last().is_some_and(|(s, _)| *s < at) {
            self.current = None;
        }
    }
}

/// What [`IngestLog::open`] found.
pub struct Logged {
    /// Every event stamped at or after `from`, in order.
    pub records: Vec<Fed>,
    /// The last stamp in the log.
    pub last: Time,
    /// The Kafka positions after the last batch stamped at or after `from` (per
    /// partition; empty without Kafka).
    pub positions: Positions,
}

/// Positions as a positions record holds them.
type PositionList = Vec<((String, i32), i64)>;

/// A log record's body.
enum Record {
    Event(Event),
    Positions(PositionList),
}

fn frame(body: &[u8], flag: u32, out: &mut Vec<u8>) -> Result<(), String> {
    if body.len() as u64 >= POSITIONS_RECORD as u64 {
        return Err(format!("a log record of {} bytes is too large", body.len()));
    }
    out.extend_from_slice(&(body.len() as u32 | flag).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    Ok(())
}

fn encode(at: Time, ev: &Event, out: &mut Vec<u8>) -> Result<(), String> {
    let body = bincode::serialize(&(at, ev)).map_err(|e| format!("cannot encode an event: {e}"))?;
    frame(&body, 0, out)
}

fn encode_positions(at: Time, p: &Positions, out: &mut Vec<u8>) -> Result<(), String> {
    let list: Vec<(&(String, i32), &i64)> = p.iter().collect();
    let body = bincode::serialize(&(at, list))
        .map_err(|e| format!("cannot encode Kafka positions: {e}"))?;
    frame(&body, POSITIONS_RECORD, out)
}

/// The record at `pos`, if whole and intact: `(stamp, record, next position)`.
fn decode(bytes: &[u8], pos: usize) -> Option<(Time, Record, usize)> {
    let head = bytes.get(pos..pos + 8)?;
    let word = u32::from_le_bytes(head[..4].try_into().ok()?);
    let len = (word & !POSITIONS_RECORD) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    let body = bytes.get(pos + 8..pos + 8 + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let (at, record) = if word & POSITIONS_RECORD != 0 {
        let (at, p): (Time, PositionList) = bincode::deserialize(body).ok()?;
        (at, Record::Positions(p))
    } else {
        let (at, ev): (Time, Event) = bincode::deserialize(body).ok()?;
        (at, Record::Event(ev))
    };
    Some((at, record, pos + 8 + len))
}

/// The log writer's shared ends.
pub struct LogShared {
    /// Every event stamped below it is with its worker.
    pub watermark: Arc<AtomicU64>,
    /// Every event stamped below it is on disk.
    pub synced: Arc<AtomicU64>,
    /// The Kafka positions after each batch, appended before the watermark passes it.
    pub history: PositionsHistory,
    /// The Kafka positions the log starts from (the checkpoint's, moved on by the log).
    pub positions: Positions,
    /// Told when a batch could not be written: `(error, events dropped, whether it came
    /// from the Kafka reader)`. Waiting callers are told too; a Kafka batch has nobody to
    /// tell and its offsets have moved on, so the service must stop.
    pub on_error: LogErrorFn,
}

/// See [`LogShared::on_error`].
pub type LogErrorFn = Box<dyn Fn(&str, usize, bool) + Send>;

/// Runs the log writer until every sender is gone; see the module docs. Events go to
/// the worker their user hashes to.
pub fn run_log_writer(
    mut log: IngestLog,
    rx: Receiver<LogReq>,
    workers: Vec<Sender<Fed>>,
    shared: LogShared,
    tick: Duration,
) {
    let LogShared {
        watermark,
        synced,
        history,
        positions: mut current,
        on_error,
    } = shared;
    let n = workers.len() as u64;
    loop {
        let first = match rx.recv_timeout(tick) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: nothing is stamped below now any more, and all of it is synced.
                let now = super::now_ms();
                watermark.fetch_max(now, Ordering::AcqRel);
                synced.fetch_max(now, Ordering::AcqRel);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut events: Vec<Event> = Vec::new();
        let mut moved = Positions::new();
        let mut waiting = Vec::new();
        let mut truncate = None;
        let mut stop = false;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                LogReq::Append {
                    events: mut evs,
                    done,
                    positions,
                } => {
                    events.append(&mut evs);
                    moved.extend(positions);
                    waiting.extend(done);
                }
                LogReq::Truncate(at) => truncate = Some(truncate.map_or(at, |t: Time| t.max(at))),
                LogReq::Stop => stop = true,
            }
            if stop {
                break;
            }
            if events.len() < GROUP_MAX {
                next = rx.try_recv().ok();
            }
        }
        if let Some(at) = truncate {
            log.truncate(at);
        }
        if events.is_empty() && moved.is_empty() {
            for d in waiting {
                let _ = d.send(Ok(()));
            }
            if stop {
                break;
            }
            continue;
        }
        let at = super::now_ms().max(watermark.load(Ordering::Acquire));
        // The workers take the batch while it is synced: the dataflow's latency does not
        // wait for the disk, only the HTTP answer does. What a crash loses before the sync
        // was never acknowledged (the client sends it again) and no checkpoint can hold it:
        // the checkpointer commits an instant only once the log is synced past it.
        let written = log.append(at, &events, &moved);
        let (events_n, from_kafka, write_failed) =
            (events.len(), !moved.is_empty(), written.is_err());
        if written.is_ok() {
            if !moved.is_empty() {
                current.extend(moved);
                if let Ok(mut h) = history.lock() {
                    h.push_back((at, current.clone()));
                }
            }
            for ev in events {
                let w = (herald_operators::dataflow::user_hash(&ev.user) % n) as usize;
                let _ = workers[w].send(Fed { at, ev });
            }
            watermark.store(at + 1, Ordering::Release);
        }
        match written.and_then(|_| log.sync()) {
            Ok(()) => {
                synced.store(at + 1, Ordering::Release);
                for d in waiting {
                    let _ = d.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!("ingest log: {e}");
                if write_failed {
                    // Never handed to a worker.
                    on_error(&e, events_n, from_kafka);
                }
                for d in waiting {
                    let _ = d.send(Err(e.clone()));
                }
            }
        }
        if stop {
            break;
        }
    }
}

/// A checkpoint's manifest: written last, so its presence means every part is there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The checkpoint's instant.
    pub at: Time,
    /// The checkpoints to read, from the last full one to this one.
    pub chain: Vec<Time>,
    /// Timely workers per process that wrote parts.
    pub workers: usize,
    /// Processes of the cluster that wrote parts (1 outside a cluster).
    #[serde(default = "one")]
    pub processes: usize,
    /// Whether journeys ran (and wrote parts).
    pub journeys: bool,
    /// A hash of the segment and journey files the state was built with.
    pub definitions: String,
    /// The segment file's text the state was built with (empty in checkpoints of an
    /// earlier Herald): a start with a changed file carries the state over to it.
    #[serde(default)]
    pub segments_text: String,
    /// The journey file's text, likewise (empty: none, or an earlier Herald).
    #[serde(default)]
    pub journeys_text: String,
    /// The segment definitions changed through the API before the checkpoint's instant,
    /// applied over `segments_text` in order (see `definitions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segment_changes: Vec<DefChange>,
}

/// One change of the definitions through the API: a new version of a segment, or its
/// deletion; or a journey paused or resumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefChange {
    /// What changes (a segment when the field is absent).
    #[serde(default, skip_serializing_if = "ChangeKind::is_segment")]
    pub kind: ChangeKind,
    /// The segment (or journey).
    pub name: String,
    /// Its version (the segment file's definition is version 1).
    pub version: u32,
    /// The `CREATE SEGMENT` statement (empty for a deletion).
    pub text: String,
    /// Whether this change deletes the segment.
    #[serde(default)]
    pub deleted: bool,
    /// The instant it took effect (None: not yet known when it was recorded).
    pub at: Option<Time>,
    /// A journey version with `?migrate=restart`: the instances in progress restarted on
    /// it (else they finish on the version they entered).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

/// What a [`DefChange`] changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A segment's definition.
    #[default]
    Segment,
    /// A journey paused from the change's instant on.
    PauseJourney,
    /// A journey resumed from the change's instant on.
    ResumeJourney,
    /// A journey's new version (its YAML in `text`).
    Journey,
}

impl ChangeKind {
    /// Whether it is a segment's change.
    pub fn is_segment(&self) -> bool {
        *self == ChangeKind::Segment
    }

    /// Whether it changes what the state holds (a segment or a journey version; not a
    /// pause).
    pub fn changes_plan(&self) -> bool {
        matches!(self, ChangeKind::Segment | ChangeKind::Journey)
    }
}

impl DefChange {
    /// A journey paused (or resumed) through the API.
    pub fn pause(journey: &str, paused: bool) -> DefChange {
        DefChange {
            kind: if paused {
                ChangeKind::PauseJourney
            } else {
                ChangeKind::ResumeJourney
            },
            name: journey.to_string(),
            version: 0,
            text: String::new(),
            deleted: false,
            at: None,
            restart: false,
        }
    }
}

/// `DEFINITIONS.json`: every change through the API, in order.
#[derive(Debug, Serialize, Deserialize)]
struct DefLog {
    format: u32,
    changes: Vec<DefChange>,
}

/// The format of `DEFINITIONS.json`.
const DEFINITIONS_FORMAT: u32 = 1;

fn one() -> usize {
    1
}

/// The name of a per-process part (`driver`, `sink`): the name itself for process 0,
/// `name.p<N>` for process `N` of a cluster.
pub fn process_part(name: &str, process: usize) -> String {
    match process {
        0 => name.to_string(),
        p => format!("{name}.p{p}"),
    }
}

/// The ingest log's directory of process `process` under the state directory.
pub fn log_dir(dir: &Path, process: usize) -> PathBuf {
    dir.join(process_part("ingest", process))
}

/// How long a cluster's process waits for process 0 to commit a checkpoint before it
/// carries on without cutting its log, and how often process 0 warns about a process
/// whose parts it still waits for.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// How often a cluster's checkpointer looks at the store while it waits.
const CLUSTER_POLL: Duration = Duration::from_millis(20);

/// The driver's part: what worker 0 feeds from.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DriverPart {
    /// The snapshot applied (instant and rows), when it changed since the previous
    /// checkpoint or this one is full; else the chain's earlier part has it.
    pub snapshot: Option<Option<(i64, SnapshotRows)>>,
    /// Warehouse audience members by segment.
    pub audiences: BTreeMap<usize, BTreeSet<String>>,
    /// Static list members by segment, as fed.
    pub lists: BTreeMap<usize, BTreeSet<String>>,
    /// Kafka mode: the positions after every batch stamped before the checkpoint.
    pub kafka: Positions,
}

/// The sink's part.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SinkPart {
    /// Output file lengths holding exactly what was emitted before the checkpoint.
    pub files: BTreeMap<String, u64>,
    /// Identify traits of the query API: per user, `name -> (instant, JSON text)`
    /// (None: no traits); every user in a full part, else those written since.
    pub traits: super::state::TraitsPart,
    /// Whether `traits` holds every user.
    pub full: bool,
    /// Kafka output: per topic and partition, the offset after the last record the
    /// broker had acknowledged (every record before the checkpoint is at or before it).
    pub topics: super::sink::Resume,
}

/// A part on its way to the checkpointer.
pub enum CkMsg {
    /// An operator's part from the segment state.
    Segments(usize, Time, Box<SegmentPart>),
    /// An operator's part from the journeys.
    Journeys(usize, Time, Box<JourneysPart>),
    /// Worker 0's part, with the chain this checkpoint belongs to.
    Driver(Time, Vec<Time>, Box<DriverPart>),
    /// The sink's part.
    Sink(Time, Box<SinkPart>),
    /// The segment definitions in force from an instant on (sent before any part of a
    /// later checkpoint): checkpoints after it record them.
    Definitions(Time, Vec<DefChange>),
    /// Ends the checkpointer.
    Stop,
}

/// The checkpoint directory: a local directory, or a prefix on object storage
/// (`s3://bucket/prefix`).
#[derive(Clone)]
pub struct Store {
    root: Root,
}

#[derive(Clone)]
enum Root {
    /// `<dir>/checkpoints`.
    Local(PathBuf),
    /// `<url>/checkpoints`, without a trailing slash.
    Remote(String),
}

impl Store {
    /// The store under `location` (created on first write): a local directory, or an
    /// object-store URL.
    pub fn new(location: &str) -> Store {
        let root = if location.contains("://") {
            // As object_store names keys (no empty segments), so listings match it.
            let (scheme, rest) = location.split_once("://").unwrap_or(("s3", location));
            let path: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
            Root::Remote(format!("{scheme}://{}/checkpoints", path.join("/")))
        } else {
            Root::Local(Path::new(location).join("checkpoints"))
        };
        Store { root }
    }

    /// Where the store is, for messages.
    pub fn location(&self) -> String {
        match &self.root {
            Root::Local(p) => p.display().to_string(),
            Root::Remote(u) => u.clone(),
        }
    }

    /// Where checkpoint `at`'s object `name` is, for messages.
    fn describe(&self, at: Time, name: &str) -> String {
        format!("{}/{at:020}/{name}", self.location())
    }

    #[cfg(test)]
    fn dir(&self, at: Time) -> PathBuf {
        match &self.root {
            Root::Local(p) => p.join(format!("{at:020}")),
            Root::Remote(_) => unreachable!("a local store in the tests"),
        }
    }

    /// Writes checkpoint `at`'s object `name` (a local file is fsynced; `atomic`: written
    /// whole under another name, renamed into place and the directory synced too). An
    /// object-store PUT is atomic by itself.
    fn put(&self, at: Time, name: &str, bytes: &[u8], atomic: bool) -> Result<(), String> {
        match &self.root {
            Root::Local(root) => {
                let dir = root.join(format!("{at:020}"));
                std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, e))?;
                let path = dir.join(name);
                let first = if atomic {
                    dir.join(format!("{name}.tmp"))
                } else {
                    path.clone()
                };
                File::create(&first)
                    .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
                    .map_err(|e| io("cannot write", &first, e))?;
                if atomic {
                    std::fs::rename(&first, &path).map_err(|e| io("cannot commit", &path, e))?;
                    File::open(&dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| io("cannot sync", &dir, e))?;
                }
                Ok(())
            }
            Root::Remote(_) => {
                let url = self.describe(at, name);
                herald_connectors::store::write_all(&url, bytes.to_vec())
                    .map_err(|e| format!("cannot write {url}: {e}"))
            }
        }
    }

    /// Reads checkpoint `at`'s object `name` (None: there is none).
    fn get(&self, at: Time, name: &str) -> Result<Option<Vec<u8>>, String> {
        match &self.root {
            Root::Local(root) => {
                let path = root.join(format!("{at:020}")).join(name);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io("cannot read", &path, e)),
                }
            }
            Root::Remote(_) => {
                let url = self.describe(at, name);
                match herald_connectors::store::read_all(&url) {
                    Ok(b) => Ok(Some(b.to_vec())),
                    Err(herald_connectors::ConnectorError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(format!("cannot read {url}: {e}")),
                }
            }
        }
    }

    /// Whether checkpoint `at` has an object `name` (an unreachable store: no).
    fn has(&self, at: Time, name: &str) -> bool {
        match &self.root {
            Root::Local(root) => root.join(format!("{at:020}")).join(name).exists(),
            Root::Remote(_) => {
                herald_connectors::store::exists(&self.describe(at, name)).unwrap_or(false)
            }
        }
    }

    /// Removes checkpoint `at` (best effort: what stays is removed by a later commit).
    fn remove(&self, at: Time) {
        match &self.root {
            Root::Local(root) => {
                let _ = std::fs::remove_dir_all(root.join(format!("{at:020}")));
            }
            Root::Remote(_) => {
                let prefix = format!("{}/{at:020}/", self.location());
                if let Err(e) = herald_connectors::store::remove_all(&prefix) {
                    tracing::warn!("cannot remove the old checkpoint {prefix}: {e}");
                }
            }
        }
    }

    /// Checkpoint instants with any object, newest first.
    fn instants(&self) -> Result<Vec<Time>, String> {
        let mut v: Vec<Time> = match &self.root {
            Root::Local(root) => std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect(),
            Root::Remote(url) => {
                let prefix = format!("{url}/");
                herald_connectors::store::list(&prefix)
                    .map_err(|e| format!("cannot list {prefix}: {e}"))?
                    .iter()
                    .filter_map(|entry| {
                        entry.strip_prefix(&prefix)?.split('/').next()?.parse().ok()
                    })
                    .collect()
            }
        };
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.dedup();
        Ok(v)
    }

    /// The latest complete checkpoint's manifest. One of another format is an error
    /// that says what to do.
    pub fn latest(&self) -> Result<Option<Manifest>, String> {
        for at in self.instants()? {
            let Some(bytes) = self.get(at, "MANIFEST")? else {
                continue; // torn: never read
            };
            let what = self.describe(at, "MANIFEST");
            let m: Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| format!("cannot read the checkpoint manifest {what}: {e}"))?;
            if m.format != FORMAT {
                return Err(format!(
                    "the checkpoint {what} was written in format {} and this Herald reads format \
                     {FORMAT}: run the Herald that wrote it to a graceful stop and replay, or \
                     move {} away to start from empty state (the events archive or the ingest \
                     log can be replayed into it)",
                    m.format,
                    self.location()
                ));
            }
            return Ok(Some(m));
        }
        Ok(None)
    }

    /// Writes one part; returns its size.
    pub fn write_part(&self, at: Time, name: &str, value: &impl Serialize) -> Result<u64, String> {
        let body = bincode::serialize(value).map_err(|e| format!("cannot encode {name}: {e}"))?;
        let mut bytes = Vec::with_capacity(body.len() + 16);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        self.put(at, name, &bytes, false)?;
        Ok(bytes.len() as u64)
    }

    /// Reads one part of checkpoint `at`.
    pub fn read_part<T: DeserializeOwned>(&self, at: Time, name: &str) -> Result<T, String> {
        let what = self.describe(at, name);
        let bytes = self
            .get(at, name)?
            .ok_or_else(|| format!("cannot read {what}: it is missing"))?;
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(format!("{what} is not a Herald checkpoint part"));
        }
        let format = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default());
        if format != FORMAT {
            return Err(format!("{what} is in format {format}, not {FORMAT}"));
        }
        if crc32fast::hash(&bytes[16..]) != crc {
            return Err(format!("{what} is damaged (checksum mismatch)"));
        }
        bincode::deserialize(&bytes[16..]).map_err(|e| format!("cannot decode {what}: {e}"))
    }

    /// Makes checkpoint `m` complete, then removes the checkpoints its chain no longer
    /// needs (every one before the chain's start, and incomplete ones before it).
    fn commit(&self, m: &Manifest) -> Result<(), String> {
        let text = serde_json::to_string_pretty(m).map_err(|e| e.to_string())?;
        self.put(m.at, "MANIFEST", text.as_bytes(), true)?;
        let keep: BTreeSet<Time> = m.chain.iter().copied().collect();
        let start = m.chain.first().copied().unwrap_or(m.at);
        for at in self.instants().unwrap_or_default() {
            if at < m.at && (at < start || !keep.contains(&at)) {
                self.remove(at);
            }
        }
        Ok(())
    }

    /// Marks process `process`'s parts of checkpoint `at` as written (a cluster's process
    /// 0 commits the checkpoint once every process has).
    fn mark_written(&self, at: Time, process: usize) -> Result<(), String> {
        self.put(at, &format!("p{process}.written"), &[], true)
    }

    /// The processes among `1..processes` that have not marked checkpoint `at` written.
    fn unwritten(&self, at: Time, processes: usize) -> Vec<usize> {
        (1..processes)
            .filter(|p| !self.has(at, &format!("p{p}.written")))
            .collect()
    }

    /// Whether checkpoint `at` is complete.
    fn committed(&self, at: Time) -> bool {
        self.has(at, "MANIFEST")
    }

    /// Where a cluster's process 0 leaves its start's probe.
    fn probe_location(&self) -> String {
        format!("{}/PROBE", self.location())
    }

    /// A cluster's process 0 at start: leaves `nonce` where every process must find it
    /// (the check that they share the directory).
    pub fn write_probe(&self, nonce: u64) -> Result<(), String> {
        let text = nonce.to_string();
        match &self.root {
            Root::Local(root) => {
                std::fs::create_dir_all(root).map_err(|e| io("cannot create", root, e))?;
                let path = root.join("PROBE");
                std::fs::write(&path, text).map_err(|e| io("cannot write", &path, e))
            }
            Root::Remote(_) => {
                let url = self.probe_location();
                herald_connectors::store::write_all(&url, text.into_bytes())
                    .map_err(|e| format!("cannot write {url}: {e}"))
            }
        }
    }

    /// The probe process 0 left (None: none visible here), and where it was looked for;
    /// a store that cannot be read is an error, not "none".
    pub fn read_probe(&self) -> (Result<Option<u64>, String>, String) {
        let location = self.probe_location();
        let text = match &self.root {
            Root::Local(root) => match std::fs::read_to_string(root.join("PROBE")) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {location}: {e}")),
            },
            Root::Remote(_) => match herald_connectors::store::read_all(&location) {
                Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
                Err(herald_connectors::ConnectorError::NotFound { .. }) => Ok(None),
                Err(e) => Err(format!("cannot read {location}: {e}")),
            },
        };
        (
            text.map(|t| t.and_then(|t| t.trim().parse().ok())),
            location,
        )
    }

    /// Where the segment definitions changed through the API are kept.
    fn definitions_location(&self) -> String {
        format!("{}/DEFINITIONS.json", self.location())
    }

    /// Writes the definitions changed through the API, whole and atomically (a local
    /// file is written under another name, fsynced and renamed into place).
    pub fn write_definitions(&self, changes: &[DefChange]) -> Result<(), String> {
        let body = serde_json::to_vec_pretty(&DefLog {
            format: DEFINITIONS_FORMAT,
            changes: changes.to_vec(),
        })
        .map_err(|e| format!("cannot encode the definitions: {e}"))?;
        match &self.root {
            Root::Local(root) => {
                std::fs::create_dir_all(root).map_err(|e| io("cannot create", root, e))?;
                let (tmp, path) = (
                    root.join("DEFINITIONS.json.tmp"),
                    root.join("DEFINITIONS.json"),
                );
                File::create(&tmp)
                    .and_then(|mut f| f.write_all(&body).and_then(|_| f.sync_all()))
                    .map_err(|e| io("cannot write", &tmp, e))?;
                std::fs::rename(&tmp, &path).map_err(|e| io("cannot commit", &path, e))?;
                File::open(root)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("cannot sync", root, e))
            }
            Root::Remote(_) => {
                let url = self.definitions_location();
                herald_connectors::store::write_all(&url, body)
                    .map_err(|e| format!("cannot write {url}: {e}"))
            }
        }
    }

    /// The definitions changed through the API (empty: none kept).
    pub fn read_definitions(&self) -> Result<Vec<DefChange>, String> {
        let location = self.definitions_location();
        let bytes = match &self.root {
            Root::Local(root) => match std::fs::read(root.join("DEFINITIONS.json")) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(format!("cannot read {location}: {e}")),
            },
            Root::Remote(_) => match herald_connectors::store::read_all(&location) {
                Ok(b) => b.to_vec(),
                Err(herald_connectors::ConnectorError::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(format!("cannot read {location}: {e}")),
            },
        };
        let log: DefLog =
            serde_json::from_slice(&bytes).map_err(|e| format!("cannot read {location}: {e}"))?;
        if log.format != DEFINITIONS_FORMAT {
            return Err(format!(
                "{location} is in format {} and this Herald reads format {DEFINITIONS_FORMAT}",
                log.format
            ));
        }
        Ok(log.changes)
    }

    /// Removes checkpoints after `at` (incomplete ones a crash left), before starting
    /// from `at`.
    pub fn remove_after(&self, at: Time) {
        for t in self.instants().unwrap_or_default() {
            if t > at {
                self.remove(t);
            }
        }
    }
}

/// Where one worker's parts of a checkpoint are, to be read on its own thread.
pub struct WorkerParts {
    /// The checkpoint directory.
    pub store: Store,
    /// The checkpoint's instant.
    pub at: Time,
    /// Its chain.
    pub chain: Vec<Time>,
    /// Whether journeys wrote parts.
    pub journeys: bool,
    /// The segment file changed since: how its state is carried over.
    pub remap: Option<Arc<herald_operators::plan::Remap>>,
    /// The history of the aggregates the new file reads and the state lacks, rebuilt
    /// from the events archive (`live::rebuild`).
    pub backfill: Option<herald_operators::state::Backfill>,
    /// The chain's last segment part, when it was read already (to check a rebuild).
    pub last_part: Option<SegmentPart>,
    /// The journey file changed since: how its journeys map to the new one's.
    pub journey_remap: Option<Arc<herald_operators::journey::machine::JourneyRemap>>,
    /// Kept segments the journeys now read and did not before ([`Restored::journey_seed`]).
    pub journey_seed: Vec<u16>,
}

impl WorkerParts {
    /// Reads worker `w`'s chain: the state to restore and the journeys' trait writes the
    /// last part carried.
    pub fn read(mut self, w: usize) -> Result<(Restored, Vec<Event>), String> {
        let mut r = Restored {
            at: self.at,
            ..Default::default()
        };
        let mut writes = Vec::new();
        let last = self.chain.last().copied();
        for &t in &self.chain {
            let mut seg: SegmentPart = match self.last_part.take().filter(|_| Some(t) == last) {
                Some(p) => p,
                None => self.store.read_part(t, &format!("w{w}.segments"))?,
            };
            if let Some(m) = &self.remap {
                seg.remap(m);
                r.reevaluate = true;
            }
            r.segments.push(seg);
            if self.journeys {
                let mut j: JourneysPart = self.store.read_part(t, &format!("w{w}.journeys"))?;
                if t == self.at {
                    writes = j.writes;
                }
                if let Some(m) = &self.remap {
                    j.machine.remap(m);
                }
                r.journeys.push(j.machine);
            }
        }
        r.journey_seed = self.journey_seed;
        if let Some(j) = &self.journey_remap {
            r.journey_exits = herald_operators::journey::machine::remap_journey_chain(
                &mut r.journeys,
                j,
                self.at,
            );
        }
        r.backfill = self.backfill;
        Ok((r, writes))
    }
}

/// The operators' [`PartSink`]: parts go to the checkpointer thread.
pub struct PartsTo {
    /// This worker's index.
    pub worker: usize,
    /// The checkpointer's channel.
    pub tx: Sender<CkMsg>,
    /// Local worker 0 of a cluster's process other than 0: told `(instant, full)` when
    /// its segment part is taken, before the output frontier can pass the instant (so
    /// that the process's sink and driver parts are asked for in time).
    pub on_part: Option<Box<dyn Fn(Time, bool)>>,
}

impl PartSink for PartsTo {
    fn segments(&self, at: Time, part: SegmentPart) {
        if let Some(f) = &self.on_part {
            f(at, part.full);
        }
        let _ = self
            .tx
            .send(CkMsg::Segments(self.worker, at, Box::new(part)));
    }
    fn journeys(&self, at: Time, part: JourneysPart) {
        let _ = self
            .tx
            .send(CkMsg::Journeys(self.worker, at, Box::new(part)));
    }
}

/// Runs the checkpointer until [`CkMsg::Stop`]: writes parts, and commits a checkpoint
/// once all its parts are written, the log is synced past it and the output files (whose
/// lengths the sink part records) are synced; then the log before it is truncated.
/// Returns the number of checkpoints committed.
pub fn run_checkpointer(
    store: Store,
    rx: Receiver<CkMsg>,
    template: Manifest,
    log: Option<Sender<LogReq>>,
    synced: Arc<AtomicU64>,
    live: &super::Live,
) -> Result<u64, String> {
    let (metrics, want_full) = (&live.metrics, &live.checkpoint_full_next);
    let outputs: Vec<PathBuf> = if live.config.output.dir.is_empty() {
        Vec::new()
    } else {
        super::sink::DERIVED_FILES
            .iter()
            .map(|f| Path::new(&live.config.output.dir).join(f))
            .collect()
    };
    let (process, processes) = live.config.processes();
    let expected = template.workers * (1 + template.journeys as usize) + 2;
    // Per instant: parts written, the chain and Kafka positions (from the driver part),
    // their bytes.
    type Waiting = (usize, Option<(Vec<Time>, Positions)>, u64);
    let mut pending: BTreeMap<Time, Waiting> = BTreeMap::new();
    // Bytes of the chain's full checkpoint, and of its deltas since.
    let (mut full_bytes, mut delta_bytes) = (0u64, 0u64);
    let mut committed = 0;
    // The definitions changed through the API, from an instant on (the first: at start).
    let mut definitions: Vec<(Time, Vec<DefChange>)> = vec![(0, template.segment_changes.clone())];
    for msg in rx {
        let started = std::time::Instant::now();
        let (at, bytes) = match &msg {
            CkMsg::Definitions(at, changes) => {
                definitions.push((*at, changes.clone()));
                continue;
            }
            CkMsg::Segments(w, at, p) => {
                (*at, store.write_part(*at, &format!("w{w}.segments"), p)?)
            }
            CkMsg::Journeys(w, at, p) => {
                (*at, store.write_part(*at, &format!("w{w}.journeys"), p)?)
            }
            CkMsg::Driver(at, _, p) => (
                *at,
                store.write_part(*at, &process_part("driver", process), p)?,
            ),
            CkMsg::Sink(at, p) => (
                *at,
                store.write_part(*at, &process_part("sink", process), p)?,
            ),
            CkMsg::Stop => break,
        };
        metrics.checkpoint_bytes.inc_by(bytes);
        // Whether a checkpoint before this one is still being written.
        let earlier_pending = pending.range(..at).next().is_some();
        let entry = pending.entry(at).or_default();
        entry.0 += 1;
        entry.2 += bytes;
        if let CkMsg::Driver(_, chain, part) = msg {
            entry.1 = Some((chain, part.kafka));
        }
        if let (true, Some((chain, positions))) = (entry.0 == expected, entry.1.clone()) {
            // Every event stamped before `at` must be on disk before a checkpoint that
            // holds it is complete.
            let waited = std::time::Instant::now();
            while synced.load(Ordering::Acquire) < at {
                if waited.elapsed() > Duration::from_secs(30) {
                    return Err("the ingest log has not synced for 30 s".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // With `[export]`: only once the archive holds everything before `at` (see
            // the module docs). A failed exporter stops the service; nothing is committed.
            if live.export.is_some() {
                while live.durable.load(Ordering::Acquire) < at {
                    if live.sink_failed.load(Ordering::Acquire) {
                        return Ok(committed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            for path in &outputs {
                if let Ok(f) = File::open(path) {
                    f.sync_data().map_err(|e| io("cannot sync", path, e))?;
                }
            }
            // A checkpoint at `at` holds the state before anything at `at`: the changes
            // that took effect before it.
            let changes = definitions
                .iter()
                .rev()
                .find(|(from, _)| *from < at)
                .map_or_else(Vec::new, |(_, c)| c.clone());
            // With no earlier checkpoint still being written, later ones are at later
            // instants: only the sets in force from this one on can still be asked for.
            let newest_before = definitions.iter().rposition(|(from, _)| *from < at);
            if let (Some(k), false) = (newest_before, earlier_pending) {
                definitions.drain(..k);
            }
            let m = Manifest {
                at,
                chain,
                definitions: definitions_hash_with(
                    &template.segments_text,
                    &template.journeys_text,
                    &changes,
                ),
                segment_changes: changes,
                ..template.clone()
            };
            if process > 0 {
                // Process 0 commits once every process has written its parts; the log
                // is cut only behind a committed checkpoint.
                store.mark_written(at, process)?;
                pending.remove(&at);
                pending.retain(|t, _| *t > at);
                // (Process 0 commits a later one only once this process has marked it:
                // this one's manifest is there until then.)
                let waited = std::time::Instant::now();
                while !store.committed(at) {
                    if waited.elapsed() > CLUSTER_WAIT || live.sink_failed.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(CLUSTER_POLL);
                }
                if !store.committed(at) {
                    tracing::warn!(
                        "checkpoint {at}: process 0 has not committed it within {CLUSTER_WAIT:?} \
                         (is `checkpoint.dir` {} shared by every process?)",
                        store.location()
                    );
                    continue;
                }
                committed += 1;
                live.checkpointed.store(at, Ordering::Release);
                if !positions.is_empty() {
                    if let Ok(mut p) = live.checkpointed_positions.lock() {
                        *p = Some(positions);
                    }
                }
                metrics.checkpoints.inc();
                metrics.checkpoint_at.set(at as i64);
                if let Some(l) = &log {
                    let _ = l.send(LogReq::Truncate(at));
                }
                continue;
            }
            // A cluster's checkpoint is complete once every process has written its parts.
            // A process that lags is waited for (warned about every `CLUSTER_WAIT`); only a
            // stop gives up, since nothing else would end the wait.
            let (waited, mut warned) = (std::time::Instant::now(), std::time::Instant::now());
            loop {
                let missing = store.unwritten(at, processes);
                if missing.is_empty() {
                    break;
                }
                if live.sink_failed.load(Ordering::Acquire) {
                    return Ok(committed);
                }
                let late = format!(
                    "checkpoint {at}: process {missing:?} has not written its parts to {} \
                     after {:.0?}",
                    store.describe(at, ""),
                    waited.elapsed()
                );
                if waited.elapsed() > CLUSTER_WAIT && live.stopping() {
                    return Err(format!("{late}; stopping without it"));
                }
                if warned.elapsed() > CLUSTER_WAIT {
                    warned = std::time::Instant::now();
                    tracing::warn!("{late}");
                }
                std::thread::sleep(CLUSTER_POLL);
            }
            store.commit(&m)?;
            // Once the deltas outweigh the full checkpoint they follow, reading the chain
            // costs more than a new full one: ask worker 0 for one next.
            if m.chain.len() == 1 {
                (full_bytes, delta_bytes) = (entry.2, 0);
            } else {
                delta_bytes += entry.2;
            }
            if delta_bytes > full_bytes {
                want_full.store(true, Ordering::Release);
            }
            pending.remove(&at);
            // Older instants can never complete now.
            pending.retain(|t, _| *t > at);
            committed += 1;
            live.checkpointed.store(at, Ordering::Release);
            if !positions.is_empty() {
                if let Ok(mut p) = live.checkpointed_positions.lock() {
                    *p = Some(positions);
                }
            }
            metrics.checkpoints.inc();
            metrics.checkpoint_at.set(at as i64);
            metrics
                .checkpoint_ms
                .set(started.elapsed().as_secs_f64() * 1e3);
            if let Some(l) = &log {
                let _ = l.send(LogReq::Truncate(at));
            }
            tracing::debug!("checkpoint {at} complete");
        }
    }
    Ok(committed)
}

/// [`definitions_hash`] of the segment and journey files' texts and the segment changes
/// through the API over them (none: the files' hash alone, as before there were any).
/// Pauses change no plan or state layout, and are left out.
pub fn definitions_hash_with(segments: &str, journeys: &str, changes: &[DefChange]) -> String {
    let changes: Vec<&DefChange> = changes.iter().filter(|c| c.kind.changes_plan()).collect();
    if changes.is_empty() {
        return definitions_hash(&[segments, journeys]);
    }
    let changes = serde_json::to_string(&changes).unwrap_or_default();
    definitions_hash(&[segments, journeys, &changes])
}

/// A hash of the definitions the state was built with.
pub fn definitions_hash(texts: &[&str]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for t in texts {
        h.update(t.as_bytes());
        h.update(&[0]);
    }
    format!("{:032x}", h.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_operators::event::EventType;

    fn ev(user: &str, id: &str) -> Event {
        Event {
            user: user.into(),
            kind: EventType::Track,
            event: Some("A".into()),
            message_id: id.into(),
            timestamp: 1,
            properties: serde_json::Map::from_iter([(
                "x".to_string(),
                serde_json::json!([1, {"y": null}]),
            )]),
            context: Default::default(),
            traits: Default::default(),
        }
    }

    #[test]
    fn the_log_keeps_what_was_synced_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let none = Positions::new();
        let (mut log, old) = IngestLog::open(dir.path(), 0).unwrap();
        assert!(old.records.is_empty());
        log.append(10, &[ev("a", "1"), ev("b", "2")], &none)
            .unwrap();
        log.append(20, &[ev("c", "3")], &none).unwrap();
        // A crash in the middle of a record.
        let path = log.files[0].1.clone();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let (log, from_20) = IngestLog::open(dir.path(), 20).unwrap();
        assert_eq!(from_20.last, 20);
        assert_eq!(from_20.records.len(), 1);
        assert_eq!(from_20.records[0].ev, ev("c", "3"));
        drop(log);
        let (mut log, all) = IngestLog::open(dir.path(), 0).unwrap();
        let stamps = |l: &Logged| l.records.iter().map(|f| f.at).collect::<Vec<_>>();
        assert_eq!(stamps(&all), [10, 10, 20]);
        // Truncation removes only whole files before the instant.
        log.truncate(15);
        log.append(30, &[ev("d", "4")], &none).unwrap();
        log.truncate(30);
        assert_eq!(log.files.len(), 1);
        drop(log);
        let (_, rest) = IngestLog::open(dir.path(), 0).unwrap();
        assert_eq!(stamps(&rest), [30]);
    }

    #[test]
    fn kafka_positions_logged_after_an_instant_move_the_checkpoints_on() {
        let dir = tempfile::tempdir().unwrap();
        let at = |t: &str, p: i32, o: i64| ((t.to_string(), p), o);
        let (mut log, _) = IngestLog::open(dir.path(), 0).unwrap();
        log.append(10, &[ev("a", "1")], &Positions::from([at("e", 0, 5)]))
            .unwrap();
        // A batch of rejected messages only: positions, no events.
        log.append(20, &[], &Positions::from([at("e", 1, 3)]))
            .unwrap();
        log.append(30, &[ev("b", "2")], &Positions::from([at("e", 0, 9)]))
            .unwrap();
        drop(log);
        let (_, from_20) = IngestLog::open(dir.path(), 20).unwrap();
        assert_eq!(
            from_20.positions,
            Positions::from([at("e", 0, 9), at("e", 1, 3)])
        );
        assert_eq!(from_20.records.len(), 1);
        let (_, from_31) = IngestLog::open(dir.path(), 31).unwrap();
        assert!(from_31.positions.is_empty());
        assert_eq!(from_31.last, 30);
        // A log written before positions records existed reads the same (no flag bit).
        let mut old = Vec::new();
        encode(7, &ev("c", "3"), &mut old).unwrap();
        assert!(matches!(decode(&old, 0), Some((7, Record::Event(_), _))));
    }

    #[test]
    fn a_part_of_another_format_or_damaged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().to_string_lossy());
        store.write_part(5, "p", &vec![1u32, 2, 3]).unwrap();
        assert_eq!(store.read_part::<Vec<u32>>(5, "p").unwrap(), [1, 2, 3]);
        let path = store.dir(5).join("p");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(store
            .read_part::<Vec<u32>>(5, "p")
            .unwrap_err()
            .contains("damaged"));
        // No manifest: not complete, so not the latest.
        assert!(store.latest().unwrap().is_none());
        let m = Manifest {
            format: FORMAT,
            at: 5,
            chain: vec![5],
            workers: 1,
            processes: 1,
            journeys: false,
            definitions: String::new(),
            segments_text: String::new(),
            journeys_text: String::new(),
            segment_changes: Vec::new(),
        };
        store.commit(&m).unwrap();
        assert_eq!(store.latest().unwrap().unwrap().at, 5);
        let old = Manifest { format: 0, ..m };
        std::fs::write(
            store.dir(5).join("MANIFEST"),
            serde_json::to_string(&old).unwrap(),
        )
        .unwrap();
        assert!(store.latest().unwrap_err().contains("format 0"));
    }

    #[test]
    fn a_cluster_checkpoint_is_complete_once_every_process_marked_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().to_string_lossy());
        store.write_part(7, "w0.segments", &1u32).unwrap();
        store.write_part(7, "w2.segments", &1u32).unwrap();
        assert_eq!(store.unwritten(7, 3), [1, 2]);
        store.mark_written(7, 2).unwrap();
        assert_eq!(store.unwritten(7, 3), [1]);
        store.mark_written(7, 1).unwrap();
        assert!(store.unwritten(7, 3).is_empty());
        assert!(!store.committed(7));
        // A manifest of a single-process Herald (no `processes`) reads as one process.
        let text = format!(
            r#"{{"format":{FORMAT},"at":7,"chain":[7],"workers":1,"journeys":false,"definitions":""}}"#
        );
        std::fs::write(store.dir(7).join("MANIFEST"), text).unwrap();
        assert_eq!(store.latest().unwrap().unwrap().processes, 1);
        assert!(store.committed(7));
        assert!(!store.committed(8));
        assert_eq!(store.read_probe().0, Ok(None));
        store.write_probe(42).unwrap();
        assert_eq!(store.read_probe().0, Ok(Some(42)));
        // The probe is not a checkpoint.
        assert_eq!(store.instants().unwrap(), [7]);
        assert_eq!(process_part("sink", 0), "sink");
        assert_eq!(process_part("sink", 2), "sink.p2");
    }
}
