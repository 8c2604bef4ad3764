//! Renders checked expressions back as segment-language text.
//!
//! Used by `herald check` to print plans and by tests to name a failing expression. The
//! output re-parses to the same tree; parentheses are added around every compound operand
//! rather than minimised.

use std::fmt::{self, Display, Formatter};

use crate::ast::{AggKind, ArithOp, CmpOp, EventField, Expr, PathRoot};

/// Names that mean something else when bare; a trait with one of them must be quoted.
const RESERVED: &[&str] = &[
    "event",
    "type",
    "timestamp",
    "message_id",
    "user_id",
    "now",
    "properties",
    "context",
    "traits",
    "and",
    "or",
    "not",
    "null",
    "true",
    "false",
    "in",
    "is",
    "like",
    "between",
];

fn ident(name: &str) -> String {
    let plain = !RESERVED.contains(&name.to_ascii_lowercase().as_str())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn interval(ms: i64) -> String {
    let (n, unit) = if ms % 86_400_000 == 0 {
        (ms / 86_400_000, "day")
    } else if ms % 3_600_000 == 0 {
        (ms / 3_600_000, "hour")
    } else if ms % 60_000 == 0 {
        (ms / 60_000, "minute")
    } else {
        return format!("INTERVAL '{} seconds'", ms as f64 / 1000.0);
    };
    let plural = if n == 1 { "" } else { "s" };
    format!("INTERVAL '{n} {unit}{plural}'")
}

impl Display for EventField {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            EventField::Event => f.write_str("event"),
            EventField::Type => f.write_str("type"),
            EventField::Timestamp => f.write_str("timestamp"),
            EventField::MessageId => f.write_str("message_id"),
            EventField::UserId => f.write_str("user_id"),
            EventField::Path(root, path) => {
                f.write_str(match root {
                    PathRoot::Properties => "properties",
                    PathRoot::Context => "context",
                    PathRoot::Traits => "traits",
                })?;
                for p in path {
                    write!(f, ".{}", ident(p))?;
                }
                Ok(())
            }
        }
    }
}

fn op_str(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Eq => "=",
        CmpOp::Ne => "<>",
        CmpOp::Lt => "<",
        CmpOp::Le => "<=",
        CmpOp::Gt => ">",
        CmpOp::Ge => ">=",
    }
}

struct Operand<'a>(&'a Expr);

impl Display for Operand<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.0 {
            Expr::Lit(_)
            | Expr::Interval(_)
            | Expr::UserId
            | Expr::Trait(_)
            | Expr::Event(_)
            | Expr::Agg(_)
            | Expr::Coalesce(_)
            | Expr::Lower(_)
            | Expr::Upper(_)
            | Expr::InSegment(_)
            | Expr::HashBucket { .. } => write!(f, "{}", self.0),
            Expr::Now(0) => write!(f, "{}", self.0),
            _ => write!(f, "({})", self.0),
        }
    }
}

impl Display for Expr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Lit(v) => write!(f, "{v}"),
            Expr::Interval(ms) => f.write_str(&interval(*ms)),
            Expr::Now(0) => f.write_str("now()"),
            Expr::Now(off) if *off < 0 => write!(f, "now() - {}", interval(-off)),
            Expr::Now(off) => write!(f, "now() + {}", interval(*off)),
            Expr::UserId => f.write_str("user_id"),
            Expr::Trait(name) => f.write_str(&ident(name)),
            Expr::Event(field) => write!(f, "{field}"),
            Expr::Agg(agg) => {
                let name = match agg.kind {
                    AggKind::Count => "count",
                    AggKind::Sum => "sum",
                    AggKind::Avg => "avg",
                    AggKind::Min => "min",
                    AggKind::Max => "max",
                    AggKind::First => "first",
                    AggKind::Last => "last",
                };
                match &agg.arg {
                    None => write!(f, "{name}(*)")?,
                    Some(a) if agg.distinct => write!(f, "{name}(DISTINCT {a})")?,
                    Some(a) => write!(f, "{name}({a})")?,
                }
                if let Some(filter) = &agg.filter {
                    write!(f, " FILTER (WHERE {filter})")?;
                }
                Ok(())
            }
            Expr::Cmp(op, a, b) => write!(f, "{} {} {}", Operand(a), op_str(*op), Operand(b)),
            Expr::Arith(op, a, b) => {
                let o = match op {
                    ArithOp::Add => "+",
                    ArithOp::Sub => "-",
                    ArithOp::Mul => "*",
                    ArithOp::Div => "/",
                };
                write!(f, "{} {o} {}", Operand(a), Operand(b))
            }
            Expr::Neg(a) => write!(f, "-{}", Operand(a)),
            Expr::And(a, b) => write!(f, "{} AND {}", Operand(a), Operand(b)),
            Expr::Or(a, b) => write!(f, "{} OR {}", Operand(a), Operand(b)),
            Expr::Not(a) => write!(f, "NOT {}", Operand(a)),
            Expr::IsNull { expr, negated } => {
                write!(
                    f,
                    "{} IS {}NULL",
                    Operand(expr),
                    if *negated { "NOT " } else { "" }
                )
            }
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let items: Vec<String> = list.iter().map(|i| i.to_string()).collect();
                write!(
                    f,
                    "{} {}IN ({})",
                    Operand(expr),
                    if *negated { "NOT " } else { "" },
                    items.join(", ")
                )
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => write!(
                f,
                "{} {}BETWEEN {} AND {}",
                Operand(expr),
                if *negated { "NOT " } else { "" },
                Operand(low),
                Operand(high)
            ),
            Expr::Like {
                expr,
                pattern,
                negated,
            } => write!(
                f,
                "{} {}LIKE {}",
                Operand(expr),
                if *negated { "NOT " } else { "" },
                Operand(pattern)
            ),
            Expr::Coalesce(list) => {
                let items: Vec<String> = list.iter().map(|i| i.to_string()).collect();
                write!(f, "coalesce({})", items.join(", "))
            }
            Expr::Lower(a) => write!(f, "lower({a})"),
            Expr::Upper(a) => write!(f, "upper({a})"),
            Expr::InSegment(name) => write!(f, "in_segment('{name}')"),
            Expr::HashBucket { key, salt, n } => {
                write!(f, "hash_bucket({key}, '{}', {n})", salt.replace('\'', "''"))
            }
        }
    }
}

/// A statement as it re-parses: `CREATE SEGMENT name AS …;` (or `FROM CSV` / `FROM
/// WAREHOUSE`), on one line.
impl Display for crate::ast::SegmentDef {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        use crate::ast::SegmentBody;
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        match &self.body {
            SegmentBody::Expr(e) => write!(f, "CREATE SEGMENT {} AS {e};", self.name),
            SegmentBody::Csv { url } => {
                write!(f, "CREATE SEGMENT {} FROM CSV {};", self.name, quote(url))
            }
            SegmentBody::Warehouse { query, refresh_ms } => write!(
                f,
                "CREATE SEGMENT {} FROM WAREHOUSE {} REFRESH EVERY {};",
                self.name,
                quote(query),
                interval(*refresh_ms)
            ),
        }
    }
}

/// A file as it re-parses: one statement per line, in file order.
impl Display for crate::ast::SegmentFile {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for s in &self.segments {
            writeln!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    #[test]
    fn renders_timestamps_and_windows() {
        let e = Expr::Cmp(
            CmpOp::Gt,
            Box::new(Expr::Event(EventField::Timestamp)),
            Box::new(Expr::Now(-7 * 86_400_000)),
        );
        assert_eq!(e.to_string(), "timestamp > (now() - INTERVAL '7 days')");
        assert_eq!(
            Expr::Lit(Value::Ts(0)).to_string(),
            "TIMESTAMP '1970-01-01T00:00:00.000Z'"
        );
    }
}
