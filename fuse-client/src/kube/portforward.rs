//! The connection's transport: one Kubernetes port-forward stream to the server's port on the
//! pod's 127.0.0.1, handed to [`crate::session::connect_stream`] as the byte stream russh runs
//! over. No Service, NodePort or open port: the API server carries the bytes.

use std::time::Duration;

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::{AsyncReadExt, DuplexStream};

use super::cluster::{api_error, Cluster};

/// A stream to `port` on `pod`'s loopback. It ends when the pod goes or the API server drops
/// the forward; an error the API server sends for the port is logged (at info).
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
                // The connection's loss is reported by whoever used it; this is the detail.
                tracing::info!("port-forward to pod {pod}:{port}: {message}");
            }
        });
    }
    // The forwarder's task carries the bytes on its own; it ends with the stream.
    drop(forwarder);
    Ok(stream)
}

/// How long one look for the server's greeting may take.
const GREETING_WAIT: Duration = Duration::from_secs(5);
/// Between looks.
const LOOK_INTERVAL: Duration = Duration::from_millis(200);

/// Waits up to `timeout` until something on `port` of `pod` greets like an SSH server: a server
/// just uploaded needs a moment before it listens (the wait script looks for it every 0.2 s).
pub async fn wait_listening(cluster: &Cluster, pod: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match open(cluster, pod, port).await {
            Ok(mut stream) => {
                let mut greeting = [0u8; 4];
                match tokio::time::timeout(GREETING_WAIT, stream.read_exact(&mut greeting)).await {
                    Ok(Ok(_)) if &greeting == b"SSH-" => return Ok(()),
                    Ok(Ok(_)) => format!("port {port} answers, but not as an SSH server"),
                    Ok(Err(e)) => format!("the port-forward ended: {e}"),
                    Err(_) => format!("no greeting within {GREETING_WAIT:?}"),
                }
            }
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() + LOOK_INTERVAL > deadline {
            bail!("devmount-server in pod {pod} did not listen on port {port} within {timeout:?}: {last}");
        }
        tokio::time::sleep(LOOK_INTERVAL).await;
    }
}
