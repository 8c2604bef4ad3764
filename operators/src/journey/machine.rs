//! The per-user journey machine: what happens to one user's journeys at one instant.
//!
//! Owns [`Machine`]: per-user state (the exposed traits and segment memberships as of
//! the last processed instant, and per journey the active instance, entry history and
//! recent sends) and the timer queue. [`Machine::step`] takes everything that happened to
//! one user at instant `t` (events, membership changes, trait changes) and runs each
//! journey, in file order:
//!
//! 1. an active instance that entered before `t` checks its exit rules, in order, against
//!    `t`'s events and membership changes; the first that fires ends it;
//! 2. a still-active instance resumes: on the first matching event of a `wait_until`
//!    (events in (timestamp, messageId) order), or on its timer if it is due at `t`;
//! 3. a user with no active instance enters on a trigger at `t`, subject to `reentry`
//!    and the entry `where`; the steps then run at once up to the next wait.
//!
//! The timely operator calls `step` only once `t` is complete (the frontier passed it), so
//! the state it sees is exactly the state at `t`, including the triggering event's own
//! effect, for any worker count. Nothing here reads a clock.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};

use crate::ast::EventField;
use crate::eval::{eval_ref, CExpr, Context};
use crate::event::{Event, EventType};
use crate::journey::compile::{
    CJourney, CTrigger, JourneySet, Op, API_TRIGGER_EVENT, API_TRIGGER_KEY,
};
use crate::journey::file::Reentry;
use crate::journey::quiet::{quiet_until, zone};
use crate::time::{format_rfc3339_ms, Time};
use crate::value::Value;

/// What the journey operator takes in, per user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JIn {
    /// An accepted event the journeys listen to.
    Event(Event),
    /// A change of membership of a segment (plan index, hidden ones included).
    Member(u16),
    /// A change of an exposed trait's value (exposed position).
    Trait(u16, Value),
}

/// Kinds of journey events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// The user entered.
    Entered,
    /// The instance reached a step.
    Step,
    /// A message action was emitted.
    Sent,
    /// A send was suppressed (reason: opt_out, no_address, frequency_cap).
    Suppressed,
    /// A send was deferred to the end of quiet hours.
    Deferred,
    /// A goal exit fired.
    Converted,
    /// An exit rule ended the instance.
    Exited,
    /// The instance reached the end of its steps.
    Completed,
}

impl Kind {
    /// The name in output rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Entered => "entered",
            Kind::Step => "step",
            Kind::Sent => "sent",
            Kind::Suppressed => "suppressed",
            Kind::Deferred => "deferred",
            Kind::Converted => "converted",
            Kind::Exited => "exited",
            Kind::Completed => "completed",
        }
    }
}

/// One journey event row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JourneyRow {
    /// Instant (ms).
    pub time: i64,
    /// Journey name.
    pub journey: String,
    /// User key.
    pub user_id: String,
    /// Instance number of this user in this journey (1, 2, …).
    pub instance: u32,
    /// Order of the row among the user's rows at this instant.
    pub seq: u32,
    /// What happened.
    pub kind: Kind,
    /// Step path (empty for entered/converted/exited/completed).
    pub step_path: String,
    /// Split variant, once chosen.
    pub variant: Option<String>,
    /// Message id (sent, suppressed, deferred).
    pub message_id: Option<String>,
    /// Why (suppressed, deferred, exited, converted, entered).
    pub reason: Option<String>,
}

/// A message action: what the notification layer delivers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageAction {
    /// Same on every replay: a hash of journey, user, instance entry instant, step path.
    pub message_id: String,
    /// Journey name.
    pub journey: String,
    /// User key.
    pub user_id: String,
    /// Instance number.
    pub instance: u32,
    /// Step path of the send.
    pub step_path: String,
    /// Split variant, if any.
    pub variant: Option<String>,
    /// Channel.
    pub channel: String,
    /// Template.
    pub template: String,
    /// The address trait's value (none for channels addressed by user id).
    pub address: Option<String>,
    /// The user's exposed traits at the instant (NULL ones left out).
    pub traits: Map<String, Json>,
    /// The event that entered the instance (none for segment triggers).
    pub event: Option<Json>,
    /// Instant (ms).
    pub time: i64,
}

/// What the journey operator emits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JOut {
    /// A journey event.
    Row(JourneyRow),
    /// A message action.
    Message(MessageAction),
    /// An `update_trait` write, as an identify event to feed back at the given time.
    Write(Event, Time),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Waiting {
    Timer,
    Event,
    Quiet,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Instance {
    number: u32,
    /// Entry instant (the trigger's timestamp): part of every message id.
    entry: i64,
    /// Processing instant of the entry.
    entered_at: Time,
    pc: usize,
    variant: Option<u16>,
    waiting: Waiting,
    wake: Option<Time>,
    /// The triggering event as JSON text (compact: held for the instance's lifetime).
    trigger: Option<Box<str>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct JState {
    entries: u32,
    last_entry: Option<Time>,
    sends: VecDeque<Time>,
    active: Option<Instance>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct UserState {
    traits: Vec<((u16, Value), isize)>,
    members: Vec<(u16, isize)>,
    journeys: Vec<JState>,
}

impl UserState {
    fn trait_value(&self, pos: u16) -> Option<&Value> {
        self.traits
            .iter()
            .find(|((p, _), r)| *p == pos && *r > 0)
            .map(|((_, v), _)| v)
    }
    fn is_member(&self, seg: u16) -> bool {
        self.members.iter().any(|(s, r)| *s == seg && *r > 0)
    }
    /// Nothing to remember: the user can be forgotten.
    fn is_empty(&self) -> bool {
        self.traits.is_empty()
            && self.members.is_empty()
            && self
                .journeys
                .iter()
                .all(|j| j.entries == 0 && j.sends.is_empty())
    }
}

fn add<K: PartialEq>(v: &mut Vec<(K, isize)>, k: K, r: isize) {
    match v.iter().position(|(x, _)| *x == k) {
        Some(i) => {
            v[i].1 += r;
            if v[i].1 == 0 {
                v.swap_remove(i);
            }
        }
        None => v.push((k, r)),
    }
}

/// Evaluation context of a journey condition: the event (if any) and the user's state.
struct JCtx<'a> {
    user: &'a str,
    ev: Option<&'a Event>,
    state: &'a UserState,
    set: &'a JourneySet,
}

impl Context for JCtx<'_> {
    fn field(&self, field: &EventField) -> Cow<'_, Value> {
        Cow::Owned(self.ev.map(|e| e.field(field)).unwrap_or(Value::Null))
    }
    fn user_id(&self) -> Cow<'_, Value> {
        Cow::Owned(Value::Str(self.user.to_string()))
    }
    fn trait_value(&self, slot: usize) -> Cow<'_, Value> {
        self.set
            .trait_pos
            .get(slot)
            .copied()
            .flatten()
            .and_then(|p| self.state.trait_value(p))
            .map(Cow::Borrowed)
            .unwrap_or(Cow::Owned(Value::Null))
    }
    fn in_segment(&self, segment: usize) -> bool {
        self.state.is_member(segment as u16)
    }
}

/// Per-user journey state of one worker, and its timers.
pub struct Machine {
    set: Rc<JourneySet>,
    users: HashMap<String, UserState>,
    timers: BTreeSet<(Time, String, u16)>,
    /// Users stepped since the last checkpoint part (only when parts are taken).
    changed: Option<BTreeSet<String>>,
}

/// The journey state of one worker, or what changed in it since the previous part, as a
/// checkpoint holds it ([`Machine::part`]). Timers are rebuilt from the instances.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct MachinePart {
    /// Whether this part holds every user (else only those stepped since the last part).
    pub full: bool,
    /// Per user, its state (None: it has none any more).
    users: Vec<(String, Option<UserState>)>,
}

impl MachinePart {
    /// Carries the part over to a changed segment file (the journey file unchanged):
    /// each user's memberships and exposed traits move to their new segment indices and
    /// positions; those the new plan lacks are dropped.
    pub fn remap(&mut self, r: &crate::plan::Remap) {
        for (_, state) in &mut self.users {
            let Some(st) = state else { continue };
            st.members.retain_mut(|(seg, _)| {
                match r.segments.get(*seg as usize).copied().flatten() {
                    Some(to) => {
                        *seg = to as u16;
                        true
                    }
                    None => false,
                }
            });
            st.members.sort_by_key(|(seg, _)| *seg);
            st.traits.retain_mut(|((pos, _), _)| {
                match r.exposed.get(*pos as usize).copied().flatten() {
                    Some(to) => {
                        *pos = to;
                        true
                    }
                    None => false,
                }
            });
        }
    }
}

/// Everything that happens to one user at one instant, and what it emits.
struct At<'a> {
    set: &'a JourneySet,
    user: &'a str,
    t: Time,
    events: &'a [Event],
    changes: &'a [(u16, isize)],
    timers: &'a mut BTreeSet<(Time, String, u16)>,
    out: &'a mut Vec<JOut>,
    seq: u32,
}

impl Machine {
    /// A machine for the compiled journeys.
    pub fn new(set: Rc<JourneySet>) -> Machine {
        Machine {
            set,
            users: HashMap::new(),
            timers: BTreeSet::new(),
            changed: None,
        }
    }

    /// From now on, remembers which users are stepped, for [`Machine::part`].
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(Default::default);
    }

    /// The state as a checkpoint part: every user (`full`) or those stepped since the
    /// last part. Resets the change set.
    pub fn part(&mut self, full: bool) -> MachinePart {
        let changed = self.changed.replace(Default::default()).unwrap_or_default();
        let users = if full {
            let mut v: Vec<_> = self
                .users
                .iter()
                .map(|(k, u)| (k.clone(), Some(u.clone())))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        } else {
            changed
                .into_iter()
                .map(|k| {
                    let u = self.users.get(&k).cloned();
                    (k, u)
                })
                .collect()
        };
        MachinePart { full, users }
    }

    /// Restores the state from a chain of parts (a full one, then the deltas after it).
    pub fn restore(&mut self, parts: impl IntoIterator<Item = MachinePart>) -> Result<(), String> {
        let mut first = true;
        for p in parts {
            if first && !p.full {
                return Err("the chain of journey parts does not start with a full one".into());
            }
            first = false;
            if p.full {
                self.users.clear();
            }
            for (k, u) in p.users {
                match u {
                    Some(u) => self.users.insert(k, u),
                    None => self.users.remove(&k),
                };
            }
        }
        self.timers.clear();
        for (k, u) in &self.users {
            for (ji, j) in u.journeys.iter().enumerate() {
                if let Some(w) = j.active.as_ref().and_then(|i| i.wake) {
                    self.timers.insert((w, k.clone(), ji as u16));
                }
            }
        }
        Ok(())
    }

    /// The earliest pending timer.
    pub fn next_timer(&self) -> Option<Time> {
        self.timers.first().map(|(t, _, _)| *t)
    }

    /// The first `limit` users (in user order) with a timer due at `t`, each once. Timers
    /// before `t` have all fired by the time `t` is processed.
    pub fn due(&self, t: Time, limit: usize) -> Vec<String> {
        let mut users: Vec<String> = Vec::new();
        for (_, u, _) in self
            .timers
            .range((t, String::new(), 0)..)
            .take_while(|(w, _, _)| *w == t)
        {
            if users.last() != Some(u) {
                if users.len() == limit {
                    break;
                }
                users.push(u.clone());
            }
        }
        users
    }

    /// Users held in memory (with state or history).
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Active instances.
    pub fn active(&self) -> usize {
        self.users
            .values()
            .flat_map(|u| u.journeys.iter())
            .filter(|j| j.active.is_some())
            .count()
    }

    /// Pending timers.
    pub fn timers(&self) -> usize {
        self.timers.len()
    }

    /// Processes everything that happened to `user` at `t` (inputs with their diffs);
    /// appends what it emits to `out`.
    pub fn step(&mut self, user: &str, t: Time, inputs: Vec<(JIn, isize)>, out: &mut Vec<JOut>) {
        let set = Rc::clone(&self.set);
        if let Some(c) = &mut self.changed {
            if !c.contains(user) {
                c.insert(user.to_string());
            }
        }
        let state = self.users.entry(user.to_string()).or_default();
        let mut events = Vec::new();
        let mut changes: Vec<(u16, isize)> = Vec::new();
        for (x, r) in inputs {
            match x {
                JIn::Event(e) if r > 0 => events.push(e),
                JIn::Event(_) => {}
                JIn::Member(s) => {
                    add(&mut state.members, s, r);
                    add(&mut changes, s, r);
                }
                JIn::Trait(p, v) => add(&mut state.traits, (p, v), r),
            }
        }
        events.sort_by(|a, b| (a.timestamp, &a.message_id).cmp(&(b.timestamp, &b.message_id)));
        if state.journeys.len() < set.journeys.len() {
            state
                .journeys
                .resize_with(set.journeys.len(), JState::default);
        }
        let mut at = At {
            set: &set,
            user,
            t,
            events: &events,
            changes: &changes,
            timers: &mut self.timers,
            out,
            seq: 0,
        };
        for j in 0..set.journeys.len() {
            at.journey(state, j);
        }
        if state.is_empty() {
            self.users.remove(user);
        }
    }
}

impl<'a> At<'a> {
    fn row(
        &mut self,
        j: &CJourney,
        inst: &Instance,
        kind: Kind,
        path: &str,
        msg: Option<String>,
        reason: Option<String>,
    ) {
        self.out.push(JOut::Row(JourneyRow {
            time: self.t as i64,
            journey: j.name.clone(),
            user_id: self.user.to_string(),
            instance: inst.number,
            seq: self.seq,
            kind,
            step_path: path.to_string(),
            variant: inst.variant.map(|v| j.variants[v as usize].clone()),
            message_id: msg,
            reason,
        }));
        self.seq += 1;
    }

    fn holds(&self, state: &UserState, cond: &Option<CExpr>, ev: Option<&Event>) -> bool {
        let Some(c) = cond else { return true };
        let ctx = JCtx {
            user: self.user,
            ev,
            state,
            set: self.set,
        };
        *eval_ref(c, &ctx, self.t as i64) == Value::Bool(true)
    }

    /// The first event at `t` that fires `trigger` (for event and API triggers), or
    /// `Some(None)` when a segment trigger fires; `None` when nothing fires.
    fn fired(
        &self,
        state: &UserState,
        trigger: &CTrigger,
        cond: &Option<CExpr>,
        journey: &str,
    ) -> Option<Option<&'a Event>> {
        let change = |seg: u16, sign: isize| {
            self.changes
                .iter()
                .any(|(s, r)| *s == seg && r.signum() == sign)
        };
        match trigger {
            CTrigger::Event(name) => self
                .events
                .iter()
                .find(|e| {
                    e.event.as_deref() == Some(name.as_str()) && self.holds(state, cond, Some(e))
                })
                .map(Some),
            CTrigger::Api => self
                .events
                .iter()
                .find(|e| {
                    e.event.as_deref() == Some(API_TRIGGER_EVENT)
                        && e.context.get(API_TRIGGER_KEY).and_then(Json::as_str) == Some(journey)
                        && self.holds(state, cond, Some(e))
                })
                .map(Some),
            CTrigger::Entered(s) => {
                (change(*s, 1) && self.holds(state, cond, None)).then_some(None)
            }
            CTrigger::Exited(s) => {
                (change(*s, -1) && self.holds(state, cond, None)).then_some(None)
            }
        }
    }

    fn journey(&mut self, state: &mut UserState, ji: usize) {
        let set = self.set;
        let j = &set.journeys[ji];
        // 1. Exits.
        if let Some(inst) = state.journeys[ji].active.as_ref() {
            if inst.entered_at < self.t {
                let hit = j
                    .exits
                    .iter()
                    .find(|x| self.fired(state, &x.trigger, &x.cond, &j.name).is_some());
                if let Some(x) = hit {
                    let inst = state.journeys[ji].active.take().expect("checked above");
                    self.cancel(&inst, ji);
                    if x.goal {
                        self.row(j, &inst, Kind::Converted, "", None, Some(x.label.clone()));
                    }
                    self.row(j, &inst, Kind::Exited, "", None, Some(x.label.clone()));
                }
            }
        }
        // 2. Resume.
        if let Some(mut inst) = state.journeys[ji].active.take() {
            let mut resume = false;
            if let (
                Waiting::Event,
                Op::WaitUntil {
                    event,
                    cond,
                    on_event,
                    ..
                },
            ) = (&inst.waiting, &j.ops[inst.pc])
            {
                let name = event.as_str();
                let hit = self
                    .events
                    .iter()
                    .any(|e| e.event.as_deref() == Some(name) && self.holds(state, cond, Some(e)));
                if hit {
                    self.cancel(&inst, ji);
                    inst.pc = *on_event;
                    resume = true;
                }
            }
            if !resume && inst.wake == Some(self.t) {
                self.timers
                    .remove(&(self.t, self.user.to_string(), ji as u16));
                inst.wake = None;
                match (&inst.waiting, &j.ops[inst.pc]) {
                    (Waiting::Timer, _) => inst.pc += 1,
                    (Waiting::Event, Op::WaitUntil { on_timeout, .. }) => inst.pc = *on_timeout,
                    _ => {} // quiet hours over: the send runs again
                }
                resume = true;
            }
            if resume {
                let quiet = matches!(inst.waiting, Waiting::Quiet);
                self.run(state, ji, inst, quiet);
            } else {
                state.journeys[ji].active = Some(inst);
            }
        }
        // 3. Entry.
        if state.journeys[ji].active.is_some() {
            return;
        }
        let js = &state.journeys[ji];
        let may = match j.reentry {
            Reentry::Never => js.entries == 0,
            Reentry::Always => true,
            Reentry::After(d) => js.last_entry.is_none_or(|l| self.t as i64 - l as i64 >= d),
        };
        if !may {
            return;
        }
        let Some(ev) = self.fired(state, &j.entry, &j.entry_cond, &j.name) else {
            return;
        };
        let js = &mut state.journeys[ji];
        js.entries += 1;
        js.last_entry = Some(self.t);
        let inst = Instance {
            number: js.entries,
            entry: ev.map_or(self.t as i64, |e| e.timestamp),
            entered_at: self.t,
            pc: 0,
            variant: None,
            waiting: Waiting::Timer,
            wake: None,
            trigger: ev.map(|e| trigger_json(e).to_string().into_boxed_str()),
        };
        let reason = match &j.entry {
            CTrigger::Event(e) => format!("event:{e}"),
            CTrigger::Api => "api".into(),
            CTrigger::Entered(s) => {
                format!("segment_entered:{}", set.plan.segments[*s as usize].name)
            }
            CTrigger::Exited(s) => {
                format!("segment_exited:{}", set.plan.segments[*s as usize].name)
            }
        };
        self.row(j, &inst, Kind::Entered, "", None, Some(reason));
        self.run(state, ji, inst, false);
    }

    fn cancel(&mut self, inst: &Instance, ji: usize) {
        if let Some(w) = inst.wake {
            self.timers.remove(&(w, self.user.to_string(), ji as u16));
        }
    }

    fn wait(
        &mut self,
        state: &mut UserState,
        ji: usize,
        mut inst: Instance,
        waiting: Waiting,
        wake: Option<Time>,
    ) {
        inst.waiting = waiting;
        inst.wake = wake;
        if let Some(w) = wake {
            self.timers.insert((w, self.user.to_string(), ji as u16));
        }
        state.journeys[ji].active = Some(inst);
    }

    /// Runs the instance's steps from its program counter at `t` until it waits or ends.
    /// `resumed_send`: the instance resumes at a send deferred by quiet hours (its step
    /// row was already written).
    fn run(
        &mut self,
        state: &mut UserState,
        ji: usize,
        mut inst: Instance,
        mut resumed_send: bool,
    ) {
        let set = self.set;
        let j = &set.journeys[ji];
        let t = self.t;
        loop {
            let path = j.paths[inst.pc].as_str();
            match &j.ops[inst.pc] {
                Op::Jump(to) => {
                    inst.pc = *to;
                    continue;
                }
                Op::End => {
                    self.row(j, &inst, Kind::Completed, "", None, None);
                    return;
                }
                _ => {}
            }
            if !resumed_send {
                self.row(j, &inst, Kind::Step, path, None, None);
            }
            resumed_send = false;
            match &j.ops[inst.pc] {
                Op::Wait(ms) => {
                    if *ms == 0 {
                        inst.pc += 1;
                        continue;
                    }
                    let wake = t.saturating_add(*ms as u64);
                    return self.wait(state, ji, inst, Waiting::Timer, Some(wake));
                }
                Op::WaitUntil { timeout, .. } => {
                    let wake = timeout.map(|d| t.saturating_add(d as u64));
                    return self.wait(state, ji, inst, Waiting::Event, wake);
                }
                Op::Branch { arms, otherwise } => {
                    inst.pc = arms
                        .iter()
                        .find(|(seg, _)| state.is_member(*seg))
                        .map_or(*otherwise, |(_, pc)| *pc);
                }
                Op::Split { variants, total } => {
                    let key = format!("{}:{}", j.name, self.user);
                    let b = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % (*total).max(1);
                    let (v, _, pc) = variants
                        .iter()
                        .find(|(_, cum, _)| b < *cum)
                        .copied()
                        .unwrap_or(variants[variants.len() - 1]);
                    inst.variant = Some(v);
                    inst.pc = pc;
                }
                Op::Send {
                    channel,
                    template,
                    address,
                    opt_out,
                } => {
                    let msg = message_id(&j.name, self.user, inst.entry, path);
                    let addr = address.and_then(|p| state.trait_value(p)).cloned();
                    let js = &mut state.journeys[ji];
                    if let Some((_, per)) = j.frequency_cap {
                        while js
                            .sends
                            .front()
                            .is_some_and(|s| (*s as i64) <= t as i64 - per)
                        {
                            js.sends.pop_front();
                        }
                    }
                    let suppressed = if state.trait_value(*opt_out) == Some(&Value::Bool(true)) {
                        Some("opt_out")
                    } else if address.is_some() && addr.is_none() {
                        Some("no_address")
                    } else if j
                        .frequency_cap
                        .is_some_and(|(max, _)| state.journeys[ji].sends.len() >= max as usize)
                    {
                        Some("frequency_cap")
                    } else {
                        None
                    };
                    if let Some(reason) = suppressed {
                        self.row(
                            j,
                            &inst,
                            Kind::Suppressed,
                            path,
                            Some(msg),
                            Some(reason.into()),
                        );
                        inst.pc += 1;
                        continue;
                    }
                    if let Some((from, to)) = j.quiet_hours {
                        let tz = zone(set.timezone.and_then(|p| state.trait_value(p)).and_then(
                            |v| match v {
                                Value::Str(s) => Some(s.as_str()),
                                _ => None,
                            },
                        ));
                        if let Some(end) = quiet_until(t as i64, (from, to), tz) {
                            self.row(
                                j,
                                &inst,
                                Kind::Deferred,
                                path,
                                Some(msg),
                                Some("quiet_hours".into()),
                            );
                            return self.wait(state, ji, inst, Waiting::Quiet, Some(end as Time));
                        }
                    }
                    if j.frequency_cap.is_some() {
                        state.journeys[ji].sends.push_back(t);
                    }
                    let traits: Map<String, Json> = set
                        .traits
                        .iter()
                        .enumerate()
                        .filter_map(|(p, name)| {
                            state
                                .trait_value(p as u16)
                                .map(|v| (name.clone(), v.to_json()))
                        })
                        .collect();
                    self.row(j, &inst, Kind::Sent, path, Some(msg.clone()), None);
                    self.out.push(JOut::Message(MessageAction {
                        message_id: msg,
                        journey: j.name.clone(),
                        user_id: self.user.to_string(),
                        instance: inst.number,
                        step_path: path.to_string(),
                        variant: inst.variant.map(|v| j.variants[v as usize].clone()),
                        channel: channel.clone(),
                        template: template.clone(),
                        address: addr.map(|v| match v {
                            Value::Str(s) => s,
                            other => other.to_json().to_string(),
                        }),
                        traits,
                        event: inst
                            .trigger
                            .as_deref()
                            .and_then(|t| serde_json::from_str(t).ok()),
                        time: t as i64,
                    }));
                    inst.pc += 1;
                }
                Op::UpdateTrait { name, value } => {
                    let v = value.clone().unwrap_or(Value::Ts(t as i64));
                    let mut traits = Map::new();
                    traits.insert(name.clone(), v.to_json());
                    let ev = Event {
                        user: self.user.to_string(),
                        kind: EventType::Identify,
                        event: None,
                        // Writes at one instant all carry timestamp t; "latest write
                        // wins" breaks the tie by messageId, so the id starts with the
                        // order of execution: the last write in program order wins.
                        message_id: format!(
                            "herald-{:010}-{}",
                            self.seq,
                            message_id(&j.name, self.user, inst.entry, path)
                        ),
                        timestamp: t as i64,
                        properties: Map::new(),
                        context: Map::new(),
                        traits,
                    };
                    self.out.push(JOut::Write(ev, t + 1));
                    inst.pc += 1;
                }
                Op::Jump(_) | Op::End => unreachable!("handled above"),
            }
        }
    }
}

/// The message id of a send: the same on every replay.
pub fn message_id(journey: &str, user: &str, entry: i64, path: &str) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [
        journey.as_bytes(),
        user.as_bytes(),
        &entry.to_le_bytes(),
        path.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    format!("{:032x}", h.digest128())
}

fn trigger_json(e: &Event) -> Json {
    json!({
        "type": e.kind.as_str(),
        "event": e.event,
        "message_id": e.message_id,
        "timestamp": format_rfc3339_ms(e.timestamp),
        "properties": e.properties,
    })
}
