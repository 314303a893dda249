//! Helpers shared by the operator e2e tests (`operator.rs`, `fencing.rs`): the namespace with an
//! operator deployed and cleaned up, ZooKeeper and pod reads, a ring client, bulk loads.
// Each test crate uses a different subset.
#![allow(dead_code)]

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_support::operator::{deploy_operator_with, undeploy_operator};
use test_support::sandbox::{Sandbox, TestNamespace, ZOOKEEPER};
use test_support::wait_until;
use zookeeper_client as zk;

pub const MAPPINGS: &str = "/arcus/cache_server_mapping";

/// The ArcusMemcached the tests start from: `replicas` stand-in nodes of 64 MB.
pub fn cr_json(name: &str, svc: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "serviceCode": svc, "zookeeperServers": [ZOOKEEPER],
            "configuration": {"memlimit": 64, "connections": 1000, "threads": 2},
            "image": {"name": "jam2in/arcus-memcached:1.11.7", "pullPolicy": "Always"}
        }
    })
}

/// A unique service code per test run, so tests sharing the sandbox's ZooKeeper never collide.
pub fn service_code(ns: &TestNamespace) -> String {
    ns.name.replace('-', "_")
}

pub async fn zk_client() -> anyhow::Result<zk::Client> {
    Ok(zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(ZOOKEEPER)
        .await?)
}

pub async fn children(zk: &zk::Client, path: &str) -> Vec<String> {
    let mut c = zk.list_children(path).await.unwrap_or_default();
    c.sort();
    c
}

/// Mapping keys (`<host>:<port>`) of this namespace that map `svc`.
pub async fn mappings_of(zk: &zk::Client, svc: &str, ns: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for key in children(zk, MAPPINGS).await {
        if key.contains(ns)
            && children(zk, &format!("{MAPPINGS}/{key}")).await == vec![svc.to_string()]
        {
            out.insert(key);
        }
    }
    out
}

pub async fn pods_named(ns: &TestNamespace, prefix: &str) -> BTreeSet<String> {
    let pods: Api<Pod> = ns.api();
    pods.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .map(|p| p.name_any())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The ArcusMemcached API untyped (status as the API server stores it).
pub fn mc_api(sandbox: &Sandbox, ns: &TestNamespace) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("jam2in.com", "v1", "ArcusMemcached");
    Api::namespaced_with(
        sandbox.client.clone(),
        &ns.name,
        &ApiResource::from_gvk_with_plural(&gvk, "memcacheds"),
    )
}

/// Runs `body` in a restricted namespace (the operator and every cache pod must be admitted
/// under Pod Security "restricted") with `operators` operator replicas; on failure dumps the
/// namespace; always cleans up.
pub async fn with_namespace<F, Fut>(prefix: &str, operators: i32, body: F) -> anyhow::Result<()>
where
    F: FnOnce(&'static Sandbox, TestNamespace) -> Fut,
    Fut: std::future::Future<Output = (TestNamespace, anyhow::Result<()>)>,
{
    with_namespace_customized(prefix, operators, |_| {}, body).await
}

/// [`with_namespace`] with the operator Deployment edited by `customize` before it is applied.
pub async fn with_namespace_customized<F, Fut>(
    prefix: &str,
    operators: i32,
    customize: fn(&mut Value),
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(&'static Sandbox, TestNamespace) -> Fut,
    Fut: std::future::Future<Output = (TestNamespace, anyhow::Result<()>)>,
{
    let sandbox = Sandbox::shared().await?;
    let ns = sandbox.restricted_namespace(prefix).await?;
    if let Err(e) = deploy_operator_with(sandbox, &ns, operators, customize).await {
        ns.dump().await;
        undeploy_operator(sandbox, &ns).await;
        ns.cleanup().await?;
        return Err(e);
    }
    let (ns, result) = body(sandbox, ns).await;
    if result.is_err() {
        ns.dump().await;
    }
    let deleted = delete_resources(sandbox, &ns).await;
    undeploy_operator(sandbox, &ns).await;
    ns.cleanup().await?;
    result.and(deleted.map_err(|e| anyhow::anyhow!("the operator did not finish deleting: {e}")))
}

/// Deletes the namespace's ArcusMemcacheds while the operator still runs (it removes their
/// ZooKeeper state); if it does not finish in time, removes their finalizers by hand so the
/// namespace can go (the test then fails).
async fn delete_resources(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let crs = mc_api(sandbox, ns);
    let _ = crs
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let deleted = wait_until(Duration::from_secs(120), "test CRs deleted", || async {
        crs.list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
            .map(|_| ())
    })
    .await;
    if let Err(e) = &deleted {
        eprintln!("{e}: removing finalizers by hand");
        let left = crs.list(&ListParams::default()).await;
        for cr in left.map(|l| l.items).unwrap_or_default() {
            let no_finalizers = Patch::Merge(json!({"metadata": {"finalizers": null}}));
            let _ = crs
                .patch(&cr.name_any(), &PatchParams::default(), &no_finalizers)
                .await;
        }
    }
    deleted
}

/// The operator pod that holds the leader Lease once it is not `old` any more.
pub async fn new_leader(ns: &TestNamespace, old: &str, secs: u64) -> anyhow::Result<Pod> {
    wait_until(Duration::from_secs(secs), "a new leader", || async {
        test_support::operator::leader_pod(ns)
            .await
            .ok()
            .flatten()
            .filter(|p| p.name_any() != old)
    })
    .await
}

/// A client of `svc` once its ring has `nodes` nodes (keys up to stock memcached's 250 bytes);
/// for 60 s after a ring change its deletes also reach the keys' previous owners.
pub async fn ring_client(
    svc: &str,
    nodes: usize,
) -> anyhow::Result<Arc<arcus_client::ArcusClient>> {
    ring_client_with(svc, nodes, Duration::from_secs(60)).await
}

/// [`ring_client`] whose deletes follow moved keys to their previous owners for `follow`
/// after a ring change (zero: never, as a client without that feature).
pub async fn ring_client_with(
    svc: &str,
    nodes: usize,
    follow: Duration,
) -> anyhow::Result<Arc<arcus_client::ArcusClient>> {
    let opts = arcus_client::ClientOptions {
        max_key_len: 250,
        delete_previous_owners_for: follow,
        ..Default::default()
    };
    let client = Arc::new(arcus_client::ArcusClient::connect(ZOOKEEPER, svc, opts).await?);
    wait_until(
        Duration::from_secs(10),
        &format!("client ring of {nodes}"),
        || async { (client.nodes().len() == nodes).then_some(()) },
    )
    .await?;
    Ok(client)
}

/// Stores `count` items, 64 in flight: `item(i)` gives key, value, flags and exptime.
pub async fn load(
    client: &Arc<arcus_client::ArcusClient>,
    count: usize,
    item: impl Fn(usize) -> (String, String, u32, i64),
) -> anyhow::Result<()> {
    futures::stream::iter((0..count).map(item))
        .map(|(k, v, f, t)| {
            let c = client.clone();
            async move {
                c.set(&k, v, f, t)
                    .await
                    .map_err(|e| anyhow::anyhow!("set {k}: {e}"))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(())
}

/// `get` of `key`, asked again when it fails (a timeout on the loaded machine), three times at
/// most; the error names the key.
pub async fn get_retrying(
    client: &arcus_client::ArcusClient,
    key: &str,
) -> anyhow::Result<Option<arcus_client::Item>> {
    let mut tries = 0;
    loop {
        tries += 1;
        match client.get(key).await {
            Ok(got) => return Ok(got),
            Err(e) if tries >= 3 => anyhow::bail!("get {key}: {e}"),
            Err(_) => continue,
        }
    }
}

/// `stats` of one node on its pod IP.
pub fn node_stats(ip: &str) -> anyhow::Result<BTreeMap<String, String>> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect((ip, 11211))
        .map_err(|e| anyhow::anyhow!("connecting to the cache node {ip}:11211: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"stats\r\n")?;
    let mut out = BTreeMap::new();
    for line in BufReader::new(s).lines() {
        let line = line?;
        if line == "END" {
            break;
        }
        let mut f = line.split_whitespace().skip(1);
        if let (Some(k), Some(v)) = (f.next(), f.next()) {
            out.insert(k.to_string(), v.to_string());
        }
    }
    Ok(out)
}

/// What the load wrote last, per key index (absent: the loaded value).
pub type Written = Arc<Mutex<HashMap<usize, String>>>;

pub struct LoadReport {
    pub ops: usize,
    pub errors: usize,
    pub slowest: Duration,
    /// Per key index, the value the load wrote last and was acknowledged.
    pub written: HashMap<usize, String>,
    /// Keys whose last write failed: it may or may not have landed (left out of checks).
    pub unknown: Vec<usize>,
}

/// A [`start_load`] running in the background: [`BackgroundWriter::finish`] stops it.
pub struct BackgroundWriter {
    written: Written,
    unknown: Arc<Mutex<Vec<usize>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
}

impl BackgroundWriter {
    pub fn start(
        client: Arc<arcus_client::ArcusClient>,
        keys: usize,
        key: fn(usize) -> String,
    ) -> BackgroundWriter {
        let written: Written = Arc::default();
        let unknown = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = start_load(
            client,
            keys,
            key,
            written.clone(),
            unknown.clone(),
            stop.clone(),
        );
        BackgroundWriter {
            written,
            unknown,
            stop,
            task,
        }
    }

    pub async fn finish(self) -> anyhow::Result<LoadReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut report = self.task.await?;
        report.written = self.written.lock().unwrap().clone();
        report.unknown = self.unknown.lock().unwrap().clone();
        Ok(report)
    }
}

/// Bound of a background load (about 500 writes/s): at most this many writes, for at most
/// `LOAD_FOR`.
pub const LOAD_OPS: usize = 20_000;
pub const LOAD_FOR: Duration = Duration::from_secs(120);

/// Writes `key(i)` for `i < keys` in a fixed stride until `stop` is set, `LOAD_OPS` are done or
/// `LOAD_FOR` passed;
/// records each acknowledged value (a failed set may or may not have landed: its key is then
/// unknown and left out of the checks).
fn start_load(
    client: Arc<arcus_client::ArcusClient>,
    keys: usize,
    key: fn(usize) -> String,
    written: Written,
    unknown: Arc<Mutex<Vec<usize>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut report = LoadReport {
            ops: 0,
            errors: 0,
            slowest: Duration::ZERO,
            written: HashMap::new(),
            unknown: Vec::new(),
        };
        for n in 0..LOAD_OPS {
            if stop.load(std::sync::atomic::Ordering::Relaxed) || started.elapsed() > LOAD_FOR {
                break;
            }
            if n % 50 == 49 {
                // Paces the load at about 500 writes/s, so it spans the fault.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let i = (n * 7_919) % keys;
            let v = format!("w-{n}-{i}");
            let t = Instant::now();
            let r = client.set(&key(i), v.clone(), 0, 0).await;
            report.slowest = report.slowest.max(t.elapsed());
            report.ops += 1;
            match r {
                Ok(_) => {
                    written.lock().unwrap().insert(i, v);
                }
                Err(_) => {
                    report.errors += 1;
                    unknown.lock().unwrap().push(i);
                    // Paces the writes while a node is unreachable (each failure is one timeout).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        report
    })
}

/// How many of `keys` keys read back `value(i)`, 64 in flight (a get that times out on the
/// loaded machine is asked again).
pub async fn read_back_all(
    client: &Arc<arcus_client::ArcusClient>,
    keys: usize,
    key: fn(usize) -> String,
    value: fn(usize) -> String,
) -> anyhow::Result<usize> {
    let results: Vec<anyhow::Result<bool>> = futures::stream::iter(0..keys)
        .map(|i| {
            let c = client.clone();
            async move {
                let got = get_retrying(&c, &key(i)).await?;
                Ok(got.is_some_and(|g| g.value == value(i).as_bytes()))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut good = 0;
    for r in results {
        good += usize::from(r?);
    }
    Ok(good)
}

/// Resource `name` of `replicas` nodes created, settled (all Ready, no operation), and `keys`
/// keys loaded (`key(i)` = `value(i)`) through a ring client: its service code and that client.
pub async fn settled_and_loaded(
    sandbox: &Sandbox,
    ns: &TestNamespace,
    name: &str,
    replicas: i32,
    keys: usize,
    key: fn(usize) -> String,
    value: fn(usize) -> String,
) -> anyhow::Result<(String, Arc<arcus_client::ArcusClient>)> {
    let svc = service_code(ns);
    let crs = mc_api(sandbox, ns);
    let cr: DynamicObject = serde_json::from_value(cr_json(name, &svc, replicas))?;
    crs.create(&PostParams::default(), &cr).await?;
    let want = format!("{replicas}/{replicas}");
    wait_until(
        Duration::from_secs(180),
        &format!("{want} ready, settled"),
        || settled(&crs, name, &want),
    )
    .await?;
    let client = ring_client(&svc, replicas as usize).await?;
    load(&client, keys, |i| (key(i), value(i), 0, 0)).await?;
    Ok((svc, client))
}

/// `Some` once resource `name`'s `status.ready` reads `want` and no operation is recorded.
pub async fn settled(crs: &Api<DynamicObject>, name: &str, want: &str) -> Option<()> {
    let cr = crs.get(name).await.ok()?;
    let status = &cr.data["status"];
    (status["ready"] == want && status.get("operation").is_none_or(|o| o.is_null())).then_some(())
}
