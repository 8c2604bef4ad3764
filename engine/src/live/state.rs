//! What the query API reads: current members per segment and each user's traits.
//!
//! Owns [`LiveState`]. Memberships are folded from the consolidated changes the sink
//! receives (so they are exactly what was handed to the sinks). Traits are the current
//! profile snapshot (shared with worker 0, not copied) overlaid at read time with the
//! identify writes, with the engine's precedence: the latest write wins, an event wins a
//! tie with the snapshot, and a cell the snapshot lacks leaves an identify write
//! standing.
//!
//! In a multi-process cluster each process holds the users its workers own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use herald_operators::journey::JourneyRow;
use herald_operators::plan::SnapshotRows;

use serde_json::Value as Json;

/// The maps' hasher: foldhash, seeded per process like SipHash (keys come from the public
/// ingest API) but faster (a restore of 1M users spent 13% of its time in SipHash).
type Fast = hashbrown::DefaultHashBuilder;

/// Members and traits, behind the service's lock.
#[derive(Default)]
pub struct LiveState {
    members: Vec<BTreeSet<String>>,
    user_segments: HashMap<String, BTreeSet<u16>, Fast>,
    /// Identify writes: per user and trait, the latest write's instant and value.
    writes: HashMap<String, BTreeMap<String, (i64, Json)>, Fast>,
    /// The current profile snapshot and its instant.
    snapshot: Option<(i64, Arc<SnapshotRows>)>,
    /// Users whose identify traits changed since the last checkpoint (when tracked).
    written: Option<BTreeSet<String>>,
    /// Per user, the latest sends the journeys suppressed or deferred (since the start of
    /// this process, at most [`HELD_SENDS`] each), for `GET /v1/users/{id}/journeys`.
    held: HashMap<String, std::collections::VecDeque<JourneyRow>, Fast>,
}

/// Suppressed or deferred sends kept per user for the API.
pub const HELD_SENDS: usize = 20;

/// One worker's restored memberships, built without the service's lock.
pub struct RestoredMembers {
    members: Vec<BTreeSet<String>>,
    user_segments: HashMap<String, BTreeSet<u16>, Fast>,
}

impl RestoredMembers {
    /// From `(user, segment)` pairs, each user's pairs together (as the segment state
    /// lists them), for `segments` segments.
    pub fn build(segments: usize, pairs: impl IntoIterator<Item = (String, u16)>) -> Self {
        let mut per_segment: Vec<Vec<String>> = vec![Vec::new(); segments];
        let mut user_segments: HashMap<String, BTreeSet<u16>, Fast> = HashMap::default();
        for (user, seg) in pairs {
            let Some(list) = per_segment.get_mut(seg as usize) else {
                continue;
            };
            user_segments.entry(user.clone()).or_default().insert(seg);
            list.push(user);
        }
        RestoredMembers {
            // Collecting sorts once and builds the tree in bulk.
            members: per_segment.into_iter().map(BTreeSet::from_iter).collect(),
            user_segments,
        }
    }
}

/// Identify traits as a checkpoint holds them: per user, `name -> (instant, JSON text)`.
pub type TraitsPart = Vec<(String, Option<BTreeMap<String, (i64, String)>>)>;

impl LiveState {
    /// Empty state for `segments` segments.
    pub fn new(segments: usize) -> Self {
        LiveState {
            members: vec![BTreeSet::new(); segments],
            ..Default::default()
        }
    }

    /// Remembers a suppressed or deferred send of the user's (the latest
    /// [`HELD_SENDS`]).
    pub fn note_held_send(&mut self, row: &JourneyRow) {
        let list = self.held.entry(row.user_id.clone()).or_default();
        if list.len() == HELD_SENDS {
            list.pop_front();
        }
        list.push_back(row.clone());
    }

    /// The user's latest suppressed or deferred sends, oldest first.
    pub fn held_sends(&self, user: &str) -> Vec<JourneyRow> {
        self.held
            .get(user)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes room for `segments` segments (a segment added through the API).
    pub fn grow(&mut self, segments: usize) {
        if self.members.len() < segments {
            self.members.resize_with(segments, BTreeSet::new);
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

    /// Adds memberships restored from a checkpoint, built by [`RestoredMembers`] outside
    /// the lock (each worker its own users, in parallel): merging sorted sets is linear,
    /// where one insert per membership under the lock was a third of a 1M-user restart.
    pub fn add_restored(&mut self, mut r: RestoredMembers) {
        for (seg, set) in r.members.iter_mut().enumerate() {
            if let Some(m) = self.members.get_mut(seg) {
                if m.is_empty() {
                    std::mem::swap(m, set);
                } else {
                    m.append(set);
                }
            }
        }
        if self.user_segments.is_empty() {
            std::mem::swap(&mut self.user_segments, &mut r.user_segments);
        } else {
            // Workers own disjoint users.
            self.user_segments.extend(r.user_segments);
        }
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

    /// The user's current traits with the instant each was written at, if any are known.
    pub fn traits_of(&self, user: &str) -> Option<BTreeMap<String, (i64, Json)>> {
        let snapshot = self
            .snapshot
            .as_ref()
            .and_then(|(at, rows)| rows.get(user).map(|cells| (*at, cells)));
        let writes = self.writes.get(user);
        if snapshot.is_none() && writes.is_none() {
            return None;
        }
        let mut out: BTreeMap<String, (i64, Json)> = BTreeMap::new();
        // A NULL cell is a write of NULL at the snapshot's instant: it hides an older
        // identify write, and the trait is then left out like one never written.
        let mut cleared: BTreeSet<&str> = BTreeSet::new();
        if let Some((at, cells)) = snapshot {
            for (name, v) in cells {
                if v.is_null() {
                    cleared.insert(name);
                }
                out.insert(name.clone(), (at, v.to_json()));
            }
        }
        for (name, (ts, v)) in writes.into_iter().flatten() {
            match out.get(name) {
                Some((at, _)) if at > ts => {}
                _ => {
                    cleared.remove(name.as_str());
                    out.insert(name.clone(), (*ts, v.clone()));
                }
            }
        }
        out.retain(|name, _| !cleared.contains(name.as_str()));
        Some(out)
    }

    /// From now on, remembers whose traits are written, for [`LiveState::traits_part`].
    pub fn track_writes(&mut self) {
        self.written.get_or_insert_with(Default::default);
    }

    /// The identify traits for a checkpoint: every user's (`full`) or those written since
    /// the last call.
    pub fn traits_part(&mut self, full: bool) -> TraitsPart {
        let written = self.written.replace(Default::default()).unwrap_or_default();
        let encode = |t: &BTreeMap<String, (i64, Json)>| {
            t.iter()
                .map(|(k, (at, v))| (k.clone(), (*at, v.to_string())))
                .collect()
        };
        if full {
            let mut v: TraitsPart = self
                .writes
                .iter()
                .map(|(u, t)| (u.clone(), Some(encode(t))))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        } else {
            written
                .into_iter()
                .map(|u| {
                    let t = self.writes.get(&u).map(encode);
                    (u, t)
                })
                .collect()
        }
    }

    /// Restores identify traits from a chain of parts (a full one first).
    pub fn restore_traits(&mut self, parts: Vec<(bool, TraitsPart)>) {
        for (full, part) in parts {
            if full {
                self.writes.clear();
            }
            for (user, t) in part {
                match t {
                    Some(t) => {
                        let t = t
                            .into_iter()
                            .map(|(k, (at, v))| {
                                (k, (at, serde_json::from_str(&v).unwrap_or(Json::Null)))
                            })
                            .collect();
                        self.writes.insert(user, t);
                    }
                    None => {
                        self.writes.remove(&user);
                    }
                }
            }
        }
    }

    /// Records an identify write at `at` (the latest write wins; a later call wins a tie).
    pub fn write_trait(&mut self, user: &str, name: &str, value: Json, at: i64) {
        if let Some(w) = &mut self.written {
            if !w.contains(user) {
                w.insert(user.to_string());
            }
        }
        let traits = match self.writes.get_mut(user) {
            Some(t) => t,
            None => self.writes.entry(user.to_string()).or_default(),
        };
        match traits.get_mut(name) {
            Some((prev, _)) if *prev > at => {}
            Some(slot) => *slot = (at, value),
            None => {
                traits.insert(name.to_string(), (at, value));
            }
        }
    }

    /// Makes `rows`, taken at `at`, the current profile snapshot (the previous one's
    /// cells no longer count).
    pub fn set_snapshot(&mut self, at: i64, rows: Arc<SnapshotRows>) {
        self.snapshot = Some((at, rows));
    }
}

#[cfg(test)]
mod tests {
    use herald_operators::value::Value;

    use super::*;

    #[test]
    fn restored_members_from_two_workers_equal_one_change_at_a_time() {
        let pairs = |users: &[(&str, &[u16])]| -> Vec<(String, u16)> {
            users
                .iter()
                .flat_map(|(u, segs)| segs.iter().map(move |s| (u.to_string(), *s)))
                .collect()
        };
        let w0 = pairs(&[("d", &[0, 2]), ("a", &[1])]);
        let w1 = pairs(&[("c", &[0]), ("b", &[0, 1, 2]), ("e", &[5])]);
        let mut one = LiveState::new(3);
        for (u, seg) in w0.iter().chain(&w1) {
            one.apply(*seg, u, 1);
        }
        let mut bulk = LiveState::new(3);
        bulk.add_restored(RestoredMembers::build(3, w1));
        bulk.add_restored(RestoredMembers::build(3, w0));
        for seg in 0..3 {
            assert_eq!(bulk.page(seg, None, 10), one.page(seg, None, 10), "{seg}");
        }
        for u in ["a", "b", "c", "d", "e"] {
            assert_eq!(bulk.segments_of(u), one.segments_of(u), "{u}");
        }
        // Changes after the restore apply as usual.
        assert_eq!(bulk.apply(0, "b", -1), 2);
        assert_eq!(bulk.segments_of("b").unwrap().len(), 2);
    }

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
        let snap = |at: i64, plan: Option<&str>, n: f64| {
            let mut cells = BTreeMap::new();
            if let Some(p) = plan {
                cells.insert("plan".to_string(), Value::Str(p.into()));
            }
            cells.insert("n".to_string(), Value::num(n));
            (at, Arc::new(SnapshotRows::from([("a".to_string(), cells)])))
        };
        let plan = |s: &LiveState| s.traits_of("a").unwrap().get("plan").map(|t| t.1.clone());
        // An event wins a tie with the snapshot; a later snapshot wins over older writes.
        s.write_trait("a", "plan", Json::from("pro"), 10);
        let (at, rows) = snap(10, Some("free"), 1.0);
        s.set_snapshot(at, rows);
        assert_eq!(plan(&s), Some(Json::from("pro")));
        assert_eq!(s.traits_of("a").unwrap()["n"], (10, Json::from(1.0)));
        let (at, rows) = snap(11, Some("team"), 2.0);
        s.set_snapshot(at, rows);
        assert_eq!(plan(&s), Some(Json::from("team")));
        // A cell the snapshot lacks leaves the write standing; an older write loses.
        let (at, rows) = snap(12, None, 3.0);
        s.set_snapshot(at, rows);
        assert_eq!(plan(&s), Some(Json::from("pro")));
        s.write_trait("a", "plan", Json::from("old"), 9);
        assert_eq!(plan(&s), Some(Json::from("pro")));
        s.write_trait("b", "x", Json::from(1), 1);
        assert!(s.traits_of("b").is_some() && s.traits_of("c").is_none());
    }
}
