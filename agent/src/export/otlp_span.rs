//! One Span message, written into room reserved for it at once. A span is some twenty fields
//! and forty small writes; pushed one by one onto the buffer, every write checked the buffer's
//! room and the nested lengths were worked out field by field through prost's helpers (a span's
//! encoding was an eighth of the tracing sink's work). Here the worst case is reserved once,
//! each write is a store into that room, and every length is known before its field is written,
//! so nothing moves. Byte for byte the same canonical encoding (the tests of `otlp_proto`
//! decode it with the generated messages).

use std::mem::MaybeUninit;

use WireType::{
    LengthDelimited as LEN, SixtyFourBit as FIXED64, ThirtyTwoBit as FIXED32, Varint as VARINT,
};
use prost::encoding::{WireType, encoded_len_varint};

use crate::trace::span::{SpanKind, SpanRecord, Value};

/// W3C trace flags: every exported span is sampled.
pub(super) const SAMPLED: u32 = 0x01;
/// OTLP SpanFlags: whether the parent is remote is known, and whether it is.
pub(super) const HAS_IS_REMOTE: u32 = 0x100;
pub(super) const IS_REMOTE: u32 = 0x200;

/// Span.SpanKind and Status.StatusCode values.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;

/// Field numbers of opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
mod field {
    // Span
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    // Status
    pub const MESSAGE: u32 = 2;
    pub const CODE: u32 = 3;
    // KeyValue
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
    // AnyValue
    pub const STRING_VALUE: u32 = 1;
    pub const INT_VALUE: u32 = 3;
}

/// Most bytes a varint takes.
const VARINT_MAX: usize = 10;

/// Bytes of a key and length-delimited payload of `len` bytes.
#[inline(always)]
fn delimited_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

/// The reserved room and how much of it is written.
struct Room<'a> {
    out: &'a mut [MaybeUninit<u8>],
    at: usize,
}

impl Room<'_> {
    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.out[self.at].write(b);
        self.at += 1;
    }

    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) {
        copy_short(&mut self.out[self.at..self.at + b.len()], b);
        self.at += b.len();
    }

    #[inline(always)]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    #[inline(always)]
    fn key(&mut self, tag: u32, wire_type: WireType) {
        self.varint(u64::from(tag << 3 | wire_type as u32));
    }

    #[inline(always)]
    fn delimited(&mut self, tag: u32, data: &[u8]) {
        self.key(tag, LEN);
        self.varint(data.len() as u64);
        self.bytes(data);
    }

    #[inline(always)]
    fn varint_field(&mut self, tag: u32, v: u64) {
        self.key(tag, VARINT);
        self.varint(v);
    }

    #[inline(always)]
    fn fixed64(&mut self, tag: u32, v: u64) {
        self.key(tag, FIXED64);
        self.bytes(&v.to_le_bytes());
    }

    #[inline(always)]
    fn fixed32(&mut self, tag: u32, v: u32) {
        self.key(tag, FIXED32);
        self.bytes(&v.to_le_bytes());
    }

    /// Four bytes at once.
    #[inline(always)]
    fn word(&mut self, w: [u8; 4]) {
        self.out[self.at..self.at + 4].write_copy_of_slice(&w);
        self.at += 4;
    }

    /// One KeyValue attribute. Nearly every one is short (a key of 10 to 25 bytes, a value
    /// under 100): each of its lengths is then one byte, and the four bytes before the key and
    /// those before the value are each written as one word (byte by byte, with every length
    /// worked out through the varint helpers, attributes were half of a span's encoding).
    #[inline(always)]
    fn attribute(&mut self, key: &str, value: &Value) {
        let k = key.len();
        match value {
            Value::Int(i) if k <= SHORT_KEY && (0..1 << 21).contains(i) => {
                // AnyValue: key and a varint of 1 to 3 bytes.
                let any_len = 1 + encoded_len_varint(*i as u64);
                self.word(short_prefix(k, any_len));
                self.bytes(key.as_bytes());
                self.byte(byte_key(field::VALUE, LEN));
                self.byte(any_len as u8);
                self.byte(byte_key(field::INT_VALUE, VARINT));
                self.varint(*i as u64);
            }
            Value::Int(i) => {
                self.attribute_at_length(key, value, 1 + encoded_len_varint(*i as u64))
            }
            v => {
                let text = value_str(v).as_bytes();
                let t = text.len();
                if k + t > SHORT_TEXTS {
                    return self.attribute_at_length(
                        key,
                        value,
                        delimited_len(field::STRING_VALUE, t),
                    );
                }
                let any_len = 2 + t;
                self.word(short_prefix(k, any_len));
                self.bytes(key.as_bytes());
                self.word([
                    byte_key(field::VALUE, LEN),
                    any_len as u8,
                    byte_key(field::STRING_VALUE, LEN),
                    t as u8,
                ]);
                self.bytes(text);
            }
        }
    }

    /// One KeyValue attribute whose AnyValue is `any_len` bytes, lengths of any size.
    #[inline(never)]
    fn attribute_at_length(&mut self, key: &str, value: &Value, any_len: usize) {
        let kv_len = delimited_len(field::KEY, key.len()) + delimited_len(field::VALUE, any_len);
        self.key(field::ATTRIBUTES, LEN);
        self.varint(kv_len as u64);
        self.delimited(field::KEY, key.as_bytes());
        self.key(field::VALUE, LEN);
        self.varint(any_len as u64);
        match value {
            Value::Int(i) => self.varint_field(field::INT_VALUE, *i as u64),
            v => self.delimited(field::STRING_VALUE, value_str(v).as_bytes()),
        }
    }
}

/// A KeyValue's length is one byte (under 128) when its key and its AnyValue's `any_len` bytes
/// come to at most 123 with their keys and lengths (4): a key of up to `SHORT_KEY` bytes with an
/// integer (AnyValue at most 4 bytes), or a key and a text of up to `SHORT_TEXTS` bytes together
/// (AnyValue 2 more than the text).
const SHORT_KEY: usize = 119;
const SHORT_TEXTS: usize = 121;

/// A field's key when it is one byte (field numbers up to 15).
const fn byte_key(tag: u32, wire_type: WireType) -> u8 {
    (tag << 3 | wire_type as u32) as u8
}

/// The Span field's key, the KeyValue's length, the key's field key and its length, for a key
/// of `k` bytes and an AnyValue of `any_len`, all short.
#[inline(always)]
fn short_prefix(k: usize, any_len: usize) -> [u8; 4] {
    [
        byte_key(field::ATTRIBUTES, LEN),
        (2 + k + 2 + any_len) as u8,
        byte_key(field::KEY, LEN),
        k as u8,
    ]
}

/// `src` into `dst` (of the same length). A span's texts are mostly short (keys of 10 to 25
/// bytes, a method, an address): up to 32 bytes they are copied as two overlapping loads and
/// stores of the widest size that fits, not by a call to memcpy (26 calls per HTTP span, with
/// their size dispatch, were a tenth of encoding it).
#[inline(always)]
fn copy_short(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
    #[inline(always)]
    fn ends<const N: usize>(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
        let n = src.len();
        let head: [u8; N] = *src.first_chunk().expect("n >= N");
        let tail: [u8; N] = *src.last_chunk().expect("n >= N");
        dst[..N].write_copy_of_slice(&head);
        dst[n - N..].write_copy_of_slice(&tail);
    }
    debug_assert_eq!(dst.len(), src.len());
    match src.len() {
        0 => {}
        n @ 1..4 => {
            for (d, s) in dst[..n].iter_mut().zip(src) {
                d.write(*s);
            }
        }
        4..8 => ends::<4>(dst, src),
        8..16 => ends::<8>(dst, src),
        16..=32 => ends::<16>(dst, src),
        _ => {
            dst.write_copy_of_slice(src);
        }
    }
}

#[inline(always)]
fn value_str(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The most bytes `s` can take: every varint counted at its widest.
fn bound(s: &SpanRecord) -> usize {
    // Ids, kind, times, flags, and the keys and lengths of the variable fields.
    let fixed = 18 + 10 + 10 + 11 + 10 + 11 + 11 + 6 + 2 * (1 + VARINT_MAX);
    let attributes: usize = s
        .attributes
        .iter()
        .map(|(k, v)| k.len() + value_str(v).len() + 7 + 4 * VARINT_MAX)
        .sum();
    let status = s
        .error
        .as_ref()
        .map_or(0, |m| m.len() + 2 + 1 + 2 * VARINT_MAX + 2 + VARINT_MAX);
    fixed + s.trace_state.len() + s.name.len() + attributes + status
}

/// The fields of one Span message (without its own key and length) onto the end of `buf`.
pub(super) fn span(buf: &mut Vec<u8>, s: &SpanRecord) {
    buf.reserve(bound(s));
    let start = buf.len();
    let mut room = Room {
        out: buf.spare_capacity_mut(),
        at: 0,
    };
    fields(&mut room, s);
    let written = room.at;
    // SAFETY: `fields` initialised the first `written` bytes of the spare capacity (every write
    // goes through `Room`, which stores each byte it counts).
    unsafe { buf.set_len(start + written) };
}

fn fields(out: &mut Room<'_>, s: &SpanRecord) {
    out.delimited(field::TRACE_ID, &s.trace_id);
    out.delimited(field::SPAN_ID, &s.span_id);
    if !s.trace_state.is_empty() {
        out.delimited(field::TRACE_STATE, s.trace_state.as_bytes());
    }
    if let Some(parent) = &s.parent_span_id {
        out.delimited(field::PARENT_SPAN_ID, parent);
    }
    // proto3 leaves empty strings out (what prost and the SDKs write).
    if !s.name.is_empty() {
        out.delimited(field::NAME, s.name.as_bytes());
    }
    out.varint_field(field::KIND, span_kind(s));
    out.fixed64(field::START, s.start_unix_ns);
    out.fixed64(field::END, s.end_unix_ns);
    for (k, v) in &s.attributes {
        out.attribute(k, v);
    }
    if let Some(message) = &s.error {
        let message_len = if message.is_empty() {
            0
        } else {
            delimited_len(field::MESSAGE, message.len())
        };
        out.key(field::STATUS, LEN);
        out.varint((message_len + 2) as u64);
        if !message.is_empty() {
            out.delimited(field::MESSAGE, message.as_bytes());
        }
        out.varint_field(field::CODE, STATUS_ERROR);
    }
    let remote = if s.parent_is_remote { IS_REMOTE } else { 0 };
    out.fixed32(field::FLAGS, SAMPLED | HAS_IS_REMOTE | remote);
}

fn span_kind(s: &SpanRecord) -> u64 {
    match s.kind {
        SpanKind::Server => KIND_SERVER,
        SpanKind::Client => KIND_CLIENT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_decode_exactly_on_both_sides_of_every_short_form() {
        use opentelemetry_proto::tonic::{common::v1::any_value, trace::v1::Span};
        use prost::Message as _;

        // Keys are static; leak one per length (a test's few hundred bytes).
        let key = |n: usize| -> &'static str { Box::leak("k".repeat(n).into_boxed_str()) };
        let mut attributes = Vec::new();
        // Texts whose key and value together sit around `SHORT_TEXTS`, and long ones. (Keys
        // are never empty: proto3 would leave an empty one out, and so would prost.)
        for (k, t) in [
            (1, 0),
            (1, 1),
            (60, 61),
            (60, 62),
            (120, 1),
            (121, 0),
            (122, 0),
        ] {
            attributes.push((key(k), Value::Str("v".repeat(t))));
        }
        for t in [115, 116, 117, 130, 200, 20_000] {
            attributes.push((key(5), Value::Str("v".repeat(t))));
        }
        // Integers of every varint length, negatives, and keys around `SHORT_KEY`.
        for i in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            (1 << 21) - 1,
            1 << 21,
            -1,
            i64::MIN,
        ] {
            attributes.push((key(12), Value::Int(i)));
        }
        for k in [118, 119, 120, 127, 128, 300] {
            attributes.push((key(k), Value::Int((1 << 21) - 1)));
        }
        let record = SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            name: "n".into(),
            kind: SpanKind::Server,
            start_unix_ns: 1,
            end_unix_ns: 2,
            attributes,
            error: None,
            status: None,
            pid: 1,
            comm: "c".into(),
        };
        let mut bytes = vec![0xee];
        span(&mut bytes, &record);
        let back = Span::decode(&bytes[1..]).unwrap();
        // Canonical: prost writes the decoded span back byte for byte.
        assert_eq!(back.encode_to_vec(), &bytes[1..]);
        assert_eq!(back.attributes.len(), record.attributes.len());
        for (got, (k, v)) in back.attributes.iter().zip(&record.attributes) {
            assert_eq!(got.key, *k);
            let want = match v {
                Value::Int(i) => any_value::Value::IntValue(*i),
                v => any_value::Value::StringValue(value_str(v).to_string()),
            };
            assert_eq!(got.value.as_ref().and_then(|a| a.value.clone()), Some(want));
        }
    }

    #[test]
    fn short_copies_are_exact_at_every_length() {
        let src: Vec<u8> = (1..=70).collect();
        for len in 0..=src.len() {
            // The source ends where its slice ends: nothing past it may be read.
            let from = &src[src.len() - len..];
            let mut dst = vec![MaybeUninit::new(0u8); len + 8];
            copy_short(&mut dst[4..4 + len], from);
            let got: Vec<u8> = dst.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(&got[4..4 + len], from, "length {len}");
            assert!(
                got[..4].iter().chain(&got[4 + len..]).all(|b| *b == 0),
                "length {len}: wrote outside"
            );
        }
    }
}
