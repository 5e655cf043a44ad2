//! Spans straight into OTLP protobuf bytes. Resource and scope (one per process per batch) go
//! through opentelemetry-proto's generated messages; spans, the volume, are written field by
//! field from the record itself (`otlp_span`). Building the generated
//! messages first (a String per attribute key, then prost's nested length passes) was a fifth of
//! the agent's CPU in a profile of the nginx bench; the SDK path before that, half. Field numbers
//! are those of opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto; the tests
//! decode the output with the generated messages.

use std::{borrow::Borrow, collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use foldhash::HashMap;

use super::{otlp_grpc::Body, otlp_span::span};
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
};
use prost::{
    Message as _,
    encoding::{WireType, decode_varint, encode_varint, encoded_len_varint},
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
    let scope = scope().encode_to_vec();
    let mut out = Body::buffer(size_hint);
    for (resource, group) in groups {
        nested(&mut out, field::RESOURCE_SPANS, GROUP_LEN_GUESS, |out| {
            put_key(out, field::RESOURCE, WireType::LengthDelimited);
            put_varint(out, resource.encoded_len() as u64);
            resource.encode_raw(out);
            nested(out, field::SCOPE_SPANS, GROUP_LEN_GUESS, |out| {
                delimited(out, field::SCOPE, &scope);
                for record in group {
                    nested(out, field::SPANS, SPAN_LEN_GUESS, |out| {
                        span(out, record.borrow())
                    });
                }
            });
        });
    }
    Body::finish(out)
}

/// Spans in their wire form, grouped by process: what the pipeline hands the exporter when
/// OTLP is the only output. A span is encoded on the pipeline's thread right after it is built,
/// while its attributes are in that core's cache, and its record is freed there, where the
/// next span reuses the memory. Encoded by the exporter instead, every record crossed cores
/// twice (built on one, read and freed on the other): the next span's attribute list was
/// written into lines the exporter's core held, and each shared text's reference count moved
/// between the cores once per span.
///
/// Each process's spans are written back to back as the `spans` fields of its `ScopeSpans`
/// (key, length, message), so a request sends them from where they were written: gathered into
/// one buffer per request instead, every span was copied once more, on the exporter's core
/// from lines the pipeline's core had written (14% of the exporter thread's time).
#[derive(Debug, Default)]
pub struct EncodedSpans {
    /// Per process with spans here, in the order first seen.
    groups: Vec<ProcessSpans>,
    /// Where each process's group is in `groups`.
    index: HashMap<u32, usize>,
    /// The group written last: consecutive spans are often of one process.
    last: usize,
    len: usize,
    /// Room for the first group made (`with_room`).
    first_room: usize,
}

#[derive(Debug)]
struct ProcessSpans {
    pid: u32,
    /// For the process's resource should it be gone from /proc by export time.
    comm: Arc<str>,
    bytes: Vec<u8>,
    spans: usize,
}

impl EncodedSpans {
    /// Room for `bytes` bytes of spans for the first process (its group is usually most).
    pub fn with_room(bytes: usize) -> Self {
        Self {
            first_room: bytes,
            ..Self::default()
        }
    }

    /// Room for as many bytes per process as `like` had, for the processes it holds spans of
    /// (groups that stay empty are skipped by the exporter and not carried further). The room
    /// used, a quarter over, was tried: hand-overs vary in size (a count or a time ends one), so
    /// a buffer grew, and was copied, in most hand-overs (+4% instructions per event).
    pub fn with_capacity_of(like: &EncodedSpans) -> Self {
        let mut next = Self::default();
        for g in like.groups.iter().filter(|g| g.spans > 0) {
            next.index.insert(g.pid, next.groups.len());
            next.groups.push(ProcessSpans {
                pid: g.pid,
                comm: g.comm.clone(),
                bytes: Vec::with_capacity(g.bytes.capacity()),
                spans: 0,
            });
        }
        next
    }

    pub fn push(&mut self, s: &SpanRecord) {
        let g = self.group(s.pid, &s.comm);
        nested(&mut g.bytes, field::SPANS, SPAN_LEN_GUESS, |out| {
            span(out, s)
        });
        g.spans += 1;
        self.len += 1;
    }

    /// `pid`'s group, made (or taken over, when empty) with the command name `comm`.
    #[inline]
    fn group(&mut self, pid: u32, comm: &Arc<str>) -> &mut ProcessSpans {
        let at = match self.groups.get(self.last) {
            Some(g) if g.pid == pid && g.spans > 0 => self.last,
            _ => self.find_or_add(pid, comm),
        };
        self.last = at;
        &mut self.groups[at]
    }

    #[cold]
    fn find_or_add(&mut self, pid: u32, comm: &Arc<str>) -> usize {
        if let Some(&at) = self.index.get(&pid) {
            let g = &mut self.groups[at];
            if g.spans == 0 {
                g.comm = comm.clone();
            }
            return at;
        }
        self.index.insert(pid, self.groups.len());
        self.groups.push(ProcessSpans {
            pid,
            comm: comm.clone(),
            bytes: Vec::with_capacity(std::mem::take(&mut self.first_room)),
            spans: 0,
        });
        self.groups.len() - 1
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each process's spans, handed to the exporter without a copy.
    pub fn into_runs(self) -> impl Iterator<Item = SpanRun> {
        self.groups
            .into_iter()
            .filter(|g| g.spans > 0)
            .map(|g| SpanRun {
                pid: g.pid,
                comm: g.comm,
                bytes: g.bytes.into(),
                spans: g.spans,
            })
    }
}

/// Consecutive spans of one process, each as a `ScopeSpans.spans` field.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRun {
    pub pid: u32,
    pub comm: Arc<str>,
    bytes: Bytes,
    spans: usize,
}

impl SpanRun {
    pub fn len(&self) -> usize {
        self.spans
    }

    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Takes the first `n` spans off (all of them if there are no more), by walking their
    /// lengths: a run is cut only when the exporter's batch ends inside it.
    pub fn split_to(&mut self, n: usize) -> SpanRun {
        if n >= self.spans {
            return std::mem::replace(
                self,
                SpanRun {
                    pid: self.pid,
                    comm: self.comm.clone(),
                    bytes: Bytes::new(),
                    spans: 0,
                },
            );
        }
        let mut at = 0;
        for _ in 0..n {
            let mut rest = self.bytes.get(at + 1..).unwrap_or_default();
            let before = rest.len();
            // Never fails on what `EncodedSpans::push` wrote; should it, the batch takes the
            // whole run rather than cut a span.
            let Ok(len) = decode_varint(&mut rest) else {
                return self.split_to(self.spans);
            };
            at += 1 + (before - rest.len()) + len as usize;
        }
        if at > self.bytes.len() {
            return self.split_to(self.spans);
        }
        self.spans -= n;
        SpanRun {
            pid: self.pid,
            comm: self.comm.clone(),
            bytes: self.bytes.split_to(at),
            spans: n,
        }
    }
}

/// The exporter's batch of encoded spans: per process, in pid order, the runs of the
/// hand-overs it took, sent from where the pipeline wrote them.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    groups: BTreeMap<u32, BatchGroup>,
    len: usize,
}

#[derive(Debug)]
struct BatchGroup {
    comm: Arc<str>,
    runs: Vec<Bytes>,
    bytes: usize,
}

impl EncodedBatch {
    pub fn push(&mut self, run: SpanRun) {
        if run.is_empty() {
            return;
        }
        self.len += run.spans;
        let g = self.groups.entry(run.pid).or_insert_with(|| BatchGroup {
            comm: run.comm,
            runs: Vec::new(),
            bytes: 0,
        });
        g.bytes += run.bytes.len();
        g.runs.push(run.bytes);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each process with spans here, in pid order, and the command name recorded with them.
    pub fn processes(&self) -> impl Iterator<Item = (u32, &str)> {
        self.groups.iter().map(|(pid, g)| (*pid, &*g.comm))
    }

    pub fn clear(&mut self) {
        self.groups.clear();
        self.len = 0;
    }
}

/// The request of `batch`, its processes' resources given in `processes()` order: the
/// resource and scope of each group written here, the spans sent where they lie. Byte for byte
/// what `encode_request` writes for the records.
pub fn encode_batch_request(batch: &EncodedBatch, resources: &[Resource]) -> Body {
    let scope = scope().encode_to_vec();
    let scope_field = field_len(scope.len());
    let mut heads = Body::buffer(resources.len() * 512);
    let mut layout = Vec::with_capacity(resources.len());
    for (resource, g) in resources.iter().zip(batch.groups.values()) {
        let resource_len = resource.encoded_len();
        let scope_spans_len = scope_field + g.bytes;
        let resource_spans_len = field_len(resource_len) + field_len(scope_spans_len);
        put_key(&mut heads, field::RESOURCE_SPANS, WireType::LengthDelimited);
        put_varint(&mut heads, resource_spans_len as u64);
        put_key(&mut heads, field::RESOURCE, WireType::LengthDelimited);
        put_varint(&mut heads, resource_len as u64);
        resource.encode_raw(&mut heads);
        put_key(&mut heads, field::SCOPE_SPANS, WireType::LengthDelimited);
        put_varint(&mut heads, scope_spans_len as u64);
        delimited(&mut heads, field::SCOPE, &scope);
        layout.push((heads.len(), &g.runs[..]));
    }
    Body::gather(heads, &layout)
}

/// Bytes of a length-delimited field of `len` bytes with a one-byte key.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
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
        let bytes = encode_request(&[(resource(&process, "node-1"), vec![record()])], 0)
            .message()
            .to_bytes();
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
        let bytes = encode_request(&[(Resource::default(), vec![r])], 64)
            .message()
            .to_bytes();
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
        // Gathered in two pipeline hand-overs, then cut into the exporter's batches at other
        // places (inside a process's run, too).
        let mut first = EncodedSpans::with_room(1 << 10);
        let mut second = EncodedSpans::default();
        for (i, r) in records.iter().enumerate() {
            if i < 50 { &mut first } else { &mut second }.push(r);
        }
        assert_eq!((first.len(), second.len()), (50, 40));
        let next = EncodedSpans::with_capacity_of(&first);
        assert!(next.is_empty());
        let mut batches = vec![EncodedBatch::default()];
        for (run, cut) in first
            .into_runs()
            .chain(second.into_runs())
            .zip([5, 100, 0, 7, 1, 30])
        {
            let mut run = run;
            let whole = run.len();
            let head = run.split_to(cut);
            assert_eq!(head.len() + run.len(), whole);
            batches.last_mut().unwrap().push(head);
            batches.push(EncodedBatch::default());
            batches.last_mut().unwrap().push(run);
        }
        assert_eq!(batches.iter().map(EncodedBatch::len).sum::<usize>(), 90);

        let mut sent = Vec::new();
        for batch in &batches {
            let resources: Vec<Resource> = batch
                .processes()
                .map(|(pid, comm)| {
                    assert_eq!(comm, format!("comm-{pid}"));
                    resource(
                        &ProcessInfo {
                            pid,
                            ..ProcessInfo::default()
                        },
                        "h",
                    )
                })
                .collect();
            let from_bytes = encode_batch_request(batch, &resources).message().to_bytes();
            let back = ExportTraceServiceRequest::decode(from_bytes.clone()).unwrap();
            // The records of the spans the request holds, grouped as the exporter groups them.
            let groups: Vec<(Resource, Vec<&SpanRecord>)> = back
                .resource_spans
                .iter()
                .zip(&resources)
                .map(|(rs, res)| {
                    let ids = rs.scope_spans[0].spans.iter().map(|s| s.span_id[0]);
                    (res.clone(), ids.map(|id| &records[id as usize]).collect())
                })
                .collect();
            assert_eq!(
                from_bytes,
                encode_request(&groups, 0).message().to_bytes(),
                "byte for byte what the records make"
            );
            sent.extend(back.resource_spans);
        }
        for pid in [3, 7, 9] {
            let res = resource(
                &ProcessInfo {
                    pid,
                    ..ProcessInfo::default()
                },
                "h",
            );
            let ids: Vec<u8> = sent
                .iter()
                .filter(|rs| rs.resource.as_ref() == Some(&res))
                .flat_map(|rs| rs.scope_spans[0].spans.iter().map(|s| s.span_id[0]))
                .collect();
            let want: Vec<u8> = (0..90u8)
                .filter(|&i| records[i as usize].pid == pid)
                .collect();
            assert_eq!(
                ids, want,
                "pid {pid}'s spans, each once, in the order they were built"
            );
        }
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
        let bytes = encode_request(&groups, 1 << 20).message().to_bytes();
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
