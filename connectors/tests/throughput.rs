//! Parse throughput of event JSONL files (ignored by default; run with
//! `cargo test --release -p herald-connectors --test throughput -- --ignored --nocapture`).

use std::time::Instant;

use herald_connectors::events::{read_events, DEFAULT_DEDUP_HORIZON_MS};
use herald_operators::event::Limits;

#[test]
#[ignore = "measures performance; run in release"]
fn parse_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let n = 500_000;
    let mut text = String::with_capacity(n * 260);
    for i in 0..n {
        text.push_str(&format!(
            r#"{{"type":"track","event":"Order Completed","userId":"u{}","messageId":"m{i}","timestamp":"2026-03-01T10:{:02}:{:02}.123Z","properties":{{"revenue":{}.5,"currency":"USD"}},"context":{{"ip":"10.0.0.1"}}}}"#,
            i % 10_000,
            (i / 60) % 60,
            i % 60,
            i % 500
        ));
        text.push('\n');
    }
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, &text).unwrap();
    let sources = [path.to_str().unwrap().to_string()];
    for threads in [1, 4] {
        let start = Instant::now();
        let batch = read_events(
            &sources,
            Limits::default(),
            DEFAULT_DEDUP_HORIZON_MS,
            threads,
        )
        .unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(batch.events.len(), n);
        println!(
            "{threads} thread(s): {n} events, {:.1} MB in {secs:.2}s = {:.0} events/s",
            text.len() as f64 / 1e6,
            n as f64 / secs
        );
    }
}
