//! Kernel timestamps are CLOCK_MONOTONIC; people and backends want wall-clock time.

fn now(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn monotonic_ns() -> u64 {
    now(libc::CLOCK_MONOTONIC)
}

/// Unix-epoch nanoseconds now.
pub fn unix_ns() -> u64 {
    now(libc::CLOCK_REALTIME)
}

/// Monotonic milliseconds, never 0 (0 can then mean "unset" in an atomic).
pub fn monotonic_ms() -> u64 {
    (monotonic_ns() / 1_000_000).max(1)
}

/// Converts monotonic to Unix-epoch nanoseconds with an offset taken once at start.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    pub fn new() -> Self {
        let mono = now(libc::CLOCK_MONOTONIC) as i128;
        let real = now(libc::CLOCK_REALTIME) as i128;
        Self {
            offset_ns: real - mono,
        }
    }

    pub fn to_unix_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }

    /// The kernel's time of a converted timestamp (exact for one this clock converted).
    pub fn to_monotonic_ns(&self, unix_ns: u64) -> u64 {
        (unix_ns as i128 - self.offset_ns).max(0) as u64
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 3339 in UTC with milliseconds, like the agent's log lines.
pub fn timestamp(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let ms = (unix_ns / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// "HH:MM:SS.ffffff" (UTC) of Unix-epoch nanoseconds: short enough for one line per event.
pub fn time_of_day(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{micros:06}",
        day / 3600,
        day % 3600 / 60,
        day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::timestamp;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            timestamp(951_782_400_999_000_000),
            "2000-02-29T00:00:00.999Z"
        );
        assert_eq!(
            timestamp(1_798_761_599_000_000_000),
            "2026-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn formats_time_of_day() {
        assert_eq!(super::time_of_day(3_723_000_004_000), "01:02:03.000004");
    }
}
