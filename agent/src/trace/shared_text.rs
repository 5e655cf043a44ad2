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
/// Longer text is made per span, never kept: a client choosing its `User-Agent` or target (a
/// head may be 64 KiB) must not make the tables hold LIMIT of them.
const MAX_LEN: usize = 256;

struct Tables {
    ips: HashMap<IpAddr, Arc<str>>,
    routes: HashMap<Box<str>, Arc<str>>,
    /// Header values and span names: what a service's requests repeat (a host, a user agent).
    texts: HashMap<Box<str>, Arc<str>>,
    /// Where a route is templated (or a name put together) before it is looked up.
    scratch: String,
}

thread_local! {
    static TABLES: RefCell<Tables> = RefCell::new(Tables {
        ips: HashMap::new(),
        routes: HashMap::new(),
        texts: HashMap::new(),
        scratch: String::new(),
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

/// `text`, shared.
pub fn text(text: &str) -> Arc<str> {
    TABLES.with_borrow_mut(|t| shared(&mut t.texts, text))
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

fn shared(table: &mut HashMap<Box<str>, Arc<str>>, text: &str) -> Arc<str> {
    if text.len() > MAX_LEN {
        return text.into();
    }
    if let Some(found) = table.get(text) {
        return found.clone();
    }
    if table.len() >= LIMIT {
        table.clear();
    }
    let made: Arc<str> = text.into();
    table.insert(text.into(), made.clone());
    made
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn long_text_is_not_kept() {
        let long = "a".repeat(MAX_LEN + 1);
        let a = text(&long);
        assert_eq!(&*a, long);
        assert!(!Arc::ptr_eq(&a, &text(&long)));
        TABLES.with_borrow(|t| assert!(!t.texts.contains_key(long.as_str())));
        let target = "/shop".repeat(MAX_LEN / 4);
        assert_eq!(&*route(&target), target);
        TABLES.with_borrow(|t| assert!(!t.routes.contains_key(target.as_str())));
    }

    #[test]
    fn a_full_table_starts_over_instead_of_growing() {
        for i in 0..(LIMIT as u32 + 10) {
            ip(IpAddr::V4(i.into()));
        }
        TABLES.with_borrow(|t| assert!(t.ips.len() <= LIMIT));
    }
}
