//! What this machine keeps of a Kubernetes session: `STATE/kube/<session id>/`, mode 0700,
//! with the client key (`id_ed25519`), the `known_hosts` line pinning the session's host key,
//! `place`, the cluster coordinates and the mount point, and once `devmount ssh-config` ran,
//! `ssh_known_hosts`, the same host key pinned for OpenSSH under the `Host` alias. The cluster holds the rest (the
//! swap, the Secret), so `devmount down` works without these files; with them, `devmount up`
//! resumes a swap this machine made instead of refusing it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;

use super::translate::{SessionId, DEFAULT_SERVER_PORT};
use crate::local_server::{new_key, new_session_dir, private_text, public_line, random_bytes, write_private};
use crate::proxy::SshAccess;
use crate::session::Target;

/// The user name the client gives devmount-server, which accepts a key whatever the name.
const SSH_USER: &str = "devmount";

/// Where a session works: the journal key's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub context: String,
    pub namespace: String,
    pub deployment: String,
    pub container: String,
    pub workdir: String,
}

impl Place {
    /// `kube:<context>/<namespace>/<deployment>/<container>/<workdir>`: the same for every
    /// session on this container, so changes one left pending are replayed by the next.
    pub fn journal_key(&self) -> String {
        format!(
            "kube:{}/{}/{}/{}/{}",
            self.context, self.namespace, self.deployment, self.container, self.workdir
        )
    }

    /// Where the session works, for `devmount status`.
    pub fn describe(&self) -> String {
        format!(
            "kubernetes deployment {}/{} (context {}), container {}, workdir {}",
            self.namespace, self.deployment, self.context, self.container, self.workdir
        )
    }

    /// What the SSH connection is checked as: `DEPLOYMENT.NAMESPACE` on the server's port,
    /// with the workdir (the server's `--root`) as the path.
    pub fn target(&self) -> Target {
        let mut target = ssh_target(&self.deployment, &self.namespace);
        target.path = Bytes::copy_from_slice(self.workdir.as_bytes());
        target
    }

    fn encode(&self, mountpoint: &Path) -> String {
        format!(
            "context {}\nnamespace {}\ndeployment {}\ncontainer {}\nworkdir {}\nmountpoint {}\n",
            self.context,
            self.namespace,
            self.deployment,
            self.container,
            self.workdir,
            mountpoint.display()
        )
    }

    /// `None` for a file that lacks a field.
    fn decode(text: &str) -> Option<(Place, PathBuf)> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
                .map(str::to_owned)
        };
        let place = Place {
            context: field("context")?,
            namespace: field("namespace")?,
            deployment: field("deployment")?,
            container: field("container")?,
            workdir: field("workdir")?,
        };
        Some((place, PathBuf::from(field("mountpoint")?)))
    }
}

/// The SSH target of a session on `deployment` in `namespace`, at `/`: the host key is pinned
/// for `DEPLOYMENT.NAMESPACE` and the server's port.
pub fn ssh_target(deployment: &str, namespace: &str) -> Target {
    Target {
        user: SSH_USER.into(),
        host: format!("{deployment}.{namespace}").to_ascii_lowercase(),
        port: DEFAULT_SERVER_PORT,
        path: Bytes::from_static(b"/"),
    }
}

/// A session's files on this machine.
#[derive(Debug, Clone)]
pub struct SessionFiles {
    pub id: SessionId,
    pub dir: PathBuf,
}

/// What [`SessionFiles::create`] made and the cluster needs.
pub struct NewKeys {
    /// The client's public key, one authorized_keys line.
    pub authorized_key: String,
    /// The host's private key, OpenSSH format: it goes to the session Secret, never to disk.
    pub host_key: String,
}

fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("kube")
}

impl SessionFiles {
    /// A new session: a fresh id and keys; the host key is pinned for `target`.
    pub fn create(state_dir: &Path, target: &Target) -> Result<(SessionFiles, NewKeys)> {
        let hex: String = random_bytes::<6>()?.iter().map(|b| format!("{b:02x}")).collect();
        let id = SessionId::new(&hex)?;
        let dir = new_session_dir(&root(state_dir), id.as_str())?;
        let files = SessionFiles { id, dir };
        let client = new_key()?;
        let host = new_key()?;
        write_private(&files.identity(), &private_text(&client)?)?;
        files.pin(target, &public_line(&host)?)?;
        Ok((files, NewKeys { authorized_key: public_line(&client)?, host_key: private_text(&host)? }))
    }

    /// The files of session `id`, if this machine has them.
    pub fn find(state_dir: &Path, id: &str) -> Option<SessionFiles> {
        let id = SessionId::new(id).ok()?;
        let dir = root(state_dir).join(id.as_str());
        let files = SessionFiles { id, dir };
        (files.identity().is_file() && files.known_hosts().is_file()).then_some(files)
    }

    /// The session this machine has for the mount at `mountpoint`, with its place.
    pub fn for_mountpoint(state_dir: &Path, mountpoint: &Path) -> Result<Option<(SessionFiles, Place)>> {
        let parent = root(state_dir);
        let entries = match fs::read_dir(&parent) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", parent.display())),
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Some(files) = SessionFiles::find(state_dir, &name) else { continue };
            if let Some((place, mp)) = files.place() {
                if mp == mountpoint {
                    return Ok(Some((files, place)));
                }
            }
        }
        Ok(None)
    }

    pub fn identity(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    fn pin(&self, target: &Target, host_public: &str) -> Result<()> {
        write_private(&self.known_hosts(), &format!("[{}]:{} {host_public}\n", target.host, target.port))
    }

    /// The pinned host key, `ssh-ed25519 AAAA...`, from the line [`SessionFiles::pin`] wrote.
    fn host_public_key(&self) -> Result<String> {
        let path = self.known_hosts();
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = text.lines().find_map(|line| line.split_once(' ')).map(|(_, key)| key.trim());
        key.filter(|key| !key.is_empty()).map(str::to_owned).with_context(|| {
            format!(
                "{} holds no host key; `devmount down` ends the session, and `devmount up` starts one with new keys",
                path.display()
            )
        })
    }

    /// How OpenSSH clients reach the session's server through the session: as the session
    /// does, to the port the dev container's server listens on in the pod.
    pub fn ssh_access(&self) -> Result<SshAccess> {
        Ok(SshAccess {
            port: DEFAULT_SERVER_PORT,
            user: SSH_USER.to_owned(),
            identity: self.identity(),
            host_key: self.host_public_key()?,
            dir: self.dir.clone(),
        })
    }

    /// Records where the session works and where it is mounted.
    pub fn record(&self, place: &Place, mountpoint: &Path) -> Result<()> {
        let path = self.dir.join("place");
        let temp = self.dir.join("place.new");
        fs::write(&temp, place.encode(mountpoint))
            .and_then(|()| fs::rename(&temp, &path))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Where the session works and is mounted, as [`SessionFiles::record`] wrote it.
    pub fn place(&self) -> Option<(Place, PathBuf)> {
        Place::decode(&fs::read_to_string(self.dir.join("place")).ok()?)
    }

    /// Forgets the session (after the restore).
    pub fn remove(self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Checks a place read from the cluster against the one a resumed session recorded.
pub fn check_same(recorded: &Place, found: &Place) -> Result<()> {
    if recorded != found {
        bail!(
            "this machine's session {} worked in {}, the cluster now says {}; `devmount down` restores the Deployment, then `devmount up` starts afresh",
            recorded.deployment,
            recorded.journal_key(),
            found.journal_key()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Place {
        Place {
            context: "kind-dev".into(),
            namespace: "shop".into(),
            deployment: "web".into(),
            container: "app".into(),
            workdir: "/srv/app".into(),
        }
    }

    #[test]
    fn journal_key_names_every_coordinate() {
        assert_eq!(place().journal_key(), "kube:kind-dev/shop/web/app//srv/app");
        let target = place().target();
        assert_eq!((target.host.as_str(), target.port), ("web.shop", DEFAULT_SERVER_PORT));
        assert_eq!(&target.path[..], b"/srv/app");
    }

    #[test]
    fn files_round_trip() {
        let state = tempfile::tempdir().unwrap();
        let (files, keys) = SessionFiles::create(state.path(), &place().target()).unwrap();
        assert!(keys.authorized_key.starts_with("ssh-ed25519 "));
        assert!(keys.host_key.contains("OPENSSH PRIVATE KEY"));
        let pinned = std::fs::read_to_string(files.known_hosts()).unwrap();
        assert!(pinned.starts_with(&format!("[web.shop]:{DEFAULT_SERVER_PORT} ssh-ed25519 ")), "{pinned}");
        let mnt = Path::new("/home/me/mnt");
        files.record(&place(), mnt).unwrap();
        let found = SessionFiles::find(state.path(), files.id.as_str()).unwrap();
        assert_eq!(found.place(), Some((place(), mnt.to_owned())));
        let access = found.ssh_access().unwrap();
        assert_eq!((access.port, access.user.as_str()), (DEFAULT_SERVER_PORT, SSH_USER));
        assert_eq!((access.identity, access.dir), (files.identity(), files.dir.clone()));
        assert!(pinned.ends_with(&format!(" {}\n", access.host_key)), "{pinned} {}", access.host_key);
        assert!(access.host_key.starts_with("ssh-ed25519 AAAA"), "{}", access.host_key);
        let (by_mount, recorded) = SessionFiles::for_mountpoint(state.path(), mnt).unwrap().unwrap();
        assert_eq!((by_mount.id, recorded), (files.id.clone(), place()));
        assert!(SessionFiles::for_mountpoint(state.path(), Path::new("/other")).unwrap().is_none());
        assert!(SessionFiles::find(state.path(), "Not-An-Id").is_none());
        found.remove().unwrap();
        assert!(SessionFiles::find(state.path(), files.id.as_str()).is_none());
    }

    #[test]
    fn a_moved_session_is_refused() {
        let mut other = place();
        other.container = "sidecar".into();
        assert!(check_same(&place(), &place()).is_ok());
        let message = check_same(&place(), &other).unwrap_err().to_string();
        assert!(message.contains("kube:kind-dev/shop/web/sidecar//srv/app"), "{message}");
    }
}
