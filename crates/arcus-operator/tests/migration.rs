//! Migration against real memcached processes (Debian's stock memcached: `lru_crawler
//! metadump` listing, key-value items). Each test starts its own processes; a writer task plays
//! the clients during the migration and records what it did, so the checks can tell a lost key
//! from one a client deleted, and a reverted value from one a client wrote.

use arcus_client::{protocol, ArcusClient, ClientOptions, Item, Ring};
use arcus_operator::migration::{
    keys, Checkpoint, Listing, Migration, MigrationOptions, Progress, ScaleIn, ScaleOut,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_support::memcached::Memcached;
use tokio::sync::RwLock;

/// Bound of any one test step.
const STEP: Duration = Duration::from_secs(120);

fn client(nodes: &[String]) -> ArcusClient {
    ArcusClient::with_nodes(
        nodes.to_vec(),
        ClientOptions {
            op_timeout: Duration::from_secs(5),
            max_key_len: protocol::MEMCACHED_MAX_KEY_LEN,
            ..ClientOptions::default()
        },
    )
}

fn now() -> i64 {
    keys::unix_now()
}

/// xorshift: deterministic "random" numbers without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
struct Loaded {
    value: Vec<u8>,
    flags: u32,
    /// Absolute expiry (our clock), None = never.
    expires: Option<i64>,
}

/// Loads `n` keys with mixed TTLs through `c`: a fifth never expire, a fifth expire after 3 s
/// (during the test), a fifth after 60 s, a fifth after an hour, a fifth in 40 days (an
/// absolute exptime). Random flags, values of 20..120 bytes.
async fn load(c: &ArcusClient, n: usize, seed: u64) -> HashMap<String, Loaded> {
    let mut rng = Rng(seed);
    let t0 = now();
    let items: Vec<(String, Loaded, i64)> = (0..n)
        .map(|i| {
            let key = format!("key:{i}");
            let len = 20 + rng.below(100) as usize;
            let value: Vec<u8> = (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect();
            let flags = rng.next() as u32;
            let (exptime, expires) = match i % 5 {
                0 => (0, None),
                1 => (3, Some(t0 + 3)),
                2 => (60, Some(t0 + 60)),
                3 => (3600, Some(t0 + 3600)),
                _ => (t0 + 40 * 86400, Some(t0 + 40 * 86400)),
            };
            (
                key,
                Loaded {
                    value,
                    flags,
                    expires,
                },
                exptime,
            )
        })
        .collect();
    futures::stream::iter(items.iter())
        .map(|(k, l, e)| async move {
            let r = c.set(k, &l.value, l.flags, *e).await.expect("load set");
            assert!(r.is_stored());
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    items.into_iter().map(|(k, l, _)| (k, l)).collect()
}

/// What the writer did last to a key.
#[derive(Clone, Debug, PartialEq)]
enum LastOp {
    Set(Vec<u8>, u32),
    Delete,
}

/// The clients: writes and deletes through whatever ring `ring` holds now, one at a time, and
/// records the last operation per key. Switching the ring takes the write lock, so no write
/// of the old ring is in flight after the switch (like a client that has seen the change).
struct Writer {
    ring: Arc<RwLock<ArcusClient>>,
    log: Arc<Mutex<HashMap<String, LastOp>>>,
    /// Keys written (set or deleted) before the ring change.
    before_change: Arc<Mutex<std::collections::HashSet<String>>>,
    changed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    fn new(c: ArcusClient) -> Writer {
        Writer {
            ring: Arc::new(RwLock::new(c)),
            log: Arc::default(),
            before_change: Arc::default(),
            changed: Arc::default(),
            stop: Arc::default(),
        }
    }

    /// Runs at most `max_ops` operations over keys `key:0..n` (only those that never expire
    /// or expire in an hour or more, so expiry never blurs the checks) and new keys; after the
    /// ring change, deletes only keys it had not touched before it (deleting a key first
    /// written just before the change is the documented resurrection window; see the
    /// `window` test).
    fn spawn(&self, n: usize, max_ops: usize, seed: u64) -> tokio::task::JoinHandle<usize> {
        let (ring, log, before, changed, stop) = (
            self.ring.clone(),
            self.log.clone(),
            self.before_change.clone(),
            self.changed.clone(),
            self.stop.clone(),
        );
        tokio::spawn(async move {
            let mut rng = Rng(seed);
            let mut ops = 0;
            while ops < max_ops && !stop.load(Ordering::Relaxed) {
                let c = ring.read().await;
                let after = changed.load(Ordering::Relaxed);
                let key = if rng.below(10) == 0 {
                    format!("new:{seed}:{ops}")
                } else {
                    // keys with i % 5 in {0, 3, 4}
                    let i = rng.below(n as u64 / 5) as usize * 5 + [0, 3, 4][rng.below(3) as usize];
                    format!("key:{i}")
                };
                let delete = rng.below(3) == 0
                    && !(after && before.lock().unwrap().contains(&key))
                    && !key.starts_with("new:");
                let op = if delete {
                    c.delete(&key).await.expect("writer delete");
                    LastOp::Delete
                } else {
                    let v = format!("w{seed}-{ops}").into_bytes();
                    let f = rng.next() as u32;
                    assert!(c.set(&key, &v, f, 0).await.expect("writer set").is_stored());
                    LastOp::Set(v, f)
                };
                if !after {
                    before.lock().unwrap().insert(key.clone());
                }
                log.lock().unwrap().insert(key, op);
                drop(c);
                ops += 1;
                tokio::task::yield_now().await;
            }
            ops
        })
    }

    /// The ring change as clients see it.
    async fn switch(&self, c: ArcusClient) {
        let mut g = self.ring.write().await;
        *g = c;
        self.changed.store(true, Ordering::Relaxed);
    }
}

/// Reads every key through `c` in batches.
async fn read_all(c: &ArcusClient, keys: &[String]) -> HashMap<String, Item> {
    let mut out = HashMap::new();
    for chunk in keys.chunks(500) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        out.extend(c.get_multi(&refs).await.expect("read back"));
    }
    out
}

#[derive(Default, Debug)]
struct Verdict {
    checked: usize,
    lost: Vec<String>,
    reverted: Vec<String>,
    resurrected: Vec<String>,
    expired_back: Vec<String>,
}

/// Compares what `c` reads with what was loaded and what the writer did.
async fn verify(
    c: &ArcusClient,
    loaded: &HashMap<String, Loaded>,
    log: &HashMap<String, LastOp>,
) -> Verdict {
    let mut keys: Vec<String> = loaded.keys().cloned().collect();
    keys.extend(log.keys().filter(|k| !loaded.contains_key(*k)).cloned());
    let got = read_all(c, &keys).await;
    let t = now();
    let mut v = Verdict::default();
    for k in &keys {
        let have = got.get(k);
        match (log.get(k), loaded.get(k)) {
            (Some(LastOp::Set(val, flags)), _) => {
                v.checked += 1;
                match have {
                    Some(i) if &i.value == val && i.flags == *flags => {}
                    Some(_) => v.reverted.push(k.clone()),
                    None => v.lost.push(k.clone()),
                }
            }
            (Some(LastOp::Delete), _) => {
                v.checked += 1;
                if have.is_some() {
                    v.resurrected.push(k.clone());
                }
            }
            (None, Some(l)) => match l.expires {
                // Live with a margin: must be there, unchanged.
                e if e.is_none_or(|e| e > t + 2) => {
                    v.checked += 1;
                    match have {
                        Some(i) if i.value == l.value && i.flags == l.flags => {}
                        Some(_) => v.reverted.push(k.clone()),
                        None => v.lost.push(k.clone()),
                    }
                }
                // Expired with a margin: must be gone.
                Some(e) if e < t - 2 => {
                    v.checked += 1;
                    if have.is_some() {
                        v.expired_back.push(k.clone());
                    }
                }
                _ => {}
            },
            (None, None) => {}
        }
    }
    v
}

fn show(v: &[String]) -> String {
    format!("{} {:?}", v.len(), &v[..v.len().min(5)])
}

fn assert_clean(v: &Verdict, what: &str) {
    assert!(v.lost.is_empty(), "{what}: lost {}", show(&v.lost));
    assert!(
        v.reverted.is_empty(),
        "{what}: reverted {}",
        show(&v.reverted)
    );
    assert!(
        v.resurrected.is_empty(),
        "{what}: resurrected {}",
        show(&v.resurrected)
    );
    assert!(
        v.expired_back.is_empty(),
        "{what}: expired came back {}",
        show(&v.expired_back)
    );
}

fn start(n: usize) -> (Vec<Memcached>, Vec<String>) {
    let mcs: Vec<Memcached> = (0..n)
        .map(|_| Memcached::start(64).expect("memcached"))
        .collect();
    let addrs = mcs.iter().map(Memcached::addr).collect();
    (mcs, addrs)
}

/// Waits until every key that expires 3 s after loading has expired on the servers' clocks
/// too, bounded (memcached's clock ticks once a second).
async fn wait_expired(c: &ArcusClient, loaded: &HashMap<String, Loaded>) {
    let short: Vec<String> = loaded
        .iter()
        .filter(|(_, l)| l.expires.is_some_and(|e| e < now() + 10))
        .map(|(k, _)| k.clone())
        .take(200)
        .collect();
    test_support::wait_until(
        Duration::from_secs(15),
        "short-TTL keys to expire",
        || async { read_all(c, &short).await.is_empty().then_some(()) },
    )
    .await
    .unwrap();
}

/// Every key of a stock memcached `node`, listed with `lru_crawler metadump`.
async fn metadump_listing(node: &str) -> Vec<arcus_operator::migration::KeyInfo> {
    keys::enumerate(
        node,
        Listing::Metadump,
        Duration::from_secs(2),
        Duration::from_secs(10),
        &[],
    )
    .await
    .unwrap()
}

fn check_progress(p: &Progress) {
    assert_eq!(p.items_done, p.items_total, "{p:?}");
    assert_eq!(p.items_failed, 0, "{p:?}");
    assert!(p.items_moved > 0 && p.bytes > 0, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_memcached_is_listed_with_metadump() {
    let (_mcs, addrs) = start(1);
    assert_eq!(
        keys::detect_listing(&addrs[0], Duration::from_secs(2))
            .await
            .unwrap(),
        Listing::Metadump
    );
    let c = client(&addrs);
    c.set("a:1", "x", 7, 0).await.unwrap();
    c.set("a:2", "y", 0, 100).await.unwrap();
    let mut listed = metadump_listing(&addrs[0]).await;
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].expiry, keys::Expiry::Never);
    match listed[1].expiry {
        keys::Expiry::At(t) => assert!((t - (now() + 100)).abs() <= 2, "{t}"),
        e => panic!("{e:?}"),
    }
    assert!(listed.iter().all(|k| k.cas.is_some()));
}

/// 5 → 3 with 20,000 keys, stale leftovers on the remaining nodes, a writer during both
/// passes; pass 1, ring change, pass 2 on one object (pass 1's memory used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_5_to_3_loses_nothing_and_resurrects_nothing() {
    let (_mcs, addrs) = start(5);
    let before = Ring::new(addrs.clone());
    let leaving = addrs[3..].to_vec();
    let c_before = client(&addrs);
    let c_after = client(&addrs[..3]);
    let loaded = load(&c_before, 20_000, 1).await;
    // Stale leftovers: old values, on their future owner, of 300 keys the leaving nodes own.
    let mut stale = 0;
    for (k, l) in &loaded {
        if stale < 300 && leaving.iter().any(|n| before.node_for_key(k) == Some(n)) {
            c_after
                .set(k, b"stale-old-value", l.flags ^ 1, 0)
                .await
                .unwrap();
            stale += 1;
        }
    }
    let mut m = ScaleIn::new(before.clone(), &leaving, MigrationOptions::default()).unwrap();
    let progress = m.progress();
    let writer = Writer::new(c_before.clone());
    let task = writer.spawn(20_000, 6_000, 7);

    let cp = tokio::time::timeout(STEP, m.pass1())
        .await
        .unwrap()
        .unwrap();
    assert!(cp.complete);
    assert_eq!(cp.sources.len(), 2);
    assert_eq!(cp.targets.len(), 3);
    // The ring change: clients move to the ring after.
    writer.switch(c_after.clone()).await;
    let p = tokio::time::timeout(STEP, m.pass2())
        .await
        .unwrap()
        .unwrap();
    writer.stop.store(true, Ordering::Relaxed);
    let ops = tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    assert!(ops > 100, "the writer ran {ops} ops");
    check_progress(&p);
    assert_eq!(progress.borrow().items_total, p.items_total);

    wait_expired(&c_after, &loaded).await;
    let log = writer.log.lock().unwrap().clone();
    let v = verify(&c_after, &loaded, &log).await;
    eprintln!("5->3: {} keys checked, writer {ops} ops, {p:?}", v.checked);
    assert!(v.checked > 15_000);
    assert_clean(&v, "5->3");
}

/// 5 → 3 where the operator restarts between the ring change and pass 2: pass 2 runs on a new
/// object from the saved checkpoint only (the watermark rules, no memory of pass 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_resumes_from_the_checkpoint_alone() {
    let (_mcs, addrs) = start(5);
    let before = Ring::new(addrs.clone());
    let leaving = addrs[3..].to_vec();
    let c_before = client(&addrs);
    let c_after = client(&addrs[..3]);
    let loaded = load(&c_before, 8_000, 2).await;
    let writer = Writer::new(c_before.clone());
    let task = writer.spawn(8_000, 3_000, 11);
    let mut first = ScaleIn::new(before.clone(), &leaving, MigrationOptions::default()).unwrap();
    let cp = tokio::time::timeout(STEP, first.pass1())
        .await
        .unwrap()
        .unwrap();
    // Pass 1 again (as after a restart before the change): converges, copies little.
    let cp = {
        let mut again =
            ScaleIn::new(before.clone(), &leaving, MigrationOptions::default()).unwrap();
        let cp2 = tokio::time::timeout(STEP, again.pass1())
            .await
            .unwrap()
            .unwrap();
        assert!(cp2.sources[&leaving[0]].cas > cp.sources[&leaving[0]].cas);
        cp2
    };
    drop(first);
    // The checkpoint goes through the CR status as JSON.
    let saved = serde_json::to_string(&cp).unwrap();
    writer.switch(c_after.clone()).await;
    let cp: Checkpoint = serde_json::from_str(&saved).unwrap();
    let mut resumed = ScaleIn::resume(before, &leaving, cp, MigrationOptions::default()).unwrap();
    let p = tokio::time::timeout(STEP, resumed.pass2())
        .await
        .unwrap()
        .unwrap();
    writer.stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    assert_eq!(p.items_failed, 0, "{p:?}");
    // Twice is the same as once.
    let p2 = tokio::time::timeout(STEP, resumed.pass2())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        p2.items_moved, p.items_moved,
        "a second pass 2 copied more: {p2:?}"
    );

    wait_expired(&c_after, &loaded).await;
    let log = writer.log.lock().unwrap().clone();
    let v = verify(&c_after, &loaded, &log).await;
    assert!(v.checked > 6_000);
    assert_clean(&v, "5->3 resumed");
}

/// 3 → 5 after the new nodes joined (add-only copy), with a writer from the moment they
/// joined. Keys no client touched all arrive; client writes are never reverted; a key a client
/// deleted on a new node before the copy reached it may come back (the documented window), and
/// only such keys. The moved items are removed from their old owners. Copy rounds run until
/// one moves nothing, as the operator runs them: stock memcached's LRU crawler can skip an
/// item under load, and a later round's listing finds it (seen once in CI with one round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_3_to_5_after_join() {
    let (_mcs, addrs) = start(5);
    let before = Ring::new(addrs[..3].to_vec());
    let after = Ring::new(addrs.clone());
    let c_before = client(&addrs[..3]);
    let c_after = client(&addrs);
    let loaded = load(&c_before, 20_000, 3).await;
    let opts = MigrationOptions {
        delete_moved_from_sources: true,
        ..MigrationOptions::default()
    };
    // Joined: clients use the ring after from now on.
    let writer = Writer::new(c_after.clone());
    writer.changed.store(true, Ordering::Relaxed);
    let task = writer.spawn(20_000, 4_000, 5);
    let m = ScaleOut::new(before.clone(), &addrs[3..], opts.clone()).unwrap();
    let p = tokio::time::timeout(STEP, m.copy()).await.unwrap().unwrap();
    for _ in 2..=3 {
        let again = ScaleOut::new(before.clone(), &addrs[3..], opts.clone()).unwrap();
        let more = tokio::time::timeout(STEP, again.copy())
            .await
            .unwrap()
            .unwrap();
        if more.items_moved == 0 {
            break;
        }
    }
    writer.stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    check_progress(&p);
    assert!(p.source_items_deleted > 0, "{p:?}");

    wait_expired(&c_after, &loaded).await;
    let log = writer.log.lock().unwrap().clone();
    let mut v = verify(&c_after, &loaded, &log).await;
    eprintln!(
        "3->5: {} checked, {} resurrected by the window, {p:?}",
        v.checked,
        v.resurrected.len()
    );
    // Only moved keys can come back, and only ones the writer deleted.
    for k in &v.resurrected {
        assert_ne!(
            before.node_for_key(k),
            after.node_for_key(k),
            "{k} did not move"
        );
    }
    v.resurrected.clear();
    assert!(v.checked > 15_000);
    assert_clean(&v, "3->5");
    // Moved items are gone from their old owners.
    let moved: Vec<String> = loaded
        .keys()
        .filter(|k| before.node_for_key(k) != after.node_for_key(k))
        .take(500)
        .cloned()
        .collect();
    for old in &addrs[..3] {
        let direct = client(std::slice::from_ref(old));
        let left = read_all(&direct, &moved).await;
        assert!(left.is_empty(), "{} moved keys still on {old}", left.len());
    }
}

/// 3 → 5 in two passes: the new nodes are kept out of the ring during pass 1. Deleting
/// original keys after the join resurrects nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_3_to_5_two_pass() {
    let (_mcs, addrs) = start(5);
    let before = Ring::new(addrs[..3].to_vec());
    let c_before = client(&addrs[..3]);
    let c_after = client(&addrs);
    let loaded = load(&c_before, 10_000, 4).await;
    let mut m = ScaleOut::new(before, &addrs[3..], MigrationOptions::default()).unwrap();
    let writer = Writer::new(c_before.clone());
    let task = writer.spawn(10_000, 3_000, 13);
    tokio::time::timeout(STEP, m.pass1())
        .await
        .unwrap()
        .unwrap();
    writer.switch(c_after.clone()).await;
    let p = tokio::time::timeout(STEP, m.pass2())
        .await
        .unwrap()
        .unwrap();
    writer.stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    check_progress(&p);
    wait_expired(&c_after, &loaded).await;
    let log = writer.log.lock().unwrap().clone();
    let v = verify(&c_after, &loaded, &log).await;
    assert!(v.checked > 7_000);
    assert_clean(&v, "3->5 two-pass");
}

/// The operator's fill of a held node: pass 1, the ring change, pass 2's first run, then the
/// run that also deletes the moved items from their old owners — run twice, as a retried batch
/// or a key the listing returns twice runs it. The second must not take "gone from the old
/// owner" for a client's delete: that deleted the only copy (1 key of 1,000,000 lost at
/// 16→32 before `rules::decide_cleaning`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_run_repeated_loses_nothing() {
    let (_mcs, addrs) = start(4);
    let before = Ring::new(addrs[..3].to_vec());
    let c_after = client(&addrs);
    let loaded = load(&client(&addrs[..3]), 6_000, 21).await;
    let mut m = ScaleOut::new(before.clone(), &addrs[3..], MigrationOptions::default()).unwrap();
    let cp = tokio::time::timeout(STEP, m.pass1())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(STEP, m.migration().pass2(&cp))
        .await
        .unwrap()
        .unwrap();
    let cleaning = MigrationOptions {
        delete_moved_from_sources: true,
        ..MigrationOptions::default()
    };
    let mut cleaned = 0;
    for run in 1..=2 {
        let again = ScaleOut::new(before.clone(), &addrs[3..], cleaning.clone()).unwrap();
        let p = tokio::time::timeout(STEP, again.migration().pass2(&cp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            p.items_deleted, 0,
            "cleanup run {run} deleted copies: {p:?}"
        );
        cleaned += p.source_items_deleted;
    }
    let after = m.ring_after().clone();
    let moved = loaded
        .keys()
        .filter(|k| after.node_for_key(k) == Some(addrs[3].as_str()))
        .count();
    assert!(
        cleaned >= moved as u64 / 2,
        "{cleaned} of {moved} cleaned up"
    );
    wait_expired(&c_after, &loaded).await;
    let v = verify(&c_after, &loaded, &HashMap::new()).await;
    assert!(v.checked > 4_000);
    assert_clean(&v, "the cleanup run twice");
}

/// The window between pass 1 and pass 2, and what closes it: a key first written on a leaving
/// node after pass 1's listing, then deleted by a client on its new owner before pass 2. A
/// client that moved to the new ring sends that delete to the leaving node too
/// (`delete_previous_owners_for`, on by default), so pass 2 finds nothing to copy; a client
/// with it off shows what happens otherwise: no tombstone tells "deleted" from "not copied
/// yet", and the key comes back. A key pass 1 had copied stays deleted either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_key_written_after_pass1_then_deleted() {
    let (_mcs, addrs) = start(2);
    let before = Ring::new(addrs.clone());
    let leaving = vec![addrs[1].clone()];
    let following = client(&addrs);
    let not_following = ArcusClient::with_nodes(
        addrs[..1].to_vec(),
        ClientOptions {
            delete_previous_owners_for: Duration::ZERO,
            ..following.options().clone()
        },
    );
    let owned: Vec<String> = (0..)
        .map(|i| format!("w:{i}"))
        .filter(|k| before.node_for_key(k) == Some(addrs[1].as_str()))
        .take(3)
        .collect();
    following.set(&owned[0], "copied", 0, 0).await.unwrap();
    let mut m = ScaleIn::new(before, &leaving, MigrationOptions::default()).unwrap();
    m.pass1().await.unwrap();
    following.set(&owned[1], "late", 0, 0).await.unwrap();
    following.set(&owned[2], "late", 0, 0).await.unwrap();
    // The ring change; clients delete on the new owner before pass 2.
    following.set_nodes(addrs[..1].to_vec());
    assert!(following.delete(&owned[0]).await.unwrap());
    assert!(!following.delete(&owned[1]).await.unwrap());
    assert!(!not_following.delete(&owned[2]).await.unwrap());
    let p = m.pass2().await.unwrap();
    assert_eq!(following.get(&owned[0]).await.unwrap(), None);
    assert_eq!(
        following.get(&owned[1]).await.unwrap(),
        None,
        "the delete reached the leaving node: nothing to resurrect"
    );
    assert!(
        following.get(&owned[2]).await.unwrap().is_some(),
        "without the follow-up delete the late key comes back"
    );
    // The copied key's delete reached both nodes: pass 2 finds it on neither (no listing
    // shows it), so it is not counted "kept deleted".
    assert_eq!(p.items_skipped_deleted, 0, "{p:?}");
}

/// A client's delete that follows a key to a former owner can remove pass 1's copy from its
/// target before the ring change (a node held out of the ring was its owner for the
/// milliseconds it was registered). A key written again on its source after that must still
/// reach the target in pass 2, not be taken for one a client deleted after the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_deleted_on_its_target_before_the_change_is_copied_again() {
    let (_mcs, addrs) = start(2);
    let after = Ring::new(addrs.clone());
    let on_old = client(&addrs[..1]);
    let on_new = client(&addrs[1..]);
    let keys: Vec<String> = (0..)
        .map(|i| format!("f:{i}"))
        .filter(|k| after.node_for_key(k) == Some(addrs[1].as_str()))
        .take(2)
        .collect();
    for k in &keys {
        on_old.set(k, "old", 0, 0).await.unwrap();
    }
    let mut m = ScaleOut::new(
        Ring::new(addrs[..1].to_vec()),
        &addrs[1..],
        MigrationOptions::default(),
    )
    .unwrap();
    m.pass1().await.unwrap();
    // Deletes that reach both the owner and the node being filled; one key is written again.
    for k in &keys {
        assert!(on_old.delete(k).await.unwrap());
        assert!(on_new.delete(k).await.unwrap(), "{k}: pass 1 had copied it");
    }
    on_old.set(&keys[0], "new", 0, 0).await.unwrap();
    // The recheck lists the source again (pass 1's memory is a filter, not a list): it finds
    // the copy of the key still on its source gone; the other key is gone from both.
    assert_eq!(m.migration().recheck_copies().await.unwrap(), 1);
    // The new node joins the ring.
    let p = m.pass2().await.unwrap();
    let c_after = client(&addrs);
    assert_eq!(
        c_after.get(&keys[0]).await.unwrap().map(|i| i.value),
        Some(b"new".to_vec()),
        "the write after the delete arrived: {p:?}"
    );
    assert_eq!(
        c_after.get(&keys[1]).await.unwrap(),
        None,
        "the deleted key stays deleted"
    );
}

/// Migration's building blocks on a real server: the watermark grows with every store, and the
/// compare-and-delete (`cas` with a 1970 exptime) deletes only an unchanged item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_and_compare_and_delete() {
    let (_mcs, addrs) = start(2);
    let m = Migration::new(
        Ring::new(addrs.clone()),
        Ring::new(addrs[..1].to_vec()),
        MigrationOptions::default(),
    )
    .unwrap();
    let w1 = m.watermark(&addrs[0]).await.unwrap();
    let c = client(&addrs[..1]);
    c.set("k:1", "v", 0, 0).await.unwrap();
    let item = c.gets("k:1").await.unwrap().unwrap();
    let w2 = m.watermark(&addrs[0]).await.unwrap();
    assert!(w1.cas < item.cas.unwrap() && item.cas.unwrap() < w2.cas);
    assert_eq!(w1.pid, w2.pid);
    assert_eq!(w1.process_started, w2.process_started);
    let del = arcus_operator::migration::EXPIRED_EXPTIME;
    // Changed since read: refused.
    c.set("k:1", "v2", 0, 0).await.unwrap();
    let r = c.cas("k:1", "", 0, del, item.cas.unwrap()).await.unwrap();
    assert_eq!(r, arcus_client::StoreStatus::Exists);
    let item = c.gets("k:1").await.unwrap().unwrap();
    let r = c.cas("k:1", "", 0, del, item.cas.unwrap()).await.unwrap();
    assert!(r.is_stored());
    assert_eq!(c.get("k:1").await.unwrap(), None);
    // And the key can be added again.
    assert!(c.add("k:1", "v3", 0, 0).await.unwrap().is_stored());
}

/// stock memcached's metadump read in batches: every key once, batches no larger than asked,
/// `None` after `END` (and again after that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadump_is_read_in_batches() {
    let (_mcs, addrs) = start(1);
    let c = client(&addrs);
    let keys: Vec<String> = (0..2_500).map(|i| format!("dump:{i}")).collect();
    futures::stream::iter(keys.iter())
        .map(|k| async { c.set(k, "v", 0, 0).await.unwrap() })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let admin = arcus_client::AdminClient::with_timeout(&addrs[0], Duration::from_secs(10));
    let mut dump = admin.metadump_stream().await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut batches = 0;
    while let Some(batch) = dump.next_batch(1_000).await.unwrap() {
        assert!(batch.len() <= 1_000, "a batch of {}", batch.len());
        batches += 1;
        for e in batch {
            assert!(seen.insert(e.key.clone()), "{} listed twice", e.key);
        }
    }
    assert!(dump.next_batch(1_000).await.unwrap().is_none());
    assert!(batches >= 3, "{batches} batches");
    assert!(
        keys.iter().all(|k| seen.contains(k)),
        "{} of 2500",
        seen.len()
    );
    // The crawler is free again: a new dump starts (no BUSY).
    assert!(admin.metadump_stream().await.is_ok());
}

/// 3 → 2 with listings of 250 keys a chunk (20 times fewer than the keys moving) and a writer:
/// pass 1 copies every key across chunks; then the operator "restarts" after the ring change
/// and a fresh object resumes pass 2 from the saved checkpoint alone: nothing lost, reverted
/// or resurrected, and a second pass 2 copies nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_listings_copy_everything_and_resume_from_the_checkpoint() {
    let (_mcs, addrs) = start(3);
    let before = Ring::new(addrs.clone());
    let leaving = addrs[2..].to_vec();
    let c_before = client(&addrs);
    let c_after = client(&addrs[..2]);
    let loaded = load(&c_before, 18_000, 5).await;
    let on_leaving = loaded
        .keys()
        .filter(|k| before.node_for_key(k) == Some(leaving[0].as_str()))
        .count();
    let opts = MigrationOptions {
        list_chunk: 250,
        batch: 40,
        ..MigrationOptions::default()
    };
    let writer = Writer::new(c_before.clone());
    let task = writer.spawn(18_000, 3_000, 13);
    let mut first = ScaleIn::new(before.clone(), &leaving, opts.clone()).unwrap();
    let cp = tokio::time::timeout(STEP, first.pass1())
        .await
        .unwrap()
        .unwrap();
    let p1 = first.progress().borrow().clone();
    // Every live key of the leaving node was stored (some expire during the test).
    assert!(
        p1.items_moved + p1.items_skipped_expired + p1.items_unchanged
            >= on_leaving as u64 * 9 / 10,
        "{on_leaving} on the leaving node, pass 1: {p1:?}"
    );
    assert!(
        on_leaving > 20 * 250,
        "{on_leaving} keys: more than 20 chunks"
    );
    let saved = serde_json::to_string(&cp).unwrap();
    drop(first);
    writer.switch(c_after.clone()).await;
    let cp: Checkpoint = serde_json::from_str(&saved).unwrap();
    let mut resumed = ScaleIn::resume(before, &leaving, cp, opts).unwrap();
    let p = tokio::time::timeout(STEP, resumed.pass2())
        .await
        .unwrap()
        .unwrap();
    writer.stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    assert_eq!(p.items_failed, 0, "{p:?}");
    let p2 = tokio::time::timeout(STEP, resumed.pass2())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        p2.items_moved, p.items_moved,
        "a second pass 2 copied more: {p2:?}"
    );
    wait_expired(&c_after, &loaded).await;
    let log = writer.log.lock().unwrap().clone();
    let v = verify(&c_after, &loaded, &log).await;
    assert!(v.checked > 12_000, "{} checked", v.checked);
    assert_clean(&v, "3->2 chunked, resumed");
}

/// The heal of a node that kept serving while out of the ring (its ZooKeeper session expired
/// with zkfailstop off): clients wrote some of its keys to the others meanwhile. Pass 1 brings
/// those newer values in, and pass 2 keeps the node's own items that no other node has
/// (`Checkpoint::kept`); without it the sweep took them for copies of deleted items and dropped
/// them (17,517 of 30,000 keys lost after a ZooKeeper outage during a 3→5 scale-out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_node_keeps_its_own_items() {
    let (_mcs, addrs) = start(4);
    let healed = addrs[3].clone();
    let c_all = client(&addrs);
    let c_without = client(&addrs[..3]);
    let n = 4_000;
    for i in 0..n {
        c_all
            .set(&format!("h:{i}"), format!("old-{i}"), 0, 0)
            .await
            .unwrap();
    }
    // The node is out of the ring: clients rewrite every tenth key, wherever the ring without
    // it puts the key.
    let rewritten: Vec<usize> = (0..n).step_by(10).collect();
    for &i in &rewritten {
        c_without
            .set(&format!("h:{i}"), format!("new-{i}"), 0, 0)
            .await
            .unwrap();
    }
    let own = (0..n)
        .filter(|i| c_all.node_for_key(&format!("h:{i}")).unwrap() == healed)
        .count();
    assert!(own > n / 8, "the healed node owns {own} keys");

    let mut m = ScaleOut::new(
        Ring::new(addrs[..3].to_vec()),
        std::slice::from_ref(&healed),
        MigrationOptions::default(),
    )
    .unwrap();
    let kept = m.migration().watermark(&healed).await.unwrap().cas;
    let mut cp = tokio::time::timeout(STEP, m.pass1())
        .await
        .unwrap()
        .unwrap();
    cp.kept.insert(healed.clone(), kept);
    tokio::time::timeout(STEP, m.migration().pass2(&cp))
        .await
        .unwrap()
        .unwrap();

    let mut wrong = Vec::new();
    for i in 0..n {
        let want = if i % 10 == 0 {
            format!("new-{i}")
        } else {
            format!("old-{i}")
        };
        let got = c_all.get(&format!("h:{i}")).await.unwrap();
        if got.as_ref().map(|g| g.value.as_slice()) != Some(want.as_bytes()) {
            wrong.push(format!(
                "h:{i}: {:?}",
                got.map(|g| String::from_utf8_lossy(&g.value).into_owned())
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} keys wrong after the heal ({own} owned by it): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// A joining node that was briefly in the ring holds clients' writes for keys it owned only in
/// that ring (another joining node, held out then, owns them in the final one). The large-cluster
/// benchmark lost one such write: only the keys the node owns in `before` + it were given back.
/// `return_strays` gives back every item, to its owner on `before`, unless the owner stored the
/// key after its mark, and leaves the node empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strays_on_a_node_briefly_in_the_ring_all_go_to_their_owners() {
    const KEYS: u32 = 2_000;
    let (_mcs, addrs) = start(3);
    let (before, stray_node) = (addrs[..2].to_vec(), addrs[2].clone());
    let owners = client(&before);
    for i in 0..KEYS {
        owners.set(&format!("s:{i}"), "old", 0, 0).await.unwrap();
    }
    let stray = client(std::slice::from_ref(&stray_node));
    for i in 0..KEYS {
        stray.set(&format!("s:{i}"), "stray", 0, 0).await.unwrap();
    }
    let ring = Ring::new(before.clone());
    let m = Migration::new(ring.clone(), ring, MigrationOptions::default()).unwrap();
    let mut marks = std::collections::BTreeMap::new();
    for n in &before {
        marks.insert(n.clone(), m.watermark(n).await.unwrap().cas);
    }
    // Written on its owner after the marks: by a client that had left the node: it wins.
    owners.set("s:7", "newer", 0, 0).await.unwrap();
    let p = m
        .return_strays(std::slice::from_ref(&stray_node), &marks)
        .await
        .unwrap();
    let mut wrong = Vec::new();
    for i in 0..KEYS {
        let k = format!("s:{i}");
        let want: &[u8] = if i == 7 { b"newer" } else { b"stray" };
        let got = owners.get(&k).await.unwrap().map(|it| it.value);
        if got.as_deref() != Some(want) {
            wrong.push((k, got));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} keys not given back right, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    assert_eq!(p.items_moved, u64::from(KEYS) - 1, "{p:?}");
    let left = metadump_listing(&stray_node).await;
    assert!(left.is_empty(), "{} items left on the node", left.len());
}
