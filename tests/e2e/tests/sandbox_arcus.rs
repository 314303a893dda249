//! The sandbox runs the ARCUS image as a real StatefulSet would, with no operator involved:
//! mappings made by hand, 3 pods Ready in order on their own 127.x IPs, each registered in
//! ZooKeeper and answering set/get on its pod IP; a deleted pod's znode disappears and the
//! StatefulSet brings it back; a pod without a mapping exits 76 and says so.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use serde_json::json;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;
use test_support::sandbox::{Sandbox, TestNamespace, ZOOKEEPER};
use test_support::wait_until;
use zookeeper_client as zk;

fn statefulset(name: &str, ns: &str, replicas: i32) -> StatefulSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "arcus-memcached", "image": "jam2in/arcus-memcached:1.11.7",
                    "command": ["/arcus/bin/memcached", "-E", "/arcus/lib/default_engine.so", "-X", "/arcus/lib/ascii_scrub.so",
                                "-u", "root", "-D", ":", "-r", "-R5", "-U", "0", "-b", "8192", "-p", "11211",
                                "-m", "32", "-c", "100", "-t", "2", "-z", ZOOKEEPER],
                    "env": [
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "ARCUS_CACHE_HOSTNAME_OVERWRITE", "value": format!("$(POD).{ns}")},
                        {"name": "ARCUS_CACHE_PUBLIC_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                    ],
                    "readinessProbe": {"tcpSocket": {"port": 11211}, "periodSeconds": 1}
                }]}
            }
        }
    }))
    .expect("statefulset")
}

async fn map(zk: &zk::Client, host: &str, svc: &str) -> anyhow::Result<()> {
    let opts = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    for p in [
        "/arcus",
        "/arcus/cache_list",
        "/arcus/cache_server_mapping",
        "/arcus/cache_server_log",
    ] {
        let _ = zk.create(p, b"", &opts).await;
    }
    let _ = zk
        .create(&format!("/arcus/cache_list/{svc}"), b"", &opts)
        .await;
    zk.create(
        &format!("/arcus/cache_server_mapping/{host}:11211"),
        b"",
        &opts,
    )
    .await?;
    zk.create(
        &format!("/arcus/cache_server_mapping/{host}:11211/{svc}"),
        b"",
        &opts,
    )
    .await?;
    Ok(())
}

async fn unmap_all(zk: &zk::Client, hosts: &[String], svc: &str) {
    for h in hosts {
        let _ = zk
            .delete(
                &format!("/arcus/cache_server_mapping/{h}:11211/{svc}"),
                None,
            )
            .await;
        let _ = zk
            .delete(&format!("/arcus/cache_server_mapping/{h}:11211"), None)
            .await;
    }
    let _ = zk.delete(&format!("/arcus/cache_list/{svc}"), None).await;
}

/// One memcached text-protocol exchange on `addr`.
fn memcached(addr: &str, request: &str, reply_lines: usize) -> anyhow::Result<Vec<String>> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(request.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    for _ in 0..reply_lines {
        let mut line = String::new();
        r.read_line(&mut line)?;
        out.push(line.trim_end().to_string());
    }
    Ok(out)
}

async fn run(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let zk = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(ZOOKEEPER)
        .await?;
    let svc = ns.name.replace('-', "_");
    let hosts: Vec<String> = (0..3).map(|o| format!("mc-{o}.{}", ns.name)).collect();
    let result = async {
        for h in &hosts {
            map(&zk, h, &svc).await?;
        }
        let stss: Api<StatefulSet> = ns.api();
        stss.create(&PostParams::default(), &statefulset("mc", &ns.name, 3))
            .await?;
        let pods: Api<Pod> = ns.api();
        let ready = |p: &Pod| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        };
        let all = wait_until(Duration::from_secs(120), "3 ARCUS pods Ready", || async {
            let mut list = Vec::new();
            for o in 0..3 {
                list.push(pods.get_opt(&format!("mc-{o}")).await.ok()??);
            }
            list.iter().all(ready).then_some(list)
        })
        .await?;
        // Ordered start: each pod started after the previous one was Ready.
        let started: Vec<_> = all
            .iter()
            .map(|p| p.status.as_ref().unwrap().start_time.clone().unwrap().0)
            .collect();
        assert!(
            started.windows(2).all(|w| w[0] <= w[1]),
            "pods started in order: {started:?}"
        );
        let ips: BTreeSet<String> = all
            .iter()
            .map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap())
            .collect();
        assert_eq!(ips.len(), 3, "three distinct pod IPs: {ips:?}");
        // Real pod addresses (each pod in its own network namespace), never loopback.
        assert!(
            ips.iter().all(|ip| ip.starts_with("10.244.")
                && !ip.starts_with("10.244.0.")
                && !ip.parse::<std::net::Ipv4Addr>().unwrap().is_loopback()),
            "pod IPs in the Nodes' pod ranges: {ips:?}"
        );
        let registered = wait_until(
            Duration::from_secs(30),
            "3 znodes in cache_list",
            || async {
                let c = zk
                    .list_children(&format!("/arcus/cache_list/{svc}"))
                    .await
                    .ok()?;
                (c.len() == 3).then_some(c)
            },
        )
        .await?;
        for ip in &ips {
            assert!(
                registered
                    .iter()
                    .any(|z| z.starts_with(&format!("{ip}:11211-mc-"))),
                "{ip} registered: {registered:?}"
            );
            let addr = format!("{ip}:11211");
            assert_eq!(memcached(&addr, "set k 5 0 2\r\nhi\r\n", 1)?, ["STORED"]);
            assert_eq!(
                memcached(&addr, "get k\r\n", 3)?,
                ["VALUE k 5 2", "hi", "END"]
            );
        }
        let zdata = zk
            .get_data(&format!("/arcus/cache_list/{svc}/{}", registered[0]))
            .await?
            .0;
        assert_eq!(String::from_utf8_lossy(&zdata), "32MB");

        // A deleted pod leaves the cluster at once and comes back under the same name.
        let old_uid = pods.get("mc-1").await?.metadata.uid;
        // The old process's znode by its full name (the new pod gets another IP): the new one
        // may register within the polling period, so "no mc-1 at all" might never be seen.
        let old_znode = zk
            .list_children(&format!("/arcus/cache_list/{svc}"))
            .await?
            .into_iter()
            .find(|z| z.ends_with(&format!("-mc-1.{}", ns.name)))
            .expect("mc-1 registered");
        pods.delete("mc-1", &DeleteParams::default()).await?;
        wait_until(Duration::from_secs(30), "mc-1's znode gone", || async {
            let c = zk
                .list_children(&format!("/arcus/cache_list/{svc}"))
                .await
                .ok()?;
            (!c.contains(&old_znode)).then_some(())
        })
        .await?;
        wait_until(
            Duration::from_secs(60),
            "mc-1 recreated, Ready and registered",
            || async {
                let p = pods.get_opt("mc-1").await.ok()??;
                let c = zk
                    .list_children(&format!("/arcus/cache_list/{svc}"))
                    .await
                    .ok()?;
                (p.metadata.uid != old_uid && ready(&p) && c.len() == 3).then_some(())
            },
        )
        .await?;

        // No mapping: the node exits 76 and the pod shows it.
        stss.create(&PostParams::default(), &statefulset("nomap", &ns.name, 1))
            .await?;
        let code = wait_until(Duration::from_secs(60), "nomap-0 to exit 76", || async {
            let p = pods.get_opt("nomap-0").await.ok()??;
            let cs = p.status?.container_statuses?.into_iter().next()?;
            let last = cs
                .last_state
                .and_then(|s| s.terminated)
                .or(cs.state.and_then(|s| s.terminated))?;
            Some(last.exit_code)
        })
        .await?;
        assert_eq!(code, 76, "EX_PROTOCOL when no mapping exists");
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        ns.dump().await;
    }
    let stss: Api<StatefulSet> = ns.api();
    let _ = stss.delete("mc", &DeleteParams::default()).await;
    let _ = stss.delete("nomap", &DeleteParams::default()).await;
    let _ = sandbox;
    let pods: Api<Pod> = ns.api();
    let _ = wait_until(Duration::from_secs(60), "pods gone", || async {
        pods.list(&Default::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
            .map(|_| ())
    })
    .await;
    unmap_all(&zk, &hosts, &svc).await;
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn arcus_statefulset_registers_serves_and_recovers() -> anyhow::Result<()> {
    let sandbox = Sandbox::shared().await?;
    let ns = sandbox.namespace("arcus-sts").await?;
    let result = run(sandbox, &ns).await;
    ns.cleanup().await?;
    result
}
