//! What the offline commands' tests share (`render`, `init`): the `devmount` binary run as a user
//! runs it, and golden files.

use std::path::Path;
use std::process::{Command, Output};

pub fn devmount(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devmount"))
        .args(args)
        .current_dir(dir)
        .env_remove("DEVMOUNT_LOG")
        .output()
        .expect("devmount runs")
}

/// The one-line error of a failed run.
pub fn failure(dir: &Path, args: &[&str]) -> String {
    let out = devmount(dir, args);
    assert_eq!(out.status.code(), Some(255), "{args:?}: {out:?}");
    assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
    stderr.trim_end().strip_prefix("devmount: ").unwrap_or_else(|| panic!("{stderr}")).to_owned()
}

/// Golden files: each [`Golden::check`] compares what a test made with its file (or, with
/// `DEVMOUNT_BLESS=1`, rewrites the file); [`Golden::finish`] fails naming every file that
/// differs, at its first differing line.
pub struct Golden {
    bless: bool,
    wrong: Vec<String>,
}

impl Golden {
    pub fn new() -> Golden {
        Golden { bless: std::env::var_os("DEVMOUNT_BLESS").is_some_and(|v| v == "1"), wrong: Vec::new() }
    }

    pub fn check(&mut self, path: &Path, got: &str) {
        if self.bless {
            std::fs::write(path, got).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            return;
        }
        let want = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if got == want {
            return;
        }
        let line = got.lines().zip(want.lines()).position(|(g, w)| g != w).map_or_else(
            || format!("lengths differ: {} lines, expected {}", got.lines().count(), want.lines().count()),
            |i| {
                format!(
                    "line {}: got {:?}, expected {:?}",
                    i + 1,
                    got.lines().nth(i).unwrap_or_default(),
                    want.lines().nth(i).unwrap_or_default()
                )
            },
        );
        self.wrong.push(format!("{}: {line}", path.display()));
    }

    /// `what`: what differs, for the message ("rendered YAML").
    pub fn finish(self, what: &str) {
        assert!(
            self.wrong.is_empty(),
            "{what} differs from the golden files (DEVMOUNT_BLESS=1 rewrites them):\n{}",
            self.wrong.join("\n")
        );
    }
}
