//! The change feed: recursive inotify over `--root`, coalesced, sequenced, streamed to clients.

use std::path::Path;

/// What the SFTP subsystem tells the feed, and asks of it. Implemented by the feed; `()` is the
/// no-op used when no feed runs.
pub trait ChangeTracker: Send + Sync + 'static {
    /// The sequence number of the newest change the feed has published. A stat-like reply
    /// carries the value read *before* the stat was taken, so a client can drop a reply older
    /// than an invalidation it already applied.
    fn sequence(&self) -> u64;
    /// Called just before the SFTP connection `conn` mutates `abs_path` (create, write, setstat,
    /// remove, rename: both paths), so the feed can mark the resulting events as that
    /// connection's own.
    fn own_change(&self, conn: u64, abs_path: &Path);
}

impl ChangeTracker for () {
    fn sequence(&self) -> u64 {
        0
    }
    fn own_change(&self, _conn: u64, _abs_path: &Path) {}
}

mod coalesce;
mod handle;
mod hub;
mod notes;
mod serve;
mod sys;
mod tree;
mod watch;

pub use handle::{Feed, FeedOptions};
pub use hub::Subscription;
pub use serve::serve;

#[cfg(test)]
mod tests;
