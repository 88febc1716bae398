//! `devmount`: parse, run, exit code. The work lives in the library's modules.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use devmount::cache::CacheConfig;
use devmount::journal::Config as JournalConfig;
use devmount::mount::{self, MountArgs};
use devmount::session::Target;

/// Develop inside a Kubernetes pod: mount its workdir, run commands in it, forward its ports.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount a directory of an SSH server (devmount-server, or any OpenSSH server) at MNT.
    Mount {
        /// ssh://USER@HOST:PORT/PATH
        target: std::ffi::OsString,
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// The private key to authenticate with (OpenSSH format, not encrypted).
        #[arg(long, value_name = "KEYFILE")]
        identity: PathBuf,
        /// The known_hosts file that must hold the server's host key.
        #[arg(long, value_name = "FILE")]
        known_hosts: PathBuf,
        /// Serve in this process instead of a background daemon.
        #[arg(long)]
        foreground: bool,
        /// How long attributes and listings are trusted where no change feed vouches for them.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        timeout: f64,
        /// Bytes of file contents to cache.
        #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
        data_cache: usize,
        /// Bytes of changes the local journal holds before writers wait for the server.
        #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
        journal_max: u64,
    },
    /// Wait until every change made to the mount so far is on the server.
    Sync {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVMOUNT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devmount: {e:#}");
            // As ssh does: the tool's own failures are 255, so they stand apart from a remote
            // command's exit codes.
            ExitCode::from(255)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount { target, mountpoint, identity, known_hosts, foreground, timeout, data_cache, journal_max } => {
            let user = mount::local_user();
            let target = Target::parse(&target, &user.to_string_lossy())?;
            if !(timeout.is_finite() && timeout > 0.0) {
                anyhow::bail!("--timeout {timeout}: give a positive number of seconds, e.g. --timeout 1");
            }
            let cache = CacheConfig {
                short_ttl: std::time::Duration::from_secs_f64(timeout),
                data_bytes: data_cache,
                ..CacheConfig::default()
            };
            if journal_max < 1 << 20 {
                anyhow::bail!("--journal-max {journal_max}: give at least 1 MiB, e.g. --journal-max 1073741824");
            }
            let journal = JournalConfig { max_bytes: journal_max, ..JournalConfig::default() };
            mount::run(MountArgs { target, mountpoint, identity, known_hosts, foreground, cache, journal })
        }
        Command::Sync { mountpoint } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(devmount::control::request(&mountpoint, "sync"))?;
            Ok(())
        }
    }
}
