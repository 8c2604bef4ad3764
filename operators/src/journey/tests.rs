//! Golden errors of bad journey files: each names the journey, the step path and the
//! problem.

use crate::journey::{compile_journeys, parse_journeys};
use crate::lang::parse::parse_segments;

const SEGMENTS: &str =
    "CREATE SEGMENT vip AS plan = 'pro'; CREATE SEGMENT shoppers AS count(*) >= 1;";

fn error_of(yaml: &str) -> String {
    let file = parse_segments(SEGMENTS).unwrap();
    match parse_journeys(yaml).and_then(|defs| compile_journeys(&file, &defs)) {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_journey_files_get_errors_naming_journey_path_and_problem() {
    let cases: &[(&str, &str)] = &[
        (
            "journey: j\nentry: { segment_entered: nope }\nsteps: []",
            "journey 'j': entry: unknown segment 'nope'",
        ),
        (
            "journey: j\nentry: { event: A }\nexit: [ { segment_exited: gone } ]\nsteps: []",
            "journey 'j': exit[0]: unknown segment 'gone'",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - branch:\n      - when: \"in_segment('nope')\"\n        steps: []",
            "journey 'j': steps[0].branch[0].when: unknown segment 'nope'",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - split: []",
            "journey 'j': steps[0].split: a split needs at least one variant",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - split:\n      - { variant: a, weight: 0 }",
            "journey 'j': steps[0].split[0].weight: weights must be positive whole numbers",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - branch:\n      - when: \"plan\"\n        steps: []",
            "ok", // a trait may hold a boolean: typed at run time, NULL when it is not
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - branch:\n      - when: \"count(*) + 1\"\n        steps: []",
            "journey 'j': steps[0].branch[0].when: column 1 of \"count(*) + 1\": the condition must be boolean, found a number",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - wait: 3 fortnights",
            "journey 'j': steps[0].wait: interval unit 'fortnights' is not one of second, minute, hour, day, week",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - send: { channel: pigeon, template: t }",
            "journey 'j': steps[0].send.channel: unknown channel 'pigeon' (known: email, sms, whatsapp, push, webhook, kafka)",
        ),
        (
            "journey: j\nentry: { event: A, api: true }\nsteps: []",
            "journey 'j': entry: has more than one trigger; write exactly one",
        ),
        (
            "journey: j\nentry: { event: A }\nstepz: []",
            "journey '#1': journey: unknown key 'stepz' (expected one of: journey, entry, reentry, exit, frequency_cap, quiet_hours, steps)",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - wait_until: { event: B, where: \"properties.x > sum(properties.y)\" }",
            "journey 'j': steps[0].wait_until.where: 'sum(properties.y)' holds an aggregate but is not a condition; compare it with a constant (like count(*) FILTER (WHERE …) >= 3), not with the event's fields",
        ),
        (
            "journey: j\nentry: { event: A }\nquiet_hours: { from: \"25:00\", to: \"08:00\" }\nsteps: []",
            "journey 'j': quiet_hours.from: '25:00' is not a time of day HH:MM (00:00 to 23:59)",
        ),
        (
            "journey: Bad\nentry: { event: A }\nsteps: []",
            "journey '#1': journey: 'Bad' is not a valid name: lowercase letters, digits and _, starting with a letter",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps: []\n---\njourney: j\nentry: { event: B }\nsteps: []",
            "journey 'j': journey: is defined twice in the file",
        ),
        (
            "journey: j\nentry: { event: A }\nsteps:\n  - { wait: 1 hour, send: { channel: email, template: t } }",
            "journey 'j': steps[0]: a step has exactly one of: wait, wait_until, branch, split, send, update_trait",
        ),
        (
            "journey: j\nentry: { segment_entered: vip, where: \"properties.x = 1\" }\nsteps: []",
            "journey 'j': entry.where: column 1 of \"properties.x = 1\": properties.x is an event field; use it inside an aggregate",
        ),
        (
            "journey: [unclosed",
            "journey '?': line 2, column 1: not valid YAML: while parsing a flow sequence, expected ',' or ']'",
        ),
    ];
    let mut bad = Vec::new();
    for (yaml, want) in cases {
        let got = error_of(yaml);
        if got != *want {
            bad.push(format!("{yaml}\n  want: {want}\n  got:  {got}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n\n"));
}
