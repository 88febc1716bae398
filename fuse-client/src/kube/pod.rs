//! Waiting for the dev pod: found by its session label, followed through its stages (scheduled,
//! image pulled, init containers, running) as progress steps, and given up on with the cause,
//! read from the pod's status and the events of the pod and its claim, in one line with the
//! fix.
//!
//! [`stage`] and [`failure`] are pure, over the pod and events as the API gives them: the
//! decisions are tested on JSON fixtures, the polling loop around them only reads.

use std::time::Duration;

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use super::cluster::{api_error, Cluster};
use super::translate::SESSION_LABEL;

/// How often the pod is looked at while waiting.
const POLL: Duration = Duration::from_millis(500);

/// How far the pod has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Scheduling,
    InitContainers,
    PullingImage,
    Starting,
    Running,
}

impl Stage {
    /// The progress step's text.
    pub fn step(&self, pod: &str) -> String {
        match self {
            Stage::Scheduling => format!("waiting for pod {pod} to be scheduled"),
            Stage::InitContainers => format!("running the init containers of pod {pod}"),
            Stage::PullingImage => format!("pulling the image of pod {pod}"),
            Stage::Starting => format!("starting pod {pod}"),
            Stage::Running => format!("pod {pod} is running"),
        }
    }
}

/// Pure: how far `pod`'s `container` has come.
pub fn stage(pod: &Pod, container: &str) -> Stage {
    let Some(status) = &pod.status else { return Stage::Scheduling };
    let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
        || status.conditions.iter().flatten().any(|c| c.type_ == "PodScheduled" && c.status == "True");
    if !scheduled {
        return Stage::Scheduling;
    }
    let init_pending = status
        .init_container_statuses
        .iter()
        .flatten()
        .any(|s| s.state.as_ref().and_then(|st| st.terminated.as_ref()).is_none_or(|t| t.exit_code != 0));
    if init_pending {
        return Stage::InitContainers;
    }
    let Some(dev) = status.container_statuses.iter().flatten().find(|s| s.name == container) else {
        return Stage::Starting;
    };
    let state = dev.state.as_ref();
    if state.is_some_and(|s| s.running.is_some()) {
        return Stage::Running;
    }
    match state.and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()) {
        Some("ContainerCreating" | "PodInitializing") | None if dev.image_id.is_empty() => {
            Stage::PullingImage
        }
        _ => Stage::Starting,
    }
}

/// Why the pod will not come up without someone's help, as one line with the fix; `None`
/// while it may still come. `events` are the pod's and its claim's.
pub fn failure(pod: &Pod, events: &[Event]) -> Option<String> {
    let name = pod.name_any();
    let status = pod.status.as_ref()?;
    if let Some(event) = events.iter().find(|e| e.reason.as_deref() == Some("ProvisioningFailed")) {
        let message = event.message.as_deref().unwrap_or("");
        return Some(format!(
            "the persistent volume cannot be made: {message}; set kubernetes.persistentVolume.storageClass to one of `kubectl get storageclass`, or turn persistentVolume off"
        ));
    }
    let statuses = status.init_container_statuses.iter().flatten().map(|s| (s, true));
    for (container, init) in statuses.chain(status.container_statuses.iter().flatten().map(|s| (s, false))) {
        if let Some(cause) = container_failure(&name, container, init) {
            return Some(cause);
        }
    }
    None
}

/// Pure: why the pod is not scheduled, if it is not (the caller waits, the cluster may still
/// make room, and gives this as the cause at the timeout).
pub fn unschedulable(pod: &Pod) -> Option<String> {
    let condition = pod.status.as_ref()?.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
    })?;
    Some(format!(
        "pod {} cannot be scheduled: {}; free room in the cluster, or lower kubernetes.resources",
        pod.name_any(),
        condition.message.as_deref().unwrap_or("no node fits it")
    ))
}

fn container_failure(pod: &str, status: &ContainerStatus, init: bool) -> Option<String> {
    let kind = if init { "init container" } else { "container" };
    let name = &status.name;
    let state = status.state.as_ref()?;
    if let Some(waiting) = &state.waiting {
        let message = waiting.message.as_deref().unwrap_or("");
        match waiting.reason.as_deref()? {
            "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" | "ErrImageNeverPull" => {
                return Some(format!(
                    "the image of {kind} {name} cannot be pulled ({}: {message}); check kubernetes.image and the pod's imagePullSecrets",
                    waiting.reason.as_deref().unwrap_or_default()
                ))
            }
            "CrashLoopBackOff" => {
                let last = status.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                let code = last.map_or(String::new(), |t| format!(", last exit code {}", t.exit_code));
                return Some(format!(
                    "{kind} {name} of pod {pod} keeps crashing (CrashLoopBackOff{code}); `kubectl logs {pod} -c {name} --previous` shows why"
                ));
            }
            "CreateContainerConfigError" | "CreateContainerError" => {
                return Some(format!("{kind} {name} of pod {pod} cannot be created: {message}"))
            }
            _ => {}
        }
    }
    if init {
        if let Some(t) = state.terminated.as_ref().filter(|t| t.exit_code != 0) {
            let message = t.message.as_deref().unwrap_or("").trim();
            return Some(format!(
                "init container {name} of pod {pod} failed (exit code {}){}; `kubectl logs {pod} -c {name}` shows why",
                t.exit_code,
                if message.is_empty() { String::new() } else { format!(": {message}") }
            ));
        }
    }
    None
}

/// The newest pod of session `id` that is not being deleted.
pub async fn current(cluster: &Cluster, id: &str) -> Result<Option<Pod>> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let list = api
        .list(&ListParams::default().labels(&format!("{SESSION_LABEL}={id}")))
        .await
        .map_err(|e| api_error(e, "list", "pods", &cluster.namespace))?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .max_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp)))
}

/// The events about the object `name` (the pod, its claim), oldest first.
async fn events_of(cluster: &Cluster, names: &[&str]) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let mut all = Vec::new();
    for name in names {
        let list = api
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .map_err(|e| api_error(e, "list", "events", &cluster.namespace))?;
        all.extend(list.items);
    }
    Ok(all)
}

/// [`failure`] of `pod`, with the events of the pod and of `claim`.
async fn cause(cluster: &Cluster, pod: &Pod, claim: Option<&str>) -> Result<Option<String>> {
    let name = pod.name_any();
    let mut names = vec![name.as_str()];
    names.extend(claim);
    Ok(failure(pod, &events_of(cluster, &names).await?))
}

/// Watches running pod `name` until a failure that needs someone's help shows, and returns
/// its cause: a server that exits at start makes its container crash-loop while the client
/// waits for it to listen. Pends while there is none, while the pod cannot be read, or once it
/// is gone: the wait for its server has its own deadline and error.
pub async fn crashed(cluster: &Cluster, name: &str, claim: Option<&str>) -> String {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    loop {
        if let Ok(Some(pod)) = api.get_opt(name).await {
            if let Ok(Some(cause)) = cause(cluster, &pod, claim).await {
                return cause;
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits up to `timeout` for the pod of session `id` to run `container`, telling each stage to
/// `step`; a failure that needs someone's help ends the wait early with its cause.
pub async fn wait_running(
    cluster: &Cluster,
    id: &str,
    container: &str,
    claim: Option<&str>,
    timeout: Duration,
    mut step: impl FnMut(&str),
) -> Result<Pod> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_step = String::new();
    let mut last_seen = format!("no pod with the label {SESSION_LABEL}={id} appeared");
    loop {
        if let Some(pod) = current(cluster, id).await? {
            let name = pod.name_any();
            let stage = stage(&pod, container);
            if stage == Stage::Running {
                return Ok(pod);
            }
            let text = stage.step(&name);
            if text != last_step {
                step(&text);
                last_step = text.clone();
            }
            if let Some(cause) = cause(cluster, &pod, claim).await? {
                bail!("{cause}");
            }
            last_seen = unschedulable(&pod).unwrap_or(text);
        }
        if tokio::time::Instant::now() + POLL > deadline {
            bail!("the dev pod was not running within {timeout:?} (kubernetes.timeout): {last_seen}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-6d4-x2"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            "status": status,
        }))
        .unwrap()
    }

    fn event(reason: &str, message: &str) -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": "e"},
            "involvedObject": {"name": "x"},
            "reason": reason,
            "message": message,
        }))
        .unwrap()
    }

    fn waiting(reason: &str, message: &str) -> serde_json::Value {
        json!({"name": "app", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
               "state": {"waiting": {"reason": reason, "message": message}}})
    }

    #[test]
    fn stages() {
        assert_eq!(stage(&pod(json!({"phase": "Pending"})), "app"), Stage::Scheduling);
        let scheduled = json!({"type": "PodScheduled", "status": "True"});
        let init = pod(json!({"phase": "Pending", "conditions": [scheduled],
            "initContainerStatuses": [{"name": "devmount-seed", "image": "b", "imageID": "", "ready": false,
              "restartCount": 0, "state": {"running": {}}}]}));
        assert_eq!(stage(&init, "app"), Stage::InitContainers);
        let pulling = pod(json!({"phase": "Pending", "conditions": [scheduled],
            "containerStatuses": [waiting("ContainerCreating", "")]}));
        assert_eq!(stage(&pulling, "app"), Stage::PullingImage);
        let running = pod(json!({"phase": "Running", "conditions": [scheduled],
            "containerStatuses": [{"name": "app", "image": "busybox", "imageID": "sha256:1", "ready": true,
              "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}));
        assert_eq!(stage(&running, "app"), Stage::Running);
        assert_eq!(stage(&running, "other"), Stage::Starting);
        assert_eq!(Stage::Running.step("p"), "pod p is running");
    }

    #[test]
    fn failure_causes_are_one_line_with_the_fix() {
        let image = pod(json!({"phase": "Pending",
            "containerStatuses": [waiting("ImagePullBackOff", "Back-off pulling image \"nope:1\"")]}));
        let cause = failure(&image, &[]).unwrap();
        assert!(cause.starts_with("the image of container app cannot be pulled (ImagePullBackOff: Back-off pulling image \"nope:1\")"), "{cause}");
        assert!(cause.ends_with("check kubernetes.image and the pod's imagePullSecrets"));

        let mut crash = waiting("CrashLoopBackOff", "back-off 10s restarting failed container");
        crash["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error"}});
        let cause = failure(&pod(json!({"phase": "Running", "containerStatuses": [crash]})), &[]).unwrap();
        assert_eq!(
            cause,
            "container app of pod web-6d4-x2 keeps crashing (CrashLoopBackOff, last exit code 1); `kubectl logs web-6d4-x2 -c app --previous` shows why"
        );

        let pending =
            pod(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient memory."}]}));
        assert_eq!(failure(&pending, &[]), None, "the scheduler may still find room");
        assert_eq!(
            unschedulable(&pending).unwrap(),
            "pod web-6d4-x2 cannot be scheduled: 0/1 nodes are available: 1 Insufficient memory.; free room in the cluster, or lower kubernetes.resources"
        );
        let storage = [event("ProvisioningFailed", "storageclass.storage.k8s.io \"fast\" not found")];
        let cause = failure(&pending, &storage).unwrap();
        assert!(cause.starts_with("the persistent volume cannot be made: storageclass.storage.k8s.io \"fast\" not found; set kubernetes.persistentVolume.storageClass"), "{cause}");

        let seed = pod(
            json!({"phase": "Pending", "initContainerStatuses": [{"name": "devmount-seed", "image": "b",
            "imageID": "x", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 1, "message": "devmount: this container's user cannot write\n"}}}]}),
        );
        assert_eq!(
            failure(&seed, &[event("Scheduled", "ok")]).unwrap(),
            "init container devmount-seed of pod web-6d4-x2 failed (exit code 1): devmount: this container's user cannot write; `kubectl logs web-6d4-x2 -c devmount-seed` shows why"
        );
        assert_eq!(failure(&pod(json!({"phase": "Running"})), &[]), None);
        for cause in [failure(&image, &[]).unwrap(), failure(&pending, &storage).unwrap()] {
            assert!(!cause.contains('\n'), "{cause}");
        }
    }
}
