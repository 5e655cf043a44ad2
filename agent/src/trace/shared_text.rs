//! Attribute text that many spans repeat (a peer's address, a route) made once and shared:
//! each span then holds a reference count instead of its own copy. Every `String` in a span is
//! an allocation in the pipeline and a cross-thread free in the exporter; a server span repeated
//! its peer address twice and its route twice.
//!
//! Per thread (the pipeline task may run on either runtime worker), bounded: a table that
//! reaches `LIMIT` entries starts over, so a scan over many addresses or a route explosion
//! costs allocations, never memory.

use std::{cell::RefCell, net::IpAddr, sync::Arc};

use foldhash::{HashMap, HashMapExt};

/// Entries per table before it starts over.
const LIMIT: usize = 4096;
/// Slots of the path memo (`route_and_name`): a service's spans repeat a few paths. Only paths
/// that template to themselves are kept: one with an id in it would churn the slots.
const MEMO: usize = 256;
/// Longer text is made per span, never kept: a client choosing its `User-Agent` or target (a
/// head may be 64 KiB) must not make the tables hold LIMIT of them.
const MAX_LEN: usize = 256;

struct Tables {
    ips: HashMap<IpAddr, Arc<str>>,
    routes: HashMap<Box<[u8]>, Arc<str>>,
    /// Header values and span names: what a service's requests repeat (a host, a user agent).
    texts: HashMap<Box<[u8]>, Arc<str>>,
    /// Where a route is templated (or a name put together) before it is looked up.
    scratch: String,
    /// Direct-mapped by a hash of the verb and the path.
    memo: Vec<Option<Named>>,
}

/// What a request path and verb make: its route and its span name.
struct Named {
    verb: Box<str>,
    path: String,
    route: Arc<str>,
    name: Arc<str>,
}

thread_local! {
    static TABLES: RefCell<Tables> = RefCell::new(Tables {
        ips: HashMap::new(),
        routes: HashMap::new(),
        texts: HashMap::new(),
        scratch: String::new(),
        memo: Vec::new(),
    });
}

/// The address as text (see `span::ip_str`), shared.
pub fn ip(addr: IpAddr) -> Arc<str> {
    TABLES.with_borrow_mut(|t| {
        if let Some(text) = t.ips.get(&addr) {
            return text.clone();
        }
        if t.ips.len() >= LIMIT {
            t.ips.clear();
        }
        let text: Arc<str> = crate::trace::span::ip_str(std::net::SocketAddr::new(addr, 0)).into();
        t.ips.insert(addr, text.clone());
        text
    })
}

/// The route of a request target (`route::template_into`), shared.
pub fn route(target: &str) -> Arc<str> {
    TABLES.with_borrow_mut(|t| {
        let Tables {
            routes, scratch, ..
        } = t;
        scratch.clear();
        crate::trace::route::template_into(target, scratch);
        shared(routes, scratch)
    })
}

/// The route of a request `target` and the span name `verb route`, both shared. Remembered per
/// path without ids: templating the path and looking up both texts were a quarter of building
/// an HTTP span.
pub fn route_and_name(verb: &str, target: &str) -> (Arc<str>, Arc<str>) {
    let end = target
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let path = &target[..end];
    if path.len() > MAX_LEN {
        let route = route(path);
        let name = joined(&[verb, " ", &route]);
        return (route, name);
    }
    TABLES.with_borrow_mut(|t| {
        use std::hash::BuildHasher as _;
        let slot = foldhash::fast::FixedState::with_seed(0).hash_one((verb, path)) as usize % MEMO;
        if t.memo.is_empty() {
            t.memo.resize_with(MEMO, || None);
        }
        if let Some(n) = &t.memo[slot]
            && n.path == path
            && *n.verb == *verb
        {
            return (n.route.clone(), n.name.clone());
        }
        let Tables {
            routes,
            texts,
            scratch,
            memo,
            ..
        } = t;
        scratch.clear();
        crate::trace::route::template_path_into(path, scratch);
        let route = shared(routes, scratch);
        scratch.clear();
        scratch.push_str(verb);
        scratch.push(' ');
        scratch.push_str(&route);
        let name = shared(texts, scratch);
        // A path with an id in it rarely comes again: it would only push out a path that does
        // (and remembering it cost more than templating it: 150 against 105 ns per unique path).
        if *route != *path {
            return (route, name);
        }
        // The slot's buffers are reused by the path that takes it.
        match &mut memo[slot] {
            Some(n) => {
                if *n.verb != *verb {
                    n.verb = verb.into();
                }
                n.path.clear();
                n.path.push_str(path);
                n.route = route.clone();
                n.name = name.clone();
            }
            empty => {
                *empty = Some(Named {
                    verb: verb.into(),
                    path: path.to_string(),
                    route: route.clone(),
                    name: name.clone(),
                })
            }
        }
        (route, name)
    })
}

/// `text`, shared.
pub fn text(text: &str) -> Arc<str> {
    TABLES.with_borrow_mut(|t| shared(&mut t.texts, text))
}

/// A header value as shared text, trimmed; `None` if it is not UTF-8. A value seen before is
/// found by its bytes: validating a user agent on every request was a fifth of looking it up.
pub fn header_text(value: &[u8]) -> Option<Arc<str>> {
    let value = value.trim_ascii();
    if value.len() <= MAX_LEN
        && let Some(found) = TABLES.with_borrow(|t| t.texts.get(value).cloned())
    {
        return Some(found);
    }
    Some(text(crate::protocol::text::utf8(value)?))
}

/// `parts` joined into one text, shared (a span name: a verb and a route).
pub fn joined(parts: &[&str]) -> Arc<str> {
    TABLES.with_borrow_mut(|t| {
        let Tables { texts, scratch, .. } = t;
        scratch.clear();
        parts.iter().for_each(|p| scratch.push_str(p));
        shared(texts, scratch)
    })
}

fn shared(table: &mut HashMap<Box<[u8]>, Arc<str>>, text: &str) -> Arc<str> {
    if text.len() > MAX_LEN {
        return text.into();
    }
    if let Some(found) = table.get(text.as_bytes()) {
        return found.clone();
    }
    if table.len() >= LIMIT {
        table.clear();
    }
    let made: Arc<str> = text.into();
    table.insert(text.as_bytes().into(), made.clone());
    made
}

/// What was last made from some bytes (held in a thread-local per use): a service's requests
/// repeat their host and user agent one after another, and one comparison with the last is
/// cheaper than hashing and looking them up again (~110 instructions each) and, for a host,
/// parsing its port. Bytes longer than `MAX_LEN` are not remembered.
pub struct Recent<T> {
    last: Option<(Vec<u8>, Option<T>)>,
}

impl<T: Clone> Recent<T> {
    pub const fn new() -> Self {
        Self { last: None }
    }

    /// `make(bytes)`, or what it gave for the same bytes last time.
    pub fn get(&mut self, bytes: &[u8], make: impl FnOnce(&[u8]) -> Option<T>) -> Option<T> {
        if let Some((last, made)) = &self.last
            && last.as_slice() == bytes
        {
            return made.clone();
        }
        let made = make(bytes);
        if bytes.len() <= MAX_LEN {
            match &mut self.last {
                Some((last, kept)) => {
                    last.clear();
                    last.extend_from_slice(bytes);
                    kept.clone_from(&made);
                }
                none => *none = Some((bytes.to_vec(), made.clone())),
            }
        }
        made
    }
}

impl<T: Clone> Default for Recent<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_gives_what_its_maker_gives_and_remembers_only_the_last_short_bytes() {
        let made = std::cell::Cell::new(0);
        let mut recent = Recent::new();
        let mut get = |b: &[u8]| -> Option<Arc<str>> {
            recent.get(b, |b| {
                made.set(made.get() + 1);
                header_text(b)
            })
        };
        // An empty value is a value: the first call makes it.
        assert_eq!(get(b"").as_deref(), Some(""));
        let a = get(b"curl/8.5.0").unwrap();
        let b = get(b"curl/8.5.0").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(get(b"bad \xff"), None);
        assert_eq!(get(b"bad \xff"), None);
        assert_eq!(get(b"curl/8.6.0").as_deref(), Some("curl/8.6.0"));
        let long = vec![b'x'; MAX_LEN + 1];
        for _ in 0..2 {
            assert_eq!(get(&long).map(|t| t.len()), Some(MAX_LEN + 1));
        }
        // Made once per change of bytes, and for each long value.
        assert_eq!(made.get(), 6);
        // The long value did not take the place of the last short one.
        assert_eq!(get(b"curl/8.6.0").as_deref(), Some("curl/8.6.0"));
        assert_eq!(made.get(), 6);
    }

    #[test]
    fn the_same_text_is_shared_and_equal_to_a_fresh_one() {
        let a = ip("10.1.2.3".parse().unwrap());
        let b = ip("10.1.2.3".parse().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "10.1.2.3");
        assert_eq!(&*ip("::1".parse().unwrap()), "::1");
        let r = route("/users/42?x=1");
        assert!(Arc::ptr_eq(&r, &route("/users/43")));
        assert_eq!(&*r, "/users/{id}");
        let n = joined(&["GET", " ", &r]);
        assert!(Arc::ptr_eq(&n, &text("GET /users/{id}")));
    }

    #[test]
    fn a_remembered_path_gives_the_route_and_name_it_made() {
        use std::hash::BuildHasher as _;
        let (r, n) = route_and_name("GET", "/users/42?x=1");
        assert_eq!((&*r, &*n), ("/users/{id}", "GET /users/{id}"));
        let (r2, n2) = route_and_name("GET", "/users/42#top");
        assert!(Arc::ptr_eq(&r, &r2) && Arc::ptr_eq(&n, &n2));
        // The verb is part of what is remembered.
        let (_, post) = route_and_name("POST", "/users/42");
        assert_eq!(&*post, "POST /users/{id}");
        assert_eq!(&*route_and_name("GET", "/users/42").1, "GET /users/{id}");
        // Paths that share a slot replace each other and still come out right.
        for i in 0..(3 * MEMO) {
            let path = format!("/p{i}/items");
            let (r, n) = route_and_name("PUT", &path);
            assert_eq!(&*r, path.as_str());
            assert_eq!(*n, format!("PUT {path}"));
        }
        // A path with an id is templated each time, and takes no slot from one without.
        let (_, kept) = route_and_name("GET", "/static/page");
        for i in 0..(3 * MEMO) {
            assert_eq!(&*route_and_name("GET", &format!("/u/{i}")).0, "/u/{id}");
        }
        let slot = foldhash::fast::FixedState::with_seed(0).hash_one(("GET", "/static/page"))
            as usize
            % MEMO;
        TABLES.with_borrow(|t| {
            let n = t.memo[slot].as_ref().expect("kept");
            assert!(n.path == "/static/page" && Arc::ptr_eq(&n.name, &kept));
        });
        // A path too long to remember is templated all the same.
        let long = format!("/shop{}", "/cart".repeat(MAX_LEN / 4));
        assert_eq!(route_and_name("GET", &long).0, route(&long));
    }

    #[test]
    fn a_header_value_is_the_shared_text_of_its_trimmed_bytes_if_it_is_utf8() {
        let a = header_text(b" curl/8.5.0 ").expect("UTF-8");
        assert_eq!(&*a, "curl/8.5.0");
        assert!(Arc::ptr_eq(&a, &text("curl/8.5.0")));
        assert!(Arc::ptr_eq(&a, &header_text(b"curl/8.5.0").expect("UTF-8")));
        assert_eq!(header_text(b"caf\xc3\xa9").as_deref(), Some("caf\u{e9}"));
        assert_eq!(header_text(b"bad \xff"), None);
        let long = "a".repeat(MAX_LEN + 1);
        assert_eq!(header_text(long.as_bytes()).as_deref(), Some(long.as_str()));
    }

    #[test]
    fn long_text_is_not_kept() {
        let long = "a".repeat(MAX_LEN + 1);
        let a = text(&long);
        assert_eq!(&*a, long);
        assert!(!Arc::ptr_eq(&a, &text(&long)));
        TABLES.with_borrow(|t| assert!(!t.texts.contains_key(long.as_bytes())));
        let target = "/shop".repeat(MAX_LEN / 4);
        assert_eq!(&*route(&target), target);
        TABLES.with_borrow(|t| assert!(!t.routes.contains_key(target.as_bytes())));
    }

    #[test]
    fn a_full_table_starts_over_instead_of_growing() {
        for i in 0..(LIMIT as u32 + 10) {
            ip(IpAddr::V4(i.into()));
        }
        TABLES.with_borrow(|t| assert!(t.ips.len() <= LIMIT));
    }
}
