//! The OTLP endpoint of `cargo xtask bench`: accepts OTLP/gRPC trace and metrics exports and
//! answers each with an empty success, without decoding them. It shares the machine with the
//! traced server, and decoding every span (what the tests' receiver does) cost about as much
//! CPU as the agent itself: a remote collector's work the benchmark must not charge to the
//! agent. The agent's own counters say what was exported. Prints its endpoint, then on each
//! line read from stdin the bytes received so far. Ends at EOF.

use std::{
    convert::Infallible,
    io::BufRead as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};

type Reply = hyper::Response<
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
>;

/// An empty message (uncompressed, length 0) and grpc-status 0: a full success for both
/// ExportTraceServiceResponse and ExportMetricsServiceResponse.
async fn accept(
    received: Arc<AtomicU64>,
    req: hyper::Request<Incoming>,
) -> Result<Reply, Infallible> {
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    received.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Err(_) => break,
        }
    }
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut reply = hyper::Response::new(StreamBody::new(futures_util::stream::iter(frames)));
    reply.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    Ok(reply)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let received = Arc::new(AtomicU64::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the sink");
    let addr = listener.local_addr().expect("sink address");
    let counter = received.clone();
    rt.spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| accept(counter.clone(), req));
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
            });
        }
    });
    println!("grpc=http://{addr}");
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        println!("{}", received.load(Ordering::Relaxed));
    }
}
