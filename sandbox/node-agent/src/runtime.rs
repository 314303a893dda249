//! Container processes: spawning (own session and process group, the pod's network namespace,
//! own UTS namespace with the pod's hostname, private mount namespace with the pod's volumes
//! bind-mounted), signalling process groups, and the per-pod PID records that let a restarted
//! agent clean up after a previous run.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// A bind mount inside the container's private mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub mounts: Vec<Mount>,
    pub log_file: PathBuf,
    /// The pod's network namespace (`/run/netns/<name>`); `None`: the host's (hostNetwork).
    pub netns: Option<PathBuf>,
    /// Set in a new UTS namespace; `None`: the host's hostname (hostNetwork).
    pub hostname: Option<String>,
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Creates a mount target on the host: a directory, or an empty file when the source is a file.
pub fn ensure_mount_target(m: &Mount) -> std::io::Result<()> {
    if m.target.exists() {
        return Ok(());
    }
    if m.source.is_dir() {
        std::fs::create_dir_all(&m.target)
    } else {
        if let Some(parent) = m.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.target)
            .map(|_| ())
    }
}

/// Starts a container process: new session (so its PID is its process group), the pod's network
/// namespace, a new UTS namespace with the pod's hostname, private mount namespace (`unshare -m`,
/// propagation private) with `mounts` bound, working directory, env exactly as given, stdout and
/// stderr appended to the log file.
pub fn spawn(spec: &SpawnSpec) -> anyhow::Result<tokio::process::Child> {
    if let Some(dir) = spec.log_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)
        .with_context(|| format!("opening {}", spec.log_file.display()))?;
    for m in &spec.mounts {
        ensure_mount_target(m)
            .with_context(|| format!("creating mount point {}", m.target.display()))?;
    }
    let mounts: Vec<(CString, CString, bool)> = spec
        .mounts
        .iter()
        .map(|m| Ok((cstring(&m.source)?, cstring(&m.target)?, m.read_only)))
        .collect::<std::io::Result<_>>()?;
    let cwd = cstring(&spec.working_dir)?;
    let root = CString::new("/").expect("static");
    // Opened before the fork (O_CLOEXEC: the container does not inherit it); kept open until
    // spawn returned.
    let netns = spec
        .netns
        .as_ref()
        .map(|p| {
            std::fs::File::open(p).with_context(|| {
                format!(
                    "opening the pod's network namespace {} (was it removed?)",
                    p.display()
                )
            })
        })
        .transpose()?;
    let netns_fd = netns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let hostname = spec.hostname.clone().map(String::into_bytes);
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: between fork and exec only async-signal-safe system calls are made, on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setsid() < 0 {
                return fail();
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return fail();
                }
            }
            let uts = if hostname.is_some() {
                libc::CLONE_NEWUTS
            } else {
                0
            };
            if libc::unshare(libc::CLONE_NEWNS | uts) != 0 {
                return fail();
            }
            if let Some(h) = &hostname {
                if libc::sethostname(h.as_ptr().cast(), h.len()) != 0 {
                    return fail();
                }
            }
            let null = std::ptr::null();
            if libc::mount(
                null,
                root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null as _,
            ) != 0
            {
                return fail();
            }
            for (src, dst, ro) in &mounts {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    null as _,
                ) != 0
                {
                    return fail();
                }
                if *ro {
                    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                    if libc::mount(null, dst.as_ptr(), null, flags, null as _) != 0 {
                        return fail();
                    }
                }
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                return fail();
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", spec.program));
    drop(netns);
    child
}

/// Sends `sig` to the process group led by `pid` (ignores a group that is already gone).
pub fn signal_group(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain kill(2) on a negative pid, i.e. a process group.
        unsafe {
            libc::kill(-(pid as i32), sig);
        }
    }
}

/// Whether any process of the group led by `pid` is alive.
pub fn group_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks.
    pid > 1 && unsafe { libc::kill(-(pid as i32), 0) } == 0
}

/// The start time (clock ticks since boot) of a process, to tell a recorded PID from a reused one.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// One line of a pod's `pids` file: the process group of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidRecord {
    pub container: String,
    pub pid: u32,
    pub start_time: u64,
}

pub fn parse_pid_records(text: &str) -> Vec<PidRecord> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some(PidRecord {
                container: f.next()?.to_string(),
                pid: f.next()?.parse().ok()?,
                start_time: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// Writes `<pod dir>/pids` (container, PID, start time: what a restarted agent checks) and one
/// `<container>.pid` per running container (just the PID: what `scripts/sandbox down` reads).
pub fn write_pid_records(pod_dir: &Path, records: &[PidRecord]) -> std::io::Result<()> {
    let text: String = records
        .iter()
        .map(|r| format!("{} {} {}\n", r.container, r.pid, r.start_time))
        .collect();
    let tmp = pod_dir.join("pids.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, pod_dir.join("pids"))?;
    for entry in std::fs::read_dir(pod_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(container) = name.strip_suffix(".pid") {
            if !records.iter().any(|r| r.container == container) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    for r in records {
        std::fs::write(
            pod_dir.join(format!("{}.pid", r.container)),
            format!("{}\n", r.pid),
        )?;
    }
    Ok(())
}

/// Stops the process groups recorded by a previous agent run under `<sandbox>/pods/*/pids`:
/// SIGTERM, up to `grace`, then SIGKILL. Returns how many groups were found alive.
pub async fn kill_leftovers(pods_dir: &Path, grace: Duration) -> usize {
    let mut alive = Vec::new();
    let Ok(entries) = std::fs::read_dir(pods_dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let file = entry.path().join("pids");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for r in parse_pid_records(&text) {
            if start_time(r.pid) == Some(r.start_time) {
                tracing::info!(pod_dir = %entry.path().display(), container = %r.container, pid = r.pid,
                    "stopping a container process left by a previous agent run");
                signal_group(r.pid, libc::SIGTERM);
                alive.push(r.pid);
            }
        }
        let _ = write_pid_records(&entry.path(), &[]);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while alive.iter().any(|p| group_alive(*p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for pid in &alive {
        if group_alive(*pid) {
            signal_group(*pid, libc::SIGKILL);
        }
    }
    alive.len()
}

/// The last `max_lines` lines (at most `max_bytes`) written to `file` after byte `from`.
pub fn log_tail(file: &Path, from: u64, max_lines: usize, max_bytes: usize) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).ok()?;
    let len = f.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(max_bytes as u64));
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(max_lines)..].join("\n");
    (!tail.is_empty()).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_records_roundtrip() {
        let dir = std::env::temp_dir().join(format!("agent-pids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let recs = vec![
            PidRecord {
                container: "a".into(),
                pid: 10,
                start_time: 99,
            },
            PidRecord {
                container: "b".into(),
                pid: 11,
                start_time: 100,
            },
        ];
        write_pid_records(&dir, &recs).unwrap();
        let text = std::fs::read_to_string(dir.join("pids")).unwrap();
        assert_eq!(parse_pid_records(&text), recs);
        assert_eq!(std::fs::read_to_string(dir.join("b.pid")).unwrap(), "11\n");
        write_pid_records(&dir, &recs[..1]).unwrap();
        assert!(!dir.join("b.pid").exists());
        assert_eq!(parse_pid_records("garbage\nx 1\n"), vec![]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Root only (skips otherwise): a container process runs in the given netns, with its own
    /// hostname, and sees the pod's resolv.conf; the host's hostname and file stay as they were.
    #[tokio::test]
    async fn spawn_joins_netns_and_uts_with_dns_mount() {
        let Some(ns) = crate::netns::scratch_netns("rt") else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("agent-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 10.244.0.1\n").unwrap();
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let spec = SpawnSpec {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "hostname; cat /etc/resolv.conf; readlink /proc/self/ns/net; ip -o link show | wc -l"
                    .into(),
            ],
            env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
            working_dir: dir.clone(),
            mounts: vec![Mount {
                source: dir.join("resolv.conf"),
                target: "/etc/resolv.conf".into(),
                read_only: false,
            }],
            log_file: dir.join("out.log"),
            netns: Some(PathBuf::from("/run/netns").join(&ns)),
            hostname: Some("web-0".into()),
        };
        let status = spawn(&spec).unwrap().wait().await.unwrap();
        let out = std::fs::read_to_string(dir.join("out.log")).unwrap();
        let expected_ns = std::fs::metadata(PathBuf::from("/run/netns").join(&ns))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(status.success(), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "web-0", "{out}");
        assert_eq!(lines[1], "nameserver 10.244.0.1", "{out}");
        assert_eq!(lines[2], format!("net:[{expected_ns}]"), "{out}");
        assert_eq!(lines[3].trim(), "1", "only lo in a fresh netns: {out}");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
            host_name
        );
        assert_eq!(
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            host_resolv
        );
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn tail_of_log() {
        let f = std::env::temp_dir().join(format!("agent-tail-{}", std::process::id()));
        std::fs::write(&f, "old\nnew1\nnew2\nnew3\n").unwrap();
        assert_eq!(log_tail(&f, 4, 2, 1024).as_deref(), Some("new2\nnew3"));
        assert_eq!(
            log_tail(&f, 4, 10, 1024).as_deref(),
            Some("new1\nnew2\nnew3")
        );
        assert_eq!(log_tail(&f, 100, 10, 1024), None);
        std::fs::remove_file(f).unwrap();
    }
}
