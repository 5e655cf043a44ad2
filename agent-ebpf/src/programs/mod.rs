pub mod context;
pub mod sched;
pub mod sock;
pub mod syscalls;
