//! Own-change notes: which SSH connection said it is about to change which path.
//!
//! The SFTP server notes `(conn, path)` just before each mutation. Every change the watcher
//! then sees on that path is that connection's own, until the note is *consumed*: at the end
//! of the first window in which a change matched it, unless the connection noted the path
//! again after that change was seen (another mutation is under way). A note nothing matches
//! (the mutation failed, or changed nothing) lapses after [`NOTE_TTL`].
//!
//! Consequence, documented in `docs/protocol.md (Change feed)`: a pod process changing the same path
//! while a note is alive is marked own as well.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long a note waits for a matching change.
pub(super) const NOTE_TTL: Duration = Duration::from_secs(2);
/// Below this many noted paths, lapsed notes are not looked for.
const PRUNE_FLOOR: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Note {
    conn: u64,
    noted: Instant,
    matched: Option<Instant>,
}

pub(super) struct Notes {
    by_path: HashMap<Bytes, Vec<Note>>,
    /// Paths matched in the current window, settled at its end.
    matched: Vec<Bytes>,
    prune_at: usize,
}

impl Default for Notes {
    fn default() -> Self {
        Notes { by_path: HashMap::new(), matched: Vec::new(), prune_at: PRUNE_FLOOR }
    }
}

impl Notes {
    pub fn note(&mut self, conn: u64, path: Bytes, now: Instant) {
        let notes = self.by_path.entry(path).or_default();
        match notes.iter_mut().find(|n| n.conn == conn) {
            Some(n) => n.noted = now,
            None => notes.push(Note { conn, noted: now, matched: None }),
        }
        if self.by_path.len() >= self.prune_at {
            // Amortised: a full pass only each time the map has doubled since the last one.
            self.by_path.retain(|_, notes| {
                notes.retain(|n| now.duration_since(n.noted) < NOTE_TTL);
                !notes.is_empty()
            });
            self.prune_at = (self.by_path.len() * 2).max(PRUNE_FLOOR);
        }
    }

    /// The connections whose live notes cover a change of `path` seen at `now`.
    pub fn matching(&mut self, path: &[u8], now: Instant) -> Vec<u64> {
        let Some(notes) = self.by_path.get_mut(path) else { return Vec::new() };
        let mut conns = Vec::new();
        for n in notes.iter_mut().filter(|n| now.duration_since(n.noted) < NOTE_TTL) {
            conns.push(n.conn);
            n.matched.get_or_insert(now);
        }
        if !conns.is_empty() {
            self.matched.push(Bytes::copy_from_slice(path));
        }
        conns
    }

    /// Ends a window: consumes the notes it matched, keeping those noted again since.
    pub fn settle(&mut self, now: Instant) {
        for path in self.matched.drain(..) {
            if let Some(notes) = self.by_path.get_mut(&path) {
                notes.retain(|n| match n.matched {
                    Some(m) => n.noted > m && now.duration_since(n.noted) < NOTE_TTL,
                    None => now.duration_since(n.noted) < NOTE_TTL,
                });
                for n in notes.iter_mut() {
                    n.matched = None;
                }
                if notes.is_empty() {
                    self.by_path.remove(&path);
                }
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_path.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_covers_its_window_then_is_consumed() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut notes = Notes::default();
        notes.note(7, Bytes::from_static(b"a"), t0);
        assert_eq!(notes.matching(b"a", ms(1)), vec![7]);
        assert_eq!(notes.matching(b"a", ms(2)), vec![7], "same window");
        assert_eq!(notes.matching(b"b", ms(2)), Vec::<u64>::new());
        notes.settle(ms(5));
        assert_eq!(notes.matching(b"a", ms(6)), Vec::<u64>::new(), "consumed");
        assert_eq!(notes.len(), 0);
    }

    #[test]
    fn a_note_renewed_after_its_change_survives_the_window() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut notes = Notes::default();
        notes.note(7, Bytes::from_static(b"a"), t0);
        notes.note(8, Bytes::from_static(b"a"), t0);
        assert_eq!(notes.matching(b"a", ms(1)), vec![7, 8]);
        notes.note(7, Bytes::from_static(b"a"), ms(2));
        notes.settle(ms(5));
        assert_eq!(notes.matching(b"a", ms(6)), vec![7]);
    }

    #[test]
    fn unmatched_notes_lapse() {
        let t0 = Instant::now();
        let mut notes = Notes::default();
        notes.note(7, Bytes::from_static(b"a"), t0);
        assert_eq!(notes.matching(b"a", t0 + NOTE_TTL), Vec::<u64>::new());
        for i in 0..PRUNE_FLOOR {
            notes.note(1, Bytes::from(i.to_string()), t0 + NOTE_TTL);
        }
        assert_eq!(notes.len(), PRUNE_FLOOR, "the lapsed note was pruned");
    }
}
