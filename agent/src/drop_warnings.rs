//! Drops said out loud: the first loss at any stage is logged within a second, naming the stage
//! and what to do, then at most once per `EVERY` per stage (with the count since the last line),
//! so a person watching the terminal learns of it without waiting for the summary.

use std::{
    collections::HashMap,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use agent_common::counters;

use crate::metrics::Metrics;

/// Per stage, at most one warning this often.
pub const EVERY: Duration = Duration::from_secs(30);

struct Stage {
    seen: u64,
    unreported: u64,
    warned: Option<Instant>,
}

pub struct DropWatch {
    stages: HashMap<String, Stage>,
}

/// What a stage's loss means and what the user can do about it.
fn advice(stage: &str, exporting: bool) -> &'static str {
    match stage {
        "kernel.ringbuf_full" => {
            "events lost in the kernel: the agent reads slower than the host sends; raise --ring-buffer-bytes or trace less (--pid, --cgroup, --port)"
        }
        "kernel.conn_map_full" | "user.conn_table_full" => {
            "connections not tracked: more are open than --max-connections; raise it"
        }
        "kernel.args_map_full" => "syscalls not captured: too many in flight at once",
        "kernel.option_no_space" => {
            "trace context not carried: a TCP segment had no room for the option"
        }
        "user.channel_full" => {
            "events lost between the ring buffer and the parsers: the agent is short of CPU; give it more, or trace less (--pid, --cgroup, --port)"
        }
        "user.decode_errors" => "kernel records that did not decode (a kernel/agent mismatch?)",
        "user.export_queue_full" if exporting => {
            "spans lost before export: the OTLP endpoint takes them slower than they are made; check it, or raise --export-queue"
        }
        "user.export_queue_full" => {
            "spans lost before output: --output is written slower than spans are made"
        }
        "user.export_failed" => {
            "spans the OTLP endpoint did not accept after retrying for --export-retry seconds: see the export errors above"
        }
        _ => "see loupe_kernel_events_total on --metrics-addr",
    }
}

impl Default for DropWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl DropWatch {
    pub fn new() -> Self {
        Self {
            stages: HashMap::new(),
        }
    }

    /// The drop counters by stage, now.
    fn read(m: &Metrics) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (i, v) in m.kernel().iter().enumerate() {
            if counters::is_drop(i as u32) {
                out.push((format!("kernel.{}", counters::NAMES[i]), *v));
            }
        }
        let u = &m.user;
        out.push((
            "user.decode_errors".to_string(),
            u.decode_errors.load(Ordering::Relaxed),
        ));
        out.push((
            "user.channel_full".to_string(),
            u.channel_full.load(Ordering::Relaxed),
        ));
        let full = u.table.lock().map(|t| t.rejected_full).unwrap_or(0);
        out.push(("user.conn_table_full".to_string(), full));
        if let Some(e) = &m.export {
            out.push((
                "user.export_queue_full".to_string(),
                e.queue_full.load(Ordering::Relaxed),
            ));
            out.push((
                "user.export_failed".to_string(),
                e.export_failed.load(Ordering::Relaxed),
            ));
        }
        out
    }

    /// The warnings due at `now`.
    pub fn check(&mut self, m: &Metrics, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        for (stage, value) in Self::read(m) {
            // Counters start at zero with the agent: anything already counted is news.
            let s = self.stages.entry(stage.clone()).or_insert(Stage {
                seen: 0,
                unreported: 0,
                warned: None,
            });
            s.unreported += value.saturating_sub(s.seen);
            s.seen = value;
            let due = s.warned.is_none_or(|w| now.duration_since(w) >= EVERY);
            if s.unreported > 0 && due {
                let since = match s.warned {
                    None => "so far".to_string(),
                    Some(w) => format!("in the last {} s", now.duration_since(w).as_secs()),
                };
                lines.push(format!(
                    "dropping at {stage}: {} {since}; {}",
                    s.unreported,
                    advice(&stage, m.exporting)
                ));
                s.unreported = 0;
                s.warned = Some(now);
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportStats;
    use std::sync::Arc;

    #[test]
    fn the_first_drop_is_said_at_once_then_at_most_every_period_with_its_count() {
        let mut m = Metrics::new(None);
        let e = Arc::new(ExportStats::default());
        m.export = Some(e.clone());
        let mut w = DropWatch::new();
        let t0 = Instant::now();
        assert!(w.check(&m, t0).is_empty(), "no drops, no words");
        e.queue_full.fetch_add(5, Ordering::Relaxed);
        let first = w.check(&m, t0 + Duration::from_secs(1));
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(
            first[0].starts_with("dropping at user.export_queue_full: 5 so far;"),
            "{first:?}"
        );
        assert!(
            first[0].contains("--output"),
            "console mode names its own output: {first:?}"
        );
        e.queue_full.fetch_add(7, Ordering::Relaxed);
        assert!(
            w.check(&m, t0 + Duration::from_secs(2)).is_empty(),
            "rate-limited"
        );
        e.queue_full.fetch_add(1, Ordering::Relaxed);
        let later = w.check(&m, t0 + Duration::from_secs(31));
        assert_eq!(later.len(), 1, "{later:?}");
        assert!(later[0].contains(": 8 in the last 30 s;"), "{later:?}");
        assert!(
            w.check(&m, t0 + Duration::from_secs(90)).is_empty(),
            "nothing new"
        );
    }

    #[test]
    fn drops_counted_before_the_first_look_are_reported() {
        let mut m = Metrics::new(None);
        let e = Arc::new(ExportStats::default());
        e.export_failed.fetch_add(3, Ordering::Relaxed);
        m.export = Some(e);
        m.exporting = true;
        let lines = DropWatch::new().check(&m, Instant::now());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("export_failed: 3 so far; spans the OTLP endpoint"),
            "{lines:?}"
        );
    }
}
