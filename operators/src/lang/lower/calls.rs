//! Function calls: the aggregates (with DISTINCT and FILTER) and the scalar functions
//! `coalesce`, `lower`, `upper`, `in_segment`, `hash_bucket`.

use sqlparser::ast::{
    self as sql, DuplicateTreatment, FunctionArg, FunctionArgExpr, FunctionArguments,
    ObjectNamePart, Spanned,
};
use sqlparser::tokenizer::Location;

use super::{a, boolish, compatible, strip, Lower, Lowered, Scope, SegmentRef, FUNCTIONS, NOW_USE};
use crate::lang::ast::{AggKind, Aggregate, Expr, Pos};
use crate::lang::parse::SegmentError;
use crate::value::{Type, Value};

impl Lower<'_, '_> {
    pub(super) fn function(
        &mut self,
        f: &sql::Function,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let (name, loc) = function_name(f);
        let pos = self.src.pos(loc);
        let kind = match name.as_str() {
            "count" => Some(AggKind::Count),
            "sum" => Some(AggKind::Sum),
            "avg" => Some(AggKind::Avg),
            "min" => Some(AggKind::Min),
            "max" => Some(AggKind::Max),
            "first" => Some(AggKind::First),
            "last" => Some(AggKind::Last),
            "now" | "coalesce" | "lower" | "upper" | "in_segment" | "hash_bucket" => None,
            "current_timestamp" | "current_date" | "localtimestamp" => {
                return Err(SegmentError::new(
                    pos,
                    format!("unknown function '{name}'; the evaluation time is now()"),
                ))
            }
            _ => {
                return Err(SegmentError::new(
                    pos,
                    format!("unknown function '{name}'; the functions are {FUNCTIONS}"),
                ))
            }
        };
        let (args, distinct) = self.call_args(f, &name, pos)?;
        if let Some(kind) = kind {
            return self.aggregate(f, kind, &name, pos, &args, distinct, scope);
        }
        if f.filter.is_some() {
            return Err(SegmentError::new(
                pos,
                format!(
                    "FILTER only follows an aggregate (count, sum, avg, min, max, first, last), \
                     not {name}()"
                ),
            ));
        }
        if distinct {
            return Err(SegmentError::new(
                pos,
                "DISTINCT is only allowed in count: count(DISTINCT x)",
            ));
        }
        let exprs = args
            .iter()
            .map(|arg| match arg {
                FunctionArgExpr::Expr(x) => Ok(x),
                _ => Err(SegmentError::new(
                    pos,
                    "'*' only works with count: count(*)",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match name.as_str() {
            "now" => Err(SegmentError::new(pos, NOW_USE)),
            "coalesce" => self.coalesce(&exprs, pos, scope),
            "lower" | "upper" => {
                let [x] = exprs.as_slice() else {
                    return Err(SegmentError::new(pos, format!("{name} takes one argument")));
                };
                let (y, t) = self.expr(x, scope)?;
                if !matches!(t, Type::Str | Type::Any) {
                    return Err(self.err_at(x, format!("{name}() needs a string, found {}", a(t))));
                }
                let y = Box::new(y);
                let out = if name == "lower" {
                    Expr::Lower(y)
                } else {
                    Expr::Upper(y)
                };
                Ok((out, Type::Str))
            }
            "in_segment" => {
                if let Scope::Event(agg) = scope {
                    return Err(SegmentError::new(
                        pos,
                        format!(
                            "in_segment() is about the user and cannot appear inside an \
                             aggregate ('{agg}')"
                        ),
                    ));
                }
                let target = match exprs.as_slice() {
                    [x] => string_lit(x),
                    _ => None,
                };
                let Some(target) = target else {
                    return Err(SegmentError::new(
                        pos,
                        "in_segment needs one segment name in quotes, like in_segment('vip')",
                    ));
                };
                self.refs.push(SegmentRef {
                    name: target.clone(),
                    pos,
                });
                Ok((Expr::InSegment(target), Type::Bool))
            }
            _ => self.hash_bucket(&exprs, pos, scope),
        }
    }

    /// The plain arguments of a call and whether DISTINCT was given; rejects the SQL
    /// extras this language has no use for.
    pub(super) fn call_args<'f>(
        &self,
        f: &'f sql::Function,
        name: &str,
        pos: Pos,
    ) -> Result<(Vec<&'f FunctionArgExpr>, bool), SegmentError> {
        let unsupported =
            |what: &str| Err(SegmentError::new(pos, format!("{what} is not supported")));
        if f.over.is_some() {
            return unsupported("a window (OVER …)");
        }
        if !f.within_group.is_empty() {
            return unsupported("WITHIN GROUP");
        }
        if f.null_treatment.is_some() {
            return unsupported("IGNORE / RESPECT NULLS");
        }
        if !matches!(f.parameters, FunctionArguments::None) || f.uses_odbc_syntax {
            return unsupported(&format!("this form of {name}()"));
        }
        let list = match &f.args {
            FunctionArguments::List(list) => list,
            FunctionArguments::None => {
                return Err(SegmentError::new(
                    pos,
                    format!("{name} needs parentheses: {name}(…)"),
                ))
            }
            FunctionArguments::Subquery(_) => return unsupported("a subquery"),
        };
        if !list.clauses.is_empty() {
            return unsupported(&format!("{name}(… ORDER BY / LIMIT …)"));
        }
        let args = list
            .args
            .iter()
            .map(|arg| match arg {
                FunctionArg::Unnamed(x) => Ok(x),
                _ => Err(SegmentError::new(pos, "named arguments are not supported")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            args,
            list.duplicate_treatment == Some(DuplicateTreatment::Distinct),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn aggregate(
        &mut self,
        f: &sql::Function,
        kind: AggKind,
        name: &str,
        pos: Pos,
        args: &[&FunctionArgExpr],
        distinct: bool,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        if let Scope::Event(outer) = scope {
            return Err(SegmentError::new(
                pos,
                format!("aggregates do not nest: '{name}' inside '{outer}'"),
            ));
        }
        let [arg] = args else {
            let form = if kind == AggKind::Count {
                "count(*), count(x) or count(DISTINCT x)".to_string()
            } else {
                format!("{name}(properties.revenue)")
            };
            return Err(SegmentError::new(
                pos,
                format!("{name} takes exactly one argument, like {form}"),
            ));
        };
        let inner = Scope::Event(name);
        let (arg, arg_type) = match arg {
            FunctionArgExpr::Wildcard if kind == AggKind::Count => {
                if distinct {
                    return Err(SegmentError::new(
                        pos,
                        "count(DISTINCT *) is not allowed; write count(DISTINCT x)",
                    ));
                }
                (None, Type::Num)
            }
            FunctionArgExpr::Expr(x) => {
                if distinct && kind != AggKind::Count {
                    return Err(SegmentError::new(
                        self.src.pos(self.src.back(self.start_loc(x), 1)),
                        format!("DISTINCT is only allowed in count(DISTINCT x), not in {name}"),
                    ));
                }
                let (y, t) = self.expr(x, inner)?;
                let ok = match kind {
                    AggKind::Sum | AggKind::Avg => matches!(t, Type::Num | Type::Any),
                    AggKind::Min | AggKind::Max => t != Type::Bool,
                    _ => true,
                };
                if !ok {
                    let wants = if matches!(kind, AggKind::Sum | AggKind::Avg) {
                        "a number"
                    } else {
                        "a number, a timestamp or a string"
                    };
                    return Err(self.err_at(x, format!("{name}() needs {wants}, found {}", a(t))));
                }
                (Some(y), t)
            }
            _ => {
                return Err(SegmentError::new(
                    pos,
                    format!("'*' only works with count: count(*), not {name}(*)"),
                ))
            }
        };
        let filter = match &f.filter {
            Some(pred) => {
                let (p, t) = self.expr(pred, inner)?;
                if !boolish(t) {
                    return Err(self.err_at(
                        pred,
                        format!("the FILTER condition must be boolean, found {}", a(t)),
                    ));
                }
                Some(p)
            }
            None => None,
        };
        let result = match kind {
            AggKind::Count | AggKind::Sum | AggKind::Avg => Type::Num,
            _ => arg_type,
        };
        let agg = Aggregate {
            kind,
            arg,
            distinct,
            filter,
        };
        Ok((Expr::Agg(Box::new(agg)), result))
    }

    pub(super) fn coalesce(
        &mut self,
        args: &[&sql::Expr],
        pos: Pos,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        if args.is_empty() {
            return Err(SegmentError::new(
                pos,
                "coalesce needs at least one argument",
            ));
        }
        let mut out = Vec::with_capacity(args.len());
        let mut known: Option<Type> = None;
        let mut any = false;
        for x in args {
            let (y, t) = self.expr(x, scope)?;
            if t == Type::Any {
                // NULL is the only Any literal: it does not make the result dynamic.
                any |= y != Expr::Lit(Value::Null);
            } else {
                match known {
                    Some(k) if k != t && !compatible(k, t) => {
                        return Err(self.err_at(
                            x,
                            format!(
                                "coalesce arguments must have one type, found {} and {}",
                                a(k),
                                a(t)
                            ),
                        ))
                    }
                    // A string next to a timestamp: the value may be either at run time.
                    Some(k) if k != t => any = true,
                    _ => known = Some(t),
                }
            }
            out.push(y);
        }
        let t = if any {
            Type::Any
        } else {
            known.unwrap_or(Type::Any)
        };
        Ok((Expr::Coalesce(out), t))
    }

    pub(super) fn hash_bucket(
        &mut self,
        args: &[&sql::Expr],
        pos: Pos,
        scope: Scope<'_>,
    ) -> Result<Lowered, SegmentError> {
        let [key, salt, n] = args else {
            return Err(SegmentError::new(
                pos,
                "hash_bucket takes three arguments, like hash_bucket(user_id, 'salt', 100)",
            ));
        };
        let (key, _) = self.expr(key, scope)?;
        let Some(salt_text) = string_lit(salt) else {
            return Err(self.err_at(
                salt,
                "hash_bucket's second argument must be a quoted salt, like \
                 hash_bucket(user_id, 'salt', 100)",
            ));
        };
        let buckets = match strip(n) {
            sql::Expr::Value(sql::ValueWithSpan {
                value: sql::Value::Number(s, _),
                ..
            }) => s.parse::<u64>().ok(),
            _ => None,
        };
        match buckets {
            Some(0) => Err(self.err_at(
                n,
                "hash_bucket needs at least one bucket: the third argument must be above zero",
            )),
            Some(n) => Ok((
                Expr::HashBucket {
                    key: Box::new(key),
                    salt: salt_text,
                    n,
                },
                Type::Num,
            )),
            None => Err(self.err_at(
                n,
                "hash_bucket's third argument is the number of buckets, a whole number above \
                 zero, like hash_bucket(user_id, 'salt', 100)",
            )),
        }
    }
}

/// The lowercase name of a function and where it starts.
pub(super) fn function_name(f: &sql::Function) -> (String, Location) {
    match f.name.0.as_slice() {
        [ObjectNamePart::Identifier(id)] => (id.value.to_ascii_lowercase(), id.span.start),
        _ => (f.name.to_string(), f.name.span().start),
    }
}

fn string_lit(e: &sql::Expr) -> Option<String> {
    match strip(e) {
        sql::Expr::Value(sql::ValueWithSpan {
            value: sql::Value::SingleQuotedString(s) | sql::Value::EscapedStringLiteral(s),
            ..
        }) => Some(s.clone()),
        _ => None,
    }
}
