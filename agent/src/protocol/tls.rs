//! The ciphertext side of a TLS connection, watched until its plaintext shows up (the library
//! is probed, tls/) or enough encrypted application data has passed without it (it is not: the
//! connection is counted by library and dropped). Only record headers and the ClientHello's
//! server name are read.

use crate::conn::Segment;

/// Encrypted application records, either way, after which a connection with no plaintext is
/// declared unhooked. More than one: the first may have crossed the probes' first call.
pub const UNHOOKED_AFTER: u32 = 2;

const CONTENT_HANDSHAKE: u8 = 0x16;
const CONTENT_APPLICATION_DATA: u8 = 0x17;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

#[derive(Debug, Default)]
pub struct TlsWatch {
    /// The ClientHello's server_name, when the handshake was seen.
    pub server_name: Option<String>,
    pub application_records: u32,
    /// The TLS library the process uses, read when the connection was first seen: a client
    /// may have exited by the time its connection is declared unhooked.
    pub library: Option<&'static str>,
}

impl TlsWatch {
    /// Looks at segments of one direction: each payload event starts a record in practice
    /// (libraries write whole records), which is all this counting needs.
    pub fn offer(&mut self, segments: &[Segment]) {
        for seg in segments {
            let Segment::Data(b) = seg else { continue };
            match b.first() {
                Some(&CONTENT_APPLICATION_DATA) => self.application_records += 1,
                Some(&CONTENT_HANDSHAKE) if self.server_name.is_none() => {
                    self.server_name = client_hello_server_name(b);
                }
                _ => {}
            }
        }
    }

    pub fn unhooked(&self) -> bool {
        self.application_records >= UNHOOKED_AFTER
    }
}

/// The host name in a ClientHello record's server_name extension (RFC 6066), if any.
pub fn client_hello_server_name(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    if r.u8()? != CONTENT_HANDSHAKE {
        return None;
    }
    r.skip(4)?; // version, record length
    if r.u8()? != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    r.skip(3 + 2 + 32)?; // handshake length, client version, random
    let sid = r.u8()? as usize;
    r.skip(sid)?;
    let suites = r.u16()? as usize;
    r.skip(suites)?;
    let compression = r.u8()? as usize;
    r.skip(compression)?;
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.take(ext_len.min(r.0.len()))?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()? as usize;
        let body = exts.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut names = Reader(body);
        let _list = names.u16()?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let n = names.u16()? as usize;
            let name = names.take(n)?;
            if name_type == 0 {
                let s = std::str::from_utf8(name).ok()?;
                let valid = !s.is_empty()
                    && s.len() <= 253
                    && s.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(&c));
                return valid.then(|| s.to_ascii_lowercase());
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A ClientHello laid out as OpenSSL sends it, with one extension: server_name.
    fn client_hello(name: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        ext.extend_from_slice(&[0x00, 0x00]); // server_name
        let list_len = (name.len() + 3) as u16;
        ext.extend_from_slice(&(list_len + 2).to_be_bytes());
        ext.extend_from_slice(&list_len.to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        ext.extend_from_slice(name);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x11; 32]);
        body.push(32);
        body.extend_from_slice(&[0x22; 32]);
        body.extend_from_slice(&[0x00, 0x04, 0x13, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO, 0, 0, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut rec = vec![CONTENT_HANDSHAKE, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        assert_eq!(
            client_hello_server_name(&client_hello(b"Loupe.test")).as_deref(),
            Some("loupe.test")
        );
    }

    #[test]
    fn truncated_or_odd_hellos_give_nothing_and_never_panic() {
        let full = client_hello(b"loupe.test");
        for n in 0..full.len() {
            assert_eq!(client_hello_server_name(&full[..n]), None, "cut at {n}");
        }
        assert_eq!(client_hello_server_name(&client_hello(b"bad name\n")), None);
        assert_eq!(client_hello_server_name(b"\x17\x03\x03\x00\x10"), None);
    }

    #[test]
    fn application_records_make_a_connection_unhooked() {
        let mut w = TlsWatch::default();
        w.offer(&[Segment::Data(Bytes::from(client_hello(b"a.example")))]);
        assert_eq!(w.server_name.as_deref(), Some("a.example"));
        assert!(!w.unhooked());
        w.offer(&[
            Segment::Data(Bytes::from_static(b"\x17\x03\x03\x00\x20...")),
            Segment::Gap(10),
            Segment::Data(Bytes::from_static(b"\x17\x03\x03\x00\x20...")),
        ]);
        assert!(w.unhooked());
    }
}
