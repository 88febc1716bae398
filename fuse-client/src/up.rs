//! `devmount up` and `devmount init`: a session's settings from its flags and its manifest
//! (flags win), the checks that need no daemon, and the progress of the start on a terminal.
//! The session itself is [`crate::mount::run`]'s daemon.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cache::CacheConfig;
use crate::forward::{Direction, ForwardSpec};
use crate::journal::Config as JournalConfig;
use crate::kube::state::SessionFiles as KubeFiles;
use crate::kube::swap::RestoreOptions;
use crate::kube::{translate, upload, KubeEndpoint};
use crate::local_server::StartOptions;
use crate::manifest::{self, okteto, KubernetesTarget, Manifest, ManifestTarget};
use crate::mount::{self, Endpoint, MountArgs, Progress};
use crate::sessions::Selector;

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
    /// The session's name, for `devmount ssh-config` and `devmount proxy NAME` (default: the
    /// manifest's `name`, else the served directory's name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Serve in this process instead of a background daemon.
    #[arg(long)]
    pub foreground: bool,
    /// The devmount-server binary (default: the one next to devmount; for a kubernetes
    /// target, the static one scripts/build-static-server builds).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// The kubeconfig context (default: the manifest's, else the current one).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
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
    let served = match (&args.local, &manifest) {
        (Some(dir), _) => Served::Local(dir.clone()),
        (None, Some(m)) => match &m.target {
            ManifestTarget::Local(dir) => Served::Local(dir.clone()),
            ManifestTarget::Kubernetes(k) => Served::Kube(k.clone()),
        },
        (None, None) => bail!(
            "nothing to serve: give --local DIR, or run where a {} says what to serve (`devmount init` writes one)",
            manifest::FILE_NAME
        ),
    };
    if let (Some(context), Served::Local(_)) = (&args.context, &served) {
        bail!("--context {context} is for a kubernetes target; the target here is a local directory");
    }
    let forwards = forwards(&args, manifest.as_ref())?;
    if let Some(name) = &args.name {
        manifest::check_name(name).map_err(|e| anyhow!("--{e}"))?;
    }

    crate::sessions::reap(&args.mountpoint)?;
    let mountpoint = mount::check_mountpoint(&args.mountpoint)?;
    let allow_forward: Vec<u16> =
        forwards.iter().filter(|f| f.direction == Direction::Local).map(|f| f.connect).collect();
    let allow_reverse: Vec<u16> =
        forwards.iter().filter(|f| f.direction == Direction::Remote).map(|f| f.listen).collect();
    // The flag's name, else the manifest's; a local target without either takes its directory's.
    let named = args.name.clone().or_else(|| manifest.as_ref().map(|m| m.name.clone()));
    let (endpoint, journal_key, what, name) = match served {
        Served::Local(dir) => {
            let dir = served_dir(&dir)?;
            if mountpoint.starts_with(&dir) {
                bail!(
                    "the mount point {} is inside the served directory {}: the server would see its own mount; pick a mount point outside it",
                    mountpoint.display(),
                    dir.display()
                );
            }
            let server = StartOptions {
                server_bin: args.server_bin.clone(),
                allow_forward,
                allow_reverse,
                ..StartOptions::default()
            };
            let key = format!("local:{}", dir.to_string_lossy());
            let what = dir.display().to_string();
            let name = named.unwrap_or_else(|| manifest::default_name(&dir));
            (Endpoint::Local { dir, server }, key, what, name)
        }
        Served::Kube(mut target) => {
            if args.context.is_some() {
                target.context = args.context.clone();
            }
            let what = format!("{}'s dev container", target.workload);
            let server_bin = match (&target.dev.server_image, &args.server_bin) {
                (None, explicit) => Some(upload::find_server(explicit.as_deref())?),
                (Some(image), Some(_)) => bail!(
                    "--server-bin uploads a server, and the manifest's serverImage ({image}) brings its own; drop one of them"
                ),
                (Some(_), None) => None,
            };
            let endpoint = KubeEndpoint {
                target: *target,
                server_bin,
                allow_forward,
                allow_reverse,
                server_dir: std::env::var(SERVER_DIR_ENV)
                    .unwrap_or_else(|_| translate::SERVER_DIR.to_owned()),
            };
            // A kubernetes target comes from a manifest, which has a name.
            let name = named.unwrap_or_default();
            // The daemon names the journal once it has read the Deployment.
            (Endpoint::Kube(Box::new(endpoint)), String::new(), what, name)
        }
    };
    crate::sessions::check_name_free(&name, &mountpoint)?;

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

    let mount_args = MountArgs {
        journal_key,
        endpoint,
        mountpoint: mountpoint.clone(),
        foreground: args.foreground,
        cache,
        journal,
        forwards,
        environment: manifest.map(|m| m.environment).unwrap_or_default(),
        name: Some(name),
    };
    let mut progress = Spinner::new(args.verbose);
    mount::run(mount_args, &mut progress)?;
    if !args.foreground && std::io::stderr().is_terminal() {
        eprintln!(
            "devmount: {} is mounted at {}; `devmount exec CMD` runs commands there, `devmount down` ends it",
            what,
            mountpoint.display()
        );
    }
    Ok(())
}

/// What a session serves.
enum Served {
    Local(PathBuf),
    Kube(Box<KubernetesTarget>),
}

/// Where the server is uploaded to in the pod, instead of the dev Deployment's emptyDir: for
/// a fake API server whose exec runs on this machine (tests/src/kube_api), where `.` is the
/// pod's own directory.
pub const SERVER_DIR_ENV: &str = "DEVMOUNT_KUBE_SERVER_DIR";

/// `devmount down` as given on the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DownArgs {
    /// The mount point (default: the mount holding the current directory, or the only one).
    pub mountpoint: Option<PathBuf>,
    /// Show how long each step takes.
    #[arg(short, long)]
    pub verbose: bool,
    /// Restore the Deployment even if it was changed since the swap (those changes are lost).
    #[arg(long)]
    pub force: bool,
    /// Delete the persistent volume's claim too (the workdir's files with it).
    #[arg(long)]
    pub volumes: bool,
    /// The manifest whose `name` is the session's; without a session here, the manifest whose
    /// kubernetes target to restore (default: ./devmount.yml).
    #[arg(short = 'm', long = "manifest", value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// The kubeconfig context (default: the session's, else the manifest's, else the current).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// `devmount down`: ends the session here, if there is one (its daemon restores the
/// Deployment), then, for a kubernetes target, finishes in the cluster what is left: a restore
/// the daemon refused (with `--force`), the claim (with `--volumes`), or a session started on
/// another machine (from the manifest's target).
pub fn down(args: DownArgs) -> Result<()> {
    let selector = Selector::new(args.mountpoint.clone(), args.manifest.clone())?;
    let state = mount::state_dir()?;
    let local = crate::sessions::find(&selector);
    let recorded = match &local {
        Ok(info) => KubeFiles::for_mountpoint(&state, &info.mountpoint)?,
        Err(_) => None,
    };
    let options = RestoreOptions { force: args.force, volumes: args.volumes };
    let kube_target = || -> Result<Option<Box<KubernetesTarget>>> {
        let manifest = match &args.manifest {
            Some(path) => Some(Manifest::load(path)?),
            None => Manifest::find(&std::env::current_dir().context("cannot read the current directory")?)?,
        };
        Ok(match manifest.map(|m| m.target) {
            Some(ManifestTarget::Kubernetes(mut k)) => {
                if args.context.is_some() {
                    k.context = args.context.clone();
                }
                Some(k)
            }
            _ => None,
        })
    };
    let cluster_part = match (local, recorded) {
        (Ok(info), recorded) => {
            crate::sessions::down(&Selector { mount: Some(info.mountpoint.clone()), manifest: None }, args.verbose)?;
            // The daemon restored and forgot the session unless the restore was refused; the
            // claim is for `--volumes` to delete, with the place recorded before.
            let left = recorded.filter(|(files, _)| options.volumes || files.dir.exists());
            left.map(|left| (Some(left), None))
        }
        (Err(e), _) => match kube_target()? {
            Some(target) => Some((None, Some(target))),
            None => return Err(e),
        },
    };
    let Some((recorded, target)) = cluster_part else { return Ok(()) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let done = runtime.block_on(crate::kube::down(recorded, target.as_deref(), options))?;
    for line in done {
        eprintln!("devmount: {line}");
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

/// `devmount init` as given on the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InitArgs {
    /// Write what the dev container of this okteto manifest maps to, instead of the starter file
    /// (FILE defaults to ./okteto.yml); each okteto field that does not map is named on stderr.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = okteto::DEFAULT_FILE)]
    pub from_okteto: Option<PathBuf>,
    /// The dev container to convert, when the okteto manifest has several.
    #[arg(long, value_name = "NAME", requires = "from_okteto")]
    pub dev: Option<String>,
    /// Replace an existing devmount.yml.
    #[arg(long)]
    pub force: bool,
}

/// `devmount init`: writes `./devmount.yml`, the starter file or an okteto manifest's dev
/// container, never over an existing one without `--force`.
pub fn init(args: InitArgs) -> Result<()> {
    let (text, notes, done) = match &args.from_okteto {
        None => (
            manifest::STARTER.to_owned(),
            Vec::new(),
            format!(
                "wrote {}; it serves ./workspace (create it, or change target.local), then run `devmount up ./mnt`",
                manifest::FILE_NAME
            ),
        ),
        Some(file) => {
            let source = match std::fs::read_to_string(file) {
                Ok(source) => source,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "{} does not exist; give the okteto manifest's path: --from-okteto FILE",
                    file.display()
                ),
                Err(e) => bail!("cannot read {}: {e}", file.display()),
            };
            let converted = okteto::convert(&source, file, args.dev.as_deref())?;
            let done = format!(
                "wrote {} from the dev container {} of {}{}; `devmount render -f DEPLOYMENT.yaml` shows the swap, `devmount up ./mnt` starts the session",
                manifest::FILE_NAME,
                converted.dev,
                file.display(),
                if converted.notes.is_empty() { "" } else { ", less the fields named above" }
            );
            (converted.manifest, converted.notes, done)
        }
    };
    let path = Path::new(manifest::FILE_NAME);
    let mut options = std::fs::OpenOptions::new();
    if args.force {
        options.write(true).create(true).truncate(true);
    } else {
        options.write(true).create_new(true);
    }
    let written = options.open(path).and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    match written {
        Ok(()) => {
            for note in notes {
                eprintln!("devmount: {note}");
            }
            eprintln!("devmount: {done}");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} already exists; edit it, or give --force to replace it", manifest::FILE_NAME)
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
