//! The change feed on the client: every event invalidates exactly what changed, in the cache
//! and in the kernel.
//!
//! `feed` only invalidates; it never writes files and never fetches. Kernel notifications go
//! out from the echo thread (see [`crate::echo`]), never from a FUSE request handler: the kernel
//! may hold a directory lock while it waits on a request, and a notification about that
//! directory sent from the thread that must answer the request would wait forever.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use devmount_server::proto::feed::{Change, FeedMessage};
use devmount_server::proto::stat::FullStat;

use crate::cache::{InvalKind, Invalidation, RelPath};
use crate::echo::{Replay, Work};
use crate::fs::Fs;
use crate::session::FeedStream;

/// Applies the feed to `fs` until it ends; returns why it ended. Kernel notifications and the
/// replays for local watchers go to the echo thread, in an order that keeps the kernel right:
/// removals are replayed before the kernel is told, creations after.
pub async fn run(fs: Arc<Fs>, mut feed: FeedStream, work: mpsc::Sender<Work>) -> String {
    loop {
        let msg = match feed.next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break "the server closed the change feed".to_owned(),
            Err(e) => break e.to_string(),
        };
        if let FeedMessage::Unwatched { path, .. } = &msg {
            tracing::info!(
                "the pod's watch limit leaves {} unwatched: changes there show after the short timeout",
                String::from_utf8_lossy(path)
            );
        }
        // Event by event, so a replay sees the names as that event left them: a removal is
        // replayed before the kernel is told, an addition after.
        let parts = match msg {
            FeedMessage::Batch { seq, events } => {
                events.into_iter().map(|e| FeedMessage::Batch { seq, events: vec![e] }).collect()
            }
            other => vec![other],
        };
        for part in parts {
            let (before, after) = replays(&fs, &part);
            let (invalidations, applied) = {
                let mut cache = fs.cache();
                (cache.apply(&part, Instant::now()), cache.applied_seq())
            };
            if invalidations.iter().any(|i| i.kind == InvalKind::Everything) {
                fs.cache_emptied();
            }
            if matches!(part, FeedMessage::Ready { .. }) {
                fs.feed_ready();
            }
            let notices = invalidations.iter().flat_map(|inval| notices_for(&fs, inval));
            for item in before.into_iter().map(Work::Replay).chain(notices).chain(after.into_iter().map(Work::Replay)) {
                if work.send(item).is_err() {
                    return "the mount is gone".to_owned();
                }
            }
            fs.feed_applied(Some(applied));
        }
    }
}

/// The replays of a message's changes made in the pod: (removals, additions). Own changes came
/// through the mount and were seen by the watchers already. A name changed here and not yet
/// settled is the mount's to show, so a change of it is not replayed either: under load the
/// server can report a put of ours (a temporary file renamed over the name) without the own
/// mark, and replaying that rename would take the name from the file still being written here.
fn replays(fs: &Fs, msg: &FeedMessage) -> (Vec<Replay>, Vec<Replay>) {
    let FeedMessage::Batch { events, .. } = msg else { return (Vec::new(), Vec::new()) };
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let known = |path: &Bytes| -> FullStat {
        let cached = RelPath::new(path).ok().and_then(|p| fs.cache().attr(&p, Instant::now()));
        cached.map_or(FullStat { mode: libc::S_IFREG | 0o644, ..FullStat::default() }, |f| f.value)
    };
    let local = |path: &Bytes| RelPath::new(path).is_ok_and(|p| fs.is_local(&p));
    let settled = |change: &Change| match change {
        Change::Renamed { from, to, .. } => !local(from) && !local(to),
        Change::Created { path, .. }
        | Change::Modified { path, .. }
        | Change::Attrib { path, .. }
        | Change::Deleted { path } => !local(path),
    };
    for e in events.iter().filter(|e| !e.own && settled(&e.change)) {
        match &e.change {
            Change::Created { path, stat: Some(stat) } => after.push(Replay::Created { path: path.clone(), stat: *stat }),
            Change::Modified { path, stat: Some(stat) } => {
                after.push(Replay::Modified { path: path.clone(), stat: *stat })
            }
            Change::Attrib { path, stat: Some(stat) } => after.push(Replay::Attrib { path: path.clone(), stat: *stat }),
            Change::Deleted { path } => before.push(Replay::Deleted { path: path.clone(), stat: known(path) }),
            Change::Renamed { from, to, stat: Some(stat) } => {
                before.push(Replay::Renamed { from: from.clone(), to: to.clone(), stat: *stat })
            }
            _ => {}
        }
    }
    (before, after)
}

fn notices_for(fs: &Fs, inval: &Invalidation) -> Vec<Work> {
    if inval.kind != InvalKind::Everything && fs.is_local(&inval.path) {
        // The mount shows its own, newer state of this path (the event may even be about a
        // name reused here since); the kernel was told when that state was made.
        return Vec::new();
    }
    let mut nodes = fs.nodes();
    let id = nodes.id_of(&inval.path);
    let parent_and_name = || -> Option<(u64, Vec<u8>)> {
        let parent = nodes.id_of(&inval.path.parent()?)?;
        Some((parent, inval.path.file_name()?.to_vec()))
    };
    match inval.kind {
        InvalKind::Entry => parent_and_name().map(|(parent, name)| Work::Entry { parent, name }).into_iter().collect(),
        InvalKind::Gone => {
            let notice = parent_and_name().map(|(parent, name)| match id {
                Some(child) => Work::Delete { parent, child, name },
                None => Work::Entry { parent, name },
            });
            nodes.unlink(&inval.path);
            notice.into_iter().collect()
        }
        InvalKind::Attr => id.map(|id| Work::Inode { id, off: -1, len: 0 }).into_iter().collect(),
        InvalKind::Data | InvalKind::Listing => id.map(|id| Work::Inode { id, off: 0, len: 0 }).into_iter().collect(),
        InvalKind::Everything => nodes.ids().map(|id| Work::Inode { id, off: 0, len: 0 }).collect(),
    }
}
