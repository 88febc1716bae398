//! What happens when a queued change meets a file that changed in the pod: the rule of
//! docs/semantics.md ("Conflicts"). The local version takes the name; the pod's version is
//! kept beside it as `NAME.conflict-YYYYMMDD-HHMMSS` and the daemon's log says so. Nothing
//! is lost.
//!
//! The server detects the conflict: the first change of a file that was clean here carries
//! what the file was when the mount last saw it (size, mtime, inode), and the server refuses
//! it when the file no longer matches.

use bytes::Bytes;
use devmount_server::proto::sftp::{open_flags, Attrs, Put, StatusCode};
use devmount_server::sftp::client::{SftpClient, SftpError};

use super::remote::Remote;
use crate::cache::RelPath;
use crate::journal::{Op, Resolution};

/// Names tried before giving up on finding a free conflict name.
const NAME_TRIES: u32 = 100;

/// The resolution of `op`, refused because its file changed on the server. `maybe_applied`:
/// an earlier attempt of this op may have reached the server before the connection dropped,
/// so the change seen may be its own.
pub async fn resolve(remote: &Remote, op: &Op, maybe_applied: bool) -> Resolution {
    if let (true, Op::Put { path, data, .. }) = (maybe_applied, op) {
        // A whole-file put whose reply was lost: if the server's file is exactly its data, it
        // was ours and is done.
        if let Ok(rel) = RelPath::new(path) {
            if let Ok((_, server)) = remote.get(&rel, data.len() as u64).await {
                if server == *data {
                    return Resolution::Done;
                }
            }
        }
    }
    let (path, retry) = match op {
        Op::Write { path, offset, data, .. } => {
            (path, Op::Write { path: path.clone(), offset: *offset, data: data.clone(), cond: None })
        }
        Op::Truncate { path, size, .. } => {
            (path, Op::Truncate { path: path.clone(), size: *size, cond: None })
        }
        Op::Rename { from, to, flags, .. } => {
            (to, Op::Rename { from: from.clone(), to: to.clone(), flags: *flags, cond: None })
        }
        Op::Put { path, mode, exclusive, fsync, data, atime, mtime, .. } => (
            path,
            Op::Put {
                path: path.clone(),
                mode: *mode,
                exclusive: *exclusive,
                fsync: *fsync,
                data: data.clone(),
                atime: *atime,
                mtime: *mtime,
                cond: None,
            },
        ),
        _ => return reject("the file changed in the pod"),
    };
    let Ok(rel) = RelPath::new(path) else { return reject("the file changed in the pod") };
    let sftp = remote.sftp();
    match save_pod_version(&sftp, remote, &rel).await {
        Ok(Some(copy)) => {
            tracing::warn!(
                "conflict: {} changed in the pod while changes made here were queued; it now holds the \
                 version made here, and the pod's version is kept as {}",
                show(&rel),
                show(&copy)
            );
            Resolution::Retry(retry)
        }
        // Gone in the pod: nothing to keep, the change made here goes ahead.
        Ok(None) => Resolution::Retry(retry),
        // Sent again after the reconnect: it meets the same conflict and comes back here.
        Err(SftpError::ConnectionLost) => Resolution::Retry(op.clone()),
        Err(e) => reject(&format!(
            "the file changed in the pod, and its version there could not be kept as a conflict copy ({e}); \
             the pod's version is left as it is"
        )),
    }
}

fn reject(message: &str) -> Resolution {
    Resolution::Reject { errno: libc::EBUSY, message: message.to_owned() }
}

fn show(path: &RelPath) -> String {
    String::from_utf8_lossy(path.as_bytes()).into_owned()
}

/// Keeps a copy of the pod's file at `rel` under a new conflict name beside it; `None` if
/// there is no file there any more. A copy, not a hard link: a queued write changes the file in
/// place.
async fn save_pod_version(
    sftp: &SftpClient,
    remote: &Remote,
    rel: &RelPath,
) -> Result<Option<RelPath>, SftpError> {
    let abs = remote.abs(rel);
    let attrs = match sftp.lstat(&abs).await {
        Ok(a) => a,
        Err(e) if e.errno() == libc::ENOENT => return Ok(None),
        Err(e) => return Err(e),
    };
    let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else { return Ok(None) };
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    for n in 1..=NAME_TRIES {
        let mut copy_name = name[..name.len().min(200)].to_vec();
        copy_name.extend_from_slice(format!(".conflict-{stamp}").as_bytes());
        if n > 1 {
            copy_name.extend_from_slice(format!("-{n}").as_bytes());
        }
        let Ok(copy) = dir.join(&copy_name) else { return Ok(None) };
        match copy_file(sftp, remote, &abs, &remote.abs(&copy), &attrs).await {
            Ok(()) => return Ok(Some(copy)),
            Err(e) if e.errno() == libc::EEXIST => continue,
            Err(e) => return Err(e),
        }
    }
    Err(SftpError::Status { code: StatusCode::FAILURE, message: "no free conflict name".into() })
}

/// Copies `from` to the new file `to` (which must not exist) on the server, with its mode.
async fn copy_file(
    sftp: &SftpClient,
    remote: &Remote,
    from: &Bytes,
    to: &Bytes,
    attrs: &Attrs,
) -> Result<(), SftpError> {
    let mode = attrs.permissions.unwrap_or(0o644) & 0o7777;
    if remote.is_devmount() && attrs.size.is_some_and(|s| s <= u64::from(remote.read_len())) {
        let got = sftp.dev_get(from, u64::from(remote.read_len())).await?;
        let put = Put {
            path: to.clone(),
            excl: true,
            fsync: false,
            mode,
            atime: None,
            mtime: Some(got.stat.mtime),
            condition: None,
            data: got.data,
        };
        return sftp.dev_put(put).await.map(|_| ());
    }
    let src = sftp.open(from, open_flags::READ, &Attrs::default()).await?;
    let create = Attrs { permissions: Some(mode), ..Attrs::default() };
    let dst = match sftp.open(to, open_flags::WRITE | open_flags::CREAT | open_flags::EXCL, &create).await {
        Ok(h) => h,
        Err(e) => {
            let _ = sftp.close(&src).await;
            return Err(e);
        }
    };
    let chunk = remote.read_len().max(4096);
    let result = async {
        let mut at = 0u64;
        loop {
            let data = match sftp.read(&src, at, chunk).await {
                Ok(d) if d.is_empty() => break,
                Ok(d) => d,
                Err(e) if e.errno() == libc::ENODATA => break,
                Err(e) => return Err(e),
            };
            let len = data.len() as u64;
            sftp.write(&dst, at, data).await?;
            at += len;
        }
        Ok(())
    }
    .await;
    let _ = sftp.close(&src).await;
    let _ = sftp.close(&dst).await;
    result
}
