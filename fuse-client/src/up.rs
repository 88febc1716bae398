//! `devmount up` and `devmount init`: a session's settings from its flags and its manifest
//! (flags win), the checks that need no daemon, and the progress of the start on a terminal.
//! The session itself is [`crate::mount::run`]'s daemon.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cache::CacheConfig;
use crate::forward::{Direction, ForwardSpec};
use crate::journal::Config as JournalConfig;
use crate::local_server::StartOptions;
use crate::manifest::{self, Manifest, ManifestTarget};
use crate::mount::{self, Endpoint, MountArgs, Progress};

/// The smallest `--journal-max`.
pub const MIN_JOURNAL: u64 = 1 << 20;

/// `devmount up` as given on the command line; `None` leaves the manifest's setting.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpArgs {
    /// An existing directory outside the served one.
    pub mountpoint: PathBuf,
    /// The directory to serve (default: the manifest's `target.local`).
    #[arg(long, value_name = "DIR")]
    pub local: Option<PathBuf>,
    /// Listen on 127.0.0.1:LOCAL here and connect to the server's 127.0.0.1:REMOTE; replaces
    /// the manifest's `forward`.
    #[arg(short = 'L', value_name = "LOCAL:REMOTE")]
    pub forward: Vec<String>,
    /// Listen on the server's 127.0.0.1:REMOTE and connect to 127.0.0.1:LOCAL here; replaces
    /// the manifest's `reverse`.
    #[arg(short = 'R', value_name = "REMOTE:LOCAL")]
    pub reverse: Vec<String>,
    /// The manifest (default: ./devmount.yml, if there is one).
    #[arg(short = 'm', long = "manifest", value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Serve in this process instead of a background daemon.
    #[arg(long)]
    pub foreground: bool,
    /// The devmount-server binary (default: the one next to devmount).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Show how long each step of the start takes.
    #[arg(short, long)]
    pub verbose: bool,
    /// How long attributes and listings are trusted where no change feed vouches for them.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Bytes of file contents to cache.
    #[arg(long, value_name = "BYTES")]
    pub data_cache: Option<usize>,
    /// Bytes of changes the local journal holds before writers wait for the server.
    #[arg(long, value_name = "BYTES")]
    pub journal_max: Option<u64>,
}

/// Runs `devmount up`: returns once the mount is ready (in the foreground, once it is gone).
pub fn run(args: UpArgs) -> Result<()> {
    let manifest = match &args.manifest {
        Some(path) => Some(Manifest::load(path)?),
        None => Manifest::find(&std::env::current_dir().context("cannot read the current directory")?)?,
    };
    let dir = match (&args.local, &manifest) {
        (Some(dir), _) => dir.clone(),
        (None, Some(m)) => match &m.target {
            ManifestTarget::Local(dir) => dir.clone(),
            ManifestTarget::Kubernetes(_) => bail!(
                "{}: `devmount up` on a kubernetes target comes with a later version of devmount; `devmount render -f DEPLOYMENT.yaml` shows the dev Deployment it will apply",
                m.path.display()
            ),
        },
        (None, None) => bail!(
            "nothing to serve: give --local DIR, or run where a {} says what to serve (`devmount init` writes one)",
            manifest::FILE_NAME
        ),
    };
    let dir = served_dir(&dir)?;
    let forwards = forwards(&args, manifest.as_ref())?;

    crate::sessions::reap(&args.mountpoint)?;
    let mountpoint = mount::check_mountpoint(&args.mountpoint)?;
    if mountpoint.starts_with(&dir) {
        bail!(
            "the mount point {} is inside the served directory {}: the server would see its own mount; pick a mount point outside it",
            mountpoint.display(),
            dir.display()
        );
    }

    let settings = manifest.as_ref().map(|m| m.cache).unwrap_or_default();
    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            bail!("--timeout {t}: give a positive number of seconds, e.g. --timeout 1")
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => settings.timeout,
    };
    let mut cache = CacheConfig::default();
    if let Some(t) = timeout {
        cache.short_ttl = t;
    }
    if let Some(bytes) = args.data_cache.or(settings.data) {
        cache.data_bytes = bytes;
    }
    let mut journal = JournalConfig::default();
    if let Some(bytes) = args.journal_max {
        check_journal_max(bytes)?;
        journal.max_bytes = bytes;
    } else if let Some(bytes) = settings.journal {
        journal.max_bytes = bytes;
    }

    let server = StartOptions {
        server_bin: args.server_bin.clone(),
        allow_forward: forwards
            .iter()
            .filter(|f| f.direction == Direction::Local)
            .map(|f| f.connect)
            .collect(),
        allow_reverse: forwards
            .iter()
            .filter(|f| f.direction == Direction::Remote)
            .map(|f| f.listen)
            .collect(),
        ..StartOptions::default()
    };
    let mount_args = MountArgs {
        journal_key: format!("local:{}", dir.to_string_lossy()),
        endpoint: Endpoint::Local { dir: dir.clone(), server },
        mountpoint: mountpoint.clone(),
        foreground: args.foreground,
        cache,
        journal,
        forwards,
        environment: manifest.as_ref().map(|m| m.environment.clone()).unwrap_or_default(),
        name: manifest.map(|m| m.name),
    };
    let mut progress = Spinner::new(args.verbose);
    mount::run(mount_args, &mut progress)?;
    if !args.foreground && std::io::stderr().is_terminal() {
        eprintln!(
            "devmount: {} is mounted at {}; `devmount exec CMD` runs commands there, `devmount down` ends it",
            dir.display(),
            mountpoint.display()
        );
    }
    Ok(())
}

/// `--journal-max` must leave room for at least one big write.
pub fn check_journal_max(bytes: u64) -> Result<()> {
    if bytes < MIN_JOURNAL {
        bail!("--journal-max {bytes}: give at least 1 MiB, e.g. --journal-max 1073741824");
    }
    Ok(())
}

/// The canonical form of the directory to serve, checked to be one.
fn served_dir(dir: &Path) -> Result<PathBuf> {
    let canonical = match std::fs::canonicalize(dir) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the directory to serve, {}, does not exist; create it first", dir.display())
        }
        Err(e) => bail!("the directory to serve, {}: {e}", dir.display()),
    };
    if !canonical.is_dir() {
        bail!("the directory to serve, {}, is not a directory", dir.display());
    }
    Ok(canonical)
}

/// The flags' forwards, else the manifest's.
fn forwards(args: &UpArgs, manifest: Option<&Manifest>) -> Result<Vec<ForwardSpec>> {
    let mut specs = Vec::new();
    if args.forward.is_empty() {
        let from_manifest = manifest.map(|m| m.forward.as_slice()).unwrap_or_default();
        specs.extend(from_manifest.iter().map(|f| ForwardSpec {
            direction: Direction::Local,
            listen: f.local,
            connect: f.remote,
        }));
    } else {
        for text in &args.forward {
            specs.push(ForwardSpec::parse(Direction::Local, text)?);
        }
    }
    if args.reverse.is_empty() {
        let from_manifest = manifest.map(|m| m.reverse.as_slice()).unwrap_or_default();
        specs.extend(from_manifest.iter().map(|f| ForwardSpec {
            direction: Direction::Remote,
            listen: f.remote,
            connect: f.local,
        }));
    } else {
        for text in &args.reverse {
            specs.push(ForwardSpec::parse(Direction::Remote, text)?);
        }
    }
    Ok(specs)
}

/// `devmount init`: writes the starter manifest to `./devmount.yml`, never over an existing one.
pub fn init() -> Result<()> {
    let path = Path::new(manifest::FILE_NAME);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, manifest::STARTER.as_bytes()));
    match written {
        Ok(()) => {
            eprintln!(
                "devmount: wrote {}; it serves ./workspace (create it, or change target.local), then run `devmount up ./mnt`",
                manifest::FILE_NAME
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} already exists; edit it, or remove it to start again", manifest::FILE_NAME)
        }
        Err(e) => Err(e).with_context(|| format!("cannot write {}", manifest::FILE_NAME)),
    }
}

/// Steps with a spinner on a terminal, nothing otherwise; with `verbose`, each step's time.
pub struct Spinner {
    terminal: bool,
    verbose: bool,
    /// Made at the first step, not before: its ticker is a thread, and the daemon is forked
    /// from a process that has none.
    bar: Option<ProgressBar>,
    current: Option<(String, Instant)>,
    started: Option<Instant>,
}

impl Spinner {
    pub fn new(verbose: bool) -> Spinner {
        Spinner {
            terminal: std::io::stderr().is_terminal(),
            verbose,
            bar: None,
            current: None,
            started: None,
        }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn end_step(&mut self) {
        if let Some((what, since)) = self.current.take() {
            if self.verbose {
                self.print(&format!("devmount: {what}: {:.0} ms", since.elapsed().as_secs_f64() * 1000.0));
            }
        }
    }
}

impl Progress for Spinner {
    fn step(&mut self, what: &str) {
        self.end_step();
        self.started.get_or_insert_with(Instant::now);
        if self.terminal {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                    bar.set_style(style);
                }
                bar.enable_steady_tick(Duration::from_millis(100));
                bar
            });
            bar.set_message(what.to_owned());
        }
        self.current = Some((what.to_owned(), Instant::now()));
    }

    fn note(&mut self, text: &str) {
        self.print(&format!("devmount: {text}"));
    }

    fn finish(&mut self) {
        self.end_step();
        if let (true, Some(started)) = (self.verbose, self.started) {
            self.print(&format!("devmount: in all: {:.0} ms", started.elapsed().as_secs_f64() * 1000.0));
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
