//! The current user's entry in `/etc/passwd`, read without NSS.
//!
//! The pod build is static, so `getpwuid` is not available (or lies); the file is parsed here.
//! Fields are kept as bytes: names, home directories and shells are paths, not text.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The shell used when the user has no entry or the entry names no shell.
pub const FALLBACK_SHELL: &str = "/bin/sh";

/// One line of `/etc/passwd`: `name:password:uid:gid:gecos:home:shell`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: OsString,
    pub uid: u32,
    pub gid: u32,
    /// `None` when the field is empty.
    pub home: Option<PathBuf>,
    /// `None` when the field is empty or missing (a 6-field line).
    pub shell: Option<PathBuf>,
}

impl PasswdEntry {
    /// The login shell, or [`FALLBACK_SHELL`].
    pub fn shell_or_default(&self) -> &Path {
        self.shell.as_deref().unwrap_or(Path::new(FALLBACK_SHELL))
    }
}

/// The well-formed entries of a passwd file; comments, blank and malformed lines are skipped.
pub fn parse(content: &[u8]) -> impl Iterator<Item = PasswdEntry> + '_ {
    content.split(|&b| b == b'\n').filter_map(parse_line)
}

fn parse_line(line: &[u8]) -> Option<PasswdEntry> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() || line.starts_with(b"#") {
        return None;
    }
    let mut fields = line.split(|&b| b == b':');
    let name = fields.next().filter(|n| !n.is_empty())?;
    let _password = fields.next()?;
    let uid = parse_id(fields.next()?)?;
    let gid = parse_id(fields.next()?)?;
    let _gecos = fields.next()?;
    let home = fields.next()?;
    let shell = fields.next().unwrap_or_default();
    Some(PasswdEntry {
        name: OsStr::from_bytes(name).to_owned(),
        uid,
        gid,
        home: non_empty_path(home),
        shell: non_empty_path(shell),
    })
}

fn parse_id(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn non_empty_path(field: &[u8]) -> Option<PathBuf> {
    (!field.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(field)))
}

/// The first entry for `uid`, as `getpwuid` would pick it.
pub fn lookup_uid(content: &[u8], uid: u32) -> Option<PasswdEntry> {
    parse(content).find(|e| e.uid == uid)
}

/// The entry of the user this process runs as, from `/etc/passwd`; `None` when the file is
/// unreadable or has no entry for the uid (common for arbitrary uids in OpenShift-style pods).
pub fn current_user() -> Option<PasswdEntry> {
    let content = match std::fs::read("/etc/passwd") {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("cannot read /etc/passwd: {e}");
            return None;
        }
    };
    lookup_uid(&content, nix::unistd::getuid().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(content: &str, uid: u32, expected: Option<(&str, Option<&str>, &str)>) {
        let got = lookup_uid(content.as_bytes(), uid);
        let got = got.as_ref().map(|e| {
            (
                e.name.to_str().unwrap(),
                e.home.as_deref().map(|h| h.to_str().unwrap()),
                e.shell_or_default().to_str().unwrap(),
            )
        });
        assert_eq!(got, expected, "uid {uid} in {content:?}");
    }

    #[test]
    fn finds_entry_by_uid() {
        let file = "root:x:0:0:root:/root:/bin/bash\n\
                    dev:x:1000:1000:Dev User,,,:/home/dev:/usr/bin/zsh\n";
        check(file, 1000, Some(("dev", Some("/home/dev"), "/usr/bin/zsh")));
        check(file, 0, Some(("root", Some("/root"), "/bin/bash")));
        check(file, 4242, None);
    }

    #[test]
    fn skips_comments_blank_and_malformed_lines() {
        let file = "# comment:x:1000:1000::/nope:/bin/false\n\
                    \n\
                    broken:x:notanumber:1000::/x:/bin/false\n\
                    short:x:1000\n\
                    :x:1000:1000::/noname:/bin/false\n\
                    dev:x:1000:1000::/home/dev:/bin/bash\r\n\
                    dup:x:1000:1000::/home/dup:/bin/dash";
        check(file, 1000, Some(("dev", Some("/home/dev"), "/bin/bash")));
        assert_eq!(parse(file.as_bytes()).count(), 2);
    }

    #[test]
    fn missing_or_empty_shell_falls_back() {
        check("a:x:5:5::/home/a:\n", 5, Some(("a", Some("/home/a"), FALLBACK_SHELL)));
        check("b:x:6:6:::\n", 6, Some(("b", None, FALLBACK_SHELL)));
        check("c:x:7:7::/home/c\n", 7, Some(("c", Some("/home/c"), FALLBACK_SHELL)));
    }

    #[test]
    fn non_utf8_bytes_survive() {
        let entry = parse(b"n\xff:x:9:9::/home/\xfe:/bin/sh\n").next().unwrap();
        assert_eq!(entry.name.as_bytes(), b"n\xff");
        assert_eq!(entry.home.unwrap().as_os_str().as_bytes(), b"/home/\xfe");
    }
}
