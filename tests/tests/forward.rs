//! Port forwarding with OpenSSH's `ssh -W`, `-L` and `-R` through devmount-server: allowed ports
//! carry traffic both ways, other ports are refused and never connected to.

use std::net::TcpStream;
use std::time::Duration;

use anyhow::{ensure, Result};
use devmount_tests::{
    echo_roundtrip, free_port, retry, roundtrip, run_with, EchoServer, Options, Proc, Server, HOST,
};

const WAIT: Duration = Duration::from_secs(20);

fn message(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn stdio_forward_to_an_allowed_port() -> Result<()> {
    let echo = EchoServer::start()?;
    let s = Server::start_with(Options::new().allow_forward(echo.port()))?;
    // Large enough to need several windows of flow control.
    let msg = message(4 << 20);
    let out = run_with(&mut s.ssh(&["-W", &format!("127.0.0.1:{}", echo.port())], ""), &msg, WAIT * 3)?;
    ensure!(out.success(), "{}", s.report(&out));
    ensure!(
        out.stdout == msg,
        "echo through -W differs ({} of {} bytes)\n{}",
        out.stdout.len(),
        msg.len(),
        s.report(&out)
    );
    Ok(())
}

#[test]
fn stdio_forward_to_a_port_not_allowed_is_refused() -> Result<()> {
    let allowed = EchoServer::start()?;
    let other = EchoServer::start()?;
    let s = Server::start_with(Options::new().allow_forward(allowed.port()))?;
    let out = run_with(&mut s.ssh(&["-W", &format!("127.0.0.1:{}", other.port())], ""), b"hello\n", WAIT)?;
    ensure!(!out.success() && out.stdout.is_empty(), "{}", s.report(&out));
    ensure!(out.stderr_text().contains("open failed"), "{}", s.report(&out));
    ensure!(other.connections() == 0, "the server connected to a port not allowed");
    Ok(())
}

#[test]
fn local_forward_to_an_allowed_port() -> Result<()> {
    let echo = EchoServer::start()?;
    let s = Server::start_with(Options::new().allow_forward(echo.port()))?;
    let local = free_port()?;
    let spec = format!("127.0.0.1:{local}:127.0.0.1:{}", echo.port());
    let mut ssh = Proc::spawn(&mut s.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &spec], ""))?;
    let msg = message(256 * 1024);
    // Until ssh listens, connecting fails; then the first round trip must be exact.
    let reply = retry("a round trip through -L", WAIT, || echo_roundtrip(local, &msg, WAIT))?;
    ensure!(reply == msg, "echo through -L differs\n{}\n{}", ssh.command(), s.log());
    // A second connection over the same SSH session.
    ensure!(echo_roundtrip(local, b"again\n", WAIT)? == b"again\n");
    ensure!(ssh.try_wait()?.is_none(), "ssh -L exited\n{}", s.report(&ssh.kill()));
    Ok(())
}

#[test]
fn local_forward_to_a_port_not_allowed_is_refused() -> Result<()> {
    let allowed = EchoServer::start()?;
    let other = EchoServer::start()?;
    let s = Server::start_with(Options::new().allow_forward(allowed.port()))?;
    let local = free_port()?;
    let spec = format!("127.0.0.1:{local}:127.0.0.1:{}", other.port());
    let ssh = Proc::spawn(&mut s.ssh(&["-N", "-L", &spec], ""))?;
    let conn = retry("connecting to the -L listener", WAIT, || Ok(TcpStream::connect((HOST, local))?))?;
    // ssh accepts the connection, asks the server, is refused and closes it unanswered (a reset
    // is as good as a close).
    let reply = roundtrip(conn, b"hello\n", WAIT).unwrap_or_default();
    ensure!(reply.is_empty(), "got {reply:?} through a forward that should be refused");
    ssh.wait_stderr("the refusal", WAIT, |err| String::from_utf8_lossy(err).contains("open failed"))?;
    ensure!(other.connections() == 0, "the server connected to a port not allowed");
    Ok(())
}

#[test]
fn reverse_forward_on_an_allowed_port() -> Result<()> {
    let echo = EchoServer::start()?;
    let remote = free_port()?;
    let s = Server::start_with(Options::new().allow_reverse(remote))?;
    let spec = format!("127.0.0.1:{remote}:127.0.0.1:{}", echo.port());
    let mut ssh = Proc::spawn(&mut s.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec], ""))?;
    let msg = message(256 * 1024);
    // The server listens on `remote` once ssh's request is granted.
    let reply = retry("a round trip through -R", WAIT, || echo_roundtrip(remote, &msg, WAIT))?;
    ensure!(reply == msg, "echo through -R differs\n{}", s.log());
    ensure!(ssh.try_wait()?.is_none(), "ssh -R exited\n{}", s.report(&ssh.kill()));
    Ok(())
}

#[test]
fn reverse_forward_on_a_port_not_allowed_is_refused() -> Result<()> {
    let echo = EchoServer::start()?;
    let (allowed, other) = (free_port()?, free_port()?);
    let s = Server::start_with(Options::new().allow_reverse(allowed))?;
    let spec = format!("127.0.0.1:{other}:127.0.0.1:{}", echo.port());
    let mut ssh = Proc::spawn(&mut s.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec], ""))?;
    let out = ssh.wait(WAIT)?;
    ensure!(!out.success(), "{}", s.report(&out));
    ensure!(out.stderr_text().contains("remote port forwarding failed"), "{}", s.report(&out));
    ensure!(TcpStream::connect((HOST, other)).is_err(), "something listens on the refused port {other}");
    Ok(())
}
