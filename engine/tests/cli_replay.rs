//! End-to-end tests of the `herald` binary: the replay contract (files, exact output
//! lines, dead letters, determinism across workers), `herald check`, clear errors for
//! bad input, and replay from/to a real S3-compatible server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn herald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run herald: {e}"));
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "herald failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn replay(dir: &Path, workers: usize) -> String {
    let d = data("spec_examples");
    ok(herald().args([
        "replay",
        "--segments",
        d.join("segments.sql").to_str().unwrap_or_default(),
        "--events",
        d.join("events.jsonl").to_str().unwrap_or_default(),
        "--until",
        "2026-03-20T00:00:00Z",
        "--out",
        dir.to_str().unwrap_or_default(),
        "--workers",
        &workers.to_string(),
    ]))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

#[test]
fn replay_writes_the_exact_changes_of_the_spec_examples() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let stdout = replay(tmp.path(), 1);
    let got = read(&tmp.path().join("segment_changes.jsonl"));
    let want = read(&data("spec_examples").join("expected_changes.jsonl"));
    assert_eq!(
        got, want,
        "segment_changes.jsonl differs from the golden file"
    );
    assert!(
        stdout.contains("power_buyers"),
        "summary lists segment sizes:\n{stdout}"
    );
    assert!(
        stdout.contains("events/s"),
        "summary reports throughput:\n{stdout}"
    );
    assert!(
        tmp.path().join("segment_changes.parquet").exists(),
        "the Parquet copy of the changes is written"
    );
    let dead = read(&tmp.path().join("dead_letters.jsonl"));
    let lines: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad dead letter {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "two bad lines in the input:\n{dead}");
    assert_eq!(lines[0]["reason"], "invalid_json");
    assert_eq!(lines[0]["line"], 10);
    assert_eq!(lines[1]["reason"], "missing_event");
    assert!(
        stdout.contains("1 duplicates"),
        "the duplicate is counted:\n{stdout}"
    );
}

#[test]
fn replay_output_is_identical_for_1_2_and_4_workers() {
    let outs: Vec<String> = [1, 2, 4]
        .iter()
        .map(|w| {
            let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            replay(tmp.path(), *w);
            read(&tmp.path().join("segment_changes.jsonl"))
        })
        .collect();
    assert_eq!(outs[0], outs[1], "2 workers differ from 1");
    assert_eq!(outs[0], outs[2], "4 workers differ from 1");
}

#[test]
fn check_prints_the_plan_and_what_is_shared() {
    let out = ok(herald().args([
        "check",
        data("spec_examples")
            .join("segments.sql")
            .to_str()
            .unwrap_or_default(),
    ]));
    assert!(out.contains("ok, 4 segment(s)"), "{out}");
    assert!(out.contains("events_by_user"), "{out}");
}

#[test]
fn a_bad_segment_file_is_refused_with_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bad = tmp.path().join("bad.sql");
    std::fs::write(
        &bad,
        "CREATE SEGMENT a AS\n  count(*) >= 1;\nCREATE SEGMENT b AS cnt(*) > 1;\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = run(herald().args(["check", bad.to_str().unwrap_or_default()]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.sql:line 3, column"), "{err}");
    assert!(
        err.contains("cnt"),
        "the message names the unknown function: {err}"
    );
}

#[test]
fn missing_inputs_and_bad_arguments_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let seg = data("spec_examples").join("segments.sql");
    let base = |extra: &[&str]| {
        let mut c = herald();
        c.args([
            "replay",
            "--segments",
            seg.to_str().unwrap_or_default(),
            "--out",
        ])
        .arg(tmp.path())
        .args(extra);
        run(&mut c)
    };
    let out = base(&[
        "--events",
        "/nonexistent/events.jsonl",
        "--until",
        "2026-03-20T00:00:00Z",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/events.jsonl"),
        "names the missing file: {err}"
    );

    let events = data("spec_examples").join("events.jsonl");
    let out = base(&[
        "--events",
        events.to_str().unwrap_or_default(),
        "--until",
        "next week",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--until"));

    let out = base(&[
        "--events",
        events.to_str().unwrap_or_default(),
        "--until",
        "2026-03-20T00:00:00Z",
        "--profiles",
        "profiles.parquet",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PATH@RFC3339"));
}

/// Needs the S3-compatible server `scripts/services.sh` starts (run by `scripts/test.sh`).
#[test]
#[ignore = "needs a real S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn replay_reads_and_writes_a_real_s3_bucket() {
    let bucket = std::env::var("HERALD_TEST_S3_BUCKET").unwrap_or_else(|_| {
        panic!("HERALD_TEST_S3_BUCKET and AWS_ENDPOINT_URL must be set: run `eval \"$(scripts/services.sh start)\"`")
    });
    let prefix = format!("s3://{bucket}/e2e-{}", std::process::id());
    let d = data("spec_examples");
    for name in ["segments.sql", "events.jsonl"] {
        herald_connectors::store::write_all(
            &format!("{prefix}/in/{name}"),
            read(&d.join(name)).into_bytes(),
        )
        .unwrap_or_else(|e| panic!("upload {name}: {e}"));
    }
    ok(herald().args([
        "replay",
        "--segments",
        &format!("{prefix}/in/segments.sql"),
        "--events",
        &format!("{prefix}/in/events.jsonl"),
        "--until",
        "2026-03-20T00:00:00Z",
        "--out",
        &format!("{prefix}/out"),
        "--workers",
        "2",
    ]));
    let got = herald_connectors::store::read_all(&format!("{prefix}/out/segment_changes.jsonl"))
        .unwrap_or_else(|e| panic!("download changes: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&got),
        read(&d.join("expected_changes.jsonl")),
        "replay over S3 gives the golden changes"
    );
    let dead = herald_connectors::store::read_all(&format!("{prefix}/out/dead_letters.jsonl"))
        .unwrap_or_else(|e| panic!("download dead letters: {e}"));
    assert_eq!(String::from_utf8_lossy(&dead).lines().count(), 2);
}
