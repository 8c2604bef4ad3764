//! Golden tests of the segment parser's error messages.
//!
//! Every `tests/golden/errors/*.sql` is a bad segment file; the matching `.expected` holds
//! the one-line error it must produce (`line L, column C: message`). Run with
//! `UPDATE_GOLDEN=1` to rewrite the `.expected` files from the current output, then review
//! the diff by eye: the position must point at the problem and the message must read well.

use std::fs;
use std::path::{Path, PathBuf};

use herald_operators::lang::parse::parse_segments;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/errors")
}

#[test]
fn error_messages_match_golden_files() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut cases: Vec<PathBuf> = fs::read_dir(golden_dir())
        .expect("golden directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "only {} golden cases", cases.len());

    let mut failures = Vec::new();
    for sql in &cases {
        let src = fs::read_to_string(sql).expect("read .sql");
        let actual = match parse_segments(&src) {
            Ok(_) => "(no error: the file parsed)".to_string(),
            Err(e) => e.to_string(),
        };
        let expected_path = sql.with_extension("expected");
        if update {
            fs::write(&expected_path, format!("{actual}\n")).expect("write .expected");
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if expected.trim_end() != actual {
            failures.push(format!(
                "{}:\n  expected: {}\n  actual:   {actual}",
                sql.display(),
                expected.trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden error(s) differ (UPDATE_GOLDEN=1 rewrites them):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
