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
    assert!(
        out.contains("kept once per user in the segment state"),
        "{out}"
    );
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
    let events = events.to_str().unwrap_or_default();
    for (args, needle) in [
        (&["--until", "next week"][..], "--until"),
        (&["--until", "1969-12-31T00:00:00Z"][..], "before 1970"),
        (
            &[
                "--until",
                "2026-03-20T00:00:00Z",
                "--profiles",
                "profiles.parquet",
            ][..],
            "PATH@RFC3339",
        ),
    ] {
        let out = base(&[&["--events", events][..], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
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

/// A `FROM CSV` list on S3, as the spec's example writes it.
#[test]
#[ignore = "needs a real S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn a_static_list_is_read_from_a_real_s3_bucket() {
    let bucket = std::env::var("HERALD_TEST_S3_BUCKET").unwrap_or_else(|_| {
        panic!("HERALD_TEST_S3_BUCKET and AWS_ENDPOINT_URL must be set: run `eval \"$(scripts/services.sh start)\"`")
    });
    let list = format!("s3://{bucket}/lists-{}/beta.csv", std::process::id());
    herald_connectors::store::write_all(
        &list,
        "email,user_id\na@x,u1\nb@x,u3\n".as_bytes().to_vec(),
    )
    .unwrap_or_else(|e| panic!("upload: {e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path();
    std::fs::write(
        dir.join("segments.sql"),
        format!(
            "CREATE SEGMENT beta_testers FROM CSV '{list}';\n\
             CREATE SEGMENT active_beta AS in_segment('beta_testers') AND count(*) >= 1;\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.join("events.jsonl"),
        r#"{"type":"track","event":"Clicked","userId":"u1","messageId":"c1","timestamp":"2026-03-01T00:00:00Z"}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    ok(herald().args([
        "replay",
        "--segments",
        &p("segments.sql"),
        "--events",
        &p("events.jsonl"),
        "--until",
        "2026-03-02T00:00:00Z",
        "--out",
        &p("out"),
    ]));
    let changes = read(&dir.join("out/segment_changes.jsonl"));
    let members: Vec<(String, String)> = changes
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}"));
            (
                v["segment"].as_str().unwrap_or_default().to_string(),
                v["user_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        members,
        [
            ("active_beta".to_string(), "u1".to_string()),
            ("beta_testers".to_string(), "u1".to_string()),
            ("beta_testers".to_string(), "u3".to_string()),
        ],
        "{changes}"
    );
}

#[test]
fn parquet_snapshots_apply_at_their_instants_as_diffs() {
    use herald_operators::value::{Type, Value};
    use std::collections::BTreeMap;
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path();
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    std::fs::write(
        dir.join("segments.sql"),
        "CREATE SEGMENT pro AS plan = 'pro';\nCREATE SEGMENT known AS user_id IS NOT NULL;\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.join("events.jsonl"),
        concat!(
            r#"{"type":"identify","userId":"u1","messageId":"i1","timestamp":"2026-03-01T00:00:00Z","traits":{"plan":"free"}}"#, "\n",
            r#"{"type":"identify","userId":"u2","messageId":"i2","timestamp":"2026-03-04T00:00:00Z","traits":{"plan":"pro"}}"#, "\n",
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let snapshot = |rows: &[(&str, &str)], name: &str| {
        let rows: BTreeMap<String, BTreeMap<String, Value>> = rows
            .iter()
            .map(|(u, plan)| {
                let cells = BTreeMap::from([("plan".to_string(), Value::Str(plan.to_string()))]);
                (u.to_string(), cells)
            })
            .collect();
        herald_connectors::snapshot::write_snapshot(
            &path(name),
            &rows,
            &[("plan".into(), Type::Str)],
        )
        .unwrap_or_else(|e| panic!("write {name}: {e}"));
    };
    snapshot(&[("u1", "pro"), ("u2", "pro")], "s1.parquet");
    snapshot(&[("u2", "free")], "s2.parquet");
    ok(herald().args([
        "replay",
        "--segments",
        &path("segments.sql"),
        "--events",
        &path("events.jsonl"),
        "--profiles",
        &format!("{}@2026-03-02T00:00:00Z", path("s1.parquet")),
        "--profiles",
        &format!("{}@2026-03-04T00:00:00Z", path("s2.parquet")),
        "--until",
        "2026-03-10T00:00:00Z",
        "--out",
        &path("out"),
    ]));
    // u1: identify 'free' on 03-01, then the 03-02 snapshot (newer) says 'pro'; u1 is
    // missing from the 03-04 snapshot, so it falls back to its identify write: 'free'.
    // u2: enters the universe with its profile row on 03-02; on 03-04 the snapshot says
    // 'free' and an identify at the same instant says 'pro': the event wins.
    let want = concat!(
        r#"{"segment":"known","user_id":"u1","diff":1,"time":"2026-03-01T00:00:00.000Z"}"#,
        "\n",
        r#"{"segment":"known","user_id":"u2","diff":1,"time":"2026-03-02T00:00:00.000Z"}"#,
        "\n",
        r#"{"segment":"pro","user_id":"u1","diff":1,"time":"2026-03-02T00:00:00.000Z"}"#,
        "\n",
        r#"{"segment":"pro","user_id":"u2","diff":1,"time":"2026-03-02T00:00:00.000Z"}"#,
        "\n",
        r#"{"segment":"pro","user_id":"u1","diff":-1,"time":"2026-03-04T00:00:00.000Z"}"#,
        "\n",
    );
    assert_eq!(read(&dir.join("out/segment_changes.jsonl")), want);
}

/// Needs the PostgreSQL `scripts/services.sh` starts (run by `scripts/test.sh`).
#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn replay_loads_changes_into_postgres_idempotently() {
    let url = std::env::var("HERALD_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!("HERALD_TEST_POSTGRES must be set: run `eval \"$(scripts/services.sh start)\"`")
    });
    let d = data("spec_examples");
    let table = format!("changes_{}", std::process::id());
    let expected = read(&d.join("expected_changes.jsonl")).lines().count();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let replay_into = |table: &str| {
        let mut c = herald();
        c.args(["replay", "--segments"])
            .arg(d.join("segments.sql"))
            .arg("--events")
            .arg(d.join("events.jsonl"))
            .args(["--until", "2026-03-20T00:00:00Z", "--out"])
            .arg(tmp.path())
            .args(["--postgres", &url, "--postgres-table", table]);
        c
    };
    let replay = || ok(&mut replay_into(&table));
    let first = replay();
    assert!(
        first.contains(&format!(
            "postgres: {expected} changes sent, {expected} new"
        )),
        "{first}"
    );
    // The same replay again adds nothing.
    let second = replay();
    assert!(
        second.contains(&format!("postgres: {expected} changes sent, 0 new")),
        "{second}"
    );
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([url.as_str(), "-tAc", sql])
            .output()
            .unwrap_or_else(|e| panic!("psql: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        psql(&format!("SELECT count(*) FROM {table}")),
        expected.to_string()
    );
    // Rows match the JSONL file: same segment, user, diff and instant.
    let first_line: serde_json::Value = serde_json::from_str(
        read(&d.join("expected_changes.jsonl"))
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let row = psql(&format!(
        "SELECT diff, to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') FROM {table} \
         WHERE segment = '{}' AND user_id = '{}' ORDER BY time LIMIT 1",
        first_line["segment"].as_str().unwrap(),
        first_line["user_id"].as_str().unwrap()
    ));
    assert_eq!(
        row,
        format!(
            "{}|{}",
            first_line["diff"],
            first_line["time"].as_str().unwrap()
        )
    );
    // A bad table name is refused with a clear error.
    let out = run(&mut replay_into("x; DROP TABLE y"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("identifier"));
    psql(&format!("DROP TABLE {table}"));
}

#[test]
fn journeys_replay_check_and_report_from_the_command_line() {
    let d = data("journeys/spec_example");
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = tmp.path().to_string_lossy().into_owned();
    let stdout = ok(herald().args([
        "replay",
        "--segments",
        &p("segments.sql"),
        "--journeys",
        &p("journeys.yaml"),
        "--events",
        &p("events.jsonl"),
        "--until",
        "2026-03-12T00:00:00Z",
        "--out",
        &out,
    ]));
    assert!(
        stdout.contains("journeys: 49 journey events, 7 message actions"),
        "{stdout}"
    );
    for f in ["journey_events.parquet", "messages.parquet"] {
        assert!(
            tmp.path().join(f).metadata().is_ok_and(|m| m.len() > 0),
            "{f}"
        );
    }
    let table = ok(herald().args(["report", "journeys", &out]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("journey"), "{table}");
    // sms: 3 instances (u1 twice, u5), 6 sends, no conversion; control: 1 of 1 converted.
    // Pooled p = 1/4, se = 0.5, z = -2, two-sided p = 0.0455.
    let sms = lines.iter().find(|l| l.contains(" sms ")).unwrap();
    assert!(sms.contains("-100.0 pp, z=-2.00, p=0.0455"), "{sms}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(herald().args(["report", "journeys", &out, "--json"]))).unwrap();
    let sms = json["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variant"] == "sms")
        .unwrap();
    assert_eq!(
        (sms["entered"].as_u64(), sms["sent"].as_u64()),
        (Some(3), Some(6))
    );
    assert_eq!(sms["converted"], 0);

    let check = ok(herald().args([
        "check",
        &p("segments.sql"),
        "--journeys",
        &p("journeys.yaml"),
    ]));
    assert!(
        check.contains("journeys.yaml: ok, 1 journey(s), 1 hidden condition segment(s)"),
        "{check}"
    );
    // A bad journey file: exit 2, the journey, the path and the problem.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "journey: j\nentry: { segment_entered: nope }\nsteps: []\n",
    )
    .unwrap();
    let out = run(herald().args([
        "check",
        &p("segments.sql"),
        "--journeys",
        bad.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml: journey 'j': entry: unknown segment 'nope'"),
        "{err}"
    );
}
