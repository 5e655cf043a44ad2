//! `loupe capture`: one line per data event, the first thing to run to see what Loupe sees.

use std::io::Write;

use agent_common::{conn, syscall};
use base64::Engine as _;
use serde::Serialize;

use crate::{
    clock::{WallClock, time_of_day},
    conn::{ConnInfo, Segment, Segments},
    decode::{CloseEvent, DataEvent, Direction},
    pipeline::Sink,
};

/// Characters of payload shown per line in the text view.
const PREVIEW: usize = 80;

pub enum Format {
    Text,
    /// JSON lines with the payload in base64: for scripts and the end-to-end tests.
    Json,
}

pub struct CapturePrinter<W: Write> {
    out: W,
    format: Format,
    clock: WallClock,
    /// Secret-bearing header values and query values are masked unless the user asks.
    redact: bool,
}

impl<W: Write> CapturePrinter<W> {
    pub fn new(out: W, format: Format, redact: bool) -> Self {
        Self {
            out,
            format,
            clock: WallClock::new(),
            redact,
        }
    }
}

fn protocol_name(p: u8) -> &'static str {
    match p {
        conn::PROTO_HTTP1 => "http1",
        conn::PROTO_HTTP2 => "http2",
        _ => "unknown",
    }
}

/// Printable prefix: ASCII as is, CR/LF/TAB escaped, other bytes as `.`.
pub fn preview(data: &[u8], max: usize) -> String {
    let mut s = String::with_capacity(max + 8);
    for &b in data.iter().take(max) {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push('.'),
        }
    }
    if data.len() > max {
        s.push('…');
    }
    s
}

#[derive(Serialize)]
struct DataLine<'a> {
    r#type: &'static str,
    ts_unix_ns: u64,
    pid: u32,
    tid: u32,
    comm: &'a str,
    conn: String,
    local: String,
    remote: String,
    role: &'static str,
    protocol: &'static str,
    direction: &'static str,
    syscall: &'static str,
    seq: u64,
    bytes: u32,
    captured: usize,
    truncated: bool,
    no_payload: bool,
    midstream: bool,
    /// Bytes before this event that were never seen.
    lost_before: u64,
    payload_b64: String,
}

#[derive(Serialize)]
struct CloseLine<'a> {
    r#type: &'static str,
    ts_unix_ns: Option<u64>,
    pid: u32,
    comm: &'a str,
    conn: String,
    local: String,
    remote: String,
    role: &'static str,
    /// Stream lengths (send, recv) as the kernel counted them; absent on idle eviction.
    totals: Option<[u64; 2]>,
    evicted: bool,
}

fn conn_id(info: &ConnInfo) -> String {
    format!("{:x}-{:x}", info.key.sk, info.key.generation)
}

impl<W: Write> Sink for CapturePrinter<W> {
    fn data(&mut self, conn: &ConnInfo, ev: &DataEvent, dir: Direction, segments: Segments) {
        let lost_before = match segments.first() {
            Some(Segment::Gap(n)) => *n,
            _ => 0,
        };
        let mut payload = Vec::new();
        for seg in &segments {
            if let Segment::Data(b) = seg {
                payload.extend_from_slice(b);
            }
        }
        // What was captured, before masking changes the length.
        let captured = payload.len();
        if self.redact
            && let Some(masked) = crate::redact::payload(&payload)
        {
            payload = masked;
        }
        let ts = self.clock.to_unix_ns(ev.ts_ns);
        let result = match self.format {
            Format::Json => {
                let line = DataLine {
                    r#type: "data",
                    ts_unix_ns: ts,
                    pid: ev.pid,
                    tid: ev.tid,
                    comm: ev.comm.as_str(),
                    conn: conn_id(conn),
                    local: conn.local.to_string(),
                    remote: conn.remote.to_string(),
                    role: conn.role.as_str(),
                    protocol: protocol_name(conn.protocol),
                    direction: dir.as_str(),
                    syscall: syscall::name(ev.syscall),
                    seq: ev.seq,
                    bytes: ev.bytes,
                    captured,
                    truncated: ev.truncated,
                    no_payload: ev.no_payload,
                    midstream: conn.midstream,
                    lost_before,
                    payload_b64: base64::engine::general_purpose::STANDARD.encode(&payload),
                };
                serde_json::to_writer(&mut self.out, &line)
                    .map_err(std::io::Error::other)
                    .and_then(|()| self.out.write_all(b"\n"))
            }
            Format::Text => {
                let arrow = if dir == Direction::Send { "->" } else { "<-" };
                let mut notes = String::new();
                if ev.truncated {
                    notes.push_str(" [truncated]");
                }
                if ev.no_payload {
                    notes.push_str(" [no payload]");
                }
                if lost_before > 0 {
                    notes.push_str(&format!(" [{lost_before}B lost before]"));
                }
                writeln!(
                    self.out,
                    "{} {}[{}/{}] {} {} {} {} {} {} {}B{} \"{}\"",
                    time_of_day(ts),
                    ev.comm,
                    ev.pid,
                    ev.tid,
                    conn.local,
                    arrow,
                    conn.remote,
                    conn.role.as_str(),
                    dir.as_str(),
                    syscall::name(ev.syscall),
                    ev.bytes,
                    notes,
                    preview(&payload, PREVIEW),
                )
            }
        };
        if let Err(err) = result {
            tracing::warn!("cannot write capture output: {err}");
        }
    }

    fn closed(&mut self, conn: &ConnInfo, ev: Option<&CloseEvent>) {
        let result = match self.format {
            Format::Json => {
                let line = CloseLine {
                    r#type: "close",
                    ts_unix_ns: ev.map(|e| self.clock.to_unix_ns(e.ts_ns)),
                    pid: conn.pid,
                    comm: &conn.comm,
                    conn: conn_id(conn),
                    local: conn.local.to_string(),
                    remote: conn.remote.to_string(),
                    role: conn.role.as_str(),
                    totals: ev.map(|e| e.totals),
                    evicted: ev.is_none(),
                };
                serde_json::to_writer(&mut self.out, &line)
                    .map_err(std::io::Error::other)
                    .and_then(|()| self.out.write_all(b"\n"))
            }
            Format::Text => {
                let what = match ev {
                    Some(e) => format!("closed (sent {}B, received {}B)", e.totals[0], e.totals[1]),
                    None => "evicted (idle)".to_string(),
                };
                let ts = ev
                    .map(|e| time_of_day(self.clock.to_unix_ns(e.ts_ns)))
                    .unwrap_or_default();
                writeln!(
                    self.out,
                    "{ts} {}[{}] {} -- {} {what}",
                    conn.comm, conn.pid, conn.local, conn.remote
                )
            }
        };
        if let Err(err) = result {
            tracing::warn!("cannot write capture output: {err}");
        }
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::preview;

    #[test]
    fn preview_escapes_and_truncates() {
        assert_eq!(preview(b"GET / HTTP/1.1\r\n", 80), "GET / HTTP/1.1\\r\\n");
        assert_eq!(preview(&[0, 0xff, b'a'], 80), "..a");
        assert_eq!(preview(b"abcdef", 3), "abc…");
    }
}
