//! The sink thread of `herald run`: hands segment changes and dead letters to their
//! outputs and says how far that is done.
//!
//! Owns [`Sink`]. Changes update the query state and metrics, are appended to
//! `segment_changes.jsonl` and produced to the changelog topic (key `user_id`, value the
//! same JSON line as the replay output). Dead letters go to `dead_letters.jsonl` and, in
//! Kafka mode, to the dead-letter topic with the original bytes and the reason and
//! source position in headers. On a watermark `f` the sink flushes its files, waits for
//! every Kafka ack (re-producing anything the broker refused), and then publishes
//! `durable = f`, which releases the workers' offset commits. An output that cannot be
//! written stops the service with that error: nothing after it is marked durable, so
//! nothing after it is committed.

use herald_connectors::journey_sink::{journey_row_line, message_line};
use herald_operators::journey::{JOut, Kind};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use herald_connectors::events::DeadLetter;
use herald_connectors::sink::{change_line_versioned, dead_letter_line, SegmentChange};
use herald_operators::time::Time;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::definitions::Versions;
use super::metrics::{ChangeLabel, JourneyLabel, SegmentLabel};
use super::Live;
use crate::EngineError;

/// Largest payload of a dead-letter record; longer originals are cut, with header
/// `herald.truncated_from` giving the original length.
pub const DEAD_LETTER_MAX_BYTES: usize = 256 * 1024;

/// The longest the sink waits for Kafka's acks when the service stops.
pub const FINAL_ACK_WAIT: Duration = Duration::from_secs(30);

/// A message to the sink thread.
pub enum SinkMsg {
    /// A membership change at `time`.
    Change {
        /// Segment index.
        segment: u16,
        /// User key.
        user: String,
        /// Instant (ms).
        time: Time,
        /// +1 or -1.
        diff: i64,
    },
    /// A rejected message.
    DeadLetter {
        /// What is written to the dead-letter file.
        letter: DeadLetter,
        /// The original bytes.
        raw: Vec<u8>,
        /// Topic, partition, offset when it came from Kafka.
        kafka: Option<(String, i32, i64)>,
    },
    /// A journey event or message action, at its instant.
    Journey(Time, JOut),
    /// A checkpoint was asked for at this instant (full or a delta): write the sink's
    /// part once the watermark passes it.
    Checkpoint(Time, bool),
    /// Every change before this instant has been sent.
    Watermark(Time),
    /// Flush and exit.
    Stop,
}

/// A record waiting for the broker's ack, kept to re-produce it if refused.
struct InFlight {
    topic: String,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
    ack: DeliveryFuture,
}

/// The sink's outputs.
pub struct Sink {
    changes_file: Option<BufWriter<File>>,
    dead_letters_file: Option<super::dead_letters::DeadLetterFile>,
    journey_file: Option<BufWriter<File>>,
    messages_file: Option<BufWriter<File>>,
    messages_topic: String,
    producer: Option<FutureProducer>,
    changes_topic: String,
    dead_letter_topic: String,
    in_flight: Vec<InFlight>,
    line: Vec<u8>,
    /// The first failed write since the last flush: the flush reports it.
    write_error: Option<String>,
    /// Message actions for the outbox, handed over at the next flush.
    outbox_pending: Vec<herald_operators::journey::MessageAction>,
    /// Changes waiting for the watermark to pass their instant: they are written in
    /// (instant, segment, user) order, so a file holds exactly the instants before a
    /// checkpoint up to the length its part records.
    changes: Vec<(Time, u16, String, i64)>,
    /// Journey output waiting likewise.
    journey_out: Vec<(Time, JOut)>,
    /// Checkpoint instants asked for and not yet written.
    checkpoints: std::collections::BTreeMap<Time, bool>,
    /// Per topic and partition, the offset after the last record the broker acknowledged:
    /// a checkpoint records it, so a restart knows where to look for what it derives again.
    acked: BTreeMap<String, BTreeMap<i32, i64>>,
    /// After a restart: per topic, the records that landed after the checkpoint (values,
    /// with their counts). Derived again, they are not produced a second time.
    landed: BTreeMap<String, std::collections::HashMap<Vec<u8>, u32>>,
    /// Segment names and definition versions by index, as of catalog revision `names.0`
    /// (a change through the API may append a segment and adds a version).
    names: (u64, Vec<(String, Option<Versions>)>),
}

/// Where a restart's derived-again output starts: the checkpoint's instant, and per topic
/// and partition the acknowledged offsets it recorded (the changelog after them may hold
/// records derived again).
pub type Resume = BTreeMap<String, BTreeMap<i32, i64>>;

/// The order journey output is written in within an instant.
fn journey_key(o: &JOut) -> (u8, &str, &str, u32, u32) {
    match o {
        JOut::Row(r) => (0, &r.journey, &r.user_id, r.instance, r.seq),
        JOut::Message(m) => (1, &m.message_id, "", 0, 0),
        JOut::Write(..) => (2, "", "", 0, 0),
    }
}

/// Output files a checkpoint records the lengths of (what is derived again after it).
pub const DERIVED_FILES: [&str; 3] = [
    "segment_changes.jsonl",
    "journey_events.jsonl",
    "messages.jsonl",
];

/// Cuts the derived output files back to the lengths a checkpoint recorded: what was
/// written after it is derived again (and written again) from the ingest log.
pub fn cut_to_checkpoint(dir: &str, files: &BTreeMap<String, u64>) -> Result<(), EngineError> {
    for name in DERIVED_FILES {
        let path = Path::new(dir).join(name);
        let Ok(f) = OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        let want = files.get(name).copied().unwrap_or(0);
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < want {
            return Err(EngineError::Usage(format!(
                "{} holds {len} bytes, fewer than the {want} the checkpoint recorded: it \
                 was changed outside Herald; move it away to start it anew",
                path.display()
            )));
        }
        if len > want {
            tracing::info!(file = %path.display(), bytes = len - want, "cut back to the checkpoint");
            f.set_len(want).and_then(|_| f.sync_all()).map_err(|e| {
                EngineError::Dataflow(format!("cannot cut {}: {e}", path.display()))
            })?;
        }
    }
    Ok(())
}

/// Appends a line to an output file, remembering the first failure.
fn append(
    file: &mut Option<BufWriter<File>>,
    line: &[u8],
    name: &str,
    failed: &mut Option<String>,
) {
    if let Some(f) = file {
        if let Err(e) = f.write_all(line) {
            failed.get_or_insert_with(|| format!("cannot write {name}: {e}"));
        }
    }
}

/// Cuts a last line without its newline: the tail a crash (kill -9 in the middle of a
/// buffered write) left behind. It was never durable, so its records are produced again
/// from events that were not committed; keeping it would glue it to the next line.
fn trim_torn_tail(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(path) else {
        return Ok(());
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the last newline, reading backwards in chunks.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            tracing::warn!(file = %path.display(), bytes = len - (start + i as u64 + 1), "cut a torn last line");
            return f.set_len(start + i as u64 + 1);
        }
        end = start;
    }
    f.set_len(0)
}

fn open_append(dir: &str, name: &str) -> Result<BufWriter<File>, EngineError> {
    let path = Path::new(dir).join(name);
    trim_torn_tail(&path).map_err(|e| {
        EngineError::Usage(format!(
            "config: `output.dir`: cannot repair {}: {e}",
            path.display()
        ))
    })?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(|f| BufWriter::with_capacity(256 * 1024, f))
        .map_err(|e| {
            EngineError::Usage(format!(
                "config: `output.dir`: cannot open {}: {e}",
                path.display()
            ))
        })
}

impl Sink {
    /// Opens the files (creating the output directory) and the Kafka producer. `resume`:
    /// after a restart with Kafka output, the acknowledged offsets the checkpoint recorded
    /// (empty: none, read the topics whole); what landed after them is not produced again.
    pub fn open(live: &Live, resume: Option<&Resume>) -> Result<Sink, EngineError> {
        let dir = &live.config.output.dir;
        let (changes_file, dead_letters_file) = if dir.is_empty() {
            (None, None)
        } else {
            std::fs::create_dir_all(dir).map_err(|e| {
                EngineError::Usage(format!("config: `output.dir`: cannot create {dir}: {e}"))
            })?;
            (
                Some(open_append(dir, "segment_changes.jsonl")?),
                Some(super::dead_letters::DeadLetterFile::open(
                    Path::new(dir),
                    live.config.http.dead_letter_file_bytes,
                    live.config.http.dead_letter_files,
                    open_append(dir, "dead_letters.jsonl")?,
                )),
            )
        };
        let (journey_file, messages_file) = if dir.is_empty() || live.journeys.is_none() {
            (None, None)
        } else {
            (
                Some(open_append(dir, "journey_events.jsonl")?),
                Some(open_append(dir, "messages.jsonl")?),
            )
        };
        let messages_topic = live
            .config
            .kafka
            .as_ref()
            .map(|k| k.messages_topic.clone())
            .unwrap_or_default();
        let (producer, changes_topic, dead_letter_topic) = match &live.config.kafka {
            Some(k) => (
                Some(super::kafka::producer(k)?),
                k.changes_topic.clone(),
                k.dead_letter_topic.clone(),
            ),
            None => (None, String::new(), String::new()),
        };
        // Where the checkpoint left off (a topic nothing is produced to before the next
        // checkpoint keeps its offsets); on a first start with durable state, the topics'
        // ends now, so that even the first checkpoint bounds what a restart reads back.
        let mut acked: Resume = resume.cloned().unwrap_or_default();
        if let (Some(k), None, Some(_), true) = (
            &live.config.kafka,
            resume,
            &producer,
            live.checkpointer.is_some(),
        ) {
            for topic in [&changes_topic, &messages_topic] {
                acked.insert(topic.clone(), super::kafka::end_offsets(k, topic)?);
            }
        }
        let mut landed = BTreeMap::new();
        if let (Some(k), Some(from), Some(_)) = (&live.config.kafka, resume, &producer) {
            for topic in [&changes_topic, &messages_topic] {
                let after = from.get(topic.as_str()).cloned().unwrap_or_default();
                let records = super::kafka::read_after(k, topic, &after)?;
                if !records.is_empty() {
                    tracing::info!(
                        "{} records in {topic} after the checkpoint: not produced again",
                        records.values().sum::<u32>()
                    );
                }
                landed.insert(topic.clone(), records);
            }
        }
        Ok(Sink {
            changes_file,
            dead_letters_file,
            journey_file,
            messages_file,
            messages_topic,
            producer,
            changes_topic,
            dead_letter_topic,
            in_flight: Vec::new(),
            line: Vec::with_capacity(256),
            write_error: None,
            outbox_pending: Vec::new(),
            changes: Vec::new(),
            journey_out: Vec::new(),
            checkpoints: BTreeMap::new(),
            acked,
            landed,
            names: (u64::MAX, Vec::new()),
        })
    }

    /// The name of segment `i` in the definitions in force, and the version that
    /// produced a change at `t` (segments changed through the API only).
    fn segment_name(&mut self, live: &Live, i: u16, t: Time) -> (String, Option<u32>) {
        let v = live.defs_version.load(Ordering::Acquire);
        if self.names.0 != v {
            if let Ok(c) = live.defs.read() {
                let list = (0..c.entries.len())
                    .map(|k| (c.entries[k].name.clone(), c.versions(k)))
                    .collect();
                self.names = (v, list);
            }
        }
        match self.names.1.get(i as usize) {
            Some((name, versions)) => (name.clone(), versions.as_ref().map(|x| x.at(t))),
            None => (format!("#{i}"), None),
        }
    }

    /// Writes what the watermark `f` released, in order, writing the sink's part of
    /// every checkpoint at or before `f` at its place.
    fn release(&mut self, live: &Live, f: Time) -> Result<(), EngineError> {
        loop {
            let next_ck = self.checkpoints.keys().next().copied().filter(|&c| c <= f);
            let cut = next_ck.unwrap_or(f);
            let mut changes: Vec<_> = self.changes.extract_if(.., |c| c.0 < cut).collect();
            changes.sort_unstable();
            let mut out: Vec<_> = self.journey_out.extract_if(.., |o| o.0 < cut).collect();
            out.sort_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| journey_key(&a.1).cmp(&journey_key(&b.1)))
            });
            // Journey output first: a message's outbox entry is at the flush either way.
            for (_, o) in out {
                self.journey(live, o);
            }
            for (t, seg, user, diff) in changes {
                self.change(live, seg, user, t, diff);
            }
            let Some(at) = next_ck else { return Ok(()) };
            let full = self.checkpoints.remove(&at).unwrap_or(true);
            self.checkpoint_part(live, at, full)?;
        }
    }

    /// The sink's part of checkpoint `at`: synced file lengths and the query API's
    /// identify traits.
    fn checkpoint_part(&mut self, live: &Live, at: Time, full: bool) -> Result<(), EngineError> {
        if live.checkpointer.is_none() {
            return Ok(());
        }
        // Every record before `at` acknowledged by the broker (and the files flushed, the
        // outbox handed its actions): a checkpoint never holds what a crash could lose
        // from the topics. A broker that does not answer while stopping: no part, so the
        // checkpoint stays incomplete.
        if !self.flush(live)? {
            return Ok(());
        }
        let Some(tx) = &live.checkpointer else {
            return Ok(());
        };
        let mut files = BTreeMap::new();
        for (name, f) in [
            (DERIVED_FILES[0], &mut self.changes_file),
            (DERIVED_FILES[1], &mut self.journey_file),
            (DERIVED_FILES[2], &mut self.messages_file),
        ] {
            if let Some(f) = f {
                // Flushed, not synced: the checkpointer syncs the files before it commits
                // (an fsync here would hold every change behind it).
                let len = f
                    .get_ref()
                    .metadata()
                    .map_err(|e| EngineError::Dataflow(format!("cannot read {name}: {e}")))?
                    .len();
                files.insert(name.to_string(), len);
            }
        }
        let traits = match live.state.write() {
            Ok(mut s) => s.traits_part(full),
            Err(_) => Vec::new(),
        };
        let _ = tx.send(super::durable::CkMsg::Sink(
            at,
            Box::new(super::durable::SinkPart {
                files,
                traits,
                full,
                topics: self.acked.clone(),
            }),
        ));
        Ok(())
    }

    /// Runs until [`SinkMsg::Stop`] (or every sender is gone). Everything queued is taken
    /// before a flush, so one flush (one round of Kafka acks) covers every watermark that
    /// arrived meanwhile: the sink keeps up however often workers report progress.
    pub fn run(mut self, rx: Receiver<SinkMsg>, live: &Live) -> Result<(), EngineError> {
        let tick = Duration::from_millis(live.config.engine.tick_ms.max(1));
        let mut stop = false;
        // The highest watermark seen, and how far it has been released (the ingest log's
        // sync can hold a release back; it is taken up again when the sync moves on).
        let (mut seen, mut released): (Time, Time) = (0, 0);
        while !stop {
            let mut watermark: Option<Time> = None;
            let mut next = match rx.recv_timeout(tick) {
                Ok(m) => Some(m),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            while let Some(msg) = next.take() {
                match msg {
                    SinkMsg::Change {
                        segment,
                        user,
                        time,
                        diff,
                    } => self.changes.push((time, segment, user, diff)),
                    SinkMsg::DeadLetter { letter, raw, kafka } => {
                        self.dead_letter(live, letter, raw, kafka)
                    }
                    SinkMsg::Journey(t, o) => self.journey_out.push((t, o)),
                    SinkMsg::Checkpoint(at, full) => {
                        self.checkpoints.insert(at, full);
                    }
                    SinkMsg::Watermark(f) => watermark = Some(watermark.map_or(f, |w| w.max(f))),
                    SinkMsg::Stop => {
                        stop = true;
                        break;
                    }
                }
                next = rx.try_recv().ok();
            }
            if let Some(f) = watermark {
                seen = seen.max(f);
            }
            if stop {
                // What the log syncs in its last moments belongs to the final checkpoint.
                let waited = Instant::now();
                while live.synced_everywhere() < seen && waited.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // Nothing derived from events the ingest log has not synced yet.
            let f = seen.min(live.synced_everywhere());
            if f <= released {
                continue;
            }
            self.release(live, f)?;
            released = f;
            live.released.fetch_max(f, Ordering::AcqRel);
            let started = Instant::now();
            let complete = self.flush(live)?;
            live.metrics
                .sink_flush_ms
                .set(started.elapsed().as_secs_f64() * 1e3);
            if complete {
                match &live.export {
                    // The exporter publishes it once the archive holds it (at a stop too:
                    // the final checkpoint waits for it).
                    Some(x) => {
                        let _ = x.send(super::export::ExportMsg::Watermark(f));
                    }
                    None => {
                        live.durable.fetch_max(f, Ordering::AcqRel);
                    }
                }
            }
        }
        // What no watermark released (instants the dataflow did not finish) is written
        // too; a restart cuts it off again if it follows the last checkpoint. Never what a
        // log (in a cluster, another process's) has not synced: that follows the last
        // checkpoint, and its event may be gone.
        self.checkpoints.clear();
        self.release(live, live.synced_everywhere())?;
        self.final_flush(live)
    }

    /// At exit: a broker that stays away must not hang the process. Waits up to
    /// [`FINAL_ACK_WAIT`] for acks; what is still unacknowledged is reported (its
    /// events' offsets were not committed, so they are consumed again on restart).
    fn final_flush(&mut self, live: &Live) -> Result<(), EngineError> {
        use futures::FutureExt;
        use rdkafka::producer::Producer;
        if let Some(p) = &self.producer {
            if let Err(e) = p.flush(FINAL_ACK_WAIT) {
                tracing::warn!("Kafka producer flush at exit: {e}");
            }
        }
        let unacked = std::mem::take(&mut self.in_flight)
            .into_iter()
            .filter_map(|mut r| {
                let acked = matches!((&mut r.ack).now_or_never(), Some(Ok(Ok(_))));
                (!acked).then_some(())
            })
            .count();
        if unacked > 0 {
            live.metrics.error("kafka_producer");
            tracing::error!("{unacked} records were not acknowledged by Kafka at exit");
        }
        self.flush_files(live)?;
        self.hand_to_outbox(live)
    }

    /// Records the pending message actions in the outbox (one durable commit) and
    /// queues the new ones for delivery. A failure stops the service: nothing after it
    /// becomes durable, so its events are consumed again.
    fn hand_to_outbox(&mut self, live: &Live) -> Result<(), EngineError> {
        let Some(n) = live.notify.get() else {
            return Ok(());
        };
        if self.outbox_pending.is_empty() {
            return Ok(());
        }
        let actions = std::mem::take(&mut self.outbox_pending);
        let fresh = n
            .delivery
            .outbox()
            .enqueue_blocking(actions, super::now_ms() as i64)
            .map_err(|e| {
                live.metrics.error("outbox");
                EngineError::Dataflow(e.to_string())
            })?;
        n.delivery.submit(fresh);
        Ok(())
    }

    fn journey(&mut self, live: &Live, o: JOut) {
        match o {
            JOut::Row(r) => {
                if let Some(x) = &live.export {
                    let _ = x.send(super::export::ExportMsg::Journey(r.clone()));
                }
                if matches!(r.kind, Kind::Suppressed | Kind::Deferred) {
                    if let Ok(mut s) = live.state.write() {
                        s.note_held_send(&r);
                    }
                }
                live.metrics
                    .journey_events
                    .get_or_create(&JourneyLabel {
                        journey: r.journey.clone(),
                        kind: r.kind.as_str().into(),
                    })
                    .inc();
                self.line.clear();
                journey_row_line(&r, &mut self.line);
                append(
                    &mut self.journey_file,
                    &self.line,
                    "journey_events.jsonl",
                    &mut self.write_error,
                );
            }
            JOut::Message(m) => {
                if let Some(x) = &live.export {
                    let _ = x.send(super::export::ExportMsg::Message(Box::new(m.clone())));
                }
                live.metrics
                    .message_delay_ms
                    .observe(super::now_ms().saturating_sub(m.time.max(0) as u64) as f64);
                self.line.clear();
                message_line(&m, &mut self.line);
                append(
                    &mut self.messages_file,
                    &self.line,
                    "messages.jsonl",
                    &mut self.write_error,
                );
                if self.producer.is_some() {
                    let payload = self.line[..self.line.len() - 1].to_vec();
                    let topic = self.messages_topic.clone();
                    self.produce(live, topic, m.user_id.clone().into_bytes(), payload, None);
                }
                if live.notify.get().is_some() {
                    self.outbox_pending.push(m);
                }
            }
            JOut::Write(..) => {}
        }
    }

    fn change(&mut self, live: &Live, segment: u16, user: String, time: Time, diff: i64) {
        live.metrics
            .change_delay_ms
            .observe(super::now_ms().saturating_sub(time) as f64);
        let (name, version) = self.segment_name(live, segment, time);
        let name = &name;
        let size = match live.state.write() {
            Ok(mut state) => state.apply(segment, &user, diff),
            Err(_) => 0,
        };
        live.metrics
            .segment_size
            .get_or_create(&SegmentLabel {
                segment: name.clone(),
            })
            .set(size as i64);
        live.metrics
            .segment_changes
            .get_or_create(&ChangeLabel {
                segment: name.clone(),
                direction: if diff > 0 { "enter" } else { "leave" }.into(),
            })
            .inc();
        let row = SegmentChange {
            segment: name.clone(),
            user_id: user,
            diff,
            time: time as i64,
        };
        if let Some(x) = &live.export {
            // The file's definition is version 1 (the JSONL line then has no field).
            let v = version.unwrap_or(1);
            let _ = x.send(super::export::ExportMsg::Change(row.clone(), v));
        }
        self.line.clear();
        change_line_versioned(&row, version, &mut self.line);
        append(
            &mut self.changes_file,
            &self.line,
            "segment_changes.jsonl",
            &mut self.write_error,
        );
        if self.producer.is_some() {
            // The Kafka value is the JSON object without the file's newline.
            let payload = self.line[..self.line.len() - 1].to_vec();
            let topic = self.changes_topic.clone();
            self.produce(live, topic, row.user_id.into_bytes(), payload, None);
        }
    }

    fn dead_letter(
        &mut self,
        live: &Live,
        letter: DeadLetter,
        raw: Vec<u8>,
        kafka: Option<(String, i32, i64)>,
    ) {
        self.line.clear();
        dead_letter_line(&letter, &mut self.line);
        if let Some(f) = &mut self.dead_letters_file {
            f.write(&self.line, &live.metrics);
        }
        if self.producer.is_some() {
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "herald.reason",
                    value: Some(letter.reason.as_str()),
                })
                .insert(Header {
                    key: "herald.detail",
                    value: Some(letter.detail.as_str()),
                })
                .insert(Header {
                    key: "herald.source",
                    value: Some(letter.source.as_str()),
                });
            if let Some((topic, partition, offset)) = &kafka {
                headers = headers
                    .insert(Header {
                        key: "herald.topic",
                        value: Some(topic.as_str()),
                    })
                    .insert(Header {
                        key: "herald.partition",
                        value: Some(&partition.to_string()),
                    })
                    .insert(Header {
                        key: "herald.offset",
                        value: Some(&offset.to_string()),
                    });
            }
            if let Some(i) = letter.batch_index {
                headers = headers.insert(Header {
                    key: "herald.batch_index",
                    value: Some(&i.to_string()),
                });
            }
            let mut raw = raw;
            if raw.len() > DEAD_LETTER_MAX_BYTES {
                // A broker refuses records over its limit (1 MB by default) forever; the
                // dead-letter file keeps the whole text.
                headers = headers.insert(Header {
                    key: "herald.truncated_from",
                    value: Some(&raw.len().to_string()),
                });
                raw.truncate(DEAD_LETTER_MAX_BYTES);
            }
            let topic = self.dead_letter_topic.clone();
            let key = letter.source.into_bytes();
            self.produce(live, topic, key, raw, Some(headers));
        }
    }

    /// Queues a record, waiting while librdkafka's queue is full.
    fn produce(
        &mut self,
        live: &Live,
        topic: String,
        key: Vec<u8>,
        payload: Vec<u8>,
        headers: Option<OwnedHeaders>,
    ) {
        let Some(producer) = &self.producer else {
            return;
        };
        if let Some(n) = self
            .landed
            .get_mut(&topic)
            .and_then(|m| m.get_mut(&payload))
        {
            if *n > 0 {
                // Derived again after a restart, and already in the topic.
                *n -= 1;
                return;
            }
        }
        loop {
            let mut record = FutureRecord::to(&topic).key(&key).payload(&payload);
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            match producer.send_result(record) {
                Ok(ack) => {
                    self.in_flight.push(InFlight {
                        topic,
                        key,
                        payload,
                        headers,
                        ack,
                    });
                    return;
                }
                Err((e, _)) => {
                    live.metrics.error("kafka_producer");
                    tracing::warn!("producing to {topic}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Flushes files, hands message actions to the outbox, and waits for every Kafka
    /// ack, re-producing refused records.
    /// Returns false, without waiting further, when the service is stopping and the
    /// broker has not acknowledged within [`FINAL_ACK_WAIT`]: then nothing is marked
    /// durable and the events behind it stay uncommitted.
    fn flush(&mut self, live: &Live) -> Result<bool, EngineError> {
        use futures::FutureExt;
        use rdkafka::producer::Producer;
        self.flush_files(live)?;
        self.hand_to_outbox(live)?;
        let started = Instant::now();
        while !self.in_flight.is_empty() {
            if let Some(p) = &self.producer {
                while p.in_flight_count() > 0 {
                    // Returns early once everything is delivered (or failed).
                    let _ = p.flush(Duration::from_millis(100));
                    if live.stopping() && started.elapsed() > FINAL_ACK_WAIT {
                        return Ok(false);
                    }
                }
            }
            for mut rec in std::mem::take(&mut self.in_flight) {
                match (&mut rec.ack).now_or_never() {
                    Some(Ok(Ok(d))) => {
                        let next = self
                            .acked
                            .entry(rec.topic.clone())
                            .or_default()
                            .entry(d.partition)
                            .or_insert(0);
                        *next = (*next).max(d.offset + 1);
                    }
                    // Delivered moments ago; its callback has not run yet.
                    None => self.in_flight.push(rec),
                    Some(failed) => {
                        let why = match failed {
                            Ok(Err((e, _))) => e.to_string(),
                            _ => "producer dropped the record".to_string(),
                        };
                        live.metrics.error("kafka_producer");
                        tracing::warn!("delivery to {} failed: {why}; producing again", rec.topic);
                        std::thread::sleep(Duration::from_millis(50));
                        self.produce(live, rec.topic, rec.key, rec.payload, rec.headers);
                    }
                }
            }
            if !self.in_flight.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(true)
    }

    fn flush_files(&mut self, live: &Live) -> Result<(), EngineError> {
        if let Some(e) = self.write_error.take() {
            live.metrics.error("file");
            return Err(EngineError::Dataflow(e));
        }
        if let Some(f) = &mut self.dead_letters_file {
            f.flush(&live.metrics);
        }
        for f in [
            &mut self.changes_file,
            &mut self.journey_file,
            &mut self.messages_file,
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = f.flush() {
                live.metrics.error("file");
                return Err(EngineError::Dataflow(format!(
                    "cannot flush an output file: {e}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::trim_torn_tail;

    #[test]
    fn a_torn_last_line_is_cut_and_whole_lines_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl");
        for (before, after) in [
            ("{\"a\":1}\n{\"b\":", "{\"a\":1}\n"),
            ("{\"a\":1}\n", "{\"a\":1}\n"),
            ("{\"torn", ""),
            ("", ""),
        ] {
            std::fs::write(&p, before).unwrap();
            trim_torn_tail(&p).unwrap();
            assert_eq!(std::fs::read_to_string(&p).unwrap(), after, "{before:?}");
        }
        // A missing file is fine (it is created later).
        trim_torn_tail(&dir.path().join("none")).unwrap();
    }
}
