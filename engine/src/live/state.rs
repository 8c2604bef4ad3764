//! What the query API reads: current members per segment and each user's traits.
//!
//! Owns [`LiveState`]. Memberships are folded from the consolidated changes the sink
//! receives (so they are exactly what was handed to the sinks); traits from identify
//! events and applied snapshots, with the engine's precedence: the latest write wins and
//! an event wins a tie with a snapshot.
//!
//! In a multi-process cluster each process holds the users its workers own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use serde_json::Value as Json;

/// Members and traits, behind the service's lock.
#[derive(Default)]
pub struct LiveState {
    members: Vec<BTreeSet<String>>,
    user_segments: HashMap<String, BTreeSet<u16>>,
    traits: HashMap<String, BTreeMap<String, (i64, Json)>>,
}

impl LiveState {
    /// Empty state for `segments` segments.
    pub fn new(segments: usize) -> Self {
        LiveState {
            members: vec![BTreeSet::new(); segments],
            ..Default::default()
        }
    }

    /// Applies a change; returns the segment's new size.
    pub fn apply(&mut self, segment: u16, user: &str, diff: i64) -> usize {
        let Some(members) = self.members.get_mut(segment as usize) else {
            return 0;
        };
        if diff > 0 {
            members.insert(user.to_string());
            self.user_segments
                .entry(user.to_string())
                .or_default()
                .insert(segment);
        } else {
            members.remove(user);
            if let Some(set) = self.user_segments.get_mut(user) {
                set.remove(&segment);
                if set.is_empty() {
                    self.user_segments.remove(user);
                }
            }
        }
        members.len()
    }

    /// Members of a segment.
    pub fn size(&self, segment: usize) -> usize {
        self.members.get(segment).map_or(0, BTreeSet::len)
    }

    /// Up to `limit` members after `cursor` (exclusive), in user-id order.
    pub fn page(&self, segment: usize, cursor: Option<&str>, limit: usize) -> Vec<String> {
        let Some(members) = self.members.get(segment) else {
            return Vec::new();
        };
        let after = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        members
            .range::<str, _>((after, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Segments the user is in (indices), if any.
    pub fn segments_of(&self, user: &str) -> Option<&BTreeSet<u16>> {
        self.user_segments.get(user)
    }

    /// The user's traits with their write instants, if any are known.
    pub fn traits_of(&self, user: &str) -> Option<&BTreeMap<String, (i64, Json)>> {
        self.traits.get(user)
    }

    /// Records a trait write at `at`; `from_event` wins ties against snapshots.
    pub fn write_trait(&mut self, user: &str, name: &str, value: Json, at: i64, from_event: bool) {
        // Known users and traits are updated in place: a snapshot rewrites every cell, and
        // allocating keys for each would double the cost.
        let traits = match self.traits.get_mut(user) {
            Some(t) => t,
            None => self.traits.entry(user.to_string()).or_default(),
        };
        match traits.get_mut(name) {
            Some((prev, _)) if *prev > at || (*prev == at && !from_event) => {}
            Some(slot) => *slot = (at, value),
            None => {
                traits.insert(name.to_string(), (at, value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_pages_and_traits() {
        let mut s = LiveState::new(2);
        for u in ["c", "a", "b"] {
            s.apply(0, u, 1);
        }
        assert_eq!(s.apply(0, "b", -1), 2);
        assert_eq!(s.page(0, None, 1), vec!["a"]);
        assert_eq!(s.page(0, Some("a"), 10), vec!["c"]);
        assert_eq!(s.segments_of("a").unwrap().len(), 1);
        assert!(s.segments_of("b").is_none());
        s.write_trait("a", "plan", Json::from("pro"), 10, true);
        s.write_trait("a", "plan", Json::from("free"), 10, false);
        assert_eq!(s.traits_of("a").unwrap()["plan"].1, Json::from("pro"));
        s.write_trait("a", "plan", Json::from("team"), 11, false);
        assert_eq!(s.traits_of("a").unwrap()["plan"].1, Json::from("team"));
    }
}
