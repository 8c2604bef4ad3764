//! Loading segment changes into a SQL warehouse that speaks PostgreSQL's protocol
//! (PostgreSQL itself, Redshift).
//!
//! Owns [`load_changes`]: creates the table if missing, streams the rows with a binary
//! `COPY` into a temporary staging table, and moves them into the target with
//! `INSERT … ON CONFLICT DO NOTHING` in one transaction (the loader of
//! [`crate::tables`], with the [`SEGMENT_CHANGES`](crate::tables::SEGMENT_CHANGES) shape). The table's primary key is the
//! whole change, `(segment, user_id, time, diff)`, so loading the same changes again (a
//! replay, or a retry after a failure) adds nothing: the load is idempotent.
//!
//! Table (created if missing):
//!
//! ```sql
//! CREATE TABLE segment_changes (
//!     segment text NOT NULL, user_id text NOT NULL, diff bigint NOT NULL,
//!     time timestamptz NOT NULL, PRIMARY KEY (segment, user_id, time, diff));
//! ```

use crate::error::ConnectorError;
use crate::sink::SegmentChange;

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
    // A replay runs the files' definitions: version 1.
    let rows: Vec<_> = changes
        .iter()
        .map(|c| crate::tables::change_row(c, 1))
        .collect();
    crate::tables::load_rows(url, table, &crate::tables::SEGMENT_CHANGES, &rows, true)
}
