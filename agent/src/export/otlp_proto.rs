//! Spans straight into OTLP protobuf bytes. Resource and scope (one per process per batch) go
//! through opentelemetry-proto's generated messages; spans, the volume, are written field by
//! field from the record itself (`otlp_span`). Building the generated
//! messages first (a String per attribute key, then prost's nested length passes) was a fifth of
//! the agent's CPU in a profile of the nginx bench; the SDK path before that, half. Field numbers
//! are those of opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto; the tests
//! decode the output with the generated messages.

use std::{borrow::Borrow, sync::Arc};

use super::{otlp_grpc::Body, otlp_span::span};
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
};
use prost::{
    Message as _,
    encoding::{WireType, encode_varint, encoded_len_varint},
};

use crate::{process::ProcessInfo, trace::span::SpanRecord};

mod field {
    // ExportTraceServiceRequest
    pub const RESOURCE_SPANS: u32 = 1;
    // ResourceSpans
    pub const RESOURCE: u32 = 1;
    pub const SCOPE_SPANS: u32 = 2;
    // ScopeSpans
    pub const SCOPE: u32 = 1;
    pub const SPANS: u32 = 2;
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// The OpenTelemetry resource of a traced process.
pub fn resource(p: &ProcessInfo, host_name: &str) -> Resource {
    let s = |v: &str| any_value::Value::StringValue(v.to_string());
    let mut attributes = vec![
        kv("service.name", s(&p.service_name)),
        kv("process.pid", any_value::Value::IntValue(p.pid.into())),
        kv("process.executable.name", s(&p.executable_name)),
        kv("process.command_line", s(&p.command_line)),
        kv("host.name", s(host_name)),
        kv("telemetry.sdk.name", s("loupe")),
        kv("telemetry.sdk.language", s("rust")),
        kv("telemetry.sdk.version", s(env!("CARGO_PKG_VERSION"))),
    ];
    attributes.extend(p.attributes.iter().map(|(k, v)| kv(k, s(v))));
    Resource {
        attributes,
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "loupe".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
}

/// A varint; the one-byte case (every key and most lengths of a span) inline: prost's
/// `encode_varint`, called out of line per byte written, was 3% of the agent's CPU.
#[inline(always)]
fn put_varint(buf: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
    } else {
        encode_varint(v, buf);
    }
}

#[inline(always)]
fn put_key(buf: &mut Vec<u8>, tag: u32, wire_type: WireType) {
    put_varint(buf, u64::from(tag << 3 | wire_type as u32));
}

/// A length-delimited field: bytes, a string or an encoded message.
fn delimited(buf: &mut Vec<u8>, tag: u32, data: &[u8]) {
    put_key(buf, tag, WireType::LengthDelimited);
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

/// Bytes kept for the length of a nested message before its body is written: the length of a
/// span (a few hundred bytes) is two varint bytes, a process's group (up to a batch) three.
const SPAN_LEN_GUESS: usize = 2;
const GROUP_LEN_GUESS: usize = 3;

/// A length-delimited message written in place: room for its length is left before the body
/// and filled in after, so each span is walked once (a pass computing lengths first was a third
/// of the encoding's time). The body moves only when its length's varint is not the guessed
/// size, which for a span means under 128 or over 16 383 bytes; the output stays canonical
/// (minimal varints), byte for byte what prost writes.
#[inline(always)]
fn nested(buf: &mut Vec<u8>, tag: u32, guess: usize, body: impl FnOnce(&mut Vec<u8>)) {
    put_key(buf, tag, WireType::LengthDelimited);
    let at = buf.len();
    buf.resize(at + guess, 0);
    body(buf);
    let len = buf.len() - at - guess;
    let need = encoded_len_varint(len as u64);
    if need != guess {
        if need > guess {
            buf.resize(buf.len() + need - guess, 0);
        }
        buf.copy_within(at + guess..at + guess + len, at + need);
        buf.truncate(at + need + len);
    }
    let mut prefix = &mut buf[at..at + need];
    encode_varint(len as u64, &mut prefix);
}

/// One ExportTraceServiceRequest: a ResourceSpans per process, in the order given. `size_hint`
/// is the expected size in bytes (the caller's running average): the request is one
/// allocation when it holds, and grows by doubling when it does not.
pub fn encode_request<S: Borrow<SpanRecord>>(
    groups: &[(Resource, Vec<S>)],
    size_hint: usize,
) -> Body {
    request(groups, size_hint, |out, records| {
        for record in records {
            nested(out, field::SPANS, SPAN_LEN_GUESS, |out| {
                span(out, record.borrow())
            });
        }
    })
}

/// The same request from spans already encoded (`EncodedSpans`): each group's spans are its
/// messages' bytes, copied in. Byte for byte what `encode_request` writes for the records.
pub fn encode_encoded_request(groups: &[(Resource, Vec<&[u8]>)], size_hint: usize) -> Body {
    request(groups, size_hint, |out, spans| {
        for bytes in spans {
            delimited(out, field::SPANS, bytes);
        }
    })
}

/// ResourceSpans { resource, ScopeSpans { scope, spans... } } per group; `spans` writes a
/// group's Span fields.
fn request<G>(
    groups: &[(Resource, G)],
    size_hint: usize,
    mut spans: impl FnMut(&mut Vec<u8>, &G),
) -> Body {
    let scope = scope().encode_to_vec();
    let mut out = Body::buffer(size_hint);
    for (resource, group) in groups {
        nested(&mut out, field::RESOURCE_SPANS, GROUP_LEN_GUESS, |out| {
            put_key(out, field::RESOURCE, WireType::LengthDelimited);
            put_varint(out, resource.encoded_len() as u64);
            resource.encode_raw(out);
            nested(out, field::SCOPE_SPANS, GROUP_LEN_GUESS, |out| {
                delimited(out, field::SCOPE, &scope);
                spans(out, group);
            });
        });
    }
    Body::finish(out)
}

/// Spans in their wire form, each with its process: what the pipeline hands the exporter when
/// OTLP is the only output. A span is encoded on the pipeline's thread right after it is built,
/// while its attributes are in that core's cache, and its record is freed there, where the
/// next span reuses the memory. Encoded by the exporter instead, every record crossed cores
/// twice (built on one, read and freed on the other): the next span's attribute list was
/// written into lines the exporter's core held, and each shared text's reference count moved
/// between the cores once per span.
#[derive(Debug, Default)]
pub struct EncodedSpans {
    /// Span messages back to back, each its fields without its own key and length.
    bytes: Vec<u8>,
    /// Per span: its process and where its message ends in `bytes`.
    spans: Vec<(u32, usize)>,
    /// The command name of each process with spans here, for its resource should the process
    /// be gone from /proc by export time.
    comms: Vec<(u32, Arc<str>)>,
}

impl EncodedSpans {
    /// Room for `spans` spans of `bytes` bytes in all.
    pub fn with_room(spans: usize, bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(spans),
            comms: Vec::new(),
        }
    }

    /// Room for as many spans and bytes as `like` holds.
    pub fn with_capacity_of(like: &EncodedSpans) -> Self {
        Self {
            bytes: Vec::with_capacity(like.bytes.capacity()),
            spans: Vec::with_capacity(like.spans.capacity()),
            comms: Vec::new(),
        }
    }

    pub fn push(&mut self, s: &SpanRecord) {
        span(&mut self.bytes, s);
        self.spans.push((s.pid, self.bytes.len()));
        self.note_comm(s.pid, &s.comm);
    }

    fn note_comm(&mut self, pid: u32, comm: &Arc<str>) {
        // Consecutive spans are mostly of one process; a batch holds a few.
        if self.comms.last().is_some_and(|(p, _)| *p == pid)
            || self.comms.iter().any(|(p, _)| *p == pid)
        {
            return;
        }
        self.comms.push((pid, comm.clone()));
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The process and the message bytes of span `i`.
    pub fn get(&self, i: usize) -> (u32, &[u8]) {
        let start = if i == 0 { 0 } else { self.spans[i - 1].1 };
        let (pid, end) = self.spans[i];
        (pid, &self.bytes[start..end])
    }

    /// The command name recorded with `pid`'s spans.
    pub fn comm(&self, pid: u32) -> &str {
        self.comms
            .iter()
            .find(|(p, _)| *p == pid)
            .map_or("", |(_, c)| c)
    }

    /// Bytes of span messages held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The exporter's batch of encoded spans: ranges of the pipeline's hand-overs, kept where they
/// arrived. Gathering them into one buffer copied every span once more on its way to the request.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    parts: Vec<(Arc<EncodedSpans>, std::ops::Range<usize>)>,
    len: usize,
    bytes: usize,
}

impl EncodedBatch {
    /// Takes spans `range` of the hand-over `spans` (which another batch may share).
    pub fn push(&mut self, spans: &Arc<EncodedSpans>, range: std::ops::Range<usize>) {
        if range.is_empty() {
            return;
        }
        let from = if range.start == 0 {
            0
        } else {
            spans.spans[range.start - 1].1
        };
        self.bytes += spans.spans[range.end - 1].1 - from;
        self.len += range.len();
        self.parts.push((spans.clone(), range));
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each span's process and message bytes, in the order taken.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.parts
            .iter()
            .flat_map(|(spans, range)| range.clone().map(|i| spans.get(i)))
    }

    /// The command name recorded with `pid`'s spans.
    pub fn comm(&self, pid: u32) -> &str {
        self.parts
            .iter()
            .map(|(spans, _)| spans.comm(pid))
            .find(|c| !c.is_empty())
            .unwrap_or("")
    }

    /// Bytes of span messages held.
    pub fn byte_len(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        self.parts.clear();
        self.len = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        trace::v1::{span, status},
    };

    use super::*;
    use crate::{
        export::otlp_span::{HAS_IS_REMOTE, IS_REMOTE, SAMPLED},
        trace::span::{SpanKind, Value},
    };

    fn record() -> SpanRecord {
        SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: Some([3; 8]),
            parent_is_remote: true,
            trace_state: "k=v".into(),
            name: "GET /users/{id}".into(),
            kind: SpanKind::Server,
            start_unix_ns: 10,
            end_unix_ns: 20,
            attributes: vec![
                ("http.request.method", Value::Static("GET")),
                ("url.path", Value::Str("/users/7".into())),
                ("http.response.status_code", Value::Int(503)),
            ],
            error: Some("503".into()),
            status: None,
            pid: 42,
            comm: "srv".into(),
        }
    }

    #[test]
    fn a_span_survives_the_wire_format() {
        let process = ProcessInfo {
            pid: 42,
            service_name: "users".into(),
            attributes: vec![("k8s.pod.name".into(), "users-0".into())],
            ..ProcessInfo::default()
        };
        let bytes = encode_request(&[(resource(&process, "node-1"), vec![record()])], 0).message();
        let back = ExportTraceServiceRequest::decode(bytes).unwrap();
        let rs = &back.resource_spans[0];
        let res_attr = |k: &str| {
            rs.resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .find(|a| a.key == k)
                .cloned()
        };
        assert_eq!(
            res_attr("service.name").unwrap().value.unwrap().value,
            Some(any_value::Value::StringValue("users".into()))
        );
        assert!(res_attr("k8s.pod.name").is_some());
        assert!(res_attr("host.name").is_some());
        let scope = &rs.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "loupe");
        let s = &scope.spans[0];
        assert_eq!(s.trace_id, vec![1; 16]);
        assert_eq!(s.span_id, vec![2; 8]);
        assert_eq!(s.parent_span_id, vec![3; 8]);
        assert_eq!(s.flags, SAMPLED | HAS_IS_REMOTE | IS_REMOTE);
        assert_eq!(s.trace_state, "k=v");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 20));
        let status = s.status.as_ref().unwrap();
        assert_eq!(status.code, status::StatusCode::Error as i32);
        assert_eq!(status.message, "503");
        let attrs: Vec<(&str, Option<&any_value::Value>)> = s
            .attributes
            .iter()
            .map(|a| {
                (
                    a.key.as_str(),
                    a.value.as_ref().and_then(|v| v.value.as_ref()),
                )
            })
            .collect();
        assert_eq!(
            attrs,
            vec![
                (
                    "http.request.method",
                    Some(&any_value::Value::StringValue("GET".into()))
                ),
                (
                    "url.path",
                    Some(&any_value::Value::StringValue("/users/7".into()))
                ),
                (
                    "http.response.status_code",
                    Some(&any_value::Value::IntValue(503))
                ),
            ]
        );
    }

    #[test]
    fn a_root_span_has_no_parent_and_no_status() {
        let mut r = record();
        r.parent_span_id = None;
        r.parent_is_remote = false;
        r.error = None;
        r.trace_state = String::new();
        let bytes = encode_request(&[(Resource::default(), vec![r])], 64).message();
        let back = ExportTraceServiceRequest::decode(bytes).unwrap();
        let s = &back.resource_spans[0].scope_spans[0].spans[0];
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.flags, SAMPLED | HAS_IS_REMOTE);
        assert!(s.status.is_none());
        assert_eq!(s.kind, span::SpanKind::Server as i32);
    }

    #[test]
    fn spans_encoded_where_built_make_the_request_their_records_make() {
        // Spans of three processes, interleaved as a pipeline batch has them, some with
        // lengths in each varint size class.
        let mut records = Vec::new();
        for i in 0..90usize {
            let mut r = record();
            r.pid = [7, 3, 7, 9][i % 4];
            r.comm = format!("comm-{}", r.pid).into();
            r.span_id = [i as u8; 8];
            r.attributes
                .push(("long", Value::Str("x".repeat(i * i * 3))));
            r.error = (i % 5 == 0).then(|| "boom".into());
            records.push(r);
        }
        // Gathered in two pipeline batches, then cut into the exporter's batch at other places.
        let mut first = EncodedSpans::default();
        let mut second = EncodedSpans::default();
        for (i, r) in records.iter().enumerate() {
            if i < 50 { &mut first } else { &mut second }.push(r);
        }
        let (first, second) = (Arc::new(first), Arc::new(second));
        let mut batch = EncodedBatch::default();
        batch.push(&first, 0..20);
        batch.push(&first, 20..50);
        batch.push(&second, 0..0);
        batch.push(&second, 0..40);
        assert_eq!(batch.len(), 90);
        assert_eq!(batch.comm(9), "comm-9");
        assert_eq!(
            batch.byte_len(),
            first.byte_len() + second.byte_len(),
            "every byte counted once"
        );
        let spans: Vec<(u32, &[u8])> = batch.iter().collect();

        let mut order: Vec<(u32, usize)> =
            spans.iter().enumerate().map(|(i, s)| (s.0, i)).collect();
        order.sort_unstable();
        let mut from_bytes: Vec<(Resource, Vec<&[u8]>)> = Vec::new();
        let mut from_records: Vec<(Resource, Vec<&SpanRecord>)> = Vec::new();
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let process = ProcessInfo {
                pid: group[0].0,
                ..ProcessInfo::default()
            };
            from_bytes.push((
                resource(&process, "h"),
                group.iter().map(|&(_, i)| spans[i].1).collect(),
            ));
            from_records.push((
                resource(&process, "h"),
                group.iter().map(|&(_, i)| &records[i]).collect(),
            ));
        }
        assert_eq!(from_bytes.len(), 3);
        let encoded = encode_encoded_request(&from_bytes, 0).message();
        assert_eq!(
            encoded,
            encode_request(&from_records, 0).message(),
            "byte for byte"
        );
        let back = ExportTraceServiceRequest::decode(encoded).unwrap();
        let spans = &back.resource_spans[0].scope_spans[0].spans;
        let ids: Vec<u8> = spans.iter().map(|s| s.span_id[0]).collect();
        let want: Vec<u8> = (0..90u8).filter(|i| i % 4 == 1).collect();
        assert_eq!(ids, want, "pid 3's spans, in the order they were built");
    }

    #[test]
    fn many_processes_and_spans_decode_exactly() {
        // Lengths are filled in after each body: every size class of varint must come out right,
        // for spans (under 128 bytes, two bytes, over 16 KiB, over 2 MiB) and for groups.
        let mut groups = Vec::new();
        for pid in 0..4u32 {
            let mut spans = Vec::new();
            for i in 0..if pid == 3 { 1 } else { 60usize } {
                let mut r = record();
                r.pid = pid;
                r.kind = if i % 2 == 0 {
                    SpanKind::Client
                } else {
                    SpanKind::Server
                };
                r.name = "n".repeat(i * 7).into();
                r.attributes.push(("long", Value::Str("x".repeat(i * 300))));
                r.attributes.push(("neg", Value::Int(-(i as i64))));
                r.attributes.push(("empty", Value::Str(String::new())));
                r.error = (i % 3 == 0).then(|| "e".repeat(i * 5));
                if pid == 3 {
                    // A span of 60-odd bytes in a group of its own.
                    r.attributes.clear();
                    r.trace_state.clear();
                    r.error = None;
                }
                if pid == 2 && i == 59 {
                    r.attributes.push(("huge", Value::Str("y".repeat(3 << 20))));
                }
                spans.push(r);
            }
            let process = ProcessInfo {
                pid,
                ..ProcessInfo::default()
            };
            groups.push((resource(&process, "h"), spans));
        }
        let bytes = encode_request(&groups, 1 << 20).message();
        let back = ExportTraceServiceRequest::decode(bytes.clone()).unwrap();
        // Canonical: prost writes the decoded request back byte for byte (minimal varints,
        // fields in number order).
        assert_eq!(back.encode_to_vec(), bytes);
        assert_eq!(back.resource_spans.len(), 4);
        for (rs, (res, records)) in back.resource_spans.iter().zip(&groups) {
            assert_eq!(rs.resource.as_ref(), Some(res));
            let spans = &rs.scope_spans[0].spans;
            assert_eq!(spans.len(), records.len());
            for (s, r) in spans.iter().zip(records) {
                assert_eq!(s.name, &*r.name);
                assert_eq!(s.attributes.len(), r.attributes.len());
                let last = |k: &str| {
                    s.attributes
                        .iter()
                        .find(|a| a.key == k)
                        .and_then(|a| a.value.clone())
                        .and_then(|v| v.value)
                };
                assert_eq!(
                    last("long"),
                    r.attr("long")
                        .and_then(Value::as_str)
                        .map(|v| any_value::Value::StringValue(v.to_string()))
                );
                assert_eq!(
                    last("neg"),
                    match r.attr("neg") {
                        Some(Value::Int(i)) => Some(any_value::Value::IntValue(*i)),
                        _ => None,
                    }
                );
                assert_eq!(
                    last("empty"),
                    r.attr("empty")
                        .map(|_| any_value::Value::StringValue(String::new()))
                );
                assert_eq!(
                    s.status.as_ref().map(|st| st.message.clone()),
                    r.error.clone()
                );
                let kind = match r.kind {
                    SpanKind::Server => span::SpanKind::Server,
                    SpanKind::Client => span::SpanKind::Client,
                };
                assert_eq!(s.kind, kind as i32);
            }
        }
    }
}
