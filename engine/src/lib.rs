//! # herald-engine
//!
//! Herald's runtime, a thin layer over `herald-operators` (pure dataflow logic) and
//! `herald-connectors` (I/O):
//!
//! - [`driver`]: runs the segment dataflow on timely workers in event time and collects
//!   the membership changes.
//! - [`replay`]: the `herald replay` job: read segment file, events, snapshots and lists;
//!   run the driver; write changes (JSONL + Parquet) and dead letters; summarise.
//! - [`check`]: the `herald check` command: validate a segment file and explain its plan.
//! - [`explain`]: `herald explain`: why a user was or was not in a segment at an instant,
//!   from files.
//! - [`config`]: `herald.toml`, the typed configuration of `herald run`.
//! - [`preview`]: `herald template render`: a template rendered for one user.
//! - [`live`]: the `herald run` service: Kafka and HTTP in, the dataflow on the wall
//!   clock, changes out to files and Kafka, the query and ops API.
//!
//! Features: `live` (`herald run` and everything it talks to: `config`, `live`,
//! `preview`), `postgres` (`herald replay --postgres`, `herald sync-profiles`), `s3`;
//! all on by default. Without them the crate is the replay engine over local files.

pub mod check;
#[cfg(feature = "live")]
pub mod config;
pub mod driver;
pub mod explain;
#[cfg(feature = "live")]
pub mod live;
#[cfg(feature = "live")]
pub mod preview;
pub mod replay;
pub mod report;

/// Errors of the engine. Each says whose fault it is: the user's input, an external
/// system, or Herald itself.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A command-line or configuration mistake (user input; fix and retry).
    #[error("{0}")]
    Usage(String),
    /// A segment file that does not parse or check (user input).
    #[error("{path}:{err}")]
    Segments {
        /// The segment file.
        path: String,
        /// What is wrong and where.
        err: herald_operators::lang::parse::SegmentError,
    },
    /// A journey file that does not parse or check (user input).
    #[error("{path}: {err}")]
    Journeys {
        /// The journey file.
        path: String,
        /// Which journey, where in it, and what is wrong.
        err: herald_operators::journey::JourneyError,
    },
    /// An external system Herald needs (a Kafka broker, the warehouse, a server) cannot
    /// be reached or refused the request: not the user's input; retry once it is back.
    /// Exits with 69 (`EX_UNAVAILABLE`), not 2.
    #[error("{0}")]
    Unavailable(String),
    /// Reading or writing a file or object failed (external system; a retry may help).
    #[error(transparent)]
    Io(#[from] herald_connectors::ConnectorError),
    /// The dataflow failed (internal).
    #[error("dataflow failed: {0}")]
    Dataflow(String),
}
