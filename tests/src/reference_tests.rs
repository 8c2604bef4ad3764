//! Hand-computed answers for the reference evaluator: the spec's four example segments,
//! window edges to the millisecond, trait precedence between snapshots and identify
//! events, three-valued logic and every aggregate.

use std::collections::{BTreeMap, BTreeSet};

use herald_operators::ast::{CmpOp, EventField, Expr, SegmentBody, SegmentDef, SegmentFile};
use herald_operators::event::{Event, EventType};
use herald_operators::lang::parse::parse_segments;
use herald_operators::value::Value;
use serde_json::{json, Map, Value as Json};

use crate::{members_at, Snapshot, World};

const T: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z
const MS: i64 = 1;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The spec's example segments, from the end-to-end test data (one copy in the tree).
const SPEC_EXAMPLES: &str = include_str!("../../engine/tests/data/spec_examples/segments.sql");

fn obj(j: Json) -> Map<String, Json> {
    match j {
        Json::Object(m) => m,
        _ => Map::new(),
    }
}

fn event(user: &str, kind: EventType, name: Option<&str>, ts: i64, mid: &str) -> Event {
    Event {
        user: user.to_string(),
        kind,
        event: name.map(str::to_string),
        message_id: mid.to_string(),
        timestamp: ts,
        properties: Map::new(),
        context: Map::new(),
        traits: Map::new(),
    }
}

fn track(user: &str, name: &str, ts: i64, mid: &str) -> Event {
    event(user, EventType::Track, Some(name), ts, mid)
}

fn order(user: &str, ts: i64, mid: &str, revenue: Json) -> Event {
    let mut e = track(user, "Order Completed", ts, mid);
    e.properties = obj(json!({ "revenue": revenue }));
    e
}

fn identify(user: &str, ts: i64, mid: &str, traits: Json) -> Event {
    let mut e = event(user, EventType::Identify, None, ts, mid);
    e.traits = obj(traits);
    e
}

fn snapshot(at: i64, rows: &[(&str, &[(&str, Value)])]) -> Snapshot {
    Snapshot {
        at,
        rows: rows
            .iter()
            .map(|(u, cells)| {
                let cells = cells
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                (u.to_string(), cells)
            })
            .collect(),
    }
}

fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

fn file(src: &str) -> SegmentFile {
    parse_segments(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

fn world(events: Vec<Event>, snapshots: Vec<Snapshot>) -> World {
    World {
        events,
        snapshots,
        csv_lists: BTreeMap::new(),
    }
}

/// The members of `segment` at `now`, as a sorted vector for readable failures.
fn members(f: &SegmentFile, w: &World, now: i64, segment: &str) -> Vec<String> {
    members_at(f, w, now)
        .remove(segment)
        .unwrap_or_else(|| panic!("no segment {segment}"))
        .into_iter()
        .collect()
}

#[test]
fn power_buyers_count_a_seven_day_window_to_the_millisecond() {
    let f = file(SPEC_EXAMPLES);
    let w = world(
        vec![
            order("in1", T, "a1", json!(10)),
            order("in1", T + HOUR, "a2", json!(10)),
            order("in1", T + 2 * HOUR, "a3", json!(10)),
            // Same orders, wrong country; and no country at all (NULL -> non-member).
            order("us1", T, "b1", json!(10)),
            order("us1", T + HOUR, "b2", json!(10)),
            order("us1", T + 2 * HOUR, "b3", json!(10)),
            order("nil", T, "c1", json!(10)),
            order("nil", T + HOUR, "c2", json!(10)),
            order("nil", T + 2 * HOUR, "c3", json!(10)),
            // Other events do not count.
            track("in1", "Product Viewed", T + 3 * HOUR, "a4"),
        ],
        vec![snapshot(
            T - DAY,
            &[
                ("in1", &[("country", s("IN"))]),
                ("us1", &[("country", s("US"))]),
            ],
        )],
    );
    assert!(members(&f, &w, T + 2 * HOUR - MS, "power_buyers").is_empty());
    assert_eq!(members(&f, &w, T + 2 * HOUR, "power_buyers"), ["in1"]);
    // The first order leaves the window exactly 7 days after it happened.
    assert_eq!(members(&f, &w, T + 7 * DAY - MS, "power_buyers"), ["in1"]);
    assert!(members(&f, &w, T + 7 * DAY, "power_buyers").is_empty());
}

#[test]
fn stalled_signups_enter_one_millisecond_after_three_days() {
    let f = file(SPEC_EXAMPLES);
    let w = world(
        vec![
            track("stalled", "Signed Up", T, "s1"),
            track("active", "Signed Up", T, "a1"),
            track("active", "Source Created", T + DAY, "a2"),
            track("late", "Signed Up", T, "l1"),
            track("late", "Source Created", T + 5 * DAY, "l2"),
            track("never", "Product Viewed", T, "n1"),
        ],
        vec![],
    );
    assert!(members(&f, &w, T + 3 * DAY, "stalled_signups").is_empty());
    assert_eq!(
        members(&f, &w, T + 3 * DAY + MS, "stalled_signups"),
        ["late", "stalled"]
    );
    assert_eq!(
        members(&f, &w, T + 5 * DAY - MS, "stalled_signups"),
        ["late", "stalled"]
    );
    assert_eq!(members(&f, &w, T + 5 * DAY, "stalled_signups"), ["stalled"]);
}

#[test]
fn vip_by_revenue_or_plan_and_null_plan_is_not_vip() {
    let f = file(SPEC_EXAMPLES);
    let w = world(
        vec![
            order("big", T, "b1", json!(600)),
            order("big", T + HOUR, "b2", json!(400.5)),
            identify("pro", T, "p1", json!({ "plan": "pro" })),
            order("small", T, "s1", json!(999)),
            identify("small", T, "s0", json!({ "plan": "free" })),
            // Revenue as a string is not a number: sum is NULL, coalesce makes it 0.
            order("stringy", T, "t1", json!("2000")),
            // No orders and a NULL plan: `false OR NULL` is NULL -> non-member.
            identify("nullplan", T, "n1", json!({ "plan": null })),
            // A non-order event with revenue does not count.
            {
                let mut e = track("refund", "Order Refunded", T, "r1");
                e.properties = obj(json!({ "revenue": 5000 }));
                e
            },
        ],
        vec![],
    );
    assert!(members(&f, &w, T + HOUR - MS, "vip").contains(&"pro".to_string()));
    assert_eq!(members(&f, &w, T + HOUR, "vip"), ["big", "pro"]);
    let all = members_at(&f, &w, T + HOUR);
    assert!(all["vip_stalled"].is_empty());
}

#[test]
fn vip_stalled_needs_both_segments() {
    let f = file(SPEC_EXAMPLES);
    let w = world(
        vec![
            track("both", "Signed Up", T, "b1"),
            identify("both", T, "b2", json!({ "plan": "enterprise" })),
            track("vip_only", "Signed Up", T, "v1"),
            identify("vip_only", T, "v2", json!({ "plan": "pro" })),
            track("vip_only", "Source Created", T + HOUR, "v3"),
            track("stalled_only", "Signed Up", T, "s1"),
        ],
        vec![],
    );
    let at = T + 4 * DAY;
    let all = members_at(&f, &w, at);
    assert_eq!(all["vip"], set(&["both", "vip_only"]));
    assert_eq!(all["stalled_signups"], set(&["both", "stalled_only"]));
    assert_eq!(all["vip_stalled"], set(&["both"]));
    // Before three days have passed nobody is stalled, so nobody is a stalled VIP.
    assert!(members(&f, &w, T + 3 * DAY, "vip_stalled").is_empty());
}

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|u| u.to_string()).collect()
}

#[test]
fn identify_beats_snapshot_at_equal_timestamps_and_survives_a_newer_snapshot() {
    let f = file(
        "CREATE SEGMENT pro AS plan = 'pro';
         CREATE SEGMENT no_country AS country IS NULL;
         CREATE SEGMENT indian AS country = 'IN';",
    );
    let w = world(
        vec![
            // Same instant as the snapshot: the event wins.
            identify("tie", T, "t1", json!({ "plan": "pro" })),
            // Older than the snapshot: the snapshot wins, until a later identify.
            identify("old", T - HOUR, "o1", json!({ "plan": "pro" })),
            identify("old", T + HOUR, "o2", json!({ "plan": "pro" })),
            // Kept through the newer snapshot that drops the user.
            identify("dropped", T - DAY, "d1", json!({ "plan": "pro" })),
            // Equal identify timestamps: the larger message id wins.
            identify("msg", T, "m2", json!({ "plan": "pro" })),
            identify("msg", T, "m1", json!({ "plan": "free" })),
        ],
        vec![
            snapshot(
                T,
                &[
                    ("tie", &[("plan", s("free"))]),
                    ("old", &[("plan", s("free"))]),
                    ("dropped", &[("plan", s("free")), ("country", s("IN"))]),
                    ("gone", &[("plan", s("pro"))]),
                ],
            ),
            snapshot(T + DAY, &[("tie", &[("plan", s("free"))])]),
        ],
    );
    // Before the first snapshot only identify writes exist.
    assert_eq!(members(&f, &w, T - MS, "pro"), ["dropped", "old"]);
    assert_eq!(members(&f, &w, T, "pro"), ["gone", "msg", "tie"]);
    assert_eq!(
        members(&f, &w, T + HOUR, "pro"),
        ["gone", "msg", "old", "tie"]
    );
    assert_eq!(members(&f, &w, T, "indian"), ["dropped"]);
    // The newer snapshot: `tie`'s snapshot write is now newer than its identify; `gone`
    // leaves the universe; `dropped` loses country but keeps its identify plan.
    assert_eq!(members(&f, &w, T + DAY, "pro"), ["dropped", "msg", "old"]);
    assert!(members(&f, &w, T + DAY, "indian").is_empty());
    assert_eq!(
        members(&f, &w, T + DAY, "no_country"),
        ["dropped", "msg", "old", "tie"]
    );
}

#[test]
fn the_universe_is_current_profiles_and_users_with_events_so_far() {
    let f = file("CREATE SEGMENT everyone AS user_id IS NOT NULL;");
    let w = world(
        vec![
            track("early", "x", T, "e1"),
            track("later", "x", T + DAY, "l1"),
        ],
        vec![
            snapshot(T - DAY, &[("old_profile", &[])]),
            snapshot(T + 2 * DAY, &[("new_profile", &[])]),
        ],
    );
    assert!(members(&f, &w, T - DAY - MS, "everyone").is_empty());
    assert_eq!(members(&f, &w, T - DAY, "everyone"), ["old_profile"]);
    assert_eq!(members(&f, &w, T, "everyone"), ["early", "old_profile"]);
    assert_eq!(
        members(&f, &w, T + 2 * DAY, "everyone"),
        ["early", "later", "new_profile"]
    );
}

#[test]
fn every_aggregate_kind() {
    let viewed = |ts: i64, mid: &str, product: Json| {
        let mut e = track("u", "Product Viewed", ts, mid);
        e.properties = obj(json!({ "product_id": product }));
        e
    };
    let events = vec![
        viewed(T, "v1", json!("p1")),
        viewed(T + 1, "v2", json!("p2")),
        viewed(T + 2, "v3", json!("p1")),
        viewed(T + 3, "v4", json!(null)),
        order("u", T + 10, "o2", json!(30)),
        // Same timestamp: `o1` sorts first by message id.
        order("u", T + 10, "o1", json!(10)),
        order("u", T + 20, "o3", json!("oops")),
    ];
    let w = world(events, vec![]);
    let f = file(
        "CREATE SEGMENT c_all AS count(*) = 7;
         CREATE SEGMENT c_x AS count(properties.product_id) = 3;
         CREATE SEGMENT c_d AS count(DISTINCT properties.product_id) = 2;
         CREATE SEGMENT c_none AS count(*) FILTER (WHERE event = 'Nope') = 0;
         CREATE SEGMENT su AS sum(properties.revenue) = 40;
         CREATE SEGMENT av AS avg(properties.revenue) = 20;
         CREATE SEGMENT mi AS min(properties.revenue) = 10;
         CREATE SEGMENT ma AS max(properties.product_id) = 'p2';
         CREATE SEGMENT mt AS max(timestamp) = TIMESTAMP '2026-03-01T00:00:00.020Z';
         CREATE SEGMENT fi AS first(properties.revenue) FILTER (WHERE event = 'Order Completed') = 10;
         CREATE SEGMENT la AS last(properties.revenue) = 'oops';
         CREATE SEGMENT la_null AS last(properties.product_id) FILTER (WHERE event = 'Product Viewed') IS NULL;
         CREATE SEGMENT sum_none AS sum(properties.revenue) FILTER (WHERE event = 'Nope') IS NULL;
         CREATE SEGMENT fi_none AS first(event) FILTER (WHERE event = 'Nope') IS NULL;",
    );
    let all = members_at(&f, &w, T + DAY);
    for (name, m) in &all {
        assert_eq!(m, &set(&["u"]), "segment {name}");
    }
    // Before the string revenue arrives, last(revenue) is the later of the two orders at
    // T+10 by message id: o2's 30.
    let f2 = file("CREATE SEGMENT la AS last(properties.revenue) = 30;");
    assert_eq!(members(&f2, &w, T + 19, "la"), ["u"]);
}

#[test]
fn three_valued_logic_and_scalar_functions() {
    let w = world(
        vec![identify(
            "u1",
            T,
            "i1",
            json!({ "plan": "Pro", "age": 30, "nick": null, "since": "2026-02-01T00:00:00Z" }),
        )],
        vec![],
    );
    let cases = [
        ("plan IN ('x', NULL)", false),
        ("NOT (plan IN ('x', NULL))", false),
        ("plan NOT IN ('x', 'y')", true),
        ("plan IN ('Pro', NULL)", true),
        ("age BETWEEN 30 AND 40", true),
        ("age NOT BETWEEN 31 AND 40", true),
        ("age BETWEEN NULL AND 40", false),
        ("NOT (age BETWEEN NULL AND 29)", true),
        ("age / 0 IS NULL", true),
        ("age * 2 - 10 = 50", true),
        ("-age = -30", true),
        ("age = '30'", false),
        ("NOT (age = '30')", false),
        ("nick IS NULL AND missing IS NULL", true),
        ("nick = 'a' OR TRUE", true),
        ("nick = 'a' OR FALSE", false),
        ("NOT (nick = 'a' AND FALSE)", true),
        ("coalesce(nick, missing, plan) = 'Pro'", true),
        ("lower(plan) = 'pro' AND upper(plan) = 'PRO'", true),
        ("lower(nick) IS NULL", true),
        (
            "plan LIKE 'P_o' AND plan LIKE '%o' AND plan NOT LIKE 'p%'",
            true,
        ),
        ("age LIKE '3%'", false),
        ("since < now() - INTERVAL '27 days'", true),
        ("since < now() - INTERVAL '28 days'", false),
        ("since + INTERVAL '28 days' = now()", true),
        ("user_id = 'u1'", true),
    ];
    for (cond, want) in cases {
        let f = file(&format!("CREATE SEGMENT s AS {cond};"));
        let got = members(&f, &w, T, "s") == ["u1"];
        assert_eq!(got, want, "{cond}");
    }
}

#[test]
fn hash_bucket_is_xxh3_of_salt_colon_key() {
    let users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"];
    let w = world(
        users
            .iter()
            .enumerate()
            .map(|(i, u)| track(u, "x", T, &format!("m{i}")))
            .collect(),
        vec![],
    );
    let f = file("CREATE SEGMENT b AS hash_bucket(user_id, 'exp', 3) = 1;");
    let want: Vec<String> = users
        .iter()
        .filter(|u| xxhash_rust::xxh3::xxh3_64(format!("exp:{u}").as_bytes()) % 3 == 1)
        .map(|u| u.to_string())
        .collect();
    assert_eq!(members(&f, &w, T, "b"), want);
}

#[test]
fn csv_and_warehouse_segments() {
    let f = file(
        "CREATE SEGMENT beta FROM CSV 'beta.csv';
         CREATE SEGMENT wh FROM WAREHOUSE 'SELECT user_id FROM t' REFRESH EVERY INTERVAL '1 hour';
         CREATE SEGMENT beta_active AS in_segment('beta') AND count(*) > 0;
         CREATE SEGMENT not_wh AS NOT in_segment('wh');",
    );
    let mut w = world(
        vec![track("a", "x", T, "m1"), track("c", "x", T, "m2")],
        vec![],
    );
    w.csv_lists.insert("beta".into(), set(&["a", "b"]));
    let all = members_at(&f, &w, T);
    assert_eq!(all["beta"], set(&["a", "b"]));
    assert!(all["wh"].is_empty());
    assert_eq!(all["beta_active"], set(&["a"]));
    assert_eq!(all["not_wh"], set(&["a", "c"]));
}

#[test]
fn hand_built_ast_works_without_the_parser() {
    // timestamp-free check of the plumbing: count(*) FILTER (WHERE event = 'x') > 1
    let agg = herald_operators::ast::Aggregate {
        kind: herald_operators::ast::AggKind::Count,
        arg: None,
        distinct: false,
        filter: Some(Expr::Cmp(
            CmpOp::Eq,
            Box::new(Expr::Event(EventField::Event)),
            Box::new(Expr::Lit(s("x"))),
        )),
    };
    let f = SegmentFile {
        segments: vec![SegmentDef {
            name: "two_x".into(),
            pos: Default::default(),
            body: SegmentBody::Expr(Expr::Cmp(
                CmpOp::Gt,
                Box::new(Expr::Agg(Box::new(agg))),
                Box::new(Expr::Lit(Value::num(1.0))),
            )),
        }],
    };
    let w = world(
        vec![
            track("u", "x", T, "1"),
            track("u", "y", T, "2"),
            track("u", "x", T + 5, "3"),
        ],
        vec![],
    );
    assert!(members(&f, &w, T + 4, "two_x").is_empty());
    assert_eq!(members(&f, &w, T + 5, "two_x"), ["u"]);
}

#[test]
fn min_and_max_over_mixed_types_use_the_highest_ranked_type() {
    // Numbers outrank timestamps, strings and booleans: u's min/max range over 5 alone,
    // w (strings only) over its strings, b (booleans only) over its booleans.
    let w = world(
        vec![
            order("u", T, "o1", json!("12.50")),
            order("u", T + 1, "o2", json!(5)),
            order("u", T + 2, "o3", json!("9.00")),
            order("u", T + 3, "o4", json!(true)),
            order("w", T, "w0", json!("b")),
            order("w", T + 1, "w1", json!("a")),
            order("b", T, "b0", json!(true)),
            order("b", T + 1, "b1", json!(false)),
        ],
        vec![],
    );
    let f = file(
        "CREATE SEGMENT mi_num AS min(properties.revenue) = 5;
         CREATE SEGMENT ma_num AS max(properties.revenue) = 5;
         CREATE SEGMENT mi_str AS min(properties.revenue) = 'a';
         CREATE SEGMENT ma_str AS max(properties.revenue) = 'b';
         CREATE SEGMENT mi_bool AS min(properties.revenue) = false;",
    );
    let all = members_at(&f, &w, T + DAY);
    assert_eq!(all["mi_num"], set(&["u"]));
    assert_eq!(all["ma_num"], set(&["u"]));
    assert_eq!(all["mi_str"], set(&["w"]));
    assert_eq!(all["ma_str"], set(&["w"]));
    assert_eq!(all["mi_bool"], set(&["b"]));
}
