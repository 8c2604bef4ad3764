//! Profile sync: a warehouse query's result written as a profile snapshot.
//!
//! Owns [`sync_profiles`]: runs a SQL query on a PostgreSQL-protocol warehouse
//! (PostgreSQL, Redshift), and writes the rows as one Parquet snapshot
//! (`<instant>.parquet`) under a prefix (a local directory, `file://` or `s3://`)
//! with [`write_snapshot`]: atomically, so the engine's snapshot watcher never sees half a
//! file. The watcher applies the newest snapshot as a diff against the last one.
//!
//! The query returns one row per user: a `user_id` column (text or integer) and one
//! column per trait. Column types map to trait types: text-like -> string; integers and
//! floats -> number; boolean -> boolean; `timestamptz`, `timestamp` (read as UTC) and
//! `date` (midnight UTC) -> timestamp. Other types (`numeric`, `json`, arrays, …) are
//! refused with the column named: cast them in the query (`x::float8`, `x::text`). A
//! user id on two rows is refused (the warehouse query decides which row wins, not
//! Herald); rows with a null or empty id are skipped and counted.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use herald_operators::value::{Num, Type, Value};
use tokio_postgres::types::Type as PgType;
use tokio_postgres::NoTls;

use crate::error::ConnectorError;
use crate::postgres::pg_err;
use crate::snapshot::write_snapshot;
use crate::store::block_on;

/// What a sync wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSummary {
    /// The snapshot's location.
    pub location: String,
    /// Users written.
    pub users: usize,
    /// Trait columns.
    pub traits: Vec<String>,
    /// Rows skipped for a null or empty `user_id`.
    pub skipped: u64,
}

fn trait_type(t: &PgType) -> Option<Type> {
    Some(match *t {
        PgType::TEXT | PgType::VARCHAR | PgType::BPCHAR | PgType::NAME => Type::Str,
        PgType::INT2 | PgType::INT4 | PgType::INT8 | PgType::FLOAT4 | PgType::FLOAT8 => Type::Num,
        PgType::BOOL => Type::Bool,
        PgType::TIMESTAMPTZ | PgType::TIMESTAMP | PgType::DATE => Type::Ts,
        _ => return None,
    })
}

/// One cell as a trait value (NULL -> `Value::Null`).
fn cell(row: &tokio_postgres::Row, i: usize, t: &PgType) -> Result<Value, tokio_postgres::Error> {
    let num = |v: Option<f64>| v.map_or(Value::Null, |n| Value::Num(Num(n)));
    Ok(match *t {
        PgType::INT2 => num(row.try_get::<_, Option<i16>>(i)?.map(f64::from)),
        PgType::INT4 => num(row.try_get::<_, Option<i32>>(i)?.map(f64::from)),
        PgType::INT8 => num(row.try_get::<_, Option<i64>>(i)?.map(|v| v as f64)),
        PgType::FLOAT4 => num(row.try_get::<_, Option<f32>>(i)?.map(f64::from)),
        PgType::FLOAT8 => num(row.try_get::<_, Option<f64>>(i)?),
        PgType::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map_or(Value::Null, Value::Bool),
        PgType::TIMESTAMPTZ => row
            .try_get::<_, Option<DateTime<Utc>>>(i)?
            .map_or(Value::Null, |t| Value::Ts(t.timestamp_millis())),
        PgType::TIMESTAMP => row
            .try_get::<_, Option<NaiveDateTime>>(i)?
            .map_or(Value::Null, |t| Value::Ts(t.and_utc().timestamp_millis())),
        PgType::DATE => row
            .try_get::<_, Option<NaiveDate>>(i)?
            .map_or(Value::Null, |d| {
                Value::Ts(
                    d.and_hms_opt(0, 0, 0)
                        .unwrap_or_default()
                        .and_utc()
                        .timestamp_millis(),
                )
            }),
        _ => row
            .try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Str),
    })
}

/// A query's result: its columns (name, type) and rows.
pub(crate) type Fetched = (Vec<(String, PgType)>, Vec<tokio_postgres::Row>);

/// Runs `sql` at the PostgreSQL `url` in a read-only transaction (a query that would
/// write is refused by the server); `what` names the query in errors.
pub(crate) fn fetch(url: &str, sql: &str, what: &str) -> Result<Fetched, ConnectorError> {
    let (url_owned, sql, what) = (url.to_string(), sql.to_string(), what.to_string());
    block_on(url, async move {
        let url = url_owned.as_str();
        let (mut client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| pg_err(&format!("{what}: cannot connect"), url, e))?;
        let conn = tokio::spawn(connection);
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| pg_err(&what, url, e))?;
        let stmt = tx.prepare(&sql).await.map_err(|e| pg_err(&what, url, e))?;
        let columns = stmt
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect();
        let rows = tx
            .query(&stmt, &[])
            .await
            .map_err(|e| pg_err(&what, url, e))?;
        tx.commit().await.map_err(|e| pg_err(&what, url, e))?;
        drop(client);
        let _ = conn.await;
        Ok::<_, ConnectorError>((columns, rows))
    })?
}

/// Whether a column of this type can hold user ids (text or an integer).
pub(crate) fn is_id_type(t: &PgType) -> bool {
    matches!(
        *t,
        PgType::TEXT
            | PgType::VARCHAR
            | PgType::BPCHAR
            | PgType::NAME
            | PgType::INT4
            | PgType::INT8
    )
}

/// The user id in column `i` of `row` (of an [`is_id_type`] type), trimmed; `None` for
/// NULL or empty.
pub(crate) fn user_id(
    row: &tokio_postgres::Row,
    i: usize,
    t: &PgType,
) -> Result<Option<String>, tokio_postgres::Error> {
    // Integers are read as such (a trait number is an f64, exact only up to 2^53).
    Ok(match *t {
        PgType::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|n| n.to_string()),
        PgType::INT8 => row.try_get::<_, Option<i64>>(i)?.map(|n| n.to_string()),
        // Trimmed like a CSV list's ids (char(n) comes back padded).
        _ => row
            .try_get::<_, Option<String>>(i)?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
    })
}

/// The snapshot's file name for an instant (`2026-11-22T10-00-00.000Z.parquet`): names
/// sort by time, also among time-named unload directories under the same prefix, and the
/// watcher takes the greatest.
pub fn snapshot_name(now_ms: i64) -> String {
    let t = DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    format!("{}.parquet", t.format("%Y-%m-%dT%H-%M-%S%.3fZ"))
}

/// Runs `sql` at the PostgreSQL `url` and writes the result under `prefix` as
/// `<now>.parquet`; see the module docs.
pub fn sync_profiles(
    url: &str,
    sql: &str,
    prefix: &str,
    now_ms: i64,
) -> Result<SyncSummary, ConnectorError> {
    let (columns, rows) = fetch(url, sql, "the profile query")?;
    let bad = |m: String| ConnectorError::input("the profile query", m);
    let id = columns
        .iter()
        .position(|(n, _)| n == "user_id")
        .ok_or_else(|| bad("its result has no `user_id` column".into()))?;
    if !is_id_type(&columns[id].1) {
        return Err(bad(format!(
            "`user_id` is {}; it must be text or an integer",
            columns[id].1
        )));
    }
    let mut schema = Vec::new();
    for (i, (name, t)) in columns.iter().enumerate() {
        if i == id {
            continue;
        }
        if columns[..i].iter().any(|(n, _)| n == name) {
            return Err(bad(format!("column '{name}' appears twice")));
        }
        let ty = trait_type(t).ok_or_else(|| {
            bad(format!(
                "column '{name}' is {t}, which a snapshot cannot hold: cast it in the query \
                 ({name}::float8, {name}::text, …)"
            ))
        })?;
        schema.push((name.clone(), ty));
    }
    let mut users: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut skipped = 0;
    for row in &rows {
        let cell_err = |e: tokio_postgres::Error| bad(format!("cannot read a row: {e}"));
        let Some(user) = user_id(row, id, &columns[id].1).map_err(cell_err)? else {
            skipped += 1;
            continue;
        };
        let mut traits = BTreeMap::new();
        for (i, (name, t)) in columns.iter().enumerate() {
            if i == id {
                continue;
            }
            let v = cell(row, i, t).map_err(cell_err)?;
            if !v.is_null() {
                traits.insert(name.clone(), v);
            }
        }
        if users.insert(user.clone(), traits).is_some() {
            return Err(bad(format!(
                "user_id '{user}' is on two rows; the query must return one row per user"
            )));
        }
    }
    let location = format!("{}/{}", prefix.trim_end_matches('/'), snapshot_name(now_ms));
    write_snapshot(&location, &users, &schema)?;
    Ok(SyncSummary {
        location,
        users: users.len(),
        traits: schema.into_iter().map(|(n, _)| n).collect(),
        skipped,
    })
}
