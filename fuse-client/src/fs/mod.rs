//! The file system: what each FUSE operation means, over the cache and the remote.
//!
//! `fs` knows nothing of the kernel protocol (`fuse.rs` adapts) or of SSH (`remote` hides the
//! SFTP client): every operation is an async method that takes node ids and names and answers a
//! plain value or an errno. Errors become errno here and nowhere else.
//!
//! Reads go to the cache first and to the server for what it lacks; what the server answers is
//! stored under the feed's sequence rules, so an answer older than an invalidation already
//! applied is used once and not kept.

pub mod apply;
pub mod conflict;
mod inflight;
pub mod inode;
pub mod local;
mod prefetch;
pub mod remote;
mod write;

pub use write::{SetAttr, SetTime};

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use devmount_server::proto::sftp::StatVfs;
use devmount_server::proto::stat::FullStat;
use nix::errno::Errno;

use crate::cache::{
    Cache, CacheConfig, DataPart, DataVersion, FileKind, Listing, LocalChange, Lookup, RelPath,
};
use crate::journal::{Journal, Sender};
use apply::Applier;
use inflight::{InFlight, Ticket};
use inode::Nodes;
use local::Local;
use remote::{Handle, Remote, Result, Stat};

/// Files up to this size are read whole in one request (`get@devmount`) on first read.
const SMALL_FILE: u64 = 256 << 10;
/// How far ahead of a sequential reader the cache is filled: twice the read's size at first,
/// doubling while the reads stay sequential, up to this.
const READ_AHEAD_MAX: u64 = 8 << 20;
/// Files up to this size are fetched whole on their first read, wherever it is: a reader that
/// jumps around (git in its index and packs, a linker in an archive) pays one round trip, not
/// one per jump.
const WHOLE_FILE: u64 = 4 << 20;
/// How long a statfs answer is reused: free space a few seconds old is what `df` shows anyway.
const STATFS_TTL: Duration = Duration::from_secs(5);

/// How long the kernel may keep what it is told of a name changed here and not yet settled on
/// the server. A directory: a second, so a path walk through new directories (an untar, a
/// build's output tree) does not ask again for every component of every path; the kernel
/// updates what it changes itself (names, link counts, a directory's times on each change in
/// it) and the feed's invalidations reach it. A file: not kept, as its times (and, against a
/// plain SFTP server, their precision) become the server's when it settles, and an editor that
/// saw the local ones before would take that for a change made behind its back.
fn local_ttl(stat: &FullStat) -> Duration {
    if stat.is_dir() {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    }
}

/// How ownership appears locally (like sshfs's `idmap=user`): files of the server's user
/// appear as the local user's, so tools that check ownership (git's `safe.directory`, ssh)
/// accept them, and the local user's files map back when created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub remote_uid: u32,
    pub remote_gid: u32,
    pub local_uid: u32,
    pub local_gid: u32,
}

impl IdMap {
    fn to_local(self, mut st: FullStat) -> FullStat {
        if st.uid == self.remote_uid {
            st.uid = self.local_uid;
        }
        if st.gid == self.remote_gid {
            st.gid = self.local_gid;
        }
        st
    }
}

/// A node's attributes as the kernel is told them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub id: u64,
    pub stat: FullStat,
}

/// The answer to a lookup: the node and how long the kernel may keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub attr: Attr,
    pub ttl: Duration,
}

/// One name of a directory listing.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub name: Bytes,
    pub kind: FileKind,
}

/// A directory's names, as readdir answers them.
#[derive(Debug, Clone)]
pub struct Names {
    pub items: Vec<DirItem>,
    /// The cached listing the names are, when the feed keeps it and nothing changed here is
    /// merged in: the kernel may then keep the names too, as long as [`Fs::names_current`]
    /// holds (the feed's invalidation of the directory drops the kernel's copy).
    pub kept: Option<Arc<Listing>>,
}

struct OpenFile {
    id: u64,
    /// The path at open; reads and writes use the node's current path.
    path: RelPath,
    writable: bool,
    /// Opened with O_APPEND. Without the kernel's writeback cache the file system, not the
    /// kernel, must put each write at the end: the kernel's offset comes from a size it may
    /// not have refreshed.
    append: bool,
    /// The server's handle, opened on the first read the cache cannot answer (and again after
    /// a reconnect).
    remote: tokio::sync::Mutex<Option<Handle>>,
    /// Sequential reads: the furthest point read, how far ahead of it the cache has been asked
    /// to fill, and the read-ahead window.
    next_read: std::sync::atomic::AtomicU64,
    ahead: std::sync::atomic::AtomicU64,
    window: std::sync::atomic::AtomicU64,
    /// Read-ahead fetches of this file on their way: a read of bytes one of them brings waits
    /// for it rather than asking the server for the same bytes again.
    fetching: Mutex<Vec<(std::ops::Range<u64>, tokio::sync::watch::Receiver<()>)>>,
}

impl OpenFile {
    /// Registers a fetch of `range`; it is on its way until the returned sender is dropped.
    fn start_fetch(&self, range: std::ops::Range<u64>) -> tokio::sync::watch::Sender<()> {
        let (done, rx) = tokio::sync::watch::channel(());
        let mut fetching = lock(&self.fetching);
        fetching.retain(|(_, rx)| rx.has_changed().is_ok());
        fetching.push((range, rx));
        done
    }

    /// Waits for the fetches on their way that overlap `range`.
    async fn wait_fetches(&self, range: std::ops::Range<u64>) {
        let overlapping: Vec<_> = lock(&self.fetching)
            .iter()
            .filter(|(r, _)| r.start < range.end && range.start < r.end)
            .map(|(_, rx)| rx.clone())
            .collect();
        for mut rx in overlapping {
            // Resolves with an error once the fetch's sender is dropped, when it is done.
            while rx.changed().await.is_ok() {}
        }
    }
}

/// The mounted file system.
pub struct Fs {
    remote: Arc<Remote>,
    cache: Mutex<Cache>,
    nodes: Mutex<Nodes>,
    files: Mutex<slab::Slab<Arc<OpenFile>>>,
    ids: IdMap,
    journal: Journal,
    sender: Sender<Applier>,
    local: Mutex<Local>,
    /// Wakes the task that drops local entries once their ops are resolved.
    local_added: tokio::sync::Notify,
    /// Requests whose replies may still go into the cache.
    inflight: InFlight,
    /// The newest feed sequence applied to the cache; `None` while there is no feed.
    feed: tokio::sync::watch::Sender<Option<u64>>,
    /// Subtrees walked in bulk, and the queue of those to walk.
    covered: prefetch::Covered,
    walks: tokio::sync::mpsc::UnboundedSender<RelPath>,
    walks_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<RelPath>>>,
    /// Ranges to fetch ahead of sequential readers.
    ahead: tokio::sync::mpsc::UnboundedSender<ReadAhead>,
    ahead_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ReadAhead>>>,
    /// Directories whose small files to fetch, and the fetches' bound.
    siblings: prefetch::Siblings,
    sibling_dirs: tokio::sync::mpsc::UnboundedSender<RelPath>,
    sibling_dirs_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<RelPath>>>,
    sibling_gets: Arc<tokio::sync::Semaphore>,
    /// Directories being listed for a lookup that missed, so lookups in one wait for one
    /// listing (see [`Fs::list_for_lookup`]).
    listing_for_lookup: prefetch::InFlight,
    statfs: Mutex<Option<(Instant, StatVfs)>>,
}

/// A range of a file to bring into the cache before it is read.
struct ReadAhead {
    file: Arc<OpenFile>,
    path: RelPath,
    version: DataVersion,
    range: std::ops::Range<u64>,
    /// Dropped when the fetch is done (see [`OpenFile::start_fetch`]).
    _done: tokio::sync::watch::Sender<()>,
}

impl Fs {
    pub fn new(
        remote: Arc<Remote>,
        cache: &CacheConfig,
        ids: IdMap,
        journal: Journal,
        sender: Sender<Applier>,
    ) -> Fs {
        let (walks, walks_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ahead, ahead_rx) = tokio::sync::mpsc::unbounded_channel();
        let (sibling_dirs, sibling_dirs_rx) = tokio::sync::mpsc::unbounded_channel();
        Fs {
            remote,
            cache: Mutex::new(Cache::new(cache)),
            nodes: Mutex::new(Nodes::new()),
            files: Mutex::new(slab::Slab::new()),
            ids,
            journal,
            sender,
            local: Mutex::new(Local::default()),
            local_added: tokio::sync::Notify::new(),
            inflight: InFlight::default(),
            feed: tokio::sync::watch::Sender::new(None),
            covered: prefetch::Covered::default(),
            walks,
            walks_rx: Mutex::new(Some(walks_rx)),
            ahead,
            ahead_rx: Mutex::new(Some(ahead_rx)),
            siblings: prefetch::Siblings::default(),
            sibling_dirs,
            sibling_dirs_rx: Mutex::new(Some(sibling_dirs_rx)),
            sibling_gets: Arc::new(tokio::sync::Semaphore::new(prefetch::SIBLINGS_IN_FLIGHT)),
            listing_for_lookup: prefetch::InFlight::default(),
            statfs: Mutex::new(None),
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Where the journal's requests to the server are.
    pub fn sending(&self) -> crate::journal::Activity {
        self.sender.activity()
    }

    /// Drops local entries once the server has their ops and the cache cannot bring back what
    /// was there before, for as long as `fs` lives; run it once per mount.
    ///
    /// After the acknowledgement, two things can still be older than the op: a reply to a
    /// request sent before the server had it, and (with a feed) the events the op caused,
    /// still on their way. So an entry goes only once every request started before the
    /// acknowledgement is done and the feed has applied everything up to a barrier taken after
    /// it. Then the cache, under the feed's sequence rules, holds nothing older than the op.
    /// Without a feed, the cache entries of the paths are dropped instead: the server is asked
    /// again.
    pub async fn retire_local(self: Arc<Self>) {
        loop {
            let oldest = { lock(&self.local).oldest() };
            let Some(seq) = oldest else {
                self.local_added.notified().await;
                continue;
            };
            self.journal.wait_resolved(seq).await;
            let upto = self.journal.resolved_upto();
            self.inflight.quiesce().await;
            let caught_up = self.feed_caught_up().await;
            let paths = lock(&self.local).resolved(upto);
            if !caught_up {
                let mut cache = self.cache();
                for p in &paths {
                    cache.local_change(LocalChange::Settled(p));
                }
            }
        }
    }

    /// Walks the subtrees asked for by [`Fs::want_subtree`], one at a time, for as long as `fs`
    /// lives; run it once per mount.
    pub async fn prefetch(self: Arc<Self>) {
        let Some(mut rx) = lock(&self.walks_rx).take() else { return };
        while let Some(dir) = rx.recv().await {
            let started = Instant::now();
            match self.walk(&dir).await {
                Ok(n) => tracing::debug!("walked {} ({n} entries) in {:?}", show(&dir), started.elapsed()),
                Err(e) => tracing::debug!("walking {}: {e}", show(&dir)),
            }
            if dir.is_root() {
                tokio::spawn(self.clone().fetch_git_start());
            }
        }
    }

    /// Fetches the files of the mount's git repositories (the root, or a directory right below
    /// it, with a `.git` directory) that a git command reads first, one after the other, each
    /// a round trip when cold ([`prefetch::git_start_files`]); the tree's walk has their stats
    /// by now.
    async fn fetch_git_start(self: Arc<Self>) {
        use futures::StreamExt;
        let now = Instant::now();
        let has_git = |dir: &RelPath| {
            let listing = self.cache().listing(dir, now);
            listing.is_some_and(|l| l.value.get(b".git").is_some_and(|e| e.kind == FileKind::Directory))
        };
        let root = RelPath::root();
        let below = self.cache().listing(&root, now).map(|l| l.value);
        let below = below.iter().flat_map(|l| l.entries()).filter(|e| e.kind == FileKind::Directory);
        let repos = std::iter::once(root.clone()).chain(below.filter_map(|e| root.join(&e.name).ok()));
        let mut budget = prefetch::GIT_START_MAX_BYTES;
        let mut wanted = Vec::new();
        for repo in repos.filter(|r| has_git(r)) {
            let Ok(pack) = repo.join(b".git").and_then(|g| g.join(b"objects")).and_then(|o| o.join(b"pack"))
            else {
                continue;
            };
            let packs = self.cache().listing(&pack, now).map(|l| l.value);
            let packs = packs.iter().flat_map(|l| l.entries()).filter(|e| e.kind == FileKind::Regular);
            for path in prefetch::git_start_files(&repo, packs.map(|e| &e.name[..])) {
                let Some(size) = self.worth_fetching(&path, WHOLE_FILE.min(budget), now) else { continue };
                budget -= size;
                wanted.push((path, size));
            }
        }
        futures::stream::iter(wanted)
            .for_each_concurrent(None, |(path, size)| {
                let fs = &self;
                async move {
                    if let Err(e) = fs.get_whole(&path, size).await {
                        tracing::debug!("fetching {} ahead of git: {e}", show(&path));
                    }
                }
            })
            .await;
    }

    /// Fetches the ranges [`Fs::read`] asks for ahead of sequential readers, each in its own
    /// task, for as long as `fs` lives; run it once per mount.
    pub async fn read_ahead(self: Arc<Self>) {
        let Some(mut rx) = lock(&self.ahead_rx).take() else { return };
        while let Some(r) = rx.recv().await {
            let fs = self.clone();
            tokio::spawn(async move {
                // `_done` lives to the end of the task: readers waiting for the range wake then.
                let ReadAhead { file, path, version, range, _done } = r;
                let missing = fs.cache().read_data(&path, &version, range);
                for part in missing {
                    if let DataPart::Missing(range) = part {
                        if fs.fetch_range(&file, &path, &version, range).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Fetches the small files of the directories [`Fs::fetch_range`] asks for, each directory
    /// in its own task, for as long as `fs` lives; run it once per mount.
    pub async fn fetch_siblings(self: Arc<Self>) {
        use futures::StreamExt;
        let Some(mut rx) = lock(&self.sibling_dirs_rx).take() else { return };
        while let Some(dir) = rx.recv().await {
            let fs = self.clone();
            tokio::spawn(async move {
                let Some(wanted) = fs.small_siblings(&dir) else {
                    // Not listed yet (a walk still on its way): a later read here asks again.
                    fs.siblings.unclaim(&dir);
                    return;
                };
                futures::stream::iter(wanted)
                    .for_each_concurrent(None, |path| {
                        let fs = &fs;
                        async move {
                            let Ok(_permit) = fs.sibling_gets.clone().acquire_owned().await else { return };
                            let _flight = fs.siblings.start(&path);
                            if let Err(e) = fs.get_small(&path).await {
                                tracing::debug!("fetching {} with its siblings: {e}", show(&path));
                            }
                        }
                    })
                    .await;
            });
        }
    }

    /// The files of `dir` worth fetching with a sibling: small, regular, not changed here, and
    /// not cached yet, as far as the caches know them; within the bounds of one directory.
    /// `None` if the directory's listing is not cached.
    fn small_siblings(&self, dir: &RelPath) -> Option<Vec<RelPath>> {
        let now = Instant::now();
        let listing = self.cache().listing(dir, now)?;
        let (mut files, mut bytes) = (Vec::new(), 0);
        for entry in listing.value.entries().iter().filter(|e| e.kind == FileKind::Regular) {
            let Ok(path) = dir.join(&entry.name) else { continue };
            let Some(size) = self.worth_fetching(&path, SMALL_FILE, now) else { continue };
            bytes += size;
            if bytes > prefetch::SIBLINGS_MAX_BYTES || files.len() == prefetch::SIBLINGS_MAX_FILES {
                break;
            }
            files.push(path);
        }
        Some(files)
    }

    /// The size of `path` if fetching it whole ahead of a reader is worth it: a regular file
    /// not changed here, its stats cached, neither empty nor over `max` bytes, and not all of it
    /// cached already.
    fn worth_fetching(&self, path: &RelPath, max: u64, now: Instant) -> Option<u64> {
        if self.is_local(path) {
            return None;
        }
        let mut cache = self.cache();
        let attr = cache.attr(path, now)?;
        let version = DataVersion::from(&attr.value);
        let regular = attr.value.mode & libc::S_IFMT == libc::S_IFREG;
        if !regular || version.size == 0 || version.size > max {
            return None;
        }
        let cached = cache.read_data(path, &version, 0..version.size);
        (!cached.iter().all(|part| matches!(part, DataPart::Cached { .. }))).then_some(version.size)
    }

    /// Asks for the small files of `dir` to be fetched (once per directory).
    fn want_siblings(&self, dir: &RelPath) {
        if self.siblings.claim(dir) {
            let _ = self.sibling_dirs.send(dir.clone());
        }
    }

    /// After a read of `offset..end` of `file`: when reads go on sequentially, asks for the
    /// next window to be fetched, so the reader finds it cached.
    fn plan_read_ahead(
        &self,
        file: &Arc<OpenFile>,
        path: &RelPath,
        version: &DataVersion,
        offset: u64,
        end: u64,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        // The kernel sends the pieces of one large read at once, on several threads, so
        // "sequential" is: not past what was read or asked ahead so far, nor far behind it.
        let furthest = file.next_read.fetch_max(end, Relaxed);
        let ahead = file.ahead.load(Relaxed);
        if version.size <= SMALL_FILE {
            return;
        }
        if version.size <= WHOLE_FILE {
            if ahead < version.size {
                file.ahead.store(version.size, Relaxed);
                self.fetch_ahead(file, path, version, 0..version.size);
            }
            return;
        }
        let sequential = offset <= furthest.max(ahead) && offset + READ_AHEAD_MAX >= furthest;
        if !sequential || end >= version.size {
            file.ahead.store(end, Relaxed);
            file.window.store(0, Relaxed);
            return;
        }
        // The window doubles with each sequential read: a reader that goes on reading gets
        // further ahead of the network every time, up to the limit.
        let window = (file.window.load(Relaxed) * 2).max((end - offset) * 2).min(READ_AHEAD_MAX);
        file.window.store(window, Relaxed);
        let want = (end + window).min(version.size);
        let from = ahead.max(end);
        if from < want {
            file.ahead.store(want, Relaxed);
            self.fetch_ahead(file, path, version, from..want);
        }
    }

    /// Has `range` of `file` fetched into the cache in the background; reads of it meanwhile
    /// wait for it.
    fn fetch_ahead(
        &self,
        file: &Arc<OpenFile>,
        path: &RelPath,
        version: &DataVersion,
        range: std::ops::Range<u64>,
    ) {
        let _ = self.ahead.send(ReadAhead {
            file: file.clone(),
            path: path.clone(),
            version: *version,
            _done: file.start_fetch(range.clone()),
            range,
        });
    }

    /// A cold request in `dir`: unless a walk covers it already, its subtree is walked in the
    /// background (devmount-server only).
    fn want_subtree(&self, dir: &RelPath) {
        if self.remote.is_devmount() && self.covered.claim(dir) {
            let _ = self.walks.send(dir.clone());
        }
    }

    /// The feed vouches for replies from now on. Subtrees walked before (the first `ls` of a
    /// mount usually comes before the server has watched the whole tree) are walked again:
    /// their entries would otherwise keep the short TTL and all expire at once a second later,
    /// each asked for again on its own. And the whole tree is walked in the background (up to
    /// [`prefetch::MAX_ENTRIES`]), so the first `git status` or build finds its names and stats
    /// cached instead of paying a round trip per directory it goes through. (Not before: the
    /// feed's hello, which empties the cache, comes at about the time the mount starts.)
    pub fn feed_ready(&self) {
        tracing::debug!("the feed is ready: walking the tree");
        for dir in self.covered.take() {
            self.want_subtree(&dir);
        }
        self.want_subtree(&RelPath::root());
    }

    /// The cache was emptied: subtrees may be walked again.
    pub fn cache_emptied(&self) {
        tracing::debug!("the cache was emptied");
        self.covered.clear();
        self.siblings.clear();
    }

    /// Walks `dir` and stores what it finds; the number of entries stored.
    async fn walk(
        &self,
        dir: &RelPath,
    ) -> std::result::Result<usize, devmount_server::sftp::client::SftpError> {
        use futures::StreamExt;
        let sftp = self.remote.sftp();
        let handle = sftp.dev_walk(&self.remote.abs(dir), prefetch::BATCH, 0).await?;
        let mut assembler = prefetch::Assembler::new(dir.clone());
        let mut seen = 0;
        let result = async {
            // Several reads of the walk at once. Each is polled once as it is made, which sends
            // it: the server answers one handle's requests in arrival order, so the replies
            // come back as consecutive batches, in the order the reads were made.
            let mut reads = futures::stream::FuturesOrdered::new();
            let read = || {
                let mut read = Box::pin(sftp.dev_walk_read(&handle));
                let first = futures::FutureExt::now_or_never(&mut read);
                match first {
                    Some(done) => futures::future::Either::Left(std::future::ready(done)),
                    None => futures::future::Either::Right(read),
                }
            };
            for _ in 0..prefetch::BATCHES_IN_FLIGHT {
                reads.push_back(read());
            }
            while let Some(batch) = reads.next().await {
                let Some(batch) = batch? else { return Ok(true) };
                seen += batch.entries.len();
                let eof = batch.eof;
                assembler.batch(batch.seq, batch.entries);
                if eof {
                    return Ok(true);
                }
                if seen >= prefetch::MAX_ENTRIES {
                    return Ok(false);
                }
                // Stored as it comes: a cold `find` catches up with the walk, not its end.
                self.store_walked(assembler.take());
                reads.push_back(read());
            }
            Ok(true)
        }
        .await;
        let _ = sftp.close(&handle).await;
        match result {
            Ok(true) => self.store_walked(assembler.finish()),
            Ok(false) => self.store_walked(assembler.abandon()),
            Err(e) => return Err(e),
        }
        Ok(seen)
    }

    fn store_walked(&self, found: prefetch::Found) {
        let now = Instant::now();
        let mut cache = self.cache();
        for (path, stat, seq) in found.attrs {
            let _ = cache.insert_attr(&path, stat, seq, now);
        }
        for (dir, entries, seq) in found.listings {
            let _ = cache.insert_listing(&dir, entries, seq, now);
        }
    }

    /// Waits until the feed has applied every change the server made before now; false if
    /// there is no feed to wait for (or it went down meanwhile).
    pub async fn feed_caught_up(&self) -> bool {
        if self.feed.borrow().is_none() {
            return false;
        }
        let Ok(seq) = self.remote.barrier().await else { return false };
        let mut rx = self.feed.subscribe();
        matches!(rx.wait_for(|applied| applied.is_none_or(|a| a >= seq)).await.map(|a| *a), Ok(Some(_)))
    }

    /// The feed has applied everything up to `seq` to the cache (`None`: the feed is down).
    pub fn feed_applied(&self, seq: Option<u64>) {
        self.feed.send_replace(seq);
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// A new connection replaces a lost one: requests go over it, and the journal's sender
    /// re-sends what was in flight.
    pub fn reconnected(&self, sftp: devmount_server::sftp::client::SftpClient) {
        self.remote.replace(sftp);
        self.sender.resume(Arc::new(Applier::new(self.remote.clone())));
    }

    /// The cache, for the feed to apply events to.
    pub fn cache(&self) -> MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    /// Whether the mount shows a state of `path` the server may not have yet.
    pub fn is_local(&self, path: &RelPath) -> bool {
        lock(&self.local).get(path).is_some()
    }

    /// The inode table, for the feed to map invalidated paths to node ids.
    pub fn nodes(&self) -> MutexGuard<'_, Nodes> {
        lock(&self.nodes)
    }

    pub fn path_of(&self, id: u64) -> Result<RelPath> {
        match self.nodes().path(id) {
            Some(p) => Ok(p),
            // Known but unnamed (deleted), or never known: both are gone for a path request.
            None => Err(Errno::ENOENT),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<RelPath> {
        let dir = self.path_of(parent)?;
        dir.join(name.as_bytes()).map_err(|_| Errno::EINVAL)
    }

    /// The path of `name` in directory `parent`, if `parent` has one.
    pub fn child_path(&self, parent: u64, name: &OsStr) -> Option<RelPath> {
        self.child(parent, name).ok()
    }

    /// The entry for `path` with `stat` (remote ids), counted as a kernel reference: for the
    /// echo thread's requests, answered from what the feed reported.
    ///
    /// A replay runs behind the feed: by the time it reaches the kernel the mount may show a
    /// newer state of the same file (written here, or a later event applied). That state
    /// answers then, not the event's: the kernel takes the entry's size as the file's and,
    /// without the writeback cache, cuts its cached pages to it, so an older, smaller size
    /// would zero bytes the kernel keeps for reads to come.
    pub fn echo_entry(&self, path: &RelPath, stat: FullStat) -> Entry {
        let local = lock(&self.local).get(path);
        let now = match local {
            Some(entry) => entry.stat,
            None => self.cache().attr(path, Instant::now()).map(|f| f.value),
        };
        let stat = now.filter(|now| (now.dev, now.ino) == (stat.dev, stat.ino)).unwrap_or(stat);
        self.entry(path, stat, Duration::ZERO)
    }

    /// Starts a request whose reply goes into the cache. The ticket's floor is the sequence a
    /// reply without one is stored under: what the cache had applied before the request went
    /// out, a lower bound of the server's. Keep the ticket until the reply is stored.
    fn begin(&self) -> Ticket<'_> {
        self.inflight.start(self.cache().applied_seq())
    }

    /// Stats `path` on the server and caches the answer.
    async fn fetch_stat(&self, path: &RelPath) -> Result<(FullStat, Duration)> {
        if let Some(dir) = path.parent() {
            self.want_subtree(&dir);
        }
        let ticket = self.begin();
        let floor = ticket.floor;
        let reply = self.remote.stat(path).await;
        let mut cache = self.cache();
        match reply {
            Ok(Stat { stat, seq }) => {
                let seq = seq.unwrap_or(floor);
                let _ = cache.insert_attr(path, stat, seq, Instant::now());
                Ok((stat, cache.ttl(path, seq)))
            }
            Err(Errno::ENOENT) => {
                let _ = cache.insert_missing(path, floor, Instant::now());
                Err(Errno::ENOENT)
            }
            Err(e) => Err(e),
        }
    }

    /// The entry the kernel is given for `path`: one more reference it holds to the node.
    fn entry(&self, path: &RelPath, stat: FullStat, ttl: Duration) -> Entry {
        let id = self.nodes().lookup(path, stat.dev, stat.ino);
        Entry { attr: Attr { id, stat: self.ids.to_local(stat) }, ttl }
    }

    /// lookup: the kernel takes a reference to the node it returns.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry> {
        if let Some(answer) = self.lookup_cached(parent, name) {
            return answer;
        }
        let path = self.child(parent, name)?;
        if let Some(dir) = path.parent().filter(|_| self.remote.is_devmount()) {
            self.list_for_lookup(&dir).await;
            if let Some(answer) = self.lookup_cached(parent, name) {
                return answer;
            }
        }
        let (stat, ttl) = self.fetch_stat(&path).await?;
        Ok(self.entry(&path, stat, ttl))
    }

    /// A lookup missed in `dir`: the whole directory is listed with full stats, one round trip
    /// like a stat of the one name, so the lookups of its other names that tend to follow (git
    /// looks up HEAD, commondir, objects, refs, config ... of `.git` one after the other, before
    /// a bulk walk has come that far) are answered from the cache. Lookups in a directory being
    /// listed wait for that listing.
    async fn list_for_lookup(&self, dir: &RelPath) {
        if let Some(_listing) = self.listing_for_lookup.start_or_wait(dir).await {
            let _ = self.server_listing(dir).await;
        }
    }

    /// [`Fs::lookup`] when it needs no request to the server: `None` if it does.
    pub fn lookup_cached(&self, parent: u64, name: &OsStr) -> Option<Result<Entry>> {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        let local = lock(&self.local).get(&path);
        if let Some(e) = local {
            return Some(e.stat.ok_or(Errno::ENOENT).map(|stat| self.entry(&path, stat, local_ttl(&stat))));
        }
        let cached = self.cache().lookup(&path, Instant::now());
        match cached {
            Lookup::Found { stat, ttl } => Some(Ok(self.entry(&path, stat, ttl))),
            Lookup::Missing { .. } => Some(Err(Errno::ENOENT)),
            Lookup::Unknown => None,
        }
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.nodes().forget(id, n);
    }

    pub async fn getattr(&self, id: u64) -> Result<Entry> {
        if let Some(answer) = self.getattr_cached(id) {
            return answer;
        }
        let path = self.path_of(id)?;
        let (stat, ttl) = self.fetch_stat(&path).await?;
        Ok(Entry { attr: Attr { id, stat: self.ids.to_local(stat) }, ttl })
    }

    /// [`Fs::getattr`] when it needs no request to the server: `None` if it does.
    pub fn getattr_cached(&self, id: u64) -> Option<Result<Entry>> {
        let path = match self.path_of(id) {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        let local = lock(&self.local).get(&path);
        if let Some(e) = local {
            let stat = e.stat.ok_or(Errno::ENOENT);
            return Some(stat.map(|stat| Entry {
                attr: Attr { id, stat: self.ids.to_local(stat) },
                ttl: local_ttl(&stat),
            }));
        }
        let cached = self.cache().attr(&path, Instant::now())?;
        Some(Ok(Entry { attr: Attr { id, stat: self.ids.to_local(cached.value) }, ttl: cached.ttl }))
    }

    pub async fn readlink(&self, id: u64) -> Result<Bytes> {
        let path = self.path_of(id)?;
        self.settle(&path).await;
        self.remote.readlink(&path).await
    }

    /// Waits until the server has every op that touched `path`, for the few requests the
    /// local state cannot answer (a new symlink's target, the server's bytes of a renamed
    /// file).
    async fn settle(&self, path: &RelPath) {
        let seq = lock(&self.local).get(path).map(|e| e.seq);
        if let Some(seq) = seq {
            self.sender.wait(seq).await;
        }
    }

    /// Every name of directory `id`, with the names changed here and not yet on the server
    /// merged in. The attributes of the names are cached on the way (a listing carries them),
    /// for [`Fs::plus_entry`].
    pub async fn readdir(&self, id: u64) -> Result<Names> {
        if let Some(names) = self.readdir_cached(id) {
            return names;
        }
        let dir = self.path_of(id)?;
        let (entries, listing) = self.server_listing(&dir).await?;
        Ok(self.merge_local(&dir, entries, listing))
    }

    /// [`Fs::readdir`] when it needs no request to the server: `None` if it does.
    pub fn readdir_cached(&self, id: u64) -> Option<Result<Names>> {
        let dir = match self.path_of(id) {
            Ok(dir) => dir,
            Err(e) => return Some(Err(e)),
        };
        let own = lock(&self.local).get(&dir);
        match own {
            Some(e) if e.stat.is_none() => return Some(Err(Errno::ENOENT)),
            // Made here: the server does not have it yet, and has nothing in it.
            Some(e) if e.made.is_some() => {
                return Some(Ok(self.merge_local(&dir, Vec::new(), None)));
            }
            _ => {}
        }
        let cached = self.cache().listing(&dir, Instant::now())?;
        let entries =
            cached.value.entries().iter().map(|e| DirItem { name: e.name.clone(), kind: e.kind }).collect();
        let listing = cached.vouched.then_some(cached.value);
        Some(Ok(self.merge_local(&dir, entries, listing)))
    }

    /// The server's names `entries` of `dir` (the cache's `listing`, if the feed keeps it) with
    /// the names changed here merged in.
    fn merge_local(&self, dir: &RelPath, mut items: Vec<DirItem>, listing: Option<Arc<Listing>>) -> Names {
        let (changed, own) = {
            let local = lock(&self.local);
            (local.children(dir), local.get(dir))
        };
        if changed.is_empty() && own.is_none() {
            return Names { items, kept: listing };
        }
        items.retain(|item| !changed.iter().any(|(name, _)| *name == item.name));
        items.extend(changed.into_iter().filter_map(|(name, kind)| Some(DirItem { name, kind: kind? })));
        Names { items, kept: None }
    }

    /// Whether the server has a feed: the kernel may then keep what the caches vouch for
    /// (listings, absent names) until the feed's invalidations drop it.
    pub fn has_feed(&self) -> bool {
        self.remote.is_devmount()
    }

    /// How long the kernel may remember that `name` is not in directory `parent`: `Some` only
    /// with a feed (which invalidates the name when the pod makes it) and when the caches
    /// know it is absent; its changes through the mount reach the kernel's dentry directly.
    pub fn absent_for(&self, parent: u64, name: &OsStr) -> Option<Duration> {
        if !self.has_feed() {
            return None;
        }
        let path = self.child(parent, name).ok()?;
        if lock(&self.local).get(&path).is_some() {
            return None;
        }
        match self.cache().lookup(&path, Instant::now()) {
            Lookup::Missing { ttl } => Some(ttl),
            _ => None,
        }
    }

    /// Whether `names`, an answer of [`Fs::readdir`] for directory `id`, is still the answer:
    /// always false for names the kernel is not to keep.
    pub fn names_current(&self, id: u64, names: &Names) -> bool {
        let Some(listing) = &names.kept else { return false };
        let Ok(dir) = self.path_of(id) else { return false };
        let unchanged_here = {
            let local = lock(&self.local);
            local.get(&dir).is_none() && local.children(&dir).is_empty()
        };
        unchanged_here && self.cache().keeps_listing(&dir, listing, Instant::now())
    }

    /// The server's names of `dir` (through the cache), and the cached listing they are if the
    /// feed keeps it.
    async fn server_listing(&self, dir: &RelPath) -> Result<(Vec<DirItem>, Option<Arc<Listing>>)> {
        let now = Instant::now();
        self.want_subtree(dir);
        let ticket = self.begin();
        let (entries, own) = self.remote.list(dir).await?;
        let seq = own.as_ref().and_then(|s| s.seq).unwrap_or(ticket.floor);
        let items = entries.iter().map(|e| DirItem { name: e.name.clone(), kind: e.kind }).collect();
        let mut cache = self.cache();
        if let Some(own) = own {
            let _ = cache.insert_attr(dir, own.stat, seq, now);
        }
        // A refused listing (an event overtook it) still answers this request, but is not kept.
        let kept = match cache.insert_listing(dir, entries, seq, now) {
            Ok(()) => cache.listing(dir, now).filter(|f| f.vouched).map(|f| f.value),
            Err(_) => None,
        };
        Ok((items, kept))
    }

    /// The entry to give the kernel for `name` of a listing snapshot, as of now: a name deleted
    /// since the snapshot is left out (`None`), so a directory read begun before a change
    /// never brings back what the feed already removed. Counted as a reference the kernel
    /// takes: [`Fs::forget`] it if the entry does not make it into the reply.
    pub async fn plus_entry(&self, dir: u64, name: &[u8]) -> Option<Entry> {
        match self.plus_entry_cached(dir, name) {
            Some(entry) => entry,
            None => self.lookup(dir, OsStr::from_bytes(name)).await.ok(),
        }
    }

    /// [`Fs::plus_entry`] when it needs no request to the server: `None` if it does.
    pub fn plus_entry_cached(&self, dir: u64, name: &[u8]) -> Option<Option<Entry>> {
        let Some(path) = self.path_of(dir).ok().and_then(|d| d.join(name).ok()) else { return Some(None) };
        let local = lock(&self.local).get(&path);
        if let Some(e) = local {
            return Some(e.stat.map(|st| self.entry(&path, st, local_ttl(&st))));
        }
        let cached = self.cache().lookup(&path, Instant::now());
        match cached {
            Lookup::Found { stat, ttl } => Some(Some(self.entry(&path, stat, ttl))),
            Lookup::Missing { .. } => Some(None),
            Lookup::Unknown => None,
        }
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        lock(&self.files).get(fh as usize).cloned().ok_or(Errno::EBADF)
    }

    /// Reads `size` bytes at `offset` of open file `fh`.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes> {
        let file = self.file(fh)?;
        let path = self.nodes().path(file.id).unwrap_or_else(|| file.path.clone());
        let local = lock(&self.local).get(&path);
        if let Some(entry) = local {
            return self.read_dirty(&file, &path, entry, offset, size).await;
        }
        // The file's version now: the cache's (the feed may have changed it since open), else
        // the server's. Not the one at open: writes through this descriptor have since left the
        // local state once the server acknowledged them.
        let cached = self.cache().attr(&path, Instant::now()).map(|f| DataVersion::from(&f.value));
        let version = match cached {
            Some(version) => version,
            None => DataVersion::from(&self.fetch_stat(&path).await?.0),
        };
        let end = offset.saturating_add(u64::from(size)).min(version.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        if !self.trusts_cached_data(&version) {
            return self.read_server(&file, &path, offset, end).await;
        }
        self.plan_read_ahead(&file, &path, &version, offset, end);
        file.wait_fetches(offset..end).await;
        let parts = self.cache().read_data(&path, &version, offset..end);
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for part in parts {
            match part {
                DataPart::Cached { offset: at, data } => {
                    let skip = offset.saturating_sub(at) as usize;
                    let take = (end - at.max(offset)).min(data.len().saturating_sub(skip) as u64) as usize;
                    out.extend_from_slice(&data[skip..skip + take]);
                }
                DataPart::Missing(range) => {
                    let data = self.fetch_range(&file, &path, &version, range.clone()).await?;
                    let from = offset.max(range.start);
                    let to = end.min(range.start + data.len() as u64);
                    if from < to {
                        out.extend_from_slice(
                            &data[(from - range.start) as usize..(to - range.start) as usize],
                        );
                    }
                    if (data.len() as u64) < range.end - range.start {
                        // The file is shorter than its stat said: it changed; stop here.
                        break;
                    }
                }
            }
        }
        Ok(out.freeze())
    }

    /// Whether cached contents of a file at `version` can be trusted. With whole-second
    /// times (plain SFTP v3) a file rewritten with the same size in the second it was read
    /// looks unchanged, so such a file is read from the server until its mtime is at least
    /// two seconds old (git's "racy clean" rule). devmount-server's nanosecond times and feed
    /// need no such care.
    fn trusts_cached_data(&self, version: &DataVersion) -> bool {
        if self.remote.is_devmount() {
            return true;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        version.mtime.sec + 1 < now
    }

    /// A read of a file with changes the server does not have yet: the journal's bytes over
    /// the server's.
    async fn read_dirty(
        &self,
        file: &OpenFile,
        path: &RelPath,
        entry: local::LocalEntry,
        offset: u64,
        size: u32,
    ) -> Result<Bytes> {
        let stat = entry.stat.ok_or(Errno::ENOENT)?;
        let end = offset.saturating_add(u64::from(size)).min(stat.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let overlay = self.journal.overlay(path.as_bytes(), offset, end - offset).map_err(|e| {
            tracing::error!("journal: {e}");
            Errno::EIO
        })?;
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut at = offset;
        for (range, data) in overlay
            .pieces
            .iter()
            .map(|(r, d)| (r.clone(), d))
            .chain(std::iter::once((end..end, &Bytes::new())))
        {
            if at < range.start {
                // The server's bytes: wait until it has them under this name.
                if let Some(seq) = entry.renamed {
                    self.sender.wait(seq).await;
                }
                let gap = self.read_server(file, path, at, range.start).await?;
                out.extend_from_slice(&gap);
                // Past the server's end of file (a pending extension): zeros.
                out.resize((range.start - offset) as usize, 0);
            }
            out.extend_from_slice(data);
            at = range.end.max(at);
        }
        Ok(out.freeze())
    }

    /// Bytes `[from, to)` of `path` as the server has them, without caching (the file is
    /// changing).
    async fn read_server(&self, file: &OpenFile, path: &RelPath, from: u64, to: u64) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity((to - from) as usize);
        let chunk = u64::from(self.remote.read_len().max(4096));
        let mut at = from;
        while at < to {
            let piece = self.read_at(file, path, at, (to - at).min(chunk) as u32).await?;
            if piece.is_empty() {
                break;
            }
            at += piece.len() as u64;
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    /// Reads `len` bytes at `at` through the file's server handle, opened on first use and
    /// again when a reconnect made it stale.
    async fn read_at(&self, file: &OpenFile, path: &RelPath, at: u64, len: u32) -> Result<Bytes> {
        loop {
            let handle = {
                let mut remote = file.remote.lock().await;
                match &*remote {
                    Some(h) => h.clone(),
                    None => {
                        let h = self.remote.open_read(path).await?;
                        *remote = Some(h.clone());
                        h
                    }
                }
            };
            match self.remote.read(&handle, at, len).await {
                Err(Errno::ESTALE) => {
                    let mut remote = file.remote.lock().await;
                    if remote.as_ref().is_some_and(|h| h.same(&handle)) {
                        *remote = None;
                    }
                }
                r => return r,
            }
        }
    }

    /// Fetches `range` of the file from the server (whole in one request when small) and
    /// caches it.
    async fn fetch_range(
        &self,
        file: &OpenFile,
        path: &RelPath,
        version: &DataVersion,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        if self.remote.is_devmount() && version.size <= SMALL_FILE && range.start == 0 {
            // A sibling's fetch may be bringing it already.
            self.siblings.wait(path).await;
            if let [DataPart::Cached { offset: 0, data }] =
                &self.cache().read_data(path, version, range.clone())[..]
            {
                return Ok(data.slice(0..(range.end as usize).min(data.len())));
            }
            if let Some(dir) = path.parent() {
                self.want_siblings(&dir);
            }
            let data = self.get_small(path).await?;
            let end = (range.end as usize).min(data.len());
            return Ok(data.slice(0..end));
        }
        let ticket = self.begin();
        let floor = ticket.floor;
        let chunk = u64::from(self.remote.read_len().max(4096));
        let reads = (range.start..range.end).step_by(chunk as usize).map(|at| {
            let len = (range.end - at).min(chunk) as u32;
            self.read_at(file, path, at, len)
        });
        let results = futures::future::join_all(reads).await;
        let mut data = BytesMut::with_capacity((range.end - range.start) as usize);
        for r in results {
            let piece = r?;
            let short = piece.len() < chunk as usize;
            data.extend_from_slice(&piece);
            if short {
                break;
            }
        }
        let data = data.freeze();
        let _ = self.cache().insert_data(path, version, range.start, &data, floor);
        Ok(data)
    }

    /// Fetches small file `path` whole, caching its attributes and contents.
    async fn get_small(&self, path: &RelPath) -> Result<Bytes> {
        self.get_whole(path, SMALL_FILE).await
    }

    /// Fetches file `path` whole if it has at most `max` bytes, caching its attributes and
    /// contents.
    async fn get_whole(&self, path: &RelPath, max: u64) -> Result<Bytes> {
        let ticket = self.begin();
        let (stat, data) = self.remote.get(path, max).await?;
        let seq = stat.seq.unwrap_or(ticket.floor);
        let got = DataVersion::from(&stat.stat);
        let mut cache = self.cache();
        let _ = cache.insert_attr(path, stat.stat, seq, Instant::now());
        let _ = cache.insert_data(path, &got, 0, &data, seq);
        Ok(data)
    }

    pub async fn release(&self, fh: u64) {
        let file = lock(&self.files).try_remove(fh as usize);
        if let Some(file) = file {
            let handle = file.remote.lock().await.take();
            if let Some(h) = handle {
                let _ = self.remote.close(&h).await;
            }
            self.drop_hidden(file.id).await;
        }
    }

    /// Whether a descriptor of node `id` is open.
    fn is_open(&self, id: u64) -> bool {
        lock(&self.files).iter().any(|(_, f)| f.id == id)
    }

    /// statfs: the server's answer, kept for [`STATFS_TTL`] (`find` and `df` ask at every run).
    pub async fn statfs(&self) -> Result<StatVfs> {
        if let Some((at, st)) = *lock(&self.statfs) {
            if at.elapsed() < STATFS_TTL {
                return Ok(st);
            }
        }
        let st = self.remote.statvfs(&RelPath::root()).await?;
        *lock(&self.statfs) = Some((Instant::now(), st));
        Ok(st)
    }
}

fn show(path: &RelPath) -> String {
    String::from_utf8_lossy(path.as_bytes()).into_owned()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No invariant here survives a panic half-way better than the data itself.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
