//! `devmount init --from-okteto`: a devmount.yml made from the dev section of an okteto
//! manifest. [`convert`] does no I/O.
//!
//! Both forms of okteto.yml are read: the current one, whose `dev` maps names to dev containers
//! (with `namespace`, `context` and `forward` beside it, shared by all of them), and the older
//! one that is a single dev container with its `name` at the top. One dev container becomes one
//! devmount.yml with a `target.kubernetes`.
//!
//! The fields that map are checked by the manifest's own [`Reader`], on okteto.yml's nodes, so a
//! value devmount would refuse is an error at its line in okteto.yml, not in a file the user
//! never wrote. Where okteto spells a value differently (`KEY=VALUE` list items, paths with a
//! trailing `/`, keys devmount does not have among ones it does), a node is made at the
//! original's place for the Reader to check. Every field that does not map, and every value that
//! okteto fills in from its environment (`${VAR}`) when it runs, becomes a note with its place
//! and the reason: nothing is dropped without a word. docs/manifest.md has the table.
//!
//! The result is written with serde_saphyr from wire types of its own (the manifest's types
//! are not serializable, and keep defaults where this keeps only what okteto.yml gave), and is
//! read back with [`Manifest::parse`] before it is handed out.

use std::borrow::Cow;
use std::path::Path;

use saphyr::{AnnotatedMapping, MarkedYaml, ScalarStyle, YamlData};
use serde::{Serialize, Serializer};

use super::{
    check_name, DnsName, Located, Manifest, ManifestError, Node, PortForward, Reader, ResourceOverrides,
    SecurityOverrides, Workload, FILE_NAME, SECURITY_KEYS, VOLUME_KEYS,
};

/// The okteto manifest read when `--from-okteto` names none.
pub const DEFAULT_FILE: &str = "okteto.yml";

/// Keys that only the current okteto manifest has: with one of them and no `dev`, the file holds
/// no dev container at all.
const SECTIONS: &[&str] = &["build", "deploy", "destroy", "dependencies", "external", "test", "icon"];

/// okteto dev fields devmount has no use for, each with the reason, as "`FIELD` REASON; dropped"
/// reads.
const DROPPED: &[(&str, &str)] = &[
    ("mode", "is not needed: devmount mounts the pod's files instead of copying them"),
    ("autocreate", "has no equivalent: devmount develops in a Deployment that exists, and creates none"),
    ("sshServerPort", "is not needed: devmount runs its own SSH server, reached through a port-forward"),
    ("remote", "is not needed: devmount runs its own SSH server, reached through a port-forward"),
    ("interface", "has no equivalent: devmount's forwards listen on 127.0.0.1 only"),
    (
        "services",
        "has no equivalent: devmount swaps one container; write a devmount.yml for each of the others",
    ),
    ("imagePullPolicy", "has no equivalent: devmount keeps the container's pull policy"),
    ("secrets", "has no equivalent: devmount copies no local files into the pod; put them in the mount"),
    (
        "envFiles",
        "has no equivalent: devmount.yml holds the variables themselves; copy them into environment",
    ),
    ("probes", "is not needed: devmount turns the dev container's probes off"),
    ("healthchecks", "is not needed: devmount turns the dev container's probes off"),
    ("lifecycle", "is not needed: devmount removes the dev container's lifecycle hooks"),
    ("initContainer", "is not needed: devmount's own init container has no settings"),
    ("initFromImage", "is not needed: devmount fills a new persistent volume from the image's workdir"),
    ("docker", "has no equivalent: devmount adds no Docker-in-Docker container"),
    ("divert", "has no equivalent: devmount diverts no traffic"),
    ("nodeSelector", "has no equivalent: devmount keeps the Deployment's scheduling"),
    ("affinity", "has no equivalent: devmount keeps the Deployment's scheduling"),
    ("tolerations", "has no equivalent: devmount keeps the Deployment's scheduling"),
    ("priorityClassName", "has no equivalent: devmount keeps the Deployment's scheduling"),
    ("serviceAccount", "has no equivalent: devmount keeps the Deployment's service account"),
    ("metadata", "has no equivalent: devmount keeps the Deployment's labels and annotations"),
    ("labels", "has no equivalent: devmount keeps the Deployment's labels and annotations"),
    ("annotations", "has no equivalent: devmount keeps the Deployment's labels and annotations"),
    ("externalVolumes", "has no equivalent: devmount mounts no other claims into the dev container"),
];

/// `command`s that only open a shell in okteto up's terminal.
const SHELLS: &[&str] = &["sh", "bash", "zsh", "ash", "dash", "ksh", "fish"];

/// What [`convert`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    /// The dev container converted, as okteto.yml names it.
    pub dev: String,
    /// The devmount.yml, as it is to be written.
    pub manifest: String,
    /// One line per okteto field dropped or read differently, `FILE:LINE:COLUMN: ...`, in the
    /// file's order.
    pub notes: Vec<String>,
}

/// Converts the dev container `dev` (needed only when there are several) of the okteto manifest
/// `text`, read from `file` (for messages).
pub fn convert(text: &str, file: &Path, dev: Option<&str>) -> Result<Conversion, ManifestError> {
    let converter = Converter { reader: Reader { file }, notes: Vec::new() };
    let doc = converter.reader.document(text)?;
    converter.run(doc.as_ref(), dev)
}

/// A dev container as devmount.yml says it; only what okteto.yml gave is written.
#[derive(Serialize, Default)]
struct Output {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    target: Target,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    forward: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reverse: Vec<String>,
}

#[derive(Serialize, Default)]
struct Target {
    kubernetes: Kubernetes,
}

/// `target.kubernetes`, its fields in docs/manifest.md's order.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Kubernetes {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deployment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    selector: Option<Pairs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workdir: Option<String>,
    #[serde(skip_serializing_if = "Pairs::is_empty")]
    environment: Pairs,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<Resources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    security_context: Option<Security>,
    #[serde(skip_serializing_if = "Option::is_none")]
    persistent_volume: Option<Volume>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<String>,
}

/// A mapping written in the file's order.
#[derive(Default)]
struct Pairs(Vec<(String, String)>);

impl Pairs {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Pairs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

#[derive(Serialize)]
struct Resources {
    #[serde(skip_serializing_if = "Pairs::is_empty")]
    requests: Pairs,
    #[serde(skip_serializing_if = "Pairs::is_empty")]
    limits: Pairs,
}

impl From<ResourceOverrides> for Resources {
    fn from(r: ResourceOverrides) -> Resources {
        Resources { requests: Pairs(r.requests), limits: Pairs(r.limits) }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Security {
    #[serde(skip_serializing_if = "Option::is_none")]
    run_as_user: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_as_group: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_as_non_root: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fs_group: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    privileged: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_privilege_escalation: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_only_root_filesystem: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capabilities: Option<Capabilities>,
}

#[derive(Serialize)]
struct Capabilities {
    #[serde(skip_serializing_if = "Option::is_none")]
    add: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drop: Option<Vec<String>>,
}

impl From<SecurityOverrides> for Security {
    fn from(s: SecurityOverrides) -> Security {
        let capabilities = (s.capabilities_add.is_some() || s.capabilities_drop.is_some())
            .then_some(Capabilities { add: s.capabilities_add, drop: s.capabilities_drop });
        Security {
            run_as_user: s.run_as_user,
            run_as_group: s.run_as_group,
            run_as_non_root: s.run_as_non_root,
            fs_group: s.fs_group,
            privileged: s.privileged,
            allow_privilege_escalation: s.allow_privilege_escalation,
            read_only_root_filesystem: s.read_only_root_filesystem,
            capabilities,
        }
    }
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Volume {
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    storage_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_mode: Option<String>,
}

/// The dev container being converted.
#[derive(Default)]
struct Dev<'n, 't> {
    out: Output,
    forward: Vec<PortForward>,
    reverse: Vec<PortForward>,
    /// `sync`'s key, and the first folder's path in the pod, if it is a plain one: the workdir,
    /// when okteto.yml gives none.
    sync: Option<(&'n Node<'t>, Option<String>)>,
}

/// A mapping's entries with their keys' text, in the file's order.
type Entries<'n, 't> = Vec<(&'n str, &'n Node<'t>, &'n Node<'t>)>;

struct Converter<'f> {
    reader: Reader<'f>,
    /// Each with the line and column it is about, to be put in the file's order.
    notes: Vec<((usize, usize), String)>,
}

/// A double-quoted scalar `text` at `at`'s place: a value okteto writes inside another, made a
/// node of its own for the manifest's checks, which then point at okteto.yml's line.
fn scalar<'t>(at: &Node<'t>, text: &str) -> Node<'t> {
    MarkedYaml {
        span: at.span,
        data: YamlData::Representation(Cow::Owned(text.to_owned()), ScalarStyle::DoubleQuoted, None),
    }
}

/// A mapping node at `at`'s place.
fn mapping<'t>(at: &Node<'t>, entries: AnnotatedMapping<'t, Node<'t>>) -> Node<'t> {
    MarkedYaml { span: at.span, data: YamlData::Mapping(entries) }
}

/// okteto fills in `$VAR` and `${VAR}` from its own environment when it runs.
fn has_variable(text: &str) -> bool {
    text.contains('$')
}

impl Converter<'_> {
    fn place(node: &Node) -> (usize, usize) {
        (node.span.start.line(), node.span.start.col() + 1)
    }

    fn note(&mut self, node: &Node, message: String) {
        let at = Self::place(node);
        let line = Located { file: self.reader.file, at: Some(at), message: &message }.to_string();
        self.notes.push((at, line));
    }

    /// "`WHAT` REASON; dropped".
    fn dropped(&mut self, node: &Node, what: &str, reason: &str) {
        self.note(node, format!("`{what}` {reason}; dropped"));
    }

    /// Notes a value okteto would fill in from its environment; `true` when it was one.
    fn variable(&mut self, node: &Node, what: &str, text: &str, instead: &str) -> bool {
        if has_variable(text) {
            self.dropped(
                node,
                what,
                &format!("{text:?} uses a variable that okteto fills in when it runs, and devmount.yml holds plain values ({instead})"),
            );
        }
        has_variable(text)
    }

    fn invalid(&self, message: String) -> ManifestError {
        ManifestError::Invalid { file: self.reader.file.to_owned(), at: None, message }
    }

    /// The entries of a mapping (null: none), with the keys' text.
    fn entries<'n, 't>(&self, node: &'n Node<'t>, what: &str) -> Result<Entries<'n, 't>, ManifestError> {
        let mut entries = Vec::new();
        for (key, value) in self.reader.free_mapping(node, what)? {
            entries.push((self.reader.required_text(key, "a key")?, key, value));
        }
        Ok(entries)
    }

    /// The mapping `node` with only the keys in `known`; each other key is noted as dropped,
    /// `WHAT.KEY` with `reason`.
    fn known<'t>(
        &mut self,
        node: &Node<'t>,
        what: &str,
        known: &[&str],
        reason: &str,
    ) -> Result<Node<'t>, ManifestError> {
        let mut kept = AnnotatedMapping::new();
        for (name, key, value) in self.entries(node, what)? {
            if known.contains(&name) {
                kept.insert(key.clone(), value.clone());
            } else {
                self.dropped(key, &format!("{what}.{name}"), reason);
            }
        }
        Ok(mapping(node, kept))
    }

    fn run(mut self, doc: Option<&Node>, wanted: Option<&str>) -> Result<Conversion, ManifestError> {
        let top = match doc {
            Some(doc) => self.entries(doc, "an okteto manifest")?,
            None => Vec::new(),
        };
        let mut dev = Dev::default();
        let (name_node, name, fields) = match top.iter().find(|(key, ..)| *key == "dev") {
            Some(&(_, section_key, section)) => {
                for &(key, key_node, value) in &top {
                    match key {
                        "dev" => {}
                        "namespace" | "context" | "forward" => self.field(key, key_node, value, &mut dev)?,
                        _ => self.dropped(
                            key_node,
                            key,
                            "is outside the dev section, the only part devmount reads",
                        ),
                    }
                }
                let entries = self.entries(section, "dev")?;
                let (name, name_node, entry) = self.pick(section_key, &entries, wanted)?;
                (name_node, name, self.entries(entry, &format!("dev {name}"))?)
            }
            None => {
                if let Some((key, key_node, _)) = top.iter().find(|(key, ..)| SECTIONS.contains(key)) {
                    return Err(self.reader.error(
                        key_node,
                        format!("`{key}` but no `dev` section: there is no dev container to convert; add one, or run plain `devmount init` for a starter file"),
                    ));
                }
                let Some(&(_, _, name_node)) = top.iter().find(|(key, ..)| *key == "name") else {
                    return Err(self.invalid(
                        "has neither a `dev` section nor the `name` of a dev container: there is nothing to convert; give the okteto manifest with --from-okteto FILE".into(),
                    ));
                };
                let name = self.reader.required_text(name_node, "name")?;
                if let Some(wanted) = wanted.filter(|w| *w != name) {
                    return Err(self.reader.error(
                        name_node,
                        format!("the dev container here is {name:?}, not {wanted:?}; give --dev {name}, or leave --dev out"),
                    ));
                }
                let fields = top.iter().filter(|(key, ..)| *key != "name").copied().collect();
                (name_node, name, fields)
            }
        };

        if has_variable(name) {
            return Err(self.reader.error(
                name_node,
                format!("the dev container's name {name:?} uses a variable that okteto fills in when it runs; write the Deployment's name"),
            ));
        }
        let deployment = self.reader.dns_name(name_node, "the dev container's name", DnsName::Subdomain)?;
        match check_name(name) {
            Ok(()) => dev.out.name = Some(name.to_owned()),
            Err(problem) => self.note(
                name_node,
                format!("session {problem}; {FILE_NAME} leaves the name out, so the session takes its directory's"),
            ),
        }
        for &(key, key_node, value) in &fields {
            self.field(key, key_node, value, &mut dev)?;
        }
        self.finish(name_node, name, deployment, dev)
    }

    /// The dev container `wanted` names, or the only one: its name, key and value.
    fn pick<'n, 't>(
        &self,
        section_key: &Node,
        entries: &Entries<'n, 't>,
        wanted: Option<&str>,
    ) -> Result<(&'n str, &'n Node<'t>, &'n Node<'t>), ManifestError> {
        let names: Vec<&str> = entries.iter().map(|(name, ..)| *name).collect();
        let found = match (wanted, entries.as_slice()) {
            (Some(wanted), _) => entries.iter().find(|(name, ..)| *name == wanted).ok_or_else(|| {
                format!("dev has no dev container {wanted:?}; give --dev one of: {}", names.join(", "))
            }),
            (None, [one]) => Ok(one),
            (None, []) => Err("dev has no dev containers; there is nothing to convert".into()),
            (None, _) => Err(format!(
                "dev has several dev containers ({}); pick one with --dev NAME",
                names.join(", ")
            )),
        };
        found.map(|&(name, key, value)| (name, key, value)).map_err(|m| self.reader.error(section_key, m))
    }

    fn field<'n, 't>(
        &mut self,
        key: &'n str,
        key_node: &'n Node<'t>,
        value: &'n Node<'t>,
        dev: &mut Dev<'n, 't>,
    ) -> Result<(), ManifestError> {
        // An empty value is the same as leaving the field out, for okteto as for devmount.
        if self.reader.is_null(value) {
            return Ok(());
        }
        let kube = &mut dev.out.target.kubernetes;
        match key {
            "namespace" => {
                let text = self.reader.required_text(value, "namespace")?;
                if !self.variable(value, key, text, "the kubeconfig context's namespace is used") {
                    kube.namespace = Some(self.reader.dns_name(value, "namespace", DnsName::Label)?);
                }
            }
            "context" => {
                let text = self.reader.required_text(value, "context")?;
                if text.contains("://") {
                    self.dropped(
                        value,
                        key,
                        &format!(
                            "{text} is an Okteto URL, not a kubeconfig context (the current context is used)"
                        ),
                    );
                } else if !self.variable(value, key, text, "the current kubeconfig context is used") {
                    kube.context = Some(text.to_owned());
                }
            }
            "selector" => {
                for (_, label) in self.reader.free_mapping(value, "selector")? {
                    if let Some(text) = self.reader.text(label)?.filter(|t| has_variable(t)) {
                        return Err(self.reader.error(
                            label,
                            format!("selector value {text:?} uses a variable that okteto fills in when it runs; write the label's value"),
                        ));
                    }
                }
                if let Workload::Selector(pairs) = self.reader.selector(value)? {
                    kube.selector = Some(Pairs(pairs));
                }
            }
            "container" => kube.container = Some(self.reader.dns_name(value, "container", DnsName::Label)?),
            "image" => kube.image = self.image(key_node, value)?,
            "command" => kube.command = self.command(key_node, value)?,
            "workdir" => kube.workdir = Some(self.path(value, "workdir")?),
            "environment" => kube.environment = self.environment(value)?,
            "resources" => {
                let resources = self.reader.resources(value)?;
                kube.resources = (resources != ResourceOverrides::default()).then(|| resources.into());
            }
            "securityContext" => {
                let known = self.known(value, key, SECURITY_KEYS, "has no equivalent in devmount")?;
                let security = self.reader.security(&known)?;
                kube.security_context = (security != SecurityOverrides::default()).then(|| security.into());
            }
            "persistentVolume" => kube.persistent_volume = self.persistent_volume(value)?,
            "volumes" => {
                for item in self.reader.list(value, "volumes")? {
                    let text = self.reader.required_text(item, "each volumes entry")?;
                    if text.contains(':') {
                        self.dropped(
                            item,
                            "volumes",
                            &format!("{text} is a local folder okteto syncs into the pod, which devmount does not need: it mounts the pod's files"),
                        );
                        continue;
                    }
                    let path = self.path(item, "each volumes entry")?;
                    if !kube.volumes.contains(&path) {
                        kube.volumes.push(path);
                    }
                }
            }
            "forward" => self.forwards(value, &mut dev.forward)?,
            "reverse" => {
                for item in self.reader.list(value, "reverse")? {
                    let spec = self.reader.required_text(item, "each reverse entry")?;
                    let reverse = PortForward::parse_reverse(spec)
                        .map_err(|problem| self.reader.error(item, format!("reverse {problem}")))?;
                    if dev.reverse.iter().any(|r| r.remote == reverse.remote) {
                        return Err(self
                            .reader
                            .error(item, format!("reverse lists the remote port {} twice", reverse.remote)));
                    }
                    dev.reverse.push(reverse);
                }
            }
            "timeout" => {
                if let Some(timeout) = self.timeout(value)? {
                    kube.timeout = Some(timeout);
                }
            }
            "sync" => dev.sync = Some((key_node, self.sync_path(value)?)),
            _ => match DROPPED.iter().find(|(name, _)| *name == key) {
                Some((_, reason)) => self.dropped(key_node, key, reason),
                None => self.dropped(key_node, key, "is not an okteto dev field devmount knows"),
            },
        }
        Ok(())
    }

    /// An absolute path in the pod as devmount spells it: okteto allows a trailing `/`.
    fn path(&self, node: &Node, what: &str) -> Result<String, ManifestError> {
        let text = self.reader.required_text(node, what)?;
        let trimmed = if text.len() > 1 { text.trim_end_matches('/') } else { text };
        self.reader.pod_path(&scalar(node, trimmed), what)
    }

    fn image(&mut self, key: &Node, node: &Node) -> Result<Option<String>, ManifestError> {
        if let YamlData::Mapping(_) = &self.reader.plain(node)?.data {
            self.dropped(
                key,
                "image",
                "describes an image for okteto to build, and devmount builds none (build and push it, then set kubernetes.image)",
            );
            return Ok(None);
        }
        let text = self.reader.required_text(node, "image")?;
        if self.variable(node, "image", text, "the container's own image is used") {
            return Ok(None);
        }
        self.reader.word(node, "image").map(Some)
    }

    /// okteto's `command` runs in okteto up's terminal; devmount's runs beside the server.
    fn command(&mut self, key: &Node, node: &Node) -> Result<Option<String>, ManifestError> {
        let single = match &self.reader.plain(node)?.data {
            YamlData::Sequence(items) if items.len() == 1 => self.reader.text(&items[0])?,
            YamlData::Sequence(_) => None,
            _ => self.reader.text(node)?,
        };
        if let Some(shell) =
            single.map(str::trim).filter(|w| SHELLS.contains(&w.rsplit('/').next().unwrap_or(w)))
        {
            self.dropped(
                node,
                "command",
                &format!("{shell} opens a shell in okteto up's terminal, as `devmount ssh` does"),
            );
            return Ok(None);
        }
        let line = self.reader.command(node)?;
        self.note(
            key,
            "`command` runs beside devmount-server in the dev container, its output in `kubectl logs`, not in a terminal as under okteto up".into(),
        );
        Ok(Some(line))
    }

    /// `environment`: a list of `NAME=VALUE` or a mapping, checked as the manifest's.
    fn environment(&mut self, node: &Node) -> Result<Pairs, ManifestError> {
        let mut kept = AnnotatedMapping::new();
        match &self.reader.plain(node)?.data {
            YamlData::Sequence(items) => {
                for item in items {
                    let entry = self.reader.required_text(item, "each environment entry")?;
                    match entry.split_once('=') {
                        None => self.dropped(
                            item,
                            "environment",
                            &format!("{entry} takes its value from okteto's environment when it runs, and devmount.yml holds plain values (add {entry}=VALUE)"),
                        ),
                        Some((name, value)) => {
                            if !self.variable(item, &format!("environment.{name}"), value, "write the value") {
                                kept.insert(scalar(item, name), scalar(item, value));
                            }
                        }
                    }
                }
            }
            YamlData::Mapping(_) => {
                for (name, key, value) in self.entries(node, "environment")? {
                    let text = self.reader.text(value)?;
                    let what = format!("environment.{name}");
                    if !text.is_some_and(|t| self.variable(value, &what, t, "write the value")) {
                        kept.insert(key.clone(), value.clone());
                    }
                }
            }
            _ => {
                return Err(self.reader.error(
                    node,
                    "environment must be a list of NAME=VALUE or a mapping of NAME: VALUE".into(),
                ))
            }
        }
        Ok(Pairs(self.reader.environment(&mapping(node, kept))?))
    }

    fn persistent_volume(&mut self, node: &Node) -> Result<Option<Volume>, ManifestError> {
        let known = self.known(
            node,
            "persistentVolume",
            VOLUME_KEYS,
            "has no equivalent: devmount makes its claim with settings of its own",
        )?;
        let volume = self.reader.persistent_volume(&known)?;
        let mut out = Volume::default();
        for (name, ..) in self.entries(&known, "persistentVolume")? {
            match name {
                "enabled" => out.enabled = Some(volume.enabled),
                "size" => out.size = Some(volume.size.clone()),
                "storageClass" => out.storage_class = volume.storage_class.clone(),
                "accessMode" => out.access_mode = Some(volume.access_mode.clone()),
                _ => unreachable!("known() lets through only VOLUME_KEYS"),
            }
        }
        let given = out.enabled.is_some()
            || out.size.is_some()
            || out.storage_class.is_some()
            || out.access_mode.is_some();
        Ok(given.then_some(out))
    }

    /// `forward`: `LOCAL:REMOTE` and `{localPort, remotePort}` map; a forward to a Service
    /// (`LOCAL:SERVICE:PORT`, or `name` or `labels`) does not.
    fn forwards(&mut self, node: &Node, out: &mut Vec<PortForward>) -> Result<(), ManifestError> {
        for item in self.reader.list(node, "forward")? {
            let (spec, service) = if let YamlData::Mapping(_) = &self.reader.plain(item)?.data {
                let (mut local, mut remote, mut service) = ("", "", None);
                for (key, value) in self.reader.mapping(
                    item,
                    "each forward entry",
                    &["localPort", "remotePort", "name", "labels"],
                )? {
                    match key {
                        "localPort" => local = self.reader.required_text(value, "forward localPort")?,
                        "remotePort" => remote = self.reader.required_text(value, "forward remotePort")?,
                        "name" => {
                            let name = self.reader.required_text(value, "forward name")?;
                            service = Some(format!("the Service {name}"));
                        }
                        _ => service = Some("the Service its labels select".into()),
                    }
                }
                (format!("{local}:{remote}"), service)
            } else {
                let text = self.reader.required_text(item, "each forward entry")?;
                match text.split(':').collect::<Vec<_>>().as_slice() {
                    [_, service, _] => (text.to_owned(), Some(format!("the Service {service}"))),
                    _ => (text.to_owned(), None),
                }
            };
            if let Some(service) = service {
                self.dropped(
                    item,
                    "forward",
                    &format!("{spec} goes to {service}, and devmount forwards only to the dev container's own ports (`kubectl port-forward` reaches a Service)"),
                );
                continue;
            }
            let forward = PortForward::parse_forward(&spec)
                .map_err(|problem| self.reader.error(item, format!("forward {problem}")))?;
            if out.iter().any(|f| f.local == forward.local) {
                return Err(self
                    .reader
                    .error(item, format!("forward lists the local port {} twice", forward.local)));
            }
            out.push(forward);
        }
        Ok(())
    }

    /// `timeout`: a duration, or `{default, resources}`, where `resources` (how long okteto waits
    /// for the pod) is devmount's `timeout`.
    fn timeout(&mut self, node: &Node) -> Result<Option<String>, ManifestError> {
        let value = match &self.reader.plain(node)?.data {
            YamlData::Mapping(_) => {
                let mut resources = None;
                for (key, value) in self.reader.mapping(node, "timeout", &["default", "resources"])? {
                    if key == "resources" {
                        resources = Some(value);
                    } else {
                        self.dropped(
                            value,
                            "timeout.default",
                            "is okteto's limit for its other steps, and devmount's timeout is only how long `devmount up` waits for the dev pod",
                        );
                    }
                }
                resources
            }
            _ => Some(node),
        };
        let Some(value) = value else { return Ok(None) };
        self.reader.timeout(value)?;
        Ok(Some(self.reader.required_text(value, "timeout")?.to_owned()))
    }

    /// The first `sync` folder's path in the pod, when it is a plain absolute path.
    fn sync_path(&self, node: &Node) -> Result<Option<String>, ManifestError> {
        let folders = match &self.reader.plain(node)?.data {
            YamlData::Mapping(_) => {
                let entries = self.entries(node, "sync")?;
                match entries.iter().find(|(key, ..)| *key == "folders") {
                    Some(&(_, _, folders)) => folders,
                    None => return Ok(None),
                }
            }
            _ => node,
        };
        let Some(first) = self.reader.list(folders, "sync")?.first() else { return Ok(None) };
        let Some((_, remote)) = self.reader.text(first)?.and_then(|t| t.rsplit_once(':')) else {
            return Ok(None);
        };
        // A path okteto fills in, or one devmount would refuse, is not taken for the workdir;
        // the note then says only that `sync` is dropped.
        if has_variable(remote) {
            return Ok(None);
        }
        Ok(self.path(&scalar(first, remote), "sync").ok())
    }

    /// The notes that depend on the whole dev container, then devmount.yml, checked to load.
    fn finish(
        mut self,
        name_node: &Node,
        name: &str,
        deployment: String,
        mut dev: Dev,
    ) -> Result<Conversion, ManifestError> {
        dev.out.forward = dev.forward.iter().map(|f| format!("{}:{}", f.local, f.remote)).collect();
        dev.out.reverse = dev.reverse.iter().map(|r| format!("{}:{}", r.remote, r.local)).collect();
        let kube = &mut dev.out.target.kubernetes;
        if kube.selector.is_none() {
            kube.deployment = Some(deployment);
        }
        if let Some((key, path)) = dev.sync {
            let moved = path.filter(|_| kube.workdir.is_none());
            let message = match &moved {
                Some(path) => format!("`sync` is not needed: devmount mounts the pod's files instead of copying them; dropped, and its first folder's path in the pod, {path}, is the workdir devmount mounts"),
                None => "`sync` is not needed: devmount mounts the pod's files instead of copying them; dropped".into(),
            };
            self.note(key, message);
            if moved.is_some() {
                kube.workdir = moved;
            }
        }
        // okteto runs the dev container as root when the persistent volume is on (its default)
        // and no user is given; devmount keeps the container's own user.
        let security = kube.security_context.as_ref();
        let as_root = security.is_none_or(|s| s.run_as_user.is_none() && s.run_as_non_root != Some(true))
            && kube.persistent_volume.as_ref().and_then(|v| v.enabled) != Some(false);
        if as_root {
            self.note(
                name_node,
                "okteto runs this dev container as root (user 0), as no securityContext.runAsUser is given; devmount keeps the container's own user (add `securityContext: {runAsUser: 0}` under kubernetes for root)".into(),
            );
        }

        let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
        let body = serde_saphyr::to_string_with_options(&dev.out, options)
            .map_err(|e| self.invalid(format!("cannot write {FILE_NAME}: {e}")))?;
        let mut manifest = format!(
            "# {FILE_NAME} from the dev container {name:?} of {}, by `devmount init --from-okteto`.\n# Every field is described in devmount's docs/manifest.md.\n{body}",
            self.reader.file.display()
        );
        if !manifest.ends_with('\n') {
            manifest.push('\n');
        }
        // The dir serves only relative local paths and the default name, which a kubernetes
        // target with a name has neither of. A place in a file that is not written yet would
        // not help: the problem is told at the dev container.
        Manifest::parse(&manifest, Path::new(FILE_NAME), Path::new("/")).map_err(|e| {
            let problem = match e {
                ManifestError::Invalid { message, .. } => message,
                other => other.to_string(),
            };
            self.reader.error(
                name_node,
                format!("the dev container converts to a {FILE_NAME} that does not load: {problem}"),
            )
        })?;
        self.notes.sort_by_key(|(at, _)| *at);
        Ok(Conversion {
            dev: name.to_owned(),
            manifest,
            notes: self.notes.into_iter().map(|(_, line)| line).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_as(text: &str, dev: Option<&str>) -> Result<Conversion, ManifestError> {
        convert(text, Path::new("okteto.yml"), dev)
    }

    fn ok(text: &str) -> Conversion {
        convert_as(text, None).unwrap_or_else(|e| panic!("{e}\n--- in ---\n{text}"))
    }

    /// devmount.yml less its two comment lines.
    fn body(text: &str) -> String {
        let manifest = ok(text).manifest;
        manifest.splitn(3, '\n').nth(2).unwrap().to_owned()
    }

    /// The whole message of a failed conversion, checked to be one line.
    fn error(text: &str, dev: Option<&str>) -> String {
        let message = convert_as(text, dev).expect_err(text).to_string();
        assert!(!message.contains('\n'), "{message}");
        message
    }

    #[test]
    fn legacy_and_current_forms() {
        let legacy = ok("name: web\nnamespace: shop\n");
        assert_eq!(legacy.dev, "web");
        assert_eq!(
            legacy.manifest,
            "# devmount.yml from the dev container \"web\" of okteto.yml, by `devmount init --from-okteto`.\n# Every field is described in devmount's docs/manifest.md.\nname: web\ntarget:\n  kubernetes:\n    namespace: shop\n    deployment: web\n"
        );
        // The shared namespace and context, overridden by the dev container's own.
        assert_eq!(
            body("namespace: a\ncontext: x\ndev:\n  web:\n    namespace: b\n"),
            "name: web\ntarget:\n  kubernetes:\n    namespace: b\n    deployment: web\n    context: x\n"
        );
        // Empty values are left out, dropped fields too: nothing is lost.
        let empty = ok("name: web\nimage:\nnamespace: ~\nenvironment: []\nsync:\nautocreate:\n");
        assert!(empty.manifest.ends_with("name: web\ntarget:\n  kubernetes:\n    deployment: web\n"));
        assert_eq!(empty.notes.len(), 1, "only okteto's root user: {:?}", empty.notes);
        // A dev container with nothing more than its name.
        assert!(ok("dev:\n  api:\n")
            .manifest
            .ends_with("name: api\ntarget:\n  kubernetes:\n    deployment: api\n"));
    }

    #[test]
    fn picking_the_dev_container() {
        let two = "dev:\n  api: {}\n  web: {}\n";
        assert_eq!(
            error(two, None),
            "okteto.yml:1:1: dev has several dev containers (api, web); pick one with --dev NAME"
        );
        assert_eq!(convert_as(two, Some("web")).unwrap().dev, "web");
        assert_eq!(
            error(two, Some("db")),
            "okteto.yml:1:1: dev has no dev container \"db\"; give --dev one of: api, web"
        );
        assert_eq!(
            error("dev: {}\n", None),
            "okteto.yml:1:1: dev has no dev containers; there is nothing to convert"
        );
        assert_eq!(
            error("name: web\n", Some("api")),
            "okteto.yml:1:7: the dev container here is \"web\", not \"api\"; give --dev web, or leave --dev out"
        );
        assert_eq!(convert_as("name: web\n", Some("web")).unwrap().dev, "web");
        assert_eq!(
            error("deploy: [make]\n", None),
            "okteto.yml:1:1: `deploy` but no `dev` section: there is no dev container to convert; add one, or run plain `devmount init` for a starter file"
        );
        let nothing = "okteto.yml: has neither a `dev` section nor the `name` of a dev container: there is nothing to convert; give the okteto manifest with --from-okteto FILE";
        assert_eq!(error("", None), nothing);
        assert_eq!(error("# only a comment\n", None), nothing);
        assert_eq!(error("image: x\n", None), nothing);
    }

    #[test]
    fn notes_name_each_dropped_field() {
        let c = ok("name: web\nsync:\n  - .:/app\nautocreate: true\nbogus: 1\ncontext: https://okteto.example.com\ncommand: [bash]\n");
        assert_eq!(
            c.notes,
            [
                "okteto.yml:1:7: okteto runs this dev container as root (user 0), as no securityContext.runAsUser is given; devmount keeps the container's own user (add `securityContext: {runAsUser: 0}` under kubernetes for root)",
                "okteto.yml:2:1: `sync` is not needed: devmount mounts the pod's files instead of copying them; dropped, and its first folder's path in the pod, /app, is the workdir devmount mounts",
                "okteto.yml:4:1: `autocreate` has no equivalent: devmount develops in a Deployment that exists, and creates none; dropped",
                "okteto.yml:5:1: `bogus` is not an okteto dev field devmount knows; dropped",
                "okteto.yml:6:10: `context` https://okteto.example.com is an Okteto URL, not a kubeconfig context (the current context is used); dropped",
                "okteto.yml:7:10: `command` bash opens a shell in okteto up's terminal, as `devmount ssh` does; dropped",
            ]
        );
        assert!(c.manifest.ends_with("    deployment: web\n    workdir: /app\n"), "{}", c.manifest);

        // A user of its own, or a volume that is off, and okteto does not run it as root.
        for quiet in [
            "securityContext: {runAsUser: 1000}",
            "securityContext: {runAsNonRoot: true}",
            "persistentVolume: {enabled: false}",
        ] {
            let c = ok(&format!("name: web\n{quiet}\n"));
            assert!(c.notes.is_empty(), "{quiet}: {:?}", c.notes);
        }
        let c = ok("name: web\nsecurityContext: {runAsUser: 1, seLinuxOptions: {level: s0}}\npersistentVolume: {labels: {a: b}}\n");
        assert_eq!(
            c.notes,
            [
                "okteto.yml:2:33: `securityContext.seLinuxOptions` has no equivalent in devmount; dropped",
                "okteto.yml:3:20: `persistentVolume.labels` has no equivalent: devmount makes its claim with settings of its own; dropped",
            ]
        );
        assert!(!c.manifest.contains("persistentVolume"), "nothing of it is left: {}", c.manifest);
    }

    #[test]
    fn values_okteto_fills_in_are_dropped() {
        let c = ok("name: web\nimage: ${IMAGE}\nnamespace: $NS\nenvironment: [A=$B, C=d, E]\n");
        assert_eq!(c.notes.len(), 5, "{:?}", c.notes);
        assert_eq!(
            c.notes[1],
            "okteto.yml:2:8: `image` \"${IMAGE}\" uses a variable that okteto fills in when it runs, and devmount.yml holds plain values (the container's own image is used); dropped"
        );
        assert!(c.notes[2].starts_with("okteto.yml:3:12: `namespace` \"$NS\" uses a variable"));
        assert!(c.notes[3].starts_with("okteto.yml:4:15: `environment.A` \"$B\" uses a variable"));
        assert_eq!(
            c.notes[4],
            "okteto.yml:4:26: `environment` E takes its value from okteto's environment when it runs, and devmount.yml holds plain values (add E=VALUE); dropped"
        );
        assert!(
            c.manifest.ends_with("    deployment: web\n    environment:\n      C: d\n"),
            "{}",
            c.manifest
        );
        assert_eq!(
            error("name: ${NAME}\n", None),
            "okteto.yml:1:7: the dev container's name \"${NAME}\" uses a variable that okteto fills in when it runs; write the Deployment's name"
        );
        assert_eq!(
            error("name: web\nselector: {app: $APP}\n", None),
            "okteto.yml:2:17: selector value \"$APP\" uses a variable that okteto fills in when it runs; write the label's value"
        );
    }

    #[test]
    fn forwards() {
        let c = ok("forward: [\"80:81\"]\ndev:\n  web:\n    forward:\n      - 8080:80\n      - {localPort: 9000, remotePort: 9001}\n      - 5432:db:5432\n      - {localPort: 1, remotePort: 2, labels: {app: db}}\n    reverse: [\"9229:9230\"]\n");
        assert!(
            c.manifest.ends_with("forward:\n- 80:81\n- 8080:80\n- 9000:9001\nreverse:\n- 9229:9230\n"),
            "{}",
            c.manifest
        );
        assert_eq!(
            c.notes[1..],
            [
                "okteto.yml:7:9: `forward` 5432:db:5432 goes to the Service db, and devmount forwards only to the dev container's own ports (`kubectl port-forward` reaches a Service); dropped",
                "okteto.yml:8:9: `forward` 1:2 goes to the Service its labels select, and devmount forwards only to the dev container's own ports (`kubectl port-forward` reaches a Service); dropped",
            ]
        );
        let m = Manifest::parse(&c.manifest, Path::new(FILE_NAME), Path::new("/")).unwrap();
        assert_eq!(m.reverse, [PortForward { local: 9230, remote: 9229 }]);

        assert_eq!(
            error("forward: [\"80:81\"]\ndev:\n  web:\n    forward: [\"80:82\"]\n", None),
            "okteto.yml:4:15: forward lists the local port 80 twice"
        );
        assert_eq!(
            error("name: web\nforward: [\"8080\"]\n", None),
            "okteto.yml:2:11: forward \"8080\" is not LOCAL:REMOTE; write two ports, e.g. \"8080:8080\""
        );
        assert!(error("name: web\nforward: [{localPort: 1}]\n", None)
            .starts_with("okteto.yml:2:11: forward \"1:\" is not"));
        assert!(error("name: web\nforward: [{local: 1}]\n", None)
            .contains("2:12: unknown key \"local\"; known keys here: localPort, remotePort, name, labels"));
        assert_eq!(
            error("name: web\nreverse: [\"1:2\", \"1:3\"]\n", None),
            "okteto.yml:2:18: reverse lists the remote port 1 twice"
        );
    }

    #[test]
    fn values_are_checked_where_okteto_has_them() {
        let e = |body: &str| error(&format!("name: web\n{body}"), None);
        assert_eq!(
            e("container: Web\n"),
            "okteto.yml:2:12: container \"Web\" is not a Kubernetes name: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
        assert!(e("workdir: app\n").starts_with("okteto.yml:2:10: workdir \"app\": give an absolute path"));
        assert!(e("volumes: [/a/../b]\n").starts_with("okteto.yml:2:11: each volumes entry \"/a/../b\""));
        assert!(e("timeout: 1m30s\n")
            .starts_with("okteto.yml:2:10: kubernetes.timeout \"1m30s\": give a positive whole number"));
        assert!(e("timeout: {resources: 2d}\n").starts_with("okteto.yml:2:22: kubernetes.timeout \"2d\""));
        assert!(e("timeout: {idle: 1m}\n")
            .contains("2:11: unknown key \"idle\"; known keys here: default, resources"));
        assert!(e("resources: {limits: {memory: 1GB}}\n")
            .starts_with("okteto.yml:2:30: kubernetes.resources.limits.memory \"1GB\" is not a quantity"));
        assert!(e("securityContext: {runAsUser: -1}\n").starts_with(
            "okteto.yml:2:30: kubernetes.securityContext.runAsUser \"-1\": give a user or group id"
        ));
        assert!(e("securityContext: {capabilities: {add: [ptrace]}}\n").contains(
            "2:40: kubernetes.securityContext.capabilities.add: \"ptrace\" is not a capability name"
        ));
        assert!(e("persistentVolume: {accessMode: ReadOnlyMany}\n")
            .starts_with("okteto.yml:2:32: kubernetes.persistentVolume.accessMode \"ReadOnlyMany\""));
        assert_eq!(
            e("environment: [\"1A=x\"]\n"),
            "okteto.yml:2:15: environment variable \"1A\": use letters, digits and '_', not starting with a digit"
        );
        assert_eq!(
            e("environment: x\n"),
            "okteto.yml:2:14: environment must be a list of NAME=VALUE or a mapping of NAME: VALUE"
        );
        assert!(e("image: [a]\n").starts_with("okteto.yml:2:8: a list where a single value belongs"));
        assert!(e("selector: {}\n").contains("2:11: kubernetes.selector needs at least one label"));
        assert_eq!(
            e("persistentVolume: {enabled: false}\nvolumes: [/go]\n"),
            "okteto.yml:1:7: the dev container converts to a devmount.yml that does not load: kubernetes.volumes live on the persistent volume, which is off; remove them or enable persistentVolume"
        );
        assert!(error("dev:\n  Web: {}\n", None)
            .starts_with("okteto.yml:2:3: the dev container's name \"Web\" is not a Kubernetes name"));
        assert!(error("dev: [a]\n", None).starts_with("okteto.yml:1:6: dev must be a mapping"));
        assert!(error("dev:\n  a: [b]\n", None).starts_with("okteto.yml:2:6: dev a must be a mapping"));
        assert!(error("- a\n", None).starts_with("okteto.yml:1:1: an okteto manifest must be a mapping"));
        assert!(error("name: web\nimage: !tag x\n", None).contains("2:8: YAML tags"));
        assert!(error("dev:\n  web: {a: 1\n", None).starts_with("okteto.yml:3:1: not valid YAML: "));
        assert!(error("name: a\n---\nname: b\n", None).contains("a second YAML document"));
    }

    #[test]
    fn never_panics() {
        for text in [
            "dev: ~\n",
            "dev:\n  a: ~\n",
            "name: a\nforward: ~\nreverse:\nenvironment:\nvolumes:\nsync:\ntimeout:\ncommand:\n",
            "name: a\nsync: {folders: []}\n",
            "name: a\nsync: [\"nocolon\"]\n",
            "name: a\nsync: {compression: true}\n",
            "name: a\nsync: [\"x:$HOME\"]\n",
            "name: a\ncommand: []\n",
            "name: &n a\nenvironment: {A: *n}\n",
            "name: a\nenvironment: {A: *missing}\n",
            "name: a\nforward: [[1]]\n",
            "name: [a]\n",
            "? [a]\n: b\n",
            "name: a\nvolumes: [\"/\"]\n",
            "name: a\nworkdir: ///\n",
        ] {
            let _ = convert_as(text, None);
        }
    }
}
