//! Faults of one cache node under a client load, each bounded in time and count: the node's
//! process SIGKILLed (by PID), and its pod's network link down for 30 s (the sandbox's own
//! veth, by `ip link`). Each checks what the design promises: the node comes back and is in
//! `cache_list` again; a client's request to it fails within its timeout instead of hanging;
//! no key ever reads back a value other than the last one written (a lost node's keys are
//! misses); the other nodes' keys all survive. Hit ratios are printed for docs/RELIABILITY.md.

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_support::operator::container_pid;
use test_support::sandbox::{Sandbox, TestNamespace};
use test_support::wait_until;

const KEYS: usize = 30_000;

fn key(i: usize) -> String {
    format!("chaos:{i}")
}

struct Readback {
    hits: usize,
    misses: usize,
    /// Keys reading a value that is not their last one written: must be none.
    stale: Vec<String>,
    /// Misses of keys not owned by the faulted node: must be none.
    lost_elsewhere: usize,
}

async fn read_back(
    client: &arcus_client::ArcusClient,
    load: &LoadReport,
    faulted: &str,
) -> anyhow::Result<Readback> {
    let (written, unknown) = (&load.written, &load.unknown);
    let mut r = Readback {
        hits: 0,
        misses: 0,
        stale: vec![],
        lost_elsewhere: 0,
    };
    for i in (0..KEYS).filter(|i| !unknown.contains(i)) {
        let want = written.get(&i).cloned().unwrap_or_else(|| format!("v-{i}"));
        match get_retrying(client, &key(i)).await? {
            Some(got) if got.value == want.as_bytes() => r.hits += 1,
            Some(got) => r.stale.push(format!(
                "{}: {:?} (want {want})",
                key(i),
                String::from_utf8_lossy(&got.value)
            )),
            None => {
                r.misses += 1;
                if client.node_for_key(&key(i)).ok().as_deref() != Some(faulted) {
                    r.lost_elsewhere += 1;
                }
            }
        }
    }
    Ok(r)
}

async fn cache_pod(ns: &TestNamespace, name: &str) -> anyhow::Result<Pod> {
    Ok(ns.api::<Pod>().get(name).await?)
}

/// The node a fault hits, as it was before.
struct Victim {
    pod: Pod,
    /// `<pod IP>:11211`: its address in the ring.
    addr: String,
    uid: Option<String>,
    restarts: i32,
}

async fn victim(ns: &TestNamespace, name: &str) -> anyhow::Result<Victim> {
    let pod = cache_pod(ns, name).await?;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| anyhow::anyhow!("{name} has no IP"))?;
    Ok(Victim {
        addr: format!("{ip}:11211"),
        uid: pod.uid(),
        restarts: restarts(&pod),
        pod,
    })
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}

/// A 3-node resource `name`, Ready, with `KEYS` keys loaded (`v-<i>`), and a ring client.
async fn three_loaded_nodes(
    sandbox: &Sandbox,
    ns: &TestNamespace,
    name: &str,
) -> anyhow::Result<(String, Arc<arcus_client::ArcusClient>)> {
    settled_and_loaded(sandbox, ns, name, 3, KEYS, key, |i| format!("v-{i}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_node_sigkilled_under_load_comes_back_and_misses_only_its_keys(
) -> anyhow::Result<()> {
    with_namespace("kill", 1, |sandbox, ns| async move {
        let r = sigkill(sandbox, &ns).await;
        (ns, r)
    })
    .await
}

async fn sigkill(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let (svc, client) = three_loaded_nodes(sandbox, ns, "kill").await?;
    let Victim {
        pod,
        addr: faulted,
        uid,
        restarts: restarts_before,
    } = victim(ns, "kill-arcus-mc-1").await?;
    let pid = container_pid(&pod).ok_or_else(|| anyhow::anyhow!("no container PID"))?;
    let load = BackgroundWriter::start(client.clone(), KEYS, key);
    // Paces the fault into the load (its moment is the fault itself, not a condition).
    tokio::time::sleep(Duration::from_secs(2)).await;
    test_support::operator::signal_process(pid, "KILL")?;
    let killed = Instant::now();

    let zk = zk_client().await?;
    let list = format!("/arcus/cache_list/{svc}");
    wait_until(
        Duration::from_secs(180),
        "the node restarted, Ready, in cache_list",
        || async {
            let p = cache_pod(ns, "kill-arcus-mc-1").await.ok()?;
            let back = restarts(&p) > restarts_before && test_support::sandbox::pod_ready(&p);
            let in_ring = children(&zk, &list)
                .await
                .iter()
                .any(|z| z.starts_with(&faulted));
            (back && in_ring).then_some(())
        },
    )
    .await?;
    let back_after = killed.elapsed();
    let report = load.finish().await?;
    let p = cache_pod(ns, "kill-arcus-mc-1").await?;
    anyhow::ensure!(
        p.uid() == uid,
        "the pod was re-created instead of restarted in place"
    );

    let r = read_back(&client, &report, &faulted).await?;
    let checked = r.hits + r.misses;
    eprintln!(
        "[chaos sigkill] node back in cache_list {:.1} s after SIGKILL; load: {} writes, {} failed, slowest {:?}; \
         read back {checked} keys: {} hits ({:.1}%), {} misses (all of the killed node's: {}), {} stale",
        back_after.as_secs_f64(),
        report.ops,
        report.errors,
        report.slowest,
        r.hits,
        100.0 * r.hits as f64 / checked.max(1) as f64,
        r.misses,
        r.lost_elsewhere == 0,
        r.stale.len()
    );
    anyhow::ensure!(
        r.stale.is_empty(),
        "keys read back an older value: {:?}",
        r.stale
    );
    anyhow::ensure!(
        r.lost_elsewhere == 0,
        "{} keys of the other nodes were lost",
        r.lost_elsewhere
    );
    anyhow::ensure!(
        report.slowest < Duration::from_secs(5),
        "a write hung for {:?} instead of failing within its timeout",
        report.slowest
    );
    Ok(())
}

/// The pod's link on the host side (the node agent names it `av` + the first 12 hex digits of
/// the pod's uid, a port of the sandbox bridge), set down and, on every exit path, up again.
struct LinkDown {
    dev: String,
}

impl LinkDown {
    fn cut(pod_uid: &str) -> anyhow::Result<LinkDown> {
        let hex: String = pod_uid
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(12)
            .collect();
        let dev = format!("av{hex}");
        let status = std::process::Command::new("ip")
            .args(["link", "set", &dev, "down"])
            .status()?;
        anyhow::ensure!(status.success(), "ip link set {dev} down failed");
        Ok(LinkDown { dev })
    }
}

impl Drop for LinkDown {
    fn drop(&mut self) {
        let up = std::process::Command::new("ip")
            .args(["link", "set", &self.dev, "up"])
            .status();
        if !up.is_ok_and(|s| s.success()) {
            eprintln!(
                "could not set {} up again: run `ip link set {} up`",
                self.dev, self.dev
            );
        }
    }
}

const CUT_FOR: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_node_cut_off_30s_times_out_clients_and_rejoins() -> anyhow::Result<()> {
    with_namespace("cut", 1, |sandbox, ns| async move {
        let r = cut(sandbox, &ns).await;
        (ns, r)
    })
    .await
}

async fn cut(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let (svc, client) = three_loaded_nodes(sandbox, ns, "cut").await?;
    let Victim {
        addr: faulted,
        uid,
        restarts: restarts_before,
        ..
    } = victim(ns, "cut-arcus-mc-2").await?;
    let load = BackgroundWriter::start(client.clone(), KEYS, key);
    let link = LinkDown::cut(&uid.clone().unwrap_or_default())?;
    let t = Instant::now();
    // While the link is down: a get of a key the node owns fails within the client's timeout.
    let theirs = (0..KEYS)
        .find(|i| client.node_for_key(&key(*i)).ok().as_deref() == Some(faulted.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no key on {faulted}"))?;
    let mut slowest_get = Duration::ZERO;
    let mut failed_gets = 0;
    while t.elapsed() < CUT_FOR {
        let g = Instant::now();
        failed_gets += usize::from(client.get(&key(theirs)).await.is_err());
        slowest_get = slowest_get.max(g.elapsed());
        // Samples the cut once a second (its length is the fault itself).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(link);
    let restored = Instant::now();
    let zk = zk_client().await?;
    let list = format!("/arcus/cache_list/{svc}");
    wait_until(
        Duration::from_secs(120),
        "the node back in cache_list",
        || async {
            children(&zk, &list)
                .await
                .iter()
                .any(|z| z.starts_with(&faulted))
                .then_some(())
        },
    )
    .await?;
    let rejoined = restored.elapsed();
    let report = load.finish().await?;
    let p = cache_pod(ns, "cut-arcus-mc-2").await?;
    let r = read_back(&client, &report, &faulted).await?;
    let checked = r.hits + r.misses;
    eprintln!(
        "[chaos link] link down {:.1} s: {failed_gets} gets to the node failed, slowest {slowest_get:?}; \
         node back in cache_list {:.1} s after the link (pod restarts {} → {}); load: {} writes, {} failed, slowest {:?}; \
         read back {checked} keys: {} hits ({:.1}%), {} misses ({} of other nodes), {} stale",
        CUT_FOR.as_secs_f64(),
        rejoined.as_secs_f64(),
        restarts_before,
        restarts(&p),
        report.ops,
        report.errors,
        report.slowest,
        r.hits,
        100.0 * r.hits as f64 / checked.max(1) as f64,
        r.misses,
        r.lost_elsewhere,
        r.stale.len()
    );
    anyhow::ensure!(p.uid() == uid, "the pod was re-created");
    anyhow::ensure!(failed_gets > 0, "no get failed while the node was cut off");
    anyhow::ensure!(
        slowest_get < Duration::from_secs(5) && report.slowest < Duration::from_secs(5),
        "a request hung: get {slowest_get:?}, set {:?}",
        report.slowest
    );
    anyhow::ensure!(
        r.stale.is_empty(),
        "keys read back an older value: {:?}",
        r.stale
    );
    anyhow::ensure!(
        r.lost_elsewhere == 0,
        "{} keys of the other nodes were lost",
        r.lost_elsewhere
    );
    Ok(())
}
