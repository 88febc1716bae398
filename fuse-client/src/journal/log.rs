//! The durable log: segment files and records, recovery, group commit, the size cap,
//! acknowledgements and the rejected folder. See the module documentation of `journal` for the
//! format.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};

use super::index::{DataLoc, Index, PendingSize, Piece};
use super::op::{Op, OpKind};
use super::{DeferredError, Seq};

const MAGIC: &[u8; 8] = b"DMJRNL01";
/// Other versions of the format share this prefix; a journal in one is refused, not truncated.
const MAGIC_FAMILY: &[u8; 6] = b"DMJRNL";
const HEADER: usize = 16;
/// The largest payload a record may have; FUSE writes are at most a few MiB.
const MAX_RECORD: usize = 64 << 20;
const TAG_ACK: u8 = 0x80;
const TAG_SENT: u8 = 0x81;
const SEGMENT_SUFFIX: &str = ".seg";

/// How the journal uses the disk.
#[derive(Debug, Clone)]
pub struct Config {
    /// Appended records are fsynced at most this long after they are written (group commit).
    pub commit_interval: Duration,
    /// Bytes of journal on disk above which appends wait for acknowledgements to free space.
    pub max_bytes: u64,
    /// A new segment file starts once the current one would grow past this.
    pub segment_bytes: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config { commit_interval: Duration::from_millis(100), max_bytes: 1 << 30, segment_bytes: 64 << 20 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the journal in {} is in use by another devmount process", .0.display())]
    InUse(PathBuf),
    #[error("the journal in {} belongs to {found:?}, not {expected:?}", .dir.display())]
    OtherTarget { dir: PathBuf, found: String, expected: String },
    #[error("{} was written by another version of devmount", .0.display())]
    UnknownFormat(PathBuf),
    #[error("an operation of {0} bytes is larger than a journal record may be")]
    TooLarge(usize),
    #[error("journal record {seq} in {} is damaged: {why}", .path.display())]
    Damaged { seq: Seq, path: PathBuf, why: String },
    #[error("operation {0} is not pending in the journal")]
    NotPending(Seq),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { what, path: path.to_path_buf(), source }
}

/// What a journal held when it was opened: the operations a previous run appended and the server
/// never acknowledged, to be replayed.
#[derive(Debug, Default)]
pub struct Recovered {
    /// In journal order.
    pub ops: Vec<RecoveredOp>,
    /// The file data those operations carry.
    pub data_bytes: u64,
    /// Bytes of a torn or damaged tail that were cut off.
    pub torn_bytes: u64,
    /// Segment files that followed a damaged one: moved into the rejected folder, not replayed.
    pub set_aside: Vec<PathBuf>,
}

/// One pending operation found on open: a summary (its data stays on disk; read it with
/// [`Journal::read_op`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredOp {
    pub seq: Seq,
    pub kind: OpKind,
    pub path: Bytes,
    pub data_len: u64,
}

/// The journal's view of part of a dirty file: see [`Journal::overlay`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// Sorted, non-overlapping: bytes of pending writes, or zeros of a pending truncation. The
    /// gaps between them are the server's bytes; a short read from the server within `size` is
    /// zeros.
    pub pieces: Vec<(Range<u64>, Bytes)>,
    /// The size the file will have, if the journal has pending content changes for it.
    pub size: Option<PendingSize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub pending_ops: usize,
    /// Bytes of records of pending operations.
    pub pending_bytes: u64,
    /// Bytes of segment files on disk (what the cap limits).
    pub disk_bytes: u64,
    pub segments: usize,
    /// Appends waiting for space ([`Journal::append`] only).
    pub waiting: usize,
    pub last_seq: Seq,
    /// Group commits and syncs that reached the disk.
    pub fsyncs: u64,
}

struct Segment {
    id: u64,
    file: Arc<File>,
    len: u64,
    /// Pending operations recorded in this segment; at 0 (and with no older segment left) it
    /// is deleted.
    live: u64,
}

struct PendingRec {
    seg: u64,
    /// Where the record starts.
    off: u64,
    len: u64,
}

struct State {
    /// Oldest first; the last one is being appended to.
    segs: VecDeque<Segment>,
    next_seq: Seq,
    pending: BTreeMap<Seq, PendingRec>,
    pending_bytes: u64,
    disk_bytes: u64,
    index: Index,
    sent_mark: Seq,
    /// Counts writes to the active segment, so a sync knows what it covered.
    write_gen: u64,
    commit_due: Option<Instant>,
    dir_dirty: bool,
    waiters: usize,
    failed: u64,
    first_failure: Option<DeferredError>,
    closing: bool,
}

impl State {
    fn seg(&self, id: u64) -> Option<&Segment> {
        self.segs.binary_search_by_key(&id, |s| s.id).ok().map(|i| &self.segs[i])
    }

    fn seg_mut(&mut self, id: u64) -> Option<&mut Segment> {
        self.segs.binary_search_by_key(&id, |s| s.id).ok().map(|i| &mut self.segs[i])
    }

    fn active(&mut self) -> &mut Segment {
        self.segs.back_mut().expect("the journal always has an active segment")
    }

    fn first_unresolved(&self) -> Seq {
        self.pending.keys().next().copied().unwrap_or(self.next_seq)
    }
}

struct Inner {
    dir: PathBuf,
    state_dir: PathBuf,
    key: String,
    config: Config,
    /// Ops up to this one may have reached the server before the previous run ended.
    recovered_sent_mark: Seq,
    st: Mutex<State>,
    /// Wakes appenders waiting for space.
    space: Condvar,
    space_async: Notify,
    /// Wakes the group-commit thread.
    commit: Condvar,
    /// Serialises syncs; holds the last `write_gen` known to be on disk.
    synced: Mutex<u64>,
    fsyncs: AtomicU64,
    /// The newest appended sequence number.
    appended: watch::Sender<Seq>,
    /// The first sequence number not yet acknowledged or rejected.
    resolved: watch::Sender<Seq>,
    _lock: Flock<File>,
}

/// Ends the group-commit thread when the last [`Journal`] handle goes (after a final sync).
struct Guard {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.lock().closing = true;
        self.inner.commit.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The durable, ordered log of one target's pending mutations. Cheap to clone; all clones are
/// the same journal.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
    _guard: Arc<Guard>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

/// A record being appended: header space, then the payload; its CRC so far covers the payload.
struct Record {
    buf: BytesMut,
    crc: crc32fast::Hasher,
    data_len: u64,
}

impl Record {
    fn new(op: &Op) -> Result<Record, JournalError> {
        let mut buf = BytesMut::with_capacity(HEADER + 64 + op.data().len());
        buf.put_bytes(0, HEADER);
        op.encode(&mut buf);
        let payload = buf.len() - HEADER;
        if payload > MAX_RECORD {
            return Err(JournalError::TooLarge(payload));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[HEADER..]);
        Ok(Record { buf, crc, data_len: op.data().len() as u64 })
    }

    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn seal(mut self, seq: Seq) -> BytesMut {
        let len = (self.buf.len() - HEADER) as u32;
        seal_header(&mut self.buf[..HEADER], self.crc, seq, len);
        self.buf
    }
}

fn seal_header(header: &mut [u8], mut crc: crc32fast::Hasher, seq: Seq, len: u32) {
    crc.update(&seq.to_be_bytes());
    crc.update(&len.to_be_bytes());
    header[..4].copy_from_slice(&len.to_be_bytes());
    header[4..12].copy_from_slice(&seq.to_be_bytes());
    header[12..16].copy_from_slice(&crc.finalize().to_be_bytes());
}

fn crc_of(payload: &[u8], seq: Seq, len: u32) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(payload);
    crc.update(&seq.to_be_bytes());
    crc.update(&len.to_be_bytes());
    crc.finalize()
}

/// A one-byte record (acknowledgement or sent mark) of `seq`.
fn meta_record(tag: u8, seq: Seq, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER, 0);
    out.push(tag);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[tag]);
    seal_header(&mut out[start..start + HEADER], crc, seq, 1);
}

/// The directory name of a target: readable, filesystem-safe, and unique by a hash of the key.
fn dir_name(key: &str) -> String {
    let readable: String = key
        .bytes()
        .take(48)
        .map(|c| if c.is_ascii_alphanumeric() || c == b'.' || c == b'-' { c as char } else { '_' })
        .collect();
    let hash = Sha256::digest(key.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{readable}-{hex}")
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}{SEGMENT_SUFFIX}"))
}

/// What recovery found in the segment files.
#[derive(Default)]
struct Scan {
    segs: Vec<Segment>,
    ops: Vec<(Seq, PendingRec, Op, u64)>,
    acked: HashSet<Seq>,
    max_seq: Seq,
    sent_mark: Seq,
    torn_bytes: u64,
    damaged: bool,
}

enum SegmentEnd {
    Clean,
    /// The first byte that is not part of a whole, valid record.
    Bad(u64),
}

impl Scan {
    /// Reads one segment's records; stops at the first one that is cut short or invalid.
    fn segment(&mut self, path: &Path, id: u64, file: &File) -> Result<(SegmentEnd, u64), JournalError> {
        let size = file.metadata().map_err(io_err("stat journal segment", path))?.len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        if size < MAGIC.len() as u64 {
            return Ok((SegmentEnd::Bad(0), size));
        }
        r.read_exact(&mut magic).map_err(io_err("read journal segment", path))?;
        if &magic != MAGIC {
            if magic.starts_with(MAGIC_FAMILY) {
                return Err(JournalError::UnknownFormat(path.to_path_buf()));
            }
            return Ok((SegmentEnd::Bad(0), size));
        }
        let mut pos = MAGIC.len() as u64;
        while pos < size {
            if size - pos < HEADER as u64 {
                return Ok((SegmentEnd::Bad(pos), size));
            }
            let mut h = [0u8; HEADER];
            r.read_exact(&mut h).map_err(io_err("read journal segment", path))?;
            let len = u32::from_be_bytes(h[..4].try_into().expect("4 bytes"));
            let seq = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
            let crc = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
            if len == 0 || len as usize > MAX_RECORD || u64::from(len) > size - pos - HEADER as u64 {
                return Ok((SegmentEnd::Bad(pos), size));
            }
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload).map_err(io_err("read journal segment", path))?;
            if crc_of(&payload, seq, len) != crc {
                return Ok((SegmentEnd::Bad(pos), size));
            }
            let rec = PendingRec { seg: id, off: pos, len: HEADER as u64 + u64::from(len) };
            match payload[0] {
                TAG_ACK if len == 1 => {
                    self.acked.insert(seq);
                }
                TAG_SENT if len == 1 => self.sent_mark = self.sent_mark.max(seq),
                tag if OpKind::is_op_tag(tag) => {
                    let payload = Bytes::from(payload);
                    let Ok(op) = Op::decode(payload) else {
                        return Ok((SegmentEnd::Bad(pos), size));
                    };
                    let data_len = op.data().len() as u64;
                    self.ops.push((seq, rec, op.without_data(), data_len));
                }
                _ => return Ok((SegmentEnd::Bad(pos), size)),
            }
            self.max_seq = self.max_seq.max(seq);
            pos += HEADER as u64 + u64::from(len);
        }
        Ok((SegmentEnd::Clean, size))
    }
}

/// Where a write's or put's data starts in the file, given where its record starts.
fn data_loc(op_kind: OpKind, rec: &PendingRec, data_len: u64) -> Option<DataLoc> {
    matches!(op_kind, OpKind::Write | OpKind::Put)
        .then(|| DataLoc { seg: rec.seg, off: rec.off + rec.len - data_len })
}

impl Journal {
    /// Opens (creating it if needed) the journal of `target_key` under `state_dir`, cuts off a
    /// torn tail, and returns the operations a previous run left unacknowledged. Fails if another
    /// process has the same journal open.
    pub fn open(
        state_dir: &Path,
        target_key: &str,
        config: Config,
    ) -> Result<(Journal, Recovered), JournalError> {
        let dir = state_dir.join("journal").join(dir_name(target_key));
        fs::create_dir_all(&dir).map_err(io_err("create journal directory", &dir))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(JournalError::InUse(dir)),
            Err((_, e)) => return Err(io_err("lock", &lock_path)(e.into())),
        };
        check_key(&dir, target_key)?;

        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list journal directory", &dir))? {
            let entry = entry.map_err(io_err("list journal directory", &dir))?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok());
            ids.extend(id);
        }
        ids.sort_unstable();

        let mut scan = Scan::default();
        let mut recovered = Recovered::default();
        let last_id = ids.last().copied().unwrap_or(0);
        for (i, &id) in ids.iter().enumerate() {
            let path = segment_path(&dir, id);
            if scan.damaged {
                recovered.set_aside.push(set_aside(state_dir, &dir, &path, target_key)?);
                continue;
            }
            let file =
                OpenOptions::new().read(true).write(true).open(&path).map_err(io_err("open", &path))?;
            let (end, size) = scan.segment(&path, id, &file)?;
            let len = match end {
                SegmentEnd::Clean => size,
                SegmentEnd::Bad(at) => {
                    scan.torn_bytes += size - at;
                    scan.damaged = i + 1 < ids.len();
                    if at < MAGIC.len() as u64 {
                        fs::remove_file(&path).map_err(io_err("remove empty journal segment", &path))?;
                        continue;
                    }
                    file.set_len(at).map_err(io_err("truncate torn journal tail", &path))?;
                    at
                }
            };
            // A previous run may have died before its last writes reached the disk; new records
            // go after these, so make them durable first.
            file.sync_data().map_err(io_err("sync", &path))?;
            scan.segs.push(Segment { id, file: Arc::new(file), len, live: 0 });
        }

        let mut st = State {
            segs: VecDeque::new(),
            next_seq: scan.max_seq + 1,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            disk_bytes: scan.segs.iter().map(|s| s.len).sum(),
            index: Index::default(),
            sent_mark: scan.sent_mark,
            write_gen: 0,
            commit_due: None,
            dir_dirty: true,
            waiters: 0,
            failed: 0,
            first_failure: None,
            closing: false,
        };
        st.segs.extend(scan.segs);
        for (seq, rec, op, data_len) in scan.ops {
            if scan.acked.contains(&seq) {
                continue;
            }
            let kind = op.kind();
            st.index.apply(seq, &op, data_loc(kind, &rec, data_len), data_len);
            if let Some(seg) = st.seg_mut(rec.seg) {
                seg.live += 1;
            }
            st.pending_bytes += rec.len;
            recovered.data_bytes += data_len;
            recovered.ops.push(RecoveredOp { seq, kind, path: op.path().clone(), data_len });
            st.pending.insert(seq, rec);
        }
        recovered.torn_bytes = scan.torn_bytes;

        let active_id = last_id.max(st.segs.back().map_or(0, |s| s.id)) + 1;
        let active = new_segment(&dir, active_id)?;
        st.disk_bytes += active.len;
        st.segs.push_back(active);

        let first = st.first_unresolved();
        let last = st.next_seq - 1;
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            state_dir: state_dir.to_path_buf(),
            key: target_key.to_string(),
            config,
            recovered_sent_mark: scan.sent_mark,
            st: Mutex::new(st),
            space: Condvar::new(),
            space_async: Notify::new(),
            commit: Condvar::new(),
            synced: Mutex::new(0),
            fsyncs: AtomicU64::new(0),
            appended: watch::Sender::new(last),
            resolved: watch::Sender::new(first),
            _lock: lock,
        });
        {
            let mut st = inner.lock();
            inner.reclaim(&mut st);
        }
        inner.sync()?;
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("journal-commit".into())
                .spawn(move || inner.commit_loop())
                .map_err(io_err("start the group-commit thread for", &dir))?
        };
        let guard = Arc::new(Guard { inner: inner.clone(), thread: Some(thread) });
        Ok((Journal { inner, _guard: guard }, recovered))
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Writes `op` to the journal (not yet fsynced: it survives a crash of this process, and a
    /// power loss after the next group commit or [`Journal::sync`]) and returns its sequence
    /// number. Blocks while the journal is at its size cap; use [`Journal::append_async`] on an
    /// async runtime.
    pub fn append(&self, op: Op) -> Result<Seq, JournalError> {
        let rec = Record::new(&op)?;
        let mut st = self.inner.lock();
        while !self.inner.has_room(&st, rec.len()) {
            st.waiters += 1;
            st = self.inner.space.wait(st).expect("journal lock poisoned");
            st.waiters -= 1;
        }
        self.inner.append_locked(&mut st, &op, rec)
    }

    /// [`Journal::append`] that waits for space without blocking a thread.
    pub async fn append_async(&self, op: Op) -> Result<Seq, JournalError> {
        let rec = Record::new(&op)?;
        loop {
            let notified = self.inner.space_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.inner.lock();
                if self.inner.has_room(&st, rec.len()) {
                    return self.inner.append_locked(&mut st, &op, rec);
                }
            }
            notified.await;
        }
    }

    /// Makes everything appended so far durable now.
    pub fn sync(&self) -> Result<(), JournalError> {
        self.inner.sync()
    }

    /// The server applied these ops: they leave the journal.
    pub fn ack(&self, seqs: &[Seq]) -> Result<(), JournalError> {
        let mut st = self.inner.lock();
        self.inner.ack_locked(&mut st, seqs)
    }

    /// The server refused op `seq` for good: its data and a note go to the rejected folder, the
    /// error is kept for the next barrier of its file and of the mount, and the op leaves the
    /// journal. Returns the note's path. If the rejected copy cannot be written, the op stays.
    pub fn reject(&self, seq: Seq, errno: i32, message: &str) -> Result<PathBuf, JournalError> {
        let op = self.read_op(seq)?;
        self.reject_ops(&[seq], &op, errno, message)
    }

    /// [`Journal::reject`] for the ops `seqs` that were sent together as `op` (coalesced): `op`
    /// is what is kept.
    pub fn reject_ops(
        &self,
        seqs: &[Seq],
        op: &Op,
        errno: i32,
        message: &str,
    ) -> Result<PathBuf, JournalError> {
        let kept = self.inner.keep_rejected(seqs, op, errno, message)?;
        let err = DeferredError { seq: seqs[0], errno, message: message.to_string(), kept: kept.clone() };
        let mut st = self.inner.lock();
        for &seq in seqs {
            st.index.record_error(seq, op.path(), err.clone());
        }
        st.failed += 1;
        st.first_failure.get_or_insert(err);
        if let Err(e) = self.inner.ack_locked(&mut st, seqs) {
            // The op is out of the journal in memory and its data is kept; a replay after a
            // crash would reject it again into a second copy, which loses nothing.
            tracing::warn!("journal: cannot record the rejection of {seqs:?}: {e}");
        }
        Ok(kept)
    }

    /// The pending op `seq`, read back from its segment.
    pub fn read_op(&self, seq: Seq) -> Result<Op, JournalError> {
        let (file, rec) = {
            let st = self.inner.lock();
            let rec = st.pending.get(&seq).ok_or(JournalError::NotPending(seq))?;
            let seg = st.seg(rec.seg).ok_or(JournalError::NotPending(seq))?;
            (seg.file.clone(), PendingRec { seg: rec.seg, off: rec.off, len: rec.len })
        };
        self.inner.read_record(&file, seq, &rec)
    }

    /// Pending ops after `after`, in order: at most `max_ops`, and no more than `max_bytes` of
    /// records unless the first alone is larger.
    pub fn read_pending(
        &self,
        after: Seq,
        max_ops: usize,
        max_bytes: u64,
    ) -> Result<Vec<(Seq, Op)>, JournalError> {
        let wanted: Vec<(Seq, Arc<File>, PendingRec)> = {
            let st = self.inner.lock();
            let mut bytes = 0;
            let mut out = Vec::new();
            for (&seq, rec) in st.pending.range(after + 1..) {
                if out.len() >= max_ops || (!out.is_empty() && bytes + rec.len > max_bytes) {
                    break;
                }
                bytes += rec.len;
                let seg = st.seg(rec.seg).expect("a pending op's segment exists");
                out.push((seq, seg.file.clone(), PendingRec { seg: rec.seg, off: rec.off, len: rec.len }));
            }
            out
        };
        wanted
            .into_iter()
            .map(|(seq, file, rec)| Ok((seq, self.inner.read_record(&file, seq, &rec)?)))
            .collect()
    }

    /// Whether op `seq` was recovered from a previous run that may already have sent it.
    pub fn maybe_sent_before(&self, seq: Seq) -> bool {
        seq <= self.inner.recovered_sent_mark
    }

    /// Records that ops up to `seq` are about to be sent, so that after a crash the journal
    /// knows which ops the server may already have (see [`Journal::maybe_sent_before`]).
    /// Not fsynced: losing the mark only makes a replayed op's "already exists" look like an
    /// error, which keeps it in the rejected folder rather than losing anything.
    pub fn note_sent(&self, seq: Seq) {
        let mut st = self.inner.lock();
        if seq <= st.sent_mark {
            return;
        }
        let mut buf = Vec::with_capacity(HEADER + 1);
        meta_record(TAG_SENT, seq, &mut buf);
        match self.inner.write_active(&mut st, &buf) {
            Ok(()) => st.sent_mark = seq,
            Err(e) => tracing::warn!("journal: cannot record sent mark: {e}"),
        }
    }

    /// What the journal knows of `[offset, offset + len)` of the file at `path`. Read it
    /// before asking the server for the gaps: an op acknowledged in between is then on the
    /// server.
    pub fn overlay(&self, path: &[u8], offset: u64, len: u64) -> Result<Overlay, JournalError> {
        let (pieces, size) = {
            let st = self.inner.lock();
            let (pieces, size) = st.index.overlay(path, offset, len);
            let pieces: Vec<(Range<u64>, Option<Arc<File>>, Piece)> = pieces
                .into_iter()
                .map(|(r, p)| {
                    let file = match p {
                        Piece::Data(loc) => st.seg(loc.seg).map(|s| s.file.clone()),
                        Piece::Zero => None,
                    };
                    (r, file, p)
                })
                .collect();
            (pieces, size)
        };
        let mut out = Vec::with_capacity(pieces.len());
        for (r, file, p) in pieces {
            let n = (r.end - r.start) as usize;
            let bytes = match (p, file) {
                (Piece::Data(loc), Some(file)) => {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, loc.off)
                        .map_err(io_err("read journal data from", &self.inner.dir))?;
                    Bytes::from(buf)
                }
                _ => zeros(n),
            };
            out.push((r, bytes));
        }
        Ok(Overlay { pieces: out, size })
    }

    /// The size the file at `path` will have once pending ops are applied, if any change it.
    pub fn pending_size(&self, path: &[u8]) -> Option<PendingSize> {
        self.inner.lock().index.pending_size(path)
    }

    /// Whether pending ops name `path` or change the file now at `path`: the server's view of
    /// it is not the local one.
    pub fn is_dirty(&self, path: &[u8]) -> bool {
        self.inner.lock().index.is_dirty(path)
    }

    /// The first error of a rejected op on the file at `path`, once.
    pub fn take_error(&self, path: &[u8]) -> Option<DeferredError> {
        self.inner.lock().index.take_error(path)
    }

    /// How many ops were rejected since the last call, and the first of them.
    pub fn take_failures(&self) -> Option<(u64, DeferredError)> {
        let mut st = self.inner.lock();
        let n = std::mem::take(&mut st.failed);
        st.first_failure.take().map(|e| (n, e))
    }

    pub fn last_seq(&self) -> Seq {
        *self.inner.appended.borrow()
    }

    /// Follows the newest appended sequence number.
    pub fn subscribe_appended(&self) -> watch::Receiver<Seq> {
        self.inner.appended.subscribe()
    }

    /// The newest sequence up to which every op is acknowledged or rejected.
    pub fn resolved_upto(&self) -> Seq {
        self.inner.resolved.borrow().saturating_sub(1)
    }

    /// Resolves once every op up to `seq` is acknowledged or rejected.
    pub async fn wait_resolved(&self, seq: Seq) {
        let mut rx = self.inner.resolved.subscribe();
        // The sender half lives in `inner`, which this handle keeps alive.
        let _ = rx.wait_for(|&first| first > seq).await;
    }

    pub fn stats(&self) -> Stats {
        let st = self.inner.lock();
        Stats {
            pending_ops: st.pending.len(),
            pending_bytes: st.pending_bytes,
            disk_bytes: st.disk_bytes,
            segments: st.segs.len(),
            waiting: st.waiters,
            last_seq: st.next_seq - 1,
            fsyncs: self.inner.fsyncs.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().expect("journal lock poisoned")
    }

    /// Whether a record of `n` bytes may be appended now. An empty journal always has room, so
    /// an op larger than the cap still goes through.
    fn has_room(&self, st: &State, n: u64) -> bool {
        st.pending.is_empty() || st.disk_bytes + n <= self.config.max_bytes
    }

    fn append_locked(&self, st: &mut State, op: &Op, rec: Record) -> Result<Seq, JournalError> {
        let n = rec.len();
        let active_len = st.segs.back().map_or(0, |s| s.len);
        let full = st.disk_bytes + n > self.config.max_bytes;
        if (full && st.pending.is_empty() && st.disk_bytes > MAGIC.len() as u64)
            || (active_len > MAGIC.len() as u64 && active_len + n > self.config.segment_bytes)
        {
            self.rotate(st)?;
        }
        let seq = st.next_seq;
        let data_len = rec.data_len;
        let buf = rec.seal(seq);
        let at = st.active().len;
        let seg_id = st.active().id;
        self.write_active(st, &buf)?;
        let prec = PendingRec { seg: seg_id, off: at, len: n };
        st.active().live += 1;
        st.next_seq += 1;
        st.pending_bytes += n;
        st.index.apply(seq, op, data_loc(op.kind(), &prec, data_len), data_len);
        st.pending.insert(seq, prec);
        if st.commit_due.is_none() {
            st.commit_due = Some(Instant::now() + self.config.commit_interval);
            self.commit.notify_one();
        }
        self.appended.send_replace(seq);
        Ok(seq)
    }

    /// Appends raw bytes to the active segment; on failure the segment is cut back, so a partial
    /// record never sits in front of later ones.
    fn write_active(&self, st: &mut State, buf: &[u8]) -> Result<(), JournalError> {
        let seg = st.active();
        if let Err(e) = seg.file.write_all_at(buf, seg.len) {
            let _ = seg.file.set_len(seg.len);
            return Err(io_err("append to journal segment in", &self.dir)(e));
        }
        seg.len += buf.len() as u64;
        st.disk_bytes += buf.len() as u64;
        st.write_gen += 1;
        Ok(())
    }

    /// Starts a new active segment. The old one is fsynced first unless it is about to be
    /// deleted: a power loss may then only cut the log's tail, never a middle.
    fn rotate(&self, st: &mut State) -> Result<(), JournalError> {
        if !st.pending.is_empty() {
            st.active().file.sync_data().map_err(io_err("sync journal segment in", &self.dir))?;
        }
        let id = st.active().id + 1;
        let seg = new_segment(&self.dir, id)?;
        st.disk_bytes += seg.len;
        st.segs.push_back(seg);
        st.dir_dirty = true;
        self.reclaim(st);
        Ok(())
    }

    /// Deletes the oldest segments while they hold no pending op. Only from the front: an
    /// acknowledgement is recorded in a later segment than its op, and must not outlive it.
    fn reclaim(&self, st: &mut State) {
        while st.segs.len() > 1 && st.segs.front().is_some_and(|s| s.live == 0) {
            let seg = st.segs.front().expect("checked");
            let path = segment_path(&self.dir, seg.id);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("journal: cannot remove {}: {e}", path.display());
                return;
            }
            st.disk_bytes -= seg.len;
            st.dir_dirty = true;
            st.segs.pop_front();
        }
    }

    fn ack_locked(&self, st: &mut State, seqs: &[Seq]) -> Result<(), JournalError> {
        let mut buf = Vec::with_capacity(seqs.len() * (HEADER + 1));
        for &seq in seqs {
            let Some(rec) = st.pending.remove(&seq) else { continue };
            if let Some(seg) = st.seg_mut(rec.seg) {
                seg.live -= 1;
            }
            st.pending_bytes -= rec.len;
            st.index.ack(seq);
            meta_record(TAG_ACK, seq, &mut buf);
        }
        if buf.is_empty() {
            return Ok(());
        }
        // The acknowledgement holds in memory even if it cannot be recorded: the op is on the
        // server, and replaying it after a crash is tolerated (see the sender).
        let written = self.write_active(st, &buf);
        self.reclaim(st);
        self.resolved.send_replace(st.first_unresolved());
        if st.waiters > 0 {
            self.space.notify_all();
        }
        self.space_async.notify_waiters();
        written
    }

    fn sync(&self) -> Result<(), JournalError> {
        let mut synced = self.synced.lock().expect("journal sync lock poisoned");
        let (gen, file, dir_dirty) = {
            let mut st = self.lock();
            st.commit_due = None;
            let dir_dirty = std::mem::take(&mut st.dir_dirty);
            (st.write_gen, st.active().file.clone(), dir_dirty)
        };
        if gen <= *synced && !dir_dirty {
            return Ok(());
        }
        let res = file.sync_data().map_err(io_err("sync journal segment in", &self.dir)).and_then(|()| {
            if dir_dirty {
                sync_dir(&self.dir)?;
            }
            Ok(())
        });
        match res {
            Ok(()) => {
                *synced = gen;
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let mut st = self.lock();
                st.dir_dirty |= dir_dirty;
                st.commit_due.get_or_insert(Instant::now() + self.config.commit_interval);
                Err(e)
            }
        }
    }

    fn commit_loop(&self) {
        loop {
            let mut st = self.lock();
            loop {
                if st.closing {
                    drop(st);
                    if let Err(e) = self.sync() {
                        tracing::warn!("journal: final sync failed: {e}");
                    }
                    return;
                }
                match st.commit_due {
                    None => st = self.commit.wait(st).expect("journal lock poisoned"),
                    Some(due) => {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        st = self.commit.wait_timeout(st, due - now).expect("journal lock poisoned").0;
                    }
                }
            }
            drop(st);
            if let Err(e) = self.sync() {
                tracing::warn!("journal: group commit failed: {e}");
            }
        }
    }

    fn read_record(&self, file: &File, seq: Seq, rec: &PendingRec) -> Result<Op, JournalError> {
        let seg_path = segment_path(&self.dir, rec.seg);
        let damaged = |why: String| JournalError::Damaged { seq, path: seg_path.clone(), why };
        let mut buf = vec![0u8; rec.len as usize];
        file.read_exact_at(&mut buf, rec.off).map_err(|e| damaged(e.to_string()))?;
        let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
        let got_seq = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
        let crc = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
        if got_seq != seq
            || HEADER as u64 + u64::from(len) != rec.len
            || crc_of(&buf[HEADER..], seq, len) != crc
        {
            return Err(damaged("header or checksum mismatch".into()));
        }
        let payload = Bytes::from(buf).slice(HEADER..);
        Op::decode(payload).map_err(|e| damaged(e.to_string()))
    }

    /// Writes the rejected op's data and a note into `<state>/rejected/`, durably.
    fn keep_rejected(
        &self,
        seqs: &[Seq],
        op: &Op,
        errno: i32,
        message: &str,
    ) -> Result<PathBuf, JournalError> {
        let dir = self.state_dir.join("rejected");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let base = format!("{}-{}-{}", utc_stamp(SystemTime::now()), seqs[0], safe_name(op.path()));
        let mut note = String::new();
        note.push_str("devmount could not apply a queued change to the pod, and kept it here.\n\n");
        note.push_str(&format!("target: {}\n", self.key));
        note.push_str(&format!("change: {}\n", op.describe()));
        let seq_list: Vec<String> = seqs.iter().map(|s| s.to_string()).collect();
        note.push_str(&format!("journal sequence: {}\n", seq_list.join(", ")));
        note.push_str(&format!("error: {message} (errno {errno})\n"));
        if !op.data().is_empty() {
            let (path, mut f) = create_unique(&dir, &base)?;
            f.write_all(op.data()).and_then(|()| f.sync_all()).map_err(io_err("write", &path))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            note.push_str(&format!("data: {name} ({} bytes)\n", op.data().len()));
            if let Op::Write { offset, .. } = op {
                note.push_str(&format!("the data belongs at byte offset {offset} of the file\n"));
            }
        }
        let (path, mut f) = create_unique(&dir, &format!("{base}.txt"))?;
        f.write_all(note.as_bytes()).and_then(|()| f.sync_all()).map_err(io_err("write", &path))?;
        sync_dir(&dir)?;
        Ok(path)
    }
}

fn new_segment(dir: &Path, id: u64) -> Result<Segment, JournalError> {
    let path = segment_path(dir, id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create journal segment", &path))?;
    file.write_all_at(MAGIC, 0).map_err(io_err("write", &path))?;
    Ok(Segment { id, file: Arc::new(file), len: MAGIC.len() as u64, live: 0 })
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", dir))
}

/// The key is kept inside its directory, so a hash collision is refused instead of mixing two
/// targets' changes.
fn check_key(dir: &Path, key: &str) -> Result<(), JournalError> {
    let path = dir.join("target");
    match fs::read(&path) {
        Ok(found) if found == key.as_bytes() => Ok(()),
        Ok(found) => Err(JournalError::OtherTarget {
            dir: dir.to_path_buf(),
            found: String::from_utf8_lossy(&found).into_owned(),
            expected: key.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = dir.join("target.tmp");
            fs::write(&tmp, key.as_bytes())
                .and_then(|()| File::open(&tmp)?.sync_all())
                .and_then(|()| fs::rename(&tmp, &path))
                .map_err(io_err("write", &path))?;
            sync_dir(dir)
        }
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Moves a segment that follows a damaged one into the rejected folder, with a note.
fn set_aside(state_dir: &Path, dir: &Path, seg: &Path, key: &str) -> Result<PathBuf, JournalError> {
    let rejected = state_dir.join("rejected");
    fs::create_dir_all(&rejected).map_err(io_err("create", &rejected))?;
    let journal = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let seg_name = seg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let base = format!("{}-journal-{journal}-{seg_name}", utc_stamp(SystemTime::now()));
    let (dest, _) = create_unique(&rejected, &base)?;
    fs::rename(seg, &dest).map_err(io_err("move damaged journal segment", seg))?;
    let note = format!(
        "devmount found a damaged record in the journal of {key} before this segment, so the \
         changes recorded here were not replayed (replaying them without the damaged ones could \
         apply changes out of order). The file holds journal records (see docs/architecture.md).\n"
    );
    let (note_path, mut f) = create_unique(&rejected, &format!("{base}.txt"))?;
    f.write_all(note.as_bytes()).and_then(|()| f.sync_all()).map_err(io_err("write", &note_path))?;
    sync_dir(&rejected)?;
    Ok(dest)
}

/// Creates `dir/name`, or `dir/name-1`, `dir/name-2`... if taken.
fn create_unique(dir: &Path, name: &str) -> Result<(PathBuf, File), JournalError> {
    let (stem, ext) = match name.strip_suffix(".txt") {
        Some(stem) => (stem, ".txt"),
        None => (name, ""),
    };
    let mut n = 0u32;
    loop {
        let candidate = if n == 0 { dir.join(name) } else { dir.join(format!("{stem}-{n}{ext}")) };
        match OpenOptions::new().write(true).create_new(true).open(&candidate) {
            Ok(f) => return Ok((candidate, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
            Err(e) => return Err(io_err("create", &candidate)(e)),
        }
    }
}

/// The last component of a path, reduced to characters safe in any file name.
fn safe_name(path: &[u8]) -> String {
    let last = path.rsplit(|&c| c == b'/').next().unwrap_or_default();
    let name: String = last
        .iter()
        .take(64)
        .map(|&c| if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_') { c as char } else { '_' })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("_{name}")
    } else {
        name
    }
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `n` zero bytes, without allocating for the usual read sizes.
fn zeros(n: usize) -> Bytes {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    if n <= ZEROS.len() {
        Bytes::from_static(&ZEROS[..n])
    } else {
        Bytes::from(vec![0u8; n])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use devmount_server::proto::sftp::{Condition, TimeSet};
    use devmount_server::proto::stat::Timespec;

    use super::*;

    const KEY: &str = "dev@pod.example:2222/work/src";

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn write(path: &str, offset: u64, data: &str) -> Op {
        Op::Write { path: b(path), offset, data: b(data), cond: None }
    }

    /// Group commit effectively off, so tests control every fsync.
    fn quiet() -> Config {
        Config { commit_interval: Duration::from_secs(3600), ..Config::default() }
    }

    fn open(state: &Path, config: Config) -> (Journal, Recovered) {
        Journal::open(state, KEY, config).unwrap()
    }

    fn seqs(r: &Recovered) -> Vec<Seq> {
        r.ops.iter().map(|o| o.seq).collect()
    }

    fn segments(j: &Journal) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(j.dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The file as the overlay shows it over a server copy `server`.
    fn read(j: &Journal, path: &str, server: &str) -> String {
        let ov = j.overlay(path.as_bytes(), 0, 1 << 20).unwrap();
        let size = ov.size.map_or(server.len() as u64, |s| s.resolve(server.len() as u64)) as usize;
        let mut out = server.as_bytes().to_vec();
        out.resize(size, b'0');
        for (r, bytes) in ov.pieces {
            let piece: Vec<u8> = bytes.iter().map(|&c| if c == 0 { b'0' } else { c }).collect();
            out[r.start as usize..r.end as usize].copy_from_slice(&piece);
        }
        String::from_utf8(out).unwrap()
    }

    fn varied_ops() -> Vec<Op> {
        let c = Some(Condition { size: 3, mtime: Timespec { sec: 9, nsec: 1 }, ino: 77 });
        vec![
            Op::Mkdir { path: b("d"), mode: 0o755 },
            Op::Create { path: b("d/f"), mode: 0o644, exclusive: true },
            Op::Write { path: b("d/f"), offset: 0, data: b("hello"), cond: c },
            Op::SetAttr {
                path: b("d/f"),
                mode: Some(0o600),
                uid: None,
                gid: None,
                atime: TimeSet::Now,
                mtime: TimeSet::Omit,
            },
            Op::Rename { from: b("d/f"), to: b("d/g"), flags: 0, cond: None },
            Op::Fsync { path: b("d/g") },
        ]
    }

    #[test]
    fn records_survive_reopen_in_order() {
        let state = tempfile::tempdir().unwrap();
        let ops = varied_ops();
        {
            let (j, rec) = open(state.path(), quiet());
            assert!(rec.ops.is_empty());
            for (i, op) in ops.iter().enumerate() {
                assert_eq!(j.append(op.clone()).unwrap(), i as Seq + 1);
            }
        }
        let (j, rec) = open(state.path(), quiet());
        assert_eq!(seqs(&rec), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(rec.data_bytes, 5);
        assert_eq!(rec.torn_bytes, 0);
        assert_eq!(rec.ops[2], RecoveredOp { seq: 3, kind: OpKind::Write, path: b("d/f"), data_len: 5 });
        for (i, op) in ops.iter().enumerate() {
            assert_eq!(&j.read_op(i as Seq + 1).unwrap(), op);
        }
        assert_eq!(j.read_pending(2, 2, u64::MAX).unwrap(), vec![(3, ops[2].clone()), (4, ops[3].clone())]);
        assert_eq!(j.read_pending(0, 10, 1).unwrap().len(), 1, "at least one op, even past the byte limit");
        assert_eq!(j.append(Op::Unlink { path: b("x") }).unwrap(), 7);
        assert_eq!(fs::read_to_string(j.dir().join("target")).unwrap(), KEY);
    }

    #[test]
    fn acked_and_rejected_ops_are_not_replayed() {
        let state = tempfile::tempdir().unwrap();
        {
            let (j, _) = open(state.path(), quiet());
            for op in varied_ops() {
                j.append(op).unwrap();
            }
            j.ack(&[2, 4]).unwrap();
            j.ack(&[4, 99]).unwrap();
            j.reject(5, libc::EXDEV, "Invalid cross-device link").unwrap();
        }
        let (j, rec) = open(state.path(), quiet());
        assert_eq!(seqs(&rec), vec![1, 3, 6]);
        assert!(matches!(j.read_op(2), Err(JournalError::NotPending(2))));
    }

    #[test]
    fn torn_tail_is_cut_off_and_appends_continue() {
        let state = tempfile::tempdir().unwrap();
        let seg = {
            let (j, _) = open(state.path(), quiet());
            for i in 0..3 {
                j.append(write("f", i * 10, "0123456789")).unwrap();
            }
            segments(&j).pop().unwrap()
        };
        let full = fs::metadata(&seg).unwrap().len();
        // A crash in the middle of the third record's write.
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(full - 4).unwrap();
        let record = Record::new(&write("f", 20, "0123456789")).unwrap().len();
        {
            let (j, rec) = open(state.path(), quiet());
            assert_eq!(seqs(&rec), vec![1, 2]);
            assert_eq!(rec.torn_bytes, record - 4);
            assert_eq!(fs::metadata(&seg).unwrap().len(), full - record);
            assert_eq!(j.append(write("f", 0, "X")).unwrap(), 3);
            assert_eq!(read(&j, "f", ""), "X1234567890123456789");
        }
        // Garbage after the last record (a torn header) is cut as well.
        let seg2 = segments(&open(state.path(), quiet()).0).remove(1);
        let mut f = OpenOptions::new().append(true).open(&seg2).unwrap();
        f.write_all(&[0xff; 7]).unwrap();
        drop(f);
        let (j, rec) = open(state.path(), quiet());
        assert_eq!(seqs(&rec), vec![1, 2, 3]);
        assert_eq!(rec.torn_bytes, 7);
        assert_eq!(j.read_op(3).unwrap(), write("f", 0, "X"));
    }

    #[test]
    fn a_damaged_record_ends_the_log_and_later_segments_are_set_aside() {
        let state = tempfile::tempdir().unwrap();
        let config = Config { segment_bytes: 200, ..quiet() };
        let first = {
            let (j, _) = open(state.path(), config.clone());
            for i in 0..12 {
                j.append(write("f", i, "0123456789012345678901234567890123456789")).unwrap();
            }
            let segs = segments(&j);
            assert!(segs.len() >= 4, "{segs:?}");
            segs[0].clone()
        };
        let record = Record::new(&write("f", 0, "0123456789012345678901234567890123456789")).unwrap().len();
        // Flip a data byte of the second record of the first segment.
        let f = OpenOptions::new().read(true).write(true).open(&first).unwrap();
        let at = MAGIC.len() as u64 + record + HEADER as u64 + 10;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 1], at).unwrap();
        drop(f);
        let (j, rec) = open(state.path(), config);
        assert_eq!(seqs(&rec), vec![1]);
        assert!(!rec.set_aside.is_empty());
        for p in &rec.set_aside {
            assert!(p.starts_with(state.path().join("rejected")) && p.exists(), "{p:?}");
            let mut note = p.clone().into_os_string();
            note.push(".txt");
            assert!(fs::read_to_string(note).unwrap().contains(KEY));
        }
        assert_eq!(j.append(write("g", 0, "ok")).unwrap(), 2);
    }

    #[test]
    fn segments_are_deleted_once_every_op_in_them_is_acked() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) = open(state.path(), Config { segment_bytes: 256, ..quiet() });
        let seqs: Vec<Seq> =
            (0..20).map(|i| j.append(write("f", i * 100, &"x".repeat(100))).unwrap()).collect();
        let many = j.stats().segments;
        assert!(many > 5);
        // Acks of later ops free nothing while the first segment still holds a pending op.
        j.ack(&seqs[1..]).unwrap();
        assert_eq!(j.stats().segments, many);
        j.ack(&seqs[..1]).unwrap();
        assert_eq!(j.stats().segments, 1);
        assert_eq!(segments(&j).len(), 1);
        assert_eq!(j.stats().pending_ops, 0);
        let (_, rec) = {
            drop(j);
            open(state.path(), quiet())
        };
        assert!(rec.ops.is_empty());
    }

    #[test]
    fn overlay_reads_pending_bytes_back_from_disk_also_after_reopen() {
        let state = tempfile::tempdir().unwrap();
        {
            let (j, _) = open(state.path(), quiet());
            j.append(write("a", 2, "AAAA")).unwrap();
            j.append(write("a", 4, "BB")).unwrap();
            j.append(Op::Truncate { path: b("a"), size: 5, cond: None }).unwrap();
            j.append(Op::Truncate { path: b("a"), size: 9, cond: None }).unwrap();
            j.append(write("a", 7, "C")).unwrap();
            assert_eq!(read(&j, "a", "ssssssssssss"), "ssAAB00C0");
            assert_eq!(j.pending_size(b"a"), Some(PendingSize::Exact(9)));
            let ov = j.overlay(b"a", 3, 2).unwrap();
            assert_eq!(ov.pieces, vec![(3..4, b("A")), (4..5, b("B"))]);
            assert!(j.is_dirty(b"a") && !j.is_dirty(b"b"));
        }
        let (j, _) = open(state.path(), quiet());
        assert_eq!(read(&j, "a", "ssssssssssss"), "ssAAB00C0");
        j.ack(&[1, 2, 3, 4, 5]).unwrap();
        assert!(j.overlay(b"a", 0, 100).unwrap().pieces.is_empty());
        assert!(!j.is_dirty(b"a"));
    }

    #[test]
    fn renames_and_unlinks_carry_the_overlay_across_reopen() {
        let state = tempfile::tempdir().unwrap();
        {
            let (j, _) = open(state.path(), quiet());
            j.append(write("d/x", 0, "X")).unwrap();
            j.append(write("gone", 0, "G")).unwrap();
            j.append(Op::Rename { from: b("d"), to: b("e"), flags: 0, cond: None }).unwrap();
            j.append(Op::Unlink { path: b("gone") }).unwrap();
            j.ack(&[1]).unwrap();
        }
        let (j, _) = open(state.path(), quiet());
        // The write to d/x was acked, so e/x is the server's; the pending rename still names d.
        assert!(j.overlay(b"e/x", 0, 1).unwrap().pieces.is_empty());
        assert!(j.is_dirty(b"d") && j.is_dirty(b"e"));
        assert!(j.overlay(b"gone", 0, 1).unwrap().pieces.is_empty());
        j.append(write("d/y", 0, "Y")).unwrap();
        j.append(Op::Rename { from: b("d"), to: b("f"), flags: 0, cond: None }).unwrap();
        assert_eq!(read(&j, "f/y", ""), "Y");
    }

    #[test]
    fn a_full_journal_blocks_appends_until_acks_free_space() {
        let state = tempfile::tempdir().unwrap();
        let config = Config { segment_bytes: 4096, max_bytes: 8192, ..quiet() };
        let (j, _) = open(state.path(), config);
        let (tx, rx) = mpsc::channel();
        let writer = {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    tx.send(j.append(write("big", i * 1024, &"d".repeat(1024))).unwrap()).unwrap();
                }
            })
        };
        wait_until("the writer waits for space", || j.stats().waiting == 1);
        let stats = j.stats();
        assert!(stats.disk_bytes <= 8192, "{stats:?}");
        let written: Vec<Seq> = rx.try_iter().collect();
        assert!(!written.is_empty() && written.len() < 40, "{written:?}");
        // Acknowledging releases the writer; keep acknowledging until it is done.
        j.ack(&written).unwrap();
        let mut total = written.len();
        while total < 40 {
            let seq = rx.recv_timeout(Duration::from_secs(10)).expect("the writer makes progress");
            assert!(j.stats().disk_bytes <= 8192 + 4096, "{:?}", j.stats());
            j.ack(&[seq]).unwrap();
            total += 1;
        }
        writer.join().unwrap();
        assert_eq!(j.stats().pending_ops, 0);
    }

    #[test]
    fn an_op_larger_than_the_cap_still_goes_into_an_empty_journal() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) = open(state.path(), Config { segment_bytes: 64, max_bytes: 100, ..quiet() });
        let s = j.append(write("f", 0, &"x".repeat(500))).unwrap();
        j.ack(&[s]).unwrap();
        let s = j.append(write("f", 0, &"y".repeat(500))).unwrap();
        assert_eq!(read(&j, "f", ""), "y".repeat(500));
        j.ack(&[s]).unwrap();
        assert!(j.stats().disk_bytes < 600, "acknowledged segments are gone: {:?}", j.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn append_async_waits_for_space_without_blocking_the_runtime() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) = open(state.path(), Config { segment_bytes: 2048, max_bytes: 4096, ..quiet() });
        let mut seqs = Vec::new();
        while j.stats().disk_bytes + 1100 <= 4096 {
            seqs.push(j.append_async(write("f", 0, &"x".repeat(1024))).await.unwrap());
        }
        let mut blocked = {
            let j = j.clone();
            tokio::spawn(async move { j.append_async(write("f", 0, &"z".repeat(1024))).await.unwrap() })
        };
        // With the clock paused, the timeout fires only once every task is idle: the append waits.
        assert!(tokio::time::timeout(Duration::from_secs(1), &mut blocked).await.is_err());
        j.ack(&seqs).unwrap();
        let seq = tokio::time::timeout(Duration::from_secs(10), blocked).await.unwrap().unwrap();
        assert_eq!(seq, seqs.len() as Seq + 1);
    }

    #[test]
    fn rejected_ops_are_kept_with_a_note_and_reported_once() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) = open(state.path(), quiet());
        let s = j.append(write("src/\u{ff}main.rs", 4096, "fn main() {}")).unwrap();
        j.append(Op::Mkdir { path: b("other"), mode: 0o755 }).unwrap();
        let note = j.reject(s, libc::ENOSPC, "No space left on device").unwrap();
        assert!(note.starts_with(state.path().join("rejected")));
        let text = fs::read_to_string(&note).unwrap();
        for want in [
            KEY,
            "write of 12 bytes at offset 4096 to src/\\xc3\\xbfmain.rs",
            "No space left on device",
            "offset 4096",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
        let data_name =
            text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap().split(' ').next().unwrap();
        assert_eq!(fs::read(note.parent().unwrap().join(data_name)).unwrap(), b"fn main() {}");
        let err = j.take_error("src/\u{ff}main.rs".as_bytes()).unwrap();
        assert_eq!((err.seq, err.errno, err.kept.clone()), (s, libc::ENOSPC, note.clone()));
        assert!(j.take_error("src/\u{ff}main.rs".as_bytes()).is_none());
        let (n, first) = j.take_failures().unwrap();
        assert_eq!((n, first), (1, err));
        assert!(j.take_failures().is_none());
        assert_eq!(j.stats().pending_ops, 1);
        // A second rejection with the same name gets a name of its own.
        let s2 = j.append(write("src/\u{ff}main.rs", 0, "again")).unwrap();
        let note2 = j.reject(s2, libc::EACCES, "Permission denied").unwrap();
        assert_ne!(note, note2);
        assert!(note2.exists());
    }

    #[test]
    fn group_commit_syncs_soon_after_an_append() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) =
            open(state.path(), Config { commit_interval: Duration::from_millis(20), ..Config::default() });
        let base = j.stats().fsyncs;
        j.append(write("f", 0, "x")).unwrap();
        wait_until("the group commit has synced", || j.stats().fsyncs > base);
    }

    #[test]
    fn appends_between_syncs_share_one_fsync() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) = open(state.path(), quiet());
        let base = j.stats().fsyncs;
        for i in 0..50 {
            j.append(write("f", i, "x")).unwrap();
        }
        assert_eq!(j.stats().fsyncs, base);
        j.sync().unwrap();
        assert_eq!(j.stats().fsyncs, base + 1);
        j.sync().unwrap();
        assert_eq!(j.stats().fsyncs, base + 1, "nothing new to sync");

        let (j2, _) = Journal::open(
            state.path(),
            "other-target",
            Config { commit_interval: Duration::from_millis(300), ..Config::default() },
        )
        .unwrap();
        let base = j2.stats().fsyncs;
        for i in 0..50 {
            j2.append(write("f", i, "x")).unwrap();
        }
        wait_until("the group commit has synced", || j2.stats().fsyncs > base);
        assert!(j2.stats().fsyncs <= base + 2, "50 appends in a burst share their syncs: {:?}", j2.stats());
    }

    #[test]
    fn one_process_per_journal_and_one_target_per_directory() {
        let state = tempfile::tempdir().unwrap();
        let (j, _) = open(state.path(), quiet());
        assert!(matches!(Journal::open(state.path(), KEY, quiet()), Err(JournalError::InUse(_))));
        let target = j.dir().join("target");
        drop(j);
        fs::write(&target, "someone@else:22/x").unwrap();
        assert!(matches!(Journal::open(state.path(), KEY, quiet()), Err(JournalError::OtherTarget { .. })));
    }

    #[test]
    fn the_sent_mark_survives_reopen() {
        let state = tempfile::tempdir().unwrap();
        {
            let (j, _) = open(state.path(), quiet());
            for op in varied_ops() {
                j.append(op).unwrap();
            }
            j.note_sent(2);
            j.note_sent(1);
            assert!(!j.maybe_sent_before(1), "only ops recovered from a previous run");
        }
        let (j, _) = open(state.path(), quiet());
        assert!(j.maybe_sent_before(2) && !j.maybe_sent_before(3));
    }

    #[test]
    fn names_and_stamps() {
        let name = dir_name("dev@pod:2222/work/a b");
        assert!(name.starts_with("dev_pod_2222_work_a_b-") && name.len() == 22 + 16, "{name}");
        assert_ne!(dir_name("a/b"), dir_name("a_b"));
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "20000229T010101Z");
        assert_eq!(safe_name(b"dir/..hidden\xff"), "_..hidden_");
        assert_eq!(safe_name(b""), "_");
    }
}
