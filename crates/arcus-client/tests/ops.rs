//! Key-value operations against real memcached processes (no ZooKeeper: a fixed node list).

mod common;

use arcus_client::{AdminClient, ArcusClient, ClientOptions, Error, KeyError, StoreStatus};
use std::time::{Duration, Instant};
use test_support::memcached::Memcached;

fn value(item: Option<arcus_client::Item>) -> Option<Vec<u8>> {
    item.map(|i| i.value)
}

#[tokio::test]
async fn storage_commands_and_their_outcomes() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let c = ArcusClient::with_nodes([mc.addr()], common::opts());

    assert_eq!(c.get("k").await?, None);
    assert_eq!(c.set("k", "v1", 42, 0).await?, StoreStatus::Stored);
    let item = c.get("k").await?.expect("stored");
    assert_eq!(
        (item.value.as_slice(), item.flags, item.cas),
        (&b"v1"[..], 42, None)
    );

    assert_eq!(c.add("k", "x", 0, 0).await?, StoreStatus::NotStored);
    assert_eq!(c.add("new", "n", 0, 0).await?, StoreStatus::Stored);
    assert_eq!(
        c.replace("absent", "x", 0, 0).await?,
        StoreStatus::NotStored
    );
    assert_eq!(c.replace("k", "v2", 7, 0).await?, StoreStatus::Stored);
    assert_eq!(c.append("k", "-tail").await?, StoreStatus::Stored);
    assert_eq!(c.prepend("k", "head-").await?, StoreStatus::Stored);
    assert_eq!(c.append("absent", "x").await?, StoreStatus::NotStored);
    let item = c.get("k").await?.unwrap();
    assert_eq!(
        (item.value.as_slice(), item.flags),
        (&b"head-v2-tail"[..], 7)
    );

    // cas: matching unique stores, a stale one is EXISTS, a missing key NOT_FOUND.
    let cas = c
        .gets("k")
        .await?
        .unwrap()
        .cas
        .expect("gets returns a unique");
    assert_eq!(c.cas("k", "v3", 1, 0, cas).await?, StoreStatus::Stored);
    assert_eq!(c.cas("k", "v4", 1, 0, cas).await?, StoreStatus::Exists);
    assert_eq!(
        c.cas("absent", "v", 0, 0, cas).await?,
        StoreStatus::NotFound
    );
    assert_eq!(value(c.get("k").await?), Some(b"v3".to_vec()));

    // incr/decr/delete/touch.
    assert_eq!(c.incr("absent", 1).await?, None);
    c.set("n", "10", 0, 0).await?;
    assert_eq!(c.incr("n", 5).await?, Some(15));
    assert_eq!(c.decr("n", 20).await?, Some(0));
    assert_eq!(c.incr("n", 100).await?, Some(100));
    assert_eq!(c.decr("n", 1).await?, Some(99));
    assert!(
        matches!(c.incr("k", 1).await, Err(Error::Server { .. })),
        "incr of a non-number is a server error"
    );
    // memcached decrements in place, padding the shorter number with a space.
    assert_eq!(value(c.get("n").await?), Some(b"99 ".to_vec()));
    assert!(c.touch("n", 100).await?);
    assert!(!c.touch("absent", 100).await?);
    assert!(c.delete("n").await?);
    assert!(!c.delete("n").await?);
    assert_eq!(c.get("n").await?, None);

    // Binary and empty values survive.
    let bin: Vec<u8> = (0..=255u8).chain(b"\r\nEND\r\n".iter().copied()).collect();
    c.set("bin", &bin, 0, 0).await?;
    assert_eq!(value(c.get("bin").await?), Some(bin));
    c.set("empty", "", 0, 0).await?;
    assert_eq!(value(c.get("empty").await?), Some(Vec::new()));

    // After all that, connections went back to the pool.
    assert!(c.idle_connections(&mc.addr()) >= 1);
    Ok(())
}

#[tokio::test]
async fn exptime_expires_items() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let c = ArcusClient::with_nodes([mc.addr()], common::opts());
    c.set("ttl", "x", 0, 1).await?;
    c.set("ttl-touched", "x", 0, 1).await?;
    assert!(c.touch("ttl-touched", 100).await?);
    test_support::wait_until(
        Duration::from_secs(5),
        "item with exptime 1 to expire",
        || async { c.get("ttl").await.unwrap().is_none().then_some(()) },
    )
    .await?;
    assert!(
        c.get("ttl-touched").await?.is_some(),
        "touch extended the exptime"
    );
    Ok(())
}

#[tokio::test]
async fn multi_get_splits_per_node_and_merges() -> anyhow::Result<()> {
    let nodes = [
        Memcached::start(16)?,
        Memcached::start(16)?,
        Memcached::start(16)?,
    ];
    let addrs: Vec<String> = nodes.iter().map(|m| m.addr()).collect();
    let c = ArcusClient::with_nodes(addrs.clone(), common::opts());
    let keys: Vec<String> = (0..300).map(|i| format!("mk:{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        if i % 3 != 0 {
            c.set(k, format!("v{i}"), i as u32, 0).await?;
        }
    }
    // Each item lives on the node the ring names, and only there.
    for addr in &addrs {
        let one = ArcusClient::with_nodes([addr.clone()], common::opts());
        for (i, k) in keys.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
            let here = one.get(k).await?.is_some();
            assert_eq!(
                here,
                c.node_for_key(k)? == *addr,
                "key {k} (#{i}) on {addr}"
            );
        }
    }
    let mut asked: Vec<&str> = keys.iter().map(String::as_str).collect();
    asked.push("mk:1"); // duplicates are fine
    let got = c.get_multi(&asked).await?;
    assert_eq!(got.len(), 200);
    for (i, k) in keys.iter().enumerate() {
        match got.get(k) {
            Some(item) => assert_eq!(
                (item.value.clone(), item.flags),
                (format!("v{i}").into_bytes(), i as u32)
            ),
            None => assert_eq!(i % 3, 0, "{k} missing"),
        }
    }
    let with_cas = c.gets_multi(&["mk:1", "mk:2", "mk:3"]).await?;
    assert_eq!(with_cas.len(), 2);
    assert!(with_cas.values().all(|i| i.cas.is_some()));
    assert!(c.get_multi(&[]).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn bad_keys_and_values_are_refused_before_sending() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let c = ArcusClient::with_nodes([mc.addr()], common::opts());
    let admin = AdminClient::new(mc.addr());
    let before = admin.stats(None).await?;

    let long = "k".repeat(251);
    let cases: [(&str, KeyError); 5] = [
        ("", KeyError::Empty),
        (&long, KeyError::TooLong { len: 251, max: 250 }),
        (
            "a key",
            KeyError::InvalidByte {
                offset: 1,
                byte: b' ',
            },
        ),
        (
            "line\r\nbreak",
            KeyError::InvalidByte {
                offset: 4,
                byte: b'\r',
            },
        ),
        ("bad@prefix:key", KeyError::InvalidPrefix),
    ];
    for (key, want) in cases {
        for r in [
            c.set(key, "v", 0, 0).await.map(|_| ()),
            c.get(key).await.map(|_| ()),
            c.delete(key).await.map(|_| ()),
            c.incr(key, 1).await.map(|_| ()),
            c.touch(key, 1).await.map(|_| ()),
            c.get_multi(&["fine", key]).await.map(|_| ()),
        ] {
            match r {
                Err(Error::InvalidKey { reason, .. }) => assert_eq!(reason, want, "key {key:?}"),
                other => panic!("key {key:?}: expected InvalidKey, got {other:?}"),
            }
        }
    }
    let err = c.set("", "v", 0, 0).await.unwrap_err();
    assert!(err.to_string().contains("key is empty"), "{err}");

    let max = c.options().max_value_len;
    let err = c.set("big", vec![b'x'; max + 1], 0, 0).await.unwrap_err();
    assert!(
        matches!(err, Error::ValueTooLarge { len, max: m } if len == max + 1 && m == max),
        "{err}"
    );
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("nothing was sent"), "{err}");

    // Nothing reached the server: no command counted.
    let after = admin.stats(None).await?;
    for stat in [
        "cmd_get",
        "cmd_set",
        "cmd_touch",
        "total_items",
        "incr_misses",
        "delete_misses",
    ] {
        assert_eq!(before[stat], after[stat], "{stat}");
    }
    Ok(())
}

#[tokio::test]
async fn largest_value_and_key_fit_stock_memcached() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let c = ArcusClient::with_nodes([mc.addr()], common::opts());
    let key = "k".repeat(250);
    let big = vec![b'v'; c.options().max_value_len];
    assert_eq!(c.set(&key, &big, 0, 0).await?, StoreStatus::Stored);
    assert_eq!(c.get(&key).await?.map(|i| i.value.len()), Some(big.len()));
    Ok(())
}

#[tokio::test]
async fn empty_ring_is_a_clear_error() {
    let c = ArcusClient::with_nodes(Vec::<String>::new(), ClientOptions::default());
    let err = c.get("k").await.unwrap_err();
    assert!(matches!(err, Error::NoNodes { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_node_names_the_node() -> anyhow::Result<()> {
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let c = ArcusClient::with_nodes([addr.clone()], common::opts());
    let err = c.set("k", "v", 0, 0).await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect { node, .. } if *node == addr),
        "{err}"
    );
    assert!(err.to_string().contains(&addr), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_times_out_instead_of_hanging() -> anyhow::Result<()> {
    let frozen = Memcached::start(16)?;
    let healthy = Memcached::start(16)?;
    let c = ArcusClient::with_nodes([frozen.addr(), healthy.addr()], common::opts());
    let key_on = |addr: String| {
        let c = c.clone();
        move || {
            (0..)
                .map(|i| format!("key{i}"))
                .find(|k| c.node_for_key(k).unwrap() == addr)
                .unwrap()
        }
    };
    let frozen_key = key_on(frozen.addr())();
    let healthy_key = key_on(healthy.addr())();
    c.set(&frozen_key, "v", 0, 0).await?; // leaves a pooled connection to the frozen node
    frozen.freeze();

    let timeout = c.options().op_timeout;
    for op in ["get", "set", "multi"] {
        let start = Instant::now();
        let r = match op {
            "get" => c.get(&frozen_key).await.map(|_| ()),
            "set" => c.set(&frozen_key, "v", 0, 0).await.map(|_| ()),
            _ => c.get_multi(&[&healthy_key, &frozen_key]).await.map(|_| ()),
        };
        let took = start.elapsed();
        let err = r.unwrap_err();
        assert!(err.is_timeout(), "{op}: {err}");
        assert_eq!(err.node(), Some(frozen.addr().as_str()), "{op}: {err}");
        assert!(err.to_string().contains(&frozen.addr()), "{err}");
        assert!(took >= timeout && took < timeout * 4, "{op} took {took:?}");
    }
    // The healthy node is unaffected.
    c.set(&healthy_key, "ok", 0, 0).await?;
    assert!(c.get(&healthy_key).await?.is_some());

    frozen.thaw();
    // The timed-out connections were dropped, not reused out of step.
    test_support::wait_until(
        Duration::from_secs(5),
        "frozen node to answer again",
        || async { c.get(&frozen_key).await.ok().flatten() },
    )
    .await?;
    c.set(&frozen_key, "after", 0, 0).await?;
    assert_eq!(value(c.get(&frozen_key).await?), Some(b"after".to_vec()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_a_bounded_pool() -> anyhow::Result<()> {
    let mc = Memcached::start(16)?;
    let opts = ClientOptions {
        max_connections_per_node: 4,
        ..common::opts()
    };
    let c = ArcusClient::with_nodes([mc.addr()], opts);
    // The server's count of open connections, sampled while the tasks run (the sampler's own
    // connection is in the baseline).
    let admin = std::sync::Arc::new(AdminClient::new(mc.addr()));
    let open = |admin: &std::sync::Arc<AdminClient>| {
        let admin = admin.clone();
        async move { anyhow::Ok(admin.stats(None).await?["curr_connections"].parse::<u64>()?) }
    };
    let baseline = open(&admin).await?;
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (running, admin) = (running.clone(), admin.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(open(&admin).await?);
                tokio::time::sleep(Duration::from_millis(1)).await; // the sampling period
            }
            anyhow::Ok(peak)
        })
    };
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let k = format!("t{t}:{i}");
                    c.set(&k, format!("{t}-{i}"), 0, 0).await?;
                    assert_eq!(
                        c.get(&k).await?.map(|i| i.value),
                        Some(format!("{t}-{i}").into_bytes())
                    );
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await??;
    assert!(peak > baseline, "the sampler saw the pool's connections");
    assert!(
        peak - baseline <= 4,
        "{} connections open at once",
        peak - baseline
    );
    assert!(c.idle_connections(&mc.addr()) <= 4);
    Ok(())
}
