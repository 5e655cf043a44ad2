//! Just enough of the BTF format to find struct member offsets in the running kernel's
//! /sys/kernel/btf/vmlinux. aya applies no CO-RE relocations to Rust programs, so the agent
//! resolves the few fields the programs read and hands them over as a global.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>. Pure: parses a byte slice.

use agent_common::config::KernelOffsets;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data is truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} at type {id}")]
    UnknownKind { id: u32, kind: u32 },
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("struct `{strukt}` has no member `{member}` in this kernel's BTF")]
    NoMember { strukt: String, member: String },
    #[error("member `{0}` is not a struct or union")]
    NotComposite(String),
    #[error("offset of `{0}` does not fit the programs' 16-bit offset fields")]
    TooLarge(String),
}

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite {
        name_off: u32,
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type_tag: transparent for member lookups.
    Alias(u32),
    Other,
}

pub struct Btf {
    /// Index 0 is the implicit `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or(BtfError::Truncated(self.pos))?;
        self.pos += 4;
        Ok(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        if self.pos + n > self.data.len() {
            return Err(BtfError::Truncated(self.pos));
        }
        self.pos += n;
        Ok(())
    }
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::BadHeader);
        }
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (u32_at(4), u32_at(8), u32_at(12), u32_at(16), u32_at(20))
        else {
            return Err(BtfError::BadHeader);
        };
        let (hdr_len, type_off, type_len, str_off, str_len) = (
            hdr_len as usize,
            type_off as usize,
            type_len as usize,
            str_off as usize,
            str_len as usize,
        );
        let types_start = hdr_len + type_off;
        let type_data = data
            .get(types_start..types_start + type_len)
            .ok_or(BtfError::Truncated(types_start))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Truncated(hdr_len + str_off))?
            .to_vec();

        let mut types = vec![Type::Other];
        let mut cur = Cursor {
            data: type_data,
            pos: 0,
        };
        while cur.pos < type_data.len() {
            let id = types.len() as u32;
            let name_off = cur.u32()?;
            let info = cur.u32()?;
            let size_or_type = cur.u32()?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let name_off = cur.u32()?;
                        let type_id = cur.u32()?;
                        let offset = cur.u32()?;
                        let bit_offset = if kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        };
                        members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                        });
                    }
                    Type::Composite { name_off, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    cur.skip(4)?;
                    Type::Other
                }
                KIND_ARRAY => {
                    cur.skip(12)?;
                    Type::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    cur.skip(8 * vlen)?;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    cur.skip(12 * vlen)?;
                    Type::Other
                }
                2 | 7 | 12 | 16 => Type::Other, // ptr, fwd, func, float: no trailing data
                _ => return Err(BtfError::UnknownKind { id, kind }),
            };
            types.push(ty);
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        // Bounded: alias chains in real BTF are a few links long; a cycle must not hang us.
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias(target) => id = *target,
                other => return Some(other),
            }
        }
        None
    }

    fn find_struct(&self, name: &str) -> Option<&[Member]> {
        self.types.iter().find_map(|t| match t {
            Type::Composite { name_off, members } if self.name(*name_off) == name => {
                Some(members.as_slice())
            }
            _ => None,
        })
    }

    /// Bit offset and type of `name` among `members`, looking inside anonymous struct/union
    /// members (the kernel nests e.g. `skc_daddr` in an anonymous union of an anonymous struct).
    fn find_member(&self, members: &[Member], name: &str, depth: u32) -> Option<(u32, u32)> {
        for m in members {
            if self.name(m.name_off) == name {
                return Some((m.bit_offset, m.type_id));
            }
        }
        if depth == 0 {
            return None;
        }
        for m in members.iter().filter(|m| m.name_off == 0) {
            if let Some(Type::Composite { members: inner, .. }) = self.resolve(m.type_id)
                && let Some((off, ty)) = self.find_member(inner, name, depth - 1)
            {
                return Some((m.bit_offset + off, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (member, member of that member, ...) from the start of `strukt`.
    pub fn offset_of(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut members = self
            .find_struct(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let mut bits = 0;
        for (i, name) in path.iter().enumerate() {
            let (off, ty) =
                self.find_member(members, name, 4)
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: strukt.to_string(),
                        member: path[..=i].join("."),
                    })?;
            bits += off;
            if i + 1 < path.len() {
                match self.resolve(ty) {
                    Some(Type::Composite { members: inner, .. }) => members = inner,
                    _ => return Err(BtfError::NotComposite(name.to_string())),
                }
            }
        }
        Ok(bits / 8)
    }

    /// The offsets `agent_common::config::KernelOffsets` names.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let sock_common = |member: &str| self.small_offset("sock_common", &[member]);
        // The programs treat a `struct sock *` as a `struct sock_common *`.
        let common_in_sock = self.offset_of("sock", &["__sk_common"])?;
        if common_in_sock != 0 {
            return Err(BtfError::NoMember {
                strukt: "sock".into(),
                member: "__sk_common at offset 0".into(),
            });
        }
        Ok(KernelOffsets {
            skc_daddr: sock_common("skc_daddr")?,
            skc_rcv_saddr: sock_common("skc_rcv_saddr")?,
            skc_dport: sock_common("skc_dport")?,
            skc_num: sock_common("skc_num")?,
            skc_family: sock_common("skc_family")?,
            skc_v6_daddr: sock_common("skc_v6_daddr")?,
            skc_v6_rcv_saddr: sock_common("skc_v6_rcv_saddr")?,
            skc_net: sock_common("skc_net")?,
            skc_state: sock_common("skc_state")?,
            net_ns_inum: self.small_offset("net", &["ns", "inum"])?,
            // A socket met first on I/O is captured only if it is TCP (both capture paths).
            sk_protocol: self.small_offset("sock", &["sk_protocol"])?,
            task_pid: self.small_offset("task_struct", &["pid"])?,
            ..KernelOffsets::default()
        })
    }

    /// Adds the offsets of the syscall capture path's walk from a file descriptor to its socket.
    pub fn add_fd_offsets(&self, off: &mut KernelOffsets) -> Result<(), BtfError> {
        off.task_files = self.small_offset("task_struct", &["files"])?;
        off.files_fdt = self.small_offset("files_struct", &["fdt"])?;
        off.fdt_max_fds = self.small_offset("fdtable", &["max_fds"])?;
        off.fdt_fd = self.small_offset("fdtable", &["fd"])?;
        off.file_inode = self.small_offset("file", &["f_inode"])?;
        off.file_private_data = self.small_offset("file", &["private_data"])?;
        off.inode_mode = self.small_offset("inode", &["i_mode"])?;
        off.socket_sk = self.small_offset("socket", &["sk"])?;
        Ok(())
    }

    /// Whether any type or member of this kernel is called `name`. An enumerator of
    /// `enum bpf_func_id` (`BPF_FUNC_task_pt_regs`) names a helper the kernel has.
    pub fn has_name(&self, name: &str) -> bool {
        let needle = [b"\0", name.as_bytes(), b"\0"].concat();
        self.strings.windows(needle.len()).any(|w| w == needle)
    }

    fn small_offset(&self, strukt: &str, path: &[&str]) -> Result<u16, BtfError> {
        let off = self.offset_of(strukt, path)?;
        u16::try_from(off).map_err(|_| BtfError::TooLarge(path.join(".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct outer { int a; union { struct { int x; int y; }; long z; }; struct inner in; }`
    /// and `struct inner { int p; int q; }`, with a typedef in front of `inner`.
    fn fixture() -> Vec<u8> {
        let strings = b"\0outer\0a\0x\0y\0z\0in\0inner\0p\0q\0int\0inner_t\0";
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap()
        };
        let mut t: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32, kflag: bool| (kind << 24) | vlen | ((kflag as u32) << 31);
        // 1: int
        t.extend([s("int"), info(KIND_INT, 0, false), 4, 0x0100_0020]);
        // 2: anonymous struct { int x; int y; }
        t.extend([0, info(KIND_STRUCT, 2, false), 8]);
        t.extend([s("x"), 1, 0, s("y"), 1, 32]);
        // 3: anonymous union { struct (2); long z; } with kind_flag bitfield encoding
        t.extend([0, info(KIND_UNION, 2, true), 8]);
        t.extend([0, 2, 0, s("z"), 1, 0]);
        // 4: struct inner { int p; int q; }
        t.extend([s("inner"), info(KIND_STRUCT, 2, false), 8]);
        t.extend([s("p"), 1, 0, s("q"), 1, 32]);
        // 5: typedef inner_t -> 4
        t.extend([s("inner_t"), info(KIND_TYPEDEF, 0, false), 4]);
        // 6: const -> 5
        t.extend([0, info(KIND_CONST, 0, false), 5]);
        // 7: struct outer { int a; union(3) at 64; const inner_t in at 128 }
        t.extend([s("outer"), info(KIND_STRUCT, 3, false), 24]);
        t.extend([s("a"), 1, 0, 0, 3, 64, s("in"), 6, 128]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_ne_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_ne_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_direct_nested_and_anonymous_members() {
        let btf = Btf::parse(&fixture()).unwrap();
        assert_eq!(btf.offset_of("outer", &["a"]), Ok(0));
        assert_eq!(btf.offset_of("outer", &["x"]), Ok(8));
        assert_eq!(btf.offset_of("outer", &["y"]), Ok(12));
        assert_eq!(btf.offset_of("outer", &["z"]), Ok(8));
        assert_eq!(btf.offset_of("outer", &["in", "q"]), Ok(20));
    }

    #[test]
    fn missing_names_are_errors_that_say_what() {
        let btf = Btf::parse(&fixture()).unwrap();
        assert_eq!(
            btf.offset_of("nope", &["a"]),
            Err(BtfError::NoStruct("nope".into()))
        );
        assert_eq!(
            btf.offset_of("outer", &["in", "zz"]),
            Err(BtfError::NoMember {
                strukt: "outer".into(),
                member: "in.zz".into()
            })
        );
        assert_eq!(
            btf.offset_of("outer", &["a", "b"]),
            Err(BtfError::NotComposite("a".into()))
        );
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let data = fixture();
        for len in 0..data.len() {
            let _ = Btf::parse(&data[..len]);
        }
        assert_eq!(Btf::parse(b"garbage").err(), Some(BtfError::BadHeader));
    }
}
