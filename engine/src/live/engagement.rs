//! What providers and tracking report back about a message, as events.
//!
//! - `GET /v1/t/click/{message_id}?to=…&sig=…` and `GET /v1/t/open/{message_id}?sig=…`
//!   (ingest listener, no key: the signature is the credential): the signed tracking
//!   links Herald puts in messages (`tracking`). A click records `Message Clicked` with
//!   the target and redirects to it (302); an open records `Message Opened` and answers
//!   a 1×1 GIF. A link whose signature does not match is 403 and records nothing. Each
//!   message's first open and first click of each target count (their `messageId` is
//!   derived from message, kind and target, so repeats are deduplicated).
//! - `POST /v1/engagement` (admin listener, admin key): `{"message_id": …, "type": "open"|"click", "url"?: …,
//!   "event_id"?: …, "timestamp"?: RFC 3339}` or an array of them (an ESP's event webhook
//!   mapped to this shape, or a tracking endpoint in front of Herald). Each becomes a
//!   `Message Opened` / `Message Clicked` track event for the message's user, with the
//!   message's journey, channel and template, so segments and journey exits can use it.
//!   Its `messageId` is derived from `event_id` (or from the whole report), so a
//!   provider's retry is deduplicated on entry to the dataflow.
//! - `POST /v1/providers/twilio/status?message_id=…`: Twilio's status callback (form
//!   encoded). `delivered` becomes `Message Delivered`; `undelivered` and `failed`
//!   become `Message Failed` with the provider's `ErrorCode`; other statuses are
//!   acknowledged and dropped.
//!
//!   The callback must carry a valid `X-Twilio-Signature`: HMAC-SHA1, keyed with the
//!   channel's `auth_token`, of the callback URL Herald gave Twilio followed by every
//!   POST parameter's name and value in name order, base64 (Twilio's documented scheme).
//!   Anything else is 403.
//!
//! Unknown message ids are 404; without `[notify]` all are 404 too.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json as AxumJson;
use herald_connectors::notify::delivery::feedback_event;
use herald_connectors::notify::outbox::Entry;
use serde_json::{json, Value as Json};

use herald_connectors::notify::tracking::Kind;

use super::http::{read_body, refuse, App};
use super::now_ms;

/// Feeds an event; the refusal to answer with when it cannot be taken now.
fn feed_or_503(app: &App, ev: &Json) -> Option<Response> {
    let Some(n) = app.live.notify.get() else {
        return Some(no_notify(app));
    };
    (n.feed)(ev).err().map(|why| {
        refuse(
            app,
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("cannot take the event now ({why}); retry"),
        )
    })
}

fn no_notify(app: &App) -> Response {
    refuse(
        app,
        StatusCode::NOT_FOUND,
        "notify_off",
        "this Herald delivers no messages (no [notify] section)".into(),
    )
}

/// The outbox entry of a message id; the refusal (404, or 503 when the outbox cannot be
/// read) otherwise.
fn lookup(app: &App, n: &super::notify::Notify, id: &str) -> Result<Entry, Box<Response>> {
    match n.delivery.outbox().get(id) {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(Box::new(refuse(
            app,
            StatusCode::NOT_FOUND,
            "unknown_message",
            format!("no message '{id}' in the outbox"),
        ))),
        Err(e) => {
            app.live.metrics.error("outbox");
            Err(Box::new(refuse(
                app,
                StatusCode::SERVICE_UNAVAILABLE,
                "outbox",
                e.to_string(),
            )))
        }
    }
}

/// `POST /v1/engagement`.
pub(super) async fn engagement(State(app): State<App>, body: Body) -> Response {
    let body = match read_body(&app, body, app.live.config.http.max_batch_bytes).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let Some(n) = app.live.notify.get() else {
        return no_notify(&app);
    };
    let bad = |d: String| refuse(&app, StatusCode::BAD_REQUEST, "bad_engagement", d);
    let reports = match serde_json::from_slice::<Json>(&body) {
        Ok(Json::Array(a)) => a,
        Ok(o @ Json::Object(_)) => vec![o],
        _ => return bad("the body must be a JSON object or an array of them".into()),
    };
    // Every report is checked before any is fed: all or nothing.
    let mut events = Vec::with_capacity(reports.len());
    for (i, r) in reports.iter().enumerate() {
        let at = |d: &str| format!("report {i}: {d}");
        let Some(id) = r["message_id"].as_str().filter(|s| !s.is_empty()) else {
            return bad(at("`message_id` must be a non-empty string"));
        };
        let kind = match r["type"].as_str() {
            Some("open") => "opened",
            Some("click") => "clicked",
            _ => return bad(at("`type` must be \"open\" or \"click\"")),
        };
        let when = match r.get("timestamp") {
            None | Some(Json::Null) => now_ms() as i64,
            Some(Json::String(t)) => match herald_operators::time::parse_rfc3339_ms(t) {
                Ok(ms) => ms,
                Err(e) => return bad(at(&format!("`timestamp`: {e}"))),
            },
            Some(_) => return bad(at("`timestamp` must be a string")),
        };
        let entry = match lookup(&app, n, id) {
            Ok(e) => e,
            Err(resp) => return *resp,
        };
        let mut extra = json!({});
        if let Some(u) = r["url"].as_str() {
            extra["url"] = Json::from(u);
        }
        let mut ev = feedback_event(kind, &entry, extra, when);
        let key = match r["event_id"].as_str() {
            Some(e) => e.to_string(),
            None => r.to_string(),
        };
        ev["messageId"] = Json::from(engagement_id(kind, id, &key));
        events.push(ev);
    }
    for ev in &events {
        if let Some(resp) = feed_or_503(&app, ev) {
            return resp;
        }
    }
    (
        StatusCode::OK,
        AxumJson(json!({"success": true, "accepted": events.len()})),
    )
        .into_response()
}

/// `POST /v1/providers/twilio/status?message_id=…` (form body).
pub(super) async fn twilio_status(
    State(app): State<App>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(n) = app.live.notify.get() else {
        return no_notify(&app);
    };
    // The signature is checked before the body is parsed, but needs the body.
    let Some(signature) = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return refuse(
            &app,
            StatusCode::FORBIDDEN,
            "unsigned_callback",
            "no X-Twilio-Signature header: status callbacks must come from Twilio".into(),
        );
    };
    let Some(id) = q.get("message_id").filter(|s| !s.is_empty()) else {
        return refuse(
            &app,
            StatusCode::BAD_REQUEST,
            "bad_status",
            "the callback URL must carry ?message_id= (Herald sets it when sending)".into(),
        );
    };
    // (auth token, status callback URL) of each Messages API channel that asks for
    // callbacks.
    let callbacks: Vec<(String, String)> = app
        .live
        .config
        .notify
        .iter()
        .flat_map(|c| [c.sms.as_ref(), c.whatsapp.as_ref()])
        .flatten()
        .filter_map(|c| Some((c.auth_token.clone(), c.status_callback.clone()?)))
        .collect();
    if callbacks.is_empty() {
        return refuse(
            &app,
            StatusCode::FORBIDDEN,
            "bad_signature",
            "no channel sets a status_callback, so no callback is expected".into(),
        );
    }
    // The signature covers the body, so this route reads it (at most 16 KiB; Twilio's
    // callbacks are about 1 KiB) before it can tell Twilio from a forger.
    let body = match read_body(&app, body, 16 * 1024).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let signed = callbacks.iter().any(|(token, cb)| {
        let url = herald_connectors::notify::channel::status_callback_url(cb, id);
        twilio_signature_ok(token, &url, &params, &signature)
    });
    if !signed {
        let detail = "X-Twilio-Signature does not match the callback URL and parameters";
        return refuse(&app, StatusCode::FORBIDDEN, "bad_signature", detail.into());
    }
    let form: HashMap<String, String> = params.into_iter().collect();
    let status = form.get("MessageStatus").map(String::as_str).unwrap_or("");
    let kind = match status {
        "delivered" | "read" => "delivered",
        "undelivered" | "failed" => "failed",
        _ => return StatusCode::NO_CONTENT.into_response(),
    };
    let entry = match lookup(&app, n, id) {
        Ok(e) => e,
        Err(resp) => return *resp,
    };
    let extra = json!({
        "provider_id": form.get("MessageSid"),
        "provider_status": status,
        "reason": form.get("ErrorCode").map(|c| format!("provider error {c}")),
    });
    let mut ev = feedback_event(kind, &entry, extra, now_ms() as i64);
    // One delivery report per message and status: the provider's retries deduplicate.
    ev["messageId"] = Json::from(format!("herald-{kind}-{id}-{status}"));
    feed_or_503(&app, &ev).unwrap_or_else(|| StatusCode::NO_CONTENT.into_response())
}

/// The `messageId` of an open or click (`kind`) of message `id`, from `key` (the report's
/// own id, or the link's target): the same report twice is deduplicated.
fn engagement_id(kind: &str, id: &str, key: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    format!("herald-{kind}-{id}-{h:016x}")
}

/// Twilio's request signature: base64(HMAC-SHA1(auth token, URL + each POST parameter's
/// name and value, in name order)), compared in constant time.
fn twilio_signature_ok(token: &str, url: &str, params: &[(String, String)], given: &str) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(given.trim()) else {
        return false;
    };
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()) else {
        return false;
    };
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    mac.verify_slice(&given).is_ok()
}

/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// `GET /v1/t/{click,open}/{message_id}`: a signed tracking link followed.
pub(super) async fn tracked(
    State(app): State<App>,
    Path((kind, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(n) = app.live.notify.get() else {
        return no_notify(&app);
    };
    let Some(kind) = Kind::parse(&kind) else {
        return refuse(
            &app,
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no tracking link kind '{kind}' (click or open)"),
        );
    };
    let Some(tracking) = n.templates.tracking() else {
        return refuse(
            &app,
            StatusCode::NOT_FOUND,
            "tracking_off",
            "this Herald makes no tracking links (no [notify] tracking_url)".into(),
        );
    };
    let target = match kind {
        Kind::Click => q.get("to").map(String::as_str).unwrap_or(""),
        Kind::Open => "",
    };
    let sig = q.get("sig").map(String::as_str).unwrap_or("");
    if !tracking.verify(kind, &id, target, sig) || (kind == Kind::Click && target.is_empty()) {
        return refuse(
            &app,
            StatusCode::FORBIDDEN,
            "bad_signature",
            "this link was not made by this Herald (its signature does not match)".into(),
        );
    }
    let entry = match lookup(&app, n, &id) {
        Ok(e) => e,
        Err(resp) => return *resp,
    };
    let (name, extra) = match kind {
        Kind::Click => ("clicked", json!({"url": target})),
        Kind::Open => ("opened", json!({})),
    };
    let mut ev = feedback_event(name, &entry, extra, now_ms() as i64);
    ev["messageId"] = Json::from(engagement_id(name, &id, target));
    let fed = feed_or_503(&app, &ev);
    match kind {
        // The recipient goes on to the target even when the click cannot be recorded now
        // (counted as an error and logged): a broken link is worse than a lost click.
        Kind::Click => {
            if fed.is_some() {
                app.live.metrics.error("tracking");
                tracing::warn!("a click on message {id} could not be recorded (overloaded)");
            }
            (
                StatusCode::FOUND,
                [
                    (header::LOCATION, target.to_string()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                ],
            )
                .into_response()
        }
        Kind::Open => fed.unwrap_or_else(|| {
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "image/gif"),
                    (header::CACHE_CONTROL, "no-store, private"),
                ],
                PIXEL,
            )
                .into_response()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twilio's documented example (its "Validating requests" page): this URL, these
    /// parameters and the auth token `12345` sign to `0/KCTR6DLpKmkAf8muzZqo1nDgQ=`.
    #[test]
    fn twilio_signature_matches_twilios_example() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let good = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
        assert!(twilio_signature_ok("12345", url, &params, good));
        assert!(!twilio_signature_ok("12346", url, &params, good));
        assert!(!twilio_signature_ok(
            "12345",
            &format!("{url}&x=1"),
            &params,
            good
        ));
        assert!(!twilio_signature_ok("12345", url, &params[1..], good));
        assert!(!twilio_signature_ok("12345", url, &params, "not base64!"));
    }
}
