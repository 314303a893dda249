//! arcus-standin: the sandbox's stand-in for arcus-memcached. Runs Debian's stock memcached with
//! the translated command line and does what arcus-memcached does in ZooKeeper (see README.md).
//! Sandbox only; not part of the product.

mod args;
mod registration;

use args::{EngineConfig, ServerArgs, EX_USAGE};
use registration::{Identity, Watch, WatchOutcome};
use std::process::{ExitCode, ExitStatus};
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
/// How long memcached may take to accept connections after it was started.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long memcached gets to exit after SIGTERM before SIGKILL.
const MEMCACHED_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for ZooKeeper to confirm closing the session.
const CLOSE_LIMIT: Duration = Duration::from_millis(1000);

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
    // A current-thread runtime: memcached is spawned (with PR_SET_PDEATHSIG) from the main
    // thread, which lives as long as the process.
    ExitCode::from(rt.block_on(run(args)))
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

async fn run(args: ServerArgs) -> u8 {
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

    // 1. memcached
    let mut child = match spawn_memcached(&args) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let probe = format!("{}:{}", args.probe_ip(), args.port());
    tokio::select! {
        biased;
        sig = signals.recv() => {
            info!("{sig} before memcached accepted: stopping memcached");
            stop_memcached(&mut child, &probe).await;
            return 0;
        }
        r = wait_accepting(&mut child, &probe) => match r {
            Ok(()) => info!("memcached accepts connections on {probe}"),
            Err(Some(st)) => {
                error!("memcached exited before accepting connections ({})", describe(st));
                return exit_code(st);
            }
            Err(None) => {
                error!("memcached did not accept connections on {probe} within {ACCEPT_TIMEOUT:?}; stopping it");
                stop_memcached(&mut child, &probe).await;
                return 1;
            }
        }
    }

    let Some(ensemble) = args.zk_ensemble.clone() else {
        warn!("no -z: running as a plain memcached without ZooKeeper (like arcus-memcached without -z)");
        tokio::select! {
            sig = signals.recv() => {
                info!("{sig}: stopping memcached");
                stop_memcached(&mut child, &probe).await;
                info!("exit 0");
                return 0;
            }
            st = child.wait() => {
                let st = st.map_err(|e| error!("waiting for memcached: {e}")).ok();
                return st.map(|st| { error!("memcached exited by itself ({})", describe(st)); exit_code(st) }).unwrap_or(1);
            }
        }
    };

    // 2. ZooKeeper registration, interruptible by a signal or memcached's death.
    let registered = tokio::select! {
        biased;
        sig = signals.recv() => {
            info!("{sig} during ZooKeeper registration: stopping memcached");
            stop_memcached(&mut child, &probe).await;
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
            stop_memcached(&mut child, &probe).await;
            info!("exit {code}");
            return code;
        }
    };

    // 3. Serve until a signal, memcached's death, or session expiry.
    let session = client.session().clone();
    let (session_timeout, _) = args.zk_session_timeout();
    let list_path = format!("{}/{svc}", registration::CACHE_LIST_ROOT);
    let mut state = client.state_watcher();
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
    // it is really expired (see `resume`).
    let mut client = Some(client);
    let mut resuming: Option<Resume> = None;
    let mut in_cluster = true;
    info!("serving as {} in {list_path}", identity.node_name());

    loop {
        tokio::select! {
            biased;
            sig = signals.recv() => {
                drop(own_watch.take());
                drop(list_watch.take());
                drop(resuming.take());
                if let Some(client) = client.take() {
                    info!("{sig}: closing the ZooKeeper session first (the ephemeral znode goes with it)");
                    registration::close_session(client, CLOSE_LIMIT).await;
                } else {
                    info!("{sig}: no live ZooKeeper session to close");
                }
                info!("stopping memcached");
                stop_memcached(&mut child, &probe).await;
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
                if let Some(client) = client.take() {
                    registration::close_session(client, CLOSE_LIMIT).await;
                }
                info!("exit {code}");
                return code;
            }
            s = state.changed() => match s {
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
                    drop(own_watch.take());
                    drop(list_watch.take());
                    drop(client.take());
                    resuming = Some(resume(ensemble.clone(), session.clone(), session_timeout, Duration::ZERO));
                }
                zk::SessionState::AuthFailed => {
                    error!("ZooKeeper authentication failed: stopping memcached");
                    drop(client.take());
                    stop_memcached(&mut child, &probe).await;
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
                    stop_memcached(&mut child, &probe).await;
                    return EX_TEMPFAIL;
                }
            },
            r = poll_resume(&mut resuming) => match r {
                Ok(c) => {
                    info!("ZooKeeper session {} resumed: it was not expired", c.session_id());
                    state = c.state_watcher();
                    own_watch = Some(registration::watch_node(c.clone(), own_path.clone(), Duration::ZERO));
                    list_watch = Some(registration::watch_children(c.clone(), list_path.clone(), Duration::ZERO));
                    client = Some(c);
                }
                Err(zk::Error::SessionExpired) => {
                    error!("ZooKeeper session expired: stopping memcached and exiting 75 (arcus-memcached with zk_failstop on)");
                    stop_memcached(&mut child, &probe).await;
                    info!("exit {EX_TEMPFAIL}");
                    return EX_TEMPFAIL;
                }
                Err(e) => {
                    warn!("ZooKeeper still unreachable ({e}); still serving; asking again in 1 s");
                    resuming = Some(resume(ensemble.clone(), session.clone(), session_timeout, Duration::from_secs(1)));
                }
            },
            out = poll_watch(&mut own_watch) => {
                if let Some(c) = &client {
                    own_watch = handle_own_watch(out, c, &own_path, &mut in_cluster);
                }
            }
            out = poll_watch(&mut list_watch) => {
                if let Some(c) = &client {
                    list_watch = match out {
                        WatchOutcome::Children(ev) if ev.event_type == zk::EventType::Session => None,
                        WatchOutcome::Children(_) => Some(registration::watch_children(c.clone(), list_path.clone(), Duration::ZERO)),
                        WatchOutcome::Failed(e) => retry_after_failure(e, || registration::watch_children(c.clone(), list_path.clone(), Duration::from_secs(1))),
                        WatchOutcome::Node(_) => None,
                    };
                }
            }
        }
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

fn handle_own_watch(
    out: WatchOutcome,
    client: &zk::Client,
    own_path: &str,
    in_cluster: &mut bool,
) -> Option<Watch> {
    let rearm = |d| {
        Some(registration::watch_node(
            client.clone(),
            own_path.to_string(),
            d,
        ))
    };
    match out {
        WatchOutcome::Node(ev) => match ev.event_type {
            zk::EventType::Session => None,
            zk::EventType::NodeDeleted => {
                if *in_cluster {
                    *in_cluster = false;
                    warn!(
                        "own znode {own_path} was deleted by someone else: this node LEFT the cluster but keeps \
                         serving; the real server would wait for `zkensemble rejoin`, which stock memcached cannot \
                         answer: restart this node to rejoin"
                    );
                }
                rearm(Duration::ZERO)
            }
            zk::EventType::NodeCreated => {
                *in_cluster = true;
                warn!("own znode {own_path} was re-created by someone else (not owned by this session)");
                rearm(Duration::ZERO)
            }
            _ => rearm(Duration::ZERO),
        },
        WatchOutcome::Failed(e) => retry_after_failure(e, || {
            registration::watch_node(client.clone(), own_path.to_string(), Duration::from_secs(1))
        }),
        WatchOutcome::Children(_) => None,
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

fn spawn_memcached(args: &ServerArgs) -> Result<Child, String> {
    let program =
        std::env::var("ARCUS_STANDIN_MEMCACHED").unwrap_or_else(|_| "/usr/bin/memcached".into());
    let margs = args.memcached_args();
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

/// Ok when something accepts on `addr`; Err(Some) when memcached exited; Err(None) on timeout.
async fn wait_accepting(child: &mut Child, addr: &str) -> Result<(), Option<ExitStatus>> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Some(st));
        }
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
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
async fn stop_memcached(child: &mut Child, probe: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid (not yet reaped, so not reused).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(probe),
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
