//! The swap in the cluster: [`translate`](super::translate) applied with its Secret and claim,
//! an existing swap resumed or refused, controllers that would undo it named, and the restore
//! with its "changed since the swap" check.
//!
//! Writes go through `replace` with the resourceVersion that was read, so a Deployment changed
//! between the read and the write is never overwritten: the write fails with a conflict and the
//! user runs the command again.
//!
//! What "changed since the swap" means: right after the swap, [`fingerprint`] digests each part
//! of the dev spec as the API server stored it (defaults filled in) into the annotation
//! [`APPLIED_ANNOTATION`]; at restore, the parts whose digest differs are what someone else
//! changed. A digest per part, not one for the whole spec, so the message can say which.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};

use super::cluster::{api_error, is_conflict, is_not_found, Cluster};
use super::translate::{
    self, DevObjects, CLAIM_ANNOTATION, CONTAINER_ANNOTATION, DEPLOYMENT_ANNOTATION, KEY_PREFIX,
    SECRET_ANNOTATION, SECRET_HOST_KEY,
};
use crate::manifest::Workload;

/// On the dev Deployment: [`fingerprint`] of its spec right after the swap, as JSON.
pub const APPLIED_ANNOTATION: &str = "devmount.dev/applied";

/// What `devmount up` does with the Deployment it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not in dev mode: swap it.
    Swap,
    /// In dev mode for a session this machine has the keys of: connect to it again.
    Resume(String),
}

/// Whether `up` swaps, resumes or refuses: `have` says whether this machine has the files of
/// a session id. Never a second swap on top of a first.
pub fn decide(deployment: &Deployment, have: impl Fn(&str) -> bool) -> Result<Decision> {
    let what = format!("deployment/{}", deployment.name_any());
    match translate::session_of(deployment) {
        None => Ok(Decision::Swap),
        Some(id) if have(id) => Ok(Decision::Resume(id.to_owned())),
        Some(id) => bail!(
            "{what} is already in dev mode for session {id}, which this machine did not start (or has forgotten); `devmount down` restores it from any machine, then `devmount up` starts afresh"
        ),
    }
}

/// The Deployment the workload means, read from the cluster.
pub async fn find(cluster: &Cluster, workload: &Workload) -> Result<Deployment> {
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let ns = &cluster.namespace;
    match workload {
        Workload::Deployment(name) => match api.get_opt(name).await {
            Ok(Some(d)) => Ok(d),
            Ok(None) => bail!(
                "there is no deployment/{name} in namespace {ns}; check kubernetes.deployment and kubernetes.namespace (`kubectl get deployments -n {ns}`)"
            ),
            Err(e) => Err(api_error(e, "get", "deployments", ns)),
        },
        Workload::Selector(_) => {
            let selector = workload.to_string();
            let list = api
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| api_error(e, "list", "deployments", ns))?;
            let mut found = list.items;
            match found.len() {
                1 => Ok(found.remove(0)),
                0 => bail!("no Deployment in namespace {ns} has the labels {selector}; check kubernetes.selector"),
                _ => {
                    let names: Vec<String> = found.iter().map(|d| d.name_any()).collect();
                    bail!(
                        "{} Deployments in namespace {ns} have the labels {selector} ({}); name one with kubernetes.deployment",
                        names.len(),
                        names.join(", ")
                    )
                }
            }
        }
    }
}

/// Controllers that would undo the swap, each named with the fix: an autoscaler that may scale
/// the Deployment above one pod (an error), and GitOps controllers that track it (a warning).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fighters {
    pub blocking: Vec<String>,
    pub warnings: Vec<String>,
}

/// Pure: the [`Fighters`] of `deployment`, given the namespace's autoscalers.
pub fn fighters(deployment: &Deployment, autoscalers: &[HorizontalPodAutoscaler]) -> Fighters {
    let name = deployment.name_any();
    let mut found = Fighters::default();
    for hpa in autoscalers {
        let spec = &hpa.spec;
        let target = &spec.scale_target_ref;
        let scales_it = target.kind == "Deployment" && target.name == name;
        if scales_it && (spec.max_replicas > 1 || spec.min_replicas.unwrap_or(1) > 1) {
            found.blocking.push(format!(
                "HorizontalPodAutoscaler {} scales deployment/{name} up to {} pods, which would be dev pods without a server; delete it, or set its minReplicas and maxReplicas to 1, for the session",
                hpa.name_any(),
                spec.max_replicas
            ));
        }
    }
    let labels = deployment.labels();
    let annotations = deployment.annotations();
    let argo = annotations
        .get("argocd.argoproj.io/tracking-id")
        .map(|id| id.split(':').next().unwrap_or(id))
        .or_else(|| labels.get("argocd.argoproj.io/instance").map(String::as_str));
    if let Some(app) = argo {
        found.warnings.push(format!(
            "Argo CD application {app} manages deployment/{name}: with self-heal on it undoes the swap; turn selfHeal off (or add the Deployment to ignoreDifferences) for the session"
        ));
    }
    for (kind, label) in
        [("Kustomization", "kustomize.toolkit.fluxcd.io"), ("HelmRelease", "helm.toolkit.fluxcd.io")]
    {
        if let Some(owner) = labels.get(&format!("{label}/name")) {
            let namespace = labels.get(&format!("{label}/namespace")).map_or("", String::as_str);
            let suspend = if kind == "Kustomization" { "kustomization" } else { "helmrelease" };
            found.warnings.push(format!(
                "Flux {kind} {owner} manages deployment/{name}: it undoes the swap at its next sync; `flux suspend {suspend} {owner}{}` for the session",
                if namespace.is_empty() { String::new() } else { format!(" -n {namespace}") }
            ));
        }
    }
    found
}

/// Reads the namespace's autoscalers; `None` when RBAC does not allow it (the check is a
/// courtesy: the caller says it was skipped, and the Role in the docs allows it).
pub async fn autoscalers(cluster: &Cluster) -> Result<Option<Vec<HorizontalPodAutoscaler>>> {
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(Some(list.items)),
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(None),
        Err(e) if is_not_found(&e) => Ok(Some(Vec::new())),
        Err(e) => Err(api_error(e, "list", "horizontalpodautoscalers", &cluster.namespace)),
    }
}

/// What [`apply`] did.
pub struct Applied {
    /// The dev Deployment as stored.
    pub deployment: Deployment,
    /// The claim, if this swap made it (a failed start deletes it again: it may carry the
    /// mistake, such as a storage class that does not exist).
    pub new_claim: Option<String>,
}

/// Applies the swap: the Secret (with `host_key`), the claim if it does not exist, then the
/// dev Deployment in place of `original` (refused if it changed since it was read), then its
/// fingerprint. On a failure before the Deployment is swapped, the Secret and a claim made here
/// are deleted again.
pub async fn apply(cluster: &Cluster, objects: &DevObjects, host_key: &str) -> Result<Applied> {
    let ns = &cluster.namespace;
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), ns);
    let mut secret = objects.secret.clone();
    secret.metadata.namespace = Some(ns.clone());
    if let Some(data) = &mut secret.string_data {
        data.insert(SECRET_HOST_KEY.into(), host_key.into());
    }
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| api_error(e, "create", "secrets", ns))?;
    let secret_name = secret.name_any();
    let mut new_claim = None;
    let applied = async {
        if let Some(claim) = &objects.volume_claim {
            if ensure_claim(cluster, claim).await? {
                new_claim = Some(claim.name_any());
            }
        }
        let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
        let name = objects.deployment.name_any();
        let stored = match api.replace(&name, &PostParams::default(), &objects.deployment).await {
            Ok(stored) => stored,
            Err(e) if is_conflict(&e) => {
                bail!("deployment/{name} changed while devmount was swapping it; run `devmount up` again")
            }
            Err(e) => return Err(api_error(e, "update", "deployments", ns)),
        };
        // Without the fingerprint `down` cannot tell what changed since; the swap itself is
        // whole, so that is a warning, not a reason to undo it.
        Ok(mark_applied(&api, &stored).await.unwrap_or_else(|e| {
            tracing::warn!("{e:#}; `devmount down` will not see changes made since the swap");
            stored
        }))
    };
    let applied = applied.await;
    match applied {
        Ok(deployment) => Ok(Applied { deployment, new_claim }),
        Err(e) => {
            if let Err(cleanup) = secrets.delete(&secret_name, &DeleteParams::default()).await {
                tracing::warn!(
                    "cannot delete the session Secret {secret_name} after a failed swap: {cleanup}"
                );
            }
            if let Some(claim) = &new_claim {
                if let Err(cleanup) = delete_claim(cluster, claim).await {
                    tracing::warn!("cannot delete the claim {claim} after a failed swap: {cleanup:#}");
                }
            }
            Err(e)
        }
    }
}

/// Creates the claim unless it exists; true if it was made here.
async fn ensure_claim(cluster: &Cluster, claim: &PersistentVolumeClaim) -> Result<bool> {
    let ns = &cluster.namespace;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
    let name = claim.name_any();
    match api.get_opt(&name).await {
        Ok(Some(_)) => Ok(false),
        Ok(None) => match api.create(&PostParams::default(), claim).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(api_error(e, "create", "persistentvolumeclaims", ns)),
        },
        Err(e) => Err(api_error(e, "get", "persistentvolumeclaims", ns)),
    }
}

/// Stores [`fingerprint`] of the stored dev spec. A metadata-only patch (it starts no
/// rollout), made only while the spec is still the one stored: its status changes all the
/// time, so the precondition is the generation, which counts spec changes only.
async fn mark_applied(api: &Api<Deployment>, stored: &Deployment) -> Result<Deployment> {
    let digest = serde_json::to_string(&fingerprint(&stored.spec))?;
    let key = APPLIED_ANNOTATION.replace('~', "~0").replace('/', "~1");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/metadata/generation", "value": stored.metadata.generation},
        {"op": "add", "path": format!("/metadata/annotations/{key}"), "value": digest},
    ]))?;
    let name = stored.name_any();
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch)).await.map_err(|e| {
        let ns = stored.namespace().unwrap_or_default();
        api_error(e, "patch", "deployments", &ns)
    })
}

/// A digest per part of a Deployment spec: replicas, strategy, selector, the template's
/// metadata, each container and init container by name, the volumes, and the rest of the pod.
pub fn fingerprint(spec: &DeploymentSpec) -> BTreeMap<String, String> {
    fn digest<T: serde::Serialize>(value: &T) -> String {
        let json = serde_json::to_vec(value).unwrap_or_default();
        Sha256::digest(json).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
    let mut parts = BTreeMap::new();
    parts.insert("spec.replicas".into(), digest(&spec.replicas));
    parts.insert("spec.strategy".into(), digest(&spec.strategy));
    parts.insert("spec.selector".into(), digest(&spec.selector));
    parts.insert("spec.template.metadata".into(), digest(&spec.template.metadata));
    if let Some(pod) = &spec.template.spec {
        for c in &pod.containers {
            parts.insert(format!("container {}", c.name), digest(c));
        }
        for c in pod.init_containers.iter().flatten() {
            parts.insert(format!("init container {}", c.name), digest(c));
        }
        parts.insert("spec.template.spec.volumes".into(), digest(&pod.volumes));
        let mut rest = pod.clone();
        rest.containers.clear();
        rest.init_containers = None;
        rest.volumes = None;
        parts.insert("spec.template.spec (other fields)".into(), digest(&rest));
    }
    parts
}

/// Pure: the parts of `spec` that differ from the saved fingerprint, in order.
pub fn changes(saved: &BTreeMap<String, String>, spec: &DeploymentSpec) -> Vec<String> {
    let now = fingerprint(spec);
    let mut changed: Vec<String> = saved
        .iter()
        .filter(|(part, digest)| now.get(*part) != Some(digest))
        .map(|(part, _)| match now.contains_key(part) {
            true => part.clone(),
            false => format!("{part} (removed)"),
        })
        .collect();
    changed.extend(now.keys().filter(|p| !saved.contains_key(*p)).map(|p| format!("{p} (added)")));
    changed
}

/// How `devmount down` restores.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Restore even if the Deployment changed since the swap.
    pub force: bool,
    /// Delete the persistent volume's claim too.
    pub volumes: bool,
}

/// Restores deployment `name` from its saved spec, deletes the session Secret, and with
/// `volumes` the claim. Returns what was done, for the user; a Deployment not in dev mode is
/// no error (someone restored it already), but its claim is still deleted with `volumes`.
pub async fn restore(cluster: &Cluster, name: &str, options: RestoreOptions) -> Result<Vec<String>> {
    let ns = &cluster.namespace;
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let dev = match api.get_opt(name).await {
        Ok(Some(d)) => d,
        Ok(None) => bail!("there is no deployment/{name} in namespace {ns} to restore"),
        Err(e) => return Err(api_error(e, "get", "deployments", ns)),
    };
    let mut done = Vec::new();
    if translate::session_of(&dev).is_none() && !dev.annotations().keys().any(|k| k.starts_with(KEY_PREFIX)) {
        done.push(format!("deployment/{name} is not in dev mode"));
        if options.volumes {
            done.extend(delete_claims_of(cluster, name).await?);
        }
        return Ok(done);
    }
    if !options.force {
        if let Some(saved) = dev.annotations().get(APPLIED_ANNOTATION) {
            let saved: BTreeMap<String, String> = serde_json::from_str(saved).with_context(|| {
                format!("deployment/{name}'s annotation {APPLIED_ANNOTATION} is not devmount's")
            })?;
            let changed = changes(&saved, &dev.spec);
            if !changed.is_empty() {
                bail!(
                    "deployment/{name} was changed since the swap ({}); restoring would undo that. `devmount down --force` restores the original anyway",
                    changed.join(", ")
                );
            }
        }
    }
    let original = translate::restore(&dev).map_err(|e| anyhow!("{e}"))?;
    match api.replace(name, &PostParams::default(), &original).await {
        Ok(_) => done.push(format!("restored deployment/{name}")),
        Err(e) if is_conflict(&e) => {
            bail!("deployment/{name} changed while devmount was restoring it; run `devmount down` again")
        }
        Err(e) => return Err(api_error(e, "update", "deployments", ns)),
    }
    if let Some(secret) = dev.annotations().get(SECRET_ANNOTATION) {
        let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), ns);
        match secrets.delete(secret, &DeleteParams::default()).await {
            Ok(_) => done.push(format!("deleted secret/{secret}")),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_error(e, "delete", "secrets", ns)),
        }
    }
    match (dev.annotations().get(CLAIM_ANNOTATION), options.volumes) {
        (Some(claim), true) => done.extend(delete_claim(cluster, claim).await?),
        (Some(claim), false) => done.push(format!(
            "kept persistentvolumeclaim/{claim} (the workdir's files); `devmount down --volumes` deletes it"
        )),
        (None, _) => {}
    }
    Ok(done)
}

pub async fn delete_claim(cluster: &Cluster, claim: &str) -> Result<Option<String>> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    match api.delete(claim, &DeleteParams::default()).await {
        Ok(_) => Ok(Some(format!("deleted persistentvolumeclaim/{claim}"))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(api_error(e, "delete", "persistentvolumeclaims", &cluster.namespace)),
    }
}

/// The claims devmount made for deployment `name` (annotated with it), deleted.
async fn delete_claims_of(cluster: &Cluster, name: &str) -> Result<Vec<String>> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "list", "persistentvolumeclaims", &cluster.namespace))?;
    let mut done = Vec::new();
    for claim in
        list.items.iter().filter(|c| c.annotations().get(DEPLOYMENT_ANNOTATION).is_some_and(|d| d == name))
    {
        done.extend(delete_claim(cluster, &claim.name_any()).await?);
    }
    Ok(done)
}

/// The dev container's name and the workdir of a Deployment in dev mode.
pub fn dev_container(dev: &Deployment) -> Result<(String, String)> {
    let what = format!("deployment/{}", dev.name_any());
    let container = dev
        .annotations()
        .get(CONTAINER_ANNOTATION)
        .ok_or_else(|| anyhow!("{what} has no {CONTAINER_ANNOTATION} annotation: it is not in dev mode"))?;
    let workdir = dev
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.containers.iter().find(|c| &c.name == container))
        .and_then(|c| c.working_dir.clone())
        .ok_or_else(|| {
            anyhow!("{what}'s dev container {container} has no workingDir; `devmount down` restores it")
        })?;
    Ok((container.clone(), workdir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::translate::{Session, SessionId};
    use crate::manifest::DevSettings;
    use serde_json::json;

    fn deployment(labels: serde_json::Value, annotations: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": labels, "annotations": annotations},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "app", "image": "busybox"}, {"name": "side", "image": "x"}]}}
            }
        }))
        .unwrap()
    }

    fn dev() -> Deployment {
        let session = Session {
            id: SessionId::new("abc123").unwrap(),
            authorized_key: "ssh-ed25519 AAAA k".into(),
            port: 22022,
            allow_forward: vec![],
            allow_reverse: vec![],
        };
        translate::translate(&deployment(json!({}), json!({})), &DevSettings::default(), &session)
            .unwrap()
            .deployment
    }

    fn hpa(target: &str, min: i32, max: i32) -> HorizontalPodAutoscaler {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{target}-hpa")},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                     "minReplicas": min, "maxReplicas": max}
        }))
        .unwrap()
    }

    #[test]
    fn swap_resume_or_refuse() {
        assert_eq!(decide(&deployment(json!({}), json!({})), |_| true).unwrap(), Decision::Swap);
        assert_eq!(decide(&dev(), |id| id == "abc123").unwrap(), Decision::Resume("abc123".into()));
        let refused = decide(&dev(), |_| false).unwrap_err().to_string();
        assert_eq!(
            refused,
            "deployment/web is already in dev mode for session abc123, which this machine did not start (or has forgotten); `devmount down` restores it from any machine, then `devmount up` starts afresh"
        );
    }

    #[test]
    fn fighters_are_named() {
        let plain = deployment(json!({}), json!({}));
        assert_eq!(fighters(&plain, &[hpa("web", 1, 1), hpa("other", 1, 5)]), Fighters::default());
        let found = fighters(&plain, &[hpa("web", 1, 4)]);
        assert_eq!(found.blocking.len(), 1);
        assert!(found.blocking[0]
            .starts_with("HorizontalPodAutoscaler web-hpa scales deployment/web up to 4 pods"));
        assert!(found.blocking[0].ends_with("set its minReplicas and maxReplicas to 1, for the session"));

        let argo = deployment(
            json!({}),
            json!({"argocd.argoproj.io/tracking-id": "shop-app:apps/Deployment:shop/web"}),
        );
        let found = fighters(&argo, &[]);
        assert!(found.blocking.is_empty());
        assert_eq!(found.warnings.len(), 1);
        assert!(
            found.warnings[0].starts_with("Argo CD application shop-app manages deployment/web"),
            "{:?}",
            found
        );
        let argo = deployment(json!({"argocd.argoproj.io/instance": "legacy"}), json!({}));
        assert!(fighters(&argo, &[]).warnings[0].starts_with("Argo CD application legacy"));

        let flux = deployment(
            json!({"kustomize.toolkit.fluxcd.io/name": "apps", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}),
            json!({}),
        );
        assert_eq!(
            fighters(&flux, &[]).warnings,
            ["Flux Kustomization apps manages deployment/web: it undoes the swap at its next sync; `flux suspend kustomization apps -n flux-system` for the session"]
        );
        let helm = deployment(json!({"helm.toolkit.fluxcd.io/name": "web"}), json!({}));
        assert!(fighters(&helm, &[]).warnings[0].contains("`flux suspend helmrelease web` for the session"));
    }

    #[test]
    fn changes_since_the_swap_are_named() {
        let dev = dev();
        let saved = fingerprint(&dev.spec);
        assert!(changes(&saved, &dev.spec).is_empty());
        let mut scaled = dev.spec.clone();
        scaled.replicas = Some(3);
        assert_eq!(changes(&saved, &scaled), ["spec.replicas"]);
        let mut edited = dev.spec.clone();
        let pod = edited.template.spec.as_mut().unwrap();
        pod.containers[1].image = Some("x:2".into());
        pod.containers.push(serde_json::from_value(json!({"name": "extra"})).unwrap());
        pod.service_account_name = Some("robot".into());
        assert_eq!(
            changes(&saved, &edited),
            ["container side", "spec.template.spec (other fields)", "container extra (added)"]
        );
        let mut fewer = dev.spec.clone();
        fewer.template.spec.as_mut().unwrap().containers.pop();
        assert_eq!(changes(&saved, &fewer), ["container side (removed)"]);
    }

    #[test]
    fn dev_container_and_workdir() {
        assert_eq!(dev_container(&dev()).unwrap(), ("app".into(), "/work".into()));
        let message = dev_container(&deployment(json!({}), json!({}))).unwrap_err().to_string();
        assert!(message.contains("it is not in dev mode"), "{message}");
    }
}
