//! Per-request ids for `--tcp-context`, decided in the kernel because the option must be on the
//! request's first segment, long before the agent has read it.

use agent_common::{
    conn::{ConnState, ConnTuple, ROLE_CLIENT, ROLE_SERVER},
    context::{CTX_KERNEL, CTX_LOCAL, CTX_NONE, CTX_OPTION, TcpContext},
    event::DIR_SEND,
};
use aya_ebpf::helpers::bpf_get_prandom_u32;

use crate::{
    helpers::copy::copy_words,
    maps::{OUT_CTX, PEER_CTX, THREAD_TRACE},
};

#[inline(always)]
fn random_u32() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
fn random_trace_id() -> [u8; 16] {
    let (a, b, c, d) = (random_u32(), random_u32(), random_u32(), random_u32() | 1);
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&a.to_ne_bytes());
    id[4..8].copy_from_slice(&b.to_ne_bytes());
    id[8..12].copy_from_slice(&c.to_ne_bytes());
    id[12..].copy_from_slice(&d.to_ne_bytes());
    id
}

#[inline(always)]
fn random_span_id() -> [u8; 8] {
    let (a, b) = (random_u32(), random_u32() | 1);
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(&a.to_ne_bytes());
    id[4..].copy_from_slice(&b.to_ne_bytes());
    id
}

/// A client connection is about to send. A new request (nothing picked yet, or the server has
/// answered since) gets a fresh span id, in the trace of the request its thread is serving if
/// any. Returns whether ids were picked.
#[inline(always)]
pub fn on_client_send(conn: &mut ConnState, tid: u32) -> bool {
    if conn.ctx_source != 0 && conn.ctx_mark == conn.seq[1] {
        return false;
    }
    // SAFETY: map lookup of a plain key; the value is copied out.
    let trace_id = match unsafe { THREAD_TRACE.get(tid) } {
        Some(t) => *t,
        None => random_trace_id(),
    };
    conn.ctx = TcpContext {
        trace_id,
        span_id: random_span_id(),
    };
    conn.ctx_source = CTX_KERNEL;
    conn.ctx_mark = conn.seq[1];
    let _ = OUT_CTX.insert(conn.tuple, conn.ctx, 0);
    true
}

/// A server connection received bytes. A new request takes its context from the peer's option,
/// else from a local caller, else gets a trace id of its own; the receiving thread then serves
/// that trace.
#[inline(always)]
pub fn on_server_recv(conn: &mut ConnState, tid: u32) {
    if conn.ctx_source != 0 && conn.ctx_mark == conn.seq[0] {
        return;
    }
    let mirrored = conn.tuple.mirrored();
    // SAFETY (both lookups): plain keys; the values are copied out.
    if let Some(peer) = unsafe { PEER_CTX.get(conn.tuple) } {
        copy_words(&mut conn.ctx, peer);
        conn.ctx_source = CTX_OPTION;
    } else if let Some(local) = unsafe { OUT_CTX.get(mirrored) } {
        copy_words(&mut conn.ctx, local);
        conn.ctx_source = CTX_LOCAL;
    } else {
        conn.ctx = TcpContext {
            trace_id: random_trace_id(),
            span_id: [0; 8],
        };
        conn.ctx_source = CTX_KERNEL;
    }
    conn.ctx_mark = conn.seq[0];
    let _ = THREAD_TRACE.insert(tid, conn.ctx.trace_id, 0);
}

/// The thread answered a request: what it does next is not part of it.
#[inline(always)]
pub fn on_server_send(tid: u32) {
    let _ = THREAD_TRACE.remove(tid);
}

/// The connection closed or turned out not to be one the agent parses: stop tagging it.
#[inline(always)]
pub fn forget(tuple: &ConnTuple) {
    let _ = OUT_CTX.remove(tuple);
    let _ = PEER_CTX.remove(tuple);
}

/// `--tcp-context`: the ids this event's request runs under (see helpers/context.rs).
#[inline(always)]
pub fn request_context(conn: &mut ConnState, direction: u8, tid: u32) -> (u8, TcpContext) {
    if conn.role == ROLE_SERVER {
        if direction == DIR_SEND {
            on_server_send(tid);
            return (CTX_NONE, TcpContext::default());
        }
        on_server_recv(conn, tid);
    } else if conn.role != ROLE_CLIENT || direction != DIR_SEND {
        return (CTX_NONE, TcpContext::default());
    }
    (conn.ctx_source, conn.ctx)
}
