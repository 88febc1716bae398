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
    /// Ops loaded from the journal ahead of the first unresolved one: how far disjoint ops may
    /// overtake a waiting one, and how far coalescing looks. Each event walks them, so keep it a
    /// few windows long.
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
            lookahead: 256,
            lookahead_bytes: 32 << 20,
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
    /// What the requests are doing, as of the task's last turn.
    activity: Mutex<Activity>,
}

/// Where the sender's requests are (`devmount status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Sent and not answered yet.
    pub in_flight: usize,
    /// Waiting for a connection.
    pub parked: usize,
    /// Refused as a conflict, waiting for the conflict copy to be made.
    pub resolving: usize,
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
            activity: Mutex::new(Activity::default()),
        });
        let task = Task {
            journal: journal.clone(),
            appended: journal.subscribe_appended(),
            config,
            shared: shared.clone(),
            remote,
            queue: VecDeque::new(),
            blocks: Blocks::default(),
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

    pub fn activity(&self) -> Activity {
        *self.shared.activity.lock().expect("sender activity lock poisoned")
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

    /// Stops sending and waits until the sending task is gone (its journal handle with it).
    /// Whatever was not acknowledged stays in the journal.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// The whole mount's barrier (`devmount sync`, exec): waits for every op appended before
    /// the call, and reports whether any op failed since the previous one.
    pub async fn barrier(&self) -> Result<(), BarrierError> {
        self.wait(self.journal.last_seq()).await;
        self.journal.take_failures().map_or(Ok(()), |(failed, first)| Err(BarrierError { failed, first }))
    }
}

type ReqId = u64;

/// What a request's task returns.
type Outcome = (ReqId, Result<(), RemoteError>);

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
    keys: Vec<PathKey>,
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
    blocks: Blocks,
    queue_bytes: u64,
    loaded_upto: Seq,
    reqs: HashMap<ReqId, Req>,
    next_req: ReqId,
    running: JoinSet<Outcome>,
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
            self.publish_activity();
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

    fn publish_activity(&self) {
        let mut activity = Activity::default();
        for req in self.reqs.values() {
            match req.state {
                ReqState::Running => activity.in_flight += 1,
                ReqState::Parked => activity.parked += 1,
                ReqState::Resolving => activity.resolving += 1,
            }
        }
        *self.shared.activity.lock().expect("sender activity lock poisoned") = activity;
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
                    keys: PathKey::of(&op),
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
        // With the window full nothing can start, and a request's end calls this again: no
        // walk of the queue then (it is most of the sender's work under a burst).
        if self.remote.is_none() || !self.has_capacity() {
            return None;
        }
        let flush_upto = self.shared.control.lock().expect("sender control lock poisoned").flush_upto;
        let mut blocks = std::mem::take(&mut self.blocks);
        blocks.clear();
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
                blocks.add(slot);
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
            if blocks.blocks(slot) {
                blocks.add(slot);
                all_before_done = false;
                continue;
            }
            if !self.has_capacity() {
                break;
            }
            match self.plan(i, &blocks, flush_upto, all_before_done) {
                Plan::Hold(t) => hold = Some(hold.map_or(t, |h| h.min(t))),
                Plan::Send(idxs, op) => self.start(idxs, op),
            }
            blocks.add(&self.queue[i]);
            all_before_done = false;
        }
        self.blocks = blocks;
        hold
    }

    /// `settled`: every op before `i` is done.
    fn plan(&self, i: usize, blocks: &Blocks, flush_upto: Seq, settled: bool) -> Plan {
        let slot = &self.queue[i];
        if slot.maybe_applied {
            return Plan::Send(vec![i], slot.op.clone());
        }
        match &slot.op {
            Op::Create { path, mode, exclusive: true } if self.config.put_max > 0 => {
                self.plan_put(i, path, *mode, flush_upto, settled)
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
    /// indices and the op that ended the run (`None`: it ran off the queue's end).
    fn follow(
        &self,
        i: usize,
        path: &Bytes,
        mut join: impl FnMut(&Op) -> bool,
    ) -> (Vec<usize>, Option<usize>) {
        let mut idxs = vec![i];
        for j in i + 1..self.queue.len() {
            let s = &self.queue[j];
            if s.done {
                continue;
            }
            if s.op.is_barrier() {
                return (idxs, Some(j));
            }
            if !s.op.paths().any(|p| related(p, path)) {
                continue;
            }
            if s.req.is_some() || s.maybe_applied || !s.op.paths().all(|p| p == path) || !join(&s.op) {
                return (idxs, Some(j));
            }
            idxs.push(j);
        }
        (idxs, None)
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
        let key = self.queue[i].keys[0].path;
        let mut end = offset.saturating_add(data.len() as u64);
        let mut total = data.len();
        let (idxs, _) = self.follow(i, path, |op| match op {
            Op::Write { offset: o, data: d, cond: None, .. }
                if *o == end
                    && total + d.len() <= max
                    && !blocks.write_overlaps(key, end..end.saturating_add(d.len() as u64)) =>
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

    /// A new file's create with the writes, truncates and setattrs that follow it, as one put;
    /// an fsync of the file right after joins it when nothing else before the fsync is left
    /// (its barrier then holds), so an editor's save costs one round trip.
    fn plan_put(&self, i: usize, path: &Bytes, mode: u32, flush_upto: Seq, settled: bool) -> Plan {
        let max = self.config.put_max as u64;
        let mut content: Vec<u8> = Vec::new();
        let mut mode = mode & 0o7777;
        let mut atime = None;
        let mut mtime = None;
        let (mut idxs, ended) = self.follow(i, path, |op| match op {
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
        let fsync = ended.filter(|&j| {
            let s = &self.queue[j];
            settled
                && matches!(&s.op, Op::Fsync { path: p } if p == path)
                && s.req.is_none()
                && !s.maybe_applied
                && (i..j).all(|k| self.queue[k].done || idxs.contains(&k))
        });
        if let Some(j) = fsync {
            idxs.push(j);
        }
        let slot = &self.queue[i];
        let delay = self.config.coalesce_delay;
        let hold_until = slot.seen + delay;
        if ended.is_none()
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
            fsync: fsync.is_some(),
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

    fn finished(&mut self, res: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
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

/// One path of an op as keys for [`Blocks`]: a hash of the path and of each of its ancestors,
/// made once when the op is loaded, so that the walk of the queue at every event hashes no
/// path (with an untar's deep paths, rehashing every ancestor of every queued op at every
/// event was a third of the daemon's time). Two paths with one hash only hold an op back
/// needlessly: related paths always share a key, so no op ever goes early.
struct PathKey {
    path: u64,
    ancestors: Vec<u64>,
}

impl PathKey {
    fn of(op: &Op) -> Vec<PathKey> {
        op.paths()
            .map(|p| PathKey { path: path_hash(p), ancestors: ancestors(p).map(|a| path_hash(&a)).collect() })
            .collect()
    }
}

fn path_hash(p: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one(p)
}

/// The paths of unresolved ops seen so far in a walk of the queue, by [`PathKey`]; kept
/// between walks for its allocations.
#[derive(Default)]
struct Blocks {
    /// Each op on the path: `Some(range)` for a plain write, which only blocks overlapping
    /// plain writes; `None` blocks everything.
    exact: foldhash::HashMap<u64, Vec<Option<Range<u64>>>>,
    /// Paths with an unresolved op somewhere below them.
    below: foldhash::HashSet<u64>,
}

impl Blocks {
    fn clear(&mut self) {
        self.exact.clear();
        self.below.clear();
    }

    fn add(&mut self, slot: &Slot) {
        let range = pipelined_range(&slot.op);
        for k in &slot.keys {
            self.exact.entry(k.path).or_default().push(range.clone());
            self.below.extend(k.ancestors.iter().copied());
        }
    }

    fn blocks(&self, slot: &Slot) -> bool {
        let range = pipelined_range(&slot.op);
        slot.keys.iter().any(|k| {
            let same = self.exact.get(&k.path).is_some_and(|v| match &range {
                Some(r) => v.iter().any(|b| b.as_ref().is_none_or(|b| overlaps(b, r))),
                None => true,
            });
            same || self.below.contains(&k.path) || k.ancestors.iter().any(|a| self.exact.contains_key(a))
        })
    }

    /// Whether extending a plain write on the path of `key` by `range` would overlap an op in
    /// the way.
    fn write_overlaps(&self, key: u64, range: Range<u64>) -> bool {
        self.exact.get(&key).is_some_and(|v| v.iter().any(|b| b.as_ref().is_none_or(|b| overlaps(b, &range))))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use devmount_server::proto::stat::Timespec;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
    use tokio::time::timeout;

    use super::*;
    use crate::journal::Config;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn write(path: &str, offset: u64, data: &str) -> Op {
        Op::Write { path: b(path), offset, data: b(data), cond: None }
    }

    fn create(path: &str) -> Op {
        Op::Create { path: b(path), mode: 0o100644, exclusive: true }
    }

    /// No coalescing delay, so each test decides what travels together.
    fn config() -> SenderConfig {
        SenderConfig { coalesce_delay: Duration::ZERO, ..SenderConfig::default() }
    }

    fn journal(state: &Path) -> Journal {
        let config = Config { commit_interval: Duration::from_secs(3600), ..Config::default() };
        Journal::open(state, "test@host:22/root", config).unwrap().0
    }

    /// A call the test completes by hand.
    struct Call {
        op: Op,
        reply: oneshot::Sender<Result<(), RemoteError>>,
    }

    impl Call {
        fn ok(self) {
            let _ = self.reply.send(Ok(()));
        }

        fn fail(self, e: RemoteError) {
            let _ = self.reply.send(Err(e));
        }
    }

    /// A remote whose calls wait for the test; a call whose `Call` is dropped is a lost
    /// connection.
    struct Manual(UnboundedSender<Call>);

    impl Remote for Manual {
        fn apply(&self, op: &Op) -> impl Future<Output = Result<(), RemoteError>> + Send {
            let (reply, answer) = oneshot::channel();
            let _ = self.0.send(Call { op: op.clone(), reply });
            async move { answer.await.unwrap_or(Err(RemoteError::Disconnected)) }
        }
    }

    fn manual() -> (Arc<Manual>, UnboundedReceiver<Call>) {
        let (tx, rx) = unbounded_channel();
        (Arc::new(Manual(tx)), rx)
    }

    // The clock is paused in these tests, so a timeout fires only when every task is idle:
    // `nothing_more` proves the sender has nothing to start, without sleeping and hoping.

    async fn next(calls: &mut UnboundedReceiver<Call>) -> Call {
        timeout(Duration::from_secs(10), calls.recv())
            .await
            .expect("timed out waiting for a call")
            .expect("remote alive")
    }

    async fn next_ops(calls: &mut UnboundedReceiver<Call>, n: usize) -> Vec<Call> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(next(calls).await);
        }
        v
    }

    async fn nothing_more(calls: &mut UnboundedReceiver<Call>) {
        if let Ok(Some(call)) = timeout(Duration::from_secs(1), calls.recv()).await {
            panic!("unexpected call: {:?}", call.op);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn disjoint_ops_overlap_and_same_path_ops_keep_their_order() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        j.append(write("a", 0, "1")).unwrap();
        j.append(write("a", 0, "2")).unwrap();
        j.append(write("b", 0, "3")).unwrap();
        j.append(Op::Mkdir { path: b("a/sub"), mode: 0o755 }).unwrap();
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote), config());
        let first = next_ops(&mut calls, 2).await;
        assert_eq!(
            first.iter().map(|c| c.op.clone()).collect::<Vec<_>>(),
            vec![write("a", 0, "1"), write("b", 0, "3")]
        );
        nothing_more(&mut calls).await;
        let mut first = first.into_iter();
        first.next().unwrap().ok();
        let second = next(&mut calls).await;
        assert_eq!(second.op, write("a", 0, "2"));
        nothing_more(&mut calls).await;
        second.ok();
        // Below a path counts as the same path.
        let third = next(&mut calls).await;
        assert_eq!(third.op, Op::Mkdir { path: b("a/sub"), mode: 0o755 });
        third.ok();
        first.next().unwrap().ok();
        timeout(Duration::from_secs(10), sender.wait(4)).await.unwrap();
        assert_eq!(j.stats().pending_ops, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn plain_writes_to_one_file_pipeline_unless_they_overlap() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        j.append(write("f", 0, "aaaa")).unwrap();
        j.append(write("f", 8, "bbbb")).unwrap();
        j.append(write("f", 2, "cccccccc")).unwrap();
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote), config());
        let both = next_ops(&mut calls, 2).await;
        assert_eq!(both[1].op, write("f", 8, "bbbb"));
        nothing_more(&mut calls).await;
        for c in both {
            c.ok();
        }
        next(&mut calls).await.ok();
        timeout(Duration::from_secs(10), sender.wait(3)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn barriers_wait_for_all_earlier_acks_and_hold_back_later_ops() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        j.append(write("objects/1", 0, "blob")).unwrap();
        j.append(Op::Rename { from: b("ref.lock"), to: b("ref"), flags: 0, cond: None }).unwrap();
        j.append(write("unrelated", 0, "x")).unwrap();
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote), config());
        let obj = next(&mut calls).await;
        assert_eq!(obj.op, write("objects/1", 0, "blob"));
        nothing_more(&mut calls).await;
        obj.ok();
        let rename = next(&mut calls).await;
        assert!(matches!(rename.op, Op::Rename { .. }));
        nothing_more(&mut calls).await;
        rename.ok();
        next(&mut calls).await.ok();
        timeout(Duration::from_secs(10), sender.wait(3)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn barrier_waits_for_acks_and_reports_failures_per_file_and_per_mount() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote), config());
        let sender = Arc::new(sender);
        j.append(write("a", 0, "data")).unwrap();
        j.append(write("b", 0, "more")).unwrap();
        let fsync = j.append(Op::Fsync { path: b("b") }).unwrap();
        let barrier = tokio::spawn({
            let sender = sender.clone();
            async move { sender.barrier().await }
        });
        let mut two = next_ops(&mut calls, 2).await.into_iter();
        two.next().unwrap().ok();
        let b_write = two.next().unwrap();
        assert_eq!(b_write.op, write("b", 0, "more"));
        b_write
            .fail(RemoteError::Rejected { errno: libc::ENOSPC, message: "No space left on device".into() });
        let fsync_call = next(&mut calls).await;
        assert_eq!(fsync_call.op, Op::Fsync { path: b("b") });
        assert!(!barrier.is_finished());
        fsync_call.ok();
        let err = timeout(Duration::from_secs(10), barrier).await.unwrap().unwrap().unwrap_err();
        assert_eq!(err.failed, 1);
        assert_eq!(err.first.errno, libc::ENOSPC);
        assert!(err.first.kept.exists());
        let per_file = sender.wait_path(fsync, b"b").await.unwrap_err();
        assert_eq!(per_file, err.first);
        assert_eq!(sender.wait_path(fsync, b"b").await, Ok(()), "reported once");
        assert_eq!(sender.barrier().await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_small_file_goes_as_one_put() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let t = Timespec { sec: 1_600_000_000, nsec: 7 };
        j.append(create("n")).unwrap();
        j.append(write("n", 0, "hello ")).unwrap();
        j.append(write("other", 0, "x")).unwrap();
        j.append(write("n", 6, "world")).unwrap();
        let setattr = Op::SetAttr {
            path: b("n"),
            mode: Some(0o600),
            uid: None,
            gid: None,
            atime: TimeSet::Omit,
            mtime: TimeSet::At(t),
        };
        j.append(setattr).unwrap();
        j.append(create("m")).unwrap();
        j.append(write("m", 0, "mm")).unwrap();
        j.append(Op::SetAttr {
            path: b("m"),
            mode: None,
            uid: Some(7),
            gid: None,
            atime: TimeSet::Omit,
            mtime: TimeSet::Omit,
        })
        .unwrap();
        // Paused until resumed, so the whole run is in the journal when sending starts.
        let (remote, mut calls) = manual();
        let (sender, _conflicts) = Sender::start(j.clone(), None, config());
        assert!(sender.is_paused());
        sender.resume(remote);
        let got: Vec<Op> = next_ops(&mut calls, 3)
            .await
            .into_iter()
            .map(|c| {
                let op = c.op.clone();
                c.ok();
                op
            })
            .collect();
        let put = |path: &str, mode, data: &str, mtime| Op::Put {
            path: b(path),
            mode,
            exclusive: true,
            fsync: false,
            data: b(data),
            atime: None,
            mtime,
            cond: None,
        };
        assert_eq!(
            got,
            vec![
                put("n", 0o600, "hello world", Some(t)),
                write("other", 0, "x"),
                put("m", 0o644, "mm", None)
            ]
        );
        // An ownership change cannot ride in a put: it follows on its own.
        let chown = next(&mut calls).await;
        assert!(matches!(chown.op, Op::SetAttr { uid: Some(7), .. }));
        chown.ok();
        timeout(Duration::from_secs(10), sender.wait(8)).await.unwrap();
        assert_eq!(j.stats().pending_ops, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_create_waits_briefly_for_its_data_unless_a_barrier_asks_for_it() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        let config = SenderConfig { coalesce_delay: Duration::from_millis(5), ..SenderConfig::default() };
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote.clone()), config);
        j.append(create("f")).unwrap();
        tokio::task::yield_now().await;
        j.append(write("f", 0, "data")).unwrap();
        let start = Instant::now();
        let put = next(&mut calls).await;
        assert!(matches!(&put.op, Op::Put { data, .. } if data == "data"), "{:?}", put.op);
        assert!(start.elapsed() >= Duration::from_millis(4));
        put.ok();
        timeout(Duration::from_secs(10), sender.wait(2)).await.unwrap();
        drop(sender);

        let config = SenderConfig { coalesce_delay: Duration::from_secs(3600), ..SenderConfig::default() };
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote), config);
        let seq = j.append(create("g")).unwrap();
        nothing_more(&mut calls).await;
        let sender = Arc::new(sender);
        let waiter = tokio::spawn({
            let sender = sender.clone();
            async move { sender.wait(seq).await }
        });
        let put = next(&mut calls).await;
        assert!(matches!(&put.op, Op::Put { path, .. } if path == "g"));
        put.ok();
        timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
    }

    /// An editor's save: the rename of the last save, then create, write and fsync of the
    /// temporary file. The fsync rides in the put once the rename is done; an unrelated op still
    /// on its way keeps it apart, as the fsync waits for everything before it.
    #[tokio::test(start_paused = true)]
    async fn an_fsync_right_after_a_new_file_rides_in_its_put() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        let (sender, _conflicts) = Sender::start(j.clone(), Some(remote), config());
        j.append(Op::Rename { from: b("f.tmp"), to: b("f"), flags: 0, cond: None }).unwrap();
        j.append(create("f.tmp")).unwrap();
        j.append(write("f.tmp", 0, "saved")).unwrap();
        let fsync = j.append(Op::Fsync { path: b("f.tmp") }).unwrap();
        let rename = next(&mut calls).await;
        assert!(matches!(rename.op, Op::Rename { .. }), "{:?}", rename.op);
        nothing_more(&mut calls).await;
        rename.ok();
        let put = next(&mut calls).await;
        assert!(
            matches!(&put.op, Op::Put { path, data, fsync: true, .. } if path == "f.tmp" && data == "saved"),
            "{:?}",
            put.op
        );
        put.ok();
        timeout(Duration::from_secs(10), sender.wait(fsync)).await.unwrap();
        assert_eq!(j.stats().pending_ops, 0);

        j.append(write("elsewhere", 0, "x")).unwrap();
        j.append(create("g")).unwrap();
        let fsync = j.append(Op::Fsync { path: b("g") }).unwrap();
        let mut first = next_ops(&mut calls, 2).await;
        assert!(first.iter().any(|c| matches!(&c.op, Op::Put { path, fsync: false, .. } if path == "g")));
        nothing_more(&mut calls).await;
        for c in first.drain(..) {
            c.ok();
        }
        let alone = next(&mut calls).await;
        assert_eq!(alone.op, Op::Fsync { path: b("g") });
        alone.ok();
        timeout(Duration::from_secs(10), sender.wait(fsync)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn adjacent_writes_merge_up_to_the_limit() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let cond =
            Some(devmount_server::proto::sftp::Condition { size: 1, mtime: Timespec::default(), ino: 2 });
        j.append(Op::Write { path: b("a"), offset: 0, data: b("ab"), cond }).unwrap();
        j.append(write("a", 2, "cd")).unwrap();
        j.append(write("b", 0, "x")).unwrap();
        j.append(write("a", 4, "ef")).unwrap();
        j.append(write("a", 6, "gh")).unwrap();
        let (remote, mut calls) = manual();
        let (sender, _conflicts) = Sender::start(j.clone(), None, SenderConfig { max_write: 4, ..config() });
        sender.resume(remote);
        let calls_now = next_ops(&mut calls, 2).await;
        assert_eq!(calls_now[0].op, Op::Write { path: b("a"), offset: 0, data: b("abcd"), cond });
        assert_eq!(calls_now[1].op, write("b", 0, "x"));
        nothing_more(&mut calls).await;
        for c in calls_now {
            c.ok();
        }
        let rest = next(&mut calls).await;
        assert_eq!(rest.op, write("a", 4, "efgh"));
        rest.ok();
        timeout(Duration::from_secs(10), sender.wait(5)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflict_goes_to_the_handler_and_keeps_its_place() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let cond =
            Some(devmount_server::proto::sftp::Condition { size: 1, mtime: Timespec::default(), ino: 2 });
        let conditional = Op::Write { path: b("a"), offset: 0, data: b("mine"), cond };
        j.append(conditional.clone()).unwrap();
        j.append(write("a", 100, "later")).unwrap();
        j.append(write("c", 0, "conflicted")).unwrap();
        let (remote, mut calls) = manual();
        let (sender, mut conflicts) = Sender::start(j.clone(), Some(remote), config());
        let two = next_ops(&mut calls, 2).await;
        assert_eq!(two[0].op, conditional);
        let mut two = two.into_iter();
        two.next().unwrap().fail(RemoteError::Conflict);
        let c = timeout(Duration::from_secs(10), conflicts.recv()).await.unwrap().unwrap();
        assert_eq!((c.seqs.clone(), c.op.clone(), c.maybe_applied), (vec![1], conditional, false));
        nothing_more(&mut calls).await;
        c.resolve(Resolution::Retry(write("a", 0, "mine")));
        next(&mut calls).await.ok();
        next(&mut calls).await.ok();
        // A conflict nobody resolves is kept in the rejected folder, never dropped.
        two.next().unwrap().fail(RemoteError::Conflict);
        drop(timeout(Duration::from_secs(10), conflicts.recv()).await.unwrap().unwrap());
        let err = timeout(Duration::from_secs(10), sender.barrier()).await.unwrap().unwrap_err();
        assert_eq!(err.first.errno, libc::ESTALE);
        assert!(fs_contains(&err.first.kept, "conflicted"));
    }

    fn fs_contains(note: &Path, what: &str) -> bool {
        let dir = note.parent().unwrap();
        std::fs::read_dir(dir).unwrap().any(|e| std::fs::read(e.unwrap().path()).unwrap() == what.as_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn replays_after_a_lost_connection_tolerate_what_already_happened() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        let (sender, mut conflicts) =
            Sender::start(j.clone(), Some(remote), SenderConfig { put_max: 0, ..config() });
        j.append(create("x")).unwrap();
        j.append(Op::Mkdir { path: b("d"), mode: 0o755 }).unwrap();
        let lost = next_ops(&mut calls, 2).await;
        assert_eq!(sender.activity(), Activity { in_flight: 2, parked: 0, resolving: 0 });
        drop(lost);
        timeout(Duration::from_secs(10), async {
            while sender.activity().parked < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(sender.is_paused());
        let (remote, mut calls) = manual();
        sender.resume(remote);
        for c in next_ops(&mut calls, 2).await {
            c.fail(RemoteError::Rejected { errno: libc::EEXIST, message: "File exists".into() });
        }
        assert_eq!(timeout(Duration::from_secs(10), sender.barrier()).await.unwrap(), Ok(()));
        // A create that never went out and finds the name taken is a real error.
        j.append(create("y")).unwrap();
        next(&mut calls)
            .await
            .fail(RemoteError::Rejected { errno: libc::EEXIST, message: "File exists".into() });
        let err = timeout(Duration::from_secs(10), sender.barrier()).await.unwrap().unwrap_err();
        assert_eq!(err.first.errno, libc::EEXIST);
        assert!(conflicts.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_maybe_applied_put_or_exchange_is_never_taken_for_granted() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        let (remote, mut calls) = manual();
        let (sender, mut conflicts) = Sender::start(j.clone(), None, config());
        j.append(create("p")).unwrap();
        j.append(write("p", 0, "content")).unwrap();
        j.append(Op::Rename { from: b("s"), to: b("t"), flags: rename_flags::EXCHANGE, cond: None }).unwrap();
        sender.resume(remote);
        drop(next(&mut calls).await);
        let (remote, mut calls) = manual();
        sender.resume(remote);
        next(&mut calls)
            .await
            .fail(RemoteError::Rejected { errno: libc::EEXIST, message: "File exists".into() });
        let c = timeout(Duration::from_secs(10), conflicts.recv()).await.unwrap().unwrap();
        assert!(c.maybe_applied && matches!(&c.op, Op::Put { data, .. } if data == "content"));
        c.resolve(Resolution::Done);
        let exchange = next(&mut calls).await;
        assert!(matches!(exchange.op, Op::Rename { .. }));
        drop(exchange);
        let (remote, mut calls) = manual();
        sender.resume(remote);
        let err = timeout(Duration::from_secs(10), sender.barrier()).await.unwrap().unwrap_err();
        assert!(err.first.message.contains("exchange"), "{}", err.first);
        nothing_more(&mut calls).await;
    }

    /// A file tree that applies ops the way a server would, for end-to-end checks.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    struct Tree(BTreeMap<Bytes, Node>);

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Node {
        Dir,
        File(Vec<u8>, u32),
        Symlink(Bytes),
    }

    impl Tree {
        fn parent_is_dir(&self, p: &[u8]) -> bool {
            match p.iter().rposition(|&c| c == b'/') {
                None => true,
                Some(i) => matches!(self.0.get(&p[..i]), Some(Node::Dir)),
            }
        }

        fn file(&mut self, p: &Bytes) -> Result<&mut Vec<u8>, i32> {
            match self.0.get_mut(p) {
                Some(Node::File(data, _)) => Ok(data),
                _ => Err(libc::ENOENT),
            }
        }

        fn new_name(&mut self, p: &Bytes, node: Node) -> Result<(), i32> {
            if !self.parent_is_dir(p) {
                return Err(libc::ENOENT);
            }
            if self.0.contains_key(p) {
                return Err(libc::EEXIST);
            }
            self.0.insert(p.clone(), node);
            Ok(())
        }

        fn apply(&mut self, op: &Op) -> Result<(), i32> {
            match op {
                Op::Create { path, mode, exclusive } => {
                    match self.new_name(path, Node::File(Vec::new(), mode & 0o7777)) {
                        Err(libc::EEXIST) if !exclusive => Ok(()),
                        r => r,
                    }
                }
                Op::Write { path, offset, data, .. } => {
                    let f = self.file(path)?;
                    let end = *offset as usize + data.len();
                    if f.len() < end {
                        f.resize(end, 0);
                    }
                    f[*offset as usize..end].copy_from_slice(data);
                    Ok(())
                }
                Op::Truncate { path, size, .. } => {
                    self.file(path)?.resize(*size as usize, 0);
                    Ok(())
                }
                Op::SetAttr { path, mode, .. } => match (self.0.get_mut(path), mode) {
                    (Some(Node::File(_, m)), Some(mode)) => {
                        *m = mode & 0o7777;
                        Ok(())
                    }
                    (Some(_), _) => Ok(()),
                    (None, _) => Err(libc::ENOENT),
                },
                Op::Mkdir { path, .. } => self.new_name(path, Node::Dir),
                Op::Mknod { path, mode, .. } => self.new_name(path, Node::File(Vec::new(), mode & 0o7777)),
                Op::Symlink { target, path } => self.new_name(path, Node::Symlink(target.clone())),
                Op::Link { from, to } => {
                    let node = self.0.get(from).cloned().ok_or(libc::ENOENT)?;
                    self.new_name(to, node)
                }
                Op::Unlink { path } => match self.0.get(path) {
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(_) => {
                        self.0.remove(path);
                        Ok(())
                    }
                    None => Err(libc::ENOENT),
                },
                Op::Rmdir { path } => match self.0.get(path) {
                    Some(Node::Dir) if self.0.keys().any(|k| super::super::op::is_ancestor(path, k)) => {
                        Err(libc::ENOTEMPTY)
                    }
                    Some(Node::Dir) => {
                        self.0.remove(path);
                        Ok(())
                    }
                    Some(_) => Err(libc::ENOTDIR),
                    None => Err(libc::ENOENT),
                },
                Op::Rename { from, to, flags, .. } => {
                    if !self.0.contains_key(from) {
                        return Err(libc::ENOENT);
                    }
                    if flags & rename_flags::NOREPLACE != 0 && self.0.contains_key(to) {
                        return Err(libc::EEXIST);
                    }
                    let moved: Vec<(Bytes, Node)> = self
                        .0
                        .iter()
                        .filter(|(k, _)| *k == from || super::super::op::is_ancestor(from, k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    for (k, _) in &moved {
                        self.0.remove(k);
                    }
                    self.0.remove(to);
                    for (k, v) in moved {
                        self.0.insert(Bytes::from([&to[..], &k[from.len()..]].concat()), v);
                    }
                    Ok(())
                }
                Op::Fsync { path } => self.0.get(path).map(|_| ()).ok_or(libc::ENOENT),
                Op::Put { path, mode, exclusive, data, .. } => {
                    if *exclusive && self.0.contains_key(path) {
                        return Err(libc::EEXIST);
                    }
                    if !self.parent_is_dir(path) {
                        return Err(libc::ENOENT);
                    }
                    self.0.insert(path.clone(), Node::File(data.to_vec(), mode & 0o7777));
                    Ok(())
                }
            }
        }
    }

    /// What a connection does once its budget of calls is spent.
    #[derive(Clone, Copy)]
    enum Death {
        /// Every later call fails; the first of them was applied, but its reply was lost.
        Drop,
        /// Every later call is applied and never answered: the client is killed meanwhile.
        Hang,
    }

    /// A connection to a shared model tree that works for `budget` calls, then dies.
    struct ModelRemote {
        tree: Arc<Mutex<Tree>>,
        /// Calls left, and whether the connection has died.
        budget: Mutex<(usize, bool)>,
        death: Death,
    }

    impl ModelRemote {
        fn new(tree: &Arc<Mutex<Tree>>, budget: usize, death: Death) -> Arc<ModelRemote> {
            Arc::new(ModelRemote { tree: tree.clone(), budget: Mutex::new((budget, false)), death })
        }
    }

    impl Remote for ModelRemote {
        fn apply(&self, op: &Op) -> impl Future<Output = Result<(), RemoteError>> + Send {
            let mut budget = self.budget.lock().unwrap();
            let mut tree = self.tree.lock().unwrap();
            let (left, dead) = &mut *budget;
            let outcome = if *left > 0 && !*dead {
                *left -= 1;
                Some(
                    tree.apply(op)
                        .map_err(|errno| RemoteError::Rejected { errno, message: format!("errno {errno}") }),
                )
            } else {
                let first_dead_call = !*dead;
                *dead = true;
                match self.death {
                    Death::Drop => {
                        if first_dead_call {
                            let _ = tree.apply(op);
                        }
                        Some(Err(RemoteError::Disconnected))
                    }
                    Death::Hang => {
                        let _ = tree.apply(op);
                        None
                    }
                }
            };
            async move {
                match outcome {
                    Some(r) => r,
                    None => std::future::pending().await,
                }
            }
        }
    }

    /// A mix of what builds and editors do: a directory of new small files, rewrites, a big
    /// file in many writes, renames over existing files, deletions.
    fn workload() -> Vec<Op> {
        let mut ops = vec![Op::Mkdir { path: b("d"), mode: 0o755 }, create("big")];
        for i in 0..24 {
            let f = format!("d/f{i}");
            ops.push(create(&f));
            ops.push(write(&f, 0, &format!("file {i} ")));
            ops.push(write(&f, 7 + (i >= 10) as u64, "tail"));
            if i % 3 == 0 {
                ops.push(Op::SetAttr {
                    path: b(&f),
                    mode: Some(0o600),
                    uid: None,
                    gid: None,
                    atime: TimeSet::Omit,
                    mtime: TimeSet::Now,
                });
            }
            ops.push(write("big", i * 100, &format!("{i:0>100}")));
            if i % 5 == 4 {
                ops.push(Op::Rename { from: b(&f), to: b(&format!("d/f{}", i - 1)), flags: 0, cond: None });
            }
            if i % 7 == 6 {
                ops.push(Op::Unlink { path: b(&f) });
            }
        }
        ops.push(Op::Truncate { path: b("big"), size: 1000, cond: None });
        ops.push(write("big", 1500, "end"));
        ops.push(Op::Mkdir { path: b("e"), mode: 0o755 });
        ops.push(Op::Symlink { target: b("../big"), path: b("e/link") });
        ops.push(Op::Rename { from: b("d"), to: b("e/d"), flags: 0, cond: None });
        ops.push(Op::Fsync { path: b("big") });
        ops
    }

    fn expected(ops: &[Op]) -> Tree {
        let mut t = Tree::default();
        for op in ops {
            t.apply(op).unwrap_or_else(|e| panic!("workload op {op:?} fails with {e}"));
        }
        t
    }

    /// The conflict policy for replays in these tests: a put that finds its file already there
    /// with the same content was ours.
    async fn same_content_is_done(tree: Arc<Mutex<Tree>>, mut conflicts: mpsc::Receiver<Conflict>) {
        while let Some(c) = conflicts.recv().await {
            let same = match &c.op {
                Op::Put { path, data, .. } => {
                    matches!(tree.lock().unwrap().0.get(path), Some(Node::File(d, _)) if d[..] == data[..])
                }
                _ => false,
            };
            assert!(c.maybe_applied && same, "unexpected conflict: {c:?}");
            c.resolve(Resolution::Done);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connection_drops_lose_nothing() {
        let ops = workload();
        for budget in [0, 1, 3, 10, 25] {
            let state = tempfile::tempdir().unwrap();
            let j = journal(state.path());
            let tree = Arc::new(Mutex::new(Tree::default()));
            let (sender, conflicts) =
                Sender::start(j.clone(), Some(ModelRemote::new(&tree, budget, Death::Drop)), config());
            let handler = tokio::spawn(same_content_is_done(tree.clone(), conflicts));
            for op in &ops {
                j.append(op.clone()).unwrap();
            }
            let mut reconnects = 0;
            for round in 0.. {
                assert!(round < 100_000, "no progress: {:?}", j.stats());
                if j.stats().pending_ops == 0 {
                    break;
                }
                if sender.is_paused() {
                    reconnects += 1;
                    sender.resume(ModelRemote::new(&tree, budget + reconnects, Death::Drop));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            handler.abort();
            assert_eq!(sender.barrier().await, Ok(()), "budget {budget}");
            assert_eq!(*tree.lock().unwrap(), expected(&ops), "budget {budget}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_killed_client_replays_its_journal_and_loses_nothing() {
        let ops = workload();
        for budget in [0, 2, 7, 30] {
            let state = tempfile::tempdir().unwrap();
            let tree = Arc::new(Mutex::new(Tree::default()));
            {
                let j = journal(state.path());
                let (sender, _conflicts) =
                    Sender::start(j.clone(), Some(ModelRemote::new(&tree, budget, Death::Hang)), config());
                for op in &ops {
                    j.append(op.clone()).unwrap();
                }
                // Let it run until it is stuck on calls that will never be answered.
                let _ = timeout(Duration::from_secs(1), sender.wait(ops.len() as Seq)).await;
                assert!(j.stats().pending_ops > 0);
                sender.stop().await;
            }
            let (j, recovered) = Journal::open(
                state.path(),
                "test@host:22/root",
                Config { commit_interval: Duration::from_secs(3600), ..Config::default() },
            )
            .unwrap();
            assert!(!recovered.ops.is_empty());
            let (sender, conflicts) =
                Sender::start(j.clone(), Some(ModelRemote::new(&tree, usize::MAX, Death::Drop)), config());
            let handler = tokio::spawn(same_content_is_done(tree.clone(), conflicts));
            assert_eq!(
                timeout(Duration::from_secs(10), sender.barrier()).await.unwrap(),
                Ok(()),
                "budget {budget}"
            );
            handler.abort();
            assert_eq!(*tree.lock().unwrap(), expected(&ops), "budget {budget}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_caps_requests_in_flight() {
        let state = tempfile::tempdir().unwrap();
        let j = journal(state.path());
        for i in 0..10 {
            j.append(write(&format!("f{i}"), 0, "x")).unwrap();
        }
        let (remote, mut calls) = manual();
        let (sender, _conflicts) =
            Sender::start(j.clone(), Some(remote), SenderConfig { window: 4, ..config() });
        let first = next_ops(&mut calls, 4).await;
        nothing_more(&mut calls).await;
        for c in first {
            c.ok();
        }
        for c in next_ops(&mut calls, 4).await {
            c.ok();
        }
        for c in next_ops(&mut calls, 2).await {
            c.ok();
        }
        timeout(Duration::from_secs(10), sender.wait(10)).await.unwrap();
    }
}
