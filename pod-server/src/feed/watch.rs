//! The watcher: one thread that owns the inotify instance, keeps a watch on every directory
//! under the root, turns kernel events into changes, and publishes them window by window.
//!
//! The thread blocks in `poll` on the inotify descriptor with no timeout while idle; a timeout
//! exists only while a coalescing window is open. Walks (the first one, and the one after
//! events were lost) read pending events every [`PUMP_EVERY`] directories, so a big tree does
//! not let the kernel queue overflow while it is walked.
//!
//! A barrier wakes the thread too: it reads everything the kernel has queued, ends the open
//! window at once, and answers with the newest sequence number. After lost events, barriers
//! wait for the `resync` that follows the fresh walk, the only message that covers them.
//!
//! Directories are opened beneath the root without following symlinks and watched through
//! `/proc/self/fd`, so a directory swapped for a symlink mid-walk never gets a watch outside the
//! root. Every kernel event names a watch; a watch this thread no longer knows (removed, or
//! moved out of the root) is ignored.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::oneshot;

use super::barrier::{self, Barriers};
use super::coalesce::{Coalescer, Move, Op};
use super::hub::{Batch, Hub};
use super::sys::{self, fd_path, Root, Signal};
use super::tree::{join, Tree, Wd};
use crate::proto::feed::{Change, BATCH_HEADER_LEN, MAX_FEED_FRAME, MAX_FEED_PATH};
use crate::proto::stat::FullStat;

/// The read buffer: room for a few thousand events per `read`.
const BUFFER_BYTES: usize = 64 * 1024;
/// Reads per turn of the main loop, so a flood of events cannot hold off a due flush.
const READS_PER_TURN: usize = 16;
/// Directories a walk visits between two looks at pending events.
const PUMP_EVERY: usize = 64;
/// The longest inotify event: the header and a name of `NAME_MAX` bytes with its NUL.
const MAX_EVENT_BYTES: usize = std::mem::size_of::<libc::inotify_event>() + libc::NAME_MAX as usize + 1;

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::MOVE_SELF
        | WatchMask::DELETE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// Directories waiting to be watched and listed: (parent's watch, name).
type Pending = VecDeque<(Wd, Bytes)>;

pub(super) struct Watcher {
    inotify: Inotify,
    root: Root,
    tree: Tree<WatchDescriptor>,
    window: Coalescer,
    /// When the open window is flushed; `None` while no window is open.
    deadline: Option<Instant>,
    coalesce: Duration,
    max_watches: Option<usize>,
    hub: Arc<Hub>,
    stop: Arc<Signal>,
    barriers: Arc<Barriers>,
    /// Barriers taken and not answered yet: they wait for a rewatch to end.
    waiting: Vec<oneshot::Sender<u64>>,
    /// A top-level walk is running: directories that move in the meantime must be visited.
    walking: bool,
    /// Events were lost and the tree is being watched afresh.
    rewatching: bool,
    walk_extra: Pending,
    /// Events were lost (queue overflow) or the tree went stale: rewatch everything.
    overflowed: bool,
    stopping: bool,
    root_lost: bool,
    /// The first unwatched directory is logged as a warning, the rest quietly.
    limit_logged: bool,
    buf: Vec<u8>,
}

fn watch_root(root: &mut Root, inotify: &Inotify) -> io::Result<WatchDescriptor> {
    let dir = root.open_dir(b"")?;
    inotify.watches().add(fd_path(&dir), mask())
}

impl Watcher {
    /// Puts the first watch on the root (canonical: no symlinks), so a bad root fails the
    /// caller.
    pub fn new(
        root_path: &std::path::Path,
        hub: Arc<Hub>,
        stop: Arc<Signal>,
        barriers: Arc<Barriers>,
        coalesce: Duration,
        max_watches: Option<usize>,
    ) -> io::Result<Watcher> {
        let mut root = Root::new(root_path.to_path_buf());
        let inotify = Inotify::init()?;
        let wd = watch_root(&mut root, &inotify)?;
        Ok(Watcher {
            inotify,
            root,
            tree: Tree::new(wd.get_watch_descriptor_id(), wd),
            window: Coalescer::default(),
            deadline: None,
            coalesce,
            max_watches,
            hub,
            stop,
            barriers,
            waiting: Vec::new(),
            walking: false,
            rewatching: false,
            walk_extra: Pending::new(),
            overflowed: false,
            stopping: false,
            root_lost: false,
            limit_logged: false,
            buf: vec![0; BUFFER_BYTES],
        })
    }

    pub fn run(mut self) {
        self.walk_root();
        if self.overflowed {
            self.rewatch();
        }
        if !self.stopping {
            self.hub.set_ready();
            tracing::debug!(directories = self.tree.len(), "feed ready");
        }
        while !self.stopping {
            let timeout = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match sys::wait(self.inotify.as_fd(), self.stop.fd(), self.barriers.fd(), timeout) {
                Ok(w) if w.stop => break,
                Ok(w) => {
                    if w.events {
                        self.read_events();
                    }
                    if w.barrier {
                        self.barrier();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "feed watcher cannot wait for events; the feed stops");
                    break;
                }
            }
            if self.due() {
                self.flush();
            }
            if self.overflowed {
                self.rewatch();
            }
        }
    }

    fn due(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn open_window(&mut self, now: Instant) {
        self.deadline.get_or_insert(now + self.coalesce);
    }

    /// Reads what the kernel has queued, without blocking, a bounded amount at a time.
    fn read_events(&mut self) {
        self.read(READS_PER_TURN);
    }

    /// Reads everything the kernel had queued when called, however much that is. Returns
    /// that moment, or `None` when reading failed.
    fn drain(&mut self) -> Option<Instant> {
        let start = Instant::now();
        let queued = match sys::queued_bytes(self.inotify.as_fd()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask how many inotify events are queued");
                return None;
            }
        };
        // Each read takes whole events, so it fills the buffer to within one event.
        let reads = queued.div_ceil(BUFFER_BYTES - MAX_EVENT_BYTES) + 1;
        self.read(reads);
        (!self.stopping).then_some(start)
    }

    /// At most `reads` reads of the kernel's queue, fewer once it is empty.
    fn read(&mut self, reads: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        let mut done = 0;
        while done < reads {
            match self.inotify.read_events(&mut buf) {
                Ok(events) => {
                    done += 1;
                    for ev in events {
                        self.handle(ev.wd.get_watch_descriptor_id(), ev.mask, ev.cookie, ev.name);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read inotify events; the feed stops");
                    self.stopping = true;
                    break;
                }
            }
        }
        self.buf = buf;
    }

    /// During a walk: take in pending events, answer barriers, flush a due window, notice a
    /// stop.
    fn pump(&mut self) {
        match sys::wait(self.inotify.as_fd(), self.stop.fd(), self.barriers.fd(), Some(Duration::ZERO)) {
            Ok(w) if w.stop => self.stopping = true,
            Ok(w) => {
                if w.events {
                    self.read_events();
                }
                if w.barrier {
                    self.barrier();
                }
            }
            Err(e) => tracing::warn!(error = %e, "feed watcher cannot poll during a walk"),
        }
        if self.due() {
            self.flush();
        }
    }

    /// Takes the waiting barriers and answers them once every change made before they were
    /// asked is published: everything queued is read and the window ends now.
    fn barrier(&mut self) {
        self.waiting.extend(self.barriers.take());
        if self.waiting.is_empty() {
            return;
        }
        self.flush();
        self.answer_barriers();
    }

    fn answer_barriers(&mut self) {
        // Lost events are covered only by the resync that ends the rewatch.
        if self.overflowed || self.rewatching {
            return;
        }
        barrier::answer(self.waiting.drain(..), self.hub.sequence());
    }

    fn handle(&mut self, wd: Wd, mask: EventMask, cookie: u32, name: Option<&OsStr>) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            self.overflowed = true;
            return;
        }
        if mask.contains(EventMask::IGNORED) {
            self.watch_gone(wd);
            return;
        }
        let Some(dir) = self.tree.path(wd) else { return };
        let now = Instant::now();
        let Some(name) = name else {
            // The directory itself. Its parent reports the same change by name, except for
            // the root, which has no watched parent.
            if wd == self.tree.root() {
                if mask.contains(EventMask::ATTRIB) {
                    let own = self.hub.notes().matching(b"", now);
                    self.window.attrib(Bytes::new(), own);
                    self.open_window(now);
                } else if mask.intersects(EventMask::MOVE_SELF | EventMask::DELETE_SELF) {
                    self.lose_root();
                }
            }
            return;
        };
        let name = Bytes::copy_from_slice(name.as_bytes());
        let path = join(&dir, &name);
        let isdir = mask.contains(EventMask::ISDIR);
        let own = self.hub.notes().matching(&path, now);
        self.open_window(now);
        if mask.contains(EventMask::CREATE) {
            self.window.created(path.clone(), own);
            if isdir {
                self.walk(Pending::from([(wd, name)]), true);
            }
        } else if mask.contains(EventMask::DELETE) {
            self.window.deleted(path.clone(), isdir, own);
            if isdir {
                if let Some(child) = self.tree.child(wd, &name) {
                    self.unwatch(child);
                }
                self.hub.drop_unwatched_under(&path);
            }
        } else if mask.contains(EventMask::MODIFY) {
            self.window.modified(path, own);
        } else if mask.contains(EventMask::ATTRIB) {
            self.window.attrib(path, own);
        } else if mask.contains(EventMask::MOVED_FROM) {
            let child = if isdir { self.tree.child(wd, &name) } else { None };
            if let Some(c) = child {
                self.tree.detach(c);
            }
            self.window.move_from(cookie, Move { from: path, dir: isdir, wd: child }, own);
        } else if mask.contains(EventMask::MOVED_TO) {
            self.moved_to(wd, name, path, isdir, cookie, own);
        }
    }

    fn moved_to(&mut self, parent: Wd, name: Bytes, path: Bytes, isdir: bool, cookie: u32, own: Vec<u64>) {
        let Some(mv) = self.window.move_to(cookie, path.clone(), own.clone()) else {
            // From outside the root (or its MOVED_FROM was already given up on): new here.
            self.window.created(path, own);
            if isdir {
                self.walk(Pending::from([(parent, name)]), true);
            }
            return;
        };
        if !mv.dir {
            return;
        }
        self.hub.drop_unwatched_under(&path);
        self.hub.rename_unwatched(&mv.from, &path);
        match mv.wd {
            Some(child) => match self.tree.attach(parent, name, child, None) {
                Ok(dropped) => self.remove_watches(dropped),
                Err(_) => self.overflowed = true,
            },
            // A directory this walk has not reached yet, under a name it will no longer find.
            None if self.walking => self.walk_extra.push_back((parent, name)),
            // An unwatched directory: its mark moved along.
            None => {}
        }
    }

    /// The kernel dropped a watch: its directory was deleted or unmounted, or we removed it.
    fn watch_gone(&mut self, wd: Wd) {
        if wd == self.tree.root() && self.tree.contains(wd) {
            self.lose_root();
            return;
        }
        if let Some(path) = self.tree.path(wd) {
            self.hub.drop_unwatched_under(&path);
        }
        self.unwatch(wd);
    }

    fn lose_root(&mut self) {
        if self.root_lost {
            return;
        }
        self.root_lost = true;
        tracing::error!("the feed's root directory was moved or deleted; its changes are no longer reported");
        let all = self.tree.clear();
        self.remove_watches(all);
        self.hub.add_unwatched(Bytes::new());
    }

    fn unwatch(&mut self, wd: Wd) {
        let dropped = self.tree.remove_subtree(wd);
        self.remove_watches(dropped);
    }

    fn remove_watches(&mut self, wds: Vec<WatchDescriptor>) {
        let mut watches = self.inotify.watches();
        for wd in wds {
            // Fails harmlessly when the kernel already dropped the watch.
            let _ = watches.remove(wd);
        }
    }

    /// Watches and lists the root, then walks everything below it.
    fn walk_root(&mut self) {
        let root = self.tree.root();
        let dir = match self.root.open_dir(b"") {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the feed's root directory");
                self.lose_root();
                return;
            }
        };
        self.walking = true;
        let mut pending = Pending::new();
        self.list(root, &dir, b"", false, &mut pending);
        self.walk(pending, false);
        self.walking = false;
    }

    /// Watches and lists each pending directory and, recursively, the directories found in
    /// it. `scan`: the directories are new, so everything found in them is reported created
    /// (it may have landed before the watch). A non-scanning walk is the top-level one and
    /// takes in events as it goes.
    fn walk(&mut self, mut pending: Pending, scan: bool) {
        let mut since_pump = 0;
        loop {
            if !scan {
                pending.append(&mut self.walk_extra);
            }
            let Some((parent, name)) = pending.pop_front() else { break };
            if !scan {
                since_pump += 1;
                if since_pump == PUMP_EVERY {
                    since_pump = 0;
                    self.pump();
                    if self.stopping {
                        return;
                    }
                }
            }
            // Paths are computed only now: the parent may have moved since it was queued.
            let Some(dir) = self.tree.path(parent) else { continue };
            let path = join(&dir, &name);
            let Some((wd, fd)) = self.watch(parent, name, &path) else { continue };
            self.list(wd, &fd, &path, scan, &mut pending);
        }
    }

    /// Puts a watch on the directory at `path` (known as `name` in `parent`). `None` if it is
    /// gone, not a directory any more, or cannot be watched (then it is marked unwatched).
    fn watch(&mut self, parent: Wd, name: Bytes, path: &Bytes) -> Option<(Wd, OwnedFd)> {
        let fd = match self.root.open_dir(path) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::trace!(path = %path.escape_ascii(), error = %e, "directory gone before it was watched");
                return None;
            }
        };
        let wd = match self.inotify.watches().add(fd_path(&fd), mask()) {
            Ok(wd) => wd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::ENOMEM)) => {
                self.mark_unwatched(path, &e.to_string());
                return None;
            }
            Err(e) => {
                tracing::debug!(path = %path.escape_ascii(), error = %e, "cannot watch directory");
                return None;
            }
        };
        let id = wd.get_watch_descriptor_id();
        let known = self.tree.contains(id);
        if !known && self.max_watches.is_some_and(|max| self.tree.len() >= max) {
            self.remove_watches(vec![wd]);
            self.mark_unwatched(path, "the feed's watch limit is reached");
            return None;
        }
        match self.tree.attach(parent, name, id, Some(wd.clone())) {
            Ok(dropped) => self.remove_watches(dropped),
            Err(_) => {
                if !known {
                    self.remove_watches(vec![wd]);
                }
                self.overflowed = true;
                return None;
            }
        }
        Some((id, fd))
    }

    fn mark_unwatched(&mut self, path: &Bytes, why: &str) {
        if self.hub.add_unwatched(path.clone()) {
            if !self.limit_logged {
                self.limit_logged = true;
                tracing::warn!(
                    path = %path.escape_ascii(),
                    reason = why,
                    "directory not watched, nor anything below it; clients use short timeouts there \
                     (raise fs.inotify.max_user_watches to watch it)"
                );
            } else {
                tracing::debug!(path = %path.escape_ascii(), reason = why, "directory not watched");
            }
        }
    }

    /// Lists the directory open as `fd` (watch `wd`, at `path`): queues its subdirectories,
    /// and when scanning, reports each entry created.
    fn list(&mut self, wd: Wd, fd: &OwnedFd, path: &[u8], scan: bool, pending: &mut Pending) {
        let entries = match std::fs::read_dir(fd_path(fd)) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(path = %path.escape_ascii(), error = %e, "cannot list directory");
                return;
            }
        };
        let now = Instant::now();
        for entry in entries {
            let Ok(entry) = entry else { break };
            let name = Bytes::copy_from_slice(entry.file_name().as_bytes());
            if scan {
                let child = join(path, &name);
                let own = self.hub.notes().matching(&child, now);
                self.window.created(child, own);
                self.open_window(now);
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push_back((wd, name));
            }
        }
    }

    /// Ends the window: reads what is queued (a MOVED_TO split from its MOVED_FROM by a read
    /// boundary, the last events of a finished own mutation), stats every change now and
    /// publishes them, a frame's worth at a time.
    fn flush(&mut self) {
        let drained = self.drain();
        let (ops, unpaired) = self.window.finish();
        self.deadline = None;
        for mv in unpaired {
            if let Some(wd) = mv.wd {
                self.unwatch(wd);
            }
            if mv.dir {
                self.hub.drop_unwatched_under(&mv.from);
            }
        }
        self.hub.notes().settle(Instant::now(), drained);
        let mut events = Vec::new();
        let mut len = 0;
        let mut too_long = 0usize;
        // Directories whose entries changed, stated once per window.
        let mut dirs: HashMap<Bytes, Option<FullStat>> = HashMap::new();
        for (op, own) in ops {
            let change = match op {
                Op::Created(path) => Change::Created { stat: self.root.lstat(&path), path },
                Op::Modified(path) => Change::Modified { stat: self.root.lstat(&path), path },
                Op::Attrib(path) => Change::Attrib { stat: self.root.lstat(&path), path },
                Op::Deleted(path) => Change::Deleted { path },
                Op::Renamed { from, to } => Change::Renamed { stat: self.root.lstat(&to), from, to },
            };
            let dir = match &change {
                Change::Created { path, .. }
                | Change::Deleted { path }
                | Change::Renamed { to: path, .. } => {
                    let parent = parent_of(path);
                    *dirs.entry(parent.clone()).or_insert_with(|| self.root.lstat(&parent))
                }
                Change::Modified { .. } | Change::Attrib { .. } => None,
            };
            let longest = match &change {
                Change::Renamed { from, to, .. } => from.len().max(to.len()),
                c => c.path().len(),
            };
            if longest > MAX_FEED_PATH {
                too_long += 1;
                continue;
            }
            let l = change.encoded_len(dir.is_some());
            if len + l > MAX_FEED_FRAME - BATCH_HEADER_LEN {
                self.hub.publish_batch(Batch { events: std::mem::take(&mut events), len });
                len = 0;
            }
            events.push((change, dir, own));
            len += l;
        }
        if !events.is_empty() {
            self.hub.publish_batch(Batch { events, len });
        }
        if too_long > 0 {
            tracing::warn!(too_long, max = MAX_FEED_PATH, "changes with overlong paths not sent; resync");
            self.hub.publish_resync();
        }
    }

    /// Events were lost: drop every watch, watch the tree afresh, then tell the subscribers
    /// to resync (after the new watches are in place, so what they re-read is watched).
    fn rewatch(&mut self) {
        self.rewatching = true;
        self.flush();
        while self.overflowed && !self.stopping && !self.root_lost {
            self.overflowed = false;
            tracing::warn!("feed events were lost (inotify queue overflow); rewatching the tree");
            let all = self.tree.clear();
            self.remove_watches(all);
            self.walk_extra.clear();
            self.hub.clear_unwatched();
            match watch_root(&mut self.root, &self.inotify) {
                Ok(wd) => {
                    self.tree = Tree::new(wd.get_watch_descriptor_id(), wd);
                    self.walk_root();
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch the feed's root directory again");
                    self.lose_root();
                }
            }
            self.flush();
        }
        self.hub.publish_resync();
        self.rewatching = false;
        self.overflowed = false;
        self.answer_barriers();
    }
}

impl Drop for Watcher {
    /// However the watcher ends: every subscription ends once drained, and barriers are
    /// answered, now and from now on, with the last sequence number.
    fn drop(&mut self) {
        let seq = self.hub.sequence();
        barrier::answer(self.waiting.drain(..), seq);
        self.barriers.close(seq);
        self.hub.stop();
    }
}

/// The directory holding `path` (relative to the root; the root is the empty path).
fn parent_of(path: &[u8]) -> Bytes {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => Bytes::copy_from_slice(&path[..i]),
        None => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::feed::FeedMessage;

    fn watcher(root: &std::path::Path, hub: &Arc<Hub>) -> Watcher {
        let stop = Arc::new(Signal::new().unwrap());
        let barriers = Arc::new(Barriers::new().unwrap());
        Watcher::new(root, hub.clone(), stop, barriers, Duration::ZERO, None).unwrap()
    }

    /// Driven by hand on the test thread, so the kernel queue can be filled while nobody reads.
    #[test]
    fn lost_events_rewatch_the_tree_then_resync() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        std::fs::create_dir_all(&dir).unwrap();
        let hub = Arc::new(Hub::new(usize::MAX));
        let mut w = watcher(&tmp.path().canonicalize().unwrap(), &hub);
        w.walk_root();
        let mut sub = hub.subscribe(1);

        let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .map_or(16384, |s| s.trim().parse().unwrap_or(16384));
        if max > 100_000 {
            eprintln!("max_queued_events is {max}: filling the queue would take too long; skipped");
            return;
        }
        for i in 0..max / 2 + 1 {
            let f = dir.join(format!("f{i}"));
            std::fs::write(&f, b"").unwrap();
            std::fs::remove_file(&f).unwrap();
        }
        // Its creation is lost with the overflow; only the fresh walk finds it.
        std::fs::create_dir(dir.join("new")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.overflowed && Instant::now() < deadline {
            w.read_events();
        }
        assert!(w.overflowed, "the kernel queue did not overflow");
        w.rewatch();
        assert!(!w.overflowed);
        let msgs: Vec<FeedMessage> = std::iter::from_fn(|| sub.try_recv()).collect();
        assert!(matches!(msgs.last(), Some(FeedMessage::Resync { .. })), "{:?}", msgs.last());

        std::fs::write(dir.join("new/f"), b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = loop {
            w.read_events();
            w.flush();
            let msgs: Vec<FeedMessage> = std::iter::from_fn(|| sub.try_recv()).collect();
            let found = msgs.iter().any(|m| {
                matches!(m, FeedMessage::Batch { events, .. }
                    if events.iter().any(|e| e.change.path().as_ref() == b"a/b/new/f"))
            });
            if found || Instant::now() > deadline {
                break found;
            }
        };
        assert!(seen, "a directory created during the overflow is watched after the rewatch");
    }

    #[test]
    fn a_deleted_root_is_reported_unwatched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let hub = Arc::new(Hub::new(usize::MAX));
        let mut w = watcher(&root.canonicalize().unwrap(), &hub);
        w.walk_root();
        let mut sub = hub.subscribe(1);
        std::fs::remove_dir_all(&root).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.root_lost && Instant::now() < deadline {
            w.read_events();
        }
        w.flush();
        let msgs: Vec<FeedMessage> = std::iter::from_fn(|| sub.try_recv()).collect();
        assert!(
            msgs.iter().any(|m| matches!(m, FeedMessage::Unwatched { path, .. } if path.is_empty())),
            "{msgs:?}"
        );
        assert_eq!(w.tree.len(), 0);
    }
}
