//! The admin helper against a real (stock) memcached, by address, without ZooKeeper. ARCUS-only
//! commands must come back as `Unsupported`, not hang or panic.

mod common;

use arcus_client::{AdminClient, ArcusClient, Error, Readiness, ScanOptions};
use std::time::{Duration, Instant};
use test_support::memcached::Memcached;

#[tokio::test]
async fn stats_and_settings() -> anyhow::Result<()> {
    let mc = Memcached::start(32)?;
    let admin = AdminClient::new(mc.addr());
    assert_eq!(admin.addr(), mc.addr());
    let stats = admin.stats(None).await?;
    assert_eq!(stats["limit_maxbytes"], (32u64 * 1024 * 1024).to_string());
    assert!(stats.contains_key("curr_items") && stats.contains_key("get_hits"));
    let settings = admin.stats(Some("settings")).await?;
    assert_eq!(settings["maxbytes"], (32u64 * 1024 * 1024).to_string());
    assert_eq!(settings["tcpport"], mc.port.to_string());
    assert!(admin.version().await?.starts_with("1."));
    // An unknown stats section is the server's error, named.
    let err = admin.stats(Some("nonsense")).await.unwrap_err();
    assert!(err.to_string().contains(&mc.addr()), "{err}");
    // The helper recovers after an error.
    assert!(admin.stats(None).await?.contains_key("pid"));
    Ok(())
}

#[tokio::test]
async fn arcus_only_commands_are_unsupported_on_stock_memcached() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let admin = AdminClient::new(mc.addr());
    assert_eq!(admin.ready().await?, Readiness::Unsupported);
    assert!(!admin.ready().await?.is_ready());
    for r in [
        admin.memlimit().await.map(|_| ()),
        admin.set_memlimit(64).await,
        admin.maxconns().await.map(|_| ()),
        admin.zkensemble_get().await.map(|_| ()),
        admin.zkensemble_set("127.0.0.1:2181").await,
        admin.zkensemble_rejoin().await,
        admin
            .scan_keys("0", &ScanOptions::default())
            .await
            .map(|_| ()),
        admin.flush_prefix("p").await.map(|_| ()),
    ] {
        match r {
            Err(Error::Unsupported { node, .. }) => assert_eq!(node, mc.addr()),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
    // Still usable afterwards.
    assert!(admin.stats(None).await?.contains_key("pid"));
    // Stock memcached refuses `shutdown` unless started with -A.
    let err = admin.shutdown(None).await.unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("shutdown not enabled")),
        "{err}"
    );
    assert!(
        admin.stats(None).await?.contains_key("pid"),
        "still running"
    );
    Ok(())
}

#[tokio::test]
async fn cache_memlimit_changes_the_limit() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let admin = AdminClient::new(mc.addr());
    admin.cache_memlimit(48).await?;
    assert_eq!(
        admin.stats(None).await?["limit_maxbytes"],
        (48u64 * 1024 * 1024).to_string()
    );
    Ok(())
}

#[tokio::test]
async fn metadump_lists_keys_and_flush_all_empties() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let c = ArcusClient::with_nodes([mc.addr()], common::opts());
    c.set("kubernetes:arcus", "hello arcus!", 0, 0).await?;
    c.set("ttl:key", "x", 0, 3600).await?;
    c.set("키", "unicode", 0, 0).await?;
    let admin = AdminClient::new(mc.addr());
    let mut entries = admin.metadump_all().await?;
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["kubernetes:arcus", "ttl:key", "키"]);
    assert_eq!(entries[0].exp, None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let exp = entries[1].exp.expect("ttl:key expires");
    assert!(
        (now + 3500..=now + 3700).contains(&exp),
        "exp {exp} vs now {now}"
    );
    assert!(entries.iter().all(|e| e.size > 0));

    admin.flush_all().await?;
    assert_eq!(c.get("kubernetes:arcus").await?, None);
    Ok(())
}

#[tokio::test]
async fn bad_arguments_are_refused_before_sending() {
    let admin = AdminClient::new("127.0.0.1:1");
    for r in [
        admin.zkensemble_set("").await,
        admin.zkensemble_set("a:1 b:2").await,
        admin.set_config("memlimit", "1 2").await,
        admin
            .scan_keys(
                "0",
                &ScanOptions {
                    count: Some(0),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
        admin
            .scan_keys(
                "0",
                &ScanOptions {
                    count: Some(2001),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
        admin
            .scan_keys(
                "0",
                &ScanOptions {
                    pattern: Some("a b".into()),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
}

#[tokio::test]
async fn unreachable_and_frozen_nodes_fail_in_bounded_time() -> anyhow::Result<()> {
    let err = AdminClient::new("127.0.0.1:1")
        .stats(None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Connect { node, .. } if node == "127.0.0.1:1"),
        "{err}"
    );

    let mc = Memcached::start(16)?;
    let admin = AdminClient::with_timeout(mc.addr(), Duration::from_millis(300));
    assert_eq!(admin.ready().await?, Readiness::Unsupported);
    mc.freeze();
    let start = Instant::now();
    let err = admin.stats(None).await.unwrap_err();
    assert!(
        err.is_timeout() && err.node() == Some(mc.addr().as_str()),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    mc.thaw();
    assert!(admin.stats(None).await?.contains_key("pid"));
    Ok(())
}
