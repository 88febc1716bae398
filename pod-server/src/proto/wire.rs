//! Byte-level primitives shared by the SFTP codec and the feed protocol.
//!
//! Everything is big-endian and length-prefixed as in RFC 4251 (`uint32`, `uint64`, `string`).
//! Strings are raw bytes: handles and file names are never decoded as UTF-8.
//! The reader never allocates on the strength of a length prefix alone: a length is checked
//! against the bytes actually present before anything is sliced.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("packet of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// A cursor over one received message. Cloning the underlying `Bytes` is cheap, so strings
/// are returned as zero-copy slices of the packet.
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { offset: self.pos, needed: n - self.remaining() });
        }
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        let v = self.buf[self.pos];
        self.pos += 1;
        Ok(v)
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.u8()? != 0)
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        let v = u32::from_be_bytes(self.buf[self.pos..self.pos + 4].try_into().expect("4 bytes"));
        self.pos += 4;
        Ok(v)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        let v = u64::from_be_bytes(self.buf[self.pos..self.pos + 8].try_into().expect("8 bytes"));
        self.pos += 8;
        Ok(v)
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    /// A `string`: a u32 length and that many bytes, checked against what is present.
    pub fn string(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        let v = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(v)
    }

    /// All bytes left in the message.
    pub fn rest(&mut self) -> Bytes {
        let v = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        v
    }

    /// Fails unless the whole message was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Appends wire primitives to a `BytesMut`.
pub trait WriteExt {
    fn put_string(&mut self, s: &[u8]);
    fn put_bool(&mut self, b: bool);
}

impl WriteExt for BytesMut {
    fn put_string(&mut self, s: &[u8]) {
        self.put_u32(u32::try_from(s.len()).expect("string longer than 4 GiB"));
        self.put_slice(s);
    }

    fn put_bool(&mut self, b: bool) {
        self.put_u8(b as u8);
    }
}

/// Splits complete length-prefixed frames (`uint32 length` + body) off the front of `buf`.
/// Returns `Ok(None)` until a whole frame is buffered; a length above `max` is an error
/// before any of the body is buffered, so a hostile prefix cannot make us allocate.
pub fn take_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(DecodeError::Invalid("empty frame"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(4 + len);
    let _ = frame.split_to(4);
    Ok(Some(frame.freeze()))
}

/// Starts a frame: reserves the length prefix, to be filled by [`end_frame`].
pub fn begin_frame(buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.put_u32(0);
    start
}

/// Writes the length of the frame begun at `start`.
pub fn end_frame(buf: &mut BytesMut, start: usize) {
    let len = u32::try_from(buf.len() - start - 4).expect("frame longer than 4 GiB");
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_string_length_is_refused_without_allocating() {
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xf0, 1, 2]));
        assert!(matches!(r.string(), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn frames_split_and_cap() {
        let mut buf = BytesMut::new();
        let s = begin_frame(&mut buf);
        buf.put_string(b"\xffname");
        end_frame(&mut buf, s);
        buf.put_u32(1 << 30);
        let f = take_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(Reader::new(f).string().unwrap().as_ref(), b"\xffname");
        assert_eq!(take_frame(&mut buf, 1024), Err(DecodeError::TooLarge { len: 1 << 30, max: 1024 }));
    }
}
