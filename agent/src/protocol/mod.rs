//! One pure parser per protocol: bytes in, messages out; no I/O, no clocks, no globals.

pub mod http1;
