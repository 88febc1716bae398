//! The change feed: recursive inotify over `--root`, coalesced, sequenced, streamed to clients.

use std::path::Path;

use tokio::sync::oneshot;

/// What the SFTP subsystem tells the feed, and asks of it. Implemented by the feed; `()` is the
/// no-op used when no feed runs.
pub trait ChangeTracker: Send + Sync + 'static {
    /// The sequence number of the newest change the feed has published. A stat-like reply
    /// carries the value read *before* the stat was taken, so a client can drop a reply older
    /// than an invalidation it already applied.
    fn sequence(&self) -> u64;
    /// Called just before the SFTP connection `conn` starts a mutation of `abs_path` (create,
    /// write, setstat, remove, rename: both paths), so the feed marks the resulting events as
    /// that connection's own. Every call is paired with one [`own_done`](Self::own_done).
    fn own_change(&self, conn: u64, abs_path: &Path);
    /// The mutation announced by [`own_change`](Self::own_change) is over (done, failed, or
    /// changed nothing): its events keep being marked own until the feed has read them all.
    fn own_done(&self, conn: u64, abs_path: &Path);
    /// `barrier@devmount`: sends on `reply` a sequence number such that every change made
    /// before this call is reported in a message numbered at most that, published already.
    /// The default answers [`sequence`](Self::sequence) at once, which is right for a
    /// tracker that reports nothing.
    fn barrier(&self, reply: oneshot::Sender<u64>) {
        let _ = reply.send(self.sequence());
    }
}

impl ChangeTracker for () {
    fn sequence(&self) -> u64 {
        0
    }
    fn own_change(&self, _conn: u64, _abs_path: &Path) {}
    fn own_done(&self, _conn: u64, _abs_path: &Path) {}
}

mod barrier;
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
