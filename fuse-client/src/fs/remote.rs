//! The server as the file system sees it: requests by path relative to the mount root, answers
//! as full stats, errors as errno.
//!
//! Two kinds of server stand behind it. devmount-server answers the `@devmount` extensions:
//! full stats with inode numbers and nanosecond times, each with the feed sequence it was
//! taken at, and whole listings with stats in one walk. A plain OpenSSH server answers SFTP v3:
//! whole seconds, no inode numbers, and no sequence (the caller uses the cache's applied
//! sequence as a lower bound).

use bytes::{BufMut, Bytes, BytesMut};
use devmount_server::proto::sftp::{ext, open_flags, Attrs, StatVfs};
use devmount_server::proto::stat::{FullStat, Timespec};
use devmount_server::sftp::client::{ServerInfo, SftpClient, SftpError};
use nix::errno::Errno;

use crate::cache::{FileKind, ListingEntry, RelPath};

/// Names per walk batch when listing a directory.
const LIST_BATCH: u32 = 4096;

pub type Result<T> = std::result::Result<T, Errno>;

/// SFTP over one connection, rooted at the mount's remote path.
pub struct Remote {
    sftp: SftpClient,
    info: ServerInfo,
    /// The remote directory mounted, absolute, without a trailing slash ("" for `/`).
    base: Bytes,
    devmount: bool,
}

/// A stat and the feed sequence the server read before taking it (`None`: no feed).
pub struct Stat {
    pub stat: FullStat,
    pub seq: Option<u64>,
}

impl Remote {
    pub fn new(sftp: SftpClient, info: ServerInfo, base: &[u8]) -> Remote {
        let base = Bytes::copy_from_slice(base.strip_suffix(b"/").unwrap_or(base));
        let devmount = info.has(ext::STAT) && info.has(ext::WALK);
        Remote { sftp, info, base, devmount }
    }

    /// Whether the server speaks the `@devmount` extensions (and so has a feed).
    pub fn is_devmount(&self) -> bool {
        self.devmount
    }

    pub fn sftp(&self) -> &SftpClient {
        &self.sftp
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
            let r = self.sftp.dev_stat(&path, false).await.map_err(errno)?;
            Ok(Stat { stat: r.stat, seq: Some(r.seq) })
        } else {
            let attrs = self.sftp.lstat(&path).await.map_err(errno)?;
            Ok(Stat { stat: stat_from_attrs(&attrs), seq: None })
        }
    }

    /// Every name in `rel` with its stat, and the directory's own stat.
    pub async fn list(&self, rel: &RelPath) -> Result<(Vec<ListingEntry>, Option<Stat>)> {
        let path = self.abs(rel);
        let mut entries = Vec::new();
        if self.devmount {
            let handle = self.sftp.dev_walk(&path, LIST_BATCH, 1).await.map_err(errno)?;
            let mut own = None;
            let mut seq = None;
            let result = async {
                while let Some(batch) = self.sftp.dev_walk_read(&handle).await? {
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
            let _ = self.sftp.close(&handle).await;
            result.map_err(errno)?;
            let own = own.map(|stat| Stat { stat, seq });
            Ok((entries, own))
        } else {
            let handle = self.sftp.opendir(&path).await.map_err(errno)?;
            let result = async {
                while let Some(names) = self.sftp.readdir(&handle).await? {
                    for n in names.into_iter().filter(|n| n.filename[..] != *b"." && n.filename[..] != *b"..") {
                        let stat = stat_from_attrs(&n.attrs);
                        let Some(kind) = FileKind::from_mode(stat.mode) else { continue };
                        entries.push(ListingEntry { name: n.filename, kind, meta: Some(stat) });
                    }
                }
                Ok::<(), SftpError>(())
            }
            .await;
            let _ = self.sftp.close(&handle).await;
            result.map_err(errno)?;
            Ok((entries, None))
        }
    }

    pub async fn readlink(&self, rel: &RelPath) -> Result<Bytes> {
        self.sftp.readlink(&self.abs(rel)).await.map_err(errno)
    }

    /// Opens `rel` for reading; the handle is closed with [`Remote::close`].
    pub async fn open_read(&self, rel: &RelPath) -> Result<Bytes> {
        self.sftp.open(&self.abs(rel), open_flags::READ, &Attrs::default()).await.map_err(errno)
    }

    pub async fn read(&self, handle: &Bytes, offset: u64, len: u32) -> Result<Bytes> {
        match self.sftp.read(handle, offset, len).await {
            Ok(data) => Ok(data),
            Err(e) if e.errno() == libc::ENODATA => Ok(Bytes::new()),
            Err(e) => Err(errno(e)),
        }
    }

    pub async fn close(&self, handle: &Bytes) -> Result<()> {
        self.sftp.close(handle).await.map_err(errno)
    }

    /// The whole of a small file with its stat, in one request (devmount-server only).
    pub async fn get(&self, rel: &RelPath, max_size: u64) -> Result<(Stat, Bytes)> {
        let r = self.sftp.dev_get(&self.abs(rel), max_size).await.map_err(errno)?;
        Ok((Stat { stat: r.stat, seq: Some(r.seq) }, r.data))
    }

    pub async fn statvfs(&self, rel: &RelPath) -> Result<StatVfs> {
        if !self.info.has(ext::STATVFS) {
            return Err(Errno::ENOSYS);
        }
        self.sftp.statvfs(&self.abs(rel)).await.map_err(errno)
    }
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
