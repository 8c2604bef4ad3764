//! Names and literals: what identifiers, dotted paths, literals, `TIMESTAMP '…'` and
//! `INTERVAL '…'` mean, depending on whether they sit inside an aggregate.

use sqlparser::ast::{self as sql, DataType};

use super::{interval_text_ms, shorten, Lower, Lowered, Scope};
use crate::lang::ast::{EventField, Expr, PathRoot};
use crate::lang::parse::SegmentError;
use crate::time::parse_rfc3339_ms;
use crate::value::{Type, Value};

impl Lower<'_, '_> {
    /// A bare name.
    pub(super) fn ident(
        &mut self,
        id: &sql::Ident,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let pos = self.src.pos(id.span.start);
        if id.value.is_empty() {
            return Err(SegmentError::new(pos, "a quoted name cannot be empty"));
        }
        let quoted = id.quote_style.is_some();
        let lower = id.value.to_ascii_lowercase();
        // A quoted name means exactly what it spells; unquoted field names match in any case.
        let field = if quoted {
            id.value.as_str()
        } else {
            lower.as_str()
        };
        match scope {
            Scope::Where
                if !quoted && ["event", "type", "timestamp", "message_id"].contains(&field) =>
            {
                self.ident(id, Scope::Event("where"))
            }
            Scope::User | Scope::Where => {
                if quoted {
                    return Ok((Expr::Trait(id.value.clone()), Type::Any));
                }
                match field {
                    "user_id" => Ok((Expr::UserId, Type::Str)),
                    "event" | "type" | "timestamp" | "message_id" => Err(SegmentError::new(
                        pos,
                        format!(
                            "'{field}' is an event field and only means something inside an \
                             aggregate, like count(*) FILTER (WHERE {field} = …); for a trait \
                             named {field}, write \"{field}\""
                        ),
                    )),
                    "properties" | "context" => Err(SegmentError::new(
                        pos,
                        format!(
                            "'{field}' belongs to events; use {field}.<name> inside an aggregate"
                        ),
                    )),
                    "traits" => Err(SegmentError::new(
                        pos,
                        "write traits.<name> to use a trait, like traits.plan",
                    )),
                    "now" => Err(SegmentError::new(pos, "now needs parentheses: now()")),
                    _ => Ok((Expr::Trait(id.value.clone()), Type::Any)),
                }
            }
            Scope::Event(_) => match field {
                "event" => Ok((Expr::Event(EventField::Event), Type::Str)),
                "type" => Ok((Expr::Event(EventField::Type), Type::Str)),
                "timestamp" => Ok((Expr::Event(EventField::Timestamp), Type::Ts)),
                "message_id" => Ok((Expr::Event(EventField::MessageId), Type::Str)),
                "user_id" => Ok((Expr::Event(EventField::UserId), Type::Str)),
                "properties" | "context" | "traits" => Err(SegmentError::new(
                    pos,
                    format!("'{field}' needs a path, like {field}.plan"),
                )),
                _ => Err(SegmentError::new(
                    pos,
                    format!(
                        "'{}' is a user trait and cannot appear inside an aggregate; inside an \
                         aggregate names refer to the event",
                        id.value
                    ),
                )),
            },
        }
    }

    /// A dotted name: `traits.plan` outside aggregates, `properties.a.b` inside.
    pub(super) fn compound(
        &mut self,
        parts: &[sql::Ident],
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let Some((root, rest)) = parts.split_first() else {
            return Err(SegmentError::new(self.fallback, "empty name"));
        };
        let pos = self.src.pos(root.span.start);
        if let Some(empty) = parts.iter().find(|p| p.value.is_empty()) {
            return Err(SegmentError::new(
                self.src.pos(empty.span.start),
                "a quoted name cannot be empty",
            ));
        }
        let root_name = if root.quote_style.is_some() {
            root.value.clone()
        } else {
            root.value.to_ascii_lowercase()
        };
        let dotted = parts
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(".");
        let path: Vec<String> = rest.iter().map(|p| p.value.clone()).collect();
        match scope {
            Scope::Where if matches!(root_name.as_str(), "properties" | "context") => {
                self.compound(parts, Scope::Event("where"))
            }
            Scope::User | Scope::Where => match (root_name.as_str(), path.as_slice()) {
                ("traits", [name]) => Ok((Expr::Trait(name.clone()), Type::Any)),
                ("traits", _) => Err(SegmentError::new(
                    pos,
                    format!(
                        "{dotted}: outside an aggregate a trait is one name, like traits.plan; \
                         quote a name that contains dots: traits.\"a.b\""
                    ),
                )),
                ("properties" | "context", _) => Err(SegmentError::new(
                    pos,
                    format!("{dotted} is an event field; use it inside an aggregate"),
                )),
                _ => Err(SegmentError::new(
                    pos,
                    format!(
                        "unknown name {dotted}: outside an aggregate a dotted name must be \
                         traits.<name>"
                    ),
                )),
            },
            Scope::Event(_) => {
                let root = match root_name.as_str() {
                    "properties" => PathRoot::Properties,
                    "context" => PathRoot::Context,
                    "traits" => PathRoot::Traits,
                    _ => {
                        return Err(SegmentError::new(
                            pos,
                            format!(
                                "unknown event field {dotted}: inside an aggregate a dotted \
                                 path starts with properties., context. or traits."
                            ),
                        ))
                    }
                };
                Ok((Expr::Event(EventField::Path(root, path)), Type::Any))
            }
        }
    }

    pub(super) fn literal(&self, v: &sql::ValueWithSpan) -> Result<Lowered, SegmentError> {
        let pos = self.src.pos(v.span.start);
        match &v.value {
            sql::Value::Number(s, _) => match s.parse::<f64>() {
                Ok(n) if n.is_finite() => Ok((Expr::Lit(Value::num(n)), Type::Num)),
                _ => Err(SegmentError::new(
                    pos,
                    format!("{s} is not a number this language can hold (64-bit float)"),
                )),
            },
            sql::Value::SingleQuotedString(s) | sql::Value::EscapedStringLiteral(s) => {
                Ok((Expr::Lit(Value::Str(s.clone())), Type::Str))
            }
            sql::Value::Boolean(b) => Ok((Expr::Lit(Value::Bool(*b)), Type::Bool)),
            sql::Value::Null => Ok((Expr::Lit(Value::Null), Type::Any)),
            other => Err(SegmentError::new(
                pos,
                format!(
                    "the literal {} is not supported; write strings in single quotes",
                    shorten(other)
                ),
            )),
        }
    }

    /// `TIMESTAMP '…'`.
    pub(super) fn typed_string(
        &self,
        e: &sql::Expr,
        ts: &sql::TypedString,
    ) -> Result<Lowered, SegmentError> {
        if !matches!(ts.data_type, DataType::Timestamp(..)) {
            return Err(self.err_at(
                e,
                format!(
                    "{} literals are not supported; write an instant as \
                     TIMESTAMP '2026-05-01T00:00:00Z'",
                    ts.data_type
                ),
            ));
        }
        let pos = self.src.pos(ts.value.span.start);
        let text = match &ts.value.value {
            sql::Value::SingleQuotedString(s) | sql::Value::EscapedStringLiteral(s) => s,
            _ => return Err(SegmentError::new(pos, "TIMESTAMP needs a quoted instant")),
        };
        match parse_rfc3339_ms(text) {
            Ok(ms) => Ok((Expr::Lit(Value::Ts(ms)), Type::Ts)),
            Err(_) => Err(SegmentError::new(
                pos,
                format!(
                    "TIMESTAMP '{text}' is not a valid RFC 3339 instant; write it like \
                     '2026-05-01T00:00:00Z'"
                ),
            )),
        }
    }

    /// `INTERVAL '7 days'` or `INTERVAL '7' DAY`, in milliseconds.
    pub(super) fn interval(&self, iv: &sql::Interval) -> Result<i64, SegmentError> {
        let text = match iv.value.as_ref() {
            sql::Expr::Value(sql::ValueWithSpan {
                value: sql::Value::SingleQuotedString(s),
                ..
            }) if iv.last_field.is_none()
                && iv.leading_precision.is_none()
                && iv.fractional_seconds_precision.is_none() =>
            {
                s
            }
            other => {
                return Err(self.err_at(
                    other,
                    "write an interval as a quoted amount and unit, like INTERVAL '7 days'",
                ))
            }
        };
        let text = match &iv.leading_field {
            Some(unit) => format!("{text} {}", unit.to_string().to_ascii_lowercase()),
            None => text.clone(),
        };
        interval_text_ms(&text).map_err(|m| self.err_at(&iv.value, m))
    }
}
