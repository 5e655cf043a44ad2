pub mod context;
pub mod go_http;
pub mod lineage;
pub mod sched;
pub mod sock;
pub mod syscall_capture;
pub mod syscalls;
pub mod tls;
