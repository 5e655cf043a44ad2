//! `--output FILE`: one span per line, as JSON, for scripts.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write as _},
    path::Path,
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    export::{Resolved, hex},
    trace::span::{SpanKind, Value},
};

pub struct JsonLines {
    out: BufWriter<File>,
    host_name: String,
}

#[derive(Serialize)]
struct Line<'a> {
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    name: &'a str,
    kind: SpanKind,
    start_unix_ns: u64,
    end_unix_ns: u64,
    status: &'static str,
    error_type: Option<&'a str>,
    resource: BTreeMap<&'a str, Value>,
    attributes: BTreeMap<&'static str, &'a Value>,
}

impl JsonLines {
    /// Opens `path` for spans. An existing regular file that is not empty is refused unless
    /// `append` (a rerun must not destroy the last capture); pipes and devices are written as
    /// they are.
    pub fn create(path: &Path, host_name: &str, append: bool) -> anyhow::Result<Self> {
        let existing = std::fs::metadata(path).ok();
        if !append
            && existing
                .as_ref()
                .is_some_and(|m| m.is_file() && m.len() > 0)
        {
            anyhow::bail!(
                "--output {} already exists: remove it, choose another path, or add --append to add to it",
                path.display()
            );
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot write --output {}: choose a writable path",
                    path.display()
                )
            })?;
        Ok(Self {
            out: BufWriter::new(file),
            host_name: host_name.to_string(),
        })
    }

    pub fn write(&mut self, r: &Resolved<'_>) {
        let s = r.span;
        let p = r.process;
        let mut resource = BTreeMap::from([
            ("service.name", Value::Str(p.service_name.clone())),
            ("process.pid", Value::Int(p.pid.into())),
            (
                "process.executable.name",
                Value::Str(p.executable_name.clone()),
            ),
            ("process.command_line", Value::Str(p.command_line.clone())),
            ("host.name", Value::Str(self.host_name.clone())),
        ]);
        for (k, v) in &p.attributes {
            resource.insert(k, Value::Str(v.clone()));
        }
        let line = Line {
            trace_id: hex(&s.trace_id),
            span_id: hex(&s.span_id),
            parent_span_id: s.parent_span_id.map(|p| hex(&p)),
            name: &s.name,
            kind: s.kind,
            start_unix_ns: s.start_unix_ns,
            end_unix_ns: s.end_unix_ns,
            status: if s.error.is_some() { "error" } else { "unset" },
            error_type: s.error.as_deref(),
            resource,
            attributes: s.attributes.iter().map(|(k, v)| (*k, v)).collect(),
        };
        let ok = serde_json::to_writer(&mut self.out, &line).is_ok()
            && self.out.write_all(b"\n").is_ok();
        if !ok {
            tracing::warn!("cannot write a span to --output");
        }
    }

    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_is_refused_unless_appending() {
        let path = std::env::temp_dir().join(format!("loupe-jsonl-{}.jsonl", std::process::id()));
        std::fs::write(&path, "earlier\n").unwrap();
        let err = JsonLines::create(&path, "h", false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--append"), "{err}");
        let mut j = JsonLines::create(&path, "h", true).unwrap();
        j.out.write_all(b"later\n").unwrap();
        j.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier\nlater\n");
        std::fs::write(&path, "").unwrap();
        assert!(
            JsonLines::create(&path, "h", false).is_ok(),
            "an empty file is fine"
        );
        let _ = std::fs::remove_file(&path);
    }
}
