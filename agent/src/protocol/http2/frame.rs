//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte header, and whether bytes plausibly start a
//! frame, for joining a connection mid-stream where no preface is seen.

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE may not exceed 2^24-1; real peers stay at or near 16 KiB..1 MiB.
/// Plausibility takes 4 MiB, which still rejects ~75% of random lengths.
const PLAUSIBLE_MAX_LEN: u32 = 4 << 20;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS_HEADER_TABLE_SIZE.
pub const SETTING_HEADER_TABLE_SIZE: u16 = 0x1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Header {
    /// The header at the start of `b`, if 9 bytes are there.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let h: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
            kind: h[3],
            flags: h[4],
            // The reserved bit is masked, as receivers must (RFC 9113 §4.1).
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }

    /// Whether a frame with this header could come from a real peer: known type, flags
    /// within that type's set, the stream rules of its type, fixed lengths where the type has
    /// one, the reserved bit clear. Unknown types are legal on the wire but are not taken as
    /// evidence when joining mid-stream.
    pub fn plausible(b: &[u8]) -> bool {
        Self::parse(b).is_some_and(|h| h.fits(b[5] & 0x80 != 0))
    }

    /// `plausible` for this header, parsed already; `reserved`: its stream's reserved bit.
    fn fits(self, reserved: bool) -> bool {
        let h = self;
        if reserved || h.len > PLAUSIBLE_MAX_LEN {
            return false;
        }
        let (flags, on_stream, fixed_len): (u8, Option<bool>, Option<u32>) = match h.kind {
            DATA => (END_STREAM | PADDED, Some(true), None),
            HEADERS => (
                END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
                Some(true),
                None,
            ),
            PRIORITY => (0, Some(true), Some(5)),
            RST_STREAM => (0, Some(true), Some(4)),
            SETTINGS => (ACK, Some(false), None),
            PUSH_PROMISE => (END_HEADERS | PADDED, Some(true), None),
            PING => (ACK, Some(false), Some(8)),
            GOAWAY => (0, Some(false), None),
            WINDOW_UPDATE => (0, None, Some(4)),
            CONTINUATION => (END_HEADERS, Some(true), None),
            _ => return false,
        };
        if h.flags & !flags != 0 {
            return false;
        }
        if on_stream.is_some_and(|s| s != (h.stream != 0)) {
            return false;
        }
        if fixed_len.is_some_and(|l| l != h.len) {
            return false;
        }
        match h.kind {
            SETTINGS => h.len.is_multiple_of(6) && (h.flags & ACK == 0 || h.len == 0),
            GOAWAY => h.len >= 8,
            _ => true,
        }
    }
}

impl Header {
    /// Whether a reader in sync may take this header, parsed from `b`, as the next frame: a
    /// known type must be plausible; an unknown (extension) type, which receivers skip, must be
    /// small. Takes the parsed header: every frame of a connection comes through here.
    pub fn sane(self, b: &[u8]) -> bool {
        if self.kind <= CONTINUATION {
            self.fits(b.get(5).is_some_and(|s| s & 0x80 != 0))
        } else {
            self.len <= 16_384
        }
    }
}

/// The payload of a HEADERS or PUSH_PROMISE frame without padding and the priority fields,
/// or None if the frame's own lengths do not add up.
pub fn header_block<'a>(h: &Header, payload: &'a [u8]) -> Option<&'a [u8]> {
    let mut p = payload;
    let mut pad = 0usize;
    if h.flags & PADDED != 0 && h.kind != CONTINUATION {
        pad = usize::from(*p.first()?);
        p = &p[1..];
    }
    if h.kind == HEADERS && h.flags & PRIORITY_FLAG != 0 {
        p = p.get(5..)?;
    }
    if h.kind == PUSH_PROMISE {
        p = p.get(4..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

/// How many frames at the start of `b` look real, at most `max`, following their lengths.
/// Joining mid-stream, one plausible header proves little; several in a row, each where the
/// previous frame's length says the next one starts, prove a lot.
pub fn plausible_run(b: &[u8], max: usize) -> usize {
    let mut at = 0;
    let mut n = 0;
    while n < max && Header::plausible(&b[at.min(b.len())..]) {
        let Some(h) = Header::parse(&b[at..]) else {
            break;
        };
        n += 1;
        at += HEADER_LEN + h.len as usize;
        if at >= b.len() {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn headers_parse_and_real_frames_are_plausible() {
        let f = frame(HEADERS, END_HEADERS | END_STREAM, 3, b"\x82");
        assert_eq!(
            Header::parse(&f),
            Some(Header {
                len: 1,
                kind: HEADERS,
                flags: END_HEADERS | END_STREAM,
                stream: 3
            })
        );
        for f in [
            frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]),
            frame(SETTINGS, ACK, 0, &[]),
            frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0x10, 0]),
            frame(PING, ACK, 0, &[0; 8]),
            frame(DATA, END_STREAM, 1, b"\0\0\0\0\x02hi"),
            frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]),
            frame(GOAWAY, 0, 0, &[0; 8]),
        ] {
            assert!(Header::plausible(&f), "{f:?}");
        }
        for f in [
            frame(SETTINGS, 0, 1, &[]),     // on a stream
            frame(SETTINGS, 0, 0, &[0; 5]), // not a multiple of 6
            frame(DATA, 0, 0, b"x"),        // stream 0
            frame(HEADERS, 0x40, 1, b"x"),  // unknown flag
            frame(PING, 0, 0, &[0; 7]),     // wrong length
            frame(0x0b, 0, 0, &[]),         // unknown type
            b"GET / HTTP/1.1\r\n".to_vec(), // HTTP/1
            b"\x00\x00".to_vec(),           // too short
        ] {
            assert!(!Header::plausible(&f), "{f:?}");
        }
    }

    #[test]
    fn runs_follow_the_lengths() {
        let mut b = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        b.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0x10, 0]));
        b.extend(frame(HEADERS, END_HEADERS, 1, b"\x83\x86"));
        assert_eq!(plausible_run(&b, 8), 3);
        b.truncate(b.len() - 1);
        assert_eq!(plausible_run(&b, 8), 3, "the last header is whole");
        let mut junk = frame(SETTINGS, 0, 0, &[0; 6]);
        junk.extend(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff");
        assert_eq!(plausible_run(&junk, 8), 1);
    }

    #[test]
    fn header_blocks_lose_padding_and_priority() {
        let h = Header {
            len: 0,
            kind: HEADERS,
            flags: PADDED | PRIORITY_FLAG | END_HEADERS,
            stream: 1,
        };
        let payload = [2, 0, 0, 0, 0, 16, 0x82, 0x86, 0, 0];
        assert_eq!(header_block(&h, &payload), Some(&[0x82, 0x86][..]));
        assert_eq!(
            header_block(&h, &[9, 0, 0]),
            None,
            "padding beyond the frame"
        );
    }
}
