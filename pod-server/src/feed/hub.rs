//! Publication: sequence numbers, the state a late subscriber must be told, and one bounded
//! queue per subscriber.
//!
//! The watcher publishes; it never waits for a subscriber. A queue that would grow past its
//! byte budget is emptied and holds a `resync` instead, followed by a restatement of the state
//! (the unwatched paths, and `ready` once the walk is done). Every queue holds a tail of the one
//! published stream, so all queues together hold at most about one budget of distinct data.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

use super::notes::Notes;
use super::tree::is_under;
use crate::proto::feed::{Change, FeedEvent, FeedMessage, BATCH_HEADER_LEN, PROTOCOL_VERSION};
use crate::proto::stat::FullStat;
use crate::proto::SERVER_VERSION;

/// Changes published under one sequence number, each with the connections it is own to.
#[derive(Debug)]
pub(super) struct Batch {
    /// Each change, the stat of the directory holding its (new) path, and the connections it
    /// is own to.
    pub events: Vec<(Change, Option<FullStat>, Vec<u64>)>,
    /// The encoded length of the events.
    pub len: usize,
}

#[derive(Debug, Clone)]
enum Item {
    Batch(u64, Arc<Batch>),
    Resync(u64),
    Unwatched(u64, Bytes),
    Ready(u64),
}

impl Item {
    /// Roughly the bytes this item takes on the wire, frame prefix included.
    fn cost(&self) -> usize {
        match self {
            Item::Batch(_, b) => 4 + BATCH_HEADER_LEN + b.len,
            Item::Unwatched(_, p) => 4 + 1 + 8 + 4 + p.len(),
            Item::Resync(_) | Item::Ready(_) => 4 + 1 + 8,
        }
    }

    fn into_message(self, conn: u64) -> FeedMessage {
        match self {
            Item::Batch(seq, b) => FeedMessage::Batch {
                seq,
                events: b
                    .events
                    .iter()
                    .map(|(change, dir, own)| FeedEvent {
                        change: change.clone(),
                        own: own.contains(&conn),
                        dir: *dir,
                    })
                    .collect(),
            },
            Item::Resync(seq) => FeedMessage::Resync { seq },
            Item::Unwatched(seq, path) => FeedMessage::Unwatched { seq, path },
            Item::Ready(seq) => FeedMessage::Ready { seq },
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    closed: bool,
    overflows: u64,
}

impl Queue {
    fn push(&mut self, item: Item) {
        self.bytes += item.cost();
        self.items.push_back(item);
    }

    /// Replaces everything queued by a resync and the restated state.
    fn resync(&mut self, state: &State, seq: u64) {
        self.items.clear();
        self.bytes = 0;
        self.push(Item::Resync(seq));
        self.restate(state, seq);
    }

    fn restate(&mut self, state: &State, seq: u64) {
        for p in &state.unwatched {
            self.push(Item::Unwatched(seq, p.clone()));
        }
        if state.ready {
            self.push(Item::Ready(seq));
        }
    }
}

struct Subscriber {
    conn: u64,
    queue: Mutex<Queue>,
    notify: Notify,
}

impl Subscriber {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct State {
    subscribers: Vec<Arc<Subscriber>>,
    ready: bool,
    unwatched: BTreeSet<Bytes>,
    stopped: bool,
}

pub(super) struct Hub {
    seq: AtomicU64,
    state: Mutex<State>,
    queue_bytes: usize,
    notes: Mutex<Notes>,
}

impl Hub {
    pub fn new(queue_bytes: usize) -> Self {
        Hub {
            seq: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            queue_bytes,
            notes: Mutex::new(Notes::default()),
        }
    }

    pub fn sequence(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    pub fn notes(&self) -> MutexGuard<'_, Notes> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next sequence number and hands `item` to every subscriber.
    ///
    /// The number is published before the item is queued: the change behind it has happened
    /// already, and a subscriber woken by the item must see `sequence()` at least this high.
    fn publish(&self, state: &State, make: impl FnOnce(u64) -> Item) -> u64 {
        let seq = self.next_seq();
        let item = make(seq);
        for sub in &state.subscribers {
            let mut q = sub.queue();
            if q.closed {
                continue;
            }
            if !q.items.is_empty() && q.bytes + item.cost() > self.queue_bytes {
                q.overflows += 1;
                if q.overflows == 1 {
                    tracing::warn!(conn = sub.conn, "feed subscriber too slow; sending resync");
                } else {
                    tracing::debug!(conn = sub.conn, "feed subscriber too slow again; sending resync");
                }
                q.resync(state, seq);
            } else {
                q.push(item.clone());
            }
            drop(q);
            sub.notify.notify_one();
        }
        seq
    }

    /// Only the watcher thread publishes, and always under the state lock.
    fn next_seq(&self) -> u64 {
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        self.seq.store(seq, Ordering::Release);
        seq
    }

    pub fn publish_batch(&self, batch: Batch) -> u64 {
        let state = self.state();
        let batch = Arc::new(batch);
        self.publish(&state, |seq| Item::Batch(seq, batch))
    }

    /// Tells every subscriber that changes may have been lost, and restates the state.
    pub fn publish_resync(&self) -> u64 {
        let state = self.state();
        let seq = self.next_seq();
        for sub in &state.subscribers {
            sub.queue().resync(&state, seq);
            sub.notify.notify_one();
        }
        seq
    }

    /// Records that the directory at `path` is not watched; published once per path.
    pub fn add_unwatched(&self, path: Bytes) -> bool {
        let mut state = self.state();
        if !state.unwatched.insert(path.clone()) {
            return false;
        }
        self.publish(&state, |seq| Item::Unwatched(seq, path));
        true
    }

    /// Forgets the unwatched marks at or below `dir` (it was deleted or moved out).
    pub fn drop_unwatched_under(&self, dir: &[u8]) {
        self.state().unwatched.retain(|p| !is_under(p, dir));
    }

    /// Moves the unwatched marks at or below `from` to below `to`.
    pub fn rename_unwatched(&self, from: &[u8], to: &[u8]) {
        let mut state = self.state();
        let moved: Vec<Bytes> = state.unwatched.iter().filter(|p| is_under(p, from)).cloned().collect();
        for p in moved {
            state.unwatched.remove(&p);
            let mut n = to.to_vec();
            n.extend_from_slice(&p[from.len()..]);
            state.unwatched.insert(n.into());
        }
    }

    /// Forgets every unwatched mark before a fresh walk finds them again; subscribers learn
    /// of it from the resync that follows the walk.
    pub fn clear_unwatched(&self) {
        self.state().unwatched.clear();
    }

    /// The walk is done: every subscriber gets `ready`, and so will every later one.
    pub fn set_ready(&self) {
        let mut state = self.state();
        state.ready = true;
        let seq = self.sequence();
        for sub in &state.subscribers {
            sub.queue().push(Item::Ready(seq));
            sub.notify.notify_one();
        }
    }

    /// The watcher ended: every subscription ends once drained.
    pub fn stop(&self) {
        let mut state = self.state();
        state.stopped = true;
        for sub in state.subscribers.drain(..) {
            sub.queue().closed = true;
            sub.notify.notify_one();
        }
    }

    pub fn subscribe(self: &Arc<Self>, conn: u64) -> Subscription {
        let mut state = self.state();
        let seq = self.sequence();
        let mut queue = Queue::default();
        queue.restate(&state, seq);
        queue.closed = state.stopped;
        let sub = Arc::new(Subscriber { conn, queue: Mutex::new(queue), notify: Notify::new() });
        if !state.stopped {
            state.subscribers.push(sub.clone());
        }
        let hello = FeedMessage::Hello {
            protocol: PROTOCOL_VERSION,
            server_version: Bytes::from_static(SERVER_VERSION.as_bytes()),
            seq,
        };
        Subscription { sub, hub: Arc::downgrade(self), hello: Some(hello) }
    }
}

/// One client's view of the feed: `hello`, then the published messages in order.
pub struct Subscription {
    sub: Arc<Subscriber>,
    hub: Weak<Hub>,
    hello: Option<FeedMessage>,
}

impl Subscription {
    /// The next message, without waiting. `None` when nothing is queued (or the feed ended).
    pub fn try_recv(&mut self) -> Option<FeedMessage> {
        if let Some(h) = self.hello.take() {
            return Some(h);
        }
        let mut q = self.sub.queue();
        let item = q.items.pop_front()?;
        q.bytes -= item.cost();
        drop(q);
        Some(item.into_message(self.sub.conn))
    }

    /// The next message; `None` once the feed has ended and everything queued was received.
    pub async fn recv(&mut self) -> Option<FeedMessage> {
        loop {
            if let Some(m) = self.try_recv() {
                return Some(m);
            }
            if self.sub.queue().closed {
                return None;
            }
            // `notify_one` stores a permit when nobody waits, so a push between the check
            // above and this await still wakes us.
            self.sub.notify.notified().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.state().subscribers.retain(|s| !Arc::ptr_eq(s, &self.sub));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Batch {
        let events = (0..n)
            .map(|i| (Change::Deleted { path: Bytes::from(format!("f{i}")) }, None, vec![7]))
            .collect::<Vec<_>>();
        let len = events.iter().map(|(c, d, _)| c.encoded_len(d.is_some())).sum();
        Batch { events, len }
    }

    fn drain(s: &mut Subscription) -> Vec<FeedMessage> {
        std::iter::from_fn(|| s.try_recv()).collect()
    }

    #[test]
    fn late_subscribers_get_hello_and_the_state() {
        let hub = Arc::new(Hub::new(1 << 20));
        hub.add_unwatched(Bytes::from_static(b"big"));
        assert!(!hub.add_unwatched(Bytes::from_static(b"big")), "published once");
        hub.set_ready();
        let mut s = hub.subscribe(7);
        assert_eq!(
            drain(&mut s),
            vec![
                FeedMessage::Hello {
                    protocol: PROTOCOL_VERSION,
                    server_version: Bytes::from_static(SERVER_VERSION.as_bytes()),
                    seq: 1
                },
                FeedMessage::Unwatched { seq: 1, path: Bytes::from_static(b"big") },
                FeedMessage::Ready { seq: 1 },
            ]
        );
        assert_eq!(hub.publish_batch(batch(1)), 2);
        assert_eq!(hub.sequence(), 2);
        let m = drain(&mut s);
        assert!(matches!(&m[..], [FeedMessage::Batch { seq: 2, events }] if events[0].own));
        let mut other = hub.subscribe(8);
        hub.publish_batch(batch(1));
        let m = drain(&mut other);
        assert!(matches!(&m[3..], [FeedMessage::Batch { seq: 3, events }] if !events[0].own));
    }

    #[test]
    fn an_overflowing_queue_becomes_a_resync_and_the_state() {
        let hub = Arc::new(Hub::new(200));
        let mut slow = hub.subscribe(1);
        let mut fast = hub.subscribe(2);
        hub.add_unwatched(Bytes::from_static(b"u"));
        hub.set_ready();
        drain(&mut fast);
        for _ in 0..10 {
            hub.publish_batch(batch(3));
            assert_eq!(drain(&mut fast).len(), 1, "a reader that keeps up never resyncs");
        }
        let m = drain(&mut slow);
        let last = hub.sequence();
        assert!(matches!(m[0], FeedMessage::Hello { .. }));
        let resync = m.iter().position(|m| matches!(m, FeedMessage::Resync { .. })).unwrap();
        assert!(matches!(
            &m[resync..],
            [FeedMessage::Resync { .. }, FeedMessage::Unwatched { .. }, FeedMessage::Ready { .. }, ..]
        ));
        assert_eq!(m.last().unwrap().seq(), last, "nothing after the resync is lost");
        let queued: usize = m.len();
        assert!(queued < 10, "bounded: {queued} messages");
    }

    #[test]
    fn stop_ends_subscriptions_after_draining() {
        let hub = Arc::new(Hub::new(1 << 20));
        let mut s = hub.subscribe(1);
        hub.publish_resync();
        hub.stop();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            assert!(matches!(s.recv().await, Some(FeedMessage::Hello { .. })));
            assert!(matches!(s.recv().await, Some(FeedMessage::Resync { seq: 1 })));
            assert_eq!(s.recv().await, None);
        });
        let mut late = hub.subscribe(2);
        assert!(matches!(late.try_recv(), Some(FeedMessage::Hello { .. })));
        assert_eq!(late.try_recv(), None);
    }
}
