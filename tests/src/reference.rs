//! The reference evaluator: a deliberately naive, non-incremental reading of
//! `shared/spec/segments.md`, used as the oracle in property tests of the engine.
//!
//! Owns [`Snapshot`], [`World`] and [`members_at`]. For one instant it rebuilds every
//! user's row from scratch (current snapshot + identify writes, events up to the instant)
//! and walks the checked syntax tree directly. It shares only data types with
//! `herald-operators` (the AST, [`Value`], [`Event`] field lookups and time helpers),
//! never its evaluation code, so that a bug in one is not silently a bug in both.
//!
//! Choices where the spec is silent (see also the crate docs):
//! - Traits: the latest write by timestamp among the current snapshot's cells (written at
//!   the snapshot's `at`) and identify writes at or before `now`; on equal timestamps the
//!   event beats the snapshot, and between identify events with equal timestamps the larger
//!   `message_id` (byte order) wins. A NULL snapshot cell writes NULL at the snapshot's
//!   instant, as an identify write of JSON `null` does at the event's. If several
//!   snapshots share the latest `at`, the last one in [`World::snapshots`] is current.
//! - A non-boolean value where a condition is expected is NULL (unknown).
//! - `sum`/`avg` use only number values (strings such as `"12.5"` are skipped);
//!   `min`/`max` over mixed types use only the values of the highest-ranked type present
//!   (numbers, then timestamps, strings, booleans).
//! - `count(DISTINCT x)` counts distinct non-NULL values by value identity (the number 1
//!   and the string `'1'` are two values).
//! - Arithmetic whose result is not finite is NULL, like division by zero.
//!   `x ± INTERVAL` works on timestamps and on strings holding RFC 3339 instants.
//! - `hash_bucket`'s key as a string: strings as they are, whole numbers as integers
//!   (`42`), other numbers in shortest round-trip form,
//!   booleans as `true`/`false`, timestamps as RFC 3339 with milliseconds.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use herald_operators::ast::{
    AggKind, Aggregate, ArithOp, CmpOp, Expr, SegmentBody, SegmentDef, SegmentFile,
};
use herald_operators::event::Event;
use herald_operators::time::format_rfc3339_ms;
use herald_operators::value::Value;

/// A profile snapshot as loaded: every row is written at `at`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// When the snapshot takes effect, ms since the epoch.
    pub at: i64,
    /// User key -> trait name -> value.
    pub rows: BTreeMap<String, BTreeMap<String, Value>>,
}

/// Everything the engine is fed, in the form the reference reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct World {
    /// Accepted, deduplicated events, in any order.
    pub events: Vec<Event>,
    /// Profile snapshots, in any order (the current one at `now` is the latest with
    /// `at <= now`).
    pub snapshots: Vec<Snapshot>,
    /// Segment name -> the user ids of its CSV list (for `FROM CSV` segments).
    pub csv_lists: BTreeMap<String, BTreeSet<String>>,
}

/// The members of every segment of `file` at instant `now` (ms): segment name -> user ids.
/// Every segment has an entry, possibly empty. Warehouse segments are always empty
/// (warehouses are not part of replay); CSV segments are their list, universe or not.
pub fn members_at(
    file: &SegmentFile,
    world: &World,
    now: i64,
) -> BTreeMap<String, BTreeSet<String>> {
    let snapshot = current_snapshot(world, now);
    let mut events: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in world.events.iter().filter(|e| e.timestamp <= now) {
        events.entry(e.user.as_str()).or_default().push(e);
    }
    for list in events.values_mut() {
        list.sort_by(|a, b| event_order(a, b));
    }
    let mut universe: BTreeSet<&str> = events.keys().copied().collect();
    if let Some(s) = snapshot {
        universe.extend(s.rows.keys().map(String::as_str));
    }
    let defs: HashMap<&str, &SegmentDef> =
        file.segments.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = file
        .segments
        .iter()
        .map(|d| (d.name.clone(), BTreeSet::new()))
        .collect();
    for user in universe {
        let row = UserRow {
            user,
            events: events.get(user).map(Vec::as_slice).unwrap_or(&[]),
            traits: traits_of(user, snapshot, events.get(user).map(Vec::as_slice), now),
        };
        let mut ev = Evaluator {
            defs: &defs,
            world,
            now,
            row: &row,
            memo: HashMap::new(),
        };
        for def in &file.segments {
            if matches!(def.body, SegmentBody::Expr(_)) && ev.member(&def.name) {
                if let Some(set) = out.get_mut(&def.name) {
                    set.insert(user.to_string());
                }
            }
        }
    }
    for def in &file.segments {
        if matches!(def.body, SegmentBody::Csv { .. }) {
            if let (Some(list), Some(set)) =
                (world.csv_lists.get(&def.name), out.get_mut(&def.name))
            {
                set.extend(list.iter().cloned());
            }
        }
    }
    out
}

/// The snapshot in effect at `now`: the latest with `at <= now` (the last of equals).
fn current_snapshot(world: &World, now: i64) -> Option<&Snapshot> {
    let mut best: Option<&Snapshot> = None;
    for s in world.snapshots.iter().filter(|s| s.at <= now) {
        if best.is_none_or(|b| s.at >= b.at) {
            best = Some(s);
        }
    }
    best
}

/// The spec's event order: (`timestamp`, `message_id`).
fn event_order(a: &Event, b: &Event) -> Ordering {
    (a.timestamp, a.message_id.as_str()).cmp(&(b.timestamp, b.message_id.as_str()))
}

/// A user's current traits at `now`. `events` are the user's events at or before `now`,
/// sorted by (`timestamp`, `message_id`).
fn traits_of(
    user: &str,
    snapshot: Option<&Snapshot>,
    events: Option<&[&Event]>,
    now: i64,
) -> BTreeMap<String, Value> {
    // name -> (written at, value)
    let mut latest: BTreeMap<String, (i64, Value)> = BTreeMap::new();
    if let Some(row) = snapshot.and_then(|s| s.rows.get(user).map(|r| (s.at, r))) {
        let (at, cells) = row;
        // A NULL cell writes NULL at the snapshot's instant, like any other value.
        for (name, v) in cells {
            latest.insert(name.clone(), (at, v.clone()));
        }
    }
    for e in events.unwrap_or(&[]).iter().filter(|e| e.timestamp <= now) {
        // Ascending (timestamp, message_id): `>=` lets the event beat a snapshot cell of
        // the same instant, and a later message id beat an earlier one.
        for (name, v) in e.trait_writes() {
            let replace = latest.get(&name).is_none_or(|(t, _)| e.timestamp >= *t);
            if replace {
                latest.insert(name, (e.timestamp, v));
            }
        }
    }
    latest.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

/// One user's data at the evaluation instant.
struct UserRow<'a> {
    user: &'a str,
    /// Events at or before `now`, in (`timestamp`, `message_id`) order.
    events: &'a [&'a Event],
    traits: BTreeMap<String, Value>,
}

/// Evaluates segments for one user at one instant, memoizing `in_segment`.
struct Evaluator<'a> {
    defs: &'a HashMap<&'a str, &'a SegmentDef>,
    world: &'a World,
    now: i64,
    row: &'a UserRow<'a>,
    memo: HashMap<String, bool>,
}

/// What names refer to while evaluating: the user, or one event inside an aggregate.
#[derive(Clone, Copy)]
enum Scope<'a> {
    User,
    Event(&'a Event),
}

impl Evaluator<'_> {
    /// Whether the user is a member of segment `name` (false for unknown names).
    fn member(&mut self, name: &str) -> bool {
        if let Some(m) = self.memo.get(name) {
            return *m;
        }
        let Some(def) = self.defs.get(name).copied() else {
            return false;
        };
        let m = match &def.body {
            SegmentBody::Expr(e) => truth(&self.eval(e, Scope::User)) == Some(true),
            SegmentBody::Csv { .. } => self
                .world
                .csv_lists
                .get(name)
                .is_some_and(|l| l.contains(self.row.user)),
            SegmentBody::Warehouse { .. } => false,
        };
        self.memo.insert(name.to_string(), m);
        m
    }

    fn eval(&mut self, e: &Expr, scope: Scope<'_>) -> Value {
        match e {
            Expr::Lit(v) => v.clone(),
            // Only meaningful as the right side of `±`, handled in `Arith`.
            Expr::Interval(_) => Value::Null,
            Expr::Now(off) => Value::Ts(self.now.saturating_add(*off)),
            Expr::UserId => Value::Str(self.row.user.to_string()),
            Expr::Trait(name) => self.row.traits.get(name).cloned().unwrap_or(Value::Null),
            Expr::Event(f) => match scope {
                Scope::Event(ev) => ev.field(f),
                Scope::User => Value::Null,
            },
            Expr::Agg(agg) => self.aggregate(agg),
            Expr::Cmp(op, a, b) => {
                let (a, b) = (self.eval(a, scope), self.eval(b, scope));
                from_truth(cmp(*op, &a, &b))
            }
            Expr::Arith(op, a, b) => {
                let av = self.eval(a, scope);
                if let Expr::Interval(ms) = **b {
                    return match (av.as_ts(), op) {
                        (Some(t), ArithOp::Add) => Value::Ts(t.saturating_add(ms)),
                        (Some(t), ArithOp::Sub) => Value::Ts(t.saturating_sub(ms)),
                        _ => Value::Null,
                    };
                }
                let bv = self.eval(b, scope);
                arith(*op, &av, &bv)
            }
            Expr::Neg(a) => match self.eval(a, scope) {
                Value::Num(n) => Value::num(-n.0),
                _ => Value::Null,
            },
            Expr::And(a, b) => {
                let (x, y) = (truth(&self.eval(a, scope)), truth(&self.eval(b, scope)));
                from_truth(match (x, y) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                })
            }
            Expr::Or(a, b) => {
                let (x, y) = (truth(&self.eval(a, scope)), truth(&self.eval(b, scope)));
                from_truth(match (x, y) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                })
            }
            Expr::Not(a) => from_truth(truth(&self.eval(a, scope)).map(|b| !b)),
            Expr::IsNull { expr, negated } => {
                Value::Bool(self.eval(expr, scope).is_null() != *negated)
            }
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let x = self.eval(expr, scope);
                let mut unknown = false;
                let mut found = false;
                for item in list {
                    match cmp(CmpOp::Eq, &x, &self.eval(item, scope)) {
                        Some(true) => found = true,
                        Some(false) => {}
                        None => unknown = true,
                    }
                }
                let r = if found {
                    Some(true)
                } else if unknown {
                    None
                } else {
                    Some(false)
                };
                from_truth(r.map(|b| b != *negated))
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => {
                let x = self.eval(expr, scope);
                let ge = cmp(CmpOp::Ge, &x, &self.eval(low, scope));
                let le = cmp(CmpOp::Le, &x, &self.eval(high, scope));
                let r = match (ge, le) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                };
                from_truth(r.map(|b| b != *negated))
            }
            Expr::Like {
                expr,
                pattern,
                negated,
            } => match (self.eval(expr, scope), self.eval(pattern, scope)) {
                (Value::Str(s), Value::Str(p)) => {
                    let s: Vec<char> = s.chars().collect();
                    let p: Vec<char> = p.chars().collect();
                    Value::Bool(like(&s, &p) != *negated)
                }
                _ => Value::Null,
            },
            Expr::Coalesce(items) => {
                for item in items {
                    let v = self.eval(item, scope);
                    if !v.is_null() {
                        return v;
                    }
                }
                Value::Null
            }
            Expr::Lower(a) => match self.eval(a, scope) {
                Value::Str(s) => Value::Str(s.to_lowercase()),
                _ => Value::Null,
            },
            Expr::Upper(a) => match self.eval(a, scope) {
                Value::Str(s) => Value::Str(s.to_uppercase()),
                _ => Value::Null,
            },
            Expr::InSegment(name) => Value::Bool(self.member(name)),
            Expr::HashBucket { key, salt, n } => {
                let key = match self.eval(key, scope) {
                    Value::Null => return Value::Null,
                    Value::Str(s) => s,
                    Value::Num(x) if x.0.fract() == 0.0 && x.0.abs() < 9.0e15 => {
                        format!("{}", x.0 as i64)
                    }
                    Value::Num(x) => format!("{}", x.0),
                    Value::Bool(b) => b.to_string(),
                    Value::Ts(t) => format_rfc3339_ms(t),
                };
                let text = format!("{salt}:{key}");
                let h = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
                Value::num((h % (*n).max(1)) as f64)
            }
        }
    }

    /// An aggregate over the user's events at or before `now` that pass the FILTER.
    fn aggregate(&mut self, agg: &Aggregate) -> Value {
        let row = self.row;
        let mut matching: Vec<&Event> = Vec::new();
        for ev in row.events.iter().copied() {
            let pass = match &agg.filter {
                None => true,
                Some(f) => truth(&self.eval(f, Scope::Event(ev))) == Some(true),
            };
            if pass {
                matching.push(ev);
            }
        }
        let values = |this: &mut Self| -> Vec<Value> {
            match &agg.arg {
                None => vec![Value::Bool(true); matching.len()],
                Some(x) => matching
                    .iter()
                    .map(|ev| this.eval(x, Scope::Event(ev)))
                    .collect(),
            }
        };
        match agg.kind {
            AggKind::Count => {
                let vals: Vec<Value> = values(self).into_iter().filter(|v| !v.is_null()).collect();
                let n = if agg.distinct {
                    vals.into_iter().collect::<BTreeSet<Value>>().len()
                } else {
                    vals.len()
                };
                Value::num(n as f64)
            }
            AggKind::Sum | AggKind::Avg => {
                let nums: Vec<f64> = values(self).iter().filter_map(Value::as_f64).collect();
                if nums.is_empty() {
                    return Value::Null;
                }
                let sum: f64 = nums.iter().sum();
                let r = if agg.kind == AggKind::Sum {
                    sum
                } else {
                    sum / nums.len() as f64
                };
                if r.is_finite() {
                    Value::num(r)
                } else {
                    Value::Null
                }
            }
            AggKind::Min | AggKind::Max => {
                // Mixed types: only the values of the highest-ranked type present count
                // (numbers, then timestamps, strings, booleans), as docs/segments.md says.
                let rank = |v: &Value| match v {
                    Value::Num(_) => 4,
                    Value::Ts(_) => 3,
                    Value::Str(_) => 2,
                    Value::Bool(_) => 1,
                    Value::Null => 0,
                };
                let vals: Vec<Value> = values(self).into_iter().filter(|v| !v.is_null()).collect();
                let Some(top) = vals.iter().map(rank).max() else {
                    return Value::Null;
                };
                let mut best: Option<Value> = None;
                for v in vals.into_iter().filter(|v| rank(v) == top) {
                    let better = match &best {
                        None => true,
                        Some(b) => match v.sql_cmp(b) {
                            Some(Ordering::Less) => agg.kind == AggKind::Min,
                            Some(Ordering::Greater) => agg.kind == AggKind::Max,
                            _ => false,
                        },
                    };
                    if better {
                        best = Some(v);
                    }
                }
                best.unwrap_or(Value::Null)
            }
            AggKind::First | AggKind::Last => {
                let ev = if agg.kind == AggKind::First {
                    matching.first()
                } else {
                    matching.last()
                };
                match (ev, &agg.arg) {
                    (Some(ev), Some(x)) => self.eval(x, Scope::Event(ev)),
                    _ => Value::Null,
                }
            }
        }
    }
}

/// A value as a condition: booleans are themselves, everything else is unknown.
fn truth(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn from_truth(b: Option<bool>) -> Value {
    match b {
        Some(b) => Value::Bool(b),
        None => Value::Null,
    }
}

/// SQL comparison: NULL when either side is NULL or the types do not compare.
fn cmp(op: CmpOp, a: &Value, b: &Value) -> Option<bool> {
    let o = a.sql_cmp(b)?;
    Some(match op {
        CmpOp::Eq => o.is_eq(),
        CmpOp::Ne => o.is_ne(),
        CmpOp::Lt => o.is_lt(),
        CmpOp::Le => o.is_le(),
        CmpOp::Gt => o.is_gt(),
        CmpOp::Ge => o.is_ge(),
    })
}

/// Arithmetic on two numbers; anything else, division by zero or a non-finite result
/// is NULL.
fn arith(op: ArithOp, a: &Value, b: &Value) -> Value {
    let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
        return Value::Null;
    };
    let r = match op {
        ArithOp::Add => x + y,
        ArithOp::Sub => x - y,
        ArithOp::Mul => x * y,
        ArithOp::Div if y == 0.0 => return Value::Null,
        ArithOp::Div => x / y,
    };
    if r.is_finite() {
        Value::num(r)
    } else {
        Value::Null
    }
}

/// SQL LIKE by plain recursion: `%` any run, `_` exactly one character, whole string.
fn like(s: &[char], p: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some(('%', rest)) => (0..=s.len()).any(|i| like(&s[i..], rest)),
        Some(('_', rest)) => !s.is_empty() && like(&s[1..], rest),
        Some((c, rest)) => s.first() == Some(c) && like(&s[1..], rest),
    }
}

#[cfg(test)]
mod tests {
    use super::like;

    fn l(s: &str, p: &str) -> bool {
        like(
            &s.chars().collect::<Vec<_>>(),
            &p.chars().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn like_matches_whole_strings_case_sensitively() {
        assert!(l("Order Completed", "Order%"));
        assert!(l("Order Completed", "%Comp%"));
        assert!(l("abc", "a_c"));
        assert!(!l("abc", "A%"));
        assert!(!l("abcd", "a_c"));
        assert!(l("", "%"));
        assert!(!l("", "_"));
        assert!(l("xxaxxb", "%a%b"));
    }
}
