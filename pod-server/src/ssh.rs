//! The SSH front door: authentication and channel dispatch, nothing else.
//!
//! Every session channel gets a task that owns its `russh::Channel` and reads the requests on
//! it in order (pty-req, env, then exec, shell or subsystem) before handing the channel to
//! [`exec`](crate::exec), [`sftp`](crate::sftp) or [`feed`](crate::feed). russh delivers each
//! request both to that task and to the [`Handler`] callbacks below; the callbacks only answer
//! success or failure, so the reply never depends on the task having run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, MethodKind, MethodSet};

use crate::exec::{self, ExecRequest, PtyRequest};
use crate::feed::Feed;
use crate::forward::{self, AllowList};
use crate::reaper::Reaper;
use crate::sftp::server::{Limits, SftpContext};
use crate::{keys, sftp};

/// Subsystem names this server answers.
pub const SUBSYSTEM_SFTP: &str = "sftp";
pub const SUBSYSTEM_FEED: &str = crate::proto::feed::SUBSYSTEM;

/// What every connection shares.
pub struct Shared {
    /// `--root`, canonical.
    pub root: PathBuf,
    pub authorized_keys: PathBuf,
    pub allow: AllowList,
    pub feed: Arc<Feed>,
    pub reaper: Arc<Reaper>,
    pub sftp_limits: Limits,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(
        root: PathBuf,
        authorized_keys: PathBuf,
        allow: AllowList,
        feed: Arc<Feed>,
        reaper: Arc<Reaper>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            root,
            authorized_keys,
            allow,
            feed,
            reaper,
            sftp_limits: Limits::default(),
            next_conn: AtomicU64::new(1),
        })
    }
}

/// The russh server configuration: our host key, public key authentication only, TCP_NODELAY
/// (russh leaves Nagle on, which costs 40 ms per small SFTP reply), keepalives so a vanished
/// client is noticed, and no inactivity timeout (a mounted workdir may sit idle for hours).
pub fn config(host_key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        nodelay: true,
        auth_rejection_time: Duration::from_millis(300),
        // OpenSSH probes with "none" first on every connection; answering it at once keeps
        // connection setup at network speed.
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        window_size: 8 << 20,
        maximum_packet_size: 65535,
        ..Default::default()
    }
}

/// Creates one [`Connection`] per accepted client.
pub struct Server(pub Arc<Shared>);

impl russh::server::Server for Server {
    type Handler = Connection;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Connection {
        let id = self.0.next_conn.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(conn = id, ?peer, "connection");
        Connection { shared: self.0.clone(), id, peer, reverse: HashMap::new() }
    }

    fn handle_session_error(&mut self, error: anyhow::Error) {
        tracing::debug!("connection ended: {error:#}");
    }
}

/// One SSH connection.
pub struct Connection {
    shared: Arc<Shared>,
    /// Identifies this connection to the feed, so its own SFTP changes are marked as such.
    id: u64,
    peer: Option<SocketAddr>,
    reverse: HashMap<(String, u32), forward::Reverse>,
}

impl Connection {
    fn reject(&self, user: &str, key: &russh::keys::PublicKey, why: &str) -> Auth {
        tracing::warn!(
            "refused public key {} for user {user:?} from {}: {why}",
            keys::fingerprint(key),
            self.peer.map_or_else(|| "?".to_owned(), |p| p.to_string()),
        );
        Auth::reject()
    }
}

impl Handler for Connection {
    type Error = anyhow::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.check_key(user, offer.public_key)
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let auth = self.check_key(user, key.public_key)?;
        if matches!(auth, Auth::Accept) {
            tracing::info!(conn = self.id, "accepted key {}", keys::fingerprint(key.public_key));
        }
        Ok(auth)
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        tracing::warn!("refused password authentication for user {user:?}: public keys only");
        Ok(Auth::reject())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(session_channel(self.shared.clone(), self.id, channel, session.handle()));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let shared = self.shared.clone();
        let host = host.to_owned();
        tokio::spawn(async move { forward::direct(&shared.allow, channel, host, port, reply).await });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match forward::reverse(&self.shared.allow, session.handle(), address, *port).await {
            Some(fwd) => {
                self.reverse.insert((address.to_owned(), *port), fwd);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.reverse.remove(&(address.to_owned(), port)).is_some())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(session.channel_success(channel)?)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == SUBSYSTEM_SFTP || name == SUBSYSTEM_FEED {
            session.channel_success(channel)?;
        } else {
            tracing::info!(conn = self.id, "refused unknown subsystem {name:?}");
            session.channel_failure(channel)?;
        }
        Ok(())
    }
}

impl Connection {
    fn check_key(&self, user: &str, key: &russh::keys::PublicKey) -> anyhow::Result<Auth> {
        match keys::is_authorized(&self.shared.authorized_keys, key) {
            Ok(true) => Ok(Auth::Accept),
            Ok(false) => Ok(self.reject(user, key, "not in the authorized keys")),
            Err(e) => Ok(self.reject(user, key, &format!("{e:#}"))),
        }
    }
}

/// Reads a session channel's requests in order and hands the channel to whatever it asks for.
async fn session_channel(
    shared: Arc<Shared>,
    conn: u64,
    mut channel: Channel<Msg>,
    handle: russh::server::Handle,
) {
    match read_session_request(&mut channel, shared.root.clone()).await {
        Some(SessionRequest::Exec(req)) => exec::run(channel, handle, req, shared.reaper.clone()).await,
        Some(SessionRequest::Subsystem(name)) => subsystem(&shared, conn, channel, &name).await,
        None => {}
    }
}

/// What a session channel asked for.
pub(crate) enum SessionRequest {
    /// `exec` or `shell`, with the `pty-req` and `env` requests that came before it.
    Exec(ExecRequest),
    Subsystem(String),
}

/// Reads a session channel's requests in order, collecting `pty-req` and `env`, up to the first
/// `exec`, `shell` or `subsystem`; `None` if the channel ends before one. A command would run in
/// `cwd`.
pub(crate) async fn read_session_request(channel: &mut Channel<Msg>, cwd: PathBuf) -> Option<SessionRequest> {
    let mut pty = None;
    let mut env = Vec::new();
    while let Some(msg) = channel.wait().await {
        let command = match msg {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                pty = Some(PtyRequest {
                    term,
                    cols: col_width,
                    rows: row_height,
                    pix_width,
                    pix_height,
                    modes: terminal_modes,
                });
                continue;
            }
            ChannelMsg::SetEnv { variable_name, variable_value, .. } => {
                env.push((variable_name, variable_value));
                continue;
            }
            ChannelMsg::Exec { command, .. } => Some(command),
            ChannelMsg::RequestShell { .. } => None,
            ChannelMsg::RequestSubsystem { name, .. } => return Some(SessionRequest::Subsystem(name)),
            ChannelMsg::Eof | ChannelMsg::Close => return None,
            _ => continue,
        };
        return Some(SessionRequest::Exec(ExecRequest { command, pty, env, cwd }));
    }
    None
}

async fn subsystem(shared: &Shared, conn: u64, channel: Channel<Msg>, name: &str) {
    match name {
        SUBSYSTEM_SFTP => {
            let ctx = Arc::new(SftpContext {
                root: shared.root.clone(),
                conn,
                changes: shared.feed.clone(),
                limits: shared.sftp_limits,
            });
            // Not `into_stream`, which closes the channel when dropped: OpenSSH's clients (scp)
            // want an exit status before the close, as sshd sends for its sftp-server.
            let (read, write) = channel.split();
            let stream = tokio::io::join(channel_reader(read), write.make_writer());
            let status = match sftp::server::serve(stream, ctx).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!(conn, "sftp session ended: {e:#}");
                    1
                }
            };
            let _ = write.exit_status(status).await;
            let _ = write.eof().await;
            let _ = write.close().await;
        }
        SUBSYSTEM_FEED => {
            // The feed only writes; the client ends it by closing the channel, which the
            // writer alone might not notice while no change happens.
            let mut channel = channel;
            let writer = channel.make_writer();
            let closed = async {
                while let Some(msg) = channel.wait().await {
                    if matches!(msg, ChannelMsg::Eof | ChannelMsg::Close) {
                        break;
                    }
                }
            };
            tokio::select! {
                result = crate::feed::serve(&shared.feed, conn, writer) => {
                    if let Err(e) = result {
                        tracing::debug!(conn, "feed session ended: {e}");
                    }
                }
                () = closed => {}
            }
            let _ = channel.close().await;
        }
        _ => {
            let _ = channel.close().await;
        }
    }
}

/// The channel's data as an owned reader that ends at EOF or close, without closing the
/// channel when dropped (russh's own owned reader, `into_stream`, does).
fn channel_reader(read: ChannelReadHalf) -> impl tokio::io::AsyncRead + Send + 'static {
    let data = futures_util::stream::unfold(read, |mut read| async move {
        loop {
            match read.wait().await? {
                ChannelMsg::Data { data } => return Some((Ok::<_, std::io::Error>(data), read)),
                ChannelMsg::Eof | ChannelMsg::Close => return None,
                _ => {}
            }
        }
    });
    tokio_util::io::StreamReader::new(Box::pin(data))
}
