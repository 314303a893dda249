//! Finds the cache nodes of a service code in ZooKeeper and keeps the ring current: reads and
//! watches the children of `/arcus/cache_list/<svc>`, rebuilds the ring on every change, and
//! rides out disconnects (the ZooKeeper client reconnects within its session) and session
//! expiry (we open a new session and watch again). While ZooKeeper is away the last known ring
//! stays in use, as the Java client does.

use crate::error::{Error, Result};
use crate::ClientOptions;
use std::time::Duration;
use tracing::{info, warn};
use zookeeper_client as zk;

/// `/arcus/cache_list/<svc>`.
pub fn cache_list_path(service_code: &str) -> String {
    format!("/arcus/cache_list/{service_code}")
}

/// A service code is one znode name: ARCUS caps it at 128 characters.
pub(crate) fn check_service_code(service_code: &str) -> Result<()> {
    if service_code.is_empty()
        || service_code.len() > 128
        || service_code.contains('/')
        || service_code.bytes().any(|b| b <= b' ' || b == 0x7f)
        || service_code == "."
        || service_code == ".."
    {
        return Err(Error::InvalidArgument(format!(
            "service code {service_code:?} must be 1..=128 characters, without '/', spaces or control characters"
        )));
    }
    Ok(())
}

/// Opens a ZooKeeper session, bounded by `zk_connect_timeout`.
pub(crate) async fn connect(zk_addrs: &str, opts: &ClientOptions) -> Result<zk::Client> {
    let connecting = zk::Client::connector()
        .with_session_timeout(opts.zk_session_timeout)
        .with_fail_eagerly()
        .connect(zk_addrs);
    match tokio::time::timeout(opts.zk_connect_timeout, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(zk::Error::BadArguments(why))) => Err(Error::InvalidArgument(format!(
            "ZooKeeper address {zk_addrs:?}: {why}"
        ))),
        Ok(Err(e)) => Err(Error::ZkUnreachable {
            zk: zk_addrs.to_string(),
            reason: "the session failed".into(),
            source: Some(e),
        }),
        Err(_) => Err(Error::ZkUnreachable {
            zk: zk_addrs.to_string(),
            reason: format!("no session within {:?}", opts.zk_connect_timeout),
            source: None,
        }),
    }
}

/// Where the watch on the node list stands, for callers that report health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryState {
    /// The node list is watched on a live session.
    Watching,
    /// The connection to ZooKeeper is lost but the session may still be alive; the ZooKeeper
    /// client is reconnecting. The last ring stays in use.
    Disconnected,
    /// The session ended (expired or closed); a new one is being opened. The last ring stays
    /// in use.
    Reconnecting,
    /// No ZooKeeper: a fixed node list ([`crate::ArcusClient::with_nodes`]).
    Static,
}

/// Hooks the watch loop drives.
pub(crate) trait RingSink: Send + Sync + 'static {
    fn apply_children(&self, children: Vec<String>);
    /// The node list is watched on this session.
    fn watching(&self, session: &zk::Client);
    /// No usable session at the moment.
    fn reconnecting(&self);
}

struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Backoff {
        Backoff(Self::MIN)
    }

    /// Waits before a retry (this is a retry pause, not a wait for a condition).
    async fn pause(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}

fn is_terminal(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
    )
}

/// Lists the children of `path` and leaves a watch on them.
pub(crate) async fn list_and_watch(
    client: &zk::Client,
    path: &str,
) -> Result<(Vec<String>, zk::OneshotWatcher), zk::Error> {
    let (children, _stat, watcher) = client.get_and_watch_children(path).await?;
    Ok((children, watcher))
}

/// Opens sessions until one succeeds.
async fn reconnect(zk_addrs: &str, opts: &ClientOptions, sink: &dyn RingSink) -> zk::Client {
    sink.reconnecting();
    let mut backoff = Backoff::new();
    loop {
        match connect(zk_addrs, opts).await {
            Ok(c) => {
                info!(zk = zk_addrs, "ZooKeeper session re-established");
                return c;
            }
            Err(e) => {
                warn!("reconnecting to ZooKeeper: {e}");
                backoff.pause().await;
            }
        }
    }
}

/// Watches `path` forever, starting from a session and a watch already in place.
pub(crate) async fn watch_loop(
    sink: std::sync::Arc<dyn RingSink>,
    zk_addrs: String,
    path: String,
    opts: ClientOptions,
    mut client: zk::Client,
    mut watcher: zk::OneshotWatcher,
) {
    loop {
        let event = watcher.changed().await;
        if event.event_type == zk::EventType::Session && event.session_state.is_terminated() {
            warn!(
                zk = zk_addrs,
                "ZooKeeper session {}; opening a new one", event.session_state
            );
            client = reconnect(&zk_addrs, &opts, &*sink).await;
        } else if event.event_type == zk::EventType::NodeDeleted {
            warn!(
                zk = zk_addrs,
                "{path} was deleted: no cache nodes until it is created again"
            );
        }
        // Re-read and re-watch on the current session.
        let mut backoff = Backoff::new();
        watcher = loop {
            match list_and_watch(&client, &path).await {
                Ok((children, w)) => {
                    sink.apply_children(children);
                    sink.watching(&client);
                    break w;
                }
                Err(zk::Error::NoNode) => {
                    sink.apply_children(Vec::new());
                    // Wait for the znode to come back.
                    match client.check_and_watch_stat(&path).await {
                        Ok((None, w)) => {
                            sink.watching(&client);
                            break w;
                        }
                        Ok((Some(_), _)) => continue,
                        Err(e) if is_terminal(&e) => {
                            client = reconnect(&zk_addrs, &opts, &*sink).await
                        }
                        Err(_) => backoff.pause().await,
                    }
                }
                Err(e) if is_terminal(&e) || client.state().is_terminated() => {
                    client = reconnect(&zk_addrs, &opts, &*sink).await;
                }
                Err(e) => {
                    // Connection loss: the ZooKeeper client is reconnecting within the session.
                    warn!(zk = zk_addrs, "listing {path}: {e}; retrying");
                    backoff.pause().await;
                }
            }
        };
    }
}
