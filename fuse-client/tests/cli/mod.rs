//! The `devmount` binary as a user runs it, for the offline commands' tests (`render`, `init`).

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
