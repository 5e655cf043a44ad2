//! OTLP requests as they go on the wire, and a unary gRPC call that sends one without copying
//! it. A request is encoded once, behind the five bytes gRPC puts before every message
//! (`Body`), in pieces that are sent one after the other: gRPC sends them all, OTLP/HTTP its
//! message from byte 5. Through tonic's codec the message was copied into tonic's own buffer
//! on every attempt (a fresh buffer of the request's size, 4% of the agent's CPU at 40k
//! spans/s); here the pieces themselves are the HTTP/2 body, and h2 writes each to the socket
//! from where the encoder left it.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyExt as _;
use tonic::{Code, Status, transport::Channel};
use tower::ServiceExt as _;

/// gRPC's length prefix: a compression flag and the message's length, big-endian.
const PREFIX: usize = 5;

/// An encoded export request behind its gRPC prefix (filled in, uncompressed), in one or more
/// pieces sent one after the other: a request of spans the pipeline encoded is its resources'
/// and scopes' bytes with each process's spans between them, sent from where they were
/// written (`otlp_proto::encode_batch_request`).
#[derive(Clone, Debug)]
pub struct Body {
    /// The first starts with the prefix.
    pieces: Vec<Bytes>,
}

impl Body {
    /// A buffer to encode a request of about `capacity` bytes into, the prefix's room taken.
    pub fn buffer(capacity: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(PREFIX + capacity);
        buf.resize(PREFIX, 0);
        buf
    }

    /// The request encoded into `buf` (from `buffer`), its prefix filled in.
    pub fn finish(buf: Vec<u8>) -> Self {
        Self {
            pieces: vec![framed(buf, 0, false)],
        }
    }

    /// A request of `buf` (from `buffer`) and runs sent between its parts: `layout` lists where
    /// each part of `buf` ends and the runs that follow it.
    pub fn gather(buf: Vec<u8>, layout: &[(usize, &[Bytes])]) -> Self {
        let runs: usize = layout
            .iter()
            .flat_map(|(_, runs)| runs.iter())
            .map(Bytes::len)
            .sum();
        let own = framed(buf, runs, false);
        let mut pieces = Vec::with_capacity(layout.iter().map(|(_, r)| 1 + r.len()).sum());
        let mut from = 0;
        for &(to, runs) in layout {
            if to > from {
                pieces.push(own.slice(from..to));
            }
            pieces.extend(runs.iter().filter(|r| !r.is_empty()).cloned());
            from = to;
        }
        if from < own.len() {
            pieces.push(own.slice(from..));
        }
        Self { pieces }
    }

    /// The protobuf message alone (OTLP/HTTP's body), sharing the pieces.
    pub fn message(&self) -> Pieces {
        let mut pieces = self.pieces.clone();
        pieces[0] = pieces[0].slice(PREFIX..);
        Pieces::new(pieces)
    }

    /// The message's length in bytes.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum::<usize>() - PREFIX
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message gzipped (OTLP/HTTP's body with `Content-Encoding: gzip`).
    pub fn gzipped(&self) -> std::io::Result<Vec<u8>> {
        gzip(Vec::new(), self.message_pieces())
    }

    fn message_pieces(&self) -> impl Iterator<Item = &[u8]> {
        let mut first = true;
        self.pieces.iter().map(move |p| {
            let skip = if std::mem::take(&mut first) {
                PREFIX
            } else {
                0
            };
            &p[skip..]
        })
    }

    /// The gRPC message: the pieces as they are, or the message gzipped behind a new prefix.
    fn frame(&self, gzip_it: bool) -> std::io::Result<Pieces> {
        if !gzip_it {
            return Ok(Pieces::new(self.pieces.clone()));
        }
        let zipped = gzip(Body::buffer(0), self.message_pieces())?;
        Ok(Pieces::new(vec![framed(zipped, 0, true)]))
    }
}

/// A request body of pieces sent in order, each as it is (h2 writes one from where it lies).
#[derive(Debug)]
pub struct Pieces {
    pieces: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

impl Pieces {
    fn new(pieces: Vec<Bytes>) -> Self {
        let remaining = pieces.iter().map(|p| p.len() as u64).sum();
        Self {
            pieces: pieces.into_iter(),
            remaining,
        }
    }

    /// The pieces in one buffer (a copy unless there is one piece).
    #[cfg(test)]
    pub fn to_bytes(&self) -> Bytes {
        match self.pieces.as_slice() {
            [one] => one.clone(),
            many => many.concat().into(),
        }
    }
}

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.pieces.next();
        if let Some(p) = &next {
            self.remaining -= p.len() as u64;
        }
        std::task::Poll::Ready(next.map(|p| Ok(http_body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// `data` gzipped onto the end of `into` (fast: the collector's link is rarely the limit).
fn gzip<'a>(into: Vec<u8>, data: impl Iterator<Item = &'a [u8]>) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(into, flate2::Compression::fast());
    for piece in data {
        enc.write_all(piece)?;
    }
    enc.finish()
}

/// `buf` behind its prefix, filled in for a message of `buf`'s bytes from byte 5 and `more`
/// bytes sent after them.
fn framed(mut buf: Vec<u8>, more: usize, compressed: bool) -> Bytes {
    let len = u32::try_from(buf.len() - PREFIX + more).expect("an export request under 4 GiB");
    buf[0] = compressed as u8;
    buf[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    buf.into()
}

/// Unary calls of one service over a tonic channel (which adds the origin, the user agent and
/// the transport's timeout), with the request's metadata and deadline fixed at setup.
#[derive(Clone)]
pub struct Unary {
    channel: Channel,
    headers: HeaderMap,
    gzip: bool,
}

impl Unary {
    pub fn new(
        channel: Channel,
        metadata: HeaderMap,
        timeout: std::time::Duration,
        gzip: bool,
    ) -> Self {
        let mut headers = metadata;
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        // The server's deadline, as tonic's `set_timeout` wrote it (milliseconds).
        if let Ok(v) = HeaderValue::from_str(&format!("{}m", timeout.as_millis().max(1))) {
            headers.insert("grpc-timeout", v);
        }
        if gzip {
            headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        }
        Self {
            channel,
            headers,
            gzip,
        }
    }

    /// Sends `body` to `path`; the response message's bytes, or the call's status as tonic's
    /// client would have given it (transport errors included, with their sources).
    pub async fn call(&self, path: &'static str, body: &Body) -> Result<Bytes, Status> {
        let frame = body
            .frame(self.gzip)
            .map_err(|e| Status::internal(format!("gzip: {e}")))?;
        let mut request = http::Request::new(tonic::body::Body::new(frame));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(path);
        *request.version_mut() = http::Version::HTTP_2;
        *request.headers_mut() = self.headers.clone();
        let response = self
            .channel
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| Status::from_error(Box::new(e)))?;
        let (parts, body) = response.into_parts();
        // A trailers-only response carries its status in the headers.
        if let Some(status) = Status::from_header_map(&parts.headers)
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        let collected = body.collect().await?;
        let status = collected
            .trailers()
            .and_then(Status::from_header_map)
            .or_else(|| Status::from_header_map(&parts.headers))
            .unwrap_or_else(|| without_grpc_status(parts.status));
        if status.code() != Code::Ok {
            return Err(status);
        }
        message_of(collected.to_bytes())
    }
}

/// The status of a response without `grpc-status`, mapped from its HTTP status as gRPC's
/// http-grpc-status-mapping.md says (what tonic did).
fn without_grpc_status(http: http::StatusCode) -> Status {
    use http::StatusCode as H;
    let code = match http {
        H::BAD_REQUEST => Code::Internal,
        H::UNAUTHORIZED => Code::Unauthenticated,
        H::FORBIDDEN => Code::PermissionDenied,
        H::NOT_FOUND => Code::Unimplemented,
        H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
            Code::Unavailable
        }
        // 200 included: a gRPC response must end with a grpc-status.
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP {http} without a grpc-status"))
}

/// The message of a unary response body (empty when the body is: a default response).
fn message_of(mut data: Bytes) -> Result<Bytes, Status> {
    if data.is_empty() {
        return Ok(data);
    }
    if data.len() < PREFIX {
        return Err(Status::internal("a truncated gRPC message in the response"));
    }
    let compressed = data[0] != 0;
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    if data.len() < PREFIX + len {
        return Err(Status::internal("a truncated gRPC message in the response"));
    }
    if compressed {
        // Not asked for (no grpc-accept-encoding is sent); the response only counts rejections.
        return Err(Status::internal(
            "a compressed response the agent did not ask for",
        ));
    }
    Ok(data.split_off(PREFIX).split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_its_message_behind_the_grpc_prefix() {
        let mut buf = Body::buffer(3);
        buf.extend_from_slice(&[0x0a, 0x01, 0x7f]);
        let body = Body::finish(buf);
        assert_eq!(&body.message().to_bytes()[..], &[0x0a, 0x01, 0x7f]);
        assert_eq!(body.len(), 3);
        assert_eq!(
            &body.frame(false).unwrap().to_bytes()[..],
            &[0, 0, 0, 0, 3, 0x0a, 0x01, 0x7f]
        );
    }

    #[test]
    fn a_gathered_body_sends_its_runs_between_its_parts_under_one_prefix() {
        use http_body_util::BodyExt as _;
        let mut buf = Body::buffer(4);
        buf.extend_from_slice(b"ab");
        let after_ab = buf.len();
        buf.extend_from_slice(b"cd");
        let runs = [
            Bytes::from_static(b"123"),
            Bytes::new(),
            Bytes::from_static(b"45"),
        ];
        let body = Body::gather(buf, &[(after_ab, &runs[..]), (after_ab, &runs[1..2])]);
        assert_eq!(body.len(), 9);
        assert_eq!(&body.message().to_bytes()[..], b"ab12345cd");
        let frame = body.frame(false).unwrap();
        assert_eq!(http_body::Body::size_hint(&frame).exact(), Some(14));
        let pieces = futures::executor::block_on(async {
            let mut frame = frame;
            let mut got = Vec::new();
            while let Some(f) = frame.frame().await {
                got.push(f.unwrap().into_data().unwrap());
            }
            assert!(http_body::Body::is_end_stream(&frame));
            got
        });
        assert_eq!(
            pieces,
            [&b"\0\0\0\0\x09ab"[..], b"123", b"45", b"cd"],
            "each run sent as it lies, no empty piece"
        );
        let mut whole = Body::buffer(0);
        whole.extend_from_slice(b"ab12345cd");
        assert_eq!(
            body.gzipped().unwrap(),
            Body::finish(whole).gzipped().unwrap(),
            "gzipped across the pieces"
        );
    }

    #[test]
    fn a_gzipped_frame_is_flagged_and_inflates_to_the_message() {
        use std::io::Read as _;
        let mut buf = Body::buffer(0);
        buf.extend(std::iter::repeat_n(b'x', 1000));
        let frame = Body::finish(buf).frame(true).unwrap().to_bytes();
        assert_eq!(frame[0], 1);
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(frame.len(), PREFIX + len);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&frame[PREFIX..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, vec![b'x'; 1000]);
        let body = Body::finish({
            let mut b = Body::buffer(0);
            b.extend_from_slice(b"abc");
            b
        });
        assert_eq!(
            body.gzipped().unwrap(),
            &body.frame(true).unwrap().to_bytes()[PREFIX..],
            "OTLP/HTTP's gzipped body is the gRPC frame's message"
        );
    }

    #[test]
    fn a_response_message_is_read_from_its_frame() {
        let frame = Bytes::from_static(&[0, 0, 0, 0, 2, 0x10, 0x05]);
        assert_eq!(&message_of(frame).unwrap()[..], &[0x10, 0x05]);
        assert!(message_of(Bytes::new()).unwrap().is_empty());
        assert!(message_of(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
        assert!(message_of(Bytes::from_static(&[1, 0, 0, 0, 1, 1])).is_err());
        assert_eq!(
            without_grpc_status(http::StatusCode::NOT_FOUND).code(),
            Code::Unimplemented
        );
    }
}
