//! Changes made in the pod, replayed through the mount so that local inotify watchers (IDEs,
//! test runners, bundlers) see them.
//!
//! The kernel raises no inotify event for a FUSE invalidation; it does for any operation that
//! passes through the mount. So one thread of the daemon (the echo thread) performs, on its own
//! mount, the operation that matches each change the feed reports: `open(O_CREAT)` for a new
//! file (watchers get CREATE, CLOSE_WRITE), `mkdir`, `open(O_WRONLY)` and `utimensat` for new
//! contents (CLOSE_WRITE, ATTRIB), `unlink`/`rmdir` (DELETE), `rename` (MOVED_FROM/MOVED_TO).
//! The file system recognises these requests by the calling thread's id (FUSE requests carry
//! it) and answers them from the state the feed already applied, as no-ops that never reach the
//! server or the journal. Kernel notifications are sent from the same thread, in the order that
//! keeps the kernel's view right: a name is removed by the echoed unlink before the kernel is
//! told, and a new name is invalidated before the echoed create.
//!
//! This thread never runs inside a FUSE request handler, so it cannot deadlock the kernel: each
//! echoed syscall is answered by the dispatch threads while this one waits.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Mutex};

use bytes::Bytes;
use devmount_server::proto::stat::FullStat;
use fuser::{INodeNo, Notifier};

/// The file handle given to the echo thread's opens: never a real open file.
pub const ECHO_FH: u64 = u64::MAX;

/// What the echo thread is doing, so the file system can answer its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Creating `path`: a lookup of it answers "no such file", the create answers `stat`.
    Create { path: Bytes, stat: FullStat },
    /// Acting on `path`, which exists (or existed) with `stat`: lookups answer it.
    Exists { path: Bytes, stat: FullStat },
    /// Renaming `from` (with `stat`) to `to`.
    Rename { from: Bytes, to: Bytes, stat: FullStat },
}

/// One thing for the echo thread to do.
pub enum Work {
    /// A kernel notification: `inval_entry(parent, name)`.
    Entry { parent: u64, name: Vec<u8> },
    /// `delete(parent, child, name)`.
    Delete { parent: u64, child: u64, name: Vec<u8> },
    /// `inval_inode(id, off, len)`: off -1 drops attributes only, (0, 0) the page cache too.
    Inode { id: u64, off: i64, len: i64 },
    /// Replay a change through the mount.
    Replay(Replay),
    /// `lstat` the directory at `path` through the mount, not before `after`. The kernel drops
    /// a directory's access time after each read of its listing from the daemon, which makes
    /// the next `stat` of it wait for a GETATTR (a second `find` paid one per directory); asked
    /// here, off the reader's path, the attributes are answered from the cache and kept again.
    /// `after` leaves the kernel time to drop them first.
    Refresh { path: Bytes, after: std::time::Instant },
}

#[derive(Debug, Clone)]
pub enum Replay {
    Created { path: Bytes, stat: FullStat },
    Modified { path: Bytes, stat: FullStat },
    Attrib { path: Bytes, stat: FullStat },
    Deleted { path: Bytes, stat: FullStat },
    Renamed { from: Bytes, to: Bytes, stat: FullStat },
}

/// Shared between the echo thread and the file system.
#[derive(Default)]
pub struct Echo {
    tid: AtomicI32,
    intent: Mutex<Option<Intent>>,
    /// The thread's queue while it runs, for notifications the file system sends itself.
    queue: Mutex<Option<mpsc::Sender<Work>>>,
}

impl Echo {
    /// Whether a request came from the echo thread.
    pub fn is_echo(&self, pid: u32) -> bool {
        let tid = self.tid.load(Ordering::Relaxed);
        tid != 0 && tid as u32 == pid
    }

    pub fn intent(&self) -> Option<Intent> {
        self.intent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends a kernel notification from the echo thread (never from a request handler, which
    /// could deadlock); dropped if the thread is not running.
    pub fn notify(&self, work: Work) {
        if let Some(queue) = &*self.queue.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = queue.send(work);
        }
    }

    /// The mount is going: the thread ends once the feed lets go of its queue too.
    pub fn stop(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn set_intent(&self, intent: Option<Intent>) {
        *self.intent.lock().unwrap_or_else(|e| e.into_inner()) = intent;
    }

    /// Starts the echo thread over the mount at `mountpoint`; it ends when every sender is
    /// dropped and [`Echo::stop`] was called.
    pub fn start(
        self: &std::sync::Arc<Self>,
        mountpoint: PathBuf,
        notifier: Notifier,
    ) -> std::io::Result<mpsc::Sender<Work>> {
        let (tx, rx) = mpsc::channel::<Work>();
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
        let echo = self.clone();
        std::thread::Builder::new().name("devmount-echo".into()).spawn(move || {
            echo.tid.store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
            for work in rx {
                match work {
                    Work::Replay(r) => echo.replay(&mountpoint, r),
                    Work::Refresh { path, after } => {
                        std::thread::sleep(after.saturating_duration_since(std::time::Instant::now()));
                        let _ = std::fs::symlink_metadata(mountpoint.join(OsStr::from_bytes(&path)));
                    }
                    notice => send(&notifier, notice),
                }
            }
        })?;
        Ok(tx)
    }

    fn replay(&self, mountpoint: &std::path::Path, r: Replay) {
        let at = |p: &Bytes| mountpoint.join(OsStr::from_bytes(p));
        let result = match &r {
            Replay::Created { path, stat } => {
                self.set_intent(Some(Intent::Create { path: path.clone(), stat: *stat }));
                if stat.is_dir() {
                    std::fs::create_dir(at(path))
                } else {
                    std::fs::OpenOptions::new().write(true).create_new(true).open(at(path)).map(drop)
                }
            }
            Replay::Modified { path, stat } => {
                self.set_intent(Some(Intent::Exists { path: path.clone(), stat: *stat }));
                let written = std::fs::OpenOptions::new().write(true).open(at(path)).map(drop);
                written.and_then(|()| touch(&at(path)))
            }
            Replay::Attrib { path, stat } => {
                self.set_intent(Some(Intent::Exists { path: path.clone(), stat: *stat }));
                touch(&at(path))
            }
            Replay::Deleted { path, stat } => {
                self.set_intent(Some(Intent::Exists { path: path.clone(), stat: *stat }));
                if stat.is_dir() {
                    std::fs::remove_dir(at(path))
                } else {
                    std::fs::remove_file(at(path))
                }
            }
            Replay::Renamed { from, to, stat } => {
                self.set_intent(Some(Intent::Rename { from: from.clone(), to: to.clone(), stat: *stat }));
                std::fs::rename(at(from), at(to))
            }
        };
        self.set_intent(None);
        if let Err(e) = result {
            tracing::debug!("echo of {r:?} through the mount: {e}");
        }
    }
}

/// `utimensat(path, [now, now])`: an ATTRIB event for watchers (setting both times is what the
/// kernel reports as ATTRIB; one alone would be ACCESS or MODIFY), answered as a no-op.
fn touch(path: &std::path::Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let times = [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `times` two valid timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn send(notifier: &Notifier, work: Work) {
    let result = match &work {
        Work::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
        Work::Delete { parent, child, name } => {
            notifier.delete(INodeNo(*parent), INodeNo(*child), OsStr::from_bytes(name))
        }
        Work::Inode { id, off, len } => notifier.inval_inode(INodeNo(*id), *off, *len),
        Work::Replay(_) | Work::Refresh { .. } => Ok(()),
    };
    // ENOENT: the kernel had nothing cached for it, which is fine.
    if let Err(e) = result {
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::debug!("kernel notification failed: {e}");
        }
    }
}
