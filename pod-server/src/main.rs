//! `devmount-server`: parse the command line, load keys, serve until SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::signal::Signal;
use devmount_server::feed::{Feed, FeedOptions};
use devmount_server::forward::AllowList;
use devmount_server::reaper::Reaper;
use devmount_server::{keys, ssh};
use russh::server::Server as _;
use tokio::signal::unix::{signal, SignalKind};

/// The pod-side server of devmount: SSH with SFTP, exec, port forwarding and a change feed.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The directory served: SFTP paths must start with it, exec runs in it, the feed watches it.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Address to listen on; port 0 picks a free port. Use a loopback address: clients come
    /// through an SSH-aware tunnel (the Kubernetes port-forward), never the network.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// OpenSSH private host key file; generated (ed25519, mode 0600) if it does not exist.
    #[arg(long, value_name = "FILE", conflicts_with = "host_key_env", required_unless_present = "host_key_env")]
    host_key: Option<PathBuf>,
    /// Environment variable holding the OpenSSH private host key; removed before any child starts.
    #[arg(long, value_name = "VAR")]
    host_key_env: Option<String>,
    /// OpenSSH authorized_keys file; read on every authentication attempt.
    #[arg(long, value_name = "FILE")]
    authorized_keys: PathBuf,
    /// A port on the pod's 127.0.0.1 that clients may reach with direct-tcpip (ssh -L). Repeatable.
    #[arg(long = "allow-forward", value_name = "PORT")]
    allow_forward: Vec<u16>,
    /// A port that clients may bind on the pod's 127.0.0.1 with tcpip-forward (ssh -R). Repeatable.
    #[arg(long = "allow-reverse", value_name = "PORT")]
    allow_reverse: Vec<u16>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVMOUNT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devmount-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // The key comes first, while the process is still single-threaded: reading it from the
    // environment removes the variable, which is only sound before threads exist.
    let host_key = match (&args.host_key, &args.host_key_env) {
        (Some(file), None) => keys::host_key_from_file(file)?,
        (None, Some(var)) => keys::host_key_from_env(var)?,
        _ => bail!("give exactly one of --host-key FILE or --host-key-env VAR"),
    };
    let root = std::fs::canonicalize(&args.root)
        .with_context(|| format!("--root {}: cannot resolve it; create the directory first", args.root.display()))?;
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    std::fs::metadata(&args.authorized_keys).with_context(|| {
        format!("--authorized-keys {}: cannot read it", args.authorized_keys.display())
    })?;
    let allow = AllowList {
        forward: args.allow_forward.iter().copied().collect(),
        reverse: args.allow_reverse.iter().copied().collect(),
        own: None,
    };
    // Each SFTP connection runs its quick metadata requests on at most two blocking threads,
    // and each request that may block for long (a read of a FIFO can block for good) on one of
    // its own, up to `Limits::max_in_flight` of them; leave room for several connections.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(2048)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(root, args.listen, host_key, args.authorized_keys, allow))
}

async fn serve(
    root: PathBuf,
    listen: SocketAddr,
    host_key: russh::keys::PrivateKey,
    authorized_keys: PathBuf,
    mut allow: AllowList,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let reaper = Reaper::start()?;
    let feed = Feed::start(root.clone(), FeedOptions::default())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; pick another port or use port 0"))?;
    let local = listener.local_addr()?;
    // Its own SSH port may always be reached with direct-tcpip (see `AllowList::own`).
    if local.ip().is_loopback() || local.ip().is_unspecified() {
        allow.own = Some(local);
    }
    let fingerprint = keys::fingerprint(host_key.public_key());
    let config = Arc::new(ssh::config(host_key));
    let mut server = ssh::Server(ssh::Shared::new(root, authorized_keys, allow, feed, reaper.clone()));
    let running = server.run_on_socket(config, &listener);
    let handle = running.handle();
    // Callers parse these two lines to find the port and pin the key.
    println!("listening on {local}");
    println!("host key {fingerprint}");
    tracing::info!("listening on {local}, host key {fingerprint}");
    tokio::select! {
        result = running => result.context("the listener failed")?,
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    handle.shutdown("server shutting down".into());
    // Commands still running get SIGHUP, as a closed terminal would send them, then SIGKILL
    // if they outlive a grace period.
    reaper.kill_all(Signal::SIGHUP);
    reaper.kill_all(Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(5), reaper.wait_all_exited()).await.is_err() {
        reaper.kill_all(Signal::SIGKILL);
    }
    Ok(())
}
