//! `loupe top`: a live view for a person on the node — services with their request rate, error
//! share and p50/p99, and the edges between them, refreshed in place. It reads the RED metrics
//! (the agent's own, or with `--from` a running agent's `/metrics`), so it needs no backend.

pub mod model;

use std::{
    collections::VecDeque,
    io::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row as TableRow, Table},
};

use model::{Row, Snapshot, SortBy};

/// The window rates and quantiles are computed over.
const WINDOW: Duration = Duration::from_secs(10);
/// Log lines kept for the bottom of the screen (the agent's log cannot go to the terminal the
/// view is drawn on).
const LOG_LINES: usize = 3;

/// Where the RED metrics come from.
pub enum Source {
    /// This agent's own metrics.
    Local(crate::red::SharedStore),
    /// A running agent's `--metrics-addr` (host:port).
    Remote(String),
}

impl Source {
    fn text(&self) -> anyhow::Result<String> {
        match self {
            Source::Local(r) => Ok(crate::red::prometheus::render(r)),
            Source::Remote(addr) => scrape(addr),
        }
    }
}

fn scrape(addr: &str) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| {
        anyhow::anyhow!("cannot reach a Loupe agent's metrics on {addr}: {e}; start it with --metrics-addr {addr}")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// The agent's log lines while the view owns the terminal.
#[derive(Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

pub struct LogTailWriter {
    tail: LogTail,
    buf: Vec<u8>,
}

impl std::io::Write for LogTailWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogTailWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        if let Ok(mut lines) = self.tail.0.lock() {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                lines.push_back(line.to_string());
                while lines.len() > LOG_LINES {
                    lines.pop_front();
                }
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogTail {
    type Writer = LogTailWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogTailWriter {
            tail: self.clone(),
            buf: Vec::new(),
        }
    }
}

/// Runs the view until q, Esc or Ctrl-C, or until `stop` is set (a signal). Blocking.
pub fn run(
    source: Source,
    logs: LogTail,
    refresh: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    // Fails early, before the terminal is taken, when a remote agent is not there.
    let first = Snapshot::parse(&source.text()?);
    let mut terminal = ratatui::init();
    let mut history: VecDeque<(Instant, Snapshot)> = VecDeque::from([(Instant::now(), first)]);
    let mut sort = SortBy::default();
    let result = loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break Ok(());
        }
        let now = Instant::now();
        let error = match source.text() {
            Ok(text) => {
                history.push_back((now, Snapshot::parse(&text)));
                None
            }
            Err(e) => Some(format!("{e:#}")),
        };
        while history.len() > 2 && now.duration_since(history[1].0) >= WINDOW {
            history.pop_front();
        }
        let (t0, before) = history.front().expect("never empty");
        let (_, latest) = history.back().expect("never empty");
        let seconds = history
            .back()
            .map(|(t, _)| t.duration_since(*t0).as_secs_f64())
            .unwrap_or(0.0);
        let (services, edges) = model::rows(latest, before, seconds, sort);
        let log_lines = logs.lines();
        if let Err(e) = terminal.draw(|f| {
            draw(
                f,
                &services,
                &edges,
                sort,
                seconds,
                &log_lines,
                error.as_deref(),
            )
        }) {
            break Err(e.into());
        }
        let deadline = Instant::now() + refresh;
        let mut quit = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left.min(Duration::from_millis(200)))? {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            if let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => quit = true,
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        quit = true
                    }
                    KeyCode::Char('s') => {
                        sort = sort.next();
                        break;
                    }
                    _ => {}
                }
                if quit {
                    break;
                }
            }
        }
        if quit {
            break Ok(());
        }
    };
    ratatui::restore();
    result
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
        None => "-".into(),
    }
}

fn table<'a>(title: &'a str, first: &'a str, rows: &[Row]) -> Table<'a> {
    let header = TableRow::new([first, "REQ/S", "ERR%", "P50", "P99", "TOTAL"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let body: Vec<TableRow> = rows
        .iter()
        .map(|r| {
            TableRow::new([
                r.name.clone(),
                format!("{:.1}", r.rate),
                r.error_share
                    .map_or("-".into(), |e| format!("{:.1}", e * 100.0)),
                ms(r.p50),
                ms(r.p99),
                r.total.to_string(),
            ])
        })
        .collect();
    Table::new(
        body,
        [
            Constraint::Min(24),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(10),
        ],
    )
    .header(header)
    .block(Block::bordered().title(title))
}

fn draw(
    f: &mut Frame,
    services: &[Row],
    edges: &[Row],
    sort: SortBy,
    seconds: f64,
    logs: &[String],
    error: Option<&str>,
) {
    let [head, top, bottom, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(55),
        Constraint::Min(5),
        Constraint::Length(LOG_LINES as u16),
    ])
    .areas(f.area());
    let status = match error {
        Some(e) => format!("loupe top — {e}"),
        None => format!(
            "loupe top — last {seconds:.0} s, sorted by {} — s: sort, q: quit",
            sort.label()
        ),
    };
    f.render_widget(Paragraph::new(Line::from(status)), head);
    f.render_widget(table(" services ", "SERVICE", services), top);
    f.render_widget(table(" edges ", "CLIENT → SERVER", edges), bottom);
    let lines: Vec<Line> = logs.iter().map(|l| Line::from(l.as_str())).collect();
    f.render_widget(Paragraph::new(lines), foot);
}
