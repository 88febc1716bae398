//! What the pending (unacknowledged) operations will do to each path: the journal's in-memory
//! index, so reads of dirty files are answered before the server has the data.
//!
//! The index never holds file data: a write's bytes stay in the journal's segment file, and an
//! extent records where ([`DataLoc`]). It does no I/O at all.
//!
//! Content state is kept per *file*, not per path, so that a pending rename or hard link moves
//! or shares it: paths map to file states, and a rename of a directory moves every mapping below
//! it. A file state lives while one of its content operations (create, write, truncate, put,
//! mknod) is unacknowledged. On the server, bytes of a file come from, in order of precedence:
//! the newest pending write covering them; zeros, at or after the lowest pending truncation
//! point (`floor`, 0 for a file created new); else the server's copy.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Bound, Range};

use bytes::Bytes;
use devmount_server::proto::sftp::rename_flags;

use super::op::Op;
use super::{DeferredError, Seq};

/// Where bytes of a pending write live: a segment file and the offset of the first byte in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataLoc {
    pub seg: u64,
    pub off: u64,
}

impl DataLoc {
    fn advance(self, n: u64) -> DataLoc {
        DataLoc { seg: self.seg, off: self.off + n }
    }
}

/// One piece of an overlay: bytes of a pending write, or zeros from a pending truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    Data(DataLoc),
    Zero,
}

/// The size a file will have once its pending operations are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingSize {
    /// Known without the server (a pending truncate, or a file created new).
    Exact(u64),
    /// At least this (the end of the furthest pending write); the server's size if larger.
    AtLeast(u64),
}

impl PendingSize {
    /// The size, given the size the server reports now.
    pub fn resolve(self, server_size: u64) -> u64 {
        match self {
            PendingSize::Exact(n) => n,
            PendingSize::AtLeast(n) => n.max(server_size),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    end: u64,
    seq: Seq,
    loc: DataLoc,
}

#[derive(Debug, Default)]
struct FileState {
    /// Non-overlapping, keyed by start offset.
    extents: BTreeMap<u64, Extent>,
    floor: Option<u64>,
    /// The newest pending op that set `floor`: once the server has it, the bytes below the
    /// size come from the server (and from pending writes), no longer from zeros.
    floor_seq: Option<Seq>,
    size: u64,
    exact: bool,
    /// Unacknowledged content operations on this file.
    pending: u32,
    /// Paths that map to this file (more than one after a pending hard link).
    names: Vec<Bytes>,
}

impl FileState {
    fn write(&mut self, start: u64, end: u64, seq: Seq, loc: DataLoc) {
        if start == end {
            return;
        }
        self.cut(start, end);
        self.extents.insert(start, Extent { end, seq, loc });
        self.size = self.size.max(end);
    }

    fn truncate(&mut self, size: u64, seq: Seq) {
        self.cut(size, u64::MAX);
        self.floor = Some(self.floor.map_or(size, |f| f.min(size)));
        self.floor_seq = Some(seq);
        self.size = size;
        self.exact = true;
    }

    /// Removes `[start, end)` from the extents, splitting those that straddle its edges.
    fn cut(&mut self, start: u64, end: u64) {
        if let Some((&s, e)) = self.extents.range_mut(..start).next_back() {
            if e.end > start {
                let old = *e;
                e.end = start;
                if old.end > end {
                    let rest = Extent { end: old.end, seq: old.seq, loc: old.loc.advance(end - s) };
                    self.extents.insert(end, rest);
                }
            }
        }
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            let e = self.extents.remove(&k).expect("key just listed");
            if e.end > end {
                self.extents.insert(end, Extent { end: e.end, seq: e.seq, loc: e.loc.advance(end - k) });
            }
        }
    }

    /// Drops what the write `seq` put in `range` (it is on the server now).
    fn forget_write(&mut self, seq: Seq, range: Range<u64>) {
        let first = self.extents.range(..range.start).next_back().map_or(range.start, |(&k, _)| k);
        let mine: Vec<u64> =
            self.extents.range(first..range.end).filter(|(_, e)| e.seq == seq).map(|(&k, _)| k).collect();
        for k in mine {
            self.extents.remove(&k);
        }
    }
}

/// What an unacknowledged op holds in the index, to be released by its acknowledgement.
#[derive(Debug)]
struct OpRef {
    names: Vec<Bytes>,
    file: Option<u64>,
    write: Option<Range<u64>>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    next_file: u64,
    paths: BTreeMap<Bytes, u64>,
    files: HashMap<u64, FileState>,
    ops: HashMap<Seq, OpRef>,
    /// How many unacknowledged ops name each path, as they named it.
    names: HashMap<Bytes, u32>,
    /// Errors of rejected ops, by the path their file has now, until someone takes them.
    errors: BTreeMap<Bytes, DeferredError>,
}

impl Index {
    /// Records a newly appended (or replayed) op. `data` is where its data bytes live, for
    /// writes and puts; `data_len` their length (the op itself may come without its data).
    pub fn apply(&mut self, seq: Seq, op: &Op, data: Option<DataLoc>, data_len: u64) {
        let names: Vec<Bytes> = op.paths().cloned().collect();
        for n in &names {
            *self.names.entry(n.clone()).or_default() += 1;
        }
        let mut r = OpRef { names, file: None, write: None };
        match op {
            Op::Create { path, exclusive: true, .. } | Op::Mknod { path, .. } => {
                let id = self.fresh(path);
                self.files.get_mut(&id).expect("fresh file").truncate(0, seq);
                r.file = Some(id);
            }
            Op::Create { path, exclusive: false, .. } => r.file = Some(self.file_for(path)),
            Op::Put { path, .. } => {
                let id = self.fresh(path);
                let st = self.files.get_mut(&id).expect("fresh file");
                st.truncate(0, seq);
                if let Some(loc) = data {
                    st.write(0, data_len, seq, loc);
                }
                r.file = Some(id);
                r.write = Some(0..data_len);
            }
            Op::Write { path, offset, .. } => {
                let id = self.file_for(path);
                let end = offset.saturating_add(data_len);
                if let Some(loc) = data {
                    self.files.get_mut(&id).expect("mapped file").write(*offset, end, seq, loc);
                }
                r.file = Some(id);
                r.write = Some(*offset..end);
            }
            Op::Truncate { path, size, .. } => {
                let id = self.file_for(path);
                self.files.get_mut(&id).expect("mapped file").truncate(*size, seq);
                r.file = Some(id);
            }
            Op::Link { from, to } => {
                if let Some(&id) = self.paths.get(from) {
                    self.unmap(to);
                    self.map(to.clone(), id);
                }
            }
            Op::Unlink { path } => self.unmap(path),
            Op::Rmdir { path } => self.unmap_tree(path),
            Op::Rename { from, to, flags, .. } => {
                if flags & rename_flags::EXCHANGE != 0 {
                    self.exchange(from, to);
                } else {
                    self.rename(from, to);
                }
            }
            Op::SetAttr { .. } | Op::Mkdir { .. } | Op::Symlink { .. } | Op::Fsync { .. } => {}
        }
        if let Some(id) = r.file {
            self.files.get_mut(&id).expect("file of op").pending += 1;
        }
        self.ops.insert(seq, r);
    }

    /// The op `seq` is on the server (or was rejected): release what it held.
    pub fn ack(&mut self, seq: Seq) {
        let Some(r) = self.ops.remove(&seq) else { return };
        for n in r.names {
            if let Some(c) = self.names.get_mut(&n) {
                *c -= 1;
                if *c == 0 {
                    self.names.remove(&n);
                }
            }
        }
        let Some(id) = r.file else { return };
        let Some(st) = self.files.get_mut(&id) else { return };
        if let Some(range) = r.write {
            st.forget_write(seq, range);
        }
        if st.floor_seq.is_some_and(|f| f <= seq) {
            st.floor = None;
            st.floor_seq = None;
        }
        st.pending -= 1;
        if st.pending == 0 {
            let st = self.files.remove(&id).expect("file just seen");
            for n in st.names {
                if self.paths.get(&n) == Some(&id) {
                    self.paths.remove(&n);
                }
            }
        }
    }

    /// The pieces of `[offset, offset + len)` the journal knows, in order; the gaps between
    /// them are the server's bytes. Clipped to the pending size when that is exact.
    pub fn overlay(
        &self,
        path: &[u8],
        offset: u64,
        len: u64,
    ) -> (Vec<(Range<u64>, Piece)>, Option<PendingSize>) {
        let Some(st) = self.paths.get(path).and_then(|id| self.files.get(id)) else {
            return (Vec::new(), None);
        };
        let mut end = offset.saturating_add(len);
        if st.exact {
            end = end.min(st.size);
        }
        let mut out = Vec::new();
        let mut pos = offset;
        let gap = |out: &mut Vec<(Range<u64>, Piece)>, a: u64, b: u64| {
            if let Some(f) = st.floor {
                let z = a.max(f);
                if z < b {
                    out.push((z..b, Piece::Zero));
                }
            }
        };
        if pos < end {
            let first = st.extents.range(..=pos).next_back().map_or(pos, |(&k, _)| k);
            for (&s, e) in st.extents.range(first..end) {
                if e.end <= pos {
                    continue;
                }
                if s > pos {
                    gap(&mut out, pos, s);
                }
                let a = s.max(pos);
                let b = e.end.min(end);
                out.push((a..b, Piece::Data(e.loc.advance(a - s))));
                pos = b;
            }
            if pos < end {
                gap(&mut out, pos, end);
            }
        }
        (out, Some(st.pending_size()))
    }

    pub fn pending_size(&self, path: &[u8]) -> Option<PendingSize> {
        self.paths.get(path).and_then(|id| self.files.get(id)).map(FileState::pending_size)
    }

    /// Whether an unacknowledged op names `path`, or changes the file now at `path`.
    pub fn is_dirty(&self, path: &[u8]) -> bool {
        self.names.contains_key(path) || self.paths.contains_key(path)
    }

    /// Keeps the error of the pending op `seq` until [`Index::take_error`], under the paths its
    /// file has now (a rename appended after the op moved them), else under `path`, the path the
    /// op named. The first error of a path is the one kept.
    pub fn record_error(&mut self, seq: Seq, path: &Bytes, err: DeferredError) {
        let names =
            self.ops.get(&seq).and_then(|r| r.file).and_then(|id| self.files.get(&id)).map(|f| &f.names);
        let names: Vec<Bytes> = match names {
            Some(n) if !n.is_empty() => n.clone(),
            _ => vec![path.clone()],
        };
        for n in names {
            self.errors.entry(n).or_insert_with(|| err.clone());
        }
    }

    pub fn take_error(&mut self, path: &[u8]) -> Option<DeferredError> {
        self.errors.remove(path)
    }

    fn fresh(&mut self, path: &Bytes) -> u64 {
        self.unmap(path);
        let id = self.next_file;
        self.next_file += 1;
        self.files.insert(id, FileState::default());
        self.map(path.clone(), id);
        id
    }

    fn file_for(&mut self, path: &Bytes) -> u64 {
        match self.paths.get(path) {
            Some(&id) => id,
            None => self.fresh(path),
        }
    }

    fn map(&mut self, path: Bytes, id: u64) {
        self.files.get_mut(&id).expect("mapped file").names.push(path.clone());
        self.paths.insert(path, id);
    }

    fn unmap(&mut self, path: &[u8]) {
        if let Some(id) = self.paths.remove(path) {
            if let Some(st) = self.files.get_mut(&id) {
                st.names.retain(|n| n != path);
            }
        }
    }

    /// `path` and every mapped path below it, with their files.
    fn tree(&self, path: &[u8]) -> Vec<(Bytes, u64)> {
        subtree(&self.paths, path).map(|(k, &id)| (k.clone(), id)).collect()
    }

    fn unmap_tree(&mut self, path: &[u8]) {
        for (p, _) in self.tree(path) {
            self.unmap(&p);
        }
        let errs: Vec<Bytes> = self.error_tree(path);
        for p in errs {
            self.errors.remove(&p);
        }
    }

    fn error_tree(&self, path: &[u8]) -> Vec<Bytes> {
        subtree(&self.errors, path).map(|(k, _)| k.clone()).collect()
    }

    fn moved(path: &Bytes, from: &[u8], to: &Bytes) -> Bytes {
        let mut v = Vec::with_capacity(to.len() + path.len() - from.len());
        v.extend_from_slice(to);
        v.extend_from_slice(&path[from.len()..]);
        Bytes::from(v)
    }

    fn rename(&mut self, from: &Bytes, to: &Bytes) {
        if from == to {
            return;
        }
        let files = self.tree(from);
        let errors: Vec<(Bytes, DeferredError)> = self
            .error_tree(from)
            .into_iter()
            .filter_map(|p| self.errors.remove(&p).map(|e| (p, e)))
            .collect();
        self.unmap_tree(to);
        for (p, _) in &files {
            self.unmap(p);
        }
        for (p, id) in files {
            self.map(Self::moved(&p, from, to), id);
        }
        for (p, e) in errors {
            self.errors.insert(Self::moved(&p, from, to), e);
        }
    }

    fn exchange(&mut self, a: &Bytes, b: &Bytes) {
        let fa = self.tree(a);
        let fb = self.tree(b);
        let ea: Vec<(Bytes, DeferredError)> =
            self.error_tree(a).into_iter().filter_map(|p| self.errors.remove(&p).map(|e| (p, e))).collect();
        let eb: Vec<(Bytes, DeferredError)> =
            self.error_tree(b).into_iter().filter_map(|p| self.errors.remove(&p).map(|e| (p, e))).collect();
        for (p, _) in fa.iter().chain(&fb) {
            self.unmap(p);
        }
        for (p, id) in fa {
            self.map(Self::moved(&p, a, b), id);
        }
        for (p, id) in fb {
            self.map(Self::moved(&p, b, a), id);
        }
        for (p, e) in ea {
            self.errors.insert(Self::moved(&p, a, b), e);
        }
        for (p, e) in eb {
            self.errors.insert(Self::moved(&p, b, a), e);
        }
    }
}

/// The entries of `map` at `path` or below it. Below `d` is the key range `d/` up to `d0`
/// (`'0'` follows `'/'`), so `d-x`, which sorts between `d` and `d/`, is not included.
fn subtree<'a, V>(map: &'a BTreeMap<Bytes, V>, path: &[u8]) -> impl Iterator<Item = (&'a Bytes, &'a V)> {
    let own = map.get_key_value(path);
    let below: Box<dyn Iterator<Item = (&'a Bytes, &'a V)>> = if path.is_empty() {
        Box::new(map.iter().filter(|(k, _)| !k.is_empty()))
    } else {
        let lo = [path, b"/"].concat();
        let hi = [path, b"0"].concat();
        Box::new(map.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..]))))
    };
    own.into_iter().chain(below)
}

impl FileState {
    fn pending_size(&self) -> PendingSize {
        if self.exact {
            PendingSize::Exact(self.size)
        } else {
            PendingSize::AtLeast(self.size)
        }
    }
}

#[cfg(test)]
impl Index {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.files.is_empty() && self.ops.is_empty() && self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// An index whose write data lives in one in-memory "segment" (seg 0).
    #[derive(Default)]
    struct Fake {
        index: Index,
        seg: Vec<u8>,
        seq: Seq,
    }

    impl Fake {
        fn op(&mut self, op: Op) -> Seq {
            self.seq += 1;
            let data = op.data();
            let loc = DataLoc { seg: 0, off: self.seg.len() as u64 };
            self.seg.extend_from_slice(data);
            let has_data = matches!(op, Op::Write { .. } | Op::Put { .. });
            self.index.apply(self.seq, &op.without_data(), has_data.then_some(loc), data.len() as u64);
            self.seq
        }

        fn write(&mut self, path: &str, offset: u64, data: &str) -> Seq {
            self.op(Op::Write { path: b(path), offset, data: b(data), cond: None })
        }

        /// The file as the overlay shows it over `server` (the server's content).
        fn read(&self, path: &str, server: &str) -> String {
            let (pieces, size) = self.index.overlay(path.as_bytes(), 0, 1000);
            let size = size.map_or(server.len() as u64, |s| s.resolve(server.len() as u64)) as usize;
            let mut out: Vec<u8> = server.as_bytes().to_vec();
            out.resize(size, b'0');
            for (r, p) in pieces {
                let slot = &mut out[r.start as usize..r.end as usize];
                match p {
                    Piece::Zero => slot.fill(b'0'),
                    Piece::Data(loc) => {
                        slot.copy_from_slice(&self.seg[loc.off as usize..loc.off as usize + slot.len()])
                    }
                }
            }
            String::from_utf8(out).unwrap()
        }
    }

    #[test]
    fn later_writes_win_and_gaps_are_the_servers() {
        let mut f = Fake::default();
        f.write("a", 2, "AAAA");
        f.write("a", 4, "BB");
        f.write("a", 1, "C");
        f.write("a", 5, "DDD");
        assert_eq!(f.read("a", "..........."), ".CAABDDD...");
        assert_eq!(f.index.pending_size(b"a"), Some(PendingSize::AtLeast(8)));
        assert_eq!(f.read("a", "xx"), "xCAABDDD");
        let (pieces, _) = f.index.overlay(b"a", 3, 2);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].0, 3..4);
        assert_eq!(pieces[1].0, 4..5);
        assert!(f.index.overlay(b"b", 0, 10).0.is_empty());
    }

    #[test]
    fn truncate_cuts_and_zero_fills() {
        let mut f = Fake::default();
        f.write("a", 0, "AAAAAA");
        f.op(Op::Truncate { path: b("a"), size: 3, cond: None });
        assert_eq!(f.read("a", "ssssssssss"), "AAA");
        f.op(Op::Truncate { path: b("a"), size: 8, cond: None });
        f.write("a", 6, "B");
        assert_eq!(f.read("a", "ssssssssss"), "AAA000B0");
        assert_eq!(f.index.pending_size(b"a"), Some(PendingSize::Exact(8)));
        f.write("a", 9, "C");
        assert_eq!(f.read("a", "s"), "AAA000B00C");
    }

    #[test]
    fn truncate_below_server_data_keeps_the_server_prefix() {
        let mut f = Fake::default();
        f.op(Op::Truncate { path: b("a"), size: 2, cond: None });
        f.op(Op::Truncate { path: b("a"), size: 4, cond: None });
        assert_eq!(f.read("a", "ssssss"), "ss00");
    }

    #[test]
    fn exclusive_create_and_put_need_no_server() {
        let mut f = Fake::default();
        f.op(Op::Create { path: b("n"), mode: 0o644, exclusive: true });
        f.write("n", 2, "X");
        assert_eq!(f.read("n", "server-junk"), "00X");
        f.op(Op::Put {
            path: b("p"),
            mode: 0o644,
            exclusive: false,
            fsync: false,
            data: b("whole"),
            atime: None,
            mtime: None,
            cond: None,
        });
        assert_eq!(f.read("p", "old content"), "whole");
    }

    #[test]
    fn acks_release_extents_and_files() {
        let mut f = Fake::default();
        let w1 = f.write("a", 0, "AAAA");
        let w2 = f.write("a", 2, "BB");
        f.index.ack(w1);
        assert_eq!(f.read("a", "ssssss"), "ssBBss");
        assert!(f.index.is_dirty(b"a"));
        f.index.ack(w2);
        assert!(!f.index.is_dirty(b"a"));
        assert_eq!(f.index.pending_size(b"a"), None);
        assert!(f.index.is_empty());
    }

    #[test]
    fn ack_of_a_split_write_forgets_every_piece() {
        let mut f = Fake::default();
        let w1 = f.write("a", 0, "AAAAAA");
        let w2 = f.write("a", 2, "B");
        f.index.ack(w1);
        assert_eq!(f.read("a", "ssssss"), "ssBsss");
        f.index.ack(w2);
        assert!(f.index.is_empty());
    }

    #[test]
    fn rename_moves_files_and_subtrees() {
        let mut f = Fake::default();
        f.write("a", 0, "A");
        f.write("d/x", 0, "X");
        f.write("d/sub/y", 0, "Y");
        f.write("dd", 0, "not below d");
        f.write("d-x", 0, "nor this");
        f.write("t", 0, "replaced");
        let r = f.op(Op::Rename { from: b("a"), to: b("t"), flags: 0, cond: None });
        assert_eq!(f.read("t", ""), "A");
        assert!(f.index.overlay(b"a", 0, 10).0.is_empty());
        assert!(f.index.is_dirty(b"a"), "the rename itself still names a");
        f.op(Op::Rename { from: b("d"), to: b("e"), flags: 0, cond: None });
        assert_eq!(f.read("e/x", ""), "X");
        assert_eq!(f.read("e/sub/y", ""), "Y");
        assert_eq!(f.read("dd", ""), "not below d");
        assert_eq!(f.read("d-x", ""), "nor this");
        assert!(f.index.overlay(b"e-x", 0, 1).0.is_empty());
        assert!(f.index.overlay(b"d/x", 0, 10).0.is_empty());
        f.index.ack(r);
        assert_eq!(f.read("t", ""), "A");
    }

    #[test]
    fn exchange_swaps() {
        let mut f = Fake::default();
        f.write("a", 0, "A");
        f.write("b/c", 0, "C");
        f.op(Op::Rename { from: b("a"), to: b("b"), flags: rename_flags::EXCHANGE, cond: None });
        assert_eq!(f.read("b", ""), "A");
        assert_eq!(f.read("a/c", ""), "C");
        assert!(f.index.overlay(b"b/c", 0, 1).0.is_empty());
    }

    #[test]
    fn unlink_and_rmdir_drop_overlays_but_acks_still_balance() {
        let mut f = Fake::default();
        let w = f.write("a", 0, "A");
        let w2 = f.write("d/x", 0, "X");
        let u = f.op(Op::Unlink { path: b("a") });
        let u2 = f.op(Op::Unlink { path: b("d/x") });
        let r = f.op(Op::Rmdir { path: b("d") });
        assert!(f.index.overlay(b"a", 0, 1).0.is_empty());
        f.write("a", 0, "new");
        assert_eq!(f.read("a", "old file"), "new file");
        for s in [w, w2, u, u2, r] {
            f.index.ack(s);
        }
        assert!(f.index.is_dirty(b"a"));
        f.index.ack(6);
        assert!(f.index.is_empty());
    }

    #[test]
    fn hard_links_share_the_overlay() {
        let mut f = Fake::default();
        f.write("a", 0, "A");
        f.op(Op::Link { from: b("a"), to: b("l") });
        f.write("l", 1, "L");
        assert_eq!(f.read("a", ""), "AL");
        assert_eq!(f.read("l", ""), "AL");
        f.op(Op::Unlink { path: b("a") });
        assert_eq!(f.read("l", ""), "AL");
    }

    #[test]
    fn errors_follow_renames_and_are_taken_once() {
        let mut f = Fake::default();
        let err = DeferredError { seq: 1, errno: libc::ENOSPC, message: "full".into(), kept: "k".into() };
        f.index.record_error(99, &b("d/a"), err.clone());
        f.op(Op::Rename { from: b("d"), to: b("e"), flags: 0, cond: None });
        assert!(f.index.take_error(b"d/a").is_none());
        assert_eq!(f.index.take_error(b"e/a"), Some(err.clone()));
        assert!(f.index.take_error(b"e/a").is_none());
        // A write rejected after a later rename moved its file is reported under the new name.
        let w = f.write("x", 0, "X");
        f.op(Op::Rename { from: b("x"), to: b("y"), flags: 0, cond: None });
        f.index.record_error(w, &b("x"), err.clone());
        assert!(f.index.take_error(b"x").is_none());
        assert_eq!(f.index.take_error(b"y"), Some(err));
    }
}
