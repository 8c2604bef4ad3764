//! The delivery engine: message actions from the outbox to their providers, off the
//! timely worker threads, on tokio.
//!
//! Owns [`Delivery`]. Each channel is a lane: an unbounded queue, a dispatcher task that
//! waits for the channel's rate limiter (governor's GCRA) and a concurrency permit, then
//! spawns the attempt. Lanes share nothing but the outbox writer, so a provider that is
//! down fills and slows only its own lane.
//!
//! An attempt: render the template (a failure is permanent), record `Sending` in the
//! outbox (durable before the request leaves), send, then record the outcome:
//!
//! - accepted: `Sent`; feedback `Message Sent` (and `Message Delivered` when the peer is
//!   the destination: webhook, push, Kafka);
//! - retryable (timeout, connection error, 408, 429, 5xx, SMTP 4xx): `Queued` again after
//!   a random delay between half and all of `min(retry_max, retry_base * 2^(attempt-1))`, or the provider's
//!   `Retry-After`; `Failed` once `max_attempts` are spent;
//! - permanent: `Failed`; feedback `Message Failed` with the reason.
//!
//! Feedback events are Segment `track` messages with deterministic `messageId`s
//! (`herald-<kind>-<message_id>`), so handing one on twice is harmless: the door
//! deduplicates it. They are handed to a [`FeedbackFn`] (the engine feeds them to the
//! workers or the events topic); the entry is marked `feedback_done` only once that
//! succeeded, so a restart hands on whatever was still owed.
//!
//! Restart ([`Delivery::start`] resumes the outbox's open entries): `Queued` entries are
//! sent; `Sending` entries are in doubt: sent again on channels whose peer deduplicates
//! on `message_id` (Twilio-style idempotency token, webhook `Idempotency-Key`, Kafka
//! header), and recorded as `Failed` (reason `in_doubt`) on SMTP, which cannot
//! deduplicate: at most once beats twice for email.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_operators::time::format_rfc3339_ms;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::Rng;
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, Semaphore};

use super::channel::{Connector, Failure};
use super::config::Limits;
use super::outbox::{Entry, Outbox, OutboxError, State};
use super::template::Templates;

/// Hands feedback events (Segment `track` JSON) to the event stream; an error means
/// "not now" (a full queue, a stopping engine), and the event is offered again later.
pub type FeedbackFn = Arc<dyn Fn(&Json) -> Result<(), String> + Send + Sync>;

/// How long an outcome's feedback is offered again before it is left for the next start.
pub const FEEDBACK_PATIENCE: Duration = Duration::from_secs(30);

/// Retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts before giving up.
    pub max_attempts: u32,
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `attempts + 1`: exponential with full jitter.
    pub fn delay(&self, attempts: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
            .min(self.max);
        let ms = exp.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
    }
}

/// Label of the per-channel metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// Channel name.
    pub channel: String,
}

/// Per-channel metrics of the notifications layer.
pub struct NotifyMetrics {
    /// Messages the provider accepted.
    pub sent: Family<ChannelLabel, Counter>,
    /// Messages given up on.
    pub failed: Family<ChannelLabel, Counter>,
    /// Attempts that will be retried.
    pub retried: Family<ChannelLabel, Counter>,
    /// Waits on the channel's own rate limit, and provider 429s.
    pub rate_limited: Family<ChannelLabel, Counter>,
    /// Messages waiting for an attempt (queued or waiting to retry).
    pub queue_depth: Family<ChannelLabel, Gauge>,
    /// How long a provider request took.
    pub send_latency_ms: Family<ChannelLabel, Histogram>,
    /// From the outbox taking the action to its first request.
    pub wait_ms: Family<ChannelLabel, Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    ])
}

impl Default for NotifyMetrics {
    fn default() -> Self {
        NotifyMetrics {
            sent: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            rate_limited: Family::default(),
            queue_depth: Family::default(),
            send_latency_ms: Family::new_with_constructor(latency_histogram),
            wait_ms: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl NotifyMetrics {
    /// Registers every family under `notify_*` in `r` (so `herald_notify_*` in
    /// Herald's registry).
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("notify");
        r.register("sent", "Messages the provider accepted", self.sent.clone());
        r.register("failed", "Messages given up on", self.failed.clone());
        r.register(
            "retried",
            "Attempts that will be retried",
            self.retried.clone(),
        );
        r.register(
            "rate_limited",
            "Waits on the channel's rate limit, and provider 429 replies",
            self.rate_limited.clone(),
        );
        r.register(
            "queue_depth",
            "Messages waiting for an attempt",
            self.queue_depth.clone(),
        );
        r.register(
            "send_latency_ms",
            "Provider request duration",
            self.send_latency_ms.clone(),
        );
        r.register(
            "wait_ms",
            "From the outbox taking a message to its first request",
            self.wait_ms.clone(),
        );
    }

    fn of<'a, M, C>(
        f: &'a Family<ChannelLabel, M, C>,
        channel: &str,
    ) -> impl std::ops::Deref<Target = M> + 'a
    where
        C: prometheus_client::metrics::family::MetricConstructor<M>,
    {
        f.get_or_create(&ChannelLabel {
            channel: channel.to_string(),
        })
    }
}

/// The feedback event for an outcome or an engagement: a Segment `track` message.
/// `kind` is `sent`, `delivered`, `failed`, `opened` or `clicked`.
pub fn feedback_event(kind: &str, e: &Entry, extra: Json, now_ms: i64) -> Json {
    let event = match kind {
        "sent" => "Message Sent",
        "delivered" => "Message Delivered",
        "failed" => "Message Failed",
        "opened" => "Message Opened",
        "clicked" => "Message Clicked",
        _ => "Message Updated",
    };
    let a = &e.action;
    let mut props = json!({
        "message_id": a.message_id,
        "journey": a.journey,
        "channel": a.channel,
        "template": a.template,
        "variant": a.variant,
        "step": a.step_path,
        "attempts": e.attempts,
    });
    if let (Json::Object(p), Json::Object(x)) = (&mut props, extra) {
        p.extend(x);
    }
    json!({
        "type": "track",
        "event": event,
        "userId": a.user_id,
        "messageId": format!("herald-{kind}-{}", a.message_id),
        "timestamp": format_rfc3339_ms(now_ms),
        "properties": props,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Job {
    entry: Entry,
    queued: Instant,
}

struct Lane {
    connector: Connector,
    tx: mpsc::UnboundedSender<Job>,
}

struct Inner {
    outbox: Arc<Outbox>,
    templates: Arc<Templates>,
    lanes: BTreeMap<String, Lane>,
    policy: RetryPolicy,
    feedback: FeedbackFn,
    metrics: Arc<NotifyMetrics>,
    /// Attempts under way (for a graceful stop).
    in_flight: AtomicUsize,
}

/// The running delivery engine.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

/// A channel's connector and limits, for [`Delivery::start`].
pub struct ChannelSetup {
    /// Channel name (`email`, `sms`, …).
    pub name: String,
    /// Its connector.
    pub connector: Connector,
    /// Its limits.
    pub limits: Limits,
}

impl Delivery {
    /// Starts a lane per channel on `rt`, then resumes the outbox's open entries.
    pub fn start(
        rt: &tokio::runtime::Handle,
        outbox: Arc<Outbox>,
        templates: Arc<Templates>,
        channels: Vec<ChannelSetup>,
        policy: RetryPolicy,
        feedback: FeedbackFn,
        metrics: Arc<NotifyMetrics>,
    ) -> Result<Delivery, OutboxError> {
        let mut lanes = BTreeMap::new();
        let mut receivers = Vec::new();
        for c in channels {
            let (tx, rx) = mpsc::unbounded_channel();
            NotifyMetrics::of(&metrics.queue_depth, &c.name).set(0);
            receivers.push((c.name.clone(), c.limits, rx));
            lanes.insert(
                c.name,
                Lane {
                    connector: c.connector,
                    tx,
                },
            );
        }
        let d = Delivery {
            inner: Arc::new(Inner {
                outbox,
                templates,
                lanes,
                policy,
                feedback,
                metrics,
                in_flight: AtomicUsize::new(0),
            }),
        };
        for (name, limits, rx) in receivers {
            rt.spawn(lane_loop(Arc::clone(&d.inner), name, limits, rx));
        }
        d.resume(rt)?;
        Ok(d)
    }

    fn resume(&self, rt: &tokio::runtime::Handle) -> Result<(), OutboxError> {
        let open = self.inner.outbox.open_entries()?;
        let mut queue = Vec::new();
        for mut e in open {
            let lane = self.inner.lanes.get(&e.action.channel);
            match (e.state, lane) {
                (State::Sent | State::Failed, lane) => {
                    let delivered = lane.is_some_and(|l| l.connector.accepted_is_delivered());
                    let inner = Arc::clone(&self.inner);
                    rt.spawn(async move {
                        let events = outcome_events(&e, delivered);
                        inner.hand_on_feedback(&mut e, events).await;
                    });
                }
                (_, None) => {
                    let inner = Arc::clone(&self.inner);
                    rt.spawn(async move {
                        let reason = format!("no connector for channel '{}'", e.action.channel);
                        inner.fail(&mut e, reason, "no_channel").await;
                    });
                }
                (State::Sending, Some(l)) if !l.connector.idempotent() => {
                    let inner = Arc::clone(&self.inner);
                    rt.spawn(async move {
                        let reason = "in doubt after a restart: the attempt may have reached the \
                                      SMTP server, which cannot deduplicate, so it is not sent again"
                            .to_string();
                        inner.fail(&mut e, reason, "in_doubt").await;
                    });
                }
                (State::Queued | State::Sending, Some(_)) => queue.push(e),
            }
        }
        if !queue.is_empty() {
            tracing::info!(
                messages = queue.len(),
                "resuming deliveries from the outbox"
            );
        }
        self.submit(queue);
        Ok(())
    }

    /// Queues entries the outbox has just taken.
    pub fn submit(&self, entries: Vec<Entry>) {
        for e in entries {
            self.inner.enqueue(Job {
                entry: e,
                queued: Instant::now(),
            });
        }
    }

    /// Waits (up to `limit`) for the attempts under way to finish; queued messages stay
    /// in the outbox for the next start.
    pub async fn stop(&self, limit: Duration) {
        let started = Instant::now();
        while self.inner.in_flight.load(Ordering::Acquire) > 0 && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The outbox.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.inner.outbox
    }
}

async fn lane_loop(
    inner: Arc<Inner>,
    name: String,
    limits: Limits,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    let permits = Arc::new(Semaphore::new(limits.concurrency));
    let limiter: Option<DefaultDirectRateLimiter> = limits
        .rate_per_second
        .and_then(NonZeroU32::new)
        .map(|r| RateLimiter::direct(Quota::per_second(r)));
    let timeout = Duration::from_millis(limits.timeout_ms);
    while let Some(job) = rx.recv().await {
        if let Some(l) = &limiter {
            if l.check().is_err() {
                NotifyMetrics::of(&inner.metrics.rate_limited, &name).inc();
                l.until_ready().await;
            }
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        NotifyMetrics::of(&inner.metrics.queue_depth, &name).dec();
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let inner2 = Arc::clone(&inner);
        tokio::spawn(async move {
            inner2.attempt(job, timeout).await;
            drop(permit);
            inner2.in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The feedback events an outcome owes.
fn outcome_events(e: &Entry, delivered: bool) -> Vec<Json> {
    let now = now_ms();
    match e.state {
        State::Sent => {
            let extra = json!({"provider_id": e.provider_id});
            let mut v = vec![feedback_event("sent", e, extra.clone(), now)];
            if delivered {
                v.push(feedback_event("delivered", e, extra, now));
            }
            v
        }
        State::Failed => vec![feedback_event("failed", e, json!({"reason": e.error}), now)],
        _ => Vec::new(),
    }
}

impl Inner {
    fn enqueue(&self, job: Job) {
        let channel = job.entry.action.channel.clone();
        match self.lanes.get(&channel) {
            Some(lane) => {
                NotifyMetrics::of(&self.metrics.queue_depth, &channel).inc();
                if lane.tx.send(job).is_err() {
                    NotifyMetrics::of(&self.metrics.queue_depth, &channel).dec();
                }
            }
            None => tracing::error!(
                channel = %channel,
                message_id = %job.entry.action.message_id,
                "no connector for the channel; the message stays queued in the outbox"
            ),
        }
    }

    async fn attempt(self: &Arc<Self>, job: Job, timeout: Duration) {
        let mut e = job.entry;
        let channel = e.action.channel.clone();
        let Some(lane) = self.lanes.get(&channel) else {
            return;
        };
        let rendered = match self.templates.render(&e.action) {
            Ok(r) => r,
            Err(err) => {
                self.fail(&mut e, err.to_string(), "template").await;
                return;
            }
        };
        if e.attempts == 0 {
            NotifyMetrics::of(&self.metrics.wait_ms, &channel)
                .observe(job.queued.elapsed().as_secs_f64() * 1e3);
        }
        e.state = State::Sending;
        e.attempts += 1;
        e.updated = now_ms();
        if let Err(err) = self.outbox.put(&e).await {
            // Without the record an attempt could be repeated after a crash: do not send.
            tracing::error!(message_id = %e.action.message_id, "{err}; retrying later");
            e.state = State::Queued;
            e.attempts -= 1;
            self.retry_later(
                Job {
                    entry: e,
                    queued: job.queued,
                },
                Duration::from_secs(1),
            );
            return;
        }
        let started = Instant::now();
        // The connector's own timeout normally fires first; this bounds a peer that
        // keeps a connection open without answering.
        let result = match tokio::time::timeout(
            timeout + Duration::from_secs(1),
            lane.connector.send(&e.action, &rendered),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Failure::Retry {
                detail: format!("no answer within {timeout:?}"),
                after: None,
                rate_limited: false,
            }),
        };
        NotifyMetrics::of(&self.metrics.send_latency_ms, &channel)
            .observe(started.elapsed().as_secs_f64() * 1e3);
        e.updated = now_ms();
        match result {
            Ok(acc) => {
                e.state = State::Sent;
                e.provider_id = acc.provider_id;
                e.error = None;
                NotifyMetrics::of(&self.metrics.sent, &channel).inc();
                let events = outcome_events(&e, lane.connector.accepted_is_delivered());
                self.hand_on_feedback(&mut e, events).await;
            }
            Err(Failure::Permanent(detail)) => self.fail(&mut e, detail, "permanent").await,
            Err(Failure::Retry {
                detail,
                after,
                rate_limited,
            }) => {
                if rate_limited {
                    NotifyMetrics::of(&self.metrics.rate_limited, &channel).inc();
                }
                if e.attempts >= self.policy.max_attempts {
                    let reason = format!("gave up after {} attempts: {detail}", e.attempts);
                    self.fail(&mut e, reason, "retries").await;
                    return;
                }
                tracing::debug!(message_id = %e.action.message_id, attempt = e.attempts, "{detail}; will retry");
                NotifyMetrics::of(&self.metrics.retried, &channel).inc();
                e.state = State::Queued;
                e.error = Some(detail);
                if let Err(err) = self.outbox.put(&e).await {
                    tracing::error!(message_id = %e.action.message_id, "{err}");
                }
                let delay = after.unwrap_or_else(|| self.policy.delay(e.attempts));
                self.retry_later(
                    Job {
                        entry: e,
                        queued: job.queued,
                    },
                    delay,
                );
            }
        }
    }

    fn retry_later(self: &Arc<Self>, job: Job, delay: Duration) {
        let channel = job.entry.action.channel.clone();
        NotifyMetrics::of(&self.metrics.queue_depth, &channel).inc();
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            NotifyMetrics::of(&inner.metrics.queue_depth, &channel).dec();
            inner.enqueue(job);
        });
    }

    async fn fail(self: &Arc<Self>, e: &mut Entry, reason: String, kind: &str) {
        tracing::warn!(
            message_id = %e.action.message_id,
            channel = %e.action.channel,
            kind,
            "message failed: {reason}"
        );
        NotifyMetrics::of(&self.metrics.failed, &e.action.channel).inc();
        e.state = State::Failed;
        e.error = Some(reason);
        e.updated = now_ms();
        let events = outcome_events(e, false);
        self.hand_on_feedback(e, events).await;
    }

    /// Offers the events until taken (or [`FEEDBACK_PATIENCE`] runs out), then records
    /// the entry with `feedback_done` saying whether they were.
    async fn hand_on_feedback(&self, e: &mut Entry, events: Vec<Json>) {
        let started = Instant::now();
        let mut done = 0;
        while done < events.len() {
            match (self.feedback)(&events[done]) {
                Ok(()) => done += 1,
                Err(why) if started.elapsed() > FEEDBACK_PATIENCE => {
                    tracing::warn!(message_id = %e.action.message_id, "feedback not handed on ({why}); the next start will");
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        e.feedback_done = done == events.len();
        if let Err(err) = self.outbox.put(e).await {
            tracing::error!(message_id = %e.action.message_id, "{err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        for _ in 0..100 {
            let d1 = p.delay(1).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d3 = p.delay(3).as_millis();
            assert!((200..=400).contains(&d3), "{d3}");
            let d10 = p.delay(10).as_millis();
            assert!((500..=1000).contains(&d10), "{d10}");
        }
    }
}
