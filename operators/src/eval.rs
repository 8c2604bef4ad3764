//! Compiled expressions and their evaluation, including evaluation as a function of time.
//!
//! Owns [`CExpr`] (an [`Expr`](crate::ast::Expr) with aggregates, traits and segment references resolved to
//! slot numbers), three-valued evaluation against a [`Context`], and [`true_intervals`]:
//! the exact set of instants at which a condition holds, found from the breakpoints its
//! `now()` comparisons induce. Because `now()` only appears compared with values that do
//! not themselves depend on `now()`, a condition is constant between consecutive
//! breakpoints, so evaluating it once per breakpoint is exact at millisecond resolution.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::ast::{ArithOp, CmpOp, EventField};
use crate::time::Time;
use crate::value::Value;

/// A compiled expression: names resolved to slots.
#[derive(Clone, Debug, PartialEq)]
pub enum CExpr {
    /// A literal.
    Lit(Value),
    /// An interval in ms (right side of `±` on a timestamp).
    Interval(i64),
    /// `now()` plus an offset in ms.
    Now(i64),
    /// The user key.
    UserId,
    /// A user trait, by trait slot.
    Trait(usize),
    /// An event field (event-level only).
    Field(EventField),
    /// An event path (`properties.…`, `context.…`, `traits.…`), with its index in the
    /// plan's [`Projection`](crate::project::Projection).
    Path(usize, EventField),
    /// An aggregate's value, by aggregate slot.
    Agg(usize),
    /// Membership of another segment, by segment index.
    InSegment(usize),
    /// Comparison.
    Cmp(CmpOp, Box<CExpr>, Box<CExpr>),
    /// Arithmetic.
    Arith(ArithOp, Box<CExpr>, Box<CExpr>),
    /// Unary minus.
    Neg(Box<CExpr>),
    /// Three-valued AND.
    And(Box<CExpr>, Box<CExpr>),
    /// Three-valued OR.
    Or(Box<CExpr>, Box<CExpr>),
    /// Three-valued NOT.
    Not(Box<CExpr>),
    /// `IS [NOT] NULL`.
    IsNull(Box<CExpr>, bool),
    /// `[NOT] IN (list)`.
    InList(Box<CExpr>, Vec<CExpr>, bool),
    /// `[NOT] BETWEEN low AND high`.
    Between(Box<CExpr>, Box<CExpr>, Box<CExpr>, bool),
    /// `[NOT] LIKE pattern`.
    Like(Box<CExpr>, Box<CExpr>, bool),
    /// `coalesce(…)`.
    Coalesce(Vec<CExpr>),
    /// `lower(s)`.
    Lower(Box<CExpr>),
    /// `upper(s)`.
    Upper(Box<CExpr>),
    /// `hash_bucket(key, salt, n)`.
    HashBucket(Box<CExpr>, String, u64),
}

/// What an expression can look up while it is evaluated.
pub trait Context {
    /// The value of an event field (event-level contexts).
    fn field(&self, _field: &EventField) -> Cow<'_, Value> {
        Cow::Owned(Value::Null)
    }
    /// The value of an event path, by its index in the plan's projection (contexts over
    /// whole events look it up by the path itself).
    fn path(&self, _index: usize, field: &EventField) -> Cow<'_, Value> {
        self.field(field)
    }
    /// The user key.
    fn user_id(&self) -> Cow<'_, Value> {
        self.user_key().map_or(Cow::Owned(Value::Null), |k| {
            Cow::Owned(Value::Str(k.to_string()))
        })
    }
    /// The user key as text, where the context has one (lets `hash_bucket(user_id, …)`
    /// hash it without a copy).
    fn user_key(&self) -> Option<&str> {
        None
    }
    /// A trait's current value.
    fn trait_value(&self, _slot: usize) -> Cow<'_, Value> {
        Cow::Owned(Value::Null)
    }
    /// An aggregate's current value.
    fn agg(&self, _slot: usize) -> Cow<'_, Value> {
        Cow::Owned(Value::Null)
    }
    /// Whether the user is in the segment (already evaluated at the same instant).
    fn in_segment(&self, _segment: usize) -> bool {
        false
    }
    /// Called for each comparison of values of different types (NULL by the spec), so
    /// the caller can count them (`herald_type_mismatches_total`).
    fn type_mismatch(&self) {}
}

fn truth(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn from_truth(b: Option<bool>) -> Value {
    b.map(Value::Bool).unwrap_or(Value::Null)
}

fn compare(op: CmpOp, a: &Value, b: &Value, ctx: &dyn Context) -> Value {
    match a.sql_cmp(b) {
        None => {
            if a.type_mismatch(b) {
                ctx.type_mismatch();
            }
            Value::Null
        }
        Some(ord) => Value::Bool(match op {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
        }),
    }
}

fn arith(op: ArithOp, a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Num(x), Value::Num(y)) => {
            let (x, y) = (x.0, y.0);
            let r = match op {
                ArithOp::Add => x + y,
                ArithOp::Sub => x - y,
                ArithOp::Mul => x * y,
                ArithOp::Div => {
                    if y == 0.0 {
                        return Value::Null;
                    }
                    x / y
                }
            };
            if r.is_finite() {
                Value::num(r)
            } else {
                Value::Null
            }
        }
        _ => Value::Null,
    }
}

/// Evaluates `e` at instant `now` (ms).
pub fn eval(e: &CExpr, ctx: &dyn Context, now: i64) -> Value {
    eval_ref(e, ctx, now).into_owned()
}

/// Evaluates `e` at instant `now` (ms), borrowing literals and the context's values
/// instead of copying them: this is the per-event and per-user hot path.
pub fn eval_ref<'a>(e: &'a CExpr, ctx: &'a dyn Context, now: i64) -> Cow<'a, Value> {
    let owned = match e {
        CExpr::Lit(v) => return Cow::Borrowed(v),
        CExpr::UserId => return ctx.user_id(),
        CExpr::Trait(s) => return ctx.trait_value(*s),
        CExpr::Field(f) => return ctx.field(f),
        CExpr::Path(i, f) => return ctx.path(*i, f),
        CExpr::Agg(s) => return ctx.agg(*s),
        CExpr::Coalesce(items) => {
            for i in items {
                let v = eval_ref(i, ctx, now);
                if !v.is_null() {
                    return v;
                }
            }
            Value::Null
        }
        other => eval_owned(other, ctx, now),
    };
    Cow::Owned(owned)
}

fn eval_owned(e: &CExpr, ctx: &dyn Context, now: i64) -> Value {
    let eval = eval_ref;
    match e {
        // The variants `eval_ref` answers by borrowing.
        CExpr::Lit(_)
        | CExpr::UserId
        | CExpr::Trait(_)
        | CExpr::Field(_)
        | CExpr::Path(..)
        | CExpr::Agg(_)
        | CExpr::Coalesce(_) => eval_ref(e, ctx, now).into_owned(),
        // An interval only means something next to a timestamp; see `Arith` below.
        CExpr::Interval(ms) => Value::num(*ms as f64),
        CExpr::Now(off) => Value::Ts(now.saturating_add(*off)),
        CExpr::InSegment(s) => Value::Bool(ctx.in_segment(*s)),
        CExpr::Cmp(op, a, b) => compare(*op, &eval(a, ctx, now), &eval(b, ctx, now), ctx),
        CExpr::Arith(op, a, b) => {
            let av = eval(a, ctx, now);
            if let CExpr::Interval(ms) = **b {
                return match (av.as_ts(), op) {
                    (Some(t), ArithOp::Add) => Value::Ts(t.saturating_add(ms)),
                    (Some(t), ArithOp::Sub) => Value::Ts(t.saturating_sub(ms)),
                    _ => Value::Null,
                };
            }
            arith(*op, &av, &eval(b, ctx, now))
        }
        CExpr::Neg(a) => match *eval(a, ctx, now) {
            Value::Num(n) => Value::num(-n.0),
            _ => Value::Null,
        },
        CExpr::And(a, b) => {
            let x = truth(&eval(a, ctx, now));
            if x == Some(false) {
                return Value::Bool(false);
            }
            let y = truth(&eval(b, ctx, now));
            from_truth(match (x, y) {
                (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            })
        }
        CExpr::Or(a, b) => {
            let x = truth(&eval(a, ctx, now));
            if x == Some(true) {
                return Value::Bool(true);
            }
            let y = truth(&eval(b, ctx, now));
            from_truth(match (x, y) {
                (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            })
        }
        CExpr::Not(a) => from_truth(truth(&eval(a, ctx, now)).map(|b| !b)),
        CExpr::IsNull(a, negated) => Value::Bool(eval(a, ctx, now).is_null() != *negated),
        CExpr::InList(a, list, negated) => {
            let x = eval(a, ctx, now);
            let mut saw_null = x.is_null();
            let mut found = false;
            if !saw_null {
                for item in list {
                    match compare(CmpOp::Eq, &x, &eval(item, ctx, now), ctx) {
                        Value::Bool(true) => {
                            found = true;
                            break;
                        }
                        Value::Bool(false) => {}
                        _ => saw_null = true,
                    }
                }
            }
            let r = if found {
                Some(true)
            } else if saw_null {
                None
            } else {
                Some(false)
            };
            from_truth(if *negated { r.map(|b| !b) } else { r })
        }
        CExpr::Between(a, lo, hi, negated) => {
            let x = eval(a, ctx, now);
            let ge = truth(&compare(CmpOp::Ge, &x, &eval(lo, ctx, now), ctx));
            let le = truth(&compare(CmpOp::Le, &x, &eval(hi, ctx, now), ctx));
            let r = match (ge, le) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            };
            from_truth(if *negated { r.map(|b| !b) } else { r })
        }
        CExpr::Like(a, p, negated) => match (&*eval(a, ctx, now), &*eval(p, ctx, now)) {
            (Value::Str(s), Value::Str(p)) => Value::Bool(like(s, p) != *negated),
            (Value::Null, _) | (_, Value::Null) => Value::Null,
            _ => {
                ctx.type_mismatch();
                Value::Null
            }
        },
        CExpr::Lower(a) => match &*eval(a, ctx, now) {
            Value::Str(s) => Value::Str(s.to_lowercase()),
            _ => Value::Null,
        },
        CExpr::Upper(a) => match &*eval(a, ctx, now) {
            Value::Str(s) => Value::Str(s.to_uppercase()),
            _ => Value::Null,
        },
        CExpr::HashBucket(key, salt, n) => {
            if let (CExpr::UserId, Some(user)) = (&**key, ctx.user_key()) {
                return Value::num((hash_bucket(user, salt) % n) as f64);
            }
            let k = match key_text(&eval(key, ctx, now)) {
                Some(k) => k,
                None => return Value::Null,
            };
            Value::num((hash_bucket(&k, salt) % n) as f64)
        }
    }
}

/// The text a value is hashed as by `hash_bucket`: strings as they are, whole numbers
/// without a fraction (`42`, as SDKs send numeric ids), other numbers in Rust's shortest
/// round-trip form, booleans as `true`/`false`, timestamps as RFC 3339 with milliseconds.
/// `None` for NULL.
pub fn key_text(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => return None,
        Value::Str(s) => s.clone(),
        Value::Num(n) if n.0.fract() == 0.0 && n.0.abs() < 9.0e15 => format!("{}", n.0 as i64),
        Value::Num(n) => n.0.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Ts(t) => crate::time::format_rfc3339_ms(*t),
    })
}

/// xxh3-64 of `salt || ':' || key`: stable across runs, workers and processes.
pub fn hash_bucket(key: &str, salt: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(salt.as_bytes());
    h.update(b":");
    h.update(key.as_bytes());
    h.digest()
}

/// SQL LIKE: `%` any run, `_` one character, case-sensitive, whole string.
pub fn like(s: &str, pattern: &str) -> bool {
    if s.is_ascii() && pattern.is_ascii() {
        // One byte is one character: match in place, without collecting characters.
        like_units(s.as_bytes(), pattern.as_bytes(), b'%', b'_')
    } else {
        let s: Vec<char> = s.chars().collect();
        let p: Vec<char> = pattern.chars().collect();
        like_units(&s, &p, '%', '_')
    }
}

/// LIKE over units (bytes of ASCII text, or characters): iterative matcher with
/// single-star backtracking, linear in practice.
fn like_units<U: PartialEq + Copy>(s: &[U], p: &[U], any: U, one: U) -> bool {
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if j < p.len() && (p[j] == one || p[j] == s[i]) && p[j] != any {
            i += 1;
            j += 1;
        } else if j < p.len() && p[j] == any {
            star = Some((j, i));
            j += 1;
        } else if let Some((sj, si)) = star {
            j = sj + 1;
            i = si + 1;
            star = Some((sj, si + 1));
        } else {
            return false;
        }
    }
    while j < p.len() && p[j] == any {
        j += 1;
    }
    j == p.len()
}

/// Where a condition's breakpoints come from: its comparisons with `now() + off`, as
/// `(x, off)` (the condition may change at `x - off` and at the instant after). Found once
/// per condition, when the state is built; `x` never depends on now(): the parser
/// guarantees it.
pub type NowPoints = Vec<(CExpr, i64)>;

/// The [`NowPoints`] of `e`: for `now() + off` compared with `x`, or `x BETWEEN` bounds one
/// of which is `now() + off`, the pair `(x, off)`; for `now() BETWEEN lo AND hi`, the
/// bounds with offset 0.
pub fn now_points(e: &CExpr) -> NowPoints {
    let mut out = Vec::new();
    visit(e, &mut |node| match node {
        CExpr::Cmp(_, a, b) => {
            if let (CExpr::Now(off), x) | (x, CExpr::Now(off)) = (&**a, &**b) {
                out.push((x.clone(), *off));
            }
        }
        CExpr::Between(a, lo, hi, _) => {
            for bound in [lo, hi] {
                if let CExpr::Now(off) = **bound {
                    out.push(((**a).clone(), off));
                }
            }
            if let CExpr::Now(_) = **a {
                for bound in [lo, hi] {
                    out.push(((**bound).clone(), 0));
                }
            }
        }
        _ => {}
    });
    out
}

/// Collects the instants at which a condition's value may change as `now` moves, from its
/// [`now_points`]: for each `(x, off)`, the instants `x - off` and `x - off + 1`.
pub fn breakpoints(points: &[(CExpr, i64)], ctx: &dyn Context, out: &mut Vec<i64>) {
    for (x, off) in points {
        if let Some(t) = eval(x, ctx, 0).as_ts() {
            let c = t.saturating_sub(*off);
            out.push(c);
            out.push(c.saturating_add(1));
        }
    }
}

/// True if `e` mentions `now()` anywhere (so its value depends on time).
pub fn mentions_now(e: &CExpr) -> bool {
    let mut found = false;
    visit(e, &mut |x| found |= matches!(x, CExpr::Now(_)));
    found
}

/// Calls `f` on `e` and on every expression inside it.
pub fn visit(e: &CExpr, f: &mut dyn FnMut(&CExpr)) {
    f(e);
    match e {
        CExpr::Cmp(_, a, b)
        | CExpr::Arith(_, a, b)
        | CExpr::And(a, b)
        | CExpr::Or(a, b)
        | CExpr::Like(a, b, _) => {
            visit(a, f);
            visit(b, f);
        }
        CExpr::Neg(a)
        | CExpr::Not(a)
        | CExpr::IsNull(a, _)
        | CExpr::Lower(a)
        | CExpr::Upper(a)
        | CExpr::HashBucket(a, _, _) => visit(a, f),
        CExpr::Between(a, b, c, _) => {
            visit(a, f);
            visit(b, f);
            visit(c, f);
        }
        CExpr::InList(a, l, _) => {
            visit(a, f);
            l.iter().for_each(|x| visit(x, f));
        }
        CExpr::Coalesce(l) => l.iter().for_each(|x| visit(x, f)),
        CExpr::Lit(_)
        | CExpr::Interval(_)
        | CExpr::Now(_)
        | CExpr::UserId
        | CExpr::Trait(_)
        | CExpr::Field(_)
        | CExpr::Path(..)
        | CExpr::Agg(_)
        | CExpr::InSegment(_) => {}
    }
}

/// The half-open intervals `[from, until)` of dataflow time, at or after `start`, during
/// which `holds(now)` is true; `until == Time::MAX` means "for ever". `points` are the
/// candidate breakpoints (unsorted, may repeat). `holds` is called once per distinct
/// breakpoint after `start`, plus once at `start`.
pub fn true_intervals(
    start: Time,
    points: &mut Vec<i64>,
    mut holds: impl FnMut(i64) -> bool,
) -> Vec<(Time, Time)> {
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut open: Option<Time> = if holds(start as i64) {
        Some(start)
    } else {
        None
    };
    for &p in points.iter() {
        if p <= start as i64 {
            continue;
        }
        let t = p as Time;
        let h = holds(p);
        match (open, h) {
            (None, true) => open = Some(t),
            (Some(from), false) => {
                out.push((from, t));
                open = None;
            }
            _ => {}
        }
    }
    if let Some(from) = open {
        out.push((from, Time::MAX));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ev(i64);
    impl Context for Ev {
        fn field(&self, f: &EventField) -> Cow<'_, Value> {
            Cow::Owned(match f {
                EventField::Timestamp => Value::Ts(self.0),
                _ => Value::Null,
            })
        }
    }

    #[test]
    fn hash_bucket_is_xxh3_of_salt_colon_key() {
        assert_eq!(
            hash_bucket("u1", "exp"),
            xxhash_rust::xxh3::xxh3_64(b"exp:u1")
        );
    }

    #[test]
    fn like_on_non_ascii_text_counts_characters() {
        assert!(like("café", "caf_"));
        assert!(like("naïve façade", "na%ç%"));
        assert!(!like("café", "caf__"));
    }

    #[test]
    fn like_matches_sql_wildcards() {
        assert!(like("Order Completed", "Order%"));
        assert!(like("abc", "a_c"));
        assert!(!like("abc", "A%"));
        assert!(like("", "%"));
        assert!(like("a%b", "a%b"));
        assert!(!like("ab", "a_b"));
        assert!(like("xxaxxb", "%a%b"));
    }

    #[test]
    fn a_seven_day_window_holds_until_exactly_t_plus_seven_days() {
        // timestamp > now() - 7 days
        let e = CExpr::Cmp(
            CmpOp::Gt,
            Box::new(CExpr::Field(EventField::Timestamp)),
            Box::new(CExpr::Now(-7 * 86_400_000)),
        );
        let ctx = Ev(1_000);
        let mut pts = Vec::new();
        breakpoints(&now_points(&e), &ctx, &mut pts);
        let iv = true_intervals(1_000, &mut pts, |now| {
            eval(&e, &ctx, now) == Value::Bool(true)
        });
        assert_eq!(iv, vec![(1_000, 1_000 + 7 * 86_400_000)]);
    }

    #[test]
    fn between_bounds_and_now_as_the_subject_give_their_breakpoints() {
        let ts = || Box::new(CExpr::Field(EventField::Timestamp));
        let ctx = Ev(1_000);
        let points = |e: &CExpr| {
            let mut pts = Vec::new();
            breakpoints(&now_points(e), &ctx, &mut pts);
            pts.sort_unstable();
            pts
        };
        // timestamp BETWEEN now() - 10 AND now(): moves at 1 010 (and after) and 1 000.
        let e = CExpr::Between(
            ts(),
            Box::new(CExpr::Now(-10)),
            Box::new(CExpr::Now(0)),
            false,
        );
        assert_eq!(points(&e), vec![1_000, 1_001, 1_010, 1_011]);
        // now() BETWEEN timestamp AND '2 000': its bounds.
        let e = CExpr::Between(
            Box::new(CExpr::Now(0)),
            ts(),
            Box::new(CExpr::Lit(Value::Ts(2_000))),
            false,
        );
        assert_eq!(points(&e), vec![1_000, 1_001, 2_000, 2_001]);
        // A condition without now() has none.
        assert!(now_points(&CExpr::IsNull(ts(), false)).is_empty());
    }

    #[test]
    fn three_valued_logic() {
        let null = || Box::new(CExpr::Lit(Value::Null));
        let t = || Box::new(CExpr::Lit(Value::Bool(true)));
        let f = || Box::new(CExpr::Lit(Value::Bool(false)));
        struct C;
        impl Context for C {}
        assert_eq!(eval(&CExpr::And(null(), f()), &C, 0), Value::Bool(false));
        assert_eq!(eval(&CExpr::And(null(), t()), &C, 0), Value::Null);
        assert_eq!(eval(&CExpr::Or(null(), t()), &C, 0), Value::Bool(true));
        assert_eq!(eval(&CExpr::Not(null()), &C, 0), Value::Null);
        let in_list = CExpr::InList(
            Box::new(CExpr::Lit(Value::num(1.0))),
            vec![CExpr::Lit(Value::num(2.0)), CExpr::Lit(Value::Null)],
            true,
        );
        assert_eq!(eval(&in_list, &C, 0), Value::Null);
    }
}
