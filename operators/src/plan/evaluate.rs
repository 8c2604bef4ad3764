//! What evaluation needs from the plan beyond compiled expressions: the context an
//! event is evaluated in, and the type ranking of mixed-type aggregates.

use std::borrow::Cow;

use crate::ast::EventField;
use crate::eval::Context;
use crate::project::Projected;
use crate::value::Value;

/// A projected event as FILTERs and arguments see it: its name, type and paths are
/// borrowed, never copied; comparisons of mismatched types are counted in the cell.
pub(crate) struct EventCtx<'a>(
    pub(crate) &'a Projected,
    pub(crate) &'a std::cell::Cell<u64>,
);

impl Context for EventCtx<'_> {
    fn field(&self, field: &EventField) -> Cow<'_, Value> {
        self.0.field(field)
    }

    fn type_mismatch(&self) {
        self.1.set(self.1.get() + 1);
    }

    fn path(&self, index: usize, _field: &EventField) -> Cow<'_, Value> {
        self.0
            .values
            .get(index)
            .map_or(Cow::Owned(Value::Null), Cow::Borrowed)
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
