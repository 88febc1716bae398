//! The feed against a real directory: a temp dir, the real watcher thread, real subscriptions.
//! Every wait has a deadline and returns as soon as its condition holds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

use super::{serve, ChangeTracker, Feed, FeedOptions, Subscription};
use crate::proto::feed::{Change, FeedEvent, FeedMessage, MAX_FEED_FRAME, PROTOCOL_VERSION};
use crate::proto::sftp::Put;
use crate::proto::stat::Timespec;
use crate::proto::wire::take_frame;
use crate::sftp::ops::Fs;
use crate::sftp::paths::Root;

const DEADLINE: Duration = Duration::from_secs(10);

/// A subscriber that remembers everything it received.
struct Client {
    sub: Subscription,
    messages: Vec<FeedMessage>,
}

impl Client {
    fn new(feed: &Feed, conn: u64) -> Client {
        Client { sub: feed.subscribe(conn), messages: Vec::new() }
    }

    fn events(&self) -> impl Iterator<Item = &FeedEvent> {
        self.messages.iter().flat_map(|m| match m {
            FeedMessage::Batch { events, .. } => events.as_slice(),
            _ => &[],
        })
    }

    /// Receives until `done` holds for what was received so far.
    async fn until(&mut self, what: &str, done: impl Fn(&Client) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(self) {
            match timeout_at(deadline, self.sub.recv()).await {
                Ok(Some(m)) => self.messages.push(m),
                Ok(None) => panic!("feed ended while waiting for {what}; got {:#?}", self.messages),
                Err(_) => panic!("timed out waiting for {what}; got {:#?}", self.messages),
            }
        }
    }

    async fn ready(&mut self) {
        self.until("ready", |c| c.messages.iter().any(|m| matches!(m, FeedMessage::Ready { .. }))).await;
    }

    async fn event(&mut self, what: &str, pred: impl Fn(&FeedEvent) -> bool) -> FeedEvent {
        self.until(what, |c| c.events().any(&pred)).await;
        self.events().find(|e| pred(e)).cloned().expect("just seen")
    }
}

impl Client {
    /// Takes what is queued already, without waiting.
    fn take_queued(&mut self) {
        while let Some(m) = self.sub.try_recv() {
            self.messages.push(m);
        }
    }
}

/// The sequence number of the batch that carried the first event `pred` accepts.
fn seq_of(messages: &[FeedMessage], pred: impl Fn(&FeedEvent) -> bool) -> Option<u64> {
    messages.iter().find_map(|m| match m {
        FeedMessage::Batch { seq, events } if events.iter().any(&pred) => Some(*seq),
        _ => None,
    })
}

async fn barrier(feed: &Feed) -> u64 {
    let (reply, answer) = oneshot::channel();
    feed.barrier(reply);
    timeout_at(Instant::now() + DEADLINE, answer).await.expect("the barrier is answered in time").unwrap()
}

/// A feed whose window is so long that nothing is published unless a barrier ends it, and its
/// subscriber `conn`, ready.
async fn endless_window(conn: u64) -> (TempDir, Arc<Feed>, Client) {
    let tmp = TempDir::new().unwrap();
    let feed = start(&tmp, FeedOptions { coalesce: Duration::from_secs(3600), ..FeedOptions::default() });
    let mut c = Client::new(&feed, conn);
    c.ready().await;
    (tmp, feed, c)
}

fn start(tmp: &TempDir, options: FeedOptions) -> Arc<Feed> {
    Feed::start(tmp.path().to_path_buf(), options).expect("feed starts")
}

fn is(change: &Change, kind: &str, path: &str) -> bool {
    let k = match change {
        Change::Created { .. } => "created",
        Change::Modified { .. } => "modified",
        Change::Attrib { .. } => "attrib",
        Change::Deleted { .. } => "deleted",
        Change::Renamed { .. } => "renamed",
    };
    k == kind && change.path().as_ref() == path.as_bytes()
}

#[tokio::test]
async fn changes_in_a_nested_tree() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    fs::create_dir_all(root.join("a/b")).unwrap();
    let feed = start(&tmp, FeedOptions::default());
    let mut c = Client::new(&feed, 1);
    c.ready().await;

    fs::write(root.join("a/b/f"), b"hi").unwrap();
    c.event("a/b/f created", |e| is(&e.change, "created", "a/b/f")).await;
    let written = c
        .event("a/b/f with its content", |e| {
            e.change.path().as_ref() == b"a/b/f" && e.change.stat().is_some_and(|s| s.size == 2)
        })
        .await;
    assert!(!written.own);

    fs::set_permissions(root.join("a/b/f"), fs::Permissions::from_mode(0o600)).unwrap();
    let attrib = c.event("a/b/f attrib", |e| is(&e.change, "attrib", "a/b/f")).await;
    assert_eq!(attrib.change.stat().unwrap().mode, 0o100600);

    fs::rename(root.join("a/b/f"), root.join("a/g")).unwrap();
    let renamed = c.event("rename", |e| is(&e.change, "renamed", "a/g")).await;
    assert!(matches!(&renamed.change, Change::Renamed { from, stat: Some(st), .. }
        if from.as_ref() == b"a/b/f" && st.size == 2));

    fs::remove_file(root.join("a/g")).unwrap();
    c.event("delete", |e| is(&e.change, "deleted", "a/g")).await;
    fs::remove_dir(root.join("a/b")).unwrap();
    c.event("rmdir", |e| is(&e.change, "deleted", "a/b")).await;
    fs::set_permissions(root, fs::Permissions::from_mode(0o750)).unwrap();
    let root_attrib = c.event("root attrib", |e| is(&e.change, "attrib", "")).await;
    assert!(root_attrib.change.stat().unwrap().is_dir());

    // Sequence numbers: hello and ready restate, every published message takes a new one.
    let mut last = 0;
    for m in &c.messages {
        match m {
            FeedMessage::Hello { protocol, seq, .. } => {
                assert_eq!(*protocol, PROTOCOL_VERSION);
                last = *seq;
            }
            FeedMessage::Ready { seq } => assert_eq!(*seq, last),
            m => {
                assert!(m.seq() > last, "{m:?} after {last}");
                last = m.seq();
            }
        }
    }
    c.until("sequence() to be the last published", |c| {
        c.messages.last().map(FeedMessage::seq) == Some(feed.sequence())
    })
    .await;
}

#[tokio::test]
async fn a_new_directory_filled_at_once_reports_every_file() {
    let tmp = TempDir::new().unwrap();
    let feed = start(&tmp, FeedOptions::default());
    let mut c = Client::new(&feed, 1);
    c.ready().await;
    const N: usize = 30;
    for i in 0..N {
        let dir = tmp.path().join(format!("d{i}/b/c"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("f"), b"x").unwrap();
    }
    let wanted: Vec<String> = (0..N).map(|i| format!("d{i}/b/c/f")).collect();
    c.until("every file created", |c| wanted.iter().all(|w| c.events().any(|e| is(&e.change, "created", w))))
        .await;
    // The directories themselves are reported too, parents before children.
    let pos = |p: &str| c.events().position(|e| is(&e.change, "created", p)).unwrap();
    assert!(pos("d0") < pos("d0/b") && pos("d0/b") < pos("d0/b/c") && pos("d0/b/c") < pos("d0/b/c/f"));
}

#[tokio::test]
async fn own_changes_are_marked_for_their_connection_only() {
    let tmp = TempDir::new().unwrap();
    let feed = start(&tmp, FeedOptions::default());
    let mut mine = Client::new(&feed, 7);
    let mut other = Client::new(&feed, 8);
    mine.ready().await;
    other.ready().await;

    let path = tmp.path().join("own.txt");
    feed.own_change(7, &path);
    fs::write(&path, b"mine").unwrap();
    feed.own_done(7, &path);
    let e = mine.event("own.txt", |e| e.change.path().as_ref() == b"own.txt").await;
    assert!(e.own, "{e:?}");
    let e = other.event("own.txt", |e| e.change.path().as_ref() == b"own.txt").await;
    assert!(!e.own, "{e:?}");

    // Once a window has read everything queued after the mutation ended (a barrier makes
    // sure of one), the note is spent: a later change is nobody's own.
    barrier(&feed).await;
    fs::write(&path, b"pod process").unwrap();
    let e = mine.event("foreign write", |e| is(&e.change, "modified", "own.txt") && !e.own).await;
    assert!(!e.own);

    // A path noted by one connection does not make another path own.
    feed.own_change(7, &tmp.path().join("noted"));
    fs::write(tmp.path().join("unnoted"), b"").unwrap();
    feed.own_done(7, &tmp.path().join("noted"));
    let e = mine.event("unnoted", |e| e.change.path().as_ref() == b"unnoted").await;
    assert!(!e.own);
}

#[tokio::test]
async fn a_slow_subscriber_gets_a_resync() {
    let tmp = TempDir::new().unwrap();
    let feed = start(&tmp, FeedOptions { queue_bytes: 1, ..FeedOptions::default() });
    let mut slow = Client::new(&feed, 1);
    let mut probe = Client::new(&feed, 2);
    probe.ready().await;
    for i in 0..4 {
        let before = feed.sequence();
        fs::write(tmp.path().join(format!("f{i}")), b"").unwrap();
        probe.until("a new batch", |_| feed.sequence() > before).await;
    }
    let last = feed.sequence();
    while let Some(m) = slow.sub.try_recv() {
        slow.messages.push(m);
    }
    let resync = slow
        .messages
        .iter()
        .position(|m| matches!(m, FeedMessage::Resync { .. }))
        .unwrap_or_else(|| panic!("no resync in {:#?}", slow.messages));
    assert!(slow.messages.len() <= 4, "the queue stayed small: {:#?}", slow.messages);
    assert!(matches!(slow.messages[resync + 1], FeedMessage::Ready { .. }), "{:#?}", slow.messages);
    assert_eq!(slow.messages.last().unwrap().seq(), last, "nothing after the resync is missing");
}

#[tokio::test]
async fn a_renamed_directory_reports_changes_under_its_new_name() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    let outside = TempDir::new().unwrap();
    fs::create_dir_all(root.join("d1/sub")).unwrap();
    fs::write(root.join("d1/sub/file"), b"").unwrap();
    let feed = start(&tmp, FeedOptions::default());
    let mut c = Client::new(&feed, 1);
    c.ready().await;

    fs::rename(root.join("d1"), root.join("d2")).unwrap();
    c.event("rename", |e| matches!(&e.change, Change::Renamed { from, to, .. } if from.as_ref() == b"d1" && to.as_ref() == b"d2"))
        .await;
    fs::write(root.join("d2/sub/file"), b"new").unwrap();
    c.event("write under the new name", |e| is(&e.change, "modified", "d2/sub/file")).await;
    fs::create_dir(root.join("d2/sub/new")).unwrap();
    fs::write(root.join("d2/sub/new/x"), b"").unwrap();
    c.event("file in a new dir under the new name", |e| is(&e.change, "created", "d2/sub/new/x")).await;

    // Moved out of the root: a delete, and nothing more from it.
    fs::rename(root.join("d2"), outside.path().join("d2")).unwrap();
    c.event("moved out", |e| is(&e.change, "deleted", "d2")).await;
    // Moved back in: created, with what it holds.
    fs::write(outside.path().join("d2/sub/while-away"), b"").unwrap();
    fs::rename(outside.path().join("d2"), root.join("back")).unwrap();
    c.event("moved in", |e| is(&e.change, "created", "back")).await;
    c.event("its content", |e| is(&e.change, "created", "back/sub/while-away")).await;
    fs::write(root.join("back/sub/new/y"), b"").unwrap();
    c.event("watched again", |e| is(&e.change, "created", "back/sub/new/y")).await;
    assert!(
        !c.events().any(|e| e.change.path().starts_with(b"d2/sub/while-away")),
        "a change outside the root was reported: {:#?}",
        c.messages
    );
}

#[tokio::test]
async fn directories_past_the_watch_limit_are_unwatched() {
    let tmp = TempDir::new().unwrap();
    for d in ["a/x", "b/y", "c/z"] {
        fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    // The root and one more.
    let feed = start(&tmp, FeedOptions { max_watches: Some(2), ..FeedOptions::default() });
    let mut c = Client::new(&feed, 1);
    c.ready().await;
    let unwatched = |c: &Client| -> Vec<Vec<u8>> {
        c.messages
            .iter()
            .filter_map(|m| match m {
                FeedMessage::Unwatched { path, .. } => Some(path.to_vec()),
                _ => None,
            })
            .collect()
    };
    // One of a, b, c got the second watch; the other two are unwatched, and so is the one
    // directory inside the watched one. Below an unwatched directory nothing is tried.
    let first = unwatched(&c);
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first.iter().filter(|p| !p.contains(&b'/')).count(), 2, "{first:?}");
    for p in &first {
        assert!(!first.iter().any(|q| q != p && p.starts_with(q)), "{p:?} is below another in {first:?}");
    }
    fs::create_dir(tmp.path().join("late")).unwrap();
    c.until("the new directory unwatched", |c| unwatched(c).contains(&b"late".to_vec())).await;

    // A later subscriber learns the same, before ready.
    let mut late = Client::new(&feed, 2);
    late.ready().await;
    assert_eq!(unwatched(&late).len(), 4);
}

/// Reads frames off the client end of a `serve` stream.
async fn read_message(r: &mut (impl AsyncReadExt + Unpin), buf: &mut BytesMut) -> FeedMessage {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(frame) = take_frame(buf, MAX_FEED_FRAME).unwrap() {
            return FeedMessage::decode(frame).unwrap();
        }
        let n = timeout_at(deadline, r.read_buf(buf)).await.expect("a frame in time").unwrap();
        assert!(n > 0, "stream closed");
    }
}

#[tokio::test]
async fn serve_writes_frames_until_the_client_goes() {
    let tmp = TempDir::new().unwrap();
    let feed = start(&tmp, FeedOptions::default());
    let (server_end, mut client_end) = tokio::io::duplex(64 * 1024);
    let server = {
        let feed = feed.clone();
        tokio::spawn(async move { serve(&feed, 3, server_end).await })
    };
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_message(&mut client_end, &mut buf).await,
        FeedMessage::Hello { protocol: PROTOCOL_VERSION, .. }
    ));
    assert!(matches!(read_message(&mut client_end, &mut buf).await, FeedMessage::Ready { .. }));
    feed.own_change(3, &tmp.path().join("via-serve"));
    fs::write(tmp.path().join("via-serve"), b"").unwrap();
    feed.own_done(3, &tmp.path().join("via-serve"));
    match read_message(&mut client_end, &mut buf).await {
        FeedMessage::Batch { events, .. } => {
            assert!(is(&events[0].change, "created", "via-serve") && events[0].own, "{events:?}")
        }
        m => panic!("expected a batch, got {m:?}"),
    }
    drop(client_end);
    fs::write(tmp.path().join("after"), b"").unwrap();
    let r = tokio::time::timeout(DEADLINE, server).await.expect("serve returns").unwrap();
    assert!(r.is_err(), "the write to a closed client fails");
}

#[tokio::test]
async fn own_change_accepts_paths_under_either_root_spelling() {
    let tmp = TempDir::new().unwrap();
    fs::create_dir(tmp.path().join("real")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
    let feed = Feed::start(tmp.path().join("link"), FeedOptions::default()).unwrap();
    assert_eq!(feed.relative(&tmp.path().join("link/a/./b")).as_deref(), Some(&b"a/b"[..]));
    assert_eq!(feed.relative(&tmp.path().join("real/a")).as_deref(), Some(&b"a"[..]));
    assert_eq!(feed.relative(&tmp.path().join("real")).as_deref(), Some(&b""[..]));
    assert_eq!(feed.relative(&tmp.path().join("real/../x")), None);
    assert_eq!(feed.relative(Path::new("/elsewhere")), None);
}

#[tokio::test]
async fn survives_directories_vanishing_under_it() {
    let tmp = TempDir::new().unwrap();
    let feed = start(&tmp, FeedOptions::default());
    let mut c = Client::new(&feed, 1);
    c.ready().await;
    let root = tmp.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        // Errors are expected: the point is to race the watcher, not to succeed.
        for i in 0..300 {
            let a = root.join(format!("c{}", i % 5));
            let _ = fs::create_dir_all(a.join("x/y"));
            let _ = fs::write(a.join("x/y/f"), b"1");
            let _ = fs::rename(a.join("x"), a.join("z"));
            let _ = fs::rename(&a, root.join(format!("moved{}", i % 3)));
            let _ = fs::remove_dir_all(root.join(format!("moved{}", i % 3)));
            let _ = fs::remove_dir_all(&a);
            let _ = std::os::unix::fs::symlink("/", &a);
            let _ = fs::remove_file(&a);
        }
    })
    .await
    .unwrap();
    fs::create_dir_all(tmp.path().join("after/deep")).unwrap();
    fs::write(tmp.path().join("after/deep/f"), b"").unwrap();
    c.event("changes after the churn", |e| is(&e.change, "created", "after/deep/f")).await;
    // Everything sent is a well-formed message (plain relative paths).
    for m in &c.messages {
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        let frame = take_frame(&mut buf, MAX_FEED_FRAME).unwrap().unwrap();
        assert_eq!(&FeedMessage::decode(frame).unwrap(), m);
    }
}

#[tokio::test]
async fn a_barrier_covers_every_change_made_before_it() {
    let (tmp, feed, mut c) = endless_window(1).await;
    let root = tmp.path();
    type Step = (&'static str, fn(&Path), &'static str, &'static str);
    let steps: [Step; 6] = [
        ("create", |r| fs::write(r.join("f"), b"1").unwrap(), "created", "f"),
        ("write", |r| fs::write(r.join("f"), b"22").unwrap(), "modified", "f"),
        (
            "chmod",
            |r| fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o600)).unwrap(),
            "attrib",
            "f",
        ),
        ("rename", |r| fs::rename(r.join("f"), r.join("g")).unwrap(), "renamed", "g"),
        ("mkdir -p", |r| fs::create_dir_all(r.join("d/e")).unwrap(), "created", "d/e"),
        ("delete", |r| fs::remove_file(r.join("g")).unwrap(), "deleted", "g"),
    ];
    for (what, change, kind, path) in steps {
        let before = c.messages.len();
        change(root);
        let seq = barrier(&feed).await;
        // Queued to the subscriber already: taken without waiting.
        c.take_queued();
        let new = &c.messages[before..];
        let at = seq_of(new, |e| is(&e.change, kind, path));
        assert!(at.is_some_and(|at| at <= seq), "{what}: no {kind} {path} by {seq} in {new:#?}");
    }
}

#[tokio::test]
async fn a_barrier_without_changes_answers_at_once() {
    let (tmp, feed, mut c) = endless_window(1).await;
    fs::write(tmp.path().join("f"), b"").unwrap();
    let first = barrier(&feed).await;
    assert_eq!(first, feed.sequence());
    // Nothing changed since: many barriers at once, each answered with the same number.
    let barriers: Vec<_> = (0..20)
        .map(|_| {
            let feed = feed.clone();
            tokio::spawn(async move { barrier(&feed).await })
        })
        .collect();
    for b in barriers {
        assert_eq!(b.await.unwrap(), first);
    }
    c.take_queued();
    assert_eq!(c.messages.last().map(FeedMessage::seq), Some(first));
}

/// The feed, ending its window before each own-change note and after each end of one: every
/// step of a mutation lands in a window of its own, as may happen under load.
struct WindowPerStep(Arc<Feed>);

impl WindowPerStep {
    fn end_window(&self) {
        let (reply, answer) = oneshot::channel();
        self.0.barrier(reply);
        answer.blocking_recv().expect("the barrier is answered");
    }
}

impl ChangeTracker for WindowPerStep {
    fn sequence(&self) -> u64 {
        self.0.sequence()
    }
    fn own_change(&self, conn: u64, abs_path: &Path) {
        self.end_window();
        self.0.own_change(conn, abs_path);
    }
    fn own_done(&self, conn: u64, abs_path: &Path) {
        self.0.own_done(conn, abs_path);
        self.end_window();
    }
}

fn put(path: &'static [u8], data: &'static [u8]) -> Put {
    Put {
        path: Bytes::from_static(path),
        excl: false,
        fsync: false,
        mode: 0o640,
        atime: None,
        mtime: Some(Timespec { sec: 1_000_000_000, nsec: 5 }),
        condition: None,
        data: Bytes::from_static(data),
    }
}

#[tokio::test]
async fn a_put_is_own_even_when_its_steps_land_in_separate_windows() {
    let (tmp, feed, mut mine) = endless_window(7).await;
    fs::write(tmp.path().join("target"), b"old").unwrap();
    barrier(&feed).await;
    mine.take_queued();
    mine.messages.clear();
    let fs = Fs::new(
        Root::open(&tmp.path().canonicalize().unwrap()).unwrap(),
        7,
        Arc::new(WindowPerStep(feed.clone())),
    );
    tokio::task::spawn_blocking(move || fs.put(&put(b"target", b"new")).unwrap()).await.unwrap();
    barrier(&feed).await;
    mine.take_queued();
    let batches = mine.messages.iter().filter(|m| matches!(m, FeedMessage::Batch { .. })).count();
    let events: Vec<&FeedEvent> = mine.events().collect();
    assert!(batches >= 2, "the put's steps were not split across windows: {events:#?}");
    assert!(
        events.iter().any(|e| matches!(&e.change, Change::Renamed { to, .. } if to.as_ref() == b"target")),
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e.own), "a step of the put was not own: {events:#?}");
}

#[tokio::test]
async fn an_sftp_barrier_comes_after_the_feed_reported_the_clients_changes() {
    use crate::proto::sftp::ext;
    use crate::sftp::client::SftpClient;
    use crate::sftp::server::{serve, Limits, SftpContext};

    let (tmp, feed, mut c) = endless_window(3).await;
    let ctx = SftpContext {
        root: tmp.path().canonicalize().unwrap(),
        conn: 3,
        changes: feed.clone(),
        limits: Limits::default(),
    };
    let (near, far) = tokio::io::duplex(1 << 20);
    let session = tokio::spawn(serve(far, Arc::new(ctx)));
    let (client, info) = SftpClient::connect(near).await.unwrap();
    assert!(info.has(ext::BARRIER));

    // An editor's swap file, created and deleted at once.
    client.dev_put(put(b".f.swp", b"swap")).await.unwrap();
    client.remove(b".f.swp").await.unwrap();
    let seq = client.dev_barrier().await.unwrap();
    c.take_queued();
    let deleted = seq_of(&c.messages, |e| is(&e.change, "deleted", ".f.swp") && e.own);
    assert!(deleted.is_some_and(|d| d <= seq), "no own delete by {seq}: {:#?}", c.messages);
    assert!(c.events().all(|e| e.own), "{:#?}", c.messages);
    drop(client);
    session.await.unwrap().unwrap();
}
