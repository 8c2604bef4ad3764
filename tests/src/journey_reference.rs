//! The reference journey interpreter: a deliberately naive reading of
//! `shared/spec/journeys.md`, the oracle the journey operator is checked against.
//!
//! Owns [`run_journeys`]. It walks each user's timeline instant by instant, keeps each
//! instance's position as a stack of (block, index) frames over the journey's step *tree*
//! (the engine flattens steps into a program with jumps), and answers every condition by
//! asking the reference segment evaluator ([`members_at`]) about a one-off segment at
//! that instant. It shares only the journey file's data types with the engine.
//!
//! The choices it encodes are the documented ones (docs/journeys.md): at an instant,
//! journeys run in file order, and for each: exit rules (for instances that entered
//! earlier), then resuming (a `wait_until`'s event before its timer), then entry;
//! `update_trait` writes are visible from the next millisecond; rows of one user at one
//! instant are numbered in the order they happen.
//!
//! Supported: event and API triggers, event exits without `where`, every step type,
//! re-entry rules, frequency caps, consent and address checks. Not supported (the engine's
//! scenario tests cover them): segment triggers and exits, `where` conditions, quiet hours.

use std::collections::{BTreeMap, VecDeque};

use herald_operators::ast::{SegmentBody, SegmentDef, SegmentFile};
use herald_operators::event::{Event, EventType};
use herald_operators::journey::compile::{API_TRIGGER_EVENT, API_TRIGGER_KEY};
use herald_operators::journey::file::{JourneyDef, Reentry, StepDef, Trigger, CHANNELS};
use herald_operators::lang::ast::Pos;
use herald_operators::lang::parse::{parse_condition, ConditionScope};
use herald_operators::value::Value;
use serde_json::{Map, Value as Json};

use crate::reference::{members_at, World};

/// A journey event as the reference sees it (no message id: its hash is the engine's
/// choice, not a behaviour).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefRow {
    /// Instant.
    pub time: i64,
    /// Journey.
    pub journey: String,
    /// User.
    pub user_id: String,
    /// Instance number.
    pub instance: u32,
    /// Order among the user's rows at this instant.
    pub seq: u32,
    /// Kind name.
    pub kind: String,
    /// Step path ("" when none).
    pub step_path: String,
    /// Variant.
    pub variant: Option<String>,
    /// Reason.
    pub reason: Option<String>,
}

struct Frame<'a> {
    steps: &'a [StepDef],
    next: usize,
    path: String,
}

enum Wait {
    Timer,
    Event { name: String },
}

struct Inst<'a> {
    number: u32,
    entered: i64,
    frames: Vec<Frame<'a>>,
    variant: Option<String>,
    wait: Wait,
    wake: Option<i64>,
    /// The `wait_until` being waited on: its blocks and path.
    pending: Option<(&'a [StepDef], &'a [StepDef], String)>,
}

#[derive(Default)]
struct Hist {
    entries: u32,
    last: Option<i64>,
    sends: VecDeque<i64>,
}

struct User<'a> {
    id: String,
    events: Vec<Event>,
    /// update_trait writes and the instant they become visible.
    writes: Vec<(Event, i64)>,
    active: Vec<Option<Inst<'a>>>,
    hist: Vec<Hist>,
}

struct Ctx<'a> {
    segments: &'a SegmentFile,
    journeys: &'a [JourneyDef],
    rows: Vec<RefRow>,
}

impl<'a> Ctx<'a> {
    /// Does `condition` (user level) hold for the user at `t`?
    fn holds(&self, u: &User, condition: &str, t: i64) -> bool {
        let (expr, _) = parse_condition(condition, ConditionScope::User)
            .unwrap_or_else(|e| panic!("reference: {condition}: {e}"));
        let mut file = self.segments.clone();
        file.segments.push(SegmentDef {
            name: "__probe".into(),
            pos: Pos { line: 0, column: 0 },
            body: SegmentBody::Expr(expr),
        });
        let mut events = u.events.clone();
        events.extend(
            u.writes
                .iter()
                .filter(|(_, vis)| *vis <= t)
                .map(|(e, _)| e.clone()),
        );
        let world = World {
            events,
            ..World::default()
        };
        members_at(&file, &world, t)
            .get("__probe")
            .is_some_and(|m| m.contains(&u.id))
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        t: i64,
        j: &str,
        u: &str,
        inst: &Inst,
        seq: &mut u32,
        kind: &str,
        path: &str,
        reason: Option<String>,
    ) {
        self.rows.push(RefRow {
            time: t,
            journey: j.to_string(),
            user_id: u.to_string(),
            instance: inst.number,
            seq: *seq,
            kind: kind.to_string(),
            step_path: path.to_string(),
            variant: inst.variant.clone(),
            reason,
        });
        *seq += 1;
    }

    /// Runs an instance from its position at `t`; returns it if it waits.
    fn run(
        &mut self,
        u: &mut User<'a>,
        ji: usize,
        mut inst: Inst<'a>,
        t: i64,
        seq: &mut u32,
    ) -> Option<Inst<'a>> {
        let jd: &'a JourneyDef = &self.journeys[ji];
        loop {
            let Some(top) = inst.frames.last_mut() else {
                self.row(t, &jd.name, &u.id, &inst, seq, "completed", "", None);
                return None;
            };
            if top.next >= top.steps.len() {
                inst.frames.pop();
                continue;
            }
            let steps: &'a [StepDef] = top.steps;
            let i = top.next;
            top.next += 1;
            let path = format!("{}[{i}]", top.path);
            self.row(t, &jd.name, &u.id, &inst, seq, "step", &path, None);
            match &steps[i] {
                StepDef::Wait(ms) => {
                    inst.wait = Wait::Timer;
                    inst.wake = Some(t + ms);
                    return Some(inst);
                }
                StepDef::WaitUntil {
                    event,
                    timeout,
                    on_event,
                    on_timeout,
                    cond,
                } => {
                    assert!(
                        cond.is_none(),
                        "reference: wait_until where is not supported"
                    );
                    inst.wait = Wait::Event {
                        name: event.clone(),
                    };
                    inst.wake = timeout.map(|d| t + d);
                    inst.pending = Some((on_event, on_timeout, path));
                    return Some(inst);
                }
                StepDef::Branch { arms, otherwise } => {
                    let hit = arms.iter().position(|(c, _)| self.holds(u, &c.text, t));
                    let frame = match hit {
                        Some(k) => Frame {
                            steps: &arms[k].1,
                            next: 0,
                            path: format!("{path}.branch[{k}].steps"),
                        },
                        None => Frame {
                            steps: otherwise,
                            next: 0,
                            path: format!("{path}.branch[{}].else", arms.len()),
                        },
                    };
                    inst.frames.push(frame);
                }
                StepDef::Split(variants) => {
                    let total: u64 = variants.iter().map(|v| v.1).sum();
                    let key = format!("{}:{}", jd.name, u.id);
                    let mut b = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % total;
                    let k = variants
                        .iter()
                        .position(|v| {
                            if b < v.1 {
                                true
                            } else {
                                b -= v.1;
                                false
                            }
                        })
                        .expect("b < total");
                    inst.variant = Some(variants[k].0.clone());
                    inst.frames.push(Frame {
                        steps: &variants[k].2,
                        next: 0,
                        path: format!("{path}.split[{k}].steps"),
                    });
                }
                StepDef::Send { channel, .. } => {
                    assert!(
                        jd.quiet_hours.is_none(),
                        "reference: quiet hours are not supported"
                    );
                    let address = CHANNELS.iter().find(|c| c.0 == channel).and_then(|c| c.1);
                    let h = &mut u.hist[ji];
                    if let Some((_, per)) = jd.frequency_cap {
                        h.sends.retain(|s| *s > t - per);
                    }
                    let capped = jd
                        .frequency_cap
                        .is_some_and(|(max, _)| u.hist[ji].sends.len() >= max as usize);
                    let reason = if self.holds(u, &format!("\"{channel}_opt_out\" = TRUE"), t) {
                        Some("opt_out")
                    } else if address
                        .is_some_and(|a| !self.holds(u, &format!("\"{a}\" IS NOT NULL"), t))
                    {
                        Some("no_address")
                    } else if capped {
                        Some("frequency_cap")
                    } else {
                        None
                    };
                    match reason {
                        Some(r) => self.row(
                            t,
                            &jd.name,
                            &u.id,
                            &inst,
                            seq,
                            "suppressed",
                            &path,
                            Some(r.into()),
                        ),
                        None => {
                            if jd.frequency_cap.is_some() {
                                u.hist[ji].sends.push_back(t);
                            }
                            self.row(t, &jd.name, &u.id, &inst, seq, "sent", &path, None);
                        }
                    }
                }
                StepDef::UpdateTrait { name, value } => {
                    let v = value.clone().unwrap_or(Value::Ts(t));
                    let mut traits = Map::new();
                    traits.insert(name.clone(), v.to_json());
                    let write = Event {
                        user: u.id.clone(),
                        kind: EventType::Identify,
                        event: None,
                        // Herald's writes at one instant apply in the order they run.
                        message_id: format!("herald-{:010}-ref", *seq),
                        timestamp: t,
                        properties: Map::new(),
                        context: Map::new(),
                        traits,
                    };
                    u.writes.push((write, t + 1));
                }
            }
        }
    }

    fn user_at(&mut self, u: &mut User<'a>, t: i64) {
        let evs: Vec<Event> = u
            .events
            .iter()
            .filter(|e| e.timestamp == t)
            .cloned()
            .collect();
        let named = |e: &Event, n: &str| e.event.as_deref() == Some(n);
        let mut seq = 0u32;
        for ji in 0..self.journeys.len() {
            let jd: &'a JourneyDef = &self.journeys[ji];
            // Exit rules.
            if let Some(inst) = &u.active[ji] {
                if inst.entered < t {
                    let fired = jd.exits.iter().find(|x| match &x.trigger {
                        Trigger::Event(n) => evs.iter().any(|e| named(e, n)),
                        other => panic!("reference: exit {other:?} is not supported"),
                    });
                    if let Some(x) = fired {
                        let inst = u.active[ji].take().expect("active");
                        let label = x.trigger.label();
                        if x.goal {
                            self.row(
                                t,
                                &jd.name,
                                &u.id,
                                &inst,
                                &mut seq,
                                "converted",
                                "",
                                Some(label.clone()),
                            );
                        }
                        self.row(
                            t,
                            &jd.name,
                            &u.id,
                            &inst,
                            &mut seq,
                            "exited",
                            "",
                            Some(label),
                        );
                    }
                }
            }
            // Resume.
            if let Some(mut inst) = u.active[ji].take() {
                let by_event = matches!(&inst.wait, Wait::Event { name } if evs.iter().any(|e| named(e, name)));
                let resumed = if by_event || inst.wake == Some(t) {
                    if let Some((on_event, on_timeout, path)) = inst.pending.take() {
                        let (steps, block) = if by_event {
                            (on_event, "on_event")
                        } else {
                            (on_timeout, "on_timeout")
                        };
                        inst.frames.push(Frame {
                            steps,
                            next: 0,
                            path: format!("{path}.wait_until.{block}"),
                        });
                    }
                    inst.wake = None;
                    self.run(u, ji, inst, t, &mut seq)
                } else {
                    Some(inst)
                };
                u.active[ji] = resumed;
            }
            // Entry.
            if u.active[ji].is_some() {
                continue;
            }
            let h = &u.hist[ji];
            let may = match jd.reentry {
                Reentry::Never => h.entries == 0,
                Reentry::Always => true,
                Reentry::After(d) => h.last.is_none_or(|l| t - l >= d),
            };
            assert!(
                jd.entry_cond.is_none(),
                "reference: entry where is not supported"
            );
            let triggered = match &jd.entry {
                Trigger::Event(n) => evs.iter().any(|e| named(e, n)),
                Trigger::Api => evs.iter().any(|e| {
                    named(e, API_TRIGGER_EVENT)
                        && e.context.get(API_TRIGGER_KEY).and_then(Json::as_str) == Some(&jd.name)
                }),
                other => panic!("reference: entry {other:?} is not supported"),
            };
            if !(may && triggered) {
                continue;
            }
            let h = &mut u.hist[ji];
            h.entries += 1;
            h.last = Some(t);
            let inst = Inst {
                number: h.entries,
                entered: t,
                frames: vec![Frame {
                    steps: &jd.steps,
                    next: 0,
                    path: "steps".into(),
                }],
                variant: None,
                wait: Wait::Timer,
                wake: None,
                pending: None,
            };
            let reason = match &jd.entry {
                Trigger::Api => "api".to_string(),
                other => other.label(),
            };
            self.row(
                t,
                &jd.name,
                &u.id,
                &inst,
                &mut seq,
                "entered",
                "",
                Some(reason),
            );
            u.active[ji] = self.run(u, ji, inst, t, &mut seq);
        }
    }
}

/// Runs `journeys` over `events` up to `until` (inclusive); rows sorted like the engine's
/// (time, journey, user, instance, seq).
pub fn run_journeys(
    segments: &SegmentFile,
    journeys: &[JourneyDef],
    events: &[Event],
    until: i64,
) -> Vec<RefRow> {
    let mut by_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for e in events {
        by_user.entry(e.user.clone()).or_default().push(e.clone());
    }
    let mut cx = Ctx {
        segments,
        journeys,
        rows: Vec::new(),
    };
    for (id, evs) in by_user {
        let mut u = User {
            id,
            events: evs,
            writes: Vec::new(),
            active: journeys.iter().map(|_| None).collect(),
            hist: journeys.iter().map(|_| Hist::default()).collect(),
        };
        let mut t = i64::MIN;
        loop {
            let next_event = u
                .events
                .iter()
                .map(|e| e.timestamp)
                .filter(|&x| x > t)
                .min();
            let next_wake = u
                .active
                .iter()
                .flatten()
                .filter_map(|i| i.wake)
                .filter(|&x| x > t)
                .min();
            let Some(next) = next_event.into_iter().chain(next_wake).min() else {
                break;
            };
            if next > until {
                break;
            }
            t = next;
            cx.user_at(&mut u, t);
        }
    }
    cx.rows.sort();
    cx.rows
}
