//! [`PathLru`]: an LRU map keyed by [`RelPath`], bounded by a total weight, that can also drop a
//! whole subtree in time proportional to what it drops.

use std::collections::BTreeSet;
use std::ops::Bound;

use lru::LruCache;

use super::path::RelPath;

/// How much of a cache's bound one value uses.
pub(super) trait Weigh {
    fn weight(&self) -> usize;
}

/// The LRU order lives in `lru`; `order` keeps the same keys sorted by path bytes, so the
/// descendants of a directory are one range of it (see [`RelPath`]).
pub(super) struct PathLru<V> {
    lru: LruCache<RelPath, V>,
    order: BTreeSet<RelPath>,
    weight: usize,
    max_weight: usize,
    evicted: u64,
}

impl<V: Weigh> PathLru<V> {
    pub(super) fn new(max_weight: usize) -> Self {
        PathLru { lru: LruCache::unbounded(), order: BTreeSet::new(), weight: 0, max_weight, evicted: 0 }
    }

    /// Without promoting.
    pub(super) fn peek(&self, path: &RelPath) -> Option<&V> {
        self.lru.peek(path)
    }

    pub(super) fn promote(&mut self, path: &RelPath) {
        self.lru.promote(path);
    }

    /// Inserts or replaces, as most recently used, then evicts the least recently used values
    /// until the total weight is within the bound. A value heavier than the whole bound is not
    /// stored (and replaces nothing): it would only flush everything else.
    pub(super) fn insert(&mut self, path: RelPath, value: V) {
        if value.weight() > self.max_weight {
            self.remove(path.as_bytes());
            self.evicted += 1;
            return;
        }
        self.weight += value.weight();
        if let Some(old) = self.lru.put(path.clone(), value) {
            self.weight -= old.weight();
        } else {
            self.order.insert(path);
        }
        self.evict();
    }

    /// Changes a value in place (keeping its LRU position) and re-weighs it.
    pub(super) fn update(&mut self, path: &RelPath, f: impl FnOnce(&mut V)) {
        if let Some(v) = self.lru.peek_mut(path) {
            let before = v.weight();
            f(v);
            self.weight = self.weight - before + v.weight();
            self.evict();
        }
    }

    pub(super) fn remove(&mut self, path: &[u8]) -> Option<V> {
        let v = self.lru.pop(path)?;
        self.order.remove(path);
        self.weight -= v.weight();
        Some(v)
    }

    /// Removes `dir` and everything below it; returns how many values went.
    pub(super) fn remove_subtree(&mut self, dir: &RelPath) -> usize {
        let Some((lo, hi)) = dir.descendant_bounds() else {
            let n = self.lru.len();
            self.clear();
            return n;
        };
        let below: Vec<RelPath> = self
            .order
            .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
            .cloned()
            .collect();
        let mut n = usize::from(self.remove(dir.as_bytes()).is_some());
        for p in below {
            n += usize::from(self.remove(p.as_bytes()).is_some());
        }
        n
    }

    pub(super) fn clear(&mut self) {
        self.lru.clear();
        self.order.clear();
        self.weight = 0;
    }

    pub(super) fn len(&self) -> usize {
        self.lru.len()
    }

    pub(super) fn weight(&self) -> usize {
        self.weight
    }

    /// Values evicted to stay within the bound since creation (removals do not count).
    pub(super) fn evicted(&self) -> u64 {
        self.evicted
    }

    fn evict(&mut self) {
        while self.weight > self.max_weight {
            let Some((p, v)) = self.lru.pop_lru() else { break };
            self.order.remove(&p);
            self.weight -= v.weight();
            self.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct W(usize);
    impl Weigh for W {
        fn weight(&self) -> usize {
            self.0
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn evicts_least_recently_used_by_weight() {
        let mut c = PathLru::new(10);
        c.insert(p("a"), W(4));
        c.insert(p("b"), W(4));
        c.promote(&p("a"));
        c.insert(p("c"), W(4));
        assert!(c.peek(&p("a")).is_some() && c.peek(&p("c")).is_some());
        assert!(c.peek(&p("b")).is_none());
        assert_eq!((c.weight(), c.evicted()), (8, 1));
        c.insert(p("a"), W(11));
        assert!(c.peek(&p("a")).is_none(), "too heavy: not stored, and the old value is gone");
        assert_eq!((c.len(), c.weight(), c.evicted()), (1, 4, 2));
        c.insert(p("d"), W(4));
        c.update(&p("d"), |w| w.0 = 9);
        assert_eq!(c.len(), 1, "re-weighing evicts too");
        assert!(c.peek(&p("d")).is_some());
    }

    #[test]
    fn replacing_keeps_the_weight_right() {
        let mut c = PathLru::new(100);
        c.insert(p("a"), W(5));
        c.insert(p("a"), W(7));
        assert_eq!((c.len(), c.weight()), (1, 7));
        assert_eq!(c.remove(b"a").map(|w| w.0), Some(7));
        assert_eq!((c.len(), c.weight()), (0, 0));
    }

    #[test]
    fn removes_exactly_a_subtree() {
        let mut c = PathLru::new(100);
        for s in ["a", "a/b", "a/b/c", "a-b", "a0", "ab", "b", "a/\u{ff}"] {
            c.insert(p(s), W(1));
        }
        assert_eq!(c.remove_subtree(&p("a")), 4);
        for s in ["a-b", "a0", "ab", "b"] {
            assert!(c.peek(&p(s)).is_some(), "{s}");
        }
        assert_eq!(c.remove_subtree(&RelPath::root()), 4);
        assert_eq!((c.len(), c.weight()), (0, 0));
    }
}
