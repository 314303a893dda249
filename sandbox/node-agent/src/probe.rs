//! Probes (exec, tcpSocket, httpGet) and Kubernetes' threshold rules, plus lifecycle handlers
//! (preStop), which use the same actions.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerPort, ExecAction, HTTPGetAction, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and how a container's probes run (kept in the container's run file for adoption).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub pod_ip: String,
    pub env: Vec<(String, String)>,
    pub ports: Vec<ContainerPort>,
    pub working_dir: String,
    /// The container's main process: exec probes enter its mount and UTS namespaces.
    pub pid: Option<u32>,
    /// The pod's network namespace: exec probes and hooks run in it (`None`: the host's).
    pub netns: Option<std::path::PathBuf>,
    /// Exec probes and hooks run as the container's user (`None`: the agent's).
    pub user: Option<crate::users::Credentials>,
    pub no_new_privs: bool,
}

/// Probe settings with Kubernetes' defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Settings {
    pub fn of(p: &Probe) -> Self {
        let secs =
            |v: Option<i32>, d: i32, min: i32| Duration::from_secs(v.unwrap_or(d).max(min) as u64);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// Consecutive-result counting: the result flips after `success_threshold` successes or
/// `failure_threshold` failures in a row (kubelet's worker.go).
#[derive(Debug, Clone)]
pub struct Tracker {
    settings: Settings,
    last: Option<bool>,
    run: u32,
    pub result: Option<bool>,
}

impl Tracker {
    pub fn new(settings: Settings, initial: Option<bool>) -> Self {
        Self {
            settings,
            last: None,
            run: 0,
            result: initial,
        }
    }

    /// Records one probe outcome; returns the new result when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let threshold = if ok {
            self.settings.success_threshold
        } else {
            self.settings.failure_threshold
        };
        if self.run >= threshold && self.result != Some(ok) {
            self.result = Some(ok);
            return Some(ok);
        }
        None
    }
}

fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("named port {name:?} not found in the container's ports"))
        }
    }
}

/// Runs a command with the container's env, in the pod's network namespace, and in the
/// container's mount and UTS namespaces when it still runs.
pub async fn exec(action: &ExecAction, t: &Target, timeout: Duration) -> Result<(), String> {
    let argv = action.command.clone().unwrap_or_default();
    let Some((program, args)) = argv.split_first() else {
        return Err("exec: empty command".into());
    };
    let env_map: BTreeMap<_, _> = t.env.iter().cloned().collect();
    let args = crate::env::expand_all(args, &env_map);
    let program = crate::env::expand(program, &|n| env_map.get(n).cloned());
    let ns = t
        .pid
        .and_then(|pid| std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok());
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    let uts = t
        .pid
        .and_then(|pid| std::fs::File::open(format!("/proc/{pid}/ns/uts")).ok());
    let uts_fd = uts.as_ref().map(|f| f.as_raw_fd());
    // Unlike the others, the network namespace is required: run on the host's network, a probe
    // would test something else.
    let net = match &t.netns {
        Some(p) => Some(std::fs::File::open(p).map_err(|e| {
            format!(
                "exec: opening the pod's network namespace {}: {e}",
                p.display()
            )
        })?),
        None => None,
    };
    let net_fd = net.as_ref().map(|f| f.as_raw_fd());
    let cwd = std::ffi::CString::new(t.working_dir.clone()).map_err(|e| e.to_string())?;
    let user = t.user.clone();
    let no_new_privs = t.no_new_privs;
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .envs(t.env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = net_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = uts_fd {
                libc::setns(fd, libc::CLONE_NEWUTS);
            }
            if let Some(fd) = ns_fd {
                // Best effort: if the container is gone, the host's namespace will do.
                libc::setns(fd, libc::CLONE_NEWNS);
            }
            libc::chdir(cwd.as_ptr());
            if let Some(u) = &user {
                if libc::setgroups(u.groups.len(), u.groups.as_ptr()) != 0
                    || libc::setgid(u.gid) != 0
                    || libc::setuid(u.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("exec {program:?}: {e}"))?;
    let pid = child.id();
    drop((ns, uts, net));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).to_string();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let text: String = text.trim().chars().take(200).collect();
            Err(format!(
                "command {argv:?} exited with {}: {text}",
                out.status
            ))
        }
        Ok(Err(e)) => Err(format!("exec {program:?}: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                crate::runtime::signal_group(pid, libc::SIGKILL);
            }
            Err(format!("command {argv:?} timed out after {timeout:?}"))
        }
    }
}

pub async fn tcp(action: &TCPSocketAction, t: &Target, timeout: Duration) -> Result<(), String> {
    let port = resolve_port(&action.port, &t.ports)?;
    let host = action
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| t.pod_ip.clone());
    match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
        Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
    }
}

/// Parses the status code of an HTTP/1.x response's status line.
pub fn parse_status_line(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

pub async fn http(action: &HTTPGetAction, t: &Target, timeout: Duration) -> Result<(), String> {
    let port = resolve_port(&action.port, &t.ports)?;
    let host = action
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| t.pod_ip.clone());
    if action
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
    {
        return Err("HTTPS probes are not supported by the sandbox agent".into());
    }
    let path = action
        .path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let mut headers = String::new();
    let mut has_host = false;
    for h in action.http_headers.iter().flatten() {
        has_host |= h.name.eq_ignore_ascii_case("host");
        headers.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    if !has_host {
        headers.push_str(&format!("Host: {host}:{port}\r\n"));
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\n{headers}User-Agent: kube-probe/1.20\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let attempt = async {
        let mut stream = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("Get \"http://{host}:{port}{path}\": dial tcp: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&buf);
        let code =
            parse_status_line(&head).ok_or_else(|| format!("malformed HTTP response {head:?}"))?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "Get \"http://{host}:{port}{path}\": context deadline exceeded"
        )),
    }
}

/// One probe run.
pub async fn run_once(p: &Probe, t: &Target) -> Result<(), String> {
    let timeout = Settings::of(p).timeout;
    if let Some(a) = &p.exec {
        exec(a, t, timeout).await
    } else if let Some(a) = &p.tcp_socket {
        tcp(a, t, timeout).await
    } else if let Some(a) = &p.http_get {
        http(a, t, timeout).await
    } else {
        Err("probe has no supported action (exec, tcpSocket, httpGet)".into())
    }
}

/// A lifecycle handler (preStop), bounded by `timeout`.
pub async fn run_handler(
    h: &k8s_openapi::api::core::v1::LifecycleHandler,
    t: &Target,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(a) = &h.exec {
        exec(a, t, timeout).await
    } else if let Some(a) = &h.http_get {
        http(a, t, timeout).await
    } else if let Some(a) = &h.tcp_socket {
        tcp(a, t, timeout).await
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(s: u32, f: u32) -> Settings {
        Settings {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: s,
            failure_threshold: f,
        }
    }

    #[test]
    fn defaults() {
        let s = Settings::of(&Probe::default());
        assert_eq!(s, settings(1, 3).with_period(10));
    }

    impl Settings {
        fn with_period(mut self, secs: u64) -> Self {
            self.period = Duration::from_secs(secs);
            self
        }
    }

    #[test]
    fn thresholds() {
        let mut t = Tracker::new(settings(2, 3), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failure run");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(false), None, "no repeated transition");
        let mut live = Tracker::new(settings(1, 1), Some(true));
        assert_eq!(live.record(true), None);
        assert_eq!(live.record(false), Some(false));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line("HTTP/1.0 500\r\n"), Some(500));
        assert_eq!(parse_status_line("SSH-2.0\r\n"), None);
    }

    #[test]
    fn named_ports() {
        let ports = vec![ContainerPort {
            name: Some("memcached".into()),
            container_port: 11211,
            ..Default::default()
        }];
        assert_eq!(
            resolve_port(&IntOrString::String("memcached".into()), &ports),
            Ok(11211)
        );
        assert_eq!(resolve_port(&IntOrString::Int(80), &ports), Ok(80));
        assert!(resolve_port(&IntOrString::String("x".into()), &ports).is_err());
    }

    fn target() -> Target {
        Target {
            pod_ip: "127.0.0.1".into(),
            env: vec![
                ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
                ("X".into(), "1".into()),
            ],
            ports: vec![],
            working_dir: "/".into(),
            pid: None,
            netns: None,
            user: None,
            no_new_privs: false,
        }
    }

    #[tokio::test]
    async fn exec_probe_uses_env_and_timeout() {
        let ok = ExecAction {
            command: Some(vec!["sh".into(), "-c".into(), "test \"$X\" = 1".into()]),
        };
        assert_eq!(exec(&ok, &target(), Duration::from_secs(5)).await, Ok(()));
        let bad = ExecAction {
            command: Some(vec!["false".into()]),
        };
        assert!(exec(&bad, &target(), Duration::from_secs(5)).await.is_err());
        let slow = ExecAction {
            command: Some(vec!["sleep".into(), "5".into()]),
        };
        let err = exec(&slow, &target(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }

    /// Root only (skips otherwise): an exec probe runs in the pod's network namespace.
    #[tokio::test]
    async fn exec_probe_runs_in_the_pods_netns() {
        let Some(ns) = crate::netns::scratch_netns("pr") else {
            return;
        };
        let mut t = target();
        t.netns = Some(std::path::PathBuf::from("/run/netns").join(&ns));
        // A fresh namespace has only lo (the host has more links).
        let only_lo = ExecAction {
            command: Some(vec![
                "sh".into(),
                "-c".into(),
                "test \"$(ip -o link show | wc -l)\" = 1".into(),
            ]),
        };
        let in_ns = exec(&only_lo, &t, Duration::from_secs(5)).await;
        t.netns = Some("/run/netns/arcust-none".into());
        let missing = exec(&only_lo, &t, Duration::from_secs(5)).await;
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        assert_eq!(in_ns, Ok(()));
        assert!(missing.is_err_and(|e| e.contains("network namespace")));
    }

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut codes = ["200 OK", "503 Service Unavailable"].into_iter().cycle();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let code = codes.next().unwrap();
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let a = HTTPGetAction {
            port: IntOrString::Int(port as i32),
            path: Some("/healthz".into()),
            ..Default::default()
        };
        assert_eq!(http(&a, &target(), Duration::from_secs(2)).await, Ok(()));
        let err = http(&a, &target(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.contains("503"), "{err}");
        let tcp_ok = TCPSocketAction {
            port: IntOrString::Int(port as i32),
            host: None,
        };
        assert_eq!(
            tcp(&tcp_ok, &target(), Duration::from_secs(1)).await,
            Ok(())
        );
    }
}
