//! Server requests whose replies may still be stored in the cache, so a local entry can wait
//! for the ones sent before the server had its op.
//!
//! Without a feed (a plain OpenSSH server) nothing tells a reply sent before an op reached the
//! server from one sent after: the cache would keep the older one once the local entry that
//! shadowed it is gone. [`InFlight::quiesce`] waits until every request started before it was
//! called has stored its reply (or given up).

use std::collections::BTreeSet;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
struct State {
    next: u64,
    open: BTreeSet<u64>,
}

#[derive(Default)]
pub struct InFlight {
    state: Mutex<State>,
    done: Notify,
}

/// One request in flight; dropping it marks the request done (after its reply is stored).
pub struct Ticket<'a> {
    set: &'a InFlight,
    id: u64,
    /// The cache's applied sequence when the request started: what a reply without one is
    /// stored under.
    pub floor: u64,
}

impl InFlight {
    pub fn start(&self, floor: u64) -> Ticket<'_> {
        let mut st = super::lock(&self.state);
        let id = st.next;
        st.next += 1;
        st.open.insert(id);
        Ticket { set: self, id, floor }
    }

    /// Resolves once every request started before this call is done.
    pub async fn quiesce(&self) {
        let mark = super::lock(&self.state).next;
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if super::lock(&self.state).open.first().is_none_or(|&id| id >= mark) {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        super::lock(&self.set.state).open.remove(&self.id);
        self.set.done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn quiesce_waits_for_earlier_requests_only() {
        let set = InFlight::default();
        let early = set.start(0);
        let mut waiting = Box::pin(set.quiesce());
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        let late = set.start(0);
        drop(early);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("not held by a later request");
        drop(late);
        tokio::time::timeout(Duration::from_secs(5), set.quiesce()).await.expect("nothing in flight");
    }
}
