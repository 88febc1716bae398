//! Harness for the end-to-end tests: a real `devmount-server` on loopback, driven by OpenSSH's
//! own clients (`ssh`, `sftp`, `sshfs`) with keys made by `ssh-keygen`, and `devmount mount`
//! against it or against OpenSSH's own `sshd` ([`Sshd`]).
//!
//! Each test starts its own [`Server`] over a fresh temporary directory, so tests share nothing
//! and run in parallel. The directory on disk is the oracle: a test acts through SSH and checks
//! the result with plain `std::fs`. The user's `~/.ssh`, ssh config and agent are never used
//! (`-F /dev/null`, explicit identity and known-hosts files), and host keys are always checked.
//!
//! [`Relay`] puts `devmount-relay` (a round trip, and a link that can be blocked or cut) between a
//! client and a server; [`LocalUser`] runs the client as an ordinary local user.
//!
//! Every wait has a deadline; a process still running at its deadline is killed and the error
//! carries everything it printed. A mount made by a test is always unmounted when its guard
//! ([`DevMount`], [`Mount`]) drops. The server and client binaries are taken from the target
//! directory next to the test executable (`target/debug`), or from `DEVMOUNT_BIN_DIR`; build them
//! first with `cargo build --workspace --bins` (scripts/test does).

pub mod kube_api;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long an ordinary command may take on a loaded 2-core machine before it counts as hung.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server may take to print its two ready lines.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The SSH user name the clients send; the server ignores it.
const USER: &str = "devmount";
/// Where the server listens.
pub const HOST: &str = "127.0.0.1";
/// The environment variable that carries the host key when [`Options::host_key_in_env`] is set.
pub const HOST_KEY_ENV: &str = "DEVMOUNT_TEST_HOST_KEY";
/// Interval for conditions that have no event to block on (process exit, mount table, a port).
const POLL: Duration = Duration::from_millis(20);
/// How long output pipes may stay open after their process exited (a grandchild may hold them).
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// The directory holding the workspace's binaries: `DEVMOUNT_BIN_DIR`, else the parent of the
/// test executable's directory (`target/debug/deps/<test>` gives `target/debug`).
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DEVMOUNT_BIN_DIR") {
        return Ok(dir.into());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("{} has no grandparent directory", exe.display()))
}

/// The `devmount-server` binary, checked to exist.
pub fn server_bin() -> Result<PathBuf> {
    workspace_bin("devmount-server")
}

/// The `devmount` client binary, checked to exist.
pub fn client_bin() -> Result<PathBuf> {
    workspace_bin("devmount")
}

fn workspace_bin(name: &str) -> Result<PathBuf> {
    let bin = bin_dir()?.join(name);
    ensure!(
        bin.is_file(),
        "{} not found: build it with `cargo build --workspace --bins` (or set DEVMOUNT_BIN_DIR)",
        bin.display()
    );
    Ok(bin)
}

/// Settings every test command gets: git ignores the developer's git configuration.
const TEST_ENV: [(&str, &str); 9] = [
    ("GIT_CONFIG_NOSYSTEM", "1"),
    ("GIT_CONFIG_GLOBAL", "/dev/null"),
    ("GIT_AUTHOR_NAME", "devmount test"),
    ("GIT_AUTHOR_EMAIL", "test@devmount.invalid"),
    ("GIT_COMMITTER_NAME", "devmount test"),
    ("GIT_COMMITTER_EMAIL", "test@devmount.invalid"),
    // Files on the mount and in the oracle directory may be owned by the server's user.
    ("GIT_CONFIG_COUNT", "1"),
    ("GIT_CONFIG_KEY_0", "safe.directory"),
    ("GIT_CONFIG_VALUE_0", "*"),
];

/// A command whose environment cannot leak the developer's SSH agent or askpass helper, and
/// whose git ignores the developer's git configuration.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in ["SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "DISPLAY"] {
        cmd.env_remove(var);
    }
    cmd.envs(TEST_ENV).stdin(Stdio::null());
    cmd
}

/// `git -C dir`, with the isolated environment of [`command`].
pub fn git(dir: &Path) -> Command {
    let mut cmd = command("git");
    cmd.arg("-C").arg(dir);
    cmd
}

/// Generates an unencrypted ed25519 key pair at `path` and `path.pub`.
pub fn keygen(path: &Path) -> Result<()> {
    run_ok(
        command("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "devmount-test", "-f"]).arg(path),
    )?;
    Ok(())
}

/// The public half of an OpenSSH private key file as `TYPE BASE64`, derived with `ssh-keygen -y`.
fn public_key_of(private: &Path) -> Result<String> {
    let out = run_ok(command("ssh-keygen").arg("-y").arg("-f").arg(private))?;
    let text = out.stdout_text();
    let mut fields = text.split_whitespace();
    match (fields.next(), fields.next()) {
        (Some(kind), Some(blob)) => Ok(format!("{kind} {blob}")),
        _ => bail!("unexpected output of ssh-keygen -y -f {}: {text:?}", private.display()),
    }
}

/// Calls `attempt` until it succeeds or `timeout` passes; the error names `what` and carries the
/// last failure seen.
pub fn retry<T>(what: &str, timeout: Duration, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: still failing after {timeout:?}")))
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// The finished run of a command: how it ended and everything it printed.
pub struct Run {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout as text, for comparing with expected text (invalid UTF-8 shows as U+FFFD).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Shows the end of long output only: enough to see why a command failed.
fn tail(bytes: &[u8]) -> String {
    const MAX: usize = 4096;
    let start = bytes.len().saturating_sub(MAX);
    let skipped = if start > 0 { format!("[{start} bytes before this]\n") } else { String::new() };
    format!("{skipped}{}", String::from_utf8_lossy(&bytes[start..]))
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` ended with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

#[derive(Default)]
struct StreamState {
    bytes: Vec<u8>,
    closed: bool,
}

/// One output pipe, read to its end by a thread of its own so the child never blocks on a full
/// pipe; waiters are woken on every chunk.
#[derive(Default)]
struct Capture {
    state: Mutex<StreamState>,
    changed: Condvar,
}

impl Capture {
    fn start(mut pipe: impl Read + Send + 'static) -> Arc<Capture> {
        let capture = Arc::new(Capture::default());
        let shared = Arc::clone(&capture);
        thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                let mut state = shared.lock();
                if n == 0 {
                    state.closed = true;
                    shared.changed.notify_all();
                    return;
                }
                state.bytes.extend_from_slice(&buf[..n]);
                shared.changed.notify_all();
            }
        });
        capture
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        // A panicking waiter cannot leave the buffer half-written: keep using it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// Waits until `done(bytes, closed)` holds; false if `deadline` passes first.
    fn wait_until(&self, deadline: Instant, mut done: impl FnMut(&[u8], bool) -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if done(&state.bytes, state.closed) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// A running child process with captured stdout and stderr and a pipe to its stdin. Dropping
/// it kills the process if it is still running.
pub struct Proc {
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Capture>,
    stderr: Arc<Capture>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Proc> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let command = describe_command(cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting `{command}`"))?;
        let stdin = child.stdin.take();
        let stdout = Capture::start(child.stdout.take().expect("stdout is piped"));
        let stderr = Capture::start(child.stderr.take().expect("stderr is piped"));
        Ok(Proc { command, child, stdin, stdout, stderr, status: None })
    }

    pub fn command(&self) -> &str {
        &self.command
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("stdin of `{}` is closed", self.command))?;
        stdin
            .write_all(data)
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to `{}`", self.command))
    }

    /// Closes stdin, so the process reads end-of-file.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Hands stdin to the caller, e.g. to feed it from another thread.
    fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    pub fn stdout(&self) -> Vec<u8> {
        self.stdout.snapshot()
    }

    fn stderr(&self) -> Vec<u8> {
        self.stderr.snapshot()
    }

    /// Waits until stdout satisfies `ready`. Fails at the deadline, or as soon as stdout closes
    /// without satisfying it, with all output seen so far.
    pub fn wait_stdout(&self, what: &str, timeout: Duration, ready: impl FnMut(&[u8]) -> bool) -> Result<()> {
        self.wait_capture(&self.stdout, "stdout", what, timeout, ready)
    }

    /// Waits until stderr satisfies `ready`, as [`Proc::wait_stdout`] does for stdout.
    pub fn wait_stderr(&self, what: &str, timeout: Duration, ready: impl FnMut(&[u8]) -> bool) -> Result<()> {
        self.wait_capture(&self.stderr, "stderr", what, timeout, ready)
    }

    fn wait_capture(
        &self,
        capture: &Capture,
        stream: &str,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&[u8]) -> bool,
    ) -> Result<()> {
        let mut ok = false;
        let finished = capture.wait_until(Instant::now() + timeout, |bytes, closed| {
            ok = ready(bytes);
            ok || closed
        });
        ensure!(
            ok,
            "waiting for {what} on the {stream} of `{}`: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            if finished { format!("{stream} closed first") } else { "deadline passed".to_owned() },
            tail(&self.stdout()),
            tail(&self.stderr())
        );
        Ok(())
    }

    /// Sends `signal` unless the process has already been reaped (its pid may be reused then).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal} to `{}`", self.command))
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().with_context(|| format!("waiting for `{}`", self.command))?;
        }
        Ok(self.status)
    }

    /// Waits for the process to end. At the deadline it is killed, and the error carries its
    /// output.
    pub fn wait(&mut self, timeout: Duration) -> Result<Run> {
        let deadline = Instant::now() + timeout;
        while self.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                self.kill();
                bail!("`{}` still running after {timeout:?}; killed it\n{}", self.command, self.outputs());
            }
            thread::sleep(POLL);
        }
        Ok(self.finished())
    }

    /// Kills the process (if still running) and returns what it printed.
    pub fn kill(&mut self) -> Run {
        if self.status.is_none() {
            // Fails only if it already exited, which the wait below collects.
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.finished()
    }

    fn outputs(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", tail(&self.stdout()), tail(&self.stderr()))
    }

    fn finished(&mut self) -> Run {
        self.stdin = None;
        let deadline = Instant::now() + PIPE_GRACE;
        self.stdout.wait_until(deadline, |_, closed| closed);
        self.stderr.wait_until(deadline, |_, closed| closed);
        Run {
            command: self.command.clone(),
            status: self.status.expect("finished() is called after the process was reaped"),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }
}

/// Runs `cmd` with empty stdin and the default [`TIMEOUT`].
pub fn run(cmd: &mut Command) -> Result<Run> {
    run_with(cmd, &[], TIMEOUT)
}

/// Runs `cmd`, feeding it `stdin` from a thread (so a large input cannot deadlock against its
/// output), and waits for it with a deadline.
pub fn run_with(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Result<Run> {
    let mut proc = Proc::spawn(cmd)?;
    if let Some(mut pipe) = proc.take_stdin() {
        let input = stdin.to_vec();
        // A command that exits without reading all of its input makes this fail with EPIPE;
        // its exit status tells the test what happened.
        thread::spawn(move || pipe.write_all(&input));
    }
    proc.wait(timeout)
}

/// Runs `cmd` and fails unless it exits with status 0.
pub fn run_ok(cmd: &mut Command) -> Result<Run> {
    let out = run(cmd)?;
    ensure!(out.success(), "{out}");
    Ok(out)
}

/// Test options for the server's command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    allow_forward: Vec<u16>,
    allow_reverse: Vec<u16>,
    host_key_in_env: bool,
}

impl Options {
    pub fn new() -> Options {
        Options::default()
    }

    pub fn allow_forward(mut self, port: u16) -> Options {
        self.allow_forward.push(port);
        self
    }

    pub fn allow_reverse(mut self, port: u16) -> Options {
        self.allow_reverse.push(port);
        self
    }

    /// Pass the host key in [`HOST_KEY_ENV`] (`--host-key-env`) instead of a file.
    pub fn host_key_in_env(mut self) -> Options {
        self.host_key_in_env = true;
        self
    }
}

/// A running `devmount-server` over a fresh temporary directory, with a client key it accepts
/// and a known-hosts file pinning its host key.
///
/// Layout of the temporary directory: `root/` is `--root`; `keys/` holds the client key, the
/// authorized keys, the host key and known hosts; `local/` is the client side's working
/// directory; `mnt/` is where sshfs mounts. Only `root/` is served.
pub struct Server {
    proc: Proc,
    port: u16,
    fingerprint: String,
    root: PathBuf,
    local: PathBuf,
    keys: PathBuf,
    client_key: PathBuf,
    known_hosts: PathBuf,
    host_key: PathBuf,
    // Dropped last: the process is stopped before its directory goes.
    dir: TempDir,
}

impl Server {
    pub fn start() -> Result<Server> {
        Server::start_with(Options::new())
    }

    pub fn start_with(options: Options) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("devmount-e2e-")
            .tempdir()
            .context("creating the test directory")?;
        let base = dir.path().canonicalize().context("resolving the test directory")?;
        let (root, local, keys) = (base.join("root"), base.join("local"), base.join("keys"));
        for d in [&root, &local, &keys] {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }

        let client_key = keys.join("client");
        keygen(&client_key)?;
        let authorized = keys.join("authorized_keys");
        let client_pub =
            fs::read(client_key.with_extension("pub")).context("reading the client's public key")?;
        // A comment and a blank line, as real authorized_keys files have.
        let mut authorized_text = b"# devmount end-to-end test key\n\n".to_vec();
        authorized_text.extend_from_slice(&client_pub);
        fs::write(&authorized, authorized_text).context("writing authorized_keys")?;

        let host_key = keys.join("host_key");
        let mut cmd = command(server_bin()?);
        cmd.arg("--root").arg(&root).arg("--listen").arg(format!("{HOST}:0"));
        cmd.arg("--authorized-keys").arg(&authorized);
        if options.host_key_in_env {
            keygen(&host_key)?;
            let key = fs::read_to_string(&host_key).context("reading the generated host key")?;
            cmd.env(HOST_KEY_ENV, key).arg("--host-key-env").arg(HOST_KEY_ENV);
        } else {
            cmd.arg("--host-key").arg(&host_key);
        }
        for port in &options.allow_forward {
            cmd.arg("--allow-forward").arg(port.to_string());
        }
        for port in &options.allow_reverse {
            cmd.arg("--allow-reverse").arg(port.to_string());
        }

        let mut proc = Proc::spawn(&mut cmd)?;
        proc.close_stdin();
        let (port, fingerprint) = match wait_ready(&proc) {
            Ok(ready) => ready,
            Err(e) => {
                let ended = match proc.wait(Duration::from_secs(2)) {
                    Ok(run) => format!("it exited with {}", run.status),
                    Err(_) => "it was still running; killed it".to_string(),
                };
                return Err(e.context(format!("devmount-server did not become ready: {ended}")));
            }
        };

        let known_hosts = keys.join("known_hosts");
        let host_pub = public_key_of(&host_key)?;
        fs::write(&known_hosts, format!("[{HOST}]:{port} {host_pub}\n")).context("writing known_hosts")?;

        Ok(Server { proc, port, fingerprint, root, local, keys, client_key, known_hosts, host_key, dir })
    }

    /// The served directory, canonical: what `realpath .` must answer.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A local directory outside the root: the client's side of transfers.
    pub fn local(&self) -> &Path {
        &self.local
    }

    /// A directory outside the root for the test's own keys and files.
    pub fn keys(&self) -> &Path {
        &self.keys
    }

    /// The temporary directory holding root, local, keys and mount points.
    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A known_hosts file pinning this server's host key at `port` of [`HOST`]: for a client
    /// that reaches the server through a [`Relay`] listening there.
    pub fn known_hosts_for(&self, port: u16) -> Result<PathBuf> {
        let path = self.keys.join(format!("known_hosts-{port}"));
        let host_pub = public_key_of(&self.host_key)?;
        fs::write(&path, format!("[{HOST}]:{port} {host_pub}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The host key fingerprint the server printed (`SHA256:...`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn host_key(&self) -> &Path {
        &self.host_key
    }

    /// `USER@HOST`, the destination for ssh, sftp and sshfs.
    pub fn destination(&self) -> String {
        format!("{USER}@{HOST}")
    }

    /// `-o` settings shared by ssh, sftp and sshfs, identity excluded: the port, the pinned host
    /// key (strictly checked), no prompts.
    fn client_settings(&self) -> Vec<String> {
        vec![
            format!("Port={}", self.port),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=yes".into(),
            "BatchMode=yes".into(),
            "ConnectTimeout=20".into(),
        ]
    }

    /// Options for ssh and sftp: no user config, `key` only, the port, the pinned host key
    /// (strictly checked), no prompts.
    pub fn client_options_with_key(&self, key: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-F".into(), "/dev/null".into(), "-i".into(), key.into()];
        for setting in ["IdentitiesOnly=yes".to_string()].into_iter().chain(self.client_settings()) {
            args.push("-o".into());
            args.push(setting.into());
        }
        args
    }

    fn client_options(&self) -> Vec<OsString> {
        self.client_options_with_key(&self.client_key)
    }

    /// `ssh [extra] [options] USER@HOST [remote]`; an empty `remote` runs no command. `extra`
    /// comes first so that its `-o` settings win: ssh keeps the first value it reads.
    pub fn ssh(&self, extra: &[&str], remote: &str) -> Command {
        let mut cmd = command("ssh");
        cmd.args(extra).args(self.client_options()).arg(self.destination());
        if !remote.is_empty() {
            cmd.arg(remote);
        }
        cmd
    }

    /// `sftp [extra] [options] USER@HOST`, run in [`Server::local`]; `extra` settings win.
    pub fn sftp(&self, extra: &[&str]) -> Command {
        let mut cmd = command("sftp");
        cmd.args(extra).args(self.client_options()).arg(self.destination()).current_dir(&self.local);
        cmd
    }

    /// Runs `script` with `sftp -b` (which stops at the first failing command) in
    /// [`Server::local`].
    pub fn sftp_batch(&self, script: &[u8]) -> Result<Run> {
        let file = self.keys.join("batch");
        fs::write(&file, script).context("writing the sftp batch file")?;
        run(&mut self.sftp(&["-b", file.to_str().context("batch path is not UTF-8")?]))
    }

    /// Mounts the root with sshfs at `base/mnt`; unmounted when the guard drops.
    pub fn sshfs_mount(&self) -> Result<Mount> {
        let mnt = self.base().join("mnt");
        fs::create_dir_all(&mnt).context("creating the mount point")?;
        let mut settings =
            vec![format!("IdentityFile={}", self.client_key.display()), "IdentitiesOnly=yes".into()];
        settings.extend(self.client_settings());
        let mut cmd = command("sshfs");
        cmd.args(["-f", "-F", "/dev/null", "-o"]).arg(settings.join(","));
        cmd.arg(format!("{}:{}", self.destination(), self.root.display())).arg(&mnt);
        Mount::start(cmd, mnt)
    }

    /// What `devmount mount` needs to reach this server's root.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            user: USER.to_owned(),
            port: self.port,
            root: self.root.clone(),
            identity: self.client_key.clone(),
            known_hosts: self.known_hosts.clone(),
            scratch: self.keys.clone(),
        }
    }

    /// Mounts the root (or what `options` say) with `devmount mount`.
    pub fn mount(&self, options: MountOptions) -> Result<DevMount> {
        self.endpoint().mount(options)
    }

    /// Everything the server printed on stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.proc.stderr()).into_owned()
    }

    /// `run` followed by the server's log, for assertion messages.
    pub fn report(&self, run: &Run) -> String {
        format!("{run}\n--- server stderr ---\n{}", tail(self.log().as_bytes()))
    }

    /// Fails if the server process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.proc.try_wait()? {
            bail!("devmount-server exited with {status}\n--- server stderr ---\n{}", self.log());
        }
        Ok(())
    }

    /// Sends `signal` to the server (SIGSTOP and SIGCONT freeze and thaw it).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        self.proc.signal(signal)
    }

    /// Sends `signal` to the server and waits for it to exit.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Result<Run> {
        self.proc.signal(signal)?;
        self.proc.wait(timeout)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stop it gently so it can clean up, then for sure.
        if self.proc.signal(Signal::SIGTERM).is_ok() && self.proc.wait(Duration::from_secs(5)).is_ok() {
            return;
        }
        self.proc.kill();
    }
}

/// Waits for a server's `listening on ADDR:PORT` and `host key SHA256:...` lines and returns
/// the port and the fingerprint.
pub fn wait_ready(server: &Proc) -> Result<(u16, String)> {
    server.wait_stdout("`listening on` and `host key` lines", START_TIMEOUT, |out| {
        parse_ready(out).is_some()
    })?;
    Ok(parse_ready(&server.stdout()).expect("checked by wait_stdout"))
}

/// Finds the port and fingerprint in the server's complete stdout lines.
fn parse_ready(stdout: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(stdout);
    // The last piece has no newline yet and may be cut mid-line.
    let complete = &text[..text.rfind('\n')?];
    let mut port = None;
    let mut fingerprint = None;
    for line in complete.lines() {
        if let Some(addr) = line.strip_prefix("listening on ") {
            port = addr.trim().rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        } else if let Some(fp) = line.strip_prefix("host key ") {
            fingerprint = Some(fp.trim().to_string());
        }
    }
    Some((port?, fingerprint?))
}

/// An sshfs mount of a server's root, running in the foreground under this guard. Dropping it
/// unmounts (lazily if busy) and reaps sshfs.
pub struct Mount {
    path: PathBuf,
    proc: Proc,
    mounted: bool,
}

impl Mount {
    fn start(mut cmd: Command, path: PathBuf) -> Result<Mount> {
        let proc = Proc::spawn(&mut cmd)?;
        let mut mount = Mount { path, proc, mounted: false };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if is_mount_point(&mount.path)? {
                mount.mounted = true;
                return Ok(mount);
            }
            if let Some(status) = mount.proc.try_wait()? {
                bail!("sshfs exited with {status} before mounting\n{}", mount.proc.outputs());
            }
            if Instant::now() >= deadline {
                bail!(
                    "sshfs did not mount {} within {START_TIMEOUT:?}\n{}",
                    mount.path.display(),
                    mount.proc.outputs()
                );
            }
            thread::sleep(POLL);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and waits for sshfs to exit; the run shows what it printed.
    pub fn unmount(mut self) -> Result<Run> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<Run> {
        if self.mounted {
            let out = run(command("fusermount3").arg("-u").arg(&self.path))?;
            if !out.success() {
                // Busy (a test failed with a file open): detach it so the directory can go.
                run(command("fusermount3").arg("-u").arg("-z").arg(&self.path))?;
            }
            self.mounted = false;
        }
        self.proc.wait(Duration::from_secs(10))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted || self.proc.status.is_none() {
            // Errors here are already reported by the test that failed; the Proc guard kills
            // sshfs if the unmount did not end it.
            let _ = self.unmount_inner();
        }
    }
}

/// Whether `path` is a mount point, according to /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> Result<bool> {
    let info = fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let wanted = path.as_os_str().as_encoded_bytes();
    Ok(info.split(|&b| b == b'\n').any(|line| line.split(|&b| b == b' ').nth(4) == Some(wanted)))
}

/// A free TCP port on loopback, for a listener some other process will open.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((HOST, 0)).context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// A TCP echo server on loopback: each connection gets back what it sends, and the server
/// closes its side when the client does.
pub struct EchoServer {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start() -> Result<EchoServer> {
        let listener = TcpListener::bind((HOST, 0)).context("binding the echo server")?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&connections), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || echo(conn));
            }
        });
        Ok(EchoServer { port, connections, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect((HOST, self.port));
    }
}

/// Connects to `port`, sends `message`, closes the sending side and reads until the peer
/// closes: the whole echo of `message` through whatever relays the port.
pub fn echo_roundtrip(port: u16, message: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let conn = TcpStream::connect((HOST, port)).with_context(|| format!("connecting to {HOST}:{port}"))?;
    roundtrip(conn, message, timeout)
}

/// Sends `message` on `conn`, closes the sending side and reads until the peer closes.
pub fn roundtrip(mut conn: TcpStream, message: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    conn.write_all(message).context("sending")?;
    conn.shutdown(Shutdown::Write).context("closing the sending side")?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).context("reading the reply")?;
    Ok(reply)
}

/// Creates `path` with `contents` and exactly `mode`, whatever the umask.
pub fn write_file_mode(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// The permission bits of `path` (not following a final symlink).
pub fn mode_of(path: &Path) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?.mode() & 0o7777)
}

/// How long `devmount mount` may take to connect and mount, and its daemon to exit once
/// unmounted, on a loaded machine.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// What `devmount mount` needs to reach a test server: the SSH user, the port on [`HOST`], the
/// served directory, a key the server accepts and a known_hosts file pinning its host key.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub user: String,
    pub port: u16,
    /// The directory the tests look at directly, canonical.
    pub root: PathBuf,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    /// A directory outside `root` for mount points and the client's state, sockets and logs.
    pub scratch: PathBuf,
}

/// What to change in a `devmount mount` command line; the default mounts the endpoint's root
/// at `scratch/mnt` with the endpoint's key and known_hosts, in the background.
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    foreground: bool,
    timeout: Option<f64>,
    data_cache: Option<u64>,
    mountpoint: Option<PathBuf>,
    remote_path: Option<PathBuf>,
    target: Option<OsString>,
    port: Option<u16>,
    identity: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    journal_max: Option<u64>,
    user: Option<LocalUser>,
}

impl MountOptions {
    pub fn new() -> MountOptions {
        MountOptions::default()
    }

    /// `--foreground`: the guard holds the serving process itself.
    pub fn foreground(mut self) -> MountOptions {
        self.foreground = true;
        self
    }

    /// `--timeout SECONDS`.
    pub fn timeout(mut self, seconds: f64) -> MountOptions {
        self.timeout = Some(seconds);
        self
    }

    /// `--data-cache BYTES`.
    pub fn data_cache(mut self, bytes: u64) -> MountOptions {
        self.data_cache = Some(bytes);
        self
    }

    /// Mount here instead of `scratch/mnt`; the path is used as given, not created.
    pub fn mountpoint(mut self, path: impl Into<PathBuf>) -> MountOptions {
        self.mountpoint = Some(path.into());
        self
    }

    /// Mount this absolute path of the server instead of the root.
    pub fn remote_path(mut self, path: impl Into<PathBuf>) -> MountOptions {
        self.remote_path = Some(path.into());
        self
    }

    /// The whole target argument, as given (e.g. not an ssh:// URL).
    pub fn target(mut self, target: impl Into<OsString>) -> MountOptions {
        self.target = Some(target.into());
        self
    }

    /// Connect to this port of [`HOST`] instead of the server's.
    pub fn port(mut self, port: u16) -> MountOptions {
        self.port = Some(port);
        self
    }

    pub fn identity(mut self, path: impl Into<PathBuf>) -> MountOptions {
        self.identity = Some(path.into());
        self
    }

    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> MountOptions {
        self.known_hosts = Some(path.into());
        self
    }

    /// `--journal-max BYTES`.
    pub fn journal_max(mut self, bytes: u64) -> MountOptions {
        self.journal_max = Some(bytes);
        self
    }

    /// Runs `devmount mount` as `user` ([`LocalUser::command`]), with the user's own state
    /// directory (no `XDG_*` variables). The mount point must be given and be the user's, and
    /// the key and known_hosts files readable by the user.
    pub fn as_user(mut self, user: &LocalUser) -> MountOptions {
        self.user = Some(user.clone());
        self
    }
}

/// Numbers the log files of the `devmount mount` runs of this test process.
static MOUNT_RUNS: AtomicUsize = AtomicUsize::new(0);

impl Endpoint {
    /// `ssh://USER@HOST:PORT/PATH` for the absolute server path `path`, byte for byte.
    pub fn url(&self, path: &Path) -> OsString {
        self.url_with_port(self.port, path)
    }

    fn url_with_port(&self, port: u16, path: &Path) -> OsString {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let mut url = format!("ssh://{}@{HOST}:{port}", self.user).into_bytes();
        url.extend_from_slice(path.as_os_str().as_bytes());
        OsString::from_vec(url)
    }

    /// `XDG_STATE_HOME` of the mounts: the client keeps its state in `devmount/` under it.
    pub fn state_home(&self) -> PathBuf {
        self.scratch.join("state")
    }

    /// The default mount point, created if missing (and left alone if it holds a mount, even a
    /// dead one).
    pub fn default_mountpoint(&self) -> Result<PathBuf> {
        let mnt = self.scratch.join("mnt");
        match fs::create_dir(&mnt) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                Err(e).with_context(|| format!("creating {}", mnt.display()))
            }
            _ => Ok(mnt),
        }
    }

    /// The `devmount` client with this endpoint's environment: its state (journal, logs) and
    /// control sockets stay in the test's directory, so `devmount sync` finds the mounts made
    /// with [`Endpoint::mount`].
    pub fn client(&self) -> Result<Command> {
        let mut cmd = command(client_bin()?);
        let runtime = self.scratch.join("run");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&runtime)
            .with_context(|| format!("creating {}", runtime.display()))?;
        cmd.env("XDG_STATE_HOME", self.state_home()).env("XDG_RUNTIME_DIR", &runtime);
        if std::env::var_os("DEVMOUNT_LOG").is_none() {
            // The daemon's reconnects and the journal's pauses, for failure messages.
            cmd.env("DEVMOUNT_LOG", "info,fuser=error");
        }
        Ok(cmd)
    }

    /// `devmount sync MOUNTPOINT`, which must succeed: every change made to the mount before
    /// the call is on the server when it returns.
    pub fn sync(&self, mountpoint: &Path) -> Result<Run> {
        // Long: a sync after a GiB of writes drains the whole journal first.
        let out = run_with(self.client()?.arg("sync").arg(mountpoint), &[], Duration::from_secs(600))
            .map_err(|e| e.context(self.status()))?;
        ensure!(out.success(), "{out}\n{}", self.status());
        Ok(out)
    }

    /// `devmount status` of this endpoint's sessions, for failure messages.
    fn status(&self) -> String {
        let status =
            self.client().and_then(|mut cmd| run_with(cmd.arg("status"), &[], Duration::from_secs(30)));
        match status {
            Ok(run) => format!("--- devmount status ---\n{run}"),
            Err(e) => format!("--- devmount status failed: {e:#}"),
        }
    }

    /// The `devmount mount` command line for `options`, and its mount point.
    pub fn mount_command(&self, options: &MountOptions) -> Result<(Command, PathBuf)> {
        let mountpoint = match (&options.mountpoint, &options.user) {
            (Some(path), _) => path.clone(),
            (None, None) => self.default_mountpoint()?,
            (None, Some(user)) => bail!("a mount as {} needs a mount point of that user's", user.name),
        };
        let target = match &options.target {
            Some(target) => target.clone(),
            None => self.url_with_port(
                options.port.unwrap_or(self.port),
                options.remote_path.as_deref().unwrap_or(&self.root),
            ),
        };
        let mut cmd = match &options.user {
            Some(user) => user.command(user.reachable_bin(&client_bin()?)?),
            None => self.client()?,
        };
        cmd.arg("mount").arg(target).arg(&mountpoint);
        cmd.arg("--identity").arg(options.identity.as_deref().unwrap_or(&self.identity));
        cmd.arg("--known-hosts").arg(options.known_hosts.as_deref().unwrap_or(&self.known_hosts));
        if options.foreground {
            cmd.arg("--foreground");
        }
        if let Some(seconds) = options.timeout {
            cmd.arg("--timeout").arg(seconds.to_string());
        }
        if let Some(bytes) = options.data_cache {
            cmd.arg("--data-cache").arg(bytes.to_string());
        }
        if let Some(bytes) = options.journal_max {
            cmd.arg("--journal-max").arg(bytes.to_string());
        }
        Ok((cmd, mountpoint))
    }

    /// Runs `devmount mount` and returns once the mount is ready; the guard unmounts on drop.
    pub fn mount(&self, options: MountOptions) -> Result<DevMount> {
        let (cmd, mountpoint) = self.mount_command(&options)?;
        if options.foreground {
            DevMount::start_foreground(cmd, mountpoint)
        } else {
            let bin = match &options.user {
                Some(user) => user.reachable_bin(&client_bin()?)?,
                None => client_bin()?,
            };
            let (run, log) = self.run_mount(cmd)?;
            ensure!(run.success(), "{run}");
            DevMount::adopt_daemon(&bin, mountpoint, log).with_context(|| run.to_string())
        }
    }

    /// Runs `devmount mount` in the background mode when it is expected to fail, and returns how
    /// it ended. Should it mount after all, the mount is taken down and that is the error.
    pub fn mount_fails(&self, options: MountOptions) -> Result<Run> {
        ensure!(!options.foreground, "mount_fails runs the background mode only");
        let (cmd, mountpoint) = self.mount_command(&options)?;
        let bin = client_bin()?;
        let (run, log) = self.run_mount(cmd)?;
        if run.success() {
            let mount = DevMount::adopt_daemon(&bin, mountpoint, log);
            drop(mount);
            bail!("devmount mount succeeded where it should have failed\n{run}");
        }
        Ok(run)
    }

    /// Runs the background mode with stdout and stderr in files, not pipes: should the daemon
    /// keep what it inherited, pipes would stay open as long as the mount. Returns the run and
    /// the file the daemon logs to if it keeps its inherited stderr.
    fn run_mount(&self, mut cmd: Command) -> Result<(Run, PathBuf)> {
        let n = MOUNT_RUNS.fetch_add(1, Ordering::SeqCst);
        let out_path = self.scratch.join(format!("mount-{n}.out"));
        let err_path = self.scratch.join(format!("mount-{n}.err"));
        let out = fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
        let err = fs::File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let command = describe_command(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting `{command}`"))?;
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{command}`"))? {
                break status;
            }
            if Instant::now() >= deadline {
                // Fails only if it has just exited; the wait collects it either way.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{command}` still running after {MOUNT_TIMEOUT:?}; killed it\n--- stderr ---\n{}",
                    tail(&fs::read(&err_path).unwrap_or_default())
                );
            }
            thread::sleep(POLL);
        };
        let stdout = fs::read(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
        let stderr = fs::read(&err_path).with_context(|| format!("reading {}", err_path.display()))?;
        Ok((Run { command, status, stdout, stderr }, err_path))
    }
}

/// The process serving a [`DevMount`].
enum Daemon {
    /// `--foreground`: our own child.
    Foreground(Proc),
    /// The daemon `devmount mount` forked, found by its command line; it is not our child, so
    /// its end is seen in /proc, and `log` is the file its stderr goes to (the one it inherited,
    /// or its own log file).
    Background { pid: i32, log: PathBuf },
}

/// A `devmount mount` of a test server. Dropping it unmounts (`fusermount3 -u`, lazily if busy)
/// and waits for the daemon to exit, killing it if it does not.
pub struct DevMount {
    path: PathBuf,
    daemon: Daemon,
}

impl DevMount {
    fn start_foreground(mut cmd: Command, mountpoint: PathBuf) -> Result<DevMount> {
        let proc = Proc::spawn(&mut cmd)?;
        let path = canonical_mountpoint(&mountpoint)?;
        let mut mount = DevMount { path, daemon: Daemon::Foreground(proc) };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_mount_point(&mount.path)? {
                return Ok(mount);
            }
            if !mount.is_running()? {
                bail!("`devmount mount --foreground` exited before mounting\n{}", mount.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "`devmount mount --foreground` did not mount within {MOUNT_TIMEOUT:?}\n{}",
                    mount.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Takes charge of the mount a successful background `devmount mount` (the program `bin`)
    /// left at `mountpoint`.
    fn adopt_daemon(bin: &Path, mountpoint: PathBuf, log: PathBuf) -> Result<DevMount> {
        let path = canonical_mountpoint(&mountpoint)?;
        let pid = find_daemon(bin, "mount", mountpoint.as_os_str());
        // Even without its daemon, a mount must not outlive the test.
        let mounted = is_mount_point(&path)?;
        let pid = match pid {
            Ok(pid) => pid,
            Err(e) => {
                if mounted {
                    force_unmount(&path);
                }
                return Err(e);
            }
        };
        // A daemon that detached from the caller's stderr logs to a file of its own.
        let log = match fs::read_link(format!("/proc/{pid}/fd/2")) {
            Ok(own) if own.is_absolute() && own.is_file() => own,
            _ => log,
        };
        let mount = DevMount { path, daemon: Daemon::Background { pid, log } };
        ensure!(
            mounted,
            "devmount mount returned, but {} is not a mount point\n{}",
            mount.path.display(),
            mount.log()
        );
        Ok(mount)
    }

    /// The mount point, canonical.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The serving process.
    pub fn pid(&self) -> i32 {
        match &self.daemon {
            Daemon::Foreground(proc) => proc.child.id() as i32,
            Daemon::Background { pid, .. } => *pid,
        }
    }

    /// Whether the serving process is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        match &mut self.daemon {
            Daemon::Foreground(proc) => Ok(proc.try_wait()?.is_none()),
            Daemon::Background { pid, .. } => Ok(process_alive(*pid)),
        }
    }

    /// Sends `signal` to the serving process, if it is still running.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if !self.is_running()? {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid()), signal)
            .with_context(|| format!("sending {signal} to pid {}", self.pid()))
    }

    /// Waits for the serving process to exit and returns how long that took.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while self.is_running()? {
            if start.elapsed() >= timeout {
                bail!(
                    "the devmount daemon (pid {}) still runs after {timeout:?}\n{}",
                    self.pid(),
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
        Ok(start.elapsed())
    }

    /// What the serving process printed on stderr so far.
    pub fn log(&self) -> String {
        match &self.daemon {
            Daemon::Foreground(proc) => proc.outputs(),
            Daemon::Background { log, .. } => {
                format!("--- devmount stderr ---\n{}", tail(&fs::read(log).unwrap_or_default()))
            }
        }
    }

    /// `fusermount3 -u`, then waits for the daemon to exit; returns the time from the start of
    /// the unmount to the daemon's exit.
    pub fn unmount(self) -> Result<Duration> {
        let mut cmd = command("fusermount3");
        cmd.arg("-u").arg(&self.path);
        self.unmount_with(&mut cmd)
    }

    /// Unmounts with `cmd` (which must succeed and detach the mount), then waits for the daemon
    /// to exit; returns the time from the start of `cmd` to the daemon's exit.
    pub fn unmount_with(mut self, cmd: &mut Command) -> Result<Duration> {
        let start = Instant::now();
        // Any process that walks into the mount at that moment (GNU df stats every mount point
        // to find its argument's) makes it busy for as long as the daemon takes to answer.
        let out = retry("unmounting", MOUNT_TIMEOUT, || {
            let out = run(cmd)?;
            ensure!(out.success() || !out.stderr_text().contains("busy"), "{out}");
            Ok(out)
        })?;
        ensure!(out.success(), "{out}\n{}", self.log());
        ensure!(
            !is_mount_point(&self.path)?,
            "{} is still mounted after `{}`",
            self.path.display(),
            out.command
        );
        self.wait_exit(MOUNT_TIMEOUT)?;
        Ok(start.elapsed())
    }
}

impl Drop for DevMount {
    fn drop(&mut self) {
        if is_mount_point(&self.path).unwrap_or(true) {
            force_unmount(&self.path);
        }
        if self.wait_exit(MOUNT_TIMEOUT).is_err() {
            // It is ours: started by this test for this mount.
            let _ = self.signal(Signal::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(5));
        }
    }
}

fn canonical(path: &Path) -> Result<PathBuf> {
    fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))
}

/// The canonical path of a mount point. No other user, root included, may stat a FUSE mount
/// that is not mounted with `allow_other`; then the mount point is found through its parent.
fn canonical_mountpoint(path: &Path) -> Result<PathBuf> {
    let denied = match fs::canonicalize(path) {
        Ok(path) => return Ok(path),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => e,
        Err(e) => return Err(e).with_context(|| format!("resolving {}", path.display())),
    };
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            Ok(canonical(parent)?.join(name))
        }
        _ => Err(denied).with_context(|| format!("resolving {}", path.display())),
    }
}

/// `fusermount3 -u`, and `-u -z` if that fails (busy after a failed test, or a dead daemon).
fn force_unmount(path: &Path) {
    let ok = run(command("fusermount3").arg("-u").arg(path)).is_ok_and(|out| out.success());
    if !ok {
        // Nothing more to do if this fails too: the error would hide the test's own.
        let _ = run(command("fusermount3").arg("-u").arg("-z").arg(path));
    }
}

/// Whether `pid` runs (a zombie has ended: nobody may reap a daemon whose parent exited).
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may contain anything.
    let Some(close) = stat.iter().rposition(|&b| b == b')') else { return false };
    !matches!(stat.get(close + 2), Some(b'Z' | b'X') | None)
}

/// The pid of the running `BIN SUBCOMMAND ... MOUNTPOINT ...` process: the daemon a background
/// `devmount mount` or `devmount up` forked, which keeps its command line.
pub fn find_daemon(bin: &Path, subcommand: &str, mountpoint: &OsStr) -> Result<i32> {
    let bin = bin.as_os_str().as_encoded_bytes();
    let mountpoint = mountpoint.as_encoded_bytes();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        // Processes come and go while we look.
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first() == Some(&bin)
            && args.get(1) == Some(&subcommand.as_bytes())
            && args.contains(&mountpoint)
            && process_alive(pid)
        {
            found.push((pid, parent_pid(pid)));
        }
    }
    // The daemon's watchdog is a child with the same command line.
    let pids: Vec<i32> = found.iter().map(|&(pid, _)| pid).collect();
    let found: Vec<i32> = found
        .iter()
        .filter(|(_, parent)| !parent.is_some_and(|p| pids.contains(&p)))
        .map(|&(pid, _)| pid)
        .collect();
    match found[..] {
        [pid] => Ok(pid),
        [] => bail!("no devmount daemon for {} is running", String::from_utf8_lossy(mountpoint)),
        _ => bail!("several devmount daemons for {}: {found:?}", String::from_utf8_lossy(mountpoint)),
    }
}

/// The parent of `pid`, from /proc/PID/stat (after the parenthesised name, the state, then it).
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The local user's name: the user OpenSSH's sshd must log in as.
fn local_user_name() -> Result<String> {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid).context("looking up the local user")?;
    Ok(user.ok_or_else(|| anyhow!("uid {uid} has no user name"))?.name)
}

/// OpenSSH's `sshd` on a free port of loopback with its own configuration and host key,
/// accepting one generated client key for the local user, with its `sftp-server` program (a
/// process of its own per session, as OpenSSH installs it; `internal-sftp` where it is
/// missing). Its temporary directory is laid out as [`Server`]'s: `root/` (served, by path),
/// `keys/`.
pub struct Sshd {
    proc: Proc,
    endpoint: Endpoint,
    // Dropped last: the process is stopped before its directory goes.
    _dir: TempDir,
}

const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

impl Sshd {
    pub fn start() -> Result<Sshd> {
        ensure!(Path::new(SSHD).is_file(), "{SSHD} not found: install openssh-server (scripts/setup does)");
        let dir = tempfile::Builder::new()
            .prefix("devmount-sshd-")
            .tempdir()
            .context("creating the test directory")?;
        let base = dir.path().canonicalize().context("resolving the test directory")?;
        let (root, keys) = (base.join("root"), base.join("keys"));
        for d in [&root, &keys] {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let client_key = keys.join("client");
        keygen(&client_key)?;
        let authorized = keys.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).context("writing authorized_keys")?;
        let host_key = keys.join("host_key");
        keygen(&host_key)?;
        if nix::unistd::geteuid().is_root() {
            // sshd refuses to start without its privilege separation directory.
            fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        }

        // The port is free when probed but may be taken before sshd binds it: try again then.
        let mut attempt = 0;
        let (proc, port) = loop {
            attempt += 1;
            let port = free_port()?;
            let config = keys.join("sshd_config");
            let subsystem = if Path::new(SFTP_SERVER).is_file() { SFTP_SERVER } else { "internal-sftp" };
            let text = format!(
                "ListenAddress {HOST}:{port}\n\
                 HostKey {}\n\
                 AuthorizedKeysFile {}\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PidFile {}\n\
                 Subsystem sftp {subsystem}\n",
                host_key.display(),
                authorized.display(),
                keys.join("sshd.pid").display()
            );
            fs::write(&config, text).context("writing sshd_config")?;
            let mut proc = Proc::spawn(command(SSHD).arg("-D").arg("-e").arg("-f").arg(&config))?;
            proc.close_stdin();
            let listening = format!("Server listening on {HOST} port {port}");
            match proc.wait_stderr(&listening, START_TIMEOUT, |err| {
                String::from_utf8_lossy(err).contains(&listening)
            }) {
                Ok(()) => break (proc, port),
                Err(e) => {
                    let run = proc.kill();
                    if attempt < 3 && run.stderr_text().contains("Address already in use") {
                        continue;
                    }
                    return Err(e.context("sshd did not start"));
                }
            }
        };

        let known_hosts = keys.join("known_hosts");
        let host_pub = public_key_of(&host_key)?;
        fs::write(&known_hosts, format!("[{HOST}]:{port} {host_pub}\n")).context("writing known_hosts")?;
        let endpoint = Endpoint {
            user: local_user_name()?,
            port,
            root,
            identity: client_key,
            known_hosts,
            scratch: keys,
        };
        Ok(Sshd { proc, endpoint, _dir: dir })
    }

    /// The directory the tests mount, canonical.
    pub fn root(&self) -> &Path {
        &self.endpoint.root
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Mounts the root (or what `options` say) with `devmount mount`.
    pub fn mount(&self, options: MountOptions) -> Result<DevMount> {
        self.endpoint.mount(options)
    }

    /// Everything sshd printed so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.proc.stderr()).into_owned()
    }

    /// The `sftp-server` processes serving this sshd's sessions.
    pub fn sftp_servers(&self) -> Vec<i32> {
        descendants(self.proc.child.id() as i32)
            .into_iter()
            .filter(|&pid| comm(pid).as_deref() == Some("sftp-server"))
            .collect()
    }
}

/// The value of `key` in an ssh config block (`devmount ssh-config`), unquoted.
pub fn ssh_config_value<'t>(block: &'t str, key: &str) -> Option<&'t str> {
    block
        .lines()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix(' '))
        .map(|value| value.trim_matches('"'))
}

/// Every process below `root` (its children, theirs, ...).
fn descendants(root: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, parent_pid(pid)?)))
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|&&(_, p)| p == parent).map(|&(pid, _)| pid));
        i += 1;
    }
    found.split_off(1)
}

/// A process's command name (`/proc/PID/comm`).
fn comm(pid: i32) -> Option<String> {
    Some(fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim_end().to_owned())
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if self.proc.signal(Signal::SIGTERM).is_ok() && self.proc.wait(Duration::from_secs(5)).is_ok() {
            return;
        }
        self.proc.kill();
    }
}

/// `devmount-relay` in front of a port of [`HOST`]: adds a round trip, and can be blocked and
/// cut on command ([`Relay::command`]). Killed when dropped.
pub struct Relay {
    port: u16,
    proc: Proc,
    /// Lines of stdout already read: `listening on` and one answer per command.
    lines: usize,
}

impl Relay {
    /// Starts a relay to port `to` of [`HOST`] that adds `rtt_ms` of round trip.
    pub fn start(to: u16, rtt_ms: u64) -> Result<Relay> {
        let mut cmd = command(workspace_bin("devmount-relay")?);
        cmd.args(["--listen", &format!("{HOST}:0"), "--to", &format!("{HOST}:{to}")]);
        cmd.args(["--rtt-ms", &rtt_ms.to_string()]);
        let proc = Proc::spawn(&mut cmd)?;
        proc.wait_stdout("`listening on`", START_TIMEOUT, |out| out.contains(&b'\n'))?;
        let first = proc.stdout();
        let port = String::from_utf8_lossy(&first)
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("listening on "))
            .and_then(|addr| addr.trim().rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .ok_or_else(|| anyhow!("no port in the first line of `{}`: {first:?}", proc.command()))?;
        Ok(Relay { port, proc, lines: 1 })
    }

    /// The port the relay listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends `line` (`block`, `unblock`, `cut`, `status`) and returns the relay's one-line
    /// answer, which must start with `ok`.
    pub fn command(&mut self, line: &str) -> Result<String> {
        self.proc.write(format!("{line}\n").as_bytes())?;
        let seen = self.lines;
        self.proc.wait_stdout(&format!("the answer to `{line}`"), TIMEOUT, |out| {
            out.iter().filter(|&&b| b == b'\n').count() > seen
        })?;
        self.lines += 1;
        let out = self.proc.stdout();
        let answer = String::from_utf8_lossy(&out).lines().nth(seen).unwrap_or_default().to_owned();
        ensure!(answer.starts_with("ok"), "devmount-relay answered `{line}` with {answer:?}");
        Ok(answer)
    }
}

/// A local user other than root, to run the client as an ordinary user does: the mount goes
/// through the setuid `fusermount3`, and the state lives in the user's home.
#[derive(Debug, Clone)]
pub struct LocalUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl LocalUser {
    /// The user `name`, made with `useradd -m` if missing (which needs root).
    pub fn ensure(name: &str) -> Result<LocalUser> {
        if let Some(user) = LocalUser::lookup(name)? {
            return Ok(user);
        }
        ensure!(nix::unistd::geteuid().is_root(), "user {name} does not exist, and only root can add it");
        let out = run(command("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--comment", "devmount end-to-end tests"])
            .arg(name))?;
        // 9: another test process added it meanwhile.
        ensure!(out.success() || out.code() == Some(9), "{out}");
        LocalUser::lookup(name)?.ok_or_else(|| anyhow!("user {name} is missing right after useradd"))
    }

    fn lookup(name: &str) -> Result<Option<LocalUser>> {
        let user = nix::unistd::User::from_name(name).with_context(|| format!("looking up user {name}"))?;
        Ok(user.map(|u| LocalUser { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), home: u.dir }))
    }

    /// `program` run as this user with the user's groups, in the user's home, with an
    /// environment as a login gives it (HOME, USER, LOGNAME, PATH) plus [`command`]'s settings.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(program)
            .env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(TEST_ENV)
            .current_dir(&self.home)
            .stdin(Stdio::null());
        cmd
    }

    /// Hands `path` to this user.
    pub fn chown(&self, path: &Path) -> Result<()> {
        let (uid, gid) = (nix::unistd::Uid::from_raw(self.uid), nix::unistd::Gid::from_raw(self.gid));
        nix::unistd::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {} {}", self.name, path.display()))
    }

    /// A fresh directory in the user's home, the user's own (mode 0700); removed when dropped.
    pub fn tempdir(&self, prefix: &str) -> Result<TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.home)
            .with_context(|| format!("creating a directory in {}", self.home.display()))?;
        self.chown(dir.path())?;
        Ok(dir)
    }

    /// Whether the user may run `path`: every directory above it must let the user through.
    pub fn can_execute(&self, path: &Path) -> Result<bool> {
        Ok(run(self.command("test").arg("-x").arg(path))?.success())
    }

    /// `bin` if the user may run it, else a copy in the user's `~/.cache/devmount-tests/`,
    /// refreshed when `bin` is newer (a build tree under root's home is out of reach).
    pub fn reachable_bin(&self, bin: &Path) -> Result<PathBuf> {
        if self.can_execute(bin)? {
            return Ok(bin.to_path_buf());
        }
        let name = bin.file_name().ok_or_else(|| anyhow!("{} names no file", bin.display()))?;
        let dir = self.home.join(".cache/devmount-tests");
        let copy = dir.join(name);
        let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        if modified(&copy).is_some() && modified(&copy) >= modified(bin) {
            return Ok(copy);
        }
        for d in [self.home.join(".cache"), dir.clone()] {
            match fs::create_dir(&d) {
                Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                    return Err(e).with_context(|| format!("creating {}", d.display()))
                }
                _ => self.chown(&d)?,
            }
        }
        // Copied aside and renamed into place: a daemon may still run the old copy.
        let partial = dir.join(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
        fs::copy(bin, &partial)
            .with_context(|| format!("copying {} to {}", bin.display(), partial.display()))?;
        self.chown(&partial)?;
        fs::rename(&partial, &copy).with_context(|| format!("renaming {}", partial.display()))?;
        Ok(copy)
    }
}
