//! Deduplication: the one rule replay and the live service share (`events.md`,
//! "Duplicates").
//!
//! Owns [`Dedup`]. A message is a duplicate when a message with the same identifier (the
//! user key: `userId`, else `anonymousId`) and the same `messageId` was already accepted
//! with a timestamp at most the horizon away (in either direction). Outside the horizon it
//! is accepted again, and the horizon then counts from it. A negative horizon disables
//! deduplication.
//!
//! Memory: pairs are remembered by the 128-bit xxh3 hash of `identifier \0 messageId` (a
//! collision is astronomically unlikely). A replay remembers every pair of its input; the
//! live service ([`Dedup::forgetting`]) forgets a pair once its clock is a horizon past the
//! instant the pair *arrived*, so memory is bounded by one horizon of traffic and a
//! rebuild from a topic's start (old timestamps, arriving now) is still deduplicated. It
//! forgets at exactly that instant whether or not it has pruned the pair yet, so a
//! rebuild from the events archive (which prunes at other moments) decides alike.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// What deduplication reads of an accepted record: `(identifier, messageId, timestamp)`.
pub trait Keyed {
    /// The identifier, `messageId` and instant (ms) of the record.
    fn dedup_key(&self) -> (&str, &str, i64);
}

impl Keyed for crate::event::Event {
    fn dedup_key(&self) -> (&str, &str, i64) {
        (&self.user, &self.message_id, self.timestamp)
    }
}

impl Keyed for crate::project::Projected {
    fn dedup_key(&self) -> (&str, &str, i64) {
        (&self.user, &self.message_id, self.timestamp)
    }
}

/// Remembers accepted `(identifier, messageId)` pairs; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Dedup {
    horizon_ms: i64,
    forget: bool,
    /// Pair hash -> (timestamp of the accepted message, arrival instant).
    seen: HashMap<u128, (i64, u64), BuildHasherDefault<PrehashedHasher>>,
    since_prune: usize,
}

/// A hasher for keys that are already hashes: keeps the low 64 bits.
#[derive(Clone, Copy, Debug, Default)]
struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u128 keys; fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

impl Dedup {
    /// A deduplicator that remembers every pair (replay: the input is one batch).
    pub fn new(horizon_ms: i64) -> Dedup {
        Dedup {
            horizon_ms,
            ..Dedup::default()
        }
    }

    /// A deduplicator that forgets a pair a horizon after it arrived (live).
    pub fn forgetting(horizon_ms: i64) -> Dedup {
        Dedup {
            horizon_ms,
            forget: true,
            ..Dedup::default()
        }
    }

    /// Makes room for `additional` more pairs.
    pub fn reserve(&mut self, additional: usize) {
        if self.horizon_ms >= 0 {
            self.seen.reserve(additional);
        }
    }

    /// Returns true when the message is to be applied (and remembers it), false for a
    /// duplicate. `arrived` is the clock's instant (ms) when it arrived; it only matters
    /// to a forgetting deduplicator.
    pub fn admit(&mut self, user: &str, message_id: &str, timestamp: i64, arrived: u64) -> bool {
        if self.horizon_ms < 0 {
            return true;
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(user.as_bytes());
        h.update(&[0]);
        h.update(message_id.as_bytes());
        let admitted = match self.seen.entry(h.digest128()) {
            Entry::Occupied(mut first) => {
                // A forgetting deduplicator has forgotten a pair a horizon after it
                // arrived, whether or not its pruning has come round to it yet: what it
                // admits does not depend on when it prunes (a rebuild of the same input
                // prunes at other moments, and must decide alike).
                let forgotten =
                    self.forget && arrived > first.get().1.saturating_add(self.horizon_ms as u64);
                if !forgotten && timestamp.abs_diff(first.get().0) <= self.horizon_ms as u64 {
                    false
                } else {
                    first.insert((timestamp, arrived));
                    true
                }
            }
            Entry::Vacant(slot) => {
                slot.insert((timestamp, arrived));
                true
            }
        };
        if admitted && self.forget {
            self.since_prune += 1;
            if self.since_prune >= 4096.max(self.seen.len()) {
                self.since_prune = 0;
                let cutoff = arrived.saturating_sub(self.horizon_ms as u64);
                self.seen.retain(|_, (_, at)| *at >= cutoff);
            }
        }
        admitted
    }

    /// The pairs that arrived at or after `since` (all of them for 0), for a checkpoint.
    pub fn entries(&self, since: u64) -> Vec<(u128, (i64, u64))> {
        let mut v: Vec<_> = self
            .seen
            .iter()
            .filter(|(_, (_, at))| *at >= since)
            .map(|(k, x)| (*k, *x))
            .collect();
        v.sort_unstable();
        v
    }

    /// Forgets every pair.
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    /// Remembers pairs from a checkpoint (a later entry for a pair replaces an earlier).
    pub fn extend(&mut self, pairs: Vec<(u128, (i64, u64))>) {
        self.seen.extend(pairs);
    }

    /// Forgetting deduplicators: drops the pairs a horizon older than `now`.
    pub fn prune(&mut self, now: u64) {
        if self.forget && self.horizon_ms >= 0 {
            let cutoff = now.saturating_sub(self.horizon_ms as u64);
            self.seen.retain(|_, (_, at)| *at >= cutoff);
        }
    }

    /// Pairs remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no pair is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Bytes of the table (entries and control bytes), counted from its capacity.
    pub fn bytes(&self) -> usize {
        self.seen.capacity() * (std::mem::size_of::<(u128, (i64, u64))>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_is_inclusive_and_restarts_on_reaccept() {
        let mut d = Dedup::new(10);
        assert!(d.admit("u", "m", 100, 0));
        assert!(!d.admit("u", "m", 110, 0));
        assert!(!d.admit("u", "m", 90, 0));
        assert!(d.admit("u", "m", 111, 0));
        assert!(!d.admit("u", "m", 121, 0));
        let mut off = Dedup::new(-1);
        assert!(off.admit("u", "m", 0, 0) && off.admit("u", "m", 0, 0));
    }

    #[test]
    fn the_same_message_id_from_another_identifier_is_not_a_duplicate() {
        let mut d = Dedup::new(10);
        assert!(d.admit("u1", "m", 100, 0));
        assert!(d.admit("u2", "m", 100, 0));
        assert!(!d.admit("u2", "m", 100, 0));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert!(d.admit("ab", "c", 0, 0) && d.admit("a", "bc", 0, 0));
    }

    #[test]
    fn a_forgetting_dedup_forgets_a_horizon_after_arrival() {
        let mut d = Dedup::forgetting(10);
        assert!(d.admit("u", "m", 5, 1_000));
        for i in 0..5000u64 {
            d.admit("u", &format!("x{i}"), 0, 2_000);
        }
        // Pruned at 2 000: the pair that arrived at 1 000 is gone, so it is new again.
        assert!(d.admit("u", "m", 5, 2_000));
    }

    #[test]
    fn a_forgetting_dedup_forgets_at_the_horizon_whether_or_not_it_has_pruned() {
        let mut d = Dedup::forgetting(10);
        assert!(d.admit("u", "m", 5, 1_000));
        // No pruning in between (too few admits): within a horizon of its arrival it is
        // a duplicate, past it a new message.
        assert!(!d.admit("u", "m", 5, 1_010));
        assert!(d.admit("u", "m", 5, 1_011));
        assert!(
            !d.admit("u", "m", 5, 1_015),
            "the horizon counts from the new one"
        );
    }
}
