pub mod context;
pub mod lineage;
pub mod sched;
pub mod sock;
pub mod syscalls;
pub mod tls;
