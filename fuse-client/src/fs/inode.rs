//! The inode table: which path each kernel node id stands for.
//!
//! fuser reports a node's id as its `st_ino`, so ids are the server's inode numbers wherever
//! the server gives them (devmount-server's full stat): a file keeps its inode number across
//! mounts and git's index stays valid. The root is always id 1 (`FUSE_ROOT_ID`). An inode number
//! that is 0, 1, or already taken by a file of another device gets a synthetic id from a range
//! no ext4/xfs inode reaches (bit 63 set); so does every file of a server without inode numbers
//! (plain SFTP v3), keyed by path so it is stable while the mount lives.
//!
//! A node holds every name it is known by: a hard-linked file seen under a second name keeps
//! the first, so unlinking one name leaves the file reachable by the other. Requests by id use
//! the name seen last. Renames move a name and everything below it; an unlink drops one name,
//! and a `forget` to zero drops the node.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use crate::cache::RelPath;

pub const ROOT_ID: u64 = 1;
const SYNTHETIC: u64 = 1 << 63;

#[derive(Debug)]
struct Node {
    /// The names of the node, the one seen last at the end; empty once every name is gone
    /// (unlinked, or replaced in the pod).
    names: Vec<RelPath>,
    /// The server's (device, inode) of the file, 0 when the server gives none.
    dev: u64,
    ino: u64,
    /// The kernel's lookup count (entries it holds); the root is never forgotten.
    lookups: u64,
}

/// Maps node ids to paths and back.
#[derive(Debug)]
pub struct Nodes {
    by_id: HashMap<u64, Node>,
    /// Path order, so a directory's descendants are one range (`dir/` .. `dir0`).
    by_path: BTreeMap<RelPath, u64>,
    next_synthetic: u64,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes::new()
    }
}

impl Nodes {
    pub fn new() -> Nodes {
        let mut nodes = Nodes { by_id: HashMap::new(), by_path: BTreeMap::new(), next_synthetic: SYNTHETIC };
        nodes.by_id.insert(ROOT_ID, Node { names: vec![RelPath::root()], dev: 0, ino: 0, lookups: 1 });
        nodes.by_path.insert(RelPath::root(), ROOT_ID);
        nodes
    }

    /// The path `id` stands for; `None` if unknown or its name is gone.
    pub fn path(&self, id: u64) -> Option<RelPath> {
        self.by_id.get(&id).and_then(|n| n.names.last().cloned())
    }

    /// Whether the kernel may still use `id` (known, named or not).
    #[cfg(test)]
    fn contains(&self, id: u64) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn id_of(&self, path: &RelPath) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// [`Nodes::id_for`], counting one reference the kernel takes to the node. One step under
    /// the table's lock: a `forget` of the node's previous reference handled between finding
    /// the id and counting would drop the node the kernel is about to be given.
    pub fn lookup(&mut self, path: &RelPath, dev: u64, ino: u64) -> u64 {
        let id = self.id_for(path, dev, ino);
        self.looked_up(id);
        id
    }

    /// The id for `path` whose stat says (`dev`, `ino`); `ino` 0 means the server gave none.
    /// Does not count a lookup: [`Nodes::lookup`] does.
    pub fn id_for(&mut self, path: &RelPath, dev: u64, ino: u64) -> u64 {
        if path.is_root() {
            return ROOT_ID;
        }
        if let Some(&id) = self.by_path.get(path) {
            let node = &self.by_id[&id];
            if ino == 0 || (node.ino == ino && node.dev == dev) {
                return id;
            }
            if node.ino == 0 {
                // Made here; the server has it now and tells its inode number. The kernel
                // keeps the id it was given.
                let node = self.by_id.get_mut(&id).expect("present");
                node.ino = ino;
                node.dev = dev;
                return id;
            }
            // The name now holds another file (replaced in the pod): the old node keeps
            // serving open handles by id but loses the name.
            self.by_path.remove(path);
            if let Some(old) = self.by_id.get_mut(&id) {
                old.names.retain(|n| n != path);
            }
        }
        let id = match self.by_id.get(&ino) {
            _ if ino == 0 || ino == ROOT_ID || ino >= SYNTHETIC => self.synthetic(),
            Some(node) if node.dev != dev => self.synthetic(),
            _ => ino,
        };
        match self.by_id.get_mut(&id) {
            // Another name of a hard-linked file (or the file renamed where no event said so:
            // the old name goes when a request by it finds nothing).
            Some(node) => node.names.push(path.clone()),
            None => {
                self.by_id.insert(id, Node { names: vec![path.clone()], dev, ino, lookups: 0 });
            }
        }
        self.by_path.insert(path.clone(), id);
        id
    }

    fn synthetic(&mut self) -> u64 {
        let id = self.next_synthetic;
        self.next_synthetic += 1;
        id
    }

    /// The kernel now holds one more reference to `id`.
    fn looked_up(&mut self, id: u64) {
        if let Some(node) = self.by_id.get_mut(&id) {
            node.lookups += 1;
        }
    }

    /// The kernel dropped `n` references to `id`; at zero the node is forgotten.
    pub fn forget(&mut self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let Some(node) = self.by_id.get_mut(&id) else { return };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let node = self.by_id.remove(&id).expect("present");
            for path in node.names {
                if self.by_path.get(&path) == Some(&id) {
                    self.by_path.remove(&path);
                }
            }
        }
    }

    /// `path` no longer names anything: its node loses that name, and the nodes below it
    /// theirs. They stay until forgotten, so open files keep working by id.
    pub fn unlink(&mut self, path: &RelPath) {
        for (p, id) in self.take_subtree(path) {
            if let Some(node) = self.by_id.get_mut(&id) {
                node.names.retain(|n| *n != p);
            }
        }
    }

    /// `from` was renamed to `to`: the node and everything below move; whatever `to` named
    /// before loses its name.
    pub fn rename(&mut self, from: &RelPath, to: &RelPath) {
        self.unlink(to);
        for (p, id) in self.take_subtree(from) {
            let Some(new) = p.rebase(from, to) else { continue };
            if let Some(node) = self.by_id.get_mut(&id) {
                node.names.retain(|n| *n != p);
                node.names.push(new.clone());
            }
            self.by_path.insert(new, id);
        }
    }

    /// Removes and returns `path` and every path below it from the path index.
    fn take_subtree(&mut self, path: &RelPath) -> Vec<(RelPath, u64)> {
        let mut out = Vec::new();
        if let Some(id) = self.by_path.remove(path) {
            out.push((path.clone(), id));
        }
        if path.is_root() {
            return out;
        }
        let mut lo = path.as_bytes().to_vec();
        lo.push(b'/');
        let mut hi = path.as_bytes().to_vec();
        hi.push(b'/' + 1);
        let keys: Vec<RelPath> = self
            .by_path
            .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let id = self.by_path.remove(&k).expect("present");
            out.push((k, id));
        }
        out
    }

    /// Every node id the kernel may hold.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_id.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn server_inode_numbers_are_node_ids() {
        let mut n = Nodes::new();
        assert_eq!(n.id_for(&RelPath::root(), 5, 2), ROOT_ID);
        assert_eq!(n.id_for(&p("a"), 5, 1234), 1234);
        assert_eq!(n.id_for(&p("a"), 5, 1234), 1234);
        assert_eq!(n.path(1234), Some(p("a")));
        // Same number on another device: synthetic.
        let other = n.id_for(&p("mnt/x"), 6, 1234);
        assert!(other >= SYNTHETIC);
        // No inode numbers: synthetic and stable per path.
        let s = n.id_for(&p("b"), 0, 0);
        assert_eq!(n.id_for(&p("b"), 0, 0), s);
    }

    #[test]
    fn rename_moves_descendants_and_unlink_detaches() {
        let mut n = Nodes::new();
        n.id_for(&p("d"), 1, 10);
        n.id_for(&p("d/f"), 1, 11);
        n.id_for(&p("d/e/g"), 1, 12);
        n.id_for(&p("d0"), 1, 13);
        n.rename(&p("d"), &p("x"));
        assert_eq!(n.path(11), Some(p("x/f")));
        assert_eq!(n.path(12), Some(p("x/e/g")));
        assert_eq!(n.path(13), Some(p("d0")));
        assert_eq!(n.id_of(&p("d/f")), None);
        n.unlink(&p("x"));
        assert_eq!(n.id_of(&p("x/f")), None);
        assert!(n.contains(11) && n.path(11).is_none(), "kept for open handles until forgotten");
    }

    #[test]
    fn forget_to_zero_drops_the_node() {
        let mut n = Nodes::new();
        let id = n.id_for(&p("a"), 1, 50);
        n.looked_up(id);
        n.looked_up(id);
        n.forget(id, 1);
        assert_eq!(n.path(id), Some(p("a")));
        n.forget(id, 1);
        assert_eq!(n.path(id), None);
        assert_eq!(n.id_of(&p("a")), None);
        n.forget(ROOT_ID, 10);
        assert_eq!(n.path(ROOT_ID), Some(RelPath::root()));
    }

    #[test]
    fn a_forget_of_the_previous_reference_keeps_a_node_looked_up_again() {
        let mut n = Nodes::new();
        let id = n.lookup(&p("dir"), 0, 0);
        // The kernel evicted its inode and looks the name up again before the forget arrives.
        assert_eq!(n.lookup(&p("dir"), 0, 0), id);
        n.forget(id, 1);
        assert_eq!(n.path(id), Some(p("dir")), "the kernel holds the node it was given again");
        n.forget(id, 1);
        assert_eq!(n.path(id), None);
    }

    #[test]
    fn a_hard_link_keeps_both_names() {
        let mut n = Nodes::new();
        let id = n.id_for(&p("objects/tmp_1"), 1, 70);
        assert_eq!(n.id_for(&p("objects/ab/cd"), 1, 70), id);
        assert_eq!(n.path(id), Some(p("objects/ab/cd")), "requests by id use the name seen last");
        n.unlink(&p("objects/tmp_1"));
        assert_eq!(n.path(id), Some(p("objects/ab/cd")));
        assert_eq!(n.id_of(&p("objects/ab/cd")), Some(id));
        n.rename(&p("objects/ab/cd"), &p("objects/ab/ef"));
        assert_eq!(n.path(id), Some(p("objects/ab/ef")));
        n.unlink(&p("objects/ab/ef"));
        assert_eq!(n.path(id), None);
    }

    #[test]
    fn a_replaced_file_gets_the_new_inode() {
        let mut n = Nodes::new();
        let old = n.id_for(&p("a"), 1, 50);
        n.looked_up(old);
        let new = n.id_for(&p("a"), 1, 51);
        assert_eq!(new, 51);
        assert_eq!(n.id_of(&p("a")), Some(51));
        assert!(n.contains(old) && n.path(old).is_none(), "the old node stays for open handles");
    }
}
