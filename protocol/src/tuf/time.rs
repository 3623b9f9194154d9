//! UTC timestamps in TUF's `expires` format, `YYYY-MM-DDTHH:MM:SSZ`.
//!
//! The crate reads no clock: callers pass `now` as a [`UtcTime`].

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Seconds since the Unix epoch, UTC, at whole-second precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcTime(i64);

/// A string that is not `YYYY-MM-DDTHH:MM:SSZ` or not a real date.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid time {0:?}: expected YYYY-MM-DDTHH:MM:SSZ")]
pub struct TimeError(pub String);

impl UtcTime {
    /// From seconds since the Unix epoch.
    pub const fn from_unix(secs: i64) -> Self {
        UtcTime(secs)
    }

    /// Seconds since the Unix epoch.
    pub const fn unix(self) -> i64 {
        self.0
    }

    /// From a `SystemTime` (truncated to whole seconds). Pure conversion, no clock read.
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => UtcTime(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => UtcTime(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }

    /// This time plus `secs` seconds (saturating).
    pub const fn plus_seconds(self, secs: i64) -> Self {
        UtcTime(self.0.saturating_add(secs))
    }

    /// Parses `YYYY-MM-DDTHH:MM:SSZ` (the only form TUF allows).
    pub fn parse(s: &str) -> Result<Self, TimeError> {
        let err = || TimeError(s.chars().take(40).collect());
        let b = s.as_bytes();
        if b.len() != 20
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[13] != b':'
            || b[16] != b':'
            || b[19] != b'Z'
        {
            return Err(err());
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, TimeError> {
            let part = &b[r];
            if !part.iter().all(u8::is_ascii_digit) {
                return Err(err());
            }
            Ok(part
                .iter()
                .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || min > 59
            || sec > 59
        {
            return Err(err());
        }
        Ok(UtcTime(
            days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec,
        ))
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

impl Serialize for UtcTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UtcTime::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_known_instants() {
        assert_eq!(UtcTime::parse("1970-01-01T00:00:00Z").unwrap().unix(), 0);
        assert_eq!(
            UtcTime::parse("2030-01-01T00:00:00Z").unwrap().unix(),
            1_893_456_000
        );
        assert_eq!(
            UtcTime::parse("2024-02-29T23:59:59Z").unwrap().unix(),
            1_709_251_199
        );
    }

    #[test]
    fn rejects_other_time_formats_and_impossible_dates() {
        for bad in [
            "2030-01-01T00:00:00",
            "2030-01-01T00:00:00.5Z",
            "2030-01-01 00:00:00Z",
            "2030-01-01T00:00:00+00:00",
            "2023-02-29T00:00:00Z",
            "2030-13-01T00:00:00Z",
            "2030-01-01T24:00:00Z",
            "+030-01-01T00:00:00Z",
            "",
        ] {
            assert!(UtcTime::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(secs in 0i64..253_402_300_799) {
            let t = UtcTime::from_unix(secs);
            prop_assert_eq!(UtcTime::parse(&t.to_string()).unwrap(), t);
        }
    }
}
