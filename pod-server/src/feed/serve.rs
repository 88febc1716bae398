//! The `devmount-feed` channel: one subscription written out as frames.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::handle::Feed;

/// Frames gathered into one write when the subscriber has a backlog.
const WRITE_BYTES: usize = 256 * 1024;

/// Streams the feed to `out` for the SSH connection `conn`: `hello` first, then every message
/// in order (changes seen during the initial walk may come before `ready`). Returns when the
/// writer fails (the client went away) with that error, or `Ok` when the feed itself ended.
pub async fn serve<W: AsyncWrite + Unpin>(feed: &Feed, conn: u64, mut out: W) -> io::Result<()> {
    let mut sub = feed.subscribe(conn);
    let mut buf = BytesMut::new();
    while let Some(m) = sub.recv().await {
        m.encode(&mut buf);
        while buf.len() < WRITE_BYTES {
            let Some(m) = sub.try_recv() else { break };
            m.encode(&mut buf);
        }
        out.write_all(&buf).await?;
        out.flush().await?;
        buf.clear();
    }
    Ok(())
}
