//! The Kubernetes target: a Deployment's container swapped, in place, for a dev container that
//! runs devmount-server, reached through a port-forward, and swapped back exactly.
//!
//! - [`translate`] is the swap as a pure function: the original Deployment, the manifest's
//!   [`DevSettings`](crate::manifest::DevSettings) and the session's inputs in; the dev
//!   Deployment, the session's Secret and the persistent volume's claim out. [`translate::restore`]
//!   is its inverse. No I/O, no clock, no randomness: the same inputs give the same bytes.
//! - [`render`] is `devmount render`: the swap of a Deployment read from a file, printed as YAML.
//! - [`cluster`] makes the client; [`swap`] applies, resumes or refuses the swap and restores
//!   it; [`pod`] waits for the dev pod; [`upload`] puts the server in it; [`portforward`] is the
//!   connection's byte stream; [`state`] is what this machine keeps of a session.
//!
//! This module's [`start`] is what the session daemon calls for `devmount up` on a kubernetes
//! target, and [`Route`] is the daemon's [`Transport`]: each connection (the first, and every
//! reconnect) finds the session's running pod, uploads the server where it is missing or of
//! another version, and opens a port-forward. The rest of the daemon only sees a byte stream.
//!
//! docs/kubernetes.md tells what the swap changes in the cluster and why.

pub mod cluster;
pub mod pod;
pub mod portforward;
pub mod render;
pub mod state;
pub mod swap;
pub mod translate;
pub mod upload;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{anyhow, bail, Result};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tokio::io::DuplexStream;

use crate::manifest::KubernetesTarget;
use crate::mount::Progress;
use crate::reconnect::Transport;
use cluster::Cluster;
use state::{Place, SessionFiles};
use swap::{Decision, RestoreOptions};
use translate::DEFAULT_SERVER_PORT;
use upload::{Action, ServerBinary};

/// What the daemon needs to start a session on a kubernetes target.
#[derive(Debug, Clone)]
pub struct KubeEndpoint {
    pub target: KubernetesTarget,
    /// The static devmount-server to upload (absolute); `None` with `serverImage`, whose init
    /// container puts the server in place.
    pub server_bin: Option<PathBuf>,
    /// Ports the server lets the client reach and bind (the forwards).
    pub allow_forward: Vec<u16>,
    pub allow_reverse: Vec<u16>,
    /// Where the server goes in the pod: [`translate::SERVER_DIR`], the directory the dev Deployment
    /// mounts its emptyDir on. A fake API server whose exec runs on this machine takes `.`
    /// instead, the pod's own directory there.
    pub server_dir: String,
}

/// A started session: where it works, and how to reach and end it.
pub struct Started {
    pub place: Place,
    pub files: SessionFiles,
    pub route: Arc<Route>,
    pub cluster: Cluster,
    /// Whether this start made the swap (a failed start then restores it).
    pub fresh: bool,
    /// The claim this start made, if any (a failed start deletes it).
    pub new_claim: Option<String>,
}

/// How long a server just uploaded has to listen: the wait script's next look, and the change
/// feed's watch of the workdir, which comes before the server listens and takes long on a big
/// tree.
const SERVER_START: std::time::Duration = std::time::Duration::from_secs(120);

/// The daemon's way to the server: the session's current pod, the server in it, a
/// port-forward to it.
pub struct Route {
    cluster: Cluster,
    session: String,
    container: String,
    claim: Option<String>,
    server_dir: String,
    /// `None`: the server comes from `serverImage`, nothing is uploaded.
    server: Option<ServerBinary>,
    timeout: std::time::Duration,
    /// The pod (name, restarts) whose server was last checked: a reconnect to the same
    /// container skips the probe.
    checked: Mutex<Option<(String, i32)>>,
    /// A stream opened while `devmount up` watched (with its progress): the first
    /// connection takes it.
    pub first: Mutex<Option<DuplexStream>>,
}

fn restarts(pod: &Pod, container: &str) -> i32 {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    statuses.into_iter().flatten().find(|s| s.name == container).map_or(0, |s| s.restart_count)
}

impl Route {
    /// Waits for the running pod, makes sure its server is ready, and opens a port-forward to
    /// it, telling each step to `step`.
    pub async fn connect(&self, mut step: impl FnMut(&str)) -> Result<DuplexStream> {
        loop {
            let pod = pod::wait_running(
                &self.cluster,
                &self.session,
                &self.container,
                self.claim.as_deref(),
                self.timeout,
                &mut step,
            )
            .await?;
            let name = pod.name_any();
            let seen = (name.clone(), restarts(&pod, &self.container));
            let known = self.checked.lock().unwrap_or_else(PoisonError::into_inner).as_ref() == Some(&seen);
            if !known {
                if let Some(server) = &self.server {
                    step(&format!("checking devmount-server in pod {name}"));
                    let action =
                        upload::ensure(&self.cluster, &name, &self.container, &self.server_dir, server)
                            .await?;
                    match action {
                        Action::Keep => {}
                        Action::Upload => step("devmount-server uploaded"),
                        Action::Replace => {
                            // The old server ends and the container restarts into the new one:
                            // look at the pod again.
                            step("devmount-server of another version replaced; waiting for the container to restart");
                            wait_restart(&self.cluster, &self.session, &self.container, &seen).await?;
                            continue;
                        }
                    }
                }
                // A server just uploaded, or in a container that just (re)started, needs a
                // moment before it listens; one that runs answers at once. One that cannot run
                // (serverImage's may be of another version) makes its container crash-loop:
                // that is the cause, at once.
                step(&format!("waiting for devmount-server in pod {name} to listen"));
                let listening =
                    portforward::wait_listening(&self.cluster, &name, DEFAULT_SERVER_PORT, SERVER_START);
                tokio::select! {
                    listening = listening => listening?,
                    cause = pod::crashed(&self.cluster, &name, self.claim.as_deref()) => bail!("{cause}"),
                }
                *self.checked.lock().unwrap_or_else(PoisonError::into_inner) = Some(seen);
            }
            step(&format!("port-forwarding to pod {name}"));
            return portforward::open(&self.cluster, &name, DEFAULT_SERVER_PORT).await;
        }
    }
}

/// How long a container whose server was replaced has to restart.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until the pod `seen` has restarted its container, or gone.
async fn wait_restart(cluster: &Cluster, session: &str, container: &str, seen: &(String, i32)) -> Result<()> {
    let deadline = tokio::time::Instant::now() + RESTART_WAIT;
    while tokio::time::Instant::now() < deadline {
        match pod::current(cluster, session).await? {
            Some(pod) if pod.name_any() == seen.0 && restarts(&pod, container) == seen.1 => {}
            _ => return Ok(()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Err(anyhow!(
        "pod {}'s container did not restart into the new devmount-server within {RESTART_WAIT:?}",
        seen.0
    ))
}

impl Transport for Route {
    fn open(&self) -> BoxFuture<'_, Result<DuplexStream>> {
        let first = self.first.lock().unwrap_or_else(PoisonError::into_inner).take();
        match first {
            Some(stream) => Box::pin(std::future::ready(Ok(stream))),
            None => Box::pin(self.connect(|step| tracing::info!("reconnecting: {step}"))),
        }
    }
}

/// `devmount up`'s work in the cluster: finds the Deployment, swaps it (or resumes this
/// machine's swap of it), waits for the dev pod and puts the server in it. A swap made here
/// that fails before the pod is ready is restored.
pub async fn start(
    endpoint: &KubeEndpoint,
    mountpoint: &Path,
    state_dir: &Path,
    progress: &mut dyn Progress,
) -> Result<Started> {
    let target = &endpoint.target;
    progress.step(&format!("reading {}", target.workload));
    let cluster = Cluster::connect(target.context.as_deref(), target.namespace.as_deref()).await?;
    let deployment = swap::find(&cluster, &target.workload).await?;
    let name = deployment.name_any();
    let decision = swap::decide(&deployment, |id| SessionFiles::find(state_dir, id).is_some())?;
    let (files, dev, fresh, new_claim) = match decision {
        Decision::Resume(id) => {
            let files = SessionFiles::find(state_dir, &id)
                .ok_or_else(|| anyhow!("the files of session {id} went away; run `devmount up` again"))?;
            progress.note(&format!(
                "deployment/{name} is in dev mode for session {id}, started here: resuming it"
            ));
            (files, deployment, false, None)
        }
        Decision::Swap => {
            let autoscalers = swap::autoscalers(&cluster).await?;
            if autoscalers.is_none() {
                progress.note("RBAC does not allow listing HorizontalPodAutoscalers: not checked for one that would scale the dev Deployment");
            }
            let fighters = swap::fighters(&deployment, autoscalers.as_deref().unwrap_or_default());
            if !fighters.blocking.is_empty() {
                anyhow::bail!("{}", fighters.blocking.join("; "));
            }
            for warning in &fighters.warnings {
                progress.note(warning);
            }
            let pin = state::ssh_target(&name, &cluster.namespace);
            let (files, keys) = SessionFiles::create(state_dir, &pin)?;
            let session = translate::Session {
                id: files.id.clone(),
                authorized_key: keys.authorized_key,
                port: DEFAULT_SERVER_PORT,
                allow_forward: endpoint.allow_forward.clone(),
                allow_reverse: endpoint.allow_reverse.clone(),
            };
            let swapped = async {
                let objects = translate::translate(&deployment, &target.dev, &session)?;
                progress.step(&format!("applying the dev version of deployment/{name}"));
                swap::apply(&cluster, &objects, &keys.host_key).await
            };
            match swapped.await {
                Ok(applied) => (files, applied.deployment, true, applied.new_claim),
                Err(e) => {
                    let _ = files.remove();
                    return Err(e);
                }
            }
        }
    };
    if !target.dev.persistent_volume.enabled {
        progress.note("persistentVolume is off: edits live only as long as the pod");
    }
    let started = async {
        let (container, workdir) = swap::dev_container(&dev)?;
        let place = Place {
            context: cluster.context.clone(),
            namespace: cluster.namespace.clone(),
            deployment: name.clone(),
            container: container.clone(),
            workdir,
        };
        if let Some((recorded, _)) = files.place() {
            state::check_same(&recorded, &place)?;
        }
        files.record(&place, mountpoint)?;
        let route = Arc::new(Route {
            cluster: cluster.clone(),
            session: files.id.as_str().to_owned(),
            container,
            claim: dev.annotations().get(translate::CLAIM_ANNOTATION).cloned(),
            server_dir: endpoint.server_dir.clone(),
            server: endpoint.server_bin.as_deref().map(ServerBinary::read).transpose()?,
            timeout: target.timeout,
            checked: Mutex::new(None),
            first: Mutex::new(None),
        });
        anyhow::Ok((place, route))
    };
    match started.await {
        Ok((place, route)) => Ok(Started { place, files, route, cluster, fresh, new_claim }),
        Err(e) if fresh => Err(undo(&cluster, &name, files, new_claim.as_deref(), e).await),
        Err(e) => Err(e),
    }
}

/// After a failed start: the fresh swap is restored (whatever changed in the seconds since: it
/// is this start's own), a claim it made is deleted, and the session forgotten; `e` is
/// returned with what was done.
pub async fn undo(
    cluster: &Cluster,
    deployment: &str,
    files: SessionFiles,
    new_claim: Option<&str>,
    e: anyhow::Error,
) -> anyhow::Error {
    let options = RestoreOptions { force: true, volumes: false };
    if let Err(restore) = swap::restore(cluster, deployment, options).await {
        return anyhow!("{e:#}; restoring deployment/{deployment} failed too: {restore:#}");
    }
    let _ = files.remove();
    if let Some(claim) = new_claim {
        if let Err(cleanup) = swap::delete_claim(cluster, claim).await {
            tracing::warn!("cannot delete the claim {claim} after a failed start: {cleanup:#}");
        }
    }
    anyhow!("{e:#}; deployment/{deployment} is restored")
}

/// After a failed start: a fresh swap is restored (see [`undo`]); a resumed one stays.
pub async fn abandon(started: Started, e: anyhow::Error) -> anyhow::Error {
    if !started.fresh {
        return e;
    }
    let claim = started.new_claim.as_deref();
    undo(&started.cluster, &started.place.deployment, started.files, claim, e).await
}

/// The end of a session (unmounted, or `devmount down`): restores the Deployment unless it
/// changed since the swap, and forgets the session. Returns what was done.
pub async fn finish(started: Started) -> Result<Vec<String>> {
    let done = swap::restore(&started.cluster, &started.place.deployment, RestoreOptions::default()).await?;
    started.files.remove()?;
    Ok(done)
}

/// `devmount down` in the cluster, for the session this machine recorded at `mountpoint` or,
/// without one, the manifest's target: restores with `options`. Reads the cluster, so it works
/// for a session started elsewhere.
pub async fn down(
    place: Option<(SessionFiles, Place)>,
    target: Option<&KubernetesTarget>,
    options: RestoreOptions,
) -> Result<Vec<String>> {
    let (cluster, deployment, files) = match (place, target) {
        (Some((files, place)), _) => (
            Cluster::connect(Some(&place.context), Some(&place.namespace)).await?,
            place.deployment,
            Some(files),
        ),
        (None, Some(target)) => {
            let cluster = Cluster::connect(target.context.as_deref(), target.namespace.as_deref()).await?;
            let deployment = swap::find(&cluster, &target.workload).await?.name_any();
            (cluster, deployment, None)
        }
        (None, None) => anyhow::bail!("no kubernetes session to end"),
    };
    let done = swap::restore(&cluster, &deployment, options).await?;
    if let Some(files) = files {
        files.remove()?;
    }
    Ok(done)
}
