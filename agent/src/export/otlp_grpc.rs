//! OTLP requests as they go on the wire, and a unary gRPC call that sends one without copying
//! it. A request is encoded once, behind the five bytes gRPC puts before every message
//! (`Body`): gRPC sends the whole buffer, OTLP/HTTP its message from byte 5. Through tonic's
//! codec the message was copied into tonic's own buffer on every attempt (a fresh buffer of the
//! request's size, 4% of the agent's CPU at 40k spans/s); here the buffer itself is the HTTP/2
//! body, and h2 writes it to the socket from where the encoder left it.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyExt as _;
use tonic::{Code, Status, transport::Channel};
use tower::ServiceExt as _;

/// gRPC's length prefix: a compression flag and the message's length, big-endian.
const PREFIX: usize = 5;

/// An encoded export request behind its gRPC prefix (filled in, uncompressed).
#[derive(Clone, Debug)]
pub struct Body(Bytes);

impl Body {
    /// A buffer to encode a request of about `capacity` bytes into, the prefix's room taken.
    pub fn buffer(capacity: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(PREFIX + capacity);
        buf.resize(PREFIX, 0);
        buf
    }

    /// The request encoded into `buf` (from `buffer`), its prefix filled in.
    pub fn finish(buf: Vec<u8>) -> Self {
        Self(framed(buf, false))
    }

    /// The protobuf message alone (OTLP/HTTP's body), sharing the buffer.
    pub fn message(&self) -> Bytes {
        self.0.slice(PREFIX..)
    }

    /// The message's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len() - PREFIX
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message gzipped (OTLP/HTTP's body with `Content-Encoding: gzip`).
    pub fn gzipped(&self) -> std::io::Result<Vec<u8>> {
        gzip(Vec::new(), &self.0[PREFIX..])
    }

    /// The gRPC message: the buffer as is, or its message gzipped behind a new prefix.
    fn frame(&self, gzip_it: bool) -> std::io::Result<Bytes> {
        if !gzip_it {
            return Ok(self.0.clone());
        }
        Ok(framed(gzip(Body::buffer(0), &self.0[PREFIX..])?, true))
    }
}

/// `data` gzipped onto the end of `into` (fast: the collector's link is rarely the limit).
fn gzip(into: Vec<u8>, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(into, flate2::Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// `buf`'s message (from byte 5) behind its prefix, filled in.
fn framed(mut buf: Vec<u8>, compressed: bool) -> Bytes {
    let len = u32::try_from(buf.len() - PREFIX).expect("an export request under 4 GiB");
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
        let mut request =
            http::Request::new(tonic::body::Body::new(http_body_util::Full::new(frame)));
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
        assert_eq!(&body.message()[..], &[0x0a, 0x01, 0x7f]);
        assert_eq!(body.len(), 3);
        assert_eq!(
            &body.frame(false).unwrap()[..],
            &[0, 0, 0, 0, 3, 0x0a, 0x01, 0x7f]
        );
    }

    #[test]
    fn a_gzipped_frame_is_flagged_and_inflates_to_the_message() {
        use std::io::Read as _;
        let mut buf = Body::buffer(0);
        buf.extend(std::iter::repeat_n(b'x', 1000));
        let frame = Body::finish(buf).frame(true).unwrap();
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
            &body.frame(true).unwrap()[PREFIX..],
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
