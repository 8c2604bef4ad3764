//! `herald template render NAME --user ID`: what a template renders to for one user,
//! before any journey sends it.
//!
//! Traits come from a running Herald (`--server`, its `/v1/users/{id}`), from
//! `--traits` (a JSON object, applied over the server's), or both; the triggering
//! event from `--event`. The journey fields are the preview's own (`journey.name` is
//! `--journey`, the step `preview`), and the message id is `preview`.

use std::path::Path;

use herald_connectors::notify::template::Templates;
use herald_operators::journey::file::CHANNELS;
use herald_operators::journey::MessageAction;
use serde_json::{Map, Value as Json};

use crate::EngineError;

/// What to render.
#[derive(Clone, Debug, Default)]
pub struct PreviewArgs {
    /// The templates directory.
    pub templates: String,
    /// Template name.
    pub name: String,
    /// User id.
    pub user: String,
    /// A running Herald's admin listener, to read the user's traits from.
    pub server: Option<String>,
    /// Its read (or admin) key; `HERALD_KEY` from the environment when not given.
    pub key: Option<String>,
    /// Traits as a JSON object (over the server's).
    pub traits: Option<String>,
    /// The triggering event as a JSON object.
    pub event: Option<String>,
    /// Journey name for `journey.name`.
    pub journey: Option<String>,
    /// Channel for `message.channel`.
    pub channel: Option<String>,
}

fn object(what: &str, text: &str) -> Result<Map<String, Json>, EngineError> {
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(_) => Err(EngineError::Usage(format!("{what}: must be a JSON object"))),
        Err(e) => Err(EngineError::Usage(format!("{what}: not JSON: {e}"))),
    }
}

/// Renders; returns the text to print (`Subject: …`, a blank line, the body).
pub fn render_preview(a: &PreviewArgs) -> Result<String, EngineError> {
    let templates =
        Templates::load(Path::new(&a.templates)).map_err(|e| EngineError::Usage(e.to_string()))?;
    if !templates.contains(&a.name) {
        return Err(EngineError::Usage(format!(
            "no template '{}' in {} (there are: {})",
            a.name,
            a.templates,
            templates.names().collect::<Vec<_>>().join(", ")
        )));
    }
    let mut traits = Map::new();
    if let Some(server) = &a.server {
        let mut url = url::Url::parse(server)
            .map_err(|e| EngineError::Usage(format!("--server: '{server}': {e}")))?;
        url.path_segments_mut()
            .map_err(|_| EngineError::Usage(format!("--server: '{server}' cannot be a base URL")))?
            .pop_if_empty()
            .extend(["v1", "users", a.user.as_str()]);
        let url = url.to_string();
        let key = a.key.clone().or_else(|| std::env::var("HERALD_KEY").ok());
        let mut req = reqwest::blocking::Client::new().get(&url);
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        let r = req
            .send()
            .map_err(|e| EngineError::Unavailable(format!("--server: cannot reach {url}: {e}")))?;
        match r.status().as_u16() {
            401 => {
                return Err(EngineError::Usage(format!(
                    "--server: {server} wants a read key: give --key KEY or set HERALD_KEY"
                )))
            }
            200 => {
                let j: Json = r
                    .json()
                    .map_err(|e| EngineError::Usage(format!("--server: {url}: {e}")))?;
                if let Some(t) = j["traits"].as_object() {
                    traits.extend(t.clone());
                }
            }
            404 => {
                return Err(EngineError::Usage(format!(
                    "--server: no user '{}' at {server}",
                    a.user
                )))
            }
            s => {
                return Err(EngineError::Usage(format!(
                    "--server: {url} answered HTTP {s}"
                )))
            }
        }
    }
    if let Some(t) = &a.traits {
        traits.extend(object("--traits", t)?);
    }
    let event = a
        .event
        .as_deref()
        .map(|e| object("--event", e).map(Json::Object))
        .transpose()?;
    let channel = a.channel.clone().unwrap_or_else(|| "email".into());
    // The channel's address trait, as journeys read it.
    let address = CHANNELS
        .iter()
        .find(|(c, _)| *c == channel)
        .and_then(|(_, a)| *a)
        .and_then(|a| traits.get(a))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let action = MessageAction {
        message_id: "preview".into(),
        journey: a.journey.clone().unwrap_or_else(|| "preview".into()),
        user_id: a.user.clone(),
        instance: 1,
        step_path: "preview".into(),
        variant: None,
        channel,
        template: a.name.clone(),
        address,
        traits,
        event,
        time: crate::live::now_ms() as i64,
    };
    let r = templates
        .render(&action)
        .map_err(|e| EngineError::Usage(e.to_string()))?;
    let mut out = String::new();
    if let Some(s) = &r.subject {
        out.push_str(&format!("Subject: {s}\n\n"));
    }
    out.push_str(&r.body);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}
