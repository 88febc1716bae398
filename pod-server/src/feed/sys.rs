//! The system calls the watcher needs beyond inotify: opening directories beneath the root
//! without following symlinks, `lstat` relative to the root, how many bytes of events are
//! queued, and a blocking wait on the inotify descriptor that signals can interrupt.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{lstat, Mode};

use crate::proto::stat::FullStat;

/// The root directory, by path. It is opened afresh for each lookup and never held open
/// between them: the kernel reports a directory's deletion only once nobody holds it open.
pub(super) struct Root {
    path: PathBuf,
    /// `openat2` with `RESOLVE_BENEATH` works here (it is missing before Linux 5.6 and some
    /// seccomp profiles refuse it); otherwise directories are opened one component at a time.
    beneath: bool,
}

const DIR_FLAGS: OFlag =
    OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

impl Root {
    /// `path` must be canonical (no symlinks), as every lookup is made from it.
    pub fn new(path: PathBuf) -> Root {
        Root { path, beneath: true }
    }

    /// Opens the directory at `rel` (relative to the root; empty for the root itself) for
    /// reading, refusing to follow a symlink anywhere on the way, so a directory swapped for
    /// a symlink mid-walk cannot lead the walk out of the root.
    pub fn open_dir(&mut self, rel: &[u8]) -> nix::Result<OwnedFd> {
        let root = nix::fcntl::open(&self.path, DIR_FLAGS, Mode::empty())?;
        if rel.is_empty() {
            return Ok(root);
        }
        if self.beneath {
            let how = OpenHow::new()
                .flags(DIR_FLAGS)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
            match openat2(root.as_fd(), OsStr::from_bytes(rel), how) {
                Err(Errno::ENOSYS | Errno::EPERM) => {
                    tracing::debug!("openat2 unavailable; opening directories component by component");
                    self.beneath = false;
                }
                // A concurrent rename makes openat2 give up; the slow path is immune to it.
                Err(Errno::EAGAIN) => {}
                r => return r,
            }
        }
        let mut cur = root;
        for name in rel.split(|&b| b == b'/') {
            cur = openat(cur.as_fd(), OsStr::from_bytes(name), DIR_FLAGS, Mode::empty())?;
        }
        Ok(cur)
    }

    /// `lstat` of `rel` now; `None` if it does not exist (or cannot be reached).
    pub fn lstat(&self, rel: &[u8]) -> Option<FullStat> {
        let path = if rel.is_empty() { self.path.clone() } else { self.path.join(OsStr::from_bytes(rel)) };
        lstat(&path).ok().map(|st| FullStat::from(&st))
    }
}

/// A path naming exactly the directory open as `fd`, for the calls that take only a path
/// (`inotify_add_watch`, `opendir`): the kernel resolves it to that very inode.
pub(super) fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// How many bytes of events the inotify instance `fd` has queued.
pub(super) fn queued_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is live for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// An eventfd that wakes the watcher's `poll`: to make it stop, or to answer barriers.
pub(super) struct Signal(OwnedFd);

impl Signal {
    pub fn new() -> io::Result<Signal> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Signal(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn raise(&self) {
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        let n = unsafe { libc::eventfd_write(self.0.as_raw_fd(), 1) };
        if n < 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot signal the feed watcher");
        }
    }

    /// Lowers the signal, so `poll` sleeps again until the next [`Signal::raise`].
    pub fn clear(&self) {
        let mut value: libc::eventfd_t = 0;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own. It fails with
        // EAGAIN when the signal is not raised, which is what clearing wants.
        unsafe { libc::eventfd_read(self.0.as_raw_fd(), &mut value) };
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// What woke [`wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Woken {
    pub events: bool,
    pub stop: bool,
    pub barrier: bool,
}

/// Blocks until `events` is readable, `stop` or `barrier` is raised, or `timeout` passes
/// (`None`: no timeout, so an idle feed sleeps in the kernel and costs no CPU).
pub(super) fn wait(
    events: BorrowedFd<'_>,
    stop: BorrowedFd<'_>,
    barrier: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> io::Result<Woken> {
    let pollfd = |fd: BorrowedFd<'_>| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let mut fds = [pollfd(events), pollfd(stop), pollfd(barrier)];
    // Round up so a sub-millisecond remainder does not spin.
    let ms = timeout.map_or(-1, |t| t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is a live array of pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
            return Ok(Woken { events: ready(&fds[0]), stop: ready(&fds[1]), barrier: ready(&fds[2]) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_dir_refuses_symlinks_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("a"), tmp.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/", tmp.path().join("a/up")).unwrap();
        let mut root = Root::new(tmp.path().canonicalize().unwrap());
        for slow in [false, true] {
            root.beneath = !slow;
            assert!(root.open_dir(b"").is_ok());
            assert!(root.open_dir(b"a/b").is_ok());
            assert!(root.open_dir(b"link/b").is_err(), "symlink in the middle");
            assert!(root.open_dir(b"link").is_err(), "symlink at the end");
            assert!(root.open_dir(b"a/up/tmp").is_err(), "absolute symlink");
            assert!(root.open_dir(b"a/missing").is_err());
        }
        assert!(root.lstat(b"link").unwrap().mode & libc::S_IFMT == libc::S_IFLNK);
        assert!(root.lstat(b"").unwrap().is_dir());
        assert!(root.lstat(b"nope").is_none());
    }

    #[test]
    fn wait_times_out_and_wakes_on_signals() {
        let (events, stop, barrier) =
            (Signal::new().unwrap(), Signal::new().unwrap(), Signal::new().unwrap());
        let wait_all = |t| wait(events.fd(), stop.fd(), barrier.fd(), t).unwrap();
        let none = Woken { events: false, stop: false, barrier: false };
        assert_eq!(wait_all(Some(Duration::from_millis(1))), none);
        barrier.raise();
        assert_eq!(wait_all(None), Woken { barrier: true, ..none });
        barrier.clear();
        assert_eq!(wait_all(Some(Duration::ZERO)), none, "cleared");
        barrier.clear();
        stop.raise();
        assert_eq!(wait_all(None), Woken { stop: true, ..none });
    }

    #[test]
    fn queued_bytes_counts_pending_events() {
        let tmp = tempfile::tempdir().unwrap();
        let inotify = inotify::Inotify::init().unwrap();
        inotify.watches().add(tmp.path(), inotify::WatchMask::CREATE).unwrap();
        assert_eq!(queued_bytes(inotify.as_fd()).unwrap(), 0);
        std::fs::write(tmp.path().join("f"), b"").unwrap();
        assert!(queued_bytes(inotify.as_fd()).unwrap() > 0);
    }
}
