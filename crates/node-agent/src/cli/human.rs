//! Human-friendly durations, sizes and ages for the CLI's tables (`3m12s`, `1.2 GiB`).
//!
//! Formatting only: no I/O, no clock of its own (the caller passes "now"). JSON output
//! never goes through here; it keeps exact numbers and RFC 3339 times.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A duration in its two largest units: `850ms`, `12s`, `3m12s`, `2h05m`, `3d04h`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{mins:02}m")
    } else if mins > 0 {
        format!("{mins}m{secs:02}s")
    } else {
        format!("{secs}s")
    }
}

/// Bytes in binary units with one decimal: `512 B`, `1.2 KiB`, `512.0 MiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// How long ago an RFC 3339 time was (`3m12s`); `-` when it does not parse, `0s` when
/// it is in the future (clock skew between the agent and the reader).
pub fn age(rfc3339: &str, now: DateTime<Utc>) -> String {
    match DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => duration(
            (now - t.with_timezone(&Utc))
                .to_std()
                .unwrap_or(Duration::ZERO),
        ),
        Err(_) => "-".into(),
    }
}

/// An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` in UTC; the input as given when it does
/// not parse.
pub fn time(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(12)), "12s");
        assert_eq!(duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(
            duration(Duration::from_secs(2 * 3600 + 5 * 60 + 7)),
            "2h05m"
        );
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d04h"
        );
    }

    #[test]
    fn sizes_are_binary_units() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(512 << 20), "512.0 MiB");
        assert_eq!(bytes(1_288_490_189), "1.2 GiB");
    }

    #[test]
    fn ages_count_from_now_and_tolerate_skew_and_garbage() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T23:40:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(age("2026-11-29T23:36:48Z", now), "3m12s");
        assert_eq!(age("2026-11-29T23:41:00Z", now), "0ms");
        assert_eq!(age("yesterday", now), "-");
        assert_eq!(time("2026-11-29T23:36:48.123+00:00"), "2026-11-29 23:36:48");
    }
}
