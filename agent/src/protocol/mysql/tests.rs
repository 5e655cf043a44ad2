use super::*;
use crate::protocol::{PROTO_MYSQL, db, fixture};

fn replay(name: &str, from: usize, midstream: bool) -> (Vec<fixture::Seen>, db::Session) {
    let recs = fixture::named("mysql", name);
    let (done, s) =
        fixture::replay_db(PROTO_MYSQL, midstream, &fixture::as_segments(&recs[from..]));
    (done.iter().map(fixture::seen).collect(), s)
}

/// PyMySQL against MariaDB 10.11: greeting, handshake with a database, text queries with
/// client-side literals, an error, a multi-statement query (two result sets), an empty result,
/// PING and COM_INIT_DB (no spans), a count.
#[test]
fn recorded_pymysql_text_protocol() {
    let (seen, s) = replay("mysql-text.bin", 0, false);
    let texts: Vec<&str> = seen
        .iter()
        .map(|s| s.text.as_deref().unwrap_or("-"))
        .collect();
    assert_eq!(
        texts,
        [
            "SET NAMES utf8mb4",
            "SELECT name, qty FROM items WHERE id = ? AND note <> ?",
            "INSERT INTO items VALUES (?, ?, ?, ?)",
            "SELECT * FROM missing_table",
            "SELECT ?; SELECT ?",
            "SELECT name FROM items WHERE id > ?",
            "SELECT COUNT(*) FROM items",
        ]
    );
    let errors: Vec<_> = seen.iter().filter_map(|s| s.error.as_deref()).collect();
    assert_eq!(errors, ["1146"]);
    assert!(
        seen.iter()
            .all(|s| s.complete && s.namespace.as_deref() == Some("shop"))
    );
    assert_eq!(s.parser.system(), "mariadb");
    assert_eq!((s.stats.malformed, s.stats.orphan_responses), (0, 0));
}

/// mysql-connector-python's prepared cursor: COM_STMT_PREPARE, EXECUTE twice, CLOSE.
#[test]
fn recorded_server_side_prepared_statements() {
    let (seen, s) = replay("mysql-prepared.bin", 0, false);
    let texts: Vec<&str> = seen
        .iter()
        .map(|s| s.text.as_deref().unwrap_or("-"))
        .collect();
    assert_eq!(
        &texts[2..],
        [
            "SELECT name, qty FROM items WHERE id = ? AND note <> ?",
            "SELECT name, qty FROM items WHERE id = ? AND note <> ?",
            "UPDATE items SET qty = qty + ? WHERE id = ?",
        ]
    );
    assert_eq!((s.stats.malformed, s.stats.orphan_responses), (0, 0));
    // The value was on the wire (bound in COM_STMT_EXECUTE) and is nowhere in what was kept.
    let recs = fixture::named("mysql", "mysql-prepared.bin");
    assert!(
        recs.iter()
            .any(|(c, b)| *c && b.windows(14).any(|w| w == b"fixture-secret"))
    );
    assert!(!format!("{seen:?}{:?}", s.parser).contains("fixture-secret"));
}

/// Joined after the statement was prepared: executions still make spans, said unknown; the
/// system cannot be told from a greeting it never saw.
#[test]
fn an_execute_of_an_unseen_statement_still_gives_a_span() {
    let recs = fixture::named("mysql", "mysql-prepared.bin");
    let executes: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, (c, b))| *c && b.len() > 4 && b[3] == 0 && b[4] == COM_STMT_EXECUTE)
        .map(|(i, _)| i)
        .collect();
    let (seen, s) = replay("mysql-prepared.bin", executes[1], true);
    assert_eq!(seen[0].operation.as_deref(), Some("EXECUTE"));
    assert!(seen[0].unknown && seen[0].complete);
    assert_eq!(s.parser.system(), "mysql");
    assert_eq!(s.stats.malformed, 0);
}

#[test]
fn lenenc_and_err_packets() {
    assert_eq!(
        lenenc(&[0xfc, 0x10, 0x27, 9]).map(|(n, r)| (n, r.len())),
        Some((10_000, 1))
    );
    assert_eq!(lenenc(&[0xfd, 1]), None);
    assert_eq!(
        err_code(b"\xff\x7a\x04#42S02Table 'shop.x' doesn't exist").as_deref(),
        Some("1146")
    );
}
