//! The membership change record: what every output of segment membership carries.
//!
//! Owns [`SegmentChange`]. Inside the dataflow a change is a keyed update (the segment's
//! index and the user, [`crate::dataflow::Change`], with the instant and diff on the
//! update); every reader of the dataflow's output turns that into this one record, and
//! every sink (JSONL, Parquet, PostgreSQL, the changelog topic, the events archive)
//! writes it.

/// A change of segment membership: `diff` is `+1` when the user enters, `-1` when it
/// leaves, at `time`. Ordered by (time, segment, user, diff): the order of every output.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SegmentChange {
    /// The segment's name.
    pub segment: String,
    /// The user key.
    pub user_id: String,
    /// `+1` (entered) or `-1` (left).
    pub diff: i64,
    /// The instant of the change, ms since the epoch.
    pub time: i64,
}

impl Ord for SegmentChange {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time, &self.segment, &self.user_id, self.diff).cmp(&(
            other.time,
            &other.segment,
            &other.user_id,
            other.diff,
        ))
    }
}

impl PartialOrd for SegmentChange {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Sorts changes into output order and merges those of one (time, segment, user),
/// dropping the ones that cancel out.
pub fn consolidate(changes: &mut Vec<SegmentChange>) {
    changes.sort_unstable();
    let mut out: Vec<SegmentChange> = Vec::with_capacity(changes.len());
    for c in changes.drain(..) {
        match out.last_mut() {
            Some(last)
                if last.time == c.time
                    && last.segment == c.segment
                    && last.user_id == c.user_id =>
            {
                last.diff += c.diff;
            }
            _ => out.push(c),
        }
    }
    out.retain(|c| c.diff != 0);
    *changes = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(time: i64, segment: &str, user: &str, diff: i64) -> SegmentChange {
        SegmentChange {
            segment: segment.into(),
            user_id: user.into(),
            diff,
            time,
        }
    }

    #[test]
    fn consolidation_orders_by_time_first_and_merges_equal_keys() {
        let mut v = vec![
            c(2, "a", "u", 1),
            c(1, "b", "u", 1),
            c(2, "a", "u", -1),
            c(1, "a", "v", 1),
            c(1, "a", "v", 1),
        ];
        consolidate(&mut v);
        assert_eq!(v, vec![c(1, "a", "v", 2), c(1, "b", "u", 1)]);
    }
}
