//! What providers and tracking report back about a message, as events.
//!
//! - `POST /v1/engagement`: `{"message_id": …, "type": "open"|"click", "url"?: …,
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
//! Both take the write key as the HTTP Basic user name (Twilio sends the credentials of
//! its callback URL: `https://KEY:@herald.example/v1/providers/twilio/status`).
//! Unknown message ids are 404; without `[notify]` both are 404 too.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json as AxumJson;
use herald_connectors::notify::delivery::feedback_event;
use herald_connectors::notify::outbox::Entry;
use serde_json::{json, Value as Json};

use super::http::{admit, refuse, App};
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
pub(super) async fn engagement(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = admit(&app, &headers) {
        return refused;
    }
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
        ev["messageId"] = Json::from(format!(
            "herald-{kind}-{id}-{:016x}",
            xxhash_rust::xxh3::xxh3_64(key.as_bytes())
        ));
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
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = admit(&app, &headers) {
        return refused;
    }
    let Some(n) = app.live.notify.get() else {
        return no_notify(&app);
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let Some(id) = q.get("message_id").filter(|s| !s.is_empty()) else {
        return refuse(
            &app,
            StatusCode::BAD_REQUEST,
            "bad_status",
            "the callback URL must carry ?message_id= (Herald sets it when sending)".into(),
        );
    };
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
