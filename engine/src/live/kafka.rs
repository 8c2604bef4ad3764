//! Kafka clients of `herald run` (rdkafka over the bundled librdkafka).
//!
//! Owns client configuration (one place for the properties that matter to latency and
//! delivery), the per-worker consumer with its statistics callback (consumer lag per
//! partition into `/metrics`), the producers, and creating Herald's own output topics.
//!
//! Delivery settings: consumers never auto-commit (workers commit once changes are
//! durable; with durable state the reader commits the latest checkpoint's positions);
//! producers retry forever (`message.timeout.ms = 0`), so a broker outage
//! delays output rather than losing it; `linger.ms` is `kafka.linger_ms` (5 ms by default,
//! see docs/benchmarks.md for why not 0).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_connectors::events::DeadLetter;
use herald_operators::event::{parse_message, Event, Limits};
use rdkafka::consumer::CommitMode;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::durable::{LogReq, Positions};
use super::metrics::PartitionLabel;
use super::sink::SinkMsg;
use super::Live;
use crate::config::KafkaConfig;
use crate::EngineError;

/// Partitions of the topics Herald creates for its own output.
pub const OUTPUT_PARTITIONS: i32 = 4;

/// The base client config: brokers plus the user's extra properties.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

/// Producer config for changes, dead letters and HTTP ingest.
pub fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("linger.ms", k.linger_ms.to_string())
        .set("message.timeout.ms", "0")
        .set("acks", "all");
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

/// A producer (used from the sink thread and the HTTP handlers).
pub fn producer(k: &KafkaConfig) -> Result<FutureProducer, EngineError> {
    producer_config(k)
        .create()
        .map_err(|e| EngineError::Usage(format!("config: `kafka`: cannot create a producer: {e}")))
}

/// The consumer's context: exports consumer lag from librdkafka's statistics.
pub struct KafkaContext {
    live: Arc<Live>,
}

impl ClientContext for KafkaContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.live
                    .metrics
                    .consumer_lag
                    .get_or_create(&PartitionLabel {
                        topic: topic.clone(),
                        partition: *partition,
                    })
                    .set(p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for KafkaContext {}

/// A consumer in the configured group, subscribed to the events topics. Each worker
/// has one, so the group spreads partitions over workers (and processes).
pub fn consumer(
    k: &KafkaConfig,
    live: Arc<Live>,
) -> Result<BaseConsumer<KafkaContext>, EngineError> {
    let consumer = unsubscribed(k, live)?;
    let topics: Vec<&str> = k.events_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| {
        EngineError::Usage(format!(
            "config: `kafka.events_topics`: cannot subscribe to {topics:?}: {e}"
        ))
    })?;
    Ok(consumer)
}

/// A consumer with the group's settings, not yet subscribed or assigned.
fn unsubscribed(
    k: &KafkaConfig,
    live: Arc<Live>,
) -> Result<BaseConsumer<KafkaContext>, EngineError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("fetch.wait.max.ms", k.fetch_wait_max_ms.to_string())
        .set("statistics.interval.ms", "1000")
        // A member that vanished (crash, or a broker that ignores LeaveGroup) hands its
        // partitions over after 10 s rather than librdkafka's default 45 s.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .set("enable.partition.eof", "false");
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c.create_with_context(KafkaContext { live })
        .map_err(|e| EngineError::Usage(format!("config: `kafka`: cannot create a consumer: {e}")))
}

/// Bytes a Kafka message (or batch item) may exceed `engine.max_message_bytes` by: the
/// `receivedAt` and `sentAt` fields HTTP ingest adds to a message it accepted before
/// producing it.
const RECEIVE_FIELDS_SLACK: usize = 128;

/// Parses one Kafka message: returns its events and dead-letters its rejections.
pub fn parse_record(
    live: &Live,
    payload: &[u8],
    received: i64,
    (topic, partition, offset): (&str, i32, i64),
) -> Vec<Event> {
    let limits = Limits {
        max_message_bytes: live.limits.max_message_bytes + RECEIVE_FIELDS_SLACK,
    };
    let (events, rejections) = parse_message(payload, Some(received), limits);
    for _ in &events {
        live.metrics.event_in("kafka");
    }
    for r in rejections {
        // A batch item is dead-lettered as itself, not as the whole envelope.
        let raw = r.item.map_or_else(|| payload.to_vec(), String::into_bytes);
        live.metrics.dead_letter(r.reason.as_str());
        live.to_sink(SinkMsg::DeadLetter {
            letter: DeadLetter {
                source: format!("kafka:{topic}/{partition}"),
                line: offset.max(0) as u64,
                batch_index: r.batch_index,
                reason: r.reason,
                detail: r.detail,
                raw: String::from_utf8_lossy(&raw).into_owned(),
            },
            raw,
            kafka: Some((topic.to_string(), partition, offset)),
        });
    }
    events
}

/// Most messages in one batch handed to the ingest log.
const READER_BATCH: usize = 8192;

/// How often the reader looks for new partitions of the events topics.
const METADATA_EVERY: Duration = Duration::from_secs(5);

/// The Kafka reader of durable Kafka mode (see [`super::durable`]): consumes every
/// partition of the events topics (in a cluster, this process's share) from `positions` on (a partition without one starts at
/// the group's committed offset, else at `auto_offset_reset`), hands what it parsed to the
/// ingest log with the partitions' next offsets, and commits the latest complete
/// checkpoint's positions to the group. Reads until the service stops; returns once
/// `finish` is set, after a last commit.
pub fn run_reader(
    live: Arc<Live>,
    mut positions: Positions,
    log: Sender<LogReq>,
    finish: Arc<AtomicBool>,
) -> Result<(), String> {
    let Some(k) = live.config.kafka.clone() else {
        return Ok(());
    };
    let consumer = unsubscribed(&k, Arc::clone(&live)).map_err(|e| e.to_string())?;
    let tick = Duration::from_millis(live.config.engine.tick_ms.max(1));
    let limit = super::INGEST_QUEUE * live.ingest.len();
    let mut assigned: Vec<(String, i32)> = Vec::new();
    let mut looked = Instant::now() - METADATA_EVERY;
    let mut last_error_log = Instant::now() - Duration::from_secs(60);
    let mut warn = |what: String| {
        live.metrics.error("kafka_consumer");
        if last_error_log.elapsed() > Duration::from_secs(5) {
            tracing::warn!("Kafka reader: {what} (retrying)");
            last_error_log = Instant::now();
        }
    };
    while !live.stopping() {
        if looked.elapsed() >= METADATA_EVERY {
            looked = Instant::now();
            // In a cluster each process reads the partitions `p` with
            // `p % processes == process`.
            let (process, processes) = live.config.processes();
            let mine = partitions(&consumer, &k.events_topics).map(|mut found| {
                found.retain(|(_, p)| *p as usize % processes == process);
                found
            });
            match mine {
                Ok(found) if found != assigned => {
                    let mut tpl = TopicPartitionList::new();
                    for (topic, p) in &found {
                        let at = positions.get(&(topic.clone(), *p));
                        let offset = at.map_or(Offset::Stored, |o| Offset::Offset(*o));
                        tpl.add_partition_offset(topic, *p, offset)
                            .map_err(|e| format!("cannot assign {topic}/{p}: {e}"))?;
                    }
                    consumer
                        .assign(&tpl)
                        .map_err(|e| format!("cannot assign the events topics' partitions: {e}"))?;
                    tracing::info!("Kafka reader: reading {} partitions", found.len());
                    assigned = found;
                }
                Ok(_) => {}
                Err(e) => warn(e),
            }
        }
        commit_checkpointed(&consumer, &live, CommitMode::Async);
        // The workers are behind: let librdkafka's buffer hold the rest.
        if live.queued.load(Ordering::Acquire) > limit {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let mut events = Vec::new();
        let mut moved = Positions::new();
        let mut wait = tick;
        for _ in 0..READER_BATCH {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(m)) => {
                    let topic = m.topic();
                    let (partition, offset) = (m.partition(), m.offset());
                    let received = m.timestamp().to_millis().unwrap_or(super::now_ms() as i64);
                    let payload = m.payload().unwrap_or(&[]);
                    events.extend(parse_record(
                        &live,
                        payload,
                        received,
                        (topic, partition, offset),
                    ));
                    moved.insert((topic.to_string(), partition), offset + 1);
                }
                Some(Err(e)) => {
                    warn(e.to_string());
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if moved.is_empty() {
            continue;
        }
        let n = events.len();
        live.queued.fetch_add(n, Ordering::AcqRel);
        positions.extend(moved.iter().map(|(k, v)| (k.clone(), *v)));
        let req = LogReq::Append {
            events,
            done: None,
            positions: moved,
        };
        if log.send(req).is_err() {
            live.queued.fetch_sub(n, Ordering::AcqRel);
            break;
        }
    }
    // Stopping: what was read is in the log; the final checkpoint's positions come last.
    while !finish.load(Ordering::Acquire) {
        commit_checkpointed(&consumer, &live, CommitMode::Async);
        std::thread::sleep(Duration::from_millis(10));
    }
    commit_checkpointed(&consumer, &live, CommitMode::Sync);
    Ok(())
}

/// Every partition of `topics`, sorted.
fn partitions(
    consumer: &BaseConsumer<KafkaContext>,
    topics: &[String],
) -> Result<Vec<(String, i32)>, String> {
    let mut out = Vec::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| format!("cannot read the partitions of {topic}: {e}"))?;
        for t in md.topics() {
            if let Some(e) = t.error() {
                return Err(format!("topic {topic}: {:?}", RDKafkaErrorCode::from(e)));
            }
            out.extend(
                t.partitions()
                    .iter()
                    .map(|p| (t.name().to_string(), p.id())),
            );
        }
    }
    out.sort();
    Ok(out)
}

/// Commits the latest complete checkpoint's positions to the group, once.
fn commit_checkpointed(consumer: &BaseConsumer<KafkaContext>, live: &Live, mode: CommitMode) {
    let Some(p) = live
        .checkpointed_positions
        .lock()
        .ok()
        .and_then(|mut p| p.take())
    else {
        return;
    };
    commit_offsets(consumer, &p, mode, live);
}

/// Commits `offsets` (the next offset to read per partition) for the consumer's group. A
/// failure is counted and logged: a partition moved to another member (rebalance) or the
/// broker is away, and what it leaves uncommitted is read again and deduplicated.
pub fn commit_offsets(
    consumer: &BaseConsumer<KafkaContext>,
    offsets: &Positions,
    mode: CommitMode,
    live: &Live,
) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!("cannot commit {topic}/{partition}@{offset}: {e}");
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        live.metrics.error("kafka_commit");
        tracing::warn!("offset commit failed: {e}");
    }
}

/// Creates the changelog, dead-letter and message topics if missing. A broker that cannot be
/// reached is a named error here, at start, rather than a silent wait later.
/// `extra`: more topics to create on the same brokers (the `[notify.kafka]` channel's).
pub async fn ensure_output_topics(k: &KafkaConfig, extra: &[&str]) -> Result<(), EngineError> {
    let admin: AdminClient<DefaultClientContext> = client_config(k)
        .create()
        .map_err(|e| EngineError::Usage(format!("config: `kafka`: {e}")))?;
    let mut topics = vec![
        NewTopic::new(
            &k.changes_topic,
            OUTPUT_PARTITIONS,
            TopicReplication::Fixed(1),
        ),
        NewTopic::new(
            &k.dead_letter_topic,
            OUTPUT_PARTITIONS,
            TopicReplication::Fixed(1),
        ),
        NewTopic::new(
            &k.messages_topic,
            OUTPUT_PARTITIONS,
            TopicReplication::Fixed(1),
        ),
    ];
    for t in extra {
        topics.push(NewTopic::new(
            t,
            OUTPUT_PARTITIONS,
            TopicReplication::Fixed(1),
        ));
    }
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&topics, &opts).await.map_err(|e| {
        EngineError::Unavailable(format!(
            "Kafka at `kafka.brokers` = {}: cannot create Herald's topics: {e} (is the broker up?)",
            k.brokers
        ))
    })?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(EngineError::Unavailable(format!(
                    "Kafka at {}: cannot create topic {topic}: {code}",
                    k.brokers
                )))
            }
        }
    }
    Ok(())
}

/// How long a topic read back at a restart must stay quiet before its end is taken as
/// reached: produce requests a killed process had sent may still be on their way into
/// the broker (and a broker's reported end offsets were seen to lag what it serves).
const SETTLE: Duration = Duration::from_millis(500);

/// The records of `topic` after the offsets in `after` (per partition; a partition not in
/// it from its start) up to its end: values with their counts. Used at a restart to find
/// what was produced after the checkpoint (see [`super::sink::Sink::open`]). Only this
/// process produces to the topic, so its end is where it stays quiet for `SETTLE` (500 ms).
pub fn read_after(
    k: &KafkaConfig,
    topic: &str,
    after: &std::collections::BTreeMap<i32, i64>,
) -> Result<std::collections::HashMap<Vec<u8>, u32>, EngineError> {
    let unavailable = |e: String| {
        EngineError::Unavailable(format!(
            "Kafka at `kafka.brokers` = {}: cannot read {topic} back after the checkpoint: {e}",
            k.brokers
        ))
    };
    let (consumer, ids) = output_reader(k, topic).map_err(unavailable)?;
    let mut tpl = TopicPartitionList::new();
    for p in ids {
        let from = after
            .get(&p)
            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(topic, p, from)
            .map_err(|e| unavailable(e.to_string()))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| unavailable(e.to_string()))?;
    let mut out = std::collections::HashMap::new();
    let started = Instant::now();
    let mut last_seen = Instant::now();
    while last_seen.elapsed() < SETTLE {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(unavailable(format!(
                "it did not go quiet within 600 s ({} records read)",
                out.values().sum::<u32>()
            )));
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                *out.entry(m.payload().unwrap_or(&[]).to_vec()).or_insert(0) += 1;
                last_seen = Instant::now();
            }
            Some(Err(e)) => tracing::warn!("reading {topic} back: {e} (retrying)"),
            None => {}
        }
    }
    Ok(out)
}

/// Per partition of `topic`, its end offset as the broker reports it now (a lower bound:
/// tansu was seen to report less than it serves, never more).
pub fn end_offsets(
    k: &KafkaConfig,
    topic: &str,
) -> Result<std::collections::BTreeMap<i32, i64>, EngineError> {
    let unavailable = |e: String| {
        EngineError::Unavailable(format!(
            "Kafka at `kafka.brokers` = {}: cannot read the end offsets of {topic}: {e}",
            k.brokers
        ))
    };
    let (consumer, ids) = output_reader(k, topic).map_err(unavailable)?;
    let mut out = std::collections::BTreeMap::new();
    for p in ids {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| unavailable(e.to_string()))?;
        out.insert(p, high);
    }
    Ok(out)
}

/// A consumer (outside the group's membership) for reading one of Herald's own output
/// topics back at a start, and that topic's partitions.
fn output_reader(k: &KafkaConfig, topic: &str) -> Result<(BaseConsumer, Vec<i32>), String> {
    let consumer: BaseConsumer = client_config(k)
        .set("group.id", format!("{}-restart", k.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| e.to_string())?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let ids = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    Ok((consumer, ids))
}
