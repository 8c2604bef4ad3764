//! Quiet hours in the user's time zone.
//!
//! Owns [`quiet_until`]: whether an instant falls in a daily quiet period given in local
//! wall-clock minutes, and if so the instant the period ends. Time zones are IANA names
//! (the `timezone` trait); NULL or an unknown name means UTC. Across DST changes the end is
//! the first instant the local clock shows `to` (or later, when a spring-forward gap skips
//! `to`); in a fall-back overlap the earlier of the two instants.

use chrono::{DateTime, Days, LocalResult, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// The zone of a `timezone` trait value; UTC when absent or unknown.
pub fn zone(name: Option<&str>) -> Tz {
    name.and_then(|n| n.parse::<Tz>().ok()).unwrap_or(Tz::UTC)
}

/// If `at_ms` is inside the quiet period `[from, to)` (minutes of the local day; `from >
/// to` crosses midnight), the instant (ms) it ends; else `None`.
pub fn quiet_until(at_ms: i64, (from, to): (u32, u32), tz: Tz) -> Option<i64> {
    let utc = DateTime::<Utc>::from_timestamp_millis(at_ms)?;
    let local = utc.with_timezone(&tz).naive_local();
    let minute = local.hour() * 60 + local.minute();
    let quiet = if from < to {
        from <= minute && minute < to
    } else {
        minute >= from || minute < to
    };
    if !quiet {
        return None;
    }
    // The period ends at the next local `to`: today if we are before it, else tomorrow.
    let day = if minute < to {
        local.date()
    } else {
        local.date().checked_add_days(Days::new(1))?
    };
    let end = NaiveDateTime::new(day, NaiveTime::from_hms_opt(to / 60, to % 60, 0)?);
    resolve(tz, end).map(|e| e.max(at_ms + 1))
}

/// The first instant at or after the local time `t` in `tz`.
fn resolve(tz: Tz, t: NaiveDateTime) -> Option<i64> {
    // A spring-forward gap is at most a few hours; step over it a minute at a time.
    let mut probe = t;
    for _ in 0..=24 * 60 {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(d) => return Some(d.timestamp_millis()),
            LocalResult::Ambiguous(a, b) => {
                return Some(a.timestamp_millis().min(b.timestamp_millis()))
            }
            LocalResult::None => probe += chrono::Duration::minutes(1),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{format_rfc3339_ms, parse_rfc3339_ms};

    fn at(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    const NIGHT: (u32, u32) = (22 * 60, 8 * 60);

    #[test]
    fn quiet_across_midnight_in_utc() {
        assert_eq!(
            quiet_until(at("2026-03-01T21:59:59.999Z"), NIGHT, Tz::UTC),
            None
        );
        assert_eq!(
            quiet_until(at("2026-03-01T22:00:00Z"), NIGHT, Tz::UTC),
            Some(at("2026-03-02T08:00:00Z"))
        );
        assert_eq!(
            quiet_until(at("2026-03-02T03:00:00Z"), NIGHT, Tz::UTC),
            Some(at("2026-03-02T08:00:00Z"))
        );
        assert_eq!(
            quiet_until(at("2026-03-02T08:00:00Z"), NIGHT, Tz::UTC),
            None
        );
    }

    #[test]
    fn quiet_in_the_users_zone() {
        let tz = zone(Some("Asia/Kolkata")); // UTC+05:30
                                             // 17:00 UTC is 22:30 in India: quiet until 08:00 IST = 02:30 UTC.
        let end = quiet_until(at("2026-03-01T17:00:00Z"), NIGHT, tz).unwrap();
        assert_eq!(format_rfc3339_ms(end), "2026-03-02T02:30:00.000Z");
        assert_eq!(zone(Some("Not/AZone")), Tz::UTC);
        assert_eq!(zone(None), Tz::UTC);
    }

    #[test]
    fn dst_spring_forward_gap_and_fall_back_overlap() {
        let ny = zone(Some("America/New_York"));
        // 2026-03-08: clocks jump 02:00 -> 03:00. Quiet 01:00-02:30: 02:30 does not exist,
        // so the period ends at 03:00 EDT = 07:00 UTC.
        let end = quiet_until(at("2026-03-08T06:30:00Z"), (60, 150), ny).unwrap(); // 01:30 EST
        assert_eq!(format_rfc3339_ms(end), "2026-03-08T07:00:00.000Z");
        // 2026-11-01: 01:00-02:00 happens twice. Quiet 00:00-01:30 ends at the first 01:30
        // (EDT, 05:30 UTC).
        let end = quiet_until(at("2026-11-01T04:10:00Z"), (0, 90), ny).unwrap(); // 00:10 EDT
        assert_eq!(format_rfc3339_ms(end), "2026-11-01T05:30:00.000Z");
        // Over a night that includes the fall-back, 22:00-08:00 ends at 08:00 EST = 13:00 UTC.
        let end = quiet_until(at("2026-11-01T03:00:00Z"), NIGHT, ny).unwrap(); // 23:00 EDT
        assert_eq!(format_rfc3339_ms(end), "2026-11-01T13:00:00.000Z");
    }
}
