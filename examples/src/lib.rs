//! # herald-examples
//!
//! The e-commerce example: a deterministic generator of a realistic Segment-spec event
//! stream, a profile snapshot and a static list, plus the segment set that runs on them
//! (`examples/ecommerce/segments.sql`).
//!
//! [`generate`] writes into one directory:
//! - `events.jsonl`: one Segment message per line. Each user browses anonymously
//!   (`anonymousId` only), signs up (`Signed Up` + an `identify` with `email`, `plan`,
//!   `country`, `signup_at`), then has sessions of page views, `Product Viewed`,
//!   `Product Added`, `Checkout Started` and `Order Completed` (with `revenue` and
//!   `currency`); most users create a source (`Source Created`) and some upgrade their
//!   plan (a later `identify`). Lines are only roughly time-sorted (a few minutes of
//!   jitter, a few hours for "offline" devices). About 0.2% of lines are bad (invalid
//!   JSON, no user id, a track without `event`) and about 0.3% are redeliveries of an
//!   earlier line (same `messageId`), to exercise dead letters and dedup.
//! - `profiles.parquet`: the CRM export taken at [`Summary::snapshot_at`] (mid-window):
//!   `user_id`, `plan`, `country`, `lifetime_value` (float), `signup_at`
//!   (timestamp(ms, UTC)), `is_employee` (bool), for about 95% of the users signed up by
//!   then. Load it as `profiles.parquet@<snapshot_at>`.
//! - `beta.csv`: a `user_id,email` list of beta testers (some of whom never send events).
//! - `segments.sql`: a copy of the example segment set, next to `beta.csv`, because a
//!   relative `FROM CSV` path is resolved against the segment file's directory.
//!
//! The same configuration and seed always produce the same bytes.

mod journey;
mod write;

use std::path::PathBuf;

use anyhow::{bail, Context};

/// The example segment set (`examples/ecommerce/segments.sql`).
pub const SEGMENTS_SQL: &str = include_str!("../ecommerce/segments.sql");

/// What to generate.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of users (at least 1).
    pub users: usize,
    /// Number of distinct valid events; bad lines and redeliveries come on top.
    pub events: usize,
    /// Random seed.
    pub seed: u64,
    /// Start of the event window, ms since the epoch (UTC). Signups happen in the window;
    /// anonymous browsing before a signup may begin up to 3 hours before it.
    pub start_ms: i64,
    /// Length of the event window in days (> 0).
    pub days: f64,
    /// Output directory (created if missing).
    pub out: PathBuf,
}

/// What [`generate`] wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// `out/events.jsonl`.
    pub events_path: PathBuf,
    /// `out/profiles.parquet`.
    pub profiles_path: PathBuf,
    /// `out/beta.csv`.
    pub beta_path: PathBuf,
    /// `out/segments.sql`.
    pub segments_path: PathBuf,
    /// Distinct valid events written.
    pub events: u64,
    /// Redelivered lines (an earlier line again, same `messageId`).
    pub duplicates: u64,
    /// Bad lines (invalid JSON, missing user id, track without `event`).
    pub malformed: u64,
    /// All lines in `events.jsonl`.
    pub lines: u64,
    /// Rows in `profiles.parquet`.
    pub profile_rows: u64,
    /// Ids in `beta.csv`.
    pub beta_ids: u64,
    /// The instant the profile snapshot was taken (ms): load it `@` this instant.
    pub snapshot_at: i64,
    /// End of the event window (ms): a natural `--until`.
    pub end_ms: i64,
}

/// Generates the example data set into `cfg.out`. See the crate docs for the files.
pub fn generate(cfg: &Config) -> anyhow::Result<Summary> {
    if cfg.users == 0 {
        bail!("--users must be at least 1");
    }
    if cfg.users > u32::MAX as usize / 2 {
        bail!("--users must be below {}", u32::MAX / 2);
    }
    if cfg.events > u32::MAX as usize {
        bail!("--events must be below {}", u32::MAX);
    }
    if !(cfg.days.is_finite() && cfg.days > 0.0 && cfg.days <= 3650.0) {
        bail!("--days must be a number of days above 0 (and at most 3650)");
    }
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create the output directory {}", cfg.out.display()))?;
    let world = journey::simulate(cfg);
    let mut summary = Summary {
        events_path: cfg.out.join("events.jsonl"),
        profiles_path: cfg.out.join("profiles.parquet"),
        beta_path: cfg.out.join("beta.csv"),
        segments_path: cfg.out.join("segments.sql"),
        snapshot_at: world.snapshot_at,
        end_ms: world.end_ms,
        ..Summary::default()
    };
    write::events_jsonl(cfg, &world, &mut summary)?;
    summary.profile_rows = write::profiles_parquet(cfg, &world, &summary.profiles_path)?;
    summary.beta_ids = write::beta_csv(cfg, &world, &summary.beta_path)?;
    std::fs::write(&summary.segments_path, SEGMENTS_SQL)
        .with_context(|| format!("cannot write {}", summary.segments_path.display()))?;
    Ok(summary)
}

/// Formats ms since the epoch as RFC 3339 UTC with milliseconds
/// (`2026-03-01T10:00:00.000Z`), without allocating a formatter per call.
pub fn rfc3339_ms(ms: i64, out: &mut Vec<u8>) {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    use std::io::Write;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_instants_like_chrono() {
        for ms in [
            0i64,
            1_772_323_200_000,
            1_772_323_200_123,
            951_782_400_000, // 2000-02-29
            4_102_444_799_999,
            -1,
        ] {
            let mut buf = Vec::new();
            rfc3339_ms(ms, &mut buf);
            let want = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            assert_eq!(String::from_utf8(buf).unwrap(), want);
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let cfg = Config {
            users: 0,
            events: 10,
            seed: 1,
            start_ms: 0,
            days: 1.0,
            out: PathBuf::from("/nonexistent/never"),
        };
        assert!(generate(&cfg).is_err());
        let cfg = Config {
            users: 1,
            days: 0.0,
            ..cfg
        };
        assert!(generate(&cfg).is_err());
    }
}
