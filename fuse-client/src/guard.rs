//! A watchdog process that aborts the mount's FUSE connection when the daemon dies without
//! unmounting (kill -9, a crash).
//!
//! Death alone does not always end a FUSE connection: the kernel closes /dev/fuse only when the
//! last thread of the daemon is gone, and a thread that is inside a kernel notification (the
//! echo thread's `inval_entry` waits for the directory's lock) cannot die while a request that
//! holds that lock waits for a reply nobody will send. The mount then hangs every process that
//! touches it, and the daemon stays a zombie. Writing to the connection's `abort` file in
//! fusectl ends every request, which frees the thread; the mount is then a plain stale one that
//! the next `devmount` command clears.
//!
//! The watchdog is forked from the daemon's main thread with `PR_SET_PDEATHSIG`, which fires
//! when that thread exits; the daemon kills the watchdog before a normal exit, so only an
//! abnormal death reaches the abort (and the connection number cannot have been reused by then:
//! the mount still exists).

use std::ffi::CString;
use std::path::Path;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

/// Where fusectl lives; systemd mounts it at boot, a bare machine may not have it.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The watchdog's process name (`/proc/PID/comm`).
pub const GUARD_NAME: &std::ffi::CStr = c"devmount-guard";

/// The armed watchdog; dropping it disarms it.
pub struct AbortGuard {
    child: Pid,
}

impl AbortGuard {
    /// Arms a watchdog for the FUSE connection `connection` (the minor device number of the
    /// mount). Must be called on the thread whose exit means the daemon died: the main thread.
    /// `Ok(None)` when fusectl is unavailable (logged: the daemon works, only its death may hang).
    pub fn arm(connection: u32) -> Result<Option<AbortGuard>> {
        let dir = Path::new(FUSECTL).join(connection.to_string());
        if !dir.exists() {
            mount_fusectl();
        }
        if !dir.exists() {
            tracing::warn!(
                "{FUSECTL} is not mounted: if this daemon is killed, the mount may hang until it is \
                 aborted by hand; mount it with `mount -t fusectl none {FUSECTL}`"
            );
            return Ok(None);
        }
        let abort = CString::new(dir.join("abort").into_os_string().into_encoded_bytes())
            .context("the fusectl path has a NUL byte")?;
        let parent = nix::unistd::getpid();
        // SAFETY: the child only makes async-signal-safe system calls (sigprocmask, prctl,
        // getppid, close_range, sigwait, open, write, _exit) and never returns.
        match unsafe { fork() }.context("cannot fork the mount's watchdog")? {
            ForkResult::Child => watch(parent, &abort),
            ForkResult::Parent { child } => Ok(Some(AbortGuard { child })),
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        // The watchdog has nothing to clean up.
        let _ = kill(self.child, Signal::SIGKILL);
        let _ = waitpid(self.child, None);
    }
}

/// The watchdog: waits for the parent thread's death signal, then aborts the connection.
fn watch(parent: Pid, abort: &CString) -> ! {
    // SAFETY: plain system calls on valid arguments; see `arm`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1 as libc::c_ulong);
        // Its command line is the daemon's; its name (ps -o comm) tells the two apart.
        libc::prctl(libc::PR_SET_NAME, GUARD_NAME.as_ptr());
        // Holding none of the daemon's files: least of all /dev/fuse, whose last close is what
        // ends the connection normally.
        libc::close_range(0, libc::c_uint::MAX, 0);
        // The parent may have died before the death signal was set.
        if libc::getppid() == parent.as_raw() {
            let mut signal = 0;
            libc::sigwait(&set, &mut signal);
        }
        let fd = libc::open(abort.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"1".as_ptr().cast(), 1);
        }
        libc::_exit(0)
    }
}

/// Mounts fusectl where systemd would, when running as root on a machine without it.
fn mount_fusectl() {
    if !nix::unistd::geteuid().is_root() || !Path::new(FUSECTL).is_dir() {
        return;
    }
    let mounted = nix::mount::mount(
        Some("fusectl"),
        FUSECTL,
        Some("fusectl"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    match mounted {
        Ok(()) => tracing::info!("mounted fusectl at {FUSECTL}"),
        // Already mounted by a concurrent devmount, or not permitted in this container.
        Err(e) => tracing::debug!("cannot mount fusectl at {FUSECTL}: {e}"),
    }
}
