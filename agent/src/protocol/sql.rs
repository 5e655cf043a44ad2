//! SQL text made safe to export, with the parts a span is named by.
//!
//! Literals (strings, numbers, hex, booleans, dollar-quoted bodies) become `?` before any text is
//! stored: the semantic conventions (database spans) allow non-parameterized text only that way.
//! Placeholders (`$1`, `?`) are kept; comments are dropped; whitespace collapses. The tokenizer is
//! sqlparser's, not a regex: quoting rules differ per dialect (`"x"` is a string in MySQL and an
//! identifier in PostgreSQL). Text cut short by the capture tokenizes up to the cut.

use foldhash::{HashMap, HashMapExt};
use std::{
    hash::{Hash, Hasher},
    sync::Arc,
};

use sqlparser::{
    dialect::{Dialect, MySqlDialect, PostgreSqlDialect},
    keywords::Keyword,
    tokenizer::{Token, Tokenizer, Whitespace},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    Postgres,
    Mysql,
}

/// What one statement text becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Sanitized, at most the cap (then `truncated`). None when nothing safe could be made.
    pub text: Option<Arc<str>>,
    pub truncated: bool,
    /// First keyword, upper case (`SELECT`, `INSERT`, `BEGIN`).
    pub operation: Option<Arc<str>>,
    /// The one table the statement reads or writes, when there is exactly one.
    pub collection: Option<Arc<str>>,
}

/// Statement texts already sanitized, keyed by a hash of the raw text: prepared statements and
/// ORM queries repeat, and tokenizing is the costly step. Bounded: cleared when full.
pub struct Cache {
    map: HashMap<(Flavor, u64), Arc<Statement>>,
    cap: usize,
    max_text: usize,
    pub hits: u64,
    pub misses: u64,
}

/// Entries kept before the cache starts over.
pub const CACHE_ENTRIES: usize = 4096;

impl Cache {
    pub fn new(max_text: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap: CACHE_ENTRIES,
            max_text,
            hits: 0,
            misses: 0,
        }
    }

    /// `cut`: the raw text is known to be incomplete (a capture gap ended it).
    pub fn statement(&mut self, flavor: Flavor, raw: &str, cut: bool) -> Arc<Statement> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        cut.hash(&mut h);
        let key = (flavor, h.finish());
        if let Some(s) = self.map.get(&key) {
            self.hits += 1;
            return s.clone();
        }
        self.misses += 1;
        if self.map.len() >= self.cap {
            self.map.clear();
        }
        let s = Arc::new(sanitize(flavor, raw, cut, self.max_text));
        self.map.insert(key, s.clone());
        s
    }
}

fn tokens(flavor: Flavor, raw: &str) -> Result<Vec<Token>, usize> {
    let pg = PostgreSqlDialect {};
    let my = MySqlDialect {};
    let dialect: &dyn Dialect = match flavor {
        Flavor::Postgres => &pg,
        Flavor::Mysql => &my,
    };
    let mut t = Tokenizer::new(dialect, raw).with_unescape(false);
    t.tokenize_with_location()
        .map(|v| v.into_iter().map(|t| t.token).collect())
        .map_err(|e| byte_offset(raw, e.location.line, e.location.column))
}

fn byte_offset(raw: &str, line: u64, column: u64) -> usize {
    let mut offset = 0;
    for (i, l) in raw.split_inclusive('\n').enumerate() {
        if i as u64 + 1 == line {
            let col = column.saturating_sub(1) as usize;
            return offset + l.char_indices().nth(col).map(|(b, _)| b).unwrap_or(l.len());
        }
        offset += l.len();
    }
    raw.len()
}

fn is_literal(t: &Token) -> bool {
    matches!(
        t,
        Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
    ) || matches!(t, Token::Word(w) if w.quote_style.is_none()
            && matches!(w.keyword, Keyword::TRUE | Keyword::FALSE))
}

/// Sanitizes one statement (see the module comment). Never returns literal text.
pub fn sanitize(flavor: Flavor, raw: &str, cut: bool, max_text: usize) -> Statement {
    let (toks, cut) = match tokens(flavor, raw) {
        Ok(t) => (t, cut),
        // An unterminated literal or comment: the text was cut inside it (or is not SQL).
        // Everything before the error tokenizes; the rest is dropped.
        Err(at) => match tokens(flavor, &raw[..at]) {
            Ok(t) => (t, true),
            Err(_) => {
                return Statement {
                    text: None,
                    truncated: true,
                    operation: None,
                    collection: None,
                };
            }
        },
    };
    let mut out = String::with_capacity(raw.len().min(max_text) + 8);
    let mut space = false;
    let mut truncated = cut;
    for t in &toks {
        let piece = match t {
            Token::Whitespace(Whitespace::Space | Whitespace::Tab | Whitespace::Newline) => {
                space = !out.is_empty();
                continue;
            }
            // Comments may hold anything; sqlcommenter ids are not the statement.
            Token::Whitespace(_) => {
                space = !out.is_empty();
                continue;
            }
            Token::EOF => continue,
            t if is_literal(t) => "?".to_string(),
            t => t.to_string(),
        };
        let extra = piece.len() + usize::from(space);
        if out.len() + extra > max_text {
            truncated = true;
            break;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push_str(&piece);
    }
    if cut && !out.ends_with('?') && out.len() < max_text {
        // The literal the capture cut inside is gone: say that something stood there.
        out.push_str(" ?");
    }
    let words: Vec<&sqlparser::tokenizer::Word> = toks
        .iter()
        .filter_map(|t| match t {
            Token::Word(w) => Some(w),
            _ => None,
        })
        .collect();
    let operation = words
        .iter()
        .find(|w| w.quote_style.is_none() && w.keyword != Keyword::NoKeyword)
        .map(|w| Arc::from(w.value.to_ascii_uppercase()));
    Statement {
        text: (!out.is_empty()).then(|| Arc::from(out)),
        truncated,
        collection: collection(&toks, operation.as_deref()),
        operation,
    }
}

/// The single table a SELECT/INSERT/UPDATE/DELETE names, or None when there are several (a join,
/// a comma list, a subquery's FROM) or none: the conventions say not to guess.
fn collection(toks: &[Token], operation: Option<&str>) -> Option<Arc<str>> {
    let significant: Vec<&Token> = toks
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
        .collect();
    let kw = |t: &Token, k: Keyword| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.keyword == k);
    let anchor = match operation? {
        "SELECT" | "DELETE" => Keyword::FROM,
        "INSERT" | "REPLACE" => Keyword::INTO,
        "UPDATE" => Keyword::UPDATE,
        _ => return None,
    };
    let tables = significant.iter().filter(|t| kw(t, Keyword::FROM)).count()
        + significant.iter().filter(|t| kw(t, Keyword::JOIN)).count();
    if tables > 1 || (anchor != Keyword::FROM && tables > 0 && operation != Some("DELETE")) {
        return None;
    }
    let at = significant.iter().position(|t| kw(t, anchor))?;
    // schema.table (or db.table): words joined by periods.
    let mut name = String::new();
    let mut i = at + 1;
    while let Some(Token::Word(w)) = significant.get(i) {
        name.push_str(&w.value);
        match significant.get(i + 1) {
            Some(Token::Period) => {
                name.push('.');
                i += 2;
            }
            _ => break,
        }
    }
    if name.is_empty() || name.ends_with('.') {
        return None;
    }
    // `FROM a, b` names two tables.
    let after = significant.get(i + 1);
    if matches!(after, Some(Token::Comma)) && anchor == Keyword::FROM {
        return None;
    }
    Some(Arc::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(s: &str) -> Statement {
        sanitize(Flavor::Postgres, s, false, 2048)
    }

    #[test]
    fn literals_become_placeholders() {
        let s = pg("SELECT * FROM users WHERE email = 'bob@example.com' AND age > 42");
        assert_eq!(
            s.text.as_deref(),
            Some("SELECT * FROM users WHERE email = ? AND age > ?")
        );
        assert_eq!(s.operation.as_deref(), Some("SELECT"));
        assert_eq!(s.collection.as_deref(), Some("users"));
        let s = pg("insert into orders (id, note, ok) values (7, E'it''s\\n', true)");
        assert_eq!(
            s.text.as_deref(),
            Some("insert into orders (id, note, ok) values (?, ?, ?)")
        );
        assert_eq!(s.operation.as_deref(), Some("INSERT"));
        assert_eq!(s.collection.as_deref(), Some("orders"));
        let s = pg("SELECT $tag$secret$tag$, x'ff', 1.5e3");
        assert_eq!(s.text.as_deref(), Some("SELECT ?, ?, ?"));
    }

    #[test]
    fn placeholders_and_identifiers_stay() {
        let s = pg("UPDATE \"Items\" SET qty = $1 WHERE id = $2");
        assert_eq!(
            s.text.as_deref(),
            Some("UPDATE \"Items\" SET qty = $1 WHERE id = $2")
        );
        assert_eq!(s.collection.as_deref(), Some("Items"));
        let s = sanitize(
            Flavor::Mysql,
            "SELECT `name` FROM shop.items WHERE id = ? AND tag = \"red\"",
            false,
            2048,
        );
        assert_eq!(
            s.text.as_deref(),
            Some("SELECT `name` FROM shop.items WHERE id = ? AND tag = ?")
        );
        assert_eq!(s.collection.as_deref(), Some("shop.items"));
    }

    #[test]
    fn several_tables_name_no_collection() {
        assert_eq!(pg("SELECT * FROM a JOIN b ON a.id = b.id").collection, None);
        assert_eq!(pg("SELECT * FROM a, b").collection, None);
        assert_eq!(
            pg("SELECT * FROM a WHERE id IN (SELECT id FROM b)").collection,
            None
        );
        assert_eq!(pg("BEGIN").operation.as_deref(), Some("BEGIN"));
        assert_eq!(pg("BEGIN").collection, None);
    }

    #[test]
    fn comments_are_dropped_and_cut_text_loses_the_open_literal() {
        let s = pg("SELECT 1 /* password='x' */ -- and 'y'\n");
        assert_eq!(s.text.as_deref(), Some("SELECT ?"));
        let s = sanitize(
            Flavor::Postgres,
            "SELECT * FROM t WHERE name = 'Rob",
            true,
            2048,
        );
        assert_eq!(s.text.as_deref(), Some("SELECT * FROM t WHERE name = ?"));
        assert!(s.truncated);
        assert!(!s.text.unwrap().contains("Rob"));
    }

    #[test]
    fn long_text_is_capped_and_marked() {
        let raw = format!("SELECT {} FROM t", vec!["col"; 1000].join(", "));
        let s = sanitize(Flavor::Postgres, &raw, false, 100);
        assert!(s.truncated);
        assert!(s.text.unwrap().len() <= 100);
    }

    #[test]
    fn the_cache_answers_repeats() {
        let mut c = Cache::new(2048);
        let a = c.statement(Flavor::Postgres, "SELECT 1", false);
        let b = c.statement(Flavor::Postgres, "SELECT 1", false);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((c.hits, c.misses), (1, 1));
    }
}
