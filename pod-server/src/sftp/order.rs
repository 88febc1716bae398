//! The order in which one SFTP connection's requests run.
//!
//! Requests run concurrently, but a request that depends on an earlier one must see its
//! effect: sshfs sends OPEN(create) and LSTAT of the same path back to back and fails the
//! create if the LSTAT runs first (OpenSSH's sftp-server answers one request at a time, so
//! clients rely on arrival order). The rules:
//! - Each request is a read or a mutation ([`Kind`]) and names a set of paths ([`Key`]s): the
//!   client's paths, or the path its handle was opened by.
//! - Two requests conflict when they work on the same handle (unless both only read a regular
//!   file through it: READs at offsets need no order among themselves, so one big file is read
//!   on several threads), or when at least one of them is a mutation and a path of one equals,
//!   or is an ancestor or descendant of, a path of the other (MKDIR `a` then OPEN `a/b`; RENAME
//!   `a` to `c` then STAT `c/x`).
//! - A request starts once every earlier conflicting request still in flight has finished.
//!   Reads of one path, and any requests on unrelated paths, run side by side.
//!
//! Paths are compared as named, after lexical normalization, not as resolved: `a/link/x` and
//! `a/target/x` do not conflict, and `a/link/..` counts as `a`. OpenSSH clients and sshfs name
//! the same path for requests that depend on each other, which is what this is for.
//!
//! A handle on a FIFO, socket or device names no path: its data does not live at the path,
//! and a read blocked on an empty FIFO must not hold up the write that would fill it. A
//! request that blocks still holds up the later ones that conflict with it: an OPEN of a FIFO
//! for writing waits for an earlier OPEN of it for reading, which waits for a writer.
//!
//! The reader registers requests in arrival order ([`InFlight::admit`]); nothing here blocks
//! the reader. It sees decoded requests, never bytes on the wire, and makes no system calls.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::Bytes;
use tokio::sync::watch;

use crate::proto::sftp::{open_flags, RequestBody};

/// Whether a request changes the file system (or may, like a CLOSE that flushes a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Mutation,
}

/// A path relative to the root, lexically normalized: components joined by `/`, no `.`, no
/// `..`, no empty component. The root itself is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(Bytes);

impl Key {
    /// Equal, or one lies beneath the other.
    fn related(&self, other: &Key) -> bool {
        let (short, long) =
            if self.0.len() <= other.0.len() { (&self.0, &other.0) } else { (&other.0, &self.0) };
        long.starts_with(short)
            && (short.is_empty() || long.len() == short.len() || long[short.len()] == b'/')
    }
}

/// Turns client paths into [`Key`]s, by the rules [`super::paths`] resolves them with.
#[derive(Debug)]
pub struct Keys {
    root: Vec<Vec<u8>>,
}

impl Keys {
    /// `root` is the canonical root.
    pub fn new(root: &Path) -> Keys {
        Keys { root: components(root.as_os_str().as_bytes()).map(<[u8]>::to_vec).collect() }
    }

    /// The key of a client's path; `None` for an absolute path outside the root, which names
    /// nothing (the request fails with NO_SUCH_FILE).
    pub fn key(&self, path: &[u8]) -> Option<Key> {
        let mut comps = components(path);
        if path.first() == Some(&b'/') {
            for want in &self.root {
                if comps.next()? != want.as_slice() {
                    return None;
                }
            }
        }
        let mut out: Vec<&[u8]> = Vec::new();
        for c in comps {
            if c == b".." {
                // At the root, `..` stays at the root.
                out.pop();
            } else {
                out.push(c);
            }
        }
        Some(Key(out.join(&b'/').into()))
    }

    /// The key of an `expand-path@openssh.com` argument: `~` is the root, `~user` names nothing.
    fn expanded(&self, path: &[u8]) -> Option<Key> {
        match path {
            [b'~'] => self.key(b""),
            [b'~', b'/', rest @ ..] => self.key(rest),
            [b'~', ..] => None,
            _ => self.key(path),
        }
    }
}

/// Non-empty, non-`.` components of a path.
fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".")
}

/// What ordering needs to know of an open handle.
#[derive(Debug, Clone)]
pub struct HandleScope {
    /// Unique within the connection, never reused.
    pub id: u64,
    /// The path the handle was opened by; `None` for a FIFO, socket or device.
    pub path: Option<Key>,
    /// Opened for writing: its CLOSE counts as a mutation.
    pub writes: bool,
    /// A regular file: requests that only read through the handle run side by side. Not for
    /// a FIFO or device, where every read consumes data, nor for a directory's cursor.
    pub shared_reads: bool,
}

/// How a request uses the handle it names.
#[derive(Debug, Clone, Copy)]
struct HandleUse {
    id: u64,
    /// Runs beside other shared uses of the same handle.
    shared: bool,
}

/// What one request works on.
#[derive(Debug, Clone)]
pub struct Access {
    kind: Kind,
    paths: Vec<Key>,
    handle: Option<HandleUse>,
}

impl Access {
    /// The access of `body`. `handle` is the open handle a handle request names; a handle
    /// request without one (a bad handle) works on nothing.
    pub fn of(body: &RequestBody, keys: &Keys, handle: Option<&HandleScope>) -> Access {
        use Kind::{Mutation, Read as R};
        use RequestBody::*;
        let one = |p: &[u8]| -> Vec<Key> { keys.key(p).into_iter().collect() };
        let two = |a: &[u8], b: &[u8]| -> Vec<Key> { keys.key(a).into_iter().chain(keys.key(b)).collect() };
        // `reads`: the request only reads the file, and may share the handle if the file allows.
        let on_handle = |kind, reads: bool| match handle {
            Some(h) => Access {
                kind,
                paths: h.path.iter().cloned().collect(),
                handle: Some(HandleUse { id: h.id, shared: reads && h.shared_reads }),
            },
            None => Access { kind, paths: Vec::new(), handle: None },
        };
        let (kind, named) = match body {
            Open { filename, pflags, .. } => {
                let changes = open_flags::WRITE | open_flags::CREAT | open_flags::TRUNC;
                (if pflags & changes != 0 { Mutation } else { R }, one(filename))
            }
            Opendir { path }
            | Lstat { path }
            | Stat { path }
            | Readlink { path }
            | Realpath { path }
            | Statvfs { path }
            | DevStat { path, .. }
            | DevWalk { path, .. }
            | DevList { path, .. }
            | DevGet { path, .. } => (R, one(path)),
            ExpandPath { path } => (R, keys.expanded(path).into_iter().collect()),
            // A barrier covers the changes finished before it arrived: it waits for nothing.
            Limits | DevBarrier | Extended { .. } => (R, Vec::new()),
            Setstat { path, .. }
            | Lsetstat { path, .. }
            | DevSetstat { path, .. }
            | Mkdir { path, .. }
            | Rmdir { path }
            | DevMknod { path, .. } => (Mutation, one(path)),
            Remove { filename } => (Mutation, one(filename)),
            // The target is stored, not resolved.
            Symlink { linkpath, .. } => (Mutation, one(linkpath)),
            DevPut(put) => (Mutation, one(&put.path)),
            Rename { oldpath, newpath }
            | PosixRename { oldpath, newpath }
            | Hardlink { oldpath, newpath }
            | DevRename { oldpath, newpath, .. } => (Mutation, two(oldpath, newpath)),
            Read { .. } | Fstat { .. } | Fstatvfs { .. } | DevFstat { .. } => return on_handle(R, true),
            // They move the handle's cursor.
            Readdir { .. } | DevWalkRead { .. } => return on_handle(R, false),
            Write { .. } | Fsetstat { .. } | Fsync { .. } | DevWrite { .. } => {
                return on_handle(Mutation, false)
            }
            Close { .. } => {
                return on_handle(if handle.is_some_and(|h| h.writes) { Mutation } else { R }, false)
            }
        };
        Access { kind, paths: named, handle: None }
    }

    /// Whether `self` and a later `other` must run in arrival order.
    fn conflicts(&self, other: &Access) -> bool {
        if let (Some(a), Some(b)) = (self.handle, other.handle) {
            if a.id == b.id && !(a.shared && b.shared) {
                return true;
            }
        }
        (self.kind == Kind::Mutation || other.kind == Kind::Mutation)
            && self.paths.iter().any(|a| other.paths.iter().any(|b| a.related(b)))
    }

    /// Conflicts with nothing.
    fn is_free(&self) -> bool {
        self.handle.is_none() && self.paths.is_empty()
    }
}

/// The requests of one connection that have not finished, in arrival order. Finished ones are
/// dropped at the next [`InFlight::admit`], so it holds at most the reader's in-flight cap.
#[derive(Default)]
pub struct InFlight {
    entries: Vec<Entry>,
}

struct Entry {
    access: Access,
    /// Closed when the request has finished.
    done: watch::Receiver<()>,
}

impl InFlight {
    /// Registers the next request to arrive. Its [`Turn`] comes once every earlier request that
    /// conflicts with it has finished.
    pub fn admit(&mut self, access: Access) -> Turn {
        self.entries.retain(|e| e.done.has_changed().is_ok());
        let after =
            self.entries.iter().filter(|e| e.access.conflicts(&access)).map(|e| e.done.clone()).collect();
        let (done, rx) = watch::channel(());
        if !access.is_free() {
            self.entries.push(Entry { access, done: rx });
        }
        Turn { after, done }
    }
}

/// A request's place in the order.
pub struct Turn {
    after: Vec<watch::Receiver<()>>,
    done: watch::Sender<()>,
}

/// Held while a request runs; dropping it lets the requests waiting on this one go.
pub struct Done {
    _signal: watch::Sender<()>,
}

impl Turn {
    /// Starts the request now if every earlier conflicting request has finished; otherwise
    /// gives the turn back, to be waited for.
    pub fn try_start(mut self) -> Result<Done, Turn> {
        // An earlier request has finished when it has dropped its sender.
        self.after.retain(|earlier| earlier.has_changed().is_ok());
        if self.after.is_empty() {
            Ok(Done { _signal: self.done })
        } else {
            Err(self)
        }
    }

    /// Waits until every earlier conflicting request has finished.
    pub async fn wait(self) -> Done {
        for mut earlier in self.after {
            // Nothing is ever sent: this returns when the earlier request drops its sender.
            let _ = earlier.changed().await;
        }
        Done { _signal: self.done }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::proto::sftp::Attrs;

    fn keys() -> Keys {
        Keys::new(Path::new("/srv/root"))
    }

    fn key(k: &str) -> Option<Key> {
        Some(Key(Bytes::copy_from_slice(k.as_bytes())))
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn keys_follow_the_resolution_rules() {
        let k = keys();
        for (path, want) in [
            ("a/b", "a/b"),
            ("./a//b/", "a/b"),
            ("", ""),
            (".", ""),
            ("..", ""),
            ("../../a", "a"),
            ("a/../b", "b"),
            ("a/b/../..", ""),
            ("/srv/root", ""),
            ("/srv/root/a/./b", "a/b"),
            ("/srv/root/../x", "x"),
            ("//srv//root/a", "a"),
        ] {
            assert_eq!(k.key(path.as_bytes()), key(want), "{path}");
        }
        for outside in ["/", "/srv", "/srv/other/a", "/srv/rootx/a", "/srv/../srv/root/a"] {
            assert_eq!(k.key(outside.as_bytes()), None, "{outside}");
        }
        assert_eq!(k.expanded(b"~"), key(""));
        assert_eq!(k.expanded(b"~/a/../b"), key("b"));
        assert_eq!(k.expanded(b"~bob/a"), None);
        assert_eq!(k.key(b"caf\xe9/\xff"), Some(Key(Bytes::from_static(b"caf\xe9/\xff"))));
    }

    #[test]
    fn related_is_equal_or_beneath() {
        let rel = |a: &str, b: &str| key(a).unwrap().related(&key(b).unwrap());
        assert!(rel("a", "a") && rel("a", "a/b") && rel("a/b/c", "a") && rel("", "x/y") && rel("x", ""));
        assert!(!rel("a", "ab") && !rel("ab", "a/b") && !rel("a/b", "a/c"));
    }

    fn stat(p: &str) -> RequestBody {
        RequestBody::Lstat { path: b(p) }
    }

    fn mkdir(p: &str) -> RequestBody {
        RequestBody::Mkdir { path: b(p), attrs: Attrs::default() }
    }

    fn open(p: &str, pflags: u32) -> RequestBody {
        RequestBody::Open { filename: b(p), pflags, attrs: Attrs::default() }
    }

    fn conflict(first: &RequestBody, then: &RequestBody) -> bool {
        let k = keys();
        Access::of(first, &k, None).conflicts(&Access::of(then, &k, None))
    }

    #[test]
    fn mutations_order_against_related_paths() {
        let create = open("f", open_flags::WRITE | open_flags::CREAT);
        assert!(conflict(&create, &stat("f")));
        assert!(conflict(&stat("f"), &create));
        assert!(conflict(&mkdir("a"), &open("a/f", open_flags::WRITE | open_flags::CREAT)));
        let rename = RequestBody::Rename { oldpath: b("a"), newpath: b("/srv/root/c") };
        assert!(conflict(&rename, &stat("c/x")));
        assert!(conflict(&rename, &stat("a")));
        assert!(conflict(
            &RequestBody::Remove { filename: b("d/f") },
            &RequestBody::Opendir { path: b(".") }
        ));
        // Reads of one path, and anything on unrelated paths, run side by side.
        assert!(!conflict(&open("f", open_flags::READ), &stat("f")));
        assert!(!conflict(&stat("f"), &RequestBody::Stat { path: b("f") }));
        assert!(!conflict(&mkdir("a"), &stat("b")));
        assert!(!conflict(&mkdir("a"), &stat("/elsewhere/a")));
        assert!(!conflict(&RequestBody::Limits, &mkdir("a")));
        // The link's target is not a path the request works on.
        let symlink = RequestBody::Symlink { linkpath: b("l"), target: b("t") };
        assert!(conflict(&symlink, &stat("l")) && !conflict(&symlink, &stat("t")));
    }

    #[test]
    fn handles_order_by_handle_and_by_path() {
        let k = keys();
        let file = HandleScope { id: 1, path: key("d/f"), writes: true, shared_reads: true };
        let reader = HandleScope { id: 2, path: key("d/f"), writes: false, shared_reads: true };
        let fifo = HandleScope { id: 3, path: None, writes: true, shared_reads: false };
        let dir = HandleScope { id: 4, path: key("d"), writes: false, shared_reads: false };
        let on = |body: RequestBody, h: &HandleScope| Access::of(&body, &k, Some(h));
        let read = || RequestBody::Read { handle: b(""), offset: 0, len: 1 };
        let write = RequestBody::Write { handle: b(""), offset: 0, data: b("x") };
        let close = RequestBody::Close { handle: b("") };
        let path = |body: RequestBody| Access::of(&body, &k, None);
        // Same handle: reads of a regular file side by side, anything else in order.
        assert!(!on(read(), &reader).conflicts(&on(read(), &reader)));
        assert!(!on(read(), &file).conflicts(&on(RequestBody::Fstat { handle: b("") }, &file)));
        assert!(on(read(), &file).conflicts(&on(write.clone(), &file)));
        assert!(on(write.clone(), &file).conflicts(&on(read(), &file)));
        assert!(on(read(), &file).conflicts(&on(close.clone(), &file)));
        assert!(on(read(), &fifo).conflicts(&on(read(), &fifo)));
        let readdir = || RequestBody::Readdir { handle: b("") };
        assert!(on(readdir(), &dir).conflicts(&on(readdir(), &dir)));
        assert!(!on(read(), &reader).conflicts(&on(read(), &file)));
        assert!(on(write.clone(), &file).conflicts(&path(stat("d/f"))));
        assert!(on(write.clone(), &file).conflicts(&path(RequestBody::Opendir { path: b("d") })));
        assert!(!on(read(), &file).conflicts(&path(stat("d/f"))));
        assert!(on(close.clone(), &file).conflicts(&path(stat("d/f"))));
        assert!(!on(close, &reader).conflicts(&path(stat("d/f"))));
        assert!(!on(write.clone(), &fifo).conflicts(&path(stat("d/f"))));
        assert!(!on(write, &fifo).conflicts(&on(read(), &reader)));
    }

    fn poll<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_turn_comes_when_the_earlier_conflicting_requests_are_done() {
        let k = keys();
        let mut in_flight = InFlight::default();
        let create = in_flight.admit(Access::of(&open("f", open_flags::CREAT | open_flags::WRITE), &k, None));
        let other = in_flight.admit(Access::of(&stat("g"), &k, None));
        let dependent = in_flight.admit(Access::of(&stat("f"), &k, None));
        let Poll::Ready(create) = poll(pin!(create.wait())) else { panic!("nothing comes before it") };
        let Poll::Ready(other) = poll(pin!(other.wait())) else { panic!("conflicts with nothing") };
        let mut dependent = pin!(dependent.wait());
        assert!(poll(dependent.as_mut()).is_pending());
        drop(other);
        assert!(poll(dependent.as_mut()).is_pending());
        drop(create);
        let Poll::Ready(running) = poll(dependent.as_mut()) else { panic!("the create is done") };
        // Finished requests leave the set; requests that name nothing never enter it.
        in_flight.admit(Access::of(&RequestBody::Limits, &k, None));
        assert_eq!(in_flight.entries.len(), 1, "the dependent stat still runs");
        drop(running);
        in_flight.admit(Access::of(&RequestBody::Limits, &k, None));
        assert_eq!(in_flight.entries.len(), 0);
    }

    #[test]
    fn a_turn_starts_at_once_only_when_nothing_conflicting_runs() {
        let k = keys();
        let mut in_flight = InFlight::default();
        let create = in_flight.admit(Access::of(&open("f", open_flags::CREAT | open_flags::WRITE), &k, None));
        let create = create.try_start().ok().expect("nothing comes before it");
        let free = in_flight.admit(Access::of(&stat("g"), &k, None));
        let _free = free.try_start().ok().expect("conflicts with nothing");
        let dependent = in_flight.admit(Access::of(&stat("f"), &k, None));
        let Err(dependent) = dependent.try_start() else { panic!("the create still runs") };
        drop(create);
        assert!(dependent.try_start().is_ok(), "the create is done");
    }
}
