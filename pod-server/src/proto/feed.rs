//! The change-feed protocol: what the `devmount-feed` subsystem sends, one way, server to client.
//!
//! A stream of frames (`uint32 length` + body, see [`wire::take_frame`]) each holding one
//! [`FeedMessage`]. The byte layout, the sequence-number rules and what each message obliges the
//! client to do are in `docs/protocol.md (Change feed)`.
//!
//! Decoding refuses unknown message types, unknown kinds and flag bits, trailing bytes, counts
//! the frame cannot hold and paths that are not plain relative paths, and never panics.
//!
//! [`wire::take_frame`]: super::wire::take_frame

use bytes::{BufMut, Bytes, BytesMut};

use super::stat::FullStat;
use super::wire::{begin_frame, end_frame, DecodeError, Reader, WriteExt};

/// The SSH subsystem name the feed is served under.
pub const SUBSYSTEM: &str = "devmount-feed";
/// The feed protocol version, sent in [`FeedMessage::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame body either side accepts. The server splits batches to stay below it.
pub const MAX_FEED_FRAME: usize = 1024 * 1024;
/// The longest path the server puts in an event; an event with a longer path is not sent and a
/// [`FeedMessage::Resync`] follows instead. Two such paths and a stat fit in a frame.
pub const MAX_FEED_PATH: usize = 64 * 1024;
/// Bytes a batch frame body holds besides its events: type, sequence, count.
pub const BATCH_HEADER_LEN: usize = 1 + 8 + 4;

/// Message types (the first byte of a frame body).
pub mod msg {
    pub const HELLO: u8 = 1;
    pub const READY: u8 = 2;
    pub const BATCH: u8 = 3;
    pub const RESYNC: u8 = 4;
    pub const UNWATCHED: u8 = 5;
}

/// Event kinds (the first byte of an event).
pub mod kind {
    pub const CREATED: u8 = 1;
    pub const MODIFIED: u8 = 2;
    pub const ATTRIB: u8 = 3;
    pub const DELETED: u8 = 4;
    pub const RENAMED: u8 = 5;
}

/// Event flag bits (the second byte of an event).
pub mod flags {
    /// The change was caused by the receiving connection's own SFTP request.
    pub const OWN: u8 = 0x01;
    /// A [`FullStat`](crate::proto::stat::FullStat) follows the path(s).
    pub const STAT: u8 = 0x02;
    /// Then the `lstat` of the directory holding the (new) path, as the server sent the event.
    pub const DIR: u8 = 0x04;
}

/// The smallest encoded event: kind, flags and one empty path.
const MIN_EVENT_LEN: usize = 2 + 4;

/// What happened to a path. Paths are relative to the server's `--root`, without a leading
/// slash; the root itself is the empty path. `stat` is the `lstat` of the path (for a rename,
/// of the new path) when the server emitted the event, absent when the path no longer existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created {
        path: Bytes,
        stat: Option<FullStat>,
    },
    /// The content changed.
    Modified {
        path: Bytes,
        stat: Option<FullStat>,
    },
    /// Metadata changed: mode, owner, times, link count, extended attributes.
    Attrib {
        path: Bytes,
        stat: Option<FullStat>,
    },
    Deleted {
        path: Bytes,
    },
    Renamed {
        from: Bytes,
        to: Bytes,
        stat: Option<FullStat>,
    },
}

impl Change {
    /// The path the change is about (for a rename, the new one).
    pub fn path(&self) -> &Bytes {
        match self {
            Change::Created { path, .. }
            | Change::Modified { path, .. }
            | Change::Attrib { path, .. }
            | Change::Deleted { path } => path,
            Change::Renamed { to, .. } => to,
        }
    }

    pub fn stat(&self) -> Option<&FullStat> {
        match self {
            Change::Created { stat, .. }
            | Change::Modified { stat, .. }
            | Change::Attrib { stat, .. }
            | Change::Renamed { stat, .. } => stat.as_ref(),
            Change::Deleted { .. } => None,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Change::Created { .. } => kind::CREATED,
            Change::Modified { .. } => kind::MODIFIED,
            Change::Attrib { .. } => kind::ATTRIB,
            Change::Deleted { .. } => kind::DELETED,
            Change::Renamed { .. } => kind::RENAMED,
        }
    }

    /// The length of this change encoded as an event, with the directory's stat or not (the
    /// `own` flag does not change it).
    pub fn encoded_len(&self, dir: bool) -> usize {
        let paths = match self {
            Change::Renamed { from, to, .. } => 8 + from.len() + to.len(),
            _ => 4 + self.path().len(),
        };
        let stat = if self.stat().is_some() { FullStat::ENCODED_LEN } else { 0 };
        let dir = if dir { FullStat::ENCODED_LEN } else { 0 };
        2 + paths + stat + dir
    }

    /// Appends this change as one event, with `dir`, the stat of the directory holding the
    /// (new) path.
    pub fn encode(&self, own: bool, dir: Option<&FullStat>, buf: &mut BytesMut) {
        let stat = self.stat();
        let mut f = 0;
        if own {
            f |= flags::OWN;
        }
        if stat.is_some() {
            f |= flags::STAT;
        }
        if dir.is_some() {
            f |= flags::DIR;
        }
        buf.put_u8(self.kind());
        buf.put_u8(f);
        match self {
            Change::Renamed { from, to, .. } => {
                buf.put_string(from);
                buf.put_string(to);
            }
            _ => buf.put_string(self.path()),
        }
        if let Some(st) = stat {
            st.encode(buf);
        }
        if let Some(st) = dir {
            st.encode(buf);
        }
    }

    fn decode(r: &mut Reader) -> Result<FeedEvent, DecodeError> {
        let k = r.u8()?;
        let f = r.u8()?;
        if f & !(flags::OWN | flags::STAT | flags::DIR) != 0 {
            return Err(DecodeError::Invalid("unknown event flags"));
        }
        let own = f & flags::OWN != 0;
        let has_stat = f & flags::STAT != 0;
        let first = path(r)?;
        let second = if k == kind::RENAMED { Some(path(r)?) } else { None };
        let stat = if has_stat { Some(FullStat::decode(r)?) } else { None };
        let dir = if f & flags::DIR != 0 { Some(FullStat::decode(r)?) } else { None };
        let change = match (k, second) {
            (kind::CREATED, None) => Change::Created { path: first, stat },
            (kind::MODIFIED, None) => Change::Modified { path: first, stat },
            (kind::ATTRIB, None) => Change::Attrib { path: first, stat },
            (kind::DELETED, None) if stat.is_none() => Change::Deleted { path: first },
            (kind::DELETED, None) => return Err(DecodeError::Invalid("deleted event with a stat")),
            (kind::RENAMED, Some(to)) => Change::Renamed { from: first, to, stat },
            _ => return Err(DecodeError::Invalid("unknown event kind")),
        };
        Ok(FeedEvent { change, own, dir })
    }
}

/// One change as a given subscriber sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    pub change: Change,
    /// The subscriber's own SSH connection asked for this change (see the limits in
    /// `docs/protocol.md (Change feed)`).
    pub own: bool,
    /// For a name that appeared or went (created, deleted, renamed): the `lstat` of the
    /// directory holding the (new) path when the server sent the event, so a client can keep
    /// that directory's attributes instead of asking for them again.
    pub dir: Option<FullStat>,
}

/// One frame of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedMessage {
    /// Always the first message. `seq` is the newest published sequence number when the
    /// subscription began: every later change has a greater one.
    Hello { protocol: u32, server_version: Bytes, seq: u64 },
    /// The watches are in place; from here on no change under a watched directory goes
    /// unreported. `seq` is the newest published sequence number, not a new one.
    Ready { seq: u64 },
    /// Changes, in the order they happened (per path), published under one new sequence number.
    Batch { seq: u64, events: Vec<FeedEvent> },
    /// Changes may have been lost: drop every cache and every `unwatched` mark. Unwatched
    /// marks (and `ready`, once the watches are in place) are restated right after.
    Resync { seq: u64 },
    /// The directory at `path` and everything below it is not watched.
    Unwatched { seq: u64, path: Bytes },
}

impl FeedMessage {
    pub fn seq(&self) -> u64 {
        match self {
            FeedMessage::Hello { seq, .. }
            | FeedMessage::Ready { seq }
            | FeedMessage::Batch { seq, .. }
            | FeedMessage::Resync { seq }
            | FeedMessage::Unwatched { seq, .. } => *seq,
        }
    }

    /// Appends this message as a whole frame, length prefix included.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = begin_frame(buf);
        match self {
            FeedMessage::Hello { protocol, server_version, seq } => {
                buf.put_u8(msg::HELLO);
                buf.put_u32(*protocol);
                buf.put_string(server_version);
                buf.put_u64(*seq);
            }
            FeedMessage::Ready { seq } => {
                buf.put_u8(msg::READY);
                buf.put_u64(*seq);
            }
            FeedMessage::Batch { seq, events } => {
                buf.put_u8(msg::BATCH);
                buf.put_u64(*seq);
                buf.put_u32(u32::try_from(events.len()).expect("batch of more than 4 G events"));
                for e in events {
                    e.change.encode(e.own, e.dir.as_ref(), buf);
                }
            }
            FeedMessage::Resync { seq } => {
                buf.put_u8(msg::RESYNC);
                buf.put_u64(*seq);
            }
            FeedMessage::Unwatched { seq, path } => {
                buf.put_u8(msg::UNWATCHED);
                buf.put_u64(*seq);
                buf.put_string(path);
            }
        }
        end_frame(buf, start);
    }

    /// Decodes one frame body, as split off by [`take_frame`](super::wire::take_frame) with
    /// [`MAX_FEED_FRAME`].
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        if body.len() > MAX_FEED_FRAME {
            return Err(DecodeError::TooLarge { len: body.len(), max: MAX_FEED_FRAME });
        }
        let mut r = Reader::new(body);
        let m = match r.u8()? {
            msg::HELLO => {
                FeedMessage::Hello { protocol: r.u32()?, server_version: r.string()?, seq: r.u64()? }
            }
            msg::READY => FeedMessage::Ready { seq: r.u64()? },
            msg::BATCH => {
                let seq = r.u64()?;
                let count = r.u32()? as usize;
                if count > r.remaining() / MIN_EVENT_LEN {
                    return Err(DecodeError::Invalid("event count exceeds the frame"));
                }
                let mut events = Vec::with_capacity(count);
                for _ in 0..count {
                    events.push(Change::decode(&mut r)?);
                }
                FeedMessage::Batch { seq, events }
            }
            msg::RESYNC => FeedMessage::Resync { seq: r.u64()? },
            msg::UNWATCHED => FeedMessage::Unwatched { seq: r.u64()?, path: path(&mut r)? },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(m)
    }
}

/// Reads a path and checks that it is relative and plain: no leading or doubled slash, no
/// `.` or `..` component, no NUL. The empty path (the root) is allowed.
fn path(r: &mut Reader) -> Result<Bytes, DecodeError> {
    let p = r.string()?;
    if p.is_empty() {
        return Ok(p);
    }
    if p.contains(&0) {
        return Err(DecodeError::Invalid("NUL in path"));
    }
    for c in p.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." || c == b".." {
            return Err(DecodeError::Invalid("path is not a plain relative path"));
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::stat::Timespec;
    use crate::proto::wire::take_frame;

    fn stat() -> FullStat {
        FullStat {
            dev: 3,
            ino: 99,
            mode: 0o100644,
            nlink: 1,
            uid: 1000,
            gid: 1000,
            rdev: 0,
            size: 12,
            blocks: 8,
            blksize: 4096,
            atime: Timespec { sec: 1, nsec: 2 },
            mtime: Timespec { sec: 3, nsec: 4 },
            ctime: Timespec { sec: 5, nsec: 6 },
        }
    }

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    fn all_messages() -> Vec<FeedMessage> {
        let ev = |change, own| FeedEvent { change, own, dir: None };
        vec![
            FeedMessage::Hello { protocol: PROTOCOL_VERSION, server_version: b(b"0.1.0"), seq: 0 },
            FeedMessage::Ready { seq: 7 },
            FeedMessage::Batch { seq: 8, events: vec![] },
            FeedMessage::Batch {
                seq: u64::MAX,
                events: vec![
                    ev(Change::Created { path: b(b"a/\xff\xfe"), stat: Some(stat()) }, true),
                    ev(Change::Created { path: b(b"gone"), stat: None }, false),
                    ev(Change::Modified { path: b(b"a/f"), stat: Some(stat()) }, false),
                    ev(Change::Attrib { path: b(b""), stat: Some(stat()) }, true),
                    ev(Change::Deleted { path: b(b"a/b/c") }, false),
                    ev(Change::Renamed { from: b(b"x"), to: b(b"y/x"), stat: Some(stat()) }, true),
                    ev(Change::Renamed { from: b(b"x"), to: b(b"z"), stat: None }, false),
                    FeedEvent {
                        change: Change::Created { path: b(b"d/n"), stat: Some(stat()) },
                        own: true,
                        dir: Some(stat()),
                    },
                    FeedEvent { change: Change::Deleted { path: b(b"d/n") }, own: false, dir: Some(stat()) },
                ],
            },
            FeedMessage::Resync { seq: 9 },
            FeedMessage::Unwatched { seq: 10, path: b(b"deep/tree") },
        ]
    }

    #[test]
    fn every_message_round_trips_through_frames() {
        let msgs = all_messages();
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        for m in &msgs {
            let body = take_frame(&mut buf, MAX_FEED_FRAME).unwrap().unwrap();
            assert_eq!(&FeedMessage::decode(body).unwrap(), m);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn encoded_len_is_exact() {
        for m in all_messages() {
            if let FeedMessage::Batch { events, .. } = m {
                for e in events {
                    let mut buf = BytesMut::new();
                    e.change.encode(e.own, e.dir.as_ref(), &mut buf);
                    assert_eq!(buf.len(), e.change.encoded_len(e.dir.is_some()), "{e:?}");
                }
            }
        }
    }

    fn body(m: &FeedMessage) -> BytesMut {
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        let _ = buf.split_to(4);
        buf
    }

    #[test]
    fn hostile_counts_and_lengths_are_refused() {
        // A batch claiming four billion events in a few bytes.
        let mut buf = body(&FeedMessage::Batch { seq: 1, events: vec![] });
        let n = buf.len();
        buf[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        buf.put_slice(&[kind::DELETED, 0, 0, 0, 0, 0]);
        assert_eq!(
            FeedMessage::decode(buf.freeze()),
            Err(DecodeError::Invalid("event count exceeds the frame"))
        );

        // A path length far beyond the frame.
        let mut buf = BytesMut::new();
        buf.put_u8(msg::UNWATCHED);
        buf.put_u64(1);
        buf.put_u32(0xffff_fff0);
        buf.put_slice(b"abc");
        assert!(matches!(FeedMessage::decode(buf.freeze()), Err(DecodeError::Truncated { .. })));

        // A frame above the cap.
        let big = Bytes::from(vec![msg::RESYNC; MAX_FEED_FRAME + 1]);
        assert!(matches!(FeedMessage::decode(big), Err(DecodeError::TooLarge { .. })));
        let mut framed = BytesMut::new();
        framed.put_u32(MAX_FEED_FRAME as u32 + 1);
        assert!(matches!(take_frame(&mut framed, MAX_FEED_FRAME), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let check = |bytes: &[u8], what: &str| {
            assert!(FeedMessage::decode(Bytes::copy_from_slice(bytes)).is_err(), "{what} accepted");
        };
        check(&[], "empty body");
        check(&[99, 0, 0, 0, 0, 0, 0, 0, 1], "unknown type");
        check(&[msg::READY, 0, 0, 0, 0, 0, 0, 0, 1, 0], "trailing byte");
        check(&[msg::READY, 0, 0, 0], "truncated");

        let event = |k: u8, f: u8, path: &[u8]| {
            let mut buf = BytesMut::new();
            buf.put_u8(msg::BATCH);
            buf.put_u64(1);
            buf.put_u32(1);
            buf.put_u8(k);
            buf.put_u8(f);
            buf.put_string(path);
            buf
        };
        check(&event(9, 0, b"a"), "unknown kind");
        check(&event(kind::CREATED, 0x80, b"a"), "unknown flag");
        let mut deleted_with_stat = event(kind::DELETED, flags::STAT, b"a");
        stat().encode(&mut deleted_with_stat);
        check(&deleted_with_stat, "deleted with stat");
        check(&event(kind::RENAMED, 0, b"a"), "rename without new path");
        for bad in [&b"/etc"[..], b"a//b", b"a/", b"../x", b"a/./b", b"a\0b"] {
            check(&event(kind::DELETED, 0, bad), "bad path");
        }
        assert!(FeedMessage::decode(event(kind::DELETED, 0, b"a/b").freeze()).is_ok());
    }
}
