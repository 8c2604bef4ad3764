//! # herald-operators
//!
//! Herald's pure dataflow logic: no Kafka, no object store, no tokio.
//!
//! - [`change`]: the membership change record every output carries.
//! - [`value`] and [`time`]: the scalar values of the segment language and instants in ms.
//! - [`event`]: Segment-spec messages, the acceptance rules and event field lookups.
//! - [`lang`]: the segment language: syntax tree, parser with positioned errors, type checker.
//! - `plan`: compiles a segment file into slots (one per distinct aggregate and trait,
//!   shared by every segment that uses it) and evaluates segments as functions of time.
//! - [`project`]: the part of an event the segment state reads, and a parser straight to it.
//! - `state`: one worker's per-user segment state and the evaluation of a user at an instant.
//! - [`why`]: why a user is or is not in a segment at an instant (explain).
//! - `dataflow`: the keyed timely operator over that state that keeps every segment's
//!   membership exact as inputs arrive and as time passes.

pub mod change;
pub mod dataflow;
pub mod dedup;
pub mod eval;
pub mod event;
pub mod journey;
pub mod lang;
pub mod msgid;
pub mod plan;
pub mod project;
pub mod state;
pub mod time;
pub mod value;
pub mod why;

pub use lang::ast;
