//! Container processes: spawning (own session and process group, the pod's network namespace,
//! own UTS namespace with the pod's hostname, private mount namespace with the pod's volumes
//! bind-mounted — for OCI layout images inside the container's own root: /proc, a minimal /dev,
//! read-only /sys, then pivot_root —, then the container's user), signalling process groups,
//! and the per-pod PID records that let a restarted agent clean up after a previous run.
//!
//! Everything between fork and exec is a list of [`Step`]s prepared before the fork (paths
//! resolved inside the rootfs, mount points created), so the child only makes system calls; the
//! index of a failing step comes back through a pipe and names it in the error.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

pub use crate::users::Credentials;

/// A bind mount inside the container's private mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// A container's own root filesystem (OCI layout images).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// The unpacked image on the host (`<pod dir>/rootfs/<container>`).
    pub root: PathBuf,
    /// `readOnlyRootFilesystem`: `/` is remounted read-only (volumes keep their own mode).
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// With a rootfs: the container's path (the program is too); else a host path.
    pub working_dir: PathBuf,
    /// Targets are container paths when there is a rootfs, else host paths.
    pub mounts: Vec<Mount>,
    pub log_file: PathBuf,
    /// The pod's network namespace (`/run/netns/<name>`); `None`: the host's (hostNetwork).
    pub netns: Option<PathBuf>,
    /// Set in a new UTS namespace; `None`: the host's hostname (hostNetwork).
    pub hostname: Option<String>,
    /// `None`: the host's filesystem (image-table programs).
    pub rootfs: Option<Rootfs>,
    /// Switched to after the mounts; `None`: stay the agent's user.
    pub user: Option<Credentials>,
    /// PR_SET_NO_NEW_PRIVS (`allowPrivilegeEscalation: false`).
    pub no_new_privs: bool,
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Creates a mount target on the host: a directory, or an empty file when the source is a file.
pub fn ensure_mount_target(m: &Mount) -> std::io::Result<()> {
    create_target(&m.target, m.source.is_dir())
}

fn create_target(target: &Path, dir: bool) -> std::io::Result<()> {
    if std::fs::symlink_metadata(target).is_ok() {
        return Ok(());
    }
    if dir {
        std::fs::create_dir_all(target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(target)
            .map(|_| ())
    }
}

/// One system call of the container's setup between fork and exec, prepared before the fork.
#[derive(Debug, Clone)]
enum Step {
    /// mount(2) with all arguments.
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// A recursive bind mount, remounted read-only when asked.
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
    /// An empty file (a bind target on the container's /dev tmpfs).
    Touch(CString),
    Mkdir(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    /// pivot_root into the directory (which is already a mount), old root detached.
    PivotRoot(CString),
    RemountRootReadOnly,
    Chdir(CString),
    Credentials {
        uid: u32,
        gid: u32,
        groups: Vec<libc::gid_t>,
    },
    NoNewPrivs,
}

/// Runs one step; errno on failure.
///
/// # Safety
/// Only async-signal-safe system calls on data prepared before the fork.
unsafe fn run_step(step: &Step) -> Result<(), ()> {
    let null = std::ptr::null();
    let ok = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(()) };
    match step {
        Step::Mount {
            src,
            dst,
            fstype,
            flags,
            data,
        } => ok(libc::mount(
            src.as_ref().map_or(null, |s| s.as_ptr()),
            dst.as_ptr(),
            fstype.as_ref().map_or(null, |s| s.as_ptr()),
            *flags,
            data.as_ref().map_or(null, |s| s.as_ptr()).cast(),
        )),
        Step::Bind {
            src,
            dst,
            read_only,
        } => {
            ok(libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                null.cast(),
            ))?;
            if *read_only {
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                ok(libc::mount(null, dst.as_ptr(), null, flags, null.cast()))?;
            }
            Ok(())
        }
        Step::Touch(p) => {
            let fd = libc::open(
                p.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o666,
            );
            if fd < 0 {
                return Err(());
            }
            libc::close(fd);
            Ok(())
        }
        Step::Mkdir(p) => {
            if libc::mkdir(p.as_ptr(), 0o755) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(());
            }
            Ok(())
        }
        Step::Symlink { target, path } => ok(libc::symlink(target.as_ptr(), path.as_ptr())),
        Step::PivotRoot(root) => {
            // pivot_root(".", "."): the old root ends up on top of the new one and is detached
            // at once, so the image needs no directory for it.
            let dot = c".".as_ptr();
            ok(libc::chdir(root.as_ptr()))?;
            ok(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)?;
            ok(libc::umount2(dot, libc::MNT_DETACH))?;
            ok(libc::chdir(c"/".as_ptr()))
        }
        Step::RemountRootReadOnly => ok(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            null.cast(),
        )),
        Step::Chdir(p) => ok(libc::chdir(p.as_ptr())),
        Step::Credentials { uid, gid, groups } => {
            ok(libc::setgroups(groups.len(), groups.as_ptr()))?;
            ok(libc::setgid(*gid))?;
            ok(libc::setuid(*uid))
        }
        Step::NoNewPrivs => ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
    }
}

/// The character devices bound into a container's own /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Where mount target `target` (a container path) is on the host, creating it when missing:
/// under an earlier mount's source when it lies inside that mount (as a runtime creating it at
/// mount time would), else inside the rootfs. The returned path is the one to mount on, as the
/// child sees it before pivot_root.
fn rootfs_target(
    root: &Path,
    earlier: &[Mount],
    target: &Path,
    dir: bool,
) -> anyhow::Result<PathBuf> {
    let inside = crate::oci::resolve_in_root(root, target).with_context(|| {
        format!(
            "resolving mount point {} in {}",
            target.display(),
            root.display()
        )
    })?;
    let under = earlier
        .iter()
        .filter(|m| target.starts_with(&m.target) && target != m.target && m.source.is_dir())
        .max_by_key(|m| m.target.components().count());
    let create_at = match under {
        Some(m) => {
            let rest = target.strip_prefix(&m.target).unwrap_or(target);
            crate::oci::resolve_in_root(&m.source, rest)?
        }
        None => inside.clone(),
    };
    create_target(&create_at, dir).with_context(|| {
        format!(
            "creating mount point {} ({})",
            target.display(),
            create_at.display()
        )
    })?;
    Ok(inside)
}

/// The steps that build a container's root: bind the rootfs onto itself, fresh /proc, a minimal
/// /dev, read-only /sys, the bind mounts, pivot_root, optionally `/` read-only.
fn rootfs_steps(rootfs: &Rootfs, mounts: &[Mount]) -> anyhow::Result<Vec<(Step, String)>> {
    let root = &rootfs.root;
    let c = |p: &Path| cstring(p).map_err(anyhow::Error::from);
    let mut steps = vec![(
        Step::Bind {
            src: c(root)?,
            dst: c(root)?,
            read_only: false,
        },
        format!(
            "bind-mounting the root filesystem {} onto itself",
            root.display()
        ),
    )];
    let sys_dir =
        |p: &str| -> anyhow::Result<PathBuf> { rootfs_target(root, &[], Path::new(p), true) };
    let proc_dir = sys_dir("/proc")?;
    steps.push((
        Step::Mount {
            src: Some(c"proc".into()),
            dst: c(&proc_dir)?,
            fstype: Some(c"proc".into()),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        },
        format!("mounting /proc at {}", proc_dir.display()),
    ));
    let dev = sys_dir("/dev")?;
    steps.push((
        Step::Mount {
            src: Some(c"tmpfs".into()),
            dst: c(&dev)?,
            fstype: Some(c"tmpfs".into()),
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: Some(c"mode=755,size=65536k".into()),
        },
        format!("mounting a tmpfs for /dev at {}", dev.display()),
    ));
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        if !host.exists() {
            continue;
        }
        steps.push((Step::Touch(c(&dev.join(d))?), format!("creating /dev/{d}")));
        steps.push((
            Step::Bind {
                src: c(&host)?,
                dst: c(&dev.join(d))?,
                read_only: false,
            },
            format!("binding {} into the container", host.display()),
        ));
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        steps.push((
            Step::Symlink {
                target: CString::new(target)?,
                path: c(&dev.join(link))?,
            },
            format!("creating /dev/{link}"),
        ));
    }
    for (d, fstype, data, flags) in [
        (
            "shm",
            c"tmpfs",
            c"mode=1777,size=65536k",
            libc::MS_NOSUID | libc::MS_NODEV,
        ),
        (
            "pts",
            c"devpts",
            c"newinstance,ptmxmode=0666,mode=0620",
            libc::MS_NOSUID | libc::MS_NOEXEC,
        ),
    ] {
        steps.push((Step::Mkdir(c(&dev.join(d))?), format!("creating /dev/{d}")));
        steps.push((
            Step::Mount {
                src: Some(fstype.into()),
                dst: c(&dev.join(d))?,
                fstype: Some(fstype.into()),
                flags,
                data: Some(data.into()),
            },
            format!("mounting /dev/{d}"),
        ));
    }
    let sys = sys_dir("/sys")?;
    steps.push((
        Step::Mount {
            src: Some(c"sysfs".into()),
            dst: c(&sys)?,
            fstype: Some(c"sysfs".into()),
            flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        },
        format!("mounting /sys read-only at {}", sys.display()),
    ));
    for (i, m) in mounts.iter().enumerate() {
        let dst = rootfs_target(root, &mounts[..i], &m.target, m.source.is_dir())?;
        steps.push(bind_step(m, &dst)?);
    }
    steps.push((
        Step::PivotRoot(c(root)?),
        format!("pivot_root into {}", root.display()),
    ));
    if rootfs.read_only {
        steps.push((
            Step::RemountRootReadOnly,
            "remounting / read-only (readOnlyRootFilesystem)".into(),
        ));
    }
    Ok(steps)
}

/// Binds `m` at `dst` (its target, or where that target is inside the container's root).
fn bind_step(m: &Mount, dst: &Path) -> std::io::Result<(Step, String)> {
    Ok((
        Step::Bind {
            src: cstring(&m.source)?,
            dst: cstring(dst)?,
            read_only: m.read_only,
        },
        format!(
            "bind-mounting {} at {}",
            m.source.display(),
            m.target.display()
        ),
    ))
}

/// Starts a container process: new session (so its PID is its process group), the pod's network
/// namespace, a new UTS namespace with the pod's hostname, private mount namespace (`unshare -m`,
/// propagation private) with `mounts` bound — into its own root (pivot_root) when it has one —,
/// working directory, user, env exactly as given, stdout and stderr appended to the log file.
pub fn spawn(spec: &SpawnSpec) -> anyhow::Result<tokio::process::Child> {
    if let Some(dir) = spec.log_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)
        .with_context(|| format!("opening {}", spec.log_file.display()))?;
    let mut steps: Vec<(Step, String)> = vec![(
        Step::Mount {
            src: None,
            dst: c"/".into(),
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
        "making the container's mounts private".into(),
    )];
    match &spec.rootfs {
        Some(rootfs) => steps.extend(rootfs_steps(rootfs, &spec.mounts)?),
        None => {
            for m in &spec.mounts {
                ensure_mount_target(m)
                    .with_context(|| format!("creating mount point {}", m.target.display()))?;
                steps.push(bind_step(m, &m.target)?);
            }
        }
    }
    steps.push((
        Step::Chdir(cstring(&spec.working_dir)?),
        format!("changing to the working dir {}", spec.working_dir.display()),
    ));
    if let Some(u) = &spec.user {
        steps.push((
            Step::Credentials {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
            },
            format!(
                "switching to uid {} gid {} groups {:?}",
                u.uid, u.gid, u.groups
            ),
        ));
    }
    if spec.no_new_privs {
        steps.push((Step::NoNewPrivs, "setting no_new_privs".into()));
    }
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
    // The child writes the index of a failed step here, so the error can say which one.
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) into a 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    let (report_r, report_w) = (fds[0], fds[1]);
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    let child_steps: Vec<Step> = steps.iter().map(|(s, _)| s.clone()).collect();
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
            for (i, step) in child_steps.iter().enumerate() {
                if run_step(step).is_err() {
                    let err = std::io::Error::last_os_error();
                    let idx = (i as u32).to_ne_bytes();
                    libc::write(report_w, idx.as_ptr().cast(), idx.len());
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(netns);
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(report_w) };
    let mut idx = [0u8; 4];
    // SAFETY: non-blocking read of at most 4 bytes into `idx`, then close.
    let n = unsafe {
        let n = libc::read(report_r, idx.as_mut_ptr().cast(), idx.len());
        libc::close(report_r);
        n
    };
    child.map_err(|e| {
        let what = (n == 4)
            .then(|| steps.get(u32::from_ne_bytes(idx) as usize))
            .flatten()
            .map(|(_, d)| format!(" ({d} failed)"))
            .unwrap_or_default();
        anyhow::anyhow!("starting {:?}{what}: {e}", spec.program)
    })
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
    proc_stat(pid).map(|(_, start)| start)
}

/// A process's state letter and start time from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.to_string();
    Some((state, fields.nth(18)?.parse().ok()?))
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

/// Whether the process recorded as (`pid`, `start_time`) still runs: same start time (not a
/// reused PID) and not a zombie. For processes that are not the agent's children (adopted).
pub fn process_running(pid: u32, recorded_start: u64) -> bool {
    proc_stat(pid).is_some_and(|(state, start)| {
        start == recorded_start && !matches!(state.as_str(), "Z" | "X" | "x")
    })
}

/// What a restarted agent needs to take over a running container without restarting it:
/// written to `<pod dir>/<container>.run.json` at start, removed when the container exits.
/// (The probe target holds the container's env, so the file is 0600 like the pod's token.)
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub container: String,
    pub pid: u32,
    pub start_time: u64,
    /// RFC 3339, as reported in `state.running.startedAt`.
    pub started_at: String,
    pub image_id: String,
    pub log_file: PathBuf,
    pub target: crate::probe::Target,
}

fn run_info_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.run.json"))
}

pub fn write_run_info(pod_dir: &Path, info: &RunInfo) -> std::io::Result<()> {
    let path = run_info_path(pod_dir, &info.container);
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(info).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::rename(tmp, path)
}

pub fn remove_run_info(pod_dir: &Path, container: &str) {
    let _ = std::fs::remove_file(run_info_path(pod_dir, container));
}

pub fn read_run_info(pod_dir: &Path, container: &str) -> Option<RunInfo> {
    let text = std::fs::read(run_info_path(pod_dir, container)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The container processes a previous agent run left running in one pod dir.
#[derive(Debug, Clone)]
pub struct Leftover {
    pub pod_dir: PathBuf,
    /// The pod's UID (the dir's name ends in it).
    pub uid: String,
    /// Alive processes with what is needed to adopt them (`None`: no run file, cannot be).
    pub alive: Vec<(PidRecord, Option<RunInfo>)>,
}

/// Every pod dir under `pods_dir` whose recorded process groups still run.
pub fn find_leftovers(pods_dir: &Path) -> Vec<Leftover> {
    let Ok(entries) = std::fs::read_dir(pods_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("pids")) else {
            continue;
        };
        let alive: Vec<(PidRecord, Option<RunInfo>)> = parse_pid_records(&text)
            .into_iter()
            .filter(|r| process_running(r.pid, r.start_time))
            .map(|r| {
                let info = read_run_info(&entry.path(), &r.container)
                    .filter(|i| i.pid == r.pid && i.start_time == r.start_time);
                (r, info)
            })
            .collect();
        if alive.is_empty() {
            continue;
        }
        found.push(Leftover {
            uid: crate::agent::pod_dir_uid(&entry.file_name().to_string_lossy()).to_string(),
            pod_dir: entry.path(),
            alive,
        });
    }
    found
}

/// Stops the process groups of leftovers that are not adopted: SIGTERM, up to `grace`, then
/// SIGKILL; their pod dirs' records are cleared. Returns how many groups were stopped.
pub async fn kill_leftovers(leftovers: &[Leftover], grace: Duration) -> usize {
    let mut alive = Vec::new();
    for l in leftovers {
        for (r, _) in &l.alive {
            tracing::info!(pod_dir = %l.pod_dir.display(), container = %r.container, pid = r.pid,
                "stopping a container process left by a previous agent run");
            signal_group(r.pid, libc::SIGTERM);
            alive.push(r.pid);
            remove_run_info(&l.pod_dir, &r.container);
        }
        let _ = write_pid_records(&l.pod_dir, &[]);
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
            rootfs: None,
            user: None,
            no_new_privs: false,
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

    /// Files for a minimal image: the host's dash as /bin/sh plus the libraries ldd names.
    fn dash_entries() -> Vec<(String, Vec<u8>)> {
        let dash = std::fs::canonicalize("/bin/sh").unwrap();
        let mut files = vec![("bin/sh".to_string(), std::fs::read(&dash).unwrap())];
        let ldd = std::process::Command::new("ldd")
            .arg(&dash)
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_string);
            if let Some(p) = path {
                files.push((
                    p.trim_start_matches('/').to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
        files
    }

    /// Root only (skips otherwise): a process from an OCI layout runs in its own root: it sees
    /// the image's files (not the host's), runs as the image's user with fsGroup and
    /// supplementalGroups, cannot write `/` (readOnlyRootFilesystem: EROFS) but can write its
    /// emptyDir-like volume, sees the pod's hostname file and a minimal /dev; the host's mount
    /// table is unchanged afterwards.
    #[tokio::test]
    async fn spawn_in_an_image_rootfs_as_its_user() {
        use crate::rootfs::testimage::{layer, write_layout, E};
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: not root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("agent-rootfs-spawn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("vol")).unwrap();
        std::fs::set_permissions(
            dir.join("vol"),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        std::fs::write(dir.join("hostname"), "web-0\n").unwrap();
        let files = dash_entries();
        let mut entries: Vec<E<'_>> = files
            .iter()
            .map(|(p, data)| E::File(p.as_str(), data.as_slice(), 0o755))
            .collect();
        entries.push(E::File("marker", b"from the image\n", 0o644));
        entries.push(E::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/home/app:/bin/sh\n",
            0o644,
        ));
        entries.push(E::Dir("home/app", 0o755));
        let script = r#"[ -e /etc/os-release ] && echo host-os-release || echo no-os-release
[ -e /marker ] && echo marker
while read k a b c; do case $k in Uid:|Gid:) echo "$k $a";; Groups:) echo "$k $a $b $c";; esac; done < /proc/self/status
if echo x > /rootwrite; then echo root-writable; fi
echo ok > /data/w && echo data-ok
read h < /etc/hostname; echo "hostname $h"
[ -c /dev/null ] && echo devnull
echo "pwd $(pwd)"
"#;
        let images = dir.join("images");
        write_layout(
            &images,
            "tiny",
            "1",
            &[layer(&entries)],
            serde_json::json!({"User": "app", "Entrypoint": ["/bin/sh", "-c"], "Cmd": [script], "WorkingDir": "/home/app"}),
        );
        let img = match crate::oci::lookup(&images, "example.org/tiny:1").unwrap() {
            crate::oci::Lookup::Found(i) => *i,
            other => panic!("{other:?}"),
        };
        let root = dir.join("rootfs/c");
        crate::rootfs::create(&img, &root).unwrap();
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"securityContext": {"runAsNonRoot": true, "fsGroup": 777, "supplementalGroups": [888]},
                     "containers": [{"name": "c"}]}
        }))
        .unwrap();
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        let id = crate::users::resolve(
            &pod,
            &pod.spec.as_ref().unwrap().containers[0],
            Some(&crate::users::ImageUser {
                user: "1234",
                passwd: &passwd,
                group: "",
            }),
        )
        .unwrap();
        let argv = crate::oci::merge_command(
            img.config.entrypoint.as_deref().unwrap(),
            img.config.cmd.as_deref().unwrap(),
            &[],
            &[],
        );
        let program = crate::oci::find_program(&root, &argv[0], "/usr/bin:/bin", "/").unwrap();
        let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let spec = SpawnSpec {
            program,
            args: argv[1..].to_vec(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: "/home/app".into(),
            mounts: vec![
                Mount {
                    source: dir.join("hostname"),
                    target: "/etc/hostname".into(),
                    read_only: false,
                },
                Mount {
                    source: dir.join("vol"),
                    target: "/data".into(),
                    read_only: false,
                },
            ],
            log_file: dir.join("out.log"),
            netns: None,
            hostname: Some("web-0".into()),
            rootfs: Some(Rootfs {
                root: root.clone(),
                read_only: true,
            }),
            user: id.creds.clone(),
            no_new_privs: true,
        };
        let status = spawn(&spec).unwrap().wait().await.unwrap();
        let out = std::fs::read_to_string(dir.join("out.log")).unwrap();
        let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let data = std::fs::read_to_string(dir.join("vol/w")).unwrap_or_default();
        let owner =
            std::fs::metadata(dir.join("vol/w")).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(status.success(), "{out}");
        for line in [
            "no-os-release",
            "marker",
            "Uid: 1234",
            "Gid: 2345",
            "Groups: 777 888 2345",
            "data-ok",
            "hostname web-0",
            "devnull",
            "pwd /home/app",
        ] {
            assert!(
                out.lines().any(|l| l.trim() == line),
                "{line:?} missing in:\n{out}"
            );
        }
        assert!(out.contains("Read-only file system"), "{out}");
        assert!(!out.contains("root-writable"), "{out}");
        assert_eq!(data, "ok\n");
        assert_eq!(owner.ok(), Some(1234));
        // Other tests add and remove network namespaces (/run/netns) meanwhile.
        let ours = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.contains("/run/netns/"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            ours(&mounts_before),
            ours(&mounts_after),
            "the host's mount table is unchanged"
        );
        assert!(
            !mounts_after.contains(dir.to_str().unwrap()),
            "{mounts_after}"
        );
        assert!(
            Path::new("/etc/os-release").exists() || !Path::new("/etc").join("os-release").exists()
        );
        assert!(!Path::new("/rootwrite").exists() && !Path::new("/marker").exists());
    }

    /// The step that failed is named in the error.
    #[tokio::test]
    async fn failed_setup_step_is_named() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: not root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("agent-step-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = SpawnSpec {
            program: "true".into(),
            args: vec![],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: "/no/such/dir/here".into(),
            mounts: vec![],
            log_file: dir.join("out.log"),
            netns: None,
            hostname: None,
            rootfs: None,
            user: None,
            no_new_privs: false,
        };
        let err = spawn(&spec).map(|_| ()).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.contains("changing to the working dir /no/such/dir/here failed"),
            "{err}"
        );
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn a_running_process_is_told_from_a_reused_pid_and_a_zombie() {
        let me = std::process::id();
        let start = start_time(me).expect("own start time");
        assert!(process_running(me, start));
        assert!(
            !process_running(me, start + 1),
            "another start time is a reused PID"
        );
        // A child that exited and was not reaped yet is a zombie: not running.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        let child_start = start_time(pid).expect("child start time");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process_running(pid, child_start) {
            assert!(
                std::time::Instant::now() < deadline,
                "`true` did not exit within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(start_time(pid).is_some(), "still a zombie before wait");
        child.wait().expect("reap");
    }

    #[test]
    fn run_info_roundtrip_and_leftovers_found() {
        let pods = std::env::temp_dir().join(format!("agent-runinfo-{}", std::process::id()));
        let dir = pods.join("ns_pod_0f0f-uid");
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        let start = start_time(me).unwrap();
        let info = RunInfo {
            container: "main".into(),
            pid: me,
            start_time: start,
            started_at: "2026-12-02T05:00:00Z".into(),
            image_id: "img@sha256:00".into(),
            log_file: dir.join("main.log"),
            target: crate::probe::Target {
                pod_ip: "10.244.1.2".into(),
                env: vec![("A".into(), "b".into())],
                ports: vec![],
                working_dir: "/".into(),
                pid: Some(me),
                netns: None,
                user: None,
                no_new_privs: false,
            },
        };
        write_run_info(&dir, &info).unwrap();
        assert_eq!(read_run_info(&dir, "main"), Some(info.clone()));
        let recs = [
            PidRecord {
                container: "main".into(),
                pid: me,
                start_time: start,
            },
            PidRecord {
                container: "gone".into(),
                pid: me,
                start_time: start + 1,
            },
        ];
        write_pid_records(&dir, &recs).unwrap();
        let found = find_leftovers(&pods);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].uid, "0f0f-uid");
        assert_eq!(
            found[0].alive.len(),
            1,
            "the record with another start time is not alive"
        );
        assert_eq!(found[0].alive[0].1.as_ref(), Some(&info));
        remove_run_info(&dir, "main");
        assert_eq!(read_run_info(&dir, "main"), None);
        std::fs::remove_dir_all(&pods).unwrap();
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
