//! Lowering a sqlparser expression into a checked [`Expr`]: name resolution and types.
//!
//! Owns the meaning of names (user level outside aggregates, event level inside), the
//! rules for aggregates, `now()`, `INTERVAL` and `TIMESTAMP` literals, the scalar
//! functions, and the static type check. Every error carries the position of the node at
//! fault and a message for the analyst. Does not own statements or `in_segment` targets
//! (see `parse`): it only collects the `in_segment` references it meets.

mod calls;
mod names;

use sqlparser::ast::{
    self as sql, BinaryOperator, CastKind, FunctionArguments, Spanned, UnaryOperator,
};
use sqlparser::tokenizer::Location;

use super::ast::{ArithOp, CmpOp, Expr, Pos};
use super::parse::{SegmentError, Source};
use crate::time::parse_interval_ms;
use crate::value::{Type, Value};
use calls::function_name;

/// An `in_segment('name')` met while lowering, and where.
#[derive(Clone)]
pub(crate) struct SegmentRef {
    pub(crate) name: String,
    pub(crate) pos: Pos,
}

/// How deeply expressions may nest (sqlparser bounds parentheses and calls itself; this
/// bounds long left-leaning operator chains, except AND/OR chains, which are flattened).
const MAX_DEPTH: usize = 100;

const NOW_USE: &str = "now() can only be compared with a timestamp: write now(), \
     now() - INTERVAL '…' or now() + INTERVAL '…' on one side of a comparison";

const FUNCTIONS: &str = "count, sum, avg, min, max, first, last, coalesce, lower, upper, \
     now, in_segment and hash_bucket";

/// Lowers and checks a segment condition. `start` is where the condition starts (used
/// when sqlparser has no position for a node). Returns the expression and the
/// `in_segment` references in it.
pub(crate) fn lower_condition(
    e: &sql::Expr,
    src: &Source<'_>,
    start: Pos,
) -> Result<(Expr, Vec<SegmentRef>), SegmentError> {
    lower_in(e, src, start, Scope::User, "the segment condition")
}

/// Lowers and checks a journey condition in `scope`.
pub(crate) fn lower_journey_condition(
    e: &sql::Expr,
    src: &Source<'_>,
    start: Pos,
    scope: ConditionScope,
) -> Result<(Expr, Vec<SegmentRef>), SegmentError> {
    let scope = match scope {
        ConditionScope::User => Scope::User,
        ConditionScope::Where => Scope::Where,
    };
    lower_in(e, src, start, scope, "the condition")
}

fn lower_in(
    e: &sql::Expr,
    src: &Source<'_>,
    start: Pos,
    scope: Scope<'_>,
    what: &str,
) -> Result<(Expr, Vec<SegmentRef>), SegmentError> {
    let mut l = Lower {
        src,
        refs: Vec::new(),
        depth: 0,
        fallback: start,
    };
    let (x, t) = l.expr(e, scope)?;
    if !boolish(t) {
        return Err(l.err_at(e, format!("{what} must be boolean, found {}", a(t))));
    }
    Ok((x, l.refs))
}

/// Milliseconds of an interval's text (`'7 days'`).
pub(crate) fn interval_text_ms(text: &str) -> Result<i64, String> {
    parse_interval_ms(text).map_err(|mut m| {
        let lower = text.to_ascii_lowercase();
        if ["month", "year"].iter().any(|u| lower.contains(u)) {
            m.push_str("; months and years vary in length, so count days: INTERVAL '30 days'");
        }
        m
    })
}

/// What names refer to: the user, or the event inside the named aggregate.
#[derive(Clone, Copy)]
enum Scope<'n> {
    User,
    /// A journey's `where`: the triggering event's fields (`event`, `type`, `timestamp`,
    /// `message_id`, `properties.*`, `context.*`) next to the user's names.
    Where,
    Event(&'n str),
}

/// Which names a journey condition may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionScope {
    /// The user only, as in a segment (`when`).
    User,
    /// The triggering event's fields and the user's names (`where`).
    Where,
}

type Lowered = (Expr, Type);

struct Lower<'s, 'a> {
    src: &'s Source<'a>,
    refs: Vec<SegmentRef>,
    depth: usize,
    fallback: Pos,
}

impl Lower<'_, '_> {
    fn expr(&mut self, e: &sql::Expr, scope: Scope<'_>) -> Result<Lowered, SegmentError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err_at(
                e,
                format!("the condition is nested too deeply (more than {MAX_DEPTH} levels)"),
            ));
        }
        self.depth += 1;
        let out = self.expr_inner(e, scope);
        self.depth -= 1;
        out
    }

    fn expr_inner(&mut self, e: &sql::Expr, scope: Scope<'_>) -> Result<Lowered, SegmentError> {
        use sql::Expr as S;
        match e {
            S::Nested(inner) => self.expr(inner, scope),
            S::Identifier(id) => self.ident(id, scope),
            S::CompoundIdentifier(parts) => self.compound(parts, scope),
            S::Value(v) => self.literal(v),
            S::TypedString(ts) => self.typed_string(e, ts),
            S::Interval(_) => Err(self.err_at(
                e,
                "an INTERVAL can only be added to or subtracted from a timestamp, \
                 like timestamp > now() - INTERVAL '7 days'",
            )),
            S::Function(f) => self.function(f, scope),
            S::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => self.logic(e, true, scope),
                BinaryOperator::Or => self.logic(e, false, scope),
                BinaryOperator::Eq => self.compare(left, CmpOp::Eq, right, scope),
                BinaryOperator::NotEq => self.compare(left, CmpOp::Ne, right, scope),
                BinaryOperator::Lt => self.compare(left, CmpOp::Lt, right, scope),
                BinaryOperator::LtEq => self.compare(left, CmpOp::Le, right, scope),
                BinaryOperator::Gt => self.compare(left, CmpOp::Gt, right, scope),
                BinaryOperator::GtEq => self.compare(left, CmpOp::Ge, right, scope),
                BinaryOperator::Plus => self.arith(left, ArithOp::Add, right, scope),
                BinaryOperator::Minus => self.arith(left, ArithOp::Sub, right, scope),
                BinaryOperator::Multiply => self.arith(left, ArithOp::Mul, right, scope),
                BinaryOperator::Divide => self.arith(left, ArithOp::Div, right, scope),
                other => Err(SegmentError::new(
                    self.op_pos(right),
                    format!("the operator '{other}' is not supported"),
                )),
            },
            S::UnaryOp { op, expr } => self.unary(e, *op, expr, scope),
            S::IsNull(x) | S::IsNotNull(x) => {
                let (x, _) = self.expr(x, scope)?;
                let negated = matches!(e, S::IsNotNull(_));
                Ok((
                    Expr::IsNull {
                        expr: Box::new(x),
                        negated,
                    },
                    Type::Bool,
                ))
            }
            S::InList {
                expr,
                list,
                negated,
            } => {
                let (x, t) = self.expr(expr, scope)?;
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let (y, u) = self.expr(item, scope)?;
                    if !compatible(t, u) {
                        return Err(self.err_at(
                            item,
                            format!("type mismatch: IN compares {} with {}", a(t), a(u)),
                        ));
                    }
                    items.push(y);
                }
                let expr = Box::new(x);
                Ok((
                    Expr::InList {
                        expr,
                        list: items,
                        negated: *negated,
                    },
                    Type::Bool,
                ))
            }
            S::Between {
                expr,
                negated,
                low,
                high,
            } => self.between(expr, low, high, *negated, scope),
            S::Like {
                negated,
                any,
                expr,
                pattern,
                escape_char,
            } => {
                if *any || escape_char.is_some() {
                    return Err(self.err_at(e, "only plain LIKE 'pattern' is supported"));
                }
                let (x, t) = self.expr(expr, scope)?;
                let (p, u) = self.expr(pattern, scope)?;
                for (side, ty) in [(&**expr, t), (&**pattern, u)] {
                    if !matches!(ty, Type::Str | Type::Any) {
                        return Err(
                            self.err_at(side, format!("LIKE needs strings, found {}", a(ty)))
                        );
                    }
                }
                let (expr, pattern) = (Box::new(x), Box::new(p));
                Ok((
                    Expr::Like {
                        expr,
                        pattern,
                        negated: *negated,
                    },
                    Type::Bool,
                ))
            }
            S::ILike { .. } => Err(SegmentError::new(
                self.op_pos_of_postfix(e),
                "ILIKE is not supported; LIKE is case-sensitive, so write lower(x) LIKE '…'",
            )),
            S::IsTrue(_) | S::IsFalse(_) | S::IsNotTrue(_) | S::IsNotFalse(_) => Err(self.err_at(
                e,
                "IS TRUE / IS FALSE are not supported; compare with = TRUE or = FALSE",
            )),
            S::InSubquery { .. } | S::Subquery(_) | S::Exists { .. } => {
                Err(self.err_at(e, "subqueries are not supported in a segment condition"))
            }
            S::CompoundFieldAccess { .. } => Err(self.err_at(
                e,
                "subscripts like [0] are not supported; write a dotted path like properties.plan",
            )),
            other => Err(self.err_at(
                e,
                format!(
                    "'{}' is not supported in a segment condition",
                    shorten(other)
                ),
            )),
        }
    }

    /// A left-leaning chain of AND (or OR), lowered without recursing on its length.
    fn logic(
        &mut self,
        e: &sql::Expr,
        and: bool,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let op = if and {
            BinaryOperator::And
        } else {
            BinaryOperator::Or
        };
        let mut operands = Vec::new();
        let mut cur = e;
        while let sql::Expr::BinaryOp { left, op: o, right } = cur {
            if *o != op {
                break;
            }
            operands.push(&**right);
            cur = left;
        }
        operands.push(cur);
        operands.reverse();
        let mut acc: Option<Expr> = None;
        for o in operands {
            let (x, t) = self.expr(o, scope)?;
            if !boolish(t) {
                return Err(self.err_at(
                    o,
                    format!(
                        "{op} needs a boolean condition on each side, found {}",
                        a(t)
                    ),
                ));
            }
            acc = Some(match acc {
                None => x,
                Some(l) if and => Expr::And(Box::new(l), Box::new(x)),
                Some(l) => Expr::Or(Box::new(l), Box::new(x)),
            });
        }
        Ok((acc.unwrap_or(Expr::Lit(Value::Null)), Type::Bool))
    }

    fn unary(
        &mut self,
        e: &sql::Expr,
        op: UnaryOperator,
        inner: &sql::Expr,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        match op {
            UnaryOperator::Not => {
                let (x, t) = self.expr(inner, scope)?;
                if !boolish(t) {
                    return Err(
                        self.err_at(e, format!("NOT needs a boolean condition, found {}", a(t)))
                    );
                }
                Ok((Expr::Not(Box::new(x)), Type::Bool))
            }
            UnaryOperator::Minus => {
                let (x, t) = self.expr(inner, scope)?;
                match (x, t) {
                    // A negative literal is a literal.
                    (Expr::Lit(Value::Num(n)), _) => Ok((Expr::Lit(Value::num(-n.0)), Type::Num)),
                    (x, Type::Num | Type::Any) => Ok((Expr::Neg(Box::new(x)), Type::Num)),
                    (_, t) => {
                        Err(self.err_at(e, format!("unary minus needs a number, found {}", a(t))))
                    }
                }
            }
            other => Err(self.err_at(e, format!("the unary operator '{other}' is not supported"))),
        }
    }

    fn compare(
        &mut self,
        left: &sql::Expr,
        op: CmpOp,
        right: &sql::Expr,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let (l, r) = match (self.now_form(left)?, self.now_form(right)?) {
            (Some(_), Some((_, pos))) => {
                return Err(SegmentError::new(
                    pos,
                    "now() cannot be compared with now(); compare it with a timestamp",
                ))
            }
            (Some((offset, pos)), None) => {
                let (r, t) = self.expr(right, scope)?;
                now_partner(t, pos)?;
                (Expr::Now(offset), r)
            }
            (None, Some((offset, pos))) => {
                let (l, t) = self.expr(left, scope)?;
                now_partner(t, pos)?;
                (l, Expr::Now(offset))
            }
            (None, None) => {
                let (l, lt) = self.expr(left, scope)?;
                let (r, rt) = self.expr(right, scope)?;
                if !compatible(lt, rt) {
                    return Err(SegmentError::new(
                        self.op_pos(right),
                        format!("type mismatch: cannot compare {} with {}", a(lt), a(rt)),
                    ));
                }
                (l, r)
            }
        };
        Ok((Expr::Cmp(op, Box::new(l), Box::new(r)), Type::Bool))
    }

    fn between(
        &mut self,
        expr: &sql::Expr,
        low: &sql::Expr,
        high: &sql::Expr,
        negated: bool,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        if let Some((_, pos)) = self.now_form(expr)? {
            return Err(SegmentError::new(pos, NOW_USE));
        }
        let (x, t) = self.expr(expr, scope)?;
        let mut bounds = Vec::with_capacity(2);
        for bound in [low, high] {
            if let Some((offset, pos)) = self.now_form(bound)? {
                now_partner(t, pos)?;
                bounds.push(Expr::Now(offset));
                continue;
            }
            let (b, u) = self.expr(bound, scope)?;
            if !compatible(t, u) {
                return Err(self.err_at(
                    bound,
                    format!("type mismatch: BETWEEN compares {} with {}", a(t), a(u)),
                ));
            }
            bounds.push(b);
        }
        let high = Box::new(bounds.pop().unwrap_or(Expr::Lit(Value::Null)));
        let low = Box::new(bounds.pop().unwrap_or(Expr::Lit(Value::Null)));
        let expr = Box::new(x);
        Ok((
            Expr::Between {
                expr,
                low,
                high,
                negated,
            },
            Type::Bool,
        ))
    }

    fn arith(
        &mut self,
        left: &sql::Expr,
        op: ArithOp,
        right: &sql::Expr,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let symbol = match op {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
        };
        if let (sql::Expr::Interval(iv), ArithOp::Add | ArithOp::Sub) = (strip(right), op) {
            let (l, t) = self.expr(left, scope)?;
            let ms = self.interval(iv)?;
            return match t {
                Type::Ts | Type::Any => Ok((
                    Expr::Arith(op, Box::new(l), Box::new(Expr::Interval(ms))),
                    Type::Ts,
                )),
                other => Err(SegmentError::new(
                    self.op_pos(right),
                    format!(
                        "an INTERVAL can only be added to or subtracted from a timestamp, not {}",
                        a(other)
                    ),
                )),
            };
        }
        let (l, lt) = self.expr(left, scope)?;
        let (r, rt) = self.expr(right, scope)?;
        for t in [lt, rt] {
            let message = match t {
                Type::Num | Type::Any => continue,
                Type::Ts => "arithmetic on a timestamp is only timestamp + INTERVAL '…' or \
                             timestamp - INTERVAL '…'"
                    .to_string(),
                other => format!("'{symbol}' needs numbers, found {}", a(other)),
            };
            return Err(SegmentError::new(self.op_pos(right), message));
        }
        Ok((Expr::Arith(op, Box::new(l), Box::new(r)), Type::Num))
    }

    /// `now()`, `now() - INTERVAL '…'` or `now() + INTERVAL '…'` (parentheses allowed):
    /// the offset in ms and where `now` is.
    fn now_form(&self, e: &sql::Expr) -> Result<Option<(i64, Pos)>, SegmentError> {
        let e = strip(e);
        if let Some(pos) = self.now_call(e)? {
            return Ok(Some((0, pos)));
        }
        if let sql::Expr::BinaryOp { left, op, right } = e {
            let sign = match op {
                BinaryOperator::Plus => 1,
                BinaryOperator::Minus => -1,
                _ => return Ok(None),
            };
            if let sql::Expr::Interval(iv) = strip(right) {
                if let Some(pos) = self.now_call(strip(left))? {
                    return Ok(Some((sign * self.interval(iv)?, pos)));
                }
            }
        }
        Ok(None)
    }

    fn now_call(&self, e: &sql::Expr) -> Result<Option<Pos>, SegmentError> {
        let sql::Expr::Function(f) = e else {
            return Ok(None);
        };
        let (name, loc) = function_name(f);
        if name != "now" {
            return Ok(None);
        }
        let pos = self.src.pos(loc);
        let empty = matches!(&f.args, FunctionArguments::List(l)
            if l.args.is_empty() && l.clauses.is_empty() && l.duplicate_treatment.is_none());
        if !empty || f.filter.is_some() || f.over.is_some() {
            return Err(SegmentError::new(pos, "now() takes no arguments"));
        }
        Ok(Some(pos))
    }

    /// An error at the start of `e`.
    fn err_at(&self, e: &sql::Expr, message: impl Into<String>) -> SegmentError {
        let loc = self.start_loc(e);
        let pos = if loc.line == 0 {
            self.fallback
        } else {
            self.src.pos(loc)
        };
        SegmentError::new(pos, message)
    }

    /// The position of a binary operator, found from its right operand.
    fn op_pos(&self, right: &sql::Expr) -> Pos {
        let loc = self.start_loc(right);
        if loc.line == 0 {
            return self.fallback;
        }
        self.src.pos(self.src.back(loc, 1))
    }

    /// The position of the operator of `x ILIKE p` and the like.
    fn op_pos_of_postfix(&self, e: &sql::Expr) -> Pos {
        match e {
            sql::Expr::ILike { pattern, .. } => self.op_pos(pattern),
            _ => self.err_at(e, "").pos,
        }
    }

    /// Where `e` starts in the text, including prefix operators and the `TIMESTAMP` /
    /// `INTERVAL` keywords that sqlparser's spans leave out. Iterative, so that long
    /// operator chains cost no stack.
    fn start_loc(&self, e: &sql::Expr) -> Location {
        use sql::Expr as S;
        let mut e = e;
        let mut steps = 0;
        let loc = loop {
            match e {
                S::BinaryOp { left, .. } => e = left,
                S::Between { expr, .. }
                | S::InList { expr, .. }
                | S::InSubquery { expr, .. }
                | S::Like { expr, .. }
                | S::ILike { expr, .. }
                | S::SimilarTo { expr, .. }
                | S::RLike { expr, .. }
                | S::IsDistinctFrom(expr, _)
                | S::IsNotDistinctFrom(expr, _)
                | S::IsNull(expr)
                | S::IsNotNull(expr)
                | S::IsTrue(expr)
                | S::IsFalse(expr)
                | S::IsNotTrue(expr)
                | S::IsNotFalse(expr)
                | S::IsUnknown(expr)
                | S::IsNotUnknown(expr)
                | S::Nested(expr)
                | S::Cast {
                    kind: CastKind::DoubleColon,
                    expr,
                    ..
                } => e = expr,
                S::CompoundFieldAccess { root, .. } => e = root,
                S::UnaryOp { expr, .. } => {
                    steps += 1;
                    e = expr;
                }
                S::Interval(iv) => {
                    steps += 1;
                    e = &iv.value;
                }
                S::TypedString(ts) => {
                    steps += 1;
                    break ts.value.span.start;
                }
                S::Identifier(id) => break id.span.start,
                S::CompoundIdentifier(ids) => {
                    break ids
                        .first()
                        .map(|i| i.span.start)
                        .unwrap_or(Location::new(0, 0))
                }
                S::Value(v) => break v.span.start,
                S::Function(f) => break function_name(f).1,
                other => break other.span().start,
            }
        };
        if loc.line == 0 {
            return loc;
        }
        self.src.back(loc, steps)
    }
}

/// Removes enclosing parentheses.
fn strip(mut e: &sql::Expr) -> &sql::Expr {
    while let sql::Expr::Nested(inner) = e {
        e = inner;
    }
    e
}

fn now_partner(t: Type, now: Pos) -> Result<(), SegmentError> {
    match t {
        Type::Ts | Type::Any => Ok(()),
        other => Err(SegmentError::new(
            now,
            format!("now() must be compared with a timestamp, not {}", a(other)),
        )),
    }
}

/// Boolean, or known only at run time.
fn boolish(t: Type) -> bool {
    matches!(t, Type::Bool | Type::Any)
}

/// Whether two types may meet in a comparison: equal, one dynamic, or a timestamp and a
/// string (the string is read as an instant at run time).
fn compatible(a: Type, b: Type) -> bool {
    a == b
        || a == Type::Any
        || b == Type::Any
        || matches!((a, b), (Type::Ts, Type::Str) | (Type::Str, Type::Ts))
}

/// A type with its article, for messages: "a number".
fn a(t: Type) -> String {
    match t {
        Type::Any => "a value of unknown type".to_string(),
        other => format!("a {other}"),
    }
}

/// Source text of a node, cut short for messages.
fn shorten(x: &impl std::fmt::Display) -> String {
    let s = x.to_string();
    if s.chars().count() > 40 {
        let head: String = s.chars().take(40).collect();
        format!("{head}…")
    } else {
        s
    }
}
