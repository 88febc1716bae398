//! What the client's integration tests share: keys made with `ssh-keygen`, and devmount-server
//! run in-process on a loopback listener.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devmount_server::feed::{Feed, FeedOptions};
use devmount_server::forward::AllowList;
use devmount_server::reaper::Reaper;
use devmount_server::{keys, ssh};

/// `ssh-keygen -q -C "" ARGS -f PATH`.
pub fn keygen(path: &Path, args: &[&str]) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-C", ""])
        .args(args)
        .arg("-f")
        .arg(path)
        .output()
        .expect("run ssh-keygen (install OpenSSH's client tools)");
    assert!(out.status.success(), "ssh-keygen {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The public key line of the private key at `private` (its `.pub` file).
pub fn public_line(private: &Path) -> String {
    let mut pub_path = private.as_os_str().to_owned();
    pub_path.push(".pub");
    std::fs::read_to_string(pub_path).unwrap().trim().to_owned()
}

pub fn write(path: &Path, text: &str) {
    std::fs::File::create(path).unwrap().write_all(text.as_bytes()).unwrap();
}

/// Serves `root` on `listener` from a thread of its own (with its own runtime, so it outlives
/// any test's), with the host key at `host_key`, the keys in `authorized`, and `allow`'s
/// forwards; `extra` runs on that runtime first. Returns once the server accepts connections.
pub fn spawn_server(
    listener: std::net::TcpListener,
    root: PathBuf,
    host_key: &Path,
    authorized: PathBuf,
    allow: AllowList,
    extra: impl FnOnce() + Send + 'static,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let host_key = keys::host_key_from_file(host_key).unwrap();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            use russh::server::Server as _;
            extra();
            let reaper = Reaper::start().unwrap();
            let feed = Feed::start(root.clone(), FeedOptions::default()).unwrap();
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let shared = ssh::Shared::new(root, authorized, allow, feed, reaper);
            let mut server = ssh::Server(shared);
            let running = server.run_on_socket(Arc::new(ssh::config(host_key)), &listener);
            ready_tx.send(()).unwrap();
            running.await.unwrap();
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(30)).expect("the in-process server did not start");
}
