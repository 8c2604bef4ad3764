//! The fast parser (`Plan::parse_projected`) against the full one (`parse_message` then
//! `Plan::project`): on generated messages of every shape, including repeated keys,
//! odd types, bad numbers and escapes, both accept, reject and project alike, and the
//! fast path answers by itself for the common shapes.

use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use proptest::prelude::*;

/// Reads paths at several depths (a path that is also the parent of another), context
/// and top-level traits, and three traits.
const SEGMENTS: &str = r#"
CREATE SEGMENT big AS sum(properties.revenue) FILTER (WHERE event = 'Order Completed') > 10;
CREATE SEGMENT nested AS count(*) FILTER (WHERE properties.nested.a = 1 OR properties.nested IS NOT NULL) > 0;
CREATE SEGMENT lib AS count(*) FILTER (WHERE context.library.name LIKE 'analytics%' AND type = 'page') > 0;
CREATE SEGMENT tr AS count(*) FILTER (WHERE traits.plan = 'pro' OR context.traits.country = 'IN') > 0;
CREATE SEGMENT who AS plan = 'pro' OR country = 'IN' OR email LIKE '%@gmail.com';
"#;

fn plan() -> Plan {
    Plan::compile(&parse_segments(SEGMENTS).expect("test segments parse"))
}

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop::sample::select(options)
}

/// Values that go anywhere: every JSON type, numbers the full parser refuses, escapes
/// (a lone surrogate is refused), nested objects.
const ANY: &[&str] = &[
    "1",
    "-2.5",
    "1e400",
    "12345678901234567890",
    "\"x\"",
    "\"caf\\u00e9\"",
    "\"\\ud800\"",
    "\"\"",
    "null",
    "true",
    "[1,{\"a\":2}]",
    "{\"a\":1,\"b\":{\"c\":null}}",
    "{}",
];

fn member() -> impl Strategy<Value = String> {
    prop_oneof![
        pick(&["\"track\"", "\"page\"", "\"screen\"", "\"identify\"", "\"group\"", "\"alias\"", "\"shout\"", "1", "null"])
            .prop_map(|v| format!("\"type\":{v}")),
        pick(&["\"u1\"", "\"u2\"", "\"\"", "42", "true", "null"]).prop_map(|v| format!("\"userId\":{v}")),
        pick(&["\"a1\"", "\"\"", "7", "null"]).prop_map(|v| format!("\"anonymousId\":{v}")),
        pick(&["\"Order Completed\"", "\"Home\"", "\"\"", "3", "{}"]).prop_map(|v| format!("\"event\":{v}")),
        pick(&["\"Home\"", "\"\"", "5", "null"]).prop_map(|v| format!("\"name\":{v}")),
        pick(&["\"m1\"", "\"m2\"", "\"\"", "9", "null"]).prop_map(|v| format!("\"messageId\":{v}")),
        pick(&["\"2026-03-01T10:00:00Z\"", "\"2026-03-01T10:00:00.250+05:30\"", "\"yesterday\"", "null", "123"])
            .prop_map(|v| format!("\"timestamp\":{v}")),
        pick(&["\"2026-03-01T09:00:00Z\"", "\"soon\""]).prop_map(|v| format!("\"originalTimestamp\":{v}")),
        pick(&["\"2026-03-01T09:00:05Z\""]).prop_map(|v| format!("\"sentAt\":{v}")),
        pick(&["\"u0\""]).prop_map(|v| format!("\"previousId\":{v}")),
        props().prop_map(|v| format!("\"properties\":{v}")),
        context().prop_map(|v| format!("\"context\":{v}")),
        traits().prop_map(|v| format!("\"traits\":{v}")),
        pick(ANY).prop_map(|v| format!("\"extra\":{v}")),
        pick(&["[]", "[{\"type\":\"track\",\"event\":\"x\",\"userId\":\"u\",\"timestamp\":\"2026-03-01T10:00:00Z\"}]", "1"])
            .prop_map(|v| format!("\"batch\":{v}")),
    ]
}

fn object(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec((pick(keys), pick(values)), 0..5).prop_map(|kv| {
            let items: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", items.join(","))
        }),
        1 => pick(ANY).prop_map(str::to_string),
    ]
}

fn props() -> impl Strategy<Value = String> {
    object(
        &["revenue", "nested", "category", "price", "reve\\u006eue"],
        &[
            "12.5",
            "\"20\"",
            "null",
            "{\"a\":1}",
            "{\"a\":2,\"a\":1}",
            "{\"b\":1}",
            "[1]",
            "1e400",
            "\"\\ud800\"",
        ],
    )
}

fn context() -> impl Strategy<Value = String> {
    object(
        &["traits", "library", "ip"],
        &[
            "{\"country\":\"IN\",\"plan\":\"free\"}",
            "{\"country\":null}",
            "{\"name\":\"analytics.js\"}",
            "{\"name\":1}",
            "\"1.2.3.4\"",
            "[]",
        ],
    )
}

fn traits() -> impl Strategy<Value = String> {
    object(
        &["plan", "email", "country", "age"],
        &[
            "\"pro\"",
            "\"a@gmail.com\"",
            "null",
            "3",
            "{\"x\":1}",
            "\"IN\"",
        ],
    )
}

/// A message: mostly well-formed (type, ids, timestamp first), then random members.
fn message() -> impl Strategy<Value = String> {
    (
        pick(&["track", "page", "identify", "group", "screen"]),
        prop::collection::vec(member(), 0..8),
        any::<bool>(),
        prop::option::of((
            pick(&["\"pro\"", "null", "1"]),
            pick(&["\"free\"", "null"]),
            any::<bool>(),
        )),
    )
        .prop_map(|(kind, rest, well_formed, both_traits)| {
            let mut members = Vec::new();
            if well_formed {
                members.push(format!("\"type\":\"{kind}\""));
                members.push("\"userId\":\"u1\"".to_string());
                members.push("\"event\":\"Order Completed\"".to_string());
                members.push("\"timestamp\":\"2026-03-01T10:00:00Z\"".to_string());
            }
            // The same trait written in `traits` and in `context.traits`, in either order.
            if let Some((top, ctx, top_first)) = both_traits {
                let t = format!("\"traits\":{{\"plan\":{top}}}");
                let c = format!("\"context\":{{\"traits\":{{\"plan\":{ctx},\"country\":\"IN\"}}}}");
                if top_first {
                    members.extend([t, c]);
                } else {
                    members.extend([c, t]);
                }
            }
            members.extend(rest);
            format!("{{{}}}", members.join(","))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn fast_path_answers_as_the_full_parser(msg in message()) {
        let plan = plan();
        let bytes = msg.as_bytes();
        let (events, rejections) = parse_message(bytes, None, Limits::default());
        let full: Vec<_> = events.into_iter().map(|e| plan.project(e, false)).collect();
        if let Some(fast) = plan.fast_parse(bytes) {
            prop_assert!(rejections.is_empty(), "fast path accepted what the full parser rejects: {msg}\n{rejections:?}");
            prop_assert_eq!(&full, &vec![fast], "{}", msg);
        }
        let (both, rej) = plan.parse_projected(bytes, Limits::default(), &|_| false);
        prop_assert_eq!(both, full);
        prop_assert_eq!(rej, rejections);
    }
}

#[test]
fn the_fast_path_takes_the_common_shapes() {
    let plan = plan();
    for msg in [
        r#"{"type":"track","event":"Order Completed","userId":"u1","messageId":"m1","timestamp":"2026-03-01T10:00:00Z","properties":{"revenue":12.5,"nested":{"a":1}},"context":{"library":{"name":"analytics.js"}}}"#,
        r#"{"type":"page","name":"Home","anonymousId":"a1","timestamp":"2026-03-01T10:00:00Z"}"#,
        r#"{"type":"identify","userId":"u1","timestamp":"2026-03-01T10:00:00Z","traits":{"plan":"pro"},"context":{"traits":{"plan":"free","country":"IN"}}}"#,
    ] {
        let fast = plan.fast_parse(msg.as_bytes());
        assert!(fast.is_some(), "fast path refused {msg}");
        let (events, _) = parse_message(msg.as_bytes(), None, Limits::default());
        let full: Vec<_> = events.into_iter().map(|e| plan.project(e, false)).collect();
        assert_eq!(full, vec![fast.unwrap()]);
    }
}
