//! Profile snapshots: round trip through Parquet, every supported Arrow type, directory
//! reads, type errors and snapshot diffs.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Date64Array, Decimal128Array, DictionaryArray,
    Float32Array, Int64Array, Int8Array, LargeStringArray, RecordBatch, StringArray,
    StringViewArray, TimestampNanosecondArray, TimestampSecondArray, UInt64Array,
};
use arrow::datatypes::Int32Type;
use herald_connectors::snapshot::{diff_snapshots, read_snapshot, write_snapshot, Snapshot};
use herald_connectors::Fault;
use herald_operators::time::parse_rfc3339_ms;
use herald_operators::value::{Type, Value};
use parquet::arrow::ArrowWriter;

fn write_batch(path: &std::path::Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn ts(s: &str) -> i64 {
    parse_rfc3339_ms(s).unwrap()
}

fn row(cells: &[(&str, Value)]) -> BTreeMap<String, Value> {
    cells
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn write_then_read_round_trips_every_type_and_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("snap/profiles.parquet");
    let url = url.to_str().unwrap();
    let schema = vec![
        ("plan".to_string(), Type::Str),
        ("ltv".to_string(), Type::Num),
        ("vip".to_string(), Type::Bool),
        ("signed_up".to_string(), Type::Ts),
        ("First Name".to_string(), Type::Str),
    ];
    let mut rows = BTreeMap::new();
    rows.insert(
        "u1".to_string(),
        row(&[
            ("plan", Value::Str("pro".into())),
            ("ltv", Value::num(1234.5)),
            ("vip", Value::Bool(true)),
            ("signed_up", Value::Ts(ts("2026-01-02T03:04:05.678Z"))),
            ("First Name", Value::Str("Ada".into())),
        ]),
    );
    // Absent and NULL cells both read back as NULL: the file has every column, and a NULL
    // cell is a write of NULL.
    rows.insert(
        "u2".to_string(),
        row(&[("plan", Value::Str("free".into())), ("vip", Value::Null)]),
    );
    rows.insert("u3".to_string(), BTreeMap::new());
    rows.insert(
        "u4".to_string(),
        row(&[("signed_up", Value::Ts(ts("1969-12-31T23:59:59.999Z")))]),
    );
    write_snapshot(url, &rows, &schema).unwrap();
    let snap = read_snapshot(url).unwrap();
    assert_eq!(snap.schema, schema);
    let expected: BTreeMap<String, BTreeMap<String, Value>> = rows
        .iter()
        .map(|(user, cells)| {
            let full = schema
                .iter()
                .map(|(name, _)| {
                    (
                        name.clone(),
                        cells.get(name).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect();
            (user.clone(), full)
        })
        .collect();
    assert_eq!(snap.rows, expected);
    assert_eq!((snap.skipped_rows, snap.duplicate_rows), (0, 0));

    // Type mismatches and `any` columns are refused when writing.
    let mut bad = rows.clone();
    bad.get_mut("u3")
        .unwrap()
        .insert("ltv".into(), Value::Str("lots".into()));
    let err = write_snapshot(url, &bad, &schema).unwrap_err();
    assert!(
        err.to_string().contains("u3") && err.to_string().contains("ltv"),
        "{err}"
    );
    let err = write_snapshot(url, &rows, &[("x".to_string(), Type::Any)]).unwrap_err();
    assert_eq!(err.fault(), Fault::Input);
    // The failed writes left the earlier file intact.
    assert_eq!(read_snapshot(url).unwrap().rows, expected);
}

#[test]
fn maps_every_supported_arrow_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.parquet");
    let keys = arrow::array::Int32Array::from(vec![0, 1, 0]);
    let dict_values = Arc::new(StringArray::from(vec!["gold", "silver"]));
    write_batch(
        &path,
        vec![
            (
                "user_id",
                Arc::new(LargeStringArray::from(vec![Some("a"), Some("b"), None])) as ArrayRef,
            ),
            (
                "i8",
                Arc::new(Int8Array::from(vec![Some(-3), None, Some(1)])),
            ),
            ("u64", Arc::new(UInt64Array::from(vec![7u64, 8, 9]))),
            (
                "i64",
                Arc::new(Int64Array::from(vec![Some(1), Some(2), Some(3)])),
            ),
            (
                "f32",
                Arc::new(Float32Array::from(vec![Some(1.5), Some(f32::NAN), None])),
            ),
            (
                "flag",
                Arc::new(BooleanArray::from(vec![Some(false), None, Some(true)])),
            ),
            (
                "name",
                Arc::new(StringViewArray::from(vec![Some("x"), Some("y"), Some("z")])),
            ),
            (
                "tier",
                Arc::new(DictionaryArray::<Int32Type>::try_new(keys, dict_values).unwrap()),
            ),
            (
                "day",
                Arc::new(Date32Array::from(vec![Some(1), Some(-1), None])),
            ),
            (
                "day64",
                Arc::new(Date64Array::from(vec![Some(86_400_000), None, None])),
            ),
            (
                "ns",
                Arc::new(
                    TimestampNanosecondArray::from(vec![Some(1_500_000_999), Some(-1), None])
                        .with_timezone("+05:00"),
                ),
            ),
            (
                "secs",
                Arc::new(TimestampSecondArray::from(vec![Some(2), None, None])),
            ),
        ],
    );
    let snap = read_snapshot(path.to_str().unwrap()).unwrap();
    let types: Vec<(&str, Type)> = snap.schema.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    assert_eq!(
        types,
        vec![
            ("i8", Type::Num),
            ("u64", Type::Num),
            ("i64", Type::Num),
            ("f32", Type::Num),
            ("flag", Type::Bool),
            ("name", Type::Str),
            ("tier", Type::Str),
            ("day", Type::Ts),
            ("day64", Type::Ts),
            ("ns", Type::Ts),
            ("secs", Type::Ts),
        ]
    );
    assert_eq!(snap.skipped_rows, 1);
    assert_eq!(snap.rows.len(), 2);
    assert_eq!(
        snap.rows["a"],
        row(&[
            ("i8", Value::num(-3.0)),
            ("u64", Value::num(7.0)),
            ("i64", Value::num(1.0)),
            ("f32", Value::num(1.5)),
            ("flag", Value::Bool(false)),
            ("name", Value::Str("x".into())),
            ("tier", Value::Str("gold".into())),
            ("day", Value::Ts(86_400_000)),
            ("day64", Value::Ts(86_400_000)),
            ("ns", Value::Ts(1_500)),
            ("secs", Value::Ts(2_000)),
        ])
    );
    // NaN and NULL are NULL; sub-millisecond instants before 1970 floor.
    assert_eq!(
        snap.rows["b"],
        row(&[
            ("i8", Value::Null),
            ("f32", Value::Null),
            ("flag", Value::Null),
            ("day64", Value::Null),
            ("secs", Value::Null),
            ("u64", Value::num(8.0)),
            ("i64", Value::num(2.0)),
            ("name", Value::Str("y".into())),
            ("tier", Value::Str("silver".into())),
            ("day", Value::Ts(-86_400_000)),
            ("ns", Value::Ts(-1)),
        ])
    );
}

#[test]
fn unsupported_or_missing_columns_are_input_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let dec = dir.path().join("decimal.parquet");
    write_batch(
        &dec,
        vec![
            (
                "user_id",
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
            ),
            (
                "balance",
                Arc::new(
                    Decimal128Array::from(vec![12345])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
            ),
        ],
    );
    let err = read_snapshot(dec.to_str().unwrap()).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.fault(), Fault::Input);
    assert!(
        text.contains("decimal.parquet") && text.contains("balance") && text.contains("Decimal128"),
        "{text}"
    );

    let nouser = dir.path().join("nouser.parquet");
    write_batch(
        &nouser,
        vec![("id", Arc::new(StringArray::from(vec!["a"])) as ArrayRef)],
    );
    let err = read_snapshot(nouser.to_str().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("nouser.parquet") && err.to_string().contains("user_id"),
        "{err}"
    );

    let intuser = dir.path().join("intuser.parquet");
    write_batch(
        &intuser,
        vec![("user_id", Arc::new(Int64Array::from(vec![1])) as ArrayRef)],
    );
    let err = read_snapshot(intuser.to_str().unwrap()).unwrap_err();
    assert!(err.to_string().contains("must be a string column"), "{err}");

    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet at all").unwrap();
    let err = read_snapshot(junk.to_str().unwrap()).unwrap_err();
    assert!(err.to_string().contains("junk.parquet"), "{err}");
    assert_eq!(err.fault(), Fault::Input);

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = read_snapshot(empty.to_str().unwrap()).unwrap_err();
    assert_eq!(err.fault(), Fault::Input);
}

#[test]
fn a_directory_is_read_as_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("snap");
    let schema_a = vec![("plan".to_string(), Type::Str)];
    let schema_b = vec![
        ("ltv".to_string(), Type::Num),
        ("plan".to_string(), Type::Str),
    ];
    let mut a = BTreeMap::new();
    a.insert(
        "u1".to_string(),
        row(&[("plan", Value::Str("free".into()))]),
    );
    let mut b = BTreeMap::new();
    b.insert("u1".to_string(), row(&[("ltv", Value::num(3.0))]));
    b.insert("u2".to_string(), row(&[("plan", Value::Str("pro".into()))]));
    write_snapshot(base.join("part-0.parquet").to_str().unwrap(), &a, &schema_a).unwrap();
    write_snapshot(
        base.join("sub/part-1.parquet").to_str().unwrap(),
        &b,
        &schema_b,
    )
    .unwrap();
    std::fs::write(base.join("_SUCCESS"), b"").unwrap();
    std::fs::write(base.join("README.txt"), b"hi").unwrap();
    let snap = read_snapshot(base.to_str().unwrap()).unwrap();
    assert_eq!(
        snap.schema,
        vec![
            ("plan".to_string(), Type::Str),
            ("ltv".to_string(), Type::Num)
        ]
    );
    assert_eq!(snap.duplicate_rows, 1);
    assert_eq!(
        snap.rows["u1"],
        row(&[
            ("plan", Value::Str("free".into())),
            ("ltv", Value::num(3.0))
        ])
    );
    let url = format!("file://{}/", base.display());
    assert_eq!(read_snapshot(&url).unwrap(), snap);

    // The same column with different types in two files is an error naming both.
    let c = vec![("plan".to_string(), Type::Num)];
    write_snapshot(
        base.join("part-2.parquet").to_str().unwrap(),
        &BTreeMap::new(),
        &c,
    )
    .unwrap();
    let err = read_snapshot(base.to_str().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("part-2.parquet") && err.to_string().contains("part-0.parquet"),
        "{err}"
    );
}

#[test]
fn diffs_report_changed_cells_and_user_presence_only() {
    let snap = |rows: Vec<(&str, Vec<(&str, Value)>)>| Snapshot {
        rows: rows
            .into_iter()
            .map(|(u, cells)| (u.to_string(), row(&cells)))
            .collect(),
        ..Snapshot::default()
    };
    let old = snap(vec![
        (
            "u1",
            vec![
                ("plan", Value::Str("free".into())),
                ("ltv", Value::num(1.0)),
            ],
        ),
        ("u2", vec![("plan", Value::Str("pro".into()))]),
        ("u3", vec![("plan", Value::Str("pro".into()))]),
    ]);
    let new = snap(vec![
        (
            "u1",
            vec![
                ("plan", Value::Str("pro".into())),
                ("ltv", Value::num(1.0)),
                ("vip", Value::Bool(true)),
            ],
        ),
        ("u3", vec![]),
        ("u4", vec![("ltv", Value::num(2.0))]),
    ]);
    let d = diff_snapshots(&old, &new);
    let s = |x: &str| x.to_string();
    assert_eq!(
        d.cells,
        vec![
            (s("u1"), s("plan"), Value::Str("free".into()), -1),
            (s("u1"), s("plan"), Value::Str("pro".into()), 1),
            (s("u1"), s("vip"), Value::Bool(true), 1),
            (s("u2"), s("plan"), Value::Str("pro".into()), -1),
            (s("u3"), s("plan"), Value::Str("pro".into()), -1),
            (s("u4"), s("ltv"), Value::num(2.0), 1),
        ]
    );
    assert_eq!(d.users, vec![(s("u2"), -1), (s("u4"), 1)]);
    assert_eq!(diff_snapshots(&new, &new), Default::default());
}
