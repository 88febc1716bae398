//! OpenSSH's `sftp` against devmount-server: batch scripts, checked in the root directory.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};

use anyhow::{ensure, Result};
use devmount_tests::{mode_of, write_file_mode, Server};

/// Bytes that differ everywhere, so a reordered or dropped chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn batch_script_operations_land_in_the_root() -> Result<()> {
    let s = Server::start()?;
    let (root, local) = (s.root(), s.local());
    let big = pattern(3 * 1024 * 1024 + 17);
    write_file_mode(&local.join("one.txt"), b"first\n", 0o644)?;
    write_file_mode(&local.join("big.bin"), &big, 0o644)?;
    // A mode that a server-side umask of 022 would change.
    write_file_mode(&local.join("wide.txt"), b"wide\n", 0o666)?;

    let out = s.sftp_batch(
        b"put one.txt a.txt
put big.bin big.bin
put wide.txt wide.txt
get big.bin big.back
mkdir dir
mkdir dir/sub
put one.txt dir/b.txt
rename big.bin dir/b.txt
ln -s dir/b.txt link
ln dir/b.txt hard
get link via-link.back
chmod 600 dir/b.txt
rmdir dir/sub
rm a.txt
ls -l
df
",
    )?;
    ensure!(out.success(), "{}", s.report(&out));

    ensure!(fs::read(local.join("big.back"))? == big, "get returned different bytes");
    ensure!(
        fs::read(local.join("via-link.back"))? == big,
        "get through the symlink returned different bytes"
    );
    ensure!(fs::read(root.join("dir/b.txt"))? == big, "rename did not replace dir/b.txt");
    ensure!(!root.join("big.bin").exists(), "rename left its source behind");
    ensure!(!root.join("a.txt").exists(), "rm left a.txt");
    ensure!(!root.join("dir/sub").exists(), "rmdir left dir/sub");
    ensure!(
        fs::read_link(root.join("link"))? == OsStr::new("dir/b.txt"),
        "symlink target is not stored as given"
    );
    ensure!(
        fs::metadata(root.join("hard"))?.ino() == fs::metadata(root.join("dir/b.txt"))?.ino(),
        "`ln` did not make a hard link"
    );
    ensure!(
        mode_of(&root.join("dir/b.txt"))? == 0o600,
        "chmod 600 gave {:o}",
        mode_of(&root.join("dir/b.txt"))?
    );
    ensure!(
        mode_of(&root.join("wide.txt"))? == 0o666,
        "put of a 0666 file gave {:o}",
        mode_of(&root.join("wide.txt"))?
    );

    let listing = out.stdout_text();
    for name in ["link", "hard", "dir", "wide.txt"] {
        ensure!(listing.contains(name), "`ls -l` does not show {name}:\n{listing}");
    }
    ensure!(listing.contains("Avail"), "`df` printed no statvfs table:\n{listing}");
    Ok(())
}

#[test]
fn initial_directory_is_the_root() -> Result<()> {
    let s = Server::start()?;
    fs::create_dir(s.root().join("sub"))?;
    let out = s.sftp_batch(b"pwd\ncd sub\npwd\n")?;
    ensure!(out.success(), "{}", s.report(&out));
    let text = out.stdout_text();
    let root = s.root().display();
    ensure!(text.contains(&format!("Remote working directory: {root}\n")), "{}", s.report(&out));
    ensure!(text.contains(&format!("Remote working directory: {root}/sub\n")), "{}", s.report(&out));
    Ok(())
}

#[test]
fn absolute_paths_under_the_root_work() -> Result<()> {
    let s = Server::start()?;
    fs::write(s.root().join("here.txt"), b"absolute\n")?;
    let root = s.root().display();
    let out =
        s.sftp_batch(format!("get {root}/here.txt got.txt\nput got.txt {root}/again.txt\n").as_bytes())?;
    ensure!(out.success(), "{}", s.report(&out));
    ensure!(fs::read(s.root().join("again.txt"))? == b"absolute\n", "{}", s.report(&out));
    Ok(())
}

#[test]
fn name_with_byte_0xff_round_trips() -> Result<()> {
    let s = Server::start()?;
    let name = OsStr::from_bytes(b"caf\xe9-\xff.txt");
    fs::write(s.local().join(name), b"latin-1 and 0xff\n")?;
    let mut script = b"put ".to_vec();
    script.extend_from_slice(name.as_bytes());
    script.extend_from_slice(b"\nls -1\nget ");
    script.extend_from_slice(name.as_bytes());
    script.extend_from_slice(b" back.txt\n");
    let out = s.sftp_batch(&script)?;
    ensure!(out.success(), "{}", s.report(&out));

    let names: Vec<_> =
        fs::read_dir(s.root())?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    ensure!(names == [name.to_os_string()], "root holds {names:?}, expected exactly {name:?}");
    ensure!(fs::read(s.local().join("back.txt"))? == b"latin-1 and 0xff\n", "{}", s.report(&out));
    // sftp escapes unprintable bytes in listings, octal as strvis(3) does.
    ensure!(
        out.stdout_text().contains("caf\\351-\\377.txt"),
        "`ls -1` did not list the name\n{}",
        s.report(&out)
    );
    Ok(())
}

#[test]
fn symlinks_that_stay_inside_the_root_are_followed() -> Result<()> {
    let s = Server::start()?;
    let root = s.root();
    fs::create_dir(root.join("sub"))?;
    fs::write(root.join("sub/file.txt"), b"inside\n")?;
    symlink(root.join("sub/file.txt"), root.join("absolute-link"))?;
    symlink("sub/file.txt", root.join("relative-link"))?;
    symlink("sub", root.join("dir-link"))?;
    symlink("../sub/file.txt", root.join("sub/dotdot-link"))?;

    let out = s.sftp_batch(
        b"get absolute-link a.txt
get relative-link b.txt
get dir-link/file.txt c.txt
get sub/dotdot-link d.txt
",
    )?;
    ensure!(out.success(), "{}", s.report(&out));
    for copy in ["a.txt", "b.txt", "c.txt", "d.txt"] {
        ensure!(fs::read(s.local().join(copy))? == b"inside\n", "{copy} differs\n{}", s.report(&out));
    }
    // Followed, not replaced: the links are still links with the stored targets.
    ensure!(fs::read_link(root.join("absolute-link"))? == root.join("sub/file.txt"));
    Ok(())
}
