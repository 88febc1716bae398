//! `devmount.yml`: a session's settings (name, target, port forwards, environment, cache sizes),
//! so that `devmount up ./mnt` alone works. [`Manifest::parse`] does no I/O; [`Manifest::load`]
//! and [`Manifest::find`] read the file. docs/manifest.md documents every field.
//!
//! Every mistake is an error that names the file, the line and the column, and what to write
//! instead: an unknown key is never ignored, because a misspelt `forwards:` that is silently
//! dropped looks exactly like a forward that does not work.
//!
//! The YAML is read with `saphyr`: it is maintained (serde_yaml is archived, serde_yml unsound),
//! YAML 1.2 (so `8080:8080` is text, not a base-60 number), gives every node, keys included,
//! its line and column, refuses duplicate keys and bounds alias expansion. Scalars are kept as
//! written (no early typing): `VERSION: 1.10` stays "1.10", and each field decides how to read
//! its text.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};

pub mod okteto;

/// The manifest's file name, looked for in the current directory.
pub const FILE_NAME: &str = "devmount.yml";

/// What `devmount init` writes: valid as it is (it serves `./workspace`). Commented examples
/// start with `#` directly followed by the key, so removing that `#` gives a valid line.
pub const STARTER: &str = r#"# devmount.yml: the settings of `devmount up MNT` run in this directory.
# Every field is described in devmount's docs/manifest.md.

# The session's name, shown by `devmount status` and used by `devmount ssh-config`.
# Default: the name of the directory holding this file.
#name: myproject

# Where the files live: `local` serves a directory of this machine (relative to this file)
# through a devmount-server started for the session. It must not contain the mount point.
# `kubernetes: {deployment: NAME}` instead targets a container of a Deployment (see
# docs/kubernetes.md): `devmount render` shows the swap, `devmount up` makes it for the session.
target:
  local: workspace

# Ports of the target reachable on this machine's 127.0.0.1, as LOCAL:REMOTE (like `-L`).
#forward: ["8080:8080"]

# Ports of this machine reachable on the target's 127.0.0.1, as REMOTE:LOCAL (like `-R`).
#reverse: ["9000:9000"]

# Environment variables of `devmount exec` and `devmount ssh`.
#environment: {RUST_LOG: debug}

# Cache sizes: file contents kept in memory (`--data-cache`), seconds attributes are trusted
# without the change feed (`--timeout`), changes held locally before writers wait for the
# server (`--journal-max`).
#cache: {data: 256MiB, timeout: 1, journal: 1GiB}
"#;

const TOP_KEYS: &[&str] = &["name", "target", "forward", "reverse", "environment", "cache"];
const TARGET_KEYS: &[&str] = &["local", "kubernetes"];
const CACHE_KEYS: &[&str] = &["data", "timeout", "journal"];
const KUBERNETES_KEYS: &[&str] = &[
    "namespace",
    "deployment",
    "selector",
    "container",
    "image",
    "command",
    "workdir",
    "environment",
    "resources",
    "securityContext",
    "persistentVolume",
    "volumes",
    "serverImage",
    "timeout",
    "context",
];
const RESOURCES_KEYS: &[&str] = &["requests", "limits"];
const SECURITY_KEYS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "fsGroup",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
];
const CAPABILITIES_KEYS: &[&str] = &["add", "drop"];
const VOLUME_KEYS: &[&str] = &["enabled", "size", "storageClass", "accessMode"];
/// The access modes a writable volume can have.
const ACCESS_MODES: &[&str] = &["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"];

/// How long `devmount up` waits for the dev pod when `timeout` is not given: long enough for a
/// first pull of a large image.
pub const DEFAULT_KUBE_TIMEOUT: Duration = Duration::from_secs(300);
/// The persistent volume's size when `persistentVolume.size` is not given.
pub const DEFAULT_VOLUME_SIZE: &str = "5Gi";
/// The persistent volume's access mode when `persistentVolume.accessMode` is not given.
pub const DEFAULT_ACCESS_MODE: &str = "ReadWriteOnce";

/// The smallest journal, as `--journal-max` requires.
const MIN_JOURNAL: u64 = 1 << 20;
/// Session names are used in file names, `Host` blocks and `devmount proxy NAME`.
const MAX_NAME_LEN: usize = 64;

/// A loaded `devmount.yml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The file it was read from, as given.
    pub path: PathBuf,
    /// Letters, digits, `.`, `_` and `-`, starting with a letter or digit; at most 64 bytes.
    pub name: String,
    pub target: ManifestTarget,
    /// `-L`: local port -> the target's port.
    pub forward: Vec<PortForward>,
    /// `-R`: the target's port -> local port.
    pub reverse: Vec<PortForward>,
    /// For exec and shells, in the file's order.
    pub environment: Vec<(String, String)>,
    pub cache: CacheSettings,
}

/// Where the session's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestTarget {
    /// A directory of this machine, served by a local devmount-server: absolute (a relative
    /// path is taken from the manifest's directory), not resolved (it may not exist yet).
    Local(PathBuf),
    /// A container of a Deployment in a cluster, swapped for a dev container.
    Kubernetes(Box<KubernetesTarget>),
}

/// `target.kubernetes`: which Deployment to develop in, and how its dev container differs from
/// the container it replaces. The values are checked for form only: whether they fit the
/// Deployment is decided when it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesTarget {
    /// `None`: the kubeconfig context's namespace.
    pub namespace: Option<String>,
    pub workload: Workload,
    /// The kubeconfig context; `None`: the current one.
    pub context: Option<String>,
    /// How long `devmount up` waits for the dev pod.
    pub timeout: Duration,
    pub dev: DevSettings,
}

/// How the Deployment is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// By name.
    Deployment(String),
    /// The one Deployment whose labels include all of these, in the file's order.
    Selector(Vec<(String, String)>),
}

impl Workload {
    /// Whether a Deployment called `name` with these `labels` is the one meant.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Workload::Deployment(wanted) => wanted == name,
            Workload::Selector(pairs) => pairs.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

impl fmt::Display for Workload {
    /// As `kubectl` takes it: `deployment/NAME`, or the selector `k=v,k2=v2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Deployment(name) => write!(f, "deployment/{name}"),
            Workload::Selector(pairs) => {
                let pairs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "{}", pairs.join(","))
            }
        }
    }
}

/// How the dev container differs from the container it replaces; what the Kubernetes
/// translation reads. The default is what a manifest without these fields means.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DevSettings {
    /// `None`: the pod's first container.
    pub container: Option<String>,
    /// `None`: the container's own image.
    pub image: Option<String>,
    /// A shell command line run beside devmount-server (a list in the manifest is quoted into
    /// one).
    pub command: Option<String>,
    /// An absolute path without `.`, `..` or empty components; `None`: the container's
    /// workingDir, else `/work`.
    pub workdir: Option<String>,
    /// Set on the dev container, replacing variables of the same name; in the file's order.
    pub environment: Vec<(String, String)>,
    pub resources: ResourceOverrides,
    pub security_context: SecurityOverrides,
    pub persistent_volume: PersistentVolume,
    /// Paths in the pod kept on the persistent volume, in the form of `workdir`; only with the
    /// persistent volume enabled.
    pub volumes: Vec<String>,
    /// An image holding `/devmount-server` and `cp`, copied by an init container instead of
    /// uploading the server.
    pub server_image: Option<String>,
}

impl DevSettings {
    /// The key and the reason, when two settings cannot go together.
    pub fn conflict(&self) -> Option<(&'static str, &'static str)> {
        if !self.volumes.is_empty() && !self.persistent_volume.enabled {
            return Some((
                "volumes",
                "kubernetes.volumes live on the persistent volume, which is off; remove them or enable persistentVolume",
            ));
        }
        if self.command.is_some() && self.server_image.is_some() {
            return Some((
                "command",
                "kubernetes.command runs under the image's sh, and serverImage is for images without one; drop one of them",
            ));
        }
        None
    }
}

/// Resource requests and limits, each replacing the container's value for that resource name.
/// Quantities are checked for Kubernetes' form (`500m`, `2Gi`, `1e3`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceOverrides {
    pub requests: Vec<(String, String)>,
    pub limits: Vec<(String, String)>,
}

/// Fields of the container's securityContext (`fs_group`: of the pod's) that the dev container
/// sets; `None` keeps the container's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecurityOverrides {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    pub fs_group: Option<i64>,
    pub privileged: Option<bool>,
    pub allow_privilege_escalation: Option<bool>,
    pub read_only_root_filesystem: Option<bool>,
    /// Replaces the container's `capabilities.add` list.
    pub capabilities_add: Option<Vec<String>>,
    /// Replaces the container's `capabilities.drop` list.
    pub capabilities_drop: Option<Vec<String>>,
}

/// `persistentVolume`: the claim that keeps the workdir (and `volumes`) across pod restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentVolume {
    pub enabled: bool,
    /// A Kubernetes quantity, e.g. `5Gi`.
    pub size: String,
    /// `None`: the cluster's default storage class.
    pub storage_class: Option<String>,
    /// One of ReadWriteOnce, ReadWriteOncePod, ReadWriteMany.
    pub access_mode: String,
}

impl Default for PersistentVolume {
    fn default() -> PersistentVolume {
        PersistentVolume {
            enabled: true,
            size: DEFAULT_VOLUME_SIZE.into(),
            storage_class: None,
            access_mode: DEFAULT_ACCESS_MODE.into(),
        }
    }
}

/// One port forward. For `forward` (`-L`) connections to `local` on this machine reach `remote`
/// on the target; for `reverse` (`-R`) connections to `remote` on the target reach `local` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub local: u16,
    pub remote: u16,
}

impl PortForward {
    /// Parses `LOCAL:REMOTE`, as `-L` and `forward:` take it.
    pub fn parse_forward(spec: &str) -> Result<PortForward, String> {
        let (local, remote) = two_ports(spec, "LOCAL:REMOTE")?;
        Ok(PortForward { local, remote })
    }

    /// Parses `REMOTE:LOCAL`, as `-R` and `reverse:` take it.
    pub fn parse_reverse(spec: &str) -> Result<PortForward, String> {
        let (remote, local) = two_ports(spec, "REMOTE:LOCAL")?;
        Ok(PortForward { local, remote })
    }
}

fn two_ports(spec: &str, form: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{spec:?} is not {form}; write two ports, e.g. \"8080:8080\"");
    let (a, b) = spec.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(n) if p.starts_with('+') => Err(format!("{spec:?}: write the port {n} without a sign")),
        Ok(n) => Ok(n),
    };
    Ok((port(a)?, port(b)?))
}

/// The `cache:` mapping; a missing field leaves the `devmount mount` flag's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheSettings {
    /// Bytes of file contents cached (`--data-cache`).
    pub data: Option<usize>,
    /// How long attributes and listings are trusted where no change feed vouches for them
    /// (`--timeout`); positive.
    pub timeout: Option<Duration>,
    /// Bytes of changes the journal holds before writers wait (`--journal-max`); at least 1 MiB.
    pub journal: Option<u64>,
}

/// Parses a size: a number of bytes, or a whole number with `B`, `KiB`, `MiB`, `GiB` or `TiB`
/// (one space allowed before the unit), e.g. `256MiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a size; write bytes or a whole number with KiB, MiB, GiB or TiB, e.g. 256MiB"
        )
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let (number, unit) = text.split_at(digits);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let shift = match unit {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(bad()),
    };
    let too_big = || format!("{text:?} is too large");
    let number: u64 = number.parse().map_err(|_| too_big())?;
    number.checked_mul(1 << shift).ok_or_else(too_big)
}

/// A manifest that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", Located { file, at: *at, message })]
    Invalid {
        file: PathBuf,
        /// Line and column, both from 1; `None` when the problem has no one place (a key that
        /// is missing).
        at: Option<(usize, usize)>,
        message: String,
    },
}

struct Located<'a> {
    file: &'a Path,
    at: Option<(usize, usize)>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl Manifest {
    /// `devmount.yml` in `dir` if there is one. Only `dir` itself is looked at, not its parents.
    pub fn find(dir: &Path) -> Result<Option<Manifest>, ManifestError> {
        let path = dir.join(FILE_NAME);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ManifestError::Read { file: path, source }),
            Ok(_) => Manifest::load(&path).map(Some),
        }
    }

    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let read_error = |source| ManifestError::Read { file: path.to_owned(), source };
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let absolute = std::path::absolute(path).map_err(read_error)?;
        let dir = absolute.parent().unwrap_or(Path::new("/"));
        Manifest::parse(&text, path, dir)
    }

    /// Checks `text` as the manifest at `path` (for messages) in the directory `dir` (absolute:
    /// relative paths and the default name come from it). Does no I/O.
    pub fn parse(text: &str, path: &Path, dir: &Path) -> Result<Manifest, ManifestError> {
        let reader = Reader { file: path };
        let doc = reader.document(text)?;
        let top = match &doc {
            Some(node) => reader.mapping(node, "the manifest", TOP_KEYS)?,
            None => Vec::new(),
        };

        let (mut name, mut target, mut cache) = (None, None, CacheSettings::default());
        let (mut forward, mut reverse, mut environment) = (Vec::new(), Vec::new(), Vec::new());
        for (key, value) in top {
            match key {
                "name" => name = Some(reader.name(value)?),
                "target" => target = Some(reader.target(value, dir)?),
                "forward" => forward = reader.forwards(value, Direction::Forward)?,
                "reverse" => reverse = reader.forwards(value, Direction::Reverse)?,
                "environment" => environment = reader.environment(value)?,
                "cache" => cache = reader.cache(value)?,
                _ => unreachable!("mapping() lets through only TOP_KEYS"),
            }
        }
        let target = target.ok_or_else(|| ManifestError::Invalid {
            file: path.to_owned(),
            at: None,
            message: "no `target`; add `target:` with `local: DIR` (a directory to serve) or `kubernetes: {deployment: NAME}`".into(),
        })?;
        Ok(Manifest {
            path: path.to_owned(),
            name: name.unwrap_or_else(|| default_name(dir)),
            target,
            forward,
            reverse,
            environment,
            cache,
        })
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Reverse,
}

impl Direction {
    fn key(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }

    fn parse(self, spec: &str) -> Result<PortForward, String> {
        match self {
            Direction::Forward => PortForward::parse_forward(spec),
            Direction::Reverse => PortForward::parse_reverse(spec),
        }
    }

    /// The side that listens, and its port: two forwards cannot listen on one port.
    fn listening(self, forward: &PortForward) -> (&'static str, u16) {
        match self {
            Direction::Forward => ("local", forward.local),
            Direction::Reverse => ("remote", forward.remote),
        }
    }
}

/// The directory's name, made into a valid session name.
pub fn default_name(dir: &Path) -> String {
    let raw = dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let mut name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '-' })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(MAX_NAME_LEN)
        .collect();
    if name.is_empty() {
        name.push_str("devmount");
    }
    name
}

/// Checks a session name: letters, digits, `.`, `_` and `-`, starting with a letter or digit, at
/// most 64 bytes. The error says so.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    if !valid {
        return Err(format!(
            "name {name:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MAX_NAME_LEN} characters"
        ));
    }
    Ok(())
}

/// The two forms of Kubernetes object names.
#[derive(Clone, Copy)]
enum DnsName {
    /// RFC 1123 label: namespaces, containers.
    Label,
    /// RFC 1123 subdomain: Deployments, storage classes.
    Subdomain,
}

impl DnsName {
    fn accepts(self, name: &str) -> bool {
        match self {
            DnsName::Label => is_dns_label(name),
            DnsName::Subdomain => name.len() <= 253 && name.split('.').all(is_dns_label),
        }
    }

    fn rule(self) -> &'static str {
        match self {
            DnsName::Label => {
                "at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
            }
            DnsName::Subdomain => {
                "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
            }
        }
    }
}

fn is_dns_label(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 63
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_` and `.` with an alphanumeric
/// at each end.
fn is_label_value(value: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    value.is_empty()
        || (value.len() <= 63
            && edge(value.chars().next())
            && edge(value.chars().last())
            && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// A label key: a name with the form of a non-empty label value, after an optional
/// `DNS-subdomain/` prefix.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    !name.is_empty() && is_label_value(name) && prefix.is_none_or(|p| DnsName::Subdomain.accepts(p))
}

/// A resource name: `cpu`, `memory`, `hugepages-2Mi`, `example.com/gpu`.
fn is_resource_name(name: &str) -> bool {
    is_label_key(name)
}

/// A Kubernetes quantity without a sign: digits with an optional fraction, then one of the
/// suffixes Kubernetes knows (binary `Ki`..`Ei`, decimal `n`..`E`, or an exponent `e3`). Written
/// here because Kubernetes' grammar is small and no maintained crate checks exactly it.
fn is_quantity(text: &str) -> bool {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let whole = digits(text);
    let mut rest = &text[whole..];
    let mut fraction = 0;
    if let Some(after) = rest.strip_prefix('.') {
        fraction = digits(after);
        rest = &after[fraction..];
    }
    if whole + fraction == 0 {
        return false;
    }
    match rest {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P"
        | "E" => true,
        exponent => match exponent.strip_prefix(['e', 'E']) {
            Some(power) => {
                let power = power.strip_prefix(['+', '-']).unwrap_or(power);
                !power.is_empty() && digits(power) == power.len()
            }
            None => false,
        },
    }
}

/// Reads nodes, turning every mistake into an error at the node's place.
struct Reader<'f> {
    file: &'f Path,
}

type Node<'t> = MarkedYaml<'t>;

impl Reader<'_> {
    fn error(&self, node: &Node, message: String) -> ManifestError {
        let start = node.span.start;
        ManifestError::Invalid {
            file: self.file.to_owned(),
            at: Some((start.line(), start.col() + 1)),
            message,
        }
    }

    /// The one document in `text`, or `None` when there is none (an empty file, only comments).
    fn document<'t>(&self, text: &'t str) -> Result<Option<Node<'t>>, ManifestError> {
        let syntax = |e: &saphyr::ScanError| ManifestError::Invalid {
            file: self.file.to_owned(),
            at: Some((e.marker().line(), e.marker().col() + 1)),
            message: format!("not valid YAML: {}", e.info()),
        };
        let mut loader: YamlLoader<Node> = YamlLoader::default();
        loader.early_parse(false);
        let mut parser = saphyr_parser::Parser::new_from_str(text);
        parser.load(&mut loader, true).map_err(|e| syntax(&e))?;
        if let Some(e) = loader.error() {
            return Err(syntax(e));
        }
        let mut docs = loader.into_documents().into_iter();
        let first = docs.next();
        if let Some(second) = docs.next() {
            return Err(self.error(&second, "a second YAML document; the manifest is one document".into()));
        }
        // An empty file, or one of comments only, is an empty document.
        Ok(first.filter(|doc| !matches!(doc.data, YamlData::BadValue)))
    }

    /// The entries of a mapping whose keys must be among `known`, in the file's order.
    fn mapping<'n, 't>(
        &self,
        node: &'n Node<'t>,
        what: &str,
        known: &[&'static str],
    ) -> Result<Vec<(&'static str, &'n Node<'t>)>, ManifestError> {
        if self.is_null(node) {
            return Ok(Vec::new());
        }
        let YamlData::Mapping(map) = &self.plain(node)?.data else {
            return Err(self.error(node, format!("{what} must be a mapping of {}", known.join(", "))));
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let text = self.text(key)?.ok_or_else(|| self.error(key, "an empty key".into()))?;
            let Some(&name) = known.iter().find(|k| **k == text) else {
                return Err(
                    self.error(key, format!("unknown key {text:?}; known keys here: {}", known.join(", ")))
                );
            };
            if entries.iter().any(|(k, _)| *k == name) {
                return Err(self.error(key, format!("the key {name:?} appears twice")));
            }
            entries.push((name, value));
        }
        Ok(entries)
    }

    /// A mapping with any keys (they are checked by the caller).
    fn free_mapping<'n, 't>(
        &self,
        node: &'n Node<'t>,
        what: &str,
    ) -> Result<Vec<(&'n Node<'t>, &'n Node<'t>)>, ManifestError> {
        match &self.plain(node)?.data {
            YamlData::Mapping(map) => Ok(map.iter().collect()),
            _ if self.is_null(node) => Ok(Vec::new()),
            _ => Err(self.error(node, format!("{what} must be a mapping"))),
        }
    }

    /// The items of a list; an empty value is an empty list.
    fn list<'n, 't>(&self, node: &'n Node<'t>, what: &str) -> Result<&'n [Node<'t>], ManifestError> {
        match &self.plain(node)?.data {
            YamlData::Sequence(items) => Ok(items),
            _ if self.is_null(node) => Ok(&[]),
            _ => Err(self.error(node, format!("{what} must be a list, e.g. [\"8080:8080\"]"))),
        }
    }

    /// A scalar's text as written, or `None` for a null (`~`, `null`, nothing).
    fn text<'n>(&self, node: &'n Node) -> Result<Option<&'n str>, ManifestError> {
        match &self.plain(node)?.data {
            YamlData::Representation(text, style, _) => {
                let null = *style == ScalarStyle::Plain
                    && matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL");
                Ok(if null { None } else { Some(text.as_ref()) })
            }
            YamlData::Mapping(_) => Err(self.error(node, "a mapping where a single value belongs".into())),
            YamlData::Sequence(_) => Err(self.error(node, "a list where a single value belongs".into())),
            _ => Err(self.error(node, "not a value devmount can read".into())),
        }
    }

    /// A scalar's text; `what` names it when it is missing.
    fn required_text<'n>(&self, node: &'n Node, what: &str) -> Result<&'n str, ManifestError> {
        self.text(node)?.ok_or_else(|| self.error(node, format!("{what} needs a value")))
    }

    fn is_null(&self, node: &Node) -> bool {
        matches!(self.text(node), Ok(None))
    }

    /// The node itself, refused if it carries a tag or stands for something the loader could
    /// not resolve (an alias to an unknown anchor).
    fn plain<'n, 't>(&self, node: &'n Node<'t>) -> Result<&'n Node<'t>, ManifestError> {
        match &node.data {
            YamlData::Tagged(..) | YamlData::Representation(_, _, Some(_)) => {
                Err(self.error(node, "YAML tags (`!name`) are not used in the manifest; remove it".into()))
            }
            YamlData::Alias(_) | YamlData::BadValue => {
                Err(self.error(node, "not a value devmount can read (an alias to an unknown anchor?)".into()))
            }
            _ => Ok(node),
        }
    }

    fn name(&self, node: &Node) -> Result<String, ManifestError> {
        let name = self.required_text(node, "name")?;
        check_name(name).map_err(|message| self.error(node, message))?;
        Ok(name.to_owned())
    }

    fn target(&self, node: &Node, dir: &Path) -> Result<ManifestTarget, ManifestError> {
        let entries = self.mapping(node, "target", TARGET_KEYS)?;
        let (kind, value) = match entries.as_slice() {
            [] => return Err(self.error(node, "target needs one of: local, kubernetes".into())),
            [one] => *one,
            [_, (_, second), ..] => {
                return Err(
                    self.error(second, "target has both local and kubernetes; give exactly one".into())
                )
            }
        };
        match kind {
            "local" => {
                let path = self.required_text(value, "target.local (the directory to serve)")?;
                Ok(ManifestTarget::Local(dir.join(path)))
            }
            _ => Ok(ManifestTarget::Kubernetes(Box::new(self.kubernetes(value)?))),
        }
    }

    fn kubernetes(&self, node: &Node) -> Result<KubernetesTarget, ManifestError> {
        let (mut namespace, mut context, mut timeout) = (None, None, DEFAULT_KUBE_TIMEOUT);
        let mut workload: Option<Workload> = None;
        let mut dev = DevSettings::default();
        let mut nodes = BTreeMap::new();
        for (key, value) in self.mapping(node, "target.kubernetes", KUBERNETES_KEYS)? {
            nodes.insert(key, value);
            let what = format!("kubernetes.{key}");
            match key {
                "namespace" => namespace = Some(self.dns_name(value, &what, DnsName::Label)?),
                "context" => context = Some(self.required_text(value, &what)?.to_owned()),
                "deployment" | "selector" => {
                    if workload.is_some() {
                        return Err(self.error(
                            value,
                            "kubernetes has both deployment and selector; give exactly one".into(),
                        ));
                    }
                    let found = if key == "deployment" {
                        Workload::Deployment(self.dns_name(value, &what, DnsName::Subdomain)?)
                    } else {
                        self.selector(value)?
                    };
                    workload = Some(found);
                }
                "container" => dev.container = Some(self.dns_name(value, &what, DnsName::Label)?),
                "image" => dev.image = Some(self.word(value, &what)?),
                "command" => dev.command = Some(self.command(value)?),
                "workdir" => dev.workdir = Some(self.pod_path(value, &what)?),
                "environment" => dev.environment = self.environment(value)?,
                "resources" => dev.resources = self.resources(value)?,
                "securityContext" => dev.security_context = self.security(value)?,
                "persistentVolume" => dev.persistent_volume = self.persistent_volume(value)?,
                "volumes" => {
                    let mut paths: Vec<String> = Vec::new();
                    for item in self.list(value, &what)? {
                        let path = self.pod_path(item, "each kubernetes.volumes entry")?;
                        if paths.contains(&path) {
                            return Err(self.error(item, format!("kubernetes.volumes lists {path} twice")));
                        }
                        paths.push(path);
                    }
                    dev.volumes = paths;
                }
                "serverImage" => dev.server_image = Some(self.word(value, &what)?),
                "timeout" => timeout = self.timeout(value)?,
                _ => unreachable!("mapping() lets through only KUBERNETES_KEYS"),
            }
        }
        let Some(workload) = workload else {
            return Err(self.error(
                node,
                "kubernetes needs `deployment: NAME` or `selector: {LABEL: VALUE}` to find the Deployment"
                    .into(),
            ));
        };
        if let Some((key, problem)) = dev.conflict() {
            return Err(self.error(nodes.get(key).copied().unwrap_or(node), problem.into()));
        }
        Ok(KubernetesTarget { namespace, workload, context, timeout, dev })
    }

    /// `selector`: a non-empty mapping of label keys to values.
    fn selector(&self, node: &Node) -> Result<Workload, ManifestError> {
        let mut pairs = Vec::new();
        for (key, value) in self.free_mapping(node, "kubernetes.selector")? {
            let key_text = self.required_text(key, "a selector label")?;
            if !is_label_key(key_text) {
                return Err(self.error(
                    key,
                    format!("selector label {key_text:?} is not a Kubernetes label key (e.g. app or app.kubernetes.io/name)"),
                ));
            }
            let text = self.text(value)?.unwrap_or("");
            if !is_label_value(text) {
                return Err(self.error(
                    value,
                    format!("selector value {text:?} is not a Kubernetes label value: at most 63 letters, digits, '-', '_' or '.'"),
                ));
            }
            pairs.push((key_text.to_owned(), text.to_owned()));
        }
        if pairs.is_empty() {
            return Err(
                self.error(node, "kubernetes.selector needs at least one label, e.g. {app: web}".into())
            );
        }
        Ok(Workload::Selector(pairs))
    }

    /// A DNS label (namespaces, containers) or subdomain (Deployments), as Kubernetes names them.
    fn dns_name(&self, node: &Node, what: &str, kind: DnsName) -> Result<String, ManifestError> {
        let name = self.required_text(node, what)?;
        if !kind.accepts(name) {
            return Err(
                self.error(node, format!("{what} {name:?} is not a Kubernetes name: {}", kind.rule()))
            );
        }
        Ok(name.to_owned())
    }

    /// One word of text: an image reference, with no spaces.
    fn word(&self, node: &Node, what: &str) -> Result<String, ManifestError> {
        let text = self.required_text(node, what)?;
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self
                .error(node, format!("{what} {text:?} has spaces in it; give an image like busybox:1.37")));
        }
        Ok(text.to_owned())
    }

    /// `command`: a shell command line, or a list of words quoted into one.
    fn command(&self, node: &Node) -> Result<String, ManifestError> {
        let line = if let YamlData::Sequence(items) = &self.plain(node)?.data {
            let mut words = Vec::with_capacity(items.len());
            for item in items {
                words.push(self.required_text(item, "each kubernetes.command word")?);
            }
            shlex::try_join(words.iter().copied())
                .map_err(|e| self.error(node, format!("kubernetes.command cannot be quoted for sh: {e}")))?
        } else {
            self.required_text(node, "kubernetes.command")?.to_owned()
        };
        if line.trim().is_empty() {
            return Err(
                self.error(node, "kubernetes.command is empty; give a command or remove the key".into())
            );
        }
        Ok(line)
    }

    /// An absolute path in the pod, in one spelling only (no `.`, `..`, empty components or
    /// trailing `/`), so that two of them are the same path exactly when they are equal.
    fn pod_path(&self, node: &Node, what: &str) -> Result<String, ManifestError> {
        let path = self.required_text(node, what)?;
        let canonical = path.len() > 1
            && path.starts_with('/')
            && path[1..].split('/').all(|c| !matches!(c, "" | "." | ".."))
            && !path.contains(['\0', '\n']);
        if !canonical {
            return Err(self.error(
                node,
                format!("{what} {path:?}: give an absolute path other than /, without ., .. or a trailing /, e.g. /work"),
            ));
        }
        Ok(path.to_owned())
    }

    fn resources(&self, node: &Node) -> Result<ResourceOverrides, ManifestError> {
        let mut resources = ResourceOverrides::default();
        for (key, value) in self.mapping(node, "kubernetes.resources", RESOURCES_KEYS)? {
            let mut quantities = Vec::new();
            for (name_node, quantity) in self.free_mapping(value, &format!("kubernetes.resources.{key}"))? {
                let name = self.required_text(name_node, "a resource name")?;
                if !is_resource_name(name) {
                    return Err(self.error(
                        name_node,
                        format!("resource name {name:?} is not one Kubernetes knows the form of (cpu, memory, example.com/gpu)"),
                    ));
                }
                let amount = self.required_text(quantity, &format!("kubernetes.resources.{key}.{name}"))?;
                if !is_quantity(amount) {
                    return Err(self.error(
                        quantity,
                        format!("kubernetes.resources.{key}.{name} {amount:?} is not a quantity; write e.g. 500m, 2 or 1Gi"),
                    ));
                }
                quantities.push((name.to_owned(), amount.to_owned()));
            }
            match key {
                "requests" => resources.requests = quantities,
                "limits" => resources.limits = quantities,
                _ => unreachable!("mapping() lets through only RESOURCES_KEYS"),
            }
        }
        Ok(resources)
    }

    fn security(&self, node: &Node) -> Result<SecurityOverrides, ManifestError> {
        let mut security = SecurityOverrides::default();
        for (key, value) in self.mapping(node, "kubernetes.securityContext", SECURITY_KEYS)? {
            let what = format!("kubernetes.securityContext.{key}");
            match key {
                "runAsUser" => security.run_as_user = Some(self.id(value, &what)?),
                "runAsGroup" => security.run_as_group = Some(self.id(value, &what)?),
                "fsGroup" => security.fs_group = Some(self.id(value, &what)?),
                "runAsNonRoot" => security.run_as_non_root = Some(self.boolean(value, &what)?),
                "privileged" => security.privileged = Some(self.boolean(value, &what)?),
                "allowPrivilegeEscalation" => {
                    security.allow_privilege_escalation = Some(self.boolean(value, &what)?)
                }
                "readOnlyRootFilesystem" => {
                    security.read_only_root_filesystem = Some(self.boolean(value, &what)?)
                }
                "capabilities" => {
                    for (which, list) in self.mapping(value, &what, CAPABILITIES_KEYS)? {
                        let names = self.capabilities(list, &format!("{what}.{which}"))?;
                        match which {
                            "add" => security.capabilities_add = Some(names),
                            "drop" => security.capabilities_drop = Some(names),
                            _ => unreachable!("mapping() lets through only CAPABILITIES_KEYS"),
                        }
                    }
                }
                _ => unreachable!("mapping() lets through only SECURITY_KEYS"),
            }
        }
        Ok(security)
    }

    fn capabilities(&self, node: &Node, what: &str) -> Result<Vec<String>, ManifestError> {
        let mut names = Vec::new();
        for item in self.list(node, what)? {
            let name = self.required_text(item, &format!("each {what} entry"))?;
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(
                    self.error(item, format!("{what}: {name:?} is not a capability name, e.g. NET_ADMIN"))
                );
            }
            names.push(name.to_owned());
        }
        Ok(names)
    }

    fn persistent_volume(&self, node: &Node) -> Result<PersistentVolume, ManifestError> {
        let mut volume = PersistentVolume::default();
        for (key, value) in self.mapping(node, "kubernetes.persistentVolume", VOLUME_KEYS)? {
            let what = format!("kubernetes.persistentVolume.{key}");
            match key {
                "enabled" => volume.enabled = self.boolean(value, &what)?,
                "size" => {
                    let size = self.required_text(value, &what)?;
                    if !is_quantity(size) {
                        return Err(
                            self.error(value, format!("{what} {size:?} is not a quantity; write e.g. 10Gi"))
                        );
                    }
                    volume.size = size.to_owned();
                }
                "storageClass" => {
                    volume.storage_class = Some(self.dns_name(value, &what, DnsName::Subdomain)?)
                }
                "accessMode" => {
                    let mode = self.required_text(value, &what)?;
                    if !ACCESS_MODES.contains(&mode) {
                        return Err(self.error(
                            value,
                            format!("{what} {mode:?}: give one of {}", ACCESS_MODES.join(", ")),
                        ));
                    }
                    volume.access_mode = mode.to_owned();
                }
                _ => unreachable!("mapping() lets through only VOLUME_KEYS"),
            }
        }
        Ok(volume)
    }

    /// `true` or `false`, as YAML 1.2 spells them.
    fn boolean(&self, node: &Node, what: &str) -> Result<bool, ManifestError> {
        match self.required_text(node, what)? {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" => Ok(false),
            other => Err(self.error(node, format!("{what} {other:?}: write true or false"))),
        }
    }

    /// A user or group id: a whole number from 0.
    fn id(&self, node: &Node, what: &str) -> Result<i64, ManifestError> {
        let text = self.required_text(node, what)?;
        match text.parse::<u32>() {
            Ok(id) if !text.starts_with('+') => Ok(i64::from(id)),
            _ => Err(self.error(node, format!("{what} {text:?}: give a user or group id, e.g. 1000"))),
        }
    }

    /// Whole seconds, or a whole number of `s`, `m` or `h`.
    fn timeout(&self, node: &Node) -> Result<Duration, ManifestError> {
        let text = self.required_text(node, "kubernetes.timeout")?;
        let (number, unit) = text.split_at(text.bytes().take_while(u8::is_ascii_digit).count());
        let scale = match unit {
            "" | "s" => Some(1),
            "m" => Some(60),
            "h" => Some(3600),
            _ => None,
        };
        match (number.parse::<u64>(), scale) {
            (Ok(n), Some(scale)) if n > 0 => n
                .checked_mul(scale)
                .map(Duration::from_secs)
                .ok_or_else(|| self.error(node, format!("kubernetes.timeout {text:?} is too long"))),
            _ => Err(self.error(
                node,
                format!("kubernetes.timeout {text:?}: give a positive whole number of seconds, or of s, m or h, e.g. 5m"),
            )),
        }
    }

    fn forwards(&self, node: &Node, direction: Direction) -> Result<Vec<PortForward>, ManifestError> {
        let what = direction.key();
        let mut forwards: Vec<PortForward> = Vec::new();
        for item in self.list(node, what)? {
            let spec = self.required_text(item, &format!("each {what} entry"))?;
            let forward =
                direction.parse(spec).map_err(|problem| self.error(item, format!("{what} {problem}")))?;
            let (side, port) = direction.listening(&forward);
            if forwards.iter().any(|f| direction.listening(f).1 == port) {
                return Err(self.error(item, format!("{what} lists the {side} port {port} twice")));
            }
            forwards.push(forward);
        }
        Ok(forwards)
    }

    fn environment(&self, node: &Node) -> Result<Vec<(String, String)>, ManifestError> {
        let mut vars = Vec::new();
        for (key, value) in self.free_mapping(node, "environment")? {
            let name = self.required_text(key, "an environment variable")?;
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(self.error(
                    key,
                    format!("environment variable {name:?}: use letters, digits and '_', not starting with a digit"),
                ));
            }
            let value = self.text(value)?.ok_or_else(|| {
                self.error(
                    value,
                    format!("environment variable {name} needs a value; write \"\" for an empty one"),
                )
            })?;
            vars.push((name.to_owned(), value.to_owned()));
        }
        Ok(vars)
    }

    fn cache(&self, node: &Node) -> Result<CacheSettings, ManifestError> {
        let mut cache = CacheSettings::default();
        for (key, value) in self.mapping(node, "cache", CACHE_KEYS)? {
            let text = self.required_text(value, &format!("cache.{key}"))?;
            match key {
                "data" => {
                    let bytes = parse_size(text).map_err(|p| self.error(value, format!("cache.data {p}")))?;
                    let bytes = usize::try_from(bytes)
                        .map_err(|_| self.error(value, format!("cache.data {text:?} is too large")))?;
                    cache.data = Some(bytes);
                }
                "journal" => {
                    let bytes =
                        parse_size(text).map_err(|p| self.error(value, format!("cache.journal {p}")))?;
                    if bytes < MIN_JOURNAL {
                        return Err(self.error(value, format!("cache.journal {text:?}: give at least 1MiB")));
                    }
                    cache.journal = Some(bytes);
                }
                "timeout" => {
                    let seconds =
                        text.parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0).ok_or_else(|| {
                            self.error(
                                value,
                                format!("cache.timeout {text:?}: give a positive number of seconds, e.g. 1"),
                            )
                        })?;
                    cache.timeout = Some(Duration::from_secs_f64(seconds));
                }
                _ => unreachable!("mapping() lets through only CACHE_KEYS"),
            }
        }
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/home/dev/my project";

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new("devmount.yml"), Path::new(DIR))
    }

    fn ok(text: &str) -> Manifest {
        parse(text).unwrap_or_else(|e| panic!("{e}\n--- in ---\n{text}"))
    }

    /// The whole message, checked to be one line.
    fn error(text: &str) -> String {
        let message = parse(text).expect_err(text).to_string();
        assert!(!message.contains('\n'), "{message}");
        message
    }

    fn local(path: &str) -> ManifestTarget {
        ManifestTarget::Local(PathBuf::from(path))
    }

    #[test]
    fn every_field() {
        let m = ok(r#"
name: api-server
target:
  local: ../src
forward:
  - "8080:80"
  - 5432:5432
reverse: ['9000:9001']
environment:
  RUST_LOG: debug
  VERSION: 1.10
  EMPTY: ""
  _X1: 'a: b # c'
cache:
  data: 64MiB
  timeout: 0.5
  journal: 2147483648
"#);
        assert_eq!(m.path, Path::new("devmount.yml"));
        assert_eq!(m.name, "api-server");
        assert_eq!(m.target, local("/home/dev/my project/../src"));
        assert_eq!(
            m.forward,
            [PortForward { local: 8080, remote: 80 }, PortForward { local: 5432, remote: 5432 }]
        );
        assert_eq!(m.reverse, [PortForward { local: 9001, remote: 9000 }]);
        let env: Vec<(&str, &str)> = m.environment.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env, [("RUST_LOG", "debug"), ("VERSION", "1.10"), ("EMPTY", ""), ("_X1", "a: b # c")]);
        assert_eq!(
            m.cache,
            CacheSettings {
                data: Some(64 << 20),
                timeout: Some(Duration::from_millis(500)),
                journal: Some(2 << 30)
            }
        );
    }

    #[test]
    fn defaults() {
        let m = ok("target: {local: /srv/app}\n");
        assert_eq!(m.name, "my-project", "the directory's name, made valid");
        assert_eq!(m.target, local("/srv/app"), "an absolute path is kept");
        assert!(m.forward.is_empty() && m.reverse.is_empty() && m.environment.is_empty());
        assert_eq!(m.cache, CacheSettings::default());
        let empty = ok("target: {local: .}\nforward:\nreverse: []\nenvironment:\ncache:\n");
        assert!(empty.forward.is_empty() && empty.environment.is_empty());
        assert_eq!(empty.cache, CacheSettings::default());
        assert_eq!(empty.target, local("/home/dev/my project/."));
    }

    #[test]
    fn default_name_from_the_directory() {
        assert_eq!(default_name(Path::new("/a/web.app_2")), "web.app_2");
        assert_eq!(default_name(Path::new("/a/.hidden dir")), "hidden-dir");
        assert_eq!(default_name(Path::new("/a/ünï")), "n-");
        assert_eq!(default_name(Path::new("/")), "devmount");
        assert_eq!(default_name(Path::new("/a/...")), "devmount");
        assert_eq!(default_name(Path::new(&"x".repeat(100))).len(), MAX_NAME_LEN);
    }

    #[test]
    fn the_starter_loads() {
        let m = ok(STARTER);
        assert_eq!(m.target, local("/home/dev/my project/workspace"));
        assert_eq!(m.name, "my-project");
        assert!(m.forward.is_empty());

        // Every commented example, uncommented, is valid too, and sets its field.
        let uncommented: String = STARTER
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic()) => rest,
                _ => line,
            })
            .flat_map(|line| [line, "\n"])
            .collect();
        let m = ok(&uncommented);
        assert_eq!(m.name, "myproject");
        assert_eq!(m.forward, [PortForward { local: 8080, remote: 8080 }]);
        assert_eq!(m.reverse, [PortForward { local: 9000, remote: 9000 }]);
        assert_eq!(m.environment, [("RUST_LOG".to_owned(), "debug".to_owned())]);
        assert_eq!(
            m.cache,
            CacheSettings {
                data: Some(256 << 20),
                timeout: Some(Duration::from_secs(1)),
                journal: Some(1 << 30)
            }
        );
    }

    #[test]
    fn the_docs_show_the_starter() {
        let docs = include_str!("../../docs/manifest.md");
        assert!(
            docs.contains(&format!("```yaml\n{STARTER}```\n")),
            "docs/manifest.md must quote STARTER as it is"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_its_place() {
        let text = "name: x\ntarget:\n  local: .\n\n\n\nforwards:\n  - \"8080:8080\"\n";
        assert_eq!(
            error(text),
            "devmount.yml:7:1: unknown key \"forwards\"; known keys here: name, target, forward, reverse, environment, cache"
        );
        assert_eq!(
            error("target:\n  local: .\n  lcoal: x\n"),
            "devmount.yml:3:3: unknown key \"lcoal\"; known keys here: local, kubernetes"
        );
        assert_eq!(
            error("target: {local: .}\ncache:\n  size: 1MiB\n"),
            "devmount.yml:3:3: unknown key \"size\"; known keys here: data, timeout, journal"
        );
    }

    #[test]
    fn target_errors() {
        assert_eq!(
            error("name: x\n"),
            "devmount.yml: no `target`; add `target:` with `local: DIR` (a directory to serve) or `kubernetes: {deployment: NAME}`"
        );
        assert!(error("").contains("no `target`"));
        assert!(error("# only a comment\n").contains("no `target`"));
        assert_eq!(
            error("target:\n  local: a\n  kubernetes: {}\n"),
            "devmount.yml:3:15: target has both local and kubernetes; give exactly one"
        );
        assert_eq!(error("target:\n"), "devmount.yml:1:7: target needs one of: local, kubernetes");
        assert_eq!(
            error("target:\n  kubernetes:\n    namespace: dev\n"),
            "devmount.yml:3:5: kubernetes needs `deployment: NAME` or `selector: {LABEL: VALUE}` to find the Deployment"
        );
        assert!(error("target: /srv\n").contains("1:9: target must be a mapping of local, kubernetes"));
        assert!(error("target:\n  local:\n").contains("target.local (the directory to serve) needs a value"));
        assert!(error("target:\n  local: [a]\n").contains("2:10: a list where a single value belongs"));
    }

    fn kubernetes(text: &str) -> KubernetesTarget {
        match ok(text).target {
            ManifestTarget::Kubernetes(k) => *k,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kubernetes_every_field() {
        let k = kubernetes(
            r#"
target:
  kubernetes:
    namespace: team-a
    deployment: api.v2
    container: app
    image: registry.example/api:dev
    command: ["npm", "run", "dev server"]
    workdir: /srv/app
    environment: {NODE_ENV: development, PORT: 3000}
    resources:
      requests: {cpu: 500m, memory: 1Gi}
      limits: {memory: 2.5Gi, example.com/gpu: 1, cpu: 2e3}
    securityContext:
      runAsUser: 1000
      runAsGroup: 0
      runAsNonRoot: true
      fsGroup: 2000
      privileged: false
      allowPrivilegeEscalation: False
      readOnlyRootFilesystem: TRUE
      capabilities: {add: [SYS_PTRACE], drop: []}
    persistentVolume:
      enabled: true
      size: 20Gi
      storageClass: fast-ssd
      accessMode: ReadWriteOncePod
    volumes:
      - /root/.cache/go-build
      - /go/pkg/mod
    timeout: 90s
    context: kind-dev
"#,
        );
        assert_eq!(k.namespace.as_deref(), Some("team-a"));
        assert_eq!(k.workload, Workload::Deployment("api.v2".into()));
        assert_eq!(k.context.as_deref(), Some("kind-dev"));
        assert_eq!(k.timeout, Duration::from_secs(90));
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        let expected = DevSettings {
            container: Some("app".into()),
            image: Some("registry.example/api:dev".into()),
            command: Some("npm run 'dev server'".into()),
            workdir: Some("/srv/app".into()),
            environment: pairs(&[("NODE_ENV", "development"), ("PORT", "3000")]),
            resources: ResourceOverrides {
                requests: pairs(&[("cpu", "500m"), ("memory", "1Gi")]),
                limits: pairs(&[("memory", "2.5Gi"), ("example.com/gpu", "1"), ("cpu", "2e3")]),
            },
            security_context: SecurityOverrides {
                run_as_user: Some(1000),
                run_as_group: Some(0),
                run_as_non_root: Some(true),
                fs_group: Some(2000),
                privileged: Some(false),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities_add: Some(vec!["SYS_PTRACE".into()]),
                capabilities_drop: Some(Vec::new()),
            },
            persistent_volume: PersistentVolume {
                enabled: true,
                size: "20Gi".into(),
                storage_class: Some("fast-ssd".into()),
                access_mode: "ReadWriteOncePod".into(),
            },
            volumes: vec!["/root/.cache/go-build".into(), "/go/pkg/mod".into()],
            server_image: None,
        };
        assert_eq!(k.dev, expected);
    }

    #[test]
    fn kubernetes_defaults() {
        let k = kubernetes("target: {kubernetes: {deployment: web}}\n");
        assert_eq!(k.namespace, None);
        assert_eq!(k.context, None);
        assert_eq!(k.timeout, DEFAULT_KUBE_TIMEOUT);
        assert_eq!(k.dev, DevSettings::default());
        assert!(k.dev.persistent_volume.enabled, "the persistent volume is on by default");
        assert_eq!(k.dev.persistent_volume.size, "5Gi");
        assert_eq!(k.dev.persistent_volume.access_mode, "ReadWriteOnce");

        let k = kubernetes(
            "target:\n  kubernetes:\n    selector: {app: web, app.kubernetes.io/part-of: shop, tier: \"\"}\n    serverImage: ghcr.io/me/devmount-server:1\n    persistentVolume: {enabled: false}\n    timeout: 2m\n",
        );
        let selector = Workload::Selector(vec![
            ("app".into(), "web".into()),
            ("app.kubernetes.io/part-of".into(), "shop".into()),
            ("tier".into(), "".into()),
        ]);
        assert_eq!(k.workload, selector);
        assert_eq!(selector.to_string(), "app=web,app.kubernetes.io/part-of=shop,tier=");
        assert_eq!(Workload::Deployment("web".into()).to_string(), "deployment/web");
        let labels: BTreeMap<String, String> =
            [("app", "web"), ("app.kubernetes.io/part-of", "shop"), ("tier", ""), ("x", "y")]
                .into_iter()
                .map(|(a, b)| (a.into(), b.into()))
                .collect();
        assert!(selector.matches("any", &labels));
        assert!(!selector.matches("any", &BTreeMap::new()));
        assert!(Workload::Deployment("web".into()).matches("web", &BTreeMap::new()));
        assert!(!Workload::Deployment("web".into()).matches("api", &labels));
        assert_eq!(
            kubernetes("target: {kubernetes: {deployment: a, command: make run}}\n").dev.command.as_deref(),
            Some("make run")
        );
        assert_eq!(k.dev.server_image.as_deref(), Some("ghcr.io/me/devmount-server:1"));
        assert!(!k.dev.persistent_volume.enabled);
        assert_eq!(k.timeout, Duration::from_secs(120));
    }

    #[test]
    fn kubernetes_errors() {
        let k = |body: &str| error(&format!("target:\n  kubernetes:\n    deployment: web\n{body}"));
        assert_eq!(
            k("    namespce: x\n"),
            "devmount.yml:4:5: unknown key \"namespce\"; known keys here: namespace, deployment, selector, container, image, command, workdir, environment, resources, securityContext, persistentVolume, volumes, serverImage, timeout, context"
        );
        assert_eq!(
            k("    selector: {app: web}\n"),
            "devmount.yml:4:15: kubernetes has both deployment and selector; give exactly one"
        );
        assert_eq!(
            k("    securityContext:\n      runAsUsr: 1\n"),
            "devmount.yml:5:7: unknown key \"runAsUsr\"; known keys here: runAsUser, runAsGroup, runAsNonRoot, fsGroup, privileged, allowPrivilegeEscalation, readOnlyRootFilesystem, capabilities"
        );
        assert!(k("    resources: {request: {cpu: 1}}\n")
            .contains("unknown key \"request\"; known keys here: requests, limits"));
        assert!(k("    persistentVolume: {size: 1Gi, class: x}\n")
            .contains("unknown key \"class\"; known keys here: enabled, size, storageClass, accessMode"));
        assert!(
            k("    securityContext: {capabilities: {remove: [X]}}\n").contains("known keys here: add, drop")
        );

        // Wrong types and forms: one line each, at the value.
        assert_eq!(
            k("    container: App\n"),
            "devmount.yml:4:16: kubernetes.container \"App\" is not a Kubernetes name: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
        assert!(error("target: {kubernetes: {deployment: -web}}\n")
            .contains("kubernetes.deployment \"-web\" is not a Kubernetes name"));
        assert!(k("    namespace: a.b\n").contains("kubernetes.namespace \"a.b\" is not a Kubernetes name"));
        assert!(k("    image: [a]\n").contains("4:12: a list where a single value belongs"));
        assert!(k("    image: my image\n").contains("kubernetes.image \"my image\" has spaces in it"));
        assert!(k("    image:\n").contains("kubernetes.image needs a value"));
        assert!(k("    command: \" \"\n").contains("kubernetes.command is empty"));
        assert!(k("    command: {a: b}\n").contains("a mapping where a single value belongs"));
        assert!(k("    command: [\"a\\0b\"]\n").contains("kubernetes.command cannot be quoted for sh"));
        for bad in ["work", "/", "/a/", "/a//b", "/a/./b", "/a/../b"] {
            let message = k(&format!("    workdir: \"{bad}\"\n"));
            assert!(message.contains("give an absolute path other than /"), "{bad}: {message}");
        }
        assert!(k("    volumes: /go\n").contains("kubernetes.volumes must be a list"));
        assert_eq!(k("    volumes: [/go, /go]\n"), "devmount.yml:4:20: kubernetes.volumes lists /go twice");
        assert_eq!(
            k("    persistentVolume: {enabled: false}\n    volumes: [/go]\n"),
            "devmount.yml:5:14: kubernetes.volumes live on the persistent volume, which is off; remove them or enable persistentVolume"
        );
        assert!(k("    persistentVolume: {enabled: no}\n")
            .contains("persistentVolume.enabled \"no\": write true or false"));
        assert!(k("    persistentVolume: {size: 10GB}\n")
            .contains("persistentVolume.size \"10GB\" is not a quantity"));
        assert!(k("    persistentVolume: {accessMode: ReadOnlyMany}\n").contains(
            "accessMode \"ReadOnlyMany\": give one of ReadWriteOnce, ReadWriteOncePod, ReadWriteMany"
        ));
        assert!(k("    persistentVolume: {storageClass: Fast}\n")
            .contains("storageClass \"Fast\" is not a Kubernetes name"));
        assert!(k("    persistentVolume: 5Gi\n")
            .contains("kubernetes.persistentVolume must be a mapping of enabled"));
        assert_eq!(
            k("    command: make\n    serverImage: x/server\n"),
            "devmount.yml:4:14: kubernetes.command runs under the image's sh, and serverImage is for images without one; drop one of them"
        );
        for bad in ["0", "-1", "1.5", "5 m", "5d", "m", "99999999999999999h"] {
            let message = k(&format!("    timeout: \"{bad}\"\n"));
            assert!(message.contains("kubernetes.timeout"), "{bad}: {message}");
        }
        assert!(k("    resources: {limits: {memory: 1GB}}\n")
            .contains("kubernetes.resources.limits.memory \"1GB\" is not a quantity"));
        assert!(k("    resources: {limits: {\"bad name\": 1}}\n").contains("resource name \"bad name\""));
        assert!(
            k("    resources: {limits: [cpu]}\n").contains("kubernetes.resources.limits must be a mapping")
        );
        for bad in ["-1", "1.5", "x", "+3", "4294967296"] {
            let message = k(&format!("    securityContext: {{runAsUser: \"{bad}\"}}\n"));
            assert!(message.contains("give a user or group id"), "{bad}: {message}");
        }
        assert!(k("    securityContext: {privileged: 1}\n").contains("privileged \"1\": write true or false"));
        assert!(k("    securityContext: {capabilities: {add: [net_admin]}}\n")
            .contains("capabilities.add: \"net_admin\" is not a capability name"));
        assert!(k("    environment: {1A: x}\n").contains("environment variable \"1A\""));
        assert!(error("target: {kubernetes: {selector: {}}}\n")
            .contains("kubernetes.selector needs at least one label"));
        assert!(error("target: {kubernetes: {selector: {-a: b}}}\n")
            .contains("selector label \"-a\" is not a Kubernetes label key"));
        assert!(error("target: {kubernetes: {selector: {a: b c}}}\n")
            .contains("selector value \"b c\" is not a Kubernetes label value"));
        assert!(error("target: {kubernetes: [web]}\n")
            .contains("target.kubernetes must be a mapping of namespace"));
    }

    #[test]
    fn quantities_and_label_keys() {
        for good in ["1", "0", "500m", "1.5Gi", ".5", "1.", "2e3", "1E-2", "1e+9", "64Mi", "100k", "3n"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", ".", "-1", "+1", "1GB", "1gi", "e3", "1e", "1 Gi", "1.2.3", "1Ki2"] {
            assert!(!is_quantity(bad), "{bad}");
        }
        for good in ["app", "app.kubernetes.io/name", "a_b.c-d", "x/y"] {
            assert!(is_label_key(good), "{good}");
        }
        for bad in ["", "/a", "a/", "-a", "A.b/c", "a/b/c", &"a".repeat(64)] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }

    #[test]
    fn forward_errors() {
        let t = "target: {local: .}\n";
        assert_eq!(
            error(&format!("{t}forward:\n  - 8080\n")),
            "devmount.yml:3:5: forward \"8080\" is not LOCAL:REMOTE; write two ports, e.g. \"8080:8080\""
        );
        assert!(error(&format!("{t}reverse: [\"9000\"]\n"))
            .contains("2:11: reverse \"9000\" is not REMOTE:LOCAL"));
        for bad in ["0:80", "80:0", "80:65536", "a:80", "80:", ":80", "1:2:3", " 80:80", "-1:80"] {
            let message = error(&format!("{t}forward: [\"{bad}\"]\n"));
            assert!(message.contains("is not LOCAL:REMOTE"), "{bad}: {message}");
        }
        assert!(error(&format!("{t}forward: [\"+80:80\"]\n")).contains("without a sign"));
        assert!(error(&format!("{t}forward: \"80:80\"\n")).contains("forward must be a list"));
        assert!(error(&format!("{t}forward: [~]\n")).contains("each forward entry needs a value"));
        assert_eq!(
            error(&format!("{t}forward: [\"80:1\", \"81:1\", \"80:2\"]\n")),
            "devmount.yml:2:27: forward lists the local port 80 twice"
        );
        assert!(error(&format!("{t}reverse: [\"80:1\", \"80:2\"]\n")).contains("the remote port 80 twice"));
        // Two forwards to one remote port from different local ports are fine.
        assert_eq!(ok(&format!("{t}forward: [\"80:1\", \"81:1\"]\n")).forward.len(), 2);
    }

    #[test]
    fn cache_errors() {
        let t = "target: {local: .}\ncache:\n";
        for bad in
            ["256MB", "1.5GiB", "-1", "MiB", "1 KiB ", "12kib", "99999999999999TiB", "99999999999999999999"]
        {
            let message = error(&format!("{t}  data: \"{bad}\"\n"));
            assert!(message.starts_with("devmount.yml:3:9: cache.data "), "{bad}: {message}");
        }
        assert!(error(&format!("{t}  data: 256MB\n"))
            .contains("is not a size; write bytes or a whole number with KiB"));
        assert!(error(&format!("{t}  journal: 1000KiB\n"))
            .contains("cache.journal \"1000KiB\": give at least 1MiB"));
        for bad in ["0", "-1", "x", ".inf", "nan"] {
            let message = error(&format!("{t}  timeout: {bad}\n"));
            assert!(message.contains("give a positive number of seconds"), "{bad}: {message}");
        }
        assert!(error(&format!("{t}  data:\n")).contains("cache.data needs a value"));
        assert!(error("target: {local: .}\ncache: 1GiB\n")
            .contains("cache must be a mapping of data, timeout, journal"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("3KiB"), Ok(3 << 10));
        assert_eq!(parse_size("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert!(parse_size("16777216TiB").unwrap_err().contains("too large"));
        assert!(parse_size("").unwrap_err().contains("is not a size"));
    }

    #[test]
    fn name_and_environment_errors() {
        let t = "target: {local: .}\n";
        for bad in ["-x", ".x", "a b", "a/b", "ü"] {
            let message = error(&format!("{t}name: \"{bad}\"\n"));
            assert!(message.contains("use letters, digits, '.', '_' and '-'"), "{bad}: {message}");
        }
        assert!(error(&format!("{t}name: {}\n", "a".repeat(65))).contains("at most 64"));
        assert!(error(&format!("{t}name:\n")).contains("name needs a value"));
        assert_eq!(
            error(&format!("{t}environment:\n  1X: a\n")),
            "devmount.yml:3:3: environment variable \"1X\": use letters, digits and '_', not starting with a digit"
        );
        assert!(error(&format!("{t}environment:\n  A-B: a\n")).contains("\"A-B\""));
        assert!(error(&format!("{t}environment:\n  A:\n"))
            .contains("environment variable A needs a value; write \"\""));
        assert!(
            error(&format!("{t}environment:\n  A: [1]\n")).contains("a list where a single value belongs")
        );
        assert!(error(&format!("{t}environment: [A]\n")).contains("environment must be a mapping"));
    }

    #[test]
    fn yaml_errors() {
        assert!(error("target: {local: .\n").starts_with("devmount.yml:2:1: not valid YAML: "));
        assert_eq!(
            error("target: {local: .}\nname: a\nname: b\n").split(": ").next(),
            Some("devmount.yml:3:1"),
            "a duplicate key"
        );
        assert!(error("target: {local: .}\nname: a\n\"name\": b\n")
            .contains("3:1: the key \"name\" appears twice"));
        assert_eq!(
            error("target: {local: .}\n---\nname: b\n"),
            "devmount.yml:3:1: a second YAML document; the manifest is one document"
        );
        assert!(error("target: {local: !path .}\n").contains("1:17: YAML tags"));
        assert!(error("- a\n").contains("the manifest must be a mapping"));
        // Anchors and aliases work.
        let m = ok("target: {local: &d src}\nenvironment: {SRC: *d}\n");
        assert_eq!(m.environment, [("SRC".to_owned(), "src".to_owned())]);
    }

    #[test]
    fn load_and_find() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("proj");
        std::fs::create_dir(&dir).unwrap();
        assert!(Manifest::find(&dir).unwrap().is_none());
        std::fs::write(dir.join(FILE_NAME), STARTER).unwrap();
        let found = Manifest::find(&dir).unwrap().unwrap();
        assert_eq!(found.name, "proj");
        assert_eq!(found.target, ManifestTarget::Local(dir.join("workspace")));
        assert_eq!(found.path, dir.join(FILE_NAME));

        let other = tmp.path().join("other.yml");
        std::fs::write(&other, "target:\n  local: x\n  bogus: 1\n").unwrap();
        let message = Manifest::load(&other).unwrap_err().to_string();
        assert_eq!(
            message,
            format!("{}:3:3: unknown key \"bogus\"; known keys here: local, kubernetes", other.display())
        );
        let missing = Manifest::load(&tmp.path().join("nope.yml")).unwrap_err().to_string();
        assert!(
            missing.starts_with("cannot read ") && missing.contains("nope.yml: No such file"),
            "{missing}"
        );
        std::fs::write(&other, b"name: \xff\n").unwrap();
        assert!(Manifest::load(&other).unwrap_err().to_string().starts_with("cannot read "));
    }
}
