//! The cluster a session works in: a `kube` client from the usual places (KUBECONFIG or
//! ~/.kube/config with its current context or `--context`, else the in-cluster service
//! account), the namespace (the manifest's, else the context's), and API errors as one line
//! with the fix.

use anyhow::{anyhow, Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Client, Config};

/// The context name recorded for a client configured from the pod's service account.
pub const IN_CLUSTER: &str = "in-cluster";

/// A client, and where it points.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// The kubeconfig context's name, or [`IN_CLUSTER`].
    pub context: String,
    pub namespace: String,
}

impl Cluster {
    /// Connects as `kubectl --context CONTEXT` would (the current context without one, the
    /// in-cluster service account without any kubeconfig), in `namespace` or the context's.
    pub async fn connect(context: Option<&str>, namespace: Option<&str>) -> Result<Cluster> {
        let kubeconfig = match Kubeconfig::read() {
            Ok(file) => Some(file),
            // No file at all: in a pod, its service account; a file that is there but unreadable
            // is an error, not a reason to try something else.
            Err(KubeconfigError::FindPath) => None,
            Err(e) if std::env::var_os("KUBECONFIG").is_some() || default_file_exists() => {
                anyhow::bail!("cannot read the kubeconfig: {e}; `kubectl config view` shows what is wrong")
            }
            Err(_) => None,
        };
        let (config, context) = match (&kubeconfig, context) {
            (Some(file), wanted) => {
                let name = match wanted.or(file.current_context.as_deref()) {
                    Some(name) => name.to_owned(),
                    None => anyhow::bail!(
                        "the kubeconfig has no current context; give one with --context NAME (`kubectl config get-contexts` lists them)"
                    ),
                };
                if !file.contexts.iter().any(|c| c.name == name) {
                    let known: Vec<&str> = file.contexts.iter().map(|c| c.name.as_str()).collect();
                    anyhow::bail!(
                        "the kubeconfig has no context {name:?}; use one of: {}",
                        if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
                    );
                }
                let options = KubeConfigOptions { context: Some(name.clone()), ..KubeConfigOptions::default() };
                let config = Config::from_custom_kubeconfig(file.clone(), &options)
                    .await
                    .with_context(|| format!("cannot use the kubeconfig's context {name}"))?;
                (config, name)
            }
            (None, Some(name)) => anyhow::bail!(
                "--context {name}: no kubeconfig found (KUBECONFIG, ~/.kube/config); point KUBECONFIG at the cluster's"
            ),
            (None, None) => {
                let config = Config::incluster().map_err(|e| {
                    anyhow!("no kubeconfig found (KUBECONFIG, ~/.kube/config) and not inside a pod ({e}); point KUBECONFIG at the cluster's")
                })?;
                (config, IN_CLUSTER.to_owned())
            }
        };
        let namespace = namespace.map_or_else(|| config.default_namespace.clone(), str::to_owned);
        let client = Client::try_from(config).context("cannot make a Kubernetes client")?;
        Ok(Cluster { client, context, namespace })
    }
}

/// Whether ~/.kube/config exists.
fn default_file_exists() -> bool {
    std::env::var_os("HOME").is_some_and(|home| std::path::Path::new(&home).join(".kube/config").exists())
}

/// `e`, the failure of `verb` on `resource` (e.g. `patch`, `deployments`), as one line with
/// the fix: a 403 names what RBAC refused and points at the Role devmount needs.
pub fn api_error(e: kube::Error, verb: &str, resource: &str, namespace: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(status) => {
            anyhow!(describe_status(status.code, &status.message, verb, resource, namespace))
        }
        e => anyhow!(
            "cannot {verb} {resource} in namespace {namespace}: {e}; check that the cluster is reachable"
        ),
    }
}

/// The message for an API error status. Pure, for tests.
pub fn describe_status(code: u16, message: &str, verb: &str, resource: &str, namespace: &str) -> String {
    match code {
        403 => format!(
            "RBAC denied: cannot {verb} {resource} in namespace {namespace} ({message}); ask for the Role in docs/kubernetes.md#rbac"
        ),
        401 => format!(
            "the cluster did not accept the credentials ({message}); log in again (`kubectl get pods` must work)"
        ),
        _ => format!("cannot {verb} {resource} in namespace {namespace}: {message}"),
    }
}

/// Whether `e` is the API server's "not found".
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// Whether `e` is a write refused because the object changed since it was read.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_one_line_with_the_fix() {
        let denied = describe_status(
            403,
            "deployments.apps \"web\" is forbidden: User \"dev\" cannot patch resource \"deployments\" in API group \"apps\" in the namespace \"shop\"",
            "patch",
            "deployments",
            "shop",
        );
        assert!(denied.starts_with("RBAC denied: cannot patch deployments in namespace shop ("), "{denied}");
        assert!(denied.ends_with("ask for the Role in docs/kubernetes.md#rbac"), "{denied}");
        assert!(!denied.contains('\n'));
        assert!(describe_status(401, "Unauthorized", "get", "pods", "a").contains("log in again"));
        assert_eq!(
            describe_status(422, "bad spec", "update", "deployments", "a"),
            "cannot update deployments in namespace a: bad spec"
        );
    }
}
