//! Loading segment changes into a SQL warehouse that speaks PostgreSQL's protocol
//! (PostgreSQL itself, Redshift).
//!
//! Owns [`load_changes`]: creates the table if missing, streams the rows with a binary
//! `COPY` into a temporary staging table, and moves them into the target with
//! `INSERT … ON CONFLICT DO NOTHING` in one transaction. The table's primary key is the
//! whole change, `(segment, user_id, time, diff)`, so loading the same changes again (a
//! replay, or a retry after a failure) adds nothing: the load is idempotent.
//!
//! Table (created if missing):
//!
//! ```sql
//! CREATE TABLE segment_changes (
//!     segment text NOT NULL, user_id text NOT NULL, diff smallint NOT NULL,
//!     time timestamptz NOT NULL, PRIMARY KEY (segment, user_id, time, diff));
//! ```

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type as PgType;
use tokio_postgres::NoTls;

use crate::error::ConnectorError;
use crate::sink::SegmentChange;
use crate::store::block_on;

/// What a load did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Rows sent.
    pub sent: u64,
    /// Rows that were new (the rest were already there).
    pub inserted: u64,
}

pub(crate) fn pg_err(what: &str, url: &str, e: tokio_postgres::Error) -> ConnectorError {
    // Never echo the URL's password.
    let shown = match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "the configured PostgreSQL URL".to_string(),
    };
    // tokio-postgres shows a server error as just "db error": say what the server said.
    let detail = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    ConnectorError::io(&shown, std::io::Error::other(format!("{what}: {detail}")))
}

/// Loads changes into `table` at the PostgreSQL `url`; see the module docs. `table` must
/// be a plain identifier (letters, digits, `_`, optionally one `schema.` prefix).
pub fn load_changes(
    url: &str,
    table: &str,
    changes: &[SegmentChange],
) -> Result<LoadSummary, ConnectorError> {
    let valid = !table.is_empty()
        && table.split('.').count() <= 2
        && table
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if !valid {
        return Err(ConnectorError::input(
            table,
            "a table name must be an identifier like segment_changes or analytics.segment_changes",
        ));
    }
    let url_owned = url.to_string();
    let table = table.to_string();
    let rows: Vec<(String, String, i16, chrono::DateTime<chrono::Utc>)> = changes
        .iter()
        .map(|c| {
            (
                c.segment.clone(),
                c.user_id.clone(),
                c.diff.clamp(i16::MIN as i64, i16::MAX as i64) as i16,
                chrono::DateTime::from_timestamp_millis(c.time).unwrap_or_default(),
            )
        })
        .collect();
    block_on(url, async move {
        let url = url_owned.as_str();
        let (mut client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| pg_err("cannot connect", url, e))?;
        let conn = tokio::spawn(connection);
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_err("begin", url, e))?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
                segment text NOT NULL, user_id text NOT NULL, diff smallint NOT NULL, \
                time timestamptz NOT NULL, PRIMARY KEY (segment, user_id, time, diff)); \
             CREATE TEMPORARY TABLE herald_staging (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP;"
        ))
        .await
        .map_err(|e| pg_err("create tables", url, e))?;
        let sink = tx
            .copy_in("COPY herald_staging (segment, user_id, diff, time) FROM STDIN BINARY")
            .await
            .map_err(|e| pg_err("copy", url, e))?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                PgType::TEXT,
                PgType::TEXT,
                PgType::INT2,
                PgType::TIMESTAMPTZ,
            ],
        );
        let mut writer = std::pin::pin!(writer);
        for (segment, user, diff, time) in &rows {
            writer
                .as_mut()
                .write(&[segment, user, diff, time])
                .await
                .map_err(|e| pg_err("copy", url, e))?;
        }
        let sent = writer.finish().await.map_err(|e| pg_err("copy", url, e))?;
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO {table} (segment, user_id, diff, time) \
                     SELECT segment, user_id, diff, time FROM herald_staging \
                     ON CONFLICT DO NOTHING"
                ),
                &[],
            )
            .await
            .map_err(|e| pg_err("insert", url, e))?;
        tx.commit().await.map_err(|e| pg_err("commit", url, e))?;
        drop(client);
        let _ = conn.await;
        Ok(LoadSummary { sent, inserted })
    })?
}
