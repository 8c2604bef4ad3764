//! # herald-connectors
//!
//! Herald's I/O for the replay engine: reading events, profile snapshots and static
//! lists from local files or object stores, and writing the replay's outputs. The API is
//! blocking; object_store's async calls run on a small internal tokio runtime, so
//! callers are plain threads. Every error is a [`ConnectorError`] that names the file or
//! URL and says, through [`ConnectorError::fault`], whether the user's input or an
//! external system is at fault.
//!
//! Connector families are cargo features (all on by default): `s3` (`s3://` URLs),
//! `postgres` (the PostgreSQL modules and the tables' loads), `notify` (notifications),
//! `kafka` (the Kafka notification channel). Local files, Parquet and CSV are always in.
//!
//! - [`store`]: locations (plain paths, `file://` and `s3://` URLs) opened as object
//!   stores; whole-object reads and atomic writes, listing, and [`store::OutputFile`],
//!   a streaming writer that publishes its file when finished.
//! - [`events`]: event JSONL files parsed in parallel into [`herald_operators::event::Event`]s
//!   with their positions; rejected messages become [`events::DeadLetter`]s with a
//!   per-reason count, and duplicate `messageId`s within the dedup horizon are dropped
//!   deterministically (first occurrence in input order wins).
//! - [`postgres`]: idempotent loads of segment changes into a PostgreSQL-protocol warehouse.
//! - [`profile_sync`]: a warehouse query's result written atomically as a profile
//!   snapshot under the snapshots prefix.
//! - [`audience`]: the user ids a warehouse audience's query returns.
//! - [`notify`]: templates, the outbox, channel connectors and the delivery engine.
//! - [`snapshot`]: profile snapshots (`user_id` plus one column per trait) read from one
//!   Parquet file or every `*.parquet` under a prefix, typed from the Arrow schema;
//!   the difference between two snapshots as cell and user-presence changes; and a
//!   writer for tests, examples and benchmarks.
//! - [`tables`]: the warehouse tables (events archive, segment changes, journey events,
//!   messages, delivery outcomes) as date/hour-partitioned Parquet and idempotent
//!   PostgreSQL loads; the events archive read back for replay.
//! - [`csvlist`]: static segment lists, the user ids in a CSV file's `user_id` column
//!   (or its first column).
//! - [`sink`]: the replay's outputs: segment membership changes as JSONL or Parquet, and
//!   dead letters as JSONL.

#[cfg(feature = "postgres")]
pub mod audience;
pub mod csvlist;
pub mod error;
pub mod events;
pub mod journey_sink;
#[cfg(feature = "notify")]
pub mod notify;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub mod profile_sync;
pub mod sink;
pub mod snapshot;
pub mod store;
pub mod tables;

pub use error::{ConnectorError, Fault};
