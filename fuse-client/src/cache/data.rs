//! File contents in aligned blocks, per path and version, bounded by bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::ops::{Bound, Range};

use bytes::Bytes;
use devmount_server::proto::stat::{FullStat, Timespec};
use lru::LruCache;

use super::path::RelPath;

/// What a block costs besides its bytes (key, LRU node, index entry), counted against the
/// byte bound so that a cache of many tiny files stays bounded too.
pub(super) const BLOCK_OVERHEAD: usize = 128;

/// Which contents of a file the cached blocks are: a file whose inode, size and mtime (to the
/// nanosecond) are unchanged is taken to be unchanged. Changes that keep all three (a rewrite
/// of the same length within one mtime tick) are caught by the feed's `modified` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataVersion {
    pub ino: u64,
    pub size: u64,
    pub mtime: Timespec,
}

impl From<&FullStat> for DataVersion {
    fn from(st: &FullStat) -> Self {
        DataVersion { ino: st.ino, size: st.size, mtime: st.mtime }
    }
}

/// One piece of the answer to [`Cache::read_data`](super::Cache::read_data), in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPart {
    /// Bytes of the requested range that are cached, starting at `offset`.
    Cached { offset: u64, data: Bytes },
    /// Not cached: the blocks to fetch. Block-aligned, so it may start before the request and
    /// end after it (never past the version's size); adjacent missing blocks come as one range.
    Missing(Range<u64>),
}

struct FileBlocks {
    version: DataVersion,
    blocks: BTreeSet<u64>,
}

/// Blocks are LRU entries of their own; `files` indexes them per path (in path order, for
/// dropping a subtree) and holds the version they belong to.
pub(super) struct DataCache {
    blocks: LruCache<(RelPath, u64), Bytes>,
    files: BTreeMap<RelPath, FileBlocks>,
    block_size: u64,
    weight: usize,
    max_weight: usize,
    pub(super) hits: u64,
    pub(super) misses: u64,
    pub(super) evicted: u64,
}

impl DataCache {
    pub(super) fn new(max_bytes: usize, block_size: NonZeroUsize) -> Self {
        DataCache {
            blocks: LruCache::unbounded(),
            files: BTreeMap::new(),
            block_size: block_size.get() as u64,
            weight: 0,
            max_weight: max_bytes,
            hits: 0,
            misses: 0,
            evicted: 0,
        }
    }

    /// Bytes counted against the bound (contents plus [`BLOCK_OVERHEAD`] per block).
    pub(super) fn weight(&self) -> usize {
        self.weight
    }

    pub(super) fn read(&mut self, path: &RelPath, version: &DataVersion, range: Range<u64>) -> Vec<DataPart> {
        let start = range.start;
        let end = range.end.min(version.size);
        if start >= end {
            return Vec::new();
        }
        if self.files.get(path).is_some_and(|f| f.version != *version) {
            self.remove_file(path.as_bytes());
        }
        let b = self.block_size;
        let mut parts: Vec<DataPart> = Vec::new();
        for idx in start / b..=(end - 1) / b {
            let (bstart, bend) = (idx * b, ((idx + 1) * b).min(version.size));
            match self.blocks.get(&(path.clone(), idx)) {
                Some(block) => {
                    self.hits += 1;
                    let lo = start.max(bstart) - bstart;
                    let hi = end.min(bend) - bstart;
                    parts.push(DataPart::Cached {
                        offset: bstart + lo,
                        data: block.slice(lo as usize..hi as usize),
                    });
                }
                None => {
                    self.misses += 1;
                    match parts.last_mut() {
                        Some(DataPart::Missing(r)) if r.end == bstart => r.end = bend,
                        _ => parts.push(DataPart::Missing(bstart..bend)),
                    }
                }
            }
        }
        parts
    }

    /// Stores the whole blocks that `data` (read at `offset` from the file at `version`)
    /// covers, and the last block if `data` reaches the version's end. Partial blocks are not
    /// kept (the reader fetches [`DataPart::Missing`] ranges, which are whole blocks), and
    /// bytes past the version's size are ignored. The bytes are copied, so the bound counts
    /// what is really held, not a packet buffer that a slice would keep alive.
    pub(super) fn insert(&mut self, path: &RelPath, version: &DataVersion, offset: u64, data: &[u8]) {
        if self.files.get(path).is_some_and(|f| f.version != *version) {
            self.remove_file(path.as_bytes());
        }
        let end = offset.saturating_add(data.len() as u64).min(version.size);
        let b = self.block_size;
        let mut idx = offset.div_ceil(b);
        while idx * b < end {
            let (bstart, bend) = (idx * b, ((idx + 1) * b).min(version.size));
            if bend > end {
                break;
            }
            if (bend - bstart) as usize + BLOCK_OVERHEAD > self.max_weight {
                // A block heavier than the whole bound would only flush everything else.
                break;
            }
            let block = Bytes::copy_from_slice(&data[(bstart - offset) as usize..(bend - offset) as usize]);
            self.files
                .entry(path.clone())
                .or_insert_with(|| FileBlocks { version: *version, blocks: BTreeSet::new() })
                .blocks
                .insert(idx);
            self.weight += block.len() + BLOCK_OVERHEAD;
            if let Some(old) = self.blocks.put((path.clone(), idx), block) {
                self.weight -= old.len() + BLOCK_OVERHEAD;
            }
            idx += 1;
        }
        self.evict();
    }

    /// Drops every block of `path`.
    pub(super) fn remove_file(&mut self, path: &[u8]) {
        let Some((path, f)) = self.files.remove_entry(path) else { return };
        for idx in f.blocks {
            if let Some(block) = self.blocks.pop(&(path.clone(), idx)) {
                self.weight -= block.len() + BLOCK_OVERHEAD;
            }
        }
    }

    /// Drops the blocks of `dir` and of every file below it.
    pub(super) fn remove_subtree(&mut self, dir: &RelPath) {
        let Some((lo, hi)) = dir.descendant_bounds() else {
            self.clear();
            return;
        };
        let below: Vec<RelPath> = self
            .files
            .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
            .map(|(p, _)| p.clone())
            .collect();
        self.remove_file(dir.as_bytes());
        for p in below {
            self.remove_file(p.as_bytes());
        }
    }

    pub(super) fn clear(&mut self) {
        self.blocks.clear();
        self.files.clear();
        self.weight = 0;
    }

    fn evict(&mut self) {
        while self.weight > self.max_weight {
            let Some(((path, idx), block)) = self.blocks.pop_lru() else { break };
            self.weight -= block.len() + BLOCK_OVERHEAD;
            self.evicted += 1;
            if let Some(f) = self.files.get_mut(&path) {
                f.blocks.remove(&idx);
                if f.blocks.is_empty() {
                    self.files.remove(&path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = 4;

    fn cache(max_bytes: usize) -> DataCache {
        DataCache::new(max_bytes, NonZeroUsize::new(B).unwrap())
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    fn v(size: u64) -> DataVersion {
        DataVersion { ino: 1, size, mtime: Timespec { sec: 1, nsec: 0 } }
    }

    fn cached(offset: u64, data: &'static [u8]) -> DataPart {
        DataPart::Cached { offset, data: Bytes::from_static(data) }
    }

    #[test]
    fn range_lookup_names_the_missing_blocks() {
        let mut c = cache(1 << 20);
        let ver = v(10);
        let f = p("f");
        assert_eq!(c.read(&f, &ver, 0..100), vec![DataPart::Missing(0..10)]);
        c.insert(&f, &ver, 4, b"4567");
        assert_eq!(
            c.read(&f, &ver, 1..10),
            vec![DataPart::Missing(0..4), cached(4, b"4567"), DataPart::Missing(8..10)]
        );
        assert_eq!(c.read(&f, &ver, 5..7), vec![cached(5, b"56")]);
        c.insert(&f, &ver, 8, b"89");
        c.insert(&f, &ver, 0, b"0123");
        assert_eq!(c.read(&f, &ver, 3..9), vec![cached(3, b"3"), cached(4, b"4567"), cached(8, b"8")]);
        assert_eq!(c.read(&f, &ver, 10..20), vec![], "reads at or past the end are empty");
        assert_eq!((c.hits, c.misses), (5, 5));
    }

    #[test]
    fn partial_blocks_are_not_kept_unless_they_end_the_file() {
        let mut c = cache(1 << 20);
        let ver = v(10);
        let f = p("f");
        c.insert(&f, &ver, 2, b"234567");
        assert_eq!(
            c.read(&f, &ver, 0..10),
            vec![DataPart::Missing(0..4), cached(4, b"4567"), DataPart::Missing(8..10)]
        );
        c.insert(&f, &ver, 8, b"89-past-the-end");
        assert_eq!(c.read(&f, &ver, 8..10), vec![cached(8, b"89")]);
        assert_eq!(c.weight(), 6 + 2 * BLOCK_OVERHEAD);
    }

    #[test]
    fn a_new_version_drops_the_old_blocks() {
        let mut c = cache(1 << 20);
        let f = p("f");
        c.insert(&f, &v(4), 0, b"abcd");
        let newer = DataVersion { mtime: Timespec { sec: 1, nsec: 1 }, ..v(4) };
        assert_eq!(c.read(&f, &newer, 0..4), vec![DataPart::Missing(0..4)]);
        assert_eq!(c.read(&f, &v(4), 0..4), vec![DataPart::Missing(0..4)], "the old blocks are gone");
        c.insert(&f, &v(4), 0, b"abcd");
        c.insert(&f, &newer, 0, b"ABCD");
        assert_eq!(c.read(&f, &newer, 0..4), vec![cached(0, b"ABCD")]);
        assert_eq!(c.weight(), 4 + BLOCK_OVERHEAD);
    }

    #[test]
    fn bounded_by_bytes_least_recently_used_block_first() {
        let mut c = cache(3 * (B + BLOCK_OVERHEAD));
        let ver = v(16);
        c.insert(&p("a"), &ver, 0, b"aaaabbbb");
        c.insert(&p("b"), &ver, 0, b"cccc");
        assert_eq!(c.read(&p("a"), &ver, 0..4), vec![cached(0, b"aaaa")]);
        c.insert(&p("b"), &ver, 4, b"dddd");
        assert_eq!(c.weight(), 3 * (B + BLOCK_OVERHEAD));
        assert_eq!(c.evicted, 1);
        assert_eq!(c.read(&p("a"), &ver, 4..8), vec![DataPart::Missing(4..8)], "a's second block went first");
        assert_eq!(c.read(&p("a"), &ver, 0..4), vec![cached(0, b"aaaa")]);
    }

    #[test]
    fn removes_files_and_subtrees() {
        let mut c = cache(1 << 20);
        let ver = v(4);
        for s in ["d/x", "d/y/z", "d-e", "f"] {
            c.insert(&p(s), &ver, 0, b"1234");
        }
        c.remove_subtree(&p("d"));
        for (s, gone) in [("d/x", true), ("d/y/z", true), ("d-e", false), ("f", false)] {
            let missing = c.read(&p(s), &ver, 0..4) == vec![DataPart::Missing(0..4)];
            assert_eq!(missing, gone, "{s}");
        }
        c.remove_file(b"f");
        assert_eq!(c.weight(), 4 + BLOCK_OVERHEAD);
        c.remove_subtree(&RelPath::root());
        assert_eq!(c.weight(), 0);
    }
}
