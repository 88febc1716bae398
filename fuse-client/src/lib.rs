//! The devmount client as a library: the binary's building blocks, testable on their own.

pub mod cache;
pub mod control;
pub mod echo;
pub mod feed;
pub mod fs;
pub mod fuse;
pub mod journal;
pub mod mount;
pub mod reconnect;
pub mod session;
