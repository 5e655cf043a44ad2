//! From reassembled streams to spans: pairing requests with responses (`exchange`), trace
//! context carried in headers (`context`), causality (`causality`), span building (`span`),
//! naming (`route`) and what of it is exported (`sampling`).

pub mod causality;
pub mod context;
pub mod exchange;
mod orphans;
pub mod route;
pub mod sampling;
pub mod shared_text;
pub mod sink;
pub mod span;
