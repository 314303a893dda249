//! Throughput and latency of `ArcusClient` against one memcached node, shaped like memcaslap's
//! default workload so the two can run side by side (`scripts/bench-client`):
//! 64-byte keys from a window of 10k keys stored first, 90% get / 10% set, `--concurrency`
//! operations in flight, `--threads` runtime threads. Shapes (`--runtime`): `multi` and
//! `per-thread` use one pooled connection per operation in flight; `pipelined` is `multi` with
//! `ClientOptions::pipeline` (`--pipeline-connections` per node, default 1), and
//! `pipelined-per-thread` is `per-thread` with it.
//!
//! ```text
//! cargo run --release -p arcus-client --example bench -- \
//!     --server 127.0.0.1:11211 --threads 2 --concurrency 16 --value-size 100 --seconds 10
//! ```
//! Prints one `key=value` line: `ops`, `ops_per_sec`, `get_ops`, `set_ops`, `avg_us`, `p50_us`,
//! `p99_us`, `p999_us`, `get_p99_us`, `set_p99_us`, `errors`.

use arcus_client::{protocol, ArcusClient, ClientOptions, PipelineOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
enum RuntimeKind {
    /// One tokio multi-thread runtime with `threads` workers, one client shared by all tasks.
    Multi,
    /// `threads` OS threads, each a current-thread runtime with its own client and its share of
    /// the concurrency: memcaslap's architecture (one event loop per thread).
    PerThread,
    /// `Multi` with the pipelined transport.
    Pipelined,
    /// `PerThread` with the pipelined transport: each thread's client pipelines over its own
    /// connection(s).
    PipelinedPerThread,
}

impl RuntimeKind {
    fn name(self) -> &'static str {
        match self {
            RuntimeKind::Multi => "multi",
            RuntimeKind::PerThread => "per-thread",
            RuntimeKind::Pipelined => "pipelined",
            RuntimeKind::PipelinedPerThread => "pipelined-per-thread",
        }
    }

    fn pipelined(self) -> bool {
        matches!(
            self,
            RuntimeKind::Pipelined | RuntimeKind::PipelinedPerThread
        )
    }
}

struct Args {
    runtime: RuntimeKind,
    server: String,
    threads: usize,
    concurrency: usize,
    value_size: usize,
    seconds: f64,
    keys: usize,
    set_ratio: f64,
    pipeline_connections: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runtime: RuntimeKind::Multi,
        server: "127.0.0.1:11211".into(),
        threads: 2,
        concurrency: 16,
        value_size: 100,
        seconds: 10.0,
        keys: 10_000,
        set_ratio: 0.1,
        pipeline_connections: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let bad = |v: &str| format!("bad value {v:?} for {flag}");
        match flag.as_str() {
            "--server" => a.server = val()?,
            "--runtime" => {
                a.runtime = match val()?.as_str() {
                    "multi" => RuntimeKind::Multi,
                    "per-thread" => RuntimeKind::PerThread,
                    "pipelined" => RuntimeKind::Pipelined,
                    "pipelined-per-thread" => RuntimeKind::PipelinedPerThread,
                    v => return Err(bad(v)),
                }
            }
            "--threads" => a.threads = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--concurrency" => {
                a.concurrency = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?
            }
            "--value-size" => a.value_size = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--seconds" => a.seconds = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--keys" => a.keys = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--set-ratio" => a.set_ratio = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--pipeline-connections" => {
                a.pipeline_connections = val().and_then(|v| v.parse().map_err(|_| bad(&v)))?
            }
            "-h" | "--help" => return Err(
                "usage: bench [--server ip:port] [--runtime multi|per-thread|pipelined|pipelined-per-thread] [--threads N] [--concurrency N] [--value-size B] \
                            [--seconds S] [--keys N] [--set-ratio R] [--pipeline-connections N]"
                    .into(),
            ),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.threads == 0 || a.concurrency == 0 || a.keys == 0 || !(0.0..=1.0).contains(&a.set_ratio) {
        return Err("threads, concurrency and keys must be > 0; set-ratio in 0..=1".into());
    }
    Ok(a)
}

/// xorshift64*: cheap per-task randomness, no shared state.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Default)]
struct Samples {
    get_ns: Vec<u32>,
    set_ns: Vec<u32>,
    errors: u64,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.get_ns.extend(other.get_ns);
        self.set_ns.extend(other.set_ns);
        self.errors += other.errors;
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn worker(
    client: ArcusClient,
    keys: Arc<Vec<String>>,
    value: Arc<Vec<u8>>,
    seed: u64,
    until: Instant,
    set_ratio: f64,
) -> Samples {
    let mut rng = Rng(seed | 1);
    let mut s = Samples {
        get_ns: Vec::with_capacity(1 << 16),
        set_ns: Vec::with_capacity(1 << 13),
        errors: 0,
    };
    let set_below = (set_ratio * u64::MAX as f64) as u64;
    loop {
        let start = Instant::now();
        if start >= until {
            return s;
        }
        let key = &keys[(rng.next() % keys.len() as u64) as usize];
        let is_set = rng.next() < set_below;
        let ok = if is_set {
            client.set(key, value.as_slice(), 0, 0).await.is_ok()
        } else {
            client.get(key).await.is_ok()
        };
        let ns = start.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        if !ok {
            s.errors += 1;
        } else if is_set {
            s.set_ns.push(ns);
        } else {
            s.get_ns.push(ns);
        }
    }
}

/// A client of `server` with `connections` pooled connections, or pipelined over
/// `pipelined` connections.
fn client(server: &str, connections: usize, pipelined: Option<usize>) -> ArcusClient {
    let opts = ClientOptions {
        max_connections_per_node: connections,
        max_key_len: protocol::MEMCACHED_MAX_KEY_LEN,
        op_timeout: Duration::from_secs(5),
        pipeline: pipelined.map(|n| PipelineOptions {
            connections_per_node: n,
            ..PipelineOptions::default()
        }),
        ..ClientOptions::default()
    };
    ArcusClient::with_nodes([server.to_string()], opts)
}

/// Runs `tasks` workers on `rt`, all on one client.
fn run_on(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    tasks: usize,
    first_seed: usize,
    keys: &Arc<Vec<String>>,
    value: &Arc<Vec<u8>>,
    until: Instant,
) -> Samples {
    rt.block_on(async {
        let pipelined = args.runtime.pipelined();
        let client = client(
            &args.server,
            tasks,
            pipelined.then_some(args.pipeline_connections),
        );
        let handles: Vec<_> = (0..tasks)
            .map(|i| {
                let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul((first_seed + i) as u64 + 1);
                tokio::spawn(worker(
                    client.clone(),
                    keys.clone(),
                    value.clone(),
                    seed,
                    until,
                    args.set_ratio,
                ))
            })
            .collect();
        let mut all = Samples::default();
        for h in handles {
            all.merge(h.await.expect("worker"));
        }
        all
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // 64-byte keys, like memcaslap's default key size, stored before the timed run.
    let keys: Arc<Vec<String>> =
        Arc::new((0..args.keys).map(|i| format!("bench:{i:058}")).collect());
    let value = Arc::new(vec![b'v'; args.value_size]);
    let current = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    current().block_on(async {
        let c = client(&args.server, 1, None);
        for k in keys.iter() {
            if let Err(e) = c.set(k, value.as_slice(), 0, 0).await {
                eprintln!("preloading {k}: {e}");
                std::process::exit(1);
            }
        }
    });

    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let mut all = match args.runtime {
        RuntimeKind::Multi | RuntimeKind::Pipelined => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads)
                .enable_all()
                .build()
                .expect("runtime");
            run_on(&rt, &args, args.concurrency, 0, &keys, &value, until)
        }
        RuntimeKind::PerThread | RuntimeKind::PipelinedPerThread => std::thread::scope(|scope| {
            let threads: Vec<_> = (0..args.threads)
                .map(|t| {
                    // Spread the concurrency over the threads as memcaslap does.
                    let tasks = args.concurrency / args.threads
                        + usize::from(t < args.concurrency % args.threads);
                    let first = t * args.concurrency;
                    let (args, keys, value) = (&args, &keys, &value);
                    scope.spawn(move || run_on(&current(), args, tasks, first, keys, value, until))
                })
                .collect();
            let mut all = Samples::default();
            for t in threads {
                all.merge(t.join().expect("bench thread"));
            }
            all
        }),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut both: Vec<u32> = all.get_ns.iter().chain(&all.set_ns).copied().collect();
    both.sort_unstable();
    all.get_ns.sort_unstable();
    all.set_ns.sort_unstable();
    let ops = both.len();
    let avg = both.iter().map(|&n| n as f64).sum::<f64>() / ops.max(1) as f64 / 1000.0;
    println!(
        "runtime={} ops={ops} ops_per_sec={:.0} get_ops={} set_ops={} avg_us={avg:.1} p50_us={:.1} p99_us={:.1} p999_us={:.1} get_p99_us={:.1} set_p99_us={:.1} errors={}",
        args.runtime.name(),
        ops as f64 / elapsed,
        all.get_ns.len(),
        all.set_ns.len(),
        percentile(&both, 0.50),
        percentile(&both, 0.99),
        percentile(&both, 0.999),
        percentile(&all.get_ns, 0.99),
        percentile(&all.set_ns, 0.99),
        all.errors
    );
}
