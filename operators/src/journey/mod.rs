//! Journeys: per-user programs that run inside the dataflow (`spec/journeys.md`).
//!
//! - [`mod@file`]: YAML journey files into checked definitions, errors naming the journey,
//!   the step path and the problem.
//! - [`compile`]: journeys compiled with the segment set: `when` conditions become hidden
//!   segments of the same plan, steps a flat program per journey.
//! - [`machine`]: what happens to one user's journeys at one instant; pure, no clock.
//! - [`operator`]: the timely operator that runs the machine keyed by user, with timers
//!   held as a capability at the earliest pending instant.
//! - [`quiet`]: quiet hours in the user's time zone.

pub mod compile;
pub mod file;
pub mod machine;
pub mod operator;
pub mod quiet;

pub use compile::{compile_journeys, compile_journeys_over, JourneySet};
pub use file::{parse_journeys, JourneyError};
pub use machine::{JIn, JOut, JourneyRow, Kind, MessageAction};

#[cfg(test)]
mod tests;
