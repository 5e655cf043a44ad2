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
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
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
    #[test]
    fn formats_time_of_day() {
        assert_eq!(super::time_of_day(3_723_000_004_000), "01:02:03.000004");
    }
}
