//! Where TLS libraries live on this host: the files each process maps (`/proc/PID/maps`) and
//! runs (`/proc/PID/exe`), named by device and inode so that one file shared by a thousand
//! processes (the system libssl) is examined and probed once. Paths are opened through
//! `/proc/PID/root`, so a container's own libssl is found in the container's filesystem.

use std::path::PathBuf;

/// One file, as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A file a process maps or runs that may hold a TLS library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: FileId,
    /// Openable from the agent: `/proc/PID/root/...` or `/proc/PID/exe`.
    pub open_path: PathBuf,
    /// As the process sees it, for logs.
    pub shown_path: String,
}

/// What one look at a process finds.
#[derive(Default)]
pub struct Found {
    /// Files worth examining: its executable, and each mapped `libssl.so*`.
    pub candidates: Vec<Candidate>,
    /// It runs a JVM (`libjvm.so` mapped): a thread-pool runtime whose futex wakes are followed.
    pub jvm: bool,
}

pub fn candidates(pid: u32) -> Found {
    let mut found = Found::default();
    let out = &mut found.candidates;
    if let Some(exe) = exe(pid) {
        out.push(exe);
    }
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return found;
    };
    for m in parse_maps(&maps) {
        if basename(m.path).starts_with("libjvm.so") {
            found.jvm = true;
        }
        if is_libssl(m.path) && !out.iter().any(|c| c.id == m.id) {
            out.push(Candidate {
                id: m.id,
                open_path: PathBuf::from(format!("/proc/{pid}/root{}", m.path)),
                shown_path: m.path.to_string(),
            });
        }
    }
    found
}

fn exe(pid: u32) -> Option<Candidate> {
    use std::os::unix::fs::MetadataExt;
    let open_path = PathBuf::from(format!("/proc/{pid}/exe"));
    // Kernel threads have no executable.
    let meta = std::fs::metadata(&open_path).ok()?;
    let shown_path = std::fs::read_link(&open_path)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Some(Candidate {
        id: FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        open_path,
        shown_path,
    })
}

pub struct Mapping<'a> {
    pub id: FileId,
    pub path: &'a str,
}

/// File-backed lines of a maps file: `start-end perms offset major:minor inode path`.
pub fn parse_maps(maps: &str) -> impl Iterator<Item = Mapping<'_>> {
    maps.lines().filter_map(|line| {
        let mut f = line.split_whitespace();
        let (_range, _perms, _off, dev, ino) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let path = f.next()?;
        if !path.starts_with('/') {
            return None;
        }
        let ino: u64 = ino.parse().ok().filter(|&i| i != 0)?;
        let (major, minor) = dev.split_once(':')?;
        let (major, minor) = (
            u64::from_str_radix(major, 16).ok()?,
            u64::from_str_radix(minor, 16).ok()?,
        );
        Some(Mapping {
            id: FileId {
                dev: libc::makedev(major as u32, minor as u32),
                ino,
            },
            path,
        })
    })
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// OpenSSL's libssl (1.1, 3, and copies bundled by Python wheels: `libssl-1b2c3d.so.3`).
/// NSS ships a `libssl3.so` that is not OpenSSL.
fn is_libssl(path: &str) -> bool {
    let name = basename(path);
    name.starts_with("libssl") && name.contains(".so") && !name.starts_with("libssl3.so")
}

/// The TLS implementation a process most likely uses, for `loupe_tls_unhooked_total`: read
/// once per connection found unhooked, from what it maps and runs.
pub fn library_of(pid: u32) -> &'static str {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let names: Vec<&str> = parse_maps(&maps).map(|m| basename(m.path)).collect();
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| basename(&p.display().to_string()).to_string())
        .unwrap_or_default();
    if has("libjvm.so") || exe == "java" {
        "java"
    } else if has("libgnutls") {
        "gnutls"
    } else if has("libnss3") || has("libssl3.so") {
        "nss"
    } else if names.iter().any(|n| is_libssl(n)) {
        // Hooked, but this connection's calls were never tied to it (another thread did the
        // socket I/O, or the connection predates the probes and has been idle).
        "openssl"
    } else if is_go(pid) {
        "go"
    } else {
        "unknown"
    }
}

fn is_go(pid: u32) -> bool {
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/exe")) else {
        return false;
    };
    // SAFETY: a read-only private mapping of an executable; only its section headers are read
    // (a file truncated under us would fault, as for the TLS probes' own mapping in elf.rs).
    let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return false;
    };
    object::File::parse(&*data).is_ok_and(|f| {
        use object::Object;
        f.section_by_name(".go.buildinfo").is_some()
    })
}

/// Every process id now, from /proc.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_file_ids_and_paths() {
        let maps = "\
7f1c2a000000-7f1c2a020000 r--p 00000000 fd:01 1835122                    /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a020000-7f1c2a021000 rw-p 00000000 00:00 0 
7ffd5a1d2000-7ffd5a1f3000 rw-p 00000000 00:00 0                          [stack]
7f1c2b000000-7f1c2b001000 r--p 00000000 08:02 42                         /opt/app/lib/libssl-6e1f2a3b.so.3 (deleted)
";
        let m: Vec<_> = parse_maps(maps).collect();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].path, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        assert_eq!(m[0].id.ino, 1835122);
        assert_eq!(m[0].id.dev, libc::makedev(0xfd, 1));
        assert!(is_libssl(m[0].path) && is_libssl(m[1].path));
        assert!(!is_libssl("/usr/lib/x86_64-linux-gnu/libssl3.so"));
        assert!(!is_libssl("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"));
    }

    #[test]
    fn this_process_is_found_with_its_executable() {
        let found = candidates(std::process::id());
        let c = &found.candidates;
        assert!(!c.is_empty());
        assert!(c[0].open_path.ends_with("exe"));
        assert!(!found.jvm);
    }
}
