//! What an ELF file offers the TLS probes: OpenSSL's entry points (libssl, or an executable that
//! links OpenSSL in and exports them, as node does), or Go's crypto/tls with the offsets of its
//! read's RET instructions. Offsets are file offsets, what a uprobe is attached at.

use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol};

/// File offsets of the OpenSSL functions present.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenSsl {
    pub write: Option<u64>,
    pub write_ex: Option<u64>,
    pub read: Option<u64>,
    pub read_ex: Option<u64>,
    /// The function SSL_read and SSL_read_ex both call first, `(ssl, buf, num, size_t
    /// *readbytes) -> int` (OpenSSL's ssl_read_internal), when the kernel emulates its first
    /// instruction: probed instead of both wrappers (`inner_site`).
    pub read_inner: Option<u64>,
    /// The same for SSL_write and SSL_write_ex (ssl_write_internal).
    pub write_inner: Option<u64>,
}

/// A Go program (register ABI), with what of it the probes use.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GoProgram {
    /// `go1.19.8`, from the build info.
    pub version: String,
    pub tls: Option<GoTls>,
    pub http: Option<GoHttp>,
}

/// crypto/tls.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GoTls {
    pub write: u64,
    pub read: u64,
    /// `(*Conn).handshakeContext`, where the session meets its socket first (absent before 1.17).
    pub handshake: Option<u64>,
    /// Every RET of `(*Conn).Read`.
    pub read_returns: Vec<u64>,
}

/// net/http's client handoff to the connection's writer goroutine (programs/go_http.rs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GoHttp {
    pub round_trip: u64,
    pub request_write: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    OpenSsl(OpenSsl),
    Go(GoProgram),
    /// A Go program too old for the register ABI the probes read (before 1.17).
    GoUnsupported(String),
    None,
}

pub const GO_WRITE: &str = "crypto/tls.(*Conn).Write";
pub const GO_READ: &str = "crypto/tls.(*Conn).Read";
pub const GO_HANDSHAKE: &str = "crypto/tls.(*Conn).handshakeContext";
pub const GO_ROUND_TRIP: &str = "net/http.(*persistConn).roundTrip";
pub const GO_REQUEST_WRITE: &str = "net/http.(*Request).write";

/// Reads and examines a file. Large executables (node is ~100 MB) are read once per inode.
pub fn examine(path: &Path) -> anyhow::Result<Target> {
    examine_file(&std::fs::File::open(path)?)
}

pub fn examine_file(file: &std::fs::File) -> anyhow::Result<Target> {
    // SAFETY: a read-only private mapping; a file truncated meanwhile faults only this
    // examination's reads of it, which the agent accepts for the libraries it probes (the
    // kernel itself maps them the same way into the traced processes).
    let data = unsafe { memmap2::Mmap::map(file)? };
    examine_bytes(&data)
}

pub fn examine_bytes(data: &[u8]) -> anyhow::Result<Target> {
    let file = object::File::parse(data)?;
    if let Some(version) = go_version(&file) {
        return go(&file, data, version);
    }
    let mut found = OpenSsl::default();
    // Exported (dynamic) symbols first, then the static symbol table: an executable that links
    // OpenSSL in without exporting it (cargo does) still names its functions there. BoringSSL
    // keeps OpenSSL's names and signatures for these four, so it is probed the same way.
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        let slot = match sym.name() {
            Ok("SSL_write") => &mut found.write,
            Ok("SSL_write_ex") => &mut found.write_ex,
            Ok("SSL_read") => &mut found.read,
            Ok("SSL_read_ex") => &mut found.read_ex,
            _ => continue,
        };
        if slot.is_none() {
            *slot = file_offset(&file, sym.address());
        }
    }
    if found.write.is_some() && found.read.is_some() {
        if file.architecture() == object::Architecture::X86_64 {
            let inner = |a: Option<u64>, b: Option<u64>| inner_site(&file, data, a?, b?);
            found.read_inner = inner(found.read, found.read_ex);
            found.write_inner = inner(found.write, found.write_ex);
        }
        Ok(Target::OpenSsl(found))
    } else {
        Ok(Target::None)
    }
}

fn go(file: &object::File<'_>, data: &[u8], version: String) -> anyhow::Result<Target> {
    if !register_abi(&version) {
        return Ok(Target::GoUnsupported(version));
    }
    let mut found: std::collections::HashMap<&str, (u64, u64)> = Default::default();
    for sym in file.symbols() {
        if let Ok(name @ (GO_WRITE | GO_READ | GO_HANDSHAKE | GO_ROUND_TRIP | GO_REQUEST_WRITE)) =
            sym.name()
        {
            found.insert(name, (sym.address(), sym.size()));
        }
    }
    let offset = |name: &str| found.get(name).and_then(|&(a, _)| file_offset(file, a));
    let http = match (offset(GO_ROUND_TRIP), offset(GO_REQUEST_WRITE)) {
        (Some(round_trip), Some(request_write)) => Some(GoHttp {
            round_trip,
            request_write,
        }),
        _ => None,
    };
    let tls = match (offset(GO_WRITE), offset(GO_READ), found.get(GO_READ)) {
        (Some(write), Some(read), Some(&(_, size))) => {
            let body = data
                .get(read as usize..(read + size) as usize)
                .ok_or_else(|| anyhow::anyhow!("{GO_READ} extends past the end of the file"))?;
            let read_returns: Vec<u64> = return_offsets(file.architecture(), body)?
                .into_iter()
                .map(|o| read + o)
                .collect();
            if read_returns.is_empty() {
                anyhow::bail!("no RET instruction found in {GO_READ}");
            }
            Some(GoTls {
                write,
                read,
                handshake: offset(GO_HANDSHAKE),
                read_returns,
            })
        }
        _ => None,
    };
    // A Go program without them (or stripped of its symbols) is still a Go program: the agent
    // keys its events by goroutine.
    Ok(Target::Go(GoProgram { version, tls, http }))
}

/// Offsets (from the function start) of every return instruction, by disassembling the body.
fn return_offsets(arch: object::Architecture, body: &[u8]) -> anyhow::Result<Vec<u64>> {
    match arch {
        object::Architecture::X86_64 => {
            use iced_x86::{Decoder, DecoderOptions, Mnemonic};
            let mut decoder = Decoder::with_ip(64, body, 0, DecoderOptions::NONE);
            let mut out = Vec::new();
            for insn in &mut decoder {
                if insn.mnemonic() == Mnemonic::Ret {
                    out.push(insn.ip());
                }
            }
            Ok(out)
        }
        // Fixed-width instructions: RET is 0xd65f03c0 (ret x30).
        object::Architecture::Aarch64 => Ok(body
            .chunks_exact(4)
            .enumerate()
            .filter(|(_, w)| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == 0xd65f_03c0)
            .map(|(i, _)| i as u64 * 4)
            .collect()),
        other => anyhow::bail!("no return-probe support for {other:?} Go programs"),
    }
}

/// Where to probe instead of two wrappers (file offsets `a` and `b`, e.g. SSL_read and
/// SSL_read_ex): the function both call first, with the session and buffer still in the first
/// two argument registers, if the kernel emulates the instruction the probe replaces there.
/// A uprobe on any other instruction is single-stepped out of line: a second trap, which under
/// virtualisation costs tens of microseconds (an HTTPS nginx on a 2-core VM served 13.6k req/s
/// with SSL_read and SSL_write probed at entry, where `sub rsp` is single-stepped, and 96-108k
/// with the same probes on the functions they wrap, which start with a push, against 110k
/// unprobed). x86-64 only; None keeps the wrappers' probes.
fn inner_site(file: &object::File<'_>, data: &[u8], a: u64, b: u64) -> Option<u64> {
    let code = |offset: u64| {
        let code = data.get(offset as usize..)?;
        Some((&code[..code.len().min(128)], file_address(file, offset)?))
    };
    let (code_a, address_a) = code(a)?;
    let (code_b, address_b) = code(b)?;
    let target = wrapped_call(code_a, address_a, code_b, address_b)?;
    let target = file_offset(file, target)?;
    let skip = emulated_entry(data.get(target as usize..)?)?;
    Some(target + skip)
}

/// The function two wrappers such as SSL_read and SSL_read_ex both call first with their own
/// session and buffer, the first passing the address of a local as the fourth argument (where
/// SSL_read's `&readbytes` goes) and the second its own fourth argument untouched: the shape
/// of `ssl_read_internal(s, buf, num, &readbytes)`, whose result and `*readbytes` mean what
/// SSL_read_ex's do. Anything else (another library's wrapper calling a helper first, say)
/// is None.
fn wrapped_call(code_a: &[u8], address_a: u64, code_b: &[u8], address_b: u64) -> Option<u64> {
    let (target_a, fourth_a) = first_call(code_a, address_a)?;
    let (target_b, fourth_b) = first_call(code_b, address_b)?;
    (target_a == target_b && fourth_a == Fourth::LocalAddress && fourth_b == Fourth::Untouched)
        .then_some(target_a)
}

/// What a wrapper put in the fourth argument register (rcx) before its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fourth {
    Untouched,
    /// `mov rcx, rsp` or `lea rcx, [rsp + d]`.
    LocalAddress,
    Other,
}

/// The target address of the first direct call on the fall-through path from a function's
/// start (at `address`), with what rcx holds then, if nothing before it writes the first two
/// argument registers (rdi, rsi).
fn first_call(code: &[u8], address: u64) -> Option<(u64, Fourth)> {
    use iced_x86::{
        Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
        Register,
    };
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut fourth = Fourth::Untouched;
    for insn in decoder.iter().take(32) {
        if insn.is_invalid() {
            return None;
        }
        let mut writes_args = false;
        for r in info.info(&insn).used_registers() {
            if matches!(r.access(), OpAccess::Read | OpAccess::CondRead) {
                continue;
            }
            match r.register().full_register() {
                Register::RDI | Register::RSI => writes_args = true,
                Register::RCX => {
                    let local = (insn.mnemonic() == Mnemonic::Mov
                        && insn.op1_kind() == OpKind::Register
                        && insn.op1_register() == Register::RSP)
                        || (insn.mnemonic() == Mnemonic::Lea
                            && insn.memory_base() == Register::RSP
                            && insn.memory_index() == Register::None);
                    fourth = if local && insn.op0_register() == Register::RCX {
                        Fourth::LocalAddress
                    } else {
                        Fourth::Other
                    };
                }
                _ => {}
            }
        }
        match insn.flow_control() {
            FlowControl::Call if insn.op0_kind() == OpKind::NearBranch64 => {
                return Some((insn.near_branch_target(), fourth));
            }
            FlowControl::Next | FlowControl::ConditionalBranch if !writes_args => {}
            _ => return None,
        }
    }
    None
}

/// How far into a function the probe goes (past a leading endbr64, which the stack pointer
/// does not see, so a return probe still finds the return address), if the kernel's x86
/// uprobes emulate the instruction there instead of single-stepping it: a register push, a
/// direct call or jump, a conditional jump, a one-byte nop.
fn emulated_entry(code: &[u8]) -> Option<u64> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
    let mut decoder = Decoder::with_ip(64, &code[..code.len().min(32)], 0, DecoderOptions::NONE);
    let mut insn = decoder.decode();
    if insn.mnemonic() == Mnemonic::Endbr64 {
        insn = decoder.decode();
    }
    let emulated = match insn.mnemonic() {
        // Not `push fs`/`push gs`: only general-purpose registers are emulated.
        Mnemonic::Push => insn.op0_kind() == OpKind::Register && insn.op0_register().is_gpr64(),
        Mnemonic::Nop => insn.len() == 1,
        _ => {
            matches!(
                insn.flow_control(),
                FlowControl::Call
                    | FlowControl::UnconditionalBranch
                    | FlowControl::ConditionalBranch
            ) && matches!(
                insn.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        }
    };
    (!insn.is_invalid() && emulated).then_some(insn.ip())
}

/// A file offset as a virtual address, through the section that holds it.
fn file_address(file: &object::File<'_>, offset: u64) -> Option<u64> {
    file.sections().find_map(|s| {
        let (off, size) = s.file_range()?;
        (offset >= off && offset < off + size).then(|| offset - off + s.address())
    })
}

/// A virtual address as a file offset, through the section that holds it.
fn file_offset(file: &object::File<'_>, addr: u64) -> Option<u64> {
    file.sections().find_map(|s| {
        let (start, size) = (s.address(), s.size());
        let (off, _) = s.file_range()?;
        (addr >= start && addr < start + size).then(|| addr - start + off)
    })
}

/// The Go version from `.go.buildinfo` (Go 1.18+ stores it inline after a 32-byte header; 1.13-1.17
/// through pointers, which this does not follow: those report "go?").
fn go_version(file: &object::File<'_>) -> Option<String> {
    let section = file.section_by_name(".go.buildinfo")?;
    let data = section.data().ok()?;
    if !data.starts_with(b"\xff Go buildinf:") {
        return None;
    }
    let inline = data.get(15).is_some_and(|flags| flags & 2 != 0);
    if !inline {
        return Some("go?".to_string());
    }
    let rest = data.get(32..)?;
    let (len, used) = uvarint(rest)?;
    let v = rest.get(used..used + len as usize)?;
    Some(String::from_utf8_lossy(v).into_owned())
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        x |= ((byte & 0x7f) as u64) << (7 * i);
        if byte < 0x80 {
            return Some((x, i + 1));
        }
    }
    None
}

/// Go 1.17 introduced the register ABI on amd64 (1.18 on arm64).
fn register_abi(version: &str) -> bool {
    let Some(rest) = version.strip_prefix("go1.") else {
        return false;
    };
    let minor: u32 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    minor >= 18 || (minor == 17 && cfg!(target_arch = "x86_64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_versions_with_the_register_abi() {
        assert!(register_abi("go1.19.8"));
        assert!(register_abi("go1.22rc1"));
        assert!(!register_abi("go1.16.15"));
        assert!(!register_abi("go?"));
        assert!(!register_abi("devel"));
    }

    #[test]
    fn returns_are_found_between_other_instructions() {
        // mov rax, rbx; ret; nop; add rsp, 0x10; pop rbp; ret
        let body = [
            0x48, 0x89, 0xd8, 0xc3, 0x90, 0x48, 0x83, 0xc4, 0x10, 0x5d, 0xc3,
        ];
        let r = return_offsets(object::Architecture::X86_64, &body).unwrap();
        assert_eq!(r, [3, 10]);
        // A 0xc3 byte inside an instruction is not a return: mov eax, 0xc3
        let body = [0xb8, 0xc3, 0x00, 0x00, 0x00, 0xc3];
        assert_eq!(
            return_offsets(object::Architecture::X86_64, &body).unwrap(),
            [5]
        );
    }

    #[test]
    fn the_system_libssl_offers_the_openssl_entry_points() {
        let path = [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/usr/lib/aarch64-linux-gnu/libssl.so.3",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("Debian's libssl3, which curl and python3 need, is on every test machine");
        match examine(path).unwrap() {
            Target::OpenSsl(o) => {
                assert!(o.write.is_some() && o.read.is_some() && o.read_ex.is_some());
                // Debian's OpenSSL 3 wraps ssl_read_internal and ssl_write_internal, which start
                // with a push: the probes go there.
                if cfg!(target_arch = "x86_64") {
                    let (r, w) = (o.read_inner.unwrap(), o.write_inner.unwrap());
                    assert!(![o.read, o.read_ex, o.write, o.write_ex].contains(&Some(r)));
                    assert!(![o.read, o.read_ex, o.write, o.write_ex].contains(&Some(w)));
                    assert_ne!(r, w);
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_instructions_the_kernel_emulates_take_a_probe() {
        // push r13 / endbr64; push rbp / call rel32 / jne rel32 / nop
        assert_eq!(emulated_entry(&[0x41, 0x55]), Some(0));
        assert_eq!(emulated_entry(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55]), Some(4));
        assert_eq!(emulated_entry(&[0xe8, 1, 0, 0, 0]), Some(0));
        assert_eq!(emulated_entry(&[0x0f, 0x85, 1, 0, 0, 0]), Some(0));
        assert_eq!(emulated_entry(&[0x90]), Some(0));
        // sub rsp, 0x18 (SSL_read's first instruction) / endbr64; sub rsp / mov rax, rdi / ret
        assert_eq!(emulated_entry(&[0x48, 0x83, 0xec, 0x18]), None);
        assert_eq!(
            emulated_entry(&[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x18]),
            None
        );
        assert_eq!(emulated_entry(&[0x48, 0x89, 0xf8]), None);
        // push fs
        assert_eq!(emulated_entry(&[0x0f, 0xa0]), None);
        assert_eq!(emulated_entry(&[0xc3]), None);
        assert_eq!(emulated_entry(&[]), None);
    }

    // Debian's libssl3 (OpenSSL 3.0), at their addresses: SSL_read and SSL_read_ex.
    const SSL_READ: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, // sub rsp, 0x18
        0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0, // mov rax, fs:0x28
        0x48, 0x89, 0x44, 0x24, 0x08, // mov [rsp+8], rax
        0x31, 0xc0, // xor eax, eax
        0x85, 0xd2, // test edx, edx
        0x78, 0x2f, // js error
        0x48, 0x89, 0xe1, // mov rcx, rsp
        0x48, 0x63, 0xd2, // movsxd rdx, edx
        0xe8, 0x3d, 0xfe, 0xff, 0xff, // call 0x35290
    ];
    const SSL_READ_EX: &[u8] = &[
        0x48, 0x83, 0xec, 0x08, // sub rsp, 8
        0xe8, 0xc7, 0xfd, 0xff, 0xff, // call 0x35290
    ];

    #[test]
    fn the_function_both_read_wrappers_call_is_found_by_its_shape() {
        assert_eq!(
            wrapped_call(SSL_READ, 0x35430, SSL_READ_EX, 0x354c0),
            Some(0x35290)
        );
        // The other way round: SSL_read_ex passes its own fourth argument, SSL_read a local's
        // address.
        assert_eq!(wrapped_call(SSL_READ_EX, 0x354c0, SSL_READ, 0x35430), None);
        // Calls to different functions.
        assert_eq!(wrapped_call(SSL_READ, 0x35430, SSL_READ_EX, 0x354c4), None);
        // The buffer register written before the call (mov rsi, rdx): not the same arguments.
        let mut moved = vec![0x48, 0x89, 0xd6];
        moved.extend_from_slice(SSL_READ_EX);
        assert_eq!(wrapped_call(SSL_READ, 0x35430, &moved, 0x354bd), None);
        // A return before any call, and truncated code.
        assert_eq!(first_call(&[0xc3], 0), None);
        assert_eq!(first_call(&SSL_READ[..20], 0x35430), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        assert!(examine_bytes(b"\x7fELF\x02\x01\x01garbage").is_err());
        assert!(examine_bytes(&[]).is_err());
    }
}
