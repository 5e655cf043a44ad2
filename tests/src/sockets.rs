//! Sending and receiving with each syscall family, through libc, so the test knows exactly
//! which syscall moved the bytes.

use std::os::fd::RawFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// write / read
    ReadWrite,
    /// writev / readv
    Vectored,
    /// send / recv (sendto / recvfrom without an address on x86_64)
    SendRecv,
    /// sendto / recvfrom with address arguments
    SendToRecvFrom,
    /// sendmsg / recvmsg with several iovecs
    Msg,
    /// sendmmsg / recvmmsg with several messages
    Mmsg,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::ReadWrite,
        Family::Vectored,
        Family::SendRecv,
        Family::SendToRecvFrom,
        Family::Msg,
        Family::Mmsg,
    ];

    /// The syscall names the agent reports for (send side, receive side).
    pub fn syscalls(self) -> (&'static str, &'static str) {
        match self {
            Family::ReadWrite => ("write", "read"),
            Family::Vectored => ("writev", "readv"),
            Family::SendRecv | Family::SendToRecvFrom => ("sendto", "recvfrom"),
            Family::Msg => ("sendmsg", "recvmsg"),
            Family::Mmsg => ("sendmmsg", "recvmmsg"),
        }
    }
}

fn check(ret: isize, what: &str) -> usize {
    assert!(
        ret >= 0,
        "{what} failed: {}",
        std::io::Error::last_os_error()
    );
    ret as usize
}

/// sendmmsg/recvmmsg headers, one message per iovec (which must outlive them).
fn one_message_per_iovec(vs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    vs.iter_mut()
        .map(|v| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

fn iovecs(parts: &[&[u8]]) -> Vec<libc::iovec> {
    parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut _,
            iov_len: p.len(),
        })
        .collect()
}

/// One iovec per buffer, to receive into (the buffers must outlive them).
fn buffers(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// One recvmsg into the iovecs `v`; the bytes received.
///
/// # Safety
/// Every iovec must point to a live, writable buffer of its length.
unsafe fn recvmsg_into(fd: RawFd, v: &[libc::iovec]) -> usize {
    // SAFETY: msghdr is plain data; the caller vouches for the iovecs.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = v.as_ptr() as *mut _;
        msg.msg_iovlen = v.len();
        check(libc::recvmsg(fd, &mut msg, 0), "recvmsg")
    }
}

/// Sends `parts` with one call of `family` (split into 3 iovecs or messages where the family
/// takes several), retrying until all is sent.
pub fn send(fd: RawFd, family: Family, data: &[u8]) {
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        let third = rest.len().div_ceil(3);
        let parts: Vec<&[u8]> = rest.chunks(third.max(1)).collect();
        // SAFETY: all pointers reference live buffers for the duration of the call.
        let n = unsafe {
            match family {
                Family::ReadWrite => libc::write(fd, rest.as_ptr().cast(), rest.len()),
                Family::Vectored => {
                    let v = iovecs(&parts);
                    libc::writev(fd, v.as_ptr(), v.len() as i32)
                }
                Family::SendRecv => libc::send(fd, rest.as_ptr().cast(), rest.len(), 0),
                Family::SendToRecvFrom => {
                    libc::sendto(fd, rest.as_ptr().cast(), rest.len(), 0, std::ptr::null(), 0)
                }
                Family::Msg => {
                    let mut v = iovecs(&parts);
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = v.as_mut_ptr();
                    msg.msg_iovlen = v.len();
                    libc::sendmsg(fd, &msg, 0)
                }
                Family::Mmsg => {
                    let mut vs: Vec<libc::iovec> = iovecs(&parts);
                    let mut msgs = one_message_per_iovec(&mut vs);
                    let count = libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0);
                    let count = check(count as isize, "sendmmsg");
                    msgs[..count].iter().map(|m| m.msg_len as isize).sum()
                }
            }
        };
        sent += check(n, "send");
    }
}

/// Receives exactly `len` bytes with `family`, using 3 buffers/messages where it takes several.
pub fn recv(fd: RawFd, family: Family, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = len - out.len();
        let mut bufs = [
            vec![0u8; want.div_ceil(3)],
            vec![0u8; want.div_ceil(3)],
            vec![0u8; want.div_ceil(3)],
        ];
        let single = want;
        let mut one = vec![0u8; single];
        // SAFETY: all pointers reference live, large enough buffers for the duration of the call.
        let got: Vec<u8> = unsafe {
            match family {
                Family::ReadWrite => {
                    let n = check(libc::read(fd, one.as_mut_ptr().cast(), single), "read");
                    one[..n].to_vec()
                }
                Family::SendRecv => {
                    let n = check(libc::recv(fd, one.as_mut_ptr().cast(), single, 0), "recv");
                    one[..n].to_vec()
                }
                Family::SendToRecvFrom => {
                    let mut addr: libc::sockaddr_storage = std::mem::zeroed();
                    let mut alen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                    let n = libc::recvfrom(
                        fd,
                        one.as_mut_ptr().cast(),
                        single,
                        0,
                        (&raw mut addr).cast(),
                        &mut alen,
                    );
                    let n = check(n, "recvfrom");
                    one[..n].to_vec()
                }
                Family::Vectored | Family::Msg => {
                    // Bytes fill the iovecs in order: reassemble them the same way.
                    let v = buffers(&mut bufs);
                    let n = if family == Family::Vectored {
                        check(libc::readv(fd, v.as_ptr(), v.len() as i32), "readv")
                    } else {
                        recvmsg_into(fd, &v)
                    };
                    bufs.concat()[..n].to_vec()
                }
                Family::Mmsg => {
                    let mut vs = buffers(&mut bufs);
                    let mut msgs = one_message_per_iovec(&mut vs);
                    // MSG_WAITFORONE: block for the first message only, take what else is there.
                    let count = libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        msgs.len() as u32,
                        libc::MSG_WAITFORONE,
                        std::ptr::null_mut(),
                    );
                    let count = check(count as isize, "recvmmsg");
                    let mut got = Vec::new();
                    for (i, m) in msgs[..count].iter().enumerate() {
                        got.extend_from_slice(&bufs[i][..m.msg_len as usize]);
                    }
                    got
                }
            }
        };
        assert!(!got.is_empty(), "peer closed early");
        out.extend(got);
    }
    out
}

/// Sends `data` with writev, `slice` bytes per iovec (as many iovecs as that takes, up to the
/// kernel's 1024), retrying until all is sent.
pub fn writev_sliced(fd: RawFd, data: &[u8], slice: usize) {
    let mut sent = 0;
    while sent < data.len() {
        let parts: Vec<&[u8]> = data[sent..].chunks(slice).take(1024).collect();
        let v = iovecs(&parts);
        // SAFETY: the iovecs point into `data`, alive for the call.
        let n = unsafe { libc::writev(fd, v.as_ptr(), v.len() as i32) };
        sent += check(n, "writev");
    }
}

/// Receives exactly `len` bytes with recvmsg into iovecs of `slice` bytes each.
pub fn recvmsg_sliced(fd: RawFd, len: usize, slice: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = len - out.len();
        let mut bufs: Vec<Vec<u8>> = (0..want.div_ceil(slice).min(1024))
            .map(|_| vec![0u8; slice])
            .collect();
        let v = buffers(&mut bufs);
        // SAFETY: the iovecs point into `bufs`, alive for the call.
        let n = unsafe { recvmsg_into(fd, &v) };
        assert!(n > 0, "peer closed early");
        out.extend_from_slice(&bufs.concat()[..n.min(want)]);
    }
    out
}
