//! The `ssh://USER@HOST:PORT/PATH` target of a mount.

use std::ffi::OsStr;
use std::fmt;
use std::net::Ipv6Addr;
use std::os::unix::ffi::OsStrExt;

use bytes::Bytes;

/// Where a mount's files live: an SSH server and an absolute path on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    /// Lowercase, as matched against known_hosts; an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
    /// Absolute, without a trailing slash (except the root itself). Bytes: the server's file
    /// names need not be UTF-8.
    pub path: Bytes,
}

/// A target that could not be parsed; the message names the problem and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("target '{arg}' {problem}; write ssh://USER@HOST:PORT/PATH, e.g. ssh://dev@127.0.0.1:2222/workspace")]
pub struct TargetError {
    /// The argument as given, for display.
    pub arg: String,
    pub problem: String,
}

const SCHEME: &[u8] = b"ssh://";

impl Target {
    /// Parses `ssh://[USER@]HOST[:PORT]/PATH`. Without a user, `default_user` is taken (the
    /// caller passes the local user name); without a port, 22. `HOST` is a name, an IPv4
    /// address or an IPv6 address in brackets. Does no I/O.
    pub fn parse(arg: &OsStr, default_user: &str) -> Result<Target, TargetError> {
        let bytes = arg.as_bytes();
        let fail = |problem: &str| TargetError {
            arg: String::from_utf8_lossy(bytes).into_owned(),
            problem: problem.to_owned(),
        };
        if bytes.len() < SCHEME.len() || !bytes[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return Err(fail("is not an ssh:// URL"));
        }
        let rest = &bytes[SCHEME.len()..];
        let slash = rest.iter().position(|&b| b == b'/').ok_or_else(|| fail("has no path after the host"))?;
        let (authority, path) = rest.split_at(slash);
        let authority =
            std::str::from_utf8(authority).map_err(|_| fail("has a user or host that is not valid UTF-8"))?;

        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, hostport)) => (Some(user), hostport),
            None => (None, authority),
        };
        let user = match user {
            Some("") => return Err(fail("has an empty user name before '@'")),
            Some(u) if u.contains(':') => {
                return Err(fail("has a password or ':' in the user name; devmount uses keys only"))
            }
            Some(u) if u.chars().any(|c| c.is_control() || c.is_whitespace()) => {
                return Err(fail("has spaces or control characters in the user name"))
            }
            Some(u) => u.to_owned(),
            None => default_user.to_owned(),
        };

        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (addr, after) = bracketed
                .split_once(']')
                .ok_or_else(|| fail("has an IPv6 address without its closing ']'"))?;
            if addr.parse::<Ipv6Addr>().is_err() {
                return Err(fail("has an invalid IPv6 address in brackets"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| fail("has text after the IPv6 address's ']'"))?),
            };
            (addr, port)
        } else {
            match hostport.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(fail("has an IPv6 address without brackets; write it as [ADDR]"))
                }
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(fail("has no host"));
        }
        if !hostport.starts_with('[')
            && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(fail("has a host name with characters other than letters, digits, '-', '.' and '_'"));
        }
        let port = match port {
            None => 22,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(fail("has a port that is not a number from 1 to 65535")),
                Ok(n) => n,
            },
        };

        if path.contains(&0) {
            return Err(fail("has a NUL byte in the path"));
        }
        let mut path = path;
        while path.len() > 1 && path.ends_with(b"/") {
            path = &path[..path.len() - 1];
        }
        Ok(Target { user, host: host.to_ascii_lowercase(), port, path: Bytes::copy_from_slice(path) })
    }

    /// `HOST:PORT`, with an IPv6 address in brackets: for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `USER@HOST:PORT/PATH` as bytes: what identifies the files a mount shows, whatever
    /// connection reaches them.
    pub fn key(&self) -> Vec<u8> {
        let mut key = format!("{}@{}", self.user, self.address()).into_bytes();
        key.extend_from_slice(&self.path);
        key
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ssh://{}@{}{}", self.user, self.address(), String::from_utf8_lossy(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn parse(s: &str) -> Result<Target, TargetError> {
        Target::parse(OsStr::new(s), "me")
    }

    fn target(user: &str, host: &str, port: u16, path: &[u8]) -> Target {
        Target { user: user.into(), host: host.into(), port, path: Bytes::copy_from_slice(path) }
    }

    #[test]
    fn full_form() {
        assert_eq!(
            parse("ssh://dev@127.0.0.1:2222/workspace").unwrap(),
            target("dev", "127.0.0.1", 2222, b"/workspace")
        );
    }

    #[test]
    fn defaults_user_and_port() {
        assert_eq!(
            parse("ssh://Example.COM/srv/app/").unwrap(),
            target("me", "example.com", 22, b"/srv/app")
        );
        assert_eq!(parse("ssh://h/").unwrap(), target("me", "h", 22, b"/"));
        assert_eq!(parse("SSH://u@h:1///").unwrap(), target("u", "h", 1, b"/"));
    }

    #[test]
    fn ipv6_in_brackets() {
        assert_eq!(parse("ssh://u@[::1]:2222/w").unwrap(), target("u", "::1", 2222, b"/w"));
        assert_eq!(parse("ssh://[FE80::1]/w").unwrap(), target("me", "fe80::1", 22, b"/w"));
        let t = parse("ssh://u@[::1]:2222/w").unwrap();
        assert_eq!(t.address(), "[::1]:2222");
        assert_eq!(t.to_string(), "ssh://u@[::1]:2222/w");
    }

    #[test]
    fn path_bytes_are_kept() {
        let mut arg = b"ssh://u@h:2/d\xff/e".to_vec();
        let t = Target::parse(&OsString::from_vec(arg.clone()), "me").unwrap();
        assert_eq!(&t.path[..], b"/d\xff/e");
        arg.drain(..6);
        assert_eq!(t.key(), arg);
    }

    #[test]
    fn key_names_user_host_port_and_path() {
        assert_eq!(parse("ssh://h/p").unwrap().key(), b"me@h:22/p");
    }

    #[test]
    fn errors_name_the_problem_and_the_form() {
        let cases = [
            ("x", "is not an ssh:// URL"),
            ("http://h/p", "is not an ssh:// URL"),
            ("ssh://h", "has no path"),
            ("ssh://@h/p", "empty user"),
            ("ssh://u:pw@h/p", "password"),
            ("ssh://u@/p", "has no host"),
            ("ssh://u@:22/p", "has no host"),
            ("ssh://u@h:/p", "port"),
            ("ssh://u@h:0/p", "port"),
            ("ssh://u@h:65536/p", "port"),
            ("ssh://u@h:x/p", "port"),
            ("ssh://u@::1/p", "without brackets"),
            ("ssh://u@[::1/p", "closing"),
            ("ssh://u@[nope]/p", "invalid IPv6"),
            ("ssh://u@[::1]x/p", "after the IPv6"),
            ("ssh://u@h h/p", "host name"),
            ("ssh://u u@h/p", "spaces"),
        ];
        for (arg, problem) in cases {
            let e = parse(arg).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(problem), "{arg}: {msg}");
            assert!(msg.starts_with(&format!("target '{arg}' ")), "{msg}");
            assert!(msg.contains("write ssh://USER@HOST:PORT/PATH"), "{msg}");
            assert!(!msg.contains('\n'));
        }
        let nul = Target::parse(&OsString::from_vec(b"ssh://h/a\0b".to_vec()), "me").unwrap_err();
        assert!(nul.problem.contains("NUL"));
    }
}
