//! The reconcile against a scripted Kubernetes API (see `scripted/`) and a real ZooKeeper (a
//! throw-away server from test-support, stopped by PID when the test ends): the order of the
//! writes, that a steady state writes nothing, and that an invalid or conflicting spec creates
//! nothing. No sandbox; each test takes seconds.
//!
//! Every test has its own ZooKeeper and namespace; objects are named as users see them
//! (`test-arcus-mc`, mappings `<pod>.<namespace>:<port>/<serviceCode>`).

mod scripted;

use arcus_operator::controller::cache::{Caches, NamespaceStores};
use arcus_operator::controller::{
    reconcile, Capabilities, Context, Error, APPLIED_HASH, FIELD_MANAGER, FINALIZER,
};
use arcus_operator::crd::{ArcusMemcached, ArcusMemcachedStatus};
use arcus_operator::day2;
use arcus_operator::leader::LeaderGate;
use arcus_operator::metrics::Metrics;
use arcus_operator::zk::ZkPool;
use http::Method;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use scripted::{partial_metadata, Probe, ScriptedApi, Step, Transcript};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use test_support::zk_server::ZkServer;
use zookeeper_client as zk;

const NAME: &str = "test";
const STS: &str = "test-arcus-mc";
const PORT: u16 = 11211;
/// `build::labels::selector_string("test")`, as the API receives it.
const SELECTOR: &str = "app.kubernetes.io/instance=test,app.kubernetes.io/name=arcus-memcached";
/// Bound of one reconcile pass.
const PASS: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The resource and the paths it is reached by.

/// One test's resource: its namespace, service code and ZooKeeper.
struct Case {
    ns: String,
    svc: String,
    uid: String,
    zk: String,
}

impl Case {
    fn new(ns: &str, zk: &ZkServer) -> Case {
        Case {
            ns: ns.into(),
            svc: format!("svc-{ns}"),
            uid: format!("uid-{ns}"),
            zk: zk.addr(),
        }
    }

    /// The resource as the API server returns it: not yet reconciled.
    fn cr_json(&self, replicas: i32) -> Value {
        json!({
            "apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached",
            "metadata": {
                "name": NAME, "namespace": self.ns, "uid": self.uid, "resourceVersion": "1",
                "generation": 1, "creationTimestamp": "2025-01-01T00:00:00Z",
            },
            "spec": {
                "replicas": replicas, "serviceCode": self.svc, "zookeeperServers": [self.zk],
                "configuration": {"memlimit": 100, "connections": 1000, "threads": 4},
                "image": {"name": "jam2in/arcus-memcached:1.11.7", "pullPolicy": "IfNotPresent"},
            },
        })
    }

    fn cr_path(&self) -> String {
        format!(
            "/apis/jam2in.com/v1/namespaces/{}/memcacheds/{NAME}",
            self.ns
        )
    }
    fn status_path(&self) -> String {
        format!("{}/status", self.cr_path())
    }
    fn sts_path(&self) -> String {
        format!("/apis/apps/v1/namespaces/{}/statefulsets/{STS}", self.ns)
    }
    fn pods_path(&self) -> String {
        format!("/api/v1/namespaces/{}/pods", self.ns)
    }
    fn svc_path(&self) -> String {
        format!("/api/v1/namespaces/{}/services/{STS}", self.ns)
    }
    fn pdb_path(&self) -> String {
        format!(
            "/apis/policy/v1/namespaces/{}/poddisruptionbudgets/{STS}",
            self.ns
        )
    }

    fn hostname(&self, ordinal: u32) -> String {
        format!("{STS}-{ordinal}.{}", self.ns)
    }
    /// `/arcus/cache_server_mapping/<pod>.<ns>:<port>/<svc>`.
    fn mapping(&self, ordinal: u32) -> String {
        format!(
            "/arcus/cache_server_mapping/{}:{PORT}/{}",
            self.hostname(ordinal),
            self.svc
        )
    }
    fn claim(&self) -> String {
        format!("/arcus/cache_list/{}", self.svc)
    }
}

fn typed(v: &Value) -> ArcusMemcached {
    serde_json::from_value(v.clone()).expect("the test's ArcusMemcached deserializes")
}

/// `cr` after a merge patch of its finalizers, as stored (a new resourceVersion).
fn with_finalizers(cr: &Value, patch: &Value, rv: &str) -> Value {
    let mut cr = cr.clone();
    cr["metadata"]["finalizers"] = patch["metadata"]["finalizers"].clone();
    cr["metadata"]["resourceVersion"] = json!(rv);
    cr
}

/// `cr` after a status apply: the patch's status as stored.
fn with_status(cr: &Value, patch: &Value) -> Value {
    let mut cr = cr.clone();
    cr["status"] = patch["status"].clone();
    cr
}

/// An applied object as the API server answers it: the body, stored.
fn stored(body: &Value) -> Value {
    let mut v = body.clone();
    v["metadata"]["resourceVersion"] = json!("7");
    v["metadata"]["uid"] = json!(format!(
        "uid-{}",
        body["metadata"]["name"].as_str().unwrap_or_default()
    ));
    v
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "9"}, "items": items})
}

// ---------------------------------------------------------------------------------------------
// One reconcile pass against a script.

/// The Context the operator builds in `main`, on the scripted client: always the leader, no
/// ServiceMonitor API. (Kept in one place so a change of Context's shape is adapted here.)
/// `caches`: the watches' stores (`Caches::default()`: none, the pass reads the API).
fn context_with(client: kube::Client, caches: Arc<Caches>) -> Arc<Context> {
    // The cache_list watch's triggers go nowhere: this test calls reconcile itself.
    let (changes, _) = tokio::sync::mpsc::unbounded_channel();
    Arc::new(Context {
        client: client.clone(),
        zk: Arc::new(ZkPool::new(Duration::from_secs(10), changes)),
        leader: LeaderGate::new(true),
        metrics: Arc::new(Metrics::default()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some("reconcile-scripted".into()),
            },
        ),
        capabilities: Capabilities {
            service_monitor: false,
        },
        resync: Duration::from_secs(300),
        by_service: Default::default(),
        zk_unreachable_since: Default::default(),
        caches,
    })
}

/// Stores holding what a watch of `ns` would have seen: these objects.
fn caches_of(ns: &str, sts: &Value, pods: &[Value], svc: &Value, pdb: &Value) -> Arc<Caches> {
    fn store<K>(objects: &[&Value]) -> reflector::Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
    {
        let mut writer = reflector::store::Writer::<K>::default();
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            let obj: K =
                serde_json::from_value((*o).clone()).expect("a stored object deserializes");
            writer.apply_watcher_event(&watcher::Event::InitApply(obj));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer.as_reader()
    }
    Arc::new(Caches::new(vec![NamespaceStores {
        namespace: Some(ns.to_string()),
        statefulsets: store(&[sts]),
        pods: store(&pods.iter().collect::<Vec<_>>()),
        services: store(&[svc]),
        pdbs: store(&[pdb]),
    }]))
}

/// Runs one reconcile of `cr` against `steps`, then returns its result and what the API saw.
async fn pass(
    cr: &Value,
    steps: Vec<Step>,
    probe: Option<Probe>,
) -> (Result<Action, Error>, Transcript) {
    pass_with(cr, steps, probe, Default::default()).await
}

/// [`pass`] with the watches' stores.
async fn pass_with(
    cr: &Value,
    steps: Vec<Step>,
    probe: Option<Probe>,
    caches: Arc<Caches>,
) -> (Result<Action, Error>, Transcript) {
    let (client, api) = ScriptedApi::start(steps, probe);
    let ctx = context_with(client, caches);
    let result = tokio::time::timeout(PASS, reconcile(Arc::new(typed(cr)), ctx))
        .await
        .unwrap_or_else(|_| panic!("reconcile did not return within {PASS:?}"));
    (result, api.finish().await)
}

// ---------------------------------------------------------------------------------------------
// ZooKeeper, read directly.

async fn zk_session(addr: &str) -> zk::Client {
    tokio::time::timeout(Duration::from_secs(10), zk::Client::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to the test ZooKeeper {addr} timed out"))
        .unwrap_or_else(|e| panic!("connecting to the test ZooKeeper {addr}: {e}"))
}

/// Every znode under `root` (itself included) with its creation, modification and child zxids
/// and data: equal snapshots mean no write happened in between.
type Tree = BTreeMap<String, (i64, i64, i64, Vec<u8>)>;

async fn tree(client: &zk::Client, root: &str) -> Tree {
    let mut out = Tree::new();
    let mut todo = vec![root.to_string()];
    while let Some(path) = todo.pop() {
        let (data, stat) = match client.get_data(&path).await {
            Ok(d) => d,
            Err(zk::Error::NoNode) => continue,
            Err(e) => panic!("reading {path} from the test ZooKeeper: {e}"),
        };
        out.insert(path.clone(), (stat.czxid, stat.mzxid, stat.pzxid, data));
        match client.list_children(&path).await {
            Ok(children) => todo.extend(children.iter().map(|c| format!("{path}/{c}"))),
            Err(zk::Error::NoNode) => {}
            Err(e) => panic!("listing {path} in the test ZooKeeper: {e}"),
        }
    }
    out
}

/// The znode paths under /arcus when each request arrives.
fn arcus_probe(client: &zk::Client) -> Probe {
    let client = client.clone();
    Arc::new(move || {
        let client = client.clone();
        Box::pin(async move { tree(&client, "/arcus").await.into_keys().collect() })
    })
}

async fn exists(client: &zk::Client, path: &str) -> bool {
    client
        .check_stat(path)
        .await
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .is_some()
}

async fn create(client: &zk::Client, path: &str, data: &[u8], mode: zk::CreateMode) {
    client
        .create(path, data, &mode.with_acls(zk::Acls::anyone_all()))
        .await
        .unwrap_or_else(|e| panic!("creating {path} in the test ZooKeeper: {e}"));
}

// ---------------------------------------------------------------------------------------------
// Body checks.

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// The status patch's condition of `type_`: (status, reason, message).
fn condition(status: &Value, type_: &str) -> Option<(String, String, String)> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"), s("message"))
        })
}

// ---------------------------------------------------------------------------------------------
// The first pass of a new resource, shared by the tests that start from it.

/// How a pass that creates the objects goes.
#[derive(Clone, Copy)]
struct Creating {
    /// The resource has no finalizer yet.
    adds_finalizer: bool,
    /// The StatefulSet apply fails with a 500.
    sts_fails: bool,
}

const NEW: Creating = Creating {
    adds_finalizer: true,
    sts_fails: false,
};

/// The script of a valid resource's pass that creates its objects: finalizer → (ZooKeeper) →
/// Service → PDB → StatefulSet → status.
fn creating_script(case: &Case, replicas: i32, how: Creating) -> Vec<Step> {
    let Creating {
        adds_finalizer,
        sts_fails,
    } = how;
    let cr = case.cr_json(replicas);
    let uid = case.uid.clone();
    let svc = case.svc.clone();
    let after_finalizer = {
        let cr = cr.clone();
        move |b: &Value| (200, with_finalizers(&cr, b, "2"))
    };
    let owned_by_cr = move |b: &Value| {
        let owner = &b["metadata"]["ownerReferences"][0];
        expect(
            owner["uid"] == uid.as_str() && owner["controller"] == true,
            || format!("not owned by the ArcusMemcached (uid {uid}): {owner}"),
        )
    };
    let (o1, o2, o3) = (owned_by_cr.clone(), owned_by_cr.clone(), owned_by_cr);
    let sts = Step::apply(case.sts_path(), FIELD_MANAGER).check(move |b| {
        o3(b)?;
        expect(b["kind"] == "StatefulSet", || {
            "kind is not StatefulSet".into()
        })?;
        expect(b["spec"]["replicas"] == replicas, || {
            format!("spec.replicas is {}, not {replicas}", b["spec"]["replicas"])
        })?;
        expect(
            b["metadata"]["annotations"][APPLIED_HASH]
                .as_str()
                .is_some_and(|h| !h.is_empty()),
            || format!("no {APPLIED_HASH} annotation"),
        )
    });
    let sts = if sts_fails {
        sts.fail(500, "etcdserver: request timed out")
    } else {
        sts.reply_with(|b| (200, stored(b)))
    };
    let mut steps = vec![
        Step::merge_patch(case.cr_path())
            .check(|b| {
                let f = &b["metadata"]["finalizers"];
                expect(f == &json!([FINALIZER]), || {
                    format!("finalizers {f}, not [{FINALIZER}]")
                })?;
                // A compare-and-swap on the version read, so no one else's finalizer is dropped.
                expect(b["metadata"]["resourceVersion"] == "1", || {
                    "the finalizer patch does not carry resourceVersion 1".into()
                })
            })
            .reply_with(after_finalizer),
        Step::get(case.sts_path()).not_found(),
        Step::list(case.pods_path(), SELECTOR).reply(200, pod_list(vec![])),
        Step::apply(case.svc_path(), FIELD_MANAGER)
            .check(move |b| {
                o1(b)?;
                expect(b["kind"] == "Service", || "kind is not Service".into())?;
                expect(b["spec"]["clusterIP"] == "None", || {
                    "the Service is not headless".into()
                })
            })
            .reply_with(|b| (200, stored(b))),
        Step::apply(case.pdb_path(), FIELD_MANAGER)
            .check(move |b| {
                o2(b)?;
                expect(b["kind"] == "PodDisruptionBudget", || {
                    "kind is not PodDisruptionBudget".into()
                })?;
                expect(b["spec"]["maxUnavailable"] == 1, || {
                    "maxUnavailable is not 1".into()
                })
            })
            .reply_with(|b| (200, stored(b))),
        sts,
    ];
    if !adds_finalizer {
        steps.remove(0);
    }
    if !sts_fails {
        let cr = with_finalizers(&cr, &json!({"metadata": {"finalizers": [FINALIZER]}}), "2");
        steps.push(
            Step::apply(case.status_path(), FIELD_MANAGER)
                .check(move |b| {
                    let s = &b["status"];
                    expect(s["serviceCode"] == svc.as_str(), || {
                        format!("status.serviceCode is {}, not {svc}", s["serviceCode"])
                    })?;
                    // status.migration belongs to the progress writer.
                    expect(s.get("migration").is_none(), || {
                        "the status apply carries migration".into()
                    })
                })
                .reply_with(move |b| (200, with_status(&cr, b))),
        );
    }
    steps
}

/// The resource as the first pass leaves it: finalizer set, the status it wrote.
fn after_first_pass(case: &Case, replicas: i32, t: &Transcript) -> Value {
    let cr = with_finalizers(
        &case.cr_json(replicas),
        &json!({"metadata": {"finalizers": [FINALIZER]}}),
        "3",
    );
    with_status(&cr, &t.find(Method::PATCH, &case.status_path()).body)
}

/// Asserts what a first pass of `replicas` nodes wrote to ZooKeeper.
async fn assert_registered(case: &Case, zkc: &zk::Client, replicas: u32) {
    for o in 0..replicas {
        let m = case.mapping(o);
        assert!(
            exists(zkc, &m).await,
            "mapping {m} is missing after the reconcile"
        );
    }
    let surplus = format!(
        "/arcus/cache_server_mapping/{}:{PORT}",
        case.hostname(replicas)
    );
    assert!(
        !exists(zkc, &surplus).await,
        "{surplus} exists, beyond spec.replicas"
    );
    let (data, _) = zkc
        .get_data(&case.claim())
        .await
        .unwrap_or_else(|e| panic!("reading the claim {}: {e}", case.claim()));
    let claim: Value = serde_json::from_slice(&data).expect("the claim is JSON");
    assert_eq!(claim["uid"], case.uid.as_str(), "claim {claim}");
    assert_eq!(claim["namespace"], case.ns.as_str(), "claim {claim}");
    assert_eq!(claim["name"], NAME, "claim {claim}");
    let client_list = format!("/arcus/client_list/{}", case.svc);
    assert!(exists(zkc, &client_list).await, "{client_list} is missing");
}

/// The first pass of a new resource with 3 replicas, with every check of its write order.
async fn first_pass(case: &Case, zkc: &zk::Client) -> Transcript {
    let cr = case.cr_json(3);
    let (result, t) = pass(&cr, creating_script(case, 3, NEW), Some(arcus_probe(zkc))).await;
    result.unwrap_or_else(|e| panic!("first reconcile failed: {e}"));

    // The writes, in order (the script enforced it; this states it).
    let writes: Vec<String> = t.writes().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        writes,
        [
            case.cr_path(),
            case.svc_path(),
            case.pdb_path(),
            case.sts_path(),
            case.status_path()
        ],
        "write order"
    );
    // ZooKeeper between them: nothing before the finalizer is stored; every mapping and the
    // claim before the first object is applied (a pod never starts without its mapping).
    let probe_at = |path: &str| t.find(Method::PATCH, path).probe.clone();
    assert!(
        probe_at(&case.cr_path()).is_empty(),
        "ZooKeeper was written before the finalizer: {:?}",
        probe_at(&case.cr_path())
    );
    let at_service = probe_at(&case.svc_path());
    for o in 0..3 {
        assert!(
            at_service.contains(&case.mapping(o)),
            "mapping {} did not exist when the Service was applied; ZooKeeper held {at_service:#?}",
            case.mapping(o)
        );
    }
    assert!(
        at_service.contains(&case.claim()),
        "no claim when the Service was applied"
    );
    assert_registered(case, zkc, 3).await;
    // One Event tells what the pass did.
    assert_eq!(t.event_reasons(), ["ScaledOut"], "events: {:#?}", t.events);
    let note = t.events[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!("map {}:{PORT} to {}", case.hostname(0), case.svc))
            && note.contains("replicas 0 → 3"),
        "event note: {note}"
    );
    t
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

#[tokio::test]
async fn a_new_resource_writes_finalizer_then_mappings_then_service_pdb_statefulset_status() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-new", &zk);
    first_pass(&case, &zkc).await;
}

/// The cache pods the StatefulSet makes from its template, Ready and running for a minute,
/// with zkfailstop turned off (as the operator does once a node is Ready).
fn running_pods(case: &Case, sts: &Value, ips: &[String]) -> Vec<Value> {
    let template = &sts["spec"]["template"];
    let mut annotations = template["metadata"]["annotations"].clone();
    let started = annotations[day2::STARTED_CONFIG]
        .as_str()
        .expect("the template names the config its pods start with")
        .replace("zkfailstop=on", "zkfailstop=off");
    annotations[day2::APPLIED_CONFIG] = json!(started);
    let minute_ago = (chrono::Utc::now() - chrono::Duration::seconds(60))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    ips.iter()
        .enumerate()
        .map(|(o, ip)| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("{STS}-{o}"), "namespace": case.ns, "uid": format!("pod-uid-{o}"),
                    "labels": template["metadata"]["labels"],
                    "annotations": annotations,
                    "creationTimestamp": minute_ago,
                },
                "spec": template["spec"],
                "status": {
                    "phase": "Running", "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": minute_ago}],
                    "containerStatuses": [{
                        "name": "arcus-memcached", "image": "jam2in/arcus-memcached:1.11.7",
                        "imageID": "", "ready": true, "restartCount": 0,
                        "state": {"running": {"startedAt": minute_ago}},
                    }],
                },
            })
        })
        .collect()
}

#[tokio::test]
async fn a_steady_state_writes_nothing() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-steady", &zk);
    let first = first_pass(&case, &zkc).await;

    // The world as the first pass left it, once the nodes are up: the StatefulSet as applied,
    // its 3 pods Ready, each registered in cache_list as arcus-memcached registers (an
    // ephemeral znode of the node's own session). The pod IPs are loopback addresses where
    // nothing listens: a settled node needs no admin command.
    let live_sts = stored(&first.find(Method::PATCH, &case.sts_path()).body);
    let ips: Vec<String> = (0..3)
        .map(|_| test_support::process::unique_loopback_ip())
        .collect();
    let pods = running_pods(&case, &live_sts, &ips);
    let nodes = zk_session(&zk.addr()).await;
    for (o, ip) in ips.iter().enumerate() {
        let z = format!("{}/{ip}:{PORT}-{}", case.claim(), case.hostname(o as u32));
        create(&nodes, &z, b"", zk::CreateMode::Ephemeral).await;
    }
    let svc_meta =
        partial_metadata(&stored(&first.find(Method::PATCH, &case.svc_path()).body)["metadata"]);
    let pdb_meta =
        partial_metadata(&stored(&first.find(Method::PATCH, &case.pdb_path()).body)["metadata"]);
    let reads = |case: &Case| {
        vec![
            Step::get(case.sts_path()).reply(200, live_sts.clone()),
            Step::list(case.pods_path(), SELECTOR).reply(200, pod_list(pods.clone())),
            // The applied-hash matches: only whether the Service and PDB still exist is read.
            Step::get_metadata(case.svc_path()).reply(200, svc_meta.clone()),
            Step::get_metadata(case.pdb_path()).reply(200, pdb_meta.clone()),
        ]
    };

    // Settling: the nodes came up, so status changes (3/3 ready, the scale-out is over);
    // nothing else is written.
    let cr = after_first_pass(&case, 3, &first);
    let before = tree(&zkc, "/arcus").await;
    let mut settle = reads(&case);
    let stored_cr = cr.clone();
    settle.push(
        Step::apply(case.status_path(), FIELD_MANAGER)
            .check(|b| {
                let s = &b["status"];
                expect(s["ready"] == "3/3", || {
                    format!("status.ready is {}", s["ready"])
                })?;
                expect(s.get("operation").is_none(), || {
                    "the finished scale-out is still in status".into()
                })
            })
            .reply_with(move |b| (200, with_status(&stored_cr, b))),
    );
    let (result, t) = pass(&cr, settle, None).await;
    result.unwrap_or_else(|e| panic!("settling reconcile failed: {e}"));
    assert_eq!(
        t.writes().len(),
        1,
        "settling wrote more than status: {:#?}",
        t.lines()
    );
    assert_eq!(
        tree(&zkc, "/arcus").await,
        before,
        "the settling pass wrote to ZooKeeper"
    );

    // Steady: the same world with the status the settling pass wrote. Nothing is written: no
    // API write, no Event, no znode touched.
    let settled = with_status(&cr, &t.find(Method::PATCH, &case.status_path()).body);
    let status: ArcusMemcachedStatus =
        serde_json::from_value(settled["status"].clone()).expect("the written status deserializes");
    assert_eq!(status.ready.as_deref(), Some("3/3"));
    assert_eq!(status.registered_nodes.len(), 3, "{status:?}");
    let before = tree(&zkc, "/arcus").await;
    let (result, t) = pass(&settled, reads(&case), None).await;
    result.unwrap_or_else(|e| panic!("steady reconcile failed: {e}"));
    assert!(
        t.writes().is_empty(),
        "a steady state wrote: {:#?}",
        t.lines()
    );
    assert_eq!(t.requests.len(), 4, "requests: {:#?}", t.lines());
    assert!(
        t.events.is_empty(),
        "a steady state published events: {:#?}",
        t.events
    );
    let after = tree(&zkc, "/arcus").await;
    assert_eq!(after, before, "a steady state wrote to ZooKeeper");
    assert!(
        after.len() > 10,
        "the snapshot compared too little: {:?}",
        after.keys()
    );

    // The same steady pass as the operator runs it, reading the watches' stores: it sends no
    // request at all.
    let svc = stored(&first.find(Method::PATCH, &case.svc_path()).body);
    let pdb = stored(&first.find(Method::PATCH, &case.pdb_path()).body);
    let caches = caches_of(&case.ns, &live_sts, &pods, &svc, &pdb);
    let (result, t) = pass_with(&settled, vec![], None, caches).await;
    result.unwrap_or_else(|e| panic!("steady reconcile from the stores failed: {e}"));
    assert!(t.requests.is_empty(), "requests: {:#?}", t.lines());
    assert!(t.events.is_empty(), "events: {:#?}", t.events);
    assert_eq!(
        tree(&zkc, "/arcus").await,
        before,
        "a steady state wrote to ZooKeeper"
    );

    // One replica more: ZooKeeper gets the new mapping (and the recorded join); the API only
    // the StatefulSet's new size and the status. The Service and PDB are not re-sent.
    let mut scaled = settled.clone();
    scaled["spec"]["replicas"] = json!(4);
    let grow = caches_of(&case.ns, &live_sts, &pods, &svc, &pdb);
    let stored_cr = scaled.clone();
    let script = vec![
        Step::apply(case.sts_path(), FIELD_MANAGER)
            .check(|b| {
                expect(b["spec"]["replicas"] == 4, || {
                    format!("spec.replicas is {}", b["spec"]["replicas"])
                })
            })
            .reply_with(|b| (200, stored(b))),
        Step::apply(case.status_path(), FIELD_MANAGER)
            .reply_with(move |b| (200, with_status(&stored_cr, b))),
    ];
    let (result, t) = pass_with(&scaled, script, None, grow).await;
    result.unwrap_or_else(|e| panic!("scale-out reconcile failed: {e}"));
    assert_eq!(t.writes().len(), 2, "{:#?}", t.lines());
    let mapping = case.mapping(3);
    assert!(exists(&zkc, &mapping).await, "{mapping} was not created");
    drop(nodes);
    drop(zkc);

    // ZooKeeper gone: the pass fails, and its status (only `Degraded` changes) says so.
    let mut zk = zk;
    zk.stop();
    let down = caches_of(&case.ns, &live_sts, &pods, &svc, &pdb);
    let script = vec![Step::apply(case.status_path(), FIELD_MANAGER).check(|b| {
        let (status, reason, message) = condition(&b["status"], "Degraded")
            .ok_or_else(|| "no Degraded condition".to_string())?;
        expect(status == "True" && reason == "ZooKeeperUnreachable", || {
            format!("Degraded {status} {reason}")
        })?;
        expect(
            message.contains("unreachable for") && message.contains("keep serving"),
            || format!("message: {message}"),
        )?;
        expect(b["status"]["ready"] == "3/3", || {
            "the rest of the status was not kept".into()
        })
    })];
    let (result, t) = pass_with(&settled, script, None, down).await;
    assert!(
        matches!(&result, Err(Error::ZooKeeper(_))),
        "a pass without ZooKeeper: {result:?}"
    );
    assert_eq!(t.writes().len(), 1, "{:#?}", t.lines());
}

#[tokio::test]
async fn an_invalid_spec_creates_nothing() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    // What the CRD's schema and CEL rules refuse at admission may still be stored (a resource
    // from before a rule existed); and an upper-case image path is beyond what they check.
    // (namespace, field, spoiled value, what the message names)
    let cases = [
        (
            "scripted-replicas",
            "/spec/replicas",
            json!(1001),
            "spec.replicas is 1001",
        ),
        (
            "scripted-image",
            "/spec/image/name",
            json!("Jam2in/Arcus-Memcached:1.11.7"),
            "must be lower case",
        ),
    ];
    for (ns, field, value, problem) in cases {
        let case = Case::new(ns, &zk);
        let mut cr = case.cr_json(3);
        *cr.pointer_mut(field).expect("the field is in the fixture") = value;
        let stored_cr = cr.clone();
        let script = vec![Step::apply(case.status_path(), FIELD_MANAGER)
            .check(move |b| {
                let s = &b["status"];
                let degraded = condition(s, "Degraded");
                expect(
                    degraded.as_ref().is_some_and(|(st, reason, m)| {
                        st == "True" && reason == "InvalidSpec" && m.contains(problem)
                    }),
                    || format!("Degraded condition {degraded:?}, not True/InvalidSpec naming {problem:?}"),
                )?;
                expect(s.get("serviceCode").is_none(), || "an invalid spec recorded a service code".into())
            })
            .reply_with(move |b| (200, with_status(&stored_cr, b)))];
        let (result, t) = pass(&cr, script, None).await;
        result.unwrap_or_else(|e| panic!("{ns}: reconcile of an invalid spec failed: {e}"));
        // The script held only the status write: no finalizer, no read of the StatefulSet, no
        // Service, PDB or StatefulSet.
        assert_eq!(t.lines().len(), 1, "{ns}: {:#?}", t.lines());
        assert_eq!(
            t.event_reasons(),
            ["InvalidSpec"],
            "{ns}: events {:#?}",
            t.events
        );
        assert_eq!(t.events[0]["type"], "Warning");
        let note = t.events[0]["note"].as_str().unwrap_or_default();
        assert!(
            note.contains(problem),
            "{ns}: event note {note:?} does not name {problem:?}"
        );
    }
    assert!(
        !exists(&zkc, "/arcus").await,
        "an invalid spec wrote to ZooKeeper: {:?}",
        tree(&zkc, "/arcus").await
    );
}

#[tokio::test]
async fn a_service_code_claimed_by_another_resource_creates_nothing() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-conflict", &zk);
    // An ARCUS ensemble where another resource holds the service code.
    for p in [
        "/arcus",
        "/arcus/cache_list",
        "/arcus/client_list",
        "/arcus/cache_server_mapping",
        "/arcus/cache_server_log",
    ] {
        create(&zkc, p, b"", zk::CreateMode::Persistent).await;
    }
    let other = json!({"managedBy": "arcus-operator", "namespace": "elsewhere", "name": "other", "uid": "uid-other"});
    create(
        &zkc,
        &case.claim(),
        other.to_string().as_bytes(),
        zk::CreateMode::Persistent,
    )
    .await;
    let before = tree(&zkc, "/arcus").await;

    let cr = case.cr_json(3);
    let stored_cr = with_finalizers(&cr, &json!({"metadata": {"finalizers": [FINALIZER]}}), "2");
    let script = vec![
        Step::merge_patch(case.cr_path()).reply_with({
            let cr = cr.clone();
            move |b| (200, with_finalizers(&cr, b, "2"))
        }),
        Step::get(case.sts_path()).not_found(),
        Step::list(case.pods_path(), SELECTOR).reply(200, pod_list(vec![])),
        Step::apply(case.status_path(), FIELD_MANAGER)
            .check(|b| {
                let s = &b["status"];
                let degraded = condition(s, "Degraded");
                expect(
                    degraded.as_ref().is_some_and(|(st, reason, m)| {
                        st == "True" && reason == "ServiceCodeConflict" && m.contains("elsewhere/other")
                    }),
                    || format!("Degraded condition {degraded:?}, not True/ServiceCodeConflict naming elsewhere/other"),
                )?;
                expect(s.get("serviceCode").is_none(), || "a conflicting spec recorded the service code".into())
            })
            .reply_with(move |b| (200, with_status(&stored_cr, b))),
    ];
    let (result, t) = pass(&cr, script, None).await;
    result.unwrap_or_else(|e| panic!("reconcile of a conflicting spec failed: {e}"));
    assert_eq!(
        t.writes()
            .iter()
            .map(|s| s.path.clone())
            .collect::<Vec<_>>(),
        [case.cr_path(), case.status_path()],
        "only the finalizer and status are written"
    );
    assert_eq!(
        t.event_reasons(),
        ["ServiceCodeConflict"],
        "events {:#?}",
        t.events
    );
    assert_eq!(t.events[0]["type"], "Warning");
    let after = tree(&zkc, "/arcus").await;
    assert_eq!(after, before, "a conflicting spec wrote to ZooKeeper");
    let mappings = zkc
        .list_children("/arcus/cache_server_mapping")
        .await
        .expect("list mappings");
    assert!(mappings.is_empty(), "mappings were created: {mappings:?}");

    // Deleted: nothing in ZooKeeper is its own, so the finalizer goes at once and ZooKeeper
    // is left as it is (the other resource keeps its claim).
    let mut deleted = with_finalizers(&cr, &json!({"metadata": {"finalizers": [FINALIZER]}}), "3");
    deleted["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    let script = vec![
        Step::get(case.sts_path()).not_found(),
        Step::list(case.pods_path(), SELECTOR).reply(200, pod_list(vec![])),
        Step::merge_patch(case.cr_path())
            .check(|b| {
                expect(b["metadata"]["finalizers"] == json!([]), || {
                    format!(
                        "finalizers patched to {}, not []",
                        b["metadata"]["finalizers"]
                    )
                })
            })
            .reply_with({
                let d = deleted.clone();
                move |b| (200, with_finalizers(&d, b, "4"))
            }),
    ];
    let (result, t) = pass(&deleted, script, None).await;
    result.unwrap_or_else(|e| panic!("reconcile of a deleted conflicting resource failed: {e}"));
    assert_eq!(
        t.writes()
            .iter()
            .map(|s| s.path.clone())
            .collect::<Vec<_>>(),
        [case.cr_path()],
        "only the finalizer is removed"
    );
    assert_eq!(
        tree(&zkc, "/arcus").await,
        before,
        "the deletion wrote to ZooKeeper"
    );
}

#[tokio::test]
async fn an_api_error_fails_the_pass_and_keeps_the_mappings_for_the_next() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-error", &zk);
    let cr = case.cr_json(3);

    // The StatefulSet apply fails with a 500: the pass fails naming the object, and writes no
    // status over it.
    let (result, t) = pass(
        &cr,
        creating_script(
            &case,
            3,
            Creating {
                sts_fails: true,
                ..NEW
            },
        ),
        None,
    )
    .await;
    let err = match result {
        Ok(a) => panic!("a failed StatefulSet apply reconciled fine: {a:?}"),
        // The cause stays a typed source; people read the whole chain.
        Err(e) => arcus_operator::controller::ErrorChain(&e).to_string(),
    };
    assert!(
        err.contains(&format!("apply StatefulSet {STS}"))
            && err.contains("etcdserver: request timed out"),
        "the error does not name the object and the cause: {err}"
    );
    assert_eq!(
        t.writes().last().map(|s| s.path.clone()),
        Some(case.sts_path())
    );
    // The mappings made before stay (the next pass must not start over).
    assert_registered(&case, &zkc, 3).await;
    let before = tree(&zkc, "/arcus").await;

    // The next pass finds them and only re-applies the objects.
    let cr = with_finalizers(&cr, &json!({"metadata": {"finalizers": [FINALIZER]}}), "2");
    let script = creating_script(
        &case,
        3,
        Creating {
            adds_finalizer: false,
            ..NEW
        },
    );
    let (result, t) = pass(&cr, script, None).await;
    result.unwrap_or_else(|e| panic!("the pass after the error failed: {e}"));
    assert_eq!(
        t.writes()
            .iter()
            .map(|s| s.path.clone())
            .collect::<Vec<_>>(),
        [
            case.svc_path(),
            case.pdb_path(),
            case.sts_path(),
            case.status_path()
        ],
    );
    assert_eq!(
        tree(&zkc, "/arcus").await,
        before,
        "the pass after the error wrote ZooKeeper again (its mappings were already there)"
    );
}

/// Garbage in ZooKeeper (hand edits, another tenant's tools): each is reported in status and
/// nothing the operator does not own is changed. Cases, on a settled 3-node resource read from
/// the stores: foreign children of `cache_list/<svc>`, then a mapping with a second service
/// code, then an unreadable operation record in our claim, then a claim that is not JSON.
#[tokio::test]
async fn garbage_in_zookeeper_is_reported_and_left_alone() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-garbage", &zk);
    let first = first_pass(&case, &zkc).await;
    let live_sts = stored(&first.find(Method::PATCH, &case.sts_path()).body);
    let ips: Vec<String> = (0..3)
        .map(|_| test_support::process::unique_loopback_ip())
        .collect();
    let pods = running_pods(&case, &live_sts, &ips);
    let nodes = zk_session(&zk.addr()).await;
    for (o, ip) in ips.iter().enumerate() {
        let z = format!("{}/{ip}:{PORT}-{}", case.claim(), case.hostname(o as u32));
        create(&nodes, &z, b"", zk::CreateMode::Ephemeral).await;
    }
    let svc = stored(&first.find(Method::PATCH, &case.svc_path()).body);
    let pdb = stored(&first.find(Method::PATCH, &case.pdb_path()).body);
    let cr = after_first_pass(&case, 3, &first);

    // One pass from the stores: it may write only its status, whose Degraded condition must
    // be `reason` with a message naming `names`; ZooKeeper must stay as it was.
    let check = |reason: &'static str, names: &'static str| {
        let stored_cr = cr.clone();
        Step::apply(case.status_path(), FIELD_MANAGER)
            .check(move |b| {
                let degraded = condition(&b["status"], "Degraded");
                expect(
                    degraded
                        .as_ref()
                        .is_some_and(|(st, r, m)| st == "True" && r == reason && m.contains(names)),
                    || format!("Degraded {degraded:?}, not True/{reason} naming {names:?}"),
                )
            })
            .reply_with(move |b| (200, with_status(&stored_cr, b)))
    };
    let caches = || caches_of(&case.ns, &live_sts, &pods, &svc, &pdb);

    // 1. Foreign children under cache_list/<svc>: an unparsable name and another host.
    for child in ["garbage", "10.9.9.9:11211-stranger.elsewhere"] {
        let path = format!("{}/{child}", case.claim());
        create(&zkc, &path, b"", zk::CreateMode::Persistent).await;
    }
    let before = tree(&zkc, "/arcus").await;
    let script = vec![check("ForeignNodesInRing", "stranger.elsewhere")];
    let (result, t) = pass_with(&cr, script, None, caches()).await;
    result.unwrap_or_else(|e| panic!("a pass with foreign ring members failed: {e}"));
    assert_eq!(t.writes().len(), 1, "{:#?}", t.lines());
    assert_eq!(tree(&zkc, "/arcus").await, before, "ZooKeeper was changed");

    // 2. A mapping of ours also maps another service code: the resource stops (conflict).
    let other = format!(
        "/arcus/cache_server_mapping/{}:{PORT}/other_svc",
        case.hostname(1)
    );
    create(&zkc, &other, b"", zk::CreateMode::Persistent).await;
    let before = tree(&zkc, "/arcus").await;
    let script = vec![check("ServiceCodeConflict", "other_svc")];
    let (result, t) = pass_with(&cr, script, None, caches()).await;
    result.unwrap_or_else(|e| panic!("a pass with a doubly mapped address failed: {e}"));
    assert_eq!(t.writes().len(), 1, "{:#?}", t.lines());
    assert_eq!(
        t.event_reasons(),
        ["ServiceCodeConflict"],
        "{:#?}",
        t.events
    );
    assert_eq!(tree(&zkc, "/arcus").await, before, "ZooKeeper was changed");
    zkc.delete(&other, None)
        .await
        .expect("delete the second child");

    // 3. Our claim, with an operation record that does not parse: the pass fails, says why
    //    in status, and writes nothing else.
    let (data, _) = zkc.get_data(&case.claim()).await.expect("read the claim");
    let mut claim: Value = serde_json::from_slice(&data).expect("the claim is JSON");
    claim["operation"] = json!("garbage");
    let spoiled = claim.to_string();
    zkc.set_data(&case.claim(), spoiled.as_bytes(), None)
        .await
        .expect("spoil the claim");
    let before = tree(&zkc, "/arcus").await;
    let script = vec![check("OperationRecordInvalid", "does not parse")];
    let (result, t) = pass_with(&cr, script, None, caches()).await;
    assert!(
        matches!(&result, Err(Error::ZooKeeper(_))),
        "a pass over an unreadable record: {result:?}"
    );
    assert_eq!(t.writes().len(), 1, "{:#?}", t.lines());
    assert_eq!(tree(&zkc, "/arcus").await, before, "ZooKeeper was changed");

    // 4. A claim that is not JSON at all: not ours any more, so a conflict; nothing changed.
    zkc.set_data(&case.claim(), b"{not json", None)
        .await
        .expect("overwrite the claim");
    let before = tree(&zkc, "/arcus").await;
    let script = vec![check("ServiceCodeConflict", "outside this operator")];
    let (result, t) = pass_with(&cr, script, None, caches()).await;
    result.unwrap_or_else(|e| panic!("a pass over a foreign claim failed: {e}"));
    assert_eq!(t.writes().len(), 1, "{:#?}", t.lines());
    assert_eq!(tree(&zkc, "/arcus").await, before, "ZooKeeper was changed");
    drop(nodes);
}

const AUTH_SECRET: &str = "arcus-zookeeper-auth";

/// The GET of `spec.zookeeperAuth`'s Secret (user `arcus`, password `s3cret`).
fn auth_secret_step(case: &Case) -> Step {
    // base64 of "arcus" and "s3cret"
    auth_secret_step_with(
        case,
        json!({"username": "YXJjdXM=", "password": "czNjcmV0"}),
    )
}

fn auth_secret_step_with(case: &Case, data: Value) -> Step {
    Step::get(format!(
        "/api/v1/namespaces/{}/secrets/{AUTH_SECRET}",
        case.ns
    ))
    .reply(
        200,
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": AUTH_SECRET, "namespace": case.ns},
            "data": data,
        }),
    )
}

fn with_auth(cr: &Value) -> Value {
    let mut cr = cr.clone();
    cr["spec"]["zookeeperAuth"] = json!({"secretName": AUTH_SECRET});
    cr
}

/// `digest` ALL for the operator's user, and exactly `world` for anyone. Read as that user:
/// ZooKeeper shows a digest's hash only to a session with ADMIN on the znode.
async fn assert_secured(addr: &str, path: &str, world: zk::Permission) {
    assert_secured_for(addr, path, world, "s3cret").await
}

async fn assert_secured_for(addr: &str, path: &str, world: zk::Permission, password: &str) {
    let zkc = tokio::time::timeout(
        Duration::from_secs(10),
        zk::Client::connector()
            .with_auth("digest", format!("arcus:{password}").as_bytes())
            .connect(addr),
    )
    .await
    .expect("connecting as the operator's user timed out")
    .expect("connecting as the operator's user");
    let (acl, _) = zkc
        .get_acl(path)
        .await
        .unwrap_or_else(|e| panic!("ACL of {path}: {e}"));
    let digest = arcus_operator::zk_auth::ZkAuth::new("arcus", password).digest_id();
    let has = |scheme: &str, id: &str, perm: zk::Permission| {
        acl.iter()
            .any(|a| a.scheme() == scheme && a.id() == id && a.permission() == perm)
    };
    assert!(
        acl.len() == 2
            && has("digest", &digest, zk::Permission::ALL)
            && has("world", "anyone", world),
        "{path}: ACL {acl:?}, not digest ALL + world {world:?}"
    );
}

/// With `spec.zookeeperAuth` the operator authenticates and creates what the resource owns with
/// an ACL other tenants cannot delete or rewrite, while an unauthenticated ARCUS node and client
/// still register; a tree made without it is secured on the next pass.
#[tokio::test]
async fn zookeeper_auth_secures_what_the_resource_owns() {
    let zk = ZkServer::start().expect("start a ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-auth", &zk);
    let cr = with_auth(&case.cr_json(3));
    let mut script = creating_script(&case, 3, NEW);
    script.insert(3, auth_secret_step(&case));
    let (result, t) = pass(&cr, script, None).await;
    result.unwrap_or_else(|e| panic!("first reconcile with zookeeperAuth failed: {e}"));
    assert_eq!(t.event_reasons(), ["ScaledOut"], "events: {:#?}", t.events);
    assert_registered(&case, &zkc, 3).await;
    let rw = zk::Permission::READ | zk::Permission::CREATE;
    let client_list = format!("/arcus/client_list/{}", case.svc);
    assert_secured(&case.zk, &case.claim(), rw).await;
    assert_secured(&case.zk, &client_list, rw).await;
    for o in 0..3 {
        let child = case.mapping(o);
        let parent = child.rsplit_once('/').unwrap().0.to_string();
        assert_secured(&case.zk, &child, zk::Permission::READ).await;
        assert_secured(&case.zk, &parent, zk::Permission::READ).await;
    }
    // Another tenant (no credentials): what ARCUS nodes and clients do works...
    let node = format!("{}/127.0.0.9:{PORT}-{}", case.claim(), case.hostname(0));
    create(&zkc, &node, b"", zk::CreateMode::Ephemeral).await;
    create(
        &zkc,
        &format!("{client_list}/client-1"),
        b"",
        zk::CreateMode::Ephemeral,
    )
    .await;
    zkc.get_data(&case.mapping(1))
        .await
        .expect("anyone reads a mapping");
    // ...and deleting or rewriting what the resource owns does not.
    let refused = |what: &str, r: Result<(), zk::Error>| {
        assert_eq!(r, Err(zk::Error::NoAuth), "{what} was not refused");
    };
    refused(
        "deleting a mapping",
        zkc.delete(&case.mapping(1), None).await,
    );
    refused(
        "deleting a node's registration",
        zkc.delete(&node, None).await,
    );
    refused(
        "rewriting the claim",
        zkc.set_data(&case.claim(), b"{}", None).await.map(|_| ()),
    );
    drop(zkc);

    // A resource made without credentials gets them later: its znodes are secured (the
    // mappings, client_list and the claim), without anything else changing in ZooKeeper.
    // (A ZooKeeper of its own: the first pass checks the tree was empty before it.)
    let zk = ZkServer::start().expect("start a second ZooKeeper");
    let zkc = zk_session(&zk.addr()).await;
    let case = Case::new("scripted-auth-later", &zk);
    let first = first_pass(&case, &zkc).await;
    let open = zk::Acls::anyone_all().to_vec();
    assert_eq!(zkc.get_acl(&case.claim()).await.unwrap().0, open);
    let live_sts = stored(&first.find(Method::PATCH, &case.sts_path()).body);
    let svc = stored(&first.find(Method::PATCH, &case.svc_path()).body);
    let pdb = stored(&first.find(Method::PATCH, &case.pdb_path()).body);
    let caches = caches_of(&case.ns, &live_sts, &[], &svc, &pdb);
    let cr = with_auth(&after_first_pass(&case, 3, &first));
    let stored_cr = cr.clone();
    let script = vec![
        auth_secret_step(&case),
        Step::apply(case.status_path(), FIELD_MANAGER)
            .reply_with(move |b| (200, with_status(&stored_cr, b))),
    ];
    let (result, t) = pass_with(&cr, script, None, caches).await;
    result.unwrap_or_else(|e| panic!("a pass adding zookeeperAuth failed: {e}"));
    assert_eq!(t.event_reasons(), ["ZooKeeperUpdated"], "{:#?}", t.events);
    assert_secured(&case.zk, &case.claim(), rw).await;
    assert_secured(&case.zk, &format!("/arcus/client_list/{}", case.svc), rw).await;
    assert_secured(&case.zk, &case.mapping(2), zk::Permission::READ).await;

    // A password change. Only the new password: refused, and the status says what to set.
    let n3w = json!({"username": "YXJjdXM=", "password": "bjN3"});
    // (A pass that fails returns its error before the status, which the controller reports; a
    // pass that changes nothing writes no status.)
    let rotate_pass = |secret: Value, writes_status: bool| {
        let stored_cr = cr.clone();
        let mut script = vec![auth_secret_step_with(&case, secret)];
        if writes_status {
            script.push(
                Step::apply(case.status_path(), FIELD_MANAGER)
                    .reply_with(move |b| (200, with_status(&stored_cr, b))),
            );
        }
        let caches = caches_of(&case.ns, &live_sts, &[], &svc, &pdb);
        pass_with(&cr, script, None, caches)
    };
    let (result, t) = rotate_pass(n3w.clone(), false).await;
    let err = result.expect_err("the new password alone cannot touch the secured tree");
    assert!(
        err.to_string().contains("NoAuth") && err.to_string().contains("previousPassword"),
        "{err}"
    );
    assert!(!err.to_string().contains("n3w"), "a password in an error");
    assert!(t.events.iter().all(|e| !e.to_string().contains("bjN3")));
    // With previousPassword (the old one) beside it: the next pass moves every ACL over.
    let mut both = n3w.clone();
    both["previousPassword"] = json!("czNjcmV0");
    let (result, t) = rotate_pass(both, true).await;
    result.unwrap_or_else(|e| panic!("a pass changing the password failed: {e}"));
    assert_eq!(t.event_reasons(), ["ZooKeeperUpdated"], "{:#?}", t.events);
    assert_secured_for(&case.zk, &case.claim(), rw, "n3w").await;
    assert_secured_for(&case.zk, &case.mapping(0), zk::Permission::READ, "n3w").await;
    // previousPassword removed: the new password alone now does everything.
    let (result, t) = rotate_pass(n3w, false).await;
    result.unwrap_or_else(|e| panic!("a pass after the password change failed: {e}"));
    assert!(t.event_reasons().is_empty(), "{:#?}", t.events);
}
