//! Keeps the mount's connection: when it drops, connects again with backoff and puts the new
//! connection under everything that used the old one.
//!
//! Meanwhile nothing fails: lookups and reads the cache cannot answer wait in
//! [`crate::fs::remote::Remote`] (a signal to the asking process ends the wait with EINTR),
//! writes go on into the journal, whose sender pauses at the first op that meets the lost
//! connection. On reconnect the remote sends over the new connection, the sender resumes with a
//! new applier (re-sending what was in flight), and a new feed starts: its `hello` drops every
//! cache entry, since events were missed while it was down.
//!
//! The current connection is published in a `watch` ([`crate::forward::SessionWatch`]): `None`
//! while there is none. Port forwards and `devmount exec` use whatever it holds, so everything
//! rides the mount's one connection.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Result;
use devmount_server::sftp::client::SftpClient;
use futures::future::BoxFuture;
use tokio::io::DuplexStream;
use tokio::sync::watch;

use crate::echo::Work;
use crate::fs::Fs;
use crate::session::{self, ConnectOptions, FeedStream, Session, Target};

/// The first wait before a new attempt; it doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// What a connection is made from.
pub struct Dial {
    pub target: Target,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    pub options: ConnectOptions,
    /// Where the bytes go: `None` is TCP to the target; a transport (a Kubernetes
    /// port-forward) gives a new stream for each connection.
    pub transport: Option<Arc<dyn Transport>>,
}

/// A way to the server other than TCP.
pub trait Transport: Send + Sync {
    /// A new stream that reaches the server; called for each connection, so it may find a
    /// new pod first.
    fn open(&self) -> BoxFuture<'_, Result<DuplexStream>>;
}

impl Dial {
    /// An authenticated connection over the transport.
    pub async fn session(&self) -> Result<Session> {
        let (target, identity, known_hosts, options) =
            (&self.target, &self.identity, &self.known_hosts, &self.options);
        Ok(match &self.transport {
            None => session::connect(target, identity, known_hosts, options).await?,
            Some(transport) => {
                let stream = transport.open().await?;
                session::connect_stream(stream, target, identity, known_hosts, options).await?
            }
        })
    }

    /// A connection, its SFTP client, and (with devmount-server) its feed.
    pub async fn connect(&self, with_feed: bool) -> Result<(Session, SftpClient, Option<FeedStream>)> {
        let session = self.session().await?;
        let (sftp, _) = session.open_sftp().await?;
        let feed = if with_feed { Some(session.open_feed().await?) } else { None };
        Ok((session, sftp, feed))
    }
}

/// Serves the connection until `stop` turns true, then says goodbye to the server. Each
/// connection is published in `current` while it lasts.
pub async fn keep(
    dial: Dial,
    fs: Arc<Fs>,
    mut session: Arc<Session>,
    mut feed: Option<FeedStream>,
    notices: Option<mpsc::Sender<Work>>,
    current: watch::Sender<Option<Arc<Session>>>,
    mut stop: watch::Receiver<bool>,
) {
    let address = dial.target.address();
    loop {
        current.send_replace(Some(session.clone()));
        let spare = session.clone();
        tokio::spawn(async move { spare.open_spare().await });
        let mut feed_task = None;
        if let (Some(feed), Some(notices)) = (feed.take(), notices.clone()) {
            let fs = fs.clone();
            feed_task = Some(tokio::spawn(async move {
                let why = crate::feed::run(fs.clone(), feed, notices).await;
                tracing::warn!("change feed ended: {why}; short timeouts until it is back");
                fs.cache().feed_down();
                fs.feed_applied(None);
            }));
        }
        let sftp = fs.remote().sftp();
        tokio::select! {
            why = session.closed() => tracing::warn!("connection to {address} lost: {why}; reconnecting"),
            // The channel can end under a connection that lives on; nothing would bring the
            // mount's requests back but a new one.
            why = sftp.closed() => {
                tracing::warn!("the SFTP session with {address} ended ({why}); reconnecting");
                session.end().await;
            }
            () = stopped(&mut stop) => {
                current.send_replace(None);
                goodbye(session).await;
                return;
            }
        }
        current.send_replace(None);
        if let Some(task) = feed_task {
            // It ends with its connection; the next feed must not be marked down by it.
            let _ = task.await;
        }
        let mut delay = FIRST_DELAY;
        let (new_session, sftp, new_feed) = loop {
            tokio::select! {
                r = dial.connect(fs.remote().is_devmount()) => match r {
                    Ok(c) => break c,
                    Err(e) => tracing::warn!("reconnecting to {address}: {e:#}; next try in {delay:?}"),
                },
                () = stopped(&mut stop) => return,
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => return,
            }
            delay = (delay * 2).min(MAX_DELAY);
        };
        fs.reconnected(sftp);
        tracing::warn!("reconnected to {address}");
        session = Arc::new(new_session);
        feed = new_feed;
    }
}

/// Says goodbye to the server, if nothing else holds the connection any more.
async fn goodbye(session: Arc<Session>) {
    match Arc::try_unwrap(session) {
        Ok(session) => session.disconnect().await,
        // A command still running holds it: the connection closes when that lets go.
        Err(session) => tracing::debug!(
            "{} other user(s) of the connection to {} remain; not saying goodbye",
            Arc::strong_count(&session) - 1,
            session.target().address()
        ),
    }
}

/// Resolves once the mount is told to stop (or whoever could tell it is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}
