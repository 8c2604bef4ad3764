//! `herald run` with `[profile_sync]` against a real PostgreSQL: the warehouse query
//! becomes a snapshot under the snapshots prefix, segments over its traits fill up and
//! follow changes in the warehouse, and a failing query keeps the last good membership.

mod common;

use std::time::Duration;

use common::{pg, pg_query, unique, Herald};

fn sql(batch: &str) {
    pg_query(batch);
}

#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn warehouse_profiles_flow_into_segments_on_a_schedule() {
    let t = unique("sync");
    sql(&format!(
        "CREATE TABLE {t} (user_id text PRIMARY KEY, plan text, ltv float8);
         INSERT INTO {t} VALUES ('a', 'pro', 10), ('b', 'pro', 500), ('c', 'free', 0);"
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT pro AS plan = 'pro';\nCREATE SEGMENT whales AS ltv >= 100;\n",
    )
    .unwrap();
    let config = format!(
        "[engine]\nsegments = \"segments.sql\"\nworkers = 2\n\
         [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n\
         [snapshots]\nprefix = \"snapshots\"\nrefresh = \"1 second\"\n\
         [profile_sync]\npostgres = \"{}\"\nquery = \"SELECT user_id, plan, ltv FROM {t}\"\n\
         every = \"1 second\"\n",
        pg()
    );
    let mut h = Herald::start(dir.path(), &config);
    h.wait_for("the first sync", Duration::from_secs(60), |h| {
        h.size("pro") == 2 && h.size("whales") == 1
    });
    // The warehouse changes; the next sync's snapshot is applied as a diff.
    sql(&format!(
        "UPDATE {t} SET plan = 'pro' WHERE user_id = 'c'; UPDATE {t} SET ltv = 1000 WHERE user_id = 'a';"
    ));
    h.wait_for("the change", Duration::from_secs(60), |h| {
        h.size("pro") == 3 && h.size("whales") == 2
    });
    // The query starts failing: reported, and the segments keep their members.
    sql(&format!("DROP TABLE {t};"));
    h.wait_for("a failed sync", Duration::from_secs(60), |h| {
        h.errors("profile_sync") >= 2.0
    });
    assert_eq!((h.size("pro"), h.size("whales")), (3, 2));
    assert!(
        h.stderr_text().contains("profile sync"),
        "{}",
        h.stderr_text()
    );
    assert!(h.stop().success());
    // Every snapshot written is whole and readable.
    for f in std::fs::read_dir(dir.path().join("snapshots")).unwrap() {
        let p = f.unwrap().path();
        assert!(p.to_str().unwrap().ends_with(".parquet"), "{p:?}");
        herald_connectors::snapshot::read_snapshot(p.to_str().unwrap()).unwrap();
    }
}
