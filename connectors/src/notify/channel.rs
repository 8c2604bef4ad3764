//! One connector per provider kind; each sends one rendered message and classifies the
//! outcome as accepted, worth retrying, or permanent.
//!
//! - [`Connector::Smtp`] (email): lettre's async SMTP transport; the message's
//!   `Message-ID` is `<message_id@herald>`. SMTP has no idempotency key, so an attempt
//!   in doubt after a crash is not sent again ([`Connector::idempotent`] is false).
//! - [`Connector::MessagesApi`] (sms, whatsapp): Twilio's Messages API shape: a form POST
//!   to `{base}/2010-04-01/Accounts/{sid}/Messages.json` with Basic auth, and
//!   `I-Twilio-Idempotency-Token: message_id`.
//! - [`Connector::Webhook`] (webhook, push): a JSON POST ([`payload`]) with
//!   `Idempotency-Key: message_id`, `X-Herald-Timestamp` (Unix seconds) and
//!   `X-Herald-Signature: v1=hex(HMAC-SHA256(secret, "{timestamp}.{body}"))`, Stripe's
//!   scheme: the timestamp in the signed text stops replays of old requests.
//! - [`Connector::Kafka`]: the same JSON to a topic, key user id, header
//!   `herald.message_id`; consumers deduplicate on it.
//!
//! Classification, the same everywhere: timeouts, connection errors, HTTP 408, 429 and
//! 5xx, and SMTP 4xx are retried (429's `Retry-After` is honoured); other 4xx and SMTP
//! 5xx are permanent.

use std::time::Duration;

use herald_operators::journey::MessageAction;
use herald_operators::time::format_rfc3339_ms;
use hmac::{Hmac, Mac};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
#[cfg(feature = "kafka")]
use rdkafka::message::{Header, OwnedHeaders};
#[cfg(feature = "kafka")]
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sha2::Sha256;

#[cfg(feature = "kafka")]
use super::config::KafkaChannelConfig;
use super::config::{EmailConfig, MessagesApiConfig, WebhookConfig};
use super::template::Rendered;

/// What the provider said yes with.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// The provider's id for the message.
    pub provider_id: Option<String>,
}

/// Why a send did not succeed.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// Worth another attempt.
    Retry {
        /// What happened.
        detail: String,
        /// The provider's `Retry-After`, if it gave one.
        after: Option<Duration>,
        /// The provider said "too many requests".
        rate_limited: bool,
    },
    /// Will never succeed as it is.
    Permanent(String),
}

impl Failure {
    fn retry(detail: impl Into<String>) -> Failure {
        Failure::Retry {
            detail: detail.into(),
            after: None,
            rate_limited: false,
        }
    }
}

/// A channel's connector.
pub enum Connector {
    /// Email over SMTP.
    Smtp(Smtp),
    /// SMS / WhatsApp through a Twilio-style Messages API.
    MessagesApi(MessagesApi),
    /// A signed JSON POST.
    Webhook(Webhook),
    /// A Kafka topic.
    #[cfg(feature = "kafka")]
    Kafka(KafkaChannel),
}

impl Connector {
    /// Sends one message.
    pub async fn send(&self, action: &MessageAction, msg: &Rendered) -> Result<Accepted, Failure> {
        match self {
            Connector::Smtp(c) => c.send(action, msg).await,
            Connector::MessagesApi(c) => c.send(action, msg).await,
            Connector::Webhook(c) => c.send(action, msg).await,
            #[cfg(feature = "kafka")]
            Connector::Kafka(c) => c.send(action, msg).await,
        }
    }

    /// Whether the peer is the message's destination (webhook, push gateway, Kafka), so
    /// that its acceptance is delivery; SMTP servers and SMS providers deliver later.
    pub fn accepted_is_delivered(&self) -> bool {
        match self {
            Connector::Webhook(_) => true,
            #[cfg(feature = "kafka")]
            Connector::Kafka(_) => true,
            _ => false,
        }
    }

    /// Whether sending an attempt again is safe when it is in doubt (a crash between
    /// the request and recording its outcome): the peer deduplicates on `message_id`.
    pub fn idempotent(&self) -> bool {
        !matches!(self, Connector::Smtp(_))
    }
}

/// The JSON body of a webhook request and of a Kafka record.
pub fn payload(action: &MessageAction, msg: &Rendered) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "message_id": action.message_id,
        "journey": action.journey,
        "user_id": action.user_id,
        "instance": action.instance,
        "step": action.step_path,
        "variant": action.variant,
        "channel": action.channel,
        "template": action.template,
        "address": action.address,
        "subject": msg.subject,
        "body": msg.body,
        "time": format_rfc3339_ms(action.time),
    }))
    .unwrap_or_default()
}

/// Installs rustls' ring provider once (reqwest is built without a default provider so
/// that no C toolchain beyond `cc` is needed).
fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn http_client(timeout_ms: u64) -> Result<reqwest::Client, String> {
    tls_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_millis(timeout_ms))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// Maps an HTTP status to an outcome class.
fn classify(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> Failure {
    let detail = format!(
        "HTTP {}: {}",
        status.as_u16(),
        body.chars().take(300).collect::<String>()
    );
    if status.as_u16() == 429 {
        let after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Failure::Retry {
            detail,
            after,
            rate_limited: true,
        }
    } else if status.is_server_error() || status.as_u16() == 408 {
        Failure::retry(detail)
    } else {
        Failure::Permanent(detail)
    }
}

fn request_failure(e: &reqwest::Error) -> Failure {
    let what = if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    Failure::retry(format!("{what}: {e}"))
}

/// Email over SMTP: a connection per message (lettre's pool must be dropped inside
/// its runtime, which a process that stops cannot promise).
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl Smtp {
    /// Builds the pooled transport (no connection is made until the first send).
    pub fn new(c: &EmailConfig) -> Result<Smtp, String> {
        tls_provider();
        let (host, port) = c
            .smtp
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("notify.email.smtp: '{}' is not host:port", c.smtp))?;
        let builder = match c.tls.as_str() {
            "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
            "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                .map_err(|e| format!("notify.email: {e}"))?,
            _ => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                .map_err(|e| format!("notify.email: {e}"))?,
        };
        let mut builder = builder
            .port(port)
            .timeout(Some(Duration::from_millis(c.timeout_ms)));
        if let Some(user) = &c.username {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                c.password.clone().unwrap_or_default(),
            ));
        }
        let from = c
            .from
            .parse()
            .map_err(|e| format!("notify.email.from: '{}': {e}", c.from))?;
        Ok(Smtp {
            transport: builder.build(),
            from,
        })
    }

    async fn send(&self, action: &MessageAction, msg: &Rendered) -> Result<Accepted, Failure> {
        let to: lettre::message::Mailbox = action
            .address
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| Failure::Permanent(format!("bad email address: {e}")))?;
        let email = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(msg.subject.clone().unwrap_or_default())
            .message_id(Some(format!("<{}@herald>", action.message_id)))
            .header(if msg.html {
                lettre::message::header::ContentType::TEXT_HTML
            } else {
                lettre::message::header::ContentType::TEXT_PLAIN
            })
            .body(msg.body.clone())
            .map_err(|e| Failure::Permanent(format!("cannot build the email: {e}")))?;
        match self.transport.send(email).await {
            Ok(r) => Ok(Accepted {
                provider_id: Some(r.message().collect::<Vec<_>>().join(" ")),
            }),
            Err(e) if e.is_permanent() => Err(Failure::Permanent(format!("SMTP: {e}"))),
            Err(e) => Err(Failure::retry(format!("SMTP: {e}"))),
        }
    }
}

/// The status callback URL Herald gives the provider for a message: the configured URL
/// with `message_id` added to its query (the URL Twilio signs its callback with).
pub fn status_callback_url(configured: &str, message_id: &str) -> String {
    let sep = if configured.contains('?') { '&' } else { '?' };
    let id: String = url::form_urlencoded::byte_serialize(message_id.as_bytes()).collect();
    format!("{configured}{sep}message_id={id}")
}

/// A Twilio-style Messages API.
pub struct MessagesApi {
    client: reqwest::Client,
    url: String,
    config: MessagesApiConfig,
    whatsapp: bool,
}

impl MessagesApi {
    /// A connector for `channel` (`sms` or `whatsapp`).
    pub fn new(c: &MessagesApiConfig, channel: &str) -> Result<MessagesApi, String> {
        Ok(MessagesApi {
            client: http_client(c.timeout_ms)?,
            url: format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                c.base_url.trim_end_matches('/'),
                c.account_sid
            ),
            config: c.clone(),
            whatsapp: channel == "whatsapp",
        })
    }

    async fn send(&self, action: &MessageAction, msg: &Rendered) -> Result<Accepted, Failure> {
        let Some(address) = action.address.as_deref().filter(|a| !a.is_empty()) else {
            return Err(Failure::Permanent("no phone number".into()));
        };
        let prefix = |a: &str| {
            if self.whatsapp && !a.starts_with("whatsapp:") {
                format!("whatsapp:{a}")
            } else {
                a.to_string()
            }
        };
        let mut form = vec![
            ("To", prefix(address)),
            ("From", prefix(&self.config.from)),
            ("Body", msg.body.clone()),
        ];
        if let Some(cb) = &self.config.status_callback {
            form.push((
                "StatusCallback",
                status_callback_url(cb, &action.message_id),
            ));
        }
        let r = self
            .client
            .post(&self.url)
            .basic_auth(&self.config.account_sid, Some(&self.config.auth_token))
            .header("I-Twilio-Idempotency-Token", &action.message_id)
            .form(&form)
            .send()
            .await
            .map_err(|e| request_failure(&e))?;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap_or_default();
        if status.is_success() {
            let sid = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|j| j["sid"].as_str().map(str::to_string));
            Ok(Accepted { provider_id: sid })
        } else {
            Err(classify(status, &headers, &body))
        }
    }
}

/// A signed JSON POST.
pub struct Webhook {
    client: reqwest::Client,
    config: WebhookConfig,
}

/// `v1=` + hex HMAC-SHA256 of `"{timestamp}.{body}"` under `secret`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    /// A connector posting to `c.url`.
    pub fn new(c: &WebhookConfig) -> Result<Webhook, String> {
        Ok(Webhook {
            client: http_client(c.timeout_ms)?,
            config: c.clone(),
        })
    }

    async fn send(&self, action: &MessageAction, msg: &Rendered) -> Result<Accepted, Failure> {
        let body = payload(action, msg);
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut req = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &action.message_id)
            .header("X-Herald-Timestamp", ts.to_string());
        if let Some(secret) = &self.config.secret {
            req = req.header("X-Herald-Signature", signature(secret, ts, &body));
        }
        let r = req
            .body(body)
            .send()
            .await
            .map_err(|e| request_failure(&e))?;
        let status = r.status();
        if status.is_success() {
            Ok(Accepted { provider_id: None })
        } else {
            let headers = r.headers().clone();
            let text = r.text().await.unwrap_or_default();
            Err(classify(status, &headers, &text))
        }
    }
}

/// A Kafka topic.
#[cfg(feature = "kafka")]
pub struct KafkaChannel {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

#[cfg(feature = "kafka")]
impl KafkaChannel {
    /// A producer for `c.topic` on `brokers`.
    pub fn new(c: &KafkaChannelConfig, brokers: &str) -> Result<KafkaChannel, String> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "2")
            .set("message.timeout.ms", c.timeout_ms.to_string())
            .create()
            .map_err(|e| format!("notify.kafka: cannot create a producer: {e}"))?;
        Ok(KafkaChannel {
            producer,
            topic: c.topic.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
        })
    }

    async fn send(&self, action: &MessageAction, msg: &Rendered) -> Result<Accepted, Failure> {
        let body = payload(action, msg);
        let headers = OwnedHeaders::new().insert(Header {
            key: "herald.message_id",
            value: Some(action.message_id.as_str()),
        });
        let record = FutureRecord::to(&self.topic)
            .key(&action.user_id)
            .payload(&body)
            .headers(headers);
        match self.producer.send(record, self.timeout).await {
            Ok(d) => Ok(Accepted {
                provider_id: Some(format!("{}@{}", d.partition, d.offset)),
            }),
            Err((e, _)) => Err(Failure::retry(format!("Kafka: {e}"))),
        }
    }
}

/// Builds the connector for a journey channel name.
pub fn connector(
    channel: &str,
    c: &super::config::NotifyConfig,
    kafka_brokers: Option<&str>,
) -> Result<Connector, String> {
    #[cfg(not(feature = "kafka"))]
    let _ = kafka_brokers;
    let missing = || format!("no [notify.{channel}] section configures channel '{channel}'");
    match channel {
        "email" => Ok(Connector::Smtp(Smtp::new(
            c.email.as_ref().ok_or_else(missing)?,
        )?)),
        "sms" => Ok(Connector::MessagesApi(MessagesApi::new(
            c.sms.as_ref().ok_or_else(missing)?,
            channel,
        )?)),
        "whatsapp" => Ok(Connector::MessagesApi(MessagesApi::new(
            c.whatsapp.as_ref().ok_or_else(missing)?,
            channel,
        )?)),
        "webhook" => Ok(Connector::Webhook(Webhook::new(
            c.webhook.as_ref().ok_or_else(missing)?,
        )?)),
        "push" => Ok(Connector::Webhook(Webhook::new(
            c.push.as_ref().ok_or_else(missing)?,
        )?)),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(
            "channel 'kafka': this build of Herald has no Kafka support (cargo feature `kafka`)"
                .to_string(),
        ),
        #[cfg(feature = "kafka")]
        "kafka" => {
            let k = c.kafka.as_ref().ok_or_else(missing)?;
            let brokers = k.brokers.as_deref().or(kafka_brokers).ok_or_else(|| {
                "notify.kafka.brokers: no brokers (and no [kafka] section)".to_string()
            })?;
            Ok(Connector::Kafka(KafkaChannel::new(k, brokers)?))
        }
        other => Err(format!("unknown channel '{other}'")),
    }
}

/// The limits of a journey channel name, if configured.
pub fn limits(channel: &str, c: &super::config::NotifyConfig) -> Option<super::config::Limits> {
    match channel {
        "email" => c.email.as_ref().map(|x| x.limits()),
        "sms" => c.sms.as_ref().map(|x| x.limits()),
        "whatsapp" => c.whatsapp.as_ref().map(|x| x.limits()),
        "webhook" => c.webhook.as_ref().map(|x| x.limits()),
        "push" => c.push.as_ref().map(|x| x.limits()),
        "kafka" => c.kafka.as_ref().map(|x| x.limits()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // The expected value was computed with OpenSSL:
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            signature("s3cret", 1_700_000_000, br#"{"a":1}"#),
            "v1=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }

    #[test]
    fn statuses_are_classified() {
        let h = reqwest::header::HeaderMap::new();
        let s = |c: u16| reqwest::StatusCode::from_u16(c).unwrap();
        assert!(matches!(
            classify(s(500), &h, ""),
            Failure::Retry {
                rate_limited: false,
                ..
            }
        ));
        assert!(matches!(classify(s(408), &h, ""), Failure::Retry { .. }));
        assert!(matches!(classify(s(400), &h, ""), Failure::Permanent(_)));
        let mut h2 = reqwest::header::HeaderMap::new();
        h2.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(
            classify(s(429), &h2, "slow down"),
            Failure::Retry {
                detail: "HTTP 429: slow down".into(),
                after: Some(Duration::from_secs(3)),
                rate_limited: true
            }
        );
    }
}
