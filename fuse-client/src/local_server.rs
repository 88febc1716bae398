//! A `devmount-server` run as a local process over a directory: what `devmount up MNT --local
//! DIR` connects to. Everything after the start (SSH, SFTP, exec, forwards) is the same path as
//! for a server in a pod.
//!
//! Each start makes a fresh session directory under the state directory, mode 0700, holding a
//! new ed25519 client key and a new host key (never reused by another session), the
//! `authorized_keys` and `known_hosts` files that pin them, and the server's log. The server
//! listens on `127.0.0.1` on a port the kernel picks, and its host key is checked twice: the
//! fingerprint it prints must be the key written for it, and the known_hosts file lists only
//! that key.
//!
//! The server never outlives its parent: it gets `PR_SET_PDEATHSIG`. Linux sends that signal
//! when the *thread* that forked the child ends, not the process, so the child is forked by a
//! keeper thread of ours that lives exactly as long as the child (it also reaps it); a caller
//! may start the server from any thread, a short-lived one included.
//!
//! A server that exits on its own is started again by a supervisor thread, on the same port with
//! the same keys and log, so the pinned host key stays valid and the session's reconnect finds it
//! where it was: after [`RESTART_DELAY`], doubling with each exit, until it has exited
//! [`MAX_EXITS`] times within [`EXIT_WINDOW`] (a restart that fails counts as an exit); then it
//! stays down. [`LocalServer::subscribe`] follows all of it, each exit with the log's last lines
//! at that moment.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Local};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;
use tokio::sync::watch;

use crate::session::{fingerprint, Target};

/// The server's file name, looked for next to devmount's own executable.
pub const SERVER_NAME: &str = "devmount-server";
/// The wait before the first restart; it doubles with each exit within [`EXIT_WINDOW`].
const RESTART_DELAY: Duration = Duration::from_millis(500);
/// This many exits within [`EXIT_WINDOW`] and the server is not started again.
pub const MAX_EXITS: usize = 3;
/// The window of [`MAX_EXITS`].
pub const EXIT_WINDOW: Duration = Duration::from_secs(60);
/// Log lines kept with each exit.
const EXIT_LOG_LINES: usize = 5;

/// How long SIGTERM has before SIGKILL: the server gives its commands 5 s to end.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the exit after SIGKILL; a process stuck in the kernel is left behind.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long a server that closed its output gets to exit, so its status can be reported.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// The longest stdout line read; the two lines that matter are short.
const MAX_LINE: u64 = 64 << 10;
/// How much of the log's end is read for its last lines.
const LOG_TAIL: u64 = 64 << 10;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The server binary; `None` takes the `devmount-server` next to the current executable.
    pub server_bin: Option<PathBuf>,
    /// Ports of 127.0.0.1 that clients may reach with `direct-tcpip` (`-L`, `forward:`).
    pub allow_forward: Vec<u16>,
    /// Ports of 127.0.0.1 that clients may listen on with `tcpip-forward` (`-R`, `reverse:`).
    pub allow_reverse: Vec<u16>,
    /// How long the server has to print its port and host key. A large directory makes the
    /// start slower: the change feed watches every directory before the server listens.
    pub start_timeout: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            server_bin: None,
            allow_forward: Vec::new(),
            allow_reverse: Vec::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether the server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Serving, as process `pid`.
    Running { pid: u32 },
    /// It exited; another starts on the same port after a short wait.
    Restarting,
    /// It exited [`MAX_EXITS`] times within [`EXIT_WINDOW`]: it is not started again.
    GaveUp,
    /// [`LocalServer::stop`] stopped it (or it never started).
    Stopped,
}

/// One end of the server, or a restart that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// `exited (signal 9, SIGKILL)`, `exited (exit status 1)`, `could not be restarted (...)`.
    pub what: String,
    pub at: DateTime<Local>,
    /// The log's last lines (at most [`EXIT_LOG_LINES`]) at that moment, oldest first.
    pub log: Vec<String>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.what, self.at.format("%H:%M:%S"))
    }
}

/// What [`LocalServer::subscribe`] follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub health: Health,
    /// The latest exit, if there was one.
    pub last_exit: Option<Exit>,
    /// Restarts that succeeded, and when the latest one did.
    pub restarts: u32,
    pub restarted_at: Option<DateTime<Local>>,
}

impl ServerState {
    /// The running server's process id; its process group has the same id.
    pub fn pid(&self) -> Option<u32> {
        match self.health {
            Health::Running { pid } => Some(pid),
            _ => None,
        }
    }
}

/// A running local devmount-server. Dropping it stops the server and removes its session
/// directory, keys and log included.
pub struct LocalServer {
    /// The served directory, canonical.
    root: PathBuf,
    session_dir: PathBuf,
    identity: PathBuf,
    known_hosts: PathBuf,
    /// `ssh-ed25519 AAAA...`
    host_public: String,
    log: PathBuf,
    port: u16,
    user: String,
    /// `None` once stopped.
    supervisor: Option<Supervisor>,
    state: watch::Receiver<ServerState>,
}

impl LocalServer {
    /// Makes a session directory under `state_dir` with fresh keys, starts the server over
    /// `dir` on 127.0.0.1 and returns once it listens with the expected host key. Call it in
    /// the process that will own the server, after any fork: threads, the keeper and the
    /// supervisor among them, do not survive a fork.
    pub fn start(dir: &Path, state_dir: &Path, options: &StartOptions) -> Result<LocalServer> {
        let root = served_dir(dir)?;
        let bin = server_binary(options.server_bin.as_deref())?;
        let name: String = random_bytes::<8>()?.iter().map(|b| format!("{b:02x}")).collect();
        let session_dir = new_session_dir(&state_dir.join("local"), &name)?;
        let keys = SessionKeys::write(&session_dir)?;
        let log = session_dir.join("server.log");
        OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .with_context(|| format!("cannot create the server log {}", log.display()))?;
        let launch = Launch {
            bin,
            root: root.clone(),
            host_key: keys.host_key.clone(),
            authorized_keys: keys.authorized_keys.clone(),
            allow_forward: options.allow_forward.clone(),
            allow_reverse: options.allow_reverse.clone(),
            log: log.clone(),
            fingerprint: keys.host_fingerprint.clone(),
            start_timeout: options.start_timeout,
        };
        let (state_tx, state) = watch::channel(ServerState {
            health: Health::Stopped,
            last_exit: None,
            restarts: 0,
            restarted_at: None,
        });
        let shared = Arc::new(Supervised {
            control: Mutex::new(Control { process: None, stopping: false }),
            wake: Condvar::new(),
            state: state_tx,
        });
        let abandon = |e: anyhow::Error| {
            // The keys are never used again; the log stays for the error that names it.
            for file in [&keys.identity, &keys.host_key, &keys.authorized_keys] {
                let _ = fs::remove_file(file);
            }
            e
        };
        let (process, port) = launch.run(0, &shared).map_err(abandon)?;
        let line = format!("[{}]:{port} {}\n", Ipv4Addr::LOCALHOST, keys.host_public);
        if let Err(e) = write_private(&keys.known_hosts, &line) {
            process.stop();
            return Err(abandon(e));
        }
        let pid = process.pid();
        shared.lock().process = Some(process);
        shared.state.send_modify(|s| s.health = Health::Running { pid });
        let supervised = shared.clone();
        let thread = std::thread::Builder::new()
            .name("local-server-supervisor".into())
            .spawn(move || supervise(&supervised, &launch, port));
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                // Taken first: its keeper takes the lock when the process ends.
                let process = shared.lock().process.take();
                if let Some(process) = process {
                    process.stop();
                }
                return Err(abandon(anyhow!("cannot start a thread to watch the server: {e}")));
            }
        };
        Ok(LocalServer {
            root,
            session_dir,
            identity: keys.identity,
            known_hosts: keys.known_hosts,
            host_public: keys.host_public,
            log,
            port,
            user: crate::mount::local_user().to_string_lossy().into_owned(),
            supervisor: Some(Supervisor { shared, thread }),
            state,
        })
    }

    /// The port the server listens on, on 127.0.0.1; restarts keep it.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's private key file.
    pub fn identity(&self) -> &Path {
        &self.identity
    }

    /// A known_hosts file that lists the server's host key, and nothing else.
    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }

    /// The server's host key as a public key line, `ssh-ed25519 AAAA...`.
    pub fn host_public_key(&self) -> &str {
        &self.host_public
    }

    /// The user name a client gives (the server ignores it).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The session directory: keys, known_hosts, authorized_keys and the server's log.
    pub fn session_dir(&self) -> &Path {
        &self.session_dir
    }

    /// The server's log (its stderr and stdout, across restarts).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The served directory, canonical.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ssh://USER@127.0.0.1:PORT/ROOT`, with the local user.
    pub fn target(&self) -> Target {
        Target {
            user: self.user.clone(),
            host: Ipv4Addr::LOCALHOST.to_string(),
            port: self.port,
            path: Bytes::copy_from_slice(self.root.as_os_str().as_bytes()),
        }
    }

    /// `local:ROOT`: what names the journal of this directory. Unlike the target, it does not
    /// change with the port, so a later session over the same directory finds the changes an
    /// earlier one left pending.
    pub fn journal_key(&self) -> String {
        format!("local:{}", self.root.to_string_lossy())
    }

    /// How the server is doing now.
    pub fn state(&self) -> ServerState {
        self.state.borrow().clone()
    }

    /// Follows how the server is doing, from any runtime or thread.
    pub fn subscribe(&self) -> watch::Receiver<ServerState> {
        self.state.clone()
    }

    /// Stops the server (SIGTERM, then SIGKILL after a grace period) and its restarts, and
    /// removes the session directory. Stopping again does nothing.
    pub fn stop(&mut self) -> Result<()> {
        let Some(supervisor) = self.supervisor.take() else { return Ok(()) };
        supervisor.stop();
        match fs::remove_dir_all(&self.session_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).with_context(|| {
                format!("cannot remove the session directory {}", self.session_dir.display())
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e:#}");
        }
    }
}

/// How the server is run, the first time and at each restart.
struct Launch {
    bin: PathBuf,
    root: PathBuf,
    host_key: PathBuf,
    authorized_keys: PathBuf,
    allow_forward: Vec<u16>,
    allow_reverse: Vec<u16>,
    log: PathBuf,
    /// `SHA256:...` of the host key: what the server must report.
    fingerprint: String,
    start_timeout: Duration,
}

impl Launch {
    /// Starts the server on `port` (0: one the kernel picks) and waits until it reports that
    /// port and the host key; returns it with the port. A server that fails is stopped, and
    /// the error quotes its log.
    fn run(&self, port: u16, supervised: &Arc<Supervised>) -> Result<(Process, u16)> {
        let bin = &self.bin;
        let log_file = OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open the server log {}", self.log.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("--root")
            .arg(&self.root)
            .arg("--listen")
            .arg(SocketAddr::from((Ipv4Addr::LOCALHOST, port)).to_string())
            .arg("--host-key")
            .arg(&self.host_key)
            .arg("--authorized-keys")
            .arg(&self.authorized_keys);
        for port in &self.allow_forward {
            command.arg("--allow-forward").arg(port.to_string());
        }
        for port in &self.allow_reverse {
            command.arg("--allow-reverse").arg(port.to_string());
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file.try_clone().with_context(|| format!("cannot open {}", self.log.display()))?)
            // Its own process group: a Ctrl-C at the terminal goes to devmount, which drains
            // the journal before it stops the server.
            .process_group(0);
        die_with_parent(&mut command);

        let notify = supervised.clone();
        let (process, stdout) = Process::spawn(command, Box::new(move || notify.wake_up()))
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("local-server-out".into())
            .spawn(move || read_stdout(stdout, log_file, ready_tx));
        let failed = |process: Process, problem: String| {
            process.stop();
            anyhow!("{problem}; {}", log_summary(&self.log))
        };
        if let Err(e) = reader {
            return Err(failed(process, format!("cannot start a thread to read its output: {e}")));
        }
        let ready = match ready_rx.recv_timeout(self.start_timeout) {
            Ok(ready) => ready,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let problem =
                    format!("{} did not report its port within {:?}", bin.display(), self.start_timeout);
                return Err(failed(process, problem));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let how = process
                    .wait_exit(Instant::now() + EXIT_WAIT)
                    .unwrap_or_else(|| "closed its output".into());
                let problem = format!("{} stopped before it was ready ({how})", bin.display());
                return Err(failed(process, problem));
            }
        };
        if ready.fingerprint != self.fingerprint {
            let problem = format!(
                "{} reports the host key {}, not the key {} made for it",
                bin.display(),
                ready.fingerprint,
                self.fingerprint
            );
            return Err(failed(process, problem));
        }
        match ready.listening.parse::<SocketAddr>() {
            Ok(addr) if addr.ip() == Ipv4Addr::LOCALHOST && (port == 0 || addr.port() == port) => {
                Ok((process, addr.port()))
            }
            _ => {
                let wanted = if port == 0 { "127.0.0.1".to_owned() } else { format!("127.0.0.1:{port}") };
                let problem =
                    format!("{} reports listening on {:?}, not on {wanted}", bin.display(), ready.listening);
                Err(failed(process, problem))
            }
        }
    }
}

/// "its log FILE ends: LINE | LINE", for errors.
fn log_summary(log: &Path) -> String {
    let lines = last_lines(log, EXIT_LOG_LINES);
    if lines.is_empty() {
        format!("its log {} is empty", log.display())
    } else {
        format!("its log {} ends: {}", log.display(), lines.join(" | "))
    }
}

/// The server's process and the thread that restarts it.
struct Supervisor {
    shared: Arc<Supervised>,
    thread: JoinHandle<()>,
}

/// What the supervisor thread shares with the [`LocalServer`] and the keeper threads.
struct Supervised {
    control: Mutex<Control>,
    /// Signalled when a process exits and when the server is being stopped.
    wake: Condvar,
    state: watch::Sender<ServerState>,
}

struct Control {
    /// The current process; `None` between an exit and the restart.
    process: Option<Process>,
    stopping: bool,
}

impl Supervised {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_up(&self) {
        // Under the lock, so a supervisor between its check and its wait cannot miss it.
        let _control = self.lock();
        self.wake.notify_all();
    }
}

impl Supervisor {
    /// Stops the current process and the supervisor thread.
    fn stop(self) {
        let process = {
            let mut control = self.shared.lock();
            control.stopping = true;
            control.process.take()
        };
        self.shared.wake.notify_all();
        if let Some(process) = process {
            process.stop();
        }
        let _ = self.thread.join();
        self.shared.state.send_modify(|s| s.health = Health::Stopped);
    }
}

/// The supervisor thread: waits for the current process to exit, then starts another on
/// `port`, until it has exited too often or the server is stopped.
fn supervise(shared: &Arc<Supervised>, launch: &Launch, port: u16) {
    let mut exits: VecDeque<Instant> = VecDeque::new();
    loop {
        let mut control = shared.lock();
        let mut what = loop {
            if control.stopping {
                return;
            }
            if let Some(reason) = control.process.as_ref().and_then(Process::exit_reason) {
                break format!("exited ({reason})");
            }
            control = shared.wake.wait(control).unwrap_or_else(PoisonError::into_inner);
        };
        let ended = control.process.take();
        drop(control);
        if let Some(process) = ended {
            // Already reaped: this only joins its keeper thread.
            process.stop();
        }
        loop {
            let now = Instant::now();
            exits.push_back(now);
            while exits.front().is_some_and(|&at| now.duration_since(at) >= EXIT_WINDOW) {
                exits.pop_front();
            }
            let exit = Exit { what, at: Local::now(), log: last_lines(&launch.log, EXIT_LOG_LINES) };
            let gave_up = exits.len() >= MAX_EXITS;
            if gave_up {
                tracing::error!(
                    "{SERVER_NAME} {exit}; not restarting it: it exited {} times within {EXIT_WINDOW:?}",
                    exits.len()
                );
            } else {
                tracing::warn!("{SERVER_NAME} {exit}; restarting it on 127.0.0.1:{port}");
            }
            shared.state.send_modify(|s| {
                s.health = if gave_up { Health::GaveUp } else { Health::Restarting };
                s.last_exit = Some(exit);
            });
            if gave_up {
                return;
            }
            let delay = RESTART_DELAY * (1 << (exits.len() - 1));
            let control = shared.lock();
            let (control, _) = shared
                .wake
                .wait_timeout_while(control, delay, |c| !c.stopping)
                .unwrap_or_else(PoisonError::into_inner);
            if control.stopping {
                return;
            }
            drop(control);
            match launch.run(port, shared) {
                Ok((process, _)) => {
                    let pid = process.pid();
                    let mut control = shared.lock();
                    if control.stopping {
                        drop(control);
                        process.stop();
                        return;
                    }
                    control.process = Some(process);
                    drop(control);
                    tracing::warn!("{SERVER_NAME} restarted on 127.0.0.1:{port} (pid {pid})");
                    shared.state.send_modify(|s| {
                        s.health = Health::Running { pid };
                        s.restarts += 1;
                        s.restarted_at = Some(Local::now());
                    });
                    break;
                }
                Err(e) => what = format!("could not be restarted ({e:#})"),
            }
        }
    }
}

/// The canonical form of `dir`, checked to be a directory.
fn served_dir(dir: &Path) -> Result<PathBuf> {
    let root = match fs::canonicalize(dir) {
        Ok(root) => root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("the directory to serve, {}, does not exist; create it first", dir.display())
        }
        Err(e) => bail!("the directory to serve, {}: {e}", dir.display()),
    };
    if !root.is_dir() {
        bail!("the directory to serve, {}, is not a directory", dir.display());
    }
    Ok(root)
}

/// `explicit`, or the server next to the current executable; either must exist.
fn server_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(bin) = explicit {
        if !bin.is_file() {
            bail!(
                "--server-bin {}: no such file; give the path of the devmount-server binary",
                bin.display()
            );
        }
        return Ok(bin.to_owned());
    }
    let exe = std::env::current_exe().context("cannot find devmount's own executable")?;
    let bin = exe.with_file_name(SERVER_NAME);
    if !bin.is_file() {
        bail!(
            "{SERVER_NAME} not found next to devmount (looked for {}); install it there, or give its path with --server-bin FILE",
            bin.display()
        );
    }
    Ok(bin)
}

/// A new, empty directory `PARENT/NAME`, mode 0700 (and its parent, if need be): one
/// session's files.
pub(crate) fn new_session_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dir = parent.join(name);
    // Not recursive: an existing directory is an error, so no session ever shares one.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create the session directory {}", dir.display()))?;
    Ok(dir)
}

/// The key files of one session.
struct SessionKeys {
    identity: PathBuf,
    host_key: PathBuf,
    authorized_keys: PathBuf,
    /// Written once the port is known.
    known_hosts: PathBuf,
    /// `ssh-ed25519 AAAA...`
    host_public: String,
    host_fingerprint: String,
}

impl SessionKeys {
    fn write(dir: &Path) -> Result<SessionKeys> {
        let client = new_key()?;
        let host = new_key()?;
        let keys = SessionKeys {
            identity: dir.join("id_ed25519"),
            host_key: dir.join("host_key"),
            authorized_keys: dir.join("authorized_keys"),
            known_hosts: dir.join("known_hosts"),
            host_public: public_line(&host)?,
            host_fingerprint: fingerprint(host.public_key()),
        };
        write_private(&keys.identity, &private_text(&client)?)?;
        write_private(&keys.host_key, &private_text(&host)?)?;
        write_private(&keys.authorized_keys, &format!("{}\n", public_line(&client)?))?;
        Ok(keys)
    }
}

pub(crate) fn new_key() -> Result<PrivateKey> {
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&random_bytes::<32>()?)))
}

pub(crate) fn private_text(key: &PrivateKey) -> Result<String> {
    Ok(key.to_openssh(LineEnding::LF).context("cannot encode a new key")?.to_string())
}

pub(crate) fn public_line(key: &PrivateKey) -> Result<String> {
    key.public_key().to_openssh().context("cannot encode a new public key")
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom to make session keys")?;
    Ok(bytes)
}

/// Creates `path` (it must not exist) with mode 0600 and writes `text`.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Makes the child get SIGTERM when the thread that forks it ends (see the module doc), and
/// closes the race where the parent died before the child asked for that.
fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid); its errors are built from errno without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// What the server prints on stdout once it serves.
struct Ready {
    /// `127.0.0.1:PORT`
    listening: String,
    /// `SHA256:...`
    fingerprint: String,
}

/// Reads the server's stdout: sends [`Ready`] once both lines came, and copies every line to
/// the log. Ends at EOF, which drops `ready` unsent if the server never got that far.
fn read_stdout(stdout: ChildStdout, mut log: File, ready: mpsc::Sender<Ready>) {
    let mut reader = BufReader::new(stdout);
    let (mut listening, mut host_key, mut sent) = (None, None, false);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !sent {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if let Some(addr) = text.strip_prefix("listening on ") {
                listening = Some(addr.to_owned());
            } else if let Some(key) = text.strip_prefix("host key ") {
                host_key = Some(key.to_owned());
            }
            if let (Some(listening), Some(fingerprint)) = (&listening, &host_key) {
                let ready_line = Ready { listening: listening.clone(), fingerprint: fingerprint.clone() };
                sent = true;
                // The starter may have given up already; the output still goes to the log.
                let _ = ready.send(ready_line);
            }
        }
        // The log is only for people; a failed write must not stop the draining of stdout,
        // or a server that prints more would block on a full pipe.
        let _ = log.write_all(&line);
    }
}

/// The server process and the keeper thread that forked it and reaps it.
struct Process {
    shared: Arc<Shared>,
    keeper: JoinHandle<()>,
}

struct Shared {
    pid: Pid,
    /// How the process ended, once the keeper reaped it. Signals are sent with this lock held
    /// while it is `None`, so the pid cannot have been reused by then.
    exit: Mutex<Option<String>>,
    exited: Condvar,
}

/// Called by the keeper thread once it has reaped the process.
type OnExit = Box<dyn FnOnce() + Send>;

impl Process {
    fn spawn(mut command: Command, on_exit: OnExit) -> Result<(Process, ChildStdout)> {
        let (spawned_tx, spawned_rx) = mpsc::channel();
        let keeper = std::thread::Builder::new()
            .name("local-server".into())
            .spawn(move || {
                let mut child = match command.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Arc::new(Shared {
                    pid: Pid::from_raw(child.id() as i32),
                    exit: Mutex::new(None),
                    exited: Condvar::new(),
                });
                let stdout = child.stdout.take().expect("stdout is piped");
                let _ = spawned_tx.send(Ok((shared.clone(), stdout)));
                keep(&mut child, &shared);
                on_exit();
            })
            .context("cannot start a thread for the server")?;
        match spawned_rx.recv() {
            Ok(Ok((shared, stdout))) => Ok((Process { shared, keeper }, stdout)),
            Ok(Err(e)) => {
                let _ = keeper.join();
                Err(e.into())
            }
            Err(_) => Err(anyhow!("the thread starting the server ended without a word")),
        }
    }

    fn pid(&self) -> u32 {
        self.shared.pid.as_raw() as u32
    }

    /// How the process ended (`exit status 1`, `signal 9, SIGKILL`), once it has.
    fn exit_reason(&self) -> Option<String> {
        self.shared.lock().clone()
    }

    /// How the process ended, waiting for it until `deadline`.
    fn wait_exit(&self, deadline: Instant) -> Option<String> {
        let mut exit = self.shared.lock();
        while exit.is_none() {
            let left = deadline.checked_duration_since(Instant::now())?;
            exit = self.shared.exited.wait_timeout(exit, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        exit.clone()
    }

    fn signal(&self, signal: Signal) {
        let exit = self.shared.lock();
        if exit.is_none() {
            // ESRCH cannot happen while the child is unreaped; nothing else can fail.
            let _ = kill(self.shared.pid, signal);
        }
    }

    /// SIGTERM, then SIGKILL after the grace period. The keeper thread is joined once the
    /// process is gone; a process that survives SIGKILL (stuck in the kernel) is left to it.
    fn stop(self) {
        self.signal(Signal::SIGTERM);
        if self.wait_exit(Instant::now() + STOP_GRACE).is_none() {
            tracing::warn!("{SERVER_NAME} (pid {}) ignored SIGTERM; killing it", self.shared.pid);
            self.signal(Signal::SIGKILL);
            if self.wait_exit(Instant::now() + KILL_WAIT).is_none() {
                tracing::warn!("{SERVER_NAME} (pid {}) survived SIGKILL; leaving it", self.shared.pid);
                return;
            }
        }
        let _ = self.keeper.join();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<String>> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The keeper thread's life after the fork: wait for the child to exit without reaping it,
/// then reap it under the lock, so no signal can reach a reused pid.
fn keep(child: &mut Child, shared: &Shared) {
    // Any error but EINTR means there is nothing left to wait for; `wait` below says why.
    while let Err(Errno::EINTR) = waitid(Id::Pid(shared.pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {}
    let mut exit = shared.lock();
    *exit = Some(match child.wait() {
        Ok(status) => describe(status),
        // Someone else in this process reaped it (a SIGCHLD handler waiting for any child).
        Err(e) => format!("its status is unknown: {e}"),
    });
    shared.exited.notify_all();
}

/// `exit status 1`, `signal 9, SIGKILL`.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(name) => format!("signal {signal}, {name}"),
            Err(_) => format!("signal {signal}"),
        },
        (None, None) => status.to_string(),
    }
}

/// The last `n` lines of `file`'s end, lossily decoded; none if it cannot be read.
fn last_lines(file: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = File::open(file) else { return Vec::new() };
    let Ok(len) = f.seek(SeekFrom::End(0)) else { return Vec::new() };
    let start = len.saturating_sub(LOG_TAIL);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(start)).and_then(|_| f.take(LOG_TAIL).read_to_end(&mut tail)).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&tail);
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // A tail that starts mid-file starts mid-line.
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
}
