//! Host key loading and client key authorization.
//!
//! There is never a built-in key: the host key comes from a file (generated on first use, owner
//! only) or from an environment variable that a Kubernetes Secret fills.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{AuthorizedKeys, LineEnding};
use russh::keys::{HashAlg, PrivateKey, PublicKey};

/// Loads the host key from `path`, generating an ed25519 key there (mode 0600) if the file does
/// not exist. A file of ours that group or others can read is refused: the key would no longer
/// prove who the server is.
pub fn host_key_from_file(path: &Path) -> Result<PrivateKey> {
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if meta.uid() == euid && meta.mode() & 0o077 != 0 {
                bail!(
                    "host key {} is readable by group or others (mode {:o}); fix it with `chmod 600 {}`",
                    path.display(),
                    meta.mode() & 0o777,
                    path.display()
                );
            }
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read host key {}", path.display()))?;
            PrivateKey::from_openssh(text.trim_start()).with_context(|| {
                format!("host key {} is not an OpenSSH private key", path.display())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate_host_key(path),
        Err(e) => Err(e).with_context(|| format!("cannot read host key {}", path.display())),
    }
}

fn generate_host_key(path: &Path) -> Result<PrivateKey> {
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&random_seed()?));
    let text = key.to_openssh(LineEnding::LF).context("cannot encode the new host key")?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create host key {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write host key {}", path.display()))?;
    Ok(key)
}

fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("cannot read /dev/urandom to generate a host key")?;
    Ok(seed)
}

/// Loads the host key from the environment variable `var` and removes the variable, so no
/// child process (exec, shells) ever sees it. Must run before any thread starts: changing the
/// environment is only sound while the process is single-threaded.
pub fn host_key_from_env(var: &str) -> Result<PrivateKey> {
    let text = std::env::var(var).with_context(|| {
        format!("environment variable {var} is not set; pass the host key there or use --host-key FILE")
    })?;
    std::env::remove_var(var);
    PrivateKey::from_openssh(text.trim_start())
        .with_context(|| format!("environment variable {var} does not hold an OpenSSH private key"))
}

/// The OpenSSH-style fingerprint, `SHA256:<base64>`.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Whether `key` is listed in the authorized_keys file at `path`. The file is read on every
/// attempt (as sshd does), so keys can be added or revoked while the server runs. Entries with
/// options (`command=`, `from=`, `restrict` ...) are skipped with a warning: we do not enforce
/// them, and silently ignoring a restriction would grant more than the line says.
pub fn is_authorized(path: &Path, key: &PublicKey) -> Result<bool> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read authorized keys {}", path.display()))?;
    for entry in AuthorizedKeys::new(&text) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!("skipping unparsable line in {}: {e}", path.display());
                continue;
            }
        };
        if entry.public_key().key_data() != key.key_data() {
            continue;
        }
        if !entry.config_opts().is_empty() {
            tracing::warn!(
                "key {} in {} has options ({}), which devmount-server does not enforce; skipping it",
                fingerprint(key),
                path.display(),
                entry.config_opts().as_str()
            );
            continue;
        }
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_then_reloads_owner_only_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_key");
        let made = host_key_from_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let loaded = host_key_from_file(&path).unwrap();
        assert_eq!(fingerprint(made.public_key()), fingerprint(loaded.public_key()));
        assert!(fingerprint(made.public_key()).starts_with("SHA256:"));
    }

    #[test]
    fn refuses_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_key");
        host_key_from_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = host_key_from_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn authorized_keys_matches_and_skips_options() {
        let dir = tempfile::tempdir().unwrap();
        let a = PrivateKey::from(Ed25519Keypair::from_seed(&[1; 32]));
        let b = PrivateKey::from(Ed25519Keypair::from_seed(&[2; 32]));
        let c = PrivateKey::from(Ed25519Keypair::from_seed(&[3; 32]));
        let path = dir.path().join("authorized_keys");
        let text = format!(
            "# team keys\n\n{} alice@laptop\ncommand=\"true\" {}\nnot a key\n",
            a.public_key().to_openssh().unwrap(),
            b.public_key().to_openssh().unwrap()
        );
        fs::write(&path, text).unwrap();
        assert!(is_authorized(&path, a.public_key()).unwrap());
        assert!(!is_authorized(&path, b.public_key()).unwrap());
        assert!(!is_authorized(&path, c.public_key()).unwrap());
    }
}
