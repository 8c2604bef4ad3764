//! Live segment definitions: creating, replacing and deleting segments on a running
//! Herald, each change a new version that takes effect at one instant.
//!
//! Owns [`Catalog`]: the segment file in force (the configured file with every change
//! through the API applied over it, in order), the plan compiled from it over the
//! running plan's slots ([`Plan::compile_over`], so the state and the events' projection
//! are read as they are), each segment's version, and the plan of every definitions
//! version the dataflow may still ask for ([`herald_operators::dataflow::Ctl::Define`]).
//!
//! Rules (documented in `docs/operations.md`):
//! - a segment keeps its index for the life of the state: a replacement is compiled in
//!   place, a deletion leaves a tombstone (`AS false`, hidden from the API) so that its
//!   members leave at the deletion's instant, and a new segment is appended (not while
//!   journeys have conditions of their own: those follow the declared segments);
//! - a change may read only what the state maintains: aggregates, traits and segments
//!   that some segment already reads. Anything else is refused with each missing part
//!   named (a new aggregate over history needs the segment file and a rebuilt state);
//! - lists and warehouse audiences change only in the segment file;
//! - a segment another segment or a journey reads cannot be deleted;
//! - the changes are kept (`DEFINITIONS.json` in `checkpoint.dir`) and applied over the
//!   segment file at every start: for a segment changed through the API the API's
//!   version wins; a change that no longer applies to an edited file is dropped with a
//!   warning;
//! - a journey paused through the API stays paused across restarts until it is resumed
//!   (a pause of a journey the journey file no longer has is dropped with a warning).

use std::collections::BTreeMap;
use std::sync::Arc;

use herald_operators::ast::{Expr, SegmentBody, SegmentFile};
use herald_operators::journey::compile::{compile_journey_versions, JourneyVersion, PENDING};
use herald_operators::journey::file::{JourneyDef, JourneyError};
use herald_operators::journey::JourneySet;
use herald_operators::lang::parse::{parse_statement_into, SegmentError};
use herald_operators::plan::Plan;
use herald_operators::time::Time;
use herald_operators::value::Value;

use super::durable::{ChangeKind, DefChange};

/// Where a segment's definition in force comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The segment file.
    File,
    /// A change through the API.
    Api,
}

/// One segment of the catalog (by index).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its version: 1 for the segment file's, then one more per change through the API.
    pub version: u32,
    /// Its definition, a `CREATE SEGMENT` statement.
    pub text: String,
    /// Where it comes from.
    pub source: Source,
    /// The instant its version took effect (None: the start of the state).
    pub at: Option<Time>,
    /// Deleted: a tombstone, kept for its index.
    pub deleted: bool,
    /// A list or warehouse audience (fed from outside; changed only in the file).
    pub external: bool,
}

/// What a request asks for.
pub enum Request<'a> {
    /// Create or replace with this statement.
    Put(&'a str),
    /// Delete.
    Delete,
}

/// Why a change is refused.
#[derive(Debug)]
pub enum Refusal {
    /// The statement is wrong, where `herald check` would say.
    Statement(SegmentError),
    /// No such segment.
    NotFound(String),
    /// The change contradicts the running set (dependents, journeys, lists).
    Conflict(String),
    /// The change reads what the state does not maintain (each part named).
    NotMaintained(Vec<String>),
    /// The journey does not parse or check, as `herald check` would say.
    Journey(JourneyError),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Statement(e) => write!(f, "{e}"),
            Refusal::NotFound(m) | Refusal::Conflict(m) => f.write_str(m),
            Refusal::NotMaintained(list) => write!(
                f,
                "it reads what the live state does not maintain: {}. The state holds no \
                 history for it: add the segment to the segment file and rebuild the state \
                 by replaying the events archive into an empty state directory",
                list.join("; ")
            ),
            Refusal::Journey(e) => write!(f, "{e}"),
        }
    }
}

/// A change checked and compiled, not yet in force.
#[derive(Debug)]
pub struct Planned {
    /// The segment file with the change.
    pub file: SegmentFile,
    /// Its plan, over the running plan's slots.
    pub plan: Plan,
    /// The segment's index.
    pub index: usize,
    /// The change, as recorded.
    pub change: DefChange,
}

/// One version of a journey, as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JourneyVersionInfo {
    /// Its number.
    pub version: u32,
    /// Its YAML (None: the journey file's, which could not be told apart).
    pub text: Option<String>,
    /// The instant it took effect (None: the start, or not yet).
    pub at: Option<Time>,
    /// Made with `?migrate=restart`.
    pub restart: bool,
    /// The journey file's.
    pub from_file: bool,
}

/// A journey version checked and compiled, not yet in force.
#[derive(Debug)]
pub struct PlannedJourney {
    /// The journey set with it, over the running plan's slots.
    pub set: JourneySet,
    /// Its definition.
    pub def: JourneyDef,
    /// Whether it creates the journey.
    pub created: bool,
    /// The change, as recorded.
    pub change: DefChange,
}

/// The journey file's documents, one per journey (empty texts when they cannot be told
/// apart).
fn journey_documents(text: &str, n: usize) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let d = docs.last_mut().expect("one at least");
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    let docs: Vec<String> = docs.into_iter().map(|d| d.trim().to_string()).collect();
    if docs.len() == n {
        docs
    } else {
        vec![String::new(); n]
    }
}

/// When a segment's versions took effect: `(instant, version)`, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versions(Vec<(Time, u32)>);

impl Versions {
    /// The version in force at `t`: the latest that took effect at or before it, else the
    /// first (1).
    pub fn at(&self, t: Time) -> u32 {
        self.0
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map_or(1, |(_, v)| *v)
    }
}

/// The segment set in force; see the module docs.
pub struct Catalog {
    /// The segment file in force (declared segments, tombstones included).
    pub file: SegmentFile,
    /// Its plan (journeys' conditions after the declared segments).
    pub plan: Arc<Plan>,
    /// Per declared segment (by index).
    pub entries: Vec<Entry>,
    /// Every change through the API, in order.
    pub changes: Vec<DefChange>,
    /// The definitions version in force (0: as started).
    pub version: u64,
    /// Plans by definitions version, for the dataflow.
    plans: BTreeMap<u64, Arc<Plan>>,
    /// Every version of every journey, in the order they were made (the journey file's,
    /// then each change through the API), to compile their conditions against a changed
    /// file and the hidden segments of each version after the earlier ones'.
    journeys: Option<Vec<JourneyVersion>>,
    /// The journey set in force (None: no journeys).
    set: Option<Arc<JourneySet>>,
    /// The journey sets of the definitions versions that changed the journeys.
    sets: BTreeMap<u64, Arc<JourneySet>>,
    /// Per journey the file declares (by index), its text there.
    journey_texts: Vec<String>,
    /// Per segment index, whether a journey reads it.
    read_by_journeys: Vec<bool>,
    /// Per segment the file declares, its definition there (version 1).
    file_texts: Vec<String>,
}

fn entry_of(def: &herald_operators::ast::SegmentDef) -> Entry {
    Entry {
        name: def.name.clone(),
        version: 1,
        text: def.to_string(),
        source: Source::File,
        at: None,
        deleted: false,
        external: !matches!(def.body, SegmentBody::Expr(_)),
    }
}

/// The segments `name` is read by through `in_segment`, among those not deleted.
fn readers(file: &SegmentFile, entries: &[Entry], name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (s, e) in file.segments.iter().zip(entries) {
        let SegmentBody::Expr(x) = &s.body else {
            continue;
        };
        let mut reads = false;
        x.walk(&mut |n| reads |= matches!(n, Expr::InSegment(t) if t == name));
        if reads && !e.deleted && s.name != name {
            out.push(s.name.clone());
        }
    }
    out
}

impl Catalog {
    /// The catalog of the segment file as loaded (`plan`: its plan, with the journeys'
    /// conditions when `journeys` are given).
    pub fn new(
        file: SegmentFile,
        plan: Plan,
        journeys: Option<(Vec<JourneyDef>, JourneySet, &str)>,
    ) -> Catalog {
        let entries: Vec<Entry> = file.segments.iter().map(entry_of).collect();
        let file_texts = entries.iter().map(|e| e.text.clone()).collect();
        let plan = Arc::new(plan);
        let (journeys, set, read_by_journeys, journey_texts) = match journeys {
            Some((d, set, text)) => {
                let texts = journey_documents(text, d.len());
                let read = set.segments_read();
                let v = d.into_iter().map(JourneyVersion::of_file).collect();
                (Some(v), Some(Arc::new(set)), read, texts)
            }
            None => (None, None, Vec::new(), Vec::new()),
        };
        Catalog {
            file,
            plans: BTreeMap::from([(0, plan.clone())]),
            plan,
            entries,
            changes: Vec::new(),
            version: 0,
            journeys,
            set,
            sets: BTreeMap::new(),
            journey_texts,
            read_by_journeys,
            file_texts,
        }
    }

    /// The journeys' names, by index (none without journeys).
    pub fn journey_names(&self) -> Vec<&str> {
        self.set
            .iter()
            .flat_map(|s| s.journeys.iter().map(|j| j.name.as_str()))
            .collect()
    }

    /// The index of journey `name`.
    pub fn journey_index(&self, name: &str) -> Option<usize> {
        self.journey_names().iter().position(|n| *n == name)
    }

    /// The journey set in force.
    pub fn journey_set(&self) -> Option<&Arc<JourneySet>> {
        self.set.as_ref()
    }

    /// The journey set of definitions version `v`, if that version changed the journeys.
    pub fn journeys_of(&self, v: u64) -> Option<Arc<JourneySet>> {
        self.sets.get(&v).cloned()
    }

    /// Journey `name`'s versions, oldest first.
    pub fn journey_versions(&self, name: &str) -> Vec<JourneyVersionInfo> {
        let mut out = Vec::new();
        if let Some(j) = self.journey_index(name) {
            if self.journey_texts.len() > j {
                let text = &self.journey_texts[j];
                out.push(JourneyVersionInfo {
                    version: 1,
                    text: (!text.is_empty()).then(|| text.clone()),
                    at: None,
                    restart: false,
                    from_file: true,
                });
            }
        }
        for c in self
            .changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Journey && c.name == name)
        {
            out.push(JourneyVersionInfo {
                version: c.version,
                text: Some(c.text.clone()),
                at: c.at,
                restart: c.restart,
                from_file: false,
            });
        }
        out
    }

    /// Checks and compiles a new version of journey `name` (a new journey if there is
    /// none by that name) from its YAML; changes nothing. See the module docs for what it
    /// may read.
    pub fn plan_journey(
        &self,
        name: &str,
        yaml: &str,
        restart: bool,
    ) -> Result<PlannedJourney, Refusal> {
        self.plan_journey_as(name, yaml, restart, None)
    }

    /// [`Catalog::plan_journey`] as version `recorded` (a replayed change keeps its
    /// number, and so the names of its hidden segments), else the next one.
    fn plan_journey_as(
        &self,
        name: &str,
        yaml: &str,
        restart: bool,
        recorded: Option<u32>,
    ) -> Result<PlannedJourney, Refusal> {
        let (Some(versions), Some(running)) = (&self.journeys, &self.set) else {
            return Err(Refusal::Conflict(
                "this Herald runs no journeys: journeys start in the journey file \
                 (engine.journeys), then change here"
                    .into(),
            ));
        };
        let mut defs = herald_operators::journey::parse_journeys(yaml).map_err(Refusal::Journey)?;
        if defs.len() != 1 || defs[0].name != name {
            return Err(Refusal::Journey(JourneyError {
                journey: defs
                    .first()
                    .map_or_else(|| name.to_string(), |d| d.name.clone()),
                path: "journey".into(),
                message: format!(
                    "the body must define exactly one journey, named '{name}' as the URL says"
                ),
            }));
        }
        let def = defs.remove(0);
        let index = running.journeys.iter().position(|j| j.name == name);
        if restart && index.is_some_and(|j| self.pause_of(j).is_some_and(|(p, _)| p)) {
            return Err(Refusal::Conflict(format!(
                "journey '{name}' is paused: resume it before a change that restarts its \
                 instances (or change it without ?migrate=restart)"
            )));
        }
        let version =
            recorded.unwrap_or_else(|| index.map_or(1, |j| running.journeys[j].version + 1));
        let mut all = versions.clone();
        all.push(JourneyVersion {
            def: def.clone(),
            version,
            from: PENDING,
            restart,
        });
        let set = compile_journey_versions(&self.file, &all, Some(&self.plan), &running.traits)
            .map_err(|e| match e.journey.is_empty() {
                // The running plan's slots lack what it reads.
                true => Refusal::NotMaintained(vec![e.message]),
                false => Refusal::Journey(e),
            })?;
        // Only what the running dataflow already feeds the journeys.
        let mut missing = Vec::new();
        for t in set.traits.iter().filter(|t| !running.traits.contains(t)) {
            missing.push(format!(
                "trait `{t}`, which no running journey reads (the journeys are told of the \
                 traits they read only)"
            ));
        }
        for e in set.events.difference(&running.events) {
            missing.push(format!(
                "events named '{e}', which no running journey listens to (only those are \
                 kept whole)"
            ));
        }
        if set.writes_traits() && !running.writes_traits() {
            missing.push("an update_trait step, and no running journey writes traits".into());
        }
        let before = running.segments_read();
        for (s, read) in set.segments_read().iter().enumerate() {
            if *read && s < self.plan.visible && before.get(s) != Some(&true) {
                missing.push(format!(
                    "segment '{}', which no running journey reads (the journeys hold the \
                     members of the segments they read only)",
                    self.plan.segments[s].name
                ));
            }
        }
        if !missing.is_empty() {
            return Err(Refusal::NotMaintained(missing));
        }
        Ok(PlannedJourney {
            set,
            def,
            created: index.is_none(),
            change: DefChange {
                kind: ChangeKind::Journey,
                name: name.to_string(),
                version,
                text: yaml.trim().to_string(),
                deleted: false,
                at: None,
                restart,
            },
        })
    }

    /// Puts a planned journey version in force as the next definitions version; returns
    /// it.
    pub fn commit_journey(&mut self, p: PlannedJourney) -> u64 {
        let PlannedJourney {
            set, change, def, ..
        } = p;
        if let Some(v) = &mut self.journeys {
            v.push(JourneyVersion {
                def,
                version: change.version,
                from: change.at.unwrap_or(PENDING),
                restart: change.restart,
            });
        }
        let set = Arc::new(set);
        self.read_by_journeys = set.segments_read();
        self.plan = Arc::new(set.plan.clone());
        self.set = Some(set.clone());
        self.changes.push(change);
        self.version += 1;
        self.plans.insert(self.version, self.plan.clone());
        self.sets.insert(self.version, set);
        self.version
    }

    /// Records that journey `name`'s version `version` admits entries from `at`.
    fn set_journey_from(&mut self, name: &str, version: u32, at: Time) {
        if let Some(v) = self
            .journeys
            .iter_mut()
            .flatten()
            .find(|v| v.def.name == name && v.version == version)
        {
            v.from = at;
        }
        if let Some(set) = &mut self.set {
            for j in Arc::make_mut(set).all_mut() {
                if j.name == name && j.version == version {
                    j.from = at;
                }
            }
        }
    }

    /// Journey `j`'s pause through the API: `(paused, since)` from its latest pause or
    /// resume (since: None until it takes effect; None: never changed).
    pub fn pause_of(&self, j: usize) -> Option<(bool, Option<Time>)> {
        let name = *self.journey_names().get(j)?;
        self.changes
            .iter()
            .rev()
            .find(|c| {
                matches!(c.kind, ChangeKind::PauseJourney | ChangeKind::ResumeJourney)
                    && c.name == name
            })
            .map(|c| (c.kind == ChangeKind::PauseJourney, c.at))
    }

    /// The journeys paused, by index.
    pub fn paused_journeys(&self) -> Vec<u16> {
        (0..self.journey_names().len())
            .filter(|&j| self.pause_of(j).is_some_and(|(p, _)| p))
            .map(|j| j as u16)
            .collect()
    }

    /// Checks a pause (or resume) of journey `name`: its index and the change; changes
    /// nothing.
    pub fn plan_pause(&self, name: &str, paused: bool) -> Result<(usize, DefChange), Refusal> {
        let Some(j) = self.journey_index(name) else {
            return Err(Refusal::NotFound(if self.journeys.is_none() {
                "this Herald runs no journeys (engine.journeys)".into()
            } else {
                format!("no journey named '{name}'")
            }));
        };
        Ok((j, DefChange::pause(name, paused)))
    }

    /// Puts a planned pause (or resume) in force.
    pub fn commit_pause(&mut self, change: DefChange) {
        self.changes.push(change);
    }

    /// Segment `i`'s definition in the segment file, if the file declares it.
    pub fn file_text(&self, i: usize) -> Option<&str> {
        self.file_texts.get(i).map(String::as_str)
    }

    /// The index of a segment that is not deleted.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.name == name && !e.deleted)
    }

    /// The plan of definitions version `v`.
    pub fn plan_of(&self, v: u64) -> Option<Arc<Plan>> {
        self.plans.get(&v).cloned()
    }

    /// Checks and compiles a change to segment `name`; changes nothing.
    pub fn plan_change(&self, name: &str, req: Request<'_>) -> Result<Planned, Refusal> {
        let (file, index, text, deleted) = match req {
            Request::Put(text) => {
                let (file, index) =
                    parse_statement_into(text, &self.file).map_err(Refusal::Statement)?;
                let def = &file.segments[index];
                if def.name != name {
                    return Err(Refusal::Statement(SegmentError {
                        pos: def.pos,
                        message: format!(
                            "the statement defines segment '{}' and the URL names '{name}'",
                            def.name
                        ),
                    }));
                }
                let SegmentBody::Expr(e) = &def.body else {
                    return Err(Refusal::Statement(SegmentError {
                        pos: def.pos,
                        message: "FROM CSV and FROM WAREHOUSE segments are defined in the \
                                  segment file, not through the API"
                            .into(),
                    }));
                };
                let mut gone = None;
                e.walk(&mut |x| {
                    if let Expr::InSegment(t) = x {
                        if self.entries.iter().any(|en| &en.name == t && en.deleted) {
                            gone.get_or_insert_with(|| t.clone());
                        }
                    }
                });
                if let Some(t) = gone {
                    return Err(Refusal::Statement(SegmentError {
                        pos: def.pos,
                        message: format!("in_segment('{t}') names a deleted segment"),
                    }));
                }
                match self.entries.get(index) {
                    Some(en) if en.external => {
                        return Err(Refusal::Conflict(format!(
                            "segment '{name}' is a list or warehouse audience: it changes only \
                             in the segment file"
                        )))
                    }
                    None if self.plan.visible < self.plan.segments.len() => {
                        return Err(Refusal::Conflict(format!(
                            "segment '{name}' is new, and this Herald runs journeys, whose \
                             conditions follow the declared segments: a new segment needs \
                             the segment file and a restart (replacing or deleting one works \
                             live)"
                        )))
                    }
                    _ => {}
                }
                // As sent: parsing it again closes a missing `;` on a line of its own,
                // after any trailing comment.
                (file, index, text.trim().to_string(), false)
            }
            Request::Delete => {
                let index = self
                    .index(name)
                    .ok_or_else(|| Refusal::NotFound(format!("no segment named '{name}'")))?;
                if self.entries[index].external {
                    return Err(Refusal::Conflict(format!(
                        "segment '{name}' is a list or warehouse audience: it changes only in \
                         the segment file"
                    )));
                }
                let by = readers(&self.file, &self.entries, name);
                if !by.is_empty() {
                    return Err(Refusal::Conflict(format!(
                        "segment '{name}' is read through in_segment by {}: change or delete \
                         those first",
                        by.join(", ")
                    )));
                }
                if self.read_by_journeys.get(index) == Some(&true) {
                    return Err(Refusal::Conflict(format!(
                        "segment '{name}' is read by a journey: change the journey file first"
                    )));
                }
                let mut file = self.file.clone();
                file.segments[index].body = SegmentBody::Expr(Expr::Lit(Value::Bool(false)));
                (file, index, String::new(), true)
            }
        };
        let plan = match (&self.journeys, &self.set) {
            (Some(versions), Some(set)) => {
                compile_journey_versions(&file, versions, Some(&self.plan), &set.traits)
                    .map(|set| set.plan)
                    .map_err(|e| Refusal::NotMaintained(vec![e.message]))?
            }
            _ => Plan::compile_over(&file, file.segments.len(), &[], &self.plan)
                .map(|(p, _)| p)
                .map_err(Refusal::NotMaintained)?,
        };
        let version = self.entries.get(index).map_or(1, |e| e.version + 1);
        Ok(Planned {
            file,
            plan,
            index,
            change: DefChange {
                kind: ChangeKind::Segment,
                name: name.to_string(),
                version,
                text,
                deleted,
                at: None,
                restart: false,
            },
        })
    }

    /// Puts a planned change in force as the next definitions version; returns it.
    pub fn commit(&mut self, p: Planned) -> u64 {
        let Planned {
            file,
            plan,
            index,
            change,
        } = p;
        let def = &file.segments[index];
        let entry = Entry {
            name: change.name.clone(),
            version: change.version,
            text: if change.deleted {
                String::new()
            } else {
                change.text.clone()
            },
            source: Source::Api,
            at: change.at,
            deleted: change.deleted,
            external: !matches!(def.body, SegmentBody::Expr(_)),
        };
        if index < self.entries.len() {
            self.entries[index] = entry;
        } else {
            self.entries.push(entry);
            self.read_by_journeys.push(false);
        }
        self.file = file;
        self.plan = Arc::new(plan);
        self.changes.push(change);
        self.version += 1;
        self.plans.insert(self.version, self.plan.clone());
        self.version
    }

    /// Records the instant the latest change took effect.
    pub fn set_effective(&mut self, at: Time) {
        if let Some(i) = self.changes.len().checked_sub(1) {
            self.set_effective_of(i, at);
        }
    }

    /// Records the instant change `i` (its position in [`Catalog::changes`]) took effect.
    pub fn set_effective_of(&mut self, i: usize, at: Time) {
        let Some(c) = self.changes.get_mut(i) else {
            return;
        };
        c.at = Some(at);
        let (name, kind, version) = (c.name.clone(), c.kind, c.version);
        if kind == ChangeKind::Journey {
            self.set_journey_from(&name, version, at);
        } else if kind.is_segment() {
            if let Some(e) = self.entries.iter_mut().rev().find(|e| e.name == name) {
                e.at = Some(at);
            }
        }
    }

    /// The version of segment `index` that produced a change at `t`, for a segment changed
    /// through the API (None: the segment file's, never changed): the latest change with
    /// an instant at or before `t` (a change whose instant is not known yet is not in
    /// force), else version 1.
    pub fn version_at(&self, index: usize, t: Time) -> Option<u32> {
        Some(self.versions(index)?.at(t))
    }

    /// The instants segment `index`'s versions took effect at (None: never changed
    /// through the API).
    pub fn versions(&self, index: usize) -> Option<Versions> {
        let name = &self.entries.get(index)?.name;
        let mut changed = false;
        let mut list = Vec::new();
        for c in self
            .changes
            .iter()
            .filter(|c| c.kind.is_segment() && &c.name == name)
        {
            changed = true;
            if let Some(at) = c.at {
                list.push((at, c.version));
            }
        }
        changed.then_some(Versions(list))
    }

    /// At a start from instant `at`: every change is in force from `at` at the latest.
    /// One kept after the restored checkpoint (a crash), or without its instant (a crash
    /// before it took effect), takes effect again at `at`, as the restart applies it.
    pub fn in_force_from(&mut self, at: Time) {
        let clamp = |x: &mut Option<Time>| *x = Some(x.map_or(at, |t| t.min(at)));
        self.changes.iter_mut().for_each(|c| clamp(&mut c.at));
        for e in self.entries.iter_mut().filter(|e| e.source == Source::Api) {
            clamp(&mut e.at);
        }
        let journeys: Vec<(String, u32, Option<Time>)> = self
            .changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Journey)
            .map(|c| (c.name.clone(), c.version, c.at))
            .collect();
        for (name, version, at) in journeys {
            self.set_journey_from(&name, version, at.unwrap_or(0));
        }
    }

    /// Forgets the plans of versions before `v` (the dataflow has switched past them).
    pub fn forget_before(&mut self, v: u64) {
        self.plans.retain(|k, _| *k >= v);
        self.sets.retain(|k, _| *k >= v);
    }

    /// Applies recorded changes (from `DEFINITIONS.json` or a checkpoint) in order, as at
    /// a start: each keeps its version and instant; `at_start` stands for an instant not
    /// recorded. Returns a warning per change that no longer applies (it is dropped).
    pub fn replay(&mut self, changes: &[DefChange], at_start: Option<Time>) -> Vec<String> {
        let mut warnings = Vec::new();
        for c in changes {
            if c.kind == ChangeKind::Journey {
                match self.plan_journey_as(&c.name, &c.text, c.restart, Some(c.version)) {
                    Ok(mut p) => {
                        p.change.at = c.at.or(at_start);
                        let at = p.change.at;
                        self.commit_journey(p);
                        if let Some(at) = at {
                            self.set_journey_from(&c.name, c.version, at);
                        }
                    }
                    Err(e) => warnings.push(format!(
                        "the change through the API to journey '{}' (version {}) no longer \
                         applies, and is dropped: {e}",
                        c.name, c.version
                    )),
                }
                continue;
            }
            if !c.kind.is_segment() {
                let paused = c.kind == ChangeKind::PauseJourney;
                match self.plan_pause(&c.name, paused) {
                    Ok((_, mut p)) => {
                        p.at = c.at.or(at_start);
                        self.commit_pause(p);
                    }
                    Err(e) => warnings.push(format!(
                        "the {} of journey '{}' through the API no longer applies to the \
                         journey file, and is dropped: {e}",
                        if paused { "pause" } else { "resume" },
                        c.name
                    )),
                }
                continue;
            }
            let req = if c.deleted {
                Request::Delete
            } else {
                Request::Put(&c.text)
            };
            match self.plan_change(&c.name, req) {
                Ok(mut p) => {
                    p.change.version = c.version;
                    p.change.at = c.at.or(at_start);
                    p.change.text = c.text.clone();
                    self.commit(p);
                }
                Err(e) => warnings.push(format!(
                    "the change through the API to segment '{}' (version {}) no longer applies \
                     to the segment file, and is dropped: {e}",
                    c.name, c.version
                )),
            }
        }
        // What the dataflow starts with is the result: no earlier version is asked for.
        let v = self.version;
        self.forget_before(v);
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(sql: &str) -> Catalog {
        let file = herald_operators::lang::parse::parse_segments(sql).unwrap();
        let plan = Plan::compile(&file);
        Catalog::new(file, plan, None)
    }

    const SQL: &str = "CREATE SEGMENT a AS count(*) >= 2;\n\
        CREATE SEGMENT b AS in_segment('a') AND plan = 'pro';\n\
        CREATE SEGMENT l FROM CSV 'list.csv';";

    #[test]
    fn a_replacement_keeps_the_slots_and_the_index() {
        let mut c = catalog(SQL);
        let p = c
            .plan_change("a", Request::Put("CREATE SEGMENT a AS count(*) >= 3"))
            .unwrap();
        assert_eq!((p.index, p.change.version), (0, 2));
        assert_eq!(p.plan.aggs, c.plan.aggs, "the state's slots");
        assert_eq!(p.plan.projection, c.plan.projection);
        assert_eq!(c.commit(p), 1);
        assert_eq!(c.entries[0].text, "CREATE SEGMENT a AS count(*) >= 3");
        assert_eq!(c.entries[0].source, Source::Api);
        // A new one that reads a maintained trait: appended.
        let p = c
            .plan_change("n", Request::Put("CREATE SEGMENT n AS plan = 'team';"))
            .unwrap();
        assert_eq!(p.index, 3);
        c.commit(p);
        assert_eq!(c.plan.segments.len(), 4);
        assert_eq!(c.plan.visible, 4);
    }

    #[test]
    fn what_the_state_does_not_hold_is_named() {
        let c = catalog(SQL);
        let e = c
            .plan_change(
                "x",
                Request::Put("CREATE SEGMENT x AS sum(properties.total) > 1 AND country = 'NL';"),
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sum(properties.total)"), "{text}");
        assert!(text.contains("trait `country`"), "{text}");
        let Refusal::Statement(e) = c
            .plan_change("x", Request::Put("CREATE SEGMENT x AS count(*) >>= 1;"))
            .unwrap_err()
        else {
            panic!("a statement error")
        };
        assert_eq!(e.pos.line, 1);
        let Refusal::Statement(e) = c
            .plan_change("y", Request::Put("CREATE SEGMENT x AS count(*) >= 1;"))
            .unwrap_err()
        else {
            panic!("a statement error")
        };
        assert!(e.message.contains("URL names 'y'"), "{}", e.message);
        assert!(matches!(
            c.plan_change("l", Request::Put("CREATE SEGMENT l AS count(*) >= 1;")),
            Err(Refusal::Conflict(_))
        ));
    }

    #[test]
    fn a_segment_others_read_is_not_deleted_and_a_deleted_one_is_a_tombstone() {
        let mut c = catalog(SQL);
        let Err(Refusal::Conflict(m)) = c.plan_change("a", Request::Delete) else {
            panic!("refused")
        };
        assert!(m.contains("by b"), "{m}");
        let p = c.plan_change("b", Request::Delete).unwrap();
        c.commit(p);
        assert_eq!(c.index("b"), None);
        assert_eq!(c.plan.segments.len(), 3, "the tombstone keeps the index");
        // Nothing reads a now: it may go; a statement naming b is refused.
        assert!(c.plan_change("a", Request::Delete).is_ok());
        assert!(matches!(
            c.plan_change("z", Request::Put("CREATE SEGMENT z AS in_segment('b');")),
            Err(Refusal::Statement(_))
        ));
        // Re-created: in place, the next version.
        let p = c
            .plan_change("b", Request::Put("CREATE SEGMENT b AS plan = 'x';"))
            .unwrap();
        assert_eq!((p.index, p.change.version), (1, 3));
    }

    #[test]
    fn recorded_changes_replay_to_the_same_plan() {
        let mut c = catalog(SQL);
        for (n, t) in [
            ("a", "CREATE SEGMENT a AS count(*) >= 5;"),
            ("n", "CREATE SEGMENT n AS in_segment('a');"),
            // No `;`, and a comment to the end of the line: replayed as it was taken.
            ("m", "CREATE SEGMENT m AS plan = 'x' -- no semicolon"),
        ] {
            let p = c.plan_change(n, Request::Put(t)).unwrap();
            c.commit(p);
            c.set_effective(7);
        }
        let mut again = catalog(SQL);
        assert!(again.replay(&c.changes, None).is_empty());
        assert_eq!(again.plan, c.plan);
        assert_eq!(again.entries, c.entries);
        // Over a file that dropped what a change reads: that change goes, with a warning.
        let mut edited = catalog("CREATE SEGMENT b AS plan = 'pro';");
        let w = edited.replay(&c.changes, None);
        assert_eq!(w.len(), 2, "{w:?}");
    }
}

#[cfg(test)]
mod pause_tests {
    use super::*;
    use crate::live::durable::definitions_hash_with;
    use herald_operators::journey::{compile_journeys, parse_journeys};

    fn catalog(journeys: &str) -> Catalog {
        let file = herald_operators::lang::parse::parse_segments(
            "CREATE SEGMENT a AS count(*) >= 2;\nCREATE SEGMENT k AS count(*) >= 1;",
        )
        .unwrap();
        let defs = parse_journeys(journeys).unwrap();
        let set = compile_journeys(&file, &defs).unwrap();
        Catalog::new(file, set.plan.clone(), Some((defs, set, journeys)))
    }

    const JOURNEYS: &str = "journey: j\nentry: { event: A }\nsteps: []\n---\n\
        journey: k\nentry: { event: B }\nsteps: []";

    #[test]
    fn pauses_are_kept_apart_from_segment_versions_and_replay() {
        let mut c = catalog(JOURNEYS);
        assert!(matches!(
            c.plan_pause("nope", true),
            Err(Refusal::NotFound(_))
        ));
        let (j, p) = c.plan_pause("k", true).unwrap();
        assert_eq!(j, 1);
        c.commit_pause(p);
        c.set_effective(9);
        assert_eq!(c.paused_journeys(), [1]);
        assert_eq!(c.pause_of(1), Some((true, Some(9))));
        assert_eq!(c.pause_of(0), None);
        // Segment `k` (named like the journey) has no version of the pause's.
        assert_eq!(c.versions(1), None);
        let p = c
            .plan_change("k", Request::Put("CREATE SEGMENT k AS count(*) >= 3;"))
            .unwrap();
        c.commit(p);
        c.set_effective(11);
        assert_eq!(c.versions(1).unwrap().at(12), 2);
        assert_eq!(
            c.pause_of(1),
            Some((true, Some(9))),
            "the segment's instant"
        );
        // The definitions hash is the segment changes' alone.
        let segments: Vec<DefChange> = c
            .changes
            .iter()
            .filter(|x| x.kind.is_segment())
            .cloned()
            .collect();
        assert_eq!(
            definitions_hash_with("s", "j", &c.changes),
            definitions_hash_with("s", "j", &segments)
        );
        // Recorded and replayed: paused again; resumed, it is not. Two changes taken
        // apart: each gets its own instant.
        let (_, p) = c.plan_pause("j", true).unwrap();
        c.commit_pause(p);
        let first = c.changes.len() - 1;
        let (_, p) = c.plan_pause("j", false).unwrap();
        c.commit_pause(p);
        c.set_effective_of(first, 13);
        assert_eq!(c.changes[first].at, Some(13));
        assert_eq!(c.changes.last().unwrap().at, None, "not taken yet");
        let json = serde_json::to_string(&c.changes).unwrap();
        let kept: Vec<DefChange> = serde_json::from_str(&json).unwrap();
        let mut again = catalog(JOURNEYS);
        assert!(again.replay(&kept, Some(20)).is_empty());
        assert_eq!(again.paused_journeys(), [1]);
        assert_eq!(again.pause_of(0), Some((false, Some(20))));
        assert_eq!(again.versions(1).unwrap().at(12), 2);
        // A journey file without `k`: its pause goes, with a warning.
        let mut edited = catalog("journey: j\nentry: { event: A }\nsteps: []");
        let w = edited.replay(&kept, None);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("journey 'k'"), "{w:?}");
        assert!(edited.paused_journeys().is_empty());
    }
}

#[cfg(test)]
mod journey_version_tests {
    use super::*;
    use herald_operators::journey::{compile_journeys, parse_journeys};

    const SQL: &str = "CREATE SEGMENT a AS count(*) >= 2;\nCREATE SEGMENT b AS count(*) >= 3;";
    const J: &str = "journey: j\nentry: { segment_entered: a }\nsteps:\n  - branch:\n      - when: \"count(*) >= 4\"\n        steps: []";

    fn catalog() -> Catalog {
        let file = herald_operators::lang::parse::parse_segments(SQL).unwrap();
        let defs = parse_journeys(J).unwrap();
        let set = compile_journeys(&file, &defs).unwrap();
        Catalog::new(file, set.plan.clone(), Some((defs, set, J)))
    }

    #[test]
    fn a_journey_version_reads_only_what_the_running_journeys_are_fed_and_replays() {
        let mut c = catalog();
        let v2 = J.replace(">= 4", ">= 5");
        let p = c.plan_journey("j", &v2, false).unwrap();
        assert_eq!((p.change.version, p.created), (2, false));
        let hidden = p.set.plan.segments.len();
        assert_eq!(c.commit_journey(p), 1);
        c.set_effective(50);
        assert_eq!(c.plan.segments.len(), hidden);
        assert_eq!(c.journey_set().unwrap().journeys[0].from, 50);
        // Refused: a segment no running journey reads, an unknown one, another name.
        let Err(Refusal::NotMaintained(m)) = c.plan_journey(
            "j",
            &v2.replace("segment_entered: a", "segment_entered: b"),
            false,
        ) else {
            panic!("refused")
        };
        assert!(m[0].contains("segment 'b'"), "{m:?}");
        assert!(matches!(
            c.plan_journey(
                "j",
                &v2.replace("segment_entered: a", "segment_entered: zz"),
                false
            ),
            Err(Refusal::Journey(_))
        ));
        assert!(matches!(
            c.plan_journey("k", &v2, false),
            Err(Refusal::Journey(_))
        ));
        // Recorded and replayed over the same files: the same plan and versions.
        let mut again = catalog();
        assert!(again.replay(&c.changes, None).is_empty());
        assert_eq!(again.plan, c.plan);
        assert_eq!(again.journey_versions("j"), c.journey_versions("j"));
        assert_eq!(again.journey_set().unwrap().journeys[0].from, 50);
        assert_eq!(again.journey_versions("j")[0].text.as_deref(), Some(J));
    }
}
