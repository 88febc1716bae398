//! `devmount mount` on real mounts: the read path against devmount-server and against OpenSSH's
//! sshd, remote changes reaching the mount (through the change feed, or the short timeouts),
//! each startup error's one-line message, and the daemon's end at unmount. The served directory
//! is the oracle: fixtures are made in it directly and the mount must show the same.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use devmount_tests::{command, free_port, keygen, run_ok, DevMount, MountOptions, Run, Server, Sshd};
use nix::sys::signal::Signal;

/// With the change feed, a change in the served directory must show within this.
const FEED_DEADLINE: Duration = Duration::from_secs(1);
/// The `--timeout` the OpenSSH mounts get; a change must show within it plus one second.
const SHORT_TIMEOUT: f64 = 1.0;
/// How long the daemon may take to exit once the kernel has detached its mount.
const EXIT_DEADLINE: Duration = Duration::from_secs(5);
/// Files in the big listing.
const MANY: usize = 2000;
/// Size of the file whose sha256 is compared.
const BIG: usize = 64 << 20;

/// Names that are not plain ASCII words; the last is not UTF-8.
fn odd_names() -> Vec<OsString> {
    vec![
        OsString::from("with space.txt"),
        OsString::from("ünïcødé 名前 ✓.txt"),
        OsString::from_vec(b"bad\xffname".to_vec()),
    ]
}

/// The read-path fixture, made directly in `root`.
fn make_tree(root: &Path) -> Result<()> {
    fs::write(root.join("hello.txt"), b"hello, devmount\n")?;
    fs::write(root.join(".hidden"), b"dot\n")?;
    fs::write(root.join("empty"), b"")?;
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho run\n")?;
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("private"), b"secret\n")?;
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600))?;
    fs::create_dir_all(root.join("sub/deeper"))?;
    fs::write(root.join("sub/deeper/nested.txt"), b"nested contents\n")?;
    symlink("hello.txt", root.join("link"))?;
    symlink("no/such/target", root.join("dangling"))?;
    symlink("../hello.txt", root.join("sub/up"))?;
    for (i, name) in odd_names().iter().enumerate() {
        fs::write(root.join(name), format!("odd name {i}\n"))?;
    }
    fs::create_dir(root.join("many"))?;
    for i in 0..MANY {
        fs::write(root.join(format!("many/f{i:04}")), format!("{i}\n"))?;
    }
    let mut big = vec![0u8; BIG];
    fs::File::open("/dev/urandom")?.read_exact(&mut big)?;
    fs::write(root.join("big.bin"), &big)?;
    Ok(())
}

/// Everything the read path must show, compared with `root`. `ns_times`: the server carries
/// nanosecond times (devmount-server); SFTP v3 (OpenSSH) carries whole seconds.
fn check_read_path(root: &Path, mnt: &Path, ns_times: bool) -> Result<()> {
    let ls = run_ok(command("ls").arg("-la").arg(mnt))?;
    for name in ["hello.txt", ".hidden", "empty", "run.sh", "sub", "link -> hello.txt", "many", "big.bin"] {
        ensure!(ls.stdout_text().contains(name), "`ls -la` lacks {name:?}\n{ls}");
    }
    ensure!(names(mnt)? == names(root)?, "listings differ: mount {:?}, root {:?}", names(mnt)?, names(root)?);

    // find stats every entry; the same walk of the root is the oracle.
    let (seen, want) = (walk(mnt, ns_times)?, walk(root, ns_times)?);
    if seen != want {
        let only_mount: Vec<_> = seen.difference(&want).collect();
        let only_root: Vec<_> = want.difference(&seen).collect();
        bail!("`find -printf` differs\nonly on the mount: {only_mount:#?}\nonly in the root: {only_root:#?}");
    }

    let cat = run_ok(command("cat").arg(mnt.join("hello.txt")).arg(mnt.join("sub/deeper/nested.txt")))?;
    ensure!(cat.stdout == b"hello, devmount\nnested contents\n", "{cat}");
    for name in odd_names().into_iter().chain(
        ["empty", "run.sh", "private", "link", "sub/up", "many/f0000", "many/f1999"].map(OsString::from),
    ) {
        let (got, want) = (fs::read(mnt.join(&name)), fs::read(root.join(&name))?);
        ensure!(got.as_ref().ok() == Some(&want), "{name:?}: read {got:?}, want {want:?}");
    }

    ensure!(fs::read_link(mnt.join("link"))? == Path::new("hello.txt"));
    ensure!(fs::read_link(mnt.join("dangling"))? == Path::new("no/such/target"));
    ensure!(fs::read_link(mnt.join("sub/up"))? == Path::new("../hello.txt"));
    let dangling = fs::metadata(mnt.join("dangling"));
    ensure!(
        dangling.as_ref().is_err_and(|e| e.kind() == ErrorKind::NotFound),
        "following a dangling link: {dangling:?}"
    );
    let missing = fs::metadata(mnt.join("no-such-file"));
    ensure!(missing.as_ref().is_err_and(|e| e.kind() == ErrorKind::NotFound), "a missing file: {missing:?}");

    let started = Instant::now();
    let (got, want) = (sha256(&mnt.join("big.bin"))?, sha256(&root.join("big.bin"))?);
    ensure!(got == want, "sha256 of big.bin: {got} through the mount, {want} in the root");
    println!("sha256sum of {} MiB through the mount: {:?}", BIG >> 20, started.elapsed());

    let listing = run_ok(command("ls").arg("-1").arg(mnt.join("many")))?;
    let listed: Vec<&[u8]> = listing.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let expected: Vec<Vec<u8>> = (0..MANY).map(|i| format!("f{i:04}").into_bytes()).collect();
    ensure!(
        listed.len() == MANY && listed.iter().zip(&expected).all(|(a, b)| a == b),
        "`ls many` listed {} of {MANY} names",
        listed.len()
    );

    let df = run_ok(command("df").arg("-B1").arg("--output=size,target").arg(mnt))?;
    ensure!(df.stdout_text().contains(&mnt.display().to_string()), "{df}");
    let local = run_ok(command("df").arg("-B1").arg("--output=size").arg(root))?;
    let size = |run: &Run| {
        run.stdout_text().lines().nth(1).and_then(|l| l.split_whitespace().next().map(str::to_owned))
    };
    ensure!(size(&df).is_some() && size(&df) == size(&local), "df sizes differ:\n{df}\n{local}");
    Ok(())
}

/// The names in `dir`, as bytes.
fn names(dir: &Path) -> Result<BTreeSet<OsString>> {
    fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| Ok(e?.file_name()))
        .collect()
}

/// `find DIR -printf` of path, type, mode, size, link target and mtime of every entry; mtimes
/// cut to whole seconds unless `ns_times`.
fn walk(dir: &Path, ns_times: bool) -> Result<BTreeSet<Vec<u8>>> {
    let out = run_ok(command("find").arg(dir).args([
        "-mindepth",
        "1",
        "-printf",
        "%P\\t%y\\t%m\\t%s\\t%l\\t%T@\\0",
    ]))?;
    Ok(out
        .stdout
        .split(|&b| b == 0)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let keep = if ns_times {
                line.len()
            } else {
                line.iter().rposition(|&b| b == b'.').unwrap_or(line.len())
            };
            line[..keep].to_vec()
        })
        .collect())
}

fn sha256(path: &Path) -> Result<String> {
    let out = run_ok(command("sha256sum").arg(path))?;
    Ok(out.stdout_text().split_whitespace().next().unwrap_or_default().to_owned())
}

#[test]
fn read_path_against_devmount_server() -> Result<()> {
    let s = Server::start()?;
    make_tree(s.root())?;
    // A data cache much smaller than big.bin: its sha256 goes through eviction.
    let mount = s.mount(MountOptions::new().data_cache(8 << 20))?;
    check_read_path(s.root(), mount.path(), true).with_context(|| mount.log())?;
    mount.unmount()?;
    Ok(())
}

#[test]
fn read_path_against_openssh() -> Result<()> {
    let sshd = Sshd::start()?;
    make_tree(sshd.root())?;
    let mount = sshd.mount(MountOptions::new().timeout(SHORT_TIMEOUT))?;
    check_read_path(sshd.root(), mount.path(), false)
        .with_context(|| format!("{}\n--- sshd ---\n{}", mount.log(), sshd.log()))?;
    mount.unmount()?;
    Ok(())
}

/// Waits until `seen` holds, checking at short intervals; fails with the last state seen if it
/// does not within `deadline`. Returns how long it took.
fn within(
    what: &str,
    deadline: Duration,
    mut seen: impl FnMut() -> Result<bool, String>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let state = seen();
        let elapsed = start.elapsed();
        if state == Ok(true) {
            println!("{what}: seen after {elapsed:?}");
            return Ok(elapsed);
        }
        if elapsed >= deadline {
            bail!("{what}: not seen within {deadline:?}; last state: {state:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(path: &Path) -> Result<bool, String> {
    fs::read(path).map(|_| true).map_err(|e| e.to_string())
}

fn reads(path: &Path, want: &[u8]) -> Result<bool, String> {
    match fs::read(path) {
        Ok(got) if got == want => Ok(true),
        Ok(got) => Err(format!("reads {:?}", String::from_utf8_lossy(&got))),
        Err(e) => Err(e.to_string()),
    }
}

fn listed(dir: &Path, name: &str, present: bool) -> Result<bool, String> {
    let names = names(dir).map_err(|e| format!("{e:#}"))?;
    if names.contains(OsStr::new(name)) == present {
        Ok(true)
    } else {
        Err(format!("listing: {names:?}"))
    }
}

/// How content changes are made in the root.
#[derive(Clone, Copy)]
enum Rewrite {
    /// Just rewritten: the change feed reports it whatever its times.
    Plain,
    /// Rewritten with an mtime in a later whole second than before, as a change made a second
    /// after the last one would have: SFTP v3 carries whole seconds only, so without a feed a
    /// same-size change within the same second cannot be told from no change (see
    /// `same_size_change_within_the_same_second_against_openssh`).
    LaterSecond,
}

/// Replaces the contents of `path` as `how` says.
fn rewrite(path: &Path, contents: &[u8], how: Rewrite) -> Result<()> {
    let before = fs::metadata(path)?.modified()?;
    fs::write(path, contents)?;
    if let Rewrite::LaterSecond = how {
        let secs = before.duration_since(UNIX_EPOCH)?.as_secs() + 1;
        fs::File::options().write(true).open(path)?.set_modified(UNIX_EPOCH + Duration::from_secs(secs))?;
    }
    Ok(())
}

/// Changes made directly in `root` while the mount has them cached must show within `deadline`.
fn check_remote_changes(root: &Path, mnt: &Path, deadline: Duration, how: Rewrite) -> Result<()> {
    fs::create_dir(root.join("dir"))?;
    fs::write(root.join("same-size.txt"), b"AAAAAAAA")?;
    fs::write(root.join("grows.txt"), b"short")?;
    fs::write(root.join("dir/nested.txt"), b"before")?;
    fs::write(root.join("gone.txt"), b"to be deleted")?;
    fs::write(root.join("old-name.txt"), b"renamed contents")?;

    // Fill every cache: listings, attributes and pages (once the new files show: the mount may
    // have walked the tree just before they were made).
    for name in ["same-size.txt", "grows.txt", "dir/nested.txt", "gone.txt", "old-name.txt"] {
        within(&format!("{name} made in the pod"), deadline, || read(&mnt.join(name)))?;
    }
    names(mnt)?;
    names(&mnt.join("dir"))?;
    let absent = fs::metadata(mnt.join("new.txt"));
    ensure!(absent.is_err(), "new.txt before it exists: {absent:?}");

    rewrite(&root.join("same-size.txt"), b"BBBBBBBB", how)?;
    within("same-size content change", deadline, || reads(&mnt.join("same-size.txt"), b"BBBBBBBB"))?;

    rewrite(&root.join("grows.txt"), b"much longer now", how)?;
    within("content change that grows the file", deadline, || {
        reads(&mnt.join("grows.txt"), b"much longer now")
    })?;

    rewrite(&root.join("dir/nested.txt"), b"after!", how)?;
    within("content change in a subdirectory", deadline, || reads(&mnt.join("dir/nested.txt"), b"after!"))?;

    fs::write(root.join("new.txt"), b"fresh")?;
    within("a new file in the listing", deadline, || listed(mnt, "new.txt", true))?;
    within("the new file's contents", deadline, || reads(&mnt.join("new.txt"), b"fresh"))?;

    fs::remove_file(root.join("gone.txt"))?;
    within("a deleted file gone from the listing", deadline, || listed(mnt, "gone.txt", false))?;
    within("a deleted file gone from lookups", deadline, || match fs::metadata(mnt.join("gone.txt")) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        other => Err(format!("stat: {other:?}")),
    })?;

    fs::rename(root.join("old-name.txt"), root.join("new-name.txt"))?;
    within("a rename in the listing", deadline, || {
        listed(mnt, "new-name.txt", true).and_then(|_| listed(mnt, "old-name.txt", false))
    })?;
    within("the renamed file's contents", deadline, || {
        reads(&mnt.join("new-name.txt"), b"renamed contents")
    })?;
    Ok(())
}

#[test]
fn remote_changes_show_within_a_second_with_the_feed() -> Result<()> {
    let s = Server::start()?;
    let mount = s.mount(MountOptions::new())?;
    check_remote_changes(s.root(), mount.path(), FEED_DEADLINE, Rewrite::Plain)
        .with_context(|| format!("{}\n--- server stderr ---\n{}", mount.log(), s.log()))?;
    mount.unmount()?;
    Ok(())
}

/// A listing taken before a file was deleted in the pod must not bring the file back: reading
/// an old directory handle (readdirplus) after the feed reported the delete may still list the
/// name, but must not make the kernel believe the file exists for the long feed-backed timeout.
/// This is the race that rarely fails `remote_changes_show_within_a_second_with_the_feed` under
/// load, made deterministic.
#[test]
fn a_listing_older_than_a_delete_does_not_revive_the_file() -> Result<()> {
    let s = Server::start()?;
    fs::create_dir(s.root().join("dir"))?;
    fs::write(s.root().join("dir/gone.txt"), b"to be deleted")?;
    let mount = s.mount(MountOptions::new())?;
    let (dir, gone) = (mount.path().join("dir"), mount.path().join("dir/gone.txt"));
    ensure!(fs::read(&gone)? == b"to be deleted");

    // opendir: the listing with gone.txt is taken now; nothing is read from it yet.
    let old_listing = fs::read_dir(&dir)?;
    fs::remove_file(s.root().join("dir/gone.txt"))?;
    within("the delete, by lookup", FEED_DEADLINE, || match fs::metadata(&gone) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        other => Err(format!("stat: {other:?}")),
    })?;
    let listed: Vec<OsString> = old_listing.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    println!("the old listing gave {listed:?}");
    let stat = fs::metadata(&gone);
    ensure!(
        stat.as_ref().is_err_and(|e| e.kind() == ErrorKind::NotFound),
        "gone.txt is back after reading the old listing: {stat:?}"
    );
    mount.unmount()?;
    Ok(())
}

/// The kernel keeps a listing the feed vouches for (so a warm `ls` or `find` costs the daemon
/// nothing); a change in the pod must still show in the next listing, in the directory itself
/// and one level down, and a handle opened before the change must not leave its older listing
/// behind in the kernel.
#[test]
fn listings_the_kernel_keeps_show_changes_made_in_the_pod() -> Result<()> {
    let s = Server::start()?;
    fs::create_dir_all(s.root().join("dir/sub"))?;
    fs::write(s.root().join("dir/old.txt"), b"old")?;
    let mount = s.mount(MountOptions::new())?;
    let (dir, sub) = (mount.path().join("dir"), mount.path().join("dir/sub"));
    let check = || -> Result<()> {
        // Twice each: the second listing is the one the kernel may answer by itself.
        for _ in 0..2 {
            ensure!(names(&dir)? == BTreeSet::from(["old.txt".into(), "sub".into()]));
            ensure!(names(&sub)?.is_empty());
        }
        fs::write(s.root().join("dir/new.txt"), b"new")?;
        within("a new file in a kept listing", FEED_DEADLINE, || listed(&dir, "new.txt", true))?;
        fs::remove_file(s.root().join("dir/old.txt"))?;
        within("a deleted file gone from a kept listing", FEED_DEADLINE, || {
            listed(&dir, "old.txt", false)
        })?;
        fs::write(s.root().join("dir/sub/deep.txt"), b"deep")?;
        within("a new file one level down", FEED_DEADLINE, || listed(&sub, "deep.txt", true))?;

        // Opened before the change, read after the mount knows of it: whatever this handle
        // lists, the next listing must show the new file.
        let old_handle = fs::read_dir(&dir)?;
        fs::write(s.root().join("dir/late.txt"), b"late")?;
        within("the late file, by lookup", FEED_DEADLINE, || read(&dir.join("late.txt")))?;
        let listed_by_old: Vec<OsString> =
            old_handle.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        println!("the handle opened before the change listed {listed_by_old:?}");
        within("the late file in the next listing", FEED_DEADLINE, || listed(&dir, "late.txt", true))?;
        Ok(())
    };
    check().with_context(|| format!("{}\n--- server stderr ---\n{}", mount.log(), s.log()))?;
    mount.unmount()?;
    Ok(())
}

/// A name found absent is remembered by the kernel on a mount with a feed (git and builds probe
/// many); it appears as soon as the pod makes it, whatever kind of change made it.
#[test]
fn absent_names_the_kernel_remembers_appear_when_made_in_the_pod() -> Result<()> {
    let s = Server::start()?;
    let root = s.root();
    fs::create_dir_all(root.join("dir/sub"))?;
    fs::write(root.join("dir/moved-away"), b"moved")?;
    let mount = s.mount(MountOptions::new())?;
    let mnt = mount.path();
    let probed = ["dir/file", "dir/sub/deep", "dir/newdir", "dir/link", "dir/moved-here", "top", "dir/made-here"];
    let check = || -> Result<()> {
        // Three rounds: the later ones are the kernel's to answer.
        for _ in 0..3 {
            for name in probed {
                let r = fs::symlink_metadata(mnt.join(name));
                ensure!(r.as_ref().is_err_and(|e| e.kind() == ErrorKind::NotFound), "{name} before: {r:?}");
            }
        }
        fs::write(root.join("dir/file"), b"file")?;
        fs::write(root.join("dir/sub/deep"), b"deep")?;
        fs::create_dir(root.join("dir/newdir"))?;
        symlink("file", root.join("dir/link"))?;
        fs::rename(root.join("dir/moved-away"), root.join("dir/moved-here"))?;
        fs::write(root.join("top"), b"top")?;
        for name in &probed[..6] {
            within(&format!("{name}, made in the pod"), FEED_DEADLINE, || {
                fs::symlink_metadata(mnt.join(name)).map(|_| true).map_err(|e| e.to_string())
            })?;
        }
        ensure!(fs::read(mnt.join("dir/moved-here"))? == b"moved");
        fs::write(mnt.join("dir/made-here"), b"here")?;
        ensure!(fs::read(mnt.join("dir/made-here"))? == b"here", "a name made through the mount");
        Ok(())
    };
    check().with_context(|| format!("{}\n--- server stderr ---\n{}", mount.log(), s.log()))?;
    mount.unmount()?;
    Ok(())
}

/// Directory reads page through a snapshot that the offsets the kernel hands back find again:
/// readers of one large directory interleaved, and readers that stop early, each see every
/// name once; a change in the pod shows in the next listing.
#[test]
fn interleaved_and_abandoned_directory_reads_see_every_name_once() -> Result<()> {
    let s = Server::start()?;
    let dir = s.root().join("many");
    fs::create_dir(&dir)?;
    for i in 0..MANY {
        fs::write(dir.join(format!("name-with-some-length-{i:05}")), b"")?;
    }
    let mount = s.mount(MountOptions::new())?;
    let seen = mount.path().join("many");
    let check = || -> Result<()> {
        for _ in 0..3 {
            let mut early = fs::read_dir(&seen)?;
            ensure!(early.next().is_some(), "an early reader saw nothing");
        }
        for round in 0..2 {
            let (mut a, mut b) = (fs::read_dir(&seen)?, fs::read_dir(&seen)?);
            let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
            loop {
                let (x, y) = (a.next(), b.next());
                if x.is_none() && y.is_none() {
                    break;
                }
                from_a.extend(x.transpose()?.map(|e| e.file_name()));
                from_b.extend(y.transpose()?.map(|e| e.file_name()));
            }
            for (reader, got) in [("first", &from_a), ("second", &from_b)] {
                let unique: BTreeSet<&OsString> = got.iter().collect();
                ensure!(
                    got.len() == MANY && unique.len() == MANY,
                    "round {round}: the {reader} reader saw {} names, {} different, of {MANY}",
                    got.len(),
                    unique.len()
                );
            }
        }
        fs::write(dir.join("late"), b"")?;
        within("a name made in the pod, in the next listing", FEED_DEADLINE, || listed(&seen, "late", true))?;
        ensure!(names(&seen)?.len() == MANY + 1);
        Ok(())
    };
    check().with_context(|| format!("{}\n--- server stderr ---\n{}", mount.log(), s.log()))?;
    mount.unmount()?;
    Ok(())
}

#[test]
fn remote_changes_show_within_the_timeout_against_openssh() -> Result<()> {
    let sshd = Sshd::start()?;
    let mount = sshd.mount(MountOptions::new().timeout(SHORT_TIMEOUT))?;
    let deadline = Duration::from_secs_f64(SHORT_TIMEOUT) + Duration::from_secs(1);
    check_remote_changes(sshd.root(), mount.path(), deadline, Rewrite::LaterSecond)
        .with_context(|| mount.log())?;
    mount.unmount()?;
    Ok(())
}

/// A file read through the mount, then rewritten in the pod with the same size in the same
/// second, keeps showing its old contents: with whole-second mtimes nothing in its attributes
/// changed. Ignored until the client treats a cached file whose mtime is as recent as its
/// cached copy as unverified (git's "racy clean" rule) instead of keeping its pages.
#[test]
fn same_size_change_within_the_same_second_against_openssh() -> Result<()> {
    let sshd = Sshd::start()?;
    let mount = sshd.mount(MountOptions::new().timeout(SHORT_TIMEOUT))?;
    let (file, seen) = (sshd.root().join("racy.txt"), mount.path().join("racy.txt"));
    fs::write(&file, b"AAAAAAAA")?;
    ensure!(fs::read(&seen)? == b"AAAAAAAA");
    fs::write(&file, b"BBBBBBBB")?;
    let deadline = Duration::from_secs_f64(SHORT_TIMEOUT) + Duration::from_secs(1);
    within("same-size change in the same second", deadline, || reads(&seen, b"BBBBBBBB"))
        .with_context(|| mount.log())?;
    mount.unmount()?;
    Ok(())
}

/// A failed `devmount mount`: exit code 255, nothing on stdout, and one line on stderr that
/// holds each of `words`.
fn one_line_error(run: &Run, words: &[&str]) -> Result<()> {
    let err = run.stderr_text();
    ensure!(run.code() == Some(255), "exit code {:?}, want 255\n{run}", run.code());
    ensure!(run.stdout.is_empty(), "stdout is not empty\n{run}");
    ensure!(err.ends_with('\n') && err.trim_end().lines().count() == 1, "not one line\n{run}");
    ensure!(err.starts_with("devmount: "), "{run}");
    for word in words {
        ensure!(err.contains(word), "the message lacks {word:?}\n{run}");
    }
    println!("{}", err.trim_end());
    Ok(())
}

#[test]
fn mount_point_missing_not_a_directory_or_already_mounted() -> Result<()> {
    let s = Server::start()?;
    let e = s.endpoint();
    let missing = s.keys().join("no-such-dir");
    let run = e.mount_fails(MountOptions::new().mountpoint(&missing))?;
    one_line_error(&run, &["does not exist", &format!("mkdir -p {}", missing.display())])?;

    let file = s.keys().join("a-file");
    fs::write(&file, b"")?;
    let run = e.mount_fails(MountOptions::new().mountpoint(&file))?;
    one_line_error(&run, &["not a directory", &file.display().to_string()])?;

    let mount = s.mount(MountOptions::new())?;
    let run = e.mount_fails(MountOptions::new())?;
    let mnt = mount.path().display().to_string();
    one_line_error(&run, &["already a mount point", &format!("fusermount3 -u {mnt}")])?;
    // The first mount is unharmed.
    ensure!(names(mount.path())?.is_empty());
    mount.unmount()?;
    Ok(())
}

#[test]
fn a_stale_mount_is_named_with_the_command_that_clears_it() -> Result<()> {
    let s = Server::start()?;
    fs::write(s.root().join("file"), b"x")?;
    let mut crashed = s.mount(MountOptions::new().foreground())?;
    ensure!(names(crashed.path())?.len() == 1);
    crashed.signal(Signal::SIGKILL)?;
    crashed.wait_exit(EXIT_DEADLINE)?;
    let mnt = crashed.path().to_owned();
    let stat = fs::metadata(&mnt);
    ensure!(
        stat.as_ref().is_err_and(|e| e.raw_os_error() == Some(nix::errno::Errno::ENOTCONN as i32)),
        "stat of the dead mount: {stat:?}"
    );

    let run = s.endpoint().mount_fails(MountOptions::new())?;
    one_line_error(&run, &["stale", &format!("fusermount3 -u {}", mnt.display())])?;

    // The offered command clears it, and the mount point is usable again.
    run_ok(command("fusermount3").arg("-u").arg(&mnt))?;
    drop(crashed);
    let mount = s.mount(MountOptions::new())?;
    ensure!(fs::read(mount.path().join("file"))? == b"x");
    mount.unmount()?;
    Ok(())
}

#[test]
fn an_unreachable_host_is_named() -> Result<()> {
    let s = Server::start()?;
    // Free when probed: nothing listens there.
    let port = free_port()?;
    let run = s.endpoint().mount_fails(MountOptions::new().port(port))?;
    one_line_error(&run, &["cannot reach", &format!("127.0.0.1:{port}"), "refused"])?;
    Ok(())
}

/// `SHA256:...` of the public key next to the private key `key`.
fn fingerprint_of(key: &Path) -> Result<String> {
    let out =
        run_ok(command("ssh-keygen").args(["-l", "-E", "sha256", "-f"]).arg(key.with_extension("pub")))?;
    Ok(out.stdout_text().split_whitespace().nth(1).unwrap_or_default().to_owned())
}

#[test]
fn a_refused_key_is_named() -> Result<()> {
    let s = Server::start()?;
    let stranger = s.keys().join("stranger");
    keygen(&stranger)?;
    let run = s.endpoint().mount_fails(MountOptions::new().identity(&stranger))?;
    one_line_error(&run, &["refused the key", &fingerprint_of(&stranger)?, "authorized_keys"])?;
    Ok(())
}

#[test]
fn a_host_key_mismatch_shows_the_servers_fingerprint() -> Result<()> {
    let s = Server::start()?;
    let other = s.keys().join("other_host_key");
    keygen(&other)?;
    let known_hosts = s.keys().join("wrong_known_hosts");
    let other_pub = fs::read_to_string(other.with_extension("pub"))?;
    fs::write(&known_hosts, format!("[127.0.0.1]:{} {other_pub}", s.port()))?;
    let run = s.endpoint().mount_fails(MountOptions::new().known_hosts(&known_hosts))?;
    one_line_error(&run, &["does not match", s.fingerprint(), &format!("[127.0.0.1]:{}", s.port())])?;

    // A known_hosts without the host: unknown, also with the fingerprint.
    let empty = s.keys().join("empty_known_hosts");
    fs::write(&empty, b"")?;
    let run = s.endpoint().mount_fails(MountOptions::new().known_hosts(&empty))?;
    one_line_error(&run, &["is not in", s.fingerprint()])?;
    Ok(())
}

#[test]
fn a_missing_remote_path_is_named() -> Result<()> {
    let s = Server::start()?;
    let missing = s.root().join("no-such-dir");
    let run = s.endpoint().mount_fails(MountOptions::new().remote_path(&missing))?;
    one_line_error(&run, &["remote path", &missing.display().to_string(), "No such file"])?;

    fs::write(s.root().join("a-file"), b"")?;
    let run = s.endpoint().mount_fails(MountOptions::new().remote_path(s.root().join("a-file")))?;
    one_line_error(&run, &["remote path", "not a directory"])?;
    Ok(())
}

#[test]
fn a_target_that_is_not_ssh_is_refused() -> Result<()> {
    let s = Server::start()?;
    let url = format!("sftp://devmount@127.0.0.1:{}{}", s.port(), s.root().display());
    let run = s.endpoint().mount_fails(MountOptions::new().target(&url))?;
    one_line_error(&run, &[&format!("target '{url}'"), "is not an ssh:// URL", "ssh://USER@HOST:PORT/PATH"])?;

    let run = s.endpoint().mount_fails(MountOptions::new().target(s.root()))?;
    one_line_error(&run, &["is not an ssh:// URL"])?;
    Ok(())
}

#[test]
fn errors_against_openssh() -> Result<()> {
    let sshd = Sshd::start()?;
    let e = sshd.endpoint();
    let stranger = e.scratch.join("stranger");
    keygen(&stranger)?;
    let run = e.mount_fails(MountOptions::new().identity(&stranger))?;
    one_line_error(&run, &["refused the key", &fingerprint_of(&stranger)?])?;

    let missing = sshd.root().join("no-such-dir");
    let run = e.mount_fails(MountOptions::new().remote_path(&missing))?;
    one_line_error(&run, &["remote path", &missing.display().to_string(), "No such file"])?;
    Ok(())
}

/// The daemon must not keep the caller's stdout and stderr: `devmount mount ... | cat` or
/// `$(devmount mount ...)` would wait until the unmount.
#[test]
fn the_daemon_does_not_hold_the_callers_output() -> Result<()> {
    let s = Server::start()?;
    let mount = s.mount(MountOptions::new())?;
    // The harness gives `devmount mount` files directly in the scratch directory as stdout and
    // stderr; the client's own log file would be in the state directory below it.
    for fd in [1, 2] {
        let target = fs::read_link(format!("/proc/{}/fd/{fd}", mount.pid()))?;
        ensure!(
            target.parent() != Some(s.keys()),
            "the daemon's fd {fd} is still the caller's {}",
            target.display()
        );
    }
    mount.unmount()?;
    Ok(())
}

/// Unmounts with `cmd` and checks that the daemon exits soon after.
fn unmount_ends_daemon(mount: DevMount, cmd: &mut std::process::Command) -> Result<()> {
    let pid = mount.pid();
    let took = mount.unmount_with(cmd)?;
    println!("`{:?}`: daemon {pid} exited {took:?} after the unmount started", cmd.get_program());
    ensure!(took <= EXIT_DEADLINE, "the daemon took {took:?} to exit");
    Ok(())
}

#[test]
fn unmount_ends_the_daemon() -> Result<()> {
    let s = Server::start()?;
    fs::write(s.root().join("file"), b"x")?;

    let mount = s.mount(MountOptions::new())?;
    ensure!(fs::read(mount.path().join("file"))? == b"x");
    let mnt = mount.path().to_owned();
    unmount_ends_daemon(mount, command("fusermount3").arg("-u").arg(&mnt))?;

    let mount = s.mount(MountOptions::new())?;
    ensure!(fs::read(mount.path().join("file"))? == b"x");
    unmount_ends_daemon(mount, command("umount").arg(&mnt))?;
    ensure!(names(&mnt)?.is_empty(), "the mount point is not empty after unmounting");
    Ok(())
}

/// One change made in the served directory.
type Change<'a> = dyn Fn() -> std::io::Result<()> + 'a;

/// What `inotifywait -m -r` on the mount reports for changes made in the pod: the echo thread
/// replays each one through the mount (see fuse-client/src/echo.rs).
#[test]
fn local_watchers_see_changes_made_in_the_pod() -> Result<()> {
    let s = Server::start()?;
    fs::create_dir(s.root().join("src"))?;
    fs::write(s.root().join("src/old.txt"), b"old")?;
    let mount = s.mount(MountOptions::new())?;
    let mnt = mount.path();
    names(mnt)?;
    let watch = devmount_tests::Proc::spawn(command("inotifywait").args(["-m", "-r", "--format", "%e %w%f"]).arg(mnt))?;
    watch.wait_stderr("watches established", Duration::from_secs(10), |e| {
        String::from_utf8_lossy(e).contains("Watches established")
    })?;
    let root = s.root();
    let m = mnt.display();
    // One change at a time, each awaited, as an editor or a build in the pod makes them.
    let steps: [(&Change<'_>, Vec<String>); 5] = [
        (&|| fs::write(root.join("src/new.txt"), b"made in the pod"), vec![format!("CREATE {m}/src/new.txt")]),
        (
            &|| fs::write(root.join("src/old.txt"), b"changed in the pod"),
            vec![format!("CLOSE_WRITE,CLOSE {m}/src/old.txt"), format!("ATTRIB {m}/src/old.txt")],
        ),
        (&|| fs::create_dir(root.join("src/pkg")), vec![format!("CREATE,ISDIR {m}/src/pkg")]),
        (
            &|| fs::rename(root.join("src/new.txt"), root.join("src/renamed.txt")),
            vec![format!("MOVED_FROM {m}/src/new.txt"), format!("MOVED_TO {m}/src/renamed.txt")],
        ),
        (&|| fs::remove_file(root.join("src/old.txt")), vec![format!("DELETE {m}/src/old.txt")]),
    ];
    for (change, want) in steps {
        change()?;
        watch.wait_stdout(&format!("{want:?}"), Duration::from_secs(5), |out| {
            let out = String::from_utf8_lossy(out);
            want.iter().all(|w| out.lines().any(|l| l == w))
        })?;
    }
    mount.unmount()?;
    Ok(())
}
