//! Migration throughput between two memcached nodes on loopback (`scripts/bench-migration`).
//!
//! The ring before is {source, target}, the ring after {target} (a scale-in of `source`).
//! `--keys` keys that the source owns on the ring before are stored on it with `--value-size`
//! byte values, then a [`ScaleIn`] runs pass 1 (the bulk copy: list, `gets` in batches,
//! pipelined `add`s) and pass 2 (list again, compare both sides, nothing left to do). Keys/s
//! and MiB/s count moved keys and their value bytes.
//!
//! `--mode load` only stores the keys, `--mode migrate` only migrates them (keys loaded
//! before by `--mode load`), `--mode both` (the default) does both in one process. The
//! migrate run prints its own peak RSS (`peak_rss_mib`, VmHWM from /proc/self/status): with
//! the loading in another process, that is the migration's memory alone.
//!
//! ```text
//! cargo run --release -p arcus-operator --example bench_migration -- \
//!     --source 127.0.0.1:11211 --target 127.0.0.1:11212 --keys 200000 --value-size 100
//! ```
//! Prints one `key=value` line.

use arcus_client::{protocol, ArcusClient, ClientOptions, Ring};
use arcus_operator::migration::{MigrationOptions, ScaleIn};
use futures::StreamExt;
use std::time::{Duration, Instant};

struct Args {
    source: String,
    target: String,
    keys: usize,
    value_size: usize,
    batch: usize,
    concurrency: usize,
    threads: usize,
    mode: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        source: "127.0.0.1:11211".into(),
        target: "127.0.0.1:11212".into(),
        keys: 200_000,
        value_size: 100,
        batch: 100,
        concurrency: 4,
        threads: 2,
        mode: "both".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("bad value {v:?} for {flag}"))
        };
        match flag.as_str() {
            "--source" => a.source = val,
            "--target" => a.target = val,
            "--keys" => a.keys = num(&val)?,
            "--value-size" => a.value_size = num(&val)?,
            "--batch" => a.batch = num(&val)?,
            "--concurrency" => a.concurrency = num(&val)?,
            "--threads" => a.threads = num(&val)?,
            "--mode" if ["load", "migrate", "both"].contains(&val.as_str()) => a.mode = val,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; usage: bench_migration [--source ip:port] [--target ip:port] \
                     [--keys N] [--value-size B] [--batch N] [--concurrency N] [--threads N] \
                     [--mode load|migrate|both]"
                ))
            }
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

/// This process's peak resident set (VmHWM), MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn run(a: Args) {
    let before = Ring::new([a.source.clone(), a.target.clone()]);
    let load_s = match a.mode.as_str() {
        "migrate" => 0.0,
        _ => load(&a, &before).await,
    };
    if a.mode == "load" {
        println!(
            "keys={} value_size={} load_s={load_s:.2}",
            a.keys, a.value_size
        );
        return;
    }
    migrate(&a, before, load_s).await;
}

/// Stores `--keys` keys that the source owns directly on it; returns the seconds it took.
async fn load(a: &Args, before: &Ring) -> f64 {
    let opts = ClientOptions {
        op_timeout: Duration::from_secs(5),
        max_key_len: protocol::MEMCACHED_MAX_KEY_LEN,
        ..ClientOptions::default()
    };
    let keys = (0..)
        .map(|i| format!("bench:{i:010}"))
        .filter(|k| before.node_for_key(k) == Some(a.source.as_str()))
        .take(a.keys);
    let src = ArcusClient::with_nodes([a.source.clone()], opts);
    let value = vec![b'v'; a.value_size];
    let t = Instant::now();
    let errors: usize = futures::stream::iter(keys)
        .map(|k| {
            let (src, value) = (&src, &value);
            async move { usize::from(src.set(&k, value, 7, 0).await.is_err()) }
        })
        .buffer_unordered(64)
        .fold(0, |n, e| async move { n + e })
        .await;
    assert_eq!(errors, 0, "loading failed");
    t.elapsed().as_secs_f64()
}

async fn migrate(a: &Args, before: Ring, load_s: f64) {
    let mopts = MigrationOptions {
        batch: a.batch,
        concurrency_per_node: a.concurrency,
        ..MigrationOptions::default()
    };
    let mut m = ScaleIn::new(before, std::slice::from_ref(&a.source), mopts).expect("migration");
    let t = Instant::now();
    m.pass1().await.expect("pass 1");
    let pass1_s = t.elapsed().as_secs_f64();
    let p1 = m.progress().borrow().clone();
    let t = Instant::now();
    let p = m.pass2().await.expect("pass 2");
    let pass2_s = t.elapsed().as_secs_f64();
    let moved = p1.items_moved;
    // Pass 2 adds what pass 1's listings missed (memcached's crawler can skip a few items).
    assert_eq!(p.items_moved as usize, a.keys, "not every key moved: {p:?}");
    assert_eq!(p.items_failed, 0);
    let mib = p1.bytes as f64 / (1024.0 * 1024.0);
    println!(
        "keys={} value_size={} batch={} concurrency={} load_s={load_s:.2} pass1_s={pass1_s:.3} \
         pass1_keys_per_sec={:.0} pass1_mib_per_sec={:.1} pass2_s={pass2_s:.3} \
         total_keys_per_sec={:.0} pass2_unchanged={} pass2_added={} peak_rss_mib={:.1}",
        a.keys,
        a.value_size,
        a.batch,
        a.concurrency,
        moved as f64 / pass1_s,
        mib / pass1_s,
        moved as f64 / (pass1_s + pass2_s),
        p.items_unchanged,
        p.items_moved - moved,
        peak_rss_mib(),
    );
}
