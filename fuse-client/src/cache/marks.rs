//! [`Marks`]: the newest applied invalidation per path, so a reply older than one is refused.

use lru::LruCache;

use super::path::RelPath;

/// Newest feed sequence numbers that invalidated a path.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    /// The path itself changed (its stat, its data, or for a directory its list of names).
    path: u64,
    /// The name changed meaning (created, deleted, renamed): everything below it too.
    subtree: u64,
}

/// A bounded table of marks plus a floor under all of them. A forgotten mark raises the floor
/// to its sequence, so forgetting only ever refuses more: a reply older than the floor is
/// refused for every path. Marks are kept in order of their last update, which is sequence
/// order, so the ones forgotten first are the oldest, and only replies that were already in
/// flight when they were applied could have been older than them.
pub(super) struct Marks {
    map: LruCache<RelPath, Mark>,
    cap: usize,
    floor: u64,
}

impl Marks {
    pub(super) fn new(cap: usize) -> Self {
        Marks { map: LruCache::unbounded(), cap, floor: 0 }
    }

    /// The newest invalidation that a reply about `path` must not be older than: the floor,
    /// the path's own marks, and the subtree marks of its ancestors.
    pub(super) fn newest(&self, path: &RelPath) -> u64 {
        let own = self.map.peek(path).map_or(0, |m| m.path.max(m.subtree));
        path.ancestors()
            .filter_map(|a| self.map.peek(a))
            .map(|m| m.subtree)
            .fold(self.floor.max(own), u64::max)
    }

    /// Notes that `path` (and with `subtree`, everything below it) was invalidated at `seq`.
    pub(super) fn mark(&mut self, path: &RelPath, seq: u64, subtree: bool) {
        let m = self.map.get_or_insert_mut(path.clone(), Mark::default);
        m.path = m.path.max(seq);
        if subtree {
            m.subtree = m.subtree.max(seq);
        }
        while self.map.len() > self.cap {
            let Some((_, old)) = self.map.pop_lru() else { break };
            self.floor = self.floor.max(old.path).max(old.subtree);
        }
    }

    /// Forgets every mark and refuses everything older than `floor` (a resync, a new feed).
    pub(super) fn reset(&mut self, floor: u64) {
        self.map.clear();
        self.floor = floor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn path_marks_stay_on_the_path_and_subtree_marks_reach_down() {
        let mut m = Marks::new(100);
        m.mark(&p("d"), 5, false);
        assert_eq!(m.newest(&p("d")), 5);
        assert_eq!(m.newest(&p("d/x")), 0, "a change of d's names says nothing of d/x");
        m.mark(&p("d/x"), 7, true);
        assert_eq!(m.newest(&p("d/x/y/z")), 7);
        assert_eq!(m.newest(&p("d/xy")), 0);
        assert_eq!(m.newest(&p("d")), 5);
        m.mark(&p("d/x"), 6, false);
        assert_eq!(m.newest(&p("d/x")), 7, "marks never go back");
    }

    #[test]
    fn forgetting_a_mark_raises_the_floor() {
        let mut m = Marks::new(2);
        m.mark(&p("a"), 1, false);
        m.mark(&p("b"), 2, true);
        m.mark(&p("c"), 3, false);
        assert_eq!(m.newest(&p("unrelated")), 1);
        m.mark(&p("d"), 4, false);
        assert_eq!(m.newest(&p("b/x")), 2);
        m.reset(9);
        assert_eq!(m.newest(&p("c")), 9);
        m.mark(&p("c"), 10, false);
        assert_eq!((m.newest(&p("c")), m.newest(&p("b"))), (10, 9));
    }
}
