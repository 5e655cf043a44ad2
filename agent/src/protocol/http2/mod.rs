//! HTTP/2 and gRPC (in progress, not yet registered for detection): frames (`frame`) and
//! header blocks (`hpack`), the building blocks of the HTTP/2 session.

pub mod frame;
pub mod hpack;
pub mod session;
