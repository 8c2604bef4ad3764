//! Compiling a checked segment file into a dataflow plan.
//!
//! Owns [`Plan`]: the segments in dependency order, and the *slots* every segment reads:
//! one per distinct aggregate (two segments that write `count(*) FILTER (WHERE event =
//! 'Order Completed')` share one slot), one per trait name, one per static list or
//! warehouse audience, plus two presence slots that define the universe. The per-user
//! state and evaluation over these slots is `state`'s. Split by job: compiling (here),
//! facts (`facts`: snapshot rows and identify writes as slot facts), what evaluation needs
//! (`evaluate`: the event context, type ranks) and `explain`.
//!
//! Invariant: every time-dependence is a `now()` comparison the evaluator can turn into
//! explicit instants (`eval::breakpoints`), so the dataflow never polls a clock.

use std::collections::BTreeMap;

use crate::ast::{AggKind, Aggregate, EventField, Expr, SegmentBody, SegmentFile};
use crate::eval::{mentions_now, CExpr};
use crate::project::Projection;

mod evaluate;
mod explain;
mod facts;
mod remap;

pub(crate) use evaluate::{type_rank, EventCtx};
pub use facts::{FactVal, SnapshotRows};
pub use remap::Remap;

/// Slot of the "has at least one event" presence fact.
pub const SLOT_SEEN: u32 = 0;
/// Slot of the "has a row in the current profile snapshot" presence fact.
pub const SLOT_PROFILE: u32 = 1;
const FIRST_DYNAMIC_SLOT: u32 = 2;

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
    /// What the plan reads of events (paths and traits), for [`Plan::project`].
    pub projection: Projection,
}

struct Compiler<'a> {
    file: &'a SegmentFile,
    aggs: Vec<AggSlot>,
    agg_index: BTreeMap<Aggregate, usize>,
    traits: Vec<(String, Vec<String>)>,
    trait_index: BTreeMap<String, usize>,
    projection: Projection,
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
            Expr::Event(f @ EventField::Path(root, path)) => {
                CExpr::Path(self.projection.path_index(*root, path), f.clone())
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
        let c = Compiler {
            file,
            aggs: vec![],
            agg_index: BTreeMap::new(),
            traits: vec![],
            trait_index: BTreeMap::new(),
            projection: Projection::default(),
            current: String::new(),
        };
        c.finish(visible, extras)
    }

    /// Compiles a changed segment file (and `extras`, as [`Plan::compile_with`]) over
    /// `base`'s slots: `base`'s aggregates, traits and event projection keep their
    /// indices, so state built with `base` and events projected by it are read as they
    /// are. Aggregates no segment reads any more stay (maintained, read by none). Fails
    /// with what the file reads that `base` does not maintain (each as a sentence), or
    /// with a list or audience that is not `base`'s at the same index.
    pub fn compile_over(
        file: &SegmentFile,
        visible: usize,
        extras: &[Expr],
        base: &Plan,
    ) -> Result<(Plan, Vec<CExpr>), Vec<String>> {
        let mut aggs = base.aggs.clone();
        let mut traits = base.traits.clone();
        for a in &mut aggs {
            a.used_by.clear();
        }
        for t in &mut traits {
            t.1.clear();
        }
        let c = Compiler {
            file,
            agg_index: aggs
                .iter()
                .enumerate()
                .map(|(i, a)| (a.agg.clone(), i))
                .collect(),
            aggs,
            trait_index: traits
                .iter()
                .enumerate()
                .map(|(i, t)| (t.0.clone(), i))
                .collect(),
            traits,
            projection: base.projection.clone(),
            current: String::new(),
        };
        let (plan, extras) = c.finish(visible, extras);
        let mut missing: Vec<String> = plan.aggs[base.aggs.len()..]
            .iter()
            .map(remap::new_aggregate)
            .collect();
        missing.extend(
            plan.traits[base.traits.len()..]
                .iter()
                .map(|(name, by)| remap::new_trait(name, by)),
        );
        if plan.projection.paths.len() > base.projection.paths.len() {
            missing.push("an event path no aggregate read before".into());
        }
        let list = |p: &Plan, i: usize| match p.segments.get(i).map(|s| &s.kind) {
            Some(k @ (SegmentKind::List { .. } | SegmentKind::Warehouse { .. })) => Some(k.clone()),
            _ => None,
        };
        for i in 0..plan.segments.len().max(base.segments.len()) {
            if list(&plan, i) != list(base, i) {
                let name = plan
                    .segments
                    .get(i)
                    .or(base.segments.get(i))
                    .map_or("?", |s| &s.name);
                missing.push(format!(
                    "segment '{name}' is or was a list or warehouse audience: those change \
                     only in the segment file"
                ));
            }
        }
        if missing.is_empty() {
            Ok((plan, extras))
        } else {
            Err(missing)
        }
    }
}

impl Compiler<'_> {
    fn finish(self, visible: usize, extras: &[Expr]) -> (Plan, Vec<CExpr>) {
        let mut c = self;
        let file = c.file;
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
        let mut projection = c.projection;
        let trait_base = FIRST_DYNAMIC_SLOT + c.aggs.len() as u32;
        projection.set_traits(
            c.traits
                .iter()
                .enumerate()
                .map(|(i, (name, _))| (name.clone(), trait_base + i as u32)),
        );
        let plan = Plan {
            order,
            refs,
            segments,
            aggs: c.aggs,
            traits: c.traits,
            visible,
            exposed: Vec::new(),
            projection,
        };
        (plan, extras)
    }
}

impl Plan {
    /// Number of fact slots: presence, aggregates, traits, lists and audiences. The
    /// segment state keeps slot numbers in 16 bits, so loaders refuse plans with more
    /// than `u16::MAX`.
    pub fn slot_count(&self) -> usize {
        let lists = self
            .segments
            .iter()
            .filter(|s| {
                matches!(
                    s.kind,
                    SegmentKind::List { .. } | SegmentKind::Warehouse { .. }
                )
            })
            .count();
        FIRST_DYNAMIC_SLOT as usize + self.aggs.len() + self.traits.len() + lists
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

    /// Whether `name` is one of the segments the user declared (not a journey's hidden
    /// condition).
    pub fn visible_name(&self, name: &str) -> bool {
        self.segments[..self.visible.min(self.segments.len())]
            .iter()
            .any(|s| s.name == name)
    }

    /// Index of a segment by name.
    pub fn segment_index(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| s.name == name)
    }

    /// Whether aggregate `i` is kept as a running value (see `state`): every aggregate
    /// without a time window except counts, which keep a counter or a distinct set.
    pub fn keeps_running_value(&self, i: usize) -> bool {
        let a = &self.aggs[i];
        !a.temporal && !matches!(a.agg.kind, AggKind::Count)
    }

    /// The trait index of a trait fact slot.
    pub fn trait_of_slot(&self, slot: u32) -> usize {
        (slot - FIRST_DYNAMIC_SLOT) as usize - self.aggs.len()
    }
}
