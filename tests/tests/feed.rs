//! The change feed subsystem as OpenSSH's `ssh -s` sees it: a hello, `ready`, then changes
//! made in the root directory.

use std::fs;
use std::time::Duration;

use anyhow::{ensure, Result};
use bytes::BytesMut;
use devmount_server::proto::feed::{Change, FeedMessage, MAX_FEED_FRAME, PROTOCOL_VERSION, SUBSYSTEM};
use devmount_server::proto::wire::take_frame;
use devmount_server::proto::SERVER_VERSION;
use devmount_tests::{Proc, Server};

const WAIT: Duration = Duration::from_secs(20);

/// The complete frames at the start of `out`, decoded; an error on a bad frame.
fn messages(out: &[u8]) -> Result<Vec<FeedMessage>> {
    let mut buf = BytesMut::from(out);
    let mut all = Vec::new();
    while let Some(frame) = take_frame(&mut buf, MAX_FEED_FRAME)? {
        all.push(FeedMessage::decode(frame)?);
    }
    Ok(all)
}

/// Waits until the decoded stream satisfies `done` (or stops decoding).
fn wait_messages(
    ssh: &Proc,
    what: &str,
    mut done: impl FnMut(&[FeedMessage]) -> bool,
) -> Result<Vec<FeedMessage>> {
    ssh.wait_stdout(what, WAIT, |out| messages(out).map_or(true, |m| done(&m)))?;
    messages(&ssh.stdout())
}

#[test]
fn feed_says_hello_then_ready_then_reports_changes() -> Result<()> {
    let s = Server::start()?;
    let ssh = Proc::spawn(&mut s.ssh(&["-s"], SUBSYSTEM))?;

    let seen =
        wait_messages(&ssh, "hello and ready", |m| m.iter().any(|m| matches!(m, FeedMessage::Ready { .. })))?;
    match seen.first() {
        Some(FeedMessage::Hello { protocol, server_version, .. }) => {
            ensure!(*protocol == PROTOCOL_VERSION, "protocol {protocol}");
            ensure!(
                server_version.as_ref() == SERVER_VERSION.as_bytes(),
                "server version {server_version:?}"
            );
        }
        other => anyhow::bail!("the first message is {other:?}, not a hello"),
    }

    fs::create_dir(s.root().join("made-in-pod"))?;
    fs::write(s.root().join("made-in-pod/file.txt"), b"hello\n")?;
    let reported = |m: &[FeedMessage]| {
        m.iter().any(|m| match m {
            FeedMessage::Batch { events, .. } => events.iter().any(|e| {
                e.change.path().as_ref() == b"made-in-pod/file.txt"
                    && !matches!(e.change, Change::Deleted { .. })
            }),
            _ => false,
        })
    };
    let seen = wait_messages(&ssh, "an event for made-in-pod/file.txt", reported)?;
    ensure!(reported(&seen), "{seen:?}\n{}", s.log());
    Ok(())
}
