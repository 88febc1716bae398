//! `devmount`: parse, run, exit code. The work lives in the library's modules.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use devmount::cache::CacheConfig;
use devmount::journal::Config as JournalConfig;
use devmount::kube::render;
use devmount::mount::{self, Endpoint, MountArgs};
use devmount::session::Target;
use devmount::sessions::{self, ExecArgs, Selector};
use devmount::up::{self, DownArgs, InitArgs, Spinner, UpArgs};

/// Develop inside a Kubernetes pod: mount its workdir, run commands in it, forward its ports.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a session: serve a directory with a devmount-server of its own, mount it at MNT, and
    /// forward ports, all over one SSH connection. Settings not given come from ./devmount.yml.
    Up(UpArgs),
    /// Run a command in the session, in the directory matching the current one, once every
    /// change made to the mount is on the server. The words are joined with spaces and run by
    /// the remote user's shell, as ssh does. Exits with the command's code (128 + signal).
    Exec {
        /// The session's mount point (default: the session `-m` names, else the mount holding
        /// the current directory, else the session ./devmount.yml names, else the only one).
        #[arg(long = "mount", value_name = "MNT")]
        mount: Option<PathBuf>,
        #[command(flatten)]
        manifest: ManifestArg,
        #[command(flatten)]
        tty: TtyArgs,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// An interactive login shell in the session, in the directory matching the current one.
    Ssh {
        /// The session's mount point (default: as for exec).
        mountpoint: Option<PathBuf>,
        #[command(flatten)]
        manifest: ManifestArg,
        #[command(flatten)]
        tty: TtyArgs,
    },
    /// Wait until every change made to the mount so far is on the server, and the mount shows
    /// every change the pod made so far.
    Sync {
        /// The mount point (default: as for exec).
        mountpoint: Option<PathBuf>,
        #[command(flatten)]
        manifest: ManifestArg,
    },
    /// Each session (or the one -m names): mount, target, connection, pending changes, caches,
    /// forwards, and the local server's exits.
    Status {
        #[command(flatten)]
        manifest: ManifestArg,
    },
    /// End a session: send the pending changes, unmount, stop its forwards and server, and on
    /// a kubernetes target restore the Deployment (from any machine: it reads the cluster).
    /// Also cleans up after a session whose daemon died.
    Down(DownArgs),
    /// Print an OpenSSH `Host devmount-NAME` block for the session, so that ssh, scp, sftp and
    /// IDE remote plugins reach its server over the session's connection:
    /// `devmount ssh-config >> ~/.ssh/config`, or `ssh -F <(devmount ssh-config) devmount-NAME`.
    SshConfig {
        /// The mount point (default: as for exec).
        mountpoint: Option<PathBuf>,
        #[command(flatten)]
        manifest: ManifestArg,
    },
    /// Carry stdin and stdout to the SSH server of the session named NAME, over the session's
    /// connection: the `ProxyCommand` of `devmount ssh-config`'s block.
    Proxy {
        /// The session's name, as `devmount status` shows it.
        name: String,
    },
    /// Write a commented devmount.yml in the current directory, or, with --from-okteto, the one
    /// an okteto manifest's dev container maps to.
    Init(InitArgs),
    /// Print, offline, what a session on the Deployment in FILE applies: the dev Deployment, the
    /// persistent volume's claim and the Secret (its values as placeholders), with the
    /// kubernetes settings of ./devmount.yml or -m.
    Render {
        /// The Deployment's YAML, e.g. from `kubectl get deployment NAME -o yaml`.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// The manifest (default: ./devmount.yml, if there is one).
        #[arg(short = 'm', long = "manifest", value_name = "FILE")]
        manifest: Option<PathBuf>,
    },
    /// Mount a directory of an SSH server (devmount-server, or any OpenSSH server) at MNT.
    Mount {
        /// ssh://USER@HOST:PORT/PATH
        target: OsString,
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
}

/// `-t`/`-T`: whether the remote side gets a terminal.
#[derive(clap::Args, Debug)]
struct TtyArgs {
    /// Give it a terminal (default: when stdin is one).
    #[arg(short = 't', conflicts_with = "no_tty")]
    tty: bool,
    /// Never give it a terminal.
    #[arg(short = 'T')]
    no_tty: bool,
}

impl TtyArgs {
    /// `None`: as stdin is.
    fn choice(&self) -> Option<bool> {
        match (self.tty, self.no_tty) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

/// `-m FILE`: the session is the one the manifest names.
#[derive(clap::Args, Debug)]
struct ManifestArg {
    /// The manifest whose `name` is the session's (default: ./devmount.yml, when the current
    /// directory is not in a mount).
    #[arg(short = 'm', long = "manifest", value_name = "FILE")]
    manifest: Option<PathBuf>,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors are devmount's own failures too: 255, never a code a command could give.
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(255);
        }
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("devmount: {e:#}");
            // As ssh does: the tool's own failures are 255, so they stand apart from a remote
            // command's exit codes.
            ExitCode::from(255)
        }
    }
}

/// Runs the command; the exit code on success (a remote command's own).
fn run(cli: Cli) -> anyhow::Result<u8> {
    let select = |mount: Option<PathBuf>, manifest: ManifestArg| Selector::new(mount, manifest.manifest);
    match cli.command {
        Command::Up(args) => up::run(args).map(|()| 0),
        Command::Exec { mount, manifest, tty, command } => sessions::exec(ExecArgs {
            selector: select(mount, manifest)?,
            tty: tty.choice(),
            command: Some(command),
        }),
        Command::Ssh { mountpoint, manifest, tty } => sessions::exec(ExecArgs {
            selector: select(mountpoint, manifest)?,
            tty: tty.choice(),
            command: None,
        }),
        Command::Sync { mountpoint, manifest } => sessions::sync(&select(mountpoint, manifest)?).map(|()| 0),
        Command::Status { manifest } => sessions::status(&select(None, manifest)?).map(|()| 0),
        Command::Down(args) => up::down(args).map(|()| 0),
        Command::SshConfig { mountpoint, manifest } => {
            sessions::ssh_config(&select(mountpoint, manifest)?).map(|()| 0)
        }
        Command::Proxy { name } => sessions::proxy(&name).map(|()| 0),
        Command::Init(args) => up::init(args).map(|()| 0),
        Command::Render { file, manifest } => render::run(&file, manifest.as_deref()).map(|()| 0),
        Command::Mount {
            target,
            mountpoint,
            identity,
            known_hosts,
            foreground,
            timeout,
            data_cache,
            journal_max,
        } => {
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
            up::check_journal_max(journal_max)?;
            let journal = JournalConfig { max_bytes: journal_max, ..JournalConfig::default() };
            let args = MountArgs {
                journal_key: String::from_utf8_lossy(&target.key()).into_owned(),
                endpoint: Endpoint::Ssh { target, identity, known_hosts },
                mountpoint,
                foreground,
                cache,
                journal,
                forwards: Vec::new(),
                environment: Vec::new(),
                name: None,
            };
            mount::run(args, &mut Spinner::new(false)).map(|()| 0)
        }
    }
}
