//! The sample application (deploy/samples/application.yaml, crates/arcus-sample) on the
//! sandbox against an operator-managed cluster: the seed's hello spring! / hello arcus! /
//! (after the 10 s TTL) hello spring! sequence, then a 3 → 5 scale while the app keeps
//! answering and its client's ring follows within seconds.

use arcus_operator::crd::ArcusMemcached;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_support::operator::{deploy_operator, undeploy_operator};
use test_support::sandbox::{Sandbox, TestNamespace, ZOOKEEPER};
use test_support::wait_until;
use zookeeper_client as zk;

fn cr(svc: &str, replicas: i32) -> ArcusMemcached {
    serde_json::from_value(json!({
        "apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached",
        "metadata": {"name": "test"},
        "spec": {
            "replicas": replicas, "serviceCode": svc, "zookeeperServers": [ZOOKEEPER],
            "configuration": {"memlimit": 64, "connections": 1000, "threads": 2},
            "image": {"name": "jam2in/arcus-memcached:1.11.7", "pullPolicy": "Always"}
        }
    }))
    .expect("valid CR")
}

/// `GET path` on `addr` → (status, body).
fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP head in {raw:?}"))?;
    Ok((
        head.split(' ').nth(1).unwrap_or_default().parse()?,
        body.to_string(),
    ))
}

fn h1(body: &str) -> &str {
    body.split("<h1>")
        .nth(1)
        .and_then(|r| r.split("</h1>").next())
        .unwrap_or_default()
}

/// Node addresses in the app's `/ring` answer.
fn ring_nodes(body: &str) -> usize {
    body.split("\"nodes\":[")
        .nth(1)
        .map(|n| n.matches(':').count())
        .unwrap_or(0)
}

async fn wait_ready(api: &Api<ArcusMemcached>, want: &str, secs: u64) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(secs),
        &format!("test status.ready == {want}"),
        || async {
            (api.get("test").await.ok()?.status?.ready.as_deref() == Some(want)).then_some(())
        },
    )
    .await
}

async fn run(sandbox: &Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let svc = ns.name.replace('-', "_");
    let crs: Api<ArcusMemcached> = ns.api();
    crs.create(&PostParams::default(), &cr(&svc, 3)).await?;
    wait_ready(&crs, "3/3", 180).await?;

    // The manifest as a user applies it, pointed at this test's service code.
    let manifest = sandbox.repo.join("deploy/samples/application.yaml");
    sandbox.kubectl(&["-n", &ns.name, "apply", "-f", &manifest.to_string_lossy()])?;
    sandbox.kubectl(&[
        "-n",
        &ns.name,
        "set",
        "env",
        "deployment/arcus-application-sample",
        &format!("ARCUS_SERVICE_CODE={svc}"),
    ])?;
    let pods: Api<Pod> = ns.api();
    let addr = wait_until(
        Duration::from_secs(90),
        "a ready arcus-application-sample pod",
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=arcus-application-sample"))
                .await
                .ok()?;
            list.items.iter().find_map(|p| {
                let env = &p.spec.as_ref()?.containers[0].env.as_ref()?;
                let current = env.iter().any(|e| {
                    e.name == "ARCUS_SERVICE_CODE" && e.value.as_deref() == Some(svc.as_str())
                });
                let st = p.status.as_ref()?;
                let ready = st
                    .conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let ip = st.pod_ip.as_ref()?;
                (current && ready).then(|| format!("{ip}:8080"))
            })
        },
    )
    .await?;
    eprintln!("sample app pod at {addr}");
    let ring = |addr: &str| http_get(addr, "/ring").map(|(_, b)| b).unwrap_or_default();
    assert_eq!(ring_nodes(&ring(&addr)), 3, "{}", ring(&addr));

    // As in the seed's post: through the Service's ClusterIP on port 8080 (kube-proxy), once
    // its endpoints are the ready pod of this service code.
    let services: Api<Service> = ns.api();
    let cluster_ip = services
        .get("arcus-application-sample")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap_or_default();
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");
    let addr = format!("{cluster_ip}:8080");
    wait_until(
        Duration::from_secs(60),
        "the Service's ClusterIP reaching the ready pod",
        || async { (ring_nodes(&ring(&addr)) == 3).then_some(()) },
    )
    .await?;
    eprintln!("sample app Service at {addr}");

    // The seed's three requests.
    let (status, first) = http_get(&addr, "/")?;
    let stored_at = Instant::now();
    assert_eq!((status, h1(&first)), (200, "hello spring!"), "{first}");
    let (status, second) = http_get(&addr, "/")?;
    assert_eq!((status, h1(&second)), (200, "hello arcus!"), "{second}");
    wait_until(
        Duration::from_secs(25),
        "hello spring! again after the 10 s TTL",
        || async {
            let (_, body) = http_get(&addr, "/").ok()?;
            (h1(&body) == "hello spring!").then_some(())
        },
    )
    .await?;
    assert!(
        stored_at.elapsed() >= Duration::from_secs(9),
        "item gone after {:?}",
        stored_at.elapsed()
    );

    // Scale 3 -> 5 while requests keep coming.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), addr.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get(&addr, "/") {
                    Ok((200, body)) if ["hello spring!", "hello arcus!"].contains(&h1(&body)) => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    other => {
                        eprintln!("request during scale: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(50)); // request pacing, not a wait
            }
        })
    };
    crs.patch(
        "test",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await?;
    let zk = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(ZOOKEEPER)
        .await?;
    let path = format!("/arcus/cache_list/{svc}");
    wait_until(
        Duration::from_secs(180),
        "5 cache nodes registered in ZooKeeper",
        || async { (zk.list_children(&path).await.ok()?.len() == 5).then_some(()) },
    )
    .await?;
    let registered = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the app's ring to have 5 nodes",
        || async { (ring_nodes(&ring(&addr)) == 5).then_some(()) },
    )
    .await?;
    eprintln!(
        "app ring at 5 nodes {:?} after the 5th registration",
        registered.elapsed()
    );
    wait_ready(&crs, "5/5", 120).await?;
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests during the scale: {ok} ok, {failed} failed");
    assert!(ok > 0);
    assert_eq!(failed, 0, "the app stopped answering during the scale");
    assert_eq!(http_get(&addr, "/healthz")?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sample_app_seed_sequence_and_scale_out() -> anyhow::Result<()> {
    let sandbox = Sandbox::shared().await?;
    let ns = sandbox.namespace("sample").await?;
    let result = match deploy_operator(sandbox, &ns, 1).await {
        Ok(()) => run(sandbox, &ns).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        ns.dump().await;
    }
    // Delete the CR while the operator still runs, so it removes its ZooKeeper state.
    let crs: Api<ArcusMemcached> = ns.api();
    let _ = crs.delete("test", &DeleteParams::default()).await;
    let _ = wait_until(Duration::from_secs(120), "the CR deleted", || async {
        crs.get_opt("test")
            .await
            .ok()
            .filter(Option::is_none)
            .map(|_| ())
    })
    .await;
    undeploy_operator(sandbox, &ns).await;
    ns.cleanup().await?;
    result
}
