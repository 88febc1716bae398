//! OpenSSH clients over a session. `devmount ssh-config` prints a `Host` block whose
//! `ProxyCommand` is `devmount proxy NAME`; that asks the session's daemon for a `direct-tcpip`
//! channel, over the session's own connection, to the server's own SSH port, and splices it to
//! its stdin and stdout. So `ssh`, `scp`, `sftp` and IDE remote plugins reach the server wherever
//! it runs (on Kubernetes there is no local port to connect to), with the session's key and its
//! host key pinned under the block's alias: the block never turns host-key checking off.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::local_server::LocalServer;

/// The known_hosts file written for OpenSSH, in the session's directory.
const KNOWN_HOSTS: &str = "ssh_known_hosts";

/// How an OpenSSH client reaches the session's server through the session.
#[derive(Debug, Clone)]
pub struct SshAccess {
    /// The server's own SSH port on its loopback, as the server sees it: what `devmount proxy`
    /// asks the server to connect to.
    pub port: u16,
    pub user: String,
    /// The client's private key file.
    pub identity: PathBuf,
    /// The server's host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// The session's directory, where the known_hosts file for OpenSSH goes.
    pub dir: PathBuf,
}

impl SshAccess {
    /// A local server: it listens on its 127.0.0.1 at the port the session connects to.
    pub fn local(server: &LocalServer) -> SshAccess {
        SshAccess {
            port: server.port(),
            user: server.user().to_owned(),
            identity: server.identity().to_owned(),
            host_key: server.host_public_key().to_owned(),
            dir: server.session_dir().to_owned(),
        }
    }

    /// Writes the known_hosts file that pins the host key under `alias` (mode 0600, replaced
    /// whole) and returns what the `Host` block needs.
    pub fn host_config(&self, name: &str) -> Result<HostConfig> {
        let alias = alias(name);
        let path = self.dir.join(KNOWN_HOSTS);
        let temp = self.dir.join(format!("{KNOWN_HOSTS}.new"));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| f.write_all(format!("{alias} {}\n", self.host_key).as_bytes()))
            .and_then(|()| std::fs::rename(&temp, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(HostConfig {
            name: name.to_owned(),
            user: self.user.clone(),
            identity: self.identity.clone(),
            known_hosts: path,
        })
    }
}

/// The `Host` alias of the session named `name`.
pub fn alias(name: &str) -> String {
    format!("devmount-{name}")
}

/// What the daemon tells `devmount ssh-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The session's name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    pub user: String,
    pub identity: PathBuf,
    /// Pins the host key under the alias.
    pub known_hosts: PathBuf,
}

impl HostConfig {
    /// The `Host` block, with `devmount` (absolute) as the proxy command.
    pub fn block(&self, devmount: &Path, mountpoint: &Path) -> Result<String> {
        let alias = alias(&self.name);
        Ok(format!(
            "# The devmount session {name} (mounted at {mount}), from `devmount ssh-config`.\n\
             Host {alias}\n\
             \x20 User {user}\n\
             \x20 ProxyCommand {proxy} proxy {name}\n\
             \x20 IdentityFile {identity}\n\
             \x20 IdentitiesOnly yes\n\
             \x20 UserKnownHostsFile {known_hosts}\n\
             \x20 HostKeyAlias {alias}\n\
             \x20 StrictHostKeyChecking yes\n\
             \x20 UpdateHostKeys no\n",
            name = self.name,
            mount = mountpoint.display().to_string().replace('\n', "?"),
            user = config_word(&self.user, "the user name")?,
            proxy = shell_word(devmount)?,
            identity = config_word(path_text(&self.identity)?, "the key's path")?,
            known_hosts = config_word(path_text(&self.known_hosts)?, "the known_hosts path")?,
        ))
    }
}

fn path_text(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8, which an ssh config cannot hold", path.display()))
}

/// `text` as one word of an ssh config: `%` doubled (OpenSSH expands `%` tokens in these
/// values), in double quotes when it has white space.
fn config_word(text: &str, what: &str) -> Result<String> {
    if text.is_empty() || text.contains(['"', '\\', '\n', '\r']) {
        bail!("{what} {text:?} cannot be written in an ssh config (it is empty, or has a quote, a backslash or a line break)");
    }
    let escaped = text.replace('%', "%%");
    Ok(if escaped.contains(char::is_whitespace) { format!("\"{escaped}\"") } else { escaped })
}

/// `path` quoted for the shell that runs a `ProxyCommand`, with `%` doubled.
fn shell_word(path: &Path) -> Result<String> {
    let text = path_text(path)?;
    if text.contains(['\n', '\r']) {
        bail!("{text:?} cannot be written in an ssh config (it has a line break)");
    }
    Ok(format!("'{}'", text.replace('\'', r"'\''").replace('%', "%%")))
}

/// The client's side of `devmount proxy`: copies stdin to the daemon's socket and what comes
/// from it to stdout, until the daemon closes it (when the channel closes).
pub fn splice(socket: UnixStream) -> Result<()> {
    let to = socket.try_clone().context("cannot use the daemon's socket")?;
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            // Whatever ends the input (its end, an error), the server is told it is over.
            let _ = pass(io::stdin().lock(), &to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        })
        .context("cannot start a thread to read stdin")?;
    // Unbuffered: Rust's stdout holds back what follows the last newline, and an SSH client
    // waits for every byte.
    let stdout = std::fs::File::from(io::stdout().as_fd().try_clone_to_owned().context("cannot use stdout")?);
    match pass(&socket, stdout) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("the proxied connection failed"),
        _ => Ok(()),
    }
}

/// Copies `from` to `to` until `from` ends, each read written at once. Not `io::copy`: between a
/// Unix socket and a pipe it uses splice(2), which was seen to swallow an SSH server's
/// key-exchange packet (read from the socket, never in the pipe) on Linux 6.18.
fn pass(mut from: impl Read, mut to: impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_pins_the_host_key_and_quotes_paths() {
        let config = HostConfig {
            name: "api".into(),
            user: "dev".into(),
            identity: "/state dir/local/ab/id_ed25519".into(),
            known_hosts: "/state/local/100%/ssh_known_hosts".into(),
        };
        let block = config.block(Path::new("/opt/it's/devmount"), Path::new("/home/dev/mnt")).unwrap();
        let lines: Vec<&str> = block.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "Host devmount-api",
                "  User dev",
                r"  ProxyCommand '/opt/it'\''s/devmount' proxy api",
                "  IdentityFile \"/state dir/local/ab/id_ed25519\"",
                "  IdentitiesOnly yes",
                "  UserKnownHostsFile /state/local/100%%/ssh_known_hosts",
                "  HostKeyAlias devmount-api",
                "  StrictHostKeyChecking yes",
                "  UpdateHostKeys no",
            ]
        );
        let bad = HostConfig { identity: "/a\"b".into(), ..config };
        let e = bad.block(Path::new("/bin/devmount"), Path::new("/m")).unwrap_err().to_string();
        assert!(e.contains("cannot be written in an ssh config"), "{e}");
    }

    #[test]
    fn the_known_hosts_file_is_private_and_keyed_by_the_alias() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let access = SshAccess {
            port: 2222,
            user: "dev".into(),
            identity: dir.path().join("id_ed25519"),
            host_key: "ssh-ed25519 AAAAC3Nza".into(),
            dir: dir.path().to_owned(),
        };
        for _ in 0..2 {
            let config = access.host_config("api").unwrap();
            assert_eq!(config.known_hosts, dir.path().join(KNOWN_HOSTS));
            let text = std::fs::read_to_string(&config.known_hosts).unwrap();
            assert_eq!(text, "devmount-api ssh-ed25519 AAAAC3Nza\n");
            let mode = std::fs::metadata(&config.known_hosts).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
