//! Root confinement: every client path is resolved under an `O_PATH` descriptor of `--root`.
//!
//! Rules, chroot-like:
//! - An absolute client path is a real path of the pod and must start with the root (compared
//!   component by component); any other absolute path is `ENOENT`. A relative path is relative
//!   to the root, so `realpath .` is the root.
//! - A client's `..` at the root stays at the root.
//! - Symlinks are followed here, never by the kernel: every component is opened with
//!   `O_NOFOLLOW` relative to its parent's descriptor. An absolute target is a real path and
//!   must lie under the root; a target that leaves the root (absolute elsewhere, or a `..`
//!   climbing above the root) is refused with `EACCES`, so the client sees PERMISSION_DENIED
//!   (and can tell "refused" from "missing"). More than [`MAX_HOPS`] symlinks give `ELOOP`.
//! - The last component is never followed by the walk itself: operations act on it through
//!   the parent's descriptor with `*at()` calls and no-follow flags. Operations that follow it
//!   ([`Root::follow`]) ask for another round when they find a symlink there, so a link swapped
//!   in between two steps is never followed by the kernel.
//!
//! When the path holds no `..` and no symlink, one `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` opens the whole parent at once; any refusal falls back to the walk.
//! In a batch of reads ([`Root::reads_together`]) the parent opened that way is kept for the
//! next path of the batch with the same parent.
//!
//! Names are bytes; nothing here decodes them.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The most symlinks one resolution may follow, as Linux's own limit.
pub const MAX_HOPS: u32 = 40;

/// The confinement root: its canonical path and an `O_PATH` descriptor of it.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    components: Vec<Vec<u8>>,
}

/// The last component of a resolved path: the operation acts on `name` relative to `dir`.
/// `name` is never empty and holds no `/`; it is `.` when the path names a directory reached
/// without a last name (the root itself, `dir/..`, `dir/.`).
pub struct At<'a> {
    pub dir: BorrowedFd<'a>,
    pub name: &'a CStr,
    root: &'a Path,
    /// The directories from the root down to `dir`.
    parents: &'a [Entered<'a>],
}

impl At<'_> {
    /// The canonical absolute path (symlinks resolved except the last component). Built on
    /// demand: a stat never needs it.
    pub fn abs(&self) -> PathBuf {
        let mut p = self.root.to_path_buf();
        p.extend(self.parents.iter().map(|e| OsStr::from_bytes(&e.name)));
        if !self.names_dir() {
            p.push(OsStr::from_bytes(self.name.to_bytes()));
        }
        p
    }

    /// Whether this is the root itself.
    pub fn is_root(&self) -> bool {
        self.parents.is_empty() && self.names_dir()
    }

    fn names_dir(&self) -> bool {
        self.name.to_bytes() == b"."
    }
}

/// What a following operation found at the last component.
pub enum Step<T> {
    Done(T),
    /// The last component is a symlink: resolve its target and call the operation again.
    Symlink,
}

impl<T> Step<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Done(v) => Step::Done(f(v)),
            Step::Symlink => Step::Symlink,
        }
    }
}

impl Root {
    /// Opens `path`, which must be canonical (absolute, no symlinks, no `.`/`..`).
    pub fn open(path: &Path) -> io::Result<Root> {
        if !path.is_absolute() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "root must be absolute"));
        }
        let c = CString::new(path.as_os_str().as_bytes())?;
        let fd = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY)?;
        let components = split(path.as_os_str().as_bytes()).map(<[u8]>::to_vec).collect();
        Ok(Root { fd, path: path.to_path_buf(), components })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves all but the last component of `path` and runs `op` on the last one, which is
    /// not followed.
    pub fn at<T, E: From<io::Error>>(
        &self,
        path: &[u8],
        op: impl FnOnce(At<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut w = Walker::new(self, path)?;
        let name = w.walk_to_last()?;
        op(w.at(&name))
    }

    /// Like [`Root::at`], but when `op` reports a symlink at the last component, its target is
    /// resolved (under the same rules) and `op` runs again on what it names.
    pub fn follow<T, E: From<io::Error>>(
        &self,
        path: &[u8],
        mut op: impl FnMut(At<'_>) -> Result<Step<T>, E>,
    ) -> Result<T, E> {
        let mut w = Walker::new(self, path)?;
        loop {
            let name = w.walk_to_last()?;
            match op(w.at(&name))? {
                Step::Done(v) => return Ok(v),
                Step::Symlink => {
                    let target = match sys::readlinkat(w.dir(), &name) {
                        Ok(t) => t,
                        // Reported as a symlink but not one (any more): as the kernel would.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            return Err(errno(libc::ELOOP).into())
                        }
                        Err(e) => return Err(e.into()),
                    };
                    w.push_link(&target)?;
                }
            }
        }
    }

    /// Runs `reads`, a batch of requests that only read, with the parent directory each
    /// resolution opens in one `openat2` kept for the next one with the same parent:
    /// consecutive requests mostly name siblings, and this saves them an `openat2` and a
    /// `close` each. Sound because nothing of this connection can change what the parent's
    /// path names meanwhile: the order of requests ([`super::order`]) starts a batch only when
    /// no earlier mutation of a related path is in flight, and makes a later one wait for the
    /// whole batch. What another process does meanwhile races with the batch as it would with
    /// one request, between its `openat2` and its stat.
    pub fn reads_together<T>(&self, reads: impl FnOnce() -> T) -> T {
        /// Forgets the parent when the batch ends, however it ends.
        struct Forget;
        impl Drop for Forget {
            fn drop(&mut self) {
                RECENT.with(|r| r.borrow_mut().take());
            }
        }
        RECENT.with(|r| *r.borrow_mut() = Some(Recent { root: self, parent: None }));
        let _forget = Forget;
        reads()
    }

    /// The canonical absolute path of `path`, symlinks followed. As OpenSSH's realpath, a
    /// missing last component is allowed.
    pub fn realpath(&self, path: &[u8]) -> io::Result<PathBuf> {
        self.follow(path, |at| match sys::lstat(at.dir, at.name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => Ok(Step::Symlink),
            Ok(_) => Ok(Step::Done(at.abs())),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Step::Done(at.abs())),
            Err(e) => Err(e),
        })
    }

    /// Strips the root from an absolute path, component by component. `None` when the path
    /// does not start with the root.
    fn strip<'p>(&self, path: &'p [u8]) -> Option<impl Iterator<Item = &'p [u8]>> {
        let mut comps = split(path);
        for want in &self.components {
            if comps.next()? != want.as_slice() {
                return None;
            }
        }
        Some(comps)
    }
}

/// Non-empty, non-`.` components of a path.
fn split(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".")
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// `bytes` as a C string, allocated once; a NUL inside is `EINVAL`.
fn cstring(bytes: &[u8]) -> io::Result<CString> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.extend_from_slice(bytes);
    CString::new(v).map_err(|_| errno(libc::EINVAL))
}

/// One component still to resolve. `from_link` marks components of a symlink target, whose
/// `..` must not leave the root. Components of the client's path borrow it.
struct Pending<'p> {
    name: Cow<'p, [u8]>,
    from_link: bool,
}

/// A directory entered below the root.
struct Entered<'p> {
    /// `None` for a directory passed through by [`Walker::fast_prefix`]; shared with
    /// [`RECENT`] when it is a batch's kept parent.
    fd: Option<Rc<OwnedFd>>,
    name: Cow<'p, [u8]>,
}

thread_local! {
    /// Inside [`Root::reads_together`] on this thread: the parent directory kept.
    static RECENT: RefCell<Option<Recent>> = const { RefCell::new(None) };
}

struct Recent {
    /// The root the batch resolves under: only its walks may use the parent.
    root: *const Root,
    /// The parent's path relative to the root, components joined by `/`, and its descriptor.
    parent: Option<(Vec<u8>, Rc<OwnedFd>)>,
}

/// The kept parent `rel` under `root`, if the batch running on this thread has it.
fn recent_parent(root: &Root, rel: &[u8]) -> Option<Rc<OwnedFd>> {
    RECENT.with(|r| match &*r.borrow() {
        Some(Recent { root: kept, parent: Some((path, fd)) }) if std::ptr::eq(*kept, root) && path == rel => {
            Some(fd.clone())
        }
        _ => None,
    })
}

/// Keeps `fd`, the parent `rel` under `root`, if a batch under `root` runs on this thread.
fn keep_parent(root: &Root, rel: Vec<u8>, fd: &Rc<OwnedFd>) {
    RECENT.with(|r| {
        if let Some(recent) = r.borrow_mut().as_mut().filter(|recent| std::ptr::eq(recent.root, root)) {
            recent.parent = Some((rel, fd.clone()));
        }
    })
}

struct Walker<'r, 'p> {
    root: &'r Root,
    /// The directories entered below the root. The last entry always holds a descriptor; the
    /// ones below it may not (see [`Walker::fast_prefix`]).
    stack: Vec<Entered<'p>>,
    pending: VecDeque<Pending<'p>>,
    hops: u32,
}

static OPENAT2_WORKS: AtomicBool = AtomicBool::new(true);

impl<'r, 'p> Walker<'r, 'p> {
    fn new(root: &'r Root, path: &'p [u8]) -> io::Result<Self> {
        let mut w = Walker { root, stack: Vec::new(), pending: VecDeque::new(), hops: 0 };
        let pending = |c: &'p [u8]| Pending { name: Cow::Borrowed(c), from_link: false };
        if path.first() == Some(&b'/') {
            let rel = root.strip(path).ok_or_else(|| errno(libc::ENOENT))?;
            w.pending.extend(rel.map(pending));
        } else {
            w.pending.extend(split(path).map(pending));
        }
        Ok(w)
    }

    fn dir(&self) -> BorrowedFd<'_> {
        match self.stack.last() {
            Some(e) => e.fd.as_ref().expect("the top of the stack holds a descriptor").as_fd(),
            None => self.root.fd.as_fd(),
        }
    }

    fn at<'a>(&'a self, name: &'a CStr) -> At<'a> {
        At { dir: self.dir(), name, root: &self.root.path, parents: &self.stack }
    }

    /// Walks every pending component but the last, entering directories and expanding
    /// symlinks; returns the last name (`.` when the path ends at a directory).
    fn walk_to_last(&mut self) -> io::Result<CString> {
        self.fast_prefix()?;
        while let Some(c) = self.pending.pop_front() {
            if c.name.as_ref() == b".." {
                if !self.pop()? && c.from_link {
                    return Err(errno(libc::EACCES));
                }
                continue;
            }
            let name = cstring(&c.name)?;
            if self.pending.is_empty() {
                return Ok(name);
            }
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            match sys::openat(self.dir().as_raw_fd(), &name, flags) {
                Ok(fd) => self.stack.push(Entered { fd: Some(Rc::new(fd)), name: c.name }),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                    match sys::readlinkat(self.dir(), &name) {
                        Ok(target) => self.push_link(&target)?,
                        Err(l) if l.raw_os_error() == Some(libc::EINVAL) => return Err(e),
                        Err(l) => return Err(l),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(c".".to_owned())
    }

    /// Leaves the current directory; `false` at the root. A directory entered by
    /// [`Walker::fast_prefix`] without its own descriptor gets one, again beneath the nearest
    /// ancestor that has one, so `..` is never taken from the kernel.
    fn pop(&mut self) -> io::Result<bool> {
        if self.stack.pop().is_none() {
            return Ok(false);
        }
        if matches!(self.stack.last(), Some(Entered { fd: None, .. })) {
            let base = self.stack.iter().rposition(|e| e.fd.is_some());
            let mut rel = Vec::new();
            for e in &self.stack[base.map_or(0, |b| b + 1)..] {
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(&e.name);
            }
            let rel = cstring(&rel)?;
            let from = match base {
                Some(b) => self.stack[b].fd.as_ref().expect("found by rposition").as_fd(),
                None => self.root.fd.as_fd(),
            };
            let fd = sys::openat2_beneath(from, &rel)?;
            if let Some(top) = self.stack.last_mut() {
                top.fd = Some(Rc::new(fd));
            }
        }
        Ok(true)
    }

    /// Opens all directories before the last component in one `openat2` when nothing in
    /// them can escape (no `..`, no symlink: the kernel refuses both, and then the walk does
    /// it step by step). The directories in between get no descriptor of their own.
    fn fast_prefix(&mut self) -> io::Result<()> {
        if self.pending.len() < 2
            || !OPENAT2_WORKS.load(Ordering::Relaxed)
            || self.pending.iter().any(|c| c.name.as_ref() == b"..")
        {
            return Ok(());
        }
        let n = self.pending.len() - 1;
        let mut rel = Vec::new();
        for c in self.pending.iter().take(n) {
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&c.name);
        }
        // Only a prefix taken from the root can be the kept parent, whose path is the root's.
        let kept = if self.stack.is_empty() { recent_parent(self.root, &rel) } else { None };
        let opened = match kept {
            Some(fd) => Ok(fd),
            None => sys::openat2_beneath(self.dir(), &cstring(&rel)?).map(Rc::new),
        };
        match opened {
            Ok(fd) => {
                if self.stack.is_empty() {
                    keep_parent(self.root, rel, &fd);
                }
                self.stack.extend(self.pending.drain(..n).map(|c| Entered { fd: None, name: c.name }));
                self.stack.last_mut().expect("n >= 1").fd = Some(fd);
                Ok(())
            }
            // Without symlinks the kernel walks exactly as we would: these are the answer.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Err(e),
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
                    OPENAT2_WORKS.store(false, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// Prepends a symlink's target to the pending components.
    fn push_link(&mut self, target: &[u8]) -> io::Result<()> {
        self.hops += 1;
        if self.hops > MAX_HOPS {
            return Err(errno(libc::ELOOP));
        }
        if target.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        let comps: Vec<&[u8]> = if target[0] == b'/' {
            let rel = self.root.strip(target).ok_or_else(|| errno(libc::EACCES))?;
            self.stack.clear();
            rel.collect()
        } else {
            split(target).collect()
        };
        for c in comps.into_iter().rev() {
            self.pending.push_front(Pending { name: Cow::Owned(c.to_vec()), from_link: true });
        }
        Ok(())
    }
}

/// Thin, errno-preserving wrappers over the `*at` calls the walk needs.
pub(crate) mod sys {
    use super::*;

    pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    pub fn openat(dir: libc::c_int, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
        openat_mode(dir, name, flags, 0)
    }

    pub fn openat_mode(
        dir: libc::c_int,
        name: &CStr,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: `name` is NUL-terminated; the returned descriptor is owned by nobody else.
            let r = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
            match cvt(r) {
                // SAFETY: a fresh descriptor from openat.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn openat2_beneath(dir: BorrowedFd<'_>, rel: &CStr) -> io::Result<OwnedFd> {
        // SAFETY: open_how is plain data; zero is a valid value for every field.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // No O_NOFOLLOW: with it a trailing symlink would be opened (and fail as ENOTDIR);
        // without it RESOLVE_NO_SYMLINKS refuses it with ELOOP, like any other symlink.
        how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
        // SAFETY: valid pointers for the call's duration, and the size of the struct passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                rel.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor from openat2.
        Ok(unsafe { OwnedFd::from_raw_fd(r as libc::c_int) })
    }

    pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(buf);
            }
            if buf.len() >= libc::PATH_MAX as usize * 16 {
                return Err(errno(libc::ENAMETOOLONG));
            }
            buf.resize(buf.len() * 4, 0);
        }
    }

    pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is written by a successful call.
        cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
        // SAFETY: the call succeeded.
        Ok(unsafe { st.assume_init() })
    }

    pub fn lstat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
        fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    fn setup() -> (tempfile::TempDir, Root) {
        let tmp = tempfile::tempdir().unwrap();
        let canon = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(canon.join("a/b")).unwrap();
        std::fs::write(canon.join("a/b/f"), b"x").unwrap();
        let root = Root::open(&canon).unwrap();
        (tmp, root)
    }

    fn real(root: &Root, p: &[u8]) -> io::Result<PathBuf> {
        root.realpath(p)
    }

    fn code(r: io::Result<PathBuf>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    #[test]
    fn relative_absolute_and_dotdot() {
        let (_t, root) = setup();
        let r = root.path().to_path_buf();
        assert_eq!(real(&root, b".").unwrap(), r);
        assert_eq!(real(&root, b"").unwrap(), r);
        assert_eq!(real(&root, b"..").unwrap(), r);
        assert_eq!(real(&root, b"../../a/./b//f").unwrap(), r.join("a/b/f"));
        assert_eq!(real(&root, b"a/b/../b/f").unwrap(), r.join("a/b/f"));
        assert_eq!(real(&root, r.join("a/b").as_os_str().as_bytes()).unwrap(), r.join("a/b"));
        assert_eq!(code(real(&root, b"/etc/passwd")), libc::ENOENT);
        let mut sibling = r.as_os_str().as_bytes().to_vec();
        sibling.extend_from_slice(b"x/a");
        assert_eq!(code(real(&root, &sibling)), libc::ENOENT);
        // `..` clamps at the root, so this looks for <root>/etc/passwd.
        assert_eq!(code(real(&root, b"../../etc/passwd")), libc::ENOENT);
        assert_eq!(real(&root, b"../../a/x").unwrap(), r.join("a/x"));
        assert_eq!(code(real(&root, b"a/b/f/x")), libc::ENOTDIR);
    }

    #[test]
    fn symlinks_inside_and_outside() {
        let (_t, root) = setup();
        let r = root.path().to_path_buf();
        symlink("/etc", r.join("etc")).unwrap();
        symlink("../../..", r.join("a/up")).unwrap();
        symlink(r.join("a/b"), r.join("abs")).unwrap();
        symlink("b/f", r.join("a/rel")).unwrap();
        symlink("../../a/b/f", r.join("a/b/back")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();

        assert_eq!(code(real(&root, b"etc/passwd")), libc::EACCES);
        assert_eq!(code(real(&root, b"etc")), libc::EACCES);
        assert_eq!(code(real(&root, b"a/up/etc")), libc::EACCES);
        assert_eq!(real(&root, b"abs/f").unwrap(), r.join("a/b/f"));
        assert_eq!(real(&root, b"a/rel").unwrap(), r.join("a/b/f"));
        // `..` out of directories opened in one openat2 call.
        assert_eq!(real(&root, b"a/b/back").unwrap(), r.join("a/b/f"));
        assert_eq!(real(&root, b"a/b/../../a/b/back").unwrap(), r.join("a/b/f"));
        assert_eq!(code(real(&root, b"loop1")), libc::ELOOP);
        assert_eq!(code(real(&root, b"loop1/x")), libc::ELOOP);

        // The link itself is reachable without following it.
        let st = root.at(b"etc", |at| sys::lstat(at.dir, at.name)).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        let t = root.at(b"etc", |at| sys::readlinkat(at.dir, at.name)).unwrap();
        assert_eq!(t, b"/etc");
        let abs = root.at(b"abs/f", |at| io::Result::Ok(at.abs())).unwrap();
        assert_eq!(abs, r.join("a/b/f"));
    }

    #[test]
    fn a_batch_of_reads_keeps_the_parent_it_opened() {
        let (_t, root) = setup();
        let r = root.path().to_path_buf();
        std::fs::write(r.join("a/g"), b"").unwrap();
        let ino = |root: &Root, p: &[u8]| root.at(p, |at| sys::lstat(at.dir, at.name).map(|st| st.st_ino));
        let f = std::fs::metadata(r.join("a/b/f")).unwrap().ino();
        root.reads_together(|| {
            assert_eq!(ino(&root, b"a/b/f").unwrap(), f);
            // Swapped by another process: the batch still sees the directory it resolved, as
            // one request would between its openat2 and its stat.
            std::fs::rename(r.join("a/b"), r.join("a/moved")).unwrap();
            std::fs::create_dir(r.join("a/b")).unwrap();
            assert_eq!(ino(&root, b"a/b/f").unwrap(), f);
            // Another root on this thread, and another parent, resolve afresh.
            let other = Root::open(&r).unwrap();
            assert_eq!(code_of(ino(&other, b"a/b/f")), libc::ENOENT);
            assert!(ino(&root, b"a/g").is_ok());
            assert_eq!(code_of(ino(&root, b"a/b/f")), libc::ENOENT);
            // A symlink in the parent is still walked, and refused when it leads out.
            symlink("/etc", r.join("a/etc")).unwrap();
            assert_eq!(code_of(ino(&root, b"a/etc/passwd")), libc::EACCES);
        });
        std::fs::rename(r.join("a/moved/f"), r.join("a/b/f")).unwrap();
        root.reads_together(|| assert_eq!(ino(&root, b"a/b/f").unwrap(), f));
        // Outside a batch nothing is kept.
        std::fs::rename(r.join("a/b"), r.join("a/gone")).unwrap();
        std::fs::rename(r.join("a/moved"), r.join("a/b")).unwrap();
        assert_eq!(code_of(ino(&root, b"a/b/f")), libc::ENOENT);
    }

    fn code_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    #[test]
    fn abs_and_root_are_built_from_the_walk() {
        let (_t, root) = setup();
        let r = root.path().to_path_buf();
        symlink("a/b", r.join("lb")).unwrap();
        let of = |p: &[u8]| root.at(p, |at| io::Result::Ok((at.abs(), at.is_root()))).unwrap();
        assert_eq!(of(b"."), (r.clone(), true));
        assert_eq!(of(b"a/.."), (r.clone(), true));
        assert_eq!(of(r.as_os_str().as_bytes()), (r.clone(), true));
        assert_eq!(of(b"a"), (r.join("a"), false));
        assert_eq!(of(b"a/b/.."), (r.join("a"), false));
        assert_eq!(of(b"lb/f"), (r.join("a/b/f"), false));
        assert_eq!(of(b"lb"), (r.join("lb"), false), "a final symlink is not followed");
    }

    #[test]
    fn names_are_bytes() {
        let (_t, root) = setup();
        let r = root.path().to_path_buf();
        let name = OsStr::from_bytes(b"caf\xff\xfe");
        std::fs::create_dir(r.join(name)).unwrap();
        std::fs::write(r.join(name).join("g"), b"").unwrap();
        assert_eq!(real(&root, b"caf\xff\xfe/g").unwrap(), r.join(name).join("g"));
        assert_eq!(code(real(&root, b"a\0b")), libc::EINVAL);
    }
}
