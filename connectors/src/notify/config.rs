//! Settings of the notifications layer: `[notify]` and one table per channel in
//! `herald.toml`. Typed serde structs with every default in one place ([`defaults`]);
//! unknown keys are refused.
//!
//! A channel a journey sends on must have its table; `push` is sent as a signed webhook
//! to the push gateway the team runs (FCM/APNs senders differ per team).

use serde::Deserialize;

/// `[notify]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The templates directory (`NAME.liquid` files).
    pub templates: String,
    /// The outbox file (default: `outbox.redb` in `output.dir`).
    #[serde(default)]
    pub outbox: String,
    /// Attempts per message before it is recorded as failed.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First retry delay (ms); doubles per attempt; each delay is drawn between half and all of it (jitter).
    #[serde(default = "defaults::retry_base_ms")]
    pub retry_base_ms: u64,
    /// Longest retry delay (ms).
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// How long the outbox remembers a finished message's id (an interval, e.g.
    /// `"7 days"`); with durable state, never past the latest checkpoint.
    #[serde(default = "defaults::outbox_retention")]
    pub outbox_retention: String,
    /// Email over SMTP.
    pub email: Option<EmailConfig>,
    /// SMS through a Twilio-style Messages API.
    pub sms: Option<MessagesApiConfig>,
    /// WhatsApp through a Twilio-style Messages API (`whatsapp:` addresses).
    pub whatsapp: Option<MessagesApiConfig>,
    /// A JSON POST per message, signed with HMAC-SHA256.
    pub webhook: Option<WebhookConfig>,
    /// Push: a signed webhook to the team's push gateway.
    pub push: Option<WebhookConfig>,
    /// A Kafka topic, for teams that run their own senders.
    pub kafka: Option<KafkaChannelConfig>,
    /// The public base URL of Herald's ingest listener, for signed tracking links
    /// (`{{ message.click_url }}`, the open pixel of HTML email). None: no tracking.
    #[serde(default)]
    pub tracking_url: Option<String>,
    /// The key that signs tracking links (with `tracking_url`). Prefer
    /// `tracking_secret_env` or `tracking_secret_file`.
    #[serde(default)]
    pub tracking_secret: Option<String>,
    /// An environment variable holding the tracking secret.
    #[serde(default)]
    pub tracking_secret_env: Option<String>,
    /// A file holding the tracking secret (surrounding whitespace trimmed).
    #[serde(default)]
    pub tracking_secret_file: Option<String>,
}

/// How hard a channel may be driven.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests started per second (none: unlimited).
    pub rate_per_second: Option<u32>,
    /// A request that takes longer fails (retryably).
    pub timeout_ms: u64,
}

/// `[notify.email]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// SMTP server, `host:port`.
    pub smtp: String,
    /// `none`, `starttls` (required STARTTLS) or `tls` (implicit TLS, port 465).
    #[serde(default = "defaults::smtp_tls")]
    pub tls: String,
    /// SMTP user name.
    pub username: Option<String>,
    /// SMTP password.
    pub password: Option<String>,
    /// The From header, `Name <address>` or `address`.
    pub from: String,
    /// Requests in flight at once.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Messages started per second.
    pub rate_per_second: Option<u32>,
    /// Per-message timeout (ms).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

/// `[notify.sms]`, `[notify.whatsapp]`: Twilio's Messages API or one that speaks it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesApiConfig {
    /// API base URL.
    #[serde(default = "defaults::twilio_base_url")]
    pub base_url: String,
    /// Account SID (the Basic-auth user, and part of the path).
    pub account_sid: String,
    /// Auth token (the Basic-auth password).
    pub auth_token: String,
    /// The sender: a number, a messaging service's number, or `whatsapp:+…`.
    pub from: String,
    /// Where the provider reports delivery (`StatusCallback`); Herald's
    /// `/v1/providers/twilio/status` as Twilio reaches it (its callbacks are checked with
    /// `X-Twilio-Signature` over this URL).
    pub status_callback: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Requests started per second.
    pub rate_per_second: Option<u32>,
    /// Per-request timeout (ms).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

/// `[notify.webhook]`, `[notify.push]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The endpoint.
    pub url: String,
    /// HMAC-SHA256 key for the `X-Herald-Signature` header (none: unsigned).
    pub secret: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Requests started per second.
    pub rate_per_second: Option<u32>,
    /// Per-request timeout (ms).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

/// `[notify.kafka]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaChannelConfig {
    /// The topic rendered messages go to (key: user id).
    pub topic: String,
    /// Brokers (default: `kafka.brokers`).
    pub brokers: Option<String>,
    /// Records in flight at once.
    #[serde(default = "defaults::kafka_concurrency")]
    pub concurrency: usize,
    /// Records started per second.
    pub rate_per_second: Option<u32>,
    /// Per-record delivery timeout (ms).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

macro_rules! limits {
    ($($t:ty),*) => {$(
        impl $t {
            /// The channel's limits.
            pub fn limits(&self) -> Limits {
                Limits {
                    concurrency: self.concurrency,
                    rate_per_second: self.rate_per_second,
                    timeout_ms: self.timeout_ms,
                }
            }
        }
    )*};
}
limits!(
    EmailConfig,
    MessagesApiConfig,
    WebhookConfig,
    KafkaChannelConfig
);

impl NotifyConfig {
    /// The channels configured, by journey channel name.
    pub fn channels(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (name, on) in [
            ("email", self.email.is_some()),
            ("sms", self.sms.is_some()),
            ("whatsapp", self.whatsapp.is_some()),
            ("webhook", self.webhook.is_some()),
            ("push", self.push.is_some()),
            ("kafka", self.kafka.is_some()),
        ] {
            if on {
                out.push(name);
            }
        }
        out
    }

    /// The tracking links' base and key, reading the secret from the environment or its
    /// file: `(key, problem)` when it cannot be read or is too short.
    pub fn tracking(&self) -> Result<Option<super::tracking::Tracking>, (String, String)> {
        let Some(base) = &self.tracking_url else {
            return Ok(None);
        };
        let bad = |k: &str, m: String| Err((format!("notify.{k}"), m));
        let secret = match (
            &self.tracking_secret,
            &self.tracking_secret_env,
            &self.tracking_secret_file,
        ) {
            (Some(s), _, _) => s.clone(),
            (_, Some(var), _) => match std::env::var(var) {
                Ok(v) => v,
                Err(_) => return bad("tracking_secret_env", format!("{var} is not set")),
            },
            (_, _, Some(path)) => match std::fs::read_to_string(path) {
                Ok(v) => v.trim().to_string(),
                Err(e) => return bad("tracking_secret_file", format!("cannot read {path}: {e}")),
            },
            _ => return bad("tracking_secret", "tracking_url needs a secret".into()),
        };
        if secret.len() < 16 {
            return bad(
                "tracking_secret",
                "must be at least 16 characters (links signed with it can be forged otherwise)"
                    .into(),
            );
        }
        super::tracking::Tracking::new(base, secret.as_bytes())
            .map(Some)
            .map_err(|e| ("notify.tracking_url".into(), e))
    }

    /// Checks values serde cannot: returns `(key, problem)` for the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("notify.{k}"), m));
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if let Err(e) = herald_operators::time::parse_interval_ms(&self.outbox_retention) {
            return bad("outbox_retention", e.to_string());
        }
        if self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            return bad(
                "retry_base_ms",
                "must be positive and at most notify.retry_max_ms".into(),
            );
        }
        if let Some(u) = &self.tracking_url {
            if !u.starts_with("https://") && !u.starts_with("http://") {
                return bad("tracking_url", format!("'{u}' is not an http(s) URL"));
            }
            let secrets = [
                &self.tracking_secret,
                &self.tracking_secret_env,
                &self.tracking_secret_file,
            ];
            if secrets.iter().filter(|s| s.is_some()).count() != 1 {
                return bad(
                    "tracking_secret",
                    "tracking_url needs exactly one of tracking_secret, tracking_secret_env \
                     and tracking_secret_file"
                        .into(),
                );
            }
        }
        let mut limits = Vec::new();
        if let Some(e) = &self.email {
            if !matches!(e.tls.as_str(), "none" | "starttls" | "tls") {
                return bad(
                    "email.tls",
                    format!("'{}' is not none, starttls or tls", e.tls),
                );
            }
            if e.smtp
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad("email.smtp", format!("'{}' is not host:port", e.smtp));
            }
            if e.from.parse::<lettre::message::Mailbox>().is_err() {
                return bad(
                    "email.from",
                    format!("'{}' is not an email address", e.from),
                );
            }
            limits.push(("email", e.limits()));
        }
        for (name, c) in [("sms", &self.sms), ("whatsapp", &self.whatsapp)] {
            if let Some(c) = c {
                if c.status_callback.is_some() && c.auth_token.trim().is_empty() {
                    return bad(
                        &format!("{name}.auth_token"),
                        "is empty, and status callbacks are checked with it (an empty key \
                         signs for anyone)"
                            .into(),
                    );
                }
                if c.status_callback
                    .as_ref()
                    .is_some_and(|cb| cb.contains('@'))
                {
                    return bad(
                        &format!("{name}.status_callback"),
                        "must not carry credentials: Twilio's signature is the callback's \
                         credential"
                            .into(),
                    );
                }
                if url::Url::parse(&c.base_url).is_err() {
                    return bad(
                        &format!("{name}.base_url"),
                        format!("'{}' is not a URL", c.base_url),
                    );
                }
                limits.push((name, c.limits()));
            }
        }
        for (name, c) in [("webhook", &self.webhook), ("push", &self.push)] {
            if let Some(c) = c {
                if url::Url::parse(&c.url).is_err() {
                    return bad(&format!("{name}.url"), format!("'{}' is not a URL", c.url));
                }
                limits.push((name, c.limits()));
            }
        }
        if let Some(k) = &self.kafka {
            if k.topic.is_empty() {
                return bad("kafka.topic", "must not be empty".into());
            }
            limits.push(("kafka", k.limits()));
        }
        for (name, l) in limits {
            if l.concurrency == 0 {
                return bad(&format!("{name}.concurrency"), "must be at least 1".into());
            }
            if l.rate_per_second == Some(0) {
                return bad(
                    &format!("{name}.rate_per_second"),
                    "must be at least 1".into(),
                );
            }
            if l.timeout_ms == 0 {
                return bad(&format!("{name}.timeout_ms"), "must be positive".into());
            }
        }
        Ok(())
    }
}

/// Defaults, in one place.
pub mod defaults {
    /// Attempts per message.
    pub fn max_attempts() -> u32 {
        8
    }
    /// First retry delay (ms).
    pub fn retry_base_ms() -> u64 {
        500
    }
    /// Longest retry delay (ms).
    pub fn retry_max_ms() -> u64 {
        60_000
    }
    /// A week: longer than Kafka's default retention and the default dedup horizon, the
    /// longest a restart without durable state can redeliver from.
    pub fn outbox_retention() -> String {
        "7 days".into()
    }
    /// Required STARTTLS, what relays on port 587 expect.
    pub fn smtp_tls() -> String {
        "starttls".into()
    }
    /// Twilio's API.
    pub fn twilio_base_url() -> String {
        "https://api.twilio.com".into()
    }
    /// Requests in flight per HTTP/SMTP channel.
    pub fn concurrency() -> usize {
        8
    }
    /// Records in flight on the Kafka channel (the producer batches them).
    pub fn kafka_concurrency() -> usize {
        1000
    }
    /// Per-request timeout (ms).
    pub fn timeout_ms() -> u64 {
        10_000
    }
}
