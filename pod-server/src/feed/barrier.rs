//! Barriers (`barrier@devmount`): requests for a sequence number that covers every change made
//! before them. Any thread queues one and wakes the watcher; the watcher takes in what the
//! kernel has queued, publishes it at once and answers.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::sys::Signal;

#[derive(Default)]
struct Queue {
    waiting: Vec<oneshot::Sender<u64>>,
    /// The watcher has ended: nobody takes barriers any more.
    closed: bool,
}

pub(super) struct Barriers {
    queue: Mutex<Queue>,
    wake: Signal,
}

impl Barriers {
    pub fn new() -> io::Result<Barriers> {
        Ok(Barriers { queue: Mutex::default(), wake: Signal::new()? })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every critical section is a push, a take or a flag: a panic leaves nothing half done.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `reply` for the watcher and wakes it. Gives `reply` back when the watcher has
    /// ended, for the caller to answer itself.
    pub fn request(&self, reply: oneshot::Sender<u64>) -> Result<(), oneshot::Sender<u64>> {
        let mut queue = self.queue();
        if queue.closed {
            return Err(reply);
        }
        queue.waiting.push(reply);
        drop(queue);
        self.wake.raise();
        Ok(())
    }

    /// Readable while barriers may be waiting.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.fd()
    }

    /// The watcher takes the waiting barriers. The signal is lowered first, so a barrier
    /// queued after the take raises it again.
    pub fn take(&self) -> Vec<oneshot::Sender<u64>> {
        self.wake.clear();
        std::mem::take(&mut self.queue().waiting)
    }

    /// The watcher ended: answers everything waiting with `seq`, and refuses later requests.
    pub fn close(&self, seq: u64) {
        let waiting = {
            let mut queue = self.queue();
            queue.closed = true;
            std::mem::take(&mut queue.waiting)
        };
        answer(waiting, seq);
    }
}

/// Answers barriers; one whose requester went away needs no answer.
pub(super) fn answer(barriers: impl IntoIterator<Item = oneshot::Sender<u64>>, seq: u64) {
    for reply in barriers {
        let _ = reply.send(seq);
    }
}
