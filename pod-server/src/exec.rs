//! Exec and shell sessions: one child process per session channel.
//!
//! Two layers. The process layer ([`shell_command`], [`Process`], [`StdinQueue`],
//! [`pump_output`]) starts the user's login shell through the [`Reaper`], on pipes or on a
//! pseudo-terminal, and moves bytes; it knows nothing of SSH. [`run`] glues it to a russh
//! channel.
//!
//! Behaviour, as OpenSSH's sshd has it unless said otherwise:
//! - The child is a session and process-group leader (`setsid`); with a pty the slave is its
//!   controlling terminal and stdin/stdout/stderr, so stderr arrives merged into stdout.
//! - `signal` requests go to the whole process group (`killpg`).
//! - Output is read one chunk at a time, and the next read waits until the chunk is handed to
//!   the channel, which waits for the peer's SSH window: a child printing without end is
//!   throttled by the client and server memory stays bounded.
//! - Client data is queued for the child's stdin up to [`STDIN_QUEUE_BYTES`] and written by
//!   its own task, so a child that does not read never stops the channel's message loop
//!   (russh stalls the whole connection when a channel's queue fills). Past the cap the loop
//!   stops reading the channel and the connection stalls until the child reads: russh widens
//!   the receive window as data arrives rather than as it is consumed, so this cap is the
//!   only push-back there is, and it covers the whole connection, not just this channel.
//! - Client EOF closes the stdin pipe. With a pty it only closes our writing end of the
//!   master, which the child cannot see, exactly as sshd does: a terminal has no EOF, and
//!   typing ^D is the client's business.
//! - The exit status is reported after all output: pipes are read until EOF, and the pty
//!   master until EIO (every slave closed) or, once the child has exited, until it is empty
//!   (a background job may hold the slave forever).
//! - Not as sshd: when the client closes the channel (or the connection drops) before the
//!   command ends, its process group gets SIGHUP, with or without a pty. A developer's
//!   interrupted `devmount exec` should not leave a server running in the pod.

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::signal::{killpg, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty, Sig};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::passwd::{self, PasswdEntry};
use crate::reaper::{ExitStatus, ExitWaiter, Reaper};

/// Bytes of client data that may wait for a child's stdin before the channel stops being read.
pub const STDIN_QUEUE_BYTES: usize = 8 << 20;
/// Charged per queued message on top of its length, so a flood of tiny packets is bounded too.
const STDIN_MESSAGE_OVERHEAD: usize = 64;
/// Size of one read from the child's output.
pub const OUTPUT_CHUNK: usize = 32 << 10;

/// A `pty-req`, as the channel task collected it.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
    pub modes: Vec<(Pty, u32)>,
}

/// What the client asked a session channel to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The `exec` command; `None` for a `shell` request (a login shell).
    pub command: Option<Vec<u8>>,
    pub pty: Option<PtyRequest>,
    /// `env` requests, in arrival order.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// Serves one exec or shell request on `channel` until the child has ended and its status,
/// EOF and close were sent, or until the client went away.
pub async fn run(channel: Channel<Msg>, handle: Handle, req: ExecRequest, reaper: Arc<Reaper>) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let user = passwd::current_user();
    let cmd = shell_command(&req, user.as_ref());
    let process = match Process::spawn(&reaper, cmd, req.pty.as_ref()) {
        Ok(process) => process,
        Err(e) => {
            let shell = user.as_ref().map_or(Path::new(passwd::FALLBACK_SHELL), |u| u.shell_or_default());
            let message =
                format!("devmount-server: cannot start {} in {}: {e}", shell.display(), req.cwd.display());
            tracing::warn!(channel = %id, "{message}");
            let message = format!("{message}\r\n");
            let code = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            // The client may already be gone; there is nobody left to tell then.
            let _ = tx.extended_data_bytes(1, Bytes::from(message)).await;
            let _ = tx.exit_status(code).await;
            finish(&tx).await;
            return;
        }
    };
    let Process { group, exit, stdin, stdout, stderr, terminal } = process;
    tracing::debug!(channel = %id, pid = group.pid(), "started {}", describe(&req));
    let (queue, writer) = StdinQueue::start(stdin, STDIN_QUEUE_BYTES);
    let _writer = AbortOnDrop(writer);
    let sink = ChannelSink(&tx);
    let outcome = tokio::select! {
        result = pump_output(stdout, stderr, exit, &sink) => Some(result),
        () = serve_client(&mut rx, queue, group, terminal.as_ref()) => None,
    };
    match outcome {
        Some(Ok(status)) => {
            tracing::debug!(channel = %id, pid = group.pid(), "{status}");
            let sent = match status {
                ExitStatus::Exited(code) => tx.exit_status(code.unsigned_abs()).await.is_ok(),
                ExitStatus::Signaled { signal, core_dumped } => handle
                    .exit_signal_request(id, signal_to_ssh(signal), core_dumped, String::new(), String::new())
                    .await
                    .is_ok(),
            };
            if sent {
                finish(&tx).await;
            }
        }
        Some(Err(e)) => {
            tracing::debug!(channel = %id, pid = group.pid(), "session ended early: {e}");
            group.hang_up();
            finish(&tx).await;
        }
        None => {
            tracing::debug!(channel = %id, pid = group.pid(), "client closed the channel first");
            group.hang_up();
        }
    }
}

async fn finish(tx: &ChannelWriteHalf<Msg>) {
    if tx.eof().await.is_ok() {
        let _ = tx.close().await;
    }
}

fn describe(req: &ExecRequest) -> String {
    let what = match &req.command {
        Some(cmd) => format!("exec {:?}", String::from_utf8_lossy(cmd)),
        None => "shell".to_owned(),
    };
    match &req.pty {
        Some(pty) => format!("{what} on a {}x{} pty", pty.cols, pty.rows),
        None => what,
    }
}

/// Handles the client's messages while the child runs; returns when the client closes the
/// channel or the connection ends.
async fn serve_client(
    rx: &mut ChannelReadHalf,
    queue: StdinQueue,
    group: ProcessGroup,
    terminal: Option<&Terminal>,
) {
    let mut queue = Some(queue);
    while let Some(msg) = rx.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if let Some(queue) = &queue {
                    queue.push(data).await;
                }
            }
            // Dropping the queue lets the writer finish what is queued, then close stdin.
            ChannelMsg::Eof => queue = None,
            ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height } => {
                if let Some(terminal) = terminal {
                    if let Err(e) = terminal.resize(col_width, row_height, pix_width, pix_height) {
                        tracing::debug!("window-change: {e}");
                    }
                }
            }
            ChannelMsg::Signal { signal } => match signal_from_ssh(&signal) {
                Some(sig) => {
                    if let Err(e) = group.signal(sig) {
                        tracing::debug!("signal {sig} to group {}: {e}", group.pid());
                    }
                }
                None => tracing::debug!("ignored unknown signal {signal:?}"),
            },
            ChannelMsg::Close => return,
            other => tracing::debug!("ignored {other:?} on a running session"),
        }
    }
}

/// Output written to a russh channel: stdout as data, stderr as extended data 1.
struct ChannelSink<'a>(&'a ChannelWriteHalf<Msg>);

impl OutputSink for ChannelSink<'_> {
    async fn send(&self, stream: Stream, data: Bytes) -> io::Result<()> {
        let sent = match stream {
            Stream::Stdout => self.0.data_bytes(data).await,
            Stream::Stderr => self.0.extended_data_bytes(1, data).await,
        };
        sent.map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, format!("channel: {e}")))
    }
}

/// Aborts a task when the session it serves is over (a stdin writer blocked on a child that
/// never reads must not outlive it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- process layer -------------------------------------------------------------------------

/// The command for `req`: the user's login shell with `-c COMMAND`, or as a login shell
/// (`argv[0]` starting with `-`) for a shell request; the server's environment (less TERM)
/// plus HOME, USER, LOGNAME, SHELL, TERM (with a pty) and the client's `env` requests, which
/// win.
pub fn shell_command(req: &ExecRequest, user: Option<&PasswdEntry>) -> Command {
    let shell = user.map_or(Path::new(passwd::FALLBACK_SHELL), |u| u.shell_or_default());
    let base = shell.file_name().unwrap_or(shell.as_os_str());
    let mut cmd = Command::new(shell);
    match &req.command {
        Some(command) => {
            cmd.arg0(base).arg("-c").arg(OsStr::from_bytes(command));
        }
        None => {
            let mut argv0 = OsString::from("-");
            argv0.push(base);
            cmd.arg0(argv0);
        }
    }
    if let Some(user) = user {
        if let Some(home) = &user.home {
            cmd.env("HOME", home);
        }
        cmd.env("USER", &user.name).env("LOGNAME", &user.name);
    }
    cmd.env("SHELL", shell);
    // An inherited TERM would describe the server's terminal, not the client's.
    cmd.env_remove("TERM");
    if let Some(pty) = &req.pty {
        if !pty.term.is_empty() {
            cmd.env("TERM", &pty.term);
        }
    }
    for (name, value) in &req.env {
        // Such names or values would make the whole spawn fail, or set another variable.
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            tracing::debug!("ignored env request {name:?}");
            continue;
        }
        cmd.env(name, value);
    }
    cmd.current_dir(&req.cwd);
    cmd
}

/// A running child and its I/O ends.
#[derive(Debug)]
pub struct Process {
    pub group: ProcessGroup,
    pub exit: ExitWaiter,
    pub stdin: ChildInput,
    /// Stdout, or the pty master (stdout and stderr merged).
    pub stdout: ChildOutput,
    /// `None` with a pty.
    pub stderr: Option<ChildOutput>,
    /// The pty, for window changes.
    pub terminal: Option<Terminal>,
}

impl Process {
    /// Starts `cmd` through `reaper` as a new session, on pipes or on a new pty.
    pub fn spawn(reaper: &Reaper, mut cmd: Command, pty: Option<&PtyRequest>) -> io::Result<Process> {
        let Some(pty) = pty else {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            // SAFETY: setsid is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let spawned = reaper.spawn(&mut cmd)?;
            let missing = || io::Error::other("spawned child lacks a requested pipe");
            let stdin = OwnedFd::from(spawned.stdin.ok_or_else(missing)?);
            let stdout = OwnedFd::from(spawned.stdout.ok_or_else(missing)?);
            let stderr = OwnedFd::from(spawned.stderr.ok_or_else(missing)?);
            return Ok(Process {
                group: ProcessGroup::of(spawned.pid)?,
                exit: spawned.exit,
                stdin: ChildInput::Pipe(pipe::Sender::from_owned_fd(stdin)?),
                stdout: ChildOutput::Pipe(pipe::Receiver::from_owned_fd(stdout)?),
                stderr: Some(ChildOutput::Pipe(pipe::Receiver::from_owned_fd(stderr)?)),
                terminal: None,
            });
        };
        let opened = open_pty(pty)?;
        cmd.env("SSH_TTY", &opened.slave_path)
            .stdin(Stdio::from(opened.slave.try_clone()?))
            .stdout(Stdio::from(opened.slave.try_clone()?))
            .stderr(Stdio::from(opened.slave));
        // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of ours. By the
        // time pre_exec runs, std has put the slave on fds 0, 1 and 2.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = reaper.spawn(&mut cmd)?;
        // The Command holds the slave's copies until it is dropped; the master reads EIO only
        // once no slave is open anywhere, so ours must go now.
        drop(cmd);
        let master = opened.master;
        Ok(Process {
            group: ProcessGroup::of(spawned.pid)?,
            exit: spawned.exit,
            stdin: ChildInput::Pty(register(master.try_clone()?)?),
            stdout: ChildOutput::Pty(register(master.try_clone()?)?),
            stderr: None,
            terminal: Some(Terminal { master }),
        })
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and keeps its fd number until dropped, which happens only
    // with the AsyncFd.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

struct OpenedPty {
    master: OwnedFd,
    slave: OwnedFd,
    slave_path: String,
}

/// Opens a pty with the requested modes and size. Every fd is close-on-exec from the start,
/// so a child spawned concurrently by another session cannot inherit (and hold) this slave.
fn open_pty(req: &PtyRequest) -> io::Result<OpenedPty> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| with_context(e, "posix_openpt"))?;
    grantpt(&master).map_err(|e| with_context(e, "grantpt"))?;
    unlockpt(&master).map_err(|e| with_context(e, "unlockpt"))?;
    let slave_path = ptsname_r(&master).map_err(|e| with_context(e, "ptsname"))?;
    let slave = nix::fcntl::open(
        slave_path.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_context(e, "open pty slave"))?;
    let master = OwnedFd::from(master);
    apply_modes(&slave, &req.modes)?;
    set_window_size(&master, req.cols, req.rows, req.pix_width, req.pix_height)?;
    let flags = fcntl(&master, FcntlArg::F_GETFL).map_err(|e| with_context(e, "F_GETFL"))?;
    fcntl(&master, FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK))
        .map_err(|e| with_context(e, "F_SETFL"))?;
    Ok(OpenedPty { master, slave, slave_path })
}

fn with_context(e: Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Applies the `pty-req` terminal modes (RFC 4254 section 8) that Linux has. Speeds are left
/// alone: a pty has none that matter.
fn apply_modes(slave: &OwnedFd, modes: &[(Pty, u32)]) -> io::Result<()> {
    // SAFETY: termios is plain old data, filled in by tcgetattr before use.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid pointer to a termios.
    if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut tio) } < 0 {
        return Err(with_context(Errno::last(), "tcgetattr"));
    }
    for &(mode, value) in modes {
        apply_mode(&mut tio, mode, value);
    }
    // SAFETY: a valid fd and a valid pointer to a termios.
    if unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) } < 0 {
        return Err(with_context(Errno::last(), "tcsetattr"));
    }
    Ok(())
}

fn apply_mode(tio: &mut libc::termios, mode: Pty, value: u32) {
    let char_index = match mode {
        Pty::VINTR => Some(libc::VINTR),
        Pty::VQUIT => Some(libc::VQUIT),
        Pty::VERASE => Some(libc::VERASE),
        Pty::VKILL => Some(libc::VKILL),
        Pty::VEOF => Some(libc::VEOF),
        Pty::VEOL => Some(libc::VEOL),
        Pty::VEOL2 => Some(libc::VEOL2),
        Pty::VSTART => Some(libc::VSTART),
        Pty::VSTOP => Some(libc::VSTOP),
        Pty::VSUSP => Some(libc::VSUSP),
        Pty::VREPRINT => Some(libc::VREPRINT),
        Pty::VWERASE => Some(libc::VWERASE),
        Pty::VLNEXT => Some(libc::VLNEXT),
        Pty::VDISCARD => Some(libc::VDISCARD),
        Pty::VSWTCH => Some(libc::VSWTC),
        _ => None,
    };
    if let Some(index) = char_index {
        // 255 means "disabled" on the wire; Linux spells that _POSIX_VDISABLE, 0.
        tio.c_cc[index] = if value == 255 { 0 } else { value as libc::cc_t };
        return;
    }
    let (field, bit) = match mode {
        Pty::IGNPAR => (&mut tio.c_iflag, libc::IGNPAR),
        Pty::PARMRK => (&mut tio.c_iflag, libc::PARMRK),
        Pty::INPCK => (&mut tio.c_iflag, libc::INPCK),
        Pty::ISTRIP => (&mut tio.c_iflag, libc::ISTRIP),
        Pty::INLCR => (&mut tio.c_iflag, libc::INLCR),
        Pty::IGNCR => (&mut tio.c_iflag, libc::IGNCR),
        Pty::ICRNL => (&mut tio.c_iflag, libc::ICRNL),
        Pty::IUCLC => (&mut tio.c_iflag, libc::IUCLC),
        Pty::IXON => (&mut tio.c_iflag, libc::IXON),
        Pty::IXANY => (&mut tio.c_iflag, libc::IXANY),
        Pty::IXOFF => (&mut tio.c_iflag, libc::IXOFF),
        Pty::IMAXBEL => (&mut tio.c_iflag, libc::IMAXBEL),
        Pty::IUTF8 => (&mut tio.c_iflag, libc::IUTF8),
        Pty::ISIG => (&mut tio.c_lflag, libc::ISIG),
        Pty::ICANON => (&mut tio.c_lflag, libc::ICANON),
        Pty::XCASE => (&mut tio.c_lflag, libc::XCASE),
        Pty::ECHO => (&mut tio.c_lflag, libc::ECHO),
        Pty::ECHOE => (&mut tio.c_lflag, libc::ECHOE),
        Pty::ECHOK => (&mut tio.c_lflag, libc::ECHOK),
        Pty::ECHONL => (&mut tio.c_lflag, libc::ECHONL),
        Pty::NOFLSH => (&mut tio.c_lflag, libc::NOFLSH),
        Pty::TOSTOP => (&mut tio.c_lflag, libc::TOSTOP),
        Pty::IEXTEN => (&mut tio.c_lflag, libc::IEXTEN),
        Pty::ECHOCTL => (&mut tio.c_lflag, libc::ECHOCTL),
        Pty::ECHOKE => (&mut tio.c_lflag, libc::ECHOKE),
        Pty::PENDIN => (&mut tio.c_lflag, libc::PENDIN),
        Pty::OPOST => (&mut tio.c_oflag, libc::OPOST),
        Pty::OLCUC => (&mut tio.c_oflag, libc::OLCUC),
        Pty::ONLCR => (&mut tio.c_oflag, libc::ONLCR),
        Pty::OCRNL => (&mut tio.c_oflag, libc::OCRNL),
        Pty::ONOCR => (&mut tio.c_oflag, libc::ONOCR),
        Pty::ONLRET => (&mut tio.c_oflag, libc::ONLRET),
        Pty::PARENB => (&mut tio.c_cflag, libc::PARENB),
        Pty::PARODD => (&mut tio.c_cflag, libc::PARODD),
        Pty::CS7 | Pty::CS8 => {
            // Character size is a field, not a flag: setting CS7 or CS8 replaces it.
            if value != 0 {
                tio.c_cflag =
                    (tio.c_cflag & !libc::CSIZE) | if mode == Pty::CS7 { libc::CS7 } else { libc::CS8 };
            }
            return;
        }
        _ => return,
    };
    if value != 0 {
        *field |= bit;
    } else {
        *field &= !bit;
    }
}

fn set_window_size(
    master: &OwnedFd,
    cols: u32,
    rows: u32,
    pix_width: u32,
    pix_height: u32,
) -> io::Result<()> {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    let size = libc::winsize {
        ws_row: clamp(rows),
        ws_col: clamp(cols),
        ws_xpixel: clamp(pix_width),
        ws_ypixel: clamp(pix_height),
    };
    // SAFETY: a valid fd and a pointer to a winsize that outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
        return Err(with_context(Errno::last(), "TIOCSWINSZ"));
    }
    Ok(())
}

/// The pty of a running child.
#[derive(Debug)]
pub struct Terminal {
    master: OwnedFd,
}

impl Terminal {
    /// Sets the window size; the kernel sends SIGWINCH to the terminal's foreground group.
    pub fn resize(&self, cols: u32, rows: u32, pix_width: u32, pix_height: u32) -> io::Result<()> {
        set_window_size(&self.master, cols, rows, pix_width, pix_height)
    }
}

/// The child's process group (the child leads it, having called `setsid`).
#[derive(Debug, Clone, Copy)]
pub struct ProcessGroup(Pid);

impl ProcessGroup {
    fn of(pid: u32) -> io::Result<ProcessGroup> {
        let raw = i32::try_from(pid).map_err(|_| io::Error::other(format!("pid {pid} out of range")))?;
        Ok(ProcessGroup(Pid::from_raw(raw)))
    }

    pub fn pid(&self) -> i32 {
        self.0.as_raw()
    }

    /// Sends `signal` to every process in the group.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        killpg(self.0, signal)
    }

    fn hang_up(&self) {
        // ESRCH: the whole group has already gone, which is the goal.
        if let Err(e) = self.signal(Signal::SIGHUP) {
            tracing::debug!("SIGHUP to group {}: {e}", self.0);
        }
    }
}

/// The writing end of the child's stdin: a pipe, or the pty master.
#[derive(Debug)]
pub enum ChildInput {
    Pipe(pipe::Sender),
    Pty(AsyncFd<OwnedFd>),
}

impl ChildInput {
    pub async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        match self {
            ChildInput::Pipe(pipe) => pipe.write_all(buf).await,
            ChildInput::Pty(fd) => {
                while !buf.is_empty() {
                    let mut guard = fd.writable().await?;
                    if let Ok(written) =
                        guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
                    {
                        buf = &buf[written?..];
                    }
                }
                Ok(())
            }
        }
    }
}

/// A reading end of the child's output: a pipe, or the pty master.
#[derive(Debug)]
pub enum ChildOutput {
    Pipe(pipe::Receiver),
    Pty(AsyncFd<OwnedFd>),
}

impl ChildOutput {
    /// Reads some bytes; 0 at EOF, which on a pty is the EIO that follows the last slave's
    /// close. Cancel-safe: nothing is read unless the future completes.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChildOutput::Pipe(pipe) => pipe.read(buf).await,
            ChildOutput::Pty(fd) => loop {
                let mut guard = fd.readable().await?;
                if let Ok(read) = guard.try_io(|fd| read_pty(fd.get_ref(), buf)) {
                    return read;
                }
            },
        }
    }

    /// Reads what is left after the child exited: on a pty, 0 once nothing is buffered (a
    /// background job may keep the slave open forever; the kernel flushes pending slave
    /// output before it answers EAGAIN); on a pipe, waits for EOF as sshd does.
    async fn read_after_exit(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChildOutput::Pipe(_) => self.read(buf).await,
            ChildOutput::Pty(fd) => match read_pty(fd.get_ref(), buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                other => other,
            },
        }
    }
}

fn read_pty(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    match nix::unistd::read(fd.as_fd(), buf) {
        Err(Errno::EIO) => Ok(0),
        other => other.map_err(io::Error::from),
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where [`pump_output`] delivers output. `send` should complete only once the chunk has
/// been accepted downstream: that is the flow control.
pub trait OutputSink {
    fn send(&self, stream: Stream, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

/// Copies the child's output into `sink` and returns its exit status once all output was
/// delivered. See the module docs for when the output counts as complete.
pub async fn pump_output<S: OutputSink + Sync>(
    stdout: ChildOutput,
    stderr: Option<ChildOutput>,
    exit: ExitWaiter,
    sink: &S,
) -> io::Result<ExitStatus> {
    let exit = async { exit.await.map_err(io::Error::other) };
    match stderr {
        Some(stderr) => {
            let (_, _, status) = tokio::try_join!(
                pump_until_eof(stdout, Stream::Stdout, sink),
                pump_until_eof(stderr, Stream::Stderr, sink),
                exit
            )?;
            Ok(status)
        }
        None => pump_terminal(stdout, exit, sink).await,
    }
}

async fn pump_until_eof<S: OutputSink>(mut output: ChildOutput, stream: Stream, sink: &S) -> io::Result<()> {
    let mut buf = vec![0; OUTPUT_CHUNK];
    loop {
        let n = output.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        sink.send(stream, Bytes::copy_from_slice(&buf[..n])).await?;
    }
}

async fn pump_terminal<S: OutputSink>(
    mut output: ChildOutput,
    exit: impl Future<Output = io::Result<ExitStatus>>,
    sink: &S,
) -> io::Result<ExitStatus> {
    let mut buf = vec![0; OUTPUT_CHUNK];
    let mut exit = std::pin::pin!(exit);
    let mut status = None;
    loop {
        let n = match status {
            Some(_) => output.read_after_exit(&mut buf).await?,
            None => tokio::select! {
                read = output.read(&mut buf) => read?,
                exited = &mut exit => {
                    status = Some(exited?);
                    continue;
                }
            },
        };
        if n == 0 {
            break;
        }
        sink.send(Stream::Stdout, Bytes::copy_from_slice(&buf[..n])).await?;
    }
    match status {
        Some(status) => Ok(status),
        None => exit.await,
    }
}

/// Client data on its way to the child's stdin, bounded in bytes (see the module docs).
/// Dropping the queue closes stdin once everything queued has been written.
#[derive(Debug)]
pub struct StdinQueue {
    tx: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    cap: usize,
}

impl StdinQueue {
    /// Starts the task that writes queued data to `input`; it ends after the queue is dropped
    /// and drained. If the child stops accepting input, later data is discarded.
    pub fn start(input: ChildInput, cap: usize) -> (StdinQueue, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Bytes, OwnedSemaphorePermit)>();
        let writer = tokio::spawn(async move {
            let mut input = Some(input);
            while let Some((data, _permit)) = rx.recv().await {
                if let Some(sink) = &mut input {
                    if let Err(e) = sink.write_all(&data).await {
                        tracing::debug!("child stdin closed: {e}");
                        input = None;
                    }
                }
            }
        });
        let queue = StdinQueue { tx, budget: Arc::new(Semaphore::new(cap)), cap };
        (queue, writer)
    }

    /// Queues `data`, waiting while the queue is full.
    pub async fn push(&self, data: Bytes) {
        let cost = (data.len() + STDIN_MESSAGE_OVERHEAD).min(self.cap);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        // The semaphore is never closed, so acquiring only waits.
        let Ok(permit) = Arc::clone(&self.budget).acquire_many_owned(cost).await else {
            return;
        };
        // The writer only stops when the queue is dropped, so the send cannot fail while
        // `self` exists.
        let _ = self.tx.send((data, permit));
    }
}

// ---- signals -------------------------------------------------------------------------------

/// The signal an SSH `signal` request names ("INT", not "SIGINT"); `None` if Linux has none.
pub fn signal_from_ssh(sig: &Sig) -> Option<Signal> {
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => return Signal::from_str(&format!("SIG{name}")).ok(),
    })
}

/// The SSH name of a signal that ended a child. Signals without a name (real-time ones) are
/// reported as OpenSSH does, "SIG@openssh.com".
pub fn signal_to_ssh(signal: i32) -> Sig {
    match Signal::try_from(signal) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_owned()),
        Err(_) => Sig::Custom("SIG@openssh.com".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::testing::isolated_test;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::sync::watch;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(60);

    #[test]
    fn signal_names_map_both_ways() {
        let name = |sig: Sig| format!("{sig:?}");
        assert_eq!(signal_from_ssh(&Sig::TERM), Some(Signal::SIGTERM));
        assert_eq!(signal_from_ssh(&Sig::Custom("WINCH".into())), Some(Signal::SIGWINCH));
        assert_eq!(signal_from_ssh(&Sig::Custom("NOPE".into())), None);
        assert_eq!(name(signal_to_ssh(libc::SIGKILL)), name(Sig::KILL));
        assert_eq!(name(signal_to_ssh(libc::SIGUSR2)), name(Sig::Custom("USR2".into())));
        assert_eq!(name(signal_to_ssh(libc::SIGRTMIN() + 1)), name(Sig::Custom("SIG@openssh.com".into())));
    }

    #[test]
    fn terminal_modes_map_to_termios() {
        // SAFETY: termios is plain old data.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        tio.c_lflag = libc::ECHO;
        tio.c_cflag = libc::CS7;
        let modes = [
            (Pty::ECHO, 0),
            (Pty::ICANON, 1),
            (Pty::VINTR, 7),
            (Pty::VQUIT, 255),
            (Pty::CS8, 1),
            (Pty::TTY_OP_ISPEED, 38400),
        ];
        for (mode, value) in modes {
            apply_mode(&mut tio, mode, value);
        }
        assert_eq!(tio.c_lflag, libc::ICANON);
        assert_eq!(tio.c_cflag & libc::CSIZE, libc::CS8);
        assert_eq!(tio.c_cc[libc::VINTR], 7);
        assert_eq!(tio.c_cc[libc::VQUIT], 0);
    }

    fn test_user(home: &Path) -> PasswdEntry {
        PasswdEntry {
            name: "dev".into(),
            uid: 1000,
            gid: 1000,
            home: Some(home.to_owned()),
            shell: Some("/bin/sh".into()),
        }
    }

    fn request(command: Option<&str>, pty: Option<PtyRequest>) -> ExecRequest {
        ExecRequest {
            command: command.map(|c| c.as_bytes().to_vec()),
            pty,
            env: Vec::new(),
            cwd: PathBuf::from("/"),
        }
    }

    fn pty_80x24() -> PtyRequest {
        PtyRequest {
            term: "xterm-256color".into(),
            cols: 80,
            rows: 24,
            pix_width: 0,
            pix_height: 0,
            modes: Vec::new(),
        }
    }

    /// Collects output, or only counts it when `discard` is set.
    struct Collect {
        stdout: watch::Sender<Vec<u8>>,
        stderr: Mutex<Vec<u8>>,
        total: AtomicU64,
        max_chunk: AtomicUsize,
        discard: bool,
    }

    impl OutputSink for Collect {
        async fn send(&self, stream: Stream, data: Bytes) -> io::Result<()> {
            self.total.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.max_chunk.fetch_max(data.len(), Ordering::Relaxed);
            if !self.discard {
                match stream {
                    Stream::Stdout => self.stdout.send_modify(|v| v.extend_from_slice(&data)),
                    Stream::Stderr => self.stderr.lock().unwrap().extend_from_slice(&data),
                }
            }
            tokio::task::yield_now().await;
            Ok(())
        }
    }

    /// A child started with the same pieces as [`run`] uses, with its output collected.
    struct Session {
        group: ProcessGroup,
        terminal: Option<Terminal>,
        stdin: Option<StdinQueue>,
        sink: Arc<Collect>,
        pump: tokio::task::JoinHandle<io::Result<ExitStatus>>,
    }

    impl Session {
        fn start(reaper: &Reaper, req: &ExecRequest, user: &PasswdEntry, discard: bool) -> Self {
            let cmd = shell_command(req, Some(user));
            let process = Process::spawn(reaper, cmd, req.pty.as_ref()).expect("spawn");
            let (stdin, _writer) = StdinQueue::start(process.stdin, 1 << 20);
            let sink = Arc::new(Collect {
                stdout: watch::Sender::new(Vec::new()),
                stderr: Mutex::new(Vec::new()),
                total: AtomicU64::new(0),
                max_chunk: AtomicUsize::new(0),
                discard,
            });
            let pump_sink = Arc::clone(&sink);
            let (stdout, stderr, exit) = (process.stdout, process.stderr, process.exit);
            let pump = tokio::spawn(async move { pump_output(stdout, stderr, exit, &*pump_sink).await });
            Session { group: process.group, terminal: process.terminal, stdin: Some(stdin), sink, pump }
        }

        async fn wait_for_output(&self, needle: &str) {
            let mut rx = self.sink.stdout.subscribe();
            let found = timeout(DEADLINE, rx.wait_for(|out| contains(out, needle.as_bytes())));
            if found.await.is_err() {
                panic!("no {needle:?} in output {:?}", String::from_utf8_lossy(&self.sink.stdout.borrow()));
            }
        }

        /// Closes stdin and waits for the exit status and all output.
        async fn finish(mut self) -> (ExitStatus, String, String) {
            self.stdin = None;
            let status = timeout(DEADLINE, self.pump)
                .await
                .expect("session ends within the deadline")
                .unwrap()
                .expect("pump");
            let stdout = String::from_utf8(self.sink.stdout.borrow().clone()).unwrap();
            let stderr = String::from_utf8(self.sink.stderr.lock().unwrap().clone()).unwrap();
            (status, stdout, stderr)
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    async fn run_script(
        reaper: &Reaper,
        script: &str,
        pty: Option<PtyRequest>,
    ) -> (ExitStatus, String, String) {
        let home = tempfile::tempdir().unwrap();
        let req = request(Some(script), pty);
        Session::start(reaper, &req, &test_user(home.path()), false).finish().await
    }

    fn peak_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    isolated_test!(pipes_keep_stdout_and_stderr_apart, async {
        let reaper = Reaper::start().unwrap();
        let (status, out, err) =
            run_script(&reaper, "echo out; echo err >&2; test -t 0 || echo notty; exit 3", None).await;
        assert_eq!(status, ExitStatus::Exited(3));
        assert_eq!(out, "out\nnotty\n");
        assert_eq!(err, "err\n");
    });

    isolated_test!(environment_argv0_and_cwd, async {
        let reaper = Reaper::start().unwrap();
        let home = tempfile::tempdir().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        let mut req = request(
            Some(r#"printf '%s|' "$HOME" "$USER" "$LOGNAME" "$SHELL" "$FOO" "$0" "$(pwd)" "${TERM-unset}""#),
            None,
        );
        req.cwd = cwd.path().to_owned();
        req.env = vec![
            ("FOO".into(), "bar baz".into()),
            ("HOME".into(), "/client/wins".into()),
            ("BAD=NAME".into(), "x".into()),
            ("NUL".into(), "a\0b".into()),
        ];
        let session = Session::start(&reaper, &req, &test_user(home.path()), false);
        let (status, out, _) = session.finish().await;
        assert_eq!(status, ExitStatus::Exited(0));
        let cwd = cwd.path().canonicalize().unwrap();
        assert_eq!(out, format!("/client/wins|dev|dev|/bin/sh|bar baz|sh|{}|unset|", cwd.display()));
    });

    isolated_test!(shell_request_runs_a_login_shell_reading_stdin, async {
        let reaper = Reaper::start().unwrap();
        let home = tempfile::tempdir().unwrap();
        let mut session = Session::start(&reaper, &request(None, None), &test_user(home.path()), false);
        let stdin = session.stdin.as_ref().unwrap();
        stdin.push(Bytes::from_static(b"echo \"argv0=$0\"\n")).await;
        stdin.push(Bytes::from_static(b"exit 7\n")).await;
        session.stdin = None;
        let (status, out, _) = session.finish().await;
        assert_eq!(status, ExitStatus::Exited(7));
        assert!(out.ends_with("argv0=-sh\n"), "{out:?}");
    });

    isolated_test!(stdin_is_streamed_until_eof, async {
        let reaper = Reaper::start().unwrap();
        let home = tempfile::tempdir().unwrap();
        let session = Session::start(&reaper, &request(Some("cat"), None), &test_user(home.path()), false);
        // More than any pipe buffer, so cat must be read while it is being fed.
        let input: Vec<u8> = (0..4 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in input.chunks(32 << 10) {
            session.stdin.as_ref().unwrap().push(Bytes::copy_from_slice(chunk)).await;
        }
        let (status, out, _) = session.finish().await;
        assert_eq!(status, ExitStatus::Exited(0));
        assert!(out.as_bytes() == input, "cat echoed {} of {} bytes", out.len(), input.len());
    });

    isolated_test!(large_output_is_streamed_with_bounded_memory, async {
        let reaper = Reaper::start().unwrap();
        let home = tempfile::tempdir().unwrap();
        let before = peak_rss_kib();
        let req = request(Some("head -c 52428800 /dev/zero"), None);
        let session = Session::start(&reaper, &req, &test_user(home.path()), true);
        let sink = Arc::clone(&session.sink);
        let (status, _, _) = session.finish().await;
        assert_eq!(status, ExitStatus::Exited(0));
        assert_eq!(sink.total.load(Ordering::Relaxed), 50 << 20);
        assert!(sink.max_chunk.load(Ordering::Relaxed) <= OUTPUT_CHUNK);
        let grown = peak_rss_kib() - before;
        assert!(grown < 16 << 10, "peak RSS grew by {grown} KiB for 50 MiB of output");
    });

    isolated_test!(pty_merges_output_and_is_the_controlling_terminal, async {
        let reaper = Reaper::start().unwrap();
        let script = "test -t 0 && test -t 1 && test -t 2 && echo \"tty $TERM\"; \
                      echo err >&2; stty size; (: </dev/tty) 2>/dev/null && echo ctty; exit 4";
        let (status, out, err) = run_script(&reaper, script, Some(pty_80x24())).await;
        assert_eq!(status, ExitStatus::Exited(4));
        assert_eq!(out, "tty xterm-256color\r\nerr\r\n24 80\r\nctty\r\n");
        assert_eq!(err, "");
    });

    isolated_test!(pty_modes_are_applied, async {
        let reaper = Reaper::start().unwrap();
        let mut pty = pty_80x24();
        pty.modes = vec![(Pty::ECHO, 0), (Pty::VINTR, 7), (Pty::ONLCR, 0)];
        let (status, out, _) = run_script(&reaper, "stty -a", Some(pty)).await;
        assert_eq!(status, ExitStatus::Exited(0));
        assert!(out.contains("intr = ^G;"), "{out}");
        assert!(out.contains(" -echo "), "{out}");
        assert!(out.contains(" -onlcr "), "{out}");
    });

    isolated_test!(window_change_reaches_the_child, async {
        let reaper = Reaper::start().unwrap();
        let home = tempfile::tempdir().unwrap();
        let script = "trap 'stty size; kill $!; exit 0' WINCH; sleep 100 & echo ready; wait";
        let req = request(Some(script), Some(pty_80x24()));
        let session = Session::start(&reaper, &req, &test_user(home.path()), false);
        session.wait_for_output("ready").await;
        session.terminal.as_ref().unwrap().resize(132, 50, 0, 0).unwrap();
        let (status, out, _) = session.finish().await;
        assert_eq!(status, ExitStatus::Exited(0));
        assert_eq!(out, "ready\r\n50 132\r\n");
    });

    isolated_test!(pty_output_just_before_exit_is_not_lost, async {
        let reaper = Reaper::start().unwrap();
        for _ in 0..5 {
            let script = "head -c 300000 /dev/zero | tr '\\0' x; exit 3";
            let (status, out, _) = run_script(&reaper, script, Some(pty_80x24())).await;
            assert_eq!(status, ExitStatus::Exited(3));
            assert_eq!(out.len(), 300000);
        }
    });

    isolated_test!(a_signal_reaches_the_whole_group, async {
        let reaper = Reaper::start().unwrap();
        let home = tempfile::tempdir().unwrap();
        for pty in [None, Some(pty_80x24())] {
            // The background sleeps hold stdout: the session ends only once they are gone.
            let script = "sleep 100 & sleep 100 & echo started; wait";
            let session =
                Session::start(&reaper, &request(Some(script), pty), &test_user(home.path()), false);
            session.wait_for_output("started").await;
            session.group.signal(Signal::SIGTERM).unwrap();
            let (status, _, _) = session.finish().await;
            assert_eq!(status, ExitStatus::Signaled { signal: libc::SIGTERM, core_dumped: false });
        }
        timeout(DEADLINE, reaper.wait_all_exited()).await.unwrap();
    });

    isolated_test!(a_missing_shell_is_an_error, async {
        let reaper = Reaper::start().unwrap();
        let mut user = test_user(Path::new("/"));
        user.shell = Some("/nonexistent/shell".into());
        let cmd = shell_command(&request(Some("true"), None), Some(&user));
        let err = Process::spawn(&reaper, cmd, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    });

    /// `run` behind a real russh server, driven by a russh client over an in-memory stream.
    mod over_ssh {
        use super::*;
        use crate::ssh::{read_session_request, SessionRequest};
        use russh::keys::ssh_key::private::Ed25519Keypair;
        use russh::keys::{PrivateKey, PublicKeyOrCertificate};
        use russh::{client, server};

        struct TestServer {
            reaper: Arc<Reaper>,
            cwd: PathBuf,
        }

        impl server::Handler for TestServer {
            type Error = russh::Error;

            async fn auth_none(&mut self, _: &str) -> Result<server::Auth, Self::Error> {
                Ok(server::Auth::Accept)
            }

            async fn channel_open_session(
                &mut self,
                channel: Channel<Msg>,
                reply: server::ChannelOpenHandle,
                session: &mut server::Session,
            ) -> Result<(), Self::Error> {
                reply.accept().await;
                tokio::spawn(dispatch(channel, session.handle(), Arc::clone(&self.reaper), self.cwd.clone()));
                Ok(())
            }
        }

        /// What ssh.rs does with an exec or shell request.
        async fn dispatch(mut channel: Channel<Msg>, handle: Handle, reaper: Arc<Reaper>, cwd: PathBuf) {
            if let Some(SessionRequest::Exec(req)) = read_session_request(&mut channel, cwd).await {
                run(channel, handle, req, reaper).await;
            }
        }

        struct TestClient;

        impl client::Handler for TestClient {
            type Error = russh::Error;

            async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
                Ok(true)
            }
        }

        async fn connect(reaper: &Arc<Reaper>) -> client::Handle<TestClient> {
            connect_in(reaper, Path::new("/")).await
        }

        async fn connect_in(reaper: &Arc<Reaper>, cwd: &Path) -> client::Handle<TestClient> {
            // Room for more than a channel window each way: a russh session stops reading
            // while one of its writes blocks, so two russh peers over a small pipe deadlock
            // when both push bulk data (kernel socket buffers are large enough in practice).
            let (server_end, client_end) = tokio::io::duplex(16 << 20);
            let mut config = server::Config::default();
            config.keys.push(PrivateKey::from(Ed25519Keypair::from_seed(&[7; 32])));
            let handler = TestServer { reaper: Arc::clone(reaper), cwd: cwd.to_owned() };
            tokio::spawn(async move {
                let session = server::run_stream(Arc::new(config), server_end, handler).await?;
                session.await
            });
            let config = Arc::new(client::Config::default());
            let mut client = client::connect_stream(config, client_end, TestClient).await.unwrap();
            assert!(client.authenticate_none("dev").await.unwrap().success());
            client
        }

        /// Everything the client saw on a channel, in order, until the server closed it.
        #[derive(Debug, Default)]
        struct Transcript {
            stdout: Vec<u8>,
            stderr: Vec<u8>,
            /// "status N" or "signal NAME core=BOOL", and whether data came after it.
            exit: Option<String>,
            data_after_exit: bool,
            eof_before_exit: bool,
        }

        async fn read_until_close(channel: &mut ChannelReadHalf, transcript: &mut Transcript) {
            let mut eof = false;
            loop {
                let msg = timeout(DEADLINE, channel.wait()).await.expect("server answers in time");
                match msg {
                    Some(ChannelMsg::Data { data }) => {
                        transcript.data_after_exit |= transcript.exit.is_some();
                        transcript.stdout.extend_from_slice(&data);
                    }
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                        transcript.data_after_exit |= transcript.exit.is_some();
                        transcript.stderr.extend_from_slice(&data);
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        transcript.eof_before_exit = eof;
                        transcript.exit = Some(format!("status {exit_status}"));
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, core_dumped, .. }) => {
                        transcript.eof_before_exit = eof;
                        transcript.exit = Some(format!("signal {signal_name:?} core={core_dumped}"));
                    }
                    Some(ChannelMsg::Eof) => eof = true,
                    Some(ChannelMsg::Close) | None => return,
                    Some(_) => {}
                }
            }
        }

        async fn wait_for_stdout(channel: &mut ChannelReadHalf, transcript: &mut Transcript, needle: &[u8]) {
            while !contains(&transcript.stdout, needle) {
                match timeout(DEADLINE, channel.wait()).await.expect("output in time") {
                    Some(ChannelMsg::Data { data }) => transcript.stdout.extend_from_slice(&data),
                    Some(other) => panic!("unexpected {other:?} while waiting for {needle:?}"),
                    None => panic!("channel closed while waiting for {needle:?}"),
                }
            }
        }

        isolated_test!(exec_reports_output_then_status_then_eof, async {
            let reaper = Reaper::start().unwrap();
            let client = connect(&reaper).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.set_env(false, "GREETING", "hello").await.unwrap();
            channel
                .exec(false, "printf '%s\\n' \"$GREETING\"; echo err >&2; head -c 3000000 /dev/zero; exit 42")
                .await
                .unwrap();
            let mut t = Transcript::default();
            read_until_close(&mut rx, &mut t).await;
            assert_eq!(t.exit.as_deref(), Some("status 42"));
            assert!(!t.data_after_exit && !t.eof_before_exit, "{:?}", t.exit);
            assert_eq!(&t.stdout[..6], b"hello\n");
            assert_eq!(t.stdout.len(), 6 + 3_000_000);
            assert_eq!(t.stderr, b"err\n");
        });

        isolated_test!(stdin_reaches_the_command_until_eof, async {
            let reaper = Reaper::start().unwrap();
            let client = connect(&reaper).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.exec(false, "cat; echo done").await.unwrap();
            let input: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
            // Written while the output is read: a russh client that stops reading cannot
            // process window adjustments either.
            let writer = tokio::spawn({
                let input = Bytes::from(input.clone());
                async move {
                    channel.data_bytes(input).await.unwrap();
                    channel.eof().await.unwrap();
                }
            });
            let mut t = Transcript::default();
            read_until_close(&mut rx, &mut t).await;
            writer.await.unwrap();
            assert_eq!(t.exit.as_deref(), Some("status 0"));
            assert!(t.stdout[..input.len()] == input[..]);
            assert_eq!(&t.stdout[input.len()..], b"done\n");
        });

        isolated_test!(signal_request_and_exit_signal, async {
            let reaper = Reaper::start().unwrap();
            let client = connect(&reaper).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.exec(false, "sleep 100 & echo started; wait").await.unwrap();
            let mut t = Transcript::default();
            wait_for_stdout(&mut rx, &mut t, b"started").await;
            channel.signal(Sig::TERM).await.unwrap();
            read_until_close(&mut rx, &mut t).await;
            assert_eq!(t.exit.as_deref(), Some("signal TERM core=false"));
            timeout(DEADLINE, reaper.wait_all_exited()).await.unwrap();
        });

        isolated_test!(pty_session_with_window_change, async {
            let reaper = Reaper::start().unwrap();
            let client = connect(&reaper).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.request_pty(false, "vt100", 80, 24, 0, 0, &[(Pty::ECHO, 0)]).await.unwrap();
            let script =
                "echo \"$TERM\"; trap 'stty size; kill $!; exit 5' WINCH; sleep 100 & echo ready; wait";
            channel.exec(false, script).await.unwrap();
            let mut t = Transcript::default();
            wait_for_stdout(&mut rx, &mut t, b"ready").await;
            channel.window_change(100, 30, 0, 0).await.unwrap();
            read_until_close(&mut rx, &mut t).await;
            assert_eq!(t.exit.as_deref(), Some("status 5"));
            assert_eq!(String::from_utf8_lossy(&t.stdout), "vt100\r\nready\r\n30 100\r\n");
        });

        isolated_test!(shell_over_ssh_reads_commands_from_stdin, async {
            let reaper = Reaper::start().unwrap();
            let client = connect(&reaper).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.request_shell(false).await.unwrap();
            channel.data_bytes(Bytes::from_static(b"echo \"in $0\"; exit 3\n")).await.unwrap();
            channel.eof().await.unwrap();
            let mut t = Transcript::default();
            read_until_close(&mut rx, &mut t).await;
            assert_eq!(t.exit.as_deref(), Some("status 3"));
            let out = String::from_utf8_lossy(&t.stdout);
            assert!(out.contains("in -"), "{out:?}");
        });

        isolated_test!(closing_the_channel_hangs_up_the_command, async {
            let reaper = Reaper::start().unwrap();
            let client = connect(&reaper).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.exec(false, "sleep 100 & echo started; wait").await.unwrap();
            let mut t = Transcript::default();
            wait_for_stdout(&mut rx, &mut t, b"started").await;
            channel.close().await.unwrap();
            timeout(DEADLINE, reaper.wait_all_exited()).await.expect("the group got SIGHUP");
        });

        isolated_test!(a_command_that_cannot_start_reports_127, async {
            let reaper = Reaper::start().unwrap();
            let client = connect_in(&reaper, Path::new("/nonexistent/devmount-root")).await;
            let (mut rx, channel) = client.channel_open_session().await.unwrap().split();
            channel.exec(false, "true").await.unwrap();
            let mut t = Transcript::default();
            read_until_close(&mut rx, &mut t).await;
            assert_eq!(t.exit.as_deref(), Some("status 127"));
            let err = String::from_utf8_lossy(&t.stderr);
            assert!(err.contains("/nonexistent/devmount-root"), "{err}");
        });
    }
}
