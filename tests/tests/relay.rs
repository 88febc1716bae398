//! `devmount-relay`: the delay it adds, the throughput it keeps, and its `cut`, `block` and
//! `unblock` commands, against small echo and sink servers on loopback.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use devmount_tests::EchoServer;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(10);

struct Relay {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines the relay printed after `listening on`.
    stdout: mpsc::Receiver<String>,
    port: u16,
    control: PathBuf,
    _dir: TempDir,
}

impl Relay {
    fn start(to: u16, rtt_ms: u64) -> Relay {
        Relay::start_with(&["--to", &format!("127.0.0.1:{to}"), "--rtt-ms", &rtt_ms.to_string()])
    }

    fn start_with(args: &[&str]) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control");
        let mut child = Command::new(env!("CARGO_BIN_EXE_devmount-relay"))
            .args(["--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = stdout.recv_timeout(WAIT).expect("the relay did not say where it listens");
        let port = first
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first:?}"));
        let stdin = child.stdin.take();
        Relay { child, stdin, stdout, port, control, _dir: dir }
    }

    /// Sends one command on the control socket and returns the answer.
    fn command(&self, command: &str) -> String {
        let mut socket = UnixStream::connect(&self.control).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        socket.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(socket).read_line(&mut answer).unwrap();
        answer.trim_end().to_owned()
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(WAIT))?;
        Ok(stream)
    }

    /// Waits until `status` shows `want`, and returns the last status seen.
    fn wait_status(&self, want: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.command("status");
            if status.contains(want) {
                return status;
            }
            assert!(Instant::now() < deadline, "status never showed {want:?}; last: {status}");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_once(conn: &mut TcpStream, data: &[u8]) {
    conn.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn round_trip_takes_the_configured_rtt() {
    let rtt = Duration::from_millis(40);
    let echo = EchoServer::start().unwrap();
    let relay = Relay::start(echo.port(), 40);
    let mut conn = relay.connect().unwrap();
    let mut times: Vec<Duration> = (0..15)
        .map(|_| {
            let start = Instant::now();
            echo_once(&mut conn, b"x");
            start.elapsed()
        })
        .collect();
    times.sort();
    assert!(times[0] >= rtt, "a round trip shorter than the configured one: {times:?}");
    // The median, not the maximum: a loaded machine may stall any single round trip.
    assert!(times[times.len() / 2] < rtt + Duration::from_millis(30), "{times:?}");
}

#[test]
fn bulk_transfer_is_not_limited_by_the_delay() {
    const LEN: usize = 64 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Reads everything, then answers with the count; the bytes are compared afterwards, so
    // the comparison is not timed.
    let sink = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut received = Vec::with_capacity(LEN);
        conn.read_to_end(&mut received).unwrap();
        conn.write_all(&(received.len() as u64).to_be_bytes()).unwrap();
        received
    });
    let relay = Relay::start(port, 20);
    let mut data = Vec::with_capacity(LEN);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }

    let start = Instant::now();
    let mut conn = relay.connect().unwrap();
    conn.write_all(&data).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let mut count = [0; 8];
    conn.read_exact(&mut count).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(u64::from_be_bytes(count), LEN as u64);
    // One 64 KiB chunk per round trip of 20 ms would take 20 s.
    assert!(elapsed < Duration::from_secs(5), "64 MiB took {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(20), "{elapsed:?}");
    assert!(sink.join().unwrap() == data, "the bytes arrived changed or out of order");
    // The server closed after answering: the end of stream comes through too.
    assert_eq!(conn.read(&mut count).unwrap(), 0);
}

#[test]
fn cut_resets_every_connection_and_new_ones_work() {
    let echo = EchoServer::start().unwrap();
    let relay = Relay::start(echo.port(), 10);
    let mut a = relay.connect().unwrap();
    let mut b = relay.connect().unwrap();
    echo_once(&mut a, b"before");
    echo_once(&mut b, b"before");
    // Counted over all connections, each direction on its own.
    relay.wait_status("to-server=12 to-client=12");
    assert_eq!(relay.command("cut"), "ok cut 2 connections");
    for conn in [&mut a, &mut b] {
        let mut buf = [0; 16];
        match conn.read(&mut buf) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes from a cut connection"),
        }
    }
    relay.wait_status("connections=0");
    let mut c = relay.connect().unwrap();
    echo_once(&mut c, b"after");
    assert!(relay.command("status").contains("cuts=1"));
}

#[test]
fn block_refuses_connections_and_holds_data_until_unblock() {
    let echo = EchoServer::start().unwrap();
    let relay = Relay::start(echo.port(), 0);
    let mut held = relay.connect().unwrap();
    echo_once(&mut held, b"before");
    assert_eq!(relay.command("block"), "ok blocked");
    let refused = relay.connect().expect_err("connected while blocked");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(relay.command("status").contains("blocked=true"));

    held.write_all(b"during").unwrap();
    // Nothing may come back while blocked; a quarter second is plenty for loopback.
    held.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
    let mut buf = [0; 6];
    let e = held.read(&mut buf).expect_err("data passed while blocked");
    assert!(matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{e}");

    assert_eq!(relay.command("unblock"), "ok unblocked");
    held.set_read_timeout(Some(WAIT)).unwrap();
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"during");
    let mut fresh = relay.connect().unwrap();
    echo_once(&mut fresh, b"after");
}

#[test]
fn commands_work_on_stdin_too() {
    let echo = EchoServer::start().unwrap();
    let mut relay = Relay::start(echo.port(), 7);
    let stdin = relay.stdin.as_mut().unwrap();
    stdin.write_all(b"status\nnonsense\n").unwrap();
    let status = relay.stdout.recv_timeout(WAIT).unwrap();
    assert!(status.starts_with("ok listening=127.0.0.1:") && status.contains("rtt-ms=7"), "{status}");
    let error = relay.stdout.recv_timeout(WAIT).unwrap();
    assert!(error.starts_with("error: unknown command") && error.contains("cut, block, unblock"), "{error}");
}

#[test]
fn only_loopback_addresses_are_accepted() {
    for args in [
        ["--listen", "0.0.0.0:0", "--to", "127.0.0.1:1"],
        ["--listen", "127.0.0.1:0", "--to", "192.0.2.1:22"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_devmount-relay"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains("is not a loopback address"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn an_unreachable_upstream_resets_the_client() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let relay = Relay::start(port, 0);
    let mut conn = relay.connect().unwrap();
    let mut buf = [0; 1];
    let e = conn.read(&mut buf).expect_err("read from a connection with no upstream");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
}
