//! Low-cardinality names from raw paths: id-like segments become `{id}`, so `GET /users/42` and
//! `GET /users/43` are one span name and one route.

/// Whether a path segment looks like an identifier rather than a fixed word.
pub fn is_id_like(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    // Numbers, and longer segments that are mostly digits (2024-01-01, ord_12345); short
    // ones like v1 or s3 are words.
    if digits == seg.len() || (seg.len() >= 6 && digits * 2 >= seg.len()) {
        return true;
    }
    let hex = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    // UUIDs and hashes: long hex runs.
    if hex && seg.len() >= 16 {
        return true;
    }
    // Long opaque tokens (base64-ish, mixed case and digits).
    seg.len() >= 24
        && digits > 0
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b))
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
    let path = &target[..end];
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
    let mut rest = path;
    loop {
        let end = rest.bytes().position(|b| b == b'/').unwrap_or(rest.len());
        let seg = &rest[..end];
        out.push_str(if is_id_like(seg) { "{id}" } else { seg });
        if end == rest.len() {
            break;
        }
        out.push('/');
        rest = &rest[end + 1..];
    }
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
    }
}
