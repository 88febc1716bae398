//! The open handles of one SFTP connection, and the order of the requests on each.
//!
//! A handle on the wire is 8 bytes: a per-connection counter, so a handle is never reused
//! and a stale one can never reach a newer file. Requests on one handle run one at a time in
//! the order they arrived: the reader takes a [`Turn`] for each request while it still reads
//! them in order, and a turn waits for the one before it to finish (a chain of oneshot
//! channels, so the queue costs nothing when idle and never blocks the reader).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::ops::{DirReader, File, Walk};

/// What a handle stands for. Directory listings and walks carry a cursor; their mutex is
/// never contended (the turns serialize access) but gives the blocking thread `&mut`.
pub enum Object {
    File(File),
    Dir(Mutex<DirReader>),
    Walk {
        walk: Mutex<Walk>,
        max_entries: usize,
    },
}

pub struct Handle {
    pub object: Object,
    /// Signals when the last request queued on this handle is done.
    tail: Mutex<oneshot::Receiver<()>>,
}

/// A request's place in its handle's queue.
pub struct Turn {
    prev: oneshot::Receiver<()>,
    done: oneshot::Sender<()>,
}

/// Held while a request runs; dropping it lets the next request on the handle go.
pub struct Done {
    _signal: oneshot::Sender<()>,
}

impl Turn {
    /// Waits until every earlier request on the handle has finished.
    pub async fn wait(self) -> Done {
        // An error means the sender is gone: the previous request is finished either way.
        let _ = self.prev.await;
        Done { _signal: self.done }
    }
}

impl Handle {
    fn new(object: Object) -> Handle {
        let (tx, rx) = oneshot::channel();
        drop(tx);
        Handle {
            object,
            tail: Mutex::new(rx),
        }
    }

    fn enqueue(&self) -> Turn {
        let (done, next) = oneshot::channel();
        let prev = std::mem::replace(&mut *self.tail.lock().expect("handle queue poisoned"), next);
        Turn { prev, done }
    }
}

/// The handle table of one connection, capped at `max` open handles.
pub struct Handles {
    map: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
    max: usize,
}

impl Handles {
    pub fn new(max: usize) -> Handles {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            max,
        }
    }

    pub fn is_full(&self) -> bool {
        self.map.lock().expect("handle table poisoned").len() >= self.max
    }

    /// Stores `object` and returns its handle; `None` when `max` handles are open.
    pub fn insert(&self, object: Object) -> Option<Bytes> {
        let mut map = self.map.lock().expect("handle table poisoned");
        if map.len() >= self.max {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(id, Arc::new(Handle::new(object)));
        Some(Bytes::copy_from_slice(&id.to_be_bytes()))
    }

    /// Looks up a handle and queues a request on it. Called in arrival order.
    pub fn get(&self, handle: &[u8]) -> Option<(Arc<Handle>, Turn)> {
        let id = u64::from_be_bytes(handle.try_into().ok()?);
        let h = self
            .map
            .lock()
            .expect("handle table poisoned")
            .get(&id)?
            .clone();
        let turn = h.enqueue();
        Some((h, turn))
    }

    /// Removes a handle (CLOSE): later requests no longer find it, earlier ones still run
    /// before the returned turn.
    pub fn remove(&self, handle: &[u8]) -> Option<(Arc<Handle>, Turn)> {
        let id = u64::from_be_bytes(handle.try_into().ok()?);
        let h = self
            .map
            .lock()
            .expect("handle table poisoned")
            .remove(&id)?;
        let turn = h.enqueue();
        Some((h, turn))
    }
}
