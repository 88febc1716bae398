//! Port forwarding over the session's connection, loopback at both ends.
//!
//! `-L LOCAL:REMOTE` listens on this machine's 127.0.0.1:LOCAL; each connection accepted
//! there opens a `direct-tcpip` channel to the pod's 127.0.0.1:REMOTE. `-R REMOTE:LOCAL` asks
//! the server (`tcpip-forward`) to listen on the pod's 127.0.0.1:REMOTE; each connection it
//! accepts comes back as a `forwarded-tcpip` channel, which is connected here to
//! 127.0.0.1:LOCAL. The server allows only the ports it was started with (`--allow-forward`,
//! `--allow-reverse`).
//!
//! A connection that fails is logged, counted and closed; its listener goes on. [`Forwards`]
//! follows the session it is given through a `watch`, so it outlives a reconnect: local
//! listeners stay up (a connection accepted while there is no session waits for one, up to
//! [`SESSION_WAIT`]) and `-R` forwards are asked for again on the new connection.
//!
//! Each connection's bytes from the channel wait in a queue of [`CONNECTION_QUEUE`] chunks for
//! the local socket, so the channel is always read: russh stops reading the whole connection
//! as soon as one channel's queue fills.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::session::{ForwardedTcpip, Session, SessionError};

/// Chunks from the channel that may wait for a slow local socket, per connection.
pub const CONNECTION_QUEUE: usize = 64;
/// How long a connection accepted while there is no session waits for one.
pub const SESSION_WAIT: Duration = Duration::from_secs(30);
/// The most read from a socket at once.
const READ_CHUNK: usize = 32 << 10;
/// After a failed accept (out of descriptors, say), so the listener does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Between attempts to ask a new connection for a `-R` forward it refused.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The current connection, `None` while there is none.
pub type SessionWatch = watch::Receiver<Option<Arc<Session>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `-L`: listen here, connect in the pod.
    Local,
    /// `-R`: listen in the pod, connect here.
    Remote,
}

impl Direction {
    pub fn flag(self) -> &'static str {
        match self {
            Direction::Local => "-L",
            Direction::Remote => "-R",
        }
    }

    fn usage(self) -> &'static str {
        match self {
            Direction::Local => "LOCAL:REMOTE, as in -L 8080:8080, or one port for both",
            Direction::Remote => "REMOTE:LOCAL, as in -R 9000:9000, or one port for both",
        }
    }
}

/// One forward, as `-L LOCAL:REMOTE` or `-R REMOTE:LOCAL` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForwardSpec {
    pub direction: Direction,
    /// The port listened on: here for `-L`, in the pod for `-R`.
    pub listen: u16,
    /// The port connected to: in the pod for `-L`, here for `-R`.
    pub connect: u16,
}

/// A forward that cannot be parsed; one line saying what is wrong and how to write it.
#[derive(Debug, thiserror::Error)]
#[error("bad forward {flag} {text:?}: {reason}; write {usage}")]
pub struct SpecError {
    flag: &'static str,
    text: String,
    reason: String,
    usage: &'static str,
}

impl ForwardSpec {
    /// Parses `8080:9090` or `8080` (the same port at both ends).
    pub fn parse(direction: Direction, text: &str) -> Result<ForwardSpec, SpecError> {
        let fail = |reason: String| SpecError {
            flag: direction.flag(),
            text: text.to_owned(),
            reason,
            usage: direction.usage(),
        };
        let port = |part: &str| match part.parse::<u16>() {
            Ok(0) => Err(fail("port 0 cannot be forwarded".into())),
            Ok(port) => Ok(port),
            Err(_) if part.is_empty() => Err(fail("a port is missing".into())),
            Err(_) => Err(fail(format!("{part:?} is not a port number (1-65535)"))),
        };
        let parts: Vec<&str> = text.split(':').collect();
        let (listen, connect) = match parts[..] {
            [both] => (port(both)?, port(both)?),
            [listen, connect] => (port(listen)?, port(connect)?),
            _ => return Err(fail(
                "only ports can be given: devmount forwards between 127.0.0.1 here and 127.0.0.1 in the pod"
                    .into(),
            )),
        };
        Ok(ForwardSpec { direction, listen, connect })
    }

    /// Where bytes go, as `local 127.0.0.1:8080 -> pod 127.0.0.1:8080`.
    pub fn route(&self) -> String {
        match self.direction {
            Direction::Local => {
                format!("local 127.0.0.1:{} -> pod 127.0.0.1:{}", self.listen, self.connect)
            }
            Direction::Remote => {
                format!("pod 127.0.0.1:{} -> local 127.0.0.1:{}", self.listen, self.connect)
            }
        }
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}:{}", self.direction.flag(), self.listen, self.connect)
    }
}

/// Why forwards could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "local port {} is already in use, so {spec} cannot listen on it; stop what listens there, or pick another local port: -L OTHER:{}",
        spec.listen, spec.connect
    )]
    Busy { spec: ForwardSpec },
    #[error("cannot listen on local 127.0.0.1:{} for {spec}: {source}", spec.listen)]
    Listen {
        spec: ForwardSpec,
        #[source]
        source: io::Error,
    },
    #[error(
        "the pod would not listen on its port {} for {spec}: the server must allow it (devmount-server --allow-reverse {}) and nothing in the pod may be using it",
        spec.listen, spec.listen
    )]
    ReverseRefused { spec: ForwardSpec },
    #[error("{first} and {second} both listen on {} port {}", where_(first.direction), first.listen)]
    Duplicate { first: ForwardSpec, second: ForwardSpec },
    #[error("no connection to the server came within {SESSION_WAIT:?}, so the forwards cannot start")]
    NoSession,
    #[error(transparent)]
    Session(#[from] SessionError),
}

fn where_(direction: Direction) -> &'static str {
    match direction {
        Direction::Local => "local",
        Direction::Remote => "the pod's",
    }
}

/// What a forward is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardState {
    /// Accepting connections.
    Listening,
    /// `-R` only: waiting for a connection to the server to ask it on.
    Waiting,
    /// `-R` only: the current connection refused it; asked again now and then.
    Refused(String),
}

impl fmt::Display for ForwardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardState::Listening => f.write_str("listening"),
            ForwardState::Waiting => f.write_str("waiting for the connection"),
            ForwardState::Refused(why) => write!(f, "refused ({why}), retrying"),
        }
    }
}

/// One forward's state and counters, for `devmount status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardStatus {
    pub spec: ForwardSpec,
    pub state: ForwardState,
    /// Connections being carried now.
    pub open: usize,
    /// Connections since the start, and how many of them could not be forwarded.
    pub total: u64,
    pub failed: u64,
}

impl fmt::Display for ForwardStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}, {} open, {} so far",
            self.spec,
            self.spec.route(),
            self.state,
            self.open,
            self.total
        )?;
        if self.failed > 0 {
            write!(f, ", {} failed", self.failed)?;
        }
        Ok(())
    }
}

/// A forward's shared state.
struct Entry {
    spec: ForwardSpec,
    state: Mutex<ForwardState>,
    open: AtomicUsize,
    total: AtomicU64,
    failed: AtomicU64,
}

impl Entry {
    fn new(spec: ForwardSpec) -> Arc<Entry> {
        Arc::new(Entry {
            spec,
            state: Mutex::new(ForwardState::Waiting),
            open: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    fn set_state(&self, state: ForwardState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    fn status(&self) -> ForwardStatus {
        ForwardStatus {
            spec: self.spec,
            state: self.state.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            open: self.open.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection as open until the guard is dropped.
    fn connection(self: &Arc<Entry>) -> OpenConnection {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

struct OpenConnection(Arc<Entry>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Running forwards; dropping them stops their listeners and connections and asks the server
/// to stop listening for the `-R` ones ([`Forwards::stop`] waits for that).
pub struct Forwards {
    entries: Vec<Arc<Entry>>,
    tasks: Vec<JoinHandle<()>>,
    sessions: SessionWatch,
    /// The sending end, when [`Forwards::start`] made the watch from one session.
    _fixed: Option<watch::Sender<Option<Arc<Session>>>>,
    /// Whether the server still listens for our `-R` forwards.
    registered: bool,
}

impl Forwards {
    /// Starts `specs` over `session`, for as long as it lasts.
    pub async fn start(session: &Arc<Session>, specs: &[ForwardSpec]) -> Result<Forwards, ForwardError> {
        let (tx, rx) = watch::channel(Some(session.clone()));
        let mut forwards = Forwards::follow(rx, specs).await?;
        forwards._fixed = Some(tx);
        Ok(forwards)
    }

    /// Starts `specs` over whichever session `sessions` holds, from now on. Fails on a busy
    /// local port, or when the current session's server refuses a `-R` forward.
    pub async fn follow(mut sessions: SessionWatch, specs: &[ForwardSpec]) -> Result<Forwards, ForwardError> {
        let mut seen = HashSet::new();
        for (i, spec) in specs.iter().enumerate() {
            if !seen.insert((spec.direction, spec.listen)) {
                let first = specs[..i]
                    .iter()
                    .find(|s| (s.direction, s.listen) == (spec.direction, spec.listen))
                    .copied()
                    .unwrap_or(*spec);
                return Err(ForwardError::Duplicate { first, second: *spec });
            }
        }
        let entries: Vec<Arc<Entry>> = specs.iter().copied().map(Entry::new).collect();
        // Listen first: a busy local port is the likeliest mistake, and costs no round trip.
        let mut listeners = Vec::new();
        for entry in entries.iter().filter(|e| e.spec.direction == Direction::Local) {
            let spec = entry.spec;
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, spec.listen)).await.map_err(|e| {
                if e.kind() == io::ErrorKind::AddrInUse {
                    ForwardError::Busy { spec }
                } else {
                    ForwardError::Listen { spec, source: e }
                }
            })?;
            listeners.push((listener, entry.clone()));
        }

        let mut forwards = Forwards {
            entries: entries.clone(),
            tasks: Vec::new(),
            sessions: sessions.clone(),
            _fixed: None,
            registered: false,
        };
        let remote: Vec<Arc<Entry>> =
            entries.iter().filter(|e| e.spec.direction == Direction::Remote).cloned().collect();
        if !remote.is_empty() {
            let session = live_session(&mut sessions).await.ok_or(ForwardError::NoSession)?;
            let incoming = session.forwarded_tcpip();
            forwards.registered = true;
            for entry in &remote {
                session.tcpip_forward(entry.spec.listen).await.map_err(|e| match e {
                    SessionError::Refused { .. } => ForwardError::ReverseRefused { spec: entry.spec },
                    e => ForwardError::Session(e),
                })?;
                entry.set_state(ForwardState::Listening);
            }
            forwards.tasks.push(tokio::spawn(serve_remote(remote, sessions.clone(), session, incoming)));
        }
        for (listener, entry) in listeners {
            entry.set_state(ForwardState::Listening);
            forwards.tasks.push(tokio::spawn(serve_local(listener, entry, sessions.clone())));
        }
        Ok(forwards)
    }

    /// Each forward's state and counters, in the order they were given.
    pub fn describe(&self) -> Vec<ForwardStatus> {
        self.entries.iter().map(|e| e.status()).collect()
    }

    /// Stops every forward, and waits until the server has stopped listening for the `-R`
    /// ones.
    pub async fn stop(mut self) {
        self.abort();
        let ports = self.remote_ports();
        self.registered = false;
        let session = self.sessions.borrow().clone();
        if let Some(session) = session {
            cancel(&session, &ports).await;
        }
    }

    fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    fn remote_ports(&self) -> Vec<u16> {
        self.entries.iter().filter(|e| e.spec.direction == Direction::Remote).map(|e| e.spec.listen).collect()
    }
}

impl Drop for Forwards {
    fn drop(&mut self) {
        self.abort();
        if !self.registered {
            return;
        }
        // The connection may outlive the forwards: the server should stop listening.
        let session = self.sessions.borrow().clone();
        if let (Ok(runtime), Some(session)) = (tokio::runtime::Handle::try_current(), session) {
            let ports = self.remote_ports();
            runtime.spawn(async move { cancel(&session, &ports).await });
        }
    }
}

async fn cancel(session: &Session, ports: &[u16]) {
    if session.is_closed() {
        return;
    }
    for &port in ports {
        if let Err(e) = session.cancel_tcpip_forward(port).await {
            tracing::debug!("cancel-tcpip-forward of port {port}: {e}");
        }
    }
}

/// The current session once it is there and alive, waiting up to [`SESSION_WAIT`].
async fn live_session(sessions: &mut SessionWatch) -> Option<Arc<Session>> {
    let live = sessions.wait_for(|s| s.as_ref().is_some_and(|s| !s.is_closed()));
    match tokio::time::timeout(SESSION_WAIT, live).await {
        Ok(Ok(session)) => session.clone(),
        _ => None,
    }
}

// ---- -L --------------------------------------------------------------------------------------

async fn serve_local(listener: TcpListener, entry: Arc<Entry>, sessions: SessionWatch) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(local_connection(tcp, peer, entry.clone(), sessions.clone()));
                }
                Err(e) => {
                    tracing::warn!("{}: cannot accept a connection: {e}", entry.spec);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn local_connection(tcp: TcpStream, peer: SocketAddr, entry: Arc<Entry>, mut sessions: SessionWatch) {
    let _open = entry.connection();
    let _ = tcp.set_nodelay(true);
    let Some(session) = live_session(&mut sessions).await else {
        tracing::warn!("{}: connection from {peer} dropped: no connection to the server", entry.spec);
        entry.failed();
        return;
    };
    match session.direct_tcpip(entry.spec.connect, peer).await {
        Ok(channel) => {
            let (tcp_rx, tcp_tx) = tcp.into_split();
            if let Err(e) = pump(channel, tcp_rx, tcp_tx).await {
                tracing::debug!("{}: connection from {peer} ended: {e}", entry.spec);
            }
        }
        Err(e) => {
            tracing::warn!("{}: connection from {peer} not forwarded: {e}", entry.spec);
            entry.failed();
        }
    }
}

// ---- -R --------------------------------------------------------------------------------------

/// Serves the `-R` forwards on each session in turn, asking each new one for them.
async fn serve_remote(
    entries: Vec<Arc<Entry>>,
    mut sessions: SessionWatch,
    mut session: Arc<Session>,
    mut incoming: mpsc::Receiver<ForwardedTcpip>,
) {
    let mut unregistered = Vec::new();
    loop {
        serve_remote_on(&entries, &mut sessions, &session, &mut incoming, unregistered).await;
        for entry in &entries {
            entry.set_state(ForwardState::Waiting);
        }
        let old = session.clone();
        let next = sessions.wait_for(|s| s.as_ref().is_some_and(|s| !Arc::ptr_eq(s, &old) && !s.is_closed()));
        session = match next.await {
            Ok(next) => next.as_ref().map(Arc::clone).unwrap_or(old),
            // Nobody will ever give another session.
            Err(_) => return,
        };
        incoming = session.forwarded_tcpip();
        unregistered = entries.clone();
    }
}

/// Serves the `-R` forwards on one session until it ends or another takes its place, asking
/// it for those in `unregistered` now and again after each refusal.
async fn serve_remote_on(
    entries: &[Arc<Entry>],
    sessions: &mut SessionWatch,
    session: &Arc<Session>,
    incoming: &mut mpsc::Receiver<ForwardedTcpip>,
    mut unregistered: Vec<Arc<Entry>>,
) {
    let mut connections = JoinSet::new();
    let mut watching = true;
    let mut delay = RETRY_FIRST;
    let mut retry_at = Instant::now();
    loop {
        tokio::select! {
            forwarded = incoming.recv() => match forwarded {
                Some(forwarded) => route(entries, forwarded, &mut connections),
                None => return,
            },
            _ = session.closed() => return,
            changed = sessions.changed(), if watching => match changed {
                Ok(()) => {
                    let current = sessions.borrow_and_update().clone();
                    if !current.is_some_and(|c| Arc::ptr_eq(&c, session)) {
                        return;
                    }
                }
                Err(_) => watching = false,
            },
            Some(_) = connections.join_next() => {}
            () = tokio::time::sleep_until(retry_at), if !unregistered.is_empty() => {
                let mut refused = Vec::new();
                for entry in unregistered.drain(..) {
                    match session.tcpip_forward(entry.spec.listen).await {
                        Ok(()) => entry.set_state(ForwardState::Listening),
                        Err(e) => {
                            tracing::warn!("{}: the server refused it again: {e}", entry.spec);
                            entry.set_state(ForwardState::Refused(e.to_string()));
                            refused.push(entry);
                        }
                    }
                }
                unregistered = refused;
                retry_at = Instant::now() + delay;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

fn route(entries: &[Arc<Entry>], forwarded: ForwardedTcpip, connections: &mut JoinSet<()>) {
    let Some(entry) = entries.iter().find(|e| u32::from(e.spec.listen) == forwarded.port) else {
        // Dropping the reply refuses the channel.
        tracing::warn!("refused a forwarded connection to the pod's port {}: not forwarded", forwarded.port);
        return;
    };
    connections.spawn(remote_connection(entry.clone(), forwarded));
}

async fn remote_connection(entry: Arc<Entry>, forwarded: ForwardedTcpip) {
    let _open = entry.connection();
    let ForwardedTcpip { channel, reply, originator, .. } = forwarded;
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, entry.spec.connect));
    match TcpStream::connect(target).await {
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            reply.accept().await;
            let (tcp_rx, tcp_tx) = tcp.into_split();
            if let Err(e) = pump(channel, tcp_rx, tcp_tx).await {
                tracing::debug!("{}: connection from the pod's {originator} ended: {e}", entry.spec);
            }
        }
        Err(e) => {
            tracing::warn!(
                "{}: connection from the pod's {originator} not forwarded: cannot connect to {target}: {e}",
                entry.spec
            );
            entry.failed();
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
        }
    }
}

// ---- bytes -----------------------------------------------------------------------------------

/// Carries bytes both ways between `channel` and a socket's two halves, each end's EOF passed
/// to the other, until the channel closes (after its last bytes are written to the socket) or
/// either side fails.
pub async fn pump(
    channel: Channel<Msg>,
    mut tcp_rx: impl AsyncRead + Unpin,
    mut tcp_tx: impl AsyncWrite + Unpin,
) -> io::Result<()> {
    let (mut rx, tx) = channel.split();
    let (queue_tx, mut queue_rx) = mpsc::channel::<Bytes>(CONNECTION_QUEUE);
    // Reads the channel to its end, whatever the socket does.
    let drain = async move {
        let mut queue = Some(queue_tx);
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(q) = &queue {
                        if q.send(data).await.is_err() {
                            // The socket failed; the writer said so.
                            return;
                        }
                    }
                }
                // The writer finishes the queue, then shuts the socket's sending side.
                ChannelMsg::Eof => queue = None,
                ChannelMsg::Close => return,
                _ => {}
            }
        }
    };
    let to_tcp = async move {
        while let Some(chunk) = queue_rx.recv().await {
            tcp_tx.write_all(&chunk).await?;
        }
        tcp_tx.shutdown().await
    };
    let outbound = async {
        let ((), written) = tokio::join!(drain, to_tcp);
        written
    };
    let inbound = async {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_CHUNK);
            if tcp_rx.read_buf(&mut buf).await? == 0 {
                let _ = tx.eof().await;
                return std::future::pending::<io::Result<()>>().await;
            }
            tx.data_bytes(buf.split().freeze())
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, format!("channel: {e}")))?;
        }
    };
    let result = tokio::select! {
        written = outbound => written,
        failed = inbound => failed,
    };
    let _ = tx.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(direction: Direction, text: &str) -> Result<(u16, u16), String> {
        ForwardSpec::parse(direction, text).map(|s| (s.listen, s.connect)).map_err(|e| e.to_string())
    }

    #[test]
    fn specs_parse() {
        assert_eq!(parse(Direction::Local, "8080:9090"), Ok((8080, 9090)));
        assert_eq!(parse(Direction::Remote, "9000"), Ok((9000, 9000)));
        assert_eq!(parse(Direction::Local, "1:65535"), Ok((1, 65535)));
        let spec = ForwardSpec::parse(Direction::Remote, "9000:3000").unwrap();
        assert_eq!(spec.to_string(), "-R 9000:3000");
        assert_eq!(spec.route(), "pod 127.0.0.1:9000 -> local 127.0.0.1:3000");
    }

    #[test]
    fn bad_specs_say_what_and_how() {
        let cases = [
            (Direction::Local, "", "a port is missing"),
            (Direction::Local, "8080:", "a port is missing"),
            (Direction::Local, "http", "\"http\" is not a port number"),
            (Direction::Local, "70000:80", "\"70000\" is not a port number"),
            (Direction::Remote, "0:80", "port 0 cannot be forwarded"),
            (Direction::Local, "localhost:80:80", "only ports can be given"),
            (Direction::Local, "-1", "\"-1\" is not a port number"),
        ];
        for (direction, text, expected) in cases {
            let msg = parse(direction, text).unwrap_err();
            assert!(msg.contains(expected) && !msg.contains('\n'), "{text:?}: {msg}");
            assert!(msg.contains(direction.flag()) && msg.contains(direction.usage()), "{msg}");
        }
    }

    #[test]
    fn status_reads_as_a_line() {
        let status = ForwardStatus {
            spec: ForwardSpec { direction: Direction::Local, listen: 8080, connect: 80 },
            state: ForwardState::Listening,
            open: 2,
            total: 7,
            failed: 1,
        };
        assert_eq!(
            status.to_string(),
            "-L 8080:80 (local 127.0.0.1:8080 -> pod 127.0.0.1:80): listening, 2 open, 7 so far, 1 failed"
        );
    }
}
