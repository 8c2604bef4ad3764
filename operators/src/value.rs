//! Values of the segment language: JSON-like scalars with a total order.
//!
//! Owns [`Value`], its comparison rules (integers and floats compare numerically,
//! values of different types do not compare: the result is SQL NULL) and the
//! conversion from JSON. Timestamps are milliseconds since the Unix epoch (UTC).
//! Does not own expression evaluation (see `eval`).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::time::{format_rfc3339_ms, parse_rfc3339_ms};

/// A 64-bit float with a total order (`f64::total_cmp`), so it can key arrangements.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Num(pub f64);

impl PartialEq for Num {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Num {}
impl PartialOrd for Num {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Num {
    fn cmp(&self, other: &Self) -> Ordering {
        // -0.0 and 0.0 are the same number to an analyst.
        let a = if self.0 == 0.0 { 0.0 } else { self.0 };
        let b = if other.0 == 0.0 { 0.0 } else { other.0 };
        a.total_cmp(&b)
    }
}
impl std::hash::Hash for Num {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let v = if self.0 == 0.0 { 0.0 } else { self.0 };
        v.to_bits().hash(state)
    }
}

/// A scalar value. The derived order is only used to arrange data (type first, then value);
/// SQL comparison between values is [`Value::sql_cmp`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL: absent, unknown.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number (64-bit float; JSON integers become floats).
    Num(Num),
    /// A string.
    Str(String),
    /// An instant, milliseconds since the Unix epoch, UTC.
    Ts(i64),
}

/// The type of a value, as the type checker and error messages see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Type {
    /// Boolean.
    Bool,
    /// Number.
    Num,
    /// String.
    Str,
    /// Timestamp.
    Ts,
    /// A dynamically typed value (event properties, traits): known only at run time.
    Any,
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Type::Bool => "boolean",
            Type::Num => "number",
            Type::Str => "string",
            Type::Ts => "timestamp",
            Type::Any => "any",
        })
    }
}

impl Value {
    /// Bytes the value holds on the heap (a string's capacity), for state counts.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Value::Str(s) => s.capacity(),
            _ => 0,
        }
    }

    /// A number value.
    pub fn num(v: f64) -> Value {
        Value::Num(Num(v))
    }

    /// True for SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The run-time type, `None` for NULL.
    pub fn type_of(&self) -> Option<Type> {
        match self {
            Value::Null => None,
            Value::Bool(_) => Some(Type::Bool),
            Value::Num(_) => Some(Type::Num),
            Value::Str(_) => Some(Type::Str),
            Value::Ts(_) => Some(Type::Ts),
        }
    }

    /// The number, if this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Num(n) => Some(n.0),
            _ => None,
        }
    }

    /// The instant, if this is a timestamp or a string holding an RFC 3339 instant
    /// (JSON has no timestamp type, so traits and properties carry them as strings).
    pub fn as_ts(&self) -> Option<i64> {
        match self {
            Value::Ts(t) => Some(*t),
            Value::Str(s) => parse_rfc3339_ms(s).ok(),
            _ => None,
        }
    }

    /// SQL comparison. `None` when either side is NULL or the types do not compare
    /// (a string with a number); see [`Value::type_mismatch`] to tell the two apart.
    /// A string compares with a timestamp when it parses as RFC 3339.
    pub fn sql_cmp(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Null, _) | (_, Value::Null) => None,
            (Value::Num(a), Value::Num(b)) => a.0.partial_cmp(&b.0),
            (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
            (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
            (Value::Ts(a), Value::Ts(b)) => Some(a.cmp(b)),
            (Value::Ts(a), Value::Str(_)) => other.as_ts().map(|b| a.cmp(&b)),
            (Value::Str(_), Value::Ts(b)) => self.as_ts().map(|a| a.cmp(b)),
            _ => None,
        }
    }

    /// True when both sides are non-NULL and [`Value::sql_cmp`] still returned `None`:
    /// the comparison of different types the spec counts in a metric.
    pub fn type_mismatch(&self, other: &Value) -> bool {
        !self.is_null() && !other.is_null() && self.sql_cmp(other).is_none()
    }

    /// Converts a JSON value. Objects and arrays have no scalar meaning here and become
    /// their JSON text, so that `IS NULL` and `=` still behave predictably.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => n.as_f64().map(Value::num).unwrap_or(Value::Null),
            serde_json::Value::String(s) => Value::Str(s.clone()),
            other => Value::Str(other.to_string()),
        }
    }

    /// Renders the value as JSON (timestamps as RFC 3339 strings with milliseconds).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Num(n) => serde_json::Number::from_f64(n.0)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::Ts(t) => serde_json::Value::String(format_rfc3339_ms(*t)),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Num(n) => write!(f, "{}", n.0),
            Value::Str(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Value::Ts(t) => write!(f, "TIMESTAMP '{}'", format_rfc3339_ms(*t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_numerically_and_types_do_not_mix() {
        assert_eq!(
            Value::num(3.0).sql_cmp(&Value::num(3.5)),
            Some(Ordering::Less)
        );
        assert_eq!(Value::num(1.0).sql_cmp(&Value::Str("1".into())), None);
        assert!(Value::num(1.0).type_mismatch(&Value::Str("1".into())));
        assert!(!Value::Null.type_mismatch(&Value::num(1.0)));
    }

    #[test]
    fn strings_holding_instants_compare_with_timestamps() {
        let t = parse_rfc3339_ms("2026-03-01T00:00:00Z").unwrap();
        let s = Value::Str("2026-03-02T00:00:00Z".into());
        assert_eq!(Value::Ts(t).sql_cmp(&s), Some(Ordering::Less));
        assert_eq!(Value::Ts(t).sql_cmp(&Value::Str("soon".into())), None);
    }
}
