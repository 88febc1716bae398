//! The swap: a Deployment in, its dev twin out, and back.
//!
//! [`translate`] patches a copy of the Deployment in place (same name, same selector, so Services
//! and the rest of the cluster keep finding it):
//! - replicas 1 and strategy Recreate, so one pod at a time holds the persistent volume;
//! - on the chosen container only: probes and lifecycle hooks removed (they watch or drive the
//!   program the dev container no longer runs), the command replaced by [`WAIT_SCRIPT`], which
//!   waits for the uploaded devmount-server on the [`SERVER_DIR`] emptyDir and execs it (with
//!   `serverImage`, an init container copies it there and the server is the command itself),
//!   the manifest's overrides applied, the session's volumes mounted;
//! - `devmount.dev/...` labels and annotations marking it, and the complete original spec in
//!   an annotation, which [`restore`] puts back exactly.
//!
//! Other containers and init containers are left as they are; devmount's own init containers
//! are added after them.
//!
//! Invariants: the functions here do no I/O and read no clock or randomness; everything that
//! differs between sessions comes in through [`Session`].

use std::collections::BTreeMap;
use std::io::{Read, Write};

use ::kube::ResourceExt;
use base64::Engine;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    ResourceRequirements, Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::manifest::{DevSettings, ResourceOverrides, SecurityOverrides};

/// The emptyDir the server is uploaded to (or copied to, with `serverImage`).
pub const SERVER_DIR: &str = "/devmount";
/// Where the server is once it is uploaded and checked.
pub const SERVER_PATH: &str = "/devmount/devmount-server";
/// Written once [`SERVER_PATH`] holds a checked server: [`WAIT_SCRIPT`] then execs it. It
/// outlives container restarts (the emptyDir does), so a restarted container starts the server
/// at once; replacing the server is renaming a new one over [`SERVER_PATH`] and ending the old.
pub const READY_PATH: &str = "/devmount/ready";
/// Where the session Secret's `authorized_keys` is mounted (read-only, that key alone).
pub const SECRET_DIR: &str = "/devmount-secret";
/// The server's `--authorized-keys` file.
pub const AUTHORIZED_KEYS_PATH: &str = "/devmount-secret/authorized_keys";
/// Where the seeding init container sees the whole persistent volume.
pub const CLAIM_DIR: &str = "/devmount-volume";
/// The environment variable holding the host private key (from the Secret, through
/// `secretKeyRef`); devmount-server removes it from its environment before anything starts.
pub const HOST_KEY_ENV: &str = "DEVMOUNT_HOST_KEY";
/// The environment variable holding the manifest's `command`, which [`WAIT_SCRIPT`] runs.
pub const COMMAND_ENV: &str = "DEVMOUNT_COMMAND";
/// The Secret's keys.
pub const SECRET_HOST_KEY: &str = "host_key";
pub const SECRET_AUTHORIZED_KEYS: &str = "authorized_keys";
/// What the Secret [`translate`] returns holds under [`SECRET_HOST_KEY`]: the caller puts the
/// session's host key (OpenSSH private key format) there before creating it.
pub const HOST_KEY_PLACEHOLDER: &str = "<the session's host private key, made by devmount up>";

/// On the Deployment, its pod template and the session's Secret: the session id.
pub const SESSION_LABEL: &str = "devmount.dev/session";
/// On the Deployment: the dev container's name.
pub const CONTAINER_ANNOTATION: &str = "devmount.dev/container";
/// On the Deployment: the session Secret's name.
pub const SECRET_ANNOTATION: &str = "devmount.dev/secret";
/// On the Deployment, with the persistent volume: the claim's name.
pub const CLAIM_ANNOTATION: &str = "devmount.dev/volume-claim";
/// On the Deployment: the original spec as JSON, or (when that is [`GZIP_THRESHOLD`] bytes or
/// more) under [`ORIGINAL_GZIP_ANNOTATION`] as gzip, then base64.
pub const ORIGINAL_ANNOTATION: &str = "devmount.dev/original-spec";
pub const ORIGINAL_GZIP_ANNOTATION: &str = "devmount.dev/original-spec-gzip";
/// On the Secret and the claim: the Deployment they belong to.
pub const DEPLOYMENT_ANNOTATION: &str = "devmount.dev/deployment";
/// Every label and annotation devmount sets starts with this; [`restore`] removes them all.
pub const KEY_PREFIX: &str = "devmount.dev/";

/// A spec whose JSON is this long or longer is saved compressed: most specs stay readable
/// with `kubectl get -o yaml`, and big ones stay well inside the 256 KiB that all of an
/// object's annotations may take together.
pub const GZIP_THRESHOLD: usize = 8 << 10;
/// The most the saved spec may take, compressed: half of the annotations' budget, leaving the
/// rest to the Deployment's own (kubectl's last-applied-configuration is about as big).
pub const MAX_SAVED_SPEC: usize = 128 << 10;
/// The most a saved spec may take once decompressed: a bound against a gzip bomb in an
/// annotation someone else wrote.
const MAX_SPEC_JSON: u64 = 16 << 20;

/// The workdir when neither the manifest nor the container gives one.
pub const DEFAULT_WORKDIR: &str = "/work";
/// The port devmount-server listens on, on the pod's 127.0.0.1, unless the caller picks another.
pub const DEFAULT_SERVER_PORT: u16 = 22022;

const SERVER_VOLUME: &str = "devmount-server";
const SECRET_VOLUME: &str = "devmount-secret";
const CLAIM_VOLUME: &str = "devmount-volume";
const COPY_CONTAINER: &str = "devmount-copy-server";
const SEED_CONTAINER: &str = "devmount-seed";
/// Where an image given as `serverImage` holds the server.
pub const SERVER_IMAGE_PATH: &str = "/devmount-server";
/// The claim's subdirectories: the workdir, and each of `volumes` under its own path.
const WORKDIR_SUBPATH: &str = "workdir";
const VOLUMES_SUBPATH: &str = "volumes";

/// The dev container's command (`/bin/sh -c WAIT_SCRIPT devmount ARGS...`, ARGS being the
/// server's): POSIX sh only, so it runs on busybox, Alpine, Debian and Ubuntu images alike. As
/// PID 1, sh ignores SIGTERM unless it traps it, and the pod would take its whole grace period
/// to stop. `sleep 0.2` is not POSIX; where it fails, whole seconds do.
pub const WAIT_SCRIPT: &str = r#"# devmount: wait for devmount-server, start the manifest's command beside it, become the server.
trap 'exit 143' TERM INT
until [ -e /devmount/ready ]; do sleep 0.2 2>/dev/null || sleep 1; done
if [ -n "${DEVMOUNT_COMMAND:-}" ]; then (unset DEVMOUNT_HOST_KEY; exec /bin/sh -c "$DEVMOUNT_COMMAND") & fi
exec /devmount/devmount-server "$@"
"#;

/// The seeding init container's command (`/bin/sh -c SEED_SCRIPT devmount-seed FROM TO ...`):
/// each FROM of the image is copied to TO on the claim if TO does not exist yet. The copy goes
/// to a side name first, so a copy cut short is redone, never taken for a finished one.
pub const SEED_SCRIPT: &str = r#"# devmount: copy each image directory to its place on the persistent volume, once.
set -e
while [ "$#" -ge 2 ]; do
  if [ ! -e "$2" ]; then
    rm -rf "$2.seeding"
    mkdir -p "$2.seeding" || { echo "devmount: this container's user cannot write to the persistent volume; set kubernetes.securityContext.fsGroup in devmount.yml" >&2; exit 1; }
    if [ -d "$1" ]; then cp -RP "$1/." "$2.seeding/"; fi
    mv "$2.seeding" "$2"
  fi
  shift 2
done
"#;

/// A swap that cannot be made, or a saved spec that cannot be read: one line, with the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

fn fail<T>(message: String) -> Result<T, Error> {
    Err(Error(message))
}

/// A session's id: lowercase letters, digits and `-`, at most 40, starting and ending with a
/// letter or digit, so that it is a label value and `devmount-ID` a Secret name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId(String);

impl SessionId {
    pub fn new(id: &str) -> Result<SessionId, Error> {
        let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid = id.len() <= 40
            && edge(id.chars().next())
            && edge(id.chars().last())
            && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return fail(format!(
                "session id {id:?}: use at most 40 lowercase letters, digits and '-', starting and ending with a letter or digit"
            ));
        }
        Ok(SessionId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The session Secret's name.
    pub fn secret_name(&self) -> String {
        format!("devmount-{}", self.0)
    }
}

/// What differs from one session to the next.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: SessionId,
    /// The client's public key: one authorized_keys line (`ssh-ed25519 AAAA... comment`).
    pub authorized_key: String,
    /// devmount-server's port on the pod's 127.0.0.1.
    pub port: u16,
    /// Ports the server lets the client reach (`--allow-forward`) and bind (`--allow-reverse`).
    pub allow_forward: Vec<u16>,
    pub allow_reverse: Vec<u16>,
}

/// What a session applies: the dev Deployment, the Secret to create before it, and, with the
/// persistent volume, the claim to create if it does not exist yet.
#[derive(Debug, Clone, PartialEq)]
pub struct DevObjects {
    pub deployment: Deployment,
    /// Holds [`HOST_KEY_PLACEHOLDER`] under [`SECRET_HOST_KEY`].
    pub secret: Secret,
    pub volume_claim: Option<PersistentVolumeClaim>,
}

/// The session a Deployment is in dev mode for, if it is.
pub fn session_of(deployment: &Deployment) -> Option<&str> {
    deployment.labels().get(SESSION_LABEL).map(String::as_str)
}

/// The dev twin of `original` for `session`, with `settings` applied. See the module's doc.
pub fn translate(
    original: &Deployment,
    settings: &DevSettings,
    session: &Session,
) -> Result<DevObjects, Error> {
    let name = match original.metadata.name.as_deref() {
        Some(name) if !name.is_empty() => name,
        _ => return fail("the Deployment has no metadata.name".into()),
    };
    let what = format!("deployment/{name}");
    if let Some(other) = session_of(original) {
        return fail(format!(
            "{what} is already in dev mode (session {other}); `devmount down` restores it before another swap"
        ));
    }
    if let Some(key) = original.annotations().keys().find(|k| k.starts_with(KEY_PREFIX)) {
        return fail(format!(
            "{what} carries devmount's annotation {key} but no session label; remove the annotation, or restore the Deployment by hand"
        ));
    }
    let spec = &original.spec;
    if spec.paused == Some(true) {
        return fail(format!(
            "{what} is paused, so its pods would not change; `kubectl rollout resume {what}` first"
        ));
    }
    let Some(pod) = &spec.template.spec else { return fail(format!("{what} has no spec.template.spec")) };
    if let Some((_, problem)) = settings.conflict() {
        return fail(problem.into());
    }
    let index = container_index(pod, settings.container.as_deref(), &what)?;
    let container = &pod.containers[index];
    check_names_free(pod, &what)?;
    let workdir = workdir(settings, container)?;
    let claim = settings.persistent_volume.enabled.then(|| claim_name(name, &container.name)).transpose()?;
    let mounts = dev_mounts(&workdir, &settings.volumes, claim.is_some());
    check_mounts(container, &mounts)?;
    let secret_name = session.id.secret_name();
    let saved = save_spec(spec)?;

    let mut deployment = original.clone();
    deployment.labels_mut().insert(SESSION_LABEL.into(), session.id.as_str().into());
    let annotations = deployment.annotations_mut();
    annotations.insert(CONTAINER_ANNOTATION.into(), container.name.clone());
    annotations.insert(SECRET_ANNOTATION.into(), secret_name.clone());
    if let Some(claim) = &claim {
        annotations.insert(CLAIM_ANNOTATION.into(), claim.clone());
    }
    annotations.insert(saved.0.into(), saved.1);

    let spec = &mut deployment.spec;
    spec.replicas = Some(1);
    spec.strategy = Some(DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None });
    let template = &mut spec.template;
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert(SESSION_LABEL.into(), session.id.as_str().into());
    let pod = template.spec.get_or_insert_with(Default::default);
    if let Some(group) = settings.security_context.fs_group {
        pod.security_context.get_or_insert_with(PodSecurityContext::default).fs_group = Some(group);
    }

    let dev = &mut pod.containers[index];
    dev_container(dev, settings, session, &workdir, &mounts);
    let init = match &settings.server_image {
        Some(image) => Some(copy_container(image, dev)),
        None => claim.is_some().then(|| seed_container(dev, &mounts)),
    };
    if let Some(init) = init {
        pod.init_containers.get_or_insert_with(Vec::new).push(init);
    }
    pod.volumes.get_or_insert_with(Vec::new).extend(pod_volumes(&secret_name, claim.as_deref()));

    let namespace = original.metadata.namespace.clone();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name),
            namespace: namespace.clone(),
            labels: Some(BTreeMap::from([(SESSION_LABEL.into(), session.id.as_str().into())])),
            annotations: Some(BTreeMap::from([(DEPLOYMENT_ANNOTATION.into(), name.into())])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (SECRET_AUTHORIZED_KEYS.into(), format!("{}\n", session.authorized_key.trim_end())),
            (SECRET_HOST_KEY.into(), HOST_KEY_PLACEHOLDER.into()),
        ])),
        ..Secret::default()
    };
    let volume_claim = claim.map(|claim| volume_claim(claim, namespace, name, &container.name, settings));
    Ok(DevObjects { deployment, secret, volume_claim })
}

/// The paths of the fields of `raw` (a Deployment as JSON) that `typed`, read from it, does not
/// hold: misspelt fields, or fields of a Kubernetes newer than devmount's types (1.37). The
/// saved spec would not hold them, so [`restore`] would not give them back. Fields set to
/// null are absent in Kubernetes' eyes too, and not counted.
pub fn lost_fields(raw: &serde_json::Value, typed: &Deployment) -> Vec<String> {
    fn walk(raw: &serde_json::Value, kept: &serde_json::Value, path: &str, lost: &mut Vec<String>) {
        use serde_json::Value;
        match (raw, kept) {
            (Value::Object(raw), Value::Object(kept)) => {
                for (key, value) in raw.iter().filter(|(_, v)| !v.is_null()) {
                    let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    match kept.get(key) {
                        Some(kept) => walk(value, kept, &path, lost),
                        None => lost.push(path),
                    }
                }
            }
            (Value::Array(raw), Value::Array(kept)) => {
                for (index, (value, kept)) in raw.iter().zip(kept).enumerate() {
                    walk(value, kept, &format!("{path}[{index}]"), lost);
                }
            }
            _ => {}
        }
    }
    let kept = serde_json::to_value(typed).unwrap_or_default();
    let mut lost = Vec::new();
    walk(raw, &kept, "", &mut lost);
    lost
}

/// The Deployment as it was before [`translate`]: `dev` with the saved spec put back and
/// devmount's labels and annotations removed. The rest of the metadata (resourceVersion, other
/// tools' annotations) stays as `dev` has it, so the result can replace `dev` in the cluster.
pub fn restore(dev: &Deployment) -> Result<Deployment, Error> {
    let what = format!("deployment/{}", dev.metadata.name.as_deref().unwrap_or("?"));
    let spec = load_spec(dev.annotations(), &what)?;
    let mut original = dev.clone();
    original.spec = spec;
    let metadata = &mut original.metadata;
    for map in [&mut metadata.labels, &mut metadata.annotations] {
        if let Some(entries) = map {
            entries.retain(|key, _| !key.starts_with(KEY_PREFIX));
            if entries.is_empty() {
                *map = None;
            }
        }
    }
    Ok(original)
}

/// The volumes devmount adds to the pod: the server's emptyDir, the Secret's authorized_keys
/// (that key alone: the host key goes by environment), and the claim.
fn pod_volumes(secret_name: &str, claim: Option<&str>) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: SERVER_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: SECRET_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name.into()),
                items: Some(vec![KeyToPath {
                    key: SECRET_AUTHORIZED_KEYS.into(),
                    path: SECRET_AUTHORIZED_KEYS.into(),
                    mode: None,
                    user: None,
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if let Some(claim) = claim {
        volumes.push(Volume {
            name: CLAIM_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.into(),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    volumes
}

/// The chosen container's place in `pod.containers`.
fn container_index(pod: &PodSpec, wanted: Option<&str>, what: &str) -> Result<usize, Error> {
    if pod.containers.is_empty() {
        return fail(format!("{what} has no containers"));
    }
    let Some(wanted) = wanted else { return Ok(0) };
    pod.containers.iter().position(|c| c.name == wanted).ok_or_else(|| {
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        Error(format!(
            "{what} has no container {wanted:?}; set kubernetes.container to one of: {}",
            names.join(", ")
        ))
    })
}

/// Names devmount adds must not be taken already.
fn check_names_free(pod: &PodSpec, what: &str) -> Result<(), Error> {
    let volumes = pod.volumes.iter().flatten().map(|v| v.name.as_str());
    if let Some(taken) =
        volumes.into_iter().find(|n| [SERVER_VOLUME, SECRET_VOLUME, CLAIM_VOLUME].contains(n))
    {
        return fail(format!("{what} already has a volume named {taken}, which devmount adds; rename it"));
    }
    let init = pod.init_containers.iter().flatten().map(|c| c.name.as_str());
    if let Some(taken) = init.into_iter().find(|n| [COPY_CONTAINER, SEED_CONTAINER].contains(n)) {
        return fail(format!(
            "{what} already has an init container named {taken}, which devmount adds; rename it"
        ));
    }
    Ok(())
}

/// The manifest's workdir, else the container's, else [`DEFAULT_WORKDIR`]; checked to be an
/// absolute path outside devmount's own directories.
fn workdir(settings: &DevSettings, container: &Container) -> Result<String, Error> {
    let (workdir, from) = match (&settings.workdir, &container.working_dir) {
        (Some(dir), _) => (dir.clone(), "kubernetes.workdir"),
        (None, Some(dir)) if !dir.is_empty() => {
            let trimmed = dir.trim_end_matches('/');
            let plain = trimmed.strip_prefix('/').is_some_and(|rest| {
                !rest.is_empty() && rest.split('/').all(|c| !matches!(c, "" | "." | ".."))
            });
            if !plain {
                return fail(format!(
                    "container {}'s workingDir {dir:?} is not an absolute path below /; set kubernetes.workdir",
                    container.name
                ));
            }
            (trimmed.to_owned(), "the container's workingDir")
        }
        _ => (DEFAULT_WORKDIR.to_owned(), "the default workdir"),
    };
    for path in std::iter::once(&workdir).chain(&settings.volumes) {
        let inside =
            |dir: &str| path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'));
        if let Some(dir) = [SERVER_DIR, SECRET_DIR, CLAIM_DIR].into_iter().find(|d| inside(d)) {
            let what = if *path == workdir { from } else { "kubernetes.volumes" };
            return fail(format!("{what} {path} is inside {dir}, which devmount uses; pick another path"));
        }
    }
    if settings.volumes.contains(&workdir) {
        return fail(format!(
            "kubernetes.volumes lists the workdir {workdir}, which is on the persistent volume already; remove it"
        ));
    }
    Ok(workdir)
}

/// `devmount-DEPLOYMENT-CONTAINER`: one claim per container developed, kept across sessions.
fn claim_name(deployment: &str, container: &str) -> Result<String, Error> {
    let name = format!("devmount-{deployment}-{container}");
    if name.len() > 253 {
        return fail(format!(
            "the volume claim's name {name} is longer than Kubernetes allows; turn persistentVolume off or shorten the names"
        ));
    }
    Ok(name)
}

/// The mounts the dev container gets, in the order they are added.
fn dev_mounts(workdir: &str, volumes: &[String], claim: bool) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str, sub: Option<String>, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        sub_path: sub,
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let mut mounts =
        vec![mount(SERVER_VOLUME, SERVER_DIR, None, false), mount(SECRET_VOLUME, SECRET_DIR, None, true)];
    if claim {
        mounts.push(mount(CLAIM_VOLUME, workdir, Some(WORKDIR_SUBPATH.into()), false));
        for path in volumes {
            mounts.push(mount(CLAIM_VOLUME, path, Some(format!("{VOLUMES_SUBPATH}{path}")), false));
        }
    }
    mounts
}

/// Two mounts at one path are refused by the API server; say which before it does.
fn check_mounts(container: &Container, mounts: &[VolumeMount]) -> Result<(), Error> {
    for existing in container.volume_mounts.iter().flatten() {
        if let Some(ours) = mounts.iter().find(|m| m.mount_path == existing.mount_path.trim_end_matches('/'))
        {
            return fail(format!(
                "container {} already mounts {} at {}, where devmount mounts {}; pick another kubernetes.workdir or volumes path, or turn persistentVolume off",
                container.name, existing.name, existing.mount_path, ours.name
            ));
        }
    }
    Ok(())
}

/// The server's command line after its program name.
fn server_args(workdir: &str, session: &Session) -> Vec<String> {
    let mut args: Vec<String> = [
        "--root",
        workdir,
        "--listen",
        &format!("127.0.0.1:{}", session.port),
        "--host-key-env",
        HOST_KEY_ENV,
        "--authorized-keys",
        AUTHORIZED_KEYS_PATH,
    ]
    .map(String::from)
    .into();
    for port in &session.allow_forward {
        args.extend(["--allow-forward".into(), port.to_string()]);
    }
    for port in &session.allow_reverse {
        args.extend(["--allow-reverse".into(), port.to_string()]);
    }
    args
}

fn dev_container(
    dev: &mut Container,
    settings: &DevSettings,
    session: &Session,
    workdir: &str,
    mounts: &[VolumeMount],
) {
    if let Some(image) = &settings.image {
        dev.image = Some(image.clone());
    }
    let args = server_args(workdir, session);
    if settings.server_image.is_some() {
        dev.command = Some(vec![SERVER_PATH.into()]);
        dev.args = Some(args);
    } else {
        dev.command = Some(vec!["/bin/sh".into(), "-c".into(), WAIT_SCRIPT.into(), "devmount".into()]);
        dev.args = Some(args);
    }
    dev.working_dir = Some(workdir.into());
    dev.liveness_probe = None;
    dev.readiness_probe = None;
    dev.startup_probe = None;
    dev.lifecycle = None;

    let env = dev.env.get_or_insert_with(Vec::new);
    let mut set = |var: EnvVar| match env.iter_mut().find(|e| e.name == var.name) {
        Some(existing) => *existing = var,
        None => env.push(var),
    };
    for (name, value) in &settings.environment {
        set(EnvVar { name: name.clone(), value: Some(value.clone()), value_from: None });
    }
    if let Some(command) = &settings.command {
        set(EnvVar { name: COMMAND_ENV.into(), value: Some(command.clone()), value_from: None });
    }
    set(EnvVar {
        name: HOST_KEY_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: session.id.secret_name(),
                key: SECRET_HOST_KEY.into(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
    });

    if !settings.resources.requests.is_empty() || !settings.resources.limits.is_empty() {
        override_resources(
            dev.resources.get_or_insert_with(ResourceRequirements::default),
            &settings.resources,
        );
    }
    if overrides_container(&settings.security_context) {
        override_security(
            dev.security_context.get_or_insert_with(SecurityContext::default),
            &settings.security_context,
        );
    }
    dev.volume_mounts.get_or_insert_with(Vec::new).extend_from_slice(mounts);
}

fn override_resources(resources: &mut ResourceRequirements, overrides: &ResourceOverrides) {
    for (map, given) in
        [(&mut resources.requests, &overrides.requests), (&mut resources.limits, &overrides.limits)]
    {
        if !given.is_empty() {
            let map = map.get_or_insert_with(BTreeMap::new);
            for (name, quantity) in given {
                map.insert(name.clone(), Quantity(quantity.clone()));
            }
        }
    }
}

/// Whether `overrides` sets anything on the container's own securityContext (`fsGroup` is
/// the pod's).
fn overrides_container(overrides: &SecurityOverrides) -> bool {
    let SecurityOverrides {
        run_as_user,
        run_as_group,
        run_as_non_root,
        fs_group: _,
        privileged,
        allow_privilege_escalation,
        read_only_root_filesystem,
        capabilities_add,
        capabilities_drop,
    } = overrides;
    run_as_user.is_some()
        || run_as_group.is_some()
        || run_as_non_root.is_some()
        || privileged.is_some()
        || allow_privilege_escalation.is_some()
        || read_only_root_filesystem.is_some()
        || capabilities_add.is_some()
        || capabilities_drop.is_some()
}

fn override_security(context: &mut SecurityContext, overrides: &SecurityOverrides) {
    fn set<T: Clone>(field: &mut Option<T>, value: &Option<T>) {
        if value.is_some() {
            field.clone_from(value);
        }
    }
    set(&mut context.run_as_user, &overrides.run_as_user);
    set(&mut context.run_as_group, &overrides.run_as_group);
    set(&mut context.run_as_non_root, &overrides.run_as_non_root);
    set(&mut context.privileged, &overrides.privileged);
    set(&mut context.allow_privilege_escalation, &overrides.allow_privilege_escalation);
    set(&mut context.read_only_root_filesystem, &overrides.read_only_root_filesystem);
    if overrides.capabilities_add.is_some() || overrides.capabilities_drop.is_some() {
        let capabilities = context.capabilities.get_or_insert_with(Capabilities::default);
        set(&mut capabilities.add, &overrides.capabilities_add);
        set(&mut capabilities.drop, &overrides.capabilities_drop);
    }
}

/// With `serverImage`: copies the server from that image into [`SERVER_DIR`], as the dev
/// container's user (so that it may run it) and within its resources (so that a quota that
/// asks for them admits it).
fn copy_container(image: &str, dev: &Container) -> Container {
    Container {
        name: COPY_CONTAINER.into(),
        image: Some(image.into()),
        command: Some(vec!["cp".into(), SERVER_IMAGE_PATH.into(), SERVER_PATH.into()]),
        resources: dev.resources.clone(),
        security_context: dev.security_context.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: SERVER_VOLUME.into(),
            mount_path: SERVER_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// Seeds the claim from the dev image, as the dev container's user: the workdir and each of
/// `volumes` that the claim does not hold yet.
fn seed_container(dev: &Container, mounts: &[VolumeMount]) -> Container {
    let mut command = vec!["/bin/sh".into(), "-c".into(), SEED_SCRIPT.into(), "devmount-seed".into()];
    for mount in mounts.iter().filter(|m| m.name == CLAIM_VOLUME) {
        let sub = mount.sub_path.as_deref().unwrap_or_default();
        command.extend([mount.mount_path.clone(), format!("{CLAIM_DIR}/{sub}")]);
    }
    Container {
        name: SEED_CONTAINER.into(),
        image: dev.image.clone(),
        image_pull_policy: dev.image_pull_policy.clone(),
        command: Some(command),
        resources: dev.resources.clone(),
        security_context: dev.security_context.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: CLAIM_VOLUME.into(),
            mount_path: CLAIM_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn volume_claim(
    name: String,
    namespace: Option<String>,
    deployment: &str,
    container: &str,
    settings: &DevSettings,
) -> PersistentVolumeClaim {
    let volume = &settings.persistent_volume;
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name),
            namespace,
            annotations: Some(BTreeMap::from([
                (DEPLOYMENT_ANNOTATION.into(), deployment.into()),
                (CONTAINER_ANNOTATION.into(), container.into()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![volume.access_mode.clone()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(volume.size.clone()))])),
                limits: None,
            }),
            storage_class_name: volume.storage_class.clone(),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The annotation that saves `spec`: its key and value.
fn save_spec(spec: &DeploymentSpec) -> Result<(&'static str, String), Error> {
    let json = serde_json::to_string(spec)
        .map_err(|e| Error(format!("cannot encode the Deployment's spec: {e}")))?;
    if json.len() < GZIP_THRESHOLD {
        return Ok((ORIGINAL_ANNOTATION, json));
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let compressed = encoder
        .write_all(json.as_bytes())
        .and_then(|()| encoder.finish())
        .map_err(|e| Error(format!("cannot compress the Deployment's spec: {e}")))?;
    let value = base64::engine::general_purpose::STANDARD.encode(compressed);
    if value.len() > MAX_SAVED_SPEC {
        return fail(format!(
            "the Deployment's spec takes {} bytes compressed, more than the {MAX_SAVED_SPEC} an annotation can hold here",
            value.len()
        ));
    }
    Ok((ORIGINAL_GZIP_ANNOTATION, value))
}

/// The spec [`save_spec`] saved in `annotations`.
fn load_spec(annotations: &BTreeMap<String, String>, what: &str) -> Result<DeploymentSpec, Error> {
    let bad = |problem: String| {
        Error(format!("{what}: devmount's saved spec cannot be read ({problem}); restore the Deployment from its source"))
    };
    let json = match (annotations.get(ORIGINAL_ANNOTATION), annotations.get(ORIGINAL_GZIP_ANNOTATION)) {
        (Some(json), None) => json.clone(),
        (None, Some(encoded)) => {
            let compressed = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| bad(format!("{ORIGINAL_GZIP_ANNOTATION} is not base64: {e}")))?;
            let mut json = String::new();
            flate2::read::GzDecoder::new(compressed.as_slice())
                .take(MAX_SPEC_JSON)
                .read_to_string(&mut json)
                .map_err(|e| bad(format!("{ORIGINAL_GZIP_ANNOTATION} is not gzip of text: {e}")))?;
            json
        }
        (None, None) => {
            return fail(format!("{what} is not in dev mode: it has no {ORIGINAL_ANNOTATION} annotation"))
        }
        (Some(_), Some(_)) => {
            return Err(bad(format!("both {ORIGINAL_ANNOTATION} and {ORIGINAL_GZIP_ANNOTATION} are set")))
        }
    };
    serde_json::from_str(&json).map_err(|e| bad(format!("not a Deployment spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::PersistentVolume;
    use serde_json::json;

    fn deployment(value: serde_json::Value) -> Deployment {
        serde_json::from_value(value).expect("a Deployment")
    }

    /// A Deployment with the given containers (name, workingDir) and extra pod spec fields.
    fn with_containers(containers: serde_json::Value, pod: serde_json::Value) -> Deployment {
        let mut spec = json!({"containers": containers});
        spec.as_object_mut().unwrap().extend(pod.as_object().unwrap().clone());
        deployment(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "app", "namespace": "dev"},
            "spec": {
                "selector": {"matchLabels": {"app": "app"}},
                "template": {"metadata": {"labels": {"app": "app"}}, "spec": spec}
            }
        }))
    }

    fn simple() -> Deployment {
        with_containers(json!([{"name": "app", "image": "busybox"}]), json!({}))
    }

    fn session() -> Session {
        Session {
            id: SessionId::new("s1").unwrap(),
            authorized_key: "ssh-ed25519 AAAA key\n".into(),
            port: 2222,
            allow_forward: vec![],
            allow_reverse: vec![],
        }
    }

    fn swap(original: &Deployment, settings: &DevSettings) -> Result<DevObjects, String> {
        translate(original, settings, &session()).map_err(|e| e.to_string())
    }

    fn pod(objects: &DevObjects) -> &PodSpec {
        objects.deployment.spec.template.spec.as_ref().unwrap()
    }

    #[test]
    fn session_ids() {
        for good in ["a", "s1", "0-x-9", &"a".repeat(40)] {
            assert_eq!(SessionId::new(good).unwrap().as_str(), good);
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(41)] {
            let message = SessionId::new(bad).unwrap_err().to_string();
            assert!(message.contains("use at most 40 lowercase letters"), "{bad}: {message}");
        }
    }

    #[test]
    fn big_specs_are_saved_compressed() {
        let env: Vec<_> = (0..400)
            .map(|i| json!({"name": format!("VAR_{i}"), "value": format!("value number {i}")}))
            .collect();
        let original = with_containers(json!([{"name": "app", "image": "busybox", "env": env}]), json!({}));
        assert!(serde_json::to_string(&original.spec).unwrap().len() >= GZIP_THRESHOLD);
        let dev = swap(&original, &DevSettings::default()).unwrap();
        let annotations = dev.deployment.annotations();
        assert!(!annotations.contains_key(ORIGINAL_ANNOTATION));
        let saved = &annotations[ORIGINAL_GZIP_ANNOTATION];
        assert!(saved.len() < GZIP_THRESHOLD, "compressed: {} bytes", saved.len());
        assert_eq!(restore(&dev.deployment).unwrap(), original);

        let small = swap(&simple(), &DevSettings::default()).unwrap();
        assert!(small.deployment.annotations()[ORIGINAL_ANNOTATION].starts_with("{\"selector\":"));
        assert!(!small.deployment.annotations().contains_key(ORIGINAL_GZIP_ANNOTATION));
    }

    #[test]
    fn a_spec_too_big_to_save_is_refused() {
        // Values that do not compress: a linear congruential generator's digits.
        let mut x: u64 = 1;
        let env: Vec<_> = (0..3000)
            .map(|i| {
                let value: String = (0..64)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        char::from(b'a' + (x >> 59) as u8)
                    })
                    .collect();
                json!({"name": format!("V{i}"), "value": value})
            })
            .collect();
        let original = with_containers(json!([{"name": "app", "env": env}]), json!({}));
        let message = swap(&original, &DevSettings::default()).unwrap_err();
        assert!(message.contains("more than the 131072 an annotation can hold"), "{message}");
    }

    #[test]
    fn restore_errors() {
        let dev = swap(&simple(), &DevSettings::default()).unwrap().deployment;
        let error = |change: &dyn Fn(&mut BTreeMap<String, String>)| {
            let mut broken = dev.clone();
            change(broken.annotations_mut());
            restore(&broken).unwrap_err().to_string()
        };
        assert_eq!(
            restore(&simple()).unwrap_err().to_string(),
            "deployment/app is not in dev mode: it has no devmount.dev/original-spec annotation"
        );
        assert!(error(&|a| {
            a.insert(ORIGINAL_GZIP_ANNOTATION.into(), "x".into());
        })
        .contains("both devmount.dev/original-spec and devmount.dev/original-spec-gzip are set"));
        let gzip = |value: &str| {
            let value = value.to_owned();
            move |a: &mut BTreeMap<String, String>| {
                a.remove(ORIGINAL_ANNOTATION);
                a.insert(ORIGINAL_GZIP_ANNOTATION.into(), value.clone());
            }
        };
        assert!(error(&gzip("not base64!")).contains("is not base64"));
        assert!(error(&gzip("aGVsbG8=")).contains("is not gzip of text"));
        let message = error(&|a| {
            a.insert(ORIGINAL_ANNOTATION.into(), "{\"replicas\":\"two\"}".into());
        });
        assert!(
            message
                .starts_with("deployment/app: devmount's saved spec cannot be read (not a Deployment spec: ")
                && message.ends_with("restore the Deployment from its source"),
            "{message}"
        );
    }

    #[test]
    fn restore_removes_only_devmount_marks() {
        let mut original = simple();
        original.labels_mut().insert("team".into(), "a".into());
        original.annotations_mut().insert("note".into(), "kept".into());
        let mut dev = swap(&original, &DevSettings::default()).unwrap().deployment;
        // What the cluster adds while the swap is on stays.
        dev.metadata.resource_version = Some("42".into());
        dev.annotations_mut().insert("deployment.kubernetes.io/revision".into(), "2".into());
        let restored = restore(&dev).unwrap();
        assert_eq!(restored.spec, original.spec);
        assert_eq!(restored.labels(), original.labels());
        assert_eq!(restored.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(
            restored.annotations().keys().collect::<Vec<_>>(),
            ["deployment.kubernetes.io/revision", "note"]
        );
        // Maps devmount alone filled are gone, not left empty.
        let bare = restore(&swap(&simple(), &DevSettings::default()).unwrap().deployment).unwrap();
        assert_eq!((bare.metadata.labels, bare.metadata.annotations), (None, None));
    }

    #[test]
    fn refusals() {
        let settings = DevSettings::default();
        let dev = swap(&simple(), &settings).unwrap().deployment;
        assert_eq!(
            swap(&dev, &settings).unwrap_err(),
            "deployment/app is already in dev mode (session s1); `devmount down` restores it before another swap"
        );
        let mut stray = simple();
        stray.annotations_mut().insert(ORIGINAL_ANNOTATION.into(), "{}".into());
        assert!(swap(&stray, &settings)
            .unwrap_err()
            .contains("carries devmount's annotation devmount.dev/original-spec"));
        let mut nameless = simple();
        nameless.metadata.name = None;
        assert_eq!(swap(&nameless, &settings).unwrap_err(), "the Deployment has no metadata.name");
        let mut paused = simple();
        paused.spec.paused = Some(true);
        assert!(swap(&paused, &settings)
            .unwrap_err()
            .contains("`kubectl rollout resume deployment/app` first"));
        let mut podless = simple();
        podless.spec.template.spec = None;
        assert_eq!(swap(&podless, &settings).unwrap_err(), "deployment/app has no spec.template.spec");
        assert_eq!(
            swap(&with_containers(json!([]), json!({})), &settings).unwrap_err(),
            "deployment/app has no containers"
        );
        let two = with_containers(json!([{"name": "a"}, {"name": "b"}]), json!({}));
        let pick = |name: &str| DevSettings { container: Some(name.into()), ..DevSettings::default() };
        assert_eq!(
            swap(&two, &pick("c")).unwrap_err(),
            "deployment/app has no container \"c\"; set kubernetes.container to one of: a, b"
        );
        assert_eq!(swap(&two, &pick("b")).unwrap().deployment.annotations()[CONTAINER_ANNOTATION], "b");

        let taken = with_containers(
            json!([{"name": "app"}]),
            json!({"volumes": [{"name": "devmount-secret", "emptyDir": {}}]}),
        );
        assert_eq!(
            swap(&taken, &settings).unwrap_err(),
            "deployment/app already has a volume named devmount-secret, which devmount adds; rename it"
        );
        let taken =
            with_containers(json!([{"name": "app"}]), json!({"initContainers": [{"name": "devmount-seed"}]}));
        assert!(swap(&taken, &settings).unwrap_err().contains("an init container named devmount-seed"));
    }

    #[test]
    fn settings_that_cannot_go_together() {
        let volumes = DevSettings {
            volumes: vec!["/go".into()],
            persistent_volume: PersistentVolume { enabled: false, ..PersistentVolume::default() },
            ..DevSettings::default()
        };
        assert!(swap(&simple(), &volumes)
            .unwrap_err()
            .starts_with("kubernetes.volumes live on the persistent volume"));
        let command = DevSettings {
            command: Some("make".into()),
            server_image: Some("x".into()),
            ..DevSettings::default()
        };
        assert!(swap(&simple(), &command)
            .unwrap_err()
            .starts_with("kubernetes.command runs under the image's sh"));
    }

    #[test]
    fn workdir_checks() {
        let workdir = |dir: &str| DevSettings { workdir: Some(dir.into()), ..DevSettings::default() };
        assert_eq!(
            swap(&simple(), &workdir("/devmount/src")).unwrap_err(),
            "kubernetes.workdir /devmount/src is inside /devmount, which devmount uses; pick another path"
        );
        assert!(swap(&simple(), &workdir("/devmount-secret"))
            .unwrap_err()
            .contains("inside /devmount-secret"));
        assert!(swap(&simple(), &workdir("/devmountx")).is_ok(), "a sibling of /devmount is fine");
        let volumes = DevSettings { volumes: vec!["/devmount-volume/x".into()], ..DevSettings::default() };
        assert!(swap(&simple(), &volumes)
            .unwrap_err()
            .starts_with("kubernetes.volumes /devmount-volume/x is inside"));
        let volumes = DevSettings { volumes: vec!["/work".into()], ..DevSettings::default() };
        assert_eq!(
            swap(&simple(), &volumes).unwrap_err(),
            "kubernetes.volumes lists the workdir /work, which is on the persistent volume already; remove it"
        );
        for bad in ["app", "/", "//", "/a/../b"] {
            let original = with_containers(json!([{"name": "app", "workingDir": bad}]), json!({}));
            let message = swap(&original, &DevSettings::default()).unwrap_err();
            assert!(
                message.contains("is not an absolute path below /; set kubernetes.workdir"),
                "{bad}: {message}"
            );
        }
        let original = with_containers(json!([{"name": "app", "workingDir": "/srv/"}]), json!({}));
        let dev = swap(&original, &DevSettings::default()).unwrap();
        assert_eq!(pod(&dev).containers[0].working_dir.as_deref(), Some("/srv"));

        let mounted = with_containers(
            json!([{"name": "app", "workingDir": "/data", "volumeMounts": [{"name": "cache", "mountPath": "/data/"}]}]),
            json!({"volumes": [{"name": "cache", "emptyDir": {}}]}),
        );
        assert!(swap(&mounted, &DevSettings::default()).unwrap_err().starts_with(
            "container app already mounts cache at /data/, where devmount mounts devmount-volume;"
        ));
        let off = DevSettings {
            persistent_volume: PersistentVolume { enabled: false, ..PersistentVolume::default() },
            ..DevSettings::default()
        };
        assert!(swap(&mounted, &off).is_ok(), "without the volume, nothing is mounted at the workdir");

        let mut long = simple();
        long.metadata.name = Some("a".repeat(250));
        assert!(swap(&long, &DevSettings::default())
            .unwrap_err()
            .contains("is longer than Kubernetes allows"));
    }

    #[test]
    fn settings_touch_only_what_they_name() {
        let original = with_containers(
            json!([{"name": "app", "image": "busybox", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]),
            json!({}),
        );
        let settings = DevSettings {
            environment: vec![("B".into(), "3".into()), ("C".into(), "4".into())],
            security_context: SecurityOverrides { fs_group: Some(7), ..SecurityOverrides::default() },
            ..DevSettings::default()
        };
        let dev = swap(&original, &settings).unwrap();
        let container = &pod(&dev).containers[0];
        let env: Vec<(&str, Option<&str>)> =
            container.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
        assert_eq!(env, [("A", Some("1")), ("B", Some("3")), ("C", Some("4")), (HOST_KEY_ENV, None)]);
        assert_eq!(container.security_context, None, "fsGroup is the pod's");
        assert_eq!(container.resources, None);
        assert_eq!(pod(&dev).security_context.as_ref().unwrap().fs_group, Some(7));

        let resources = DevSettings {
            resources: ResourceOverrides { requests: vec![], limits: vec![("memory".into(), "1Gi".into())] },
            persistent_volume: PersistentVolume { enabled: false, ..PersistentVolume::default() },
            ..DevSettings::default()
        };
        let dev = swap(&original, &resources).unwrap();
        let limits = pod(&dev).containers[0].resources.as_ref().unwrap();
        assert_eq!(limits.requests, None);
        assert_eq!(limits.limits, Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])));
        assert_eq!(dev.volume_claim, None);
        assert_eq!(pod(&dev).init_containers, None, "no seeding without the volume");
        let volumes: Vec<&str> = pod(&dev).volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, [SERVER_VOLUME, SECRET_VOLUME]);
        assert!(!dev.deployment.annotations().contains_key(CLAIM_ANNOTATION));

        let server_image = DevSettings { server_image: Some("x/server:1".into()), ..DevSettings::default() };
        let dev = swap(&original, &server_image).unwrap();
        let init: Vec<&str> = pod(&dev).init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(init, [COPY_CONTAINER], "the image may have no sh to seed with");
        assert_eq!(pod(&dev).containers[0].command, Some(vec![SERVER_PATH.to_owned()]));
        assert!(dev.volume_claim.is_some());
    }

    #[test]
    fn lost_fields_are_named() {
        let raw = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "app", "creationTimestamp": null},
            "spec": {
                "selector": {"matchLabels": {"app": "app"}},
                "replicaz": 2,
                "template": {"spec": {"containers": [{"name": "a"}, {"name": "b", "imagePullPolice": "Always"}]}}
            }
        });
        let typed: Deployment = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(
            lost_fields(&raw, &typed),
            ["spec.replicaz", "spec.template.spec.containers[1].imagePullPolice"]
        );
        let clean = serde_json::to_value(simple()).unwrap();
        assert!(lost_fields(&clean, &simple()).is_empty());
    }
}
