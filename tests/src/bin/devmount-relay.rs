//! `devmount-relay`: a TCP relay on loopback that adds a round-trip delay and can fail on
//! command, for tests and benchmarks on machines without `tc netem`.
//!
//! Each accepted connection gets its own connection to `--to`. Each direction is a pipeline:
//! a chunk is stamped when it is read and written out RTT/2 later, while later chunks keep
//! being read, so the delay adds latency without limiting throughput. A direction stops
//! reading while [`QUEUE_LIMIT`] bytes wait in it.
//!
//! Commands, one per line, on the `--control` Unix socket and on stdin; each gets a one-line
//! answer (`ok ...` or `error: ...`) on the same socket or on stdout:
//! - `cut`: resets every current connection on both sides, as a network drop would.
//! - `block`: stops forwarding on current connections and closes the listening socket, so new
//!   connections are refused, until `unblock`. Answered once the listener is closed.
//! - `unblock`: listens again on the same address and resumes forwarding. Answered once
//!   listening.
//! - `status`: `ok listening=ADDR blocked=BOOL connections=N accepted=N cuts=N rtt-ms=N
//!   to-server=BYTES to-client=BYTES` (the bytes passed on in each direction, over all
//!   connections: what a client asked of its server and what it got).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// Bytes one direction of a connection may hold before it stops reading.
const QUEUE_LIMIT: usize = 16 << 20;
/// The largest chunk read at once.
const CHUNK: usize = 64 << 10;
/// How long `unblock` waits for the listener to come back.
const RELISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP relay on loopback that delays each direction by half the round trip.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Where to listen (a loopback address; port 0 picks one).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// Where to relay each connection to (a loopback address).
    #[arg(long, value_name = "ADDR:PORT")]
    to: SocketAddr,
    /// The round-trip time to add, in milliseconds; each direction gets half.
    #[arg(long, value_name = "N", default_value_t = 0)]
    rtt_ms: u64,
    /// A Unix socket to take commands on (cut, block, unblock, status).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    blocked: bool,
    /// Bumped by each `cut`; a connection resets itself when it changes.
    cuts: u64,
    /// Whether the listening socket is open (the accept loop's answer to `blocked`).
    listening: bool,
}

struct Relay {
    listen: SocketAddr,
    to: SocketAddr,
    rtt: Duration,
    state: watch::Sender<State>,
    connections: AtomicUsize,
    accepted: AtomicU64,
    to_server: AtomicU64,
    to_client: AtomicU64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("devmount-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devmount-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    for (flag, addr) in [("--listen", args.listen), ("--to", args.to)] {
        if !addr.ip().is_loopback() {
            bail!("{flag} {addr} is not a loopback address; the relay is a test tool and only runs on 127.0.0.1 or ::1");
        }
    }
    let listener = listen(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen_addr = listener.local_addr()?;
    let relay = Arc::new(Relay {
        listen: listen_addr,
        to: args.to,
        rtt: Duration::from_millis(args.rtt_ms),
        state: watch::Sender::new(State { listening: true, ..State::default() }),
        connections: AtomicUsize::new(0),
        accepted: AtomicU64::new(0),
        to_server: AtomicU64::new(0),
        to_client: AtomicU64::new(0),
    });
    if let Some(path) = &args.control {
        // A socket file left by an earlier run would make bind fail.
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the old socket {}", path.display()))?;
        }
        let control =
            UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        tokio::spawn(serve_control(relay.clone(), control));
    }
    tokio::spawn(serve_stdin(relay.clone()));
    println!("listening on {listen_addr}");
    accept_loop(relay, listener).await;
    Ok(())
}

/// A listening socket that can be opened again on the same port right after it is closed.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(relay: Arc<Relay>, mut listener: TcpListener) {
    let mut state = relay.state.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => Some(accepted),
            _ = state.wait_for(|s| s.blocked) => None,
        };
        let Some(accepted) = accepted else {
            drop(listener);
            relay.state.send_modify(|s| s.listening = false);
            listener = relisten(&relay, &mut state).await;
            continue;
        };
        match accepted {
            Ok((client, _)) => {
                relay.accepted.fetch_add(1, Ordering::Relaxed);
                let cuts = relay.state.borrow().cuts;
                tokio::spawn(connection(relay.clone(), client, cuts));
            }
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                eprintln!("devmount-relay: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Waits for `unblock`, then listens again on the same address, retrying while the port is
/// busy.
async fn relisten(relay: &Relay, state: &mut watch::Receiver<State>) -> TcpListener {
    loop {
        // The sender lives in `relay`, which outlives this loop.
        let _ = state.wait_for(|s| !s.blocked).await;
        match listen(relay.listen) {
            Ok(listener) => {
                relay.state.send_modify(|s| s.listening = true);
                return listener;
            }
            Err(e) => {
                eprintln!("devmount-relay: cannot listen again on {}: {e}; retrying", relay.listen);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Relays one client connection until both sides have closed, or resets both sides on a cut
/// (any after the `cuts`-th) or when either side fails.
async fn connection(relay: Arc<Relay>, mut client: TcpStream, cuts: u64) {
    relay.connections.fetch_add(1, Ordering::Relaxed);
    let mut upstream = None;
    let clean = match TcpStream::connect(relay.to).await {
        Err(e) => {
            eprintln!("devmount-relay: cannot connect to {}: {e}", relay.to);
            false
        }
        Ok(stream) => {
            let upstream = upstream.insert(stream);
            // Nagle's algorithm would hold small packets back by up to 40 ms on top of the delay.
            client.set_nodelay(true).is_ok() && upstream.set_nodelay(true).is_ok() && {
                let mut state = relay.state.subscribe();
                let (cr, cw) = client.split();
                let (ur, uw) = upstream.split();
                let delay = relay.rtt / 2;
                tokio::select! {
                    result = async {
                        tokio::try_join!(
                            direction(cr, uw, delay, relay.state.subscribe(), &relay.to_server),
                            direction(ur, cw, delay, relay.state.subscribe(), &relay.to_client)
                        )
                    } => result.is_ok(),
                    _ = state.wait_for(|s| s.cuts != cuts) => false,
                }
            }
        }
    };
    if !clean {
        // SO_LINGER 0 makes the close send a reset instead of a FIN, as a dropped network
        // connection or a refused one looks to each side.
        let _ = client.set_zero_linger();
        if let Some(upstream) = &upstream {
            let _ = upstream.set_zero_linger();
        }
    }
    relay.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order, counting the
/// bytes written in `passed`. Ends after passing on the end of the stream (as a half-close).
async fn direction<R, W>(
    mut from: R,
    mut to: W,
    delay: Duration,
    state: watch::Receiver<State>,
    passed: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Unbounded in count, bounded in bytes by `room`: a chunk is queued only after its bytes
    // were taken from `room`, and they go back once it is written.
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Option<Bytes>)>();
    let room = Semaphore::new(QUEUE_LIMIT);
    let reader = async {
        let mut state = state.clone();
        loop {
            unblocked(&mut state).await;
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = from.read_buf(&mut buf).await?;
            let due = Instant::now() + delay;
            if n == 0 {
                let _ = queue.send((due, None));
                return Ok(());
            }
            // `n` is at most CHUNK, and `room` is never closed.
            if let Ok(permit) = room.acquire_many(n as u32).await {
                permit.forget();
            }
            if queue.send((due, Some(buf.freeze()))).is_err() {
                return Ok(());
            }
        }
    };
    let writer = async {
        let mut state = state.clone();
        while let Some((due, chunk)) = queued.recv().await {
            // tokio's timer rounds a deadline up to its next millisecond tick: a chunk already
            // due (always, at RTT 0) would wait for that tick, a round trip paying 1-2 ms.
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            unblocked(&mut state).await;
            match chunk {
                Some(chunk) => {
                    to.write_all(&chunk).await?;
                    passed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    room.add_permits(chunk.len());
                }
                None => return to.shutdown().await,
            }
        }
        Ok(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

async fn unblocked(state: &mut watch::Receiver<State>) {
    // The sender lives as long as the relay.
    let _ = state.wait_for(|s| !s.blocked).await;
}

/// Carries out one command and returns its one-line answer.
async fn command(relay: &Relay, line: &str) -> String {
    match line.trim() {
        "cut" => {
            let n = relay.connections.load(Ordering::Relaxed);
            relay.state.send_modify(|s| s.cuts += 1);
            format!("ok cut {n} connections")
        }
        "block" => {
            relay.state.send_modify(|s| s.blocked = true);
            let mut state = relay.state.subscribe();
            let _ = state.wait_for(|s| !s.listening).await;
            "ok blocked".into()
        }
        "unblock" => {
            relay.state.send_modify(|s| s.blocked = false);
            let mut state = relay.state.subscribe();
            let listening =
                tokio::time::timeout(RELISTEN_TIMEOUT, state.wait_for(|s| s.listening)).await.is_ok();
            if listening {
                "ok unblocked".into()
            } else {
                format!("error: cannot listen again on {} (see stderr)", relay.listen)
            }
        }
        "status" => {
            let s = *relay.state.borrow();
            format!(
                "ok listening={} blocked={} connections={} accepted={} cuts={} rtt-ms={} to-server={} to-client={}",
                relay.listen,
                s.blocked,
                relay.connections.load(Ordering::Relaxed),
                relay.accepted.load(Ordering::Relaxed),
                s.cuts,
                relay.rtt.as_millis(),
                relay.to_server.load(Ordering::Relaxed),
                relay.to_client.load(Ordering::Relaxed)
            )
        }
        other => format!("error: unknown command {other:?}; the commands are cut, block, unblock and status"),
    }
}

async fn serve_control(relay: Arc<Relay>, control: UnixListener) {
    loop {
        match control.accept().await {
            Ok((stream, _)) => {
                let relay = relay.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = stream.into_split();
                    let mut lines = BufReader::new(rd).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let answer = command(&relay, &line).await;
                        if wr.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => eprintln!("devmount-relay: control socket: {e}"),
        }
    }
}

async fn serve_stdin(relay: Arc<Relay>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{}", command(&relay, &line).await);
    }
}
