//! `[notify]` in `herald run`: the outbox, the delivery engine and the feedback path.
//!
//! Owns [`Notify`] and [`start`]. The sink thread hands each watermark's message actions
//! to the outbox (a durable commit) before the watermark becomes durable, so an action
//! is either in the outbox or its events are consumed again; the outbox hands the new
//! ones to the delivery engine on the I/O runtime. Outcomes and engagement come back as
//! events through [`Notify::feed`]: handed to the workers (embedded mode) or produced
//! to the first events topic (Kafka mode), like HTTP ingest.

use std::path::Path;
use std::sync::{Arc, Weak};

use herald_connectors::notify::channel::{connector, limits};
use herald_connectors::notify::delivery::{ChannelSetup, Delivery, FeedbackFn, RetryPolicy};
use herald_connectors::notify::outbox::Outbox;
use herald_connectors::notify::template::Templates;
use herald_operators::event::parse_json;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value as Json;

use super::{now_ms, IngestError, Live};
use crate::EngineError;

/// The running notifications layer.
pub struct Notify {
    /// The delivery engine (and, through it, the outbox).
    pub delivery: Delivery,
    /// The templates.
    pub templates: Arc<Templates>,
    /// Hands a feedback or engagement event to the event stream.
    pub feed: FeedbackFn,
}

/// How long a Kafka-mode feedback event waits for the broker's ack before its delivery
/// outcome is retried.
const FEEDBACK_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Hands one Segment-shaped event to the workers (embedded mode).
fn feed_embedded(live: &Weak<Live>, msg: &Json) -> Result<(), String> {
    let Some(live) = live.upgrade() else {
        return Err("stopping".into());
    };
    let text = serde_json::to_vec(msg).unwrap_or_default();
    let (events, rejections) = parse_json(msg, &text, Some(now_ms() as i64), live.limits);
    if let Some(r) = rejections.first() {
        // Built by Herald itself: a rejection is a bug, and retrying cannot fix it.
        tracing::error!(
            reason = r.reason.as_str(),
            "feedback event rejected: {}",
            r.detail
        );
        return Ok(());
    }
    let n = events.len() as u64;
    // Durable before Ok: the outbox marks the outcome's feedback done only then, so a
    // crash before the ingest log's fsync hands it on again at the next start.
    match live.ingest_all(events, true) {
        Ok(None) => {}
        Ok(Some(synced)) => {
            let outcome = tokio::task::block_in_place(|| synced.blocking_recv());
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("the ingest log could not keep it: {e}")),
                Err(_) => return Err("stopping".into()),
            }
        }
        Err(IngestError::Overloaded) => return Err("the input queue is full".into()),
        Err(IngestError::Stopped) => return Err("stopping".into()),
    }
    for _ in 0..n {
        live.metrics.event_in("feedback");
    }
    Ok(())
}

/// How often the outbox forgets what it no longer needs (and first, this long after start).
const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Forgets finished outbox entries older than `retention` (ms) and, with durable state,
/// older than the latest checkpoint (a restart derives again only what follows it; before
/// this run's first checkpoint, nothing is forgotten). Runs until the service goes.
async fn compact(live: Weak<Live>, outbox: Arc<Outbox>, retention: i64) {
    loop {
        tokio::time::sleep(COMPACT_EVERY).await;
        let Some(l) = live.upgrade() else { return };
        let mut before = now_ms() as i64 - retention;
        if l.checkpointer.is_some() {
            let at = l.checkpointed.load(std::sync::atomic::Ordering::Acquire) as i64;
            if at == 0 {
                continue;
            }
            before = before.min(at);
        }
        drop(l);
        let o = Arc::clone(&outbox);
        match tokio::task::spawn_blocking(move || o.compact_blocking(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!("the outbox forgot {n} finished messages"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("compacting the outbox: {e}"),
            Err(e) => tracing::warn!("compacting the outbox: {e}"),
        }
    }
}

/// Opens the outbox, builds a connector per configured channel and starts delivering,
/// resuming what the outbox still holds. Template and channel checks against the
/// journeys were done at load.
pub fn start(
    live: &Arc<Live>,
    templates: Templates,
    rt: &tokio::runtime::Handle,
) -> Result<Option<Notify>, EngineError> {
    let Some(n) = &live.config.notify else {
        return Ok(None);
    };
    let path = if n.outbox.is_empty() {
        Path::new(&live.config.output.dir).join("outbox.redb")
    } else {
        Path::new(&n.outbox).to_path_buf()
    };
    let outbox = Outbox::open(&path)
        .map_err(|e| EngineError::Usage(format!("config: `notify.outbox`: {e}")))?;
    let kafka_brokers = live.config.kafka.as_ref().map(|k| k.brokers.as_str());
    let mut channels = Vec::new();
    for name in n.channels() {
        let c = connector(name, n, kafka_brokers)
            .map_err(|e| EngineError::Usage(format!("config: `notify.{name}`: {e}")))?;
        let Some(l) = limits(name, n) else { continue };
        channels.push(ChannelSetup {
            name: name.to_string(),
            connector: c,
            limits: l,
        });
    }
    let feed: FeedbackFn = match &live.config.kafka {
        None => {
            let weak = Arc::downgrade(live);
            Arc::new(move |msg: &Json| feed_embedded(&weak, msg))
        }
        Some(k) => {
            let producer: FutureProducer = super::kafka::producer(k)?;
            let topic = k.events_topics.first().cloned().unwrap_or_default();
            let weak = Arc::downgrade(live);
            Arc::new(move |msg: &Json| {
                let key = msg["userId"].as_str().unwrap_or_default().to_string();
                let payload = serde_json::to_vec(msg).unwrap_or_default();
                let ack = producer
                    .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
                    .map_err(|(e, _)| e.to_string())?;
                // Acknowledged before Ok: the outbox marks the outcome's feedback done
                // only then, so a crash before the broker has it hands it on again (the
                // copy a retry may add is deduplicated by its messageId).
                let acked = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(tokio::time::timeout(FEEDBACK_ACK_WAIT, ack))
                });
                match acked {
                    Ok(Ok(Ok(_))) => {}
                    Ok(Ok(Err((e, _)))) => return Err(format!("the broker refused it: {e}")),
                    Ok(Err(_)) => return Err("the producer is gone".into()),
                    Err(_) => {
                        return Err(format!(
                            "the broker did not acknowledge it within {FEEDBACK_ACK_WAIT:?}"
                        ))
                    }
                }
                if let Some(l) = weak.upgrade() {
                    l.metrics.event_in("feedback");
                }
                Ok(())
            })
        }
    };
    let retention = herald_operators::time::parse_interval_ms(&n.outbox_retention)
        .map_err(|e| EngineError::Usage(format!("config: `notify.outbox_retention`: {e}")))?;
    rt.spawn(compact(
        Arc::downgrade(live),
        Arc::clone(&outbox),
        retention,
    ));
    let templates = Arc::new(templates);
    let delivery = Delivery::start(
        rt,
        outbox,
        Arc::clone(&templates),
        channels,
        RetryPolicy {
            max_attempts: n.max_attempts,
            base: std::time::Duration::from_millis(n.retry_base_ms),
            max: std::time::Duration::from_millis(n.retry_max_ms),
        },
        Arc::clone(&feed),
        Arc::clone(&live.metrics.notify),
    )
    .map_err(|e| EngineError::Usage(format!("config: `notify.outbox`: {e}")))?;
    Ok(Some(Notify {
        delivery,
        templates,
        feed,
    }))
}
