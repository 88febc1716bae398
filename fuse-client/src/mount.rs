//! `devmount mount` and `devmount up`: connect, mount, serve until unmounted.
//!
//! Without `--foreground` the process forks before any thread exists; the child (which keeps
//! the command line, so `ps` shows the mount point) does everything else, and tells the parent
//! through a pipe how its start goes: a line `step TEXT` as each step begins, `note TEXT` for the
//! user, and last `ok` or `error TEXT`. So `devmount up` returns only once `ls MNT` works, or
//! fails with the child's one-line error.
//!
//! The child is the session's daemon. With `--local` it starts the devmount-server itself, so
//! the server never outlives it (see [`crate::local_server`]); then it connects, starts the port
//! forwards over that connection (a busy local port fails the start before anything is
//! mounted), mounts, and answers the control socket ([`crate::control`]). When the mount goes
//! (`devmount down`, `umount`, SIGTERM) it drains the journal, stops the forwards, says goodbye
//! to the server, stops the local server and removes its socket.
//!
//! With a kubernetes target the daemon first swaps the Deployment, waits for the dev pod and
//! puts the server in it ([`crate::kube::start`]); every connection then goes through the
//! port-forward of [`crate::kube::Route`], and after the unmount [`crate::kube::finish`]
//! restores the Deployment.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, MountOption, SessionACL};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::CacheConfig;
use crate::control::{self, Daemon};
use crate::echo::Echo;
use crate::forward::{ForwardSpec, Forwards};
use crate::fs::apply::Applier;
use crate::fs::remote::Remote;
use crate::fs::{Fs, IdMap};
use crate::fuse::FuseFs;
use crate::guard::AbortGuard;
use crate::journal::{Config as JournalConfig, Journal, Sender, SenderConfig};
use crate::kube::{self, KubeEndpoint};
use crate::local_server::{LocalServer, StartOptions};
use crate::proxy::SshAccess;
use crate::reconnect::Dial;
use crate::session::{self, ConnectOptions, Session, Target};

/// How long an unmount waits for the journal to reach the server before leaving the rest
/// for the next mount.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where devmount keeps its journals: `$XDG_STATE_HOME/devmount`, else
/// `~/.local/state/devmount`.
pub fn state_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            let home =
                std::env::var_os("HOME").ok_or_else(|| anyhow!("neither XDG_STATE_HOME nor HOME is set"))?;
            PathBuf::from(home).join(".local/state")
        }
    };
    let dir = base.join("devmount");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    Ok(dir)
}

/// Where a mount's files come from.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// An SSH server (devmount-server or OpenSSH), with the files that reach it.
    Ssh { target: Target, identity: PathBuf, known_hosts: PathBuf },
    /// A devmount-server the daemon starts over `dir` (canonical) with fresh keys, and stops.
    Local { dir: PathBuf, server: StartOptions },
    /// A Deployment's container, swapped for a dev container the daemon uploads the server
    /// to and reaches through port-forwards; restored when the session ends.
    Kube(Box<KubeEndpoint>),
}

/// What `devmount mount` or `devmount up` was asked to do.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub endpoint: Endpoint,
    /// Names the journal: what one mount leaves pending, the next mount with the same key
    /// replays. It must not change with the connection (a local server's port does). For
    /// [`Endpoint::Kube`] the daemon names it once it has read the Deployment.
    pub journal_key: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub cache: CacheConfig,
    pub journal: JournalConfig,
    /// Port forwards over the mount's connection.
    pub forwards: Vec<ForwardSpec>,
    /// For `devmount exec` and `devmount ssh`, on top of the server's.
    pub environment: Vec<(String, String)>,
    /// The session's name (from the manifest), for `devmount status`.
    pub name: Option<String>,
}

/// Hears how the start goes: a spinner on a terminal.
pub trait Progress {
    /// A step begins.
    fn step(&mut self, what: &str);
    /// Something the user should read, whatever the output is.
    fn note(&mut self, text: &str);
    /// The start is over (ready or failed): no more steps.
    fn finish(&mut self);
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
            bail!(
                "mount point {} does not exist; create it with `mkdir -p {}`",
                path.display(),
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot use mount point {}", path.display())),
    }
    let abs = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    if is_mounted(&abs)? {
        bail!(
            "{} is already a mount point; unmount it first with `fusermount3 -u {}`",
            abs.display(),
            abs.display()
        );
    }
    Ok(abs)
}

/// Whether something is mounted exactly at `abs`, per /proc/self/mountinfo.
pub fn is_mounted(abs: &Path) -> Result<bool> {
    Ok(mounted(abs)?.is_some())
}

/// Whether the mount exactly at `abs` is a devmount one (its source is `devmount:ADDRESS`).
pub fn is_devmount(abs: &Path) -> Result<bool> {
    Ok(mounted(abs)?.is_some_and(|m| m.fstype.starts_with(b"fuse") && m.source.starts_with(b"devmount:")))
}

/// The topmost mount exactly at a path.
struct MountEntry {
    fstype: Vec<u8>,
    source: Vec<u8>,
    /// The minor device number: for FUSE, the connection's number in fusectl.
    minor: Option<u32>,
}

/// The topmost mount exactly at `abs`, per /proc/self/mountinfo.
fn mounted(abs: &Path) -> Result<Option<MountEntry>> {
    let info = std::fs::read("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut found = None;
    for line in info.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.get(4).is_some_and(|mp| unescape_mountinfo(mp) == abs.as_os_str().as_bytes()) {
            let minor = fields
                .get(2)
                .and_then(|dev| dev.split(|&b| b == b':').nth(1))
                .and_then(|m| std::str::from_utf8(m).ok()?.parse().ok());
            // Optional fields end with a lone "-"; the type and the source follow it.
            let mut rest = fields.iter().skip_while(|&&f| f != b"-").skip(1);
            let fstype = rest.next().map(|t| t.to_vec()).unwrap_or_default();
            let source = rest.next().map(|s| unescape_mountinfo(s)).unwrap_or_default();
            found = Some(MountEntry { fstype, source, minor });
        }
    }
    Ok(found)
}

/// Writes space, tab, newline and backslash as `\ooo` octal escapes, as mountinfo does.
pub(crate) fn escape_mountinfo(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
pub(crate) fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 4 <= field.len()
            && field[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Runs the mount: in this process with `--foreground`, else in a forked daemon; returns once
/// it is ready (or, in the foreground, once it is unmounted).
pub fn run(mut args: MountArgs, progress: &mut dyn Progress) -> Result<()> {
    args.mountpoint = check_mountpoint(&args.mountpoint)?;
    // The daemon leaves the caller's directory, and reconnects long after: paths must not
    // depend on it.
    match &mut args.endpoint {
        Endpoint::Ssh { identity, known_hosts, .. } => {
            *identity = absolute(identity)?;
            *known_hosts = absolute(known_hosts)?;
        }
        Endpoint::Local { server, .. } => {
            if let Some(bin) = &mut server.server_bin {
                *bin = absolute(bin)?;
            }
        }
        Endpoint::Kube(kube) => {
            if let Some(bin) = &mut kube.server_bin {
                *bin = absolute(bin)?;
            }
        }
    }
    if args.foreground {
        return serve(args, Report::Here(Some(progress)));
    }
    // Close-on-exec: the local server and fusermount3, which the daemon starts, must not hold
    // the parent's pipe open.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
    // SAFETY: no thread has been started yet (the runtime starts in the child), so the child
    // may do anything the parent could.
    match unsafe { nix::unistd::fork() }.context("cannot fork the mount daemon")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write);
            let result = follow_start(std::fs::File::from(read), progress);
            progress.finish();
            result
        }
        nix::unistd::ForkResult::Child => {
            drop(read);
            let _ = nix::unistd::setsid();
            // A daemon must not keep the caller's directory busy (it may be another mount).
            let _ = std::env::set_current_dir("/");
            let result = serve(args, Report::Pipe(Some(std::fs::File::from(write))));
            // The parent has been told already (ok, or the error): leave without running the
            // parent's exit handlers twice.
            std::process::exit(if result.is_ok() { 0 } else { 1 })
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// The parent's side of the pipe: shows the steps, and returns how the start ended.
fn follow_start(pipe: std::fs::File, progress: &mut dyn Progress) -> Result<()> {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).context("waiting for the mount daemon")? == 0 {
            bail!("the mount daemon died before the mount was ready");
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        if let Some(step) = text.strip_prefix("step ") {
            progress.step(step);
        } else if let Some(note) = text.strip_prefix("note ") {
            progress.note(note);
        } else if text == "ok" {
            return Ok(());
        } else if let Some(first) = text.strip_prefix("error ") {
            let mut rest = String::new();
            // An error's text may run over several lines; it is the last thing sent.
            let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
            let message = format!("{first}\n{rest}");
            bail!("{}", message.trim_end());
        }
    }
}

/// How the start is told: to the waiting parent, or to the caller in the foreground.
enum Report<'a> {
    /// `None` once the parent has been told how it ended.
    Pipe(Option<std::fs::File>),
    Here(Option<&'a mut dyn Progress>),
}

impl Report<'_> {
    fn send(&mut self, line: &str) {
        if let Report::Pipe(Some(pipe)) = self {
            // A parent that is gone (killed) has nobody to show it to.
            let _ = pipe.write_all(format!("{line}\n").as_bytes());
        }
    }

    fn step(&mut self, what: &str) {
        match self {
            Report::Here(Some(progress)) => progress.step(what),
            _ => self.send(&format!("step {what}")),
        }
    }

    fn note(&mut self, text: &str) {
        match self {
            Report::Here(Some(progress)) => progress.note(text),
            _ => self.send(&format!("note {text}")),
        }
    }

    /// Ends the start.
    fn end(&mut self, outcome: std::result::Result<(), &anyhow::Error>) {
        match outcome {
            Ok(()) => self.send("ok"),
            Err(e) => self.send(&format!("error {e:#}")),
        }
        match self {
            Report::Pipe(pipe) => drop(pipe.take()),
            Report::Here(progress) => {
                if let Some(progress) = progress.take() {
                    progress.finish();
                }
            }
        }
    }
}

impl Progress for Report<'_> {
    fn step(&mut self, what: &str) {
        Report::step(self, what);
    }

    fn note(&mut self, text: &str) {
        Report::note(self, text);
    }

    /// The start ends with [`Report::end`].
    fn finish(&mut self) {}
}

/// A started session: what serving and shutting down need.
struct Running {
    runtime: tokio::runtime::Runtime,
    started: Started,
    /// The cluster side of a kubernetes session, restored at the end.
    kube: Option<kube::Started>,
}

/// What runs on the runtime.
struct Started {
    fuse: fuser::BackgroundSession,
    /// Aborts the connection if this process dies before the mount is detached.
    guard: Option<AbortGuard>,
    daemon: Arc<Daemon>,
    keeper: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// Starts everything, reports readiness, and serves until unmounted.
fn serve(args: MountArgs, mut report: Report) -> Result<()> {
    let running = match start(&args, &mut report) {
        Ok(running) => running,
        Err(e) => {
            report.end(Err(&e));
            return Err(e);
        }
    };
    if matches!(report, Report::Pipe(_)) {
        // From here on the daemon has no terminal to talk to: its log goes to a file, and it
        // holds no pipe of the caller's open (`devmount up ... | cat` must end). Before the
        // caller hears "ready", so whoever then looks for the daemon's log finds this file.
        detach_stdio(&args.mountpoint);
    }
    report.end(Ok(()));
    let Running { runtime, started: Started { fuse, guard, daemon, keeper, stop }, kube } = running;
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
    // Returns once the kernel has detached the mount (umount, fusermount3 -u, `devmount down`,
    // or a signal).
    let joined = fuse.join();
    drop(guard);
    runtime.block_on(shutdown(&daemon, stop, keeper));
    if let Some(kube) = kube {
        match runtime.block_on(kube::finish(kube)) {
            Ok(done) => tracing::info!("{}", done.join("; ")),
            Err(e) => tracing::warn!("{e:#}; `devmount down --force` restores it"),
        }
    }
    if let Some(server) = &daemon.server {
        let stopped = server.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stop();
        if let Err(e) = stopped {
            tracing::warn!("{e:#}");
        }
    }
    control::remove(&args.mountpoint);
    match joined {
        Ok(()) => Ok(()),
        // The mount was already taken away from under the session.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(e).context("the FUSE session failed"),
    }
}

/// Starts the local server (or the swap, with a kubernetes target), connects, starts the
/// forwards, mounts, and answers the control socket.
fn start(args: &MountArgs, report: &mut Report) -> Result<Running> {
    let options = ConnectOptions::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("devmount-io")
        .build()
        .context("cannot start the async runtime")?;
    let (dial, server, kube, key, access) = match &args.endpoint {
        Endpoint::Ssh { target, identity, known_hosts } => {
            let dial = Dial {
                target: target.clone(),
                identity: identity.clone(),
                known_hosts: known_hosts.clone(),
                options,
                transport: None,
            };
            (dial, None, None, args.journal_key.clone(), None)
        }
        Endpoint::Local { dir, server } => {
            report.step("starting devmount-server");
            let server = LocalServer::start(dir, &state_dir()?, server)?;
            let dial = Dial {
                target: server.target(),
                identity: server.identity().to_owned(),
                known_hosts: server.known_hosts().to_owned(),
                options,
                transport: None,
            };
            let access = SshAccess::local(&server);
            (dial, Some(server), None, args.journal_key.clone(), Some(access))
        }
        Endpoint::Kube(endpoint) => {
            let state = state_dir()?;
            let started = runtime.block_on(async {
                let started = kube::start(endpoint, &args.mountpoint, &state, report).await?;
                let stream = started.route.connect(|step| report.step(step)).await;
                anyhow::Ok((started, stream))
            })?;
            let (started, stream) = started;
            let files = &started.files;
            let dial = Dial {
                target: started.place.target(),
                identity: files.identity(),
                known_hosts: files.known_hosts(),
                options,
                transport: Some(started.route.clone()),
            };
            let key = started.place.journal_key();
            match stream.and_then(|stream| files.ssh_access().map(|access| (stream, access))) {
                Ok((stream, access)) => {
                    *started.route.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(stream);
                    (dial, None, Some(started), key, Some(access))
                }
                Err(e) => return Err(runtime.block_on(kube::abandon(started, e))),
            }
        }
    };
    let result = {
        // What a failed start drops (channels of the connection) needs the runtime to close.
        let _context = runtime.enter();
        let place = kube.as_ref().map(|k| k.place.describe());
        start_on(&runtime, args, &key, report, dial, server, Reach { access, place })
    };
    match (result, kube) {
        (Ok(started), kube) => Ok(Running { runtime, started, kube }),
        (Err(e), Some(kube)) => Err(runtime.block_on(kube::abandon(kube, e))),
        (Err(e), None) => Err(e),
    }
}

/// What `status` and OpenSSH clients are told of a session beyond its SSH target.
struct Reach {
    access: Option<SshAccess>,
    place: Option<String>,
}

/// [`start`]'s part on the runtime: the connection, forwards, mount and control socket.
fn start_on(
    runtime: &tokio::runtime::Runtime,
    args: &MountArgs,
    key: &str,
    report: &mut Report,
    dial: Dial,
    server: Option<LocalServer>,
    reach: Reach,
) -> Result<Started> {
    report.step(&format!("connecting to {}", dial.target.address()));
    let (fs, feed, ssh) = runtime.block_on(setup(args, key, &dial, report))?;
    let ssh = Arc::new(ssh);
    let (current, sessions) = watch::channel(Some(ssh.clone()));
    let forwards = if args.forwards.is_empty() {
        None
    } else {
        report.step("starting the port forwards");
        Some(runtime.block_on(Forwards::follow(sessions.clone(), &args.forwards))?)
    };

    let daemon = Arc::new(Daemon {
        mountpoint: args.mountpoint.clone(),
        name: args.name.clone(),
        target: dial.target.clone(),
        place: reach.place,
        fs: fs.clone(),
        sessions,
        forwards: Mutex::new(forwards),
        ssh: reach.access,
        server: server.map(|s| Arc::new(Mutex::new(s))),
        environment: args.environment.clone(),
        gave_up: Default::default(),
    });
    // Bound before the mount appears, so whoever sees the mount can reach its daemon.
    let listener = runtime.block_on(async { control::bind(&daemon) })?;
    let abandon = |e: anyhow::Error| {
        control::remove(&args.mountpoint);
        e
    };

    report.step(&format!("mounting {}", args.mountpoint.display()));
    let echo = Arc::new(Echo::default());
    let fuse = FuseFs::new(fs.clone(), echo.clone(), runtime.handle().clone());
    let config = mount_config(&dial.target);
    let fuse = fuser::Session::new(fuse, &args.mountpoint, &config)
        .with_context(|| format!("cannot mount on {}", args.mountpoint.display()))
        .and_then(|session| session.spawn().context("cannot start the FUSE session"))
        .map_err(abandon)?;
    let connection = mounted(&args.mountpoint).ok().flatten().and_then(|m| m.minor);
    let guard = match connection.map(AbortGuard::arm) {
        Some(Ok(guard)) => guard,
        Some(Err(e)) => {
            unmount(&args.mountpoint);
            return Err(abandon(e));
        }
        None => {
            tracing::warn!("{} is not in /proc/self/mountinfo", args.mountpoint.display());
            None
        }
    };
    let mut notices = None;
    if feed.is_some() {
        match echo.start(args.mountpoint.clone(), fuse.notifier()) {
            Ok(n) => notices = Some(n),
            Err(e) => {
                unmount(&args.mountpoint);
                return Err(abandon(anyhow::Error::new(e).context("cannot start the echo thread")));
            }
        }
    }
    let (stop, stopped) = watch::channel(false);
    let keeper = runtime.spawn(crate::reconnect::keep(dial, fs, ssh, feed, notices, current, stopped));
    runtime.spawn(control::serve(listener, daemon.clone()));
    Ok(Started { fuse, guard, daemon, keeper, stop })
}

/// After the unmount: the journal goes to the server (what cannot stays for the next mount),
/// the forwards stop, and the connection says goodbye.
async fn shutdown(daemon: &Daemon, stop: watch::Sender<bool>, keeper: JoinHandle<()>) {
    let fs = &daemon.fs;
    if let Some(reason) = daemon.server_gone() {
        let pending = fs.journal().stats().pending_ops;
        if pending > 0 {
            tracing::warn!("{reason}: {pending} change(s) are kept and replayed at the next mount");
        }
    } else if daemon.gave_up.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "{} change(s) could not reach the server; they are kept and replayed at the next mount",
            fs.journal().stats().pending_ops
        );
    } else {
        match tokio::time::timeout(DRAIN_TIMEOUT, fs.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(_) => tracing::warn!(
                "{} change(s) could not reach the server; they are kept and replayed at the next mount",
                fs.journal().stats().pending_ops
            ),
        }
    }
    let forwards = daemon.forwards.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(forwards) = forwards {
        forwards.stop().await;
    }
    let _ = stop.send(true);
    let _ = keeper.await;
}

/// The connection, the file system over it, and its feed (devmount-server only).
async fn setup(
    args: &MountArgs,
    key: &str,
    dial: &Dial,
    report: &mut Report<'_>,
) -> Result<(Arc<Fs>, Option<session::FeedStream>, Session)> {
    let session = dial.session().await?;
    let (sftp, info) = session.open_sftp().await?;
    let base = dial.target.path.clone();
    let root = sftp.stat(&base).await.map_err(|e| {
        anyhow!(
            "remote path {} on {}: {}; check the path in the target",
            String::from_utf8_lossy(&base),
            dial.target.address(),
            nix::errno::Errno::from_raw(e.errno()).desc()
        )
    })?;
    if root.permissions.is_some_and(|m| m & libc::S_IFMT != libc::S_IFDIR) {
        bail!("remote path {} is not a directory", String::from_utf8_lossy(&base));
    }
    let remote = Arc::new(Remote::new(sftp, info, &base));
    let feed = if remote.is_devmount() { Some(session.open_feed().await?) } else { None };
    let (journal, recovered) = Journal::open(&state_dir()?, key, args.journal.clone())
        .map_err(|e| anyhow!("{e}; is another devmount mounting {key}?"))?;
    if !recovered.ops.is_empty() {
        report.note(&format!(
            "replaying {} change(s) ({} bytes) left pending by an earlier mount of {key}",
            recovered.ops.len(),
            recovered.data_bytes
        ));
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
    tokio::spawn(fs.clone().fetch_siblings());
    if !recovered.ops.is_empty() {
        // The local state knows nothing of the replayed changes: let the server have them
        // before anyone looks.
        fs.sync().await.map_err(|e| anyhow!("replaying the pending changes: {e}"))?;
    }
    Ok((fs, feed, session))
}

fn mount_config(target: &Target) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("devmount:{}", target.address())),
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

/// Detaches the mount at `path` unless a program uses it: `devmount down` must not leave a
/// session half-gone behind a shell that sits in it.
pub fn unmount_unless_busy(path: &Path) -> Result<()> {
    let busy = || {
        anyhow!(
            "{} is busy: a program has a file or its working directory in it; leave it (`fuser -vm {}` lists them) and try again",
            path.display(),
            path.display()
        )
    };
    if nix::unistd::geteuid().is_root() {
        return match nix::mount::umount2(path, nix::mount::MntFlags::empty()) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Err(busy()),
            Err(e) => Err(anyhow!("cannot unmount {}: {}", path.display(), e.desc())),
        };
    }
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run fusermount3")?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr);
    if why.contains("busy") {
        return Err(busy());
    }
    Err(anyhow!("cannot unmount {}: {}", path.display(), why.trim()))
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
        assert_eq!(escape_mountinfo(b"/a b\\c\n"), br"/a\040b\134c\012");
        let odd = b"/x\ty \xff\\";
        assert_eq!(unescape_mountinfo(&escape_mountinfo(odd)), odd);
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
