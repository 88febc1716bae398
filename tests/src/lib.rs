//! Harness for the end-to-end tests: a real `devmount-server` on loopback, driven by OpenSSH's
//! own clients (`ssh`, `sftp`, `sshfs`) with keys made by `ssh-keygen`.
//!
//! Each test starts its own [`Server`] over a fresh temporary directory, so tests share nothing
//! and run in parallel. The directory on disk is the oracle: a test acts through SSH and checks
//! the result with plain `std::fs`. The user's `~/.ssh`, ssh config and agent are never used
//! (`-F /dev/null`, explicit identity and known-hosts files), and host keys are always checked.
//!
//! Every wait has a deadline; a process still running at its deadline is killed and the error
//! carries everything it printed. The server binary is taken from the target directory next to
//! the test executable (`target/debug`), or from `DEVMOUNT_BIN_DIR`; build it first with
//! `cargo build --workspace --bins` (scripts/test does).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
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
    let bin = bin_dir()?.join("devmount-server");
    ensure!(
        bin.is_file(),
        "{} not found: build it with `cargo build --workspace --bins` (or set DEVMOUNT_BIN_DIR)",
        bin.display()
    );
    Ok(bin)
}

/// A command whose environment cannot leak the developer's SSH agent or askpass helper, and
/// whose git ignores the developer's git configuration.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in ["SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "DISPLAY"] {
        cmd.env_remove(var);
    }
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "devmount test")
        .env("GIT_AUTHOR_EMAIL", "test@devmount.invalid")
        .env("GIT_COMMITTER_NAME", "devmount test")
        .env("GIT_COMMITTER_EMAIL", "test@devmount.invalid")
        // Files on the mount and in the oracle directory may be owned by the server's user.
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*")
        .stdin(Stdio::null());
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
