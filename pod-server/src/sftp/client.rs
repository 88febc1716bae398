//! A pipelining SFTP client over any byte stream: a russh channel, an in-memory duplex, or the
//! stdio of OpenSSH's `sftp-server`.
//!
//! One writer task sends frames, one reader task routes each reply to its waiter by request id;
//! callers never touch the stream. Any number of tasks may issue requests at once through
//! clones of [`SftpClient`]. Two semaphores bound what is in flight: a count of requests
//! (default 64) and a budget of bytes, counting both the data a request carries and the data
//! its reply is expected to carry (default 8 MiB). A caller waits for room before its request
//! is sent, and its permits are released when the reply arrives, even if the caller has gone.
//! When the connection dies every pending and later request fails with
//! [`SftpError::ConnectionLost`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use crate::proto::sftp::{
    errno_from_status, ext, open_flags, peek_id, Attrs, Condition, GetReply, Init, Limits, ListReply,
    NameEntry, Put, Request, RequestBody, Response, ResponseBody, SeqStat, SetAttrs, StatVfs, Status,
    StatusCode, Version, WalkBatch, MAX_DATA, MAX_PACKET, VERSION,
};
use crate::proto::wire::{take_frame, DecodeError};

/// Bounds on what one client keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Requests sent and not yet answered.
    pub max_in_flight: usize,
    /// Bytes of request and expected reply data in flight. A single request larger than this
    /// waits until nothing else is in flight.
    pub max_bytes_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_in_flight: 64, max_bytes_in_flight: 8 * 1024 * 1024 }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum SftpError {
    /// The server answered with a status other than OK.
    #[error("SFTP status {}: {message}", code.0)]
    Status { code: StatusCode, message: String },
    /// The server sent something this codec cannot accept.
    #[error("SFTP protocol error: {0}")]
    Protocol(#[from] DecodeError),
    /// The connection closed or failed before the reply arrived.
    #[error("SFTP connection lost")]
    ConnectionLost,
    /// The server does not advertise the extension the request needs.
    #[error("the SFTP server does not support {0}")]
    Unsupported(&'static str),
    /// The request would exceed the server's packet limit; it was not sent, since the server
    /// would close the session.
    #[error("SFTP request of {len} bytes exceeds the server's packet limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

impl SftpError {
    /// The errno this error stands for, for a file system built on this client.
    pub fn errno(&self) -> i32 {
        match self {
            SftpError::Status { code, message } => errno_from_status(*code, message.as_bytes()),
            SftpError::Protocol(_) => libc::EPROTO,
            SftpError::ConnectionLost => libc::ENOTCONN,
            SftpError::Unsupported(_) => libc::EOPNOTSUPP,
            SftpError::TooLarge { .. } => libc::EFBIG,
        }
    }

    /// Whether this is a status with `code`.
    pub fn is_status(&self, code: StatusCode) -> bool {
        matches!(self, SftpError::Status { code: c, .. } if *c == code)
    }

    fn from_status(status: Status) -> SftpError {
        if status.code == StatusCode::OK {
            return SftpError::Protocol(DecodeError::Invalid("OK status where a result was expected"));
        }
        SftpError::Status {
            code: status.code,
            message: String::from_utf8_lossy(&status.message).into_owned(),
        }
    }
}

type Result<T, E = SftpError> = std::result::Result<T, E>;

/// What the server said about itself in the handshake.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: u32,
    pub extensions: Vec<(Bytes, Bytes)>,
    /// The value of `version@devmount`, if the server is a devmount-server.
    pub server_version: Option<Bytes>,
    /// From `limits@openssh.com`, else [`Limits::DEFAULT`].
    pub limits: Limits,
}

impl ServerInfo {
    /// Whether the server advertises extension `name`.
    pub fn has(&self, name: &str) -> bool {
        self.extensions.iter().any(|(n, _)| n.as_ref() == name.as_bytes())
    }

    /// The READ length this client uses: the server's limit, at most [`MAX_DATA`], so that a
    /// reply always fits the client's own packet cap.
    pub fn read_len(&self) -> u32 {
        clamp_len(self.limits.max_read_len, Limits::DEFAULT.max_read_len)
    }

    /// The WRITE length this client uses: the server's limit, at most [`MAX_DATA`].
    pub fn write_len(&self) -> u32 {
        clamp_len(self.limits.max_write_len, Limits::DEFAULT.max_write_len)
    }
}

/// A server's length limit as this client uses it: `default` where the server reports none
/// (0), and never more than [`MAX_DATA`].
fn clamp_len(limit: u64, default: u64) -> u32 {
    let limit = if limit == 0 { default } else { limit };
    limit.min(u64::from(MAX_DATA)) as u32
}

/// A handle on one SFTP session. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct SftpClient {
    core: Arc<Core>,
    info: Arc<ServerInfo>,
}

/// A sent request's waiter. Holding the permits here, not in the caller, keeps the in-flight
/// accounting true when a caller gives up before its reply arrives.
struct Waiter {
    reply: oneshot::Sender<Bytes>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Pending {
    next_id: u32,
    waiters: HashMap<u32, Waiter>,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Why the session ended, once it has.
    ended: watch::Sender<Option<Arc<str>>>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave the map inconsistent: every critical
        // section is a single insert, remove or clear.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Fails every pending request and refuses new ones; `why` is what [`SftpClient::closed`]
    /// reports (the first reason given).
    fn close(&self, why: String) {
        let mut pending = self.pending();
        pending.closed = true;
        pending.waiters.clear();
        drop(pending);
        self.ended.send_if_modified(|ended| {
            let first = ended.is_none();
            if first {
                *ended = Some(why.into());
            }
            first
        });
    }
}

struct Core {
    shared: Arc<Shared>,
    /// Unbounded because the request semaphore bounds it: a frame is queued only by a caller
    /// holding a request permit.
    outbox: mpsc::UnboundedSender<Bytes>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    /// The server's packet limit; set once the limits are known.
    max_packet: AtomicUsize,
    reader: AbortHandle,
}

impl Drop for Core {
    fn drop(&mut self) {
        // The writer ends by itself once `outbox` is dropped; the reader would wait for the
        // peer to close.
        self.reader.abort();
    }
}

impl Core {
    async fn call(&self, body: RequestBody, reply_bytes: usize) -> Result<ResponseBody> {
        let cost = (body.payload_len() + reply_bytes).min(self.max_bytes);
        let kind = body.reply_kind();
        // Encoded before an id is taken, so that a request too large to send takes none; the
        // id is filled in below.
        let mut frame = BytesMut::with_capacity(64 + body.payload_len());
        Request { id: 0, body }.encode(&mut frame);
        let (len, max) = (frame.len() - 4, self.max_packet.load(Ordering::Relaxed));
        if len > max {
            return Err(SftpError::TooLarge { len, max });
        }
        // `max_bytes` fits in a u32, so `cost` does too.
        let bytes = match u32::try_from(cost).unwrap_or(u32::MAX) {
            0 => None,
            n => Some(self.bytes.clone().acquire_many_owned(n).await.map_err(|_| SftpError::ConnectionLost)?),
        };
        let slot = self.slots.clone().acquire_owned().await.map_err(|_| SftpError::ConnectionLost)?;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut pending = self.shared.pending();
            if pending.closed {
                return Err(SftpError::ConnectionLost);
            }
            let mut id = pending.next_id;
            while pending.waiters.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            pending.next_id = id.wrapping_add(1);
            pending.waiters.insert(id, Waiter { reply: tx, _slot: slot, _bytes: bytes });
            id
        };
        // Every request frame is `uint32 length, byte type, uint32 id, ...`.
        frame[5..9].copy_from_slice(&id.to_be_bytes());
        if self.outbox.send(frame.freeze()).is_err() {
            self.shared.pending().waiters.remove(&id);
            return Err(SftpError::ConnectionLost);
        }
        let frame = rx.await.map_err(|_| SftpError::ConnectionLost)?;
        Ok(Response::decode(frame, |_| kind)?.body)
    }
}

impl SftpClient {
    /// Opens an SFTP session on `stream` with the default [`Config`].
    pub async fn connect<S>(stream: S) -> Result<(SftpClient, ServerInfo)>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        SftpClient::connect_with(stream, Config::default()).await
    }

    /// Opens an SFTP session on `stream`: INIT/VERSION, then `limits@openssh.com` if the server
    /// advertises it.
    pub async fn connect_with<S>(stream: S, config: Config) -> Result<(SftpClient, ServerInfo)>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut init = BytesMut::new();
        Init { version: VERSION, extensions: Vec::new() }.encode(&mut init);
        wr.write_all(&init).await.map_err(lost)?;
        wr.flush().await.map_err(lost)?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let frame = loop {
            if let Some(frame) = take_frame(&mut buf, MAX_PACKET)? {
                break frame;
            }
            if rd.read_buf(&mut buf).await.map_err(lost)? == 0 {
                return Err(SftpError::ConnectionLost);
            }
        };
        let version = Version::decode(frame)?;
        if version.version != VERSION {
            return Err(SftpError::Protocol(DecodeError::Invalid("server does not speak SFTP version 3")));
        }

        let shared =
            Arc::new(Shared { pending: Mutex::new(Pending::default()), ended: watch::Sender::new(None) });
        let (outbox, frames) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(wr, frames, shared.clone()));
        let reader = tokio::spawn(read_loop(rd, buf, shared.clone())).abort_handle();
        let max_bytes = config.max_bytes_in_flight.clamp(1, u32::MAX as usize);
        let core = Arc::new(Core {
            shared,
            outbox,
            slots: Arc::new(Semaphore::new(config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS))),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            max_packet: AtomicUsize::new(MAX_PACKET),
            reader,
        });

        let server_version = version.extension(ext::VERSION).cloned();
        let mut info = ServerInfo {
            version: version.version,
            extensions: version.extensions,
            server_version,
            limits: Limits::DEFAULT,
        };
        if info.has(ext::LIMITS) {
            info.limits = match core.call(RequestBody::Limits, 0).await? {
                ResponseBody::Limits(limits) => limits,
                other => return Err(unexpected(other)),
            };
        }
        let max_packet = match info.limits.max_packet_len {
            0 => Limits::DEFAULT.max_packet_len,
            n => n,
        };
        core.max_packet.store(usize::try_from(max_packet).unwrap_or(usize::MAX), Ordering::Relaxed);
        let client = SftpClient { core, info: Arc::new(info.clone()) };
        Ok((client, info))
    }

    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// Resolves once the session has ended, with why: the server closed the channel or the
    /// connection under it broke, or the server broke the protocol. The SSH connection may
    /// outlive the channel, so whoever keeps a connection for this client watches this too.
    pub async fn closed(&self) -> Arc<str> {
        let mut ended = self.core.shared.ended.subscribe();
        // The sender lives in `shared`, which `self` holds, so the wait ends with a reason.
        let why = ended.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        why.unwrap_or_else(|| "closed".into())
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.core.shared.pending().waiters.len()
    }

    /// Sends any request and returns the server's reply as it came. Refuses, without sending,
    /// an extension the server does not advertise.
    pub async fn call(&self, body: RequestBody) -> Result<ResponseBody> {
        if let Some(name) = body.extension() {
            if !self.info.has(name) {
                return Err(SftpError::Unsupported(name));
            }
        }
        let reply_bytes = match &body {
            RequestBody::Read { len, .. } => *len as usize,
            RequestBody::DevGet { max_size, .. } => (*max_size).min(self.info.read_len() as u64) as usize,
            _ => 0,
        };
        self.core.call(body, reply_bytes).await
    }

    async fn status(&self, body: RequestBody) -> Result<()> {
        match self.call(body).await? {
            ResponseBody::Status(s) if s.code == StatusCode::OK => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn handle(&self, body: RequestBody) -> Result<Bytes> {
        match self.call(body).await? {
            ResponseBody::Handle(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    async fn attrs(&self, body: RequestBody) -> Result<Attrs> {
        match self.call(body).await? {
            ResponseBody::Attrs(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    async fn one_name(&self, body: RequestBody) -> Result<Bytes> {
        match self.call(body).await? {
            ResponseBody::Name(names) if names.len() == 1 => {
                Ok(names.into_iter().next().map(|n| n.filename).unwrap_or_default())
            }
            ResponseBody::Name(_) => {
                Err(SftpError::Protocol(DecodeError::Invalid("expected exactly one name")))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn seq_stat(&self, body: RequestBody) -> Result<SeqStat> {
        match self.call(body).await? {
            ResponseBody::SeqStat(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    async fn statvfs_reply(&self, body: RequestBody) -> Result<StatVfs> {
        match self.call(body).await? {
            ResponseBody::StatVfs(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// OPEN with [`open_flags`]; returns the handle.
    pub async fn open(&self, path: &[u8], pflags: u32, attrs: &Attrs) -> Result<Bytes> {
        self.handle(RequestBody::Open { filename: b(path), pflags, attrs: attrs.clone() }).await
    }

    pub async fn close(&self, handle: &Bytes) -> Result<()> {
        self.status(RequestBody::Close { handle: handle.clone() }).await
    }

    /// READ: up to `len` bytes at `offset`; empty at end of file.
    pub async fn read(&self, handle: &Bytes, offset: u64, len: u32) -> Result<Bytes> {
        match self.call(RequestBody::Read { handle: handle.clone(), offset, len }).await? {
            ResponseBody::Data(data) => Ok(data),
            ResponseBody::Status(s) if s.code == StatusCode::EOF => Ok(Bytes::new()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn write(&self, handle: &Bytes, offset: u64, data: Bytes) -> Result<()> {
        self.status(RequestBody::Write { handle: handle.clone(), offset, data }).await
    }

    pub async fn lstat(&self, path: &[u8]) -> Result<Attrs> {
        self.attrs(RequestBody::Lstat { path: b(path) }).await
    }

    pub async fn fstat(&self, handle: &Bytes) -> Result<Attrs> {
        self.attrs(RequestBody::Fstat { handle: handle.clone() }).await
    }

    pub async fn stat(&self, path: &[u8]) -> Result<Attrs> {
        self.attrs(RequestBody::Stat { path: b(path) }).await
    }

    pub async fn setstat(&self, path: &[u8], attrs: &Attrs) -> Result<()> {
        self.status(RequestBody::Setstat { path: b(path), attrs: attrs.clone() }).await
    }

    pub async fn fsetstat(&self, handle: &Bytes, attrs: &Attrs) -> Result<()> {
        self.status(RequestBody::Fsetstat { handle: handle.clone(), attrs: attrs.clone() }).await
    }

    pub async fn opendir(&self, path: &[u8]) -> Result<Bytes> {
        self.handle(RequestBody::Opendir { path: b(path) }).await
    }

    /// READDIR: the next batch of entries, or `None` at the end of the directory.
    pub async fn readdir(&self, handle: &Bytes) -> Result<Option<Vec<NameEntry>>> {
        match self.call(RequestBody::Readdir { handle: handle.clone() }).await? {
            ResponseBody::Name(names) => Ok(Some(names)),
            ResponseBody::Status(s) if s.code == StatusCode::EOF => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove(&self, path: &[u8]) -> Result<()> {
        self.status(RequestBody::Remove { filename: b(path) }).await
    }

    pub async fn mkdir(&self, path: &[u8], attrs: &Attrs) -> Result<()> {
        self.status(RequestBody::Mkdir { path: b(path), attrs: attrs.clone() }).await
    }

    pub async fn rmdir(&self, path: &[u8]) -> Result<()> {
        self.status(RequestBody::Rmdir { path: b(path) }).await
    }

    pub async fn realpath(&self, path: &[u8]) -> Result<Bytes> {
        self.one_name(RequestBody::Realpath { path: b(path) }).await
    }

    /// RENAME: fails if `newpath` exists (v3 semantics); see [`SftpClient::posix_rename`].
    pub async fn rename(&self, oldpath: &[u8], newpath: &[u8]) -> Result<()> {
        self.status(RequestBody::Rename { oldpath: b(oldpath), newpath: b(newpath) }).await
    }

    pub async fn readlink(&self, path: &[u8]) -> Result<Bytes> {
        self.one_name(RequestBody::Readlink { path: b(path) }).await
    }

    /// Creates the symlink `linkpath` pointing at `target`, in `symlink(2)`'s argument order.
    pub async fn symlink(&self, target: &[u8], linkpath: &[u8]) -> Result<()> {
        self.status(RequestBody::Symlink { linkpath: b(linkpath), target: b(target) }).await
    }

    pub async fn posix_rename(&self, oldpath: &[u8], newpath: &[u8]) -> Result<()> {
        self.status(RequestBody::PosixRename { oldpath: b(oldpath), newpath: b(newpath) }).await
    }

    pub async fn statvfs(&self, path: &[u8]) -> Result<StatVfs> {
        self.statvfs_reply(RequestBody::Statvfs { path: b(path) }).await
    }

    pub async fn fstatvfs(&self, handle: &Bytes) -> Result<StatVfs> {
        self.statvfs_reply(RequestBody::Fstatvfs { handle: handle.clone() }).await
    }

    pub async fn fsync(&self, handle: &Bytes) -> Result<()> {
        self.status(RequestBody::Fsync { handle: handle.clone() }).await
    }

    /// Creates `newpath` as a hard link to `oldpath`.
    pub async fn hardlink(&self, oldpath: &[u8], newpath: &[u8]) -> Result<()> {
        self.status(RequestBody::Hardlink { oldpath: b(oldpath), newpath: b(newpath) }).await
    }

    pub async fn lsetstat(&self, path: &[u8], attrs: &Attrs) -> Result<()> {
        self.status(RequestBody::Lsetstat { path: b(path), attrs: attrs.clone() }).await
    }

    pub async fn expand_path(&self, path: &[u8]) -> Result<Bytes> {
        self.one_name(RequestBody::ExpandPath { path: b(path) }).await
    }

    /// `stat@devmount`: the full stat, following a final symlink if `follow`.
    pub async fn dev_stat(&self, path: &[u8], follow: bool) -> Result<SeqStat> {
        self.seq_stat(RequestBody::DevStat { path: b(path), follow }).await
    }

    /// `fstat@devmount`.
    pub async fn dev_fstat(&self, handle: &Bytes) -> Result<SeqStat> {
        self.seq_stat(RequestBody::DevFstat { handle: handle.clone() }).await
    }

    /// `setstat@devmount`: ownership, mode, size and nanosecond times.
    pub async fn dev_setstat(&self, path: &[u8], follow: bool, attrs: &SetAttrs) -> Result<()> {
        self.status(RequestBody::DevSetstat { path: b(path), follow, attrs: *attrs }).await
    }

    /// `rename@devmount` with [`crate::proto::sftp::rename_flags`]; fails with
    /// [`StatusCode::CHANGED`] unless `newpath`, the file being replaced, still matches
    /// `condition`.
    pub async fn dev_rename(
        &self,
        oldpath: &[u8],
        newpath: &[u8],
        flags: u32,
        condition: Option<Condition>,
    ) -> Result<()> {
        self.status(RequestBody::DevRename { oldpath: b(oldpath), newpath: b(newpath), flags, condition })
            .await
    }

    /// `mknod@devmount`: a fifo or an empty regular file.
    pub async fn dev_mknod(&self, path: &[u8], mode: u32, rdev: u64) -> Result<()> {
        self.status(RequestBody::DevMknod { path: b(path), mode, rdev }).await
    }

    /// `walk@devmount`: starts a walk of the subtree at `path`, at most `max_depth` levels
    /// deep (0: no limit; 1: `path` and its children); read it with
    /// [`SftpClient::dev_walk_read`] and release it with [`SftpClient::close`].
    pub async fn dev_walk(&self, path: &[u8], max_entries: u32, max_depth: u32) -> Result<Bytes> {
        self.handle(RequestBody::DevWalk { path: b(path), max_entries, max_depth }).await
    }

    /// `walk-read@devmount`: the next batch, or `None` when the walk is complete. A batch
    /// with `eof` set is the last one: the walk can be closed without asking for more.
    pub async fn dev_walk_read(&self, handle: &Bytes) -> Result<Option<WalkBatch>> {
        match self.call(RequestBody::DevWalkRead { handle: handle.clone() }).await? {
            ResponseBody::Walk(batch) => Ok(Some(batch)),
            ResponseBody::Status(s) if s.code == StatusCode::EOF => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// `list@devmount`: the directory at `path` (a final symlink is not followed) and the full
    /// stats of up to `max_entries` of its children (0: as many as fit in one reply), in one
    /// round trip. When the reply is not `complete`, list the directory with
    /// [`SftpClient::dev_walk`] and a depth of 1 instead.
    pub async fn dev_list(&self, path: &[u8], max_entries: u32) -> Result<ListReply> {
        match self.call(RequestBody::DevList { path: b(path), max_entries }).await? {
            ResponseBody::List(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// `get@devmount`: the whole file if it is at most `max_size` bytes, else a
    /// [`StatusCode::TOO_LARGE`] status.
    pub async fn dev_get(&self, path: &[u8], max_size: u64) -> Result<GetReply> {
        match self.call(RequestBody::DevGet { path: b(path), max_size }).await? {
            ResponseBody::Get(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// `put@devmount`: creates or atomically replaces a whole file.
    pub async fn dev_put(&self, put: Put) -> Result<SeqStat> {
        self.seq_stat(RequestBody::DevPut(put)).await
    }

    /// `write@devmount`: WRITE that fails with [`StatusCode::CHANGED`] unless the open file
    /// still matches `condition`.
    pub async fn dev_write(
        &self,
        handle: &Bytes,
        offset: u64,
        condition: Condition,
        data: Bytes,
    ) -> Result<()> {
        self.status(RequestBody::DevWrite { handle: handle.clone(), offset, condition, data }).await
    }

    /// `barrier@devmount`: a feed sequence number such that every change made in the served
    /// tree before the server received this request is in a feed message numbered at most
    /// that, published already. A client that has applied the feed up to it has seen them.
    pub async fn dev_barrier(&self) -> Result<u64> {
        match self.call(RequestBody::DevBarrier).await? {
            ResponseBody::Barrier(seq) => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Reads a whole file with READs of the server's max read length, many in flight at once.
    pub async fn read_file(&self, path: &[u8]) -> Result<Bytes> {
        let no_attrs = Attrs::default();
        let (handle, attrs) = tokio::join!(self.open(path, open_flags::READ, &no_attrs), self.stat(path));
        let handle = handle?;
        let size_hint = attrs.ok().and_then(|a| a.size).unwrap_or(0);
        let data = self.read_all(&handle, size_hint).await;
        let closed = self.close(&handle).await;
        let data = data?;
        closed?;
        Ok(data)
    }

    /// Reads a whole file with READs of the server's max read length, keeping up to
    /// [`MAX_WINDOW`] of them under way all the time (the semaphores decide how many are
    /// actually in flight). It reads up to one byte past `size_hint`, so that the EOF that ends
    /// the file arrives with the data rather than one round trip later, and further only as
    /// the file turns out longer than that. The last READ asks for no more than that byte, so
    /// it takes no more of the bytes-in-flight budget than the data it expects.
    async fn read_all(&self, handle: &Bytes, size_hint: u64) -> Result<Bytes> {
        let chunk = u64::from(self.info.read_len());
        let mut out = BytesMut::with_capacity(size_hint.min(MAX_WINDOW * chunk) as usize);
        let mut reads = JoinSet::new();
        // READs answer in any order; those that came before the ones in front of them wait
        // here, by offset, to be appended.
        let mut arrived = BTreeMap::new();
        let mut next = 0;
        // The size the file is expected to have; READs go up to one byte past it.
        let mut expected = size_hint;
        // Where the file ends: the end of the first short READ.
        let mut end: Option<u64> = None;
        loop {
            while (reads.len() as u64) < MAX_WINDOW && next <= expected && end.is_none_or(|e| next < e) {
                let len = chunk.min(expected + 1 - next);
                let (client, handle, offset) = (self.clone(), handle.clone(), next);
                reads.spawn(
                    async move { (offset, len, client.read_chunk(&handle, offset, len as u32).await) },
                );
                next += len;
            }
            let Some(joined) = reads.join_next().await else {
                return Ok(out.freeze());
            };
            let (offset, len, data) = joined.map_err(join_error)?;
            let data = data?;
            if (data.len() as u64) < len {
                let at = offset + data.len() as u64;
                end = Some(end.map_or(at, |e| e.min(at)));
            } else if offset + len == expected + 1 {
                // The byte past the expected end exists: the file is longer than its size said.
                expected += GROWTH_WINDOW * chunk;
            }
            arrived.insert(offset, data);
            while end.is_none_or(|e| (out.len() as u64) < e) {
                let Some(data) = arrived.remove(&(out.len() as u64)) else { break };
                out.extend_from_slice(&data);
            }
        }
    }

    /// Reads `len` bytes at `offset`, fewer only at end of file.
    async fn read_chunk(&self, handle: &Bytes, offset: u64, len: u32) -> Result<Bytes> {
        let first = self.read(handle, offset, len).await?;
        if first.len() >= len as usize || first.is_empty() {
            return Ok(first);
        }
        let mut data = BytesMut::from(first.as_ref());
        while data.len() < len as usize {
            let more = self.read(handle, offset + data.len() as u64, len - data.len() as u32).await?;
            if more.is_empty() {
                break;
            }
            data.extend_from_slice(&more);
        }
        Ok(data.freeze())
    }

    /// Creates or truncates `path` and writes `data` with WRITEs of the server's max write
    /// length, many in flight at once.
    pub async fn write_file(&self, path: &[u8], data: Bytes) -> Result<()> {
        let flags = open_flags::WRITE | open_flags::CREAT | open_flags::TRUNC;
        let handle = self.open(path, flags, &Attrs::default()).await?;
        let written = self.write_all(&handle, data).await;
        let closed = self.close(&handle).await;
        written?;
        closed
    }

    async fn write_all(&self, handle: &Bytes, data: Bytes) -> Result<()> {
        let chunk = self.info.write_len() as usize;
        let mut writes = JoinSet::new();
        for offset in (0..data.len()).step_by(chunk) {
            let piece = data.slice(offset..(offset + chunk).min(data.len()));
            let (client, handle) = (self.clone(), handle.clone());
            writes.spawn(async move { client.write(&handle, offset as u64, piece).await });
            if writes.len() as u64 >= MAX_WINDOW {
                if let Some(joined) = writes.join_next().await {
                    joined.map_err(join_error)??;
                }
            }
        }
        while let Some(joined) = writes.join_next().await {
            joined.map_err(join_error)??;
        }
        Ok(())
    }
}

/// The most READs or WRITEs one `read_file`/`write_file` has under way at once; the semaphores
/// decide how many of them are actually in flight.
const MAX_WINDOW: u64 = 256;
/// How many more READs' worth a file that turned out longer than its size said is read ahead
/// at a time.
const GROWTH_WINDOW: u64 = 8;

fn b(s: &[u8]) -> Bytes {
    Bytes::copy_from_slice(s)
}

fn lost(err: std::io::Error) -> SftpError {
    tracing::debug!("SFTP connection failed during the handshake: {err}");
    SftpError::ConnectionLost
}

fn join_error(err: tokio::task::JoinError) -> SftpError {
    if err.is_panic() {
        std::panic::resume_unwind(err.into_panic());
    }
    SftpError::ConnectionLost
}

/// A reply of the wrong kind: a failure status becomes [`SftpError::Status`].
fn unexpected(body: ResponseBody) -> SftpError {
    match body {
        ResponseBody::Status(status) => SftpError::from_status(status),
        _ => SftpError::Protocol(DecodeError::Invalid("unexpected reply type")),
    }
}

/// Frames smaller than this are copied together so that a burst of small requests leaves in
/// one write; larger ones are written as they are.
const COALESCE_LIMIT: usize = 64 * 1024;

async fn write_loop<S: AsyncWrite>(
    mut wr: WriteHalf<S>,
    mut frames: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<Shared>,
) {
    let mut batch = BytesMut::new();
    while let Some(first) = frames.recv().await {
        let mut next = Some(first);
        let result = async {
            while let Some(frame) = next.take() {
                if frame.len() >= COALESCE_LIMIT {
                    if !batch.is_empty() {
                        wr.write_all(&batch).await?;
                        batch.clear();
                    }
                    wr.write_all(&frame).await?;
                } else {
                    batch.extend_from_slice(&frame);
                }
                if batch.len() < COALESCE_LIMIT {
                    next = frames.try_recv().ok();
                }
            }
            wr.write_all(&batch).await?;
            batch.clear();
            wr.flush().await
        }
        .await;
        if let Err(err) = result {
            tracing::debug!("SFTP connection lost while writing: {err}");
            shared.close(format!("cannot write to the server: {err}"));
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<S: AsyncRead>(mut rd: ReadHalf<S>, mut buf: BytesMut, shared: Arc<Shared>) {
    let why = loop {
        match take_frame(&mut buf, MAX_PACKET) {
            Ok(Some(frame)) => {
                let Some(id) = peek_id(&frame) else {
                    break "a reply without a request id".to_owned();
                };
                let Some(waiter) = shared.pending().waiters.remove(&id) else {
                    break format!("a reply to unknown request id {id}");
                };
                // The caller may have gone; its permits are released all the same.
                let _ = waiter.reply.send(frame);
                continue;
            }
            Ok(None) => {}
            Err(err) => break err.to_string(),
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "closed by the server".to_owned(),
            Ok(_) => {}
            Err(err) => break err.to_string(),
        }
    };
    tracing::debug!("SFTP connection lost: {why}");
    shared.close(why);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use bytes::BufMut;
    use tokio::io::DuplexStream;
    use tokio::time::timeout;

    use super::*;
    use crate::proto::stat::FullStat;

    /// The server side of a test: reads requests and answers them as the test decides.
    struct Peer {
        io: DuplexStream,
        buf: BytesMut,
    }

    impl Peer {
        async fn accept(io: DuplexStream, extensions: &[(&str, &str)]) -> Peer {
            let mut peer = Peer { io, buf: BytesMut::new() };
            let init = Init::decode(peer.frame().await.expect("an INIT")).unwrap();
            assert_eq!(init.version, 3);
            let extensions = extensions.iter().map(|(n, v)| (b(n.as_bytes()), b(v.as_bytes()))).collect();
            let mut out = BytesMut::new();
            Version { version: 3, extensions }.encode(&mut out);
            peer.io.write_all(&out).await.unwrap();
            peer
        }

        async fn frame(&mut self) -> Option<Bytes> {
            loop {
                if let Some(frame) = take_frame(&mut self.buf, MAX_PACKET).unwrap() {
                    return Some(frame);
                }
                if self.io.read_buf(&mut self.buf).await.unwrap() == 0 {
                    return None;
                }
            }
        }

        async fn recv(&mut self) -> Option<Request> {
            Some(Request::decode(self.frame().await?).unwrap())
        }

        async fn send(&mut self, id: u32, body: ResponseBody) {
            let mut out = BytesMut::new();
            Response { id, body }.encode(&mut out);
            self.io.write_all(&out).await.unwrap();
        }

        /// Asserts that no request arrives. With the clock paused, the timeout fires only once
        /// every task is idle, so a request the client could send would have been sent.
        async fn assert_quiet(&mut self) {
            if let Ok(req) = timeout(Duration::from_secs(60), self.recv()).await {
                panic!("unexpected request {req:?}");
            }
        }
    }

    /// A connected client and its peer. If `limits` is given the peer advertises and answers
    /// `limits@openssh.com`.
    async fn pair(
        config: Config,
        extensions: &'static [(&'static str, &'static str)],
        limits: Option<Limits>,
    ) -> (SftpClient, Peer) {
        let (near, far) = tokio::io::duplex(4 << 20);
        let peer = tokio::spawn(async move {
            let mut peer = Peer::accept(far, extensions).await;
            if let Some(limits) = limits {
                let req = peer.recv().await.unwrap();
                assert_eq!(req.body, RequestBody::Limits);
                peer.send(req.id, ResponseBody::Limits(limits)).await;
            }
            peer
        });
        let (client, info) = SftpClient::connect_with(near, config).await.unwrap();
        assert_eq!(info.limits, limits.unwrap_or(Limits::DEFAULT));
        (client, peer.await.unwrap())
    }

    fn attrs_sized(size: u64) -> ResponseBody {
        ResponseBody::Attrs(Attrs { size: Some(size), ..Attrs::default() })
    }

    fn path_of(req: &Request) -> Bytes {
        match &req.body {
            RequestBody::Lstat { path } | RequestBody::Stat { path } => path.clone(),
            other => panic!("unexpected request {other:?}"),
        }
    }

    /// The number in a path like "/7".
    fn index(req: &Request) -> u64 {
        std::str::from_utf8(&path_of(req)[1..]).unwrap().parse().unwrap()
    }

    const LIMITED: &[(&str, &str)] = &[(ext::LIMITS, "1")];

    #[tokio::test]
    async fn replies_are_routed_by_id_whatever_their_order() {
        const EXTS: &[(&str, &str)] =
            &[(ext::LIMITS, "1"), (ext::STAT, "1"), (ext::STATVFS, "2"), (ext::VERSION, "9.9.9")];
        let limits =
            Limits { max_packet_len: 34_000, max_read_len: 1000, max_write_len: 500, max_open_handles: 0 };
        let (client, mut peer) = pair(Config::default(), EXTS, Some(limits)).await;
        assert_eq!(client.info().server_version.as_deref(), Some(&b"9.9.9"[..]));
        assert_eq!((client.info().read_len(), client.info().write_len()), (1000, 500));
        assert!(client.info().has(ext::STAT) && !client.info().has(ext::GET));

        let c = client.clone();
        let stat = tokio::spawn(async move { c.stat(b"/a").await });
        let c = client.clone();
        let dev_stat = tokio::spawn(async move { c.dev_stat(b"/b", true).await });
        let c = client.clone();
        let statvfs = tokio::spawn(async move { c.statvfs(b"/c").await });

        let mut received = Vec::new();
        for _ in 0..3 {
            received.push(peer.recv().await.unwrap());
        }
        let full = FullStat { ino: 42, size: 7, ..FullStat::default() };
        for req in received.into_iter().rev() {
            let body = match req.body {
                RequestBody::Stat { .. } => attrs_sized(1),
                RequestBody::DevStat { follow: true, .. } => {
                    ResponseBody::SeqStat(SeqStat { seq: 9, stat: full })
                }
                RequestBody::Statvfs { .. } => {
                    ResponseBody::StatVfs(StatVfs { namemax: 255, ..StatVfs::default() })
                }
                other => panic!("unexpected request {other:?}"),
            };
            peer.send(req.id, body).await;
        }
        assert_eq!(stat.await.unwrap().unwrap().size, Some(1));
        assert_eq!(dev_stat.await.unwrap().unwrap(), SeqStat { seq: 9, stat: full });
        assert_eq!(statvfs.await.unwrap().unwrap().namemax, 255);
        assert_eq!(client.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_are_capped() {
        let (client, mut peer) = pair(Config { max_in_flight: 4, ..Config::default() }, &[], None).await;
        let mut tasks = Vec::new();
        for i in 0..10u64 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move { c.lstat(format!("/{i}").as_bytes()).await }));
        }
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(peer.recv().await.unwrap());
        }
        peer.assert_quiet().await;
        assert_eq!(client.in_flight(), 4);

        // One answer lets exactly one more request out.
        let first = held.remove(0);
        peer.send(first.id, attrs_sized(index(&first))).await;
        held.push(peer.recv().await.unwrap());
        peer.assert_quiet().await;

        let mut answered = 1;
        while answered < 10 {
            let req = match held.pop() {
                Some(req) => req,
                None => peer.recv().await.unwrap(),
            };
            peer.send(req.id, attrs_sized(index(&req))).await;
            answered += 1;
        }
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap().unwrap().size, Some(i as u64));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_in_flight_are_capped() {
        let config = Config { max_in_flight: 64, max_bytes_in_flight: 3000 };
        let (client, mut peer) = pair(config, &[], None).await;
        let handle = b(b"h");
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            let (c, h) = (client.clone(), handle.clone());
            tasks.push(tokio::spawn(async move { c.read(&h, i * 1000, 1000).await }));
        }
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(peer.recv().await.unwrap());
        }
        peer.assert_quiet().await;
        // A stat carries no data and is not held back by the byte budget.
        let c = client.clone();
        let stat = tokio::spawn(async move { c.stat(b"/s").await });
        let req = peer.recv().await.unwrap();
        peer.send(req.id, attrs_sized(0)).await;
        stat.await.unwrap().unwrap();

        let mut answered = 0;
        while answered < 5 {
            let req = match held.pop() {
                Some(req) => req,
                None => peer.recv().await.unwrap(),
            };
            let RequestBody::Read { offset, len: 1000, .. } = req.body else { panic!("{req:?}") };
            peer.send(req.id, ResponseBody::Data(Bytes::from(vec![(offset / 1000) as u8; 1000]))).await;
            answered += 1;
        }
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap().unwrap(), vec![i as u8; 1000]);
        }
    }

    #[tokio::test]
    async fn a_lost_connection_fails_every_pending_request() {
        let (client, mut peer) = pair(Config::default(), &[], None).await;
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move { c.stat(b"/x").await }));
        }
        for _ in 0..3 {
            peer.recv().await.unwrap();
        }
        drop(peer);
        for task in tasks {
            assert!(matches!(task.await.unwrap(), Err(SftpError::ConnectionLost)));
        }
        assert!(matches!(client.stat(b"/y").await, Err(SftpError::ConnectionLost)));
        assert_eq!(client.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_reply_to_an_unknown_id_ends_the_session() {
        let (client, mut peer) = pair(Config::default(), &[], None).await;
        let c = client.clone();
        let stat = tokio::spawn(async move { c.stat(b"/x").await });
        let req = peer.recv().await.unwrap();
        peer.send(req.id.wrapping_add(1000), attrs_sized(0)).await;
        assert!(matches!(stat.await.unwrap(), Err(SftpError::ConnectionLost)));
        let why = timeout(Duration::from_secs(10), client.closed()).await.expect("closed() resolves");
        assert!(why.contains("unknown request id"), "{why}");
    }

    #[tokio::test]
    async fn closed_resolves_when_the_server_ends_the_channel() {
        let (client, peer) = pair(Config::default(), &[], None).await;
        let waiting = tokio::spawn({
            let c = client.clone();
            async move { c.closed().await }
        });
        drop(peer);
        let why = timeout(Duration::from_secs(10), waiting).await.expect("closed() resolves").unwrap();
        assert_eq!(&*why, "closed by the server");
        // Later callers get the same answer at once.
        assert_eq!(&*client.closed().await, "closed by the server");
    }

    #[tokio::test]
    async fn statuses_become_typed_errors() {
        let (client, mut peer) = pair(Config::default(), &[], None).await;
        assert!(matches!(client.dev_stat(b"/a", false).await, Err(SftpError::Unsupported(ext::STAT))));
        assert!(matches!(client.fsync(&b(b"h")).await, Err(SftpError::Unsupported(ext::FSYNC))));

        let c = client.clone();
        let mkdir = tokio::spawn(async move { c.mkdir(b"/d", &Attrs::default()).await });
        // The first request the peer sees is the MKDIR: the unsupported ones were never sent.
        let req = peer.recv().await.unwrap();
        assert!(matches!(req.body, RequestBody::Mkdir { .. }));
        peer.send(req.id, ResponseBody::Status(Status::new(StatusCode::FAILURE, "File exists"))).await;
        let err = mkdir.await.unwrap().unwrap_err();
        assert!(err.is_status(StatusCode::FAILURE));
        assert_eq!(err.errno(), libc::EEXIST);

        let c = client.clone();
        let readdir = tokio::spawn(async move { c.readdir(&b(b"d")).await });
        let req = peer.recv().await.unwrap();
        peer.send(req.id, ResponseBody::Status(Status::new(StatusCode::EOF, "End of file"))).await;
        assert_eq!(readdir.await.unwrap().unwrap(), None);

        let c = client.clone();
        let open = tokio::spawn(async move { c.open(b"/f", open_flags::READ, &Attrs::default()).await });
        let req = peer.recv().await.unwrap();
        peer.send(req.id, ResponseBody::Data(b(b"not a handle"))).await;
        assert!(matches!(open.await.unwrap(), Err(SftpError::Protocol(_))));
        assert_eq!(SftpError::ConnectionLost.errno(), libc::ENOTCONN);

        // No limits advertised: OpenSSH's 256 KiB packets. A larger WRITE is refused unsent.
        let big = Bytes::from(vec![0; 300 * 1024]);
        let err = client.write(&b(b"h"), 0, big).await.unwrap_err();
        assert!(matches!(err, SftpError::TooLarge { max: 262_144, .. }), "{err}");
        assert_eq!(client.in_flight(), 0);
    }

    /// Serves an in-memory tree until the client goes away, then returns it.
    async fn serve_files(
        mut peer: Peer,
        mut files: HashMap<Bytes, Vec<u8>>,
        stat_sizes: HashMap<Bytes, u64>,
    ) -> HashMap<Bytes, Vec<u8>> {
        let max = (1000u32, 300usize);
        while let Some(req) = peer.recv().await {
            let body = match req.body {
                RequestBody::Open { filename, pflags, .. } => {
                    if pflags & open_flags::TRUNC != 0 {
                        files.insert(filename.clone(), Vec::new());
                    }
                    ResponseBody::Handle(filename)
                }
                RequestBody::Stat { path } => attrs_sized(stat_sizes[&path]),
                RequestBody::Read { handle, offset, len } => {
                    assert!(len <= max.0, "READ of {len}");
                    let file = &files[&handle];
                    let start = (offset as usize).min(file.len());
                    let end = (start + len as usize).min(file.len());
                    if start == end {
                        ResponseBody::Status(Status::new(StatusCode::EOF, "End of file"))
                    } else {
                        // Short reads, as a server may give them: at most 700 bytes.
                        ResponseBody::Data(Bytes::copy_from_slice(&file[start..end.min(start + 700)]))
                    }
                }
                RequestBody::Write { handle, offset, data } => {
                    assert!(data.len() <= max.1, "WRITE of {}", data.len());
                    let file = files.get_mut(&handle).unwrap();
                    let end = offset as usize + data.len();
                    if file.len() < end {
                        file.resize(end, 0);
                    }
                    file[offset as usize..end].copy_from_slice(&data);
                    ResponseBody::Status(Status::ok())
                }
                RequestBody::Close { .. } => ResponseBody::Status(Status::ok()),
                other => panic!("unexpected request {other:?}"),
            };
            peer.send(req.id, body).await;
        }
        files
    }

    #[tokio::test]
    async fn whole_files_are_read_and_written_in_pieces() {
        let limits =
            Limits { max_packet_len: 34_000, max_read_len: 1000, max_write_len: 300, max_open_handles: 0 };
        let (client, peer) = pair(Config::default(), LIMITED, Some(limits)).await;
        let content: Vec<u8> = (0..10_500u32).map(|i| (i % 251) as u8).collect();
        // More READs than one window holds, and a size that is a whole number of READs.
        let big: Vec<u8> = (0..600_500u32).map(|i| (i % 241) as u8).collect();
        let files = HashMap::from([
            (b(b"/f"), content.clone()),
            (b(b"/grown"), content.clone()),
            (b(b"/big"), big.clone()),
            (b(b"/exact"), content[..3000].to_vec()),
            (b(b"/empty"), Vec::new()),
        ]);
        let sizes = HashMap::from([
            (b(b"/f"), 10_500),
            (b(b"/grown"), 10),
            (b(b"/big"), big.len() as u64),
            (b(b"/exact"), 3000),
            (b(b"/empty"), 0),
            (b(b"/new"), 0),
        ]);
        let server = tokio::spawn(serve_files(peer, files, sizes));

        assert_eq!(client.read_file(b"/f").await.unwrap(), content);
        assert_eq!(client.read_file(b"/grown").await.unwrap(), content);
        assert_eq!(client.read_file(b"/big").await.unwrap(), big);
        assert_eq!(client.read_file(b"/exact").await.unwrap(), content[..3000]);
        assert!(client.read_file(b"/empty").await.unwrap().is_empty());
        let mut written = BytesMut::new();
        written.put_slice(&content[..2048]);
        client.write_file(b"/new", written.freeze()).await.unwrap();
        drop(client);
        let files = server.await.unwrap();
        assert_eq!(files[&b(b"/new")], &content[..2048]);
    }

    #[test]
    fn lengths_follow_each_limit() {
        let info = |max_read_len, max_write_len| ServerInfo {
            version: 3,
            extensions: Vec::new(),
            server_version: None,
            limits: Limits { max_read_len, max_write_len, ..Limits::DEVMOUNT },
        };
        let both = info(4096, 1000);
        assert_eq!((both.read_len(), both.write_len()), (4096, 1000));
        let none = info(0, 0);
        let default = &Limits::DEFAULT;
        assert_eq!(none.read_len() as u64, default.max_read_len);
        assert_eq!(none.write_len() as u64, default.max_write_len);
        let huge = info(u64::MAX, u64::MAX);
        assert_eq!((huge.read_len(), huge.write_len()), (MAX_DATA, MAX_DATA));
        assert_eq!(clamp_len(0, 7), 7, "the default of the limit in question");
    }

    /// The client against devmount's own server: the `@devmount` listings, and whole files
    /// read with many READs of one handle at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_walks_and_files_against_the_devmount_server() {
        use crate::sftp::server::{serve, SftpContext};

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        for i in 0..5 {
            std::fs::write(root.join(format!("d/f{i}")), b"").unwrap();
        }
        let content: Bytes = (0..3_500_000u32).map(|i| (i % 249) as u8).collect::<Vec<u8>>().into();
        std::fs::write(root.join("d/big"), &content).unwrap();
        let ctx = SftpContext {
            root: root.clone(),
            conn: 1,
            changes: Arc::new(()),
            limits: crate::sftp::server::Limits::default(),
        };
        let (near, far) = tokio::io::duplex(4 << 20);
        let session = tokio::spawn(serve(far, Arc::new(ctx)));
        let (client, info) = SftpClient::connect(near).await.unwrap();
        assert!(info.has(ext::LIST) && info.read_len() == MAX_DATA);

        let list = client.dev_list(b"d", 0).await.unwrap();
        assert!(list.complete && list.stat.is_dir());
        let mut names: Vec<_> = list.entries.iter().map(|e| e.path.clone()).collect();
        names.sort();
        assert_eq!(names, ["big", "f0", "f1", "f2", "f3", "f4", "sub"]);
        let partial = client.dev_list(b"d", 3).await.unwrap();
        assert!(!partial.complete && partial.entries.len() == 3);
        assert!(client.dev_list(b"nope", 0).await.unwrap_err().is_status(StatusCode::NO_SUCH_FILE));

        // Eight entries in batches of three: the third batch says it is the last.
        let walk = client.dev_walk(b"d", 3, 1).await.unwrap();
        let mut batches = Vec::new();
        while let Some(batch) = client.dev_walk_read(&walk).await.unwrap() {
            let eof = batch.eof;
            batches.push(batch.entries.len());
            if eof {
                break;
            }
        }
        client.close(&walk).await.unwrap();
        assert_eq!(batches, [3, 3, 2]);

        assert_eq!(client.read_file(b"d/big").await.unwrap(), content);
        client.write_file(b"d/copy", content.clone()).await.unwrap();
        assert_eq!(std::fs::read(root.join("d/copy")).unwrap(), content);
        drop(client);
        session.await.unwrap().unwrap();
    }

    /// The client against OpenSSH's own `sftp-server` on a temporary directory: the codec's
    /// byte layouts as OpenSSH reads and writes them, SYMLINK's argument order included.
    #[tokio::test]
    async fn interoperates_with_openssh_sftp_server() {
        use std::os::unix::ffi::OsStrExt;

        let server =
            ["/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .expect("OpenSSH's sftp-server is not installed (package openssh-server)");
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(server)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stream = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
        let (client, info) = SftpClient::connect(stream).await.unwrap();
        assert!(info.has(ext::LIMITS) && info.has(ext::POSIX_RENAME) && info.server_version.is_none());
        assert!(info.limits.max_read_len > 32 * 1024, "{:?}", info.limits);

        let root = dir.path().as_os_str().as_bytes().to_vec();
        let path = |name: &[u8]| [&root[..], b"/", name].concat();
        let sub = path(b"sub\xff");
        client.mkdir(&sub, &Attrs { permissions: Some(0o750), ..Attrs::default() }).await.unwrap();
        let err = client.mkdir(&sub, &Attrs::default()).await.unwrap_err();
        assert!(err.is_status(StatusCode::FAILURE), "{err}");
        let err = client.stat(&path(b"missing")).await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);

        let content: Bytes = (0..3_000_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>().into();
        let file = [&sub[..], b"/f\xfe"].concat();
        client.write_file(&file, content.clone()).await.unwrap();
        assert_eq!(client.read_file(&file).await.unwrap(), content);
        assert_eq!(std::fs::read(std::ffi::OsStr::from_bytes(&file)).unwrap(), content);
        assert_eq!(client.lstat(&file).await.unwrap().size, Some(content.len() as u64));

        let link = path(b"link");
        client.symlink(b"sub\xff/f\xfe", &link).await.unwrap();
        assert_eq!(
            std::fs::read_link(std::ffi::OsStr::from_bytes(&link)).unwrap().as_os_str().as_bytes(),
            b"sub\xff/f\xfe"
        );
        assert_eq!(client.readlink(&link).await.unwrap(), &b"sub\xff/f\xfe"[..]);
        assert_eq!(client.stat(&link).await.unwrap().size, Some(content.len() as u64));

        let hard = path(b"hard");
        client.hardlink(&file, &hard).await.unwrap();
        let moved = path(b"moved");
        client.posix_rename(&hard, &moved).await.unwrap();
        client.rename(&moved, &file).await.unwrap_err();
        client.setstat(&moved, &Attrs { permissions: Some(0o600), ..Attrs::default() }).await.unwrap();
        assert_eq!(client.stat(&file).await.unwrap().permissions.map(|p| p & 0o7777), Some(0o600));
        assert!(client.statvfs(&root).await.unwrap().namemax > 0);
        assert_eq!(client.realpath(&[&sub[..], b"/.."].concat()).await.unwrap(), &root[..]);

        let handle =
            client.open(&file, open_flags::READ | open_flags::WRITE, &Attrs::default()).await.unwrap();
        client.fsync(&handle).await.unwrap();
        assert_eq!(client.read(&handle, content.len() as u64, 10).await.unwrap(), Bytes::new());
        assert_eq!(client.fstat(&handle).await.unwrap().size, Some(content.len() as u64));
        client.close(&handle).await.unwrap();

        let dir_handle = client.opendir(&sub).await.unwrap();
        let mut names = Vec::new();
        while let Some(batch) = client.readdir(&dir_handle).await.unwrap() {
            names.extend(batch.into_iter().map(|n| n.filename));
        }
        client.close(&dir_handle).await.unwrap();
        names.sort();
        assert_eq!(names, [&b"."[..], b"..", b"f\xfe"]);

        for name in [&link, &moved, &file] {
            client.remove(name).await.unwrap();
        }
        client.rmdir(&sub).await.unwrap();
        drop(client);
        assert!(child.wait().await.unwrap().success());
    }
}
