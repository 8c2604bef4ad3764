//! Events as the Segment / RudderStack spec defines them, and the rules that accept or
//! reject a raw message (`shared/spec/events.md`).
//!
//! Owns [`Event`] (an accepted message, normalised: user key, type, instant, message id),
//! [`parse_message`] (bytes -> events or a [`Rejection`] with a [`RejectReason`]), and the
//! per-event field lookups the segment language needs. Pure: no I/O, no clock; the caller
//! supplies the receive time when it has one. Does not deduplicate (that needs state).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::ast::{EventField, PathRoot};
use crate::time::parse_rfc3339_ms;
use crate::value::Value;

/// Default limit on one message's size in bytes (configurable by the caller).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// The six message types of the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// `track`
    Track,
    /// `identify`
    Identify,
    /// `page`
    Page,
    /// `screen`
    Screen,
    /// `group`
    Group,
    /// `alias`
    Alias,
}

impl EventType {
    /// The spec's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Identify => "identify",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }

    /// Every type, in declaration order.
    pub const ALL: [EventType; 6] = [
        EventType::Track,
        EventType::Identify,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    /// The type named by a message's `type` field.
    pub fn parse(s: &str) -> Option<EventType> {
        Some(match s {
            "track" => EventType::Track,
            "identify" => EventType::Identify,
            "page" => EventType::Page,
            "screen" => EventType::Screen,
            "group" => EventType::Group,
            "alias" => EventType::Alias,
            _ => return None,
        })
    }
}

/// An accepted message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The user key: `userId`, or `anonymousId` where `userId` is absent.
    pub user: String,
    /// The message type.
    pub kind: EventType,
    /// `event` for track, `name` for page/screen, `None` otherwise.
    pub event: Option<String>,
    /// `messageId`; where the sender gave none, `gen-` and a hash of the message bytes,
    /// so that byte-identical redeliveries still deduplicate.
    pub message_id: String,
    /// The event's instant (ms since the epoch) after the spec's clock-skew rule.
    pub timestamp: i64,
    /// `properties` (empty object when absent).
    #[serde(with = "json_object")]
    pub properties: Map<String, Json>,
    /// `context` (empty object when absent).
    #[serde(with = "json_object")]
    pub context: Map<String, Json>,
    /// `traits` (empty object when absent).
    #[serde(with = "json_object")]
    pub traits: Map<String, Json>,
}

/// JSON objects inside an [`Event`]: as objects in self-describing formats (JSON), as
/// JSON text in compact ones (bincode: timely's exchange between processes and the
/// checkpoints), which cannot carry a value whose shape only its contents tell.
mod json_object {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value as Json};

    pub fn serialize<S: Serializer>(m: &Map<String, Json>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            m.serialize(s)
        } else {
            let text = serde_json::to_string(m).map_err(serde::ser::Error::custom)?;
            s.serialize_str(&text)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Json>, D::Error> {
        if d.is_human_readable() {
            Map::deserialize(d)
        } else {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map_err(serde::de::Error::custom)
        }
    }
}

/// Why a message was rejected. The `as_str` names are the dead-letter reasons and
/// metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// Not valid JSON (or not UTF-8).
    InvalidJson,
    /// Valid JSON but not an object.
    NotAnObject,
    /// Over the per-message size limit.
    TooLarge,
    /// `type` missing or not one of the six.
    BadType,
    /// Neither `userId` nor `anonymousId`.
    MissingUser,
    /// A `track` without `event`.
    MissingEvent,
    /// An `alias` without `previousId` or `userId`.
    MissingAliasIds,
    /// A timestamp field that is not RFC 3339.
    BadTimestamp,
    /// No `timestamp`, no `originalTimestamp` and no receive time to fall back on.
    MissingTimestamp,
    /// A `batch` envelope whose `batch` is not an array.
    BadBatch,
}

impl RejectReason {
    /// Stable snake_case name used in dead letters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::TooLarge => "too_large",
            RejectReason::BadType => "bad_type",
            RejectReason::MissingUser => "missing_user",
            RejectReason::MissingEvent => "missing_event",
            RejectReason::MissingAliasIds => "missing_alias_ids",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::MissingTimestamp => "missing_timestamp",
            RejectReason::BadBatch => "bad_batch",
        }
    }
}

/// A rejected message: the reason and a plain sentence for the dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The machine-readable reason.
    pub reason: RejectReason,
    /// A human-readable explanation naming the offending field.
    pub detail: String,
    /// Index inside a `batch` envelope, when the message came from one.
    pub batch_index: Option<usize>,
    /// The batch item's own JSON text, when the message came from a `batch` (callers
    /// that dead-letter items one by one use it instead of the whole envelope).
    pub item: Option<String>,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
            batch_index: None,
            item: None,
        }
    }
}

/// Limits applied while parsing.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Maximum bytes of one message (a batch envelope may hold several such messages).
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Parses one raw message: a single event or a `batch` envelope. Returns the accepted
/// events and the rejections (a batch may yield both). `received_at` is the receive time
/// in ms when the caller has one (HTTP, Kafka); file replay passes `None`, and then a
/// message's `receivedAt` field is the receive time.
pub fn parse_message(
    bytes: &[u8],
    received_at: Option<i64>,
    limits: Limits,
) -> (Vec<Event>, Vec<Rejection>) {
    match serde_json::from_slice(bytes) {
        Ok(json) => parse_json(&json, bytes, received_at, limits),
        Err(e) => (
            vec![],
            vec![Rejection::new(
                RejectReason::InvalidJson,
                format!("not valid JSON: {e}"),
            )],
        ),
    }
}

/// [`parse_message`] for a message already parsed: `json` is the message and `bytes`
/// its text (measured against the size limit and hashed for a missing `messageId`).
pub fn parse_json(
    json: &Json,
    bytes: &[u8],
    received_at: Option<i64>,
    limits: Limits,
) -> (Vec<Event>, Vec<Rejection>) {
    let Json::Object(obj) = json else {
        return (
            vec![],
            vec![Rejection::new(
                RejectReason::NotAnObject,
                "a message must be a JSON object",
            )],
        );
    };
    if let Some(batch) = obj.get("batch") {
        let Json::Array(items) = batch else {
            return (
                vec![],
                vec![Rejection::new(
                    RejectReason::BadBatch,
                    "`batch` must be an array of messages",
                )],
            );
        };
        let envelope_sent_at = obj.get("sentAt");
        let mut events = Vec::with_capacity(items.len());
        let mut rejections = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let raw = serde_json::to_vec(item).unwrap_or_default();
            let size = raw.len();
            let result = if size > limits.max_message_bytes {
                Err(Rejection::new(
                    RejectReason::TooLarge,
                    format!(
                        "message is {size} bytes, over the limit of {}",
                        limits.max_message_bytes
                    ),
                ))
            } else {
                match item {
                    Json::Object(m) => accept_object(m, envelope_sent_at, received_at, &raw),
                    _ => Err(Rejection::new(
                        RejectReason::NotAnObject,
                        "a batch item must be a JSON object",
                    )),
                }
            };
            match result {
                Ok(e) => events.push(e),
                Err(mut r) => {
                    r.batch_index = Some(i);
                    r.item = Some(String::from_utf8_lossy(&raw).into_owned());
                    rejections.push(r);
                }
            }
        }
        return (events, rejections);
    }
    if bytes.len() > limits.max_message_bytes {
        return (
            vec![],
            vec![Rejection::new(
                RejectReason::TooLarge,
                format!(
                    "message is {} bytes, over the limit of {}",
                    bytes.len(),
                    limits.max_message_bytes
                ),
            )],
        );
    }
    match accept_object(obj, None, received_at, bytes) {
        Ok(e) => (vec![e], vec![]),
        Err(r) => (vec![], vec![r]),
    }
}

fn string_field(obj: &Map<String, Json>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Json::String(s) if !s.is_empty() => Some(s.clone()),
        // SDKs in typed languages sometimes send numeric ids.
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn instant_field(obj: &Map<String, Json>, key: &str) -> Result<Option<i64>, Rejection> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => parse_rfc3339_ms(s)
            .map(Some)
            .map_err(|e| Rejection::new(RejectReason::BadTimestamp, format!("`{key}`: {e}"))),
        Some(other) => Err(Rejection::new(
            RejectReason::BadTimestamp,
            format!("`{key}` must be an RFC 3339 string, found {other}"),
        )),
    }
}

fn object_field(obj: &Map<String, Json>, key: &str) -> Map<String, Json> {
    match obj.get(key) {
        Some(Json::Object(m)) => m.clone(),
        _ => Map::new(),
    }
}

fn accept_object(
    obj: &Map<String, Json>,
    envelope_sent_at: Option<&Json>,
    received_at: Option<i64>,
    raw: &[u8],
) -> Result<Event, Rejection> {
    let type_name = obj.get("type").and_then(Json::as_str).unwrap_or("");
    let kind = EventType::parse(type_name).ok_or_else(|| {
        Rejection::new(
            RejectReason::BadType,
            if type_name.is_empty() {
                "`type` is missing; expected one of track, identify, page, screen, group, alias"
                    .to_string()
            } else {
                format!("`type` '{type_name}' is not one of track, identify, page, screen, group, alias")
            },
        )
    })?;
    let user_id = string_field(obj, "userId");
    let user = user_id
        .clone()
        .or_else(|| string_field(obj, "anonymousId"))
        .ok_or_else(|| {
            Rejection::new(
                RejectReason::MissingUser,
                "a message needs `userId` or `anonymousId`",
            )
        })?;
    let event = match kind {
        EventType::Track => Some(string_field(obj, "event").ok_or_else(|| {
            Rejection::new(RejectReason::MissingEvent, "a track message needs `event`")
        })?),
        EventType::Page | EventType::Screen => string_field(obj, "name"),
        _ => None,
    };
    if kind == EventType::Alias && (user_id.is_none() || string_field(obj, "previousId").is_none())
    {
        return Err(Rejection::new(
            RejectReason::MissingAliasIds,
            "an alias message needs `previousId` and `userId`",
        ));
    }
    let timestamp =
        match instant_field(obj, "timestamp")? {
            Some(t) => t,
            None => {
                let received = match instant_field(obj, "receivedAt")? {
                    Some(t) => Some(t),
                    None => received_at,
                };
                let sent = match instant_field(obj, "sentAt")? {
                    Some(t) => Some(t),
                    None => match envelope_sent_at {
                        Some(Json::String(s)) => Some(parse_rfc3339_ms(s).map_err(|e| {
                            Rejection::new(RejectReason::BadTimestamp, format!("`sentAt`: {e}"))
                        })?),
                        _ => None,
                    },
                };
                match (instant_field(obj, "originalTimestamp")?, received, sent) {
                    // The spec's clock-skew rule: correct the device clock by the skew
                    // between when the SDK sent the message and when it arrived.
                    (Some(orig), Some(recv), Some(sent)) => {
                        orig.saturating_add(recv.saturating_sub(sent))
                    }
                    (Some(orig), _, _) => orig,
                    (None, Some(recv), _) => recv,
                    (None, None, _) => return Err(Rejection::new(
                        RejectReason::MissingTimestamp,
                        "no `timestamp`, `originalTimestamp` or `receivedAt`, and no receive time",
                    )),
                }
            }
        };
    let message_id = string_field(obj, "messageId")
        .unwrap_or_else(|| format!("gen-{:016x}", xxhash_rust::xxh3::xxh3_64(raw)));
    Ok(Event {
        user,
        kind,
        event,
        message_id,
        timestamp,
        properties: object_field(obj, "properties"),
        context: object_field(obj, "context"),
        traits: object_field(obj, "traits"),
    })
}

/// Events order by (timestamp, user, message id, …) so they can flow through
/// differential collections; the JSON objects break remaining ties by their text, which
/// keeps the order consistent with equality.
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (
            self.timestamp,
            &self.user,
            &self.message_id,
            self.kind,
            &self.event,
        )
            .cmp(&(
                other.timestamp,
                &other.user,
                &other.message_id,
                other.kind,
                &other.event,
            ))
            .then_with(|| {
                let text = |e: &Event| {
                    serde_json::to_string(&(&e.properties, &e.context, &e.traits))
                        .unwrap_or_default()
                };
                text(self).cmp(&text(other))
            })
    }
}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Eq for Event {}

impl Event {
    /// The value of an event field as the segment language sees it.
    pub fn field(&self, field: &EventField) -> Value {
        match field {
            EventField::Event => self
                .event
                .as_ref()
                .map(|s| Value::Str(s.clone()))
                .unwrap_or(Value::Null),
            EventField::Type => Value::Str(self.kind.as_str().to_string()),
            EventField::Timestamp => Value::Ts(self.timestamp),
            EventField::MessageId => Value::Str(self.message_id.clone()),
            EventField::UserId => Value::Str(self.user.clone()),
            EventField::Path(root, path) => {
                let obj = match root {
                    PathRoot::Properties => &self.properties,
                    PathRoot::Context => &self.context,
                    PathRoot::Traits => &self.traits,
                };
                lookup_path(obj, path)
            }
        }
    }

    /// The trait writes of an `identify`: `context.traits` first, then `traits`, so a
    /// key present in both takes the top-level `traits` value. Empty for other types.
    pub fn trait_writes(&self) -> Vec<(String, Value)> {
        if self.kind != EventType::Identify {
            return vec![];
        }
        let mut out: std::collections::BTreeMap<String, Value> = Default::default();
        if let Some(Json::Object(ctx)) = self.context.get("traits") {
            for (k, v) in ctx {
                out.insert(k.clone(), Value::from_json(v));
            }
        }
        for (k, v) in &self.traits {
            out.insert(k.clone(), Value::from_json(v));
        }
        out.into_iter().collect()
    }
}

/// Looks up a dotted path in a JSON object; NULL where any step is missing.
pub fn lookup_path(obj: &Map<String, Json>, path: &[String]) -> Value {
    let Some((first, rest)) = path.split_first() else {
        return Value::Null;
    };
    let mut cur = match obj.get(first) {
        Some(v) => v,
        None => return Value::Null,
    };
    for step in rest {
        cur = match cur {
            Json::Object(m) => match m.get(step) {
                Some(v) => v,
                None => return Value::Null,
            },
            _ => return Value::Null,
        };
    }
    Value::from_json(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Result<Event, RejectReason> {
        let (mut ev, rej) = parse_message(s.as_bytes(), None, Limits::default());
        match (ev.pop(), rej.first()) {
            (Some(e), None) => Ok(e),
            (None, Some(r)) => Err(r.reason),
            other => panic!("unexpected parse result {other:?}"),
        }
    }

    #[test]
    fn accepts_a_track_and_keys_by_user_then_anonymous_id() {
        let e = one(r#"{"type":"track","event":"Order Completed","userId":"u1","anonymousId":"a1","messageId":"m1","timestamp":"2026-03-01T10:00:00Z","properties":{"revenue":12.5}}"#).unwrap();
        assert_eq!(e.user, "u1");
        assert_eq!(
            e.field(&EventField::Path(
                PathRoot::Properties,
                vec!["revenue".into()]
            )),
            Value::num(12.5)
        );
        let e = one(r#"{"type":"page","name":"Home","anonymousId":"a1","timestamp":"2026-03-01T10:00:00Z"}"#).unwrap();
        assert_eq!(e.user, "a1");
        assert_eq!(e.event.as_deref(), Some("Home"));
        assert!(e.message_id.starts_with("gen-"));
    }

    #[test]
    fn rejects_what_the_spec_rejects() {
        assert_eq!(one("{nope"), Err(RejectReason::InvalidJson));
        assert_eq!(one("[1]"), Err(RejectReason::NotAnObject));
        assert_eq!(
            one(r#"{"type":"track","userId":"u","timestamp":"2026-03-01T10:00:00Z"}"#),
            Err(RejectReason::MissingEvent)
        );
        assert_eq!(
            one(r#"{"type":"track","event":"x","timestamp":"2026-03-01T10:00:00Z"}"#),
            Err(RejectReason::MissingUser)
        );
        assert_eq!(
            one(r#"{"type":"alias","userId":"u","timestamp":"2026-03-01T10:00:00Z"}"#),
            Err(RejectReason::MissingAliasIds)
        );
        assert_eq!(
            one(r#"{"type":"shout","userId":"u"}"#),
            Err(RejectReason::BadType)
        );
        assert_eq!(
            one(r#"{"type":"track","event":"x","userId":"u","timestamp":"yesterday"}"#),
            Err(RejectReason::BadTimestamp)
        );
        assert_eq!(
            one(r#"{"type":"track","event":"x","userId":"u"}"#),
            Err(RejectReason::MissingTimestamp)
        );
    }

    #[test]
    fn corrects_original_timestamp_by_clock_skew() {
        let e = one(r#"{"type":"track","event":"x","userId":"u","originalTimestamp":"2026-03-01T10:00:00Z","sentAt":"2026-03-01T10:00:05Z","receivedAt":"2026-03-01T10:00:02Z"}"#).unwrap();
        assert_eq!(
            e.timestamp,
            parse_rfc3339_ms("2026-03-01T09:59:57Z").unwrap()
        );
    }

    #[test]
    fn a_batch_accepts_good_messages_and_names_bad_ones() {
        let (ev, rej) = parse_message(
            br#"{"batch":[{"type":"track","event":"a","userId":"u","timestamp":"2026-03-01T10:00:00Z"},{"type":"track","userId":"u"}],"sentAt":"2026-03-01T10:00:00Z"}"#,
            None,
            Limits::default(),
        );
        assert_eq!(ev.len(), 1);
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].batch_index, Some(1));
    }

    #[test]
    fn identify_traits_take_precedence_over_context_traits() {
        let e = one(r#"{"type":"identify","userId":"u","timestamp":"2026-03-01T10:00:00Z","traits":{"plan":"pro"},"context":{"traits":{"plan":"free","country":"IN"}}}"#).unwrap();
        assert_eq!(
            e.trait_writes(),
            vec![
                ("country".into(), Value::Str("IN".into())),
                ("plan".into(), Value::Str("pro".into()))
            ]
        );
    }

    #[test]
    fn oversized_messages_are_rejected() {
        let big = format!(
            r#"{{"type":"track","event":"x","userId":"u","timestamp":"2026-03-01T10:00:00Z","properties":{{"p":"{}"}}}}"#,
            "x".repeat(40_000)
        );
        assert_eq!(one(&big), Err(RejectReason::TooLarge));
    }
}
