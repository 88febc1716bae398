//! The watched directories as a tree of inotify watch descriptors.
//!
//! Each watched directory is a node keyed by its watch descriptor and holds its parent and its
//! own name, never its full path: a directory rename re-parents one node and every descendant
//! follows for free. A node without a parent (other than the root) is *detached*: it is in
//! flight between a `MOVED_FROM` and its `MOVED_TO`, and events from it have no path.
//!
//! The tree does no I/O. Whatever it drops is handed back so the caller can remove the watches.

use std::collections::HashMap;

use bytes::Bytes;

/// A watch descriptor's number, as inotify reports it.
pub(super) type Wd = i32;

/// The tree disagrees with the file system (the parent is unknown, or the node would become
/// its own ancestor) and needs a fresh walk.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Stale;

struct Node<H> {
    handle: H,
    parent: Option<Wd>,
    name: Bytes,
    children: HashMap<Bytes, Wd>,
}

pub(super) struct Tree<H> {
    nodes: HashMap<Wd, Node<H>>,
    root: Wd,
}

/// `dir/name`, or `name` when `dir` is the root.
pub(super) fn join(dir: &[u8], name: &[u8]) -> Bytes {
    if dir.is_empty() {
        return Bytes::copy_from_slice(name);
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p.into()
}

/// Whether `path` is `dir` or lies below it.
pub(super) fn is_under(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || (path.starts_with(dir) && matches!(path.get(dir.len()), None | Some(b'/')))
}

impl<H> Tree<H> {
    pub fn new(root: Wd, handle: H) -> Self {
        let node = Node { handle, parent: None, name: Bytes::new(), children: HashMap::new() };
        Tree { nodes: HashMap::from([(root, node)]), root }
    }

    pub fn root(&self) -> Wd {
        self.root
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn contains(&self, wd: Wd) -> bool {
        self.nodes.contains_key(&wd)
    }

    pub fn child(&self, parent: Wd, name: &[u8]) -> Option<Wd> {
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    /// The path of a watched directory relative to the root; `None` if the node is unknown or
    /// detached (or hangs below a detached one).
    pub fn path(&self, wd: Wd) -> Option<Bytes> {
        if !self.nodes.contains_key(&wd) {
            return None;
        }
        let mut names = Vec::new();
        let mut cur = wd;
        while cur != self.root {
            // A chain longer than the tree can only be a cycle; `attach` prevents them.
            if names.len() > self.nodes.len() {
                return None;
            }
            let node = self.nodes.get(&cur)?;
            names.push(&node.name);
            cur = node.parent?;
        }
        let len = names.iter().map(|n| n.len() + 1).sum::<usize>().saturating_sub(1);
        let mut p = Vec::with_capacity(len);
        for (i, n) in names.iter().rev().enumerate() {
            if i > 0 {
                p.push(b'/');
            }
            p.extend_from_slice(n);
        }
        Some(p.into())
    }

    /// Records that directory `wd` lives at `parent/name`, moving it there if it was known
    /// elsewhere (a rename) and replacing any other node at that name, whose subtree is
    /// returned. A new node needs its `handle`; a known one keeps its own.
    pub fn attach(&mut self, parent: Wd, name: Bytes, wd: Wd, handle: Option<H>) -> Result<Vec<H>, Stale> {
        let known = self.nodes.contains_key(&wd);
        if wd == self.root
            || !self.nodes.contains_key(&parent)
            || self.is_ancestor(wd, parent)
            || (!known && handle.is_none())
        {
            return Err(Stale);
        }
        self.detach(wd);
        let mut dropped = Vec::new();
        if let Some(other) = self.child(parent, &name) {
            dropped = self.remove_subtree(other);
        }
        if let Some(handle) = handle.filter(|_| !known) {
            self.nodes
                .insert(wd, Node { handle, parent: None, name: Bytes::new(), children: HashMap::new() });
        }
        let node = self.nodes.get_mut(&wd).expect("inserted or known");
        node.parent = Some(parent);
        node.name = name.clone();
        self.nodes.get_mut(&parent).expect("checked above").children.insert(name, wd);
        Ok(dropped)
    }

    /// Whether `a` is `b` or an ancestor of `b`.
    fn is_ancestor(&self, a: Wd, b: Wd) -> bool {
        let mut cur = Some(b);
        let mut steps = 0;
        while let Some(c) = cur {
            if c == a {
                return true;
            }
            steps += 1;
            if steps > self.nodes.len() {
                return true;
            }
            cur = self.nodes.get(&c).and_then(|n| n.parent);
        }
        false
    }

    /// Cuts `wd` from its parent; it and its subtree keep their watches but have no path.
    pub fn detach(&mut self, wd: Wd) {
        let Some(node) = self.nodes.get_mut(&wd) else { return };
        let Some(parent) = node.parent.take() else { return };
        let name = node.name.clone();
        if let Some(p) = self.nodes.get_mut(&parent) {
            if p.children.get(&name) == Some(&wd) {
                p.children.remove(&name);
            }
        }
    }

    /// Forgets `wd` and everything below it, returning their handles. The root is never
    /// removed this way (see [`Tree::clear`]).
    pub fn remove_subtree(&mut self, wd: Wd) -> Vec<H> {
        if wd == self.root {
            return Vec::new();
        }
        self.detach(wd);
        let mut dropped = Vec::new();
        let mut stack = vec![wd];
        while let Some(w) = stack.pop() {
            if let Some(node) = self.nodes.remove(&w) {
                stack.extend(node.children.into_values());
                dropped.push(node.handle);
            }
        }
        dropped
    }

    /// Forgets every node, the root included, returning their handles.
    pub fn clear(&mut self) -> Vec<H> {
        self.nodes.drain().map(|(_, n)| n.handle).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn tree() -> Tree<Wd> {
        // root(1) / a(2) / b(3) / c(4), root / x(5)
        let mut t = Tree::new(1, 1);
        t.attach(1, b("a"), 2, Some(2)).unwrap();
        t.attach(2, b("b"), 3, Some(3)).unwrap();
        t.attach(3, b("c"), 4, Some(4)).unwrap();
        t.attach(1, b("x"), 5, Some(5)).unwrap();
        t
    }

    #[test]
    fn paths_follow_renames() {
        let mut t = tree();
        assert_eq!(t.path(1).unwrap(), b(""));
        assert_eq!(t.path(4).unwrap(), b("a/b/c"));
        t.detach(3);
        assert_eq!(t.path(4), None, "detached subtree has no path");
        assert_eq!(t.attach(5, b("moved"), 3, None), Ok(vec![]));
        assert_eq!(t.path(4).unwrap(), b("x/moved/c"));
        assert_eq!(t.child(2, b"b"), None);
        assert_eq!(t.child(5, b"moved"), Some(3));
    }

    #[test]
    fn attach_over_an_existing_name_drops_the_old_subtree() {
        let mut t = tree();
        let mut dropped = t.attach(1, b("a"), 9, Some(9)).unwrap();
        dropped.sort();
        assert_eq!(dropped, vec![2, 3, 4]);
        assert_eq!(t.path(9).unwrap(), b("a"));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn stale_attachments_are_refused() {
        let mut t = tree();
        assert_eq!(t.attach(4, b("loop"), 2, None), Err(Stale));
        assert_eq!(t.attach(2, b("self"), 2, None), Err(Stale));
        assert_eq!(t.attach(7, b("orphan"), 8, Some(8)), Err(Stale), "unknown parent");
        assert_eq!(t.attach(1, b("new"), 8, None), Err(Stale), "unknown node without a handle");
        assert_eq!(t.path(4).unwrap(), b("a/b/c"));
    }

    #[test]
    fn removal_and_clear_return_the_handles() {
        let mut t = tree();
        let mut dropped = t.remove_subtree(3);
        dropped.sort();
        assert_eq!(dropped, vec![3, 4]);
        assert_eq!(t.child(2, b"b"), None);
        assert!(t.remove_subtree(1).is_empty(), "the root stays");
        assert_eq!(t.clear().len(), 3);
        assert_eq!(t.path(1), None);
    }

    #[test]
    fn join_and_is_under() {
        assert_eq!(join(b"", b"a"), b("a"));
        assert_eq!(join(b"a/b", b"c"), b("a/b/c"));
        assert!(is_under(b"a/b", b"a"));
        assert!(is_under(b"a", b"a"));
        assert!(is_under(b"a", b""));
        assert!(!is_under(b"ab", b"a"));
        assert!(!is_under(b"a", b"a/b"));
    }
}
