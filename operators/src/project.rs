//! Projected events: the part of an accepted event that the segment state reads.
//!
//! Owns [`Projected`] (user, type, name, instant, message id, the values of the event
//! paths the plan reads, the identify trait writes some segment reads, and the whole
//! [`Event`] only where a journey listens to it), [`Projection`] (what a plan reads,
//! compiled once), [`Plan::project`] (an accepted [`Event`] to its projection) and
//! [`Plan::parse_projected`]: a message's bytes straight to its projection, without
//! building the JSON tree of `properties`, `context` and `traits`.
//!
//! The fast path reads the common shape only: one message (not a `batch`), of type
//! `track`, `page`, `screen`, `group` or `identify`, with string ids and a `timestamp`.
//! Anything else, and any doubt, goes through [`parse_message`] and [`Plan::project`],
//! so both paths accept, reject and project every message the same way (the tests below
//! and `tests/tests/projection_matches_parse.rs` check this on generated messages). The
//! fast path validates every byte as the slow one does: skipped values are parsed, not
//! jumped over, so a malformed number or escape anywhere rejects the message on both.

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::ast::{EventField, PathRoot};
use crate::event::{lookup_path, parse_message, Event, EventType, Limits, Rejection};
use crate::plan::Plan;
use crate::time::parse_rfc3339_ms;
use crate::value::Value;

/// An accepted event as the segment state sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Projected {
    /// The event's instant (ms), as [`Event::timestamp`].
    pub timestamp: i64,
    /// The user key.
    pub user: String,
    /// `messageId` (or the generated one), as [`Event::message_id`].
    pub message_id: String,
    /// The message type.
    pub kind: EventType,
    /// `event` for track, `name` for page/screen, as a value (NULL when absent).
    pub event: Value,
    /// The values of [`Projection::paths`], in that order (NULL where absent).
    pub values: Box<[Value]>,
    /// The trait writes of an identify that some segment reads, `(trait slot, value)`,
    /// by slot.
    pub traits: Box<[(u32, Value)]>,
    /// The whole event, kept only when a journey listens to it.
    pub whole: Option<Box<Event>>,
}

/// What a plan reads of events: the dotted paths, indexed by `CExpr::Path`, and the
/// trait names, compiled into a tree the fast parser walks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Projection {
    /// Distinct event paths read by any aggregate, FILTER or journey condition.
    pub paths: Vec<(PathRoot, Vec<String>)>,
    /// Per root (properties, context, traits): the keys to descend into.
    roots: [Node; 3],
}

/// One key's subtree in [`Projection`]: what to record at it, and keys below it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Node {
    outs: Vec<Out>,
    children: Vec<(String, Node)>,
}

/// What a key's value is recorded as.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    /// The value of path `i`.
    Path(usize),
    /// An identify trait write from `context.traits` (rank 0) or `traits` (rank 1, wins).
    Trait(u32, u8),
}

impl Node {
    fn child(&mut self, key: &str) -> &mut Node {
        let i = match self.children.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                self.children.push((key.to_string(), Node::default()));
                self.children.len() - 1
            }
        };
        &mut self.children[i].1
    }

    /// Adds `out` at `path` (once: a plan compiled over another's projection sets the
    /// same traits again).
    fn insert(&mut self, path: &[String], out: Out) {
        match path.split_first() {
            None if self.outs.contains(&out) => {}
            None => self.outs.push(out),
            Some((k, rest)) => self.child(k).insert(rest, out),
        }
    }

    fn find(&self, key: &str) -> Option<&Node> {
        self.children.iter().find(|(k, _)| k == key).map(|(_, n)| n)
    }

    /// Every output at or below this node.
    fn each_out(&self, f: &mut impl FnMut(Out)) {
        self.outs.iter().copied().for_each(&mut *f);
        for (_, c) in &self.children {
            c.each_out(f);
        }
    }
}

fn root_index(root: PathRoot) -> usize {
    match root {
        PathRoot::Properties => 0,
        PathRoot::Context => 1,
        PathRoot::Traits => 2,
    }
}

impl Projection {
    /// Registers a path; returns its index.
    pub(crate) fn path_index(&mut self, root: PathRoot, path: &[String]) -> usize {
        if let Some(i) = self.paths.iter().position(|(r, p)| *r == root && p == path) {
            return i;
        }
        self.paths.push((root, path.to_vec()));
        let i = self.paths.len() - 1;
        self.roots[root_index(root)].insert(path, Out::Path(i));
        i
    }

    /// Registers the trait names the plan reads (their slots): identify writes of them
    /// come from `context.traits.NAME` and `traits.NAME`.
    pub(crate) fn set_traits(&mut self, traits: impl Iterator<Item = (String, u32)>) {
        for (name, slot) in traits {
            let name = [name];
            self.roots[1]
                .child("traits")
                .insert(&name, Out::Trait(slot, 0));
            self.roots[2].insert(&name, Out::Trait(slot, 1));
        }
    }
}

/// `EventType`s as the values `type` compares with.
static KIND_VALUES: LazyLock<[Value; 6]> =
    LazyLock::new(|| EventType::ALL.map(|k| Value::Str(k.as_str().to_string())));

impl Projected {
    /// The value of a non-path event field (paths are read by index, [`Projected::values`]).
    pub fn field(&self, field: &EventField) -> Cow<'_, Value> {
        match field {
            EventField::Event => Cow::Borrowed(&self.event),
            EventField::Type => Cow::Borrowed(&KIND_VALUES[self.kind as usize]),
            EventField::Timestamp => Cow::Owned(Value::Ts(self.timestamp)),
            EventField::MessageId => Cow::Owned(Value::Str(self.message_id.clone())),
            EventField::UserId => Cow::Owned(Value::Str(self.user.clone())),
            EventField::Path(..) => Cow::Owned(Value::Null),
        }
    }
}

impl Plan {
    /// The projection of an accepted event; `keep_whole` keeps the event itself too (for
    /// journeys that listen to it).
    pub fn project(&self, ev: Event, keep_whole: bool) -> Projected {
        let values = self
            .projection
            .paths
            .iter()
            .map(|(root, path)| {
                let obj = match root {
                    PathRoot::Properties => &ev.properties,
                    PathRoot::Context => &ev.context,
                    PathRoot::Traits => &ev.traits,
                };
                lookup_path(obj, path)
            })
            .collect();
        let mut traits = self.trait_writes(&ev);
        traits.sort_unstable_by_key(|(slot, _)| *slot);
        let event = ev.event.clone().map_or(Value::Null, Value::Str);
        let (timestamp, kind) = (ev.timestamp, ev.kind);
        let (user, message_id, whole) = if keep_whole {
            (ev.user.clone(), ev.message_id.clone(), Some(Box::new(ev)))
        } else {
            (ev.user, ev.message_id, None)
        };
        Projected {
            timestamp,
            user,
            message_id,
            kind,
            event,
            values,
            traits: traits.into(),
            whole,
        }
    }

    /// Parses one raw message (as [`parse_message`] with no receive time) and projects
    /// its events. `keep_whole` says, by event name, which events journeys listen to:
    /// those keep the whole event.
    pub fn parse_projected(
        &self,
        bytes: &[u8],
        limits: Limits,
        keep_whole: &dyn Fn(Option<&str>) -> bool,
    ) -> (Vec<Projected>, Vec<Rejection>) {
        if bytes.len() <= limits.max_message_bytes {
            if let Some(p) = self.fast_parse(bytes) {
                let name = match &p.event {
                    Value::Str(s) => Some(s.as_str()),
                    _ => None,
                };
                if !keep_whole(name) {
                    return (vec![p], vec![]);
                }
            }
        }
        let (events, rejections) = parse_message(bytes, None, limits);
        let projected = events
            .into_iter()
            .map(|e| {
                let keep = keep_whole(e.event.as_deref());
                self.project(e, keep)
            })
            .collect();
        (projected, rejections)
    }

    /// The fast path of [`Plan::parse_projected`] alone: `None` where the message needs
    /// the full parser (tests check that where it answers, it answers as that one does).
    pub fn fast_parse(&self, bytes: &[u8]) -> Option<Projected> {
        let proj = &self.projection;
        let mut top = Top {
            proj,
            values: vec![None; proj.paths.len()],
            traits: Vec::new(),
            fields: Default::default(),
            unsupported: false,
        };
        let mut de = serde_json::Deserializer::from_slice(bytes);
        (&mut de).deserialize_map(TopVisitor(&mut top)).ok()?;
        de.end().ok()?;
        if top.unsupported {
            return None;
        }
        let f = top.fields;
        let kind = match f.kind? {
            Loose::Str(s) => EventType::parse(&s)?,
            _ => return None,
        };
        if kind == EventType::Alias {
            return None;
        }
        let user = match id_field(f.user_id)? {
            Some(u) => u,
            None => id_field(f.anonymous_id)??,
        };
        let event = match kind {
            EventType::Track => Value::Str(id_field(f.event)??),
            EventType::Page | EventType::Screen => {
                id_field(f.name)?.map_or(Value::Null, Value::Str)
            }
            _ => Value::Null,
        };
        let timestamp = match f.timestamp? {
            Loose::Str(s) => parse_rfc3339_ms(&s).ok()?,
            _ => return None,
        };
        let message_id = match id_field(f.message_id)? {
            Some(m) => m,
            None => format!("gen-{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)),
        };
        let mut traits = Vec::new();
        if kind == EventType::Identify {
            // `traits` wins over `context.traits` for the same name (rank 1 over 0).
            top.traits
                .sort_by_key(|(slot, rank, _)| (*slot, std::cmp::Reverse(*rank)));
            top.traits.dedup_by_key(|(slot, _, _)| *slot);
            traits = top.traits.into_iter().map(|(s, _, v)| (s, v)).collect();
        }
        Some(Projected {
            timestamp,
            user,
            message_id,
            kind,
            event,
            values: top
                .values
                .into_iter()
                .map(|v| v.unwrap_or(Value::Null))
                .collect(),
            traits: traits.into(),
            whole: None,
        })
    }
}

/// An id-like field as [`Event`]'s parser reads it: a non-empty string is the id, an
/// empty string or another type is no id (`Some(None)`), a number needs the full parser
/// (`None`: it renders numbers as serde_json does).
fn id_field(v: Option<Loose<'_>>) -> Option<Option<String>> {
    match v {
        Some(Loose::Str(s)) if !s.is_empty() => Some(Some(s.into_owned())),
        Some(Loose::Number) => None,
        _ => Some(None),
    }
}

/// A top-level scalar, as far as the fast path cares.
enum Loose<'a> {
    Str(Cow<'a, str>),
    Number,
    Other,
}

#[derive(Default)]
struct Fields<'a> {
    kind: Option<Loose<'a>>,
    user_id: Option<Loose<'a>>,
    anonymous_id: Option<Loose<'a>>,
    event: Option<Loose<'a>>,
    name: Option<Loose<'a>>,
    message_id: Option<Loose<'a>>,
    timestamp: Option<Loose<'a>>,
}

struct Top<'p, 'a> {
    proj: &'p Projection,
    values: Vec<Option<Value>>,
    /// Trait writes seen: (slot, rank, value); the last of each (slot, rank) counts.
    traits: Vec<(u32, u8, Value)>,
    fields: Fields<'a>,
    unsupported: bool,
}

impl Top<'_, '_> {
    /// Forgets everything recorded at or below `node` (a repeated key replaces the
    /// earlier value entirely, as in a JSON object map).
    fn reset(&mut self, node: &Node) {
        node.each_out(&mut |o| match o {
            Out::Path(i) => self.values[i] = None,
            Out::Trait(slot, rank) => self.traits.retain(|t| (t.0, t.1) != (slot, rank)),
        });
    }

    fn record(&mut self, node: &Node, json: &Json) {
        for &o in &node.outs {
            match o {
                Out::Path(i) => self.values[i] = Some(Value::from_json(json)),
                Out::Trait(slot, rank) => {
                    self.traits.retain(|t| (t.0, t.1) != (slot, rank));
                    self.traits.push((slot, rank, Value::from_json(json)));
                }
            }
        }
        for (key, child) in &node.children {
            if let Some(v) = json.as_object().and_then(|m| m.get(key)) {
                self.record(child, v);
            }
        }
    }
}

struct TopVisitor<'t, 'p, 'a>(&'t mut Top<'p, 'a>);

impl<'de, 'p> Visitor<'de> for TopVisitor<'_, 'p, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let top = self.0;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match &*key {
                "type" => &mut top.fields.kind,
                "userId" => &mut top.fields.user_id,
                "anonymousId" => &mut top.fields.anonymous_id,
                "event" => &mut top.fields.event,
                "name" => &mut top.fields.name,
                "messageId" => &mut top.fields.message_id,
                "timestamp" => &mut top.fields.timestamp,
                "batch" => {
                    top.unsupported = true;
                    map.next_value::<Skip>()?;
                    continue;
                }
                root @ ("properties" | "context" | "traits") => {
                    let proj = top.proj;
                    let node = &proj.roots[root_index(match root {
                        "properties" => PathRoot::Properties,
                        "context" => PathRoot::Context,
                        _ => PathRoot::Traits,
                    })];
                    top.reset(node);
                    map.next_value_seed(NodeSeed { top, node })?;
                    continue;
                }
                _ => {
                    map.next_value::<Skip>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<LooseSeed>()?.0);
        }
        Ok(())
    }
}

/// Reads one value at a tree node: records its outputs, descends into wanted keys, and
/// parses (validates) the rest without keeping it.
struct NodeSeed<'t, 'p, 'a> {
    top: &'t mut Top<'p, 'a>,
    node: &'p Node,
}

impl<'de, 'p> DeserializeSeed<'de> for NodeSeed<'_, 'p, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.node.outs.is_empty() {
            d.deserialize_any(self)
        } else {
            // The value itself is wanted: keep it whole, and read wanted keys below from it.
            let json = Json::deserialize(d)?;
            self.top.record(self.node, &json);
            Ok(())
        }
    }
}

impl<'de, 'p> Visitor<'de> for NodeSeed<'_, 'p, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match self.node.find(&key) {
                Some(child) => {
                    self.top.reset(child);
                    map.next_value_seed(NodeSeed {
                        top: &mut *self.top,
                        node: child,
                    })?;
                }
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        Skip::drain_seq(seq)
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A value parsed in full (so it is validated as the full parser would) and dropped.
/// Unlike `IgnoredAny`, strings and numbers go through `deserialize_any`, which checks
/// escapes, surrogates and number ranges exactly as building a `serde_json::Value` does.
struct Skip;

impl Skip {
    fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_key::<Skip>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
        Skip::drain_seq(seq).map(|_| Skip)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
}

/// Reads a top-level scalar as [`Loose`].
struct LooseSeed<'a>(Loose<'a>);

impl<'de> Deserialize<'de> for LooseSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = LooseSeed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Str(Cow::Borrowed(s))))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Str(Cow::Owned(s.to_string()))))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Number))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Number))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Number))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Other))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(LooseSeed(Loose::Other))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        SkipVisitor.visit_map(map)?;
        Ok(LooseSeed(Loose::Other))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Skip::drain_seq(seq)?;
        Ok(LooseSeed(Loose::Other))
    }
}
