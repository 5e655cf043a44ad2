//! Byte fixtures recorded from real servers by `cargo xtask record` (tests/src/bin/record.rs),
//! and a replay that drives a protocol session with them as the capture would: each recorded
//! read becomes a segment of its direction.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::{
    conn::Segment,
    protocol::{db, sql},
    trace::exchange::{Identity, Outcome},
};

/// One recorded read: client to server (`true`) or back.
pub type Record = (bool, Vec<u8>);

pub fn load(path: &Path) -> Vec<Record> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut at = 0;
    while at + 5 <= data.len() {
        let dir = data[at];
        let len = u32::from_le_bytes(data[at + 1..at + 5].try_into().unwrap()) as usize;
        out.push((dir == b'C', data[at + 5..at + 5 + len].to_vec()));
        at += 5 + len;
    }
    assert_eq!(at, data.len(), "{}: trailing bytes", path.display());
    out
}

/// Every fixture of a protocol folder (`postgres`, `mysql`, `redis`, `http1`).
pub fn all(folder: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/protocol")
        .join(folder)
        .join("testdata");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "bin"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

pub fn named(folder: &str, name: &str) -> Vec<Record> {
    load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/protocol")
            .join(folder)
            .join("testdata")
            .join(name),
    )
}

/// What a replayed database exchange shows, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub operation: Option<String>,
    pub collection: Option<String>,
    pub text: Option<String>,
    pub error: Option<String>,
    pub unknown: bool,
    pub namespace: Option<String>,
    pub complete: bool,
}

pub fn seen(ex: &db::DbExchange) -> Seen {
    let s = |v: &Option<std::sync::Arc<str>>| v.as_deref().map(str::to_string);
    Seen {
        operation: s(&ex.request.operation),
        collection: s(&ex.request.collection),
        text: s(&ex.request.text),
        error: ex
            .response
            .as_ref()
            .and_then(|r| r.error_code.as_deref().map(str::to_string)),
        unknown: ex.request.text_unknown,
        namespace: s(&ex.request.namespace),
        complete: ex.outcome == Outcome::Complete,
    }
}

/// Replays `records` (optionally transformed into segments by `segments`) through a fresh
/// database session of `protocol`; returns what it paired, then the session.
pub fn replay_db(
    protocol: u8,
    midstream: bool,
    records: &[(bool, Segment)],
) -> (Vec<db::DbExchange>, db::Session) {
    let parser =
        db::Parser::new(protocol, midstream, &db::DbOptions::default()).expect("a db protocol");
    let mut session = db::Session::new(parser);
    let mut cache = sql::Cache::new(2048);
    let mut done = Vec::new();
    for (i, (client, seg)) in records.iter().enumerate() {
        let ts = i as u64 + 1;
        if *client {
            session.on_requests(
                ts,
                1,
                &mut cache,
                &mut |_, _| Identity::unexported(),
                vec![seg.clone()],
            );
        } else {
            done.extend(session.on_responses(ts, vec![seg.clone()]));
        }
    }
    done.extend(session.close(records.len() as u64 + 1));
    (done, session)
}

pub fn as_segments(records: &[Record]) -> Vec<(bool, Segment)> {
    records
        .iter()
        .map(|(c, b)| (*c, Segment::Data(Bytes::copy_from_slice(b))))
        .collect()
}
