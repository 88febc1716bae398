//! The change feed on the client: every event invalidates exactly what changed, in the cache
//! and in the kernel.
//!
//! `feed` only invalidates; it never writes files and never fetches. Kernel notifications go
//! out from one thread of their own, never from a FUSE request handler: the kernel may hold a
//! directory lock while it waits on a request, and a notification about that directory sent
//! from the thread that must answer the request would wait forever.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use devmount_server::proto::feed::FeedMessage;
use fuser::{INodeNo, Notifier};

use crate::cache::{InvalKind, Invalidation};
use crate::fs::Fs;
use crate::session::FeedStream;

/// One kernel notification.
pub enum Notice {
    /// `inval_entry(parent, name)`.
    Entry { parent: u64, name: Vec<u8> },
    /// `delete(parent, child, name)`: the name is gone and the child with it.
    Delete { parent: u64, child: u64, name: Vec<u8> },
    /// `inval_inode(id, off, len)`: off -1 drops attributes only, (0, 0) the page cache too.
    Inode { id: u64, off: i64, len: i64 },
}

/// Starts the thread that sends kernel notifications; it ends when every sender is dropped.
pub fn notifier_thread(notifier: Notifier) -> std::io::Result<mpsc::Sender<Notice>> {
    let (tx, rx) = mpsc::channel::<Notice>();
    std::thread::Builder::new().name("devmount-notify".into()).spawn(move || {
        for notice in rx {
            let result = match &notice {
                Notice::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
                Notice::Delete { parent, child, name } => {
                    notifier.delete(INodeNo(*parent), INodeNo(*child), OsStr::from_bytes(name))
                }
                Notice::Inode { id, off, len } => notifier.inval_inode(INodeNo(*id), *off, *len),
            };
            // ENOENT: the kernel had nothing cached for it, which is fine.
            if let Err(e) = result {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::debug!("kernel notification failed: {e}");
                }
            }
        }
    })?;
    Ok(tx)
}

/// Applies the feed to `fs` until it ends; returns why it ended.
pub async fn run(fs: Arc<Fs>, mut feed: FeedStream, notices: mpsc::Sender<Notice>) -> String {
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
        let invalidations = fs.cache().apply(&msg, Instant::now());
        for inval in invalidations {
            for notice in notices_for(&fs, &inval) {
                if notices.send(notice).is_err() {
                    return "the mount is gone".to_owned();
                }
            }
        }
    }
}

fn notices_for(fs: &Fs, inval: &Invalidation) -> Vec<Notice> {
    if inval.own && inval.kind != InvalKind::Everything {
        // Our own change, made through this mount: the kernel saw it happen, and the inode
        // table already follows it (the event may even arrive after the name was reused here).
        return Vec::new();
    }
    let mut nodes = fs.nodes();
    let id = nodes.id_of(&inval.path);
    let parent_and_name = || -> Option<(u64, Vec<u8>)> {
        let parent = nodes.id_of(&inval.path.parent()?)?;
        Some((parent, inval.path.file_name()?.to_vec()))
    };
    match inval.kind {
        InvalKind::Entry => parent_and_name().map(|(parent, name)| Notice::Entry { parent, name }).into_iter().collect(),
        InvalKind::Gone => {
            let notice = parent_and_name().map(|(parent, name)| match id {
                Some(child) => Notice::Delete { parent, child, name },
                None => Notice::Entry { parent, name },
            });
            nodes.unlink(&inval.path);
            notice.into_iter().collect()
        }
        InvalKind::Attr => id.map(|id| Notice::Inode { id, off: -1, len: 0 }).into_iter().collect(),
        InvalKind::Data | InvalKind::Listing => id.map(|id| Notice::Inode { id, off: 0, len: 0 }).into_iter().collect(),
        InvalKind::Everything => nodes.ids().map(|id| Notice::Inode { id, off: 0, len: 0 }).collect(),
    }
}
