//! The checked syntax tree of a segment file.
//!
//! This is what the parser produces after name resolution and type checking, and what
//! both the dataflow compiler (`plan`) and independent evaluators consume. Invariants
//! the parser guarantees: names in [`Expr::Trait`] / [`Expr::UserId`] never appear inside
//! an aggregate; [`Expr::Event`] only appears inside an aggregate; aggregates do not nest;
//! [`Expr::Now`] only appears as one side of a comparison (optionally `± INTERVAL`, folded
//! into [`Expr::Now`]'s offset) whose other side is timestamp-valued; `in_segment` names an
//! existing segment and the references form no cycle; segment order in
//! [`SegmentFile::segments`] is the file's order.

use serde::{Deserialize, Serialize};

use crate::value::Value;

/// A position in the segment file: 1-based line and column.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Pos {
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

/// A parsed and checked segment file.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentFile {
    /// The segments in file order.
    pub segments: Vec<SegmentDef>,
}

/// One `CREATE SEGMENT` statement.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentDef {
    /// The segment name, `[a-z][a-z0-9_]*`.
    pub name: String,
    /// Where the statement starts.
    pub pos: Pos,
    /// What defines membership.
    pub body: SegmentBody,
}

/// What defines a segment's membership.
#[derive(Clone, Debug, PartialEq)]
pub enum SegmentBody {
    /// `AS <boolean expression>` over one user.
    Expr(Expr),
    /// `FROM CSV 'url'`: the ids in the file's `user_id` column (or its first column).
    Csv {
        /// Local path or object-store URL of the CSV file.
        url: String,
    },
    /// `FROM WAREHOUSE 'query' REFRESH EVERY INTERVAL '…'`.
    Warehouse {
        /// The SQL query, run on the warehouse connection; returns a `user_id` column.
        query: String,
        /// Refresh period in milliseconds.
        refresh_ms: i64,
    },
}

/// Fields of an event, as names inside an aggregate refer to them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventField {
    /// `event`: the track event name; for page/screen the `name`; NULL otherwise.
    Event,
    /// `type`: `track`, `identify`, `page`, `screen`, `group`, `alias`.
    Type,
    /// `timestamp`: the event's instant.
    Timestamp,
    /// `message_id`.
    MessageId,
    /// `user_id`: the event's user key.
    UserId,
    /// A dotted path into `properties`, `context` or `traits`.
    Path(PathRoot, Vec<String>),
}

/// The JSON object a dotted path starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PathRoot {
    /// `properties.…`
    Properties,
    /// `context.…`
    Context,
    /// `traits.…`
    Traits,
}

/// Aggregate functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AggKind {
    /// `count(*)`, `count(x)`, `count(DISTINCT x)`.
    Count,
    /// `sum(x)`.
    Sum,
    /// `avg(x)`.
    Avg,
    /// `min(x)`.
    Min,
    /// `max(x)`.
    Max,
    /// `first(x)`: x on the earliest matching event by (`timestamp`, `message_id`).
    First,
    /// `last(x)`: x on the latest matching event by (`timestamp`, `message_id`).
    Last,
}

/// `agg(arg) [FILTER (WHERE pred)]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Aggregate {
    /// Which aggregate.
    pub kind: AggKind,
    /// The argument; `None` only for `count(*)`.
    pub arg: Option<Expr>,
    /// `count(DISTINCT x)`.
    pub distinct: bool,
    /// The FILTER predicate, over the event.
    pub filter: Option<Expr>,
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>` or `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// Arithmetic operators on numbers (and `timestamp ± INTERVAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (division by zero is NULL)
    Div,
}

/// A checked expression. Evaluated either for a user (outside aggregates) or for one
/// event (inside an aggregate's argument and FILTER).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Expr {
    /// A literal: string, number, boolean, NULL, or `TIMESTAMP '…'`.
    Lit(Value),
    /// `INTERVAL '…'` in milliseconds; only as the right side of `±` on a timestamp.
    Interval(i64),
    /// `now()` plus a fixed offset in ms (`now() - INTERVAL '7 days'` is `Now(-604800000)`).
    Now(i64),
    /// `user_id` outside an aggregate: the user key.
    UserId,
    /// A user trait (bare identifier, `traits.<name>` or a quoted identifier).
    Trait(String),
    /// A field of the event (inside an aggregate only).
    Event(EventField),
    /// An aggregate over the user's events (outside aggregates only).
    Agg(Box<Aggregate>),
    /// A comparison; NULL if either side is NULL or the types differ.
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    /// Arithmetic.
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    /// Unary minus.
    Neg(Box<Expr>),
    /// `a AND b`, three-valued.
    And(Box<Expr>, Box<Expr>),
    /// `a OR b`, three-valued.
    Or(Box<Expr>, Box<Expr>),
    /// `NOT a`, three-valued.
    Not(Box<Expr>),
    /// `x IS NULL` (`negated`: `IS NOT NULL`).
    IsNull {
        /// The tested expression.
        expr: Box<Expr>,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `x [NOT] IN (a, b, …)`, with SQL's NULL rules.
    InList {
        /// The tested expression.
        expr: Box<Expr>,
        /// The list.
        list: Vec<Expr>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `x [NOT] BETWEEN low AND high` (inclusive).
    Between {
        /// The tested expression.
        expr: Box<Expr>,
        /// Lower bound.
        low: Box<Expr>,
        /// Upper bound.
        high: Box<Expr>,
        /// `NOT BETWEEN`.
        negated: bool,
    },
    /// `x [NOT] LIKE pattern` (`%`, `_`, case-sensitive).
    Like {
        /// The tested expression.
        expr: Box<Expr>,
        /// The pattern.
        pattern: Box<Expr>,
        /// `NOT LIKE`.
        negated: bool,
    },
    /// `coalesce(a, b, …)`: the first non-NULL argument.
    Coalesce(Vec<Expr>),
    /// `lower(s)`.
    Lower(Box<Expr>),
    /// `upper(s)`.
    Upper(Box<Expr>),
    /// `in_segment('name')`: boolean, never NULL.
    InSegment(String),
    /// `hash_bucket(key, 'salt', n)`: xxh3-64 of `salt || ':' || key`, modulo `n`.
    HashBucket {
        /// The hashed key (usually `user_id`).
        key: Box<Expr>,
        /// The salt.
        salt: String,
        /// Number of buckets, > 0.
        n: u64,
    },
}

impl Expr {
    /// Calls `f` on this node and every node below it, outside aggregates: an aggregate's
    /// argument and FILTER are about its events, not about the row the expression reads.
    pub fn walk(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Cmp(_, a, b) | Expr::Arith(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                a.walk(f);
                b.walk(f);
            }
            Expr::Neg(a) | Expr::Not(a) | Expr::Lower(a) | Expr::Upper(a) => a.walk(f),
            Expr::IsNull { expr, .. } => expr.walk(f),
            Expr::InList { expr, list, .. } => {
                expr.walk(f);
                list.iter().for_each(|x| x.walk(f));
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                expr.walk(f);
                low.walk(f);
                high.walk(f);
            }
            Expr::Like { expr, pattern, .. } => {
                expr.walk(f);
                pattern.walk(f);
            }
            Expr::Coalesce(l) => l.iter().for_each(|x| x.walk(f)),
            Expr::HashBucket { key, .. } => key.walk(f),
            Expr::Lit(_)
            | Expr::Interval(_)
            | Expr::Now(_)
            | Expr::UserId
            | Expr::Trait(_)
            | Expr::Event(_)
            | Expr::Agg(_)
            | Expr::InSegment(_) => {}
        }
    }
}
