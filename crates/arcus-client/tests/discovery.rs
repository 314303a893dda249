//! Discovery against a real ZooKeeper and real memcached processes: nodes joining and leaving,
//! ZooKeeper restarting, the session expiring, and the clear failures at connect time.

mod common;

use arcus_client::{AdminClient, ArcusClient, ClientOptions, DiscoveryState, Error};
use common::{wait_ring, Registrar};
use std::time::{Duration, Instant};
use test_support::memcached::Memcached;
use test_support::zk_server::ZkServer;

const RING_WAIT: Duration = Duration::from_secs(10);

fn start_zk() -> anyhow::Result<ZkServer> {
    tokio::task::block_in_place(ZkServer::start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_follows_nodes_joining_and_leaving() -> anyhow::Result<()> {
    let zk = start_zk()?;
    let reg = Registrar::new(&zk.addr(), "svc-membership", Duration::from_secs(10)).await?;
    let mcs: Vec<Memcached> = (0..5)
        .map(|_| Memcached::start(16))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<String> = mcs.iter().map(|m| m.addr()).collect();

    // An existing service code with no node yet: connect works, operations say so.
    let c = ArcusClient::connect(&zk.addr(), "svc-membership", common::opts()).await?;
    assert!(c.ring().is_empty());
    assert_eq!(c.discovery_state(), DiscoveryState::Watching);
    assert!(matches!(c.get("k").await, Err(Error::NoNodes { .. })));

    for a in &addrs[..3] {
        reg.register(a).await?;
    }
    wait_ring(&c, &addrs[..3], RING_WAIT).await?;
    for i in 0..100 {
        c.set(&format!("key:{i}"), "v", 0, 0).await?;
    }

    // Scale 3 -> 5.
    let rings = c.watch_ring();
    reg.register(&addrs[3]).await?;
    reg.register(&addrs[4]).await?;
    wait_ring(&c, &addrs, RING_WAIT).await?;
    assert!(rings.has_changed()?, "watchers see the new ring");
    assert_eq!(c.ring().len(), 5);
    for i in 0..100 {
        let k = format!("key:{i}");
        c.set(&k, "v", 0, 0).await?;
        let owner = c.node_for_key(&k)?;
        let direct = ArcusClient::with_nodes([owner.clone()], common::opts());
        assert!(
            direct.get(&k).await?.is_some(),
            "{k} stored on its ring owner {owner}"
        );
    }

    // A node leaves: it gets no more traffic.
    let gone = addrs[1].clone();
    reg.unregister(&gone).await?;
    let remaining: Vec<String> = addrs.iter().filter(|a| **a != gone).cloned().collect();
    wait_ring(&c, &remaining, RING_WAIT).await?;
    let gone_admin = AdminClient::new(gone.clone());
    let before = gone_admin.stats(None).await?;
    for i in 0..300 {
        let k = format!("after:{i}");
        c.set(&k, "v", 0, 0).await?;
        assert!(c.get(&k).await?.is_some());
    }
    let after = gone_admin.stats(None).await?;
    assert_eq!(before["cmd_set"], after["cmd_set"], "removed node got sets");
    assert_eq!(before["cmd_get"], after["cmd_get"], "removed node got gets");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_zookeeper_restart() -> anyhow::Result<()> {
    let mut zk = start_zk()?;
    let reg = Registrar::new(&zk.addr(), "svc-restart", Duration::from_secs(30)).await?;
    let mcs: Vec<Memcached> = (0..3)
        .map(|_| Memcached::start(16))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<String> = mcs.iter().map(|m| m.addr()).collect();
    reg.register(&addrs[0]).await?;
    reg.register(&addrs[1]).await?;
    let opts = ClientOptions {
        zk_session_timeout: Duration::from_secs(30),
        ..common::opts()
    };
    let c = ArcusClient::connect(&zk.addr(), "svc-restart", opts).await?;
    wait_ring(&c, &addrs[..2], RING_WAIT).await?;
    let session = c.zk_session_id();

    tokio::task::block_in_place(|| zk.stop());
    test_support::wait_until(
        Duration::from_secs(20),
        "client to notice ZooKeeper is gone",
        || async { (c.discovery_state() != DiscoveryState::Watching).then_some(()) },
    )
    .await?;
    // The last ring stays in use while ZooKeeper is away.
    assert_eq!(c.ring().len(), 2);
    c.set("during-outage", "v", 0, 0).await?;

    tokio::task::block_in_place(|| zk.restart())?;
    test_support::wait_until(Duration::from_secs(30), "client to watch again", || async {
        (c.discovery_state() == DiscoveryState::Watching).then_some(())
    })
    .await?;
    assert_eq!(
        c.zk_session_id(),
        session,
        "a quick restart keeps the session"
    );

    // The watch is in place again: changes after the restart reach the ring.
    reg.register(&addrs[2]).await?;
    wait_ring(&c, &addrs, RING_WAIT).await?;
    reg.unregister(&addrs[0]).await?;
    wait_ring(&c, &addrs[1..], RING_WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_a_new_session_after_expiry() -> anyhow::Result<()> {
    let mut zk = start_zk()?;
    let session_timeout = Duration::from_secs(2);
    let reg = Registrar::new(&zk.addr(), "svc-expiry", session_timeout).await?;
    let mcs: Vec<Memcached> = (0..2)
        .map(|_| Memcached::start(16))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<String> = mcs.iter().map(|m| m.addr()).collect();
    reg.register(&addrs[0]).await?;
    let opts = ClientOptions {
        zk_session_timeout: session_timeout,
        ..common::opts()
    };
    let c = ArcusClient::connect(&zk.addr(), "svc-expiry", opts).await?;
    wait_ring(&c, &addrs[..1], RING_WAIT).await?;
    let first_session = c.zk_session_id().expect("watching on a session");

    // ZooKeeper down past the session timeout: the client gives the session up.
    tokio::task::block_in_place(|| zk.stop());
    test_support::wait_until(
        Duration::from_secs(30),
        "client to declare its session over",
        || async { (c.discovery_state() == DiscoveryState::Reconnecting).then_some(()) },
    )
    .await?;
    assert_eq!(c.ring().len(), 1, "last ring kept while reconnecting");
    drop(reg);

    // Back with its data: the old sessions (ours and the registrar's) expire server-side, so
    // the old node's ephemeral znode goes away; a node registered on a new session appears.
    tokio::task::block_in_place(|| zk.restart())?;
    let reg = Registrar::new(&zk.addr(), "svc-expiry", Duration::from_secs(10)).await?;
    reg.register(&addrs[1]).await?;
    wait_ring(&c, &addrs[1..], Duration::from_secs(30)).await?;
    assert_eq!(c.discovery_state(), DiscoveryState::Watching);
    let second_session = c.zk_session_id().expect("watching on a session");
    assert_ne!(first_session, second_session, "a new session");
    c.set("after-expiry", "v", 0, 0).await?;

    // And it keeps watching on the new session.
    reg.register(&addrs[0]).await?;
    wait_ring(&c, &addrs, RING_WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_code_is_a_clear_error() -> anyhow::Result<()> {
    let zk = start_zk()?;
    let _reg = Registrar::new(&zk.addr(), "exists", Duration::from_secs(10)).await?;
    let err = ArcusClient::connect(&zk.addr(), "no-such-svc", common::opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownServiceCode { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-svc") && msg.contains("/arcus/cache_list/no-such-svc"),
        "{msg}"
    );

    for bad in ["", "a/b", "with space", &"x".repeat(129)] {
        let err = ArcusClient::connect(&zk.addr(), bad, common::opts())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_zookeeper_fails_within_the_connect_timeout() -> anyhow::Result<()> {
    // Nobody listening: refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let start = Instant::now();
    let err = ArcusClient::connect(&format!("127.0.0.1:{port}"), "test", common::opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ZkUnreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    // Accepts but never answers: bounded by zk_connect_timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = silent.local_addr()?.to_string();
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            socks.push(s);
        }
    });
    let opts = ClientOptions {
        zk_connect_timeout: Duration::from_secs(2),
        ..common::opts()
    };
    let start = Instant::now();
    let err = ArcusClient::connect(&addr, "test", opts).await.unwrap_err();
    assert!(matches!(err, Error::ZkUnreachable { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    held.abort();

    let err = ArcusClient::connect("", "test", common::opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_) | Error::ZkUnreachable { .. }),
        "{err}"
    );
    Ok(())
}

/// After a ring change a delete also reaches the key's previous owner, where a cache migration
/// may still be copying the key from; a client with the option off leaves the old copy (the
/// window the option closes); a previous owner that is gone does not fail deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_follow_moved_keys_to_their_previous_owner() -> anyhow::Result<()> {
    let zk = start_zk()?;
    let svc = "svc-follow-deletes";
    let reg = Registrar::new(&zk.addr(), svc, Duration::from_secs(10)).await?;
    let mut mcs: Vec<Memcached> = (0..4)
        .map(|_| Memcached::start(16))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<String> = mcs.iter().map(|m| m.addr()).collect();
    for a in &addrs[..3] {
        reg.register(a).await?;
    }
    let follow = ArcusClient::connect(&zk.addr(), svc, common::opts()).await?;
    let plain_opts = ClientOptions {
        delete_previous_owners_for: Duration::ZERO,
        ..common::opts()
    };
    let plain = ArcusClient::connect(&zk.addr(), svc, plain_opts).await?;
    wait_ring(&follow, &addrs[..3], RING_WAIT).await?;
    wait_ring(&plain, &addrs[..3], RING_WAIT).await?;
    let keys: Vec<String> = (0..400).map(|i| format!("fd:{i}")).collect();
    let mut old_owner = std::collections::HashMap::new();
    for k in &keys {
        follow.set(k, "v", 0, 0).await?;
        old_owner.insert(k.clone(), follow.node_for_key(k)?);
    }

    // A fourth node joins; nothing copies the moved keys, so their old copies stay behind.
    reg.register(&addrs[3]).await?;
    wait_ring(&follow, &addrs, RING_WAIT).await?;
    wait_ring(&plain, &addrs, RING_WAIT).await?;
    let moved: Vec<&String> = keys
        .iter()
        .filter(|k| follow.node_for_key(k).ok().as_deref() == Some(addrs[3].as_str()))
        .collect();
    assert!(moved.len() >= 20, "only {} keys moved", moved.len());
    let (by_follow, by_plain) = moved.split_at(moved.len() / 2);
    let on_old_owner = |k: &String| {
        let direct = ArcusClient::with_nodes([old_owner[k].clone()], common::opts());
        let k = k.clone();
        async move { anyhow::Ok(direct.get(&k).await?.is_some()) }
    };
    for k in by_follow {
        assert!(!follow.delete(k).await?, "{k} was never on the new node");
        assert!(
            !on_old_owner(k).await?,
            "{k}: the delete reached its previous owner"
        );
    }
    for k in by_plain {
        assert!(!plain.delete(k).await?);
        assert!(
            on_old_owner(k).await?,
            "{k}: with the option off the old copy stays"
        );
    }

    // A previous owner that left and stopped: deletes of the keys it owned still succeed.
    let gone = addrs[0].clone();
    reg.unregister(&gone).await?;
    let rest: Vec<String> = addrs[1..].to_vec();
    wait_ring(&follow, &rest, RING_WAIT).await?;
    drop(mcs.remove(0));
    let was_on_gone: Vec<&String> = keys
        .iter()
        .filter(|k| old_owner[*k] == gone && !moved.contains(k))
        .collect();
    assert!(!was_on_gone.is_empty());
    for k in &was_on_gone {
        follow.delete(k).await?;
        assert!(follow.get(k).await?.is_none());
    }
    Ok(())
}
