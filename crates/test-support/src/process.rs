//! A child process that is stopped (SIGTERM, then SIGKILL) by PID when dropped, so a failing
//! test never leaves a server running.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` in its own process group with output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &std::path::Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Ok(Some(status)) when the process has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// Sends `signal` to the whole process group.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as i32;
        if pid > 0 {
            // SAFETY: plain syscall on a pid we own.
            unsafe { libc_kill(-pid, signal) };
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        let pid = child.id() as i32;
        unsafe { libc_kill(-pid, 15) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {pid}) ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.name
        );
        unsafe { libc_kill(-pid, 9) };
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A free TCP port on `ip`, found by binding port 0. Racy by nature; tests also use their own
/// address (a distinct 127.x IP) so two tests never pick the same ip:port.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind port 0")
}

/// A loopback address unique to this process and call, in 127.200.0.0/16, so parallel tests
/// do not share ip:port pairs.
pub fn unique_loopback_ip() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + (std::process::id() % 200) * 256;
    format!("127.200.{}.{}", (n / 250) % 250 + 1, n % 250 + 2)
}
