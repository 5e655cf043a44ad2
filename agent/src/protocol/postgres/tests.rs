use super::*;
use crate::protocol::{PROTO_POSTGRES, fixture};

fn replay(
    name: &str,
    from: usize,
    midstream: bool,
) -> (Vec<fixture::Seen>, crate::protocol::db::DbSessionStats) {
    let recs = fixture::named("postgres", name);
    let (done, s) = fixture::replay_db(
        PROTO_POSTGRES,
        midstream,
        &fixture::as_segments(&recs[from..]),
    );
    (done.iter().map(fixture::seen).collect(), s.stats)
}

fn texts(seen: &[fixture::Seen]) -> Vec<&str> {
    seen.iter()
        .map(|s| s.text.as_deref().unwrap_or("-"))
        .collect()
}

/// psycopg2 (simple protocol) with sslmode=prefer: SSLRequest refused, startup, client-side
/// interpolated literals, an error, a multi-statement query, a NOTICE, COPY out and in.
#[test]
fn recorded_psycopg2_simple_protocol() {
    let (seen, stats) = replay("pg-simple.bin", 0, false);
    assert_eq!(
        texts(&seen),
        [
            "SELECT name, qty FROM items WHERE id = ? AND note <> ?",
            "INSERT INTO items (id, name, qty, note) VALUES (?, ?, ?, ?)",
            "SELECT * FROM missing_table",
            "SELECT ?; SELECT ?",
            "DO ?",
            "COPY (SELECT id, name FROM items WHERE id < ?) TO STDOUT",
            "COPY items (id, name, qty, note) FROM STDIN",
            "SELECT name FROM items WHERE id > ?",
        ]
    );
    assert!(
        seen.iter()
            .all(|s| s.namespace.as_deref() == Some("shop") && s.complete)
    );
    let errors: Vec<_> = seen.iter().map(|s| s.error.as_deref()).collect();
    assert_eq!(errors[2], Some("42P01"));
    assert_eq!(errors.iter().flatten().count(), 1);
    assert_eq!(seen[0].collection.as_deref(), Some("items"));
    assert_eq!(seen[3].collection, None, "two statements");
    assert_eq!(stats.unsolicited, 1, "the NOTICE");
    assert_eq!((stats.malformed, stats.orphan_responses), (0, 0));
}

/// psycopg 3 (extended protocol): named prepared statements, unnamed ones, an error, pipeline
/// mode with three Executes per Sync, and an error that makes the server skip the rest of its
/// pipeline (no span for the skipped statement).
#[test]
fn recorded_psycopg3_extended_protocol() {
    let (seen, stats) = replay("pg-extended.bin", 0, false);
    assert_eq!(
        texts(&seen),
        [
            "SELECT qty FROM items WHERE id = $1",
            "SELECT qty FROM items WHERE id = $1",
            "SELECT qty FROM items WHERE id = $1",
            "UPDATE items SET qty = qty + ? WHERE id = $1",
            "SELECT * FROM missing_table WHERE id = $1",
            "SELECT name FROM items WHERE id = $1",
            "SELECT name FROM items WHERE id = $1",
            "SELECT name FROM items WHERE id = $1",
            "SELECT ? / $1",
            "SELECT name FROM items WHERE id = $1",
        ]
    );
    let errors: Vec<_> = seen.iter().filter_map(|s| s.error.as_deref()).collect();
    assert_eq!(errors, ["42P01", "22012"]);
    assert_eq!(stats.not_executed, 1);
    assert_eq!((stats.malformed, stats.orphan_responses), (0, 0));
}

/// Joined after a named statement was prepared: its executions still make spans, said unknown.
#[test]
fn a_statement_prepared_before_the_agent_started_still_gives_spans() {
    let recs = fixture::named("postgres", "pg-extended.bin");
    // The second use of the named statement: Bind + Execute + Sync, no Parse.
    let from = recs
        .iter()
        .position(|(client, b)| *client && b.first() == Some(&b'B'))
        .expect("a Bind without Parse");
    let (seen, stats) = replay("pg-extended.bin", from, true);
    assert_eq!(seen[0].operation.as_deref(), Some("EXECUTE"));
    assert!(seen[0].unknown && seen[0].text.is_none() && seen[0].complete);
    // Later statements parsed while watching carry their text.
    assert!(
        seen.iter()
            .any(|s| s.text.as_deref() == Some("UPDATE items SET qty = qty + ? WHERE id = $1"))
    );
    assert_eq!(stats.malformed, 0);
}

#[test]
fn error_fields_give_the_sqlstate_only() {
    let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"secret_table\" does not exist\0\0";
    assert_eq!(sqlstate(body).as_deref(), Some("42P01"));
    assert_eq!(sqlstate(b"SERROR\0\0"), None);
}

#[test]
fn bind_values_are_never_kept() {
    let mut p = Parser::new(true);
    let mut cache = sql::Cache::new(2048);
    let mut out = Vec::new();
    let mut msgs = Vec::new();
    let mut push = |tag: u8, body: &[u8]| {
        msgs.push(tag);
        msgs.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        msgs.extend_from_slice(body);
    };
    push(b'P', b"s1\0SELECT * FROM t WHERE a = $1\0\0\0");
    push(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x0bbind-secret\0\0");
    push(b'E', b"\0\0\0\0\0");
    push(b'S', b"");
    p.requests(
        Segment::Data(bytes::Bytes::from(msgs)),
        &mut cache,
        &mut out,
    );
    let dump = format!("{out:?}{p:?}");
    assert!(!dump.contains("bind-secret"), "{dump}");
    assert!(dump.contains("SELECT * FROM t WHERE a = $1"));
}
