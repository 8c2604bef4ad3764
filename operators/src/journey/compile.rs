//! Compiling journeys together with the segment set into one plan.
//!
//! Owns [`JourneySet`]: the segment plan extended with what the journeys read, and each
//! journey's steps as a flat program ([`Op`]s with jumps), which is what an instance's
//! program counter points into.
//!
//! How conditions reuse the segment compiler, exactly:
//! * a `when` (user only) becomes a *hidden segment*: the same reduce that maintains
//!   every segment maintains it, so at any instant the journey operator only asks
//!   "is the user a member";
//! * a `where` mixes the triggering event's fields with the user's names. Its parts that
//!   hold an aggregate (and no event field) become a pair of hidden segments, `X` and
//!   `NOT X`, which give `X`'s three-valued truth at the instant; the rest (event fields,
//!   traits, `in_segment`, `now()`) is evaluated by the journey operator against the
//!   event and the user's exposed traits and memberships.
//!
//! Hidden segments come after the user's segments in the plan (`Plan::visible` counts the
//! user's) and are never reported as segment changes.

use std::collections::BTreeSet;

use crate::ast::{Expr, SegmentBody, SegmentDef, SegmentFile};
use crate::eval::CExpr;
use crate::journey::file::{Cond, JourneyDef, JourneyError, Reentry, StepDef, Trigger, CHANNELS};
use crate::lang::ast::Pos;
use crate::plan::Plan;
use crate::time::Time;
use crate::value::Value;

/// The event name that records an API trigger: `POST /v1/journeys/{name}/trigger` becomes a
/// track event with this name, the call's `properties`, and the journey's name in
/// `context.herald_journey`, so the trigger is durable and replays like any event.
pub const API_TRIGGER_EVENT: &str = "Herald Journey Triggered";

/// The `context` key that names the journey an [`API_TRIGGER_EVENT`] enters.
pub const API_TRIGGER_KEY: &str = "herald_journey";

/// The `context` key (value `true`) that marks an `update_trait` write in the events
/// archive: the identify event a journey wrote, kept so that a rebuild from the archive
/// applies it as the live state did. A replay of the archive skips it (its journeys
/// write it again).
pub const JOURNEY_WRITE_KEY: &str = "herald_journey_write";

/// An `update_trait` write as the events archive keeps it ([`JOURNEY_WRITE_KEY`]).
pub fn archived_write(ev: &crate::event::Event) -> crate::event::Event {
    let mut ev = ev.clone();
    ev.context
        .insert(JOURNEY_WRITE_KEY.into(), serde_json::Value::Bool(true));
    ev
}

/// Whether an archived event is a journey's `update_trait` write (marked, with the
/// `herald-` message id journeys give their writes: a user's own event that sets the key
/// is not taken for one).
pub fn is_archived_write(ev: &crate::event::Event) -> bool {
    ev.context.get(JOURNEY_WRITE_KEY) == Some(&serde_json::Value::Bool(true))
        && ev.message_id.starts_with("herald-")
        && ev.kind == crate::event::EventType::Identify
}

/// A compiled trigger.
#[derive(Clone, Debug, PartialEq)]
pub enum CTrigger {
    /// An event with this name.
    Event(String),
    /// Entering the segment (plan index).
    Entered(u16),
    /// Leaving the segment (plan index).
    Exited(u16),
    /// An API call.
    Api,
}

/// A compiled exit rule.
#[derive(Clone, Debug, PartialEq)]
pub struct CExit {
    /// What fires it.
    pub trigger: CTrigger,
    /// Its condition.
    pub cond: Option<CExpr>,
    /// A conversion.
    pub goal: bool,
    /// `event:Order Completed`: the reason in journey events.
    pub label: String,
}

/// One instruction of a journey's program.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Resume at now + ms.
    Wait(i64),
    /// Wait for an event (or the timeout), then jump to `on_event` or `on_timeout`.
    WaitUntil {
        /// Event name.
        event: String,
        /// Condition on it.
        cond: Option<CExpr>,
        /// Timeout in ms.
        timeout: Option<i64>,
        /// Program counter of the `on_event` block.
        on_event: usize,
        /// Program counter of the `on_timeout` block.
        on_timeout: usize,
    },
    /// The first arm whose hidden segment holds the user, else `otherwise`.
    Branch {
        /// (hidden segment, program counter).
        arms: Vec<(u16, usize)>,
        /// Program counter of the else block.
        otherwise: usize,
    },
    /// Deterministic split: `(variant index, cumulative weight, program counter)`.
    Split {
        /// Variants with cumulative weights.
        variants: Vec<(u16, u64, usize)>,
        /// Sum of weights.
        total: u64,
    },
    /// A message action.
    Send {
        /// Channel.
        channel: String,
        /// Template.
        template: String,
        /// Exposed position of the address trait (none: addressed by user id).
        address: Option<u16>,
        /// Exposed position of `<channel>_opt_out`.
        opt_out: u16,
    },
    /// A trait write (`None`: now()).
    UpdateTrait {
        /// Trait name.
        name: String,
        /// Value.
        value: Option<Value>,
    },
    /// Continue at.
    Jump(usize),
    /// The end of the steps.
    End,
}

/// A compiled journey.
#[derive(Clone, Debug, PartialEq)]
pub struct CJourney {
    /// Name.
    pub name: String,
    /// Entry trigger.
    pub entry: CTrigger,
    /// Entry condition.
    pub entry_cond: Option<CExpr>,
    /// Re-entry rule.
    pub reentry: Reentry,
    /// Exit rules in order.
    pub exits: Vec<CExit>,
    /// `(max, per ms)`.
    pub frequency_cap: Option<(u32, i64)>,
    /// Quiet hours, minutes of the day.
    pub quiet_hours: Option<(u32, u32)>,
    /// The program.
    pub ops: Vec<Op>,
    /// The step path of every op (`steps[1].branch[0].steps[0]`).
    pub paths: Vec<String>,
    /// Variant names of its split(s).
    pub variants: Vec<String>,
    /// Its version: 1 for the journey file's, then one more per change through the API.
    pub version: u32,
    /// The instant from which it admits entries ([`PENDING`]: from the instant its
    /// change takes effect, set then by [`JourneySet::in_force_at`]). An instance runs on
    /// the version in force at its entry (see [`JourneySet::program`]).
    pub from: Time,
    /// When it takes effect, the instances in progress on older versions restart on it
    /// (`?migrate=restart`) rather than finish where they are (drain).
    pub restart: bool,
}

/// [`CJourney::from`] of a version whose change has not taken effect yet.
pub const PENDING: Time = Time::MAX;

/// A journey definition with its version, as [`compile_journey_versions`] takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct JourneyVersion {
    /// The definition.
    pub def: JourneyDef,
    /// Its version (1: the journey file's).
    pub version: u32,
    /// The instant it admits entries from (0: the start; [`PENDING`]: not yet known).
    pub from: Time,
    /// `?migrate=restart`: see [`CJourney::restart`].
    pub restart: bool,
}

impl JourneyVersion {
    /// The journey file's version of `def`.
    pub fn of_file(def: JourneyDef) -> JourneyVersion {
        JourneyVersion {
            def,
            version: 1,
            from: 0,
            restart: false,
        }
    }
}

/// Journeys compiled with the segment set they read.
#[derive(Clone, Debug, PartialEq)]
pub struct JourneySet {
    /// Segments (visible first, then hidden) and slots.
    pub plan: Plan,
    /// Journeys in file order (then those created through the API), each its version in
    /// force.
    pub journeys: Vec<CJourney>,
    /// Per journey, its earlier versions, oldest first: instances that entered under one
    /// finish on it (drain).
    pub older: Vec<Vec<CJourney>>,
    /// Names of the exposed traits, by exposed position.
    pub traits: Vec<String>,
    /// For every plan trait index, its exposed position.
    pub trait_pos: Vec<Option<u16>>,
    /// Exposed position of `timezone`, if any journey has quiet hours.
    pub timezone: Option<u16>,
    /// Event names the journeys listen to (API triggers included).
    pub events: BTreeSet<String>,
}

impl JourneySet {
    /// Every version of every journey: those in force, then the earlier ones.
    pub fn all(&self) -> impl Iterator<Item = &CJourney> {
        self.journeys.iter().chain(self.older.iter().flatten())
    }

    /// The version of journey `j` an instance that entered at `entered_at` runs on: the
    /// latest that admitted entries at that instant.
    pub fn program(&self, j: usize, entered_at: Time) -> &CJourney {
        let current = &self.journeys[j];
        if current.from <= entered_at {
            return current;
        }
        let older = self.older.get(j).map_or(&[][..], Vec::as_slice);
        older
            .iter()
            .rev()
            .find(|v| v.from <= entered_at)
            .or(older.first())
            .unwrap_or(current)
    }

    /// [`JourneySet::all`], to change.
    pub fn all_mut(&mut self) -> impl Iterator<Item = &mut CJourney> {
        self.journeys
            .iter_mut()
            .chain(self.older.iter_mut().flatten())
    }

    /// The set with every version whose change is pending in force from `t`.
    pub fn in_force_at(&self, t: Time) -> JourneySet {
        let mut set = self.clone();
        for j in set.all_mut() {
            if j.from == PENDING {
                j.from = t;
            }
        }
        set
    }

    /// Per plan segment, whether a journey reads its membership: a trigger (entry or
    /// exit), an `in_segment` in a condition, or a branch arm's hidden segment. The
    /// journeys need no other segment's changes.
    pub fn segments_read(&self) -> Vec<bool> {
        let mut named: Vec<usize> = Vec::new();
        let mut conds: Vec<&CExpr> = Vec::new();
        for j in self.all() {
            for t in std::iter::once(&j.entry).chain(j.exits.iter().map(|x| &x.trigger)) {
                if let CTrigger::Entered(s) | CTrigger::Exited(s) = t {
                    named.push(*s as usize);
                }
            }
            conds.extend(
                j.entry_cond
                    .iter()
                    .chain(j.exits.iter().flat_map(|x| &x.cond)),
            );
            for op in &j.ops {
                match op {
                    Op::WaitUntil { cond, .. } => conds.extend(cond),
                    Op::Branch { arms, .. } => named.extend(arms.iter().map(|(s, _)| *s as usize)),
                    _ => {}
                }
            }
        }
        for c in conds {
            crate::eval::visit(c, &mut |x| {
                if let CExpr::InSegment(s) = x {
                    named.push(*s);
                }
            });
        }
        let mut read = vec![false; self.plan.segments.len()];
        for s in named {
            if let Some(r) = read.get_mut(s) {
                *r = true;
            }
        }
        read
    }

    /// Whether some journey has an `update_trait` step (so its writes loop back).
    pub fn writes_traits(&self) -> bool {
        self.all()
            .any(|j| j.ops.iter().any(|o| matches!(o, Op::UpdateTrait { .. })))
    }

    /// Every `send` step of every version: `(journey, step path, channel, template)`, in
    /// file order.
    pub fn sends(&self) -> Vec<(&str, &str, &str, &str)> {
        let mut out = Vec::new();
        for j in self.all() {
            for (op, path) in j.ops.iter().zip(&j.paths) {
                if let Op::Send {
                    channel, template, ..
                } = op
                {
                    out.push((
                        j.name.as_str(),
                        path.as_str(),
                        channel.as_str(),
                        template.as_str(),
                    ));
                }
            }
        }
        out
    }

    /// Whether the journey operator needs to see this event.
    pub fn wants(&self, ev: &crate::event::Event) -> bool {
        self.wants_name(ev.event.as_deref())
    }

    /// [`JourneySet::wants`] by the event's name (`event` of a track, `name` of a page).
    pub fn wants_name(&self, name: Option<&str>) -> bool {
        name.is_some_and(|e| self.events.contains(e))
    }
}

struct Builder<'a> {
    file: &'a SegmentFile,
    hidden: Vec<SegmentDef>,
    /// Expressions compiled as extras: (journey index, slot in its table).
    extras: Vec<Expr>,
    traits: BTreeSet<String>,
    journey: String,
    /// The hidden segments' name prefix: the journey's name, with `@N` for version N > 1.
    prefix: String,
}

/// Where a compiled condition will be found after `Plan::compile_with`.
#[derive(Clone, Copy)]
struct ExtraRef(usize);

impl Builder<'_> {
    fn err(&self, path: &str, message: impl Into<String>) -> JourneyError {
        JourneyError {
            journey: self.journey.clone(),
            path: path.into(),
            message: message.into(),
        }
    }

    fn segment(&self, name: &str, path: &str) -> Result<(), JourneyError> {
        if self.file.segments.iter().any(|s| s.name == name) {
            Ok(())
        } else {
            Err(self.err(path, format!("unknown segment '{name}'")))
        }
    }

    fn hide(&mut self, name: String, expr: Expr) -> String {
        self.hidden.push(SegmentDef {
            name: name.clone(),
            pos: Pos { line: 0, column: 0 },
            body: SegmentBody::Expr(expr),
        });
        name
    }

    /// A `when`: one hidden segment.
    fn when(&mut self, c: &Cond, path: &str) -> Result<String, JourneyError> {
        for r in &c.refs {
            self.segment(r, path)?;
        }
        Ok(self.hide(format!("{}:{path}", self.prefix), c.expr.clone()))
    }

    /// A `where`: aggregate parts hoisted into hidden segments, the rest compiled as an
    /// extra expression.
    fn cond(&mut self, c: &Cond, path: &str) -> Result<ExtraRef, JourneyError> {
        for r in &c.refs {
            self.segment(r, path)?;
        }
        let mut n = 0;
        let e = self.hoist(&c.expr, path, &mut n)?;
        collect_traits(&e, &mut self.traits);
        self.extras.push(e);
        Ok(ExtraRef(self.extras.len() - 1))
    }

    fn hoist(&mut self, e: &Expr, path: &str, n: &mut usize) -> Result<Expr, JourneyError> {
        if !has_event(e) && has_agg(e) {
            if !is_boolean(e) {
                return Err(self.err(
                    path,
                    format!(
                        "'{e}' holds an aggregate but is not a condition; compare it with a \
                         constant (like count(*) FILTER (WHERE …) >= 3), not with the event's \
                         fields"
                    ),
                ));
            }
            *n += 1;
            let base = format!("{}:{path}:{n}", self.prefix);
            let t = self.hide(format!("{base}:true"), e.clone());
            let f = self.hide(format!("{base}:false"), Expr::Not(Box::new(e.clone())));
            // TRUE when in `t`, FALSE when in `f`, else NULL.
            return Ok(Expr::Or(
                Box::new(Expr::InSegment(t)),
                Box::new(Expr::And(
                    Box::new(Expr::Not(Box::new(Expr::InSegment(f)))),
                    Box::new(Expr::Lit(Value::Null)),
                )),
            ));
        }
        let mut h =
            |x: &Expr| -> Result<Box<Expr>, JourneyError> { Ok(Box::new(self.hoist(x, path, n)?)) };
        Ok(match e {
            Expr::Cmp(op, a, b) => Expr::Cmp(*op, h(a)?, h(b)?),
            Expr::Arith(op, a, b) => Expr::Arith(*op, h(a)?, h(b)?),
            Expr::And(a, b) => Expr::And(h(a)?, h(b)?),
            Expr::Or(a, b) => Expr::Or(h(a)?, h(b)?),
            Expr::Neg(a) => Expr::Neg(h(a)?),
            Expr::Not(a) => Expr::Not(h(a)?),
            Expr::Lower(a) => Expr::Lower(h(a)?),
            Expr::Upper(a) => Expr::Upper(h(a)?),
            Expr::IsNull { expr, negated } => Expr::IsNull {
                expr: h(expr)?,
                negated: *negated,
            },
            Expr::InList {
                expr,
                list,
                negated,
            } => Expr::InList {
                expr: h(expr)?,
                list: list
                    .iter()
                    .map(|x| self.hoist(x, path, n))
                    .collect::<Result<_, _>>()?,
                negated: *negated,
            },
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => Expr::Between {
                expr: h(expr)?,
                low: h(low)?,
                high: h(high)?,
                negated: *negated,
            },
            Expr::Like {
                expr,
                pattern,
                negated,
            } => Expr::Like {
                expr: h(expr)?,
                pattern: h(pattern)?,
                negated: *negated,
            },
            Expr::Coalesce(l) => Expr::Coalesce(
                l.iter()
                    .map(|x| self.hoist(x, path, n))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::HashBucket { key, salt, n: k } => Expr::HashBucket {
                key: h(key)?,
                salt: salt.clone(),
                n: *k,
            },
            other => other.clone(),
        })
    }
}

/// A step program under construction: ops plus the extras they wait for.
struct Program {
    ops: Vec<Op>,
    paths: Vec<String>,
    /// (op index, extra) pairs to patch the condition into after compilation.
    conds: Vec<(usize, ExtraRef)>,
    /// (op index, arm, hidden segment name).
    arms: Vec<(usize, usize, String)>,
    variants: Vec<String>,
}

impl Builder<'_> {
    fn steps(
        &mut self,
        steps: &[StepDef],
        path: &str,
        p: &mut Program,
    ) -> Result<(), JourneyError> {
        for (i, s) in steps.iter().enumerate() {
            let here = format!("{path}[{i}]");
            let at = p.ops.len();
            p.paths.push(here.clone());
            match s {
                StepDef::Wait(ms) => p.ops.push(Op::Wait(*ms)),
                StepDef::Send { channel, template } => {
                    let addr = CHANNELS
                        .iter()
                        .find(|(c, _)| c == channel)
                        .and_then(|(_, a)| *a);
                    if let Some(a) = addr {
                        self.traits.insert(a.to_string());
                    }
                    self.traits.insert(format!("{channel}_opt_out"));
                    // Positions are patched once every exposed trait is known.
                    p.ops.push(Op::Send {
                        channel: channel.clone(),
                        template: template.clone(),
                        address: None,
                        opt_out: 0,
                    });
                }
                StepDef::UpdateTrait { name, value } => p.ops.push(Op::UpdateTrait {
                    name: name.clone(),
                    value: value.clone(),
                }),
                StepDef::WaitUntil {
                    event,
                    cond,
                    timeout,
                    on_event,
                    on_timeout,
                } => {
                    if let Some(c) = cond {
                        let x = self.cond(c, &format!("{here}.wait_until.where"))?;
                        p.conds.push((at, x));
                    }
                    p.ops.push(Op::WaitUntil {
                        event: event.clone(),
                        cond: None,
                        timeout: *timeout,
                        on_event: 0,
                        on_timeout: 0,
                    });
                    let ev_start = p.ops.len();
                    let j1 = self.block(on_event, &format!("{here}.wait_until.on_event"), p)?;
                    let to_start = p.ops.len();
                    let j2 = self.block(on_timeout, &format!("{here}.wait_until.on_timeout"), p)?;
                    let after = p.ops.len();
                    patch_jumps(p, &[j1, j2], after);
                    if let Op::WaitUntil {
                        on_event,
                        on_timeout,
                        ..
                    } = &mut p.ops[at]
                    {
                        *on_event = ev_start;
                        *on_timeout = to_start;
                    }
                }
                StepDef::Branch { arms, otherwise } => {
                    p.ops.push(Op::Branch {
                        arms: vec![],
                        otherwise: 0,
                    });
                    let mut jumps = vec![];
                    let mut starts = vec![];
                    for (k, (c, steps)) in arms.iter().enumerate() {
                        let seg = self.when(c, &format!("{here}.branch[{k}].when"))?;
                        p.arms.push((at, k, seg));
                        starts.push(p.ops.len());
                        jumps.push(self.block(steps, &format!("{here}.branch[{k}].steps"), p)?);
                    }
                    let else_start = p.ops.len();
                    jumps.push(self.block(
                        otherwise,
                        &format!("{here}.branch[{}].else", arms.len()),
                        p,
                    )?);
                    let after = p.ops.len();
                    patch_jumps(p, &jumps, after);
                    if let Op::Branch { arms, otherwise } = &mut p.ops[at] {
                        *arms = starts.into_iter().map(|s| (0, s)).collect();
                        *otherwise = else_start;
                    }
                }
                StepDef::Split(variants) => {
                    p.ops.push(Op::Split {
                        variants: vec![],
                        total: 0,
                    });
                    let mut jumps = vec![];
                    let mut vs = vec![];
                    let mut cum = 0u64;
                    for (k, (name, weight, steps)) in variants.iter().enumerate() {
                        cum = cum.saturating_add(*weight);
                        let vi = match p.variants.iter().position(|v| v == name) {
                            Some(v) => v,
                            None => {
                                p.variants.push(name.clone());
                                p.variants.len() - 1
                            }
                        };
                        vs.push((vi as u16, cum, p.ops.len()));
                        jumps.push(self.block(steps, &format!("{here}.split[{k}].steps"), p)?);
                    }
                    let after = p.ops.len();
                    patch_jumps(p, &jumps, after);
                    p.ops[at] = Op::Split {
                        variants: vs,
                        total: cum,
                    };
                }
            }
        }
        Ok(())
    }

    /// A nested block, ending with a jump to be patched; returns the jump's index.
    fn block(
        &mut self,
        steps: &[StepDef],
        path: &str,
        p: &mut Program,
    ) -> Result<usize, JourneyError> {
        self.steps(steps, path, p)?;
        p.ops.push(Op::Jump(usize::MAX));
        p.paths.push(format!("{path}.end"));
        Ok(p.ops.len() - 1)
    }
}

fn patch_jumps(p: &mut Program, jumps: &[usize], to: usize) {
    for &j in jumps {
        p.ops[j] = Op::Jump(to);
    }
}

/// Compiles journeys with the segment file they read. Unknown segments are errors here.
pub fn compile_journeys(
    file: &SegmentFile,
    defs: &[JourneyDef],
) -> Result<JourneySet, JourneyError> {
    compile_journeys_over(file, defs, None)
}

/// [`compile_journeys`] over a running plan's slots ([`Plan::compile_over`]): a changed
/// segment file under unchanged journeys. What the file reads that `base` does not
/// maintain is an error (its message lists each).
pub fn compile_journeys_over(
    file: &SegmentFile,
    defs: &[JourneyDef],
    base: Option<&Plan>,
) -> Result<JourneySet, JourneyError> {
    let versions: Vec<JourneyVersion> = defs.iter().cloned().map(JourneyVersion::of_file).collect();
    compile_journey_versions(file, &versions, base, &[])
}

/// Compiles journeys with versions: `versions` in the order they were made (the journey
/// file's, then each change through the API), so that the hidden segments of a later
/// version come after those of every earlier one and a running plan's indices stay.
/// Journeys are indexed by their name's first appearance; each is its latest version,
/// the earlier ones in [`JourneySet::older`]. `traits`: exposed traits to keep exposed
/// (a running set's); exposed traits are numbered in name order, so a set that exposes
/// no other keeps the running set's positions.
pub fn compile_journey_versions(
    file: &SegmentFile,
    versions: &[JourneyVersion],
    base: Option<&Plan>,
    traits: &[String],
) -> Result<JourneySet, JourneyError> {
    let mut b = Builder {
        file,
        hidden: vec![],
        extras: vec![],
        traits: traits.iter().cloned().collect(),
        journey: String::new(),
        prefix: String::new(),
    };
    let mut events = BTreeSet::new();
    // Per journey: entry cond, exit conds, program.
    let mut staged = Vec::new();
    for v in versions {
        let d = &v.def;
        b.journey = d.name.clone();
        b.prefix = match v.version {
            0 | 1 => d.name.clone(),
            n => format!("{}@{n}", d.name),
        };
        let trigger_segment = |b: &Builder, t: &Trigger, path: &str| -> Result<(), JourneyError> {
            match t {
                Trigger::SegmentEntered(s) | Trigger::SegmentExited(s) => b.segment(s, path),
                _ => Ok(()),
            }
        };
        trigger_segment(&b, &d.entry, "entry")?;
        match &d.entry {
            Trigger::Event(e) => {
                events.insert(e.clone());
            }
            Trigger::Api => {
                events.insert(API_TRIGGER_EVENT.to_string());
            }
            _ => {}
        }
        let entry_cond = match &d.entry_cond {
            Some(c) => Some(b.cond(c, "entry.where")?),
            None => None,
        };
        let mut exits = Vec::new();
        for (i, x) in d.exits.iter().enumerate() {
            let path = format!("exit[{i}]");
            trigger_segment(&b, &x.trigger, &path)?;
            if let Trigger::Event(e) = &x.trigger {
                events.insert(e.clone());
            }
            let cond = match &x.cond {
                Some(c) => Some(b.cond(c, &format!("{path}.where"))?),
                None => None,
            };
            exits.push(cond);
        }
        if d.quiet_hours.is_some() {
            b.traits.insert("timezone".into());
        }
        let mut p = Program {
            ops: vec![],
            paths: vec![],
            conds: vec![],
            arms: vec![],
            variants: vec![],
        };
        b.steps(&d.steps, "steps", &mut p)?;
        p.ops.push(Op::End);
        p.paths.push("end".into());
        for op in &p.ops {
            if let Op::WaitUntil { event, .. } = op {
                events.insert(event.clone());
            }
        }
        staged.push((entry_cond, exits, p));
    }

    // Exposed traits are compiled as extras too, so they get slots.
    let trait_names: Vec<String> = b.traits.iter().cloned().collect();
    let first_trait_extra = b.extras.len();
    b.extras
        .extend(trait_names.iter().map(|n| Expr::Trait(n.clone())));
    let visible = file.segments.len();
    let mut all = file.clone();
    all.segments.extend(b.hidden.iter().cloned());
    let (mut plan, extras) = match base {
        None => Plan::compile_with(&all, visible, &b.extras),
        Some(base) => {
            Plan::compile_over(&all, visible, &b.extras, base).map_err(|missing| JourneyError {
                journey: String::new(),
                path: String::new(),
                message: missing.join("; "),
            })?
        }
    };
    plan.exposed = (0..trait_names.len())
        .map(|i| match &extras[first_trait_extra + i] {
            CExpr::Trait(k) => *k,
            _ => unreachable!("a trait name compiles to a trait"),
        })
        .collect();
    let mut trait_pos = vec![None; plan.traits.len()];
    for (pos, &k) in plan.exposed.iter().enumerate() {
        trait_pos[k] = Some(pos as u16);
    }
    let pos_of = |name: &str| trait_names.iter().position(|n| n == name).map(|p| p as u16);
    let seg = |name: &str| plan.segment_index(name).map(|i| i as u16);

    let mut compiled = Vec::new();
    for (v, (entry_cond, exit_conds, mut p)) in versions.iter().zip(staged) {
        let d = &v.def;
        let trig = |t: &Trigger| -> CTrigger {
            match t {
                Trigger::Event(e) => CTrigger::Event(e.clone()),
                Trigger::SegmentEntered(s) => CTrigger::Entered(seg(s).unwrap_or(u16::MAX)),
                Trigger::SegmentExited(s) => CTrigger::Exited(seg(s).unwrap_or(u16::MAX)),
                Trigger::Api => CTrigger::Api,
            }
        };
        for (at, x) in &p.conds {
            if let Op::WaitUntil { cond, .. } = &mut p.ops[*at] {
                *cond = Some(extras[x.0].clone());
            }
        }
        for (at, k, name) in &p.arms {
            if let Op::Branch { arms, .. } = &mut p.ops[*at] {
                arms[*k].0 = seg(name).unwrap_or(u16::MAX);
            }
        }
        for op in &mut p.ops {
            if let Op::Send {
                channel,
                address,
                opt_out,
                ..
            } = op
            {
                let a = CHANNELS
                    .iter()
                    .find(|(c, _)| c == channel)
                    .and_then(|(_, a)| *a);
                *address = a.and_then(pos_of);
                *opt_out = pos_of(&format!("{channel}_opt_out")).unwrap_or(u16::MAX);
            }
        }
        compiled.push(CJourney {
            version: v.version,
            from: v.from,
            restart: v.restart,
            name: d.name.clone(),
            entry: trig(&d.entry),
            entry_cond: entry_cond.map(|x| extras[x.0].clone()),
            reentry: d.reentry,
            exits: d
                .exits
                .iter()
                .zip(exit_conds)
                .map(|(x, c)| CExit {
                    trigger: trig(&x.trigger),
                    cond: c.map(|c| extras[c.0].clone()),
                    goal: x.goal,
                    label: x.trigger.label(),
                })
                .collect(),
            frequency_cap: d.frequency_cap,
            quiet_hours: d.quiet_hours,
            ops: p.ops,
            paths: p.paths,
            variants: p.variants,
        });
    }
    // By name, in order of first appearance; each name's versions by `from` (stable).
    let mut by_name: Vec<Vec<CJourney>> = Vec::new();
    for c in compiled {
        match by_name.iter_mut().find(|v| v[0].name == c.name) {
            Some(v) => v.push(c),
            None => by_name.push(vec![c]),
        }
    }
    let mut journeys = Vec::new();
    let mut older = Vec::new();
    for mut v in by_name {
        v.sort_by_key(|c| c.from);
        journeys.push(v.pop().expect("one version at least"));
        older.push(v);
    }
    let timezone = pos_of("timezone");
    Ok(JourneySet {
        plan,
        journeys,
        older,
        traits: trait_names,
        trait_pos,
        timezone,
        events,
    })
}

fn has_event(e: &Expr) -> bool {
    let mut found = false;
    e.walk(&mut |x| found |= matches!(x, Expr::Event(_)));
    found
}

fn has_agg(e: &Expr) -> bool {
    let mut found = false;
    e.walk(&mut |x| found |= matches!(x, Expr::Agg(_)));
    found
}

fn collect_traits(e: &Expr, out: &mut BTreeSet<String>) {
    e.walk(&mut |x| {
        if let Expr::Trait(n) = x {
            out.insert(n.clone());
        }
    });
}

fn is_boolean(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Cmp(..)
            | Expr::And(..)
            | Expr::Or(..)
            | Expr::Not(..)
            | Expr::IsNull { .. }
            | Expr::InList { .. }
            | Expr::Between { .. }
            | Expr::Like { .. }
            | Expr::InSegment(_)
            | Expr::Lit(Value::Bool(_))
    )
}
