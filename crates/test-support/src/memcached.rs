//! A throw-away Debian `memcached` on its own loopback address.

use crate::process::{free_port, unique_loopback_ip, ChildGuard};
use std::process::Command;
use std::time::Duration;

pub struct Memcached {
    pub ip: String,
    pub port: u16,
    guard: ChildGuard,
}

impl Memcached {
    /// Starts memcached with `memlimit_mb` and waits (bounded) until it accepts connections.
    pub fn start(memlimit_mb: u32) -> anyhow::Result<Self> {
        let ip = unique_loopback_ip();
        let port = free_port(&ip);
        let mut cmd = Command::new("memcached");
        cmd.args([
            "-u",
            "root",
            "-U",
            "0",
            "-l",
            &ip,
            "-p",
            &port.to_string(),
            "-m",
            &memlimit_mb.to_string(),
            "-c",
            "1024",
            "-t",
            "2",
        ]);
        let log = std::env::temp_dir().join(format!("arcus-test-memcached-{ip}-{port}.log"));
        let guard = ChildGuard::spawn("memcached", cmd, &log)?;
        let addr = format!("{ip}:{port}");
        crate::wait::wait_until_blocking(
            Duration::from_secs(10),
            &format!("memcached at {addr} to accept"),
            || std::net::TcpStream::connect(&addr).is_ok(),
        )?;
        Ok(Self { ip, port, guard })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// SIGSTOP: the process keeps its socket but stops answering (for timeout tests). Returns
    /// once every thread is stopped: the signal is delivered asynchronously, and a thread still
    /// running could answer one more request.
    pub fn freeze(&self) {
        self.guard.signal(19);
        let tasks = format!("/proc/{}/task", self.guard.pid());
        let all_stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|rd| {
                rd.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                        st.rsplit(')')
                            .next()
                            .and_then(|r| r.split_whitespace().next())
                            == Some("T")
                    })
                })
            })
        };
        let _ = crate::wait::wait_until_blocking(
            std::time::Duration::from_secs(5),
            "memcached stopped",
            all_stopped,
        );
    }

    pub fn thaw(&self) {
        self.guard.signal(18);
    }
}
