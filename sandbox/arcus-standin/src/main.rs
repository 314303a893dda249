//! arcus-standin: the sandbox's stand-in for arcus-memcached. Runs Debian's stock memcached with
//! the translated command line on a private unix socket, behind a proxy on the client port that
//! answers `ready` and `zkensemble` itself, and does what arcus-memcached does in ZooKeeper
//! (see README.md).
//! Sandbox only; not part of the product.

mod args;
mod proxy;
mod registration;
mod scan;

use args::{EngineConfig, ServerArgs, EX_USAGE};
use proxy::{NodeStatus, RejoinRequest};
use registration::{Identity, Watch, WatchOutcome};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};
use zookeeper_client as zk;

/// EX_TEMPFAIL: ZooKeeper session expired (arcus-memcached with `zk_failstop on`).
const EX_TEMPFAIL: u8 = 75;
/// EX_PROTOCOL: no mapping, or registration failed.
const EX_PROTOCOL: u8 = 76;
/// EX_NOPERM: ZooKeeper authentication failed.
const EX_NOPERM: u8 = 77;
/// EX_OSERR: what memcached exits with when it cannot listen on its TCP port.
const EX_OSERR: u8 = 71;
/// How long memcached may take to accept connections after it was started.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long memcached gets to exit after SIGTERM before SIGKILL.
const MEMCACHED_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for ZooKeeper to confirm closing the session.
const CLOSE_LIMIT: Duration = Duration::from_millis(1000);
/// How long arcus-memcached keeps its ZooKeeper handle after it saw its own znode deleted:
/// it pauses at once (`ready` answers NOT_READY) and closes the handle on the state machine's
/// next turn, a 100 ms retry (`sm_set_retry_ms(retry_ms, 100)` in arcus_zk.c). A rejoin in
/// between fails: "already a member of cloud".
const MC_PAUSE_CLOSE: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,zookeeper_client=warn")
            }),
        )
        .init();

    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match ServerArgs::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("arcus-standin: {e}");
            eprintln!("{}", args::USAGE);
            return ExitCode::from(EX_USAGE);
        }
    };
    info!(
        "arcus-standin (stock memcached + arcus ZooKeeper behaviour) args: {}",
        argv.join(" ")
    );

    if let Some(config) = &args.engine_config {
        match args::check_engine_config(config, &|p| std::fs::read_to_string(p)) {
            Ok(EngineConfig::Ignored(keys)) if !keys.is_empty() => {
                warn!("engine config keys ignored by the stand-in (stock memcached has no such settings): {}", keys.join(", "))
            }
            Ok(EngineConfig::Ignored(_)) => {}
            Ok(EngineConfig::Unsupported(key)) => {
                // The very line a build of arcus-memcached without --enable-persistence prints.
                eprintln!("Unsupported key: <{key}>");
                error!(
                    "engine config key {key:?} needs an arcus-memcached built with --enable-persistence; \
                     the real server crashes here (exit 139), the stand-in exits 1"
                );
                return ExitCode::from(1);
            }
            Err(e) => {
                error!("{e}");
                return ExitCode::from(1);
            }
        }
    }

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The client proxy gets its own worker threads (as many as memcached's -t) so that it does
    // not serialise memcached's threads.
    let proxy_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.unwrap_or(4).clamp(1, 64) as usize)
        .thread_name("standin-proxy")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the proxy's async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // A current-thread runtime: memcached is spawned (with PR_SET_PDEATHSIG) from the main
    // thread, which lives as long as the process.
    let code = rt.block_on(run(args, proxy_rt.handle().clone()));
    proxy_rt.shutdown_background();
    ExitCode::from(code)
}

/// The private directory of memcached's unix socket; removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    /// `$TMPDIR/arcus-standin.<pid>.<n>` (`/tmp` when that path would be too long for a unix
    /// socket), mode 0700; handed to `-u <user>` when running as root, since memcached drops to
    /// that user before it creates the socket.
    fn create(user: Option<&str>) -> Result<SocketDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("arcus-standin.{}.{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {} for memcached's unix socket: {e} (set TMPDIR to a writable directory)", dir.display()))?;
        let dir = SocketDir(dir);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if let Some(user) = user.filter(|u| *u != "root") {
                dir.chown_to(user)?;
            }
        }
        Ok(dir)
    }

    fn chown_to(&self, user: &str) -> Result<(), String> {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::CString::new(user).map_err(|_| format!("bad -u user {user:?}"))?;
        // SAFETY: getpwnam returns NULL or a pointer to a static passwd entry we read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return Err(format!(
                "-u {user}: no such user (memcached would refuse it too)"
            ));
        }
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        let path = std::ffi::CString::new(self.0.as_os_str().as_bytes())
            .map_err(|_| format!("bad path {}", self.0.display()))?;
        // SAFETY: chown on a NUL-terminated path we own.
        if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
            return Err(format!(
                "cannot hand {} to user {user}: {}",
                self.0.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn socket(&self) -> PathBuf {
        self.0.join("memcached.sock")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn run(args: ServerArgs, proxy_rt: tokio::runtime::Handle) -> u8 {
    let mut signals = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Signals { term, int },
        (Err(e), _) | (_, Err(e)) => {
            error!("cannot install signal handlers: {e}");
            return 1;
        }
    };

    // 1. memcached, on a unix socket in a private directory (removed when `run` returns).
    let sock_dir = match SocketDir::create(args.user.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let sock = sock_dir.socket();
    let mut child = match spawn_memcached(&args, &sock) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    tokio::select! {
        biased;
        sig = signals.recv() => {
            info!("{sig} before memcached accepted: stopping memcached");
            stop_memcached(&mut child, &sock).await;
            return 0;
        }
        r = wait_accepting(&mut child, &sock) => match r {
            Ok(()) => {}
            Err(Some(st)) => {
                error!("memcached exited before accepting connections ({})", describe(st));
                return exit_code(st);
            }
            Err(None) => {
                error!("memcached did not accept connections on {} within {ACCEPT_TIMEOUT:?}; stopping it", sock.display());
                stop_memcached(&mut child, &sock).await;
                return 1;
            }
        }
    }

    // 2. The client port: the stand-in's proxy, which answers `ready` and `zkensemble` itself.
    let (status, mut rejoin_requests) = NodeStatus::new(args.zk_ensemble.as_deref());
    status.set_upstream(sock.to_path_buf());
    let probe = format!("{}:{}", args.probe_ip(), args.port());
    match start_proxy(&proxy_rt, &args, &sock, status.clone()).await {
        Ok(addrs) => info!(
            "memcached accepts connections on {probe} (proxy on {}; memcached itself on {})",
            addrs.join(", "),
            sock.display()
        ),
        Err(e) => {
            error!("{e}");
            stop_memcached(&mut child, &sock).await;
            info!("exit {EX_OSERR}");
            return EX_OSERR;
        }
    }

    let Some(ensemble) = args.zk_ensemble.clone() else {
        warn!("no -z: running as a plain memcached without ZooKeeper (like arcus-memcached without -z)");
        tokio::select! {
            sig = signals.recv() => {
                info!("{sig}: stopping memcached");
                stop_memcached(&mut child, &sock).await;
                info!("exit 0");
                return 0;
            }
            st = child.wait() => {
                let st = st.map_err(|e| error!("waiting for memcached: {e}")).ok();
                return st.map(|st| { error!("memcached exited by itself ({})", describe(st)); exit_code(st) }).unwrap_or(1);
            }
        }
    };

    // 3. ZooKeeper registration, interruptible by a signal or memcached's death.
    let registered = tokio::select! {
        biased;
        sig = signals.recv() => {
            info!("{sig} during ZooKeeper registration: stopping memcached");
            stop_memcached(&mut child, &sock).await;
            return 0;
        }
        st = child.wait() => {
            let code = st.map(|st| { error!("memcached exited by itself ({})", describe(st)); exit_code(st) }).unwrap_or(1);
            return code;
        }
        r = register(&args, &ensemble) => r,
    };
    let (client, identity, own_path, svc) = match registered {
        Ok(r) => r,
        Err((code, client, msg)) => {
            error!("{msg}");
            if let Some(client) = client {
                registration::close_session(client, CLOSE_LIMIT).await;
            }
            info!("stopping memcached");
            stop_memcached(&mut child, &sock).await;
            info!("exit {code}");
            return code;
        }
    };
    status.set_session(true);
    status.set_registered(true);

    // 4. Serve until a signal, memcached's death, or session expiry.
    let mut session = client.session().clone();
    let (session_timeout, _) = args.zk_session_timeout();
    let list_path = format!("{}/{svc}", registration::CACHE_LIST_ROOT);
    // None once the session is closed on purpose (own znode deleted), so that its end is not
    // taken for an unexpected close.
    let mut state = Some(client.state_watcher());
    let mut own_watch: Option<Watch> = Some(registration::watch_node(
        client.clone(),
        own_path.clone(),
        Duration::ZERO,
    ));
    let mut list_watch: Option<Watch> = Some(registration::watch_children(
        client.clone(),
        list_path.clone(),
        Duration::ZERO,
    ));
    // None while the client library has given up the session and we ask the ensemble whether
    // it is really expired (see `resume`), and after the node left the cluster.
    let mut client = Some(client);
    let mut resuming: Option<Resume> = None;
    let mut rejoining: Option<(Rejoin, RejoinRequest)> = None;
    // Set while paused after the own znode was deleted, until the session is closed.
    let mut pausing: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    info!("serving as {} in {list_path}", identity.node_name());

    loop {
        tokio::select! {
            biased;
            sig = signals.recv() => {
                status.set_registered(false);
                drop(pausing.take());
                drop(own_watch.take());
                drop(list_watch.take());
                drop(resuming.take());
                drop(rejoining.take());
                if let Some(client) = client.take() {
                    info!("{sig}: closing the ZooKeeper session first (the ephemeral znode goes with it)");
                    registration::close_session(client, CLOSE_LIMIT).await;
                } else {
                    info!("{sig}: no live ZooKeeper session to close");
                }
                info!("stopping memcached");
                stop_memcached(&mut child, &sock).await;
                info!("exit 0");
                return 0;
            }
            st = child.wait() => {
                let code = match st {
                    Ok(st) => { error!("memcached exited by itself ({}); closing the ZooKeeper session", describe(st)); exit_code(st) }
                    Err(e) => { error!("waiting for memcached: {e}"); 1 }
                };
                drop(own_watch.take());
                drop(list_watch.take());
                drop(resuming.take());
                drop(rejoining.take());
                if let Some(client) = client.take() {
                    registration::close_session(client, CLOSE_LIMIT).await;
                }
                info!("exit {code}");
                return code;
            }
            s = poll_state(&mut state) => match s {
                zk::SessionState::Expired => {
                    // The client library also reports Expired when it found no server within the
                    // session timeout; the session may still be alive in the ensemble (ZooKeeper
                    // keeps sessions across a full outage). arcus-memcached's C client keeps
                    // trying, so ask the ensemble with the same session id and password.
                    warn!(
                        "ZooKeeper session {} reported expired by the client library; asking the ensemble \
                         (still serving meanwhile)",
                        session.id()
                    );
                    state = None;
                    drop(own_watch.take());
                    drop(list_watch.take());
                    drop(client.take());
                    resuming = Some(resume(ensemble.clone(), session.clone(), session_timeout, Duration::ZERO));
                }
                zk::SessionState::AuthFailed => {
                    error!("ZooKeeper authentication failed: stopping memcached");
                    drop(client.take());
                    stop_memcached(&mut child, &sock).await;
                    return EX_NOPERM;
                }
                zk::SessionState::Disconnected => {
                    warn!("ZooKeeper connection lost; still serving (the session lives until it expires)")
                }
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    info!("ZooKeeper connection re-established ({s}), same session")
                }
                zk::SessionState::Closed => {
                    error!("ZooKeeper session closed unexpectedly: stopping memcached");
                    stop_memcached(&mut child, &sock).await;
                    return EX_TEMPFAIL;
                }
            },
            r = poll_resume(&mut resuming) => match r {
                Ok(c) => {
                    info!("ZooKeeper session {} resumed: it was not expired", c.session_id());
                    state = Some(c.state_watcher());
                    own_watch = Some(registration::watch_node(c.clone(), own_path.clone(), Duration::ZERO));
                    list_watch = Some(registration::watch_children(c.clone(), list_path.clone(), Duration::ZERO));
                    client = Some(c);
                }
                Err(zk::Error::SessionExpired) if status.failstop() => {
                    error!("ZooKeeper session expired: stopping memcached and exiting 75 (arcus-memcached with zk_failstop on)");
                    status.set_registered(false);
                    stop_memcached(&mut child, &sock).await;
                    info!("exit {EX_TEMPFAIL}");
                    return EX_TEMPFAIL;
                }
                Err(zk::Error::SessionExpired) => {
                    // arcus_zk.c with zk_failstop off: mc_pause; memcached keeps serving, the
                    // node is out of the cluster until `zkensemble rejoin`.
                    warn!("ZOO_SESSION_EVENT Expired. pausing memcached (zk_failstop: off)");
                    status.set_registered(false);
                    status.set_session(false);
                    info!("waiting for `zkensemble rejoin`");
                }
                Err(e) => {
                    warn!("ZooKeeper still unreachable ({e}); still serving; asking again in 1 s");
                    resuming = Some(resume(ensemble.clone(), session.clone(), session_timeout, Duration::from_secs(1)));
                }
            },
            out = poll_watch(&mut own_watch) => {
                if let Some(c) = &client {
                    match handle_own_watch(out, c, &own_path) {
                        OwnZnode::Watch(w) => own_watch = w,
                        OwnZnode::Gone => {
                            // Like arcus_zk.c: mc_pause at once (NOT_READY), zookeeper_close on
                            // the next state-machine turn; out of the cluster for good until
                            // `zkensemble rejoin`; memcached keeps serving.
                            status.set_registered(false);
                            warn!(
                                "own znode {own_path} was deleted by someone else: this node LEFT the cluster; \
                                 My ephemeral znode in cache_list is deleted. Please check and rejoin. \
                                 Still serving; `ready` answers NOT_READY until `zkensemble rejoin`"
                            );
                            drop(list_watch.take());
                            pausing = Some(Box::pin(tokio::time::sleep(MC_PAUSE_CLOSE)));
                        }
                    }
                }
            }
            () = poll_pause(&mut pausing) => {
                pausing = None;
                state = None;
                if let Some(c) = client.take() {
                    registration::close_session(c, CLOSE_LIMIT).await;
                }
                status.set_session(false);
                warn!("zk connection closed by mc_pause.");
                info!("waiting for `zkensemble rejoin`");
            }
            out = poll_watch(&mut list_watch) => {
                if let Some(c) = &client {
                    list_watch = match out {
                        WatchOutcome::Children(ev) if ev.event_type == zk::EventType::Session => None,
                        WatchOutcome::Children(_) => Some(registration::watch_children(c.clone(), list_path.clone(), Duration::ZERO)),
                        WatchOutcome::Failed(e) => retry_after_failure(e, || registration::watch_children(c.clone(), list_path.clone(), Duration::from_secs(1))),
                        WatchOutcome::Node(_) | WatchOutcome::NodeMissing => None,
                    };
                }
            }
            Some(reply) = rejoin_requests.recv() => {
                if client.is_some() || resuming.is_some() {
                    // arcus_zk_rejoin_ensemble's words when main_zk->zh is still set.
                    warn!("Failed to rejoin ensemble. It's already a member of cloud.");
                    let _ = reply.send(false);
                } else if rejoining.is_some() {
                    warn!("zkensemble rejoin: another rejoin is in progress; this one fails");
                    let _ = reply.send(false);
                } else {
                    info!("zkensemble rejoin: opening a new ZooKeeper session to {ensemble}");
                    let fut = rejoin(ensemble.clone(), session_timeout, svc.clone(), identity.clone(), args.memlimit_mb());
                    rejoining = Some((fut, reply));
                }
            }
            (r, reply) = poll_rejoin(&mut rejoining) => match r {
                Ok(c) => {
                    session = c.session().clone();
                    state = Some(c.state_watcher());
                    own_watch = Some(registration::watch_node(c.clone(), own_path.clone(), Duration::ZERO));
                    // re-reads cache_list (logged) and watches it, as the real rejoin does
                    list_watch = Some(registration::watch_children(c.clone(), list_path.clone(), Duration::ZERO));
                    client = Some(c);
                    status.set_session(true);
                    status.set_registered(true);
                    info!("rejoined the ARCUS cache cloud for service {svc:?} as {}", identity.node_name());
                    let _ = reply.send(true);
                }
                Err((c, msg)) => {
                    error!("zkensemble rejoin failed: {msg}; still out of the cluster (send `zkensemble rejoin` again)");
                    if let Some(c) = c {
                        registration::close_session(c, CLOSE_LIMIT).await;
                    }
                    let _ = reply.send(false);
                }
            },
        }
    }
}

/// Binds every listen address on the proxy runtime and starts accepting there.
/// Returns the bound addresses.
async fn start_proxy(
    rt: &tokio::runtime::Handle,
    args: &ServerArgs,
    sock: &Path,
    status: Arc<NodeStatus>,
) -> Result<Vec<String>, String> {
    let addrs = args.listen_addrs();
    let backlog = args.backlog();
    let upstream = Arc::new(sock.to_path_buf());
    // Listeners are created on the runtime that drives them.
    let bound = rt.spawn(async move {
        let mut out = Vec::new();
        for addr in &addrs {
            match proxy::bind(addr, backlog).await {
                Ok(l) => out.push(l),
                Err(e) => {
                    return Err(format!(
                        "cannot listen on TCP {addr}: {e} (another server may use this port; choose another -p or -l)"
                    ))
                }
            }
        }
        let names = out
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()).unwrap_or_default())
            .collect();
        for l in out {
            tokio::spawn(proxy::accept_loop(l, upstream.clone(), status.clone()));
        }
        Ok(names)
    });
    bound
        .await
        .map_err(|e| format!("the proxy's listener task failed: {e}"))?
}

type Rejoin = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<zk::Client, (Option<zk::Client>, String)>> + Send>,
>;

/// `zkensemble rejoin` (arcus_zk_rejoin_ensemble): a new session, the same ephemeral znode
/// (service code from the start, the mapping is not read again), then a `rejoin` log entry.
fn rejoin(
    ensemble: String,
    timeout: Duration,
    svc: String,
    identity: Identity,
    memlimit_mb: u64,
) -> Rejoin {
    Box::pin(async move {
        let client = registration::connect(&ensemble, timeout)
            .await
            .map_err(|e| (None, e))?;
        info!("ZooKeeper session {} established", client.session_id());
        let path = match registration::create_cache_list_znode(
            &client,
            &svc,
            &identity,
            memlimit_mb,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => return Err((Some(client), e)),
        };
        info!("created ephemeral {path} with data {memlimit_mb}MB");
        match registration::log_activity(&client, &identity, "rejoin").await {
            Ok(p) => info!("logged rejoin at {p}"),
            Err(e) => warn!("cannot log this activity: {e}"),
        }
        Ok(client)
    })
}

async fn poll_rejoin(
    r: &mut Option<(Rejoin, RejoinRequest)>,
) -> (
    Result<zk::Client, (Option<zk::Client>, String)>,
    RejoinRequest,
) {
    match r.as_mut() {
        Some((f, _)) => {
            let out = f.await;
            let (_, reply) = r.take().expect("checked above");
            (out, reply)
        }
        None => std::future::pending().await,
    }
}

async fn poll_pause(p: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match p.as_mut() {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn poll_state(s: &mut Option<zk::StateWatcher>) -> zk::SessionState {
    match s.as_mut() {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

type Resume =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<zk::Client, zk::Error>> + Send>>;

/// Re-establishes `session` (same id and password), after `delay`. Err(SessionExpired) means the
/// ensemble says it is gone; other errors mean no server answered.
fn resume(
    ensemble: String,
    session: zk::SessionInfo,
    timeout: Duration,
    delay: Duration,
) -> Resume {
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        let connector = zk::Client::connector()
            .with_session_timeout(timeout)
            .with_session(session)
            .with_fail_eagerly();
        match tokio::time::timeout(timeout, connector.connect(&ensemble)).await {
            Ok(r) => r,
            Err(_) => Err(zk::Error::Timeout),
        }
    })
}

async fn poll_resume(r: &mut Option<Resume>) -> Result<zk::Client, zk::Error> {
    match r.as_mut() {
        Some(f) => {
            let out = f.await;
            *r = None;
            out
        }
        None => std::future::pending().await,
    }
}

/// Awaits the watch if any; pending forever when there is none.
async fn poll_watch(w: &mut Option<Watch>) -> WatchOutcome {
    match w.as_mut() {
        Some(f) => {
            let out = f.await;
            *w = None;
            out
        }
        None => std::future::pending().await,
    }
}

fn retry_after_failure(e: zk::Error, rearm: impl FnOnce() -> Watch) -> Option<Watch> {
    match e {
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed => None,
        e => {
            warn!("cannot arm a ZooKeeper watch ({e}); retrying in 1 s");
            Some(rearm())
        }
    }
}

/// What the own-znode watch says.
enum OwnZnode {
    /// Still there: the next watch (None once the session is over).
    Watch(Option<Watch>),
    /// Deleted by someone else (or found missing when re-arming).
    Gone,
}

fn handle_own_watch(out: WatchOutcome, client: &zk::Client, own_path: &str) -> OwnZnode {
    let rearm = |d| {
        OwnZnode::Watch(Some(registration::watch_node(
            client.clone(),
            own_path.to_string(),
            d,
        )))
    };
    match out {
        WatchOutcome::Node(ev) => match ev.event_type {
            zk::EventType::Session => OwnZnode::Watch(None),
            zk::EventType::NodeDeleted => OwnZnode::Gone,
            _ => rearm(Duration::ZERO),
        },
        WatchOutcome::NodeMissing => OwnZnode::Gone,
        WatchOutcome::Failed(e) => OwnZnode::Watch(retry_after_failure(e, || {
            registration::watch_node(client.clone(), own_path.to_string(), Duration::from_secs(1))
        })),
        WatchOutcome::Children(_) => OwnZnode::Watch(None),
    }
}

type RegisterError = (u8, Option<zk::Client>, String);

/// Identity → connect → mapping → ephemeral znode → join log entry.
async fn register(
    args: &ServerArgs,
    ensemble: &str,
) -> Result<(zk::Client, Identity, String, String), RegisterError> {
    let started = Instant::now();
    let identity = registration::resolve_identity(ensemble, args.port())
        .map_err(|e| (EX_PROTOCOL, None, e))?;
    let (timeout, note) = args.zk_session_timeout();
    if let Some(note) = note {
        warn!("{note}");
    }
    info!(
        "connecting to ZooKeeper {ensemble} (session timeout {} s)",
        timeout.as_secs()
    );
    let client = registration::connect(ensemble, timeout)
        .await
        .map_err(|e| (EX_PROTOCOL, None, e))?;
    info!(
        "ZooKeeper session {} established (negotiated timeout {} ms)",
        client.session_id(),
        client.session_timeout().as_millis()
    );
    let (mapping, svc) = match registration::find_service_code(&client, &identity).await {
        Ok(v) => v,
        Err(e) => return Err((EX_PROTOCOL, Some(client), e)),
    };
    info!("service code {svc:?} (from {mapping})");
    let own_path =
        match registration::create_cache_list_znode(&client, &svc, &identity, args.memlimit_mb())
            .await
        {
            Ok(p) => p,
            Err(e) => return Err((EX_PROTOCOL, Some(client), e)),
        };
    info!(
        "created ephemeral {own_path} with data {}MB",
        args.memlimit_mb()
    );
    match registration::log_activity(&client, &identity, "join").await {
        Ok(p) => info!("logged join at {p}"),
        Err(e) => warn!("cannot log this activity: {e}"),
    }
    info!(
        "joined the ARCUS cache cloud for service {svc:?} as {} (took {} ms)",
        identity.node_name(),
        started.elapsed().as_millis()
    );
    Ok((client, identity, own_path, svc))
}

fn spawn_memcached(args: &ServerArgs, sock: &Path) -> Result<Child, String> {
    let program =
        std::env::var("ARCUS_STANDIN_MEMCACHED").unwrap_or_else(|_| "/usr/bin/memcached".into());
    let margs = args.memcached_args(&sock.to_string_lossy());
    info!("starting {program} {}", margs.join(" "));
    let mut cmd = Command::new(&program);
    cmd.args(&margs)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // Its own process group, so that a signal to our group reaches us first and we decide the
    // order (ZooKeeper session first); PR_SET_PDEATHSIG so that it never outlives us (SIGKILL).
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    info!("memcached pid {}", child.id().unwrap_or(0));
    Ok(child)
}

/// Ok when memcached accepts on its unix socket `sock`; Err(Some) when memcached exited;
/// Err(None) on timeout.
async fn wait_accepting(child: &mut Child, sock: &Path) -> Result<(), Option<ExitStatus>> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Some(st));
        }
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::UnixStream::connect(sock),
        )
        .await
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, wait up to [`MEMCACHED_GRACE`], then SIGKILL.
///
/// Stock memcached's main thread only notices the signal when its event loop wakes up, which its
/// clock timer does once a second; a connection to its listener wakes it at once, so it exits in
/// milliseconds instead of up to a second.
async fn stop_memcached(child: &mut Child, sock: &Path) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid (not yet reaped, so not reused).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::UnixStream::connect(sock),
        )
        .await;
    }
    match tokio::time::timeout(MEMCACHED_GRACE, child.wait()).await {
        Ok(Ok(st)) => info!("memcached stopped ({})", describe(st)),
        Ok(Err(e)) => warn!("waiting for memcached: {e}"),
        Err(_) => {
            warn!("memcached ignored SIGTERM for {MEMCACHED_GRACE:?}; sending SIGKILL");
            let _ = child.kill().await;
        }
    }
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st}"),
    }
}

fn exit_code(st: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128u8.saturating_add(s as u8),
        _ => 1,
    }
}
