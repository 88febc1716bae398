//! `devmount-fake-kube`: the fake Kubernetes API server of `devmount_tests::kube_api`, for
//! manual use and scripts. It listens on 127.0.0.1, writes a kubeconfig for it, prints
//! `listening on 127.0.0.1:PORT` and serves until SIGINT or SIGTERM.
//!
//! Commands, one per line on stdin, each answered on stdout with one line (`ok ...` or
//! `error: ...`):
//! - `pods NAMESPACE`: `ok NAME...`, the pods there.
//! - `replace-pod NAMESPACE POD`: deletes the pod; its ReplicaSet makes a new one.
//! - `cut-streams NAMESPACE POD`: ends the pod's exec and port-forward streams.
//! - `fault NAMESPACE DEPLOYMENT ImagePullBackOff|Unschedulable|CrashLoopBackOff|none`.
//! - `deny VERB RESOURCE`, `allow VERB RESOURCE`: RBAC, e.g. `deny create pods/exec`.
//! - `storage-class NAME`: claims of that class bind from now on.
//! - `map-port NAMESPACE DEPLOYMENT POD_PORT ADDR:PORT`: where port-forwards connect.
//! - `exec-stdin-close true|false`: whether exec offers v5 (stdin close) or only v4.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use devmount_tests::kube_api::{FakeKube, PodFault};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

/// A fake Kubernetes API server on 127.0.0.1 for the kube client (no cluster needed).
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Where to write the kubeconfig that points at this server (context `fake`).
    #[arg(long, value_name = "PATH")]
    kubeconfig: PathBuf,
    /// The directory under which exec runs commands, in NAMESPACE/POD.
    #[arg(long, value_name = "DIR")]
    pods_dir: PathBuf,
    /// A JSON object (or a `List` of them) to create at start, e.g. a Deployment.
    #[arg(long, value_name = "FILE")]
    create: Vec<PathBuf>,
    /// Port-forwards to POD_PORT of the Deployment's pods connect to ADDR:PORT.
    #[arg(long, value_name = "NAMESPACE/DEPLOYMENT:POD_PORT=ADDR:PORT")]
    map_port: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("devmount-fake-kube: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devmount-fake-kube: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let fake = FakeKube::start(&args.pods_dir).await?;
    for path in &args.create {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let object: Value = serde_json::from_str(&text).with_context(|| {
            format!("{} is not JSON (convert YAML first, e.g. with yq -o json)", path.display())
        })?;
        let objects = match object.get("items") {
            Some(Value::Array(items)) if object["kind"] == "List" => items.clone(),
            _ => vec![object],
        };
        for object in objects {
            fake.create(object).with_context(|| format!("creating the object in {}", path.display()))?;
        }
    }
    for spec in &args.map_port {
        let (namespace, deployment, port, to) = parse_map(spec).with_context(|| {
            format!("--map-port {spec}: expected NAMESPACE/DEPLOYMENT:POD_PORT=ADDR:PORT")
        })?;
        fake.map_port(namespace, deployment, port, to);
    }
    fake.write_kubeconfig(&args.kubeconfig)?;
    println!("listening on {}", fake.addr());
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => println!("{}", command(&fake, &line).unwrap_or_else(|e| format!("error: {e:#}"))),
                // Run in the background with stdin from /dev/null: serve on without commands.
                _ => stdin_open = false,
            },
        }
    }
}

fn parse_map(spec: &str) -> Option<(&str, &str, u16, SocketAddr)> {
    let (target, to) = spec.split_once('=')?;
    let (path, port) = target.rsplit_once(':')?;
    let (namespace, deployment) = path.split_once('/')?;
    Some((namespace, deployment, port.parse().ok()?, to.parse().ok()?))
}

fn command(fake: &FakeKube, line: &str) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["pods", namespace] => {
            let names: Vec<String> = fake
                .list("pods", namespace)
                .iter()
                .filter_map(|p| p.pointer("/metadata/name")?.as_str().map(str::to_owned))
                .collect();
            Ok(format!("ok {}", names.join(" ")).trim_end().to_owned())
        }
        ["replace-pod", namespace, pod] => fake.replace_pod(namespace, pod).map(|()| "ok".into()),
        ["cut-streams", namespace, pod] => fake.cut_streams(namespace, pod).map(|()| "ok".into()),
        ["fault", namespace, deployment, fault] => {
            let fault = match *fault {
                "ImagePullBackOff" => Some(PodFault::ImagePullBackOff),
                "Unschedulable" => Some(PodFault::Unschedulable),
                "CrashLoopBackOff" => Some(PodFault::CrashLoopBackOff),
                "none" => None,
                other => bail!(
                    "unknown fault {other}: use ImagePullBackOff, Unschedulable, CrashLoopBackOff or none"
                ),
            };
            fake.set_fault(namespace, deployment, fault);
            Ok("ok".into())
        }
        ["deny", verb, resource] => {
            fake.deny(verb, resource);
            Ok("ok".into())
        }
        ["allow", verb, resource] => {
            fake.allow(verb, resource);
            Ok("ok".into())
        }
        ["storage-class", name] => {
            fake.add_storage_class(name);
            Ok("ok".into())
        }
        ["map-port", namespace, deployment, port, to] => {
            let port = port.parse().with_context(|| format!("bad pod port {port}"))?;
            let to = to.parse().with_context(|| format!("bad address {to}: expected ADDR:PORT"))?;
            fake.map_port(namespace, deployment, port, to);
            Ok("ok".into())
        }
        ["exec-stdin-close", on @ ("true" | "false")] => {
            fake.set_exec_stdin_close(*on == "true");
            Ok("ok".into())
        }
        _ => bail!(
            "unknown command {line:?}: pods, replace-pod, cut-streams, fault, deny, allow, storage-class, \
             map-port, exec-stdin-close"
        ),
    }
}
