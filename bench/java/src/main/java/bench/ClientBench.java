package bench;

import java.net.InetSocketAddress;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import net.spy.memcached.ArcusClient;
import net.spy.memcached.ConnectionFactoryBuilder;

/**
 * The ARCUS Java client under the workload of crates/arcus-client/examples/bench.rs, for
 * scripts/bench-client --java: 64-byte keys from a window stored first, 90% get / 10% set,
 * --concurrency threads each with one operation in flight (the client pipelines them over its
 * one connection per node and one I/O thread), latency per operation from the call to the
 * result. The node is given by address (no ZooKeeper): the client's constructor takes the
 * address list. Prints one key=value line in the Rust bench's format.
 */
public final class ClientBench {
  private static final class Args {
    String server = "127.0.0.1:11211";
    int concurrency = 16;
    int valueSize = 100;
    double seconds = 10;
    double warmupSeconds = 2;
    int keys = 10_000;
    double setRatio = 0.1;
  }

  /** Latencies (ns) and errors of one thread. */
  private static final class Samples {
    long[] get = new long[1 << 16];
    long[] set = new long[1 << 13];
    int gets;
    int sets;
    long errors;

    void add(boolean isSet, long ns) {
      if (isSet) {
        if (sets == set.length) set = Arrays.copyOf(set, sets * 2);
        set[sets++] = ns;
      } else {
        if (gets == get.length) get = Arrays.copyOf(get, gets * 2);
        get[gets++] = ns;
      }
    }
  }

  private static Args parse(String[] argv) {
    Args a = new Args();
    for (int i = 0; i < argv.length; i += 2) {
      if (i + 1 >= argv.length) throw new IllegalArgumentException(argv[i] + " needs a value");
      String v = argv[i + 1];
      switch (argv[i]) {
        case "--server" -> a.server = v;
        case "--concurrency" -> a.concurrency = Integer.parseInt(v);
        case "--value-size" -> a.valueSize = Integer.parseInt(v);
        case "--seconds" -> a.seconds = Double.parseDouble(v);
        case "--warmup-seconds" -> a.warmupSeconds = Double.parseDouble(v);
        case "--keys" -> a.keys = Integer.parseInt(v);
        case "--set-ratio" -> a.setRatio = Double.parseDouble(v);
        default -> throw new IllegalArgumentException("unknown argument " + argv[i]);
      }
    }
    return a;
  }

  /** xorshift64*, as the Rust bench: cheap per-thread randomness. */
  private static long next(long[] s) {
    long x = s[0];
    x ^= x >>> 12;
    x ^= x << 25;
    x ^= x >>> 27;
    s[0] = x;
    return x * 0x2545F4914F6CDD1DL;
  }

  /** Runs one thread's loop until {@code until} (System.nanoTime); records when {@code record}. */
  private static Samples run(ArcusClient c, String[] keys, byte[] value, long seed, long until,
      double setRatio, boolean record) {
    Samples s = new Samples();
    long[] rng = {seed | 1};
    while (true) {
      long start = System.nanoTime();
      if (start >= until) return s;
      String key = keys[(int) Long.remainderUnsigned(next(rng), keys.length)];
      boolean isSet = (next(rng) >>> 11) * 0x1.0p-53 < setRatio;
      boolean ok;
      try {
        if (isSet) {
          ok = c.set(key, 0, value).get(5, TimeUnit.SECONDS);
        } else {
          c.asyncGet(key).get(5, TimeUnit.SECONDS);
          ok = true;
        }
      } catch (Exception e) {
        ok = false;
      }
      long ns = System.nanoTime() - start;
      if (!record) continue;
      if (ok) s.add(isSet, ns); else s.errors++;
    }
  }

  /** Runs {@code threads} loops for {@code seconds}; merged samples. */
  private static Samples phase(ArcusClient c, Args a, String[] keys, byte[] value, double seconds,
      boolean record) throws InterruptedException {
    long until = System.nanoTime() + (long) (seconds * 1e9);
    Samples[] out = new Samples[a.concurrency];
    Thread[] threads = new Thread[a.concurrency];
    for (int i = 0; i < a.concurrency; i++) {
      final int t = i;
      long seed = 0x9E3779B97F4A7C15L * (t + 1);
      threads[i] = new Thread(() -> out[t] = run(c, keys, value, seed, until, a.setRatio, record));
      threads[i].start();
    }
    Samples all = new Samples();
    for (int i = 0; i < a.concurrency; i++) {
      threads[i].join();
      for (int j = 0; j < out[i].gets; j++) all.add(false, out[i].get[j]);
      for (int j = 0; j < out[i].sets; j++) all.add(true, out[i].set[j]);
      all.errors += out[i].errors;
    }
    return all;
  }

  private static double pct(long[] sorted, int n, double p) {
    if (n == 0) return 0;
    return sorted[(int) Math.round((n - 1) * p)] / 1000.0;
  }

  public static void main(String[] argv) throws Exception {
    Args a = parse(argv);
    String[] hp = a.server.split(":");
    List<InetSocketAddress> addrs = List.of(new InetSocketAddress(hp[0], Integer.parseInt(hp[1])));
    ConnectionFactoryBuilder cfb = new ConnectionFactoryBuilder().setOpTimeout(5000);
    ArcusClient c = new ArcusClient(cfb.build(), addrs);
    String[] keys = new String[a.keys];
    for (int i = 0; i < a.keys; i++) keys[i] = String.format("bench:%058d", i);
    byte[] value = new byte[a.valueSize];
    Arrays.fill(value, (byte) 'v');
    List<Future<Boolean>> stores = new ArrayList<>();
    for (String k : keys) stores.add(c.set(k, 0, value));
    for (Future<Boolean> f : stores) {
      if (!f.get(10, TimeUnit.SECONDS)) throw new IllegalStateException("preload: set not stored");
    }
    // Not measured: lets the JIT compile the hot path, as a long-running service would have.
    phase(c, a, keys, value, a.warmupSeconds, false);
    long started = System.nanoTime();
    Samples s = phase(c, a, keys, value, a.seconds, true);
    double elapsed = (System.nanoTime() - started) / 1e9;
    c.shutdown();
    long[] both = new long[s.gets + s.sets];
    System.arraycopy(s.get, 0, both, 0, s.gets);
    System.arraycopy(s.set, 0, both, s.gets, s.sets);
    Arrays.sort(both);
    Arrays.sort(s.get, 0, s.gets);
    Arrays.sort(s.set, 0, s.sets);
    int ops = both.length;
    double avg = Arrays.stream(both).average().orElse(0) / 1000.0;
    System.out.printf(
        "runtime=java ops=%d ops_per_sec=%.0f get_ops=%d set_ops=%d avg_us=%.1f p50_us=%.1f"
            + " p99_us=%.1f p999_us=%.1f get_p99_us=%.1f set_p99_us=%.1f errors=%d%n",
        ops, ops / elapsed, s.gets, s.sets, avg, pct(both, ops, 0.5), pct(both, ops, 0.99),
        pct(both, ops, 0.999), pct(s.get, s.gets, 0.99), pct(s.set, s.sets, 0.99), s.errors);
    System.exit(0);
  }
}
