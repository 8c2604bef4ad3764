//! Unit tests of the segment parser: the spec's examples, name resolution, types, positions.

use super::*;
use crate::ast::{AggKind, Aggregate, ArithOp, CmpOp, EventField, Expr, PathRoot};
use crate::value::Value;

const DAY: i64 = 86_400_000;

/// Every statement of the spec's Files section.
const SPEC_FILE: &str = "\
CREATE SEGMENT power_buyers AS
    country = 'IN'
    AND count(*) FILTER (WHERE event = 'Order Completed'
                         AND timestamp > now() - INTERVAL '7 days') >= 3;

-- the seed example: signed up more than 3 days ago, never created a source
CREATE SEGMENT stalled_signups AS
    min(timestamp) FILTER (WHERE event = 'Signed Up') < now() - INTERVAL '3 days'
    AND count(*) FILTER (WHERE event = 'Source Created') = 0;

CREATE SEGMENT vip AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 1000
    OR plan IN ('pro', 'enterprise');

CREATE SEGMENT vip_stalled AS in_segment('vip') AND in_segment('stalled_signups');

-- a static list: the user ids in a CSV file's `user_id` column (or its first column)
CREATE SEGMENT beta_testers FROM CSV 's3://bucket/lists/beta.csv';

-- a warehouse audience: a SQL query run on the warehouse connection, refreshed on a schedule
CREATE SEGMENT churn_risk FROM WAREHOUSE 'SELECT user_id FROM scores WHERE churn_p > 0.8'
    REFRESH EVERY INTERVAL '1 hour';
";

fn b(e: Expr) -> Box<Expr> {
    Box::new(e)
}
fn s(v: &str) -> Expr {
    Expr::Lit(Value::Str(v.to_string()))
}
fn n(v: f64) -> Expr {
    Expr::Lit(Value::num(v))
}
fn ev(f: EventField) -> Expr {
    Expr::Event(f)
}
fn cmp(op: CmpOp, l: Expr, r: Expr) -> Expr {
    Expr::Cmp(op, b(l), b(r))
}
fn agg(kind: AggKind, arg: Option<Expr>, filter: Option<Expr>) -> Expr {
    Expr::Agg(Box::new(Aggregate {
        kind,
        arg,
        distinct: false,
        filter,
    }))
}

/// The condition of a one-segment file.
fn cond(src: &str) -> Expr {
    let file = parse_segments(&format!("CREATE SEGMENT s AS {src};"))
        .unwrap_or_else(|e| panic!("{src}: {e}"));
    match file.segments.into_iter().next().map(|d| d.body) {
        Some(SegmentBody::Expr(e)) => e,
        other => panic!("not an expression segment: {other:?}"),
    }
}

/// The error of a one-segment file, as "line:column message".
fn err(src: &str) -> String {
    match parse_segments(&format!("CREATE SEGMENT s AS {src};")) {
        Ok(f) => panic!("{src} parsed: {f:?}"),
        Err(e) => format!("{}:{} {}", e.pos.line, e.pos.column, e.message),
    }
}

#[test]
fn parses_every_statement_of_the_spec() {
    let file = parse_segments(SPEC_FILE).unwrap();
    let names: Vec<&str> = file.segments.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "power_buyers",
            "stalled_signups",
            "vip",
            "vip_stalled",
            "beta_testers",
            "churn_risk"
        ]
    );
    assert_eq!(file.segments[0].pos, Pos { line: 1, column: 1 });
    assert_eq!(file.segments[1].pos, Pos { line: 7, column: 1 });
    assert_eq!(
        file.segments[3].body,
        SegmentBody::Expr(Expr::And(
            b(Expr::InSegment("vip".into())),
            b(Expr::InSegment("stalled_signups".into()))
        ))
    );
    assert_eq!(
        file.segments[4].body,
        SegmentBody::Csv {
            url: "s3://bucket/lists/beta.csv".into()
        }
    );
    assert_eq!(
        file.segments[5].body,
        SegmentBody::Warehouse {
            query: "SELECT user_id FROM scores WHERE churn_p > 0.8".into(),
            refresh_ms: 3_600_000
        }
    );
}

#[test]
fn power_buyers_tree() {
    let file = parse_segments(SPEC_FILE).unwrap();
    let filter = Expr::And(
        b(cmp(CmpOp::Eq, ev(EventField::Event), s("Order Completed"))),
        b(cmp(
            CmpOp::Gt,
            ev(EventField::Timestamp),
            Expr::Now(-7 * DAY),
        )),
    );
    let expected = Expr::And(
        b(cmp(CmpOp::Eq, Expr::Trait("country".into()), s("IN"))),
        b(cmp(
            CmpOp::Ge,
            agg(AggKind::Count, None, Some(filter)),
            n(3.0),
        )),
    );
    assert_eq!(file.segments[0].body, SegmentBody::Expr(expected));
}

#[test]
fn stalled_signups_and_vip_trees() {
    let file = parse_segments(SPEC_FILE).unwrap();
    let signed_up = cmp(CmpOp::Eq, ev(EventField::Event), s("Signed Up"));
    let created = cmp(CmpOp::Eq, ev(EventField::Event), s("Source Created"));
    let expected = Expr::And(
        b(cmp(
            CmpOp::Lt,
            agg(
                AggKind::Min,
                Some(ev(EventField::Timestamp)),
                Some(signed_up),
            ),
            Expr::Now(-3 * DAY),
        )),
        b(cmp(
            CmpOp::Eq,
            agg(AggKind::Count, None, Some(created)),
            n(0.0),
        )),
    );
    assert_eq!(file.segments[1].body, SegmentBody::Expr(expected));

    let revenue = ev(EventField::Path(
        PathRoot::Properties,
        vec!["revenue".into()],
    ));
    let completed = cmp(CmpOp::Eq, ev(EventField::Event), s("Order Completed"));
    let expected = Expr::Or(
        b(cmp(
            CmpOp::Ge,
            Expr::Coalesce(vec![
                agg(AggKind::Sum, Some(revenue), Some(completed)),
                n(0.0),
            ]),
            n(1000.0),
        )),
        b(Expr::InList {
            expr: b(Expr::Trait("plan".into())),
            list: vec![s("pro"), s("enterprise")],
            negated: false,
        }),
    );
    assert_eq!(file.segments[2].body, SegmentBody::Expr(expected));
}

#[test]
fn names_outside_aggregates_are_the_user() {
    assert_eq!(
        cond("user_id = 'u1'"),
        cmp(CmpOp::Eq, Expr::UserId, s("u1"))
    );
    for (src, name) in [
        ("plan = 'pro'", "plan"),
        ("traits.plan = 'pro'", "plan"),
        ("\"First Name\" = 'pro'", "First Name"),
        ("traits.\"first name\" = 'pro'", "first name"),
        ("\"type\" = 'pro'", "type"),
        ("firstName = 'pro'", "firstName"),
    ] {
        assert_eq!(
            cond(src),
            cmp(CmpOp::Eq, Expr::Trait(name.into()), s("pro")),
            "{src}"
        );
    }
}

#[test]
fn names_inside_aggregates_are_the_event() {
    let e = cond(
        "count(DISTINCT properties.a.b) FILTER (WHERE type = 'track' AND message_id <> user_id \
         AND context.page.path LIKE '/x%' AND traits.plan IS NOT NULL) > 0",
    );
    let Expr::Cmp(CmpOp::Gt, a, _) = e else {
        panic!()
    };
    let Expr::Agg(a) = *a else { panic!() };
    assert!(a.distinct);
    assert_eq!(
        a.arg,
        Some(ev(EventField::Path(
            PathRoot::Properties,
            vec!["a".into(), "b".into()]
        )))
    );
    let shown = format!("{:?}", a.filter);
    for part in ["Type", "MessageId", "UserId", "Context", "Traits"] {
        assert!(shown.contains(part), "{shown}");
    }
}

#[test]
fn now_and_timestamps() {
    // `timestamp` is a name here, not the start of a TIMESTAMP '…' literal.
    assert_eq!(
        cond("count(*) FILTER (WHERE timestamp > now()) > 0"),
        cmp(
            CmpOp::Gt,
            agg(
                AggKind::Count,
                None,
                Some(cmp(CmpOp::Gt, ev(EventField::Timestamp), Expr::Now(0)))
            ),
            n(0.0)
        )
    );
    let t = crate::time::parse_rfc3339_ms("2026-05-01T00:00:00Z").unwrap();
    assert_eq!(
        cond("now() + INTERVAL '7' DAY > TIMESTAMP '2026-05-01T00:00:00Z'"),
        cmp(CmpOp::Gt, Expr::Now(7 * DAY), Expr::Lit(Value::Ts(t)))
    );
    // A trait may hold a timestamp; the other side of now() may be dynamic.
    assert_eq!(
        cond("(now() - INTERVAL '1 hour') <= signup_at"),
        cmp(
            CmpOp::Le,
            Expr::Now(-3_600_000),
            Expr::Trait("signup_at".into())
        )
    );
    assert_eq!(
        cond("last(timestamp) BETWEEN now() - INTERVAL '2 days' AND now()"),
        Expr::Between {
            expr: b(agg(AggKind::Last, Some(ev(EventField::Timestamp)), None)),
            low: b(Expr::Now(-2 * DAY)),
            high: b(Expr::Now(0)),
            negated: false
        }
    );
    assert_eq!(
        cond("max(timestamp) + INTERVAL '1 day' < now()"),
        cmp(
            CmpOp::Lt,
            Expr::Arith(
                ArithOp::Add,
                b(agg(AggKind::Max, Some(ev(EventField::Timestamp)), None)),
                b(Expr::Interval(DAY))
            ),
            Expr::Now(0)
        )
    );
    // A string compares with a timestamp (read as an instant at run time).
    cond("min(timestamp) < '2026-01-01T00:00:00Z'");
}

#[test]
fn operators_and_functions() {
    assert_eq!(
        cond("NOT lower(plan) LIKE 'p%' OR -x * 2 + 1 <> -3"),
        Expr::Or(
            b(Expr::Not(b(Expr::Like {
                expr: b(Expr::Lower(b(Expr::Trait("plan".into())))),
                pattern: b(s("p%")),
                negated: false
            }))),
            b(cmp(
                CmpOp::Ne,
                Expr::Arith(
                    ArithOp::Add,
                    b(Expr::Arith(
                        ArithOp::Mul,
                        b(Expr::Neg(b(Expr::Trait("x".into())))),
                        b(n(2.0))
                    )),
                    b(n(1.0))
                ),
                n(-3.0)
            ))
        )
    );
    assert_eq!(
        cond("hash_bucket(user_id, 'exp', 10) < 5"),
        cmp(
            CmpOp::Lt,
            Expr::HashBucket {
                key: b(Expr::UserId),
                salt: "exp".into(),
                n: 10
            },
            n(5.0)
        )
    );
    assert_eq!(
        cond("a IS NULL AND b NOT IN (1, 2) AND upper(c) NOT BETWEEN 'A' AND 'M' AND d = TRUE"),
        Expr::And(
            b(Expr::And(
                b(Expr::And(
                    b(Expr::IsNull {
                        expr: b(Expr::Trait("a".into())),
                        negated: false
                    }),
                    b(Expr::InList {
                        expr: b(Expr::Trait("b".into())),
                        list: vec![n(1.0), n(2.0)],
                        negated: true
                    })
                )),
                b(Expr::Between {
                    expr: b(Expr::Upper(b(Expr::Trait("c".into())))),
                    low: b(s("A")),
                    high: b(s("M")),
                    negated: true
                })
            )),
            b(cmp(
                CmpOp::Eq,
                Expr::Trait("d".into()),
                Expr::Lit(Value::Bool(true))
            ))
        )
    );
    // Aggregate names are case-insensitive; first/last take the type of their argument.
    cond("FIRST(timestamp) < now() AND Count(*) > 1 AND AVG(properties.x) > 2");
}

#[test]
fn segments_may_refer_forward_and_statements_may_be_empty() {
    let file = parse_segments("CREATE SEGMENT a AS in_segment('b');;\nCREATE SEGMENT b AS x = 1;")
        .unwrap();
    assert_eq!(file.segments.len(), 2);
}

#[test]
fn cycles_are_reported_where_they_close() {
    let e = parse_segments(
        "CREATE SEGMENT a AS in_segment('b');\n\
         CREATE SEGMENT b AS in_segment('c');\n\
         CREATE SEGMENT c AS x = 1 OR in_segment('a');",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 3, column 30: segments a -> b -> c -> a form a cycle"
    );
    let e = parse_segments("CREATE SEGMENT a AS in_segment('a');").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1, column 21: segment 'a' refers to itself through in_segment('a')"
    );
}

#[test]
fn errors_point_at_the_offending_node() {
    assert_eq!(
        err("'a' = 1"),
        "1:25 type mismatch: cannot compare a string with a number"
    );
    assert_eq!(
        err("NOT 1"),
        "1:21 NOT needs a boolean condition, found a number"
    );
    assert_eq!(
        err("x = 1 AND TIMESTAMP 'soon' < now()"),
        "1:41 TIMESTAMP 'soon' is not a valid RFC 3339 instant; write it like \
         '2026-05-01T00:00:00Z'"
    );
    assert_eq!(
        err("count(*) > now()"),
        "1:32 now() must be compared with a timestamp, not a number"
    );
    assert_eq!(
        err("x = 1 AND INTERVAL '1 day' > 0"),
        "1:31 an INTERVAL can only be added to or subtracted from a timestamp, like \
         timestamp > now() - INTERVAL '7 days'"
    );
    assert_eq!(
        err("count(*) FILTER (WHERE plan = 'x') > 0"),
        "1:44 'plan' is a user trait and cannot appear inside an aggregate; inside an \
         aggregate names refer to the event"
    );
}

#[test]
fn long_chains_do_not_exhaust_the_stack() {
    let chain = vec!["x = 1"; 5000].join(" AND ");
    assert!(matches!(cond(&chain), Expr::And(..)));
    let sum = vec!["1"; 500].join(" + ");
    assert!(err(&format!("{sum} > 0")).contains("nested too deeply"));
    let parens = format!("{}x{}", "(".repeat(500), ")".repeat(500));
    assert!(err(&parens).contains("nested too deeply"));
}

#[test]
fn empty_files_and_comment_only_files_are_rejected() {
    for src in ["", "-- nothing\n", ";"] {
        let e = parse_segments(src).unwrap_err();
        assert!(e.message.contains("no segments"), "{e}");
    }
}

mod no_panics {
    use super::*;
    use proptest::prelude::*;

    const WORDS: &[&str] = &[
        "CREATE",
        "SEGMENT",
        "AS",
        "FROM",
        "CSV",
        "WAREHOUSE",
        "REFRESH",
        "EVERY",
        "INTERVAL",
        "'7 days'",
        "'x'",
        "TIMESTAMP",
        "'2026-05-01T00:00:00Z'",
        "now()",
        "now",
        "count",
        "sum",
        "(",
        ")",
        "*",
        ",",
        ";",
        "=",
        "<",
        "-",
        "+",
        "AND",
        "OR",
        "NOT",
        "IN",
        "BETWEEN",
        "LIKE",
        "IS",
        "NULL",
        "FILTER",
        "WHERE",
        "DISTINCT",
        "timestamp",
        "event",
        "properties.a",
        "a",
        "\"b\"",
        "in_segment",
        "hash_bucket",
        "coalesce",
        "0",
        "1.5",
        "--",
        "\n",
    ];

    proptest! {
        #[test]
        fn token_soup_never_panics(words in proptest::collection::vec(0..WORDS.len(), 0..40)) {
            let src: String = words.iter().map(|&i| WORDS[i]).collect::<Vec<_>>().join(" ");
            let _ = parse_segments(&src);
            let _ = parse_segments(&format!("CREATE SEGMENT s AS {src};"));
        }

        #[test]
        fn cut_spec_files_never_panic(cut in 0..SPEC_FILE.len(), junk in "[ -~]{0,8}") {
            if let (Some(head), Some(tail)) = (SPEC_FILE.get(..cut), SPEC_FILE.get(cut..)) {
                let _ = parse_segments(&format!("{head}{junk}{tail}"));
                let _ = parse_segments(head);
            }
        }
    }
}

#[test]
fn a_rendered_file_parses_back_to_the_same_segments() {
    let src = "CREATE SEGMENT a AS count(*) FILTER (WHERE event = 'O''Neil' \
        AND timestamp > now() - INTERVAL '7 days') >= 2 AND plan IN ('pro', 'team');\n\
        CREATE SEGMENT b FROM CSV 's3://bucket/it''s.csv';\n\
        CREATE SEGMENT c FROM WAREHOUSE 'SELECT user_id FROM t WHERE x = ''y''' \
        REFRESH EVERY INTERVAL '90 minutes';\n\
        CREATE SEGMENT d AS in_segment('a') AND NOT in_segment('c') \
        OR sum(properties.total) > 1.5;";
    let bodies = |f: &crate::ast::SegmentFile| {
        f.segments
            .iter()
            .map(|s| (s.name.clone(), s.body.clone()))
            .collect::<Vec<_>>()
    };
    for src in [
        src,
        include_str!("../../../examples/ecommerce/segments.sql"),
        include_str!("../../../benches/segments20.sql"),
    ] {
        let file = parse_segments(src).unwrap();
        let again = parse_segments(&file.to_string()).unwrap();
        assert_eq!(bodies(&again), bodies(&file));
    }
}
