//! `devmount render -f deployment.yaml [-m devmount.yml]`: the swap of a Deployment read from a
//! file, printed as the YAML documents `devmount up` would apply (the dev Deployment, the
//! persistent volume's claim, the session's Secret), offline, for review or GitOps.
//!
//! The Secret's values are placeholders: there is no session, so there are no keys. Fields the
//! API server sets (status, resourceVersion, uid, generation, creationTimestamp, managedFields)
//! are left out of the output, so a Deployment saved with `kubectl get -o yaml` renders into
//! something that can be applied.

use std::path::Path;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use serde::Deserialize;

use super::translate::{self, DevObjects, Session, SessionId, DEFAULT_SERVER_PORT};
use crate::manifest::{DevSettings, Manifest, ManifestTarget, Workload};

/// The session id in rendered objects (`devmount up` makes a fresh one per session).
pub const RENDER_SESSION: &str = "render";
/// The Secret's `authorized_keys` in rendered objects.
pub const AUTHORIZED_KEY_PLACEHOLDER: &str = "<the session's client public key, made by devmount up>";

/// `devmount render`: prints the swap of the Deployment in `file`, with the manifest at
/// `manifest` (default: ./devmount.yml, if there is one; without one, the defaults).
pub fn run(file: &Path, manifest: Option<&Path>) -> Result<()> {
    let manifest = match manifest {
        Some(path) => Some(Manifest::load(path)?),
        None => Manifest::find(&std::env::current_dir().context("cannot read the current directory")?)?,
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    print!("{}", render(&text, file, manifest.as_ref(), &session(manifest.as_ref()))?);
    Ok(())
}

/// The session `devmount render` shows: [`RENDER_SESSION`], placeholder keys, the default
/// port, and the manifest's forwards allowed.
pub fn session(manifest: Option<&Manifest>) -> Session {
    Session {
        id: SessionId::new(RENDER_SESSION).expect("RENDER_SESSION is a valid session id"),
        authorized_key: AUTHORIZED_KEY_PLACEHOLDER.into(),
        port: DEFAULT_SERVER_PORT,
        allow_forward: manifest.iter().flat_map(|m| &m.forward).map(|f| f.remote).collect(),
        allow_reverse: manifest.iter().flat_map(|m| &m.reverse).map(|f| f.remote).collect(),
    }
}

/// The YAML that [`run`] prints for `text`, the contents of `file` (named in messages).
pub fn render(text: &str, file: &Path, manifest: Option<&Manifest>, session: &Session) -> Result<String> {
    let kubernetes = match manifest.map(|m| (m, &m.target)) {
        Some((_, ManifestTarget::Kubernetes(k))) => Some(k.as_ref()),
        Some((m, ManifestTarget::Local(_))) => bail!(
            "{}: the target is local; `devmount render` needs `target: kubernetes: {{...}}` (see docs/manifest.md)",
            m.path.display()
        ),
        None => None,
    };
    let mut deployment = pick(text, file, kubernetes.map(|k| &k.workload))?;
    if let Some(wanted) = kubernetes.and_then(|k| k.namespace.as_deref()) {
        match deployment.metadata.namespace.as_deref() {
            Some(namespace) if namespace != wanted => bail!(
                "{}: the Deployment is in namespace {namespace}, the manifest's kubernetes.namespace is {wanted}; make them agree",
                file.display()
            ),
            _ => deployment.metadata.namespace = Some(wanted.to_owned()),
        }
    }
    drop_server_fields(&mut deployment);
    let default = DevSettings::default();
    let settings = kubernetes.map_or(&default, |k| &k.dev);
    let objects = translate::translate(&deployment, settings, session)
        .with_context(|| format!("{}", file.display()))?;
    to_yaml(&objects)
}

/// The objects as YAML documents: the Deployment, the claim (if any), the Secret.
pub fn to_yaml(objects: &DevObjects) -> Result<String> {
    let mut out = yaml(&objects.deployment)?;
    if let Some(claim) = &objects.volume_claim {
        out.push_str("---\n");
        out.push_str(&yaml(claim)?);
    }
    out.push_str("---\n");
    out.push_str(&yaml(&objects.secret)?);
    Ok(out)
}

/// One object as YAML, in the style of `kubectl get -o yaml`: block style, multi-line strings
/// as literal blocks, long single lines (the saved spec) left on one line, strings that YAML 1.1
/// readers would take for numbers or booleans quoted.
pub fn yaml<T: serde::Serialize>(object: &T) -> Result<String> {
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    serde_saphyr::to_string_with_options(object, options).context("cannot write YAML")
}

/// The fields of a document that tell what it is.
#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<HeaderMetadata>,
}

#[derive(Deserialize)]
struct HeaderMetadata {
    name: Option<String>,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// The Deployment in `text`: the only one, or the one `workload` names.
fn pick(text: &str, file: &Path, workload: Option<&Workload>) -> Result<Deployment> {
    let mut kinds = Vec::new();
    let mut found: Vec<(usize, &str, String)> = Vec::new();
    for (first_line, document) in documents(text) {
        let header: Option<Header> = parse(document, file, first_line)?;
        let Some(header) = header else { continue };
        let kind = header.kind.unwrap_or_else(|| "a document without a kind".into());
        if kind != "Deployment" {
            kinds.push(kind);
            continue;
        }
        let api = header.api_version.unwrap_or_default();
        if api != "apps/v1" {
            bail!(
                "{}:{first_line}: a Deployment of apiVersion {api:?}; devmount reads apps/v1, as `kubectl get deployment NAME -o yaml` prints it",
                file.display()
            );
        }
        let metadata = header.metadata.unwrap_or(HeaderMetadata { name: None, labels: None });
        let name = metadata.name.unwrap_or_default();
        let wanted = workload.is_none_or(|w| w.matches(&name, &metadata.labels.unwrap_or_default()));
        if wanted {
            found.push((first_line, document, name));
        } else {
            kinds.push(format!("Deployment {name}"));
        }
    }
    match found.as_slice() {
        [(first_line, document, _)] => {
            let deployment: Deployment = parse(document, file, *first_line)?;
            let raw: serde_json::Value = parse(document, file, *first_line)?;
            if let Some(field) = translate::lost_fields(&raw, &deployment).first() {
                bail!(
                    "{}: the Deployment's {field} is not a field devmount knows (Kubernetes 1.37); fix its name, or remove it: the swap would lose it",
                    file.display()
                );
            }
            Ok(deployment)
        }
        [] => {
            let what = match workload {
                Some(w) => format!("no Deployment matching the manifest's {w}"),
                None => "no Deployment".to_owned(),
            };
            let holds =
                if kinds.is_empty() { String::new() } else { format!(", only: {}", kinds.join(", ")) };
            bail!(
                "{} holds {what}{holds}; give the Deployment's YAML, e.g. from `kubectl get deployment NAME -o yaml`",
                file.display()
            )
        }
        several => {
            let names: Vec<&str> = several.iter().map(|(_, _, name)| name.as_str()).collect();
            bail!(
                "{} holds several Deployments ({}); name one with kubernetes.deployment in the manifest",
                file.display(),
                names.join(", ")
            )
        }
    }
}

/// `document` (starting on line `first_line` of `file`) as a `T`; errors name the file's line.
fn parse<'a, T: Deserialize<'a>>(document: &'a str, file: &Path, first_line: usize) -> Result<T> {
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options(document, options).map_err(|e| {
        let at = match e.location() {
            Some(at) => format!("{}:{}", at.line() as usize + first_line - 1, at.column()),
            None => first_line.to_string(),
        };
        // The plain message ends with its own place in the document ("... at line 3 column 5"),
        // which is not the file's line: cut it, and give the file's place in front instead.
        let message = e.without_snippet().to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        anyhow::anyhow!("{}:{at}: {}", file.display(), message.replace('\n', " "))
    })
}

/// The YAML documents of `text`, each with the line (from 1) it starts on. A line that starts
/// with `---` or `...` followed by a blank or its end always ends a document (YAML forbids
/// such a line inside any value), so splitting at them is exact, and each document can be
/// read, and its errors placed, on its own.
fn documents(text: &str) -> Vec<(usize, &str)> {
    let marker = |line: &str, mark: &str| {
        line.strip_prefix(mark).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let mut documents = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 1, 0);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches('\n');
        if marker(content, "---") {
            documents.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, index + 1);
        } else if marker(content, "...") {
            documents.push((start_line, &text[start..offset]));
            (start, start_line) = (offset + line.len(), index + 2);
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
}

/// Leaves out what the API server sets and a client must not send back.
fn drop_server_fields(deployment: &mut Deployment) {
    let metadata = &mut deployment.metadata;
    metadata.resource_version = None;
    metadata.uid = None;
    metadata.generation = None;
    metadata.creation_timestamp = None;
    metadata.managed_fields = None;
    metadata.self_link = None;
    deployment.status = None;
}
