//! Fencing of the operator end to end on the sandbox (issue 12's first two "Must show" items):
//! a leader SIGSTOPped in the middle of a scale-in writes nothing once it wakes after a
//! stand-by finished the scale-in, and a leader killed the moment a cache-aware restart has
//! drained its node leaves no key with an older value than the one clients wrote last.
//!
//! Each test deploys two operator replicas (deploy/*.yaml) into its own namespace. The claim
//! znode is read in both formats: the operator's `pending` record and the versioned `operation`
//! record (`{"version":2,"epoch":..,"kind":..,"host":..,"stage":{"name":..}}`).

mod common;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use test_support::operator::{
    container_pid, leader_pod, signal_process, ProcessId, StoppedProcess,
};
use test_support::sandbox::{pod_ready, TestNamespace};
use test_support::wait_until;
use zookeeper_client as zk;

const CACHE_LIST: &str = "/arcus/cache_list";
const CLIENT_LIST: &str = "/arcus/client_list";
/// The pod-template annotation whose change makes the operator restart a node
/// (`arcus_operator::day2::RESTART_HASH`; spelled out so this file reads the cluster only).
const RESTART_HASH: &str = "jam2in.com/restart-hash";
/// The memcached `stats` counters that count writes (and the items they leave). Connection
/// and byte counters are left out: reading `stats` moves them.
const WRITE_COUNTERS: &[&str] = &[
    "cmd_set",
    "cmd_touch",
    "cmd_flush",
    "delete_hits",
    "delete_misses",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
    "cas_hits",
    "cas_misses",
    "cas_badval",
    "touch_hits",
    "touch_misses",
    "total_items",
    "curr_items",
];

fn cr(name: &str, svc: &str, replicas: i32) -> DynamicObject {
    serde_json::from_value(cr_json(name, svc, replicas)).expect("valid CR")
}

fn status_of(obj: &DynamicObject) -> Value {
    obj.data.get("status").cloned().unwrap_or(Value::Null)
}

async fn wait_ready(
    api: &Api<DynamicObject>,
    name: &str,
    want: &str,
    secs: u64,
) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(secs),
        &format!("{name} status.ready == {want}"),
        || async {
            let obj = api.get(name).await.ok()?;
            (status_of(&obj)["ready"] == want).then_some(())
        },
    )
    .await
}

/// What the claim znode says is in flight, in either format.
#[derive(Clone, Debug, PartialEq)]
enum Claim {
    Idle,
    /// The `pending` record: its kind and the whole record (it names the hosts it moves).
    Pending {
        kind: String,
        record: String,
    },
    /// The versioned `operation` record.
    Operation {
        kind: String,
        host: Option<String>,
        stage: Option<String>,
    },
}

impl Claim {
    fn parse(data: &[u8]) -> anyhow::Result<Claim> {
        let v: Value = serde_json::from_slice(data).map_err(|e| {
            anyhow::anyhow!(
                "the claim znode holds no JSON ({e}): {:?}",
                String::from_utf8_lossy(data)
            )
        })?;
        let text = |v: &Value| v.as_str().map(str::to_string);
        Ok(match (v.get("operation"), v.get("pending")) {
            (Some(op), _) if !op.is_null() => Claim::Operation {
                kind: text(&op["kind"]).unwrap_or_default(),
                host: text(&op["host"]),
                stage: text(&op["stage"]["name"]),
            },
            (_, Some(p)) if !p.is_null() => Claim::Pending {
                kind: text(&p["kind"]).unwrap_or_default(),
                record: p.to_string(),
            },
            _ => Claim::Idle,
        })
    }

    async fn read(zk: &zk::Client, svc: &str) -> anyhow::Result<Claim> {
        let path = format!("{CACHE_LIST}/{svc}");
        let (data, _) = zk
            .get_data(&path)
            .await
            .map_err(|e| anyhow::anyhow!("reading the claim {path}: {e}"))?;
        Claim::parse(&data)
    }

    /// The drain of `host` for its restart: a scale-in of that one node (`pending`), or the
    /// restart operation's `draining` stage.
    fn drains(&self, host: &str) -> bool {
        match self {
            Claim::Idle => false,
            Claim::Pending { kind, record } => kind == "scaleIn" && record.contains(host),
            Claim::Operation {
                kind,
                host: h,
                stage,
            } => {
                kind == "restart"
                    && h.as_deref() == Some(host)
                    && stage.as_deref() == Some("draining")
            }
        }
    }
}

/// The Deployment as deployed, without its liveness probe: the sandbox's node agent runs
/// probes, and /healthz of a stopped process times out, so it would kill the process we hold
/// stopped (3 failures 10 s apart) before the stand-by has finished.
fn without_liveness_probe(deployment: &mut Value) {
    if let Some(containers) = deployment["spec"]["template"]["spec"]["containers"].as_array_mut() {
        for c in containers {
            if let Some(c) = c.as_object_mut() {
                c.remove("livenessProbe");
            }
        }
    }
}

fn restart_count(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or(0)
}

/// Everything a write of the operator could change: the stat of every znode it owns, the
/// resourceVersions of the CR and its objects, the CR's status, its Events, and the write
/// counters of every cache node.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    /// path → (mzxid, pzxid, version, cversion)
    znodes: BTreeMap<String, (i64, i64, i32, i32)>,
    /// "Kind/name" → resourceVersion
    objects: BTreeMap<String, String>,
    status: Value,
    /// The operator's Events (about the CR): name → resourceVersion (a repeated Event is a
    /// patch of its series, which moves the resourceVersion).
    events: BTreeMap<String, String>,
    /// Events about pods (the node agent's, e.g. an operator container restarting): printed,
    /// not compared.
    pod_events: usize,
    /// pod → counter → value
    cache: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Snapshot {
    async fn take(
        zk: &zk::Client,
        crs: &Api<DynamicObject>,
        ns: &TestNamespace,
        name: &str,
        svc: &str,
    ) -> anyhow::Result<Snapshot> {
        let mut roots = vec![
            format!("{CACHE_LIST}/{svc}"),
            format!("{CLIENT_LIST}/{svc}"),
        ];
        for key in mappings_of(zk, svc, &ns.name).await {
            roots.push(format!("{MAPPINGS}/{key}"));
        }
        let mut znodes = BTreeMap::new();
        while let Some(path) = roots.pop() {
            let Some(stat) = zk
                .check_stat(&path)
                .await
                .map_err(|e| anyhow::anyhow!("stat of {path}: {e}"))?
            else {
                continue;
            };
            znodes.insert(
                path.clone(),
                (stat.mzxid, stat.pzxid, stat.version, stat.cversion),
            );
            for c in children(zk, &path).await {
                roots.push(format!("{path}/{c}"));
            }
        }

        let obj = crs.get(name).await?;
        let owned = format!("{name}-arcus-mc");
        let mut objects = BTreeMap::new();
        let rv = |m: &kube::api::ObjectMeta| m.resource_version.clone().unwrap_or_default();
        objects.insert(format!("ArcusMemcached/{name}"), rv(&obj.metadata));
        let sts: Api<StatefulSet> = ns.api();
        let services: Api<Service> = ns.api();
        let pdbs: Api<PodDisruptionBudget> = ns.api();
        objects.insert(
            format!("StatefulSet/{owned}"),
            rv(&sts.get(&owned).await?.metadata),
        );
        objects.insert(
            format!("Service/{owned}"),
            rv(&services.get(&owned).await?.metadata),
        );
        objects.insert(
            format!("PodDisruptionBudget/{owned}"),
            rv(&pdbs.get(&owned).await?.metadata),
        );

        let mut events = BTreeMap::new();
        let mut pod_events = 0;
        for e in ns.api::<Event>().list(&ListParams::default()).await? {
            if e.involved_object.kind.as_deref() == Some("Pod") {
                pod_events += 1;
            } else {
                events.insert(e.name_any(), rv(&e.metadata));
            }
        }

        let mut cache = BTreeMap::new();
        let cache_pods = ListParams::default().labels("app.kubernetes.io/name=arcus-memcached");
        for p in ns.api::<Pod>().list(&cache_pods).await? {
            let ip = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .ok_or_else(|| anyhow::anyhow!("cache pod {} has no IP", p.name_any()))?;
            let stats = node_stats(&ip)?;
            let counters = WRITE_COUNTERS
                .iter()
                .map(|k| {
                    let v = stats.get(*k).and_then(|v| v.parse().ok()).unwrap_or(0);
                    (k.to_string(), v)
                })
                .collect();
            cache.insert(p.name_any(), counters);
        }
        Ok(Snapshot {
            znodes,
            objects,
            status: status_of(&obj),
            events,
            pod_events,
            cache,
        })
    }
}

/// What changed from `a` to `b`, counted per kind of write.
#[derive(Debug, Default)]
struct Writes {
    zookeeper: Vec<String>,
    api: Vec<String>,
    cache: BTreeMap<String, u64>,
}

impl Writes {
    fn between(a: &Snapshot, b: &Snapshot) -> Writes {
        let mut w = Writes::default();
        let paths: BTreeSet<&String> = a.znodes.keys().chain(b.znodes.keys()).collect();
        for p in paths {
            match (a.znodes.get(p), b.znodes.get(p)) {
                (Some(x), Some(y)) if x == y => {}
                (x, y) => w.zookeeper.push(format!(
                    "{p}: (mzxid, pzxid, version, cversion) {x:?} → {y:?}"
                )),
            }
        }
        for (k, v) in &a.objects {
            if b.objects.get(k) != Some(v) {
                w.api
                    .push(format!("{k}: resourceVersion {v} → {:?}", b.objects.get(k)));
            }
        }
        if a.status != b.status {
            // Name the fields that moved, not the whole status twice.
            let empty = serde_json::Map::new();
            let (x, y) = (
                a.status.as_object().unwrap_or(&empty),
                b.status.as_object().unwrap_or(&empty),
            );
            let fields: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for f in fields {
                if x.get(f) != y.get(f) {
                    w.api.push(format!(
                        "status.{f}: {} → {}",
                        x.get(f).unwrap_or(&Value::Null),
                        y.get(f).unwrap_or(&Value::Null)
                    ));
                }
            }
        }
        let names: BTreeSet<&String> = a.events.keys().chain(b.events.keys()).collect();
        for n in names {
            if a.events.get(n) != b.events.get(n) {
                w.api.push(format!(
                    "Event {n}: {:?} → {:?}",
                    a.events.get(n),
                    b.events.get(n)
                ));
            }
        }
        for (pod, counters) in &a.cache {
            for (k, v) in counters {
                let after = b
                    .cache
                    .get(pod)
                    .and_then(|c| c.get(k))
                    .copied()
                    .unwrap_or(0);
                if after != *v {
                    *w.cache.entry(format!("{pod} {k}")).or_default() += after.abs_diff(*v);
                }
            }
        }
        w
    }

    fn none(&self) -> bool {
        self.zookeeper.is_empty() && self.api.is_empty() && self.cache.is_empty()
    }

    fn summary(&self) -> String {
        format!(
            "ZooKeeper: {} znode(s) changed; API: {} change(s) (resourceVersions, status, Events); \
             cache: {} counter change(s) totalling {}",
            self.zookeeper.len(),
            self.api.len(),
            self.cache.len(),
            self.cache.values().sum::<u64>()
        )
    }

    fn details(&self) -> String {
        let mut lines: Vec<String> = self.zookeeper.clone();
        lines.extend(self.api.iter().cloned());
        lines.extend(self.cache.iter().map(|(k, d)| format!("{k}: +{d}")));
        lines.join("\n  ")
    }
}

/// Waits (bounded) until two snapshots a second apart are equal: the stand-by's steady state,
/// from which any later change is someone's write.
async fn quiet_snapshot(
    zk: &zk::Client,
    crs: &Api<DynamicObject>,
    ns: &TestNamespace,
    name: &str,
    svc: &str,
) -> anyhow::Result<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Snapshot::take(zk, crs, ns, name, svc).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await; // the interval of the quiet check
        let now = Snapshot::take(zk, crs, ns, name, svc).await?;
        if now == last {
            return Ok(now);
        }
        let w = Writes::between(&last, &now);
        anyhow::ensure!(
            Instant::now() < deadline,
            "the namespace did not settle in 60 s after the scale-in finished; still changing: {}\n  {}",
            w.summary(),
            w.details()
        );
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_stopped_during_scale_in_writes_nothing_after_it_wakes() -> anyhow::Result<()> {
    with_namespace_customized(
        "fence-stop",
        2,
        without_liveness_probe,
        |sandbox, ns| async move {
            let r = async {
                let zk = zk_client().await?;
                let svc = service_code(&ns);
                let crs = mc_api(sandbox, &ns);
                let name = "fs";
                crs.create(&PostParams::default(), &cr(name, &svc, 5)).await?;
                wait_ready(&crs, name, "5/5", 240).await?;
                let client = ring_client(&svc, 5).await?;
                const KEYS: usize = 100_000;
                let value = |i: usize| (format!("v{i}"), (i % 65536) as u32);
                let loaded = Instant::now();
                load(&client, KEYS, |i| {
                    let (v, f) = value(i);
                    (format!("k:{i}"), v, f, 0)
                })
                .await?;
                eprintln!("loaded {KEYS} keys in {:?}", loaded.elapsed());

                let leader = wait_until(Duration::from_secs(30), "a leader", || async {
                    leader_pod(&ns).await.ok().flatten()
                })
                .await?;
                let old = leader.name_any();
                let pid = container_pid(&leader)
                    .ok_or_else(|| anyhow::anyhow!("the leader pod {old} reports no PID"))?;
                let restarts_before = restart_count(&leader);

                // 5 → 3; stop the leader in the middle of the migration: the moment the claim
                // records the scale-in's checkpoint (pass 1 done; the ring change and pass 2
                // are what it does next). Not during a key listing: stock memcached's
                // `lru_crawler metadump` (the stand-in's lister) serves one client at a time,
                // and a stopped client holding it blocks the stand-by's listings until the
                // stopped process's connection closes.
                crs.patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": 3}})),
                )
                .await?;
                let patched = Instant::now();
                let seen = loop {
                    let m = status_of(&crs.get(name).await?)["migration"].clone();
                    let claim = Claim::read(&zk, &svc).await?;
                    let recorded = matches!(&claim, Claim::Operation { kind, .. } | Claim::Pending { kind, .. } if kind == "scaleIn");
                    if recorded {
                        break format!("status.migration {}, claim {claim:?}", m["summary"]);
                    }
                    anyhow::ensure!(
                        patched.elapsed() < Duration::from_secs(20),
                        "the migration never showed in 20 s after the patch (status.migration {m}, claim {claim:?})"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await; // polling period
                };
                let stopped = StoppedProcess::stop(pid)?;
                let process = stopped.process();
                eprintln!(
                    "SIGSTOPped the leader {old} (pid {pid}) {:?} after the patch, at: {seen}",
                    patched.elapsed()
                );

                // The stand-by takes over and finishes the scale-in.
                let stopped_at = Instant::now();
                let new_leader = new_leader(&ns, &old, 60).await?;
                eprintln!(
                    "takeover by {} {:?} after the stop",
                    new_leader.name_any(),
                    stopped_at.elapsed()
                );
                let sts: Api<StatefulSet> = ns.api();
                let finished = wait_until(
                    Duration::from_secs(240),
                    "the stand-by finished 5→3 (StatefulSet 3, 3 pods, claim idle, status.migration Done, no status.operation, ready 3/3)",
                    || async {
                        let s = sts.get(&format!("{name}-arcus-mc")).await.ok()?;
                        let st = s.status.clone()?;
                        let settled = s.spec?.replicas == Some(3)
                            && st.replicas == 3
                            && st.ready_replicas == Some(3)
                            && st.observed_generation == s.metadata.generation;
                        let claim = Claim::read(&zk, &svc).await.ok()?;
                        let status = status_of(&crs.get(name).await.ok()?);
                        let m = &status["migration"];
                        let done = m["phase"] == "Done"
                            && m["summary"].as_str().is_some_and(|s| s.contains("5→3"));
                        (settled
                            && claim == Claim::Idle
                            && done
                            // Its last status write: status-only changes start no pass, so
                            // it comes with the next requeue, not at once.
                            && status.get("operation").is_none_or(|o| o.is_null())
                            && status["ready"] == "3/3"
                            && pods_named(&ns, &format!("{name}-arcus-mc-")).await.len() == 3
                            && client.nodes().len() == 3)
                            .then(|| m.clone())
                    },
                )
                .await?;
                eprintln!(
                    "the stand-by finished {:?} after the stop: {}",
                    stopped_at.elapsed(),
                    finished["summary"]
                );
                let before = quiet_snapshot(&zk, &crs, &ns, name, &svc).await?;
                anyhow::ensure!(
                    process.state() == Some('T'),
                    "the old leader (pid {pid}) is not stopped any more (state {:?}): something \
                     killed or resumed it while the stand-by worked",
                    process.state()
                );
                eprintln!(
                    "old leader stopped for {:?} before the resume",
                    stopped_at.elapsed()
                );

                // Wake the old leader: it must find it lost the lease and exit, writing nothing.
                let (after, writes) = wake_the_old_leader(
                    stopped,
                    WokenLeader { pod: &old, pid, restarts_before },
                    &zk,
                    &crs,
                    &ns,
                    (name, &svc),
                    &before,
                )
                .await?;
                let migration = after.status["migration"].clone();
                eprintln!("status.migration at the end: {migration}");

                let mut lost = 0;
                for i in 0..KEYS {
                    let got = client.get(&format!("k:{i}")).await?;
                    let (v, f) = value(i);
                    if got.map(|g| (g.value, g.flags)) != Some((v.into_bytes(), f)) {
                        lost += 1;
                    }
                }
                eprintln!("{lost} of {KEYS} keys lost");

                assert!(
                    writes.none(),
                    "the old leader wrote after it woke: {}\n  {}",
                    writes.summary(),
                    writes.details()
                );
                assert_eq!(
                    migration, finished,
                    "status.migration is still the stand-by's Done record"
                );
                assert_eq!(lost, 0, "keys lost");
                Ok(())
            }
            .await;
            (ns, r)
        },
    )
    .await
}

/// The stopped ex-leader, as it was before the stop.
struct WokenLeader<'a> {
    pod: &'a str,
    pid: i32,
    restarts_before: i32,
}

/// SIGCONTs the stopped old leader, waits (bounded) until it exits and its container is running
/// again, and returns the snapshot then with the writes made since `before` (by anyone: the
/// caller asserts there are none).
async fn wake_the_old_leader(
    stopped: StoppedProcess,
    old: WokenLeader<'_>,
    zk: &zk::Client,
    crs: &Api<DynamicObject>,
    ns: &TestNamespace,
    (name, svc): (&str, &str),
    before: &Snapshot,
) -> anyhow::Result<(Snapshot, Writes)> {
    let (pid, process) = (old.pid, stopped.process());
    stopped.resume()?;
    let resumed = Instant::now();
    wait_until(
        Duration::from_secs(60),
        &format!("the resumed old leader (pid {pid}) to exit"),
        || async { process.exited().then_some(()) },
    )
    .await?;
    eprintln!(
        "the old leader exited {:?} after SIGCONT",
        resumed.elapsed()
    );
    let pods: Api<Pod> = ns.api();
    wait_until(
        Duration::from_secs(90),
        &format!(
            "the operator container of {} restarted and running",
            old.pod
        ),
        || async {
            let p = pods.get(old.pod).await.ok()?;
            let new_pid = container_pid(&p)?;
            (restart_count(&p) > old.restarts_before
                && new_pid != pid
                && ProcessId::of(new_pid).is_some())
            .then_some(())
        },
    )
    .await?;
    let after = Snapshot::take(zk, crs, ns, name, svc).await?;
    let writes = Writes::between(before, &after);
    eprintln!(
        "writes after the old leader woke: {}{}",
        writes.summary(),
        if writes.none() {
            String::new()
        } else {
            format!("\n  {}", writes.details())
        }
    );
    eprintln!(
        "(pod Events, the node agent's, not compared: {} → {})",
        before.pod_events, after.pod_events
    );
    Ok((after, writes))
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_stopped_during_a_rolling_restart_writes_nothing_after_it_wakes(
) -> anyhow::Result<()> {
    with_namespace_customized(
        "fence-roll",
        2,
        without_liveness_probe,
        |sandbox, ns| async move {
            let r = roll_with_the_leader_stopped(sandbox, &ns).await;
            (ns, r)
        },
    )
    .await
}

/// A cache-aware rolling restart of 3 nodes (spec.configuration.threads changed) with the
/// leader SIGSTOPped as soon as the first node's restart is recorded: the stand-by finishes the
/// roll, the old leader wakes, exits and writes nothing, and no key is lost or reverted.
async fn roll_with_the_leader_stopped(
    sandbox: &'static test_support::sandbox::Sandbox,
    ns: &TestNamespace,
) -> anyhow::Result<()> {
    const KEYS: usize = 30_000;
    let zk = zk_client().await?;
    let svc = service_code(ns);
    let crs = mc_api(sandbox, ns);
    let name = "fr";
    crs.create(&PostParams::default(), &cr(name, &svc, 3))
        .await?;
    wait_ready(&crs, name, "3/3", 240).await?;
    let client = ring_client(&svc, 3).await?;
    load(&client, KEYS, |i| (format!("r:{i}"), format!("v{i}"), 0, 0)).await?;
    let leader = wait_until(Duration::from_secs(30), "a leader", || async {
        leader_pod(ns).await.ok().flatten()
    })
    .await?;
    let old = leader.name_any();
    let pid = container_pid(&leader)
        .ok_or_else(|| anyhow::anyhow!("the leader pod {old} reports no PID"))?;
    let restarts_before = restart_count(&leader);

    crs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"configuration": {"threads": 3}}})),
    )
    .await?;
    let seen = wait_until(Duration::from_secs(60), "the roll's first restart recorded", || async {
        match Claim::read(&zk, &svc).await.ok()? {
            c @ Claim::Operation { .. } if matches!(&c, Claim::Operation { kind, .. } if kind == "restart") => Some(c),
            _ => None,
        }
    })
    .await?;
    let stopped = StoppedProcess::stop(pid)?;
    let process = stopped.process();
    eprintln!("SIGSTOPped the leader {old} (pid {pid}) at {seen:?}");
    let stopped_at = Instant::now();
    let new_leader = new_leader(ns, &old, 60).await?;
    eprintln!(
        "takeover by {} {:?} after the stop",
        new_leader.name_any(),
        stopped_at.elapsed()
    );

    let sts: Api<StatefulSet> = ns.api();
    let pods: Api<Pod> = ns.api();
    let sts_name = format!("{name}-arcus-mc");
    wait_until(
        Duration::from_secs(300),
        "the stand-by finished the roll",
        || async {
            let s = sts.get(&sts_name).await.ok()?;
            let want = s
                .spec?
                .template
                .metadata?
                .annotations?
                .get(arcus_operator::day2::RESTART_HASH)?
                .clone();
            let list = pods
                .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
                .await
                .ok()?;
            let rolled = list.items.len() == 3
                && list.items.iter().all(|p| {
                    p.annotations().get(arcus_operator::day2::RESTART_HASH) == Some(&want)
                        && pod_ready(p)
                });
            let status = status_of(&crs.get(name).await.ok()?);
            let idle = Claim::read(&zk, &svc).await.ok()? == Claim::Idle
                && status.get("operation").is_none_or(|o| o.is_null())
                && status["ready"] == "3/3";
            (rolled && idle && client.nodes().len() == 3).then_some(())
        },
    )
    .await?;
    eprintln!(
        "the stand-by finished the roll {:?} after the stop",
        stopped_at.elapsed()
    );
    let before = quiet_snapshot(&zk, &crs, ns, name, &svc).await?;
    anyhow::ensure!(
        process.state() == Some('T'),
        "the old leader (pid {pid}) is not stopped any more (state {:?})",
        process.state()
    );
    let (_, writes) = wake_the_old_leader(
        stopped,
        WokenLeader {
            pod: &old,
            pid,
            restarts_before,
        },
        &zk,
        &crs,
        ns,
        (name, &svc),
        &before,
    )
    .await?;
    let mut wrong = 0;
    for i in 0..KEYS {
        let got = get_retrying(&client, &format!("r:{i}")).await?;
        wrong += usize::from(got.map(|g| g.value) != Some(format!("v{i}").into_bytes()));
    }
    eprintln!("{wrong} of {KEYS} keys lost or changed");
    anyhow::ensure!(
        writes.none(),
        "the old leader wrote after it woke: {}\n  {}",
        writes.summary(),
        writes.details()
    );
    anyhow::ensure!(wrong == 0, "{wrong} keys lost or changed by the roll");
    Ok(())
}

/// Waits (bounded) for the drain of `host` to end in the claim znode, watching it, and
/// SIGKILLs `pid` the moment it does. Returns the claim states seen, in order.
async fn kill_when_drain_ends(
    zk: &zk::Client,
    svc: &str,
    host: &str,
    pid: i32,
    timeout: Duration,
) -> anyhow::Result<Vec<Claim>> {
    let path = format!("{CACHE_LIST}/{svc}");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: Vec<Claim> = Vec::new();
    loop {
        let (data, _, watcher) = zk
            .get_and_watch_data(&path)
            .await
            .map_err(|e| anyhow::anyhow!("watching the claim {path}: {e}"))?;
        let claim = Claim::parse(&data)?;
        let drained_before = seen.iter().any(|c| c.drains(host));
        if seen.last() != Some(&claim) {
            seen.push(claim.clone());
        }
        if drained_before && !claim.drains(host) {
            signal_process(pid, "KILL")?;
            return Ok(seen);
        }
        if tokio::time::timeout_at(deadline, watcher.changed())
            .await
            .is_err()
        {
            anyhow::bail!(
                "the drain of {host} did not end within {timeout:?}; claim states seen: {seen:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_killed_when_a_restart_drain_ends_reverts_no_key() -> anyhow::Result<()> {
    with_namespace("fence-roll", 2, |sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs = mc_api(sandbox, &ns);
            let name = "fr";
            crs.create(&PostParams::default(), &cr(name, &svc, 3)).await?;
            wait_ready(&crs, name, "3/3", 240).await?;
            let client = ring_client(&svc, 3).await?;
            const KEYS: usize = 5_000;
            load(&client, KEYS, |i| (format!("k:{i}"), "v1".into(), 0, 0)).await?;

            let pods: Api<Pod> = ns.api();
            let cache_pods = ListParams::default().labels("app.kubernetes.io/name=arcus-memcached");
            let uids_before: BTreeMap<String, String> = pods
                .list(&cache_pods)
                .await?
                .items
                .iter()
                .map(|p| (p.name_any(), p.metadata.uid.clone().unwrap_or_default()))
                .collect();
            let last = format!("{name}-arcus-mc-2");
            let last_ip = pods
                .get(&last)
                .await?
                .status
                .and_then(|s| s.pod_ip)
                .ok_or_else(|| anyhow::anyhow!("{last} has no IP"))?;
            let last_host = format!("{last}.{}", ns.name);
            let sts: Api<StatefulSet> = ns.api();
            let template_hash = |s: &StatefulSet| {
                s.spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get(RESTART_HASH).cloned())
            };
            let hash_before = template_hash(&sts.get(&format!("{name}-arcus-mc")).await?);
            let leader = wait_until(Duration::from_secs(30), "a leader", || async {
                leader_pod(&ns).await.ok().flatten()
            })
            .await?;
            let pid = container_pid(&leader)
                .ok_or_else(|| anyhow::anyhow!("the leader pod {} reports no PID", leader.name_any()))?;
            let leader_process = ProcessId::of(pid)
                .ok_or_else(|| anyhow::anyhow!("the leader's process {pid} is not running"))?;

            // An image change restarts every node, cache-aware, highest ordinal first. Kill the
            // leader the moment the drain of node 2 ends (its items moved away, its znode gone).
            let watch = {
                let zk = zk.clone();
                let (svc, host) = (svc.clone(), last_host.clone());
                tokio::spawn(async move {
                    kill_when_drain_ends(&zk, &svc, &host, pid, Duration::from_secs(180)).await
                })
            };
            crs.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"image": {"name": "jam2in/arcus-memcached:1.11.8"}}})),
            )
            .await?;
            let patched = Instant::now();
            let seen = watch.await??;
            eprintln!(
                "SIGKILLed the leader {} (pid {pid}) {:?} after the patch; claim states seen: {seen:?}",
                leader.name_any(),
                patched.elapsed()
            );
            let hit = matches!(seen.last(), Some(Claim::Idle))
                || matches!(seen.last(), Some(Claim::Operation { kind, .. }) if kind == "restart");
            eprintln!(
                "killed at {:?}: {}",
                seen.last(),
                if hit { "the drain had just ended" } else { "not the window this test aims at" }
            );
            wait_until(Duration::from_secs(10), &format!("the leader's process {pid} gone"), || async {
                leader_process.exited().then_some(())
            })
            .await?;

            // Clients overwrite every key while node 2 is out of cache_list.
            let node2 = format!("{last_ip}:11211");
            let out_of_ring = wait_until(Duration::from_secs(10), "the client's ring without node 2", || async {
                (!client.nodes().contains(&node2)).then_some(())
            })
            .await;
            eprintln!(
                "client ring when writing v2: {:?} (node 2 {node2} {})",
                client.nodes(),
                if out_of_ring.is_ok() { "out" } else { "still in" }
            );
            let written = Instant::now();
            load(&client, KEYS, |i| (format!("k:{i}"), "v2".into(), 0, 0)).await?;
            eprintln!("overwrote {KEYS} keys with v2 in {:?}", written.elapsed());

            // The next leader finishes the roll.
            let finished = wait_until(
                Duration::from_secs(360),
                "the roll finished (3 new pods on the new restart-hash, all registered, claim idle, ready 3/3)",
                || async {
                    let s = sts.get(&format!("{name}-arcus-mc")).await.ok()?;
                    let hash = template_hash(&s)?;
                    if Some(&hash) == hash_before.as_ref() {
                        return None;
                    }
                    let list = pods.list(&cache_pods).await.ok()?.items;
                    let rolled = list.len() == 3
                        && list.iter().all(|p| {
                            let on_new = p
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(RESTART_HASH))
                                == Some(&hash);
                            let replaced = uids_before.get(&p.name_any()) != p.metadata.uid.as_ref();
                            on_new && replaced && pod_ready(p) && p.metadata.deletion_timestamp.is_none()
                        });
                    let registered = children(&zk, &format!("{CACHE_LIST}/{svc}")).await;
                    let all_registered = list.iter().all(|p| {
                        let host = format!("{}.{}", p.name_any(), ns.name);
                        registered.iter().any(|z| z.ends_with(&format!("-{host}")))
                    }) && registered.len() == 3;
                    let idle = Claim::read(&zk, &svc).await.ok()? == Claim::Idle;
                    let status = status_of(&crs.get(name).await.ok()?);
                    (rolled && all_registered && idle && status["ready"] == "3/3" && client.nodes().len() == 3)
                        .then_some(status)
                },
            )
            .await?;
            eprintln!(
                "roll finished {:?} after the patch; status.migration: {}",
                patched.elapsed(),
                finished["migration"]["summary"]
            );
            let reasons: Vec<String> = ns
                .api::<Event>()
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|e| e.involved_object.kind.as_deref() == Some("ArcusMemcached"))
                .map(|e| format!("{}×{}", e.reason.clone().unwrap_or_default(), e.count.unwrap_or(1)))
                .collect();
            eprintln!("the operator's Events: {reasons:?}");

            let (mut v1, mut v2, mut missing, mut other) = (0, 0, 0, 0);
            let mut v1_owners = BTreeMap::<String, usize>::new();
            for i in 0..KEYS {
                let key = format!("k:{i}");
                match client.get(&key).await?.map(|g| g.value) {
                    Some(v) if v == b"v1" => {
                        v1 += 1;
                        *v1_owners.entry(client.node_for_key(&key)?).or_default() += 1;
                    }
                    Some(v) if v == b"v2" => v2 += 1,
                    Some(_) => other += 1,
                    None => missing += 1,
                }
            }
            eprintln!(
                "after the roll: {v1} of {KEYS} keys read v1 (older than last written; owners {v1_owners:?}), \
                 {v2} read v2, {missing} missing, {other} other"
            );
            assert_eq!(other, 0, "values nobody wrote");
            assert_eq!(v1, 0, "keys read back an older value (v1) than the last written (v2)");
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}
