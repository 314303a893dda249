//! A throw-away Apache ZooKeeper (Debian's `zookeeper` package) on a loopback address.

use crate::process::{free_port, unique_loopback_ip, ChildGuard};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub struct ZkServer {
    pub ip: String,
    pub port: u16,
    pub dir: PathBuf,
    guard: Option<ChildGuard>,
}

impl ZkServer {
    /// Starts a standalone ZooKeeper and waits (bounded) until it answers `ruok`.
    pub fn start() -> anyhow::Result<Self> {
        let ip = unique_loopback_ip();
        let port = free_port(&ip);
        let dir =
            std::env::temp_dir().join(format!("arcus-test-zk-{}-{ip}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))?;
        let mut zk = Self {
            ip,
            port,
            dir,
            guard: None,
        };
        zk.spawn()?;
        Ok(zk)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let cfg = format!(
            "tickTime=500\nminSessionTimeout=1000\nmaxSessionTimeout=60000\ninitLimit=10\nsyncLimit=5\n\
             dataDir={}\nclientPort={}\nclientPortAddress={}\nadmin.enableServer=false\n\
             4lw.commands.whitelist=*\n",
            self.dir.join("data").display(),
            self.port,
            self.ip
        );
        std::fs::write(self.dir.join("zoo.cfg"), cfg)?;
        std::fs::write(self.dir.join("log4j.properties"), "log4j.rootLogger=WARN, C\nlog4j.appender.C=org.apache.log4j.ConsoleAppender\nlog4j.appender.C.layout=org.apache.log4j.PatternLayout\n")?;
        let mut cmd = Command::new("java");
        cmd.arg("-Xmx256m")
            .arg("-cp")
            .arg(format!("{}:{}", self.dir.display(), zk_classpath()))
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(self.dir.join("zoo.cfg"));
        self.guard = Some(ChildGuard::spawn(
            "zookeeper",
            cmd,
            &self.dir.join("zk.log"),
        )?);
        let addr = self.addr();
        crate::wait::wait_until_blocking(
            Duration::from_secs(60),
            &format!("ZooKeeper at {addr} to answer ruok"),
            || ruok(&addr),
        )
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// Stops the server, keeping its data directory.
    pub fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.stop(Duration::from_secs(10));
        }
    }

    /// Restarts it on the same address with the same data (sessions survive if quick enough).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian's ZooKeeper jar; its manifest's Class-Path names the dependencies.
pub fn zk_classpath() -> String {
    "/usr/share/java/zookeeper.jar".to_string()
}

/// True when the server at `addr` answers the `ruok` four-letter word with `imok`.
pub fn ruok(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(sock_addr) = addr.parse() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sock_addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"ruok").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"imok"
}
