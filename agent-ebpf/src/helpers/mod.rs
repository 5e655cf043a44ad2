pub mod bounds;
pub mod classify;
pub mod context;
pub mod count;
pub mod emit;
pub mod filter;
pub mod payload;
pub mod sock;
