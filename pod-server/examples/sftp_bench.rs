//! Benchmarks devmount-server's SFTP subsystem against OpenSSH's `sftp-server` on one tree,
//! with the project's own pipelining client ([`SftpClient`]).
//!
//! Two transports, each with both servers:
//! - SSH: a russh client (host key pinned) against a running `devmount-server` and a running
//!   OpenSSH `sshd`, both on loopback;
//! - stdio: the SFTP servers alone, without SSH: OpenSSH's `sftp-server` as a child over pipes,
//!   and devmount's subsystem ([`serve`]) on its own runtime over a Unix socket pair.
//!
//! Workloads, each run `--runs` times after one unmeasured warm-up pass (the median is
//! reported): lstat of every entry of `TREE/stdlib`, READDIR of every directory in it, the
//! names and stats of the whole subtree (`walk@devmount` where the server has it), one big file
//! read with READs of the server's maximum length, and small whole files read 8 at a time.
//! Every result is checked against the local tree, outside the timed part.
//!
//! `scripts/bench-sftp` builds the tree, starts both SSH servers and runs this; the markdown
//! table goes to stdout, progress to stderr.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use clap::Parser;
use devmount_server::keys::fingerprint;
use devmount_server::proto::sftp::{ext, open_flags, Attrs};
use devmount_server::sftp::client::SftpClient;
use devmount_server::sftp::server::{serve, Limits, SftpContext};
use russh::client;
use russh::keys::{load_secret_key, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Requests in flight for the metadata workloads, as the client keeps by default.
const METADATA_WORKERS: usize = 64;
/// Tasks issuing READs of the big file; the client's in-flight caps decide how many are sent.
const READ_WORKERS: usize = 64;
/// Small files read at once.
const FILE_WORKERS: usize = 8;
/// The longest any one measured pass may take.
const PASS_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a connection or a session shutdown may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(about = "Benchmark devmount-server's SFTP against OpenSSH's sftp-server")]
struct Args {
    /// The tree: `stdlib/` for the metadata workloads, `data/big` and `data/small/*` for reads.
    #[arg(long)]
    tree: PathBuf,
    /// Measured runs of each workload; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// OpenSSH's sftp-server binary, for the stdio transport.
    #[arg(long)]
    sftp_server: PathBuf,
    /// The client's private key, for the SSH transport.
    #[arg(long, requires_all = ["devmount", "devmount_host_key", "openssh", "openssh_host_key"])]
    key: Option<PathBuf>,
    /// devmount-server's SSH address (loopback).
    #[arg(long, requires = "key")]
    devmount: Option<SocketAddr>,
    /// devmount-server's host key fingerprint, `SHA256:...`.
    #[arg(long, requires = "key")]
    devmount_host_key: Option<String>,
    /// OpenSSH sshd's address (loopback).
    #[arg(long, requires = "key")]
    openssh: Option<SocketAddr>,
    /// sshd's host key fingerprint, `SHA256:...`.
    #[arg(long, requires = "key")]
    openssh_host_key: Option<String>,
    /// The workloads to run (repeat the flag for several), all by default.
    #[arg(long = "workload", value_enum, default_values_t = [
        Workload::Lstat,
        Workload::Readdir,
        Workload::TreeMetadata,
        Workload::BigRead,
        Workload::SmallFiles,
    ])]
    workloads: Vec<Workload>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ssh,
    Stdio,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Ssh => "SSH",
            Transport::Stdio => "stdio",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Devmount,
    OpenSsh,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Devmount => "devmount-server",
            Server::OpenSsh => "OpenSSH",
        }
    }
}

/// What keeps a session's server side alive, and how it is ended.
enum Keep {
    Ssh(client::Handle<Pinned>),
    Child(tokio::process::Child),
    Thread(std::thread::JoinHandle<Result<()>>),
}

struct Target {
    transport: Transport,
    server: Server,
    client: SftpClient,
    keep: Keep,
}

impl Target {
    fn name(&self) -> String {
        format!("{} over {}", self.server.label(), self.transport.label())
    }

    /// Ends the session and waits for its server side to finish.
    async fn close(self) -> Result<()> {
        let name = self.name();
        drop(self.client);
        let ended = async {
            match self.keep {
                Keep::Ssh(session) => {
                    session.disconnect(russh::Disconnect::ByApplication, "", "en").await?;
                }
                Keep::Child(mut child) => {
                    let status = child.wait().await?;
                    ensure!(status.success(), "sftp-server exited with {status}");
                }
                Keep::Thread(thread) => {
                    let joined = tokio::task::spawn_blocking(move || thread.join()).await?;
                    match joined {
                        Ok(served) => served?,
                        Err(_) => bail!("the devmount SFTP thread panicked"),
                    }
                }
            }
            Ok(())
        };
        timeout(CONNECT_TIMEOUT, ended).await.with_context(|| format!("closing {name}: timed out"))?
    }
}

/// A client handler that accepts exactly one host key, by its fingerprint.
struct Pinned {
    fingerprint: String,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => fingerprint(key) == self.fingerprint,
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

async fn connect_ssh(
    server: Server,
    addr: SocketAddr,
    host_key: &str,
    key: &Arc<PrivateKey>,
    user: &str,
) -> Result<Target> {
    ensure!(addr.ip().is_loopback(), "{addr} is not a loopback address");
    let connect = async {
        let config = Arc::new(client::Config {
            // A window and packets large enough that SSH flow control is not what limits a
            // pipelined read.
            window_size: 8 << 20,
            maximum_packet_size: 65_535,
            nodelay: true,
            // One cipher for both servers, so that the table compares servers, not ciphers.
            preferred: russh::Preferred {
                cipher: Cow::Borrowed(&[russh::cipher::CHACHA20_POLY1305]),
                ..russh::Preferred::default()
            },
            ..client::Config::default()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.context("connecting")?;
        tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
        let pinned = Pinned { fingerprint: host_key.to_owned() };
        let mut session = client::connect_stream(config, tcp, pinned)
            .await
            .with_context(|| format!("SSH handshake (expecting host key {host_key})"))?;
        let auth = session
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), None))
            .await
            .context("authenticating")?;
        ensure!(auth.success(), "public key authentication as {user} was refused");
        let mut channel = session.channel_open_session().await.context("opening a session channel")?;
        channel.request_subsystem(true, "sftp").await.context("requesting the sftp subsystem")?;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => bail!("the server refused the sftp subsystem"),
                None => bail!("the channel closed before the sftp subsystem started"),
                Some(_) => {}
            }
        }
        let (client, _) = SftpClient::connect(channel.into_stream()).await.context("SFTP handshake")?;
        Ok(Target { transport: Transport::Ssh, server, client, keep: Keep::Ssh(session) })
    };
    timeout(CONNECT_TIMEOUT, connect)
        .await
        .with_context(|| format!("{} at {addr}: timed out", server.label()))?
        .with_context(|| format!("{} at {addr}", server.label()))
}

async fn connect_openssh_stdio(sftp_server: &Path) -> Result<Target> {
    let mut child = tokio::process::Command::new(sftp_server)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", sftp_server.display()))?;
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        bail!("sftp-server's pipes are missing");
    };
    let (client, _) = timeout(CONNECT_TIMEOUT, SftpClient::connect(tokio::io::join(stdout, stdin)))
        .await
        .context("SFTP handshake with sftp-server: timed out")?
        .context("SFTP handshake with sftp-server")?;
    Ok(Target { transport: Transport::Stdio, server: Server::OpenSsh, client, keep: Keep::Child(child) })
}

/// devmount's subsystem on a runtime of its own, in its own threads, as the server binary runs
/// it, so that it does not share the client's scheduler.
async fn connect_devmount_stdio(root: &Path) -> Result<Target> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("creating a socket pair")?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("devmount-sftp")
        .build()
        .context("starting the server's runtime")?;
    let ctx = Arc::new(SftpContext {
        root: root.canonicalize().with_context(|| format!("resolving {}", root.display()))?,
        conn: 1,
        changes: Arc::new(()),
        limits: Limits::default(),
    });
    let thread = std::thread::Builder::new().name("devmount-sftp".into()).spawn(move || {
        runtime.block_on(async move {
            let stream = tokio::net::UnixStream::from_std(theirs)?;
            serve(stream, ctx).await
        })
    })?;
    let stream = tokio::net::UnixStream::from_std(ours)?;
    let (client, _) = timeout(CONNECT_TIMEOUT, SftpClient::connect(stream))
        .await
        .context("SFTP handshake with devmount's subsystem: timed out")?
        .context("SFTP handshake with devmount's subsystem")?;
    Ok(Target { transport: Transport::Stdio, server: Server::Devmount, client, keep: Keep::Thread(thread) })
}

/// The local tree, as the workloads use it and check against.
struct Tree {
    /// Every entry under `stdlib/` (not `stdlib/` itself), with its lstat size.
    entries: Vec<(Bytes, u64)>,
    /// Every directory under `stdlib/`, itself included, with its entry count.
    dirs: Vec<(Bytes, usize)>,
    stdlib: Bytes,
    big: Bytes,
    big_content: Bytes,
    small: Vec<(Bytes, Bytes)>,
    total_bytes: u64,
}

fn bytes_of(path: &Path) -> Bytes {
    Bytes::copy_from_slice(path.as_os_str().as_bytes())
}

impl Tree {
    fn load(root: &Path) -> Result<Tree> {
        let root = root.canonicalize().with_context(|| format!("resolving {}", root.display()))?;
        let mut tree = Tree {
            entries: Vec::new(),
            dirs: Vec::new(),
            stdlib: bytes_of(&root.join("stdlib")),
            big: Bytes::new(),
            big_content: Bytes::new(),
            small: Vec::new(),
            total_bytes: 0,
        };
        let mut pending = vec![root.join("stdlib")];
        while let Some(dir) = pending.pop() {
            let mut count = 0;
            for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                let path = entry?.path();
                let meta =
                    std::fs::symlink_metadata(&path).with_context(|| format!("lstat {}", path.display()))?;
                if meta.is_dir() {
                    pending.push(path.clone());
                }
                tree.total_bytes += meta.len();
                tree.entries.push((bytes_of(&path), meta.len()));
                count += 1;
            }
            tree.dirs.push((bytes_of(&dir), count));
        }
        ensure!(
            tree.entries.len() > 100,
            "{} holds only {} entries",
            root.join("stdlib").display(),
            tree.entries.len()
        );
        let big = root.join("data/big");
        tree.big_content = std::fs::read(&big).with_context(|| format!("reading {}", big.display()))?.into();
        tree.big = bytes_of(&big);
        let small = root.join("data/small");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&small)
            .with_context(|| format!("listing {}", small.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for path in names {
            let content = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            tree.small.push((bytes_of(&path), content.into()));
        }
        ensure!(!tree.small.is_empty(), "{} is empty", small.display());
        Ok(tree)
    }

    fn small_bytes(&self) -> u64 {
        self.small.iter().map(|(_, c)| c.len() as u64).sum()
    }
}

/// Runs `work(i)` for every `i` in `0..count` on `workers` tasks; fails with the first error.
async fn pool<F, Fut>(count: usize, workers: usize, work: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    for _ in 0..workers.min(count) {
        let (next, work) = (next.clone(), work.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok(());
                }
                work(i).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a worker task failed")??;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Lstat,
    Readdir,
    /// Names and stats of the whole tree, in the fewest requests each server allows.
    TreeMetadata,
    BigRead,
    SmallFiles,
}

impl Workload {
    fn describe(self, tree: &Tree) -> String {
        match self {
            Workload::Lstat => {
                format!("lstat of {} entries, {METADATA_WORKERS} in flight", count(tree.entries.len() as u64))
            }
            Workload::Readdir => {
                format!(
                    "readdir of {} directories, {METADATA_WORKERS} at a time",
                    count(tree.dirs.len() as u64)
                )
            }
            Workload::TreeMetadata => format!(
                "names and stats of {} entries: walk@devmount, else readdir",
                count(tree.entries.len() as u64)
            ),
            Workload::BigRead => format!("read one {} MiB file", tree.big_content.len() >> 20),
            Workload::SmallFiles => format!(
                "read {} files of {} KiB, {FILE_WORKERS} at a time",
                tree.small.len(),
                tree.small[0].1.len() >> 10
            ),
        }
    }

    /// The unit of the rate, and how many of them one pass does.
    fn amount(self, tree: &Tree) -> (&'static str, f64) {
        match self {
            Workload::Lstat => ("files/s", tree.entries.len() as f64),
            Workload::Readdir => ("dirs/s", tree.dirs.len() as f64),
            Workload::TreeMetadata => ("entries/s", tree.entries.len() as f64),
            Workload::BigRead => ("MiB/s", tree.big_content.len() as f64 / (1 << 20) as f64),
            Workload::SmallFiles => ("MiB/s", tree.small_bytes() as f64 / (1 << 20) as f64),
        }
    }

    /// One timed pass; the result is checked after the clock stops.
    async fn run(self, client: &SftpClient, tree: &Arc<Tree>) -> Result<Duration> {
        match self {
            Workload::Lstat => lstat_all(client, tree).await,
            Workload::Readdir => readdir_all(client, tree).await,
            Workload::TreeMetadata if client.info().has(ext::WALK) => walk(client, tree).await,
            Workload::TreeMetadata => readdir_all(client, tree).await,
            Workload::BigRead => read_big(client, tree).await,
            Workload::SmallFiles => read_small(client, tree).await,
        }
    }
}

async fn lstat_all(client: &SftpClient, tree: &Arc<Tree>) -> Result<Duration> {
    let sizes = Arc::new(Mutex::new(vec![None; tree.entries.len()]));
    let start = Instant::now();
    let (c, t, s) = (client.clone(), tree.clone(), sizes.clone());
    pool(tree.entries.len(), METADATA_WORKERS, move |i| {
        let (c, t, s) = (c.clone(), t.clone(), s.clone());
        async move {
            let attrs =
                c.lstat(&t.entries[i].0).await.with_context(|| path_context("lstat", &t.entries[i].0))?;
            lock(&s)[i] = Some(attrs.size);
            Ok(())
        }
    })
    .await?;
    let elapsed = start.elapsed();
    for ((path, want), got) in tree.entries.iter().zip(lock(&sizes).iter()) {
        ensure!(*got == Some(Some(*want)), "lstat {}: size {got:?}, expected {want}", lossy(path));
    }
    Ok(elapsed)
}

async fn readdir_all(client: &SftpClient, tree: &Arc<Tree>) -> Result<Duration> {
    let counts = Arc::new(Mutex::new(vec![0; tree.dirs.len()]));
    let start = Instant::now();
    let (c, t, n) = (client.clone(), tree.clone(), counts.clone());
    pool(tree.dirs.len(), METADATA_WORKERS, move |i| {
        let (c, t, n) = (c.clone(), t.clone(), n.clone());
        async move {
            let path = &t.dirs[i].0;
            let handle = c.opendir(path).await.with_context(|| path_context("opendir", path))?;
            let mut count = 0;
            while let Some(batch) = c.readdir(&handle).await.with_context(|| path_context("readdir", path))? {
                count += batch.iter().filter(|e| e.filename != "." && e.filename != "..").count();
            }
            c.close(&handle).await.with_context(|| path_context("close", path))?;
            lock(&n)[i] = count;
            Ok(())
        }
    })
    .await?;
    let elapsed = start.elapsed();
    for ((path, want), got) in tree.dirs.iter().zip(lock(&counts).iter()) {
        ensure!(got == want, "readdir {}: {got} entries, expected {want}", lossy(path));
    }
    Ok(elapsed)
}

async fn walk(client: &SftpClient, tree: &Arc<Tree>) -> Result<Duration> {
    let start = Instant::now();
    let handle =
        client.dev_walk(&tree.stdlib, 0, 0).await.with_context(|| path_context("walk", &tree.stdlib))?;
    let mut sizes = Vec::new();
    while let Some(batch) =
        client.dev_walk_read(&handle).await.with_context(|| path_context("walk-read", &tree.stdlib))?
    {
        // The walked directory itself comes with an empty path.
        sizes.extend(batch.entries.iter().filter(|e| !e.path.is_empty()).map(|e| e.stat.size));
    }
    client.close(&handle).await.with_context(|| path_context("close", &tree.stdlib))?;
    let elapsed = start.elapsed();
    let total: u64 = sizes.iter().sum();
    let want: u64 = tree.entries.iter().map(|(_, size)| size).sum();
    ensure!(
        sizes.len() == tree.entries.len() && total == want,
        "walk {}: {} entries of {total} bytes, expected {} of {want}",
        lossy(&tree.stdlib),
        sizes.len(),
        tree.entries.len()
    );
    Ok(elapsed)
}

async fn read_big(client: &SftpClient, tree: &Arc<Tree>) -> Result<Duration> {
    let chunk = client.info().read_len() as usize;
    let size = tree.big_content.len();
    let chunks = size.div_ceil(chunk);
    let pieces = Arc::new(Mutex::new(vec![Bytes::new(); chunks]));
    let start = Instant::now();
    let handle = client
        .open(&tree.big, open_flags::READ, &Attrs::default())
        .await
        .with_context(|| path_context("open", &tree.big))?;
    let (c, h, p) = (client.clone(), handle.clone(), pieces.clone());
    let read = pool(chunks, READ_WORKERS, move |i| {
        let (c, h, p) = (c.clone(), h.clone(), p.clone());
        async move {
            let offset = i * chunk;
            let want = chunk.min(size - offset);
            let mut data = c.read(&h, offset as u64, want as u32).await?;
            // A server may answer short; the rest is asked for until the file ends.
            while data.len() < want {
                let more = c.read(&h, (offset + data.len()) as u64, (want - data.len()) as u32).await?;
                ensure!(!more.is_empty(), "the file ended at {} of {size}", offset + data.len());
                data = [data, more].concat().into();
            }
            lock(&p)[i] = data;
            Ok(())
        }
    })
    .await;
    let closed = client.close(&handle).await;
    let elapsed = start.elapsed();
    read.with_context(|| path_context("read", &tree.big))?;
    closed.with_context(|| path_context("close", &tree.big))?;
    let pieces = lock(&pieces);
    ensure!(pieces.concat() == tree.big_content, "{} read back different bytes", lossy(&tree.big));
    Ok(elapsed)
}

async fn read_small(client: &SftpClient, tree: &Arc<Tree>) -> Result<Duration> {
    let contents = Arc::new(Mutex::new(vec![Bytes::new(); tree.small.len()]));
    let start = Instant::now();
    let (c, t, out) = (client.clone(), tree.clone(), contents.clone());
    pool(tree.small.len(), FILE_WORKERS, move |i| {
        let (c, t, out) = (c.clone(), t.clone(), out.clone());
        async move {
            let path = &t.small[i].0;
            let data = c.read_file(path).await.with_context(|| path_context("read", path))?;
            lock(&out)[i] = data;
            Ok(())
        }
    })
    .await?;
    let elapsed = start.elapsed();
    for ((path, want), got) in tree.small.iter().zip(lock(&contents).iter()) {
        ensure!(got == want, "{} read back different bytes", lossy(path));
    }
    Ok(elapsed)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Workers only store results under this lock; a poisoned one still holds them.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lossy(path: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(path)
}

fn path_context(op: &str, path: &[u8]) -> String {
    format!("{op} {}", lossy(path))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// A number with thousands separators, or one decimal below 100.
fn human(x: f64) -> String {
    if x < 100.0 {
        return format!("{x:.1}");
    }
    count(x.round() as u64)
}

/// A count with thousands separators.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> =
        digits.as_bytes().rchunks(3).rev().map(|g| std::str::from_utf8(g).unwrap_or_default()).collect();
    groups.join(",")
}

/// The measured median of one workload on one target.
struct Measure {
    rate: f64,
    millis: f64,
}

fn current_user() -> Result<String> {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid).context("looking up the current user")?;
    Ok(user.map_or_else(|| uid.to_string(), |u| u.name))
}

async fn connect_all(args: &Args) -> Result<Vec<Target>> {
    let mut targets = Vec::new();
    if let (Some(key), Some(dm), Some(dm_key), Some(os), Some(os_key)) =
        (&args.key, args.devmount, &args.devmount_host_key, args.openssh, &args.openssh_host_key)
    {
        let key = Arc::new(load_secret_key(key, None).with_context(|| format!("loading {}", key.display()))?);
        let user = current_user()?;
        targets.push(connect_ssh(Server::Devmount, dm, dm_key, &key, &user).await?);
        targets.push(connect_ssh(Server::OpenSsh, os, os_key, &key, &user).await?);
    }
    targets.push(connect_devmount_stdio(&args.tree).await?);
    targets.push(connect_openssh_stdio(&args.sftp_server).await?);
    Ok(targets)
}

async fn measure(args: &Args, tree: &Arc<Tree>, targets: &[Target]) -> Result<Vec<Vec<Measure>>> {
    for target in targets {
        eprintln!("warm-up: {}", target.name());
        for &workload in &args.workloads {
            timeout(PASS_TIMEOUT, workload.run(&target.client, tree))
                .await
                .with_context(|| format!("{}: {}: timed out", target.name(), workload.describe(tree)))?
                .with_context(|| format!("{}: {}", target.name(), workload.describe(tree)))?;
        }
    }
    // times[target][workload][run]; runs go round the targets so that drift hits them alike.
    let mut times = vec![vec![Vec::new(); args.workloads.len()]; targets.len()];
    for run in 0..args.runs {
        for (t, target) in targets.iter().enumerate() {
            for (w, workload) in args.workloads.iter().enumerate() {
                let elapsed = timeout(PASS_TIMEOUT, workload.run(&target.client, tree))
                    .await
                    .with_context(|| format!("{}: {}: timed out", target.name(), workload.describe(tree)))?
                    .with_context(|| format!("{}: {}", target.name(), workload.describe(tree)))?;
                let (unit, amount) = workload.amount(tree);
                eprintln!(
                    "run {}/{}: {}: {}: {:.1} ms, {} {unit}",
                    run + 1,
                    args.runs,
                    target.name(),
                    workload.describe(tree),
                    elapsed.as_secs_f64() * 1e3,
                    human(amount / elapsed.as_secs_f64())
                );
                times[t][w].push(elapsed.as_secs_f64());
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|per_workload| {
            per_workload
                .into_iter()
                .zip(&args.workloads)
                .map(|(secs, workload)| {
                    let amount = workload.amount(tree).1;
                    Measure {
                        rate: median(secs.iter().map(|s| amount / s).collect()),
                        millis: median(secs) * 1e3,
                    }
                })
                .collect()
        })
        .collect())
}

fn print_report(args: &Args, tree: &Tree, targets: &[Target], results: &[Vec<Measure>]) {
    println!(
        "Tree: a copy of Python's standard library ({} entries in {} directories, {:.0} MiB), \
         one {} MiB file and {} files of {} KiB.",
        count(tree.entries.len() as u64),
        count(tree.dirs.len() as u64),
        tree.total_bytes as f64 / (1 << 20) as f64,
        tree.big_content.len() >> 20,
        tree.small.len(),
        tree.small[0].1.len() >> 10
    );
    for (transport, what) in [
        (Transport::Ssh, "SSH: a russh client (ChaCha20-Poly1305, 8 MiB window, TCP_NODELAY) to devmount-server and to OpenSSH's sshd with its sftp-server subsystem"),
        (Transport::Stdio, "stdio: the SFTP servers alone, without SSH: devmount's subsystem on its own tokio runtime over a Unix socket pair, OpenSSH's sftp-server over pipes"),
    ] {
        if targets.iter().any(|t| t.transport == transport) {
            println!("- {what}.");
        }
    }
    if args.workloads.contains(&Workload::TreeMetadata) {
        println!(
            "- walk@devmount is devmount's bulk metadata read (a subtree's names and full stats in large \
             batches); OpenSSH has nothing like it, so its column there repeats the readdir workload."
        );
    }
    let read_lens: Vec<String> = targets
        .iter()
        .filter(|t| t.transport == Transport::Stdio)
        .map(|t| format!("{} {} KiB", t.server.label(), t.client.info().read_len() >> 10))
        .collect();
    println!(
        "- Client: SftpClient with its defaults (64 requests, 8 MiB in flight); READ length as \
         each server's limits@openssh.com allows: {}. Median of {runs} runs after a warm-up pass; \
         every result is checked against the local files.",
        read_lens.join(", "),
        runs = args.runs
    );
    println!();
    println!("| workload | transport | devmount-server | OpenSSH | devmount / OpenSSH |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for transport in [Transport::Ssh, Transport::Stdio] {
        let find = |server| targets.iter().position(|t| t.transport == transport && t.server == server);
        let (Some(dm), Some(os)) = (find(Server::Devmount), find(Server::OpenSsh)) else { continue };
        for (w, workload) in args.workloads.iter().enumerate() {
            let (unit, _) = workload.amount(tree);
            let cell = |m: &Measure| format!("{} {unit} ({} ms)", human(m.rate), human(m.millis));
            let (a, b) = (&results[dm][w], &results[os][w]);
            println!(
                "| {} | {} | {} | {} | {:.2} |",
                workload.describe(tree),
                transport.label(),
                cell(a),
                cell(b),
                a.rate / b.rate
            );
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let tree = Arc::new(Tree::load(&args.tree)?);
    let targets = connect_all(&args).await?;
    let results = measure(&args, &tree, &targets).await?;
    print_report(&args, &tree, &targets, &results);
    for target in targets {
        target.close().await?;
    }
    Ok(())
}
