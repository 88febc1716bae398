//! The fuser adapter: decode a kernel request, call [`Fs`], reply.
//!
//! Each request that may need the network runs as a task on the tokio runtime and replies from
//! there (fuser's replies are `Send`), so a FUSE dispatch thread never waits on a round trip:
//! one slow `stat` in the pod stalls only the process that asked. A request the caches can
//! answer is answered on the dispatch thread (the `*_cached` methods of `fs`): handing it to a
//! task and back costs more than the answer. Nothing here decides semantics; errno comes from
//! `fs`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devmount_server::proto::stat::{FullStat, Timespec};
use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use lru::LruCache;

use crate::cache::{FileKind, RelPath};
use crate::echo::{Echo, Intent, Work, ECHO_FH};
use crate::fs::{Entry, Fs, Names, SetAttr, SetTime};

/// The kernel side of one mount.
pub struct FuseFs {
    fs: Arc<Fs>,
    /// Requests of the echo thread are answered here, never passed to `fs`.
    echo: Arc<Echo>,
    rt: tokio::runtime::Handle,
    /// Listings being read, found again by the offsets the kernel hands back.
    listings: Arc<Mutex<Listings>>,
}

/// Listings snapshotted at a directory read's first request and paged through by the ones
/// that follow. The kernel's opendir handle cannot carry them: a devmount-server mount tells
/// the kernel it needs no opendir (every directory read then costs the daemon nothing while
/// the kernel keeps its copy), so the snapshot's id travels in the high bits of each entry's
/// offset instead. Readers that stop half-way leave theirs to the LRU bound; a snapshot gone
/// is taken again, the offset's low bits still saying how far the reader got.
pub struct Listings {
    snapshots: LruCache<u32, Arc<Names>>,
    next: u32,
}

/// What [`FuseFs::snapshot`] found.
enum Snapshot {
    Ready(u32, Arc<Names>),
    Failed(Errno),
    /// The listing must come from the server: [`fetch_snapshot`], on a task.
    Fetch,
}

/// A new snapshot of directory `ino`'s listing, asking the server.
async fn fetch_snapshot(
    fs: &Fs,
    listings: &Mutex<Listings>,
    ino: INodeNo,
) -> Result<(u32, Arc<Names>), Errno> {
    let names = fs.readdir(ino.0).await.map_err(errno)?;
    Ok(lock(listings).keep(names))
}

/// Offsets: the snapshot's id above bit 32; below, 1 and 2 are `.` and `..`, then 3 + index.
const POSITION_BITS: u32 = 32;
/// Ids stay below 2^30, so offsets stay positive as the kernel's signed `loff_t`.
const SNAPSHOT_IDS: u32 = 1 << 30;
/// Directory reads in progress at once; beyond, the least recent starts again.
const SNAPSHOTS: usize = 1024;
/// How long after a directory's listing is answered its attributes are asked for again
/// ([`Work::Refresh`]): the reader's kernel drops them right after the reply, within this.
const REFRESH_DELAY: Duration = Duration::from_millis(2);

impl Listings {
    fn new() -> Listings {
        Listings {
            snapshots: LruCache::new(std::num::NonZeroUsize::new(SNAPSHOTS).expect("non-zero")),
            next: 1,
        }
    }

    /// The snapshot a read at `offset` goes on with, if still kept (never at offset 0: a
    /// read from the start takes a new one).
    fn get(&mut self, offset: u64) -> Option<(u32, Arc<Names>)> {
        let id = (offset >> POSITION_BITS) as u32;
        let names = self.snapshots.get(&id)?.clone();
        (offset & u64::from(u32::MAX) != 0).then_some((id, names))
    }

    fn keep(&mut self, names: Names) -> (u32, Arc<Names>) {
        let id = self.next;
        self.next = if id + 1 >= SNAPSHOT_IDS { 1 } else { id + 1 };
        let names = Arc::new(names);
        self.snapshots.put(id, names.clone());
        (id, names)
    }

    fn done(&mut self, id: u32) {
        self.snapshots.pop(&id);
    }
}

/// The offset of position `pos` (see [`POSITION_BITS`]) of snapshot `id`.
fn offset_of(id: u32, pos: u64) -> u64 {
    (u64::from(id) << POSITION_BITS) | pos
}

/// Where in its snapshot a read at `offset` goes on.
fn position(offset: u64) -> u64 {
    offset & u64::from(u32::MAX)
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>, echo: Arc<Echo>, rt: tokio::runtime::Handle) -> FuseFs {
        FuseFs { fs, echo, rt, listings: Arc::new(Mutex::new(Listings::new())) }
    }

    /// The intent of the echo thread, if `req` is one of its requests.
    fn echo_intent(&self, req: &Request) -> Option<Option<Intent>> {
        self.echo.is_echo(req.pid()).then(|| self.echo.intent())
    }

    /// The entry the echo thread's request about `path` gets, if its intent names it.
    fn echo_lookup(&self, intent: &Option<Intent>, path: &RelPath) -> Option<Result<Entry, Errno>> {
        let p = path.as_bytes();
        match intent {
            // A rename's target is free as far as the echo is concerned: the server already
            // holds the moved file there, and a target naming the same inode would make the
            // kernel skip the rename (and its MOVED events).
            Some(Intent::Create { path, .. }) | Some(Intent::Rename { to: path, .. }) if path[..] == *p => {
                Some(Err(Errno::ENOENT))
            }
            Some(Intent::Exists { path, stat }) | Some(Intent::Rename { from: path, stat, .. })
                if path[..] == *p =>
            {
                Some(Ok(self.fs.echo_entry(&RelPath::new(path).ok()?, *stat)))
            }
            _ => None,
        }
    }

    /// Runs `work` for request `req` on the runtime with a clone of the file system.
    fn spawn<F, Fut>(&self, req: &Request, work: F)
    where
        F: FnOnce(Arc<Fs>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let fs = self.fs.clone();
        self.rt.spawn(crate::fs::remote::REQUESTER.scope(req.pid(), async move { work(fs).await }));
    }
}

fn errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(u64::from(t.nsec))
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(id: u64, st: &FullStat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.size,
        blocks: st.blocks,
        atime: time(st.atime),
        mtime: time(st.mtime),
        ctime: time(st.ctime),
        crtime: time(st.ctime),
        kind: file_type(FileKind::from_mode(st.mode).unwrap_or(FileKind::Regular)),
        perm: (st.mode & 0o7777) as u16,
        nlink: u32::try_from(st.nlink).unwrap_or(u32::MAX),
        uid: st.uid,
        gid: st.gid,
        rdev: st.rdev as u32,
        blksize: if st.blksize == 0 { 4096 } else { st.blksize },
        flags: 0,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(e) => {
                    let d = e.duration();
                    if d.subsec_nanos() == 0 {
                        (-(d.as_secs() as i64), 0)
                    } else {
                        (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                    }
                }
            };
            SetTime::At(Timespec { sec, nsec })
        }
    }
}

fn reply_entry(reply: ReplyEntry, e: &Entry) {
    reply.entry(&e.ttl, &attr(e.attr.id, &e.attr.stat), Generation(0));
}

/// Answers a lookup; an absent name the caches vouch for is answered as one the kernel may
/// remember (node id 0 with a timeout), so a build's or git's probes for files that do not
/// exist (`.gitignore` in every directory) cost the daemon nothing the second time.
fn reply_lookup(
    fs: &Fs,
    reply: ReplyEntry,
    parent: INodeNo,
    name: &OsStr,
    answer: Result<Entry, nix::errno::Errno>,
) {
    match answer {
        Ok(e) => reply_entry(reply, &e),
        Err(nix::errno::Errno::ENOENT) => match fs.absent_for(parent.0, name) {
            Some(ttl) => reply.entry(&ttl, &absent(), Generation(0)),
            None => reply.error(Errno::ENOENT),
        },
        Err(e) => reply.error(errno(e)),
    }
}

/// The attributes of a negative entry: the kernel reads only the node id (0) and the timeout.
fn absent() -> FileAttr {
    attr(0, &FullStat::default())
}

fn reply_attr(reply: ReplyAttr, answer: Result<Entry, nix::errno::Errno>) {
    match answer {
        Ok(e) => reply.attr(&e.ttl, &attr(e.attr.id, &e.attr.stat)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_open(reply: ReplyOpen, answer: Result<(u64, bool), nix::errno::Errno>, flags: OpenFlags) {
    match answer {
        Ok((fh, keep)) => {
            let mut open = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
            if flags.0 & libc::O_ACCMODE == libc::O_RDONLY {
                // Nothing to report at close for a file not written through this descriptor.
                open |= FopenFlags::FOPEN_NOFLUSH;
            }
            reply.opened(FileHandle(fh), open);
        }
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // readdirplus: `ls -l` and `find` get attributes with the names, no round trip each.
        // Parallel dirops: lookups in one directory need not queue behind each other.
        // No WRITEBACK_CACHE: write-back belongs to the journal, which decides the order.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_EXPLICIT_INVAL_DATA
            | InitFlags::FUSE_CACHE_SYMLINKS;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::debug!("kernel lacks FUSE capabilities {missing:?}");
            let _ = config.add_capabilities(wanted & !missing);
        }
        let _ = config.set_max_readahead(1 << 20);
        // Large writes: each one is a journal record, so fewer and bigger is cheaper.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(intent) = self.echo_intent(req) {
            let answer = self.fs.child_path(parent.0, name).and_then(|p| self.echo_lookup(&intent, &p));
            match answer {
                Some(Ok(e)) => return reply_entry(reply, &e),
                Some(Err(e)) => return reply.error(e),
                None => {}
            }
        }
        if let Some(answer) = self.fs.lookup_cached(parent.0, name) {
            return reply_lookup(&self.fs, reply, parent, name, answer);
        }
        let name = name.to_owned();
        self.spawn(req, move |fs| async move {
            let answer = fs.lookup(parent.0, &name).await;
            reply_lookup(&fs, reply, parent, &name, answer)
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(answer) = self.fs.getattr_cached(ino.0) {
            return reply_attr(reply, answer);
        }
        self.spawn(req, move |fs| async move { reply_attr(reply, fs.getattr(ino.0).await) });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(req, move |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.echo.is_echo(req.pid()) {
            return reply.opened(FileHandle(ECHO_FH), FopenFlags::FOPEN_KEEP_CACHE);
        }
        if let Some(answer) = self.fs.open_cached(ino.0, flags.0) {
            return reply_open(reply, answer, flags);
        }
        self.spawn(req, move |fs| async move { reply_open(reply, fs.open(ino.0, flags.0).await, flags) });
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(req, move |fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 == ECHO_FH || self.fs.release_cached(fh.0) {
            return reply.ok();
        }
        self.spawn(req, move |fs| async move {
            fs.release(fh.0).await;
            reply.ok();
        });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn(req, move |fs| async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if fh.0 == ECHO_FH {
            return reply.ok();
        }
        match self.fs.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        if fh.0 == ECHO_FH {
            return reply.ok();
        }
        self.spawn(req, move |fs| async move {
            match fs.fsync(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if let Some(Some(Intent::Create { path, stat })) = self.echo_intent(req) {
            let Ok(path) = RelPath::new(&path) else { return reply.error(Errno::EINVAL) };
            let known = self.fs.nodes().id_of(&path).is_some();
            let e = self.fs.echo_entry(&path, stat);
            reply.created(
                &e.ttl,
                &attr(e.attr.id, &e.attr.stat),
                Generation(0),
                FileHandle(ECHO_FH),
                FopenFlags::FOPEN_KEEP_CACHE,
            );
            if known {
                // The kernel checks a lookup's size against writes completed since it asked, but
                // not a create's, and cuts its pages to it: a write here that beat this answer
                // would leave zeros. A file it knew before has its pages dropped once created.
                self.echo.notify(Work::Inode { id: e.attr.id, off: 0, len: 0 });
            }
            return;
        }
        let name = name.to_owned();
        self.spawn(req, move |fs| async move {
            match fs.create(parent.0, &name, mode, umask, flags).await {
                Ok((e, fh)) => {
                    let flags = if fs.remote().is_devmount() {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.created(
                        &e.ttl,
                        &attr(e.attr.id, &e.attr.stat),
                        Generation(0),
                        FileHandle(fh),
                        flags,
                    )
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        if let Some(Some(Intent::Create { path, stat })) = self.echo_intent(req) {
            let Ok(path) = RelPath::new(&path) else { return reply.error(Errno::EINVAL) };
            return reply_entry(reply, &self.fs.echo_entry(&path, stat));
        }
        let name = name.to_owned();
        self.spawn(req, move |fs| async move {
            match fs.mkdir(parent.0, &name, mode, umask).await {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = name.to_owned();
        self.spawn(req, move |fs| async move {
            match fs.mknod(parent.0, &name, mode, umask, rdev).await {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let name = link_name.to_owned();
        let target = target.as_os_str().as_bytes().to_vec();
        self.spawn(req, move |fs| async move {
            match fs.symlink(parent.0, &name, &target).await {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, reply, false);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, reply, true);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if self.echo.is_echo(req.pid()) {
            if let (Some(from), Some(to)) =
                (self.fs.child_path(parent.0, name), self.fs.child_path(newparent.0, newname))
            {
                // As for a remove: a name changed here since the replay was queued stands.
                if self.fs.is_local(&from) || self.fs.is_local(&to) {
                    return reply.error(Errno::EBUSY);
                }
                self.fs.nodes().rename(&from, &to);
            }
            return reply.ok();
        }
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn(req, move |fs| async move {
            match fs.rename(parent.0, &name, newparent.0, &newname, flags.bits()).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let newname = newname.to_owned();
        self.spawn(req, move |fs| async move {
            match fs.link(ino.0, newparent.0, &newname).await {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if self.echo.is_echo(req.pid()) {
            // The echo's utimensat: answer with what the server has, change nothing.
            return self.getattr(req, ino, None, reply);
        }
        let set = SetAttr { mode, uid, gid, size, atime: atime.map(set_time), mtime: mtime.map(set_time) };
        self.spawn(req, move |fs| async move {
            match fs.setattr(ino.0, set).await {
                Ok(e) => reply.attr(&e.ttl, &attr(e.attr.id, &e.attr.stat)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself and asks only for existence.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.fs.has_feed() {
            // From now on the kernel opens directories itself, without asking, and keeps what
            // it reads of them (FOPEN_CACHE_DIR) until the feed's invalidation of a directory
            // (`inval_inode(dir, 0, 0)`) or a change through the mount drops its copy: a warm
            // `ls` or `find` costs the daemon nothing.
            return reply.error(Errno::ENOSYS);
        }
        // Without a feed nothing vouches for a listing the kernel would keep: every read from
        // the start asks again.
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        match self.snapshot(ino, offset) {
            Snapshot::Ready(id, names) => self.readdir_from(ino, id, &names, position(offset), reply),
            Snapshot::Failed(e) => reply.error(e),
            Snapshot::Fetch => {
                let (listings, echo) = (self.listings.clone(), self.echo.clone());
                self.spawn(req, move |fs| async move {
                    match fetch_snapshot(&fs, &listings, ino).await {
                        Ok((id, names)) => {
                            let done = add_names(ino, id, &names, position(offset), reply);
                            after_reply(&fs, &echo, &listings, ino, id, &names, done);
                        }
                        Err(e) => reply.error(e),
                    }
                });
            }
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        match self.snapshot(ino, offset) {
            Snapshot::Ready(id, names) => self.readdirplus_from(req, ino, id, names, position(offset), reply),
            Snapshot::Failed(e) => reply.error(e),
            Snapshot::Fetch => {
                let (listings, echo) = (self.listings.clone(), self.echo.clone());
                self.spawn(req, move |fs| async move {
                    match fetch_snapshot(&fs, &listings, ino).await {
                        Ok((id, names)) => {
                            let done = plus_rest(&fs, ino, id, &names, position(offset), reply).await;
                            after_reply(&fs, &echo, &listings, ino, id, &names, done);
                        }
                        Err(e) => reply.error(e),
                    }
                });
            }
        }
    }

    fn destroy(&mut self) {
        self.echo.stop();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(req, move |fs| async move {
            match fs.statfs().await {
                Ok(v) => reply.statfs(
                    v.blocks,
                    v.bfree,
                    v.bavail,
                    v.files,
                    v.ffree,
                    v.bsize as u32,
                    v.namemax as u32,
                    v.frsize as u32,
                ),
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

/// Adds `.` and `..` of snapshot `id` from position `at` (below 2) with the directory's
/// attributes, if known; true if the reply is full.
fn add_dots(reply: &mut ReplyDirectoryPlus, ino: INodeNo, id: u32, at: u64, dir: Option<Entry>) -> bool {
    let Some(dir) = dir else { return false };
    let a = attr(ino.0, &dir.attr.stat);
    let dots: [&[u8]; 2] = [b".", b".."];
    // The kernel takes no reference for `.` and `..`.
    dots.iter().enumerate().skip(at as usize).any(|(i, name)| {
        let off = offset_of(id, i as u64 + 1);
        reply.add(INodeNo(ino.0), off, OsStr::from_bytes(name), &Duration::ZERO, &a, Generation(0))
    })
}

/// Adds item `i` of snapshot `id`, as `entry` says it is now (`None`: gone since the snapshot,
/// left out); true if the reply is full.
fn add_plus(
    fs: &Fs,
    reply: &mut ReplyDirectoryPlus,
    id: u32,
    i: usize,
    name: &[u8],
    entry: Option<Entry>,
) -> bool {
    let Some(entry) = entry else { return false };
    let a = attr(entry.attr.id, &entry.attr.stat);
    let off = offset_of(id, i as u64 + 3);
    if reply.add(INodeNo(entry.attr.id), off, OsStr::from_bytes(name), &entry.ttl, &a, Generation(0)) {
        // Full: the kernel never sees this entry, so holds no reference to it.
        fs.forget(entry.attr.id, 1);
        return true;
    }
    false
}

/// Whether a read from position `at` finds nothing left of `names`: the reader is done.
fn past_end(names: &Names, at: u64) -> bool {
    at >= names.items.len() as u64 + 2
}

/// A plain readdir's reply from position `at` of snapshot `id`; true if the reader is done.
fn add_names(ino: INodeNo, id: u32, names: &Names, at: u64, mut reply: ReplyDirectory) -> bool {
    let dots: [(&[u8], u64); 2] = [(b".", ino.0), (b"..", ino.0)];
    let mut full = dots.iter().enumerate().skip(at as usize).any(|(i, (name, ino))| {
        reply.add(INodeNo(*ino), offset_of(id, i as u64 + 1), FileType::Directory, OsStr::from_bytes(name))
    });
    for (i, item) in names.items.iter().enumerate().skip(at.saturating_sub(2) as usize) {
        if full {
            break;
        }
        // The inode number of a plain readdir is informational, and looking each one up would
        // cost a round trip per name.
        let off = offset_of(id, i as u64 + 3);
        full = reply.add(INodeNo(u64::MAX), off, file_type(item.kind), OsStr::from_bytes(&item.name));
    }
    reply.ok();
    past_end(names, at)
}

/// The rest of a readdirplus from position `at` of snapshot `id`, asking the server for what
/// the caches do not know; true if the reader is done.
async fn plus_rest(
    fs: &Fs,
    ino: INodeNo,
    id: u32,
    names: &Names,
    at: u64,
    mut reply: ReplyDirectoryPlus,
) -> bool {
    if at < 2 {
        let dir = fs.getattr(ino.0).await.ok();
        if add_dots(&mut reply, ino, id, at, dir) {
            reply.ok();
            return false;
        }
    }
    for (i, item) in names.items.iter().enumerate().skip((at.max(2) - 2) as usize) {
        let entry = fs.plus_entry(ino.0, &item.name).await;
        if add_plus(fs, &mut reply, id, i, &item.name, entry) {
            reply.ok();
            return false;
        }
    }
    reply.ok();
    past_end(names, at)
}

/// After a reply from snapshot `id` of directory `ino`: a finished reader's snapshot goes, and
/// names the kernel may have kept (all, on a mount without opendir; see
/// [`Filesystem::opendir`]) but that are not the directory's current listing as the feed keeps
/// it are dropped from the kernel's copy.
fn after_reply(
    fs: &Fs,
    echo: &Echo,
    listings: &Mutex<Listings>,
    ino: INodeNo,
    id: u32,
    names: &Names,
    done: bool,
) {
    if done {
        lock(listings).done(id);
    }
    if fs.has_feed() && !fs.names_current(ino.0, names) {
        echo.notify(Work::Inode { id: ino.0, off: 0, len: 0 });
    } else if done {
        refresh_attrs(fs, echo, ino.0);
    }
}

/// The kernel has just read directory `id`'s listing from the daemon, and drops its access
/// time after such a read: its attributes are asked for again off the reader's path
/// ([`Work::Refresh`]), so the next `stat` is answered by the kernel. Only with a feed, which
/// keeps them for long. Not done for files: one per file read made a cold `grep -r` a third
/// slower for less than it saved the next one.
fn refresh_attrs(fs: &Fs, echo: &Echo, id: u64) {
    if !fs.has_feed() {
        return;
    }
    if let Ok(path) = fs.path_of(id) {
        let after = std::time::Instant::now() + REFRESH_DELAY;
        echo.notify(Work::Refresh { path: bytes::Bytes::copy_from_slice(path.as_bytes()), after });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Snapshots and counters only: nothing a panic half-way could leave inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FuseFs {
    /// unlink (`dir` false) or rmdir (`dir` true).
    fn remove(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty, dir: bool) {
        if self.echo.is_echo(req.pid()) {
            // Gone on the server already: the kernel only needs to hear it happen. Unless the
            // name was changed here since the feed queued the replay: the mount's state stands
            // (and the feed's own notices leave names changed here alone too).
            if let Some(path) = self.fs.child_path(parent.0, name) {
                if self.fs.is_local(&path) {
                    return reply.error(Errno::EBUSY);
                }
                self.fs.nodes().unlink(&path);
            }
            return reply.ok();
        }
        let name = name.to_owned();
        self.spawn(req, move |fs| async move {
            let result = if dir { fs.rmdir(parent.0, &name).await } else { fs.unlink(parent.0, &name).await };
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn lock_listings(&self) -> MutexGuard<'_, Listings> {
        lock(&self.listings)
    }

    /// The snapshot a directory read at `offset` pages through, when no request to the server
    /// is needed: the one the offset names, else a new one from the caches.
    fn snapshot(&self, ino: INodeNo, offset: u64) -> Snapshot {
        let known = self.lock_listings().get(offset);
        if let Some((id, names)) = known {
            return Snapshot::Ready(id, names);
        }
        match self.fs.readdir_cached(ino.0) {
            Some(Ok(names)) => {
                let (id, names) = self.lock_listings().keep(names);
                Snapshot::Ready(id, names)
            }
            Some(Err(e)) => Snapshot::Failed(errno(e)),
            None => Snapshot::Fetch,
        }
    }

    /// Plain readdir from position `at` of snapshot `id`; it only serves kernels without
    /// readdirplus.
    fn readdir_from(&self, ino: INodeNo, id: u32, names: &Arc<Names>, at: u64, reply: ReplyDirectory) {
        let done = add_names(ino, id, names, at, reply);
        after_reply(&self.fs, &self.echo, &self.listings, ino, id, names, done);
    }

    /// Readdirplus from position `at` of snapshot `id`: on this thread as far as the caches
    /// answer; a task goes on from the first entry that needs the server.
    fn readdirplus_from(
        &self,
        req: &Request,
        ino: INodeNo,
        id: u32,
        names: Arc<Names>,
        mut at: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = &self.fs;
        let task = |at: u64, reply: ReplyDirectoryPlus, names: Arc<Names>| {
            let (listings, echo) = (self.listings.clone(), self.echo.clone());
            self.spawn(req, move |fs| async move {
                let done = plus_rest(&fs, ino, id, &names, at, reply).await;
                after_reply(&fs, &echo, &listings, ino, id, &names, done);
            });
        };
        if at < 2 {
            match fs.getattr_cached(ino.0) {
                Some(dir) => {
                    if add_dots(&mut reply, ino, id, at, dir.ok()) {
                        return reply.ok();
                    }
                    at = 2;
                }
                None => return task(at, reply, names),
            }
        }
        let start = at;
        for (i, item) in names.items.iter().enumerate().skip(at as usize - 2) {
            let Some(entry) = fs.plus_entry_cached(ino.0, &item.name) else {
                return task(i as u64 + 2, reply, names.clone());
            };
            if add_plus(fs, &mut reply, id, i, &item.name, entry) {
                reply.ok();
                return after_reply(fs, &self.echo, &self.listings, ino, id, &names, false);
            }
        }
        reply.ok();
        after_reply(fs, &self.echo, &self.listings, ino, id, &names, past_end(&names, start));
    }
}
