//! Notifications: turning journey message actions into messages on their channels, at
//! most once each.
//!
//! - [`template`]: Liquid templates (subject and body) over the user's traits, the
//!   triggering event and journey data, checked when loaded.
//! - [`outbox`]: the durable record of every accepted message action, keyed by
//!   `message_id`: what makes a replay or a restart send nothing twice.
//! - [`config`]: per-channel settings (`[notify.*]` in `herald.toml`).
//! - [`channel`]: one connector per provider kind: SMTP (email), a Twilio-style Messages
//!   API (SMS, WhatsApp), signed webhooks (webhook, push), a Kafka topic.
//! - [`tracking`]: signed click links and open pixels, and their check.
//! - [`delivery`]: the tokio delivery engine: per-channel queues, concurrency and rate
//!   limits, retries with backoff and jitter, outcomes recorded in the outbox and handed
//!   on as feedback events.

pub mod channel;
pub mod config;
pub mod delivery;
pub mod outbox;
pub mod template;
pub mod tracking;
