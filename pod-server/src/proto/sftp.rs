//! The SFTP v3 codec: every packet, attribute block and extension devmount speaks, as plain
//! types with `encode` (a whole frame, length prefix included) and `decode` (one frame body, as
//! split off by [`take_frame`](super::wire::take_frame)).
//!
//! The dialect is the one OpenSSH speaks: draft-ietf-secsh-filexfer-02 plus the extensions of
//! OpenSSH's `PROTOCOL` file, with its `SYMLINK` argument order. The `@devmount` extensions are
//! described byte by byte in `docs/protocol.md`.
//!
//! Handles, names, paths and link targets are raw bytes. Decoding never trusts a count or
//! length prefix beyond the bytes present, refuses trailing bytes, unknown packet types and
//! unknown flag bits, and never panics.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};

use super::stat::{FullStat, Timespec};
use super::wire::{begin_frame, end_frame, DecodeError, Reader, WriteExt};

/// The protocol version devmount speaks, and the only one it accepts.
pub const VERSION: u32 = 3;
/// The largest data payload of one READ or WRITE the devmount server serves.
pub const MAX_DATA: u32 = 1024 * 1024;
/// The largest packet (frame body, without the length prefix) either side of devmount accepts:
/// [`MAX_DATA`] plus room for the header.
pub const MAX_PACKET: usize = MAX_DATA as usize + 1024;

/// Packet types.
pub mod packet {
    pub const INIT: u8 = 1;
    pub const VERSION: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const READ: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const LSTAT: u8 = 7;
    pub const FSTAT: u8 = 8;
    pub const SETSTAT: u8 = 9;
    pub const FSETSTAT: u8 = 10;
    pub const OPENDIR: u8 = 11;
    pub const READDIR: u8 = 12;
    pub const REMOVE: u8 = 13;
    pub const MKDIR: u8 = 14;
    pub const RMDIR: u8 = 15;
    pub const REALPATH: u8 = 16;
    pub const STAT: u8 = 17;
    pub const RENAME: u8 = 18;
    pub const READLINK: u8 = 19;
    pub const SYMLINK: u8 = 20;
    pub const STATUS: u8 = 101;
    pub const HANDLE: u8 = 102;
    pub const DATA: u8 = 103;
    pub const NAME: u8 = 104;
    pub const ATTRS: u8 = 105;
    pub const EXTENDED: u8 = 200;
    pub const EXTENDED_REPLY: u8 = 201;
}

/// `pflags` of OPEN.
pub mod open_flags {
    pub const READ: u32 = 0x01;
    pub const WRITE: u32 = 0x02;
    pub const APPEND: u32 = 0x04;
    pub const CREAT: u32 = 0x08;
    pub const TRUNC: u32 = 0x10;
    pub const EXCL: u32 = 0x20;
}

/// Extension names, as they appear in VERSION and EXTENDED packets.
pub mod ext {
    pub const POSIX_RENAME: &str = "posix-rename@openssh.com";
    pub const STATVFS: &str = "statvfs@openssh.com";
    pub const FSTATVFS: &str = "fstatvfs@openssh.com";
    pub const FSYNC: &str = "fsync@openssh.com";
    pub const HARDLINK: &str = "hardlink@openssh.com";
    pub const LIMITS: &str = "limits@openssh.com";
    pub const LSETSTAT: &str = "lsetstat@openssh.com";
    pub const EXPAND_PATH: &str = "expand-path@openssh.com";

    /// Only in VERSION: its value is the server's version string.
    pub const VERSION: &str = "version@devmount";
    pub const STAT: &str = "stat@devmount";
    pub const FSTAT: &str = "fstat@devmount";
    pub const SETSTAT: &str = "setstat@devmount";
    pub const RENAME: &str = "rename@devmount";
    pub const MKNOD: &str = "mknod@devmount";
    pub const WALK: &str = "walk@devmount";
    pub const WALK_READ: &str = "walk-read@devmount";
    pub const LIST: &str = "list@devmount";
    pub const GET: &str = "get@devmount";
    pub const PUT: &str = "put@devmount";
    pub const WRITE: &str = "write@devmount";
    pub const BARRIER: &str = "barrier@devmount";

    /// The OpenSSH extensions devmount serves, with the version OpenSSH advertises for each.
    pub const OPENSSH: &[(&str, &str)] = &[
        (POSIX_RENAME, "1"),
        (STATVFS, "2"),
        (FSTATVFS, "2"),
        (HARDLINK, "1"),
        (FSYNC, "1"),
        (LSETSTAT, "1"),
        (LIMITS, "1"),
        (EXPAND_PATH, "1"),
    ];

    /// The devmount request extensions, each advertised with the value "1".
    pub const DEVMOUNT: &[&str] =
        &[STAT, FSTAT, SETSTAT, RENAME, MKNOD, WALK, WALK_READ, LIST, GET, PUT, WRITE, BARRIER];
}

/// An SFTP status code. A newtype rather than an enum so that a code this side does not know
/// survives decoding unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusCode(pub u32);

impl StatusCode {
    pub const OK: StatusCode = StatusCode(0);
    pub const EOF: StatusCode = StatusCode(1);
    pub const NO_SUCH_FILE: StatusCode = StatusCode(2);
    pub const PERMISSION_DENIED: StatusCode = StatusCode(3);
    pub const FAILURE: StatusCode = StatusCode(4);
    pub const BAD_MESSAGE: StatusCode = StatusCode(5);
    pub const NO_CONNECTION: StatusCode = StatusCode(6);
    pub const CONNECTION_LOST: StatusCode = StatusCode(7);
    pub const OP_UNSUPPORTED: StatusCode = StatusCode(8);
    /// devmount: the file no longer matches the [`Condition`] of the request.
    /// Only ever sent in reply to an `@devmount` request. ("dv" followed by 1.)
    pub const CHANGED: StatusCode = StatusCode(0x6476_0001);
    /// devmount: `get@devmount` found the file larger than the requested maximum.
    pub const TOO_LARGE: StatusCode = StatusCode(0x6476_0002);
}

/// ATTRS flag bits.
pub mod attr_flags {
    pub const SIZE: u32 = 0x0000_0001;
    pub const UIDGID: u32 = 0x0000_0002;
    pub const PERMISSIONS: u32 = 0x0000_0004;
    pub const ACMODTIME: u32 = 0x0000_0008;
    pub const EXTENDED: u32 = 0x8000_0000;
}

/// SFTP v3 file attributes. Each field is present only when its flag is set. Times are whole
/// seconds since the epoch, unsigned 32-bit, as v3 carries them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attrs {
    pub size: Option<u64>,
    /// (uid, gid): v3 carries both or neither.
    pub uid_gid: Option<(u32, u32)>,
    /// File type and permission bits, as in `st_mode`.
    pub permissions: Option<u32>,
    /// (atime, mtime): v3 carries both or neither.
    pub atime_mtime: Option<(u32, u32)>,
    /// Extended attribute pairs (type, data).
    pub extended: Vec<(Bytes, Bytes)>,
}

/// One entry of a NAME reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    pub filename: Bytes,
    /// The `ls -l`-style line OpenSSH's `sftp` prints; empty for REALPATH and READLINK.
    pub longname: Bytes,
    pub attrs: Attrs,
}

/// A STATUS reply. The message is text by the spec, but kept as the bytes received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: StatusCode,
    pub message: Bytes,
    pub language: Bytes,
}

/// The reply to `statvfs@openssh.com` and `fstatvfs@openssh.com`: `struct statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatVfs {
    pub bsize: u64,
    pub frsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub favail: u64,
    pub fsid: u64,
    /// [`StatVfs::RDONLY`] and [`StatVfs::NOSUID`].
    pub flag: u64,
    pub namemax: u64,
}

/// The reply to `limits@openssh.com`. Zero means "no limit" for `max_open_handles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_packet_len: u64,
    pub max_read_len: u64,
    pub max_write_len: u64,
    pub max_open_handles: u64,
}

/// What the file must still look like for a conditional `@devmount` request to proceed; if it
/// does not, the request fails with [`StatusCode::CHANGED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Condition {
    pub size: u64,
    pub mtime: Timespec,
    pub ino: u64,
}

/// How `setstat@devmount` sets one timestamp (`utimensat` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeSet {
    /// Leave it unchanged (`UTIME_OMIT`).
    #[default]
    Omit,
    /// The server's current time (`UTIME_NOW`).
    Now,
    At(Timespec),
}

/// The attributes `setstat@devmount` changes; `None` leaves one unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttrs {
    /// Permission bits (`chmod`); the file type bits are ignored.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `truncate` to this size.
    pub size: Option<u64>,
    pub atime: TimeSet,
    pub mtime: TimeSet,
}

/// `rename@devmount` flags, as `renameat2(2)`.
pub mod rename_flags {
    pub const NOREPLACE: u32 = 1;
    pub const EXCHANGE: u32 = 2;
}

/// A full stat together with the feed sequence number the server read before taking it: the
/// reply to `stat@devmount`, `fstat@devmount` and `put@devmount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqStat {
    pub seq: u64,
    pub stat: FullStat,
}

/// One entry of a `walk-read@devmount` batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkEntry {
    /// Relative to the walked directory; empty for the directory itself.
    pub path: Bytes,
    pub stat: FullStat,
    /// The symlink's target if this is a symlink; for a directory whose contents do not
    /// follow in the walk (its last level, or it could not be opened), [`WalkEntry::UNREAD`];
    /// else empty. So a directory with nothing after it is known empty.
    pub target: Bytes,
}

impl WalkEntry {
    pub const UNREAD: &'static [u8] = b".";

    /// A directory the walk did not read: its contents are unknown, not empty.
    pub fn unread(&self) -> bool {
        self.stat.is_dir() && self.target == Self::UNREAD
    }
}

/// The reply to `walk-read@devmount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkBatch {
    pub seq: u64,
    /// The walk is exhausted: this is its last batch, and the client can close the handle
    /// without asking for another.
    pub eof: bool,
    pub entries: Vec<WalkEntry>,
}

/// The reply to `list@devmount`: a directory and its direct children in one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListReply {
    pub seq: u64,
    /// The listed path's own lstat.
    pub stat: FullStat,
    /// `entries` holds every child; when false more exist than fitted, and the client lists
    /// the directory with `walk@devmount` instead.
    pub complete: bool,
    /// The direct children; each `path` is the child's name.
    pub entries: Vec<WalkEntry>,
}

/// The reply to `get@devmount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetReply {
    pub seq: u64,
    pub stat: FullStat,
    pub data: Bytes,
}

/// The client's opening packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    pub version: u32,
    pub extensions: Vec<(Bytes, Bytes)>,
}

/// The server's answer to INIT: its version and the extensions it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: u32,
    pub extensions: Vec<(Bytes, Bytes)>,
}

/// A request: every packet a client sends after INIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u32,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    Open {
        filename: Bytes,
        pflags: u32,
        attrs: Attrs,
    },
    Close {
        handle: Bytes,
    },
    Read {
        handle: Bytes,
        offset: u64,
        len: u32,
    },
    Write {
        handle: Bytes,
        offset: u64,
        data: Bytes,
    },
    Lstat {
        path: Bytes,
    },
    Fstat {
        handle: Bytes,
    },
    Setstat {
        path: Bytes,
        attrs: Attrs,
    },
    Fsetstat {
        handle: Bytes,
        attrs: Attrs,
    },
    Opendir {
        path: Bytes,
    },
    Readdir {
        handle: Bytes,
    },
    Remove {
        filename: Bytes,
    },
    Mkdir {
        path: Bytes,
        attrs: Attrs,
    },
    Rmdir {
        path: Bytes,
    },
    Realpath {
        path: Bytes,
    },
    Stat {
        path: Bytes,
    },
    Rename {
        oldpath: Bytes,
        newpath: Bytes,
    },
    Readlink {
        path: Bytes,
    },
    /// Creates `linkpath` pointing at `target`. On the wire `target` comes first: OpenSSH swapped
    /// the draft's order, and every deployed client and server follows OpenSSH.
    Symlink {
        linkpath: Bytes,
        target: Bytes,
    },

    /// `posix-rename@openssh.com`: rename that replaces an existing target.
    PosixRename {
        oldpath: Bytes,
        newpath: Bytes,
    },
    /// `statvfs@openssh.com`, answered with [`ResponseBody::StatVfs`].
    Statvfs {
        path: Bytes,
    },
    /// `fstatvfs@openssh.com`, answered with [`ResponseBody::StatVfs`].
    Fstatvfs {
        handle: Bytes,
    },
    /// `fsync@openssh.com`.
    Fsync {
        handle: Bytes,
    },
    /// `hardlink@openssh.com`: creates `newpath` as a hard link to `oldpath`.
    Hardlink {
        oldpath: Bytes,
        newpath: Bytes,
    },
    /// `limits@openssh.com`, answered with [`ResponseBody::Limits`].
    Limits,
    /// `lsetstat@openssh.com`: SETSTAT without following a final symlink.
    Lsetstat {
        path: Bytes,
        attrs: Attrs,
    },
    /// `expand-path@openssh.com`: REALPATH that also expands `~`; answered with NAME.
    ExpandPath {
        path: Bytes,
    },

    /// `stat@devmount`, answered with [`ResponseBody::SeqStat`].
    DevStat {
        path: Bytes,
        follow: bool,
    },
    /// `fstat@devmount`, answered with [`ResponseBody::SeqStat`].
    DevFstat {
        handle: Bytes,
    },
    /// `setstat@devmount`, answered with STATUS.
    DevSetstat {
        path: Bytes,
        follow: bool,
        attrs: SetAttrs,
    },
    /// `rename@devmount` ([`rename_flags`]), answered with STATUS. The condition is on
    /// `newpath`, the file being replaced.
    DevRename {
        oldpath: Bytes,
        newpath: Bytes,
        flags: u32,
        condition: Option<Condition>,
    },
    /// `mknod@devmount`, answered with STATUS.
    DevMknod {
        path: Bytes,
        mode: u32,
        rdev: u64,
    },
    /// `walk@devmount`, answered with HANDLE. `max_depth` 0 walks the whole subtree; n lists
    /// entries up to n levels below `path` (1: `path` and its children).
    DevWalk {
        path: Bytes,
        max_entries: u32,
        max_depth: u32,
    },
    /// `walk-read@devmount`, answered with [`ResponseBody::Walk`] or EOF.
    DevWalkRead {
        handle: Bytes,
    },
    /// `list@devmount`, answered with [`ResponseBody::List`]. `max_entries` 0 lets the
    /// server choose.
    DevList {
        path: Bytes,
        max_entries: u32,
    },
    /// `get@devmount`, answered with [`ResponseBody::Get`].
    DevGet {
        path: Bytes,
        max_size: u64,
    },
    /// `put@devmount`, answered with [`ResponseBody::SeqStat`].
    DevPut(Put),
    /// `write@devmount`, answered with STATUS.
    DevWrite {
        handle: Bytes,
        offset: u64,
        condition: Condition,
        data: Bytes,
    },
    /// `barrier@devmount`, answered with [`ResponseBody::Barrier`].
    DevBarrier,

    /// An extension this side does not know; the server answers OP_UNSUPPORTED.
    Extended {
        name: Bytes,
        data: Bytes,
    },
}

/// The body of `put@devmount`: create or atomically replace a whole small file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub path: Bytes,
    /// Fail with a FAILURE "File exists" status if the target exists.
    pub excl: bool,
    /// Make the file and its name durable before replying.
    pub fsync: bool,
    /// Permission bits of the new file, applied exactly (no umask).
    pub mode: u32,
    pub atime: Option<Timespec>,
    pub mtime: Option<Timespec>,
    /// The existing target must still match this, else [`StatusCode::CHANGED`].
    pub condition: Option<Condition>,
    pub data: Bytes,
}

/// A response: every packet a server sends after VERSION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u32,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    Status(Status),
    Handle(Bytes),
    Data(Bytes),
    Name(Vec<NameEntry>),
    Attrs(Attrs),
    /// An EXTENDED_REPLY decoded with [`ReplyKind::Raw`]: the bytes after the id.
    ExtendedReply(Bytes),
    /// EXTENDED_REPLY to `statvfs@openssh.com` / `fstatvfs@openssh.com`.
    StatVfs(StatVfs),
    /// EXTENDED_REPLY to `limits@openssh.com`.
    Limits(Limits),
    /// EXTENDED_REPLY to `stat@devmount`, `fstat@devmount` and `put@devmount`.
    SeqStat(SeqStat),
    /// EXTENDED_REPLY to `walk-read@devmount`.
    Walk(WalkBatch),
    /// EXTENDED_REPLY to `list@devmount`.
    List(ListReply),
    /// EXTENDED_REPLY to `get@devmount`.
    Get(GetReply),
    /// EXTENDED_REPLY to `barrier@devmount`: every change made in the tree before the request
    /// arrived is in a feed message numbered at most this, published already.
    Barrier(u64),
}

/// How to read the body of an EXTENDED_REPLY, which does not say which request it answers:
/// the decoder asks the caller, who knows what it sent under that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Raw,
    StatVfs,
    Limits,
    SeqStat,
    Walk,
    List,
    Get,
    Barrier,
}

impl Status {
    pub fn new(code: StatusCode, message: &str) -> Status {
        Status { code, message: Bytes::copy_from_slice(message.as_bytes()), language: Bytes::new() }
    }

    pub fn ok() -> Status {
        Status::new(StatusCode::OK, "Success")
    }

    /// The status a failed system call is reported with; see [`status_from_io`].
    pub fn from_io(err: &io::Error) -> Status {
        let (code, message) = status_from_io(err);
        Status::new(code, &message)
    }
}

/// The errnos whose message is a protocol constant (`nix`'s `Errno::desc`, the same on every
/// libc), so that a client can map a status back to the errno that caused it.
const KNOWN_ERRNOS: &[nix::errno::Errno] = {
    use nix::errno::Errno::*;
    &[
        ENOENT,
        ENOTDIR,
        EACCES,
        EPERM,
        EEXIST,
        ENOTEMPTY,
        ENOSPC,
        EDQUOT,
        EISDIR,
        EINVAL,
        EXDEV,
        ELOOP,
        ENAMETOOLONG,
        EROFS,
        EBUSY,
        ETXTBSY,
        EFBIG,
        EMLINK,
        EBADF,
        ESTALE,
        EIO,
        ENOSYS,
        EOPNOTSUPP,
    ]
};

fn status_code_for_errno(errno: i32) -> StatusCode {
    match errno {
        libc::ENOENT | libc::ENOTDIR => StatusCode::NO_SUCH_FILE,
        libc::EACCES | libc::EPERM => StatusCode::PERMISSION_DENIED,
        libc::ENOSYS | libc::EOPNOTSUPP => StatusCode::OP_UNSUPPORTED,
        _ => StatusCode::FAILURE,
    }
}

/// Maps a failed system call to an SFTP status: ENOENT and ENOTDIR are NO_SUCH_FILE, EACCES
/// and EPERM PERMISSION_DENIED, ENOSYS and EOPNOTSUPP OP_UNSUPPORTED, everything else FAILURE.
/// The message is the errno's description ("Directory not empty", "File exists"), which
/// [`errno_from_status`] maps back.
pub fn status_from_io(err: &io::Error) -> (StatusCode, String) {
    if let Some(errno) = err.raw_os_error() {
        let desc = nix::errno::Errno::from_raw(errno).desc();
        return (status_code_for_errno(errno), desc.to_owned());
    }
    let code = match err.kind() {
        io::ErrorKind::NotFound => StatusCode::NO_SUCH_FILE,
        io::ErrorKind::PermissionDenied => StatusCode::PERMISSION_DENIED,
        io::ErrorKind::Unsupported => StatusCode::OP_UNSUPPORTED,
        _ => StatusCode::FAILURE,
    };
    (code, err.to_string())
}

/// The errno a status stands for: the one whose description is the message, if
/// [`status_from_io`] would have sent that errno with this code (so "File exists" with FAILURE
/// is EEXIST, "Not a directory" with NO_SUCH_FILE is ENOTDIR); otherwise the code's default.
/// Returns 0 for OK.
pub fn errno_from_status(code: StatusCode, message: &[u8]) -> i32 {
    let named = KNOWN_ERRNOS.iter().map(|&e| e as i32).find(|&e| {
        status_code_for_errno(e) == code && nix::errno::Errno::from_raw(e).desc().as_bytes() == message
    });
    if let Some(errno) = named {
        return errno;
    }
    match code {
        StatusCode::OK => 0,
        StatusCode::EOF => libc::ENODATA,
        StatusCode::NO_SUCH_FILE => libc::ENOENT,
        StatusCode::PERMISSION_DENIED => libc::EACCES,
        StatusCode::BAD_MESSAGE => libc::EBADMSG,
        StatusCode::NO_CONNECTION => libc::ENOTCONN,
        StatusCode::CONNECTION_LOST => libc::ECONNABORTED,
        StatusCode::OP_UNSUPPORTED => libc::EOPNOTSUPP,
        StatusCode::CHANGED => libc::ESTALE,
        StatusCode::TOO_LARGE => libc::EFBIG,
        _ => libc::EIO,
    }
}

impl Attrs {
    /// The v3 view of a full stat. Times outside the u32 range are clamped to it.
    pub fn from_stat(st: &FullStat) -> Attrs {
        let secs = |t: Timespec| t.sec.clamp(0, u32::MAX as i64) as u32;
        Attrs {
            size: Some(st.size),
            uid_gid: Some((st.uid, st.gid)),
            permissions: Some(st.mode),
            atime_mtime: Some((secs(st.atime), secs(st.mtime))),
            extended: Vec::new(),
        }
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let mut flags = 0;
        if self.size.is_some() {
            flags |= attr_flags::SIZE;
        }
        if self.uid_gid.is_some() {
            flags |= attr_flags::UIDGID;
        }
        if self.permissions.is_some() {
            flags |= attr_flags::PERMISSIONS;
        }
        if self.atime_mtime.is_some() {
            flags |= attr_flags::ACMODTIME;
        }
        if !self.extended.is_empty() {
            flags |= attr_flags::EXTENDED;
        }
        buf.put_u32(flags);
        if let Some(size) = self.size {
            buf.put_u64(size);
        }
        if let Some((uid, gid)) = self.uid_gid {
            buf.put_u32(uid);
            buf.put_u32(gid);
        }
        if let Some(perm) = self.permissions {
            buf.put_u32(perm);
        }
        if let Some((atime, mtime)) = self.atime_mtime {
            buf.put_u32(atime);
            buf.put_u32(mtime);
        }
        if !self.extended.is_empty() {
            put_count(buf, self.extended.len());
            for (name, data) in &self.extended {
                buf.put_string(name);
                buf.put_string(data);
            }
        }
    }

    pub fn decode(r: &mut Reader) -> Result<Attrs, DecodeError> {
        const KNOWN: u32 = attr_flags::SIZE
            | attr_flags::UIDGID
            | attr_flags::PERMISSIONS
            | attr_flags::ACMODTIME
            | attr_flags::EXTENDED;
        let flags = r.u32()?;
        if flags & !KNOWN != 0 {
            return Err(DecodeError::Invalid("unknown attribute flags"));
        }
        let has = |bit| flags & bit != 0;
        let size = if has(attr_flags::SIZE) { Some(r.u64()?) } else { None };
        let uid_gid = if has(attr_flags::UIDGID) { Some((r.u32()?, r.u32()?)) } else { None };
        let permissions = if has(attr_flags::PERMISSIONS) { Some(r.u32()?) } else { None };
        let atime_mtime = if has(attr_flags::ACMODTIME) { Some((r.u32()?, r.u32()?)) } else { None };
        let mut extended = Vec::new();
        if has(attr_flags::EXTENDED) {
            let count = r.u32()?;
            // Grows with what is actually present: a huge count runs out of bytes first.
            for _ in 0..count {
                extended.push((r.string()?, r.string()?));
            }
        }
        Ok(Attrs { size, uid_gid, permissions, atime_mtime, extended })
    }
}

impl StatVfs {
    /// `flag` bit: read-only file system.
    pub const RDONLY: u64 = 1;
    /// `flag` bit: setuid/setgid bits ignored.
    pub const NOSUID: u64 = 2;

    fn fields(&self) -> [u64; 11] {
        [
            self.bsize,
            self.frsize,
            self.blocks,
            self.bfree,
            self.bavail,
            self.files,
            self.ffree,
            self.favail,
            self.fsid,
            self.flag,
            self.namemax,
        ]
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        for v in self.fields() {
            buf.put_u64(v);
        }
    }

    pub fn decode(r: &mut Reader) -> Result<StatVfs, DecodeError> {
        Ok(StatVfs {
            bsize: r.u64()?,
            frsize: r.u64()?,
            blocks: r.u64()?,
            bfree: r.u64()?,
            bavail: r.u64()?,
            files: r.u64()?,
            ffree: r.u64()?,
            favail: r.u64()?,
            fsid: r.u64()?,
            flag: r.u64()?,
            namemax: r.u64()?,
        })
    }
}

impl Limits {
    /// What a client assumes of a server that does not advertise `limits@openssh.com`: the
    /// 32 KiB reads and writes OpenSSH's `sftp` uses, and OpenSSH's 256 KiB packets.
    pub const DEFAULT: Limits = Limits {
        max_packet_len: 256 * 1024,
        max_read_len: 32 * 1024,
        max_write_len: 32 * 1024,
        max_open_handles: 0,
    };

    /// What the devmount server advertises.
    pub const DEVMOUNT: Limits = Limits {
        max_packet_len: MAX_PACKET as u64,
        max_read_len: MAX_DATA as u64,
        max_write_len: MAX_DATA as u64,
        max_open_handles: 1024,
    };

    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.max_packet_len);
        buf.put_u64(self.max_read_len);
        buf.put_u64(self.max_write_len);
        buf.put_u64(self.max_open_handles);
    }

    pub fn decode(r: &mut Reader) -> Result<Limits, DecodeError> {
        Ok(Limits {
            max_packet_len: r.u64()?,
            max_read_len: r.u64()?,
            max_write_len: r.u64()?,
            max_open_handles: r.u64()?,
        })
    }
}

impl Condition {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.size);
        self.mtime.encode(buf);
        buf.put_u64(self.ino);
    }

    pub fn decode(r: &mut Reader) -> Result<Condition, DecodeError> {
        Ok(Condition { size: r.u64()?, mtime: Timespec::decode(r)?, ino: r.u64()? })
    }

    /// Whether `st` still matches.
    pub fn matches(&self, st: &FullStat) -> bool {
        st.size == self.size && st.mtime == self.mtime && st.ino == self.ino
    }

    pub fn of(st: &FullStat) -> Condition {
        Condition { size: st.size, mtime: st.mtime, ino: st.ino }
    }
}

impl TimeSet {
    const OMIT: u8 = 0;
    const NOW: u8 = 1;
    const AT: u8 = 2;

    fn encode(&self, buf: &mut BytesMut) {
        match self {
            TimeSet::Omit => buf.put_u8(Self::OMIT),
            TimeSet::Now => buf.put_u8(Self::NOW),
            TimeSet::At(t) => {
                buf.put_u8(Self::AT);
                t.encode(buf);
            }
        }
    }

    fn decode(r: &mut Reader) -> Result<TimeSet, DecodeError> {
        match r.u8()? {
            Self::OMIT => Ok(TimeSet::Omit),
            Self::NOW => Ok(TimeSet::Now),
            Self::AT => Ok(TimeSet::At(Timespec::decode(r)?)),
            _ => Err(DecodeError::Invalid("unknown time tag")),
        }
    }
}

impl SetAttrs {
    fn encode(&self, buf: &mut BytesMut) {
        put_opt(buf, self.mode.as_ref(), |b, v| b.put_u32(*v));
        put_opt(buf, self.uid.as_ref(), |b, v| b.put_u32(*v));
        put_opt(buf, self.gid.as_ref(), |b, v| b.put_u32(*v));
        put_opt(buf, self.size.as_ref(), |b, v| b.put_u64(*v));
        self.atime.encode(buf);
        self.mtime.encode(buf);
    }

    fn decode(r: &mut Reader) -> Result<SetAttrs, DecodeError> {
        Ok(SetAttrs {
            mode: get_opt(r, Reader::u32)?,
            uid: get_opt(r, Reader::u32)?,
            gid: get_opt(r, Reader::u32)?,
            size: get_opt(r, Reader::u64)?,
            atime: TimeSet::decode(r)?,
            mtime: TimeSet::decode(r)?,
        })
    }
}

impl SeqStat {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.seq);
        self.stat.encode(buf);
    }

    pub fn decode(r: &mut Reader) -> Result<SeqStat, DecodeError> {
        Ok(SeqStat { seq: r.u64()?, stat: FullStat::decode(r)? })
    }
}

impl WalkEntry {
    /// The encoded size of an entry: what a server sizes batches with.
    pub fn encoded_len(&self) -> usize {
        4 + self.path.len() + FullStat::ENCODED_LEN + 4 + self.target.len()
    }
}

/// `uint32 count` and the entries, as walk and list replies carry them.
fn put_entries(buf: &mut BytesMut, entries: &[WalkEntry]) {
    put_count(buf, entries.len());
    for e in entries {
        buf.put_string(&e.path);
        e.stat.encode(buf);
        buf.put_string(&e.target);
    }
}

fn get_entries(r: &mut Reader) -> Result<Vec<WalkEntry>, DecodeError> {
    let count = r.u32()? as usize;
    // The smallest entry is two empty strings and a stat.
    let mut entries = Vec::with_capacity(count.min(r.remaining() / (8 + FullStat::ENCODED_LEN)));
    for _ in 0..count {
        entries.push(WalkEntry { path: r.string()?, stat: FullStat::decode(r)?, target: r.string()? });
    }
    Ok(entries)
}

impl WalkBatch {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.seq);
        buf.put_bool(self.eof);
        put_entries(buf, &self.entries);
    }

    pub fn decode(r: &mut Reader) -> Result<WalkBatch, DecodeError> {
        Ok(WalkBatch { seq: r.u64()?, eof: r.bool()?, entries: get_entries(r)? })
    }
}

impl ListReply {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.seq);
        self.stat.encode(buf);
        buf.put_bool(self.complete);
        put_entries(buf, &self.entries);
    }

    pub fn decode(r: &mut Reader) -> Result<ListReply, DecodeError> {
        Ok(ListReply {
            seq: r.u64()?,
            stat: FullStat::decode(r)?,
            complete: r.bool()?,
            entries: get_entries(r)?,
        })
    }
}

impl GetReply {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.seq);
        self.stat.encode(buf);
        buf.put_string(&self.data);
    }

    pub fn decode(r: &mut Reader) -> Result<GetReply, DecodeError> {
        Ok(GetReply { seq: r.u64()?, stat: FullStat::decode(r)?, data: r.string()? })
    }
}

impl Put {
    const EXCL: u32 = 1;
    const FSYNC: u32 = 2;

    fn encode(&self, buf: &mut BytesMut) {
        buf.put_string(&self.path);
        buf.put_u32(if self.excl { Self::EXCL } else { 0 } | if self.fsync { Self::FSYNC } else { 0 });
        buf.put_u32(self.mode);
        put_opt(buf, self.atime.as_ref(), |b, t| t.encode(b));
        put_opt(buf, self.mtime.as_ref(), |b, t| t.encode(b));
        put_opt(buf, self.condition.as_ref(), |b, c| c.encode(b));
        buf.put_string(&self.data);
    }

    fn decode(r: &mut Reader) -> Result<Put, DecodeError> {
        let path = r.string()?;
        let flags = r.u32()?;
        if flags & !(Self::EXCL | Self::FSYNC) != 0 {
            return Err(DecodeError::Invalid("unknown put flags"));
        }
        Ok(Put {
            path,
            excl: flags & Self::EXCL != 0,
            fsync: flags & Self::FSYNC != 0,
            mode: r.u32()?,
            atime: get_opt(r, Timespec::decode)?,
            mtime: get_opt(r, Timespec::decode)?,
            condition: get_opt(r, Condition::decode)?,
            data: r.string()?,
        })
    }
}

/// `stat@devmount` / `setstat@devmount` flag: follow a final symlink.
const FOLLOW: u32 = 1;

fn encode_follow(buf: &mut BytesMut, follow: bool) {
    buf.put_u32(if follow { FOLLOW } else { 0 });
}

fn decode_follow(r: &mut Reader) -> Result<bool, DecodeError> {
    match r.u32()? {
        0 => Ok(false),
        FOLLOW => Ok(true),
        _ => Err(DecodeError::Invalid("unknown stat flags")),
    }
}

/// `optional<T>`: a byte 0 (absent) or 1 followed by the value.
fn put_opt<T>(buf: &mut BytesMut, v: Option<&T>, put: impl FnOnce(&mut BytesMut, &T)) {
    match v {
        None => buf.put_u8(0),
        Some(v) => {
            buf.put_u8(1);
            put(buf, v);
        }
    }
}

fn get_opt<T>(
    r: &mut Reader,
    get: impl FnOnce(&mut Reader) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(get(r)?)),
        _ => Err(DecodeError::Invalid("optional tag is neither 0 nor 1")),
    }
}

fn put_count(buf: &mut BytesMut, n: usize) {
    buf.put_u32(u32::try_from(n).expect("more than 4 Gi entries in one packet"));
}

fn put_extensions(buf: &mut BytesMut, extensions: &[(Bytes, Bytes)]) {
    for (name, value) in extensions {
        buf.put_string(name);
        buf.put_string(value);
    }
}

fn get_extensions(r: &mut Reader) -> Result<Vec<(Bytes, Bytes)>, DecodeError> {
    let mut extensions = Vec::new();
    while r.remaining() > 0 {
        extensions.push((r.string()?, r.string()?));
    }
    Ok(extensions)
}

/// The id of a request or response frame, if it has one: lets a server answer a request it
/// cannot decode, and a client route a reply before decoding it.
pub fn peek_id(frame: &[u8]) -> Option<u32> {
    match frame.first() {
        None | Some(&packet::INIT) | Some(&packet::VERSION) => None,
        Some(_) => frame.get(1..5).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes"))),
    }
}

impl Init {
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = begin_frame(buf);
        buf.put_u8(packet::INIT);
        buf.put_u32(self.version);
        put_extensions(buf, &self.extensions);
        end_frame(buf, start);
    }

    pub fn decode(frame: Bytes) -> Result<Init, DecodeError> {
        let mut r = Reader::new(frame);
        match r.u8()? {
            packet::INIT => Ok(Init { version: r.u32()?, extensions: get_extensions(&mut r)? }),
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

impl Version {
    /// What the devmount server sends: v3, the OpenSSH and devmount extensions, and its version.
    pub fn devmount() -> Version {
        let pair =
            |n: &str, v: &str| (Bytes::copy_from_slice(n.as_bytes()), Bytes::copy_from_slice(v.as_bytes()));
        let mut extensions: Vec<_> = ext::OPENSSH.iter().map(|(n, v)| pair(n, v)).collect();
        extensions.extend(ext::DEVMOUNT.iter().map(|n| pair(n, "1")));
        extensions.push(pair(ext::VERSION, super::SERVER_VERSION));
        Version { version: VERSION, extensions }
    }

    /// The value advertised for extension `name`, if it is advertised.
    pub fn extension(&self, name: &str) -> Option<&Bytes> {
        self.extensions.iter().find(|(n, _)| n.as_ref() == name.as_bytes()).map(|(_, v)| v)
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let start = begin_frame(buf);
        buf.put_u8(packet::VERSION);
        buf.put_u32(self.version);
        put_extensions(buf, &self.extensions);
        end_frame(buf, start);
    }

    pub fn decode(frame: Bytes) -> Result<Version, DecodeError> {
        let mut r = Reader::new(frame);
        match r.u8()? {
            packet::VERSION => Ok(Version { version: r.u32()?, extensions: get_extensions(&mut r)? }),
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

fn head(buf: &mut BytesMut, ty: u8, id: u32) {
    buf.put_u8(ty);
    buf.put_u32(id);
}

fn ext_head(buf: &mut BytesMut, id: u32, name: &str) {
    head(buf, packet::EXTENDED, id);
    buf.put_string(name.as_bytes());
}

impl RequestBody {
    /// The extension this request uses, if it is one devmount knows by name.
    pub fn extension(&self) -> Option<&'static str> {
        use RequestBody::*;
        Some(match self {
            PosixRename { .. } => ext::POSIX_RENAME,
            Statvfs { .. } => ext::STATVFS,
            Fstatvfs { .. } => ext::FSTATVFS,
            Fsync { .. } => ext::FSYNC,
            Hardlink { .. } => ext::HARDLINK,
            Limits => ext::LIMITS,
            Lsetstat { .. } => ext::LSETSTAT,
            ExpandPath { .. } => ext::EXPAND_PATH,
            DevStat { .. } => ext::STAT,
            DevFstat { .. } => ext::FSTAT,
            DevSetstat { .. } => ext::SETSTAT,
            DevRename { .. } => ext::RENAME,
            DevMknod { .. } => ext::MKNOD,
            DevWalk { .. } => ext::WALK,
            DevWalkRead { .. } => ext::WALK_READ,
            DevList { .. } => ext::LIST,
            DevGet { .. } => ext::GET,
            DevPut(_) => ext::PUT,
            DevWrite { .. } => ext::WRITE,
            DevBarrier => ext::BARRIER,
            _ => return None,
        })
    }

    /// How an EXTENDED_REPLY to this request is to be decoded.
    pub fn reply_kind(&self) -> ReplyKind {
        use RequestBody::*;
        match self {
            Statvfs { .. } | Fstatvfs { .. } => ReplyKind::StatVfs,
            Limits => ReplyKind::Limits,
            DevStat { .. } | DevFstat { .. } | DevPut(_) => ReplyKind::SeqStat,
            DevWalkRead { .. } => ReplyKind::Walk,
            DevList { .. } => ReplyKind::List,
            DevGet { .. } => ReplyKind::Get,
            DevBarrier => ReplyKind::Barrier,
            _ => ReplyKind::Raw,
        }
    }

    /// The bytes this request puts on the wire beyond its fixed header, roughly: what a client
    /// counts against its bytes-in-flight budget.
    pub fn payload_len(&self) -> usize {
        use RequestBody::*;
        match self {
            Write { data, .. } | DevWrite { data, .. } => data.len(),
            DevPut(put) => put.data.len(),
            Extended { data, .. } => data.len(),
            _ => 0,
        }
    }

    fn encode_into(&self, id: u32, buf: &mut BytesMut) {
        use RequestBody::*;
        match self {
            Open { filename, pflags, attrs } => {
                head(buf, packet::OPEN, id);
                buf.put_string(filename);
                buf.put_u32(*pflags);
                attrs.encode(buf);
            }
            Close { handle } => {
                head(buf, packet::CLOSE, id);
                buf.put_string(handle);
            }
            Read { handle, offset, len } => {
                head(buf, packet::READ, id);
                buf.put_string(handle);
                buf.put_u64(*offset);
                buf.put_u32(*len);
            }
            Write { handle, offset, data } => {
                head(buf, packet::WRITE, id);
                buf.put_string(handle);
                buf.put_u64(*offset);
                buf.put_string(data);
            }
            Lstat { path } => {
                head(buf, packet::LSTAT, id);
                buf.put_string(path);
            }
            Fstat { handle } => {
                head(buf, packet::FSTAT, id);
                buf.put_string(handle);
            }
            Setstat { path, attrs } => {
                head(buf, packet::SETSTAT, id);
                buf.put_string(path);
                attrs.encode(buf);
            }
            Fsetstat { handle, attrs } => {
                head(buf, packet::FSETSTAT, id);
                buf.put_string(handle);
                attrs.encode(buf);
            }
            Opendir { path } => {
                head(buf, packet::OPENDIR, id);
                buf.put_string(path);
            }
            Readdir { handle } => {
                head(buf, packet::READDIR, id);
                buf.put_string(handle);
            }
            Remove { filename } => {
                head(buf, packet::REMOVE, id);
                buf.put_string(filename);
            }
            Mkdir { path, attrs } => {
                head(buf, packet::MKDIR, id);
                buf.put_string(path);
                attrs.encode(buf);
            }
            Rmdir { path } => {
                head(buf, packet::RMDIR, id);
                buf.put_string(path);
            }
            Realpath { path } => {
                head(buf, packet::REALPATH, id);
                buf.put_string(path);
            }
            Stat { path } => {
                head(buf, packet::STAT, id);
                buf.put_string(path);
            }
            Rename { oldpath, newpath } => {
                head(buf, packet::RENAME, id);
                buf.put_string(oldpath);
                buf.put_string(newpath);
            }
            Readlink { path } => {
                head(buf, packet::READLINK, id);
                buf.put_string(path);
            }
            Symlink { linkpath, target } => {
                head(buf, packet::SYMLINK, id);
                buf.put_string(target);
                buf.put_string(linkpath);
            }
            PosixRename { oldpath, newpath } | Hardlink { oldpath, newpath } => {
                ext_head(buf, id, self.extension().expect("an extension"));
                buf.put_string(oldpath);
                buf.put_string(newpath);
            }
            Statvfs { path } | ExpandPath { path } => {
                ext_head(buf, id, self.extension().expect("an extension"));
                buf.put_string(path);
            }
            Fstatvfs { handle } | Fsync { handle } | DevFstat { handle } | DevWalkRead { handle } => {
                ext_head(buf, id, self.extension().expect("an extension"));
                buf.put_string(handle);
            }
            Limits => ext_head(buf, id, ext::LIMITS),
            DevBarrier => ext_head(buf, id, ext::BARRIER),
            Lsetstat { path, attrs } => {
                ext_head(buf, id, ext::LSETSTAT);
                buf.put_string(path);
                attrs.encode(buf);
            }
            DevStat { path, follow } => {
                ext_head(buf, id, ext::STAT);
                buf.put_string(path);
                encode_follow(buf, *follow);
            }
            DevSetstat { path, follow, attrs } => {
                ext_head(buf, id, ext::SETSTAT);
                buf.put_string(path);
                encode_follow(buf, *follow);
                attrs.encode(buf);
            }
            DevRename { oldpath, newpath, flags, condition } => {
                ext_head(buf, id, ext::RENAME);
                buf.put_string(oldpath);
                buf.put_string(newpath);
                buf.put_u32(*flags);
                put_opt(buf, condition.as_ref(), |b, c| c.encode(b));
            }
            DevMknod { path, mode, rdev } => {
                ext_head(buf, id, ext::MKNOD);
                buf.put_string(path);
                buf.put_u32(*mode);
                buf.put_u64(*rdev);
            }
            DevWalk { path, max_entries, max_depth } => {
                ext_head(buf, id, ext::WALK);
                buf.put_string(path);
                buf.put_u32(*max_entries);
                buf.put_u32(*max_depth);
            }
            DevList { path, max_entries } => {
                ext_head(buf, id, ext::LIST);
                buf.put_string(path);
                buf.put_u32(*max_entries);
            }
            DevGet { path, max_size } => {
                ext_head(buf, id, ext::GET);
                buf.put_string(path);
                buf.put_u64(*max_size);
            }
            DevPut(put) => {
                ext_head(buf, id, ext::PUT);
                put.encode(buf);
            }
            DevWrite { handle, offset, condition, data } => {
                ext_head(buf, id, ext::WRITE);
                buf.put_string(handle);
                buf.put_u64(*offset);
                condition.encode(buf);
                buf.put_string(data);
            }
            Extended { name, data } => {
                head(buf, packet::EXTENDED, id);
                buf.put_string(name);
                buf.put_slice(data);
            }
        }
    }

    fn decode_extended(name: Bytes, r: &mut Reader) -> Result<RequestBody, DecodeError> {
        use RequestBody::*;
        let Ok(known) = std::str::from_utf8(&name) else {
            return Ok(Extended { name, data: r.rest() });
        };
        Ok(match known {
            ext::POSIX_RENAME => PosixRename { oldpath: r.string()?, newpath: r.string()? },
            ext::STATVFS => Statvfs { path: r.string()? },
            ext::FSTATVFS => Fstatvfs { handle: r.string()? },
            ext::FSYNC => Fsync { handle: r.string()? },
            ext::HARDLINK => Hardlink { oldpath: r.string()?, newpath: r.string()? },
            ext::LIMITS => Limits,
            ext::BARRIER => DevBarrier,
            ext::LSETSTAT => Lsetstat { path: r.string()?, attrs: Attrs::decode(r)? },
            ext::EXPAND_PATH => ExpandPath { path: r.string()? },
            ext::STAT => DevStat { path: r.string()?, follow: decode_follow(r)? },
            ext::FSTAT => DevFstat { handle: r.string()? },
            ext::SETSTAT => {
                DevSetstat { path: r.string()?, follow: decode_follow(r)?, attrs: SetAttrs::decode(r)? }
            }
            ext::RENAME => {
                let (oldpath, newpath) = (r.string()?, r.string()?);
                let flags = r.u32()?;
                if flags & !(rename_flags::NOREPLACE | rename_flags::EXCHANGE) != 0 {
                    return Err(DecodeError::Invalid("unknown rename flags"));
                }
                DevRename { oldpath, newpath, flags, condition: get_opt(r, Condition::decode)? }
            }
            ext::MKNOD => DevMknod { path: r.string()?, mode: r.u32()?, rdev: r.u64()? },
            ext::WALK => DevWalk { path: r.string()?, max_entries: r.u32()?, max_depth: r.u32()? },
            ext::WALK_READ => DevWalkRead { handle: r.string()? },
            ext::LIST => DevList { path: r.string()?, max_entries: r.u32()? },
            ext::GET => DevGet { path: r.string()?, max_size: r.u64()? },
            ext::PUT => DevPut(Put::decode(r)?),
            ext::WRITE => DevWrite {
                handle: r.string()?,
                offset: r.u64()?,
                condition: Condition::decode(r)?,
                data: r.string()?,
            },
            _ => Extended { name, data: r.rest() },
        })
    }
}

impl Request {
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = begin_frame(buf);
        self.body.encode_into(self.id, buf);
        end_frame(buf, start);
    }

    pub fn decode(frame: Bytes) -> Result<Request, DecodeError> {
        use RequestBody::*;
        let mut r = Reader::new(frame);
        let ty = r.u8()?;
        if !(packet::OPEN..=packet::SYMLINK).contains(&ty) && ty != packet::EXTENDED {
            return Err(DecodeError::UnknownType(ty));
        }
        let id = r.u32()?;
        let r = &mut r;
        let body = match ty {
            packet::OPEN => Open { filename: r.string()?, pflags: r.u32()?, attrs: Attrs::decode(r)? },
            packet::CLOSE => Close { handle: r.string()? },
            packet::READ => Read { handle: r.string()?, offset: r.u64()?, len: r.u32()? },
            packet::WRITE => Write { handle: r.string()?, offset: r.u64()?, data: r.string()? },
            packet::LSTAT => Lstat { path: r.string()? },
            packet::FSTAT => Fstat { handle: r.string()? },
            packet::SETSTAT => Setstat { path: r.string()?, attrs: Attrs::decode(r)? },
            packet::FSETSTAT => Fsetstat { handle: r.string()?, attrs: Attrs::decode(r)? },
            packet::OPENDIR => Opendir { path: r.string()? },
            packet::READDIR => Readdir { handle: r.string()? },
            packet::REMOVE => Remove { filename: r.string()? },
            packet::MKDIR => Mkdir { path: r.string()?, attrs: Attrs::decode(r)? },
            packet::RMDIR => Rmdir { path: r.string()? },
            packet::REALPATH => Realpath { path: r.string()? },
            packet::STAT => Stat { path: r.string()? },
            packet::RENAME => Rename { oldpath: r.string()?, newpath: r.string()? },
            packet::READLINK => Readlink { path: r.string()? },
            packet::SYMLINK => {
                let target = r.string()?;
                Symlink { linkpath: r.string()?, target }
            }
            _ => {
                let name = r.string()?;
                RequestBody::decode_extended(name, r)?
            }
        };
        r.finish()?;
        Ok(Request { id, body })
    }
}

impl Response {
    /// The bytes of a DATA reply frame before its payload: length, type, id, payload length.
    pub const DATA_HEADER_LEN: usize = 4 + 1 + 4 + 4;

    /// Starts a DATA reply to request `id` whose payload the caller appends to `buf` itself,
    /// so that a READ is served straight into its frame; [`Response::end_data`] finishes it.
    /// Returns where the frame starts.
    pub fn begin_data(buf: &mut BytesMut, id: u32) -> usize {
        let start = begin_frame(buf);
        head(buf, packet::DATA, id);
        buf.put_u32(0);
        start
    }

    /// Finishes the DATA reply begun at `start`: everything appended since is its payload.
    pub fn end_data(buf: &mut BytesMut, start: usize) {
        let len = buf.len() - start - Self::DATA_HEADER_LEN;
        let len = u32::try_from(len).expect("data longer than 4 GiB");
        buf[start + Self::DATA_HEADER_LEN - 4..start + Self::DATA_HEADER_LEN]
            .copy_from_slice(&len.to_be_bytes());
        end_frame(buf, start);
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        use ResponseBody::*;
        let start = begin_frame(buf);
        let id = self.id;
        match &self.body {
            Status(s) => {
                head(buf, packet::STATUS, id);
                buf.put_u32(s.code.0);
                buf.put_string(&s.message);
                buf.put_string(&s.language);
            }
            Handle(h) => {
                head(buf, packet::HANDLE, id);
                buf.put_string(h);
            }
            Data(d) => {
                head(buf, packet::DATA, id);
                buf.put_string(d);
            }
            Name(entries) => {
                head(buf, packet::NAME, id);
                put_count(buf, entries.len());
                for e in entries {
                    buf.put_string(&e.filename);
                    buf.put_string(&e.longname);
                    e.attrs.encode(buf);
                }
            }
            Attrs(a) => {
                head(buf, packet::ATTRS, id);
                a.encode(buf);
            }
            ExtendedReply(data) => {
                head(buf, packet::EXTENDED_REPLY, id);
                buf.put_slice(data);
            }
            StatVfs(v) => {
                head(buf, packet::EXTENDED_REPLY, id);
                v.encode(buf);
            }
            Limits(l) => {
                head(buf, packet::EXTENDED_REPLY, id);
                l.encode(buf);
            }
            SeqStat(s) => {
                head(buf, packet::EXTENDED_REPLY, id);
                s.encode(buf);
            }
            Walk(w) => {
                head(buf, packet::EXTENDED_REPLY, id);
                w.encode(buf);
            }
            List(l) => {
                head(buf, packet::EXTENDED_REPLY, id);
                l.encode(buf);
            }
            Get(g) => {
                head(buf, packet::EXTENDED_REPLY, id);
                g.encode(buf);
            }
            Barrier(seq) => {
                head(buf, packet::EXTENDED_REPLY, id);
                buf.put_u64(*seq);
            }
        }
        end_frame(buf, start);
    }

    /// Decodes one response frame. `kind` is asked, with the reply's id, how to read the body
    /// of an EXTENDED_REPLY; it is not called for any other packet type.
    pub fn decode(frame: Bytes, kind: impl FnOnce(u32) -> ReplyKind) -> Result<Response, DecodeError> {
        let mut r = Reader::new(frame);
        let ty = r.u8()?;
        if !(packet::STATUS..=packet::ATTRS).contains(&ty) && ty != packet::EXTENDED_REPLY {
            return Err(DecodeError::UnknownType(ty));
        }
        let id = r.u32()?;
        let r = &mut r;
        let body = match ty {
            packet::STATUS => ResponseBody::Status(Status {
                code: StatusCode(r.u32()?),
                message: r.string()?,
                language: r.string()?,
            }),
            packet::HANDLE => ResponseBody::Handle(r.string()?),
            packet::DATA => ResponseBody::Data(r.string()?),
            packet::NAME => {
                let count = r.u32()? as usize;
                // The smallest entry is two empty strings and empty attributes: 12 bytes.
                let mut entries = Vec::with_capacity(count.min(r.remaining() / 12));
                for _ in 0..count {
                    entries.push(NameEntry {
                        filename: r.string()?,
                        longname: r.string()?,
                        attrs: Attrs::decode(r)?,
                    });
                }
                ResponseBody::Name(entries)
            }
            packet::ATTRS => ResponseBody::Attrs(Attrs::decode(r)?),
            _ => match kind(id) {
                ReplyKind::Raw => ResponseBody::ExtendedReply(r.rest()),
                ReplyKind::StatVfs => ResponseBody::StatVfs(StatVfs::decode(r)?),
                ReplyKind::Limits => ResponseBody::Limits(Limits::decode(r)?),
                ReplyKind::SeqStat => ResponseBody::SeqStat(SeqStat::decode(r)?),
                ReplyKind::Walk => ResponseBody::Walk(WalkBatch::decode(r)?),
                ReplyKind::List => ResponseBody::List(ListReply::decode(r)?),
                ReplyKind::Get => ResponseBody::Get(GetReply::decode(r)?),
                ReplyKind::Barrier => ResponseBody::Barrier(r.u64()?),
            },
        };
        r.finish()?;
        Ok(Response { id, body })
    }
}

#[cfg(test)]
mod tests;
