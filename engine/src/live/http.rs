//! The HTTP API of `herald run` (axum), on two listeners with three roles (see
//! `docs/security.md`):
//!
//! - the **ingest listener** (`[http] listen`, public-facing): Segment/RudderStack ingest
//!   with a *write key*, Twilio's signed status callbacks, signed tracking links, and
//!   `/healthz`;
//! - the **admin listener** (`[admin] listen`, 127.0.0.1 by default): the query API and
//!   `/metrics` with a *read key*, journey triggers and engagement reports with an *admin
//!   key* (which can also read), and `/healthz`.
//!
//! Read and admin keys come as `Authorization: Bearer KEY`. Every credential is checked
//! before the body is read (401 otherwise), compared in constant time, and rate-limited
//! per key (429 with `Retry-After`). Connections, TLS and timeouts: `serve`.
//!
//! Ingest (`POST /v1/{track,identify,page,screen,group,alias,batch}`, `/v1/import` as an
//! alias of batch): the write key is the HTTP Basic user name; the body is JSON, gzip when
//! `Content-Encoding: gzip`, at most `http.max_batch_bytes` after decompression. On the
//! single-message endpoints the endpoint decides the type (as Segment's API does). Each
//! message is checked by the same parser as every other source; rejected ones go to the
//! dead-letter output. Replies: 200 `{"success":true}` when everything was accepted;
//! 200 with `accepted` and `rejected` (index, reason, detail) when a batch was partly
//! accepted; 400 with the same when nothing was; 401 bad key; 413 too large; 503 when
//! the events topic (Kafka mode) or the workers (shutting down) cannot take the events,
//! so the SDK retries. Embedded mode hands events to the workers; Kafka mode produces
//! each accepted message to the first events topic (key: user) and replies after the
//! broker's ack.
//!
//! Notifications (see `engagement`): `POST /v1/engagement` (opens and clicks reported by
//! an ESP, admin key), `GET /v1/t/{click,open}/{message_id}` (signed tracking links) and
//! `POST /v1/providers/twilio/status` (delivery reports signed by Twilio).
//!
//! Query: `GET /v1/segments`, `/v1/segments/{name}/members?cursor=&limit=`,
//! `/v1/users/{id}`, `/healthz`, `/metrics`. Definitions and explain (`define_api`):
//! `GET|PUT|DELETE /v1/segments/{name}`, `POST /v1/segments/preview`,
//! `GET /v1/users/{id}/explain`.

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as AxumJson, Router};
use base64::Engine as _;
use herald_connectors::events::DeadLetter;
use herald_operators::event::{parse_json, Event, RejectReason};
use herald_operators::journey::compile::{CTrigger, API_TRIGGER_EVENT, API_TRIGGER_KEY};
use herald_operators::time::format_rfc3339_ms;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::sink::SinkMsg;
use super::{now_ms, Live};
use crate::EngineError;

/// How long a Kafka-mode ingest request waits for the broker's acks before answering
/// 503 (the SDK retries; a record delivered meanwhile is deduplicated).
const KAFKA_ACK_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(super) struct App {
    pub(super) live: Arc<Live>,
    producer: Option<FutureProducer>,
    events_topic: String,
    write_limiter: Option<Arc<KeyedLimiter>>,
    admin_limiter: Option<Arc<KeyedLimiter>>,
}

type KeyedLimiter = governor::DefaultKeyedRateLimiter<String>;

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// A write key, as the HTTP Basic user name.
    Write,
    /// A read or admin key, as a bearer token.
    Read,
    /// An admin key, as a bearer token.
    Admin,
}

fn limiter(rate: u32, burst: u32) -> Option<Arc<KeyedLimiter>> {
    let rate = std::num::NonZeroU32::new(rate)?;
    let burst = std::num::NonZeroU32::new(burst.max(rate.get()))?;
    Some(Arc::new(governor::RateLimiter::keyed(
        governor::Quota::per_second(rate).allow_burst(burst),
    )))
}

/// The routes of the ingest listener and of the admin listener.
pub fn routers(live: Arc<Live>) -> Result<(Router, Router), EngineError> {
    let (producer, events_topic) = match &live.config.kafka {
        Some(k) => (
            Some(super::kafka::producer(k)?),
            k.events_topics.first().cloned().unwrap_or_default(),
        ),
        None => (None, String::new()),
    };
    let write_limiter = limiter(live.config.http.rate_limit, live.config.http.rate_burst);
    let admin_limiter = limiter(live.config.admin.rate_limit, live.config.admin.rate_burst);
    let app = App {
        live,
        producer,
        events_topic,
        write_limiter,
        admin_limiter,
    };
    let guard = |role: Role| {
        axum::middleware::from_fn_with_state(
            app.clone(),
            move |State(app): State<App>, req: axum::extract::Request, next: Next| async move {
                match authorize(&app, role, req.headers()) {
                    Some(refused) => refused,
                    None => next.run(req).await,
                }
            },
        )
    };
    let mut router = Router::new();
    for kind in ["track", "identify", "page", "screen", "group", "alias"] {
        router = router.route(
            &format!("/v1/{kind}"),
            post(
                move |State(app): State<App>, headers: HeaderMap, body: Body| {
                    ingest(app, Some(kind), headers, body)
                },
            ),
        );
    }
    for path in ["/v1/batch", "/v1/import"] {
        router = router.route(
            path,
            post(|State(app): State<App>, headers: HeaderMap, body: Body| {
                ingest(app, None, headers, body)
            }),
        );
    }
    let ingest = router
        .route_layer(guard(Role::Write))
        .route(
            "/v1/providers/twilio/status",
            post(super::engagement::twilio_status),
        )
        .route("/v1/t/{kind}/{message_id}", get(super::engagement::tracked))
        .route("/healthz", get(health))
        .fallback(not_here)
        .with_state(app.clone());
    use super::define_api as defs;
    let read = Router::new()
        .route("/v1/segments", get(segments))
        .route("/v1/segments/preview", post(defs::preview))
        .route("/v1/segments/{name}", get(defs::get_segment))
        .route("/v1/segments/{name}/members", get(members))
        .route("/v1/users/{id}", get(user))
        .route("/v1/users/{id}/explain", get(defs::explain))
        .route("/v1/users/{id}/journeys", get(defs::user_journeys))
        .route("/v1/journeys", get(defs::journeys))
        .route("/v1/journeys/{name}", get(defs::get_journey))
        .route("/metrics", get(metrics))
        .route_layer(guard(Role::Read));
    let act = Router::new()
        .route("/v1/journeys/{name}/trigger", post(trigger))
        .route("/v1/journeys/{name}/pause", post(defs::pause_journey))
        .route("/v1/journeys/{name}", axum::routing::put(defs::put_journey))
        .route("/v1/journeys/{name}/resume", post(defs::resume_journey))
        .route("/v1/engagement", post(super::engagement::engagement))
        .route(
            "/v1/segments/{name}",
            axum::routing::put(defs::put_segment).delete(defs::delete_segment),
        )
        .route_layer(guard(Role::Admin));
    let admin = read
        .merge(act)
        .route("/healthz", get(health))
        .fallback(not_here)
        .with_state(app);
    Ok((ingest, admin))
}

/// 404 for a path this listener does not serve, saying where it is served if anywhere.
async fn not_here(State(app): State<App>, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let admin = [
        "/v1/segments",
        "/v1/users/",
        "/metrics",
        "/v1/journeys",
        "/v1/engagement",
    ];
    let detail = if admin.iter().any(|p| path.starts_with(p)) {
        format!("{path} is served on the admin listener ([admin] listen), not here")
    } else {
        format!("no route {path}")
    };
    refuse(&app, StatusCode::NOT_FOUND, "not_found", detail)
}

/// Whether `given` is one of `keys`: the digests are compared, each in constant time, so
/// neither a key's bytes nor its length show in the time taken.
fn known_key(keys: &[String], given: &str) -> bool {
    use sha1::Digest as _;
    use subtle::ConstantTimeEq as _;
    let given = sha1::Sha1::digest(given.as_bytes());
    keys.iter()
        .fold(subtle::Choice::from(0), |found, k| {
            found | sha1::Sha1::digest(k.as_bytes()).ct_eq(&given)
        })
        .into()
}

/// The bearer token of `Authorization: Bearer KEY`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The refusal for a request without `role`'s credential, or over its key's rate (None:
/// let it through). Runs before anything reads the body.
fn authorize(app: &App, role: Role, headers: &HeaderMap) -> Option<Response> {
    let (key, limiter) = match role {
        Role::Write => {
            let key = match admit(app, headers) {
                Ok(k) => k,
                Err(refused) => return Some(*refused),
            };
            if let Some(refused) = refuse_if_stopping(app) {
                return Some(refused);
            }
            (key, &app.write_limiter)
        }
        Role::Read | Role::Admin => {
            let cfg = &app.live.config.admin;
            let unauthorized = |reason: &str, detail: String| {
                let mut r = refuse(app, StatusCode::UNAUTHORIZED, reason, detail);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"herald\""),
                );
                r
            };
            let Some(token) = bearer(headers) else {
                let what = if role == Role::Admin {
                    "an admin"
                } else {
                    "a read or admin"
                };
                return Some(unauthorized(
                    "missing_key",
                    format!("send {what} key as `Authorization: Bearer KEY`"),
                ));
            };
            let admin = known_key(&cfg.admin_keys, token);
            let ok = admin || (role == Role::Read && known_key(&cfg.read_keys, token));
            if !ok {
                let detail = if role == Role::Admin && known_key(&cfg.read_keys, token) {
                    "a read key cannot do this: it needs an admin key ([admin] admin_keys)"
                } else {
                    "unknown key"
                };
                return Some(unauthorized("bad_key", detail.into()));
            }
            (token.to_string(), &app.admin_limiter)
        }
    };
    let limiter = limiter.as_ref()?;
    let Err(not_until) = limiter.check_key(&key) else {
        return None;
    };
    use governor::clock::Clock as _;
    let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut r = refuse(
        app,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("this key is over its rate limit; retry in {secs} s"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&secs.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(r)
}

/// Reads a request body of at most `limit` bytes within `http.body_timeout`: 413 when
/// longer, 408 when the client is too slow.
pub(super) async fn read_body(
    app: &App,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, Response> {
    let timeout = app.live.timeouts.body;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(refuse(
            app,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over the limit of {limit} bytes"),
        )),
        Err(_) => Err(refuse(
            app,
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {timeout:?}"),
        )),
    }
}

pub(super) fn refuse(app: &App, status: StatusCode, reason: &str, error: String) -> Response {
    app.live
        .metrics
        .http_refused
        .get_or_create(&super::metrics::ReasonLabel {
            reason: reason.into(),
        })
        .inc();
    (
        status,
        AxumJson(json!({"success": false, "reason": reason, "error": error})),
    )
        .into_response()
}

/// The write key from `Authorization: Basic base64(key:)`.
fn write_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.clone(), |(k, _)| k.to_string()),
    )
}

/// The write key of a request, if it is an accepted one; the refusal otherwise.
fn admit(app: &App, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let cfg = &app.live.config.http;
    match write_key(headers) {
        Some(k) if known_key(&cfg.write_keys, &k) => Ok(k),
        Some(_) => Err(Box::new(refuse(
            app,
            StatusCode::UNAUTHORIZED,
            "bad_write_key",
            "unknown write key (the HTTP Basic user name)".into(),
        ))),
        None => Err(Box::new(refuse(
            app,
            StatusCode::UNAUTHORIZED,
            "missing_write_key",
            "no write key: send it as the HTTP Basic user name".into(),
        ))),
    }
}

/// 503 while shutting down (the client retries against another instance).
fn refuse_if_stopping(app: &App) -> Option<Response> {
    app.live.stopping().then(|| {
        refuse(
            app,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "Herald is shutting down; retry against another instance".into(),
        )
    })
}

/// `POST /v1/journeys/{name}/trigger` with `{"user_id": …, "properties": {…}}` (and an
/// optional `message_id` for idempotent retries): enters the user in an API-triggered
/// journey. The call becomes a track event (see `API_TRIGGER_EVENT`) that goes where
/// ingested events go, so it is deduplicated, durable in Kafka mode, and replayable.
async fn trigger(State(app): State<App>, Path(name): Path<String>, body: Body) -> Response {
    if let Some(refused) = refuse_if_stopping(&app) {
        return refused;
    }
    let body = match read_body(&app, body, app.live.limits.max_message_bytes).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let live = &app.live;
    // The versions in force (journeys change through the definitions API).
    let entry = live.defs.read().ok().and_then(|d| {
        let set = d.journey_set()?;
        let j = set.journeys.iter().find(|j| j.name == name)?;
        Some(j.entry.clone())
    });
    let Some(entry) = entry else {
        return refuse(
            &app,
            StatusCode::NOT_FOUND,
            "unknown_journey",
            format!("no journey named '{name}'"),
        );
    };
    if entry != CTrigger::Api {
        return refuse(
            &app,
            StatusCode::CONFLICT,
            "not_api_triggered",
            format!("journey '{name}' does not enter on API calls (its entry is not `api: true`)"),
        );
    }
    let bad = |detail: String| refuse(&app, StatusCode::BAD_REQUEST, "bad_trigger", detail);
    let Ok(Json::Object(req)) = serde_json::from_slice::<Json>(&body) else {
        return bad(
            "the body must be a JSON object like {\"user_id\": \"u1\", \"properties\": {}}".into(),
        );
    };
    let user = match req.get("user_id") {
        Some(Json::String(u)) if !u.is_empty() => u.clone(),
        _ => return bad("`user_id` must be a non-empty string".into()),
    };
    let properties = match req.get("properties") {
        None | Some(Json::Null) => Json::Object(Map::new()),
        Some(p @ Json::Object(_)) => p.clone(),
        Some(_) => return bad("`properties` must be an object".into()),
    };
    let received = now_ms() as i64;
    let message_id = match req.get("message_id") {
        Some(Json::String(m)) if !m.is_empty() => m.clone(),
        None => format!(
            "api-{:032x}",
            xxhash_rust::xxh3::xxh3_128(
                format!("{name}\0{user}\0{received}\0{}", trigger_seq()).as_bytes()
            )
        ),
        Some(_) => return bad("`message_id` must be a non-empty string".into()),
    };
    let msg = json!({
        "type": "track",
        "event": API_TRIGGER_EVENT,
        "userId": user,
        "messageId": message_id,
        "timestamp": format_rfc3339_ms(received),
        "properties": properties,
        "context": { API_TRIGGER_KEY: name },
    });
    let text = serde_json::to_vec(&msg).unwrap_or_default();
    let (events, rejections) = parse_json(&msg, &text, Some(received), live.limits);
    if let Some(r) = rejections.first() {
        return bad(format!("{}: {}", r.reason.as_str(), r.detail));
    }
    if let Err(resp) = hand_on(&app, &msg, Some("track"), received, events, &[]).await {
        return resp;
    }
    (
        StatusCode::OK,
        AxumJson(
            json!({"success": true, "journey": name, "user_id": user, "message_id": message_id}),
        ),
    )
        .into_response()
}

/// Distinguishes API triggers generated within one millisecond.
fn trigger_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

async fn ingest(app: App, kind: Option<&'static str>, headers: HeaderMap, body: Body) -> Response {
    let live = &app.live;
    let cfg = &live.config.http;
    let limit = cfg.max_batch_bytes;
    let raw = match read_body(&app, body, limit + 64 * 1024).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let bytes: Vec<u8> = if gzip {
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(&raw[..]).take(limit as u64 + 1);
        if let Err(e) = decoder.read_to_end(&mut out) {
            return refuse(
                &app,
                StatusCode::BAD_REQUEST,
                "bad_gzip",
                format!("Content-Encoding is gzip but the body does not decompress: {e}"),
            );
        }
        out
    } else {
        raw.to_vec()
    };
    if bytes.len() > limit {
        return refuse(
            &app,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over the limit of {limit} bytes"),
        );
    }
    let received = now_ms() as i64;
    let source = format!("http:/v1/{}", kind.unwrap_or("batch"));
    let cap = cfg.dead_letter_payload_bytes;
    let dead_letter = |reason: RejectReason, detail: String, index: Option<usize>, raw: &[u8]| {
        let (raw, detail) = if raw.len() > cap {
            let cut = format!(
                "{detail} (payload cut to its first {cap} of {} bytes)",
                raw.len()
            );
            (&raw[..cap], cut)
        } else {
            (raw, detail)
        };
        live.to_sink(SinkMsg::DeadLetter {
            letter: DeadLetter {
                source: source.clone(),
                line: 0,
                batch_index: index,
                reason,
                detail,
                raw: String::from_utf8_lossy(raw).into_owned(),
            },
            raw: raw.to_vec(),
            kafka: None,
        });
    };

    // The messages as JSON: the endpoint sets the type of a single message.
    let mut json: Json = match serde_json::from_slice(&bytes) {
        Ok(j) => j,
        Err(e) => {
            let detail = format!("not valid JSON: {e}");
            live.metrics.dead_letter(RejectReason::InvalidJson.as_str());
            dead_letter(RejectReason::InvalidJson, detail.clone(), None, &bytes);
            return rejected_response(0, &[(None, RejectReason::InvalidJson, detail)]);
        }
    };
    // The endpoint sets the type of a single message; only then is the text rewritten.
    if let (Some(kind), Json::Object(obj)) = (kind, &mut json) {
        obj.insert("type".into(), Json::from(kind));
    }
    let text: std::borrow::Cow<[u8]> = match kind {
        Some(_) => serde_json::to_vec(&json).unwrap_or_default().into(),
        None => bytes.as_slice().into(),
    };
    let (events, rejections) = parse_json(&json, &text, Some(received), live.limits);
    let mut rejected = Vec::with_capacity(rejections.len());
    // Past `dead_letters_per_request`, a request's rejections are summarised per reason
    // (the reply still lists each one).
    let mut rest: std::collections::BTreeMap<&str, (RejectReason, usize, usize, usize)> =
        Default::default();
    for (n, r) in rejections.iter().enumerate() {
        live.metrics.dead_letter(r.reason.as_str());
        rejected.push((r.batch_index, r.reason, r.detail.clone()));
        if n >= cfg.dead_letters_per_request {
            let i = r.batch_index.unwrap_or(0);
            let e = rest.entry(r.reason.as_str()).or_insert((r.reason, 0, i, i));
            e.1 += 1;
            e.2 = e.2.min(i);
            e.3 = e.3.max(i);
            continue;
        }
        // A batch item is dead-lettered as itself, not as the whole request.
        let raw = r.item.as_deref().map_or(bytes.as_slice(), str::as_bytes);
        dead_letter(r.reason, r.detail.clone(), r.batch_index, raw);
    }
    for (reason, n, first, last) in rest.into_values() {
        live.metrics.dead_letters_summarised.inc_by(n as u64);
        let detail = format!(
            "and {n} more items of this request rejected as {} (batch items {first} to \
             {last}; past http.dead_letters_per_request, not written one by one)",
            reason.as_str()
        );
        dead_letter(reason, detail, None, b"");
    }
    let accepted = events.len();
    if accepted > 0 {
        if let Err(resp) = hand_on(&app, &json, kind, received, events, &rejections).await {
            return resp;
        }
    }
    if rejected.is_empty() {
        (StatusCode::OK, AxumJson(json!({"success": true}))).into_response()
    } else {
        rejected_response(accepted, &rejected)
    }
}

fn rejected_response(
    accepted: usize,
    rejected: &[(Option<usize>, RejectReason, String)],
) -> Response {
    let status = if accepted > 0 {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let list: Vec<Json> = rejected
        .iter()
        .map(|(i, reason, detail)| json!({"index": i, "reason": reason.as_str(), "detail": detail}))
        .collect();
    (
        status,
        AxumJson(json!({"success": accepted > 0, "accepted": accepted, "rejected": list})),
    )
        .into_response()
}

/// Hands accepted events on: to the workers (embedded) or to the events topic (Kafka).
async fn hand_on(
    app: &App,
    json: &Json,
    kind: Option<&str>,
    received: i64,
    events: Vec<Event>,
    rejections: &[herald_operators::event::Rejection],
) -> Result<(), Response> {
    let live = &app.live;
    let Some(producer) = &app.producer else {
        let n = events.len() as u64;
        let refused = |e| match e {
            super::IngestError::Overloaded => refuse(
                app,
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Herald's input queue is full; retry (redeliveries are deduplicated)".into(),
            ),
            super::IngestError::Stopped => refuse(
                app,
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "Herald is shutting down; retry".into(),
            ),
        };
        // With durable state the answer waits for the ingest log's fsync.
        match live.ingest_all(events, true) {
            Ok(None) => {}
            Ok(Some(synced)) => match synced.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    live.metrics.error("ingest_log");
                    return Err(refuse(
                        app,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_durable",
                        format!("the ingest log could not keep the events ({e}); retry"),
                    ));
                }
                Err(_) => return Err(refused(super::IngestError::Stopped)),
            },
            Err(e) => return Err(refused(e)),
        }
        live.metrics
            .events_in
            .get_or_create(&super::metrics::SourceLabel {
                source: "http".into(),
            })
            .inc_by(n);
        return Ok(());
    };
    // Kafka mode: one record per accepted message, as the Segment JSON it arrived as
    // (plus receivedAt and the envelope's sentAt), keyed by user.
    let mut items: Vec<Map<String, Json>> = Vec::with_capacity(events.len());
    if let Json::Object(o) = json {
        match (kind, o.get("batch")) {
            (None, Some(Json::Array(batch))) => {
                let bad: BTreeSet<usize> =
                    rejections.iter().filter_map(|r| r.batch_index).collect();
                let sent_at = o.get("sentAt").cloned();
                for (i, item) in batch.iter().enumerate() {
                    if let (false, Json::Object(m)) = (bad.contains(&i), item) {
                        let mut m = m.clone();
                        if let (Some(s), false) = (&sent_at, m.contains_key("sentAt")) {
                            m.insert("sentAt".into(), s.clone());
                        }
                        items.push(m);
                    }
                }
            }
            // A single message, on its own endpoint or posted to /v1/batch.
            _ => items.push(o.clone()),
        }
    }
    if items.len() != events.len() {
        tracing::error!(
            "HTTP ingest: {} accepted events but {} messages to produce",
            events.len(),
            items.len()
        );
        return Err(refuse(
            app,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not pair accepted events with their messages; nothing was produced".into(),
        ));
    }
    let received_at = Json::from(format_rfc3339_ms(received));
    let payloads: Vec<(String, Vec<u8>)> = items
        .into_iter()
        .zip(events.iter())
        .map(|(mut m, ev)| {
            m.entry("receivedAt").or_insert(received_at.clone());
            (ev.user.clone(), serde_json::to_vec(&m).unwrap_or_default())
        })
        .collect();
    let mut acks = Vec::with_capacity(payloads.len());
    for (key, payload) in &payloads {
        acks.push(
            producer.send(
                FutureRecord::to(&app.events_topic)
                    .key(key)
                    .payload(payload),
                Duration::from_secs(5),
            ),
        );
    }
    let Ok(results) = tokio::time::timeout(KAFKA_ACK_WAIT, futures::future::join_all(acks)).await
    else {
        live.metrics.error("kafka_ingest");
        return Err(refuse(
            app,
            StatusCode::SERVICE_UNAVAILABLE,
            "kafka_unavailable",
            format!("the events topic did not acknowledge within {KAFKA_ACK_WAIT:?}; retry"),
        ));
    };
    for r in results {
        if let Err((e, _)) = r {
            live.metrics.error("kafka_ingest");
            return Err(refuse(
                app,
                StatusCode::SERVICE_UNAVAILABLE,
                "kafka_unavailable",
                format!("the events topic did not take the batch ({e}); retry"),
            ));
        }
    }
    for _ in &payloads {
        live.metrics.event_in("http");
    }
    Ok(())
}

async fn segments(State(app): State<App>) -> Response {
    let live = &app.live;
    // Lock order: the definitions before the query state (as everywhere).
    let Ok(defs) = live.defs.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Ok(state) = live.state.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let list: Vec<Json> = defs
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.deleted)
        .map(|(i, e)| {
            json!({
                "name": e.name,
                "kind": super::define_api::kind(&defs, i),
                "size": state.size(i),
                "version": e.version,
            })
        })
        .collect();
    let frontier = live.frontier.load(Ordering::Acquire);
    AxumJson(json!({"segments": list, "as_of": format_rfc3339_ms(frontier as i64)})).into_response()
}

#[derive(Deserialize)]
struct PageQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn members(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let live = &app.live;
    let Some(i) = live.defs.read().ok().and_then(|d| d.index(&name)) else {
        return (
            StatusCode::NOT_FOUND,
            AxumJson(json!({"error": format!("no segment named '{name}'")})),
        )
            .into_response();
    };
    let limit = q
        .limit
        .unwrap_or(live.config.http.page_size)
        .clamp(1, 100_000);
    let Ok(state) = live.state.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let page = state.page(i, q.cursor.as_deref(), limit);
    let next = (page.len() == limit)
        .then(|| page.last().cloned())
        .flatten();
    AxumJson(json!({
        "segment": name,
        "size": state.size(i),
        "members": page,
        "next_cursor": next,
    }))
    .into_response()
}

async fn user(State(app): State<App>, Path(id): Path<String>) -> Response {
    let live = &app.live;
    // Lock order: the definitions before the query state.
    let Ok(defs) = live.defs.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Ok(state) = live.state.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let segs = state.segments_of(&id);
    let traits = state.traits_of(&id);
    if segs.is_none() && traits.is_none() {
        return (
            StatusCode::NOT_FOUND,
            AxumJson(json!({"error": format!("no user '{id}' in any segment or with traits")})),
        )
            .into_response();
    }
    let segments: Vec<&str> = segs
        .map(|s| {
            s.iter()
                .filter_map(|i| defs.entries.get(*i as usize).map(|e| e.name.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let traits: Map<String, Json> = traits
        .map(|t| t.into_iter().map(|(k, (_, v))| (k, v)).collect())
        .unwrap_or_default();
    AxumJson(json!({"user_id": id, "traits": traits, "segments": segments})).into_response()
}

async fn health(State(app): State<App>) -> Response {
    let live = &app.live;
    let frontier = live.frontier.load(Ordering::Acquire);
    let delay = now_ms().saturating_sub(frontier);
    let (status, text) = if live.stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if frontier == 0 || delay > 10_000 {
        (StatusCode::SERVICE_UNAVAILABLE, "behind")
    } else {
        (StatusCode::OK, "ok")
    };
    (
        status,
        AxumJson(json!({"status": text, "frontier_delay_ms": delay})),
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.live.metrics.encode(),
    )
        .into_response()
}
