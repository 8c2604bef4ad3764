//! The definitions and explain API of the admin listener:
//!
//! - `GET /v1/segments/{name}` (read key): the definition in force, its version, where it
//!   comes from, its size and every version;
//! - `PUT /v1/segments/{name}` (admin key; body: one `CREATE SEGMENT` statement) creates
//!   or replaces it, `DELETE /v1/segments/{name}` (admin key) deletes it: each a new
//!   version that takes effect at one instant, its members entering and leaving there
//!   as ordinary changes (see [`super::definitions`] for the rules);
//! - `POST /v1/segments/preview` (read key; body: a statement): what the statement's
//!   membership would be now, against the version in force, applying nothing;
//! - `GET /v1/users/{id}/explain?segment=NAME[&at=RFC3339]` (read key): why the user is
//!   or is not a member ([`herald_operators::why`]).
//! - `GET /v1/journeys` (read key): every journey, paused or not;
//!   `POST /v1/journeys/{name}/pause` and `/resume` (admin key): from worker 0's current
//!   instant on, the journey admits no entries and its instances stay at their step
//!   (exit rules still apply); on resume, those whose timer fell due go on at once. Kept
//!   like a definitions change, so a pause outlives restarts.
//!
//! Statement errors are `herald check`'s: 400 with `line`, `column` and `message`.
//! Questions about the state are answered by the worker that holds it (a query channel
//! per worker, answered between two steps), so they never lock the dataflow.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json as AxumJson;
use herald_operators::dataflow::user_hash;
use herald_operators::lang::parse::{parse_statement_into, SegmentError};
use herald_operators::plan::SegmentKind;
use herald_operators::time::{format_rfc3339_ms, parse_rfc3339_ms, to_time, Time};
use herald_operators::why::Preview;
use serde::Deserialize;
use serde_json::{json, Value as Json};

use super::definitions::{Refusal, Request, Source};
use super::http::{read_body, App};
use super::worker::{DefineReq, Feed, Query as WorkerQuery, QueryError};

/// The largest statement accepted.
const STATEMENT_LIMIT: usize = 64 * 1024;

/// How long a request waits for a worker's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// How long a change waits for its changes to reach the query API.
const EFFECT_WAIT: Duration = Duration::from_secs(30);

/// Members sampled on each side of a preview.
const SAMPLES: usize = 10;

/// Previews running (at most one).
static PREVIEWS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

fn reply(status: StatusCode, body: Json) -> Response {
    (status, AxumJson(body)).into_response()
}

fn unavailable(what: String) -> Response {
    reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": what }))
}

fn statement_error(e: &SegmentError) -> Response {
    reply(
        StatusCode::BAD_REQUEST,
        json!({
            "error": e.to_string(),
            "line": e.pos.line,
            "column": e.pos.column,
            "message": e.message,
        }),
    )
}

fn refusal(r: Refusal) -> Response {
    match &r {
        Refusal::Statement(e) => statement_error(e),
        Refusal::NotFound(m) => reply(StatusCode::NOT_FOUND, json!({ "error": m })),
        Refusal::Conflict(m) => reply(StatusCode::CONFLICT, json!({ "error": m })),
        Refusal::NotMaintained(list) => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": r.to_string(), "not_maintained": list }),
        ),
        Refusal::Journey(e) => reply(
            StatusCode::BAD_REQUEST,
            json!({
                "error": e.to_string(),
                "journey": e.journey,
                "path": e.path,
                "message": e.message,
            }),
        ),
    }
}

/// In a cluster every process must run the same definitions: they change in the file.
fn single_process(app: &App) -> Option<Response> {
    (app.live.config.processes().1 > 1).then(|| {
        reply(
            StatusCode::CONFLICT,
            json!({"error": "in a cluster, segments change in the segment file (every process \
                   must run the same definitions) and the state is carried over at restart"}),
        )
    })
}

async fn statement(app: &App, body: Body) -> Result<String, Response> {
    let bytes = read_body(app, body, STATEMENT_LIMIT).await?;
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("the statement must be UTF-8 text: {e}") }),
        )
    })
}

/// `GET /v1/segments/{name}`.
pub(super) async fn get_segment(State(app): State<App>, Path(name): Path<String>) -> Response {
    let live = &app.live;
    let Ok(defs) = live.defs.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Some(i) = defs.index(&name) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no segment named '{name}'") }),
        );
    };
    let e = &defs.entries[i];
    let size = live.state.read().map_or(0, |s| s.size(i));
    let mut versions = vec![];
    if let Some(text) = defs.file_text(i) {
        versions.push(
            json!({"version": 1, "source": "file", "definition": text, "effective_at": null}),
        );
    }
    for c in defs
        .changes
        .iter()
        .filter(|c| c.kind.is_segment() && c.name == name)
    {
        versions.push(json!({
            "version": c.version,
            "source": "api",
            "definition": if c.deleted { Json::Null } else { Json::String(c.text.clone()) },
            "deleted": c.deleted,
            "effective_at": c.at.map(|t| format_rfc3339_ms(t as i64)),
        }));
    }
    reply(
        StatusCode::OK,
        json!({
            "name": e.name,
            "kind": kind(&defs, i),
            "version": e.version,
            "source": match e.source { Source::File => "file", Source::Api => "api" },
            "definition": e.text,
            "effective_at": e.at.map(|t| format_rfc3339_ms(t as i64)),
            "size": size,
            "versions": versions,
        }),
    )
}

/// What segment `i` is: `query`, `list` or `warehouse`.
pub(super) fn kind(defs: &super::definitions::Catalog, i: usize) -> &'static str {
    match defs.plan.segments.get(i).map(|s| &s.kind) {
        Some(SegmentKind::List { .. }) => "list",
        Some(SegmentKind::Warehouse { .. }) => "warehouse",
        _ => "query",
    }
}

/// `PUT /v1/segments/{name}`.
pub(super) async fn put_segment(
    State(app): State<App>,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    let text = match statement(&app, body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    apply(&app, &name, Request::Put(&text)).await
}

/// `DELETE /v1/segments/{name}`.
pub(super) async fn delete_segment(State(app): State<App>, Path(name): Path<String>) -> Response {
    apply(&app, &name, Request::Delete).await
}

/// Applies a change: checked and compiled, kept, fed to the dataflow at worker 0's
/// current instant; answers once the query API reflects it.
async fn apply(app: &App, name: &str, req: Request<'_>) -> Response {
    let _one = match begin(app).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let live = &app.live;
    let deleting = matches!(req, Request::Delete);
    let (planned, mut changes, created) = {
        let Ok(defs) = live.defs.read() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if let (Request::Put(text), Some(i)) = (&req, defs.index(name)) {
            if defs.entries[i].text.trim_end_matches(';').trim()
                == text.trim().trim_end_matches(';').trim()
            {
                let e = &defs.entries[i];
                return reply(
                    StatusCode::OK,
                    json!({
                        "segment": name,
                        "version": e.version,
                        "unchanged": true,
                        "effective_at": e.at.map(|t| format_rfc3339_ms(t as i64)),
                    }),
                );
            }
        }
        match defs.plan_change(name, req) {
            Ok(p) => {
                let created = defs.entries.get(p.index).is_none_or(|e| e.deleted);
                (p, defs.changes.clone(), created)
            }
            Err(r) => return refusal(r),
        }
    };
    let index = planned.index;
    let seg_version = planned.change.version;
    changes.push(planned.change.clone());
    // Kept before it takes effect: a restart applies it even if this one dies now.
    if let Err(e) = keep(app, changes).await {
        return unavailable(format!("cannot keep the definition: {e}"));
    }
    if let Ok(mut s) = live.state.write() {
        s.grow(planned.file.segments.len());
    }
    let (version, change) = match live.defs.write() {
        Ok(mut d) => (d.commit(planned), d.changes.len() - 1),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let what = format!("'{name}' version {seg_version}");
    let pending = json!({"segment": name, "version": seg_version});
    let at = match switch(app, Feed::Define(version), change, &what, pending).await {
        Ok(at) => at,
        Err(r) => return r,
    };
    let size = live.state.read().map_or(0, |s| s.size(index));
    tracing::info!(
        "segment '{name}' version {seg_version} {} through the API, in force from {}",
        if deleting {
            "deleted"
        } else if created {
            "created"
        } else {
            "replaced"
        },
        format_rfc3339_ms(at as i64)
    );
    reply(
        created_or_ok(created),
        json!({
            "segment": name,
            "version": seg_version,
            "effective_at": format_rfc3339_ms(at as i64),
            "deleted": deleting,
            "path": "live_state",
            "size": size,
        }),
    )
}

/// What a change kept but not answered for says.
const PENDING: &str = "kept, but worker 0 did not take it in time (is Herald stopping?): it \
    takes effect when it does, at the latest at the next start";

/// Why [`take_effect`] gave no instant.
enum Effect {
    /// Kept and in the catalog, but worker 0 did not take it in time: it takes effect when
    /// it does, at the latest at the next start.
    Pending,
    /// The reply to give.
    Failed(Response),
}

/// Feeds change `change` (kept, committed; its position in the catalog's changes) to
/// worker 0, which puts it in force at its current instant and records that instant on
/// it; writes the instant to disk; returns it once the query API holds every change at it.
async fn take_effect(app: &App, feed: Feed, change: usize, what: &str) -> Result<Time, Effect> {
    let live = &app.live;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = DefineReq {
        feed,
        change,
        reply: tx,
    };
    if live.defines.send(req).is_err() {
        return Err(Effect::Failed(unavailable(
            "the workers have stopped".into(),
        )));
    }
    let Ok(Ok(at)) = tokio::time::timeout(ANSWER_WAIT, rx).await else {
        return Err(Effect::Pending);
    };
    // Worker 0 recorded the instant in the catalog; now on disk too.
    let changes = match live.defs.read() {
        Ok(d) => d.changes.clone(),
        Err(_) => {
            return Err(Effect::Failed(
                StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            ))
        }
    };
    if let Err(e) = keep(app, changes).await {
        tracing::warn!("definitions: cannot record the instant of {what}: {e}");
    }
    let waited = Instant::now();
    while live.released.load(Ordering::Acquire) <= at {
        if waited.elapsed() > EFFECT_WAIT || live.stopping() {
            return Err(Effect::Failed(unavailable(format!(
                "the change took effect at {} and its changes have not reached the query API \
                 within {EFFECT_WAIT:?}",
                format_rfc3339_ms(at as i64)
            ))));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(at)
}

/// Puts change `change` (committed to the catalog and kept) in force through `feed`:
/// [`take_effect`], then, for a new definitions version, the catalog forgets the plans
/// before it. The error is the reply to give (`202` with `pending`'s fields when worker 0
/// did not take it in time).
async fn switch(
    app: &App,
    feed: Feed,
    change: usize,
    what: &str,
    mut pending: Json,
) -> Result<Time, Response> {
    let live = &app.live;
    let version = match feed {
        Feed::Define(v) => {
            live.defs_version.fetch_add(1, Ordering::AcqRel);
            Some(v)
        }
        Feed::Pause(..) => None,
    };
    let at = match take_effect(app, feed, change, what).await {
        Ok(at) => at,
        Err(Effect::Pending) => {
            pending["pending"] = Json::Bool(true);
            pending["error"] = Json::String(PENDING.into());
            return Err(reply(StatusCode::ACCEPTED, pending));
        }
        Err(Effect::Failed(r)) => return Err(r),
    };
    if let (Some(v), Ok(mut d)) = (version, live.defs.write()) {
        d.forget_before(v);
    }
    Ok(at)
}

/// The prologue of every change through the API: refused in a cluster or while stopping;
/// else the lock that takes changes one at a time.
async fn begin(app: &App) -> Result<tokio::sync::MutexGuard<'_, ()>, Response> {
    if let Some(r) = single_process(app) {
        return Err(r);
    }
    if app.live.stopping() {
        return Err(unavailable(
            "Herald is shutting down; retry against the next start".into(),
        ));
    }
    Ok(app.live.defs_change.lock().await)
}

/// `201` for what a change created, else `200`.
fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// `POST /v1/journeys/{name}/pause`.
pub(super) async fn pause_journey(State(app): State<App>, Path(name): Path<String>) -> Response {
    pause(&app, &name, true).await
}

/// `POST /v1/journeys/{name}/resume`.
pub(super) async fn resume_journey(State(app): State<App>, Path(name): Path<String>) -> Response {
    pause(&app, &name, false).await
}

/// Pauses or resumes a journey from worker 0's current instant on (see
/// [`herald_operators::journey::machine::Machine::set_paused`]); kept like a definitions
/// change.
async fn pause(app: &App, name: &str, paused: bool) -> Response {
    let _one = match begin(app).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let live = &app.live;
    let (j, change, mut changes) = {
        let Ok(defs) = live.defs.read() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        let (j, change) = match defs.plan_pause(name, paused) {
            Ok(x) => x,
            Err(r) => return refusal(r),
        };
        let now = defs.pause_of(j);
        if now.map_or(!paused, |(p, _)| p == paused) {
            return reply(
                StatusCode::OK,
                json!({
                    "journey": name,
                    "paused": paused,
                    "unchanged": true,
                    "effective_at": now.and_then(|(_, at)| at).map(|t| format_rfc3339_ms(t as i64)),
                }),
            );
        }
        (j, change, defs.changes.clone())
    };
    changes.push(change.clone());
    if let Err(e) = keep(app, changes).await {
        return unavailable(format!("cannot keep the change: {e}"));
    }
    let index = match live.defs.write() {
        Ok(mut d) => {
            d.commit_pause(change);
            d.changes.len() - 1
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let verb = if paused { "paused" } else { "resumed" };
    let what = format!("journey '{name}' {verb}");
    let pending = json!({"journey": name, "paused": paused});
    let at = match switch(app, Feed::Pause(j as u16, paused), index, &what, pending).await {
        Ok(at) => at,
        Err(r) => return r,
    };
    tracing::info!(
        "{what} through the API, from {}",
        format_rfc3339_ms(at as i64)
    );
    reply(
        StatusCode::OK,
        json!({"journey": name, "paused": paused, "effective_at": format_rfc3339_ms(at as i64)}),
    )
}

/// Journey `j` of the catalog as the API lists it.
fn journey_json(defs: &super::definitions::Catalog, j: usize, name: &str) -> Json {
    let p = defs.pause_of(j);
    let version = defs
        .journey_set()
        .and_then(|s| s.journeys.get(j))
        .map_or(1, |c| c.version);
    json!({
        "name": name,
        "version": version,
        "paused": p.is_some_and(|(p, _)| p),
        "changed_at": p.and_then(|(_, at)| at).map(|t| format_rfc3339_ms(t as i64)),
    })
}

/// `GET /v1/journeys`: every journey, its version, whether it is paused and since when.
pub(super) async fn journeys(State(app): State<App>) -> Response {
    let Ok(defs) = app.live.defs.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let list: Vec<Json> = defs
        .journey_names()
        .iter()
        .enumerate()
        .map(|(j, name)| journey_json(&defs, j, name))
        .collect();
    reply(StatusCode::OK, json!({ "journeys": list }))
}

/// `GET /v1/journeys/{name}`: as listed, with its definition and every version.
pub(super) async fn get_journey(State(app): State<App>, Path(name): Path<String>) -> Response {
    let Ok(defs) = app.live.defs.read() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Some(j) = defs.journey_index(&name) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no journey named '{name}'") }),
        );
    };
    let mut out = journey_json(&defs, j, &name);
    let versions: Vec<Json> = defs
        .journey_versions(&name)
        .into_iter()
        .map(|v| {
            json!({
                "version": v.version,
                "source": if v.from_file { "file" } else { "api" },
                "definition": v.text,
                "effective_at": v.at.map(|t| format_rfc3339_ms(t as i64)),
                "migrate": if v.restart { "restart" } else { "drain" },
            })
        })
        .collect();
    out["definition"] = versions
        .last()
        .map_or(Json::Null, |v| v["definition"].clone());
    out["versions"] = Json::Array(versions);
    reply(StatusCode::OK, out)
}

#[derive(Deserialize)]
pub(super) struct PutJourneyQuery {
    migrate: Option<String>,
}

/// `PUT /v1/journeys/{name}[?migrate=restart]`, body one journey's YAML: a new version
/// (or a new journey), in force from worker 0's current instant. Instances in progress
/// finish on the version they entered (drain), or with `?migrate=restart` exit and enter
/// the new version at that instant.
pub(super) async fn put_journey(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<PutJourneyQuery>,
    body: Body,
) -> Response {
    let restart = match q.migrate.as_deref() {
        None | Some("drain") => false,
        Some("restart") => true,
        Some(other) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("migrate={other}: expected drain or restart") }),
            )
        }
    };
    let text = match statement(&app, body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let _one = match begin(&app).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let live = &app.live;
    let (planned, mut changes) = {
        let Ok(defs) = live.defs.read() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if let Some(v) = defs.journey_versions(&name).pop() {
            if v.text.as_deref().map(str::trim) == Some(text.trim()) {
                return reply(
                    StatusCode::OK,
                    json!({"journey": name, "version": v.version, "unchanged": true}),
                );
            }
        }
        match defs.plan_journey(&name, &text, restart) {
            Ok(p) => (p, defs.changes.clone()),
            Err(r) => return refusal(r),
        }
    };
    // Its sends need the running notifier's templates and channels, as at a start.
    if let (Some(n), Some(notify)) = (&live.config.notify, live.notify.get()) {
        let checked = crate::check::check_sends(
            "the journey",
            &planned.set,
            &notify.templates,
            Some(&n.channels()),
        );
        if let Err(e) = checked {
            return reply(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() }));
        }
    }
    let (version, created) = (planned.change.version, planned.created);
    changes.push(planned.change.clone());
    if let Err(e) = keep(&app, changes).await {
        return unavailable(format!("cannot keep the definition: {e}"));
    }
    if let Ok(mut s) = live.state.write() {
        s.grow(planned.set.plan.segments.len());
    }
    let (defs_version, change) = match live.defs.write() {
        Ok(mut d) => (d.commit_journey(planned), d.changes.len() - 1),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let what = format!("journey '{name}' version {version}");
    let pending = json!({"journey": name, "version": version});
    let at = match switch(&app, Feed::Define(defs_version), change, &what, pending).await {
        Ok(at) => at,
        Err(r) => return r,
    };
    let migrate = if restart { "restart" } else { "drain" };
    tracing::info!(
        "{what} {} through the API, in force from {} (instances in progress: {migrate})",
        if created { "created" } else { "made" },
        format_rfc3339_ms(at as i64)
    );
    reply(
        created_or_ok(created),
        json!({
            "journey": name,
            "version": version,
            "effective_at": format_rfc3339_ms(at as i64),
            "migrate": migrate,
        }),
    )
}

/// Writes the definitions to `checkpoint.dir` (nothing without durable state).
async fn keep(app: &App, changes: Vec<super::durable::DefChange>) -> Result<(), String> {
    let Some(store) = app.live.defs_store.clone() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || store.write_definitions(&changes))
        .await
        .map_err(|e| e.to_string())?
}

/// `POST /v1/segments/preview`.
pub(super) async fn preview(State(app): State<App>, body: Body) -> Response {
    if let Some(r) = single_process(&app) {
        return r;
    }
    let text = match statement(&app, body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let live = &app.live;
    let (expr, current, name, shared, version) = {
        let Ok(defs) = live.defs.read() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        let name = match parse_statement_into(&text, &defs.file) {
            Ok((file, i)) => file.segments[i].name.clone(),
            Err(e) => return statement_error(&e),
        };
        let p = match defs.plan_change(&name, Request::Put(&text)) {
            Ok(p) => p,
            Err(r) => return refusal(r),
        };
        let SegmentKind::Expr(expr) = &p.plan.segments[p.index].kind else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        // The aggregates it reads, and whether another segment already reads each.
        let mut aggs = Vec::new();
        herald_operators::why::agg_reads(expr, &mut aggs);
        let shared: Vec<Json> = aggs
            .into_iter()
            .map(|k| {
                let a = &defs.plan.aggs[k];
                let others: Vec<&String> = a
                    .used_by
                    .iter()
                    .filter(|n| **n != name && defs.plan.visible_name(n))
                    .collect();
                json!({
                    "aggregate": herald_operators::ast::Expr::Agg(Box::new(a.agg.clone())).to_string(),
                    "shared_with": others,
                })
            })
            .collect();
        let current = defs.index(&name);
        (expr.clone(), current, name, shared, defs.version)
    };
    // One preview at a time: each is a pass over every user, between the workers'
    // steps.
    let Ok(_one) = PREVIEWS.try_acquire() else {
        return reply(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "a preview is running; retry when it is done"}),
        );
    };
    let mut total = Preview::default();
    let mut as_of = 0;
    let mut answers = Vec::with_capacity(live.queries.len());
    for q in &live.queries {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ask = WorkerQuery::Preview {
            expr: expr.clone(),
            current,
            samples: SAMPLES,
            reply: tx,
        };
        if q.send(ask).is_err() {
            return unavailable("the workers have stopped".into());
        }
        answers.push(rx);
    }
    let all = futures::future::join_all(answers);
    let Ok(answers) = tokio::time::timeout(ANSWER_WAIT, all).await else {
        return unavailable("a worker did not answer in time".into());
    };
    for a in answers {
        match a {
            Ok((p, at)) => {
                total.add(p, SAMPLES);
                as_of = as_of.max(at);
            }
            Err(_) => return unavailable("a worker stopped before it answered".into()),
        }
    }
    reply(
        StatusCode::OK,
        json!({
            "segment": name,
            "against_version": current.and_then(|i| live.defs.read().ok().map(|d| d.entries[i].version)),
            "definitions_version": version,
            "size": total.size,
            "entering": total.entering,
            "leaving": total.leaving,
            "sample_entering": total.sample_entering,
            "sample_leaving": total.sample_leaving,
            "as_of": format_rfc3339_ms(as_of as i64),
            "plan": { "aggregates": shared },
        }),
    )
}

/// The local worker that holds `user` (the dataflow exchanges by user hash over every
/// worker of the cluster), or the reply naming the process that does.
fn owner(app: &App, user: &str) -> Result<usize, Box<Response>> {
    let local = app.live.config.engine.workers;
    let (process, processes) = app.live.config.processes();
    let owner = (user_hash(user) % (local * processes) as u64) as usize;
    if owner / local != process {
        return Err(Box::new(reply(
            StatusCode::CONFLICT,
            json!({
                "error": format!("user '{user}' lives on process {} of the cluster: ask its admin listener", owner / local),
                "process": owner / local,
            }),
        )));
    }
    Ok(owner % local)
}

/// `GET /v1/users/{id}/journeys`: where the user stands in every journey (the instance
/// in progress: its step, what it waits for, its timer, its variant) and the latest
/// suppressed or deferred sends with their reasons.
pub(super) async fn user_journeys(State(app): State<App>, Path(id): Path<String>) -> Response {
    let live = &app.live;
    if live.journeys.is_none() {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "this Herald runs no journeys (engine.journeys)"}),
        );
    }
    let local = match owner(&app, &id) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ask = WorkerQuery::Journeys {
        user: id.clone(),
        reply: tx,
    };
    if live.queries[local].send(ask).is_err() {
        return unavailable("the workers have stopped".into());
    }
    let Ok(Ok(status)) = tokio::time::timeout(ANSWER_WAIT, rx).await else {
        return unavailable("the worker did not answer in time".into());
    };
    let at = |t: Option<Time>| t.map(|t| format_rfc3339_ms(t as i64));
    let journeys: Vec<Json> = status
        .iter()
        .map(|j| {
            json!({
                "journey": j.journey,
                "entries": j.entries,
                "last_entry": at(j.last_entry),
                "sends_in_frequency_cap": j.sends_in_cap,
                "paused": j.paused,
                "version": j.version,
                "active": j.active.as_ref().map(|a| json!({
                    "instance": a.instance,
                    "entered_at": at(Some(a.entered_at)),
                    "step": a.step,
                    "waiting_for": a.waiting,
                    "timer": at(a.wake),
                    "variant": a.variant,
                })),
            })
        })
        .collect();
    let held: Vec<Json> = live
        .state
        .read()
        .map(|s| s.held_sends(&id))
        .unwrap_or_default()
        .iter()
        .map(|r| {
            json!({
                "at": format_rfc3339_ms(r.time),
                "journey": r.journey,
                "instance": r.instance,
                "step": r.step_path,
                "kind": r.kind.as_str(),
                "reason": r.reason,
                "message_id": r.message_id,
            })
        })
        .collect();
    reply(
        StatusCode::OK,
        json!({"user_id": id, "journeys": journeys, "held_sends": held}),
    )
}

#[derive(Deserialize)]
pub(super) struct ExplainQuery {
    segment: Option<String>,
    at: Option<String>,
}

/// `GET /v1/users/{id}/explain?segment=NAME[&at=RFC3339]`.
pub(super) async fn explain(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let live = &app.live;
    let Some(segment) = q.segment else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "name the segment: ?segment=NAME"}),
        );
    };
    if live
        .defs
        .read()
        .ok()
        .and_then(|d| d.index(&segment))
        .is_none()
    {
        return reply(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no segment named '{segment}'") }),
        );
    }
    let at: Option<Time> = match q.at.as_deref().map(parse_rfc3339_ms) {
        None => None,
        Some(Ok(ms)) => Some(to_time(ms)),
        Some(Err(e)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("at: {e}") }),
            )
        }
    };
    let local = match owner(&app, &id) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ask = WorkerQuery::Explain {
        user: id,
        segment,
        at,
        reply: tx,
    };
    if live.queries[local].send(ask).is_err() {
        return unavailable("the workers have stopped".into());
    }
    match tokio::time::timeout(ANSWER_WAIT, rx).await {
        Ok(Ok(Ok(x))) => reply(StatusCode::OK, serde_json::to_value(x).unwrap_or_default()),
        Ok(Ok(Err(QueryError::NoSegment(s)))) => reply(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no segment named '{s}'") }),
        ),
        Ok(Ok(Err(QueryError::Past(m)))) => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": m, "cannot": "no retained history" }),
        ),
        _ => unavailable("the worker did not answer in time".into()),
    }
}
