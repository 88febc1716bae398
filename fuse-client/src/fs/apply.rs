//! How a journaled op becomes SFTP requests: the journal's [`journal::Remote`] over the mount's
//! connection.
//!
//! Writes reuse one open server handle per file instead of an OPEN and CLOSE around each: the
//! handle is dropped when an op changes the file's name (rename, unlink, rmdir), so a handle
//! never outlives the name it was opened by.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use devmount_server::proto::sftp::{
    ext, open_flags, rename_flags, Attrs, Put, SetAttrs, StatusCode, TimeSet,
};
use devmount_server::sftp::client::{SftpClient, SftpError};
use tokio::sync::OnceCell;

use super::remote::Remote;
use crate::cache::RelPath;
use crate::journal::{self, Op, RemoteError};

/// Applies journal ops on the server, over the connection current when it was made: once
/// that connection is lost every op fails as disconnected, and the sender resumes with a new
/// applier after the reconnect (the open handles died with the connection).
pub struct Applier {
    remote: Arc<Remote>,
    sftp: SftpClient,
    /// Open write handles by relative path.
    handles: Mutex<HashMap<Bytes, Arc<OnceCell<Bytes>>>>,
}

impl Applier {
    pub fn new(remote: Arc<Remote>) -> Applier {
        let sftp = remote.sftp();
        Applier { remote, sftp, handles: Mutex::new(HashMap::new()) }
    }

    fn sftp(&self) -> &SftpClient {
        &self.sftp
    }

    fn abs(&self, rel: &[u8]) -> Result<Bytes, RemoteError> {
        let rel = RelPath::new(rel)
            .map_err(|e| RemoteError::Rejected { errno: libc::EINVAL, message: e.to_string() })?;
        Ok(self.remote.abs(&rel))
    }

    /// The write handle of `rel`, opened on first use.
    async fn handle(&self, rel: &Bytes) -> Result<Bytes, RemoteError> {
        let cell =
            self.handles.lock().unwrap_or_else(|e| e.into_inner()).entry(rel.clone()).or_default().clone();
        let abs = self.abs(rel)?;
        let h = cell
            .get_or_try_init(|| async {
                self.sftp().open(&abs, open_flags::WRITE | open_flags::READ, &Attrs::default()).await
            })
            .await;
        match h {
            Ok(h) => Ok(h.clone()),
            Err(e) => {
                self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(rel);
                Err(remote_error(e))
            }
        }
    }

    /// Drops the handles of `rel` and everything below it, and closes them on the server
    /// without waiting: the op that made them stale (a rename, an unlink, a put) does not
    /// depend on the close, so it costs no round trip of its own.
    fn forget(&self, rel: &[u8]) {
        let gone: Vec<Arc<OnceCell<Bytes>>> = {
            let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<Bytes> = handles
                .keys()
                .filter(|k| k[..] == *rel || (k.starts_with(rel) && k.get(rel.len()) == Some(&b'/')))
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| handles.remove(&k)).collect()
        };
        for cell in gone {
            if let Some(h) = cell.get().cloned() {
                let sftp = self.sftp().clone();
                tokio::spawn(async move { sftp.close(&h).await });
            }
        }
    }

    /// Closes every cached handle (unmount).
    pub async fn close_all(&self) {
        let all: Vec<Arc<OnceCell<Bytes>>> =
            self.handles.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, v)| v).collect();
        for cell in all {
            if let Some(h) = cell.get() {
                let _ = self.sftp().close(h).await;
            }
        }
    }

    async fn run(&self, op: &Op) -> Result<(), RemoteError> {
        let sftp = self.sftp();
        let abs = |p: &[u8]| self.abs(p);
        match op {
            Op::Create { path, mode, exclusive } => {
                let mut flags = open_flags::WRITE | open_flags::READ | open_flags::CREAT;
                if *exclusive {
                    flags |= open_flags::EXCL;
                }
                let attrs = Attrs { permissions: Some(*mode & 0o7777), ..Attrs::default() };
                let h = sftp.open(&abs(path)?, flags, &attrs).await.map_err(remote_error)?;
                self.forget(path);
                let cell = Arc::new(OnceCell::new_with(Some(h)));
                self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(path.clone(), cell);
            }
            Op::Write { path, offset, data, cond } => {
                if cond.is_some() {
                    // The condition is checked on the open file: open what the name holds now.
                    self.forget(path);
                }
                let h = self.handle(path).await?;
                match cond {
                    Some(c) if self.remote.is_devmount() => {
                        sftp.dev_write(&h, *offset, *c, data.clone()).await.map_err(remote_error)?
                    }
                    _ => sftp.write(&h, *offset, data.clone()).await.map_err(remote_error)?,
                }
            }
            Op::Truncate { path, size, cond } => {
                if cond.is_some() {
                    self.forget(path);
                }
                let h = self.handle(path).await?;
                if let (Some(c), true) = (cond, self.remote.is_devmount()) {
                    // A conditional write of nothing: the check alone.
                    sftp.dev_write(&h, 0, *c, Bytes::new()).await.map_err(remote_error)?;
                }
                sftp.fsetstat(&h, &Attrs { size: Some(*size), ..Attrs::default() })
                    .await
                    .map_err(remote_error)?;
            }
            Op::SetAttr { path, mode, uid, gid, atime, mtime } => {
                let p = abs(path)?;
                if self.remote.is_devmount() {
                    let attrs = SetAttrs {
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                        size: None,
                        atime: *atime,
                        mtime: *mtime,
                    };
                    sftp.dev_setstat(&p, false, &attrs).await.map_err(remote_error)?;
                } else {
                    // SFTP v3 sets owner and group together, and both times together: fill
                    // in what the op leaves alone from the file as it is.
                    let partial = uid.is_some() != gid.is_some()
                        || matches!((atime, mtime), (TimeSet::Omit, t) | (t, TimeSet::Omit) if *t != TimeSet::Omit);
                    let current =
                        if partial { Some(sftp.lstat(&p).await.map_err(remote_error)?) } else { None };
                    let attrs = v3_setattr(*mode, (*uid, *gid), (*atime, *mtime), current.as_ref());
                    sftp.setstat(&p, &attrs).await.map_err(remote_error)?;
                }
            }
            Op::Mkdir { path, mode } => {
                let attrs = Attrs { permissions: Some(*mode & 0o7777), ..Attrs::default() };
                sftp.mkdir(&abs(path)?, &attrs).await.map_err(remote_error)?;
            }
            Op::Mknod { path, mode, rdev } => {
                sftp.dev_mknod(&abs(path)?, *mode, *rdev).await.map_err(remote_error)?
            }
            Op::Symlink { target, path } => sftp.symlink(target, &abs(path)?).await.map_err(remote_error)?,
            Op::Link { from, to } => {
                sftp.hardlink(&abs(from)?, &abs(to)?).await.map_err(remote_error)?;
            }
            Op::Unlink { path } => {
                self.forget(path);
                sftp.remove(&abs(path)?).await.map_err(remote_error)?;
            }
            Op::Rmdir { path } => {
                self.forget(path);
                sftp.rmdir(&abs(path)?).await.map_err(remote_error)?;
            }
            Op::Rename { from, to, flags, cond } => {
                self.forget(from);
                self.forget(to);
                let (f, t) = (abs(from)?, abs(to)?);
                if *flags == 0 && cond.is_none() {
                    sftp.posix_rename(&f, &t).await.map_err(remote_error)?;
                } else if self.remote.is_devmount() {
                    sftp.dev_rename(&f, &t, *flags, *cond).await.map_err(remote_error)?;
                } else if *flags & rename_flags::EXCHANGE != 0 {
                    return Err(remote_error(SftpError::Unsupported(ext::RENAME)));
                } else {
                    // RENAME_NOREPLACE is plain v3 RENAME, which never replaces.
                    sftp.rename(&f, &t).await.map_err(remote_error)?;
                }
            }
            Op::Fsync { path } => {
                let h = self.handle(path).await?;
                if self.remote.info().has(ext::FSYNC) {
                    sftp.fsync(&h).await.map_err(remote_error)?;
                }
            }
            Op::Put { path, mode, exclusive, fsync, data, atime, mtime, cond } => {
                self.forget(path);
                let put = Put {
                    path: abs(path)?,
                    excl: *exclusive,
                    fsync: *fsync,
                    mode: *mode & 0o7777,
                    atime: *atime,
                    mtime: *mtime,
                    condition: *cond,
                    data: data.clone(),
                };
                sftp.dev_put(put).await.map_err(remote_error)?;
            }
        }
        Ok(())
    }
}

impl journal::Remote for Applier {
    async fn apply(&self, op: &Op) -> Result<(), RemoteError> {
        self.run(op).await
    }
}

/// A v3 SETSTAT for a setattr, with `current` (the file's attributes now) supplying the owner
/// or group, or the time, that the op leaves unchanged. Times are whole seconds.
fn v3_setattr(
    mode: Option<u32>,
    (uid, gid): (Option<u32>, Option<u32>),
    (atime, mtime): (TimeSet, TimeSet),
    current: Option<&Attrs>,
) -> Attrs {
    let (cur_uid, cur_gid) = current.and_then(|c| c.uid_gid).unzip();
    let uid_gid = match (uid.or(cur_uid), gid.or(cur_gid)) {
        (Some(u), Some(g)) if uid.is_some() || gid.is_some() => Some((u, g)),
        _ => None,
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let secs = |t: TimeSet, cur: Option<u32>| match t {
        TimeSet::Omit => cur,
        TimeSet::Now => Some(now.min(u64::from(u32::MAX)) as u32),
        TimeSet::At(ts) => Some(ts.sec.clamp(0, i64::from(u32::MAX)) as u32),
    };
    let (cur_a, cur_m) = current.and_then(|c| c.atime_mtime).unzip();
    let atime_mtime = match (atime, mtime) {
        (TimeSet::Omit, TimeSet::Omit) => None,
        _ => secs(atime, cur_a).zip(secs(mtime, cur_m)),
    };
    Attrs { permissions: mode, uid_gid, atime_mtime, ..Attrs::default() }
}

fn remote_error(e: SftpError) -> RemoteError {
    match e {
        SftpError::ConnectionLost => RemoteError::Disconnected,
        SftpError::Status { code, .. } if code == StatusCode::CHANGED => RemoteError::Conflict,
        e => RemoteError::Rejected { errno: e.errno(), message: e.to_string() },
    }
}
