//! `devmount mount`: connect, mount, serve until unmounted.
//!
//! Without `--foreground` the process forks before any thread exists; the child (which keeps
//! the command line, so `ps` shows the mount point) connects and mounts, and tells the parent
//! through a pipe whether the mount is ready, so `devmount mount` returns only once `ls MNT`
//! works, or fails with the child's one-line error.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, MountOption, SessionACL};

use crate::cache::CacheConfig;
use crate::echo::Echo;
use crate::fs::apply::Applier;
use crate::fs::remote::Remote;
use crate::journal::{Config as JournalConfig, Journal, Sender, SenderConfig};
use crate::fs::{Fs, IdMap};
use crate::fuse::FuseFs;
use crate::reconnect::Dial;
use crate::session::{self, ConnectOptions, Target};

/// How long an unmount waits for the journal to reach the server before leaving the rest
/// for the next mount.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where devmount keeps its journals: `$XDG_STATE_HOME/devmount`, else
/// `~/.local/state/devmount`.
pub fn state_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("neither XDG_STATE_HOME nor HOME is set"))?;
            PathBuf::from(home).join(".local/state")
        }
    };
    let dir = base.join("devmount");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    Ok(dir)
}

/// What `devmount mount` was asked to do.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub target: Target,
    pub mountpoint: PathBuf,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    pub foreground: bool,
    pub cache: CacheConfig,
    pub journal: JournalConfig,
}

/// Checks the mount point before anything else happens: it must be an existing directory that
/// nothing is mounted on. A dead FUSE mount left by a crashed client answers ENOTCONN; the error
/// says how to clear it.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("mount point {} is not a directory; give an empty directory", path.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mount point {} holds a stale mount of a client that is gone; clear it with `fusermount3 -u {}`",
            path.display(),
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mount point {} does not exist; create it with `mkdir -p {}`", path.display(), path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot use mount point {}", path.display())),
    }
    let abs = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    if is_mounted(&abs)? {
        bail!("{} is already a mount point; unmount it first with `fusermount3 -u {}`", abs.display(), abs.display());
    }
    Ok(abs)
}

/// Whether something is mounted exactly at `abs`, per /proc/self/mountinfo.
fn is_mounted(abs: &Path) -> Result<bool> {
    let info = std::fs::read("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(info.split(|&b| b == b'\n').any(|line| {
        line.split(|&b| b == b' ').nth(4).is_some_and(|mp| unescape_mountinfo(mp) == abs.as_os_str().as_bytes())
    }))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() && field[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Runs `devmount mount`: in this process with `--foreground`, else in a forked daemon.
pub fn run(mut args: MountArgs) -> Result<()> {
    args.mountpoint = check_mountpoint(&args.mountpoint)?;
    if args.foreground {
        return serve(args, None);
    }
    let (read, write) = nix::unistd::pipe().context("cannot create a pipe")?;
    // SAFETY: no thread has been started yet (the runtime starts in the child), so the child
    // may do anything the parent could.
    match unsafe { nix::unistd::fork() }.context("cannot fork the mount daemon")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write);
            let mut status = String::new();
            std::fs::File::from(read).read_to_string(&mut status).context("waiting for the mount daemon")?;
            match status.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if status.is_empty() => Err(anyhow!("the mount daemon died before the mount was ready")),
                None => Err(anyhow!("{}", status.trim_end())),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(read);
            let _ = nix::unistd::setsid();
            let result = serve(args, Some(write));
            // The parent has been told already (ok, or the error): leave without running the
            // parent's exit handlers twice.
            std::process::exit(if result.is_ok() { 0 } else { 1 })
        }
    }
}

/// Connects, mounts, reports readiness on `ready` (closing it), and serves until unmounted.
fn serve(args: MountArgs, ready: Option<OwnedFd>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("devmount-io")
        .build()
        .context("cannot start the async runtime")?;
    let dial = Dial {
        target: args.target.clone(),
        identity: args.identity.clone(),
        known_hosts: args.known_hosts.clone(),
        options: ConnectOptions::default(),
    };
    let mounted = runtime.block_on(setup(&args, &dial));
    let (fs, feed, ssh) = match mounted {
        Ok(m) => m,
        Err(e) => {
            if let Some(fd) = ready {
                let _ = std::fs::File::from(fd).write_all(format!("{e:#}").as_bytes());
            }
            return Err(e);
        }
    };
    let echo = Arc::new(Echo::default());
    let fuse = FuseFs::new(fs.clone(), echo.clone(), runtime.handle().clone());
    let config = mount_config(&args);
    let session = fuser::Session::new(fuse, &args.mountpoint, &config)
        .with_context(|| format!("cannot mount on {}", args.mountpoint.display()));
    let session = match session.and_then(|s| s.spawn().context("cannot start the FUSE session")) {
        Ok(s) => s,
        Err(e) => {
            if let Some(fd) = ready {
                let _ = std::fs::File::from(fd).write_all(format!("{e:#}").as_bytes());
            }
            return Err(e);
        }
    };
    let notices = match feed {
        Some(_) => {
            Some(echo.start(args.mountpoint.clone(), session.notifier()).context("cannot start the echo thread")?)
        }
        None => None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let keeper = runtime.spawn(crate::reconnect::keep(dial, fs.clone(), ssh, feed, notices, stopped));
    let control = match runtime.block_on(async { crate::control::bind(&args.mountpoint) }) {
        Ok(l) => l,
        Err(e) => {
            unmount(&args.mountpoint);
            if let Some(fd) = ready {
                let _ = std::fs::File::from(fd).write_all(format!("{e:#}").as_bytes());
            }
            return Err(e);
        }
    };
    runtime.spawn(crate::control::serve(control, fs.clone()));
    if let Some(fd) = ready {
        let _ = std::fs::File::from(fd).write_all(b"ok");
        // From here on the daemon has no terminal to talk to: its log goes to a file, and it
        // holds no pipe of the caller's open (`devmount mount ... | cat` must end).
        detach_stdio(&args.mountpoint);
    }
    let mountpoint = args.mountpoint.clone();
    runtime.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        tokio::select! {
            _ = async { if let Some(s) = term.as_mut() { s.recv().await; } } => {}
            _ = async { if let Some(s) = int.as_mut() { s.recv().await; } } => {}
        }
        tracing::info!("signal: unmounting {}", mountpoint.display());
        unmount(&mountpoint);
    });
    // Returns once the kernel has detached the mount (umount, fusermount3 -u, or a signal).
    let joined = session.join();
    runtime.block_on(async {
        // Everything saved goes to the server before the daemon leaves; what cannot (the
        // connection is gone) stays in the journal for the next mount of this target.
        match tokio::time::timeout(DRAIN_TIMEOUT, fs.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(_) => tracing::warn!(
                "{} change(s) could not reach the server; they are kept and replayed at the next mount",
                fs.journal().stats().pending_ops
            ),
        }
        let _ = stop.send(true);
        let _ = keeper.await;
    });
    if let Ok(socket) = crate::control::socket_path(&args.mountpoint) {
        let _ = std::fs::remove_file(socket);
    }
    match joined {
        Ok(()) => Ok(()),
        // The mount was already taken away from under the session.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(e).context("the FUSE session failed"),
    }
}

/// The connection, the file system over it, and its feed (devmount-server only).
async fn setup(args: &MountArgs, dial: &Dial) -> Result<(Arc<Fs>, Option<session::FeedStream>, session::Session)> {
    let session = session::connect(&dial.target, &dial.identity, &dial.known_hosts, &dial.options).await?;
    let (sftp, info) = session.open_sftp().await?;
    let base = args.target.path.clone();
    let root = sftp.stat(&base).await.map_err(|e| {
        anyhow!(
            "remote path {} on {}: {}; check the path in the target",
            String::from_utf8_lossy(&base),
            args.target.address(),
            nix::errno::Errno::from_raw(e.errno()).desc()
        )
    })?;
    if root.permissions.is_some_and(|m| m & libc::S_IFMT != libc::S_IFDIR) {
        bail!("remote path {} is not a directory", String::from_utf8_lossy(&base));
    }
    let remote = Arc::new(Remote::new(sftp, info, &base));
    let feed = if remote.is_devmount() { Some(session.open_feed().await?) } else { None };
    let key = String::from_utf8_lossy(&args.target.key()).into_owned();
    let (journal, recovered) = Journal::open(&state_dir()?, &key, args.journal.clone())
        .map_err(|e| anyhow!("{e}; is another devmount mounting {key}?"))?;
    if !recovered.ops.is_empty() {
        eprintln!(
            "devmount: replaying {} change(s) ({} bytes) left pending by an earlier mount of {key}",
            recovered.ops.len(),
            recovered.data_bytes
        );
    }
    let applier = Arc::new(Applier::new(remote.clone()));
    let config = SenderConfig {
        put_max: if remote.is_devmount() { SenderConfig::default().put_max } else { 0 },
        ..SenderConfig::default()
    };
    let (sender, mut conflicts) = Sender::start(journal.clone(), Some(applier), config);
    let checker = remote.clone();
    tokio::spawn(async move {
        while let Some(c) = conflicts.recv().await {
            let resolution = crate::fs::conflict::resolve(&checker, &c.op, c.maybe_applied).await;
            c.resolve(resolution);
        }
    });
    let (remote_uid, remote_gid) = root.uid_gid.unwrap_or((0, 0));
    let ids = IdMap {
        remote_uid,
        remote_gid,
        local_uid: nix::unistd::getuid().as_raw(),
        local_gid: nix::unistd::getgid().as_raw(),
    };
    let fs = Arc::new(Fs::new(remote, &args.cache, ids, journal, sender));
    tokio::spawn(fs.clone().retire_local());
    tokio::spawn(fs.clone().prefetch());
    tokio::spawn(fs.clone().read_ahead());
    if !recovered.ops.is_empty() {
        // The local state knows nothing of the replayed changes: let the server have them
        // before anyone looks.
        fs.sync().await.map_err(|e| anyhow!("replaying the pending changes: {e}"))?;
    }
    Ok((fs, feed, session))
}

fn mount_config(args: &MountArgs) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("devmount:{}", args.target.address())),
        MountOption::Subtype("devmount".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(4);
    config
}

/// Points stdin and stdout at /dev/null and stderr (the log) at
/// `<state dir>/log/<mount hash>.log`, so a daemon that outlives its terminal keeps its log.
fn detach_stdio(mountpoint: &Path) {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
    }
    let Ok(dir) = state_dir().map(|d| d.join("log")) else { return };
    let Ok(sock) = crate::control::socket_path(mountpoint) else { return };
    let name = sock.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
    let path = dir.join(name).with_extension("log");
    let file = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&path));
    if let Ok(file) = file {
        let _ = nix::unistd::dup2_stderr(&file);
        tracing::info!("serving {} (log: {})", mountpoint.display(), path.display());
    }
}

/// Detaches the mount at `path`: as root with umount(2), else through fusermount3.
pub fn unmount(path: &Path) {
    if nix::unistd::geteuid().is_root() {
        if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("umount {}: {e}", path.display());
        }
        return;
    }
    let status = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(path).status();
    if !status.is_ok_and(|s| s.success()) {
        tracing::warn!("fusermount3 -u {} failed", path.display());
    }
}

/// The local user's name, the default user of a target.
pub fn local_user() -> OsString {
    std::env::var_os("USER").unwrap_or_else(|| "root".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(br"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo(b"/plain"), b"/plain");
    }

    #[test]
    fn mountpoint_errors_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = check_mountpoint(&missing).unwrap_err().to_string();
        assert!(e.contains("mkdir -p"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let e = check_mountpoint(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert!(check_mountpoint(dir.path()).is_ok());
        let e = check_mountpoint(Path::new("/proc")).unwrap_err().to_string();
        assert!(e.contains("already a mount point"), "{e}");
    }
}
