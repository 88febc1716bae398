//! The controllers a cluster runs, shrunk to what a dev tool watches: the Deployment controller
//! (one ReplicaSet per pod template, old ones scaled to zero before the new one gets pods, as
//! the Recreate strategy does), the ReplicaSet controller, garbage collection of owned objects,
//! the scheduler and kubelet (pod phases, container states, conditions and events, with the
//! faults a test injects), and a volume provisioner for PersistentVolumeClaims.
//!
//! [`reconcile`] makes one pass in which each object moves at most one step, so a watch sees
//! every stage (Pending, scheduled, Running) as its own event.

use std::collections::BTreeMap;
use std::hash::Hasher;

use serde_json::{json, Value};

use super::resources::{DEPLOYMENTS, PODS, PVCS, REPLICASETS};
use super::store::{now, random_suffix, safe_encode, Selectors, Store};
use super::{PodFault, State, NODE_NAME};

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH_LABEL: &str = "pod-template-hash";

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn all(store: &Store, res: &'static super::resources::Resource) -> Vec<Value> {
    store.list(res, None, &Selectors::default())
}

/// The uid of the object's controlling owner.
fn controller_uid(v: &Value) -> Option<&str> {
    v.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
}

fn owner_ref(owner: &Value) -> Value {
    json!([{
        "apiVersion": owner.get("apiVersion"),
        "kind": owner.get("kind"),
        "name": s(owner, "/metadata/name"),
        "uid": s(owner, "/metadata/uid"),
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

fn terminating(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp").is_some()
}

fn revision(v: &Value) -> u64 {
    s(v, &format!("/metadata/annotations/{}", REVISION.replace('/', "~1"))).parse().unwrap_or(0)
}

/// One pass over everything; returns whether anything was written (so another pass may move
/// further).
pub fn reconcile(st: &mut State) -> bool {
    let mut wrote = remove_terminated_pods(&mut st.store);
    wrote |= provision_claims(st);
    wrote |= sync_deployments(&mut st.store);
    wrote |= sync_replica_sets(&mut st.store);
    wrote |= advance_pods(st);
    wrote |= deployment_status(&mut st.store);
    wrote
}

/// Graceful deletion is instant here: a pod marked for deletion goes on the next pass.
fn remove_terminated_pods(store: &mut Store) -> bool {
    let mut wrote = false;
    for pod in all(store, PODS).into_iter().filter(terminating) {
        wrote |= store.delete(PODS, s(&pod, "/metadata/namespace"), s(&pod, "/metadata/name")).is_ok();
    }
    wrote
}

fn provision_claims(st: &mut State) -> bool {
    let mut wrote = false;
    for mut pvc in all(&st.store, PVCS) {
        let (ns, name) = (s(&pvc, "/metadata/namespace").to_owned(), s(&pvc, "/metadata/name").to_owned());
        let class = s(&pvc, "/spec/storageClassName").to_owned();
        let phase = s(&pvc, "/status/phase").to_owned();
        if st.storage_classes.contains(&class) {
            if phase == "Bound" {
                continue;
            }
            let volume = format!("pvc-{}", s(&pvc, "/metadata/uid"));
            pvc["spec"]["volumeName"] = json!(volume);
            pvc["status"] = json!({
                "phase": "Bound",
                "accessModes": pvc.pointer("/spec/accessModes"),
                "capacity": { "storage": pvc.pointer("/spec/resources/requests/storage") },
            });
            st.store.put(PVCS, &ns, &name, pvc.clone());
            let message = format!("Successfully provisioned volume {volume}");
            st.store.record_event(
                &pvc,
                "Normal",
                "ProvisioningSucceeded",
                &message,
                "persistentvolume-controller",
            );
            wrote = true;
        } else if phase != "Pending" {
            pvc["status"] = json!({ "phase": "Pending" });
            st.store.put(PVCS, &ns, &name, pvc.clone());
            let message = format!("storageclass.storage.k8s.io \"{class}\" not found");
            st.store.record_event(
                &pvc,
                "Warning",
                "ProvisioningFailed",
                &message,
                "persistentvolume-controller",
            );
            wrote = true;
        }
    }
    wrote
}

/// A stable hash of a pod template (object keys sorted, so key order never matters), in the
/// alphabet of Kubernetes' pod-template-hash.
fn template_hash(template: &Value) -> String {
    fn feed(h: &mut Fnv, v: &Value) {
        match v {
            Value::Object(map) => {
                let sorted: BTreeMap<_, _> = map.iter().collect();
                for (k, v) in sorted {
                    h.write(k.as_bytes());
                    h.write(b":");
                    feed(h, v);
                }
                h.write(b"}");
            }
            Value::Array(items) => {
                for item in items {
                    feed(h, item);
                }
                h.write(b"]");
            }
            other => h.write(other.to_string().as_bytes()),
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    feed(&mut h, template);
    safe_encode(h.finish(), 10)
}

/// FNV-1a, as Kubernetes hashes pod templates; std's hashers are randomly seeded.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn current_rs_name(d: &Value) -> String {
    let template = d.pointer("/spec/template").cloned().unwrap_or(Value::Null);
    format!("{}-{}", s(d, "/metadata/name"), template_hash(&template))
}

fn owned_by<'a>(items: &'a [Value], owner: &Value) -> impl Iterator<Item = &'a Value> {
    let uid = s(owner, "/metadata/uid").to_owned();
    items.iter().filter(move |v| controller_uid(v) == Some(uid.as_str()))
}

fn sync_deployments(store: &mut Store) -> bool {
    let mut wrote = false;
    let sets = all(store, REPLICASETS);
    for mut d in all(store, DEPLOYMENTS) {
        let (ns, name) = (s(&d, "/metadata/namespace").to_owned(), s(&d, "/metadata/name").to_owned());
        let replicas = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
        let current = current_rs_name(&d);
        let owned: Vec<&Value> = owned_by(&sets, &d).collect();
        let max_revision = owned.iter().map(|rs| revision(rs)).max().unwrap_or(0);
        let revision_now = match owned.iter().find(|rs| s(rs, "/metadata/name") == current) {
            Some(rs) if revision(rs) == max_revision => {
                let mut rs = (*rs).clone();
                if rs.pointer("/spec/replicas").and_then(Value::as_i64) != Some(replicas) {
                    rs["spec"]["replicas"] = json!(replicas);
                    wrote |= store.put(REPLICASETS, &ns, &current, rs);
                }
                max_revision
            }
            Some(rs) => {
                // Rolled back to an older template: that ReplicaSet becomes the newest revision.
                let mut rs = (*rs).clone();
                rs["metadata"]["annotations"][REVISION] = json!((max_revision + 1).to_string());
                rs["spec"]["replicas"] = json!(replicas);
                wrote |= store.put(REPLICASETS, &ns, &current, rs);
                max_revision + 1
            }
            None => {
                let hash = current.rsplit('-').next().unwrap_or("").to_owned();
                let mut template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
                template["metadata"]["labels"][HASH_LABEL] = json!(hash);
                let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
                selector["matchLabels"][HASH_LABEL] = json!(hash);
                let rs = json!({
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "metadata": {
                        "name": current,
                        "labels": template["metadata"]["labels"],
                        "annotations": {
                            REVISION: (max_revision + 1).to_string(),
                            "deployment.kubernetes.io/desired-replicas": replicas.to_string(),
                            "deployment.kubernetes.io/max-replicas": replicas.to_string(),
                        },
                        "ownerReferences": owner_ref(&d),
                    },
                    "spec": { "replicas": replicas, "selector": selector, "template": template },
                });
                if store.create(REPLICASETS, &ns, rs).is_ok() {
                    let message = format!("Scaled up replica set {current} from 0 to {replicas}");
                    store.record_event(&d, "Normal", "ScalingReplicaSet", &message, "deployment-controller");
                    wrote = true;
                }
                max_revision + 1
            }
        };
        for old in owned.iter().filter(|rs| s(rs, "/metadata/name") != current) {
            let from = old.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0);
            if from != 0 {
                let mut old = (*old).clone();
                old["spec"]["replicas"] = json!(0);
                let old_name = s(&old, "/metadata/name").to_owned();
                wrote |= store.put(REPLICASETS, &ns, &old_name, old);
                let message = format!("Scaled down replica set {old_name} from {from} to 0");
                store.record_event(&d, "Normal", "ScalingReplicaSet", &message, "deployment-controller");
            }
        }
        if revision(&d) != revision_now {
            d["metadata"]["annotations"][REVISION] = json!(revision_now.to_string());
            wrote |= store.put(DEPLOYMENTS, &ns, &name, d);
        }
    }
    wrote
}

fn sync_replica_sets(store: &mut Store) -> bool {
    let mut wrote = false;
    let deployments = all(store, DEPLOYMENTS);
    let sets = all(store, REPLICASETS);
    let pods = all(store, PODS);
    for rs in &sets {
        let (ns, name) = (s(rs, "/metadata/namespace").to_owned(), s(rs, "/metadata/name").to_owned());
        let owner = controller_uid(rs);
        let deployment = deployments.iter().find(|d| Some(s(d, "/metadata/uid")) == owner);
        if owner.is_some() && deployment.is_none() {
            wrote |= store.delete(REPLICASETS, &ns, &name).is_ok();
            continue;
        }
        let replicas = rs.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0) as usize;
        let mut live: Vec<&Value> = owned_by(&pods, rs).filter(|p| !terminating(p)).collect();
        live.sort_by_key(|p| std::cmp::Reverse(s(p, "/metadata/creationTimestamp").to_owned()));
        for extra in live.iter().take(live.len().saturating_sub(replicas)) {
            wrote |= store.terminate_pod(&ns, s(extra, "/metadata/name")).is_ok();
        }
        // Recreate: no new pod while a pod of another revision still exists.
        let siblings_running = deployment.is_some_and(|d| {
            owned_by(&sets, d)
                .filter(|other| s(other, "/metadata/name") != name)
                .any(|other| owned_by(&pods, other).next().is_some())
        });
        if !siblings_running {
            for _ in live.len()..replicas {
                let pod_name = format!("{name}-{}", random_suffix());
                let pod = json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name,
                        "generateName": format!("{name}-"),
                        "labels": rs.pointer("/spec/template/metadata/labels"),
                        "annotations": rs.pointer("/spec/template/metadata/annotations"),
                        "ownerReferences": owner_ref(rs),
                    },
                    "spec": rs.pointer("/spec/template/spec"),
                });
                if store.create(PODS, &ns, pod).is_ok() {
                    let message = format!("Created pod: {pod_name}");
                    store.record_event(rs, "Normal", "SuccessfulCreate", &message, "replicaset-controller");
                    wrote = true;
                }
            }
        }
        let ready = live.iter().filter(|p| is_ready(p)).count();
        let mut status =
            json!({ "replicas": live.len(), "observedGeneration": rs.pointer("/metadata/generation") });
        if !live.is_empty() {
            status["fullyLabeledReplicas"] = json!(live.len());
        }
        if ready > 0 {
            status["readyReplicas"] = json!(ready);
            status["availableReplicas"] = json!(ready);
        }
        if rs.get("status") != Some(&status) {
            let mut rs = rs.clone();
            rs["status"] = status;
            wrote |= store.put(REPLICASETS, &ns, &name, rs);
        }
    }
    // Garbage collection of pods whose ReplicaSet is gone.
    for pod in pods.iter().filter(|p| !terminating(p)) {
        let owner_is_rs = pod.pointer("/metadata/ownerReferences/0/kind").is_some_and(|k| k == "ReplicaSet");
        if owner_is_rs && !sets.iter().any(|rs| Some(s(rs, "/metadata/uid")) == controller_uid(pod)) {
            wrote |= store.terminate_pod(s(pod, "/metadata/namespace"), s(pod, "/metadata/name")).is_ok();
        }
    }
    wrote
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conds| conds.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// The Deployment that owns a pod through its ReplicaSet, if any.
pub fn owning_deployment(store: &Store, pod: &Value) -> Option<String> {
    let ns = s(pod, "/metadata/namespace");
    let rs_name = pod.pointer("/metadata/ownerReferences/0/name").and_then(Value::as_str)?;
    let rs = store.find(REPLICASETS, ns, rs_name)?;
    rs.pointer("/metadata/ownerReferences/0/name").and_then(Value::as_str).map(str::to_owned)
}

struct PodEvent {
    kind: &'static str,
    reason: &'static str,
    message: String,
    component: &'static str,
}

fn kubelet(kind: &'static str, reason: &'static str, message: String) -> PodEvent {
    PodEvent { kind, reason, message, component: "kubelet" }
}

fn advance_pods(st: &mut State) -> bool {
    let mut wrote = false;
    for pod in all(&st.store, PODS).into_iter().filter(|p| !terminating(p)) {
        let ns = s(&pod, "/metadata/namespace").to_owned();
        let fault = owning_deployment(&st.store, &pod).and_then(|d| st.faults.get(&(ns.clone(), d)).copied());
        let Some((next, events)) = next_pod_state(&st.store, &pod, fault) else { continue };
        let name = s(&next, "/metadata/name").to_owned();
        if st.store.put(PODS, &ns, &name, next.clone()) {
            for e in events {
                st.store.record_event(&next, e.kind, e.reason, &e.message, e.component);
            }
            wrote = true;
        }
    }
    wrote
}

/// What keeps a pod from being scheduled: the injected fault, or a claim that is not bound.
fn scheduling_blocker(store: &Store, pod: &Value, fault: Option<PodFault>) -> Option<String> {
    const NO_PREEMPTION: &str =
        "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.";
    if fault == Some(PodFault::Unschedulable) {
        return Some(format!("0/1 nodes are available: 1 Insufficient cpu. {NO_PREEMPTION}"));
    }
    let ns = s(pod, "/metadata/namespace");
    let volumes = pod.pointer("/spec/volumes").and_then(Value::as_array).cloned().unwrap_or_default();
    for claim in volumes.iter().filter_map(|v| v.pointer("/persistentVolumeClaim/claimName")?.as_str()) {
        match store.find(PVCS, ns, claim) {
            None => {
                return Some(format!(
                    "0/1 nodes are available: persistentvolumeclaim \"{claim}\" not found. {NO_PREEMPTION}"
                ))
            }
            Some(pvc) if s(pvc, "/status/phase") != "Bound" => {
                return Some(format!(
                "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims. {NO_PREEMPTION}"
            ))
            }
            Some(_) => {}
        }
    }
    None
}

fn condition(kind: &str, status: bool, reason: Option<&str>, message: Option<&str>) -> Value {
    let mut c =
        json!({ "type": kind, "status": if status { "True" } else { "False" }, "lastTransitionTime": now() });
    if let Some(reason) = reason {
        c["reason"] = json!(reason);
    }
    if let Some(message) = message {
        c["message"] = json!(message);
    }
    c
}

/// The parts of a pod status a transition changes; timestamps are left out so that an
/// unchanged state is not rewritten.
fn signature(status: Option<&Value>) -> Value {
    let Some(status) = status else { return Value::Null };
    let containers = |key: &str| -> Vec<Value> {
        status
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|c| {
                let state = c.get("state").and_then(Value::as_object);
                let kind = state.and_then(|m| m.keys().next().cloned());
                json!([c["name"], kind, c.pointer("/state/waiting/reason"), c["ready"], c["restartCount"]])
            })
            .collect()
    };
    let conditions: Vec<Value> = status
        .get("conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| json!([c["type"], c["status"], c["reason"]]))
        .collect();
    json!([status["phase"], conditions, containers("initContainerStatuses"), containers("containerStatuses")])
}

/// The pod's next state under `fault`, with the events the transition records, or `None` when
/// it is already there.
fn next_pod_state(store: &Store, pod: &Value, fault: Option<PodFault>) -> Option<(Value, Vec<PodEvent>)> {
    let mut next = pod.clone();
    let pod_name = s(pod, "/metadata/name");
    let ns = s(pod, "/metadata/namespace");
    let mut events = Vec::new();
    if pod.pointer("/spec/nodeName").is_none() {
        match scheduling_blocker(store, pod, fault) {
            Some(message) => {
                next["status"] = json!({
                    "phase": "Pending",
                    "conditions": [condition("PodScheduled", false, Some("Unschedulable"), Some(&message))],
                });
                events.push(PodEvent {
                    kind: "Warning",
                    reason: "FailedScheduling",
                    message,
                    component: "default-scheduler",
                });
            }
            None => {
                next["spec"]["nodeName"] = json!(NODE_NAME);
                next["status"] = json!({ "phase": "Pending", "conditions": [condition("PodScheduled", true, None, None)] });
                let message = format!("Successfully assigned {ns}/{pod_name} to {NODE_NAME}");
                events.push(PodEvent {
                    kind: "Normal",
                    reason: "Scheduled",
                    message,
                    component: "default-scheduler",
                });
            }
        }
        return (signature(next.get("status")) != signature(pod.get("status"))).then_some((next, events));
    }
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
    let inits = pod.pointer("/spec/initContainers").and_then(Value::as_array).cloned().unwrap_or_default();
    let previous = |name: &str| -> Option<Value> {
        pod.pointer("/status/containerStatuses")?.as_array()?.iter().find(|c| c["name"] == name).cloned()
    };
    let at = now();
    let init_statuses: Vec<Value> = inits
        .iter()
        .map(|c| {
            json!({
                "name": c["name"], "image": c["image"], "imageID": c["image"], "ready": true, "restartCount": 0,
                "started": false, "containerID": format!("containerd://{:016x}", super::store::random_u64()),
                "state": { "terminated": { "exitCode": 0, "reason": "Completed", "startedAt": at, "finishedAt": at } },
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in &containers {
        let (name, image) = (c["name"].as_str().unwrap_or(""), c["image"].as_str().unwrap_or(""));
        let before = previous(name);
        let restarts = before.as_ref().and_then(|b| b["restartCount"].as_i64()).unwrap_or(0);
        let was = before
            .as_ref()
            .and_then(|b| b.get("state"))
            .and_then(Value::as_object)
            .and_then(|m| m.keys().next().cloned());
        let mut status = json!({
            "name": name, "image": image, "imageID": format!("{image}@sha256:{:064x}", 0),
            "containerID": format!("containerd://{:016x}", super::store::random_u64()),
            "restartCount": restarts,
        });
        match fault {
            Some(PodFault::ImagePullBackOff) => {
                status["ready"] = json!(false);
                status["started"] = json!(false);
                status["state"] = json!({ "waiting": { "reason": "ImagePullBackOff", "message": format!("Back-off pulling image \"{image}\"") } });
                events.extend([
                    kubelet("Normal", "Pulling", format!("Pulling image \"{image}\"")),
                    kubelet("Warning", "Failed", format!(
                        "Failed to pull image \"{image}\": rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": not found"
                    )),
                    kubelet("Warning", "Failed", "Error: ErrImagePull".into()),
                    kubelet("Normal", "BackOff", format!("Back-off pulling image \"{image}\"")),
                    kubelet("Warning", "Failed", "Error: ImagePullBackOff".into()),
                ]);
            }
            Some(PodFault::CrashLoopBackOff) => {
                status["ready"] = json!(false);
                status["started"] = json!(false);
                status["restartCount"] = json!(restarts.max(1));
                status["lastState"] = json!({ "terminated": { "exitCode": 1, "reason": "Error", "startedAt": at, "finishedAt": at } });
                status["state"] = json!({ "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": format!("back-off 10s restarting failed container={name} pod={pod_name}_{ns}({})", s(pod, "/metadata/uid")),
                } });
                events.push(kubelet(
                    "Warning",
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {name} in pod {pod_name}_{ns}({})",
                        s(pod, "/metadata/uid")
                    ),
                ));
            }
            None | Some(PodFault::Unschedulable) => {
                status["ready"] = json!(true);
                status["started"] = json!(true);
                status["state"] = json!({ "running": { "startedAt": at } });
                if was.as_deref() != Some("running") {
                    events.extend([
                        kubelet(
                            "Normal",
                            "Pulled",
                            format!("Container image \"{image}\" already present on machine"),
                        ),
                        kubelet("Normal", "Created", format!("Created container: {name}")),
                        kubelet("Normal", "Started", format!("Started container {name}")),
                    ]);
                }
            }
        }
        statuses.push(status);
    }
    let all_ready = statuses.iter().all(|c| c["ready"] == true);
    let not_ready = (!all_ready).then(|| {
        let names: Vec<&str> =
            statuses.iter().filter(|c| c["ready"] != true).filter_map(|c| c["name"].as_str()).collect();
        format!("containers with unready status: [{}]", names.join(" "))
    });
    let ready_reason = not_ready.as_ref().map(|_| "ContainersNotReady");
    let phase = if fault == Some(PodFault::ImagePullBackOff) { "Pending" } else { "Running" };
    let mut status = json!({
        "phase": phase,
        "conditions": [
            condition("PodReadyToStartContainers", true, None, None),
            condition("Initialized", true, None, None),
            condition("Ready", all_ready, ready_reason, not_ready.as_deref()),
            condition("ContainersReady", all_ready, ready_reason, not_ready.as_deref()),
            condition("PodScheduled", true, None, None),
        ],
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "podIPs": [{ "ip": "127.0.0.1" }],
        "startTime": pod.pointer("/status/startTime").cloned().unwrap_or(json!(at)),
        "containerStatuses": statuses,
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    next["status"] = status;
    if signature(next.get("status")) == signature(pod.get("status")) {
        return None;
    }
    Some((next, events))
}

/// The Deployment status a rollout waits on: replica counts and the Available and Progressing
/// conditions, with `NewReplicaSetAvailable` once every pod of the current template is ready.
fn deployment_status(store: &mut Store) -> bool {
    let mut wrote = false;
    let sets = all(store, REPLICASETS);
    let pods = all(store, PODS);
    for mut d in all(store, DEPLOYMENTS) {
        let (ns, name) = (s(&d, "/metadata/namespace").to_owned(), s(&d, "/metadata/name").to_owned());
        let want = d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1) as usize;
        let current = current_rs_name(&d);
        let live: Vec<(&Value, bool)> = owned_by(&sets, &d)
            .flat_map(|rs| {
                let updated = s(rs, "/metadata/name") == current;
                owned_by(&pods, rs).filter(|p| !terminating(p)).map(move |p| (p, updated))
            })
            .collect();
        let updated = live.iter().filter(|(_, u)| *u).count();
        let ready = live.iter().filter(|(p, _)| is_ready(p)).count();
        let available = ready;
        let complete = updated == want && live.len() == want && live.iter().all(|(p, u)| *u && is_ready(p));
        let (available_reason, available_message) = if available >= want {
            ("MinimumReplicasAvailable", "Deployment has minimum availability.")
        } else {
            ("MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        };
        let (progress_reason, progress_message) = if complete {
            ("NewReplicaSetAvailable", format!("ReplicaSet \"{current}\" has successfully progressed."))
        } else {
            ("ReplicaSetUpdated", format!("ReplicaSet \"{current}\" is progressing."))
        };
        let old_conditions =
            d.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        let keep_times = |kind: &str, status: bool, reason: &str, message: &str| -> Value {
            let old = old_conditions.iter().find(|c| c["type"] == kind);
            let status_str = if status { "True" } else { "False" };
            if let Some(old) =
                old.filter(|o| o["status"] == status_str && o["reason"] == reason && o["message"] == message)
            {
                return old.clone();
            }
            let at = now();
            let transition = old
                .filter(|o| o["status"] == status_str)
                .map_or(json!(at), |o| o["lastTransitionTime"].clone());
            json!({ "type": kind, "status": status_str, "reason": reason, "message": message,
                    "lastUpdateTime": at, "lastTransitionTime": transition })
        };
        let mut status = json!({
            "observedGeneration": d.pointer("/metadata/generation"),
            "conditions": [
                keep_times("Available", available >= want, available_reason, available_message),
                keep_times("Progressing", true, progress_reason, &progress_message),
            ],
        });
        // The real API server leaves zero counts out.
        for (field, n) in [
            ("replicas", live.len()),
            ("updatedReplicas", updated),
            ("readyReplicas", ready),
            ("availableReplicas", available),
            ("unavailableReplicas", want.saturating_sub(available)),
        ] {
            if n > 0 {
                status[field] = json!(n);
            }
        }
        if d.get("status") != Some(&status) {
            d["status"] = status;
            wrote |= store.put(DEPLOYMENTS, &ns, &name, d);
        }
    }
    wrote
}
