//! Low-cardinality names from raw paths: id-like segments become `{id}`, so `GET /users/42` and
//! `GET /users/43` are one span name and one route.

/// Byte classes of `is_id_like`, one table lookup per byte.
const DIGIT: u8 = 1;
/// A hex digit or `-` (UUIDs, hashes).
const HEX: u8 = 2;
/// A letter, a digit or one of `-_=` (long opaque tokens).
const TOKEN: u8 = 4;

const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut class = 0;
        if c.is_ascii_digit() {
            class |= DIGIT;
        }
        if c.is_ascii_hexdigit() || c == b'-' {
            class |= HEX;
        }
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'=' {
            class |= TOKEN;
        }
        t[b] = class;
        b += 1;
    }
    t
};

/// Whether a path segment looks like an identifier rather than a fixed word.
pub fn is_id_like(seg: &str) -> bool {
    let mut digits = 0usize;
    let mut all = HEX | TOKEN;
    for &b in seg.as_bytes() {
        let class = CLASSES[b as usize];
        digits += usize::from(class & DIGIT);
        all &= class;
    }
    id_like(seg.len(), digits, all)
}

/// The verdict on a segment of `len` bytes, `digits` of them digits, `all` the classes every
/// byte has.
#[inline(always)]
fn id_like(len: usize, digits: usize, all: u8) -> bool {
    len > 0
        // Numbers, and longer segments that are mostly digits (2024-01-01, ord_12345); short
        // ones like v1 or s3 are words.
        && (digits == len
            || (len >= 6 && digits * 2 >= len)
            // UUIDs and hashes: long hex runs.
            || (all & HEX != 0 && len >= 16)
            // Long opaque tokens (base64-ish, mixed case and digits).
            || (len >= 24 && digits > 0 && all & TOKEN != 0))
}

/// `/users/42/orders/9f86d081884c7d65` -> `/users/{id}/orders/{id}`. The query is dropped.
pub fn template(target: &str) -> String {
    let mut out = String::new();
    template_into(target, &mut out);
    out
}

/// `template`, appended to `out` (a buffer reused across requests).
pub fn template_into(target: &str, out: &mut String) {
    // Byte scans, not `str` patterns: a multi-character or substring pattern sets up a searcher
    // per call, which made this a tenth of the tracing sink's instructions per request.
    let end = target
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    template_path_into(&target[..end], out);
}

/// `template_into` for a target already cut at its query (`shared_text::route_and_name`).
pub fn template_path_into(path: &str, out: &mut String) {
    // Absolute-form targets (proxies): keep only the path. Origin-form starts with '/'.
    let absolute = if path.starts_with('/') {
        None
    } else {
        path.find("://")
    };
    let path = match absolute {
        Some(i) => path[i + 3..]
            .find('/')
            .map(|j| &path[i + 3 + j..])
            .unwrap_or("/"),
        None => path,
    };
    if path.is_empty() || path == "*" {
        out.push_str(path);
        return;
    }
    // Room for a few `{id}`s longer than what they replace.
    out.reserve(path.len() + 8);
    // One pass over the bytes: segments are classified as they are crossed, and the words
    // between ids are copied a run at a time (a scan for each `/`, a pass over each segment
    // and a push per segment were most of templating a path with an id in it).
    let bytes = path.as_bytes();
    let (mut copied, mut start) = (0, 0);
    let (mut digits, mut all) = (0usize, HEX | TOKEN);
    for i in 0..=bytes.len() {
        let b = bytes.get(i).copied().unwrap_or(b'/');
        if b != b'/' {
            let class = CLASSES[b as usize];
            digits += usize::from(class & DIGIT);
            all &= class;
            continue;
        }
        if id_like(i - start, digits, all) {
            out.push_str(&path[copied..start]);
            out.push_str("{id}");
            copied = i;
        }
        start = i + 1;
        (digits, all) = (0, HEX | TOKEN);
    }
    out.push_str(&path[copied..]);
}

#[cfg(test)]
mod tests {
    use super::template;

    #[test]
    fn ids_are_templated_words_are_kept() {
        assert_eq!(template("/users/42"), "/users/{id}");
        assert_eq!(template("/users/42/orders?x=1"), "/users/{id}/orders");
        assert_eq!(
            template("/u/123e4567-e89b-12d3-a456-426614174000"),
            "/u/{id}"
        );
        assert_eq!(
            template("/blob/9f86d081884c7d659a2feaa0c55ad015"),
            "/blob/{id}"
        );
        assert_eq!(template("/api/v1/items"), "/api/v1/items");
        assert_eq!(template("/healthz"), "/healthz");
        assert_eq!(template("/"), "/");
        assert_eq!(template("http://example.com/a/7"), "/a/{id}");
        assert_eq!(template("*"), "*");
        assert_eq!(template("/a/1/2/b/3"), "/a/{id}/{id}/b/{id}");
        assert_eq!(template("/7"), "/{id}");
        assert_eq!(template("/a//b/"), "/a//b/");
        assert_eq!(template("/orders/ord_123456/"), "/orders/{id}/");
        assert_eq!(template("42"), "{id}");
        assert_eq!(template("shop.example.com:443"), "shop.example.com:443");
        assert_eq!(template("http://example.com"), "/");
    }

    #[test]
    fn identifiers_and_words() {
        use super::is_id_like;
        for id in [
            "42",
            "2024-01-01",
            "ord_12345",
            "123e4567-e89b-12d3-a456-426614174000",
            "9f86d081884c7d65",
            "eyJhbGciOiJIUzI1NiJ9abcdef1",
        ] {
            assert!(is_id_like(id), "{id}");
        }
        for word in [
            "",
            "v1",
            "s3",
            "users",
            "deadbeef",
            "orders-by-customer-name",
            "ThisIsALongCamelCaseWordWithoutDigits",
            "caf\u{e9}123",
        ] {
            assert!(!is_id_like(word), "{word}");
        }
    }
}
