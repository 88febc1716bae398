//! The client end of the change feed: frames off the `devmount-feed` channel, decoded with the
//! shared codec.

use bytes::{Bytes, BytesMut};
use devmount_server::proto::feed::{FeedMessage, MAX_FEED_FRAME};
use devmount_server::proto::wire::{take_frame, DecodeError};
use russh::client::Msg;
use russh::ChannelStream;
use tokio::io::AsyncReadExt;

/// Why the feed cannot be read further.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the change feed sent a malformed message: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the change feed ended in the middle of a message ({0} bytes left over)")]
    Truncated(usize),
    #[error("reading the change feed failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The stream of feed messages, [`FeedMessage::Hello`] first. Dropping it closes the channel,
/// which ends the feed on the server.
pub struct FeedStream {
    stream: ChannelStream<Msg>,
    buf: BytesMut,
}

impl FeedStream {
    pub(super) fn new(stream: ChannelStream<Msg>, early: Bytes) -> FeedStream {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&early);
        FeedStream { stream, buf }
    }

    /// The next message, or `None` once the server has closed the feed. After an error the
    /// stream is of no further use.
    pub async fn next(&mut self) -> Result<Option<FeedMessage>, FeedError> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf, MAX_FEED_FRAME)? {
                return Ok(Some(FeedMessage::decode(frame)?));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    n => Err(FeedError::Truncated(n)),
                };
            }
        }
    }
}
