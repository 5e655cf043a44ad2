//! One HTTP/2 connection seen from one process: frames read from both directions, header
//! blocks decoded in order (each may change its direction's HPACK table, so every one is
//! decoded, span or no span), requests and responses paired by stream id. Many streams
//! interleave; a stream's exchange completes when both directions have ended it (END_STREAM,
//! trailers), or it is reset (RST_STREAM), refused by GOAWAY, timed out or closed with the
//! connection. Streaming RPCs last the whole stream. Bodies are skipped by length, never
//! copied. Pure: timestamps come in with the segments.

use foldhash::{HashMap, HashMapExt};
use std::sync::LazyLock;

#[cfg(test)]
use bytes::Bytes;

use super::{frame, hpack};
use crate::{
    conn::Segment,
    protocol::{
        http1::{self, Head},
        text,
    },
    trace::exchange::{Exchange, Identity, Outcome, RequestStart},
};

/// Streams one connection may have open at once (beyond, new ones are dropped and counted;
/// SETTINGS_MAX_CONCURRENT_STREAMS is typically 100-250).
pub const MAX_STREAMS: usize = 1024;
/// A header block (HEADERS and its CONTINUATIONs) larger than this is not decoded: the
/// direction's table is then unknown, as after a gap.
const MAX_BLOCK: usize = 256 << 10;
/// Bytes kept while looking for a frame boundary after a gap or when joined mid-stream.
const MAX_RESYNC: usize = 64 << 10;

/// The headers a span reads: HTTP/1's (`http1::KEPT`: trace context, user agent, ...) and
/// gRPC's (`http1::KEPT_H2`), under their lowercase names. Everything else, credentials
/// included, is decoded (the table needs it) and dropped.
fn kept(name: &[u8]) -> Option<u8> {
    http1::kept_index(name).or_else(|| {
        http1::KEPT_H2
            .iter()
            .position(|k| k.as_bytes() == name)
            .map(|i| (http1::KEPT.len() + i) as u8)
    })
}

/// The pseudo-headers a span reads.
const PSEUDO: [&str; 4] = [":method", ":path", ":authority", ":status"];

/// A field name's class for the HPACK decoder: 0 for a name no span reads, 1 + its index in
/// `PSEUDO` for a pseudo-header, `HEADER` + its index in `http1::NAMES` for a kept header.
/// The decoder tells each table entry's class once, so a field sent by index (most fields
/// on a busy connection) is kept or dropped without its name being compared.
fn class(name: &[u8]) -> u8 {
    if name.first() == Some(&b':') {
        PSEUDO
            .iter()
            .position(|p| p.as_bytes() == name)
            .map_or(0, |i| 1 + i as u8)
    } else {
        kept(name).map_or(0, |i| HEADER + i)
    }
}

static CLASSES: LazyLock<hpack::Classes> = LazyLock::new(|| hpack::Classes::new(class));

/// The class of the pseudo-header `name`, at compile time.
const fn pseudo(name: &str) -> u8 {
    let mut i = 0;
    while i < PSEUDO.len() {
        if http1::same_text(PSEUDO[i], name) {
            return 1 + i as u8;
        }
        i += 1;
    }
    panic!("not a kept pseudo-header")
}

const METHOD: u8 = pseudo(":method");
const PATH: u8 = pseudo(":path");
const AUTHORITY: u8 = pseudo(":authority");
const STATUS: u8 = pseudo(":status");
/// The first header class.
const HEADER: u8 = 1 + PSEUDO.len() as u8;
const GRPC_STATUS: u8 = HEADER + http1::name_index("grpc-status");
const GRPC_MESSAGE: u8 = HEADER + http1::name_index("grpc-message");

fn decoder(midstream: bool) -> hpack::Decoder {
    hpack::Decoder::classifying(midstream, &CLASSES)
}

/// The fields of one header block a span reads (by class), their values copied together into
/// one buffer; both reused block after block.
#[derive(Default)]
struct Fields {
    text: Vec<u8>,
    kept: Vec<(u8, u32, u32)>,
}

impl Fields {
    fn clear(&mut self) {
        self.text.clear();
        self.kept.clear();
    }

    /// Keeps the field of a class a span reads.
    fn offer(&mut self, class: u8, value: &[u8]) {
        let at = self.text.len() as u32;
        self.text.extend_from_slice(value);
        self.kept.push((class, at, self.text.len() as u32));
    }

    fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.kept
            .iter()
            .map(|&(c, from, to)| (c, self.text((from, to))))
    }

    fn text(&self, (from, to): (u32, u32)) -> &[u8] {
        &self.text[from as usize..to as usize]
    }

    /// Where the field of `class` lies in `text`.
    fn range(&self, class: u8) -> Option<(u32, u32)> {
        self.kept
            .iter()
            .find(|&&(c, _, _)| c == class)
            .map(|&(_, from, to)| (from, to))
    }

    fn get(&self, class: u8) -> Option<&[u8]> {
        self.range(class).map(|r| self.text(r))
    }

    /// The kept headers (not pseudo-headers) by their index in `http1::NAMES`, and where each
    /// lies in `text`.
    fn header_ranges(&self) -> impl Iterator<Item = (u8, (u32, u32))> + Clone + '_ {
        self.kept
            .iter()
            .filter(|&&(c, _, _)| c >= HEADER)
            .map(|&(c, from, to)| (c - HEADER, (from, to)))
    }

    fn headers(&self) -> impl Iterator<Item = (u8, &[u8])> + Clone {
        self.header_ranges().map(|(i, r)| (i, self.text(r)))
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams dropped because `MAX_STREAMS` were open.
    pub overflow: u64,
    /// Places the frame layer lost sync (gaps, garbage) and looked for the next frame.
    pub resyncs: u64,
    /// Header blocks that did not decode (the direction's table is then unknown).
    pub hpack_errors: u64,
    /// Header fields that referenced table entries from before the agent attached.
    pub unknown_fields: u64,
    /// Responses for streams whose request was not seen.
    pub orphan_responses: u64,
    pub push_promises: u64,
    /// Streams reset (RST_STREAM) before they completed.
    pub resets: u64,
}

/// What a stream carried that gRPC spans need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grpc {
    /// `grpc-status` from trailers (or a trailers-only response).
    pub status: Option<u32>,
    pub message: Option<String>,
    /// Length-prefixed messages seen each way (streaming RPCs have many).
    pub requests: u64,
    pub responses: u64,
}

/// A completed stream: the HTTP exchange (request and response as heads, for the HTTP span
/// and causality code) and, for gRPC, its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Exchange {
    pub exchange: Exchange,
    /// Set when the request's content-type says gRPC.
    pub grpc: Option<Grpc>,
    pub stream_id: u32,
}

#[derive(Debug)]
struct Stream {
    identity: Identity,
    started: RequestStart,
    request: Head,
    response: Option<Head>,
    grpc: Option<Grpc>,
    start_ns: u64,
    last_ns: u64,
    request_ended: bool,
    response_ended: bool,
    /// Per direction: bytes left of the gRPC message being skipped, and the part of the next
    /// 5-byte length prefix read so far (a prefix may be split across reads).
    message_left: [u64; 2],
    prefix: [([u8; 5], usize); 2],
}

#[derive(Debug)]
enum State {
    /// The client preface is expected (requests direction of a connection seen from its start).
    Preface,
    /// At a frame header.
    Frame,
    /// Gathering this frame's payload.
    Payload(frame::Header),
    /// Skipping this many payload bytes (DATA bodies, PING, WINDOW_UPDATE, unknown types).
    Skip(u64),
    /// Looking for a frame boundary.
    Resync,
}

/// One direction's frame reader.
#[derive(Debug)]
struct Reader {
    state: State,
    buf: Vec<u8>,
    /// A header block being assembled: stream, type and flags of its first frame, bytes.
    block: Option<(u32, u8, u8, Vec<u8>)>,
    /// The stream whose DATA is being skipped, and whether that frame ends it.
    data_stream: u32,
    data_end: bool,
}

/// Index of the requests (client to server) and responses directions.
pub const REQUESTS: usize = 0;
pub const RESPONSES: usize = 1;

pub struct Session {
    readers: [Reader; 2],
    decoders: [hpack::Decoder; 2],
    streams: HashMap<u32, Stream>,
    /// Streams above this were refused by GOAWAY.
    goaway: Option<u32>,
    /// The current header block's fields (reused).
    fields: Fields,
    pub stats: SessionStats,
}

fn head_request(fields: &Fields) -> Head {
    let located = Head::request_in(
        &fields.text,
        fields.range(METHOD),
        fields.range(PATH),
        fields
            .range(AUTHORITY)
            .map(|a| (http1::HOST, a))
            .into_iter()
            .chain(fields.header_ranges()),
    );
    if let Some(head) = located {
        return head;
    }
    let text = |class| fields.get(class).map(String::from_utf8_lossy);
    Head::request_kept(
        text(METHOD).as_deref().unwrap_or("_OTHER"),
        text(PATH).as_deref().unwrap_or_default(),
        fields
            .get(AUTHORITY)
            .map(|a| (http1::HOST, a))
            .into_iter()
            .chain(fields.headers()),
    )
}

fn head_response(fields: &Fields) -> Option<Head> {
    let status = fields
        .get(STATUS)
        .and_then(|v| text::utf8(v)?.parse().ok())?;
    Some(Head::response(status, []))
}

impl Reader {
    fn new(state: State) -> Self {
        Self {
            state,
            buf: Vec::new(),
            block: None,
            data_stream: 0,
            data_end: false,
        }
    }
}

impl Session {
    /// `midstream`: joined after the connection started (no preface; unknown HPACK tables).
    pub fn new(midstream: bool) -> Self {
        let first = if midstream {
            State::Resync
        } else {
            State::Preface
        };
        Self {
            readers: [
                Reader::new(first),
                Reader::new(if midstream {
                    State::Resync
                } else {
                    State::Frame
                }),
            ],
            decoders: [decoder(midstream), decoder(midstream)],
            streams: HashMap::new(),
            goaway: None,
            fields: Fields::default(),
            stats: SessionStats::default(),
        }
    }

    /// Bytes held between calls (frames and header blocks being gathered).
    pub fn buffered(&self) -> usize {
        self.readers
            .iter()
            .map(|r| r.buf.len() + r.block.as_ref().map_or(0, |b| b.3.len()))
            .sum()
    }

    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// `read_into`, the completed streams returned (tests, the conformance harness).
    #[cfg(test)]
    pub fn on_bytes(
        &mut self,
        dir: usize,
        ts_ns: u64,
        tid: u32,
        segments: impl IntoIterator<Item = Segment>,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
    ) -> Vec<H2Exchange> {
        let mut done = Vec::new();
        self.read_into(dir, ts_ns, tid, segments, assign, &mut done);
        done
    }

    /// Bytes of direction `dir` (REQUESTS or RESPONSES), moved at `ts_ns` by thread `tid`.
    /// `assign` gives each new request stream its identity when its headers are decoded. The
    /// streams they complete are appended to `done`: the pipeline hands in one vector for every
    /// connection (a new one per read cost an allocation and its growth for every call that
    /// completed, ~3% of a gRPC call's instructions).
    pub fn read_into(
        &mut self,
        dir: usize,
        ts_ns: u64,
        tid: u32,
        segments: impl IntoIterator<Item = Segment>,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
        done: &mut Vec<H2Exchange>,
    ) {
        for seg in segments {
            match seg {
                Segment::Gap(n) => self.gap(dir, n),
                Segment::Data(b) => {
                    // Frames are read where they lie: in the segment itself when nothing is
                    // held from before (the usual case: a write is whole frames), else in the
                    // held bytes with the segment appended. Only an unfinished frame is kept.
                    let mut buf = std::mem::take(&mut self.readers[dir].buf);
                    if buf.is_empty() {
                        let used = self.run(dir, &b, ts_ns, tid, assign, done);
                        buf.extend_from_slice(&b[used..]);
                    } else {
                        buf.extend_from_slice(&b);
                        let used = self.run(dir, &buf, ts_ns, tid, assign, done);
                        buf.drain(..used);
                    }
                    self.readers[dir].buf = buf;
                }
            }
        }
    }

    fn gap(&mut self, dir: usize, n: u64) {
        let r = &mut self.readers[dir];
        if let State::Skip(left) = r.state
            && r.buf.is_empty()
            && n <= left
        {
            // Inside a body being skipped: nothing is lost but the body.
            r.state = State::Skip(left - n);
            return;
        }
        self.lose_sync(dir);
    }

    /// Framing is lost in `dir`: find the next frame; a header block may have been missed, so
    /// that direction's table is unknown from here.
    fn lose_sync(&mut self, dir: usize) {
        self.stats.resyncs += 1;
        let r = &mut self.readers[dir];
        r.state = State::Resync;
        r.buf.clear();
        r.block = None;
        self.decoders[dir] = decoder(true);
    }

    /// Reads the frames of `data` (the direction's next bytes); returns how many bytes it is
    /// done with. The rest, an unfinished frame, comes again with the next bytes.
    fn run(
        &mut self,
        dir: usize,
        data: &[u8],
        ts: u64,
        tid: u32,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
        done: &mut Vec<H2Exchange>,
    ) -> usize {
        let mut at = 0;
        loop {
            let rest = &data[at..];
            let r = &mut self.readers[dir];
            match r.state {
                State::Preface => {
                    let n = rest.len().min(frame::PREFACE.len());
                    if rest[..n] != frame::PREFACE[..n] {
                        r.state = State::Resync;
                        continue;
                    }
                    if n < frame::PREFACE.len() {
                        return at;
                    }
                    at += n;
                    r.state = State::Frame;
                }
                State::Resync => {
                    let found =
                        (0..rest.len().saturating_sub(frame::HEADER_LEN - 1)).find(|&from| {
                            let run = frame::plausible_run(&rest[from..], 3);
                            // Two frames in a row, or one that ends exactly where the bytes do.
                            run >= 2
                                || (run == 1
                                    && frame::Header::parse(&rest[from..]).is_some_and(|h| {
                                        from + frame::HEADER_LEN + h.len as usize == rest.len()
                                    }))
                        });
                    match found {
                        Some(from) => {
                            at += from;
                            r.state = State::Frame;
                        }
                        None => {
                            if rest.len() > MAX_RESYNC {
                                return data.len() - frame::HEADER_LEN;
                            }
                            return at;
                        }
                    }
                }
                State::Frame => {
                    let Some(h) = frame::Header::parse(rest) else {
                        return at;
                    };
                    if !h.sane(rest) {
                        // Not a frame where one must start: look for the next one from here.
                        self.stats.resyncs += 1;
                        r.state = State::Resync;
                        r.block = None;
                        at += 1;
                        self.decoders[dir] = decoder(true);
                        continue;
                    }
                    at += frame::HEADER_LEN;
                    match h.kind {
                        frame::DATA => {
                            r.data_stream = h.stream;
                            r.data_end = h.flags & frame::END_STREAM != 0;
                            r.state = State::Skip(u64::from(h.len));
                            if let Some(s) = self.streams.get_mut(&h.stream) {
                                s.last_ns = ts;
                            }
                        }
                        frame::HEADERS
                        | frame::CONTINUATION
                        | frame::SETTINGS
                        | frame::RST_STREAM
                        | frame::GOAWAY
                        | frame::PUSH_PROMISE => {
                            if h.len as usize > MAX_BLOCK {
                                // Not decoded: its direction's table is unknown from here.
                                self.stats.hpack_errors += 1;
                                self.decoders[dir] = decoder(true);
                                self.readers[dir].block = None;
                                self.readers[dir].state = State::Skip(u64::from(h.len));
                            } else {
                                self.readers[dir].state = State::Payload(h);
                            }
                        }
                        _ => r.state = State::Skip(u64::from(h.len)),
                    }
                }
                State::Payload(h) => {
                    let len = h.len as usize;
                    if rest.len() < len {
                        return at;
                    }
                    at += len;
                    r.state = State::Frame;
                    self.frame(dir, &h, &rest[..len], ts, tid, assign, done);
                    if matches!(self.readers[dir].state, State::Resync) {
                        // The frame lost the framing (`lose_sync`): what follows is not read
                        // as frames from here; the next bytes are searched instead.
                        return data.len();
                    }
                }
                State::Skip(left) => {
                    let n = (rest.len() as u64).min(left);
                    // The gRPC message prefixes inside a DATA body are counted as they pass.
                    let stream = r.data_stream;
                    if let Some(s) = self.streams.get_mut(&stream) {
                        count_messages(s, dir, &rest[..n as usize]);
                    }
                    at += n as usize;
                    let r = &mut self.readers[dir];
                    if n < left {
                        r.state = State::Skip(left - n);
                        return at;
                    }
                    r.state = State::Frame;
                    let ended = std::mem::take(&mut r.data_end);
                    r.data_stream = 0;
                    if ended {
                        self.end(dir, stream, ts, done);
                    }
                }
            }
        }
    }

    /// The direction ended `stream` (END_STREAM); the exchange completes when both have.
    fn end(&mut self, dir: usize, stream: u32, ts: u64, done: &mut Vec<H2Exchange>) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        s.last_ns = ts;
        if dir == REQUESTS {
            s.request_ended = true;
        } else {
            s.response_ended = true;
        }
        if s.request_ended
            && s.response_ended
            && let Some(s) = self.streams.remove(&stream)
        {
            done.push(finish(stream, s, ts, Outcome::Complete));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn frame(
        &mut self,
        dir: usize,
        h: &frame::Header,
        payload: &[u8],
        ts: u64,
        tid: u32,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
        done: &mut Vec<H2Exchange>,
    ) {
        match h.kind {
            frame::HEADERS | frame::PUSH_PROMISE => {
                if h.kind == frame::PUSH_PROMISE {
                    self.stats.push_promises += 1;
                }
                let Some(block) = frame::header_block(h, payload) else {
                    self.lose_sync(dir);
                    return;
                };
                if h.flags & frame::END_HEADERS != 0 {
                    self.block(dir, h.stream, h.kind, h.flags, block, ts, tid, assign, done);
                } else {
                    self.readers[dir].block = Some((h.stream, h.kind, h.flags, block.to_vec()));
                }
            }
            frame::CONTINUATION => {
                let Some((stream, kind, flags, mut block)) = self.readers[dir].block.take() else {
                    // A continuation of a block whose start was missed.
                    self.decoders[dir] = decoder(true);
                    return;
                };
                if stream != h.stream || block.len() + payload.len() > MAX_BLOCK {
                    self.stats.hpack_errors += 1;
                    self.decoders[dir] = decoder(true);
                    return;
                }
                block.extend_from_slice(payload);
                if h.flags & frame::END_HEADERS != 0 {
                    self.block(dir, stream, kind, flags, &block, ts, tid, assign, done);
                } else {
                    self.readers[dir].block = Some((stream, kind, flags, block));
                }
            }
            frame::SETTINGS if h.flags & frame::ACK == 0 => {
                for s in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    // Announced by the decoding side: it bounds the other direction's encoder.
                    if id == frame::SETTING_HEADER_TABLE_SIZE {
                        self.decoders[1 - dir].set_settings_max(value as usize);
                    }
                }
            }
            frame::RST_STREAM => {
                if let Some(s) = self.streams.remove(&h.stream) {
                    self.stats.resets += 1;
                    done.push(finish(h.stream, s, ts, Outcome::Closed));
                }
            }
            frame::GOAWAY => {
                let last = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff);
                if let Some(last) = last {
                    self.goaway = Some(last);
                    let refused: Vec<u32> = self
                        .streams
                        .keys()
                        .copied()
                        .filter(|&id| id > last)
                        .collect();
                    for id in refused {
                        if let Some(s) = self.streams.remove(&id) {
                            done.push(finish(id, s, ts, Outcome::Closed));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A complete header block of `stream` in `dir`.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        dir: usize,
        stream: u32,
        kind: u8,
        flags: u8,
        block: &[u8],
        ts: u64,
        tid: u32,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
        done: &mut Vec<H2Exchange>,
    ) {
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        let stats = &mut self.stats;
        let decoded =
            self.decoders[dir].decode_with(block, &mut |class, name, value| match (name, value) {
                (Some(_), Some(v)) if class != 0 => fields.offer(class, v),
                (Some(_), Some(_)) => {}
                _ => stats.unknown_fields += 1,
            });
        if decoded.is_err() {
            self.stats.hpack_errors += 1;
            self.decoders[dir] = decoder(true);
        } else if kind == frame::PUSH_PROMISE {
            // A promised request's headers keep the table right; no span comes of them.
        } else {
            self.apply(dir, stream, flags, &fields, ts, tid, assign, done);
        }
        self.fields = fields;
    }

    /// A decoded header block's fields applied to its stream.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        dir: usize,
        stream: u32,
        flags: u8,
        fields: &Fields,
        ts: u64,
        tid: u32,
        assign: &mut dyn FnMut(&Head, RequestStart) -> Identity,
        done: &mut Vec<H2Exchange>,
    ) {
        let end_stream = flags & frame::END_STREAM != 0;
        if dir == REQUESTS {
            if let Some(s) = self.streams.get_mut(&stream) {
                // Request trailers.
                s.last_ns = ts;
            } else if self.goaway.is_some_and(|last| stream > last) {
                // Refused before it started.
            } else if self.streams.len() >= MAX_STREAMS {
                self.stats.overflow += 1;
            } else {
                let request = head_request(fields);
                let grpc = request
                    .header_str("content-type")
                    .is_some_and(|c| c.starts_with("application/grpc"))
                    .then(Grpc::default);
                let started = RequestStart {
                    tid,
                    ts_ns: ts,
                    // Stream ids are the same on both ends and absolute: callers and callees
                    // pair by them, even on connections joined mid-stream.
                    ordinal: u64::from(stream),
                };
                let identity = assign(&request, started);
                self.streams.insert(
                    stream,
                    Stream {
                        identity,
                        started,
                        request,
                        response: None,
                        grpc,
                        start_ns: ts,
                        last_ns: ts,
                        request_ended: false,
                        response_ended: false,
                        message_left: [0, 0],
                        prefix: [([0; 5], 0); 2],
                    },
                );
            }
        } else {
            let Some(s) = self.streams.get_mut(&stream) else {
                self.stats.orphan_responses += 1;
                return;
            };
            s.last_ns = ts;
            if s.response.is_none()
                && let Some(head) = head_response(fields)
            {
                // 1xx answers are interim: the final one follows.
                if head.status().is_some_and(|c| c >= 200) {
                    s.response = Some(head);
                }
            }
            if let Some(g) = s.grpc.as_mut() {
                for (class, v) in fields.iter() {
                    match class {
                        GRPC_STATUS => {
                            g.status = text::utf8(v).and_then(|v| text::trim(v).parse().ok());
                        }
                        GRPC_MESSAGE => {
                            g.message = Some(String::from_utf8_lossy(v).into_owned());
                        }
                        _ => {}
                    }
                }
            }
        }
        if end_stream {
            self.end(dir, stream, ts, done);
        }
    }

    /// Streams waiting longer than `timeout_ns` for their answer end as timeouts; streams that
    /// are answered and still open (streaming) are left alone.
    pub fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> Vec<H2Exchange> {
        let stale: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| s.response.is_none() && now_ns.saturating_sub(s.last_ns) > timeout_ns)
            .map(|(id, _)| *id)
            .collect();
        stale
            .into_iter()
            .filter_map(|id| {
                let s = self.streams.remove(&id)?;
                let end = s.last_ns;
                Some(finish(id, s, end, Outcome::Timeout))
            })
            .collect()
    }

    /// The connection closed: every open stream ends now.
    pub fn close(&mut self, ts_ns: u64) -> Vec<H2Exchange> {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| {
                let s = self.streams.remove(&id)?;
                Some(finish(id, s, ts_ns, Outcome::Closed))
            })
            .collect()
    }

    pub fn decoders_synced(&self) -> bool {
        self.decoders.iter().all(hpack::Decoder::synced)
    }
}

/// Counts gRPC messages by their 5-byte length prefixes in the DATA bytes passing by.
fn count_messages(s: &mut Stream, dir: usize, mut bytes: &[u8]) {
    let Some(g) = s.grpc.as_mut() else {
        return;
    };
    let side = usize::from(dir == RESPONSES);
    while !bytes.is_empty() {
        let left = s.message_left[side];
        if left > 0 {
            let n = left.min(bytes.len() as u64);
            s.message_left[side] -= n;
            bytes = &bytes[n as usize..];
            continue;
        }
        // A message starts: 1 flag byte and a 4-byte length, gathered across reads.
        let (prefix, filled) = &mut s.prefix[side];
        let n = (5 - *filled).min(bytes.len());
        prefix[*filled..*filled + n].copy_from_slice(&bytes[..n]);
        *filled += n;
        bytes = &bytes[n..];
        if *filled == 5 {
            *filled = 0;
            if dir == REQUESTS {
                g.requests += 1;
            } else {
                g.responses += 1;
            }
            s.message_left[side] = u64::from(u32::from_be_bytes([
                prefix[1], prefix[2], prefix[3], prefix[4],
            ]));
        }
    }
}

fn finish(id: u32, s: Stream, end_ns: u64, outcome: Outcome) -> H2Exchange {
    let outcome = match (outcome, &s.response) {
        // A stream reset after its whole answer is complete all the same.
        (Outcome::Closed, Some(_)) if s.response_ended => Outcome::Complete,
        (o, _) => o,
    };
    H2Exchange {
        exchange: Exchange {
            identity: s.identity,
            started: s.started,
            request: s.request,
            response: s.response,
            start_ns: s.start_ns,
            end_ns: end_ns.max(s.last_ns),
            outcome,
        },
        grpc: s.grpc,
        stream_id: id,
    }
}

#[cfg(test)]
mod tests;
