//! Cold walks in bulk: the first miss in a directory not yet covered fetches its whole subtree
//! with `walk@devmount` (a few round trips for thousands of entries) and fills the attribute
//! and listing caches, so a cold `find` or `git status` does not pay a round trip per file.
//!
//! One walk runs at a time, in the background; requests that missed meanwhile go to the server
//! on their own. A walk stops after [`MAX_ENTRIES`]. What it stores follows the cache's
//! sequence rules like any reply (each batch carries the feed sequence it was read at), so a
//! change in the pod during the walk is never hidden by it. Only devmount-server walks.
//!
//! Small files read together ([`Siblings`]): the first small file fetched whole in a directory
//! brings its small siblings into the data cache too, so `grep -r`, a build or git reading a
//! directory's files one after the other pays about one round trip per directory, not one per
//! file.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use bytes::Bytes;
use devmount_server::proto::sftp::WalkEntry;
use lru::LruCache;
use tokio::sync::watch;

use crate::cache::{FileKind, ListingEntry, RelPath};

/// Entries one walk stores at most: enough for a large source tree, bounded for a huge one.
pub const MAX_ENTRIES: usize = 100_000;
/// Entries asked for per batch.
pub const BATCH: u32 = 1024;
/// Batches asked for at once: the server walks on while earlier ones travel, and what has
/// arrived is stored while later ones are on their way.
pub const BATCHES_IN_FLIGHT: usize = 4;

/// The subtrees walked (or being walked) since the cache was last emptied.
#[derive(Default)]
pub struct Covered(Mutex<Vec<RelPath>>);

impl Covered {
    /// Claims `dir` for a walk: false if a walk of it or of an ancestor was claimed already.
    pub fn claim(&self, dir: &RelPath) -> bool {
        let mut roots = super::lock(&self.0);
        if roots.iter().any(|r| r == dir || dir.starts_with(r)) {
            return false;
        }
        roots.retain(|r| !r.starts_with(dir));
        roots.push(dir.clone());
        true
    }

    /// The cache was emptied (a new feed, a resync): every subtree may be walked again.
    pub fn clear(&self) {
        super::lock(&self.0).clear();
    }

    /// The subtrees claimed so far, unclaimed.
    pub fn take(&self) -> Vec<RelPath> {
        std::mem::take(&mut *super::lock(&self.0))
    }
}

/// Siblings fetched at once, over all directories.
pub const SIBLINGS_IN_FLIGHT: usize = 16;
/// Of one directory, the small siblings fetched at most, and their bytes.
pub const SIBLINGS_MAX_FILES: usize = 256;
pub const SIBLINGS_MAX_BYTES: u64 = 4 << 20;
/// Directories remembered as done; one forgotten may be fetched again, which costs only
/// bandwidth.
const SIBLING_DIRS: usize = 4096;

/// The directories whose small files were fetched (or are being fetched) since the cache was
/// last emptied, and the fetches in flight, so a reader that gets there first waits for the
/// bytes already on their way instead of asking again.
pub struct Siblings {
    done: Mutex<LruCache<RelPath, ()>>,
    in_flight: InFlight,
}

impl Default for Siblings {
    fn default() -> Siblings {
        let dirs = NonZeroUsize::new(SIBLING_DIRS).expect("non-zero");
        Siblings { done: Mutex::new(LruCache::new(dirs)), in_flight: InFlight::default() }
    }
}

impl Siblings {
    /// Claims `dir`'s small files for fetching: false if claimed already.
    pub fn claim(&self, dir: &RelPath) -> bool {
        super::lock(&self.done).put(dir.clone(), ()).is_none()
    }

    /// Gives `dir` back: its small files could not be fetched yet.
    pub fn unclaim(&self, dir: &RelPath) {
        super::lock(&self.done).pop(dir);
    }

    /// The cache was emptied: every directory may be fetched again.
    pub fn clear(&self) {
        super::lock(&self.done).clear();
    }

    /// Marks a fetch of `path` as in flight until the returned guard is dropped.
    pub fn start(&self, path: &RelPath) -> Running<'_> {
        self.in_flight.start(path)
    }

    /// Waits for a fetch of `path` in flight, if there is one.
    pub async fn wait(&self, path: &RelPath) {
        self.in_flight.wait(path).await
    }
}

/// Work in flight by path (a sibling's fetch, a directory's listing), so a reader that gets
/// there first waits for what is already on its way instead of asking again.
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<RelPath, watch::Receiver<bool>>>);

impl InFlight {
    /// Marks work on `path` as in flight until the returned guard is dropped.
    pub fn start(&self, path: &RelPath) -> Running<'_> {
        self.insert(&mut super::lock(&self.0), path)
    }

    /// [`InFlight::start`], unless work on `path` is in flight already: then `None`, once it
    /// is done.
    pub async fn start_or_wait(&self, path: &RelPath) -> Option<Running<'_>> {
        let mut rx = {
            let mut map = super::lock(&self.0);
            match map.get(path) {
                Some(rx) => rx.clone(),
                None => return Some(self.insert(&mut map, path)),
            }
        };
        // An error is the guard gone: the work is over either way.
        let _ = rx.wait_for(|done| *done).await;
        None
    }

    /// Waits for work on `path` in flight, if there is one.
    pub async fn wait(&self, path: &RelPath) {
        let rx = super::lock(&self.0).get(path).cloned();
        if let Some(mut rx) = rx {
            // An error is the guard gone: the work is over either way.
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    fn insert(&self, map: &mut HashMap<RelPath, watch::Receiver<bool>>, path: &RelPath) -> Running<'_> {
        let (done, rx) = watch::channel(false);
        map.insert(path.clone(), rx.clone());
        Running { set: self, path: path.clone(), done, rx }
    }
}

/// Work in flight; dropping it (done, or abandoned) tells the waiters.
pub struct Running<'a> {
    set: &'a InFlight,
    path: RelPath,
    done: watch::Sender<bool>,
    /// To leave alone an entry a later start put in this one's place.
    rx: watch::Receiver<bool>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut map = super::lock(&self.set.0);
        if map.get(&self.path).is_some_and(|rx| rx.same_channel(&self.rx)) {
            map.remove(&self.path);
        }
        let _ = self.done.send(true);
    }
}

/// What a walk found, in the cache's terms.
#[derive(Debug, Default, PartialEq)]
pub struct Found {
    /// Each entry's path (below the mount root), stat, and the sequence of its batch.
    pub attrs: Vec<(RelPath, devmount_server::proto::stat::FullStat, u64)>,
    /// Directories whose every child was seen, with the sequence of the batch that began them.
    pub listings: Vec<(RelPath, Vec<ListingEntry>, u64)>,
}

/// Turns a depth-first, pre-order walk of `root` into attributes and complete listings. A
/// directory's listing is complete once the walk has left its subtree. An empty directory gets
/// no listing: the walk reports a directory it cannot read the same way.
pub struct Assembler {
    root: RelPath,
    /// The directories being walked, outermost first, and whether the walk reads them.
    open: Vec<(RelPath, Vec<ListingEntry>, u64, bool)>,
    found: Found,
}

impl Assembler {
    pub fn new(root: RelPath) -> Assembler {
        Assembler { root, open: Vec::new(), found: Found::default() }
    }

    /// Takes one batch read at `seq`. An entry whose path cannot be a mount path is skipped.
    pub fn batch(&mut self, seq: u64, entries: Vec<WalkEntry>) {
        for e in entries {
            let path = if e.path.is_empty() {
                Ok(self.root.clone())
            } else if self.root.is_root() {
                RelPath::new(&e.path)
            } else {
                RelPath::new(&[self.root.as_bytes(), b"/", &e.path].concat())
            };
            let Ok(path) = path else { continue };
            let Some(kind) = FileKind::from_mode(e.stat.mode) else { continue };
            if path != self.root {
                while let Some((dir, ..)) = self.open.last() {
                    if path.parent().as_ref() == Some(dir) {
                        break;
                    }
                    self.close_last();
                }
                if let (Some((_, children, ..)), Some(name)) = (self.open.last_mut(), path.file_name()) {
                    children.push(ListingEntry { name: Bytes::copy_from_slice(name), kind, meta: None });
                }
            }
            if kind == FileKind::Directory {
                self.open.push((path.clone(), Vec::new(), seq, !e.unread()));
            }
            self.found.attrs.push((path, e.stat, seq));
        }
    }

    /// What is known so far: the attributes seen, and the listings the walk has left. Later
    /// calls return only what came since.
    pub fn take(&mut self) -> Found {
        std::mem::take(&mut self.found)
    }

    /// The walk is complete: every directory still open is too.
    pub fn finish(mut self) -> Found {
        while !self.open.is_empty() {
            self.close_last();
        }
        self.found
    }

    /// The walk stopped early: what it saw of the directories still open is incomplete.
    pub fn abandon(self) -> Found {
        self.found
    }

    fn close_last(&mut self) {
        if let Some((dir, children, seq, read)) = self.open.pop() {
            if read {
                self.found.listings.push((dir, children, seq));
            }
        }
    }
}

/// What [`git_start_files`] fetches at most, in all.
pub const GIT_START_MAX_BYTES: u64 = 16 << 20;

/// The files of the git repository at `repo` that nearly every git command reads first, in
/// turn (each a round trip when cold): the current branch, the configuration, the packed refs,
/// the index, the commit graph and the pack indexes (`pack`: the names of the regular files in
/// its `.git/objects/pack`, as far as known).
pub fn git_start_files<'a>(repo: &RelPath, pack: impl IntoIterator<Item = &'a [u8]>) -> Vec<RelPath> {
    let fixed = ["HEAD", "config", "packed-refs", "index", "objects/info/commit-graph"];
    let idx = pack.into_iter().filter(|name| name.ends_with(b".idx"));
    let idx = idx.map(|name| [&b"objects/pack/"[..], name].concat());
    let base = if repo.is_root() { b".git/".to_vec() } else { [repo.as_bytes(), b"/.git/"].concat() };
    fixed
        .iter()
        .map(|f| f.as_bytes().to_vec())
        .chain(idx)
        .filter_map(|f| RelPath::new(&[&base[..], &f].concat()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devmount_server::proto::stat::FullStat;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    fn e(path: &str, dir: bool) -> WalkEntry {
        let mode = if dir { libc::S_IFDIR | 0o755 } else { libc::S_IFREG | 0o644 };
        WalkEntry {
            path: Bytes::copy_from_slice(path.as_bytes()),
            stat: FullStat { mode, ..FullStat::default() },
            target: Bytes::new(),
        }
    }

    fn names(l: &[ListingEntry]) -> Vec<&[u8]> {
        l.iter().map(|e| &e.name[..]).collect()
    }

    #[test]
    fn listings_complete_when_the_walk_leaves_them() {
        let mut a = Assembler::new(p("src"));
        let unread = WalkEntry { target: Bytes::from_static(WalkEntry::UNREAD), ..e("a/locked", true) };
        a.batch(5, vec![e("", true), e("a", true), e("a/x", false), e("a/empty", true), unread]);
        a.batch(6, vec![e("b", false), e("c", true), e("c/y", false)]);
        let found = a.finish();
        let listings: Vec<(RelPath, Vec<&[u8]>, u64)> =
            found.listings.iter().map(|(d, l, s)| (d.clone(), names(l), *s)).collect();
        assert_eq!(
            listings,
            vec![
                (p("src/a/empty"), vec![], 5),
                (p("src/a"), vec![&b"x"[..], b"empty", b"locked"], 5),
                (p("src/c"), vec![&b"y"[..]], 6),
                (p("src"), vec![&b"a"[..], b"b", b"c"], 5),
            ],
            "an empty directory is listed empty, one the walk did not read is not listed"
        );
        assert_eq!(found.attrs.len(), 8);
        assert_eq!((found.attrs[5].0.clone(), found.attrs[5].2), (p("src/b"), 6));
    }

    #[test]
    fn git_start_files_are_the_fixed_ones_and_the_pack_indexes() {
        let pack: [&[u8]; 3] = [b"pack-1.idx", b"pack-1.pack", b"pack-2.idx"];
        let show = |files: Vec<RelPath>| -> Vec<String> {
            files.iter().map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()).collect()
        };
        let got = show(git_start_files(&RelPath::root(), pack));
        assert_eq!(
            got,
            [
                ".git/HEAD",
                ".git/config",
                ".git/packed-refs",
                ".git/index",
                ".git/objects/info/commit-graph",
                ".git/objects/pack/pack-1.idx",
                ".git/objects/pack/pack-2.idx",
            ]
        );
        let below = show(git_start_files(&p("work/app"), std::iter::empty()));
        assert_eq!(below[0], "work/app/.git/HEAD");
    }

    #[tokio::test]
    async fn work_in_flight_is_waited_for_and_done_once() {
        let (set, d) = (InFlight::default(), p("d"));
        let first = set.start_or_wait(&d).await.expect("nothing in flight yet");
        let waiter = set.start_or_wait(&d);
        tokio::pin!(waiter);
        assert!(futures::poll!(waiter.as_mut()).is_pending(), "waits for the work in flight");
        drop(first);
        assert!(waiter.await.is_none(), "done by the other: not started again");
        let again = set.start(&d);
        let replaced = set.start(&d);
        drop(again);
        let late = set.wait(&d);
        tokio::pin!(late);
        assert!(futures::poll!(late.as_mut()).is_pending(), "an older guard leaves a newer entry");
        drop(replaced);
        late.await;
    }

    #[test]
    fn what_a_walk_has_finished_is_taken_batch_by_batch() {
        let mut a = Assembler::new(p("src"));
        a.batch(5, vec![e("", true), e("a", true), e("a/x", false)]);
        let first = a.take();
        assert!(first.listings.is_empty(), "src/a may have more names in the next batch");
        assert_eq!(first.attrs.len(), 3);
        a.batch(6, vec![e("b", false)]);
        let second = a.take();
        let listings: Vec<(RelPath, Vec<&[u8]>)> =
            second.listings.iter().map(|(d, l, _)| (d.clone(), names(l))).collect();
        assert_eq!(listings, vec![(p("src/a"), vec![&b"x"[..]])], "the walk left src/a");
        assert_eq!(second.attrs.len(), 1, "only what came since");
        let rest = a.finish();
        assert_eq!(rest.listings.len(), 1);
        assert_eq!(names(&rest.listings[0].1), vec![&b"a"[..], b"b"]);
        assert!(rest.attrs.is_empty());
    }

    #[test]
    fn an_abandoned_walk_lists_only_what_it_left() {
        let mut a = Assembler::new(RelPath::root());
        a.batch(1, vec![e("", true), e("a", true), e("a/x", false), e("b", true), e("b/y", false)]);
        let found = a.abandon();
        assert_eq!(found.listings.iter().map(|(d, _, _)| d.clone()).collect::<Vec<_>>(), vec![p("a")]);
    }

    #[test]
    fn a_claim_covers_its_subtree() {
        let c = Covered::default();
        assert!(c.claim(&p("a/b")));
        assert!(!c.claim(&p("a/b/c")));
        assert!(c.claim(&p("a")), "an ancestor takes over");
        assert!(!c.claim(&p("a/b")));
        assert!(c.claim(&p("ab")));
        c.clear();
        assert!(c.claim(&p("a/b")));
    }
}
