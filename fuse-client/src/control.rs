//! The mount daemon's control socket: how `devmount sync MNT` (and later the session commands)
//! reach the process serving MNT.
//!
//! One Unix socket per mount, mode 0600 in a 0700 directory: `$XDG_RUNTIME_DIR/devmount/`, else
//! `<state dir>/run/`. Its name is a hash of the mount point's absolute path, so the path stays
//! far below the 108-byte limit of a socket address however deep the mount point is. The
//! protocol is one request line and one answer line: `ok ...` or `error: ...`.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::fs::Fs;

/// The directory of control sockets.
fn socket_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("devmount"),
        None => crate::mount::state_dir()?.join("run"),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The control socket of the mount at `mountpoint` (absolute).
pub fn socket_path(mountpoint: &Path) -> Result<PathBuf> {
    let digest = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(socket_dir()?.join(format!("{name}.sock")))
}

/// Binds the control socket of `mountpoint`, replacing a stale one left by a dead daemon.
pub fn bind(mountpoint: &Path) -> Result<UnixListener> {
    let path = socket_path(mountpoint)?;
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(anyhow!("another devmount already serves {}", mountpoint.display()));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Answers requests until the listener fails.
pub async fn serve(listener: UnixListener, fs: Arc<Fs>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                return;
            }
        };
        let fs = fs.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &fs).await {
                tracing::debug!("control request: {e}");
            }
        });
    }
}

async fn answer(stream: UnixStream, fs: &Fs) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = match line.trim() {
        "sync" => match fs.sync().await {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        },
        other => format!("error: unknown request {other:?}"),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Sends `request` to the daemon serving `mountpoint` and returns its answer's text.
pub async fn request(mountpoint: &Path, request: &str) -> Result<String> {
    let abs = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("{}: no such mount point", mountpoint.display()))?;
    let path = socket_path(&abs)?;
    let mut stream = UnixStream::connect(&path).await.map_err(|_| {
        anyhow!("no devmount serves {}; mount it first with `devmount mount TARGET {}`", abs.display(), abs.display())
    })?;
    stream.write_all(format!("{request}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await?;
    match answer.trim_end().strip_prefix("error: ") {
        Some(e) => Err(anyhow!("{e}")),
        None if answer.is_empty() => Err(anyhow!("the devmount serving {} went away", abs.display())),
        None => Ok(answer.trim_end().to_owned()),
    }
}
