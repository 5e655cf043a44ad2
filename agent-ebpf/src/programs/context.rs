//! `--tcp-context`: picking a request's ids before its first segment leaves (raw tracepoint
//! tcp_sendmsg_locked: the classic tracepoint record has no socket), and the sock_ops program
//! that writes them into an RFC 6994 experimental TCP option and reads them on the other node.

use agent_common::{
    conn::{AF_INET, AF_INET6, ConnTuple, ROLE_CLIENT, STATUS_IGNORED},
    context::{OPTION_LEN, TCPOPT_EXP, TcpContext},
    counters,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt},
    },
    macros::{raw_tracepoint, sock_ops},
    programs::{RawTracePointContext, SockOpsContext},
};

use crate::{
    helpers::{context::on_client_send, count::count},
    maps::{CONNS, LOUPE_CONFIG, OUT_CTX, PEER_CTX},
};

/// TP_PROTO(const struct sock *sk, const struct msghdr *msg, const struct sk_buff *skb, int
/// size_goal): fires in tcp_sendmsg_locked before data is queued, so before transmission.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(conn) = CONNS.get_ptr_mut(sk) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup, valid for this program run.
    let conn = unsafe { &mut *conn };
    if conn.role != ROLE_CLIENT || conn.status == STATUS_IGNORED {
        return 0;
    }
    on_client_send(conn, bpf_get_current_pid_tgid() as u32);
    0
}

/// The option on the wire: unaligned, so the ids are plain byte arrays here.
#[repr(C)]
struct WireOption {
    kind: u8,
    len: u8,
    exid: [u8; 2],
    trace_id: [u8; 16],
    span_id: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<WireOption>() == OPTION_LEN as usize);

#[sock_ops]
pub fn tcp_context_option(ctx: SockOpsContext) -> u32 {
    let _ = on_sock_ops(&ctx);
    1
}

#[inline(always)]
fn on_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    match ctx.op() {
        // Only sockets established while the agent runs pay for the per-segment callbacks.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
            ctx.set_cb_flags(flags as i32).map_err(|_| ())
        }
        // Experimental options other than Fast Open count as unknown to the kernel.
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG;
            ctx.set_cb_flags(flags as i32).map_err(|_| ())
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            // Payload-carrying segments of a connection with a request in flight.
            if skb_len(ctx) == 0 || !has_request(ctx)? {
                return Ok(());
            }
            // SAFETY: the context pointer the kernel gave this program.
            if unsafe { bpf_reserve_hdr_opt(ctx.ops, OPTION_LEN as u32, 0) } != 0 {
                count(counters::OPTION_NO_SPACE);
            }
            Ok(())
        }
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => {
            if skb_len(ctx) == 0 {
                return Ok(());
            }
            let tuple = tuple(ctx)?;
            // SAFETY: plain key; the value is copied out.
            let Some(c) = (unsafe { OUT_CTX.get(tuple) }).copied() else {
                return Ok(());
            };
            let opt = WireOption {
                kind: TCPOPT_EXP,
                len: OPTION_LEN,
                exid: LOUPE_CONFIG.load().option_exid.to_be_bytes(),
                trace_id: c.trace_id,
                span_id: c.span_id,
            };
            // SAFETY: as above; `opt` is OPTION_LEN bytes.
            let ret = unsafe {
                bpf_store_hdr_opt(
                    ctx.ops,
                    (&opt as *const WireOption).cast(),
                    OPTION_LEN as u32,
                    0,
                )
            };
            if ret == 0 {
                count(counters::OPTION_WRITTEN);
            } else {
                count(counters::OPTION_NO_SPACE);
            }
            Ok(())
        }
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => {
            let mut opt = WireOption {
                kind: TCPOPT_EXP,
                // Search by kind and a 2-byte ExID.
                len: 4,
                exid: LOUPE_CONFIG.load().option_exid.to_be_bytes(),
                trace_id: [0; 16],
                span_id: [0; 8],
            };
            // SAFETY: as above; the helper writes at most OPTION_LEN bytes into `opt`.
            let ret = unsafe {
                bpf_load_hdr_opt(
                    ctx.ops,
                    (&mut opt as *mut WireOption).cast(),
                    OPTION_LEN as u32,
                    0,
                )
            };
            if ret != OPTION_LEN as i64 {
                return Ok(());
            }
            count(counters::OPTION_READ);
            let peer = TcpContext {
                trace_id: opt.trace_id,
                span_id: opt.span_id,
            };
            let _ = PEER_CTX.insert(tuple(ctx)?, peer, 0);
            Ok(())
        }
        _ => Ok(()),
    }
}

#[inline(always)]
fn skb_len(ctx: &SockOpsContext) -> u32 {
    // SAFETY: field of the context the kernel gave this program.
    unsafe { (*ctx.ops).skb_len }
}

#[inline(always)]
fn has_request(ctx: &SockOpsContext) -> Result<bool, ()> {
    let tuple = tuple(ctx)?;
    // SAFETY: plain key.
    Ok(unsafe { OUT_CTX.get(tuple) }.is_some())
}

/// The socket's tuple as the tracepoints name it: local first, ports in host order.
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> Result<ConnTuple, ()> {
    let family = ctx.family() as u16;
    // remote_port holds the network-order port in its upper half on little-endian kernels (the
    // lower half on some versions): ports are never zero, so take the half that is not.
    let remote = ctx.remote_port();
    let remote = if remote & 0xffff == 0 {
        remote >> 16
    } else {
        remote
    };
    let mut tuple = ConnTuple {
        family,
        sport: ctx.local_port() as u16,
        dport: u16::from_be(remote as u16),
        ..ConnTuple::default()
    };
    if family == AF_INET {
        tuple.saddr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        tuple.daddr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
    } else if family == AF_INET6 {
        // Word by word with volatile reads: the verifier refuses a ctx pointer moved to the array
        // start (what copying the arrays whole compiles to).
        let ops = ctx.ops;
        for i in 0..4 {
            // SAFETY: fields of the context the kernel gave this program; i < 4.
            let (l, r) = unsafe {
                (
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip6[i])),
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).remote_ip6[i])),
                )
            };
            tuple.saddr[i * 4..i * 4 + 4].copy_from_slice(&l.to_ne_bytes());
            tuple.daddr[i * 4..i * 4 + 4].copy_from_slice(&r.to_ne_bytes());
        }
    } else {
        return Err(());
    }
    Ok(tuple)
}
