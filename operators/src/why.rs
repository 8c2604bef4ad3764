//! Why a user is or is not in a segment: the values a segment's condition reads, each
//! clause's value under three-valued logic, the clause that decided, and the next
//! instant the membership changes by time alone.
//!
//! Owns [`Explanation`], built from a [`UserAt`] (one user brought to an instant by
//! [`crate::state::SegmentState::user_at`], which never changes the live state) and the
//! plan. The live query API and `herald explain` both answer with it, so the offline and
//! the live answer to the same question are the same JSON.
//!
//! Invariant: every value here comes from the same evaluator the dataflow runs (`eval`
//! over the same row), so an explanation cannot disagree with the membership it explains.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::Value as Json;

use crate::ast::Expr;
use crate::eval::{eval, visit, CExpr, Context};
use crate::plan::{Plan, SegmentKind};
use crate::time::{format_rfc3339_ms, Time};
use crate::value::Value;

/// One user at one instant, as segment conditions read it.
#[derive(Clone, Debug, PartialEq)]
pub struct UserAt {
    /// The user id.
    pub user: String,
    /// Whether the state holds anything of this user (an unknown user is an empty one).
    pub known: bool,
    /// Whether the user is in the universe: an event at or before the instant, or a row
    /// in the current profile snapshot.
    pub universe: bool,
    /// Every aggregate's value, by aggregate index.
    pub aggs: Vec<Value>,
    /// Every trait's value, by trait index.
    pub traits: Vec<Value>,
    /// Membership of every segment, by segment index.
    pub members: Vec<bool>,
    /// The next instant the asked segment's membership changes with no new input.
    pub next_change: Option<Time>,
}

static NULL: Value = Value::Null;

impl Context for UserAt {
    fn user_key(&self) -> Option<&str> {
        Some(&self.user)
    }
    fn trait_value(&self, slot: usize) -> Cow<'_, Value> {
        Cow::Borrowed(self.traits.get(slot).unwrap_or(&NULL))
    }
    fn agg(&self, slot: usize) -> Cow<'_, Value> {
        Cow::Borrowed(self.aggs.get(slot).unwrap_or(&NULL))
    }
    fn in_segment(&self, segment: usize) -> bool {
        self.members.get(segment).copied().unwrap_or(false)
    }
}

/// One clause of a condition and its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Clause {
    /// The clause as written.
    pub clause: String,
    /// `and`, `or` or `not` for a connective (its operands are `children`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<&'static str>,
    /// Its value: `true`, `false` or `null` (unknown).
    pub value: Json,
    /// The operands of a connective (a chain of one connective is flattened).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Clause>,
}

/// An aggregate the condition reads and its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AggValue {
    /// The aggregate as written.
    pub aggregate: String,
    /// Its value at the instant.
    pub value: Json,
    /// The other segments that read the same aggregate (one shared slot).
    pub shared_with: Vec<String>,
}

/// A trait or `in_segment` the condition reads and its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Named {
    /// The trait or segment name.
    pub name: String,
    /// Its value (a segment's: whether the user is in it).
    pub value: Json,
}

/// The next instant membership changes by time alone.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NextChange {
    /// The instant, RFC 3339.
    pub at: String,
    /// The membership from then on.
    pub member: bool,
}

/// Why a user is or is not in a segment at an instant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    /// The user id.
    pub user: String,
    /// The segment.
    pub segment: String,
    /// The instant explained, RFC 3339.
    pub at: String,
    /// Whether the user is a member.
    pub member: bool,
    /// Whether the user is in the universe (an event so far, or a profile row): outside
    /// it no condition holds.
    pub in_universe: bool,
    /// Whether Herald holds anything of this user.
    pub known: bool,
    /// The definition: the condition, or where a list or audience comes from.
    pub condition: String,
    /// The condition's clauses with their values (none for lists and audiences).
    pub clauses: Option<Clause>,
    /// The clause that decided the membership, as written.
    pub decided_by: String,
    /// Every aggregate the condition reads.
    pub aggregates: Vec<AggValue>,
    /// Every trait the condition reads.
    pub traits: Vec<Named>,
    /// Every segment the condition reads with `in_segment`.
    pub segments: Vec<Named>,
    /// The next instant membership changes with no new input (a window lapsing, a
    /// `now()` comparison flipping), or none.
    pub next_change: Option<NextChange>,
}

/// What a candidate segment's membership would be, against the current one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// Members under the candidate.
    pub size: u64,
    /// Users the candidate adds.
    pub entering: u64,
    /// Users the candidate removes.
    pub leaving: u64,
    /// The smallest user ids entering (at most the sample size).
    pub sample_entering: Vec<String>,
    /// The smallest user ids leaving.
    pub sample_leaving: Vec<String>,
}

impl Preview {
    /// Adds another worker's counts, keeping `samples` of each side.
    pub fn add(&mut self, other: Preview, samples: usize) {
        self.size += other.size;
        self.entering += other.entering;
        self.leaving += other.leaving;
        for u in other.sample_entering {
            keep_smallest(&mut self.sample_entering, &u, samples);
        }
        for u in other.sample_leaving {
            keep_smallest(&mut self.sample_leaving, &u, samples);
        }
    }
}

/// Inserts `user` into the sorted `list` if it is among the `n` smallest.
pub(crate) fn keep_smallest(list: &mut Vec<String>, user: &str, n: usize) {
    if list.len() == n && list.last().is_some_and(|l| l.as_str() <= user) {
        return;
    }
    let i = list.partition_point(|x| x.as_str() < user);
    if list.get(i).map(String::as_str) != Some(user) {
        list.insert(i, user.to_string());
        list.truncate(n);
    }
}

fn truth(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        _ => Json::Null,
    }
}

fn connective(src: &Expr, c: &CExpr) -> Option<&'static str> {
    match (src, c) {
        (Expr::And(..), CExpr::And(..)) => Some("and"),
        (Expr::Or(..), CExpr::Or(..)) => Some("or"),
        (Expr::Not(..), CExpr::Not(..)) => Some("not"),
        _ => None,
    }
}

/// The operands of a chain of one connective: `a AND b AND c` is three, not two nested.
fn operands<'e>(src: &'e Expr, c: &'e CExpr, op: &str, out: &mut Vec<(&'e Expr, &'e CExpr)>) {
    match (src, c) {
        (Expr::And(a, b), CExpr::And(x, y)) if op == "and" => {
            operands(a, x, op, out);
            operands(b, y, op, out);
        }
        (Expr::Or(a, b), CExpr::Or(x, y)) if op == "or" => {
            operands(a, x, op, out);
            operands(b, y, op, out);
        }
        _ => out.push((src, c)),
    }
}

fn clause(src: &Expr, c: &CExpr, u: &UserAt, now: i64) -> Clause {
    let value = truth(&eval(c, u, now));
    let op = connective(src, c);
    let children = match (op, src, c) {
        (Some("not"), Expr::Not(a), CExpr::Not(x)) => vec![clause(a, x, u, now)],
        (Some(op), ..) => {
            let mut parts = Vec::new();
            operands(src, c, op, &mut parts);
            parts
                .into_iter()
                .map(|(s, x)| clause(s, x, u, now))
                .collect()
        }
        _ => Vec::new(),
    };
    Clause {
        clause: src.to_string(),
        op,
        value,
        children,
    }
}

/// The clause that decided `c`'s value: for `AND` the first false (or, none false, the
/// first unknown) operand, for `OR` the first true (or unknown) one, through `NOT`; a
/// connective whose every operand agreed decided as a whole.
fn decided(c: &Clause) -> &Clause {
    let pick = |v: &Json| c.children.iter().find(|k| &k.value == v);
    let next = match (c.op, &c.value) {
        (Some("not"), _) => c.children.first(),
        (Some("and"), Json::Bool(false)) => pick(&Json::Bool(false)),
        (Some("or"), Json::Bool(true)) => pick(&Json::Bool(true)),
        (Some(_), Json::Null) => pick(&Json::Null),
        _ => None,
    };
    next.map_or(c, decided)
}

/// What `e` reads directly: aggregate, trait and segment indices, each once, in order.
fn reads(e: &CExpr, aggs: &mut Vec<usize>, traits: &mut Vec<usize>, segs: &mut Vec<usize>) {
    let once = |list: &mut Vec<usize>, i: usize| {
        if !list.contains(&i) {
            list.push(i);
        }
    };
    visit(e, &mut |x| match x {
        CExpr::Agg(i) => once(aggs, *i),
        CExpr::Trait(k) => once(traits, *k),
        CExpr::InSegment(s) => once(segs, *s),
        _ => {}
    });
}

/// The aggregates `e` reads, each once, in order.
pub fn agg_reads(e: &CExpr, aggs: &mut Vec<usize>) {
    reads(e, aggs, &mut Vec::new(), &mut Vec::new());
}

/// Explains segment `segment` of `plan` for `u` at instant `at`.
pub fn explain(plan: &Plan, segment: usize, u: &UserAt, at: Time) -> Explanation {
    let seg = &plan.segments[segment];
    let member = u.members.get(segment).copied().unwrap_or(false);
    let now = at as i64;
    let (mut aggs, mut traits, mut segs) = (Vec::new(), Vec::new(), Vec::new());
    let (condition, clauses) = match (&seg.kind, &seg.source) {
        (SegmentKind::Expr(c), Some(src)) => {
            reads(c, &mut aggs, &mut traits, &mut segs);
            (src.to_string(), Some(clause(src, c, u, now)))
        }
        (SegmentKind::Expr(c), None) => {
            reads(c, &mut aggs, &mut traits, &mut segs);
            (String::new(), None)
        }
        (SegmentKind::List { url, .. }, _) => (format!("FROM CSV '{url}'"), None),
        (SegmentKind::Warehouse { query, .. }, _) => (format!("FROM WAREHOUSE '{query}'"), None),
    };
    let decided_by = match &clauses {
        _ if !u.universe && matches!(seg.kind, SegmentKind::Expr(_)) => {
            "not in the universe: no event and no profile row yet".to_string()
        }
        Some(c) => decided(c).clause.clone(),
        None if member => "a member of the list or audience".to_string(),
        None => "not in the list or audience".to_string(),
    };
    let name = |i: usize| plan.segments.get(i).map_or("?", |s| &s.name).to_string();
    Explanation {
        user: u.user.clone(),
        segment: seg.name.clone(),
        at: format_rfc3339_ms(now),
        member,
        in_universe: u.universe,
        known: u.known,
        condition,
        clauses,
        decided_by,
        aggregates: aggs
            .into_iter()
            .map(|i| AggValue {
                aggregate: Expr::Agg(Box::new(plan.aggs[i].agg.clone())).to_string(),
                value: u.aggs.get(i).unwrap_or(&NULL).to_json(),
                shared_with: plan.aggs[i]
                    .used_by
                    .iter()
                    .filter(|n| **n != seg.name && plan.visible_name(n))
                    .cloned()
                    .collect(),
            })
            .collect(),
        traits: traits
            .into_iter()
            .map(|k| Named {
                name: plan.traits[k].0.clone(),
                value: u.traits.get(k).unwrap_or(&NULL).to_json(),
            })
            .collect(),
        segments: segs
            .into_iter()
            .map(|s| Named {
                name: name(s),
                value: Json::Bool(u.members.get(s).copied().unwrap_or(false)),
            })
            .collect(),
        next_change: u.next_change.map(|t| NextChange {
            at: format_rfc3339_ms(t as i64),
            member: !member,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SegmentState;
    use crate::time::{parse_rfc3339_ms, to_time};

    const DAY: Time = 86_400_000;

    fn at(s: &str) -> Time {
        to_time(parse_rfc3339_ms(s).unwrap())
    }

    /// A state fed `msgs` (each evaluated at its own instant), and the plan.
    fn state(sql: &str, msgs: &[&str]) -> (std::rc::Rc<Plan>, SegmentState) {
        let file = crate::lang::parse::parse_segments(sql).unwrap();
        let plan = std::rc::Rc::new(Plan::compile(&file));
        let mut st = SegmentState::new(plan.clone(), -1);
        for m in msgs {
            let ev = plan.fast_parse(m.as_bytes()).unwrap();
            let u = st.intern(&ev.user);
            let t = to_time(ev.timestamp);
            assert!(st.apply_event(u, &ev, t));
            st.evaluate(u, t, &mut |_, _, _| {});
        }
        (plan, st)
    }

    const SQL: &str = "
        CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed'
            AND timestamp > now() - INTERVAL '7 days') >= 2;
        CREATE SEGMENT pro_buyers AS in_segment('buyers') AND plan = 'pro';
        CREATE SEGMENT spenders AS sum(properties.total) FILTER (WHERE event = 'Order Completed') > 100
            OR plan = 'pro';
    ";

    fn order(id: &str, ts: &str, total: u32) -> String {
        format!(
            r#"{{"type":"track","event":"Order Completed","userId":"u","messageId":"{id}","timestamp":"{ts}","properties":{{"total":{total}}}}}"#
        )
    }

    #[test]
    fn a_windowed_count_explains_its_value_and_its_lapse() {
        let a = order("m1", "2026-03-01T00:00:00Z", 30);
        let b = order("m2", "2026-03-03T00:00:00Z", 40);
        let (plan, st) = state(SQL, &[&a, &b]);
        let now = at("2026-03-04T00:00:00Z");
        let buyers = plan.segment_index("buyers").unwrap();
        let x = explain(&plan, buyers, &st.user_at("u", buyers, now, 1000), now);
        assert!(x.member && x.in_universe && x.known);
        assert_eq!(x.aggregates.len(), 1);
        assert_eq!(x.aggregates[0].value, serde_json::json!(2.0));
        assert_eq!(x.clauses.as_ref().unwrap().value, Json::Bool(true));
        // The first order leaves the 7-day window at its instant + 7 days.
        let lapse = at("2026-03-08T00:00:00Z");
        assert_eq!(
            x.next_change,
            Some(NextChange {
                at: format_rfc3339_ms(lapse as i64),
                member: false
            })
        );
        // Asked after the lapse, the count is 1 and nothing more changes by time.
        let later = lapse + DAY;
        let y = explain(&plan, buyers, &st.user_at("u", buyers, later, 1000), later);
        assert!(!y.member);
        assert_eq!(y.aggregates[0].value, serde_json::json!(1.0));
        assert_eq!(y.next_change, None);
        // Explaining changed nothing in the live state.
        let again = explain(&plan, buyers, &st.user_at("u", buyers, now, 1000), now);
        assert_eq!(again, x);
    }

    #[test]
    fn unknown_traits_are_null_and_decide_an_and_but_not_a_true_or() {
        let a = order("m1", "2026-03-01T00:00:00Z", 300);
        let b = order("m2", "2026-03-02T00:00:00Z", 1);
        let (plan, st) = state(SQL, &[&a, &b]);
        let now = at("2026-03-02T12:00:00Z");
        let pro = plan.segment_index("pro_buyers").unwrap();
        let x = explain(&plan, pro, &st.user_at("u", pro, now, 1000), now);
        assert!(!x.member);
        let c = x.clauses.as_ref().unwrap();
        assert_eq!(c.op, Some("and"));
        assert_eq!(c.value, Json::Null, "true AND unknown is unknown");
        assert_eq!(c.children[0].value, Json::Bool(true));
        assert_eq!(c.children[1].value, Json::Null);
        assert_eq!(x.decided_by, c.children[1].clause);
        assert!(x.decided_by.contains("plan"), "{}", x.decided_by);
        assert_eq!(x.traits[0].name, "plan");
        assert_eq!(x.traits[0].value, Json::Null);
        assert_eq!(x.segments[0].name, "buyers");
        assert_eq!(x.segments[0].value, Json::Bool(true));
        let spenders = plan.segment_index("spenders").unwrap();
        let y = explain(&plan, spenders, &st.user_at("u", spenders, now, 1000), now);
        assert!(y.member, "301 > 100 OR unknown is true");
        assert_eq!(y.aggregates[0].value, serde_json::json!(301.0));
        assert!(y.decided_by.starts_with("sum("), "{}", y.decided_by);
        assert_eq!(y.next_change, None, "a window-free sum never lapses");
    }

    #[test]
    fn a_user_never_seen_is_outside_the_universe() {
        let (plan, st) = state(SQL, &[]);
        let now = at("2026-03-02T12:00:00Z");
        let x = explain(&plan, 2, &st.user_at("nobody", 2, now, 1000), now);
        assert!(!x.member && !x.in_universe && !x.known);
        assert!(x.decided_by.starts_with("not in the universe"));
    }

    #[test]
    fn a_preview_counts_entering_and_leaving_over_the_live_state() {
        let a = order("m1", "2026-03-01T00:00:00Z", 30);
        let other = a.replace(r#""userId":"u""#, r#""userId":"v""#);
        let b = order("m2", "2026-03-03T00:00:00Z", 40);
        let (plan, st) = state(SQL, &[&a, &other, &b]);
        let file = crate::lang::parse::parse_segments(SQL).unwrap();
        let now = at("2026-03-04T00:00:00Z");
        // buyers needs two orders in 7 days (u only); one is enough for the candidate.
        let text = "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed'
            AND timestamp > now() - INTERVAL '7 days') >= 1;";
        let (cand, i) = crate::lang::parse::parse_statement_into(text, &file).unwrap();
        assert_eq!(i, 0);
        let over = |cand: &crate::ast::SegmentFile| {
            Plan::compile_over(cand, cand.segments.len(), &[], &plan).map(|(p, _)| p)
        };
        let cplan = over(&cand).unwrap();
        assert_eq!(
            cplan.aggs.len(),
            plan.aggs.len(),
            "the windowed count is shared"
        );
        let expr = |p: &Plan, i: usize| match &p.segments[i].kind {
            SegmentKind::Expr(e) => e.clone(),
            _ => unreachable!(),
        };
        let p = st.preview(&expr(&cplan, i), Some(0), now, 10);
        assert_eq!(
            p,
            Preview {
                size: 2,
                entering: 1,
                leaving: 0,
                sample_entering: vec!["v".into()],
                sample_leaving: vec![],
            }
        );
        // A new name: every member enters.
        let text = "CREATE SEGMENT big AS sum(properties.total) FILTER (WHERE event = 'Order Completed') > 50;";
        let (cand, i) = crate::lang::parse::parse_statement_into(text, &file).unwrap();
        assert_eq!(i, 3);
        let p = st.preview(&expr(&over(&cand).unwrap(), i), None, now, 10);
        assert_eq!(
            (p.size, p.entering, p.sample_entering),
            (1, 1, vec!["u".into()])
        );
        // An aggregate no segment maintains has no history in the state.
        let text = "CREATE SEGMENT x AS count(*) >= 1;";
        let (cand, i) = crate::lang::parse::parse_statement_into(text, &file).unwrap();
        assert_eq!(i, 3);
        let missing = over(&cand).unwrap_err();
        assert!(missing[0].contains("count(*)"), "{missing:?}");
        // References are checked against the live set, at the statement.
        let e = crate::lang::parse::parse_statement_into(
            "CREATE SEGMENT x AS in_segment('nope');",
            &file,
        )
        .unwrap_err();
        assert!(e.message.contains("nope"), "{e}");
        let e = crate::lang::parse::parse_statement_into(
            "CREATE SEGMENT buyers AS in_segment('pro_buyers');",
            &file,
        )
        .unwrap_err();
        assert!(e.message.contains("cycle"), "{e}");
    }
}
