//! The write-back journal: every mutation of the mount, kept on local disk until the server has
//! applied it, and sent to the server in an order that never shows a process in the pod a state
//! the laptop never had.
//!
//! Two halves:
//!
//! - [`Journal`] (`log`, `index`): the durable, ordered log. Plain `std` file I/O, no network.
//!   [`Journal::append`] writes an [`Op`] (one `pwrite`, so it survives `kill -9` of the client)
//!   and returns its sequence number; a group commit fsyncs within [`Config::commit_interval`],
//!   and [`Journal::sync`] at once. Appends wait while the journal holds more than
//!   [`Config::max_bytes`]. [`Journal::overlay`] answers reads of dirty files from the log (the
//!   data stays in the segment files, not in memory). An op leaves the log when it is
//!   acknowledged ([`Journal::ack`]) or rejected ([`Journal::reject`]: its data is kept in the
//!   rejected folder and the error is returned at the next barrier).
//! - [`Sender`] (`sender`): sends the log to a [`Remote`], pipelined, in journal order except where
//!   order cannot be observed, coalescing small new files into one put; pauses on a lost
//!   connection and resumes where it stopped.
//!
//! Invariants:
//!
//! - Changes to one path reach the server in the order they were made. An op overtakes earlier
//!   ones only if no path of either is equal to, above or below a path of the other; the one
//!   exception is plain writes to one file, which may be in flight together when their ranges do
//!   not overlap (their order cannot be observed). Rename, link, rmdir and fsync
//!   ([`Op::is_barrier`]) start only after every earlier op is acknowledged, and no later op
//!   starts before they are.
//! - Nothing appended is ever dropped: it is acknowledged by the server, or kept in
//!   `<state>/rejected/` with a note saying why, and reported.
//! - The journal knows nothing of SFTP, SSH or FUSE: the [`Remote`] trait is its only way out,
//!   and errno values are the only thing it interprets (to tolerate replays, see [`Sender`]).
//!
//! Layout on disk, per target: `<state>/journal/<sanitized key>-<hash>/` holds `target` (the key
//! itself), `lock` (an exclusive `flock` while a devmount process has it open), and segment files
//! `<n>.seg`. A segment is `DMJRNL01` followed by records: `u32 len, u64 seq, u32 crc32, payload`
//! (the CRC covers payload, seq and len). A payload is an encoded [`Op`], or a one-byte
//! acknowledgement or sent mark of `seq`. The first record that is cut short or fails its CRC
//! ends the log: it is the torn tail of a crash, and is cut off on open.

mod index;
mod log;
mod op;
mod sender;

use std::path::PathBuf;

pub use index::PendingSize;
pub use log::{Config, Journal, JournalError, Overlay, Recovered, RecoveredOp, Stats};
pub use op::{Op, OpKind};
pub use sender::{Activity, BarrierError, Conflict, Remote, RemoteError, Resolution, Sender, SenderConfig};

/// A journal sequence number: ops are numbered from 1 in the order they were appended.
pub type Seq = u64;

/// An op the server refused, kept for the next barrier of its file (fsync, close) or of the
/// whole mount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno}); the change was kept in {}", kept.display())]
pub struct DeferredError {
    pub seq: Seq,
    pub errno: i32,
    pub message: String,
    /// The note written in the rejected folder.
    pub kept: PathBuf,
}
