//! Everything that touches the kernel: BTF offsets, tracefs, loading and attaching the programs,
//! reading the counters and filling the selection maps.

pub mod btf;
pub mod load;
pub mod tracefs;
