//! The sender: one task that reads the journal in order and applies it to a [`Remote`],
//! pipelined, under the ordering rules of the `journal` module.
//!
//! **Scheduling.** The sender keeps a lookahead queue of loaded ops, from the first unresolved
//! one. On each event it walks the queue in order and starts every op that no earlier
//! unresolved op blocks (same path, or one below the other; plain non-overlapping writes to one
//! file do not block each other), while the window of requests and bytes in flight allows. A
//! barrier op ([`Op::is_barrier`]) starts only when it is first in the queue, and the walk stops
//! at it.
//!
//! **Coalescing.** When an op starts, later queued ops that can travel with it join its request:
//! - a plain write is extended by the writes that continue it (same file, adjacent, no
//!   condition), up to [`SenderConfig::max_write`];
//! - an exclusive create becomes one [`Op::Put`] with the file's writes, truncates and
//!   setattrs (mode and times only) that follow, as long as the file stays within
//!   [`SenderConfig::put_max`]. Such a create waits up to [`SenderConfig::coalesce_delay`] for
//!   the rest of its file, unless something later in the queue ends the run or a barrier waits
//!   for it.
//!
//! Ops join only across ops on unrelated paths and never across a barrier, so coalescing
//! reorders nothing that the rules forbid. Ops that may have reached the server already (see
//! below) are never coalesced: they are re-sent exactly as before.
//!
//! **Disconnects.** [`RemoteError::Disconnected`] pauses the sender; requests in flight keep
//! their ops and are re-sent first, unchanged, by [`Sender::resume`]. Such a request may have
//! been applied before the connection dropped ("maybe applied"), and so may ops recovered from a
//! previous run up to its sent mark. Re-sending them is safe because:
//! - writes, truncates, setattrs, puts without `exclusive` and fsyncs are idempotent, and no op
//!   on a related path started after them (same-path order), except non-overlapping plain
//!   writes, which commute;
//! - an op that creates a name (exclusive create, mkdir, mknod, symlink, link) and then fails
//!   with `EEXIST`, or one that removes or renames a name and fails with `ENOENT` (or `EEXIST`
//!   for a no-replace rename), already happened: that counts as success. Barriers ran alone, so
//!   nothing of ours changed those names in between;
//! - an exclusive put failing with `EEXIST` may be ours or the pod's: it goes to the conflict
//!   handler with `maybe_applied`, which can compare the contents; nothing is dropped;
//! - a rename with `RENAME_EXCHANGE` is not idempotent (a repeat swaps back), so a maybe
//!   applied one is not repeated: it is rejected with a note asking the user to check both
//!   names;
//! - a conditional op whose first attempt was applied fails its condition on the repeat (the
//!   file changed: by us); the conflict handler sees `maybe_applied` and decides.
//!
//! **Errors.** [`RemoteError::Rejected`] is final: the op goes to the rejected folder
//! ([`Journal::reject_ops`]) and its error to the next barrier. [`RemoteError::Conflict`] goes to
//! the conflict channel; the op keeps its place (later ops on its path wait) until resolved.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use devmount_server::proto::sftp::{rename_flags, Condition, TimeSet};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::op::{ancestors, related, Op};
use super::{DeferredError, Journal, Seq};

/// Where the journal's ops go: the SFTP client, in the real thing.
pub trait Remote: Send + Sync + 'static {
    /// Applies one op on the server. Called concurrently for ops the sender lets overlap.
    fn apply(&self, op: &Op) -> impl Future<Output = Result<(), RemoteError>> + Send;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// The server refused the op for good (no space, permission, a vanished path...).
    #[error("{message} (errno {errno})")]
    Rejected { errno: i32, message: String },
    /// The connection is gone; the op may or may not have been applied.
    #[error("the connection to the server was lost")]
    Disconnected,
    /// The op's condition failed: the file changed on the server since the client looked.
    #[error("the file changed on the server")]
    Conflict,
}

/// An op whose condition failed, for the caller's conflict policy. The op keeps its place in
/// the order until [`Conflict::resolve`]; dropping it unresolved rejects the op (its data is
/// kept in the rejected folder).
#[derive(Debug)]
pub struct Conflict {
    /// The journal ops sent together as `op`.
    pub seqs: Vec<Seq>,
    pub op: Op,
    /// The op may have been applied by an attempt whose reply was lost (see the module docs):
    /// the change the condition saw may be our own.
    pub maybe_applied: bool,
    reply: oneshot::Sender<Resolution>,
}

impl Conflict {
    pub fn resolve(self, resolution: Resolution) {
        let _ = self.reply.send(resolution);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Send this op in the conflicting one's place (for example without its condition once the
    /// pod's version is saved, or aimed at a conflict-copy path).
    Retry(Op),
    /// The handler took care of it: the op is done.
    Done,
    /// Keep the op in the rejected folder with this error.
    Reject { errno: i32, message: String },
}

/// Some ops were rejected since the last mount-wide barrier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{failed} queued change(s) could not be applied; the first: {first}")]
pub struct BarrierError {
    pub failed: u64,
    pub first: DeferredError,
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Requests in flight at once.
    pub window: usize,
    /// Data bytes in flight at once (one request may exceed it alone).
    pub max_inflight_bytes: u64,
    /// Ops loaded from the journal ahead of the first unresolved one.
    pub lookahead: usize,
    pub lookahead_bytes: u64,
    /// Largest write that adjacent writes are merged into.
    pub max_write: usize,
    /// Largest file sent as one [`Op::Put`]; 0 disables puts (a server without `put@devmount`).
    pub put_max: usize,
    /// How long a new file's create waits for the rest of the file before going alone.
    pub coalesce_delay: Duration,
}

impl Default for SenderConfig {
    fn default() -> SenderConfig {
        SenderConfig {
            window: 64,
            max_inflight_bytes: 16 << 20,
            lookahead: 1024,
            lookahead_bytes: 64 << 20,
            max_write: 1 << 20,
            put_max: 256 << 10,
            coalesce_delay: Duration::from_millis(5),
        }
    }
}

struct Control<R> {
    new_remote: Option<Arc<R>>,
    /// Ops up to here are awaited by a barrier: hold none of them back.
    flush_upto: Seq,
}

struct Shared<R> {
    control: Mutex<Control<R>>,
    wake: Notify,
    paused: AtomicBool,
}

/// Sends a journal to a [`Remote`]. Dropping it stops sending; the journal keeps what is left.
pub struct Sender<R: Remote> {
    journal: Journal,
    shared: Arc<Shared<R>>,
    task: tokio::task::JoinHandle<()>,
}

impl<R: Remote> Drop for Sender<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<R: Remote> Sender<R> {
    /// Starts sending `journal` (from its first pending op, including those recovered from a
    /// previous run) to `remote`; with `None`, paused until [`Sender::resume`]. Conflicts arrive
    /// on the returned channel. Must be called within a tokio runtime.
    pub fn start(
        journal: Journal,
        remote: Option<Arc<R>>,
        config: SenderConfig,
    ) -> (Sender<R>, mpsc::Receiver<Conflict>) {
        let (conflicts, conflicts_rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            control: Mutex::new(Control { new_remote: None, flush_upto: 0 }),
            wake: Notify::new(),
            paused: AtomicBool::new(remote.is_none()),
        });
        let task = Task {
            journal: journal.clone(),
            appended: journal.subscribe_appended(),
            config,
            shared: shared.clone(),
            remote,
            queue: VecDeque::new(),
            queue_bytes: 0,
            loaded_upto: 0,
            reqs: HashMap::new(),
            next_req: 0,
            running: JoinSet::new(),
            running_ids: HashMap::new(),
            inflight_bytes: 0,
            resolving: JoinSet::new(),
            conflicts,
            retry_at: None,
        };
        let task = tokio::spawn(task.run());
        (Sender { journal, shared, task }, conflicts_rx)
    }

    /// The connection is back: re-send what was in flight, then carry on.
    pub fn resume(&self, remote: Arc<R>) {
        self.shared.control.lock().expect("sender control lock poisoned").new_remote = Some(remote);
        self.shared.paused.store(false, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }

    /// Whether the sender is waiting for [`Sender::resume`].
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::Relaxed)
    }

    /// Resolves once every op up to `seq` is acknowledged or rejected; coalescing holds none of
    /// them back meanwhile.
    pub async fn wait(&self, seq: Seq) {
        {
            let mut c = self.shared.control.lock().expect("sender control lock poisoned");
            c.flush_upto = c.flush_upto.max(seq);
        }
        self.shared.wake.notify_one();
        self.journal.wait_resolved(seq).await;
    }

    /// The barrier of one file (fsync, close): waits for `seq` (for fsync, the seq of the
    /// appended [`Op::Fsync`]), then returns the file's first deferred error, once.
    pub async fn wait_path(&self, seq: Seq, path: &[u8]) -> Result<(), DeferredError> {
        self.wait(seq).await;
        self.journal.take_error(path).map_or(Ok(()), Err)
    }

    /// The whole mount's barrier (`devmount sync`, exec): waits for every op appended before
    /// the call, and reports whether any op failed since the previous one.
    pub async fn barrier(&self) -> Result<(), BarrierError> {
        self.wait(self.journal.last_seq()).await;
        self.journal.take_failures().map_or(Ok(()), |(failed, first)| Err(BarrierError { failed, first }))
    }
}

type ReqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqState {
    Running,
    /// Waiting for a connection.
    Parked,
    /// Waiting for the conflict handler.
    Resolving,
}

/// One request to the remote: one op, or several coalesced into one.
struct Req {
    seqs: Vec<Seq>,
    op: Op,
    bytes: u64,
    maybe_applied: bool,
    state: ReqState,
}

struct Slot {
    seq: Seq,
    op: Op,
    maybe_applied: bool,
    seen: Instant,
    req: Option<ReqId>,
    done: bool,
}

impl Slot {
    fn bytes(&self) -> u64 {
        self.op.data().len() as u64 + 64
    }
}

enum Plan {
    Send(Vec<usize>, Op),
    Hold(Instant),
}

struct Task<R: Remote> {
    journal: Journal,
    appended: watch::Receiver<Seq>,
    config: SenderConfig,
    shared: Arc<Shared<R>>,
    remote: Option<Arc<R>>,
    queue: VecDeque<Slot>,
    queue_bytes: u64,
    loaded_upto: Seq,
    reqs: HashMap<ReqId, Req>,
    next_req: ReqId,
    running: JoinSet<(ReqId, Result<(), RemoteError>)>,
    running_ids: HashMap<tokio::task::Id, ReqId>,
    inflight_bytes: u64,
    resolving: JoinSet<(ReqId, Resolution)>,
    conflicts: mpsc::Sender<Conflict>,
    /// After a failed journal read, when to try again.
    retry_at: Option<Instant>,
}

impl<R: Remote> Task<R> {
    async fn run(mut self) {
        loop {
            let new_remote =
                self.shared.control.lock().expect("sender control lock poisoned").new_remote.take();
            if let Some(remote) = new_remote {
                self.resume(remote);
            }
            self.load();
            let hold = self.schedule();
            let wake_at = [hold, self.retry_at].into_iter().flatten().min();
            tokio::select! {
                Some(res) = self.running.join_next_with_id(), if !self.running.is_empty() => self.finished(res),
                Some(res) = self.resolving.join_next(), if !self.resolving.is_empty() => match res {
                    Ok((id, resolution)) => self.resolved(id, resolution),
                    Err(e) => tracing::error!("journal sender: conflict task failed: {e}"),
                },
                _ = self.shared.wake.notified() => {}
                changed = self.appended.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
            }
        }
    }

    fn load(&mut self) {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.retry_at = None;
        let last = *self.appended.borrow_and_update();
        while self.loaded_upto < last
            && self.queue.len() < self.config.lookahead
            && self.queue_bytes < self.config.lookahead_bytes
        {
            let room = self.config.lookahead - self.queue.len();
            let room_bytes = self.config.lookahead_bytes - self.queue_bytes;
            let ops = match self.journal.read_pending(self.loaded_upto, room, room_bytes) {
                Ok(ops) => ops,
                Err(e) => {
                    tracing::error!("journal sender: cannot read the journal, retrying in 1 s: {e}");
                    self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                    return;
                }
            };
            let Some(&(newest, _)) = ops.last() else { break };
            let now = Instant::now();
            for (seq, op) in ops {
                let slot = Slot {
                    seq,
                    maybe_applied: self.journal.maybe_sent_before(seq),
                    op,
                    seen: now,
                    req: None,
                    done: false,
                };
                self.queue_bytes += slot.bytes();
                self.queue.push_back(slot);
            }
            self.loaded_upto = newest;
        }
    }

    fn has_capacity(&self) -> bool {
        self.running.len() < self.config.window
            && (self.running.is_empty() || self.inflight_bytes < self.config.max_inflight_bytes)
    }

    /// Starts what may start; returns when a held create must go at the latest.
    fn schedule(&mut self) -> Option<Instant> {
        while self.queue.front().is_some_and(|s| s.done) {
            let s = self.queue.pop_front().expect("checked");
            self.queue_bytes -= s.bytes();
        }
        self.remote.as_ref()?;
        let flush_upto = self.shared.control.lock().expect("sender control lock poisoned").flush_upto;
        let mut blocks = Blocks::default();
        let mut hold: Option<Instant> = None;
        let mut all_before_done = true;
        for i in 0..self.queue.len() {
            let slot = &self.queue[i];
            if slot.done {
                continue;
            }
            let barrier = slot.op.is_barrier();
            if slot.req.is_some() {
                if barrier {
                    break;
                }
                blocks.add(&slot.op);
                all_before_done = false;
                continue;
            }
            if barrier {
                if all_before_done && self.has_capacity() {
                    let op = slot.op.clone();
                    self.start(vec![i], op);
                }
                break;
            }
            if blocks.blocks(&slot.op) {
                blocks.add(&slot.op);
                all_before_done = false;
                continue;
            }
            if !self.has_capacity() {
                break;
            }
            match self.plan(i, &blocks, flush_upto) {
                Plan::Hold(t) => hold = Some(hold.map_or(t, |h| h.min(t))),
                Plan::Send(idxs, op) => self.start(idxs, op),
            }
            blocks.add(&self.queue[i].op);
            all_before_done = false;
        }
        hold
    }

    fn plan(&self, i: usize, blocks: &Blocks, flush_upto: Seq) -> Plan {
        let slot = &self.queue[i];
        if slot.maybe_applied {
            return Plan::Send(vec![i], slot.op.clone());
        }
        match &slot.op {
            Op::Create { path, mode, exclusive: true } if self.config.put_max > 0 => {
                self.plan_put(i, path, *mode, flush_upto)
            }
            Op::Write { path, offset, data, cond } if data.len() < self.config.max_write => {
                self.plan_write(i, path, *offset, data, *cond, blocks)
            }
            op => Plan::Send(vec![i], op.clone()),
        }
    }

    /// The later queued ops that may join a request for `path` started at `i`: those on
    /// `path` itself, until an op on a related path that cannot join, an op that already left,
    /// or a barrier. `join` says whether an op joins; `false` ends the run. Returns the joined
    /// indices and whether the run was ended (rather than running off the queue's end).
    fn follow(&self, i: usize, path: &Bytes, mut join: impl FnMut(&Op) -> bool) -> (Vec<usize>, bool) {
        let mut idxs = vec![i];
        for j in i + 1..self.queue.len() {
            let s = &self.queue[j];
            if s.done {
                continue;
            }
            if s.op.is_barrier() {
                return (idxs, true);
            }
            if !s.op.paths().any(|p| related(p, path)) {
                continue;
            }
            if s.req.is_some() || s.maybe_applied || !s.op.paths().all(|p| p == path) || !join(&s.op) {
                return (idxs, true);
            }
            idxs.push(j);
        }
        (idxs, false)
    }

    /// A write, with the plain writes that continue it; the merged write keeps the first one's
    /// condition (checked before any of it is written).
    fn plan_write(
        &self,
        i: usize,
        path: &Bytes,
        offset: u64,
        data: &Bytes,
        cond: Option<Condition>,
        blocks: &Blocks,
    ) -> Plan {
        let max = self.config.max_write;
        let mut end = offset.saturating_add(data.len() as u64);
        let mut total = data.len();
        let (idxs, _) = self.follow(i, path, |op| match op {
            Op::Write { offset: o, data: d, cond: None, .. }
                if *o == end
                    && total + d.len() <= max
                    && !blocks.write_overlaps(path, end..end.saturating_add(d.len() as u64)) =>
            {
                end = end.saturating_add(d.len() as u64);
                total += d.len();
                true
            }
            _ => false,
        });
        if idxs.len() == 1 {
            return Plan::Send(idxs, self.queue[i].op.clone());
        }
        let mut merged = BytesMut::with_capacity(total);
        for &j in &idxs {
            merged.extend_from_slice(self.queue[j].op.data());
        }
        Plan::Send(idxs, Op::Write { path: path.clone(), offset, data: merged.freeze(), cond })
    }

    fn plan_put(&self, i: usize, path: &Bytes, mode: u32, flush_upto: Seq) -> Plan {
        let max = self.config.put_max as u64;
        let mut content: Vec<u8> = Vec::new();
        let mut mode = mode & 0o7777;
        let mut atime = None;
        let mut mtime = None;
        let (idxs, ended) = self.follow(i, path, |op| match op {
            Op::Write { offset, data, cond: None, .. }
                if offset.checked_add(data.len() as u64).is_some_and(|end| end <= max) =>
            {
                let (start, end) = (*offset as usize, *offset as usize + data.len());
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[start..end].copy_from_slice(data);
                mtime = None;
                true
            }
            Op::Truncate { size, cond: None, .. } if *size <= max => {
                content.resize(*size as usize, 0);
                mtime = None;
                true
            }
            Op::SetAttr { mode: m, uid: None, gid: None, atime: a, mtime: mt, .. } => {
                if let Some(m) = m {
                    mode = m & 0o7777;
                }
                for (t, set) in [(&mut atime, a), (&mut mtime, mt)] {
                    match set {
                        TimeSet::Omit => {}
                        TimeSet::Now => *t = None,
                        TimeSet::At(ts) => *t = Some(*ts),
                    }
                }
                true
            }
            _ => false,
        });
        let slot = &self.queue[i];
        let delay = self.config.coalesce_delay;
        let hold_until = slot.seen + delay;
        if !ended
            && !delay.is_zero()
            && slot.seq > flush_upto
            && self.queue.len() < self.config.lookahead
            && Instant::now() < hold_until
        {
            return Plan::Hold(hold_until);
        }
        let op = Op::Put {
            path: path.clone(),
            mode,
            exclusive: true,
            data: Bytes::from(content),
            atime,
            mtime,
            cond: None,
        };
        Plan::Send(idxs, op)
    }

    fn start(&mut self, idxs: Vec<usize>, op: Op) {
        let id = self.next_req;
        self.next_req += 1;
        let mut seqs = Vec::with_capacity(idxs.len());
        let mut maybe_applied = false;
        for j in idxs {
            let s = &mut self.queue[j];
            s.req = Some(id);
            seqs.push(s.seq);
            maybe_applied |= s.maybe_applied;
        }
        let bytes = op.data().len() as u64;
        self.reqs.insert(id, Req { seqs, op, bytes, maybe_applied, state: ReqState::Parked });
        self.launch(id);
    }

    fn launch(&mut self, id: ReqId) {
        let Some(remote) = self.remote.clone() else { return };
        let req = self.reqs.get_mut(&id).expect("launching a known request");
        req.state = ReqState::Running;
        self.inflight_bytes += req.bytes;
        let newest = req.seqs.iter().copied().max().expect("a request has ops");
        self.journal.note_sent(newest);
        let op = req.op.clone();
        let handle = self.running.spawn(async move { (id, remote.apply(&op).await) });
        self.running_ids.insert(handle.id(), id);
    }

    fn finished(
        &mut self,
        res: Result<(tokio::task::Id, (ReqId, Result<(), RemoteError>)), tokio::task::JoinError>,
    ) {
        match res {
            Ok((task, (id, outcome))) => {
                self.running_ids.remove(&task);
                if let Some(req) = self.reqs.get(&id) {
                    self.inflight_bytes -= req.bytes;
                    self.outcome(id, outcome);
                }
            }
            Err(e) => {
                let Some(id) = self.running_ids.remove(&e.id()) else { return };
                tracing::error!(
                    "journal sender: applying an op panicked; pausing until the next resume: {e}"
                );
                if let Some(req) = self.reqs.get_mut(&id) {
                    self.inflight_bytes -= req.bytes;
                    req.state = ReqState::Parked;
                    req.maybe_applied = true;
                }
                self.pause();
            }
        }
    }

    fn outcome(&mut self, id: ReqId, outcome: Result<(), RemoteError>) {
        let req = self.reqs.get_mut(&id).expect("outcome of a known request");
        match outcome {
            Ok(()) => self.complete(id),
            Err(RemoteError::Rejected { errno, message }) => {
                if req.maybe_applied
                    && matches!(req.op, Op::Put { exclusive: true, .. })
                    && errno == libc::EEXIST
                {
                    self.conflict(id);
                } else if req.maybe_applied && already_done(&req.op, errno) {
                    tracing::debug!(
                        "journal: {} was applied before the connection dropped",
                        req.op.describe()
                    );
                    self.complete(id);
                } else {
                    self.reject(id, errno, &message);
                }
            }
            Err(RemoteError::Conflict) => self.conflict(id),
            Err(RemoteError::Disconnected) => {
                req.state = ReqState::Parked;
                req.maybe_applied = true;
                self.pause();
            }
        }
    }

    fn pause(&mut self) {
        if self.remote.take().is_some() {
            tracing::info!("journal sender: connection lost; pausing");
        }
        self.shared.paused.store(true, Ordering::Relaxed);
    }

    fn resume(&mut self, remote: Arc<R>) {
        // Dropping the old set cancels whatever still waits on the old connection.
        self.running = JoinSet::new();
        self.running_ids.clear();
        self.inflight_bytes = 0;
        let mut parked: Vec<(Seq, ReqId)> = Vec::new();
        for (&id, req) in &mut self.reqs {
            if req.state == ReqState::Running {
                req.state = ReqState::Parked;
                req.maybe_applied = true;
            }
            if req.state == ReqState::Parked {
                parked.push((req.seqs[0], id));
            }
        }
        parked.sort_unstable();
        self.remote = Some(remote);
        self.shared.paused.store(false, Ordering::Relaxed);
        tracing::info!("journal sender: resuming with {} request(s) to re-send", parked.len());
        for (_, id) in parked {
            let req = &self.reqs[&id];
            let exchange = matches!(req.op, Op::Rename { flags, .. } if flags & rename_flags::EXCHANGE != 0);
            if exchange && req.maybe_applied {
                self.reject(
                    id,
                    libc::EIO,
                    "the connection dropped while this exchange was in flight, and repeating it could \
                     swap the two names back; it was not repeated: check both names",
                );
            } else {
                self.launch(id);
            }
        }
    }

    fn complete(&mut self, id: ReqId) {
        let req = self.reqs.remove(&id).expect("completing a known request");
        if let Err(e) = self.journal.ack(&req.seqs) {
            tracing::warn!("journal: cannot record acknowledgement of {:?}: {e}", req.seqs);
        }
        self.mark_done(&req.seqs);
    }

    fn reject(&mut self, id: ReqId, errno: i32, message: &str) {
        let req = self.reqs.get_mut(&id).expect("rejecting a known request");
        match self.journal.reject_ops(&req.seqs, &req.op, errno, message) {
            Ok(kept) => {
                tracing::warn!(
                    "{} failed on the server: {message}; kept in {}",
                    req.op.describe(),
                    kept.display()
                );
                let req = self.reqs.remove(&id).expect("known request");
                self.mark_done(&req.seqs);
            }
            Err(e) => {
                tracing::error!(
                    "{} failed on the server ({message}), and cannot be kept in the rejected folder: {e}; \
                     it stays in the journal and is retried after the next reconnect",
                    req.op.describe()
                );
                req.state = ReqState::Parked;
            }
        }
    }

    fn conflict(&mut self, id: ReqId) {
        let req = self.reqs.get_mut(&id).expect("conflict of a known request");
        req.state = ReqState::Resolving;
        let (reply, answer) = oneshot::channel();
        let event =
            Conflict { seqs: req.seqs.clone(), op: req.op.clone(), maybe_applied: req.maybe_applied, reply };
        let conflicts = self.conflicts.clone();
        self.resolving.spawn(async move {
            let unresolved = Resolution::Reject {
                errno: libc::ESTALE,
                message: "the file changed on the server, and no conflict handler took the change".into(),
            };
            if conflicts.send(event).await.is_err() {
                return (id, unresolved);
            }
            (id, answer.await.unwrap_or(unresolved))
        });
    }

    fn resolved(&mut self, id: ReqId, resolution: Resolution) {
        let Some(req) = self.reqs.get_mut(&id) else { return };
        match resolution {
            Resolution::Retry(op) => {
                req.bytes = op.data().len() as u64;
                req.op = op;
                req.maybe_applied = false;
                req.state = ReqState::Parked;
                self.launch(id);
            }
            Resolution::Done => self.complete(id),
            Resolution::Reject { errno, message } => self.reject(id, errno, &message),
        }
    }

    fn mark_done(&mut self, seqs: &[Seq]) {
        for seq in seqs {
            if let Ok(i) = self.queue.binary_search_by_key(seq, |s| s.seq) {
                self.queue[i].done = true;
            }
        }
    }
}

/// Whether an error on a maybe-applied op means the first attempt did it.
fn already_done(op: &Op, errno: i32) -> bool {
    match op {
        Op::Create { exclusive: true, .. }
        | Op::Mkdir { .. }
        | Op::Mknod { .. }
        | Op::Symlink { .. }
        | Op::Link { .. } => errno == libc::EEXIST,
        Op::Unlink { .. } | Op::Rmdir { .. } => errno == libc::ENOENT,
        Op::Rename { flags, .. } => {
            flags & rename_flags::EXCHANGE == 0
                && (errno == libc::ENOENT || (flags & rename_flags::NOREPLACE != 0 && errno == libc::EEXIST))
        }
        _ => false,
    }
}

/// The range of a write that may be in flight together with other plain writes to its file.
fn pipelined_range(op: &Op) -> Option<Range<u64>> {
    match op {
        Op::Write { offset, data, cond: None, .. } => Some(*offset..offset.saturating_add(data.len() as u64)),
        _ => None,
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The paths of unresolved ops seen so far in a walk of the queue.
#[derive(Default)]
struct Blocks {
    /// Each op on the path: `Some(range)` for a plain write, which only blocks overlapping
    /// plain writes; `None` blocks everything.
    exact: HashMap<Bytes, Vec<Option<Range<u64>>>>,
    /// Paths with an unresolved op somewhere below them.
    below: HashMap<Bytes, u32>,
}

impl Blocks {
    fn add(&mut self, op: &Op) {
        let range = pipelined_range(op);
        for p in op.paths() {
            self.exact.entry(p.clone()).or_default().push(range.clone());
            for a in ancestors(p) {
                *self.below.entry(a).or_default() += 1;
            }
        }
    }

    fn blocks(&self, op: &Op) -> bool {
        let range = pipelined_range(op);
        op.paths().any(|p| {
            let same = self.exact.get(p).is_some_and(|v| match &range {
                Some(r) => v.iter().any(|b| b.as_ref().is_none_or(|b| overlaps(b, r))),
                None => true,
            });
            same || self.below.contains_key(p) || ancestors(p).any(|a| self.exact.contains_key(&a))
        })
    }

    /// Whether extending a plain write on `path` by `range` would overlap an op in the way.
    fn write_overlaps(&self, path: &Bytes, range: Range<u64>) -> bool {
        self.exact.get(path).is_some_and(|v| v.iter().any(|b| b.as_ref().is_none_or(|b| overlaps(b, &range))))
    }
}
