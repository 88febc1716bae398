//! The client side of `devmount exec` and `devmount ssh`: one session channel on an existing
//! [`Session`], with a pty or pipes, stdin streamed in, stdout and stderr streamed out, window
//! changes and signals passed on, and the remote exit status turned into devmount's exit code.
//! Also the local terminal's side: raw mode, its window size, and the signals to pass on.
//!
//! Requests are pipelined: `pty-req`, `env` and `exec` (or `shell`) go out together, so a
//! command costs the channel's round trip and the command's own.
//!
//! Output never waits on the local reader while the channel is read: russh stops reading the
//! whole connection (the mount's SFTP traffic too) as soon as one channel's queue fills, and
//! it widens the server's window as data arrives rather than as it is consumed, so there is
//! no flow control to lean on. Stdout and stderr each get a queue of [`OUTPUT_QUEUE`] chunks
//! between the channel and their writer; only a reader slower than the command for that long
//! holds up the connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use devmount_server::exec::{signal_from_ssh, signal_to_ssh};
use nix::sys::signal::Signal;
use nix::sys::termios::{self, SetArg, Termios};
use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::session::{Session, SessionError};

/// Output chunks (at most one SSH packet each) that may wait for a slow local reader, per
/// stream.
pub const OUTPUT_QUEUE: usize = 256;
/// The most read from stdin at once.
const STDIN_CHUNK: usize = 32 << 10;
/// Events that may wait before the signal watcher waits too.
const EVENT_QUEUE: usize = 16;
/// How long a lost channel waits for its connection to say why it ended.
const LOST_REASON_WAIT: Duration = Duration::from_secs(5);

/// What to run, and how.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// A command line for the remote user's shell; `None` runs a login shell.
    pub command: Option<Vec<u8>>,
    /// The remote directory to run in; `None` is the server's root. An absolute path is best:
    /// a relative one is taken from the server's root.
    pub cwd: Option<Vec<u8>>,
    /// Environment variables for the command, on top of the server's.
    pub env: Vec<(String, String)>,
    /// A terminal for the command; `None` runs it on pipes (stderr kept apart).
    pub pty: Option<PtyRequest>,
}

/// The terminal asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// The `TERM` the remote side should use.
    pub term: String,
    pub size: WindowSize,
}

/// A terminal's size in characters (and pixels, 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
}

/// Something that happens locally while the command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The local terminal changed size; sent on only with a pty.
    Resize(WindowSize),
    /// A signal for the remote command (its whole process group).
    Signal(Signal),
}

/// How the remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    Signal {
        /// The SSH name: "TERM", not "SIGTERM".
        name: String,
        /// `None` for a signal this system has no number for.
        number: Option<i32>,
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// devmount's exit code for it, as a shell reports a local command: the code, or 128 plus
    /// the signal's number. A signal without a number is 255, as ssh reports every signal.
    pub fn code(&self) -> u8 {
        match self {
            ExitStatus::Code(code) => u8::try_from(*code).unwrap_or(u8::MAX),
            ExitStatus::Signal { number: Some(n), .. } => u8::try_from(128 + n).unwrap_or(u8::MAX),
            ExitStatus::Signal { number: None, .. } => u8::MAX,
        }
    }

    fn from_signal(sig: &Sig, core_dumped: bool) -> ExitStatus {
        let name = match sig {
            Sig::Custom(name) => name.clone(),
            // The standard names print as themselves.
            other => format!("{other:?}"),
        };
        ExitStatus::Signal { name, number: signal_from_ssh(sig).map(|s| s as i32), core_dumped }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exited with code {code}"),
            ExitStatus::Signal { name, core_dumped, .. } => {
                write!(f, "killed by signal {name}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a command's status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("{address} refused a terminal for the command; run it without one (-T)")]
    PtyRefused { address: String },
    #[error("{address} refused to run the command")]
    Refused { address: String },
    #[error("the connection to {address} ended before the command's exit status arrived: {reason}")]
    Lost { address: String, reason: String },
    #[error("{address} closed the command's channel without an exit status")]
    NoStatus { address: String },
    #[error("cannot write the command's {stream}: {source}")]
    Output {
        stream: &'static str,
        #[source]
        source: io::Error,
    },
}

impl ExecRequest {
    /// The `exec` request's command line; `None` for a `shell` request. A `cwd` wraps it in
    /// POSIX shell syntax: `cd -- 'DIR' && eval 'COMMAND'`, which runs the command exactly as
    /// the shell would have, in that directory (a login shell is `exec "$SHELL" -l` there).
    /// `CDPATH` is cleared for the `cd`, which would otherwise print the directory.
    pub fn remote_command(&self) -> Option<Vec<u8>> {
        let Some(dir) = &self.cwd else {
            return self.command.clone();
        };
        let cd = [&b"CDPATH= cd -- "[..], &shell_quote(dir), b" && "].concat();
        Some(match &self.command {
            Some(command) => [&cd[..], b"eval ", &shell_quote(command)].concat(),
            None => [&cd[..], b"exec \"$SHELL\" -l"].concat(),
        })
    }
}

/// `bytes` as one single-quoted POSIX shell word.
pub fn shell_quote(bytes: &[u8]) -> Vec<u8> {
    let mut quoted = Vec::with_capacity(bytes.len() + 2);
    quoted.push(b'\'');
    for &b in bytes {
        if b == b'\'' {
            quoted.extend_from_slice(b"'\\''");
        } else {
            quoted.push(b);
        }
    }
    quoted.push(b'\'');
    quoted
}

/// Runs `req` on a new channel of `session`: see [`run_on`].
pub async fn run<I, O, E>(
    session: &Session,
    req: &ExecRequest,
    stdin: I,
    stdout: O,
    stderr: E,
    events: mpsc::Receiver<Event>,
) -> Result<ExitStatus, ExecError>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let channel = session.channel().await?;
    run_on(session, channel, req, stdin, stdout, stderr, events).await
}

/// Runs `req` on `channel`, a fresh session channel of `session` (one opened ahead saves a
/// round trip), until the command has ended and all its output is written.
///
/// `stdin` is sent until its end, then EOF (with a pty the remote side ignores EOF, as sshd
/// does); reading it stops when the command ends. With a pty, stdout gets the terminal's
/// output and stderr nothing. A local stdout or stderr that breaks (EPIPE) makes the remote
/// command get SIGPIPE, as it would locally, and its status is returned; any other write error
/// closes the channel and is returned.
///
/// `events` (resizes, signals) are sent on as they come, until their sender goes away.
pub async fn run_on<I, O, E>(
    session: &Session,
    channel: Channel<Msg>,
    req: &ExecRequest,
    stdin: I,
    stdout: O,
    stderr: E,
    events: mpsc::Receiver<Event>,
) -> Result<ExitStatus, ExecError>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let (mut rx, tx) = channel.split();
    let pending = match send_requests(&tx, req).await {
        Ok(pending) => pending,
        Err(_) => return Err(lost(session).await),
    };

    let (out_tx, out_rx) = mpsc::channel(OUTPUT_QUEUE);
    let (err_tx, err_rx) = mpsc::channel(OUTPUT_QUEUE);
    let output = async {
        tokio::join!(
            read_channel(&mut rx, pending, out_tx, err_tx),
            write_output(out_rx, stdout, &tx, "stdout"),
            write_output(err_rx, stderr, &tx, "stderr"),
        )
    };
    let input = async {
        tokio::join!(pump_stdin(&tx, stdin), pass_events(&tx, events, req.pty.is_some()));
        std::future::pending::<Infallible>().await
    };
    let (read, out, err) = tokio::select! {
        done = output => done,
        never = input => match never {},
    };
    let _ = tx.close().await;

    let status = match read {
        Ok(status) => status,
        Err(Refusal::Pty) => return Err(ExecError::PtyRefused { address: session.target().address() }),
        Err(Refusal::Exec) => return Err(ExecError::Refused { address: session.target().address() }),
    };
    out?;
    err?;
    match status {
        Some(status) => Ok(status),
        None if session.is_closed() => Err(lost(session).await),
        None => Err(ExecError::NoStatus { address: session.target().address() }),
    }
}

/// The channel could not be used: the connection is ending, and soon says why.
async fn lost(session: &Session) -> ExecError {
    let reason = tokio::time::timeout(LOST_REASON_WAIT, session.closed())
        .await
        .unwrap_or_else(|_| "the channel could not be used".into());
    ExecError::Lost { address: session.target().address(), reason }
}

/// A request whose answer is still to come.
enum Pending {
    Pty,
    Exec,
}

enum Refusal {
    Pty,
    Exec,
}

/// Sends `pty-req`, `env` and `exec` (or `shell`) without waiting for answers; returns the
/// answers to expect, in order.
async fn send_requests(
    tx: &ChannelWriteHalf<Msg>,
    req: &ExecRequest,
) -> Result<VecDeque<Pending>, russh::Error> {
    let mut pending = VecDeque::new();
    if let Some(pty) = &req.pty {
        let size = pty.size;
        tx.request_pty(true, &pty.term, size.cols, size.rows, size.pix_width, size.pix_height, &[]).await?;
        pending.push_back(Pending::Pty);
    }
    for (name, value) in &req.env {
        // As OpenSSH does: a variable the server will not set is not worth failing over.
        tx.set_env(false, name.as_str(), value.as_str()).await?;
    }
    match req.remote_command() {
        Some(command) => tx.exec(true, command).await?,
        None => tx.request_shell(true).await?,
    }
    pending.push_back(Pending::Exec);
    Ok(pending)
}

/// Reads every message of the channel until it closes, handing output to the writers' queues.
/// Returns the exit status, if one came.
async fn read_channel(
    rx: &mut ChannelReadHalf,
    mut pending: VecDeque<Pending>,
    stdout: mpsc::Sender<Bytes>,
    stderr: mpsc::Sender<Bytes>,
) -> Result<Option<ExitStatus>, Refusal> {
    let mut status = None;
    while let Some(msg) = rx.wait().await {
        match msg {
            // A writer that failed still drains its queue, so these never fail.
            ChannelMsg::Data { data } => {
                let _ = stdout.send(data).await;
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                let _ = stderr.send(data).await;
            }
            ChannelMsg::Success => {
                pending.pop_front();
            }
            ChannelMsg::Failure => match pending.pop_front() {
                Some(Pending::Pty) => return Err(Refusal::Pty),
                Some(Pending::Exec) => return Err(Refusal::Exec),
                None => tracing::debug!("exec channel: a failure answer nothing was asked for"),
            },
            ChannelMsg::ExitStatus { exit_status } => status = Some(ExitStatus::Code(exit_status)),
            ChannelMsg::ExitSignal { signal_name, core_dumped, .. } => {
                status = Some(ExitStatus::from_signal(&signal_name, core_dumped));
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(status)
}

/// Writes the chunks of `queue` to `out`, flushing whenever the queue runs dry.
async fn write_output<W: AsyncWrite + Unpin>(
    mut queue: mpsc::Receiver<Bytes>,
    mut out: W,
    tx: &ChannelWriteHalf<Msg>,
    stream: &'static str,
) -> Result<(), ExecError> {
    let mut failed = None;
    while let Some(chunk) = queue.recv().await {
        if failed.is_some() {
            continue;
        }
        let written = async {
            out.write_all(&chunk).await?;
            if queue.is_empty() {
                out.flush().await?;
            }
            Ok::<_, io::Error>(())
        };
        if let Err(e) = written.await {
            if e.kind() == io::ErrorKind::BrokenPipe {
                let _ = tx.signal(Sig::PIPE).await;
            } else {
                let _ = tx.close().await;
            }
            failed = Some(e);
        }
    }
    match failed {
        None => out.flush().await.map_err(|source| ExecError::Output { stream, source }),
        Some(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Some(source) => Err(ExecError::Output { stream, source }),
    }
}

/// Sends `stdin` to the channel until its end, then EOF.
async fn pump_stdin<R: AsyncRead + Unpin>(tx: &ChannelWriteHalf<Msg>, mut stdin: R) {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(STDIN_CHUNK);
        match stdin.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {
                if tx.data_bytes(buf.split().freeze()).await.is_err() {
                    // The channel is gone; the reader says why.
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("cannot read stdin: {e}; the command gets the end of its input");
                break;
            }
        }
    }
    let _ = tx.eof().await;
}

async fn pass_events(tx: &ChannelWriteHalf<Msg>, mut events: mpsc::Receiver<Event>, pty: bool) {
    while let Some(event) = events.recv().await {
        let sent = match event {
            Event::Resize(size) if pty => {
                tx.window_change(size.cols, size.rows, size.pix_width, size.pix_height).await
            }
            Event::Resize(_) => Ok(()),
            Event::Signal(signal) => tx.signal(signal_to_ssh(signal as i32)).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

// ---- the local terminal --------------------------------------------------------------------

/// The terminal in raw mode (no echo, no line editing, no signals from keys: every byte goes
/// to the remote pty, which does all that) until dropped, which restores its settings. Drop
/// it before the process exits; a panic that unwinds drops it too.
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` refers to in raw mode.
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
        let fd = fd.try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd).map_err(|e| errno_context(e, "tcgetattr"))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&fd, SetArg::TCSADRAIN, &raw).map_err(|e| errno_context(e, "tcsetattr"))?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Err(e) = termios::tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved) {
            tracing::warn!("cannot restore the terminal's settings: {e}; `reset` restores them");
        }
    }
}

fn errno_context(e: nix::errno::Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The size of the terminal `fd` refers to; `None` if it is not a terminal.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    // SAFETY: winsize is plain old data.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a pointer to a winsize that outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) } < 0 {
        return None;
    }
    Some(WindowSize {
        cols: size.ws_col.into(),
        rows: size.ws_row.into(),
        pix_width: size.ws_xpixel.into(),
        pix_height: size.ws_ypixel.into(),
    })
}

/// Starts watching SIGINT, SIGTERM, SIGHUP and SIGQUIT, and with a `terminal`, SIGWINCH (its new
/// size); each becomes an [`Event`] on the receiver, until the receiver is dropped. From now
/// on those signals no longer end this process: they are the remote command's. Call it
/// inside the tokio runtime.
pub fn watch_signals(terminal: Option<OwnedFd>) -> io::Result<mpsc::Receiver<Event>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut winch = terminal.as_ref().map(|_| signal(SignalKind::window_change())).transpose()?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                Some(()) = recv_if(&mut winch) => {
                    match terminal.as_ref().and_then(|fd| window_size(fd.as_fd())) {
                        Some(size) => Event::Resize(size),
                        None => continue,
                    }
                }
                Some(()) = int.recv() => Event::Signal(Signal::SIGINT),
                Some(()) = term.recv() => Event::Signal(Signal::SIGTERM),
                Some(()) = hup.recv() => Event::Signal(Signal::SIGHUP),
                Some(()) = quit.recv() => Event::Signal(Signal::SIGQUIT),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

async fn recv_if(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::{openpty, Winsize};
    use nix::sys::termios::LocalFlags;

    fn request(command: Option<&[u8]>, cwd: Option<&[u8]>) -> ExecRequest {
        ExecRequest {
            command: command.map(<[u8]>::to_vec),
            cwd: cwd.map(<[u8]>::to_vec),
            ..Default::default()
        }
    }

    #[test]
    fn shell_words_are_single_quoted() {
        assert_eq!(shell_quote(b"plain"), b"'plain'");
        assert_eq!(shell_quote(b""), b"''");
        assert_eq!(shell_quote(b"it's $HOME"), b"'it'\\''s $HOME'");
        assert_eq!(shell_quote(b"\xff\n"), b"'\xff\n'");
    }

    #[test]
    fn cwd_wraps_the_command() {
        assert_eq!(request(Some(b"make -j4"), None).remote_command().unwrap(), b"make -j4");
        assert_eq!(request(None, None).remote_command(), None);
        assert_eq!(
            request(Some(b"echo 'a'; exit 3"), Some(b"/w/my dir")).remote_command().unwrap(),
            &b"CDPATH= cd -- '/w/my dir' && eval 'echo '\\''a'\\''; exit 3'"[..]
        );
        assert_eq!(
            request(None, Some(b"/w")).remote_command().unwrap(),
            &b"CDPATH= cd -- '/w' && exec \"$SHELL\" -l"[..]
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(ExitStatus::Code(0).code(), 0);
        assert_eq!(ExitStatus::Code(3).code(), 3);
        assert_eq!(ExitStatus::Code(4096).code(), 255);
        let term = ExitStatus::from_signal(&Sig::TERM, false);
        assert_eq!(term, ExitStatus::Signal { name: "TERM".into(), number: Some(15), core_dumped: false });
        assert_eq!(term.code(), 143);
        assert_eq!(ExitStatus::from_signal(&Sig::Custom("USR2".into()), false).code(), 128 + 12);
        let unknown = ExitStatus::from_signal(&Sig::Custom("SIG@openssh.com".into()), true);
        assert_eq!(unknown.code(), 255);
        assert_eq!(unknown.to_string(), "killed by signal SIG@openssh.com (core dumped)");
    }

    #[test]
    fn raw_mode_is_undone_on_drop() {
        let size = Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = openpty(&size, None).unwrap();
        let canonical =
            |fd: &OwnedFd| termios::tcgetattr(fd).unwrap().local_flags.contains(LocalFlags::ICANON);
        assert!(canonical(&pty.slave));
        let raw = RawMode::enter(pty.slave.as_fd()).unwrap();
        assert!(!canonical(&pty.slave));
        drop(raw);
        assert!(canonical(&pty.slave));
    }

    #[test]
    fn window_size_of_a_terminal_only() {
        let size = Winsize { ws_row: 30, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = openpty(&size, None).unwrap();
        let got = window_size(pty.slave.as_fd()).unwrap();
        assert_eq!((got.cols, got.rows), (100, 30));
        let file = tempfile::tempfile().unwrap();
        assert_eq!(window_size(file.as_fd()), None);
    }
}
