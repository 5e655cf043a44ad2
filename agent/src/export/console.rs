//! The default view with no backend: each completed trace as an indented tree on the terminal,
//! printed once no new span of it arrived for a moment.

use std::{
    collections::HashMap,
    io::Write,
    time::{Duration, Instant},
};

use crate::{
    export::{Resolved, hex},
    trace::span::SpanKind,
};

/// How long a trace must be quiet before it is printed.
const QUIET: Duration = Duration::from_millis(1500);
/// Traces held at most; the oldest is printed early beyond that.
const MAX_PENDING: usize = 10_000;

#[derive(Debug, Clone)]
struct Line {
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start: u64,
    text: String,
}

struct Pending {
    lines: Vec<Line>,
    last: Instant,
}

pub struct ConsoleTree<W: Write> {
    out: W,
    traces: HashMap<[u8; 16], Pending>,
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

impl<W: Write> ConsoleTree<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            traces: HashMap::new(),
        }
    }

    pub fn add(&mut self, r: &Resolved<'_>) {
        let s = r.span;
        let status = match (&s.error, &s.status) {
            (Some(e), _) => format!("ERROR {e}"),
            (None, Some(st)) => st.clone(),
            _ => String::new(),
        };
        let kind = match s.kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        };
        let text = format!(
            "{} [{}] {kind} {}  {}  {status}",
            r.process.service_name,
            s.pid,
            s.name,
            duration(s.end_unix_ns.saturating_sub(s.start_unix_ns)),
        );
        let entry = self.traces.entry(s.trace_id).or_insert_with(|| Pending {
            lines: Vec::new(),
            last: Instant::now(),
        });
        entry.last = Instant::now();
        entry.lines.push(Line {
            span_id: s.span_id,
            parent: s.parent_span_id,
            start: s.start_unix_ns,
            text,
        });
        if self.traces.len() > MAX_PENDING
            && let Some(oldest) = self
                .traces
                .iter()
                .min_by_key(|(_, p)| p.last)
                .map(|(k, _)| *k)
        {
            self.print(oldest);
        }
    }

    /// Prints the traces quiet since `QUIET` before `now`.
    pub fn print_quiet(&mut self, now: Instant) {
        let mut due: Vec<([u8; 16], Instant)> = self
            .traces
            .iter()
            .filter(|(_, p)| now.duration_since(p.last) >= QUIET)
            .map(|(k, p)| (*k, p.last))
            .collect();
        due.sort_by_key(|(_, t)| *t);
        for (id, _) in due {
            self.print(id);
        }
        let _ = self.out.flush();
    }

    pub fn print_all(&mut self) {
        let ids: Vec<[u8; 16]> = self.traces.keys().copied().collect();
        for id in ids {
            self.print(id);
        }
        let _ = self.out.flush();
    }

    fn print(&mut self, trace_id: [u8; 16]) {
        let Some(mut p) = self.traces.remove(&trace_id) else {
            return;
        };
        p.lines.sort_by_key(|l| l.start);
        let _ = writeln!(self.out, "trace {}", hex(&trace_id));
        let ids: Vec<[u8; 8]> = p.lines.iter().map(|l| l.span_id).collect();
        let roots: Vec<usize> = (0..p.lines.len())
            .filter(|&i| p.lines[i].parent.is_none_or(|par| !ids.contains(&par)))
            .collect();
        for root in roots {
            let note = match p.lines[root].parent {
                Some(par) => format!("  (child of {})", hex(&par)),
                None => String::new(),
            };
            self.print_subtree(&p.lines, root, 1, &note);
        }
    }

    fn print_subtree(&mut self, lines: &[Line], i: usize, depth: usize, note: &str) {
        let _ = writeln!(
            self.out,
            "{}└─ {}{note}",
            "   ".repeat(depth - 1),
            lines[i].text
        );
        // Depth is bounded by the number of spans: a cycle of ids cannot recurse forever.
        if depth > lines.len() {
            return;
        }
        for child in
            (0..lines.len()).filter(|&c| c != i && lines[c].parent == Some(lines[i].span_id))
        {
            self.print_subtree(lines, child, depth + 1, "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::Value;
    use crate::{process::ProcessInfo, trace::span::SpanRecord};

    fn span(id: u8, parent: Option<u8>, start: u64, kind: SpanKind, name: &str) -> SpanRecord {
        SpanRecord {
            trace_id: [1; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            parent_is_remote: false,
            trace_state: String::new(),
            name: name.into(),
            kind,
            start_unix_ns: start,
            end_unix_ns: start + 1_500_000,
            attributes: vec![("http.response.status_code", Value::Int(200))],
            error: None,
            status: Some("200".into()),
            pid: 7,
            comm: "c".into(),
        }
    }

    #[test]
    fn prints_an_indented_tree() {
        let p = ProcessInfo {
            pid: 7,
            service_name: "api".into(),
            executable_name: "x".into(),
            command_line: "x".into(),
            ..ProcessInfo::default()
        };
        let mut buf = Vec::new();
        let mut c = ConsoleTree::new(&mut buf);
        for s in [
            span(2, Some(1), 20, SpanKind::Client, "GET /b"),
            span(1, None, 10, SpanKind::Server, "GET /a"),
            span(3, Some(2), 30, SpanKind::Server, "GET /b"),
        ] {
            c.add(&Resolved {
                span: &s,
                process: &p,
            });
        }
        c.print_all();
        let text = String::from_utf8(buf).unwrap();
        let expected = "trace 01010101010101010101010101010101\n\
                        └─ api [7] SERVER GET /a  1.50 ms  200\n   \
                        └─ api [7] CLIENT GET /b  1.50 ms  200\n      \
                        └─ api [7] SERVER GET /b  1.50 ms  200\n";
        assert_eq!(text, expected);
    }
}
