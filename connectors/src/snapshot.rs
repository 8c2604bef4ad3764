//! Profile snapshots: Parquet files with a `user_id` column and one column per trait.
//!
//! Owns [`read_snapshot`] (one file, or every `*.parquet` under a directory or prefix,
//! read as one snapshot), the mapping from Arrow column types to the segment language's
//! [`Type`]s, [`diff_snapshots`] (what changed between two snapshots, as cell changes and
//! user-presence changes) and [`write_snapshot`] (for tests, examples and benchmarks).
//!
//! Type mapping: Utf8 / LargeUtf8 / Utf8View -> string; Int8..Int64, UInt8..UInt64,
//! Float32, Float64 -> number; Boolean -> boolean; Timestamp (any unit, any time zone),
//! Date32, Date64 -> timestamp (ms since the epoch, UTC); a dictionary-encoded column
//! maps as its value type. Any other type is an error naming the column and its type.
//! Null cells (and NaN floats, which some writers use for missing values) are NULL values:
//! a NULL cell writes NULL at the snapshot's instant; a column the file lacks writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow::datatypes::{
    DataType, Date32Type, Date64Type, Field, Float64Type, Schema, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use herald_operators::value::{Type, Value};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::ConnectorError;
use crate::sink::parquet_write_err;
use crate::store::{read_all, OutputFile};

/// The name of the user key column.
pub const USER_ID_COLUMN: &str = "user_id";

/// Rows per record batch when writing.
const WRITE_BATCH_ROWS: usize = 64 * 1024;

/// A profile snapshot: every user's traits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Per user, the row's cells: a value, or `Value::Null` for a NULL cell (a write of
    /// NULL). Columns a file does not have are absent.
    pub rows: BTreeMap<String, BTreeMap<String, Value>>,
    /// The trait columns and their types, in column order (first file first; columns
    /// that only later files have are appended). Excludes `user_id`.
    pub schema: Vec<(String, Type)>,
    /// Rows skipped because their `user_id` was null or empty.
    pub skipped_rows: u64,
    /// Rows whose `user_id` had already appeared; their non-null cells were merged into
    /// the earlier row (later files and later rows win; a NULL cell does not override).
    pub duplicate_rows: u64,
}

/// The difference between two snapshots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotDiff {
    /// `(user, trait, value, diff)`: `-1` retracts an old value, `+1` asserts a new one.
    /// Unchanged cells produce nothing. Sorted by user, then trait, retraction first.
    pub cells: Vec<(String, String, Value, i64)>,
    /// `(user, diff)`: `+1` for a user added, `-1` for a user removed. Sorted by user.
    pub users: Vec<(String, i64)>,
}

/// The segment-language type of an Arrow column type, `None` when unsupported.
pub fn trait_type(data_type: &DataType) -> Option<Type> {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(Type::Str),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float32
        | DataType::Float64 => Some(Type::Num),
        DataType::Boolean => Some(Type::Bool),
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => Some(Type::Ts),
        DataType::Dictionary(_, values) => trait_type(values),
        _ => None,
    }
}

/// Reads a snapshot from one Parquet file, or from every `*.parquet` object under a
/// directory or prefix (sorted by name; names starting with `.` or `_` are skipped),
/// read as one snapshot. Each file is read whole into memory.
///
/// Errors ([`Fault::Input`](crate::Fault::Input)), each naming the file: no `user_id`
/// column, a `user_id` column that is not a string column, a trait column of an
/// unsupported type, a column whose type differs between files, a corrupt file, or no
/// Parquet file at the location.
pub fn read_snapshot(url: &str) -> Result<Snapshot, ConnectorError> {
    let files = crate::store::parquet_files(url)?;
    let mut snapshot = Snapshot::default();
    let mut types: HashMap<String, (Type, String)> = HashMap::new();
    for file in &files {
        read_file(file, &mut snapshot, &mut types)?;
    }
    Ok(snapshot)
}

/// Reads one Parquet file into `snapshot`; `types` remembers each column's type and the
/// file it was first seen in.
fn read_file(
    file: &str,
    snapshot: &mut Snapshot,
    types: &mut HashMap<String, (Type, String)>,
) -> Result<(), ConnectorError> {
    let bytes = read_all(file)?;
    let bad = |e: &dyn std::fmt::Display| {
        ConnectorError::input(file, format!("not a readable Parquet file: {e}"))
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| bad(&e))?;
    let schema = builder.schema().clone();

    // Validate the schema before reading any row.
    let mut user_col = None;
    let mut columns: Vec<(usize, String, Type)> = Vec::new();
    for (i, field) in schema.fields().iter().enumerate() {
        let name = field.name();
        if columns.iter().any(|(_, n, _)| n == name)
            || (name == USER_ID_COLUMN && user_col.is_some())
        {
            return Err(ConnectorError::input(
                file,
                format!("column '{name}' appears more than once"),
            ));
        }
        let ty = trait_type(field.data_type());
        if name == USER_ID_COLUMN {
            if ty != Some(Type::Str) {
                return Err(ConnectorError::input(
                    file,
                    format!(
                        "column '{USER_ID_COLUMN}' must be a string column, found {}",
                        field.data_type()
                    ),
                ));
            }
            user_col = Some(i);
            continue;
        }
        let Some(ty) = ty else {
            return Err(ConnectorError::input(
                file,
                format!(
                    "column '{name}' has type {}, which is not supported for traits \
                     (use a string, integer, float, boolean, timestamp or date column)",
                    field.data_type()
                ),
            ));
        };
        match types.get(name.as_str()) {
            Some((known, first)) if *known != ty => {
                return Err(ConnectorError::input(
                    file,
                    format!("column '{name}' is a {ty} here but a {known} in {first}"),
                ));
            }
            Some(_) => {}
            None => {
                types.insert(name.clone(), (ty, file.to_string()));
                snapshot.schema.push((name.clone(), ty));
            }
        }
        columns.push((i, name.clone(), ty));
    }
    let Some(user_col) = user_col else {
        return Err(ConnectorError::input(
            file,
            format!("no '{USER_ID_COLUMN}' column; a snapshot needs one string column named {USER_ID_COLUMN}"),
        ));
    };

    let reader = builder.build().map_err(|e| bad(&e))?;
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let users = to_strings(file, USER_ID_COLUMN, batch.column(user_col))?;
        let mut cells: Vec<(&str, Vec<Option<Value>>)> = Vec::with_capacity(columns.len());
        for (i, name, ty) in &columns {
            cells.push((name, column_values(file, name, *ty, batch.column(*i))?));
        }
        for (row, user) in users.into_iter().enumerate() {
            let Some(user) = user.filter(|u| !u.is_empty()) else {
                snapshot.skipped_rows += 1;
                continue;
            };
            let entry = match snapshot.rows.get_mut(&user) {
                Some(entry) => {
                    snapshot.duplicate_rows += 1;
                    entry
                }
                None => snapshot.rows.entry(user).or_default(),
            };
            for (name, values) in &mut cells {
                match values.get_mut(row).and_then(Option::take) {
                    Some(v) => {
                        entry.insert(name.to_string(), v);
                    }
                    // A NULL cell is a write of NULL (segments.md, "The user row"); in a
                    // repeated row it leaves the earlier row's value.
                    None => {
                        entry.entry(name.to_string()).or_insert(Value::Null);
                    }
                }
            }
        }
    }
    Ok(())
}

fn unexpected(file: &str, column: &str, col: &ArrayRef) -> ConnectorError {
    ConnectorError::input(
        file,
        format!("column '{column}' has unexpected type {}", col.data_type()),
    )
}

/// Casts a dictionary-encoded column to its value type.
fn undictionary(file: &str, column: &str, col: &ArrayRef) -> Result<ArrayRef, ConnectorError> {
    match col.data_type() {
        DataType::Dictionary(_, values) => arrow::compute::cast(col, values).map_err(|e| {
            ConnectorError::input(file, format!("column '{column}': cannot decode: {e}"))
        }),
        _ => Ok(Arc::clone(col)),
    }
}

fn to_strings(
    file: &str,
    column: &str,
    col: &ArrayRef,
) -> Result<Vec<Option<String>>, ConnectorError> {
    let col = undictionary(file, column, col)?;
    let out = if let Some(a) = col.as_string_opt::<i32>() {
        a.iter().map(|v| v.map(str::to_string)).collect()
    } else if let Some(a) = col.as_string_opt::<i64>() {
        a.iter().map(|v| v.map(str::to_string)).collect()
    } else if let Some(a) = col.as_string_view_opt() {
        a.iter().map(|v| v.map(str::to_string)).collect()
    } else {
        return Err(unexpected(file, column, &col));
    };
    Ok(out)
}

fn column_values(
    file: &str,
    column: &str,
    ty: Type,
    col: &ArrayRef,
) -> Result<Vec<Option<Value>>, ConnectorError> {
    let col = undictionary(file, column, col)?;
    Ok(match ty {
        Type::Str => to_strings(file, column, &col)?
            .into_iter()
            .map(|v| v.map(Value::Str))
            .collect(),
        Type::Num => {
            let floats = arrow::compute::cast(&col, &DataType::Float64)
                .map_err(|_| unexpected(file, column, &col))?;
            let a = floats
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(|| unexpected(file, column, &col))?;
            a.iter()
                .map(|v| v.filter(|f| !f.is_nan()).map(Value::num))
                .collect()
        }
        Type::Bool => col
            .as_boolean_opt()
            .ok_or_else(|| unexpected(file, column, &col))?
            .iter()
            .map(|v| v.map(Value::Bool))
            .collect(),
        Type::Ts => timestamps_ms(&col)
            .ok_or_else(|| unexpected(file, column, &col))?
            .into_iter()
            .map(|v| v.map(Value::Ts))
            .collect(),
        Type::Any => return Err(unexpected(file, column, &col)),
    })
}

/// Timestamps and dates as ms since the epoch (UTC); sub-millisecond digits are
/// floored, so instants before 1970 stay in the right millisecond.
fn timestamps_ms(col: &ArrayRef) -> Option<Vec<Option<i64>>> {
    Some(match col.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => col
            .as_primitive_opt::<TimestampSecondType>()?
            .iter()
            .map(|v| v.map(|s| s.saturating_mul(1000)))
            .collect(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => col
            .as_primitive_opt::<TimestampMillisecondType>()?
            .iter()
            .collect(),
        DataType::Timestamp(TimeUnit::Microsecond, _) => col
            .as_primitive_opt::<TimestampMicrosecondType>()?
            .iter()
            .map(|v| v.map(|us| us.div_euclid(1000)))
            .collect(),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => col
            .as_primitive_opt::<TimestampNanosecondType>()?
            .iter()
            .map(|v| v.map(|ns| ns.div_euclid(1_000_000)))
            .collect(),
        DataType::Date32 => col
            .as_primitive_opt::<Date32Type>()?
            .iter()
            .map(|v| v.map(|d| i64::from(d) * 86_400_000))
            .collect(),
        DataType::Date64 => col.as_primitive_opt::<Date64Type>()?.iter().collect(),
        _ => return None,
    })
}

/// Merges two sorted maps in key order: each key with its value on either side. Snapshot
/// rows are sorted by user, so this walks two snapshots side by side in one pass.
pub fn merge_sorted<'a, K: Ord, V>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a K, Option<&'a V>, Option<&'a V>)> + 'a {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    std::iter::from_fn(move || {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        Some(match order {
            std::cmp::Ordering::Less => {
                let (k, v) = a.next()?;
                (k, Some(v), None)
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = b.next()?;
                (k, None, Some(v))
            }
            std::cmp::Ordering::Equal => {
                let ((k, va), (_, vb)) = (a.next()?, b.next()?);
                (k, Some(va), Some(vb))
            }
        })
    })
}

/// What changed from `old` to `new`: retractions and assertions of trait cells (a
/// changed cell gives both, an unchanged one nothing), and users added or removed.
pub fn diff_snapshots(old: &Snapshot, new: &Snapshot) -> SnapshotDiff {
    let empty = BTreeMap::new();
    let mut diff = SnapshotDiff::default();
    for (user, before, after) in merge_sorted(&old.rows, &new.rows) {
        match (before, after) {
            (Some(_), None) => diff.users.push((user.clone(), -1)),
            (None, Some(_)) => diff.users.push((user.clone(), 1)),
            _ => {}
        }
        let (before, after) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
        for (name, b, a) in merge_sorted(before, after) {
            if b == a {
                continue;
            }
            if let Some(b) = b {
                diff.cells.push((user.clone(), name.clone(), b.clone(), -1));
            }
            if let Some(a) = a {
                diff.cells.push((user.clone(), name.clone(), a.clone(), 1));
            }
        }
    }
    diff
}

fn arrow_type(ty: Type) -> Option<DataType> {
    Some(match ty {
        Type::Str => DataType::Utf8,
        Type::Num => DataType::Float64,
        Type::Bool => DataType::Boolean,
        Type::Ts => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        Type::Any => return None,
    })
}

/// Writes a snapshot as one Parquet file (Snappy-compressed): a `user_id` Utf8 column,
/// then one column per `schema` entry (string -> Utf8, number -> Float64, boolean ->
/// Boolean, timestamp -> Timestamp(ms, "UTC")). A trait a user lacks is null. Errors
/// ([`Fault::Input`](crate::Fault::Input)): a trait of type `any`, a column named
/// `user_id`, or a value whose type does not match its column.
pub fn write_snapshot(
    url: &str,
    rows: &BTreeMap<String, BTreeMap<String, Value>>,
    schema: &[(String, Type)],
) -> Result<(), ConnectorError> {
    let mut fields = vec![Field::new(USER_ID_COLUMN, DataType::Utf8, false)];
    for (name, ty) in schema {
        if name == USER_ID_COLUMN {
            return Err(ConnectorError::input(
                url,
                format!("'{USER_ID_COLUMN}' cannot be a trait column"),
            ));
        }
        let dt = arrow_type(*ty).ok_or_else(|| {
            ConnectorError::input(
                url,
                format!("trait '{name}' needs a concrete type, not {ty}"),
            )
        })?;
        fields.push(Field::new(name, dt, true));
    }
    let schema_ref = Arc::new(Schema::new(fields));
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut out = OutputFile::create(url)?;
    let write_err = |e| parquet_write_err(url, e);
    let mut writer =
        ArrowWriter::try_new(&mut out, Arc::clone(&schema_ref), Some(props)).map_err(write_err)?;
    let entries: Vec<(&String, &BTreeMap<String, Value>)> = rows.iter().collect();
    for chunk in entries.chunks(WRITE_BATCH_ROWS) {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
            chunk.iter().map(|(u, _)| u.as_str()),
        ))];
        for (name, ty) in schema {
            let mismatch = |user: &str, v: &Value| {
                ConnectorError::input(
                    url,
                    format!("user '{user}': trait '{name}' is a {ty} column but the value is {v}"),
                )
            };
            macro_rules! collect {
                ($variant:pat => $val:expr) => {{
                    let mut vals = Vec::with_capacity(chunk.len());
                    for (user, traits) in chunk {
                        vals.push(match traits.get(name).filter(|v| !v.is_null()) {
                            None => None,
                            Some($variant) => Some($val),
                            Some(v) => return Err(mismatch(user, v)),
                        });
                    }
                    vals
                }};
            }
            let array: ArrayRef = match ty {
                Type::Str => Arc::new(StringArray::from(collect!(Value::Str(s) => s.as_str()))),
                Type::Num => Arc::new(Float64Array::from(collect!(Value::Num(n) => n.0))),
                Type::Bool => Arc::new(BooleanArray::from(collect!(Value::Bool(b) => *b))),
                Type::Ts => Arc::new(
                    TimestampMillisecondArray::from(collect!(Value::Ts(t) => *t))
                        .with_timezone("UTC"),
                ),
                Type::Any => {
                    return Err(ConnectorError::input(
                        url,
                        format!("trait '{name}' needs a concrete type, not {ty}"),
                    ))
                }
            };
            columns.push(array);
        }
        let batch = RecordBatch::try_new(Arc::clone(&schema_ref), columns)
            .map_err(|e| ConnectorError::input(url, format!("cannot build a record batch: {e}")))?;
        writer.write(&batch).map_err(write_err)?;
    }
    writer.close().map_err(write_err)?;
    out.finish()
}
