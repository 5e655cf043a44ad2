//! Against an independent encoder: blocks from Python's `hpack` (tests/apps/hpack_fixtures.py)
//! over one long connection, with indexing, Huffman, evictions, size updates and never-indexed
//! fields.

use super::*;

/// Each block's (name, value) pairs.
type Expected = Vec<Vec<(Vec<u8>, Vec<u8>)>>;

fn fixtures() -> (Vec<Vec<u8>>, Expected) {
    let raw = include_bytes!("../testdata/blocks.hpack");
    let mut blocks = Vec::new();
    let mut rest = &raw[..];
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        blocks.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    let json: Vec<Vec<(String, String)>> =
        serde_json::from_str(include_str!("../testdata/blocks.json")).unwrap();
    let expected = json
        .into_iter()
        .map(|b| {
            b.into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                .collect()
        })
        .collect();
    (blocks, expected)
}

#[test]
fn a_whole_connection_decodes_exactly() {
    let (blocks, expected) = fixtures();
    assert_eq!(blocks.len(), 132);
    let mut d = Decoder::new(false);
    for (i, (block, want)) in blocks.iter().zip(&expected).enumerate() {
        let got: Vec<(Vec<u8>, Vec<u8>)> = d
            .decode(block)
            .unwrap_or_else(|e| panic!("block {i}: {e:?}"))
            .into_iter()
            .map(|f| (f.name.unwrap(), f.value.unwrap()))
            .collect();
        assert_eq!(&got, want, "block {i}");
    }
    assert!(d.exact());
    assert_eq!(d.stats.unknown_refs, 0);
}

#[test]
fn joined_after_k_blocks_nothing_wrong_is_decoded_and_it_becomes_exact() {
    let (blocks, expected) = fixtures();
    for k in 1..blocks.len() {
        let mut d = Decoder::new(true);
        let mut unknown = 0;
        for (i, (block, want)) in blocks.iter().zip(&expected).enumerate().skip(k) {
            let was_exact = d.exact();
            let was_synced = d.synced();
            let got = d
                .decode(block)
                .unwrap_or_else(|e| panic!("joined after {k}, block {i}: {e:?}"));
            assert_eq!(got.len(), want.len(), "joined after {k}, block {i}");
            for (f, (name, value)) in got.iter().zip(want) {
                // Known parts are right; the rest is said to be unknown, never guessed.
                if let Some(n) = &f.name {
                    assert_eq!(n, name, "joined after {k}, block {i}");
                }
                if let Some(v) = &f.value {
                    assert_eq!(v, value, "joined after {k}, block {i}");
                }
                if f.name.is_none() || f.value.is_none() {
                    unknown += 1;
                    assert!(!was_exact, "an exact decoder returned an unknown field");
                }
                assert!(
                    f.value.is_some() || !was_synced,
                    "a synced decoder returned an unknown value"
                );
            }
        }
        // Fresh literals push the old entries out: a join ends synced once more than a table's
        // worth (4096 bytes) was inserted after it, here within 30 calls. Unknown names make
        // entry sizes lower bounds, so this can take a few calls more than the encoder's.
        if blocks.len() - k > 30 {
            assert!(
                d.synced(),
                "joined after {k}: not synced ({unknown} unknown)"
            );
        }
    }
}

#[test]
fn a_name_spelled_out_after_attach_makes_the_decoder_exact() {
    // Joined mid-stream: entry 62 is from before attach.
    let mut d = Decoder::new(true);
    // Literal with indexing, name from index 62 (unknown), value "a".
    let got = d.decode(&[0x40 | 62, 0x01, b'a']).unwrap();
    assert_eq!(got[0].name, None);
    assert_eq!(got[0].value.as_deref(), Some(&b"a"[..]));
    assert!(!d.exact());
    // Size updates to 0 and back to 4096 empty the table: everything after is known.
    let got = d
        .decode(&[0x20, 0x3f, 0xe1, 0x1f, 0x40, 0x01, b'k', 0x01, b'v', 0xbe])
        .unwrap();
    assert_eq!(
        got[1].name.as_deref(),
        Some(&b"k"[..]),
        "index 62 is the new entry"
    );
    assert!(d.exact() && d.synced());
}

#[test]
fn malformed_blocks_are_errors_not_panics() {
    let mut d = Decoder::new(false);
    assert_eq!(d.decode(&[0x80]), Err(Error::BadIndex(0)));
    assert_eq!(
        d.decode(&[0xbe]),
        Err(Error::BadIndex(62)),
        "empty table, exact"
    );
    assert_eq!(d.decode(&[0x40, 0x05, b'a']), Err(Error::Truncated));
    assert_eq!(
        d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        Err(Error::Overflow)
    );
    assert_eq!(
        d.decode(&[0x82, 0x3f, 0xe1, 0x1f]),
        Err(Error::BadSizeUpdate)
    );
    let mut d = Decoder::new(true);
    assert_eq!(
        d.decode(&[0xbe]),
        Ok(vec![Field {
            name: None,
            value: None
        }]),
        "joined mid-stream: unknown, counted"
    );
    assert_eq!(d.stats.unknown_refs, 1);
    // Random bytes: any result, never a panic.
    let mut x: u32 = 0x1234_5678;
    for _ in 0..2000 {
        let block: Vec<u8> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let _ = Decoder::new(x & 1 == 0).decode(&block);
    }
}

/// A literal without indexing (name by static index, or spelled out when `name` is 0) whose
/// value is Huffman-coded, prefixed `0000`, or `0001` (never indexed) if `never`.
fn unindexed(name: u8, spelled: &str, value: &str, never: bool) -> Vec<u8> {
    let flags = if never { 0x10 } else { 0 };
    // The name's index with a 4-bit prefix (RFC 7541 5.1); below 15 + 128 here.
    let mut out = if name < 15 {
        vec![flags | name]
    } else {
        vec![flags | 0x0f, name - 15]
    };
    if name == 0 {
        out.push(spelled.len() as u8);
        out.extend_from_slice(spelled.as_bytes());
    }
    let mut coded = Vec::new();
    httlib_huffman::encode(value.as_bytes(), &mut coded).unwrap();
    out.push(0x80 | coded.len() as u8);
    out.extend_from_slice(&coded);
    out
}

fn pairs(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
    d.decode(block)
        .unwrap()
        .into_iter()
        .map(|f| {
            let text = |b: Option<Vec<u8>>| String::from_utf8(b.unwrap()).unwrap();
            (text(f.name), text(f.value))
        })
        .collect()
}

#[test]
fn unindexed_strings_sent_again_decode_as_themselves() {
    let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
    // h2load's request block as recorded (grpc-h2load.bin): `:path`, a Huffman literal without
    // indexing, in every block.
    let recorded = [
        0x04, 0x8f, 0x61, 0x13, 0x9e, 0xb5, 0xfb, 0x85, 0x7d, 0x56, 0x48, 0x5b, 0x10, 0xc6, 0xb3,
        0x55, 0x37, 0x86,
    ];
    let mut d = Decoder::new(false);
    for _ in 0..3 {
        assert_eq!(
            pairs(&mut d, &recorded),
            [
                pair(":path", "/shop.v1.Orders/Ping"),
                pair(":scheme", "http")
            ]
        );
    }
    // More strings than are remembered, in turn and under other names: each is itself.
    let values = [
        "/a.B/C",
        "/a.B/D",
        "/shop.v1.Orders/Ping",
        "x-long-value-0123456789",
    ];
    for round in 0..3 {
        for (i, v) in values.iter().enumerate() {
            let block = if (i + round) % 2 == 0 {
                unindexed(4, "", v, false)
            } else {
                unindexed(0, "x-route", v, false)
            };
            let name = if (i + round) % 2 == 0 {
                ":path"
            } else {
                "x-route"
            };
            assert_eq!(pairs(&mut d, &block), [pair(name, v)], "round {round}");
        }
    }
    // A string longer than is remembered, twice.
    let long = "/".to_string() + &"segment/".repeat(12);
    for _ in 0..2 {
        assert_eq!(
            pairs(&mut d, &unindexed(4, "", &long, false)),
            [pair(":path", &long)]
        );
    }
    // Never-indexed fields are the encoder's sensitive ones: decoded, never remembered.
    let mut d = Decoder::new(false);
    for _ in 0..2 {
        assert_eq!(
            pairs(&mut d, &unindexed(23, "", "Bearer s3cr3t", true)),
            [pair("authorization", "Bearer s3cr3t")]
        );
    }
    assert!(
        d.repeats
            .entries
            .iter()
            .all(|(r, v)| r.is_empty() && v.is_empty())
    );
}

/// A class that differs between most names, never 0 (the class of an unknown name).
fn name_class(name: &[u8]) -> u8 {
    name.iter()
        .fold(7u8, |a, &b| a.wrapping_mul(31).wrapping_add(b))
        .max(1)
}

static HASHED: std::sync::LazyLock<Classes> = std::sync::LazyLock::new(|| Classes::new(name_class));

/// Each field comes with its name's class however the name was sent (a static index, a
/// dynamic one, a literal entering the table or not, a name taken by index for a new entry),
/// also on connections joined late, where a field whose name is unknown gets class 0.
#[test]
fn every_field_comes_with_its_names_class() {
    let (blocks, _) = fixtures();
    for joined_after in [0, 1, 40] {
        let mut d = Decoder::classifying(joined_after > 0, &HASHED);
        let (mut named, mut unnamed) = (0, 0);
        for block in &blocks[joined_after..] {
            d.decode_with(block, &mut |class, name, _| match name {
                Some(n) => {
                    assert_eq!(class, name_class(n), "{}", String::from_utf8_lossy(n));
                    named += 1;
                }
                None => {
                    assert_eq!(class, 0);
                    unnamed += 1;
                }
            })
            .unwrap();
        }
        assert!(named > 500, "{named}");
        assert_eq!(unnamed > 0, joined_after > 0, "{unnamed}");
    }
}
