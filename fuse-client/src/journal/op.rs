//! The mutations the journal records, and their encoding inside a journal record.
//!
//! Paths are relative to the mount root, as bytes, components joined by single `/`; the root
//! itself is the empty path. The encoding is the journal's own (it never crosses the wire), built
//! from the shared wire primitives; a field holding file data is always last, so the data of a
//! record sits at a known file offset and can be read back without decoding the record.

use bytes::{BufMut, Bytes, BytesMut};
use devmount_server::proto::sftp::{rename_flags, Condition, TimeSet};
use devmount_server::proto::stat::Timespec;
use devmount_server::proto::wire::{DecodeError, Reader, WriteExt};

/// One mutation of the tree under the mount root.
///
/// `cond` is the base condition for conflict detection: what the server's file was (size, mtime,
/// inode) when the client first dirtied it. The server refuses the change if the file no longer
/// matches, and the sender hands the conflict to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a regular file (`open` with `O_CREAT`; with `exclusive`, `O_EXCL`: the file is new
    /// and empty, which lets the journal answer reads of it without the server).
    Create {
        path: Bytes,
        mode: u32,
        exclusive: bool,
    },
    Write {
        path: Bytes,
        offset: u64,
        data: Bytes,
        cond: Option<Condition>,
    },
    Truncate {
        path: Bytes,
        size: u64,
        cond: Option<Condition>,
    },
    SetAttr {
        path: Bytes,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: TimeSet,
        mtime: TimeSet,
    },
    Mkdir {
        path: Bytes,
        mode: u32,
    },
    Mknod {
        path: Bytes,
        mode: u32,
        rdev: u64,
    },
    /// A symlink at `path` pointing to `target` (the target is content, not a path we touch).
    Symlink {
        target: Bytes,
        path: Bytes,
    },
    /// A hard link `to` of the existing `from`.
    Link {
        from: Bytes,
        to: Bytes,
    },
    Unlink {
        path: Bytes,
    },
    Rmdir {
        path: Bytes,
    },
    /// `flags` are `renameat2`'s, as [`rename_flags`]; `cond` guards the file `to` replaces.
    Rename {
        from: Bytes,
        to: Bytes,
        flags: u32,
        cond: Option<Condition>,
    },
    /// Make everything already applied to `path` durable on the server.
    Fsync {
        path: Bytes,
    },
    /// A whole small file in one request (`put@devmount`): created or atomically replaced, with
    /// exactly `mode` (permission bits) and these times (`None`: the server's now). The sender
    /// builds it from a new file's create, writes and setattrs, and an fsync of it that follows
    /// (`fsync`: the server syncs the file before it answers).
    Put {
        path: Bytes,
        mode: u32,
        exclusive: bool,
        fsync: bool,
        data: Bytes,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
        cond: Option<Condition>,
    },
}

/// What kind of operation an [`Op`] is, without its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Create,
    Write,
    Truncate,
    SetAttr,
    Mkdir,
    Mknod,
    Symlink,
    Link,
    Unlink,
    Rmdir,
    Rename,
    Fsync,
    Put,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Write => "write",
            OpKind::Truncate => "truncate",
            OpKind::SetAttr => "setattr",
            OpKind::Mkdir => "mkdir",
            OpKind::Mknod => "mknod",
            OpKind::Symlink => "symlink",
            OpKind::Link => "link",
            OpKind::Unlink => "unlink",
            OpKind::Rmdir => "rmdir",
            OpKind::Rename => "rename",
            OpKind::Fsync => "fsync",
            OpKind::Put => "put",
        }
    }

    fn tag(self) -> u8 {
        match self {
            OpKind::Create => 1,
            OpKind::Write => 2,
            OpKind::Truncate => 3,
            OpKind::SetAttr => 4,
            OpKind::Mkdir => 5,
            OpKind::Mknod => 6,
            OpKind::Symlink => 7,
            OpKind::Link => 8,
            OpKind::Unlink => 9,
            OpKind::Rmdir => 10,
            OpKind::Rename => 11,
            OpKind::Fsync => 12,
            OpKind::Put => 13,
        }
    }

    /// Whether a record tag names an operation (the journal's other records use tags from 0x80).
    pub(crate) fn is_op_tag(tag: u8) -> bool {
        (1..=13).contains(&tag)
    }
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Create { .. } => OpKind::Create,
            Op::Write { .. } => OpKind::Write,
            Op::Truncate { .. } => OpKind::Truncate,
            Op::SetAttr { .. } => OpKind::SetAttr,
            Op::Mkdir { .. } => OpKind::Mkdir,
            Op::Mknod { .. } => OpKind::Mknod,
            Op::Symlink { .. } => OpKind::Symlink,
            Op::Link { .. } => OpKind::Link,
            Op::Unlink { .. } => OpKind::Unlink,
            Op::Rmdir { .. } => OpKind::Rmdir,
            Op::Rename { .. } => OpKind::Rename,
            Op::Fsync { .. } => OpKind::Fsync,
            Op::Put { .. } => OpKind::Put,
        }
    }

    /// The paths this operation changes or depends on, in the order of its fields.
    pub fn paths(&self) -> impl Iterator<Item = &Bytes> {
        let (a, b) = match self {
            Op::Link { from, to } | Op::Rename { from, to, .. } => (from, Some(to)),
            Op::Create { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::SetAttr { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Fsync { path }
            | Op::Put { path, .. } => (path, None),
        };
        std::iter::once(a).chain(b)
    }

    /// The first path of [`Op::paths`]: the one a rejected or conflicting operation is reported
    /// under.
    pub fn path(&self) -> &Bytes {
        self.paths().next().expect("every op names a path")
    }

    /// The file data this operation carries (writes and puts), else empty.
    pub fn data(&self) -> &[u8] {
        match self {
            Op::Write { data, .. } | Op::Put { data, .. } => data,
            _ => &[],
        }
    }

    /// Operations that go only after every earlier one is acknowledged, and before any later
    /// one starts: they change what paths mean (rename, link, rmdir), or promise durability of
    /// everything before them (fsync).
    pub fn is_barrier(&self) -> bool {
        matches!(self, Op::Rename { .. } | Op::Link { .. } | Op::Rmdir { .. } | Op::Fsync { .. })
    }

    /// One line for logs and the rejected folder's notes; paths are escaped, never decoded
    /// lossily.
    pub fn describe(&self) -> String {
        let p = |b: &Bytes| b.escape_ascii().to_string();
        match self {
            Op::Create { path, mode, exclusive } => {
                let excl = if *exclusive { " (exclusive)" } else { "" };
                format!("create {} mode {mode:o}{excl}", p(path))
            }
            Op::Write { path, offset, data, .. } => {
                format!("write of {} bytes at offset {offset} to {}", data.len(), p(path))
            }
            Op::Truncate { path, size, .. } => format!("truncate {} to {size} bytes", p(path)),
            Op::SetAttr { path, mode, uid, gid, atime, mtime } => {
                let mut what = Vec::new();
                if let Some(m) = mode {
                    what.push(format!("mode {m:o}"));
                }
                if let Some(u) = uid {
                    what.push(format!("uid {u}"));
                }
                if let Some(g) = gid {
                    what.push(format!("gid {g}"));
                }
                if *atime != TimeSet::Omit {
                    what.push("atime".to_string());
                }
                if *mtime != TimeSet::Omit {
                    what.push("mtime".to_string());
                }
                format!("setattr {} ({})", p(path), what.join(", "))
            }
            Op::Mkdir { path, mode } => format!("mkdir {} mode {mode:o}", p(path)),
            Op::Mknod { path, mode, .. } => format!("mknod {} mode {mode:o}", p(path)),
            Op::Symlink { target, path } => format!("symlink {} -> {}", p(path), p(target)),
            Op::Link { from, to } => format!("link {} to {}", p(to), p(from)),
            Op::Unlink { path } => format!("unlink {}", p(path)),
            Op::Rmdir { path } => format!("rmdir {}", p(path)),
            Op::Rename { from, to, flags, .. } => {
                let how = match *flags {
                    rename_flags::NOREPLACE => " (noreplace)",
                    rename_flags::EXCHANGE => " (exchange)",
                    _ => "",
                };
                format!("rename {} to {}{how}", p(from), p(to))
            }
            Op::Fsync { path } => format!("fsync {}", p(path)),
            Op::Put { path, mode, data, fsync, .. } => {
                let synced = if *fsync { ", synced" } else { "" };
                format!("put of {} bytes to {} mode {mode:o}{synced}", data.len(), p(path))
            }
        }
    }

    /// Appends the encoding (tag first, data last) to `buf`.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(self.kind().tag());
        match self {
            Op::Create { path, mode, exclusive } => {
                buf.put_string(path);
                buf.put_u32(*mode);
                buf.put_bool(*exclusive);
            }
            Op::Write { path, offset, data, cond } => {
                buf.put_string(path);
                buf.put_u64(*offset);
                put_cond(buf, cond);
                buf.put_slice(data);
            }
            Op::Truncate { path, size, cond } => {
                buf.put_string(path);
                buf.put_u64(*size);
                put_cond(buf, cond);
            }
            Op::SetAttr { path, mode, uid, gid, atime, mtime } => {
                buf.put_string(path);
                for v in [mode, uid, gid] {
                    match v {
                        Some(v) => {
                            buf.put_u8(1);
                            buf.put_u32(*v);
                        }
                        None => buf.put_u8(0),
                    }
                }
                put_timeset(buf, atime);
                put_timeset(buf, mtime);
            }
            Op::Mkdir { path, mode } => {
                buf.put_string(path);
                buf.put_u32(*mode);
            }
            Op::Mknod { path, mode, rdev } => {
                buf.put_string(path);
                buf.put_u32(*mode);
                buf.put_u64(*rdev);
            }
            Op::Symlink { target, path } => {
                buf.put_string(target);
                buf.put_string(path);
            }
            Op::Link { from, to } => {
                buf.put_string(from);
                buf.put_string(to);
            }
            Op::Unlink { path } | Op::Rmdir { path } | Op::Fsync { path } => buf.put_string(path),
            Op::Rename { from, to, flags, cond } => {
                buf.put_string(from);
                buf.put_string(to);
                buf.put_u32(*flags);
                put_cond(buf, cond);
            }
            Op::Put { path, mode, exclusive, fsync, data, atime, mtime, cond } => {
                buf.put_string(path);
                buf.put_u32(*mode);
                buf.put_u8(u8::from(*exclusive) | u8::from(*fsync) << 1);
                for t in [atime, mtime] {
                    match t {
                        Some(t) => {
                            buf.put_u8(1);
                            t.encode(buf);
                        }
                        None => buf.put_u8(0),
                    }
                }
                put_cond(buf, cond);
                buf.put_slice(data);
            }
        }
    }

    /// Decodes one encoded op; the whole of `payload` must be consumed.
    pub(crate) fn decode(payload: Bytes) -> Result<Op, DecodeError> {
        let mut r = Reader::new(payload);
        let op = match r.u8()? {
            1 => Op::Create { path: r.string()?, mode: r.u32()?, exclusive: get_bool(&mut r)? },
            2 => {
                let path = r.string()?;
                let offset = r.u64()?;
                let cond = get_cond(&mut r)?;
                Op::Write { path, offset, cond, data: r.rest() }
            }
            3 => Op::Truncate { path: r.string()?, size: r.u64()?, cond: get_cond(&mut r)? },
            4 => {
                let path = r.string()?;
                let mode = get_opt_u32(&mut r)?;
                let uid = get_opt_u32(&mut r)?;
                let gid = get_opt_u32(&mut r)?;
                Op::SetAttr { path, mode, uid, gid, atime: get_timeset(&mut r)?, mtime: get_timeset(&mut r)? }
            }
            5 => Op::Mkdir { path: r.string()?, mode: r.u32()? },
            6 => Op::Mknod { path: r.string()?, mode: r.u32()?, rdev: r.u64()? },
            7 => Op::Symlink { target: r.string()?, path: r.string()? },
            8 => Op::Link { from: r.string()?, to: r.string()? },
            9 => Op::Unlink { path: r.string()? },
            10 => Op::Rmdir { path: r.string()? },
            11 => Op::Rename { from: r.string()?, to: r.string()?, flags: r.u32()?, cond: get_cond(&mut r)? },
            12 => Op::Fsync { path: r.string()? },
            13 => {
                let path = r.string()?;
                let mode = r.u32()?;
                let flags = r.u8()?;
                if flags & !0b11 != 0 {
                    return Err(DecodeError::Invalid("put flags"));
                }
                let (exclusive, fsync) = (flags & 1 != 0, flags & 2 != 0);
                let atime = get_opt_time(&mut r)?;
                let mtime = get_opt_time(&mut r)?;
                let cond = get_cond(&mut r)?;
                Op::Put { path, mode, exclusive, fsync, data: r.rest(), atime, mtime, cond }
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(op)
    }

    /// The same operation without its data, which the index and the recovery summary do not
    /// need (they refer to the bytes where the record keeps them).
    pub(crate) fn without_data(&self) -> Op {
        match self {
            Op::Write { path, offset, cond, .. } => {
                Op::Write { path: path.clone(), offset: *offset, data: Bytes::new(), cond: *cond }
            }
            Op::Put { path, mode, exclusive, fsync, atime, mtime, cond, .. } => Op::Put {
                path: path.clone(),
                mode: *mode,
                exclusive: *exclusive,
                fsync: *fsync,
                data: Bytes::new(),
                atime: *atime,
                mtime: *mtime,
                cond: *cond,
            },
            other => other.clone(),
        }
    }
}

fn put_cond(buf: &mut BytesMut, cond: &Option<Condition>) {
    match cond {
        Some(c) => {
            buf.put_u8(1);
            c.encode(buf);
        }
        None => buf.put_u8(0),
    }
}

fn put_timeset(buf: &mut BytesMut, t: &TimeSet) {
    match t {
        TimeSet::Omit => buf.put_u8(0),
        TimeSet::Now => buf.put_u8(1),
        TimeSet::At(ts) => {
            buf.put_u8(2);
            ts.encode(buf);
        }
    }
}

fn get_bool(r: &mut Reader) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Invalid("boolean")),
    }
}

fn get_present(r: &mut Reader) -> Result<bool, DecodeError> {
    get_bool(r).map_err(|_| DecodeError::Invalid("optional tag"))
}

fn get_opt_u32(r: &mut Reader) -> Result<Option<u32>, DecodeError> {
    Ok(if get_present(r)? { Some(r.u32()?) } else { None })
}

fn get_opt_time(r: &mut Reader) -> Result<Option<Timespec>, DecodeError> {
    Ok(if get_present(r)? { Some(Timespec::decode(r)?) } else { None })
}

fn get_cond(r: &mut Reader) -> Result<Option<Condition>, DecodeError> {
    Ok(if get_present(r)? { Some(Condition::decode(r)?) } else { None })
}

fn get_timeset(r: &mut Reader) -> Result<TimeSet, DecodeError> {
    match r.u8()? {
        0 => Ok(TimeSet::Omit),
        1 => Ok(TimeSet::Now),
        2 => Ok(TimeSet::At(Timespec::decode(r)?)),
        _ => Err(DecodeError::Invalid("time tag")),
    }
}

/// Whether `a` is a proper ancestor of `b` (the root, the empty path, is everyone's ancestor).
pub(crate) fn is_ancestor(a: &[u8], b: &[u8]) -> bool {
    if a.is_empty() {
        return !b.is_empty();
    }
    b.len() > a.len() && b.starts_with(a) && b[a.len()] == b'/'
}

/// Whether two paths are the same, or one lies below the other.
pub(crate) fn related(a: &[u8], b: &[u8]) -> bool {
    a == b || is_ancestor(a, b) || is_ancestor(b, a)
}

/// The proper ancestors of a path, nearest first, ending with the root (empty path).
pub(crate) fn ancestors(p: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let slashes = p.iter().enumerate().rev().filter(|(_, &c)| c == b'/').map(|(i, _)| i);
    let root = (!p.is_empty()).then(Bytes::new);
    slashes.map(move |i| p.slice(..i)).chain(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn all_ops() -> Vec<Op> {
        let c = Some(Condition { size: 7, mtime: Timespec { sec: -3, nsec: 999_999_999 }, ino: 42 });
        let t = Timespec { sec: 1_700_000_000, nsec: 5 };
        vec![
            Op::Create { path: b("a"), mode: 0o100644, exclusive: true },
            Op::Write { path: b("d/\u{ff}x"), offset: 1 << 40, data: b("hello"), cond: c },
            Op::Write { path: b("e"), offset: 0, data: Bytes::new(), cond: None },
            Op::Truncate { path: b("a"), size: 9, cond: c },
            Op::SetAttr {
                path: b("a"),
                mode: Some(0o755),
                uid: None,
                gid: Some(5),
                atime: TimeSet::Now,
                mtime: TimeSet::At(t),
            },
            Op::Mkdir { path: b("d"), mode: 0o755 },
            Op::Mknod { path: b("f"), mode: 0o10644, rdev: 3 },
            Op::Symlink { target: b("../x"), path: b("l") },
            Op::Link { from: b("a"), to: b("b") },
            Op::Unlink { path: b("a") },
            Op::Rmdir { path: b("d") },
            Op::Rename { from: b("a"), to: b("b"), flags: rename_flags::NOREPLACE, cond: c },
            Op::Fsync { path: b("b") },
            Op::Put {
                path: b("p"),
                mode: 0o600,
                exclusive: false,
                fsync: true,
                data: b("xyz"),
                atime: None,
                mtime: Some(t),
                cond: c,
            },
        ]
    }

    #[test]
    fn every_op_round_trips_with_data_last() {
        for op in all_ops() {
            let mut buf = BytesMut::new();
            op.encode(&mut buf);
            let enc = buf.freeze();
            assert!(enc.ends_with(op.data()), "{op:?}");
            assert_eq!(Op::decode(enc.clone()).unwrap(), op);
            assert!(Op::decode(enc.slice(..enc.len() - 1 - op.data().len())).is_err(), "{op:?}");
        }
    }

    #[test]
    fn malformed_encodings_are_refused() {
        assert_eq!(Op::decode(b("\u{0}")), Err(DecodeError::UnknownType(0)));
        let mut buf = BytesMut::new();
        Op::Unlink { path: b("a") }.encode(&mut buf);
        buf.put_u8(0);
        assert_eq!(Op::decode(buf.freeze()), Err(DecodeError::Trailing(1)));
        let mut buf = BytesMut::new();
        Op::Create { path: b("a"), mode: 0, exclusive: false }.encode(&mut buf);
        let mut v = buf.to_vec();
        *v.last_mut().unwrap() = 2;
        assert!(Op::decode(Bytes::from(v)).is_err());
    }

    #[test]
    fn path_relations() {
        assert!(is_ancestor(b"", b"a"));
        assert!(!is_ancestor(b"", b""));
        assert!(is_ancestor(b"a", b"a/b"));
        assert!(!is_ancestor(b"a", b"ab"));
        assert!(!is_ancestor(b"a/b", b"a"));
        assert!(related(b"a/b", b"a") && related(b"a", b"a") && !related(b"a", b"b/a"));
        let anc: Vec<Bytes> = ancestors(&b("a/b/c")).collect();
        assert_eq!(anc, vec![b("a/b"), b("a"), b("")]);
        assert_eq!(ancestors(&b("")).count(), 0);
    }
}
