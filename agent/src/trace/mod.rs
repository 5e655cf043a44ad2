//! From reassembled streams to spans: pairing requests with responses (`exchange`), trace
//! context carried in headers (`context`), span building (`span`) and naming (`route`).

pub mod causality;
pub mod context;
pub mod exchange;
pub mod route;
pub mod sink;
pub mod span;
