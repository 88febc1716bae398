//! The full stat that SFTP v3 cannot carry: nanosecond times, times past 2106, inode, nlink,
//! blocks. Used by the `@devmount` SFTP extensions and by the feed, encoded the same way in both.

use bytes::{BufMut, BytesMut};

use super::wire::{DecodeError, Reader};

/// A point in time as seconds since the epoch (signed, so before 1970 and past 2106 both work)
/// plus nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_i64(self.sec);
        buf.put_u32(self.nsec);
    }

    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let sec = r.i64()?;
        let nsec = r.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(DecodeError::Invalid("nanoseconds out of range"));
        }
        Ok(Timespec { sec, nsec })
    }
}

/// Everything `lstat(2)` says about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FullStat {
    pub dev: u64,
    pub ino: u64,
    /// File type and permission bits, as in `st_mode`.
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub blksize: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

impl FullStat {
    pub const ENCODED_LEN: usize = 8 * 6 + 4 * 4 + 12 * 3;

    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.dev);
        buf.put_u64(self.ino);
        buf.put_u32(self.mode);
        buf.put_u64(self.nlink);
        buf.put_u32(self.uid);
        buf.put_u32(self.gid);
        buf.put_u64(self.rdev);
        buf.put_u64(self.size);
        buf.put_u64(self.blocks);
        buf.put_u32(self.blksize);
        self.atime.encode(buf);
        self.mtime.encode(buf);
        self.ctime.encode(buf);
    }

    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(FullStat {
            dev: r.u64()?,
            ino: r.u64()?,
            mode: r.u32()?,
            nlink: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            rdev: r.u64()?,
            size: r.u64()?,
            blocks: r.u64()?,
            blksize: r.u32()?,
            atime: Timespec::decode(r)?,
            mtime: Timespec::decode(r)?,
            ctime: Timespec::decode(r)?,
        })
    }

    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

impl From<&libc::stat> for FullStat {
    fn from(st: &libc::stat) -> Self {
        FullStat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            blksize: st.st_blksize as u32,
            atime: Timespec { sec: st.st_atime, nsec: st.st_atime_nsec as u32 },
            mtime: Timespec { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 },
            ctime: Timespec { sec: st.st_ctime, nsec: st.st_ctime_nsec as u32 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_length() {
        let st = FullStat {
            dev: 1,
            ino: u64::MAX,
            mode: 0o100644,
            nlink: 2,
            uid: 1000,
            gid: 1000,
            rdev: 0,
            size: 1 << 40,
            blocks: 8,
            blksize: 4096,
            atime: Timespec { sec: -5, nsec: 1 },
            mtime: Timespec { sec: 5_000_000_000, nsec: 999_999_999 },
            ctime: Timespec { sec: 0, nsec: 0 },
        };
        let mut buf = BytesMut::new();
        st.encode(&mut buf);
        assert_eq!(buf.len(), FullStat::ENCODED_LEN);
        let mut r = Reader::new(buf.freeze());
        assert_eq!(FullStat::decode(&mut r).unwrap(), st);
        r.finish().unwrap();
    }
}
