//! Instants and intervals: milliseconds since the Unix epoch, UTC.
//!
//! Owns RFC 3339 parsing and formatting (always `…T…Z` with milliseconds on output),
//! interval literals (`'7 days'`), and the mapping between instants and the dataflow's
//! logical time ([`Time`], unsigned milliseconds).

use chrono::{DateTime, SecondsFormat, Utc};

/// The dataflow's logical time: milliseconds since the Unix epoch. Instants before 1970
/// are clamped to 0 when they become dataflow times; they still compare exactly as values.
pub type Time = u64;

/// Converts an instant (ms, signed) to a dataflow time, clamping at the epoch.
pub fn to_time(ms: i64) -> Time {
    ms.max(0) as Time
}

/// Parses an RFC 3339 instant into milliseconds since the epoch (sub-millisecond digits
/// are truncated).
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|dt| dt.with_timezone(&Utc).timestamp_millis())
        .map_err(|e| format!("'{s}' is not an RFC 3339 instant ({e})"))
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds:
/// `2026-03-01T10:00:00.000Z`.
pub fn format_rfc3339_ms(ms: i64) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => format!("{ms}ms"),
    }
}

/// Parses an interval literal's text, `'N unit'`, into milliseconds. Units: second(s),
/// minute(s), hour(s), day(s), week(s); a day is 86 400 s. `N` may be fractional
/// (`'1.5 hours'`) and the result is rounded to the millisecond.
pub fn parse_interval_ms(text: &str) -> Result<i64, String> {
    let mut parts = text.split_whitespace();
    let (Some(n), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "interval '{text}' must be a number and a unit, like '7 days'"
        ));
    };
    let n: f64 = n
        .parse()
        .map_err(|_| format!("interval '{text}' does not start with a number"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("interval '{text}' must be a non-negative number"));
    }
    let unit_ms: f64 = match unit.to_ascii_lowercase().as_str() {
        "second" | "seconds" => 1_000.0,
        "minute" | "minutes" => 60_000.0,
        "hour" | "hours" => 3_600_000.0,
        "day" | "days" => 86_400_000.0,
        "week" | "weeks" => 7.0 * 86_400_000.0,
        other => {
            return Err(format!(
                "interval unit '{other}' is not one of second, minute, hour, day, week"
            ))
        }
    };
    let ms = (n * unit_ms).round();
    if ms > i64::MAX as f64 / 4.0 {
        return Err(format!("interval '{text}' is too large"));
    }
    Ok(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_instants_with_milliseconds() {
        let t = parse_rfc3339_ms("2026-03-01T10:00:00.123+01:00").unwrap();
        assert_eq!(format_rfc3339_ms(t), "2026-03-01T09:00:00.123Z");
    }

    #[test]
    fn parses_interval_units() {
        assert_eq!(parse_interval_ms("7 days").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_interval_ms("1 week").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_interval_ms("90 SECONDS").unwrap(), 90_000);
        assert!(parse_interval_ms("3 fortnights")
            .unwrap_err()
            .contains("fortnights"));
        assert!(parse_interval_ms("days").is_err());
    }
}
