//! Map and global names used by both sides, so the strings cannot drift. The kernel truncates map
//! names to 15 characters: keep each unique within that.

pub const EVENTS: &str = "EVENTS";
pub const CONNS: &str = "CONNS";
pub const ACTIVE_CALLS: &str = "ACTIVE_CALLS";
pub const COUNTERS: &str = "COUNTERS";
pub const PID_FILTER: &str = "PID_FILTER";
pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
pub const NETNS_FILTER: &str = "NETNS_FILTER";
pub const PORT_FILTER: &str = "PORT_FILTER";
pub const EXE_FILTER: &str = "EXE_FILTER";
pub const CONFIG: &str = "LOUPE_CONFIG";
pub const OUT_CTX: &str = "OUT_CTX";
pub const PEER_CTX: &str = "PEER_CTX";
pub const THREAD_TRACE: &str = "THREAD_TRACE";
