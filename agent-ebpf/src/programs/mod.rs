pub mod sock;
pub mod syscalls;
