//! Bounded fuzzing of everything that reads user-supplied text, run with the suite: the
//! event parser (full and projected), the segment parser and compiler, the journey YAML
//! parser and compiler, and Liquid templates (load and render). Inputs are random bytes
//! and mutations (flips, inserts, deletes, splices, repetitions) of real seeds. The
//! property is the rule of `docs/security.md`: nothing panics on user data, and every
//! outcome is a value or an error.
//!
//! The same targets run unbounded with `cargo fuzz` (`fuzz/`, nightly); what those runs
//! found is in `docs/security.md`. `HERALD_FUZZ_CASES` sets the cases per target here.

use herald_connectors::notify::template::Templates;
use herald_operators::event::{parse_message, Limits};
use herald_operators::journey::compile::compile_journeys;
use herald_operators::journey::file::parse_journeys;
use herald_operators::journey::MessageAction;
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("HERALD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

const EVENT_SEEDS: &[&str] = &[
    r#"{"type":"track","event":"Order Completed","userId":"u1","messageId":"m1","timestamp":"2026-03-01T10:00:00.000Z","properties":{"revenue":12.5,"items":[{"sku":"a"}],"coupon":null}}"#,
    r#"{"type":"identify","anonymousId":"a1","traits":{"plan":"pro","email":"a@b.c","age":41,"tags":["x"]},"context":{"traits":{"plan":"free"}}}"#,
    r#"{"batch":[{"type":"page","userId":"u2","name":"Pricing"},{"type":"alias","previousId":"a1","userId":"u2"},{}],"sentAt":"2026-03-01T10:00:00Z"}"#,
    r#"{"type":"group","userId":"u3","groupId":"g","traits":{"name":"Acme"},"receivedAt":"2026-03-01T10:00:00+02:00","originalTimestamp":"2026-03-01T09:59:59Z"}"#,
];

const SEGMENT_SEEDS: &[&str] = &[
    include_str!("../../benches/segments20.sql"),
    "CREATE SEGMENT a AS count(*) FILTER (WHERE event = 'X' AND timestamp > now() - INTERVAL '7 days') >= 3 AND plan IN ('pro', 'team');\n\
     CREATE SEGMENT b AS in_segment('a') OR hash_bucket(user_id, 100) < 10;\n\
     CREATE SEGMENT c AS lower(email) LIKE '%@example.com' AND coalesce(max(properties.total), 0) BETWEEN 1 AND 9;\n\
     CREATE SEGMENT l FROM LIST 'vip.csv';\n",
];

const JOURNEY_SEGMENTS: &str =
    "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n\
CREATE SEGMENT pro AS plan = 'pro';\n";

const JOURNEY_SEEDS: &[&str] = &[
    include_str!("../../engine/tests/data/journeys/spec_example/journeys.yaml"),
    "journey: j\nentry: { event: Cart Abandoned, where: \"properties.total > 10\" }\nexit: { segment: buyers }\n\
     steps:\n  - wait: 1 hour\n  - branch:\n      - when: { segment: pro }\n        steps:\n          - send: { channel: email, template: t }\n      - else:\n          - wait_until: { event: Order Completed, timeout: 2 days }\n  - split: { a: 50, control: 50 }\n",
];

const TEMPLATE_SEEDS: &[&str] = &[
    "---\nsubject: \"{{ traits.first_name | default: 'Hi' }}, your cart\"\n---\nHello {{ traits.first_name }}, {{ event.properties.total | times: 2 }}\n",
    "{% for item in event.properties.items %}{{ item.sku | upcase }}{% unless forloop.last %}, {% endunless %}{% endfor %}",
    "{% assign n = traits.count | plus: 1 %}{% if n > 2 and traits.plan == 'pro' %}{{ n }}{% else %}{{ journey.name }} {{ message.id }}{% endif %}{% capture c %}x{% endcapture %}{{ c }}",
    "{% case traits.plan %}{% when 'pro' %}P{% else %}F{% endcase %}{{ 'now' | date: '%Y' }}{{ traits.tags | join: ',' | truncate: 10 }}",
];

/// One edit of a seed.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Copies a piece of the input elsewhere (builds nesting, repeats structure).
    Splice(usize, usize, usize),
    Repeat(usize, usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    let tokens: Vec<Vec<u8>> = [
        "{",
        "}",
        "[",
        "]",
        "\"",
        ",",
        ":",
        "\\",
        "\\u0000",
        "\u{ffff}",
        "null",
        "-1e999",
        "9999999999999999999999",
        "(",
        ")",
        "'",
        "%}",
        "{%",
        "{{",
        "}}",
        "\n",
        "  - ",
        ": ",
        "AND",
        "OR",
        "NOT",
        "count(*)",
        "FILTER (WHERE",
        "now()",
        "INTERVAL '",
        "steps:",
        "|",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), prop::sample::select(tokens)).prop_map(|(p, t)| Edit::Insert(p, t)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        (any::<usize>(), 1usize..64, any::<usize>()).prop_map(|(f, n, t)| Edit::Splice(f, n, t)),
        (any::<usize>(), 1usize..8, 2u8..64).prop_map(|(p, n, k)| Edit::Repeat(p, n, k)),
    ]
}

fn apply(seed: &str, edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.as_bytes().to_vec();
    for e in edits {
        let len = b.len().max(1);
        match e {
            Edit::Flip(p, x) if !b.is_empty() => b[p % len] ^= x | 1,
            Edit::Insert(p, t) => {
                let at = p % (b.len() + 1);
                b.splice(at..at, t.iter().copied());
            }
            Edit::Delete(p, n) if !b.is_empty() => {
                let at = p % len;
                let end = (at + n).min(b.len());
                b.drain(at..end);
            }
            Edit::Splice(f, n, t) if !b.is_empty() => {
                let from = f % len;
                let piece: Vec<u8> = b[from..(from + n).min(b.len())].to_vec();
                let at = t % (b.len() + 1);
                b.splice(at..at, piece);
            }
            Edit::Repeat(p, n, k) if !b.is_empty() => {
                let from = p % len;
                let piece: Vec<u8> = b[from..(from + n).min(b.len())].to_vec();
                let rep: Vec<u8> = piece.repeat(usize::from(*k));
                b.splice(from..from, rep);
            }
            _ => {}
        }
    }
    b
}

/// A seed mutated, or random bytes.
fn input(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (prop::sample::select(seeds), prop::collection::vec(edit(), 0..12))
            .prop_map(|(s, e)| apply(s, &e)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_event_parsers_take_any_bytes(bytes in input(EVENT_SEEDS)) {
        let limits = Limits::default();
        let (events, rejections) = parse_message(&bytes, Some(1_700_000_000_000), limits);
        // A message is accepted or rejected, with a reason, never both for one item.
        prop_assert!(!events.is_empty() || !rejections.is_empty());
        let file = parse_segments(SEGMENT_SEEDS[0]).unwrap();
        let plan = Plan::compile(&file);
        let _ = plan.parse_projected(&bytes, limits, &|_| false);
        let _ = plan.parse_projected(&bytes, limits, &|_| true);
    }

    #[test]
    fn the_segment_parser_and_compiler_take_any_text(bytes in input(SEGMENT_SEEDS)) {
        if let Ok(file) = parse_segments(&text(&bytes)) {
            let _ = Plan::compile(&file);
        }
    }

    #[test]
    fn the_journey_parser_and_compiler_take_any_text(bytes in input(JOURNEY_SEEDS)) {
        let file = parse_segments(JOURNEY_SEGMENTS).unwrap();
        if let Ok(defs) = parse_journeys(&text(&bytes)) {
            let _ = compile_journeys(&file, &defs);
        }
    }

    #[test]
    fn templates_load_and_render_any_text(bytes in input(TEMPLATE_SEEDS)) {
        let src = text(&bytes);
        if let Ok(t) = Templates::from_sources([("t", src.as_str())]) {
            let _ = t.render(&action());
        }
    }
}

fn action() -> MessageAction {
    let traits =
        serde_json::json!({"first_name": "Ada", "plan": "pro", "count": 3, "tags": ["a", "b"]});
    MessageAction {
        message_id: "m1".into(),
        journey: "j".into(),
        user_id: "u1".into(),
        instance: 1,
        step_path: "0".into(),
        variant: None,
        channel: "email".into(),
        template: "t".into(),
        address: Some("a@b.c".into()),
        traits: traits.as_object().cloned().unwrap_or_default(),
        event: Some(serde_json::json!({"properties": {"total": 12, "items": [{"sku": "a"}]}})),
        time: 1_700_000_000_000,
    }
}
