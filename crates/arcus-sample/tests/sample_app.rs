//! The sample app as a process against real ZooKeeper and memcached: the seed's
//! spring → arcus → (after the 10 s TTL) spring sequence, the ring growing 3 → 5 while it
//! serves, and a clean exit on SIGTERM.

#[path = "../../arcus-client/tests/common/mod.rs"]
mod common;

use common::Registrar;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};
use test_support::memcached::Memcached;
use test_support::process::{free_port, unique_loopback_ip};
use test_support::zk_server::ZkServer;
use test_support::ChildGuard;

/// `GET path` → (status, body, x-arcus-cache header).
fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String, Option<String>)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no head in {raw:?}"))?;
    let status = head.split(' ').nth(1).unwrap_or_default().parse()?;
    let cache = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Arcus-Cache: "))
        .map(str::to_string);
    Ok((status, body.to_string(), cache))
}

/// Number of nodes in a `/ring` answer.
fn node_count(ring: &str) -> usize {
    ring.split("\"nodes\":[")
        .nth(1)
        .map(|n| n.matches(':').count())
        .unwrap_or(0)
}

fn h1(body: &str) -> &str {
    body.split("<h1>")
        .nth(1)
        .and_then(|r| r.split("</h1>").next())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_sequence_scaling_and_sigterm() -> anyhow::Result<()> {
    let zk = tokio::task::block_in_place(ZkServer::start)?;
    let reg = Registrar::new(&zk.addr(), "test", Duration::from_secs(10)).await?;
    let mcs: Vec<Memcached> = (0..5)
        .map(|_| Memcached::start(16))
        .collect::<anyhow::Result<_>>()?;
    for m in &mcs[..3] {
        reg.register(&m.addr()).await?;
    }

    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    let addr = format!("{ip}:{port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arcus-sample"));
    cmd.env("ARCUS_ADDRESS", zk.addr())
        .env("ARCUS_SERVICE_CODE", "test")
        .env("BIND_ADDRESS", &ip)
        .env("PORT", port.to_string());
    let log = std::env::temp_dir().join(format!("arcus-sample-test-{ip}-{port}.log"));
    let mut app = ChildGuard::spawn("arcus-sample", cmd, &log)?;

    let ring = || get(&addr, "/ring").map(|(_, b, _)| b).unwrap_or_default();
    test_support::wait_until(Duration::from_secs(20), "the app to be healthy", || async {
        matches!(get(&addr, "/healthz"), Ok((200, _, _))).then_some(())
    })
    .await?;
    let body = ring();
    assert!(
        body.contains("\"service_code\":\"test\"") && body.contains("\"state\":\"watching\""),
        "{body}"
    );
    assert_eq!(node_count(&body), 3, "{body}");

    // The seed's sequence: spring, arcus, and after the 10 s TTL spring again.
    let (status, first, cache) = get(&addr, "/")?;
    let stored_at = Instant::now();
    assert_eq!(
        (status, h1(&first), cache.as_deref()),
        (200, "hello spring!", Some("miss"))
    );
    assert!(first.starts_with(
        "<!DOCTYPE html>\n<html>\n<head>\n    <meta charset=\"UTF-8\">\n    <title>ARCUS TEST</title>"
    ));
    let (_, second, cache) = get(&addr, "/")?;
    assert_eq!(
        (h1(&second), cache.as_deref()),
        ("hello arcus!", Some("hit"))
    );
    assert_eq!(
        first.replace("hello spring!", "hello arcus!"),
        second,
        "same page, other message"
    );
    test_support::wait_until(
        Duration::from_secs(20),
        "the cached item to expire",
        || async {
            let (_, body, _) = get(&addr, "/").ok()?;
            (h1(&body) == "hello spring!").then_some(())
        },
    )
    .await?;
    let expired_after = stored_at.elapsed();
    assert!(
        expired_after >= Duration::from_secs(9),
        "expired after {expired_after:?}, TTL is 10 s"
    );

    // Scale 3 -> 5 while it serves.
    reg.register(&mcs[3].addr()).await?;
    reg.register(&mcs[4].addr()).await?;
    test_support::wait_until(
        Duration::from_secs(10),
        "the app's ring to have 5 nodes",
        || async { (node_count(&ring()) == 5).then_some(()) },
    )
    .await?;
    for _ in 0..20 {
        let (status, body, _) = get(&addr, "/")?;
        assert_eq!(status, 200);
        assert!(
            ["hello spring!", "hello arcus!"].contains(&h1(&body)),
            "{body}"
        );
    }
    assert_eq!(get(&addr, "/nope")?.0, 404);

    // SIGTERM: exits 0, promptly.
    app.signal(15);
    test_support::wait_until(
        Duration::from_secs(10),
        "the app to exit after SIGTERM",
        || {
            let st = app.try_wait().ok().flatten();
            async move { st }
        },
    )
    .await
    .and_then(|st| {
        if st.success() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("exit status {st}"))
        }
    })?;
    Ok(())
}
