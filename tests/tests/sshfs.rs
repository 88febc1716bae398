//! sshfs mounting devmount-server, with a small git workload on the mount; the root directory
//! is checked with git itself.

use std::fs;

use anyhow::{ensure, Result};
use devmount_tests::{git, run_ok, Server};

#[test]
fn git_workload_on_an_sshfs_mount() -> Result<()> {
    let s = Server::start()?;
    let mount = s.sshfs_mount()?;
    let repo = mount.path().join("repo");

    run_ok(git(mount.path()).args(["init", "-q", "-b", "main", "repo"]))?;
    fs::create_dir(repo.join("src"))?;
    fs::write(repo.join("README"), b"devmount over sshfs\n")?;
    fs::write(repo.join("src/lib.rs"), b"pub fn answer() -> u32 { 42 }\n")?;
    run_ok(git(&repo).args(["add", "-A"]))?;
    run_ok(git(&repo).args(["commit", "-q", "-m", "first"]))?;
    let status = run_ok(git(&repo).args(["status", "--porcelain"]))?;
    ensure!(status.stdout.is_empty(), "tree not clean after commit:\n{status}");

    run_ok(git(&repo).args(["checkout", "-q", "-b", "feature"]))?;
    fs::write(repo.join("src/lib.rs"), b"pub fn answer() -> u32 { 43 }\n")?;
    fs::rename(repo.join("README"), repo.join("README.md"))?;
    run_ok(git(&repo).args(["commit", "-q", "-a", "-m", "second"]))?;
    run_ok(git(&repo).args(["add", "README.md"]))?;
    run_ok(git(&repo).args(["commit", "-q", "-m", "third"]))?;
    let log = run_ok(git(&repo).args(["log", "--format=%s"]))?;
    ensure!(log.stdout == b"third\nsecond\nfirst\n", "{log}");

    mount.unmount()?;

    // The oracle: the repository as the server's directory holds it.
    let oracle = s.root().join("repo");
    run_ok(git(&oracle).args(["fsck", "--full", "--strict", "--no-dangling"]))?;
    let log = run_ok(git(&oracle).args(["log", "--format=%s"]))?;
    ensure!(log.stdout == b"third\nsecond\nfirst\n", "{log}");
    let branch = run_ok(git(&oracle).args(["rev-parse", "--abbrev-ref", "HEAD"]))?;
    ensure!(branch.stdout == b"feature\n", "{branch}");
    let status = run_ok(git(&oracle).args(["status", "--porcelain"]))?;
    ensure!(status.stdout.is_empty(), "{status}");
    ensure!(fs::read(oracle.join("src/lib.rs"))? == b"pub fn answer() -> u32 { 43 }\n");
    run_ok(git(&oracle).args(["diff", "--quiet", "main", "feature~2"]))?;
    Ok(())
}
