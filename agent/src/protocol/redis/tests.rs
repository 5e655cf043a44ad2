use super::*;
use crate::protocol::{PROTO_REDIS, fixture};
use bytes::Bytes;

fn seg(s: &[u8]) -> Segment {
    Segment::Data(Bytes::copy_from_slice(s))
}

fn ops(
    parser: &mut Parser,
    req: &[u8],
    resp: &[u8],
) -> (Vec<Option<String>>, Vec<Option<String>>, usize) {
    let mut out = Vec::new();
    parser.requests(seg(req), &mut out);
    parser.responses(seg(resp), &mut out);
    let mut reqs = Vec::new();
    let mut resps = Vec::new();
    let mut unsolicited = 0;
    for m in out {
        match m {
            Message::Request(r) => reqs.push(r.operation.as_deref().map(str::to_string)),
            Message::Response(r) => resps.push(r.error_code.as_deref().map(str::to_string)),
            Message::Unsolicited => unsolicited += 1,
            Message::Malformed => panic!("malformed"),
        }
    }
    (reqs, resps, unsolicited)
}

#[test]
fn a_pipeline_pairs_in_order_and_errors_keep_their_prefix() {
    let mut p = Parser::new(false, false);
    let (reqs, resps, _) = ops(
        &mut p,
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n*2\r\n$5\r\nlpush\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n",
        b"+OK\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n+PONG\r\n",
    );
    assert_eq!(
        reqs,
        [
            Some("SET".into()),
            Some("LPUSH".into()),
            Some("PING".into())
        ]
    );
    assert_eq!(resps, [None, Some("WRONGTYPE".into()), None]);
}

#[test]
fn nested_and_resp3_replies_are_one_answer_each() {
    let mut p = Parser::new(false, false);
    let (_, resps, unsolicited) = ops(
        &mut p,
        b"*1\r\n$7\r\nHGETALL\r\n*1\r\n$4\r\nPING\r\n",
        // A RESP3 map with a nested array, an attribute before a reply, and a push between.
        b"%2\r\n$1\r\na\r\n*2\r\n:1\r\n_\r\n$1\r\nb\r\n,1.5\r\n>3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n_\r\n|1\r\n+ttl\r\n:3\r\n+PONG\r\n",
    );
    assert_eq!(resps.len(), 2);
    assert_eq!(unsolicited, 1);
}

#[test]
fn subscribe_confirmations_and_messages() {
    let mut p = Parser::new(false, false);
    let (reqs, resps, unsolicited) = ops(
        &mut p,
        b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$6\r\nsecret\r\n",
    );
    assert_eq!(reqs.len(), 1);
    assert_eq!(resps.len(), 1, "two confirmations answer one SUBSCRIBE");
    assert_eq!(unsolicited, 1);
}

#[test]
fn values_and_credentials_are_never_kept_in_requests() {
    for keys in [false, true] {
        let mut p = Parser::new(false, keys);
        let mut out = Vec::new();
        p.requests(
            seg(b"*3\r\n$3\r\nSET\r\n$8\r\nuser:42k\r\n$9\r\nsecret-v1\r\n*2\r\n$4\r\nAUTH\r\n$6\r\npw-123\r\n"),
            &mut out,
        );
        let texts: Vec<Option<String>> = out
            .iter()
            .map(|m| match m {
                Message::Request(r) => r.text.as_deref().map(str::to_string),
                _ => None,
            })
            .collect();
        if keys {
            assert_eq!(texts[0].as_deref(), Some("SET user:42k ?"));
            assert_eq!(
                texts[1].as_deref(),
                Some("AUTH"),
                "AUTH's argument is no key"
            );
        } else {
            assert_eq!(texts, [None, None]);
        }
        let dump = format!("{out:?}");
        assert!(!dump.contains("secret-v1") && !dump.contains("pw-123"));
    }
}

#[test]
fn a_large_value_is_passed_over_not_buffered() {
    let mut r = Reader::new(false, false);
    let mut out = Vec::new();
    let mut bad = 0;
    r.feed(seg(b"$1000000\r\n"), &mut out, &mut bad);
    for _ in 0..100 {
        r.feed(seg(&[b'x'; 10_000]), &mut out, &mut bad);
        assert!(r.buffered() < 1024);
    }
    r.feed(seg(b"\r\n"), &mut out, &mut bad);
    assert_eq!((out.len(), bad), (1, 0));
}

#[test]
fn inline_commands_are_requests() {
    let mut p = Parser::new(false, false);
    let (reqs, resps, _) = ops(&mut p, b"PING\r\n", b"+PONG\r\n");
    assert_eq!(reqs, [Some("PING".into())]);
    assert_eq!(resps.len(), 1);
}

/// redis-py against Redis 7: SET/GET, a 100 kB value, a pipeline, MULTI/EXEC, WRONGTYPE.
#[test]
fn recorded_redis_py_session() {
    let recs = fixture::named("redis", "redis-resp2.bin");
    let (done, s) = fixture::replay_db(PROTO_REDIS, false, &fixture::as_segments(&recs));
    let ops: Vec<String> = done
        .iter()
        .map(|e| fixture::seen(e).operation.unwrap_or_default())
        .collect();
    assert!(
        // redis-py names itself first (CLIENT SETINFO lib-name, lib-ver).
        ops.starts_with(&[
            "CLIENT".to_string(),
            "CLIENT".into(),
            "SET".into(),
            "GET".into(),
            "SET".into(),
            "GET".into()
        ]),
        "{ops:?}"
    );
    assert_eq!(ops.iter().filter(|o| *o == "INCRBY").count(), 5);
    for op in ["MULTI", "EXEC", "LPUSH", "HSET", "HGETALL", "DEL"] {
        assert!(ops.iter().any(|o| o == op), "{op} in {ops:?}");
    }
    let errors: Vec<Option<String>> = done
        .iter()
        .map(|e| fixture::seen(e).error)
        .filter(Option::is_some)
        .collect();
    // Redis 7.0 does not know CLIENT SETINFO (7.2 does): ERR twice, then the LPUSH on a string.
    assert_eq!(
        errors,
        [
            Some("ERR".into()),
            Some("ERR".into()),
            Some("WRONGTYPE".into())
        ]
    );
    assert!(done.iter().all(|e| fixture::seen(e).complete));
    assert_eq!((s.stats.malformed, s.stats.orphan_responses), (0, 0));
}

/// A subscriber connection: confirmations pair with SUBSCRIBE, messages are unsolicited.
#[test]
fn recorded_pubsub_subscriber() {
    for f in fixture::all("redis")
        .iter()
        .filter(|p| p.to_string_lossy().contains("pubsub"))
    {
        let recs = fixture::load(f);
        let (done, s) = fixture::replay_db(PROTO_REDIS, false, &fixture::as_segments(&recs));
        let ops: Vec<String> = done
            .iter()
            .map(|e| fixture::seen(e).operation.unwrap_or_default())
            .collect();
        if ops.contains(&"SUBSCRIBE".to_string()) {
            assert_eq!(s.stats.unsolicited, 3, "three messages published");
            assert_eq!(s.stats.orphan_responses, 0);
            return;
        }
    }
    panic!("no subscriber connection recorded");
}

/// RESP3 with client-side caching: the invalidation push is never paired.
#[test]
fn recorded_resp3_tracking() {
    for f in fixture::all("redis")
        .iter()
        .filter(|p| p.to_string_lossy().contains("resp3"))
    {
        let recs = fixture::load(f);
        let (done, s) = fixture::replay_db(PROTO_REDIS, false, &fixture::as_segments(&recs));
        let ops: Vec<String> = done
            .iter()
            .map(|e| fixture::seen(e).operation.unwrap_or_default())
            .collect();
        if ops.contains(&"HELLO".to_string()) {
            assert!(s.stats.unsolicited >= 1, "the invalidation push");
            assert_eq!(s.stats.orphan_responses, 0);
            assert!(done.iter().all(|e| fixture::seen(e).complete));
            return;
        }
    }
    panic!("no RESP3 connection recorded");
}
