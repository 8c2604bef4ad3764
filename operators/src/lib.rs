//! # herald-operators
//!
//! Herald's pure dataflow logic: no Kafka, no object store, no tokio.
//!
//! - [`value`] and [`time`]: the scalar values of the segment language and instants in ms.
//! - [`event`]: Segment-spec messages, the acceptance rules and event field lookups.
//! - [`lang`]: the segment language: syntax tree, parser with positioned errors, type checker.
//! - `plan`: compiles a segment file into slots (one per distinct aggregate and trait,
//!   shared by every segment that uses it) and evaluates segments as functions of time.
//! - `dataflow`: the timely/differential operators that keep every segment's membership
//!   exact as facts arrive and as time passes.

pub mod dataflow;
pub mod door;
pub mod eval;
pub mod event;
pub mod journey;
pub mod lang;
pub mod plan;
pub mod time;
pub mod value;

pub use lang::ast;
