//! Syscall families and the argument shapes the programs know how to read.

pub const SYS_NONE: u8 = 0;
pub const SYS_READ: u8 = 1;
pub const SYS_WRITE: u8 = 2;
pub const SYS_READV: u8 = 3;
pub const SYS_WRITEV: u8 = 4;
pub const SYS_RECVFROM: u8 = 5;
pub const SYS_SENDTO: u8 = 6;
pub const SYS_RECVMSG: u8 = 7;
pub const SYS_SENDMSG: u8 = 8;
pub const SYS_RECVMMSG: u8 = 9;
pub const SYS_SENDMMSG: u8 = 10;

pub const fn name(sys: u8) -> &'static str {
    match sys {
        SYS_READ => "read",
        SYS_WRITE => "write",
        SYS_READV => "readv",
        SYS_WRITEV => "writev",
        SYS_RECVFROM => "recvfrom",
        SYS_SENDTO => "sendto",
        SYS_RECVMSG => "recvmsg",
        SYS_SENDMSG => "sendmsg",
        SYS_RECVMMSG => "recvmmsg",
        SYS_SENDMMSG => "sendmmsg",
        SYS_SENDFILE => "sendfile",
        _ => "none",
    }
}

/// How the user buffer is described.
pub const SHAPE_BUF: u8 = 1;
pub const SHAPE_IOV: u8 = 2;
pub const SHAPE_MSG: u8 = 3;
pub const SHAPE_MMSG: u8 = 4;

/// No user buffer: sendfile, whose bytes come from a file (the stream's offsets still move).
pub const SHAPE_NONE: u8 = 0;

pub const SYS_SENDFILE: u8 = 11;

/// Arguments of a socket syscall in flight on one thread, saved at sys_enter and consumed by the
/// sock tracepoints that fire inside the syscall, or on the syscall capture path by its
/// sys_exit program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ActiveCall {
    /// buf, iovec array, msghdr or mmsghdr array (user pointer).
    pub ptr: u64,
    /// count, iovcnt or vlen.
    pub len: u64,
    pub syscall: u8,
    pub shape: u8,
    pub _pad: [u8; 2],
    /// Messages already consumed by sock tracepoints (sendmmsg/recvmmsg fire once per message).
    pub msg_index: u32,
    /// The file descriptor (the syscall capture path resolves it to its socket at exit).
    pub fd: u32,
    /// recv flags (MSG_PEEK: the bytes will be read again).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ActiveCall>() == 32);

/// Layout of `struct user_msghdr` / `struct mmsghdr` on 64-bit kernels.
pub const MSGHDR_IOV_OFFSET: u64 = 16;
pub const MSGHDR_IOVLEN_OFFSET: u64 = 24;
pub const MMSGHDR_SIZE: u64 = 64;
/// `mmsghdr.msg_len`: bytes the kernel moved for that message.
pub const MMSGHDR_LEN_OFFSET: u64 = 56;
