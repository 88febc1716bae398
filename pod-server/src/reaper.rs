//! The one owner of child processes.
//!
//! In a pod the server is PID 1, so every orphan in the container is re-parented to it and
//! must be reaped, which takes a `waitpid(-1)` loop. Such a loop steals the status of any
//! child that someone else waits for with `waitpid(pid)` (as `std::process::Child::wait` and
//! `tokio::process` do), so nothing else in the server may spawn or wait: every child is
//! started through [`Reaper::spawn`], which hands back an [`ExitWaiter`] that resolves with
//! that child's own status.
//!
//! Invariants:
//! - The children table is locked across `Command::spawn` and across every `waitpid` sweep,
//!   so a child that exits before `spawn` returns is registered before its status is taken.
//!   (This also protects std's own `waitpid(pid)` on a failed exec from being raced.)
//! - Statuses of unregistered children (orphans) are reaped and dropped, counted, and logged
//!   at debug level; they never reach a registered waiter.
//! - Stop and continue notifications are not asked for (`WNOHANG` only), so every status
//!   taken is final.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`; the code is 0..=255.
    Exited(i32),
    /// Killed by a signal (a raw number: real-time signals have no name in `nix`).
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// Decodes a `waitpid` status; `None` for stop/continue notifications.
    fn from_raw(status: libc::c_int) -> Option<ExitStatus> {
        if libc::WIFEXITED(status) {
            Some(ExitStatus::Exited(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(ExitStatus::Signaled {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            })
        } else {
            None
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled { signal, core_dumped } => {
                write!(f, "signal {signal}")?;
                if core_dumped {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// The reaper was dropped before the child's status arrived.
#[derive(Debug, thiserror::Error)]
#[error("the child reaper stopped before the child exited")]
pub struct ReaperStopped;

/// Resolves with the exit status of one registered child.
#[derive(Debug)]
pub struct ExitWaiter(oneshot::Receiver<ExitStatus>);

impl Future for ExitWaiter {
    type Output = Result<ExitStatus, ReaperStopped>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map_err(|_| ReaperStopped)
    }
}

/// A child started by [`Reaper::spawn`]: its pid, its exit and the pipes the `Command` asked
/// for. There is deliberately no `wait`: the status comes only through `exit`.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub exit: ExitWaiter,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// Owns `SIGCHLD` and every child's exit status. See the module docs.
#[derive(Debug)]
pub struct Reaper {
    children: Mutex<HashMap<u32, oneshot::Sender<ExitStatus>>>,
    /// Number of registered children not yet reaped, for shutdown to wait on.
    live: watch::Sender<usize>,
    orphans: AtomicU64,
}

impl Reaper {
    /// Installs the `SIGCHLD` listener and starts the reaping task on the current tokio
    /// runtime. Start it once per process, before any child is spawned.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            children: Mutex::new(HashMap::new()),
            live: watch::Sender::new(0),
            orphans: AtomicU64::new(0),
        });
        let task_reaper = Arc::clone(&reaper);
        tokio::spawn(async move {
            // Sweep first: children that exited before the listener existed sent no signal
            // that this stream will see.
            loop {
                task_reaper.sweep();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and registers the child; its status is delivered only through the
    /// returned [`ExitWaiter`]. Blocks for as long as `Command::spawn` does (fork and exec).
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Spawned> {
        let mut children = self.lock();
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let (tx, rx) = oneshot::channel();
        children.insert(pid, tx);
        self.live.send_replace(children.len());
        drop(children);
        Ok(Spawned {
            pid,
            exit: ExitWaiter(rx),
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
        })
    }

    /// Sends `signal` to every registered child's process group (exec sessions are group
    /// leaders), or to the child alone when it leads no group.
    pub fn kill_all(&self, signal: Signal) {
        let pids: Vec<u32> = self.lock().keys().copied().collect();
        for pid in pids {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            let pid = Pid::from_raw(raw);
            match killpg(pid, signal) {
                Ok(()) => {}
                Err(Errno::ESRCH) => {
                    if let Err(e) = kill(pid, signal) {
                        tracing::debug!("kill({pid}, {signal}): {e}");
                    }
                }
                Err(e) => tracing::debug!("killpg({pid}, {signal}): {e}"),
            }
        }
    }

    /// Number of registered children that have not exited yet.
    pub fn live_children(&self) -> usize {
        *self.live.borrow()
    }

    /// Resolves once no registered child is left (immediately if there is none).
    pub async fn wait_all_exited(&self) {
        let mut live = self.live.subscribe();
        // The sender lives in `self`, so the watch cannot close while this borrow exists.
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Number of statuses reaped for children nobody registered.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, oneshot::Sender<ExitStatus>>> {
        // The table holds no invariant a panicking holder could break half-way.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every status that is ready.
    fn sweep(&self) {
        let mut children = self.lock();
        loop {
            let mut raw: libc::c_int = 0;
            // SAFETY: waitpid only writes the status integer we pass.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid == 0 {
                break;
            }
            if pid < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    Errno::ECHILD => break,
                    e => {
                        tracing::warn!("waitpid(-1): {e}");
                        break;
                    }
                }
            }
            let Some(status) = ExitStatus::from_raw(raw) else {
                continue;
            };
            match children.remove(&pid.unsigned_abs()) {
                Some(tx) => {
                    self.live.send_replace(children.len());
                    // A waiter that gave up (its session ended first) is not an error.
                    let _ = tx.send(status);
                }
                None => {
                    self.orphans.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("reaped orphan {pid}: {status}");
                }
            }
        }
    }
}

/// Tests that start a [`Reaper`] must not share a process with other tests: its
/// `waitpid(-1)` would steal the statuses of their children. [`isolated_test!`] re-runs the
/// test alone in a fresh copy of the test binary.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::time::Duration;

    const ISOLATED_ENV: &str = "DEVMOUNT_ISOLATED_TEST";
    const TIME_LIMIT: Duration = Duration::from_secs(120);

    /// Runs `body` in a child process of the test binary that runs only the test `path`
    /// (a `module_path!()`-style path including the crate name).
    pub(crate) fn isolated<F: Future<Output = ()>>(path: &str, body: impl FnOnce() -> F) {
        let name = path.split_once("::").map_or(path, |(_, rest)| rest);
        if std::env::var_os(ISOLATED_ENV).is_some_and(|v| v == name) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("build runtime");
            runtime.block_on(async {
                tokio::time::timeout(TIME_LIMIT, body())
                    .await
                    .unwrap_or_else(|_| panic!("{name} did not finish in {TIME_LIMIT:?}"));
            });
            return;
        }
        let exe = std::env::current_exe().expect("current_exe");
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(ISOLATED_ENV, name)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the isolated test");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "isolated {name}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
    }

    /// `isolated_test!(name, async { ... })` defines `#[test] fn name` running the body in
    /// its own process with a tokio runtime.
    macro_rules! isolated_test {
        ($name:ident, $body:expr) => {
            #[test]
            fn $name() {
                $crate::reaper::testing::isolated(concat!(module_path!(), "::", stringify!($name)), || $body)
            }
        };
    }
    pub(crate) use isolated_test;
}

#[cfg(test)]
mod tests {
    use super::testing::isolated_test;
    use super::*;
    use std::process::Stdio;
    use std::time::Duration;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(30);

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    async fn status_of(waiter: ExitWaiter) -> ExitStatus {
        timeout(DEADLINE, waiter).await.expect("child status within the deadline").expect("reaper alive")
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    isolated_test!(many_children_each_get_their_own_status, async {
        let reaper = Reaper::start().unwrap();
        let mut waiters = Vec::new();
        for code in 0..64 {
            let spawned = reaper.spawn(&mut sh(&format!("exit {code}"))).unwrap();
            waiters.push(tokio::spawn(async move { (code, status_of(spawned.exit).await) }));
        }
        for waiter in waiters {
            let (code, status) = waiter.await.unwrap();
            assert_eq!(status, ExitStatus::Exited(code));
        }
        reaper.wait_all_exited().await;
        assert_eq!(reaper.live_children(), 0);
        assert_eq!(reaper.orphans_reaped(), 0);
    });

    isolated_test!(instant_exit_is_not_missed, async {
        let reaper = Reaper::start().unwrap();
        for _ in 0..100 {
            let spawned = reaper.spawn(&mut Command::new("/bin/true")).unwrap();
            assert_eq!(status_of(spawned.exit).await, ExitStatus::Exited(0));
        }
        // A status that arrives long before anyone polls the waiter is kept.
        let early = reaper.spawn(&mut Command::new("/bin/false")).unwrap();
        wait_until("false reaped", || reaper.live_children() == 0).await;
        assert_eq!(status_of(early.exit).await, ExitStatus::Exited(1));
    });

    isolated_test!(death_by_signal_is_reported, async {
        let reaper = Reaper::start().unwrap();
        let spawned = reaper.spawn(&mut sh("kill -TERM $$")).unwrap();
        assert_eq!(
            status_of(spawned.exit).await,
            ExitStatus::Signaled { signal: libc::SIGTERM, core_dumped: false }
        );
    });

    isolated_test!(failed_exec_is_an_error_not_a_panic, async {
        let reaper = Reaper::start().unwrap();
        let err = reaper.spawn(&mut Command::new("/nonexistent/devmount-test")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(reaper.live_children(), 0);
    });

    isolated_test!(orphans_do_not_disturb_registered_waiters, async {
        // Become the reaper of our descendants, as PID 1 is for the whole container.
        // SAFETY: plain prctl with integer arguments.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
        let reaper = Reaper::start().unwrap();

        let mut blocked = sh("read line; exit 5");
        blocked.stdin(Stdio::piped());
        let blocked = reaper.spawn(&mut blocked).unwrap();

        // The parent prints its background child's pid and exits, orphaning it.
        let mut parent = sh("sleep 100 >/dev/null & echo $!");
        parent.stdout(Stdio::piped());
        let parent = reaper.spawn(&mut parent).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut parent.stdout.unwrap(), &mut out).unwrap();
        assert_eq!(status_of(parent.exit).await, ExitStatus::Exited(0));
        let orphan: i32 = out.trim().parse().unwrap();
        kill(Pid::from_raw(orphan), Signal::SIGKILL).unwrap();
        wait_until("orphan reaped", || reaper.orphans_reaped() == 1).await;

        assert_eq!(reaper.live_children(), 1);
        drop(blocked.stdin);
        assert_eq!(status_of(blocked.exit).await, ExitStatus::Exited(5));
    });

    isolated_test!(kill_all_reaches_process_groups, async {
        use std::os::unix::process::CommandExt;
        let reaper = Reaper::start().unwrap();
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let mut cmd = sh("sleep 100; exit 0");
            cmd.process_group(0);
            waiters.push(reaper.spawn(&mut cmd).unwrap().exit);
        }
        let lone = reaper.spawn(Command::new("sleep").arg("100")).unwrap();
        waiters.push(lone.exit);
        reaper.kill_all(Signal::SIGTERM);
        for waiter in waiters {
            let status = status_of(waiter).await;
            assert_eq!(status, ExitStatus::Signaled { signal: libc::SIGTERM, core_dumped: false });
        }
        timeout(DEADLINE, reaper.wait_all_exited()).await.unwrap();
    });
}
