//! The connection's transport: one Kubernetes port-forward stream to the server's port on the
//! pod's 127.0.0.1, handed to [`crate::session::connect_stream`] as the byte stream russh runs
//! over. No Service, NodePort or open port: the API server carries the bytes.

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::DuplexStream;

use super::cluster::{api_error, Cluster};

/// A stream to `port` on `pod`'s loopback. It ends when the pod goes or the API server drops
/// the forward; an error the API server sends for the port is logged.
pub async fn open(cluster: &Cluster, pod: &str, port: u16) -> Result<DuplexStream> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let mut forwarder = api
        .portforward(pod, &[port])
        .await
        .map_err(|e| api_error(e, "create", "pods/portforward", &cluster.namespace))?;
    let stream = forwarder
        .take_stream(port)
        .ok_or_else(|| anyhow::anyhow!("the port-forward to pod {pod} has no stream for port {port}"))?;
    if let Some(error) = forwarder.take_error(port) {
        let pod = pod.to_owned();
        tokio::spawn(async move {
            if let Some(message) = error.await {
                tracing::warn!("port-forward to pod {pod}:{port}: {message}");
            }
        });
    }
    // The forwarder's task carries the bytes on its own; it ends with the stream.
    drop(forwarder);
    Ok(stream)
}
