//! Writes through `devmount mount`, by real programs: git, editors' save patterns, dd, tar,
//! mmap, the open flags, fsync, and a crash of the client in the middle of writing. Against
//! devmount-server, and against OpenSSH's sshd where the check does not depend on
//! devmount-server's extensions. The served directory is the oracle, looked at after
//! `devmount sync` (or, for fsync, without it): see "Writes and durability" in
//! docs/semantics.md.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use devmount_tests::{
    command, git, mode_of, retry, run, run_ok, run_with, write_file_mode, DevMount, Endpoint, MountOptions,
    Proc, Relay, Run, Server, Sshd,
};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;

/// Files in the git working tree.
const GIT_FILES: usize = 3000;
/// Size of the file written with dd.
const BIG_MIB: usize = 1024;
/// Files in the tarball.
const TAR_FILES: usize = 500;
/// How long one step of a test may take before it counts as hung.
const STEP: Duration = Duration::from_secs(60);
/// For `git add` of [`GIT_FILES`] files (a debug build on a loaded machine takes most of a
/// minute).
const BIG_STEP: Duration = Duration::from_secs(600);

/// Runs `check` on a fresh background mount of a new devmount-server; the error carries both
/// logs.
fn on_devmount_server(check: impl FnOnce(&Endpoint, &Path) -> Result<()>) -> Result<()> {
    let s = Server::start()?;
    let e = s.endpoint();
    let mount = e.mount(MountOptions::new())?;
    check(&e, mount.path())
        .with_context(|| format!("{}\n--- server stderr ---\n{}", mount.log(), s.log()))?;
    mount.unmount()?;
    Ok(())
}

/// Runs `check` on a fresh mount of a new OpenSSH sshd (internal-sftp, 1 s timeouts).
fn on_openssh(check: impl FnOnce(&Endpoint, &Path) -> Result<()>) -> Result<()> {
    let sshd = Sshd::start()?;
    let e = sshd.endpoint();
    let mount = e.mount(MountOptions::new())?;
    check(e, mount.path()).with_context(|| format!("{}\n--- sshd ---\n{}", mount.log(), sshd.log()))?;
    mount.unmount()?;
    Ok(())
}

/// Runs `what`, printing how long it took.
fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let out = f().with_context(|| what.to_owned())?;
    println!("{what}: {:?}", start.elapsed());
    Ok(out)
}

/// `python3 -c SCRIPT ARGS...`, which must succeed.
fn python(script: &str, args: &[&OsStr]) -> Result<Run> {
    run_ok(command("python3").arg("-c").arg(script).args(args))
}

fn sha256(path: &Path) -> Result<String> {
    let out = run_ok(command("sha256sum").arg(path))?;
    Ok(out.stdout_text().split_whitespace().next().unwrap_or_default().to_owned())
}

/// The `i`th MiB of the big file: one MiB of pseudo-random words (splitmix64), with each 4 KiB
/// page stamped with its MiB and page number so that a misplaced page shows. Made again wherever
/// it is checked, so the test keeps no source copy of the GiB on disk.
fn big_block(i: usize) -> Vec<u8> {
    static RANDOM: OnceLock<Vec<u8>> = OnceLock::new();
    let mut block = RANDOM
        .get_or_init(|| {
            let mut x = 0u64;
            (0..1 << 17)
                .flat_map(|_| {
                    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    (z ^ (z >> 31)).to_le_bytes()
                })
                .collect()
        })
        .clone();
    for (page, stamp) in block.chunks_mut(4096).enumerate() {
        stamp[..8].copy_from_slice(&(i as u64).to_le_bytes());
        stamp[8..16].copy_from_slice(&(page as u64).to_le_bytes());
    }
    block
}

/// Fails unless `what` read from `from` is exactly [`BIG_MIB`] blocks of [`big_block`], naming
/// the first MiB that differs. The buffer is page-aligned, as O_DIRECT wants.
fn check_big(mut from: impl Read, what: &str) -> Result<()> {
    let mut raw = vec![0u8; (1 << 20) + 4096];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + (1 << 20)];
    for i in 0..=BIG_MIB {
        let mut got = 0;
        while got < buf.len() {
            match from.read(&mut buf[got..]).with_context(|| format!("read {what} at MiB {i}"))? {
                0 => break,
                n => got += n,
            }
        }
        if i == BIG_MIB {
            ensure!(got == 0, "{what} is longer than {BIG_MIB} MiB");
        } else if got < buf.len() {
            bail!("{what} ends {got} bytes into MiB {i}, want {BIG_MIB} MiB");
        } else {
            let want = big_block(i);
            if *buf != want[..] {
                let at = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap_or_default();
                let zeros = buf[at..].iter().filter(|&&b| b == 0).count();
                bail!("{what} differs from byte {at} of MiB {i} ({zeros} zero bytes from there to that MiB's end)");
            }
        }
    }
    Ok(())
}

fn errno_of(e: &std::io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

/// This process's umask, read where reading it does not change it.
fn umask() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field =
        status.lines().find_map(|l| l.strip_prefix("Umask:")).context("no Umask in /proc/self/status")?;
    u32::from_str_radix(field.trim(), 8).with_context(|| format!("Umask {field:?}"))
}

/// Contents and permission bits of `path`, for comparing the mount with the server.
fn state(path: &Path) -> Result<(Vec<u8>, u32)> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((data, mode_of(path)?))
}

/// Fails unless `path` holds `data` with permission bits `mode`.
fn expect_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let (got, got_mode) = state(path)?;
    ensure!(
        got == data,
        "{}: holds {:?}, want {:?}",
        path.display(),
        String::from_utf8_lossy(&got[..got.len().min(200)]),
        String::from_utf8_lossy(&data[..data.len().min(200)])
    );
    ensure!(got_mode == mode, "{}: mode {got_mode:o}, want {mode:o}", path.display());
    Ok(())
}

fn names(dir: &Path) -> Result<BTreeSet<String>> {
    fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect()
}

fn expect_names(dir: &Path, want: &[&str]) -> Result<()> {
    let got = names(dir)?;
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    ensure!(got == want, "{} lists {got:?}, want {want:?}", dir.display());
    Ok(())
}

/// A source tree of `files` files in directories of 40: text files of varied sizes, some
/// binary ones, an executable script and a README.
fn make_source_tree(dir: &Path, files: usize) -> Result<()> {
    fs::create_dir_all(dir)?;
    write_file_mode(&dir.join("run.sh"), b"#!/bin/sh\necho run\n", 0o755)?;
    fs::write(dir.join("README.md"), b"# a tree for git on devmount\n")?;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..files.saturating_sub(2) {
        let sub = dir.join(format!("gen/d{:02}", i / 40));
        fs::create_dir_all(&sub)?;
        if i % 97 == 0 {
            // xorshift: bytes git cannot delta or compress much.
            let bytes: Vec<u8> = (0..20_000)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            fs::write(sub.join(format!("b{i:04}.bin")), bytes)?;
        } else {
            let line = format!("line of file {i}: the quick brown fox jumps over the lazy dog\n");
            fs::write(sub.join(format!("f{i:04}.txt")), line.repeat(1 + i % 60))?;
        }
    }
    Ok(())
}

/// git init, add, commit, status, branch switches and commits on the mount; then the server's
/// copy of the repository must be sound and hold the same history.
fn check_git(e: &Endpoint, mnt: &Path) -> Result<()> {
    let src = e.scratch.join("git-src");
    make_source_tree(&src, GIT_FILES)?;
    let repo = mnt.join("repo");
    run_ok(git(mnt).args(["init", "-q", "-b", "main", "repo"]))?;
    timed("cp -r of the tree onto the mount", || {
        run_ok(command("cp").arg("-r").arg(src.join(".")).arg(&repo))
    })?;
    timed(&format!("git add of {GIT_FILES} files"), || {
        let out = run_with(git(&repo).args(["add", "-A"]), &[], BIG_STEP)?;
        ensure!(out.success(), "{out}");
        Ok(out)
    })?;
    timed("git commit", || run_ok(git(&repo).args(["commit", "-q", "-m", "initial"])))?;
    let tracked = run_ok(git(&repo).args(["ls-files"]))?.stdout_text().lines().count();
    ensure!(tracked == GIT_FILES, "{tracked} files tracked, want {GIT_FILES}");
    let clean = |when: &str| -> Result<()> {
        let status =
            timed(&format!("git status {when}"), || run_ok(git(&repo).args(["status", "--porcelain"])))?;
        ensure!(status.stdout.is_empty(), "git status {when} is not clean\n{status}");
        Ok(())
    };
    clean("after the first commit")?;

    let changed = repo.join("gen/d00/f0001.txt");
    let original = fs::read(&changed)?;
    run_ok(git(&repo).args(["checkout", "-q", "-b", "feature"]))?;
    fs::write(&changed, b"changed on the feature branch\n")?;
    fs::write(repo.join("only-on-feature.txt"), b"new on feature\n")?;
    run_ok(git(&repo).args(["add", "-A"]))?;
    run_ok(git(&repo).args(["commit", "-q", "-m", "feature change"]))?;
    clean("on feature")?;
    timed("git checkout main", || run_ok(git(&repo).args(["checkout", "-q", "main"])))?;
    ensure!(fs::read(&changed)? == original, "checkout main did not restore {}", changed.display());
    let leftover = fs::metadata(repo.join("only-on-feature.txt"));
    ensure!(leftover.is_err(), "checkout main left only-on-feature.txt: {leftover:?}");
    clean("back on main")?;
    fs::write(repo.join("README.md"), b"# changed on main\n")?;
    run_ok(git(&repo).args(["commit", "-q", "-a", "-m", "main change"]))?;
    clean("after the second commit on main")?;

    timed("devmount sync", || e.sync(mnt))?;
    let server = e.root.join("repo");
    let fsck = timed("git fsck --strict on the server", || run(git(&server).args(["fsck", "--strict"])))?;
    ensure!(fsck.success() && fsck.stderr.is_empty(), "fsck on the server\n{fsck}");
    let history = |dir: &Path| -> Result<String> {
        Ok(run_ok(git(dir).args(["log", "--all", "--format=%H %P %s"]))?.stdout_text())
    };
    let (seen, on_server) = (history(&repo)?, history(&server)?);
    ensure!(seen.lines().count() == 3, "history through the mount:\n{seen}");
    ensure!(seen == on_server, "git log differs\nthrough the mount:\n{seen}\non the server:\n{on_server}");
    let status = run_ok(git(&server).args(["status", "--porcelain"]))?;
    ensure!(status.stdout.is_empty(), "the server's working tree differs from main\n{status}");
    Ok(())
}

#[test]
fn git_against_devmount_server() -> Result<()> {
    on_devmount_server(check_git)
}

#[test]
fn git_against_openssh() -> Result<()> {
    on_openssh(check_git)
}

/// vim's way when it replaces the file (`backupcopy=no`), done by hand: a swap file while
/// editing, the new contents in a temporary file, fsync, the original's mode, rename over.
const VIM_STYLE: &str = r#"
import os, sys
d, name, data = sys.argv[1], sys.argv[2], sys.argv[3].encode()
path = os.path.join(d, name)
swap = os.path.join(d, "." + name + ".swp")
with open(swap, "wb") as s:
    s.write(b"b0VIM swap")
    s.flush()
    mode = os.stat(path).st_mode & 0o7777
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.rename(tmp, path)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
os.unlink(swap)
"#;

/// JetBrains' "safe write": new contents beside the file, the original moved aside, the new
/// one moved in, the original deleted.
const JETBRAINS_STYLE: &str = r#"
import os, sys
d, name, data = sys.argv[1], sys.argv[2], sys.argv[3].encode()
path = os.path.join(d, name)
tmp, old = path + "___jb_tmp___", path + "___jb_old___"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, os.stat(path).st_mode & 0o7777)
os.rename(path, old)
os.rename(tmp, path)
os.unlink(old)
"#;

/// VS Code's save: truncate and rewrite in place.
const VSCODE_STYLE: &str = r#"
import sys
with open(sys.argv[1], "w") as f:
    f.write(sys.argv[2])
"#;

/// Each editor's way to save, through the mount; afterwards the server's files have the right
/// contents and modes and no temporary file is left, with and without the server having seen
/// the first version.
fn check_save_patterns(e: &Endpoint, mnt: &Path) -> Result<()> {
    let (dir, server) = (mnt.join("edit"), e.root.join("edit"));
    fs::create_dir(&dir)?;
    write_file_mode(&dir.join("vim.txt"), b"vim version 1\n", 0o640)?;
    write_file_mode(&dir.join("jb.txt"), b"jetbrains version 1\n", 0o600)?;
    write_file_mode(&dir.join("code.txt"), b"vs code version 1, a long first line\n", 0o644)?;
    write_file_mode(&dir.join("backup.txt"), b"to be backed up\n", 0o640)?;
    write_file_mode(&dir.join("real-vim.txt"), b"real vim 1\n", 0o604)?;
    write_file_mode(&dir.join("real-vim-copy.txt"), b"real vim copy 1\n", 0o660)?;
    let d = dir.as_os_str();
    // Twice: the first time nothing is on the server yet, the second time everything is.
    for round in 1..=2 {
        python(VIM_STYLE, &[d, "vim.txt".as_ref(), format!("vim version {}\n", round + 1).as_ref()])?;
        python(
            JETBRAINS_STYLE,
            &[d, "jb.txt".as_ref(), format!("jetbrains version {}\n", round + 1).as_ref()],
        )?;
        let code = if round == 1 {
            "short\n".to_owned()
        } else {
            "vs code version 3, longer than before\n".repeat(3)
        };
        python(VSCODE_STYLE, &[dir.join("code.txt").as_os_str(), code.as_ref()])?;
        // Real vim: `backupcopy=no` renames the original to a backup and writes a new file;
        // `backupcopy=yes` copies it to a backup and overwrites the original in place.
        for (file, backupcopy) in [("real-vim.txt", "no"), ("real-vim-copy.txt", "yes")] {
            let set = format!("set backupcopy={backupcopy} writebackup nobackup");
            let vim = run(command("vim")
                .args(["-u", "NONE", "-i", "NONE", "-N", "-es", "-c", &set, "-c", "%s/$/!/", "-c", "wq"])
                .arg(dir.join(file)))?;
            ensure!(vim.success(), "vim saving {file}\n{vim}");
        }
        if round == 1 {
            timed("devmount sync", || e.sync(mnt))?;
        }
    }
    run_ok(command("cp").arg(dir.join("backup.txt")).arg(dir.join("backup.txt~")))?;
    run_ok(command("cp").arg("-p").arg(dir.join("jb.txt")).arg(dir.join("jb.txt.bak")))?;

    let code = "vs code version 3, longer than before\n".repeat(3);
    let want: [(&str, &[u8], u32); 8] = [
        ("vim.txt", b"vim version 3\n", 0o640),
        ("jb.txt", b"jetbrains version 3\n", 0o600),
        ("jb.txt.bak", b"jetbrains version 3\n", 0o600),
        ("code.txt", code.as_bytes(), 0o644),
        ("backup.txt", b"to be backed up\n", 0o640),
        // cp without -p: the source's mode less the umask.
        ("backup.txt~", b"to be backed up\n", 0o640 & !umask()?),
        ("real-vim.txt", b"real vim 1!!\n", 0o604),
        ("real-vim-copy.txt", b"real vim copy 1!!\n", 0o660),
    ];
    let listed: Vec<&str> = want.iter().map(|(name, ..)| *name).collect();
    for (where_, base) in [("through the mount", &dir), ("on the server after devmount sync", &server)] {
        if base == &server {
            timed("devmount sync", || e.sync(mnt))?;
        }
        for (name, data, mode) in &want {
            expect_file(&base.join(name), data, *mode).with_context(|| format!("{name} {where_}"))?;
        }
        // The kernel sends a file's release after close(2) has returned, so a temporary file
        // unlinked while its last descriptor was closing keeps its hidden name a moment longer.
        retry(&format!("temporary files to go {where_}"), Duration::from_secs(10), || {
            expect_names(base, &listed).with_context(|| format!("temporary files left {where_}"))
        })?;
    }
    Ok(())
}

#[test]
fn editor_save_patterns_against_devmount_server() -> Result<()> {
    on_devmount_server(check_save_patterns)
}

#[test]
fn editor_save_patterns_against_openssh() -> Result<()> {
    on_openssh(check_save_patterns)
}

/// Changes `ranges` of a file through a shared writable mapping, then msync.
const MMAP_WRITE: &str = r#"
import mmap, sys
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    m[100:110] = b"0123456789"
    m[len(m) - 5:] = b"TAIL!"
    m.flush()
    m.close()
"#;

/// Reads a file through a mapping and prints its sha256.
const MMAP_READ: &str = r#"
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    print(hashlib.sha256(m).hexdigest())
"#;

fn random_file(path: &Path, mib: usize) -> Result<()> {
    run_ok(command("dd").arg("if=/dev/urandom").arg(format!("of={}", path.display())).args([
        "bs=1M",
        &format!("count={mib}"),
        "status=none",
    ]))?;
    Ok(())
}

/// A GiB written in MiB writes, synced and read back; mmap reads and shared writable mappings
/// of a file made in the pod; parallel readers of one file.
fn check_big_file_and_mmap(e: &Endpoint, mnt: &Path) -> Result<()> {
    let big = mnt.join("big.bin");
    timed(&format!("write of {BIG_MIB} MiB onto the mount"), || -> Result<()> {
        let mut file = fs::File::create(&big).context("create big.bin on the mount")?;
        for i in 0..BIG_MIB {
            file.write_all(&big_block(i)).with_context(|| format!("write MiB {i} of big.bin"))?;
        }
        Ok(())
    })?;
    timed("devmount sync", || e.sync(mnt))?;
    check_big(fs::File::open(e.root.join("big.bin"))?, "the server's big.bin")?;
    timed(&format!("O_DIRECT read of {BIG_MIB} MiB through the mount"), || {
        let direct = fs::OpenOptions::new().read(true).custom_flags(OFlag::O_DIRECT.bits()).open(&big)?;
        check_big(direct, "big.bin read with O_DIRECT through the mount")
    })?;

    let source = e.scratch.join("mapped.src");
    random_file(&source, 4)?;
    fs::copy(&source, e.root.join("pod-mapped.bin"))?;
    check_mmap(e, mnt, &source, "pod-mapped.bin")?;

    // Four readers of one file made in the pod, bypassing the page cache so that each
    // request reaches the daemon.
    let shared = e.root.join("shared.bin");
    random_file(&shared, 32)?;
    let want = sha256(&shared)?;
    let readers = (0..4)
        .map(|_| {
            let script = r#"dd if="$1" iflag=direct bs=128K status=none | sha256sum"#;
            Proc::spawn(command("sh").arg("-c").arg(script).arg("sh").arg(mnt.join("shared.bin")))
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, mut reader) in readers.into_iter().enumerate() {
        let out = reader.wait(STEP)?;
        ensure!(out.success(), "reader {i}\n{out}");
        let got = out.stdout_text().split_whitespace().next().unwrap_or_default().to_owned();
        ensure!(got == want, "reader {i} read sha256 {got}, want {want}");
    }
    Ok(())
}

/// `name` on the mount, with the bytes of `source`, read through a mapping and then changed
/// through a shared writable one; after `devmount sync` the server has the change and every
/// other byte as it was.
fn check_mmap(e: &Endpoint, mnt: &Path, source: &Path, name: &str) -> Result<()> {
    let read = python(MMAP_READ, &[mnt.join(name).as_os_str()])?;
    ensure!(read.stdout_text().trim() == sha256(source)?, "mmap read of {name}\n{read}");
    python(MMAP_WRITE, &[mnt.join(name).as_os_str()])?;
    let mut expected = fs::read(source)?;
    expected[100..110].copy_from_slice(b"0123456789");
    let n = expected.len();
    expected[n - 5..].copy_from_slice(b"TAIL!");
    e.sync(mnt)?;
    let got = fs::read(e.root.join(name))?;
    ensure!(got.len() == n, "after the mmap write the server's {name} has {} bytes", got.len());
    if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        bail!("after the mmap write the server's {name} differs from byte {at}");
    }
    Ok(())
}

#[test]
fn big_file_mmap_and_parallel_readers_against_devmount_server() -> Result<()> {
    on_devmount_server(check_big_file_and_mmap)
}

/// Creates a file of 1 MiB of `A`, then overwrites its first 4 KiB with `B`: that write
/// overlaps the first, so it goes to the server only after the first is acknowledged.
const CREATE_THEN_OVERWRITE: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, b"A" * (1 << 20))
os.pwrite(fd, b"B" * 4096, 0)
os.close(fd)
"#;

/// Reads 4 KiB at `offset` with O_DIRECT: from the daemon, not the page cache.
fn read_direct(path: &Path, offset: u64) -> Result<Vec<u8>> {
    let out = run_ok(command("dd").arg(format!("if={}", path.display())).args([
        "iflag=direct",
        "bs=4096",
        &format!("skip={}", offset / 4096),
        "count=1",
        "status=none",
    ]))?;
    Ok(out.stdout)
}

/// A mount of `s` through `relay`.
fn mount_through(relay: &Relay, s: &Server, options: MountOptions) -> Result<DevMount> {
    s.mount(options.port(relay.port()).known_hosts(s.known_hosts_for(relay.port())?))
}

/// A pod's directory changed here (chmod) still lists the pod's names while the change is on
/// its way (a relay with a 300 ms round trip holds it), and one made here lists what was made
/// in it before the server has either.
#[test]
fn directories_list_while_their_changes_are_sent() -> Result<()> {
    let s = Server::start()?;
    fs::create_dir(s.root().join("pod"))?;
    for name in ["a", "b", "c"] {
        fs::write(s.root().join("pod").join(name), name)?;
    }
    let relay = Relay::start(s.port(), 300)?;
    let mount = mount_through(&relay, &s, MountOptions::new())?;
    let (pod, new) = (mount.path().join("pod"), mount.path().join("new"));
    fs::set_permissions(&pod, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    fs::create_dir(&new)?;
    fs::write(new.join("x"), "x")?;
    let listed = expect_names(&pod, &["a", "b", "c"]).and_then(|()| expect_names(&new, &["x"]));
    listed.with_context(|| mount.log())?;
    s.endpoint().sync(mount.path())?;
    ensure!(mode_of(&s.root().join("pod"))? == 0o700, "the server's pod/ did not get mode 700");
    ensure!(fs::read(s.root().join("new/x"))? == b"x", "the server's new/x is not what was written");
    mount.unmount()?;
    Ok(())
}

/// Reads of a new file while the server has part of it: the daemon lays the journal's pending
/// bytes over the server's (tenet 2 of docs/semantics.md). A slow link (a relay with a 300 ms
/// round trip) holds the second write back for a round trip after the first one is on the
/// server; reads through the mount meanwhile must show the first write's bytes.
#[test]
fn reading_a_file_while_it_is_sent() -> Result<()> {
    let s = Server::start()?;
    let relay = Relay::start(s.port(), 300)?;
    let mount = mount_through(&relay, &s, MountOptions::new())?;
    let (seen, on_server) = (mount.path().join("sent.bin"), s.root().join("sent.bin"));
    python(CREATE_THEN_OVERWRITE, &[seen.as_os_str()])?;
    let server_has =
        |offset: usize, byte: u8| fs::read(&on_server).is_ok_and(|d| d.get(offset) == Some(&byte));
    let deadline = Instant::now() + STEP;
    while !server_has(4096, b'A') {
        ensure!(Instant::now() < deadline, "the first write never reached the server");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The first write is on the server, the second not yet: read until the second is there too.
    let mut reads = 0;
    loop {
        let done = server_has(0, b'B');
        let (head, tail) = (read_direct(&seen, 0)?, read_direct(&seen, 4096)?);
        reads += 1;
        let show = |d: &[u8]| format!("{:?}...", String::from_utf8_lossy(&d[..d.len().min(8)]));
        ensure!(
            head == [b'B'; 4096] && tail == [b'A'; 4096],
            "read {reads} through the mount: bytes 0.. are {}, bytes 4096.. are {}; want BBBB..., AAAA...\n{}",
            show(&head),
            show(&tail),
            mount.log()
        );
        if done {
            break;
        }
        ensure!(Instant::now() < deadline, "the second write never reached the server");
    }
    println!("{reads} reads while the file was being sent");
    s.endpoint().sync(mount.path())?;
    mount.unmount()?;
    drop(relay);
    Ok(())
}

/// The bytes the server has sent through `relay` so far.
fn sent_to_client(relay: &mut Relay) -> Result<u64> {
    let status = relay.command("status")?;
    status
        .split_whitespace()
        .find_map(|field| field.strip_prefix("to-client="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no to-client= in the relay's status: {status}"))
}

/// A file read from start to end is fetched once: a read of bytes the read-ahead is bringing
/// waits for them rather than asking the server for them again.
#[test]
fn a_sequential_read_fetches_each_byte_once() -> Result<()> {
    const MIB: usize = 48;
    let s = Server::start()?;
    random_file(&s.root().join("big.bin"), MIB)?;
    // A round trip long enough for the reader to catch up with the bytes on their way.
    let mut relay = Relay::start(s.port(), 20)?;
    let mount = mount_through(&relay, &s, MountOptions::new())?;
    let before = sent_to_client(&mut relay)?;
    let (got, want) = (fs::read(mount.path().join("big.bin"))?, fs::read(s.root().join("big.bin"))?);
    ensure!(got == want, "big.bin read through the mount differs from the server's");
    let sent = sent_to_client(&mut relay)? - before;
    let size = (MIB << 20) as u64;
    println!("the server sent {sent} bytes for a {size}-byte file");
    ensure!(
        // Replies' framing and the file's stat cost well under a sixty-fourth.
        sent < size + size / 64,
        "the server sent {sent} bytes for one read of a {size}-byte file\n{}",
        mount.log()
    );
    mount.unmount()?;
    Ok(())
}

/// A file of a few MiB read here and there (git in its index and packs) is fetched whole on its
/// first read: later reads anywhere in it are answered without asking the server.
#[test]
fn a_file_read_here_and_there_is_fetched_whole_on_its_first_read() -> Result<()> {
    let s = Server::start()?;
    random_file(&s.root().join("pack"), 3)?;
    let want = fs::read(s.root().join("pack"))?;
    let mut relay = Relay::start(s.port(), 2)?;
    let mount = mount_through(&relay, &s, MountOptions::new())?;
    let file = fs::File::open(mount.path().join("pack"))?;
    let read_at = |offset: usize| -> Result<()> {
        let mut got = vec![0; 4096];
        file.read_exact_at(&mut got, offset as u64)?;
        ensure!(got == want[offset..offset + 4096], "4 KiB at {offset} differ from the server's");
        Ok(())
    };
    read_at(0)?;
    let after_first = sent_to_client(&mut relay)?;
    for offset in [want.len() - 4096, 1 << 20, (2 << 20) + 12345, 70_000] {
        read_at(offset)?;
    }
    let sent = sent_to_client(&mut relay)? - after_first;
    // A read the cache could not answer costs a kernel read's worth (128 KiB) or a whole 4 KiB
    // page at least, and the reply's framing.
    ensure!(sent < 4096, "reads after the first one had the server send {sent} bytes\n{}", mount.log());
    drop(file);
    mount.unmount()?;
    Ok(())
}

/// Appends `data` with a fresh O_APPEND descriptor.
fn append(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(data).with_context(|| format!("appending to {}", path.display()))
}

/// O_APPEND, O_EXCL, O_TRUNC, rename over a file, unlink and create again: each on names made
/// through the mount and on names the server already had.
fn check_posix_semantics(e: &Endpoint, mnt: &Path) -> Result<()> {
    let (root, dir, server) = (&e.root, mnt.join("posix"), e.root.join("posix"));
    fs::create_dir(&server)?;
    fs::write(server.join("pod-append"), b"pod\n")?;
    fs::write(server.join("pod-excl"), b"pod excl\n")?;
    fs::write(server.join("pod-trunc"), b"pod trunc\n")?;
    fs::write(server.join("pod-target"), b"pod target\n")?;
    e.sync(mnt)?;
    ensure!(names(&dir)?.len() == 4, "the mount does not show the pod's files: {:?}", names(&dir)?);

    // O_APPEND, twice each, on a new file and on the pod's.
    fs::write(dir.join("append"), b"base\n")?;
    for (name, first) in [("append", "base\n"), ("pod-append", "pod\n")] {
        append(&dir.join(name), b"one\n")?;
        append(&dir.join(name), b"two\n")?;
        let got = fs::read(dir.join(name))?;
        let want = format!("{first}one\ntwo\n");
        ensure!(got == want.as_bytes(), "{name} after two appends: {:?}", String::from_utf8_lossy(&got));
    }
    run_ok(command("sh").arg("-c").arg("echo three >> append").current_dir(&dir))?;

    // O_EXCL.
    for name in ["append", "pod-excl"] {
        let r = fs::OpenOptions::new().write(true).create_new(true).open(dir.join(name));
        ensure!(
            r.as_ref().is_err_and(|e| errno_of(e) == Some(Errno::EEXIST)),
            "O_EXCL create of the existing {name}: {r:?}"
        );
    }
    fs::OpenOptions::new().write(true).create_new(true).open(dir.join("excl"))?.write_all(b"exclusive\n")?;

    // O_TRUNC.
    fs::write(dir.join("trunc"), b"to be emptied\n")?;
    for name in ["trunc", "pod-trunc"] {
        drop(fs::OpenOptions::new().write(true).truncate(true).open(dir.join(name))?);
        let len = fs::metadata(dir.join(name))?.len();
        ensure!(len == 0, "{name} has {len} bytes after O_TRUNC");
    }

    // rename over an existing file: made here over made here, made here over the pod's.
    fs::write(dir.join("src"), b"renamed source\n")?;
    fs::write(dir.join("dst"), b"replaced destination\n")?;
    fs::rename(dir.join("src"), dir.join("dst"))?;
    fs::write(dir.join("src2"), b"over the pod's file\n")?;
    fs::rename(dir.join("src2"), dir.join("pod-target"))?;

    // unlink, then create the same name: before and after the server has the first one.
    fs::write(dir.join("again"), b"first life\n")?;
    fs::remove_file(dir.join("again"))?;
    fs::write(dir.join("again"), b"second life\n")?;
    fs::write(dir.join("again-synced"), b"first life\n")?;
    e.sync(mnt)?;
    ensure!(fs::read(server.join("again-synced"))? == b"first life\n");
    fs::remove_file(dir.join("again-synced"))?;
    fs::write(dir.join("again-synced"), b"second life\n")?;

    let want: [(&str, &[u8]); 9] = [
        ("append", b"base\none\ntwo\nthree\n"),
        ("pod-append", b"pod\none\ntwo\n"),
        ("pod-excl", b"pod excl\n"),
        ("excl", b"exclusive\n"),
        ("trunc", b""),
        ("pod-trunc", b""),
        ("dst", b"renamed source\n"),
        ("pod-target", b"over the pod's file\n"),
        ("again", b"second life\n"),
    ];
    let mut listed: Vec<&str> = want.iter().map(|(name, _)| *name).collect();
    listed.push("again-synced");
    for (where_, base) in [("through the mount", &dir), ("on the server after devmount sync", &server)] {
        if base == &server {
            e.sync(mnt)?;
        }
        for (name, data) in want.iter().chain([("again-synced", &b"second life\n"[..])].iter()) {
            let got = fs::read(base.join(name)).with_context(|| format!("{name} {where_}"))?;
            ensure!(
                got == *data,
                "{name} {where_}: {:?}, want {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(data)
            );
        }
        expect_names(base, &listed).with_context(|| where_.to_owned())?;
    }
    ensure!(root.join("posix").is_dir());
    Ok(())
}

#[test]
fn open_flags_and_name_operations_against_devmount_server() -> Result<()> {
    on_devmount_server(check_posix_semantics)
}

#[test]
fn open_flags_and_name_operations_against_openssh() -> Result<()> {
    on_openssh(check_posix_semantics)
}

/// An O_APPEND write goes to the end the server has, even while the kernel holds an older
/// size: here the file grew in the pod after the mount read it, and the kernel keeps its size
/// until its attribute timeout while the open revalidates (OpenSSH has no feed).
#[test]
fn an_append_lands_at_the_pods_end_against_openssh() -> Result<()> {
    on_openssh(|e, mnt| {
        let (local, server) = (mnt.join("log"), e.root.join("log"));
        fs::write(&server, b"pod\n")?;
        ensure!(fs::read(&local)? == b"pod\n");
        append(&server, b"pod again\n")?;
        append(&local, b"mount\n")?;
        e.sync(mnt)?;
        let got = fs::read(&server)?;
        ensure!(got == b"pod\npod again\nmount\n", "the server has {:?}", String::from_utf8_lossy(&got));
        Ok(())
    })
}

/// Pod changes whose replays (see fuse-client/src/echo.rs) are queued before, and again after,
/// the one of the file a test is about.
const QUEUED_REPLAYS: usize = 1000;

/// The echo thread replays the pod's changes behind the feed, so the creation of a file made in
/// the pod can be replayed after the mount appended to it and read it back. The replay must
/// not give the kernel the size the file was made with: the kernel would cut its cached page
/// to it, and the appended bytes would read as zeros (or not at all).
#[test]
fn appends_to_a_pods_file_survive_the_late_replay_of_its_creation() -> Result<()> {
    let s = Server::start()?;
    let e = s.endpoint();
    fs::create_dir(e.root.join("queued"))?;
    let mut mount = e.mount(MountOptions::new())?;
    check_late_replay(&e, &mut mount)
        .with_context(|| format!("{}\n--- server stderr ---\n{}", mount.log(), s.log()))?;
    mount.unmount()?;
    Ok(())
}

fn check_late_replay(e: &Endpoint, mount: &mut DevMount) -> Result<()> {
    let mnt = mount.path().to_owned();
    let watch = Proc::spawn(command("inotifywait").args(["-m", "--format", "%e %w%f"]).arg(&mnt))?;
    watch.wait_stderr("watches established", STEP, |err| {
        String::from_utf8_lossy(err).contains("Watches established")
    })?;
    let created = |name: &str| format!("CREATE {}", mnt.join(name).display());
    let replayed = |names: &[&str]| {
        let lines: Vec<String> = names.iter().map(|n| created(n)).collect();
        watch.wait_stdout(&lines.join(" or "), STEP, |out| {
            String::from_utf8_lossy(out).lines().any(|l| lines.iter().any(|want| l == want))
        })
    };
    // The feed is up, and the mount holds the listing the pod's file will be added to: the file
    // shows through the mount once the feed has applied its creation and queued its replay.
    fs::write(e.root.join("ready"), b"")?;
    replayed(&["ready"])?;
    names(&mnt)?;

    // Made while the daemon is stopped, the changes reach the feed at once when it goes on: the
    // file is written here long before its replay, and read again long before the replays
    // queued after it are done.
    {
        let frozen = Frozen(mount);
        frozen.0.signal(Signal::SIGSTOP)?;
        for i in 0..QUEUED_REPLAYS {
            fs::write(e.root.join(format!("queued/{i}")), b"")?;
        }
        fs::write(e.root.join("log"), b"pod\n")?;
        for i in QUEUED_REPLAYS..2 * QUEUED_REPLAYS {
            fs::write(e.root.join(format!("queued/{i}")), b"")?;
        }
        fs::write(e.root.join("end"), b"")?;
    }
    let log = mnt.join("log");
    retry("the pod's file to show", STEP, || Ok(fs::metadata(&log)?))?;
    // Open across the replay, as a reader following the file keeps it: the kernel keeps the
    // file's pages with it.
    let reader = fs::File::open(&log)?;
    append(&log, b"one\n")?;
    append(&log, b"two\n")?;
    let want = b"pod\none\ntwo\n";
    let read = || -> Result<Vec<u8>> {
        let mut got = vec![0; 64];
        let n = reader.read_at(&mut got, 0)?;
        got.truncate(n);
        Ok(got)
    };
    for (step, until) in [("the appends", None), ("the replay", Some("log")), ("the replays", Some("end"))] {
        // A replay the feed skipped (the file was written here before the feed applied its
        // creation) shows as none: the last one says all are done.
        if let Some(name) = until {
            replayed(&[name, "end"])?;
        }
        let got = read()?;
        ensure!(got == want, "after {step}: {:?}", String::from_utf8_lossy(&got));
    }
    Ok(())
}

/// Writes to and reads from a descriptor whose name was unlinked, as temporary files do.
const UNLINKED: &str = r#"
import os, sys
for name in sys.argv[1:]:
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"before unlink\n")
    if name.endswith("synced"):
        os.fsync(fd)
    os.unlink(name)
    os.write(fd, b"after unlink\n")
    got = os.pread(fd, 100, 0)
    if got != b"before unlink\nafter unlink\n":
        sys.exit("%s reads %r" % (name, got))
    os.close(fd)
"#;

/// An open file stays usable after its name is unlinked (POSIX); nothing of it is left on the
/// server.
fn check_open_unlinked(e: &Endpoint, mnt: &Path) -> Result<()> {
    let (a, b) = (mnt.join("unlinked"), mnt.join("unlinked-synced"));
    python(UNLINKED, &[a.as_os_str(), b.as_os_str()])?;
    // The kernel sends the release of the last descriptor after close(2) has returned; the
    // hidden name goes with it.
    retry("the hidden names to go", Duration::from_secs(10), || {
        e.sync(mnt)?;
        expect_names(&e.root, &[])
    })
}

#[test]
fn an_open_unlinked_file_stays_usable_against_devmount_server() -> Result<()> {
    on_devmount_server(check_open_unlinked)
}

#[test]
fn an_open_unlinked_file_stays_usable_against_openssh() -> Result<()> {
    on_openssh(check_open_unlinked)
}

/// rmdir: ENOTEMPTY for a directory with something in it, and success for empty ones, whether
/// made in the pod, through the mount and not yet on the server, or through the mount and
/// synced.
fn check_rmdir(e: &Endpoint, mnt: &Path) -> Result<()> {
    let (dir, server) = (mnt.join("rmdir"), e.root.join("rmdir"));
    fs::create_dir_all(server.join("pod-full/sub"))?;
    fs::write(server.join("pod-full/file"), b"x")?;
    fs::create_dir(server.join("pod-empty"))?;
    // The mount shows the pod's changes once sync returns (at once, if the mount has cached
    // nothing of them yet).
    e.sync(mnt)?;
    fs::create_dir(dir.join("full"))?;
    fs::write(dir.join("full/inside"), b"x")?;
    for name in ["full", "pod-full"] {
        let r = fs::remove_dir(dir.join(name));
        ensure!(
            r.as_ref().is_err_and(|e| errno_of(e) == Some(Errno::ENOTEMPTY)),
            "rmdir of the non-empty {name}: {r:?}"
        );
    }
    fs::create_dir(dir.join("empty"))?;
    fs::remove_dir(dir.join("empty")).context("rmdir of an empty directory made through the mount")?;
    fs::create_dir(dir.join("empty-synced"))?;
    e.sync(mnt)?;
    ensure!(server.join("empty-synced").is_dir(), "devmount sync did not make empty-synced on the server");
    for name in ["empty-synced", "pod-empty", "pod-full/sub"] {
        fs::remove_dir(dir.join(name)).with_context(|| format!("rmdir of the empty {name}"))?;
    }
    e.sync(mnt)?;
    for base in [&dir, &server] {
        expect_names(base, &["full", "pod-full"])?;
        expect_names(&base.join("pod-full"), &["file"])?;
        expect_names(&base.join("full"), &["inside"])?;
    }
    Ok(())
}

#[test]
fn rmdir_against_devmount_server() -> Result<()> {
    on_devmount_server(check_rmdir)
}

#[test]
fn rmdir_against_openssh() -> Result<()> {
    on_openssh(check_rmdir)
}

/// `find -printf` of path, type, mode, size and, with `times`, mtime (whole seconds) of every
/// entry below `dir`.
fn tree_listing(dir: &Path, times: bool) -> Result<BTreeSet<String>> {
    let format = if times { "%P %y %m %s %TY-%Tm-%Td %TT\\n" } else { "%P %y %m %s\\n" };
    let out = run_ok(command("find").arg(dir).args(["-mindepth", "1", "-printf", format]))?;
    // %TT has a fraction: keep whole seconds.
    Ok(out.stdout_text().lines().map(|l| l.split('.').next().unwrap_or(l).to_owned()).collect())
}

/// tar xf of many small files, then `devmount sync`: the server has the same tree (contents,
/// modes and, with `times`, the mtimes tar set).
fn check_untar(e: &Endpoint, mnt: &Path, times: bool) -> Result<()> {
    let src = e.scratch.join("tar-src");
    let tree = src.join("tree");
    for i in 0..TAR_FILES {
        let sub = tree.join(format!("d{:02}", i / 25));
        fs::create_dir_all(&sub)?;
        let path = sub.join(format!("f{i:03}"));
        fs::write(&path, format!("small file {i}\n").repeat(i % 40))?;
        let mode = match i % 10 {
            0 => 0o755,
            1 => 0o600,
            _ => 0o644,
        };
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    }
    // Fixed mtimes in the past, which tar restores.
    let touch = ["-type", "f", "-exec", "touch", "-d", "2021-06-01 12:34:56", "{}", "+"];
    run_ok(command("find").arg(&tree).args(touch))?;
    run_ok(command("touch").args(["-d", "2020-01-02 03:04:05"]).arg(tree.join("d00/f000")))?;
    let tarball = e.scratch.join("tree.tar");
    run_ok(command("tar").arg("cf").arg(&tarball).arg("-C").arg(&src).arg("tree"))?;

    timed(&format!("tar xf of {TAR_FILES} files onto the mount"), || {
        run_ok(command("tar").arg("xf").arg(&tarball).arg("-C").arg(mnt))
    })?;
    timed("devmount sync after tar xf", || e.sync(mnt))?;
    for (where_, dir) in [("the server", e.root.join("tree")), ("the mount", mnt.join("tree"))] {
        let diff = run(command("diff").arg("-r").arg(&tree).arg(&dir))?;
        ensure!(diff.success(), "diff -r of the source and {where_}\n{diff}");
        let (want, got) = (tree_listing(&tree, times)?, tree_listing(&dir, times)?);
        if got != want {
            let missing: Vec<_> = want.difference(&got).take(5).collect();
            let extra: Vec<_> = got.difference(&want).take(5).collect();
            bail!("`find -printf` on {where_} differs from the source\nwant: {missing:#?}\ngot: {extra:#?}");
        }
    }
    Ok(())
}

#[test]
fn untar_against_devmount_server() -> Result<()> {
    on_devmount_server(|e, mnt| check_untar(e, mnt, true))
}

#[test]
fn untar_against_openssh() -> Result<()> {
    on_openssh(|e, mnt| check_untar(e, mnt, false))
}

#[test]
fn untar_keeps_mtimes_against_openssh() -> Result<()> {
    on_openssh(|e, mnt| check_untar(e, mnt, true))
}

/// chmod, chown of the owner alone, chgrp, and the access and modification times (nanoseconds
/// with `ns`, else whole seconds) through the mount reach the server, on a file made in the pod
/// and on one made through the mount and not yet on the server.
fn check_set_attributes(e: &Endpoint, mnt: &Path, ns: bool) -> Result<()> {
    let (dir, server) = (mnt.join("attrs"), e.root.join("attrs"));
    fs::create_dir(&server)?;
    fs::write(server.join("pod-file"), b"pod")?;
    e.sync(mnt)?;
    fs::write(dir.join("new-file"), b"new")?;
    for name in ["pod-file", "new-file"] {
        let path = dir.join(name);
        run_ok(command("chmod").arg("751").arg(&path))?;
        run_ok(command("chown").arg("1234").arg(&path))?;
        run_ok(command("chgrp").arg("5678").arg(&path))?;
        run_ok(command("touch").args(["-a", "-d", "@1000000000.123456789"]).arg(&path))?;
        run_ok(command("touch").args(["-m", "-d", "@1500000000.987654321"]).arg(&path))?;
    }
    e.sync(mnt)?;
    let nsec = |n: i64| if ns { n } else { 0 };
    for (where_, base) in [("on the server", &server), ("through the mount", &dir)] {
        for name in ["pod-file", "new-file"] {
            let m = fs::metadata(base.join(name))?;
            let got = format!(
                "mode {:o}, uid {}, gid {}, atime {}.{:09}, mtime {}.{:09}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.atime(),
                m.atime_nsec(),
                m.mtime(),
                m.mtime_nsec()
            );
            let want = format!(
                "mode 751, uid 1234, gid 5678, atime 1000000000.{:09}, mtime 1500000000.{:09}",
                nsec(123_456_789),
                nsec(987_654_321)
            );
            ensure!(got == want, "{name} {where_}: {got}; want {want}");
        }
    }
    Ok(())
}

#[test]
fn set_attributes_against_devmount_server() -> Result<()> {
    on_devmount_server(|e, mnt| check_set_attributes(e, mnt, true))
}

#[test]
fn set_attributes_against_openssh() -> Result<()> {
    on_openssh(|e, mnt| check_set_attributes(e, mnt, false))
}

/// Writes and fsyncs one file, then says so.
const WRITE_FSYNC: &str = r#"
import os, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
f = open(path, "w")
f.write(sys.argv[2])
f.flush()
os.fsync(f.fileno())
print("synced", flush=True)
"#;

/// Once fsync returns, the server has the file: new, in a new directory, rewritten shorter.
fn check_fsync(e: &Endpoint, mnt: &Path) -> Result<()> {
    fs::write(e.root.join("pod-file"), b"the pod's longer original contents\n")?;
    e.sync(mnt)?;
    for (name, data) in [
        ("new-file", "fsynced contents\n"),
        ("new-dir/deeper/file", "fsynced in a new directory\n"),
        ("pod-file", "shorter\n"),
    ] {
        python(WRITE_FSYNC, &[mnt.join(name).as_os_str(), data.as_ref()])?;
        let got =
            fs::read(e.root.join(name)).with_context(|| format!("{name} on the server right after fsync"))?;
        ensure!(
            got == data.as_bytes(),
            "{name} on the server right after fsync: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    Ok(())
}

#[test]
fn fsync_reaches_the_server_against_devmount_server() -> Result<()> {
    on_devmount_server(check_fsync)
}

#[test]
fn fsync_reaches_the_server_against_openssh() -> Result<()> {
    on_openssh(check_fsync)
}

/// Creates `out/f00000`, `out/f00001`... until stopped, printing each number once its write has
/// returned.
const WRITER: &str = r#"
import os, sys
d = sys.argv[1]
for i in range(100000):
    data = ((b"%d:" % i) * (8192 + i))[: 8192 + i]
    fd = os.open(os.path.join(d, "f%05d" % i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    if os.write(fd, data) != len(data):
        sys.exit("short write")
    print(i, flush=True)
    os.close(fd)
"#;

fn writer_content(i: usize) -> Vec<u8> {
    let size = 8192 + i;
    format!("{i}:").into_bytes().into_iter().cycle().take(size).collect()
}

/// Opens an existing file and overwrites its start, then says so.
const OVERWRITE: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.write(fd, sys.argv[2].encode())
print("written", flush=True)
"#;

/// A process a test stops (SIGSTOP) and continues.
trait Freezable {
    fn signal(&mut self, signal: Signal) -> Result<()>;
}

impl Freezable for Server {
    fn signal(&mut self, signal: Signal) -> Result<()> {
        Server::signal(self, signal)
    }
}

impl Freezable for DevMount {
    fn signal(&mut self, signal: Signal) -> Result<()> {
        DevMount::signal(self, signal)
    }
}

/// Thaws the server or the daemon when dropped, so a failing test does not leave it stopped.
struct Frozen<'a, T: Freezable>(&'a mut T);

impl<T: Freezable> Drop for Frozen<'_, T> {
    fn drop(&mut self) {
        // Nothing to report if it fails: the process has exited, and the test says why.
        let _ = self.0.signal(Signal::SIGCONT);
    }
}

/// kill -9 of the client while it writes many files: after a remount of the same target
/// (which says it replays the pending changes) and `devmount sync`, every file whose write
/// returned is on the server, whole. The server is frozen (SIGSTOP) before the kill, so some
/// changes are certainly still pending: a write to a file the mount has looked up completes
/// without the server.
#[test]
fn kill_9_while_writing_loses_no_returned_write() -> Result<()> {
    let mut s = Server::start()?;
    let e = s.endpoint();
    fs::create_dir(s.root().join("out"))?;
    fs::write(s.root().join("held"), b"the pod's contents\n")?;
    let mut mount = e.mount(MountOptions::new().foreground())?;
    let mnt = mount.path().to_owned();
    // Looked up and its attributes cached, so writing it needs no round trip.
    ensure!(fs::read(mnt.join("held"))? == b"the pod's contents\n");

    let mut writer = Proc::spawn(command("python3").arg("-c").arg(WRITER).arg(mnt.join("out")))?;
    writer.close_stdin();
    let returned = |out: &[u8]| out.iter().filter(|&&b| b == b'\n').count();
    writer.wait_stdout("100 files written", STEP, |out| returned(out) >= 100).with_context(|| mount.log())?;

    let frozen = Frozen(&mut s);
    frozen.0.signal(Signal::SIGSTOP)?;
    let mut overwrite =
        Proc::spawn(command("python3").arg("-c").arg(OVERWRITE).arg(mnt.join("held")).arg("NEW"))?;
    overwrite.close_stdin();
    let written =
        overwrite.wait_stdout("the write to held", Duration::from_secs(10), |out| out == b"written\n");
    mount.signal(Signal::SIGKILL)?;
    mount.wait_exit(Duration::from_secs(10))?;
    let overwrite = overwrite.wait(STEP)?;
    written.with_context(|| {
        format!("with the server stopped, a write to a file already looked up did not return\n{overwrite}")
    })?;
    let writer = writer.wait(STEP)?;
    ensure!(!writer.success(), "the writer finished before the kill\n{writer}");
    drop(frozen);

    let done: Vec<usize> = writer.stdout_text().lines().map(|l| l.parse()).collect::<Result<_, _>>()?;
    println!("{} writes returned before the kill", done.len());
    run_ok(command("fusermount3").arg("-u").arg(&mnt))?;
    drop(mount);

    let mount = e.mount(MountOptions::new().foreground())?;
    let log = mount.log();
    let pending = log
        .split("replaying ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    println!("the remount says: {}", log.lines().find(|l| l.contains("replaying")).unwrap_or("nothing"));
    ensure!(pending.is_some_and(|n| n >= 1), "the remount did not say it replays pending changes\n{log}");
    timed("devmount sync after the replay", || e.sync(&mnt))?;

    ensure!(
        fs::read(s.root().join("held"))? == b"NEW pod's contents\n",
        "held on the server: {:?}",
        fs::read(s.root().join("held"))
    );
    let mut lost = Vec::new();
    for &i in &done {
        let path = s.root().join(format!("out/f{i:05}"));
        match fs::read(&path) {
            Ok(data) if data == writer_content(i) => {}
            Ok(data) => lost.push(format!("f{i:05}: {} bytes, want {}", data.len(), 8192 + i)),
            Err(e) => lost.push(format!("f{i:05}: {e}")),
        }
    }
    ensure!(
        lost.is_empty(),
        "{} of {} returned writes are not on the server: {lost:?}\n{}",
        lost.len(),
        done.len(),
        mount.log()
    );
    for &i in done.iter().step_by(17) {
        let got = fs::read(mnt.join(format!("out/f{i:05}")))?;
        ensure!(got == writer_content(i), "f{i:05} through the new mount has {} bytes", got.len());
    }
    mount.unmount()?;
    Ok(())
}

/// The connection drops (the relay resets it) while a program writes many files, twice: the
/// writes go on returning, the client reconnects by itself, and after `devmount sync` every
/// file is on the server. A read the cache cannot answer waits while the server is
/// unreachable and is answered once it is back; the change feed works again afterwards.
#[test]
fn a_dropped_connection_loses_nothing() -> Result<()> {
    let s = Server::start()?;
    let e = s.endpoint();
    fs::create_dir(s.root().join("out"))?;
    fs::write(s.root().join("unread"), b"read only after the outage\n")?;
    let mut relay = Relay::start(s.port(), 2)?;
    let mount = mount_through(&relay, &s, MountOptions::new())?;
    let mnt = mount.path().to_owned();

    let mut writer = Proc::spawn(command("python3").arg("-c").arg(WRITER).arg(mnt.join("out")))?;
    writer.close_stdin();
    let returned = |out: &[u8]| out.iter().filter(|&&b| b == b'\n').count();
    let reconnected = |n: usize| {
        retry(&format!("reconnect {n}"), STEP, || {
            let log = mount.log();
            ensure!(log.matches("reconnected").count() >= n, "{log}");
            Ok(())
        })
    };
    for (i, n) in [100, 300].into_iter().enumerate() {
        writer.wait_stdout("files written", STEP, |out| returned(out) >= n).with_context(|| mount.log())?;
        relay.command("cut")?;
        reconnected(i + 1)?;
    }
    writer
        .wait_stdout("more files written", STEP, |out| returned(out) >= 500)
        .with_context(|| mount.log())?;
    writer.signal(Signal::SIGTERM)?;
    let writer = writer.wait(STEP)?;
    let done: Vec<usize> = writer.stdout_text().lines().map(|l| l.parse()).collect::<Result<_, _>>()?;

    // Unreachable: the connection is reset and new ones are refused.
    relay.command("block")?;
    relay.command("cut")?;
    let mut reader = Proc::spawn(command("cat").arg(mnt.join("unread")))?;
    reader.close_stdin();
    std::thread::sleep(Duration::from_millis(500));
    ensure!(reader.try_wait()?.is_none(), "a read needing the server did not wait for it");
    relay.command("unblock")?;
    let read = reader.wait(STEP)?;
    ensure!(read.success() && read.stdout == b"read only after the outage\n", "{read}\n{}", mount.log());

    timed("devmount sync after the reconnects", || e.sync(&mnt)).with_context(|| mount.log())?;
    let mut lost = Vec::new();
    for &i in &done {
        match fs::read(s.root().join(format!("out/f{i:05}"))) {
            Ok(data) if data == writer_content(i) => {}
            Ok(data) => lost.push(format!("f{i:05}: {} bytes, want {}", data.len(), 8192 + i)),
            Err(e) => lost.push(format!("f{i:05}: {e}")),
        }
    }
    ensure!(
        lost.is_empty(),
        "{} of {} files not on the server: {lost:?}\n{}",
        lost.len(),
        done.len(),
        mount.log()
    );
    reconnected(3)?;

    fs::write(s.root().join("after"), b"made in the pod\n")?;
    retry("a pod change after the reconnects", Duration::from_secs(10), || {
        ensure!(fs::read(mnt.join("after"))? == b"made in the pod\n");
        Ok(())
    })?;
    mount.unmount()?;
    Ok(())
}

/// The SFTP session ends under an SSH connection that lives on (the server's sftp-server
/// dies): the mount connects again, and what was written before and after is on the server.
#[test]
fn an_ended_sftp_session_is_replaced() -> Result<()> {
    let sshd = Sshd::start()?;
    let e = sshd.endpoint();
    let mount = e.mount(MountOptions::new())?;
    let mnt = mount.path().to_owned();
    fs::write(mnt.join("before"), b"written before\n")?;
    e.sync(&mnt).with_context(|| mount.log())?;
    let servers = sshd.sftp_servers();
    if servers.is_empty() {
        println!("skipped: this sshd runs internal-sftp, whose session cannot end alone");
        return Ok(());
    }
    for pid in servers {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    // In a child with a deadline: without a new session the write would wait for ever.
    let wrote =
        run_with(command("tee").arg(mnt.join("after")), b"written after\n", Duration::from_secs(120))?;
    ensure!(wrote.success(), "{wrote}\n{}", mount.log());
    timed("devmount sync after the SFTP session ended", || e.sync(&mnt)).with_context(|| mount.log())?;
    for (name, want) in [("before", "written before\n"), ("after", "written after\n")] {
        let got = fs::read(sshd.root().join(name)).with_context(|| format!("{name}\n{}", mount.log()))?;
        ensure!(got == want.as_bytes(), "{name}: {:?}\n{}", String::from_utf8_lossy(&got), mount.log());
    }
    ensure!(mount.log().contains("reconnected"), "no reconnect logged:\n{}", mount.log());
    mount.unmount()?;
    Ok(())
}

/// A file changed in the pod while a change made here is still queued (the relay holds the
/// connection): the mount's version takes the name, the pod's is kept as a conflict copy
/// beside it, for an in-place rewrite and for an editor's rename over the file.
#[test]
fn a_conflict_keeps_both_versions() -> Result<()> {
    let s = Server::start()?;
    let e = s.endpoint();
    for name in ["rewritten", "renamed-over"] {
        fs::write(s.root().join(name), b"the original\n")?;
    }
    let mut relay = Relay::start(s.port(), 2)?;
    let mount = mount_through(&relay, &s, MountOptions::new())?;
    let mnt = mount.path().to_owned();
    for name in ["rewritten", "renamed-over"] {
        ensure!(fs::read(mnt.join(name))? == b"the original\n");
    }
    // Listed, so the new temp file's name is known to be free without asking the server.
    names(&mnt)?;

    relay.command("block")?;
    fs::write(mnt.join("rewritten"), b"made here\n")?;
    fs::write(mnt.join("renamed-over.tmp"), b"saved here\n")?;
    fs::rename(mnt.join("renamed-over.tmp"), mnt.join("renamed-over"))?;
    for name in ["rewritten", "renamed-over"] {
        fs::write(s.root().join(name), b"changed in the pod\n")?;
    }
    relay.command("unblock")?;
    e.sync(&mnt).with_context(|| mount.log())?;

    ensure!(fs::read(s.root().join("rewritten"))? == b"made here\n");
    ensure!(fs::read(s.root().join("renamed-over"))? == b"saved here\n");
    let names = names(s.root())?;
    for name in ["rewritten", "renamed-over"] {
        let copies: Vec<&String> =
            names.iter().filter(|n| n.starts_with(&format!("{name}.conflict-"))).collect();
        ensure!(copies.len() == 1, "conflict copies of {name}: {copies:?} in {names:?}\n{}", mount.log());
        ensure!(fs::read(s.root().join(copies[0]))? == b"changed in the pod\n", "{name}'s conflict copy");
    }
    ensure!(
        mount.log().matches("changed in the pod while").count() == 2,
        "two conflicts reported\n{}",
        mount.log()
    );
    mount.unmount()?;
    Ok(())
}
