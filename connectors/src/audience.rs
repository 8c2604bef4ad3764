//! Warehouse audiences (`CREATE SEGMENT … FROM WAREHOUSE '…' REFRESH EVERY …`): the user
//! ids a warehouse query returns.
//!
//! Owns [`run_audience`]: runs the query on a PostgreSQL-protocol warehouse (PostgreSQL,
//! Redshift) and returns the set of ids, taken from the column named `user_id` when the
//! result has one, else from the first column (as for a `FROM CSV` list). The id column
//! must be text or an integer; ids are trimmed; rows with a NULL or empty id are skipped
//! and counted, and a result whose every row is skipped is refused (a broken join or a
//! renamed column, not an empty audience); an id on several rows is one member. The
//! query runs in a read-only transaction. The engine diffs each result against the last
//! good one.

use std::collections::BTreeSet;

use crate::error::ConnectorError;
use crate::profile_sync::{fetch, is_id_type, user_id};

/// A warehouse audience's members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audience {
    /// The user ids.
    pub members: BTreeSet<String>,
    /// Rows skipped for a NULL or empty id.
    pub skipped: u64,
}

/// Runs segment `segment`'s query `sql` at the PostgreSQL `url`; see the module docs.
///
/// Errors name the segment: the warehouse unreachable or refusing the query
/// ([`Fault::External`](crate::Fault::External), with the server's message), a result
/// without columns, with an id column of another type, or whose every id is NULL or empty
/// ([`Fault::Input`](crate::Fault::Input)).
pub fn run_audience(url: &str, segment: &str, sql: &str) -> Result<Audience, ConnectorError> {
    let what = format!("the query of warehouse audience '{segment}'");
    let (columns, rows) = fetch(url, sql, &what)?;
    let bad = |m: String| ConnectorError::input(&what, m);
    let id = match columns.iter().position(|(n, _)| n == "user_id") {
        Some(i) => i,
        None if !columns.is_empty() => 0,
        None => return Err(bad("its result has no columns; select the user ids".into())),
    };
    let (name, ty) = &columns[id];
    if !is_id_type(ty) {
        return Err(bad(format!(
            "the user id column '{name}' is {ty}; it must be text or an integer \
             (cast it: {name}::text)"
        )));
    }
    let mut audience = Audience::default();
    for row in &rows {
        match user_id(row, id, ty).map_err(|e| bad(format!("cannot read a row: {e}")))? {
            Some(user) => {
                audience.members.insert(user);
            }
            None => audience.skipped += 1,
        }
    }
    if audience.members.is_empty() && !rows.is_empty() {
        return Err(bad(format!(
            "all {} rows have a NULL or empty '{name}'; refusing to empty the audience",
            rows.len()
        )));
    }
    Ok(audience)
}
