//! The segment dataflow: one keyed timely operator that keeps every segment's membership
//! exact as inputs arrive and as time passes.
//!
//! Shape (every operator named):
//!
//! ```text
//! events ──────────────┐ (exchange by user hash)
//! facts (user, slot, value) ─┤
//!                            ▼
//! snapshot clock ─broadcast─► "segment_state": SegmentState per worker
//!                            │   apply inputs at t, evaluate touched users at t,
//!                            │   wake each user at its next time-only change
//!                            ▼
//!        (user, Change(segment)) ±1 at t ─► changes (visible segments)
//!        (user, Event | Change | Trait) ─► journeys (when there are any)
//! ```
//!
//! Why not differential's reduce: a segment's membership at `t` depends only on the user's
//! own state at `t`, which is a handful of running values and window entries. Holding it
//! in an arrangement meant every windowed fact carried its retraction at `t + window`,
//! held and re-merged in batchers until due, `String` keys cloned into every update, and
//! trace navigation per (user, instant): ~60 µs of machinery per event for ~4 µs of logic.
//! Here each user's state is a compact record ([`crate::state`]), each user has one timer
//! at the next instant its membership could change by time alone, and the output is
//! consolidated by construction (at most one change per user, segment and instant).
//!
//! Invariants: all data is keyed by user, so each user's state lives on exactly one worker
//! (exchange by [`user_hash`]), in one process or across a timely cluster. An instant is
//! processed once both input frontiers have passed it, with every input at it applied
//! before any user is evaluated at it; instants are processed in time order (a wake-up
//! set while processing may fall before the frontier and is taken in the same
//! activation). So a 7-day window lapses at exactly `t + 7d`, as soon as the frontier
//! passes that instant, with no new input.
//!
//! Does not own input (see the engine's replay driver and live workers) or output
//! formatting.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Capability, Concat, ConnectLoop, Feedback};
use timely::dataflow::{Scope, Stream};

use crate::eval::CExpr;
use crate::event::Event;
pub use crate::journey::machine::JourneyBytes;
use crate::journey::machine::{JIn, JOut, MachinePart};
use crate::journey::operator::{run_journeys, JourneyHandle};
use crate::journey::JourneySet;
use crate::plan::{FactVal, Plan};
use crate::project::Projected;
pub use crate::state::user_hash;
pub use crate::state::SegmentPart;
use crate::state::{SegmentState, StateBytes, StateCounters, StateOut};
use crate::time::Time;
use crate::why::{Preview, UserAt};

/// An external fact about a user: a snapshot cell or profile presence, a static list or
/// warehouse audience membership: `(user, (slot, value))`, counted from the instant of
/// its update on.
pub type UserFact = (String, (u32, FactVal));

/// A change of membership: `(segment index, user)`, with the diff on the update.
pub type Change = (u16, String);

/// What the control input carries (fed by one worker, broadcast to all).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Ctl {
    /// A snapshot clock value (the current one is the greatest live).
    Clock(i64),
    /// Take a checkpoint part at the update's instant `F`: the state after every instant
    /// before `F` and before any at `F`.
    Checkpoint(CheckpointReq),
    /// Switch to definitions version `N` at the update's instant (after a checkpoint
    /// part at it, before any input at it): its plan comes from [`Definitions`].
    Define(u64),
    /// Pause (or resume) a journey (its index) from the update's instant on, after a
    /// checkpoint part at it ([`crate::journey::machine::Machine::set_paused`]).
    Pause {
        /// The journey's index in the journey set.
        journey: u16,
        /// Paused from then on (false: resumed).
        paused: bool,
    },
}

/// Where the segment operator finds the plan of a definitions version
/// ([`Ctl::Define`]): a changed segment file compiled over the running plan's slots
/// ([`Plan::compile_over`]).
pub type Definitions = Rc<dyn Fn(u64) -> Option<Plan>>;

/// Where the operators find the journey set of a definitions version that changed the
/// journeys ([`Ctl::Define`]; None: the version did not change them). Its plan is the
/// one [`Definitions`] gives for the same version; a pending version's `from` is set at
/// the update's instant ([`JourneySet::in_force_at`]).
pub type JourneyDefinitions = Rc<dyn Fn(u64) -> Option<Rc<JourneySet>>>;

/// A checkpoint request: a full part, or the changes since the part taken at `since`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointReq {
    /// Every user, rather than those changed since the last part.
    pub full: bool,
    /// The instant of the previous part (0: none).
    pub since: Time,
}

/// What the journey operator writes at a checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JourneysPart {
    /// The journey machine's state (or its changes).
    pub machine: MachinePart,
    /// `update_trait` writes emitted at the instant before the checkpoint's, which enter
    /// the segment state at the checkpoint's instant: a restore feeds them as events at it.
    pub writes: Vec<Event>,
}

/// Where the operators hand their checkpoint parts (one call per operator per request,
/// on the worker's thread, in the operator's activation).
pub trait PartSink {
    /// The segment state's part at instant `at`.
    fn segments(&self, at: Time, part: SegmentPart);
    /// The journey operator's part at instant `at`.
    fn journeys(&self, at: Time, part: JourneysPart);
}

/// State to start from: the parts of a checkpoint taken at `at`, a full part first.
#[derive(Default)]
pub struct Restored {
    /// The checkpoint's instant: inputs start there.
    pub at: Time,
    /// The segment state's chain of parts.
    pub segments: Vec<SegmentPart>,
    /// The journey operator's chain of parts (empty without journeys).
    pub journeys: Vec<MachinePart>,
    /// The parts were carried over to a changed segment file
    /// ([`SegmentPart::remap`]): every user is evaluated again at `at`.
    pub reevaluate: bool,
    /// History rebuilt for the aggregates the parts lack (a changed segment file that
    /// reads new ones), put into the state before it is evaluated again.
    pub backfill: Option<crate::state::Backfill>,
    /// Exit rows, at `at`, of the instances whose journey changed or went with a changed
    /// journey file ([`crate::journey::machine::remap_journey_chain`]).
    pub journey_exits: Vec<JOut>,
    /// Segments the journeys read now and did not before (kept ones, whose memberships
    /// are carried over and so do not change at `at`): the journey state learns their
    /// members from the restored segment state.
    pub journey_seed: Vec<u16>,
}

/// Checkpointing for [`build_segments_durable`].
pub struct Durability {
    /// Receives every part.
    pub parts: Rc<dyn PartSink>,
    /// Where to start from, if anywhere.
    pub restored: Option<Restored>,
    /// The journeys (indices) paused at the start, kept from an earlier run.
    pub journeys_paused: Vec<u16>,
}

/// The input handles of the segment dataflow.
pub struct SegmentInputs {
    /// Accepted events, projected by the plan ([`crate::plan::Plan::project`]; insert
    /// only: events are never retracted).
    pub events: InputSession<Time, Projected, isize>,
    /// Facts from snapshot cells, profile presence, lists and audiences.
    pub facts: InputSession<Time, UserFact, isize>,
    /// The current snapshot's instant and checkpoint requests (fed by one worker,
    /// broadcast to all).
    pub ctl: InputSession<Time, Ctl, isize>,
}

impl SegmentInputs {
    /// Advances every input to `t`.
    pub fn advance_to(&mut self, t: Time) {
        self.events.advance_to(t);
        self.facts.advance_to(t);
        self.ctl.advance_to(t);
    }

    /// Flushes buffered updates into the dataflow.
    pub fn flush(&mut self) {
        self.events.flush();
        self.facts.flush();
        self.ctl.flush();
    }

    /// Sets the snapshot clock from `old` (None: no snapshot yet) to `new`, at the inputs'
    /// current time.
    pub fn set_snapshot_clock(&mut self, old: Option<i64>, new: i64) {
        if let Some(o) = old {
            self.ctl.update(Ctl::Clock(o), -1);
        }
        self.ctl.update(Ctl::Clock(new), 1);
    }

    /// Asks every worker's operators for a checkpoint part at the inputs' current time.
    pub fn request_checkpoint(&mut self, req: CheckpointReq) {
        self.ctl.update(Ctl::Checkpoint(req), 1);
    }
}

/// A worker's handle on its segment state, for counters and state sizes.
#[derive(Clone)]
pub struct StateHandle(Rc<RefCell<SegmentState>>);

impl StateHandle {
    /// Bytes of state on this worker, counted from the structures.
    pub fn bytes(&self) -> StateBytes {
        self.0.borrow().bytes()
    }

    /// This worker's counters.
    pub fn counters(&self) -> StateCounters {
        self.0.borrow().counters()
    }

    /// User `user` brought to `at` without changing the state
    /// ([`SegmentState::user_at`]).
    pub fn user_at(&self, user: &str, segment: usize, at: Time, steps: usize) -> UserAt {
        self.0.borrow().user_at(user, segment, at, steps)
    }

    /// A candidate condition's membership on this worker ([`SegmentState::preview`]).
    pub fn preview(
        &self,
        expr: &CExpr,
        current: Option<usize>,
        at: Time,
        samples: usize,
    ) -> Preview {
        self.0.borrow().preview(expr, current, at, samples)
    }

    /// The plan the state evaluates now.
    pub fn plan(&self) -> Rc<Plan> {
        self.0.borrow().plan().clone()
    }

    /// `f(user, segment)` for every visible segment each user of this worker is in.
    pub fn for_each_member(&self, visible: usize, f: &mut dyn FnMut(&str, u16)) {
        self.0.borrow().for_each_member(visible, f)
    }
}

/// The segment dataflow's outputs.
pub struct SegmentOutputs<'s> {
    /// Changes of the user's (visible) segments, at most one per (segment, user, instant).
    pub changes: VecCollection<'s, Time, Change, isize>,
    /// What the journeys emit, when there are journeys.
    pub journeys: Option<Stream<'s, Time, Vec<JOut>>>,
    /// This worker's segment state.
    pub state: StateHandle,
    /// This worker's journey state, when there are journeys.
    pub journey_state: Option<JourneyHandle>,
}

/// What leaves the keyed operator: `((user, output), instant, diff)`.
type StateUpdate = ((String, StateOut), Time, isize);

/// What enters the keyed operator.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum StateIn {
    Event(Projected),
    Fact(String, u32, FactVal),
}

impl StateIn {
    fn user(&self) -> &str {
        match self {
            StateIn::Event(e) => &e.user,
            StateIn::Fact(u, ..) => u,
        }
    }
}

/// Builds the segment dataflow for `plan` in `scope`, dropping events whose user and
/// `messageId` repeat within `dedup_horizon_ms` (negative: no dedup). With `journeys`
/// (whose `plan` must be the one given here) the journey operator runs on the same
/// state, and its `update_trait` writes loop back as events one millisecond later.
/// Returns the inputs and the outputs.
pub fn build_segments<'s>(
    scope: Scope<'s, Time>,
    plan: Rc<Plan>,
    dedup_horizon_ms: i64,
    journeys: Option<Rc<JourneySet>>,
) -> (SegmentInputs, SegmentOutputs<'s>) {
    build_segments_durable(scope, plan, dedup_horizon_ms, journeys, None)
}

/// [`build_segments`], with the operators handing checkpoint parts to `durability` on
/// request and starting from its restored state. A restored dataflow's inputs must be
/// advanced to `restored.at` before anything is fed.
pub fn build_segments_durable<'s>(
    scope: Scope<'s, Time>,
    plan: Rc<Plan>,
    dedup_horizon_ms: i64,
    journeys: Option<Rc<JourneySet>>,
    durability: Option<Durability>,
) -> (SegmentInputs, SegmentOutputs<'s>) {
    build_segments_live(
        scope,
        plan,
        dedup_horizon_ms,
        journeys,
        durability,
        None,
        None,
    )
}

/// [`build_segments_durable`], whose segments and journeys can change while it runs: a
/// [`Ctl::Define`] switches to the plan `definitions` gives for its version, and to the
/// journey set `journey_definitions` gives, if the version changed the journeys. A
/// changed set may add hidden segments after the plan's, versions and journeys; it must
/// read every segment, trait and event name the running set reads, and no other visible
/// segment, exposed trait or event name (the engine checks this before it feeds one).
pub fn build_segments_live<'s>(
    scope: Scope<'s, Time>,
    plan: Rc<Plan>,
    dedup_horizon_ms: i64,
    journeys: Option<Rc<JourneySet>>,
    durability: Option<Durability>,
    definitions: Option<Definitions>,
    journey_definitions: Option<JourneyDefinitions>,
) -> (SegmentInputs, SegmentOutputs<'s>) {
    let (events_in, events) = scope.new_collection::<Projected, isize>();
    let (facts_in, facts) = scope.new_collection::<UserFact, isize>();
    let (ctl_in, ctl) = scope.new_collection::<Ctl, isize>();
    let (parts, restored, paused) = match durability {
        Some(d) => (Some(d.parts), d.restored, d.journeys_paused),
        None => (None, None, Vec::new()),
    };
    let (restored_at, seg_parts, journey_parts, reevaluate, backfill, journey_exits, seed) =
        match restored {
            Some(r) => (
                Some(r.at),
                r.segments,
                r.journeys,
                r.reevaluate,
                r.backfill,
                r.journey_exits,
                r.journey_seed,
            ),
            None => (
                None,
                Vec::new(),
                Vec::new(),
                false,
                None,
                Vec::new(),
                Vec::new(),
            ),
        };

    // update_trait writes come back as identify events, one millisecond later. The loop
    // makes every instant wait for the journeys to finish the one before (a write at t is
    // an input at t + 1), so it is built only when some journey writes traits.
    let (feedback, events) = match &journeys {
        Some(set) if set.writes_traits() => {
            let (handle, cycle) = scope.feedback::<Vec<(Event, Time, isize)>>(1);
            let (plan, set) = (plan.clone(), set.clone());
            let cycle = cycle.map(move |(e, t, r)| {
                let keep = set.wants(&e);
                (plan.project(e, keep), t, r)
            });
            (Some(handle), events.inner.concat(cycle))
        }
        _ => (None, events.inner),
    };
    let keyed = events.map(|(e, t, r)| (StateIn::Event(e), t, r)).concat(
        facts
            .inner
            .map(|((u, (slot, f)), t, r)| (StateIn::Fact(u, slot, f), t, r)),
    );
    let mut seg_state = SegmentState::new(plan.clone(), dedup_horizon_ms);
    if parts.is_some() {
        seg_state.track_changes();
    }
    let mut seeded: Vec<(String, u16)> = Vec::new();
    if let Some(at) = restored_at {
        if let Err(e) = seg_state.restore(seg_parts, at) {
            // The engine checks the chain before building; a broken one here is a bug.
            panic!("restoring the segment state: {e}");
        }
        if let Some(b) = backfill {
            seg_state.graft(b);
        }
        // The members of the segments the journeys newly read (see `Restored`), as
        // carried over: what the evaluation at `at` changes reaches them as changes.
        if !seed.is_empty() {
            seg_state.for_each_member(plan.segments.len(), &mut |user, s| {
                if seed.contains(&s) {
                    seeded.push((user.to_string(), s));
                }
            });
        }
        if reevaluate {
            seg_state.reevaluate_all(at);
        }
    }
    let state = Rc::new(RefCell::new(seg_state));
    let ctl = ctl.inner.broadcast();
    // Segments a definition appends are visible: the bound grows when the operator
    // switches plans, before it emits any change of the new segments.
    let visible = Rc::new(std::cell::Cell::new(plan.visible as u16));
    // The segments the journeys read: a changed journey set reads more (its new hidden
    // segments) from the instant it takes effect.
    let read = Rc::new(RefCell::new(
        journeys
            .as_ref()
            .map(|s| s.segments_read())
            .unwrap_or_default(),
    ));
    let out = segment_state(
        keyed,
        ctl.clone(),
        state.clone(),
        Hooks {
            journeys: journeys.clone(),
            parts: parts.clone(),
            definitions,
            visible: visible.clone(),
            journey_definitions: journey_definitions.clone(),
            read: read.clone(),
        },
        restored_at,
    );

    let changes = out
        .clone()
        .flat_map(move |((user, o), t, r)| match o {
            StateOut::Change(seg) if seg < visible.get() => Some(((seg, user), t, r)),
            _ => None,
        })
        .as_collection();

    let mut journey_state = None;
    let journey_out = journeys.map(|set| {
        // Changes of segments no journey reads are not the journeys' to keep.
        let input = out
            .flat_map(move |((user, o), t, r)| {
                let x = match o {
                    StateOut::Change(seg) if read.borrow().get(seg as usize) == Some(&true) => {
                        JIn::Member(seg)
                    }
                    StateOut::Change(_) => return None,
                    StateOut::Event(e) => JIn::Event(e),
                    StateOut::Trait(k, v) => JIn::Trait(k, v),
                };
                Some(((user, x), t, r))
            })
            .as_collection();
        let (out, handle) = run_journeys(
            input,
            set,
            ctl,
            parts,
            restored_at.map(|at| (at, journey_parts, journey_exits, seeded)),
            paused,
            journey_definitions,
        );
        journey_state = Some(handle);
        if let Some(feedback) = feedback {
            out.clone()
                .flat_map(|o| match o {
                    JOut::Write(ev, t) => Some((ev, t, 1isize)),
                    _ => None,
                })
                .connect_loop(feedback);
        }
        out
    });
    (
        SegmentInputs {
            events: events_in,
            facts: facts_in,
            ctl: ctl_in,
        },
        SegmentOutputs {
            changes,
            journeys: journey_out,
            state: StateHandle(state),
            journey_state,
        },
    )
}

/// What the keyed operator hands to or takes from the rest of the worker.
struct Hooks {
    journeys: Option<Rc<JourneySet>>,
    parts: Option<Rc<dyn PartSink>>,
    definitions: Option<Definitions>,
    visible: Rc<std::cell::Cell<u16>>,
    journey_definitions: Option<JourneyDefinitions>,
    read: Rc<RefCell<Vec<bool>>>,
}

/// The keyed operator over [`SegmentState`]; see the module docs.
fn segment_state<'s>(
    keyed: Stream<'s, Time, Vec<(StateIn, Time, isize)>>,
    ctl: Stream<'s, Time, Vec<(Ctl, Time, isize)>>,
    state: Rc<RefCell<SegmentState>>,
    hooks: Hooks,
    restored_at: Option<Time>,
) -> Stream<'s, Time, Vec<StateUpdate>> {
    let Hooks {
        mut journeys,
        parts,
        definitions,
        visible,
        journey_definitions,
        read,
    } = hooks;
    keyed.binary_frontier(
        ctl,
        Exchange::new(|(x, _, _): &(StateIn, Time, isize)| user_hash(x.user())),
        Pipeline,
        "segment_state",
        move |initial, _info| {
            let mut stash: Vec<(Time, u32, StateIn, isize)> = Vec::new();
            let mut clocks: Vec<(Time, Ctl, isize)> = Vec::new();
            // A restored state may have wake-ups before any input arrives.
            let mut cap: Option<Capability<Time>> = restored_at.map(|at| initial.delayed(&at));
            let mut dirty: Vec<u32> = Vec::new();
            move |(input, frontier), (clock_in, clock_frontier), output| {
                let mut st = state.borrow_mut();
                let mut hold = |c: timely::dataflow::operators::InputCapability<Time>| {
                    if let Some(c) = c.retain_least(output.output_index()) {
                        if cap.as_ref().is_none_or(|k| c.time() < k.time()) {
                            cap = Some(c);
                        }
                    }
                };
                input.for_each_stamp(|c, data| {
                    hold(c);
                    for batch in data {
                        for (x, t, r) in batch.drain(..) {
                            let u = st.intern(x.user());
                            stash.push((t, u, x, r));
                        }
                    }
                });
                clock_in.for_each_stamp(|c, data| {
                    hold(c);
                    for batch in data {
                        clocks.extend(batch.drain(..).map(|(at, t, r)| (t, at, r)));
                    }
                });
                let Some(c) = cap.as_mut() else { return };
                let ready = |t: Time| !frontier.less_equal(&t) && !clock_frontier.less_equal(&t);
                if !ready(*c.time()) {
                    return;
                }
                // By instant only (users touched at an instant are evaluated in index order
                // below). Stable: ties keep arrival order, which for one user's events at
                // one instant decides only which of two duplicates is kept.
                if !stash.is_sorted_by_key(|x| x.0) {
                    stash.sort_by_key(|x| x.0);
                }
                clocks.sort_by_key(|x| x.0);
                let mut session = output.session(&*c);
                let mut ci = 0;
                // The stash is sorted: what the frontier has passed is a prefix.
                let ready_len = stash.partition_point(|x| ready(x.0));
                let mut items = stash.drain(..ready_len).peekable();
                loop {
                    let next = [
                        items.peek().map(|x| x.0),
                        clocks.get(ci).map(|x| x.0),
                        st.next_timer(),
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    let Some(t) = next.filter(|&t| ready(t)) else {
                        break;
                    };
                    dirty.clear();
                    // The control updates at t, added (retractions only move the clock).
                    let at_t = || {
                        clocks[ci..]
                            .iter()
                            .take_while(|x| x.0 == t)
                            .filter(|x| x.2 > 0)
                            .map(|x| &x.1)
                    };
                    // A checkpoint at t holds the state before anything at t.
                    for c in at_t() {
                        if let (Ctl::Checkpoint(req), Some(p)) = (c, &parts) {
                            p.segments(t, st.part(req.full, req.since));
                        }
                    }
                    // Then a definitions change: every user evaluated again at t.
                    for c in at_t() {
                        if let (Ctl::Define(v), Some(d)) = (c, &definitions) {
                            // The engine keeps every version it feeds; a missing one here
                            // is a bug.
                            let plan = d(*v)
                                .unwrap_or_else(|| panic!("definitions version {v} is unknown"));
                            visible.set(visible.get().max(plan.visible as u16));
                            st.set_plan(Rc::new(plan), t);
                            if let Some(set) = journey_definitions.as_ref().and_then(|j| j(*v)) {
                                *read.borrow_mut() = set.segments_read();
                                journeys = Some(set);
                            }
                        }
                    }
                    while let Some((_, c, r)) = clocks.get(ci).filter(|x| x.0 == t) {
                        if let Ctl::Clock(at) = c {
                            st.update_clock(*at, *r, &mut dirty);
                        }
                        ci += 1;
                    }
                    while let Some((_, u, x, r)) = items.next_if(|x| x.0 == t) {
                        match x {
                            StateIn::Event(ev) => {
                                if r <= 0 {
                                    st.retracted();
                                } else if st.apply_event(u, &ev, t) {
                                    dirty.push(u);
                                    if let Some(whole) = ev.whole {
                                        if journeys.as_ref().is_some_and(|j| j.wants(&whole)) {
                                            let key = st.key(u).to_string();
                                            session.give(((key, StateOut::Event(*whole)), t, r));
                                        }
                                    }
                                }
                            }
                            StateIn::Fact(_, slot, f) => {
                                st.apply_fact(u, slot, f, r);
                                dirty.push(u);
                            }
                        }
                    }
                    if st.next_timer() == Some(t) {
                        st.pop_due(t, &mut dirty);
                    }
                    dirty.sort_unstable();
                    dirty.dedup();
                    for &u in &dirty {
                        st.evaluate(u, t, &mut |key, o, r| {
                            session.give(((key.to_string(), o), t, r))
                        });
                    }
                }
                drop(items);
                clocks.drain(..ci);
                drop(session);
                let next = [
                    stash.first().map(|x| x.0),
                    clocks.first().map(|x| x.0),
                    st.next_timer(),
                ]
                .into_iter()
                .flatten()
                .min();
                match next {
                    Some(t) => c.downgrade(&t),
                    None => cap = None,
                }
            }
        },
    )
}
