//! HPACK (RFC 7541) header block decoding that tolerates joining a connection mid-stream.
//!
//! A decoder that attached after the connection started does not know the entries the dynamic
//! table held then. It still knows every entry inserted since: new entries go in at index 62
//! and the oldest are evicted first, so the entries from before attach are always the ones
//! beyond the known ones, and the first eviction of a known entry proves none is left. So:
//! an index up to 61 + (known entries) resolves exactly; one beyond it is `Unknown` (counted,
//! never guessed) while older entries may remain, and an error once they cannot; every value
//! resolves from the moment a known entry had to be evicted or the table was resized to 0. An
//! entry inserted under a name taken from an unknown index keeps an unknown name (and a lower
//! bound for its size, so evictions can come late, never early: indices stay right).
//! Every block must be decoded, in order, whether or not a span needs it: each one may change
//! the table. Huffman strings are decoded by httlib-huffman (flattened tables, 4 bits a step).

use std::collections::VecDeque;

/// What one header field decoded to: a name and value, either possibly unknown (an index
/// into the part of the table from before attach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The block ends inside a field.
    Truncated,
    /// An integer beyond what any real encoder sends.
    Overflow,
    /// Huffman data that does not decode.
    Huffman,
    /// An index beyond the table while the table is fully known: the decoder lost sync.
    BadIndex(usize),
    /// A table size update above the limit SETTINGS allows, or one not at the block start.
    BadSizeUpdate,
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The table size both sides start with (SETTINGS_HEADER_TABLE_SIZE default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// Per-entry overhead in the size accounting (RFC 7541 4.1).
const ENTRY_OVERHEAD: usize = 32;

#[derive(Debug, Clone)]
struct Entry {
    name: Option<Vec<u8>>,
    value: Vec<u8>,
    /// RFC size; with an unknown name it is a lower bound.
    size: usize,
    /// The name's class (`Classes`), told once at insert: the fields a span reads are found
    /// by a byte beside the entry, not by comparing the name's bytes in every block.
    class: u8,
}

/// What the decoder's user calls each field name: `classify` gives a byte, 0 for the names
/// it ignores. Told once per static entry, once per dynamic entry (at insert) and for each
/// literal name; a field sent by index is then a lookup with no name comparison.
pub struct Classes {
    classify: fn(&[u8]) -> u8,
    statics: [u8; 61],
}

impl Classes {
    pub fn new(classify: fn(&[u8]) -> u8) -> Self {
        Self {
            classify,
            statics: std::array::from_fn(|i| classify(STATIC[i].0.as_bytes())),
        }
    }
}

/// The decoder's classes when its user names none (tests): every name is 0.
#[cfg(test)]
static NO_CLASSES: Classes = Classes {
    classify: |_| 0,
    statics: [0; 61],
};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// References to entries from before attach: decoded as unknown.
    pub unknown_refs: u64,
}

/// What `Decoder::decode_with` hands each field to: its name's class (0 when the name is
/// unknown), its name and value, either `None` where it is unknown (an entry from before
/// attach).
pub type Visit<'a> = dyn FnMut(u8, Option<&[u8]>, Option<&[u8]>) + 'a;

pub struct Decoder {
    /// Entries inserted since attach, newest first (index 62 is `known[0]`).
    known: VecDeque<Entry>,
    known_size: usize,
    /// Entries from before attach may still be in the table.
    unknown_tail: bool,
    /// Known entries whose name is not (a literal named by an unknown index). Their size is a
    /// lower bound, so evictions may come late, never early: indices stay right, and entries
    /// the encoder already evicted may linger at the old end, never referenced.
    unnamed: usize,
    /// The current dynamic table size limit.
    max_size: usize,
    /// What SETTINGS allows the encoder (a size update above it is an error).
    settings_max: usize,
    /// Where a literal that does not enter the table is decoded, reused block after block.
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
    /// Huffman strings of such literals, as last sent and decoded.
    repeats: Repeats,
    classes: &'static Classes,
    pub stats: DecodeStats,
}

/// The last Huffman strings decoded from literals that do not enter the table, raw and decoded.
/// An encoder that does not index a field sends the very same bytes in every block (h2load's
/// `:path` on each request, never indexed by nghttp2): a comparison of the raw bytes replaces
/// the Huffman decoding, which was the larger part of decoding such a block.
#[derive(Default)]
struct Repeats {
    entries: [(Vec<u8>, Vec<u8>); REPEATS],
    next: usize,
}

/// Two: a block seldom carries more than one or two unindexed Huffman strings.
const REPEATS: usize = 2;

/// Longer strings are decoded every time: a value that long seldom repeats.
const REPEAT_MAX: usize = 64;

impl Repeats {
    /// A string literal (RFC 7541 5.2) into `out`, through the remembered decodings.
    fn string(&mut self, block: &mut &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        let huffman = block.first().ok_or(Error::Truncated)? & 0x80 != 0;
        let (raw, rest) = split_string(block)?;
        *block = rest;
        if !huffman || raw.len() > REPEAT_MAX {
            return decode_string(raw, huffman, out);
        }
        if let Some((_, decoded)) = self.entries.iter().find(|(r, _)| r.as_slice() == raw) {
            out.clear();
            out.extend_from_slice(decoded);
            return Ok(());
        }
        decode_string(raw, true, out)?;
        let (r, d) = &mut self.entries[self.next];
        r.clear();
        r.extend_from_slice(raw);
        d.clear();
        d.extend_from_slice(out);
        self.next = (self.next + 1) % REPEATS;
        Ok(())
    }
}

impl Decoder {
    /// `midstream`: the connection started before the agent saw it.
    #[cfg(test)]
    pub fn new(midstream: bool) -> Self {
        Self::classifying(midstream, &NO_CLASSES)
    }

    /// A decoder that hands each field its name's class in `classes`.
    pub fn classifying(midstream: bool, classes: &'static Classes) -> Self {
        Self {
            known: VecDeque::new(),
            known_size: 0,
            unknown_tail: midstream,
            unnamed: 0,
            max_size: DEFAULT_TABLE_SIZE,
            settings_max: DEFAULT_TABLE_SIZE,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
            repeats: Repeats::default(),
            classes,
            stats: DecodeStats::default(),
        }
    }

    /// The peer that decodes this direction announced SETTINGS_HEADER_TABLE_SIZE.
    pub fn set_settings_max(&mut self, size: usize) {
        self.settings_max = size;
    }

    /// Whether the entries from before attach are gone: every index resolves to a value.
    /// (A name can stay unknown longer: an encoder that names each new entry by the index of
    /// the previous one with that name carries an unknown name along until it spells it out.)
    pub fn synced(&self) -> bool {
        !self.unknown_tail
    }

    /// Whether every index now resolves exactly, names included.
    pub fn exact(&self) -> bool {
        !self.unknown_tail && self.unnamed == 0
    }

    /// Decodes one complete header block (HEADERS plus CONTINUATIONs, padding removed) into
    /// a list of fields.
    /// On an error the table may be out of sync: the caller resets the connection's decoder.
    #[cfg(test)]
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, Error> {
        let mut fields = Vec::new();
        self.decode_with(block, &mut |_, name, value| {
            fields.push(Field {
                name: name.map(<[u8]>::to_vec),
                value: value.map(<[u8]>::to_vec),
            })
        })?;
        Ok(fields)
    }

    /// Decodes one complete header block, handing each field to `visit` where it lies: in the
    /// static table, the dynamic one, or a buffer the decoder reuses. Nothing is allocated
    /// but what enters the dynamic table; a span keeps a few fields of the ten or so a block
    /// carries, and an indexed field (most fields on a busy connection) is a lookup.
    /// On an error the table may be out of sync: the caller resets the connection's decoder.
    pub fn decode_with(&mut self, mut block: &[u8], visit: &mut Visit<'_>) -> Result<(), Error> {
        let mut at_start = true;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(&mut block, 7)?;
                match resolve(&self.known, self.classes, self.unknown_tail, index)? {
                    Some((class, name, value)) => visit(class, name, Some(value)),
                    None => {
                        self.stats.unknown_refs += 1;
                        visit(0, None, None);
                    }
                }
            } else if first & 0xc0 == 0x40 {
                // Literal with incremental indexing: the table keeps its own copy.
                let index = integer(&mut block, 6)?;
                let (class, name) = if index == 0 {
                    let mut name = Vec::new();
                    string(&mut block, &mut name)?;
                    ((self.classes.classify)(&name), Some(name))
                } else {
                    match self.name_of(index)? {
                        Some((class, name)) => (class, Some(name.to_vec())),
                        None => (0, None),
                    }
                };
                let mut value = Vec::new();
                string(&mut block, &mut value)?;
                visit(class, name.as_deref(), Some(&value));
                self.insert(class, name, value);
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field.
                if !at_start {
                    return Err(Error::BadSizeUpdate);
                }
                let size = integer(&mut block, 5)?;
                if size > self.settings_max {
                    return Err(Error::BadSizeUpdate);
                }
                self.resize(size);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001): decoded into the
                // reused buffers, gone once visited. A never-indexed field is one the encoder
                // marks sensitive: its strings are not remembered as repeats.
                let remember = first & 0x10 == 0;
                let index = integer(&mut block, 4)?;
                let mut literal = |block: &mut &[u8], out: &mut Vec<u8>| {
                    if remember {
                        self.repeats.string(block, out)
                    } else {
                        string(block, out)
                    }
                };
                if index == 0 {
                    literal(&mut block, &mut self.name_buf)?;
                    literal(&mut block, &mut self.value_buf)?;
                    let class = (self.classes.classify)(&self.name_buf);
                    visit(class, Some(&self.name_buf), Some(&self.value_buf));
                } else {
                    let (class, name) =
                        match resolve(&self.known, self.classes, self.unknown_tail, index)? {
                            Some((class, name, _)) => (class, name),
                            None => {
                                self.stats.unknown_refs += 1;
                                (0, None)
                            }
                        };
                    literal(&mut block, &mut self.value_buf)?;
                    visit(class, name, Some(&self.value_buf));
                }
            }
            at_start = false;
        }
        Ok(())
    }

    /// The name at `index`, `None` if unknown (an entry from before attach, counted, or one
    /// inserted under such a name).
    fn name_of(&mut self, index: usize) -> Result<Option<(u8, &[u8])>, Error> {
        match resolve(&self.known, self.classes, self.unknown_tail, index)? {
            Some((class, Some(name), _)) => Ok(Some((class, name))),
            Some((_, None, _)) => Ok(None),
            None => {
                self.stats.unknown_refs += 1;
                Ok(None)
            }
        }
    }

    fn insert(&mut self, class: u8, name: Option<Vec<u8>>, value: Vec<u8>) {
        let size = name.as_ref().map_or(0, Vec::len) + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it.
            self.clear();
            return;
        }
        while self.known_size + size > self.max_size {
            self.evict_oldest();
        }
        self.known_size += size;
        self.unnamed += usize::from(name.is_none());
        self.known.push_front(Entry {
            name,
            value,
            size,
            class,
        });
    }

    fn evict_oldest(&mut self) {
        // Whatever was there before attach went first: the table is all known from now on.
        self.unknown_tail = false;
        if let Some(e) = self.known.pop_back() {
            self.known_size -= e.size;
            self.unnamed -= usize::from(e.name.is_none());
        }
    }

    fn resize(&mut self, size: usize) {
        self.max_size = size;
        if size == 0 {
            self.clear();
        }
        while self.known_size > self.max_size {
            self.evict_oldest();
        }
    }

    fn clear(&mut self) {
        self.known.clear();
        self.known_size = 0;
        self.unknown_tail = false;
        self.unnamed = 0;
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 5.1).
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, Error> {
    let (&first, rest) = block.split_first().ok_or(Error::Truncated)?;
    *block = rest;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = block.split_first().ok_or(Error::Truncated)?;
        *block = rest;
        // Four continuation bytes reach 2^28: beyond any table, string or frame.
        if shift > 21 {
            return Err(Error::Overflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A table entry's name's class (0 if the name is unknown), name (`None` if unknown) and value.
type Resolved<'a> = (u8, Option<&'a [u8]>, &'a [u8]);

/// The entry at `index`: its name's class, its name (`None` if it is unknown) and value;
/// `None` for an entry from before attach.
fn resolve<'a>(
    known: &'a VecDeque<Entry>,
    classes: &Classes,
    unknown_tail: bool,
    index: usize,
) -> Result<Option<Resolved<'a>>, Error> {
    match index {
        0 => Err(Error::BadIndex(0)),
        1..=61 => {
            let (n, v) = STATIC[index - 1];
            Ok(Some((
                classes.statics[index - 1],
                Some(n.as_bytes()),
                v.as_bytes(),
            )))
        }
        _ => match known.get(index - 62) {
            Some(e) => Ok(Some((e.class, e.name.as_deref(), &e.value))),
            None if unknown_tail => Ok(None),
            None => Err(Error::BadIndex(index)),
        },
    }
}

/// A string literal (RFC 7541 5.2) into `out` (cleared first), Huffman-decoded when flagged.
fn string(block: &mut &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let huffman = block.first().ok_or(Error::Truncated)? & 0x80 != 0;
    let (raw, rest) = split_string(block)?;
    *block = rest;
    decode_string(raw, huffman, out)
}

/// A string literal's raw bytes and what follows them (`block` is left as it was).
fn split_string<'a>(block: &&'a [u8]) -> Result<(&'a [u8], &'a [u8]), Error> {
    let mut at: &'a [u8] = block;
    let len = integer(&mut at, 7)?;
    if at.len() < len {
        return Err(Error::Truncated);
    }
    Ok(at.split_at(len))
}

/// `raw` into `out` (cleared first), Huffman-decoded if `huffman`.
fn decode_string(raw: &[u8], huffman: bool, out: &mut Vec<u8>) -> Result<(), Error> {
    out.clear();
    if !huffman {
        out.extend_from_slice(raw);
        return Ok(());
    }
    out.reserve(raw.len() * 8 / 5);
    httlib_huffman::decode(raw, out, httlib_huffman::DecoderSpeed::FourBits)
        .map_err(|_| Error::Huffman)
}

#[cfg(test)]
mod tests;
