//! The sessions as the command line sees them: finding one (`--mount`, else the one named by
//! the manifest of `-m`, else the mount that holds the current directory, else the one named by
//! `./devmount.yml`, else the only one), the commands that talk to its daemon through
//! [`crate::control`] (`exec`, `ssh`, `sync`, `status`, `down`, `ssh-config`, `proxy`), and the
//! cleanup of a session whose daemon is gone (killed, crashed): its dead mount, socket and key
//! files.
//!
//! A session's daemon is reached only through its socket; a session without a live daemon is
//! never "found" silently: each command says so and, where it is the user's intent (`up`,
//! `down`, `status`), cleans up what it left.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::control::{self, ConnectError, DownEvent, Info};
use crate::exec::{self, ExecRequest, PtyRequest, RawMode, WindowSize};
use crate::manifest::Manifest;
use crate::mount::{self, Progress};
use crate::up::Spinner;

/// The size a pty gets when no local terminal says better.
const DEFAULT_SIZE: WindowSize = WindowSize { cols: 80, rows: 24, pix_width: 0, pix_height: 0 };

/// `path` made absolute and canonical, as far as it can be: a dead mount point cannot be
/// resolved itself (ENOTCONN), so it is found through its parent.
fn resolve(path: &Path) -> Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) => {
            let absolute =
                std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
            match (absolute.parent(), absolute.file_name()) {
                (Some(parent), Some(name)) if e.kind() != std::io::ErrorKind::NotFound => {
                    let parent = std::fs::canonicalize(parent)
                        .with_context(|| format!("cannot resolve {}", parent.display()))?;
                    Ok(parent.join(name))
                }
                _ => Err(e).with_context(|| format!("{}: no such mount point", path.display())),
            }
        }
    }
}

/// The session of the mount at `mountpoint`, whether or not it has an info file.
fn at(mountpoint: &Path) -> Result<Info> {
    let mountpoint = resolve(mountpoint)?;
    Ok(match control::info(&mountpoint)? {
        Some(info) => info,
        None => Info {
            socket: control::socket_path(&mountpoint)?,
            mountpoint,
            pid: None,
            name: None,
            server_dir: None,
        },
    })
}

/// Which session a command means, as its command line says.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// `--mount MNT`, or the command's MNT.
    pub mount: Option<PathBuf>,
    /// `-m FILE`: the manifest that names the session.
    pub manifest: Option<PathBuf>,
}

impl Selector {
    /// A command's MNT (or `--mount`) and `-m FILE`: at most one of them, since each names the
    /// session.
    pub fn new(mount: Option<PathBuf>, manifest: Option<PathBuf>) -> Result<Selector> {
        if mount.is_some() && manifest.is_some() {
            bail!("give the mount point or -m FILE, not both: each names the session");
        }
        Ok(Selector { mount, manifest })
    }
}

/// The session meant: `--mount`, else the one named by `-m FILE`, else the one whose mount
/// holds the current directory, else the one named by `./devmount.yml`, else the only one.
pub fn find(selector: &Selector) -> Result<Info> {
    if let Some(mount) = &selector.mount {
        return at(mount);
    }
    let all = control::sessions()?;
    if let Some(path) = &selector.manifest {
        return named(&all, &Manifest::load(path)?.name, Some(path));
    }
    if let Ok(cwd) = std::env::current_dir() {
        let holding = all
            .iter()
            .filter(|s| cwd.starts_with(&s.mountpoint))
            .max_by_key(|s| s.mountpoint.as_os_str().len());
        if let Some(session) = holding {
            return Ok(session.clone());
        }
        if let Some(manifest) = Manifest::find(&cwd)? {
            return named(&all, &manifest.name, Some(Path::new(crate::manifest::FILE_NAME)));
        }
    }
    match &all[..] {
        [only] => Ok(only.clone()),
        [] => bail!("no devmount session is running; start one with `devmount up MNT --local DIR`"),
        many => {
            let list: Vec<String> = many.iter().map(|s| s.mountpoint.display().to_string()).collect();
            bail!(
                "{} sessions are running ({}); say which with --mount MNT, or run this inside its mount",
                many.len(),
                list.join(", ")
            )
        }
    }
}

/// The session named `name` (by the manifest at `manifest`, if one named it).
fn named(all: &[Info], name: &str, manifest: Option<&Path>) -> Result<Info> {
    let found: Vec<&Info> = all.iter().filter(|s| s.name.as_deref() == Some(name)).collect();
    match found[..] {
        [one] => Ok(one.clone()),
        [] => {
            let running = if all.is_empty() {
                "none is running".to_owned()
            } else {
                let list: Vec<String> = all
                    .iter()
                    .map(|s| {
                        format!("{} at {}", s.name.as_deref().unwrap_or("(unnamed)"), s.mountpoint.display())
                    })
                    .collect();
                format!("running: {}", list.join(", "))
            };
            match manifest {
                Some(file) => bail!(
                    "no devmount session named {name} (the name in {}) is running ({running}); start it with `devmount up MNT -m {}`, or say which with --mount MNT",
                    file.display(),
                    file.display()
                ),
                None => bail!("no devmount session named {name} is running ({running})"),
            }
        }
        _ => {
            let list: Vec<String> = found.iter().map(|s| s.mountpoint.display().to_string()).collect();
            bail!(
                "{} sessions are named {name} ({}); say which with --mount MNT",
                found.len(),
                list.join(", ")
            )
        }
    }
}

/// Before `devmount up` starts a session named `name` at `mountpoint`: no other running
/// session may have that name, or `devmount proxy NAME` could not tell them apart.
pub fn check_name_free(name: &str, mountpoint: &Path) -> Result<()> {
    let taken = control::sessions()?.into_iter().find(|s| {
        s.name.as_deref() == Some(name)
            && s.mountpoint != mountpoint
            && std::os::unix::net::UnixStream::connect(&s.socket).is_ok()
    });
    if let Some(other) = taken {
        bail!(
            "a devmount session named {name} already runs at {}; give this one another name with --name NAME (or `name:` in its devmount.yml)",
            other.mountpoint.display()
        );
    }
    Ok(())
}

/// Whether the process `pid` runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may hold anything.
    let Some(close) = stat.iter().rposition(|&b| b == b')') else { return false };
    !matches!(stat.get(close + 2), Some(b'Z' | b'X') | None)
}

/// Takes away what a dead daemon left: its mount (detached lazily: programs inside see it
/// go), the local server's keys, the socket and the info file. Returns what was done, for a
/// message.
fn clean_up(session: &Info) -> Result<String> {
    if let Some(pid) = session.pid.filter(|&p| alive(p)) {
        bail!(
            "the devmount serving {} (pid {pid}) does not answer on its socket; stop it with `kill {pid}`",
            session.mountpoint.display()
        );
    }
    let mountpoint = &session.mountpoint;
    let mut done = Vec::new();
    if mount::is_mounted(mountpoint)? {
        mount::unmount(mountpoint);
        if mount::is_mounted(mountpoint)? {
            bail!(
                "cannot unmount the dead mount at {}; try `fusermount3 -u -z {}`",
                mountpoint.display(),
                mountpoint.display()
            );
        }
        done.push("unmounted it");
    }
    if let Some(dir) = &session.server_dir {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => done.push("removed its keys"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
    if session.socket.exists() || session.socket.with_extension("info").exists() {
        control::remove(mountpoint);
        done.push("removed its socket");
    }
    Ok(format!(
        "the session at {} had lost its daemon; {}. Changes it had not sent are kept and replayed by the next `devmount up` of the same directory",
        mountpoint.display(),
        if done.is_empty() { "nothing was left to clean up".to_owned() } else { done.join(", ") }
    ))
}

/// Before `devmount up MNT`: cleans up a dead session at MNT, with a message; a live one is
/// an error.
pub fn reap(mountpoint: &Path) -> Result<()> {
    let Ok(session) = at(mountpoint) else { return Ok(()) };
    let answers = || std::os::unix::net::UnixStream::connect(&session.socket).is_ok();
    // A killed daemon's main thread ends before its others, which keep the socket open for a
    // moment: give a dying daemon that moment.
    let dying = session.pid.is_some_and(|pid| !alive(pid));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while dying && answers() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if answers() {
        bail!(
            "a devmount session already serves {}; `devmount down {}` ends it",
            session.mountpoint.display(),
            session.mountpoint.display()
        );
    }
    let stale_mount = matches!(std::fs::metadata(&session.mountpoint), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
        && mount::is_devmount(&session.mountpoint)?;
    let has_files = session.socket.exists() || session.socket.with_extension("info").exists();
    if !stale_mount && !has_files {
        return Ok(());
    }
    eprintln!("devmount: {}", clean_up(&session)?);
    Ok(())
}

/// Whether a session at `mountpoint` left something behind: its info file, or its mount.
fn left_behind(mountpoint: &Path) -> bool {
    control::info(mountpoint).is_ok_and(|i| i.is_some()) || mount::is_devmount(mountpoint).unwrap_or(false)
}

/// A session's daemon could not be reached: a dead one is named as such, with the fix.
fn unreachable(e: ConnectError) -> anyhow::Error {
    match e {
        ConnectError::NotRunning(mountpoint) => {
            if left_behind(&mountpoint) {
                anyhow!(
                    "no devmount serves {} any more; `devmount down {}` cleans up after it",
                    mountpoint.display(),
                    mountpoint.display()
                )
            } else {
                anyhow!(
                    "no devmount session at {}; `devmount status` lists the sessions",
                    mountpoint.display()
                )
            }
        }
        other => other.into(),
    }
}

/// A failure to reach the daemon, explained; other errors as they are.
fn explained(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ConnectError>() {
        Ok(e) => unreachable(e),
        Err(e) => e,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `devmount sync [MNT]`.
pub fn sync(selector: &Selector) -> Result<()> {
    let session = find(selector)?;
    runtime()?.block_on(control::sync(&session)).map_err(explained)
}

/// `devmount ssh-config [MNT]`: the session's `Host` block for OpenSSH.
pub fn ssh_config(selector: &Selector) -> Result<()> {
    let session = find(selector)?;
    let config = runtime()?.block_on(control::ssh_config(&session)).map_err(explained)?;
    let devmount = std::env::current_exe().context("cannot find devmount's own executable")?;
    print(&config.block(&devmount, &session.mountpoint)?)
}

/// `devmount proxy NAME`: stdin and stdout carried to the SSH server of the session named
/// `name`, over the session's connection.
pub fn proxy(name: &str) -> Result<()> {
    let session = named(&control::sessions()?, name, None)?;
    crate::proxy::splice(control::proxy(&session).map_err(explained)?)
}

/// `devmount status`: every session (or the one `-m` names), dead ones cleaned up.
pub fn status(selector: &Selector) -> Result<()> {
    let all = match (&selector.mount, &selector.manifest) {
        (None, None) => control::sessions()?,
        _ => vec![find(selector)?],
    };
    if all.is_empty() {
        return print("no devmount sessions\n");
    }
    let runtime = runtime()?;
    let mut blocks = Vec::new();
    for session in all {
        let mountpoint = session.mountpoint.display();
        blocks.push(match runtime.block_on(control::status(&session)) {
            Ok(text) => text,
            Err(e) => match e.downcast::<ConnectError>() {
                Ok(ConnectError::NotRunning(_)) => {
                    match clean_up(&session) {
                        Ok(done) => eprintln!("devmount: {done}"),
                        Err(e) => eprintln!("devmount: {e:#}"),
                    }
                    format!("{mountpoint}\n  state:    daemon gone\n")
                }
                Ok(e) => format!("{mountpoint}\n  state:    {e}\n"),
                Err(e) => format!("{mountpoint}\n  state:    {e:#}\n"),
            },
        });
    }
    print(&blocks.join("\n"))
}

/// Writes `text` to stdout; a reader that stopped early (`| head`) is no failure.
fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

/// `devmount down [MNT]`: drains, unmounts and waits for the daemon to exit; after a dead
/// daemon, cleans up.
pub fn down(selector: &Selector, verbose: bool) -> Result<()> {
    let session = find(selector)?;
    // Our own working directory must not keep the mount busy.
    let _ = std::env::set_current_dir("/");
    let mut spinner = Spinner::new(verbose);
    let result = runtime()?.block_on(control::down(&session, |event| match event {
        DownEvent::Pending { ops, bytes } => {
            spinner.step(&format!("sending {ops} change(s), {}, to the server", control::human_bytes(bytes)))
        }
        DownEvent::Note(note) => spinner.note(&note),
        DownEvent::Unmounted => spinner.step("stopping the session"),
    }));
    spinner.finish();
    match result {
        Ok(()) => Ok(()),
        Err(e) => match e.downcast::<ConnectError>() {
            Ok(ConnectError::NotRunning(mountpoint)) if left_behind(&mountpoint) => {
                eprintln!("devmount: {}", clean_up(&session)?);
                Ok(())
            }
            Ok(e @ ConnectError::NotRunning(_)) => Err(unreachable(e)),
            Ok(e) => Err(anyhow::Error::from(e)),
            Err(e) => Err(e),
        },
    }
}

/// How `devmount exec` and `devmount ssh` run.
#[derive(Debug, Clone, Default)]
pub struct ExecArgs {
    pub selector: Selector,
    /// `-t` (true) or `-T` (false); by default a pty when stdin is a terminal.
    pub tty: Option<bool>,
    /// The words of the command, joined with spaces for the remote shell as ssh does; `None`
    /// runs a login shell.
    pub command: Option<Vec<OsString>>,
}

/// `devmount exec` and `devmount ssh`: returns the exit code (the command's, or 128 + signal).
pub fn exec(args: ExecArgs) -> Result<u8> {
    let session = find(&args.selector)?;
    let cwd = std::env::current_dir().ok().and_then(|cwd| {
        cwd.strip_prefix(&session.mountpoint).ok().map(|rel| rel.as_os_str().as_bytes().to_vec())
    });
    let stdin = std::io::stdin();
    let stdin_terminal = stdin.is_terminal();
    let pty = args.tty.unwrap_or(stdin_terminal);
    // The terminal whose size the remote one takes, and follows.
    let terminal: Option<OwnedFd> = if stdin_terminal {
        stdin.as_fd().try_clone_to_owned().ok()
    } else if std::io::stdout().is_terminal() {
        std::io::stdout().as_fd().try_clone_to_owned().ok()
    } else {
        None
    };
    let req = ExecRequest {
        command: args.command.map(|words| words.iter().map(|w| w.as_bytes()).collect::<Vec<_>>().join(&b' ')),
        cwd,
        env: locale(),
        pty: pty.then(|| PtyRequest {
            term: std::env::var("TERM").unwrap_or_else(|_| "dumb".into()),
            size: terminal.as_ref().and_then(|t| exec::window_size(t.as_fd())).unwrap_or(DEFAULT_SIZE),
        }),
    };
    let runtime = runtime()?;
    let raw = match (pty, stdin_terminal) {
        (true, true) => Some(RawMode::enter(stdin.as_fd()).context("cannot put the terminal in raw mode")?),
        _ => None,
    };
    let result = runtime.block_on(async {
        let events =
            exec::watch_signals(if pty { terminal } else { None }).context("cannot watch signals")?;
        control::exec(&session, req, events).await.map_err(explained)
    });
    // Before any error is printed: the terminal must be itself again.
    drop(raw);
    result
}

/// LANG and LC_*: what OpenSSH clients send by default, so the command speaks the user's
/// language.
fn locale() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| name == "LANG" || name.starts_with("LC_"))
        .collect();
    vars.sort();
    vars
}
