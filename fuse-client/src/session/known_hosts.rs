//! The server's host key against a known_hosts file: plain `HOST` / `[HOST]:PORT` entries and
//! hashed `|1|salt|hash` entries, as OpenSSH writes them. Matching a line to the host is
//! russh's (`known_host_keys_path`); the verdict over all matching lines is ours, as OpenSSH
//! decides it: any line with the offered key accepts it, even when another line holds an older
//! key of the same type (key rotation).

use std::path::Path;

use russh::keys::known_hosts::known_host_keys_path;
use russh::keys::{Algorithm, HashAlg, PublicKey};

use super::SessionError;

/// The name a known_hosts line gives the host: `HOST` for port 22, else `[HOST]:PORT`.
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The OpenSSH-style fingerprint, `SHA256:<base64>`.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Accepts `key` for `host`:`port` if `file` lists it for that host; otherwise says whether the
/// host is unknown or known with another key.
pub fn verify(host: &str, port: u16, key: &PublicKey, file: &Path) -> Result<(), SessionError> {
    let known = known_keys(host, port, file)?;
    if known.iter().any(|(_, k)| k.key_data() == key.key_data()) {
        return Ok(());
    }
    let host = host_pattern(host, port);
    let fingerprint = fingerprint(key);
    match known.iter().find(|(_, k)| same_type(&k.algorithm(), &key.algorithm())) {
        Some((line, _)) => {
            Err(SessionError::HostKeyMismatch { host, fingerprint, file: file.to_owned(), line: *line })
        }
        None => Err(SessionError::HostKeyUnknown { host, fingerprint, file: file.to_owned() }),
    }
}

/// The algorithms of the keys `file` lists for the host, so the handshake can ask the server
/// for one of those first (a server usually has several host keys).
pub fn known_algorithms(host: &str, port: u16, file: &Path) -> Result<Vec<Algorithm>, SessionError> {
    Ok(known_keys(host, port, file)?.into_iter().map(|(_, k)| k.algorithm()).collect())
}

/// RSA keys are one type whatever hash signs with them.
pub fn same_type(a: &Algorithm, b: &Algorithm) -> bool {
    a == b || matches!((a, b), (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }))
}

fn known_keys(host: &str, port: u16, file: &Path) -> Result<Vec<(usize, PublicKey)>, SessionError> {
    let fail = |reason: String| SessionError::KnownHosts { file: file.to_owned(), reason };
    // russh reads a file it cannot open as empty, which would report every host as unknown.
    std::fs::File::open(file).map_err(|e| fail(format!("cannot be read: {e}")))?;
    known_host_keys_path(host, port, file)
        .map_err(|e| fail(format!("has an unparsable line for this host: {e}")))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Made with ssh-keygen; `HASHED` is `ssh-keygen -H` of the plain lines for
    /// `[127.0.0.1]:2222` and `example.com`, both with `KEY_A`.
    const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC5EjxQVv4ewMDDCYIaz6Z+B4CEzn9be42sjiuL/Kx9M";
    const FP_A: &str = "SHA256:PEvZxgNevHKRun98gDJ1sBI2KlaGnMDRf7m+YZBegK4";
    const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL5cl6WbSbboNWTS+zszEL047rQpALGOOgA3gwhH1Mp4";
    const FP_B: &str = "SHA256:VXLhtOeW616uLfqDf/hioZT9msBgYdgyuw5B18dH6e4";
    const KEY_RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDqJ/PaEO43DlgOpXmqZuejwM34LiGpQyknC6dhtEJl/55b/eyWZvR0nV51hh/3qr5wmcElJanziunnn9cSQjWDN/7RWRk+ejQ3drjU4N0ckCoER9dhtD07ca15UxURhTBZFMCmlkGaGMh39sFtlN7+fXja6JxvusXVPIbPJGq3HQ==";
    const HASHED: &str = "\
|1|SsO8DGD9NnPNajgwIA9jQ3aaPHk=|jz4cqRCbu9i0uX+WvaHnfe14RjE= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC5EjxQVv4ewMDDCYIaz6Z+B4CEzn9be42sjiuL/Kx9M
|1|Im1f257rMxM5d/Z/pi8jkW2D3cc=|qxUuO3HHGQSCo14GuG04Pvw5HvY= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC5EjxQVv4ewMDDCYIaz6Z+B4CEzn9be42sjiuL/Kx9M
";

    fn key(line: &str) -> PublicKey {
        PublicKey::from_openssh(line).unwrap()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn fingerprints_are_openssh_style() {
        assert_eq!(fingerprint(&key(KEY_A)), FP_A);
    }

    #[test]
    fn plain_entries_match_host_and_port() {
        let f = file(&format!("# comment\n[127.0.0.1]:2222 {KEY_A}\nexample.com {KEY_A} a comment\n"));
        verify("127.0.0.1", 2222, &key(KEY_A), f.path()).unwrap();
        verify("example.com", 22, &key(KEY_A), f.path()).unwrap();
        // The port is part of the name: the same host on another port is another host.
        assert!(matches!(
            verify("127.0.0.1", 22, &key(KEY_A), f.path()),
            Err(SessionError::HostKeyUnknown { .. })
        ));
        assert!(matches!(
            verify("example.com", 2200, &key(KEY_A), f.path()),
            Err(SessionError::HostKeyUnknown { .. })
        ));
    }

    #[test]
    fn hashed_entries_match() {
        let f = file(HASHED);
        verify("127.0.0.1", 2222, &key(KEY_A), f.path()).unwrap();
        verify("example.com", 22, &key(KEY_A), f.path()).unwrap();
        assert!(matches!(
            verify("127.0.0.1", 2223, &key(KEY_A), f.path()),
            Err(SessionError::HostKeyUnknown { .. })
        ));
        let e = verify("127.0.0.1", 2222, &key(KEY_B), f.path()).unwrap_err();
        assert!(matches!(e, SessionError::HostKeyMismatch { line: 1, .. }), "{e}");
    }

    #[test]
    fn a_different_key_is_a_mismatch_naming_line_file_and_fingerprint() {
        let f = file(&format!("other {KEY_B}\n[127.0.0.1]:2222 {KEY_A}\n"));
        let e = verify("127.0.0.1", 2222, &key(KEY_B), f.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SessionError::HostKeyMismatch { line: 2, .. }), "{msg}");
        assert!(msg.contains(FP_B), "{msg}");
        assert!(msg.contains("[127.0.0.1]:2222"), "{msg}");
        assert!(msg.contains(&format!("{} line 2", f.path().display())), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn an_unknown_host_names_the_fingerprint_and_file() {
        let f = file(&format!("example.com {KEY_A}\n"));
        let e = verify("127.0.0.1", 2222, &key(KEY_B), f.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SessionError::HostKeyUnknown { .. }), "{msg}");
        assert!(msg.contains(FP_B) && msg.contains(&f.path().display().to_string()), "{msg}");
    }

    #[test]
    fn any_matching_line_accepts() {
        let f = file(&format!("[h]:2 {KEY_B}\n[h]:2 {KEY_A}\n"));
        verify("h", 2, &key(KEY_A), f.path()).unwrap();
        verify("h", 2, &key(KEY_B), f.path()).unwrap();
    }

    #[test]
    fn a_key_of_another_type_leaves_the_host_unknown() {
        let f = file(&format!("[h]:2 {KEY_RSA}\n"));
        assert!(matches!(verify("h", 2, &key(KEY_A), f.path()), Err(SessionError::HostKeyUnknown { .. })));
        assert!(matches!(known_algorithms("h", 2, f.path()).unwrap()[..], [Algorithm::Rsa { .. }]));
        assert!(known_algorithms("h", 3, f.path()).unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_file_is_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("known_hosts");
        let e = verify("h", 2, &key(KEY_A), &missing).unwrap_err();
        assert!(matches!(e, SessionError::KnownHosts { .. }), "{e}");
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }
}
