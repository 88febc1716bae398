//! Directory listings: the names of one directory and their kinds, complete, sorted by name.

use bytes::Bytes;
use devmount_server::proto::stat::FullStat;

/// The type of a file, from the `S_IFMT` bits of `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// `None` for type bits that name no known file type.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return None,
        })
    }
}

/// One name in a cached listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Bytes,
    pub kind: FileKind,
}

/// One name of a directory as a reply gave it, for [`Cache::insert_listing`]. With `meta`
/// (readdirplus, a walk), the child's attributes go to the attribute cache too.
///
/// [`Cache::insert_listing`]: super::Cache::insert_listing
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingEntry {
    pub name: Bytes,
    pub kind: FileKind,
    pub meta: Option<FullStat>,
}

/// Every name of a directory except `.` and `..`, sorted by name bytes (so a name is found by
/// binary search, and a reader paging through a shared snapshot sees a stable order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    entries: Vec<DirEntry>,
}

impl Listing {
    /// Sorts `entries`; of duplicate names the last one stays.
    pub(super) fn new(mut entries: Vec<DirEntry>) -> Listing {
        entries.reverse();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries.dedup_by(|a, b| a.name == b.name);
        Listing { entries }
    }

    pub fn entries(&self) -> &[DirEntry] {
        &self.entries
    }

    pub fn get(&self, name: &[u8]) -> Option<&DirEntry> {
        self.find(name).ok().map(|i| &self.entries[i])
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds `entry`, or replaces the entry of the same name.
    pub(super) fn upsert(&mut self, entry: DirEntry) {
        match self.find(&entry.name) {
            Ok(i) => self.entries[i] = entry,
            Err(i) => self.entries.insert(i, entry),
        }
    }

    pub(super) fn remove(&mut self, name: &[u8]) {
        if let Ok(i) = self.find(name) {
            self.entries.remove(i);
        }
    }

    fn find(&self, name: &[u8]) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.name[..].cmp(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &'static str, kind: FileKind) -> DirEntry {
        DirEntry { name: Bytes::from_static(name.as_bytes()), kind }
    }

    #[test]
    fn kinds_from_mode() {
        assert_eq!(FileKind::from_mode(0o100644), Some(FileKind::Regular));
        assert_eq!(FileKind::from_mode(0o040755), Some(FileKind::Directory));
        assert_eq!(FileKind::from_mode(0o120777), Some(FileKind::Symlink));
        assert_eq!(FileKind::from_mode(0o010644), Some(FileKind::Fifo));
        assert_eq!(FileKind::from_mode(0o000644), None);
    }

    #[test]
    fn sorted_deduplicated_and_edited_in_place() {
        let mut l = Listing::new(vec![
            e("b", FileKind::Regular),
            e("a", FileKind::Regular),
            e("b", FileKind::Directory),
        ]);
        assert_eq!(l.entries(), &[e("a", FileKind::Regular), e("b", FileKind::Directory)]);
        l.upsert(e("ab", FileKind::Symlink));
        l.upsert(e("a", FileKind::Fifo));
        l.remove(b"b");
        l.remove(b"missing");
        assert_eq!(l.entries(), &[e("a", FileKind::Fifo), e("ab", FileKind::Symlink)]);
        assert_eq!(l.get(b"ab").map(|d| d.kind), Some(FileKind::Symlink));
        assert!(l.get(b"b").is_none());
    }
}
