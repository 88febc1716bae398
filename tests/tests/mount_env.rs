//! `devmount mount` in the environments it meets besides a root shell: run by an ordinary local
//! user (the mount goes through the setuid `fusermount3`, the state lives in the user's home,
//! and the server's user appears as the local one), and with a journal at its size cap while
//! the server is out of reach, where writers must wait rather than fail.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use devmount_tests::{
    client_bin, command, run, run_ok, DevMount, LocalUser, MountOptions, Proc, Relay, Server, TIMEOUT,
};

/// The unprivileged user the client runs as; made with `useradd -m` if missing.
const TEST_USER: &str = "devmount-test";
/// The smallest journal `devmount mount --journal-max` takes.
const JOURNAL_MAX: u64 = 1 << 20;
/// What the writer writes through the full journal, and in what pieces.
const WRITE_TOTAL: usize = 8 << 20;
const CHUNK: usize = 64 << 10;
/// How long a writer held by the full journal is watched: it must neither fail nor get past
/// the cap in that time. A lower bound on a wait that should last until the relay opens, so
/// a slow machine cannot make it fail.
const HOLD: Duration = Duration::from_secs(2);
/// How often the held writer is looked at.
const LOOK: Duration = Duration::from_millis(50);

/// The fusermount3 on PATH, which must be setuid root (Debian's fuse3 installs it so).
fn setuid_fusermount() -> Result<PathBuf> {
    let found = run_ok(command("sh").args(["-c", "command -v fusermount3"]))
        .context("fusermount3 is not on PATH: install fuse3 (scripts/setup does)")?;
    let path = PathBuf::from(found.stdout_text().trim());
    let meta = fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
    ensure!(
        meta.uid() == 0 && meta.mode() & 0o4000 != 0,
        "{} is not setuid root (mode {:o}, owner {}): reinstall fuse3",
        path.display(),
        meta.mode() & 0o7777,
        meta.uid()
    );
    Ok(path)
}

/// Makes /dev/fuse readable and writable by everyone, as udev sets it up on a desktop, if
/// `user` cannot open it (containers often create it 0600).
fn let_user_open_fuse(user: &LocalUser) -> Result<()> {
    let can_open = |user: &LocalUser| -> Result<bool> {
        Ok(run(user.command("test").args(["-r", "/dev/fuse", "-a", "-w", "/dev/fuse"]))?.success())
    };
    if can_open(user)? {
        return Ok(());
    }
    fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666))
        .context("chmod 0666 /dev/fuse, so that an ordinary user may mount")?;
    ensure!(can_open(user)?, "{} still cannot open /dev/fuse after chmod 0666", user.name);
    Ok(())
}

/// Copies `from` to `to` for `user`, readable by that user only.
fn give(user: &LocalUser, from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o600))?;
    user.chown(to)
}

/// The names in `dir`; none if it does not exist.
fn entries(dir: &Path) -> Result<BTreeSet<OsString>> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        listing => listing
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| Ok(e.with_context(|| format!("listing {}", dir.display()))?.file_name()))
            .collect(),
    }
}

/// The real user and group ids of process `pid`.
fn ids_of(pid: i32) -> Result<(u32, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("pid {pid}"))?;
    let real = |field: &str| -> Result<u32> {
        let line = status.lines().find_map(|l| l.strip_prefix(field)).context("no such line")?;
        let id = line.split_whitespace().next().context("empty line")?;
        id.parse().with_context(|| format!("{field} {line:?}"))
    };
    Ok((real("Uid:")?, real("Gid:")?))
}

/// The super options of the mount at `mnt` (the last field of its mountinfo line).
fn super_options(mnt: &Path) -> Result<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let wanted = mnt.to_str().context("the mount point is not UTF-8")?;
    info.lines()
        .find(|line| line.split(' ').nth(4) == Some(wanted))
        .and_then(|line| line.rsplit(' ').next())
        .map(str::to_owned)
        .with_context(|| format!("{wanted} is not in /proc/self/mountinfo"))
}

/// What the user does on the mount: read the server's files, write new ones, list them.
const USER_SESSION: &str = r#"
set -e
cd "$1"
cat hello.txt sub/inner.txt
printf 'written by %s\n' "$(id -un)" > mine.txt
mkdir made
printf 'nested\n' > made/deep.txt
chmod 640 made/deep.txt
cat mine.txt made/deep.txt
echo ---
ls -l . made
"#;

/// One run as an ordinary user, end to end: `devmount mount` as that user mounts through
/// fusermount3 with its state in the user's home, the user reads and writes, `ls -l` shows the
/// user as the owner of the server user's files, `devmount sync` reaches the daemon, and
/// `fusermount3 -u` by the user ends the daemon.
#[test]
fn an_unprivileged_user_mounts_through_fusermount3() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this test makes a local user and runs the client as that user: run it as root (CI does)"
    );
    let fusermount = setuid_fusermount()?;
    let user = LocalUser::ensure(TEST_USER)?;
    let_user_open_fuse(&user)?;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(user.gid))?
        .with_context(|| format!("gid {} has no name", user.gid))?
        .name;

    // The server runs as root over a directory root owns: root is the server's user.
    let s = Server::start()?;
    fs::write(s.root().join("hello.txt"), b"hello from the pod\n")?;
    fs::create_dir(s.root().join("sub"))?;
    fs::write(s.root().join("sub/inner.txt"), b"inner\n")?;

    let home = user.tempdir("devmount-user-")?;
    let (key, known_hosts, mnt) =
        (home.path().join("key"), home.path().join("known_hosts"), home.path().join("mnt"));
    give(&user, &s.endpoint().identity, &key)?;
    give(&user, &s.endpoint().known_hosts, &known_hosts)?;
    fs::create_dir(&mnt)?;
    user.chown(&mnt)?;
    let state = user.home.join(".local/state/devmount");
    let kinds = ["journal", "log", "run"];
    let before: Vec<BTreeSet<OsString>> =
        kinds.iter().map(|kind| entries(&state.join(kind))).collect::<Result<_>>()?;
    let client = user.reachable_bin(&client_bin()?)?;

    let options =
        MountOptions::new().as_user(&user).mountpoint(&mnt).identity(&key).known_hosts(&known_hosts);
    let mount = s.mount(options)?;
    let context = |mount: &DevMount| format!("{}\n--- server ---\n{}", mount.log(), s.log());

    let daemon = ids_of(mount.pid())?;
    ensure!(daemon == (user.uid, user.gid), "the daemon runs as uid/gid {daemon:?}, not as {}", user.name);
    // The kernel lets only root mount FUSE itself: an ordinary user's mount is made by
    // fusermount3, which records the user as its owner.
    let options = super_options(mount.path())?;
    ensure!(
        options.split(',').any(|o| o == format!("user_id={}", user.uid)),
        "the mount's options are {options:?}: not made for uid {} through {}",
        user.uid,
        fusermount.display()
    );

    let session = run(user.command("sh").args(["-c", USER_SESSION, "sh"]).arg(&mnt))?;
    ensure!(session.success(), "{session}\n{}", context(&mount));
    let text = session.stdout_text();
    let (read, listing) = text.split_once("---\n").context("no listing")?;
    let want = format!("hello from the pod\ninner\nwritten by {}\nnested\n", user.name);
    ensure!(read == want, "read through the mount: {read:?}, want {want:?}");
    let mut owners = 0;
    for line in listing.lines().filter(|l| l.starts_with(['-', 'd'])) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            fields.get(2) == Some(&user.name.as_str()) && fields.get(3) == Some(&group.as_str()),
            "`ls -l` on the mount shows {line:?}, want owner {} and group {group}\n{listing}",
            user.name
        );
        owners += 1;
    }
    // hello.txt, sub, mine.txt, made; made/deep.txt.
    ensure!(owners == 5, "`ls -l` listed {owners} files and directories, want 5\n{listing}");

    run_ok(user.command(&client).arg("sync").arg(&mnt)).with_context(|| context(&mount))?;
    let server_user = fs::metadata(s.root())?.uid();
    for (name, data) in
        [("mine.txt", format!("written by {}\n", user.name)), ("made/deep.txt", "nested\n".into())]
    {
        let path = s.root().join(name);
        let got = fs::read(&path).with_context(|| format!("{name} on the server\n{}", context(&mount)))?;
        ensure!(got == data.as_bytes(), "{name} on the server holds {:?}", String::from_utf8_lossy(&got));
        let owner = fs::metadata(&path)?.uid();
        ensure!(
            owner == server_user,
            "{name} on the server is owned by uid {owner}, not the server's {server_user}"
        );
    }
    let mode = fs::metadata(s.root().join("made/deep.txt"))?.mode() & 0o7777;
    ensure!(mode == 0o640, "made/deep.txt on the server has mode {mode:o}, want 640");

    let journals = entries(&state.join("journal"))?;
    let new: Vec<&OsString> = journals.difference(&before[0]).collect();
    ensure!(new.len() == 1, "the mount made {new:?} in {}/journal, want one journal", state.display());
    let journal = state.join("journal").join(new[0]);
    ensure!(fs::metadata(&journal)?.uid() == user.uid, "{} is not owned by {}", journal.display(), user.name);

    mount
        .unmount_with(user.command("fusermount3").arg("-u").arg(&mnt))
        .with_context(|| format!("--- server ---\n{}", s.log()))?;

    // What this run left in the user's state directory; a failed run leaves it to look at.
    for (kind, before) in kinds.iter().zip(&before) {
        for name in entries(&state.join(kind))?.difference(before) {
            let path = state.join(kind).join(name);
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Creates `dst` and says `open`, waits for a line on stdin, then writes `src` to `dst` in
/// pieces of `chunk` bytes with one write(2) each, printing the number of pieces written after
/// each, and `done` after the close.
const WRITER: &str = r#"
import sys
src, dst, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src, "rb") as f, open(dst, "wb", buffering=0) as out:
    print("open", flush=True)
    sys.stdin.readline()
    n = 0
    while data := f.read(chunk):
        view = memoryview(data)
        while view:
            view = view[out.write(view):]
        n += 1
        print(n, flush=True)
print("done", flush=True)
"#;

/// Pieces the writer reports written so far.
fn written(writer: &Proc) -> usize {
    String::from_utf8_lossy(&writer.stdout())
        .lines()
        .filter_map(|l| l.parse::<usize>().ok())
        .max()
        .unwrap_or(0)
}

/// Bytes in the journal's segment files under `state` (`XDG_STATE_HOME`).
fn journal_bytes(state: &Path) -> Result<u64> {
    let mut total = 0;
    let journals = state.join("devmount/journal");
    for journal in entries(&journals)? {
        for name in entries(&journals.join(&journal))? {
            if Path::new(&name).extension().is_some_and(|e| e == "seg") {
                // A segment that went since the listing holds nothing any more.
                total += fs::metadata(journals.join(&journal).join(&name)).map_or(0, |m| m.len());
            }
        }
    }
    Ok(total)
}

/// Deterministic bytes that compress badly.
fn noise(len: usize) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

fn sha256(path: &Path) -> Result<String> {
    let out = run_ok(command("sha256sum").arg(path))?;
    Ok(out.stdout_text().split_whitespace().next().unwrap_or_default().to_owned())
}

/// A journal at its cap makes writers wait, not fail: with the server out of reach (the relay
/// blocked), a writer of 8 MiB through a mount with a 1 MiB journal fills the journal and is
/// held there, still running and no further than the cap; once the relay opens it finishes,
/// and after `devmount sync` the server has every byte.
#[test]
fn a_full_journal_makes_writers_wait_not_fail() -> Result<()> {
    let s = Server::start()?;
    let mut relay = Relay::start(s.port(), 0)?;
    let known_hosts = s.known_hosts_for(relay.port())?;
    let e = s.endpoint();
    let options = MountOptions::new().port(relay.port()).known_hosts(&known_hosts).journal_max(JOURNAL_MAX);
    let mount = s.mount(options)?;
    let context = |mount: &DevMount| format!("{}\n--- server ---\n{}", mount.log(), s.log());

    let src = s.local().join("big.bin");
    fs::write(&src, noise(WRITE_TOTAL))?;
    let (dst, on_server) = (mount.path().join("big.bin"), s.root().join("big.bin"));
    let mut writer =
        Proc::spawn(command("python3").args(["-c", WRITER]).arg(&src).arg(&dst).arg(CHUNK.to_string()))?;
    // The file is created while the server can be reached: the lookup before a create asks
    // the server, and only the writes are meant to meet the full journal.
    writer.wait_stdout("`open`", TIMEOUT, |out| out.starts_with(b"open\n"))?;
    relay.command("block")?;
    writer.write(b"go\n")?;

    // The journal fills to within a piece of its cap.
    let pieces = WRITE_TOTAL / CHUNK;
    let most = (JOURNAL_MAX as usize + CHUNK) / CHUNK;
    let full = JOURNAL_MAX - 2 * CHUNK as u64;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let bytes = journal_bytes(&e.state_home())?;
        if bytes >= full {
            break;
        }
        if let Some(status) = writer.try_wait()? {
            bail!(
                "the writer ended with {status} after {} of {pieces} pieces while the server was out of \
                 reach\n{}\n{}",
                written(&writer),
                String::from_utf8_lossy(&writer.kill().stderr),
                context(&mount)
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the journal holds {bytes} bytes after {TIMEOUT:?}, want {full} or more; the writer wrote {} \
             pieces\n{}",
            written(&writer),
            context(&mount)
        );
        thread::sleep(LOOK);
    }

    // Held at the cap: still running, and no further.
    let held = Instant::now();
    while held.elapsed() < HOLD {
        if let Some(status) = writer.try_wait()? {
            bail!(
                "the writer ended with {status} while the journal was full, after {} of {pieces} \
                 pieces\n{}\n{}",
                written(&writer),
                String::from_utf8_lossy(&writer.kill().stderr),
                context(&mount)
            );
        }
        let (n, bytes) = (written(&writer), journal_bytes(&e.state_home())?);
        ensure!(
            n <= most && bytes <= JOURNAL_MAX + CHUNK as u64,
            "with the server out of reach the writer got {n} pieces of {CHUNK} bytes into a journal \
             capped at {JOURNAL_MAX} bytes, which holds {bytes} bytes on disk\n{}",
            context(&mount)
        );
        thread::sleep(LOOK);
    }
    println!(
        "held at {} of {pieces} pieces, {} journal bytes",
        written(&writer),
        journal_bytes(&e.state_home())?
    );

    relay.command("unblock")?;
    let run = writer.wait(TIMEOUT).with_context(|| context(&mount))?;
    ensure!(run.success() && run.stdout_text().ends_with("done\n"), "{run}\n{}", context(&mount));
    ensure!(written(&writer) == pieces, "the writer wrote {} of {pieces} pieces", written(&writer));
    e.sync(mount.path()).with_context(|| context(&mount))?;
    let (want, got) = (sha256(&src)?, sha256(&on_server)?);
    ensure!(
        got == want,
        "the server's file has sha256 {got} ({} bytes), want {want} ({WRITE_TOTAL} bytes)\n{}",
        fs::metadata(&on_server).map_or(0, |m| m.len()),
        context(&mount)
    );
    mount.unmount()?;
    Ok(())
}
