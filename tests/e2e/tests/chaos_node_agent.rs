//! The node agent (the sandbox's kubelet) crashes and comes back: SIGKILL, 15 s down, then the
//! same command line again, under a client load on a 3-node cluster with 30,000 keys. Running
//! pods keep running (the same PIDs throughout), no pod is re-created or restarted, every key
//! reads back; afterwards the adopted containers are supervised again (a cache process killed
//! after the restart is restarted in place by the new agent).
//!
//! One test, alone in its binary: the agent runs every pod of the sandbox (test binaries run
//! one after another).

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::ResourceExt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use test_support::operator::{sandbox_pid, signal_process, stop_sandbox_daemon, ProcessId};
use test_support::sandbox::{pod_ready, Sandbox, TestNamespace};
use test_support::wait_until;

const KEYS: usize = 30_000;
/// How long the agent stays down: past a few probe periods, short of the node controller's
/// grace period (nodes would go NotReady and their pods be evicted).
const DOWN_FOR: Duration = Duration::from_secs(15);

fn key(i: usize) -> String {
    format!("agent:{i}")
}

fn value(i: usize) -> String {
    format!("v-{i}")
}

/// What must not change across the agent's restart: per pod, its uid, its containers' PIDs
/// (`containerID: sandbox://<pid>`) and restart counts.
#[derive(Debug, PartialEq)]
struct PodIdentity {
    uid: Option<String>,
    containers: Vec<(String, Option<String>, i32)>,
}

fn identity(p: &Pod) -> PodIdentity {
    let statuses = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    PodIdentity {
        uid: p.uid(),
        containers: statuses
            .into_iter()
            .map(|c| (c.name, c.container_id, c.restart_count))
            .collect(),
    }
}

async fn identities(ns: &TestNamespace) -> anyhow::Result<BTreeMap<String, PodIdentity>> {
    let pods = ns.api::<Pod>().list(&ListParams::default()).await?;
    Ok(pods
        .items
        .iter()
        .map(|p| (p.name_any(), identity(p)))
        .collect())
}

fn pid_of(container_id: &Option<String>) -> Option<i32> {
    sandbox_pid(container_id.as_deref()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn node_agent_restarted_keeps_pods_running() -> anyhow::Result<()> {
    with_namespace("agent", 1, |sandbox, ns| async move {
        let r = run(sandbox, &ns).await;
        (ns, r)
    })
    .await
}

async fn run(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let (_, client) = settled_and_loaded(sandbox, ns, "agent", 3, KEYS, key, value).await?;
    let crs = mc_api(sandbox, ns);
    let before = identities(ns).await?;
    let pids: Vec<i32> = before
        .values()
        .flat_map(|p| p.containers.iter().filter_map(|(_, id, _)| pid_of(id)))
        .collect();
    // By PID and start time: a reused PID or a zombie is not the container still running.
    let processes: Vec<ProcessId> = pids.iter().filter_map(|p| ProcessId::of(*p)).collect();
    anyhow::ensure!(
        pids.len() >= 4,
        "expected the operator and 3 cache containers, found PIDs {pids:?} in {before:?}"
    );
    anyhow::ensure!(
        processes.len() == pids.len(),
        "a container of {pids:?} was not running before the fault"
    );
    let log = sandbox.dir.join("logs/node-agent.log");
    let log_offset = std::fs::metadata(&log)?.len();

    let writer = BackgroundWriter::start(client.clone(), KEYS, key);
    let stopped = stop_sandbox_daemon(&sandbox.dir, "node-agent", "KILL")?;
    let down = Instant::now();
    // While the agent is away: every container keeps running and the cache keeps answering.
    let mut gets = 0;
    while down.elapsed() < DOWN_FOR {
        let dead: Vec<i32> = processes
            .iter()
            .filter(|p| p.exited())
            .map(|p| p.pid)
            .collect();
        anyhow::ensure!(dead.is_empty(), "containers died with the agent: {dead:?}");
        let i = gets * 997 % KEYS;
        anyhow::ensure!(
            get_retrying(&client, &key(i)).await?.is_some(),
            "{} missing while the agent was down",
            key(i)
        );
        gets += 1;
        // Samples the downtime about 4 times a second (its length is the fault itself).
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stopped.start()?;
    let restarted = Instant::now();
    let expected = pids.len();
    wait_until(
        Duration::from_secs(60),
        "the new agent adopted every container",
        || async {
            let text = std::fs::read(&log).ok()?;
            let new =
                String::from_utf8_lossy(&text[(log_offset as usize).min(text.len())..]).to_string();
            let adopted = new
                .matches("container adopted from a previous agent run")
                .count();
            (new.contains("initial pod list done") && adopted >= expected).then_some(())
        },
    )
    .await?;
    let adopted_after = restarted.elapsed();
    // Its first status reports are the ones already there: pods stay Ready, nothing restarted.
    wait_until(Duration::from_secs(60), "every pod Ready", || async {
        let pods = ns.api::<Pod>().list(&ListParams::default()).await.ok()?;
        pods.items.iter().all(pod_ready).then_some(())
    })
    .await?;
    let after = identities(ns).await?;
    anyhow::ensure!(
        after == before,
        "pods changed across the agent restart:\nbefore {before:?}\nafter  {after:?}"
    );
    let report = writer.finish().await?;
    wait_until(Duration::from_secs(60), "still settled", || {
        settled(&crs, "agent", "3/3")
    })
    .await?;
    let mut good = 0;
    let mut stale = Vec::new();
    for i in (0..KEYS).filter(|i| !report.unknown.contains(i)) {
        let want = report.written.get(&i).cloned().unwrap_or_else(|| value(i));
        match get_retrying(&client, &key(i)).await? {
            Some(g) if g.value == want.as_bytes() => good += 1,
            other => stale.push((key(i), other.map(|g| g.value))),
        }
    }
    let checked = KEYS - report.unknown.len();
    eprintln!(
        "[chaos node-agent] agent down {:.0} s: {} containers kept running, {gets} gets served; \
         every container adopted {:.1} s after the restart; pods unchanged (uid, PID, restarts); \
         load: {} writes, {} failed; read back {good} / {checked} keys",
        DOWN_FOR.as_secs_f64(),
        pids.len(),
        adopted_after.as_secs_f64(),
        report.ops,
        report.errors
    );
    anyhow::ensure!(
        stale.is_empty(),
        "{} keys lost or changed, e.g. {:?}",
        stale.len(),
        stale.first()
    );

    // The new agent supervises what it adopted: a cache process killed now restarts in place.
    let victim = "agent-arcus-mc-0";
    let (_, id, restarts) = after[victim]
        .containers
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{victim} has no container"))?;
    let pid = pid_of(&id).ok_or_else(|| anyhow::anyhow!("{victim} has no PID"))?;
    signal_process(pid, "KILL")?;
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(120),
        "the killed adopted container restarted in place, Ready",
        || async {
            let p = ns.api::<Pod>().get(victim).await.ok()?;
            let now = identity(&p);
            let (_, new_id, new_restarts) = now.containers.first()?.clone();
            (now.uid == after[victim].uid
                && new_restarts > restarts
                && new_id != id
                && pod_ready(&p))
            .then_some(())
        },
    )
    .await?;
    eprintln!(
        "[chaos node-agent] an adopted cache process SIGKILLed after the restart: restarted in place, Ready {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    Ok(())
}
