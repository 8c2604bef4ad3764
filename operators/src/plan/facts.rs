//! Facts: what enters the segment state besides events, and the trait writes events carry.
//!
//! Owns [`FactVal`] (the value part of a fact), [`SnapshotRows`], and the plan's
//! [`Plan::snapshot_facts`] and [`Plan::trait_writes`]: a snapshot row and an identify
//! as the `(slot, value)` facts some segment reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Plan, SLOT_PROFILE};
use crate::event::Event;
use crate::value::Value;

/// The value part of a fact: an external fact's (snapshot cell, presence, list membership)
/// or a window entry's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FactVal {
    /// Presence (profile row, list membership, a counted event).
    Unit,
    /// A value of an aggregate's argument (sum, avg, min, max, count distinct).
    Val(Value),
    /// `(timestamp, message_id, x)` for first/last.
    Ordered(i64, String, Value),
    /// A profile snapshot cell (written at the current snapshot's instant).
    Snap(Value),
}

/// A profile snapshot's rows: user key -> trait name -> value (`Value::Null` for a NULL cell).
pub type SnapshotRows = BTreeMap<String, BTreeMap<String, Value>>;

impl Plan {
    /// The facts one user's snapshot row contributes, sorted: a presence fact and a cell
    /// fact for each trait some segment reads. Diffing a user's facts in two snapshots
    /// gives the updates that move the dataflow from one to the next.
    pub fn snapshot_facts(&self, cells: &BTreeMap<String, Value>) -> Vec<(u32, FactVal)> {
        let mut out = vec![(SLOT_PROFILE, FactVal::Unit)];
        for (name, v) in cells {
            if let Some(i) = self.trait_index(name) {
                out.push((self.trait_slot(i), FactVal::Snap(v.clone())));
            }
        }
        out.sort_unstable();
        out
    }
}

impl Plan {
    /// The trait writes of an identify event that some segment reads: `(trait slot, value)`.
    pub fn trait_writes(&self, ev: &Event) -> Vec<(u32, Value)> {
        ev.trait_writes()
            .into_iter()
            .filter_map(|(name, v)| self.trait_index(&name).map(|i| (self.trait_slot(i), v)))
            .collect()
    }
}
