//! The client's caches of what the server holds: attributes, names known to be missing,
//! directory listings and file contents, kept honest by TTLs and by the change feed.
//!
//! Plain data structures. `cache` does no I/O, reads no clock, spawns nothing and takes no
//! lock: the caller (`fs`) owns one [`Cache`] behind one lock, passes `now` to everything that
//! checks a TTL, and feeds it decoded feed messages through [`Cache::apply`]. Nothing here
//! knows about SFTP, the kernel or inodes: the caller maps the paths of the returned
//! [`Invalidation`]s to inodes and sends the kernel notifications.
//!
//! # Keys
//!
//! Everything is keyed by [`RelPath`]: bytes relative to the mount root, the exact form of the
//! feed's paths, so an event finds its entries without translation. Paths are checked on
//! construction (no empty, `.` or `..` component, no NUL, no stray `/`); a feed path that fails
//! the check cannot be located, so it drops everything.
//!
//! # Freshness
//!
//! Every entry records when it was stored and the sequence number of the reply it came from.
//! Its TTL is decided when it is read, so it follows the feed's state:
//! - **long** ([`CacheConfig::long_ttl`], a safety net; correctness comes from the feed) when the
//!   feed is ready, the entry's sequence is at least the one `ready` carried, and no `unwatched`
//!   mark covers the path. (A stat taken in the instant before the server's first walk ended,
//!   with nothing published since, carries `ready`'s number too: a change racing it in a
//!   directory not yet watched is the one case the sequence cannot tell apart. It only exists
//!   while a freshly started server walks its tree.)
//! - **short** ([`CacheConfig::short_ttl`], 1 s) otherwise: no feed (a plain OpenSSH server), a
//!   feed that is down or not ready yet, or an unwatched subtree.
//!
//! A read answers the time left ([`Fresh::ttl`], [`Lookup`]), which is what the kernel may be
//! told: the kernel never keeps an answer longer than this cache would. File data has no TTL: it
//! is keyed by a [`DataVersion`] taken from a fresh stat.
//!
//! # Sequence numbers: replies older than an applied invalidation are refused
//!
//! Every insert carries `seq`: for `@devmount` replies the sequence the server read before
//! taking the stat; for plain v3 replies [`Cache::applied_seq`] read before sending the request
//! (a lower bound of the server's, so it only ever refuses more). A reply is refused
//! ([`Refused::Stale`]) when `seq` is lower than:
//! - the newest applied event for the path itself,
//! - the newest event that changed the name of the path or of any ancestor (created, deleted,
//!   renamed: everything below the name changed meaning),
//! - the newest `resync` or `hello` (the floor under everything),
//! - or the entry already stored for the path (nothing is replaced by an older answer; file
//!   data skips this one, since its [`DataVersion`] already ties it to one stat).
//!
//! Those marks live in a bounded table; the oldest mark forgotten raises the floor to its
//! sequence, so forgetting refuses more replies, never fewer (only replies that were in flight
//! when that old event was applied can be that old).
//!
//! # What an event invalidates
//!
//! | event | path | parent directory | returned |
//! |---|---|---|---|
//! | created | it and everything below dropped; stat stored | attr dropped; name added to the listing | Entry, parent Attr + Listing |
//! | modified | attr replaced by the event's stat; data dropped | - | Attr, Data |
//! | attrib | attr replaced by the event's stat | - | Attr |
//! | deleted | it and everything below dropped; stored as missing | attr dropped; name removed | Gone, parent Attr + Listing |
//! | renamed | both paths and everything below them dropped; old path missing, stat of new stored | both parents as above | Gone, Entry, both parents |
//! | resync, hello | everything dropped | | Everything |
//!
//! Listings are **updated in place** rather than dropped: a listing that is cached is complete
//! as of every event applied so far (an older listing reply is refused), so adding or removing
//! the one name keeps it exact, and a build that creates files in a watched directory does not
//! cost a readdir per file. A created or renamed-to name whose event has no stat is left out (it
//! vanished before the server looked; a later event says what became of it).

//! Attributes of the children are not part of the listing: they live in the attribute cache
//! (a readdirplus or walk reply stores them there), so a modified or attrib event of a child
//! updates its attributes and leaves the listing alone.
//!
//! A missing name is known from a negative entry or from its parent's listing, whichever is
//! fresh; a created event or a local create drops the negative entry.
//!
//! `own` events (this connection's own writes) invalidate exactly like the others, since the
//! server's stat is authoritative; the flag is passed on in the [`Invalidation`]s so the caller
//! does not take them for conflicts.
//!
//! # Dropping a subtree
//!
//! Each cache keeps its keys in a B-tree as well as in LRU order. In byte order a directory's
//! descendants are one contiguous range (`dir/` up to `dir0`), so a renamed or deleted
//! directory drops its cached descendants in O(k log n) for the k it drops, without scanning
//! the rest. Invalidation is eager: whatever is in a cache is valid as far as the feed knows.
//!
//! # Bounds
//!
//! Each cache is an LRU bounded by [`CacheConfig`]: attributes and missing names by entries,
//! listings by names (one per listing plus one per name), data by bytes (with a per-block
//! overhead, so many tiny files are bounded too). Every cache counts hits, misses, refused
//! inserts and evictions ([`Cache::stats`]).
//!
//! # Local changes
//!
//! The caller's own mutations, applied locally before the server has them, go through
//! [`Cache::local_change`]: it drops what they make stale of the name itself and records no
//! sequence mark. The parent's attributes and listing stay (a local change must not cost a
//! round trip for the directory): the caller's local state answers for the changed names until
//! the server has them and the feed's events for them are applied; without a feed the caller
//! then reports the path [`LocalChange::Settled`], which drops the parent's entries too.

mod apply;
mod data;
mod dir;
mod lru;
mod marks;
mod path;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devmount_server::proto::stat::FullStat;

pub use data::{DataPart, DataVersion};
pub use dir::{DirEntry, FileKind, Listing, ListingEntry};
pub use path::{is_name, PathError, RelPath};

use data::DataCache;
use lru::{PathLru, Weigh};
use marks::Marks;

/// Sizes and timeouts. The defaults suit a tree of a few hundred thousand files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// TTL where the feed cannot vouch for an entry (no feed, not ready, unwatched).
    pub short_ttl: Duration,
    /// TTL where the feed keeps the entry honest: a safety net against changes the feed cannot
    /// see (writes through a shared `mmap` in the pod).
    pub long_ttl: Duration,
    /// Attribute entries.
    pub attr_entries: usize,
    /// Negative (missing name) entries.
    pub negative_entries: usize,
    /// Listings count one each plus one per name.
    pub dir_names: usize,
    /// File contents, counting a fixed overhead per block.
    pub data_bytes: usize,
    /// The unit of the data cache; misses are reported in whole blocks.
    pub block_size: NonZeroUsize,
    /// Sequence marks kept per path before the oldest is folded into the floor.
    pub marks: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            short_ttl: Duration::from_secs(1),
            long_ttl: Duration::from_secs(3600),
            attr_entries: 200_000,
            negative_entries: 100_000,
            dir_names: 1_000_000,
            data_bytes: 256 << 20,
            block_size: NonZeroUsize::new(128 << 10).expect("non-zero"),
            marks: 65_536,
        }
    }
}

/// A cached value and how much longer it may be trusted (and told to the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fresh<T> {
    pub value: T,
    pub ttl: Duration,
    /// Kept by the feed (the long TTL): it stays right until an invalidation says otherwise.
    pub vouched: bool,
}

/// The answer to [`Cache::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found {
        stat: FullStat,
        ttl: Duration,
    },
    /// Known not to exist: a negative entry, or absent from the parent's fresh listing.
    Missing {
        ttl: Duration,
    },
    /// Ask the server.
    Unknown,
}

/// Why an insert was not stored. Refusals are routine (a reply raced an event); the caller
/// still uses the reply for the request it answered, it just is not cached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("reply at sequence {seq} is older than what is known at {newest}")]
    Stale { seq: u64, newest: u64 },
    #[error(transparent)]
    Path(#[from] PathError),
}

/// What a feed message made stale, for the kernel: the caller maps each path to its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalKind {
    /// The name appeared or now names something else: drop the kernel's entry for it
    /// (`inval_entry(parent, name)`).
    Entry,
    /// The name is gone (deleted, or renamed away): `delete(parent, child, name)` when the
    /// child's inode is known, else `inval_entry`. Everything below it is gone with it.
    Gone,
    /// Attributes (`inval_inode(ino, -1, 0)`).
    Attr,
    /// File contents (`inval_inode(ino, 0, 0)`).
    Data,
    /// A directory's names (`inval_inode(dir, 0, 0)`).
    Listing,
    /// Everything (resync, a new feed); the path is the root.
    Everything,
}

/// One item of what [`Cache::apply`] invalidated. It names what the event made stale, whether
/// or not this cache held it: the kernel's caches are independent of this one. `own` is set
/// when every event behind it was this connection's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    pub kind: InvalKind,
    pub path: RelPath,
    pub own: bool,
}

/// A mutation the caller made locally (and journaled), for [`Cache::local_change`].
#[derive(Debug, Clone, Copy)]
pub enum LocalChange<'a> {
    /// create, mkdir, mknod, symlink, link.
    Created(&'a RelPath),
    /// write, truncate.
    Modified(&'a RelPath),
    /// chmod, chown, utimens.
    Attrib(&'a RelPath),
    /// unlink, rmdir.
    Removed(&'a RelPath),
    Renamed {
        from: &'a RelPath,
        to: &'a RelPath,
    },
    /// The server has every local change of the path, and no feed vouches for what the cache
    /// holds of it: drop it and its parent's attributes and listing, to be asked again.
    Settled(&'a RelPath),
}

/// Counters of one cache, for `devmount status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub misses: u64,
    /// Inserts refused as stale.
    pub refused: u64,
    /// Entries (for data: blocks) evicted to stay within the bound.
    pub evicted: u64,
    /// What the bound counts now: entries; names (listings); bytes (data).
    pub size: u64,
}

/// Counters of every cache, from [`Cache::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub attr: Counters,
    /// Hits include names proven missing by a fresh parent listing.
    pub negative: Counters,
    pub dir: Counters,
    /// Hits and misses count blocks.
    pub data: Counters,
}

/// What the feed can vouch for right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedState {
    /// No feed: a plain OpenSSH server, or the feed's connection is down.
    Down,
    /// Subscribed (after `hello` or `resync`), watches not all in place yet.
    Waiting,
    /// Every watched change from sequence `since` on will be reported.
    Ready { since: u64 },
}

/// Decides TTLs; kept apart from the caches so a cache can be borrowed mutably beside it.
struct Policy {
    short_ttl: Duration,
    long_ttl: Duration,
    feed: FeedState,
    /// Directories the server cannot watch, with everything below them.
    unwatched: HashSet<RelPath>,
}

impl Policy {
    fn ttl(&self, path: &RelPath, seq: u64) -> Duration {
        if self.vouches(path, seq) {
            self.long_ttl
        } else {
            self.short_ttl
        }
    }

    /// Whether the feed keeps an entry for `path` from a reply at `seq` right.
    fn vouches(&self, path: &RelPath, seq: u64) -> bool {
        matches!(self.feed, FeedState::Ready { since } if seq >= since && !self.is_unwatched(path))
    }

    fn is_unwatched(&self, path: &RelPath) -> bool {
        !self.unwatched.is_empty()
            && (self.unwatched.contains(path) || path.ancestors().any(|a| self.unwatched.contains(a)))
    }
}

struct Entry<V> {
    value: V,
    seq: u64,
    inserted: Instant,
}

impl Weigh for Entry<FullStat> {
    fn weight(&self) -> usize {
        1
    }
}

impl Weigh for Entry<()> {
    fn weight(&self) -> usize {
        1
    }
}

impl Weigh for Entry<Arc<Listing>> {
    fn weight(&self) -> usize {
        1 + self.value.len()
    }
}

/// The value at `path` if it is still fresh, with the time it has left; an expired entry is
/// removed.
fn fresh<V: Clone>(
    lru: &mut PathLru<Entry<V>>,
    policy: &Policy,
    path: &RelPath,
    now: Instant,
) -> Option<Fresh<V>>
where
    Entry<V>: Weigh,
{
    let e = lru.peek(path)?;
    let ttl = policy.ttl(path, e.seq);
    let vouched = policy.vouches(path, e.seq);
    let age = now.saturating_duration_since(e.inserted);
    if age >= ttl {
        lru.remove(path.as_bytes());
        return None;
    }
    let value = e.value.clone();
    lru.promote(path);
    Some(Fresh { value, ttl: ttl - age, vouched })
}

#[derive(Default)]
struct Tally {
    hits: u64,
    misses: u64,
    refused: u64,
}

/// All caches of one mount. See the module documentation for the rules.
pub struct Cache {
    policy: Policy,
    attrs: PathLru<Entry<FullStat>>,
    missing: PathLru<Entry<()>>,
    dirs: PathLru<Entry<Arc<Listing>>>,
    data: DataCache,
    marks: Marks,
    /// The newest feed sequence applied.
    applied: u64,
    attr_tally: Tally,
    negative_tally: Tally,
    dir_tally: Tally,
    data_refused: u64,
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Cache {
        Cache {
            policy: Policy {
                short_ttl: config.short_ttl,
                long_ttl: config.long_ttl,
                feed: FeedState::Down,
                unwatched: HashSet::new(),
            },
            attrs: PathLru::new(config.attr_entries),
            missing: PathLru::new(config.negative_entries),
            dirs: PathLru::new(config.dir_names),
            data: DataCache::new(config.data_bytes, config.block_size),
            marks: Marks::new(config.marks),
            applied: 0,
            attr_tally: Tally::default(),
            negative_tally: Tally::default(),
            dir_tally: Tally::default(),
            data_refused: 0,
        }
    }

    /// The newest feed sequence applied: the `seq` to pass with a reply that carries none,
    /// read before its request is sent.
    pub fn applied_seq(&self) -> u64 {
        self.applied
    }

    /// The TTL an entry for `path` from a reply at `seq` gets if stored now: what to tell the
    /// kernel about an answer that was just fetched.
    pub fn ttl(&self, path: &RelPath, seq: u64) -> Duration {
        self.policy.ttl(path, seq)
    }

    /// The attributes of `path`, if cached and fresh (getattr).
    pub fn attr(&mut self, path: &RelPath, now: Instant) -> Option<Fresh<FullStat>> {
        let r = fresh(&mut self.attrs, &self.policy, path, now);
        count(&mut self.attr_tally, r.is_some());
        r
    }

    /// Whether `path` exists, as far as the caches know (lookup).
    pub fn lookup(&mut self, path: &RelPath, now: Instant) -> Lookup {
        if let Some(f) = fresh(&mut self.attrs, &self.policy, path, now) {
            self.attr_tally.hits += 1;
            return Lookup::Found { stat: f.value, ttl: f.ttl };
        }
        if let Some(f) = fresh(&mut self.missing, &self.policy, path, now) {
            self.negative_tally.hits += 1;
            return Lookup::Missing { ttl: f.ttl };
        }
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            if let Some(l) = fresh(&mut self.dirs, &self.policy, &dir, now) {
                if l.value.get(name).is_none() {
                    self.negative_tally.hits += 1;
                    return Lookup::Missing { ttl: l.ttl };
                }
            }
        }
        self.attr_tally.misses += 1;
        self.negative_tally.misses += 1;
        Lookup::Unknown
    }

    /// The complete listing of `dir`, if cached and fresh (readdir). A shared snapshot: the
    /// caller can page through it while the cache moves on.
    pub fn listing(&mut self, dir: &RelPath, now: Instant) -> Option<Fresh<Arc<Listing>>> {
        let r = fresh(&mut self.dirs, &self.policy, dir, now);
        count(&mut self.dir_tally, r.is_some());
        r
    }

    /// Whether `listing` is still the fresh listing of `dir` and the feed keeps it: a listing
    /// the kernel was let keep is checked against this (no counting, no LRU promotion). An edit
    /// of a listing someone else holds copies it, so a changed listing is another `Arc`; so is
    /// the same names stored again (a walk of the subtree), hence the comparison after.
    pub fn keeps_listing(&self, dir: &RelPath, listing: &Arc<Listing>, now: Instant) -> bool {
        self.dirs.peek(dir).is_some_and(|e| {
            (Arc::ptr_eq(&e.value, listing) || *e.value == **listing)
                && self.policy.vouches(dir, e.seq)
                && now.saturating_duration_since(e.inserted) < self.policy.long_ttl
        })
    }

    /// Stores the attributes of `path` from a reply at `seq`; drops a negative entry for it.
    pub fn insert_attr(
        &mut self,
        path: &RelPath,
        stat: FullStat,
        seq: u64,
        now: Instant,
    ) -> Result<(), Refused> {
        let newest = self.newest(path);
        if seq < newest {
            self.attr_tally.refused += 1;
            return Err(Refused::Stale { seq, newest });
        }
        self.missing.remove(path.as_bytes());
        self.attrs.insert(path.clone(), Entry { value: stat, seq, inserted: now });
        Ok(())
    }

    /// Stores that `path` does not exist, from a reply at `seq`; drops its attributes and data.
    pub fn insert_missing(&mut self, path: &RelPath, seq: u64, now: Instant) -> Result<(), Refused> {
        let newest = self.newest(path);
        if seq < newest {
            self.negative_tally.refused += 1;
            return Err(Refused::Stale { seq, newest });
        }
        self.attrs.remove(path.as_bytes());
        self.data.remove_file(path.as_bytes());
        self.missing.insert(path.clone(), Entry { value: (), seq, inserted: now });
        Ok(())
    }

    /// Stores the complete listing of `dir` from a reply at `seq`. `.` and `..` are skipped;
    /// any other name that is not one plain component refuses the whole listing (and stores
    /// nothing). Entries with `meta` store the child's attributes, each under the same rules
    /// as [`Cache::insert_attr`] (a child changed since `seq` is skipped, the rest stored).
    pub fn insert_listing(
        &mut self,
        dir: &RelPath,
        entries: Vec<ListingEntry>,
        seq: u64,
        now: Instant,
    ) -> Result<(), Refused> {
        let newest = self.newest(dir).max(self.dirs.peek(dir).map_or(0, |e| e.seq));
        if seq < newest {
            self.dir_tally.refused += 1;
            return Err(Refused::Stale { seq, newest });
        }
        let entries: Vec<ListingEntry> =
            entries.into_iter().filter(|e| e.name[..] != *b"." && e.name[..] != *b"..").collect();
        let mut children = Vec::with_capacity(entries.len());
        for e in &entries {
            children.push(dir.join(&e.name)?);
        }
        let mut names = Vec::with_capacity(entries.len());
        for (e, child) in entries.into_iter().zip(children) {
            if let Some(meta) = e.meta {
                // A child changed since `seq` keeps its newer state; the rest of the listing holds.
                let _ = self.insert_attr(&child, meta, seq, now);
            }
            // A copy: the reply's bytes are a slice of a whole packet.
            names.push(DirEntry { name: bytes::Bytes::copy_from_slice(&e.name), kind: e.kind });
        }
        self.missing.remove(dir.as_bytes());
        self.dirs.insert(dir.clone(), Entry { value: Arc::new(Listing::new(names)), seq, inserted: now });
        Ok(())
    }

    /// What of `range` in `path` at `version` is cached (see [`DataPart`]). Blocks of another
    /// version are dropped. The caller fetches the missing ranges, inserts them, and reads again.
    pub fn read_data(&mut self, path: &RelPath, version: &DataVersion, range: Range<u64>) -> Vec<DataPart> {
        self.data.read(path, version, range)
    }

    /// Stores contents of `path` at `version` read at `offset`, from a reply at `seq`.
    /// Only whole blocks (and the file's last block) are kept.
    pub fn insert_data(
        &mut self,
        path: &RelPath,
        version: &DataVersion,
        offset: u64,
        data: &[u8],
        seq: u64,
    ) -> Result<(), Refused> {
        // Marks only: the version in the key already ties the blocks to one stat.
        let newest = self.marks.newest(path);
        if seq < newest {
            self.data_refused += 1;
            return Err(Refused::Stale { seq, newest });
        }
        self.data.insert(path, version, offset, data);
        Ok(())
    }

    /// The feed's connection is gone: nothing is vouched for until the next `hello`.
    pub fn feed_down(&mut self) {
        self.policy.feed = FeedState::Down;
    }

    pub fn stats(&self) -> CacheStats {
        let c = |t: &Tally, evicted: u64, size: usize| Counters {
            hits: t.hits,
            misses: t.misses,
            refused: t.refused,
            evicted,
            size: size as u64,
        };
        CacheStats {
            attr: c(&self.attr_tally, self.attrs.evicted(), self.attrs.len()),
            negative: c(&self.negative_tally, self.missing.evicted(), self.missing.len()),
            dir: c(&self.dir_tally, self.dirs.evicted(), self.dirs.weight()),
            data: Counters {
                hits: self.data.hits,
                misses: self.data.misses,
                refused: self.data_refused,
                evicted: self.data.evicted,
                size: self.data.weight() as u64,
            },
        }
    }

    /// The newest invalidation a reply about `path` must not be older than: the marks, and the
    /// entries already stored (an answer never replaces a newer one).
    fn newest(&self, path: &RelPath) -> u64 {
        let attr = self.attrs.peek(path).map_or(0, |e| e.seq);
        let missing = self.missing.peek(path).map_or(0, |e| e.seq);
        self.marks.newest(path).max(attr).max(missing)
    }
}

fn count(t: &mut Tally, hit: bool) {
    if hit {
        t.hits += 1;
    } else {
        t.misses += 1;
    }
}
