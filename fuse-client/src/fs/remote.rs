//! The server as the file system sees it: requests by path relative to the mount root, answers
//! as full stats, errors as errno.
//!
//! Two kinds of server stand behind it. devmount-server answers the `@devmount` extensions:
//! full stats with inode numbers and nanosecond times, each with the feed sequence it was
//! taken at, and whole listings with stats in one walk. A plain OpenSSH server answers SFTP v3:
//! whole seconds, no inode numbers, and no sequence (the caller uses the cache's applied
//! sequence as a lower bound).

use std::sync::RwLock;

use bytes::{BufMut, Bytes, BytesMut};
use devmount_server::proto::sftp::{ext, open_flags, Attrs, StatVfs};
use devmount_server::proto::stat::{FullStat, Timespec};
use devmount_server::sftp::client::{ServerInfo, SftpClient, SftpError};
use nix::errno::Errno;
use tokio::sync::watch;

use crate::cache::{FileKind, ListingEntry, RelPath};

/// Names per walk batch when listing a directory.
const LIST_BATCH: u32 = 4096;

pub type Result<T> = std::result::Result<T, Errno>;

/// SFTP rooted at the mount's remote path, over whichever connection is current: after a
/// reconnect ([`Remote::replace`]) requests go over the new one. A request that meets a lost
/// connection waits for the next one and is sent again (every request here is idempotent:
/// lookups and reads; changes go through the journal, which has its own rules), unless the
/// process that asked is interrupted meanwhile (EINTR).
pub struct Remote {
    conn: RwLock<Conn>,
    /// The generation of the current connection; bumped by each reconnect.
    generation: watch::Sender<u64>,
    info: ServerInfo,
    /// The remote directory mounted, absolute, without a trailing slash ("" for `/`).
    base: Bytes,
    devmount: bool,
}

#[derive(Clone)]
struct Conn {
    sftp: SftpClient,
    generation: u64,
}

/// A server handle, valid on the connection it was opened on only.
#[derive(Debug, Clone)]
pub struct Handle {
    raw: Bytes,
    generation: u64,
}

impl Handle {
    pub fn same(&self, other: &Handle) -> bool {
        self.raw == other.raw && self.generation == other.generation
    }
}

/// A stat and the feed sequence the server read before taking it (`None`: no feed).
pub struct Stat {
    pub stat: FullStat,
    pub seq: Option<u64>,
}

tokio::task_local! {
    /// The process a FUSE request came from, so a wait for the server can end when it is
    /// interrupted.
    pub static REQUESTER: u32;
}

/// How often a request waiting for a reconnect looks for a signal to its process.
const SIGNAL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl Remote {
    pub fn new(sftp: SftpClient, info: ServerInfo, base: &[u8]) -> Remote {
        let base = Bytes::copy_from_slice(base.strip_suffix(b"/").unwrap_or(base));
        let devmount = info.has(ext::STAT) && info.has(ext::WALK);
        Remote {
            conn: RwLock::new(Conn { sftp, generation: 0 }),
            generation: watch::Sender::new(0),
            info,
            base,
            devmount,
        }
    }

    /// Whether the server speaks the `@devmount` extensions (and so has a feed).
    pub fn is_devmount(&self) -> bool {
        self.devmount
    }

    /// The current connection's SFTP client.
    pub fn sftp(&self) -> SftpClient {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).sftp.clone()
    }

    /// Sends later requests over a new connection, and wakes those waiting for one.
    pub fn replace(&self, sftp: SftpClient) {
        let mut conn = self.conn.write().unwrap_or_else(|e| e.into_inner());
        *conn = Conn { sftp, generation: conn.generation + 1 };
        self.generation.send_replace(conn.generation);
    }

    fn conn(&self) -> Conn {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `request` about `path` on the current connection; when the connection is lost,
    /// waits for the next one and runs it again.
    async fn call<T, F>(&self, path: &Bytes, request: impl Fn(SftpClient, Bytes) -> F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, SftpError>>,
    {
        loop {
            let conn = self.conn();
            match request(conn.sftp.clone(), path.clone()).await {
                Err(SftpError::ConnectionLost) => self.newer_than(conn.generation).await?,
                r => return r.map_err(errno),
            }
        }
    }

    /// Waits for a connection newer than `generation`: EINTR if the requesting process gets a
    /// signal first.
    async fn newer_than(&self, generation: u64) -> Result<()> {
        let mut rx = self.generation.subscribe();
        let newer = rx.wait_for(|&g| g > generation);
        tokio::pin!(newer);
        let requester = REQUESTER.try_with(|pid| *pid).ok();
        loop {
            tokio::select! {
                r = &mut newer => return r.map(|_| ()).map_err(|_| Errno::ENOTCONN),
                () = tokio::time::sleep(SIGNAL_POLL), if requester.is_some() => {
                    if requester.is_some_and(signal_pending) {
                        return Err(Errno::EINTR);
                    }
                }
            }
        }
    }

    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// The largest read the server takes in one request.
    pub fn read_len(&self) -> u32 {
        self.info.read_len()
    }

    pub fn abs(&self, rel: &RelPath) -> Bytes {
        if rel.is_root() {
            return if self.base.is_empty() { Bytes::from_static(b"/") } else { self.base.clone() };
        }
        let mut p = BytesMut::with_capacity(self.base.len() + 1 + rel.as_bytes().len());
        p.put_slice(&self.base);
        p.put_u8(b'/');
        p.put_slice(rel.as_bytes());
        p.freeze()
    }

    /// `lstat` of `rel`.
    pub async fn stat(&self, rel: &RelPath) -> Result<Stat> {
        let path = self.abs(rel);
        if self.devmount {
            let r = self.call(&path, |sftp, path| async move { sftp.dev_stat(&path, false).await }).await?;
            Ok(Stat { stat: r.stat, seq: Some(r.seq) })
        } else {
            let attrs = self.call(&path, |sftp, path| async move { sftp.lstat(&path).await }).await?;
            Ok(Stat { stat: stat_from_attrs(&attrs), seq: None })
        }
    }

    /// Every name in `rel` with its stat, and the directory's own stat.
    pub async fn list(&self, rel: &RelPath) -> Result<(Vec<ListingEntry>, Option<Stat>)> {
        let path = self.abs(rel);
        if self.devmount {
            self.call(&path, |sftp, path| async move { list_devmount(&sftp, &path).await }).await
        } else {
            self.call(&path, |sftp, path| async move { list_v3(&sftp, &path).await })
                .await
                .map(|entries| (entries, None))
        }
    }

    pub async fn readlink(&self, rel: &RelPath) -> Result<Bytes> {
        let path = self.abs(rel);
        self.call(&path, |sftp, path| async move { sftp.readlink(&path).await }).await
    }

    /// Opens `rel` for reading; the handle is closed with [`Remote::close`].
    pub async fn open_read(&self, rel: &RelPath) -> Result<Handle> {
        let path = self.abs(rel);
        loop {
            let conn = self.conn();
            match conn.sftp.open(&path, open_flags::READ, &Attrs::default()).await {
                Ok(raw) => return Ok(Handle { raw, generation: conn.generation }),
                Err(SftpError::ConnectionLost) => self.newer_than(conn.generation).await?,
                Err(e) => return Err(errno(e)),
            }
        }
    }

    /// Reads through `handle`: ESTALE once its connection is gone (and a new one is up), so
    /// the caller opens the file again.
    pub async fn read(&self, handle: &Handle, offset: u64, len: u32) -> Result<Bytes> {
        let conn = self.conn();
        if conn.generation != handle.generation {
            return Err(Errno::ESTALE);
        }
        match conn.sftp.read(&handle.raw, offset, len).await {
            Ok(data) => Ok(data),
            Err(e) if e.errno() == libc::ENODATA => Ok(Bytes::new()),
            Err(SftpError::ConnectionLost) => {
                self.newer_than(conn.generation).await?;
                Err(Errno::ESTALE)
            }
            Err(e) => Err(errno(e)),
        }
    }

    /// Closes `handle`; one of a lost connection is gone already.
    pub async fn close(&self, handle: &Handle) -> Result<()> {
        let conn = self.conn();
        if conn.generation != handle.generation {
            return Ok(());
        }
        conn.sftp.close(&handle.raw).await.map_err(errno)
    }

    /// The whole of a small file with its stat, in one request (devmount-server only).
    pub async fn get(&self, rel: &RelPath, max_size: u64) -> Result<(Stat, Bytes)> {
        let path = self.abs(rel);
        let r = self.call(&path, |sftp, path| async move { sftp.dev_get(&path, max_size).await }).await?;
        Ok((Stat { stat: r.stat, seq: Some(r.seq) }, r.data))
    }

    /// A sequence number such that the feed has published every change the server made
    /// before this call (devmount-server only). Not retried: a feed sequence belongs to one
    /// connection's feed.
    pub async fn barrier(&self) -> Result<u64> {
        self.conn().sftp.dev_barrier().await.map_err(errno)
    }

    pub async fn statvfs(&self, rel: &RelPath) -> Result<StatVfs> {
        if !self.info.has(ext::STATVFS) {
            return Err(Errno::ENOSYS);
        }
        let path = self.abs(rel);
        self.call(&path, |sftp, path| async move { sftp.statvfs(&path).await }).await
    }
}

/// A listing with `list@devmount`: one round trip for all but huge directories; those are
/// walked in batches.
async fn list_devmount(
    sftp: &SftpClient,
    path: &[u8],
) -> std::result::Result<(Vec<ListingEntry>, Option<Stat>), SftpError> {
    let mut entries = Vec::new();
    let reply = sftp.dev_list(path, LIST_BATCH).await?;
    if reply.complete {
        for e in reply.entries {
            let Some(kind) = FileKind::from_mode(e.stat.mode) else { continue };
            entries.push(ListingEntry { name: e.path, kind, meta: Some(e.stat) });
        }
        return Ok((entries, Some(Stat { stat: reply.stat, seq: Some(reply.seq) })));
    }
    let handle = sftp.dev_walk(path, LIST_BATCH, 1).await?;
    let mut own = None;
    let mut seq = None;
    let result = async {
        while let Some(batch) = sftp.dev_walk_read(&handle).await? {
            // The oldest batch's sequence vouches for the whole listing.
            seq.get_or_insert(batch.seq);
            for e in batch.entries {
                if e.path.is_empty() {
                    own = Some(e.stat);
                    continue;
                }
                let Some(kind) = FileKind::from_mode(e.stat.mode) else { continue };
                entries.push(ListingEntry { name: e.path, kind, meta: Some(e.stat) });
            }
        }
        Ok::<(), SftpError>(())
    }
    .await;
    let _ = sftp.close(&handle).await;
    result?;
    Ok((entries, own.map(|stat| Stat { stat, seq })))
}

/// A listing with OPENDIR and READDIR.
async fn list_v3(sftp: &SftpClient, path: &[u8]) -> std::result::Result<Vec<ListingEntry>, SftpError> {
    let mut entries = Vec::new();
    let handle = sftp.opendir(path).await?;
    let result = async {
        while let Some(names) = sftp.readdir(&handle).await? {
            for n in names.into_iter().filter(|n| n.filename[..] != *b"." && n.filename[..] != *b"..") {
                let stat = stat_from_attrs(&n.attrs);
                let Some(kind) = FileKind::from_mode(stat.mode) else { continue };
                entries.push(ListingEntry { name: n.filename, kind, meta: Some(stat) });
            }
        }
        Ok::<(), SftpError>(())
    }
    .await;
    let _ = sftp.close(&handle).await;
    result?;
    Ok(entries)
}

/// Whether thread `tid` has a signal pending that it does not block (what would interrupt a
/// system call), from /proc: fuser does not pass FUSE_INTERRUPT on, so a request waiting for a
/// reconnect looks for itself. Hand-written: no crate reads these fields.
fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        // The process is gone: nobody waits for the answer.
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    let blocked = field("SigBlk:");
    let ignored = field("SigIgn:");
    pending & !blocked & !ignored != 0
}

pub fn errno(e: SftpError) -> Errno {
    Errno::from_raw(e.errno())
}

/// A v3 stat as a full stat: whole seconds, no inode number (0), times absent taken as 0.
pub fn stat_from_attrs(a: &Attrs) -> FullStat {
    let (uid, gid) = a.uid_gid.unwrap_or((0, 0));
    let (atime, mtime) = a.atime_mtime.unwrap_or((0, 0));
    let ts = |s: u32| Timespec { sec: i64::from(s), nsec: 0 };
    let size = a.size.unwrap_or(0);
    let mode = a.permissions.unwrap_or(libc::S_IFREG | 0o644);
    FullStat {
        mode,
        nlink: if mode & libc::S_IFMT == libc::S_IFDIR { 2 } else { 1 },
        uid,
        gid,
        size,
        blocks: size.div_ceil(512),
        blksize: 4096,
        atime: ts(atime),
        mtime: ts(mtime),
        ctime: ts(mtime),
        ..FullStat::default()
    }
}
