//! Loupe's userspace agent, as a pipeline of stages:
//! `bpf` (load, attach) -> `reader` (ring buffer -> `event_queue`) -> `decode` -> `conn` (table,
//! reassembly) -> a sink (`capture`, or `trace::sink`: protocol detection and
//! parsing -> pairing -> causality -> spans -> `export`). See docs/ARCHITECTURE.md.

pub mod bpf;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conn;
pub mod counter;
pub mod decode;
pub mod drop_warnings;
pub mod event_queue;
pub mod export;
pub mod fuzzing;
pub mod goroutines;
pub mod k8s;
pub mod metrics;
pub mod pipeline;
pub mod process;
pub mod procfs;
pub mod protocol;
pub mod reader;
pub mod red;
pub mod redact;
pub mod scheduling;
pub mod selection;
pub mod service_rules;
pub mod stdout;
pub mod tls;
pub mod top;
pub mod trace;
