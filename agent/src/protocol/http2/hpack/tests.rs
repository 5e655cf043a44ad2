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
