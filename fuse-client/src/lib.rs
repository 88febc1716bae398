//! The devmount client as a library: the binary's building blocks, testable on their own.

pub mod cache;
pub mod control;
pub mod echo;
pub mod exec;
pub mod feed;
pub mod forward;
pub mod fs;
pub mod fuse;
pub mod guard;
pub mod journal;
pub mod kube;
pub mod local_server;
pub mod manifest;
pub mod mount;
pub mod proxy;
pub mod reconnect;
pub mod session;
pub mod sessions;
pub mod up;
