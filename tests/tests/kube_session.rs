//! `devmount up` and `down` on a kubernetes target, through the `devmount` binary, against the
//! fake API server (tests/src/kube_api): the swap, the upload through exec, the connection
//! through a port-forward, the mount, `devmount exec`, a pod replaced under the session, the
//! restore; the same with `serverImage`, whose init container brings the server; OpenSSH's
//! `ssh` and `sftp` through `devmount ssh-config`; an RBAC refusal, a server that cannot run,
//! a resumed session, and a swap refused on another machine and restored from there.
//!
//! The fake's pods run nothing, so [`Kubelet`] plays the kubelet's part from each dev pod's
//! spec: it runs the init container that copies the server from `serverImage` (the static
//! server plays that image's), and starts the dev container's server as its command would:
//! the wait script once the pod's directory holds the uploaded server and the ready marker,
//! or the server itself. The server gets the container's args, its environment (the Secret's
//! host key) and the Secret volume's authorized keys; it serves a directory that plays the
//! persistent volume, on the pod's port at a loopback address of the pod's own, and the pod's
//! port is mapped to it. Exec in the fake runs on this machine in the pod's directory, so
//! `devmount up` uploads there (`DEVMOUNT_KUBE_SERVER_DIR=.`).
//!
//! Needs the static server (`scripts/build-static-server`), which `devmount up` finds beside
//! the debug binaries' target directory.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use devmount_tests::kube_api::{FakeKube, PodFault, NAMESPACE};
use devmount_tests::{client_bin, command, find_daemon, retry, run, ssh_config_value, Proc, Run};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long a step may take on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);
/// The label and annotations devmount puts on what it swaps.
const SESSION_LABEL: &str = "devmount.dev/session";
/// The `serverImage` the kubelet stand-in knows, and where it holds the server (where
/// docs/manifest.md says such an image holds it).
const SERVER_IMAGE: &str = "registry.example/devmount-server:test";
const SERVER_IN_IMAGE: &str = "/devmount-server";
/// A `serverImage` whose server cannot run (another version's, say): it exits at once.
const EXITING_SERVER_IMAGE: &str = "registry.example/devmount-server:exits";

/// The fake cluster, a sandbox for `devmount` (state, sockets, mount point, manifest) and the
/// kubelet stand-in.
struct Cluster {
    fake: Arc<FakeKube>,
    runtime: tokio::runtime::Runtime,
    root: TempDir,
    kubelet: Option<Kubelet>,
}

impl Cluster {
    fn start() -> Result<Cluster> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let root = tempfile::Builder::new().prefix("devmount-kube-").tempdir()?;
        let base = fs::canonicalize(root.path())?;
        let fake = Arc::new(runtime.block_on(FakeKube::start(base.join("pods")))?);
        fake.write_kubeconfig(&base.join("kubeconfig"))?;
        for dir in ["state", "state2", "mnt", "mnt2", "volume"] {
            fs::create_dir(base.join(dir))?;
        }
        for dir in ["run", "run2"] {
            fs::DirBuilder::new().mode(0o700).create(base.join(dir))?;
        }
        let images = Images::from([
            ((SERVER_IMAGE.to_owned(), SERVER_IN_IMAGE.to_owned()), static_server()?),
            ((EXITING_SERVER_IMAGE.to_owned(), SERVER_IN_IMAGE.to_owned()), PathBuf::from("/bin/false")),
        ]);
        let kubelet = Kubelet::start(fake.clone(), base.join("kubelet"), images)?;
        let cluster = Cluster { fake, runtime, root, kubelet: Some(kubelet) };
        cluster.manifest("")?;
        Ok(cluster)
    }

    /// Writes ./devmount.yml for deployment `web`, with `extra` lines under `kubernetes:`. The
    /// fake's pods see this machine's files: the workdir is the sandbox's `volume`.
    fn manifest(&self, extra: &str) -> Result<()> {
        let text = format!(
            "target:\n  kubernetes:\n    deployment: web\n    workdir: {}\n    timeout: 60s\n{extra}",
            self.path("volume").display()
        );
        Ok(fs::write(self.path("devmount.yml"), text)?)
    }

    fn path(&self, rel: &str) -> PathBuf {
        fs::canonicalize(self.root.path()).unwrap_or_else(|_| self.root.path().to_owned()).join(rel)
    }

    /// `program` run on this machine (`state`), or another one (`state2`, with `run2`), in the
    /// sandbox: `devmount`, or an OpenSSH client whose `ProxyCommand` is `devmount proxy`.
    fn command_as(&self, state: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd: Command = command(program);
        let run_dir = if state == "state" { "run" } else { "run2" };
        cmd.env("XDG_STATE_HOME", self.path(state))
            .env("XDG_RUNTIME_DIR", self.path(run_dir))
            .env("KUBECONFIG", self.path("kubeconfig"))
            .env("DEVMOUNT_KUBE_SERVER_DIR", ".")
            .env_remove("DEVMOUNT_LOG")
            .current_dir(self.path(""));
        cmd
    }

    /// `devmount ARGS...` on this machine (`state`), or another one (`state2`).
    fn devmount_as(&self, state: &str, args: &[&str]) -> Result<Run> {
        run(self.command_as(state, client_bin()?).args(args))
    }

    fn devmount(&self, args: &[&str]) -> Result<Run> {
        self.devmount_as("state", args)
    }

    fn ok(&self, args: &[&str]) -> Result<Run> {
        let out = self.devmount(args)?;
        ensure!(out.success(), "{out}");
        Ok(out)
    }

    fn mnt(&self) -> PathBuf {
        self.path("mnt")
    }

    /// Creates Deployment `web`: two replicas, a probe, a sidecar; returns it as stored.
    fn deploy(&self) -> Result<Value> {
        self.fake.create(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NAMESPACE, "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [
                        {"name": "app", "image": "busybox:1.36", "command": ["httpd", "-f"],
                         "workingDir": "/srv", "env": [{"name": "MODE", "value": "prod"}],
                         "readinessProbe": {"tcpSocket": {"port": 80}}},
                        {"name": "sidecar", "image": "busybox:1.36", "command": ["sleep", "1d"]}
                    ]}
                }
            }
        }))?;
        self.deployment()
    }

    fn deployment(&self) -> Result<Value> {
        self.fake.get("deployments", NAMESPACE, "web").ok_or_else(|| anyhow!("deployment/web is gone"))
    }

    /// Changes the Deployment as another tool would, through the API.
    fn change(&self, edit: impl FnOnce(&mut Deployment)) -> Result<()> {
        let mut deployment: Deployment = serde_json::from_value(self.deployment()?)?;
        edit(&mut deployment);
        let path = self.path("kubeconfig");
        self.runtime.block_on(async {
            let config =
                Config::from_custom_kubeconfig(Kubeconfig::read_from(&path)?, &KubeConfigOptions::default())
                    .await?;
            let api: Api<Deployment> = Api::namespaced(Client::try_from(config)?, NAMESPACE);
            api.replace("web", &PostParams::default(), &deployment).await?;
            anyhow::Ok(())
        })
    }

    /// The session daemons' logs, together.
    fn daemon_log(&self) -> Result<String> {
        let mut text = String::new();
        for entry in fs::read_dir(self.path("state/devmount/log"))? {
            text.push_str(&fs::read_to_string(entry?.path())?);
        }
        Ok(text)
    }

    fn secrets(&self) -> Vec<Value> {
        self.fake.list("secrets", NAMESPACE)
    }

    /// The running dev pod's name.
    fn dev_pod(&self) -> Result<String> {
        retry("a running dev pod", DEADLINE, || {
            dev_pods(&self.fake)
                .into_iter()
                .find(|p| p.pointer("/status/phase").and_then(Value::as_str) == Some("Running"))
                .and_then(|p| p.pointer("/metadata/name").and_then(Value::as_str).map(str::to_owned))
                .ok_or_else(|| anyhow!("no running dev pod"))
        })
    }

    /// Replaces dev pod `pod` as a drain would; returns the new running one's name.
    fn replace_dev_pod(&self, pod: &str) -> Result<String> {
        self.fake.replace_pod(NAMESPACE, pod)?;
        retry("a new dev pod", DEADLINE, || {
            let new = self.dev_pod()?;
            ensure!(new != pod, "still {new}");
            Ok(new)
        })
    }

    /// `devmount down` unmounts `mnt` and restores the Deployment exactly as `original`, and
    /// deletes the session Secret.
    fn down_restores(&self, mnt: &Path, original: &Value) -> Result<()> {
        let down = self.ok(&["down", mnt.to_str().context("mount point")?])?;
        ensure!(!is_mount_point(mnt), "still mounted after down\n{down}");
        let restored = retry("the restore", DEADLINE, || {
            let now = self.deployment()?;
            ensure!(
                now.pointer("/spec/replicas") == original.pointer("/spec/replicas"),
                "not restored yet: {now}"
            );
            Ok(now)
        })?;
        assert_eq!(restorable(&restored), restorable(original), "restored exactly");
        ensure!(self.secrets().is_empty(), "the session Secret is deleted: {:?}", self.secrets());
        Ok(())
    }

    /// Whether a control socket of a session on this machine accepts a connection (a dead
    /// daemon's refuses).
    fn a_socket_answers(&self) -> Result<bool> {
        for entry in fs::read_dir(self.path("run/devmount"))? {
            let path = entry?.path();
            if path.extension() == Some("sock".as_ref()) && UnixStream::connect(&path).is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `devmount up` fails with a message holding each of `wanted`, and leaves nothing: no
    /// mount, no Secret, the Deployment as `original`.
    fn up_refused(&self, original: &Value, wanted: &[&str]) -> Result<()> {
        let mnt = self.mnt();
        let up = self.devmount(&["up", mnt.to_str().context("mount point")?])?;
        ensure!(!up.success(), "{up}");
        let err = up.stderr_text();
        ensure!(wanted.iter().all(|w| err.contains(w)), "want {wanted:?}: {up}");
        ensure!(!is_mount_point(&mnt));
        ensure!(self.secrets().is_empty(), "the Secret is deleted again: {:?}", self.secrets());
        ensure!(restorable(&self.deployment()?) == restorable(original), "not restored: {up}");
        Ok(())
    }

    /// Checks that `devmount exec cat FILE` in the mount prints `text`.
    fn exec_sees(&self, file: &str, text: &str) -> Result<()> {
        let mut cmd = command(client_bin()?);
        cmd.env("XDG_STATE_HOME", self.path("state"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .current_dir(self.mnt())
            .args(["exec", "-T", "cat", file]);
        let out = run(&mut cmd)?;
        ensure!(out.success() && out.stdout_text() == text, "`devmount exec cat {file}`: {out}");
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mnt = self.mnt();
        if is_mount_point(&mnt) {
            let _ = self.devmount(&["down", mnt.to_str().unwrap_or_default(), "--force"]);
            if is_mount_point(&mnt) {
                let _ = run(command("fusermount3").arg("-u").arg("-z").arg(&mnt));
            }
        }
        if let Ok(pid) = find_daemon(&client_bin().unwrap_or_default(), "up", mnt.as_os_str()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        drop(self.kubelet.take());
    }
}

/// The static server `devmount up` uploads, where it finds it (`static/` beside the debug
/// binaries' directory); it plays the server in [`SERVER_IMAGE`] too.
fn static_server() -> Result<PathBuf> {
    let client = client_bin()?;
    let target = client.parent().and_then(Path::parent).context("the binaries' directory has no parent")?;
    let server = target.join("static/devmount-server");
    ensure!(
        server.is_file(),
        "{} not found: build it with scripts/build-static-server --debug",
        server.display()
    );
    Ok(server)
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let path = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*path))
}

/// The pods of the dev Deployment (those with devmount's session label), not being deleted.
fn dev_pods(fake: &FakeKube) -> Vec<Value> {
    fake.list("pods", NAMESPACE)
        .into_iter()
        .filter(|p| p.pointer(&format!("/metadata/labels/{}", SESSION_LABEL.replace('/', "~1"))).is_some())
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .collect()
}

/// Images the kubelet stand-in runs init containers from: (image, path in it) -> the file on
/// this machine that plays it.
type Images = HashMap<(String, String), PathBuf>;

/// Plays the kubelet for scheduled dev pods, from their spec: runs the init containers that
/// copy a file from their image (serverImage's), starts the dev container's server as its
/// command would (the wait script's waits for the upload's ready marker), and restarts it when
/// it exits (restartPolicy Always). A server that exits [`CRASHES`] times in a row before it is
/// ready makes the pod's Deployment show `CrashLoopBackOff`, and is not started again (a lone
/// exit may be another test's server holding the pod's loopback address).
struct Kubelet {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Kubelet {
    /// `dir` holds what the kubelet makes for pods (their Secret volumes' files).
    fn start(fake: Arc<FakeKube>, dir: PathBuf, images: Images) -> Result<Kubelet> {
        fs::create_dir(&dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut servers: HashMap<String, Proc> = HashMap::new();
            let mut initialized: HashSet<String> = HashSet::new();
            let mut exits: HashMap<String, u32> = HashMap::new();
            // The last failure per pod, told once: every look tries again.
            let mut told: HashMap<String, String> = HashMap::new();
            while !stopping.load(Ordering::Relaxed) {
                let pods: Vec<Value> =
                    dev_pods(&fake).into_iter().filter(|p| p.pointer("/spec/nodeName").is_some()).collect();
                let names: Vec<&str> = pods.iter().map(pod_name).collect();
                servers.retain(|name, _| names.contains(&name.as_str()));
                initialized.retain(|name| names.contains(&name.as_str()));
                exits.retain(|name, _| names.contains(&name.as_str()));
                told.retain(|name, _| names.contains(&name.as_str()));
                for pod in &pods {
                    let name = pod_name(pod);
                    let running =
                        servers.get_mut(name).is_some_and(|p| p.try_wait().is_ok_and(|s| s.is_none()));
                    if running || exits.get(name).is_some_and(|n| *n >= CRASHES) {
                        continue;
                    }
                    let files = PodFiles {
                        fake: &fake,
                        pod,
                        dir: fake.pod_dir(NAMESPACE, name),
                        secrets: dir.join(name),
                    };
                    let failure = match files.start(&images, &mut initialized) {
                        Ok(Start::Serving(proc)) => {
                            exits.remove(name);
                            servers.insert(name.to_owned(), proc);
                            continue;
                        }
                        Ok(Start::Waiting) => continue,
                        Ok(Start::Exited(e)) => {
                            let count = exits.entry(name.to_owned()).or_default();
                            *count += 1;
                            if *count == CRASHES {
                                if let Some(deployment) = fake.deployment_of(NAMESPACE, name) {
                                    fake.set_fault(NAMESPACE, &deployment, Some(PodFault::CrashLoopBackOff));
                                }
                            }
                            e
                        }
                        Err(e) => e,
                    };
                    let failure = format!("{failure:#}");
                    if told.get(name) != Some(&failure) {
                        eprintln!("kubelet: pod {name}: {failure}");
                        told.insert(name.to_owned(), failure);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Ok(Kubelet { stop, thread: Some(thread) })
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How many exits in a row before it is ready make a dev container crash-loop.
const CRASHES: u32 = 3;

/// What became of a dev container's start.
enum Start {
    /// Its server is ready.
    Serving(Proc),
    /// Its wait script waits for the upload.
    Waiting,
    /// Its server ended before it was ready.
    Exited(anyhow::Error),
}

fn pod_name(pod: &Value) -> &str {
    pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

/// The strings of a JSON array (a command, args); none for anything else.
fn strings(value: &Value) -> Vec<&str> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

/// One dev pod as the kubelet stand-in runs it.
struct PodFiles<'a> {
    fake: &'a FakeKube,
    pod: &'a Value,
    /// The fake's directory of the pod, where its exec runs. It plays the pod's emptyDir (the
    /// dev pod has one, the server's), so the upload (`DEVMOUNT_KUBE_SERVER_DIR=.`) and the
    /// init container's copy land where the dev container's command looks.
    dir: PathBuf,
    /// Where the pod's Secret volumes are written.
    secrets: PathBuf,
}

impl PodFiles<'_> {
    /// Runs the init containers once per pod, then [`PodFiles::serve`].
    fn start(&self, images: &Images, initialized: &mut HashSet<String>) -> Result<Start> {
        let name = pod_name(self.pod);
        if !initialized.contains(name) {
            self.run_init_containers(images)?;
            initialized.insert(name.to_owned());
        }
        self.serve()
    }

    /// Where `path` in `container` (as the pod spec gives it) is on this machine: in the pod's
    /// directory for an emptyDir, in `secrets` for a Secret volume (its files written first),
    /// else `path` itself, as the fake's pods see this machine's files (the claim is the
    /// directory the workdir names).
    fn host_path(&self, container: &Value, path: &str) -> Result<PathBuf> {
        let mount = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m, m["mountPath"].as_str()?.trim_end_matches('/'))))
            .filter(|(_, at)| {
                path.strip_prefix(at).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .max_by_key(|(_, at)| at.len());
        let Some((mount, at)) = mount else { return Ok(path.into()) };
        let rest = path[at.len()..].trim_start_matches('/');
        let volume_name = mount["name"].as_str().unwrap_or_default();
        let volume = self
            .pod
            .pointer("/spec/volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|v| v["name"] == volume_name)
            .with_context(|| {
                format!(
                    "container {} mounts volume {volume_name}, which the pod does not have",
                    container["name"]
                )
            })?;
        if volume.get("emptyDir").is_some() {
            fs::create_dir_all(&self.dir)?;
            Ok(self.dir.join(rest))
        } else if let Some(source) = volume.get("secret") {
            let dir = self.secrets.join(volume_name);
            self.write_secret(source, &dir)?;
            Ok(dir.join(rest))
        } else {
            Ok(path.into())
        }
    }

    /// Writes a Secret volume's files into `dir`: its `items`, or every key.
    fn write_secret(&self, source: &Value, dir: &Path) -> Result<()> {
        let name = source["secretName"].as_str().context("a Secret volume without secretName")?;
        let secret =
            self.fake.get("secrets", NAMESPACE, name).with_context(|| format!("no Secret {name}"))?;
        let data = serde_json::from_value::<Secret>(secret)?.data.unwrap_or_default();
        let items: Vec<(&str, &str)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| (i["key"].as_str().unwrap_or_default(), i["path"].as_str().unwrap_or_default()))
                .collect(),
            None => data.keys().map(|k| (k.as_str(), k.as_str())).collect(),
        };
        fs::create_dir_all(dir)?;
        for (key, path) in items {
            let value = data.get(key).with_context(|| format!("no {key} in Secret {name}"))?;
            fs::write(dir.join(path), &value.0)?;
        }
        Ok(())
    }

    /// Runs the init containers that copy a file from their image (`cp FROM TO`, as
    /// serverImage's does), FROM being looked up in `images`. Others (devmount's seeding) are
    /// not played: the fake's claim is the directory the workdir names already.
    fn run_init_containers(&self, images: &Images) -> Result<()> {
        let inits = self.pod.pointer("/spec/initContainers").and_then(Value::as_array);
        for init in inits.into_iter().flatten() {
            let name = init["name"].as_str().unwrap_or_default();
            let ["cp", from, to] = strings(&init["command"])[..] else { continue };
            let image = init["image"].as_str().unwrap_or_default();
            let file = images.get(&(image.to_owned(), from.to_owned())).with_context(|| {
                format!("init container {name}: cp: can't stat '{from}': no such file in image {image}")
            })?;
            let mut to = self.host_path(init, to)?;
            if to.is_dir() {
                to.push(Path::new(from).file_name().context("cp from a directory")?);
            }
            fs::copy(file, &to).with_context(|| {
                format!("init container {name}: copying {} to {}", file.display(), to.display())
            })?;
        }
        Ok(())
    }

    /// Starts the dev container's server with its command and args, its environment (the
    /// Secret's host key through `secretKeyRef`) and its authorized keys file (the Secret
    /// volume's) as the pod spec gives them, unless the wait script would still wait for the
    /// upload. The listen address's 127.0.0.1 is replaced by the pod's own loopback address
    /// (the port stays, so the server's own port is the pod's, as `devmount proxy` asks for
    /// it), and the pod's port is mapped to it.
    fn serve(&self) -> Result<Start> {
        let containers =
            self.pod.pointer("/spec/containers").and_then(Value::as_array).context("no containers")?;
        let dev = containers
            .iter()
            .find(|c| strings(&c["args"]).contains(&"--host-key-env"))
            .context("no dev container")?;
        let (program, mut given) = match strings(&dev["command"])[..] {
            // The wait script: it waits for the ready marker beside the uploaded server, then
            // execs that with the container's args.
            ["/bin/sh", "-c", ..] => {
                if !self.dir.join("ready").exists() {
                    return Ok(Start::Waiting);
                }
                (self.dir.join("devmount-server"), Vec::new())
            }
            // serverImage's: the server is the command itself.
            [program, ref rest @ ..] => (self.host_path(dev, program)?, rest.to_vec()),
            [] => bail!("the dev container has no command"),
        };
        given.extend(strings(&dev["args"]));
        let mut args: Vec<OsString> = Vec::new();
        let mut listen = None;
        let mut given = given.into_iter();
        while let Some(arg) = given.next() {
            args.push(arg.into());
            match arg {
                "--listen" => {
                    let in_pod: SocketAddr = given.next().context("--listen without a value")?.parse()?;
                    let here = SocketAddr::from((pod_loopback(), in_pod.port()));
                    args.push(here.to_string().into());
                    listen = Some(here);
                }
                "--authorized-keys" => {
                    let path = given.next().context("--authorized-keys without a value")?;
                    args.push(self.host_path(dev, path)?.into());
                }
                _ => {}
            }
        }
        let mut cmd = command(program);
        cmd.args(&args).envs(self.fake.container_env(NAMESPACE, dev)?);
        let mut proc = Proc::spawn(&mut cmd)?;
        if let Err(e) = devmount_tests::wait_ready(&proc) {
            // Ended, or ended here: a server that is not ready in time is no use either.
            proc.kill();
            return Ok(Start::Exited(e));
        }
        let listen = listen.context("no --listen")?;
        self.fake.map_pod_port(NAMESPACE, pod_name(self.pod), listen.port(), listen);
        Ok(Start::Serving(proc))
    }
}

/// A loopback address for one pod's server (all of 127.0.0.0/8 is loopback, so the server can
/// listen on the pod's port as in a pod): from this process's id and a count, never
/// 127.0.0.1. Another test process whose id agrees in the low 16 bits may hold it; then the
/// server cannot listen, exits, and the kubelet's next look starts it on the next address.
fn pod_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let [_, _, high, low] = std::process::id().to_be_bytes();
    let count = NEXT.fetch_add(1, Ordering::Relaxed);
    Ipv4Addr::new(127, high, low, (count % 253 + 2) as u8)
}

/// Annotations but the revision, which the Deployment controller sets and counts up at each
/// rollout; `None` for none.
fn without_revision(annotations: &serde_json::Map<String, Value>) -> Option<serde_json::Map<String, Value>> {
    let kept = annotations.iter().filter(|(k, _)| k.as_str() != "deployment.kubernetes.io/revision");
    let kept: serde_json::Map<String, Value> = kept.map(|(k, v)| (k.clone(), v.clone())).collect();
    (!kept.is_empty()).then_some(kept)
}

/// The fields of a Deployment that a restore must give back exactly.
fn restorable(deployment: &Value) -> Value {
    json!({
        "spec": deployment["spec"],
        "labels": deployment.pointer("/metadata/labels"),
        "annotations": deployment
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .and_then(without_revision),
    })
}

#[test]
fn up_edit_exec_pod_replaced_down_restores() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    let mnt = cluster.mnt();
    let mnt_arg = mnt.to_str().context("mount point")?;
    let up = cluster.ok(&["up", mnt_arg])?;
    ensure!(is_mount_point(&mnt), "`devmount up` returned, but nothing is mounted\n{up}");

    let dev = cluster.deployment()?;
    ensure!(dev.pointer("/spec/replicas") == Some(&json!(1)), "not swapped: {dev}");
    ensure!(cluster.secrets().len() == 1, "one session Secret: {:?}", cluster.secrets());
    let status = cluster.ok(&["status"])?.stdout_text();
    let place = format!("kubernetes deployment {NAMESPACE}/web");
    ensure!(status.contains(&place) && status.contains("container app"), "status names the place: {status}");

    fs::write(mnt.join("hello.txt"), "hi from the laptop\n")?;
    cluster.exec_sees("hello.txt", "hi from the laptop\n")?;
    ensure!(fs::read_to_string(cluster.path("volume/hello.txt"))? == "hi from the laptop\n");

    // The port-forward breaks, the pod stays: the session reconnects to the same server.
    let first = cluster.dev_pod()?;
    cluster.fake.cut_streams(NAMESPACE, &first)?;
    fs::write(mnt.join("cut.txt"), "written after the forward broke\n")?;
    retry("exec after the forward broke", DEADLINE, || {
        cluster.exec_sees("cut.txt", "written after the forward broke\n")
    })?;
    ensure!(cluster.daemon_log()?.contains("reconnected to web.default:22022"), "{}", cluster.daemon_log()?);

    // The pod goes (a drain); the session finds the new one, uploads again, reconnects.
    let second = cluster.replace_dev_pod(&first)?;
    retry("the upload to the new pod", DEADLINE, || {
        ensure!(cluster.fake.pod_dir(NAMESPACE, &second).join("ready").exists(), "not yet");
        Ok(())
    })?;
    fs::write(mnt.join("after.txt"), "written after the pod was replaced\n")?;
    retry("exec over the new connection", DEADLINE, || {
        cluster.exec_sees("after.txt", "written after the pod was replaced\n")
    })?;

    cluster.down_restores(&mnt, &original)?;
    ensure!(
        cluster.fake.list("persistentvolumeclaims", NAMESPACE).len() == 1,
        "the claim is kept without --volumes"
    );
    let volumes = cluster.ok(&["down", "--volumes"])?;
    ensure!(
        cluster.fake.list("persistentvolumeclaims", NAMESPACE).is_empty(),
        "--volumes deletes it\n{volumes}"
    );
    Ok(())
}

#[test]
fn server_image_brings_the_server_in_an_init_container() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    cluster.manifest(&format!("    serverImage: {SERVER_IMAGE}\n"))?;
    let mnt = cluster.mnt();
    let up = cluster.ok(&["up", mnt.to_str().context("mount point")?])?;
    ensure!(is_mount_point(&mnt), "`devmount up` returned, but nothing is mounted\n{up}");

    // The init container's copy is the server that runs; nothing was uploaded (the upload
    // writes the ready marker).
    let server = fs::read(static_server()?)?;
    let first = cluster.dev_pod()?;
    let pod_dir = cluster.fake.pod_dir(NAMESPACE, &first);
    ensure!(fs::read(pod_dir.join("devmount-server"))? == server, "not the image's server\n{up}");
    ensure!(!pod_dir.join("ready").exists(), "uploaded anyway\n{up}");

    fs::write(mnt.join("hello.txt"), "hi from the laptop\n")?;
    cluster.exec_sees("hello.txt", "hi from the laptop\n")?;
    ensure!(fs::read_to_string(cluster.path("volume/hello.txt"))? == "hi from the laptop\n");

    // The pod goes: the new pod's init container copies the server again, and the session
    // reconnects to it without uploading.
    let second = cluster.replace_dev_pod(&first)?;
    fs::write(mnt.join("after.txt"), "written after the pod was replaced\n")?;
    retry("exec over the new connection", DEADLINE, || {
        cluster.exec_sees("after.txt", "written after the pod was replaced\n")
    })?;
    ensure!(!cluster.fake.pod_dir(NAMESPACE, &second).join("ready").exists(), "uploaded to {second}");

    cluster.down_restores(&mnt, &original)
}

#[test]
fn a_server_that_exits_at_start_is_named_and_the_swap_undone() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    cluster.manifest(&format!("    serverImage: {EXITING_SERVER_IMAGE}\n"))?;
    cluster.up_refused(
        &original,
        &["container app of pod web-", "keeps crashing (CrashLoopBackOff", "deployment/web is restored"],
    )
}

#[test]
fn openssh_clients_reach_the_pod_through_ssh_config() -> Result<()> {
    let cluster = Cluster::start()?;
    cluster.deploy()?;
    let mnt = cluster.mnt();
    let mnt_arg = mnt.to_str().context("mount point")?;
    cluster.ok(&["up", mnt_arg])?;
    fs::write(mnt.join("hello.txt"), "hi from the laptop\n")?;
    cluster.ok(&["sync"])?;

    let config = cluster.ok(&["ssh-config"])?.stdout_text();
    let alias =
        ssh_config_value(&config, "Host").ok_or_else(|| anyhow!("no Host line: {config}"))?.to_owned();
    ensure!(ssh_config_value(&config, "StrictHostKeyChecking") == Some("yes"), "{config}");
    ensure!(ssh_config_value(&config, "HostKeyAlias") == Some(alias.as_str()), "{config}");
    // The pinned key is the session's, kept with its other files on this machine.
    let known =
        PathBuf::from(ssh_config_value(&config, "UserKnownHostsFile").ok_or_else(|| anyhow!("{config}"))?);
    ensure!(known.starts_with(cluster.path("state/devmount/kube")), "{config}");
    ensure!(fs::read_to_string(&known)?.starts_with(&format!("{alias} ssh-ed25519 ")), "{config}");
    let path = cluster.path("ssh_config");
    fs::write(&path, &config)?;
    let cfg = path.to_str().context("config path")?;
    let ssh = |command: &str| {
        run(cluster.command_as("state", "ssh").args(["-F", cfg, "-o", "BatchMode=yes", &alias, command]))
    };

    let out = ssh("echo hi; cat hello.txt")?;
    ensure!(out.success() && out.stdout_text() == "hi\nhi from the laptop\n", "{out}");
    let volume = cluster.path("volume");
    let batch = format!(
        "put {} {}\nget {} {}\n",
        path.display(),
        volume.join("uploaded").display(),
        volume.join("hello.txt").display(),
        cluster.path("fetched.txt").display()
    );
    fs::write(cluster.path("batch"), batch)?;
    let out = run(cluster.command_as("state", "sftp").args([
        "-F",
        cfg,
        "-o",
        "BatchMode=yes",
        "-b",
        "batch",
        &alias,
    ]))?;
    ensure!(out.success(), "{out}");
    ensure!(
        fs::read_to_string(cluster.path("fetched.txt"))? == "hi from the laptop\n",
        "sftp fetched something else"
    );
    retry("sftp's upload in the mount", DEADLINE, || {
        ensure!(fs::read_to_string(mnt.join("uploaded"))? == config, "not yet");
        Ok(())
    })?;

    // The pod goes: the block still works over the session's new connection to the new pod's
    // server, whose host key is the session's (from the Secret).
    let first = cluster.dev_pod()?;
    cluster.fake.replace_pod(NAMESPACE, &first)?;
    retry("ssh to the new pod", DEADLINE, || {
        let pod = cluster.dev_pod()?;
        ensure!(pod != first, "still {pod}");
        let out = ssh("echo hi again")?;
        ensure!(out.success() && out.stdout_text() == "hi again\n", "{out}");
        Ok(())
    })?;

    // Without the session the block is refused by `devmount proxy`, in one line naming why.
    cluster.ok(&["down", mnt_arg])?;
    let out = ssh("echo hi")?;
    ensure!(!out.success(), "{out}");
    ensure!(
        out.stderr_text().contains(&format!(
            "no devmount session named {} is running",
            alias.strip_prefix("devmount-").unwrap_or_default()
        )),
        "{out}"
    );
    Ok(())
}

#[test]
fn rbac_denied_is_one_line_and_leaves_nothing() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    cluster.fake.deny("update", "deployments");
    cluster.up_refused(
        &original,
        &[
            "RBAC denied: cannot update deployments in namespace default (",
            "ask for the Role in docs/kubernetes.md#rbac",
        ],
    )
}

#[test]
fn a_pod_that_cannot_start_is_named_and_the_swap_undone() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    cluster.fake.set_fault(NAMESPACE, "web", Some(PodFault::ImagePullBackOff));
    cluster.up_refused(
        &original,
        &[
            "the image of container app cannot be pulled (ImagePullBackOff: ",
            "check kubernetes.image",
            "deployment/web is restored",
        ],
    )
}

#[test]
fn an_autoscaler_that_would_fight_the_swap_is_named() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    cluster.fake.create(json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                 "minReplicas": 2, "maxReplicas": 5}
    }))?;
    let up = cluster.devmount(&["up", cluster.mnt().to_str().context("mount point")?])?;
    ensure!(!up.success(), "{up}");
    ensure!(
        up.stderr_text().contains("HorizontalPodAutoscaler web scales deployment/web up to 5 pods"),
        "{up}"
    );
    ensure!(cluster.secrets().is_empty(), "nothing applied: {:?}", cluster.secrets());
    let now = cluster.deployment()?;
    assert_eq!(restorable(&now), restorable(&original));
    assert_eq!(
        now.pointer("/metadata/generation"),
        original.pointer("/metadata/generation"),
        "never written"
    );
    Ok(())
}

#[test]
fn a_missing_storage_class_is_named() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    cluster.manifest("    persistentVolume: {storageClass: fast}\n")?;
    let up = cluster.devmount(&["up", cluster.mnt().to_str().context("mount point")?])?;
    ensure!(!up.success(), "{up}");
    ensure!(
        up.stderr_text().contains(
            "the persistent volume cannot be made: storageclass.storage.k8s.io \"fast\" not found; set kubernetes.persistentVolume.storageClass"
        ),
        "{up}"
    );
    assert_eq!(restorable(&cluster.deployment()?), restorable(&original));
    let claims = cluster.fake.list("persistentvolumeclaims", NAMESPACE);
    ensure!(claims.is_empty(), "the claim with the wrong class is deleted again: {claims:?}");
    Ok(())
}

#[test]
fn resumed_here_refused_elsewhere_restored_from_anywhere() -> Result<()> {
    let cluster = Cluster::start()?;
    let original = cluster.deploy()?;
    // As on clusters before 1.30: exec cannot close stdin alone, which `head -c` allows for.
    cluster.fake.set_exec_stdin_close(false);
    let mnt = cluster.mnt();
    let mnt_arg = mnt.to_str().context("mount point")?;
    cluster.ok(&["up", mnt_arg])?;
    fs::write(mnt.join("kept.txt"), "kept\n")?;
    cluster.ok(&["sync"])?;
    let session = cluster.deployment()?.pointer("/metadata/labels/devmount.dev~1session").cloned();

    // The daemon dies; the swap stays. `up` again resumes it, with the same session.
    let pid = find_daemon(&client_bin()?, "up", mnt.as_os_str())?;
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    retry("the daemon's end", DEADLINE, || {
        ensure!(find_daemon(&client_bin()?, "up", mnt.as_os_str()).is_err(), "still there");
        // Its main thread goes first: the control socket stays open, and `up` takes the
        // session for a live one, until the last thread is gone.
        ensure!(!cluster.a_socket_answers()?, "its control socket still answers");
        Ok(())
    })?;
    let again = cluster.ok(&["up", mnt_arg])?;
    ensure!(again.stderr_text().contains("resuming it"), "{again}");
    ensure!(cluster.deployment()?.pointer("/metadata/labels/devmount.dev~1session").cloned() == session);
    cluster.exec_sees("kept.txt", "kept\n")?;

    // Another machine (its own state) is refused, and can restore the Deployment.
    let elsewhere =
        cluster.devmount_as("state2", &["up", cluster.path("mnt2").to_str().unwrap_or_default()])?;
    ensure!(!elsewhere.success(), "{elsewhere}");
    ensure!(elsewhere.stderr_text().contains("is already in dev mode for session"), "{elsewhere}");

    cluster.change(|d| d.spec.replicas = Some(3))?;
    let refused = cluster.devmount_as("state2", &["down"])?;
    ensure!(!refused.success(), "{refused}");
    ensure!(refused.stderr_text().contains("was changed since the swap (spec.replicas)"), "{refused}");
    let forced = cluster.devmount_as("state2", &["down", "--force"])?;
    ensure!(forced.success(), "{forced}");
    assert_eq!(restorable(&cluster.deployment()?), restorable(&original));
    Ok(())
}
