//! The server's way into the pod, without a registry: a probe (the node's architecture and the
//! server already there), then, where needed, the static devmount-server streamed through the
//! exec API into `head -c SIZE`, checked in the pod (size, and sha256 where `sha256sum`
//! exists), renamed into place, and the ready marker that [`WAIT_SCRIPT`] waits for.
//!
//! `head -c SIZE` and not `cat`: some clusters cannot close an exec's stdin without closing
//! the whole stream, so the pod must know where the upload ends. A server of another version
//! is replaced: the new one is renamed over it and the old one (the container's PID 1, found
//! by its deleted executable) is ended, so the container restarts into the new one.
//!
//! [`WAIT_SCRIPT`]: super::translate::WAIT_SCRIPT

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;
use kube::Api;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cluster::{api_error, Cluster};

/// The most output a probe or upload script prints that is kept.
const MAX_OUTPUT: u64 = 64 << 10;

/// Prints the node's architecture, then the installed server's size and sha256 (when it is
/// ready and `sha256sum` exists). `$1` is the server directory.
pub const PROBE_SCRIPT: &str = r#"uname -m
if [ -e "$1/ready" ] && [ -f "$1/devmount-server" ]; then
  echo "size $(wc -c < "$1/devmount-server")"
  if command -v sha256sum >/dev/null 2>&1; then echo "sha256 $(sha256sum < "$1/devmount-server")"; fi
fi
"#;

/// Takes exactly `$2` bytes from stdin to `$1/devmount-server.upload`, checks the size and
/// (with `sha256sum`) the hash `$3`, renames it into place, writes the ready marker, says
/// `uploaded` and `running PIDS...` (the servers of the replaced version, found by their
/// executable before the rename), then ends those (the stream may end with them: one is the
/// container's PID 1).
pub const UPLOAD_SCRIPT: &str = r#"set -e
dir=$1 size=$2 sum=$3
tmp="$dir/devmount-server.upload"
head -c "$size" > "$tmp"
got=$(wc -c < "$tmp")
if [ "$got" -ne "$size" ]; then rm -f "$tmp"; echo "devmount: the pod received $got of $size bytes" >&2; exit 1; fi
if command -v sha256sum >/dev/null 2>&1; then
  set -- $(sha256sum < "$tmp")
  if [ "$1" != "$sum" ]; then rm -f "$tmp"; echo "devmount: the upload's sha256 is $1, not $sum" >&2; exit 1; fi
fi
chmod 755 "$tmp"
abs=$(cd "$dir" && pwd)
old=
for p in /proc/[0-9]*; do
  if [ "$(readlink "$p/exe" 2>/dev/null)" = "$abs/devmount-server" ]; then old="$old ${p#/proc/}"; fi
done
mv -f "$tmp" "$dir/devmount-server"
: > "$dir/ready"
echo uploaded
echo "running$old"
for pid in $old; do kill -TERM "$pid" 2>/dev/null || true; done
"#;

/// The server to upload: its bytes' size and sha256.
#[derive(Debug, Clone)]
pub struct ServerBinary {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

impl ServerBinary {
    pub fn read(path: &Path) -> Result<ServerBinary> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        Ok(ServerBinary { path: path.to_owned(), size: bytes.len() as u64, sha256 })
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub arch: String,
    /// Size and (where the pod has `sha256sum`) hash of a ready server.
    pub installed: Option<(u64, Option<String>)>,
}

/// What to do about the server in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The ready server is this one.
    Keep,
    /// There is none yet.
    Upload,
    /// A server of another version is ready: replace it (the one running is ended, and the
    /// container restarts into the new one).
    Replace,
}

/// Pure: the probe's output read.
pub fn parse_probe(output: &str) -> Result<Probe> {
    let mut lines = output.lines();
    let arch = lines.next().map(str::trim).filter(|a| !a.is_empty()).ok_or_else(|| {
        anyhow!("the pod's probe printed nothing; the dev container needs a POSIX sh with uname, wc and head")
    })?;
    let (mut size, mut sha) = (None, None);
    for line in lines {
        if let Some(n) = line.strip_prefix("size ") {
            size = n.trim().parse::<u64>().ok();
        } else if let Some(hash) = line.strip_prefix("sha256 ") {
            sha = hash.split_whitespace().next().map(str::to_owned);
        }
    }
    Ok(Probe { arch: arch.to_owned(), installed: size.map(|s| (s, sha)) })
}

/// Pure: refuses a node that cannot run the server, else says what to do.
pub fn decide(probe: &Probe, server: &ServerBinary) -> Result<Action> {
    if !matches!(probe.arch.as_str(), "x86_64" | "amd64") {
        bail!(
            "the dev pod's node is {}, and devmount-server is built for x86_64 (amd64) only; run the pod on an amd64 node (nodeSelector kubernetes.io/arch: amd64)",
            probe.arch
        );
    }
    Ok(match &probe.installed {
        None => Action::Upload,
        Some((size, Some(sha))) if *size == server.size && *sha == server.sha256 => Action::Keep,
        // Without sha256sum the size alone tells versions apart; a rebuild of the same size is
        // the one case it misses, and the upload itself is still size-checked.
        Some((size, None)) if *size == server.size => Action::Keep,
        Some(_) => Action::Replace,
    })
}

/// What an exec printed.
struct Output {
    stdout: String,
    stderr: String,
    /// The failure the API server reported (non-zero exit), if any; `None` is success.
    failure: Option<String>,
}

/// Runs `sh -c SCRIPT devmount ARGS...` in `container` of `pod`, with `input` on stdin (kept
/// open until the command ends: some clusters end the whole exec when stdin closes).
async fn exec(
    cluster: &Cluster,
    pod: &str,
    container: &str,
    script: &str,
    args: &[&str],
    input: Option<&Path>,
) -> Result<Output> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let mut command = vec!["/bin/sh", "-c", script, "devmount"];
    command.extend_from_slice(args);
    let params =
        AttachParams::default().container(container).stdin(input.is_some()).stdout(true).stderr(true);
    let mut process = api
        .exec(pod, command, &params)
        .await
        .map_err(|e| api_error(e, "create", "pods/exec", &cluster.namespace))?;
    let stdin = process.stdin();
    let mut stdout = process.stdout().ok_or_else(|| anyhow!("the exec has no stdout"))?;
    let mut stderr = process.stderr().ok_or_else(|| anyhow!("the exec has no stderr"))?;
    let status = process.take_status().ok_or_else(|| anyhow!("the exec has no status"))?;
    let send = async move {
        let (Some(mut stdin), Some(path)) = (stdin, input) else { return Ok(None) };
        let mut file =
            tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
        tokio::io::copy(&mut file, &mut stdin).await.context("sending the server to the pod")?;
        stdin.flush().await.context("sending the server to the pod")?;
        anyhow::Ok(Some(stdin))
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (mut stdout, mut stderr) = ((&mut stdout).take(MAX_OUTPUT), (&mut stderr).take(MAX_OUTPUT));
    let read_out = stdout.read_to_end(&mut out);
    let read_err = stderr.read_to_end(&mut err);
    let (sent, _, _) = tokio::join!(send, read_out, read_err);
    let open_stdin = sent?;
    let status = status.await;
    drop(open_stdin);
    let failure = match status {
        Some(s) if s.status.as_deref() == Some("Failure") => {
            Some(s.message.unwrap_or_else(|| "the command failed".into()))
        }
        Some(_) => None,
        None => Some("the exec ended without a status".into()),
    };
    Ok(Output {
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        failure,
    })
}

/// Makes sure the pod's `container` has `server` ready in `dir`: probes, and uploads where
/// needed. Returns what was done.
pub async fn ensure(
    cluster: &Cluster,
    pod: &str,
    container: &str,
    dir: &str,
    server: &ServerBinary,
) -> Result<Action> {
    let probe = exec(cluster, pod, container, PROBE_SCRIPT, &[dir], None).await?;
    if let Some(failure) = probe.failure {
        bail!("cannot probe pod {pod}: {failure}; {}", nonempty(&probe.stderr));
    }
    let action = decide(&parse_probe(&probe.stdout)?, server)?;
    if action == Action::Keep {
        return Ok(action);
    }
    let size = server.size.to_string();
    let up = exec(cluster, pod, container, UPLOAD_SCRIPT, &[dir, &size, &server.sha256], Some(&server.path))
        .await?;
    // The old server's end may end the container, and this exec with it, after the marker.
    if up.stdout.lines().any(|l| l == "uploaded") {
        return Ok(match uploaded_over_running(&up.stdout) {
            true => Action::Replace,
            false => Action::Upload,
        });
    }
    bail!(
        "uploading devmount-server to pod {pod} failed: {}; {}",
        up.failure.unwrap_or_else(|| "no confirmation".into()),
        nonempty(&up.stderr)
    )
}

/// Pure: whether the upload script ended a running server (so the container restarts).
pub fn uploaded_over_running(stdout: &str) -> bool {
    stdout.lines().any(|l| l.strip_prefix("running").is_some_and(|pids| !pids.trim().is_empty()))
}

fn nonempty(stderr: &str) -> String {
    if stderr.is_empty() {
        "it printed nothing".into()
    } else {
        format!("it printed: {}", stderr.lines().collect::<Vec<_>>().join(" | "))
    }
}

/// The static devmount-server to upload: `--server-bin`, else the first static x86_64 one of
/// `devmount-server-static` or `devmount-server` next to devmount, or the build directory of
/// scripts/build-static-server beside devmount's own target directory.
pub fn find_server(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        check_static(path)?;
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe().context("cannot find devmount's own executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let mut candidates = vec![dir.join("devmount-server-static"), dir.join("devmount-server")];
    if let Some(target) = dir.parent() {
        candidates.push(target.join("static/devmount-server"));
    }
    for candidate in &candidates {
        if check_static(candidate).is_ok() {
            return Ok(candidate.clone());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    bail!(
        "no static x86_64 devmount-server found (looked at {}); build one with scripts/build-static-server, or give it with --server-bin FILE",
        looked.join(", ")
    )
}

/// Checks that `path` is an x86_64 ELF executable without a program interpreter (static).
pub fn check_static(path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("--server-bin {}: cannot read it", path.display()))?;
    match elf_kind(&bytes) {
        Some((62, false)) => Ok(()),
        Some((62, true)) => bail!(
            "{} is dynamically linked, and pod images differ in their C libraries; build the static one with scripts/build-static-server",
            path.display()
        ),
        Some(_) => bail!("{} is not an x86_64 executable; build it with scripts/build-static-server", path.display()),
        None => bail!("{} is not an ELF executable; give the devmount-server binary", path.display()),
    }
}

/// Pure: an ELF file's machine and whether it asks for a program interpreter (is dynamic).
pub fn elf_kind(bytes: &[u8]) -> Option<(u16, bool)> {
    use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
    let file = ElfFile64::<object::Endianness>::parse(bytes).ok()?;
    let endian = file.endian();
    let machine = file.elf_header().e_machine(endian);
    let dynamic = file.elf_program_headers().iter().any(|p| p.p_type(endian) == object::elf::PT_INTERP);
    Some((machine, dynamic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerBinary {
        ServerBinary { path: "/x".into(), size: 100, sha256: "ab".repeat(32) }
    }

    #[test]
    fn probes_read_and_decide() {
        let fresh = parse_probe("x86_64\n").unwrap();
        assert_eq!(fresh, Probe { arch: "x86_64".into(), installed: None });
        assert_eq!(decide(&fresh, &server()).unwrap(), Action::Upload);

        let same = parse_probe(&format!("x86_64\nsize 100\nsha256 {}  -\n", "ab".repeat(32))).unwrap();
        assert_eq!(same.installed, Some((100, Some("ab".repeat(32)))));
        assert_eq!(decide(&same, &server()).unwrap(), Action::Keep);
        let other = parse_probe("x86_64\nsize 100\nsha256 cd  -\n").unwrap();
        assert_eq!(decide(&other, &server()).unwrap(), Action::Replace, "a version mismatch re-uploads");
        let no_sha = parse_probe("x86_64\nsize       100\n").unwrap();
        assert_eq!(decide(&no_sha, &server()).unwrap(), Action::Keep, "busybox wc pads with spaces");
        assert_eq!(decide(&parse_probe("x86_64\nsize 99\n").unwrap(), &server()).unwrap(), Action::Replace);

        let arm = decide(&parse_probe("aarch64\n").unwrap(), &server()).unwrap_err().to_string();
        assert_eq!(
            arm,
            "the dev pod's node is aarch64, and devmount-server is built for x86_64 (amd64) only; run the pod on an amd64 node (nodeSelector kubernetes.io/arch: amd64)"
        );
        assert!(parse_probe("").unwrap_err().to_string().contains("needs a POSIX sh"));
    }

    #[test]
    fn elf_kinds() {
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let (machine, _) = elf_kind(&own).expect("the test binary is ELF");
        assert_eq!(machine, 62);
        assert_eq!(elf_kind(b"#!/bin/sh\n"), None);
        let sh = std::fs::read("/bin/sh").unwrap();
        assert_eq!(elf_kind(&sh).map(|k| k.1), Some(true), "/bin/sh is dynamically linked");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(check_static(&script).unwrap_err().to_string().contains("is not an ELF executable"));
        assert!(check_static(Path::new("/bin/sh"))
            .unwrap_err()
            .to_string()
            .contains("is dynamically linked"));
    }

    /// The scripts run under the local sh as they would in a pod (the exec API only carries
    /// their bytes): an upload lands checked and ready, a short or corrupt one is refused.
    #[test]
    fn scripts_run_under_sh() {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let run = |script: &str, args: &[&str], input: &[u8]| {
            let mut child = Command::new("/bin/sh")
                .args(["-c", script, "devmount"])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), input).unwrap();
            let out = child.wait_with_output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (ok, out, _) = run(PROBE_SCRIPT, &[d], b"");
        assert!(ok);
        assert_eq!(parse_probe(&out).unwrap().installed, None);

        let body = b"#!/bin/sh\necho hi\n";
        let sum: String = Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
        let (ok, out, err) =
            run(UPLOAD_SCRIPT, &[d, &body.len().to_string(), &sum], &[&body[..], b"trailing"].concat());
        assert!(ok, "{err}");
        assert_eq!(out, "uploaded\nrunning\n");
        assert!(!uploaded_over_running(&out));
        assert_eq!(
            std::fs::read(dir.path().join("devmount-server")).unwrap(),
            body,
            "exactly SIZE bytes taken"
        );
        assert!(dir.path().join("ready").exists());
        let (_, out, _) = run(PROBE_SCRIPT, &[d], b"");
        let probe = parse_probe(&out).unwrap();
        let binary = ServerBinary { path: "/x".into(), size: body.len() as u64, sha256: sum.clone() };
        assert_eq!(decide(&probe, &binary).unwrap(), Action::Keep);

        let (ok, _, err) = run(UPLOAD_SCRIPT, &[d, "100", &sum], body);
        assert!(!ok);
        assert!(err.contains(&format!("the pod received {} of 100 bytes", body.len())), "{err}");
        let (ok, _, err) = run(UPLOAD_SCRIPT, &[d, &body.len().to_string(), &"0".repeat(64)], body);
        assert!(!ok);
        assert!(err.contains("the upload's sha256 is"), "{err}");
        assert!(!dir.path().join("devmount-server.upload").exists());

        // A server of the old version runs from the directory: it is named, then ended.
        // Copied by cp, not here: a file this multi-threaded process had open for writing
        // could be inherited by another test's fork, and exec would fail with ETXTBSY.
        let copied = Command::new("cp").arg("/bin/sleep").arg(dir.path().join("devmount-server")).status();
        assert!(copied.unwrap().success());
        let mut old = Command::new(dir.path().join("devmount-server")).arg("60").spawn().unwrap();
        let (ok, out, err) = run(UPLOAD_SCRIPT, &[d, &body.len().to_string(), &sum], body);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("running {}\n", old.id())), "{out}");
        assert!(uploaded_over_running(&out));
        let status = old.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
    }
}
