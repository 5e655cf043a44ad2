//! What may leave the node. Secrets travel in headers, query strings and command lines
//! (`curl -H 'Authorization: …'`, `--password=…`, `https://user:pass@host/?token=…`): each is
//! masked with `REDACTED` by default. The rules prefer masking too much to leaking.

/// Words that make a header, parameter or flag name secret-bearing.
const SENSITIVE: [&str; 14] = [
    "auth",
    "cookie",
    "token",
    "secret",
    "passw",
    "pwd",
    "apikey",
    "api-key",
    "api_key",
    "key",
    "credential",
    "session",
    "signature",
    "private",
];

pub const MASK: &str = "REDACTED";

pub fn is_sensitive_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE.iter().any(|w| lower.contains(w))
}

/// Captured bytes as `loupe capture` prints them: the value of every header-like line whose name
/// is secret-bearing (`Authorization: …`, `Cookie: …`, `X-Api-Key: …`) and the query values of
/// an HTTP request line are masked, the rest left byte for byte. Header-like lines in a body are
/// masked too: masking too much beats leaking. None when nothing needed masking.
pub fn payload(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    let mut changed = false;
    for (i, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
        let masked = if i == 0 {
            request_line(line)
        } else {
            header_line(line)
        };
        match masked {
            Some(m) => {
                out.extend_from_slice(&m);
                changed = true;
            }
            None => out.extend_from_slice(line),
        }
    }
    changed.then_some(out)
}

/// `Name: value\r\n` with a secret-bearing name -> `Name: REDACTED\r\n`.
fn header_line(line: &[u8]) -> Option<Vec<u8>> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"-_".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return None;
    }
    if !is_sensitive_name(std::str::from_utf8(name).ok()?) {
        return None;
    }
    let end = line.len()
        - line
            .iter()
            .rev()
            .take_while(|b| b"\r\n".contains(b))
            .count();
    let mut out = line[..=colon].to_vec();
    out.push(b' ');
    out.extend_from_slice(MASK.as_bytes());
    out.extend_from_slice(&line[end..]);
    Some(out)
}

/// `GET /p?token=abc HTTP/1.1` -> `GET /p?token=REDACTED HTTP/1.1`.
fn request_line(line: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.splitn(3, ' ');
    let (method, target, rest) = (parts.next()?, parts.next()?, parts.next()?);
    if !rest.starts_with("HTTP/") || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return header_line(line);
    }
    let (path, q) = target.split_once('?')?;
    Some(format!("{method} {path}?{} {rest}", query(q)).into_bytes())
}

/// `a=1&b=2;c=3` -> `a=REDACTED&b=REDACTED;c=REDACTED`. Keys stay (low-risk and useful) when
/// they look like names; a key or a bare item that looks like a token (`?eyJhbGciOi…`,
/// `?3f9a…`) is masked whole.
pub fn query(q: &str) -> String {
    // Room for a few masks longer than the values they replace.
    let mut out = String::with_capacity(q.len() + 32);
    let mut rest = q;
    loop {
        // Byte scans: `str` patterns of several characters set up a searcher per call.
        let end = rest
            .bytes()
            .position(|b| b == b'&' || b == b';')
            .unwrap_or(rest.len());
        let (pair, tail) = rest.split_at(end);
        let split = pair
            .bytes()
            .position(|b| b == b'=')
            .map(|i| (&pair[..i], &pair[i + 1..]));
        match split {
            Some((k, _)) if name_like(k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(MASK);
            }
            Some(_) => {
                out.push_str(MASK);
                out.push('=');
                out.push_str(MASK);
            }
            // A bare flag (`?debug`) stays; anything else bare may be a token.
            None if pair.len() <= 16
                && pair
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-') =>
            {
                out.push_str(pair)
            }
            None => out.push_str(MASK),
        }
        // The separator is one ASCII byte.
        let Some(&sep) = tail.as_bytes().first() else {
            break;
        };
        out.push(sep as char);
        rest = &tail[1..];
    }
    out
}

/// A parameter name rather than a value: short, and letters, digits and `_.-[]` with no digit
/// run that makes it look generated.
fn name_like(s: &str) -> bool {
    if s.is_empty() || s.len() > 32 {
        return false;
    }
    // One pass: every key of every query goes through here.
    let mut digits = 0;
    for b in s.bytes() {
        if b.is_ascii_digit() {
            digits += 1;
        } else if !(b.is_ascii_alphabetic() || matches!(b, b'_' | b'.' | b'-' | b'[' | b']')) {
            return false;
        }
    }
    digits <= 2
}

/// Masks the userinfo and the query values of a URL inside `s`.
fn url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let (head, rest) = s.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("{MASK}@{host}"),
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, q)) => {
            let (q, frag) = q
                .split_once('#')
                .map(|(q, f)| (q, format!("#{f}")))
                .unwrap_or((q, String::new()));
            format!("{path}?{}{frag}", query(q))
        }
        None => tail.to_string(),
    };
    format!("{head}{authority}{tail}")
}

/// One argument on its own: `Name: value` headers, `name=value` pairs and URLs.
fn arg(a: &str) -> String {
    // URLs first: their query looks like `name=value` pairs too.
    if a.contains("://") {
        return url(a);
    }
    if let Some((name, _)) = a.split_once(':')
        && !name.is_empty()
        && !name.contains([' ', '/'])
        && is_sensitive_name(name)
    {
        return format!("{name}: {MASK}");
    }
    if let Some((name, _)) = a.split_once('=')
        && is_sensitive_name(name.trim_start_matches('-'))
    {
        return format!("{name}={MASK}");
    }
    a.to_string()
}

/// A command line with secret-bearing arguments masked: the rules of `arg`, plus the value after
/// a sensitive flag (`--password x`, `--token x`) and after `-u`/`--user` (`user:password`).
pub fn command_line(argv: &[String]) -> String {
    if let Some(masked) = database_client(argv) {
        return masked;
    }
    let mut out = Vec::with_capacity(argv.len());
    let mut mask_next = false;
    for a in argv {
        if mask_next {
            out.push(MASK.to_string());
            mask_next = false;
            continue;
        }
        let flag = a.starts_with('-') && !a.contains('=');
        if flag && (is_sensitive_name(a) || a == "-u" || a == "--user") {
            mask_next = true;
        }
        out.push(arg(a));
    }
    out.join(" ")
}

/// Database command-line clients carry statements (with their literals), values and passwords
/// in their arguments: `psql -c SQL`, `mysql -e SQL -pPASS`, `redis-cli SET key value`. Their
/// statements and values are masked; flags and connection targets stay.
fn database_client(argv: &[String]) -> Option<String> {
    let exe = argv.first()?.rsplit('/').next()?;
    let (statement_flags, valued): (&[&str], &[&str]) = match exe {
        "psql" => (
            &["-c", "--command"],
            &[
                "-h",
                "-p",
                "-U",
                "-d",
                "-f",
                "-v",
                "--host",
                "--port",
                "--username",
                "--dbname",
            ],
        ),
        "mysql" | "mariadb" => (
            &["-e", "--execute"],
            &[
                "-h",
                "-P",
                "-u",
                "-D",
                "-S",
                "--host",
                "--port",
                "--user",
                "--database",
            ],
        ),
        "redis-cli" | "valkey-cli" => (&[], &["-h", "-p", "-n", "-s", "-u", "--user"]),
        _ => return None,
    };
    let redis = statement_flags.is_empty();
    let mut out = vec![argv[0].clone()];
    let mut positional = 0;
    let mut it = argv[1..].iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, _)) if a.starts_with("--") => (f, true),
            _ => (a.as_str(), false),
        };
        let is_flag = a.starts_with('-');
        if is_flag && a.starts_with("-p") && a.len() > 2 && exe != "psql" && exe != "redis-cli" {
            // mysql -pPASSWORD
            out.push(format!("-p{MASK}"));
        } else if is_flag
            && (statement_flags.contains(&flag)
                || flag == "-a"
                || (flag.starts_with("--") && is_sensitive_name(flag)))
        {
            out.push(if inline {
                format!("{flag}={MASK}")
            } else {
                it.next();
                format!("{flag} {MASK}")
            });
        } else if valued.contains(&flag) && !inline {
            out.push(a.clone());
            if let Some(v) = it.next() {
                out.push(if flag == "-u" && redis {
                    MASK.to_string()
                } else {
                    v.clone()
                });
            }
        } else if a.starts_with('-') {
            out.push(arg(a));
        } else {
            positional += 1;
            // redis-cli COMMAND args...: the command stays, its key and values go. For psql and
            // mysql a positional argument is a database or user name.
            out.push(if redis && positional > 1 {
                MASK.to_string()
            } else {
                arg(a)
            });
        }
    }
    Some(out.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_payloads_lose_their_secrets_and_nothing_else() {
        let raw = b"GET /a?token=t0k&id=7 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\n\
                    Cookie: sid=1\r\nX-Api-Key:k\r\nAccept: */*\r\n\r\n";
        let masked = String::from_utf8(payload(raw).unwrap()).unwrap();
        assert_eq!(
            masked,
            "GET /a?token=REDACTED&id=REDACTED HTTP/1.1\r\nHost: x\r\nAuthorization: REDACTED\r\n\
             Cookie: REDACTED\r\nX-Api-Key: REDACTED\r\nAccept: */*\r\n\r\n"
        );
        let resp = b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=2; HttpOnly\r\n\r\nbody";
        assert_eq!(
            payload(resp).unwrap(),
            b"HTTP/1.1 200 OK\r\nSet-Cookie: REDACTED\r\n\r\nbody".to_vec()
        );
        assert_eq!(payload(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"), None);
        assert_eq!(payload(b"\x00\x01binary:\xff"), None);
    }

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// (input argv, secret that must be gone, text that must stay)
    const TABLE: &[(&[&str], &str, &str)] = &[
        (
            &["curl", "-H", "Authorization: Bearer s3cr3t", "http://x/"],
            "s3cr3t",
            "Authorization: REDACTED",
        ),
        (
            &["curl", "-H", "Cookie: sid=abc123", "http://x/"],
            "abc123",
            "Cookie: REDACTED",
        ),
        (
            &["curl", "-H", "X-Api-Key: k-999", "http://x/"],
            "k-999",
            "X-Api-Key: REDACTED",
        ),
        (
            &["curl", "-H", "Proxy-Authorization: Basic Zm9v", "http://x/"],
            "Zm9v",
            "Proxy-Authorization",
        ),
        (
            &["curl", "http://x/a?token=t0k&page=2"],
            "t0k",
            "http://x/a?token=REDACTED&page=REDACTED",
        ),
        (
            &["curl", "https://bob:hunter2@db/"],
            "hunter2",
            "https://REDACTED@db/",
        ),
        (
            &["curl", "-u", "bob:hunter2", "http://x/"],
            "hunter2",
            "-u REDACTED",
        ),
        (
            &["app", "--password", "hunter2"],
            "hunter2",
            "--password REDACTED",
        ),
        (
            &["app", "--db-password=hunter2"],
            "hunter2",
            "--db-password=REDACTED",
        ),
        (
            &["env", "API_TOKEN=abc", "app"],
            "abc",
            "API_TOKEN=REDACTED",
        ),
        (
            &["psql", "postgresql://u:pw@h:5432/db?sslpassword=x9"],
            "pw@",
            "postgresql://REDACTED@h:5432/db",
        ),
    ];

    #[test]
    fn database_clients_lose_statements_values_and_passwords() {
        let cases: &[(&[&str], &[&str], &str)] = &[
            (
                &["psql", "-h", "db", "-c", "SELECT 'x-secret'", "shop"],
                &["x-secret"],
                "psql -h db -c REDACTED shop",
            ),
            (
                &[
                    "/usr/bin/mariadb",
                    "-uroot",
                    "-ppw-secret",
                    "-e",
                    "SELECT 'x-secret'",
                ],
                &["x-secret", "pw-secret"],
                "-pREDACTED -e REDACTED",
            ),
            (
                &[
                    "redis-cli",
                    "-p",
                    "6379",
                    "-a",
                    "pw-secret",
                    "SET",
                    "k-secret",
                    "v-secret",
                ],
                &["pw-secret", "k-secret", "v-secret"],
                "redis-cli -p 6379 -a REDACTED SET REDACTED REDACTED",
            ),
        ];
        for (input, gone, kept) in cases {
            let out = command_line(&argv(input));
            for g in *gone {
                assert!(!out.contains(g), "{g} in {out}");
            }
            assert!(out.contains(kept), "{kept} not in {out}");
        }
    }

    #[test]
    fn secrets_in_command_lines_are_masked() {
        for (input, secret, kept) in TABLE {
            let got = command_line(&argv(input));
            assert!(!got.contains(secret), "{input:?} -> {got}");
            assert!(got.contains(kept), "{input:?} -> {got}, expected {kept}");
        }
    }

    #[test]
    fn ordinary_command_lines_are_unchanged() {
        for input in [
            &["nginx:", "worker", "process"][..],
            &["python3", "-m", "http.server", "8080"],
            &[
                "/usr/bin/python3",
                "/usr/local/bin/gunicorn",
                "-b",
                "127.0.0.1:8000",
                "-w",
                "2",
                "app:app",
            ],
            &["java", "-Xmx1g", "-jar", "/opt/app.jar"],
        ] {
            assert_eq!(command_line(&argv(input)), input.join(" "));
        }
    }

    #[test]
    fn queries_keep_keys_and_lose_values() {
        assert_eq!(query("a=1&b=&flag"), "a=REDACTED&b=REDACTED&flag");
    }

    #[test]
    fn every_query_form_keeps_names_and_masks_values() {
        assert_eq!(query("a=1&b=2"), "a=REDACTED&b=REDACTED");
        assert_eq!(query("a=1;token=x"), "a=REDACTED;token=REDACTED");
        assert_eq!(query("flag&debug"), "flag&debug");
        assert_eq!(query("a=&&b"), "a=REDACTED&&b");
        assert_eq!(query(""), "");
        // Bare tokens and token-like keys go whole.
        assert_eq!(
            query("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig"),
            "REDACTED"
        );
        assert_eq!(query("3f9a0c2b71=1&x=2"), "REDACTED=REDACTED&x=REDACTED");
        assert_eq!(query("SECRET-QUERY-9"), "REDACTED");
        assert_eq!(
            query("user_id=7&items[]=3"),
            "user_id=REDACTED&items[]=REDACTED"
        );
    }
}
