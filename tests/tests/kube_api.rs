//! The fake API server against the real `kube` client, configured from the kubeconfig the fake
//! writes: Deployments and the pods the controller makes for them, watches, exec with stdin,
//! exit codes and a large upload, port-forward, RBAC denials, faults and pod replacement.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use devmount_tests::kube_api::{FakeKube, PodFault, NAMESPACE};
use devmount_tests::EchoServer;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod, Secret};
use kube::api::{
    AttachParams, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any one condition may take on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);
/// Interval between looks at conditions that are polled through the API.
const POLL: Duration = Duration::from_millis(20);

struct Cluster {
    fake: FakeKube,
    client: Client,
    _dir: TempDir,
}

impl Cluster {
    async fn start() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let fake = FakeKube::start(dir.path().join("pods")).await?;
        let path = dir.path().join("kubeconfig");
        fake.write_kubeconfig(&path)?;
        let kubeconfig = Kubeconfig::read_from(&path)?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        Ok(Cluster { fake, client, _dir: dir })
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// Creates Deployment `name` (one `app` container) and waits for its running pod.
    async fn deploy(&self, name: &str) -> Result<Pod> {
        self.deployments().create(&PostParams::default(), &deployment(name)).await?;
        self.running_pod(name, None).await
    }

    /// The running, ready pod of Deployment `name` other than `not`, waited for.
    async fn running_pod(&self, name: &str, not: Option<&str>) -> Result<Pod> {
        let pods = self.pods();
        let selector = ListParams::default().labels(&format!("app={name}"));
        wait_for(&format!("a running pod of {name} other than {not:?}"), || async {
            let list = pods.list(&selector).await?;
            let found = list.items.iter().find(|p| {
                p.metadata.name.as_deref() != not && p.metadata.deletion_timestamp.is_none() && is_ready(p)
            });
            Ok(match found {
                Some(pod) => Ok(pod.clone()),
                None => Err(format!("{:?}", list.items.iter().map(pod_summary).collect::<Vec<_>>())),
            })
        })
        .await
    }
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": "busybox:1.36", "command": ["sleep", "infinity"] }] },
            },
        },
    }))
    .expect("a valid Deployment")
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conds| conds.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_summary(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    format!(
        "{} phase={:?} deleting={} containers={:?}",
        pod.metadata.name.as_deref().unwrap_or(""),
        status.and_then(|s| s.phase.as_deref()),
        pod.metadata.deletion_timestamp.is_some(),
        status
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| &c.state).collect::<Vec<_>>()),
    )
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Polls `check` until it yields a value, failing at the deadline with the last state it saw.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Result<T, String>>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = check().await?;
        match last {
            Ok(value) => return Ok(value),
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                bail!("timed out waiting for {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(WAIT, future).await.map_err(|_| anyhow!("timed out: {what}"))
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Result<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => Ok(*status),
        other => bail!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn patching_the_template_replaces_the_pod() -> Result<()> {
    let c = Cluster::start().await?;
    let first = c.deploy("web").await?;
    let owner =
        first.metadata.owner_references.as_ref().and_then(|o| o.first()).context("pod has no owner")?;
    ensure!(owner.kind == "ReplicaSet" && name(&first).starts_with(&format!("{}-", owner.name)), "{owner:?}");
    let d = within("rollout", await_condition(c.deployments(), "web", conditions::is_deployment_completed()))
        .await??;
    let d = d.context("deployment gone")?;
    // What the server filled in comes back, as on a real cluster.
    let strategy = d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref());
    ensure!(strategy == Some("RollingUpdate"), "{strategy:?}");
    ensure!(d.metadata.generation == Some(1), "{:?}", d.metadata.generation);

    let patch = json!({ "spec": {
        "strategy": { "type": "Recreate", "rollingUpdate": null },
        "template": { "metadata": { "annotations": { "devmount.dev/session": "1" } } },
    } });
    let patched = c.deployments().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    ensure!(patched.metadata.generation == Some(2), "{:?}", patched.metadata.generation);
    let second = c.running_pod("web", Some(&name(&first))).await?;
    ensure!(name(&second) != name(&first));
    let annotation = second.metadata.annotations.as_ref().and_then(|a| a.get("devmount.dev/session"));
    ensure!(annotation.map(String::as_str) == Some("1"), "{annotation:?}");
    let old = first.metadata.name.as_deref().context("no name")?;
    wait_for("the old pod to go", || async {
        Ok(match c.pods().get_opt(old).await? {
            None => Ok(()),
            Some(pod) => Err(pod_summary(&pod)),
        })
    })
    .await?;
    let d = c.deployments().get("web").await?;
    let revision = d.metadata.annotations.as_ref().and_then(|a| a.get("deployment.kubernetes.io/revision"));
    ensure!(revision.map(String::as_str) == Some("2"), "{revision:?}");
    Ok(())
}

#[tokio::test]
async fn a_watch_sees_the_pod_go_from_pending_to_running() -> Result<()> {
    let c = Cluster::start().await?;
    let rv = c.pods().list(&ListParams::default()).await?.metadata.resource_version.context("no rv")?;
    c.deployments().create(&PostParams::default(), &deployment("web")).await?;
    let mut events = c.pods().watch(&WatchParams::default().labels("app=web"), &rv).await?.boxed();
    let mut phases = Vec::new();
    within("pod running in the watch", async {
        while let Some(event) = events.try_next().await? {
            match event {
                WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                    if phases.last() != Some(&phase) {
                        phases.push(phase);
                    }
                    if is_ready(&pod) {
                        return Ok(());
                    }
                }
                other => bail!("unexpected {other:?}"),
            }
        }
        bail!("the watch ended early")
    })
    .await??;
    ensure!(phases == ["Pending", "Running"], "{phases:?}");
    Ok(())
}

#[tokio::test]
async fn exec_streams_stdin_and_stdout_and_returns_the_exit_code() -> Result<()> {
    let c = Cluster::start().await?;
    let pod = c.deploy("web").await?;
    // Also on a v4-only cluster, where stdin cannot be closed: `head -c` needs no EOF.
    for stdin_close in [true, false] {
        c.fake.set_exec_stdin_close(stdin_close);
        let params = AttachParams::default().stdin(true).stdout(true).stderr(true);
        let mut process = c
            .pods()
            .exec(&name(&pod), ["sh", "-c", "head -c 5; echo done; echo oops >&2; exit 3"], &params)
            .await?;
        let mut stdin = process.stdin().context("no stdin")?;
        stdin.write_all(b"hello world").await?;
        let (mut stdout, mut stderr) =
            (process.stdout().context("no stdout")?, process.stderr().context("no stderr")?);
        let status = process.take_status().context("no status")?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        within("exec output", async {
            tokio::try_join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err))
        })
        .await??;
        let status = within("exec status", status).await?.context("no status sent")?;
        ensure!(
            out == b"hellodone\n",
            "stdout {:?} (stdin close {stdin_close})",
            String::from_utf8_lossy(&out)
        );
        ensure!(err == b"oops\n", "stderr {:?}", String::from_utf8_lossy(&err));
        ensure!(status.status.as_deref() == Some("Failure"), "{status:?}");
        ensure!(status.reason.as_deref() == Some("NonZeroExitCode"), "{status:?}");
        let code = status
            .details
            .and_then(|d| d.causes)
            .and_then(|c| c.into_iter().find(|c| c.reason.as_deref() == Some("ExitCode")));
        ensure!(code.and_then(|c| c.message).as_deref() == Some("3"), "exit code cause missing");
    }
    let mut ok = c.pods().exec(&name(&pod), ["true"], &AttachParams::default()).await?;
    let status =
        within("exec status", ok.take_status().context("no status")?).await?.context("no status sent")?;
    ensure!(status.status.as_deref() == Some("Success"), "{status:?}");
    let mut missing = c.pods().exec(&name(&pod), ["no-such-program"], &AttachParams::default()).await?;
    let status =
        within("exec status", missing.take_status().context("no status")?).await?.context("no status")?;
    let message = status.message.unwrap_or_default();
    ensure!(message.contains("executable file not found in $PATH"), "{message}");
    Ok(())
}

#[tokio::test]
async fn exec_uploads_5_mib_through_stdin() -> Result<()> {
    let c = Cluster::start().await?;
    let pod = c.deploy("web").await?;
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let command = format!("head -c {} > upload.bin && wc -c < upload.bin", data.len());
    let params = AttachParams::default().stdin(true).stdout(true).stderr(false);
    let mut process = c.pods().exec(&name(&pod), ["sh", "-c", &command], &params).await?;
    let mut stdin = process.stdin().context("no stdin")?;
    let mut stdout = process.stdout().context("no stdout")?;
    let status = process.take_status().context("no status")?;
    let mut out = Vec::new();
    let upload = async {
        stdin.write_all(&data).await?;
        // The length bounds the upload, so stdin stays open, as on clusters that cannot close it.
        stdout.read_to_end(&mut out).await
    };
    within("upload", upload).await??;
    let status = within("exec status", status).await?.context("no status sent")?;
    ensure!(status.status.as_deref() == Some("Success"), "{status:?}");
    ensure!(String::from_utf8_lossy(&out).trim() == data.len().to_string(), "{out:?}");
    let uploaded = std::fs::read(c.fake.pod_dir(NAMESPACE, &name(&pod)).join("upload.bin"))?;
    ensure!(uploaded == data, "the uploaded file differs ({} of {} bytes)", uploaded.len(), data.len());
    Ok(())
}

async fn echo_through(c: &Cluster, pod: &str, port: u16, message: Vec<u8>) -> Result<Vec<u8>> {
    let mut forwarder = c.pods().portforward(pod, &[port]).await?;
    let mut stream = forwarder.take_stream(port).context("no stream for the port")?;
    let mut reply = vec![0; message.len()];
    within("echo", async {
        stream.write_all(&message).await?;
        stream.read_exact(&mut reply).await
    })
    .await??;
    drop(stream);
    within("port-forward end", forwarder.join()).await??;
    Ok(reply)
}

#[tokio::test]
async fn port_forward_round_trips_on_two_concurrent_connections() -> Result<()> {
    let c = Cluster::start().await?;
    let echo = EchoServer::start()?;
    c.fake.map_port(NAMESPACE, "web", 8080, SocketAddr::from(([127, 0, 0, 1], echo.port())));
    let pod = name(&c.deploy("web").await?);
    let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8 + b'a').collect();
    let (echo_a, echo_b) =
        tokio::try_join!(echo_through(&c, &pod, 8080, a.clone()), echo_through(&c, &pod, 8080, b.clone()))?;
    ensure!(echo_a == a && echo_b == b, "an echo differs");
    ensure!(echo.connections() == 2, "{} connections to the echo server", echo.connections());

    // A port nothing is mapped to reports on the port's error channel.
    let mut forwarder = c.pods().portforward(&pod, &[9]).await?;
    let error = within("port error", forwarder.take_error(9).context("no error future")?).await?;
    ensure!(error.as_deref().is_some_and(|e| e.contains("port 9")), "{error:?}");
    Ok(())
}

#[tokio::test]
async fn rbac_denials_are_403_api_errors() -> Result<()> {
    let c = Cluster::start().await?;
    let pod = name(&c.deploy("web").await?);
    c.fake.deny("patch", "deployments");
    let patch = json!({ "spec": { "replicas": 2 } });
    let status =
        api_error(c.deployments().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await)?;
    ensure!(status.code == 403 && status.reason == "Forbidden", "{status:?}");
    ensure!(
        status.message.contains("cannot patch resource \"deployments\" in API group \"apps\""),
        "{}",
        status.message
    );
    c.fake.deny("create", "pods/exec");
    let status = api_error(c.pods().exec(&pod, ["true"], &AttachParams::default()).await.map(drop))?;
    ensure!(status.code == 403 && status.message.contains("pods/exec"), "{status:?}");
    c.fake.allow("patch", "deployments");
    c.deployments().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

#[tokio::test]
async fn errors_are_status_objects_with_the_real_codes() -> Result<()> {
    let c = Cluster::start().await?;
    let status = api_error(c.deployments().get("nope").await)?;
    ensure!(status.code == 404 && status.reason == "NotFound", "{status:?}");
    ensure!(status.message == "deployments.apps \"nope\" not found", "{}", status.message);

    let d = c.deployments().create(&PostParams::default(), &deployment("web")).await?;
    let status = api_error(c.deployments().create(&PostParams::default(), &deployment("web")).await)?;
    ensure!(status.code == 409 && status.reason == "AlreadyExists", "{status:?}");

    // A replace from a stale read conflicts once the controller has written the Deployment.
    wait_for("the controller to write the deployment", || async {
        let now = c.deployments().get("web").await?;
        Ok(if now.metadata.resource_version != d.metadata.resource_version {
            Ok(())
        } else {
            Err("unchanged".into())
        })
    })
    .await?;
    let status = api_error(c.deployments().replace("web", &PostParams::default(), &d).await)?;
    ensure!(status.code == 409 && status.reason == "Conflict", "{status:?}");

    // Recreate with the defaulted rollingUpdate still there is what the real server refuses.
    let patch = json!({ "spec": { "strategy": { "type": "Recreate" } } });
    let status =
        api_error(c.deployments().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await)?;
    ensure!(status.code == 422 && status.reason == "Invalid", "{status:?}");
    ensure!(status.message.contains("spec.strategy.rollingUpdate"), "{}", status.message);

    let status =
        api_error(c.deployments().patch("web", &PatchParams::default(), &Patch::Strategic(&patch)).await)?;
    ensure!(status.code == 415, "{status:?}");

    let json_patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "replace", "path": "/spec/replicas", "value": 0 },
    ]))?;
    let scaled =
        c.deployments().patch("web", &PatchParams::default(), &Patch::Json::<()>(json_patch)).await?;
    ensure!(scaled.spec.replicas == Some(0));
    Ok(())
}

#[tokio::test]
async fn deleting_a_pod_makes_a_new_one_and_ends_its_streams() -> Result<()> {
    let c = Cluster::start().await?;
    let echo = EchoServer::start()?;
    c.fake.map_port(NAMESPACE, "web", 8080, SocketAddr::from(([127, 0, 0, 1], echo.port())));
    let first = name(&c.deploy("web").await?);
    let params = AttachParams::default().stdin(true).stdout(true).stderr(false);
    let mut process = c.pods().exec(&first, ["cat"], &params).await?;
    let mut stdout = process.stdout().context("no stdout")?;
    let status = process.take_status().context("no status")?;
    let mut forwarder = c.pods().portforward(&first, &[8080]).await?;
    let mut stream = forwarder.take_stream(8080).context("no stream")?;

    c.fake.replace_pod(NAMESPACE, &first)?;
    let mut rest = Vec::new();
    within("exec to end with its pod", stdout.read_to_end(&mut rest)).await??;
    within("port-forward to end with its pod", stream.read_to_end(&mut rest)).await??;
    // The command was killed with its container: SIGKILL's exit code, 128 + 9.
    let status = within("exec status", status).await?.context("no status sent")?;
    let code =
        status.details.and_then(|d| d.causes).and_then(|c| c.into_iter().next()).and_then(|c| c.message);
    ensure!(code.as_deref() == Some("137"), "{code:?}");
    let second = name(&c.running_pod("web", Some(&first)).await?);
    ensure!(second != first);

    // Deleting through the API does the same, and the pod shows its deletion first.
    let deleted = c.pods().delete(&second, &DeleteParams::default()).await?;
    let deleted = deleted.left().context("a pod deletion returns the pod")?;
    ensure!(deleted.metadata.deletion_timestamp.is_some(), "{deleted:?}");
    let third = name(&c.running_pod("web", Some(&second)).await?);
    ensure!(third != first && third != second);
    Ok(())
}

#[tokio::test]
async fn faults_show_in_pod_status_and_events() -> Result<()> {
    let c = Cluster::start().await?;
    c.fake.set_fault(NAMESPACE, "web", Some(PodFault::Unschedulable));
    c.deployments().create(&PostParams::default(), &deployment("web")).await?;
    let events: Api<Event> = Api::namespaced(c.client.clone(), NAMESPACE);
    wait_for("a FailedScheduling event", || async {
        let list = events.list(&ListParams::default().fields("reason=FailedScheduling")).await?;
        Ok(list.items.first().map(|e| e.message.clone()).ok_or_else(|| "no event".to_owned()))
    })
    .await?;
    let pending = c.pods().list(&ListParams::default().labels("app=web")).await?.items;
    let condition = pending.first().and_then(|p| p.status.as_ref()?.conditions.as_ref()?.first().cloned());
    ensure!(condition.as_ref().and_then(|c| c.reason.as_deref()) == Some("Unschedulable"), "{condition:?}");

    for (fault, reason) in
        [(PodFault::ImagePullBackOff, "ImagePullBackOff"), (PodFault::CrashLoopBackOff, "CrashLoopBackOff")]
    {
        c.fake.set_fault(NAMESPACE, "web", Some(fault));
        wait_for(reason, || async {
            let pods = c.pods().list(&ListParams::default().labels("app=web")).await?.items;
            let waiting = pods.iter().find_map(|p| {
                let status = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
                status.state.as_ref()?.waiting.as_ref()?.reason.clone()
            });
            Ok(if waiting.as_deref() == Some(reason) {
                Ok(())
            } else {
                Err(format!("{:?}", pods.iter().map(pod_summary).collect::<Vec<_>>()))
            })
        })
        .await?;
    }
    c.fake.set_fault(NAMESPACE, "web", None);
    c.running_pod("web", None).await?;
    Ok(())
}

#[tokio::test]
async fn secrets_and_claims() -> Result<()> {
    let c = Cluster::start().await?;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), NAMESPACE);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "session" }, "stringData": { "host_key": "bytes\u{0}here" },
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let read = secrets.get("session").await?;
    let value =
        read.data.as_ref().and_then(|d| d.get("host_key")).context("stringData not folded into data")?;
    ensure!(value.0 == b"bytes\0here", "{value:?}");
    secrets.delete("session", &DeleteParams::default()).await?;
    ensure!(api_error(secrets.get("session").await)?.code == 404);

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(c.client.clone(), NAMESPACE);
    let claim = |name: &str, class: Option<&str>| -> Result<PersistentVolumeClaim> {
        Ok(serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": class,
                      "resources": { "requests": { "storage": "1Gi" } } },
        }))?)
    };
    claims.create(&PostParams::default(), &claim("work", None)?).await?;
    claims.create(&PostParams::default(), &claim("fast-work", Some("fast"))?).await?;
    let phase = |name: &'static str| {
        let claims = claims.clone();
        async move {
            Ok::<_, anyhow::Error>(claims.get(name).await?.status.and_then(|s| s.phase).unwrap_or_default())
        }
    };
    wait_for("the default class to bind", || async {
        let p = phase("work").await?;
        Ok(if p == "Bound" { Ok(()) } else { Err(p) })
    })
    .await?;
    let events: Api<Event> = Api::namespaced(c.client.clone(), NAMESPACE);
    wait_for("ProvisioningFailed", || async {
        let list = events.list(&ListParams::default().fields("involvedObject.name=fast-work")).await?;
        Ok(list
            .items
            .iter()
            .find(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
            .map(|e| e.message.clone())
            .ok_or("no event".to_owned()))
    })
    .await?;
    ensure!(phase("fast-work").await? == "Pending");
    c.fake.add_storage_class("fast");
    wait_for("the new class to bind", || async {
        let p = phase("fast-work").await?;
        Ok(if p == "Bound" { Ok(()) } else { Err(p) })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn discovery_and_authentication() -> Result<()> {
    let c = Cluster::start().await?;
    let version = c.client.apiserver_version().await?;
    ensure!(version.major == "1", "{version:?}");
    let discovery = kube::Discovery::new(c.client.clone()).run().await?;
    ensure!(discovery.groups().any(|g| g.name() == "apps"), "no apps group");
    // Objects a test puts in directly are served like any other.
    c.fake.create(json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": { "name": "web" },
        "spec": { "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": "web" }, "maxReplicas": 3 },
    }))?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(c.client.clone(), NAMESPACE);
    let listed = hpas.list(&ListParams::default()).await?.items;
    ensure!(listed.len() == 1 && listed[0].spec.max_replicas == 3, "{listed:?}");

    let mut config: Value = serde_json::from_str(&c.fake.kubeconfig())?;
    config["users"][0]["user"]["token"] = json!("wrong");
    let kubeconfig: Kubeconfig = serde_json::from_value(config)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let stranger = Client::try_from(config)?;
    let status = api_error(Api::<Pod>::namespaced(stranger, NAMESPACE).list(&ListParams::default()).await)?;
    ensure!(status.code == 401, "{status:?}");
    Ok(())
}

#[tokio::test]
async fn watch_with_initial_events_then_changes() -> Result<()> {
    let c = Cluster::start().await?;
    c.deployments().create(&PostParams::default(), &deployment("one")).await?;
    let params = WatchParams::streaming_lists();
    let mut stream = c.deployments().watch(&params, "0").await?.boxed();
    let mut seen_end = false;
    within("initial events and a deletion", async {
        while let Some(event) = stream.try_next().await? {
            match event {
                WatchEvent::Added(d) if d.metadata.name.as_deref() == Some("one") => {}
                WatchEvent::Bookmark(b) => {
                    seen_end |= b.metadata.annotations.contains_key("k8s.io/initial-events-end");
                    c.deployments().delete("one", &DeleteParams::default()).await?;
                }
                WatchEvent::Deleted(d) if seen_end => {
                    ensure!(d.metadata.name.as_deref() == Some("one"));
                    return Ok(());
                }
                WatchEvent::Modified(_) => {}
                other => bail!("unexpected {other:?}"),
            }
        }
        bail!("the watch ended early")
    })
    .await??;
    Ok(())
}

#[tokio::test]
async fn deleting_a_deployment_removes_its_pods() -> Result<()> {
    let c = Cluster::start().await?;
    let pod = name(&c.deploy("web").await?);
    c.deployments().delete("web", &DeleteParams::default()).await?;
    wait_for("the pod to go with its deployment", || async {
        Ok(match c.pods().get_opt(&pod).await? {
            None => Ok(()),
            Some(p) => Err(pod_summary(&p)),
        })
    })
    .await?;
    let pods = c.pods().list(&ListParams::default()).await?;
    ensure!(pods.items.is_empty(), "{:?}", pods.items.iter().map(pod_summary).collect::<Vec<_>>());
    Ok(())
}
