//! The feed as the rest of the server sees it: start it once, let SFTP note its own changes and
//! ask for barriers, subscribe each `devmount-feed` channel.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::barrier::Barriers;
use super::hub::{Hub, Subscription};
use super::sys::Signal;
use super::watch::Watcher;
use super::ChangeTracker;

/// Tunables of [`Feed::start`].
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How long changes are gathered before they are sent together.
    pub coalesce: Duration,
    /// Bytes one subscriber may have queued; past that its queue is replaced by a `resync`.
    pub queue_bytes: usize,
    /// Watch at most this many directories (the kernel's `max_user_watches` applies anyway);
    /// the rest is reported `unwatched`.
    pub max_watches: Option<usize>,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions { coalesce: Duration::from_millis(5), queue_bytes: 8 << 20, max_watches: None }
    }
}

/// The change feed of one `--root`. Dropping it stops the watcher thread; subscriptions then
/// end once drained.
pub struct Feed {
    hub: Arc<Hub>,
    /// The root with symlinks resolved, and as given: SFTP may name paths under either.
    root: PathBuf,
    given_root: PathBuf,
    stop: Arc<Signal>,
    barriers: Arc<Barriers>,
}

impl Feed {
    /// Watches `root` recursively on a thread of its own. The first watch is in place when
    /// this returns; the walk below it goes on in the background until `ready`.
    pub fn start(root: PathBuf, options: FeedOptions) -> anyhow::Result<Arc<Feed>> {
        let canonical =
            std::fs::canonicalize(&root).with_context(|| format!("feed root {}", root.display()))?;
        let hub = Arc::new(Hub::new(options.queue_bytes));
        let stop = Arc::new(Signal::new().context("creating the feed's stop signal")?);
        let barriers = Arc::new(Barriers::new().context("creating the feed's barrier signal")?);
        let watcher = Watcher::new(
            &canonical,
            hub.clone(),
            stop.clone(),
            barriers.clone(),
            options.coalesce,
            options.max_watches,
        )
        .with_context(|| format!("watching {}", canonical.display()))?;
        std::thread::Builder::new()
            .name("devmount-feed".into())
            .spawn(move || watcher.run())
            .context("starting the feed's watcher thread")?;
        Ok(Arc::new(Feed { hub, root: canonical, given_root: root, stop, barriers }))
    }

    /// A new subscriber, identified by its SSH connection (the `conn` SFTP passes to
    /// [`ChangeTracker::own_change`]).
    pub fn subscribe(&self, conn: u64) -> Subscription {
        self.hub.subscribe(conn)
    }

    /// The path of `abs` relative to the root, as the feed names it; `None` outside the root.
    pub(super) fn relative(&self, abs: &Path) -> Option<Bytes> {
        let rel = abs.strip_prefix(&self.root).or_else(|_| abs.strip_prefix(&self.given_root)).ok()?;
        let mut out = Vec::with_capacity(rel.as_os_str().len());
        for c in rel.components() {
            match c {
                Component::Normal(name) => {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(name.as_bytes());
                }
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        Some(out.into())
    }
}

impl ChangeTracker for Feed {
    fn sequence(&self) -> u64 {
        self.hub.sequence()
    }

    fn own_change(&self, conn: u64, abs_path: &Path) {
        if let Some(rel) = self.relative(abs_path) {
            self.hub.notes().begin(conn, rel, Instant::now());
        }
    }

    fn own_done(&self, conn: u64, abs_path: &Path) {
        // The time is taken before the lock: the mutation is over by then, which is what the
        // watcher compares with when it last read the kernel's queue.
        let now = Instant::now();
        if let Some(rel) = self.relative(abs_path) {
            self.hub.notes().end(conn, &rel, now);
        }
    }

    fn barrier(&self, reply: oneshot::Sender<u64>) {
        // The watcher has ended: nothing is reported any more, so nothing is pending either.
        if let Err(reply) = self.barriers.request(reply) {
            let _ = reply.send(self.hub.sequence());
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.raise();
    }
}
