//! `devmount::exec` and `devmount::forward` over a real devmount-server running in this
//! process on loopback (an integration test, a process of its own: the server's reaper owns
//! SIGCHLD). The "pod" is this machine, so its loopback ports are ours too: a local echo server
//! stands for a service in the pod, and the ports the server binds for `-R` can be dialled
//! directly.

mod common;

use common::{keygen, public_line, write};

use std::ffi::OsStr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use devmount::exec::{self, Event, ExecError, ExecRequest, ExitStatus, PtyRequest, WindowSize};
use devmount::forward::{Direction, ForwardError, ForwardSpec, ForwardState, ForwardStatus, Forwards};
use devmount::session::{self, ConnectOptions, Session, Target};
use devmount_server::forward::AllowList;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};

/// For anything that should take a moment; generous, for a loaded two-core machine.
const DEADLINE: Duration = Duration::from_secs(120);

struct Fixture {
    _dir: TempDir,
    /// The served root, canonical.
    root: PathBuf,
    port: u16,
    identity: PathBuf,
    known_hosts: PathBuf,
    /// A local echo server, allowed for `direct-tcpip`: the pod's service.
    echo_port: u16,
    /// Allowed for `direct-tcpip`; nothing listens there.
    dead_port: u16,
    /// Allowed for `tcpip-forward`, one for each test that binds one.
    reverse_ports: [u16; 3],
}

/// A port nothing listens on (the kernel hands ports out in turn, so it stays free).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(start_server)
}

fn start_server() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let path = |name: &str| dir.join(name);
    // Before the reaper starts: it reaps every child of the process.
    keygen(&path("host_key"), &["-t", "ed25519", "-N", ""]);
    keygen(&path("id"), &["-t", "ed25519", "-N", ""]);
    write(&path("authorized_keys"), &format!("{}\n", public_line(&path("id"))));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    write(&path("known_hosts"), &format!("[127.0.0.1]:{port} {}\n", public_line(&path("host_key"))));
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    let dead_port = free_port();
    let reverse_ports = [free_port(), free_port(), free_port()];
    let allow =
        AllowList { forward: [echo_port, dead_port].into(), reverse: reverse_ports.into(), own: None };

    common::spawn_server(
        listener,
        root.clone(),
        &path("host_key"),
        path("authorized_keys"),
        allow,
        move || {
            tokio::spawn(serve_echo(echo));
        },
    );
    Fixture {
        root,
        port,
        identity: path("id"),
        known_hosts: path("known_hosts"),
        echo_port,
        dead_port,
        reverse_ports,
        _dir: tmp,
    }
}

/// Sends back what it reads, then ends its side when the peer ends its.
async fn serve_echo(listener: std::net::TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn connect() -> Session {
    let f = fixture();
    let url = format!("ssh://dev@127.0.0.1:{}{}", f.port, f.root.display());
    let target = Target::parse(OsStr::new(&url), "nobody").unwrap();
    let options = ConnectOptions { connect_timeout: Duration::from_secs(30), ..ConnectOptions::default() };
    session::connect(&target, &f.identity, &f.known_hosts, &options).await.unwrap()
}

// ---- exec --------------------------------------------------------------------------------------

fn command(text: &str) -> ExecRequest {
    ExecRequest { command: Some(text.into()), ..ExecRequest::default() }
}

struct Ran {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Ran {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

async fn try_run(session: &Session, req: &ExecRequest, stdin: &[u8]) -> Result<Ran, ExecError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (_events, events) = mpsc::channel(1);
    let ran = exec::run(session, req, stdin, &mut stdout, &mut stderr, events);
    let status = timeout(DEADLINE, ran).await.expect("the command ended in time")?;
    Ok(Ran { status, stdout, stderr })
}

async fn run(session: &Session, req: &ExecRequest, stdin: &[u8]) -> Ran {
    try_run(session, req, stdin).await.unwrap()
}

#[tokio::test]
async fn exit_codes_and_signals_become_the_exit_code() {
    let session = connect().await;
    let ran = run(&session, &command("true"), b"").await;
    assert_eq!((ran.status.clone(), ran.status.code()), (ExitStatus::Code(0), 0));
    let ran = run(&session, &command("exit 3"), b"").await;
    assert_eq!((ran.status.clone(), ran.status.code()), (ExitStatus::Code(3), 3));
    let ran = run(&session, &command("kill -TERM $$"), b"").await;
    assert!(matches!(&ran.status, ExitStatus::Signal { name, .. } if name == "TERM"), "{}", ran.status);
    assert_eq!(ran.status.code(), 128 + 15);
}

#[tokio::test]
async fn stdout_and_stderr_stay_apart() {
    let session = connect().await;
    let ran = run(&session, &command("printf out; printf err >&2; printf more"), b"").await;
    assert_eq!(ran.status, ExitStatus::Code(0));
    assert_eq!((&ran.stdout[..], &ran.stderr[..]), (&b"outmore"[..], &b"err"[..]));
}

/// Counts and hashes what is written to it.
#[derive(Default)]
struct HashWriter {
    hash: Sha256,
    len: usize,
}

impl AsyncWrite for HashWriter {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.hash.update(buf);
        self.len += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `len` bytes no two tests share.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn stdin_streams_through_cat() {
    let session = connect().await;
    let input = pattern(20, 20 << 20);
    let mut stdout = HashWriter::default();
    let mut stderr = Vec::new();
    let (_events, events) = mpsc::channel(1);
    let cat = command("cat");
    let ran = exec::run(&session, &cat, &input[..], &mut stdout, &mut stderr, events);
    let status = timeout(DEADLINE, ran).await.expect("cat ended in time").unwrap();
    assert_eq!(status, ExitStatus::Code(0), "{}", String::from_utf8_lossy(&stderr));
    assert_eq!(stdout.len, input.len());
    assert_eq!(stdout.hash.finalize(), Sha256::digest(&input));
}

#[tokio::test]
async fn cwd_is_honoured() {
    let f = fixture();
    let session = connect().await;
    let dir = f.root.join("cwd test").join("it's here");
    std::fs::create_dir_all(&dir).unwrap();
    let expected = format!("{}\n", dir.display());

    let absolute = ExecRequest { cwd: Some(dir.as_os_str().as_encoded_bytes().to_vec()), ..command("pwd") };
    assert_eq!(run(&session, &absolute, b"").await.stdout(), expected);
    let relative = ExecRequest { cwd: Some(b"cwd test/it's here".to_vec()), ..command("pwd") };
    assert_eq!(run(&session, &relative, b"").await.stdout(), expected);

    // A login shell in that directory, reading its commands from stdin.
    let shell = ExecRequest { command: None, ..absolute.clone() };
    let ran = run(&session, &shell, b"pwd\nexit 7\n").await;
    assert_eq!(ran.status, ExitStatus::Code(7), "{}", String::from_utf8_lossy(&ran.stderr));
    assert!(ran.stdout().lines().any(|l| l == expected.trim_end()), "{}", ran.stdout());

    let missing = ExecRequest { cwd: Some(b"/no/such/dir".to_vec()), ..command("echo ran") };
    let ran = run(&session, &missing, b"").await;
    assert_ne!(ran.status, ExitStatus::Code(0));
    assert!(ran.stdout.is_empty() && !ran.stderr.is_empty());
}

#[tokio::test]
async fn env_is_passed() {
    let session = connect().await;
    let req = ExecRequest {
        env: vec![("DEVMOUNT_TEST_VAR".into(), "a b'c".into())],
        ..command("printf %s \"$DEVMOUNT_TEST_VAR\"")
    };
    assert_eq!(run(&session, &req, b"").await.stdout(), "a b'c");
}

fn pty(cols: u32, rows: u32) -> Option<PtyRequest> {
    Some(PtyRequest {
        term: "xterm-256color".into(),
        size: WindowSize { cols, rows, ..WindowSize::default() },
    })
}

#[tokio::test]
async fn a_pty_only_when_asked() {
    let session = connect().await;
    let req =
        ExecRequest { pty: pty(80, 24), ..command("test -t 0 && test -t 1 && echo \"$TERM\" && stty size") };
    let ran = run(&session, &req, b"").await;
    assert_eq!(ran.status, ExitStatus::Code(0), "{}", ran.stdout());
    assert_eq!(ran.stdout(), "xterm-256color\r\n24 80\r\n");
    let ran = run(&session, &command("test -t 0 || test -t 1"), b"").await;
    assert_eq!(ran.status, ExitStatus::Code(1));
}

/// Starts `req` in a task, with stdout readable line by line and events to send.
fn start(
    session: Arc<Session>,
    req: ExecRequest,
) -> (
    tokio::task::JoinHandle<Result<ExitStatus, ExecError>>,
    BufReader<tokio::io::DuplexStream>,
    mpsc::Sender<Event>,
) {
    let (out_write, out_read) = tokio::io::duplex(1 << 16);
    let (events_tx, events) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        exec::run(&session, &req, tokio::io::empty(), out_write, tokio::io::sink(), events).await
    });
    (task, BufReader::new(out_read), events_tx)
}

async fn read_line<R: AsyncRead + Unpin>(out: &mut BufReader<R>) -> String {
    let mut line = String::new();
    timeout(DEADLINE, out.read_line(&mut line)).await.expect("output in time").unwrap();
    line
}

#[tokio::test]
async fn window_changes_reach_the_pty() {
    let session = Arc::new(connect().await);
    // The kernel signals the terminal's foreground group on a resize; `wait` returns for it.
    let script = "trap 'stty size; kill $!; exit 0' WINCH; echo ready; sleep 60 & wait";
    let (task, mut out, events) = start(session, ExecRequest { pty: pty(80, 24), ..command(script) });
    assert_eq!(read_line(&mut out).await, "ready\r\n");
    let size = WindowSize { cols: 100, rows: 30, ..WindowSize::default() };
    events.send(Event::Resize(size)).await.unwrap();
    assert_eq!(read_line(&mut out).await, "30 100\r\n");
    let status = timeout(DEADLINE, task).await.expect("ended in time").unwrap().unwrap();
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn signals_reach_the_command() {
    let session = Arc::new(connect().await);
    let (mut task, mut out, events) = start(session, command("echo ready; exec sleep 60"));
    assert_eq!(read_line(&mut out).await, "ready\n");
    // Again until it lands: one that reaches the shell as it execs sleep is lost (the shell's
    // handler only notes it), as it would be locally.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let status = loop {
        events.send(Event::Signal(Signal::SIGINT)).await.unwrap();
        match timeout(Duration::from_millis(200), &mut task).await {
            Ok(ended) => break ended.unwrap().unwrap(),
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "the command did not end in time"),
        }
    };
    assert!(matches!(&status, ExitStatus::Signal { name, .. } if name == "INT"), "{status}");
    assert_eq!(status.code(), 130);
}

#[tokio::test]
async fn a_broken_local_stdout_gives_the_command_sigpipe() {
    let session = Arc::new(connect().await);
    let (out_write, out_read) = tokio::io::duplex(1 << 10);
    drop(out_read);
    let (_events_tx, events) = mpsc::channel(1);
    let req = command("while :; do echo y; done");
    let ran = exec::run(&session, &req, tokio::io::empty(), out_write, tokio::io::sink(), events);
    let status = timeout(DEADLINE, ran).await.expect("ended in time").unwrap();
    assert_eq!(status.code(), 128 + 13, "{status}");
}

#[tokio::test]
async fn terminal_signals_become_events() {
    use nix::pty::{openpty, Winsize};
    let pty = openpty(&Winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 }, None).unwrap();
    let mut events = exec::watch_signals(Some(pty.slave)).unwrap();
    nix::sys::signal::raise(Signal::SIGWINCH).unwrap();
    let event = timeout(DEADLINE, events.recv()).await.expect("an event in time").unwrap();
    assert_eq!(event, Event::Resize(WindowSize { cols: 120, rows: 40, ..WindowSize::default() }));
    nix::sys::signal::raise(Signal::SIGHUP).unwrap();
    let event = timeout(DEADLINE, events.recv()).await.expect("an event in time").unwrap();
    assert_eq!(event, Event::Signal(Signal::SIGHUP));
}

// ---- forwarding --------------------------------------------------------------------------------

fn local(listen: u16, connect: u16) -> ForwardSpec {
    ForwardSpec { direction: Direction::Local, listen, connect }
}

fn remote(listen: u16, connect: u16) -> ForwardSpec {
    ForwardSpec { direction: Direction::Remote, listen, connect }
}

/// Sends `payload` through `port` to the echo server, ends the sending side, and returns all
/// that comes back until the other side ends.
async fn echo_through(port: u16, payload: &[u8]) -> Vec<u8> {
    let exchange = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut r, mut w) = tcp.split();
        let send = async {
            w.write_all(payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let receive = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(send, receive).1
    };
    timeout(DEADLINE, exchange).await.expect("the echo came back in time")
}

/// Connects to `port` and expects the connection to be closed without a byte.
async fn closed_at_once(port: u16) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut got = Vec::new();
    // A reset is as good as an end.
    let _ = timeout(DEADLINE, tcp.read_to_end(&mut got)).await.expect("closed in time");
    assert!(got.is_empty());
}

/// Many concurrent connections through `port`, each with its own bytes.
async fn many_echoes(port: u16, connections: u64, len: usize) {
    let all = (0..connections).map(|i| async move {
        let payload = pattern(1000 + i, len);
        assert!(echo_through(port, &payload).await == payload, "connection {i} came back different");
    });
    futures::future::join_all(all).await;
}

fn status_of(forwards: &Forwards, spec: ForwardSpec) -> ForwardStatus {
    forwards.describe().into_iter().find(|s| s.spec == spec).unwrap()
}

/// Waits until `condition` holds for the forward's status, and reports the last one seen.
async fn wait_status(forwards: &Forwards, spec: ForwardSpec, condition: impl Fn(&ForwardStatus) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = status_of(forwards, spec);
        if condition(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "last status: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn local_forward_carries_many_connections() {
    let f = fixture();
    let session = Arc::new(connect().await);
    let spec = local(free_port(), f.echo_port);
    let forwards = Forwards::start(&session, &[spec]).await.unwrap();
    assert_eq!(status_of(&forwards, spec).state, ForwardState::Listening);
    many_echoes(spec.listen, 16, 256 << 10).await;
    let status = status_of(&forwards, spec);
    assert_eq!((status.total, status.failed), (16, 0), "{status}");
    wait_status(&forwards, spec, |s| s.open == 0).await;
}

#[tokio::test]
async fn failed_connections_leave_the_listener_up() {
    let f = fixture();
    let session = Arc::new(connect().await);
    let nothing_there = local(free_port(), f.dead_port);
    let not_allowed = local(free_port(), free_port());
    let working = local(free_port(), f.echo_port);
    let forwards = Forwards::start(&session, &[nothing_there, not_allowed, working]).await.unwrap();
    for _ in 0..2 {
        closed_at_once(nothing_there.listen).await;
        closed_at_once(not_allowed.listen).await;
        assert_eq!(echo_through(working.listen, b"still here").await, b"still here");
    }
    wait_status(&forwards, nothing_there, |s| s.failed == 2).await;
    wait_status(&forwards, not_allowed, |s| s.failed == 2).await;
    assert_eq!(status_of(&forwards, working).failed, 0);
}

#[tokio::test]
async fn a_busy_local_port_is_one_clear_line() {
    let f = fixture();
    let session = Arc::new(connect().await);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = Forwards::start(&session, &[local(port, f.echo_port)]).await.err().expect("refused");
    let msg = e.to_string();
    assert!(matches!(e, ForwardError::Busy { .. }), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains(&format!("local port {port} is already in use")), "{msg}");
    assert!(msg.contains(&format!("-L OTHER:{}", f.echo_port)), "{msg}");

    let e = Forwards::start(&session, &[local(port, 1), local(port, 2)]).await.err().expect("refused");
    assert!(matches!(e, ForwardError::Duplicate { .. }), "{e}");
}

#[tokio::test]
async fn reverse_forward_reaches_a_local_listener() {
    let f = fixture();
    let session = Arc::new(connect().await);
    let spec = remote(f.reverse_ports[0], f.echo_port);
    let nowhere = remote(f.reverse_ports[1], free_port());
    let forwards = Forwards::start(&session, &[spec, nowhere]).await.unwrap();
    assert_eq!(status_of(&forwards, spec).state, ForwardState::Listening);
    many_echoes(spec.listen, 8, 64 << 10).await;
    closed_at_once(nowhere.listen).await;
    assert_eq!(echo_through(spec.listen, b"after a failure").await, b"after a failure");
    wait_status(&forwards, nowhere, |s| s.failed == 1).await;

    // Stopped, the server no longer listens there.
    forwards.stop().await;
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(("127.0.0.1", spec.listen)).await.is_ok() {
        assert!(Instant::now() < deadline, "the pod still listens on {}", spec.listen);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_refused_reverse_forward_names_the_server_flag() {
    let f = fixture();
    let session = Arc::new(connect().await);
    let port = free_port();
    let e = Forwards::start(&session, &[remote(port, f.echo_port)]).await.err().expect("refused");
    let msg = e.to_string();
    assert!(matches!(e, ForwardError::ReverseRefused { .. }), "{msg}");
    assert!(msg.contains(&format!("--allow-reverse {port}")) && !msg.contains('\n'), "{msg}");
}

#[tokio::test]
async fn forwards_follow_a_new_connection() {
    let f = fixture();
    let first = Arc::new(connect().await);
    let (sessions_tx, sessions) = watch::channel(Some(first.clone()));
    let to_pod = local(free_port(), f.echo_port);
    let from_pod = remote(f.reverse_ports[2], f.echo_port);
    let forwards = Forwards::follow(sessions, &[to_pod, from_pod]).await.unwrap();
    assert_eq!(echo_through(to_pod.listen, b"first").await, b"first");
    assert_eq!(echo_through(from_pod.listen, b"first").await, b"first");

    // The first connection goes away (its server side stops listening for -R with it), and
    // a second one takes its place.
    sessions_tx.send_replace(None);
    drop(first);
    wait_status(&forwards, from_pod, |s| s.state == ForwardState::Waiting).await;
    let second = Arc::new(connect().await);
    sessions_tx.send_replace(Some(second.clone()));
    wait_status(&forwards, from_pod, |s| s.state == ForwardState::Listening).await;
    assert_eq!(echo_through(to_pod.listen, b"second").await, b"second");
    assert_eq!(echo_through(from_pod.listen, b"second").await, b"second");
}
