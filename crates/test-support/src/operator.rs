//! Deploys the operator into a test namespace the way a user does (deploy/*.yaml), scoped to
//! that namespace: its own ServiceAccount, a ClusterRoleBinding named after the namespace,
//! WATCH_NAMESPACE set to it. The node agent runs it with the ServiceAccount's token, so its
//! RBAC is really exercised.

use crate::sandbox::{Sandbox, TestNamespace};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use std::time::Duration;

const MANAGER: &str = "arcus-e2e";

fn docs(sandbox: &Sandbox, file: &str) -> anyhow::Result<Vec<Value>> {
    let path = sandbox.repo.join("deploy").join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Server-side applies one object given as JSON (any kind the sandbox serves).
pub async fn apply_json(sandbox: &Sandbox, obj: &Value) -> anyhow::Result<()> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(&sandbox.client, &gvk).await?;
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api: Api<DynamicObject> = match (caps.scope, obj["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(sandbox.client.clone(), ns, &ar)
        }
        (kube::discovery::Scope::Namespaced, None) => {
            Api::default_namespaced_with(sandbox.client.clone(), &ar)
        }
        _ => Api::all_with(sandbox.client.clone(), &ar),
    };
    let _: &ApiResource = &ar;
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|e| anyhow::anyhow!("applying {kind} {name}: {e}"))?;
    Ok(())
}

/// Installs the CRD from deploy/crd.yaml and waits until it is Established.
pub async fn install_crd(sandbox: &Sandbox) -> anyhow::Result<()> {
    for d in docs(sandbox, "crd.yaml")? {
        apply_json(sandbox, &d).await?;
    }
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(sandbox.client.clone());
    crate::wait_until(
        Duration::from_secs(30),
        "CRD memcacheds.jam2in.com Established",
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get_opt("memcacheds.jam2in.com").await.ok()??;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        },
    )
    .await
}

/// Deploys RBAC and the operator Deployment (`replicas`) into `ns`, watching only `ns`, and
/// waits until `replicas` operator pods run.
pub async fn deploy_operator(
    sandbox: &Sandbox,
    ns: &TestNamespace,
    replicas: i32,
) -> anyhow::Result<()> {
    deploy_operator_with(sandbox, ns, replicas, |_| {}).await
}

/// [`deploy_operator`], with `customize` editing the Deployment (JSON, as in deploy/operator.yaml
/// after the namespace, replicas and WATCH_NAMESPACE are set) before it is applied: for a test
/// that needs a variant, e.g. no liveness probe while it holds a process stopped.
pub async fn deploy_operator_with(
    sandbox: &Sandbox,
    ns: &TestNamespace,
    replicas: i32,
    customize: impl Fn(&mut Value),
) -> anyhow::Result<()> {
    install_crd(sandbox).await?;
    for mut d in docs(sandbox, "rbac.yaml")? {
        match d["kind"].as_str() {
            Some("ServiceAccount") => {
                d["metadata"]["namespace"] = json!(ns.name);
                apply_json(sandbox, &d).await?;
            }
            Some("ClusterRole") => apply_json(sandbox, &d).await?,
            Some("ClusterRoleBinding") => {
                let role = d["roleRef"]["name"]
                    .as_str()
                    .unwrap_or("arcus-operator")
                    .to_string();
                let binding = json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": format!("arcus-operator-{}", ns.name), "labels": {"arcus-e2e": "true"}},
                    "subjects": [{"kind": "ServiceAccount", "name": "arcus-operator", "namespace": ns.name}],
                    "roleRef": {"kind": "ClusterRole", "name": role, "apiGroup": "rbac.authorization.k8s.io"}
                });
                apply_json(sandbox, &binding).await?;
            }
            _ => {}
        }
    }
    for mut d in docs(sandbox, "operator.yaml")? {
        if d["kind"] != "Deployment" {
            continue;
        }
        d["metadata"]["namespace"] = json!(ns.name);
        d["spec"]["replicas"] = json!(replicas);
        if let Some(envs) = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut() {
            for e in envs.iter_mut() {
                if e["name"] == "WATCH_NAMESPACE" {
                    e["value"] = json!(ns.name);
                }
            }
        }
        customize(&mut d);
        apply_json(sandbox, &d).await?;
    }
    let pods: Api<Pod> = ns.api();
    crate::wait_until(
        Duration::from_secs(90),
        &format!("{replicas} operator pods running in {}", ns.name),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("name=arcus-operator"))
                    .await
                    .ok()?;
                let running = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count();
                (running as i32 == replicas).then_some(())
            }
        },
    )
    .await
}

/// Removes what [`deploy_operator`] made outside the namespace.
pub async fn undeploy_operator(sandbox: &Sandbox, ns: &TestNamespace) {
    let api: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(sandbox.client.clone());
    let _ = api
        .delete(&format!("arcus-operator-{}", ns.name), &Default::default())
        .await;
}

/// The PID of a pod's first container process, as the node agent reports it
/// (containerID `sandbox://<pid>`).
pub fn container_pid(pod: &Pod) -> Option<i32> {
    let id = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .container_id
        .clone()?;
    sandbox_pid(&id)
}

/// The PID in a containerID the node agent reports (`sandbox://<pid>`).
pub fn sandbox_pid(container_id: &str) -> Option<i32> {
    container_id.strip_prefix("sandbox://")?.parse().ok()
}

/// The operator pod holding the leader Lease, if any.
pub async fn leader_pod(ns: &TestNamespace) -> anyhow::Result<Option<Pod>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    let Some(lease) = leases.get_opt("arcus-operator-leader").await? else {
        return Ok(None);
    };
    let Some(holder) = lease.spec.and_then(|s| s.holder_identity) else {
        return Ok(None);
    };
    let pods: Api<Pod> = ns.api();
    Ok(pods
        .get_opt(&holder)
        .await?
        .filter(|p| p.name_any() == holder))
}

/// Sends `signal` (a name kill(1) knows: STOP, CONT, KILL, ...) to the process `pid`.
pub fn signal_process(pid: i32, signal: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .output()
        .map_err(|e| anyhow::anyhow!("running kill -{signal} {pid}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "kill -{signal} {pid} failed ({}): {}; is the process still there and ours to signal?",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// One process as /proc shows it: its PID and start time (clock ticks after boot), which tell
/// it apart from a later process that reuses the PID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    pub start_ticks: u64,
}

impl ProcessId {
    /// The process now running as `pid`, if any.
    pub fn of(pid: i32) -> Option<Self> {
        let (_, start_ticks) = proc_stat(pid)?;
        Some(Self { pid, start_ticks })
    }

    /// Its state letter from /proc/<pid>/stat (R, S, T (stopped), Z (exited, not reaped), ...),
    /// or None once it is gone (or the PID belongs to another process now).
    pub fn state(&self) -> Option<char> {
        proc_stat(self.pid)
            .filter(|(_, start)| *start == self.start_ticks)
            .map(|(state, _)| state)
    }

    /// Whether it has exited: gone from /proc, a zombie, or its PID reused.
    pub fn exited(&self) -> bool {
        matches!(self.state(), None | Some('Z') | Some('X'))
    }
}

/// (state, starttime) from /proc/<pid>/stat; the command name may hold spaces and parentheses,
/// so the fields are counted after its last ')'.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 is the state, field 22 the start time (proc(5)).
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// A process held stopped with SIGSTOP: [`StoppedProcess::resume`] sends SIGCONT, and so does
/// dropping it, so no exit path of a test (an error, a failed assertion) leaves it stopped.
#[derive(Debug)]
pub struct StoppedProcess {
    process: ProcessId,
    resumed: bool,
}

impl StoppedProcess {
    /// SIGSTOPs `pid` and waits (bounded, 5 s) until the kernel reports it stopped.
    pub fn stop(pid: i32) -> anyhow::Result<Self> {
        let process = ProcessId::of(pid)
            .ok_or_else(|| anyhow::anyhow!("no process {pid} to stop (it exited already?)"))?;
        signal_process(pid, "STOP")?;
        let stopped = Self {
            process,
            resumed: false,
        };
        crate::wait::wait_until_blocking(
            Duration::from_secs(5),
            &format!("process {pid} in state T (stopped) after SIGSTOP"),
            || stopped.process.state() == Some('T'),
        )?;
        Ok(stopped)
    }

    pub fn process(&self) -> ProcessId {
        self.process
    }

    /// Sends SIGCONT (unless the process is gone already).
    pub fn resume(mut self) -> anyhow::Result<()> {
        self.resumed = true;
        if self.process.exited() {
            return Ok(());
        }
        signal_process(self.process.pid, "CONT")
    }
}

impl Drop for StoppedProcess {
    fn drop(&mut self) {
        if !self.resumed && !self.process.exited() {
            if let Err(e) = signal_process(self.process.pid, "CONT") {
                eprintln!("resuming the stopped process {}: {e}", self.process.pid);
            }
        }
    }
}

/// Restarts one of the sandbox's daemons (`etcd`, `kube-apiserver`, ...) as `scripts/sandbox
/// up` started it: SIGTERM (SIGKILL after 30 s), then [`StoppedDaemon::start`]. Returns the
/// new PID.
pub fn restart_sandbox_daemon(sandbox_dir: &std::path::Path, name: &str) -> anyhow::Result<i32> {
    stop_sandbox_daemon(sandbox_dir, name, "TERM")?.start()
}

/// A sandbox daemon stopped by [`stop_sandbox_daemon`], with what starts it again. Dropped
/// without [`StoppedDaemon::start`] (a test failed in between), it starts it anyway, so the
/// sandbox is never left without it.
pub struct StoppedDaemon {
    sandbox_dir: std::path::PathBuf,
    name: String,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: std::path::PathBuf,
    started: bool,
}

/// Stops one of the sandbox's daemons with `signal` (`TERM`: SIGKILL after 30 s; `KILL`: a
/// crash), after reading its command line, environment and working directory from /proc.
pub fn stop_sandbox_daemon(
    sandbox_dir: &std::path::Path,
    name: &str,
    signal: &str,
) -> anyhow::Result<StoppedDaemon> {
    let pid_file = sandbox_dir.join(format!("pids/{name}.pid"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", pid_file.display()))?
        .trim()
        .parse()?;
    let proc_dir = format!("/proc/{pid}");
    let split = |bytes: Vec<u8>| -> Vec<String> {
        bytes
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split(std::fs::read(format!("{proc_dir}/cmdline"))?);
    let env = split(std::fs::read(format!("{proc_dir}/environ"))?);
    let cwd = std::fs::read_link(format!("{proc_dir}/cwd"))?;
    anyhow::ensure!(!argv.is_empty(), "{name} (pid {pid}) has no command line");
    let process =
        ProcessId::of(pid).ok_or_else(|| anyhow::anyhow!("{name} (pid {pid}) is not running"))?;
    signal_process(pid, signal)?;
    if crate::wait::wait_until_blocking(
        Duration::from_secs(30),
        &format!("{name} (pid {pid}) to exit after SIG{signal}"),
        || process.exited(),
    )
    .is_err()
    {
        signal_process(pid, "KILL")?;
        crate::wait::wait_until_blocking(
            Duration::from_secs(10),
            &format!("{name} (pid {pid}) to exit after SIGKILL"),
            || process.exited(),
        )?;
    }
    Ok(StoppedDaemon {
        sandbox_dir: sandbox_dir.to_path_buf(),
        name: name.to_string(),
        argv,
        env,
        cwd,
        started: false,
    })
}

impl StoppedDaemon {
    /// Starts the daemon again in its own session with the same command line, environment and
    /// working directory, its output appended to `logs/<name>.log` and its new PID written to
    /// `pids/<name>.pid` (so `scripts/sandbox down` stops it). Returns the new PID.
    pub fn start(mut self) -> anyhow::Result<i32> {
        self.started = true;
        self.spawn()
    }

    fn spawn(&self) -> anyhow::Result<i32> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.sandbox_dir.join(format!("logs/{}.log", self.name)))?;
        let mut cmd = std::process::Command::new("setsid");
        cmd.args(&self.argv)
            .env_clear()
            .envs(self.env.iter().filter_map(|kv| kv.split_once('=')))
            .current_dir(&self.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        let new_pid = child.id() as i32;
        let pid_file = self.sandbox_dir.join(format!("pids/{}.pid", self.name));
        std::fs::write(&pid_file, format!("{new_pid}\n"))?;
        Ok(new_pid)
    }
}

impl Drop for StoppedDaemon {
    fn drop(&mut self) {
        if !self.started {
            if let Err(e) = self.spawn() {
                eprintln!(
                    "could not start {} again: {e}; run `scripts/sandbox down` and up",
                    self.name
                );
            }
        }
    }
}
