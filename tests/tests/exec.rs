//! OpenSSH's `ssh` running commands and shells on devmount-server: exit codes, signals, stdin,
//! large output, stderr, PTYs, working directory and environment.

use std::time::Duration;

use anyhow::{ensure, Result};
use devmount_tests::{run, run_with, Proc, Server, TIMEOUT};

#[test]
fn exit_codes_are_reported() -> Result<()> {
    let s = Server::start()?;
    for (command, code) in [("true", 0), ("false", 1), ("exit 3", 3), ("exit 255", 255)] {
        let out = run(&mut s.ssh(&[], command))?;
        ensure!(out.code() == Some(code), "`{command}` should exit {code}\n{}", s.report(&out));
    }
    Ok(())
}

#[test]
fn death_by_signal_is_reported_as_exit_signal() -> Result<()> {
    let s = Server::start()?;
    // ssh has no exit status to give for a signal: it exits 255, and its debug log shows which
    // channel request carried the news.
    let out = run(&mut s.ssh(&["-v"], "kill -TERM $$"))?;
    ensure!(out.code() == Some(255), "{}", s.report(&out));
    let log = out.stderr_text();
    ensure!(log.contains("rtype exit-signal"), "no exit-signal request\n{}", s.report(&out));
    ensure!(!log.contains("rtype exit-status"), "an exit-status came with the signal\n{}", s.report(&out));
    Ok(())
}

#[test]
fn stdin_is_streamed_until_eof() -> Result<()> {
    let s = Server::start()?;
    let out = run_with(&mut s.ssh(&[], "cat"), b"hi\n", TIMEOUT)?;
    ensure!(out.success() && out.stdout == b"hi\n", "{}", s.report(&out));

    let input = vec![b'x'; 8 << 20];
    let out = run_with(&mut s.ssh(&[], "wc -c"), &input, TIMEOUT)?;
    ensure!(out.success() && out.stdout_text().trim() == input.len().to_string(), "{}", s.report(&out));
    Ok(())
}

#[test]
fn large_output_arrives_complete_and_in_order() -> Result<()> {
    let s = Server::start()?;
    const LINES: u32 = 10_000_000;
    let out = run_with(&mut s.ssh(&[], &format!("seq 1 {LINES}")), &[], Duration::from_secs(120))?;
    ensure!(out.success(), "{}", s.report(&out));
    let expected: Vec<u8> = (1..=LINES).flat_map(|i| format!("{i}\n").into_bytes()).collect();
    ensure!(
        out.stdout.len() == expected.len(),
        "got {} bytes, expected {}",
        out.stdout.len(),
        expected.len()
    );
    let first_difference = out.stdout.iter().zip(&expected).position(|(a, b)| a != b);
    ensure!(first_difference.is_none(), "output differs from byte {first_difference:?} on");
    Ok(())
}

#[test]
fn stdout_and_stderr_stay_separate() -> Result<()> {
    let s = Server::start()?;
    let out = run(&mut s.ssh(&[], "echo out; echo err >&2; echo out2"))?;
    ensure!(out.success(), "{}", s.report(&out));
    ensure!(out.stdout == b"out\nout2\n", "{}", s.report(&out));
    ensure!(out.stderr == b"err\n", "{}", s.report(&out));
    Ok(())
}

#[test]
fn working_directory_is_the_root() -> Result<()> {
    let s = Server::start()?;
    let out = run(&mut s.ssh(&[], "pwd -P"))?;
    ensure!(out.success(), "{}", s.report(&out));
    ensure!(out.stdout_text().trim_end() == s.root().to_string_lossy(), "{}", s.report(&out));
    Ok(())
}

#[test]
fn env_requests_reach_the_command() -> Result<()> {
    let s = Server::start()?;
    let out =
        run(&mut s.ssh(&["-o", "SetEnv=DEVMOUNT_TEST_VAR=from-client"], "echo \"$DEVMOUNT_TEST_VAR\""))?;
    ensure!(out.success() && out.stdout == b"from-client\n", "{}", s.report(&out));
    Ok(())
}

#[test]
fn pty_is_allocated_only_when_asked() -> Result<()> {
    let s = Server::start()?;
    let probe = "test -t 0 && test -t 1 && echo tty || echo notty; echo \"TERM=$TERM\"";

    let out = run(s.ssh(&["-tt"], probe).env("TERM", "xterm-256color"))?;
    ensure!(out.success(), "{}", s.report(&out));
    let text = out.stdout_text();
    ensure!(text.contains("tty\r\n") && !text.contains("notty"), "no PTY with -tt\n{}", s.report(&out));
    ensure!(
        text.contains("TERM=xterm-256color"),
        "pty-req's terminal type is not in TERM\n{}",
        s.report(&out)
    );

    let out = run(&mut s.ssh(&["-T"], probe))?;
    ensure!(out.success() && out.stdout_text().starts_with("notty\n"), "{}", s.report(&out));
    Ok(())
}

#[test]
fn ctrl_c_on_the_pty_interrupts_the_command() -> Result<()> {
    let s = Server::start()?;
    let mut ssh = Proc::spawn(&mut s.ssh(&["-tt"], "echo ready; sleep 60; echo not-interrupted"))?;
    ssh.wait_stdout("`ready`", Duration::from_secs(30), |out| out.windows(5).any(|w| w == b"ready"))?;
    // The remote line discipline turns ^C into SIGINT for the foreground process group.
    ssh.write(b"\x03")?;
    let out = ssh.wait(Duration::from_secs(20))?;
    ensure!(!out.success(), "{}", s.report(&out));
    ensure!(!out.stdout_text().contains("not-interrupted"), "{}", s.report(&out));
    Ok(())
}

#[test]
fn shell_reads_commands_from_stdin() -> Result<()> {
    let s = Server::start()?;
    let out = run_with(&mut s.ssh(&["-T"], ""), b"echo from-shell\nexit 5\n", TIMEOUT)?;
    ensure!(out.code() == Some(5), "{}", s.report(&out));
    ensure!(out.stdout_text().contains("from-shell\n"), "{}", s.report(&out));
    Ok(())
}

#[test]
fn interactive_shell_on_a_pty() -> Result<()> {
    let s = Server::start()?;
    let mut ssh = Proc::spawn(s.ssh(&["-tt"], "").env("TERM", "dumb"))?;
    ssh.write(b"echo from-$((6 * 7))-shell; exit 7\n")?;
    let out = ssh.wait(Duration::from_secs(30))?;
    ensure!(out.code() == Some(7), "{}", s.report(&out));
    // The computed text appears only in the output, not in the echo of the typed line.
    ensure!(out.stdout_text().contains("from-42-shell"), "{}", s.report(&out));
    Ok(())
}
