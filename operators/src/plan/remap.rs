//! Carrying state across a changed segment file: which of the old plan's slots and
//! segments the new plan still has, by meaning rather than by position.
//!
//! An aggregate is the same when its kind, argument, `DISTINCT` and FILTER are the same
//! (the compiled aggregate of the segment language, positions aside); a trait by its
//! name; a static list or warehouse audience by its segment's name and source; a segment
//! by its name (its definition may change: it is evaluated again). State for what the old
//! plan had and the new one lacks is dropped; what the new one reads and the old lacked is
//! not in the state at all: each new aggregate and trait is listed
//! ([`Remap::new_aggregates`], [`Remap::new_traits`]) so that its history can be rebuilt
//! from the events ([`crate::state::Backfill`]) and the last snapshot.

use std::collections::BTreeMap;

use super::{Plan, SegmentKind, FIRST_DYNAMIC_SLOT};

/// Old slot and segment numbers mapped to new ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Remap {
    /// Per old fact slot, its new slot (None: dropped).
    pub slots: Vec<Option<u32>>,
    /// Per old segment, its new index (None: dropped). Journeys' hidden segments are
    /// named after their journey and step, so they map like any other.
    pub segments: Vec<Option<usize>>,
    /// Per old exposed trait position (the traits journeys read), its new one.
    pub exposed: Vec<Option<u16>>,
    /// Per old list or warehouse segment, its new index when it reads the same source
    /// (else its memberships are not carried: the new source's are fed afresh).
    pub lists: Vec<Option<usize>>,
    /// Segments of the new plan.
    pub n_segments: usize,
    /// What was kept, new and dropped, for the log: `(kept, new, dropped)` segment names.
    pub kept: Vec<String>,
    /// Segments the new plan has and the old did not (they start from what the kept
    /// slots hold).
    pub added: Vec<String>,
    /// Segments the old plan had and the new one does not.
    pub dropped: Vec<String>,
    /// Aggregates the new plan reads and the old state does not hold: `(new slot, the
    /// sentence that names it)`. Their cells are empty until rebuilt from the events
    /// ([`crate::state::Backfill`]); a caller that cannot rebuild them must refuse.
    pub new_aggregates: Vec<(u32, String)>,
    /// Traits the new plan reads and the old state does not hold: `(new slot, the
    /// sentence that names it)`, as [`Remap::new_aggregates`].
    pub new_traits: Vec<(u32, String)>,
}

impl Remap {
    /// Everything the new plan reads that the old state does not hold: the sentences.
    pub fn missing(&self) -> Vec<&str> {
        self.new_aggregates
            .iter()
            .chain(&self.new_traits)
            .map(|(_, s)| s.as_str())
            .collect()
    }

    /// The slots whose history must be rebuilt.
    pub fn rebuilt_slots(&self) -> Vec<u32> {
        self.new_aggregates
            .iter()
            .chain(&self.new_traits)
            .map(|(s, _)| *s)
            .collect()
    }

    /// The slots of the new traits alone (their snapshot cells come from the snapshot).
    pub fn new_trait_slots(&self) -> Vec<u32> {
        self.new_traits.iter().map(|(s, _)| *s).collect()
    }
}

impl Plan {
    /// How to carry state built with `old` into this plan, with what `old`'s state does
    /// not hold listed ([`Remap::new_aggregates`], [`Remap::new_traits`]).
    pub fn remap_from(&self, old: &Plan) -> Remap {
        let mut slots: Vec<Option<u32>> = vec![None; old.slot_count()];
        // The presence slots are fixed.
        for s in 0..FIRST_DYNAMIC_SLOT {
            slots[s as usize] = Some(s);
        }
        let mut new_traits = Vec::new();
        let mut new_aggregates = Vec::new();
        let old_aggs: BTreeMap<_, usize> = old
            .aggs
            .iter()
            .enumerate()
            .map(|(i, a)| (&a.agg, i))
            .collect();
        for (i, a) in self.aggs.iter().enumerate() {
            match old_aggs.get(&a.agg) {
                Some(&o) => slots[old.agg_slot(o) as usize] = Some(self.agg_slot(i)),
                None => new_aggregates.push((self.agg_slot(i), new_aggregate(a))),
            }
        }
        for (i, (name, used_by)) in self.traits.iter().enumerate() {
            match old.trait_index(name) {
                Some(o) => slots[old.trait_slot(o) as usize] = Some(self.trait_slot(i)),
                None => new_traits.push((self.trait_slot(i), new_trait(name, used_by))),
            }
        }
        let source = |k: &SegmentKind| match k {
            SegmentKind::List { slot, url } => Some((*slot, format!("list {url}"))),
            SegmentKind::Warehouse { slot, query, .. } => {
                Some((*slot, format!("warehouse {query}")))
            }
            SegmentKind::Expr(_) => None,
        };
        let mut segments = vec![None; old.segments.len()];
        let mut lists = vec![None; old.segments.len()];
        let (mut kept, mut dropped) = (Vec::new(), Vec::new());
        for (o, seg) in old.segments.iter().enumerate() {
            match self.segment_index(&seg.name) {
                Some(n) => {
                    segments[o] = Some(n);
                    kept.push(seg.name.clone());
                    // A list or audience keeps its memberships only from the same source.
                    if let (Some((os, osrc)), Some((ns, nsrc))) =
                        (source(&seg.kind), source(&self.segments[n].kind))
                    {
                        if osrc == nsrc {
                            slots[os as usize] = Some(ns);
                            lists[o] = Some(n);
                        }
                    }
                }
                None => dropped.push(seg.name.clone()),
            }
        }
        let added = self
            .segments
            .iter()
            .filter(|s| old.segment_index(&s.name).is_none())
            .map(|s| s.name.clone())
            .collect();
        let exposed = old
            .exposed
            .iter()
            .map(|&k| {
                let name = &old.traits[k].0;
                let new_k = self.trait_index(name)?;
                let pos = self.exposed.iter().position(|&j| j == new_k)?;
                u16::try_from(pos).ok()
            })
            .collect();
        Remap {
            slots,
            segments,
            exposed,
            lists,
            n_segments: self.segments.len(),
            kept,
            added,
            dropped,
            new_aggregates,
            new_traits,
        }
    }
}

/// What a plan reads that the state does not hold: an aggregate no segment read.
pub(super) fn new_aggregate(a: &super::AggSlot) -> String {
    format!(
        "a new aggregate, read by {}: {}",
        a.used_by.join(", "),
        crate::ast::Expr::Agg(Box::new(a.agg.clone()))
    )
}

/// What a plan reads that the state does not hold: a trait no segment read.
pub(super) fn new_trait(name: &str, used_by: &[String]) -> String {
    format!(
        "the trait `{name}`, which no segment read before, read by {}",
        used_by.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use crate::lang::parse::parse_segments;
    use crate::plan::Plan;

    fn plan(text: &str) -> Plan {
        Plan::compile(&parse_segments(text).unwrap())
    }

    #[test]
    fn slots_and_segments_map_by_meaning_and_new_history_is_named() {
        let old = plan(
            "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n\
             CREATE SEGMENT pro AS plan = 'pro';\n\
             CREATE SEGMENT vip FROM CSV 'vip.csv';\n\
             CREATE SEGMENT staff FROM CSV 'staff.csv';\n",
        );
        let new = plan(
            "CREATE SEGMENT staff FROM CSV 'staff-2.csv';\n\
             CREATE SEGMENT vip FROM CSV 'vip.csv';\n\
             CREATE SEGMENT repeat AS count(*) FILTER (WHERE event = 'Order Completed') >= 2;\n\
             CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n",
        );
        let r = new.remap_from(&old);
        // The shared aggregate keeps its cells; `plan` is no longer read.
        assert_eq!(r.slots[old.agg_slot(0) as usize], Some(new.agg_slot(0)));
        assert_eq!(r.slots[old.trait_slot(0) as usize], None);
        assert_eq!(r.segments, [Some(3), None, Some(1), Some(0)]);
        // A list keeps its members only from the same source.
        assert_eq!(r.lists, [None, None, Some(1), None]);
        assert_eq!(
            (r.added.clone(), r.dropped.clone()),
            (vec!["repeat".to_string()], vec!["pro".to_string()])
        );
        let more = plan(
            "CREATE SEGMENT top AS max(properties.revenue) >= 100;\n\
             CREATE SEGMENT de AS country = 'DE';\n",
        );
        let r = more.remap_from(&old);
        assert_eq!(r.new_traits.len(), 1, "{:?}", r.new_traits);
        assert_eq!(r.new_traits[0].0, more.trait_slot(0));
        assert!(
            r.new_traits[0].1.contains("`country`"),
            "{:?}",
            r.new_traits
        );
        assert_eq!(r.missing().len(), 2);
        // A new aggregate is listed with its slot, to be rebuilt from the events.
        let top = plan("CREATE SEGMENT top AS max(properties.revenue) >= 100;\n");
        let r = top.remap_from(&old);
        assert_eq!(r.new_aggregates.len(), 1);
        assert_eq!(r.new_aggregates[0].0, top.agg_slot(0));
        assert!(
            r.new_aggregates[0].1.contains("max(properties.revenue)"),
            "{:?}",
            r.new_aggregates
        );
        assert!(r.slots.iter().all(|s| *s != Some(top.agg_slot(0))));
    }
}
