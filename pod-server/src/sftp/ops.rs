//! The file operations behind the SFTP requests: blocking system calls on paths resolved under
//! [`Root`] and on open descriptors. Callers run them on blocking threads.
//!
//! Nothing here knows packets or handles; it speaks the codec's plain data types only where
//! they are the operation's own parameters (times to set, conditions, a put).
//!
//! - Modes are exact: whatever the kernel's umask took off a new file is put back with
//!   `fchmod`/`fchmodat` (the process umask is never touched, other threads create files too).
//! - Every mutation tells the change tracker each canonical path it is about to change, just
//!   before its first system call, and holds that note ([`Own`]) until its last one is done.
//! - Operations that follow a final symlink do it through [`Root::follow`]; the kernel is only
//!   ever asked with no-follow flags, so a link swapped in is never followed out of the root.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::paths::{sys, At, Root, Step};
use crate::feed::ChangeTracker;
use crate::proto::sftp::{
    open_flags, rename_flags, Condition, GetReply, ListReply, Put, SeqStat, SetAttrs, StatVfs, TimeSet,
    WalkBatch, WalkEntry, MAX_DATA, MAX_PACKET,
};
use crate::proto::stat::{FullStat, Timespec};

/// Why an operation failed, beyond a plain errno.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The file no longer matches the request's condition.
    #[error("file changed")]
    Changed,
    /// `get` found the file larger than the caller's maximum.
    #[error("file larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("{0}")]
    Unsupported(&'static str),
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn is_errno(e: &io::Error, code: i32) -> bool {
    e.raw_os_error() == Some(code)
}

fn is_symlink(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// An open regular file (or anything opened with OPEN) and the canonical path it was opened by.
#[derive(Debug)]
pub struct File {
    pub fd: OwnedFd,
    pub abs: PathBuf,
}

/// The file system of one connection: the root, and whom to tell about its own changes.
pub struct Fs {
    root: Root,
    conn: u64,
    changes: Arc<dyn ChangeTracker>,
}

impl Fs {
    pub fn new(root: Root, conn: u64, changes: Arc<dyn ChangeTracker>) -> Fs {
        Fs { root, conn, changes }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The feed sequence, read before a stat so the reply can be ordered against the feed.
    pub fn sequence(&self) -> u64 {
        self.changes.sequence()
    }

    /// `barrier@devmount`: a sequence number that covers every change made before this call,
    /// once the change tracker has published them.
    pub async fn barrier(&self) -> u64 {
        let (reply, answer) = oneshot::channel();
        self.changes.barrier(reply);
        // A tracker that let go of the request unanswered has stopped: nothing more is coming.
        answer.await.unwrap_or_else(|_| self.sequence())
    }

    /// Notes `abs` as about to be changed by this connection, until the guard is dropped.
    fn own(&self, abs: PathBuf) -> Own<'_> {
        self.changes.own_change(self.conn, &abs);
        Own { fs: self, abs }
    }

    pub fn stat(&self, path: &[u8], follow: bool) -> io::Result<FullStat> {
        if follow {
            self.root.follow(path, |at| {
                let st = sys::lstat(at.dir, at.name)?;
                Ok(if is_symlink(&st) { Step::Symlink } else { Step::Done(FullStat::from(&st)) })
            })
        } else {
            self.root.at(path, |at| sys::lstat(at.dir, at.name).map(|st| FullStat::from(&st)))
        }
    }

    pub fn seq_stat(&self, path: &[u8], follow: bool) -> io::Result<SeqStat> {
        let seq = self.sequence();
        Ok(SeqStat { seq, stat: self.stat(path, follow)? })
    }

    /// OPEN: `pflags` as SFTP sends them; `mode` (default 0666) is applied exactly to a file
    /// this call creates, and left alone on an existing one.
    pub fn open(&self, path: &[u8], pflags: u32, mode: Option<u32>) -> io::Result<File> {
        let has = |f| pflags & f != 0;
        let mut flags = match (has(open_flags::READ), has(open_flags::WRITE)) {
            (true, true) => libc::O_RDWR,
            (false, true) => libc::O_WRONLY,
            _ => libc::O_RDONLY,
        };
        if has(open_flags::APPEND) {
            flags |= libc::O_APPEND;
        }
        if has(open_flags::TRUNC) {
            flags |= libc::O_TRUNC;
        }
        let create = has(open_flags::CREAT);
        let excl = create && has(open_flags::EXCL);
        let mode = mode.unwrap_or(0o666) & 0o7777;
        let mutates = create || has(open_flags::TRUNC);
        self.root.follow(path, |at| {
            let _own = mutates.then(|| self.own(at.abs()));
            let opened = if create {
                open_or_create(&at, flags, excl, mode)
            } else {
                open_nofollow(&at, flags).map(|fd| fd.map(|fd| (fd, false)))
            }?;
            Ok(match opened {
                Step::Symlink => Step::Symlink,
                Step::Done((fd, created)) => {
                    if created {
                        fchmod(fd.as_fd(), mode)?;
                    }
                    Step::Done(File { fd, abs: at.abs() })
                }
            })
        })
    }

    pub fn opendir(&self, path: &[u8]) -> io::Result<DirReader> {
        self.root.follow(path, |at| {
            let flags = libc::O_RDONLY | libc::O_DIRECTORY;
            Ok(match open_nofollow(&at, flags)? {
                Step::Symlink => Step::Symlink,
                Step::Done(fd) => Step::Done(DirReader::new(fd, at.is_root())),
            })
        })
    }

    /// SETSTAT, `lsetstat@openssh.com` and `setstat@devmount`.
    pub fn setstat(&self, path: &[u8], attrs: &SetAttrs, follow: bool) -> io::Result<()> {
        if follow {
            self.root.follow(path, |at| {
                if is_symlink(&sys::lstat(at.dir, at.name)?) {
                    return Ok(Step::Symlink);
                }
                self.setstat_at(&at, attrs).map(Step::Done)
            })
        } else {
            self.root.at(path, |at| self.setstat_at(&at, attrs))
        }
    }

    /// Applies `attrs` without following the last component: size, then owner (which may
    /// clear set-id bits), then mode, then times (which the others would disturb).
    fn setstat_at(&self, at: &At<'_>, attrs: &SetAttrs) -> io::Result<()> {
        if is_noop(attrs) {
            sys::lstat(at.dir, at.name)?;
            return Ok(());
        }
        let _own = self.own(at.abs());
        if let Some(size) = attrs.size {
            let fd = sys::openat(
                at.dir.as_raw_fd(),
                at.name,
                libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            )?;
            ftruncate(fd.as_fd(), size)?;
        }
        if attrs.uid.is_some() || attrs.gid.is_some() {
            let uid = attrs.uid.unwrap_or(u32::MAX);
            let gid = attrs.gid.unwrap_or(u32::MAX);
            // SAFETY: plain syscall on a borrowed descriptor and a NUL-terminated name.
            sys::cvt(unsafe {
                libc::fchownat(at.dir.as_raw_fd(), at.name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW)
            })?;
        }
        if let Some(mode) = attrs.mode {
            fchmodat_nofollow(at.dir, at.name, mode & 0o7777)?;
        }
        if attrs.atime != TimeSet::Omit || attrs.mtime != TimeSet::Omit {
            let ts = [timespec(attrs.atime), timespec(attrs.mtime)];
            // SAFETY: `ts` holds the two timespecs utimensat reads.
            sys::cvt(unsafe {
                libc::utimensat(at.dir.as_raw_fd(), at.name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
            })?;
        }
        Ok(())
    }

    pub fn fsetstat(&self, fd: BorrowedFd<'_>, abs: &Path, attrs: &SetAttrs) -> io::Result<()> {
        if is_noop(attrs) {
            return Ok(());
        }
        let _own = self.own(abs.to_path_buf());
        if let Some(size) = attrs.size {
            ftruncate(fd, size)?;
        }
        if attrs.uid.is_some() || attrs.gid.is_some() {
            let uid = attrs.uid.unwrap_or(u32::MAX);
            let gid = attrs.gid.unwrap_or(u32::MAX);
            // SAFETY: plain syscall on a borrowed descriptor.
            sys::cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
        }
        if let Some(mode) = attrs.mode {
            fchmod(fd, mode & 0o7777)?;
        }
        if attrs.atime != TimeSet::Omit || attrs.mtime != TimeSet::Omit {
            let ts = [timespec(attrs.atime), timespec(attrs.mtime)];
            // SAFETY: `ts` holds the two timespecs futimens reads.
            sys::cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })?;
        }
        Ok(())
    }

    pub fn remove(&self, path: &[u8]) -> io::Result<()> {
        self.root.at(path, |at| {
            let _own = self.own(at.abs());
            unlinkat(at.dir, at.name, 0)
        })
    }

    pub fn rmdir(&self, path: &[u8]) -> io::Result<()> {
        self.root.at(path, |at| {
            let _own = self.own(at.abs());
            unlinkat(at.dir, at.name, libc::AT_REMOVEDIR)
        })
    }

    /// MKDIR: `mode` (default 0777) applied exactly.
    pub fn mkdir(&self, path: &[u8], mode: Option<u32>) -> io::Result<()> {
        let mode = mode.unwrap_or(0o777) & 0o7777;
        self.root.at(path, |at| {
            let _own = self.own(at.abs());
            // SAFETY: plain syscall on a borrowed descriptor and a NUL-terminated name.
            sys::cvt(unsafe { libc::mkdirat(at.dir.as_raw_fd(), at.name.as_ptr(), mode) })?;
            fchmodat_nofollow(at.dir, at.name, mode)
        })
    }

    /// `mknod@devmount`: fifos and regular files only, mode exact.
    pub fn mknod(&self, path: &[u8], mode: u32, rdev: u64) -> Result<(), OpError> {
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => libc::S_IFREG,
            libc::S_IFIFO => libc::S_IFIFO,
            _ => return Err(OpError::Unsupported("mknod of devices and sockets is not supported")),
        };
        let perm = mode & 0o7777;
        self.root.at(path, |at| {
            let _own = self.own(at.abs());
            // SAFETY: plain syscall on a borrowed descriptor and a NUL-terminated name.
            sys::cvt(unsafe { libc::mknodat(at.dir.as_raw_fd(), at.name.as_ptr(), kind | perm, rdev) })?;
            Ok(fchmodat_nofollow(at.dir, at.name, perm)?)
        })
    }

    /// RENAME as OpenSSH serves it: never replaces an existing target.
    pub fn rename_noreplace(&self, old: &[u8], new: &[u8]) -> io::Result<()> {
        self.root.at(old, |a| {
            self.root.at(new, |b| {
                let _own = (self.own(a.abs()), self.own(b.abs()));
                match renameat2((a.dir, a.name), (b.dir, b.name), libc::RENAME_NOREPLACE) {
                    // The file system cannot do it atomically: check, then rename.
                    Err(e) if is_errno(&e, libc::EINVAL) => match sys::lstat(b.dir, b.name) {
                        Ok(_) => Err(errno(libc::EEXIST)),
                        Err(e) if is_errno(&e, libc::ENOENT) => {
                            renameat2((a.dir, a.name), (b.dir, b.name), 0)
                        }
                        Err(e) => Err(e),
                    },
                    r => r,
                }
            })
        })
    }

    /// `posix-rename@openssh.com` (`flags` 0) and `rename@devmount`. A `condition` is about
    /// the file being replaced: `new` must exist and still match it, so a client can detect
    /// that the file it is about to overwrite changed since it looked.
    pub fn rename(
        &self,
        old: &[u8],
        new: &[u8],
        flags: u32,
        condition: Option<&Condition>,
    ) -> Result<(), OpError> {
        let mut sys_flags = 0;
        if flags & rename_flags::NOREPLACE != 0 {
            sys_flags |= libc::RENAME_NOREPLACE;
        }
        if flags & rename_flags::EXCHANGE != 0 {
            sys_flags |= libc::RENAME_EXCHANGE;
        }
        if flags & !(rename_flags::NOREPLACE | rename_flags::EXCHANGE) != 0 {
            return Err(errno(libc::EINVAL).into());
        }
        self.root.at(old, |a| {
            self.root.at(new, |b| {
                if let Some(c) = condition {
                    check(c, sys::lstat(b.dir, b.name))?;
                }
                let _own = (self.own(a.abs()), self.own(b.abs()));
                Ok(renameat2((a.dir, a.name), (b.dir, b.name), sys_flags)?)
            })
        })
    }

    pub fn readlink(&self, path: &[u8]) -> io::Result<Vec<u8>> {
        self.root.at(path, |at| sys::readlinkat(at.dir, at.name))
    }

    /// Creates `linkpath` holding `target` verbatim: a target outside the root is stored, it
    /// is only refused when followed.
    pub fn symlink(&self, linkpath: &[u8], target: &[u8]) -> io::Result<()> {
        let target = CString::new(target).map_err(|_| errno(libc::EINVAL))?;
        self.root.at(linkpath, |at| {
            let _own = self.own(at.abs());
            // SAFETY: NUL-terminated strings and a borrowed descriptor.
            sys::cvt(unsafe { libc::symlinkat(target.as_ptr(), at.dir.as_raw_fd(), at.name.as_ptr()) })?;
            Ok(())
        })
    }

    /// `hardlink@openssh.com`; like link(2), a symlink `old` is linked itself.
    pub fn hardlink(&self, old: &[u8], new: &[u8]) -> io::Result<()> {
        self.root.at(old, |a| {
            self.root.at(new, |b| {
                let _own = self.own(b.abs());
                // SAFETY: NUL-terminated names and borrowed descriptors.
                sys::cvt(unsafe {
                    libc::linkat(a.dir.as_raw_fd(), a.name.as_ptr(), b.dir.as_raw_fd(), b.name.as_ptr(), 0)
                })?;
                Ok(())
            })
        })
    }

    pub fn statvfs(&self, path: &[u8]) -> io::Result<StatVfs> {
        self.root.follow(path, |at| {
            let fd = sys::openat(at.dir.as_raw_fd(), at.name, libc::O_PATH | libc::O_NOFOLLOW)?;
            if is_symlink(&fstat_raw(fd.as_fd())?) {
                return Ok(Step::Symlink);
            }
            fstatvfs(fd.as_fd()).map(Step::Done)
        })
    }

    pub fn realpath(&self, path: &[u8]) -> io::Result<PathBuf> {
        self.root.realpath(path)
    }

    /// `expand-path@openssh.com`: `~` is the root (the only home a client has here); `~user`
    /// names no directory.
    pub fn expand_path(&self, path: &[u8]) -> io::Result<PathBuf> {
        match path {
            [b'~'] => self.root.realpath(b"."),
            [b'~', b'/', rest @ ..] => self.root.realpath(rest),
            [b'~', ..] => Err(errno(libc::ENOENT)),
            _ => self.root.realpath(path),
        }
    }

    /// `walk@devmount`: starts a depth-first walk of the subtree at `path` (not following a
    /// final symlink: a symlink is walked as a single entry). `max_depth` 0 walks the whole
    /// subtree; n lists entries up to n levels below `path` (1: `path` and its children), and
    /// directories at level n are listed but not read.
    pub fn walk(&self, path: &[u8], max_depth: u32) -> io::Result<Walk> {
        let seq = self.sequence();
        self.root.at(path, |at| {
            let st = sys::lstat(at.dir, at.name)?;
            let target = if is_symlink(&st) { sys::readlinkat(at.dir, at.name)? } else { Vec::new() };
            let mut stack = Vec::new();
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let fd = sys::openat(
                    at.dir.as_raw_fd(),
                    at.name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                )?;
                stack.push(WalkDir { reader: DirReader::new(fd, false), prefix: Vec::new(), depth: 0 });
            }
            let first = WalkEntry { path: Bytes::new(), stat: FullStat::from(&st), target: target.into() };
            Ok(Walk { next: Some((seq, first)), stack, max_depth })
        })
    }

    /// `list@devmount`: `path` (not followed) and up to `max_entries` of its children, in one
    /// reply: a walk of depth 1, read in one batch. `complete` is false when more children
    /// exist than `max_entries` or one packet allows.
    pub fn list(&self, path: &[u8], max_entries: usize) -> io::Result<ListReply> {
        let mut walk = self.walk(path, 1)?;
        let batch = walk.next_batch(max_entries.saturating_add(1), self.sequence())?;
        let mut entries = batch.entries.into_iter();
        let own = entries.next().expect("a walk's first batch starts with the walked path");
        // A listing reads no subdirectory: the walk's mark for that means nothing here.
        let entries = entries.map(|e| if e.unread() { WalkEntry { target: Bytes::new(), ..e } } else { e });
        Ok(ListReply { seq: batch.seq, stat: own.stat, complete: batch.eof, entries: entries.collect() })
    }

    /// `get@devmount`: a whole regular file of at most `max_size` bytes, with its stat.
    pub fn get(&self, path: &[u8], max_size: u64) -> Result<GetReply, OpError> {
        // The reply has to fit in one packet.
        let max_size = max_size.min(MAX_DATA as u64);
        let seq = self.sequence();
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
        let fd = self.root.follow(path, |at| open_nofollow(&at, flags))?;
        let st = FullStat::from(&fstat_raw(fd.as_fd())?);
        match st.mode & libc::S_IFMT {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(errno(libc::EISDIR).into()),
            _ => return Err(errno(libc::EINVAL).into()),
        }
        if st.size > max_size {
            return Err(OpError::TooLarge { max: max_size });
        }
        // One byte more than allowed tells a file that grew past the limit from one that ends
        // there.
        let want = max_size as usize + 1;
        let mut data = BytesMut::with_capacity((st.size as usize + 1).min(want));
        while read_into(fd.as_fd(), data.len() as u64, want - data.len(), &mut data)? > 0 {
            if data.len() as u64 > max_size {
                return Err(OpError::TooLarge { max: max_size });
            }
        }
        Ok(GetReply { seq, stat: st, data: data.freeze() })
    }

    /// `put@devmount`: writes a temporary file next to the target, then renames it over the
    /// target (following a final symlink, as a write through the path would).
    pub fn put(&self, put: &Put) -> Result<SeqStat, OpError> {
        self.root.follow(&put.path, |at| match sys::lstat(at.dir, at.name) {
            Ok(st) if is_symlink(&st) => Ok(Step::Symlink),
            Ok(st) => self.put_at(&at, put, Ok(st)).map(Step::Done),
            Err(e) => self.put_at(&at, put, Err(e)).map(Step::Done),
        })
    }

    fn put_at(&self, at: &At<'_>, put: &Put, existing: io::Result<libc::stat>) -> Result<SeqStat, OpError> {
        if at.name.to_bytes() == b"." {
            return Err(errno(libc::EISDIR).into());
        }
        if let Some(c) = &put.condition {
            check(c, existing)?;
        } else if put.excl {
            match existing {
                Ok(_) => return Err(errno(libc::EEXIST).into()),
                Err(e) if is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let tmp = temp_name(at.name);
        let abs = at.abs();
        let tmp_abs = abs.with_file_name(OsStr::from_bytes(tmp.to_bytes()));
        // Held for the whole put: under load the watcher sees the temporary file's writes,
        // chmod and rename in later windows than its creation.
        let _own_tmp = self.own(tmp_abs);
        let fd = sys::openat_mode(
            at.dir.as_raw_fd(),
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )?;
        let written = (|| -> io::Result<SeqStat> {
            fchmod(fd.as_fd(), put.mode & 0o7777)?;
            write_at(fd.as_fd(), 0, &put.data)?;
            if put.atime.is_some() || put.mtime.is_some() {
                let set = |t: Option<Timespec>| timespec(t.map_or(TimeSet::Omit, TimeSet::At));
                let ts = [set(put.atime), set(put.mtime)];
                // SAFETY: `ts` holds the two timespecs futimens reads.
                sys::cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })?;
            }
            if put.fsync && !put.excl {
                // Synced before it replaces a file: a crash must not swap the old file's
                // synced bytes for unsynced ones.
                fsync(fd.as_fd())?;
            }
            let _own_target = self.own(abs);
            let (from, to) = ((at.dir, tmp.as_c_str()), (at.dir, at.name));
            if put.excl {
                match renameat2(from, to, libc::RENAME_NOREPLACE) {
                    Err(e) if is_errno(&e, libc::EINVAL) => {
                        // SAFETY: NUL-terminated names and borrowed descriptors.
                        sys::cvt(unsafe {
                            libc::linkat(
                                at.dir.as_raw_fd(),
                                tmp.as_ptr(),
                                at.dir.as_raw_fd(),
                                at.name.as_ptr(),
                                0,
                            )
                        })?;
                        unlinkat(at.dir, &tmp, 0)?;
                    }
                    r => r?,
                }
            } else {
                renameat2(from, to, 0)?;
            }
            if put.fsync && put.excl {
                // A new name: the file's fsync after the rename makes its data and its name
                // durable in one journal commit (ext4, xfs), where a sync of the data and then
                // of the directory took two flushes.
                fsync(fd.as_fd())?;
            } else if put.fsync {
                let dir = sys::openat(at.dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
                fsync(dir.as_fd())?;
            }
            let seq = self.sequence();
            Ok(SeqStat { seq, stat: FullStat::from(&fstat_raw(fd.as_fd())?) })
        })();
        if written.is_err() {
            // A leftover temporary file would show up in the client's tree. After a successful
            // rename the name is gone and this fails harmlessly.
            let _ = unlinkat(at.dir, &tmp, 0);
        }
        Ok(written?)
    }

    /// WRITE through a handle.
    pub fn write(&self, file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let _own = self.own(file.abs.clone());
        write_at(file.fd.as_fd(), offset, data)
    }

    /// `write@devmount`: WRITE only if the open file still matches `condition` and its path
    /// still names it (a file replaced by rename in the pod would otherwise take the data
    /// silently).
    pub fn write_if(
        &self,
        file: &File,
        offset: u64,
        condition: &Condition,
        data: &[u8],
    ) -> Result<(), OpError> {
        let st = FullStat::from(&fstat_raw(file.fd.as_fd())?);
        if !condition.matches(&st) {
            return Err(OpError::Changed);
        }
        match self.stat(file.abs.as_os_str().as_bytes(), true) {
            Ok(now) if now.ino == st.ino && now.dev == st.dev => {}
            Ok(_) => return Err(OpError::Changed),
            Err(e) if is_errno(&e, libc::ENOENT) => return Err(OpError::Changed),
            Err(e) => return Err(e.into()),
        }
        Ok(self.write(file, offset, data)?)
    }
}

/// A path this connection is changing: the feed marks its events own while this lives, and
/// until it has read them all once it is dropped.
#[must_use]
struct Own<'a> {
    fs: &'a Fs,
    abs: PathBuf,
}

impl Drop for Own<'_> {
    fn drop(&mut self) {
        self.fs.changes.own_done(self.fs.conn, &self.abs);
    }
}

/// Compares a condition with what is there now: a missing file has changed too.
fn check(c: &Condition, now: io::Result<libc::stat>) -> Result<(), OpError> {
    match now {
        Ok(st) if c.matches(&FullStat::from(&st)) => Ok(()),
        Ok(_) => Err(OpError::Changed),
        Err(e) if is_errno(&e, libc::ENOENT) => Err(OpError::Changed),
        Err(e) => Err(e.into()),
    }
}

fn is_noop(a: &SetAttrs) -> bool {
    a.size.is_none()
        && a.uid.is_none()
        && a.gid.is_none()
        && a.mode.is_none()
        && a.atime == TimeSet::Omit
        && a.mtime == TimeSet::Omit
}

fn timespec(t: TimeSet) -> libc::timespec {
    match t {
        TimeSet::Omit => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        TimeSet::Now => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        TimeSet::At(t) => libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long },
    }
}

/// A name for a temporary file beside `name`, unique within this process.
fn temp_name(name: &CStr) -> CString {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let base = name.to_bytes();
    // Keeps the whole name under NAME_MAX (255).
    let base = &base[..base.len().min(200)];
    let mut v = Vec::with_capacity(base.len() + 40);
    v.push(b'.');
    v.extend_from_slice(base);
    v.extend_from_slice(format!(".devmount-{}-{n}", std::process::id()).as_bytes());
    CString::new(v).expect("built from a C string and digits")
}

/// Opens the last component without following it; a symlink there asks for another round.
fn open_nofollow(at: &At<'_>, flags: libc::c_int) -> io::Result<Step<OwnedFd>> {
    match sys::openat(at.dir.as_raw_fd(), at.name, flags | libc::O_NOFOLLOW | libc::O_NOCTTY) {
        Ok(fd) => Ok(Step::Done(fd)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => symlink_or(at, e),
        Err(e) => Err(e),
    }
}

/// `Step::Symlink` if the last component is a symlink, else the error the caller got.
fn symlink_or<T>(at: &At<'_>, err: io::Error) -> io::Result<Step<T>> {
    match sys::lstat(at.dir, at.name) {
        Ok(st) if is_symlink(&st) => Ok(Step::Symlink),
        _ => Err(err),
    }
}

/// Opens with O_CREAT; reports whether this call created the file, so its mode can be made
/// exact without touching an existing file's mode.
fn open_or_create(
    at: &At<'_>,
    flags: libc::c_int,
    excl: bool,
    mode: u32,
) -> io::Result<Step<(OwnedFd, bool)>> {
    let base = flags | libc::O_NOFOLLOW | libc::O_NOCTTY;
    let create = |extra| {
        sys::openat_mode(at.dir.as_raw_fd(), at.name, base | libc::O_CREAT | libc::O_EXCL | extra, mode)
    };
    if excl {
        return create(0).map(|fd| Step::Done((fd, true)));
    }
    // Existing file or new one; a racing creator or remover makes us go round again.
    for _ in 0..8 {
        match sys::openat(at.dir.as_raw_fd(), at.name, base) {
            Ok(fd) => return Ok(Step::Done((fd, false))),
            Err(e) if is_errno(&e, libc::ENOENT) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return symlink_or(at, e)
            }
            Err(e) => return Err(e),
        }
        match create(0) {
            Ok(fd) => return Ok(Step::Done((fd, true))),
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Err(errno(libc::EAGAIN))
}

/// Renames `from` (a directory and a name in it) to `to`.
fn renameat2(
    from: (BorrowedFd<'_>, &CStr),
    to: (BorrowedFd<'_>, &CStr),
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: NUL-terminated names and borrowed descriptors.
    sys::cvt(unsafe {
        libc::renameat2(from.0.as_raw_fd(), from.1.as_ptr(), to.0.as_raw_fd(), to.1.as_ptr(), flags)
    })?;
    Ok(())
}

fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: NUL-terminated name and a borrowed descriptor.
    sys::cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed descriptor.
    sys::cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    Ok(())
}

fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = libc::off_t::try_from(size).map_err(|_| errno(libc::EFBIG))?;
    // SAFETY: plain syscall on a borrowed descriptor.
    sys::cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
    Ok(())
}

static FCHMODAT2_WORKS: AtomicBool = AtomicBool::new(true);

/// chmod of the last component, never through a symlink: `fchmodat2(AT_SYMLINK_NOFOLLOW)`
/// (Linux 6.6), else plain `fchmodat` after checking that the name is not a symlink.
fn fchmodat_nofollow(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    if FCHMODAT2_WORKS.load(Ordering::Relaxed) {
        // SAFETY: plain syscall on a borrowed descriptor and a NUL-terminated name.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                mode,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            return Err(e);
        }
        FCHMODAT2_WORKS.store(false, Ordering::Relaxed);
    }
    if is_symlink(&sys::lstat(dir, name)?) {
        return Err(errno(libc::EOPNOTSUPP));
    }
    // SAFETY: plain syscall on a borrowed descriptor and a NUL-terminated name.
    sys::cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })?;
    Ok(())
}

fn fstat_raw(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    sys::fstatat(fd, c"", libc::AT_EMPTY_PATH)
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<FullStat> {
    fstat_raw(fd).map(|st| FullStat::from(&st))
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed descriptor.
    sys::cvt(unsafe { libc::fsync(fd.as_raw_fd()) })?;
    Ok(())
}

// The statvfs field types are 32-bit on some targets.
#[allow(clippy::unnecessary_cast)]
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<StatVfs> {
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `s` is written by a successful call.
    sys::cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), s.as_mut_ptr()) })?;
    // SAFETY: the call succeeded.
    let s = unsafe { s.assume_init() };
    let mut flag = 0;
    if s.f_flag & libc::ST_RDONLY != 0 {
        flag |= StatVfs::RDONLY;
    }
    if s.f_flag & libc::ST_NOSUID != 0 {
        flag |= StatVfs::NOSUID;
    }
    Ok(StatVfs {
        bsize: s.f_bsize as u64,
        frsize: s.f_frsize as u64,
        blocks: s.f_blocks as u64,
        bfree: s.f_bfree as u64,
        bavail: s.f_bavail as u64,
        files: s.f_files as u64,
        ffree: s.f_ffree as u64,
        favail: s.f_favail as u64,
        fsid: s.f_fsid as u64,
        flag,
        namemax: s.f_namemax as u64,
    })
}

/// Reads up to `len` bytes at `offset` straight into `buf`'s spare capacity (nothing zeroed
/// first, nothing copied after) and appends them; returns how many. Short only at end of file:
/// 0 means end of file. Streams without offsets (fifos, character devices) get one plain
/// `read`.
pub fn read_into(fd: BorrowedFd<'_>, offset: u64, len: usize, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(len);
    let mut done = 0;
    let mut stream = false;
    while done < len {
        let spare = &mut buf.spare_capacity_mut()[..len - done];
        let n = if stream {
            // SAFETY: the kernel writes at most `spare.len()` bytes into `spare`.
            unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) }
        } else {
            let off = libc::off_t::try_from(offset + done as u64).map_err(|_| errno(libc::EINVAL))?;
            // SAFETY: as above.
            unsafe { libc::pread(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), off) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ESPIPE) if done == 0 && !stream => {
                    stream = true;
                    continue;
                }
                _ => return Err(e),
            }
        }
        let n = n as usize;
        // SAFETY: the kernel initialized these `n` bytes, right after the buffer's contents.
        unsafe { buf.set_len(buf.len() + n) };
        done += n;
        // A stream answers what it has; waiting for more could wait for good.
        if n == 0 || stream {
            break;
        }
    }
    Ok(done)
}

/// Writes all of `data` at `offset` (at the end for files opened with APPEND, as pwrite(2)
/// does on Linux); streams without offsets get plain writes.
pub fn write_at(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    let mut stream = false;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: the pointer and length stay inside `data`.
        let n = if stream {
            unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) }
        } else {
            let off = libc::off_t::try_from(offset + done as u64).map_err(|_| errno(libc::EFBIG))?;
            unsafe { libc::pwrite(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), off) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ESPIPE) if !stream => {
                    stream = true;
                    continue;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(errno(libc::EIO));
        }
        done += n as usize;
    }
    Ok(())
}

/// A directory being listed with `getdents64`.
pub struct DirReader {
    fd: OwnedFd,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    /// The root's own listing: its `..` is described as the root itself, not its real parent.
    is_root: bool,
}

impl DirReader {
    fn new(fd: OwnedFd, is_root: bool) -> DirReader {
        DirReader { fd, buf: vec![0; 32 * 1024], pos: 0, len: 0, eof: false, is_root }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The next name, `.` and `..` included.
    fn next_name(&mut self) -> io::Result<Option<CString>> {
        loop {
            if self.pos < self.len {
                // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name NUL-terminated.
                let rec = &self.buf[self.pos..self.len];
                let reclen = rec.get(16..18).map(|b| u16::from_ne_bytes([b[0], b[1]]) as usize);
                let Some(reclen) = reclen.filter(|&r| r > 19 && r <= rec.len()) else {
                    return Err(errno(libc::EIO));
                };
                self.pos += reclen;
                let name = CStr::from_bytes_until_nul(&rec[19..reclen]).map_err(|_| errno(libc::EIO))?;
                return Ok(Some(name.to_owned()));
            }
            if self.eof {
                return Ok(None);
            }
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr(),
                    self.buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.pos = 0;
            self.len = n as usize;
            self.eof = n == 0;
        }
    }

    /// The next batch of at most `max` entries with their lstat; empty at the end. Entries
    /// that vanish between listing and stat are left out.
    pub fn next_batch(&mut self, max: usize) -> io::Result<Vec<(CString, FullStat)>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(name) = self.next_name()? else { break };
            let stat_name: &CStr = if self.is_root && name.as_bytes() == b".." { c"." } else { &name };
            match sys::lstat(self.fd.as_fd(), stat_name) {
                Ok(st) => out.push((name, FullStat::from(&st))),
                Err(e) if is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// The `ls -l` line of a READDIR entry, as OpenSSH's sftp-server formats it (numeric owner and
/// group: the pod has no name service to ask).
pub fn longname(name: &[u8], st: &FullStat, now: i64) -> Vec<u8> {
    let mut line = format!(
        "{} {:>3} {:<8} {:<8} {:>8} {} ",
        mode_string(st.mode),
        st.nlink,
        st.uid,
        st.gid,
        st.size,
        date_string(st.mtime.sec, now)
    )
    .into_bytes();
    line.extend_from_slice(name);
    line
}

fn mode_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => '-',
    };
    let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
    let special = |x: u32, s: u32, on: char, off: char| match (mode & x != 0, mode & s != 0) {
        (true, true) => on,
        (false, true) => off,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

/// `Mon dd HH:MM` for times within the last six months, `Mon dd  YYYY` otherwise, in UTC
/// (a pod's local time zone is UTC, and this keeps the listing independent of libc's).
fn date_string(t: i64, now: i64) -> String {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let month = MONTHS[(m - 1) as usize];
    if t > now - 182 * 86_400 && t < now + 3600 {
        format!("{month} {d:>2} {:02}:{:02}", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{month} {d:>2}  {y}")
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

struct WalkDir {
    reader: DirReader,
    /// The directory's path relative to the walked one; empty for the walked one.
    prefix: Vec<u8>,
    /// Levels below the walked directory: 0 for the walked one.
    depth: u32,
}

/// A depth-first walk in progress: each directory's entries come right after it.
pub struct Walk {
    /// The entry read ahead, with the feed sequence read before its stat was taken: the walked
    /// path itself at first, then the entry that did not fit in the last batch or that showed
    /// the walk was not over.
    next: Option<(u64, WalkEntry)>,
    stack: Vec<WalkDir>,
    /// The deepest level listed; 0: no limit.
    max_depth: u32,
}

impl Walk {
    /// The next batch: at least one entry and at most `max_entries`, within one packet; `seq`
    /// is the feed sequence read just before this call. The batch carries the oldest sequence
    /// any of its stats was taken under, and `eof` once nothing is left, which it knows by
    /// reading one entry ahead. After that, batches are empty. A directory that cannot be
    /// opened (gone, or not readable) is listed without its contents.
    pub fn next_batch(&mut self, max_entries: usize, seq: u64) -> io::Result<WalkBatch> {
        let budget = MAX_PACKET - 1024;
        let mut used = 0;
        let mut batch = WalkBatch { seq, eof: false, entries: Vec::new() };
        loop {
            let (entry_seq, entry) = match self.next.take() {
                Some(next) => next,
                None => match self.read_entry()? {
                    Some(entry) => (seq, entry),
                    None => {
                        batch.eof = true;
                        break;
                    }
                },
            };
            let len = entry.encoded_len();
            if !batch.entries.is_empty() && (batch.entries.len() >= max_entries || used + len > budget) {
                // It opens the next batch, followed by its contents.
                self.next = Some((entry_seq, entry));
                break;
            }
            batch.seq = batch.seq.min(entry_seq);
            used += len;
            batch.entries.push(entry);
        }
        Ok(batch)
    }

    /// The next entry in walk order, its directory opened to be read next; `None` at the end.
    fn read_entry(&mut self) -> io::Result<Option<WalkEntry>> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(name) = top.reader.next_name()? else {
                self.stack.pop();
                continue;
            };
            if name.as_bytes() == b"." || name.as_bytes() == b".." {
                continue;
            }
            let dir = top.reader.fd();
            let st = match sys::lstat(dir, &name) {
                Ok(st) => st,
                Err(e) if is_errno(&e, libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            let mut target = if is_symlink(&st) {
                match sys::readlinkat(dir, &name) {
                    Ok(t) => t,
                    Err(e) if is_errno(&e, libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                }
            } else {
                Vec::new()
            };
            let mut path = top.prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            let depth = top.depth.saturating_add(1);
            let descend = self.max_depth == 0 || depth < self.max_depth;
            let sub = if descend && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                sys::openat(dir.as_raw_fd(), &name, flags).ok()
            } else {
                None
            };
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR && sub.is_none() {
                target = WalkEntry::UNREAD.to_vec();
            }
            let entry =
                WalkEntry { path: Bytes::from(path), stat: FullStat::from(&st), target: target.into() };
            if let Some(fd) = sub {
                let prefix = entry.path.to_vec();
                self.stack.push(WalkDir { reader: DirReader::new(fd, false), prefix, depth });
            }
            return Ok(Some(entry));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn setup() -> (tempfile::TempDir, Fs) {
        let tmp = tempfile::tempdir().unwrap();
        let canon = tmp.path().canonicalize().unwrap();
        let fs = Fs::new(Root::open(&canon).unwrap(), 1, Arc::new(()));
        (tmp, fs)
    }

    fn code<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    #[test]
    fn exact_modes_ignore_the_umask() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        // SAFETY: umask is process-wide; 022 is what the test runner has anyway, so other
        // tests are not disturbed, and the point is that it is not zero.
        unsafe { libc::umask(0o022) };
        let f = fs.open(b"f", open_flags::WRITE | open_flags::CREAT, Some(0o666)).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(r.join("f")).unwrap().permissions().mode() & 0o7777, 0o666);
        fs.open(b"g", open_flags::WRITE | open_flags::CREAT | open_flags::EXCL, Some(0o600)).unwrap();
        assert_eq!(std::fs::metadata(r.join("g")).unwrap().mode() & 0o7777, 0o600);
        // Opening an existing file with CREAT leaves its mode alone.
        fs.open(b"g", open_flags::WRITE | open_flags::CREAT, Some(0o777)).unwrap();
        assert_eq!(std::fs::metadata(r.join("g")).unwrap().mode() & 0o7777, 0o600);
        fs.mkdir(b"d", Some(0o777)).unwrap();
        assert_eq!(std::fs::metadata(r.join("d")).unwrap().mode() & 0o7777, 0o777);
        fs.mknod(b"p", libc::S_IFIFO | 0o662, 0).unwrap();
        let m = std::fs::symlink_metadata(r.join("p")).unwrap().mode();
        assert_eq!(m, libc::S_IFIFO | 0o662);
    }

    #[test]
    fn errors_and_renames() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        fs.mkdir(b"d", None).unwrap();
        std::fs::write(r.join("d/x"), b"1").unwrap();
        assert_eq!(code(fs.rmdir(b"d")), libc::ENOTEMPTY);
        assert_eq!(code(fs.mkdir(b"d", None)), libc::EEXIST);
        assert_eq!(code(fs.remove(b"nope")), libc::ENOENT);
        std::fs::write(r.join("a"), b"aa").unwrap();
        std::fs::write(r.join("b"), b"bbb").unwrap();
        assert_eq!(code(fs.rename_noreplace(b"a", b"b")), libc::EEXIST);
        let e = fs.rename(b"a", b"b", rename_flags::NOREPLACE, None).unwrap_err();
        assert!(matches!(e, OpError::Io(ref e) if is_errno(e, libc::EEXIST)), "{e:?}");
        fs.rename(b"a", b"b", rename_flags::EXCHANGE, None).unwrap();
        assert_eq!(std::fs::read(r.join("b")).unwrap(), b"aa");
        let cond = Condition::of(&fs.stat(b"b", false).unwrap());
        std::fs::write(r.join("b"), b"changed").unwrap();
        assert!(matches!(fs.rename(b"a", b"b", 0, Some(&cond)), Err(OpError::Changed)));
        let cond = Condition::of(&fs.stat(b"b", false).unwrap());
        fs.rename(b"a", b"b", 0, Some(&cond)).unwrap();
        assert_eq!(std::fs::read(r.join("b")).unwrap(), b"bbb");
        assert!(!r.join("a").exists());
    }

    #[test]
    fn setstat_follows_or_not() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        std::fs::write(r.join("f"), b"hello").unwrap();
        symlink("f", r.join("l")).unwrap();
        let t = Timespec { sec: 5_000_000_000, nsec: 123_456_789 };
        let attrs =
            SetAttrs { mode: Some(0o640), size: Some(2), mtime: TimeSet::At(t), ..Default::default() };
        fs.setstat(b"l", &attrs, true).unwrap();
        let st = fs.stat(b"f", false).unwrap();
        assert_eq!((st.mode & 0o7777, st.size, st.mtime), (0o640, 2, t));
        let link_mtime = SetAttrs { mtime: TimeSet::At(Timespec { sec: 7, nsec: 8 }), ..Default::default() };
        fs.setstat(b"l", &link_mtime, false).unwrap();
        assert_eq!(fs.stat(b"l", false).unwrap().mtime, Timespec { sec: 7, nsec: 8 });
        assert_eq!(fs.stat(b"f", false).unwrap().mtime, t);
    }

    #[test]
    fn put_get_and_conditional_write() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        let mtime = Timespec { sec: 1_700_000_000, nsec: 5 };
        let mut put = Put {
            path: Bytes::from_static(b"p"),
            excl: true,
            fsync: true,
            mode: 0o751,
            atime: None,
            mtime: Some(mtime),
            condition: None,
            data: Bytes::from_static(b"content"),
        };
        let st = fs.put(&put).unwrap().stat;
        assert_eq!((st.mode & 0o7777, st.size, st.mtime), (0o751, 7, mtime));
        assert!(matches!(fs.put(&put), Err(OpError::Io(ref e)) if is_errno(e, libc::EEXIST)));
        put.excl = false;
        put.condition = Some(Condition { size: 1, mtime, ino: st.ino });
        assert!(matches!(fs.put(&put), Err(OpError::Changed)));
        put.condition = Some(Condition::of(&st));
        put.data = Bytes::from_static(b"new");
        fs.put(&put).unwrap();
        let names: Vec<_> = std::fs::read_dir(&r).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["p"], "no temporary file is left behind");
        let got = fs.get(b"p", 100).unwrap();
        assert_eq!(got.data.as_ref(), b"new");
        assert!(matches!(fs.get(b"p", 2), Err(OpError::TooLarge { max: 2 })));

        let file = fs.open(b"p", open_flags::WRITE, None).unwrap();
        let cond = Condition::of(&fstat(file.fd.as_fd()).unwrap());
        fs.write_if(&file, 0, &cond, b"NEW!").unwrap();
        // The size changed, whatever the mtime granularity.
        assert!(matches!(fs.write_if(&file, 0, &cond, b"X"), Err(OpError::Changed)));
        assert_eq!(std::fs::read(r.join("p")).unwrap(), b"NEW!");
        let cond = Condition::of(&fstat(file.fd.as_fd()).unwrap());
        std::fs::write(r.join("other"), b"x").unwrap();
        std::fs::rename(r.join("other"), r.join("p")).unwrap();
        assert!(matches!(fs.write_if(&file, 0, &cond, b"Y"), Err(OpError::Changed)));
    }

    /// Every entry of a walk of `path`, read in batches of at most two.
    fn walk_all(fs: &Fs, path: &[u8], max_depth: u32) -> Vec<WalkEntry> {
        let mut walk = fs.walk(path, max_depth).unwrap();
        let mut all = Vec::new();
        loop {
            let batch = walk.next_batch(2, 0).unwrap();
            assert!(!batch.entries.is_empty() && batch.entries.len() <= 2);
            all.extend(batch.entries);
            if batch.eof {
                assert!(walk.next_batch(2, 0).unwrap().entries.is_empty(), "nothing after the end");
                return all;
            }
        }
    }

    fn sorted_paths(entries: &[WalkEntry]) -> Vec<&[u8]> {
        let mut paths: Vec<&[u8]> = entries.iter().map(|e| e.path.as_ref()).collect();
        paths.sort();
        paths
    }

    #[test]
    fn walk_lists_the_subtree_depth_first() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        std::fs::create_dir_all(r.join("w/a/b")).unwrap();
        std::fs::write(r.join("w/a/b/f"), b"").unwrap();
        std::fs::write(r.join("w/g"), b"").unwrap();
        symlink("/etc", r.join("w/l")).unwrap();
        let all = walk_all(&fs, b"w", 0);
        let paths: Vec<&[u8]> = all.iter().map(|e| e.path.as_ref()).collect();
        assert_eq!(sorted_paths(&all), [&b""[..], b"a", b"a/b", b"a/b/f", b"g", b"l"]);
        let pos = |p: &[u8]| paths.iter().position(|x| *x == p).unwrap();
        assert!(pos(b"a") < pos(b"a/b") && pos(b"a/b") < pos(b"a/b/f"));
        assert_eq!(pos(b"a/b") + 1, pos(b"a/b/f"), "a directory's entries follow it");
        assert_eq!(all[pos(b"l")].target.as_ref(), b"/etc");
    }

    /// A change tracker whose sequence the test sets.
    #[derive(Default)]
    struct Seq(AtomicU64);

    impl ChangeTracker for Seq {
        fn sequence(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn own_change(&self, _conn: u64, _abs_path: &Path) {}
        fn own_done(&self, _conn: u64, _abs_path: &Path) {}
    }

    #[test]
    fn walk_batches_know_their_end_and_their_oldest_sequence() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path().canonicalize().unwrap();
        let seq = Arc::new(Seq::default());
        let fs = Fs::new(Root::open(&r).unwrap(), 1, seq.clone());
        std::fs::create_dir(r.join("w")).unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(r.join("w").join(name), b"").unwrap();
        }
        seq.0.store(5, Ordering::SeqCst);
        let mut walk = fs.walk(b"w", 0).unwrap();
        // The walked path was taken under 5; the entry read ahead to fill the batch under 9.
        let first = walk.next_batch(2, 9).unwrap();
        assert_eq!((first.seq, first.eof, first.entries.len()), (5, false, 2));
        let last = walk.next_batch(2, 12).unwrap();
        assert_eq!((last.seq, last.eof, last.entries.len()), (9, true, 2), "the end is known without a read");
        let after = walk.next_batch(2, 13).unwrap();
        assert!(after.eof && after.entries.is_empty());
        // Exactly as many entries as the batch holds: the end still comes with them.
        let all = fs.walk(b"w", 0).unwrap().next_batch(4, 0).unwrap();
        assert_eq!((all.eof, all.entries.len()), (true, 4));
    }

    #[test]
    fn list_is_a_directory_and_its_children_in_one_reply() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        std::fs::create_dir_all(r.join("d/sub")).unwrap();
        std::fs::write(r.join("d/sub/deep"), b"").unwrap();
        std::fs::write(r.join("d/f"), b"12345").unwrap();
        symlink("f", r.join("d/l")).unwrap();
        let list = fs.list(b"d", 10).unwrap();
        assert!(list.complete && list.stat.is_dir());
        assert_eq!(list.stat.ino, std::fs::metadata(r.join("d")).unwrap().ino());
        let mut names: Vec<_> =
            list.entries.iter().map(|e| (e.path.as_ref(), e.stat.size, e.target.as_ref())).collect();
        names.sort();
        let sub_size = std::fs::symlink_metadata(r.join("d/sub")).unwrap().size();
        assert_eq!(names, [(&b"f"[..], 5, &b""[..]), (b"l", 1, b"f"), (b"sub", sub_size, b"")]);

        let partial = fs.list(b"d", 2).unwrap();
        assert!(!partial.complete);
        assert_eq!(partial.entries.len(), 2);
        let exact = fs.list(b"d", 3).unwrap();
        assert!(exact.complete && exact.entries.len() == 3);

        // Not a directory: its own stat and nothing else; a final symlink is not followed.
        let file = fs.list(b"d/f", 10).unwrap();
        assert!(file.complete && file.entries.is_empty() && file.stat.size == 5);
        let link = fs.list(b"d/l", 10).unwrap();
        assert!(link.complete && link.entries.is_empty() && is_symlink_mode(link.stat.mode));
        assert_eq!(code(fs.list(b"nope", 10)), libc::ENOENT);
    }

    fn is_symlink_mode(mode: u32) -> bool {
        mode & libc::S_IFMT == libc::S_IFLNK
    }

    #[test]
    fn walk_stops_at_max_depth() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        std::fs::create_dir_all(r.join("w/a/b/c")).unwrap();
        std::fs::write(r.join("w/a/b/f"), b"").unwrap();
        std::fs::write(r.join("w/a/g"), b"").unwrap();
        std::fs::write(r.join("w/h"), b"").unwrap();
        std::fs::create_dir(r.join("w/e")).unwrap();

        let one = walk_all(&fs, b"w", 1);
        assert_eq!(sorted_paths(&one), [&b""[..], b"a", b"e", b"h"]);
        let a = one.iter().find(|e| e.path.as_ref() == b"a").unwrap();
        assert!(a.stat.is_dir(), "a directory at the limit is listed");
        assert!(a.unread(), "and marked as not read");
        let e = walk_all(&fs, b"w", 0).into_iter().find(|e| e.path.as_ref() == b"e").unwrap();
        assert!(!e.unread(), "an empty directory read is not marked");
        assert_eq!(a.stat.ino, std::fs::metadata(r.join("w/a")).unwrap().ino());

        let two = walk_all(&fs, b"w", 2);
        assert_eq!(sorted_paths(&two), [&b""[..], b"a", b"a/b", b"a/g", b"e", b"h"]);

        let deep = walk_all(&fs, b"w", 3);
        assert_eq!(sorted_paths(&deep), sorted_paths(&walk_all(&fs, b"w", 0)));
        assert_eq!(sorted_paths(&deep).len(), 8);

        // A limit below the walked directory counts from it, not from the root.
        assert_eq!(sorted_paths(&walk_all(&fs, b"w/a", 1)), [&b""[..], b"b", b"g"]);
        // A file walks as one entry whatever the limit.
        assert_eq!(sorted_paths(&walk_all(&fs, b"w/h", 1)), [&b""[..]]);
    }

    #[test]
    fn reads_of_files_and_fifos() {
        let (_t, fs) = setup();
        let r = fs.root().path().to_path_buf();
        std::fs::write(r.join("f"), b"0123456789").unwrap();
        let f = fs.open(b"f", open_flags::READ, None).unwrap();
        // Appended after what the buffer holds, a frame header in the server.
        let mut buf = BytesMut::from(&b"head:"[..]);
        assert_eq!(read_into(f.fd.as_fd(), 8, 100, &mut buf).unwrap(), 2);
        assert_eq!(read_into(f.fd.as_fd(), 10, 100, &mut buf).unwrap(), 0);
        assert_eq!(read_into(f.fd.as_fd(), 0, 3, &mut buf).unwrap(), 3);
        assert_eq!(buf.as_ref(), b"head:89012");
        let (rd, wr) = nix::unistd::pipe().unwrap();
        write_at(wr.as_fd(), 0, b"piped").unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(read_into(rd.as_fd(), 0, 100, &mut buf).unwrap(), 5, "a stream answers what it has");
        assert_eq!(buf.as_ref(), b"piped");
    }

    #[test]
    fn longname_looks_like_ls() {
        let st = FullStat {
            mode: libc::S_IFDIR | 0o4755,
            nlink: 2,
            uid: 0,
            gid: 10,
            size: 4096,
            ..Default::default()
        };
        let line = longname(b"n\xff", &FullStat { mtime: Timespec { sec: 0, nsec: 0 }, ..st }, 1_000_000_000);
        assert_eq!(line, b"drwsr-xr-x   2 0        10           4096 Jan  1  1970 n\xff");
        let recent = FullStat { mtime: Timespec { sec: 999_999_000, nsec: 0 }, ..st };
        let line = longname(b"x", &recent, 1_000_000_000);
        assert!(line.ends_with(b"Sep  9 01:30 x"), "{}", String::from_utf8_lossy(&line));
    }
}
