//! Own-change notes: which SSH connection is changing which path.
//!
//! The SFTP server notes `(conn, path)` when a mutation starts ([`Notes::begin`]) and says
//! when it is over ([`Notes::end`]); a mutation may take several system calls (a put creates,
//! writes, chmods and renames a temporary file). Every change the watcher sees on that path
//! from the start on is that connection's own, until the note is *consumed*: at the end of the
//! first window that began reading the kernel's queue after the mutation was over, since by
//! then every event the mutation caused has been read and marked. A window that ends while
//! the mutation still runs, or before its last events were read, leaves the note alive. A note
//! whose mutation ended and that no window consumes (nothing happened anywhere) lapses after
//! [`NOTE_TTL`].
//!
//! Consequence, documented in `docs/protocol.md (Change feed)`: a pod process changing the same path
//! while a note is alive is marked own as well.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long a note outlives its mutation when no window consumes it.
pub(super) const NOTE_TTL: Duration = Duration::from_secs(2);
/// Below this many noted paths, lapsed notes are not looked for.
const PRUNE_FLOOR: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Note {
    conn: u64,
    /// Mutations of the path by this connection that have begun and not ended.
    running: u32,
    /// When the last of them began or ended.
    touched: Instant,
}

impl Note {
    fn alive(&self, now: Instant) -> bool {
        self.running > 0 || now.saturating_duration_since(self.touched) < NOTE_TTL
    }
}

pub(super) struct Notes {
    by_path: HashMap<Bytes, Vec<Note>>,
    prune_at: usize,
}

impl Default for Notes {
    fn default() -> Self {
        Notes { by_path: HashMap::new(), prune_at: PRUNE_FLOOR }
    }
}

impl Notes {
    /// `conn` starts a mutation of `path`.
    pub fn begin(&mut self, conn: u64, path: Bytes, now: Instant) {
        let notes = self.by_path.entry(path).or_default();
        match notes.iter_mut().find(|n| n.conn == conn) {
            Some(n) => {
                n.running += 1;
                n.touched = now;
            }
            None => notes.push(Note { conn, running: 1, touched: now }),
        }
        if self.by_path.len() >= self.prune_at {
            // Amortised: a full pass only each time the map has doubled since the last one.
            self.by_path.retain(|_, notes| {
                notes.retain(|n| n.alive(now));
                !notes.is_empty()
            });
            self.prune_at = (self.by_path.len() * 2).max(PRUNE_FLOOR);
        }
    }

    /// The mutation `conn` began on `path` is over, whether it changed anything or not.
    pub fn end(&mut self, conn: u64, path: &[u8], now: Instant) {
        let Some(notes) = self.by_path.get_mut(path) else { return };
        if let Some(n) = notes.iter_mut().find(|n| n.conn == conn) {
            n.running = n.running.saturating_sub(1);
            n.touched = now;
        }
    }

    /// The connections whose live notes cover a change of `path` seen at `now`.
    pub fn matching(&self, path: &[u8], now: Instant) -> Vec<u64> {
        let Some(notes) = self.by_path.get(path) else { return Vec::new() };
        notes.iter().filter(|n| n.alive(now)).map(|n| n.conn).collect()
    }

    /// Ends a window: consumes the notes of mutations that ended before `drained`, a moment
    /// by which every event the kernel had queued was read (`None`: not known), and those
    /// that lapsed.
    pub fn settle(&mut self, now: Instant, drained: Option<Instant>) {
        self.by_path.retain(|_, notes| {
            notes.retain(|n| n.alive(now) && (n.running > 0 || drained.is_none_or(|d| n.touched >= d)));
            !notes.is_empty()
        });
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
    fn a_note_lives_while_its_mutation_runs_and_until_its_events_are_read() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let a = Bytes::from_static(b"a");
        let mut notes = Notes::default();
        notes.begin(7, a.clone(), t0);
        assert_eq!(notes.matching(b"a", ms(1)), vec![7]);
        assert_eq!(notes.matching(b"b", ms(1)), Vec::<u64>::new());
        // A window ends while the mutation runs, long after it began: the note stays.
        notes.settle(ms(5_000), Some(ms(4_999)));
        assert_eq!(notes.matching(b"a", ms(5_001)), vec![7], "still running");
        notes.end(7, b"a", ms(5_002));
        // The next window read the queue before the mutation ended: its last events may be
        // still unread.
        notes.settle(ms(5_003), Some(ms(5_001)));
        assert_eq!(notes.matching(b"a", ms(5_004)), vec![7], "events may be unread");
        notes.settle(ms(5_006), Some(ms(5_005)));
        assert_eq!(notes.matching(b"a", ms(5_007)), Vec::<u64>::new(), "consumed");
        assert_eq!(notes.len(), 0);
    }

    #[test]
    fn overlapping_mutations_keep_the_note_until_the_last_ends() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let a = Bytes::from_static(b"a");
        let mut notes = Notes::default();
        notes.begin(7, a.clone(), t0);
        notes.begin(8, a.clone(), t0);
        notes.begin(7, a.clone(), ms(1));
        notes.end(7, b"a", ms(2));
        notes.end(8, b"a", ms(2));
        notes.settle(ms(4), Some(ms(3)));
        assert_eq!(notes.matching(b"a", ms(5)), vec![7], "one of 7's mutations still runs");
        notes.end(7, b"a", ms(6));
        notes.settle(ms(8), Some(ms(7)));
        assert_eq!(notes.len(), 0);
    }

    #[test]
    fn ended_notes_lapse() {
        let t0 = Instant::now();
        let mut notes = Notes::default();
        notes.begin(7, Bytes::from_static(b"a"), t0);
        notes.end(7, b"a", t0);
        notes.settle(t0, None);
        assert_eq!(notes.matching(b"a", t0), vec![7], "no drain known: kept");
        assert_eq!(notes.matching(b"a", t0 + NOTE_TTL), Vec::<u64>::new());
        for i in 0..PRUNE_FLOOR {
            notes.begin(1, Bytes::from(i.to_string()), t0 + NOTE_TTL);
        }
        assert_eq!(notes.len(), PRUNE_FLOOR, "the lapsed note was pruned");
    }
}
