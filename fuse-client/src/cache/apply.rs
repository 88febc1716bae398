//! Applying feed messages and local changes: what each one invalidates (the table in the
//! module documentation).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use devmount_server::proto::feed::{Change, FeedEvent, FeedMessage};
use devmount_server::proto::stat::FullStat;

use super::{
    Cache, DirEntry, Entry, FeedState, FileKind, InvalKind, Invalidation, Listing, LocalChange, RelPath,
};

/// Invalidations in the order first seen, without repeats (a batch of creates in one directory
/// invalidates that directory once). An item is own only if every event behind it was.
#[derive(Default)]
struct Report {
    items: Vec<Invalidation>,
    seen: HashMap<(InvalKind, RelPath), usize>,
}

impl Report {
    fn push(&mut self, kind: InvalKind, path: &RelPath, own: bool) {
        match self.seen.get(&(kind, path.clone())) {
            Some(&i) => self.items[i].own &= own,
            None => {
                self.seen.insert((kind, path.clone()), self.items.len());
                self.items.push(Invalidation { kind, path: path.clone(), own });
            }
        }
    }
}

/// What happened to one name of a directory.
enum NameEdit {
    /// Appeared, of this kind: the listing gains it.
    Added(FileKind),
    /// Gone: the listing loses it.
    Removed,
    /// Changed in a way the listing cannot follow: the listing is dropped.
    Unknown,
}

impl Cache {
    /// Applies one feed message and returns what it made stale (see [`Invalidation`]).
    ///
    /// `hello` and `resync` drop everything and refuse every reply older than their sequence:
    /// after a reconnect or a lost event nothing cached can be vouched for. `ready` turns on
    /// long TTLs for entries from its sequence on; `unwatched` marks a subtree short-TTL, and
    /// the mark follows renames and goes with deletes. A path in an event that is not a plain
    /// relative path (the decoder refuses those, so only a bug sends one) drops everything.
    pub fn apply(&mut self, msg: &FeedMessage, now: Instant) -> Vec<Invalidation> {
        let mut report = Report::default();
        match msg {
            FeedMessage::Hello { seq, .. } => {
                // A restarted server counts from 1 again: start over from its number.
                self.applied = *seq;
                self.reset(*seq, &mut report);
                self.policy.feed = FeedState::Waiting;
            }
            FeedMessage::Ready { seq } => self.policy.feed = FeedState::Ready { since: *seq },
            FeedMessage::Resync { seq } => {
                self.reset(*seq, &mut report);
                self.policy.feed = FeedState::Waiting;
            }
            FeedMessage::Unwatched { path, .. } => {
                // A mark that cannot be located covers everything: short TTLs are always safe.
                let p = RelPath::new(path).unwrap_or_else(|_| RelPath::root());
                self.policy.unwatched.insert(p);
            }
            FeedMessage::Batch { seq, events } => {
                for e in events {
                    self.apply_event(e, *seq, now, &mut report);
                }
            }
        }
        self.applied = self.applied.max(msg.seq());
        report.items
    }

    /// Drops what a local mutation made stale. No sequence marks: see the module documentation.
    /// Listings are dropped rather than edited, since the change is not on the server yet.
    /// `dir` was made here (mkdir): empty as made, so names looked up in it are known
    /// missing without a round trip. (The feed's own create event for it says the same.)
    pub fn local_mkdir(&mut self, dir: &RelPath, now: Instant) {
        self.name_changed(dir, None);
        let seq = self.applied;
        self.dirs
            .insert(dir.clone(), Entry { value: Arc::new(Listing::new(Vec::new())), seq, inserted: now });
    }

    pub fn local_change(&mut self, change: LocalChange<'_>) {
        let mut report = Report::default();
        match change {
            // The parent's attributes and listing stay: the mount's local state answers for the
            // changed name until the server has it, and the feed (or `Settled`) updates them.
            LocalChange::Created(p) | LocalChange::Removed(p) => self.name_changed(p, None),

            LocalChange::Settled(p) => {
                self.name_changed(p, None);
                self.names_changed(p, NameEdit::Unknown, None, false, &mut report);
            }
            LocalChange::Modified(p) => {
                self.attrs.remove(p.as_bytes());
                self.data.remove_file(p.as_bytes());
            }
            LocalChange::Attrib(p) => {
                self.attrs.remove(p.as_bytes());
            }
            LocalChange::Renamed { from, to } => {
                self.name_changed(from, None);
                self.name_changed(to, None);
            }
        }
    }

    fn apply_event(&mut self, e: &FeedEvent, seq: u64, now: Instant, report: &mut Report) {
        let own = e.own;
        match &e.change {
            Change::Created { path, stat } => {
                let Some(p) = self.locate(path, seq, report) else { return };
                let own_mkdir = own && stat.is_some_and(|s| s.mode & libc::S_IFMT == libc::S_IFDIR);
                if own_mkdir {
                    // This mount's own mkdir. What is cached below it is this mount's own since
                    // (the listings of directories made in it here): a directory the name had
                    // before took its subtree with it at its delete event. Dropping them would
                    // cost a round trip in each, while an untar is still making them.
                    self.marks.mark(&p, seq, true);
                    self.attrs.remove(p.as_bytes());
                    self.missing.remove(p.as_bytes());
                } else {
                    self.name_changed(&p, Some(seq));
                }
                self.names_changed(&p, added(stat.as_ref()), Some(seq), own, report);
                self.store_dir_stat(&p, e.dir.as_ref(), seq, now);
                self.store_event_stat(&p, stat.as_ref(), seq, now);
                if own_mkdir {
                    // Empty when made, and every name added to it since comes as a later event.
                    self.dirs.insert(
                        p.clone(),
                        Entry { value: Arc::new(Listing::new(Vec::new())), seq, inserted: now },
                    );
                }
                report.push(InvalKind::Entry, &p, own);
            }
            Change::Modified { path, stat } => {
                let Some(p) = self.locate(path, seq, report) else { return };
                self.marks.mark(&p, seq, false);
                self.data.remove_file(p.as_bytes());
                self.store_event_stat(&p, stat.as_ref(), seq, now);
                report.push(InvalKind::Attr, &p, own);
                report.push(InvalKind::Data, &p, own);
            }
            Change::Attrib { path, stat } => {
                let Some(p) = self.locate(path, seq, report) else { return };
                self.marks.mark(&p, seq, false);
                self.store_event_stat(&p, stat.as_ref(), seq, now);
                report.push(InvalKind::Attr, &p, own);
            }
            Change::Deleted { path } => {
                let Some(p) = self.locate(path, seq, report) else { return };
                self.name_changed(&p, Some(seq));
                self.move_unwatched(&p, None);
                self.missing.insert(p.clone(), Entry { value: (), seq, inserted: now });
                self.names_changed(&p, NameEdit::Removed, Some(seq), own, report);
                self.store_dir_stat(&p, e.dir.as_ref(), seq, now);
                report.push(InvalKind::Gone, &p, own);
            }
            Change::Renamed { from, to, stat } => {
                let Some(f) = self.locate(from, seq, report) else { return };
                let Some(t) = self.locate(to, seq, report) else { return };
                self.name_changed(&f, Some(seq));
                self.name_changed(&t, Some(seq));
                self.move_unwatched(&t, None);
                self.move_unwatched(&f, Some(&t));
                self.missing.insert(f.clone(), Entry { value: (), seq, inserted: now });
                self.names_changed(&f, NameEdit::Removed, Some(seq), own, report);
                self.names_changed(&t, added(stat.as_ref()), Some(seq), own, report);
                self.store_dir_stat(&t, e.dir.as_ref(), seq, now);
                self.store_event_stat(&t, stat.as_ref(), seq, now);
                report.push(InvalKind::Gone, &f, own);
                report.push(InvalKind::Entry, &t, own);
            }
        }
    }

    /// The event's path as a key; one that is not a plain path drops everything.
    fn locate(&mut self, path: &Bytes, seq: u64, report: &mut Report) -> Option<RelPath> {
        match RelPath::new(path) {
            Ok(p) => Some(p),
            Err(_) => {
                self.reset(seq, report);
                None
            }
        }
    }

    /// Drops every cache, every mark and every unwatched mark; refuses replies before `floor`.
    fn reset(&mut self, floor: u64, report: &mut Report) {
        self.attrs.clear();
        self.missing.clear();
        self.dirs.clear();
        self.data.clear();
        self.marks.reset(floor);
        self.policy.unwatched.clear();
        report.push(InvalKind::Everything, &RelPath::root(), false);
    }

    /// The name `p` now means something else: it and everything below it go.
    fn name_changed(&mut self, p: &RelPath, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.marks.mark(p, seq, true);
        }
        self.attrs.remove_subtree(p);
        self.missing.remove_subtree(p);
        self.dirs.remove_subtree(p);
        self.data.remove_subtree(p);
    }

    /// The directory holding `p` changed: its attributes (mtime, size, nlink) go, it surely
    /// exists, and its listing follows `edit`.
    fn names_changed(
        &mut self,
        p: &RelPath,
        edit: NameEdit,
        seq: Option<u64>,
        own: bool,
        report: &mut Report,
    ) {
        let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else { return };
        if let Some(seq) = seq {
            self.marks.mark(&dir, seq, false);
        }
        self.attrs.remove(dir.as_bytes());
        self.missing.remove(dir.as_bytes());
        match edit {
            NameEdit::Added(kind) => self.dirs.update(&dir, |e| {
                Arc::make_mut(&mut e.value).upsert(DirEntry { name: Bytes::copy_from_slice(name), kind })
            }),
            NameEdit::Removed => self.dirs.update(&dir, |e| Arc::make_mut(&mut e.value).remove(name)),
            NameEdit::Unknown => {
                self.dirs.remove(dir.as_bytes());
            }
        }
        report.push(InvalKind::Attr, &dir, own);
        report.push(InvalKind::Listing, &dir, own);
    }

    /// The directory holding `p`, as the event states it (its mtime and link count moved with
    /// the name): stored, so the next path walk through it needs no round trip.
    fn store_dir_stat(&mut self, p: &RelPath, dir: Option<&FullStat>, seq: u64, now: Instant) {
        if let (Some(parent), Some(st)) = (p.parent(), dir) {
            self.attrs.insert(parent, Entry { value: *st, seq, inserted: now });
        }
    }

    /// Replaces what is known of `p` with the event's stat, the newest state the server knows.
    fn store_event_stat(&mut self, p: &RelPath, stat: Option<&FullStat>, seq: u64, now: Instant) {
        self.missing.remove(p.as_bytes());
        match stat {
            Some(st) => self.attrs.insert(p.clone(), Entry { value: *st, seq, inserted: now }),
            None => {
                self.attrs.remove(p.as_bytes());
            }
        }
    }

    /// Unwatched marks at or below `from` move below `to`, or go when `to` is `None`.
    fn move_unwatched(&mut self, from: &RelPath, to: Option<&RelPath>) {
        let set = &mut self.policy.unwatched;
        let moved: Vec<RelPath> = set.iter().filter(|u| u.starts_with(from)).cloned().collect();
        for u in moved {
            set.remove(&u);
            if let Some(n) = to.and_then(|to| u.rebase(from, to)) {
                set.insert(n);
            }
        }
    }
}

/// A name appeared with this stat: the listing can gain it only if the stat gives its kind.
fn added(stat: Option<&FullStat>) -> NameEdit {
    match stat {
        Some(st) => FileKind::from_mode(st.mode).map_or(NameEdit::Unknown, NameEdit::Added),
        // Gone by the time the server looked: not in the directory now, and a later event says
        // what became of it (a put's temporary file renamed into place, say).
        None => NameEdit::Removed,
    }
}
