//! The agent's shared context and the pod dispatcher: routes watch events to one worker task per
//! pod bound (by kube-scheduler) to one of the agent's nodes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Preconditions};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dns::DnsSettings;
use crate::images::ImageTable;
use crate::ipam::IpAllocator;
use crate::netns::NetConfig;
use crate::node::NodeInfo;
use crate::runtime::{Leftover, RunInfo};
use crate::serviceaccount::ServerTls;

/// One of the agent's nodes and the allocator of its podCIDR.
pub struct NodeCtx {
    pub info: NodeInfo,
    pub ips: Mutex<IpAllocator>,
}

/// How the agent is configured (from the command line), besides its nodes.
pub struct Settings {
    pub sandbox_dir: PathBuf,
    /// OCI image layouts (`<image_dir>/<name>/index.json`), looked up before the image table.
    pub image_dir: PathBuf,
    pub bin_dir: String,
    pub repo_dir: String,
    pub api_server: String,
    pub tls: ServerTls,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub net: NetConfig,
    pub dns: DnsSettings,
}

pub struct Agent {
    pub client: Client,
    pub nodes: Vec<NodeCtx>,
    pub settings: Settings,
    pub images_path: PathBuf,
    /// How long a pod start waits for its ServiceAccount's token (TokenRequest).
    pub token_wait: Duration,
    pub shutdown: CancellationToken,
    pub events: crate::events::Events,
    images: Mutex<(Option<SystemTime>, Arc<ImageTable>)>,
    /// Containers a previous agent run left running, by pod UID: filled at start, taken over
    /// by the pod's worker instead of being started again.
    adoptions: Mutex<HashMap<String, Vec<RunInfo>>>,
}

impl Agent {
    pub fn new(
        client: Client,
        images: ImageTable,
        nodes: Vec<NodeInfo>,
        settings: Settings,
    ) -> Self {
        let mtime = std::fs::metadata(&images.path)
            .and_then(|m| m.modified())
            .ok();
        Self {
            events: crate::events::Events::new(client.clone()),
            client,
            nodes: nodes
                .into_iter()
                .map(|info| NodeCtx {
                    ips: Mutex::new(IpAllocator::for_pod_cidr(info.pod_cidr_base)),
                    info,
                })
                .collect(),
            settings,
            images_path: images.path.clone(),
            token_wait: Duration::from_secs(30),
            shutdown: CancellationToken::new(),
            images: Mutex::new((mtime, Arc::new(images))),
            adoptions: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_adoptions(&self, adoptions: HashMap<String, Vec<RunInfo>>) {
        *self.adoptions.lock().expect("adoptions lock") = adoptions;
    }

    /// The running containers of pod `uid` to take over (once: a later worker starts fresh).
    pub fn take_adoption(&self, uid: &str) -> Vec<RunInfo> {
        self.adoptions
            .lock()
            .expect("adoptions lock")
            .remove(uid)
            .unwrap_or_default()
    }

    /// The agent's node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeCtx> {
        self.nodes.iter().find(|n| n.info.name == name)
    }

    /// The node a pod is bound to, when it is one of the agent's.
    pub fn node_of(&self, pod: &Pod) -> Option<&NodeCtx> {
        let name = pod.spec.as_ref()?.node_name.as_deref()?;
        self.node(name)
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.settings.sandbox_dir.join("pods")
    }

    pub fn pod_log(&self, ns: &str, pod: &str, container: &str) -> PathBuf {
        self.settings
            .sandbox_dir
            .join("logs")
            .join("pods")
            .join(format!("{ns}_{pod}_{container}.log"))
    }

    /// The image table, re-read when the file changed (the last good table is kept on errors).
    pub fn images(&self) -> Arc<ImageTable> {
        let mut guard = self.images.lock().expect("images lock");
        let mtime = std::fs::metadata(&self.images_path)
            .and_then(|m| m.modified())
            .ok();
        if mtime.is_some() && mtime != guard.0 {
            match ImageTable::load(&self.images_path) {
                Ok(t) => {
                    tracing::info!(path = %self.images_path.display(), "image table reloaded");
                    *guard = (mtime, Arc::new(t));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "image table changed but is invalid; keeping the previous one");
                    guard.0 = mtime;
                }
            }
        }
        guard.1.clone()
    }

    /// Restart back-off: base · 2^n, capped at max.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.min(20));
        self.settings
            .backoff_base
            .saturating_mul(factor)
            .min(self.settings.backoff_max)
    }
}

#[derive(Debug, Clone)]
pub enum PodEvent {
    Update(Arc<Pod>),
    Gone,
}

struct Worker {
    tx: watch::Sender<PodEvent>,
    handle: Option<JoinHandle<()>>,
}

pub struct Manager {
    pub agent: Arc<Agent>,
    workers: Mutex<HashMap<String, Worker>>,
    /// UIDs whose worker has finished (stale watch events for them are ignored).
    finished: Mutex<VecDeque<String>>,
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

impl Manager {
    pub fn new(agent: Arc<Agent>) -> Arc<Self> {
        Arc::new(Self {
            agent,
            workers: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
        })
    }

    /// A pod was added or changed. Only pods bound to one of the agent's nodes are run;
    /// unbound pods are kube-scheduler's.
    pub fn apply(self: &Arc<Self>, pod: Pod) {
        let uid = uid_of(&pod);
        if self.agent.node_of(&pod).is_none() {
            return;
        }
        let mut workers = self.workers.lock().expect("workers lock");
        if let Some(w) = workers.get(&uid) {
            let _ = w.tx.send(PodEvent::Update(Arc::new(pod)));
            return;
        }
        if self.finished.lock().expect("finished lock").contains(&uid) {
            return;
        }
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if terminal {
            // Not run again (as kubelet): only its deletion is completed.
            if pod.metadata.deletion_timestamp.is_some() {
                let client = self.agent.client.clone();
                tokio::spawn(async move { finish_deletion(&client, &pod).await });
            }
            return;
        }
        let pod = Arc::new(pod);
        let (tx, rx) = watch::channel(PodEvent::Update(pod.clone()));
        let me = self.clone();
        let done_uid = uid.clone();
        let handle = tokio::spawn(async move {
            crate::pod::run(me.agent.clone(), pod, rx).await;
            me.worker_done(&done_uid);
        });
        workers.insert(
            uid,
            Worker {
                tx,
                handle: Some(handle),
            },
        );
    }

    /// A pod's object was deleted.
    pub fn delete(&self, pod: &Pod) {
        if let Some(w) = self.workers.lock().expect("workers lock").get(&uid_of(pod)) {
            let _ = w.tx.send(PodEvent::Gone);
        }
    }

    /// After a (re)list: workers whose pods are no longer listed are told they are gone; on the
    /// first list, pod dirs of pods that are not running here are removed.
    pub fn resync(&self, listed: &HashSet<String>, remove_stale_dirs: bool) {
        let workers = self.workers.lock().expect("workers lock");
        for (uid, w) in workers.iter() {
            if !listed.contains(uid) {
                let _ = w.tx.send(PodEvent::Gone);
            }
        }
        if remove_stale_dirs {
            if let Ok(entries) = std::fs::read_dir(self.agent.pods_dir()) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if !workers.contains_key(pod_dir_uid(&name)) {
                        tracing::info!(dir = %e.path().display(), "removing the dir of a pod that no longer runs here");
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
    }

    fn worker_done(&self, uid: &str) {
        self.workers.lock().expect("workers lock").remove(uid);
        let mut finished = self.finished.lock().expect("finished lock");
        finished.push_back(uid.to_string());
        while finished.len() > 10_000 {
            finished.pop_front();
        }
    }

    /// Waits for every worker (after `agent.shutdown` was cancelled).
    pub async fn wait_all(&self) {
        let handles: Vec<JoinHandle<()>> = self
            .workers
            .lock()
            .expect("workers lock")
            .values_mut()
            .filter_map(|w| w.handle.take())
            .collect();
        for h in handles {
            let _ = h.await;
        }
    }
}

/// Completes a graceful deletion as kubelet does: delete with grace period 0 (only this UID).
pub async fn finish_deletion(client: &Client, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(&name, &dp)
        .await
    {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "pod object deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "deleting pod object"),
    }
}

/// Whether the processes a previous agent run left in one pod dir can be taken over as they
/// are (as kubelet keeps containers across its restarts): the pod still exists with that UID,
/// is bound to one of our nodes, is neither deleted nor terminal, every live process is a
/// (non-init) container of its spec with its run file, and its network namespace is there.
/// `Err` says why not: then they are stopped and the pod starts fresh.
pub fn adoptable(
    leftover: &Leftover,
    pod: Option<&Pod>,
    on_our_node: bool,
    netns_exists: bool,
) -> Result<Vec<RunInfo>, String> {
    let pod = pod.ok_or("the pod no longer exists")?;
    if !on_our_node {
        return Err("the pod is not bound to one of this agent's nodes".into());
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err("the pod is being deleted".into());
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Err(format!("the pod is {}", phase.unwrap_or_default()));
    }
    let spec = pod.spec.as_ref().ok_or("the pod has no spec")?;
    let host_network = spec.host_network.unwrap_or(false);
    if !host_network && !netns_exists {
        return Err("its network namespace is gone".into());
    }
    leftover
        .alive
        .iter()
        .map(|(record, info)| {
            if !spec.containers.iter().any(|c| c.name == record.container) {
                return Err(format!(
                    "process {} is not a container of the pod's spec ({})",
                    record.pid, record.container
                ));
            }
            info.clone().ok_or_else(|| {
                format!(
                    "container {} (pid {}) has no run file",
                    record.container, record.pid
                )
            })
        })
        .collect()
}

/// The pod UID a [`pod_dir`]'s name ends in.
pub fn pod_dir_uid(dir_name: &str) -> &str {
    dir_name.rsplit('_').next().unwrap_or_default()
}

pub fn pod_dir(pods_dir: &Path, pod: &Pod) -> PathBuf {
    pods_dir.join(format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PidRecord;

    fn run(container: &str, pid: u32) -> RunInfo {
        RunInfo {
            container: container.into(),
            pid,
            start_time: 7,
            started_at: "2026-12-02T05:00:00Z".into(),
            image_id: String::new(),
            log_file: PathBuf::from("/dev/null"),
            target: crate::probe::Target {
                pod_ip: String::new(),
                env: vec![],
                ports: vec![],
                working_dir: "/".into(),
                pid: Some(pid),
                netns: None,
                user: None,
                no_new_privs: false,
            },
        }
    }

    fn leftover(alive: Vec<(&str, u32, bool)>) -> Leftover {
        Leftover {
            pod_dir: PathBuf::from("/nonexistent/ns_p_u1"),
            uid: "u1".into(),
            alive: alive
                .into_iter()
                .map(|(c, pid, has_run)| {
                    let rec = PidRecord {
                        container: c.into(),
                        pid,
                        start_time: 7,
                    };
                    (rec, has_run.then(|| run(c, pid)))
                })
                .collect(),
        }
    }

    fn pod(yaml_status_phase: &str, deleting: bool) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {"nodeName": "sandbox-a", "containers": [{"name": "main"}, {"name": "side"}],
                     "initContainers": [{"name": "init"}]},
            "status": {"phase": yaml_status_phase}
        }))
        .unwrap();
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        p
    }

    #[test]
    fn running_containers_of_a_live_pod_are_adopted() {
        let l = leftover(vec![("main", 100, true), ("side", 101, true)]);
        let runs = adoptable(&l, Some(&pod("Running", false)), true, true).unwrap();
        assert_eq!(
            runs.iter().map(|r| r.pid).collect::<Vec<_>>(),
            vec![100, 101]
        );
    }

    #[test]
    fn leftovers_that_cannot_be_taken_over_say_why() {
        let l = leftover(vec![("main", 100, true)]);
        let live = pod("Running", false);
        let cases: Vec<(Result<Vec<RunInfo>, String>, &str)> = vec![
            (adoptable(&l, None, true, true), "no longer exists"),
            (adoptable(&l, Some(&live), false, true), "not bound"),
            (
                adoptable(&l, Some(&pod("Running", true)), true, true),
                "being deleted",
            ),
            (
                adoptable(&l, Some(&pod("Succeeded", false)), true, true),
                "Succeeded",
            ),
            (adoptable(&l, Some(&live), true, false), "network namespace"),
            (
                adoptable(
                    &leftover(vec![("init", 100, true)]),
                    Some(&live),
                    true,
                    true,
                ),
                "not a container",
            ),
            (
                adoptable(
                    &leftover(vec![("main", 100, false)]),
                    Some(&live),
                    true,
                    true,
                ),
                "no run file",
            ),
        ];
        for (result, why) in cases {
            let err = result.expect_err(why);
            assert!(err.contains(why), "{err:?} should say {why:?}");
        }
    }
}
