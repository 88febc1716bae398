//! The session commands through the `devmount` binary only, as a user runs them: `devmount up
//! MNT --local DIR`, then `exec`, `ssh`'s terminal, `status`, `down`, `umount` by hand, two
//! sessions at once, a killed daemon (with changes pending), a killed server (restarted, then
//! given up on), OpenSSH clients through `ssh-config`, a manifest and `-m`, `init`, and each bad
//! input's one-line message.
//!
//! Every test has its own sandbox: a temporary directory with the served directories, the mount
//! points, and the state and socket directories (`XDG_STATE_HOME`, `XDG_RUNTIME_DIR`), so tests
//! share nothing and run in parallel. The served directory is the oracle. Dropping the sandbox
//! ends whatever sessions a failed test left behind.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use devmount_tests::{
    client_bin, command, echo_roundtrip, find_daemon, free_port, retry, run, run_with, ssh_config_value,
    EchoServer, Proc, Run,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a session may take to come up or go away on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// A test's own directory, with `dir/` (served) and `mnt/` (the mount point) made.
struct Sandbox {
    root: TempDir,
}

impl Sandbox {
    fn new() -> Result<Sandbox> {
        let root =
            tempfile::Builder::new().prefix("devmount-session-").tempdir().context("making a sandbox")?;
        let sandbox = Sandbox { root };
        fs::DirBuilder::new().mode(0o700).create(sandbox.path("run"))?;
        for dir in ["state", "dir", "mnt"] {
            fs::create_dir(sandbox.path(dir))?;
        }
        Ok(sandbox)
    }

    /// A path in the sandbox, canonical (the temporary directory may sit behind a symlink).
    fn path(&self, rel: &str) -> PathBuf {
        let base = fs::canonicalize(self.root.path()).unwrap_or_else(|_| self.root.path().to_owned());
        base.join(rel)
    }

    /// `program` with the sandbox's state and sockets, run in the sandbox: what `devmount`
    /// needs, and OpenSSH clients whose `ProxyCommand` is `devmount proxy`.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = command(program);
        cmd.env("XDG_STATE_HOME", self.path("state"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env_remove("DEVMOUNT_LOG")
            .current_dir(self.path(""));
        cmd
    }

    /// `devmount` with the sandbox's state and sockets, run in the sandbox.
    fn devmount(&self) -> Result<Command> {
        Ok(self.command(client_bin()?))
    }

    /// `devmount ARGS...`, however it ends.
    fn run(&self, args: &[&str]) -> Result<Run> {
        run(self.devmount()?.args(args))
    }

    /// `devmount ARGS...`, which must succeed.
    fn ok(&self, args: &[&str]) -> Result<Run> {
        let out = self.run(args)?;
        ensure!(out.success(), "{out}");
        Ok(out)
    }

    /// `devmount up MNT --local DIR EXTRA...` (both relative to the sandbox, made if missing);
    /// returns the mount point.
    fn up(&self, mnt: &str, dir: &str, extra: &[&str]) -> Result<PathBuf> {
        let (mnt, dir) = (self.path(mnt), self.path(dir));
        fs::create_dir_all(&mnt)?;
        fs::create_dir_all(&dir)?;
        let mut cmd = self.devmount()?;
        cmd.arg("up").arg(&mnt).arg("--local").arg(&dir).args(extra);
        let out = run(&mut cmd)?;
        ensure!(out.success(), "{out}");
        ensure!(is_mount_point(&mnt)?, "`devmount up` returned, but {} is not mounted\n{out}", mnt.display());
        Ok(mnt)
    }

    /// `devmount exec ARGS...` run in `cwd`.
    fn exec_in(&self, cwd: &Path, args: &[&str]) -> Result<Run> {
        let mut cmd = self.devmount()?;
        cmd.arg("exec").args(args).current_dir(cwd);
        run(&mut cmd)
    }

    /// The pid of the session daemon of `mnt`: the `devmount up` process that keeps `mnt` in
    /// its command line.
    fn daemon_pid(&self, mnt: &Path) -> Result<i32> {
        find_daemon(&client_bin()?, "up", mnt.as_os_str())
    }

    /// The pid of the session's devmount-server, as `devmount status` gives it.
    fn server_pid(&self, mnt: &Path) -> Result<i32> {
        let status = self.ok(&["status"])?;
        let text = status.stdout_text();
        let block =
            session_block(&text, mnt).ok_or_else(|| anyhow!("status lacks {}\n{status}", mnt.display()))?;
        let pid = block
            .split("devmount-server pid ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| anyhow!("status names no server pid for {}\n{status}", mnt.display()))?;
        Ok(pid)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let root = self.path("");
        for mnt in mounts_under(&root).unwrap_or_default() {
            let down = self.devmount().and_then(|mut cmd| run(cmd.arg("down").arg(&mnt)));
            if !down.is_ok_and(|d| d.success()) || is_mount_point(&mnt).unwrap_or(true) {
                let _ = run(command("fusermount3").arg("-u").arg("-z").arg(&mnt));
            }
        }
        // Daemons and servers a failed test left: ours, found by the sandbox in their arguments.
        let root_bytes = root.as_os_str().as_encoded_bytes().to_vec();
        let left =
            processes(|args| args.iter().skip(1).any(|a| a.starts_with(&root_bytes))).unwrap_or_default();
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Processes whose argument vector satisfies `wanted`.
fn processes(wanted: impl Fn(&[Vec<u8>]) -> bool) -> Result<Vec<i32>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Processes come and go while we look.
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<Vec<u8>> = cmdline.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
        if alive(pid) && wanted(&args) {
            found.push(pid);
        }
    }
    Ok(found)
}

/// Whether `pid` runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read(format!("/proc/{pid}/stat")) else { return false };
    let Some(close) = stat.iter().rposition(|&b| b == b')') else { return false };
    !matches!(stat.get(close + 2), Some(b'Z' | b'X') | None)
}

fn wait_gone(what: &str, pid: i32) -> Result<()> {
    retry(&format!("{what} (pid {pid}) to exit"), DEADLINE, || {
        ensure!(!alive(pid), "pid {pid} still runs");
        Ok(())
    })
}

/// The mount points in /proc/self/mountinfo, unescaped.
fn mount_points() -> Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStringExt;
    let info = fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| {
            let mut out = Vec::new();
            let mut i = 0;
            while i < field.len() {
                if field[i] == b'\\' && i + 3 < field.len() {
                    let digits = &field[i + 1..i + 4];
                    out.push(digits.iter().fold(0u8, |n, d| n.wrapping_mul(8).wrapping_add(d - b'0')));
                    i += 4;
                } else {
                    out.push(field[i]);
                    i += 1;
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect())
}

fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mount_points()?.iter().any(|m| m == path))
}

fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(mount_points()?.into_iter().filter(|m| m.starts_with(dir)).collect())
}

/// The lines `devmount status` prints for the session at `mnt`.
fn session_block<'t>(status: &'t str, mnt: &Path) -> Option<&'t str> {
    status.split("\n\n").find(|block| block.lines().next() == Some(&*mnt.to_string_lossy()))
}

/// A devmount failure: exit code 255 and one line of stderr, `devmount: ...` with `words`.
fn one_line_error(out: &Run, words: &str) -> Result<()> {
    ensure!(out.code() == Some(255), "expected exit code 255\n{out}");
    let err = out.stderr_text();
    ensure!(err.lines().count() == 1 && err.starts_with("devmount: "), "expected one line of error\n{out}");
    ensure!(err.contains(words), "expected {words:?} in the error\n{out}");
    Ok(())
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; n];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[test]
fn up_mounts_the_directory_and_exec_sees_what_was_written_through_it() -> Result<()> {
    let sb = Sandbox::new()?;
    fs::write(sb.path("dir/hello.txt"), b"hello from the served directory\n")?;
    let mnt = sb.up("mnt", "dir", &[])?;

    let ls = run(command("ls").arg(&mnt))?;
    ensure!(ls.success() && ls.stdout_text() == "hello.txt\n", "{ls}");

    // The flush barrier: what was written through the mount is on the server before the
    // command runs, however much it is.
    fs::write(mnt.join("new.txt"), b"written through the mount\n")?;
    let big = random_bytes(3 << 20)?;
    fs::write(mnt.join("big.bin"), &big)?;
    let out = sb.exec_in(&sb.path(""), &["cat new.txt && wc -c < big.bin"])?;
    ensure!(out.success(), "{out}");
    ensure!(out.stdout_text() == format!("written through the mount\n{}\n", big.len()), "{out}");
    ensure!(fs::read(sb.path("dir/big.bin"))? == big, "the served directory lacks big.bin's contents");
    Ok(())
}

#[test]
fn exit_codes_and_signals_are_the_commands() -> Result<()> {
    let sb = Sandbox::new()?;
    sb.up("mnt", "dir", &[])?;
    let here = sb.path("");
    for (command, code) in
        [("true", 0), ("exit 7", 7), ("kill -TERM $$", 128 + 15), ("kill -KILL $$", 128 + 9)]
    {
        let out = sb.exec_in(&here, &[command])?;
        ensure!(out.code() == Some(code), "`{command}` should end with {code}\n{out}");
    }
    // The words are joined for the remote shell, as ssh does.
    let out = sb.exec_in(&here, &["echo", "a", "'b  c'"])?;
    ensure!(out.success() && out.stdout_text() == "a b  c\n", "{out}");

    // A signal to devmount reaches the remote command.
    let mut cmd = sb.devmount()?;
    cmd.args(["exec", "trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.1; done"]);
    let mut proc = Proc::spawn(&mut cmd)?;
    proc.wait_stdout("the command to start", DEADLINE, |out| out.ends_with(b"ready\n"))?;
    proc.signal(Signal::SIGINT)?;
    let out = proc.wait(DEADLINE)?;
    ensure!(out.code() == Some(42) && out.stdout_text().ends_with("got INT\n"), "{out}");

    // Also when the command leaves megabytes of stdin unread: signals do not queue behind them.
    // (Within the server's stdin queue, 8 MiB: past it an unread flood stalls the connection
    // until the command reads; see pod-server/src/exec.rs.)
    let bin = client_bin()?;
    let marker = format!("# {}", sb.path("").display());
    let script = format!(
        "head -c 4000000 /dev/zero | {} exec \"trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.1; done {marker}\"",
        bin.display()
    );
    let mut cmd = command("bash");
    cmd.arg("-c").arg(script).current_dir(sb.path(""));
    cmd.env("XDG_STATE_HOME", sb.path("state")).env("XDG_RUNTIME_DIR", sb.path("run"));
    let mut proc = Proc::spawn(&mut cmd)?;
    proc.wait_stdout("the command to start", DEADLINE, |out| out.ends_with(b"ready\n"))?;
    let exec = processes(|args| {
        args.first().map(Vec::as_slice) == Some(bin.as_os_str().as_encoded_bytes())
            && args.iter().any(|a| a.ends_with(marker.as_bytes()))
    })?;
    ensure!(exec.len() == 1, "expected one `devmount exec`, found {exec:?}");
    kill(Pid::from_raw(exec[0]), Signal::SIGINT)?;
    let out = proc.wait(DEADLINE)?;
    ensure!(out.code() == Some(42) && out.stdout_text().ends_with("got INT\n"), "{out}");
    Ok(())
}

#[test]
fn a_terminal_when_asked_pipes_otherwise() -> Result<()> {
    let sb = Sandbox::new()?;
    sb.up("mnt", "dir", &[])?;
    let here = sb.path("");
    let out = sb.exec_in(&here, &["-t", "tty; echo \"$TERM\""])?;
    ensure!(out.success() && out.stdout_text().starts_with("/dev/pts/"), "{out}");
    // A terminal's output ends its lines with CR LF.
    ensure!(out.stdout_text().contains("\r\n"), "{out}");
    let out = sb.exec_in(&here, &["tty"])?;
    ensure!(out.code() == Some(1) && out.stdout_text() == "not a tty\n", "{out}");
    let out = sb.exec_in(&here, &["echo out; echo err >&2"])?;
    ensure!(out.stdout_text() == "out\n" && out.stderr_text() == "err\n", "{out}");
    Ok(())
}

#[test]
fn the_command_runs_in_the_directory_matching_the_current_one() -> Result<()> {
    let sb = Sandbox::new()?;
    fs::create_dir_all(sb.path("dir/sub dir/deeper"))?;
    let mnt = sb.up("mnt", "dir", &[])?;
    let out = sb.exec_in(&mnt.join("sub dir/deeper"), &["pwd"])?;
    ensure!(out.success(), "{out}");
    ensure!(Path::new(out.stdout_text().trim_end()) == sb.path("dir/sub dir/deeper"), "{out}");
    let out = sb.exec_in(&mnt, &["pwd"])?;
    ensure!(Path::new(out.stdout_text().trim_end()) == sb.path("dir"), "{out}");
    // Outside the mount: the served directory's root.
    let out = sb.exec_in(&sb.path(""), &["pwd"])?;
    ensure!(Path::new(out.stdout_text().trim_end()) == sb.path("dir"), "{out}");
    Ok(())
}

#[test]
fn stdin_and_stdout_stream_through_pipes() -> Result<()> {
    let sb = Sandbox::new()?;
    sb.up("mnt", "dir", &[])?;
    let input = random_bytes(4 << 20)?;
    let out = run_with(sb.devmount()?.args(["exec", "cat"]), &input, DEADLINE)?;
    ensure!(out.success(), "{out}");
    ensure!(
        out.stdout == input,
        "`devmount exec cat` gave back {} bytes of {}",
        out.stdout.len(),
        input.len()
    );

    // As in a shell pipeline; and a reader that stops early ends the command with SIGPIPE.
    fs::write(sb.path("input"), &input)?;
    let bin = client_bin()?;
    let script = format!(
        "{bin} exec cat < input | sha256sum; sha256sum < input; {bin} exec yes | head -n 2; echo \"status ${{PIPESTATUS[0]}}\"",
        bin = bin.display()
    );
    let mut cmd = command("bash");
    cmd.arg("-c").arg(script).current_dir(sb.path(""));
    cmd.env("XDG_STATE_HOME", sb.path("state")).env("XDG_RUNTIME_DIR", sb.path("run"));
    let out = run(&mut cmd)?;
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() == 5, "{out}");
    ensure!(lines[0] == lines[1], "the sums differ\n{out}");
    ensure!(lines[2..] == ["y", "y", "status 141"], "{out}");
    Ok(())
}

#[test]
fn forwards_carry_connections_both_ways_over_the_session() -> Result<()> {
    let sb = Sandbox::new()?;
    // Both "pod" and "local" ports are on this machine's loopback.
    let in_pod = EchoServer::start()?;
    let here = EchoServer::start()?;
    let (local, remote) = (free_port()?, free_port()?);
    let forward = format!("{local}:{}", in_pod.port());
    let reverse = format!("{remote}:{}", here.port());
    let mnt = sb.up("mnt", "dir", &["-L", &forward, "-R", &reverse])?;

    let reply = echo_roundtrip(local, b"through -L", DEADLINE)?;
    ensure!(reply == b"through -L", "-L gave back {:?}", String::from_utf8_lossy(&reply));
    ensure!(in_pod.connections() == 1, "the pod-side server saw {} connections", in_pod.connections());

    let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{remote}; printf 'through -R' >&3; head -c 10 <&3");
    let out = sb.exec_in(&sb.path(""), &["bash", "-c", &format!("\"{probe}\"")])?;
    ensure!(out.success() && out.stdout_text() == "through -R", "{out}");
    ensure!(here.connections() == 1, "the local server saw {} connections", here.connections());

    let status = sb.ok(&["status"])?;
    let text = status.stdout_text();
    let block = session_block(&text, &mnt).ok_or_else(|| anyhow!("{status}"))?;
    ensure!(block.contains(&format!("-L {forward}")) && block.contains(&format!("-R {reverse}")), "{status}");
    ensure!(block.matches(": listening").count() == 2, "{status}");

    // A busy local port is a clear error, and nothing stays mounted.
    let mnt2 = sb.path("mnt2");
    fs::create_dir(&mnt2)?;
    let busy = sb.run(&["up", "mnt2", "--local", "dir2", "-L", &forward])?;
    fs::create_dir(sb.path("dir2"))?;
    let busy2 = sb.run(&["up", "mnt2", "--local", "dir2", "-L", &forward])?;
    one_line_error(&busy, "does not exist")?;
    one_line_error(&busy2, &format!("local port {local} is already in use"))?;
    ensure!(!is_mount_point(&mnt2)?, "a failed up left {} mounted", mnt2.display());
    Ok(())
}

#[test]
fn status_lists_each_session_and_two_run_at_once() -> Result<()> {
    let sb = Sandbox::new()?;
    let a = sb.up("a", "dir-a", &[])?;
    let b = sb.up("b", "dir-b", &[])?;
    let status = sb.ok(&["status"])?;
    let text = status.stdout_text();
    for (mnt, dir) in [(&a, "dir-a"), (&b, "dir-b")] {
        let block =
            session_block(&text, mnt).ok_or_else(|| anyhow!("status lacks {}\n{status}", mnt.display()))?;
        ensure!(block.contains(&format!("local {}", sb.path(dir).display())), "{status}");
        ensure!(block.contains("state:    connected"), "{status}");
        ensure!(block.contains("pending:  0 change(s)"), "{status}");
    }
    ensure!(sb.server_pid(&a)? != sb.server_pid(&b)?, "the sessions share a server\n{status}");

    let out = sb.exec_in(&sb.path(""), &["--mount", "a", "pwd"])?;
    ensure!(Path::new(out.stdout_text().trim_end()) == sb.path("dir-a"), "{out}");
    let out = sb.exec_in(&b, &["pwd"])?;
    ensure!(Path::new(out.stdout_text().trim_end()) == sb.path("dir-b"), "{out}");
    // Outside both mounts, without --mount: which one is meant is not guessed.
    let out = sb.exec_in(&sb.path(""), &["pwd"])?;
    one_line_error(&out, "2 sessions are running")?;
    ensure!(
        out.stderr_text().contains(&*a.to_string_lossy())
            && out.stderr_text().contains(&*b.to_string_lossy()),
        "{out}"
    );
    Ok(())
}

#[test]
fn down_ends_the_session_its_mount_and_its_server() -> Result<()> {
    let sb = Sandbox::new()?;
    let mnt = sb.up("mnt", "dir", &[])?;
    let (daemon, server) = (sb.daemon_pid(&mnt)?, sb.server_pid(&mnt)?);
    fs::write(mnt.join("last.txt"), b"saved just before down\n")?;
    let out = sb.ok(&["down", "mnt"])?;
    ensure!(!is_mount_point(&mnt)?, "{} is still mounted after down\n{out}", mnt.display());
    ensure!(fs::read(sb.path("dir/last.txt"))? == b"saved just before down\n", "down lost a write");
    // The server is stopped and reaped before the daemon exits.
    ensure!(!alive(server), "the devmount-server (pid {server}) outlived down");
    wait_gone("the daemon", daemon)?;
    let status = sb.ok(&["status"])?;
    ensure!(status.stdout_text() == "no devmount sessions\n", "{status}");
    // The mount point can be used again at once.
    sb.up("mnt", "dir", &[])?;
    Ok(())
}

#[test]
fn umount_by_hand_ends_the_session_and_its_server() -> Result<()> {
    let sb = Sandbox::new()?;
    let mnt = sb.up("mnt", "dir", &[])?;
    let (daemon, server) = (sb.daemon_pid(&mnt)?, sb.server_pid(&mnt)?);
    let out = run(command("fusermount3").arg("-u").arg(&mnt))?;
    ensure!(out.success(), "{out}");
    wait_gone("the daemon", daemon)?;
    ensure!(!alive(server), "the devmount-server (pid {server}) outlived its daemon");
    let status = sb.ok(&["status"])?;
    ensure!(status.stdout_text() == "no devmount sessions\n", "{status}");
    Ok(())
}

#[test]
fn a_killed_daemon_takes_its_server_along_and_down_cleans_up() -> Result<()> {
    let sb = Sandbox::new()?;
    let mnt = sb.up("mnt", "dir", &[])?;
    let (daemon, server) = (sb.daemon_pid(&mnt)?, sb.server_pid(&mnt)?);
    kill(Pid::from_raw(daemon), Signal::SIGKILL)?;
    wait_gone("the killed daemon", daemon)?;
    wait_gone("the devmount-server of a killed daemon", server)?;
    let out = sb.exec_in(&sb.path(""), &["true"])?;
    one_line_error(&out, "no devmount serves")?;
    let out = sb.ok(&["down"])?;
    ensure!(out.stderr_text().contains("lost its daemon"), "{out}");
    ensure!(!is_mount_point(&mnt)?, "down left the dead mount at {}\n{out}", mnt.display());
    sb.up("mnt", "dir", &[])?;
    Ok(())
}

#[test]
fn the_manifest_supplies_the_settings_and_init_writes_one() -> Result<()> {
    let sb = Sandbox::new()?;
    fs::write(
        sb.path("devmount.yml"),
        "name: demo\ntarget:\n  local: dir\nenvironment:\n  GREETING: hello from the manifest\n",
    )?;
    let out = sb.ok(&["up", "mnt"])?;
    let mnt = sb.path("mnt");
    ensure!(is_mount_point(&mnt)?, "{out}");
    let out = sb.exec_in(&sb.path(""), &["echo \"$GREETING\""])?;
    ensure!(out.success() && out.stdout_text() == "hello from the manifest\n", "{out}");
    let status = sb.ok(&["status"])?;
    ensure!(status.stdout_text().contains("name:     demo"), "{status}");

    // `init` writes a starter that `up` takes as it is, and never overwrites it.
    let project = sb.path("project");
    fs::create_dir_all(project.join("workspace"))?;
    fs::create_dir_all(project.join("mnt"))?;
    let mut init = sb.devmount()?;
    let out = run(init.arg("init").current_dir(&project))?;
    ensure!(out.success() && project.join("devmount.yml").is_file(), "{out}");
    let out = run(init.current_dir(&project))?;
    one_line_error(&out, "already exists")?;
    let mut up = sb.devmount()?;
    let out = run(up.args(["up", "mnt"]).current_dir(&project))?;
    ensure!(out.success() && is_mount_point(&project.join("mnt"))?, "{out}");
    Ok(())
}

#[test]
fn bad_input_gets_a_one_line_error() -> Result<()> {
    let sb = Sandbox::new()?;
    one_line_error(&sb.run(&["up", "mnt"])?, "nothing to serve: give --local DIR")?;
    one_line_error(&sb.run(&["up", "mnt", "--local", "missing"])?, "missing, does not exist")?;
    one_line_error(&sb.run(&["up", "no-such-mnt", "--local", "dir"])?, "no-such-mnt does not exist")?;
    one_line_error(&sb.run(&["up", "mnt", "--local", "dir", "-L", "80:http"])?, "bad forward -L")?;
    fs::create_dir(sb.path("dir/inner"))?;
    one_line_error(&sb.run(&["up", "dir/inner", "--local", "dir"])?, "inside the served directory")?;
    one_line_error(&sb.run(&["exec", "true"])?, "no devmount session is running")?;
    one_line_error(&sb.run(&["down"])?, "no devmount session is running")?;
    one_line_error(&sb.run(&["exec", "--mount", "mnt", "true"])?, "no devmount session at")?;
    one_line_error(&sb.run(&["down", "mnt"])?, "no devmount session at")?;
    fs::write(sb.path("devmount.yml"), "target:\n  local: dir\nforwards: [\"8080:8080\"]\n")?;
    one_line_error(&sb.run(&["up", "mnt"])?, "devmount.yml:3:1: unknown key")?;
    ensure!(mounts_under(&sb.path(""))?.is_empty(), "a failed command left a mount");
    Ok(())
}

#[test]
fn ssh_config_lets_openssh_clients_ride_the_session() -> Result<()> {
    let sb = Sandbox::new()?;
    let mnt = sb.up("mnt", "dir", &[])?;
    fs::write(mnt.join("through-mount.txt"), b"written through the mount\n")?;
    sb.ok(&["sync"])?;

    let config = sb.ok(&["ssh-config"])?.stdout_text();
    let path = sb.path("ssh_config");
    fs::write(&path, &config)?;
    ensure!(config.contains("\nHost devmount-dir\n"), "{config}");
    ensure!(ssh_config_value(&config, "StrictHostKeyChecking") == Some("yes"), "{config}");
    ensure!(ssh_config_value(&config, "HostKeyAlias") == Some("devmount-dir"), "{config}");
    ensure!(ssh_config_value(&config, "IdentitiesOnly") == Some("yes"), "{config}");
    ensure!(!config.contains("/dev/null"), "{config}");
    let proxy = ssh_config_value(&config, "ProxyCommand").ok_or_else(|| anyhow!("{config}"))?;
    let program = proxy
        .strip_suffix("' proxy dir")
        .and_then(|p| p.strip_prefix('\''))
        .ok_or_else(|| anyhow!("{config}"))?;
    ensure!(fs::canonicalize(program)? == fs::canonicalize(client_bin()?)?, "{config}");
    // The pinned key is the session's own, under the alias, in a private file.
    let known =
        PathBuf::from(ssh_config_value(&config, "UserKnownHostsFile").ok_or_else(|| anyhow!("{config}"))?);
    ensure!(known.starts_with(sb.path("state")), "{config}");
    let entry = fs::read_to_string(&known)?;
    ensure!(entry.starts_with("devmount-dir ssh-ed25519 ") && entry.lines().count() == 1, "{entry}");
    ensure!(fs::metadata(&known)?.permissions().mode() & 0o777 == 0o600, "{} is not 0600", known.display());

    let cfg = path.to_string_lossy().into_owned();
    let out = run(sb
        .command("ssh")
        .args(["-F", &cfg, "-o", "BatchMode=yes", "devmount-dir"])
        .arg("cat through-mount.txt"))?;
    ensure!(out.success() && out.stdout_text() == "written through the mount\n", "{out}");

    let batch = format!(
        "get {} {}\nput {} {}\n",
        sb.path("dir/through-mount.txt").display(),
        sb.path("fetched.txt").display(),
        path.display(),
        sb.path("dir/uploaded").display()
    );
    fs::write(sb.path("batch"), batch)?;
    let out =
        run(sb.command("sftp").args(["-F", &cfg, "-o", "BatchMode=yes", "-b", "batch", "devmount-dir"]))?;
    ensure!(out.success(), "{out}");
    ensure!(
        fs::read(sb.path("fetched.txt"))? == b"written through the mount\n",
        "sftp fetched something else"
    );
    ensure!(fs::read_to_string(sb.path("dir/uploaded"))? == config, "sftp uploaded something else");
    // scp exits 0 only if the server ends its sftp channel with an exit status, as sshd does.
    let remote = format!("devmount-dir:{}", sb.path("dir/through-mount.txt").display());
    let out = run(sb
        .command("scp")
        .args(["-F", &cfg, "-o", "BatchMode=yes"])
        .arg(&remote)
        .arg(sb.path("scp.txt")))?;
    ensure!(out.success(), "{out}");
    ensure!(fs::read(sb.path("scp.txt"))? == b"written through the mount\n", "scp fetched something else");
    // What the server got reaches the mount.
    retry("the upload to appear in the mount", DEADLINE, || {
        ensure!(fs::read_to_string(mnt.join("uploaded"))? == config, "not yet");
        Ok(())
    })?;

    one_line_error(
        &sb.run(&["proxy", "nosuch"])?,
        &format!("no devmount session named nosuch is running (running: dir at {})", mnt.display()),
    )?;
    Ok(())
}

#[test]
fn dash_m_names_the_session_in_every_command() -> Result<()> {
    let sb = Sandbox::new()?;
    fs::create_dir_all(sb.path("alpha/src"))?;
    fs::write(sb.path("alpha/devmount.yml"), "name: alpha\ntarget:\n  local: src\n")?;
    fs::create_dir(sb.path("mnt-a"))?;
    let out = sb.ok(&["up", "mnt-a", "-m", "alpha/devmount.yml"])?;
    let a = sb.path("mnt-a");
    ensure!(is_mount_point(&a)?, "{out}");
    let b = sb.up("mnt-b", "dir-b", &[])?;
    let here = sb.path("");
    let m = ["-m", "alpha/devmount.yml"];

    let out = sb.exec_in(&here, &[m[0], m[1], "pwd"])?;
    ensure!(out.success() && Path::new(out.stdout_text().trim_end()) == sb.path("alpha/src"), "{out}");
    fs::write(a.join("synced.txt"), b"through -m\n")?;
    sb.ok(&["sync", m[0], m[1]])?;
    ensure!(fs::read(sb.path("alpha/src/synced.txt"))? == b"through -m\n", "sync -m did not sync alpha");
    let status = sb.ok(&["status", m[0], m[1]])?;
    let text = status.stdout_text();
    ensure!(session_block(&text, &a).is_some() && session_block(&text, &b).is_none(), "{status}");
    ensure!(text.contains("name:     alpha"), "{status}");
    let config = sb.ok(&["ssh-config", m[0], m[1]])?.stdout_text();
    ensure!(config.contains("\nHost devmount-alpha\n"), "{config}");
    let out = run_with(sb.devmount()?.args(["ssh", "-T", m[0], m[1]]), b"pwd\n", DEADLINE)?;
    ensure!(out.success() && Path::new(out.stdout_text().trim_end()) == sb.path("alpha/src"), "{out}");

    // A manifest whose session is not running, a missing manifest, and two ways of naming.
    fs::write(sb.path("other.yml"), "name: nobody\ntarget:\n  local: dir-b\n")?;
    one_line_error(
        &sb.exec_in(&here, &["-m", "other.yml", "true"])?,
        "no devmount session named nobody (the name in other.yml) is running (running: alpha at",
    )?;
    one_line_error(&sb.run(&["status", "-m", "missing.yml"])?, "cannot read missing.yml")?;
    one_line_error(&sb.exec_in(&here, &["--mount", "mnt-b", "-m", "other.yml", "true"])?, "not both")?;
    // Names are unique among running sessions: `devmount proxy NAME` must know which.
    fs::create_dir(sb.path("mnt-c"))?;
    one_line_error(
        &sb.run(&["up", "mnt-c", "--local", "alpha/src", "--name", "dir-b"])?,
        &format!("a devmount session named dir-b already runs at {}", b.display()),
    )?;
    one_line_error(
        &sb.run(&["up", "mnt-c", "--local", "alpha/src", "--name", "no good"])?,
        "--name \"no good\"",
    )?;

    sb.ok(&["down", m[0], m[1]])?;
    ensure!(!is_mount_point(&a)? && is_mount_point(&b)?, "down -m ended the wrong session");
    Ok(())
}

/// The server's pid once `devmount status` shows it running again, other than `old`.
fn restarted_server(sb: &Sandbox, mnt: &Path, old: i32) -> Result<i32> {
    retry("the server to be restarted", DEADLINE, || {
        let pid = sb.server_pid(mnt)?;
        ensure!(pid != old, "still pid {old}");
        Ok(pid)
    })
}

#[test]
fn a_killed_server_is_reported_restarted_and_given_up_on_when_it_keeps_dying() -> Result<()> {
    let sb = Sandbox::new()?;
    let mnt = sb.up("mnt", "dir", &[])?;
    let mut server = sb.server_pid(&mnt)?;
    kill(Pid::from_raw(server), Signal::SIGKILL)?;
    // Restarting or restarted, the exit is shown, with the log's end.
    let status = retry("status to report the exit", DEADLINE, || {
        let status = sb.ok(&["status"])?;
        ensure!(status.stdout_text().contains("devmount-server exited (signal 9, SIGKILL) at "), "{status}");
        Ok(status)
    })?;
    ensure!(status.stdout_text().contains("exit log: "), "{status}");
    server = restarted_server(&sb, &mnt, server)?;

    // The mount carries on over the restarted server: a write reaches the directory, exec works.
    fs::write(mnt.join("after-restart.txt"), b"written after the restart\n")?;
    let out = sb.exec_in(&sb.path(""), &["cat after-restart.txt"])?;
    ensure!(out.success() && out.stdout_text() == "written after the restart\n", "{out}");
    let status = sb.ok(&["status"])?;
    ensure!(status.stdout_text().contains("server:   restarted at "), "{status}");
    ensure!(status.stdout_text().contains("state:    connected"), "{status}");

    // Dying again and again within a minute: it stays down, and says so.
    kill(Pid::from_raw(server), Signal::SIGKILL)?;
    server = restarted_server(&sb, &mnt, server)?;
    kill(Pid::from_raw(server), Signal::SIGKILL)?;
    retry("status to give up", DEADLINE, || {
        let status = sb.ok(&["status"])?;
        ensure!(status.stdout_text().contains("not restarted: it exited 3 times within 60s"), "{status}");
        Ok(())
    })?;
    let out = sb.exec_in(&sb.path(""), &["true"])?;
    ensure!(out.code() == Some(255), "{out}");
    let err = out.stderr_text();
    let first = err.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with("devmount: the session's devmount-server exited (signal 9, SIGKILL) at ")
            && first.contains("not restarted: it exited 3 times"),
        "{out}"
    );
    ensure!(err.lines().skip(1).any(|l| l.contains("listening on")), "no log lines\n{out}");
    sb.ok(&["down"])?;
    ensure!(!is_mount_point(&mnt)?, "down left the mount");
    Ok(())
}

/// Kills a stopped process when dropped, so a failing test leaves no frozen server.
struct Frozen(i32);

impl Drop for Frozen {
    fn drop(&mut self) {
        // It may be gone already; nothing to report then.
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// Overwrites the start of `held`, says so, then creates files `f0`, `f1`, ... saying each.
const WRITER: &str = r#"
import os, sys
d = sys.argv[1]
fd = os.open(os.path.join(d, "held"), os.O_WRONLY)
os.write(fd, b"NEW")
os.close(fd)
print("held", flush=True)
for i in range(100):
    with open(os.path.join(d, "f%d" % i), "wb") as f:
        f.write(b"file %d\n" % i)
    print(i, flush=True)
"#;

#[test]
fn a_killed_daemon_keeps_its_pending_writes_for_the_next_up() -> Result<()> {
    let sb = Sandbox::new()?;
    fs::write(sb.path("dir/held"), b"old contents\n")?;
    let mnt = sb.up("mnt", "dir", &[])?;
    // Looked up, so writing it needs no round trip.
    ensure!(fs::read(mnt.join("held"))? == b"old contents\n");
    let frozen = Frozen(sb.server_pid(&mnt)?);
    kill(Pid::from_raw(frozen.0), Signal::SIGSTOP)?;

    let mut writer = Proc::spawn(command("python3").arg("-c").arg(WRITER).arg(&mnt))?;
    writer.close_stdin();
    writer.wait_stdout("the write to held to return", DEADLINE, |out| out.starts_with(b"held\n"))?;
    let daemon = sb.daemon_pid(&mnt)?;
    kill(Pid::from_raw(daemon), Signal::SIGKILL)?;
    wait_gone("the killed daemon", daemon)?;
    // Nothing hangs: the dead daemon's mount fails whatever waited on it.
    let writer = writer.wait(DEADLINE)?;
    let returned: Vec<usize> =
        writer.stdout_text().lines().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    drop(frozen);

    let status = sb.ok(&["status"])?;
    ensure!(status.stderr_text().contains("lost its daemon"), "{status}");
    ensure!(!is_mount_point(&mnt)?, "status left the dead mount\n{status}");

    let mut up = sb.devmount()?;
    let out = run(up.arg("up").arg(&mnt).arg("--local").arg(sb.path("dir")))?;
    ensure!(out.success(), "{out}");
    let replayed = out
        .stderr_text()
        .split("replaying ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse::<usize>().ok());
    ensure!(replayed.is_some_and(|n| n >= 1), "the second up did not say it replays changes\n{out}");
    sb.ok(&["sync"])?;
    ensure!(fs::read(sb.path("dir/held"))? == b"NEW contents\n", "the write to held was lost");
    for i in returned {
        let got = fs::read(sb.path(&format!("dir/f{i}")))?;
        ensure!(got == format!("file {i}\n").into_bytes(), "f{i}: the returned write was lost");
    }
    Ok(())
}
