//! One SSH connection to the server: TCP (or any byte stream), the pinned host key, public-key
//! authentication, keepalives, and the channels the rest of the client rides on: the SFTP
//! subsystem, the change feed and exec. Knows nothing of files.
//!
//! The host key must be listed in the known_hosts file given; there is no way around that.
//! Every failure is a [`SessionError`] whose message is one line naming the problem and its fix.

mod feed;
mod known_hosts;
mod target;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use devmount_server::proto::feed::SUBSYSTEM as FEED_SUBSYSTEM;
use devmount_server::sftp::client::{self as sftp, ServerInfo, SftpClient, SftpError};
use known_hosts::host_pattern;
use russh::client::{self, AuthResult, ChannelOpenHandle, DisconnectReason, Handle, Msg};
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, ChannelStream, Disconnect, Preferred};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

pub use feed::{FeedError, FeedStream};
pub use known_hosts::fingerprint;
pub use target::{Target, TargetError};

/// Why a connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "cannot reach {address}: {reason}; check that the server is running and the host and port are right"
    )]
    Unreachable { address: String, reason: String },
    #[error(
        "the host key of {host} is not in {}: the server offers {fingerprint}; add the server's key to that file if it is the one you expect",
        file.display()
    )]
    HostKeyUnknown { host: String, fingerprint: String, file: PathBuf },
    #[error(
        "the host key of {host} does not match {} line {line}: the server offers {fingerprint}; someone may be intercepting the connection, or the key changed (then replace that line)",
        file.display()
    )]
    HostKeyMismatch { host: String, fingerprint: String, file: PathBuf, line: usize },
    #[error("known_hosts file {} {reason}; give the file that lists the server's host key", file.display())]
    KnownHosts { file: PathBuf, reason: String },
    #[error(
        "{user}@{address} refused the key {fingerprint} from {}; add its public key to the server's authorized_keys, or check the user name",
        identity.display()
    )]
    AuthRefused { user: String, address: String, fingerprint: String, identity: PathBuf },
    #[error("identity file {} {reason}", file.display())]
    Identity { file: PathBuf, reason: String },
    #[error("SSH protocol error with {address}: {detail}")]
    Protocol { address: String, detail: String },
    #[error("{address} does not offer the SSH subsystem {subsystem:?}")]
    Unsupported { address: String, subsystem: &'static str },
    #[error("the SSH connection to {address} is closed: {reason}")]
    Closed { address: String, reason: String },
    #[error("{address} refused {what}: {reason}")]
    Refused { address: String, what: String, reason: String },
    // The source is printed by whoever prints the chain ({:#}), not here as well.
    #[error("the SFTP session with {address} did not start")]
    Sftp {
        address: String,
        #[source]
        source: SftpError,
    },
}

/// How a connection is made and kept.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// For the TCP connection, the SSH handshake and authentication together.
    pub connect_timeout: Duration,
    /// A keepalive goes out after this long without a word from the server...
    pub keepalive_interval: Duration,
    /// ...and the connection is given up after this many unanswered in a row.
    pub keepalive_max: usize,
    /// For opening a channel or starting a subsystem, and for [`Session::rtt`].
    pub request_timeout: Duration,
    /// What the SFTP client keeps in flight.
    pub sftp: sftp::Config,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(15),
            keepalive_interval: Duration::from_secs(5),
            keepalive_max: 3,
            request_timeout: Duration::from_secs(30),
            sftp: sftp::Config { max_in_flight: 128, max_bytes_in_flight: 16 << 20 },
        }
    }
}

/// SSH receive window per channel: a large one keeps bulk reads streaming over a long round
/// trip (16 MiB per 20 ms is 800 MB/s).
const WINDOW_SIZE: u32 = 16 << 20;
/// The largest SSH packet russh accepts for a channel.
const MAX_PACKET_SIZE: u32 = 65535;
/// Messages a channel may queue before the connection stops reading from the socket.
const CHANNEL_BUFFER: usize = 256;

/// An authenticated SSH connection. Share it with `Arc`; every method takes `&self`.
pub struct Session {
    handle: Handle<Client>,
    target: Target,
    options: ConnectOptions,
    /// Why the connection ended, once it has; the sender goes away with the connection.
    closed: watch::Receiver<Option<String>>,
    /// Where the handler hands `forwarded-tcpip` channels; see [`Session::forwarded_tcpip`].
    forwarded: ForwardedSlot,
    /// A session channel opened ahead by [`Session::open_spare`], so that a command costs no
    /// round trip for its channel's opening.
    spare: Mutex<Option<Channel<Msg>>>,
}

/// Connects over TCP to `target` and authenticates with the private key in `identity`, once
/// the server's host key is found in `known_hosts`.
pub async fn connect(
    target: &Target,
    identity: &Path,
    known_hosts: &Path,
    options: &ConnectOptions,
) -> Result<Session, SessionError> {
    let local = LocalSetup::load(target, identity, known_hosts)?;
    let deadline = tokio::time::Instant::now() + options.connect_timeout;
    let stream = tcp_connect(target, deadline).await?;
    tokio::time::timeout_at(deadline, handshake(stream, target, local, options))
        .await
        .unwrap_or_else(|_| Err(handshake_timeout(target, options)))
}

/// Like [`connect`], over a stream that already reaches the server (a Kubernetes port-forward,
/// an in-memory pipe). The host key is still checked against `known_hosts` under the target's
/// host and port.
pub async fn connect_stream<S>(
    stream: S,
    target: &Target,
    identity: &Path,
    known_hosts: &Path,
    options: &ConnectOptions,
) -> Result<Session, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let local = LocalSetup::load(target, identity, known_hosts)?;
    tokio::time::timeout(options.connect_timeout, handshake(stream, target, local, options))
        .await
        .unwrap_or_else(|_| Err(handshake_timeout(target, options)))
}

/// What a connection needs from local files, read before any network traffic so that a
/// mistake in them is reported as such, whatever the network does.
struct LocalSetup<'a> {
    key: PrivateKey,
    identity: &'a Path,
    known_hosts: &'a Path,
    /// The types of the host keys known_hosts lists for the target.
    known: Vec<Algorithm>,
}

impl<'a> LocalSetup<'a> {
    fn load(
        target: &Target,
        identity: &'a Path,
        known_hosts: &'a Path,
    ) -> Result<LocalSetup<'a>, SessionError> {
        let known = known_hosts::known_algorithms(&target.host, target.port, known_hosts)?;
        Ok(LocalSetup { key: load_identity(identity)?, identity, known_hosts, known })
    }
}

fn handshake_timeout(target: &Target, options: &ConnectOptions) -> SessionError {
    SessionError::Unreachable {
        address: target.address(),
        reason: format!("no SSH handshake within {:?}", options.connect_timeout),
    }
}

/// Reads an unencrypted private key (OpenSSH or PEM format).
fn load_identity(file: &Path) -> Result<PrivateKey, SessionError> {
    let fail = |reason: String| SessionError::Identity { file: file.to_owned(), reason };
    let text = std::fs::read(file).map_err(|e| fail(format!("cannot be read: {e}")))?;
    let text = String::from_utf8(text).map_err(|_| fail("is not a private key file (not text)".into()))?;
    if text.trim_start().starts_with("ssh-") || text.trim_start().starts_with("ecdsa-") {
        return Err(fail("holds a public key; give the private key file (without .pub)".into()));
    }
    russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => fail(
            "is protected by a passphrase; give an unencrypted key (ssh-keygen -p -N '' -f FILE removes the passphrase)"
                .into(),
        ),
        e => fail(format!("is not a usable private key: {e}")),
    })
}

/// Resolves the host and tries each address in turn until `deadline`.
async fn tcp_connect(target: &Target, deadline: tokio::time::Instant) -> Result<TcpStream, SessionError> {
    let unreachable = |reason: String| SessionError::Unreachable { address: target.address(), reason };
    let timed_out = || unreachable("timed out".into());
    let addrs =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host((target.host.as_str(), target.port)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| unreachable(format!("cannot resolve the host name: {e}")))?
            .collect::<Vec<_>>();
    let several = addrs.len() > 1;
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if several => last = Some(format!("{addr}: {e}")),
            Ok(Err(e)) => last = Some(e.to_string()),
            Ok(Ok(stream)) => {
                // Every SFTP request is a small packet waiting for a small reply: Nagle's
                // algorithm would hold each one back for up to 40 ms.
                stream.set_nodelay(true).map_err(|e| unreachable(format!("cannot set TCP_NODELAY: {e}")))?;
                return Ok(stream);
            }
        }
    }
    Err(unreachable(last.unwrap_or_else(|| "the host name has no address".into())))
}

async fn handshake<S>(
    stream: S,
    target: &Target,
    local: LocalSetup<'_>,
    options: &ConnectOptions,
) -> Result<Session, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let LocalSetup { key, identity, known_hosts, known } = local;
    let address = target.address();
    let config = Arc::new(client::Config {
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        channel_buffer_size: CHANNEL_BUFFER,
        inactivity_timeout: None,
        keepalive_interval: Some(options.keepalive_interval),
        keepalive_max: options.keepalive_max,
        nodelay: true,
        preferred: preferred_for(&known),
        ..Default::default()
    });
    let (closed_tx, closed) = watch::channel(None);
    let forwarded = ForwardedSlot::default();
    let handler = Client {
        host: target.host.clone(),
        port: target.port,
        known_hosts: known_hosts.to_owned(),
        closed: closed_tx,
        forwarded: forwarded.clone(),
    };
    let mut handle = client::connect_stream(config, stream, handler).await.map_err(|e| match e {
        HandlerError::HostKey(e) => e,
        HandlerError::Ssh(e) => handshake_error(&address, e),
    })?;

    let protocol =
        |e: russh::Error| SessionError::Protocol { address: address.clone(), detail: e.to_string() };
    // RSA keys sign with the best hash the server announces; a server that announces nothing
    // predates the announcement but not SHA-2 signatures (OpenSSH 7.2).
    let hash = if key.algorithm().is_rsa() {
        handle.best_supported_rsa_hash().await.map_err(protocol)?.unwrap_or(Some(HashAlg::Sha512))
    } else {
        None
    };
    let fingerprint = fingerprint(key.public_key());
    let auth = handle
        .authenticate_publickey(target.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await
        .map_err(protocol)?;
    match auth {
        AuthResult::Success => {}
        AuthResult::Failure { .. } => {
            return Err(SessionError::AuthRefused {
                user: target.user.clone(),
                address,
                fingerprint,
                identity: identity.to_owned(),
            })
        }
    }
    tracing::debug!(target = %target, "connected");
    let spare = Mutex::new(None);
    Ok(Session { handle, target: target.clone(), options: *options, closed, forwarded, spare })
}

fn handshake_error(address: &str, e: russh::Error) -> SessionError {
    let detail = match e {
        russh::Error::Disconnect | russh::Error::HUP => {
            "the server closed the connection during the handshake".into()
        }
        russh::Error::IO(e) => format!("the connection failed during the handshake: {e}"),
        e => e.to_string(),
    };
    SessionError::Protocol { address: address.to_owned(), detail }
}

/// russh's algorithm preferences, with the host key types known_hosts lists for this host
/// first, as OpenSSH orders them: a server with several host keys then shows the one the file
/// can vouch for. Where the CPU has AES instructions, AES-GCM comes before ChaCha20-Poly1305:
/// every byte of the mount crosses the cipher, and russh's Poly1305 alone took a quarter of
/// the daemon's CPU time on a bulk write, several times what AES-GCM costs there.
fn preferred_for(known: &[Algorithm]) -> Preferred {
    let default = Preferred::default();
    let (mut first, rest): (Vec<Algorithm>, Vec<Algorithm>) =
        default.key.iter().cloned().partition(|a| known.iter().any(|k| known_hosts::same_type(k, a)));
    first.extend(rest);
    let cipher = if aes_in_hardware() {
        let (mut gcm, others): (Vec<_>, Vec<_>) =
            default.cipher.iter().copied().partition(|c| *c == russh::cipher::AES_256_GCM);
        gcm.extend(others);
        Cow::Owned(gcm)
    } else {
        default.cipher.clone()
    };
    Preferred { key: Cow::Owned(first), cipher, ..default }
}

fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return false;
}

impl Session {
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Starts the `sftp` subsystem and the pipelining client on it, with
    /// [`ConnectOptions::sftp`] in flight.
    pub async fn open_sftp(&self) -> Result<(SftpClient, ServerInfo), SessionError> {
        let (stream, early) = self.subsystem("sftp").await?;
        if !early.is_empty() {
            return Err(self.protocol("the server sent SFTP data before the client's INIT"));
        }
        SftpClient::connect_with(stream, self.options.sftp)
            .await
            .map_err(|source| SessionError::Sftp { address: self.target.address(), source })
    }

    /// Starts the change feed. A server without one (plain OpenSSH) answers with
    /// [`SessionError::Unsupported`] at once. Read the feed promptly: while one channel's
    /// messages wait unread, the connection stops reading the socket for all of them.
    pub async fn open_feed(&self) -> Result<FeedStream, SessionError> {
        let (stream, early) = self.subsystem(FEED_SUBSYSTEM).await?;
        Ok(FeedStream::new(stream, early))
    }

    /// Opens a session channel and asks it to run `command`. The server's answer to the
    /// request (`Success` or `Failure`), the output and the exit status arrive on the channel.
    pub async fn exec(&self, command: &[u8]) -> Result<Channel<Msg>, SessionError> {
        let channel = self.open_channel().await?;
        channel.exec(true, command).await.map_err(|e| self.channel_error(e))?;
        Ok(channel)
    }

    /// A bare session channel, for a caller that makes its own requests on it (pty-req, env,
    /// exec or shell): the one opened ahead, if there is one, else a new one.
    pub async fn channel(&self) -> Result<Channel<Msg>, SessionError> {
        let spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner).take();
        match spare {
            Some(channel) => Ok(channel),
            None => self.open_channel().await,
        }
    }

    /// Opens a session channel ahead for the next [`Session::channel`], unless one waits
    /// already. A failure is left for that call to meet.
    pub async fn open_spare(&self) {
        if self.spare.lock().unwrap_or_else(PoisonError::into_inner).is_some() {
            return;
        }
        if let Ok(channel) = self.open_channel().await {
            // Two callers may race here: the second channel is dropped, which closes it.
            self.spare.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(channel);
        }
    }

    /// Opens a `direct-tcpip` channel to the server's `127.0.0.1:port`, on behalf of a local
    /// connection from `originator`.
    pub async fn direct_tcpip(&self, port: u16, originator: SocketAddr) -> Result<Channel<Msg>, SessionError> {
        let open = self.handle.channel_open_direct_tcpip(
            "127.0.0.1",
            u32::from(port),
            originator.ip().to_string(),
            u32::from(originator.port()),
        );
        match tokio::time::timeout(self.options.request_timeout, open).await {
            Err(_) => Err(self.protocol(&format!("no answer to a direct-tcpip request for port {port} in time"))),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => Err(SessionError::Refused {
                address: self.target.address(),
                what: format!("to connect to its 127.0.0.1:{port}"),
                reason: open_failure_reason(&reason),
            }),
            Ok(Err(e)) => Err(self.channel_error(e)),
            Ok(Ok(channel)) => Ok(channel),
        }
    }

    /// Asks the server to listen on its `127.0.0.1:port` (`tcpip-forward`). Each connection
    /// it accepts there arrives as a channel on the receiver [`Session::forwarded_tcpip`] gave.
    pub async fn tcpip_forward(&self, port: u16) -> Result<(), SessionError> {
        let request = self.handle.tcpip_forward("127.0.0.1", u32::from(port));
        match tokio::time::timeout(self.options.request_timeout, request).await {
            Err(_) => Err(self.protocol(&format!("no answer to a tcpip-forward request for port {port} in time"))),
            Ok(Err(russh::Error::RequestDenied)) => Err(SessionError::Refused {
                address: self.target.address(),
                what: format!("to listen on its 127.0.0.1:{port}"),
                reason: "the request was denied".into(),
            }),
            Ok(Err(e)) => Err(self.channel_error(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Undoes [`Session::tcpip_forward`].
    pub async fn cancel_tcpip_forward(&self, port: u16) -> Result<(), SessionError> {
        let request = self.handle.cancel_tcpip_forward("127.0.0.1", u32::from(port));
        match tokio::time::timeout(self.options.request_timeout, request).await {
            Err(_) => Err(self.protocol(&format!("no answer to cancel-tcpip-forward for port {port} in time"))),
            Ok(Err(e)) => Err(self.channel_error(e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// From now on, the `forwarded-tcpip` channels the server opens arrive here, unanswered;
    /// a previous receiver gets no more. Without a receiver, or while this one is full, they
    /// are refused.
    pub fn forwarded_tcpip(&self) -> mpsc::Receiver<ForwardedTcpip> {
        let (tx, rx) = mpsc::channel(FORWARDED_QUEUE);
        *self.forwarded.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Waits until the connection ends, and says why.
    pub async fn closed(&self) -> String {
        let mut closed = self.closed.clone();
        loop {
            if let Some(reason) = closed.borrow_and_update().clone() {
                return reason;
            }
            if closed.changed().await.is_err() {
                return closed.borrow().clone().unwrap_or_else(|| "the connection ended".into());
            }
        }
    }

    /// One round trip to the server: a keepalive request and its answer.
    pub async fn rtt(&self) -> Result<Duration, SessionError> {
        let start = Instant::now();
        tokio::time::timeout(self.options.request_timeout, self.handle.send_ping())
            .await
            .map_err(|_| {
                self.protocol(&format!("no answer to a ping within {:?}", self.options.request_timeout))
            })?
            .map_err(|e| self.channel_error(e))?;
        let elapsed = start.elapsed();
        // russh also ends the ping when the connection dies before the answer.
        if self.is_closed() {
            return Err(self.closed_error());
        }
        Ok(elapsed)
    }

    /// Ends the connection under every user of it, without waiting for the server: for a
    /// connection about to be replaced.
    pub async fn end(&self) {
        let _ = self.handle.disconnect(Disconnect::ByApplication, "", "en").await;
    }

    /// Says goodbye to the server and waits (briefly) for the connection to end.
    pub async fn disconnect(self) {
        let _ = self.handle.disconnect(Disconnect::ByApplication, "", "en").await;
        let _ = tokio::time::timeout(self.options.request_timeout, self.handle).await;
    }

    async fn open_channel(&self) -> Result<Channel<Msg>, SessionError> {
        tokio::time::timeout(self.options.request_timeout, self.handle.channel_open_session())
            .await
            .map_err(|_| self.protocol("the server did not open a channel in time"))?
            .map_err(|e| self.channel_error(e))
    }

    /// Opens a channel running subsystem `name`. Returns the channel as a byte stream (closed
    /// when dropped) and any data that came with the answer.
    async fn subsystem(&self, name: &'static str) -> Result<(ChannelStream<Msg>, Bytes), SessionError> {
        let mut channel = self.open_channel().await?;
        channel.request_subsystem(true, name).await.map_err(|e| self.channel_error(e))?;
        let deadline = tokio::time::Instant::now() + self.options.request_timeout;
        let mut early = BytesMut::new();
        loop {
            let msg = tokio::time::timeout_at(deadline, channel.wait()).await.map_err(|_| {
                self.protocol(&format!("no answer to the request for subsystem {name:?} in time"))
            })?;
            match msg {
                Some(ChannelMsg::Success) => return Ok((channel.into_stream(), early.freeze())),
                Some(ChannelMsg::Failure) => {
                    let _ = channel.close().await;
                    return Err(SessionError::Unsupported {
                        address: self.target.address(),
                        subsystem: name,
                    });
                }
                Some(ChannelMsg::Data { data }) => early.extend_from_slice(&data),
                Some(_) => {}
                None if self.is_closed() => return Err(self.closed_error()),
                None => {
                    return Err(SessionError::Unsupported { address: self.target.address(), subsystem: name })
                }
            }
        }
    }

    fn protocol(&self, detail: &str) -> SessionError {
        SessionError::Protocol { address: self.target.address(), detail: detail.to_owned() }
    }

    fn closed_error(&self) -> SessionError {
        let reason = self.closed.borrow().clone().unwrap_or_else(|| "the connection ended".into());
        SessionError::Closed { address: self.target.address(), reason }
    }

    fn channel_error(&self, e: russh::Error) -> SessionError {
        if self.is_closed() {
            self.closed_error()
        } else {
            self.protocol(&e.to_string())
        }
    }
}

fn open_failure_reason(reason: &ChannelOpenFailure) -> String {
    match reason {
        ChannelOpenFailure::AdministrativelyProhibited => "administratively prohibited".into(),
        ChannelOpenFailure::ConnectFailed => "the connection failed".into(),
        ChannelOpenFailure::UnknownChannelType => "unknown channel type".into(),
        ChannelOpenFailure::ResourceShortage => "resource shortage".into(),
        ChannelOpenFailure::Other { code, reason } => format!("{reason} (code {code})"),
    }
}

/// A `forwarded-tcpip` channel the server opened for a connection to a port it listens on
/// for us. Answer `reply` (dropping it refuses the channel).
pub struct ForwardedTcpip {
    pub channel: Channel<Msg>,
    pub reply: ChannelOpenHandle,
    /// The server's port that was connected to.
    pub port: u32,
    /// Who connected, as the server tells it.
    pub originator: String,
}

/// `forwarded-tcpip` channels that may wait for their receiver before more are refused.
const FORWARDED_QUEUE: usize = 64;

#[derive(Clone, Default)]
struct ForwardedSlot(Arc<Mutex<Option<mpsc::Sender<ForwardedTcpip>>>>);

/// The russh callbacks: the host-key check, noting why the connection ended, and handing on
/// `forwarded-tcpip` channels.
struct Client {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    closed: watch::Sender<Option<String>>,
    forwarded: ForwardedSlot,
}

#[derive(Debug, thiserror::Error)]
enum HandlerError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    #[error(transparent)]
    HostKey(SessionError),
}

impl client::Handler for Client {
    type Error = HandlerError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, HandlerError> {
        match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                known_hosts::verify(&self.host, self.port, key, &self.known_hosts)
                    .map_err(HandlerError::HostKey)?;
                Ok(true)
            }
            // Never asked for (no certificate algorithms are offered), so never trusted.
            PublicKeyOrCertificate::Certificate(_) => Err(HandlerError::HostKey(SessionError::Protocol {
                address: host_pattern(&self.host, self.port),
                detail: "the server presented a host certificate, which devmount does not ask for".into(),
            })),
        }
    }

    async fn disconnected(&mut self, reason: DisconnectReason<HandlerError>) -> Result<(), HandlerError> {
        let (text, result) = match reason {
            DisconnectReason::ReceivedDisconnect(info) if info.message.is_empty() => {
                ("the server disconnected".to_owned(), Ok(()))
            }
            DisconnectReason::ReceivedDisconnect(info) => {
                (format!("the server disconnected: {}", info.message), Ok(()))
            }
            DisconnectReason::Error(HandlerError::Ssh(russh::Error::KeepaliveTimeout)) => (
                "the server did not answer keepalives".to_owned(),
                Err(HandlerError::Ssh(russh::Error::KeepaliveTimeout)),
            ),
            DisconnectReason::Error(HandlerError::Ssh(russh::Error::IO(e)))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                (
                    "the server or the network closed the connection".to_owned(),
                    Err(russh::Error::IO(e).into()),
                )
            }
            DisconnectReason::Error(e) => (e.to_string(), Err(e)),
        };
        tracing::debug!("SSH connection ended: {text}");
        self.closed.send_replace(Some(text));
        result
    }

    // russh accepts channels the server opens unless told otherwise. An accepted channel
    // nobody reads would stall the connection once its queue fills, so each is refused
    // (dropping the reply refuses it), except `forwarded-tcpip` while someone takes them.

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        let sender = self.forwarded.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(sender) = sender {
            let originator = format!("{originator_address}:{originator_port}");
            // Never waits: this runs on the connection's loop. A full queue refuses the channel.
            let _ = sender.try_send(ForwardedTcpip { channel, reply, port: connected_port, originator });
        }
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        _reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        _reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        _reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        _reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        _reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        _reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_host_key_types_are_asked_for_first() {
        let default = Preferred::default().key.into_owned();
        assert_eq!(preferred_for(&[]).key.into_owned(), default);
        let rsa = preferred_for(&[Algorithm::Rsa { hash: None }]).key.into_owned();
        let firsts: Vec<_> = rsa.iter().take_while(|a| matches!(a, Algorithm::Rsa { .. })).collect();
        assert!(!firsts.is_empty(), "{rsa:?}");
        assert_eq!(rsa.len(), default.len());
        assert!(rsa.iter().skip(firsts.len()).all(|a| !matches!(a, Algorithm::Rsa { .. })), "{rsa:?}");
    }

    #[test]
    fn aes_gcm_is_asked_for_first_where_the_cpu_has_aes() {
        let default = Preferred::default().cipher.into_owned();
        let ours = preferred_for(&[]).cipher.into_owned();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|c| c.as_ref().to_owned());
        let mut want = default.clone();
        want.sort_by_key(|c| c.as_ref().to_owned());
        assert_eq!(sorted, want, "the same ciphers, in another order at most");
        if aes_in_hardware() {
            assert_eq!(ours[0], russh::cipher::AES_256_GCM);
        } else {
            assert_eq!(ours, default);
        }
    }
}
