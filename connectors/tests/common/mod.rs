//! Helpers for the connector tests that talk to the test PostgreSQL.
#![allow(dead_code)]

/// The test PostgreSQL's URL (`HERALD_TEST_POSTGRES`, set by scripts/services.sh).
pub fn pg() -> String {
    std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| panic!("HERALD_TEST_POSTGRES must be set: run scripts/services.sh"))
}

/// A suffix no other test run uses (for tables, schemas and bucket prefixes).
pub fn unique() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{}", std::process::id(), n % 1_000_000_000)
}

/// Runs a batch of SQL statements on the test PostgreSQL; panics on an error.
pub fn sql(batch: &str) {
    let url = pg();
    let batch = batch.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.batch_execute(&batch).await.unwrap();
    });
}
