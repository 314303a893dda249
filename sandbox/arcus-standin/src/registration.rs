//! arcus-memcached's ZooKeeper behaviour (arcus_zk.c): identity, mapping lookup, the ephemeral
//! cache_list znode and the cache_server_log entries.

use std::net::{ToSocketAddrs, UdpSocket};
use std::time::Duration;
use tracing::{info, warn};
use zookeeper_client as zk;

pub const MAPPING_ROOT: &str = "/arcus/cache_server_mapping";
pub const CACHE_LIST_ROOT: &str = "/arcus/cache_list";
pub const LOG_ROOT: &str = "/arcus/cache_server_log";
/// The longest service code arcus-memcached accepts.
pub const MAX_SERVICE_CODE_LEN: usize = 128;

/// Who this cache node says it is in ZooKeeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub ip: String,
    pub hostname: String,
    pub port: u16,
}

impl Identity {
    /// `<ip>:<port>`: the name clients hash on.
    pub fn ip_port(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// `<ip>:<port>-<hostname>`: the name of its cache_list znode and log entries.
    pub fn node_name(&self) -> String {
        format!("{}:{}-{}", self.ip, self.port, self.hostname)
    }

    /// The mapping znodes tried, in arcus-memcached's order: `<ip>:<port>`, `<hostname>:<port>`, `<ip>`.
    pub fn mapping_candidates(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for name in [
            self.ip_port(),
            format!("{}:{}", self.hostname, self.port),
            self.ip.clone(),
        ] {
            let path = format!("{MAPPING_ROOT}/{name}");
            if !v.contains(&path) {
                v.push(path);
            }
        }
        v
    }
}

/// hostname = `ARCUS_CACHE_HOSTNAME_OVERWRITE` or the system hostname;
/// ip = `ARCUS_CACHE_PUBLIC_IP` or the local address of a UDP socket connected toward the first
/// reachable ZooKeeper address (as arcus-memcached does).
pub fn resolve_identity(ensemble: &str, port: u16) -> Result<Identity, String> {
    let hostname = match non_empty_env("ARCUS_CACHE_HOSTNAME_OVERWRITE") {
        Some(h) => {
            info!("hostname {h} (from ARCUS_CACHE_HOSTNAME_OVERWRITE)");
            h
        }
        None => {
            let h = system_hostname()?;
            info!("hostname {h} (system hostname)");
            h
        }
    };
    let ip = match non_empty_env("ARCUS_CACHE_PUBLIC_IP") {
        Some(ip) => {
            info!("ip {ip} (from ARCUS_CACHE_PUBLIC_IP)");
            ip
        }
        None => {
            let ip = local_ip_toward(ensemble)?;
            info!("ip {ip} (local address of a UDP socket connected toward ZooKeeper)");
            ip
        }
    };
    Ok(Identity { ip, hostname, port })
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn system_hostname() -> Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(format!(
            "cannot get the hostname: {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The local IP the kernel picks to reach the first ZooKeeper host that resolves.
pub fn local_ip_toward(ensemble: &str) -> Result<String, String> {
    let mut errors = Vec::new();
    for hostport in ensemble.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // Strip a chroot suffix (host:port/chroot) and the port; arcus uses the syslog port.
        let hostport = hostport.split('/').next().unwrap_or(hostport);
        let host = match hostport.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => hostport,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let attempt = (|| -> std::io::Result<String> {
            let target = (host, 514u16)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let bind = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind)?;
            sock.connect(target)?;
            Ok(sock.local_addr()?.ip().to_string())
        })();
        match attempt {
            Ok(ip) => return Ok(ip),
            Err(e) => errors.push(format!("{host}: {e}")),
        }
    }
    Err(format!(
        "cannot find a local IP toward any ZooKeeper host of {ensemble:?}: {}",
        errors.join("; ")
    ))
}

/// Field 0 of a mapping child's name split on `^`: the service code.
pub fn parse_service_code(child: &str) -> Result<String, String> {
    let svc = child.split('^').next().unwrap_or("");
    if svc.is_empty() {
        return Err(format!("mapping child {child:?} has an empty service code"));
    }
    if svc.len() > MAX_SERVICE_CODE_LEN {
        return Err(format!(
            "service code {svc:?} is {} characters long; arcus-memcached accepts at most {MAX_SERVICE_CODE_LEN}",
            svc.len()
        ));
    }
    Ok(svc.to_string())
}

/// Connects with the given session timeout; fails after about that long if no server answers.
pub async fn connect(ensemble: &str, session_timeout: Duration) -> Result<zk::Client, String> {
    let connector = zk::Client::connector().with_session_timeout(session_timeout);
    match tokio::time::timeout(
        session_timeout + Duration::from_secs(1),
        connector.connect(ensemble),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(format!("cannot connect to ZooKeeper {ensemble}: {e}")),
        Err(_) => Err(format!(
            "cannot connect to ZooKeeper {ensemble}: no session within {session_timeout:?}"
        )),
    }
}

/// `sync` the mapping root, then find the mapping znode and its single child's service code.
/// Returns (mapping path, service code).
pub async fn find_service_code(
    client: &zk::Client,
    id: &Identity,
) -> Result<(String, String), String> {
    client
        .sync(MAPPING_ROOT)
        .await
        .map_err(|e| format!("cannot sync {MAPPING_ROOT}: {e}"))?;
    let candidates = id.mapping_candidates();
    for path in &candidates {
        match client.list_children(path).await {
            Ok(children) => {
                info!("mapping {path} found, children {children:?}");
                if children.len() != 1 {
                    return Err(format!(
                        "mapping {path} must have exactly one child (the service code), it has {}: {children:?}",
                        children.len()
                    ));
                }
                let svc =
                    parse_service_code(&children[0]).map_err(|e| format!("mapping {path}: {e}"))?;
                return Ok((path.clone(), svc));
            }
            Err(zk::Error::NoNode) => info!("mapping {path}: no such znode"),
            Err(e) => return Err(format!("cannot read mapping {path}: {e}")),
        }
    }
    Err(format!(
        "no ZooKeeper mapping for this cache node; tried, in order: {}",
        candidates.join(", ")
    ))
}

/// Creates the EPHEMERAL `/arcus/cache_list/<svc>/<ip>:<port>-<hostname>` with data `<MB>MB`.
pub async fn create_cache_list_znode(
    client: &zk::Client,
    svc: &str,
    id: &Identity,
    memlimit_mb: u64,
) -> Result<String, String> {
    let path = format!("{CACHE_LIST_ROOT}/{svc}/{}", id.node_name());
    let data = format!("{memlimit_mb}MB");
    let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    match client.create(&path, data.as_bytes(), &options).await {
        Ok(_) => Ok(path),
        Err(zk::Error::NodeExists) => Err(format!(
            "cannot create {path}: it already exists (an old session of this node may still be alive; \
             it disappears when that session expires)"
        )),
        Err(zk::Error::NoNode) => Err(format!("cannot create {path}: {CACHE_LIST_ROOT}/{svc} does not exist")),
        Err(e) => Err(format!("cannot create {path}: {e}")),
    }
}

/// Writes a persistent-sequential `/arcus/cache_server_log/<YYYY-MM-DD>/<node name>-` entry with
/// data `action` (`join`, or `rejoin` after `zkensemble rejoin`), creating the date znode if missing. Returns the entry's path.
pub async fn log_activity(
    client: &zk::Client,
    id: &Identity,
    action: &str,
) -> Result<String, String> {
    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    let day = format!("{LOG_ROOT}/{date}");
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    match client.create(&day, &[], &persistent).await {
        Ok(_) | Err(zk::Error::NodeExists) => {}
        Err(e) => return Err(format!("cannot create {day}: {e}")),
    }
    let prefix = format!("{day}/{}-", id.node_name());
    let sequential = zk::CreateMode::PersistentSequential.with_acls(zk::Acls::anyone_all());
    match client.create(&prefix, action.as_bytes(), &sequential).await {
        Ok((_, seq)) => Ok(format!("{prefix}{seq}")),
        Err(e) => Err(format!("cannot create {prefix}<seq>: {e}")),
    }
}

/// A pending one-shot watch, owning no [`zk::Client`] once armed, so that dropping the last
/// client closes the session.
pub type Watch = std::pin::Pin<Box<dyn std::future::Future<Output = WatchOutcome> + Send>>;

#[derive(Debug)]
pub enum WatchOutcome {
    /// The node's existence watch fired.
    Node(zk::WatchedEvent),
    /// The node did not exist when the watch was armed.
    NodeMissing,
    /// The children watch fired.
    Children(zk::WatchedEvent),
    /// Arming failed (e.g. connection loss); retry later unless the session is over.
    Failed(zk::Error),
}

/// Watches creation/deletion/data of `path` (an `exists` watch), after `delay`.
pub fn watch_node(client: zk::Client, path: String, delay: Duration) -> Watch {
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        let armed = client.check_and_watch_stat(&path).await;
        drop(client);
        match armed {
            Ok((None, _)) => WatchOutcome::NodeMissing,
            Ok((Some(_), watcher)) => WatchOutcome::Node(watcher.changed().await),
            Err(e) => WatchOutcome::Failed(e),
        }
    })
}

/// Watches the children of `path`, after `delay`: the cache_list this node belongs to.
pub fn watch_children(client: zk::Client, path: String, delay: Duration) -> Watch {
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        let armed = client.get_and_watch_children(&path).await;
        drop(client);
        match armed {
            Ok((children, _, watcher)) => {
                let shown = children
                    .iter()
                    .take(16)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                let more = if children.len() > 16 { ", ..." } else { "" };
                info!("{path} has {} cache node(s): {shown}{more}", children.len());
                let ev = watcher.changed().await;
                WatchOutcome::Children(ev)
            }
            Err(e) => WatchOutcome::Failed(e),
        }
    })
}

/// Closes the session (dropping the last client sends CloseSession) and waits up to `limit` for
/// the server to confirm, so that the ephemeral znode is gone when this returns.
pub async fn close_session(client: zk::Client, limit: Duration) {
    let mut state = client.state_watcher();
    if state.peek_state().is_terminated() {
        return;
    }
    drop(client);
    let closed = tokio::time::timeout(limit, async {
        loop {
            let s = state.peek_state();
            if s.is_terminated() {
                return s;
            }
            state.changed().await;
        }
    })
    .await;
    match closed {
        Ok(s) => info!("ZooKeeper session closed ({s})"),
        Err(_) => warn!("ZooKeeper did not confirm closing the session within {limit:?}; going on"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lookup_order() {
        let id = Identity {
            ip: "127.1.0.5".into(),
            hostname: "mc-0".into(),
            port: 11211,
        };
        assert_eq!(id.node_name(), "127.1.0.5:11211-mc-0");
        assert_eq!(
            id.mapping_candidates(),
            vec![
                "/arcus/cache_server_mapping/127.1.0.5:11211",
                "/arcus/cache_server_mapping/mc-0:11211",
                "/arcus/cache_server_mapping/127.1.0.5",
            ]
        );
        // hostname equal to the ip: no duplicate look-up
        let id = Identity {
            ip: "10.0.0.1".into(),
            hostname: "10.0.0.1".into(),
            port: 1,
        };
        assert_eq!(id.mapping_candidates().len(), 2);
    }

    #[test]
    fn service_code_is_field_zero() {
        assert_eq!(parse_service_code("test").unwrap(), "test");
        assert_eq!(parse_service_code("svc^g0^127.0.0.1:20125").unwrap(), "svc");
        assert!(parse_service_code("^g0").is_err());
        assert!(parse_service_code(&"a".repeat(128)).is_ok());
        assert!(parse_service_code(&"a".repeat(129))
            .unwrap_err()
            .contains("at most 128"));
    }

    #[test]
    fn local_ip_toward_loopback() {
        assert_eq!(local_ip_toward("127.0.0.1:2181").unwrap(), "127.0.0.1");
        // unresolvable first host: falls through to the next
        assert_eq!(
            local_ip_toward("no-such-host.invalid:2181,127.0.0.1:2181/chroot").unwrap(),
            "127.0.0.1"
        );
        assert!(local_ip_toward("no-such-host.invalid:2181").is_err());
    }
}
