//! The journey operator: the [`Machine`] as a timely operator keyed by user.
//!
//! Input: `(user, JIn)` updates (events the journeys listen to, membership changes of
//! every segment, exposed trait changes), exchanged by the same user hash as `segment_state`, so
//! a user's journeys live on the worker that owns the rest of the user's state.
//!
//! Timers are not polled. Each worker keeps its pending timers in an ordered set and holds
//! one capability at the earliest instant it still has to process: stashed input or the
//! first timer. When the input frontier passes an instant, every user with input or a due
//! timer at it is stepped, in user order, and instants are taken in time order (a step may
//! set a timer that falls before the frontier; the loop takes it in the same activation).
//! So a timer fires exactly when the clock passes its instant, in replay as in live mode.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::dataflow::{Ctl, JourneysPart, PartSink};
use crate::event::Event;
use crate::journey::compile::JourneySet;
use crate::journey::machine::{JIn, JOut, JourneyBytes, Machine, MachinePart};
use crate::state::user_hash;
use crate::time::Time;

/// Users stepped per activation before the operator yields (and asks to run again).
const STEPS_PER_ACTIVATION: usize = 16 * 1024;

/// A worker's journey state, read from outside the dataflow.
#[derive(Clone)]
pub struct JourneyHandle(Rc<RefCell<Machine>>);

impl JourneyHandle {
    /// Bytes of journey state, counted from the structures.
    pub fn bytes(&self) -> JourneyBytes {
        self.0.borrow().bytes()
    }

    /// Where `user` stands in every journey on this worker.
    pub fn status(&self, user: &str) -> Vec<crate::journey::machine::JourneyStatus> {
        self.0.borrow().status(user)
    }
}

/// What the journey operator starts from: the checkpoint's instant, its chain of parts,
/// the rows to emit at that instant, and the memberships to learn without a trigger.
pub type RestoredJourneys = (Time, Vec<MachinePart>, Vec<JOut>, Vec<(String, u16)>);

/// A control update the operator takes at its instant.
enum Control {
    Checkpoint(crate::dataflow::CheckpointReq),
    /// A journey (index) paused or resumed.
    Pause(u16, bool),
    /// A changed journey set ([`Ctl::Define`]).
    Define(Rc<JourneySet>),
}

/// Which user the merge of stashed input and due timers steps next.
enum Next {
    Input,
    Timer,
    Both,
}

/// Runs the journeys over `input`; returns what they emit, each record at its instant,
/// and a handle on the state. `ctl` (broadcast) carries checkpoint requests, answered
/// through `parts`, and pauses ([`Ctl::Pause`]); `restored` is a checkpoint's instant,
/// the chain of parts to start from, rows to emit at that instant (the exits a changed
/// journey file caused), and memberships the journeys learn without a trigger
/// (`Machine::seed_members`); `paused`: the journeys paused from the start.
pub fn run_journeys<'s>(
    input: VecCollection<'s, Time, (String, JIn), isize>,
    set: Rc<JourneySet>,
    ctl: Stream<'s, Time, Vec<(Ctl, Time, isize)>>,
    parts: Option<Rc<dyn PartSink>>,
    restored: Option<RestoredJourneys>,
    paused: Vec<u16>,
    definitions: Option<crate::dataflow::JourneyDefinitions>,
) -> (Stream<'s, Time, Vec<JOut>>, JourneyHandle) {
    let scope = input.inner.scope();
    let shared = Rc::new(RefCell::new(Machine::new(set)));
    let handle = JourneyHandle(Rc::clone(&shared));
    let out = input.inner.binary_frontier(
        ctl,
        Exchange::new(|((u, _), _, _): &((String, JIn), Time, isize)| user_hash(u)),
        Pipeline,
        "journeys",
        move |initial, info| {
            let activator = scope.activator_for(info.address);
            let mut stash: BTreeMap<Time, Vec<(String, JIn, isize)>> = BTreeMap::new();
            let mut cap: Option<Capability<Time>> = None;
            let mut at_restore: Vec<JOut> = Vec::new();
            {
                let mut machine = shared.borrow_mut();
                if parts.is_some() {
                    machine.track_changes();
                }
                let mut start = None;
                if let Some((at, chain, exits, seeded)) = restored {
                    if let Err(e) = machine.restore(chain) {
                        panic!("restoring the journeys: {e}");
                    }
                    start = Some(at);
                    // Only this worker's users reach its machine.
                    let peers = scope.peers() as u64;
                    let me = scope.index() as u64;
                    machine.seed_members(
                        seeded
                            .into_iter()
                            .filter(|(u, _)| user_hash(u) % peers == me)
                            .collect(),
                    );
                    cap = Some(initial.delayed(&at));
                    at_restore = exits;
                }
                machine.start_paused(&paused, start);
                if let Some(at) = start {
                    machine.restart_from(at, &mut at_restore);
                }
            }
            // Checkpoint requests not yet answered, and journey sets and pauses not yet in
            // force, by instant.
            let mut requests: BTreeMap<Time, Vec<Control>> = BTreeMap::new();
            // update_trait writes emitted at the last instant stepped, by target instant.
            let mut writes: Vec<(Time, Event)> = Vec::new();
            let mut outs: Vec<JOut> = Vec::new();
            move |(input, frontier), (ctl_in, ctl_frontier), output| {
                let mut machine = shared.borrow_mut();
                let machine = &mut *machine;
                input.for_each_stamp(|c, data| {
                    if let Some(c) = c.retain_least(output.output_index()) {
                        if cap.as_ref().is_none_or(|k| c.time() < k.time()) {
                            cap = Some(c);
                        }
                    }
                    for batch in data {
                        for ((u, x), t, r) in batch.drain(..) {
                            stash.entry(t).or_default().push((u, x, r));
                        }
                    }
                });
                ctl_in.for_each_stamp(|c, data| {
                    for batch in data {
                        for (x, t, r) in batch.drain(..) {
                            let control = match x {
                                Ctl::Checkpoint(req) if r > 0 && parts.is_some() => {
                                    Control::Checkpoint(req)
                                }
                                Ctl::Pause { journey, paused } if r > 0 => {
                                    Control::Pause(journey, paused)
                                }
                                Ctl::Define(v) if r > 0 => {
                                    match definitions.as_ref().and_then(|d| d(v)) {
                                        Some(set) => Control::Define(set),
                                        None => continue,
                                    }
                                }
                                _ => continue,
                            };
                            if let Some(c) = c.retain_least(output.output_index()) {
                                if cap.as_ref().is_none_or(|k| c.time() < k.time()) {
                                    cap = Some(c);
                                }
                            }
                            requests.entry(t).or_default().push(control);
                        }
                    }
                });
                let Some(c) = cap.as_mut() else { return };
                // The restore's rows, at its instant (the capability is still there: the
                // first activation has not moved it).
                if !at_restore.is_empty() {
                    keep_writes(&at_restore, &mut writes, parts.is_some());
                    output.session(c).give_iterator(at_restore.drain(..));
                }
                // A burst (a million timers at one instant, a replay's final catch-up) is
                // taken in slices, so downstream drains between them and memory stays flat.
                let mut budget = STEPS_PER_ACTIVATION;
                loop {
                    if budget == 0 {
                        activator.activate();
                        break;
                    }
                    let Some(next) = next_instant(&stash, machine, &requests) else {
                        break;
                    };
                    if frontier.less_equal(&next) || ctl_frontier.less_equal(&next) {
                        break;
                    }
                    // A checkpoint at `next` holds the state before anything at it; pauses
                    // at `next` are in force from it on.
                    if let Some(reqs) = requests.remove(&next) {
                        writes.retain(|(t, _)| *t >= next);
                        for req in reqs.iter() {
                            if let (Control::Checkpoint(req), Some(p)) = (req, &parts) {
                                p.journeys(
                                    next,
                                    JourneysPart {
                                        machine: machine.part(req.full),
                                        writes: writes.iter().map(|(_, e)| e.clone()).collect(),
                                    },
                                );
                            }
                        }
                        // A changed journey set before the pauses at the same instant (a
                        // pause names an index the new set may have added).
                        for req in &reqs {
                            if let Control::Define(set) = req {
                                let set = Rc::new(set.in_force_at(next));
                                machine.set_journeys(set, next, &mut outs);
                            }
                        }
                        if !outs.is_empty() {
                            keep_writes(&outs, &mut writes, parts.is_some());
                            output
                                .session(&c.delayed(&next))
                                .give_iterator(outs.drain(..));
                        }
                        for req in reqs {
                            if let Control::Pause(j, paused) = req {
                                machine.set_paused(j as usize, paused, next);
                            }
                        }
                    }
                    if stash.keys().next() != Some(&next) && machine.next_timer() != Some(next) {
                        continue;
                    }
                    writes.retain(|(t, _)| *t > next);
                    let mut items = stash.remove(&next).unwrap_or_default();
                    items.sort_by(|a, b| a.0.cmp(&b.0));
                    let due = machine.due(next, budget);
                    let at = c.delayed(&next);
                    let mut session = output.session(&at);
                    // Merge the users with input and those with a due timer, in user order.
                    let mut items = items.into_iter().peekable();
                    let mut due = due.into_iter().peekable();
                    loop {
                        let pick = match (items.peek(), due.peek()) {
                            (Some(i), Some(&d)) => match i.0.as_str().cmp(machine.key(d)) {
                                Ordering::Less => Next::Input,
                                Ordering::Greater => Next::Timer,
                                Ordering::Equal => Next::Both,
                            },
                            (Some(_), None) => Next::Input,
                            (None, Some(_)) => Next::Timer,
                            (None, None) => break,
                        };
                        if budget == 0 {
                            // Yield mid-instant: the rest of its input goes back to the
                            // stash, the due users not stepped back to the machine.
                            let rest: Vec<_> = items.collect();
                            if !rest.is_empty() {
                                stash.insert(next, rest);
                            }
                            machine.undue(due.collect());
                            break;
                        }
                        match pick {
                            Next::Timer => {
                                let u = due.next().expect("peeked");
                                machine.step_user(u, next, Vec::new(), &mut outs);
                            }
                            Next::Input | Next::Both => {
                                let user = items.peek().expect("peeked").0.clone();
                                let mut inputs = Vec::new();
                                while let Some((_, x, r)) = items.next_if(|i| i.0 == user) {
                                    inputs.push((x, r));
                                }
                                if let Next::Both = pick {
                                    due.next();
                                }
                                machine.step(&user, next, inputs, &mut outs);
                            }
                        }
                        budget -= 1;
                        keep_writes(&outs, &mut writes, parts.is_some());
                        session.give_iterator(outs.drain(..));
                    }
                }
                match next_instant(&stash, machine, &requests) {
                    Some(t) => c.downgrade(&t),
                    None => cap = None,
                }
            }
        },
    );
    (out, handle)
}

/// Keeps the `update_trait` writes among `outs` for the next checkpoint part, when parts
/// are taken (`keep`): a write targets a later instant, and a checkpoint between the two
/// must feed it again at a restore.
fn keep_writes(outs: &[JOut], writes: &mut Vec<(Time, Event)>, keep: bool) {
    if keep {
        for o in outs {
            if let JOut::Write(ev, at) = o {
                writes.push((*at, ev.clone()));
            }
        }
    }
}

/// The earliest instant the operator still has to take: stashed input, a timer or a
/// checkpoint request.
fn next_instant<A, B>(
    stash: &BTreeMap<Time, A>,
    machine: &mut Machine,
    requests: &BTreeMap<Time, B>,
) -> Option<Time> {
    [
        stash.keys().next().copied(),
        machine.next_timer(),
        requests.keys().next().copied(),
    ]
    .into_iter()
    .flatten()
    .min()
}
