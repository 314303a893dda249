//! A large cluster on the sandbox (issue 13): one ArcusMemcached of 16 stand-in nodes holding
//! 1,000,000 keys is scaled to 32 nodes and back to 16 while a bounded client reads, overwrites
//! and deletes keys; then every key is read back (0 lost). Prints the time of each phase, the
//! copies' rates (from `status.migration`, sampled every 100 ms, beside the ring's size read
//! from ZooKeeper), and the operator's peak RSS. Too long for CI: `#[ignore]`, run by
//! `scripts/bench-cluster` (`--from/--to/--keys` set `BENCH_FROM`/`BENCH_TO`/`BENCH_KEYS`).

mod common;

use common::*;
use futures::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_support::wait_until;

/// 100-byte values, as `scripts/bench-migration` uses.
const VALUE_LEN: usize = 100;
/// The client load during each scale: at most this many operations (and stopped at its end).
const WRITER_OPS: u64 = 300_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(i: usize) -> String {
    format!("k:{i}")
}

fn value(i: usize) -> String {
    format!("{i:0>VALUE_LEN$}")
}

/// One sample of the timeline: ms since the start, nodes in `cache_list`, the copy's progress.
#[derive(Clone, Debug)]
struct Sample {
    ms: u128,
    ring: usize,
    /// (operation, phase, items moved, items to move) of `status.migration`.
    migration: Option<(String, String, i64, i64)>,
}

/// Samples the ring size and `status.migration` every 100 ms until stopped (at most 2 hours).
fn record_timeline(
    crs: Api<kube::api::DynamicObject>,
    name: &'static str,
    svc: String,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let zk = zk_client().await.expect("ZooKeeper for the timeline");
        let mut out = Vec::new();
        for _ in 0..72_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let ring = children(&zk, &format!("/arcus/cache_list/{svc}"))
                .await
                .len();
            let migration = crs.get(name).await.ok().and_then(|cr| {
                let m = cr.data.get("status")?.get("migration")?.clone();
                Some((
                    m.get("operation")?.as_str()?.to_string(),
                    m.get("phase")?.as_str()?.to_string(),
                    m.get("itemsMoved").and_then(|v| v.as_i64()).unwrap_or(0),
                    m.get("itemsToMove").and_then(|v| v.as_i64()).unwrap_or(0),
                ))
            });
            out.push(Sample {
                ms: start.elapsed().as_millis(),
                ring,
                migration,
            });
            tokio::time::sleep(Duration::from_millis(100)).await; // the sampling period
        }
        out
    })
}

/// The copies seen in `samples` between `from_ms` and `to_ms`: one line per run of the same
/// (operation, phase), with its duration, its items and its rate, and the ring size at its end.
fn copy_segments(samples: &[Sample], from_ms: u128, to_ms: u128) -> Vec<String> {
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.ms >= from_ms && s.ms <= to_ms)
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < window.len() {
        let Some((op, phase, _, _)) = window[i].migration.clone() else {
            i += 1;
            continue;
        };
        let same = |s: &Sample| {
            s.migration
                .as_ref()
                .is_some_and(|m| m.0 == op && m.1 == phase)
        };
        let mut j = i;
        while j + 1 < window.len() && same(window[j + 1]) {
            j += 1;
        }
        let (first, last) = (window[i], window[j]);
        let moved = last.migration.as_ref().map_or(0, |m| m.2);
        let to_move = last.migration.as_ref().map_or(0, |m| m.3);
        let secs = ((last.ms - first.ms) as f64 / 1000.0).max(0.1);
        if phase != "Done" {
            out.push(format!(
                "{op} {phase}: {:.1}–{:.1} s ({secs:.1} s), {moved}/{to_move} items, {:.0} items/s, ring {}→{}",
                first.ms as f64 / 1000.0,
                last.ms as f64 / 1000.0,
                moved as f64 / secs,
                first.ring,
                last.ring
            ));
        }
        i = j + 1;
    }
    out
}

/// The times (s since the start) at which the ring size changed in the window.
fn ring_changes(samples: &[Sample], from_ms: u128, to_ms: u128) -> Vec<(f64, usize)> {
    let mut out: Vec<(f64, usize)> = Vec::new();
    for s in samples.iter().filter(|s| s.ms >= from_ms && s.ms <= to_ms) {
        if out.last().is_none_or(|(_, n)| *n != s.ring) {
            out.push((s.ms as f64 / 1000.0, s.ring));
        }
    }
    out
}

/// What the client load did: the keys it changed (None: deleted) and those whose last
/// operation failed (their state is unknown, so they are not checked).
#[derive(Default)]
struct Load {
    changed: HashMap<usize, Option<String>>,
    unknown: HashSet<usize>,
    ops: u64,
    gets: u64,
    /// Gets of keys that should be there and were not (hits lost while the ring changed).
    misses: u64,
    errors: u64,
}

/// The client load during a scale: gets, sets and deletes of random keys, 1 in 3 each, paced
/// (2 ms between operations), at most `WRITER_OPS`, until `stop`.
fn client_load(
    client: Arc<arcus_client::ArcusClient>,
    keys: usize,
    seed: usize,
    before: Arc<Mutex<HashMap<usize, Option<String>>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Load> {
    tokio::spawn(async move {
        let mut load = Load::default();
        let mut n = seed;
        while !stop.load(Ordering::Relaxed) && load.ops < WRITER_OPS {
            n = (n * 1_103_515_245 + 12_345) % 2_147_483_648;
            let i = n % keys;
            let expect = match load.changed.get(&i) {
                Some(v) => v.clone(),
                None => before
                    .lock()
                    .unwrap()
                    .get(&i)
                    .cloned()
                    .unwrap_or(Some(value(i))),
            };
            let ok = match n % 3 {
                0 => client.delete(&key(i)).await.map(|_| Some(None)),
                1 => {
                    let v = format!("w{seed}-{}-{i}", load.ops);
                    client.set(&key(i), &v, 0, 0).await.map(|_| Some(Some(v)))
                }
                _ => client.get(&key(i)).await.map(|got| {
                    load.gets += 1;
                    load.misses += u64::from(got.is_none() && expect.is_some());
                    None
                }),
            };
            match ok {
                Ok(Some(state)) => {
                    load.unknown.remove(&i);
                    load.changed.insert(i, state);
                }
                Ok(None) => {}
                Err(_) => {
                    load.errors += 1;
                    if n % 3 != 2 {
                        load.unknown.insert(i);
                    }
                }
            }
            load.ops += 1;
            tokio::time::sleep(Duration::from_millis(2)).await; // the load's pace, not a wait
        }
        load
    })
}

/// Reads every key back, 64 in flight: (lost, resurrected) against `expected` (the loaded
/// value unless changed; None: deleted), skipping `unknown`; prints a few wrong keys.
async fn read_back(
    client: &Arc<arcus_client::ArcusClient>,
    keys: usize,
    expected: &HashMap<usize, Option<String>>,
    unknown: &HashSet<usize>,
) -> anyhow::Result<(usize, usize)> {
    let results: Vec<anyhow::Result<(usize, Option<Vec<u8>>)>> =
        futures::stream::iter((0..keys).filter(|i| !unknown.contains(i)))
            .map(|i| {
                let c = client.clone();
                async move {
                    let got = common::get_retrying(&c, &key(i)).await?;
                    Ok((i, got.map(|g| g.value)))
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
    let (mut lost, mut resurrected, mut wrong) = (0, 0, Vec::new());
    for r in results {
        let (i, got) = r?;
        let want = expected.get(&i).cloned().unwrap_or_else(|| Some(value(i)));
        let bad = got.as_deref() != want.as_deref().map(str::as_bytes);
        match &want {
            Some(_) => lost += usize::from(bad),
            None => resurrected += usize::from(bad),
        }
        if bad && wrong.len() < 5 {
            let got = got.map(|g| String::from_utf8_lossy(&g).into_owned());
            wrong.push((i, format!("k:{i}: want {want:?}, got {got:?}")));
        }
    }
    if !wrong.is_empty() {
        eprintln!("wrong keys:");
        for (i, w) in &wrong {
            eprintln!("  {w}; on the nodes: {:?}", holders(client, &key(*i)).await);
        }
    }
    Ok((lost, resurrected))
}

/// What every node of the client's ring holds for `key` (a lost or older key's trail).
async fn holders(client: &arcus_client::ArcusClient, key: &str) -> Vec<(String, String)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let owner = client.ring().node_for_key(key).map(str::to_string);
    let mut out = Vec::new();
    for node in client.ring().nodes() {
        let got = async {
            let mut s = tokio::net::TcpStream::connect(node).await?;
            s.write_all(format!("get {key}\r\n").as_bytes()).await?;
            let mut r = tokio::io::BufReader::new(s);
            let (mut head, mut data) = (String::new(), String::new());
            r.read_line(&mut head).await?;
            if head.starts_with("VALUE") {
                r.read_line(&mut data).await?;
            }
            Ok::<_, std::io::Error>(data.trim_end().to_string())
        };
        let got = tokio::time::timeout(Duration::from_secs(5), got).await;
        let mark = if Some(node) == owner.as_ref() {
            " (owner)"
        } else {
            ""
        };
        match got {
            Ok(Ok(v)) if v.is_empty() => {}
            Ok(Ok(v)) => out.push((format!("{node}{mark}"), v)),
            Ok(Err(e)) => out.push((format!("{node}{mark}"), format!("error {e}"))),
            Err(_) => out.push((format!("{node}{mark}"), "timeout".into())),
        }
    }
    out
}

/// The operator leader's peak RSS (VmHWM) in MiB, if it can be read.
async fn operator_peak_rss(ns: &test_support::sandbox::TestNamespace) -> Option<u64> {
    let pod = test_support::operator::leader_pod(ns).await.ok()??;
    let pid = test_support::operator::container_pid(&pod)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

/// Sets `replicas` and waits until all are Ready and registered, nothing is recorded in
/// flight and the client's ring has them all. Returns the time it took.
async fn scale_to(
    crs: &Api<kube::api::DynamicObject>,
    client: &arcus_client::ArcusClient,
    svc: &str,
    replicas: usize,
    secs: u64,
) -> anyhow::Result<Duration> {
    let zk = zk_client().await?;
    let started = Instant::now();
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    crs.patch("big", &PatchParams::default(), &patch).await?;
    let want = format!("{replicas}/{replicas}");
    let what =
        format!("scale to {replicas}: ready {want}, nothing in flight, client ring {replicas}");
    wait_until(Duration::from_secs(secs), &what, || async {
        let cr = crs.get("big").await.ok()?;
        let ready = cr.data.get("status")?.get("ready")?.as_str()? == want;
        let claim = zk
            .get_data(&format!("/arcus/cache_list/{svc}"))
            .await
            .ok()?
            .0;
        let idle = !String::from_utf8_lossy(&claim).contains("\"operation\"");
        (ready && idle && client.nodes().len() == replicas).then_some(())
    })
    .await?;
    Ok(started.elapsed())
}

/// The ArcusMemcached of the benchmark: stand-in nodes of 64 MB (1,000,000 keys of 100 bytes
/// take about 170 MB in all: 11 MB a node at 16 nodes, so each has room for its share and for
/// the ring's imbalance).
fn big_cr(svc: &str, replicas: usize) -> serde_json::Value {
    let mut cr = cr_json("big", svc, replicas as i32);
    cr["spec"]["configuration"]["memlimit"] = json!(64);
    cr
}

/// Runs one scale under the client load; returns its time and the load's log.
#[allow(clippy::too_many_arguments)]
async fn scale_under_load(
    crs: &Api<kube::api::DynamicObject>,
    client: &Arc<arcus_client::ArcusClient>,
    svc: &str,
    keys: usize,
    replicas: usize,
    seed: usize,
    expected: &Arc<Mutex<HashMap<usize, Option<String>>>>,
    unknown: &mut HashSet<usize>,
) -> anyhow::Result<(Duration, Load)> {
    let stop = Arc::new(AtomicBool::new(false));
    let load = client_load(client.clone(), keys, seed, expected.clone(), stop.clone());
    let took = scale_to(crs, client, svc, replicas, 3600).await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await?;
    let took = took?;
    let mut e = expected.lock().unwrap();
    for (i, v) in &load.changed {
        e.insert(*i, v.clone());
    }
    for i in &load.unknown {
        unknown.insert(*i);
    }
    Ok((took, load))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long (minutes on the sandbox): run by scripts/bench-cluster"]
async fn large_cluster_scales_out_and_in_with_a_million_keys_losing_none() -> anyhow::Result<()> {
    let (from, to) = (env_or("BENCH_FROM", 16), env_or("BENCH_TO", 32));
    let keys = env_or("BENCH_KEYS", 1_000_000);
    with_namespace("large", 1, |sandbox, ns| async move {
        let r = run_benchmark(sandbox, &ns, from, to, keys).await;
        (ns, r)
    })
    .await
}

async fn run_benchmark(
    sandbox: &test_support::sandbox::Sandbox,
    ns: &test_support::sandbox::TestNamespace,
    from: usize,
    to: usize,
    keys: usize,
) -> anyhow::Result<()> {
    let svc = service_code(ns);
    let crs = mc_api(sandbox, ns);
    let start = Instant::now();
    let cr: kube::api::DynamicObject = serde_json::from_value(big_cr(&svc, from))?;
    crs.create(&PostParams::default(), &cr).await?;
    let client = ring_client_after(&crs, &svc, from).await?;
    let up = start.elapsed();
    let stop = Arc::new(AtomicBool::new(false));
    let timeline = record_timeline(crs.clone(), "big", svc.clone(), start, stop.clone());

    let t = Instant::now();
    load(&client, keys, |i| (key(i), value(i), 0, 0)).await?;
    let load_secs = t.elapsed().as_secs_f64();
    let load_rate = keys as f64 / load_secs;
    eprintln!("[large] {from} nodes up in {up:.1?}; loaded {keys} keys of {VALUE_LEN} B in {load_secs:.1} s ({load_rate:.0} sets/s, 64 in flight: the reference)");

    let expected = Arc::new(Mutex::new(HashMap::new()));
    let mut unknown = HashSet::new();
    let mut phases = Vec::new();
    for (n, (replicas, seed)) in [(to, 7), (from, 11)].into_iter().enumerate() {
        let begin = start.elapsed().as_millis();
        let (took, load) = scale_under_load(
            &crs,
            &client,
            &svc,
            keys,
            replicas,
            seed,
            &expected,
            &mut unknown,
        )
        .await?;
        let end = start.elapsed().as_millis();
        let rss = operator_peak_rss(ns).await;
        let name = if n == 0 {
            format!("{from}→{to}")
        } else {
            format!("{to}→{from}")
        };
        eprintln!(
            "[large] {name}: {:.1} s; client load {} ops ({} gets, {} misses of present keys, {} errors); operator peak RSS so far {rss:?} MiB",
            took.as_secs_f64(), load.ops, load.gets, load.misses, load.errors
        );
        // Checked after each phase too, while the nodes that held a wrong key still run.
        let snapshot = expected.lock().unwrap().clone();
        let (lost, resurrected) = read_back(&client, keys, &snapshot, &unknown).await?;
        eprintln!("[large] after {name}: lost {lost}, resurrected {resurrected}");
        phases.push((name, begin, end, took));
    }
    stop.store(true, Ordering::Relaxed);
    let samples = timeline.await?;
    report(&samples, &phases, load_rate);

    let t = Instant::now();
    let expected = expected.lock().unwrap().clone();
    let (lost, resurrected) = read_back(&client, keys, &expected, &unknown).await?;
    eprintln!(
        "[large] read back {} keys in {:.1} s: lost {lost}, resurrected {resurrected} ({} keys changed by the load, {} unknown after a failed op)",
        keys - unknown.len(), t.elapsed().as_secs_f64(), expected.len(), unknown.len()
    );
    assert_eq!(
        (lost, resurrected),
        (0, 0),
        "every key reads its last value"
    );
    assert!(
        unknown.len() < keys / 100,
        "the client load mostly succeeded"
    );
    Ok(())
}

/// A client once the first `replicas` nodes are Ready and registered.
async fn ring_client_after(
    crs: &Api<kube::api::DynamicObject>,
    svc: &str,
    replicas: usize,
) -> anyhow::Result<Arc<arcus_client::ArcusClient>> {
    let want = format!("{replicas}/{replicas}");
    wait_until(
        Duration::from_secs(900),
        &format!("big ready {want}"),
        || async {
            let cr = crs.get("big").await.ok()?;
            (cr.data.get("status")?.get("ready")?.as_str()? == want).then_some(())
        },
    )
    .await?;
    let client = ring_client(svc, replicas).await?;
    eprintln!(
        "[large] {} ready; client ring {:?} nodes",
        crs.get("big").await?.name_any(),
        client.nodes().len()
    );
    Ok(client)
}

/// Prints each phase's copies and ring changes, the rates beside the load's set rate.
fn report(samples: &[Sample], phases: &[(String, u128, u128, Duration)], load_rate: f64) {
    for (name, begin, end, took) in phases {
        eprintln!("[large] {name}: {:.1} s in all", took.as_secs_f64());
        for line in copy_segments(samples, *begin, *end) {
            let rate: f64 = line
                .split(" items/s")
                .next()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0);
            eprintln!(
                "[large]   copy {line} ({:.2}× the load's set rate)",
                rate / load_rate
            );
        }
        let changes = ring_changes(samples, *begin, *end);
        eprintln!("[large]   ring size over time (s, nodes): {changes:?}");
    }
}
