use super::*;

fn data(s: &[u8]) -> Segment {
    Segment::Data(Bytes::copy_from_slice(s))
}

/// Feeds segments to a reader; responses answer `method`.
fn run(mut reader: MessageReader, segs: Vec<Segment>, method: Option<&str>) -> Vec<Item> {
    let mut out = Vec::new();
    let mut m = |_: &Head| method.map(method_name);
    for s in segs {
        reader.feed(s, &mut m, &mut out);
    }
    out
}

/// (start line summary, framing) of each head, and each end's completeness, in order.
fn summary(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| match i {
            Item::Head { head, framing } => match head.status() {
                None => format!(
                    "{} {} {framing:?}",
                    head.method().unwrap_or_default(),
                    head.target()
                ),
                Some(status) => format!("{status} {framing:?}"),
            },
            Item::End { complete } => format!("end {complete}"),
            Item::Malformed { reason } => format!("malformed: {reason}"),
        })
        .collect()
}

const GET: &[u8] = b"GET /users/42?x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/8\r\n\r\n";
const POST: &[u8] = b"POST /items HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world";
const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Every fixture the sweep tests walk, with its direction.
const FIXTURES: &[(&[u8], bool)] = &[(GET, true), (POST, true), (CHUNKED, false), (OK, false)];

#[test]
fn a_simple_request() {
    let items = run(MessageReader::requests(), vec![data(GET)], None);
    assert_eq!(summary(&items), ["GET /users/42?x=1 None", "end true"]);
    let Item::Head { head, .. } = &items[0] else {
        panic!()
    };
    assert_eq!(head.header_str("user-agent"), Some("curl/8"));
    assert_eq!(head.minor_version, 1);
    assert!(!head.closes());
}

#[test]
fn kept_headers_read_the_same_from_a_payload_and_from_a_copy() {
    // The second request of a read: its values lie past the start of the payload.
    let raw = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: shop:8080\r\nX-Empty:\r\nUser-Agent:\r\nAuthorization: Bearer s3cret\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
    let items = run(MessageReader::requests(), vec![data(raw)], None);
    let heads: Vec<&Head> = items
        .iter()
        .filter_map(|i| match i {
            Item::Head { head, .. } => Some(head),
            _ => None,
        })
        .collect();
    let HeadParse::Parsed(copied, _) = parse_request(&raw[28..]) else {
        panic!("the second head parses alone")
    };
    assert_eq!(heads[1], &copied);
    let kept: Vec<(&str, &[u8])> = heads[1].headers.iter().collect();
    assert_eq!(
        kept,
        [
            ("host", &b"shop:8080"[..]),
            ("user-agent", b""),
            (
                "traceparent",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
        ]
    );
    assert!(!format!("{:?}", heads[1]).contains("s3cret"));
}

#[test]
fn keep_alive_and_pipelined_requests_in_one_read() {
    let all = [GET, POST, GET].concat();
    let items = run(MessageReader::requests(), vec![data(&all)], None);
    assert_eq!(
        summary(&items),
        [
            "GET /users/42?x=1 None",
            "end true",
            "POST /items Length(11)",
            "end true",
            "GET /users/42?x=1 None",
            "end true"
        ]
    );
}

#[test]
fn headers_split_across_many_reads() {
    let segs = POST.iter().map(|b| data(&[*b])).collect();
    let items = run(MessageReader::requests(), segs, None);
    assert_eq!(summary(&items), ["POST /items Length(11)", "end true"]);
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let items = run(
        MessageReader::responses(),
        vec![data(CHUNKED), data(OK)],
        Some("GET"),
    );
    assert_eq!(
        summary(&items),
        ["200 Chunked", "end true", "200 Length(2)", "end true"]
    );
}

#[test]
fn a_body_the_capture_truncated_is_skipped_by_count() {
    // Content-Length body: only 3 of 1000 bytes captured, the rest is a gap.
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc";
    let items = run(
        MessageReader::responses(),
        vec![data(head), Segment::Gap(997), data(OK)],
        Some("GET"),
    );
    assert_eq!(
        summary(&items),
        ["200 Length(1000)", "end true", "200 Length(2)", "end true"]
    );

    // Chunked body whose chunk data is partly a gap.
    let segs = vec![
        data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabcd"),
        Segment::Gap(12),
        data(b"\r\n0\r\n\r\n"),
        data(OK),
    ];
    let items = run(MessageReader::responses(), segs, Some("GET"));
    assert_eq!(
        summary(&items),
        ["200 Chunked", "end true", "200 Length(2)", "end true"]
    );
}

#[test]
fn a_gap_over_a_chunk_size_line_loses_framing_then_resyncs() {
    let segs = vec![
        data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"),
        Segment::Gap(50),
        data(b"junk\r\n0\r\n\r\n"),
        data(OK),
    ];
    let items = run(MessageReader::responses(), segs, Some("GET"));
    assert_eq!(
        summary(&items),
        ["200 Chunked", "end false", "200 Length(2)", "end true"]
    );
}

#[test]
fn interim_100_continue_then_the_final_response() {
    let items = run(
        MessageReader::responses(),
        vec![data(b"HTTP/1.1 100 Continue\r\n\r\n"), data(OK)],
        Some("POST"),
    );
    assert_eq!(
        summary(&items),
        ["100 None", "end true", "200 Length(2)", "end true"]
    );
}

#[test]
fn head_204_and_304_responses_have_no_body() {
    let head_resp = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
    let items = run(
        MessageReader::responses(),
        vec![data(head_resp), data(OK)],
        Some("HEAD"),
    );
    // The second response is read as a response to HEAD as well (method fixed in this test).
    assert_eq!(summary(&items)[..2], ["200 None", "end true"]);
    for status in [b"204 No Content".as_slice(), b"304 Not Modified"] {
        let r = [
            b"HTTP/1.1 ".as_slice(),
            status,
            b"\r\nContent-Length: 5\r\n\r\n",
        ]
        .concat();
        let items = run(
            MessageReader::responses(),
            vec![data(&r), data(OK)],
            Some("GET"),
        );
        assert_eq!(
            summary(&items)[1..],
            ["end true", "200 Length(2)", "end true"]
        );
    }
}

#[test]
fn a_response_until_close() {
    let mut r = MessageReader::responses();
    let mut out = Vec::new();
    r.feed(
        data(b"HTTP/1.0 200 OK\r\n\r\nbody bytes"),
        &mut |_: &Head| Some("GET".into()),
        &mut out,
    );
    r.close(&mut out);
    assert_eq!(summary(&out), ["200 UntilClose", "end true"]);
}

#[test]
fn a_connection_closed_mid_response() {
    let mut r = MessageReader::responses();
    let mut out = Vec::new();
    r.feed(
        data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
        &mut |_: &Head| None,
        &mut out,
    );
    assert!(r.in_message());
    r.close(&mut out);
    assert_eq!(summary(&out), ["200 Length(10)", "end false"]);
}

#[test]
fn malformed_input_is_reported_then_skipped() {
    let segs = vec![data(b"\x16\x03\x01 not http at all\r\n\r\n"), data(GET)];
    let items = run(MessageReader::requests(), segs, None);
    assert_eq!(
        summary(&items),
        [
            "malformed: malformed request head",
            "GET /users/42?x=1 None",
            "end true"
        ]
    );
}

#[test]
fn a_head_cut_by_the_capture_cap_is_salvaged() {
    let segs = vec![
        data(b"GET /big HTTP/1.1\r\nHost: a\r\nCookie: abc"),
        Segment::Gap(9000),
        data(GET),
    ];
    let items = run(MessageReader::requests(), segs, None);
    assert_eq!(
        summary(&items),
        [
            "GET /big None",
            "end false",
            "GET /users/42?x=1 None",
            "end true"
        ]
    );
    let Item::Head { head, .. } = &items[0] else {
        panic!()
    };
    assert!(head.truncated);
    assert_eq!(head.header_str("host"), Some("a"));
    assert_eq!(head.header("cookie"), None, "the partial line is dropped");
}

#[test]
fn a_stream_joined_mid_way_waits_for_a_message_start() {
    let segs = vec![data(b"dy of an earlier message\r\n"), data(GET)];
    let items = run(MessageReader::resyncing(true), segs, None);
    assert_eq!(summary(&items), ["GET /users/42?x=1 None", "end true"]);
}

#[test]
fn oversized_heads_are_malformed_not_buffered_forever() {
    let mut big = b"GET / HTTP/1.1\r\n".to_vec();
    while big.len() <= MAX_HEAD {
        big.extend_from_slice(
            b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    let items = run(MessageReader::requests(), vec![data(&big)], None);
    assert!(
        matches!(items.first(), Some(Item::Malformed { .. })),
        "{:?}",
        summary(&items)
    );
}

#[test]
fn every_split_point_gives_the_same_messages() {
    for &(fixture, requests) in FIXTURES {
        let reader = || {
            if requests {
                MessageReader::requests()
            } else {
                MessageReader::responses()
            }
        };
        let whole = summary(&run(reader(), vec![data(fixture)], Some("GET")));
        for at in 1..fixture.len() {
            let split = summary(&run(
                reader(),
                vec![data(&fixture[..at]), data(&fixture[at..])],
                Some("GET"),
            ));
            assert_eq!(
                split,
                whole,
                "split at {at} of {:?}",
                String::from_utf8_lossy(fixture)
            );
        }
    }
}

#[test]
fn every_prefix_and_every_gap_position_never_panics() {
    for &(fixture, requests) in FIXTURES {
        for at in 0..=fixture.len() {
            let mut r = if requests {
                MessageReader::requests()
            } else {
                MessageReader::responses()
            };
            let mut out = Vec::new();
            r.feed(
                data(&fixture[..at]),
                &mut |_: &Head| Some("GET".into()),
                &mut out,
            );
            r.feed(
                Segment::Gap(7),
                &mut |_: &Head| Some("GET".into()),
                &mut out,
            );
            r.feed(
                data(&fixture[at..]),
                &mut |_: &Head| Some("GET".into()),
                &mut out,
            );
            r.close(&mut out);
            // A message that started must end exactly once.
            let heads = out
                .iter()
                .filter(|i| matches!(i, Item::Head { .. }))
                .count();
            let ends = out.iter().filter(|i| matches!(i, Item::End { .. })).count();
            assert_eq!(heads, ends, "at {at}: {:?}", summary(&out));
        }
    }
}

/// Heads beyond the first, small header array are parsed again with the large one; beyond that
/// they are malformed, as before.
#[test]
fn heads_with_many_headers_parse_whole_and_too_many_are_malformed() {
    let head = |n: usize, last: &str| {
        let mut h = String::from("GET /many HTTP/1.1\r\n");
        for i in 0..n {
            h.push_str(&format!("X-Filler-{i}: {i}\r\n"));
        }
        h.push_str(last);
        h.push_str("\r\n");
        h
    };
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";
    let many = head(60, tp);
    match parse_request(many.as_bytes()) {
        HeadParse::Parsed(h, len) => {
            assert_eq!(len, many.len());
            assert!(
                h.header_str("traceparent")
                    .is_some_and(|v| v.ends_with("-01"))
            );
        }
        other => panic!("60 headers: {other:?}"),
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\n{}Content-Length: 2\r\n\r\n",
        (0..40)
            .map(|i| format!("X-R{i}: v\r\n"))
            .collect::<String>()
    );
    match parse_response(response.as_bytes()) {
        HeadParse::Parsed(h, _) => assert_eq!(h.header_str("content-length"), Some("2")),
        other => panic!("40 headers: {other:?}"),
    }
    assert!(matches!(
        parse_request(head(200, tp).as_bytes()),
        HeadParse::Invalid(_)
    ));
}

#[test]
fn every_kept_header_is_found_in_any_case_and_no_other() {
    for name in KEPT {
        assert_eq!(kept_name(name.as_bytes()), Some(name));
        assert_eq!(kept_name(name.to_ascii_uppercase().as_bytes()), Some(name));
    }
    for other in [
        "authorization",
        "cookie",
        "accept",
        "x-b3-traceidx",
        "hos",
        "",
        // Bytes that differ from a kept name's only in bit 0x20 where it has no letter: '-'
        // (0x2d) and CR (0x0d), '3' (0x33) and 0x13.
        "x\rb3-flags",
        "x-b\x13-flags",
        "user\ragent",
        // One byte off at the end of a name longer than a word, and in its last word.
        "transfer-encodinf",
        "x-b3-parentspanie",
        "content-lengtg",
        "HOSU",
        "bb",
    ] {
        assert_eq!(kept_name(other.as_bytes()), None, "{other:?}");
    }
    // The word comparison says what a byte-wise case-insensitive one says, for every name
    // with one byte of a kept name changed to any other value.
    for name in KEPT {
        for at in 0..name.len() {
            for b in 0..=255u8 {
                let mut changed = name.as_bytes().to_vec();
                changed[at] = b;
                let expected = KEPT
                    .into_iter()
                    .find(|k| changed.eq_ignore_ascii_case(k.as_bytes()));
                assert_eq!(kept_name(&changed), expected, "{changed:?}");
            }
        }
    }
    // Kept names are lowercase letters, digits and '-', which the comparison relies on.
    assert!(KEPT.iter().all(|n| {
        n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }));
}

#[test]
fn content_length_reads_as_str_parse_does() {
    let values: [&[u8]; 16] = [
        b"0",
        b"11",
        b" 42 ",
        b"\t7\r",
        b"+5",
        b"-5",
        b"",
        b" ",
        b"+",
        b"1 2",
        b"0x10",
        b"18446744073709551615",
        b"18446744073709551616",
        b"99999999999999999999999",
        b"12a",
        b"\xc3\xa912",
    ];
    for v in values {
        let by_str = std::str::from_utf8(v)
            .ok()
            .map(str::trim)
            .and_then(|t| t.parse::<u64>().ok());
        assert_eq!(
            super::decimal(v),
            by_str,
            "{:?}",
            String::from_utf8_lossy(v)
        );
    }
}

#[test]
fn a_parsed_heads_texts_read_back_from_where_they_lie() {
    let raw = b"PROPFIND /dav/a%20b?depth=1 HTTP/1.1\r\nHost: files\r\nX-Other: 1\r\n\r\n";
    let HeadParse::Parsed(head, len) = parse_request(raw) else {
        panic!("a request head");
    };
    assert_eq!(len, raw.len());
    assert_eq!(head.method(), Some("PROPFIND"));
    assert_eq!(head.known_method(), None);
    assert_eq!(head.method_name().as_deref(), Some("PROPFIND"));
    assert_eq!(head.target(), "/dav/a%20b?depth=1");
    assert_eq!(head.header_str("host"), Some("files"));
    assert_eq!(head.headers.iter().count(), 1, "only kept headers");
    // The same head built from its texts is equal: equality is of texts, not offsets.
    let built = Head::request("PROPFIND", "/dav/a%20b?depth=1", [("host", &b"files"[..])]);
    assert_eq!(head, built);
    let other = Head::request("PROPFIND", "/dav/a%20b?depth=2", [("host", &b"files"[..])]);
    assert_ne!(head, other);

    let HeadParse::Parsed(get, _) = parse_request(GET) else {
        panic!("a request head");
    };
    assert_eq!(get.known_method(), Some("GET"));
    assert_eq!(get.target(), "/users/42?x=1");
    let HeadParse::Parsed(ok, _) = parse_response(OK) else {
        panic!("a response head");
    };
    assert_eq!(
        (ok.status(), ok.method(), ok.target()),
        (Some(200), None, "")
    );
}

/// Heads travel by value from the reader through the exchange to the span: moves of more than
/// 128 bytes are memcpy calls, ~5% of the pipeline's time when a head was 192 bytes.
#[test]
fn a_parsed_head_with_its_framing_moves_inline() {
    assert!(size_of::<Item>() <= 128, "{}", size_of::<Item>());
    assert!(size_of::<Head>() <= 112, "{}", size_of::<Head>());
}
