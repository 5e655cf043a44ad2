pub mod sched;
pub mod sock;
pub mod syscalls;
