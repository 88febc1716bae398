//! devmount-server: the pod-side half of devmount.
//!
//! One SSH server (russh) carries everything a developer's laptop needs from the pod: an SFTP
//! subsystem served concurrently, exec and shells, allow-listed port forwarding and a
//! file-change feed. The wire formats live in [`proto`], shared with the client.

pub mod exec;
pub mod feed;
pub mod forward;
pub mod keys;
pub mod passwd;
pub mod proto;
pub mod reaper;
pub mod sftp;
pub mod ssh;
