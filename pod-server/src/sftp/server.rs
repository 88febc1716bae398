//! The SFTP subsystem: one connection's request loop.
//!
//! One reader decodes requests in order and starts each one, so requests run concurrently and
//! answer out of order, as SFTP allows: a slow read does not hold up a stat.
//! - Requests that depend on each other run in arrival order: requests on one handle (reads of
//!   a regular file excepted), and a mutation and any other request on a related path
//!   ([`super::order`]). The reader takes each request's place in that order before it reads
//!   the next.
//! - File system work runs on blocking threads ([`ops`]), in two ways:
//!   - Quick requests, which only read metadata and never wait on another party (stats,
//!     realpath, readlink, statvfs, opening and reading directories; [`is_quick`]), run in
//!     batches on at most [`QUICK_WORKERS`] threads of the connection. The reader decodes
//!     every packet it has buffered before it waits for more, and hands the quick requests
//!     whose turn has come to the workers at once; a worker runs a batch in a row and sends its
//!     replies together. A thread hand-off for each stat would cost more than the stat.
//!   - Every other request (OPEN, which waits for the other end of a FIFO; READ and WRITE;
//!     fsync; mutations; get and put; walks and listings, which may stat thousands of files)
//!     runs on a blocking thread of its own, so one that blocks for long never holds up a
//!     quick one, nor another like it. These are bounded by `max_in_flight`.
//! - `barrier@devmount` holds no thread: a task on the runtime waits for the change tracker's
//!   answer.
//! - One writer task puts the responses on the stream, coalescing small ones.
//! - At most `max_in_flight` requests run at once: the reader takes a permit before it reads
//!   the next packet, so a client that keeps sending while the server is busy is held back by
//!   the transport's flow control instead of growing queues here.
//! - A malformed packet (bad or oversized length, truncated body, unknown type) ends this
//!   connection only; the caller closes its channel.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::handles::{Handle, Handles, Object};
use super::ops::{self, File, Fs, OpError};
use super::order::{Access, Done, InFlight, Key, Keys};
use super::paths::Root;
use crate::feed::ChangeTracker;
use crate::proto::sftp::{
    self, open_flags, Attrs, Init, NameEntry, Request, RequestBody, Response, ResponseBody, SeqStat,
    SetAttrs, Status, StatusCode, TimeSet, Version, MAX_DATA, MAX_PACKET,
};
use crate::proto::stat::Timespec;
use crate::proto::wire::{take_frame, DecodeError};

/// Per-connection resource caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open handles; one more OPEN answers FAILURE "too many open handles".
    pub max_handles: usize,
    /// Requests being served at once; beyond it the server stops reading. Also the most
    /// blocking threads the connection's slow requests hold.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_handles: 4096, max_in_flight: 256 }
    }
}

/// What one SFTP session needs from the server.
pub struct SftpContext {
    /// The confinement root, canonical.
    pub root: PathBuf,
    /// The SSH connection's id, as the change tracker knows it.
    pub conn: u64,
    pub changes: Arc<dyn ChangeTracker>,
    pub limits: Limits,
}

/// Entries per READDIR reply.
const READDIR_BATCH: usize = 100;
/// Entries per `walk-read@devmount` reply when the client asks for 0, and the most it may ask
/// (also of `list@devmount`, where 0 means as many as fit in one reply).
const WALK_BATCH_DEFAULT: usize = 4096;
const WALK_BATCH_MAX: usize = 65_536;

/// Threads per connection for quick requests. Their system calls are answered from the
/// kernel's caches in microseconds, so more threads would mostly add hand-offs and scheduler
/// work; two let one batch run while another's replies go out, and use a second core.
const QUICK_WORKERS: usize = 2;
/// Quick requests a worker takes at a time; their replies leave in one write.
const QUICK_BATCH: usize = 32;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("malformed packet: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the stream ended inside a packet")]
    TruncatedStream,
    #[error("reading the stream")]
    Read(#[source] io::Error),
}

/// Serves one SFTP session on `stream` until the client ends it. Returns an error, already
/// logged, when the session was cut short by a malformed packet or a broken stream; other
/// connections are never affected.
pub async fn serve<S>(stream: S, ctx: Arc<SftpContext>) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let root = match Root::open(&ctx.root) {
        Ok(root) => root,
        Err(e) => {
            warn!(conn = ctx.conn, "sftp: cannot open the root {}: {e}", ctx.root.display());
            return Err(e).with_context(|| format!("opening root {}", ctx.root.display()));
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    let in_flight = ctx.limits.max_in_flight.max(1);
    let (replies, rx) = mpsc::channel(in_flight);
    let conn = Arc::new(Conn {
        keys: Keys::new(root.path()),
        fs: Fs::new(root, ctx.conn, ctx.changes.clone()),
        handles: Handles::new(ctx.limits.max_handles),
        max_handles: ctx.limits.max_handles,
        replies,
        quick: Mutex::default(),
    });
    let writer = tokio::spawn(write_loop(wr, rx));
    let read = read_loop(rd, &conn, in_flight).await;
    // Every request still running holds the connection, and with it the sender of replies:
    // the writer ends once the last answer is out.
    drop(conn);
    match read {
        Ok(()) => {
            match writer.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(conn = ctx.conn, "sftp: writing answers: {e}"),
                Err(e) => warn!(conn = ctx.conn, "sftp: writer task failed: {e}"),
            }
            Ok(())
        }
        Err(e) => {
            writer.abort();
            warn!(conn = ctx.conn, "sftp: closing the session: {e}");
            Err(anyhow::Error::new(e).context(format!("sftp session of connection {}", ctx.conn)))
        }
    }
}

struct Conn {
    keys: Keys,
    fs: Fs,
    handles: Handles,
    max_handles: usize,
    /// To the writer task; a closed channel means the session is over and nobody waits for
    /// the answer.
    replies: mpsc::Sender<Bytes>,
    quick: Mutex<QuickQueue>,
}

/// Quick requests whose turn has come, waiting for a worker.
#[derive(Default)]
struct QuickQueue {
    jobs: VecDeque<Job>,
    /// Workers running; each takes batches until the queue is empty.
    workers: usize,
}

/// A request whose turn has come.
struct Job {
    work: Work,
    hold: Hold,
}

struct Work {
    id: u32,
    body: RequestBody,
    target: Target,
}

/// Held until the request's reply is on its way: then the requests ordered after it may start
/// (a CLOSE among them finds the handle let go of, since the work is consumed before), and
/// the reader may read one more.
struct Hold {
    _done: Done,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn quick_queue(&self) -> MutexGuard<'_, QuickQueue> {
        // Every critical section is a push, a drain or a count: a panic cannot leave the queue
        // half changed.
        self.quick.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues quick requests and starts workers for them: one per [`QUICK_BATCH`] waiting, at
    /// most [`QUICK_WORKERS`] in all.
    fn run_quick(self: &Arc<Self>, jobs: impl IntoIterator<Item = Job>) {
        let start = {
            let mut queue = self.quick_queue();
            queue.jobs.extend(jobs);
            let wanted = queue.jobs.len().div_ceil(QUICK_BATCH).min(QUICK_WORKERS);
            let start = wanted.saturating_sub(queue.workers);
            queue.workers += start;
            start
        };
        for _ in 0..start {
            let conn = self.clone();
            tokio::task::spawn_blocking(move || conn.quick_worker());
        }
    }

    fn quick_worker(&self) {
        let mut out = BytesMut::new();
        let mut holds = Vec::with_capacity(QUICK_BATCH);
        loop {
            let jobs: Vec<Job> = {
                let mut queue = self.quick_queue();
                if queue.jobs.is_empty() {
                    queue.workers -= 1;
                    return;
                }
                let n = queue.jobs.len().min(QUICK_BATCH);
                queue.jobs.drain(..n).collect()
            };
            // Quick requests only read, and all of them have started: they may share the
            // directories they resolve through.
            self.fs.root().reads_together(|| {
                for Job { work, hold } in jobs {
                    self.serve_one(work, &mut out);
                    holds.push(hold);
                }
            });
            let _ = self.replies.blocking_send(out.split().freeze());
            holds.clear();
        }
    }

    /// Starts a request whose turn has come, as `how` says.
    fn run(self: &Arc<Self>, how: Run, job: Job) {
        match how {
            Run::Quick => self.run_quick([job]),
            Run::Alone => self.run_alone(job),
            Run::Barrier => self.run_barrier(job),
        }
    }

    /// `barrier@devmount`: waits for the change tracker on the runtime.
    fn run_barrier(self: &Arc<Self>, job: Job) {
        let conn = self.clone();
        tokio::spawn(async move {
            let seq = conn.fs.barrier().await;
            let mut out = BytesMut::new();
            encode(job.work.id, ResponseBody::Barrier(seq), &mut out);
            let _ = conn.replies.send(out.freeze()).await;
            drop(job.hold);
        });
    }

    /// Runs a request that may block for long on a blocking thread of its own.
    fn run_alone(self: &Arc<Self>, job: Job) {
        let conn = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = BytesMut::new();
            conn.serve_one(job.work, &mut out);
            let _ = conn.replies.blocking_send(out.freeze());
            drop(job.hold);
        });
    }

    /// Serves one request and appends its reply to `out`. A panic is answered as an internal
    /// error, so that a worker goes on with the rest of its batch.
    fn serve_one(&self, work: Work, out: &mut BytesMut) {
        let Work { id, body, target } = work;
        let start = out.len();
        let served = catch_unwind(AssertUnwindSafe(|| match target {
            Target::Paths => encode(id, path_op(self, body), out),
            Target::Handle(h) => match (&body, &h.object) {
                (RequestBody::Read { offset, len, .. }, Object::File(f)) => read(id, f, *offset, *len, out),
                _ => encode(id, handle_op(self, h, body), out),
            },
            Target::BadHandle => encode(id, bad_handle(), out),
        }));
        if served.is_err() {
            warn!("sftp: request {id} failed: it panicked");
            out.truncate(start);
            encode(id, status(StatusCode::FAILURE, "internal error"), out);
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::Receiver<Bytes>) -> io::Result<()> {
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(frame) = rx.recv().await {
        wr.write_all(&frame).await?;
        while let Ok(frame) = rx.try_recv() {
            wr.write_all(&frame).await?;
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

/// Reads more of the stream into `buf`; `false` at a clean end of stream.
async fn fill<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> Result<bool, SessionError> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    if rd.read_buf(buf).await.map_err(SessionError::Read)? == 0 {
        return if buf.is_empty() { Ok(false) } else { Err(SessionError::TruncatedStream) };
    }
    Ok(true)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    conn: &Arc<Conn>,
    in_flight: usize,
) -> Result<(), SessionError> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let first = loop {
        if let Some(frame) = take_frame(&mut buf, MAX_PACKET)? {
            break frame;
        }
        if !fill(&mut rd, &mut buf).await? {
            return Ok(());
        }
    };
    let init = Init::decode(first)?;
    debug!(version = init.version, "sftp: client hello");
    let mut hello = BytesMut::new();
    Version::devmount().encode(&mut hello);
    if conn.replies.send(hello.freeze()).await.is_err() {
        return Ok(());
    }
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut order = InFlight::default();
    // Quick requests from the packets buffered so far whose turn has come; handed to the
    // workers together before the reader waits for anything.
    let mut ready = Vec::new();
    let flush = |ready: &mut Vec<Job>| {
        if !ready.is_empty() {
            conn.run_quick(ready.drain(..));
        }
    };
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                flush(&mut ready);
                permits.clone().acquire_owned().await.expect("the semaphore is never closed")
            }
        };
        let frame = loop {
            if let Some(frame) = take_frame(&mut buf, MAX_PACKET)? {
                break frame;
            }
            flush(&mut ready);
            if !fill(&mut rd, &mut buf).await? {
                return Ok(());
            }
        };
        let req = Request::decode(frame)?;
        dispatch(conn, &mut order, req, permit, &mut ready);
    }
}

/// What a request works through.
enum Target {
    Paths,
    Handle(Arc<Handle>),
    /// A handle that is not open (or never was): answered at once, ordered after nothing.
    BadHandle,
}

/// Starts serving one request. Runs on the reader, in arrival order: that is where a
/// request takes its place in the order. A quick request whose turn has come joins `ready`.
fn dispatch(
    conn: &Arc<Conn>,
    order: &mut InFlight,
    req: Request,
    permit: OwnedSemaphorePermit,
    ready: &mut Vec<Job>,
) {
    let Request { id, body } = req;
    let target = match handle_of(&body) {
        None => Target::Paths,
        Some((handle, close)) => {
            let found = if close { conn.handles.remove(handle) } else { conn.handles.get(handle) };
            found.map_or(Target::BadHandle, Target::Handle)
        }
    };
    let scope = match &target {
        Target::Handle(h) => Some(&h.scope),
        Target::Paths | Target::BadHandle => None,
    };
    let turn = order.admit(Access::of(&body, &conn.keys, scope));
    let how = Run::of(&body, &target);
    let work = Work { id, body, target };
    match turn.try_start() {
        Ok(done) => {
            let job = Job { work, hold: Hold { _done: done, _permit: permit } };
            match how {
                Run::Quick => ready.push(job),
                how => conn.run(how, job),
            }
        }
        Err(turn) => {
            let conn = conn.clone();
            tokio::spawn(async move {
                let done = turn.wait().await;
                conn.run(how, Job { work, hold: Hold { _done: done, _permit: permit } });
            });
        }
    }
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// On the connection's quick workers, in batches: requests that only read metadata,
    /// never wait on another party (the other end of a FIFO, a lock) and take no time in
    /// proportion to file data or to a whole tree.
    Quick,
    /// On a blocking thread of its own.
    Alone,
    /// On the runtime, waiting for the change tracker ([`Conn::run_barrier`]).
    Barrier,
}

impl Run {
    fn of(body: &RequestBody, target: &Target) -> Run {
        match body {
            RequestBody::DevBarrier => Run::Barrier,
            _ if is_quick(body, target) => Run::Quick,
            _ => Run::Alone,
        }
    }
}

/// Whether a request runs on the quick workers; see [`Run::Quick`].
fn is_quick(body: &RequestBody, target: &Target) -> bool {
    use RequestBody::*;
    let handle = match target {
        Target::BadHandle => return true,
        Target::Handle(h) => Some(h),
        Target::Paths => None,
    };
    match body {
        Lstat { .. }
        | Stat { .. }
        | Realpath { .. }
        | ExpandPath { .. }
        | Readlink { .. }
        | Statvfs { .. }
        | Limits
        | Opendir { .. }
        | DevStat { .. }
        | DevWalk { .. }
        | Extended { .. }
        | Fstat { .. }
        | Fstatvfs { .. }
        | DevFstat { .. }
        | Readdir { .. } => true,
        // Closing a file opened for writing may write it back (network file systems do);
        // anything else only lets go of a descriptor and memory.
        Close { .. } => !handle.is_some_and(|h| h.scope.writes && matches!(h.object, Object::File(_))),
        _ => false,
    }
}

/// A READ, served straight into its reply frame.
fn read(id: u32, file: &File, offset: u64, len: u32, out: &mut BytesMut) {
    let len = len.min(MAX_DATA) as usize;
    let start = Response::begin_data(out, id);
    match ops::read_into(file.fd.as_fd(), offset, len, out) {
        Ok(0) => {
            out.truncate(start);
            encode(id, status(StatusCode::EOF, "End of file"), out);
        }
        Ok(_) => Response::end_data(out, start),
        Err(e) => {
            out.truncate(start);
            encode(id, io_status(&e), out);
        }
    }
}

fn encode(id: u32, body: ResponseBody, out: &mut BytesMut) {
    Response { id, body }.encode(out);
}

/// The handle a request works on, and whether it closes it.
fn handle_of(body: &RequestBody) -> Option<(&[u8], bool)> {
    use RequestBody::*;
    match body {
        Close { handle } => Some((handle, true)),
        Read { handle, .. }
        | Write { handle, .. }
        | Fstat { handle }
        | Fsetstat { handle, .. }
        | Readdir { handle }
        | Fstatvfs { handle }
        | Fsync { handle }
        | DevFstat { handle }
        | DevWalkRead { handle }
        | DevWrite { handle, .. } => Some((handle, false)),
        _ => None,
    }
}

fn status(code: StatusCode, message: &str) -> ResponseBody {
    ResponseBody::Status(Status::new(code, message))
}

fn ok() -> ResponseBody {
    ResponseBody::Status(Status::ok())
}

fn bad_handle() -> ResponseBody {
    ResponseBody::Status(Status::from_io(&io::Error::from_raw_os_error(libc::EBADF)))
}

fn too_many_handles() -> ResponseBody {
    status(StatusCode::FAILURE, "too many open handles")
}

fn io_status(e: &io::Error) -> ResponseBody {
    debug!("sftp: {e}");
    ResponseBody::Status(Status::from_io(e))
}

fn op_status(e: &OpError) -> ResponseBody {
    match e {
        OpError::Io(e) => io_status(e),
        OpError::Changed => status(StatusCode::CHANGED, "file changed"),
        OpError::TooLarge { max } => status(StatusCode::TOO_LARGE, &format!("file larger than {max} bytes")),
        OpError::Unsupported(what) => status(StatusCode::OP_UNSUPPORTED, what),
    }
}

/// A reply from a result: `f` builds the success.
fn reply<T, E>(r: Result<T, E>, f: impl FnOnce(T) -> ResponseBody) -> ResponseBody
where
    E: Into<OpError>,
{
    match r {
        Ok(v) => f(v),
        Err(e) => op_status(&e.into()),
    }
}

fn done<E: Into<OpError>>(r: Result<(), E>) -> ResponseBody {
    reply(r, |()| ok())
}

/// SFTP v3 attributes as a set request: whole-second times.
fn set_attrs(a: &Attrs) -> SetAttrs {
    let at = |sec: u32| TimeSet::At(Timespec { sec: i64::from(sec), nsec: 0 });
    SetAttrs {
        mode: a.permissions,
        uid: a.uid_gid.map(|(u, _)| u),
        gid: a.uid_gid.map(|(_, g)| g),
        size: a.size,
        atime: a.atime_mtime.map_or(TimeSet::Omit, |(t, _)| at(t)),
        mtime: a.atime_mtime.map_or(TimeSet::Omit, |(_, t)| at(t)),
    }
}

/// A NAME reply of one path, as OpenSSH sends REALPATH and READLINK (the long name is the name).
fn one_name(name: &[u8]) -> ResponseBody {
    let name = Bytes::copy_from_slice(name);
    ResponseBody::Name(vec![NameEntry { filename: name.clone(), longname: name, attrs: Attrs::default() }])
}

/// Opens a handle on `object`, which the request opened by `path`.
fn new_handle(
    conn: &Conn,
    object: Object,
    path: Option<Key>,
    writes: bool,
    shared_reads: bool,
) -> ResponseBody {
    match conn.handles.insert(object, path, writes, shared_reads) {
        Some(h) => ResponseBody::Handle(h),
        None => too_many_handles(),
    }
}

/// Requests that name paths (the reader sends requests on handles to [`handle_op`]).
fn path_op(conn: &Conn, body: RequestBody) -> ResponseBody {
    use RequestBody::*;
    let fs = &conn.fs;
    match body {
        Open { filename, pflags, attrs } => {
            if conn.handles.is_full() {
                return too_many_handles();
            }
            reply(fs.open(&filename, pflags, attrs.permissions), |f| {
                // The data of a FIFO, socket or device does not live at its path: its handle
                // is ordered by itself only (see [`super::order`]). Only a regular file's
                // reads may share the handle.
                let kind = ops::fstat(f.fd.as_fd()).map_or(0, |st| st.mode & libc::S_IFMT);
                let special = !matches!(kind, libc::S_IFREG | libc::S_IFDIR);
                let path = if special { None } else { conn.keys.key(&filename) };
                let writes = pflags & open_flags::WRITE != 0;
                new_handle(conn, Object::File(f), path, writes, kind == libc::S_IFREG)
            })
        }
        Opendir { path } => {
            if conn.handles.is_full() {
                return too_many_handles();
            }
            reply(fs.opendir(&path), |d| {
                new_handle(conn, Object::Dir(Mutex::new(d)), conn.keys.key(&path), false, false)
            })
        }
        DevWalk { path, max_entries, max_depth } => {
            if conn.handles.is_full() {
                return too_many_handles();
            }
            let max_entries = match max_entries as usize {
                0 => WALK_BATCH_DEFAULT,
                n => n.min(WALK_BATCH_MAX),
            };
            reply(fs.walk(&path, max_depth), |walk| {
                let walk = Object::Walk { walk: Mutex::new(walk), max_entries };
                new_handle(conn, walk, conn.keys.key(&path), false, false)
            })
        }
        DevList { path, max_entries } => {
            let max_entries = match max_entries as usize {
                0 => WALK_BATCH_MAX,
                n => n.min(WALK_BATCH_MAX),
            };
            reply(fs.list(&path, max_entries), ResponseBody::List)
        }
        Lstat { path } => reply(fs.stat(&path, false), |st| ResponseBody::Attrs(Attrs::from_stat(&st))),
        Stat { path } => reply(fs.stat(&path, true), |st| ResponseBody::Attrs(Attrs::from_stat(&st))),
        Setstat { path, attrs } => done(fs.setstat(&path, &set_attrs(&attrs), true)),
        Lsetstat { path, attrs } => done(fs.setstat(&path, &set_attrs(&attrs), false)),
        Remove { filename } => done(fs.remove(&filename)),
        Mkdir { path, attrs } => done(fs.mkdir(&path, attrs.permissions)),
        Rmdir { path } => done(fs.rmdir(&path)),
        Realpath { path } => reply(fs.realpath(&path), |p| one_name(p.as_os_str().as_bytes())),
        ExpandPath { path } => reply(fs.expand_path(&path), |p| one_name(p.as_os_str().as_bytes())),
        Rename { oldpath, newpath } => done(fs.rename_noreplace(&oldpath, &newpath)),
        PosixRename { oldpath, newpath } => done(fs.rename(&oldpath, &newpath, 0, None)),
        Readlink { path } => reply(fs.readlink(&path), |t| one_name(&t)),
        Symlink { linkpath, target } => done(fs.symlink(&linkpath, &target)),
        Hardlink { oldpath, newpath } => done(fs.hardlink(&oldpath, &newpath)),
        Statvfs { path } => reply(fs.statvfs(&path), ResponseBody::StatVfs),
        Limits => ResponseBody::Limits(sftp::Limits {
            max_packet_len: MAX_PACKET as u64,
            max_read_len: u64::from(MAX_DATA),
            max_write_len: u64::from(MAX_DATA),
            max_open_handles: conn.max_handles as u64,
        }),
        DevStat { path, follow } => reply(fs.seq_stat(&path, follow), ResponseBody::SeqStat),
        DevSetstat { path, follow, attrs } => done(fs.setstat(&path, &attrs, follow)),
        DevRename { oldpath, newpath, flags, condition } => {
            done(fs.rename(&oldpath, &newpath, flags, condition.as_ref()))
        }
        DevMknod { path, mode, rdev } => done(fs.mknod(&path, mode, rdev)),
        DevGet { path, max_size } => reply(fs.get(&path, max_size), ResponseBody::Get),
        DevPut(put) => reply(fs.put(&put), ResponseBody::SeqStat),
        Extended { name, .. } => {
            debug!("sftp: unsupported extension {:?}", String::from_utf8_lossy(&name));
            status(StatusCode::OP_UNSUPPORTED, "unsupported extension")
        }
        // [`Conn::run_barrier`] answers it without a thread; here, on one, it waits alike.
        DevBarrier => ResponseBody::Barrier(tokio::runtime::Handle::current().block_on(fs.barrier())),
        Close { .. }
        | Read { .. }
        | Write { .. }
        | Fstat { .. }
        | Fsetstat { .. }
        | Readdir { .. }
        | Fstatvfs { .. }
        | Fsync { .. }
        | DevFstat { .. }
        | DevWalkRead { .. }
        | DevWrite { .. } => bad_handle(),
    }
}

/// Requests on a handle but READ of a file ([`read`]); runs after every earlier request on the
/// same handle it conflicts with.
fn handle_op(conn: &Conn, handle: Arc<Handle>, body: RequestBody) -> ResponseBody {
    use RequestBody::*;
    let fs = &conn.fs;
    let file = match &handle.object {
        Object::File(f) => Some(f),
        _ => None,
    };
    match (body, file) {
        (Close { .. }, _) => close(handle),
        (Write { offset, data, .. }, Some(f)) => done(fs.write(f, offset, &data)),
        (Fsetstat { attrs, .. }, Some(f)) => done(fs.fsetstat(f.fd.as_fd(), &f.abs, &set_attrs(&attrs))),
        (Fsync { .. }, Some(f)) => done(ops::fsync(f.fd.as_fd())),
        (DevWrite { offset, condition, data, .. }, Some(f)) => {
            done(fs.write_if(f, offset, &condition, &data))
        }
        (Fstat { .. }, _) => {
            with_fd(&handle, |fd| reply(ops::fstat(fd), |st| ResponseBody::Attrs(Attrs::from_stat(&st))))
        }
        (DevFstat { .. }, _) => with_fd(&handle, |fd| {
            let seq = fs.sequence();
            reply(ops::fstat(fd), |stat| ResponseBody::SeqStat(SeqStat { seq, stat }))
        }),
        (Fstatvfs { .. }, _) => with_fd(&handle, |fd| reply(ops::fstatvfs(fd), ResponseBody::StatVfs)),
        (Readdir { .. }, None) => readdir(&handle),
        (DevWalkRead { .. }, None) => walk_read(fs, &handle),
        _ => bad_handle(),
    }
}

/// Runs `f` on the descriptor of a file or directory handle.
fn with_fd(handle: &Handle, f: impl FnOnce(BorrowedFd<'_>) -> ResponseBody) -> ResponseBody {
    match &handle.object {
        Object::File(file) => f(file.fd.as_fd()),
        Object::Dir(dir) => f(dir.lock().expect("directory cursor poisoned").fd()),
        Object::Walk { .. } => bad_handle(),
    }
}

fn close(handle: Arc<Handle>) -> ResponseBody {
    // Earlier requests on the handle are done and have let go of it, so this is the last
    // reference: the descriptor is closed here, with its error reported.
    let Ok(handle) = Arc::try_unwrap(handle) else {
        return ok();
    };
    match handle.object {
        Object::File(f) => {
            // SAFETY: the descriptor is owned and closed exactly once, here.
            let r = unsafe { libc::close(f.fd.into_raw_fd()) };
            if r < 0 {
                io_status(&io::Error::last_os_error())
            } else {
                ok()
            }
        }
        Object::Dir(_) | Object::Walk { .. } => ok(),
    }
}

fn readdir(handle: &Handle) -> ResponseBody {
    let Object::Dir(dir) = &handle.object else {
        return bad_handle();
    };
    let mut dir = dir.lock().expect("directory cursor poisoned");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    reply(dir.next_batch(READDIR_BATCH), |entries| {
        if entries.is_empty() {
            return status(StatusCode::EOF, "End of file");
        }
        let names = entries
            .into_iter()
            .map(|(name, st)| NameEntry {
                longname: ops::longname(name.as_bytes(), &st, now).into(),
                filename: Bytes::from(name.into_bytes()),
                attrs: Attrs::from_stat(&st),
            })
            .collect();
        ResponseBody::Name(names)
    })
}

fn walk_read(fs: &Fs, handle: &Handle) -> ResponseBody {
    let Object::Walk { walk, max_entries } = &handle.object else {
        return bad_handle();
    };
    let mut walk = walk.lock().expect("walk cursor poisoned");
    reply(walk.next_batch(*max_entries, fs.sequence()), |batch| {
        if batch.entries.is_empty() {
            status(StatusCode::EOF, "End of file")
        } else {
            ResponseBody::Walk(batch)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::{symlink, MetadataExt};
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;
    use crate::proto::sftp::{ext, open_flags, rename_flags, Condition, Put, ReplyKind};

    const DEADLINE: Duration = Duration::from_secs(20);

    /// A change tracker that counts and records.
    #[derive(Default)]
    struct Recorder {
        seq: AtomicU64,
        own: std::sync::Mutex<Vec<(u64, PathBuf)>>,
        done: std::sync::Mutex<Vec<(u64, PathBuf)>>,
    }

    impl ChangeTracker for Recorder {
        fn sequence(&self) -> u64 {
            self.seq.load(Ordering::SeqCst)
        }
        fn own_change(&self, conn: u64, abs_path: &Path) {
            self.own.lock().unwrap().push((conn, abs_path.to_path_buf()));
        }
        fn own_done(&self, conn: u64, abs_path: &Path) {
            self.done.lock().unwrap().push((conn, abs_path.to_path_buf()));
        }
    }

    /// The client side of a test, speaking raw codec frames so it controls exactly what is
    /// sent and when.
    struct Peer {
        rd: ReadHalf<DuplexStream>,
        wr: WriteHalf<DuplexStream>,
        buf: BytesMut,
        next: u32,
        kinds: HashMap<u32, ReplyKind>,
        version: Version,
        session: JoinHandle<anyhow::Result<()>>,
    }

    fn context(root: &Path, limits: Limits, changes: Arc<dyn ChangeTracker>) -> Arc<SftpContext> {
        Arc::new(SftpContext { root: root.canonicalize().unwrap(), conn: 7, changes, limits })
    }

    async fn start(root: &Path) -> Peer {
        start_with(context(root, Limits::default(), Arc::new(()))).await
    }

    async fn start_with(ctx: Arc<SftpContext>) -> Peer {
        let (ours, theirs) = tokio::io::duplex(4 << 20);
        let session = tokio::spawn(serve(theirs, ctx));
        let (rd, mut wr) = tokio::io::split(ours);
        let mut out = BytesMut::new();
        Init { version: 3, extensions: Vec::new() }.encode(&mut out);
        wr.write_all(&out).await.unwrap();
        let mut peer = Peer {
            rd,
            wr,
            buf: BytesMut::new(),
            next: 1,
            kinds: HashMap::new(),
            version: Version { version: 0, extensions: Vec::new() },
            session,
        };
        peer.version = Version::decode(peer.frame().await.expect("a VERSION")).unwrap();
        peer
    }

    impl Peer {
        /// The next frame, `None` at end of stream.
        async fn frame(&mut self) -> Option<Bytes> {
            timeout(DEADLINE, async {
                loop {
                    if let Some(f) = take_frame(&mut self.buf, MAX_PACKET).unwrap() {
                        return Some(f);
                    }
                    if self.rd.read_buf(&mut self.buf).await.unwrap() == 0 {
                        return None;
                    }
                }
            })
            .await
            .expect("the server answers within the deadline")
        }

        async fn send(&mut self, body: RequestBody) -> u32 {
            let id = self.next;
            self.next += 1;
            self.kinds.insert(id, body.reply_kind());
            let mut out = BytesMut::new();
            Request { id, body }.encode(&mut out);
            self.wr.write_all(&out).await.unwrap();
            id
        }

        async fn recv(&mut self) -> Response {
            let frame = self.frame().await.expect("a response");
            let kinds = &self.kinds;
            Response::decode(frame, |id| kinds[&id]).unwrap()
        }

        async fn call(&mut self, body: RequestBody) -> ResponseBody {
            let id = self.send(body).await;
            let r = self.recv().await;
            assert_eq!(r.id, id);
            r.body
        }

        async fn handle(&mut self, body: RequestBody) -> Bytes {
            match self.call(body).await {
                ResponseBody::Handle(h) => h,
                other => panic!("expected a handle, got {other:?}"),
            }
        }

        /// The paths of a whole `walk@devmount`, in the order received; closes the handle.
        async fn walk(&mut self, path: &[u8], max_entries: u32, max_depth: u32) -> Vec<Bytes> {
            let walk = self.handle(RequestBody::DevWalk { path: b(path), max_entries, max_depth }).await;
            let mut paths = Vec::new();
            loop {
                let ResponseBody::Walk(batch) =
                    self.call(RequestBody::DevWalkRead { handle: walk.clone() }).await
                else {
                    panic!("a batch comes before the end")
                };
                assert!(!batch.entries.is_empty() && batch.entries.len() <= max_entries as usize);
                paths.extend(batch.entries.into_iter().map(|e| e.path));
                if batch.eof {
                    break;
                }
            }
            // After the batch that said so, the walk is over.
            let end = self.call(RequestBody::DevWalkRead { handle: walk.clone() }).await;
            assert_eq!(code(&end).0, StatusCode::EOF);
            is_ok(&self.call(RequestBody::Close { handle: walk }).await);
            paths
        }

        async fn open(&mut self, path: &[u8], pflags: u32, perm: Option<u32>) -> Bytes {
            let attrs = Attrs { permissions: perm, ..Attrs::default() };
            self.handle(RequestBody::Open { filename: b(path), pflags, attrs }).await
        }
    }

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    fn code(body: &ResponseBody) -> (StatusCode, String) {
        match body {
            ResponseBody::Status(s) => (s.code, String::from_utf8_lossy(&s.message).into_owned()),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    fn is_ok(body: &ResponseBody) {
        assert_eq!(code(body).0, StatusCode::OK, "{body:?}");
    }

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        (tmp, root)
    }

    fn abs(root: &Path, rel: &str) -> Bytes {
        b(root.join(rel).as_os_str().as_bytes())
    }

    #[tokio::test]
    async fn hello_lists_the_extensions() {
        let (_t, root) = tree();
        let peer = start(&root).await;
        assert_eq!(peer.version.version, 3);
        assert!(peer.version.extension(ext::POSIX_RENAME).is_some());
        assert!(peer.version.extension(ext::WALK).is_some());
        assert_eq!(
            peer.version.extension(ext::VERSION).unwrap().as_ref(),
            crate::proto::SERVER_VERSION.as_bytes()
        );
    }

    #[tokio::test]
    async fn paths_are_confined_to_the_root() {
        let (_t, root) = tree();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"inside").unwrap();
        symlink("/etc", root.join("etc")).unwrap();
        symlink(root.join("d"), root.join("abs")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let mut peer = start(&root).await;
        let realpath = |p: &[u8]| RequestBody::Realpath { path: b(p) };
        let rootname = |body: ResponseBody| match body {
            ResponseBody::Name(n) => n[0].filename.clone(),
            other => panic!("{other:?}"),
        };
        let root_bytes = b(root.as_os_str().as_bytes());
        assert_eq!(rootname(peer.call(realpath(b".")).await), root_bytes);
        assert_eq!(rootname(peer.call(realpath(b"..")).await), root_bytes);
        assert_eq!(code(&peer.call(realpath(b"/")).await).0, StatusCode::NO_SUCH_FILE);
        let stat = |p: Bytes| RequestBody::Stat { path: p };
        let lstat = |p: Bytes| RequestBody::Lstat { path: p };
        // `..` stops at the root: these name <root>/bin/sh and <root>/d/f ...
        assert_eq!(code(&peer.call(stat(b(b"../../bin/sh"))).await).0, StatusCode::NO_SUCH_FILE);
        assert!(matches!(peer.call(stat(b(b"../../d/f"))).await, ResponseBody::Attrs(_)));
        // ... and <root>/etc is the symlink to /etc, refused when followed.
        assert_eq!(code(&peer.call(stat(b(b"../../etc/passwd"))).await).0, StatusCode::PERMISSION_DENIED);
        assert_eq!(code(&peer.call(stat(b(b"/etc/passwd"))).await).0, StatusCode::NO_SUCH_FILE);
        assert_eq!(code(&peer.call(stat(b(b"etc/passwd"))).await).0, StatusCode::PERMISSION_DENIED);
        assert_eq!(code(&peer.call(stat(b(b"etc"))).await).0, StatusCode::PERMISSION_DENIED);
        match peer.call(lstat(b(b"etc"))).await {
            ResponseBody::Attrs(a) => {
                assert_eq!(a.permissions.unwrap() & libc::S_IFMT, libc::S_IFLNK)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rootname(peer.call(RequestBody::Readlink { path: b(b"etc") }).await).as_ref(), b"/etc");
        let h = peer.open(&abs(&root, "abs/f"), open_flags::READ, None).await;
        match peer.call(RequestBody::Read { handle: h, offset: 0, len: 100 }).await {
            ResponseBody::Data(d) => assert_eq!(d.as_ref(), b"inside"),
            other => panic!("{other:?}"),
        }
        let (c, msg) = code(&peer.call(stat(b(b"loop"))).await);
        assert_eq!((c, msg.as_str()), (StatusCode::FAILURE, nix::errno::Errno::ELOOP.desc()));
        // Removing a symlink to the outside removes the link, not its target.
        is_ok(&peer.call(RequestBody::Remove { filename: b(b"etc") }).await);
        assert!(Path::new("/etc/passwd").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_request_does_not_hold_up_others() {
        let (_t, root) = tree();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        let mut peer = start(&root).await;
        // Opening a fifo for reading blocks until a writer comes.
        let open = peer
            .send(RequestBody::Open {
                filename: b(b"fifo"),
                pflags: open_flags::READ,
                attrs: Attrs::default(),
            })
            .await;
        let stat = peer.send(RequestBody::Stat { path: b(b"f") }).await;
        assert_eq!(peer.recv().await.id, stat);
        let fifo = root.join("fifo");
        let writer =
            tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo).unwrap());
        let r = peer.recv().await;
        assert_eq!(r.id, open);
        let ResponseBody::Handle(h) = r.body else { panic!("{r:?}") };
        let mut writer = writer.await.unwrap();
        // A read of the fifo blocks until data comes; a stat still answers.
        let read = peer.send(RequestBody::Read { handle: h, offset: 0, len: 1 << 20 }).await;
        let stat = peer.send(RequestBody::Lstat { path: b(b"f") }).await;
        assert_eq!(peer.recv().await.id, stat);
        std::io::Write::write_all(&mut writer, b"late").unwrap();
        let r = peer.recv().await;
        assert_eq!((r.id, r.body), (read, ResponseBody::Data(b(b"late"))));
    }

    /// Sends every request before reading any reply, and returns the replies by id.
    async fn pipelined(peer: &mut Peer, requests: Vec<RequestBody>) -> Vec<ResponseBody> {
        let mut ids = Vec::new();
        for body in requests {
            ids.push(peer.send(body).await);
        }
        let mut replies = HashMap::new();
        for _ in 0..ids.len() {
            let r = peer.recv().await;
            replies.insert(r.id, r.body);
        }
        ids.iter().map(|id| replies.remove(id).expect("one reply per request")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dependent_requests_run_in_arrival_order() {
        let (_t, root) = tree();
        let mut peer = start(&root).await;
        let create = |filename: Bytes| RequestBody::Open {
            filename,
            pflags: open_flags::WRITE | open_flags::CREAT | open_flags::TRUNC,
            attrs: Attrs::default(),
        };
        // sshfs creates a file with OPEN and LSTATs it right away, without waiting.
        let mut requests = Vec::new();
        for i in 0..200 {
            requests.push(create(b(format!("f{i}").as_bytes())));
            requests.push(RequestBody::Lstat { path: b(format!("f{i}").as_bytes()) });
        }
        for (i, r) in pipelined(&mut peer, requests).await.iter().enumerate() {
            match (i % 2, r) {
                (0, ResponseBody::Handle(_)) | (1, ResponseBody::Attrs(_)) => {}
                _ => panic!("request {i}: {r:?}"),
            }
        }
        // A directory, then a file in it.
        let mut requests = Vec::new();
        for i in 0..200 {
            let attrs = Attrs::default();
            requests.push(RequestBody::Mkdir { path: b(format!("d{i}").as_bytes()), attrs });
            requests.push(create(abs(&root, &format!("d{i}/f"))));
        }
        for (i, r) in pipelined(&mut peer, requests).await.iter().enumerate() {
            match (i % 2, r) {
                (1, ResponseBody::Handle(_)) => {}
                (0, r) => is_ok(r),
                _ => panic!("request {i}: {r:?}"),
            }
        }
        // A write through a handle, then a stat of the path it was opened by.
        let h = peer.open(b"./d0/../w", open_flags::WRITE | open_flags::CREAT, None).await;
        let mut requests = Vec::new();
        for i in 0..200u64 {
            let data = Bytes::from(vec![b'x'; 1000]);
            requests.push(RequestBody::Write { handle: h.clone(), offset: i * 1000, data });
            requests.push(RequestBody::Stat { path: b(b"w") });
        }
        for (i, r) in pipelined(&mut peer, requests).await.iter().enumerate() {
            match r {
                ResponseBody::Attrs(a) => assert_eq!(a.size, Some((i as u64 / 2 + 1) * 1000), "stat {i}"),
                r => is_ok(r),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_fifo_does_not_hold_up_other_reads_of_it() {
        let (_t, root) = tree();
        let fifo = root.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut peer = start(&root).await;
        let open = |pflags| RequestBody::Open { filename: b(b"fifo"), pflags, attrs: Attrs::default() };
        // Opening a fifo for reading blocks until a writer comes; a stat of it is a read too.
        let opening = peer.send(open(open_flags::READ)).await;
        let stat = peer.send(RequestBody::Stat { path: b(b"fifo") }).await;
        assert_eq!(peer.recv().await.id, stat);
        let outside = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo));
        let r = peer.recv().await;
        assert_eq!(r.id, opening);
        let ResponseBody::Handle(rd) = r.body else { panic!("{r:?}") };
        let _outside = outside.await.unwrap().unwrap();
        // A read of the empty fifo blocks; a stat of the fifo still answers, and so does a
        // write through another handle of this session, which the read is waiting for.
        let read = peer.send(RequestBody::Read { handle: rd, offset: 0, len: 1 << 20 }).await;
        let lstat = peer.send(RequestBody::Lstat { path: b(b"fifo") }).await;
        assert_eq!(peer.recv().await.id, lstat);
        let wr = peer.handle(open(open_flags::WRITE)).await;
        let write = peer.send(RequestBody::Write { handle: wr, offset: 0, data: b(b"late") }).await;
        let mut replies = HashMap::new();
        for _ in 0..2 {
            let r = peer.recv().await;
            replies.insert(r.id, r.body);
        }
        is_ok(&replies[&write]);
        assert_eq!(replies[&read], ResponseBody::Data(b(b"late")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_of_a_file_share_its_handle_and_order_against_its_writes() {
        let (_t, root) = tree();
        let old: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 199) as u8).collect();
        std::fs::write(root.join("f"), &old).unwrap();
        let mut peer = start(&root).await;
        let h = peer.open(b"f", open_flags::READ | open_flags::WRITE, None).await;
        let read = |i: u64| RequestBody::Read { handle: h.clone(), offset: i * 4096, len: 4096 };
        let new = Bytes::from(vec![7u8; 64 * 1024]);
        let mut requests: Vec<_> = (0..16).map(read).collect();
        requests.push(RequestBody::Write { handle: h.clone(), offset: 0, data: new.clone() });
        requests.extend((0..16).map(read));
        requests.push(RequestBody::Read { handle: h.clone(), offset: 64 * 1024, len: 10 });
        requests.push(RequestBody::Close { handle: h.clone() });
        requests.push(read(0));
        let replies = pipelined(&mut peer, requests).await;
        for (i, r) in replies[..16].iter().enumerate() {
            assert_eq!(
                *r,
                ResponseBody::Data(b(&old[i * 4096..(i + 1) * 4096])),
                "read {i} before the write"
            );
        }
        is_ok(&replies[16]);
        for (i, r) in replies[17..33].iter().enumerate() {
            assert_eq!(
                *r,
                ResponseBody::Data(new.slice(i * 4096..(i + 1) * 4096)),
                "read {i} after the write"
            );
        }
        assert_eq!(code(&replies[33]).0, StatusCode::EOF);
        is_ok(&replies[34]);
        assert_eq!(code(&replies[35]), (StatusCode::FAILURE, nix::errno::Errno::EBADF.desc().to_owned()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_in_flight_cap_still_serves_every_request() {
        let (_t, root) = tree();
        for i in 0..100 {
            std::fs::write(root.join(format!("f{i}")), vec![0; i]).unwrap();
        }
        let limits = Limits { max_handles: 16, max_in_flight: 3 };
        let mut peer = start_with(context(&root, limits, Arc::new(()))).await;
        // Quick requests, and quick ones that wait for a mutation before them.
        let mut requests = Vec::new();
        for i in 0..100 {
            requests.push(RequestBody::Lstat { path: b(format!("f{i}").as_bytes()) });
            if i % 10 == 0 {
                let path = b(format!("d{i}").as_bytes());
                requests.push(RequestBody::Mkdir { path: path.clone(), attrs: Attrs::default() });
                requests.push(RequestBody::Stat { path });
            }
        }
        let replies = pipelined(&mut peer, requests.clone()).await;
        for (req, r) in requests.iter().zip(&replies) {
            match (req, r) {
                (RequestBody::Lstat { path }, ResponseBody::Attrs(a)) => {
                    let i: u64 = std::str::from_utf8(&path[1..]).unwrap().parse().unwrap();
                    assert_eq!(a.size, Some(i));
                }
                (RequestBody::Mkdir { .. }, r) => is_ok(r),
                (RequestBody::Stat { .. }, ResponseBody::Attrs(a)) => {
                    assert_eq!(a.permissions.unwrap() & libc::S_IFMT, libc::S_IFDIR)
                }
                (req, r) => panic!("{req:?}: {r:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_sent_before_the_end_of_the_stream_are_all_answered() {
        let (_t, root) = tree();
        let mut peer = start(&root).await;
        let pflags = open_flags::WRITE | open_flags::CREAT;
        let mut ids = Vec::new();
        for i in 0..20 {
            let path = b(format!("f{i}").as_bytes());
            let open = RequestBody::Open { filename: path.clone(), pflags, attrs: Attrs::default() };
            ids.push(peer.send(open).await);
            // Waits for the create, and runs after the stream has ended.
            ids.push(peer.send(RequestBody::Lstat { path }).await);
        }
        peer.wr.shutdown().await.unwrap();
        let mut replies = HashMap::new();
        for _ in 0..ids.len() {
            let r = peer.recv().await;
            replies.insert(r.id, r.body);
        }
        for pair in ids.chunks(2) {
            assert!(matches!(replies[&pair[0]], ResponseBody::Handle(_)), "{:?}", replies[&pair[0]]);
            assert!(matches!(replies[&pair[1]], ResponseBody::Attrs(_)), "{:?}", replies[&pair[1]]);
        }
        assert!(peer.frame().await.is_none(), "the session ends");
        assert!(timeout(DEADLINE, peer.session).await.unwrap().unwrap().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_on_one_handle_keep_their_order() {
        let (_t, root) = tree();
        let mut peer = start(&root).await;
        let h = peer.open(b"f", open_flags::READ | open_flags::WRITE | open_flags::CREAT, None).await;
        let mut ids = Vec::new();
        for i in 0..64u8 {
            let data = Bytes::from(vec![i; 64 * 1024]);
            ids.push(peer.send(RequestBody::Write { handle: h.clone(), offset: 0, data }).await);
        }
        let read = peer.send(RequestBody::Read { handle: h.clone(), offset: 0, len: 64 * 1024 }).await;
        let close = peer.send(RequestBody::Close { handle: h.clone() }).await;
        let after = peer.send(RequestBody::Read { handle: h, offset: 0, len: 1 }).await;
        let mut replies = HashMap::new();
        for _ in 0..ids.len() + 3 {
            let r = peer.recv().await;
            replies.insert(r.id, r.body);
        }
        for id in ids {
            is_ok(&replies[&id]);
        }
        assert_eq!(replies[&read], ResponseBody::Data(Bytes::from(vec![63u8; 64 * 1024])));
        is_ok(&replies[&close]);
        let bad = (StatusCode::FAILURE, nix::errno::Errno::EBADF.desc().to_owned());
        assert_eq!(code(&replies[&after]), bad);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_handles_and_a_cap() {
        let (_t, root) = tree();
        let mut peer = start(&root).await;
        let mut ids = Vec::new();
        for i in 0..1000 {
            let filename = b(format!("f{i}").as_bytes());
            let pflags = open_flags::WRITE | open_flags::CREAT;
            ids.push(peer.send(RequestBody::Open { filename, pflags, attrs: Attrs::default() }).await);
        }
        let mut handles = HashMap::new();
        for _ in 0..ids.len() {
            let r = peer.recv().await;
            let ResponseBody::Handle(h) = r.body else { panic!("{r:?}") };
            handles.insert(r.id, h);
        }
        let distinct: std::collections::HashSet<_> = handles.values().collect();
        assert_eq!(distinct.len(), 1000);
        for (i, id) in ids.iter().enumerate() {
            let data = b(format!("{i}").as_bytes());
            is_ok(&peer.call(RequestBody::Write { handle: handles[id].clone(), offset: 0, data }).await);
        }
        for h in handles.values() {
            is_ok(&peer.call(RequestBody::Close { handle: h.clone() }).await);
        }
        assert_eq!(std::fs::read(root.join("f999")).unwrap(), b"999");

        let limits = Limits { max_handles: 2, max_in_flight: 4 };
        let mut small = start_with(context(&root, limits, Arc::new(()))).await;
        let a = small.open(b"f1", open_flags::READ, None).await;
        small.handle(RequestBody::Opendir { path: b(b".") }).await;
        let third = small.call(RequestBody::Open {
            filename: b(b"f2"),
            pflags: open_flags::READ,
            attrs: Attrs::default(),
        });
        assert_eq!(code(&third.await), (StatusCode::FAILURE, "too many open handles".to_owned()));
        is_ok(&small.call(RequestBody::Close { handle: a }).await);
        small.open(b"f2", open_flags::READ, None).await;
    }

    #[tokio::test]
    async fn names_are_bytes_end_to_end() {
        let (_t, root) = tree();
        let mut peer = start(&root).await;
        let name = b"caf\xe9-\xff";
        let h = peer.open(name, open_flags::WRITE | open_flags::CREAT, Some(0o644)).await;
        is_ok(&peer.call(RequestBody::Write { handle: h.clone(), offset: 0, data: b(b"bytes") }).await);
        is_ok(&peer.call(RequestBody::Close { handle: h }).await);
        assert_eq!(std::fs::read(root.join(std::ffi::OsStr::from_bytes(name))).unwrap(), b"bytes");
        let dir = peer.handle(RequestBody::Opendir { path: abs(&root, "") }).await;
        let mut listed = Vec::new();
        loop {
            match peer.call(RequestBody::Readdir { handle: dir.clone() }).await {
                ResponseBody::Name(entries) => listed.extend(entries),
                end => {
                    assert_eq!(code(&end).0, StatusCode::EOF);
                    break;
                }
            }
        }
        let entry = listed.iter().find(|e| e.filename.as_ref() == name).expect("listed with its bytes");
        assert!(entry.longname.starts_with(b"-rw-r--r--"), "{:?}", entry.longname);
        assert!(entry.longname.ends_with(name));
        let mut names: Vec<_> = listed.iter().map(|e| e.filename.clone()).collect();
        names.sort();
        assert_eq!(names, [b(b"."), b(b".."), b(name)]);
        match peer.call(RequestBody::Stat { path: b(name) }).await {
            ResponseBody::Attrs(a) => assert_eq!(a.size, Some(5)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn modes_errors_and_renames() {
        let (_t, root) = tree();
        // SAFETY: process-wide, but 022 is the usual umask of a test run; what matters is
        // that it is not zero.
        unsafe { libc::umask(0o022) };
        let recorder = Arc::new(Recorder::default());
        let mut peer = start_with(context(&root, Limits::default(), recorder.clone())).await;
        let h = peer.open(b"f", open_flags::WRITE | open_flags::CREAT | open_flags::EXCL, Some(0o666)).await;
        is_ok(&peer.call(RequestBody::Close { handle: h }).await);
        assert_eq!(std::fs::metadata(root.join("f")).unwrap().mode() & 0o7777, 0o666);
        let mkdir = |p: &[u8], perm| RequestBody::Mkdir {
            path: b(p),
            attrs: Attrs { permissions: Some(perm), ..Attrs::default() },
        };
        is_ok(&peer.call(mkdir(b"d", 0o777)).await);
        assert_eq!(std::fs::metadata(root.join("d")).unwrap().mode() & 0o7777, 0o777);
        assert_eq!(
            code(&peer.call(mkdir(b"d", 0o777)).await),
            (StatusCode::FAILURE, "File exists".to_owned())
        );
        std::fs::write(root.join("d/x"), b"").unwrap();
        let rmdir = peer.call(RequestBody::Rmdir { path: b(b"d") }).await;
        assert_eq!(code(&rmdir), (StatusCode::FAILURE, "Directory not empty".to_owned()));
        assert_eq!(
            code(&peer.call(RequestBody::Remove { filename: b(b"nope") }).await).0,
            StatusCode::NO_SUCH_FILE
        );

        let setstat = RequestBody::Setstat {
            path: b(b"f"),
            attrs: Attrs { permissions: Some(0o600), atime_mtime: Some((1, 2)), ..Attrs::default() },
        };
        is_ok(&peer.call(setstat).await);
        let meta = std::fs::metadata(root.join("f")).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o600, 2));

        std::fs::write(root.join("a"), b"a").unwrap();
        std::fs::write(root.join("b"), b"b").unwrap();
        let rename = peer.call(RequestBody::Rename { oldpath: b(b"a"), newpath: b(b"b") }).await;
        assert_eq!(code(&rename), (StatusCode::FAILURE, "File exists".to_owned()));
        let noreplace = RequestBody::DevRename {
            oldpath: b(b"a"),
            newpath: b(b"b"),
            flags: rename_flags::NOREPLACE,
            condition: None,
        };
        assert_eq!(code(&peer.call(noreplace).await), (StatusCode::FAILURE, "File exists".to_owned()));
        let mut done = recorder.done.lock().unwrap().clone();
        let mut own = std::mem::take(&mut *recorder.own.lock().unwrap());
        own.sort();
        done.sort();
        assert_eq!(own, done, "every note is ended, failed mutations' too");
        recorder.done.lock().unwrap().clear();
        is_ok(&peer.call(RequestBody::PosixRename { oldpath: b(b"a"), newpath: abs(&root, "b") }).await);
        assert_eq!(std::fs::read(root.join("b")).unwrap(), b"a");
        let own = recorder.own.lock().unwrap().clone();
        assert_eq!(own, [(7, root.join("a")), (7, root.join("b"))]);
        assert_eq!(*recorder.done.lock().unwrap(), [(7, root.join("a")), (7, root.join("b"))]);
    }

    #[tokio::test]
    async fn devmount_extensions() {
        let (_t, root) = tree();
        let recorder = Arc::new(Recorder::default());
        recorder.seq.store(41, Ordering::SeqCst);
        let mut peer = start_with(context(&root, Limits::default(), recorder.clone())).await;

        let mtime = Timespec { sec: 4_000_000_000, nsec: 7 };
        let put = Put {
            path: b(b"p"),
            excl: false,
            fsync: true,
            mode: 0o640,
            atime: None,
            mtime: Some(mtime),
            condition: None,
            data: b(b"small file"),
        };
        let ResponseBody::SeqStat(put_st) = peer.call(RequestBody::DevPut(put.clone())).await else {
            panic!()
        };
        assert_eq!((put_st.seq, put_st.stat.mode & 0o7777, put_st.stat.mtime), (41, 0o640, mtime));
        // A tracker without a watcher answers barriers at once, with its sequence.
        assert_eq!(peer.call(RequestBody::DevBarrier).await, ResponseBody::Barrier(41));
        let ResponseBody::Get(got) =
            peer.call(RequestBody::DevGet { path: b(b"p"), max_size: 1 << 20 }).await
        else {
            panic!()
        };
        assert_eq!((got.data.as_ref(), got.stat), (&b"small file"[..], put_st.stat));
        let too_large = peer.call(RequestBody::DevGet { path: b(b"p"), max_size: 3 }).await;
        assert_eq!(code(&too_large).0, StatusCode::TOO_LARGE);
        let stale =
            Put { condition: Some(Condition { size: 0, mtime, ino: put_st.stat.ino }), ..put.clone() };
        assert_eq!(code(&peer.call(RequestBody::DevPut(stale)).await).0, StatusCode::CHANGED);

        let ResponseBody::SeqStat(st) = peer.call(RequestBody::DevStat { path: b(b"p"), follow: true }).await
        else {
            panic!()
        };
        let cond = Condition::of(&st.stat);
        let h = peer.open(b"p", open_flags::WRITE, None).await;
        let write = |data: &[u8]| RequestBody::DevWrite {
            handle: h.clone(),
            offset: 0,
            condition: cond,
            data: b(data),
        };
        is_ok(&peer.call(write(b"SMALL FILE + more")).await);
        assert_eq!(code(&peer.call(write(b"again")).await).0, StatusCode::CHANGED);
        assert_eq!(std::fs::read(root.join("p")).unwrap(), b"SMALL FILE + more");

        let set = SetAttrs { mtime: TimeSet::At(Timespec { sec: -1, nsec: 5 }), ..SetAttrs::default() };
        is_ok(&peer.call(RequestBody::DevSetstat { path: b(b"p"), follow: false, attrs: set }).await);
        let ResponseBody::SeqStat(st) = peer.call(RequestBody::DevFstat { handle: h }).await else {
            panic!()
        };
        assert_eq!(st.stat.mtime, Timespec { sec: -1, nsec: 5 });

        let mknod = RequestBody::DevMknod { path: b(b"fifo"), mode: libc::S_IFIFO | 0o606, rdev: 0 };
        is_ok(&peer.call(mknod).await);
        let fifo_mode = std::fs::symlink_metadata(root.join("fifo")).unwrap().mode();
        assert_eq!(fifo_mode, libc::S_IFIFO | 0o606);

        std::fs::create_dir_all(root.join("t/u/v")).unwrap();
        for i in 0..300 {
            std::fs::write(root.join(format!("t/u/v/{i}")), b"").unwrap();
        }
        symlink("u", root.join("t/link")).unwrap();
        let paths = peer.walk(b"t", 100, 0).await;
        // t itself, u, u/v, the files, link.
        assert_eq!(paths.len(), 3 + 300 + 1);
        assert!(paths.contains(&b(b"u/v/299")) && paths.contains(&b(b"link")) && paths.contains(&b(b"")));
        // t and its children; u is listed, not descended.
        let mut one = peer.walk(b"t", 100, 1).await;
        one.sort();
        assert_eq!(one, [b(b""), b(b"link"), b(b"u")]);
        let mut two = peer.walk(b"t", 100, 2).await;
        two.sort();
        assert_eq!(two, [b(b""), b(b"link"), b(b"u"), b(b"u/v")]);

        recorder.seq.store(43, Ordering::SeqCst);
        let list = |path: &[u8], max_entries| RequestBody::DevList { path: b(path), max_entries };
        let ResponseBody::List(t) = peer.call(list(b"t", 0)).await else { panic!() };
        let mut names: Vec<_> = t.entries.iter().map(|e| (e.path.clone(), e.target.clone())).collect();
        names.sort();
        assert_eq!(names, [(b(b"link"), b(b"u")), (b(b"u"), Bytes::new())]);
        assert!(t.complete && t.stat.is_dir() && t.seq == 43);
        assert_eq!(t.stat.ino, std::fs::metadata(root.join("t")).unwrap().ino());
        let ResponseBody::List(v) = peer.call(list(b"t/u/v", 120)).await else { panic!() };
        assert!(!v.complete && v.entries.len() == 120);
        let ResponseBody::List(v) = peer.call(list(b"t/u/v", 0)).await else { panic!() };
        assert!(v.complete && v.entries.len() == 300);
        assert_eq!(code(&peer.call(list(b"t/nope", 0)).await).0, StatusCode::NO_SUCH_FILE);
        assert_eq!(code(&peer.call(list(b"../../etc", 0)).await).0, StatusCode::NO_SUCH_FILE);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_malformed_packet_ends_only_its_own_session() {
        let (_t, root) = tree();
        std::fs::write(root.join("f"), b"x").unwrap();
        let mut good = start(&root).await;
        let garbage: [&[u8]; 3] = [
            // unknown type
            &[0, 0, 0, 5, 99, 0, 0, 0, 1],
            // a STAT whose path runs past the end
            &[0, 0, 0, 9, 17, 0, 0, 0, 1, 0, 0, 0, 200],
            // a length over the cap
            &[0x7f, 0xff, 0xff, 0xff],
        ];
        for bad in garbage {
            let mut peer = start(&root).await;
            let stat = peer.call(RequestBody::Stat { path: b(b"f") });
            assert!(matches!(stat.await, ResponseBody::Attrs(_)));
            peer.wr.write_all(bad).await.unwrap();
            assert!(peer.frame().await.is_none(), "the session ends");
            let ended = timeout(DEADLINE, &mut peer.session).await.unwrap().unwrap();
            assert!(ended.is_err());
            assert!(matches!(good.call(RequestBody::Stat { path: b(b"f") }).await, ResponseBody::Attrs(_)));
        }
        good.wr.shutdown().await.unwrap();
        assert!(good.frame().await.is_none());
        assert!(timeout(DEADLINE, good.session).await.unwrap().unwrap().is_ok());
    }
}
