//! Reading event JSONL files: every reject reason, duplicates within and outside the
//! horizon, batch envelopes, and determinism across thread counts.

use std::fmt::Write as _;
use std::path::Path;

use herald_connectors::events::{read_events, Position, DEFAULT_DEDUP_HORIZON_MS};
use herald_connectors::Fault;
use herald_operators::event::{Limits, RejectReason};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn track(id: &str, user: &str, ts: &str) -> String {
    format!(
        r#"{{"type":"track","event":"Order Completed","userId":"{user}","messageId":"{id}","timestamp":"{ts}"}}"#
    )
}

#[test]
fn rejects_with_every_reason_and_dedups_within_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let big = format!(
        r#"{{"type":"track","event":"x","userId":"u","timestamp":"2026-03-01T10:00:00Z","properties":{{"p":"{}"}}}}"#,
        "x".repeat(3000)
    );
    let lines = [
        track("m1", "u1", "2026-03-01T10:00:00Z"),      // 1
        "{not json".to_string(),                        // 2
        "[1,2]".to_string(),                            // 3
        big,                                            // 4
        r#"{"type":"shout","userId":"u"}"#.to_string(), // 5
        r#"{"type":"track","event":"x","timestamp":"2026-03-01T10:00:00Z"}"#.to_string(), // 6
        r#"{"type":"track","userId":"u","timestamp":"2026-03-01T10:00:00Z"}"#.to_string(), // 7
        r#"{"type":"alias","userId":"u","timestamp":"2026-03-01T10:00:00Z"}"#.to_string(), // 8
        r#"{"type":"track","event":"x","userId":"u","timestamp":"soon"}"#.to_string(), // 9
        r#"{"type":"track","event":"x","userId":"u"}"#.to_string(), // 10
        r#"{"batch":5}"#.to_string(),                   // 11
        format!(
            r#"{{"batch":[{},{{"type":"track","userId":"u"}},{}],"sentAt":"2026-03-01T10:00:00Z"}}"#,
            track("m2", "u2", "2026-03-01T10:00:00Z"),
            track("m3", "u3", "2026-03-01T11:00:00Z")
        ), // 12
        String::new(),                                  // 13
        track("m1", "u1", "2026-03-01T11:00:00Z"),      // 14: duplicate (1 h later)
        track("m1", "u1", "2026-03-02T11:00:00Z"),      // 15: 25 h later: accepted again
        "\u{fffd}bad utf8 placeholder".to_string(),     // 16: replaced below by invalid UTF-8
    ];
    let mut text = lines.join("\n");
    text.push('\n');
    let mut bytes = text.into_bytes();
    // Make line 16 invalid UTF-8.
    let pos = bytes
        .windows(3)
        .position(|w| w == "\u{fffd}".as_bytes())
        .unwrap();
    bytes.splice(pos..pos + 3, [0xff, b'{']);
    let f1 = dir.path().join("a.jsonl");
    std::fs::write(&f1, &bytes).unwrap();
    let f1 = f1.to_str().unwrap().to_string();
    let f2 = write(
        dir.path(),
        "b.jsonl",
        &[
            track("m1", "u1", "2026-03-02T11:30:00Z"), // within 24 h of the re-accepted m1
            track("m2", "u2", "2026-03-01T10:00:00Z"), // duplicate across files
            track("m4", "u4", "2026-03-01T10:00:00Z"),
        ]
        .join("\r\n"),
    );
    let limits = Limits {
        max_message_bytes: 2000,
    };
    let batch = read_events(
        &[f1.clone(), f2.clone()],
        limits,
        DEFAULT_DEDUP_HORIZON_MS,
        1,
    )
    .unwrap();

    let ids: Vec<(&str, Position)> = batch
        .events
        .iter()
        .map(|(e, p)| (e.message_id.as_str(), *p))
        .collect();
    let pos = |source, line| Position { source, line };
    assert_eq!(
        ids,
        vec![
            ("m1", pos(0, 1)),
            ("m2", pos(0, 12)),
            ("m3", pos(0, 12)),
            ("m1", pos(0, 15)),
            ("m4", pos(1, 3)),
        ]
    );
    assert_eq!(batch.duplicates, 3);
    assert_eq!(batch.lines, 16 + 3);
    assert_eq!(
        batch.bytes,
        (bytes.len() + std::fs::read(&f2).unwrap().len()) as u64
    );

    let reasons: Vec<(u64, Option<usize>, RejectReason)> = batch
        .dead_letters
        .iter()
        .map(|d| (d.line, d.batch_index, d.reason))
        .collect();
    use RejectReason::*;
    assert_eq!(
        reasons,
        vec![
            (2, None, InvalidJson),
            (3, None, NotAnObject),
            (4, None, TooLarge),
            (5, None, BadType),
            (6, None, MissingUser),
            (7, None, MissingEvent),
            (8, None, MissingAliasIds),
            (9, None, BadTimestamp),
            (10, None, MissingTimestamp),
            (11, None, BadBatch),
            (12, Some(1), MissingEvent),
            (16, None, InvalidJson),
        ]
    );
    assert!(batch.dead_letters.iter().all(|d| d.source == f1));
    assert_eq!(batch.dead_letters[0].raw, "{not json");
    assert_eq!(batch.dead_letters[11].raw, "\u{fffd}{bad utf8 placeholder");
    assert!(batch.dead_letters[10].raw.starts_with(r#"{"batch":["#));
    assert!(!batch.dead_letters[4].detail.is_empty());
    let total: u64 = batch.rejected_by_reason.values().sum();
    assert_eq!(total, 12);
    assert_eq!(batch.rejected_by_reason["invalid_json"], 2);
    assert_eq!(batch.rejected_by_reason["missing_event"], 2);
    assert_eq!(batch.rejected_by_reason["bad_batch"], 1);
}

#[test]
fn a_negative_horizon_keeps_every_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let line = track("m1", "u1", "2026-03-01T10:00:00Z");
    let f = write(dir.path(), "a.jsonl", &format!("{line}\n{line}\n"));
    let batch = read_events(&[f], Limits::default(), -1, 1).unwrap();
    assert_eq!((batch.events.len(), batch.duplicates), (2, 0));
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..20_000u32 {
        match i % 10 {
            0 => text.push_str("not json"),
            1 => text.push_str(""),
            // Every 7th message repeats an earlier id: some inside the horizon, some not.
            _ => {
                let id = if i % 7 == 0 { i / 3 } else { i };
                let day = 1 + (i % 5);
                text.push_str(&track(
                    &format!("m{id}"),
                    &format!("u{}", i % 97),
                    &format!("2026-03-{day:02}T10:00:00Z"),
                ))
            }
        }
        text.push('\n');
    }
    let mut batch_line = String::from(r#"{"batch":["#);
    for j in 0..50 {
        if j > 0 {
            batch_line.push(',');
        }
        write!(
            batch_line,
            "{}",
            track(&format!("b{j}"), "ub", "2026-03-01T10:00:00Z")
        )
        .unwrap();
    }
    batch_line.push_str("]}\n");
    text.push_str(&batch_line);
    assert!(text.len() > 1_000_000);
    let f1 = write(dir.path(), "a.jsonl", &text);
    let half: String = text
        .lines()
        .take(10_000)
        .map(|l| format!("{l}\n"))
        .collect();
    let f2 = write(dir.path(), "b.jsonl", &half);
    let sources = [f1, f2];
    let one = read_events(&sources, Limits::default(), DEFAULT_DEDUP_HORIZON_MS, 1).unwrap();
    for threads in [2, 4, 7] {
        let many = read_events(
            &sources,
            Limits::default(),
            DEFAULT_DEDUP_HORIZON_MS,
            threads,
        )
        .unwrap();
        assert!(one == many, "results differ with {threads} threads");
    }
    assert!(one.duplicates > 0 && !one.dead_letters.is_empty());
    assert_eq!(one.lines, 20_001 + 10_000);
}

#[test]
fn missing_and_gzip_sources_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir
        .path()
        .join("missing.jsonl")
        .to_str()
        .unwrap()
        .to_string();
    let err = read_events(&[missing], Limits::default(), DEFAULT_DEDUP_HORIZON_MS, 1).unwrap_err();
    assert_eq!(err.fault(), Fault::Input);
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
    let gz = dir.path().join("e.jsonl.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0]).unwrap();
    let err = read_events(
        &[gz.to_str().unwrap().to_string()],
        Limits::default(),
        DEFAULT_DEDUP_HORIZON_MS,
        1,
    )
    .unwrap_err();
    assert!(err.to_string().contains("gzip"), "{err}");
}
