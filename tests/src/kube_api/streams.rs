//! `pods/exec` and `pods/portforward` over WebSocket, in the Kubernetes channel protocols: each
//! binary message starts with a channel byte. Exec: 0 stdin, 1 stdout, 2 stderr, 3 the final
//! `Status`, 4 terminal resize, and in `v5.channel.k8s.io` a message `[255, ch]` closes channel
//! `ch` (the client's stdin EOF). Port-forward: port number i uses channel 2i for data and 2i+1
//! for an error message, and the first message on each carries the port, little-endian.

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{future, SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::controller::owning_deployment;
use super::http::{flag, param, Body, Query};
use super::resources::{ApiError, PODS, SECRETS};
use super::Shared;

const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const CLOSE: u8 = 255;
/// The largest chunk read from a process or connection before it is sent as one message.
const CHUNK: usize = 32 << 10;
/// Messages waiting to go out on one WebSocket; a full queue stops the readers feeding it.
const QUEUE: usize = 16;
/// How long a killed command's output may take to drain (a process outside its group may hold
/// the pipes) before the stream is dropped.
const KILL_GRACE: Duration = Duration::from_secs(5);

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Accepts the WebSocket upgrade with the first of `supported` the client offered, or says
/// which protocols are needed.
fn upgrade(
    req: &mut Request<Incoming>,
    supported: &[&'static str],
) -> Result<(Response<Body>, &'static str), ApiError> {
    let headers = req.headers();
    let wants_ws = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers.get(SEC_WEBSOCKET_KEY).filter(|_| wants_ws).ok_or_else(|| {
        ApiError::bad_request("Upgrade request required: exec and port-forward need a WebSocket upgrade")
    })?;
    let offered: Vec<&str> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let protocol = supported.iter().copied().find(|p| offered.contains(p)).ok_or_else(|| {
        ApiError::bad_request(format!(
            "none of the offered WebSocket subprotocols {offered:?} is supported; offer one of {supported:?}"
        ))
    })?;
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a valid header"),
    );
    h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
    Ok((resp, protocol))
}

/// Runs `serve` on the WebSocket once the client has switched protocols.
fn spawn_on_upgrade<F>(on_upgrade: OnUpgrade, serve: impl FnOnce(Ws) -> F + Send + 'static)
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            serve(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await).await;
        }
    });
}

/// A pod that can take a stream: it exists, is scheduled and is not a bare Pending pod.
fn running_pod(shared: &Shared, ns: &str, name: &str) -> Result<Value, ApiError> {
    let state = shared.lock();
    let pod = state.store.get(PODS, ns, name)?.clone();
    if pod.pointer("/spec/nodeName").is_none() {
        return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
    }
    Ok(pod)
}

struct ExecSpec {
    command: Vec<String>,
    dir: PathBuf,
    env: Vec<(String, OsString)>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    v5: bool,
}

pub fn exec(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    ns: &str,
    name: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let command: Vec<String> = query.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
    if command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    let (stdin, stdout, stderr) = (flag(query, "stdin"), flag(query, "stdout"), flag(query, "stderr"));
    if !(stdin || stdout || stderr) {
        return Err(ApiError::bad_request("you must specify at least one of stdin, stdout, stderr"));
    }
    let pod = running_pod(shared, ns, name)?;
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<&str> = containers.iter().filter_map(|c| c["name"].as_str()).collect();
    let container = match param(query, "container") {
        Some(wanted) => containers.iter().find(|c| c["name"] == wanted).ok_or_else(|| {
            ApiError::bad_request(format!("container {wanted} is not valid for pod {name}"))
        })?,
        None if containers.len() == 1 => &containers[0],
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    let container_name = container["name"].as_str().unwrap_or("");
    let running = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["name"] == container_name && c.pointer("/state/running").is_some());
    if !running {
        return Err(ApiError::bad_request(format!(
            "unable to upgrade connection: container not found (\"{container_name}\")"
        )));
    }
    let env = container_env(shared, ns, container)?;
    let dir = shared.pod_dir(ns, name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::bad_request(format!("making {}: {e}", dir.display())))?;
    let (gone, v5_allowed) = {
        let mut state = shared.lock();
        let uid = pod.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
        (state.store.pod_streams(uid), state.exec_stdin_close)
    };
    let supported: &[&'static str] = if v5_allowed { &[V5, V4] } else { &[V4] };
    let (resp, protocol) = upgrade(&mut req, supported)?;
    let spec = ExecSpec { command, dir, env, stdin, stdout, stderr, v5: protocol == V5 };
    spawn_on_upgrade(hyper::upgrade::on(&mut req), move |ws| run_exec(ws, spec, gone));
    Ok(resp)
}

/// The container's environment: literal values, and values from Secrets (bytes as they are).
pub fn container_env(
    shared: &Shared,
    ns: &str,
    container: &Value,
) -> Result<Vec<(String, OsString)>, ApiError> {
    let state = shared.lock();
    let mut env = Vec::new();
    for var in container.get("env").and_then(Value::as_array).into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or("").to_owned();
        if let Some(value) = var.get("value").and_then(Value::as_str) {
            env.push((name, value.into()));
        } else if let Some(key_ref) = var.pointer("/valueFrom/secretKeyRef") {
            let (secret, key) =
                (key_ref["name"].as_str().unwrap_or(""), key_ref["key"].as_str().unwrap_or(""));
            let encoded = state.store.get(SECRETS, ns, secret)?.pointer(&format!("/data/{key}")).cloned();
            let Some(encoded) = encoded else {
                return Err(ApiError::bad_request(format!(
                    "couldn't find key {key} in Secret {ns}/{secret}"
                )));
            };
            let bytes: ByteString = serde_json::from_value(encoded)
                .map_err(|e| ApiError::bad_request(format!("Secret {ns}/{secret} key {key}: {e}")))?;
            env.push((name, OsString::from_vec(bytes.0)));
        }
    }
    Ok(env)
}

fn piped(wanted: bool) -> Stdio {
    if wanted {
        Stdio::piped()
    } else {
        Stdio::null()
    }
}

/// The `Status` the API server sends on channel 3 when the command ends.
fn exit_status(command: &[String], status: ExitStatus) -> Value {
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
    if code == 0 {
        return json!({ "metadata": {}, "status": "Success" });
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
            command.join(" ")
        ),
        "reason": "NonZeroExitCode",
        "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
    })
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::binary(bytes)
}

/// Copies a reader into `queue` as messages on `channel` until EOF or the queue closes.
async fn pump(mut reader: impl AsyncRead + Unpin, channel: u8, queue: mpsc::Sender<Message>) {
    let mut buf = vec![0; CHUNK];
    while let Ok(n @ 1..) = reader.read(&mut buf).await {
        if queue.send(frame(channel, &buf[..n])).await.is_err() {
            return;
        }
    }
}

async fn drain(mut queue: mpsc::Receiver<Message>, sink: &mut SplitSink<Ws, Message>) -> bool {
    while let Some(message) = queue.recv().await {
        if sink.send(message).await.is_err() {
            return false;
        }
    }
    true
}

async fn send_status(sink: &mut SplitSink<Ws, Message>, status: &Value) {
    let json = serde_json::to_vec(status).expect("a JSON value serializes");
    // The client may already be gone; there is nobody left to tell.
    let _ = sink.send(frame(STATUS, &json)).await;
    let _ = sink.close().await;
}

async fn run_exec(ws: Ws, spec: ExecSpec, mut gone: watch::Receiver<()>) {
    let (mut sink, mut source) = ws.split();
    let mut cmd = Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .current_dir(&spec.dir)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(piped(spec.stdin))
        .stdout(piped(spec.stdout))
        .stderr(piped(spec.stderr))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            // containerd's wording, which clients match on to tell a missing program apart.
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "executable file not found in $PATH".to_owned()
            } else {
                e.to_string()
            };
            let message = format!(
                "Internal error occurred: error executing command in container: failed to exec in container: \
                 OCI runtime exec failed: exec failed: unable to start container process: exec: \"{}\": {why}: unknown",
                spec.command[0]
            );
            let status = json!({ "metadata": {}, "status": "Failure", "message": message, "reason": "InternalError", "code": 500 });
            send_status(&mut sink, &status).await;
            return;
        }
    };
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let mut stdin = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let input = async {
        while let Some(Ok(message)) = source.next().await {
            match message {
                Message::Binary(data) => match (data.first(), data.get(1)) {
                    (Some(&STDIN), _) => {
                        if let Some(pipe) = stdin.as_mut() {
                            if pipe.write_all(&data[1..]).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    (Some(&CLOSE), Some(&STDIN)) if spec.v5 => stdin = None,
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        // The client is gone or closed the stream (v4's only way to end stdin).
        drop(stdin.take());
        future::pending::<()>().await
    };
    let output = async {
        let (queue, outgoing) = mpsc::channel(QUEUE);
        let err_queue = queue.clone();
        let out = async move {
            if let Some(r) = stdout {
                pump(r, STDOUT, queue).await
            }
        };
        let err = async move {
            if let Some(r) = stderr {
                pump(r, STDERR, err_queue).await
            }
        };
        let ((), (), delivered) = tokio::join!(out, err, drain(outgoing, &mut sink));
        let status = child.wait().await;
        if delivered {
            let status = match status {
                Ok(status) => exit_status(&spec.command, status),
                Err(e) => {
                    json!({ "metadata": {}, "status": "Failure", "message": format!("waiting for the command: {e}") })
                }
            };
            send_status(&mut sink, &status).await;
        }
    };
    tokio::pin!(output);
    tokio::select! {
        () = &mut output => return,
        () = input => return,
        _ = gone.changed() => {}
    }
    // The pod is going: its processes die with it (the child is not reaped yet, so its
    // process group id still names this command's group), and the client gets the exit status
    // of a killed process, as from a real kubelet.
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let _ = tokio::time::timeout(KILL_GRACE, output).await;
}

pub fn port_forward(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    ns: &str,
    name: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let mut ports = Vec::new();
    for (_, value) in query.iter().filter(|(k, _)| k == "ports") {
        for port in value.split(',') {
            let port: u16 = port.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                ApiError::bad_request(format!("invalid port \"{port}\": a port is a number from 1 to 65535"))
            })?;
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err(ApiError::bad_request("at least one port must be given in \"ports\""));
    }
    let pod = running_pod(shared, ns, name)?;
    let (targets, gone) = {
        let mut state = shared.lock();
        let deployment = owning_deployment(&state.store, &pod);
        let targets: Vec<Option<SocketAddr>> = ports
            .iter()
            .map(|port| {
                let by_pod = state.ports.get(&(ns.to_owned(), name.to_owned(), *port));
                let by_deployment =
                    deployment.as_ref().and_then(|d| state.ports.get(&(ns.to_owned(), d.clone(), *port)));
                by_pod.or(by_deployment).copied()
            })
            .collect();
        let uid = pod.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("");
        (targets, state.store.pod_streams(uid))
    };
    let (resp, _) = upgrade(&mut req, &[V4])?;
    let pod_name = name.to_owned();
    spawn_on_upgrade(hyper::upgrade::on(&mut req), move |ws| {
        run_port_forward(ws, pod_name, ports, targets, gone)
    });
    Ok(resp)
}

async fn run_port_forward(
    ws: Ws,
    pod: String,
    ports: Vec<u16>,
    targets: Vec<Option<SocketAddr>>,
    mut gone: watch::Receiver<()>,
) {
    let (mut sink, mut source) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let [lo, hi] = port.to_le_bytes();
        for channel in [2 * i as u8, 2 * i as u8 + 1] {
            if sink.send(Message::binary(vec![channel, lo, hi])).await.is_err() {
                return;
            }
        }
    }
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (i, (port, target)) in ports.iter().zip(&targets).enumerate() {
        let connected = match target {
            Some(addr) => TcpStream::connect(addr).await.map_err(|e| format!("dial tcp4 {addr}: {e}")),
            None => Err("no local address is mapped to this pod port (FakeKube::map_port)".to_owned()),
        };
        match connected {
            Ok(conn) => {
                let (r, w) = conn.into_split();
                readers.push((2 * i as u8, r));
                writers.push(Some(w));
            }
            Err(why) => {
                let message = format!("error forwarding port {port} to pod {pod}: {why}");
                if sink.send(frame(2 * i as u8 + 1, message.as_bytes())).await.is_err() {
                    return;
                }
                writers.push(None);
            }
        }
    }
    let input = async {
        while let Some(Ok(message)) = source.next().await {
            match message {
                Message::Binary(data) if data.len() > 1 && data[0] % 2 == 0 => {
                    let index = usize::from(data[0] / 2);
                    let failed = match writers.get_mut(index) {
                        Some(Some(conn)) => conn.write_all(&data[1..]).await.is_err(),
                        _ => false,
                    };
                    if failed {
                        writers[index] = None;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        for conn in writers.iter_mut().flatten() {
            // The client ended the stream; a peer that already closed needs no half-close.
            let _ = conn.shutdown().await;
        }
        future::pending::<()>().await
    };
    let output = async {
        let (queue, outgoing) = mpsc::channel(QUEUE);
        let pumps = future::join_all(readers.into_iter().map(|(channel, r)| pump(r, channel, queue.clone())));
        drop(queue);
        let (_, delivered) = tokio::join!(pumps, drain(outgoing, &mut sink));
        if delivered {
            // Every connection ended: the stream ends with them.
            let _ = sink.close().await;
        }
    };
    tokio::select! {
        () = output => {}
        () = input => {}
        _ = gone.changed() => {
            // The pod is gone: so are its connections, and the stream ends cleanly.
            let _ = sink.close().await;
        }
    }
}
