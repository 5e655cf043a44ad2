//! Which processes `--pid` and `--exe` select, as of start: the named processes, the processes
//! running an executable whose name matches, and all their descendants (a gunicorn, nginx or
//! php-fpm master's workers do the work). The kernel keeps the set current from then on
//! (agent-ebpf programs/lineage.rs): new child processes join, exited descendants leave, and a
//! process that execs an exactly named executable joins.

use std::collections::{HashMap, HashSet};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Named by the user, or matched by `--exe` now.
    pub roots: Vec<u32>,
    /// Their descendants now.
    pub descendants: Vec<u32>,
    /// `--exe` values without glob characters, as task names (first 15 bytes, NUL-padded):
    /// processes that exec them later are selected by the kernel.
    pub exec_names: Vec<[u8; 16]>,
}

/// A process as /proc shows it: pid, parent, executable file name, task name.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub comm: String,
}

fn is_glob(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

/// Shell-style glob match (`*`, `?`, `[abc]`, `[a-z]`, `[!a]`) of a whole name.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // p starts after '['; returns (matched, length of the class including ']').
        let (negate, mut i) = match p.first() {
            Some('!') | Some('^') => (true, 1),
            _ => (false, 0),
        };
        let mut hit = false;
        let start = i;
        while i < p.len() && (p[i] != ']' || i == start) {
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                hit |= p[i] <= c && c <= p[i + 2];
                i += 3;
            } else {
                hit |= p[i] == c;
                i += 1;
            }
        }
        (i < p.len()).then_some((hit != negate, i + 1))
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| go(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => match (
                n.first(),
                class(&p[1..], n.first().copied().unwrap_or('\0')),
            ) {
                (Some(_), Some((true, len))) => go(&p[1 + len..], &n[1..]),
                (Some(c), None) => *c == '[' && go(&p[1..], &n[1..]),
                _ => false,
            },
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// The task name the kernel gives a process that execs `name`.
pub fn comm_of(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(name.bytes().take(15)) {
        *o = b;
    }
    out
}

/// The selection from `pids` and `exes` over the process table `procs`.
pub fn select(pids: &[u32], exes: &[String], procs: &[Proc]) -> Selection {
    let mut roots: Vec<u32> = pids.to_vec();
    for p in procs {
        let matches = exes
            .iter()
            .any(|e| glob_match(e, &p.exe) || glob_match(e, &p.comm));
        if matches && !roots.contains(&p.pid) {
            roots.push(p.pid);
        }
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen: HashSet<u32> = roots.iter().copied().collect();
    let mut descendants = Vec::new();
    let mut stack = roots.clone();
    while let Some(pid) = stack.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(c) {
                descendants.push(c);
                stack.push(c);
            }
        }
    }
    Selection {
        roots,
        descendants,
        exec_names: exes
            .iter()
            .filter(|e| !is_glob(e))
            .map(|e| comm_of(e))
            .collect(),
    }
}

/// Every process now, from /proc.
pub fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // comm may hold spaces and parentheses: it ends at the last ')'.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_string();
        let ppid = stat.get(close + 2..)?.split(' ').nth(1)?.parse().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Some(Proc {
            pid,
            ppid,
            exe,
            comm,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, exe: &str) -> Proc {
        Proc {
            pid,
            ppid,
            exe: exe.into(),
            comm: exe.chars().take(15).collect(),
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("python3*", "python3.11"));
        assert!(glob_match("nginx", "nginx"));
        assert!(!glob_match("nginx", "nginx-debug"));
        assert!(glob_match("php-fpm?.?", "php-fpm8.2"));
        assert!(glob_match("[jp]ava", "java") && !glob_match("[!j]ava", "java"));
        assert!(glob_match("node[0-9]*", "node20") && !glob_match("node[0-9]*", "nodejs"));
        assert!(glob_match("*", "") && !glob_match("?", ""));
    }

    #[test]
    fn a_master_brings_its_workers_and_theirs() {
        let procs = [
            p(1, 0, "systemd"),
            p(10, 1, "gunicorn"),
            p(11, 10, "python3.11"),
            p(12, 10, "python3.11"),
            p(13, 12, "sh"),
            p(20, 1, "nginx"),
            p(21, 20, "nginx"),
            p(30, 1, "redis-server"),
        ];
        let s = select(&[10], &[], &procs);
        assert_eq!(s.roots, vec![10]);
        let mut d = s.descendants.clone();
        d.sort();
        assert_eq!(d, vec![11, 12, 13]);
        let s = select(&[], &["nginx".into(), "redis*".into()], &procs);
        assert_eq!(s.roots, vec![20, 21, 30]);
        assert!(s.descendants.is_empty(), "21 is a root already");
        assert_eq!(s.exec_names, vec![comm_of("nginx")]);
        assert_eq!(
            &comm_of("a-very-long-executable-name")[..],
            b"a-very-long-exe\0"
        );
    }
}
