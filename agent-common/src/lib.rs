//! Types that cross the kernel/userspace boundary.
//!
//! Everything here is `#[repr(C)]` with fixed-width integers, byte arrays and explicit padding, and
//! each type's size is pinned by a compile-time assertion: both sides are compiled separately and a
//! silent layout drift would corrupt every event.
#![no_std]

pub mod config;
pub mod conn;
pub mod context;
pub mod counters;
pub mod event;
pub mod maps;
pub mod protocol;
pub mod syscall;
pub mod tls;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have no
    // implicit padding (checked by the size assertions beside each type).
    unsafe impl aya::Pod for crate::config::LoupeConfig {}
    unsafe impl aya::Pod for crate::conn::ConnState {}
    unsafe impl aya::Pod for crate::conn::ConnTuple {}
    unsafe impl aya::Pod for crate::context::TcpContext {}
}
