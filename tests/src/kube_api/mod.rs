//! A fake Kubernetes API server: a real HTTP/WebSocket server on 127.0.0.1 that the real `kube`
//! client talks to through an ordinary kubeconfig, so tests exercise a dev tool's whole flow
//! (swap a Deployment, wait for the pod, upload through exec, port-forward, restore) without a
//! cluster. [`FakeKube::start`] runs it inside a test; `devmount-fake-kube` runs it for scripts.
//!
//! Faithful to the real API server:
//! - Paths, verbs and bodies of apps/v1 Deployments and ReplicaSets, core/v1 Pods, Secrets,
//!   ConfigMaps, PersistentVolumeClaims, Events and Namespaces, autoscaling/v2
//!   HorizontalPodAutoscalers; discovery (`/version`, `/api`, `/apis`, group versions).
//! - One global resourceVersion; `PUT` or a patch carrying a stale `metadata.resourceVersion`
//!   gets `409 Conflict`; `metadata.generation` counts spec changes; writes through the main
//!   resource keep the stored `status`.
//! - Errors are `Status` objects with the real codes, reasons, messages and details: 404
//!   NotFound, 409 AlreadyExists and Conflict, 403 Forbidden (RBAC's wording), 422 Invalid with
//!   field causes, 400 BadRequest, 401 Unauthorized (the kubeconfig's bearer token is checked),
//!   410 Expired for a watch from a resourceVersion older than the change log.
//! - Admission decodes through the k8s-openapi types (unknown fields are dropped), fills in the
//!   common defaults (Deployment strategy, revisionHistoryLimit, progressDeadlineSeconds, pod
//!   restartPolicy, dnsPolicy, terminationMessagePath, imagePullPolicy, probe timings, volume
//!   modes, the default storage class) and validates what a Deployment rewrite can break: the
//!   selector must match the template and is immutable, Recreate forbids `rollingUpdate`,
//!   containers need a name and an image, volume mounts must name a volume.
//! - Lists (items without `kind`/`apiVersion`) and watches with label and field selectors; a
//!   watch sends ADDED/DELETED when an object enters or leaves its selector, supports
//!   `sendInitialEvents` with the `k8s.io/initial-events-end` bookmark, and ends at
//!   `timeoutSeconds`.
//! - The controller: a Deployment gets a ReplicaSet per pod template (`<name>-<hash>`, the
//!   `pod-template-hash` label, the `deployment.kubernetes.io/revision` annotation), its pods are
//!   named `<replicaset>-<suffix>` with owner references; pods go Pending, scheduled, Running
//!   with container statuses, conditions and the events a kubelet records; the Deployment
//!   status ends with `Progressing=True, reason NewReplicaSetAvailable`.
//! - Pod deletion is graceful in shape: the pod first shows a `deletionTimestamp`, then goes.
//! - Exec and port-forward speak the WebSocket channel protocols (`v5.channel.k8s.io` with its
//!   stdin close, `v4.channel.k8s.io`), with the exit status on channel 3 as a `Status`
//!   (`NonZeroExitCode` with an `ExitCode` cause), and a port's first frame on its data and
//!   error channels carrying the port number.
//!
//! Simplified:
//! - Every Deployment rolls out like `Recreate`: the old ReplicaSet's pods go before the new
//!   one's are made. No rolling surge, no progress deadline, no HPA behaviour (HPAs are only
//!   stored), no node other than `fake-node`, no quota, no limit ranges.
//! - Strategic merge patch and server-side apply are refused with `415` (their merge rules
//!   depend on per-field schema metadata); JSON merge patch and JSON patch are supported.
//!   `dryRun` is refused with `400`. Lists are never paginated. Field selectors accept any
//!   dotted path, not just the fields the real server indexes.
//! - Pods run nothing: container "processes" are status only. Exec runs its command as a
//!   local child process, with the host's environment plus the container's `env` (literal
//!   values and `secretKeyRef`), in `pods_dir/<namespace>/<pod>` as working directory; a new
//!   pod gets a fresh directory, like an emptyDir. Absolute paths are the host's. `tty` is
//!   accepted but no terminal is made. A running exec is killed (its process group) when its
//!   pod is deleted; what it left in the background is not.
//! - Port-forward connects to the local address a test mapped for the pod or its Deployment.
//! - Faults apply to every app container of a Deployment's pods, and clearing one lets the
//!   pods recover in place.
//! - One user (`devmount-test`); RBAC is "everything allowed" minus the (verb, resource) pairs
//!   a test denies.

mod controller;
mod http;
mod resources;
mod store;
mod streams;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use resources::{Resource, NAMESPACES, PODS};
use store::Store;

/// The namespace that exists from the start (with `kube-system`).
pub const NAMESPACE: &str = "default";
/// The user the kubeconfig authenticates as; RBAC messages name it.
pub const USER: &str = "devmount-test";
/// The storage class that exists from the start and is the default.
pub const DEFAULT_STORAGE_CLASS: &str = "standard";
/// The one node pods are scheduled on.
pub const NODE_NAME: &str = "fake-node";

/// A failure the fake kubelet or scheduler shows for a Deployment's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodFault {
    /// Scheduled, but each app container waits with `ImagePullBackOff` (pod stays Pending).
    ImagePullBackOff,
    /// Not scheduled: `PodScheduled=False, reason Unschedulable` and a FailedScheduling event.
    Unschedulable,
    /// Running, but each app container waits with `CrashLoopBackOff` after exit code 1.
    CrashLoopBackOff,
}

/// Everything the API handlers and the controller share, behind one lock (never held across
/// an await).
struct State {
    store: Store,
    faults: HashMap<(String, String), PodFault>,
    storage_classes: BTreeSet<String>,
    denials: HashSet<(String, String)>,
    /// (namespace, deployment or pod name, pod port) -> local address.
    ports: HashMap<(String, String, u16), SocketAddr>,
    exec_stdin_close: bool,
}

struct Shared {
    state: Mutex<State>,
    token: String,
    pods_dir: PathBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; the fake carries on.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.pods_dir.join(namespace).join(pod)
    }
}

/// A running fake API server; dropping it stops the server, the controller and every stream.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeKube {
    /// Starts listening on 127.0.0.1 (a free port) with namespaces `default` and `kube-system`.
    /// Exec in pod P of namespace N runs in `pods_dir/N/P`, made on first use.
    pub async fn start(pods_dir: impl Into<PathBuf>) -> Result<FakeKube> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the fake API server")?;
        let addr = listener.local_addr()?;
        let mut store = Store::new();
        for ns in [NAMESPACE, "kube-system"] {
            let namespace = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns },
                                    "status": { "phase": "Active" } });
            store.create(NAMESPACES, "", namespace).map_err(|e| anyhow!(e.message))?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store,
                faults: HashMap::new(),
                storage_classes: BTreeSet::from([DEFAULT_STORAGE_CLASS.to_owned()]),
                denials: HashSet::new(),
                ports: HashMap::new(),
                exec_stdin_close: true,
            }),
            token: format!("{:016x}{:016x}", store::random_u64(), store::random_u64()),
            pods_dir: pods_dir.into(),
        });
        let tasks = vec![
            tokio::spawn(http::serve(listener, shared.clone())),
            tokio::spawn(run_controller(shared.clone())),
        ];
        Ok(FakeKube { addr, shared, tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cluster URL (plain HTTP: kube accepts `http://` servers).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bearer token the server requires.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig (JSON, which YAML readers accept) with one context, `fake`, in namespace
    /// `default`.
    pub fn kubeconfig(&self) -> String {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "fake", "cluster": { "server": self.url() } }],
            "users": [{ "name": USER, "user": { "token": self.token() } }],
            "contexts": [{ "name": "fake", "context": { "cluster": "fake", "user": USER, "namespace": NAMESPACE } }],
            "current-context": "fake",
        });
        serde_json::to_string_pretty(&config).expect("a JSON value serializes")
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig()).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates an object as `POST` would (admission included, RBAC not); the kind comes from
    /// its `apiVersion` and `kind`, the namespace from its metadata (default `default`).
    pub fn create(&self, object: Value) -> Result<Value> {
        let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let res = resources::ALL
            .iter()
            .copied()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .ok_or_else(|| anyhow!("the fake API server does not serve {api_version} {kind}"))?;
        let namespace = if res.namespaced {
            object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(NAMESPACE).to_owned()
        } else {
            String::new()
        };
        let admitted = resources::admit(res, object, None).map_err(|e| anyhow!(e.message))?;
        self.shared.lock().store.create(res, &namespace, admitted).map_err(|e| anyhow!(e.message))
    }

    /// A stored object by plural resource name (`deployments`, `pods`, ...).
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = find_plural(plural)?;
        self.shared.lock().store.find(res, namespace, name).cloned()
    }

    /// The stored objects of one plural resource name in a namespace.
    pub fn list(&self, plural: &str, namespace: &str) -> Vec<Value> {
        let Some(res) = find_plural(plural) else { return Vec::new() };
        self.shared.lock().store.list(res, Some(namespace), &store::Selectors::default())
    }

    pub fn create_namespace(&self, name: &str) -> Result<()> {
        self.create(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } }))
            .map(drop)
    }

    /// Makes RBAC refuse `verb` (get, list, watch, create, update, patch, delete) on `resource`
    /// (`deployments`, `pods/exec`, `pods/portforward`, ...) with 403 Forbidden.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared.lock().denials.insert((verb.to_owned(), resource.to_owned()));
    }

    pub fn allow(&self, verb: &str, resource: &str) {
        self.shared.lock().denials.remove(&(verb.to_owned(), resource.to_owned()));
    }

    /// Shows `fault` on the pods of a Deployment (current and future), or clears it.
    pub fn set_fault(&self, namespace: &str, deployment: &str, fault: Option<PodFault>) {
        let mut state = self.shared.lock();
        let key = (namespace.to_owned(), deployment.to_owned());
        match fault {
            Some(fault) => state.faults.insert(key, fault),
            None => state.faults.remove(&key),
        };
        state.store.touch();
    }

    /// The Deployment whose ReplicaSet owns pod `pod`, if any: the one whose fault it shows.
    pub fn deployment_of(&self, namespace: &str, pod: &str) -> Option<String> {
        let state = self.shared.lock();
        controller::owning_deployment(&state.store, state.store.find(PODS, namespace, pod)?)
    }

    /// Makes claims of this storage class bind (only `standard` does at start).
    pub fn add_storage_class(&self, name: &str) {
        let mut state = self.shared.lock();
        state.storage_classes.insert(name.to_owned());
        state.store.touch();
    }

    /// Deletes a pod as a node drain or eviction would: its streams end at once, and its
    /// ReplicaSet (if any) makes a new pod with a new name.
    pub fn replace_pod(&self, namespace: &str, pod: &str) -> Result<()> {
        self.shared.lock().store.terminate_pod(namespace, pod).map(drop).map_err(|e| anyhow!(e.message))
    }

    /// Ends every exec and port-forward stream of a pod, as a dropped connection would; the pod
    /// stays.
    pub fn cut_streams(&self, namespace: &str, pod: &str) -> Result<()> {
        let mut state = self.shared.lock();
        let pod = state.store.get(PODS, namespace, pod).map_err(|e| anyhow!(e.message))?.clone();
        state.store.cut_streams(&pod);
        Ok(())
    }

    /// Port-forwards to `pod_port` of any pod of `deployment` connect to `to`.
    pub fn map_port(&self, namespace: &str, deployment: &str, pod_port: u16, to: SocketAddr) {
        self.shared.lock().ports.insert((namespace.to_owned(), deployment.to_owned(), pod_port), to);
    }

    /// Port-forwards to `pod_port` of this one pod connect to `to` (before its Deployment's map).
    pub fn map_pod_port(&self, namespace: &str, pod: &str, pod_port: u16, to: SocketAddr) {
        self.map_port(namespace, pod, pod_port, to);
    }

    /// The environment a container of a pod in `namespace` gets from its spec (`container`, as
    /// JSON): literal values and `secretKeyRef`s, as exec gives it.
    pub fn container_env(&self, namespace: &str, container: &Value) -> Result<Vec<(String, OsString)>> {
        streams::container_env(&self.shared, namespace, container).map_err(|e| anyhow!(e.message))
    }

    /// The working directory of exec in a pod.
    pub fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.shared.pod_dir(namespace, pod)
    }

    /// With `false`, exec offers only `v4.channel.k8s.io`, where a client cannot close stdin
    /// without closing the whole stream (as on clusters older than 1.30).
    pub fn set_exec_stdin_close(&self, supported: bool) {
        self.shared.lock().exec_stdin_close = supported;
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.lock().store.cut_all_streams();
    }
}

fn find_plural(plural: &str) -> Option<&'static Resource> {
    resources::ALL.iter().copied().find(|r| r.plural == plural)
}

/// Runs [`controller::reconcile`] after every change until it has nothing left to do.
async fn run_controller(shared: Arc<Shared>) {
    let mut changed = shared.lock().store.subscribe();
    loop {
        changed.borrow_and_update();
        let wrote = controller::reconcile(&mut shared.lock());
        if wrote {
            tokio::task::yield_now().await;
        } else if changed.changed().await.is_err() {
            return;
        }
    }
}
