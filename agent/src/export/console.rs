//! The default view with no backend: completed traces as trees on the terminal.
//!
//! The terminal is for a person, so it gets a bounded number of traces per second, errors first
//! and then the slowest, and every 10 s a line saying how many were not shown. The other outputs
//! (`--output`, OTLP) still get every span: this choice is the view's alone. Keeping it cheap
//! matters as much as keeping it short: a busy host makes tens of thousands of spans a second,
//! and a console that formats and writes each one falls behind and fills the export queue.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    export::hex,
    trace::span::{SpanKind, SpanRecord, Value},
};

/// How long a trace must be quiet before it is complete.
const QUIET: Duration = Duration::from_millis(1500);
/// Traces being assembled at most; beyond, the oldest is taken as complete.
const MAX_PENDING: usize = 10_000;
/// Spans of one trace printed as one tree at most. A trace that never goes quiet (a worker whose
/// every request sends the next) would otherwise grow without bound in memory and print as a
/// chain of millions of lines: beyond this, it is printed in pieces.
const MAX_LINES: usize = 100;
/// Tree levels indented at most; deeper spans are printed at this indentation.
const MAX_INDENT: usize = 16;
/// How often the "not shown" line is printed (when something was not shown).
const NOTE_EVERY: Duration = Duration::from_secs(10);

/// What the view did, for the summary and the metrics.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    pub traces_printed: AtomicU64,
    pub traces_not_shown: AtomicU64,
}

#[derive(Debug, Clone)]
struct Line {
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start: u64,
    end: u64,
    pid: u32,
    comm: Arc<str>,
    kind: SpanKind,
    name: Arc<str>,
    /// `ERROR …`, a status code, or empty.
    status: String,
    error: bool,
    /// Where a CLIENT span went.
    peer: Option<String>,
}

struct Pending {
    lines: Vec<Line>,
    last: Instant,
}

/// A complete trace competing for this window's places: errors rank first, then duration.
struct Ranked {
    key: (bool, u64, Reverse<u64>),
    trace_id: [u8; 16],
    lines: Vec<Line>,
    /// A piece of a longer trace (see `MAX_LINES`).
    full: bool,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

/// The service name of a pid, asked only for the traces that get printed.
pub type ServiceName = Box<dyn FnMut(u32, &str) -> String + Send>;

pub struct ConsoleTree<W: Write> {
    out: W,
    pending: HashMap<[u8; 16], Pending>,
    /// One entry per pending trace, roughly oldest activity first: completion is found without
    /// scanning every pending trace.
    order: VecDeque<([u8; 16], Instant)>,
    /// The best traces of the current window (a min-heap: the weakest is replaced first).
    chosen: BinaryHeap<Reverse<Ranked>>,
    /// Traces per window; `usize::MAX` prints everything.
    budget: usize,
    per_second: u32,
    seq: u64,
    not_shown: u64,
    not_shown_errors: u64,
    last_note: Instant,
    /// Where the user gets every span, for the "not shown" line.
    elsewhere: &'static str,
    service_name: ServiceName,
    stats: Arc<ConsoleStats>,
}

fn duration(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.2} s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}

fn peer(s: &SpanRecord) -> Option<String> {
    let attr = |k: &str| {
        s.attributes
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| match v {
                Value::Str(s) => s.clone(),
                Value::Static(s) => (*s).to_string(),
                Value::Shared(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
            })
    };
    match (attr("server.address"), attr("server.port")) {
        (Some(a), Some(p)) if a.contains(':') => Some(format!("[{a}]:{p}")),
        (Some(a), Some(p)) => Some(format!("{a}:{p}")),
        (Some(a), None) => Some(a),
        _ => attr("network.peer.address"),
    }
}

impl<W: Write> ConsoleTree<W> {
    /// `per_second` traces at most (0: all of them); `elsewhere` names where every span goes.
    pub fn new(
        out: W,
        per_second: u32,
        elsewhere: &'static str,
        service_name: ServiceName,
        stats: Arc<ConsoleStats>,
    ) -> Self {
        Self {
            out,
            pending: HashMap::new(),
            order: VecDeque::new(),
            chosen: BinaryHeap::new(),
            budget: if per_second == 0 {
                usize::MAX
            } else {
                per_second as usize
            },
            per_second,
            seq: 0,
            not_shown: 0,
            not_shown_errors: 0,
            last_note: Instant::now(),
            elsewhere,
            service_name,
            stats,
        }
    }

    pub fn add(&mut self, s: &SpanRecord, now: Instant) {
        let status = match (&s.error, &s.status) {
            (Some(e), _) => format!("ERROR {e}"),
            (None, Some(st)) => st.to_string(),
            _ => String::new(),
        };
        let line = Line {
            span_id: s.span_id,
            parent: s.parent_span_id,
            start: s.start_unix_ns,
            end: s.end_unix_ns,
            pid: s.pid,
            comm: s.comm.clone(),
            kind: s.kind,
            name: s.name.clone(),
            status,
            error: s.error.is_some(),
            peer: (s.kind == SpanKind::Client).then(|| peer(s)).flatten(),
        };
        match self.pending.get_mut(&s.trace_id) {
            Some(p) => {
                p.last = now;
                p.lines.push(line);
                if p.lines.len() >= MAX_LINES {
                    // Its later spans start the next piece (their parents then show as
                    // "child of").
                    self.complete(s.trace_id);
                }
            }
            None => {
                self.pending.insert(
                    s.trace_id,
                    Pending {
                        lines: vec![line],
                        last: now,
                    },
                );
                self.order.push_back((s.trace_id, now));
            }
        }
        while self.pending.len() > MAX_PENDING {
            let Some((id, _)) = self.order.pop_front() else {
                break;
            };
            self.complete(id);
        }
    }

    /// Once per window (a second): traces quiet since `QUIET` are complete; the chosen ones are
    /// printed, and the "not shown" line when it is due.
    pub fn tick(&mut self, now: Instant) {
        while let Some(&(id, stamp)) = self.order.front() {
            if now.duration_since(stamp) < QUIET {
                break;
            }
            self.order.pop_front();
            match self.pending.get(&id) {
                Some(p) if now.duration_since(p.last) < QUIET => {
                    let last = p.last;
                    self.order.push_back((id, last));
                }
                Some(_) => self.complete(id),
                None => {}
            }
        }
        self.print_chosen();
        if now.duration_since(self.last_note) >= NOTE_EVERY {
            self.note(now);
        }
        let _ = self.out.flush();
    }

    /// At exit: everything pending is complete; the last window and note are printed.
    pub fn finish(&mut self) {
        while let Some((id, _)) = self.order.pop_front() {
            self.complete(id);
        }
        self.print_chosen();
        self.note(Instant::now());
        let _ = self.out.flush();
    }

    fn complete(&mut self, trace_id: [u8; 16]) {
        let Some(p) = self.pending.remove(&trace_id) else {
            return;
        };
        let full = p.lines.len() >= MAX_LINES;
        let error = p.lines.iter().any(|l| l.error);
        let first = p.lines.iter().map(|l| l.start).min().unwrap_or(0);
        let last = p.lines.iter().map(|l| l.end).max().unwrap_or(0);
        self.seq += 1;
        let ranked = Ranked {
            // Earlier traces win ties, so that an even flood shows a steady sample.
            key: (error, last.saturating_sub(first), Reverse(self.seq)),
            trace_id,
            lines: p.lines,
            full,
        };
        if self.chosen.len() < self.budget {
            self.chosen.push(Reverse(ranked));
            return;
        }
        let weakest = self.chosen.peek().map(|Reverse(r)| r.key);
        let dropped = if weakest.is_some_and(|w| ranked.key > w) {
            let Some(Reverse(out)) = self.chosen.pop() else {
                return;
            };
            self.chosen.push(Reverse(ranked));
            out
        } else {
            ranked
        };
        self.not_shown += 1;
        if dropped.key.0 {
            self.not_shown_errors += 1;
        }
        self.stats.traces_not_shown.fetch_add(1, Ordering::Relaxed);
    }

    fn print_chosen(&mut self) {
        let mut chosen: Vec<Ranked> = std::mem::take(&mut self.chosen)
            .into_iter()
            .map(|Reverse(r)| r)
            .collect();
        chosen.sort_by_key(|r| r.lines.iter().map(|l| l.start).min());
        for r in chosen {
            self.print(r.trace_id, r.lines);
            if r.full {
                let _ = writeln!(
                    self.out,
                    "   … more spans of this trace not shown here (it goes on past {MAX_LINES}); {} gets every span",
                    self.elsewhere
                );
            }
        }
    }

    fn note(&mut self, now: Instant) {
        if self.not_shown > 0 {
            let errors = match self.not_shown_errors {
                0 => String::new(),
                n => format!(" ({n} with errors)"),
            };
            let _ = writeln!(
                self.out,
                "… {} traces not shown in the last {} s{errors}: the terminal shows up to {} a second, errors and slowest first (--console-rate); {} gets every span",
                self.not_shown,
                now.duration_since(self.last_note).as_secs().max(1),
                self.per_second,
                self.elsewhere,
            );
        }
        self.not_shown = 0;
        self.not_shown_errors = 0;
        self.last_note = now;
    }

    fn print(&mut self, trace_id: [u8; 16], mut lines: Vec<Line>) {
        lines.sort_by_key(|l| l.start);
        let Some(first) = lines.first() else {
            return;
        };
        let _ = writeln!(
            self.out,
            "trace {}  {}",
            hex(&trace_id),
            crate::clock::timestamp(first.start)
        );
        self.stats.traces_printed.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<[u8; 8]> = lines.iter().map(|l| l.span_id).collect();
        let roots: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].parent.is_none_or(|par| !ids.contains(&par)))
            .collect();
        let mut names: HashMap<u32, String> = HashMap::new();
        for (n, &root) in roots.iter().enumerate() {
            let note = match lines[root].parent {
                Some(par) => format!("  (child of {})", hex(&par)),
                None => String::new(),
            };
            let last = n + 1 == roots.len();
            self.print_subtree(&lines, root, "", last, 1, &note, &mut names);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn print_subtree(
        &mut self,
        lines: &[Line],
        i: usize,
        prefix: &str,
        last: bool,
        depth: usize,
        note: &str,
        names: &mut HashMap<u32, String>,
    ) {
        let l = &lines[i];
        let service = names
            .entry(l.pid)
            .or_insert_with(|| (self.service_name)(l.pid, &l.comm))
            .clone();
        let kind = match l.kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        };
        let peer = l
            .peer
            .as_ref()
            .map(|p| format!(" → {p}"))
            .unwrap_or_default();
        let text = format!(
            "{prefix}{} {service} [{}] {kind} {}{peer}  {}  {}",
            if last { "└─" } else { "├─" },
            l.pid,
            l.name,
            duration(l.end.saturating_sub(l.start)),
            l.status,
        );
        let _ = writeln!(self.out, "{}{note}", text.trim_end());
        // Depth is bounded by the number of spans (at most `MAX_LINES`): a cycle of ids cannot
        // recurse forever.
        if depth > lines.len() {
            return;
        }
        let children: Vec<usize> = (0..lines.len())
            .filter(|&c| c != i && lines[c].parent == Some(l.span_id))
            .collect();
        let inner = if depth < MAX_INDENT {
            format!("{prefix}{}", if last { "   " } else { "│  " })
        } else {
            prefix.to_string()
        };
        for (n, &child) in children.iter().enumerate() {
            let last = n + 1 == children.len();
            self.print_subtree(lines, child, &inner, last, depth + 1, "", names);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(
        trace: u8,
        id: u8,
        parent: Option<u8>,
        start: u64,
        kind: SpanKind,
        name: &str,
    ) -> SpanRecord {
        SpanRecord {
            trace_id: [trace; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            parent_is_remote: false,
            trace_state: String::new(),
            name: name.into(),
            kind,
            start_unix_ns: start,
            end_unix_ns: start + 1_500_000,
            attributes: vec![
                ("http.response.status_code", Value::Int(200)),
                ("server.address", Value::Str("10.0.0.9".into())),
                ("server.port", Value::Int(8080)),
            ],
            error: None,
            status: Some("200".into()),
            pid: 7,
            comm: "c".into(),
        }
    }

    fn tree(per_second: u32) -> (ConsoleTree<Vec<u8>>, Arc<ConsoleStats>) {
        let stats = Arc::new(ConsoleStats::default());
        let c = ConsoleTree::new(
            Vec::new(),
            per_second,
            "--output FILE or OTLP",
            Box::new(|_, _| "api".to_string()),
            stats.clone(),
        );
        (c, stats)
    }

    #[test]
    fn prints_a_tree_with_siblings_time_and_peers() {
        let (mut c, _) = tree(10);
        let t0 = 1_764_604_325_123_000_000; // 2025-12-01T15:52:05.123Z
        let now = Instant::now();
        for s in [
            span(1, 2, Some(1), t0 + 20, SpanKind::Client, "GET /b"),
            span(1, 1, None, t0 + 10, SpanKind::Server, "GET /a"),
            span(1, 3, Some(2), t0 + 30, SpanKind::Server, "GET /b"),
            span(1, 4, Some(1), t0 + 40, SpanKind::Client, "SELECT items"),
        ] {
            c.add(&s, now);
        }
        c.finish();
        let text = String::from_utf8(c.out.clone()).unwrap();
        let expected = "trace 01010101010101010101010101010101  2025-12-01T15:52:05.123Z\n\
                        └─ api [7] SERVER GET /a  1.50 ms  200\n   \
                        ├─ api [7] CLIENT GET /b → 10.0.0.9:8080  1.50 ms  200\n   \
                        │  └─ api [7] SERVER GET /b  1.50 ms  200\n   \
                        └─ api [7] CLIENT SELECT items → 10.0.0.9:8080  1.50 ms  200\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_flood_prints_the_budget_errors_and_slowest_first_and_says_what_it_skipped() {
        let (mut c, stats) = tree(5);
        let start = Instant::now();
        for t in 0..200u8 {
            let mut s = span(t, 1, None, u64::from(t) * 1000, SpanKind::Server, "GET /x");
            // Trace 7 failed; trace 150 was the slowest.
            if t == 7 {
                s.error = Some("500".into());
            }
            if t == 150 {
                s.end_unix_ns = s.start_unix_ns + 9_000_000_000;
            }
            c.add(&s, start);
        }
        c.tick(start + Duration::from_secs(2));
        let text = String::from_utf8(std::mem::take(&mut c.out)).unwrap();
        let printed: Vec<&str> = text.lines().filter(|l| l.starts_with("trace ")).collect();
        assert_eq!(printed.len(), 5, "{text}");
        assert!(text.contains("ERROR 500"), "{text}");
        assert!(text.contains("9.00 s"), "{text}");
        assert_eq!(stats.traces_not_shown.load(Ordering::Relaxed), 195);
        assert_eq!(stats.traces_printed.load(Ordering::Relaxed), 5);
        // The "not shown" line comes once the note period has passed, then resets.
        c.tick(start + NOTE_EVERY + Duration::from_secs(1));
        let text = String::from_utf8(std::mem::take(&mut c.out)).unwrap();
        assert!(
            text.starts_with("… 195 traces not shown in the last"),
            "{text}"
        );
        assert!(
            text.contains("--output FILE or OTLP gets every span"),
            "{text}"
        );
        c.finish();
        assert!(c.out.is_empty(), "nothing more to say");
    }

    /// A process that is its own downstream (a worker that handles a message and sends the next
    /// one) makes one trace that never goes quiet and grows a parent chain as long as the run.
    #[test]
    fn an_endless_chain_is_printed_in_bounded_pieces() {
        let (mut c, stats) = tree(10);
        let now = Instant::now();
        let chain = 200_000u64;
        for i in 0..chain {
            let mut s = span(1, 0, None, i * 10, SpanKind::Server, "GET /next");
            s.span_id = (i + 1).to_be_bytes();
            s.parent_span_id = (i > 0).then(|| i.to_be_bytes());
            c.add(&s, now);
            assert!(
                c.pending.values().all(|p| p.lines.len() <= MAX_LINES),
                "bounded at {i}"
            );
        }
        c.finish();
        let text = String::from_utf8(std::mem::take(&mut c.out)).unwrap();
        let longest = text.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(longest < 200, "indentation is bounded: {longest}");
        assert!(
            text.contains("more spans of this trace not shown"),
            "{}",
            &text[..2000.min(text.len())]
        );
        // Every piece is a trace of its own in the view's accounting.
        let pieces = chain.div_ceil(MAX_LINES as u64);
        let seen = stats.traces_printed.load(Ordering::Relaxed)
            + stats.traces_not_shown.load(Ordering::Relaxed);
        assert_eq!(seen, pieces);
    }

    #[test]
    fn an_unbounded_view_prints_everything() {
        let (mut c, stats) = tree(0);
        let now = Instant::now();
        for t in 0..50u8 {
            c.add(&span(t, 1, None, 0, SpanKind::Server, "GET /x"), now);
        }
        c.finish();
        assert_eq!(stats.traces_printed.load(Ordering::Relaxed), 50);
        assert_eq!(stats.traces_not_shown.load(Ordering::Relaxed), 0);
    }
}
