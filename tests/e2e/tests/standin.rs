//! The arcus-memcached stand-in (sandbox/arcus-standin) against a real ZooKeeper and Debian's
//! memcached: each test has its own ZooKeeper, its own 127.200.x.y address and port, and stops
//! every process it started by PID (ChildGuard).
//!
//! The stand-in binary is `$ARCUS_BIN_DIR/arcus-standin` (default `<repo>/target/debug`); the
//! README's test command builds all binaries first. When it is missing, it is built once with
//! `cargo build -p arcus-standin` into `<repo>/target/e2e-bins` (a separate target dir, since the
//! running `cargo test` holds the lock of the main one).

use arcus_client::{AdminClient, Readiness};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use test_support::process::{free_port, unique_loopback_ip};
use test_support::zk_server::ZkServer;
use test_support::{wait_until, ChildGuard};
use zookeeper_client as zk;

const EX_TEMPFAIL: i32 = 75;
const EX_PROTOCOL: i32 = 76;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The stand-in binary, built once if missing.
fn standin_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = std::env::var_os("ARCUS_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/debug"));
        let bin = dir.join("arcus-standin");
        if bin.is_file() {
            return bin;
        }
        let target = repo_root().join("target/e2e-bins");
        eprintln!(
            "{} is missing; building it into {}",
            bin.display(),
            target.display()
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "arcus-standin"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(repo_root())
            .status()
            .expect("running cargo build -p arcus-standin");
        assert!(st.success(), "cargo build -p arcus-standin failed: {st}");
        let bin = target.join("debug/arcus-standin");
        assert!(bin.is_file(), "{} not built", bin.display());
        bin
    })
    .clone()
}

/// One stand-in process, its address and its log.
struct StandIn {
    guard: ChildGuard,
    ip: String,
    port: u16,
    hostname: String,
    log: PathBuf,
}

impl StandIn {
    /// Starts the stand-in with the canonical arcus-memcached command line.
    fn start(zk_addr: &str, ip: &str, port: u16, hostname: &str, extra: &[&str]) -> StandIn {
        let log = std::env::temp_dir().join(format!(
            "arcus-test-standin-{}-{ip}-{port}.log",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new(standin_bin());
        cmd.args([
            "-E",
            "/opt/arcus/lib/default_engine.so",
            "-X",
            "/opt/arcus/lib/ascii_scrub.so",
            "-u",
            "root",
        ])
        .args(["-D", ":", "-r", "-R5", "-U", "0", "-b", "8192"])
        .args([
            "-p",
            &port.to_string(),
            "-m",
            "64",
            "-c",
            "256",
            "-t",
            "2",
            "-z",
            zk_addr,
            "-l",
            ip,
        ])
        .args(extra)
        .env("ARCUS_CACHE_HOSTNAME_OVERWRITE", hostname)
        .env("ARCUS_CACHE_PUBLIC_IP", ip)
        .env("RUST_LOG", "info");
        let guard = ChildGuard::spawn("arcus-standin", cmd, &log).expect("spawn arcus-standin");
        StandIn {
            guard,
            ip: ip.into(),
            port,
            hostname: hostname.into(),
            log,
        }
    }

    fn node_name(&self) -> String {
        format!("{}:{}-{}", self.ip, self.port, self.hostname)
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.guard.try_wait().expect("try_wait")
    }

    /// Waits (bounded) for the process to exit.
    async fn wait_exit(&mut self, timeout: Duration, what: &str) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                anyhow::bail!("timed out after {timeout:?} waiting for the stand-in to exit ({what}); log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Creates the persistent ARCUS tree an admin (the operator) would create, with `/arcus/cache_list/<svc>`
/// for every service code given.
async fn arcus_tree(client: &zk::Client, services: &[&str]) -> anyhow::Result<()> {
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    for p in [
        "/arcus",
        "/arcus/cache_list",
        "/arcus/client_list",
        "/arcus/cache_server_mapping",
        "/arcus/cache_server_log",
    ] {
        create_if_missing(client, p, &persistent).await?;
    }
    for svc in services {
        create_if_missing(client, &format!("/arcus/cache_list/{svc}"), &persistent).await?;
    }
    Ok(())
}

async fn create_if_missing(
    client: &zk::Client,
    path: &str,
    options: &zk::CreateOptions<'_>,
) -> anyhow::Result<()> {
    match client.create(path, &[], options).await {
        Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("create {path}: {e}")),
    }
}

/// `/arcus/cache_server_mapping/<addr>/<child>`.
async fn map(client: &zk::Client, addr: &str, child: &str) -> anyhow::Result<()> {
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    create_if_missing(
        client,
        &format!("/arcus/cache_server_mapping/{addr}"),
        &persistent,
    )
    .await?;
    create_if_missing(
        client,
        &format!("/arcus/cache_server_mapping/{addr}/{child}"),
        &persistent,
    )
    .await
}

/// Waits for `path` to exist and returns its data and stat.
async fn wait_znode(
    client: &zk::Client,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(Vec<u8>, zk::Stat)> {
    wait_until(timeout, &format!("znode {path}"), || async {
        client.get_data(path).await.ok()
    })
    .await
}

/// Waits for `path` to be gone and returns how long that took.
async fn wait_gone(client: &zk::Client, path: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if client.check_stat(path).await?.is_none() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("{path} still exists after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One memcached ascii exchange: sends `req`, reads until the reply ends with `end`.
fn memcached_roundtrip(addr: &str, req: &str, end: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).ends_with(end) {
        let n = s.read(&mut buf)?;
        anyhow::ensure!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn set_get(addr: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let r = memcached_roundtrip(
        addr,
        &format!("set {key} 7 0 {}\r\n{value}\r\n", value.len()),
        "\r\n",
    )?;
    anyhow::ensure!(r == "STORED\r\n", "set answered {r:?}");
    let r = memcached_roundtrip(addr, &format!("get {key}\r\n"), "END\r\n")?;
    anyhow::ensure!(
        r == format!("VALUE {key} 7 {}\r\n{value}\r\nEND\r\n", value.len()),
        "get answered {r:?}"
    );
    Ok(())
}

fn accepts(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(300)).is_ok()
}

/// Mapping by `<hostname>:<port>` → ephemeral `<ip>:<port>-<hostname>` with `64MB`, a `join`
/// log entry, set/get on the node, then SIGTERM → znode gone within 2 s and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_by_hostname_serves_and_leaves_on_sigterm() -> anyhow::Result<()> {
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-a"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    let hostname = "cache-a-arcus-mc-0";
    map(&client, &format!("{hostname}:{port}"), "svc-a").await?;

    let started = Instant::now();
    let mut node = StandIn::start(&zks.addr(), &ip, port, hostname, &[]);
    let path = format!("/arcus/cache_list/svc-a/{}", node.node_name());
    let (data, stat) = wait_znode(&client, &path, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; stand-in log:\n{}", node.log_text()))?;
    eprintln!("registered {path} {:?} after start", started.elapsed());
    assert_eq!(String::from_utf8_lossy(&data), "64MB");
    assert_ne!(stat.ephemeral_owner, 0, "{path} must be ephemeral");
    assert_eq!(
        path,
        format!("/arcus/cache_list/svc-a/{ip}:{port}-{hostname}")
    );

    // the join entry under today's cache_server_log
    let days = client.list_children("/arcus/cache_server_log").await?;
    assert_eq!(days.len(), 1, "one date node: {days:?}");
    let day = format!("/arcus/cache_server_log/{}", days[0]);
    let entries = client.list_children(&day).await?;
    let prefix = format!("{}-", node.node_name());
    let entry = entries
        .iter()
        .find(|e| e.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}* in {entries:?}"));
    let seq = &entry[prefix.len()..];
    assert!(
        seq.len() == 10 && seq.chars().all(|c| c.is_ascii_digit()),
        "sequential suffix: {entry}"
    );
    let (log_data, log_stat) = client.get_data(&format!("{day}/{entry}")).await?;
    assert_eq!(String::from_utf8_lossy(&log_data), "join");
    assert_eq!(log_stat.ephemeral_owner, 0, "log entries are persistent");

    set_get(&node.addr(), "standin:key", "hello")?;

    let t = Instant::now();
    node.guard.signal(15);
    let gone = wait_gone(&client, &path, Duration::from_secs(2)).await?;
    let st = node
        .wait_exit(Duration::from_secs(3), "after SIGTERM")
        .await?;
    eprintln!(
        "SIGTERM: znode gone after {gone:?}, exit after {:?}",
        t.elapsed()
    );
    assert_eq!(
        st.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{}",
        node.log_text()
    );
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "exit took {:?}",
        t.elapsed()
    );
    assert!(
        !accepts(&node.addr()),
        "memcached still accepts after the stand-in exited"
    );
    let log = node.log_text();
    let closed = log
        .find("closing the ZooKeeper session")
        .expect("log names the session close");
    let stopping = log
        .find("stopping memcached")
        .expect("log names stopping memcached");
    assert!(
        closed < stopping,
        "session must be closed before memcached stops:\n{log}"
    );
    Ok(())
}

/// `<ip>:<port>` wins over `<hostname>:<port>`, which wins over `<ip>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_lookup_order() -> anyhow::Result<()> {
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["by-ip", "by-hostname", "by-ip-port"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    let hostname = "order-mc-1";

    // Adds mappings one by one, each more specific than the last; each start must pick the newest.
    let steps = [
        (ip.clone(), "by-ip"),
        (
            format!("{hostname}:{port}"),
            "by-hostname^g0^127.0.0.1:1234",
        ),
        (format!("{ip}:{port}"), "by-ip-port"),
    ];
    for (addr, child) in steps {
        map(&client, &addr, child).await?;
        let svc = child.split('^').next().unwrap();
        let mut node = StandIn::start(&zks.addr(), &ip, port, hostname, &[]);
        let path = format!("/arcus/cache_list/{svc}/{}", node.node_name());
        wait_znode(&client, &path, Duration::from_secs(20))
            .await
            .map_err(|e| anyhow::anyhow!("mapping {addr}: {e}; log:\n{}", node.log_text()))?;
        for other in ["by-ip", "by-hostname", "by-ip-port"]
            .iter()
            .filter(|s| **s != svc)
        {
            let others = client
                .list_children(&format!("/arcus/cache_list/{other}"))
                .await?;
            assert!(
                others.is_empty(),
                "registered under {other} too: {others:?}"
            );
        }
        node.guard.signal(15);
        let st = node.wait_exit(Duration::from_secs(3), "SIGTERM").await?;
        assert_eq!(st.code(), Some(0));
        wait_gone(&client, &path, Duration::from_secs(2)).await?;
    }
    Ok(())
}

/// No mapping: exit 76 with a message naming the paths tried, memcached stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mapping_exits_76() -> anyhow::Result<()> {
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    // a mapping for another node must not match
    map(&client, "other-host:11211", "svc").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "lonely-mc-0", &[]);
    let st = node
        .wait_exit(Duration::from_secs(20), "no mapping")
        .await?;
    let log = node.log_text();
    assert_eq!(st.code(), Some(EX_PROTOCOL), "log:\n{log}");
    for tried in [
        format!("{ip}:{port}"),
        format!("lonely-mc-0:{port}"),
        ip.clone(),
    ] {
        assert!(
            log.contains(&format!("/arcus/cache_server_mapping/{tried}")),
            "{tried} not named in:\n{log}"
        );
    }
    assert!(log.contains("no ZooKeeper mapping"), "{log}");
    assert!(!accepts(&node.addr()), "memcached still running");
    assert!(client
        .list_children("/arcus/cache_list/svc")
        .await?
        .is_empty());

    // several children under the mapping: also 76
    map(&client, &format!("{ip}:{port}"), "svc").await?;
    map(&client, &format!("{ip}:{port}"), "svc2").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "lonely-mc-0", &[]);
    let st = node
        .wait_exit(Duration::from_secs(20), "two mapping children")
        .await?;
    assert_eq!(st.code(), Some(EX_PROTOCOL));
    assert!(
        node.log_text().contains("exactly one child"),
        "{}",
        node.log_text()
    );
    Ok(())
}

/// ZooKeeper down for a while: keeps serving; back with its data wiped (the session is unknown
/// to it): the session is expired → exit 75, memcached stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_exits_75() -> anyhow::Result<()> {
    let mut zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-x"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("{ip}:{port}"), "svc-x").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "expiry-mc-0", &["-o", "10"]);
    let path = format!("/arcus/cache_list/svc-x/{}", node.node_name());
    wait_znode(&client, &path, Duration::from_secs(20)).await?;
    drop(client);

    zks.stop();
    let data = zks.dir.join("data");
    std::fs::remove_dir_all(&data)?;
    std::fs::create_dir_all(&data)?;
    // ZooKeeper unreachable, session not yet expired: still serving.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        node.try_wait().is_none(),
        "exited while ZooKeeper was only unreachable:\n{}",
        node.log_text()
    );
    set_get(&node.addr(), "still", "serving")?;

    let t = Instant::now();
    zks.restart()?;
    let answering = t.elapsed();
    let back = Instant::now();
    let st = node
        .wait_exit(Duration::from_secs(30), "session expiry")
        .await?;
    eprintln!(
        "ZooKeeper back in {answering:?}; stand-in exit {st} {:?} after it answered",
        back.elapsed()
    );
    assert_eq!(st.code(), Some(EX_TEMPFAIL), "log:\n{}", node.log_text());
    assert!(
        node.log_text().contains("session expired"),
        "{}",
        node.log_text()
    );
    assert!(
        !accepts(&node.addr()),
        "memcached still running after expiry"
    );
    Ok(())
}

/// The same expiry with `config zkfailstop off` (arcus-memcached's mc_pause): the node keeps
/// serving with its data, answers NOT_READY, and comes back on `zkensemble rejoin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_with_failstop_off_waits_for_rejoin() -> anyhow::Result<()> {
    let mut zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-f"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("{ip}:{port}"), "svc-f").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "failstop-mc-0", &["-o", "10"]);
    let path = format!("/arcus/cache_list/svc-f/{}", node.node_name());
    wait_znode(&client, &path, Duration::from_secs(20)).await?;
    drop(client);
    let admin = AdminClient::new(node.addr());
    assert_eq!(admin.config("zkfailstop").await?, "on", "the default");
    admin.set_config("zkfailstop", "off").await?;
    assert_eq!(admin.config("zkfailstop").await?, "off");
    assert_eq!(
        memcached_roundtrip(&node.addr(), "config zkfailstop maybe\r\n", "\r\n")?,
        "CLIENT_ERROR bad value\r\n"
    );
    set_get(&node.addr(), "kept", "through the outage")?;

    // The session expires (ZooKeeper back without it), as in session_expiry_exits_75.
    zks.stop();
    let data = zks.dir.join("data");
    std::fs::remove_dir_all(&data)?;
    std::fs::create_dir_all(&data)?;
    zks.restart()?;
    wait_until(Duration::from_secs(30), "the stand-in to pause", || async {
        node.log_text()
            .contains("pausing memcached (zk_failstop: off)")
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", node.log_text()))?;
    assert!(node.try_wait().is_none(), "exited:\n{}", node.log_text());
    assert_eq!(admin.ready().await?, Readiness::NotReady);
    assert_eq!(
        memcached_roundtrip(&node.addr(), "get kept\r\n", "END\r\n")?,
        "VALUE kept 7 18\r\nthrough the outage\r\nEND\r\n",
        "the data is still there"
    );

    // The tree is gone with ZooKeeper's data: an operator puts it back, then rejoins the node.
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-f"]).await?;
    map(&client, &format!("{ip}:{port}"), "svc-f").await?;
    admin
        .zkensemble_rejoin()
        .await
        .map_err(|e| anyhow::anyhow!("zkensemble rejoin: {e}; log:\n{}", node.log_text()))?;
    wait_znode(&client, &path, Duration::from_secs(10)).await?;
    assert_eq!(admin.ready().await?, Readiness::Ready);
    assert!(node.try_wait().is_none());
    Ok(())
}

/// ZooKeeper down for longer than the session timeout, then back WITH its data: ZooKeeper keeps
/// sessions across a full outage, so the node resumes its session (as arcus-memcached's C client
/// does) and its ephemeral znode is still the one it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_outage_longer_than_timeout_resumes_session() -> anyhow::Result<()> {
    let mut zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-o"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("{ip}:{port}"), "svc-o").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "outage-mc-0", &["-o", "10"]);
    let path = format!("/arcus/cache_list/svc-o/{}", node.node_name());
    let (_, before) = wait_znode(&client, &path, Duration::from_secs(20)).await?;
    drop(client);

    zks.stop();
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert!(
        node.try_wait().is_none(),
        "exited during the outage:\n{}",
        node.log_text()
    );
    set_get(&node.addr(), "outage", "serving")?;
    // ZooKeeper unreachable, session alive: still a member, as arcus-memcached says
    assert_eq!(
        memcached_roundtrip(&node.addr(), "ready\r\n", "\r\n")?,
        "READY\r\n"
    );
    zks.restart()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    wait_until(
        Duration::from_secs(15),
        "the stand-in to resume its session",
        || async { node.log_text().contains("resumed").then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", node.log_text()))?;
    let (_, after) = client.get_data(&path).await?;
    assert_eq!(
        after.ephemeral_owner, before.ephemeral_owner,
        "same session owns the znode"
    );
    // longer than a session timeout after ZooKeeper came back: still registered, still running
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(node.try_wait().is_none(), "{}", node.log_text());
    assert!(
        client.check_stat(&path).await?.is_some(),
        "znode lost after resuming"
    );

    node.guard.signal(15);
    wait_gone(&client, &path, Duration::from_secs(2)).await?;
    assert_eq!(
        node.wait_exit(Duration::from_secs(3), "SIGTERM")
            .await?
            .code(),
        Some(0)
    );
    Ok(())
}

/// Its own znode deleted by someone else: like arcus-memcached it answers `ready` with NOT_READY
/// at once, closes its session 100 ms later (a rejoin before that fails), keeps serving, and
/// comes back on `zkensemble rejoin` (new session,
/// same znode name and data, a `rejoin` log entry); a second rejoin while a member fails with the
/// real server's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_znode_deleted_then_zkensemble_rejoin() -> anyhow::Result<()> {
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-d"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("deleted-mc-0:{port}"), "svc-d").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "deleted-mc-0", &[]);
    let path = format!("/arcus/cache_list/svc-d/{}", node.node_name());
    let (data, before) = wait_znode(&client, &path, Duration::from_secs(20)).await?;
    let admin = AdminClient::new(node.addr());
    // The node answers READY once its create has returned, a moment after the znode appears.
    wait_until(Duration::from_secs(5), "the stand-in READY", || async {
        (admin.ready().await.ok()? == Readiness::Ready).then_some(())
    })
    .await?;
    assert_eq!(admin.zkensemble_get().await?, zks.addr());

    client.delete(&path, None).await?;
    wait_until(
        Duration::from_secs(5),
        "the stand-in to log that it left the cluster",
        || async { node.log_text().contains("LEFT the cluster").then_some(()) },
    )
    .await?;
    wait_until(
        Duration::from_secs(5),
        "ready to answer NOT_READY",
        || async { (admin.ready().await.ok()? == Readiness::NotReady).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", node.log_text()))?;
    assert!(
        node.try_wait().is_none(),
        "exited after its znode was deleted:\n{}",
        node.log_text()
    );
    set_get(&node.addr(), "after-delete", "ok")?;
    assert!(
        client.check_stat(&path).await?.is_none(),
        "the stand-in must not re-create its znode by itself"
    );
    wait_until(
        Duration::from_secs(5),
        "the session closed by mc_pause",
        || async {
            node.log_text()
                .contains("zk connection closed by mc_pause.")
                .then_some(())
        },
    )
    .await?;
    // no session any more: the real server cannot name its ensemble either
    assert_eq!(
        memcached_roundtrip(&node.addr(), "zkensemble get\r\n", "\r\n")?,
        "ERROR failed to get the ensemble address\r\n"
    );

    admin
        .zkensemble_rejoin()
        .await
        .map_err(|e| anyhow::anyhow!("zkensemble rejoin: {e}; log:\n{}", node.log_text()))?;
    let (data_after, after) = client
        .get_data(&path)
        .await
        .map_err(|e| anyhow::anyhow!("{path} after rejoin: {e}"))?;
    assert_eq!(data_after, data, "same znode data after rejoin");
    assert_eq!(String::from_utf8_lossy(&data_after), "64MB");
    assert_ne!(after.ephemeral_owner, 0, "{path} must be ephemeral");
    assert_ne!(
        after.ephemeral_owner, before.ephemeral_owner,
        "rejoin opens a new session"
    );
    assert_eq!(admin.ready().await?, Readiness::Ready);
    assert_eq!(admin.zkensemble_get().await?, zks.addr());

    // a join and a rejoin entry under today's cache_server_log
    let days = client.list_children("/arcus/cache_server_log").await?;
    let mut actions = Vec::new();
    for day in &days {
        let day = format!("/arcus/cache_server_log/{day}");
        for entry in client.list_children(&day).await? {
            if entry.starts_with(&format!("{}-", node.node_name())) {
                let (d, _) = client.get_data(&format!("{day}/{entry}")).await?;
                actions.push((entry, String::from_utf8_lossy(&d).into_owned()));
            }
        }
    }
    actions.sort();
    let kinds: Vec<&str> = actions.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(kinds, ["join", "rejoin"], "log entries: {actions:?}");

    // already a member: the real server's failure reply
    assert_eq!(
        memcached_roundtrip(&node.addr(), "zkensemble rejoin\r\n", "\r\n")?,
        "ERROR failed to rejoin ensemble\r\n"
    );
    assert!(admin.zkensemble_rejoin().await.is_err());
    assert!(
        node.log_text()
            .contains("Failed to rejoin ensemble. It's already a member of cloud."),
        "{}",
        node.log_text()
    );
    assert_eq!(admin.ready().await?, Readiness::Ready);

    node.guard.signal(15);
    wait_gone(&client, &path, Duration::from_secs(2)).await?;
    let st = node.wait_exit(Duration::from_secs(3), "SIGTERM").await?;
    assert_eq!(st.code(), Some(0));
    Ok(())
}

/// Sends `req` in pieces of `piece` bytes and reads exactly `expect.len()` bytes of reply.
fn pipelined(addr: &str, req: &[u8], piece: usize, expect: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    for chunk in req.chunks(piece) {
        s.write_all(chunk)?;
    }
    let mut out = vec![0u8; expect.len()];
    s.read_exact(&mut out)
        .map_err(|e| anyhow::anyhow!("reading {} reply bytes: {e}", expect.len()))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The proxy keeps replies in request order when a client pipelines: intercepted commands
/// (`ready`, `zkensemble ...`) between memcached commands, the client's own `mn`, and values whose
/// bytes look like commands (never intercepted), in one write and in small pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_admin_commands_keep_order() -> anyhow::Result<()> {
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-p"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("{ip}:{port}"), "svc-p").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "pipe-mc-0", &[]);
    let path = format!("/arcus/cache_list/svc-p/{}", node.node_name());
    wait_znode(&client, &path, Duration::from_secs(20)).await?;
    wait_until(Duration::from_secs(5), "ready to answer READY", || async {
        let r = memcached_roundtrip(&node.addr(), "ready\r\n", "\r\n").ok()?;
        (r == "READY\r\n").then_some(())
    })
    .await?;

    let req = "set k 0 0 7\r\nready\r\n\r\n\
        ready\r\n\
        get k\r\n\
        set k2 0 0 19\r\nzkensemble rejoin\r\n\r\n\
        ready\r\n\
        mn\r\n\
        zkensemble rejoin\r\n\
        get k2 k\r\n\
        zkensemble get\r\n\
        set k3 0 0 4 noreply\r\nmn\r\n\r\n\
        zkensemble set 127.0.0.1:1\r\n\
        zkensemble bogus\r\n\
        get k3\r\n\
        ready\r\n\
        mn\r\n";
    let expect = format!(
        "STORED\r\n\
        READY\r\n\
        VALUE k 0 7\r\nready\r\n\r\nEND\r\n\
        STORED\r\n\
        READY\r\n\
        MN\r\n\
        ERROR failed to rejoin ensemble\r\n\
        VALUE k2 0 19\r\nzkensemble rejoin\r\n\r\nVALUE k 0 7\r\nready\r\n\r\nEND\r\n\
        {}\r\n\n\r\n\
        ERROR failed to set the new ensemble address (check logs)\r\n\
        CLIENT_ERROR bad command line format\r\n\
        VALUE k3 0 4\r\nmn\r\n\r\nEND\r\n\
        READY\r\n\
        MN\r\n",
        zks.addr()
    );
    for piece in [req.len(), 3, 1] {
        let got = pipelined(&node.addr(), req.as_bytes(), piece, &expect)?;
        assert_eq!(got, expect, "written in pieces of {piece} bytes");
    }
    // nothing left over on the connection after the last reply
    let mut s = TcpStream::connect(node.addr())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"ready\r\nquit\r\n")?;
    let mut rest = String::new();
    s.read_to_string(&mut rest)?;
    assert_eq!(rest, "READY\r\n");

    node.guard.signal(15);
    let st = node.wait_exit(Duration::from_secs(3), "SIGTERM").await?;
    assert_eq!(st.code(), Some(0), "log:\n{}", node.log_text());
    assert!(
        !node.log_text().contains("MN without a queued request"),
        "{}",
        node.log_text()
    );
    Ok(())
}

/// memcached dying by itself: the stand-in closes its session (znode gone at once) and exits
/// with memcached's status (128 + 9 for SIGKILL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_death_closes_session() -> anyhow::Result<()> {
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-k"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("{ip}:{port}"), "svc-k").await?;
    let mut node = StandIn::start(&zks.addr(), &ip, port, "killed-mc-0", &[]);
    let path = format!("/arcus/cache_list/svc-k/{}", node.node_name());
    wait_znode(&client, &path, Duration::from_secs(20)).await?;

    let log = node.log_text();
    let pid: i32 = log
        .lines()
        .find_map(|l| l.split("memcached pid ").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memcached pid in log:\n{log}"));
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    assert!(st.success());
    // Well below the 30 s session timeout: the session is closed, not left to expire (5 s, not
    // less, leaves room for a loaded CI machine).
    let gone = wait_gone(&client, &path, Duration::from_secs(5)).await?;
    let st = node
        .wait_exit(Duration::from_secs(3), "memcached killed")
        .await?;
    eprintln!("memcached killed: znode gone after {gone:?}, stand-in exit {st}");
    assert_eq!(st.code(), Some(128 + 9), "log:\n{}", node.log_text());
    Ok(())
}

/// Bad command lines, no ZooKeeper needed: unknown flag → 64; a persistence engine config →
/// `Unsupported key: <use_persistence>` and exit 1 (the real server crashes with 139).
#[tokio::test]
async fn bad_command_lines() -> anyhow::Result<()> {
    let out = Command::new(standin_bin())
        .args(["-p", "11211", "-Q"])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown option -Q"), "{err}");

    let out = Command::new(standin_bin())
        .args([
            "-p",
            "11211",
            "-z",
            "127.0.0.1:1",
            "-e",
            "use_persistence=true;data_path=/tmp/x;logs_path=/tmp/y",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l == "Unsupported key: <use_persistence>"),
        "{err}"
    );
    Ok(())
}

/// `sandbox/images/zookeeper-run` in `dir` with `env`; output to `dir/zk.log`.
fn zookeeper_run(dir: &std::path::Path, env: &[(&str, String)]) -> anyhow::Result<ChildGuard> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new(repo_root().join("sandbox/images/zookeeper-run"));
    cmd.arg("start-foreground").current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard::spawn("zookeeper-run", cmd, &dir.join("zk.log"))
}

/// A four-letter word's answer, or "" when the server does not answer.
fn four_letter(addr: &str, word: &str) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(500))
    else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(word.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// zookeeper-run: standalone on the pod's own IP; a bad environment is refused with exit 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_run_standalone() -> anyhow::Result<()> {
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    let dir = std::env::temp_dir().join(format!("arcus-test-zkrun-{}-{ip}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _zk = zookeeper_run(
        &dir,
        &[
            ("POD_IP", ip.clone()),
            ("ZOO_CLIENT_PORT", port.to_string()),
        ],
    )?;
    let addr = format!("{ip}:{port}");
    wait_until(
        Duration::from_secs(60),
        &format!("zookeeper-run at {addr}"),
        || async {
            four_letter(&addr, "srvr")
                .contains("Mode: standalone")
                .then_some(())
        },
    )
    .await?;
    let cfg = std::fs::read_to_string(dir.join("conf/zoo.cfg"))?;
    for line in [
        format!("clientPortAddress={ip}"),
        "admin.enableServer=false".into(),
        "4lw.commands.whitelist=*".into(),
        "reconfigEnabled=true".into(),
    ] {
        assert!(cfg.lines().any(|l| l == line), "{line} missing in:\n{cfg}");
    }
    assert!(!cfg.contains("standaloneEnabled=false"), "{cfg}");
    assert_eq!(std::fs::read_to_string(dir.join("data/myid"))?.trim(), "1");
    let client = zk::Client::connect(&addr).await?;
    arcus_tree(&client, &["svc"]).await?;
    drop(client);

    // no address to bind, or 0.0.0.0: refused
    for env in [vec![], vec![("BIND_ADDRESS", "0.0.0.0".to_string())]] {
        let mut cmd = Command::new(repo_root().join("sandbox/images/zookeeper-run"));
        cmd.current_dir(&dir)
            .env_remove("POD_IP")
            .env_remove("BIND_ADDRESS");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output()?;
        assert_eq!(out.status.code(), Some(64), "{env:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("zookeeper-run:"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// zookeeper-run: a 3-server ensemble from ZOO_SERVERS, one 127.x address per server; a write
/// through one server is read through another, and the stand-in registers through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_run_ensemble() -> anyhow::Result<()> {
    let ips: Vec<String> = (0..3).map(|_| unique_loopback_ip()).collect();
    let port = 2181;
    let servers = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| format!("server.{}={ip}:2888:3888;{port}", i + 1))
        .collect::<Vec<_>>()
        .join(" ");
    let base = std::env::temp_dir().join(format!(
        "arcus-test-zkens-{}-{}",
        std::process::id(),
        ips[0]
    ));
    let _ = std::fs::remove_dir_all(&base);
    let mut guards = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let env = [
            ("ZOO_MY_ID", (i + 1).to_string()),
            ("ZOO_SERVERS", servers.clone()),
            ("POD_IP", ip.clone()),
        ];
        guards.push(zookeeper_run(&base.join(format!("zk{}", i + 1)), &env)?);
    }
    let addrs: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
    wait_until(
        Duration::from_secs(90),
        "a 3-server ensemble with one leader",
        || async {
            let modes: Vec<String> = addrs.iter().map(|a| four_letter(a, "srvr")).collect();
            let leaders = modes.iter().filter(|m| m.contains("Mode: leader")).count();
            let followers = modes
                .iter()
                .filter(|m| m.contains("Mode: follower"))
                .count();
            (leaders == 1 && followers == 2).then_some(())
        },
    )
    .await?;
    let cfg = std::fs::read_to_string(base.join("zk1/conf/zoo.cfg"))?;
    assert!(cfg.contains("standaloneEnabled=false"), "{cfg}");

    let c1 = zk::Client::connect(&addrs[0]).await?;
    arcus_tree(&c1, &["svc-e"]).await?;
    let node_ip = unique_loopback_ip();
    let node_port = free_port(&node_ip);
    map(&c1, &format!("{node_ip}:{node_port}"), "svc-e").await?;
    let c3 = zk::Client::connect(&addrs[2]).await?;
    c3.sync("/arcus").await?;
    assert_eq!(
        c3.list_children("/arcus/cache_server_mapping").await?,
        vec![format!("{node_ip}:{node_port}")]
    );

    let mut node = StandIn::start(&addrs.join(","), &node_ip, node_port, "ens-mc-0", &[]);
    let path = format!("/arcus/cache_list/svc-e/{}", node.node_name());
    wait_znode(&c3, &path, Duration::from_secs(20)).await?;
    node.guard.signal(15);
    assert_eq!(
        node.wait_exit(Duration::from_secs(3), "SIGTERM")
            .await?
            .code(),
        Some(0)
    );
    drop((c1, c3));
    drop(guards);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// `scan key` as arcus-memcached has it: every key present for the whole scan is listed once
/// (here 20,000 keys, listed in pages of 1,000 while a writer rewrites them, which is what made
/// stock memcached's LRU listing skip one), expired keys are not, a cursor continues a scan,
/// and the operator therefore lists stand-in nodes with `scan` like ARCUS nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_key_lists_every_key_present_for_the_whole_scan() -> anyhow::Result<()> {
    const KEYS: usize = 20_000;
    let zks = ZkServer::start()?;
    let client = zk::Client::connect(&zks.addr()).await?;
    arcus_tree(&client, &["svc-scan"]).await?;
    let ip = unique_loopback_ip();
    let port = free_port(&ip);
    map(&client, &format!("{ip}:{port}"), "svc-scan").await?;
    let node = StandIn::start(&zks.addr(), &ip, port, "scan-mc-0", &[]);
    let path = format!("/arcus/cache_list/svc-scan/{}", node.node_name());
    wait_znode(&client, &path, Duration::from_secs(20)).await?;
    let addr = node.addr();
    let mc = node_client(&addr);
    for i in 0..KEYS {
        mc.set(&format!("s:{i}"), format!("v{i}"), 0, 0).await?;
    }
    mc.set("s:short", "x", 0, 1).await?;
    let admin = AdminClient::new(&addr);
    assert_eq!(
        arcus_operator::migration::keys::detect_listing(&addr, Duration::from_secs(2)).await?,
        arcus_operator::migration::keys::Listing::Scan
    );
    // Lets the 1 s key expire (its expiry is what is checked).
    wait_until(Duration::from_secs(10), "s:short to expire", || async {
        mc.get("s:short").await.ok()?.is_none().then_some(())
    })
    .await?;
    let writer = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mc = node_client(&addr);
            let mut n = 0;
            for round in 0..5 {
                for i in (0..KEYS).step_by(7) {
                    let _ = mc
                        .set(&format!("s:{i}"), format!("w{round}-{i}"), 0, 0)
                        .await;
                    n += 1;
                }
            }
            n
        })
    };
    let opts = arcus_client::ScanOptions {
        count: Some(1000),
        ..Default::default()
    };
    let mut cursor = "0".to_string();
    let mut listed = Vec::new();
    let mut pages = 0;
    loop {
        let page = admin.scan_keys(&cursor, &opts).await?;
        pages += 1;
        listed.extend(page.keys.iter().map(|k| k.key.clone()));
        anyhow::ensure!(
            page.keys.iter().all(|k| k.exptime == 0),
            "a key with an expiry"
        );
        if page.is_last() {
            break;
        }
        cursor = page.next_cursor;
    }
    let writes = writer.await?;
    listed.sort();
    let n = listed.len();
    listed.dedup();
    anyhow::ensure!(n == listed.len(), "{} keys listed twice", n - listed.len());
    anyhow::ensure!(
        !listed.iter().any(|k| k == "s:short"),
        "an expired key was listed"
    );
    let missing: Vec<String> = (0..KEYS)
        .map(|i| format!("s:{i}"))
        .filter(|k| listed.binary_search(k).is_err())
        .collect();
    eprintln!(
        "scan: {n} keys in {pages} pages while {writes} writes ran; {} missing",
        missing.len()
    );
    anyhow::ensure!(
        missing.is_empty(),
        "keys not listed: {:?}",
        &missing[..missing.len().min(5)]
    );
    let unknown = admin.scan_keys("9.0", &opts).await;
    anyhow::ensure!(
        unknown
            .as_ref()
            .is_err_and(|e| e.to_string().contains("cursor")),
        "an unknown cursor is not refused: {unknown:?}"
    );
    Ok(())
}

/// A client of the one node at `addr`.
fn node_client(addr: &str) -> arcus_client::ArcusClient {
    arcus_client::ArcusClient::with_nodes(
        vec![addr.to_string()],
        arcus_client::ClientOptions {
            op_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
}
