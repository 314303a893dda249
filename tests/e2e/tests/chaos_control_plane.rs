//! The control plane restarted in the middle of a migration: the sandbox's etcd and API server
//! get SIGTERM and are started again (same command line) while a 3→5 scale-out copies 60,000
//! keys. The operator's watches reconnect, the scale-out finishes, and every key reads back.
//!
//! One test, alone in its binary: the restart stops every other user of the API server (test
//! binaries run one after another).

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use std::time::{Duration, Instant};
use test_support::operator::restart_sandbox_daemon;
use test_support::sandbox::{Sandbox, TestNamespace};
use test_support::wait_until;

const KEYS: usize = 60_000;

fn key(i: usize) -> String {
    format!("cp:{i}")
}

fn value(i: usize) -> String {
    format!("value-{i:08}")
}

#[tokio::test(flavor = "multi_thread")]
async fn api_server_and_etcd_restarted_mid_migration_lose_nothing() -> anyhow::Result<()> {
    with_namespace("cp", 1, |sandbox, ns| async move {
        let r = run(sandbox, &ns).await;
        (ns, r)
    })
    .await
}

async fn run(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let (svc, client) = settled_and_loaded(sandbox, ns, "cp", 3, KEYS, key, value).await?;
    let crs = mc_api(sandbox, ns);

    crs.patch(
        "cp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await?;
    let zk = zk_client().await?;
    let claim = format!("/arcus/cache_list/{svc}");
    wait_until(
        Duration::from_secs(60),
        "the scale-out recorded",
        || async {
            let (data, _) = zk.get_data(&claim).await.ok()?;
            String::from_utf8_lossy(&data)
                .contains("\"operation\"")
                .then_some(())
        },
    )
    .await?;

    let down = Instant::now();
    let etcd = restart_sandbox_daemon(&sandbox.dir, "etcd")?;
    let apiserver = restart_sandbox_daemon(&sandbox.dir, "kube-apiserver")?;
    let pods: Api<Pod> = ns.api();
    wait_until(
        Duration::from_secs(90),
        "the API server answers again",
        || async { pods.list(&ListParams::default()).await.ok().map(|_| ()) },
    )
    .await?;
    let api_back = down.elapsed();
    eprintln!(
        "[control-plane] etcd (pid {etcd}) and kube-apiserver (pid {apiserver}) restarted mid-migration; the API answered again after {:.1} s",
        api_back.as_secs_f64()
    );

    wait_until(
        Duration::from_secs(300),
        "5/5 ready, the scale-out done",
        || settled(&crs, "cp", "5/5"),
    )
    .await?;
    let converged = down.elapsed();
    let status = crs.get("cp").await?.data["status"]["migration"].clone();
    eprintln!(
        "[control-plane] scale-out finished {:.1} s after the restart began; migration: {}",
        converged.as_secs_f64(),
        status["summary"]
    );
    wait_until(Duration::from_secs(30), "client ring of 5", || async {
        (client.nodes().len() == 5).then_some(())
    })
    .await?;
    let good = read_back_all(&client, KEYS, key, value).await?;
    eprintln!("[control-plane] {good} of {KEYS} keys read back");
    anyhow::ensure!(good == KEYS, "{} keys lost", KEYS - good);
    Ok(())
}
