//! What devmount-server must refuse: unknown keys, passwords, paths outside the root, a host key
//! others can read, malformed SFTP packets (which must not disturb other sessions).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::time::Duration;

use anyhow::{ensure, Result};
use devmount_server::proto::sftp::MAX_PACKET;
use devmount_tests::{command, keygen, run, run_with, server_bin, Proc, Server, TIMEOUT};

#[test]
fn unknown_key_is_refused() -> Result<()> {
    let s = Server::start()?;
    let stranger = s.keys().join("stranger");
    keygen(&stranger)?;
    let mut cmd = command("ssh");
    cmd.args(s.client_options_with_key(&stranger)).arg(s.destination()).arg("echo in");
    let out = run(&mut cmd)?;
    ensure!(out.code() == Some(255) && out.stdout.is_empty(), "{}", s.report(&out));
    ensure!(out.stderr_text().contains("Permission denied (publickey)"), "{}", s.report(&out));
    Ok(())
}

#[test]
fn password_and_keyboard_interactive_are_refused() -> Result<()> {
    let s = Server::start()?;
    // A password is at hand (askpass, no batch mode), so ssh would send it if the server
    // offered the method; the server offers publickey only.
    let askpass = s.keys().join("askpass");
    fs::write(&askpass, "#!/bin/sh\necho hunter2\n")?;
    fs::set_permissions(&askpass, fs::Permissions::from_mode(0o700))?;
    let mut cmd = s.ssh(
        &[
            "-v",
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "NumberOfPasswordPrompts=1",
        ],
        "echo in",
    );
    cmd.env("SSH_ASKPASS", &askpass).env("SSH_ASKPASS_REQUIRE", "force");
    let out = run(&mut cmd)?;
    ensure!(out.code() == Some(255) && out.stdout.is_empty(), "{}", s.report(&out));
    let log = out.stderr_text();
    // ssh ends its log lines with CRLF.
    let offered = log.lines().any(|l| l.trim_end() == "debug1: Authentications that can continue: publickey");
    ensure!(offered, "the server offered more than publickey\n{}", s.report(&out));
    ensure!(log.contains("Permission denied (publickey)"), "{}", s.report(&out));
    Ok(())
}

/// Runs each one-command sftp script; every one must fail, and `leak` must not appear locally.
/// Scripts may upload the local file `payload`.
fn each_fails(s: &Server, scripts: &[&str]) -> Result<()> {
    fs::write(s.local().join("payload"), b"planted\n")?;
    for script in scripts {
        let out = s.sftp_batch(format!("{script}\n").as_bytes())?;
        ensure!(!out.success(), "`{script}` should fail\n{}", s.report(&out));
        ensure!(!s.local().join("leak").exists(), "`{script}` fetched a file\n{}", s.report(&out));
    }
    Ok(())
}

#[test]
fn absolute_paths_outside_the_root_are_refused() -> Result<()> {
    let s = Server::start()?;
    let keys = s.keys().display().to_string();
    each_fails(
        &s,
        &[
            "get /etc/passwd leak",
            "ls /etc",
            "cd /",
            &format!("get {keys}/client leak"),
            &format!("put payload {keys}/planted"),
            "mkdir /tmp/devmount-escape",
        ],
    )?;
    ensure!(!s.keys().join("planted").exists() && !std::path::Path::new("/tmp/devmount-escape").exists());
    Ok(())
}

#[test]
fn dot_dot_never_climbs_above_the_root() -> Result<()> {
    let s = Server::start()?;
    each_fails(&s, &["get ../keys/client leak", "get ../../../../etc/passwd leak"])?;

    // Either refused, or `..` at the root is the root: never above it.
    let out = s.sftp_batch(b"-put payload ../planted\n-cd ../../..\npwd\n")?;
    ensure!(out.success(), "{}", s.report(&out));
    ensure!(!s.base().join("planted").exists(), "`put payload ../planted` wrote above the root");
    let wanted = format!("Remote working directory: {}\n", s.root().display());
    ensure!(out.stdout_text().contains(&wanted), "{}", s.report(&out));
    Ok(())
}

#[test]
fn symlinks_leading_out_of_the_root_are_refused() -> Result<()> {
    let s = Server::start()?;
    let root = s.root();
    symlink("/etc", root.join("etc-link"))?;
    symlink("/etc/passwd", root.join("passwd-link"))?;
    symlink("..", root.join("up"))?;
    fs::create_dir(root.join("sub"))?;
    symlink("../../keys", root.join("sub/keys-link"))?;
    each_fails(
        &s,
        &[
            "get etc-link/passwd leak",
            "get passwd-link leak",
            "get up/keys/client leak",
            "get sub/keys-link/client leak",
            "cd etc-link",
            "cd up",
            "put payload up/planted",
        ],
    )?;
    ensure!(!s.base().join("planted").exists());

    // sftp's `ls` prints the pattern itself when nothing matches, so look for leaked names.
    let out = s.sftp_batch(b"-ls -1 etc-link/\n-ls -1 up/\n-ls -1 sub/keys-link/\n")?;
    let listing = out.stdout_text();
    for leaked in ["passwd", "hostname", "authorized_keys", "known_hosts", "local"] {
        ensure!(!listing.contains(leaked), "a listing shows {leaked}\n{}", s.report(&out));
    }
    Ok(())
}

#[test]
fn host_key_readable_by_others_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (root, host_key, client) =
        (dir.path().join("root"), dir.path().join("host_key"), dir.path().join("client"));
    fs::create_dir(&root)?;
    keygen(&host_key)?;
    keygen(&client)?;
    fs::set_permissions(&host_key, fs::Permissions::from_mode(0o644))?;
    let mut cmd = command(server_bin()?);
    cmd.arg("--root").arg(&root).args(["--listen", "127.0.0.1:0", "--host-key"]).arg(&host_key);
    cmd.arg("--authorized-keys").arg(client.with_extension("pub"));
    let out = run_with(&mut cmd, &[], Duration::from_secs(20))?;
    ensure!(!out.success() && !out.stdout_text().contains("listening on"), "{out}");
    let err = out.stderr_text();
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(lines.len() == 1, "expected a one-line error\n{out}");
    ensure!(lines[0].contains(&host_key.display().to_string()), "the error does not name the file\n{out}");
    ensure!(lines[0].contains("chmod 600"), "the error does not give the fix\n{out}");
    Ok(())
}

#[test]
fn malformed_sftp_packets_close_only_their_channel() -> Result<()> {
    let mut s = Server::start()?;
    fs::write(s.local().join("probe.txt"), b"still here\n")?;
    // A session that stays open across the abuse, fed one command at a time.
    let mut good = Proc::spawn(&mut s.sftp(&["-b", "-"]))?;
    good.write(b"pwd\n")?;
    good.wait_stdout("pwd", TIMEOUT, |out| {
        String::from_utf8_lossy(out).contains("Remote working directory")
    })?;

    let mut over_cap = u32::try_from(MAX_PACKET + 1)?.to_be_bytes().to_vec();
    over_cap.extend_from_slice(b"\x01\x00\x00\x00\x03");
    let hostile: [(&str, &[u8], bool); 4] = [
        ("length 0xffffffff", b"\xff\xff\xff\xffgarbage", false),
        ("length over the packet cap", &over_cap, false),
        ("INIT without its version", b"\x00\x00\x00\x01\x01", false),
        // The peer announces 100 bytes and hangs up after 3: seen only at end of input.
        ("truncated packet", b"\x00\x00\x00\x64\x01\x00\x00", true),
    ];
    for &(what, bytes, then_eof) in &hostile {
        let mut bad = Proc::spawn(&mut s.ssh(&["-s"], "sftp"))?;
        bad.write(bytes)?;
        if then_eof {
            bad.close_stdin();
        }
        // The server must end the channel by itself: our stdin stays open otherwise.
        let out = bad.wait(Duration::from_secs(20)).map_err(|e| e.context(format!("{what}\n{}", s.log())))?;
        ensure!(out.stdout.len() < 1024, "{what}: unexpected reply\n{}", s.report(&out));
        s.check_alive()?;

        good.write(format!("put probe.txt after-{}.txt\n", what.replace(' ', "-")).as_bytes())?;
    }
    good.write(b"ls -1\n")?;
    good.close_stdin();
    let out = good.wait(TIMEOUT)?;
    ensure!(out.success(), "the concurrent session broke\n{}", s.report(&out));
    for (what, _, _) in &hostile {
        let name = format!("after-{}.txt", what.replace(' ', "-"));
        ensure!(fs::read(s.root().join(&name))? == b"still here\n", "{name} missing\n{}", s.report(&out));
    }
    let fresh = s.sftp_batch(b"ls\n")?;
    ensure!(fresh.success(), "a new session failed after the abuse\n{}", s.report(&fresh));
    Ok(())
}
