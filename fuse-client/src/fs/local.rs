//! What the mount shows that the server does not have yet: the names and attributes changed by
//! journaled ops the server has not acknowledged.
//!
//! An entry answers for its path until every op that touched it is resolved (acknowledged or
//! rejected); then it goes, and the server (through the cache) answers again. A removed name is
//! an entry too (`stat: None`), so a lookup does not find on the server what was deleted here.
//! No I/O, no clock.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use devmount_server::proto::stat::FullStat;

use crate::cache::{FileKind, RelPath};
use crate::journal::Seq;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEntry {
    /// `None`: removed here.
    pub stat: Option<FullStat>,
    /// The newest op that touched the path.
    pub seq: Seq,
    /// The file's contents are on the server under another name until this rename resolves.
    pub renamed: Option<Seq>,
    /// The path was made here by this op: the server has no such name until it resolves.
    pub made: Option<Seq>,
}

#[derive(Debug, Default)]
pub struct Local {
    entries: BTreeMap<RelPath, LocalEntry>,
}

impl Local {
    pub fn get(&self, path: &RelPath) -> Option<LocalEntry> {
        self.entries.get(path).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `path` as `stat` (or removed) as of op `seq`, keeping pending rename and make
    /// marks.
    pub fn set(&mut self, path: &RelPath, stat: Option<FullStat>, seq: Seq) {
        let old = self.entries.get(path).filter(|_| stat.is_some());
        let (renamed, made) = old.map_or((None, None), |e| (e.renamed, e.made));
        self.entries.insert(path.clone(), LocalEntry { stat, seq, renamed, made });
    }

    /// `path` was made as `stat` by op `seq` (create, mkdir, mknod, symlink).
    pub fn make(&mut self, path: &RelPath, stat: FullStat, seq: Seq) {
        self.entries
            .insert(path.clone(), LocalEntry { stat: Some(stat), seq, renamed: None, made: Some(seq) });
    }

    /// `from` (a file, symlink or special file) was renamed over `to` by op `seq`.
    pub fn rename(&mut self, from: &RelPath, to: &RelPath, stat: FullStat, seq: Seq) {
        let renamed = Some(self.entries.get(from).and_then(|e| e.renamed).unwrap_or(seq));
        self.entries.insert(from.clone(), LocalEntry { stat: None, seq, renamed: None, made: None });
        self.entries.insert(to.clone(), LocalEntry { stat: Some(stat), seq, renamed, made: None });
    }

    /// `to` was made a hard link of a file by op `seq`: the file's contents reach the server
    /// under `to` once that op resolves.
    pub fn link(&mut self, to: &RelPath, stat: FullStat, seq: Seq) {
        self.entries.insert(to.clone(), LocalEntry { stat: Some(stat), seq, renamed: Some(seq), made: None });
    }

    /// The names directly in `dir` that differ from the server: added (`Some(kind)`) or
    /// removed (`None`).
    pub fn children(&self, dir: &RelPath) -> Vec<(Bytes, Option<FileKind>)> {
        let mut lo = dir.as_bytes().to_vec();
        if !dir.is_root() {
            lo.push(b'/');
        }
        let skip = lo.len();
        let mut out = Vec::new();
        for (path, e) in self.entries.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Unbounded)) {
            let p = path.as_bytes();
            if !p.starts_with(&lo) {
                break;
            }
            let name = &p[skip..];
            if name.is_empty() || name.contains(&b'/') {
                continue;
            }
            let kind = e.stat.and_then(|s| FileKind::from_mode(s.mode));
            out.push((Bytes::copy_from_slice(name), kind));
        }
        out
    }

    /// The oldest op an entry waits for.
    pub fn oldest(&self) -> Option<Seq> {
        self.entries.values().map(|e| e.seq).min()
    }

    /// Every op up to `upto` is resolved: drops the entries they were the last to touch and
    /// returns their paths.
    pub fn resolved(&mut self, upto: Seq) -> Vec<RelPath> {
        let done: Vec<RelPath> =
            self.entries.iter().filter(|(_, e)| e.seq <= upto).map(|(p, _)| p.clone()).collect();
        for p in &done {
            self.entries.remove(p);
        }
        for e in self.entries.values_mut() {
            if e.renamed.is_some_and(|r| r <= upto) {
                e.renamed = None;
            }
            if e.made.is_some_and(|m| m <= upto) {
                e.made = None;
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    fn file() -> FullStat {
        FullStat { mode: libc::S_IFREG | 0o644, ..FullStat::default() }
    }

    #[test]
    fn children_lists_only_direct_names() {
        let mut l = Local::default();
        l.set(&p("d/a"), Some(file()), 1);
        l.set(&p("d/b"), None, 2);
        l.set(&p("d/e/deep"), Some(file()), 3);
        l.set(&p("d0"), Some(file()), 4);
        l.set(&p("top"), Some(file()), 5);
        let names: Vec<_> = l.children(&p("d")).into_iter().map(|(n, k)| (n, k.is_some())).collect();
        assert_eq!(names, vec![(Bytes::from("a"), true), (Bytes::from("b"), false)]);
        let root: Vec<_> = l.children(&RelPath::root()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(root, vec![Bytes::from("d0"), Bytes::from("top")]);
    }

    #[test]
    fn entries_go_once_their_last_op_resolves() {
        let mut l = Local::default();
        l.set(&p("a"), Some(file()), 1);
        l.set(&p("b"), Some(file()), 2);
        l.set(&p("a"), Some(file()), 3);
        assert_eq!(l.oldest(), Some(2));
        assert_eq!(l.resolved(2), vec![p("b")]);
        assert!(l.get(&p("a")).is_some());
        assert_eq!(l.resolved(3), vec![p("a")]);
        assert!(l.is_empty());
    }

    #[test]
    fn a_rename_marks_where_the_contents_are() {
        let mut l = Local::default();
        l.rename(&p("a"), &p("b"), file(), 7);
        assert_eq!(l.get(&p("a")).unwrap().stat, None);
        assert_eq!(l.get(&p("b")).unwrap().renamed, Some(7));
        l.set(&p("b"), Some(file()), 8);
        assert_eq!(l.get(&p("b")).unwrap().renamed, Some(7), "a later write keeps the mark");
        l.resolved(7);
        assert_eq!(l.get(&p("b")).unwrap().renamed, None);
    }

    #[test]
    fn a_made_path_is_marked_until_its_making_op_resolves() {
        let mut l = Local::default();
        l.make(&p("d"), file(), 4);
        l.set(&p("d"), Some(file()), 5);
        assert_eq!(l.get(&p("d")).unwrap().made, Some(4), "a later change (chmod) keeps the mark");
        l.set(&p("e"), Some(file()), 6);
        assert_eq!(l.get(&p("e")).unwrap().made, None, "a change of the server's path is not a make");
        l.resolved(4);
        assert_eq!(l.get(&p("d")).unwrap().made, None);
        l.make(&p("f"), file(), 7);
        l.set(&p("f"), None, 8);
        l.set(&p("f"), Some(file()), 9);
        assert_eq!(l.get(&p("f")).unwrap().made, None, "a removal ends the mark");
    }
}
