//! The operator end to end on the sandbox: the seed's walkthrough, leader failover during a
//! scale, service-code conflicts, and invalid resources. Each test deploys the operator into its
//! own namespace from deploy/*.yaml, watching only that namespace.

mod common;

use arcus_operator::crd::ArcusMemcached;
use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::{Api, ResourceExt};
use serde_json::json;
use std::time::Duration;
use test_support::operator::{container_pid, leader_pod};
use test_support::sandbox::{Sandbox, TestNamespace, ZOOKEEPER};
use test_support::wait_until;

fn cr(name: &str, svc: &str, replicas: i32) -> ArcusMemcached {
    serde_json::from_value(cr_json(name, svc, replicas)).expect("valid CR")
}

async fn wait_ready(
    api: &Api<ArcusMemcached>,
    name: &str,
    want: &str,
    secs: u64,
) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(secs),
        &format!("{name} status.ready == {want}"),
        || async {
            let cr = api.get(name).await.ok()?;
            (cr.status?.ready.as_deref() == Some(want)).then_some(())
        },
    )
    .await
}

/// How many of the namespace's cache pods each Node runs.
async fn node_counts(
    ns: &TestNamespace,
) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let pods: Api<Pod> = ns.api();
    let mut counts = std::collections::BTreeMap::new();
    let cache_pods = ListParams::default().labels("app.kubernetes.io/name=arcus-memcached");
    for p in pods.list(&cache_pods).await? {
        if let Some(node) = p.spec.and_then(|s| s.node_name) {
            *counts.entry(node).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_walkthrough_scale_out_scale_in_delete() -> anyhow::Result<()> {
    with_namespace("walk", 3, |sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs: Api<ArcusMemcached> = ns.api();
            crs.create(&PostParams::default(), &cr("test", &svc, 3))
                .await?;
            wait_ready(&crs, "test", "3/3", 180).await?;
            assert_eq!(
                pods_named(&ns, "test-arcus-mc-").await,
                ["test-arcus-mc-0", "test-arcus-mc-1", "test-arcus-mc-2"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            );
            assert_eq!(
                children(&zk, &format!("/arcus/cache_list/{svc}"))
                    .await
                    .len(),
                3,
                "3 registered znodes"
            );
            let status = crs.get("test").await?.status.unwrap();
            assert_eq!(
                status.image.as_deref(),
                Some("jam2in/arcus-memcached:1.11.7")
            );
            assert_eq!(mappings_of(&zk, &svc, &ns.name).await.len(), 3);

            // The headless Service and the PDB deleted by hand come back.
            let services: Api<Service> = ns.api();
            let pdbs: Api<PodDisruptionBudget> = ns.api();
            let svc_uid = services.get("test-arcus-mc").await?.metadata.uid;
            let pdb_uid = pdbs.get("test-arcus-mc").await?.metadata.uid;
            services
                .delete("test-arcus-mc", &DeleteParams::default())
                .await?;
            pdbs.delete("test-arcus-mc", &DeleteParams::default())
                .await?;
            let deleted_at = std::time::Instant::now();
            wait_until(
                Duration::from_secs(30),
                "Service and PDB re-created",
                || async {
                    let s = services.get_opt("test-arcus-mc").await.ok()??;
                    let p = pdbs.get_opt("test-arcus-mc").await.ok()??;
                    (s.metadata.uid != svc_uid && p.metadata.uid != pdb_uid).then_some(())
                },
            )
            .await?;
            eprintln!(
                "Service and PDB re-created {:?} after they were deleted",
                deleted_at.elapsed()
            );

            // The scale subresource: what `kubectl scale` and an autoscaler read and write.
            let status = crs.get("test").await?.status.unwrap();
            assert_eq!(status.replicas, Some(3));
            assert_eq!(
                status.label_selector.as_deref(),
                Some("app.kubernetes.io/instance=test,app.kubernetes.io/name=arcus-memcached")
            );
            // The default spread: 3 nodes on 3 Nodes (the sandbox's Nodes are in 3 zones).
            let placed = node_counts(&ns).await?;
            eprintln!("cache pods per Node: {placed:?}");
            assert_eq!(
                placed.len(),
                3,
                "3 cache pods spread over the 3 Nodes: {placed:?}"
            );

            // Scale out with `kubectl scale`: the mappings must exist by the time the
            // StatefulSet asks for 5, and the new nodes must never have exited for want of a
            // mapping (exit 76 → restarts).
            sandbox.kubectl(&["scale", "-n", &ns.name, "mc/test", "--replicas=5"])?;
            let sts: Api<StatefulSet> = ns.api();
            wait_until(
                Duration::from_secs(60),
                "StatefulSet replicas 5",
                || async {
                    let s = sts.get("test-arcus-mc").await.ok()?;
                    (s.spec?.replicas == Some(5)).then_some(())
                },
            )
            .await?;
            let mapped = mappings_of(&zk, &svc, &ns.name).await;
            assert_eq!(
                mapped.len(),
                5,
                "all 5 mappings exist as soon as the StatefulSet says 5: {mapped:?}"
            );
            wait_ready(&crs, "test", "5/5", 180).await?;
            let pods: Api<Pod> = ns.api();
            for n in ["test-arcus-mc-3", "test-arcus-mc-4"] {
                let p = pods.get(n).await?;
                let restarts = p.status.unwrap().container_statuses.unwrap()[0].restart_count;
                assert_eq!(
                    restarts, 0,
                    "{n} restarted: it started before its mapping existed"
                );
            }

            // Scale in: each surplus mapping disappears only after its pod is gone.
            crs.patch(
                "test",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await?;
            wait_until(
                Duration::from_secs(120),
                "mappings for ordinals 3 and 4 removed",
                || async {
                    let mapped = mappings_of(&zk, &svc, &ns.name).await;
                    let pods = pods_named(&ns, "test-arcus-mc-").await;
                    for o in [3, 4] {
                        let gone = !mapped
                            .iter()
                            .any(|k| k.starts_with(&format!("test-arcus-mc-{o}")));
                        assert!(
                            !gone || !pods.contains(&format!("test-arcus-mc-{o}")),
                            "mapping {o} removed while its pod exists"
                        );
                    }
                    (mapped.len() == 3).then_some(())
                },
            )
            .await?;
            wait_ready(&crs, "test", "3/3", 60).await?;

            // Delete: no pod, no mapping, no cache_list/client_list left.
            crs.delete("test", &DeleteParams::default()).await?;
            wait_until(
                Duration::from_secs(120),
                "CR gone with its ZooKeeper state",
                || async {
                    let gone = crs.get_opt("test").await.ok()?.is_none();
                    (gone && pods_named(&ns, "test-arcus-mc-").await.is_empty()).then_some(())
                },
            )
            .await?;
            assert!(mappings_of(&zk, &svc, &ns.name).await.is_empty());
            assert_eq!(
                zk.check_stat(&format!("/arcus/cache_list/{svc}")).await?,
                None
            );
            assert_eq!(
                zk.check_stat(&format!("/arcus/client_list/{svc}")).await?,
                None
            );
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_killed_during_scale_standby_finishes_without_repeating_writes() -> anyhow::Result<()>
{
    with_namespace("leader", 3, |sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs: Api<ArcusMemcached> = ns.api();
            crs.create(&PostParams::default(), &cr("lead", &svc, 1))
                .await?;
            wait_ready(&crs, "lead", "1/1", 120).await?;
            let leader = wait_until(Duration::from_secs(30), "a leader", || async {
                leader_pod(&ns).await.ok().flatten()
            })
            .await?;
            let pid = container_pid(&leader).expect("leader pid");

            crs.patch(
                "lead",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await?;
            // Kill the leader as soon as it has started the scale (first new mapping written).
            wait_until(Duration::from_secs(30), "scale started", || async {
                (mappings_of(&zk, &svc, &ns.name).await.len() > 1).then_some(())
            })
            .await?;
            // The leader dies with its pod (a restarted process in the same pod would resume the
            // lease under the same identity at once; here a stand-by must take over).
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
            let old = leader.name_any();
            let pods: Api<Pod> = ns.api();
            pods.delete(
                &old,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await?;
            let started = std::time::Instant::now();
            let new_leader = new_leader(&ns, &old, 40).await?;
            eprintln!(
                "takeover by {} after {:?}",
                new_leader.name_any(),
                started.elapsed()
            );
            assert!(
                started.elapsed() < Duration::from_secs(25),
                "stand-by took {:?}",
                started.elapsed()
            );
            wait_ready(&crs, "lead", "3/3", 180).await?;

            // No ZooKeeper write twice: each op the leaders logged appears once across all
            // operator logs, and each mapping was created once (cversion 1: one child, never re-made).
            let mut seen = std::collections::BTreeMap::<String, u32>::new();
            for entry in std::fs::read_dir(sandbox.dir.join("logs/pods"))?.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !name.starts_with(&format!("{}_arcus-operator-", ns.name)) {
                    continue;
                }
                for line in std::fs::read_to_string(entry.path())?
                    .lines()
                    .filter(|l| l.contains("zk write"))
                {
                    let op = line.split("op=").nth(1).unwrap_or(line).to_string();
                    *seen.entry(op).or_default() += 1;
                }
            }
            let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
            assert!(!seen.is_empty(), "operator logs carry zk write lines");
            assert!(
                repeated.is_empty(),
                "ZooKeeper writes repeated: {repeated:?}"
            );
            for key in mappings_of(&zk, &svc, &ns.name).await {
                let stat = zk
                    .check_stat(&format!("{MAPPINGS}/{key}"))
                    .await?
                    .expect("mapping");
                assert_eq!(
                    stat.cversion, 1,
                    "mapping {key} children changed more than once"
                );
            }
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn second_resource_with_same_service_code_is_refused() -> anyhow::Result<()> {
    with_namespace("conflict", 1, |_sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs: Api<ArcusMemcached> = ns.api();
            crs.create(&PostParams::default(), &cr("first", &svc, 1))
                .await?;
            wait_ready(&crs, "first", "1/1", 120).await?;
            let before = crs.get("first").await?.status;
            crs.create(&PostParams::default(), &cr("second", &svc, 2))
                .await?;
            let msg = wait_until(
                Duration::from_secs(60),
                "second refused in status",
                || async {
                    crs.get("second")
                        .await
                        .ok()?
                        .status?
                        .message
                        .filter(|m| m.contains("already in use"))
                },
            )
            .await?;
            assert!(
                msg.contains(&svc) && msg.contains("first"),
                "message names the code and the owner: {msg}"
            );
            let sts: Api<StatefulSet> = ns.api();
            assert!(
                sts.get_opt("second-arcus-mc").await?.is_none(),
                "no StatefulSet for the refused resource"
            );
            assert_eq!(
                mappings_of(&zk, &svc, &ns.name).await.len(),
                1,
                "only the first's mapping"
            );
            assert_eq!(
                crs.get("first").await?.status.map(|s| s.ready),
                before.map(|s| s.ready)
            );
            // Deleting the refused one must not touch the first's ZooKeeper state.
            crs.delete("second", &DeleteParams::default()).await?;
            wait_until(Duration::from_secs(60), "second deleted", || async {
                crs.get_opt("second").await.ok()?.is_none().then_some(())
            })
            .await?;
            assert_eq!(
                children(&zk, &format!("/arcus/cache_list/{svc}"))
                    .await
                    .len(),
                1
            );
            wait_ready(&crs, "first", "1/1", 30).await?;

            // serviceCode is immutable: the API server refuses an edit (CEL `self == oldSelf`),
            // the stored code stays, and deleting the resource still removes its ZooKeeper state.
            let refused = crs
                .patch(
                    "first",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"serviceCode": "renamed"}})),
                )
                .await
                .expect_err("a serviceCode edit is refused by the API server");
            match &refused {
                kube::Error::Api(e) => assert!(
                    e.code == 422
                        && e.message
                            .contains(arcus_operator::crd::rules::SERVICE_CODE_IMMUTABLE_MSG),
                    "{e:?}"
                ),
                other => panic!("unexpected error {other}"),
            }
            assert_eq!(crs.get("first").await?.spec.service_code, svc);
            crs.delete("first", &DeleteParams::default()).await?;
            wait_until(
                Duration::from_secs(90),
                "first deleted with its ZooKeeper state",
                || async {
                    let gone = crs.get_opt("first").await.ok()?.is_none();
                    let claim = zk
                        .check_stat(&format!("/arcus/cache_list/{svc}"))
                        .await
                        .ok()?;
                    (gone && claim.is_none() && mappings_of(&zk, &svc, &ns.name).await.is_empty())
                        .then_some(())
                },
            )
            .await?;
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}

/// What must become of an invalid resource.
enum Outcome {
    /// The API server refuses it (422 Invalid; the schema or a CEL rule of the CRD), saying this.
    Refused(&'static str),
    /// The API server stores it (no rule of the CRD covers it); the operator reports it in
    /// status.message, saying this, and creates nothing.
    Reported(&'static str),
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_resources_are_rejected_or_reported_and_create_nothing() -> anyhow::Result<()> {
    use arcus_operator::crd::rules;
    use Outcome::{Refused, Reported};
    with_namespace("invalid", 1, |sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let base = json!({
                "replicas": 1, "serviceCode": "inv", "zookeeperServers": [ZOOKEEPER],
                "configuration": {"memlimit": 64, "connections": 1000, "threads": 2},
                "image": {"name": "jam2in/arcus-memcached:1.11.7"}
            });
            let with = |path: &[&str], value: serde_json::Value| {
                let mut spec = base.clone();
                let mut at = &mut spec;
                for p in &path[..path.len() - 1] {
                    at = &mut at[*p];
                }
                if value.is_null() {
                    at.as_object_mut().unwrap().remove(path[path.len() - 1]);
                } else {
                    at[path[path.len() - 1]] = value;
                }
                spec
            };
            let long_name = "x".repeat(44);
            // memlimit 64 MB over 90% of a 64Mi limit.
            let mut over_memory_limit = base.clone();
            over_memory_limit["resources"] = json!({"limits": {"memory": "64Mi"}});
            // (metadata.name, spec, outcome). Schema messages are the API server's own.
            let cases: Vec<(&str, serde_json::Value, Outcome)> = vec![
                ("negative-replicas", with(&["replicas"], json!(-1)), Refused("spec.replicas in body should be greater than or equal to 0")),
                ("absurd-replicas", with(&["replicas"], json!(100000)), Refused("spec.replicas in body should be less than or equal to 1000")),
                ("replicas-string", with(&["replicas"], json!("three")), Refused("spec.replicas in body must be of type integer")),
                ("missing-service-code", with(&["serviceCode"], serde_json::Value::Null), Refused("spec.serviceCode: Required value")),
                ("empty-service-code", with(&["serviceCode"], json!("")), Refused("spec.serviceCode in body should be at least 1 chars long")),
                ("service-code-slash", with(&["serviceCode"], json!("a/b")), Refused("spec.serviceCode in body should match")),
                ("service-code-too-long", with(&["serviceCode"], json!("x".repeat(129))), Refused("spec.serviceCode: Too long")),
                ("missing-zookeeper", with(&["zookeeperServers"], serde_json::Value::Null), Refused("spec.zookeeperServers: Required value")),
                ("empty-zookeeper", with(&["zookeeperServers"], json!([])), Refused("spec.zookeeperServers in body should have at least 1 items")),
                ("zookeeper-no-port", with(&["zookeeperServers"], json!(["127.0.0.1"])), Refused(rules::ZOOKEEPER_SERVER_SHAPE_MSG)),
                ("zookeeper-bad-port", with(&["zookeeperServers"], json!(["zk:99999"])), Refused(rules::ZOOKEEPER_SERVER_PORT_MSG)),
                ("zookeeper-port-zero", with(&["zookeeperServers"], json!([ZOOKEEPER, "zk:0"])), Refused(rules::ZOOKEEPER_SERVER_PORT_MSG)),
                ("zookeeper-duplicate", with(&["zookeeperServers"], json!([ZOOKEEPER, ZOOKEEPER])), Refused(rules::ZOOKEEPER_SERVERS_UNIQUE_MSG)),
                ("zookeeper-duplicate-case", with(&["zookeeperServers"], json!(["zk-0.example:2181", "ZK-0.example:2181"])), Refused(rules::ZOOKEEPER_SERVERS_UNIQUE_MSG)),
                ("memlimit-zero", with(&["configuration", "memlimit"], json!(0)), Refused("spec.configuration.memlimit in body should be greater than or equal to 8")),
                ("memlimit-absurd", with(&["configuration", "memlimit"], json!(1u64 << 40)), Refused("spec.configuration.memlimit in body should be less than or equal to")),
                ("memlimit-over-memory-limit", over_memory_limit, Refused(rules::MEMLIMIT_FITS_MSG)),
                ("connections-negative", with(&["configuration", "connections"], json!(-5)), Refused("spec.configuration.connections in body should be greater than or equal to 10")),
                ("threads-zero", with(&["configuration", "threads"], json!(0)), Refused("spec.configuration.threads in body should be greater than or equal to 1")),
                ("threads-absurd", with(&["configuration", "threads"], json!(100000)), Refused("spec.configuration.threads in body should be less than or equal to 64")),
                ("pull-policy-bogus", with(&["image", "pullPolicy"], json!("Sometimes")), Refused("spec.image.pullPolicy: Unsupported value: \"Sometimes\"")),
                ("missing-image", with(&["image"], serde_json::Value::Null), Refused("spec.image: Required value")),
                ("image-empty-name", with(&["image", "name"], json!("")), Refused("spec.image.name in body should be at least 1 chars long")),
                ("port-zero", with(&["port"], json!(0)), Refused("spec.port in body should be greater than or equal to 1")),
                ("exporter-port-clash", with(&["metricsExporter"], json!({"port": 11211})), Refused(rules::EXPORTER_PORT_CLASH_MSG)),
                ("reserved-pod-label", with(&["podLabels"], json!({"app.kubernetes.io/name": "x"})), Refused(rules::RESERVED_POD_LABELS_MSG)),
                ("dotted.name", base.clone(), Refused(rules::NAME_DNS1035_MSG)),
                (long_name.as_str(), base.clone(), Refused(rules::NAME_LENGTH_MSG)),
                // What no rule of the CRD covers: the operator's validation reports it.
                ("image-upper-case", with(&["image", "name"], json!("Jam2in/Arcus-Memcached:1.0")), Reported("spec.image.name \"Jam2in/Arcus-Memcached:1.0\" is not an image reference")),
                ("zookeeper-not-ipv4", with(&["zookeeperServers"], json!(["300.1.2.3:2181"])), Reported("looks like an IPv4 address but is not one")),
                ("pod-label-bad-key", with(&["podLabels"], json!({"bad key": "x"})), Reported("spec.podLabels[\"bad key\"] is not a valid label key")),
            ];
            let crs = untyped_api(sandbox, &ns);
            let typed: Api<ArcusMemcached> = ns.api();
            let object = |name: &str, spec: &serde_json::Value| -> anyhow::Result<DynamicObject> {
                Ok(serde_json::from_value(json!({"apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached", "metadata": {"name": name}, "spec": spec}))?)
            };
            let assert_refused = |what: &str, result: Result<DynamicObject, kube::Error>, says: &str| match result {
                Err(kube::Error::Api(e)) => {
                    assert!(e.code == 422 && e.reason == "Invalid", "{what}: expected 422 Invalid, got {e:?}");
                    assert!(e.message.contains(says), "{what}: the API server's message {:?} lacks {says:?}", e.message);
                    eprintln!("{what}: refused: {}", e.message);
                }
                Err(e) => panic!("{what}: unexpected error {e}"),
                Ok(_) => panic!("{what}: the API server accepted it; expected a refusal saying {says:?}"),
            };
            let mut reported = Vec::new();
            for (name, spec, outcome) in &cases {
                let created = crs.create(&PostParams::default(), &object(name, spec)?).await;
                match outcome {
                    Refused(says) => assert_refused(name, created, says),
                    Reported(says) => {
                        created.map_err(|e| anyhow::anyhow!("{name}: the API server refused it, expected the operator to report it: {e}"))?;
                        reported.push((*name, *says));
                    }
                }
            }
            for (name, says) in &reported {
                let msg = wait_until(Duration::from_secs(60), &format!("{name} reported invalid in status"), || async {
                    typed.get(name).await.ok()?.status?.message.filter(|m| m.starts_with("invalid spec"))
                })
                .await?;
                assert!(msg.contains(says), "{name}: status.message {msg:?} lacks {says:?}");
                eprintln!("{name}: {msg}");
            }

            // An update that changes serviceCode is refused (a transition rule), and the stored
            // resource keeps its code.
            let (stored, _) = reported[0];
            let change = crs
                .patch(stored, &PatchParams::default(), &Patch::Merge(json!({"spec": {"serviceCode": "inv2"}})))
                .await;
            assert_refused(&format!("{stored}: serviceCode change"), change, rules::SERVICE_CODE_IMMUTABLE_MSG);
            assert_eq!(typed.get(stored).await?.spec.service_code, "inv");
            // ... while other updates still pass the rule.
            crs.patch(stored, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 2}})))
                .await
                .map_err(|e| anyhow::anyhow!("{stored}: an update keeping serviceCode was refused: {e}"))?;

            eprintln!("{} refused by the API server, {} reported in status", cases.len() - reported.len(), reported.len());
            let sts: Api<StatefulSet> = ns.api();
            assert!(sts.list(&ListParams::default()).await?.items.is_empty(), "no StatefulSet for invalid resources");
            assert_eq!(zk.check_stat("/arcus/cache_list/inv").await?, None, "no znode for invalid resources");
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}

/// The ArcusMemcached API untyped, to send what the typed struct could not hold.
fn untyped_api(sandbox: &Sandbox, ns: &TestNamespace) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("jam2in.com", "v1", "ArcusMemcached");
    Api::namespaced_with(
        sandbox.client.clone(),
        &ns.name,
        &ApiResource::from_gvk_with_plural(&gvk, "memcacheds"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn live_config_rolling_restart_and_self_healing() -> anyhow::Result<()> {
    with_namespace("day2", 1, |_sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs: Api<ArcusMemcached> = ns.api();
            let mut d2 = cr("d2", &svc, 5);
            d2.spec.configuration.memlimit = 100;
            crs.create(&PostParams::default(), &d2).await?;
            wait_ready(&crs, "d2", "5/5", 240).await?;
            let pods: Api<Pod> = ns.api();
            let snapshot = || async {
                let mut out = std::collections::BTreeMap::new();
                for o in 0..5u32 {
                    let p = pods.get(&format!("d2-arcus-mc-{o}")).await?;
                    let st = p.status.clone().unwrap_or_default();
                    let restarts = st
                        .container_statuses
                        .as_ref()
                        .map(|c| c[0].restart_count)
                        .unwrap_or(-1);
                    out.insert(
                        o,
                        (
                            p.metadata.uid.clone().unwrap_or_default(),
                            restarts,
                            st.pod_ip.unwrap_or_default(),
                        ),
                    );
                }
                anyhow::Ok(out)
            };

            // memlimit 100 → 200: every node reports it, nothing restarts.
            let before = snapshot().await?;
            crs.patch(
                "d2",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"configuration": {"memlimit": 200}}})),
            )
            .await?;
            wait_until(
                Duration::from_secs(60),
                "every node at limit_maxbytes 200 MiB",
                || async {
                    before
                        .values()
                        .all(|(_, _, ip)| {
                            node_stats(ip)
                                .ok()
                                .and_then(|s| s.get("limit_maxbytes").cloned())
                                == Some((200u64 << 20).to_string())
                        })
                        .then_some(())
                },
            )
            .await?;
            assert_eq!(
                snapshot().await?,
                before,
                "no pod was restarted or replaced for a memlimit change"
            );

            // 100,000 keys, and a reader over them for the whole roll.
            let client = ring_client(&svc, 5).await?;
            load(&client, 100_000usize, |i| {
                (format!("r:{i}"), format!("v{i}"), 0, 0)
            })
            .await?;
            let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let reader = {
                let (c, reading) = (client.clone(), reading.clone());
                tokio::spawn(async move {
                    let (mut hits, mut total, mut n) = (0u64, 0u64, 1usize);
                    while reading.load(std::sync::atomic::Ordering::Relaxed) && total < 2_000_000 {
                        n = (n * 1_103_515_245 + 12_345) % 2_147_483_648;
                        total += 1;
                        if let Ok(Some(_)) = c.get(&format!("r:{}", n % 100_000)).await {
                            hits += 1;
                        }
                    }
                    (hits, total)
                })
            };

            // An image change rolls 4,3,2,1,0, one node at a time, moving each node's items away
            // and back.
            crs.patch(
                "d2",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"spec": {"image": {"name": "jam2in/arcus-memcached:1.11.8"}}}),
                ),
            )
            .await?;
            let mut order = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while order.len() < 5 {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "roll not finished in 300 s; order so far {order:?}"
                );
                let mut replaced = 0;
                let mut unavailable = 0;
                for o in 0..5u32 {
                    match pods.get_opt(&format!("d2-arcus-mc-{o}")).await? {
                        Some(p) => {
                            let ready = p
                                .status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                });
                            if p.metadata.uid != Some(before[&o].0.clone()) {
                                replaced += 1;
                                if !order.contains(&o) {
                                    order.push(o);
                                }
                            }
                            if !ready || p.metadata.deletion_timestamp.is_some() {
                                unavailable += 1;
                            }
                        }
                        None => unavailable += 1,
                    }
                }
                assert!(
                    unavailable <= 1,
                    "more than one node down at once during the roll (order so far {order:?})"
                );
                let _ = replaced;
                tokio::time::sleep(Duration::from_millis(50)).await; // polling period of the observer, not a wait for a condition
            }
            assert_eq!(order, vec![4, 3, 2, 1, 0], "highest ordinal first");
            wait_ready(&crs, "d2", "5/5", 120).await?;
            let copied_back = || async {
                let data = zk
                    .get_data(&format!("/arcus/cache_list/{svc}"))
                    .await
                    .ok()?
                    .0;
                (!String::from_utf8_lossy(&data).contains("\"operation\"")).then_some(())
            };
            wait_until(
                Duration::from_secs(60),
                "the last node's items copied back",
                copied_back,
            )
            .await?;
            reading.store(false, std::sync::atomic::Ordering::Relaxed);
            let (hits, total) = reader.await?;
            let ratio = hits as f64 / total as f64;
            eprintln!("hit ratio during the roll: {hits}/{total} = {ratio:.4}");
            // A restarted node is taken out of the ring the moment it registers, filled, and let
            // back in with `zkensemble rejoin`, so its keys keep hitting on the other nodes.
            assert!(ratio >= 0.99, "hit ratio during the roll {ratio:.4} < 0.99");
            // The final record follows the claim's clearing (one status write later).
            let done = wait_until(
                Duration::from_secs(10),
                "the roll's final Migration record",
                || async {
                    let summary = crs.get("d2").await.ok()?.status?.migration?.summary;
                    summary
                        .starts_with("rolling restart d2-arcus-mc-0: Done")
                        .then_some(summary)
                },
            )
            .await;
            let summary = match done {
                Ok(s) => s,
                Err(_) => crs
                    .get("d2")
                    .await?
                    .status
                    .and_then(|s| s.migration)
                    .map(|m| m.summary)
                    .unwrap_or_default(),
            };
            eprintln!("status.migration after the roll: {summary}");
            assert!(
                summary.starts_with("rolling restart d2-arcus-mc-0: Done"),
                "the Migration column names the last node rolled and its phase: {summary:?}"
            );
            let cr_now = crs.get("d2").await?;
            assert_eq!(
                cr_now.status.unwrap().image.as_deref(),
                Some("jam2in/arcus-memcached:1.11.8")
            );

            // A znode deleted by hand: the node is back in cache_list within 30 s.
            let list = format!("/arcus/cache_list/{svc}");
            let victim = children(&zk, &list)
                .await
                .into_iter()
                .find(|c| c.contains("d2-arcus-mc-2."))
                .expect("node 2 registered");
            let before_heal = pods.get("d2-arcus-mc-2").await?;
            zk.delete(&format!("{list}/{victim}"), None).await?;
            let started = std::time::Instant::now();
            wait_until(
                Duration::from_secs(30),
                "node 2 back in cache_list",
                || async {
                    children(&zk, &list)
                        .await
                        .iter()
                        .any(|c| c.contains("d2-arcus-mc-2."))
                        .then_some(())
                },
            )
            .await?;
            eprintln!("node 2 back in cache_list after {:?}", started.elapsed());
            // Rejoined (`zkensemble rejoin`), not restarted: same pod, same container.
            let after_heal = pods.get("d2-arcus-mc-2").await?;
            let restarts = |p: &Pod| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .map(|c| c[0].restart_count)
            };
            assert_eq!(
                after_heal.metadata.uid, before_heal.metadata.uid,
                "node 2 rejoined in place"
            );
            assert_eq!(
                restarts(&after_heal),
                restarts(&before_heal),
                "node 2 was not restarted"
            );
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}

/// What a churn writer did: keys it created and deleted again, and keys still live at its end.
#[derive(Default)]
struct ChurnLog {
    deleted: Vec<String>,
    live: Vec<(String, String)>,
    /// Failed operations; their keys are in neither list (their state is unknown).
    errors: u64,
}

/// A bounded writer of short-lived keys (sessions, locks): creates `<tag>:<n>` and deletes each
/// one about 30 ms later. Around a ring change it creates keys on their old owner and deletes
/// them on the new one, which is exactly the migration's window between pass 1 and pass 2.
fn churn_writer(
    client: std::sync::Arc<arcus_client::ArcusClient>,
    tag: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<ChurnLog>> {
    tokio::spawn(async move {
        let mut log = ChurnLog::default();
        let mut queue: std::collections::VecDeque<(tokio::time::Instant, String, String)> =
            Default::default();
        for n in 0..60_000u32 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let (key, value) = (format!("{tag}:{n}"), format!("c{n}"));
            match client.set(&key, &value, 3, 0).await {
                Ok(_) => queue.push_back((tokio::time::Instant::now(), key, value)),
                Err(_) => log.errors += 1,
            }
            while let Some((at, _, _)) = queue.front() {
                if at.elapsed() < Duration::from_millis(30) {
                    break;
                }
                let (_, key, _) = queue.pop_front().expect("front exists");
                match client.delete(&key).await {
                    Ok(_) => log.deleted.push(key),
                    Err(_) => log.errors += 1,
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await; // the writer's pace, not a wait
        }
        log.live = queue.into_iter().map(|(_, k, v)| (k, v)).collect();
        Ok(log)
    })
}

/// (resurrected, lost) of a churn writer's keys, read through `client`.
async fn churn_check(
    client: &arcus_client::ArcusClient,
    log: &ChurnLog,
) -> anyhow::Result<(usize, usize)> {
    let mut resurrected = 0;
    for k in &log.deleted {
        resurrected += usize::from(client.get(k).await?.is_some());
    }
    let mut lost = 0;
    for (k, v) in &log.live {
        let got = client.get(k).await?;
        lost += usize::from(got.as_ref().map(|i| i.value.as_slice()) != Some(v.as_bytes()));
    }
    Ok((resurrected, lost))
}

/// What a bounded client writer did to the main keys while the cluster scaled.
#[derive(Default)]
struct WriterLog {
    deleted: std::collections::HashSet<usize>,
    overwritten: std::collections::HashMap<usize, String>,
    /// Per key, each op: (ms since the test's clock started, 'd' or the value set).
    history: std::collections::HashMap<usize, Vec<(u128, String)>>,
    ops: u64,
    errors: u64,
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_in_and_out_migrate_the_cache_while_a_client_writes() -> anyhow::Result<()> {
    with_namespace("migrate", 1, |_sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs: Api<ArcusMemcached> = ns.api();
            crs.create(&PostParams::default(), &cr("mg", &svc, 5)).await?;
            wait_ready(&crs, "mg", "5/5", 240).await?;
            let client = ring_client(&svc, 5).await?;
            // A second client without follow-up deletes shows the window they close.
            let not_following = ring_client_with(&svc, 5, Duration::ZERO).await?;
            let start_churn = |phase: &'static [&'static str; 2]| {
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let following = churn_writer(client.clone(), phase[0], stop.clone());
                let plain = churn_writer(not_following.clone(), phase[1], stop.clone());
                (stop, following, plain)
            };
            let check_churn = |phase: &'static str, churn: (std::sync::Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<anyhow::Result<ChurnLog>>, tokio::task::JoinHandle<anyhow::Result<ChurnLog>>)| {
                let c = client.clone();
                async move {
                    churn.0.store(true, std::sync::atomic::Ordering::Relaxed);
                    let (following, plain) = (churn.1.await??, churn.2.await??);
                    let (resurrected, lost) = churn_check(&c, &following).await?;
                    let (plain_resurrected, plain_lost) = churn_check(&c, &plain).await?;
                    eprintln!(
                        "{phase}, short-lived keys: following client {resurrected} of {} deletes resurrected, {lost} of {} live lost, {} errors; \
                         client without follow-up deletes {plain_resurrected} of {} resurrected, {plain_lost} of {} lost, {} errors",
                        following.deleted.len(), following.live.len(), following.errors,
                        plain.deleted.len(), plain.live.len(), plain.errors
                    );
                    assert!(following.deleted.len() > 100, "{phase}: the churn writer ran");
                    assert_eq!((resurrected, lost, plain_lost), (0, 0, 0), "{phase}: short-lived keys");
                    anyhow::Ok(())
                }
            };

            // 100,000 keys: 10% expire during the test (8 s), 10% with an hour, the rest none.
            const KEYS: usize = 100_000;
            let ttl = |i: usize| match i % 10 { 0 => 8, 1 => 3600, _ => 0 };
            let loaded_at = std::time::Instant::now();
            // Ring changes the client saw (ms since `loaded_at`, nodes), to explain a failed check.
            let rings_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u128, usize)>::new()));
            let ring_recorder = {
                let (mut rx, seen) = (client.watch_ring(), rings_seen.clone());
                tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        let n = rx.borrow_and_update().len();
                        seen.lock().unwrap().push((loaded_at.elapsed().as_millis(), n));
                    }
                })
            };
            load(&client, KEYS, |i| (format!("k:{i}"), format!("v{i}"), (i % 65536) as u32, ttl(i))).await?;
            eprintln!("loaded {KEYS} keys in {:?}", loaded_at.elapsed());

            // Each scale runs under a bounded writer that deletes and overwrites main keys.
            let start_writer = |seed: usize| {
                let (c, stop) = (client.clone(), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
                let handle = {
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let mut log = WriterLog::default();
                        let mut n: usize = seed;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) && log.ops < 200_000 {
                            n = (n * 1_103_515_245 + 12_345) % 2_147_483_648;
                            let i = n % KEYS;
                            if i.is_multiple_of(10) {
                                continue; // keys that expire are left alone
                            }
                            let at = loaded_at.elapsed().as_millis();
                            let r = if n.is_multiple_of(3) {
                                c.delete(&format!("k:{i}")).await.map(|_| {
                                    log.deleted.insert(i);
                                    log.overwritten.remove(&i);
                                    log.history.entry(i).or_default().push((at, "d".into()));
                                })
                            } else {
                                let v = format!("w{seed}-{}", log.ops);
                                c.set(&format!("k:{i}"), &v, 7, ttl(i)).await.map(|_| {
                                    log.deleted.remove(&i);
                                    log.history.entry(i).or_default().push((at, v.clone()));
                                    log.overwritten.insert(i, v);
                                })
                            };
                            log.ops += 1;
                            log.errors += u64::from(r.is_err());
                            tokio::time::sleep(Duration::from_millis(2)).await; // the writer's pace, not a wait
                        }
                        log
                    })
                };
                (stop, handle)
            };
            // Reads every key back: (lost, reverted, resurrected, expired back), folding the
            // writer's effects into `expected` (None: deleted) for the next phase.
            let check = |expected: std::collections::HashMap<usize, Option<(String, u32)>>, log: &WriterLog| {
                let c = client.clone();
                let history = log.history.clone();
                let rings = rings_seen.clone();
                async move {
                    let (mut lost, mut reverted, mut resurrected, mut expired_back) = (0, 0, 0, 0);
                    let mut wrong = Vec::new();
                    for i in 0..KEYS {
                        let got = c.get(&format!("k:{i}")).await?.map(|g| (String::from_utf8_lossy(&g.value).into_owned(), g.flags));
                        let bad = match (i % 10 == 0, expected.get(&i)) {
                            (true, _) => { expired_back += usize::from(got.is_some()); got.is_some() }
                            (false, Some(None)) => { resurrected += usize::from(got.is_some()); got.is_some() }
                            (false, Some(Some(v))) if v.0.starts_with('w') => { reverted += usize::from(got.as_ref() != Some(v)); got.as_ref() != Some(v) }
                            (false, Some(Some(v))) => { lost += usize::from(got.as_ref() != Some(v)); got.as_ref() != Some(v) }
                            (false, None) => unreachable!(),
                        };
                        if bad && wrong.len() < 5 {
                            wrong.push(format!("k:{i} expected {:?}, got {got:?}, owner {:?}, writer ops (ms, op) {:?}", expected.get(&i), c.node_for_key(&format!("k:{i}")).ok(), history.get(&i)));
                        }
                    }
                    if !wrong.is_empty() {
                        eprintln!("wrong keys:\n  {}\nring changes (ms, nodes): {:?}", wrong.join("\n  "), rings.lock().unwrap());
                    }
                    anyhow::Ok((lost, reverted, resurrected, expired_back))
                }
            };
            let mut expected: std::collections::HashMap<usize, Option<(String, u32)>> =
                (0..KEYS).filter(|i| i % 10 != 0).map(|i| (i, Some((format!("v{i}"), (i % 65536) as u32)))).collect();
            for i in (0..KEYS).filter(|i| i % 10 == 0) {
                expected.insert(i, None);
            }
            // The 8-second keys are all expired from here on (the condition is the clock itself).
            let expired_after = tokio::time::Instant::from_std(loaded_at) + Duration::from_secs(9);
            let fold = |expected: &mut std::collections::HashMap<usize, Option<(String, u32)>>, log: &WriterLog| {
                for i in &log.deleted {
                    expected.insert(*i, None);
                }
                for (i, v) in &log.overwritten {
                    expected.insert(*i, Some((v.clone(), 7)));
                }
            };

            // 5 → 3, with an observer of status.migration (the Migration printer column).
            let progress_seen = {
                let crs = crs.clone();
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let s2 = stop.clone();
                let h = tokio::spawn(async move {
                    let mut seen = std::collections::BTreeSet::new();
                    for _ in 0..3000 {
                        if s2.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        if let Ok(cr) = crs.get("mg").await {
                            if let Some(m) = cr.status.and_then(|s| s.migration) {
                                seen.insert(m.phase.clone());
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await; // the observer's polling period
                    }
                    seen
                });
                (stop, h)
            };
            let (stop, writer) = start_writer(7);
            let churn = start_churn(&["in-f", "in-p"]);
            crs.patch("mg", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await?;
            wait_until(Duration::from_secs(180), "scale-in to 3 done", || async {
                let sts: Api<StatefulSet> = ns.api();
                let three = sts.get("mg-arcus-mc").await.ok()?.spec?.replicas == Some(3);
                (three && client.nodes().len() == 3 && pods_named(&ns, "mg-arcus-mc-").await.len() == 3).then_some(())
            })
            .await?;
            wait_ready(&crs, "mg", "3/3", 60).await?;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let log = writer.await?;
            check_churn("5→3", churn).await?;
            fold(&mut expected, &log);
            tokio::time::sleep_until(expired_after).await;
            let (lost, reverted, resurrected, expired_back) = check(expected.clone(), &log).await?;
            eprintln!("5→3 under a writer ({} ops, {} errors): lost {lost}, reverted {reverted}, resurrected {resurrected}, expired back {expired_back}", log.ops, log.errors);
            // None resurrected: a key written on a leaving node after pass 1's last listing and
            // deleted by the client on its new owner before pass 2 copied it would come back,
            // but the client's delete also reaches the previous owner (arcus-client's
            // `delete_previous_owners_for`), so pass 2 finds nothing to copy.
            assert_eq!(
                (lost, reverted, resurrected, expired_back),
                (0, 0, 0, 0),
                "scale-in: nothing lost, reverted, resurrected ({} deletes) or revived",
                log.deleted.len()
            );
            progress_seen.0.store(true, std::sync::atomic::Ordering::Relaxed);
            let phases = progress_seen.1.await?;
            let migration = crs.get("mg").await?.status.and_then(|s| s.migration).expect("status.migration");
            eprintln!("status.migration phases seen during 5→3: {phases:?}; final: {}", migration.summary);
            assert!(
                phases.iter().any(|p| p == "Pass1" || p == "Pass2"),
                "progress was reported while the copy ran: {phases:?}"
            );
            assert!(migration.summary.starts_with("scale-in 5→3: Done"), "{}", migration.summary);
            assert!(migration.items_moved > 30_000 && migration.items_moved <= migration.items_to_move, "{migration:?}");

            // 3 → 5.
            let pending_cleared = || async {
                let data = zk.get_data(&format!("/arcus/cache_list/{svc}")).await.ok()?.0;
                (!String::from_utf8_lossy(&data).contains("\"operation\"")).then_some(())
            };
            let (stop, writer) = start_writer(11);
            let churn = start_churn(&["out-f", "out-p"]);
            crs.patch("mg", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}}))).await?;
            wait_ready(&crs, "mg", "5/5", 240).await?;
            wait_until(Duration::from_secs(120), "scale-out copies done", pending_cleared).await?;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let log = writer.await?;
            check_churn("3→5", churn).await?;
            fold(&mut expected, &log);
            let (lost, reverted, resurrected, expired_back) = check(expected, &log).await?;
            ring_recorder.abort();
            eprintln!("3→5 under a writer ({} ops, {} errors): lost {lost}, reverted {reverted}, resurrected {resurrected}, expired back {expired_back}", log.ops, log.errors);
            // Each new node is filled while out of the ring (taken out as it registers, let in by
            // `zkensemble rejoin`). Deletes the client sent to it in the milliseconds it was
            // visible, and after it joined, also reached the old owners, so no copy revives them.
            assert_eq!(
                (lost, reverted, resurrected, expired_back),
                (0, 0, 0, 0),
                "scale-out: nothing lost, reverted, resurrected ({} deletes) or revived",
                log.deleted.len()
            );
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_killed_during_scale_in_migration_resumes_and_loses_nothing() -> anyhow::Result<()>
{
    with_namespace("resume", 1, |_sandbox, ns| async move {
        let r = async {
            let zk = zk_client().await?;
            let svc = service_code(&ns);
            let crs: Api<ArcusMemcached> = ns.api();
            crs.create(&PostParams::default(), &cr("rs", &svc, 5))
                .await?;
            wait_ready(&crs, "rs", "5/5", 240).await?;
            let client = ring_client(&svc, 5).await?;
            const KEYS: usize = 100_000;
            load(&client, KEYS, |i| {
                (format!("k:{i}"), format!("v{i}"), (i % 65536) as u32, 0)
            })
            .await?;

            // Scale in, and kill the operator once pass 1 has finished and stored its checkpoint.
            let pods: Api<Pod> = ns.api();
            let operator = pods
                .list(&ListParams::default().labels("name=arcus-operator"))
                .await?
                .items
                .remove(0);
            let pid = container_pid(&operator).expect("operator pid");
            crs.patch(
                "rs",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await?;
            wait_until(
                Duration::from_secs(60),
                "pass 1's checkpoint stored",
                || async {
                    let data = zk
                        .get_data(&format!("/arcus/cache_list/{svc}"))
                        .await
                        .ok()?
                        .0;
                    String::from_utf8_lossy(&data)
                        .contains("\"scaleIn\"")
                        .then_some(())
                },
            )
            .await?;
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
            eprintln!("killed the operator (pid {pid}) after pass 1");

            // It restarts (same pod), resumes pass 2 from the checkpoint, and finishes the scale-in.
            wait_until(
                Duration::from_secs(180),
                "scale-in finished after the restart",
                || async {
                    let sts: Api<StatefulSet> = ns.api();
                    let three = sts.get("rs-arcus-mc").await.ok()?.spec?.replicas == Some(3);
                    let data = zk
                        .get_data(&format!("/arcus/cache_list/{svc}"))
                        .await
                        .ok()?
                        .0;
                    let settled = !String::from_utf8_lossy(&data).contains("\"operation\"");
                    (three && settled && pods_named(&ns, "rs-arcus-mc-").await.len() == 3)
                        .then_some(())
                },
            )
            .await?;
            let restarts = pods
                .get(&operator.name_any())
                .await?
                .status
                .unwrap()
                .container_statuses
                .unwrap()[0]
                .restart_count;
            assert!(restarts >= 1, "the operator was restarted");
            wait_until(Duration::from_secs(10), "client ring of 3", || async {
                (client.nodes().len() == 3).then_some(())
            })
            .await?;
            let mut lost = 0;
            for i in 0..KEYS {
                let got = client.get(&format!("k:{i}")).await?;
                if got.map(|g| (g.value, g.flags))
                    != Some((format!("v{i}").into_bytes(), (i % 65536) as u32))
                {
                    lost += 1;
                }
            }
            eprintln!("after the interrupted 5→3: {lost} of {KEYS} keys lost");
            assert_eq!(lost, 0, "keys lost across the operator restart");

            // Scale out 3→4, and kill the operator while the new node is held out of the ring
            // (taken out as it registered, being filled): the restarted operator fills it and
            // lets it in with `zkensemble rejoin`.
            let operator = pods
                .list(&ListParams::default().labels("name=arcus-operator"))
                .await?
                .items
                .remove(0);
            let pid = container_pid(&operator).expect("operator pid");
            let restarts_before = operator
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map(|c| c[0].restart_count)
                .unwrap_or(0);
            crs.patch(
                "rs",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 4}})),
            )
            .await?;
            wait_until(
                Duration::from_secs(120),
                "the new node held out of the ring",
                || async {
                    let data = zk
                        .get_data(&format!("/arcus/cache_list/{svc}"))
                        .await
                        .ok()?
                        .0;
                    String::from_utf8_lossy(&data)
                        .contains("\"held\":[\"")
                        .then_some(())
                },
            )
            .await?;
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
            eprintln!("killed the operator (pid {pid}) while node 3 was held out");
            wait_until(
                Duration::from_secs(180),
                "scale-out finished after the restart",
                || async {
                    let data = zk
                        .get_data(&format!("/arcus/cache_list/{svc}"))
                        .await
                        .ok()?
                        .0;
                    let settled = !String::from_utf8_lossy(&data).contains("\"operation\"");
                    let four = children(&zk, &format!("/arcus/cache_list/{svc}"))
                        .await
                        .len()
                        == 4;
                    (settled && four).then_some(())
                },
            )
            .await?;
            let restarts = pods
                .get(&operator.name_any())
                .await?
                .status
                .unwrap()
                .container_statuses
                .unwrap()[0]
                .restart_count;
            assert!(restarts > restarts_before, "the operator was restarted");
            wait_until(Duration::from_secs(10), "client ring of 4", || async {
                (client.nodes().len() == 4).then_some(())
            })
            .await?;
            let mut lost = 0;
            for i in 0..KEYS {
                let got = client.get(&format!("k:{i}")).await?;
                if got.map(|g| (g.value, g.flags))
                    != Some((format!("v{i}").into_bytes(), (i % 65536) as u32))
                {
                    lost += 1;
                }
            }
            eprintln!("after the interrupted 3→4: {lost} of {KEYS} keys lost");
            assert_eq!(
                lost, 0,
                "keys lost across the operator restart during the scale-out"
            );
            Ok(())
        }
        .await;
        (ns, r)
    })
    .await
}
