//! One worker per pod bound to one of the agent's nodes: IP and pod dir, network namespace,
//! ServiceAccount kubeconfig and token dir, DNS files and volumes, init containers then
//! containers (each supervised: probes, restarts with back-off), status reports, and graceful
//! termination on deletion or agent shutdown (then the network namespace is removed).
//! A container's image is an OCI layout when the image dir has one (its own root filesystem,
//! `prepare_layout`), else an image-table program (`prepare_table`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodStatus, Probe, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::Api;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::{finish_deletion, pod_dir, Agent, PodEvent};
use crate::env::{self, ObjectData, PodFacts};
use crate::images::{ImageError, Mode, Templates};
use crate::netns;
use crate::probe::{self, Settings, Tracker};
use crate::runtime::Mount;
use crate::runtime::{self, PidRecord, RunInfo, SpawnSpec};
use crate::serviceaccount;
use crate::status::{self, ContainerRt, PodRt, RunState, Termination};

/// Variables of the agent's own environment that container processes inherit.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "JAVA_HOME",
    "RUST_BACKTRACE",
];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// kubelet's minimum grace period when killing a pod.
const MIN_GRACE: Duration = Duration::from_secs(2);
const VOLUME_REFRESH: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Main,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Stopped,
}

struct PodCtx {
    agent: Arc<Agent>,
    key: String,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
    ip: Ipv4Addr,
    node_name: String,
    /// The node's InternalIP (the pod's hostIP).
    host_ip: Ipv4Addr,
    /// hostNetwork: no namespace of its own, pod IP = node IP.
    host_network: bool,
    hostname: String,
    pod: Mutex<Arc<Pod>>,
    rt: Mutex<PodRt>,
    changed: Notify,
    procs: Mutex<BTreeMap<String, PidRecord>>,
    volumes: Mutex<BTreeMap<String, PathBuf>>,
    /// Grace period for the stop in progress (set before `stop` is cancelled).
    stop_grace: Mutex<Duration>,
}

impl PodCtx {
    fn pod(&self) -> Arc<Pod> {
        self.pod.lock().expect("pod lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut PodRt)) {
        let mut rt = self.rt.lock().expect("rt lock");
        let before = rt.clone();
        f(&mut rt);
        if *rt != before {
            self.changed.notify_one();
        }
    }

    fn update_container(&self, kind: Kind, idx: usize, f: impl FnOnce(&mut ContainerRt)) {
        self.update(|rt| {
            let list = if kind == Kind::Init {
                &mut rt.init
            } else {
                &mut rt.containers
            };
            if let Some(c) = list.get_mut(idx) {
                f(c);
            }
        });
    }

    fn container_state(&self, kind: Kind, idx: usize) -> Option<ContainerRt> {
        let rt = self.rt.lock().expect("rt lock");
        let list = if kind == Kind::Init {
            &rt.init
        } else {
            &rt.containers
        };
        list.get(idx).cloned()
    }

    /// A container process now running: recorded (by PID and start time) for a restarted agent.
    fn track(&self, record: PidRecord) {
        self.procs
            .lock()
            .expect("procs lock")
            .insert(record.container.clone(), record);
        self.record_pids();
    }

    fn record_pids(&self) {
        let recs: Vec<PidRecord> = self
            .procs
            .lock()
            .expect("procs lock")
            .values()
            .cloned()
            .collect();
        if let Err(e) = runtime::write_pid_records(&self.dir, &recs) {
            warn!(pod = %self.key, error = %e, "writing pid records");
        }
    }

    fn restart_policy(&self) -> String {
        self.pod()
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// The pod's network namespace file (`None` for hostNetwork pods).
    fn netns_path(&self) -> Option<PathBuf> {
        (!self.host_network).then(|| netns::ns_path(&netns::ns_name(&self.uid)))
    }

    fn facts<'a>(&'a self, pod: &'a Pod, pod_ip: &'a str, host_ip: &'a str) -> PodFacts<'a> {
        PodFacts {
            pod,
            pod_ip,
            host_ip,
            node_name: &self.node_name,
        }
    }

    fn termination_grace(&self) -> Duration {
        let secs = self
            .pod()
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64).max(MIN_GRACE)
    }
}

fn containers_of(pod: &Pod, kind: Kind) -> Vec<Container> {
    let spec = pod.spec.as_ref();
    match kind {
        Kind::Init => spec
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default(),
        Kind::Main => spec.map(|s| s.containers.clone()).unwrap_or_default(),
    }
}

/// Container runtime state at pod start; restart counts continue from the reported status
/// (the agent restarted) so they never go backwards.
fn initial_rt(pod: &Pod, ip: Ipv4Addr, host_ip: Ipv4Addr) -> PodRt {
    let status = pod.status.as_ref();
    let counts = |statuses: Option<&Vec<k8s_openapi::api::core::v1::ContainerStatus>>| -> BTreeMap<String, i32> {
        statuses.into_iter().flatten().map(|s| (s.name.clone(), s.restart_count)).collect()
    };
    let main_counts = counts(status.and_then(|s| s.container_statuses.as_ref()));
    let init_counts = counts(status.and_then(|s| s.init_container_statuses.as_ref()));
    let make = |cs: Vec<Container>, counts: &BTreeMap<String, i32>| -> Vec<ContainerRt> {
        cs.iter()
            .map(|c| {
                let mut rt = ContainerRt::new(&c.name, c.image.as_deref().unwrap_or_default());
                rt.restart_count = counts.get(&c.name).copied().unwrap_or(0);
                rt
            })
            .collect()
    };
    let init = make(containers_of(pod, Kind::Init), &init_counts);
    let mut containers = make(containers_of(pod, Kind::Main), &main_counts);
    if !init.is_empty() {
        for c in &mut containers {
            c.state = RunState::waiting("PodInitializing", None);
        }
    }
    PodRt {
        initialized: init.is_empty(),
        init,
        containers,
        restart_policy: pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into()),
        pod_ip: Some(ip.to_string()),
        host_ip: Some(host_ip.to_string()),
        start_time: Some(
            status
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now),
        ),
    }
}

/// Marks the containers taken over from a previous agent run as running (with their start,
/// image and readiness as last reported) and the pod as initialized, so that the first status
/// this run computes is the one already in the API.
fn adopt_into_rt(rt: &mut PodRt, pod: &Pod, adopted: &[RunInfo]) {
    if adopted.is_empty() {
        return;
    }
    let status = pod.status.as_ref();
    rt.initialized = true;
    let init_statuses = status.and_then(|s| s.init_container_statuses.as_ref());
    for c in &mut rt.init {
        let done = init_statuses
            .into_iter()
            .flatten()
            .find(|s| s.name == c.name)
            .and_then(|s| s.state.as_ref()?.terminated.as_ref());
        c.state = RunState::Terminated(Termination::new(
            done.map(|t| t.exit_code).unwrap_or(0),
            None,
            done.and_then(|t| t.started_at.as_ref()).map(|t| t.0),
            done.and_then(|t| t.finished_at.as_ref())
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now),
        ));
    }
    let statuses = status.and_then(|s| s.container_statuses.as_ref());
    for c in &mut rt.containers {
        let Some(info) = adopted.iter().find(|a| a.container == c.name) else {
            if matches!(c.state, RunState::Waiting { .. }) {
                c.state = RunState::waiting("ContainerCreating", None);
            }
            continue;
        };
        c.state = RunState::Running {
            started_at: info.started_at.parse().unwrap_or_else(|_| Timestamp::now()),
            pid: info.pid,
        };
        c.image_id = info.image_id.clone();
        c.started = true;
        c.ready = statuses
            .into_iter()
            .flatten()
            .find(|s| s.name == c.name)
            .is_some_and(|s| s.ready);
    }
}

enum End {
    Deleting(Duration),
    Gone(Duration),
    Shutdown,
}

/// Runs one pod from acceptance to removal.
pub async fn run(agent: Arc<Agent>, first: Arc<Pod>, mut rx: watch::Receiver<PodEvent>) {
    let ns = first.metadata.namespace.clone().unwrap_or_default();
    let name = first.metadata.name.clone().unwrap_or_default();
    let uid = first.metadata.uid.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let dir = pod_dir(&agent.pods_dir(), &first);
    if first.metadata.deletion_timestamp.is_some() {
        // Deleted before it ever ran here.
        finish_deletion(&agent.client, &first).await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let Some(node) = agent.node_of(&first) else {
        return; // the dispatcher only starts workers for pods on the agent's nodes
    };
    let (node_name, host_ip) = (node.info.name.clone(), node.info.ip);
    let host_network = first
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let wanted = std::fs::read_to_string(dir.join("ip"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| {
            first
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok())
        });
    let ip = if host_network {
        host_ip
    } else {
        let mut ips = node.ips.lock().expect("ips lock");
        let Some(ip) = ips.allocate(wanted) else {
            warn!(pod = %key, node = %node_name, range = %ips.range(), "no free pod IP on the node; the pod stays Pending");
            return;
        };
        ip
    };
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("ip"), ip.to_string()))
    {
        warn!(pod = %key, error = %e, "creating pod dir {}", dir.display());
    }
    let adopted = agent.take_adoption(&uid);
    info!(pod = %key, %uid, node = %node_name, %ip, host_network, dir = %dir.display(), adopted = adopted.len(), "pod accepted");
    let mut rt = initial_rt(&first, ip, host_ip);
    adopt_into_rt(&mut rt, &first, &adopted);
    let ctx = Arc::new(PodCtx {
        rt: Mutex::new(rt),
        node_name,
        host_ip,
        host_network,
        hostname: crate::dns::pod_hostname(&first),
        agent: agent.clone(),
        key: key.clone(),
        ns,
        name,
        uid,
        dir: dir.clone(),
        ip,
        pod: Mutex::new(first.clone()),
        changed: Notify::new(),
        procs: Mutex::new(BTreeMap::new()),
        volumes: Mutex::new(BTreeMap::new()),
        stop_grace: Mutex::new(MIN_GRACE),
    });
    let stop = CancellationToken::new();
    let status_stop = CancellationToken::new();
    let status_task = tokio::spawn(status_loop(
        ctx.clone(),
        first.status.clone(),
        status_stop.clone(),
    ));
    let life = tokio::spawn(lifecycle(ctx.clone(), stop.clone(), adopted));

    let end = loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break End::Gone(MIN_GRACE);
                }
                let event = rx.borrow_and_update().clone();
                match event {
                    PodEvent::Gone => {
                        let g = ctx.pod().metadata.deletion_grace_period_seconds.unwrap_or(0);
                        break End::Gone(Duration::from_secs(g.max(0) as u64).max(MIN_GRACE));
                    }
                    PodEvent::Update(p) => {
                        let deleting = p.metadata.deletion_timestamp.is_some();
                        let grace = p.metadata.deletion_grace_period_seconds;
                        *ctx.pod.lock().expect("pod lock") = p;
                        if deleting {
                            let g = grace.map(|g| Duration::from_secs(g.max(0) as u64)).unwrap_or_else(|| ctx.termination_grace());
                            break End::Deleting(g.max(MIN_GRACE));
                        }
                    }
                }
            }
            _ = agent.shutdown.cancelled() => break End::Shutdown,
        }
    };
    let grace = match &end {
        End::Deleting(g) | End::Gone(g) => *g,
        End::Shutdown => ctx.termination_grace(),
    };
    info!(pod = %key, grace_secs = grace.as_secs(), reason = match end { End::Deleting(_) => "pod deleted", End::Gone(_) => "pod object gone", End::Shutdown => "agent shutting down" }, "stopping pod");
    *ctx.stop_grace.lock().expect("grace lock") = grace;
    if matches!(end, End::Shutdown) {
        // The pod runs again when the agent comes back: report nothing about this stop (a
        // terminated container of a restartPolicy=Never pod would make the pod Failed for good).
        status_stop.cancel();
    }
    stop.cancel();
    // Supervisors escalate to SIGKILL at the grace period; the margin only guards against a bug.
    if tokio::time::timeout(grace + Duration::from_secs(15), life)
        .await
        .is_err()
    {
        warn!(pod = %key, "containers did not stop in time; killing their process groups");
        for r in ctx.procs.lock().expect("procs lock").values() {
            runtime::signal_group(r.pid, libc::SIGKILL);
        }
    }
    status_stop.cancel();
    let _ = status_task.await;
    ctx.record_pids();
    // Also after a shutdown: the next agent run makes a fresh namespace.
    remove_network(&ctx).await;
    match end {
        End::Shutdown => info!(pod = %key, "pod processes stopped for agent shutdown"),
        End::Deleting(_) | End::Gone(_) => {
            if matches!(end, End::Deleting(_)) {
                finish_deletion(&agent.client, &ctx.pod()).await;
            }
            if !ctx.host_network {
                if let Some(node) = agent.node(&ctx.node_name) {
                    node.ips.lock().expect("ips lock").release(ip);
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(pod = %key, error = %e, "removing pod dir");
            }
            info!(pod = %key, %ip, "pod removed");
        }
    }
}

/// Reports the pod's status whenever the runtime state changes (and re-checks every 10 s), only
/// when the computed status differs from the last one written.
async fn status_loop(ctx: Arc<PodCtx>, initial: Option<PodStatus>, stop: CancellationToken) {
    let api = Api::<Pod>::namespaced(ctx.agent.client.clone(), &ctx.ns);
    let mut prev = initial;
    let mut last: Option<serde_json::Value> = None;
    loop {
        let rt = ctx.rt.lock().expect("rt lock").clone();
        let status = status::compute(&rt, prev.as_ref(), Timestamp::now());
        let mut patch = status::status_patch(&status);
        patch["metadata"] = serde_json::json!({ "uid": ctx.uid });
        if last.as_ref() != Some(&patch) {
            match api
                .patch_status(&ctx.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let old_phase = prev.as_ref().and_then(|p| p.phase.clone());
                    if old_phase != status.phase {
                        info!(pod = %ctx.key, phase = status.phase.as_deref().unwrap_or_default(), "pod phase");
                    }
                    let ready = |s: Option<&PodStatus>| {
                        s.and_then(|s| s.conditions.as_ref())
                            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                            .map(|c| c.status == "True")
                    };
                    if ready(prev.as_ref()) != ready(Some(&status)) {
                        info!(pod = %ctx.key, ready = ready(Some(&status)).unwrap_or(false), "pod readiness");
                    }
                    last = Some(patch);
                    prev = Some(status);
                }
                // Gone, or recreated under the same name (the uid in the patch no longer matches).
                Err(kube::Error::Api(e))
                    if e.code == 404 || (e.code == 422 && e.message.contains("metadata.uid")) =>
                {
                    return
                }
                Err(e) => {
                    warn!(pod = %ctx.key, error = %e, "patching pod status; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            _ = ctx.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.cancelled() => return,
        }
        // Coalesce a burst of changes into one write.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set_all_waiting(ctx: &PodCtx, reason: &str, message: &str) {
    ctx.update(|rt| {
        for c in rt.init.iter_mut().chain(rt.containers.iter_mut()) {
            if matches!(c.state, RunState::Waiting { .. }) && c.last.is_none() {
                c.state = RunState::waiting(reason, Some(message.to_string()));
            }
        }
    });
}

/// Writes the ServiceAccount kubeconfig and materialises volumes.
async fn setup(ctx: &PodCtx) -> Result<(), String> {
    let pod = ctx.pod();
    let sa = serviceaccount::service_account_name(&pod);
    let token =
        serviceaccount::find_token(&ctx.agent.client, &ctx.ns, &sa, ctx.agent.token_wait).await?;
    let doc = serviceaccount::kubeconfig_json(
        &ctx.agent.settings.api_server,
        &ctx.agent.settings.tls,
        &ctx.ns,
        &sa,
        &token,
    );
    serviceaccount::write_kubeconfig(&ctx.dir.join("kubeconfig"), &doc)
        .map_err(|e| format!("writing kubeconfig: {e}"))?;
    // What images (own root filesystem) see at /var/run/secrets/kubernetes.io/serviceaccount.
    let sa_dir = ctx.dir.join("serviceaccount");
    std::fs::create_dir_all(&sa_dir)
        .and_then(|_| serviceaccount::write_kubeconfig(&sa_dir.join("kubeconfig"), &doc))
        .and_then(|_| serviceaccount::write_secret_file(&sa_dir.join("token"), token.as_bytes()))
        .and_then(|_| std::fs::write(sa_dir.join("namespace"), &ctx.ns))
        .and_then(|_| {
            match ctx
                .agent
                .settings
                .tls
                .ca_data
                .as_deref()
                .map(|d| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, d))
            {
                Some(Ok(pem)) => std::fs::write(sa_dir.join("ca.crt"), pem),
                _ => Ok(()),
            }
        })
        .map_err(|e| format!("writing {}: {e}", sa_dir.display()))?;
    let (ip, host_ip) = (ctx.ip.to_string(), ctx.host_ip.to_string());
    let facts = ctx.facts(&pod, &ip, &host_ip);
    if !ctx.host_network {
        write_dns_files(ctx, &pod)?;
    }
    let volumes = crate::volumes::prepare(
        &ctx.agent.client,
        &pod,
        &ctx.dir,
        &ctx.agent.settings.sandbox_dir,
        &facts,
    )
    .await?;
    *ctx.volumes.lock().expect("volumes lock") = volumes;
    Ok(())
}

/// Creates the pod's network namespace (not for hostNetwork pods), retrying with back-off while
/// it fails (e.g. the bridge is missing); the containers wait in ContainerCreating meanwhile.
/// Not raced against `stop`: an `ip` command cut short could leave half a namespace behind.
async fn create_network(ctx: &PodCtx, stop: &CancellationToken) -> bool {
    if ctx.host_network {
        return true;
    }
    let mut attempt = 0;
    loop {
        if stop.is_cancelled() {
            return false;
        }
        match netns::create(&ctx.agent.settings.net, &ctx.uid, ctx.ip).await {
            Ok(net) => {
                info!(pod = %ctx.key, netns = %net.ns, veth = %net.veth, ip = %net.ip, "pod network created");
                return true;
            }
            Err(msg) => {
                let msg = format!("creating the pod's network namespace: {msg}");
                warn!(pod = %ctx.key, error = %msg, "pod sandbox failed; retrying");
                ctx.agent.events.warning(
                    &ctx.pod(),
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {msg}"),
                );
                set_all_waiting(ctx, "ContainerCreating", &msg);
                let delay = ctx.agent.backoff(attempt);
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

/// Removes the pod's veth and namespace (also when creating them was cut short).
async fn remove_network(ctx: &PodCtx) {
    if ctx.host_network {
        return;
    }
    let (ns, veth) = (netns::ns_name(&ctx.uid), netns::veth_name(&ctx.uid));
    match netns::delete(&ns, &veth).await {
        Ok(()) => tracing::debug!(pod = %ctx.key, %ns, "pod network removed"),
        Err(e) => {
            warn!(pod = %ctx.key, error = %e, "removing the pod's network namespace failed; the next agent start removes it")
        }
    }
}

/// Writes `<pod dir>/resolv.conf` and `<pod dir>/hosts`, bind-mounted into every container.
fn write_dns_files(ctx: &PodCtx, pod: &Pod) -> Result<(), String> {
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv = crate::dns::resolv_conf(pod, &ctx.agent.settings.dns, &host_resolv);
    let hosts = crate::dns::hosts_file(pod, &ctx.ip.to_string(), &ctx.agent.settings.dns);
    let hostname = format!("{}\n", ctx.hostname);
    for (file, text) in [
        ("resolv.conf", resolv),
        ("hosts", hosts),
        ("hostname", hostname),
    ] {
        let path = ctx.dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The pod's resolv.conf and hosts over /etc's, unless the container mounts something there.
fn with_dns_mounts(pod_dir: &std::path::Path, volume_mounts: Vec<Mount>) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = [("resolv.conf", "/etc/resolv.conf"), ("hosts", "/etc/hosts")]
        .into_iter()
        .map(|(file, target)| Mount {
            source: pod_dir.join(file),
            target: PathBuf::from(target),
            read_only: false,
        })
        .filter(|m| !volume_mounts.iter().any(|v| v.target == m.target))
        .collect();
    mounts.extend(volume_mounts);
    mounts
}

/// Network, setup, init containers, then the containers. `adopted`: containers a previous
/// agent run left running (the network exists, init containers are done): supervised as they
/// are, the others started.
async fn lifecycle(ctx: Arc<PodCtx>, stop: CancellationToken, mut adopted: Vec<RunInfo>) {
    if adopted.is_empty() && !create_network(&ctx, &stop).await {
        return;
    }
    let mut attempt = 0;
    loop {
        let result = tokio::select! {
            r = setup(&ctx) => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(()) => break,
            Err(msg) => {
                warn!(pod = %ctx.key, error = %msg, "pod setup failed; retrying");
                ctx.agent
                    .events
                    .warning(&ctx.pod(), "FailedMount", msg.clone());
                set_all_waiting(&ctx, "ContainerCreating", &msg);
                let delay = ctx.agent.backoff(attempt);
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
    tokio::spawn(refresh_volumes(ctx.clone(), stop.clone()));
    let pod = ctx.pod();
    if adopted.is_empty() {
        for idx in 0..containers_of(&pod, Kind::Init).len() {
            if supervise(ctx.clone(), Kind::Init, idx, stop.clone(), None).await
                != Outcome::Succeeded
            {
                return;
            }
        }
    }
    ctx.update(|rt| rt.initialized = true);
    let tasks: Vec<_> = containers_of(&pod, Kind::Main)
        .iter()
        .enumerate()
        .map(|(idx, c)| {
            let taken = adopted
                .iter()
                .position(|a| a.container == c.name)
                .map(|i| adopted.swap_remove(i));
            tokio::spawn(supervise(ctx.clone(), Kind::Main, idx, stop.clone(), taken))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Keeps configMap, secret and downwardAPI volume files up to date (as kubelet's periodic sync does).
async fn refresh_volumes(ctx: Arc<PodCtx>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(VOLUME_REFRESH) => {}
            _ = stop.cancelled() => return,
        }
        let pod = ctx.pod();
        let (ip, host_ip) = (ctx.ip.to_string(), ctx.host_ip.to_string());
        let facts = ctx.facts(&pod, &ip, &host_ip);
        if let Err(e) = crate::volumes::prepare(
            &ctx.agent.client,
            &pod,
            &ctx.dir,
            &ctx.agent.settings.sandbox_dir,
            &facts,
        )
        .await
        {
            tracing::debug!(pod = %ctx.key, error = %e, "refreshing volumes");
        }
    }
}

struct Prepared {
    spawn: SpawnSpec,
    image_id: String,
    target: probe::Target,
}

struct PrepError {
    reason: &'static str,
    message: String,
    retry: Duration,
}

async fn fetch_objects(ctx: &PodCtx, c: &Container) -> Result<ObjectData, String> {
    let (cms, secrets) = env::referenced_objects(c);
    let mut data = ObjectData::default();
    let cm_api = Api::<ConfigMap>::namespaced(ctx.agent.client.clone(), &ctx.ns);
    for name in cms {
        let cm = cm_api
            .get_opt(&name)
            .await
            .map_err(|e| format!("getting configmap {name}: {e}"))?;
        data.config_maps
            .insert(name, cm.map(|cm| cm.data.unwrap_or_default()));
    }
    let secret_api = Api::<Secret>::namespaced(ctx.agent.client.clone(), &ctx.ns);
    for name in secrets {
        let s = secret_api
            .get_opt(&name)
            .await
            .map_err(|e| format!("getting secret {name}: {e}"))?;
        data.secrets.insert(
            name,
            s.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).to_string()))
                    .collect()
            }),
        );
    }
    Ok(data)
}

fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    true // looked up in PATH at exec; a failure shows as RunContainerError
}

/// Container paths of the files every container gets from the pod (not for hostNetwork pods,
/// which see the host's: with a rootfs they are bound from the host).
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn image_pull_error(message: String) -> PrepError {
    PrepError {
        reason: "ErrImagePull",
        message,
        retry: Duration::from_secs(10),
    }
}

/// Lets a non-root container read the pod's credentials (kubeconfig, token), as kubelet hands
/// projected tokens to the pod's user: owner uid, group fsGroup (or the gid), 0640 / 0600.
fn share_credentials(ctx: &PodCtx, creds: &crate::users::Credentials, fs_group: Option<u32>) {
    if creds.uid == 0 {
        return;
    }
    let files = [
        ctx.dir.join("kubeconfig"),
        ctx.dir.join("serviceaccount/token"),
        ctx.dir.join("serviceaccount/kubeconfig"),
    ];
    for f in files.iter().filter(|f| f.exists()) {
        let gid = fs_group.unwrap_or(creds.gid);
        let mode = if fs_group.is_some() { 0o640 } else { 0o600 };
        if let Err(e) = std::os::unix::fs::chown(f, Some(creds.uid), Some(gid)).and_then(|_| {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(mode))
        }) {
            warn!(pod = %ctx.key, file = %f.display(), error = %e, "handing the pod's credentials to its user");
        }
    }
}

fn pod_fs_group(pod: &Pod) -> Option<u32> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group)
        .map(|g| g as u32)
}

fn identity_err(e: crate::users::UserError) -> PrepError {
    PrepError {
        reason: e.reason,
        message: e.message,
        retry: Duration::from_secs(10),
    }
}

async fn prepare(ctx: &PodCtx, c: &Container) -> Result<Prepared, PrepError> {
    let image = c.image.clone().unwrap_or_default();
    // A reference that does not parse cannot name a layout; the table reports it.
    let layout = if crate::oci::parse_ref(&image).is_ok() {
        let dir = ctx.agent.settings.image_dir.clone();
        let img = image.clone();
        tokio::task::spawn_blocking(move || crate::oci::lookup(&dir, &img))
            .await
            .map_err(|e| image_pull_error(e.to_string()))?
            .map_err(image_pull_error)?
    } else {
        crate::oci::Lookup::NoLayout
    };
    match layout {
        crate::oci::Lookup::Found(img) => prepare_layout(ctx, c, *img).await,
        crate::oci::Lookup::Missing(m) => Err(image_pull_error(m.to_string())),
        crate::oci::Lookup::NoLayout => prepare_table(ctx, c).await,
    }
}

/// The container's env (resolved, `$(VAR)`-expanded command and args) or a config error.
struct ContainerInput {
    env: BTreeMap<String, String>,
    command: Vec<String>,
    args: Vec<String>,
}

async fn container_input(ctx: &PodCtx, c: &Container) -> Result<ContainerInput, PrepError> {
    let pod = ctx.pod();
    let config_err = |message: String| PrepError {
        reason: "CreateContainerConfigError",
        message,
        retry: ctx.agent.backoff(2),
    };
    let data = fetch_objects(ctx, c).await.map_err(config_err)?;
    let (ip, host_ip) = (ctx.ip.to_string(), ctx.host_ip.to_string());
    let facts = ctx.facts(&pod, &ip, &host_ip);
    let env = env::resolve_env(c, &facts, &data).map_err(|e| config_err(e.to_string()))?;
    let command = env::expand_all(c.command.as_deref().unwrap_or_default(), &env);
    let args = env::expand_all(c.args.as_deref().unwrap_or_default(), &env);
    Ok(ContainerInput { env, command, args })
}

/// A container from an OCI layout: a fresh rootfs from its layers, the image's process config
/// under the container's, its user.
async fn prepare_layout(
    ctx: &PodCtx,
    c: &Container,
    img: crate::oci::LayoutImage,
) -> Result<Prepared, PrepError> {
    let pod = ctx.pod();
    let input = container_input(ctx, c).await?;
    let root = ctx.dir.join("rootfs").join(&c.name);
    let started = Instant::now();
    let unpack = {
        let (img, root) = (img.clone(), root.clone());
        tokio::task::spawn_blocking(move || crate::rootfs::create(&img, &root)).await
    };
    unpack
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| PrepError {
            reason: "CreateContainerError",
            message: format!(
                "creating the root filesystem of {:?} from {}: {e}",
                c.image.as_deref().unwrap_or_default(),
                img.layout.display()
            ),
            retry: ctx.agent.backoff(2),
        })?;
    info!(pod = %ctx.key, container = %c.name, image = %img.image_id(), layers = img.manifest.layers.len(),
        ms = started.elapsed().as_millis() as u64, root = %root.display(), "root filesystem unpacked");
    let read_in_root = |p: &str| {
        crate::oci::resolve_in_root(&root, std::path::Path::new(p))
            .and_then(std::fs::read_to_string)
            .unwrap_or_default()
    };
    let (passwd, group) = (read_in_root("/etc/passwd"), read_in_root("/etc/group"));
    let image_user = crate::users::ImageUser {
        user: img.config.user.as_deref().unwrap_or_default(),
        passwd: &passwd,
        group: &group,
    };
    let identity = crate::users::resolve(&pod, c, Some(&image_user)).map_err(identity_err)?;
    // Env: the image's, then the container's on top, then what the agent adds.
    let mut env = crate::oci::image_env(&img.config);
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.extend(input.env.clone());
    env.entry("HOSTNAME".into())
        .or_insert_with(|| ctx.hostname.clone());
    if let Some(home) = &identity.home {
        env.entry("HOME".into()).or_insert_with(|| home.clone());
    }
    let automount = pod
        .spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token)
        != Some(false);
    // The API server's ServiceAccount admission adds a projected `kube-api-access-*` volume at
    // SA_DIR (token, ca.crt, namespace); the agent cannot project tokens, so its own dir (token,
    // namespace, kubeconfig) takes that place. Any other volume mounted there wins.
    let pod_volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let is_token_volume = |name: &str| {
        pod_volumes.iter().any(|v| {
            v.name == name
                && v.projected.as_ref().is_some_and(|p| {
                    p.sources
                        .iter()
                        .flatten()
                        .any(|s| s.service_account_token.is_some())
                })
        })
    };
    let at_sa_dir =
        |m: &k8s_openapi::api::core::v1::VolumeMount| m.mount_path.trim_end_matches('/') == SA_DIR;
    let sa_mounted = automount
        && !c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| at_sa_dir(m) && !is_token_volume(&m.name));
    if sa_mounted && !input.env.contains_key("KUBECONFIG") {
        env.insert("KUBECONFIG".into(), format!("{SA_DIR}/kubeconfig"));
    }
    let argv = crate::oci::merge_command(
        img.config.entrypoint.as_deref().unwrap_or_default(),
        img.config.cmd.as_deref().unwrap_or_default(),
        &input.command,
        &input.args,
    );
    let Some((argv0, args)) = argv.split_first() else {
        return Err(PrepError {
            reason: "CreateContainerError",
            message: format!(
                "image {:?} has no Entrypoint or Cmd and the container gives no command",
                c.image.as_deref().unwrap_or_default()
            ),
            retry: Duration::from_secs(10),
        });
    };
    let working_dir = c
        .working_dir
        .clone()
        .or_else(|| img.config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !working_dir.starts_with('/') {
        return Err(PrepError {
            reason: "CreateContainerConfigError",
            message: format!("workingDir {working_dir:?} must be an absolute path"),
            retry: Duration::from_secs(10),
        });
    }
    // As a runtime does: a missing working dir is created in the container's filesystem.
    if let Ok(host_wd) = crate::oci::resolve_in_root(&root, std::path::Path::new(&working_dir)) {
        let _ = std::fs::create_dir_all(host_wd);
    }
    let program = crate::oci::find_program(
        &root,
        argv0,
        env.get("PATH").map(String::as_str).unwrap_or(DEFAULT_PATH),
        &working_dir,
    )
    .map_err(|e| PrepError {
        reason: "RunContainerError",
        message: format!("image {:?}: {e}", c.image.as_deref().unwrap_or_default()),
        retry: ctx.agent.backoff(2),
    })?;
    let volumes = ctx.volumes.lock().expect("volumes lock").clone();
    let config_err = |message: String| PrepError {
        reason: "CreateContainerConfigError",
        message,
        retry: ctx.agent.backoff(2),
    };
    let mut without_token = c.clone();
    if sa_mounted {
        if let Some(vms) = without_token.volume_mounts.as_mut() {
            vms.retain(|m| !(at_sa_dir(m) && is_token_volume(&m.name)));
        }
    }
    let volume_mounts = crate::volumes::mounts_for(&without_token, &volumes).map_err(config_err)?;
    let etc: [(&str, PathBuf); 3] = if ctx.host_network {
        [
            ("/etc/resolv.conf", "/etc/resolv.conf".into()),
            ("/etc/hosts", "/etc/hosts".into()),
            ("/etc/hostname", "/etc/hostname".into()),
        ]
    } else {
        [
            ("/etc/resolv.conf", ctx.dir.join("resolv.conf")),
            ("/etc/hosts", ctx.dir.join("hosts")),
            ("/etc/hostname", ctx.dir.join("hostname")),
        ]
    };
    let mut mounts: Vec<Mount> = etc
        .into_iter()
        .filter(|(_, source)| source.is_file())
        .map(|(target, source)| Mount {
            source,
            target: PathBuf::from(target),
            read_only: false,
        })
        .collect();
    if sa_mounted && ctx.dir.join("serviceaccount").is_dir() {
        mounts.push(Mount {
            source: ctx.dir.join("serviceaccount"),
            target: PathBuf::from(SA_DIR),
            read_only: true,
        });
    }
    mounts.retain(|m| !volume_mounts.iter().any(|v| v.target == m.target));
    mounts.extend(volume_mounts);
    mounts.sort_by_key(|m| m.target.components().count());
    if let Some(creds) = &identity.creds {
        share_credentials(ctx, creds, pod_fs_group(&pod));
    }
    let read_only = c
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);
    let env: Vec<(String, String)> = env.into_iter().collect();
    let target = probe::Target {
        pod_ip: ctx.ip.to_string(),
        env: env.clone(),
        ports: c.ports.clone().unwrap_or_default(),
        working_dir: working_dir.clone(),
        pid: None,
        netns: ctx.netns_path(),
        user: identity.creds.clone(),
        no_new_privs: identity.no_new_privs,
    };
    Ok(Prepared {
        image_id: img.image_id(),
        spawn: SpawnSpec {
            program,
            args: args.to_vec(),
            env,
            working_dir: PathBuf::from(working_dir),
            mounts,
            log_file: ctx.agent.pod_log(&ctx.ns, &ctx.name, &c.name),
            netns: ctx.netns_path(),
            hostname: (!ctx.host_network).then(|| ctx.hostname.clone()),
            rootfs: Some(runtime::Rootfs { root, read_only }),
            user: identity.creds,
            no_new_privs: identity.no_new_privs,
        },
        target,
    })
}

/// A container whose image is in the image table: a program on the host's filesystem.
async fn prepare_table(ctx: &PodCtx, c: &Container) -> Result<Prepared, PrepError> {
    let pod = ctx.pod();
    let image = c.image.clone().unwrap_or_default();
    let table = ctx.agent.images();
    let never = c.image_pull_policy.as_deref() == Some("Never");
    let entry = table.lookup(&image).map_err(|e| {
        if never {
            // kubelet's wording for a missing image that may not be pulled.
            PrepError {
                reason: "ErrImageNeverPull",
                message: format!(
                    "Container image {image:?} is not present with pull policy of Never ({e})"
                ),
                retry: Duration::from_secs(10),
            }
        } else {
            image_pull_error(e.to_string())
        }
    })?;
    let config_err = |message: String| PrepError {
        reason: "CreateContainerConfigError",
        message,
        retry: ctx.agent.backoff(2),
    };
    let identity = crate::users::resolve(&pod, c, None).map_err(identity_err)?;
    let ContainerInput {
        env: container_env,
        command,
        args,
    } = container_input(ctx, c).await?;
    let ip = ctx.ip.to_string();
    let dir = ctx.dir.to_string_lossy().to_string();
    let agent_env = |n: &str| std::env::var(n).ok();
    let templates = Templates {
        bin_dir: &ctx.agent.settings.bin_dir,
        repo: &ctx.agent.settings.repo_dir,
        pod_ip: &ip,
        pod_dir: &dir,
        agent_env: &agent_env,
    };
    let launch = table
        .resolve(&image, &command, &args, &templates)
        .map_err(|e| PrepError {
            reason: if matches!(e, ImageError::Unknown { .. }) {
                "ErrImagePull"
            } else {
                "CreateContainerConfigError"
            },
            message: e.to_string(),
            retry: Duration::from_secs(10),
        })?;
    if entry.mode == Mode::ReplaceCommand && !program_exists(&launch.program) {
        return Err(PrepError {
            reason: "ErrImagePull",
            message: format!(
                "image {image:?}: program {} does not exist (build the workspace, or set {} on the agent)",
                launch.program,
                entry.override_env.as_deref().unwrap_or("the entry's override_env")
            ),
            retry: Duration::from_secs(10),
        });
    }
    // Environment: inherited basics < container env < agent-provided < image table entry.
    let mut env: BTreeMap<String, String> = INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.extend(container_env.clone());
    env.entry("HOSTNAME".into())
        .or_insert_with(|| ctx.hostname.clone());
    if !container_env.contains_key("KUBECONFIG") {
        env.insert(
            "KUBECONFIG".into(),
            ctx.dir.join("kubeconfig").to_string_lossy().to_string(),
        );
    }
    env.extend(launch.env.iter().cloned());
    let volumes = ctx.volumes.lock().expect("volumes lock").clone();
    let mut mounts = crate::volumes::mounts_for(c, &volumes).map_err(config_err)?;
    if !ctx.host_network {
        mounts = with_dns_mounts(&ctx.dir, mounts);
    }
    let working_dir = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.dir.clone());
    if !mounts.iter().any(|m| working_dir.starts_with(&m.target)) {
        let _ = std::fs::create_dir_all(&working_dir);
    }
    if let Some(creds) = identity.creds.as_ref().filter(|u| u.uid != 0) {
        share_credentials(ctx, creds, pod_fs_group(&pod));
        // The pod dir stands in for the image's working dir (ZooKeeper writes conf/ and data/
        // there): a non-root program needs to own it, and a HOME it can write.
        if working_dir == ctx.dir {
            if let Err(e) = std::os::unix::fs::chown(&ctx.dir, Some(creds.uid), Some(creds.gid)) {
                warn!(pod = %ctx.key, error = %e, "handing the pod dir to the container's user");
            }
        }
        if !container_env.contains_key("HOME") {
            env.insert("HOME".into(), working_dir.to_string_lossy().to_string());
        }
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let target = probe::Target {
        pod_ip: ip.clone(),
        env: env.clone(),
        ports: c.ports.clone().unwrap_or_default(),
        working_dir: working_dir.to_string_lossy().to_string(),
        pid: None,
        netns: ctx.netns_path(),
        user: identity.creds.clone(),
        no_new_privs: identity.no_new_privs,
    };
    Ok(Prepared {
        image_id: format!("sandbox://{}", launch.program),
        spawn: SpawnSpec {
            program: launch.program,
            args: launch.args,
            env,
            working_dir,
            mounts,
            log_file: ctx.agent.pod_log(&ctx.ns, &ctx.name, &c.name),
            netns: ctx.netns_path(),
            hostname: (!ctx.host_network).then(|| ctx.hostname.clone()),
            rootfs: None,
            user: identity.creds,
            no_new_privs: identity.no_new_privs,
        },
        target,
    })
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 255,
    }
}

/// A container's main process: our child, or adopted from a previous agent run (not our
/// child: its exit is seen by polling /proc, and its exit status is unknown).
enum Running {
    Child(tokio::process::Child),
    Adopted { pid: u32, start_time: u64 },
}

impl Running {
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Running::Child(child) => child.wait().await,
            Running::Adopted { pid, start_time } => {
                while runtime::process_running(*pid, *start_time) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(std::io::Error::other(
                    "exit status unknown: the process was started by an earlier agent run",
                ))
            }
        }
    }
}

/// A started (or adopted) container: what the supervisor needs while it runs.
struct Launched {
    process: Running,
    pid: u32,
    started_at: Timestamp,
    log_file: PathBuf,
    log_offset: u64,
    target: probe::Target,
}

/// SIGTERM to the group (after the preStop hook, if any), then SIGKILL once `grace` has passed.
async fn kill_container(
    ctx: &PodCtx,
    c: &Container,
    child: &mut Running,
    pid: u32,
    target: &probe::Target,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + grace;
    if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) {
        info!(pod = %ctx.key, container = %c.name, "running preStop hook");
        tokio::select! {
            r = probe::run_handler(hook, target, grace) => {
                if let Err(e) = r {
                    warn!(pod = %ctx.key, container = %c.name, error = %e, "preStop hook failed");
                }
            }
            st = child.wait() => return st,
        }
    }
    info!(pod = %ctx.key, container = %c.name, pid, grace_secs = grace.as_secs(), "sending SIGTERM");
    runtime::signal_group(pid, libc::SIGTERM);
    tokio::select! {
        st = child.wait() => return st,
        _ = tokio::time::sleep_until(deadline) => {}
    }
    info!(pod = %ctx.key, container = %c.name, pid, grace_secs = grace.as_secs(), "grace period over; sending SIGKILL");
    runtime::signal_group(pid, libc::SIGKILL);
    child.wait().await
}

/// Runs one container until it completes for good or the pod stops; restarts it per the pod's
/// restartPolicy with exponential back-off (CrashLoopBackOff). `adopted`: the container is
/// already running (left by a previous agent run): its first run is supervised, not started.
async fn supervise(
    ctx: Arc<PodCtx>,
    kind: Kind,
    idx: usize,
    stop: CancellationToken,
    mut adopted: Option<RunInfo>,
) -> Outcome {
    let mut crashes: u32 = 0;
    loop {
        if stop.is_cancelled() {
            return Outcome::Stopped;
        }
        let pod = ctx.pod();
        let Some(c) = containers_of(&pod, kind).get(idx).cloned() else {
            return Outcome::Stopped;
        };
        let was_adopted = adopted.is_some();
        let launched = match adopted.take() {
            Some(info) => adopt(&ctx, info),
            None => match launch(&ctx, kind, idx, &c, &mut crashes, &stop).await {
                Some(l) => l,
                None if stop.is_cancelled() => return Outcome::Stopped,
                None => continue,
            },
        };
        let Launched {
            process: mut child,
            pid,
            started_at,
            log_file,
            log_offset,
            target,
        } = launched;
        let started_instant = Instant::now();
        // An adopted container passed its startup probe in the earlier run (as kubelet counts
        // a container started before its restart as started).
        let probed = if was_adopted {
            Container {
                startup_probe: None,
                ..c.clone()
            }
        } else {
            c.clone()
        };
        let probes_stop = stop.child_token();
        let (kill_tx, mut kill_rx) = mpsc::channel::<String>(1);
        if kind == Kind::Main {
            tokio::spawn(probe_loop(
                ctx.clone(),
                idx,
                probed,
                target.clone(),
                probes_stop.clone(),
                kill_tx,
            ));
        } else {
            drop(kill_tx);
        }
        let mut kill_message = None;
        let status = tokio::select! {
            st = child.wait() => st,
            Some(reason) = kill_rx.recv() => {
                info!(pod = %ctx.key, container = %c.name, pid, %reason, "killing container");
                ctx.agent.events.normal(&pod, "Killing", format!("Container {} {reason}", c.name));
                kill_message = Some(reason);
                kill_container(&ctx, &c, &mut child, pid, &target, ctx.termination_grace()).await
            }
            _ = stop.cancelled() => {
                let grace = *ctx.stop_grace.lock().expect("grace lock");
                if !ctx.agent.shutdown.is_cancelled() {
                    ctx.agent.events.normal(&pod, "Killing", format!("Stopping container {}", c.name));
                }
                kill_container(&ctx, &c, &mut child, pid, &target, grace).await
            }
        };
        probes_stop.cancel();
        // Whatever else is left in the container's process group goes with it.
        runtime::signal_group(pid, libc::SIGKILL);
        ctx.procs.lock().expect("procs lock").remove(&c.name);
        ctx.record_pids();
        runtime::remove_run_info(&ctx.dir, &c.name);
        let code = exit_code(status);
        let mut term = Termination::new(code, None, Some(started_at), Timestamp::now());
        term.pid = Some(pid);
        term.message = kill_message.or_else(|| {
            let fallback = c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
            (code != 0 && fallback)
                .then(|| runtime::log_tail(&log_file, log_offset, 80, 2048))
                .flatten()
        });
        info!(pod = %ctx.key, container = %c.name, pid, exit_code = code,
            ran_secs = started_instant.elapsed().as_secs(), "container exited");
        let policy = ctx.restart_policy();
        let restart = match kind {
            Kind::Init => code != 0 && policy != "Never",
            Kind::Main => policy == "Always" || (policy == "OnFailure" && code != 0),
        };
        if stop.is_cancelled() || !restart {
            ctx.update_container(kind, idx, |s| {
                s.state = RunState::Terminated(term.clone());
                s.ready = false;
                s.started = false;
            });
            return if stop.is_cancelled() {
                Outcome::Stopped
            } else if code == 0 {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            };
        }
        if started_instant.elapsed() >= ctx.agent.settings.backoff_max * 2 {
            crashes = 0;
        }
        let delay = ctx.agent.backoff(crashes);
        crashes += 1;
        let message = format!(
            "back-off {}s restarting failed container={} pod={}_{}({})",
            delay.as_secs_f64().ceil(),
            c.name,
            ctx.name,
            ctx.ns,
            ctx.uid
        );
        ctx.update_container(kind, idx, |s| {
            s.last = Some(term.clone());
            s.restart_count += 1;
            s.ready = false;
            s.started = false;
            s.state = RunState::waiting("CrashLoopBackOff", Some(message));
        });
        info!(pod = %ctx.key, container = %c.name, exit_code = code, delay_ms = delay.as_millis() as u64, "container will restart after back-off");
        ctx.agent.events.warning(
            &pod,
            "BackOff",
            format!(
                "Back-off restarting failed container {} (exit code {code})",
                c.name
            ),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Outcome::Stopped,
        }
    }
}

/// Prepares and starts a container: `None` when it cannot start (its state says why; after a
/// back-off, or once `stop` is cancelled).
async fn launch(
    ctx: &Arc<PodCtx>,
    kind: Kind,
    idx: usize,
    c: &Container,
    crashes: &mut u32,
    stop: &CancellationToken,
) -> Option<Launched> {
    let pod = ctx.pod();
    let prepared = match prepare(ctx, c).await {
        Ok(p) => p,
        Err(e) => {
            let changed = match ctx.container_state(kind, idx).map(|s| s.state) {
                Some(RunState::Waiting { reason, message }) => {
                    reason != e.reason || message.as_deref() != Some(e.message.as_str())
                }
                _ => true,
            };
            if changed {
                warn!(pod = %ctx.key, container = %c.name, reason = e.reason, message = %e.message, "container cannot start");
                ctx.agent.events.warning(
                    &pod,
                    "Failed",
                    format!("Error: {}: {}", e.reason, e.message),
                );
            }
            ctx.update_container(kind, idx, |s| {
                s.state = RunState::waiting(e.reason, Some(e.message.clone()))
            });
            tokio::select! {
                _ = tokio::time::sleep(e.retry) => {}
                _ = stop.cancelled() => {}
            }
            return None;
        }
    };
    if stop.is_cancelled() {
        return None;
    }
    let log_offset = std::fs::metadata(&prepared.spawn.log_file)
        .map(|m| m.len())
        .unwrap_or(0);
    let child = match runtime::spawn(&prepared.spawn) {
        Ok(child) => child,
        Err(e) => {
            let message = format!("{e:#}");
            warn!(pod = %ctx.key, container = %c.name, error = %message, "starting container failed");
            ctx.agent.events.warning(
                &pod,
                "Failed",
                format!("Error: failed to start container {}: {message}", c.name),
            );
            ctx.update_container(kind, idx, |s| {
                s.state = RunState::waiting("RunContainerError", Some(message.clone()))
            });
            let delay = ctx.agent.backoff(*crashes);
            *crashes += 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => {}
            }
            return None;
        }
    };
    let pid = child.id().unwrap_or(0);
    let started_at = Timestamp::now();
    let start_time = runtime::start_time(pid).unwrap_or(0);
    ctx.track(PidRecord {
        container: c.name.clone(),
        pid,
        start_time,
    });
    let mut target = prepared.target.clone();
    target.pid = Some(pid);
    if kind == Kind::Main {
        let info = RunInfo {
            container: c.name.clone(),
            pid,
            start_time,
            started_at: started_at.to_string(),
            image_id: prepared.image_id.clone(),
            log_file: prepared.spawn.log_file.clone(),
            target: target.clone(),
        };
        if let Err(e) = runtime::write_run_info(&ctx.dir, &info) {
            warn!(pod = %ctx.key, container = %c.name, error = %e, "writing the run file (a restarted agent will restart this container)");
        }
    }
    let has_startup = kind == Kind::Main && c.startup_probe.is_some();
    let has_readiness = kind == Kind::Main && c.readiness_probe.is_some();
    ctx.update_container(kind, idx, |s| {
        s.state = RunState::Running { started_at, pid };
        s.image_id = prepared.image_id.clone();
        s.started = !has_startup;
        s.ready = !has_startup && !has_readiness;
    });
    info!(pod = %ctx.key, container = %c.name, pid, program = %prepared.spawn.program,
        args = ?prepared.spawn.args, restarts = ctx.container_state(kind, idx).map(|s| s.restart_count).unwrap_or(0),
        "container started");
    ctx.agent
        .events
        .normal(&pod, "Started", format!("Started container {}", c.name));
    Some(Launched {
        process: Running::Child(child),
        pid,
        started_at,
        log_file: prepared.spawn.log_file,
        log_offset,
        target,
    })
}

/// Takes over a container a previous agent run started (its state was set by `adopt_into_rt`).
fn adopt(ctx: &PodCtx, info: RunInfo) -> Launched {
    ctx.track(PidRecord {
        container: info.container.clone(),
        pid: info.pid,
        start_time: info.start_time,
    });
    info!(pod = %ctx.key, container = %info.container, pid = info.pid, "container adopted from a previous agent run (kept running)");
    let log_offset = std::fs::metadata(&info.log_file)
        .map(|m| m.len())
        .unwrap_or(0);
    Launched {
        process: Running::Adopted {
            pid: info.pid,
            start_time: info.start_time,
        },
        pid: info.pid,
        started_at: info.started_at.parse().unwrap_or_else(|_| Timestamp::now()),
        log_file: info.log_file,
        log_offset,
        target: info.target,
    }
}

/// Startup, then liveness and readiness probes of one container run; a failed startup or
/// liveness probe asks the supervisor (through `kill`) to kill and restart the container.
async fn probe_loop(
    ctx: Arc<PodCtx>,
    idx: usize,
    c: Container,
    target: probe::Target,
    stop: CancellationToken,
    kill: mpsc::Sender<String>,
) {
    let name = c.name.clone();
    if let Some(p) = c.startup_probe.clone() {
        match run_probe(&ctx, &name, "Startup", &p, &target, &stop, None).await {
            Some(true) => ctx.update_container(Kind::Main, idx, |s| {
                s.started = true;
                if c.readiness_probe.is_none() {
                    s.ready = true;
                }
            }),
            Some(false) => {
                let _ = kill.send("startup probe failed".into()).await;
                return;
            }
            None => return,
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(p) = c.liveness_probe.clone() {
        let (ctx, name, target, stop, kill) = (
            ctx.clone(),
            name.clone(),
            target.clone(),
            stop.clone(),
            kill.clone(),
        );
        tasks.spawn(async move {
            if run_probe(&ctx, &name, "Liveness", &p, &target, &stop, None).await == Some(false) {
                let _ = kill
                    .send(format!(
                        "liveness probe failed: container {name} will be restarted"
                    ))
                    .await;
            }
        });
    }
    if let Some(p) = c.readiness_probe.clone() {
        let (ctx, name, target, stop) = (ctx.clone(), name.clone(), target.clone(), stop.clone());
        tasks.spawn(async move {
            run_probe(&ctx, &name, "Readiness", &p, &target, &stop, Some(idx)).await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Probes periodically. Startup/liveness return at their first failure verdict (`Some(false)`)
/// or startup success (`Some(true)`); readiness (`ready_idx`) runs until stopped, updating
/// the container's readiness. `None` when stopped.
async fn run_probe(
    ctx: &PodCtx,
    container: &str,
    kind: &str,
    p: &Probe,
    target: &probe::Target,
    stop: &CancellationToken,
    ready_idx: Option<usize>,
) -> Option<bool> {
    let settings = Settings::of(p);
    let mut tracker = match kind {
        "Liveness" => Tracker::new(
            Settings {
                success_threshold: 1,
                ..settings
            },
            Some(true),
        ),
        "Startup" => Tracker::new(
            Settings {
                success_threshold: 1,
                ..settings
            },
            None,
        ),
        _ => Tracker::new(settings, None),
    };
    tokio::select! {
        _ = tokio::time::sleep(settings.initial_delay) => {}
        _ = stop.cancelled() => return None,
    }
    let mut last_error: Option<String> = None;
    loop {
        let result = tokio::select! {
            r = probe::run_once(p, target) => r,
            _ = stop.cancelled() => return None,
        };
        let ok = result.is_ok();
        if let Err(e) = &result {
            if last_error.as_deref() != Some(e.as_str()) {
                info!(pod = %ctx.key, container, probe = kind, error = %e, "probe failed");
                ctx.agent.events.warning(
                    &ctx.pod(),
                    "Unhealthy",
                    format!("{kind} probe failed: {e}"),
                );
            }
        }
        last_error = result.err();
        if let Some(verdict) = tracker.record(ok) {
            info!(pod = %ctx.key, container, probe = kind, success = verdict, "probe result changed");
            match (kind, ready_idx) {
                (_, Some(idx)) => {
                    ctx.update_container(Kind::Main, idx, |s| s.ready = verdict && s.started)
                }
                ("Startup", _) if verdict => return Some(true),
                (_, _) if !verdict => return Some(false),
                _ => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.period) => {}
            _ = stop.cancelled() => return None,
        }
    }
}
