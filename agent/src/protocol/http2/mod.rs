//! HTTP/2 and gRPC: frames (`frame`), header blocks (`hpack`), the connection session that
//! pairs streams (`session`) and their spans (`span`).

pub mod frame;
pub mod hpack;
pub mod session;
pub mod span;

use super::Detect;

/// The client preface on a connection seen from its start; joined mid-stream, frames that
/// follow each other by their lengths (one whole frame that ends the bytes counts less).
pub fn detect(data: &[u8], requests: bool) -> Detect {
    let n = data.len().min(frame::PREFACE.len());
    if requests && data[..n] == frame::PREFACE[..n] {
        return if n == frame::PREFACE.len() {
            Detect::Yes(100)
        } else {
            Detect::NeedMore
        };
    }
    if data.len() < frame::HEADER_LEN {
        return if data.is_empty() || data[0] == 0 {
            Detect::NeedMore
        } else {
            Detect::No
        };
    }
    match frame::plausible_run(data, 3) {
        0 => Detect::No,
        1 => {
            let whole = frame::Header::parse(data)
                .is_some_and(|h| frame::HEADER_LEN + h.len as usize == data.len());
            if whole { Detect::Yes(40) } else { Detect::No }
        }
        _ => Detect::Yes(60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert_eq!(detect(frame::PREFACE, true), Detect::Yes(100));
        assert_eq!(detect(&frame::PREFACE[..10], true), Detect::NeedMore);
        // A server's first SETTINGS, whole.
        assert_eq!(
            detect(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100], false),
            Detect::Yes(40)
        );
        // Two frames in a row: a joined connection.
        let mut two = vec![0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        two.extend([0, 0, 1, 1, 4, 0, 0, 0, 3, 0x88]);
        assert_eq!(detect(&two, false), Detect::Yes(60));
        assert_eq!(detect(b"GET / HTTP/1.1\r\n\r\n", true), Detect::No);
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n", true), Detect::No);
        assert_eq!(
            detect(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f], true),
            Detect::NeedMore
        );
        assert_eq!(
            detect(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f, 0], true),
            Detect::No,
            "a PostgreSQL SSLRequest"
        );
    }
}
