//! Operator benchmarks on the sandbox (see docs/BENCHMARKS.md):
//! 1. CR change → mapping + StatefulSet updated: p50/p99 over N scale-outs, next to a floor
//!    measured in the same run (one StatefulSet patch + one znode create, done directly);
//! 2. M resources created at once: time until all are reconciled, the operator's peak RSS, and
//!    API + ZooKeeper writes during a steady-state resync.
//!
//! Pods are unschedulable (a nodeSelector no node matches), so only the operator is measured.
//!
//! usage: bench-operator <arcus-operator binary> [changes=200] [resources=500]

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use test_support::process::ChildGuard;
use test_support::sandbox::{Sandbox, ZOOKEEPER};
use test_support::wait_until;
use zookeeper_client as zk;

type Cr = kube::api::DynamicObject;

fn cr_resource() -> kube::api::ApiResource {
    let gvk = kube::api::GroupVersionKind::gvk("jam2in.com", "v1", "ArcusMemcached");
    kube::api::ApiResource::from_gvk_with_plural(&gvk, "memcacheds")
}

fn cr_api(sandbox: &Sandbox, ns: &str) -> Api<Cr> {
    Api::namespaced_with(sandbox.client.clone(), ns, &cr_resource())
}

fn cr(name: &str, svc: &str, replicas: i32) -> Cr {
    serde_json::from_value(json!({
        "apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached", "metadata": {"name": name},
        "spec": {"replicas": replicas, "serviceCode": svc, "zookeeperServers": [ZOOKEEPER],
                 "image": {"name": "jam2in/arcus-memcached:1.11.7"},
                 // No node matches: pods stay Pending (Unschedulable), nothing runs or churns.
                 "nodeSelector": {"arcus-bench": "no-such-node"}}
    }))
    .unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn peak_rss_mib(pid: u32) -> f64 {
    rss_mib(pid, "VmHWM:")
}

/// `field` (VmHWM: peak, VmRSS: now) of `pid`, in MiB.
fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let operator = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/release/arcus-operator".into());
    let changes: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let resources: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(500);

    let sandbox = Sandbox::shared().await?;
    test_support::operator::install_crd(sandbox).await?;
    let ns = sandbox.namespace("bench").await?;
    let metrics_addr = format!(
        "127.0.0.1:{}",
        test_support::process::free_port("127.0.0.1")
    );
    let mut cmd = Command::new(&operator);
    cmd.args([
        "run",
        "--no-leader-election",
        "--resync-seconds",
        "20",
        "--concurrency",
        "32",
        "--metrics-bind",
        &metrics_addr,
    ])
    .env("KUBECONFIG", &sandbox.kubeconfig)
    .env("WATCH_NAMESPACE", &ns.name)
    // BENCH_OPERATOR_LOG=arcus_operator::controller=debug logs each pass's stage times.
    .env(
        "RUST_LOG",
        std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let log = std::env::temp_dir().join(format!("bench-operator-{}.log", ns.name));
    let mut op = ChildGuard::spawn("arcus-operator", cmd, &log)?;
    let pid = op.pid();
    eprintln!(
        "operator {operator} pid {pid}, namespace {}, log {}",
        ns.name,
        log.display()
    );

    let crs = cr_api(sandbox, &ns.name);
    let result = measure(&ns, &crs, changes, resources, &metrics_addr, pid).await;
    // Clean up: the operator removes every resource's ZooKeeper state, then it stops.
    crs.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    wait_until(
        Duration::from_secs(300),
        "all resources deleted",
        || async {
            crs.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await?;
    op.stop(Duration::from_secs(10));
    ns.cleanup().await?;
    result
}

async fn measure(
    ns: &test_support::sandbox::TestNamespace,
    crs: &Api<Cr>,
    changes: usize,
    resources: usize,
    metrics_addr: &str,
    pid: u32,
) -> anyhow::Result<()> {
    let zk = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(ZOOKEEPER)
        .await?;
    let stss: Api<StatefulSet> = ns.api();

    // 1. Latency of a scale-out: patch → mapping for the new ordinal exists and the StatefulSet says so.
    let svc = format!("{}_lat", ns.name.replace('-', "_"));
    crs.create(&PostParams::default(), &cr("lat", &svc, 1))
        .await?;
    wait_until(Duration::from_secs(60), "first reconcile", || async {
        (stss.get_opt("lat-arcus-mc").await.ok()??.spec?.replicas == Some(1)).then_some(())
    })
    .await?;
    let mapping = |o: u32| {
        format!(
            "/arcus/cache_server_mapping/lat-arcus-mc-{o}.{}:11211",
            ns.name
        )
    };
    let mut samples = Vec::with_capacity(changes);
    for _ in 0..changes {
        let t0 = Instant::now();
        crs.patch(
            "lat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
        loop {
            let mapped = zk.check_stat(&mapping(1)).await?.is_some();
            if mapped
                && stss
                    .get("lat-arcus-mc")
                    .await?
                    .spec
                    .and_then(|s| s.replicas)
                    == Some(2)
            {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "scale-out not seen within 30 s"
            );
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        crs.patch(
            "lat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await?;
        wait_until(Duration::from_secs(30), "scale-in done", || async {
            zk.check_stat(&mapping(1))
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await?;
    }
    // The floor: the same two writes and reads done directly, no operator in between.
    let mut floor = Vec::with_capacity(changes);
    let probe = format!("/arcus/cache_server_mapping/bench-floor.{}:11211", ns.name);
    for i in 0..changes {
        let t0 = Instant::now();
        let replicas = if i % 2 == 0 { 2 } else { 1 };
        stss.patch(
            "lat-arcus-mc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await?;
        zk.create(
            &probe,
            b"",
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await?;
        let _ = zk.check_stat(&probe).await?;
        let _ = stss.get("lat-arcus-mc").await?;
        floor.push(t0.elapsed().as_secs_f64() * 1000.0);
        zk.delete(&probe, None).await?;
    }
    stss.patch(
        "lat-arcus-mc",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await?;
    samples.sort_by(f64::total_cmp);
    floor.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    let (f50, f99) = (percentile(&floor, 0.5), percentile(&floor, 0.99));
    println!("cr-change-latency: n={changes} p50={p50:.1}ms p99={p99:.1}ms | floor (direct sts patch + znode create) p50={f50:.1}ms p99={f99:.1}ms | ratio p50={:.2} p99={:.2}", p50 / f50, p99 / f99);

    // 2. Many resources at once, watched (not polled: listing hundreds of objects every 100 ms
    // would load the API server the operator is measured against).
    let crs_seen = watched(crs.clone(), cr_resource());
    let sts_seen = watched(stss.clone(), ());
    let before_cold = scrape(metrics_addr).await;
    let t0 = Instant::now();
    let prefix = ns.name.replace('-', "_");
    futures::stream::iter(0..resources)
        .map(|i| {
            let crs = crs.clone();
            let prefix = prefix.clone();
            async move {
                crs.create(
                    &PostParams::default(),
                    &cr(&format!("m{i}"), &format!("{prefix}_m{i}"), 1),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let created = t0.elapsed();
    let all = resources + 1;
    wait_until(
        Duration::from_secs(600),
        &format!("{all} resources reconciled"),
        || async {
            let done = crs_seen
                .state()
                .iter()
                .filter(|c| {
                    c.data["status"]["observedGeneration"].as_i64() == c.metadata.generation
                        && c.data["status"]["ready"].is_string()
                })
                .count();
            let sts = sts_seen.state().len();
            (done == all && sts == all).then_some(())
        },
    )
    .await?;
    let reconciled = t0.elapsed();
    let after_cold = scrape(metrics_addr).await;
    let per =
        |name: &str| (metric(&after_cold, name) - metric(&before_cold, name)) / resources as f64;
    println!("many-resources: {resources} created in {:.1}s, all reconciled (status + StatefulSet + mappings) after {:.1}s | per resource: {:.1} reconciles, {:.1} API writes, {:.1} ZooKeeper writes | RSS {:.1} MiB", created.as_secs_f64(), reconciled.as_secs_f64(), per("arcus_operator_reconciles_total"), per("arcus_operator_api_writes_total"), per("arcus_operator_zookeeper_writes_total"), rss_mib(pid, "VmRSS:"));
    let floor = cold_floor(ns, resources, &zk).await?;
    println!("many-resources floor: the same first writes done directly for {resources} resources (CR, Service, PDB, StatefulSet, status, 3 znodes; 32 in flight) took {floor:.1}s | ratio {:.2}", reconciled.as_secs_f64() / floor);

    // Quiet, then a resync window: everything is reconciled again and nothing is written.
    let writes = |text: &str| {
        metric(text, "arcus_operator_zookeeper_writes_total")
            + metric(text, "arcus_operator_api_writes_total")
    };
    let mut previous = -1.0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = writes(&scrape(metrics_addr).await);
        if now == previous {
            break;
        }
        previous = now;
    }
    let before = scrape(metrics_addr).await;
    tokio::time::sleep(Duration::from_secs(25)).await; // > one --resync-seconds period (20 s)
    let after = scrape(metrics_addr).await;
    let d = |name: &str| metric(&after, name) - metric(&before, name);
    println!(
        "steady-state resync (25 s, resync period 20 s): reconciles={} zk_writes={} api_writes={} | operator peak RSS {:.1} MiB",
        d("arcus_operator_reconciles_total"),
        d("arcus_operator_zookeeper_writes_total"),
        d("arcus_operator_api_writes_total"),
        peak_rss_mib(pid)
    );

    Ok(())
}

/// A store of `api`'s objects, kept by a watch for as long as the process runs.
fn watched<K>(api: Api<K>, dyntype: K::DynamicType) -> kube::runtime::reflector::Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(stream);
    store
}

/// The floor of a cold start: what the operator writes for each new resource, done directly
/// with the same concurrency in a namespace no operator watches, objects copied from the
/// operator's own for `lat` (so the StatefulSet controller does the same work after).
async fn cold_floor(
    ns: &test_support::sandbox::TestNamespace,
    resources: usize,
    zk: &zk::Client,
) -> anyhow::Result<f64> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let sandbox = Sandbox::shared().await?;
    let floor_ns = sandbox.namespace("bench-floor").await?;
    let template = |mut v: serde_json::Value| {
        let meta = v["metadata"].take();
        v["metadata"] = json!({"labels": meta["labels"].clone()});
        v.as_object_mut().unwrap().remove("status");
        v
    };
    let sts = template(serde_json::to_value(
        ns.api::<StatefulSet>().get("lat-arcus-mc").await?,
    )?);
    let svc = template(serde_json::to_value(
        ns.api::<Service>().get("lat-arcus-mc").await?,
    )?);
    let pdb = template(serde_json::to_value(
        ns.api::<PodDisruptionBudget>().get("lat-arcus-mc").await?,
    )?);
    let mut svc = svc;
    svc["spec"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| k != "clusterIP" && k != "clusterIPs");
    let crs = cr_api(sandbox, &floor_ns.name);
    let root = format!("/arcus-bench-floor-{}", floor_ns.name);
    let acl = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    zk.create(&root, b"", &acl).await?;
    let apply = PatchParams::apply("bench-floor").force();
    let t0 = Instant::now();
    futures::stream::iter(0..resources)
        .map(|i| {
            let (crs, name) = (crs.clone(), format!("f{i}"));
            let (sts, svc, pdb) = (sts.clone(), svc.clone(), pdb.clone());
            let (apply, root, acl) = (apply.clone(), root.clone(), acl.clone());
            let api = |n: &str| {
                (
                    floor_ns.api::<StatefulSet>(),
                    floor_ns.api::<Service>(),
                    floor_ns.api::<PodDisruptionBudget>(),
                    n.to_string(),
                )
            };
            let (sts_api, svc_api, pdb_api, _) = api(&name);
            async move {
                crs.create(&PostParams::default(), &cr(&name, &format!("floor_{i}"), 1))
                    .await?;
                crs.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"floor": "yes"}}})),
                )
                .await?;
                for z in ["", "/a", "/b"] {
                    zk.create(&format!("{root}/{name}{z}"), b"", &acl).await?;
                }
                let named = |mut v: serde_json::Value, kind: &str| {
                    v["metadata"]["name"] = json!(format!("{name}-arcus-mc"));
                    v["apiVersion"] = json!(if kind == "PodDisruptionBudget" {
                        "policy/v1"
                    } else if kind == "StatefulSet" {
                        "apps/v1"
                    } else {
                        "v1"
                    });
                    v["kind"] = json!(kind);
                    v
                };
                let n = format!("{name}-arcus-mc");
                svc_api
                    .patch(&n, &apply, &Patch::Apply(named(svc, "Service")))
                    .await?;
                pdb_api
                    .patch(&n, &apply, &Patch::Apply(named(pdb, "PodDisruptionBudget")))
                    .await?;
                sts_api
                    .patch(&n, &apply, &Patch::Apply(named(sts, "StatefulSet")))
                    .await?;
                crs.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"observedGeneration": 1, "ready": "0/1"}})),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let took = t0.elapsed().as_secs_f64();
    for i in 0..resources {
        for z in ["/a", "/b", ""] {
            let _ = zk.delete(&format!("{root}/f{i}{z}"), None).await;
        }
    }
    let _ = zk.delete(&root, None).await;
    crs.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    floor_ns.cleanup().await?;
    Ok(took)
}

use futures::StreamExt;
