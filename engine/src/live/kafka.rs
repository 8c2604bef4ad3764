//! Kafka clients of `herald run` (rdkafka over the bundled librdkafka).
//!
//! Owns client configuration (one place for the properties that matter to latency and
//! delivery), the per-worker consumer with its statistics callback (consumer lag per
//! partition into `/metrics`), the producers, and creating Herald's own output topics.
//!
//! Delivery settings: consumers never auto-commit (workers commit once changes are
//! durable); producers retry forever (`message.timeout.ms = 0`), so a broker outage
//! delays output rather than losing it; `linger.ms` is `kafka.linger_ms` (5 ms by default,
//! see docs/benchmarks.md for why not 0).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::metrics::PartitionLabel;
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
    let consumer: BaseConsumer<KafkaContext> =
        c.create_with_context(KafkaContext { live }).map_err(|e| {
            EngineError::Usage(format!("config: `kafka`: cannot create a consumer: {e}"))
        })?;
    let topics: Vec<&str> = k.events_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| {
        EngineError::Usage(format!(
            "config: `kafka.events_topics`: cannot subscribe to {topics:?}: {e}"
        ))
    })?;
    Ok(consumer)
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
