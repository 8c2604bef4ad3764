//! Compiling a checked segment file into a dataflow plan.
//!
//! Owns [`Plan`]: the segments in dependency order, and the *slots* every segment reads:
//! one per distinct aggregate (two segments that write `count(*) FILTER (WHERE event =
//! 'Order Completed')` share one slot), one per trait name, one per static list or
//! warehouse audience, plus two presence slots that define the universe. Also owns the
//! two pure functions the dataflow runs: [`Plan::event_facts`] (an event -> the facts it
//! contributes, each with the interval of time during which it counts) and
//! [`Plan::evaluate_user`] (a user's facts -> the intervals of time during which the user
//! is in each segment).
//!
//! Invariant: every time-dependence is expressed as explicit instants in facts and
//! membership intervals, so the dataflow never polls a clock.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::ast::{AggKind, Aggregate, EventField, Expr, SegmentBody, SegmentFile};
use crate::eval::{breakpoints, eval, eval_ref, mentions_now, true_intervals, CExpr, Context};
use crate::event::Event;
use crate::time::{to_time, Time};
use crate::value::Value;

/// Slot of the "has at least one event" presence fact.
pub const SLOT_SEEN: u32 = 0;
/// Slot of the "has a row in the current profile snapshot" presence fact.
pub const SLOT_PROFILE: u32 = 1;
const FIRST_DYNAMIC_SLOT: u32 = 2;

/// The value part of a fact, as stored in the per-user arrangement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FactVal {
    /// Presence; for counts, the multiplicity is the count.
    Unit,
    /// A value of an aggregate's argument (sum, avg, min, max, count distinct).
    Val(Value),
    /// `(timestamp, message_id, x)` for first/last.
    Ordered(i64, String, Value),
    /// A profile snapshot cell (written at the current snapshot's instant).
    Snap(Value),
    /// An identify trait write; `fresh` when it is at or after the current snapshot's instant.
    Write {
        /// Whether the write is at or after the current snapshot's instant.
        fresh: bool,
        /// The write's instant.
        ts: i64,
        /// Its message id (tie-break between writes at the same instant).
        msg: String,
        /// The written value.
        val: Value,
    },
}

/// A fact with the interval of dataflow time during which it counts: `[from, until)`.
pub type TimedFact = (String, (u32, FactVal), Time, Time);

/// The segments a user is in, as intervals: `(segment index, from, until)`, `until ==
/// Time::MAX` meaning for ever. Sorted.
pub type Membership = Vec<(u16, Time, Time)>;

/// How a segment's membership is defined, after compilation.
#[derive(Clone, Debug, PartialEq)]
pub enum SegmentKind {
    /// A compiled boolean expression over the user row.
    Expr(CExpr),
    /// A static list; the membership fact lives in the given slot.
    List {
        /// Fact slot of the list membership.
        slot: u32,
        /// Where the list is read from.
        url: String,
    },
    /// A warehouse audience: `herald run` runs the query on its schedule and feeds each
    /// result's difference from the last good one as membership facts in the given slot
    /// (replay does not run warehouse queries).
    Warehouse {
        /// Fact slot of the audience membership.
        slot: u32,
        /// The SQL query.
        query: String,
        /// Refresh period in ms.
        refresh_ms: i64,
    },
}

/// One compiled segment.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentPlan {
    /// Its name.
    pub name: String,
    /// Its definition.
    pub kind: SegmentKind,
    /// The source expression, for display.
    pub source: Option<Expr>,
}

/// One distinct aggregate, shared by every segment that uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct AggSlot {
    /// The aggregate as written.
    pub agg: Aggregate,
    /// Its compiled argument.
    pub arg: Option<CExpr>,
    /// Its compiled FILTER.
    pub filter: Option<CExpr>,
    /// Whether the FILTER depends on now() (so facts expire or start later).
    pub temporal: bool,
    /// Names of the segments that read it.
    pub used_by: Vec<String>,
}

/// A compiled segment file.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Segments in file order.
    pub segments: Vec<SegmentPlan>,
    /// Segment indices in evaluation order (every `in_segment` target before its readers).
    pub order: Vec<usize>,
    /// Each segment's direct `in_segment` targets.
    pub refs: Vec<Vec<usize>>,
    /// Distinct aggregates.
    pub aggs: Vec<AggSlot>,
    /// Distinct trait names, with the segments that read each.
    pub traits: Vec<(String, Vec<String>)>,
    /// How many segments the user declared: the first `visible` ones. Those after are
    /// hidden conditions that journeys read; they are never reported.
    pub visible: usize,
    /// Trait indices whose current values the dataflow reports per user (for journeys).
    pub exposed: Vec<usize>,
}

struct Compiler<'a> {
    file: &'a SegmentFile,
    aggs: Vec<AggSlot>,
    agg_index: BTreeMap<Aggregate, usize>,
    traits: Vec<(String, Vec<String>)>,
    trait_index: BTreeMap<String, usize>,
    current: String,
}

impl Compiler<'_> {
    fn segment_index(&self, name: &str) -> usize {
        self.file
            .segments
            .iter()
            .position(|s| s.name == name)
            .unwrap_or(usize::MAX)
    }

    fn compile(&mut self, e: &Expr) -> CExpr {
        let b = |c: &mut Self, x: &Expr| Box::new(c.compile(x));
        match e {
            Expr::Lit(v) => CExpr::Lit(v.clone()),
            Expr::Interval(ms) => CExpr::Interval(*ms),
            Expr::Now(off) => CExpr::Now(*off),
            Expr::UserId => CExpr::UserId,
            Expr::Trait(name) => {
                let idx = match self.trait_index.get(name) {
                    Some(i) => *i,
                    None => {
                        self.traits.push((name.clone(), vec![]));
                        self.trait_index.insert(name.clone(), self.traits.len() - 1);
                        self.traits.len() - 1
                    }
                };
                let users = &mut self.traits[idx].1;
                if !users.contains(&self.current) {
                    users.push(self.current.clone());
                }
                CExpr::Trait(idx)
            }
            Expr::Event(f) => CExpr::Field(f.clone()),
            Expr::Agg(agg) => {
                let idx = match self.agg_index.get(&**agg) {
                    Some(i) => *i,
                    None => {
                        let arg = agg.arg.as_ref().map(|a| self.compile(a));
                        let filter = agg.filter.as_ref().map(|f| self.compile(f));
                        let temporal = filter.as_ref().is_some_and(mentions_now);
                        self.aggs.push(AggSlot {
                            agg: (**agg).clone(),
                            arg,
                            filter,
                            temporal,
                            used_by: vec![],
                        });
                        self.agg_index.insert((**agg).clone(), self.aggs.len() - 1);
                        self.aggs.len() - 1
                    }
                };
                let users = &mut self.aggs[idx].used_by;
                if !users.contains(&self.current) {
                    users.push(self.current.clone());
                }
                CExpr::Agg(idx)
            }
            Expr::Cmp(op, x, y) => CExpr::Cmp(*op, b(self, x), b(self, y)),
            Expr::Arith(op, x, y) => CExpr::Arith(*op, b(self, x), b(self, y)),
            Expr::Neg(x) => CExpr::Neg(b(self, x)),
            Expr::And(x, y) => CExpr::And(b(self, x), b(self, y)),
            Expr::Or(x, y) => CExpr::Or(b(self, x), b(self, y)),
            Expr::Not(x) => CExpr::Not(b(self, x)),
            Expr::IsNull { expr, negated } => CExpr::IsNull(b(self, expr), *negated),
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let x = b(self, expr);
                let l = list.iter().map(|i| self.compile(i)).collect();
                CExpr::InList(x, l, *negated)
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => CExpr::Between(b(self, expr), b(self, low), b(self, high), *negated),
            Expr::Like {
                expr,
                pattern,
                negated,
            } => CExpr::Like(b(self, expr), b(self, pattern), *negated),
            Expr::Coalesce(list) => CExpr::Coalesce(list.iter().map(|i| self.compile(i)).collect()),
            Expr::Lower(x) => CExpr::Lower(b(self, x)),
            Expr::Upper(x) => CExpr::Upper(b(self, x)),
            Expr::InSegment(name) => CExpr::InSegment(self.segment_index(name)),
            Expr::HashBucket { key, salt, n } => CExpr::HashBucket(b(self, key), salt.clone(), *n),
        }
    }
}

/// Segment indices ordered so that every `in_segment` target comes before its readers
/// (ties keep file order), and each segment's direct `in_segment` targets. The parser has
/// already rejected cycles.
fn dependency_order(file: &SegmentFile) -> (Vec<usize>, Vec<Vec<usize>>) {
    let n = file.segments.len();
    let deps: Vec<Vec<usize>> = file
        .segments
        .iter()
        .map(|s| {
            let mut names = vec![];
            if let SegmentBody::Expr(e) = &s.body {
                e.walk(&mut |x| {
                    if let Expr::InSegment(n) = x {
                        names.push(n.clone());
                    }
                });
            }
            names
                .iter()
                .filter_map(|name| file.segments.iter().position(|t| &t.name == name))
                .collect()
        })
        .collect();
    let mut order = Vec::with_capacity(n);
    let mut state = vec![0u8; n]; // 0 new, 1 visiting, 2 done
    fn visit(i: usize, deps: &[Vec<usize>], state: &mut [u8], order: &mut Vec<usize>) {
        if state[i] != 0 {
            return;
        }
        state[i] = 1;
        for &d in &deps[i] {
            visit(d, deps, state, order);
        }
        state[i] = 2;
        order.push(i);
    }
    for i in 0..n {
        visit(i, &deps, &mut state, &mut order);
    }
    (order, deps)
}

/// An event as FILTERs and arguments see it; its scalar fields are materialised once, so
/// every aggregate's FILTER borrows them instead of copying.
struct EventCtx<'a> {
    ev: &'a Event,
    event: Value,
    kind: Value,
}

impl<'a> EventCtx<'a> {
    fn new(ev: &'a Event) -> Self {
        EventCtx {
            ev,
            event: ev.field(&EventField::Event),
            kind: ev.field(&EventField::Type),
        }
    }
}

impl Context for EventCtx<'_> {
    fn field(&self, field: &EventField) -> Cow<'_, Value> {
        match field {
            EventField::Event => Cow::Borrowed(&self.event),
            EventField::Type => Cow::Borrowed(&self.kind),
            other => Cow::Owned(self.ev.field(other)),
        }
    }
}

/// A user's resolved row: aggregate and trait values and the segments evaluated so far.
struct UserCtx<'a> {
    user: &'a str,
    aggs: Vec<Value>,
    traits: Vec<Value>,
    /// Membership intervals of the segments evaluated so far.
    intervals: Vec<Vec<(Time, Time)>>,
    /// The instant being evaluated, for `in_segment`.
    now: std::cell::Cell<i64>,
}

impl Context for UserCtx<'_> {
    fn user_id(&self) -> Cow<'_, Value> {
        Cow::Owned(Value::Str(self.user.to_string()))
    }
    fn trait_value(&self, slot: usize) -> Cow<'_, Value> {
        self.traits
            .get(slot)
            .map(Cow::Borrowed)
            .unwrap_or(Cow::Owned(Value::Null))
    }
    fn agg(&self, slot: usize) -> Cow<'_, Value> {
        self.aggs
            .get(slot)
            .map(Cow::Borrowed)
            .unwrap_or(Cow::Owned(Value::Null))
    }
    fn in_segment(&self, segment: usize) -> bool {
        let now = self.now.get().max(0) as Time;
        self.intervals
            .get(segment)
            .is_some_and(|iv| iv.iter().any(|&(a, b)| a <= now && now < b))
    }
}

/// Rank of a type for min/max/sum/avg over values of mixed types: only values of the
/// highest-ranked type present take part (numbers, then timestamps, strings, booleans).
pub(crate) fn type_rank(v: &Value) -> u8 {
    match v {
        Value::Num(_) => 4,
        Value::Ts(_) => 3,
        Value::Str(_) => 2,
        Value::Bool(_) => 1,
        Value::Null => 0,
    }
}

impl Plan {
    /// Compiles a checked segment file.
    pub fn compile(file: &SegmentFile) -> Plan {
        Plan::compile_with(file, file.segments.len(), &[]).0
    }

    /// Compiles a segment file whose segments after the first `visible` are hidden,
    /// together with `extras`: expressions over the user (and an event) that share the
    /// plan's slots; they must not hold aggregates. Returns the plan and the compiled
    /// extras.
    pub fn compile_with(file: &SegmentFile, visible: usize, extras: &[Expr]) -> (Plan, Vec<CExpr>) {
        let mut c = Compiler {
            file,
            aggs: vec![],
            agg_index: BTreeMap::new(),
            traits: vec![],
            trait_index: BTreeMap::new(),
            current: String::new(),
        };
        let mut lists = 0u32;
        let mut segments = Vec::with_capacity(file.segments.len());
        for s in &file.segments {
            c.current = s.name.clone();
            let (kind, source) = match &s.body {
                SegmentBody::Expr(e) => (SegmentKind::Expr(c.compile(e)), Some(e.clone())),
                SegmentBody::Csv { url } => {
                    lists += 1;
                    (
                        SegmentKind::List {
                            slot: lists - 1, // renumbered below, once aggregates are known
                            url: url.clone(),
                        },
                        None,
                    )
                }
                SegmentBody::Warehouse { query, refresh_ms } => {
                    lists += 1;
                    (
                        SegmentKind::Warehouse {
                            slot: lists - 1, // renumbered below, like a list's
                            query: query.clone(),
                            refresh_ms: *refresh_ms,
                        },
                        None,
                    )
                }
            };
            segments.push(SegmentPlan {
                name: s.name.clone(),
                kind,
                source,
            });
        }
        c.current = "journeys".into();
        let extras: Vec<CExpr> = extras.iter().map(|e| c.compile(e)).collect();
        let list_base = FIRST_DYNAMIC_SLOT + (c.aggs.len() + c.traits.len()) as u32;
        for s in &mut segments {
            if let SegmentKind::List { slot, .. } | SegmentKind::Warehouse { slot, .. } =
                &mut s.kind
            {
                *slot += list_base;
            }
        }
        let (order, refs) = dependency_order(file);
        let plan = Plan {
            order,
            refs,
            segments,
            aggs: c.aggs,
            traits: c.traits,
            visible,
            exposed: Vec::new(),
        };
        (plan, extras)
    }

    /// Fact slot of aggregate `i`.
    pub fn agg_slot(&self, i: usize) -> u32 {
        FIRST_DYNAMIC_SLOT + i as u32
    }

    /// Fact slot of trait `i`.
    pub fn trait_slot(&self, i: usize) -> u32 {
        FIRST_DYNAMIC_SLOT + (self.aggs.len() + i) as u32
    }

    /// The trait index of a trait name, if any segment reads it.
    pub fn trait_index(&self, name: &str) -> Option<usize> {
        self.traits.iter().position(|(n, _)| n == name)
    }

    /// Index of a segment by name.
    pub fn segment_index(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| s.name == name)
    }

    /// The facts one accepted event contributes, each with the interval of time during
    /// which it counts (from the event's timestamp on, narrowed by temporal FILTERs).
    pub fn event_facts(&self, ev: &Event, out: &mut Vec<TimedFact>) {
        let ctx = EventCtx::new(ev);
        let start = to_time(ev.timestamp);
        out.push((
            ev.user.clone(),
            (SLOT_SEEN, FactVal::Unit),
            start,
            Time::MAX,
        ));
        let mut points = Vec::new();
        for (i, slot) in self.aggs.iter().enumerate() {
            if self.accumulated_at_door(i) {
                continue;
            }
            let intervals = match &slot.filter {
                None => vec![(start, Time::MAX)],
                Some(f) if !slot.temporal => {
                    if *eval_ref(f, &ctx, ev.timestamp) == Value::Bool(true) {
                        vec![(start, Time::MAX)]
                    } else {
                        continue;
                    }
                }
                Some(f) => {
                    points.clear();
                    breakpoints(f, &ctx, &mut points);
                    true_intervals(start, &mut points, |now| {
                        *eval_ref(f, &ctx, now) == Value::Bool(true)
                    })
                }
            };
            if intervals.is_empty() {
                continue;
            }
            let arg = slot
                .arg
                .as_ref()
                .map(|a| eval(a, &ctx, ev.timestamp))
                .unwrap_or(Value::Null);
            let val = match slot.agg.kind {
                AggKind::Count if slot.arg.is_none() => FactVal::Unit,
                AggKind::Count if arg.is_null() => continue,
                AggKind::Count if slot.agg.distinct => FactVal::Val(arg),
                AggKind::Count => FactVal::Unit,
                AggKind::Sum | AggKind::Avg | AggKind::Min | AggKind::Max => {
                    if arg.is_null() {
                        continue;
                    }
                    FactVal::Val(arg)
                }
                AggKind::First | AggKind::Last => {
                    FactVal::Ordered(ev.timestamp, ev.message_id.clone(), arg)
                }
            };
            let slot = self.agg_slot(i);
            for (from, until) in intervals {
                out.push((ev.user.clone(), (slot, val.clone()), from, until));
            }
        }
    }

    /// Whether aggregate `i` is kept as a running value at the door (see `door`): every
    /// aggregate without a time window except counts, which consolidate by themselves.
    pub fn accumulated_at_door(&self, i: usize) -> bool {
        let a = &self.aggs[i];
        !a.temporal && !matches!(a.agg.kind, AggKind::Count)
    }

    /// For the aggregates kept at the door (`accumulated`, indices into `aggs`): the
    /// position in `accumulated` and the argument value of each whose FILTER holds for
    /// the event (NULL argument for `count(*)`).
    pub fn door_args(&self, ev: &Event, accumulated: &[usize], out: &mut Vec<(usize, Value)>) {
        let ctx = EventCtx::new(ev);
        for (k, &i) in accumulated.iter().enumerate() {
            let slot = &self.aggs[i];
            let holds = match &slot.filter {
                None => true,
                Some(f) => *eval_ref(f, &ctx, ev.timestamp) == Value::Bool(true),
            };
            if holds {
                let v = slot
                    .arg
                    .as_ref()
                    .map(|a| eval(a, &ctx, ev.timestamp))
                    .unwrap_or(Value::Null);
                out.push((k, v));
            }
        }
    }

    /// The trait index of a trait fact slot.
    pub fn trait_of_slot(&self, slot: u32) -> usize {
        (slot - FIRST_DYNAMIC_SLOT) as usize - self.aggs.len()
    }

    /// The trait writes of an identify event that some segment reads: `(trait slot, value)`.
    pub fn trait_writes(&self, ev: &Event) -> Vec<(u32, Value)> {
        ev.trait_writes()
            .into_iter()
            .filter_map(|(name, v)| self.trait_index(&name).map(|i| (self.trait_slot(i), v)))
            .collect()
    }

    /// Evaluates every segment for one user from the user's consolidated facts (sorted by
    /// slot, as an arrangement holds them), as intervals of time. A user outside the
    /// universe (no event, no profile row) is in no expression segment.
    pub fn evaluate_user(&self, user: &str, facts: &[(&(u32, FactVal), isize)]) -> Membership {
        self.evaluate(user, facts, None)
    }

    /// [`Plan::evaluate_user`], also pushing the current value of every exposed trait
    /// (`(position in exposed, value)`, NULL values left out) to `exposed`.
    pub fn evaluate(
        &self,
        user: &str,
        facts: &[(&(u32, FactVal), isize)],
        exposed: Option<&mut Vec<(u16, Value)>>,
    ) -> Membership {
        let n_aggs = self.aggs.len();
        let n_traits = self.traits.len();
        let mut seen = false;
        let mut lists: Vec<u32> = Vec::new();
        // Per aggregate: the facts of its slot.
        let mut per_slot: Vec<&[(&(u32, FactVal), isize)]> = vec![&[]; n_aggs + n_traits];
        let mut i = 0;
        while i < facts.len() {
            let slot = facts[i].0 .0;
            let mut j = i;
            while j < facts.len() && facts[j].0 .0 == slot {
                j += 1;
            }
            let live = facts[i..j].iter().any(|(_, r)| *r > 0);
            if slot == SLOT_SEEN || slot == SLOT_PROFILE {
                seen |= live;
            } else {
                let k = (slot - FIRST_DYNAMIC_SLOT) as usize;
                if k < n_aggs + n_traits {
                    per_slot[k] = &facts[i..j];
                } else if live {
                    lists.push(slot);
                }
            }
            i = j;
        }
        let aggs: Vec<Value> = (0..n_aggs)
            .map(|k| aggregate(&self.aggs[k].agg, per_slot[k]))
            .collect();
        let traits: Vec<Value> = (0..n_traits)
            .map(|k| resolve_trait(per_slot[n_aggs + k]))
            .collect();
        if let Some(out) = exposed {
            for (i, &k) in self.exposed.iter().enumerate() {
                if !traits[k].is_null() {
                    out.push((i as u16, traits[k].clone()));
                }
            }
        }
        let mut ctx = UserCtx {
            user,
            aggs,
            traits,
            intervals: vec![Vec::new(); self.segments.len()],
            now: std::cell::Cell::new(0),
        };
        // Each segment is evaluated only at the instants where it can change: its own
        // now() breakpoints and the boundaries of the segments it references (evaluated
        // first, in dependency order).
        let mut points = Vec::new();
        let mut out: Membership = Vec::new();
        for &si in &self.order {
            let iv = match &self.segments[si].kind {
                SegmentKind::Expr(e) if seen => {
                    points.clear();
                    breakpoints(e, &ctx, &mut points);
                    for &d in &self.refs[si] {
                        for &(a, b) in &ctx.intervals[d] {
                            points.push(a as i64);
                            if b != Time::MAX {
                                points.push(b as i64);
                            }
                        }
                    }
                    true_intervals(0, &mut points, |now| {
                        ctx.now.set(now);
                        *eval_ref(e, &ctx, now) == Value::Bool(true)
                    })
                }
                SegmentKind::Expr(_) => Vec::new(),
                SegmentKind::List { slot, .. } | SegmentKind::Warehouse { slot, .. }
                    if lists.contains(slot) =>
                {
                    vec![(0, Time::MAX)]
                }
                SegmentKind::List { .. } | SegmentKind::Warehouse { .. } => Vec::new(),
            };
            out.extend(iv.iter().map(|&(a, b)| (si as u16, a, b)));
            ctx.intervals[si] = iv;
        }
        out.sort_unstable();
        out
    }

    /// A human-readable plan: slots and which segments share them.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "segments ({}), in evaluation order:",
            self.segments.len()
        );
        for &i in &self.order {
            let seg = &self.segments[i];
            match &seg.kind {
                SegmentKind::Expr(_) => {
                    let aggs: Vec<String> = self
                        .aggs
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| a.used_by.contains(&seg.name))
                        .map(|(k, _)| format!("a{k}"))
                        .collect();
                    let traits: Vec<String> = self
                        .traits
                        .iter()
                        .filter(|(_, u)| u.contains(&seg.name))
                        .map(|(n, _)| n.clone())
                        .collect();
                    let expr = seg
                        .source
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    let _ = writeln!(s, "  {}: {}", seg.name, expr);
                    let _ = writeln!(
                        s,
                        "      reads aggregates [{}], traits [{}]",
                        aggs.join(", "),
                        traits.join(", ")
                    );
                }
                SegmentKind::List { url, .. } => {
                    let _ = writeln!(s, "  {}: static list from {url}", seg.name);
                }
                SegmentKind::Warehouse {
                    query, refresh_ms, ..
                } => {
                    let _ = writeln!(
                        s,
                        "  {}: warehouse query {query:?} every {} s",
                        seg.name,
                        refresh_ms / 1000
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "aggregates ({}), computed once per user from the shared events_by_user arrangement:",
            self.aggs.len()
        );
        for (k, a) in self.aggs.iter().enumerate() {
            let shared = if a.used_by.len() > 1 {
                "  [shared]"
            } else {
                ""
            };
            let window = if a.temporal {
                "  [temporal: facts enter/leave at exact instants]"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  a{k} = {}  used by {}{shared}{window}",
                Expr::Agg(Box::new(a.agg.clone())),
                a.used_by.join(", ")
            );
        }
        let _ = writeln!(s, "traits ({}):", self.traits.len());
        for (name, users) in &self.traits {
            let _ = writeln!(s, "  {name}  used by {}", users.join(", "));
        }
        s
    }
}

/// Computes an aggregate from its slot's consolidated facts.
fn aggregate(agg: &Aggregate, facts: &[(&(u32, FactVal), isize)]) -> Value {
    let live = facts.iter().filter(|(_, r)| *r > 0);
    match agg.kind {
        AggKind::Count => {
            if agg.distinct {
                Value::num(live.count() as f64)
            } else {
                Value::num(live.map(|(_, r)| *r as f64).sum())
            }
        }
        AggKind::Sum | AggKind::Avg | AggKind::Min | AggKind::Max => {
            let vals: Vec<(&Value, isize)> = live
                .filter_map(|((_, f), r)| match f {
                    FactVal::Val(v) => Some((v, *r)),
                    _ => None,
                })
                .collect();
            let Some(rank) = vals.iter().map(|(v, _)| type_rank(v)).max() else {
                return Value::Null;
            };
            let mut of_rank = vals.into_iter().filter(|(v, _)| type_rank(v) == rank);
            match agg.kind {
                AggKind::Min => of_rank
                    .next()
                    .map(|(v, _)| v.clone())
                    .unwrap_or(Value::Null),
                AggKind::Max => of_rank
                    .next_back()
                    .map(|(v, _)| v.clone())
                    .unwrap_or(Value::Null),
                _ if rank != 4 => Value::Null,
                AggKind::Sum => Value::num(
                    of_rank
                        .map(|(v, r)| v.as_f64().unwrap_or(0.0) * r as f64)
                        .sum(),
                ),
                _ => {
                    let (sum, n) = of_rank.fold((0.0, 0.0), |(s, n), (v, r)| {
                        (s + v.as_f64().unwrap_or(0.0) * r as f64, n + r as f64)
                    });
                    Value::num(sum / n)
                }
            }
        }
        AggKind::First | AggKind::Last => {
            let mut ordered = live.filter_map(|((_, f), _)| match f {
                FactVal::Ordered(_, _, v) => Some(v),
                _ => None,
            });
            let v = if agg.kind == AggKind::First {
                ordered.next()
            } else {
                ordered.next_back()
            };
            v.cloned().unwrap_or(Value::Null)
        }
    }
}

/// A trait's current value: the latest identify write if it is at or after the current
/// snapshot, else the snapshot's cell, else the latest (older) identify write, else NULL.
fn resolve_trait(facts: &[(&(u32, FactVal), isize)]) -> Value {
    let mut snap: Option<&Value> = None;
    let mut latest: Option<(i64, &str, bool, &Value)> = None;
    for ((_, f), r) in facts {
        if *r <= 0 {
            continue;
        }
        match f {
            FactVal::Snap(v) => snap = Some(v),
            FactVal::Write {
                fresh,
                ts,
                msg,
                val,
            } if latest.is_none_or(|(t, m, _, _)| (*ts, msg.as_str()) > (t, m)) => {
                latest = Some((*ts, msg, *fresh, val));
            }
            _ => {}
        }
    }
    match (latest, snap) {
        (Some((_, _, true, v)), _) => v.clone(),
        (_, Some(v)) => v.clone(),
        (Some((_, _, false, v)), None) => v.clone(),
        (None, None) => Value::Null,
    }
}

/// A profile snapshot's rows: user key -> trait name -> value (NULL cells absent).
pub type SnapshotRows = BTreeMap<String, BTreeMap<String, Value>>;

impl Plan {
    /// The facts one user's snapshot row contributes, sorted: a presence fact and a cell
    /// fact for each trait some segment reads. Diffing a user's facts in two snapshots
    /// gives the updates that move the dataflow from one to the next.
    pub fn snapshot_facts(&self, cells: &BTreeMap<String, Value>) -> Vec<(u32, FactVal)> {
        let mut out = vec![(SLOT_PROFILE, FactVal::Unit)];
        for (name, v) in cells {
            if v.is_null() {
                continue;
            }
            if let Some(i) = self.trait_index(name) {
                out.push((self.trait_slot(i), FactVal::Snap(v.clone())));
            }
        }
        out.sort_unstable();
        out
    }
}
