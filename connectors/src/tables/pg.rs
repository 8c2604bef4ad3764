//! The warehouse tables in a PostgreSQL-protocol warehouse: the schema, `CREATE TABLE`,
//! and idempotent loads by binary COPY into a staging table (the `postgres` feature).

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type as PgType};
use tokio_postgres::NoTls;

use super::*;
use crate::postgres::{pg_err, LoadSummary};
use crate::store::block_on;

/// Checks a PostgreSQL identifier used as a schema name.
pub fn check_pg_schema(schema: &str) -> Result<(), ConnectorError> {
    let ok = schema
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConnectorError::input(
            schema,
            "a PostgreSQL schema name must be a lower-case identifier like herald",
        ))
    }
}

fn pg_type(ty: ColType) -> &'static str {
    match ty {
        ColType::Text => "text",
        ColType::Int => "bigint",
        ColType::Time => "timestamptz",
        ColType::Json => "jsonb",
    }
}

/// The `CREATE TABLE IF NOT EXISTS` statement of a table in `schema`, with the columns
/// added since an earlier Herald created it (see `create_sql`).
pub fn create_table_sql(schema: &str, table: &Table) -> String {
    create_sql(&format!("{schema}.{}", table.name), table)
}

/// `CREATE TABLE IF NOT EXISTS qualified (…)` with the table's columns and key, then, for
/// each nullable column, an `ALTER TABLE … ADD COLUMN` run only when the table lacks it:
/// a table an earlier Herald created gets the columns added since (they are nullable,
/// NULL in its rows), and a table that has them takes no lock.
fn create_sql(qualified: &str, table: &Table) -> String {
    let (schema, name) = match qualified.split_once('.') {
        Some((s, t)) => (format!("'{s}'"), t),
        None => ("current_schema()".to_string(), qualified),
    };
    let mut sql = create_table_only(qualified, table);
    for c in table.columns.iter().filter(|c| c.nullable) {
        sql.push_str(&format!(
            "; DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns \
             WHERE table_schema = {schema} AND table_name = '{name}' AND column_name = '{c}') \
             THEN ALTER TABLE {qualified} ADD COLUMN {c} {ty}; END IF; END $$",
            c = c.name,
            ty = pg_type(c.ty)
        ));
    }
    sql
}

/// `CREATE TABLE IF NOT EXISTS qualified (…)` with the table's columns and key.
fn create_table_only(qualified: &str, table: &Table) -> String {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            format!(
                "{} {}{}",
                c.name,
                pg_type(c.ty),
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {qualified} ({}, PRIMARY KEY ({}))",
        cols.join(", "),
        table.key.join(", ")
    )
}

/// Creates `schema` and every table in it, if missing, and adds to an existing table the
/// columns a later Herald added ([`create_table_sql`]).
pub fn create_postgres_tables(url: &str, schema: &str) -> Result<(), ConnectorError> {
    check_pg_schema(schema)?;
    let ddl: Vec<String> = std::iter::once(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .chain(TABLES.iter().map(|t| create_table_sql(schema, t)))
        .collect();
    let url_owned = url.to_string();
    block_on(url, async move {
        let url = url_owned.as_str();
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| pg_err("cannot connect", url, e))?;
        let conn = tokio::spawn(connection);
        for stmt in &ddl {
            client
                .batch_execute(stmt)
                .await
                .map_err(|e| pg_err("create tables", url, e))?;
        }
        drop(client);
        let _ = conn.await;
        Ok(())
    })?
}

/// Loads `rows` of `table` into `schema.table` at the PostgreSQL `url` (see the module
/// docs); the table must exist ([`create_postgres_tables`]). Idempotent.
pub fn load_postgres(
    url: &str,
    schema: &str,
    table: &Table,
    rows: &[Row],
) -> Result<LoadSummary, ConnectorError> {
    check_pg_schema(schema)?;
    load_rows(url, &format!("{schema}.{}", table.name), table, rows, false)
}

/// Loads `rows` shaped as `table` into the table `qualified` (a checked identifier, maybe
/// schema-qualified), creating it first when `create`; see the module docs.
pub(crate) fn load_rows(
    url: &str,
    qualified: &str,
    table: &Table,
    rows: &[Row],
    create: bool,
) -> Result<LoadSummary, ConnectorError> {
    if rows.is_empty() {
        return Ok(LoadSummary::default());
    }
    let name = table.name;
    let ddl = create.then(|| create_sql(qualified, table));
    let staging_cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            let ty = if c.ty == ColType::Json {
                "text"
            } else {
                pg_type(c.ty)
            };
            format!("{} {ty}", c.name)
        })
        .collect();
    let names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    let select: Vec<String> = table
        .columns
        .iter()
        .map(|c| match c.ty {
            ColType::Json => format!("{}::jsonb", c.name),
            _ => c.name.to_string(),
        })
        .collect();
    let staging = format!("herald_staging_{name}");
    let create = format!(
        "CREATE TEMPORARY TABLE {staging} ({}) ON COMMIT DROP",
        staging_cols.join(", ")
    );
    let copy = format!("COPY {staging} ({}) FROM STDIN BINARY", names.join(", "));
    // Within one load, the first row of a repeated key wins (DISTINCT ON keeps the
    // insert from touching a row twice).
    let insert = format!(
        "INSERT INTO {qualified} ({cols}) SELECT DISTINCT ON ({key}) {select} FROM {staging} \
         ON CONFLICT DO NOTHING",
        cols = names.join(", "),
        key = table.key.join(", "),
        select = select.join(", "),
    );
    let types: Vec<PgType> = table
        .columns
        .iter()
        .map(|c| match c.ty {
            ColType::Text | ColType::Json => PgType::TEXT,
            ColType::Int => PgType::INT8,
            ColType::Time => PgType::TIMESTAMPTZ,
        })
        .collect();
    let url_owned = url.to_string();
    let rows: Vec<Vec<PgCell>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .zip(table.columns)
                .map(|(c, col)| PgCell::from_cell(c, col.ty))
                .collect()
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
        if let Some(ddl) = &ddl {
            tx.batch_execute(ddl)
                .await
                .map_err(|e| pg_err("create table", url, e))?;
        }
        tx.batch_execute(&create)
            .await
            .map_err(|e| pg_err("create staging table", url, e))?;
        let sink = tx
            .copy_in(&copy)
            .await
            .map_err(|e| pg_err("copy", url, e))?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        for row in &rows {
            let refs: Vec<&(dyn ToSql + Sync)> = row.iter().map(PgCell::as_sql).collect();
            writer
                .as_mut()
                .write(&refs)
                .await
                .map_err(|e| pg_err("copy", url, e))?;
        }
        let sent = writer.finish().await.map_err(|e| pg_err("copy", url, e))?;
        let inserted = tx
            .execute(&insert, &[])
            .await
            .map_err(|e| pg_err(&format!("insert into {qualified}"), url, e))?;
        tx.commit().await.map_err(|e| pg_err("commit", url, e))?;
        drop(client);
        let _ = conn.await;
        Ok(LoadSummary { sent, inserted })
    })?
}

/// A cell typed for binary COPY (a NULL needs its column's type).
enum PgCell {
    Text(Option<String>),
    Int(Option<i64>),
    Time(Option<chrono::DateTime<chrono::Utc>>),
}

impl PgCell {
    fn from_cell(c: &Cell, ty: ColType) -> PgCell {
        match ty {
            ColType::Text | ColType::Json => PgCell::Text(match c {
                Cell::Text(s) => Some(s.clone()),
                _ => None,
            }),
            ColType::Int => PgCell::Int(match c {
                Cell::Int(v) => Some(*v),
                _ => None,
            }),
            ColType::Time => PgCell::Time(match c {
                Cell::Time(v) => chrono::DateTime::from_timestamp_millis(*v),
                _ => None,
            }),
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            PgCell::Text(v) => v,
            PgCell::Int(v) => v,
            PgCell::Time(v) => v,
        }
    }
}
