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

    /// SIGSTOP: the process keeps its socket but stops answering (for timeout tests).
    pub fn freeze(&self) {
        self.guard.signal(19);
    }

    pub fn thaw(&self) {
        self.guard.signal(18);
    }
}
