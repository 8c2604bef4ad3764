//! Journey files: YAML documents into checked [`JourneyDef`]s.
//!
//! Owns the file layer of `spec/journeys.md`: keys, their types, intervals, names, and the
//! conditions (parsed with the segment language, `when` at the user level, `where` with
//! the triggering event's fields in scope). Every error names the journey, the step path
//! (the YAML path, like `steps[1].branch[0].when`) and the problem; unknown keys are
//! refused, so a typo never silently drops a rule. Checks that need the segment set
//! (unknown segments) live in `compile`.

use std::collections::BTreeSet;

use yaml_rust2::{Yaml, YamlLoader};

use crate::ast::Expr;
use crate::lang::parse::{parse_condition, ConditionScope};
use crate::time::parse_interval_ms;
use crate::value::Value;

/// A rejected journey file: which journey, where in it, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("journey '{journey}': {path}: {message}")]
pub struct JourneyError {
    /// The journey's name (or `#N`, its position in the file, before the name is known).
    pub journey: String,
    /// The YAML path of the faulty key, like `steps[1].branch[0].when`.
    pub path: String,
    /// What is wrong, in plain words.
    pub message: String,
}

/// Channels and the trait that holds each one's address (`None`: addressed by user id).
pub const CHANNELS: &[(&str, Option<&str>)] = &[
    ("email", Some("email")),
    ("sms", Some("phone")),
    ("whatsapp", Some("phone")),
    ("push", Some("push_token")),
    ("webhook", None),
    ("kafka", None),
];

/// A condition: its text (for display) and the checked expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    /// As written.
    pub text: String,
    /// Checked expression.
    pub expr: Expr,
    /// Segments it names with `in_segment`.
    pub refs: Vec<String>,
}

/// What enters a user, or (for exits) what ends an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A track (or page/screen) event with this name.
    Event(String),
    /// The user entered the segment.
    SegmentEntered(String),
    /// The user left the segment.
    SegmentExited(String),
    /// `POST /v1/journeys/{name}/trigger`.
    Api,
}

impl Trigger {
    /// `event:Order Completed`, `segment_exited:shoppers`, `api`: the reason in journey events.
    pub fn label(&self) -> String {
        match self {
            Trigger::Event(e) => format!("event:{e}"),
            Trigger::SegmentEntered(s) => format!("segment_entered:{s}"),
            Trigger::SegmentExited(s) => format!("segment_exited:{s}"),
            Trigger::Api => "api".into(),
        }
    }
}

/// Whether a user who finished may enter again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reentry {
    /// Never (the default).
    Never,
    /// Always.
    Always,
    /// Once at least this many ms have passed since the last entry.
    After(i64),
}

/// An exit rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitDef {
    /// What fires it.
    pub trigger: Trigger,
    /// Optional condition on the event (event exits only) and the user.
    pub cond: Option<Cond>,
    /// A conversion for this journey.
    pub goal: bool,
}

/// One step.
#[derive(Clone, Debug, PartialEq)]
pub enum StepDef {
    /// `wait: 1 hour`.
    Wait(i64),
    /// `wait_until: { event, where, timeout, on_event, on_timeout }`.
    WaitUntil {
        /// The awaited event name.
        event: String,
        /// Optional condition on it.
        cond: Option<Cond>,
        /// Timeout in ms (none: wait until an exit).
        timeout: Option<i64>,
        /// Steps run when the event comes.
        on_event: Vec<StepDef>,
        /// Steps run at the timeout.
        on_timeout: Vec<StepDef>,
    },
    /// `branch: [ {when, steps}…, {else} ]`.
    Branch {
        /// Conditions and their steps, in order.
        arms: Vec<(Cond, Vec<StepDef>)>,
        /// Steps when no `when` is TRUE.
        otherwise: Vec<StepDef>,
    },
    /// `split: [ {variant, weight, steps}… ]`.
    Split(Vec<(String, u64, Vec<StepDef>)>),
    /// `send: { channel, template }`.
    Send {
        /// Channel name (one of [`CHANNELS`]).
        channel: String,
        /// Template name.
        template: String,
    },
    /// `update_trait: { name, value }`; the value is a literal or `now()`.
    UpdateTrait {
        /// Trait name.
        name: String,
        /// `None`: `now()`.
        value: Option<Value>,
    },
}

/// A checked journey.
#[derive(Clone, Debug, PartialEq)]
pub struct JourneyDef {
    /// `[a-z][a-z0-9_]*`, unique in the file.
    pub name: String,
    /// Entry trigger.
    pub entry: Trigger,
    /// Entry condition.
    pub entry_cond: Option<Cond>,
    /// Re-entry rule.
    pub reentry: Reentry,
    /// Exit rules, in order.
    pub exits: Vec<ExitDef>,
    /// `(max, per ms)`.
    pub frequency_cap: Option<(u32, i64)>,
    /// Quiet hours as minutes of the day, `(from, to)`.
    pub quiet_hours: Option<(u32, u32)>,
    /// Steps.
    pub steps: Vec<StepDef>,
}

/// Parses and checks a journey file (one or more YAML documents). Nothing of a bad file
/// is returned.
pub fn parse_journeys(src: &str) -> Result<Vec<JourneyDef>, JourneyError> {
    let docs = YamlLoader::load_from_str(src).map_err(|e| JourneyError {
        journey: "?".into(),
        path: format!(
            "line {}, column {}",
            e.marker().line(),
            e.marker().col() + 1
        ),
        message: format!("not valid YAML: {}", e.info()),
    })?;
    let mut out: Vec<JourneyDef> = Vec::new();
    let mut names = BTreeSet::new();
    for (i, doc) in docs.iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let mut cx = Cx {
            journey: format!("#{}", i + 1),
        };
        let j = cx.journey(doc)?;
        if !names.insert(j.name.clone()) {
            return Err(cx.err("journey", "is defined twice in the file"));
        }
        out.push(j);
    }
    if out.is_empty() {
        return Err(JourneyError {
            journey: "?".into(),
            path: "file".into(),
            message: "the file defines no journeys; start a document with `journey: name`".into(),
        });
    }
    Ok(out)
}

/// Is `s` a valid journey or segment name?
pub fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_lowercase())
        && c.all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == '_')
}

type Map = yaml_rust2::yaml::Hash;

struct Cx {
    journey: String,
}

impl Cx {
    fn err(&self, path: &str, message: impl Into<String>) -> JourneyError {
        JourneyError {
            journey: self.journey.clone(),
            path: path.into(),
            message: message.into(),
        }
    }

    fn map<'y>(&self, y: &'y Yaml, path: &str, keys: &[&str]) -> Result<&'y Map, JourneyError> {
        let Yaml::Hash(m) = y else {
            return Err(self.err(
                path,
                format!("must be a mapping with keys {}", keys.join(", ")),
            ));
        };
        for k in m.keys() {
            let name = k.as_str().unwrap_or("?");
            if !keys.contains(&name) {
                return Err(self.err(
                    path,
                    format!(
                        "unknown key '{name}' (expected one of: {})",
                        keys.join(", ")
                    ),
                ));
            }
        }
        Ok(m)
    }

    fn get<'y>(&self, m: &'y Map, key: &str) -> Option<&'y Yaml> {
        m.get(&Yaml::String(key.into()))
    }

    fn string(&self, y: &Yaml, path: &str) -> Result<String, JourneyError> {
        match y {
            Yaml::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            Yaml::Integer(i) => Ok(i.to_string()),
            Yaml::Real(r) => Ok(r.clone()),
            _ => Err(self.err(path, "must be a non-empty string")),
        }
    }

    fn interval(&self, y: &Yaml, path: &str) -> Result<i64, JourneyError> {
        let text = self.string(y, path)?;
        parse_interval_ms(&text).map_err(|m| self.err(path, m))
    }

    fn list<'y>(&self, y: &'y Yaml, path: &str) -> Result<&'y [Yaml], JourneyError> {
        match y {
            Yaml::Array(a) => Ok(a),
            Yaml::Null => Ok(&[]),
            _ => Err(self.err(path, "must be a list")),
        }
    }

    fn cond(&self, y: &Yaml, path: &str, scope: ConditionScope) -> Result<Cond, JourneyError> {
        let text = match y {
            Yaml::Boolean(b) => b.to_string(),
            _ => self.string(y, path)?,
        };
        let (expr, refs) = parse_condition(&text, scope).map_err(|e| {
            let at = if e.pos.line > 1 {
                format!("line {}, column {}", e.pos.line, e.pos.column)
            } else {
                format!("column {}", e.pos.column)
            };
            self.err(path, format!("{at} of \"{text}\": {}", e.message))
        })?;
        Ok(Cond { text, expr, refs })
    }

    fn journey(&mut self, y: &Yaml) -> Result<JourneyDef, JourneyError> {
        let keys = [
            "journey",
            "entry",
            "reentry",
            "exit",
            "frequency_cap",
            "quiet_hours",
            "steps",
        ];
        let m = self.map(y, "journey", &keys)?;
        let name = self.string(
            self.get(m, "journey")
                .ok_or_else(|| self.err("journey", "every journey needs `journey: name`"))?,
            "journey",
        )?;
        if !valid_name(&name) {
            return Err(self.err(
                "journey",
                format!("'{name}' is not a valid name: lowercase letters, digits and _, starting with a letter"),
            ));
        }
        self.journey = name.clone();
        let entry_y = self
            .get(m, "entry")
            .ok_or_else(|| self.err("entry", "every journey needs an entry trigger"))?;
        let em = self.map(
            entry_y,
            "entry",
            &["event", "segment_entered", "segment_exited", "api", "where"],
        )?;
        let entry = self.trigger(em, "entry", true)?;
        let entry_cond = match self.get(em, "where") {
            Some(w) => {
                let scope = match entry {
                    Trigger::Event(_) | Trigger::Api => ConditionScope::Where,
                    _ => ConditionScope::User,
                };
                Some(self.cond(w, "entry.where", scope)?)
            }
            None => None,
        };
        let reentry = match self.get(m, "reentry") {
            None => Reentry::Never,
            Some(Yaml::String(s)) if s == "never" => Reentry::Never,
            Some(Yaml::String(s)) if s == "always" => Reentry::Always,
            Some(y @ Yaml::Hash(_)) => {
                let rm = self.map(y, "reentry", &["after"])?;
                let after = self
                    .get(rm, "after")
                    .ok_or_else(|| self.err("reentry", "write { after: <interval> }"))?;
                Reentry::After(self.interval(after, "reentry.after")?)
            }
            Some(_) => {
                return Err(self.err("reentry", "must be never, always or { after: <interval> }"))
            }
        };
        let mut exits = Vec::new();
        if let Some(x) = self.get(m, "exit") {
            for (i, e) in self.list(x, "exit")?.iter().enumerate() {
                let path = format!("exit[{i}]");
                let xm = self.map(
                    e,
                    &path,
                    &[
                        "event",
                        "segment_entered",
                        "segment_exited",
                        "where",
                        "goal",
                    ],
                )?;
                let trigger = self.trigger(xm, &path, false)?;
                let cond = match self.get(xm, "where") {
                    Some(w) => {
                        let scope = match trigger {
                            Trigger::Event(_) => ConditionScope::Where,
                            _ => ConditionScope::User,
                        };
                        Some(self.cond(w, &format!("{path}.where"), scope)?)
                    }
                    None => None,
                };
                let goal = match self.get(xm, "goal") {
                    None => false,
                    Some(Yaml::Boolean(b)) => *b,
                    Some(_) => {
                        return Err(self.err(&format!("{path}.goal"), "must be true or false"))
                    }
                };
                exits.push(ExitDef {
                    trigger,
                    cond,
                    goal,
                });
            }
        }
        let frequency_cap = match self.get(m, "frequency_cap") {
            None => None,
            Some(y) => {
                let cm = self.map(y, "frequency_cap", &["max", "per"])?;
                let max = match self.get(cm, "max") {
                    Some(Yaml::Integer(n)) if *n > 0 && *n <= u32::MAX as i64 => *n as u32,
                    _ => {
                        return Err(self.err("frequency_cap.max", "must be a positive whole number"))
                    }
                };
                let per = self.get(cm, "per").ok_or_else(|| {
                    self.err("frequency_cap.per", "needs an interval, like 1 day")
                })?;
                let per = self.interval(per, "frequency_cap.per")?;
                if per == 0 {
                    return Err(self.err("frequency_cap.per", "must be longer than 0"));
                }
                Some((max, per))
            }
        };
        let quiet_hours = match self.get(m, "quiet_hours") {
            None => None,
            Some(y) => {
                let qm = self.map(y, "quiet_hours", &["from", "to"])?;
                let hm = |k: &str| -> Result<u32, JourneyError> {
                    let path = format!("quiet_hours.{k}");
                    let s = self.string(
                        self.get(qm, k).ok_or_else(|| {
                            self.err(&path, "needs a time of day, like \"22:00\"")
                        })?,
                        &path,
                    )?;
                    clock_minutes(&s).ok_or_else(|| {
                        self.err(
                            &path,
                            format!("'{s}' is not a time of day HH:MM (00:00 to 23:59)"),
                        )
                    })
                };
                let (from, to) = (hm("from")?, hm("to")?);
                if from == to {
                    return Err(self.err(
                        "quiet_hours",
                        "from and to are equal: the period would be empty",
                    ));
                }
                Some((from, to))
            }
        };
        let steps_y = self
            .get(m, "steps")
            .ok_or_else(|| self.err("steps", "every journey needs steps"))?;
        let steps = self.steps(steps_y, "steps")?;
        Ok(JourneyDef {
            name,
            entry,
            entry_cond,
            reentry,
            exits,
            frequency_cap,
            quiet_hours,
            steps,
        })
    }

    fn trigger(&self, m: &Map, path: &str, entry: bool) -> Result<Trigger, JourneyError> {
        let mut found = Vec::new();
        for (k, make) in [
            ("event", Trigger::Event as fn(String) -> Trigger),
            ("segment_entered", Trigger::SegmentEntered),
            ("segment_exited", Trigger::SegmentExited),
        ] {
            if let Some(v) = self.get(m, k) {
                let s = self.string(v, &format!("{path}.{k}"))?;
                if k != "event" && !valid_name(&s) {
                    return Err(self.err(
                        &format!("{path}.{k}"),
                        format!("'{s}' is not a segment name"),
                    ));
                }
                found.push(make(s));
            }
        }
        if let Some(v) = self.get(m, "api") {
            if !entry {
                return Err(self.err(
                    &format!("{path}.api"),
                    "an API call can only enter a journey",
                ));
            }
            if v != &Yaml::Boolean(true) {
                return Err(self.err(&format!("{path}.api"), "write `api: true`"));
            }
            found.push(Trigger::Api);
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(self.err(
                path,
                "needs exactly one trigger: event, segment_entered, segment_exited or api",
            )),
            _ => Err(self.err(path, "has more than one trigger; write exactly one")),
        }
    }

    fn steps(&self, y: &Yaml, path: &str) -> Result<Vec<StepDef>, JourneyError> {
        self.list(y, path)?
            .iter()
            .enumerate()
            .map(|(i, s)| self.step(s, &format!("{path}[{i}]")))
            .collect()
    }

    fn step(&self, y: &Yaml, path: &str) -> Result<StepDef, JourneyError> {
        const KINDS: [&str; 6] = [
            "wait",
            "wait_until",
            "branch",
            "split",
            "send",
            "update_trait",
        ];
        let m = self.map(y, path, &KINDS)?;
        if m.len() != 1 {
            return Err(self.err(
                path,
                format!("a step has exactly one of: {}", KINDS.join(", ")),
            ));
        }
        let (k, v) = m
            .iter()
            .next()
            .ok_or_else(|| self.err(path, "empty step"))?;
        let kind = k.as_str().unwrap_or("");
        let here = format!("{path}.{kind}");
        match kind {
            "wait" => Ok(StepDef::Wait(self.interval(v, &here)?)),
            "wait_until" => {
                let wm = self.map(
                    v,
                    &here,
                    &["event", "where", "timeout", "on_event", "on_timeout"],
                )?;
                let event = self.string(
                    self.get(wm, "event")
                        .ok_or_else(|| self.err(&here, "needs the awaited `event`"))?,
                    &format!("{here}.event"),
                )?;
                let cond = match self.get(wm, "where") {
                    Some(w) => {
                        Some(self.cond(w, &format!("{here}.where"), ConditionScope::Where)?)
                    }
                    None => None,
                };
                let timeout = match self.get(wm, "timeout") {
                    Some(t) => Some(self.interval(t, &format!("{here}.timeout"))?),
                    None => None,
                };
                let on_event = match self.get(wm, "on_event") {
                    Some(s) => self.steps(s, &format!("{here}.on_event"))?,
                    None => vec![],
                };
                let on_timeout = match self.get(wm, "on_timeout") {
                    Some(s) if timeout.is_none() => {
                        let _ = s;
                        return Err(self.err(&format!("{here}.on_timeout"), "needs a `timeout`"));
                    }
                    Some(s) => self.steps(s, &format!("{here}.on_timeout"))?,
                    None => vec![],
                };
                Ok(StepDef::WaitUntil {
                    event,
                    cond,
                    timeout,
                    on_event,
                    on_timeout,
                })
            }
            "branch" => {
                let arms_y = self.list(v, &here)?;
                if arms_y.is_empty() {
                    return Err(self.err(&here, "needs at least one `when`"));
                }
                let mut arms = Vec::new();
                let mut otherwise = None;
                for (i, a) in arms_y.iter().enumerate() {
                    let ap = format!("{here}[{i}]");
                    let am = self.map(a, &ap, &["when", "steps", "else"])?;
                    if let Some(e) = self.get(am, "else") {
                        if am.len() != 1 || i + 1 != arms_y.len() {
                            return Err(self.err(&ap, "`else` stands alone, as the last arm"));
                        }
                        otherwise = Some(self.steps(e, &format!("{ap}.else"))?);
                    } else {
                        let w = self.get(am, "when").ok_or_else(|| {
                            self.err(&ap, "an arm needs `when` (or is the `else`)")
                        })?;
                        let cond = self.cond(w, &format!("{ap}.when"), ConditionScope::User)?;
                        let steps = match self.get(am, "steps") {
                            Some(s) => self.steps(s, &format!("{ap}.steps"))?,
                            None => vec![],
                        };
                        arms.push((cond, steps));
                    }
                }
                if arms.is_empty() {
                    return Err(self.err(&here, "needs at least one `when` before `else`"));
                }
                Ok(StepDef::Branch {
                    arms,
                    otherwise: otherwise.unwrap_or_default(),
                })
            }
            "split" => {
                let vs = self.list(v, &here)?;
                if vs.is_empty() {
                    return Err(self.err(&here, "a split needs at least one variant"));
                }
                let mut out = Vec::new();
                let mut names = BTreeSet::new();
                for (i, x) in vs.iter().enumerate() {
                    let vp = format!("{here}[{i}]");
                    let vm = self.map(x, &vp, &["variant", "weight", "steps"])?;
                    let name = self.string(
                        self.get(vm, "variant")
                            .ok_or_else(|| self.err(&vp, "needs a `variant` name"))?,
                        &format!("{vp}.variant"),
                    )?;
                    if !names.insert(name.clone()) {
                        return Err(self.err(&vp, format!("variant '{name}' appears twice")));
                    }
                    let weight = match self.get(vm, "weight") {
                        Some(Yaml::Integer(w)) if *w > 0 => *w as u64,
                        Some(Yaml::Integer(_)) | Some(Yaml::Real(_)) => {
                            return Err(self.err(
                                &format!("{vp}.weight"),
                                "weights must be positive whole numbers",
                            ))
                        }
                        _ => {
                            return Err(self
                                .err(&format!("{vp}.weight"), "needs a positive whole `weight`"))
                        }
                    };
                    let steps = match self.get(vm, "steps") {
                        Some(s) => self.steps(s, &format!("{vp}.steps"))?,
                        None => vec![],
                    };
                    out.push((name, weight, steps));
                }
                Ok(StepDef::Split(out))
            }
            "send" => {
                let sm = self.map(v, &here, &["channel", "template"])?;
                let channel = self.string(
                    self.get(sm, "channel")
                        .ok_or_else(|| self.err(&here, "needs a `channel`"))?,
                    &format!("{here}.channel"),
                )?;
                if !CHANNELS.iter().any(|(c, _)| *c == channel) {
                    let known: Vec<&str> = CHANNELS.iter().map(|(c, _)| *c).collect();
                    return Err(self.err(
                        &format!("{here}.channel"),
                        format!("unknown channel '{channel}' (known: {})", known.join(", ")),
                    ));
                }
                let template = self.string(
                    self.get(sm, "template")
                        .ok_or_else(|| self.err(&here, "needs a `template`"))?,
                    &format!("{here}.template"),
                )?;
                Ok(StepDef::Send { channel, template })
            }
            "update_trait" => {
                let um = self.map(v, &here, &["name", "value"])?;
                let name = self.string(
                    self.get(um, "name")
                        .ok_or_else(|| self.err(&here, "needs the trait `name`"))?,
                    &format!("{here}.name"),
                )?;
                let value = match self.get(um, "value") {
                    Some(Yaml::String(s)) if s.trim() == "now()" => None,
                    Some(Yaml::String(s)) => Some(Value::Str(s.clone())),
                    Some(Yaml::Integer(i)) => Some(Value::num(*i as f64)),
                    Some(Yaml::Real(r)) => match r.parse::<f64>() {
                        Ok(f) if f.is_finite() => Some(Value::num(f)),
                        _ => {
                            return Err(self.err(&format!("{here}.value"), "is not a finite number"))
                        }
                    },
                    Some(Yaml::Boolean(b)) => Some(Value::Bool(*b)),
                    Some(Yaml::Null) => Some(Value::Null),
                    _ => {
                        return Err(self.err(
                            &format!("{here}.value"),
                            "must be a literal (string, number, boolean, null) or \"now()\"",
                        ))
                    }
                };
                Ok(StepDef::UpdateTrait { name, value })
            }
            other => Err(self.err(path, format!("unknown step '{other}'"))),
        }
    }
}

/// `"HH:MM"` as minutes of the day.
fn clock_minutes(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.trim().len() == 5).then_some(h * 60 + m)
}
