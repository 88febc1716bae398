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

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};

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
# `kubernetes` targets come with a later version of devmount.
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
            message: "no `target`; add `target:` with `local: DIR`, the directory to serve".into(),
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
            _ => Err(self.error(
                value,
                "kubernetes targets come with a later version of devmount; use `local: DIR` for now".into(),
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
            "devmount.yml: no `target`; add `target:` with `local: DIR`, the directory to serve"
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
            "devmount.yml:3:5: kubernetes targets come with a later version of devmount; use `local: DIR` for now"
        );
        assert!(error("target: /srv\n").contains("1:9: target must be a mapping of local, kubernetes"));
        assert!(error("target:\n  local:\n").contains("target.local (the directory to serve) needs a value"));
        assert!(error("target:\n  local: [a]\n").contains("2:10: a list where a single value belongs"));
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
