//! One coalescing window: the changes seen since the last flush, merged where that loses
//! nothing.
//!
//! Rules:
//! - A change merges only into the latest change of the *same path*, so the changes of one
//!   path never change order. Created absorbs later Modified/Attrib/Created; Modified absorbs
//!   Attrib; Attrib followed by Modified becomes Modified. Stats are taken at flush, so a
//!   merged change loses no state.
//! - A delete is never dropped. It supersedes the Created/Modified/Attrib before it (the path
//!   is gone; there is nothing left to refresh).
//! - Renames and directory deletes change what paths mean, so nothing merges across them
//!   (the *epoch*): a change after one never merges into a change before it.
//! - `MOVED_FROM` holds a place until its `MOVED_TO` (same cookie) turns it into one rename at
//!   that place; left unpaired at the end of the window, it was a move out of the root and
//!   becomes a delete.
//! - A merged change is the connection's own only if every change merged into it was.

use std::collections::HashMap;

use bytes::Bytes;

use super::tree::Wd;

/// A change ready to be stat'ed and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Created(Bytes),
    Modified(Bytes),
    Attrib(Bytes),
    Deleted(Bytes),
    Renamed { from: Bytes, to: Bytes },
}

/// What a `MOVED_FROM` leaves behind until its `MOVED_TO` arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Move {
    pub from: Bytes,
    pub dir: bool,
    /// The watch of the moved directory, detached from the tree meanwhile.
    pub wd: Option<Wd>,
}

#[derive(Debug)]
enum Slot {
    Op(Op),
    MoveFrom(Move),
}

struct Entry {
    slot: Slot,
    own: Vec<u64>,
    epoch: u64,
}

/// Connections owning every merged change: keep those in both.
fn intersect(own: &mut Vec<u64>, other: &[u64]) {
    own.retain(|c| other.contains(c));
}

#[derive(Default)]
pub(super) struct Coalescer {
    entries: Vec<Option<Entry>>,
    /// The latest entry of each path.
    last: HashMap<Bytes, usize>,
    /// Pending `MOVED_FROM` entries by cookie.
    moves: HashMap<u32, usize>,
    epoch: u64,
}

impl Coalescer {
    fn push(&mut self, slot: Slot, own: Vec<u64>, paths: &[&Bytes]) -> usize {
        let i = self.entries.len();
        self.entries.push(Some(Entry { slot, own, epoch: self.epoch }));
        for p in paths {
            self.last.insert((*p).clone(), i);
        }
        i
    }

    /// The latest entry of `path` if a simple change may still merge into it.
    fn mergeable(&mut self, path: &[u8]) -> Option<&mut Entry> {
        let i = *self.last.get(path)?;
        let epoch = self.epoch;
        self.entries[i].as_mut().filter(|e| {
            e.epoch == epoch && matches!(e.slot, Slot::Op(Op::Created(_) | Op::Modified(_) | Op::Attrib(_)))
        })
    }

    pub fn created(&mut self, path: Bytes, own: Vec<u64>) {
        if let Some(e) = self.mergeable(&path) {
            if matches!(e.slot, Slot::Op(Op::Created(_))) {
                intersect(&mut e.own, &own);
                return;
            }
        }
        self.push(Slot::Op(Op::Created(path.clone())), own, &[&path]);
    }

    pub fn modified(&mut self, path: Bytes, own: Vec<u64>) {
        if let Some(e) = self.mergeable(&path) {
            if let Slot::Op(Op::Attrib(p)) = &e.slot {
                e.slot = Slot::Op(Op::Modified(p.clone()));
            }
            intersect(&mut e.own, &own);
            return;
        }
        self.push(Slot::Op(Op::Modified(path.clone())), own, &[&path]);
    }

    pub fn attrib(&mut self, path: Bytes, own: Vec<u64>) {
        if let Some(e) = self.mergeable(&path) {
            intersect(&mut e.own, &own);
            return;
        }
        self.push(Slot::Op(Op::Attrib(path.clone())), own, &[&path]);
    }

    pub fn deleted(&mut self, path: Bytes, dir: bool, own: Vec<u64>) {
        if self.mergeable(&path).is_some() {
            let i = self.last[&path];
            self.entries[i] = None;
        }
        self.push(Slot::Op(Op::Deleted(path.clone())), own, &[&path]);
        if dir {
            self.epoch += 1;
        }
    }

    pub fn move_from(&mut self, cookie: u32, mv: Move, own: Vec<u64>) {
        let from = mv.from.clone();
        let i = self.push(Slot::MoveFrom(mv), own, &[&from]);
        self.moves.insert(cookie, i);
        self.epoch += 1;
    }

    /// Pairs a `MOVED_TO` with its `MOVED_FROM`, turning it into a rename in the place of the
    /// `MOVED_FROM`. `None` if there is no such `MOVED_FROM` (a move into the root).
    pub fn move_to(&mut self, cookie: u32, to: Bytes, own: Vec<u64>) -> Option<Move> {
        let i = self.moves.remove(&cookie)?;
        let e = self.entries[i].as_mut().expect("a pending move is never superseded");
        let Slot::MoveFrom(mv) = &e.slot else { unreachable!("moves only index MoveFrom slots") };
        let mv = mv.clone();
        e.slot = Slot::Op(Op::Renamed { from: mv.from.clone(), to: to.clone() });
        intersect(&mut e.own, &own);
        self.last.insert(to, i);
        self.epoch += 1;
        Some(mv)
    }

    /// Ends the window: the changes in order, and the moves that found no partner (now
    /// deletes) so the caller can drop their watches.
    pub fn finish(&mut self) -> (Vec<(Op, Vec<u64>)>, Vec<Move>) {
        self.moves.clear();
        self.last.clear();
        let mut unpaired = Vec::new();
        let ops = self
            .entries
            .drain(..)
            .flatten()
            .map(|e| match e.slot {
                Slot::Op(op) => (op, e.own),
                Slot::MoveFrom(mv) => {
                    let op = Op::Deleted(mv.from.clone());
                    unpaired.push(mv);
                    (op, e.own)
                }
            })
            .collect();
        (ops, unpaired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn ops(c: &mut Coalescer) -> Vec<Op> {
        c.finish().0.into_iter().map(|(op, _)| op).collect()
    }

    #[test]
    fn repeated_changes_of_a_path_merge_in_place() {
        let mut c = Coalescer::default();
        c.modified(b("a"), vec![]);
        c.attrib(b("b"), vec![]);
        c.modified(b("a"), vec![]);
        c.modified(b("b"), vec![]);
        c.created(b("n"), vec![]);
        c.modified(b("n"), vec![]);
        c.attrib(b("n"), vec![]);
        c.created(b("n"), vec![]);
        assert_eq!(ops(&mut c), vec![Op::Modified(b("a")), Op::Modified(b("b")), Op::Created(b("n"))]);
        assert_eq!(ops(&mut c), vec![], "finish empties the window");
    }

    #[test]
    fn deletes_are_kept_and_supersede() {
        let mut c = Coalescer::default();
        c.created(b("a"), vec![]);
        c.modified(b("a"), vec![]);
        c.deleted(b("a"), false, vec![]);
        c.created(b("a"), vec![]);
        c.deleted(b("a"), false, vec![]);
        c.deleted(b("a"), false, vec![]);
        assert_eq!(ops(&mut c), vec![Op::Deleted(b("a")), Op::Deleted(b("a")), Op::Deleted(b("a"))]);
    }

    #[test]
    fn nothing_merges_across_a_rename() {
        let mut c = Coalescer::default();
        c.modified(b("d/x"), vec![]);
        c.move_from(1, Move { from: b("d"), dir: true, wd: Some(3) }, vec![]);
        let mv = c.move_to(1, b("e"), vec![]).unwrap();
        assert_eq!(mv, Move { from: b("d"), dir: true, wd: Some(3) });
        c.modified(b("d/x"), vec![]);
        c.modified(b("e/x"), vec![]);
        assert_eq!(
            ops(&mut c),
            vec![
                Op::Modified(b("d/x")),
                Op::Renamed { from: b("d"), to: b("e") },
                Op::Modified(b("d/x")),
                Op::Modified(b("e/x")),
            ]
        );
    }

    #[test]
    fn unpaired_moves_become_deletes_and_unknown_cookies_creates() {
        let mut c = Coalescer::default();
        c.move_from(5, Move { from: b("out"), dir: true, wd: Some(9) }, vec![]);
        assert_eq!(c.move_to(6, b("in"), vec![]), None);
        c.created(b("in"), vec![]);
        let (ops, unpaired) = c.finish();
        let ops: Vec<Op> = ops.into_iter().map(|(op, _)| op).collect();
        assert_eq!(ops, vec![Op::Deleted(b("out")), Op::Created(b("in"))]);
        assert_eq!(unpaired, vec![Move { from: b("out"), dir: true, wd: Some(9) }]);
        assert!(c.finish().1.is_empty(), "the unpaired move is given up on once");
    }

    #[test]
    fn merged_changes_are_own_only_if_all_were() {
        let mut c = Coalescer::default();
        c.modified(b("a"), vec![7, 8]);
        c.modified(b("a"), vec![7]);
        c.modified(b("b"), vec![7]);
        c.attrib(b("b"), vec![]);
        c.move_from(1, Move { from: b("x"), dir: false, wd: None }, vec![7]);
        c.move_to(1, b("y"), vec![7, 8]);
        let (ops, _) = c.finish();
        let own: Vec<Vec<u64>> = ops.into_iter().map(|(_, own)| own).collect();
        assert_eq!(own, vec![vec![7], vec![], vec![7]]);
    }
}
