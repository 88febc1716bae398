//! `devmount::local_server` with the real `devmount-server` binary: the session keys, an SSH
//! connection made with them, the server's end with its parent, its restarts, and every start
//! error.
//!
//! Needs the server binary: `cargo build -p devmount-server` first (or set DEVMOUNT_BIN_DIR to
//! the directory holding it).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devmount::local_server::{Health, LocalServer, ServerState, StartOptions, MAX_EXITS};
use devmount::session::{self, ConnectOptions, SessionError, Target};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tempfile::TempDir;

/// Set for the helper process of `the_server_dies_with_its_parent`: the test's temp directory.
const HELPER_ENV: &str = "DEVMOUNT_TEST_LOCAL_SERVER_HELPER";
const HELPER_TEST: &str = "helper_starts_a_server_and_waits";
/// What the helper prints before `PID PORT SESSION_DIR`.
const READY: &str = "devmount-test-helper-ready ";
const DEADLINE: Duration = Duration::from_secs(60);

/// `DEVMOUNT_BIN_DIR/devmount-server`, else the one in `target/debug` (this test runs from
/// `target/debug/deps`).
fn server_bin() -> PathBuf {
    let dir = match std::env::var_os("DEVMOUNT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_owned(),
    };
    let bin = dir.join("devmount-server");
    assert!(bin.is_file(), "{} not found: run `cargo build -p devmount-server` first", bin.display());
    bin
}

fn options() -> StartOptions {
    StartOptions { server_bin: Some(server_bin()), ..StartOptions::default() }
}

/// A temp directory with `served/` (holding `hello.txt`) and `state/`.
struct Dirs {
    _tmp: TempDir,
    root: PathBuf,
    served: PathBuf,
    state: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    dirs_in(tmp, root)
}

fn dirs_in(tmp: TempDir, root: PathBuf) -> Dirs {
    let served = root.join("served");
    let state = root.join("state");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("hello.txt"), b"hello from the served directory\n").unwrap();
    Dirs { _tmp: tmp, root, served, state }
}

/// Connects with `identity` and `known_hosts` and reads `name` over SFTP.
fn try_read_over_ssh(
    target: &Target,
    identity: &Path,
    known_hosts: &Path,
    name: &str,
) -> Result<Vec<u8>, SessionError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let session = session::connect(target, identity, known_hosts, &ConnectOptions::default()).await?;
        let (sftp, _) = session.open_sftp().await?;
        let mut path = target.path.to_vec();
        path.push(b'/');
        path.extend_from_slice(name.as_bytes());
        let data = sftp.read_file(&path).await.unwrap();
        session.disconnect().await;
        Ok(data.to_vec())
    })
}

fn read_over_ssh(target: &Target, identity: &Path, known_hosts: &Path, name: &str) -> Vec<u8> {
    try_read_over_ssh(target, identity, known_hosts, name).unwrap_or_else(|e| panic!("{target}: {e}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Waits for `check` to hold, failing with `what` after the deadline.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_the_directory_over_ssh_with_the_session_keys() {
    let d = dirs();
    let mut server = LocalServer::start(&d.served, &d.state, &options()).unwrap();
    assert!(server.state().pid().is_some());
    assert!(server.session_dir().starts_with(d.state.join("local")));
    assert_eq!(server.root(), d.served);

    let target = server.target();
    assert_eq!(target.host, "127.0.0.1");
    assert_eq!(target.port, server.port());
    assert_eq!(&target.path[..], d.served.as_os_str().as_encoded_bytes());
    assert_eq!(target.user, devmount::mount::local_user().to_string_lossy());
    assert_eq!(server.journal_key(), format!("local:{}", d.served.display()));

    let known = std::fs::read_to_string(server.known_hosts()).unwrap();
    assert!(known.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", server.port())), "{known}");
    assert_eq!(known.lines().count(), 1);

    let data = read_over_ssh(&target, server.identity(), server.known_hosts(), "hello.txt");
    assert_eq!(data, b"hello from the served directory\n");

    let session_dir = server.session_dir().to_owned();
    let port = server.port();
    server.stop().unwrap();
    assert_eq!(server.state().health, Health::Stopped);
    assert!(!session_dir.exists(), "stop removes the keys and the log");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing listens on {port} after stop");
    server.stop().unwrap();
}

/// Kills the running server with SIGKILL and waits until the supervisor has seen it: the state
/// then shows the exit (restarting, or given up).
fn kill_server(server: &LocalServer) -> ServerState {
    let before = server.state();
    let pid = before.pid().expect("the server runs");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let mut state = before.clone();
    wait_until("the server's exit is seen", || {
        state = server.state();
        state.last_exit != before.last_exit
    });
    state
}

fn wait_running(server: &LocalServer, restarts: u32) -> ServerState {
    let mut state = server.state();
    wait_until(&format!("restart {restarts} is done"), || {
        state = server.state();
        state.restarts == restarts && state.pid().is_some()
    });
    state
}

#[test]
fn a_killed_server_is_restarted_on_its_port_with_its_keys() {
    let d = dirs();
    let server = LocalServer::start(&d.served, &d.state, &options()).unwrap();
    let first = server.state().pid().unwrap();
    let state = kill_server(&server);
    let exit = state.last_exit.unwrap();
    assert_eq!(exit.what, "exited (signal 9, SIGKILL)");
    assert!(exit.log.iter().any(|l| l.contains("listening on")), "{:?}", exit.log);
    assert!(exit.to_string().starts_with("exited (signal 9, SIGKILL) at "), "{exit}");

    let state = wait_running(&server, 1);
    assert_ne!(state.pid(), Some(first));
    assert!(state.restarted_at.is_some());
    // The same port and host key: the known_hosts file written at the start still holds.
    let data = read_over_ssh(&server.target(), server.identity(), server.known_hosts(), "hello.txt");
    assert_eq!(data, b"hello from the served directory\n");
    let session_dir = server.session_dir().to_owned();
    drop(server);
    assert!(!session_dir.exists(), "drop removes the session directory");
}

#[test]
fn a_server_that_keeps_exiting_is_given_up() {
    let d = dirs();
    let server = LocalServer::start(&d.served, &d.state, &options()).unwrap();
    for restarts in 1..MAX_EXITS as u32 {
        assert_eq!(kill_server(&server).health, Health::Restarting);
        wait_running(&server, restarts);
    }
    let state = kill_server(&server);
    assert_eq!(state.health, Health::GaveUp, "{state:?}");
    assert_eq!(state.restarts, MAX_EXITS as u32 - 1);
    assert!(TcpStream::connect(("127.0.0.1", server.port())).is_err(), "nothing listens after giving up");
}

#[test]
fn keys_are_private_and_fresh_for_each_session() {
    let d = dirs();
    let a = LocalServer::start(&d.served, &d.state, &options()).unwrap();
    let b = LocalServer::start(&d.served, &d.state, &options()).unwrap();
    assert_ne!(a.session_dir(), b.session_dir());
    assert_ne!(a.port(), b.port());
    assert_eq!(mode(&d.state.join("local")), 0o700);
    for server in [&a, &b] {
        let dir = server.session_dir();
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        for file in ["id_ed25519", "host_key", "authorized_keys", "known_hosts", "server.log"] {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
        }
    }
    for file in ["id_ed25519", "host_key", "authorized_keys", "known_hosts"] {
        let (x, y) = (a.session_dir().join(file), b.session_dir().join(file));
        assert_ne!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{file} is the same in two sessions"
        );
    }
    // Each session's key opens its own server only, and each known_hosts pins its own.
    let refused = try_read_over_ssh(&b.target(), a.identity(), b.known_hosts(), "hello.txt");
    assert!(matches!(refused, Err(SessionError::AuthRefused { .. })), "{refused:?}");
    let unknown = try_read_over_ssh(&b.target(), b.identity(), a.known_hosts(), "hello.txt");
    assert!(matches!(unknown, Err(SessionError::HostKeyUnknown { .. })), "{unknown:?}");
}

/// Run only by `the_server_dies_with_its_parent`, in a process of its own: starts a server from
/// a thread that ends at once, prints `READY PID PORT SESSION_DIR`, and waits to be killed.
#[test]
#[ignore = "a helper process of the_server_dies_with_its_parent"]
fn helper_starts_a_server_and_waits() {
    let root = PathBuf::from(std::env::var_os(HELPER_ENV).expect("run by the_server_dies_with_its_parent"));
    let d = dirs_in(tempfile::tempdir().unwrap(), root);
    let (served, state) = (d.served.clone(), d.state.clone());
    // The thread that starts the server ends before the server is used: the server must not
    // take that for its parent's death.
    let server =
        std::thread::spawn(move || LocalServer::start(&served, &state, &options()).unwrap()).join().unwrap();
    let pid = server.state().pid().unwrap();
    println!("{READY}{pid} {} {}", server.port(), server.session_dir().display());
    loop {
        std::thread::park();
    }
}

#[test]
fn the_server_dies_with_its_parent() {
    // Orphans come to this process instead of init, so the test can see the server's exit.
    // SAFETY: prctl with these arguments has no memory effects.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let d = dirs();
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", HELPER_TEST, "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, &d.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // libtest writes its own words on the line before ours, so the marker is looked for
    // anywhere in a line.
    let stdout = helper.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.split_once(READY).map(|(_, rest)| rest.to_owned()));
        let _ = ready_tx.send(ready);
    });
    let ready = match ready_rx.recv_timeout(DEADLINE) {
        Ok(Some(ready)) => ready,
        Ok(None) => panic!("the helper ended without a `{READY}` line"),
        Err(_) => {
            helper.kill().unwrap();
            panic!("the helper printed no `{READY}` line within {DEADLINE:?}");
        }
    };
    let mut fields = ready.splitn(3, ' ');
    let pid: i32 = fields.next().unwrap().parse().unwrap();
    let port: u16 = fields.next().unwrap().parse().unwrap();
    let session_dir = PathBuf::from(fields.next().unwrap());

    // The server serves, although the thread that started it is gone.
    let target = Target {
        user: devmount::mount::local_user().to_string_lossy().into_owned(),
        host: "127.0.0.1".into(),
        port,
        path: d.served.as_os_str().as_encoded_bytes().to_vec().into(),
    };
    let data = read_over_ssh(
        &target,
        &session_dir.join("id_ed25519"),
        &session_dir.join("known_hosts"),
        "hello.txt",
    );
    assert_eq!(data, b"hello from the served directory\n");

    helper.kill().unwrap();
    helper.wait().unwrap();
    let pid = Pid::from_raw(pid);
    let mut status = WaitStatus::StillAlive;
    wait_until("the orphaned server exits", || {
        status = waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap();
        status != WaitStatus::StillAlive
    });
    // SIGTERM (the parent-death signal) makes the server shut down cleanly.
    assert_eq!(status, WaitStatus::Exited(pid, 0));
}

/// Writes an executable script through a child process: a file this process held open for
/// writing could be inherited by another test's fork, and executing it would fail with ETXTBSY.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"")
        .arg("sh")
        .arg(format!("#!/bin/sh\n{body}\n"))
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

fn start_error(dir: &Path, state: &Path, options: &StartOptions) -> String {
    let message = match LocalServer::start(dir, state, options) {
        Ok(server) => panic!("started on port {}", server.port()),
        Err(e) => format!("{e:#}"),
    };
    assert!(!message.contains('\n'), "one line: {message}");
    message
}

#[test]
fn start_errors() {
    let d = dirs();
    let missing = d.root.join("missing");
    let message = start_error(&missing, &d.state, &options());
    assert_eq!(
        message,
        format!("the directory to serve, {}, does not exist; create it first", missing.display())
    );
    let file = d.served.join("hello.txt");
    let message = start_error(&file, &d.state, &options());
    assert_eq!(message, format!("the directory to serve, {}, is not a directory", file.display()));

    let no_bin = d.root.join("bin/devmount-server");
    let message =
        start_error(&d.served, &d.state, &StartOptions { server_bin: Some(no_bin.clone()), ..options() });
    assert!(message.starts_with(&format!("--server-bin {}: no such file", no_bin.display())), "{message}");
    // Without --server-bin, the server is looked for next to the executable (here the test,
    // in target/debug/deps, where there is none).
    let message = start_error(&d.served, &d.state, &StartOptions { server_bin: None, ..options() });
    let beside = std::env::current_exe().unwrap().with_file_name("devmount-server");
    assert_eq!(
        message,
        format!(
            "devmount-server not found next to devmount (looked for {}); install it there, or give its path with --server-bin FILE",
            beside.display()
        )
    );
    assert!(!d.state.join("local").exists(), "nothing is made before the inputs are checked");
}

#[test]
fn a_server_that_fails_to_start_is_reported_with_its_log() {
    let d = dirs();
    let bin = script(&d.root, "crashing", "echo 'first line' >&2\necho 'fatal: cannot serve' >&2\nexit 3");
    let message =
        start_error(&d.served, &d.state, &StartOptions { server_bin: Some(bin.clone()), ..options() });
    assert!(message
        .starts_with(&format!("{} stopped before it was ready (exit status 3); its log ", bin.display())));
    assert!(message.ends_with("server.log ends: first line | fatal: cannot serve"), "{message}");
    // The log the message names is kept; the keys are not.
    let sessions: Vec<_> =
        std::fs::read_dir(d.state.join("local")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(sessions.len(), 1);
    let left: Vec<_> = std::fs::read_dir(&sessions[0]).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["server.log"]);

    let silent = script(&d.root, "silent", "exit 0");
    let message = start_error(&d.served, &d.state, &StartOptions { server_bin: Some(silent), ..options() });
    assert!(message.contains("stopped before it was ready (exit status 0); its log "), "{message}");
    assert!(message.ends_with("server.log is empty"), "{message}");
}

#[test]
fn a_server_with_another_host_key_is_refused() {
    let d = dirs();
    let bin = script(
        &d.root,
        "impostor",
        "echo 'impostor log' >&2\necho 'listening on 127.0.0.1:1'\necho 'host key SHA256:AAAA'\nexec sleep 600",
    );
    let message =
        start_error(&d.served, &d.state, &StartOptions { server_bin: Some(bin.clone()), ..options() });
    assert!(
        message
            .starts_with(&format!("{} reports the host key SHA256:AAAA, not the key SHA256:", bin.display())),
        "{message}"
    );
    assert!(
        message.contains("ends: impostor log | listening on 127.0.0.1:1 | host key SHA256:AAAA"),
        "{message}"
    );
}

#[test]
fn a_server_listening_elsewhere_is_refused() {
    let d = dirs();
    // The right key (read from the file given to the server), on an address that is not ours.
    let bin = script(
        &d.root,
        "elsewhere",
        r#"while [ $# -gt 0 ]; do [ "$1" = --host-key ] && key=$2; shift; done
echo "host key $(ssh-keygen -lf "$key" | cut -d' ' -f2)"
echo 'listening on 0.0.0.0:2222'
exec sleep 600"#,
    );
    let message =
        start_error(&d.served, &d.state, &StartOptions { server_bin: Some(bin.clone()), ..options() });
    assert!(
        message.starts_with(&format!(
            "{} reports listening on \"0.0.0.0:2222\", not on 127.0.0.1;",
            bin.display()
        )),
        "{message}"
    );
}

#[test]
fn a_server_that_never_reports_is_stopped_after_the_timeout() {
    let d = dirs();
    let bin = script(&d.root, "mute", "exec sleep 600");
    let options =
        StartOptions { server_bin: Some(bin.clone()), start_timeout: Duration::from_secs(1), ..options() };
    let message = start_error(&d.served, &d.state, &options);
    assert!(
        message.starts_with(&format!("{} did not report its port within 1s; its log ", bin.display())),
        "{message}"
    );
}
