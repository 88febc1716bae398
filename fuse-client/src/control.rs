//! The session daemon's control socket: how `devmount sync`, `status`, `exec`, `ssh`, `down`,
//! `ssh-config` and `proxy` reach the process serving a mount, so that commands ride the mount's
//! one SSH connection.
//!
//! One Unix socket per mount, mode 0600 in a 0700 directory: `$XDG_RUNTIME_DIR/devmount/`, else
//! `<state dir>/run/`. Its name is a hash of the mount point's absolute path, so the path stays
//! far below the 108-byte limit of a socket address however deep the mount point is. Beside it,
//! `<hash>.info` says which mount it serves, the daemon's pid, the session's name and the local
//! server's session directory: the sessions are listed from these files, and a dead daemon's
//! leftovers can be found and cleaned up.
//!
//! # Protocol
//!
//! The client sends one request line (at most [`MAX_LINE`] bytes):
//!
//! - `sync`: one answer line, `ok` or `error: MESSAGE`, once every change made to the mount
//!   before the request is on the server.
//! - `status`: `ok`, then the session's status as text, until the daemon closes the socket.
//! - `down`: while the journal drains, lines `pending OPS BYTES`; `note TEXT` for the user;
//!   then `error: MESSAGE` (the session goes on) or `ok`, after which the daemon unmounts, stops
//!   everything, and the socket closes when it exits.
//! - `ssh-config`: `error: MESSAGE`, or `ok` and lines `name NAME`, `user USER`, `identity PATH`,
//!   `known-hosts PATH` (values escaped as in mountinfo), once the daemon has written the
//!   known_hosts file that pins the host key under the session's `Host` alias
//!   ([`crate::proxy`]).
//! - `proxy`: `error: MESSAGE`, or `ok` once a `direct-tcpip` channel to the server's own SSH
//!   port is open on the session's connection; then the socket carries the channel's bytes both
//!   ways, each side's end passed on, until the channel closes.
//! - `exec`: then frames both ways until the command's end. A frame is `uint32 length`, a type
//!   byte and its fields, in RFC 4251 encoding ([`devmount_server::proto::wire`]); at most
//!   [`MAX_FRAME`] bytes.
//!   - client to daemon: `1 request` first and once (`bool` + `string command`, `bool` +
//!     `string cwd` relative to the mount's root, `uint32 n` + n × (`string name`, `string
//!     value`), `bool` + `string term` and four `uint32` cols, rows, pixel width and height);
//!     then any of `2 stdin` (`string data`), `3 stdin-eof`, `4 resize` (four `uint32`), `5
//!     signal` (`uint32` number), `6 output-closed` (`byte` stream: 1 stdout, 2 stderr): the
//!     client's stdout or stderr is broken, so the command's writes there fail as locally.
//!   - daemon to client: `101 stdout` and `102 stderr` (`string data`), `105 stdin-ack`
//!     (`uint32 bytes`), then last either `103 exit` (`byte` devmount's exit code: the
//!     command's, or 128 + signal) or `104 failed` (`string message`: devmount's own failure,
//!     exit 255).
//!
//!   Stdin is flow-controlled so that the daemon never stops reading the socket: a command that
//!   does not read its input must still get the signals sent after it. The client may have at
//!   most [`STDIN_WINDOW`] bytes of stdin unacknowledged; the daemon acknowledges each chunk once
//!   the command's stdin pipe has taken it.
//!
//!   The daemon first runs the flush barrier (everything written to the mount before the
//!   request is on the server), then [`crate::exec::run_on`] on a channel of the session's
//!   connection: the one opened ahead while the previous command ran (or at connect), so a
//!   command costs one round trip, not two. A client that goes away before the end gives the
//!   command SIGHUP, as a lost SSH connection would.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use devmount_server::proto::wire::{self, DecodeError, Reader, WriteExt};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::exec::{self, Event, ExecRequest, ExitStatus, PtyRequest, WindowSize};
use crate::forward::{Forwards, SessionWatch, SESSION_WAIT};
use crate::fs::Fs;
use crate::local_server::{Health, LocalServer, ServerState, EXIT_WINDOW, MAX_EXITS};
use crate::mount::{escape_mountinfo, unescape_mountinfo, DRAIN_TIMEOUT};
use crate::proxy::{HostConfig, SshAccess};
use crate::session::{Session, Target};

/// The longest request line.
pub const MAX_LINE: u64 = 1024;
/// The largest exec frame.
pub const MAX_FRAME: usize = 1 << 20;
/// The most read from a pipe or stdin into one frame.
const CHUNK: usize = 32 << 10;
/// Bytes of stdin a client may send before the daemon acknowledges them.
pub const STDIN_WINDOW: usize = 256 << 10;
/// Frames that may wait for the socket, per exec.
const FRAME_QUEUE: usize = 64;
/// The daemon's buffer between the socket and the command's stdin, stdout and stderr.
const PIPE_SIZE: usize = 64 << 10;
/// Resizes and signals that may wait for the command.
const EVENT_QUEUE: usize = 16;
/// How often `down` tells how the drain goes.
const DRAIN_TICK: Duration = Duration::from_millis(250);

/// The directory of control sockets.
pub fn socket_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("devmount"),
        None => crate::mount::state_dir()?.join("run"),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The control socket of the mount at `mountpoint` (absolute).
pub fn socket_path(mountpoint: &Path) -> Result<PathBuf> {
    let digest = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(socket_dir()?.join(format!("{name}.sock")))
}

/// A session as its info file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Absolute.
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    /// The daemon's.
    pub pid: Option<i32>,
    pub name: Option<String>,
    /// The local server's session directory (keys and log), which a dead daemon leaves behind.
    pub server_dir: Option<PathBuf>,
}

impl Info {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut field = |key: &str, value: &[u8]| {
            out.extend_from_slice(key.as_bytes());
            out.push(b' ');
            out.extend_from_slice(&escape_mountinfo(value));
            out.push(b'\n');
        };
        field("mountpoint", self.mountpoint.as_os_str().as_encoded_bytes());
        if let Some(pid) = self.pid {
            field("pid", pid.to_string().as_bytes());
        }
        if let Some(name) = &self.name {
            field("name", name.as_bytes());
        }
        if let Some(dir) = &self.server_dir {
            field("server_dir", dir.as_os_str().as_encoded_bytes());
        }
        out
    }

    /// `None` for a file that names no mount point; unknown keys are skipped.
    fn decode(text: &[u8], socket: PathBuf) -> Option<Info> {
        use std::os::unix::ffi::OsStringExt;
        let path = |v: Vec<u8>| PathBuf::from(std::ffi::OsString::from_vec(v));
        let mut info = Info { mountpoint: PathBuf::new(), socket, pid: None, name: None, server_dir: None };
        for line in text.split(|&b| b == b'\n') {
            let Some(space) = line.iter().position(|&b| b == b' ') else { continue };
            let value = unescape_mountinfo(&line[space + 1..]);
            match &line[..space] {
                b"mountpoint" => info.mountpoint = path(value),
                b"pid" => info.pid = std::str::from_utf8(&value).ok().and_then(|p| p.parse().ok()),
                b"name" => info.name = String::from_utf8(value).ok(),
                b"server_dir" => info.server_dir = Some(path(value)),
                _ => {}
            }
        }
        info.mountpoint.is_absolute().then_some(info)
    }
}

/// Every session with an info file, running or not, ordered by mount point.
pub fn sessions() -> Result<Vec<Info>> {
    let dir = socket_dir()?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "info") {
            continue;
        }
        // A daemon may remove its files while we look.
        let Ok(text) = std::fs::read(&path) else { continue };
        if let Some(info) = Info::decode(&text, path.with_extension("sock")) {
            found.push(info);
        }
    }
    found.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    Ok(found)
}

/// The info file of a session, if it has one.
pub fn info(mountpoint: &Path) -> Result<Option<Info>> {
    let socket = socket_path(mountpoint)?;
    match std::fs::read(socket.with_extension("info")) {
        Ok(text) => Ok(Info::decode(&text, socket)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read the session file of {}", mountpoint.display())),
    }
}

/// Removes the socket and info file of the session at `mountpoint`.
pub fn remove(mountpoint: &Path) {
    if let Ok(socket) = socket_path(mountpoint) {
        let _ = std::fs::remove_file(socket.with_extension("info"));
        let _ = std::fs::remove_file(socket);
    }
}

/// What the control socket's requests act on: the daemon's parts.
pub struct Daemon {
    /// Absolute.
    pub mountpoint: PathBuf,
    pub name: Option<String>,
    pub target: Target,
    /// Where the session works, when the target alone does not say (Kubernetes).
    pub place: Option<String>,
    pub fs: Arc<Fs>,
    /// The current connection, published by [`crate::reconnect::keep`].
    pub sessions: SessionWatch,
    /// `None` once stopped (or when there are none).
    pub forwards: Mutex<Option<Forwards>>,
    /// The session's own devmount-server (`devmount up --local`).
    pub server: Option<Arc<Mutex<LocalServer>>>,
    /// How OpenSSH clients reach the server through this session (`devmount ssh-config`,
    /// `devmount proxy`); `None` when the target does not say which port the server listens on.
    pub ssh: Option<SshAccess>,
    /// For every command, on top of what the client sends.
    pub environment: Vec<(String, String)>,
    /// `down` waited for the journal in vain: the last drain does not wait again.
    pub gave_up: AtomicBool,
}

impl Daemon {
    fn local_server(&self) -> Option<std::sync::MutexGuard<'_, LocalServer>> {
        self.server.as_ref().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Why the session's local server is gone for good, in one line; `None` while it runs or
    /// is being restarted (or when there is none).
    pub fn server_gone(&self) -> Option<String> {
        ServerLost::of(&self.local_server()?.state()).map(|lost| lost.summary)
    }

    /// Resolves once the session's local server is gone for good; never without one.
    async fn server_lost(&self) -> ServerLost {
        let Some(mut states) = self.local_server().map(|s| s.subscribe()) else {
            return std::future::pending().await;
        };
        let lost = match states.wait_for(|s| ServerLost::of(s).is_some()).await {
            Ok(state) => ServerLost::of(&state),
            Err(_) => None,
        };
        lost.unwrap_or_else(ServerLost::stopped)
    }

    /// Everything written to the mount before, on the server; then the connection. Fails at
    /// once when the local server is gone for good.
    async fn synced_session(&self) -> Result<Arc<Session>, ServerLost> {
        let ready = async {
            self.fs.sync().await.map_err(|e| {
                format!("the changes made before the command could not reach the server: {e}")
            })?;
            self.live_session().await
        };
        tokio::select! {
            biased;
            lost = self.server_lost() => Err(lost),
            ready = ready => ready.map_err(|summary| ServerLost { summary, log: Vec::new() }),
        }
    }

    fn ssh_access(&self) -> Result<&SshAccess, String> {
        self.ssh.as_ref().ok_or_else(|| {
            format!(
                "the session at {} has no SSH server that OpenSSH can reach through it; only sessions of `devmount up` have",
                self.mountpoint.display()
            )
        })
    }

    /// What `devmount ssh-config` needs, its known_hosts file written.
    fn host_config(&self) -> Result<HostConfig> {
        let ssh = self.ssh_access().map_err(|e| anyhow!(e))?;
        let name = self.name.as_deref().with_context(|| {
            format!("the session at {} has no name for its `Host` block", self.mountpoint.display())
        })?;
        ssh.host_config(name)
    }

    /// The connection, waiting up to [`SESSION_WAIT`] while it is being made again.
    async fn live_session(&self) -> Result<Arc<Session>, String> {
        let mut sessions = self.sessions.clone();
        let live = async {
            let session = sessions.wait_for(|s| s.as_ref().is_some_and(|s| !s.is_closed())).await;
            session.ok().and_then(|s| s.clone())
        };
        match tokio::time::timeout(SESSION_WAIT, live).await {
            Ok(Some(session)) => Ok(session),
            _ => Err(self.server_gone().unwrap_or_else(|| {
                format!(
                    "not connected to {} (reconnecting for {SESSION_WAIT:?} now); try again",
                    self.target.address()
                )
            })),
        }
    }

    /// The server's directory for `rel`, a path relative to the mount's root.
    fn remote_dir(&self, rel: Option<&[u8]>) -> Vec<u8> {
        let mut dir = self.target.path.to_vec();
        if let Some(rel) = rel.filter(|r| !r.is_empty()) {
            if !dir.ends_with(b"/") {
                dir.push(b'/');
            }
            dir.extend_from_slice(rel);
        }
        dir
    }

    /// What `devmount status` shows of this session.
    async fn status(&self) -> String {
        let mut out = format!("{}\n", self.mountpoint.display());
        if let Some(name) = &self.name {
            out.push_str(&format!("  name:     {name}\n"));
        }
        let server = self.local_server().map(|s| (s.root().to_owned(), s.port(), s.state()));
        let target = match &server {
            Some((root, port, state)) => match state.pid() {
                Some(pid) => {
                    format!("local {} (devmount-server pid {pid} on 127.0.0.1:{port})", root.display())
                }
                None => {
                    format!("local {} (devmount-server on 127.0.0.1:{port}, not running)", root.display())
                }
            },
            None => self.place.clone().unwrap_or_else(|| self.target.to_string()),
        };
        out.push_str(&format!("  target:   {target}\n"));
        let server = server.map(|(_, _, state)| state);
        let session = self.sessions.borrow().clone().filter(|s| !s.is_closed());
        let down = server.as_ref().and_then(server_down);
        let state = match (session, down) {
            (_, Some(down)) => down,
            (Some(session), None) => match session.rtt().await {
                Ok(rtt) => format!("connected, round trip {:.1} ms", rtt.as_secs_f64() * 1000.0),
                Err(e) => format!("connected, but {e}"),
            },
            (None, None) => "reconnecting".to_owned(),
        };
        out.push_str(&format!("  state:    {state}\n"));
        if let Some(state) = &server {
            out.push_str(&server_history(state));
        }
        let journal = self.fs.journal().stats();
        out.push_str(&format!(
            "  pending:  {} change(s), {}\n",
            journal.pending_ops,
            human_bytes(journal.pending_bytes)
        ));
        let sending = self.fs.sending();
        if sending != Default::default() {
            out.push_str(&format!(
                "  sending:  {} in flight, {} waiting for the connection, {} waiting for a conflict copy\n",
                sending.in_flight, sending.parked, sending.resolving
            ));
        }
        let cache = self.fs.cache().stats();
        out.push_str(&format!(
            "  cache:    attributes {} ({}), listings {} names ({}), data {} ({})\n",
            cache.attr.size,
            hit_rate(cache.attr.hits, cache.attr.misses),
            cache.dir.size,
            hit_rate(cache.dir.hits, cache.dir.misses),
            human_bytes(cache.data.size),
            hit_rate(cache.data.hits, cache.data.misses),
        ));
        let forwards =
            self.forwards.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(Forwards::describe);
        for forward in forwards.unwrap_or_default() {
            out.push_str(&format!("  forward:  {forward}\n"));
        }
        out
    }
}

/// The local server is gone for good: what to tell the user.
struct ServerLost {
    /// One line.
    summary: String,
    /// The log's last lines when it exited.
    log: Vec<String>,
}

impl ServerLost {
    fn of(state: &ServerState) -> Option<ServerLost> {
        match state.health {
            Health::GaveUp => Some(ServerLost {
                summary: format!("the session's {}", server_down(state)?),
                log: state.last_exit.as_ref().map(|e| e.log.clone()).unwrap_or_default(),
            }),
            Health::Stopped => Some(ServerLost::stopped()),
            Health::Running { .. } | Health::Restarting => None,
        }
    }

    fn stopped() -> ServerLost {
        ServerLost { summary: "the session's devmount-server was stopped".into(), log: Vec::new() }
    }

    /// The summary, then the log's last lines, indented.
    fn full(&self) -> String {
        let mut text = self.summary.clone();
        if !self.log.is_empty() {
            text.push_str(". Its log ended with:");
            for line in &self.log {
                text.push_str(&format!("\n  {line}"));
            }
        }
        text
    }
}

/// The state line of a local server that is not running.
fn server_down(state: &ServerState) -> Option<String> {
    let exit = state.last_exit.as_ref()?;
    match state.health {
        Health::Restarting => Some(format!("devmount-server {exit}; restarting it")),
        Health::GaveUp => Some(format!(
            "devmount-server {exit}; not restarted: it exited {MAX_EXITS} times within {EXIT_WINDOW:?}; `devmount down` ends the session"
        )),
        Health::Running { .. } | Health::Stopped => None,
    }
}

/// The status lines on a local server that has exited before: its restarts and the log's
/// last lines at its latest exit.
fn server_history(state: &ServerState) -> String {
    let Some(exit) = &state.last_exit else { return String::new() };
    let mut out = String::new();
    if let (Health::Running { .. }, Some(at)) = (&state.health, state.restarted_at) {
        let times = match state.restarts {
            1 => "restarted".to_owned(),
            n => format!("restarted {n} times, the latest"),
        };
        out.push_str(&format!("  server:   {times} at {} after it {exit}\n", at.format("%H:%M:%S")));
    }
    for (i, line) in exit.log.iter().enumerate() {
        let label = if i == 0 { "exit log:" } else { "" };
        out.push_str(&format!("  {label:<10}{line}\n"));
    }
    out
}

fn hit_rate(hits: u64, misses: u64) -> String {
    match hits + misses {
        0 => "no lookups yet".to_owned(),
        all => format!("{}% hits", hits * 100 / all),
    }
}

/// `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Binds the control socket of the daemon's mount, replacing a stale one left by a dead
/// daemon, and writes its info file.
pub fn bind(daemon: &Daemon) -> Result<UnixListener> {
    let mountpoint = &daemon.mountpoint;
    let path = socket_path(mountpoint)?;
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(anyhow!("another devmount already serves {}", mountpoint.display()));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    let info = Info {
        mountpoint: mountpoint.clone(),
        socket: path.clone(),
        pid: Some(std::process::id() as i32),
        name: daemon.name.clone(),
        server_dir: daemon.local_server().map(|s| s.session_dir().to_owned()),
    };
    let file = path.with_extension("info");
    let temp = path.with_extension("info.new");
    std::fs::write(&temp, info.encode())
        .and_then(|()| std::fs::rename(&temp, &file))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(listener)
}

/// Answers requests until the listener fails.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                return;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &daemon).await {
                tracing::debug!("control request: {e}");
            }
        });
    }
}

async fn answer(stream: UnixStream, daemon: &Daemon) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    (&mut read).take(MAX_LINE).read_until(b'\n', &mut line).await?;
    match String::from_utf8_lossy(&line).trim() {
        "sync" => {
            let reply = match daemon.fs.sync().await {
                Ok(()) => {
                    // Both ways: the mount also shows every change the pod made before now.
                    daemon.fs.feed_caught_up().await;
                    "ok".to_owned()
                }
                Err(e) => format!("error: {e}"),
            };
            write.write_all(format!("{reply}\n").as_bytes()).await?;
        }
        "status" => {
            let status = daemon.status().await;
            write.write_all(format!("ok\n{status}").as_bytes()).await?;
        }
        "down" => return serve_down(daemon, write).await,
        "exec" => return serve_exec(read, write, daemon).await,
        "ssh-config" => {
            let reply = match daemon.host_config() {
                Ok(config) => [&b"ok\n"[..], &encode_host_config(&config)].concat(),
                Err(e) => format!("error: {e:#}\n").into_bytes(),
            };
            write.write_all(&reply).await?;
        }
        "proxy" => return serve_proxy(read, write, daemon).await,
        other => write.write_all(format!("error: unknown request {other:?}\n").as_bytes()).await?,
    }
    write.shutdown().await
}

/// Drains the journal (telling how it goes), then unmounts; the daemon's shutdown follows.
async fn serve_down(daemon: &Daemon, mut write: OwnedWriteHalf) -> io::Result<()> {
    let fs = &daemon.fs;
    let drain = tokio::time::timeout(DRAIN_TIMEOUT, fs.sync());
    tokio::pin!(drain);
    let lost = daemon.server_lost();
    tokio::pin!(lost);
    let mut tick = tokio::time::interval(DRAIN_TICK);
    let note = loop {
        tokio::select! {
            biased;
            lost = &mut lost => {
                let pending = fs.journal().stats().pending_ops;
                break (pending > 0).then(|| {
                    format!("{}; {pending} change(s) are kept for the next `devmount up`", lost.summary)
                });
            }
            drained = &mut drain => break match drained {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => {
                    daemon.gave_up.store(true, Ordering::Relaxed);
                    Some(format!(
                        "{} change(s) could not reach the server within {DRAIN_TIMEOUT:?}; they are kept and replayed at the next mount",
                        fs.journal().stats().pending_ops
                    ))
                }
            },
            _ = tick.tick() => {
                let stats = fs.journal().stats();
                write.write_all(format!("pending {} {}\n", stats.pending_ops, stats.pending_bytes).as_bytes()).await?;
            }
        }
    };
    if let Some(note) = note {
        write.write_all(format!("note {note}\n").as_bytes()).await?;
    }
    let mountpoint = daemon.mountpoint.clone();
    let unmounted = tokio::task::spawn_blocking(move || crate::mount::unmount_unless_busy(&mountpoint)).await;
    match unmounted {
        Ok(Ok(())) => {
            write.write_all(b"ok\n").await?;
            // The socket closes when the daemon exits, which is what the client waits for.
            std::future::pending::<()>().await;
            Ok(())
        }
        Ok(Err(e)) => write.write_all(format!("error: {e:#}\n").as_bytes()).await,
        Err(e) => write.write_all(format!("error: cannot unmount: {e}\n").as_bytes()).await,
    }
}

/// The daemon's side of `proxy`: a channel to the server's own SSH port, spliced to the socket.
async fn serve_proxy(
    read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    daemon: &Daemon,
) -> io::Result<()> {
    let opened = async {
        let ssh = daemon.ssh_access()?;
        let session = tokio::select! {
            biased;
            lost = daemon.server_lost() => return Err(lost.summary),
            session = daemon.live_session() => session?,
        };
        let originator = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        session.direct_tcpip(ssh.port, originator).await.map_err(|e| e.to_string())
    };
    match opened.await {
        Ok(channel) => {
            write.write_all(b"ok\n").await?;
            crate::forward::pump(channel, read, write).await
        }
        Err(message) => {
            write.write_all(format!("error: {message}\n").as_bytes()).await?;
            write.shutdown().await
        }
    }
}

fn encode_host_config(config: &HostConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let fields: [(&str, &[u8]); 4] = [
        ("name", config.name.as_bytes()),
        ("user", config.user.as_bytes()),
        ("identity", config.identity.as_os_str().as_encoded_bytes()),
        ("known-hosts", config.known_hosts.as_os_str().as_encoded_bytes()),
    ];
    for (key, value) in fields {
        out.extend_from_slice(key.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&escape_mountinfo(value));
        out.push(b'\n');
    }
    out
}

fn decode_host_config(text: &[u8]) -> Option<HostConfig> {
    use std::os::unix::ffi::OsStringExt;
    let (mut name, mut user, mut identity, mut known_hosts) = (None, None, None, None);
    for line in text.split(|&b| b == b'\n') {
        let Some(space) = line.iter().position(|&b| b == b' ') else { continue };
        let value = unescape_mountinfo(&line[space + 1..]);
        match &line[..space] {
            b"name" => name = String::from_utf8(value).ok(),
            b"user" => user = String::from_utf8(value).ok(),
            b"identity" => identity = Some(PathBuf::from(std::ffi::OsString::from_vec(value))),
            b"known-hosts" => known_hosts = Some(PathBuf::from(std::ffi::OsString::from_vec(value))),
            _ => {}
        }
    }
    Some(HostConfig { name: name?, user: user?, identity: identity?, known_hosts: known_hosts? })
}

// ---- exec frames ---------------------------------------------------------------------------

/// The output streams of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn byte(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Stream, DecodeError> {
        match b {
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            _ => Err(DecodeError::Invalid("output stream")),
        }
    }
}

/// One message of an exec over the control socket; see the module doc.
#[derive(Debug)]
pub enum Frame {
    Request(ExecRequest),
    Stdin(Bytes),
    StdinEof,
    StdinAck(u32),
    Resize(WindowSize),
    Signal(i32),
    OutputClosed(Stream),
    Output(Stream, Bytes),
    Exit(u8),
    Failed(String),
}

const REQUEST: u8 = 1;
const STDIN: u8 = 2;
const STDIN_EOF: u8 = 3;
const RESIZE: u8 = 4;
const SIGNAL: u8 = 5;
const OUTPUT_CLOSED: u8 = 6;
const STDOUT: u8 = 101;
const STDERR: u8 = 102;
const EXIT: u8 = 103;
const FAILED: u8 = 104;
const STDIN_ACK: u8 = 105;

fn put_option(buf: &mut BytesMut, value: Option<&[u8]>) {
    buf.put_bool(value.is_some());
    buf.put_string(value.unwrap_or_default());
}

fn put_size(buf: &mut BytesMut, size: WindowSize) {
    for n in [size.cols, size.rows, size.pix_width, size.pix_height] {
        buf.put_u32(n);
    }
}

fn option(r: &mut Reader) -> Result<Option<Vec<u8>>, DecodeError> {
    let present = r.bool()?;
    let value = r.string()?;
    Ok(present.then(|| value.to_vec()))
}

fn text(r: &mut Reader, what: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(r.string()?.to_vec()).map_err(|_| DecodeError::Invalid(what))
}

fn size(r: &mut Reader) -> Result<WindowSize, DecodeError> {
    Ok(WindowSize { cols: r.u32()?, rows: r.u32()?, pix_width: r.u32()?, pix_height: r.u32()? })
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::new();
        let start = wire::begin_frame(&mut buf);
        match self {
            Frame::Request(req) => {
                buf.put_u8(REQUEST);
                put_option(&mut buf, req.command.as_deref());
                put_option(&mut buf, req.cwd.as_deref());
                buf.put_u32(u32::try_from(req.env.len()).unwrap_or(u32::MAX));
                for (name, value) in &req.env {
                    buf.put_string(name.as_bytes());
                    buf.put_string(value.as_bytes());
                }
                put_option(&mut buf, req.pty.as_ref().map(|p| p.term.as_bytes()));
                put_size(&mut buf, req.pty.as_ref().map(|p| p.size).unwrap_or_default());
            }
            Frame::Stdin(data) => {
                buf.put_u8(STDIN);
                buf.put_string(data);
            }
            Frame::StdinEof => buf.put_u8(STDIN_EOF),
            Frame::StdinAck(n) => {
                buf.put_u8(STDIN_ACK);
                buf.put_u32(*n);
            }
            Frame::Resize(size) => {
                buf.put_u8(RESIZE);
                put_size(&mut buf, *size);
            }
            Frame::Signal(n) => {
                buf.put_u8(SIGNAL);
                buf.put_u32(*n as u32);
            }
            Frame::OutputClosed(stream) => {
                buf.put_u8(OUTPUT_CLOSED);
                buf.put_u8(stream.byte());
            }
            Frame::Output(stream, data) => {
                buf.put_u8(match stream {
                    Stream::Stdout => STDOUT,
                    Stream::Stderr => STDERR,
                });
                buf.put_string(data);
            }
            Frame::Exit(code) => {
                buf.put_u8(EXIT);
                buf.put_u8(*code);
            }
            Frame::Failed(message) => {
                buf.put_u8(FAILED);
                buf.put_string(message.as_bytes());
            }
        }
        wire::end_frame(&mut buf, start);
        buf.freeze()
    }

    /// Decodes a frame's body (without the length prefix).
    pub fn decode(body: Bytes) -> Result<Frame, DecodeError> {
        let mut r = Reader::new(body);
        let frame = match r.u8()? {
            REQUEST => {
                let command = option(&mut r)?;
                let cwd = option(&mut r)?;
                let mut env = Vec::new();
                for _ in 0..r.u32()? {
                    env.push((text(&mut r, "variable name")?, text(&mut r, "variable value")?));
                }
                let term = option(&mut r)?;
                let size = size(&mut r)?;
                let pty = match term {
                    Some(term) => Some(PtyRequest {
                        term: String::from_utf8(term).map_err(|_| DecodeError::Invalid("TERM"))?,
                        size,
                    }),
                    None => None,
                };
                Frame::Request(ExecRequest { command, cwd, env, pty })
            }
            STDIN => Frame::Stdin(r.string()?),
            STDIN_EOF => Frame::StdinEof,
            STDIN_ACK => Frame::StdinAck(r.u32()?),
            RESIZE => Frame::Resize(size(&mut r)?),
            SIGNAL => Frame::Signal(r.u32()? as i32),
            OUTPUT_CLOSED => Frame::OutputClosed(Stream::from_byte(r.u8()?)?),
            STDOUT => Frame::Output(Stream::Stdout, r.string()?),
            STDERR => Frame::Output(Stream::Stderr, r.string()?),
            EXIT => Frame::Exit(r.u8()?),
            FAILED => Frame::Failed(String::from_utf8_lossy(&r.string()?).into_owned()),
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

/// The next frame from `from`, buffering in `buf`; `None` at a clean end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(from: &mut R, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
    let invalid = |e: DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
    loop {
        if let Some(body) = wire::take_frame(buf, MAX_FRAME).map_err(invalid)? {
            return Frame::decode(body).map(Some).map_err(invalid);
        }
        buf.reserve(CHUNK);
        if from.read_buf(buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a frame")),
            };
        }
    }
}

/// Writes the frames of `queue` to `out` until the queue closes.
async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    mut out: W,
    mut queue: mpsc::Receiver<Frame>,
) -> io::Result<()> {
    while let Some(frame) = queue.recv().await {
        out.write_all(&frame.encode()).await?;
    }
    out.shutdown().await
}

/// The daemon's side of `exec`.
async fn serve_exec(
    mut input: BufReader<OwnedReadHalf>,
    output: OwnedWriteHalf,
    daemon: &Daemon,
) -> io::Result<()> {
    let (frames, queue) = mpsc::channel(FRAME_QUEUE);
    let writer = tokio::spawn(write_frames(output, queue));
    let mut buf = BytesMut::new();
    let last = match read_frame(&mut input, &mut buf).await {
        Ok(Some(Frame::Request(req))) => match run_exec(input, buf, req, daemon, &frames).await {
            Ok(status) => Frame::Exit(status.code()),
            Err(message) => Frame::Failed(message),
        },
        Ok(_) => Frame::Failed("an exec must start with its request".into()),
        Err(e) => Frame::Failed(format!("bad exec request: {e}")),
    };
    let _ = frames.send(last).await;
    drop(frames);
    writer.await.map_err(io::Error::other)?
}

/// The barrier, then the command on the session's connection, its output framed to the
/// client.
async fn run_exec(
    input: BufReader<OwnedReadHalf>,
    buf: BytesMut,
    mut req: ExecRequest,
    daemon: &Daemon,
    frames: &mpsc::Sender<Frame>,
) -> Result<ExitStatus, String> {
    let session = daemon.synced_session().await.map_err(|lost| lost.full())?;
    req.cwd = Some(daemon.remote_dir(req.cwd.as_deref()));
    // The session's own variables come last, so they win over what the client sends.
    req.env.extend(daemon.environment.iter().cloned());

    let (stdin_w, stdin_r) = tokio::io::duplex(PIPE_SIZE);
    let (stdout_w, stdout_r) = tokio::io::duplex(PIPE_SIZE);
    let (stderr_w, stderr_r) = tokio::io::duplex(PIPE_SIZE);
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (stdout_closed, stdout_closed_rx) = watch::channel(false);
    let (stderr_closed, stderr_closed_rx) = watch::channel(false);
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let feeder = tokio::spawn(feed_stdin(stdin_rx, stdin_w, queued.clone(), frames.clone()));
    let outputs = [stdout_closed, stderr_closed];
    let reader = tokio::spawn(read_input(input, buf, stdin_tx, queued, events_tx, outputs));
    let channel = session.channel().await.map_err(|e| exec::ExecError::from(e).to_string())?;
    // The next command's channel, opened while this one runs.
    let spare = session.clone();
    tokio::spawn(async move { spare.open_spare().await });
    let (status, (), ()) = tokio::join!(
        exec::run_on(&session, channel, &req, stdin_r, stdout_w, stderr_w, events),
        pump(stdout_r, Stream::Stdout, frames.clone(), stdout_closed_rx),
        pump(stderr_r, Stream::Stderr, frames.clone(), stderr_closed_rx),
    );
    reader.abort();
    feeder.abort();
    status.map_err(|e| e.to_string())
}

/// Hands the client's frames to the command: stdin (to [`feed_stdin`], `None` for its end),
/// resizes, signals, broken outputs. Never waits for the command to read its input: the
/// client keeps to [`STDIN_WINDOW`], which bounds the stdin queue.
async fn read_input(
    mut input: BufReader<OwnedReadHalf>,
    mut buf: BytesMut,
    stdin: mpsc::UnboundedSender<Option<Bytes>>,
    queued: Arc<AtomicUsize>,
    events: mpsc::Sender<Event>,
    closed: [watch::Sender<bool>; 2],
) {
    loop {
        let frame = match read_frame(&mut input, &mut buf).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => {
                // The client is gone before the command: a hangup, as a lost connection gives.
                let _ = events.send(Event::Signal(Signal::SIGHUP)).await;
                return;
            }
        };
        match frame {
            Frame::Stdin(data) => {
                if queued.fetch_add(data.len(), Ordering::Relaxed) + data.len() > STDIN_WINDOW {
                    tracing::debug!("exec: the client sent more stdin than its window; ending its input");
                    let _ = stdin.send(None);
                    continue;
                }
                let _ = stdin.send(Some(data));
            }
            Frame::StdinEof => {
                let _ = stdin.send(None);
            }
            Frame::Resize(size) => {
                let _ = events.send(Event::Resize(size)).await;
            }
            Frame::Signal(number) => match Signal::try_from(number) {
                Ok(signal) => {
                    let _ = events.send(Event::Signal(signal)).await;
                }
                Err(_) => tracing::debug!("exec: signal {number} is not one of this system's"),
            },
            Frame::OutputClosed(stream) => {
                closed[usize::from(stream == Stream::Stderr)].send_replace(true);
            }
            other => tracing::debug!("exec: a client sent {other:?}, which only the daemon sends"),
        }
    }
}

/// Writes the client's stdin to the command as it reads it, acknowledging each chunk; `None`
/// ends the input.
async fn feed_stdin(
    mut chunks: mpsc::UnboundedReceiver<Option<Bytes>>,
    mut pipe: DuplexStream,
    queued: Arc<AtomicUsize>,
    frames: mpsc::Sender<Frame>,
) {
    // Dropping the pipe at the end is the command's end of input.
    while let Some(Some(chunk)) = chunks.recv().await {
        if pipe.write_all(&chunk).await.is_err() {
            return;
        }
        queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        let ack = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        if frames.send(Frame::StdinAck(ack)).await.is_err() {
            return;
        }
    }
}
/// Frames one output stream of the command to the client, until it ends or the client's side
/// of it is broken (then the command's writes fail, as a local command's would).
async fn pump(
    mut from: DuplexStream,
    stream: Stream,
    frames: mpsc::Sender<Frame>,
    mut closed: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(CHUNK);
        tokio::select! {
            read = from.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if frames.send(Frame::Output(stream, buf.split().freeze())).await.is_err() {
                        return;
                    }
                }
            },
            () = turned_true(&mut closed) => return,
        }
    }
}

/// Resolves once `flag` is true; never, if its sender goes away first.
async fn turned_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|&f| f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---- the client's side ---------------------------------------------------------------------

/// Why a session's daemon cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens on the socket (or there is none): the daemon is gone.
    #[error("no devmount serves {}", .0.display())]
    NotRunning(PathBuf),
    #[error("cannot reach the devmount serving {}: {source}", mountpoint.display())]
    Other {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Connects to the daemon of `session`.
pub async fn connect(session: &Info) -> Result<UnixStream, ConnectError> {
    UnixStream::connect(&session.socket).await.map_err(|e| connect_error(session, e))
}

fn connect_error(session: &Info, e: io::Error) -> ConnectError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ConnectError::NotRunning(session.mountpoint.clone())
        }
        _ => ConnectError::Other { mountpoint: session.mountpoint.clone(), source: e },
    }
}

fn gone(session: &Info) -> anyhow::Error {
    anyhow!("the devmount serving {} went away", session.mountpoint.display())
}

/// `sync`: returns once every change made to the mount so far is on the server.
pub async fn sync(session: &Info) -> Result<()> {
    let mut stream = connect(session).await?;
    stream.write_all(b"sync\n").await?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await?;
    match answer.trim_end() {
        "ok" => Ok(()),
        "" => Err(gone(session)),
        other => Err(anyhow!("{}", other.strip_prefix("error: ").unwrap_or(other))),
    }
}

/// `status`: the session's status as text.
pub async fn status(session: &Info) -> Result<String> {
    let mut stream = connect(session).await?;
    stream.write_all(b"status\n").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    match answer.strip_prefix("ok\n") {
        Some(status) => Ok(status.to_owned()),
        None if answer.is_empty() => Err(gone(session)),
        None => Err(anyhow!("{}", answer.trim_end().strip_prefix("error: ").unwrap_or(answer.trim_end()))),
    }
}

/// `ssh-config`: what the session's `Host` block needs; the daemon has written its known_hosts
/// file.
pub async fn ssh_config(session: &Info) -> Result<HostConfig> {
    let mut stream = connect(session).await?;
    stream.write_all(b"ssh-config\n").await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    match answer.strip_prefix(b"ok\n") {
        Some(fields) => decode_host_config(fields).ok_or_else(|| {
            anyhow!("the devmount serving {} gave an incomplete answer", session.mountpoint.display())
        }),
        None if answer.is_empty() => Err(gone(session)),
        None => {
            let text = String::from_utf8_lossy(&answer);
            let text = text.trim_end();
            Err(anyhow!("{}", text.strip_prefix("error: ").unwrap_or(text)))
        }
    }
}

/// `proxy`: the socket, once the daemon has opened the channel to the server's SSH port.
/// Blocking: the caller splices it to stdin and stdout with plain threads.
pub fn proxy(session: &Info) -> Result<std::os::unix::net::UnixStream> {
    use std::io::{Read, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(&session.socket).map_err(|e| connect_error(session, e))?;
    stream.write_all(b"proxy\n")?;
    // A byte at a time, so that nothing after the answer line is read here: the channel's
    // bytes may follow it at once.
    let mut answer = Vec::new();
    let mut byte = [0u8];
    while answer.len() < MAX_LINE as usize && stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    match String::from_utf8_lossy(&answer).trim_end() {
        "ok" => Ok(stream),
        "" => Err(gone(session)),
        other => Err(anyhow!("{}", other.strip_prefix("error: ").unwrap_or(other))),
    }
}

/// What `down` tells while it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownEvent {
    /// Changes still on their way to the server.
    Pending { ops: u64, bytes: u64 },
    /// Something the user should read.
    Note(String),
    /// Drained and unmounted; the daemon is stopping the rest.
    Unmounted,
}

/// `down`: drains, unmounts, and returns once the daemon has exited.
pub async fn down(session: &Info, mut events: impl FnMut(DownEvent)) -> Result<()> {
    let mut stream = BufReader::new(connect(session).await?);
    stream.write_all(b"down\n").await?;
    let mut unmounted = false;
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            break;
        }
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("pending ") {
            let mut numbers = rest.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
            let (ops, bytes) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
            events(DownEvent::Pending { ops, bytes });
        } else if let Some(note) = line.strip_prefix("note ") {
            events(DownEvent::Note(note.to_owned()));
        } else if let Some(e) = line.strip_prefix("error: ") {
            bail!("{e}");
        } else if line == "ok" {
            unmounted = true;
            events(DownEvent::Unmounted);
        }
    }
    if !unmounted {
        // A daemon with little left to do after the unmount may exit before its `ok` is out.
        if crate::mount::is_mounted(&session.mountpoint)? {
            return Err(gone(session));
        }
        events(DownEvent::Unmounted);
    }
    Ok(())
}

/// Runs `req` (its `cwd` relative to the mount's root) in `session`, with this process's
/// stdin, stdout and stderr, passing on `events`. Returns devmount's exit code: the command's,
/// or 128 + the signal that ended it.
pub async fn exec(session: &Info, req: ExecRequest, mut events: mpsc::Receiver<Event>) -> Result<u8> {
    let stream = connect(session).await?;
    let (mut read, mut write) = stream.into_split();
    write.write_all(b"exec\n").await?;
    let (frames, queue) = mpsc::channel(FRAME_QUEUE);
    frames.send(Frame::Request(req)).await.map_err(|_| gone(session))?;
    let writer = tokio::spawn(write_frames(write, queue));

    // A thread of its own: a blocking read of stdin cannot be cancelled, and must not hold up
    // the end of the process.
    let credit = Arc::new(Credit::default());
    let (stdin_frames, stdin_credit) = (frames.clone(), credit.clone());
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || pump_stdin(stdin_frames, &stdin_credit))
        .context("cannot start a thread to read stdin")?;
    let event_frames = frames.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let frame = match event {
                Event::Resize(size) => Frame::Resize(size),
                Event::Signal(signal) => Frame::Signal(signal as i32),
            };
            if event_frames.send(frame).await.is_err() {
                return;
            }
        }
    });

    let mut stdout = Output::new(tokio::io::stdout());
    let mut stderr = Output::new(tokio::io::stderr());
    let mut buf = BytesMut::new();
    let result = loop {
        let frame = match read_frame(&mut read, &mut buf).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Err(gone(session)),
            Err(e) => break Err(anyhow!("the devmount serving {}: {e}", session.mountpoint.display())),
        };
        match frame {
            Frame::Output(stream, data) => {
                let broken = match stream {
                    Stream::Stdout => stdout.write(&data).await,
                    Stream::Stderr => stderr.write(&data).await,
                };
                if broken {
                    let _ = frames.send(Frame::OutputClosed(stream)).await;
                }
            }
            Frame::StdinAck(n) => credit.give(n as usize),
            Frame::Exit(code) => break Ok(code),
            Frame::Failed(message) => break Err(anyhow!("{message}")),
            other => tracing::debug!("exec: the daemon sent {other:?}, which only a client sends"),
        }
    };
    stdout.finish().await?;
    stderr.finish().await?;
    writer.abort();
    result
}

/// How much stdin the client may still send: [`STDIN_WINDOW`] less what the daemon has not
/// acknowledged.
struct Credit {
    bytes: Mutex<usize>,
    given: std::sync::Condvar,
}

impl Default for Credit {
    fn default() -> Self {
        Credit { bytes: Mutex::new(STDIN_WINDOW), given: std::sync::Condvar::new() }
    }
}

impl Credit {
    fn give(&self, n: usize) {
        *self.bytes.lock().unwrap_or_else(PoisonError::into_inner) += n;
        self.given.notify_one();
    }

    /// Takes up to `want` bytes of credit, waiting while there is none.
    fn take(&self, want: usize) -> usize {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        while *bytes == 0 {
            bytes = self.given.wait(bytes).unwrap_or_else(PoisonError::into_inner);
        }
        let taken = want.min(*bytes);
        *bytes -= taken;
        taken
    }
}

/// Sends stdin to the daemon until its end, then `stdin-eof`, within the credit it has.
fn pump_stdin(frames: mpsc::Sender<Frame>, credit: &Credit) {
    use std::io::Read;
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let allowed = credit.take(CHUNK);
        match stdin.read(&mut buf[..allowed]) {
            Ok(0) => break,
            Ok(n) => {
                credit.give(allowed - n);
                if frames.blocking_send(Frame::Stdin(Bytes::copy_from_slice(&buf[..n]))).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => credit.give(allowed),
            Err(e) => {
                tracing::warn!("cannot read stdin: {e}; the command gets the end of its input");
                break;
            }
        }
    }
    let _ = frames.blocking_send(Frame::StdinEof);
}

/// This process's stdout or stderr; once broken, the rest of the output is dropped.
struct Output<W> {
    out: W,
    broken: bool,
}

impl<W: tokio::io::AsyncWrite + Unpin> Output<W> {
    fn new(out: W) -> Self {
        Output { out, broken: false }
    }

    /// Writes `data`; true when this write found the output broken.
    async fn write(&mut self, data: &[u8]) -> bool {
        if self.broken {
            return false;
        }
        let written = async {
            self.out.write_all(data).await?;
            self.out.flush().await
        };
        match written.await {
            Ok(()) => false,
            Err(e) => {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    tracing::warn!("cannot write the command's output: {e}");
                }
                self.broken = true;
                true
            }
        }
    }

    async fn finish(&mut self) -> Result<()> {
        if !self.broken {
            self.out.flush().await.context("cannot write the command's output")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame) -> Frame {
        let mut buf = BytesMut::from(&frame.encode()[..]);
        let body = wire::take_frame(&mut buf, MAX_FRAME).unwrap().unwrap();
        assert!(buf.is_empty());
        Frame::decode(body).unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let req = ExecRequest {
            command: Some(b"echo \xff".to_vec()),
            cwd: Some(b"sub dir".to_vec()),
            env: vec![("LANG".into(), "C.UTF-8".into()), ("EMPTY".into(), String::new())],
            pty: Some(PtyRequest {
                term: "xterm".into(),
                size: WindowSize { cols: 80, rows: 24, pix_width: 1, pix_height: 2 },
            }),
        };
        assert_eq!(
            format!("{:?}", roundtrip(Frame::Request(req.clone()))),
            format!("{:?}", Frame::Request(req))
        );
        let shell = ExecRequest::default();
        assert_eq!(
            format!("{:?}", roundtrip(Frame::Request(shell.clone()))),
            format!("{:?}", Frame::Request(shell))
        );
        for frame in [
            Frame::Stdin(Bytes::from_static(b"\x00\xff")),
            Frame::StdinEof,
            Frame::StdinAck(4096),
            Frame::Resize(WindowSize { cols: 100, rows: 30, pix_width: 0, pix_height: 0 }),
            Frame::Signal(15),
            Frame::OutputClosed(Stream::Stderr),
            Frame::Output(Stream::Stdout, Bytes::from_static(b"out")),
            Frame::Output(Stream::Stderr, Bytes::new()),
            Frame::Exit(143),
            Frame::Failed("no session".into()),
        ] {
            let want = format!("{frame:?}");
            assert_eq!(format!("{:?}", roundtrip(frame)), want);
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(Frame::decode(Bytes::from_static(&[99])), Err(DecodeError::UnknownType(99))));
        assert!(Frame::decode(Bytes::from_static(&[OUTPUT_CLOSED, 3])).is_err());
        assert!(Frame::decode(Bytes::from_static(&[EXIT, 1, 2])).is_err());
        // A count of variables far beyond the bytes present fails without allocating for it.
        let mut body = BytesMut::new();
        body.put_u8(REQUEST);
        put_option(&mut body, None);
        put_option(&mut body, None);
        body.put_u32(u32::MAX);
        assert!(Frame::decode(body.freeze()).is_err());
        let mut huge = BytesMut::new();
        huge.put_u32(MAX_FRAME as u32 + 1);
        assert!(wire::take_frame(&mut huge, MAX_FRAME).is_err());
    }

    #[test]
    fn info_round_trips() {
        let info = Info {
            mountpoint: PathBuf::from("/tmp/a b/mnt\n"),
            socket: PathBuf::from("/run/x.sock"),
            pid: Some(42),
            name: Some("api".into()),
            server_dir: Some(PathBuf::from("/state/local/00ff")),
        };
        assert_eq!(Info::decode(&info.encode(), info.socket.clone()), Some(info.clone()));
        let bare = Info { pid: None, name: None, server_dir: None, ..info };
        assert_eq!(Info::decode(&bare.encode(), bare.socket.clone()), Some(bare.clone()));
        assert_eq!(Info::decode(b"pid 1\n", bare.socket.clone()), None);
        assert_eq!(Info::decode(b"mountpoint relative\n", bare.socket), None);
    }

    #[test]
    fn host_configs_round_trip() {
        let config = HostConfig {
            name: "api".into(),
            user: "dev".into(),
            identity: PathBuf::from("/state dir/id\n"),
            known_hosts: PathBuf::from("/state/ssh_known_hosts"),
        };
        assert_eq!(decode_host_config(&encode_host_config(&config)), Some(config));
        assert_eq!(decode_host_config(b"name api\nuser dev\n"), None);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(hit_rate(0, 0), "no lookups yet");
        assert_eq!(hit_rate(3, 1), "75% hits");
    }
}
