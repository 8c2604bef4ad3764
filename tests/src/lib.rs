//! # herald-tests
//!
//! Herald's cross-crate test support:
//!
//! - [`mod@reference`]: a naive, independent evaluator of the segment language
//!   ([`members_at`] over a [`World`]), the oracle the incremental engine is checked against.
//! - [`gen`]: deterministic random inputs for property tests: event streams, segment
//!   files (as source text, so they go through the real parser) and profile snapshots.
//!
//! The integration tests under `tests/` (property tests, golden files, CLI runs) use both.

pub mod gen;
pub mod journey_reference;
pub mod reference;

#[cfg(test)]
mod example_tests;
#[cfg(test)]
mod gen_tests;
#[cfg(test)]
mod reference_tests;

pub use reference::{members_at, Snapshot, World};
