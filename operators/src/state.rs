//! Per-user segment state, kept compactly, and the evaluation of every segment of one user
//! at one instant.
//!
//! Owns [`SegmentState`]: one worker's share of the users (interned to `u32` indices; the
//! user key string is kept once, for output), each user's state as a short sorted list of
//! *cells* (one per aggregate, trait or list the user has touched, nothing for the rest),
//! and one timer per user at the next instant its membership could change by time alone.
//! What each aggregate keeps is what it needs and no more:
//!
//! * window-free `count`: a counter; window-free `count(DISTINCT x)`: the set of 64-bit
//!   fingerprints of the distinct values;
//! * window-free `sum/avg/min/max/first/last`: the running value (events are never
//!   retracted, so nothing else can matter);
//! * an aggregate whose FILTER reads `now()`: each matching event's validity interval
//!   (and value, where the aggregate reads one), dropped once the interval has passed;
//! * a trait: the current snapshot's cell and the latest identify write.
//!
//! [`SegmentState::evaluate`] computes every segment at instant `t` from the cells, emits
//! the difference from the user's previous membership, and returns the next instant at
//! which anything could change without new input: the earliest window boundary and the
//! earliest `now()` breakpoint of any segment given the values at `t`. Because every
//! condition is constant between those instants (see `eval::breakpoints`), evaluating at
//! the inputs' instants and at these wake-ups is exact at millisecond resolution: the same
//! membership the interval evaluation (`Plan::evaluate`) and the reference evaluator give.
//!
//! Invariants: state is plain data (no `Rc`, no pointers into other users), partitioned by
//! user; evaluation is idempotent, so a spurious wake-up changes nothing.

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};

use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use crate::ast::{AggKind, EventField};
use crate::eval::{
    breakpoints, eval, eval_ref, mentions_now, now_points, true_intervals, CExpr, Context,
    NowPoints,
};
use crate::event::Event;
use crate::msgid::MsgId;
use crate::plan::{type_rank, EventCtx, FactVal, Plan, SegmentKind, SLOT_PROFILE};
use crate::project::Projected;
use crate::time::{to_time, Time};
use crate::value::Value;
use crate::why::{keep_smallest, Preview, UserAt};

/// A running accumulator for one window-free (user, aggregate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Acc {
    Sum(f64),
    Avg(f64, f64),
    /// Min or max: the best value of the highest-ranked type seen.
    Extreme(Value),
    /// First or last: `(timestamp, message id, value)`.
    Ordered(Box<(i64, Box<str>, Value)>),
}

impl Acc {
    fn value(&self) -> Cow<'_, Value> {
        match self {
            Acc::Sum(s) => Cow::Owned(Value::num(*s)),
            Acc::Avg(s, n) => Cow::Owned(Value::num(s / n)),
            Acc::Extreme(v) => Cow::Borrowed(v),
            Acc::Ordered(b) => Cow::Borrowed(&b.2),
        }
    }
}

/// Folds one event's contribution into an accumulator; returns the new accumulator, or
/// `None` when it does not move.
pub(crate) fn fold(kind: AggKind, acc: Option<&Acc>, ev: &Projected, v: Value) -> Option<Acc> {
    match kind {
        AggKind::Sum | AggKind::Avg => {
            let x = v.as_f64()?;
            Some(match (kind, acc) {
                (AggKind::Sum, Some(Acc::Sum(s))) => Acc::Sum(s + x),
                (AggKind::Sum, _) => Acc::Sum(x),
                (_, Some(Acc::Avg(s, n))) => Acc::Avg(s + x, n + 1.0),
                _ => Acc::Avg(x, 1.0),
            })
        }
        AggKind::Min | AggKind::Max => {
            if v.is_null() {
                return None;
            }
            match acc {
                Some(Acc::Extreme(cur)) => {
                    let better = match type_rank(&v).cmp(&type_rank(cur)) {
                        Ordering::Greater => true,
                        Ordering::Less => false,
                        Ordering::Equal if kind == AggKind::Min => v < *cur,
                        Ordering::Equal => v > *cur,
                    };
                    better.then_some(Acc::Extreme(v))
                }
                _ => Some(Acc::Extreme(v)),
            }
        }
        AggKind::First | AggKind::Last => {
            let key = (ev.timestamp, ev.message_id.as_str());
            let better = match acc {
                Some(Acc::Ordered(b)) => {
                    let cur = (b.0, &*b.1);
                    if kind == AggKind::First {
                        key < cur
                    } else {
                        key > cur
                    }
                }
                _ => true,
            };
            better.then(|| Acc::Ordered(Box::new((ev.timestamp, ev.message_id.as_str().into(), v))))
        }
        AggKind::Count => None,
    }
}

/// A trait's latest identify write: `(timestamp, message id, value)`.
type Write = (i64, MsgId, Value);

/// A write as a trait cell keeps it: the message id as a canonical UUID's 16 bytes
/// (`[u8; 16]`) or as text (`Box<str>`): 48 bytes either way, where a [`Write`] takes 56.
type Kept<I> = (i64, I, Value);

/// A message id as a trait cell holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdRef<'a> {
    Uuid(&'a [u8; 16]),
    Text(&'a str),
}

/// A trait's latest write, borrowed from its cell.
#[derive(Clone, Copy, Debug)]
struct WriteRef<'a> {
    ts: i64,
    id: IdRef<'a>,
    value: &'a Value,
}

impl IdRef<'_> {
    fn to_owned(self) -> MsgId {
        match self {
            IdRef::Uuid(u) => MsgId::Uuid(*u),
            IdRef::Text(t) => MsgId::Text(t.into()),
        }
    }
}

impl<'a> WriteRef<'a> {
    /// The write's timestamp and message id.
    fn stamp(self) -> (i64, IdRef<'a>) {
        (self.ts, self.id)
    }

    /// The id compared with one given as text, in text order.
    fn cmp_id(&self, other: &str) -> Ordering {
        match self.id {
            IdRef::Uuid(u) => MsgId::Uuid(*u).cmp_text(other),
            IdRef::Text(t) => t.cmp(other),
        }
    }
}

fn uuid_ref(w: &Kept<[u8; 16]>) -> WriteRef<'_> {
    WriteRef {
        ts: w.0,
        id: IdRef::Uuid(&w.1),
        value: &w.2,
    }
}

fn text_ref(w: &Kept<Box<str>>) -> WriteRef<'_> {
    WriteRef {
        ts: w.0,
        id: IdRef::Text(&w.1),
        value: &w.2,
    }
}

/// One slot of one user's state, in 16 bytes: every variant is the slot number and one
/// word (larger parts are boxed), so a user's cells are one small array.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Cell {
    /// Window-free `count(*)` / `count(x)`: matching events.
    Count(u16, u64),
    /// Window-free `count(DISTINCT x)`: fingerprints of the distinct values, sorted, in
    /// an exact-size array (boxed again so the variant is one word).
    Distinct(u16, Box<Box<[u64]>>),
    /// Window-free `sum`.
    Sum(u16, f64),
    /// Window-free `min/max` whose best value is a timestamp (most are: `min(timestamp)`).
    ExtremeTs(u16, i64),
    /// Window-free `min/max` whose best value is a number.
    ExtremeNum(u16, f64),
    /// Any other running value: `min/max` of text or booleans, `first/last`, an `avg` of
    /// more than 2^32 values.
    Acc(u16, Box<Acc>),
    /// A windowed count: each matching event's validity interval.
    WinCount(u16, Box<Window<()>>),
    /// A windowed aggregate of values: each matching event's interval and value.
    WinVal(u16, Box<Window<FactVal>>),
    /// A trait with a snapshot cell only.
    TraitSnap(u16, Box<Value>),
    /// A trait with an identify write only (its message id a canonical UUID).
    TraitWrite(u16, Box<Kept<[u8; 16]>>),
    /// A trait with both: the snapshot cell and the latest identify write.
    TraitBoth(u16, Box<(Value, Kept<[u8; 16]>)>),
    /// A static list or warehouse audience: membership multiplicity.
    List(u16, i32),
    /// Window-free `avg`: the count of values (in the slot's padding) and their sum.
    Avg(u16, u32, f64),
    /// A trait whose snapshot cell is the latest write's value (a CRM export of what the
    /// app identified, the common case), kept once.
    TraitSame(u16, Box<Kept<[u8; 16]>>),
    /// [`Cell::TraitWrite`] of a write whose message id is not a canonical UUID.
    TraitWriteText(u16, Box<Kept<Box<str>>>),
    /// [`Cell::TraitBoth`] of a write whose message id is not a canonical UUID.
    TraitBothText(u16, Box<(Value, Kept<Box<str>>)>),
    /// [`Cell::TraitSame`] of a write whose message id is not a canonical UUID.
    TraitSameText(u16, Box<Kept<Box<str>>>),
    /// [`Cell::TraitWrite`] whose write has the previous cell's timestamp and message id
    /// (one identify writing several traits): the value only.
    TraitWriteLinked(u16, Box<Value>),
    /// [`Cell::TraitSame`] with the previous cell's timestamp and message id.
    TraitSameLinked(u16, Box<Value>),
    /// [`Cell::TraitBoth`] with the previous cell's timestamp and message id: the snapshot
    /// cell and the write's value.
    TraitBothLinked(u16, Box<(Value, Value)>),
}

// Every variant is a slot and one word: a user's cells are an array of 16-byte entries.
const _: () = assert!(std::mem::size_of::<Cell>() == 16);
const _: () = assert!(std::mem::size_of::<Kept<[u8; 16]>>() == 48);
const _: () = assert!(std::mem::size_of::<Kept<Box<str>>>() == 48);

/// Whether two values are the same value, bit for bit (`==` takes `-0` for `0`).
fn identical(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Num(x), Value::Num(y)) => x.0.to_bits() == y.0.to_bits(),
        _ => a == b,
    }
}

impl Cell {
    /// Moves the cell to another slot (same aggregate or trait under a new plan).
    fn set_slot(&mut self, slot: u16) {
        match self {
            Cell::Count(s, _)
            | Cell::Distinct(s, _)
            | Cell::Sum(s, _)
            | Cell::ExtremeTs(s, _)
            | Cell::ExtremeNum(s, _)
            | Cell::Avg(s, ..)
            | Cell::Acc(s, _)
            | Cell::WinCount(s, _)
            | Cell::WinVal(s, _)
            | Cell::TraitSnap(s, _)
            | Cell::TraitWrite(s, _)
            | Cell::TraitBoth(s, _)
            | Cell::TraitSame(s, _)
            | Cell::TraitWriteText(s, _)
            | Cell::TraitBothText(s, _)
            | Cell::TraitSameText(s, _)
            | Cell::TraitWriteLinked(s, _)
            | Cell::TraitSameLinked(s, _)
            | Cell::TraitBothLinked(s, _)
            | Cell::List(s, _) => *s = slot,
        }
    }

    fn slot(&self) -> u32 {
        let s = match self {
            Cell::Count(s, _)
            | Cell::Distinct(s, _)
            | Cell::Sum(s, _)
            | Cell::ExtremeTs(s, _)
            | Cell::ExtremeNum(s, _)
            | Cell::Avg(s, ..)
            | Cell::Acc(s, _)
            | Cell::WinCount(s, _)
            | Cell::WinVal(s, _)
            | Cell::TraitSnap(s, _)
            | Cell::TraitWrite(s, _)
            | Cell::TraitBoth(s, _)
            | Cell::TraitSame(s, _)
            | Cell::TraitWriteText(s, _)
            | Cell::TraitBothText(s, _)
            | Cell::TraitSameText(s, _)
            | Cell::TraitWriteLinked(s, _)
            | Cell::TraitSameLinked(s, _)
            | Cell::TraitBothLinked(s, _)
            | Cell::List(s, _) => *s,
        };
        u32::from(s)
    }

    /// The running value of a window-free `sum/avg/min/max/first/last`.
    fn acc(&self) -> Option<Cow<'_, Acc>> {
        Some(match self {
            Cell::Sum(_, x) => Cow::Owned(Acc::Sum(*x)),
            Cell::ExtremeTs(_, t) => Cow::Owned(Acc::Extreme(Value::Ts(*t))),
            Cell::ExtremeNum(_, x) => Cow::Owned(Acc::Extreme(Value::num(*x))),
            Cell::Avg(_, n, s) => Cow::Owned(Acc::Avg(*s, f64::from(*n))),
            Cell::Acc(_, a) => Cow::Borrowed(&**a),
            _ => return None,
        })
    }

    /// The cell holding a running value, unboxed where it fits in a word.
    fn from_acc(slot: u16, a: Acc) -> Cell {
        match a {
            Acc::Sum(x) => Cell::Sum(slot, x),
            Acc::Extreme(Value::Ts(t)) => Cell::ExtremeTs(slot, t),
            Acc::Extreme(Value::Num(n)) => Cell::ExtremeNum(slot, n.0),
            // The count is a whole number of values; past u32 it stays boxed.
            Acc::Avg(s, n) if n <= f64::from(u32::MAX) => Cell::Avg(slot, n as u32, s),
            other => Cell::Acc(slot, Box::new(other)),
        }
    }

    /// A trait's snapshot cell and latest write; `None` for other cells. A linked cell's
    /// write has the stamp `prev` gives (the previous cell's).
    fn trait_parts<'a>(
        &'a self,
        prev: impl FnOnce() -> Option<(i64, IdRef<'a>)>,
    ) -> Option<(Option<&'a Value>, Option<WriteRef<'a>>)> {
        let linked = |value: &'a Value, prev: Option<(i64, IdRef<'a>)>| {
            prev.map(|(ts, id)| WriteRef { ts, id, value })
        };
        Some(match self {
            Cell::TraitWriteLinked(_, v) => (None, linked(v, prev())),
            Cell::TraitSameLinked(_, v) => (Some(&**v), linked(v, prev())),
            Cell::TraitBothLinked(_, b) => (Some(&b.0), linked(&b.1, prev())),
            Cell::TraitSnap(_, v) => (Some(&**v), None),
            Cell::TraitWrite(_, w) => (None, Some(uuid_ref(w))),
            Cell::TraitBoth(_, b) => (Some(&b.0), Some(uuid_ref(&b.1))),
            Cell::TraitSame(_, w) => (Some(&w.2), Some(uuid_ref(w))),
            Cell::TraitWriteText(_, w) => (None, Some(text_ref(w))),
            Cell::TraitBothText(_, b) => (Some(&b.0), Some(text_ref(&b.1))),
            Cell::TraitSameText(_, w) => (Some(&w.2), Some(text_ref(w))),
            _ => return None,
        })
    }

    /// Whether the cell takes its write's stamp from the previous cell.
    fn is_linked(&self) -> bool {
        matches!(
            self,
            Cell::TraitWriteLinked(..) | Cell::TraitSameLinked(..) | Cell::TraitBothLinked(..)
        )
    }

    /// The cell without its write's stamp (which the previous cell has).
    fn linked(self) -> Cell {
        match self {
            Cell::TraitWrite(s, w) => Cell::TraitWriteLinked(s, Box::new(w.2)),
            Cell::TraitWriteText(s, w) => Cell::TraitWriteLinked(s, Box::new(w.2)),
            Cell::TraitSame(s, w) => Cell::TraitSameLinked(s, Box::new(w.2)),
            Cell::TraitSameText(s, w) => Cell::TraitSameLinked(s, Box::new(w.2)),
            Cell::TraitBoth(s, b) => Cell::TraitBothLinked(s, Box::new((b.0, b.1 .2))),
            Cell::TraitBothText(s, b) => Cell::TraitBothLinked(s, Box::new((b.0, b.1 .2))),
            other => other,
        }
    }

    /// A linked cell with its write's stamp put back.
    fn unlinked(self, (ts, id): (i64, MsgId)) -> Cell {
        let (slot, snap, value) = match self {
            Cell::TraitWriteLinked(s, v) => (s, None, *v),
            Cell::TraitSameLinked(s, v) => (s, Some((*v).clone()), *v),
            Cell::TraitBothLinked(s, b) => (s, Some(b.0), b.1),
            other => return other,
        };
        Cell::from_trait(slot, snap, Some((ts, id, value))).unwrap_or(Cell::List(slot, 0))
    }

    /// A trait cell's snapshot value and write, owned; `Err` gives back any other cell
    /// (and a linked one, whose stamp is not its own: see [`User::unlink`]).
    fn into_trait(self) -> Result<(Option<Value>, Option<Write>), Cell> {
        fn uuid((t, u, v): Kept<[u8; 16]>) -> Write {
            (t, MsgId::Uuid(u), v)
        }
        fn text((t, s, v): Kept<Box<str>>) -> Write {
            (t, MsgId::Text(s), v)
        }
        Ok(match self {
            Cell::TraitSnap(_, v) => (Some(*v), None),
            Cell::TraitWrite(_, w) => (None, Some(uuid(*w))),
            Cell::TraitBoth(_, b) => (Some(b.0), Some(uuid(b.1))),
            Cell::TraitSame(_, w) => (Some(w.2.clone()), Some(uuid(*w))),
            Cell::TraitWriteText(_, w) => (None, Some(text(*w))),
            Cell::TraitBothText(_, b) => (Some(b.0), Some(text(b.1))),
            Cell::TraitSameText(_, w) => (Some(w.2.clone()), Some(text(*w))),
            other => return Err(other),
        })
    }

    /// Bytes of a trait cell's box and the heap it points to (0 for other cells).
    fn trait_bytes(&self) -> usize {
        use std::mem::size_of;
        let kept = |v: &Value, id: usize| size_of::<Kept<[u8; 16]>>() + id + Value::heap_bytes(v);
        match self {
            Cell::TraitSnap(_, v) => size_of::<Value>() + Value::heap_bytes(v),
            Cell::TraitWrite(_, w) | Cell::TraitSame(_, w) => kept(&w.2, 0),
            Cell::TraitWriteText(_, w) | Cell::TraitSameText(_, w) => kept(&w.2, w.1.len()),
            Cell::TraitBoth(_, b) => {
                size_of::<Value>() + Value::heap_bytes(&b.0) + kept(&b.1 .2, 0)
            }
            Cell::TraitBothText(_, b) => {
                size_of::<Value>() + Value::heap_bytes(&b.0) + kept(&b.1 .2, b.1 .1.len())
            }
            Cell::TraitWriteLinked(_, v) | Cell::TraitSameLinked(_, v) => {
                size_of::<Value>() + Value::heap_bytes(v)
            }
            Cell::TraitBothLinked(_, b) => {
                2 * size_of::<Value>() + Value::heap_bytes(&b.0) + Value::heap_bytes(&b.1)
            }
            _ => 0,
        }
    }

    /// The cell of a trait with these parts; `None` when it has neither.
    fn from_trait(slot: u16, snap: Option<Value>, write: Option<Write>) -> Option<Cell> {
        let Some((t, id, w)) = write else {
            return snap.map(|v| Cell::TraitSnap(slot, Box::new(v)));
        };
        Some(match (snap, id) {
            (None, MsgId::Uuid(u)) => Cell::TraitWrite(slot, Box::new((t, u, w))),
            (None, MsgId::Text(s)) => Cell::TraitWriteText(slot, Box::new((t, s, w))),
            (Some(v), MsgId::Uuid(u)) if identical(&v, &w) => {
                Cell::TraitSame(slot, Box::new((t, u, w)))
            }
            (Some(v), MsgId::Text(s)) if identical(&v, &w) => {
                Cell::TraitSameText(slot, Box::new((t, s, w)))
            }
            (Some(v), MsgId::Uuid(u)) => Cell::TraitBoth(slot, Box::new((v, (t, u, w)))),
            (Some(v), MsgId::Text(s)) => Cell::TraitBothText(slot, Box::new((v, (t, s, w)))),
        })
    }

    fn is_empty_window(&self) -> bool {
        match self {
            Cell::WinCount(_, w) => w.is_empty(),
            Cell::WinVal(_, w) => w.is_empty(),
            _ => false,
        }
    }

    /// Brings a window cell to instant `t`: `Some((next change, whether entries moved))`,
    /// `None` for other cells.
    fn advance_window(&mut self, t: Time) -> Option<(Time, bool)> {
        fn go<V>(w: &mut Window<V>, t: Time) -> (Time, bool) {
            let before = (w.live.len(), w.later().len());
            let next = w.advance(t);
            (next, before != (w.live.len(), w.later().len()))
        }
        match self {
            Cell::WinCount(_, w) => Some(go(w, t)),
            Cell::WinVal(_, w) => Some(go(w, t)),
            _ => None,
        }
    }
}

/// The entries of one windowed aggregate of one user: those whose interval has started,
/// sorted by the instant they expire (so pruning pops the front and the next expiry is the
/// front), and the few that start later (a FILTER like `timestamp < now() - 3 days`, or an
/// event stamped in the future).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Window<V> {
    /// `(until, value)`, sorted by `until`.
    live: VecDeque<(Time, V)>,
    /// `(from, until, value)` not yet started; rare, so one word when there are none.
    #[allow(clippy::box_collection)]
    later: Option<Box<Vec<(Time, Time, V)>>>,
}

impl<V> Default for Window<V> {
    fn default() -> Self {
        Window {
            live: VecDeque::new(),
            later: None,
        }
    }
}

impl<V> Window<V> {
    /// Adds an entry valid over `[from, until)`, processed at instant `t`.
    fn insert(&mut self, from: Time, until: Time, v: V, t: Time) {
        if from > t {
            self.later.get_or_insert_default().push((from, until, v));
        } else {
            self.start(until, v);
        }
    }

    fn start(&mut self, until: Time, v: V) {
        // Entries arrive in time order with equal window lengths, so this is almost
        // always an append.
        let later = self
            .live
            .iter()
            .rev()
            .take_while(|(u, _)| *u > until)
            .count();
        self.live.insert(self.live.len() - later, (until, v));
    }

    /// Brings the window to instant `t` (entries that started go live, expired ones go)
    /// and returns the next instant after `t` at which it changes.
    fn advance(&mut self, t: Time) -> Time {
        if let Some(mut later) = self.later.take() {
            let mut i = 0;
            while i < later.len() {
                if later[i].0 <= t {
                    let (_, until, v) = later.swap_remove(i);
                    self.start(until, v);
                } else {
                    i += 1;
                }
            }
            if !later.is_empty() {
                self.later = Some(later);
            }
        }
        while self.live.front().is_some_and(|(u, _)| *u <= t) {
            self.live.pop_front();
        }
        let next_start = self.later().iter().map(|x| x.0).min().unwrap_or(Time::MAX);
        let next_end = self.live.front().map_or(Time::MAX, |(u, _)| *u);
        next_start.min(next_end)
    }

    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.later().is_empty()
    }

    fn len(&self) -> usize {
        self.live.len() + self.later().len()
    }

    /// The entries not yet started.
    fn later(&self) -> &[(Time, Time, V)] {
        self.later.as_deref().map_or(&[], |v| &v[..])
    }

    /// Bytes of the list of entries not yet started, beyond the window's own record.
    fn later_bytes(&self) -> usize {
        self.later.as_ref().map_or(0, |v| {
            std::mem::size_of::<Vec<(Time, Time, V)>>()
                + v.capacity() * std::mem::size_of::<(Time, Time, V)>()
        })
    }
}

/// Segment membership bits of one user at evaluation, inline up to 64 segments (hidden
/// ones included). The user record keeps the first 64 ([`User::members`]); a plan with
/// more keeps the rest in [`SegmentState`]'s `wide` table, for the users that have any.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Bits {
    Inline(u64),
    Heap(Vec<u64>),
}

impl Bits {
    fn new(n: usize) -> Bits {
        if n <= 64 {
            Bits::Inline(0)
        } else {
            Bits::Heap(vec![0; n.div_ceil(64)])
        }
    }
    /// The bits of `n` segments from a user record's word and the rest (`wide`).
    fn join(low: u64, wide: Option<&[u64]>, n: usize) -> Bits {
        let mut b = Bits::new(n);
        match &mut b {
            Bits::Inline(w) => *w = low,
            Bits::Heap(ws) => {
                ws[0] = low;
                for (w, x) in ws[1..].iter_mut().zip(wide.unwrap_or_default()) {
                    *w = *x;
                }
            }
        }
        b
    }

    /// The word a user record keeps, and the rest when any of it is set.
    fn split(self) -> (u64, Option<Box<[u64]>>) {
        match self {
            Bits::Inline(w) => (w, None),
            Bits::Heap(ws) => {
                let rest = ws[1..].iter().any(|w| *w != 0).then(|| ws[1..].into());
                (ws[0], rest)
            }
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Bits::Inline(w) => i < 64 && w >> i & 1 == 1,
            Bits::Heap(ws) => ws.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1),
        }
    }
    fn set(&mut self, i: usize, on: bool) {
        let (w, b) = match self {
            Bits::Inline(w) => (w, i),
            Bits::Heap(ws) => (&mut ws[i / 64], i % 64),
        };
        if on {
            *w |= 1 << b;
        } else {
            *w &= !(1 << b);
        }
    }
}

/// One user's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct User {
    key: Box<str>,
    /// Memberships of the first 64 segments, a bit each (the rest: `SegmentState::wide`).
    members: u64,
    /// The instant from which the user has an event (`Time::MAX`: none yet).
    seen_from: Time,
    /// Multiplicity of the user's row in the current profile snapshot.
    profile: i32,
    /// The earliest instant this user has an entry in the timer heap (`Time::MAX`: none).
    scheduled: Time,
    /// Cells by fact slot, sorted. Cells are added rarely (a user's first touch of a
    /// slot) and read often: the array has exactly their number.
    cells: Box<[Cell]>,
}

impl User {
    fn cell(&self, slot: u32) -> Option<&Cell> {
        let i = self.cells.binary_search_by_key(&slot, Cell::slot).ok()?;
        Some(&self.cells[i])
    }

    /// The cell of `slot`, made with `new(slot)` if the user has none.
    fn cell_mut(&mut self, slot: u32, new: impl FnOnce(u16) -> Cell) -> &mut Cell {
        let i = match self.cells.binary_search_by_key(&slot, Cell::slot) {
            Ok(i) => i,
            Err(i) => {
                // The cell at `i` will follow another: it keeps its own stamp.
                self.unlink(i);
                let mut cells = std::mem::take(&mut self.cells).into_vec();
                cells.insert(i, new(slot as u16));
                self.cells = cells.into_boxed_slice();
                i
            }
        };
        &mut self.cells[i]
    }

    /// The trait parts of cell `i` (`None`: not a trait cell).
    fn trait_at(&self, i: usize) -> Option<(Option<&Value>, Option<WriteRef<'_>>)> {
        self.cells
            .get(i)?
            .trait_parts(|| Some(self.trait_at(i.checked_sub(1)?)?.1?.stamp()))
    }

    /// Gives cell `i` its own stamp if it takes the previous cell's (before that cell, or
    /// the cells' order, changes).
    fn unlink(&mut self, i: usize) {
        if !self.cells.get(i).is_some_and(Cell::is_linked) {
            return;
        }
        let stamp = i
            .checked_sub(1)
            .and_then(|p| self.trait_at(p)?.1)
            .map(|w| (w.ts, w.id.to_owned()));
        // A linked cell always follows a cell with a write; were it not so, the stamp
        // that sorts before every write keeps the value and lets any later write win.
        let stamp = stamp.unwrap_or((i64::MIN, MsgId::Text("".into())));
        let cell = std::mem::replace(&mut self.cells[i], Cell::List(0, 0));
        self.cells[i] = cell.unlinked(stamp);
    }

    /// Links cell `i` to the previous cell when their writes have the same stamp (the
    /// traits one identify wrote).
    fn relink(&mut self, i: usize) {
        let same = match (i.checked_sub(1), self.cells.get(i)) {
            (Some(p), Some(c)) if !c.is_linked() => {
                let mine = self.trait_at(i).and_then(|t| t.1).map(|w| w.stamp());
                let theirs = self.trait_at(p).and_then(|t| t.1).map(|w| w.stamp());
                mine.is_some() && mine == theirs
            }
            _ => false,
        };
        if same {
            let cell = std::mem::replace(&mut self.cells[i], Cell::List(0, 0));
            self.cells[i] = cell.linked();
        }
    }

    /// Every cell with its own stamp (before cells move to other slots).
    fn unlink_all(&mut self) {
        for i in 0..self.cells.len() {
            self.unlink(i);
        }
    }

    /// Changes a trait's snapshot cell and latest write with `f`; a trait left with
    /// neither loses its cell.
    fn update_trait(&mut self, slot: u32, f: impl FnOnce(&mut Option<Value>, &mut Option<Write>)) {
        let at = match self.cells.binary_search_by_key(&slot, Cell::slot) {
            Ok(i) => {
                // The next cell may take its stamp from this one, which changes.
                self.unlink(i + 1);
                self.unlink(i);
                i
            }
            // A new cell goes before the one at `i`, which then follows another.
            Err(i) => {
                self.unlink(i);
                i
            }
        };
        self.update_trait_cell(slot, f);
        self.relink(at);
        self.relink(at + 1);
    }

    fn update_trait_cell(
        &mut self,
        slot: u32,
        f: impl FnOnce(&mut Option<Value>, &mut Option<Write>),
    ) {
        let found = self.cells.binary_search_by_key(&slot, Cell::slot);
        let (mut snap, mut write) = match found {
            Ok(i) => match std::mem::replace(&mut self.cells[i], Cell::List(slot as u16, 0))
                .into_trait()
            {
                Ok(parts) => parts,
                Err(other) => {
                    self.cells[i] = other;
                    return;
                }
            },
            Err(_) => (None, None),
        };
        f(&mut snap, &mut write);
        let cell = Cell::from_trait(slot as u16, snap, write);
        match (found, cell) {
            (Ok(i), Some(c)) => self.cells[i] = c,
            (Ok(i), None) => {
                let mut cells = std::mem::take(&mut self.cells).into_vec();
                cells.remove(i);
                self.cells = cells.into_boxed_slice();
            }
            (Err(_), Some(c)) => {
                self.cell_mut(slot, |_| c);
            }
            (Err(_), None) => {}
        }
    }
}

/// What the segment state emits, with the user key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateOut {
    /// A membership change of a segment (plan index, hidden ones included); the diff is
    /// on the update.
    Change(u16),
    /// An accepted event the journeys listen to.
    Event(Event),
    /// A change of an exposed trait's value (`(position in Plan::exposed, value)`).
    Trait(u16, Value),
}

/// Bytes of state, counted from the structures themselves (sizes and heap capacities,
/// not allocator overhead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// Users held.
    pub users: u64,
    /// Bytes of per-user state that does not grow with events in windows: the user record,
    /// its key, membership bits, running values, traits, lists, the index entry.
    pub per_user: u64,
    /// Entries held for events inside a time window (interval and value each).
    pub in_window: u64,
    /// Bytes of those entries.
    pub window_bytes: u64,
    /// Bytes of the timer heap.
    pub timers: u64,
    /// Bytes of the dedup window (live mode).
    pub dedup: u64,
    /// `per_user` by part, in the order of [`StateBytes::PARTS`].
    pub by_part: [u64; 8],
}

impl StateBytes {
    /// The parts of `per_user`, as [`StateBytes::by_part`] counts them.
    pub const PARTS: [&'static str; 8] = [
        "user records",
        "user keys",
        "user index",
        "cells",
        "traits (boxed values, writes)",
        "window headers",
        "running values (boxed), distinct sets",
        "membership overflow, exposed traits",
    ];

    /// Sums two workers' figures.
    pub fn add(&mut self, o: &StateBytes) {
        for (a, b) in self.by_part.iter_mut().zip(o.by_part) {
            *a += b;
        }
        self.users += o.users;
        self.per_user += o.per_user;
        self.in_window += o.in_window;
        self.window_bytes += o.window_bytes;
        self.timers += o.timers;
        self.dedup += o.dedup;
    }
}

/// Counters a worker's segment state keeps; read through the state handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounters {
    /// Events applied.
    pub events: u64,
    /// Duplicate events dropped (same user and `messageId` within the horizon).
    pub duplicates: u64,
    /// Event retractions seen (events are append-only; these are ignored).
    pub retracted: u64,
    /// User evaluations (at inputs and at wake-ups).
    pub evaluations: u64,
    /// Comparisons evaluated between values of different types (NULL by the spec); it
    /// counts evaluations, not events.
    pub type_mismatches: u64,
}

impl StateCounters {
    /// Sums two workers' counters.
    pub fn add(&mut self, o: &StateCounters) {
        self.events += o.events;
        self.duplicates += o.duplicates;
        self.retracted += o.retracted;
        self.evaluations += o.evaluations;
        self.type_mismatches += o.type_mismatches;
    }
}

/// The 64-bit fingerprint of a value, for window-free distinct counts: equal values (the
/// language's equality: `1` and `1.0`, `0` and `-0`) have equal fingerprints. Two distinct
/// values of one user collide with probability about n²/2⁶⁵ for n values (10⁻¹³ for a
/// thousand), the price of 8 bytes per value instead of the value itself.
fn fingerprint(v: &Value) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    match v {
        Value::Null => h.update(&[0]),
        Value::Bool(b) => h.update(&[1, *b as u8]),
        Value::Num(n) => {
            let x = if n.0 == 0.0 { 0.0f64 } else { n.0 };
            h.update(&[2]);
            h.update(&x.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            h.update(&[3]);
            h.update(s.as_bytes());
        }
        Value::Ts(t) => {
            h.update(&[4]);
            h.update(&t.to_le_bytes());
        }
    }
    h.digest()
}

/// The hash that places a user's state on a worker. Readers that split events by this
/// hash modulo the worker count keep the exchange local.
pub fn user_hash(user: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(user.as_bytes())
}

/// A user's row at one instant, as segment expressions read it.
struct Row<'a> {
    user: &'a str,
    aggs: Vec<Cow<'a, Value>>,
    traits: Vec<Cow<'a, Value>>,
    members: Bits,
    mismatches: std::cell::Cell<u64>,
}

static NULL: Value = Value::Null;

impl Context for Row<'_> {
    fn user_key(&self) -> Option<&str> {
        Some(self.user)
    }
    fn trait_value(&self, slot: usize) -> Cow<'_, Value> {
        Cow::Borrowed(self.traits.get(slot).map_or(&NULL, |v| &**v))
    }
    fn agg(&self, slot: usize) -> Cow<'_, Value> {
        Cow::Borrowed(self.aggs.get(slot).map_or(&NULL, |v| &**v))
    }
    fn in_segment(&self, segment: usize) -> bool {
        self.members.get(segment)
    }
    fn type_mismatch(&self) {
        self.mismatches.set(self.mismatches.get() + 1);
    }
}

/// The row of `user` as its cells stand (windows as of its last evaluation): every
/// aggregate's and trait's value, no memberships yet; the list and audience slots it is
/// in go to `lists`.
fn row_of<'a>(
    plan: &Plan,
    tables: &PlanTables,
    clock: i64,
    user: &'a User,
    lists: &mut Vec<u32>,
) -> Row<'a> {
    let n_aggs = plan.aggs.len();
    let mut aggs: Vec<Cow<Value>> = tables
        .agg_kinds
        .iter()
        .map(|(k, ..)| match k {
            AggKind::Count => Cow::Owned(Value::num(0.0)),
            _ => Cow::Borrowed(&NULL),
        })
        .collect();
    let mut traits: Vec<Cow<Value>> = vec![Cow::Borrowed(&NULL); plan.traits.len()];
    let first_agg = plan.agg_slot(0);
    // The stamp of the previous cell's write, for a linked trait cell.
    let mut prev: Option<(i64, IdRef)> = None;
    for cell in user.cells.iter() {
        let slot = cell.slot();
        let k = slot.wrapping_sub(first_agg) as usize;
        let before = prev.take();
        match cell {
            Cell::Count(_, n) => aggs[k] = Cow::Owned(Value::num(*n as f64)),
            Cell::Distinct(_, v) => aggs[k] = Cow::Owned(Value::num(v.len() as f64)),
            Cell::Sum(_, x) | Cell::ExtremeNum(_, x) => aggs[k] = Cow::Owned(Value::num(*x)),
            Cell::ExtremeTs(_, t) => aggs[k] = Cow::Owned(Value::Ts(*t)),
            Cell::Avg(_, n, s) => aggs[k] = Cow::Owned(Value::num(*s / f64::from(*n))),
            Cell::Acc(_, a) => aggs[k] = a.value(),
            Cell::WinCount(_, w) => aggs[k] = Cow::Owned(Value::num(w.live.len() as f64)),
            Cell::WinVal(_, w) => {
                let (kind, distinct, ..) = tables.agg_kinds[k];
                aggs[k] = Cow::Owned(window_value(kind, distinct, w));
            }
            Cell::List(_, n) => {
                if *n > 0 {
                    lists.push(slot);
                }
            }
            // The rest are traits'.
            _ => {
                let Some((snap, write)) = cell.trait_parts(|| before) else {
                    continue;
                };
                prev = write.map(WriteRef::stamp);
                let v = match (write, snap) {
                    (Some(w), _) if w.ts >= clock => w.value,
                    (_, Some(s)) => s,
                    (Some(w), None) => w.value,
                    (None, None) => &NULL,
                };
                traits[k - n_aggs] = Cow::Borrowed(v);
            }
        }
    }
    Row {
        user: &user.key,
        aggs,
        traits,
        members: Bits::new(tables.n_segments),
        mismatches: std::cell::Cell::new(0),
    }
}

/// A windowed aggregate's value over its live entries (the window brought to the instant).
fn window_value(kind: AggKind, distinct: bool, w: &Window<FactVal>) -> Value {
    let active = w.live.iter().map(|x| &x.1);
    match kind {
        AggKind::Count => {
            if distinct {
                let mut vals: Vec<&FactVal> = active.collect();
                vals.sort_unstable();
                vals.dedup();
                Value::num(vals.len() as f64)
            } else {
                Value::num(active.count() as f64)
            }
        }
        AggKind::Sum | AggKind::Avg | AggKind::Min | AggKind::Max => {
            let vals = || {
                active.clone().filter_map(|f| match f {
                    FactVal::Val(v) => Some(v),
                    _ => None,
                })
            };
            let Some(rank) = vals().map(type_rank).max() else {
                return Value::Null;
            };
            let of_rank = vals().filter(|v| type_rank(v) == rank);
            match kind {
                AggKind::Min => of_rank.min().cloned().unwrap_or(Value::Null),
                AggKind::Max => of_rank.max().cloned().unwrap_or(Value::Null),
                _ if rank != 4 => Value::Null,
                AggKind::Sum => Value::num(of_rank.filter_map(Value::as_f64).sum()),
                _ => {
                    let (s, n) = of_rank
                        .filter_map(Value::as_f64)
                        .fold((0.0, 0.0), |(s, n), x| (s + x, n + 1.0));
                    Value::num(s / n)
                }
            }
        }
        AggKind::First | AggKind::Last => {
            let ordered = active.filter(|f| matches!(f, FactVal::Ordered(..)));
            let best = if kind == AggKind::First {
                ordered.min()
            } else {
                ordered.max()
            };
            match best {
                Some(FactVal::Ordered(_, _, v)) => v.clone(),
                _ => Value::Null,
            }
        }
    }
}

/// The tables a plan's evaluation needs, derived from it ([`PlanTables::of`]): built
/// with the state, and again when a definitions change switches plans.
struct PlanTables {
    /// Per-aggregate facts: `(kind, distinct, windowed, accumulated)`.
    agg_kinds: Vec<(AggKind, bool, bool, bool)>,
    /// Per aggregate, the event name or type its FILTER's first conjunct asks for
    /// ([`filter_guard`]): an event with another one is skipped without evaluating.
    agg_guards: Vec<Option<(EventField, String)>>,
    /// Per windowed aggregate, the top-level conjuncts of its FILTER that do not read
    /// `now()`: unless they all hold for an event, it has no interval (and none is sought).
    static_filters: Vec<Vec<CExpr>>,
    /// Per aggregate, where its FILTER's breakpoints come from (empty unless it reads
    /// `now()`).
    filter_points: Vec<NowPoints>,
    /// Per segment, where its condition's breakpoints come from (empty unless it reads
    /// `now()` outside aggregates).
    segment_points: Vec<NowPoints>,
    /// Per segment, whether its condition reads `now()` outside aggregates (only those
    /// have breakpoints of their own).
    segment_temporal: Vec<bool>,
    /// Per segment, the fact slots it reads ([`slot_bit`]); a segment none of whose
    /// slots changed since a user's last evaluation keeps its membership unless it reads
    /// `now()` itself or a segment it references changed.
    segment_reads: Vec<u64>,
    /// The first list or audience fact slot.
    list_base: u32,
    n_segments: usize,
}

/// One worker's segment state; see the module docs.
pub struct SegmentState {
    plan: std::rc::Rc<Plan>,
    index: HashTable<u32>,
    users: Vec<User>,
    /// Wake-ups `(instant, user)`; an entry is live while it equals the user's `scheduled`.
    timers: BinaryHeap<Reverse<(Time, u32)>>,
    /// Window-free count contributions of future-dated events, until their instant.
    pending: HashMap<u32, Vec<(Time, u32, FactVal)>>,
    /// Multiplicity of each snapshot clock value fed; the current one is the greatest live.
    clock_counts: std::collections::BTreeMap<i64, isize>,
    clock: i64,
    /// Exposed trait values last reported per user (journeys only).
    exposed: HashMap<u32, Vec<(u16, Value)>>,
    /// Memberships past the 64th segment, of the users that have any (plans of more
    /// than 64 segments only; the user record holds the first 64).
    wide: HashMap<u32, Box<[u64]>>,
    dedup: crate::dedup::Dedup,
    counters: StateCounters,
    /// What the plan's segments and aggregates need, derived from it once.
    t: PlanTables,
    /// Slots changed since each user's last evaluation (users with changes only).
    touched: hashbrown::HashMap<u32, u64>,
    points: Vec<i64>,
    /// Users changed since the last checkpoint part (only when parts are taken).
    changed: Option<hashbrown::HashSet<u32>>,
    /// A [`Backfiller`]'s state: events are applied to the aggregates and traits of
    /// these slots only.
    only: Option<Box<[bool]>>,
}

/// A user's exposed trait values: `(position in Plan::exposed, value)`.
type Exposed = Vec<(u16, Value)>;

/// A future-dated window-free count contribution: `(instant, slot, value)`.
type PendingCount = (Time, u32, FactVal);

/// One worker's segment state, or what changed in it since the previous part, as a
/// checkpoint holds it ([`SegmentState::part`]). Plain data: plan-derived tables and the
/// timer heap are rebuilt on restore (a user's live timer is its `scheduled` instant).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SegmentPart {
    /// Whether this part holds every user (else only those changed since the last part).
    pub full: bool,
    /// Users interned so far (indices are dense and never reused).
    pub n_users: u32,
    users: Vec<(u32, User)>,
    /// Exposed trait values of the users in `users` (None: none).
    exposed: Vec<(u32, Option<Exposed>)>,
    /// Memberships past the 64th segment of the users in `users` (None: none).
    wide: Vec<(u32, Option<Box<[u64]>>)>,
    pending: Vec<(u32, Vec<PendingCount>)>,
    clock_counts: Vec<(i64, isize)>,
    clock: i64,
    /// Dedup pairs: all of them in a full part, else those that arrived since the last.
    dedup: Vec<(u128, (i64, u64))>,
    touched: Vec<(u32, u64)>,
    counters: StateCounters,
}

impl SegmentPart {
    /// Carries the part over to a new plan ([`crate::plan::Remap`]): cells and pending
    /// contributions move to their new slots (those the new plan lacks are dropped),
    /// memberships to their segments' new indices. Every user must then be evaluated
    /// again ([`SegmentState::reevaluate_all`]): a changed segment's membership is
    /// stale until then.
    pub fn remap(&mut self, r: &crate::plan::Remap) {
        let slot = |s: u32| r.slots.get(s as usize).copied().flatten();
        let mut wide: HashMap<u32, Box<[u64]>> = std::mem::take(&mut self.wide)
            .into_iter()
            .filter_map(|(u, w)| Some((u, w?)))
            .collect();
        for (u, user) in &mut self.users {
            // Cells move and some go: each keeps its own stamp from here on.
            user.unlink_all();
            let mut cells: Vec<Cell> = std::mem::take(&mut user.cells)
                .into_vec()
                .into_iter()
                .filter_map(|mut c| {
                    let to = slot(c.slot())?;
                    c.set_slot(to as u16);
                    Some(c)
                })
                .collect();
            cells.sort_by_key(Cell::slot);
            user.cells = cells.into_boxed_slice();
            let old = Bits::join(user.members, wide.get(u).map(|w| &w[..]), r.segments.len());
            let mut members = Bits::new(r.n_segments);
            for (o, n) in r.segments.iter().enumerate() {
                if let (Some(n), true) = (n, old.get(o)) {
                    members.set(*n, true);
                }
            }
            let (low, rest) = members.split();
            user.members = low;
            match rest {
                Some(w) => wide.insert(*u, w),
                None => wide.remove(u),
            };
        }
        self.wide = self
            .users
            .iter()
            .map(|(u, _)| (*u, wide.remove(u)))
            .collect();
        for (_, v) in &mut self.pending {
            v.retain_mut(|(_, s, _)| match slot(*s) {
                Some(to) => {
                    *s = to;
                    true
                }
                None => false,
            });
        }
        self.pending.retain(|(_, v)| !v.is_empty());
        // The exposed trait values last reported to the journeys, at their new positions.
        for (_, e) in &mut self.exposed {
            if let Some(v) = e {
                v.retain_mut(
                    |(pos, _)| match r.exposed.get(*pos as usize).copied().flatten() {
                        Some(to) => {
                            *pos = to;
                            true
                        }
                        None => false,
                    },
                );
                v.sort_by_key(|(pos, _)| *pos);
            }
        }
        // Slot masks of the old plan mean nothing in the new one.
        self.touched.clear();
    }
}

impl SegmentPart {
    /// Events the state had applied when the part was taken (every part carries the
    /// running count).
    pub fn events_applied(&self) -> u64 {
        self.counters.events
    }
}

/// History rebuilt for the aggregates and traits a carried-over state lacks
/// ([`crate::plan::Remap::rebuilt_slots`]): each user's cells of those slots, as a state
/// built with the new plan from the start would hold them at the checkpoint's instant
/// from its events (a trait's snapshot cell comes from the snapshot, not from here). Built by a [`Backfiller`] from the events before that instant, put into the
/// restored state by [`SegmentState::graft`]. Plain data, so it can be built on another
/// thread than the worker's.
#[derive(Debug, Default)]
pub struct Backfill {
    /// The slots rebuilt.
    slots: Vec<u32>,
    /// Per user key: its cells of `slots`, and its future-dated counts of them.
    users: Vec<(Box<str>, Vec<Cell>, Vec<PendingCount>)>,
    /// Events applied (duplicates dropped as the live state dropped them).
    pub events: u64,
}

impl Backfill {
    /// Users with history in the rebuilt aggregates.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

/// Builds a [`Backfill`]: a segment state of the new plan that applies events to the
/// aggregates and traits of `slots` only, with the live state's deduplication.
pub struct Backfiller {
    state: SegmentState,
}

impl Backfiller {
    /// For `plan` (the new one) and its aggregate and trait `slots` to rebuild.
    pub fn new(plan: std::rc::Rc<Plan>, slots: &[u32], dedup_horizon_ms: i64) -> Backfiller {
        let only: Box<[bool]> = (0..plan.slot_count() as u32)
            .map(|s| slots.contains(&s))
            .collect();
        let mut state = SegmentState::new(plan, dedup_horizon_ms);
        state.only = Some(only);
        Backfiller { state }
    }

    /// Applies one event at the instant the live state applied it (events in the order
    /// it applied them).
    pub fn apply(&mut self, ev: &Projected, t: Time) {
        let u = self.state.intern(&ev.user);
        if self.state.apply_event(u, ev, t) {
            // Window entries that have passed are dropped as the live state would at its
            // next evaluation, so the history held stays one window long.
            for c in self.state.users[u as usize].cells.iter_mut() {
                c.advance_window(t);
            }
        }
    }

    /// The rebuilt cells.
    pub fn finish(self) -> Backfill {
        let mut st = self.state;
        let slots: Vec<u32> = (0..st.plan.slot_count() as u32)
            .filter(|&s| st.only.as_ref().is_some_and(|o| o[s as usize]))
            .collect();
        let users = std::mem::take(&mut st.users)
            .into_iter()
            .enumerate()
            .filter_map(|(u, mut user)| {
                // Each cell with its own stamp: they go among other cells.
                user.unlink_all();
                let pending = st.pending.remove(&(u as u32)).unwrap_or_default();
                let cells: Vec<Cell> = user
                    .cells
                    .into_vec()
                    .into_iter()
                    .filter(|c| !c.is_empty_window())
                    .collect();
                (!cells.is_empty() || !pending.is_empty()).then_some((user.key, cells, pending))
            })
            .collect();
        Backfill {
            slots,
            users,
            events: st.counters.events,
        }
    }
}

/// Every slot: a change that may move any segment (the user's universe, the snapshot clock).
const ALL_SLOTS: u64 = u64::MAX;

/// The bit of a fact slot in a slot mask; slots past 63 share every bit (they are
/// rare: a segment file with more than 60 aggregates and traits).
fn slot_bit(slot: u32) -> u64 {
    if slot < 64 {
        1 << slot
    } else {
        ALL_SLOTS
    }
}

/// The slots an expression reads (aggregates and traits).
fn expr_reads(plan: &Plan, e: &CExpr, mask: &mut u64) {
    crate::eval::visit(e, &mut |x| match x {
        CExpr::Agg(i) => *mask |= slot_bit(plan.agg_slot(*i)),
        CExpr::Trait(k) => *mask |= slot_bit(plan.trait_slot(*k)),
        _ => {}
    });
}

impl PlanTables {
    fn of(plan: &Plan) -> PlanTables {
        let agg_kinds = (0..plan.aggs.len())
            .map(|i| {
                let a = &plan.aggs[i];
                // `first(timestamp)` / `last(timestamp)` is the timestamp of the earliest /
                // latest event, and equal timestamps give the same value whatever the
                // message ids: it is `min` / `max(timestamp)`, which keeps no message id.
                let kind = match (a.agg.kind, &a.arg) {
                    (AggKind::First, Some(CExpr::Field(EventField::Timestamp))) => AggKind::Min,
                    (AggKind::Last, Some(CExpr::Field(EventField::Timestamp))) => AggKind::Max,
                    (k, _) => k,
                };
                (
                    kind,
                    a.agg.distinct,
                    a.temporal,
                    plan.keeps_running_value(i),
                )
            })
            .collect();
        let agg_guards = plan
            .aggs
            .iter()
            .map(|a| a.filter.as_ref().and_then(filter_guard))
            .collect();
        let list_base = plan.trait_slot(plan.traits.len());
        let n_segments = plan.segments.len();
        let static_filters = plan
            .aggs
            .iter()
            .map(|a| match (&a.filter, a.temporal) {
                (Some(f), true) => {
                    let mut parts = Vec::new();
                    conjuncts(f, &mut parts);
                    parts
                        .into_iter()
                        .filter(|c| !mentions_now(c))
                        .cloned()
                        .collect()
                }
                _ => Vec::new(),
            })
            .collect();
        let segment_temporal = plan
            .segments
            .iter()
            .map(|s| matches!(&s.kind, SegmentKind::Expr(e) if mentions_now(e)))
            .collect();
        let segment_points = plan
            .segments
            .iter()
            .map(|s| match &s.kind {
                SegmentKind::Expr(e) => now_points(e),
                _ => Vec::new(),
            })
            .collect();
        let filter_points = plan
            .aggs
            .iter()
            .map(|a| a.filter.as_ref().map(now_points).unwrap_or_default())
            .collect();
        let segment_reads = plan
            .segments
            .iter()
            .map(|s| match &s.kind {
                SegmentKind::Expr(e) => {
                    let mut mask = 0;
                    expr_reads(plan, e, &mut mask);
                    mask
                }
                SegmentKind::List { slot, .. } | SegmentKind::Warehouse { slot, .. } => {
                    slot_bit(*slot)
                }
            })
            .collect();
        PlanTables {
            agg_kinds,
            agg_guards,
            static_filters,
            filter_points,
            segment_points,
            segment_temporal,
            segment_reads,
            list_base,
            n_segments,
        }
    }
}

impl SegmentState {
    /// Empty state for `plan`, dropping events whose user and `messageId` repeat within
    /// `dedup_horizon_ms` (negative: no dedup).
    pub fn new(plan: std::rc::Rc<Plan>, dedup_horizon_ms: i64) -> SegmentState {
        let t = PlanTables::of(&plan);
        SegmentState {
            plan,
            index: HashTable::new(),
            users: Vec::new(),
            timers: BinaryHeap::new(),
            pending: HashMap::new(),
            clock_counts: Default::default(),
            clock: i64::MIN,
            exposed: HashMap::new(),
            wide: HashMap::new(),
            dedup: crate::dedup::Dedup::forgetting(dedup_horizon_ms),
            counters: StateCounters::default(),
            t,
            touched: hashbrown::HashMap::new(),
            points: Vec::new(),
            changed: None,
            only: None,
        }
    }

    /// Switches to `plan`, a changed segment file compiled over this state's slots
    /// ([`Plan::compile_over`]): the cells are read as they are, the plan-derived tables
    /// are rebuilt, and every user is evaluated again at `at` (the changed segments'
    /// memberships move there, as ordinary changes).
    pub fn set_plan(&mut self, plan: std::rc::Rc<Plan>, at: Time) {
        self.t = PlanTables::of(&plan);
        self.plan = plan;
        self.reevaluate_all(at);
    }

    /// The plan this state evaluates.
    pub fn plan(&self) -> &std::rc::Rc<Plan> {
        &self.plan
    }

    /// From now on, remembers which users change, so that [`SegmentState::part`] can
    /// write only those.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(Default::default);
    }

    /// Puts rebuilt history into a restored state carried over to a new plan, before
    /// [`SegmentState::reevaluate_all`]: each user's cells of the rebuilt slots (a user
    /// the state does not know yet is added). The carried-over state holds no cell of
    /// those slots. Returns the users given history.
    pub fn graft(&mut self, b: Backfill) -> usize {
        let n = b.users.len();
        for (key, cells, pending) in b.users {
            let u = self.intern(&key);
            let user = &mut self.users[u as usize];
            // Trait cells get other neighbours: each keeps its own stamp.
            user.unlink_all();
            let mut all = std::mem::take(&mut user.cells).into_vec();
            all.retain(|c| !b.slots.contains(&c.slot()));
            all.extend(cells);
            all.sort_by_key(Cell::slot);
            user.cells = all.into_boxed_slice();
            if !pending.is_empty() {
                self.pending.entry(u).or_default().extend(pending);
            }
            if let Some(c) = &mut self.changed {
                c.insert(u);
            }
        }
        n
    }

    /// After a restore carried over to a new plan: every user is evaluated again at `at`
    /// against every segment (their memberships are the old plan's), and counts as
    /// changed for the next checkpoint part.
    pub fn reevaluate_all(&mut self, at: Time) {
        for (i, user) in self.users.iter_mut().enumerate() {
            user.scheduled = user.scheduled.min(at);
            self.touched.insert(i as u32, ALL_SLOTS);
            self.timers.push(Reverse((user.scheduled, i as u32)));
            if let Some(c) = &mut self.changed {
                c.insert(i as u32);
            }
        }
    }

    /// The state as a checkpoint part: everything (`full`), or the users changed since
    /// the last part and the dedup pairs that arrived at or after `since` (the previous
    /// part's instant), with the small global tables whole. Resets the change set.
    pub fn part(&mut self, full: bool, since: Time) -> SegmentPart {
        let changed = self.changed.replace(Default::default()).unwrap_or_default();
        let mut ids: Vec<u32> = if full {
            (0..self.users.len() as u32).collect()
        } else {
            changed.into_iter().collect()
        };
        ids.sort_unstable();
        SegmentPart {
            full,
            n_users: self.users.len() as u32,
            exposed: ids
                .iter()
                .map(|u| (*u, self.exposed.get(u).cloned()))
                .collect(),
            wide: ids
                .iter()
                .map(|u| (*u, self.wide.get(u).cloned()))
                .collect(),
            users: ids
                .iter()
                .map(|&u| (u, self.users[u as usize].clone()))
                .collect(),
            pending: self.pending.iter().map(|(u, v)| (*u, v.clone())).collect(),
            clock_counts: self.clock_counts.iter().map(|(a, b)| (*a, *b)).collect(),
            clock: self.clock,
            dedup: self.dedup.entries(if full { 0 } else { since }),
            touched: self.touched.iter().map(|(u, m)| (*u, *m)).collect(),
            counters: self.counters,
        }
    }

    /// Restores the state from a chain of parts (a full one, then the deltas after it,
    /// in order), taken at instant `at`. Fails when the chain does not start with a full
    /// part or a part names a user it cannot hold.
    pub fn restore(
        &mut self,
        parts: impl IntoIterator<Item = SegmentPart>,
        at: Time,
    ) -> Result<(), String> {
        let mut first = true;
        for p in parts {
            if first && !p.full {
                return Err("the chain of parts does not start with a full one".into());
            }
            if p.full {
                self.users.clear();
                self.exposed.clear();
                self.wide.clear();
                self.dedup.clear();
            }
            first = false;
            let n = p.n_users as usize;
            if n < self.users.len() {
                return Err(format!("a part holds {n} users, fewer than the one before"));
            }
            while self.users.len() < n {
                // Filled by this part (a new user is always a changed one).
                self.users.push(User {
                    key: "".into(),
                    members: 0,
                    seen_from: Time::MAX,
                    profile: 0,
                    scheduled: Time::MAX,
                    cells: Box::default(),
                });
            }
            for (u, user) in p.users {
                let slot = self
                    .users
                    .get_mut(u as usize)
                    .ok_or_else(|| format!("a part names user {u} of {n}"))?;
                *slot = user;
            }
            for (u, e) in p.exposed {
                match e {
                    Some(v) => self.exposed.insert(u, v),
                    None => self.exposed.remove(&u),
                };
            }
            for (u, w) in p.wide {
                match w {
                    Some(w) => self.wide.insert(u, w),
                    None => self.wide.remove(&u),
                };
            }
            self.pending = p.pending.into_iter().collect();
            self.clock_counts = p.clock_counts.into_iter().collect();
            self.clock = p.clock;
            self.dedup.extend(p.dedup);
            self.touched = p.touched.into_iter().collect();
            self.counters = p.counters;
        }
        if first {
            return Err("no parts".into());
        }
        self.dedup.prune(at);
        self.index.clear();
        self.timers.clear();
        for (i, user) in self.users.iter().enumerate() {
            let h = user_hash(&user.key);
            let users = &self.users;
            self.index
                .insert_unique(h, i as u32, |&j| user_hash(&users[j as usize].key));
            if user.scheduled != Time::MAX {
                self.timers.push(Reverse((user.scheduled, i as u32)));
            }
        }
        Ok(())
    }

    /// Users and their visible memberships, for a restored query API: `f(user, segment)`
    /// for every segment below `visible` the user is in.
    pub fn for_each_member(&self, visible: usize, f: &mut dyn FnMut(&str, u16)) {
        for (u, user) in self.users.iter().enumerate() {
            let members = self.members(u as u32);
            for s in 0..visible.min(self.t.n_segments) {
                if members.get(s) {
                    f(&user.key, s as u16);
                }
            }
        }
    }

    /// User `u`'s memberships, all segments.
    fn members(&self, u: u32) -> Bits {
        let low = self.users[u as usize].members;
        if self.t.n_segments <= 64 {
            return Bits::Inline(low);
        }
        Bits::join(low, self.wide.get(&u).map(|w| &w[..]), self.t.n_segments)
    }

    /// The counters so far.
    pub fn counters(&self) -> StateCounters {
        self.counters
    }

    /// The index of `user`, interning it if new.
    pub fn intern(&mut self, user: &str) -> u32 {
        let h = user_hash(user);
        let users = &self.users;
        if let Some(&i) = self.index.find(h, |&i| &*users[i as usize].key == user) {
            return i;
        }
        let i = self.users.len() as u32;
        if self.users.len() == self.users.capacity() {
            // Grow by a quarter, not double: the table is most of the per-user bytes, and
            // the slack of a doubling would be up to half of it.
            self.users.reserve_exact((self.users.len() / 4).max(1024));
        }
        self.users.push(User {
            key: user.into(),
            members: 0,
            seen_from: Time::MAX,
            profile: 0,
            scheduled: Time::MAX,
            cells: Box::default(),
        });
        let users = &self.users;
        self.index
            .insert_unique(h, i, |&j| user_hash(&users[j as usize].key));
        if let Some(c) = &mut self.changed {
            c.insert(i);
        }
        i
    }

    /// The key of user `u`.
    pub fn key(&self, u: u32) -> &str {
        &self.users[u as usize].key
    }

    /// Sets the snapshot clock: `diff` of value `at` (the driver retracts the old instant
    /// and adds the new). If the current clock moves, every user with an identify write
    /// whose freshness flips is pushed to `dirty`.
    pub fn update_clock(&mut self, at: i64, diff: isize, dirty: &mut Vec<u32>) {
        let c = self.clock_counts.entry(at).or_default();
        *c += diff;
        if *c == 0 {
            self.clock_counts.remove(&at);
        }
        let new = self
            .clock_counts
            .iter()
            .rev()
            .find(|(_, n)| **n > 0)
            .map_or(i64::MIN, |(a, _)| *a);
        let old = std::mem::replace(&mut self.clock, new);
        if old == new {
            return;
        }
        let (lo, hi) = (old.min(new), old.max(new));
        for (u, user) in self.users.iter().enumerate() {
            let flips = (0..user.cells.len())
                .filter_map(|i| user.trait_at(i))
                .any(|(_, w)| w.is_some_and(|w| lo <= w.ts && w.ts < hi));
            if flips {
                dirty.push(u as u32);
                self.touched.insert(u as u32, ALL_SLOTS);
            }
        }
    }

    /// Applies an external fact (snapshot cell or presence, list or audience membership)
    /// to user `u`: `diff` of it from the current instant on.
    pub fn apply_fact(&mut self, u: u32, slot: u32, fact: FactVal, diff: isize) {
        let user = &mut self.users[u as usize];
        // A profile row moves the user's universe, so every segment.
        let bit = if slot == SLOT_PROFILE {
            ALL_SLOTS
        } else {
            slot_bit(slot)
        };
        *self.touched.entry(u).or_default() |= bit;
        if slot == SLOT_PROFILE {
            user.profile += diff as i32;
        } else if slot >= self.t.list_base {
            if let Cell::List(_, n) = user.cell_mut(slot, |s| Cell::List(s, 0)) {
                *n += diff as i32;
            }
        } else if let FactVal::Snap(v) = fact {
            user.update_trait(slot, |snap, _| {
                if diff > 0 {
                    *snap = Some(v);
                } else if snap.as_ref() == Some(&v) {
                    *snap = None;
                }
            });
        }
    }

    /// Applies an accepted event to user `u` at instant `t`, unless it is a duplicate.
    /// Returns whether it was applied.
    pub fn apply_event(&mut self, u: u32, ev: &Projected, t: Time) -> bool {
        if !self.dedup.admit(&ev.user, &ev.message_id, ev.timestamp, t) {
            self.counters.duplicates += 1;
            return false;
        }
        self.counters.events += 1;
        let plan = &*self.plan;
        let user = &mut self.users[u as usize];
        let start = to_time(ev.timestamp);
        let seen_from = user.seen_from.min(start.max(t));
        // A user's first event (or an earlier one) moves its universe: every segment.
        let mut touched = if seen_from != user.seen_from {
            ALL_SLOTS
        } else {
            0
        };
        user.seen_from = seen_from;
        let mismatches = std::cell::Cell::new(0);
        let ctx = EventCtx(ev, &mismatches);
        // A rebuild's slots; `None` on the dataflow's own state.
        let only = self.only.as_deref();
        for (i, slot) in plan.aggs.iter().enumerate() {
            if only.is_some_and(|o| !o[plan.agg_slot(i) as usize]) {
                continue;
            }
            if let Some((field, want)) = &self.t.agg_guards[i] {
                if let Value::Str(have) = &*ev.field(field) {
                    if have != want {
                        continue;
                    }
                }
            }
            let (kind, distinct, windowed, accumulated) = self.t.agg_kinds[i];
            // Whether a condition that does not read now() holds for this event.
            let holds = |c: &CExpr| *eval_ref(c, &ctx, ev.timestamp) == Value::Bool(true);
            let holds_at_ts = || slot.filter.as_ref().is_none_or(holds);
            let arg = || {
                slot.arg
                    .as_ref()
                    .map(|a| eval(a, &ctx, ev.timestamp))
                    .unwrap_or(Value::Null)
            };
            let fact_slot = plan.agg_slot(i);
            if accumulated {
                if !holds_at_ts() {
                    continue;
                }
                let next = {
                    let cur = user.cell(fact_slot).and_then(Cell::acc);
                    fold(kind, cur.as_deref(), ev, arg())
                };
                if let Some(next) = next {
                    let cell = Cell::from_acc(fact_slot as u16, next);
                    *user.cell_mut(fact_slot, |s| Cell::Count(s, 0)) = cell;
                    touched |= slot_bit(fact_slot);
                }
                continue;
            }
            let intervals = match &slot.filter {
                Some(f) if windowed => {
                    if !self.t.static_filters[i].iter().all(holds) {
                        continue;
                    }
                    self.points.clear();
                    breakpoints(&self.t.filter_points[i], &ctx, &mut self.points);
                    true_intervals(start, &mut self.points, |now| {
                        *eval_ref(f, &ctx, now) == Value::Bool(true)
                    })
                }
                _ if holds_at_ts() => vec![(start, Time::MAX)],
                _ => continue,
            };
            if intervals.is_empty() {
                continue;
            }
            let val = match kind {
                AggKind::Count if slot.arg.is_none() => FactVal::Unit,
                AggKind::Count => {
                    let a = arg();
                    if a.is_null() {
                        continue;
                    }
                    if distinct {
                        FactVal::Val(a)
                    } else {
                        FactVal::Unit
                    }
                }
                AggKind::Sum | AggKind::Avg | AggKind::Min | AggKind::Max => {
                    let a = arg();
                    if a.is_null() {
                        continue;
                    }
                    FactVal::Val(a)
                }
                AggKind::First | AggKind::Last => {
                    FactVal::Ordered(ev.timestamp, ev.message_id.clone(), arg())
                }
            };
            if !windowed {
                let from = start.max(t);
                if from > t {
                    self.pending
                        .entry(u)
                        .or_default()
                        .push((from, fact_slot, val));
                } else {
                    add_count(user, fact_slot, &val);
                    touched |= slot_bit(fact_slot);
                }
                continue;
            }
            for (from, until) in intervals {
                let from = from.max(t);
                if until <= from {
                    continue;
                }
                touched |= slot_bit(fact_slot);
                match &val {
                    FactVal::Unit => {
                        if let Cell::WinCount(_, w) =
                            user.cell_mut(fact_slot, |s| Cell::WinCount(s, Box::default()))
                        {
                            w.insert(from, until, (), t);
                        }
                    }
                    other => {
                        if let Cell::WinVal(_, w) =
                            user.cell_mut(fact_slot, |s| Cell::WinVal(s, Box::default()))
                        {
                            w.insert(from, until, other.clone(), t);
                        }
                    }
                }
            }
        }
        for (slot, val) in ev.traits.iter() {
            let slot = *slot;
            if only.is_some_and(|o| !o[slot as usize]) {
                continue;
            }
            let at = user.cells.binary_search_by_key(&slot, Cell::slot);
            let newer = match at.ok().and_then(|i| user.trait_at(i)) {
                Some((_, Some(w))) => match ev.timestamp.cmp(&w.ts) {
                    Ordering::Equal => w.cmp_id(&ev.message_id) == Ordering::Less,
                    later => later == Ordering::Greater,
                },
                _ => true,
            };
            if newer {
                touched |= slot_bit(slot);
                let write = (ev.timestamp, MsgId::new(&ev.message_id), val.clone());
                user.update_trait(slot, |_, w| *w = Some(write));
            }
        }
        if touched != 0 {
            *self.touched.entry(u).or_default() |= touched;
        }
        self.counters.type_mismatches += mismatches.get();
        true
    }

    /// Counts an event retraction (ignored: events are append-only).
    pub fn retracted(&mut self) {
        self.counters.retracted += 1;
    }

    /// Evaluates every segment of user `u` at instant `t`, emits membership changes (and
    /// exposed trait changes) through `give`, and schedules the user's next wake-up.
    pub fn evaluate(&mut self, u: u32, t: Time, give: &mut dyn FnMut(&str, StateOut, isize)) {
        self.counters.evaluations += 1;
        if let Some(c) = &mut self.changed {
            c.insert(u);
        }
        let plan = &*self.plan;
        let mut next = Time::MAX;
        let mut touched = if self.touched.is_empty() {
            0
        } else {
            self.touched.remove(&u).unwrap_or(0)
        };
        // Future-dated window-free counts whose instant has come.
        let pending = if self.pending.is_empty() {
            None
        } else {
            self.pending.get_mut(&u)
        };
        if let Some(list) = pending {
            let user = &mut self.users[u as usize];
            list.retain(|(from, slot, val)| {
                if *from <= t {
                    add_count(user, *slot, val);
                    touched |= slot_bit(*slot);
                    false
                } else {
                    next = next.min(*from);
                    true
                }
            });
            if list.is_empty() {
                self.pending.remove(&u);
            }
        }
        let user = &mut self.users[u as usize];
        // Drop window entries that have passed; find the next window boundary.
        let mut emptied = false;
        for c in user.cells.iter_mut() {
            let Some((at, moved)) = c.advance_window(t) else {
                continue;
            };
            next = next.min(at);
            if moved {
                touched |= slot_bit(c.slot());
                emptied |= c.is_empty_window();
            }
        }
        if emptied {
            let cells = std::mem::take(&mut user.cells).into_vec();
            user.cells = cells.into_iter().filter(|c| !c.is_empty_window()).collect();
        }
        if user.seen_from > t {
            next = next.min(user.seen_from);
        } else if user.seen_from == t {
            // The universe starts now (a future-dated first event's instant has come).
            touched = ALL_SLOTS;
        }
        let was = self.members(u);
        let user = &self.users[u as usize];
        let mut lists: Vec<u32> = Vec::new();
        let mut row = row_of(plan, &self.t, self.clock, user, &mut lists);
        let universe = user.seen_from <= t || user.profile > 0;
        let now = t as i64;
        self.points.clear();
        for &si in &plan.order {
            // Unless a slot it reads changed, it reads now() itself, or a segment it
            // references moved, a segment keeps its membership.
            let moved = |r: &usize| row.members.get(*r) != was.get(*r);
            if touched != ALL_SLOTS
                && touched & self.t.segment_reads[si] == 0
                && !self.t.segment_temporal[si]
                && !plan.refs[si].iter().any(moved)
            {
                row.members.set(si, was.get(si));
                continue;
            }
            let on = match &plan.segments[si].kind {
                SegmentKind::Expr(e) if universe => {
                    breakpoints(&self.t.segment_points[si], &row, &mut self.points);
                    *eval_ref(e, &row, now) == Value::Bool(true)
                }
                SegmentKind::Expr(_) => false,
                SegmentKind::List { slot, .. } | SegmentKind::Warehouse { slot, .. } => {
                    lists.contains(slot)
                }
            };
            row.members.set(si, on);
        }
        for &p in &self.points {
            if p > now {
                next = next.min(p as Time);
            }
        }
        let exposed: Option<Vec<(u16, Value)>> = (!plan.exposed.is_empty()).then(|| {
            plan.exposed
                .iter()
                .enumerate()
                .filter(|(_, &k)| !row.traits[k].is_null())
                .map(|(i, &k)| (i as u16, row.traits[k].clone().into_owned()))
                .collect()
        });
        self.counters.type_mismatches += row.mismatches.get();
        let members = row.members;
        let key = &*user.key;
        for si in 0..self.t.n_segments {
            let (before, is) = (was.get(si), members.get(si));
            if before != is {
                give(key, StateOut::Change(si as u16), if is { 1 } else { -1 });
            }
        }
        if let Some(now_exposed) = exposed {
            let before = self.exposed.get(&u).map_or(&[][..], |v| &v[..]);
            if before != now_exposed.as_slice() {
                let has = |list: &[(u16, Value)], k: u16, v: &Value| {
                    list.iter().any(|(k2, v2)| *k2 == k && v2 == v)
                };
                for (k, v) in before {
                    if !has(&now_exposed, *k, v) {
                        give(key, StateOut::Trait(*k, v.clone()), -1);
                    }
                }
                for (k, v) in &now_exposed {
                    if !has(before, *k, v) {
                        give(key, StateOut::Trait(*k, v.clone()), 1);
                    }
                }
                if now_exposed.is_empty() {
                    self.exposed.remove(&u);
                } else {
                    self.exposed.insert(u, now_exposed);
                }
            }
        }
        let (low, rest) = members.split();
        if let Some(w) = rest {
            self.wide.insert(u, w);
        } else if !self.wide.is_empty() {
            self.wide.remove(&u);
        }
        let user = &mut self.users[u as usize];
        user.members = low;
        if next < user.scheduled {
            user.scheduled = next;
            self.timers.push(Reverse((next, u)));
        }
    }

    /// User `user` as it stands at instant `at`, which must be no earlier than the last
    /// instant this state processed, without changing this state: a scratch copy of the
    /// user is evaluated at `at` and then run on by time alone (at most `steps` wake-ups)
    /// to find the next instant at which `segment`'s membership changes with no new
    /// input. A user this worker has never seen is an empty one.
    pub fn user_at(&self, user: &str, segment: usize, at: Time, steps: usize) -> UserAt {
        let mut s = self.scratch();
        let users = &self.users;
        let found = self
            .index
            .find(user_hash(user), |&i| &*users[i as usize].key == user)
            .copied();
        match found {
            Some(i) => self.copy_into(&mut s, i),
            None => {
                s.intern(user);
                s.touched.insert(0, ALL_SLOTS);
            }
        }
        s.evaluate(0, at, &mut |_, _, _| {});
        let snapshot = s.scratch_at(at, found.is_some());
        let mut next_change = None;
        let mut due = Vec::new();
        for _ in 0..steps {
            let Some(t) = s.next_timer() else { break };
            due.clear();
            s.pop_due(t, &mut due);
            let mut changed = false;
            for &x in &due {
                s.evaluate(x, t, &mut |_, o, _| {
                    changed |= matches!(o, StateOut::Change(k) if k as usize == segment);
                });
            }
            if changed {
                next_change = Some(t);
                break;
            }
        }
        UserAt {
            next_change,
            ..snapshot
        }
    }

    /// Membership of `expr` (a condition over this plan's slots, [`Plan::compile_over`]) for
    /// every user of this worker at `at` (as [`SegmentState::user_at`]: no earlier than
    /// the last instant processed), against segment `current`'s membership (None: a new
    /// segment, every member entering); up to `samples` of the smallest user ids of each
    /// side. Changes nothing.
    pub fn preview(
        &self,
        expr: &CExpr,
        current: Option<usize>,
        at: Time,
        samples: usize,
    ) -> Preview {
        let mut out = Preview::default();
        let mut s = self.scratch();
        let now = at as i64;
        for i in 0..self.users.len() as u32 {
            self.copy_into(&mut s, i);
            s.evaluate(0, at, &mut |_, _, _| {});
            let (row, universe) = s.scratch_row(at);
            let on = universe && *eval_ref(expr, &row, now) == Value::Bool(true);
            let was = current.is_some_and(|c| row.members.get(c));
            out.size += u64::from(on);
            let side = match (was, on) {
                (false, true) => {
                    out.entering += 1;
                    &mut out.sample_entering
                }
                (true, false) => {
                    out.leaving += 1;
                    &mut out.sample_leaving
                }
                _ => continue,
            };
            keep_smallest(side, row.user, samples);
        }
        out
    }

    /// An empty state over this plan, at this state's snapshot clock.
    fn scratch(&self) -> SegmentState {
        let mut s = SegmentState::new(self.plan.clone(), -1);
        s.clock = self.clock;
        s.clock_counts = self.clock_counts.clone();
        s
    }

    /// Makes user `i` of this state the only user (index 0) of scratch state `s`, to
    /// be evaluated again at every segment.
    fn copy_into(&self, s: &mut SegmentState, i: u32) {
        s.users.clear();
        let mut copy = self.users[i as usize].clone();
        copy.scheduled = Time::MAX;
        s.users.push(copy);
        s.pending.clear();
        s.wide.clear();
        s.timers.clear();
        s.touched.clear();
        if let Some(p) = self.pending.get(&i) {
            s.pending.insert(0, p.clone());
        }
        if let Some(w) = self.wide.get(&i) {
            s.wide.insert(0, w.clone());
        }
        s.touched.insert(0, ALL_SLOTS);
    }

    /// Scratch user 0's row as evaluated (memberships included), and whether it is in
    /// the universe at `at`.
    fn scratch_row(&self, at: Time) -> (Row<'_>, bool) {
        let user = &self.users[0];
        let mut row = row_of(&self.plan, &self.t, self.clock, user, &mut Vec::new());
        row.members = self.members(0);
        (row, user.seen_from <= at || user.profile > 0)
    }

    /// Scratch user 0 as evaluated at `at`.
    fn scratch_at(&self, at: Time, known: bool) -> UserAt {
        let (row, universe) = self.scratch_row(at);
        UserAt {
            user: row.user.to_string(),
            known,
            universe,
            aggs: row.aggs.into_iter().map(Cow::into_owned).collect(),
            traits: row.traits.into_iter().map(Cow::into_owned).collect(),
            members: (0..self.t.n_segments).map(|i| row.members.get(i)).collect(),
            next_change: None,
        }
    }

    /// The earliest pending wake-up, if any.
    pub fn next_timer(&self) -> Option<Time> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Pops the users due at exactly `t` (the earliest timer) into `due`.
    pub fn pop_due(&mut self, t: Time, due: &mut Vec<u32>) {
        while let Some(&Reverse((at, u))) = self.timers.peek() {
            if at != t {
                break;
            }
            self.timers.pop();
            let user = &mut self.users[u as usize];
            if user.scheduled == at {
                user.scheduled = Time::MAX;
                due.push(u);
            }
        }
    }

    /// Bytes of state, counted from the structures.
    pub fn bytes(&self) -> StateBytes {
        use std::mem::size_of;
        let mut b = StateBytes {
            users: self.users.len() as u64,
            ..StateBytes::default()
        };
        let mut part = [0usize; 8];
        part[0] = self.users.capacity() * size_of::<User>();
        part[2] = self.index.capacity() * (size_of::<u32>() + 1);
        let fact_heap = |f: &FactVal| match f {
            FactVal::Val(v) | FactVal::Snap(v) => Value::heap_bytes(v),
            FactVal::Ordered(_, m, v) => m.capacity() + Value::heap_bytes(v),
            _ => 0,
        };
        for user in &self.users {
            part[1] += user.key.len();
            part[3] += user.cells.len() * size_of::<Cell>();
            for c in user.cells.iter() {
                match c {
                    Cell::Count(..)
                    | Cell::List(..)
                    | Cell::Sum(..)
                    | Cell::ExtremeTs(..)
                    | Cell::ExtremeNum(..)
                    | Cell::Avg(..) => {}
                    Cell::Distinct(_, v) => part[6] += size_of::<Box<[u64]>>() + v.len() * 8,
                    Cell::Acc(_, a) => {
                        part[6] += size_of::<Acc>()
                            + match &**a {
                                Acc::Extreme(v) => Value::heap_bytes(v),
                                Acc::Ordered(o) => {
                                    size_of::<(i64, Box<str>, Value)>()
                                        + o.1.len()
                                        + Value::heap_bytes(&o.2)
                                }
                                Acc::Sum(_) | Acc::Avg(..) => 0,
                            }
                    }
                    Cell::WinCount(_, w) => {
                        part[5] += size_of::<Window<()>>();
                        b.in_window += w.len() as u64;
                        b.window_bytes +=
                            (w.live.capacity() * size_of::<(Time, ())>() + w.later_bytes()) as u64;
                    }
                    Cell::WinVal(_, w) => {
                        part[5] += size_of::<Window<FactVal>>();
                        b.in_window += w.len() as u64;
                        b.window_bytes += (w.live.capacity() * size_of::<(Time, FactVal)>()
                            + w.later_bytes()
                            + w.live.iter().map(|x| fact_heap(&x.1)).sum::<usize>()
                            + w.later().iter().map(|x| fact_heap(&x.2)).sum::<usize>())
                            as u64;
                    }
                    _ => part[4] += c.trait_bytes(),
                }
            }
        }
        for list in self.pending.values() {
            b.in_window += list.len() as u64;
            b.window_bytes += (list.capacity() * size_of::<(Time, u32, FactVal)>()) as u64;
        }
        for v in self.exposed.values() {
            part[7] += v.capacity() * size_of::<(u16, Value)>();
        }
        for w in self.wide.values() {
            part[7] += w.len() * 8;
        }
        b.by_part = part.map(|x| x as u64);
        b.per_user = b.by_part.iter().sum();
        b.timers = (self.timers.capacity() * size_of::<Reverse<(Time, u32)>>()) as u64;
        b.dedup = self.dedup.bytes() as u64;
        b
    }
}

/// The event name or type a FILTER asks for first: `event = 'X'` or `type = 'x'` (either
/// way round) as its leftmost conjunct. AND evaluates left to right and stops at the first
/// false, so for an event whose name (type) is another string the FILTER is false and
/// nothing else of it would be evaluated (nor a type mismatch counted): skipping it is
/// exact. An event with no name (NULL) is not skipped: the rest of the FILTER is evaluated
/// as before.
fn filter_guard(f: &CExpr) -> Option<(EventField, String)> {
    let mut e = f;
    while let CExpr::And(a, _) = e {
        e = a;
    }
    let CExpr::Cmp(crate::ast::CmpOp::Eq, a, b) = e else {
        return None;
    };
    match (&**a, &**b) {
        (CExpr::Field(f @ (EventField::Event | EventField::Type)), CExpr::Lit(Value::Str(s)))
        | (CExpr::Lit(Value::Str(s)), CExpr::Field(f @ (EventField::Event | EventField::Type))) => {
            Some((f.clone(), s.clone()))
        }
        _ => None,
    }
}

/// The top-level conjuncts of `e` (`a AND (b AND c)` gives `a, b, c`).
fn conjuncts<'e>(e: &'e CExpr, out: &mut Vec<&'e CExpr>) {
    match e {
        CExpr::And(a, b) => {
            conjuncts(a, out);
            conjuncts(b, out);
        }
        other => out.push(other),
    }
}

/// Adds a window-free count contribution (`Unit` for a count, `Val` for a distinct count).
fn add_count(user: &mut User, slot: u32, val: &FactVal) {
    match val {
        FactVal::Val(v) => {
            if let Cell::Distinct(_, set) =
                user.cell_mut(slot, |s| Cell::Distinct(s, Box::default()))
            {
                let f = fingerprint(v);
                if let Err(i) = set.binary_search(&f) {
                    // Exact size: a user's set grows by one value at a time and is read
                    // far more often than it grows.
                    let mut grown = Vec::with_capacity(set.len() + 1);
                    grown.extend_from_slice(&set[..i]);
                    grown.push(f);
                    grown.extend_from_slice(&set[i..]);
                    **set = grown.into_boxed_slice();
                }
            }
        }
        _ => {
            if let Cell::Count(_, n) = user.cell_mut(slot, |s| Cell::Count(s, 0)) {
                *n += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of a segment file the test writes.
    fn plan_of(sql: &str) -> std::rc::Rc<Plan> {
        let file = crate::lang::parse::parse_segments(sql).unwrap();
        std::rc::Rc::new(Plan::compile(&file))
    }

    #[test]
    fn equal_values_have_equal_fingerprints() {
        assert_eq!(
            fingerprint(&Value::num(0.0)),
            fingerprint(&Value::num(-0.0))
        );
        assert_eq!(fingerprint(&Value::num(1.0)), fingerprint(&Value::num(1.0)));
        assert_ne!(
            fingerprint(&Value::Str("1".into())),
            fingerprint(&Value::num(1.0))
        );
    }

    #[test]
    fn a_window_expires_in_order_and_starts_late_entries() {
        let mut w: Window<()> = Window::default();
        w.insert(10, 110, (), 10);
        w.insert(20, 120, (), 20);
        w.insert(50, u64::MAX, (), 30); // starts later
        w.insert(25, 100, (), 30); // a late event with an earlier expiry
        assert_eq!(w.advance(30), 50);
        assert_eq!(w.live.len(), 3);
        assert_eq!(w.advance(50), 100);
        assert_eq!(w.live.len(), 4);
        assert_eq!(w.advance(110), 120);
        assert_eq!(w.live.len(), 2);
        assert_eq!(w.advance(120), u64::MAX);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn mismatched_comparisons_are_counted_in_the_state() {
        let plan = plan_of(
            "CREATE SEGMENT s AS plan > 3 AND count(*) FILTER (WHERE properties.x > 'a') > 0;",
        );
        let mut st = SegmentState::new(plan.clone(), -1);
        let msg = br#"{"type":"identify","userId":"u","messageId":"m","timestamp":"2026-03-01T00:00:00Z","traits":{"plan":"pro"},"properties":{"x":1}}"#;
        let ev = plan.fast_parse(msg).unwrap();
        let u = st.intern(&ev.user);
        let t = to_time(ev.timestamp);
        assert!(st.apply_event(u, &ev, t));
        assert_eq!(st.counters().type_mismatches, 1, "1 > 'a' in the FILTER");
        st.evaluate(u, t, &mut |_, _, _| {});
        assert_eq!(st.counters().type_mismatches, 2, "'pro' > 3 in the segment");
    }

    #[test]
    fn memberships_past_the_64th_segment_survive_evaluation_and_a_checkpoint() {
        // 70 segments: s68 holds for the user, the others do not.
        let mut sql: String = (0..70)
            .filter(|i| *i != 68)
            .map(|i| format!("CREATE SEGMENT s{i} AS plan = 'p{i}';\n"))
            .collect();
        sql.push_str("CREATE SEGMENT s68 AS plan = 'pro';\n");
        let plan = plan_of(&sql);
        let s68 = plan.segments.iter().position(|s| s.name == "s68").unwrap();
        assert!(s68 >= 64, "the test needs the segment in the second word");
        let mut st = SegmentState::new(plan.clone(), -1);
        let msg = br#"{"type":"identify","userId":"u","messageId":"m","timestamp":"2026-03-01T00:00:00Z","traits":{"plan":"pro"}}"#;
        let ev = plan.fast_parse(msg).unwrap();
        let u = st.intern(&ev.user);
        let t = to_time(ev.timestamp);
        assert!(st.apply_event(u, &ev, t));
        let mut changes = Vec::new();
        st.evaluate(u, t, &mut |k, o, d| changes.push((k.to_string(), o, d)));
        assert_eq!(
            changes,
            vec![("u".to_string(), StateOut::Change(s68 as u16), 1)]
        );
        assert!(st.wide.contains_key(&u));
        let mut back = SegmentState::new(plan.clone(), -1);
        back.restore([st.part(true, 0)], t).unwrap();
        let mut members = Vec::new();
        back.for_each_member(plan.segments.len(), &mut |k, s| {
            members.push((k.to_string(), s))
        });
        assert_eq!(members, vec![("u".to_string(), s68 as u16)]);
        // Evaluated again with nothing changed: no change, the bits stay.
        back.evaluate(0, t + 1, &mut |_, _, _| panic!("nothing changed"));
        assert!(back.members(0).get(s68));
    }

    #[test]
    fn traits_one_identify_wrote_share_its_stamp_and_keep_their_own_when_it_moves() {
        let plan =
            plan_of("CREATE SEGMENT s AS plan = 'pro' AND country = 'IN' AND email LIKE '%@x';");
        let mut st = SegmentState::new(plan.clone(), -1);
        let feed = |st: &mut SegmentState, id: &str, ts: &str, traits: &str| {
            let msg = format!(
                r#"{{"type":"identify","userId":"u","messageId":"{id}","timestamp":"{ts}","traits":{traits}}}"#
            );
            let ev = plan.fast_parse(msg.as_bytes()).unwrap();
            let u = st.intern(&ev.user);
            let t = to_time(ev.timestamp);
            st.apply_event(u, &ev, t);
            let mut out = Vec::new();
            st.evaluate(u, t, &mut |_, o, d| out.push((o, d)));
            out
        };
        let linked = |st: &SegmentState| st.users[0].cells.iter().filter(|c| c.is_linked()).count();
        let a = "8d3f2a10-1c2b-4d5e-8f90-a1b2c3d4e5f6";
        let out = feed(
            &mut st,
            a,
            "2026-03-01T00:00:00Z",
            r#"{"plan":"pro","country":"IN","email":"a@x"}"#,
        );
        assert_eq!(out, vec![(StateOut::Change(0), 1)]);
        assert_eq!(
            linked(&st),
            2,
            "two of the three cells take the first one's stamp"
        );
        // A later write of the first trait alone: the others keep the old stamp, so an
        // older write of them (same millisecond as the first, larger id) still wins.
        assert_eq!(
            feed(&mut st, "m2", "2026-03-02T00:00:00Z", r#"{"plan":"free"}"#).len(),
            1
        );
        assert_eq!(linked(&st), 1);
        let tie = "8d3f2a10-1c2b-4d5e-8f90-a1b2c3d4e5f7"; // sorts after `a`
        feed(&mut st, tie, "2026-03-01T00:00:00Z", r#"{"country":"DE"}"#);
        let before = "8d3f2a10-1c2b-4d5e-8f90-a1b2c3d4e5f5"; // sorts before `a`
        feed(
            &mut st,
            before,
            "2026-03-01T00:00:00Z",
            r#"{"email":"b@y"}"#,
        );
        let u = &st.users[0];
        let values: Vec<String> = (0..u.cells.len())
            .filter_map(|i| u.trait_at(i)?.1)
            .map(|w| format!("{}@{}", w.value.to_json(), w.ts))
            .collect();
        assert_eq!(
            values,
            [
                "\"free\"@1772409600000",
                "\"DE\"@1772323200000",
                "\"a@x\"@1772323200000"
            ]
        );
        // Through a checkpoint and back, the same.
        let mut back = SegmentState::new(plan.clone(), -1);
        back.restore([st.part(true, 0)], 0).unwrap();
        assert_eq!(back.users[0].cells, st.users[0].cells);
    }

    #[test]
    fn bits_beyond_64_segments() {
        let mut b = Bits::new(70);
        b.set(3, true);
        b.set(68, true);
        assert!(b.get(3) && b.get(68) && !b.get(67));
        b.set(68, false);
        assert!(!b.get(68));
    }
}
