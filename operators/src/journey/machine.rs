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
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};

use crate::ast::EventField;
use crate::eval::{eval_ref, CExpr, Context};
use crate::event::{Event, EventType};
use crate::journey::compile::{
    CJourney, CTrigger, JourneySet, Op, API_TRIGGER_EVENT, API_TRIGGER_KEY, PENDING,
};
use crate::journey::file::Reentry;
use crate::journey::quiet::{quiet_until, zone};
use crate::msgid::MsgId;
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

/// An instant field that may be unset (`NONE`), in 8 bytes rather than an `Option`'s 16.
const NONE: Time = Time::MAX;

fn opt(t: Time) -> Option<Time> {
    (t != NONE).then_some(t)
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Waiting {
    Timer,
    Event,
    Quiet,
}

/// An active instance, in 56 bytes (a million of them wait at once in the scale bench).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Instance {
    /// Entry instant (the trigger's timestamp): part of every message id.
    entry: i64,
    /// Processing instant of the entry.
    entered_at: Time,
    /// The instant its timer fires (`NONE`: no timer).
    wake: Time,
    /// The triggering event, packed ([`pack_trigger`]): the message action carries it.
    trigger: Option<Box<[u8]>>,
    number: u32,
    pc: u32,
    variant: Option<u16>,
    waiting: Waiting,
}

impl Instance {
    fn wake(&self) -> Option<Time> {
        opt(self.wake)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct JState {
    entries: u32,
    /// The processing instant of the last entry (`NONE`: never entered).
    last_entry: Time,
    /// Send instants inside the frequency cap's period (journeys with a cap only).
    #[allow(clippy::box_collection)] // boxed: one word for the journeys without a cap
    sends: Option<Box<VecDeque<Time>>>,
    active: Option<Instance>,
}

impl Default for JState {
    fn default() -> Self {
        JState {
            entries: 0,
            last_entry: NONE,
            sends: None,
            active: None,
        }
    }
}

/// One user's journey state. Lists are exact-size boxed slices: they change rarely (a
/// membership or trait change) and are held for every user.
/// A user's exposed trait values with their multiplicities.
type Traits = Box<[((u16, Value), i32)]>;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct UserState {
    /// The user key (a checkpoint part carries it beside the state).
    #[serde(skip)]
    key: Box<str>,
    /// Exposed trait values (journeys that read traits only): one word when there are none.
    traits: Option<Box<Traits>>,
    members: Box<[(u16, i32)]>,
    journeys: Box<[JState]>,
}

impl UserState {
    fn trait_value(&self, pos: u16) -> Option<&Value> {
        self.traits
            .iter()
            .flat_map(|t| t.iter())
            .find(|((p, _), r)| *p == pos && *r > 0)
            .map(|((_, v), _)| v)
    }
    fn is_member(&self, seg: u16) -> bool {
        self.members.iter().any(|(s, r)| *s == seg && *r > 0)
    }
    /// Nothing to remember: the user can be forgotten.
    fn is_empty(&self) -> bool {
        self.traits.is_none()
            && self.members.is_empty()
            && self
                .journeys
                .iter()
                .all(|j| j.entries == 0 && j.sends.as_ref().is_none_or(|s| s.is_empty()))
    }

    /// Bytes this user holds beyond its record, counted from the structures.
    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.key.len()
            + self.traits.as_ref().map_or(0, |t| {
                size_of::<Traits>()
                    + t.len() * size_of::<((u16, Value), i32)>()
                    + t.iter().map(|((_, v), _)| v.heap_bytes()).sum::<usize>()
            })
            + self.members.len() * size_of::<(u16, i32)>()
            + self.journeys.len() * size_of::<JState>()
            + self
                .journeys
                .iter()
                .map(|j| {
                    j.sends
                        .as_ref()
                        .map_or(0, |s| size_of::<VecDeque<Time>>() + s.capacity() * 8)
                        + j.active
                            .as_ref()
                            .and_then(|i| i.trigger.as_ref())
                            .map_or(0, |t| t.len())
                })
                .sum::<usize>()
    }
}

/// Adds `r` to `k`'s multiplicity in `v`, dropping it at zero.
fn add<K: PartialEq, R: Copy + Default + PartialEq + std::ops::AddAssign>(
    v: &mut Vec<(K, R)>,
    k: K,
    r: R,
) {
    match v.iter().position(|(x, _)| *x == k) {
        Some(i) => {
            v[i].1 += r;
            if v[i].1 == R::default() {
                v.swap_remove(i);
            }
        }
        None => v.push((k, r)),
    }
}

/// [`add`] on an exact-size list.
fn add_exact<K: PartialEq>(v: &mut Box<[(K, i32)]>, k: K, r: isize) {
    let mut list = std::mem::take(v).into_vec();
    add(&mut list, k, r as i32);
    *v = list.into_boxed_slice();
}

/// Timers are kept in buckets of 2^16 ms (~66 s) of their instant.
const BUCKET_SHIFT: u32 = 16;

/// The pending timers of one worker: a timer wheel of one level. Timers of later buckets
/// are unsorted `(user, journey)` pairs in `far` (6 bytes each; the instant is the
/// instance's `wake`); when the earliest bucket comes up, its pairs are looked up, sorted
/// and moved to `near`. A timer is never removed when its instance stops waiting: a
/// pair whose instance no longer wakes at that instant is dropped when it comes up
/// (`Machine::live_timer`), so arming and cancelling are O(1) and firing in order costs a
/// sort per bucket instead of a heap operation per timer.
#[derive(Debug, Default)]
struct Timers {
    /// Timers of every bucket up to `open`, sorted by `(instant, user, journey)`.
    near: VecDeque<(Time, u32, u16)>,
    /// The latest bucket whose timers are in `near` (none yet: `None`).
    open: Option<u64>,
    /// Timers of later buckets, by bucket.
    far: BTreeMap<u64, Vec<Pair>>,
}

/// A `(user, journey)` pair in 6 bytes (a `(u32, u16)` tuple takes 8).
#[derive(Clone, Copy, Debug)]
struct Pair([u16; 3]);

impl Pair {
    fn new(u: u32, j: u16) -> Pair {
        Pair([u as u16, (u >> 16) as u16, j])
    }
    fn get(self) -> (u32, u16) {
        let [lo, hi, j] = self.0;
        (u32::from(lo) | u32::from(hi) << 16, j)
    }
}

impl Timers {
    fn arm(&mut self, t: Time, u: u32, j: u16) {
        let b = t >> BUCKET_SHIFT;
        if self.open.is_some_and(|o| b <= o) {
            let x = (t, u, j);
            let at = self.near.partition_point(|y| *y < x);
            if self.near.get(at) != Some(&x) {
                self.near.insert(at, x);
            }
        } else {
            self.far.entry(b).or_default().push(Pair::new(u, j));
        }
    }

    fn len(&self) -> usize {
        self.near.len() + self.far.values().map(Vec::len).sum::<usize>()
    }

    fn bytes(&self) -> usize {
        use std::mem::size_of;
        // A B-tree entry costs its key and value plus about a third for node slack.
        self.near.capacity() * size_of::<(Time, u32, u16)>()
            + self.far.len() * (size_of::<u64>() + size_of::<Vec<Pair>>()) * 4 / 3
            + self
                .far
                .values()
                .map(|v| v.capacity() * size_of::<Pair>())
                .sum::<usize>()
    }
}

/// Bytes of journey state, counted from the structures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JourneyBytes {
    /// Users held.
    pub users: u64,
    /// Active instances.
    pub instances: u64,
    /// Pending timers (some may be stale: see the timer wheel).
    pub timers: u64,
    /// Bytes of the users' state: records, keys, index, lists, instances, triggers.
    pub state: u64,
    /// Bytes of the timer wheel.
    pub timer_bytes: u64,
}

impl JourneyBytes {
    /// Sums two workers' figures.
    pub fn add(&mut self, o: &JourneyBytes) {
        self.users += o.users;
        self.instances += o.instances;
        self.timers += o.timers;
        self.state += o.state;
        self.timer_bytes += o.timer_bytes;
    }
}

/// Packs a triggering event into the bytes an instance holds: the type as one byte, the
/// event name and the message id with varint lengths (a canonical UUID message id as its
/// 16 bytes, [`MsgId`]), then the properties as JSON text (nothing when empty). The
/// timestamp is the instance's `entry`. [`unpack_trigger`] gives back the JSON the message
/// action carries.
fn pack_trigger(e: &Event) -> Box<[u8]> {
    fn varint(b: &mut Vec<u8>, mut n: u64) {
        while n >= 0x80 {
            b.push(n as u8 | 0x80);
            n >>= 7;
        }
        b.push(n as u8);
    }
    let mut b = Vec::with_capacity(32);
    b.push(e.kind as u8);
    match &e.event {
        Some(name) => {
            varint(&mut b, name.len() as u64 + 1);
            b.extend_from_slice(name.as_bytes());
        }
        None => varint(&mut b, 0),
    }
    // Length times two, plus one for a UUID kept as its bytes.
    match MsgId::new(&e.message_id) {
        MsgId::Uuid(u) => {
            varint(&mut b, 16 * 2 + 1);
            b.extend_from_slice(&u);
        }
        MsgId::Text(t) => {
            varint(&mut b, t.len() as u64 * 2);
            b.extend_from_slice(t.as_bytes());
        }
    }
    if !e.properties.is_empty() {
        if let Ok(text) = serde_json::to_vec(&e.properties) {
            b.extend_from_slice(&text);
        }
    }
    b.into_boxed_slice()
}

/// The triggering event's JSON (`type`, `event`, `message_id`, `timestamp`,
/// `properties`) from [`pack_trigger`]'s bytes and the instance's entry timestamp;
/// `None` if they are not such bytes.
fn unpack_trigger(b: &[u8], timestamp: i64) -> Option<Json> {
    fn take<'b>(b: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn text<'b>(b: &mut &'b [u8], n: usize) -> Option<&'b str> {
        std::str::from_utf8(take(b, n)?).ok()
    }
    fn varint(b: &mut &[u8]) -> Option<usize> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *take(b, 1)?.first()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return usize::try_from(n).ok();
            }
        }
        None
    }
    let mut b = b;
    let code = *take(&mut b, 1)?.first()?;
    let kind = EventType::ALL
        .into_iter()
        .find(|k| *k as u8 == code)?
        .as_str();
    let event = match varint(&mut b)? {
        0 => None,
        n => Some(text(&mut b, n - 1)?),
    };
    let n = varint(&mut b)?;
    let message_id = if n % 2 == 1 {
        let u: [u8; 16] = take(&mut b, n / 2)?.try_into().ok()?;
        Cow::Owned(MsgId::Uuid(u).text().into_owned())
    } else {
        Cow::Borrowed(text(&mut b, n / 2)?)
    };
    let properties: Map<String, Json> = if b.is_empty() {
        Map::new()
    } else {
        serde_json::from_slice(b).ok()?
    };
    Some(json!({
        "type": kind,
        "event": event,
        "message_id": message_id,
        "timestamp": format_rfc3339_ms(timestamp),
        "properties": properties,
    }))
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

/// Where a user stands in one journey ([`Machine::status`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JourneyStatus {
    /// The journey.
    pub journey: String,
    /// How many times the user entered it.
    pub entries: u32,
    /// The processing instant of the last entry.
    pub last_entry: Option<Time>,
    /// Sends inside the frequency cap's period (journeys with a cap).
    pub sends_in_cap: Option<u32>,
    /// The instance in progress, if any.
    pub active: Option<ActiveStatus>,
    /// Whether the journey is paused.
    pub paused: bool,
    /// The version the instance in progress runs on.
    pub version: Option<u32>,
}

/// An instance in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActiveStatus {
    /// Its number among the user's instances of the journey.
    pub instance: u32,
    /// The processing instant it entered at.
    pub entered_at: Time,
    /// The step it is at (its path, like `steps[2].wait`).
    pub step: String,
    /// What it waits for: `timer`, `event` or `quiet_hours`.
    pub waiting: &'static str,
    /// The instant its timer fires, if it has one.
    pub wake: Option<Time>,
    /// Its split variant, once chosen.
    pub variant: Option<String>,
}

/// Per-user journey state of one worker, and its timers. Users are interned to dense
/// indices (a slot whose user has nothing left to remember is freed and reused).
pub struct Machine {
    set: Rc<JourneySet>,
    index: hashbrown::HashTable<u32>,
    users: Vec<UserState>,
    free: Vec<u32>,
    timers: Timers,
    /// Users due at `due_at` not yet handed out, in key order.
    due: VecDeque<u32>,
    due_at: Time,
    /// Users stepped since the last checkpoint part (only when parts are taken), and the
    /// keys of those forgotten since.
    changed: Option<hashbrown::HashSet<u32>>,
    removed: Vec<Box<str>>,
    /// Per journey, whether it is paused ([`Machine::set_paused`]).
    paused: Vec<bool>,
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
            let mut members = std::mem::take(&mut st.members).into_vec();
            members.retain_mut(
                |(seg, _)| match r.segments.get(*seg as usize).copied().flatten() {
                    Some(to) => {
                        *seg = to as u16;
                        true
                    }
                    None => false,
                },
            );
            members.sort_by_key(|(seg, _)| *seg);
            st.members = members.into_boxed_slice();
            let mut traits = st.traits.take().map(|t| t.into_vec()).unwrap_or_default();
            traits.retain_mut(|((pos, _), _)| {
                match r.exposed.get(*pos as usize).copied().flatten() {
                    Some(to) => {
                        *pos = to;
                        true
                    }
                    None => false,
                }
            });
            st.traits = (!traits.is_empty()).then(|| Box::new(traits.into_boxed_slice()));
        }
    }
}

/// How a checkpoint's journeys map to a changed journey file's: by name. A journey with
/// the same definition keeps its instances as they are; one whose definition changed
/// keeps each user's entries and sends (its re-entry rule and frequency cap go on) but
/// its instance in progress exits at the restart (reason `journey_changed`); a journey
/// no longer in the file ends its instances the same way (reason `journey_removed`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JourneyRemap {
    /// Per old journey: its new index and whether its definition changed.
    pub journeys: Vec<Option<(u16, bool)>>,
    /// Per old journey: its name and its variants' names (for the exit rows).
    old: Vec<(String, Vec<String>)>,
    /// Journeys in the new file.
    pub n: usize,
    /// Names of the journeys whose definition changed, that were removed, and that are new.
    pub changed: Vec<String>,
    /// See `changed`.
    pub removed: Vec<String>,
    /// See `changed`.
    pub added: Vec<String>,
}

impl JourneyRemap {
    /// `old_defs` (compiled as `old`) against `new_defs`.
    pub fn new(
        old_defs: &[crate::journey::file::JourneyDef],
        old: &JourneySet,
        new_defs: &[crate::journey::file::JourneyDef],
    ) -> JourneyRemap {
        let mut r = JourneyRemap {
            n: new_defs.len(),
            ..Default::default()
        };
        for (d, c) in old_defs.iter().zip(&old.journeys) {
            r.old.push((c.name.clone(), c.variants.clone()));
            let to = new_defs.iter().position(|n| n.name == d.name);
            let changed = to.is_some_and(|i| new_defs[i] != *d);
            match to {
                None => r.removed.push(d.name.clone()),
                Some(_) if changed => r.changed.push(d.name.clone()),
                Some(_) => {}
            }
            r.journeys.push(to.map(|i| (i as u16, changed)));
        }
        r.added = new_defs
            .iter()
            .filter(|n| !old_defs.iter().any(|d| d.name == n.name))
            .map(|n| n.name.clone())
            .collect();
        r
    }
}

/// Carries a chain of parts (full first, deltas after, as [`Machine::restore`] reads
/// them) over to a changed journey file ([`JourneyRemap`]), and returns the exit rows, at
/// instant `at`, of the instances that end because their journey changed or went: one
/// per user and journey, from the user's latest state in the chain, sorted by user and
/// journey.
pub fn remap_journey_chain(parts: &mut [MachinePart], r: &JourneyRemap, at: Time) -> Vec<JOut> {
    let mut exits = Vec::new();
    let mut seen: std::collections::HashSet<String> = Default::default();
    for part in parts.iter_mut().rev() {
        for (key, state) in &mut part.users {
            let latest = seen.insert(key.clone());
            let Some(st) = state else { continue };
            let mut journeys = vec![JState::default(); r.n];
            for (j, mut js) in std::mem::take(&mut st.journeys)
                .into_vec()
                .into_iter()
                .enumerate()
            {
                let to = r.journeys.get(j).copied().flatten();
                let ends = match to {
                    Some((_, false)) => None,
                    Some((_, true)) => Some("journey_changed"),
                    None => Some("journey_removed"),
                };
                if let Some(reason) = ends {
                    if let (Some(inst), true) = (js.active.take(), latest) {
                        let (name, variants) = &r.old[j];
                        exits.push(JourneyRow {
                            time: at as i64,
                            journey: name.clone(),
                            user_id: key.clone(),
                            instance: inst.number,
                            seq: 0,
                            kind: Kind::Exited,
                            step_path: String::new(),
                            variant: inst.variant.map(|v| variants[v as usize].clone()),
                            message_id: None,
                            reason: Some(reason.to_string()),
                        });
                    }
                }
                if let Some((to, _)) = to {
                    journeys[to as usize] = js;
                }
            }
            st.journeys = journeys.into_boxed_slice();
        }
    }
    exits.sort_by(|a, b| (&a.user_id, &a.journey).cmp(&(&b.user_id, &b.journey)));
    exits.into_iter().map(JOut::Row).collect()
}

/// Everything that happens to one user at one instant, and what it emits.
struct At<'a> {
    set: &'a JourneySet,
    user: &'a str,
    /// The user's index, for the timers.
    u: u32,
    t: Time,
    events: &'a [Event],
    changes: &'a [(u16, isize)],
    timers: &'a mut Timers,
    out: &'a mut Vec<JOut>,
    seq: u32,
    /// Per journey, whether it is paused.
    paused: &'a [bool],
}

impl Machine {
    /// A machine for the compiled journeys.
    pub fn new(set: Rc<JourneySet>) -> Machine {
        Machine {
            paused: vec![false; set.journeys.len()],
            set,
            index: hashbrown::HashTable::new(),
            users: Vec::new(),
            free: Vec::new(),
            timers: Timers::default(),
            due: VecDeque::new(),
            due_at: NONE,
            changed: None,
            removed: Vec::new(),
        }
    }

    /// From now on, remembers which users are stepped, for [`Machine::part`].
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(Default::default);
    }

    /// The index of `user`, interning it if new.
    fn intern(&mut self, user: &str) -> u32 {
        let h = crate::state::user_hash(user);
        let users = &self.users;
        if let Some(&i) = self.index.find(h, |&i| &*users[i as usize].key == user) {
            return i;
        }
        let state = UserState {
            key: user.into(),
            ..UserState::default()
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.users[i as usize] = state;
                i
            }
            None => {
                if self.users.len() == self.users.capacity() {
                    // A quarter at a time: the records are most of a waiting user's bytes.
                    self.users.reserve_exact((self.users.len() / 4).max(1024));
                }
                self.users.push(state);
                (self.users.len() - 1) as u32
            }
        };
        let users = &self.users;
        self.index
            .insert_unique(h, i, |&j| crate::state::user_hash(&users[j as usize].key));
        i
    }

    /// Forgets user `u` (it has nothing left to remember).
    fn forget(&mut self, u: u32) {
        let key = std::mem::take(&mut self.users[u as usize].key);
        let h = crate::state::user_hash(&key);
        if let Ok(e) = self.index.find_entry(h, |&i| i == u) {
            e.remove();
        }
        self.users[u as usize] = UserState::default();
        self.free.push(u);
        if self.changed.is_some() {
            self.removed.push(key);
        }
    }

    /// The key of user `u`.
    pub fn key(&self, u: u32) -> &str {
        &self.users[u as usize].key
    }

    /// Where `user` stands in every journey (empty: none touched it).
    pub fn status(&self, user: &str) -> Vec<JourneyStatus> {
        let h = crate::state::user_hash(user);
        let users = &self.users;
        let Some(&u) = self.index.find(h, |&i| &*users[i as usize].key == user) else {
            return Vec::new();
        };
        let state = &self.users[u as usize];
        self.set
            .journeys
            .iter()
            .zip(state.journeys.iter())
            .enumerate()
            .filter(|(_, (_, j))| j.entries > 0 || j.active.is_some())
            .map(|(ji, (cj, j))| {
                // The instance's own version.
                let active = j
                    .active
                    .as_ref()
                    .map(|i| (i, self.set.program(ji, i.entered_at)));
                JourneyStatus {
                    paused: self.is_paused(ji),
                    version: active.map(|(_, v)| v.version),
                    journey: cj.name.clone(),
                    entries: j.entries,
                    last_entry: opt(j.last_entry),
                    sends_in_cap: j.sends.as_ref().map(|s| s.len() as u32),
                    active: active.map(|(i, v)| ActiveStatus {
                        instance: i.number,
                        entered_at: i.entered_at,
                        step: v.paths.get(i.pc as usize).cloned().unwrap_or_default(),
                        waiting: match i.waiting {
                            Waiting::Timer => "timer",
                            Waiting::Event => "event",
                            Waiting::Quiet => "quiet_hours",
                        },
                        wake: i.wake(),
                        variant: i.variant.and_then(|x| v.variants.get(x as usize).cloned()),
                    }),
                }
            })
            .collect()
    }

    /// The state as a checkpoint part: every user (`full`) or those stepped since the
    /// last part. Resets the change set.
    pub fn part(&mut self, full: bool) -> MachinePart {
        let changed = self.changed.replace(Default::default()).unwrap_or_default();
        let removed = std::mem::take(&mut self.removed);
        let live = |u: &UserState| !u.key.is_empty() || !u.is_empty();
        let users = if full {
            let mut v: Vec<_> = self
                .users
                .iter()
                .filter(|u| live(u))
                .map(|u| (u.key.to_string(), Some(u.clone())))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        } else {
            // Forgotten users first: a user forgotten and met again since is in both.
            let mut v: Vec<_> = removed.into_iter().map(|k| (k.into(), None)).collect();
            let mut ids: Vec<u32> = changed.into_iter().collect();
            ids.sort_unstable();
            for u in ids {
                let state = &self.users[u as usize];
                if live(state) {
                    v.push((state.key.to_string(), Some(state.clone())));
                }
            }
            v
        };
        MachinePart { full, users }
    }

    /// Restores the state from a chain of parts (a full one, then the deltas after it).
    pub fn restore(&mut self, parts: impl IntoIterator<Item = MachinePart>) -> Result<(), String> {
        let mut first = true;
        let mut users: BTreeMap<String, UserState> = BTreeMap::new();
        for p in parts {
            if first && !p.full {
                return Err("the chain of journey parts does not start with a full one".into());
            }
            first = false;
            if p.full {
                users.clear();
            }
            for (k, u) in p.users {
                match u {
                    Some(u) => users.insert(k, u),
                    None => users.remove(&k),
                };
            }
        }
        let changed = self.changed.take();
        let paused = std::mem::take(&mut self.paused);
        *self = Machine::new(Rc::clone(&self.set));
        self.changed = changed;
        self.paused = paused;
        for (k, mut state) in users {
            let u = self.intern(&k);
            state.key = k.into();
            for (ji, j) in state.journeys.iter().enumerate() {
                if let Some(w) = j.active.as_ref().and_then(Instance::wake) {
                    self.timers.arm(w, u, ji as u16);
                }
            }
            self.users[u as usize] = state;
        }
        Ok(())
    }

    /// Memberships of segments the journeys did not read before a restore (a new or
    /// changed journey file): the machine learns them as they are, with no trigger
    /// fired (a user already in a segment has not just entered it). `(user, segment)`.
    pub fn seed_members(&mut self, pairs: Vec<(String, u16)>) {
        for (user, seg) in pairs {
            let u = self.intern(&user);
            add_exact(&mut self.users[u as usize].members, seg, 1);
            if let Some(c) = &mut self.changed {
                c.insert(u);
            }
        }
    }

    /// Pauses or resumes journey `j` from instant `t` on (the operator calls it before it
    /// steps anyone at `t`). A paused journey admits no entries and its instances in
    /// progress stay at their step: a timer that falls due, or an awaited event, passes
    /// them by. Its exit rules still apply. On resume, every instance whose timer fell
    /// due during the pause goes on at `t`, as if its wait had ended then.
    pub fn set_paused(&mut self, j: usize, paused: bool, t: Time) {
        let Some(p) = self.paused.get_mut(j) else {
            return;
        };
        let was = std::mem::replace(p, paused);
        if was && !paused {
            self.rearm(j, t, false);
        }
    }

    /// Switches to a changed journey set at instant `t` (the operator calls it before it
    /// steps anyone at `t`): journeys keep their indices, a new one is appended, and each
    /// version in force admits entries from `t` (`set` has every pending version's `from`
    /// at `t`, [`JourneySet::in_force_at`]). Instances in progress finish on the version
    /// they entered (drain), unless the new version says `restart`: then each exits at `t`
    /// (reason `migrated`) and enters the new version there, keeping its trigger, in
    /// user order. Appends what that emits to `out`.
    pub fn set_journeys(&mut self, set: Rc<JourneySet>, t: Time, out: &mut Vec<JOut>) {
        self.paused.resize(set.journeys.len(), false);
        self.set = set;
        self.restart_from(t, out);
    }

    /// The instances in progress restart on the version in force when a version with
    /// `restart` takes effect at or after `at`: at [`Machine::set_journeys`], or after a
    /// restore at `at` (a change made after the checkpoint takes effect again there). A
    /// paused journey's instances are not restarted (they drain): its steps must not run.
    pub fn restart_from(&mut self, at: Time, out: &mut Vec<JOut>) {
        let restart: Vec<usize> = (0..self.set.journeys.len())
            .filter(|&j| {
                !self.is_paused(j)
                    && std::iter::once(&self.set.journeys[j])
                        .chain(self.set.older.get(j).into_iter().flatten())
                        .any(|c| c.restart && c.from != PENDING && c.from >= at)
            })
            .collect();
        for j in restart {
            self.migrate_all(j, at, out);
        }
    }

    /// [`At::migrate`] for every user with an instance of journey `j` that entered before
    /// `t`, in user order.
    fn migrate_all(&mut self, j: usize, t: Time, out: &mut Vec<JOut>) {
        let mut users: Vec<u32> = (0..self.users.len() as u32)
            .filter(|&u| {
                self.users[u as usize]
                    .journeys
                    .get(j)
                    .and_then(|x| x.active.as_ref())
                    .is_some_and(|i| i.entered_at < t)
            })
            .collect();
        users.sort_by(|a, b| {
            self.users[*a as usize]
                .key
                .cmp(&self.users[*b as usize].key)
        });
        let set = Rc::clone(&self.set);
        for u in users {
            if let Some(c) = &mut self.changed {
                c.insert(u);
            }
            let mut state = std::mem::take(&mut self.users[u as usize]);
            let key = std::mem::take(&mut state.key);
            let mut at = At {
                set: &set,
                user: &key,
                u,
                t,
                events: &[],
                changes: &[],
                timers: &mut self.timers,
                out,
                seq: 0,
                paused: &self.paused,
            };
            at.migrate(&mut state, j);
            state.key = key;
            self.users[u as usize] = state;
        }
    }

    /// Whether journey `j` is paused.
    pub fn is_paused(&self, j: usize) -> bool {
        self.paused.get(j) == Some(&true)
    }

    /// At the start: the journeys paused from it on; after a restore at `at`, the
    /// instances of the others whose timer fell due while they were paused before it go
    /// on at `at`.
    pub fn start_paused(&mut self, paused: &[u16], at: Option<Time>) {
        for p in &mut self.paused {
            *p = false;
        }
        for &j in paused {
            if let Some(p) = self.paused.get_mut(j as usize) {
                *p = true;
            }
        }
        if let Some(at) = at {
            // The restore armed every timer; only the overdue ones move.
            for j in 0..self.paused.len() {
                if !self.paused[j] {
                    self.rearm(j, at, true);
                }
            }
        }
    }

    /// Arms again the timers of journey `j` (every one, `overdue`: only those before
    /// `t`; the wheel dropped them while it was paused), those that fell due before `t`
    /// at `t`.
    fn rearm(&mut self, j: usize, t: Time, overdue: bool) {
        for (u, st) in self.users.iter_mut().enumerate() {
            let Some(inst) = st.journeys.get_mut(j).and_then(|x| x.active.as_mut()) else {
                continue;
            };
            if inst.wake == NONE || (overdue && inst.wake >= t) {
                continue;
            }
            if inst.wake < t {
                inst.wake = t;
                if let Some(c) = &mut self.changed {
                    c.insert(u as u32);
                }
            }
            self.timers.arm(inst.wake, u as u32, j as u16);
        }
    }

    /// Whether user `u`'s instance of journey `j` still waits for instant `t` (a paused
    /// journey's timers are dropped as they come up: the resume arms them again).
    fn live_timer(&self, t: Time, u: u32, j: u16) -> bool {
        !self.is_paused(j as usize)
            && self
                .users
                .get(u as usize)
                .and_then(|s| s.journeys.get(j as usize))
                .and_then(|js| js.active.as_ref())
                .is_some_and(|i| i.wake == t)
    }

    /// The earliest pending timer. Drops the stale timers in front of it, and opens the
    /// next bucket of the wheel when the open ones are spent.
    pub fn next_timer(&mut self) -> Option<Time> {
        if !self.due.is_empty() {
            return Some(self.due_at);
        }
        loop {
            while let Some(&(t, u, j)) = self.timers.near.front() {
                if self.live_timer(t, u, j) {
                    return Some(t);
                }
                self.timers.near.pop_front();
            }
            let (b, list) = self.timers.far.pop_first()?;
            let mut near: Vec<(Time, u32, u16)> = list
                .into_iter()
                .filter_map(|p| {
                    let (u, j) = p.get();
                    let w = self.users.get(u as usize)?.journeys.get(j as usize)?;
                    let w = w.active.as_ref()?.wake()?;
                    (w >> BUCKET_SHIFT == b).then_some((w, u, j))
                })
                .collect();
            near.sort_unstable();
            near.dedup();
            self.timers.near = near.into();
            self.timers.open = Some(b);
        }
    }

    /// The next `limit` users (in user order) with a timer due at `t`, each once; those
    /// not handed out are handed out by the next call. `t` must be the earliest pending
    /// timer ([`Machine::next_timer`]): timers before `t` have all fired.
    pub fn due(&mut self, t: Time, limit: usize) -> Vec<u32> {
        if self.due_at != t {
            self.due.clear();
            self.due_at = t;
        }
        let mut pulled = false;
        while let Some(&(w, u, j)) = self.timers.near.front() {
            if w != t {
                break;
            }
            self.timers.near.pop_front();
            if self.live_timer(w, u, j) {
                self.due.push_back(u);
                pulled = true;
            }
        }
        if pulled {
            // In key order, a user due twice (a timer armed twice) is adjacent to itself.
            let users = &self.users;
            let due = self.due.make_contiguous();
            due.sort_unstable_by(|a, b| users[*a as usize].key.cmp(&users[*b as usize].key));
            let mut kept = 0;
            for i in 0..due.len() {
                if kept == 0 || due[i] != due[kept - 1] {
                    due[kept] = due[i];
                    kept += 1;
                }
            }
            self.due.truncate(kept);
        }
        let n = limit.min(self.due.len());
        self.due.drain(..n).collect()
    }

    /// Gives back users [`Machine::due`] handed out but the caller did not step (it ran
    /// out of budget): they come first at the next call.
    pub fn undue(&mut self, users: Vec<u32>) {
        for u in users.into_iter().rev() {
            self.due.push_front(u);
        }
    }

    /// Users held in memory (with state or history).
    pub fn users(&self) -> usize {
        self.users.len() - self.free.len()
    }

    /// Active instances.
    pub fn active(&self) -> usize {
        self.users
            .iter()
            .flat_map(|u| u.journeys.iter())
            .filter(|j| j.active.is_some())
            .count()
    }

    /// Pending timers.
    pub fn timers(&self) -> usize {
        self.timers.len()
    }

    /// Bytes of journey state, counted from the structures.
    pub fn bytes(&self) -> JourneyBytes {
        use std::mem::size_of;
        let state = self.users.capacity() * size_of::<UserState>()
            + self.index.capacity() * (size_of::<u32>() + 1)
            + self.free.capacity() * size_of::<u32>()
            + self.users.iter().map(UserState::heap_bytes).sum::<usize>();
        JourneyBytes {
            users: self.users() as u64,
            instances: self.active() as u64,
            timers: self.timers() as u64,
            state: state as u64,
            timer_bytes: (self.timers.bytes() + self.due.capacity() * size_of::<u32>()) as u64,
        }
    }

    /// Processes everything that happened to `user` at `t` (inputs with their diffs);
    /// appends what it emits to `out`.
    pub fn step(&mut self, user: &str, t: Time, inputs: Vec<(JIn, isize)>, out: &mut Vec<JOut>) {
        let u = self.intern(user);
        self.step_user(u, t, inputs, out);
    }

    /// [`Machine::step`] for an interned user (one [`Machine::due`] handed out).
    pub fn step_user(&mut self, u: u32, t: Time, inputs: Vec<(JIn, isize)>, out: &mut Vec<JOut>) {
        let set = Rc::clone(&self.set);
        if let Some(c) = &mut self.changed {
            c.insert(u);
        }
        let mut state = std::mem::take(&mut self.users[u as usize]);
        let key = std::mem::take(&mut state.key);
        let mut events = Vec::new();
        let mut changes: Vec<(u16, isize)> = Vec::new();
        for (x, r) in inputs {
            match x {
                JIn::Event(e) if r > 0 => events.push(e),
                JIn::Event(_) => {}
                JIn::Member(s) => {
                    add_exact(&mut state.members, s, r);
                    add(&mut changes, s, r);
                }
                JIn::Trait(p, v) => {
                    let mut t = state.traits.take().map_or_else(Box::default, |t| *t);
                    add_exact(&mut t, (p, v), r);
                    state.traits = (!t.is_empty()).then(|| Box::new(t));
                }
            }
        }
        events.sort_by(|a, b| (a.timestamp, &a.message_id).cmp(&(b.timestamp, &b.message_id)));
        if state.journeys.len() < set.journeys.len() {
            let mut js = std::mem::take(&mut state.journeys).into_vec();
            js.resize_with(set.journeys.len(), JState::default);
            state.journeys = js.into_boxed_slice();
        }
        let mut at = At {
            set: &set,
            user: &key,
            u,
            t,
            events: &events,
            changes: &changes,
            timers: &mut self.timers,
            out,
            seq: 0,
            paused: &self.paused,
        };
        for j in 0..set.journeys.len() {
            at.journey(&mut state, j);
        }
        let empty = state.is_empty();
        state.key = key;
        self.users[u as usize] = state;
        if empty {
            self.forget(u);
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
        // 1. Exits: the instance's version's rules.
        if let Some(inst) = state.journeys[ji].active.as_ref() {
            if inst.entered_at < self.t {
                let j = set.program(ji, inst.entered_at);
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
        // A paused journey: exits only.
        if self.paused.get(ji) == Some(&true) {
            return;
        }
        // 2. Resume, on the instance's version.
        if let Some(mut inst) = state.journeys[ji].active.take() {
            let j = set.program(ji, inst.entered_at);
            let mut resume = false;
            if let (
                Waiting::Event,
                Op::WaitUntil {
                    event,
                    cond,
                    on_event,
                    ..
                },
            ) = (&inst.waiting, &j.ops[inst.pc as usize])
            {
                let name = event.as_str();
                let hit = self
                    .events
                    .iter()
                    .any(|e| e.event.as_deref() == Some(name) && self.holds(state, cond, Some(e)));
                if hit {
                    self.cancel(&inst, ji);
                    inst.pc = *on_event as u32;
                    resume = true;
                }
            }
            if !resume && inst.wake == self.t {
                inst.wake = NONE;
                match (&inst.waiting, &j.ops[inst.pc as usize]) {
                    (Waiting::Timer, _) => inst.pc += 1,
                    (Waiting::Event, Op::WaitUntil { on_timeout, .. }) => {
                        inst.pc = *on_timeout as u32
                    }
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
            Reentry::After(d) => opt(js.last_entry).is_none_or(|l| self.t as i64 - l as i64 >= d),
        };
        if !may {
            return;
        }
        let Some(ev) = self.fired(state, &j.entry, &j.entry_cond, &j.name) else {
            return;
        };
        let js = &mut state.journeys[ji];
        js.entries += 1;
        js.last_entry = self.t;
        let inst = Instance {
            number: js.entries,
            entry: ev.map_or(self.t as i64, |e| e.timestamp),
            entered_at: self.t,
            pc: 0,
            variant: None,
            waiting: Waiting::Timer,
            wake: NONE,
            trigger: ev.map(pack_trigger),
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

    /// `?migrate=restart`: the instance in progress of journey `ji` exits (reason
    /// `migrated`) and a new one enters the version in force at `t`, with the old one's
    /// trigger; its entry instant (part of its message ids) is `t`.
    fn migrate(&mut self, state: &mut UserState, ji: usize) {
        let Some(old) = state.journeys[ji].active.take() else {
            return;
        };
        let set = self.set;
        self.row(
            set.program(ji, old.entered_at),
            &old,
            Kind::Exited,
            "",
            None,
            Some("migrated".into()),
        );
        let js = &mut state.journeys[ji];
        js.entries += 1;
        js.last_entry = self.t;
        let inst = Instance {
            number: js.entries,
            entry: self.t as i64,
            entered_at: self.t,
            pc: 0,
            variant: None,
            waiting: Waiting::Timer,
            wake: NONE,
            trigger: old.trigger,
        };
        self.row(
            &set.journeys[ji],
            &inst,
            Kind::Entered,
            "",
            None,
            Some("migrated".into()),
        );
        self.run(state, ji, inst, false);
    }

    /// Stops the instance's timer. Nothing to do: the wheel drops a timer whose instance
    /// no longer waits for it when it comes up (see [`Timers`]).
    fn cancel(&mut self, _inst: &Instance, _ji: usize) {}

    fn wait(
        &mut self,
        state: &mut UserState,
        ji: usize,
        mut inst: Instance,
        waiting: Waiting,
        wake: Option<Time>,
    ) {
        inst.waiting = waiting;
        inst.wake = wake.unwrap_or(NONE);
        if let Some(w) = wake {
            self.timers.arm(w, self.u, ji as u16);
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
        let j = set.program(ji, inst.entered_at);
        let t = self.t;
        loop {
            let path = j.paths[inst.pc as usize].as_str();
            match &j.ops[inst.pc as usize] {
                Op::Jump(to) => {
                    inst.pc = *to as u32;
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
            match &j.ops[inst.pc as usize] {
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
                        .map_or(*otherwise, |(_, pc)| *pc) as u32;
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
                    inst.pc = pc as u32;
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
                    if let (Some((_, per)), Some(sends)) = (j.frequency_cap, js.sends.as_mut()) {
                        while sends.front().is_some_and(|s| (*s as i64) <= t as i64 - per) {
                            sends.pop_front();
                        }
                        if sends.is_empty() {
                            js.sends = None;
                        }
                    }
                    let suppressed = if state.trait_value(*opt_out) == Some(&Value::Bool(true)) {
                        Some("opt_out")
                    } else if address.is_some() && addr.is_none() {
                        Some("no_address")
                    } else if j.frequency_cap.is_some_and(|(max, _)| {
                        state.journeys[ji].sends.as_ref().map_or(0, |s| s.len()) >= max as usize
                    }) {
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
                        state.journeys[ji]
                            .sends
                            .get_or_insert_with(Default::default)
                            .push_back(t);
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
                            .and_then(|b| unpack_trigger(b, inst.entry)),
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

#[cfg(test)]
mod pack_tests {
    use super::*;

    fn event(kind: EventType, name: Option<&str>, id: &str, props: Json) -> Event {
        Event {
            user: "u".into(),
            kind,
            event: name.map(Into::into),
            message_id: id.into(),
            timestamp: 1_772_323_200_123,
            properties: props.as_object().cloned().unwrap_or_default(),
            context: Map::new(),
            traits: Map::new(),
        }
    }

    #[test]
    fn a_packed_trigger_unpacks_to_the_events_json() {
        let long = "x".repeat(300); // a length past one varint byte
        for e in [
            event(
                EventType::Track,
                Some("Order Completed"),
                "8d3f2a10-1c2b-4d5e-8f90-a1b2c3d4e5f6",
                json!({"revenue": 12.5, "items": [1, 2]}),
            ),
            event(EventType::Page, None, "m1", json!({})),
            event(EventType::Alias, Some(""), &long, json!({"k": long})),
            // Upper-case hex is not canonical: it stays text, as written.
            event(
                EventType::Identify,
                Some("é"),
                "8D3F2A10-1C2B-4D5E-8F90-A1B2C3D4E5F6",
                json!({}),
            ),
        ] {
            let got = unpack_trigger(&pack_trigger(&e), e.timestamp).unwrap();
            let want = json!({
                "type": e.kind.as_str(),
                "event": e.event,
                "message_id": e.message_id,
                "timestamp": format_rfc3339_ms(e.timestamp),
                "properties": e.properties,
            });
            assert_eq!(got, want);
        }
        assert!(unpack_trigger(&[9], 0).is_none(), "no such type");
        assert!(unpack_trigger(&[0, 5, b'a'], 0).is_none(), "cut short");
    }
}

#[cfg(test)]
mod pair_tests {
    use super::Pair;

    #[test]
    fn a_pair_holds_any_user_and_journey() {
        assert_eq!(std::mem::size_of::<Pair>(), 6);
        for (u, j) in [
            (0, 0),
            (1, 2),
            (65_535, 7),
            (65_536, 1),
            (u32::MAX, u16::MAX),
        ] {
            assert_eq!(Pair::new(u, j).get(), (u, j));
        }
    }
}

#[cfg(test)]
mod pause_tests {
    use super::*;
    use crate::journey::{compile_journeys, parse_journeys};

    const JOURNEYS: &str = "journey: j\nentry: { event: A }\nexit:\n  - event: Stop\n\
        steps:\n  - wait: 1 second\n  - send: { channel: webhook, template: t }\n";

    fn machine() -> Machine {
        let file =
            crate::lang::parse::parse_segments("CREATE SEGMENT s AS count(*) >= 1;").unwrap();
        let defs = parse_journeys(JOURNEYS).unwrap();
        Machine::new(Rc::new(compile_journeys(&file, &defs).unwrap()))
    }

    fn ev(user: &str, name: &str, t: i64) -> (JIn, isize) {
        let e = Event {
            user: user.into(),
            kind: EventType::Track,
            event: Some(name.into()),
            message_id: format!("{user}-{name}-{t}"),
            timestamp: t,
            properties: Map::new(),
            context: Map::new(),
            traits: Map::new(),
        };
        (JIn::Event(e), 1)
    }

    /// `(time, user, kind)` of every row.
    fn rows(out: &[JOut]) -> Vec<(i64, String, &'static str)> {
        out.iter()
            .filter_map(|o| match o {
                JOut::Row(r) => Some((r.time, r.user_id.clone(), r.kind.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Fires every timer up to `until`, in order.
    fn run_timers(m: &mut Machine, until: Time, out: &mut Vec<JOut>) {
        while let Some(t) = m.next_timer().filter(|t| *t <= until) {
            for u in m.due(t, usize::MAX) {
                m.step_user(u, t, Vec::new(), out);
            }
        }
    }

    #[test]
    fn a_paused_journey_admits_no_one_holds_its_instances_and_resumes_them() {
        let mut m = machine();
        let mut out = Vec::new();
        m.step("u1", 1000, vec![ev("u1", "A", 1000)], &mut out);
        m.step("u3", 1000, vec![ev("u3", "A", 1000)], &mut out);
        m.set_paused(0, true, 1500);
        assert!(m.is_paused(0));
        out.clear();
        // No entry; an exit rule still ends an instance; the timer at 2000 passes by.
        m.step("u2", 1600, vec![ev("u2", "A", 1600)], &mut out);
        m.step("u3", 1700, vec![ev("u3", "Stop", 1700)], &mut out);
        run_timers(&mut m, 4999, &mut out);
        assert_eq!(rows(&out), [(1700, "u3".into(), "exited")]);
        assert_eq!(m.next_timer(), None);
        // The checkpoint's part, restored: paused it still holds; resumed at the restart,
        // the overdue instance goes on there.
        for (paused, want) in [(vec![0u16], None), (vec![], Some(4000))] {
            let mut back = machine();
            back.restore([m.part(true)]).unwrap();
            back.start_paused(&paused, Some(4000));
            assert_eq!(back.next_timer(), want, "paused {paused:?}");
        }
        // Resumed at 5000: u1's wait ended during the pause, so it goes on at 5000.
        out.clear();
        m.set_paused(0, false, 5000);
        assert_eq!(m.next_timer(), Some(5000));
        run_timers(&mut m, 10_000, &mut out);
        assert_eq!(
            rows(&out),
            [
                (5000, "u1".into(), "step"),
                (5000, "u1".into(), "sent"),
                (5000, "u1".into(), "completed"),
            ]
        );
        // And it admits entries again.
        out.clear();
        m.step("u2", 6000, vec![ev("u2", "A", 6000)], &mut out);
        assert_eq!(rows(&out)[0], (6000, "u2".into(), "entered"));
    }

    #[test]
    fn a_resume_before_a_timer_is_due_keeps_it_at_its_instant() {
        for resume in [1800, 2000] {
            let mut m = machine();
            let mut out = Vec::new();
            m.step("u1", 1000, vec![ev("u1", "A", 1000)], &mut out);
            m.set_paused(0, true, 1500);
            // The paused journey's timer at 2000 goes from the wheel as the operator
            // looks for its next instant.
            assert_eq!(m.next_timer(), None);
            m.set_paused(0, false, resume);
            out.clear();
            run_timers(&mut m, 10_000, &mut out);
            assert_eq!(
                rows(&out)[0],
                (2000, "u1".into(), "step"),
                "resumed at {resume}"
            );
        }
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;
    use crate::journey::compile::{compile_journey_versions, JourneyVersion, PENDING};
    use crate::journey::parse_journeys;

    fn version(yaml: &str, version: u32, from: Time) -> JourneyVersion {
        JourneyVersion {
            def: parse_journeys(yaml).unwrap().remove(0),
            version,
            from,
            restart: false,
        }
    }

    const A1: &str = "journey: a\nentry: { event: A }\nsteps:\n  - branch:\n      - when: \"count(*) >= 2\"\n        steps: []";
    const B: &str = "journey: b\nentry: { event: B }\nsteps:\n  - branch:\n      - when: \"count(*) >= 3\"\n        steps: []";
    const A2: &str = "journey: a\nentry: { event: A }\nsteps:\n  - branch:\n      - when: \"count(*) >= 5\"\n        steps: []";

    #[test]
    fn a_later_version_adds_hidden_segments_after_every_earlier_one_and_runs_its_entries() {
        let file =
            crate::lang::parse::parse_segments("CREATE SEGMENT s AS count(*) >= 1;").unwrap();
        let one =
            compile_journey_versions(&file, &[version(A1, 1, 0), version(B, 1, 0)], None, &[])
                .unwrap();
        let two = compile_journey_versions(
            &file,
            &[version(A1, 1, 0), version(B, 1, 0), version(A2, 2, PENDING)],
            Some(&one.plan),
            &one.traits,
        )
        .unwrap();
        let names = |set: &JourneySet| -> Vec<String> {
            set.plan.segments.iter().map(|s| s.name.clone()).collect()
        };
        // The running plan's indices stay; version 2's condition comes last.
        assert_eq!(names(&two)[..names(&one).len()], names(&one)[..]);
        assert_eq!(names(&two).last().unwrap(), "a@2:steps[0].branch[0].when");
        assert_eq!(two.journeys.len(), 2, "journeys by name");
        assert_eq!((two.journeys[0].version, two.older[0].len()), (2, 1));
        // Entries before the change run version 1, from it on version 2.
        let two = two.in_force_at(1000);
        assert_eq!(two.program(0, 999).version, 1);
        assert_eq!(two.program(0, 1000).version, 2);
        assert_eq!(two.program(1, 5).version, 1);
        let arm = |c: &CJourney| match &c.ops[0] {
            Op::Branch { arms, .. } => arms[0].0 as usize,
            _ => unreachable!(),
        };
        assert_eq!(
            two.plan.segments[arm(two.program(0, 0))].name,
            "a:steps[0].branch[0].when"
        );
        assert_eq!(
            two.plan.segments[arm(two.program(0, 2000))].name,
            "a@2:steps[0].branch[0].when"
        );
        assert!(
            two.segments_read()[arm(two.program(0, 0))],
            "the old version's too"
        );
    }
}
