//! `devmount::session` against a real devmount-server running in this process on loopback, and
//! against scripted russh servers over in-memory pipes.
//!
//! An integration test (a process of its own) rather than a unit test: the server's reaper owns
//! SIGCHLD and reaps every child of the process, which would steal the exit status of any
//! command another unit test runs. Keys are made with `ssh-keygen` (and known_hosts hashed with
//! `ssh-keygen -H`, so hashed entries are OpenSSH's own) before the reaper starts.

mod common;

use common::{keygen, public_line, write};

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use devmount::session::{self, ConnectOptions, FeedStream, Session, SessionError, Target};
use devmount_server::forward::AllowList;
use devmount_server::{keys, ssh};
use devmount_server::proto::feed::{Change, FeedMessage, PROTOCOL_VERSION};
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session as ServerSession};
use russh::{Channel, ChannelId, ChannelMsg};
use tempfile::TempDir;

struct Fixture {
    _dir: TempDir,
    dir: PathBuf,
    /// The served root, canonical.
    root: PathBuf,
    port: u16,
    host_fingerprint: String,
    host_key: PathBuf,
    /// Authorized ed25519 and RSA keys; one nobody authorized; one with a passphrase.
    identity: PathBuf,
    rsa_identity: PathBuf,
    stranger: PathBuf,
    encrypted: PathBuf,
    known_plain: PathBuf,
    known_hashed: PathBuf,
    /// Another key under the server's name.
    known_wrong: PathBuf,
    /// The server's key, under another name only.
    known_elsewhere: PathBuf,
    /// The server's key for the host "scripted", port 22.
    known_scripted: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(start_server)
}

fn start_server() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    write(&root.join("hello.txt"), "hello");
    let path = |name: &str| dir.join(name);
    let none: &[&str] = &["-N", ""];
    keygen(&path("host_key"), &[&["-t", "ed25519"], none].concat());
    keygen(&path("other_host_key"), &[&["-t", "ed25519"], none].concat());
    keygen(&path("id"), &[&["-t", "ed25519"], none].concat());
    keygen(&path("id_rsa"), &[&["-t", "rsa", "-b", "2048"], none].concat());
    keygen(&path("stranger"), &[&["-t", "ed25519"], none].concat());
    keygen(&path("encrypted"), &["-t", "ed25519", "-N", "secret"]);
    write(
        &path("authorized_keys"),
        &format!("{}\n{}\n", public_line(&path("id")), public_line(&path("id_rsa"))),
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_line = public_line(&path("host_key"));
    write(&path("known_plain"), &format!("# the server\n[127.0.0.1]:{port} {host_line}\n"));
    write(&path("known_hashed"), &format!("[127.0.0.1]:{port} {host_line}\n"));
    keygen(&path("known_hashed"), &["-H"]);
    assert!(std::fs::read_to_string(path("known_hashed")).unwrap().starts_with("|1|"));
    write(&path("known_wrong"), &format!("[127.0.0.1]:{port} {}\n", public_line(&path("other_host_key"))));
    write(&path("known_elsewhere"), &format!("[127.0.0.2]:{port} {host_line}\nlocalhost {host_line}\n"));
    write(&path("known_scripted"), &format!("scripted {host_line}\n"));
    let host_fingerprint = session::fingerprint(&PublicKey::from_openssh(&host_line).unwrap());

    common::spawn_server(
        listener,
        root.clone(),
        &path("host_key"),
        path("authorized_keys"),
        AllowList::default(),
        || {},
    );

    Fixture {
        dir: dir.clone(),
        root,
        port,
        host_fingerprint,
        host_key: path("host_key"),
        identity: path("id"),
        rsa_identity: path("id_rsa"),
        stranger: path("stranger"),
        encrypted: path("encrypted"),
        known_plain: path("known_plain"),
        known_hashed: path("known_hashed"),
        known_wrong: path("known_wrong"),
        known_elsewhere: path("known_elsewhere"),
        known_scripted: path("known_scripted"),
        _dir: tmp,
    }
}

fn target(port: u16, path: &Path) -> Target {
    let url = format!("ssh://dev@127.0.0.1:{port}{}", path.display());
    Target::parse(OsStr::new(&url), "nobody").unwrap()
}

fn options() -> ConnectOptions {
    ConnectOptions { connect_timeout: Duration::from_secs(20), ..ConnectOptions::default() }
}

async fn connect_with(identity: &Path, known_hosts: &Path) -> Result<Session, SessionError> {
    let f = fixture();
    session::connect(&target(f.port, &f.root), identity, known_hosts, &options()).await
}

async fn connect() -> Session {
    let f = fixture();
    connect_with(&f.identity, &f.known_plain).await.unwrap()
}

/// The error's message: one line, for the user.
fn message(e: &SessionError) -> String {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    msg
}

#[tokio::test]
async fn sftp_realpath_and_stat() {
    let f = fixture();
    let session = connect().await;
    let (sftp, info) = session.open_sftp().await.unwrap();
    assert!(info.server_version.is_some(), "devmount-server announces its version");
    assert_eq!(&sftp.realpath(b".").await.unwrap()[..], f.root.as_os_str().as_encoded_bytes());
    let attrs = sftp.stat(&[&session.target().path[..], b"/hello.txt"].concat()).await.unwrap();
    assert_eq!(attrs.size, Some(5));
    session.disconnect().await;
}

#[tokio::test]
async fn hashed_known_hosts_entry_is_accepted() {
    let f = fixture();
    let session = connect_with(&f.identity, &f.known_hashed).await.unwrap();
    session.open_sftp().await.unwrap();
}

#[tokio::test]
async fn rsa_identity_signs_with_sha2() {
    let f = fixture();
    let session = connect_with(&f.rsa_identity, &f.known_plain).await.unwrap();
    session.open_sftp().await.unwrap();
}

#[tokio::test]
async fn feed_says_hello_then_reports_a_new_file() {
    let f = fixture();
    let session = connect().await;
    let mut feed = session.open_feed().await.unwrap();
    match next(&mut feed).await {
        FeedMessage::Hello { protocol, .. } => assert_eq!(protocol, PROTOCOL_VERSION),
        other => panic!("expected hello first, got {other:?}"),
    }
    write(&f.root.join("feed-new.txt"), "x");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no event for feed-new.txt; saw {seen:?}");
        let msg =
            tokio::time::timeout_at(deadline.into(), next(&mut feed)).await.expect("feed event in time");
        if let FeedMessage::Batch { events, .. } = &msg {
            if events
                .iter()
                .any(|e| matches!(&e.change, Change::Created { path, .. } if path == "feed-new.txt"))
            {
                break;
            }
        }
        seen.push(msg);
    }
}

async fn next(feed: &mut FeedStream) -> FeedMessage {
    feed.next().await.unwrap().expect("the feed ended")
}

#[tokio::test]
async fn exec_runs_a_command() {
    let session = connect().await;
    let mut channel = session.exec(b"echo hi").await.unwrap();
    let (mut out, mut status) = (Vec::new(), None);
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), channel.wait()).await.unwrap() {
        match msg {
            ChannelMsg::Data { data } => out.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::Failure => panic!("the server refused exec"),
            _ => {}
        }
    }
    assert_eq!((out.as_slice(), status), (&b"hi\n"[..], Some(0)));
}

#[tokio::test]
async fn rtt_is_measured() {
    let session = connect().await;
    let rtt = session.rtt().await.unwrap();
    assert!(rtt < Duration::from_secs(5), "{rtt:?}");
    assert!(!session.is_closed());
}

#[tokio::test]
async fn wrong_host_key_is_refused_with_its_fingerprint() {
    let f = fixture();
    let e = connect_with(&f.identity, &f.known_wrong).await.err().expect("refused");
    let msg = message(&e);
    assert!(matches!(e, SessionError::HostKeyMismatch { line: 1, .. }), "{msg}");
    assert!(msg.contains(&f.host_fingerprint), "{msg}");
    assert!(msg.contains(&f.known_wrong.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("[127.0.0.1]:{}", f.port)), "{msg}");
}

#[tokio::test]
async fn host_missing_from_known_hosts_is_refused() {
    let f = fixture();
    let e = connect_with(&f.identity, &f.known_elsewhere).await.err().expect("refused");
    let msg = message(&e);
    assert!(matches!(e, SessionError::HostKeyUnknown { .. }), "{msg}");
    assert!(
        msg.contains(&f.host_fingerprint) && msg.contains(&f.known_elsewhere.display().to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn missing_known_hosts_file_is_named() {
    let f = fixture();
    let missing = f.dir.join("no_such_known_hosts");
    let e = connect_with(&f.identity, &missing).await.err().expect("refused");
    assert!(matches!(e, SessionError::KnownHosts { .. }), "{}", message(&e));
}

#[tokio::test]
async fn unknown_client_key_is_refused() {
    let f = fixture();
    let e = connect_with(&f.stranger, &f.known_plain).await.err().expect("refused");
    let msg = message(&e);
    assert!(matches!(e, SessionError::AuthRefused { .. }), "{msg}");
    assert!(msg.contains(&format!("dev@127.0.0.1:{}", f.port)), "{msg}");
    assert!(msg.contains(&f.stranger.display().to_string()) && msg.contains("authorized_keys"), "{msg}");
}

#[tokio::test]
async fn unusable_identity_files_are_explained() {
    let f = fixture();
    let mut public = f.identity.clone().into_os_string();
    public.push(".pub");
    let cases = [
        (f.encrypted.clone(), "passphrase"),
        (PathBuf::from(public), "public key"),
        (f.dir.join("no_such_key"), "cannot be read"),
        (f.dir.join("known_plain"), "not a usable private key"),
    ];
    for (file, expected) in cases {
        let e = connect_with(&file, &f.known_plain).await.err().expect("refused");
        let msg = message(&e);
        assert!(matches!(e, SessionError::Identity { .. }), "{msg}");
        assert!(msg.contains(expected) && msg.contains(&file.display().to_string()), "{msg}");
    }
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let f = fixture();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = session::connect(&target(port, &f.root), &f.identity, &f.known_plain, &options())
        .await
        .err()
        .expect("refused");
    let msg = message(&e);
    assert!(matches!(e, SessionError::Unreachable { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

// Scripted servers over in-memory pipes, reached with `connect_stream`.

/// Accepts any key and any session channel, and refuses every subsystem, as OpenSSH refuses
/// one it does not know.
struct Refuser;

impl russh::server::Handler for Refuser {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _: &str,
        _: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

/// Starts a [`Refuser`] on one end of `server_end` with the fixture's host key.
fn serve_refuser(server_end: tokio::io::DuplexStream) {
    let f = fixture();
    let config = Arc::new(ssh::config(keys::host_key_from_file(&f.host_key).unwrap()));
    tokio::spawn(async move {
        if let Ok(running) = russh::server::run_stream(config, server_end, Refuser).await {
            let _ = running.await;
        }
    });
}

/// A target named "scripted" (port 22) and a known_hosts file that lists the fixture's host
/// key under that name.
fn scripted_target() -> (Target, PathBuf) {
    let f = fixture();
    (Target::parse(OsStr::new("ssh://dev@scripted/w"), "nobody").unwrap(), f.known_scripted.clone())
}

#[tokio::test]
async fn refused_feed_subsystem_is_unsupported_at_once() {
    let f = fixture();
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    serve_refuser(server_end);
    let (target, known) = scripted_target();
    let session =
        session::connect_stream(client_end, &target, &f.identity, &known, &options()).await.unwrap();
    let start = Instant::now();
    let e = session.open_feed().await.err().expect("refused");
    assert!(matches!(e, SessionError::Unsupported { subsystem: "devmount-feed", .. }), "{}", message(&e));
    assert!(start.elapsed() < Duration::from_secs(5));
    // The connection stays usable after the refusal.
    session.rtt().await.unwrap();
}

/// What happens to a [`pipe`] when its fault is set off.
#[derive(Clone, Copy)]
enum Fault {
    /// Both ends are closed, as when the peer's process dies.
    Cut,
    /// Both ends stay open and silent, as when the network drops every packet.
    Freeze,
}

/// A connection to a [`Refuser`] through a relay that passes bytes both ways until the
/// returned sender sets off `fault`.
fn pipe(fault: Fault) -> (tokio::io::DuplexStream, tokio::sync::oneshot::Sender<()>) {
    let (client_end, mut near) = tokio::io::duplex(1 << 16);
    let (mut far, server_end) = tokio::io::duplex(1 << 16);
    serve_refuser(server_end);
    let (trigger, triggered) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut near, &mut far) => {}
            _ = triggered => if let Fault::Freeze = fault {
                std::future::pending::<()>().await
            },
        }
    });
    (client_end, trigger)
}

#[tokio::test]
async fn a_dropped_connection_is_noticed() {
    let f = fixture();
    let (client_end, cut) = pipe(Fault::Cut);
    let (target, known) = scripted_target();
    let session =
        session::connect_stream(client_end, &target, &f.identity, &known, &options()).await.unwrap();
    session.rtt().await.unwrap();
    cut.send(()).unwrap();
    let reason =
        tokio::time::timeout(Duration::from_secs(10), session.closed()).await.expect("closed in time");
    assert!(session.is_closed(), "{reason}");
    let e = session.rtt().await.expect_err("closed");
    assert!(matches!(e, SessionError::Closed { .. }), "{}", message(&e));
    assert!(matches!(session.open_sftp().await, Err(SessionError::Closed { .. })));
}

#[tokio::test]
async fn a_silent_server_is_given_up_after_the_keepalives() {
    let f = fixture();
    let (client_end, freeze) = pipe(Fault::Freeze);
    let (target, known) = scripted_target();
    let opts =
        ConnectOptions { keepalive_interval: Duration::from_millis(100), keepalive_max: 2, ..options() };
    let session = session::connect_stream(client_end, &target, &f.identity, &known, &opts).await.unwrap();
    session.rtt().await.unwrap();
    freeze.send(()).unwrap();
    let reason =
        tokio::time::timeout(Duration::from_secs(10), session.closed()).await.expect("given up in time");
    assert!(reason.contains("keepalive"), "{reason}");
    assert!(session.is_closed());
}
