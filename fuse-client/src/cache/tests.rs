//! Tests of the rules in the module documentation, through the public API, and a randomized
//! comparison against a simulated server.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devmount_server::proto::feed::{Change, FeedEvent, FeedMessage};
use devmount_server::proto::stat::{FullStat, Timespec};

use super::*;

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).unwrap()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn file(ino: u64, size: u64) -> FullStat {
    FullStat {
        ino,
        mode: libc::S_IFREG | 0o644,
        nlink: 1,
        size,
        mtime: Timespec { sec: ino as i64, nsec: 0 },
        ..FullStat::default()
    }
}

fn dir(ino: u64) -> FullStat {
    FullStat { ino, mode: libc::S_IFDIR | 0o755, nlink: 2, ..FullStat::default() }
}

fn created(path: &str, stat: Option<FullStat>) -> Change {
    Change::Created { path: b(path), stat }
}

fn modified(path: &str, stat: Option<FullStat>) -> Change {
    Change::Modified { path: b(path), stat }
}

fn attrib(path: &str, stat: Option<FullStat>) -> Change {
    Change::Attrib { path: b(path), stat }
}

fn deleted(path: &str) -> Change {
    Change::Deleted { path: b(path) }
}

fn renamed(from: &str, to: &str, stat: Option<FullStat>) -> Change {
    Change::Renamed { from: b(from), to: b(to), stat }
}

fn batch(seq: u64, changes: Vec<Change>) -> FeedMessage {
    FeedMessage::Batch {
        seq,
        events: changes.into_iter().map(|change| FeedEvent { change, own: false, dir: None }).collect(),
    }
}

fn entry(name: &str, kind: FileKind, meta: Option<FullStat>) -> ListingEntry {
    ListingEntry { name: b(name), kind, meta }
}

fn names(l: &Listing) -> Vec<(&[u8], FileKind)> {
    l.entries().iter().map(|e| (&e.name[..], e.kind)).collect()
}

/// A cache whose feed said hello and ready at `seq`.
fn live(config: &CacheConfig, seq: u64, now: Instant) -> Cache {
    let mut c = Cache::new(config);
    c.apply(&FeedMessage::Hello { protocol: 1, server_version: b("0"), seq }, now);
    c.apply(&FeedMessage::Ready { seq }, now);
    c
}

fn kinds(inv: &[Invalidation]) -> Vec<(InvalKind, &[u8])> {
    inv.iter().map(|i| (i.kind, i.path.as_bytes())).collect()
}

#[test]
fn a_cache_can_be_shared_between_threads_behind_a_lock() {
    fn send<T: Send + 'static>() {}
    send::<Cache>();
    send::<Fresh<std::sync::Arc<Listing>>>();
}

#[test]
fn a_reply_older_than_an_applied_invalidation_is_refused() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    c.apply(&batch(5, vec![modified("a", None)]), t);
    assert_eq!(c.insert_attr(&p("a"), file(1, 1), 4, t), Err(Refused::Stale { seq: 4, newest: 5 }));
    assert_eq!(c.insert_missing(&p("a"), 4, t), Err(Refused::Stale { seq: 4, newest: 5 }));
    assert!(c.insert_data(&p("a"), &DataVersion::from(&file(1, 1)), 0, b"x", 4).is_err());
    assert!(c.insert_attr(&p("b"), file(2, 1), 4, t).is_ok(), "other paths are not affected");
    c.insert_attr(&p("a"), file(1, 1), 5, t).unwrap();

    // A renamed directory: replies about anything below either name are refused.
    c.apply(&batch(7, vec![renamed("d", "e", Some(dir(9)))]), t);
    assert!(c.insert_attr(&p("d/x/y"), file(3, 1), 6, t).is_err());
    assert!(c.insert_missing(&p("e/x"), 6, t).is_err());
    assert!(c.insert_listing(&p("e"), vec![], 6, t).is_err(), "the parent's listing changed");
    assert!(c.insert_listing(&RelPath::root(), vec![], 6, t).is_err());
    assert!(c.insert_attr(&p("d/x/y"), file(3, 1), 7, t).is_ok());

    // Nothing replaces a newer answer.
    c.insert_attr(&p("n"), file(4, 1), 9, t).unwrap();
    assert_eq!(c.insert_missing(&p("n"), 8, t), Err(Refused::Stale { seq: 8, newest: 9 }));

    // A resync refuses everything older than itself.
    c.apply(&FeedMessage::Resync { seq: 10 }, t);
    assert!(c.insert_attr(&p("zzz"), file(5, 1), 9, t).is_err());
    assert!(c.insert_attr(&p("zzz"), file(5, 1), 10, t).is_ok());
    assert_eq!(c.stats().attr.refused, 3);
}

#[test]
fn ttls_follow_the_feed_with_injected_time() {
    let t = Instant::now();
    let config = CacheConfig { long_ttl: Duration::from_secs(100), ..CacheConfig::default() };
    let ms = Duration::from_millis;

    // No feed: the short TTL.
    let mut c = Cache::new(&config);
    c.insert_attr(&p("a"), file(1, 1), 0, t).unwrap();
    assert_eq!(c.attr(&p("a"), t + ms(999)).map(|f| f.ttl), Some(ms(1)));
    assert_eq!(c.attr(&p("a"), t + ms(1000)), None);
    assert_eq!(c.attr(&p("a"), t), None, "an expired entry is gone");

    // Ready at 5: entries from 5 on get the long TTL, older ones the short.
    c.apply(&FeedMessage::Hello { protocol: 1, server_version: b("0"), seq: 3 }, t);
    c.insert_attr(&p("waiting"), file(1, 1), 3, t).unwrap();
    assert_eq!(c.ttl(&p("waiting"), 3), config.short_ttl, "not ready yet");
    c.apply(&FeedMessage::Ready { seq: 5 }, t);
    c.insert_attr(&p("old"), file(1, 1), 4, t).unwrap();
    c.insert_attr(&p("new"), file(2, 1), 5, t).unwrap();
    assert_eq!(c.attr(&p("waiting"), t + ms(1000)), None);
    assert_eq!(c.attr(&p("old"), t + ms(1000)), None);
    assert_eq!(c.attr(&p("new"), t + Duration::from_secs(99)).map(|f| f.ttl), Some(Duration::from_secs(1)));
    assert_eq!(c.ttl(&p("x"), 5), config.long_ttl);

    // The feed goes down: everything is short again, at once.
    c.feed_down();
    assert_eq!(c.attr(&p("new"), t + ms(1000)), None);
    assert_eq!(c.ttl(&p("x"), 5), config.short_ttl);
}

#[test]
fn unwatched_subtrees_get_short_ttls_and_the_mark_moves_with_renames() {
    let t = Instant::now();
    let config = CacheConfig::default();
    let mut c = live(&config, 1, t);
    c.apply(&FeedMessage::Unwatched { seq: 2, path: b("big/deep") }, t);
    assert_eq!(c.ttl(&p("big/deep"), 2), config.short_ttl);
    assert_eq!(c.ttl(&p("big/deep/x/y"), 2), config.short_ttl);
    assert_eq!(c.ttl(&p("big/deeper"), 2), config.long_ttl);
    assert_eq!(c.ttl(&p("big"), 2), config.long_ttl);
    c.insert_listing(&p("big/deep"), vec![], 2, t).unwrap();
    assert!(c.listing(&p("big/deep"), t + Duration::from_secs(1)).is_none());

    c.apply(&batch(3, vec![renamed("big", "moved", Some(dir(1)))]), t);
    assert_eq!(c.ttl(&p("big/deep/x"), 3), config.long_ttl);
    assert_eq!(c.ttl(&p("moved/deep/x"), 3), config.short_ttl);
    c.apply(&batch(4, vec![deleted("moved")]), t);
    assert_eq!(c.ttl(&p("moved/deep/x"), 4), config.long_ttl, "a delete drops the mark");

    c.apply(&FeedMessage::Unwatched { seq: 5, path: b("u") }, t);
    c.apply(&FeedMessage::Resync { seq: 6 }, t);
    c.apply(&FeedMessage::Ready { seq: 6 }, t);
    assert_eq!(c.ttl(&p("u/x"), 6), config.long_ttl, "a resync drops every mark");
    c.apply(&FeedMessage::Unwatched { seq: 6, path: Bytes::new() }, t);
    assert_eq!(c.ttl(&p("any/thing"), 6), config.short_ttl, "the root unwatched: everything short");
}

#[test]
fn negative_entries_answer_lookups_until_a_create() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    c.insert_missing(&p("d/x.h"), 1, t).unwrap();
    assert!(matches!(c.lookup(&p("d/x.h"), t), Lookup::Missing { .. }));

    // A feed create drops it and stores the event's stat.
    let inv = c.apply(&batch(2, vec![created("d/x.h", Some(file(7, 3)))]), t);
    assert_eq!(
        kinds(&inv),
        vec![(InvalKind::Attr, &b"d"[..]), (InvalKind::Listing, b"d"), (InvalKind::Entry, b"d/x.h")]
    );
    assert_eq!(
        c.lookup(&p("d/x.h"), t),
        Lookup::Found { stat: file(7, 3), ttl: CacheConfig::default().long_ttl }
    );

    // A local create, and a rename onto the name, drop it too.
    c.insert_missing(&p("d/y.h"), 2, t).unwrap();
    c.local_change(LocalChange::Created(&p("d/y.h")));
    assert_eq!(c.lookup(&p("d/y.h"), t), Lookup::Unknown);
    c.insert_missing(&p("d/z.h"), 2, t).unwrap();
    c.local_change(LocalChange::Renamed { from: &p("tmp"), to: &p("d/z.h") });
    assert_eq!(c.lookup(&p("d/z.h"), t), Lookup::Unknown);
    c.insert_missing(&p("d/w.h"), 2, t).unwrap();
    c.apply(&batch(3, vec![renamed("tmp", "d/w.h", None)]), t);
    assert_eq!(c.lookup(&p("d/w.h"), t), Lookup::Unknown);

    // A delete leaves a negative entry behind.
    c.apply(&batch(4, vec![deleted("d/x.h")]), t);
    assert!(matches!(c.lookup(&p("d/x.h"), t), Lookup::Missing { .. }));
}

#[test]
fn a_fresh_listing_proves_names_missing() {
    let t = Instant::now();
    let mut c = Cache::new(&CacheConfig::default());
    let entries = vec![entry("a", FileKind::Regular, None), entry("sub", FileKind::Directory, None)];
    c.insert_listing(&p("d"), entries, 0, t).unwrap();
    assert!(matches!(c.lookup(&p("d/nope"), t), Lookup::Missing { .. }));
    assert_eq!(c.lookup(&p("d/a"), t), Lookup::Unknown, "listed, attributes not known");
    assert_eq!(c.lookup(&p("d/sub/x"), t), Lookup::Unknown);
    assert_eq!(c.lookup(&p("d/nope"), t + Duration::from_secs(1)), Lookup::Unknown, "expired");
}

#[test]
fn insert_listing_checks_names_and_stores_metas() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    c.insert_missing(&p("d"), 1, t).unwrap();
    let bad = vec![entry("ok", FileKind::Regular, None), entry("a/b", FileKind::Regular, None)];
    assert!(matches!(c.insert_listing(&p("d"), bad, 1, t), Err(Refused::Path(PathError::BadName(_)))));
    assert!(c.listing(&p("d"), t).is_none());

    c.apply(&batch(3, vec![attrib("d/changed", Some(file(5, 5)))]), t);
    let entries = vec![
        entry(".", FileKind::Directory, Some(dir(1))),
        entry("..", FileKind::Directory, None),
        entry("f", FileKind::Regular, Some(file(2, 2))),
        entry("changed", FileKind::Regular, Some(file(5, 1))),
        entry("s", FileKind::Directory, None),
    ];
    c.insert_listing(&p("d"), entries, 2, t).unwrap();
    let l = c.listing(&p("d"), t).unwrap().value;
    assert_eq!(
        names(&l),
        vec![(&b"changed"[..], FileKind::Regular), (b"f", FileKind::Regular), (b"s", FileKind::Directory)]
    );
    assert_eq!(c.attr(&p("d/f"), t).map(|f| f.value), Some(file(2, 2)));
    assert_eq!(c.attr(&p("d/changed"), t).map(|f| f.value), Some(file(5, 5)), "the newer state stays");
    assert!(matches!(c.lookup(&p("d"), t), Lookup::Unknown), "a listing proves the directory exists");
}

#[test]
fn listings_follow_name_events_in_place() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    let root = RelPath::root();
    let entries =
        vec![entry("a", FileKind::Regular, Some(file(1, 1))), entry("d", FileKind::Directory, None)];
    c.insert_listing(&root, entries, 1, t).unwrap();
    c.insert_listing(&p("d"), vec![entry("x", FileKind::Regular, None)], 1, t).unwrap();
    c.insert_attr(&root, dir(1), 1, t).unwrap();

    c.apply(&batch(2, vec![created("b", Some(dir(2))), modified("a", Some(file(1, 9)))]), t);
    let l = c.listing(&root, t).unwrap().value;
    assert_eq!(
        names(&l),
        vec![(&b"a"[..], FileKind::Regular), (b"b", FileKind::Directory), (b"d", FileKind::Directory)]
    );
    assert!(c.attr(&root, t).is_none(), "the directory's own attributes changed");
    assert_eq!(
        c.attr(&p("a"), t).map(|f| f.value),
        Some(file(1, 9)),
        "modified updates the child's attributes"
    );

    c.apply(&batch(3, vec![renamed("d/x", "y", Some(file(3, 1))), deleted("a")]), t);
    assert_eq!(
        names(&c.listing(&root, t).unwrap().value),
        vec![(&b"b"[..], FileKind::Directory), (b"d", FileKind::Directory), (b"y", FileKind::Regular)]
    );
    assert!(c.listing(&p("d"), t).unwrap().value.is_empty());

    // A snapshot taken before an edit stays as it was.
    let before = c.listing(&root, t).unwrap().value;
    c.apply(&batch(4, vec![created("c", None)]), t);
    assert_eq!(before.len(), 3);
    assert_eq!(
        c.listing(&root, t).unwrap().value.len(),
        3,
        "a created name without a stat was gone when the server looked: left out"
    );
}

#[test]
fn renaming_a_directory_drops_everything_below_both_names() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    let v = DataVersion::from(&file(1, 4));
    c.insert_attr(&p("d"), dir(1), 1, t).unwrap();
    c.insert_attr(&p("d/x"), file(1, 4), 1, t).unwrap();
    c.insert_attr(&p("d/y/z"), file(2, 4), 1, t).unwrap();
    c.insert_missing(&p("d/q"), 1, t).unwrap();
    c.insert_listing(&p("d/y"), vec![entry("z", FileKind::Regular, None)], 1, t).unwrap();
    c.insert_data(&p("d/x"), &v, 0, b"data", 1).unwrap();
    c.insert_attr(&p("e/old"), file(3, 4), 1, t).unwrap();
    c.insert_attr(&p("d-e"), file(4, 4), 1, t).unwrap();
    c.insert_attr(&p("dd/x"), file(5, 4), 1, t).unwrap();

    let inv = c.apply(&batch(2, vec![renamed("d", "e", Some(dir(1)))]), t);
    assert_eq!(
        kinds(&inv),
        vec![
            (InvalKind::Attr, &b""[..]),
            (InvalKind::Listing, b""),
            (InvalKind::Gone, b"d"),
            (InvalKind::Entry, b"e"),
        ]
    );
    for gone in ["d/x", "d/y/z", "e/old"] {
        assert!(c.attr(&p(gone), t).is_none(), "{gone}");
    }
    assert!(c.listing(&p("d/y"), t).is_none());
    assert_eq!(c.read_data(&p("d/x"), &v, 0..4), vec![DataPart::Missing(0..4)]);
    assert!(matches!(c.lookup(&p("d"), t), Lookup::Missing { .. }), "the old name is now missing");
    assert_eq!(c.lookup(&p("d/q"), t), Lookup::Unknown);
    assert_eq!(c.attr(&p("e"), t).map(|f| f.value), Some(dir(1)));
    assert!(c.attr(&p("d-e"), t).is_some() && c.attr(&p("dd/x"), t).is_some(), "neighbours stay");
}

#[test]
fn dropping_a_subtree_scales_with_what_it_drops() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    for i in 0..100_000u32 {
        c.insert_attr(&p(&format!("big/{}/{i}", i % 100)), file(u64::from(i), 1), 1, t).unwrap();
    }
    c.insert_attr(&p("small/one"), file(1, 1), 1, t).unwrap();
    // Ten thousand deletes of small directories next to a hundred thousand entries: with a
    // scan per delete this would take minutes.
    let events = (0..10_000).map(|i| deleted(&format!("small/{i}"))).collect();
    c.apply(&batch(2, events), t);
    c.apply(&batch(3, vec![deleted("big/7")]), t);
    assert_eq!(c.stats().attr.size, 100_000 - 1000 + 1);
    c.apply(&batch(4, vec![renamed("big", "gone", None)]), t);
    assert_eq!(c.stats().attr.size, 1);
}

#[test]
fn resync_and_hello_drop_everything() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 10, t);
    let v = DataVersion::from(&file(1, 1));
    c.insert_attr(&p("a"), file(1, 1), 10, t).unwrap();
    c.insert_missing(&p("b"), 10, t).unwrap();
    c.insert_listing(&p("c"), vec![], 10, t).unwrap();
    c.insert_data(&p("a"), &v, 0, b"x", 10).unwrap();
    let inv = c.apply(&FeedMessage::Resync { seq: 11 }, t);
    assert_eq!(kinds(&inv), vec![(InvalKind::Everything, &b""[..])]);
    let s = c.stats();
    assert_eq!((s.attr.size, s.negative.size, s.dir.size, s.data.size), (0, 0, 0, 0));
    assert_eq!(c.ttl(&p("a"), 11), CacheConfig::default().short_ttl, "not ready again until ready");
    assert_eq!(c.applied_seq(), 11);

    // A restarted server counts from 1 again; its replies are not refused.
    c.insert_attr(&p("a"), file(1, 1), 20, t).unwrap();
    let inv = c.apply(&FeedMessage::Hello { protocol: 1, server_version: b("0"), seq: 2 }, t);
    assert_eq!(inv.len(), 1);
    assert!(c.attr(&p("a"), t).is_none());
    assert_eq!(c.applied_seq(), 2);
    assert!(c.insert_attr(&p("a"), file(1, 1), 2, t).is_ok());
}

#[test]
fn invalidations_are_reported_once_and_own_only_if_all_were_own() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    let own = |change| FeedEvent { change, own: true, dir: None };
    let theirs = |change| FeedEvent { change, own: false, dir: None };
    let msg = FeedMessage::Batch {
        seq: 2,
        events: vec![
            own(created("d/a", Some(file(1, 0)))),
            own(modified("d/a", Some(file(1, 5)))),
            theirs(created("d/b", Some(file(2, 0)))),
            own(attrib("e", Some(dir(3)))),
        ],
    };
    let inv = c.apply(&msg, t);
    let got: Vec<(InvalKind, &[u8], bool)> = inv.iter().map(|i| (i.kind, i.path.as_bytes(), i.own)).collect();
    assert_eq!(
        got,
        vec![
            (InvalKind::Attr, &b"d"[..], false),
            (InvalKind::Listing, b"d", false),
            (InvalKind::Entry, b"d/a", true),
            (InvalKind::Attr, b"d/a", true),
            (InvalKind::Data, b"d/a", true),
            (InvalKind::Entry, b"d/b", false),
            (InvalKind::Attr, b"e", true),
        ]
    );
    assert_eq!(c.attr(&p("d/a"), t).map(|f| f.value), Some(file(1, 5)), "own events still update");
}

#[test]
fn modified_drops_data_and_stale_data_is_refused() {
    let t = Instant::now();
    let config = CacheConfig { block_size: NonZeroUsize::new(4).unwrap(), ..CacheConfig::default() };
    let mut c = live(&config, 1, t);
    let v = DataVersion::from(&file(1, 6));
    c.insert_data(&p("f"), &v, 0, b"abcdef", 1).unwrap();
    assert_eq!(
        c.read_data(&p("f"), &v, 2..6),
        vec![DataPart::Cached { offset: 2, data: b("cd") }, DataPart::Cached { offset: 4, data: b("ef") },]
    );
    // Same inode, size and mtime (a rewrite within one mtime tick): only the event can tell.
    c.apply(&batch(2, vec![modified("f", Some(file(1, 6)))]), t);
    assert_eq!(c.read_data(&p("f"), &v, 0..6), vec![DataPart::Missing(0..6)]);
    assert!(c.insert_data(&p("f"), &v, 0, b"abcdef", 1).is_err(), "read before the change");
    c.insert_data(&p("f"), &v, 0, b"ABCDEF", 2).unwrap();
    c.apply(&batch(3, vec![attrib("f", Some(file(1, 6)))]), t);
    assert_eq!(c.read_data(&p("f"), &v, 0..4), vec![DataPart::Cached { offset: 0, data: b("ABCD") }]);
    let s = c.stats().data;
    assert_eq!((s.hits, s.misses, s.refused), (3, 2, 1));
}

#[test]
fn caches_are_bounded() {
    let t = Instant::now();
    let config = CacheConfig {
        attr_entries: 3,
        negative_entries: 2,
        dir_names: 5,
        data_bytes: 2 * (4 + data::BLOCK_OVERHEAD),
        block_size: NonZeroUsize::new(4).unwrap(),
        ..CacheConfig::default()
    };
    let mut c = Cache::new(&config);
    for i in 0..5 {
        c.insert_attr(&p(&format!("a{i}")), file(i, 1), 0, t).unwrap();
        c.insert_missing(&p(&format!("m{i}")), 0, t).unwrap();
    }
    assert!(c.attr(&p("a1"), t).is_none() && c.attr(&p("a2"), t).is_some());
    let three = vec![
        entry("x", FileKind::Regular, None),
        entry("y", FileKind::Regular, None),
        entry("z", FileKind::Regular, None),
    ];
    c.insert_listing(&p("d1"), three.clone(), 0, t).unwrap();
    c.insert_listing(&p("d2"), three, 0, t).unwrap();
    assert!(c.listing(&p("d1"), t).is_none() && c.listing(&p("d2"), t).is_some());
    let v = DataVersion::from(&file(1, 12));
    c.insert_data(&p("f"), &v, 0, b"0123456789ab", 0).unwrap();
    let s = c.stats();
    assert_eq!((s.attr.size, s.attr.evicted), (3, 2));
    assert_eq!((s.negative.size, s.negative.evicted), (2, 3));
    assert_eq!((s.dir.size, s.dir.evicted), (4, 1));
    assert_eq!((s.data.size as usize, s.data.evicted), (config.data_bytes, 1));
}

#[test]
fn hits_and_misses_are_counted() {
    let t = Instant::now();
    let mut c = Cache::new(&CacheConfig::default());
    c.insert_attr(&p("a"), file(1, 1), 0, t).unwrap();
    c.insert_missing(&p("m"), 0, t).unwrap();
    c.insert_listing(&p("d"), vec![], 0, t).unwrap();
    c.attr(&p("a"), t);
    c.attr(&p("b"), t);
    c.lookup(&p("a"), t);
    c.lookup(&p("m"), t);
    c.lookup(&p("d/x"), t);
    c.lookup(&p("unknown"), t);
    c.listing(&p("d"), t);
    c.listing(&p("e"), t);
    let s = c.stats();
    assert_eq!((s.attr.hits, s.attr.misses), (2, 2));
    assert_eq!((s.negative.hits, s.negative.misses), (2, 1));
    assert_eq!((s.dir.hits, s.dir.misses), (1, 1));
}

#[test]
fn local_changes_drop_what_they_make_stale() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    let v = DataVersion::from(&file(1, 1));
    c.insert_attr(&p("d"), dir(1), 1, t).unwrap();
    c.insert_listing(&p("d"), vec![entry("f", FileKind::Regular, Some(file(2, 1)))], 1, t).unwrap();
    c.insert_data(&p("d/f"), &v, 0, b"x", 1).unwrap();
    c.local_change(LocalChange::Attrib(&p("d/f")));
    assert!(c.attr(&p("d/f"), t).is_none());
    assert!(c.listing(&p("d"), t).is_some());
    c.local_change(LocalChange::Modified(&p("d/f")));
    assert_eq!(c.read_data(&p("d/f"), &v, 0..1), vec![DataPart::Missing(0..1)]);
    c.local_change(LocalChange::Removed(&p("d/f")));
    assert!(c.attr(&p("d/f"), t).is_none());
    assert!(
        c.listing(&p("d"), t).is_some() && c.attr(&p("d"), t).is_some(),
        "the parent costs no round trip"
    );
    c.local_change(LocalChange::Settled(&p("d/f")));
    assert!(c.listing(&p("d"), t).is_none() && c.attr(&p("d"), t).is_none());
    assert!(c.insert_attr(&p("d/f"), file(2, 1), 1, t).is_ok(), "local changes leave no marks");
}

#[test]
fn a_feed_path_that_cannot_be_located_drops_everything() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    c.insert_attr(&p("a"), file(1, 1), 1, t).unwrap();
    let inv = c.apply(&batch(2, vec![deleted("../etc")]), t);
    assert_eq!(kinds(&inv), vec![(InvalKind::Everything, &b""[..])]);
    assert!(c.attr(&p("a"), t).is_none());
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Node {
    dir: bool,
    ino: u64,
    size: u64,
    /// Coarse on purpose, so that two contents can share a data version.
    mtime: i64,
    /// Exact, so that every change shows in the full stat.
    ctime: i64,
    perm: u32,
    content: u64,
}

impl Node {
    fn stat(&self) -> FullStat {
        FullStat {
            ino: self.ino,
            mode: if self.dir { libc::S_IFDIR } else { libc::S_IFREG } | self.perm,
            nlink: 1,
            size: self.size,
            mtime: Timespec { sec: self.mtime, nsec: 0 },
            ctime: Timespec { sec: self.ctime, nsec: 0 },
            ..FullStat::default()
        }
    }

    fn kind(&self) -> FileKind {
        if self.dir {
            FileKind::Directory
        } else {
            FileKind::Regular
        }
    }

    fn bytes(&self) -> Vec<u8> {
        (0..self.size).map(|i| (self.content.wrapping_mul(31).wrapping_add(i)) as u8).collect()
    }
}

type Tree = BTreeMap<Vec<u8>, Node>;

const NAMES: [&[u8]; 3] = [b"a", b"b", b"c"];

fn parent_of(path: &[u8]) -> Vec<u8> {
    path[..path.iter().rposition(|&c| c == b'/').unwrap_or(0)].to_vec()
}

fn is_below(path: &[u8], dir: &[u8]) -> bool {
    path::is_under(path, dir) && path != dir
}

fn children(tree: &Tree, dir: &[u8]) -> Vec<(Vec<u8>, Node)> {
    tree.iter()
        .filter(|(k, _)| !k.is_empty() && parent_of(k) == dir)
        .map(|(k, n)| (k[if dir.is_empty() { 0 } else { dir.len() + 1 }..].to_vec(), n.clone()))
        .collect()
}

/// A server whose tree changes at random, publishing each change under a new sequence number
/// to a feed that the cache reads late, and answering requests from recent states.
struct Sim {
    rng: Rng,
    seq: u64,
    tree: Tree,
    /// Recent states, `(seq, tree)`, newest last.
    history: VecDeque<(u64, Tree)>,
    pending: VecDeque<FeedMessage>,
    next_ino: u64,
    candidates: Vec<Vec<u8>>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let root = Node { dir: true, ino: 1, size: 0, mtime: 0, ctime: 0, perm: 0o755, content: 0 };
        let tree: Tree = [(Vec::new(), root)].into_iter().collect();
        // Every path of up to three components from NAMES: few enough to collide often.
        let mut candidates = vec![Vec::new()];
        let mut level = vec![Vec::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for base in &level {
                for name in NAMES {
                    let mut c: Vec<u8> = base.clone();
                    if !c.is_empty() {
                        c.push(b'/');
                    }
                    c.extend_from_slice(name);
                    next.push(c);
                }
            }
            candidates.extend(next.iter().cloned());
            level = next;
        }
        Sim {
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            seq: 1,
            history: [(1, tree.clone())].into_iter().collect(),
            tree,
            pending: VecDeque::new(),
            next_ino: 2,
            candidates,
        }
    }

    fn maybe_stat(&mut self, path: &[u8]) -> Option<FullStat> {
        if self.rng.chance(8) {
            None
        } else {
            self.tree.get(path).map(Node::stat)
        }
    }

    fn existing(&self) -> Vec<Vec<u8>> {
        self.tree.keys().filter(|k| !k.is_empty()).cloned().collect()
    }

    /// A directory's names changed in the change about to be published.
    fn touch_dir(&mut self, dir: &[u8]) {
        let next = self.seq + 1;
        let count = children(&self.tree, dir).len() as u64;
        let n = self.tree.get_mut(dir).expect("parent exists");
        n.size = count;
        n.mtime = (next / 3) as i64;
        n.ctime = next as i64;
    }

    /// Makes one change and publishes its events; `false` if the chosen change was impossible.
    fn change(&mut self) -> bool {
        let next = (self.seq + 1) as i64;
        let mut events = Vec::new();
        match self.rng.below(9) {
            0..=2 => {
                let dirs: Vec<Vec<u8>> = self
                    .tree
                    .iter()
                    .filter(|(k, n)| n.dir && (k.is_empty() || k.split(|&c| c == b'/').count() < 3))
                    .map(|(k, _)| k.clone())
                    .collect();
                let parent = self.rng.pick(&dirs).clone();
                let mut path = parent.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                let name = *self.rng.pick(&NAMES[..]);
                path.extend_from_slice(name);
                if self.tree.contains_key(&path) {
                    return false;
                }
                let dir = self.rng.chance(3);
                let ino = self.next_ino;
                self.next_ino += 1;
                let size = if dir { 0 } else { self.rng.below(10) };
                let node = Node { dir, ino, size, mtime: next / 3, ctime: next, perm: 0o644, content: ino };
                self.tree.insert(path.clone(), node);
                self.touch_dir(&parent);
                let stat = self.tree.get(&path).map(Node::stat);
                events.push(Change::Created { path: path.into(), stat });
            }
            3..=4 => {
                let files: Vec<Vec<u8>> =
                    self.tree.iter().filter(|(_, n)| !n.dir).map(|(k, _)| k.clone()).collect();
                if files.is_empty() {
                    return false;
                }
                let path = self.rng.pick(&files).clone();
                let size = *self.rng.pick(&[0, 3, 5, 5, 9]);
                let content = self.rng.next();
                let n = self.tree.get_mut(&path).expect("picked");
                (n.size, n.content, n.mtime, n.ctime) = (size, content, next / 3, next);
                let stat = self.maybe_stat(&path);
                events.push(Change::Modified { path: path.into(), stat });
            }
            5 => {
                let all = self.existing();
                if all.is_empty() {
                    return false;
                }
                let path = self.rng.pick(&all).clone();
                let n = self.tree.get_mut(&path).expect("picked");
                (n.perm, n.ctime) = (n.perm ^ 0o111, next);
                let stat = self.maybe_stat(&path);
                events.push(Change::Attrib { path: path.into(), stat });
            }
            6 => {
                let all = self.existing();
                if all.is_empty() {
                    return false;
                }
                let top = self.rng.pick(&all).clone();
                let mut gone: Vec<Vec<u8>> =
                    self.tree.keys().filter(|k| *k == &top || is_below(k, &top)).cloned().collect();
                for g in &gone {
                    self.tree.remove(g);
                }
                self.touch_dir(&parent_of(&top));
                if self.rng.chance(2) {
                    // rm -rf: deepest first. Otherwise a move out of the root: only the top.
                    gone.sort_by_key(|g| std::cmp::Reverse(g.len()));
                    events.extend(gone.into_iter().map(|g| Change::Deleted { path: g.into() }));
                } else {
                    events.push(Change::Deleted { path: top.into() });
                }
            }
            7 => {
                let all = self.existing();
                if all.is_empty() {
                    return false;
                }
                let from = self.rng.pick(&all).clone();
                let to = self.rng.pick(&self.candidates).clone();
                let (fp, tp) = (parent_of(&from), parent_of(&to));
                let src_dir = self.tree[&from].dir;
                let ok_target = match self.tree.get(&to) {
                    None => true,
                    Some(t) if t.dir => src_dir && children(&self.tree, &to).is_empty(),
                    Some(_) => !src_dir,
                };
                if to.is_empty()
                    || to == from
                    || is_below(&to, &from)
                    || !ok_target
                    || !self.tree.get(&tp).is_some_and(|n| n.dir)
                {
                    return false;
                }
                self.tree.remove(&to);
                let moving: Vec<(Vec<u8>, Node)> = self
                    .tree
                    .iter()
                    .filter(|(k, _)| **k == from || is_below(k, &from))
                    .map(|(k, n)| (k.clone(), n.clone()))
                    .collect();
                for (k, mut n) in moving {
                    self.tree.remove(&k);
                    if k == from {
                        n.ctime = next;
                    }
                    let mut nk = to.clone();
                    nk.extend_from_slice(&k[from.len()..]);
                    self.tree.insert(nk, n);
                }
                self.touch_dir(&fp);
                self.touch_dir(&tp);
                let stat = self.tree.get(&to).map(Node::stat);
                events.push(Change::Renamed { from: from.into(), to: to.into(), stat });
            }
            _ => {
                if !self.rng.chance(10) {
                    return false;
                }
                self.seq += 1;
                self.publish(FeedMessage::Resync { seq: self.seq });
                return true;
            }
        }
        self.seq += 1;
        // As the server does: the directory of a name that came or went, stated when the batch
        // is sent (sometimes not: the server may fail to).
        let events = events
            .into_iter()
            .map(|change| {
                let named = match &change {
                    Change::Created { path, .. }
                    | Change::Deleted { path }
                    | Change::Renamed { to: path, .. } => Some(path.clone()),
                    Change::Modified { .. } | Change::Attrib { .. } => None,
                };
                let dir = named.filter(|_| !self.rng.chance(5)).and_then(|path| {
                    let parent = path.iter().rposition(|&b| b == b'/').map_or(&path[..0], |i| &path[..i]);
                    self.tree.get(parent).map(Node::stat)
                });
                FeedEvent { change, own: self.rng.chance(4), dir }
            })
            .collect();
        self.publish(FeedMessage::Batch { seq: self.seq, events });
        true
    }

    fn publish(&mut self, msg: FeedMessage) {
        self.pending.push_back(msg);
        self.history.push_back((self.seq, self.tree.clone()));
        if self.history.len() > 64 {
            self.history.pop_front();
        }
    }

    /// Answers one request from a recent state `t`, with a sequence read at or before it.
    fn reply(&mut self, cache: &mut Cache, now: Instant) {
        // From a few events before what the cache has applied up to the newest: requests
        // answered before and after the events that change what they asked about.
        let from = cache.applied_seq().saturating_sub(4);
        let recent: Vec<&(u64, Tree)> = self.history.iter().filter(|(s, _)| *s >= from).collect();
        let (t, state) = (*self.rng.pick(&recent)).clone();
        let seq = t - self.rng.below(3.min(t));
        let path = self.rng.pick(&self.candidates).clone();
        let key = RelPath::new(&path).unwrap();
        match (self.rng.below(3), state.get(&path)) {
            (0, Some(n)) => drop(cache.insert_attr(&key, n.stat(), seq, now)),
            (0, None) => drop(cache.insert_missing(&key, seq, now)),
            (1, Some(n)) if n.dir => {
                let with_meta = self.rng.chance(2);
                let entries = children(&state, &path)
                    .into_iter()
                    .map(|(name, c)| ListingEntry {
                        name: name.into(),
                        kind: c.kind(),
                        meta: with_meta.then(|| c.stat()),
                    })
                    .collect();
                drop(cache.insert_listing(&key, entries, seq, now));
            }
            (2, Some(n)) if !n.dir => {
                let data = n.bytes();
                let offset = self.rng.below(n.size + 1);
                let _ = cache.insert_data(
                    &key,
                    &DataVersion::from(&n.stat()),
                    offset,
                    &data[offset as usize..],
                    seq,
                );
            }
            _ => {}
        }
    }

    fn deliver(&mut self, cache: &mut Cache, now: Instant) -> bool {
        match self.pending.pop_front() {
            Some(m) => {
                cache.apply(&m, now);
                if matches!(m, FeedMessage::Resync { .. }) {
                    cache.apply(&FeedMessage::Ready { seq: m.seq() }, now);
                }
                true
            }
            None => false,
        }
    }

    /// With every event applied, whatever the cache answers must be the server's current
    /// state. Returns how many answers were known.
    fn check(&mut self, cache: &mut Cache, now: Instant) -> usize {
        while self.deliver(cache, now) {}
        let mut known = 0;
        for path in self.candidates.clone() {
            let key = RelPath::new(&path).unwrap();
            let truth = self.tree.get(&path);
            match cache.lookup(&key, now) {
                Lookup::Found { stat, .. } => {
                    assert_eq!(Some(stat), truth.map(Node::stat), "lookup {key:?} at {}", self.seq);
                    known += 1;
                }
                Lookup::Missing { .. } => {
                    assert!(truth.is_none(), "lookup {key:?} missing at {}, is {truth:?}", self.seq);
                    known += 1;
                }
                Lookup::Unknown => {}
            }
            if let Some(l) = cache.listing(&key, now) {
                let want: Vec<(Vec<u8>, FileKind)> =
                    children(&self.tree, &path).into_iter().map(|(k, n)| (k, n.kind())).collect();
                let got: Vec<(Vec<u8>, FileKind)> =
                    l.value.entries().iter().map(|e| (e.name.to_vec(), e.kind)).collect();
                assert!(truth.is_some_and(|n| n.dir), "listing of {key:?} at {}, is {truth:?}", self.seq);
                assert_eq!(got, want, "listing {key:?} at {}", self.seq);
                known += 1;
            }
            if let Some(n) = truth.filter(|n| !n.dir) {
                let bytes = n.bytes();
                for part in cache.read_data(&key, &DataVersion::from(&n.stat()), 0..n.size) {
                    if let DataPart::Cached { offset, data } = part {
                        let o = offset as usize;
                        assert_eq!(&data[..], &bytes[o..o + data.len()], "data {key:?} at {}", self.seq);
                        known += 1;
                    }
                }
            }
        }
        known
    }
}

fn run_model(config: &CacheConfig, seeds: std::ops::Range<u64>, steps: usize) -> (usize, usize) {
    let now = Instant::now();
    let (mut known, mut checks) = (0, 0);
    for seed in seeds {
        let mut sim = Sim::new(seed);
        let mut cache = Cache::new(config);
        cache.apply(&FeedMessage::Hello { protocol: 1, server_version: b("0"), seq: 1 }, now);
        cache.apply(&FeedMessage::Ready { seq: 1 }, now);
        for step in 0..steps {
            match sim.rng.below(10) {
                0 => drop(sim.change()),
                1..=2 => drop(sim.deliver(&mut cache, now)),
                _ => sim.reply(&mut cache, now),
            }
            if step % 25 == 24 {
                known += sim.check(&mut cache, now);
                checks += sim.candidates.len();
            }
        }
    }
    (known, checks)
}

#[test]
fn model_every_answer_matches_the_server_once_the_feed_is_applied() {
    let config = CacheConfig { block_size: NonZeroUsize::new(4).unwrap(), ..CacheConfig::default() };
    let (known, checks) = run_model(&config, 0..40, 1500);
    assert!(known * 3 > checks, "the cache should answer much of the time: {known} of {checks}");
}

#[test]
fn model_with_tiny_bounds_still_never_answers_wrong() {
    let config = CacheConfig {
        attr_entries: 4,
        negative_entries: 3,
        dir_names: 6,
        data_bytes: 3 * (4 + data::BLOCK_OVERHEAD),
        block_size: NonZeroUsize::new(4).unwrap(),
        marks: 3,
        ..CacheConfig::default()
    };
    let (known, _) = run_model(&config, 100..140, 1500);
    assert!(known > 0);
}

#[test]
fn a_directory_made_here_stays_known_empty_through_its_own_events() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    c.local_mkdir(&p("w"), t);
    assert!(matches!(c.lookup(&p("w/new"), t), Lookup::Missing { .. }));
    let own = |seq, changes: Vec<Change>| FeedMessage::Batch {
        seq,
        events: changes.into_iter().map(|change| FeedEvent { change, own: true, dir: None }).collect(),
    };
    // Made in it before its event came (an untar): its own event leaves that listing be.
    c.local_mkdir(&p("w/sub"), t);
    c.apply(&own(2, vec![created("w", Some(dir(5)))]), t);
    assert!(matches!(c.lookup(&p("w/sub/new"), t), Lookup::Missing { .. }));
    c.apply(&own(3, vec![created("w/a", Some(file(6, 1)))]), t);
    assert!(matches!(c.lookup(&p("w/new"), t), Lookup::Missing { .. }));
    assert!(matches!(c.lookup(&p("w/a"), t), Lookup::Found { .. }));
    // A pod's mkdir tells nothing of what is in it by the time the event is applied.
    c.apply(&batch(4, vec![created("v", Some(dir(7)))]), t);
    assert_eq!(c.lookup(&p("v/x"), t), Lookup::Unknown);
}

#[test]
fn an_event_s_directory_stat_keeps_the_directory_s_attributes() {
    let t = Instant::now();
    let mut c = live(&CacheConfig::default(), 1, t);
    c.insert_attr(&p("d"), dir(1), 1, t).unwrap();
    let with_dir =
        |seq, change, st| FeedMessage::Batch { seq, events: vec![FeedEvent { change, own: true, dir: st }] };
    let newer = FullStat { mtime: Timespec { sec: 9, nsec: 9 }, ..dir(1) };
    c.apply(&with_dir(2, created("d/f", Some(file(2, 1))), Some(newer)), t);
    assert_eq!(c.attr(&p("d"), t).map(|f| f.value), Some(newer));
    c.apply(&with_dir(3, deleted("d/f"), None), t);
    assert!(c.attr(&p("d"), t).is_none(), "without it the attributes go");
}
