//! A ZooKeeper outage under a running cluster: the sandbox's ZooKeeper SIGSTOPped for 60 s,
//! twice the nodes' 30 s session timeout, under 3 nodes holding 100,000 keys. With
//! `zkFailstop: false` (the default) no pod restarts, every key reads back, and every node is
//! back in `cache_list` within 30 s of ZooKeeper's return.
//!
//! The same outage in the middle of a 3→5 scale-out and of the 5→3 scale-in after it: both
//! finish once ZooKeeper is back, and every key reads back.
//!
//! Alone in their binary, and one at a time (`OUTAGES`): an outage stops every other user of
//! the sandbox's ZooKeeper (test binaries run one after another). ZooKeeper is resumed on every
//! exit path (`StoppedProcess` sends SIGCONT when dropped).

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::{Api, ResourceExt};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use test_support::operator::StoppedProcess;
use test_support::sandbox::{Sandbox, TestNamespace};
use test_support::wait_until;

const KEYS: usize = 100_000;
const OUTAGE: Duration = Duration::from_secs(60);
/// How soon after ZooKeeper answers again every node must be back in `cache_list`.
const BACK_WITHIN: Duration = Duration::from_secs(30);

fn key(i: usize) -> String {
    format!("outage:{i}")
}

fn value(i: usize) -> String {
    format!("value-{i:08}")
}

/// One outage at a time (the tests of a binary run in parallel threads).
static OUTAGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn zookeeper_stopped_60s_loses_no_key_and_restarts_no_pod() -> anyhow::Result<()> {
    let _one = OUTAGES.lock().await;
    with_namespace("outage", 1, |sandbox, ns| async move {
        let r = run(sandbox, &ns).await;
        (ns, r)
    })
    .await
}

/// Each cache pod's uid and container restart count, by name.
async fn pod_identities(ns: &TestNamespace) -> anyhow::Result<BTreeMap<String, (String, i32)>> {
    let pods: Api<Pod> = ns.api();
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=arcus-memcached"))
        .await?;
    Ok(list
        .items
        .iter()
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
            (p.name_any(), (p.uid().unwrap_or_default(), restarts))
        })
        .collect())
}

async fn run(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let svc = service_code(ns);
    let crs = mc_api(sandbox, ns);
    let cr: DynamicObject = serde_json::from_value(cr_json("zk", &svc, 3))?;
    crs.create(&PostParams::default(), &cr).await?;
    // The operator turns zkfailstop off on each node once it is Ready (pod annotation).
    let pods: Api<Pod> = ns.api();
    wait_until(
        Duration::from_secs(180),
        "3 cache pods with zkfailstop off applied",
        || async {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=arcus-memcached"))
                .await
                .ok()?;
            let off = list.items.iter().filter(|p| {
                p.annotations()
                    .get("jam2in.com/applied-config")
                    .is_some_and(|a| a.contains("zkfailstop=off"))
            });
            (off.count() == 3).then_some(())
        },
    )
    .await?;
    let client = ring_client(&svc, 3).await?;
    load(&client, KEYS, |i| (key(i), value(i), 0, 0)).await?;
    let before = pod_identities(ns).await?;
    let client_session = client.zk_session_id();
    anyhow::ensure!(before.len() == 3, "cache pods: {before:?}");

    let pid_file = sandbox.dir.join("pids/zookeeper.pid");
    let zk_pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", pid_file.display()))?
        .trim()
        .parse()?;
    let stopped = StoppedProcess::stop(zk_pid)?;
    let t = Instant::now();
    // While ZooKeeper is away the nodes keep serving the ring clients have.
    let (mut asked, mut served) = (0, 0);
    let mut degraded: Option<String> = None;
    while t.elapsed() < OUTAGE {
        if let Ok(cr) = crs.get("zk").await {
            let conditions = cr.data["status"]["conditions"].as_array().cloned();
            let down = conditions.unwrap_or_default().into_iter().find(|c| {
                c["type"] == "Degraded"
                    && c["status"] == "True"
                    && c["reason"] == "ZooKeeperUnreachable"
            });
            if let Some(c) = down {
                degraded = c["message"].as_str().map(str::to_string);
            }
        }
        for i in (asked * 97..).step_by(1_013).take(20) {
            served += usize::from(client.get(&key(i % KEYS)).await.is_ok_and(|g| g.is_some()));
        }
        asked += 1;
        // Paces the sampling over the outage (the outage's length is the fault itself).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // A writer across ZooKeeper's return: what clients see while the ring empties and the
    // nodes rejoin (failed writes; writes landing on a node that does not own the key, which
    // the operator moves to the owner), and afterwards every acknowledged write must read back.
    let writer = BackgroundWriter::start(client.clone(), WRITER_KEYS, writer_key);
    stopped.resume()?;
    let back = Instant::now();
    let resumed_at = k8s_openapi::jiff::Timestamp::now();
    eprintln!(
        "[outage] ZooKeeper stopped {:.1} s; {served} of {} gets meanwhile found their key",
        t.elapsed().as_secs_f64(),
        asked * 20
    );
    // `ensure!`, not `assert!`: an error return lets `with_namespace` clean up.
    anyhow::ensure!(served > 0, "the nodes served nothing during the outage");
    eprintln!("[outage] status meanwhile: {degraded:?}");
    anyhow::ensure!(
        degraded.is_some(),
        "status never said ZooKeeper was unreachable"
    );

    let zk = zk_client().await?;
    eprintln!(
        "[outage] ZooKeeper resumed at {resumed_at}; a new session {:.1} s later",
        back.elapsed().as_secs_f64()
    );
    let list = format!("/arcus/cache_list/{svc}");
    wait_until(BACK_WITHIN, "every node back in cache_list", || async {
        (children(&zk, &list).await.len() == 3).then_some(())
    })
    .await?;
    let rejoined = back.elapsed();
    let events: Api<Event> = ns.api();
    // Whether the sessions expired is a race ZooKeeper runs when it resumes: its session
    // tracker expires the overdue sessions, unless a node's reconnect revalidates its session
    // first. Expired: the operator lets the nodes in together and says so in an Event (published
    // just after the rejoins). Revalidated: the nodes never left.
    let rejoins = wait_until(
        Duration::from_secs(10),
        "the NodesRejoined Event",
        || async {
            let notes: Vec<String> = events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("NodesRejoined"))
                .filter_map(|e| e.note)
                .collect();
            (!notes.is_empty()).then_some(notes)
        },
    )
    .await
    .unwrap_or_default();
    eprintln!(
        "[outage] all 3 nodes in cache_list {:.1} s after ZooKeeper came back; {}",
        rejoined.as_secs_f64(),
        if rejoins.is_empty() {
            "the nodes' sessions survived (no rejoin needed)".to_string()
        } else {
            format!("sessions expired; operator: {rejoins:?}")
        }
    );

    let after = pod_identities(ns).await?;
    anyhow::ensure!(
        after == before,
        "a cache pod was restarted or re-created: {before:?} -> {after:?}"
    );
    // The client served from its last ring meanwhile; once ZooKeeper is back it watches the
    // node list again (in a new session if its own expired too).
    wait_until(
        Duration::from_secs(30),
        "the client's ring re-synced",
        || async { (client.zk_session_id().is_some() && client.nodes().len() == 3).then_some(()) },
    )
    .await?;
    eprintln!(
        "[outage] the client watches the node list again ({})",
        if client.zk_session_id() == client_session {
            "its session survived"
        } else {
            "in a new session"
        }
    );
    let report = writer.finish().await?;
    let mut stale = Vec::new();
    for (i, want) in &report.written {
        if report.unknown.contains(i) {
            continue;
        }
        let got = get_retrying(&client, &writer_key(*i)).await?;
        if got.as_ref().map(|g| g.value.as_slice()) != Some(want.as_bytes()) {
            stale.push(writer_key(*i));
        }
    }
    eprintln!(
        "[outage] writer across ZooKeeper's return: {} writes, {} failed (slowest {:?}); {} keys written, {} read back another value",
        report.ops,
        report.errors,
        report.slowest,
        report.written.len(),
        stale.len()
    );
    anyhow::ensure!(stale.is_empty(), "writes lost or reverted: {stale:?}");
    let good = read_back_all(&client, KEYS, key, value).await?;
    eprintln!("[outage] {good} of {KEYS} keys read back");
    anyhow::ensure!(good == KEYS, "{} keys lost to the outage", KEYS - good);
    Ok(())
}

/// The writer's keys (apart from the loaded ones).
const WRITER_KEYS: usize = 10_000;

fn writer_key(i: usize) -> String {
    format!("outage-w:{i}")
}

/// The sandbox's ZooKeeper, SIGSTOPped (resumed when the guard is dropped or resumed).
fn stop_zookeeper(sandbox: &Sandbox) -> anyhow::Result<StoppedProcess> {
    let pid_file = sandbox.dir.join("pids/zookeeper.pid");
    let zk_pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", pid_file.display()))?
        .trim()
        .parse()?;
    StoppedProcess::stop(zk_pid)
}

#[tokio::test(flavor = "multi_thread")]
async fn zookeeper_stopped_60s_in_the_middle_of_a_scale_out_and_a_scale_in() -> anyhow::Result<()> {
    let _one = OUTAGES.lock().await;
    with_namespace("outscale", 1, |sandbox, ns| async move {
        let r = during_scales(sandbox, &ns).await;
        (ns, r)
    })
    .await
}

async fn during_scales(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    const SCALE_KEYS: usize = 30_000;
    let (svc, client) = settled_and_loaded(sandbox, ns, "zs", 3, SCALE_KEYS, key, value).await?;
    let crs = mc_api(sandbox, ns);
    let claim = format!("/arcus/cache_list/{svc}");
    for (from, to) in [(3, 5), (5, 3)] {
        // A session of its own per phase: the last one expired in the outage.
        let zk = zk_client().await?;
        crs.patch(
            "zs",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": to}})),
        )
        .await?;
        wait_until(Duration::from_secs(60), "the scale recorded", || async {
            let (data, _) = zk.get_data(&claim).await.ok()?;
            String::from_utf8_lossy(&data)
                .contains("\"operation\"")
                .then_some(())
        })
        .await?;
        let stopped = stop_zookeeper(sandbox)?;
        let t = Instant::now();
        let mut said: Option<String> = None;
        while t.elapsed() < OUTAGE {
            if let Ok(cr) = crs.get("zs").await {
                let conditions = cr.data["status"]["conditions"].as_array().cloned();
                if let Some(c) = conditions
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c["type"] == "Degraded" && c["reason"] == "ZooKeeperUnreachable")
                {
                    said = c["message"].as_str().map(str::to_string);
                }
            }
            // Samples the status over the outage (the outage's length is the fault itself).
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        stopped.resume()?;
        let back = Instant::now();
        anyhow::ensure!(
            said.is_some(),
            "{from}→{to}: status never said ZooKeeper was unreachable"
        );
        let want = format!("{to}/{to}");
        wait_until(
            Duration::from_secs(300),
            &format!("{from}→{to} finished after the outage"),
            || settled(&crs, "zs", &want),
        )
        .await?;
        let finished = back.elapsed();
        let zk = zk_client().await?;
        let list = format!("/arcus/cache_list/{svc}");
        let ring = wait_until(Duration::from_secs(60), "the client's ring", || async {
            (client.nodes().len() == to && children(&zk, &list).await.len() == to).then_some(())
        })
        .await;
        if let Err(e) = ring {
            anyhow::bail!(
                "{from}→{to}: {e}: the client has {:?} (session {:?}), cache_list has {:?}",
                client.nodes(),
                client.zk_session_id(),
                children(&zk, &list).await
            );
        }
        let mut good = 0;
        for i in 0..SCALE_KEYS {
            let got = get_retrying(&client, &key(i)).await?;
            good += usize::from(got.is_some_and(|g| g.value == value(i).as_bytes()));
        }
        let restarts: BTreeMap<String, i32> = pod_identities(ns)
            .await?
            .into_iter()
            .map(|(name, (_, n))| (name, n))
            .collect();
        eprintln!(
            "[outage] {from}→{to}: ZooKeeper stopped 60 s mid-scale; status said {said:?}; finished {:.1} s after it came back; {good} of {SCALE_KEYS} keys read back; container restarts per pod {restarts:?}",
            finished.as_secs_f64()
        );
        anyhow::ensure!(
            good == SCALE_KEYS,
            "{from}→{to}: {} keys lost",
            SCALE_KEYS - good
        );
    }
    Ok(())
}
