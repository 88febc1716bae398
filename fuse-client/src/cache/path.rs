//! [`RelPath`]: the key of every cache. A path relative to the mount root, as the feed spells it.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};

use bytes::{BufMut, Bytes, BytesMut};

/// A path relative to the mount root: components joined by single `/`, no leading or trailing
/// slash, no empty, `.` or `..` component, no NUL. The root is the empty path. This is exactly
/// the form of the feed's paths (`docs/protocol.md`, *Paths*), so feed events key the caches
/// without translation; the SFTP layer prefixes the remote root.
///
/// Equality, hashing and ordering are those of the bytes, so a `&[u8]` can look a `RelPath` up
/// (`Borrow<[u8]>`), and in byte order a directory's descendants follow it as one range
/// (`dir/` up to `dir0`; `0` is the byte after `/`).
#[derive(Clone, Default)]
pub struct RelPath(Bytes);

/// Why bytes are not a [`RelPath`] or a file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("not a plain relative path: {0:?}")]
    BadPath(Bytes),
    #[error("not a plain file name: {0:?}")]
    BadName(Bytes),
}

impl RelPath {
    /// The mount root.
    pub fn root() -> RelPath {
        RelPath(Bytes::new())
    }

    /// Checks and copies `path`. The copy matters: a path sliced out of a large frame would
    /// otherwise keep the whole frame alive for as long as the cache holds the key.
    pub fn new(path: &[u8]) -> Result<RelPath, PathError> {
        if !path.is_empty() && !path.split(|&b| b == b'/').all(is_name) {
            return Err(PathError::BadPath(Bytes::copy_from_slice(path)));
        }
        Ok(RelPath(Bytes::copy_from_slice(path)))
    }

    /// The child `name` of this directory. `name` must be one plain component.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        if !is_name(name) {
            return Err(PathError::BadName(Bytes::copy_from_slice(name)));
        }
        if self.is_root() {
            return Ok(RelPath(Bytes::copy_from_slice(name)));
        }
        let mut b = BytesMut::with_capacity(self.0.len() + 1 + name.len());
        b.put_slice(&self.0);
        b.put_u8(b'/');
        b.put_slice(name);
        Ok(RelPath(b.freeze()))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The directory holding this path; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        Some(RelPath(self.0.slice(..self.split_at())))
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        if self.is_root() {
            return None;
        }
        let at = self.split_at();
        Some(if at == 0 { &self.0[..] } else { &self.0[at + 1..] })
    }

    /// Whether `self` is `dir` or lies below it, component-wise (`a/bc` is not below `a/b`).
    pub fn starts_with(&self, dir: &RelPath) -> bool {
        is_under(&self.0, &dir.0)
    }

    /// `self` moved from below `from` to below `to`; `None` if `self` is not at or below `from`.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        if !self.starts_with(from) {
            return None;
        }
        let rest = &self.0[from.0.len()..];
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            return Some(to.clone());
        }
        if to.is_root() {
            return Some(RelPath(Bytes::copy_from_slice(rest)));
        }
        let mut b = BytesMut::with_capacity(to.0.len() + 1 + rest.len());
        b.put_slice(&to.0);
        b.put_u8(b'/');
        b.put_slice(rest);
        Some(RelPath(b.freeze()))
    }

    /// The proper ancestors as byte slices, nearest first, ending with the root (empty).
    pub(super) fn ancestors(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = Some(&self.0[..]).filter(|b| !b.is_empty());
        std::iter::from_fn(move || {
            let cur = rest?;
            let parent = &cur[..cur.iter().rposition(|&b| b == b'/').unwrap_or(0)];
            rest = Some(parent).filter(|b| !b.is_empty());
            Some(parent)
        })
    }

    /// The byte range, in path order, of everything strictly below this directory: from
    /// `dir/` (inclusive) to `dir0` (exclusive). The root has no such range: everything is
    /// below it, and callers clear instead.
    pub(super) fn descendant_bounds(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        if self.is_root() {
            return None;
        }
        let mut lo = self.0.to_vec();
        lo.push(b'/');
        let mut hi = self.0.to_vec();
        hi.push(b'/' + 1);
        Some((lo, hi))
    }

    /// Index of the last `/`, or 0 when there is none (a top-level name).
    fn split_at(&self) -> usize {
        self.0.iter().rposition(|&b| b == b'/').unwrap_or(0)
    }
}

/// Whether `path` is `dir` or below it, on raw relative-path bytes.
pub(super) fn is_under(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || (path.starts_with(dir) && (path.len() == dir.len() || path[dir.len()] == b'/'))
}

/// One plain component: not empty, not `.` or `..`, no `/` and no NUL.
pub fn is_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

impl PartialEq for RelPath {
    fn eq(&self, other: &Self) -> bool {
        self.0[..] == other.0[..]
    }
}

impl Eq for RelPath {}

impl Hash for RelPath {
    // Must hash exactly like `[u8]` for `Borrow<[u8]>` look-ups.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0[..].hash(state)
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0[..].cmp(&other.0[..])
    }
}

impl Borrow<[u8]> for RelPath {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", self.0)
    }
}

impl fmt::Display for RelPath {
    /// Lossy, for logs only: `/` for the root, else the path with invalid UTF-8 replaced.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn accepts_plain_paths_only() {
        for ok in ["", "a", "a/b", "a/.b", "a/..b", "a/b c/\u{ff}"] {
            assert!(RelPath::new(ok.as_bytes()).is_ok(), "{ok:?}");
        }
        assert!(RelPath::new(b"a/\xff").is_ok());
        for bad in ["/", "/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "a\0b"] {
            assert!(RelPath::new(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn join_checks_the_name() {
        assert_eq!(RelPath::root().join(b"a").unwrap(), p("a"));
        assert_eq!(p("a").join(b"b").unwrap(), p("a/b"));
        for bad in [&b""[..], b".", b"..", b"/", b"a/b", b"a\0"] {
            assert!(p("a").join(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parent_and_file_name() {
        assert_eq!(RelPath::root().parent(), None);
        assert_eq!(RelPath::root().file_name(), None);
        assert_eq!(p("a").parent(), Some(RelPath::root()));
        assert_eq!(p("a").file_name(), Some(&b"a"[..]));
        assert_eq!(p("a/b/c").parent(), Some(p("a/b")));
        assert_eq!(p("a/b/c").file_name(), Some(&b"c"[..]));
    }

    #[test]
    fn ancestors_nearest_first_to_the_root() {
        let path = p("a/b/c");
        let a: Vec<&[u8]> = path.ancestors().collect();
        assert_eq!(a, vec![&b"a/b"[..], b"a", b""]);
        assert_eq!(p("a").ancestors().collect::<Vec<_>>(), vec![&b""[..]]);
        assert_eq!(RelPath::root().ancestors().count(), 0);
    }

    #[test]
    fn prefixes_are_component_wise() {
        assert!(p("a/b").starts_with(&p("a")));
        assert!(p("a").starts_with(&p("a")));
        assert!(p("a").starts_with(&RelPath::root()));
        assert!(!p("ab").starts_with(&p("a")));
        assert!(!p("a").starts_with(&p("a/b")));
    }

    #[test]
    fn rebase_moves_a_subtree() {
        assert_eq!(p("a/b/c").rebase(&p("a/b"), &p("x")), Some(p("x/c")));
        assert_eq!(p("a/b").rebase(&p("a/b"), &p("x/y")), Some(p("x/y")));
        assert_eq!(p("a/b").rebase(&p("a"), &RelPath::root()), Some(p("b")));
        assert_eq!(p("a/bc").rebase(&p("a/b"), &p("x")), None);
    }

    #[test]
    fn descendants_form_one_byte_range() {
        let (lo, hi) = p("a").descendant_bounds().unwrap();
        let inside = |s: &str| s.as_bytes() >= &lo[..] && s.as_bytes() < &hi[..];
        assert!(inside("a/b") && inside("a/\u{ff}") && inside("a/b/c"));
        assert!(!inside("a") && !inside("a-b") && !inside("a0") && !inside("ab"));
        assert!(RelPath::root().descendant_bounds().is_none());
    }
}
