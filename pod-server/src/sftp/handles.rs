//! The open handles of one SFTP connection.
//!
//! A handle on the wire is 8 bytes: a per-connection counter, so a handle is never reused
//! and a stale one can never reach a newer file. Each handle carries what the request order
//! needs to know of it ([`HandleScope`]); [`super::order`] keeps requests on one handle in
//! the order they arrived, except reads of a regular file, which run side by side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::ops::{DirReader, File, Walk};
use super::order::{HandleScope, Key};

/// What a handle stands for. Directory listings and walks carry a cursor; their mutex is
/// never contended (requests on a directory or walk handle run one at a time) but gives the
/// blocking thread `&mut`.
pub enum Object {
    File(File),
    Dir(Mutex<DirReader>),
    Walk { walk: Mutex<Walk>, max_entries: usize },
}

pub struct Handle {
    pub object: Object,
    pub scope: HandleScope,
}

/// The handle table of one connection, capped at `max` open handles.
pub struct Handles {
    map: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
    max: usize,
}

impl Handles {
    pub fn new(max: usize) -> Handles {
        Handles { map: Mutex::new(HashMap::new()), next: AtomicU64::new(1), max }
    }

    pub fn is_full(&self) -> bool {
        self.map.lock().expect("handle table poisoned").len() >= self.max
    }

    /// Stores `object`, opened by `path` (for writing if `writes`; a regular file whose reads
    /// may run side by side if `shared_reads`), and returns its handle; `None` when `max`
    /// handles are open.
    pub fn insert(
        &self,
        object: Object,
        path: Option<Key>,
        writes: bool,
        shared_reads: bool,
    ) -> Option<Bytes> {
        let mut map = self.map.lock().expect("handle table poisoned");
        if map.len() >= self.max {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let scope = HandleScope { id, path, writes, shared_reads };
        map.insert(id, Arc::new(Handle { object, scope }));
        Some(Bytes::copy_from_slice(&id.to_be_bytes()))
    }

    pub fn get(&self, handle: &[u8]) -> Option<Arc<Handle>> {
        let id = u64::from_be_bytes(handle.try_into().ok()?);
        self.map.lock().expect("handle table poisoned").get(&id).cloned()
    }

    /// Removes a handle (CLOSE): later requests no longer find it.
    pub fn remove(&self, handle: &[u8]) -> Option<Arc<Handle>> {
        let id = u64::from_be_bytes(handle.try_into().ok()?);
        self.map.lock().expect("handle table poisoned").remove(&id)
    }
}
