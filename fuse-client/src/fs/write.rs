//! Mutations: each one is journaled and applied to the local state before it returns; the
//! journal's sender takes it to the server afterwards, in order.
//!
//! What must wait for the server: renaming a directory and `RENAME_EXCHANGE` are few and touch
//! names the local state does not track one by one, so they first drain the journal and then
//! wait for their own op (one round trip after the drain). `fsync` waits for
//! the file's ops and its own fsync on the server; `flush` (close) reports a queued change the
//! server refused.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use devmount_server::proto::sftp::{rename_flags, Condition, TimeSet};
use devmount_server::proto::stat::{FullStat, Timespec};
use nix::errno::Errno;

use super::remote::Result;
use super::{lock, Entry, Fs, OpenFile};
use crate::cache::{LocalChange, Lookup, RelPath};
use crate::journal::{Op, Seq};

/// A time to set, as `setattr` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// What `setattr` changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

fn now() -> Timespec {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Timespec { sec: d.as_secs() as i64, nsec: d.subsec_nanos() }
}

fn journal_errno(e: crate::journal::JournalError) -> Errno {
    tracing::error!("journal: {e}");
    Errno::EIO
}

impl Fs {
    async fn append(&self, op: Op) -> Result<Seq> {
        self.journal.append_async(op).await.map_err(journal_errno)
    }

    /// Records what `path` is after op `seq`: `update` edits the current local stat (or
    /// `base`, the server's, when there is none yet).
    fn set_local(
        &self,
        path: &RelPath,
        seq: Seq,
        base: Option<FullStat>,
        update: impl FnOnce(&mut FullStat),
    ) -> FullStat {
        let mut local = lock(&self.local);
        let mut stat = local.get(path).and_then(|e| e.stat).or(base).unwrap_or_default();
        update(&mut stat);
        local.set(path, Some(stat), seq);
        drop(local);
        self.local_added.notify_one();
        stat
    }

    fn set_removed(&self, path: &RelPath, seq: Seq) {
        lock(&self.local).set(path, None, seq);
        self.local_added.notify_one();
    }

    /// The stat of `path` as the mount shows it: local, cached, or from the server.
    async fn current(&self, path: &RelPath) -> Result<FullStat> {
        if let Some(e) = lock(&self.local).get(path) {
            return e.stat.ok_or(Errno::ENOENT);
        }
        let cached = self.cache().lookup(path, std::time::Instant::now());
        match cached {
            Lookup::Found { stat, .. } => Ok(stat),
            // A negative entry or the parent's listing knows: no round trip for a new name.
            Lookup::Missing { .. } => Err(Errno::ENOENT),
            Lookup::Unknown => Ok(self.fetch_stat(path).await?.0),
        }
    }

    /// The condition the first change of a file that is clean here carries: what the mount saw
    /// of it. The server refuses the change if the pod changed the file since (a conflict, see
    /// [`super::conflict`]). Only devmount-server's stats (inode, nanoseconds) can tell.
    fn condition(&self, path: &RelPath, base: &FullStat) -> Option<Condition> {
        let clean = lock(&self.local).get(path).is_none();
        (clean && self.remote.is_devmount() && base.ino != 0 && base.mode & libc::S_IFMT == libc::S_IFREG)
            .then_some(Condition { size: base.size, mtime: base.mtime, ino: base.ino })
    }

    /// Whether `name` exists in `parent`; its stat if so.
    async fn existing(&self, path: &RelPath) -> Result<Option<FullStat>> {
        match self.current(path).await {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn new_stat(&self, mode: u32, size: u64) -> FullStat {
        let t = now();
        FullStat {
            mode,
            nlink: if mode & libc::S_IFMT == libc::S_IFDIR { 2 } else { 1 },
            uid: self.ids.remote_uid,
            gid: self.ids.remote_gid,
            size,
            blocks: size.div_ceil(512),
            blksize: 4096,
            atime: t,
            mtime: t,
            ctime: t,
            ..FullStat::default()
        }
    }

    /// `path` made as `stat` by op `seq` (not a link): recorded, and returned for the kernel.
    fn make(&self, path: &RelPath, seq: Seq, stat: FullStat) -> Entry {
        lock(&self.local).make(path, stat, seq);
        self.local_added.notify_one();
        self.made(path, stat)
    }

    /// A new name made here, for the kernel: counted as a lookup.
    fn made(&self, path: &RelPath, stat: FullStat) -> Entry {
        self.cache().local_change(LocalChange::Created(path));
        self.entry(path, stat, super::local_ttl(&stat))
    }

    /// A new open file for the kernel, with the access mode and O_APPEND of `flags`.
    fn open_file(&self, id: u64, path: RelPath, flags: i32) -> u64 {
        let file = OpenFile {
            id,
            path,
            writable: writable(flags),
            append: flags & libc::O_APPEND != 0,
            remote: tokio::sync::Mutex::new(None),
            next_read: Default::default(),
            ahead: Default::default(),
            window: Default::default(),
            fetching: Default::default(),
        };
        lock(&self.files).insert(std::sync::Arc::new(file)) as u64
    }

    /// create: a new regular file (or, without `O_EXCL`, an existing one opened).
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Entry, u64)> {
        let path = self.child(parent, name)?;
        if let Some(stat) = self.existing(&path).await? {
            if flags & libc::O_EXCL != 0 {
                return Err(Errno::EEXIST);
            }
            let id = self.entry(&path, stat, Duration::ZERO).attr.id;
            let opened = async {
                let (fh, _) = self.open(id, flags).await?;
                Ok((self.getattr(id).await?, fh))
            }
            .await;
            if opened.is_err() {
                // The kernel gets an error, not the entry: it holds no reference.
                self.forget(id, 1);
            }
            return opened;
        }
        let perm = mode & !umask & 0o7777;
        let seq = self.append(Op::Create { path: bytes(&path), mode: perm, exclusive: true }).await?;
        let stat = self.new_stat(libc::S_IFREG | perm, 0);
        let entry = self.make(&path, seq, stat);
        let fh = self.open_file(entry.attr.id, path, flags);
        Ok((entry, fh))
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, umask: u32) -> Result<Entry> {
        let path = self.child(parent, name)?;
        if self.existing(&path).await?.is_some() {
            return Err(Errno::EEXIST);
        }
        let perm = mode & !umask & 0o7777;
        let seq = self.append(Op::Mkdir { path: bytes(&path), mode: perm }).await?;
        let stat = self.new_stat(libc::S_IFDIR | perm, 4096);
        let entry = self.make(&path, seq, stat);
        self.cache().local_mkdir(&path, std::time::Instant::now());
        Ok(entry)
    }

    pub async fn mknod(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, rdev: u32) -> Result<Entry> {
        let path = self.child(parent, name)?;
        let kind = mode & libc::S_IFMT;
        let supported = kind == libc::S_IFREG || (kind == libc::S_IFIFO && self.remote.is_devmount());
        if !supported {
            return Err(Errno::EPERM);
        }
        if self.existing(&path).await?.is_some() {
            return Err(Errno::EEXIST);
        }
        let perm = mode & !umask & 0o7777;
        let op = if kind == libc::S_IFREG {
            Op::Create { path: bytes(&path), mode: perm, exclusive: true }
        } else {
            Op::Mknod { path: bytes(&path), mode: kind | perm, rdev: u64::from(rdev) }
        };
        let seq = self.append(op).await?;
        let stat = self.new_stat(kind | perm, 0);
        Ok(self.make(&path, seq, stat))
    }

    pub async fn symlink(&self, parent: u64, name: &OsStr, target: &[u8]) -> Result<Entry> {
        let path = self.child(parent, name)?;
        if self.existing(&path).await?.is_some() {
            return Err(Errno::EEXIST);
        }
        let seq =
            self.append(Op::Symlink { target: Bytes::copy_from_slice(target), path: bytes(&path) }).await?;
        let stat = self.new_stat(libc::S_IFLNK | 0o777, target.len() as u64);
        Ok(self.make(&path, seq, stat))
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let path = self.child(parent, name)?;
        let stat = self.current(&path).await?;
        if stat.is_dir() {
            return Err(Errno::EISDIR);
        }
        if self.hide_if_open(&path, stat).await? {
            return Ok(());
        }
        let seq = self.append(Op::Unlink { path: bytes(&path) }).await?;
        self.set_removed(&path, seq);
        self.cache().local_change(LocalChange::Removed(&path));
        self.nodes().unlink(&path);
        Ok(())
    }

    /// An open file losing its last name here keeps its contents on the server under a
    /// hidden name until its last descriptor is closed (NFS's "silly rename"): reads and
    /// writes through the descriptor go on working by path. True if `path` was hidden so.
    async fn hide_if_open(&self, path: &RelPath, stat: FullStat) -> Result<bool> {
        let Some(id) = self.nodes().id_of(path) else { return Ok(false) };
        if !self.is_open(id) {
            return Ok(false);
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(false) };
        let mut hidden_name = format!("{HIDDEN_PREFIX}{id:x}-").into_bytes();
        hidden_name.extend_from_slice(&name[..name.len().min(200)]);
        let hidden = dir.join(&hidden_name).map_err(|_| Errno::EINVAL)?;
        let op = Op::Rename { from: bytes(path), to: bytes(&hidden), flags: 0, cond: None };
        let seq = self.append(op).await?;
        lock(&self.local).rename(path, &hidden, stat, seq);
        self.local_added.notify_one();
        self.nodes().rename(path, &hidden);
        self.cache().local_change(LocalChange::Renamed { from: path, to: &hidden });
        // The last descriptor may have been released while the rename was being journaled;
        // that release saw the old name and left the hidden one to us.
        self.drop_hidden(id).await;
        Ok(true)
    }

    /// [`Fs::release`] when it needs no request to the server: false, with nothing done, if it
    /// does (the file has a server handle, or is a hidden name to remove).
    pub fn release_cached(&self, fh: u64) -> bool {
        let Ok(file) = self.file(fh) else { return true };
        let idle = file.remote.try_lock().is_ok_and(|h| h.is_none());
        // Under the inode table's lock, as in `drop_hidden`: an unlink hiding the file either
        // came first (the async release drops the hidden name) or finds it closed.
        let nodes = self.nodes();
        let hidden = nodes
            .path(file.id)
            .is_some_and(|p| p.file_name().is_some_and(|n| n.starts_with(HIDDEN_PREFIX.as_bytes())));
        if !idle || hidden {
            return false;
        }
        lock(&self.files).try_remove(fh as usize);
        true
    }

    /// The last descriptor of node `id` was closed: a hidden name left by
    /// [`Fs::hide_if_open`] goes now. The check and the unnaming happen under the inode
    /// table's lock, so of a release and an unlink racing here exactly one removes the name.
    pub(super) async fn drop_hidden(&self, id: u64) {
        let path = {
            let mut nodes = self.nodes();
            let Some(path) = nodes.path(id) else { return };
            if self.is_open(id) || !path.file_name().is_some_and(|n| n.starts_with(HIDDEN_PREFIX.as_bytes()))
            {
                return;
            }
            nodes.unlink(&path);
            path
        };
        match self.append(Op::Unlink { path: bytes(&path) }).await {
            Ok(seq) => {
                self.set_removed(&path, seq);
                self.cache().local_change(LocalChange::Removed(&path));
            }
            Err(e) => tracing::warn!(
                "{}: cannot remove the hidden name: {e}",
                String::from_utf8_lossy(path.as_bytes())
            ),
        }
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let path = self.child(parent, name)?;
        let stat = self.current(&path).await?;
        if !stat.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let id = self.nodes().id_for(&path, stat.dev, stat.ino);
        if !self.readdir(id).await?.items.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let seq = self.append(Op::Rmdir { path: bytes(&path) }).await?;
        self.set_removed(&path, seq);
        self.cache().local_change(LocalChange::Removed(&path));
        self.nodes().unlink(&path);
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let from = self.child(parent, name)?;
        let to = self.child(new_parent, new_name)?;
        if flags & !(rename_flags::NOREPLACE | rename_flags::EXCHANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        let src = self.current(&from).await?;
        let dst = self.existing(&to).await?;
        if from == to {
            return Ok(());
        }
        if to.starts_with(&from) {
            return Err(Errno::EINVAL);
        }
        match (flags, dst) {
            (f, Some(_)) if f & rename_flags::NOREPLACE != 0 => return Err(Errno::EEXIST),
            (f, None) if f & rename_flags::EXCHANGE != 0 => return Err(Errno::ENOENT),
            (f, _) if f & rename_flags::EXCHANGE != 0 && !self.remote.is_devmount() => {
                return Err(Errno::EINVAL)
            }
            (0, Some(d)) if d.is_dir() && !src.is_dir() => return Err(Errno::EISDIR),
            (0, Some(d)) if !d.is_dir() && src.is_dir() => return Err(Errno::ENOTDIR),
            (0, Some(d)) if d.is_dir() => {
                let id = self.nodes().id_for(&to, d.dev, d.ino);
                if !self.readdir(id).await?.items.is_empty() {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            (0, Some(d)) => {
                self.hide_if_open(&to, d).await?;
            }
            _ => {}
        }
        // A file replaced by the rename (an editor's save) must still be what the mount saw.
        let cond = dst.filter(|_| flags == 0).and_then(|d| self.condition(&to, &d));
        let op = Op::Rename { from: bytes(&from), to: bytes(&to), flags, cond };
        if src.is_dir() || flags & rename_flags::EXCHANGE != 0 {
            // Everything below `from` moves with it, named or not here: let the server do it
            // with nothing of ours still queued under either name.
            self.barrier_errno().await?;
            let seq = self.append(op).await?;
            self.sender.wait_path(seq, from.as_bytes()).await.map_err(|e| Errno::from_raw(e.errno))?;
            self.nodes().rename(&from, &to);
            let mut cache = self.cache();
            cache.local_change(LocalChange::Settled(&from));
            cache.local_change(LocalChange::Settled(&to));
            return Ok(());
        }
        let seq = self.append(op).await?;
        lock(&self.local).rename(&from, &to, src, seq);
        self.local_added.notify_one();
        self.nodes().rename(&from, &to);
        self.cache().local_change(LocalChange::Renamed { from: &from, to: &to });
        Ok(())
    }

    /// link: a new name of a file, made here at once like a file's rename (the sender sends it
    /// only after everything before it is on the server).
    pub async fn link(&self, id: u64, new_parent: u64, new_name: &OsStr) -> Result<Entry> {
        let from = self.path_of(id)?;
        let to = self.child(new_parent, new_name)?;
        let src = self.current(&from).await?;
        if src.is_dir() {
            return Err(Errno::EPERM);
        }
        if self.existing(&to).await?.is_some() {
            return Err(Errno::EEXIST);
        }
        let seq = self.append(Op::Link { from: bytes(&from), to: bytes(&to) }).await?;
        let t = now();
        let stat = self.set_local(&from, seq, Some(src), |st| {
            st.nlink += 1;
            st.ctime = t;
        });
        lock(&self.local).link(&to, stat, seq);
        self.local_added.notify_one();
        self.cache().local_change(LocalChange::Attrib(&from));
        Ok(self.made(&to, stat))
    }

    /// Opens `id`: for writing (journaled), or reading.
    /// open: the handle, and whether the kernel may keep the file's pages from an earlier open.
    pub async fn open(&self, id: u64, flags: i32) -> Result<(u64, bool)> {
        if let Some(answer) = self.open_cached(id, flags) {
            return answer;
        }
        let path = self.path_of(id)?;
        let writable = writable(flags);
        let local = lock(&self.local).get(&path);
        let stat = match local {
            Some(e) => e.stat.ok_or(Errno::ENOENT)?,
            None => self.fetch_stat(&path).await?.0,
        };
        if stat.is_dir() {
            return Err(Errno::EISDIR);
        }
        if writable && flags & libc::O_TRUNC != 0 && stat.size != 0 {
            let cond = self.condition(&path, &stat);
            let seq = self.append(Op::Truncate { path: bytes(&path), size: 0, cond }).await?;
            let t = now();
            self.set_local(&path, seq, Some(stat), |st| {
                st.size = 0;
                st.blocks = 0;
                st.mtime = t;
                st.ctime = t;
            });
            self.cache().local_change(LocalChange::Modified(&path));
        }
        let keep = self.remote.is_devmount();
        Ok((self.open_file(id, path, flags), keep))
    }

    /// [`Fs::open`] when it needs neither the server nor the journal: `None` if it does.
    pub fn open_cached(&self, id: u64, flags: i32) -> Option<Result<(u64, bool)>> {
        let path = match self.path_of(id) {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        let local = lock(&self.local).get(&path);
        let stat = match local {
            Some(e) => match e.stat {
                Some(stat) => stat,
                None => return Some(Err(Errno::ENOENT)),
            },
            // Close-to-open: without a feed the stat is re-validated at every open.
            None if self.remote.is_devmount() => self.cache().attr(&path, std::time::Instant::now())?.value,
            None => return None,
        };
        if stat.is_dir() {
            return Some(Err(Errno::EISDIR));
        }
        if writable(flags) && flags & libc::O_TRUNC != 0 && stat.size != 0 {
            return None;
        }
        let keep = self.remote.is_devmount();
        Some(Ok((self.open_file(id, path, flags), keep)))
    }

    /// write: journaled, then answered.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let file = self.file(fh)?;
        if !file.writable {
            return Err(Errno::EBADF);
        }
        let path = self.path_of(file.id)?;
        let base = self.current(&path).await?;
        // The kernel holds the inode's lock across a write, so no other write moves the end
        // between this look and the append.
        let offset = if file.append { base.size } else { offset };
        let len = data.len() as u64;
        let cond = self.condition(&path, &base);
        let op = Op::Write { path: bytes(&path), offset, data: Bytes::copy_from_slice(data), cond };
        let seq = self.append(op).await?;
        let t = now();
        self.set_local(&path, seq, Some(base), |st| {
            st.size = st.size.max(offset + len);
            st.blocks = st.size.div_ceil(512);
            st.mtime = t;
            st.ctime = t;
        });
        self.cache().local_change(LocalChange::Modified(&path));
        Ok(data.len() as u32)
    }

    /// setattr: size, mode, owner, times.
    pub async fn setattr(&self, id: u64, set: SetAttr) -> Result<Entry> {
        let path = self.path_of(id)?;
        let base = self.current(&path).await?;
        let t = now();
        let mut stat = base;
        if let Some(size) = set.size {
            if base.is_dir() {
                return Err(Errno::EISDIR);
            }
            let cond = self.condition(&path, &base);
            let seq = self.append(Op::Truncate { path: bytes(&path), size, cond }).await?;
            stat = self.set_local(&path, seq, Some(base), |st| {
                st.size = size;
                st.blocks = size.div_ceil(512);
                st.mtime = t;
                st.ctime = t;
            });
            self.cache().local_change(LocalChange::Modified(&path));
        }
        // A chown to the owner the file has changes nothing (tar, as root, chowns every file it
        // makes): left out, it does not keep the file's mode and times from joining its put.
        // Not with set-id bits, which a chown on the server may clear.
        let same = |id: u32, has: u32| id == has && stat.mode & (libc::S_ISUID | libc::S_ISGID) == 0;
        let uid = set.uid.map(|u| if u == self.ids.local_uid { self.ids.remote_uid } else { u });
        let uid = uid.filter(|&u| !same(u, stat.uid));
        let gid = set.gid.map(|g| if g == self.ids.local_gid { self.ids.remote_gid } else { g });
        let gid = gid.filter(|&g| !same(g, stat.gid));
        if set.mode.is_some() || uid.is_some() || gid.is_some() || set.atime.is_some() || set.mtime.is_some()
        {
            let time = |s: Option<SetTime>| match s {
                None => TimeSet::Omit,
                Some(SetTime::Now) => TimeSet::Now,
                Some(SetTime::At(ts)) => TimeSet::At(ts),
            };
            let op = Op::SetAttr {
                path: bytes(&path),
                mode: set.mode.map(|m| m & 0o7777),
                uid,
                gid,
                atime: time(set.atime),
                mtime: time(set.mtime),
            };
            let seq = self.append(op).await?;
            let resolve = |s: Option<SetTime>, old: Timespec| match s {
                None => old,
                Some(SetTime::Now) => t,
                Some(SetTime::At(ts)) => ts,
            };
            stat = self.set_local(&path, seq, Some(stat), |st| {
                if let Some(m) = set.mode {
                    st.mode = (st.mode & libc::S_IFMT) | (m & 0o7777);
                }
                if let Some(u) = uid {
                    st.uid = u;
                }
                if let Some(g) = gid {
                    st.gid = g;
                }
                st.atime = resolve(set.atime, st.atime);
                st.mtime = resolve(set.mtime, st.mtime);
                st.ctime = t;
            });
            self.cache().local_change(LocalChange::Attrib(&path));
        }
        Ok(Entry { attr: super::Attr { id, stat: self.ids.to_local(stat) }, ttl: super::local_ttl(&stat) })
    }

    /// flush (each close of a descriptor): a queued change of this file that the server
    /// refused is reported here.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let file = self.file(fh)?;
        if !file.writable {
            return Ok(());
        }
        let Some(path) = self.nodes().path(file.id) else { return Ok(()) };
        match self.journal.take_error(path.as_bytes()) {
            Some(e) => {
                tracing::warn!("{}: {e}", String::from_utf8_lossy(path.as_bytes()));
                Err(Errno::from_raw(e.errno))
            }
            None => Ok(()),
        }
    }

    /// fsync: returns once the server has everything of this file, synced to its disk.
    pub async fn fsync(&self, fh: u64) -> Result<()> {
        let file = self.file(fh)?;
        let path = self.path_of(file.id)?;
        if !file.writable && !self.journal.is_dirty(path.as_bytes()) {
            return Ok(());
        }
        let seq = self.append(Op::Fsync { path: bytes(&path) }).await?;
        // The local disk and the pod at once: an editor's save waits for the slower of the
        // two, not for both in a row.
        let journal = self.journal.clone();
        let local = tokio::task::spawn_blocking(move || journal.sync());
        let pod = self.sender.wait_path(seq, path.as_bytes()).await.map_err(|e| Errno::from_raw(e.errno));
        let local = local.await.map_err(|_| Errno::EIO)?.map_err(journal_errno);
        pod.and(local)
    }

    /// The whole mount's barrier (`devmount sync`): every change made before it is on the
    /// server.
    pub async fn sync(&self) -> std::result::Result<(), crate::journal::BarrierError> {
        let _ = self.journal.sync();
        self.sender.barrier().await
    }

    async fn barrier_errno(&self) -> Result<()> {
        self.sender.barrier().await.map_err(|e| Errno::from_raw(e.first.errno))
    }
}

/// The name an open file's contents keep on the server once its last name is gone here.
const HIDDEN_PREFIX: &str = ".devmount-unlinked-";

fn bytes(path: &RelPath) -> Bytes {
    Bytes::copy_from_slice(path.as_bytes())
}

/// Whether open flags ask for writing.
fn writable(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}
