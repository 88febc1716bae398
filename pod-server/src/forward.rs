//! Port forwarding, allow-listed both ways and always on the pod's loopback.
//!
//! `direct-tcpip` (the client's `-L`) may reach only the ports given with `--allow-forward`,
//! on 127.0.0.1, and the server's own SSH port, at the loopback address it listens on;
//! `tcpip-forward` (the client's `-R`) may bind only the ports given with `--allow-reverse`, on
//! 127.0.0.1. Nothing here ever listens on or connects to an address off loopback.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The ports a connection may forward to and bind.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    pub forward: BTreeSet<u16>,
    pub reverse: BTreeSet<u16>,
    /// The server's own listen address, when it is on loopback (or all addresses): a
    /// `direct-tcpip` to its port reaches it there. That only gives an authenticated client a
    /// second SSH session (OpenSSH's `ssh`, `scp`, `sftp` through `devmount proxy`), never a way
    /// past the allow-list, so it is allowed without `--allow-forward`.
    pub own: Option<SocketAddr>,
}

impl AllowList {
    /// Where a `direct-tcpip` to loopback `port` connects, if it is allowed: the server's own
    /// listener for its own port, even on another loopback address than 127.0.0.1 (where that
    /// port may be some other program's); 127.0.0.1 for a port of `--allow-forward`.
    fn direct_target(&self, port: u16) -> Option<SocketAddr> {
        match self.own {
            Some(own) if own.port() == port => {
                let ip = if own.ip().is_unspecified() { IpAddr::from(Ipv4Addr::LOCALHOST) } else { own.ip() };
                Some(SocketAddr::new(ip, port))
            }
            _ => self.forward.contains(&port).then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        }
    }
}

/// Whether a `direct-tcpip` target names the pod's loopback. Other hosts are refused even on
/// an allowed port: the server is not a pivot into the cluster network.
fn is_loopback_name(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]")
}

/// Answers a `direct-tcpip` request: connects to the port on loopback when allowed and pumps
/// bytes until either side closes. Runs as its own task so a slow connect never holds the session.
pub async fn direct(
    allow: &AllowList,
    channel: Channel<Msg>,
    host: String,
    port: u32,
    reply: ChannelOpenHandle,
) {
    let allowed =
        u16::try_from(port).ok().filter(|_| is_loopback_name(&host)).and_then(|p| allow.direct_target(p));
    let Some(target) = allowed else {
        tracing::warn!("refused direct-tcpip to {host}:{port}: not in --allow-forward on loopback");
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        return;
    };
    let mut tcp = match TcpStream::connect(target).await {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::info!("direct-tcpip to {target} failed: {e}");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    let mut stream = channel.into_stream();
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
        tracing::debug!("direct-tcpip to {target} ended: {e}");
    }
}

/// A bound reverse forward; dropping it stops the listener (connections already accepted run
/// to their end).
pub struct Reverse {
    task: JoinHandle<()>,
}

impl Drop for Reverse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `127.0.0.1:port` for a `tcpip-forward` request when allowed. Each accepted
/// connection opens a `forwarded-tcpip` channel back to the client; one failed connection
/// never takes the listener down.
pub async fn reverse(allow: &AllowList, handle: Handle, address: &str, port: u32) -> Option<Reverse> {
    let Some(port) = u16::try_from(port).ok().filter(|p| allow.reverse.contains(p)) else {
        tracing::warn!("refused tcpip-forward of {address}:{port}: not in --allow-reverse");
        return None;
    };
    let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("tcpip-forward cannot bind 127.0.0.1:{port}: {e}");
            return None;
        }
    };
    let address = address.to_owned();
    let task = tokio::spawn(async move {
        loop {
            let (mut tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!("reverse forward on 127.0.0.1:{port}: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let handle = handle.clone();
            let address = address.clone();
            tokio::spawn(async move {
                let channel = match handle
                    .channel_open_forwarded_tcpip(
                        address,
                        u32::from(port),
                        peer.ip().to_string(),
                        u32::from(peer.port()),
                    )
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!("reverse forward on 127.0.0.1:{port}: client refused a channel: {e}");
                        return;
                    }
                };
                let mut stream = channel.into_stream();
                if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
                    tracing::debug!("reverse forward on 127.0.0.1:{port} ended: {e}");
                }
            });
        }
    });
    Some(Reverse { task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_port_reaches_the_own_listener_and_others_need_the_allow_list() {
        let allow = AllowList {
            forward: [8080].into(),
            own: Some(SocketAddr::from(([127, 3, 4, 5], 22022))),
            ..AllowList::default()
        };
        assert_eq!(allow.direct_target(22022), Some(SocketAddr::from(([127, 3, 4, 5], 22022))));
        assert_eq!(allow.direct_target(8080), Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
        assert_eq!(allow.direct_target(22), None);
        let everywhere =
            AllowList { own: Some(SocketAddr::from(([0, 0, 0, 0], 2222))), ..AllowList::default() };
        assert_eq!(everywhere.direct_target(2222), Some(SocketAddr::from(([127, 0, 0, 1], 2222))));
        assert_eq!(AllowList::default().direct_target(2222), None);
    }
}
