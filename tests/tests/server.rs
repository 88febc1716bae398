//! The server process itself: its ready lines, host key handling, user names, shutdown.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use devmount_tests::{
    command, mode_of, run, run_ok, server_bin, wait_ready, Options, Proc, Server, HOST_KEY_ENV,
};
use nix::sys::signal::Signal;

/// The fingerprint of a key file as `ssh-keygen -l` prints it.
fn keygen_fingerprint(key: &std::path::Path) -> Result<String> {
    let out = run_ok(command("ssh-keygen").arg("-l").arg("-f").arg(key))?;
    let text = out.stdout_text();
    text.split_whitespace().nth(1).map(str::to_string).with_context(|| format!("no fingerprint in {text:?}"))
}

#[test]
fn generated_host_key_is_private_and_its_fingerprint_printed() -> Result<()> {
    let s = Server::start()?;
    ensure!(mode_of(s.host_key())? == 0o600, "host key mode is {:o}", mode_of(s.host_key())?);
    ensure!(s.fingerprint().starts_with("SHA256:"), "fingerprint {:?}", s.fingerprint());
    ensure!(keygen_fingerprint(s.host_key())? == s.fingerprint());
    // The pinned key is the one the server presents.
    let out = run(&mut s.ssh(&[], "true"))?;
    ensure!(out.success(), "{}", s.report(&out));
    Ok(())
}

#[test]
fn existing_host_key_file_is_reused() -> Result<()> {
    let s = Server::start()?;
    let mut cmd = command(server_bin()?);
    cmd.arg("--root").arg(s.root()).args(["--listen", "127.0.0.1:0", "--host-key"]).arg(s.host_key());
    cmd.arg("--authorized-keys").arg(s.keys().join("authorized_keys"));
    let mut second = Proc::spawn(&mut cmd)?;
    let (port, fingerprint) = wait_ready(&second)?;
    ensure!(port != s.port());
    ensure!(fingerprint == s.fingerprint(), "the second server made a new key: {fingerprint}");
    second.signal(Signal::SIGTERM)?;
    second.wait(Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn host_key_from_the_environment_is_hidden_from_commands() -> Result<()> {
    let s = Server::start_with(Options::new().host_key_in_env())?;
    ensure!(keygen_fingerprint(s.host_key())? == s.fingerprint());
    let out = run(&mut s.ssh(&[], "env"))?;
    ensure!(out.success(), "{}", s.report(&out));
    let env = out.stdout_text();
    ensure!(!env.contains(HOST_KEY_ENV) && !env.contains("PRIVATE KEY"), "the host key leaked:\n{env}");
    Ok(())
}

#[test]
fn user_name_is_ignored() -> Result<()> {
    let s = Server::start()?;
    for user in ["root", "nobody-at-all"] {
        let out = run(&mut s.ssh(&["-l", user], "id -u"))?;
        ensure!(out.success(), "{}", s.report(&out));
        let uid = nix::unistd::getuid().to_string();
        ensure!(out.stdout_text().trim() == uid, "runs as uid {}, not {uid}", out.stdout_text().trim());
    }
    Ok(())
}

#[test]
fn sigterm_ends_the_server_with_a_session_open() -> Result<()> {
    let mut s = Server::start()?;
    let mut ssh = Proc::spawn(&mut s.ssh(&[], "echo ready; sleep 60"))?;
    ssh.wait_stdout("`ready`", Duration::from_secs(30), |out| out.starts_with(b"ready"))?;
    s.stop(Signal::SIGTERM, Duration::from_secs(10))?;
    ssh.wait(Duration::from_secs(10))?;
    Ok(())
}
